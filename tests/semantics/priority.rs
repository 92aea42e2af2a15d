//! Priority queues (`x-max-priority`): higher first, FIFO within a priority; plain
//! queues ignore the priority property.

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_queue_orders_higher_first_fifo_within() {
    let (_c, ch) = connect_channel().await;
    let q = xqueue(&ch, "prio", &[("x-max-priority", int(5))]).await;
    pub_prio(&ch, &q, "none-1", None).await;
    pub_prio(&ch, &q, "p3-1", Some(3)).await;
    pub_prio(&ch, &q, "p0", Some(0)).await;
    pub_prio(&ch, &q, "p5", Some(5)).await;
    pub_prio(&ch, &q, "p3-2", Some(3)).await;
    // Above x-max-priority counts as the maximum: FIFO with p5.
    pub_prio(&ch, &q, "p9", Some(9)).await;
    pub_prio(&ch, &q, "none-2", None).await;
    pub_prio(&ch, &q, "p1", Some(1)).await;
    wait_message_count(&ch, &q, 8).await;
    // No priority counts as 0: FIFO with the explicit 0.
    assert_eq!(
        drain(&ch, &q).await,
        ["p5", "p9", "p3-1", "p3-2", "p1", "none-1", "p0", "none-2"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_queue_delivers_to_consumer_in_priority_order() {
    let (_c, ch) = connect_channel().await;
    let q = xqueue(&ch, "prio.c", &[("x-max-priority", int(10))]).await;
    for (b, p) in [("low", 1), ("high", 9), ("mid", 5)] {
        pub_prio(&ch, &q, b, Some(p)).await;
    }
    wait_message_count(&ch, &q, 3).await;
    t(ch.basic_qos(1, BasicQosOptions::default()))
        .await
        .unwrap();
    let mut c = consume(&ch, &q, false, FieldTable::default()).await;
    let mut got = vec![];
    for _ in 0..3 {
        let d = next_delivery(&mut c).await;
        got.push(body(&d));
        ack(&d).await;
    }
    assert_eq!(got, ["high", "mid", "low"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_queue_ignores_priority() {
    let (_c, ch) = connect_channel().await;
    let q = xqueue(&ch, "noprio", &[]).await;
    pub_prio(&ch, &q, "a", Some(1)).await;
    pub_prio(&ch, &q, "b", Some(9)).await;
    wait_message_count(&ch, &q, 2).await;
    assert_eq!(drain(&ch, &q).await, ["a", "b"]);
}
