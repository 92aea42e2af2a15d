//! Stream queues over AMQP 0-9-1, with lapin, as RabbitMQ 3.10+ runs them
//! (texts checked against RabbitMQ 3.10.8): declaration rules and errors,
//! `x-stream-offset` (first, last, next, a number, a timestamp, an interval),
//! the `x-stream-offset` header, independent consumers, credit returned by
//! acks, consumers waiting for new messages, confirms, the operations streams
//! refuse, retention dropping a segment, and data kept across kill -9.

mod common;
#[allow(dead_code)]
#[path = "semantics/helpers.rs"]
mod helpers;

use common::process::{data_dir, BrokerProcess};
use helpers::*;

fn stream() -> (&'static str, AMQPValue) {
    ("x-queue-type", s("stream"))
}

async fn declare_stream(ch: &Channel, name: &str, args: &[(&str, AMQPValue)]) -> lapin::Result<()> {
    let mut all = vec![stream()];
    all.extend(args.iter().cloned());
    t(ch.queue_declare(
        name,
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        table(&all),
    ))
    .await
    .map(|_| ())
}

/// The reply text of a closed channel or connection, asserting its code.
#[track_caller]
fn closed_text<T: std::fmt::Debug>(r: lapin::Result<T>, code: u16) -> String {
    match r {
        Err(lapin::Error::ProtocolError(e)) => {
            assert_eq!(e.get_id(), code, "{e:?}");
            e.get_message().as_str().to_string()
        }
        other => panic!("expected {code}, got {other:?}"),
    }
}

/// Publish `bodies` with confirms (all must be acked).
async fn publish_all(ch: &Channel, q: &str, bodies: &[String]) {
    let mut pending = Vec::new();
    for b in bodies {
        pending.push(
            t(ch.basic_publish(
                "",
                q,
                BasicPublishOptions::default(),
                b.as_bytes(),
                BasicProperties::default(),
            ))
            .await
            .expect("publish"),
        );
    }
    for p in pending {
        assert!(t(p).await.expect("confirm").is_ack());
    }
}

async fn consume_from(ch: &Channel, q: &str, offset: AMQPValue, prefetch: u16) -> Consumer {
    t(ch.basic_qos(prefetch, BasicQosOptions::default()))
        .await
        .expect("qos");
    t(ch.basic_consume(
        q,
        &uniq("ctag"),
        BasicConsumeOptions::default(),
        table(&[("x-stream-offset", offset)]),
    ))
    .await
    .expect("consume")
}

fn offset_of(d: &Delivery) -> i64 {
    let headers = d.properties.headers().as_ref().expect("headers");
    match headers.inner().get("x-stream-offset") {
        Some(AMQPValue::LongLongInt(o)) => *o,
        other => panic!("x-stream-offset header: {other:?}"),
    }
}

/// Take `n` deliveries, acking each; returns (offset, body).
async fn take(c: &mut Consumer, n: usize) -> Vec<(i64, String)> {
    let mut out = Vec::new();
    for _ in 0..n {
        let d = next_delivery(c).await;
        out.push((offset_of(&d), body(&d)));
        t(d.ack(BasicAckOptions::default())).await.expect("ack");
    }
    out
}

