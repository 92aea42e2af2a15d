//! Time-driven queue semantics on virtual time: TTL (queue and per-message, 0
//! included), `x-expires`, the delayed-message exchange and dead-lettering on
//! expiry, driven through the broker core with chosen `now` values (no sockets, no
//! sleeps) and checked at exact moments: nothing happens at `t + ttl - 1`, it
//! happens at `t + ttl`.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use bytes::Bytes;
use parking_lot::Mutex;
use warren::broker::exchange::Destination;
use warren::broker::message::Message;
use warren::broker::queue::{Consumer, Credit, Delivery, DeliverySink, Queue};
use warren::broker::vhost::{ExchangeDeclare, PublishFrom, QueueDeclare};
use warren::broker::{Broker, VHost};
use warren::wire::{BasicProperties, FieldTable, FieldValue};

/// An arbitrary start of virtual time (ms since the epoch).
const T0: u64 = 1_700_000_000_000;
const CONN: u64 = 1;

fn vhost() -> Arc<VHost> {
    Broker::new(&warren::Config::default())
        .vhost("/")
        .expect("default vhost")
}

fn args(pairs: &[(&str, FieldValue)]) -> FieldTable {
    let mut t = FieldTable::new();
    for (k, v) in pairs {
        t.insert(*k, v.clone());
    }
    t
}

fn int(n: i64) -> FieldValue {
    FieldValue::I64(n)
}

fn s(v: &str) -> FieldValue {
    FieldValue::string(v)
}

fn declare(v: &VHost, name: &str, arguments: &[(&str, FieldValue)], now: u64) -> Arc<Queue> {
    v.declare_queue(
        &QueueDeclare {
            name: name.into(),
            arguments: args(arguments),
            ..Default::default()
        },
        CONN,
        now,
    )
    .expect("declare")
    .0
}

fn exists(v: &VHost, name: &str) -> bool {
    v.queue(name, CONN).is_ok()
}

/// Publish through routing, as a channel does, at `now`.
fn publish(v: &VHost, exchange: &str, key: &str, props: BasicProperties, body: &str, now: u64) {
    let m = Message::new(exchange, key, props, Bytes::from(body.to_string()));
    v.publish(exchange, &m, PublishFrom::Client, now)
        .expect("publish");
}

fn plain(v: &VHost, q: &str, body: &str, now: u64) {
    publish(v, "", q, BasicProperties::default(), body, now);
}

fn expiring(v: &VHost, q: &str, body: &str, expiration: &str, now: u64) {
    let props = BasicProperties {
        expiration: Some(expiration.into()),
        ..Default::default()
    };
    publish(v, "", q, props, body, now);
}

fn ready(q: &Queue, now: u64) -> usize {
    q.stats(now).ready
}

fn get(q: &Queue, now: u64) -> Option<String> {
    q.get(true, now)
        .map(|(e, _)| String::from_utf8_lossy(&e.message.body).into_owned())
}

fn drain(q: &Queue, now: u64) -> Vec<String> {
    std::iter::from_fn(|| get(q, now)).collect()
}

fn headers(m: &Message) -> FieldTable {
    m.properties.headers.clone().unwrap_or_default()
}

fn x_death(m: &Message) -> Vec<FieldTable> {
    match headers(m).get("x-death") {
        Some(FieldValue::Array(a)) => a
            .iter()
            .map(|d| match d {
                FieldValue::Table(t) => t.clone(),
                other => panic!("x-death entry is not a table: {other:?}"),
            })
            .collect(),
        other => panic!("no x-death: {other:?}"),
    }
}

fn text<'a>(t: &'a FieldTable, k: &str) -> Option<&'a str> {
    t.get(k).and_then(|v| v.as_str())
}

/// Collects deliveries; stands in for a connection.
#[derive(Debug, Default)]
struct Sink(Mutex<Vec<Delivery>>);

impl DeliverySink for Sink {
    fn deliver(&self, delivery: Delivery) -> Result<(), Delivery> {
        self.0.lock().push(delivery);
        Ok(())
    }
    fn cancelled(&self, _channel: u16, _consumer_tag: Arc<str>) {}
}

impl Sink {
    fn bodies(&self) -> Vec<String> {
        self.0
            .lock()
            .iter()
            .map(|d| String::from_utf8_lossy(&d.entry.message.body).into_owned())
            .collect()
    }
}

