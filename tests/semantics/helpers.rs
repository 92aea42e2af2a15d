//! Helpers shared by the semantics suite: argument tables, exclusive queues,
//! publishing with properties, get / consume / ack wrappers and `x-death` checks.

pub(crate) use crate::common::*;
pub(crate) use lapin::message::Delivery;
pub(crate) use lapin::options::*;
pub(crate) use lapin::types::{AMQPValue, FieldArray, FieldTable};
pub(crate) use lapin::{BasicProperties, Channel, Consumer};
pub(crate) use std::collections::BTreeMap;
pub(crate) use std::time::{Duration, Instant};

pub(crate) fn int(i: i32) -> AMQPValue {
    AMQPValue::LongInt(i)
}

pub(crate) fn s(v: &str) -> AMQPValue {
    AMQPValue::LongString(v.into())
}

pub(crate) fn table(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}

/// Declares an exclusive queue (gone with the connection) with `args`.
pub(crate) async fn xqueue(ch: &Channel, prefix: &str, args: &[(&str, AMQPValue)]) -> String {
    let name = uniq(prefix);
    t(ch.queue_declare(
        &name,
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        table(args),
    ))
    .await
    .expect("queue.declare");
    name
}

pub(crate) async fn pub_props(
    ch: &Channel,
    exchange: &str,
    key: &str,
    body: &str,
    p: BasicProperties,
) {
    t(ch.basic_publish(
        exchange,
        key,
        BasicPublishOptions::default(),
        body.as_bytes(),
        p,
    ))
    .await
    .expect("basic.publish");
}

pub(crate) async fn pub_exp(ch: &Channel, key: &str, body: &str, expiration: &str) {
    let p = BasicProperties::default().with_expiration(expiration.into());
    pub_props(ch, "", key, body, p).await;
}

pub(crate) async fn pub_prio(ch: &Channel, key: &str, body: &str, priority: Option<u8>) {
    let mut p = BasicProperties::default();
    if let Some(pr) = priority {
        p = p.with_priority(pr);
    }
    pub_props(ch, "", key, body, p).await;
}

pub(crate) fn body(d: &Delivery) -> String {
    String::from_utf8_lossy(&d.data).into_owned()
}

pub(crate) async fn get(ch: &Channel, q: &str) -> Option<Delivery> {
    t(ch.basic_get(q, BasicGetOptions { no_ack: true }))
        .await
        .expect("basic.get")
        .map(|m| m.delivery)
}

/// basic.get with ack mode (the caller settles).
pub(crate) async fn get_acked(ch: &Channel, q: &str) -> Option<Delivery> {
    t(ch.basic_get(q, BasicGetOptions { no_ack: false }))
        .await
        .expect("basic.get")
        .map(|m| m.delivery)
}

/// Polls basic.get (no-ack) until a message arrives.
pub(crate) async fn wait_get(ch: &Channel, q: &str) -> Delivery {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(d) = get(ch, q).await {
            return d;
        }
        assert!(Instant::now() < deadline, "nothing arrived in {q}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub(crate) async fn consume(ch: &Channel, q: &str, no_ack: bool, args: FieldTable) -> Consumer {
    t(ch.basic_consume(
        q,
        "",
        BasicConsumeOptions {
            no_ack,
            ..Default::default()
        },
        args,
    ))
    .await
    .expect("basic.consume")
}

pub(crate) async fn reject(d: &Delivery) {
    t(d.acker.reject(BasicRejectOptions { requeue: false }))
        .await
        .expect("basic.reject");
}

pub(crate) async fn ack(d: &Delivery) {
    t(d.acker.ack(BasicAckOptions::default()))
        .await
        .expect("basic.ack");
}

pub(crate) fn headers(d: &Delivery) -> BTreeMap<String, AMQPValue> {
    d.properties
        .headers()
        .as_ref()
        .map(|h| {
            h.inner()
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), v.clone()))
                .collect()
        })
        .unwrap_or_default()
}

pub(crate) fn text(v: Option<&AMQPValue>) -> Option<String> {
    match v {
        Some(AMQPValue::LongString(l)) => Some(String::from_utf8_lossy(l.as_bytes()).into_owned()),
        _ => None,
    }
}