fn bodies(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

#[tokio::test]
async fn declare_rules_and_errors() {
    let (conn, _) = connect_channel().await;
    let name = uniq("s.decl");
    for (opts, property) in [
        (QueueDeclareOptions::default(), "non-durable"),
        (
            QueueDeclareOptions {
                durable: true,
                exclusive: true,
                ..Default::default()
            },
            "exclusive-owner",
        ),
        (
            QueueDeclareOptions {
                durable: true,
                auto_delete: true,
                ..Default::default()
            },
            "auto-delete",
        ),
    ] {
        let ch = t(conn.create_channel()).await.expect("channel");
        let r = t(ch.queue_declare(&name, opts, table(&[stream()]))).await;
        assert_eq!(
            closed_text(r, 406),
            format!("PRECONDITION_FAILED - invalid property '{property}' for queue '{name}' in vhost '/'")
        );
    }
    let ch = t(conn.create_channel()).await.expect("channel");
    assert_eq!(
        closed_text(declare_stream(&ch, "", &[]).await, 406),
        "PRECONDITION_FAILED - Cannot declare a server-named queue for type rabbit_stream_queue"
    );
    for arg in [
        "x-max-length",
        "x-message-ttl",
        "x-expires",
        "x-max-priority",
    ] {
        let ch = t(conn.create_channel()).await.expect("channel");
        let r = declare_stream(&ch, &name, &[(arg, int(10))]).await;
        assert_eq!(
            closed_text(r, 406),
            format!("PRECONDITION_FAILED - invalid arg '{arg}' for queue '{name}' in vhost '/' of queue type rabbit_stream_queue")
        );
    }
    let ch = t(conn.create_channel()).await.expect("channel");
    let r = declare_stream(&ch, &name, &[("x-max-age", s("10x"))]).await;
    assert!(closed_text(r, 406).ends_with("invalid_max_age"));
    let ch = t(conn.create_channel()).await.expect("channel");
    let r = declare_stream(&ch, &name, &[("x-max-age", int(10))]).await;
    assert!(closed_text(r, 406).ends_with("{unacceptable_type,signedint}"));
    let ch = t(conn.create_channel()).await.expect("channel");
    let good = [
        ("x-max-age", s("7D")),
        ("x-max-length-bytes", int(20_000_000)),
        ("x-stream-max-segment-size-bytes", int(1_000_000)),
        ("x-initial-cluster-size", int(1)),
    ];
    declare_stream(&ch, &name, &good).await.expect("declare");
    declare_stream(&ch, &name, &good).await.expect("redeclare");
    let r = declare_stream(&ch, &name, &[("x-max-age", s("8D"))]).await;
    assert!(closed_text(r, 406).contains("inequivalent arg 'x-max-length-bytes'"));
    let ch = t(conn.create_channel()).await.expect("channel");
    t(ch.queue_delete(&name, QueueDeleteOptions::default()))
        .await
        .expect("delete");
}

#[tokio::test]
async fn offsets_headers_and_independent_consumers() {
    let (conn, ch) = connect_channel().await;
    let q = uniq("s.offsets");
    declare_stream(&ch, &q, &[]).await.expect("declare");
    confirm_mode(&ch).await;
    // m4 after the others are confirmed: alone in the last chunk (`last` is
    // the last chunk, as in RabbitMQ).
    publish_all(&ch, &q, &bodies("m", 4)).await;
    publish_all(&ch, &q, &["m4".to_string()]).await;
    let want = |from: usize| -> Vec<(i64, String)> {
        (from..5).map(|i| (i as i64, format!("m{i}"))).collect()
    };
    // Each consumer on its own channel reads independently.
    let mut all = Vec::new();
    for (offset, from) in [
        (s("first"), 0),
        (s("last"), 4),
        (AMQPValue::LongLongInt(3), 3),
        (AMQPValue::LongLongInt(-1), 0),
        (s("10m"), 0),
        (AMQPValue::Timestamp(1_000_000_000), 0),
    ] {
        let c = t(conn.create_channel()).await.expect("channel");
        let mut consumer = consume_from(&c, &q, offset.clone(), 10).await;
        assert_eq!(
            take(&mut consumer, 5 - from).await,
            want(from),
            "{offset:?}"
        );
        assert_no_delivery(&mut consumer, Duration::from_millis(100)).await;
        all.push((c, consumer));
    }
    // `next` and a timestamp in the future see only what comes later, as do
    // the consumers above once caught up.
    let c = t(conn.create_channel()).await.expect("channel");
    let mut next = consume_from(&c, &q, s("next"), 10).await;
    let c2 = t(conn.create_channel()).await.expect("channel");
    let future = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_secs())
        + 3600;
    let mut later = consume_from(&c2, &q, AMQPValue::Timestamp(future), 10).await;
    assert_no_delivery(&mut next, Duration::from_millis(100)).await;
    publish_all(&ch, &q, &["m5".to_string()]).await;
    assert_eq!(take(&mut next, 1).await, vec![(5, "m5".to_string())]);
    for (_, consumer) in &mut all {
        assert_eq!(take(consumer, 1).await, vec![(5, "m5".to_string())]);
    }
    // Resolved at attach time, as osiris does: past the end means next.
    assert_eq!(take(&mut later, 1).await, vec![(5, "m5".to_string())]);
    // Messages are still all there: acks delete nothing.
    let c = t(conn.create_channel()).await.expect("channel");
    let mut again = consume_from(&c, &q, s("first"), 10).await;
    assert_eq!(take(&mut again, 6).await.len(), 6);
    // A stream ignores queue.delete's if-unused / if-empty (RabbitMQ 3.x
    // deletes it with its messages and consumers; the count is 0).
    let flags = QueueDeleteOptions {
        if_unused: true,
        if_empty: true,
        ..Default::default()
    };
    assert_eq!(t(ch.queue_delete(&q, flags)).await.expect("delete"), 0);
}

