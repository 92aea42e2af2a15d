//! basic.* : publish/consume/get, acks, qos, redelivery, returns, cancel.

mod common;

use std::time::Duration;

use common::*;
use futures::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Consumer};

const QUIET: Duration = Duration::from_millis(300);

async fn consume(
    ch: &Channel,
    q: &str,
    tag: &str,
    options: BasicConsumeOptions,
) -> lapin::Result<Consumer> {
    t(ch.basic_consume(q, tag, options, FieldTable::default())).await
}

async fn fill(ch: &Channel, q: &str, n: usize) {
    for i in 0..n {
        publish(ch, "", q, format!("m{i}").as_bytes()).await;
    }
    wait_message_count(ch, q, n as u32).await;
}

fn body(d: &lapin::message::Delivery) -> String {
    String::from_utf8(d.data.clone()).unwrap()
}

async fn wait_connection_closed(conn: &lapin::Connection) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while conn.status().connected() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        !conn.status().connected(),
        "connection should have been closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_consume_with_properties() {
    let (_c, ch) = connect_channel().await;
    let q = temp_queue(&ch, "pc").await;
    let mut consumer = consume(&ch, &q, "my-tag", BasicConsumeOptions::default())
        .await
        .unwrap();
    assert_eq!(consumer.tag().as_str(), "my-tag");
    let props = BasicProperties::default()
        .with_content_type("text/plain".into())
        .with_correlation_id("corr-1".into())
        .with_delivery_mode(2)
        .with_priority(3)
        .with_headers(str_table(&[("h", "v")]));
    t(ch.basic_publish("", &q, BasicPublishOptions::default(), b"hello", props))
        .await
        .unwrap();
    let d = next_delivery(&mut consumer).await;
    assert_eq!(d.data, b"hello");
    assert_eq!(d.exchange.as_str(), "");
    assert_eq!(d.routing_key.as_str(), q);
    assert!(!d.redelivered);
    assert_eq!(
        d.properties.content_type().as_ref().map(|s| s.as_str()),
        Some("text/plain")
    );
    assert_eq!(
        d.properties.correlation_id().as_ref().map(|s| s.as_str()),
        Some("corr-1")
    );
    assert_eq!(*d.properties.delivery_mode(), Some(2));
    assert_eq!(*d.properties.priority(), Some(3));
    let h = d.properties.headers().as_ref().expect("headers");
    assert!(h.inner().contains_key("h"));
    d.ack(BasicAckOptions::default()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_generated_consumer_tag() {
    let (_c, ch) = connect_channel().await;
    let q = temp_queue(&ch, "tag").await;
    let c = consume(&ch, &q, "", BasicConsumeOptions::default())
        .await
        .unwrap();
    assert_eq!(passive_consumers(&ch, &q).await, 1);
    assert!(c.tag().as_str().starts_with("amq.ctag-"), "{}", c.tag());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_consumer_tag_is_not_allowed() {
    let (conn, ch) = connect_channel().await;
    let q = temp_queue(&ch, "duptag").await;
    let _c = consume(&ch, &q, "same", BasicConsumeOptions::default())
        .await
        .unwrap();
    // RabbitMQ: reusing a consumer tag on the same channel is 530 NOT_ALLOWED,
    // a connection-level error.
    assert_code(
        consume(&ch, &q, "same", BasicConsumeOptions::default()).await,
        530,
    );
    wait_connection_closed(&conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_message_spans_frames() {
    let (_c, ch) = connect_channel().await;
    confirm_mode(&ch).await;
    let q = temp_queue(&ch, "large").await;
    let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    publish_with(
        &ch,
        "",
        &q,
        BasicPublishOptions::default(),
        BasicProperties::default(),
        &payload,
    )
    .await
    .unwrap();
    let got = get_body(&ch, &q).await.unwrap();
    assert_eq!(got.len(), payload.len());
    assert!(got == payload);
    // Empty body too.
    publish_with(
        &ch,
        "",
        &q,
        BasicPublishOptions::default(),
        BasicProperties::default(),
        b"",
    )
    .await
    .unwrap();
    assert_eq!(get_body(&ch, &q).await, Some(vec![]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_and_get_empty() {
    let (_c, ch) = connect_channel().await;
    let q = temp_queue(&ch, "get").await;
    assert!(t(ch.basic_get(&q, BasicGetOptions::default()))
        .await
        .unwrap()
        .is_none());
    fill(&ch, &q, 3).await;
    let m = t(ch.basic_get(&q, BasicGetOptions { no_ack: false }))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.delivery.data, b"m0");
    assert_eq!(
        m.message_count, 2,
        "get-ok message-count is the number left"
    );
    assert!(!m.delivery.redelivered);
    m.delivery.ack(BasicAckOptions::default()).await.unwrap();
    assert_eq!(get_body(&ch, &q).await.as_deref(), Some(&b"m1"[..]));
    assert_eq!(get_body(&ch, &q).await.as_deref(), Some(&b"m2"[..]));
    assert!(get_body(&ch, &q).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_on_missing_queue_is_not_found() {
    let (_c, ch) = connect_channel().await;
    assert_code(
        t(ch.basic_get(&uniq("none"), BasicGetOptions::default())).await,
        404,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_multiple() {
    let (conn, ch) = connect_channel().await;
    let q = temp_queue(&ch, "ackm").await;
    fill(&ch, &q, 4).await;
    let mut tags = vec![];
    for _ in 0..3 {
        tags.push(
            t(ch.basic_get(&q, BasicGetOptions::default()))
                .await
                .unwrap()
                .unwrap()
                .delivery
                .delivery_tag,
        );
    }
    assert!(
        tags.windows(2).all(|w| w[1] > w[0]),
        "delivery tags increase: {tags:?}"
    );
    t(ch.basic_ack(tags[2], BasicAckOptions { multiple: true }))
        .await
        .unwrap();
    // Closing the channel requeues nothing: all three were acked.
    t(ch.close(200, "")).await.unwrap();
    let ch2 = t(conn.create_channel()).await.unwrap();
    assert_eq!(drain(&ch2, &q).await, vec!["m3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_delivery_tag_ack_is_precondition_failed() {
    let (conn, ch) = connect_channel().await;
    let rx = watch_channel(&ch);
    t(ch.basic_ack(999, BasicAckOptions::default()))
        .await
        .unwrap();
    // basic.ack is asynchronous; the error comes back as channel.close 406.
    // (Nothing more is sent on the channel: under load lapin may write its
    // close-ok ahead of a method queued before it, and a method on a closed
    // channel is a connection error, 504, from RabbitMQ as from warren.)
    expect_closed_with(rx, 406).await;
    assert!(conn.status().connected());
    // Only the channel was closed: the connection still works.
    let other = t(conn.create_channel()).await.unwrap();
    temp_queue(&other, "after-406").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_requeue_sets_redelivered() {
    let (_c, ch) = connect_channel().await;
    let q = temp_queue(&ch, "rej").await;
    fill(&ch, &q, 1).await;
    let m = t(ch.basic_get(&q, BasicGetOptions::default()))
        .await
        .unwrap()
        .unwrap();
    assert!(!m.delivery.redelivered);
    m.delivery
        .reject(BasicRejectOptions { requeue: true })
        .await
        .unwrap();
    let m = t(ch.basic_get(&q, BasicGetOptions::default()))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(m.delivery.data, b"m0");
    assert!(
        m.delivery.redelivered,
        "requeued message must be flagged redelivered"
    );
    m.delivery
        .reject(BasicRejectOptions { requeue: false })
        .await
        .unwrap();
    assert!(
        t(ch.basic_get(&q, BasicGetOptions::default()))
            .await
            .unwrap()
            .is_none(),
        "reject without requeue drops"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_multiple_requeue() {
    let (_c, ch) = connect_channel().await;
    let q = temp_queue(&ch, "nackm").await;
    fill(&ch, &q, 3).await;
    let mut consumer = consume(&ch, &q, "", BasicConsumeOptions::default())
        .await
        .unwrap();
    let mut last = 0;
    for i in 0..3 {
        let d = next_delivery(&mut consumer).await;
        assert_eq!(body(&d), format!("m{i}"));
        assert!(!d.redelivered);
        last = d.delivery_tag;
    }
    t(ch.basic_nack(
        last,
        BasicNackOptions {
            multiple: true,
            requeue: true,
        },
    ))
    .await
    .unwrap();
    // All three come back, in order, flagged redelivered.
    for i in 0..3 {
        let d = next_delivery(&mut consumer).await;
        assert_eq!(body(&d), format!("m{i}"));
        assert!(d.redelivered);
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    assert_no_delivery(&mut consumer, QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nack_without_requeue_drops() {
    let (_c, ch) = connect_channel().await;
    let q = temp_queue(&ch, "nackdrop").await;
    fill(&ch, &q, 3).await;
    let mut tag = 0;
    for _ in 0..2 {
        tag = t(ch.basic_get(&q, BasicGetOptions::default()))
            .await
            .unwrap()
            .unwrap()
            .delivery
            .delivery_tag;
    }
    t(ch.basic_nack(
        tag,
        BasicNackOptions {
            multiple: true,
            requeue: false,
        },
    ))
    .await
    .unwrap();
    assert_eq!(drain(&ch, &q).await, vec!["m2"]);
    t(ch.close(200, "")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recover_requeues_with_redelivered() {
    let (conn, ch) = connect_channel().await;
    let q = temp_queue(&ch, "recover").await;
    fill(&ch, &q, 2).await;
    for _ in 0..2 {
        t(ch.basic_get(&q, BasicGetOptions::default()))
            .await
            .unwrap()
            .unwrap();
    }
    assert_eq!(message_count(&ch, &q).await, 0);
    t(ch.basic_recover(BasicRecoverOptions { requeue: true }))
        .await
        .unwrap();
    let ch2 = t(conn.create_channel()).await.unwrap();
    for i in 0..2 {
        let m = t(ch2.basic_get(&q, BasicGetOptions { no_ack: true }))
            .await
            .unwrap()
            .expect("requeued");
        assert_eq!(m.delivery.data, format!("m{i}").as_bytes());
        assert!(m.delivery.redelivered);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_prefetch_count_limits_unacked() {
    let (_c, ch) = connect_channel().await;
    let q = temp_queue(&ch, "qos").await;
    fill(&ch, &q, 5).await;
    t(ch.basic_qos(2, BasicQosOptions::default()))
        .await
        .unwrap();
    let mut consumer = consume(&ch, &q, "", BasicConsumeOptions::default())
        .await
        .unwrap();
    let d0 = next_delivery(&mut consumer).await;
    let d1 = next_delivery(&mut consumer).await;
    assert_eq!((body(&d0), body(&d1)), ("m0".into(), "m1".into()));
    assert_no_delivery(&mut consumer, QUIET).await;
    assert_eq!(message_count(&ch, &q).await, 3);
    d0.ack(BasicAckOptions::default()).await.unwrap();
    let d2 = next_delivery(&mut consumer).await;
    assert_eq!(body(&d2), "m2");
    assert_no_delivery(&mut consumer, QUIET).await;
    // Acking both outstanding (multiple) releases two more.
    t(ch.basic_ack(d2.delivery_tag, BasicAckOptions { multiple: true }))
        .await
        .unwrap();
    let d3 = next_delivery(&mut consumer).await;
    let d4 = next_delivery(&mut consumer).await;
    assert_eq!((body(&d3), body(&d4)), ("m3".into(), "m4".into()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_per_consumer_vs_global() {
    let (conn, ch) = connect_channel().await;
    let qa = temp_queue(&ch, "qa").await;
    let qb = temp_queue(&ch, "qb").await;
    fill(&ch, &qa, 5).await;
    fill(&ch, &qb, 5).await;
    // RabbitMQ reverses the spec: global=false => per consumer limit.
    let c1 = t(conn.create_channel()).await.unwrap();
    t(c1.basic_qos(2, BasicQosOptions { global: false }))
        .await
        .unwrap();
    let mut a = consume(&c1, &qa, "", BasicConsumeOptions::default())
        .await
        .unwrap();
    let mut b = consume(&c1, &qb, "", BasicConsumeOptions::default())
        .await
        .unwrap();
    for _ in 0..2 {
        next_delivery(&mut a).await;
        next_delivery(&mut b).await;
    }
    assert_no_delivery(&mut a, QUIET).await;
    assert_no_delivery(&mut b, Duration::from_millis(50)).await;
    t(c1.close(200, "")).await.unwrap();

    // global=true => one limit shared by all consumers of the channel.
    wait_message_count(&ch, &qa, 5).await;
    wait_message_count(&ch, &qb, 5).await;
    let c2 = t(conn.create_channel()).await.unwrap();
    t(c2.basic_qos(3, BasicQosOptions { global: true }))
        .await
        .unwrap();
    let mut a = consume(&c2, &qa, "", BasicConsumeOptions::default())
        .await
        .unwrap();
    let mut b = consume(&c2, &qb, "", BasicConsumeOptions::default())
        .await
        .unwrap();
    let mut got = 0;
    loop {
        tokio::select! {
            Some(Ok(_)) = a.next() => got += 1,
            Some(Ok(_)) = b.next() => got += 1,
            _ = tokio::time::sleep(QUIET) => break,
        }
    }
    assert_eq!(
        got, 3,
        "global prefetch is shared across the channel's consumers"
    );
    assert_eq!(
        message_count(&ch, &qa).await + message_count(&ch, &qb).await,
        7
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_global_and_per_consumer_together() {
    let (_c, ch) = connect_channel().await;
    let qa = temp_queue(&ch, "qa").await;
    fill(&ch, &qa, 6).await;
    // Both limits hold independently: per-consumer 4, channel-wide 2 -> 2 outstanding.
    t(ch.basic_qos(4, BasicQosOptions { global: false }))
        .await
        .unwrap();
    t(ch.basic_qos(2, BasicQosOptions { global: true }))
        .await
        .unwrap();
    let mut a = consume(&ch, &qa, "", BasicConsumeOptions::default())
        .await
        .unwrap();
    next_delivery(&mut a).await;
    next_delivery(&mut a).await;
    assert_no_delivery(&mut a, QUIET).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_prefetch_size_is_not_implemented() {
    let (conn, ch) = connect_channel().await;
    // lapin has no prefetch_size argument, so do it by hand on the wire below.
    drop(ch);
    drop(conn);
    use common::raw::{self, RawConn};
    let mut c = RawConn::open().await;
    c.open_channel(1).await;
    let mut a = vec![];
    raw::put_u32(&mut a, 1024); // prefetch-size
    raw::put_u16(&mut a, 10); // prefetch-count
    raw::put_u8(&mut a, 0); // global
    c.send_method(1, 60, 10, &a).await;
    let f = c.expect_close().await;
    let (code, text, class, method) = f.close_info().unwrap();
    assert_eq!(code, 540, "{text}");
    // RabbitMQ 3.10: 540 NOT_IMPLEMENTED is a hard error -> connection.close.
    assert_eq!(f.method_id(), Some(id!(ConnectionClose)), "{f:?}");
    assert_eq!((class, method), id!(BasicQos));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_across_consumers() {
    let conn = connect().await;
    let ch = t(conn.create_channel()).await.unwrap();
    let q = temp_queue(&ch, "rr").await;
    let ch1 = t(conn.create_channel()).await.unwrap();
    let ch2 = t(conn.create_channel()).await.unwrap();
    let mut c1 = consume(
        &ch1,
        &q,
        "",
        BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut c2 = consume(
        &ch2,
        &q,
        "",
        BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    for i in 0..6 {
        publish(&ch, "", &q, format!("{i}").as_bytes()).await;
    }
    let mut g1 = vec![];
    let mut g2 = vec![];
    for _ in 0..3 {
        g1.push(body(&next_delivery(&mut c1).await).parse::<u32>().unwrap());
        g2.push(body(&next_delivery(&mut c2).await).parse::<u32>().unwrap());
    }
    assert_no_delivery(&mut c1, Duration::from_millis(100)).await;
    assert_no_delivery(&mut c2, Duration::from_millis(10)).await;
    // Strict alternation: each consumer sees every other message.
    let (evens, odds) = if g1[0] == 0 { (g1, g2) } else { (g2, g1) };
    assert_eq!(evens, vec![0, 2, 4]);
    assert_eq!(odds, vec![1, 3, 5]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusive_consumer() {
    let conn = connect().await;
    let ch = t(conn.create_channel()).await.unwrap();
    let q = temp_queue(&ch, "exclc").await;
    // Keep the Consumer alive: dropping a lapin Consumer sends basic.cancel.
    let _c1 = consume(
        &ch,
        &q,
        "",
        BasicConsumeOptions {
            exclusive: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let ch2 = t(conn.create_channel()).await.unwrap();
    assert_code(
        consume(&ch2, &q, "", BasicConsumeOptions::default()).await,
        403,
    );
    // And the other way round: an exclusive consumer when one already exists.
    let q2 = temp_queue(&ch, "exclc2").await;
    let _c2 = consume(&ch, &q2, "", BasicConsumeOptions::default())
        .await
        .unwrap();
    let ch3 = t(conn.create_channel()).await.unwrap();
    assert_code(
        consume(
            &ch3,
            &q2,
            "",
            BasicConsumeOptions {
                exclusive: true,
                ..Default::default()
            },
        )
        .await,
        403,
    );
    assert!(conn.status().connected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consume_missing_queue_is_not_found() {
    let (_c, ch) = connect_channel().await;
    assert_code(
        consume(&ch, &uniq("nope"), "", BasicConsumeOptions::default()).await,
        404,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_deliveries() {
    let (_c, ch) = connect_channel().await;
    let q = temp_queue(&ch, "cancel").await;
    let mut consumer = consume(
        &ch,
        &q,
        "to-cancel",
        BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    publish(&ch, "", &q, b"before").await;
    assert_eq!(next_delivery(&mut consumer).await.data, b"before");
    t(ch.basic_cancel("to-cancel", BasicCancelOptions::default()))
        .await
        .unwrap();
    // The stream ends after cancel-ok.
    assert!(t(consumer.next()).await.is_none());
    publish(&ch, "", &q, b"after").await;
    wait_message_count(&ch, &q, 1).await;
    assert_eq!(passive_consumers(&ch, &q).await, 0);
}

async fn passive_consumers(ch: &Channel, q: &str) -> u32 {
    t(ch.queue_declare(
        q,
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .unwrap()
    .consumer_count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_requeued_in_order_when_channel_closes() {
    let conn = connect().await;
    let ch = t(conn.create_channel()).await.unwrap();
    let q = temp_queue(&ch, "requeue").await;
    fill(&ch, &q, 5).await;
    let cch = t(conn.create_channel()).await.unwrap();
    let mut consumer = consume(&cch, &q, "", BasicConsumeOptions::default())
        .await
        .unwrap();
    for i in 0..5 {
        assert_eq!(body(&next_delivery(&mut consumer).await), format!("m{i}"));
    }
    assert_eq!(message_count(&ch, &q).await, 0);
    t(cch.close(200, "")).await.unwrap();
    wait_message_count(&ch, &q, 5).await;
    for i in 0..5 {
        let m = t(ch.basic_get(&q, BasicGetOptions { no_ack: true }))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            m.delivery.data,
            format!("m{i}").as_bytes(),
            "original order"
        );
        assert!(m.delivery.redelivered);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unacked_requeued_when_connection_dies() {
    let conn = connect().await;
    let ch = t(conn.create_channel()).await.unwrap();
    let q = uniq("requeue-conn");
    declare_queue(&ch, &q).await;
    fill(&ch, &q, 3).await;
    let conn2 = connect().await;
    let cch = t(conn2.create_channel()).await.unwrap();
    let mut consumer = consume(&cch, &q, "", BasicConsumeOptions::default())
        .await
        .unwrap();
    let d = next_delivery(&mut consumer).await;
    d.ack(BasicAckOptions::default()).await.unwrap();
    next_delivery(&mut consumer).await;
    next_delivery(&mut consumer).await;
    t(conn2.close(200, "")).await.unwrap();
    wait_message_count(&ch, &q, 2).await;
    assert_eq!(drain(&ch, &q).await, vec!["m1", "m2"]);
    t(ch.queue_delete(&q, QueueDeleteOptions::default()))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mandatory_unroutable_is_returned() {
    let (_c, ch) = connect_channel().await;
    confirm_mode(&ch).await;
    let key = uniq("nobody-home");
    let conf = publish_with(
        &ch,
        "amq.direct",
        &key,
        BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        },
        BasicProperties::default().with_message_id("mid".into()),
        b"bounce",
    )
    .await
    .unwrap();
    // RabbitMQ: basic.return first, then basic.ack for the same publish.
    assert!(conf.is_ack(), "{conf:?}");
    let ret = conf.take_message().expect("basic.return");
    assert_eq!(ret.reply_code, 312);
    assert_eq!(ret.reply_text.as_str(), "NO_ROUTE");
    assert_eq!(ret.delivery.exchange.as_str(), "amq.direct");
    assert_eq!(ret.delivery.routing_key.as_str(), key);
    assert_eq!(ret.delivery.data, b"bounce");
    assert_eq!(
        ret.delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str()),
        Some("mid")
    );
    // A routable mandatory message is not returned.
    let q = temp_queue(&ch, "routable").await;
    let conf = publish_with(
        &ch,
        "",
        &q,
        BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        },
        BasicProperties::default(),
        b"ok",
    )
    .await
    .unwrap();
    assert!(conf.is_ack());
    assert!(conf.take_message().is_none());
    // Non-mandatory unroutable is silently dropped (acked, not returned).
    let conf = publish_with(
        &ch,
        "amq.direct",
        &key,
        BasicPublishOptions::default(),
        BasicProperties::default(),
        b"drop",
    )
    .await
    .unwrap();
    assert!(conf.is_ack());
    assert!(conf.take_message().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mandatory_return_without_confirms() {
    let (_c, ch) = connect_channel().await;
    t(ch.basic_publish(
        "",
        &uniq("nobody"),
        BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        },
        b"r1",
        BasicProperties::default(),
    ))
    .await
    .unwrap();
    // A synchronous round-trip on the same channel: the return precedes its reply.
    temp_queue(&ch, "sync").await;
    let returned = t(ch.wait_for_confirms()).await.unwrap();
    assert_eq!(returned.len(), 1);
    assert_eq!(returned[0].reply_code, 312);
    assert_eq!(returned[0].delivery.data, b"r1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_immediate_is_not_implemented() {
    let (conn, ch) = connect_channel().await;
    let q = temp_queue(&ch, "imm").await;
    let crx = watch_connection(&conn);
    let _ = t(ch.basic_publish(
        "",
        &q,
        BasicPublishOptions {
            immediate: true,
            ..Default::default()
        },
        b"x",
        BasicProperties::default(),
    ))
    .await;
    // RabbitMQ: immediate=true -> 540 NOT_IMPLEMENTED, a hard error: the connection closes.
    expect_closed_with(crx, 540).await;
    wait_connection_closed(&conn).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_cancel_notification_on_queue_delete() {
    let conn = connect().await;
    let ch = t(conn.create_channel()).await.unwrap();
    let q = uniq("cancel-notify");
    declare_queue(&ch, &q).await;
    let cch = t(conn.create_channel()).await.unwrap();
    let mut consumer = consume(&cch, &q, "", BasicConsumeOptions::default())
        .await
        .unwrap();
    t(ch.queue_delete(&q, QueueDeleteOptions::default()))
        .await
        .unwrap();
    // The server sends basic.cancel; lapin ends the consumer stream.
    assert!(
        t(consumer.next()).await.is_none(),
        "consumer stream must end"
    );
    // The consuming channel stays open.
    assert!(cch.status().connected());
    temp_queue(&cch, "after-cancel").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_ack_consumer() {
    let conn = connect().await;
    let ch = t(conn.create_channel()).await.unwrap();
    let q = temp_queue(&ch, "noack").await;
    fill(&ch, &q, 3).await;
    let cch = t(conn.create_channel()).await.unwrap();
    t(cch.basic_qos(1, BasicQosOptions::default()))
        .await
        .unwrap();
    let mut consumer = consume(
        &cch,
        &q,
        "",
        BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    // prefetch does not apply to no-ack consumers: all arrive without acking.
    for i in 0..3 {
        assert_eq!(body(&next_delivery(&mut consumer).await), format!("m{i}"));
    }
    t(cch.close(200, "")).await.unwrap();
    // Nothing comes back: they were settled on delivery.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(message_count(&ch, &q).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_order_preserved() {
    let (_c, ch) = connect_channel().await;
    let q = temp_queue(&ch, "order").await;
    for i in 0..100 {
        publish(&ch, "", &q, format!("{i}").as_bytes()).await;
    }
    let mut consumer = consume(
        &ch,
        &q,
        "",
        BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    for i in 0..100 {
        assert_eq!(body(&next_delivery(&mut consumer).await), format!("{i}"));
    }
}
