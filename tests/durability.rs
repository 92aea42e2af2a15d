//! Durability: the real binary as a child process, restarted cleanly and killed
//! with SIGKILL; confirmed messages and durable topology must survive.

mod common;

use common::process::{data_dir, BrokerProcess as Broker};
use futures::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A SIGTERM that comes while the broker is still starting (its AMQP port
/// already open) is a clean shutdown, as later: exit status 0, after the
/// final flush, not death by the signal with writes still buffered.
#[test]
fn sigterm_while_starting_is_a_clean_shutdown() {
    let dir = data_dir("sigterm-starting");
    for round in 0..5 {
        let status = common::process::terminate_once_listening(dir.path());
        assert!(status.success(), "round {round}: {status}");
    }
}

fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_topology_and_messages_survive_restart() {
    let dir = data_dir("restart");
    let b = Broker::start(&dir).await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let mut args = FieldTable::default();
    args.insert("x-max-priority".into(), AMQPValue::ShortShortUInt(5));
    ch.queue_declare("dq", durable, args.clone()).await.unwrap();
    ch.queue_declare("tq", QueueDeclareOptions::default(), FieldTable::default())
        .await
        .unwrap();
    ch.exchange_declare(
        "dx",
        lapin::ExchangeKind::Topic,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.queue_bind(
        "dq",
        "dx",
        "a.#",
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    let mut headers = FieldTable::default();
    headers.insert("h".into(), AMQPValue::LongString("v".into()));
    for i in 0..5u8 {
        let props = persistent()
            .with_headers(headers.clone())
            .with_priority(i % 2)
            .with_content_type("text/plain".into());
        ch.basic_publish(
            "dx",
            "a.b",
            BasicPublishOptions::default(),
            &[b'm', b'0' + i],
            props,
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    // A transient message on the durable queue is not kept.
    ch.basic_publish(
        "",
        "dq",
        BasicPublishOptions::default(),
        b"transient",
        BasicProperties::default(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    // One delivered but unacked message comes back redelivered.
    let got = ch
        .basic_get("dq", BasicGetOptions { no_ack: false })
        .await
        .unwrap()
        .expect("a message");
    assert_eq!(got.delivery.data, b"m1", "priority 1 first");
    // One acked message never comes back.
    let acked = ch
        .basic_get("dq", BasicGetOptions { no_ack: false })
        .await
        .unwrap()
        .expect("a message");
    acked
        .delivery
        .ack(BasicAckOptions::default())
        .await
        .unwrap();
    assert_eq!(acked.delivery.data, b"m3");
    tokio::time::sleep(Duration::from_millis(300)).await;
    b.stop();

    let b = Broker::start(&dir).await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let q = ch
        .queue_declare(
            "dq",
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("durable queue survives");
    assert_eq!(q.message_count(), 4);
    let e = ch
        .queue_declare(
            "tq",
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await;
    assert!(e.is_err(), "transient queue must be gone");
    let ch = conn.create_channel().await.unwrap();
    let mut seen = Vec::new();
    while let Some(m) = ch
        .basic_get("dq", BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let body = String::from_utf8_lossy(&m.delivery.data).to_string();
        let props = &m.delivery.properties;
        assert_eq!(props.delivery_mode(), &Some(2));
        assert_eq!(
            props.content_type().as_ref().map(|c| c.as_str()),
            Some("text/plain")
        );
        let h = props.headers().as_ref().expect("headers kept");
        assert_eq!(h.inner().get("h"), Some(&AMQPValue::LongString("v".into())));
        seen.push((body, m.delivery.redelivered));
    }
    assert_eq!(
        seen,
        vec![
            ("m1".to_string(), true),
            ("m0".to_string(), false),
            ("m2".to_string(), false),
            ("m4".to_string(), false),
        ],
        "priority order kept, unacked redelivered, acked and transient gone"
    );
    // The durable binding still routes.
    ch.basic_publish(
        "dx",
        "a.c",
        BasicPublishOptions::default(),
        b"again",
        persistent(),
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let m = ch
        .basic_get("dq", BasicGetOptions { no_ack: true })
        .await
        .unwrap();
    assert_eq!(
        m.expect("routed through recovered binding").delivery.data,
        b"again"
    );
    b.stop();
}

/// Publish persistent messages with confirms from several connections until killed.
async fn publish_until_killed(uri: String, id: u32, confirmed: Arc<Mutex<BTreeSet<String>>>) {
    let Ok(conn) = Connection::connect(&uri, ConnectionProperties::default()).await else {
        return;
    };
    let Ok(ch) = conn.create_channel().await else {
        return;
    };
    if ch
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .is_err()
    {
        return;
    }
    let mut n = 0u32;
    loop {
        let body = format!("{id}-{n}");
        let Ok(pending) = ch
            .basic_publish(
                "",
                "kq",
                BasicPublishOptions::default(),
                body.as_bytes(),
                persistent(),
            )
            .await
        else {
            return;
        };
        match pending.await {
            Ok(c) if c.is_ack() => {
                confirmed.lock().unwrap().insert(body);
            }
            _ => return,
        }
        n += 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_confirmed_message() {
    let dir = data_dir("kill9");
    let mut all_confirmed = BTreeSet::new();
    let mut drained: HashSet<String> = HashSet::new();
    for cycle in 0..3u64 {
        let b = Broker::start(&dir).await;
        let conn = b.connect().await;
        let ch = conn.create_channel().await.unwrap();
        ch.queue_declare(
            "kq",
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
        // Everything confirmed in earlier cycles and not yet drained must be here, once.
        let mut consumer = ch
            .basic_consume(
                "kq",
                "drain",
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let expected = all_confirmed.len() - drained.len();
        let mut this_round = HashSet::new();
        while this_round.len() < expected {
            let d = tokio::time::timeout(Duration::from_secs(5), consumer.next())
                .await
                .expect("confirmed message missing after kill -9")
                .expect("stream")
                .expect("delivery");
            let body = String::from_utf8_lossy(&d.data).to_string();
            assert!(
                this_round.insert(body.clone()),
                "duplicate after restart: {body}"
            );
            assert!(
                !drained.contains(&body),
                "an acked message came back: {body}"
            );
            d.ack(BasicAckOptions::default()).await.unwrap();
        }
        // Unconfirmed extras may exist; take them too, but nothing may repeat.
        while let Ok(Some(Ok(d))) =
            tokio::time::timeout(Duration::from_millis(300), consumer.next()).await
        {
            let body = String::from_utf8_lossy(&d.data).to_string();
            assert!(
                this_round.insert(body.clone()),
                "duplicate after restart: {body}"
            );
            assert!(
                !drained.contains(&body),
                "an acked message came back: {body}"
            );
            d.ack(BasicAckOptions::default()).await.unwrap();
        }
        for c in all_confirmed.iter() {
            if !drained.contains(c) {
                assert!(this_round.contains(c), "confirmed message {c} lost");
            }
        }
        drained.extend(this_round);
        ch.basic_cancel("drain", BasicCancelOptions::default())
            .await
            .unwrap();
        // Acks reach the disk with the next group flush.
        tokio::time::sleep(Duration::from_millis(300)).await;

        let confirmed = Arc::new(Mutex::new(BTreeSet::new()));
        let tasks: Vec<_> = (0..3)
            .map(|p| {
                tokio::spawn(publish_until_killed(
                    b.uri(),
                    (cycle as u32) * 10 + p,
                    Arc::clone(&confirmed),
                ))
            })
            .collect();
        // Kill at a varying moment once publishing is under way (a loaded machine
        // can take a while to get the publishers connected).
        for _ in 0..300 {
            if confirmed.lock().unwrap().len() >= 10 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(100 + 150 * cycle)).await;
        b.kill9();
        for t in tasks {
            let _ = tokio::time::timeout(Duration::from_secs(5), t).await;
        }
        let got = confirmed.lock().unwrap().clone();
        assert!(
            !got.is_empty(),
            "cycle {cycle}: nothing was confirmed before the kill"
        );
        all_confirmed.extend(got);
    }
    // Final check after the last kill.
    let b = Broker::start(&dir).await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.unwrap();
    let mut left = HashSet::new();
    while let Some(m) = ch
        .basic_get("kq", BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        let body = String::from_utf8_lossy(&m.delivery.data).to_string();
        assert!(left.insert(body.clone()), "duplicate: {body}");
        assert!(!drained.contains(&body), "acked message came back: {body}");
    }
    for c in &all_confirmed {
        assert!(
            drained.contains(c) || left.contains(c),
            "confirmed message {c} lost"
        );
    }
    b.stop();
}

/// A durable exchange, queue and binding whose `-ok`s came are there after a
/// SIGKILL sent the moment the last one came (no later confirm or clean
/// stop flushing them meanwhile): the replies wait for the store's flush.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_topology_survives_an_immediate_kill_9() {
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let durable_x = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let passive_q = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let none = FieldTable::default;
    for round in 0..5 {
        let dir = data_dir(&format!("kill9-topology-{round}"));
        let b = Broker::start(&dir).await;
        let conn = b.connect().await;
        let ch = conn.create_channel().await.unwrap();
        ch.exchange_declare("kx", lapin::ExchangeKind::Direct, durable_x, none())
            .await
            .unwrap();
        ch.queue_declare("kq", durable, none()).await.unwrap();
        ch.queue_bind("kq", "kx", "k", QueueBindOptions::default(), none())
            .await
            .unwrap();
        b.kill9();
        let b = Broker::start(&dir).await;
        let conn = b.connect().await;
        let ch = conn.create_channel().await.unwrap();
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        // The exchange routes to the queue: all three are there.
        ch.basic_publish(
            "kx",
            "k",
            BasicPublishOptions::default(),
            b"m",
            persistent(),
        )
        .await
        .unwrap_or_else(|e| panic!("round {round}: {e}"))
        .await
        .unwrap_or_else(|e| panic!("round {round}: {e}"));
        let q = ch
            .queue_declare("kq", passive_q, none())
            .await
            .unwrap_or_else(|e| panic!("round {round}: the queue is gone: {e}"));
        assert_eq!(q.message_count(), 1, "round {round}: the binding is gone");
        b.kill9();
    }
}