#[tokio::test]
async fn prefetch_credit_comes_back_with_acks() {
    let (_conn, ch) = connect_channel().await;
    let q = uniq("s.credit");
    declare_stream(&ch, &q, &[]).await.expect("declare");
    confirm_mode(&ch).await;
    publish_all(&ch, &q, &bodies("c", 10)).await;
    let mut c = consume_from(&ch, &q, s("first"), 3).await;
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(next_delivery(&mut c).await);
    }
    assert_no_delivery(&mut c, Duration::from_millis(150)).await;
    t(held[1].ack(BasicAckOptions::default()))
        .await
        .expect("ack");
    let d = next_delivery(&mut c).await;
    assert_eq!(offset_of(&d), 3);
    assert_no_delivery(&mut c, Duration::from_millis(150)).await;
    // A multiple ack returns all of its credit.
    t(d.ack(BasicAckOptions { multiple: true }))
        .await
        .expect("ack");
    let got: Vec<i64> = take(&mut c, 3).await.into_iter().map(|(o, _)| o).collect();
    assert_eq!(got, vec![4, 5, 6]);
    t(ch.queue_delete(&q, QueueDeleteOptions::default()))
        .await
        .expect("delete");
}

#[tokio::test]
async fn operations_streams_refuse() {
    let (conn, ch) = connect_channel().await;
    let q = uniq("s.refuse");
    declare_stream(&ch, &q, &[]).await.expect("declare");
    publish(&ch, "", &q, b"x").await;
    // No prefetch: a channel error.
    let c = t(conn.create_channel()).await.expect("channel");
    let r = t(c.basic_consume(
        &q,
        "c",
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await;
    assert_eq!(
        closed_text(r, 406),
        format!("PRECONDITION_FAILED - consumer prefetch count is not set for 'queue '{q}' in vhost '/''")
    );
    // basic.get, purge, no-ack consumers and nack: connection errors (540).
    let texts = [
        format!("NOT_IMPLEMENTED - basic.get not supported by stream queues queue '{q}' in vhost '/'"),
        format!("NOT_IMPLEMENTED - queue.purge not supported by stream queues queue '{q}' in vhost '/'"),
        format!("NOT_IMPLEMENTED - automatic acknowledgement not supported by stream queues queue '{q}' in vhost '/'"),
        format!("NOT_IMPLEMENTED - basic.nack and basic.reject not supported by stream queues queue '{q}' in vhost '/'"),
    ];
    for (i, text) in texts.iter().enumerate() {
        let (conn, ch) = connect_channel().await;
        let errors = watch_connection(&conn);
        match i {
            0 => {
                let _ = t(ch.basic_get(&q, BasicGetOptions::default())).await;
            }
            1 => {
                let _ = t(ch.queue_purge(&q, QueuePurgeOptions::default())).await;
            }
            2 => {
                t(ch.basic_qos(5, BasicQosOptions::default()))
                    .await
                    .expect("qos");
                let _ = t(ch.basic_consume(
                    &q,
                    "c",
                    BasicConsumeOptions {
                        no_ack: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                ))
                .await;
            }
            _ => {
                let mut c = consume_from(&ch, &q, s("first"), 5).await;
                let d = next_delivery(&mut c).await;
                let _ = t(d.nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                }))
                .await;
            }
        }
        let e = t(errors).await.expect("connection error");
        assert_eq!(closed_text::<()>(Err(e), 540), *text);
    }
    let ch = t(conn.create_channel()).await.expect("channel");
    t(ch.queue_delete(&q, QueueDeleteOptions::default()))
        .await
        .expect("delete");
}

#[tokio::test]
async fn routed_publishes_and_confirms_reach_the_stream() {
    let (_conn, ch) = connect_channel().await;
    let q = uniq("s.routed");
    declare_stream(&ch, &q, &[]).await.expect("declare");
    let ex = uniq("s.fanout");
    t(ch.exchange_declare(
        &ex,
        lapin::ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .expect("exchange");
    t(ch.queue_bind(
        &q,
        &ex,
        "",
        QueueBindOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("bind");
    confirm_mode(&ch).await;
    let props = BasicProperties::default()
        .with_content_type("text/plain".into())
        .with_headers(table(&[("h", int(7))]));
    let conf = publish_with(
        &ch,
        &ex,
        "rk",
        BasicPublishOptions::default(),
        props,
        b"hello",
    )
    .await
    .expect("confirm");
    assert!(conf.is_ack());
    let mut c = consume_from(&ch, &q, s("first"), 1).await;
    let d = next_delivery(&mut c).await;
    assert_eq!(body(&d), "hello");
    assert_eq!(
        d.properties.content_type().as_ref().map(|s| s.as_str()),
        Some("text/plain")
    );
    let h = d.properties.headers().as_ref().expect("headers");
    assert_eq!(h.inner().get("h"), Some(&int(7)));
    assert_eq!(offset_of(&d), 0);
    // Delivered with the exchange and routing key it was published with (as
    // RabbitMQ: kept in the entry's x-exchange / x-routing-key annotations).
    assert_eq!(d.exchange.as_str(), ex);
    assert_eq!(d.routing_key.as_str(), "rk");
    assert!(h.inner().get("x-exchange").is_none(), "{h:?}");
    // The declare-ok counts what the stream keeps.
    let ok = t(ch.queue_declare(
        &q,
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .expect("passive");
    assert_eq!(ok.message_count(), 1);
    t(ch.queue_delete(&q, QueueDeleteOptions::default()))
        .await
        .expect("delete");
}

#[tokio::test]
async fn retention_drops_the_oldest_segment() {
    let (conn, ch) = connect_channel().await;
    let q = uniq("s.retention");
    declare_stream(
        &ch,
        &q,
        &[
            ("x-stream-max-segment-size-bytes", int(2_000)),
            ("x-max-length-bytes", int(5_000)),
        ],
    )
    .await
    .expect("declare");
    confirm_mode(&ch).await;
    let big = "x".repeat(500);
    for i in 0..40 {
        publish_all(&ch, &q, &[format!("{i}-{big}")]).await;
    }
    // The broker's ticker applies retention: wait until the first kept offset moved.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let c = t(conn.create_channel()).await.expect("channel");
        let mut consumer = consume_from(&c, &q, s("first"), 1).await;
        let first = offset_of(&next_delivery(&mut consumer).await);
        let _ = c.close(200, "done").await;
        if first > 0 {
            assert!(first < 40, "the active segment stays");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no segment dropped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    t(ch.queue_delete(&q, QueueDeleteOptions::default()))
        .await
        .expect("delete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_messages_survive_kill_9() {
    let dir = data_dir("streams-kill9");
    let b = BrokerProcess::start(&dir).await;
    let conn = b.connect().await;
    let ch = t(conn.create_channel()).await.expect("channel");
    declare_stream(
        &ch,
        "ks",
        &[("x-stream-max-segment-size-bytes", int(4_000))],
    )
    .await
    .expect("declare");
    confirm_mode(&ch).await;
    publish_all(&ch, "ks", &bodies("k", 200)).await;
    b.kill9();
    let b = BrokerProcess::start(&dir).await;
    let conn = b.connect().await;
    let ch = t(conn.create_channel()).await.expect("channel");
    declare_stream(
        &ch,
        "ks",
        &[("x-stream-max-segment-size-bytes", int(4_000))],
    )
    .await
    .expect("redeclare after restart");
    let mut c = consume_from(&ch, "ks", s("first"), 50).await;
    let got = take(&mut c, 200).await;
    let want: Vec<(i64, String)> = (0..200).map(|i| (i, format!("k{i}"))).collect();
    assert_eq!(got, want);
    // And it goes on from there.
    confirm_mode(&ch).await;
    publish_all(&ch, "ks", &["after".to_string()]).await;
    assert_eq!(take(&mut c, 1).await, vec![(200, "after".to_string())]);
    b.stop();
}

const GUEST: Option<(&str, &str)> = Some(("guest", "guest"));

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_shows_streams_and_a_policy_sets_retention() {
    let dir = std::env::temp_dir().join(uniq("warren-streams-admin"));
    let mut config = warren::Config::for_tests(dir.clone());
    config.admin_enabled = true;
    let w = warren::start(config).await.expect("broker starts");
    let base = format!("http://{}", w.admin_addr().expect("admin"));
    let uri = format!("amqp://guest:guest@{}/%2f", w.amqp_addr());
    let conn = connect_with(&uri).await.expect("connect");
    let ch = t(conn.create_channel()).await.expect("channel");
    declare_stream(
        &ch,
        "events",
        &[("x-stream-max-segment-size-bytes", int(2_000))],
    )
    .await
    .expect("declare");
    confirm_mode(&ch).await;
    let big = "e".repeat(500);
    for i in 0..20 {
        publish_all(&ch, "events", &[format!("{i}-{big}")]).await;
    }
    let url = format!("{base}/api/queues/%2f/events");
    let (status, v) = common::http("GET", &url, GUEST, None).await;
    assert_eq!(status, 200);
    assert_eq!(v["type"], "stream");
    assert_eq!(v["messages"], 20);
    assert_eq!(v["first_offset"], 0);
    assert_eq!(v["committed_offset"], 20);
    assert!(v["segments"].as_u64().expect("segments") > 2, "{v}");
    assert!(v["message_bytes"].as_u64().expect("bytes") > 10_000, "{v}");
    assert_eq!(
        v["incoming"],
        serde_json::json!([]),
        "basic rates mode: {v}"
    );
    let node = v["node"].as_str().expect("node").to_string();
    assert_eq!(v["readers"], serde_json::json!({ node.clone(): 0 }), "{v}");
    // A reader: an AMQP consumer of the stream.
    let reader = t(conn.create_channel()).await.expect("channel");
    t(reader.basic_qos(10, BasicQosOptions::default()))
        .await
        .expect("qos");
    let _consumer = t(reader.basic_consume(
        "events",
        "reader",
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("consume");
    let (_, v) = common::http("GET", &url, GUEST, None).await;
    assert_eq!(v["readers"], serde_json::json!({ node: 1 }), "{v}");
    t(reader.close(200, "done")).await.expect("close");
    // A policy for streams: max-length-bytes drops old segments.
    let (status, v) = common::http(
        "PUT",
        &format!("{base}/api/policies/%2f/stream-retention"),
        GUEST,
        Some(serde_json::json!({"pattern": "^events$", "definition": {"max-length-bytes": 3000}, "apply-to": "streams"})),
    )
    .await;
    assert!((200..300).contains(&status), "{status} {v}");
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let (_, v) = common::http("GET", &url, GUEST, None).await;
        if v["first_offset"].as_u64().expect("first") > 0 {
            assert_eq!(v["policy"], "stream-retention");
            assert!(v["messages"].as_u64().expect("messages") < 20);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "retention did not apply: {v}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Purge is refused through the API too; delete removes the files.
    let (status, _) = common::http("DELETE", &format!("{url}/contents"), GUEST, None).await;
    assert_eq!(status, 400);
    let (status, _) = common::http("DELETE", &url, GUEST, None).await;
    assert!((200..300).contains(&status));
    let streams = dir.join("streams");
    let left: Vec<_> = std::fs::read_dir(&streams).expect("streams dir").collect();
    assert!(left.is_empty(), "files left after delete: {left:?}");
    drop(w);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn filtering_by_x_stream_filter() {
    let (conn, ch) = connect_channel().await;
    let q = uniq("s.filter");
    declare_stream(&ch, &q, &[]).await.expect("declare");
    confirm_mode(&ch).await;
    for (body, value) in [
        ("e1", Some("emea")),
        ("a1", Some("amer")),
        ("n1", None),
        ("e2", Some("emea")),
    ] {
        let mut props = BasicProperties::default();
        if let Some(v) = value {
            props = props.with_headers(table(&[("x-stream-filter-value", s(v))]));
        }
        let conf = publish_with(
            &ch,
            "",
            &q,
            BasicPublishOptions::default(),
            props,
            body.as_bytes(),
        )
        .await
        .expect("confirm");
        assert!(conf.is_ack());
    }
    let read = |filter: AMQPValue, unfiltered: bool, n: usize| {
        let conn = &conn;
        let q = q.clone();
        async move {
            let c = t(conn.create_channel()).await.expect("channel");
            t(c.basic_qos(10, BasicQosOptions::default()))
                .await
                .expect("qos");
            let mut consumer = t(c.basic_consume(
                &q,
                "f",
                BasicConsumeOptions::default(),
                table(&[
                    ("x-stream-offset", s("first")),
                    ("x-stream-filter", filter),
                    ("x-stream-match-unfiltered", AMQPValue::Boolean(unfiltered)),
                ]),
            ))
            .await
            .expect("consume");
            let got: Vec<String> = take(&mut consumer, n)
                .await
                .into_iter()
                .map(|(_, b)| b)
                .collect();
            assert_no_delivery(&mut consumer, Duration::from_millis(100)).await;
            got
        }
    };
    assert_eq!(read(s("emea"), false, 2).await, ["e1", "e2"]);
    assert_eq!(read(s("amer"), true, 2).await, ["a1", "n1"]);
    let both = AMQPValue::FieldArray(FieldArray::from(vec![s("amer"), s("emea")]));
    assert_eq!(read(both, false, 3).await, ["e1", "a1", "e2"]);
    t(ch.queue_delete(&q, QueueDeleteOptions::default()))
        .await
        .expect("delete");
}
