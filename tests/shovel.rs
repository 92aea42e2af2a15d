//! Shovels (`/api/parameters/shovel`, `/api/shovels`, definitions, static shovels
//! from the config) between real brokers: in-process warrens, warren processes
//! (one killed with SIGKILL mid-way), and a RabbitMQ when one is reachable.

mod common;

use common::{http, t, uniq, TIMEOUT};
use futures::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::time::Duration;

const GUEST: Option<(&str, &str)> = Some(("guest", "guest"));

/// An in-process broker with the admin API.
struct Node {
    warren: warren::Warren,
    dir: std::path::PathBuf,
}

impl Node {
    async fn start(name: &str) -> Node {
        let dir = std::env::temp_dir().join(uniq(&format!("warren-shovel-{name}")));
        let _ = std::fs::remove_dir_all(&dir);
        Node::start_on(dir, |_| {}).await
    }

    async fn start_on(dir: std::path::PathBuf, f: impl FnOnce(&mut warren::Config)) -> Node {
        let mut config = warren::Config::for_tests(&dir);
        config.admin_enabled = true;
        f(&mut config);
        let warren = warren::start(config).await.expect("broker starts");
        Node { warren, dir }
    }

    fn uri(&self) -> String {
        format!("amqp://guest:guest@{}/%2f", self.warren.amqp_addr())
    }

    fn api(&self, path: &str) -> String {
        format!(
            "http://{}{path}",
            self.warren.admin_addr().expect("admin enabled")
        )
    }

