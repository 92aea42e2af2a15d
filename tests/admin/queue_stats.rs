//! RabbitMQ's classic-queue figures on queue objects (persistent counts, the
//! head message's timestamp, idle_since, consumer utilisation, memory, the
//! length rates), the length rates on the overview and vhosts, and login
//! attempts per source.

use crate::helpers::*;
use std::time::{Duration, Instant};

/// GET `path` until `done` holds (or a 10 s deadline passes); the last body.
async fn poll(b: &Broker, path: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = b.get(path).await;
        if done(&v) || Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A guest connection to `/` and a channel on it in confirm mode.
async fn confirmed_channel(b: &Broker) -> (lapin::Connection, lapin::Channel) {
    let conn = b.amqp("guest", "guest", "/").await.expect("connect");
    let ch = t(conn.create_channel()).await.expect("channel");
    t(ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirms");
    (conn, ch)
}

fn props(mode: u8, timestamp: Option<u64>) -> BasicProperties {
    let p = BasicProperties::default().with_delivery_mode(mode);
    match timestamp {
        Some(ts) => p.with_timestamp(ts),
        None => p,
    }
}

async fn publish(ch: &lapin::Channel, queue: &str, body: &[u8], p: BasicProperties) {
    t(
        t(ch.basic_publish("", queue, BasicPublishOptions::default(), body, p))
            .await
            .expect("publish"),
    )
    .await
    .expect("confirm");
}

#[tokio::test]
async fn persistent_counts_and_head_timestamp_follow_the_messages() {
    let b = start().await;
    let (_conn, ch) = confirmed_channel(&b).await;
    for (name, durable) in [("pq", true), ("tq", false)] {
        t(ch.queue_declare(
            name,
            QueueDeclareOptions {
                durable,
                ..Default::default()
            },
            FieldTable::default(),
        ))
        .await
        .expect("declare");
    }
    let empty = b.get("/api/queues/%2F/pq").await;
    assert_eq!(empty["messages_persistent"], 0);
    assert_eq!(empty["head_message_timestamp"], Value::Null);
    assert_eq!(empty["consumer_utilisation"], 0, "no consumers");
    assert_eq!(empty["consumer_capacity"], 0);
    for q in ["pq", "tq"] {
        publish(&ch, q, b"hello", props(2, Some(1_700_000_000))).await;
        publish(&ch, q, b"worldwide", props(2, Some(1_700_000_100))).await;
        publish(&ch, q, b"tr", props(1, Some(5))).await;
    }
    let q = b.get("/api/queues/%2F/pq").await;
    assert_eq!(q["messages"], 3);
    // RabbitMQ's `basic` rates mode keeps no per channel figures.
    assert_eq!((&q["incoming"], &q["deliveries"]), (&json!([]), &json!([])));
    assert_eq!(q["messages_persistent"], 2, "{q}");
    assert_eq!(q["message_bytes_persistent"], 14);
    assert_eq!(q["head_message_timestamp"], 1_700_000_000);
    for f in [
        "messages_details",
        "messages_ready_details",
        "messages_unacknowledged_details",
    ] {
        assert!(q[f]["rate"].is_f64(), "{f}: {q}");
    }
    let memory = q["memory"].as_u64().expect("memory");
    assert!(memory > 16, "{memory}");
    // Persistent messages on a transient queue are not persistent (RabbitMQ).
    let tq = b.get("/api/queues/%2F/tq").await;
    assert_eq!(tq["messages"], 3);
    assert_eq!(tq["messages_persistent"], 0);
    assert_eq!(tq["message_bytes_persistent"], 0);
    // Handed out and unacked: still counted, still the head's timestamp.
    let got = t(ch.basic_get("pq", BasicGetOptions::default()))
        .await
        .expect("get")
        .expect("a message");
    let q = b.get("/api/queues/%2F/pq").await;
    assert_eq!(q["messages_unacknowledged"], 1);
    assert_eq!(q["messages_persistent"], 2);
    assert_eq!(q["head_message_timestamp"], 1_700_000_000);
    t(got.ack(BasicAckOptions::default())).await.expect("ack");
    let q = poll(&b, "/api/queues/%2F/pq", |q| q["messages"] == 2).await;
    assert_eq!(q["messages_persistent"], 1);
    assert_eq!(q["message_bytes_persistent"], 9);
    assert_eq!(q["head_message_timestamp"], 1_700_000_100);
    assert!(q["memory"].as_u64().expect("memory") < memory);
    // Purged: nothing persistent left, no head.
    assert_eq!(
        b.ok("DELETE", "/api/queues/%2F/pq/contents", Value::Null)
            .await,
        204
    );
    let q = b.get("/api/queues/%2F/pq").await;
    assert_eq!(q["messages_persistent"], 0);
    assert_eq!(q["message_bytes_persistent"], 0);
    assert_eq!(q["head_message_timestamp"], Value::Null);
}

#[tokio::test]
async fn idle_since_appears_a_second_after_the_last_activity() {
    let b = start().await;
    let (_conn, ch) = confirmed_channel(&b).await;
    t(ch.queue_declare("iq", QueueDeclareOptions::default(), FieldTable::default()))
        .await
        .expect("declare");
    let before = warren::clock::now_ms();
    publish(&ch, "iq", b"x", props(1, None)).await;
    let after = warren::clock::now_ms();
    let q = b.get("/api/queues/%2F/iq").await;
    if warren::clock::now_ms() < before + 1000 {
        assert!(q.get("idle_since").is_none(), "active: {q}");
    }
    let q = poll(&b, "/api/queues/%2F/iq", |q| q.get("idle_since").is_some()).await;
    let idle = q["idle_since"].as_str().expect("idle_since");
    // RabbitMQ 3.10's format, a second after the publish.
    assert_eq!(idle.len(), "2026-12-03T21:12:20.973+00:00".len(), "{idle}");
    assert!(
        idle.ends_with("+00:00") && idle.as_bytes()[10] == b'T',
        "{idle}"
    );
    assert!(idle >= warren::clock::utc_rfc3339(before + 1000).as_str());
    assert!(idle <= warren::clock::utc_rfc3339(after + 1000).as_str());
}

#[tokio::test]
async fn consumer_utilisation_of_a_queue_with_a_free_consumer_is_one() {
    let b = start().await;
    let conn = b.amqp("guest", "guest", "/").await.expect("connect");
    let ch = t(conn.create_channel()).await.expect("channel");
    t(ch.queue_declare("uq", QueueDeclareOptions::default(), FieldTable::default()))
        .await
        .expect("declare");
    let _consumer = t(ch.basic_consume(
        "uq",
        "c1",
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("consume");
    let q = poll(&b, "/api/queues/%2F/uq", |q| q["consumers"] == 1).await;
    assert_eq!(q["consumer_utilisation"], 1.0, "{q}");
    assert_eq!(q["consumer_capacity"], 1.0);
}

#[tokio::test]
async fn overview_and_vhosts_carry_the_length_rates() {
    let b = start().await;
    let o = b.get("/api/overview").await;
    let vhosts = b.get("/api/vhosts/%2F").await;
    for f in [
        "messages_details",
        "messages_ready_details",
        "messages_unacknowledged_details",
    ] {
        assert!(o["queue_totals"][f]["rate"].is_f64(), "{f}: {o}");
        assert!(vhosts[f]["rate"].is_f64(), "{f}: {vhosts}");
    }
    assert_eq!(vhosts["messages"], 0);
}

#[tokio::test]
async fn auth_attempts_are_counted_per_source() {
    let b = start().await;
    let node = b.get("/api/overview").await["node"]
        .as_str()
        .expect("node")
        .to_string();
    let path = format!("/api/auth/attempts/{node}/source");
    let _ok = b.amqp("guest", "guest", "/").await.expect("connect");
    assert!(b.amqp("guest", "wrong", "/").await.is_err());
    assert!(b.amqp("nobody", "x", "/").await.is_err());
    let (status, _) = b
        .call("GET", "/api/overview", Some(("guest", "bad")), None)
        .await;
    assert_eq!(status, 401);
    let rows = b.get(&path).await;
    let row = |user: &str, protocol: &str| -> Value {
        rows.as_array()
            .expect("a list")
            .iter()
            .find(|r| r["username"] == user && r["protocol"] == protocol)
            .cloned()
            .unwrap_or(Value::Null)
    };
    let amqp = row("guest", "amqp091");
    assert_eq!(amqp["remote_address"], "127.0.0.1", "{rows}");
    assert_eq!(amqp["auth_attempts"], 2);
    assert_eq!(amqp["auth_attempts_succeeded"], 1);
    assert_eq!(amqp["auth_attempts_failed"], 1);
    let nobody = row("nobody", "amqp091");
    assert_eq!(nobody["auth_attempts_failed"], 1, "{rows}");
    assert_eq!(nobody["auth_attempts_succeeded"], 0);
    let http = row("guest", "http");
    assert!(http["auth_attempts_failed"].as_u64() >= Some(1), "{rows}");
    assert!(
        http["auth_attempts_succeeded"].as_u64() >= Some(1),
        "{rows}"
    );
    // Another node's: not kept here.
    let (status, _) = b
        .call("GET", "/api/auth/attempts/other@host/source", GUEST, None)
        .await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_counts_survive_a_restart() {
    use crate::restart::{spawn_process, stop_process};
    let dir = std::env::temp_dir().join(format!(
        "warren-admin-persistent-{}-{}",
        std::process::id(),
        common::uniq("d")
    ));
    let (child, amqp, base) = spawn_process(&dir).await;
    let b = Broker {
        _warren: None,
        amqp: ([127, 0, 0, 1], amqp).into(),
        base,
    };
    {
        let (conn, ch) = confirmed_channel(&b).await;
        t(ch.queue_declare(
            "rq",
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        ))
        .await
        .expect("declare");
        publish(&ch, "rq", b"one", props(2, None)).await;
        publish(&ch, "rq", b"three", props(2, None)).await;
        publish(&ch, "rq", b"transient", props(1, None)).await;
        let q = b.get("/api/queues/%2F/rq").await;
        assert_eq!(q["messages_persistent"], 2, "{q}");
        let _ = t(conn.close(200, "bye")).await;
    }
    stop_process(child);
    let (child, amqp, base) = spawn_process(&dir).await;
    let b = Broker {
        _warren: None,
        amqp: ([127, 0, 0, 1], amqp).into(),
        base,
    };
    // Only the persistent ones come back, counted before any is loaded.
    let q = b.get("/api/queues/%2F/rq").await;
    assert_eq!(q["messages"], 2, "{q}");
    assert_eq!(q["messages_persistent"], 2);
    assert_eq!(q["message_bytes_persistent"], 8);
    // Loaded and taken: the count follows.
    let conn = b.amqp("guest", "guest", "/").await.expect("connect");
    let ch = t(conn.create_channel()).await.expect("channel");
    let got = t(ch.basic_get("rq", BasicGetOptions { no_ack: true }))
        .await
        .expect("get")
        .expect("a message");
    assert_eq!(got.delivery.data, b"one");
    let q = b.get("/api/queues/%2F/rq").await;
    assert_eq!(q["messages_persistent"], 1, "{q}");
    assert_eq!(q["message_bytes_persistent"], 5);
    stop_process(child);
    let _ = std::fs::remove_dir_all(&dir);
}
