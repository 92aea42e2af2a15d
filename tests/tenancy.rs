//! Authorisation and tenancy, with real clients (lapin) and the admin API: topic
//! permissions (with `{username}` / `{client_id}` expansion), vhost and user
//! limits (AMQP refusals with RabbitMQ's texts, the API, the CLI, definitions,
//! a restart), operator policies capping users' policies, and CC / BCC
//! sender-selected distribution.

mod common;

use common::{code, props, t};
use lapin::options::*;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection};
use serde_json::{json, Value};

/// An in-process broker with the admin API.
struct Broker {
    _warren: Option<warren::Warren>,
    amqp: std::net::SocketAddr,
    base: String,
    /// Its data directory (removed after it).
    _dir: Option<common::TempDir>,
}

async fn start() -> Broker {
    let dir = common::TempDir::new("warren-tenancy");
    let mut config = warren::Config::for_tests(dir.path());
    config.admin_enabled = true;
    let w = warren::start(config).await.expect("broker starts");
    Broker {
        amqp: w.amqp_addr(),
        base: format!("http://{}", w.admin_addr().expect("admin enabled")),
        _warren: Some(w),
        _dir: Some(dir),
    }
}

impl Broker {
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let url = format!("{}{}", self.base, path);
        common::http(method, &url, Some(("guest", "guest")), body).await
    }

    async fn get(&self, path: &str) -> Value {
        let (status, v) = self.call("GET", path, None).await;
        assert_eq!(status, 200, "GET {path}: {v}");
        v
    }

    /// A 2xx answer, or the test fails.
    async fn ok(&self, method: &str, path: &str, body: Value) -> u16 {
        let (status, v) = self.call(method, path, Some(body)).await;
        assert!(
            (200..300).contains(&status),
            "{method} {path}: {status} {v}"
        );
        status
    }

    /// A user with a password and full permissions in `/`.
    async fn user(&self, name: &str) {
        self.ok(
            "PUT",
            &format!("/api/users/{name}"),
            json!({"password": "pw", "tags": ""}),
        )
        .await;
        self.ok(
            "PUT",
            &format!("/api/permissions/%2F/{name}"),
            json!({"configure": ".*", "write": ".*", "read": ".*"}),
        )
        .await;
    }

    fn uri(&self, user: &str, pass: &str) -> String {
        format!("amqp://{user}:{pass}@{}/%2f", self.amqp)
    }

    async fn connect(&self, user: &str, pass: &str) -> lapin::Result<Connection> {
        t(Connection::connect(&self.uri(user, pass), props())).await
    }
}

fn message(e: &lapin::Error) -> String {
    match e {
        lapin::Error::ProtocolError(p) => p.get_message().to_string(),
        other => format!("{other:?}"),
    }
}

/// Publish with confirms on; the channel error if the broker closed the channel.
async fn publish(ch: &Channel, exchange: &str, key: &str) -> Result<(), lapin::Error> {
    let confirm = t(ch.basic_publish(
        exchange,
        key,
        BasicPublishOptions::default(),
        b"m",
        BasicProperties::default(),
    ))
    .await?;
    t(confirm).await.map(drop)
}