    async fn channel(&self) -> (Connection, Channel) {
        channel(&self.uri()).await
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.warren.shovels.stop_all();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn channel(uri: &str) -> (Connection, Channel) {
    let conn = common::connect_with(uri).await.expect("connect");
    let ch = t(conn.create_channel()).await.expect("channel");
    (conn, ch)
}

async fn durable_queue(ch: &Channel, name: &str) {
    t(ch.queue_declare(
        name,
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .expect("queue.declare");
}

/// Publish `bodies` persistently to `exchange`/`key` and wait for every confirm.
async fn publish_all(
    ch: &Channel,
    exchange: &str,
    key: &str,
    bodies: impl Iterator<Item = String>,
) {
    t(ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .ok();
    let mut confirms = Vec::new();
    for b in bodies {
        let c = t(ch.basic_publish(
            exchange,
            key,
            BasicPublishOptions::default(),
            b.as_bytes(),
            BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(b.clone().into()),
        ))
        .await
        .expect("publish");
        confirms.push(c);
    }
    for c in confirms {
        assert!(t(c).await.expect("confirm").is_ack());
    }
}

async fn count(ch: &Channel, queue: &str) -> u32 {
    common::message_count(ch, queue).await
}

/// Poll `f` until it is true, for at most `d`.
async fn eventually<F, Fut>(d: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + d;
    while !f().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Every message of `queue`, in order, by consuming (then cancelling).
async fn consume_all(ch: &Channel, queue: &str) -> Vec<String> {
    let n = count(ch, queue).await as usize;
    let tag = uniq("drain");
    let mut consumer = t(ch.basic_consume(
        queue,
        &tag,
        BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .expect("consume");
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let d = t(consumer.next()).await.expect("stream").expect("delivery");
        out.push(String::from_utf8(d.data).expect("utf8"));
    }
    t(ch.basic_cancel(&tag, BasicCancelOptions::default()))
        .await
        .expect("cancel");
    out
}

async fn put_shovel(node: &Node, name: &str, value: Value) -> (u16, Value) {
    http(
        "PUT",
        &node.api(&format!("/api/parameters/shovel/%2f/{name}")),
        GUEST,
        Some(json!({ "value": value })),
    )
    .await
}

async fn shovel_status(node: &Node, name: &str) -> Option<Value> {
    let (status, body) = http("GET", &node.api("/api/shovels/%2f"), GUEST, None).await;
    assert_eq!(status, 200, "{body}");
    body.as_array()?.iter().find(|s| s["name"] == name).cloned()
}

async fn wait_state(node: &Node, name: &str, state: &str) -> Value {
    let mut last = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while tokio::time::Instant::now() < deadline {
        last = shovel_status(node, name).await;
        if last.as_ref().is_some_and(|s| s["state"] == state) {
            return last.unwrap_or_default();
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("shovel {name} never {state}: {last:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_to_queue_on_confirm_moves_every_message_once_in_order() {
    let (src, dest) = (Node::start("src").await, Node::start("dest").await);
    let (_c1, sch) = src.channel().await;
    let (_c2, dch) = dest.channel().await;
    durable_queue(&sch, "orders").await;
    let n = 1000;
    publish_all(&sch, "", "orders", (0..n).map(|i| format!("m{i}"))).await;

    // The shovel runs in the destination, pulling from the source; `amqp://`
    // without a host is the destination broker itself.
    let (status, body) = put_shovel(
        &dest,
        "move-orders",
        json!({
            "src-protocol": "amqp091", "dest-protocol": "amqp091",
            "src-uri": src.uri(), "src-queue": "orders",
            "dest-uri": "amqp://", "dest-queue": "orders-in",
            "src-prefetch-count": 100, "ack-mode": "on-confirm",
            "dest-add-forward-headers": true
        }),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let st = wait_state(&dest, "move-orders", "running").await;
    assert_eq!(st["type"], "dynamic");
    assert_eq!(st["vhost"], "/");
    assert_eq!(st["src_queue"], "orders");
    assert_eq!(st["dest_queue"], "orders-in");
    let src_uri = st["src_uri"].as_str().unwrap_or_default();
    assert!(
        src_uri.contains("guest:***@"),
        "password redacted: {src_uri}"
    );
    assert!(!src_uri.contains("guest:guest"), "{src_uri}");

    eventually(TIMEOUT * 3, "every message moved", || async {
        count(&dch, "orders-in").await == n && count(&sch, "orders").await == 0
    })
    .await;
    // The source's count is of ready messages: the last few may still be unacked
    // there (confirmed at the destination, their ack on its way) for a moment.
    eventually(
        TIMEOUT,
        "every message acknowledged at the source",
        || async {
            shovel_status(&dest, "move-orders")
                .await
                .is_some_and(|st| st["messages_acknowledged"] == json!(n))
        },
    )
    .await;
    let st = shovel_status(&dest, "move-orders").await.expect("status");
    assert_eq!(st["forwarded"], json!(n), "{st}");
    assert_eq!(st["messages_acknowledged"], json!(n), "{st}");
    // Properties and forward headers came along.
    let got = t(dch.basic_get("orders-in", BasicGetOptions { no_ack: false }))
        .await
        .expect("get")
        .expect("a message");
    assert_eq!(got.delivery.data, b"m0");
    assert_eq!(got.delivery.properties.delivery_mode(), &Some(2));
    assert_eq!(
        got.delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.as_str()),
        Some("m0")
    );
    let headers = got
        .delivery
        .properties
        .headers()
        .clone()
        .unwrap_or_default();
    assert!(headers.inner().contains_key("x-shovelled"), "{headers:?}");
    t(dch.basic_nack(
        got.delivery.delivery_tag,
        BasicNackOptions {
            requeue: true,
            multiple: false,
        },
    ))
    .await
    .expect("requeue");
    let bodies = consume_all(&dch, "orders-in").await;
    let want: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
    assert_eq!(bodies, want, "exactly once, in order");

    // Deleted: gone from the API, and no longer moving messages.
    let (status, _) = http(
        "DELETE",
        &dest.api("/api/parameters/shovel/%2f/move-orders"),
        GUEST,
        None,
    )
    .await;
    assert_eq!(status, 204);
    assert!(shovel_status(&dest, "move-orders").await.is_none());
    publish_all(&sch, "", "orders", (0..3).map(|i| format!("late{i}"))).await;
    assert_eq!(count(&sch, "orders").await, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_source_and_exchange_destination() {
    let (src, dest) = (Node::start("xsrc").await, Node::start("xdest").await);
    let (_c1, sch) = src.channel().await;
    let (_c2, dch) = dest.channel().await;
    durable_queue(&dch, "audit").await;
    t(dch.queue_bind(
        "audit",
        "amq.direct",
        "audit-key",
        QueueBindOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("bind");
    let (status, body) = put_shovel(
        &dest,
        "topic-bridge",
        json!({
            "src-uri": [src.uri()], "src-exchange": "amq.topic", "src-exchange-key": "orders.#",
            "dest-uri": dest.uri(), "dest-exchange": "amq.direct", "dest-exchange-key": "audit-key",
            "ack-mode": "on-publish"
        }),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let st = wait_state(&dest, "topic-bridge", "running").await;
    assert_eq!(st["src_exchange"], "amq.topic");
    assert_eq!(st["src_exchange_key"], "orders.#");
    assert_eq!(st["dest_exchange"], "amq.direct");
    publish_all(
        &sch,
        "amq.topic",
        "orders.eu",
        (0..10).map(|i| format!("o{i}")),
    )
    .await;
    publish_all(
        &sch,
        "amq.topic",
        "invoices.eu",
        (0..5).map(|i| format!("i{i}")),
    )
    .await;
    eventually(TIMEOUT, "ten moved", || async {
        count(&dch, "audit").await == 10
    })
    .await;
    let bodies = consume_all(&dch, "audit").await;
    assert_eq!(bodies, (0..10).map(|i| format!("o{i}")).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_after_queue_length_moves_the_backlog_then_deletes_itself() {
    let (src, dest) = (Node::start("dasrc").await, Node::start("dadest").await);
    let (_c1, sch) = src.channel().await;
    let (_c2, dch) = dest.channel().await;
    durable_queue(&sch, "backlog").await;
    publish_all(&sch, "", "backlog", (0..25).map(|i| format!("b{i}"))).await;
    let (status, body) = put_shovel(
        &dest,
        "drain-once",
        json!({
            "src-uri": src.uri(), "src-queue": "backlog",
            "dest-uri": "amqp://", "dest-queue": "backlog",
            "src-prefetch-count": 10, "src-delete-after": "queue-length"
        }),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    eventually(TIMEOUT * 2, "the shovel deleted itself", || async {
        http(
            "GET",
            &dest.api("/api/parameters/shovel/%2f/drain-once"),
            GUEST,
            None,
        )
        .await
        .0 == 404
    })
    .await;
    assert!(shovel_status(&dest, "drain-once").await.is_none());
    assert_eq!(count(&dch, "backlog").await, 25);
    // Messages published afterwards stay at the source.
    publish_all(&sch, "", "backlog", (0..5).map(|i| format!("after{i}"))).await;
    common::wait_message_count(&sch, "backlog", 5).await;
    assert_eq!(count(&dch, "backlog").await, 25);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_errors_are_400_and_failures_show_a_reason() {
    let node = Node::start("valid").await;
    let cases = [
        (
            json!({"src-uri": "amqp://", "dest-uri": "amqp://", "dest-queue": "d"}),
            "Must specify 'src-exchange' or 'src-queue'",
        ),
        (
            json!({"src-uri": "http://x", "src-queue": "q", "dest-uri": "amqp://"}),
            "not a valid URI",
        ),
        (
            json!({"src-uri": "amqp://", "src-queue": "q", "dest-uri": "amqp://", "ack-mode": "maybe"}),
            "ack-mode",
        ),
        (
            json!({"src-uri": "amqp://", "src-queue": "q", "dest-uri": "amqp://", "src-delete-after": "soon"}),
            "src-delete-after",
        ),
        (
            json!({"src-uri": "amqp://", "src-queue": "q", "src-exchange": "x", "dest-uri": "amqp://"}),
            "Cannot specify",
        ),
    ];
    for (value, want) in cases {
        let (status, body) = put_shovel(&node, "bad", value.clone()).await;
        assert_eq!(status, 400, "{value}: {body}");
        let reason = body["reason"].as_str().unwrap_or_default();
        assert!(reason.contains(want), "{value}: {reason}");
    }
    let (status, _) = http(
        "PUT",
        &node.api("/api/parameters/shovel/%2f/bad"),
        GUEST,
        Some(json!({})),
    )
    .await;
    assert_eq!(status, 400, "no value");
    assert!(
        shovel_status(&node, "bad").await.is_none(),
        "nothing was made"
    );

    // Nothing listens on this port: terminated, with the reason.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("port");
    let port = dead.local_addr().expect("addr").port();
    drop(dead);
    let (status, body) = put_shovel(
        &node,
        "unreachable",
        json!({"src-uri": format!("amqp://u:secret@127.0.0.1:{port}"), "src-queue": "q",
               "dest-uri": "amqp://", "dest-queue": "q", "reconnect-delay": 30}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let st = wait_state(&node, "unreachable", "terminated").await;
    let reason = st["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("source"), "{st}");
    assert!(
        !reason.contains("secret") && !st.to_string().contains("secret"),
        "{st}"
    );
    let (status, list) = http("GET", &node.api("/api/shovels"), GUEST, None).await;
    assert_eq!(status, 200);
    assert_eq!(list.as_array().map(Vec::len), Some(1));

    // A missing vhost is refused; deleting a vhost deletes its shovels.
    let (status, _) = http(
        "PUT",
        &node.api("/api/parameters/shovel/nope/x"),
        GUEST,
        Some(json!({"value": {"src-uri": "amqp://", "src-queue": "q", "dest-uri": "amqp://"}})),
    )
    .await;
    assert_eq!(status, 404);
    assert_eq!(
        http(
            "PUT",
            &node.api("/api/vhosts/tenant"),
            GUEST,
            Some(json!({}))
        )
        .await
        .0,
        201
    );
    let (status, _) = http(
        "PUT",
        &node.api("/api/permissions/tenant/guest"),
        GUEST,
        Some(json!({"configure": ".*", "write": ".*", "read": ".*"})),
    )
    .await;
    assert!(status == 201 || status == 204, "{status}");
    let (status, body) = http(
        "PUT",
        &node.api("/api/parameters/shovel/tenant/t1"),
        GUEST,
        Some(json!({"value": {"src-uri": "amqp://", "src-queue": "q", "dest-uri": "amqp://"}})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        http(
            "GET",
            &node.api("/api/parameters/shovel/tenant"),
            GUEST,
            None
        )
        .await
        .1
        .as_array()
        .map(Vec::len),
        Some(1)
    );
    assert_eq!(
        http("DELETE", &node.api("/api/vhosts/tenant"), GUEST, None)
            .await
            .0,
        204
    );
    let (_, all) = http("GET", &node.api("/api/parameters/shovel"), GUEST, None).await;
    assert!(
        all.as_array()
            .is_some_and(|a| a.iter().all(|p| p["vhost"] != "tenant")),
        "{all}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn definitions_round_trip_keeps_shovels_and_vhost_limits() {
    let a = Node::start("defa").await;
    let value = json!({"src-uri": "amqp://", "src-queue": "in", "dest-uri": "amqp://", "dest-queue": "out",
                       "src-prefetch-count": 50});
    assert_eq!(put_shovel(&a, "copy", value.clone()).await.0, 201);
    assert_eq!(put_shovel(&a, "copy", value.clone()).await.0, 204, "update");
    let (s, _) = http(
        "PUT",
        &a.api("/api/vhost-limits/%2f/max-queues"),
        GUEST,
        Some(json!({"value": 100})),
    )
    .await;
    assert_eq!(s, 204);
    let (s, defs) = http("GET", &a.api("/api/definitions"), GUEST, None).await;
    assert_eq!(s, 200);
    let params = defs["parameters"].as_array().cloned().unwrap_or_default();
    assert!(
        params.iter().any(|p| p["component"] == "vhost-limits"),
        "{params:?}"
    );
    let shovel = params
        .iter()
        .find(|p| p["component"] == "shovel")
        .expect("shovel exported");
    assert_eq!(shovel["name"], "copy");
    assert_eq!(shovel["vhost"], "/");
    assert_eq!(shovel["value"], value);

    let b = Node::start("defb").await;
    let (s, body) = http("POST", &b.api("/api/definitions"), GUEST, Some(defs)).await;
    assert_eq!(s, 204, "{body}");
    let (s, got) = http(
        "GET",
        &b.api("/api/parameters/shovel/%2f/copy"),
        GUEST,
        None,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(got["value"], value);
    assert_eq!(got["component"], "shovel");
    let (_, limits) = http("GET", &b.api("/api/vhost-limits/%2f"), GUEST, None).await;
    assert_eq!(limits[0]["value"]["max-queues"], 100, "{limits}");
    // It runs there, moving in -> out within the broker.
    wait_state(&b, "copy", "running").await;
    let (_c, ch) = b.channel().await;
    publish_all(&ch, "", "in", (0..5).map(|i| format!("x{i}"))).await;
    eventually(TIMEOUT, "moved", || async { count(&ch, "out").await == 5 }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dynamic_shovels_survive_a_restart() {
    let dir = std::env::temp_dir().join(uniq("warren-shovel-durable"));
    let _ = std::fs::remove_dir_all(&dir);
    let mut p = Proc::start(&dir, None, true).await;
    let (s, body) = http(
        "PUT",
        &format!("{}/api/parameters/shovel/%2f/kept", p.admin()),
        GUEST,
        Some(json!({"value": {"src-uri": "amqp://", "src-queue": "a", "dest-uri": "amqp://", "dest-queue": "b"}})),
    )
    .await;
    assert_eq!(s, 201, "{body}");
    p.stop();
    let p = Proc::start(&dir, None, true).await;
    let (s, got) = http(
        "GET",
        &format!("{}/api/parameters/shovel/%2f/kept", p.admin()),
        GUEST,
        None,
    )
    .await;
    assert_eq!(s, 200, "{got}");
    assert_eq!(got["value"]["dest-queue"], "b");
    let (conn, ch) = channel(&p.uri()).await;
    // Declared here too (the shovel's own declare may not have happened yet).
    durable_queue(&ch, "a").await;
    durable_queue(&ch, "b").await;
    publish_all(&ch, "", "a", (0..3).map(|i| format!("k{i}"))).await;
    eventually(
        TIMEOUT * 2,
        "the recovered shovel moves messages",
        || async { count(&ch, "b").await == 3 },
    )
    .await;
    drop(conn);
    // One answered 201 survives a SIGKILL right after it, too (the answer
    // waited for the store's flush).
    let (s, body) = http(
        "PUT",
        &format!("{}/api/parameters/shovel/%2f/crashed", p.admin()),
        GUEST,
        Some(json!({"value": {"src-uri": "amqp://", "src-queue": "c", "dest-uri": "amqp://", "dest-queue": "d"}})),
    )
    .await;
    assert_eq!(s, 201, "{body}");
    let mut p = p;
    p.kill9();
    let p = Proc::start(&dir, None, true).await;
    for name in ["kept", "crashed"] {
        let url = format!("{}/api/parameters/shovel/%2f/{name}", p.admin());
        let (s, got) = http("GET", &url, GUEST, None).await;
        assert_eq!(s, 200, "{name}: {got}");
    }
    drop(p);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn static_shovel_from_the_config_file() {
    let src = Node::start("ssrc").await;
    let (_c1, sch) = src.channel().await;
    durable_queue(&sch, "legacy").await;
    publish_all(&sch, "", "legacy", (0..20).map(|i| format!("s{i}"))).await;
    let dir = std::env::temp_dir().join(uniq("warren-shovel-static"));
    std::fs::create_dir_all(&dir).expect("dir");
    let file = dir.join("warren.toml");
    std::fs::write(
        &file,
        format!(
            r#"
[shovels.from-legacy]
src-uri = "{}"
src-queue = "legacy"
dest-uri = "amqp://"
dest-queue = "modern"
ack-mode = "on-confirm"
src-prefetch-count = 5
"#,
            src.uri()
        ),
    )
    .expect("write config");
    let loaded = warren::Config::load(Some(&file)).expect("config loads");
    assert!(loaded.shovels.contains_key("from-legacy"));
    let dest = Node::start_on(dir.join("data"), |c| c.shovels = loaded.shovels.clone()).await;
    let st = wait_state(&dest, "from-legacy", "running").await;
    assert_eq!(st["type"], "static");
    let (_c2, dch) = dest.channel().await;
    eventually(TIMEOUT * 2, "moved", || async {
        count(&dch, "modern").await == 20
    })
    .await;
    assert_eq!(count(&sch, "legacy").await, 0);
    // A static shovel is not a runtime parameter: not listed, not deletable.
    let (_, params) = http("GET", &dest.api("/api/parameters/shovel"), GUEST, None).await;
    assert_eq!(params, json!([]));
    let (s, _) = http(
        "DELETE",
        &dest.api("/api/parameters/shovel/%2f/from-legacy"),
        GUEST,
        None,
    )
    .await;
    assert_eq!(s, 404);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A warren process on a fixed AMQP port (so it can come back on it), with the
/// admin API when asked.
struct Proc {
    child: std::process::Child,
    amqp: u16,
    admin: Option<u16>,
}

fn free_port() -> u16 {
    common::free_port("127.0.0.1")
}

impl Proc {
    async fn start(dir: &std::path::Path, amqp: Option<u16>, admin: bool) -> Proc {
        let amqp = amqp.unwrap_or_else(free_port);
        let admin = admin.then(free_port);
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_warren"));
        cmd.env("WARREN_AMQP_PORT", amqp.to_string())
            .env("WARREN_BIND", "127.0.0.1")
            .env("WARREN_PROMETHEUS_ENABLED", "false")
            .env("WARREN_DATA_DIR", dir)
            .env("WARREN_LOG", "warn")
            .stdout(std::process::Stdio::null());
        match admin {
            Some(port) => cmd.env("WARREN_ADMIN_PORT", port.to_string()),
            None => cmd.env("WARREN_ADMIN_ENABLED", "false"),
        };
        let mut child = cmd.spawn().expect("spawn warren");
        let wait_for = admin.unwrap_or(amqp);
        for _ in 0..300 {
            if tokio::net::TcpStream::connect(("127.0.0.1", wait_for))
                .await
                .is_ok()
                && tokio::net::TcpStream::connect(("127.0.0.1", amqp))
                    .await
                    .is_ok()
            {
                return Proc { child, amqp, admin };
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("warren did not start on {amqp}");
    }

    fn uri(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.amqp)
    }

    fn admin(&self) -> String {
        format!("http://127.0.0.1:{}", self.admin.expect("admin enabled"))
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn stop(&mut self) {
        common::process::stop_cleanly(&mut self.child);
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destination_killed_mid_way_loses_nothing() {
    let src = Node::start("ksrc").await;
    let (_c1, sch) = src.channel().await;
    durable_queue(&sch, "work").await;
    let n: usize = 5000;
    publish_all(&sch, "", "work", (0..n).map(|i| format!("w{i}"))).await;
    let dir = std::env::temp_dir().join(uniq("warren-shovel-killed"));
    let _ = std::fs::remove_dir_all(&dir);
    let mut dest = Proc::start(&dir, None, false).await;
    let port = dest.amqp;
    let (status, body) = put_shovel(
        &src,
        "to-proc",
        json!({"src-uri": "amqp://", "src-queue": "work",
               "dest-uri": dest.uri(), "dest-queue": "work",
               "src-prefetch-count": 50, "reconnect-delay": 0.2}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    // Running: the destination queue is declared.
    wait_state(&src, "to-proc", "running").await;
    {
        let (conn, dch) = channel(&dest.uri()).await;
        eventually(TIMEOUT * 3, "some moved", || async {
            count(&dch, "work").await >= 500
        })
        .await;
        drop(conn);
    }
    dest.kill9();
    let st = wait_state(&src, "to-proc", "terminated").await;
    assert!(
        st["reason"]
            .as_str()
            .is_some_and(|r| r.contains("destination")),
        "{st}"
    );
    let dest = Proc::start(&dir, Some(port), false).await;
    eventually(Duration::from_secs(60), "the source drained", || async {
        count(&sch, "work").await == 0
            && shovel_status(&src, "to-proc")
                .await
                .is_some_and(|s| s["state"] == "running" && s["remaining_unacked"] == 0)
    })
    .await;
    let (_c2, dch) = channel(&dest.uri()).await;
    let bodies = consume_all(&dch, "work").await;
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for b in &bodies {
        *seen.entry(b.as_str()).or_default() += 1;
    }
    let missing: Vec<usize> = (0..n)
        .filter(|i| !seen.contains_key(format!("w{i}").as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "lost {} messages, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    let duplicates = bodies.len() - seen.len();
    eprintln!("destination killed mid-way: {n} messages, none lost, {duplicates} duplicates (at-least-once)");
    assert!(
        duplicates <= 50 + 1,
        "at most the unconfirmed window is repeated: {duplicates}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// From a real RabbitMQ (`WARREN_SHOVEL_RABBITMQ_URI`, else 127.0.0.1:5673) into
/// warren, as the README's move-in path does; skipped when none answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn from_rabbitmq_into_warren() {
    let uri = std::env::var("WARREN_SHOVEL_RABBITMQ_URI")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5673/%2f".into());
    let Ok(Ok(rconn)) =
        tokio::time::timeout(TIMEOUT, Connection::connect(&uri, common::props())).await
    else {
        eprintln!("no RabbitMQ at {uri}: skipped");
        return;
    };
    let rch = t(rconn.create_channel()).await.expect("channel");
    let queue = uniq("shovel-from-rabbit");
    durable_queue(&rch, &queue).await;
    let n = 300;
    publish_all(&rch, "", &queue, (0..n).map(|i| format!("r{i}"))).await;
    let node = Node::start("fromrmq").await;
    let (status, body) = put_shovel(
        &node,
        "move-in",
        json!({"src-uri": uri, "src-queue": queue, "dest-uri": "amqp://", "dest-queue": queue,
               "ack-mode": "on-confirm", "src-delete-after": "queue-length"}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (_c, ch) = node.channel().await;
    eventually(TIMEOUT * 4, "moved from RabbitMQ", || async {
        http(
            "GET",
            &node.api("/api/parameters/shovel/%2f/move-in"),
            GUEST,
            None,
        )
        .await
        .0 == 404
    })
    .await;
    assert_eq!(count(&rch, &queue).await, 0);
    let bodies = consume_all(&ch, &queue).await;
    assert_eq!(bodies, (0..n).map(|i| format!("r{i}")).collect::<Vec<_>>());
    let _ = t(rch.queue_delete(&queue, QueueDeleteOptions::default())).await;
}

/// A destination that refuses what is published (an exchange that does not
/// exist): with on-confirm nothing is acknowledged at the source, the shovel
/// reports why, and once the exchange exists every message arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_publishes_stay_at_the_source() {
    let node = Node::start("refused").await;
    let (_c, ch) = node.channel().await;
    durable_queue(&ch, "pending").await;
    publish_all(&ch, "", "pending", (0..20).map(|i| format!("p{i}"))).await;
    let (status, body) = put_shovel(
        &node,
        "to-missing",
        json!({"src-uri": "amqp://", "src-queue": "pending",
               "dest-uri": "amqp://", "dest-exchange": "not-yet", "dest-exchange-key": "k",
               "reconnect-delay": 0.1}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let st = wait_state(&node, "to-missing", "terminated").await;
    let reason = st["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("destination"), "{st}");
    assert!(reason.contains("not-yet"), "{st}");
    // Nothing was acknowledged at the source.
    common::wait_message_count(&ch, "pending", 20).await;
    t(ch.exchange_declare(
        "not-yet",
        lapin::ExchangeKind::Direct,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("exchange");
    durable_queue(&ch, "arrived").await;
    t(ch.queue_bind(
        "arrived",
        "not-yet",
        "k",
        QueueBindOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("bind");
    eventually(Duration::from_secs(20), "all arrived", || async {
        count(&ch, "arrived").await >= 20 && count(&ch, "pending").await == 0
    })
    .await;
    let bodies = consume_all(&ch, "arrived").await;
    for i in 0..20 {
        assert!(bodies.contains(&format!("p{i}")), "p{i} lost: {bodies:?}");
    }
}
