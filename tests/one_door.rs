//! One door for every topology change and publish: regression tests.
//!
//! - Many connections binding to one durable exchange at once, then a restart of
//!   the real binary on the same data directory: every binding is still there
//!   (the stored bindings are written under the lock of the change).
//! - `max_queues_per_vhost` / `max_exchanges_per_vhost` refuse admin API PUTs and
//!   definitions import exactly like the AMQP declare.
//!
//! The delayed-release / alternate-exchange case and the 541 on a failed durable
//! write are unit tests on virtual time and an injected store failure
//! (`src/broker/vhost/delayed.rs`, `src/broker/vhost/topology.rs`).

mod common;

use common::process::{data_dir, BrokerProcess as Process};
use common::{props, t};
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection};
use serde_json::{json, Value};

const CONNECTIONS: usize = 16;
/// Durable exchanges, each bound by every connection at once.
const ROUNDS: usize = 10;
const QUEUE: &str = "od.binds.q";

fn source(round: usize) -> String {
    format!("od.binds.{round}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_binds_to_one_durable_exchange_survive_restart() {
    let dir = data_dir("binds");
    let broker = Process::start(&dir).await;
    let setup = broker.connect().await;
    let ch = t(setup.create_channel()).await.expect("channel");
    for r in 0..ROUNDS {
        t(ch.exchange_declare(
            &source(r),
            lapin::ExchangeKind::Direct,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        ))
        .await
        .expect("exchange");
    }
    t(ch.queue_declare(
        QUEUE,
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .expect("queue");

    let mut channels = Vec::new();
    let mut conns = Vec::new();
    for _ in 0..CONNECTIONS {
        let conn = broker.connect().await;
        channels.push(t(conn.create_channel()).await.expect("channel"));
        conns.push(conn);
    }
    // Each round, every connection binds its own key to one exchange at once.
    for r in 0..ROUNDS {
        let binds = channels.iter().enumerate().map(|(c, ch)| {
            let (ch, exchange) = (ch.clone(), source(r));
            tokio::spawn(async move {
                t(ch.queue_bind(
                    QUEUE,
                    &exchange,
                    &format!("c{c}"),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                ))
                .await
                .expect("bind");
            })
        });
        for bind in futures::future::join_all(binds).await {
            bind.expect("binder");
        }
    }
    for conn in conns {
        let _ = conn.close(200, "bye").await;
    }
    let _ = setup.close(200, "bye").await;
    broker.stop();

    // After the restart, each (exchange, key) routes one message: all bindings are back.
    let broker = Process::start(&dir).await;
    let conn = broker.connect().await;
    let ch = t(conn.create_channel()).await.expect("channel");
    t(ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirms");
    let mut confirms = Vec::new();
    for r in 0..ROUNDS {
        for c in 0..CONNECTIONS {
            let confirm = t(ch.basic_publish(
                &source(r),
                &format!("c{c}"),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                b"x",
                BasicProperties::default(),
            ))
            .await
            .expect("publish");
            confirms.push((r, c, confirm));
        }
    }
    for (r, c, confirm) in confirms {
        let confirmation = t(confirm).await.expect("confirm");
        assert!(confirmation.is_ack(), "publish not acked");
        assert!(
            confirmation.take_message().is_none(),
            "binding {} -> {QUEUE} (c{c}) was lost in the restart",
            source(r)
        );
    }
    let q = t(ch.queue_declare(
        QUEUE,
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .expect("passive declare");
    assert_eq!(q.message_count() as usize, ROUNDS * CONNECTIONS);
    let _ = conn.close(200, "bye").await;
    broker.stop();
}

// ------------------------------------------------------------ limits, every door

struct Admin {
    _warren: warren::Warren,
    amqp: String,
    base: String,
    /// Its data directory (removed after it).
    _dir: common::TempDir,
}

async fn admin_broker(tweak: impl FnOnce(&mut warren::Config)) -> Admin {
    let dir = data_dir("limits");
    let mut config = warren::Config::for_tests(dir.path());
    config.admin_enabled = true;
    tweak(&mut config);
    let w = warren::start(config).await.expect("broker starts");
    let admin = w.admin_addr().expect("admin enabled");
    Admin {
        amqp: format!("amqp://guest:guest@{}/%2f", w.amqp_addr()),
        base: format!("http://{admin}"),
        _warren: w,
        _dir: dir,
    }
}

impl Admin {
    /// One HTTP call as guest: (status, JSON body or Null).
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let url = format!("{}{}", self.base, path);
        common::http(method, &url, Some(("guest", "guest")), body).await
    }

    async fn queue_names(&self) -> Vec<String> {
        let (status, v) = self.call("GET", "/api/queues/%2f", None).await;
        assert_eq!(status, 200, "{v}");
        let mut names: Vec<String> = v
            .as_array()
            .expect("queue list")
            .iter()
            .filter_map(|q| q["name"].as_str().map(String::from))
            .collect();
        names.sort();
        names
    }

    /// What an AMQP queue.declare of `name` gets: (reply code, text) of the error.
    async fn amqp_declare_error(&self, name: &str) -> (Option<u16>, String) {
        let conn = t(Connection::connect(&self.amqp, props()))
            .await
            .expect("connect");
        let ch = t(conn.create_channel()).await.expect("channel");
        let e = t(ch.queue_declare(name, QueueDeclareOptions::default(), FieldTable::default()))
            .await
            .expect_err("declare past the limit");
        let _ = conn.close(200, "bye").await;
        let text = match &e {
            lapin::Error::ProtocolError(p) => p.get_message().to_string(),
            other => format!("{other:?}"),
        };
        (common::code(&e), text)
    }
}

fn limit_text(name: &str) -> String {
    format!("PRECONDITION_FAILED - cannot declare queue '{name}': queue limit in vhost '/' (5) is reached")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_queue_put_past_the_limit_is_refused_like_amqp() {
    let b = admin_broker(|c| c.max_queues_per_vhost = Some(5)).await;
    for i in 1..=7 {
        let (status, v) = b
            .call("PUT", &format!("/api/queues/%2f/q{i}"), Some(json!({})))
            .await;
        if i <= 5 {
            assert_eq!(status, 201, "q{i}: {v}");
        } else {
            assert_eq!(status, 400, "q{i}: {v}");
            assert_eq!(v["error"], "bad_request", "{v}");
            assert_eq!(v["reason"], limit_text(&format!("q{i}")), "{v}");
        }
    }
    // Redeclaring an existing queue at the limit is fine.
    let (status, v) = b.call("PUT", "/api/queues/%2f/q1", Some(json!({}))).await;
    assert_eq!(status, 204, "{v}");
    assert_eq!(b.queue_names().await, ["q1", "q2", "q3", "q4", "q5"]);
    // The AMQP declare gets the same refusal (406, same text).
    assert_eq!(
        b.amqp_declare_error("q8").await,
        (Some(406), limit_text("q8"))
    );
    assert_eq!(b.queue_names().await.len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn definitions_import_past_the_limit_is_refused() {
    let b = admin_broker(|c| c.max_queues_per_vhost = Some(5)).await;
    let queues: Vec<Value> = (1..=7)
        .map(|i| json!({"name": format!("d{i}"), "vhost": "/", "durable": true, "auto_delete": false, "arguments": {}}))
        .collect();
    let (status, v) = b
        .call("POST", "/api/definitions", Some(json!({"queues": queues})))
        .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["reason"], limit_text("d6"), "{v}");
    assert_eq!(b.queue_names().await, ["d1", "d2", "d3", "d4", "d5"]);
    assert_eq!(
        b.amqp_declare_error("d8").await,
        (Some(406), limit_text("d8"))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_exchange_put_and_import_past_the_limit_are_refused() {
    // Seven predeclared exchanges (amq.rabbitmq.trace among them), so two more fit.
    let b = admin_broker(|c| c.max_exchanges_per_vhost = Some(9)).await;
    for name in ["e1", "e2"] {
        let (status, v) = b
            .call(
                "PUT",
                &format!("/api/exchanges/%2f/{name}"),
                Some(json!({"type": "direct"})),
            )
            .await;
        assert_eq!(status, 201, "{name}: {v}");
    }
    let (status, v) = b
        .call(
            "PUT",
            "/api/exchanges/%2f/e3",
            Some(json!({"type": "direct"})),
        )
        .await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(
        v["reason"],
        "PRECONDITION_FAILED - cannot declare exchange 'e3' in vhost '/': exchange limit (9) is reached",
        "{v}"
    );
    let exchanges = json!({"exchanges": [
        {"name": "e4", "vhost": "/", "type": "fanout", "durable": true, "auto_delete": false, "internal": false, "arguments": {}}
    ]});
    let (status, v) = b.call("POST", "/api/definitions", Some(exchanges)).await;
    assert_eq!(status, 400, "{v}");
    let (_, list) = b.call("GET", "/api/exchanges/%2f", None).await;
    assert_eq!(list.as_array().map(Vec::len), Some(9), "{list}");
}