fn consumer(tag: &str, sink: &Arc<Sink>, no_ack: bool) -> Arc<Consumer> {
    Arc::new(Consumer {
        tag: tag.into(),
        connection: CONN,
        channel: 1,
        no_ack,
        exclusive: false,
        priority: 0,
        arguments: FieldTable::new(),
        credit: Credit::new(0),
        channel_credit: Credit::new(0),
        flow: Arc::new(AtomicBool::new(true)),
        sink: Arc::clone(sink) as Arc<dyn DeliverySink>,
    })
}

// ---------------------------------------------------------------- TTL

#[test]
fn queue_ttl_expires_exactly_at_ttl() {
    let v = vhost();
    let q = declare(&v, "ttl.q", &[("x-message-ttl", int(80))], T0);
    plain(&v, "ttl.q", "a", T0);
    assert_eq!(ready(&q, T0 + 79), 1);
    assert_eq!(ready(&q, T0 + 80), 0);
    assert_eq!(get(&q, T0 + 80), None);
}

#[test]
fn get_returns_a_message_until_its_last_millisecond() {
    let v = vhost();
    let q = declare(&v, "ttl.get", &[("x-message-ttl", int(80))], T0);
    plain(&v, "ttl.get", "a", T0);
    plain(&v, "ttl.get", "b", T0 + 10);
    assert_eq!(get(&q, T0 + 79).as_deref(), Some("a"));
    // "b" was published 10 ms later: it lives until T0 + 90.
    assert_eq!(get(&q, T0 + 90), None);
}

#[test]
fn the_lower_of_queue_and_message_ttl_wins() {
    let v = vhost();
    // Queue TTL 80 ms, message asks for 10 s: the queue's wins.
    let q1 = declare(&v, "ttl.queue", &[("x-message-ttl", int(80))], T0);
    expiring(&v, "ttl.queue", "a", "10000", T0);
    // Queue TTL 10 s, message asks for 80 ms: the message's wins.
    let q2 = declare(&v, "ttl.msg", &[("x-message-ttl", int(10_000))], T0);
    expiring(&v, "ttl.msg", "b", "80", T0);
    // Queue TTL 10 s, no per-message TTL: stays until then.
    let q3 = declare(&v, "ttl.keep", &[("x-message-ttl", int(10_000))], T0);
    plain(&v, "ttl.keep", "c", T0);
    for q in [&q1, &q2] {
        assert_eq!(ready(q, T0 + 79), 1, "{}", q.name());
        assert_eq!(ready(q, T0 + 80), 0, "{}", q.name());
    }
    assert_eq!(ready(&q3, T0 + 9_999), 1);
    assert_eq!(get(&q3, T0 + 9_999).as_deref(), Some("c"));
}

#[test]
fn per_message_ttl_is_acted_on_only_at_the_head() {
    let v = vhost();
    let q = declare(&v, "ttl.head", &[], T0);
    plain(&v, "ttl.head", "live", T0);
    expiring(&v, "ttl.head", "short", "30", T0);
    // Expired behind a live message: still counted.
    assert_eq!(ready(&q, T0 + 200), 2);
    assert_eq!(get(&q, T0 + 200).as_deref(), Some("live"));
    // Now at the head and expired: never delivered.
    assert_eq!(get(&q, T0 + 200), None);
    assert_eq!(ready(&q, T0 + 200), 0);
}

#[test]
fn ttl_zero_expires_at_once_unless_a_consumer_waits() {
    let v = vhost();
    let q = declare(&v, "ttl0", &[], T0);
    let qz = declare(&v, "ttl0.q", &[("x-message-ttl", int(0))], T0);
    expiring(&v, "ttl0", "gone", "0", T0);
    plain(&v, "ttl0.q", "gone too", T0);
    // Not even at the same millisecond.
    assert_eq!(ready(&q, T0), 0);
    assert_eq!(ready(&qz, T0), 0);

    // A consumer ready to take it: delivered at once.
    let sink = Arc::new(Sink::default());
    q.add_consumer(consumer("c1", &sink, true), T0).unwrap();
    qz.add_consumer(consumer("c2", &sink, true), T0).unwrap();
    expiring(&v, "ttl0", "now", "0", T0 + 5);
    plain(&v, "ttl0.q", "now too", T0 + 5);
    assert_eq!(sink.bodies(), ["now", "now too"]);
}

#[test]
fn a_consumer_gets_a_message_due_now_but_not_one_past_due() {
    let v = vhost();
    let q = declare(&v, "ttl.late", &[("x-message-ttl", int(100))], T0);
    plain(&v, "ttl.late", "a", T0);
    plain(&v, "ttl.late", "b", T0 + 1);
    plain(&v, "ttl.late", "c", T0 + 2);
    let sink = Arc::new(Sink::default());
    // Attached at T0 + 101: "a" (due T0 + 100) is past due; "b" is due exactly now,
    // which (as for TTL 0) still reaches a waiting consumer; "c" has 1 ms left.
    q.add_consumer(consumer("c", &sink, true), T0 + 101)
        .unwrap();
    assert_eq!(sink.bodies(), ["b", "c"]);
}