async fn confirm_channel(conn: &Connection) -> Channel {
    let ch = t(conn.create_channel()).await.expect("channel");
    t(ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    ch
}

async fn bind(ch: &Channel, queue: &str, exchange: &str, key: &str) -> lapin::Result<()> {
    t(ch.queue_bind(
        queue,
        exchange,
        key,
        QueueBindOptions::default(),
        FieldTable::default(),
    ))
    .await
}

// ------------------------------------------------------------ topic permissions

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_permissions_limit_publish_and_bind_keys() {
    let b = start().await;
    b.user("alice").await;
    b.ok(
        "PUT",
        "/api/topic-permissions/%2F/alice",
        json!({"exchange": "amq.topic", "write": "^{username}\\.", "read": "^{username}\\.|^shared\\."}),
    )
    .await;
    let listed = b.get("/api/topic-permissions").await;
    assert_eq!(
        listed,
        json!([{"user": "alice", "vhost": "/", "exchange": "amq.topic",
                "write": "^{username}\\.", "read": "^{username}\\.|^shared\\."}])
    );
    assert_eq!(b.get("/api/topic-permissions/%2F/alice").await, listed);
    assert_eq!(b.get("/api/topic-permissions/%2F").await, listed);
    assert_eq!(b.get("/api/users/alice/topic-permissions").await, listed);
    assert_eq!(b.get("/api/vhosts/%2F/topic-permissions").await, listed);
    assert_eq!(
        b.call("GET", "/api/topic-permissions/%2F/guest", None)
            .await
            .0,
        404
    );

    let conn = b.connect("alice", "pw").await.expect("alice connects");
    let ch = confirm_channel(&conn).await;
    publish(&ch, "amq.topic", "alice.orders")
        .await
        .expect("own prefix is allowed");
    // Not a topic exchange: topic permissions do not apply.
    publish(&ch, "amq.direct", "bob.orders")
        .await
        .expect("direct exchange");
    let e = publish(&ch, "amq.topic", "bob.orders")
        .await
        .expect_err("other prefix refused");
    assert_eq!(code(&e), Some(403), "{e:?}");
    assert_eq!(
        message(&e),
        "ACCESS_REFUSED - write access to topic 'bob.orders' in exchange 'amq.topic' in vhost '/' refused for user 'alice'"
    );

    let ch = t(conn.create_channel()).await.expect("channel");
    let q = common::temp_queue(&ch, "topic-perm").await;
    bind(&ch, &q, "amq.topic", "alice.#")
        .await
        .expect("own keys");
    bind(&ch, &q, "amq.topic", "shared.x")
        .await
        .expect("shared keys");
    bind(&ch, &q, "amq.direct", "anything")
        .await
        .expect("not topic");
    let e = bind(&ch, &q, "amq.topic", "bob.#")
        .await
        .expect_err("read refused");
    assert_eq!(code(&e), Some(403));
    assert_eq!(
        message(&e),
        "ACCESS_REFUSED - read access to topic 'bob.#' in exchange 'amq.topic' in vhost '/' refused for user 'alice'"
    );
    let ch = t(conn.create_channel()).await.expect("channel");
    let e = t(ch.queue_unbind(&q, "amq.topic", "bob.#", FieldTable::default()))
        .await
        .expect_err("unbind is a read too");
    assert_eq!(code(&e), Some(403));

    // The admin API's publish and bind act as the user: checked the same way.
    b.ok(
        "PUT",
        "/api/users/alice",
        json!({"password": "pw", "tags": "management"}),
    )
    .await;
    let as_alice = |method: &'static str, path: String, body: Value| {
        let url = format!("{}{path}", b.base);
        async move { common::http(method, &url, Some(("alice", "pw")), Some(body)).await }
    };
    let publish_body = |key: &str| json!({"routing_key": key, "payload": "x", "payload_encoding": "string", "properties": {}});
    let path = "/api/exchanges/%2F/amq.topic/publish".to_string();
    let (status, body) = as_alice("POST", path.clone(), publish_body("bob.x")).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(
        body["reason"],
        "403 ACCESS_REFUSED - write access to topic 'bob.x' in exchange 'amq.topic' in vhost '/' refused for user 'alice'"
    );
    assert_eq!(as_alice("POST", path, publish_body("alice.x")).await.0, 200);
    let path = format!("/api/bindings/%2F/e/amq.topic/q/{q}");
    let (status, _) = as_alice("POST", path.clone(), json!({"routing_key": "bob.*"})).await;
    assert_eq!(status, 401);
    let (status, _) = as_alice("POST", path, json!({"routing_key": "alice.*"})).await;
    assert_eq!(status, 201);

    // Other users are not concerned; cleared, alice may publish anywhere again.
    let guest = b.connect("guest", "guest").await.expect("guest");
    publish(&confirm_channel(&guest).await, "amq.topic", "bob.orders")
        .await
        .expect("guest has no topic permission");
    assert_eq!(
        b.call("DELETE", "/api/topic-permissions/%2F/alice", None)
            .await
            .0,
        204
    );
    assert_eq!(b.get("/api/topic-permissions").await, json!([]));
    let ch = confirm_channel(&conn).await;
    publish(&ch, "amq.topic", "bob.orders")
        .await
        .expect("no topic permission left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_id_comes_from_the_client_properties() {
    let b = start().await;
    b.user("dev").await;
    b.ok(
        "PUT",
        "/api/exchanges/%2F/devices",
        json!({"type": "topic", "durable": false}),
    )
    .await;
    b.ok(
        "PUT",
        "/api/topic-permissions/%2F/dev",
        json!({"exchange": "devices", "write": "^{vhost}\\.{client_id}\\.", "read": ".*"}),
    )
    .await;
    let mut p = props();
    p.client_properties
        .insert("client_id".into(), AMQPValue::LongString("sensor-1".into()));
    let conn = t(Connection::connect(&b.uri("dev", "pw"), p))
        .await
        .expect("connect");
    let ch = confirm_channel(&conn).await;
    publish(&ch, "devices", "/.sensor-1.temp")
        .await
        .expect("own client id");
    let e = publish(&ch, "devices", "/.sensor-2.temp")
        .await
        .expect_err("another client id");
    assert_eq!(code(&e), Some(403));
    // Without a client_id the placeholder expands to nothing.
    let anon = b.connect("dev", "pw").await.expect("connect");
    let e = publish(&confirm_channel(&anon).await, "devices", "/.sensor-1.temp")
        .await
        .expect_err("no client id");
    assert_eq!(code(&e), Some(403));
    // A bad regex is a 400.
    let (status, _) = b
        .call(
            "PUT",
            "/api/topic-permissions/%2F/dev",
            Some(json!({"exchange": "x", "write": "(", "read": ".*"})),
        )
        .await;
    assert_eq!(status, 400);
}

// ------------------------------------------------------------ limits

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vhost_limits_refuse_connections_and_queues() {
    let b = start().await;
    assert_eq!(
        b.ok(
            "PUT",
            "/api/vhost-limits/%2F/max-connections",
            json!({"value": 1})
        )
        .await,
        204
    );
    b.ok(
        "PUT",
        "/api/vhost-limits/%2F/max-queues",
        json!({"value": 2}),
    )
    .await;
    assert_eq!(
        b.get("/api/vhost-limits").await,
        json!([{"vhost": "/", "value": {"max-connections": 1, "max-queues": 2}}])
    );
    assert_eq!(
        b.get("/api/vhost-limits/%2F").await,
        b.get("/api/vhost-limits").await
    );
    let (status, _) = b
        .call(
            "PUT",
            "/api/vhost-limits/%2F/max-channels",
            Some(json!({"value": 1})),
        )
        .await;
    assert_eq!(status, 400, "not a vhost limit");
    assert_eq!(
        b.call(
            "PUT",
            "/api/vhost-limits/nowhere/max-queues",
            Some(json!({"value": 1}))
        )
        .await
        .0,
        404
    );

    let first = b.connect("guest", "guest").await.expect("first connection");
    let e = b
        .connect("guest", "guest")
        .await
        .expect_err("second connection");
    assert_eq!(code(&e), Some(530), "{e:?}");
    assert_eq!(
        message(&e),
        "NOT_ALLOWED - access to vhost '/' refused for user 'guest': connection limit (1) is reached"
    );

    let ch = t(first.create_channel()).await.expect("channel");
    for q in ["lim.a", "lim.b"] {
        common::declare_queue(&ch, q).await;
    }
    let e = t(ch.queue_declare(
        "lim.c",
        QueueDeclareOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect_err("third queue");
    assert_eq!(code(&e), Some(406));
    assert_eq!(
        message(&e),
        "PRECONDITION_FAILED - cannot declare queue 'lim.c': queue limit in vhost '/' (2) is reached"
    );
    // The admin API door is limited too.
    assert_eq!(
        b.call("PUT", "/api/queues/%2F/lim.d", Some(json!({})))
            .await
            .0,
        400
    );

    // Cleared (or negative: no limit), both are allowed again.
    b.ok(
        "PUT",
        "/api/vhost-limits/%2F/max-queues",
        json!({"value": -1}),
    )
    .await;
    assert_eq!(
        b.call("DELETE", "/api/vhost-limits/%2F/max-connections", None)
            .await
            .0,
        204
    );
    let ch = t(first.create_channel()).await.expect("channel");
    common::declare_queue(&ch, "lim.c").await;
    let second = b
        .connect("guest", "guest")
        .await
        .expect("no connection limit");
    let _ = second.close(200, "bye").await;
    assert_eq!(
        b.get("/api/vhost-limits").await,
        json!([{"vhost": "/", "value": {"max-queues": -1}}])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_limits_refuse_connections_and_channels() {
    let b = start().await;
    b.user("carol").await;
    b.ok(
        "PUT",
        "/api/user-limits/carol/max-connections",
        json!({"value": 1}),
    )
    .await;
    b.ok(
        "PUT",
        "/api/user-limits/carol/max-channels",
        json!({"value": 2}),
    )
    .await;
    assert_eq!(
        b.get("/api/user-limits").await,
        json!([{"user": "carol", "value": {"max-channels": 2, "max-connections": 1}}])
    );
    assert_eq!(
        b.get("/api/users/carol").await["limits"],
        json!({"max-channels": 2, "max-connections": 1})
    );
    assert_eq!(
        b.call(
            "PUT",
            "/api/user-limits/nobody/max-channels",
            Some(json!({"value": 1}))
        )
        .await
        .0,
        404
    );

    let conn = b.connect("carol", "pw").await.expect("first connection");
    let e = b
        .connect("carol", "pw")
        .await
        .expect_err("second connection");
    assert_eq!(code(&e), Some(530));
    assert_eq!(
        message(&e),
        "NOT_ALLOWED - connection refused for user 'carol': user connection limit (1) is reached"
    );
    // Others are not limited.
    let guest = b.connect("guest", "guest").await.expect("guest");
    let _ = guest.close(200, "bye").await;

    let _c1 = t(conn.create_channel()).await.expect("channel 1");
    let c2 = t(conn.create_channel()).await.expect("channel 2");
    // A closed channel frees its place.
    t(c2.close(200, "bye")).await.expect("close");
    let _c2 = t(conn.create_channel()).await.expect("channel 2 again");
    let closed = common::watch_connection(&conn);
    let e = t(conn.create_channel()).await.expect_err("channel 3");
    assert_eq!(code(&e), Some(530), "{e:?}");
    assert_eq!(
        message(&e),
        "NOT_ALLOWED - number of channels opened for user 'carol' has reached the maximum allowed user limit of (2)"
    );
    common::expect_closed_with(closed, 530).await;

    // The connection went with it; cleared, carol connects twice.
    assert_eq!(
        b.call("DELETE", "/api/user-limits/carol/max-connections", None)
            .await
            .0,
        204
    );
    let a = b.connect("carol", "pw").await.expect("connects");
    let c = b.connect("carol", "pw").await.expect("no limit");
    let _ = a.close(200, "bye").await;
    let _ = c.close(200, "bye").await;
    assert_eq!(
        b.get("/api/user-limits/carol").await,
        json!([{"user": "carol", "value": {"max-channels": 2}}])
    );
}

/// Run `warren <args>` (the CLI) against `base`; (success, stdout, stderr).
async fn cli(base: &str, args: &[&str]) -> (bool, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_warren"));
    cmd.arg("--url").arg(base).args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("run warren"))
        .await
        .expect("task");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_sets_and_clears_limits_and_topic_permissions() {
    let b = start().await;
    b.user("erin").await;
    let base = b.base.clone();
    let (ok, out, err) = cli(
        &base,
        &[
            "set_vhost_limits",
            "-p",
            "/",
            r#"{"max-connections": 10, "max-queues": 3}"#,
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert_eq!(out, "Set vhost limits for vhost '/'\n");
    assert_eq!(
        b.get("/api/vhost-limits/%2F").await,
        json!([{"vhost": "/", "value": {"max-connections": 10, "max-queues": 3}}])
    );
    // set_vhost_limits replaces: max-connections goes.
    assert!(
        cli(&base, &["set-vhost-limits", r#"{"max-queues": 4}"#])
            .await
            .0
    );
    assert_eq!(
        b.get("/api/vhost-limits/%2F").await,
        json!([{"vhost": "/", "value": {"max-queues": 4}}])
    );
    let (ok, listed, _) = cli(&base, &["list_vhost_limits"]).await;
    assert!(ok && listed.contains("max-queues"), "{listed}");
    assert!(cli(&base, &["clear_vhost_limits", "-p", "/"]).await.0);
    assert_eq!(b.get("/api/vhost-limits").await, json!([]));
    let (ok, _, err) = cli(&base, &["set_vhost_limits", r#"{"max-bananas": 1}"#]).await;
    assert!(!ok && err.contains("400"), "{err}");

    assert!(
        cli(
            &base,
            &[
                "set_user_limits",
                "erin",
                r#"{"max-connections": 2, "max-channels": 5}"#
            ]
        )
        .await
        .0
    );
    assert_eq!(
        b.get("/api/user-limits/erin").await,
        json!([{"user": "erin", "value": {"max-channels": 5, "max-connections": 2}}])
    );
    assert!(
        cli(&base, &["clear_user_limits", "erin", "max-channels"])
            .await
            .0
    );
    assert_eq!(
        b.get("/api/user-limits/erin").await,
        json!([{"user": "erin", "value": {"max-connections": 2}}])
    );
    assert!(cli(&base, &["clear_user_limits", "erin", "all"]).await.0);
    assert_eq!(b.get("/api/user-limits").await, json!([]));

    assert!(
        cli(
            &base,
            &[
                "set_topic_permissions",
                "-p",
                "/",
                "erin",
                "amq.topic",
                "^e\\.",
                "^e\\."
            ]
        )
        .await
        .0
    );
    assert_eq!(
        b.get("/api/topic-permissions/%2F/erin").await,
        json!([{"user": "erin", "vhost": "/", "exchange": "amq.topic", "write": "^e\\.", "read": "^e\\."}])
    );
    assert!(
        cli(&base, &["clear_topic_permissions", "erin", "amq.topic"])
            .await
            .0
    );
    assert_eq!(b.get("/api/topic-permissions").await, json!([]));
}

// ------------------------------------------------------------ definitions, restart

/// A broker process with the admin API on `dir`; (child, admin base URL).
async fn spawn_process(dir: &std::path::Path) -> (std::process::Child, String) {
    let free = || common::free_port("127.0.0.1");
    let (amqp, admin) = (free(), free());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_warren"))
        .env("WARREN_AMQP_PORT", amqp.to_string())
        .env("WARREN_ADMIN_PORT", admin.to_string())
        .env("WARREN_BIND", "127.0.0.1")
        .env("WARREN_PROMETHEUS_ENABLED", "false")
        .env("WARREN_DATA_DIR", dir)
        .env("WARREN_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn warren");
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", admin))
            .await
            .is_ok()
        {
            return (child, format!("http://127.0.0.1:{admin}"));
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("warren did not start");
}

fn stop_process(mut child: std::process::Child) {
    common::process::stop_cleanly(&mut child);
}

/// The tenancy parts of a definitions export, for comparison.
fn tenancy_of(defs: &Value) -> Value {
    let users: Vec<Value> = defs["users"]
        .as_array()
        .expect("users")
        .iter()
        .map(|u| json!({"name": u["name"], "limits": u["limits"]}))
        .collect();
    json!({
        "users": users,
        "topic_permissions": defs["topic_permissions"],
        "parameters": defs["parameters"],
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenancy_survives_restart_and_round_trips_through_definitions() {
    let dir = std::env::temp_dir().join(common::uniq("warren-tenancy-restart"));
    let _ = std::fs::remove_dir_all(&dir);
    let (child, base) = spawn_process(&dir).await;
    let b = Broker {
        _warren: None,
        amqp: ([127, 0, 0, 1], 0).into(),
        base,
        _dir: None,
    };
    b.user("frank").await;
    b.ok("PUT", "/api/vhosts/tenant", json!({})).await;
    b.ok(
        "PUT",
        "/api/permissions/tenant/frank",
        json!({"configure": ".*", "write": ".*", "read": ".*"}),
    )
    .await;
    b.ok(
        "PUT",
        "/api/vhost-limits/tenant/max-connections",
        json!({"value": 5}),
    )
    .await;
    b.ok(
        "PUT",
        "/api/vhost-limits/tenant/max-queues",
        json!({"value": 9}),
    )
    .await;
    b.ok(
        "PUT",
        "/api/user-limits/frank/max-channels",
        json!({"value": 7}),
    )
    .await;
    b.ok(
        "PUT",
        "/api/topic-permissions/tenant/frank",
        json!({"exchange": "amq.topic", "write": "^f", "read": ".*"}),
    )
    .await;
    b.ok(
        "PUT",
        "/api/operator-policies/tenant/cap",
        json!({"pattern": ".*", "apply-to": "queues", "definition": {"max-length": 10}}),
    )
    .await;
    let before = b.get("/api/definitions").await;
    let tenancy = tenancy_of(&before);
    assert_eq!(
        tenancy["parameters"],
        json!([{"value": {"max-connections": 5, "max-queues": 9}, "vhost": "tenant",
                "component": "vhost-limits", "name": "limits"}])
    );
    assert_eq!(
        tenancy["topic_permissions"],
        json!([{"user": "frank", "vhost": "tenant", "exchange": "amq.topic", "write": "^f", "read": ".*"}])
    );
    assert!(
        tenancy["users"]
            .as_array()
            .expect("users")
            .contains(&json!({"name": "frank", "limits": {"max-channels": 7}})),
        "{tenancy}"
    );
    stop_process(child);

    let (child, base) = spawn_process(&dir).await;
    let b = Broker { base, ..b };
    assert_eq!(tenancy_of(&b.get("/api/definitions").await), tenancy);
    assert_eq!(
        b.get("/api/operator-policies/tenant/cap").await["definition"],
        json!({"max-length": 10})
    );
    stop_process(child);
    let _ = std::fs::remove_dir_all(&dir);

    // Imported into a fresh broker, the same tenancy comes back out.
    let fresh = start().await;
    assert_eq!(
        fresh.ok("POST", "/api/definitions", before.clone()).await,
        204
    );
    assert_eq!(tenancy_of(&fresh.get("/api/definitions").await), tenancy);
}

// ------------------------------------------------------------ operator policies

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_policy_caps_what_a_user_policy_sets() {
    let b = start().await;
    b.ok(
        "PUT",
        "/api/policies/%2F/generous",
        json!({"pattern": "^cap\\.", "apply-to": "queues", "definition": {"max-length": 100, "message-ttl": 60000}}),
    )
    .await;
    b.ok(
        "PUT",
        "/api/operator-policies/%2F/cap",
        json!({"pattern": "^cap\\.", "apply-to": "queues", "definition": {"max-length": 2, "message-ttl": 600000}}),
    )
    .await;
    // Operator policies take numeric caps only.
    assert_eq!(
        b.call(
            "PUT",
            "/api/operator-policies/%2F/bad",
            Some(json!({"pattern": ".*", "definition": {"dead-letter-exchange": "x"}}))
        )
        .await
        .0,
        400
    );
    assert_eq!(
        b.get("/api/operator-policies")
            .await
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    assert_eq!(b.get("/api/operator-policies/%2F").await[0]["name"], "cap");

    let conn = b.connect("guest", "guest").await.expect("connect");
    let ch = confirm_channel(&conn).await;
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(50));
    t(ch.queue_declare("cap.q", QueueDeclareOptions::default(), args))
        .await
        .expect("declare");
    for _ in 0..5 {
        publish(&ch, "", "cap.q").await.expect("publish");
    }
    assert_eq!(common::message_count(&ch, "cap.q").await, 2);
    let q = b.get("/api/queues/%2F/cap.q").await;
    assert_eq!(q["policy"], "generous");
    assert_eq!(q["operator_policy"], "cap");
    assert_eq!(
        q["effective_policy_definition"],
        json!({"max-length": 2, "message-ttl": 60000})
    );

    // Without the operator policy the user policy (and the argument) apply.
    assert_eq!(
        b.call("DELETE", "/api/operator-policies/%2F/cap", None)
            .await
            .0,
        204
    );
    for _ in 0..5 {
        publish(&ch, "", "cap.q").await.expect("publish");
    }
    assert_eq!(common::message_count(&ch, "cap.q").await, 7);
    let q = b.get("/api/queues/%2F/cap.q").await;
    assert_eq!(q["operator_policy"], Value::Null);
    assert_eq!(q["effective_policy_definition"]["max-length"], 100);
}

// ------------------------------------------------------------ CC and BCC

fn keys(items: &[&str]) -> AMQPValue {
    AMQPValue::FieldArray(FieldArray::from(
        items
            .iter()
            .map(|k| AMQPValue::LongString(LongString::from(*k)))
            .collect::<Vec<_>>(),
    ))
}

/// The headers of the one message in `queue` (none left behind).
async fn only_message_headers(ch: &Channel, queue: &str) -> FieldTable {
    let m = t(ch.basic_get(queue, BasicGetOptions { no_ack: true }))
        .await
        .expect("basic.get")
        .unwrap_or_else(|| panic!("{queue} got nothing"));
    assert_eq!(m.message_count, 0, "{queue} got more than one copy");
    m.properties.headers().clone().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cc_and_bcc_route_once_to_each_queue_and_bcc_is_removed() {
    let b = start().await;
    let conn = b.connect("guest", "guest").await.expect("connect");
    let ch = confirm_channel(&conn).await;
    let queues: Vec<String> = ["a", "b", "c", "d"]
        .iter()
        .map(|k| common::uniq(&format!("cc-{k}")))
        .collect();
    for (q, key) in queues.iter().zip(["ka", "kb", "kc", "kd"]) {
        common::declare_queue(&ch, q).await;
        bind(&ch, q, "amq.direct", key).await.expect("bind");
    }
    let mut headers = FieldTable::default();
    headers.insert("CC".into(), keys(&["kb", "ka"]));
    headers.insert("BCC".into(), keys(&["kc", "kb"]));
    headers.insert("other".into(), AMQPValue::LongString("x".into()));
    let confirm = t(ch.basic_publish(
        "amq.direct",
        "ka",
        BasicPublishOptions::default(),
        b"cc",
        BasicProperties::default().with_headers(headers),
    ))
    .await
    .expect("publish");
    t(confirm).await.expect("confirmed");
    for q in &queues[..3] {
        let h = only_message_headers(&ch, q).await;
        assert!(h.inner().contains_key("CC"), "{q}: CC stays");
        assert!(!h.inner().contains_key("BCC"), "{q}: BCC removed");
        assert!(h.inner().contains_key("other"));
    }
    assert_eq!(
        common::message_count(&ch, &queues[3]).await,
        0,
        "kd not named"
    );

    // Topic exchanges and the default exchange route with CC too.
    let mut headers = FieldTable::default();
    headers.insert("BCC".into(), keys(&[queues[1].as_str()]));
    let confirm = t(ch.basic_publish(
        "",
        &queues[0],
        BasicPublishOptions::default(),
        b"cc",
        BasicProperties::default().with_headers(headers),
    ))
    .await
    .expect("publish");
    t(confirm).await.expect("confirmed");
    only_message_headers(&ch, &queues[0]).await;
    let h = only_message_headers(&ch, &queues[1]).await;
    assert!(h.inner().is_empty(), "only BCC was there: {h:?}");

    let tq = common::uniq("cc-topic");
    common::declare_queue(&ch, &tq).await;
    bind(&ch, &tq, "amq.topic", "orders.*").await.expect("bind");
    let mut headers = FieldTable::default();
    headers.insert("CC".into(), keys(&["orders.eu", "orders.us"]));
    let confirm = t(ch.basic_publish(
        "amq.topic",
        "nothing.here",
        BasicPublishOptions::default(),
        b"cc",
        BasicProperties::default().with_headers(headers),
    ))
    .await
    .expect("publish");
    t(confirm).await.expect("confirmed");
    only_message_headers(&ch, &tq).await;

    // A CC that is not an array is refused, as RabbitMQ refuses it.
    let mut headers = FieldTable::default();
    headers.insert("CC".into(), AMQPValue::LongString("ka".into()));
    let confirm = t(ch.basic_publish(
        "amq.direct",
        "ka",
        BasicPublishOptions::default(),
        b"cc",
        BasicProperties::default().with_headers(headers),
    ))
    .await
    .expect("publish sent");
    let e = t(confirm).await.expect_err("refused");
    assert_eq!(code(&e), Some(406), "{e:?}");
}