/// The `x-death` array of a delivery, each entry as a map.
pub(crate) fn x_death(d: &Delivery) -> Vec<BTreeMap<String, AMQPValue>> {
    match headers(d).get("x-death") {
        Some(AMQPValue::FieldArray(a)) => a
            .as_slice()
            .iter()
            .map(|e| match e {
                AMQPValue::FieldTable(t) => t
                    .inner()
                    .iter()
                    .map(|(k, v)| (k.as_str().to_string(), v.clone()))
                    .collect(),
                other => panic!("x-death entry is not a table: {other:?}"),
            })
            .collect(),
        other => panic!("no x-death array: {other:?}"),
    }
}

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// Asserts one `x-death` entry exactly: its keys, their AMQP types and values.
#[track_caller]
pub(crate) fn assert_death(
    e: &BTreeMap<String, AMQPValue>,
    count: i64,
    reason: &str,
    queue: &str,
    exchange: &str,
    routing_keys: &[&str],
    original_expiration: Option<&str>,
) {
    let mut keys = vec![
        "count",
        "exchange",
        "queue",
        "reason",
        "routing-keys",
        "time",
    ];
    if original_expiration.is_some() {
        keys.push("original-expiration");
        keys.sort();
    }
    assert_eq!(
        e.keys().map(String::as_str).collect::<Vec<_>>(),
        keys,
        "{e:?}"
    );
    // RabbitMQ sends count as a signed 64-bit long ('l') and time as a timestamp ('T').
    assert_eq!(
        e.get("count"),
        Some(&AMQPValue::LongLongInt(count)),
        "{e:?}"
    );
    assert_eq!(text(e.get("reason")).as_deref(), Some(reason));
    assert_eq!(text(e.get("queue")).as_deref(), Some(queue));
    assert_eq!(text(e.get("exchange")).as_deref(), Some(exchange));
    let rks: Vec<AMQPValue> = routing_keys.iter().map(|k| s(k)).collect();
    assert_eq!(
        e.get("routing-keys"),
        Some(&AMQPValue::FieldArray(FieldArray::from(rks)))
    );
    match e.get("time") {
        Some(AMQPValue::Timestamp(ts)) => {
            let now = now_secs();
            assert!(*ts <= now && *ts + 30 >= now, "time {ts} vs now {now}");
        }
        other => panic!("time is not a timestamp: {other:?}"),
    }
    assert_eq!(
        text(e.get("original-expiration")).as_deref(),
        original_expiration
    );
}

#[track_caller]
pub(crate) fn assert_first_last(d: &Delivery, first: (&str, &str, &str), last: (&str, &str, &str)) {
    let h = headers(d);
    let get = |k: &str| text(h.get(k));
    assert_eq!(
        (
            get("x-first-death-queue"),
            get("x-first-death-reason"),
            get("x-first-death-exchange")
        ),
        (
            Some(first.0.to_string()),
            Some(first.1.to_string()),
            Some(first.2.to_string())
        ),
        "{h:?}"
    );
    let got_last = (
        get("x-last-death-queue"),
        get("x-last-death-reason"),
        get("x-last-death-exchange"),
    );
    if against_reference_rabbitmq() {
        // RabbitMQ surprise: 3.10 has no x-last-death-* headers at all (3.13 added
        // them); warren sets them as 3.13+ does.
        assert_eq!(got_last, (None, None, None), "{h:?}");
    } else {
        assert_eq!(
            got_last,
            (
                Some(last.0.to_string()),
                Some(last.1.to_string()),
                Some(last.2.to_string())
            ),
            "{h:?}"
        );
    }
}

/// The 406 (channel closed) text of a failed declare, asserting the code.
#[track_caller]
pub(crate) fn err_406<T: std::fmt::Debug>(r: lapin::Result<T>) -> String {
    match r {
        Err(e) => {
            assert_eq!(code(&e), Some(406), "{e:?}");
            format!("{e:?}")
        }
        Ok(v) => panic!("expected 406, got {v:?}"),
    }
}

/// The broker under test is the reference RabbitMQ (port 5673, or
/// `WARREN_TEST_RABBITMQ=1` for another RabbitMQ node).
pub(crate) fn against_reference_rabbitmq() -> bool {
    std::env::var("WARREN_TEST_URI").is_ok_and(|u| u.contains(":5673"))
        || std::env::var("WARREN_TEST_RABBITMQ").is_ok_and(|v| v == "1")
}

pub(crate) async fn wait_get_acked(ch: &Channel, q: &str) -> Delivery {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if let Some(d) = get_acked(ch, q).await {
            return d;
        }
        assert!(Instant::now() < deadline, "nothing arrived in {q}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