#[test]
fn unacked_messages_do_not_expire_but_expire_when_requeued_late() {
    let v = vhost();
    let dlq = declare(&v, "reexp.dlq", &[], T0);
    let q = declare(
        &v,
        "reexp",
        &[
            ("x-message-ttl", int(60)),
            ("x-dead-letter-exchange", s("")),
            ("x-dead-letter-routing-key", s("reexp.dlq")),
        ],
        T0,
    );
    plain(&v, "reexp", "late", T0);
    let (entry, _) = q.get(false, T0 + 10).expect("message");
    // Unacked past its TTL: nothing happens.
    assert!(!q.tick(T0 + 150));
    assert_eq!(ready(&dlq, T0 + 150), 0);
    // Requeued past its TTL: expires (and is dead-lettered) at once.
    q.requeue(vec![entry], true, true, T0 + 150);
    assert_eq!(ready(&q, T0 + 150), 0);
    let (d, _) = dlq.get(true, T0 + 150).expect("dead letter");
    let death = &x_death(&d.message)[0];
    assert_eq!(text(death, "reason"), Some("expired"));
    assert_eq!(
        death.get("time"),
        Some(&FieldValue::Timestamp((T0 + 150) / 1000))
    );
}

// ---------------------------------------------------------------- dead-lettering on expiry

#[test]
fn expired_messages_are_dead_lettered_at_the_exact_moment() {
    let v = vhost();
    let dlq = declare(&v, "exp.dlq", &[], T0);
    let q = declare(
        &v,
        "exp.dl",
        &[
            ("x-message-ttl", int(50)),
            ("x-dead-letter-exchange", s("")),
            ("x-dead-letter-routing-key", s("exp.dlq")),
        ],
        T0,
    );
    // Without a DLX: just gone.
    let plain_q = declare(&v, "exp.plain", &[("x-message-ttl", int(50))], T0);
    plain(&v, "exp.plain", "x", T0);
    plain(&v, "exp.dl", "y", T0 + 1_999);
    // The ticker runs at T0 + 2048: only "x" is due.
    v.tick(T0 + 2_048);
    assert_eq!(ready(&plain_q, T0 + 2_048), 0);
    assert_eq!(ready(&dlq, T0 + 2_048), 0);
    assert_eq!(ready(&q, T0 + 2_048), 1);
    // "y" is due at T0 + 2049: the tick then dead-letters it, timed then.
    v.tick(T0 + 2_049);
    assert_eq!(ready(&q, T0 + 2_049), 0);
    let (d, remaining) = dlq.get(true, T0 + 2_049).expect("dead letter");
    assert_eq!(remaining, 0);
    assert_eq!(&*d.message.body, b"y");
    assert_eq!(d.message.routing_key, "exp.dlq");
    assert_eq!(d.message.exchange, "");
    let deaths = x_death(&d.message);
    assert_eq!(deaths.len(), 1);
    assert_eq!(text(&deaths[0], "reason"), Some("expired"));
    assert_eq!(text(&deaths[0], "queue"), Some("exp.dl"));
    assert_eq!(deaths[0].get("count"), Some(&FieldValue::I64(1)));
    // x-death time is in seconds: (T0 + 2049) / 1000, not the publish second.
    assert_eq!(
        deaths[0].get("time"),
        Some(&FieldValue::Timestamp((T0 + 2_049) / 1000))
    );
    assert_ne!((T0 + 2_049) / 1000, (T0 + 1_999) / 1000);
}

#[test]
fn expired_messages_at_the_head_go_in_order_with_their_original_expiration() {
    let v = vhost();
    let dlq = declare(&v, "get.dlq", &[], T0);
    let q = declare(
        &v,
        "get.ttl",
        &[
            ("x-message-ttl", int(40)),
            ("x-dead-letter-exchange", s("")),
            ("x-dead-letter-routing-key", s("get.dlq")),
        ],
        T0,
    );
    plain(&v, "get.ttl", "stale", T0);
    expiring(&v, "get.ttl", "fresh-but-short", "10", T0 + 20);
    // "stale" is due at T0 + 40, "fresh-but-short" at T0 + 30 but behind it.
    assert_eq!(ready(&q, T0 + 39), 2);
    assert_eq!(get(&q, T0 + 40), None);
    let (a, _) = dlq.get(true, T0 + 40).expect("stale");
    let (b, _) = dlq.get(true, T0 + 40).expect("fresh-but-short");
    assert_eq!(&*a.message.body, b"stale");
    assert_eq!(text(&x_death(&a.message)[0], "original-expiration"), None);
    assert_eq!(&*b.message.body, b"fresh-but-short");
    assert_eq!(
        text(&x_death(&b.message)[0], "original-expiration"),
        Some("10")
    );
    assert_eq!(b.message.properties.expiration, None);
}

