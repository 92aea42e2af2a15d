//! Single active consumer and consumer priorities (`x-priority`).

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_active_consumer_gets_everything_until_cancelled() {
    let (_c, ch) = connect_channel().await;
    let q = xqueue(
        &ch,
        "sac",
        &[("x-single-active-consumer", AMQPValue::Boolean(true))],
    )
    .await;
    let mut c1 = consume(&ch, &q, true, FieldTable::default()).await;
    // A later consumer with a higher priority does not take over (RabbitMQ 3.10 keeps
    // the first-registered consumer active on classic queues).
    let mut c2 = consume(&ch, &q, true, table(&[("x-priority", int(10))])).await;
    for i in 0..4 {
        publish(&ch, "", &q, format!("m{i}").as_bytes()).await;
    }
    for i in 0..4 {
        assert_eq!(body(&next_delivery(&mut c1).await), format!("m{i}"));
    }
    assert_no_delivery(&mut c2, Duration::from_millis(150)).await;
    t(ch.basic_cancel(c1.tag().as_str(), BasicCancelOptions::default()))
        .await
        .unwrap();
    publish(&ch, "", &q, b"after").await;
    assert_eq!(body(&next_delivery(&mut c2).await), "after");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_priorities_serve_highest_with_credit_first() {
    let conn = connect().await;
    let ch_hi = t(conn.create_channel()).await.unwrap();
    let ch_lo = t(conn.create_channel()).await.unwrap();
    let q = xqueue(&ch_hi, "cprio", &[]).await;
    t(ch_hi.basic_qos(2, BasicQosOptions::default()))
        .await
        .unwrap();
    t(ch_lo.basic_qos(10, BasicQosOptions::default()))
        .await
        .unwrap();
    let mut lo = consume(&ch_lo, &q, false, table(&[("x-priority", int(1))])).await;
    let mut hi = consume(&ch_hi, &q, false, table(&[("x-priority", int(10))])).await;
    for i in 0..5 {
        publish(&ch_hi, "", &q, format!("m{i}").as_bytes()).await;
    }
    // The high-priority consumer takes what its prefetch allows; the rest overflow.
    let h0 = next_delivery(&mut hi).await;
    let h1 = next_delivery(&mut hi).await;
    assert_eq!((body(&h0).as_str(), body(&h1).as_str()), ("m0", "m1"));
    let mut low: Vec<String> = vec![];
    for _ in 0..3 {
        let d = next_delivery(&mut lo).await;
        low.push(body(&d));
        ack(&d).await;
    }
    assert_eq!(low, ["m2", "m3", "m4"]);
    // Once it has credit again, the high-priority consumer is preferred.
    ack(&h0).await;
    ack(&h1).await;
    publish(&ch_hi, "", &q, b"m5").await;
    let d = next_delivery(&mut hi).await;
    assert_eq!(body(&d), "m5");
    assert_no_delivery(&mut lo, Duration::from_millis(100)).await;
    // A non-integer x-priority is refused.
    let ch = t(conn.create_channel()).await.unwrap();
    let r = t(ch.basic_consume(
        &q,
        "",
        BasicConsumeOptions::default(),
        table(&[("x-priority", s("high"))]),
    ))
    .await;
    assert_code(r, 406);
}