#[test]
fn dead_letter_cycle_on_expiry_is_dropped_when_due() {
    let v = vhost();
    let q = declare(
        &v,
        "cycle.self",
        &[
            ("x-message-ttl", int(30)),
            ("x-dead-letter-exchange", s("")),
        ],
        T0,
    );
    plain(&v, "cycle.self", "loop", T0);
    v.tick(T0 + 29);
    assert_eq!(ready(&q, T0 + 29), 1);
    v.tick(T0 + 30);
    // Dead-lettered to itself once (x-death names this queue), then dropped.
    assert_eq!(ready(&q, T0 + 30), 0);
    v.tick(T0 + 60);
    assert_eq!(ready(&q, T0 + 60), 0);
}

#[test]
fn rejected_messages_carry_the_rejection_time() {
    let v = vhost();
    let dlq = declare(&v, "rej.dlq", &[], T0);
    let q = declare(
        &v,
        "rej",
        &[
            ("x-dead-letter-exchange", s("")),
            ("x-dead-letter-routing-key", s("rej.dlq")),
        ],
        T0,
    );
    plain(&v, "rej", "r", T0);
    let (e, _) = q.get(false, T0).expect("message");
    q.reject(vec![e], T0 + 5_000);
    let (d, _) = dlq.get(true, T0 + 5_000).expect("dead letter");
    let death = &x_death(&d.message)[0];
    assert_eq!(text(death, "reason"), Some("rejected"));
    assert_eq!(
        death.get("time"),
        Some(&FieldValue::Timestamp((T0 + 5_000) / 1000))
    );
}

// ---------------------------------------------------------------- x-expires

#[test]
fn x_expires_deletes_an_unused_queue_exactly_when_due() {
    let v = vhost();
    declare(&v, "expires", &[("x-expires", int(150))], T0);
    v.tick(T0 + 149);
    assert!(exists(&v, "expires"));
    v.tick(T0 + 150);
    assert!(!exists(&v, "expires"));
}

#[test]
fn x_expires_spares_a_queue_with_a_consumer() {
    let v = vhost();
    let q = declare(&v, "expires.used", &[("x-expires", int(150))], T0);
    let sink = Arc::new(Sink::default());
    q.add_consumer(consumer("c", &sink, false), T0 + 10)
        .unwrap();
    v.tick(T0 + 10_000);
    assert!(exists(&v, "expires.used"));
    // Once the consumer goes, the timer runs from the cancel.
    v.cancel_consumer(&q, CONN, 1, "c", T0 + 10_000);
    v.tick(T0 + 10_149);
    assert!(exists(&v, "expires.used"));
    v.tick(T0 + 10_150);
    assert!(!exists(&v, "expires.used"));
}

#[test]
fn x_expires_restarts_on_declare_and_get() {
    let v = vhost();
    let q = declare(&v, "expires.touch", &[("x-expires", int(150))], T0);
    // A passive declare is a use.
    v.declare_queue(
        &QueueDeclare {
            name: "expires.touch".into(),
            passive: true,
            ..Default::default()
        },
        CONN,
        T0 + 100,
    )
    .unwrap();
    v.tick(T0 + 249);
    assert!(exists(&v, "expires.touch"));
    // So is basic.get, even an empty one.
    assert_eq!(get(&q, T0 + 200), None);
    v.tick(T0 + 349);
    assert!(exists(&v, "expires.touch"));
    v.tick(T0 + 350);
    assert!(!exists(&v, "expires.touch"));
}

// ---------------------------------------------------------------- delayed exchange

fn delayed_props(ms: i64) -> BasicProperties {
    BasicProperties {
        headers: Some(args(&[("x-delay", int(ms))])),
        ..Default::default()
    }
}

#[test]
fn delayed_exchange_releases_each_message_at_its_due_time() {
    let v = vhost();
    v.declare_exchange(&ExchangeDeclare {
        name: "delayed".into(),
        kind: "x-delayed-message".into(),
        arguments: args(&[("x-delayed-type", s("direct"))]),
        ..Default::default()
    })
    .unwrap();
    let q = declare(&v, "delayed.q", &[], T0);
    v.bind(
        "delayed",
        Destination::Queue("delayed.q".into()),
        "k",
        &FieldTable::new(),
        CONN,
    )
    .unwrap();
    publish(&v, "delayed", "k", delayed_props(250), "late", T0);
    publish(&v, "delayed", "k", delayed_props(100), "soon", T0);
    publish(&v, "delayed", "k", BasicProperties::default(), "now", T0);
    publish(&v, "delayed", "other", delayed_props(50), "unbound", T0);
    // Negative or zero delays route at once.
    publish(&v, "delayed", "k", delayed_props(-5), "negative", T0);
    assert_eq!(drain(&q, T0), ["now", "negative"]);
    v.tick(T0 + 99);
    assert_eq!(get(&q, T0 + 99), None);
    v.tick(T0 + 100);
    assert_eq!(drain(&q, T0 + 100), ["soon"]);
    v.tick(T0 + 249);
    assert_eq!(get(&q, T0 + 249), None);
    v.tick(T0 + 250);
    let (late, _) = q.get(true, T0 + 250).expect("late");
    assert_eq!(&*late.message.body, b"late");
    // The x-delay header stays on the message.
    assert_eq!(headers(&late.message).get("x-delay"), Some(&int(250)));
    // The unbound one was due at T0 + 50 and went nowhere.
    v.tick(T0 + 10_000);
    assert_eq!(get(&q, T0 + 10_000), None);
}

#[test]
fn a_delayed_message_gets_its_queue_ttl_from_its_release() {
    let v = vhost();
    v.declare_exchange(&ExchangeDeclare {
        name: "delayed.ttl".into(),
        kind: "x-delayed-message".into(),
        arguments: args(&[("x-delayed-type", s("fanout"))]),
        ..Default::default()
    })
    .unwrap();
    let q = declare(&v, "delayed.ttl.q", &[("x-message-ttl", int(100))], T0);
    v.bind(
        "delayed.ttl",
        Destination::Queue("delayed.ttl.q".into()),
        "",
        &FieldTable::new(),
        CONN,
    )
    .unwrap();
    publish(&v, "delayed.ttl", "", delayed_props(500), "m", T0);
    v.tick(T0 + 500);
    // Enqueued at T0 + 500: lives until T0 + 600.
    assert_eq!(ready(&q, T0 + 599), 1);
    assert_eq!(ready(&q, T0 + 600), 0);
}

// ---------------------------------------------------------------- length limits (no time needed)

#[test]
fn drop_head_applies_on_requeue_too() {
    let v = vhost();
    let q = declare(&v, "len.ready", &[("x-max-length", int(1))], T0);
    plain(&v, "len.ready", "1", T0);
    let (first, _) = q.get(false, T0).expect("1");
    // "1" is unacked, not ready: "2" fits, then "3" drops "2".
    plain(&v, "len.ready", "2", T0);
    plain(&v, "len.ready", "3", T0);
    assert_eq!(ready(&q, T0), 1);
    // The requeue puts "1" back at the head and drop-head drops it at once.
    q.requeue(vec![first], true, true, T0);
    assert_eq!(drain(&q, T0), ["3"]);
}

#[test]
fn drop_head_in_a_priority_queue_drops_the_highest_priority() {
    let v = vhost();
    let q = declare(
        &v,
        "len.prio",
        &[("x-max-length", int(2)), ("x-max-priority", int(5))],
        T0,
    );
    for (body, p) in [("low", 1), ("high", 5), ("mid", 3)] {
        let props = BasicProperties {
            priority: Some(p),
            ..Default::default()
        };
        publish(&v, "", "len.prio", props, body, T0);
    }
    assert_eq!(drain(&q, T0), ["mid", "low"]);
}

#[test]
fn purge_and_delete_do_not_dead_letter() {
    let v = vhost();
    let dlq = declare(&v, "nodl.dlq", &[], T0);
    let dl = [
        ("x-dead-letter-exchange", s("")),
        ("x-dead-letter-routing-key", s("nodl.dlq")),
    ];
    let q = declare(&v, "nodl", &dl, T0);
    plain(&v, "nodl", "1", T0);
    plain(&v, "nodl", "2", T0);
    assert_eq!(v.purge_queue("nodl", CONN).unwrap(), 2);
    plain(&v, "nodl", "3", T0);
    assert_eq!(v.delete_queue("nodl", false, false, CONN, T0).unwrap(), 1);
    assert!(q.is_deleted());
    assert_eq!(ready(&dlq, T0), 0);
}
