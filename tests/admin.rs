//! The admin HTTP API and `/metrics` against a real broker (admin enabled, port 0),
//! plus AMQP permission enforcement with lapin.

mod common;

use common::{assert_code, code, t, watch_connection};
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection};
use serde_json::{json, Value};
use std::net::SocketAddr;

struct Broker {
    /// The in-process broker (None when the broker under test is a child process).
    _warren: Option<warren::Warren>,
    amqp: SocketAddr,
    base: String,
}

async fn start() -> Broker {
    let dir = std::env::temp_dir().join(format!(
        "warren-admin-test-{}-{}",
        std::process::id(),
        common::uniq("d")
    ));
    let mut config = warren::Config::for_tests(dir);
    config.admin_enabled = true;
    let w = warren::start(config).await.expect("broker starts");
    let admin = w.admin_addr().expect("admin enabled");
    Broker {
        amqp: w.amqp_addr(),
        base: format!("http://{admin}"),
        _warren: Some(w),
    }
}

const GUEST: Option<(&str, &str)> = Some(("guest", "guest"));

impl Broker {
    /// One HTTP call: (status, JSON body or Null, raw text).
    async fn call(
        &self,
        method: &str,
        path: &str,
        auth: Option<(&str, &str)>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let url = format!("{}{}", self.base, path);
        let method = method.to_string();
        let auth = auth.map(|(u, p)| {
            use base64::Engine;
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        });
        tokio::task::spawn_blocking(move || {
            let mut req = ureq::request(&method, &url);
            if let Some(a) = &auth {
                req = req.set("Authorization", a);
            }
            let res = match body {
                Some(b) => req.send_json(b),
                None => req.call(),
            };
            let resp = match res {
                Ok(r) => r,
                Err(ureq::Error::Status(_, r)) => r,
                Err(e) => panic!("{method} {url}: {e}"),
            };
            let status = resp.status();
            let text = resp.into_string().unwrap_or_default();
            (status, serde_json::from_str(&text).unwrap_or(Value::Null))
        })
        .await
        .expect("http task")
    }

    async fn get(&self, path: &str) -> Value {
        let (status, v) = self.call("GET", path, GUEST, None).await;
        assert_eq!(status, 200, "GET {path}: {v}");
        v
    }

    async fn text(&self, path: &str) -> String {
        let url = format!("{}{}", self.base, path);
        tokio::task::spawn_blocking(move || {
            ureq::get(&url)
                .call()
                .expect("metrics")
                .into_string()
                .expect("text")
        })
        .await
        .expect("task")
    }

    async fn ok(&self, method: &str, path: &str, body: Value) -> u16 {
        let (status, v) = self.call(method, path, GUEST, Some(body)).await;
        assert!(
            (200..300).contains(&status),
            "{method} {path}: {status} {v}"
        );
        status
    }

    async fn amqp(&self, user: &str, pass: &str, vhost: &str) -> lapin::Result<Connection> {
        let vhost = vhost.replace('/', "%2f");
        let uri = format!("amqp://{user}:{pass}@{}/{vhost}", self.amqp);
        t(Connection::connect(&uri, common::props())).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_failures_are_401_and_403() {
    let b = start().await;
    let (s, v) = b.call("GET", "/api/overview", None, None).await;
    assert_eq!(s, 401);
    assert_eq!(v["error"], "not_authorised");
    let (s, _) = b
        .call("GET", "/api/overview", Some(("guest", "wrong")), None)
        .await;
    assert_eq!(s, 401);
    let (s, _) = b
        .call("GET", "/api/overview", Some(("nobody", "x")), None)
        .await;
    assert_eq!(s, 401);
    // A user without management tags may not use the API at all.
    b.ok(
        "PUT",
        "/api/users/plain",
        json!({"password": "p", "tags": ""}),
    )
    .await;
    let (s, _) = b
        .call("GET", "/api/overview", Some(("plain", "p")), None)
        .await;
    assert_eq!(s, 403);
    // management: overview yes, users / definitions / nodes no.
    b.ok(
        "PUT",
        "/api/users/mgmt",
        json!({"password": "m", "tags": "management"}),
    )
    .await;
    let m = Some(("mgmt", "m"));
    assert_eq!(b.call("GET", "/api/overview", m, None).await.0, 200);
    assert_eq!(b.call("GET", "/api/whoami", m, None).await.0, 200);
    assert_eq!(b.call("GET", "/api/users", m, None).await.0, 403);
    assert_eq!(b.call("GET", "/api/definitions", m, None).await.0, 403);
    assert_eq!(b.call("GET", "/api/nodes", m, None).await.0, 403);
    assert_eq!(
        b.call("PUT", "/api/vhosts/x", m, Some(json!({}))).await.0,
        403
    );
    // Without permissions in "/" a management user sees no queues there.
    assert_eq!(b.call("GET", "/api/queues/%2F", m, None).await.0, 403);
    // The API acts as the user: resource permissions apply as on AMQP.
    b.ok(
        "PUT",
        "/api/permissions/%2F/mgmt",
        json!({"configure": "^m\\.", "write": "^m\\.", "read": "^m\\."}),
    )
    .await;
    assert_eq!(
        b.call("PUT", "/api/queues/%2F/m.q", m, Some(json!({})))
            .await
            .0,
        201
    );
    let (s, v) = b
        .call("PUT", "/api/queues/%2F/x.q", m, Some(json!({})))
        .await;
    assert_eq!(s, 403);
    assert_eq!(
        v["reason"],
        "access to queue 'x.q' in vhost '/' refused for user 'mgmt'"
    );
    b.ok("PUT", "/api/queues/%2F/x.q", json!({})).await;
    assert_eq!(
        b.call("DELETE", "/api/queues/%2F/x.q/contents", m, None)
            .await
            .0,
        403
    );
    assert_eq!(
        b.call("DELETE", "/api/queues/%2F/x.q", m, None).await.0,
        403
    );
    assert_eq!(
        b.call("DELETE", "/api/queues/%2F/m.q", m, None).await.0,
        204
    );
    let publish = json!({"properties": {}, "routing_key": "x.q", "payload": "p", "payload_encoding": "string"});
    assert_eq!(
        b.call(
            "POST",
            "/api/exchanges/%2F/amq.default/publish",
            m,
            Some(publish)
        )
        .await
        .0,
        403
    );
    // monitoring: nodes yes, users no.
    b.ok(
        "PUT",
        "/api/users/mon",
        json!({"password": "m", "tags": ["monitoring"]}),
    )
    .await;
    let mon = Some(("mon", "m"));
    assert_eq!(b.call("GET", "/api/nodes", mon, None).await.0, 200);
    assert_eq!(b.call("GET", "/api/users", mon, None).await.0, 403);
    // Unknown paths and objects: 404 with RabbitMQ's body.
    let (s, v) = b.call("GET", "/api/queues/%2F/missing", GUEST, None).await;
    assert_eq!(s, 404);
    assert_eq!(v["error"], "Object Not Found");
    // Malformed JSON: 400.
    let url = format!("{}/api/users/bad", b.base);
    let s = tokio::task::spawn_blocking(move || {
        match ureq::put(&url)
            .set("Authorization", "Basic Z3Vlc3Q6Z3Vlc3Q=")
            .send_string("{not json")
        {
            Ok(r) => r.status(),
            Err(ureq::Error::Status(c, _)) => c,
            Err(e) => panic!("{e}"),
        }
    })
    .await
    .unwrap();
    assert_eq!(s, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overview_nodes_whoami_health() {
    let b = start().await;
    let conn = b.amqp("guest", "guest", "/").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare("ov", QueueDeclareOptions::default(), FieldTable::default())
        .await
        .unwrap();
    ch.basic_publish(
        "",
        "ov",
        BasicPublishOptions::default(),
        b"x",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    // basic.publish has no reply: wait until the broker has taken the message.
    let mut o = b.get("/api/overview").await;
    for _ in 0..100 {
        if o["queue_totals"]["messages_ready"] == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        o = b.get("/api/overview").await;
    }
    assert_eq!(o["object_totals"]["connections"], 1);
    assert_eq!(o["object_totals"]["channels"], 1);
    assert_eq!(o["object_totals"]["queues"], 1);
    assert!(o["object_totals"]["exchanges"].as_u64().unwrap() >= 6);
    assert_eq!(o["queue_totals"]["messages_ready"], 1);
    assert_eq!(o["queue_totals"]["messages"], 1);
    assert_eq!(o["message_stats"]["publish"], 1);
    assert!(o["message_stats"]["publish_details"]["rate"].is_number());
    assert!(o["rabbitmq_version"].is_string());
    assert!(o["node"].as_str().unwrap().starts_with("warren@"));
    let nodes = b.get("/api/nodes").await;
    assert_eq!(nodes[0]["running"], true);
    let node = nodes[0]["name"].as_str().unwrap().to_string();
    assert_eq!(b.get(&format!("/api/nodes/{node}")).await["name"], node);
    let me = b.get("/api/whoami").await;
    assert_eq!(me["name"], "guest");
    assert_eq!(me["tags"], json!(["administrator"]));
    assert_eq!(b.get("/api/health/checks/alarms").await["status"], "ok");
    assert_eq!(b.get("/api/nodes").await[0]["mem_alarm"], false);
    assert_eq!(b.get("/api/aliveness-test/%2F").await["status"], "ok");
    assert_eq!(
        b.call("GET", "/api/aliveness-test/nope", GUEST, None)
            .await
            .0,
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vhosts_users_permissions_crud() {
    let b = start().await;
    assert_eq!(b.ok("PUT", "/api/vhosts/dev", json!({})).await, 201);
    assert_eq!(b.ok("PUT", "/api/vhosts/dev", json!({})).await, 204);
    let vhosts = b.get("/api/vhosts").await;
    let names: Vec<_> = vhosts
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].clone())
        .collect();
    assert_eq!(names, vec![json!("/"), json!("dev")]);
    // The new vhost has its amq.* exchanges.
    let ex = b.get("/api/exchanges/dev").await;
    assert!(ex
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["name"] == "amq.topic"));
    assert_eq!(b.get("/api/vhosts/dev").await["name"], "dev");

    assert_eq!(
        b.ok(
            "PUT",
            "/api/users/alice",
            json!({"password": "pw", "tags": "management"})
        )
        .await,
        201
    );
    let alice = b.get("/api/users/alice").await;
    assert_eq!(alice["hashing_algorithm"], "rabbit_password_hashing_sha256");
    assert_ne!(alice["password_hash"], "pw");
    assert_eq!(alice["tags"], json!(["management"]));
    // password_hash from RabbitMQ's docs ("test12").
    b.ok(
        "PUT",
        "/api/users/bob",
        json!({"password_hash": "kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR", "tags": "administrator"}),
    )
    .await;
    assert_eq!(
        b.call("GET", "/api/whoami", Some(("bob", "test12")), None)
            .await
            .0,
        200
    );
    let (s, _) = b
        .call("PUT", "/api/users/nopw", GUEST, Some(json!({"tags": ""})))
        .await;
    assert_eq!(s, 400);
    assert_eq!(b.get("/api/users").await.as_array().unwrap().len(), 3);

    assert_eq!(
        b.ok(
            "PUT",
            "/api/permissions/dev/alice",
            json!({"configure": "^a", "write": ".*", "read": ""})
        )
        .await,
        201
    );
    let p = b.get("/api/permissions/dev/alice").await;
    assert_eq!(p["configure"], "^a");
    assert_eq!(p["read"], "");
    assert!(b.get("/api/permissions").await.as_array().unwrap().len() >= 2);
    // guest (creator) and alice.
    assert_eq!(
        b.get("/api/vhosts/dev/permissions")
            .await
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        b.get("/api/users/alice/permissions")
            .await
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let (s, _) = b
        .call(
            "PUT",
            "/api/permissions/dev/alice",
            GUEST,
            Some(json!({"configure": "(", "write": "", "read": ""})),
        )
        .await;
    assert_eq!(s, 400);
    let (s, _) = b
        .call(
            "PUT",
            "/api/permissions/nope/alice",
            GUEST,
            Some(json!({"configure": "", "write": "", "read": ""})),
        )
        .await;
    assert_eq!(s, 400);
    // alice (management) now sees dev but not /.
    let a = Some(("alice", "pw"));
    let vs = b.call("GET", "/api/vhosts", a, None).await.1;
    assert_eq!(vs.as_array().unwrap().len(), 1);
    assert_eq!(
        b.call("DELETE", "/api/permissions/dev/alice", GUEST, None)
            .await
            .0,
        204
    );
    assert_eq!(
        b.call("GET", "/api/permissions/dev/alice", GUEST, None)
            .await
            .0,
        404
    );
    assert_eq!(
        b.call("DELETE", "/api/users/alice", GUEST, None).await.0,
        204
    );
    assert_eq!(b.call("GET", "/api/users/alice", GUEST, None).await.0, 404);
    assert_eq!(
        b.call("DELETE", "/api/vhosts/dev", GUEST, None).await.0,
        204
    );
    assert_eq!(b.call("GET", "/api/vhosts/dev", GUEST, None).await.0, 404);
    assert_eq!(
        b.call("DELETE", "/api/vhosts/dev", GUEST, None).await.0,
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchanges_queues_bindings_publish_get() {
    let b = start().await;
    assert_eq!(
        b.ok(
            "PUT",
            "/api/exchanges/%2F/logs",
            json!({"type": "topic", "durable": true})
        )
        .await,
        201
    );
    let (s, v) = b
        .call(
            "PUT",
            "/api/exchanges/%2F/logs",
            GUEST,
            Some(json!({"type": "fanout"})),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    let (s, _) = b
        .call(
            "PUT",
            "/api/exchanges/%2F/amq.nope",
            GUEST,
            Some(json!({"type": "fanout"})),
        )
        .await;
    assert_eq!(s, 403);
    assert_eq!(b.get("/api/exchanges/%2F/amq.default").await["name"], "");
    let e = b.get("/api/exchanges/%2F/logs").await;
    assert_eq!(e["type"], "topic");
    assert_eq!(e["durable"], true);
    assert!(b.get("/api/exchanges").await.as_array().unwrap().len() >= 7);

    assert_eq!(
        b.ok(
            "PUT",
            "/api/queues/%2F/errors",
            json!({"durable": false, "arguments": {"x-max-length": 100}})
        )
        .await,
        201
    );
    let q = b.get("/api/queues/%2F/errors").await;
    assert_eq!(q["durable"], false);
    assert_eq!(q["arguments"]["x-max-length"], 100);
    assert_eq!(q["state"], "running");
    assert_eq!(q["exclusive"], false);

    // Bindings.
    let (s, _) = b
        .call(
            "POST",
            "/api/bindings/%2F/e/logs/q/errors",
            GUEST,
            Some(json!({"routing_key": "*.error", "arguments": {}})),
        )
        .await;
    assert_eq!(s, 201);
    let between = b.get("/api/bindings/%2F/e/logs/q/errors").await;
    assert_eq!(between.as_array().unwrap().len(), 1);
    let key = between[0]["properties_key"].as_str().unwrap().to_string();
    assert_eq!(key, "%2A.error");
    assert_eq!(between[0]["destination_type"], "queue");
    let all = b.get("/api/bindings/%2F").await;
    // The default-exchange binding is listed too, as in RabbitMQ.
    assert!(all
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x["source"] == "" && x["destination"] == "errors"));
    assert_eq!(
        b.get("/api/queues/%2F/errors/bindings")
            .await
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        b.get("/api/exchanges/%2F/logs/bindings/source")
            .await
            .as_array()
            .unwrap()
            .len(),
        1
    );
    b.ok("PUT", "/api/exchanges/%2F/sink", json!({"type": "fanout"}))
        .await;
    let (s, _) = b
        .call(
            "POST",
            "/api/bindings/%2F/e/logs/e/sink",
            GUEST,
            Some(json!({"routing_key": "#"})),
        )
        .await;
    assert_eq!(s, 201);
    assert_eq!(
        b.get("/api/exchanges/%2F/sink/bindings/destination")
            .await
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // Publish through the API.
    let r = b
        .call(
            "POST",
            "/api/exchanges/%2F/logs/publish",
            GUEST,
            Some(json!({"properties": {"headers": {"h": 1}, "delivery_mode": 2}, "routing_key": "app.error", "payload": "boom", "payload_encoding": "string"})),
        )
        .await;
    assert_eq!(r.1, json!({"routed": true}));
    let r = b
        .call(
            "POST",
            "/api/exchanges/%2F/logs/publish",
            GUEST,
            Some(json!({"properties": {}, "routing_key": "app.info", "payload": "aGk=", "payload_encoding": "base64"})),
        )
        .await;
    assert_eq!(r.1, json!({"routed": false}));
    let r = b
        .call(
            "POST",
            "/api/exchanges/%2F/amq.default/publish",
            GUEST,
            Some(json!({"properties": {}, "routing_key": "errors", "payload": "second", "payload_encoding": "string"})),
        )
        .await;
    assert_eq!(r.1, json!({"routed": true}));
    assert_eq!(b.get("/api/queues/%2F/errors").await["messages_ready"], 2);

    // Get with requeue leaves them; ack_requeue_false removes.
    let got = b
        .call(
            "POST",
            "/api/queues/%2F/errors/get",
            GUEST,
            Some(json!({"count": 5, "ackmode": "ack_requeue_true", "encoding": "auto", "truncate": 50000})),
        )
        .await
        .1;
    assert_eq!(got.as_array().unwrap().len(), 2);
    assert_eq!(got[0]["payload"], "boom");
    assert_eq!(got[0]["routing_key"], "app.error");
    assert_eq!(got[0]["properties"]["headers"]["h"], 1);
    assert_eq!(got[0]["properties"]["delivery_mode"], 2);
    assert_eq!(got[0]["message_count"], 1);
    let q = b.get("/api/queues/%2F/errors").await;
    assert_eq!(q["messages_ready"], 2);
    assert_eq!(q["messages_unacknowledged"], 0);
    let got = b
        .call(
            "POST",
            "/api/queues/%2F/errors/get",
            GUEST,
            Some(json!({"count": 1, "ackmode": "ack_requeue_false", "encoding": "base64"})),
        )
        .await
        .1;
    assert_eq!(got[0]["payload"], "Ym9vbQ==");
    assert_eq!(got[0]["redelivered"], true);
    assert_eq!(b.get("/api/queues/%2F/errors").await["messages_ready"], 1);
    let (s, _) = b
        .call(
            "POST",
            "/api/queues/%2F/errors/get",
            GUEST,
            Some(json!({"count": 1, "ackmode": "bogus"})),
        )
        .await;
    assert_eq!(s, 400);

    // Unbind by properties key, purge, delete.
    assert_eq!(
        b.call(
            "DELETE",
            &format!("/api/bindings/%2F/e/logs/q/errors/{key}"),
            GUEST,
            None
        )
        .await
        .0,
        204
    );
    assert_eq!(b.get("/api/bindings/%2F/e/logs/q/errors").await, json!([]));
    assert_eq!(
        b.call("DELETE", "/api/queues/%2F/errors/contents", GUEST, None)
            .await
            .0,
        204
    );
    assert_eq!(b.get("/api/queues/%2F/errors").await["messages_ready"], 0);
    assert_eq!(
        b.call("DELETE", "/api/queues/%2F/errors", GUEST, None)
            .await
            .0,
        204
    );
    assert_eq!(
        b.call("GET", "/api/queues/%2F/errors", GUEST, None).await.0,
        404
    );
    assert_eq!(
        b.call("DELETE", "/api/exchanges/%2F/logs", GUEST, None)
            .await
            .0,
        204
    );
    assert_eq!(
        b.call("GET", "/api/exchanges/%2F/logs", GUEST, None)
            .await
            .0,
        404
    );
    assert!(b.get("/api/queues").await.as_array().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_channels_consumers_and_force_close() {
    let b = start().await;
    let conn = b.amqp("guest", "guest", "/").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare("cq", QueueDeclareOptions::default(), FieldTable::default())
        .await
        .unwrap();
    ch.basic_qos(7, BasicQosOptions::default()).await.unwrap();
    let _consumer = ch
        .basic_consume(
            "cq",
            "ctag",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let conns = b.get("/api/connections").await;
    assert_eq!(conns.as_array().unwrap().len(), 1);
    let c = &conns[0];
    assert_eq!(c["user"], "guest");
    assert_eq!(c["vhost"], "/");
    assert_eq!(c["channels"], 1);
    assert_eq!(c["protocol"], "AMQP 0-9-1");
    let name = c["name"].as_str().unwrap().to_string();
    let chans = b.get("/api/channels").await;
    assert_eq!(chans[0]["number"], 1);
    assert_eq!(chans[0]["consumer_count"], 1);
    let cons = b.get("/api/consumers").await;
    assert_eq!(cons[0]["consumer_tag"], "ctag");
    assert_eq!(cons[0]["queue"]["name"], "cq");
    assert_eq!(cons[0]["prefetch_count"], 7);
    assert_eq!(cons[0]["channel_details"]["connection_name"], name);
    assert_eq!(
        b.get("/api/consumers/%2F").await.as_array().unwrap().len(),
        1
    );
    assert_eq!(b.get("/api/queues/%2F/cq").await["consumers"], 1);

    let encoded: String = name
        .bytes()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                (c as char).to_string()
            } else {
                format!("%{c:02X}")
            }
        })
        .collect();
    assert_eq!(
        b.get(&format!("/api/connections/{encoded}")).await["name"],
        name
    );
    let errors = watch_connection(&conn);
    assert_eq!(
        b.call(
            "DELETE",
            &format!("/api/connections/{encoded}"),
            GUEST,
            None
        )
        .await
        .0,
        204
    );
    let e = t(errors).await.expect("connection closed");
    assert_eq!(code(&e), Some(320), "{e:?}");
    for _ in 0..50 {
        if b.get("/api/connections")
            .await
            .as_array()
            .unwrap()
            .is_empty()
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(b.get("/api/connections").await, json!([]));
    assert_eq!(
        b.call("DELETE", "/api/connections/nope", GUEST, None)
            .await
            .0,
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn definitions_export_wipe_import_round_trip() {
    let b = start().await;
    b.ok("PUT", "/api/vhosts/app", json!({})).await;
    b.ok(
        "PUT",
        "/api/users/svc",
        json!({"password": "s3cret", "tags": "management"}),
    )
    .await;
    b.ok(
        "PUT",
        "/api/permissions/app/svc",
        json!({"configure": "^svc", "write": ".*", "read": ".*"}),
    )
    .await;
    b.ok("PUT", "/api/exchanges/app/events", json!({"type": "direct", "durable": true, "arguments": {"alternate-exchange": "amq.fanout"}})).await;
    b.ok(
        "PUT",
        "/api/queues/app/jobs",
        json!({"durable": true, "arguments": {"x-message-ttl": 60000}}),
    )
    .await;
    b.ok(
        "POST",
        "/api/bindings/app/e/events/q/jobs",
        json!({"routing_key": "job"}),
    )
    .await;
    b.ok("PUT", "/api/policies/app/limit", json!({"pattern": "^jobs$", "apply-to": "queues", "priority": 1, "definition": {"max-length": 10}})).await;
    let defs = b.get("/api/definitions").await;
    for key in [
        "users",
        "vhosts",
        "permissions",
        "exchanges",
        "queues",
        "bindings",
        "policies",
    ] {
        assert!(defs[key].is_array(), "{key} missing");
    }
    assert!(defs["exchanges"]
        .as_array()
        .unwrap()
        .iter()
        .all(|e| !e["name"].as_str().unwrap().starts_with("amq.")));
    let svc_hash = defs["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "svc")
        .unwrap()["password_hash"]
        .clone();

    // Wipe.
    assert_eq!(
        b.call("DELETE", "/api/vhosts/app", GUEST, None).await.0,
        204
    );
    assert_eq!(b.call("DELETE", "/api/users/svc", GUEST, None).await.0, 204);
    assert_eq!(
        b.call("GET", "/api/queues/app/jobs", GUEST, None).await.0,
        404
    );

    // Import and compare.
    assert_eq!(b.ok("POST", "/api/definitions", defs.clone()).await, 204);
    let again = b.get("/api/definitions").await;
    for key in [
        "users",
        "vhosts",
        "permissions",
        "exchanges",
        "queues",
        "bindings",
        "policies",
    ] {
        let mut x = defs[key].as_array().unwrap().clone();
        let mut y = again[key].as_array().unwrap().clone();
        let k = |v: &Value| v.to_string();
        x.sort_by_key(k);
        y.sort_by_key(k);
        assert_eq!(x, y, "{key} differs after round trip");
    }
    assert_eq!(b.get("/api/users/svc").await["password_hash"], svc_hash);
    // The imported user logs in with the original password.
    assert_eq!(
        b.call("GET", "/api/whoami", Some(("svc", "s3cret")), None)
            .await
            .0,
        200
    );
    let conn = b
        .amqp("svc", "s3cret", "app")
        .await
        .expect("svc connects to app");
    let ch = conn.create_channel().await.unwrap();
    ch.basic_publish(
        "events",
        "job",
        BasicPublishOptions::default(),
        b"j",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    ch.queue_declare(
        "jobs",
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    assert_eq!(b.get("/api/queues/app/jobs").await["messages_ready"], 1);
    let (s, _) = b
        .call(
            "POST",
            "/api/definitions",
            GUEST,
            Some(json!({"queues": [{"name": "x"}]})),
        )
        .await;
    assert_eq!(s, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policies_apply_to_new_queues() {
    let b = start().await;
    assert_eq!(
        b.ok("PUT", "/api/policies/%2F/short", json!({"pattern": "^lim\\.", "apply-to": "queues", "priority": 0, "definition": {"max-length": 2, "message-ttl": 600000}})).await,
        201
    );
    let (s, _) = b
        .call(
            "PUT",
            "/api/policies/%2F/bad",
            GUEST,
            Some(json!({"pattern": "(", "definition": {"max-length": 1}})),
        )
        .await;
    assert_eq!(s, 400);
    let (s, _) = b
        .call(
            "PUT",
            "/api/policies/%2F/bad",
            GUEST,
            Some(json!({"pattern": ".*", "apply-to": "nope", "definition": {"max-length": 1}})),
        )
        .await;
    assert_eq!(s, 400);
    let p = b.get("/api/policies/%2F/short").await;
    assert_eq!(p["apply-to"], "queues");
    assert_eq!(p["definition"]["max-length"], 2);
    assert_eq!(b.get("/api/policies").await.as_array().unwrap().len(), 1);
    assert_eq!(
        b.get("/api/policies/%2F").await.as_array().unwrap().len(),
        1
    );

    // x-max-length 5 declared: the policy's lower 2 wins.
    b.ok(
        "PUT",
        "/api/queues/%2F/lim.a",
        json!({"arguments": {"x-max-length": 5}}),
    )
    .await;
    b.ok("PUT", "/api/queues/%2F/other", json!({})).await;
    for q in ["lim.a", "other"] {
        for i in 0..4 {
            b.ok(
                "POST",
                "/api/exchanges/%2F/amq.default/publish",
                json!({"properties": {}, "routing_key": q, "payload": format!("m{i}"), "payload_encoding": "string"}),
            )
            .await;
        }
    }
    let lim = b.get("/api/queues/%2F/lim.a").await;
    assert_eq!(lim["messages_ready"], 2);
    assert_eq!(lim["policy"], "short");
    assert_eq!(b.get("/api/queues/%2F/other").await["messages_ready"], 4);
    // A policy applies to a queue that already exists: the new limit drops heads now,
    // and deleting the policy lifts it again.
    b.ok(
        "PUT",
        "/api/policies/%2F/one",
        json!({"pattern": "^other$", "apply-to": "queues", "priority": 3, "definition": {"max-length": 1}}),
    )
    .await;
    let other = b.get("/api/queues/%2F/other").await;
    assert_eq!(other["messages_ready"], 1);
    assert_eq!(other["policy"], "one");
    let got = b
        .call(
            "POST",
            "/api/queues/%2F/other/get",
            GUEST,
            Some(json!({"count": 5, "ackmode": "ack_requeue_true"})),
        )
        .await
        .1;
    assert_eq!(got[0]["payload"], "m3");
    assert_eq!(
        b.call("DELETE", "/api/policies/%2F/one", GUEST, None)
            .await
            .0,
        204
    );
    b.ok(
        "POST",
        "/api/exchanges/%2F/amq.default/publish",
        json!({"properties": {}, "routing_key": "other", "payload": "more", "payload_encoding": "string"}),
    )
    .await;
    assert_eq!(b.get("/api/queues/%2F/other").await["messages_ready"], 2);

    // An exchange policy applies to an exchange declared before it.
    b.ok(
        "PUT",
        "/api/exchanges/%2F/unrouted",
        json!({"type": "direct"}),
    )
    .await;
    b.ok("PUT", "/api/queues/%2F/ae.catch", json!({})).await;
    b.ok(
        "POST",
        "/api/bindings/%2F/e/amq.fanout/q/ae.catch",
        json!({}),
    )
    .await;
    let publish = json!({"properties": {}, "routing_key": "nothing", "payload": "p", "payload_encoding": "string"});
    let r = b
        .call(
            "POST",
            "/api/exchanges/%2F/unrouted/publish",
            GUEST,
            Some(publish.clone()),
        )
        .await;
    assert_eq!(r.1, json!({"routed": false}));
    b.ok(
        "PUT",
        "/api/policies/%2F/ae",
        json!({"pattern": "^unrouted$", "apply-to": "exchanges", "definition": {"alternate-exchange": "amq.fanout"}}),
    )
    .await;
    let r = b
        .call(
            "POST",
            "/api/exchanges/%2F/unrouted/publish",
            GUEST,
            Some(publish),
        )
        .await;
    assert_eq!(r.1, json!({"routed": true}));
    assert_eq!(b.get("/api/queues/%2F/ae.catch").await["messages_ready"], 1);
    assert_eq!(
        b.call("DELETE", "/api/policies/%2F/short", GUEST, None)
            .await
            .0,
        204
    );
    assert_eq!(
        b.call("GET", "/api/policies/%2F/short", GUEST, None)
            .await
            .0,
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_permissions_are_enforced() {
    let b = start().await;
    b.ok("PUT", "/api/users/u", json!({"password": "p", "tags": ""}))
        .await;
    b.ok("PUT", "/api/vhosts/other", json!({})).await;
    // u may configure/read "^u\." resources and write to "^u\." and amq.default.
    b.ok(
        "PUT",
        "/api/permissions/%2F/u",
        json!({"configure": "^u\\.", "write": "^(u\\..*|amq\\.default)$", "read": "^u\\."}),
    )
    .await;
    b.ok("PUT", "/api/queues/%2F/secret", json!({})).await;
    b.ok(
        "PUT",
        "/api/exchanges/%2F/x.secret",
        json!({"type": "fanout"}),
    )
    .await;

    // 530 on a vhost without permissions.
    let e = b
        .amqp("u", "p", "other")
        .await
        .expect_err("no access to vhost");
    assert_eq!(code(&e), Some(530), "{e:?}");
    assert!(
        format!("{e:?}").contains("access to vhost 'other' refused for user 'u'"),
        "{e:?}"
    );

    let conn = b.amqp("u", "p", "/").await.expect("u connects to /");
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare("u.q", QueueDeclareOptions::default(), FieldTable::default())
        .await
        .expect("allowed declare");
    ch.basic_publish(
        "",
        "u.q",
        BasicPublishOptions::default(),
        b"ok",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    ch.basic_get("u.q", BasicGetOptions { no_ack: true })
        .await
        .expect("allowed get");

    // configure refused: declare.
    let ch = conn.create_channel().await.unwrap();
    let r = ch
        .queue_declare(
            "secret2",
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await;
    let e = r.as_ref().expect_err("declare refused");
    assert!(
        format!("{e:?}").contains("access to queue 'secret2' in vhost '/' refused for user 'u'"),
        "{e:?}"
    );
    assert_code(r, 403);
    let ch = conn.create_channel().await.unwrap();
    assert_code(
        ch.exchange_declare(
            "x.mine",
            lapin::ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await,
        403,
    );
    // Server-named queues are checked under their generated name (amq.gen-...).
    let ch = conn.create_channel().await.unwrap();
    assert_code(
        ch.queue_declare("", QueueDeclareOptions::default(), FieldTable::default())
            .await,
        403,
    );
    assert!(b
        .get("/api/queues/%2F")
        .await
        .as_array()
        .unwrap()
        .iter()
        .all(|q| !q["name"].as_str().unwrap().starts_with("amq.gen")));
    // read refused: consume and get.
    let ch = conn.create_channel().await.unwrap();
    assert_code(
        ch.basic_consume(
            "secret",
            "",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await,
        403,
    );
    let ch = conn.create_channel().await.unwrap();
    assert_code(
        ch.basic_get("secret", BasicGetOptions::default()).await,
        403,
    );
    // bind needs read on the exchange.
    let ch = conn.create_channel().await.unwrap();
    assert_code(
        ch.queue_bind(
            "u.q",
            "x.secret",
            "",
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await,
        403,
    );
    // write refused: publish closes the channel with 403.
    let ch = conn.create_channel().await.unwrap();
    let errors = common::watch_channel(&ch);
    let _ = ch
        .basic_publish(
            "x.secret",
            "",
            BasicPublishOptions::default(),
            b"no",
            BasicProperties::default(),
        )
        .await;
    let e = t(errors).await.expect("channel closed");
    assert_eq!(code(&e), Some(403), "{e:?}");
    assert!(
        format!("{e:?}")
            .contains("access to exchange 'x.secret' in vhost '/' refused for user 'u'"),
        "{e:?}"
    );
    assert_eq!(b.get("/api/queues/%2F/secret").await["messages_ready"], 0);
    // The connection survives channel errors.
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "u.q2",
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("still usable");
}

/// Parse Prometheus text format: every non-comment line is `name{labels} value`.
fn parse_metrics(text: &str) -> Vec<(String, String, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('#') {
            let mut parts = rest.split_whitespace();
            let kind = parts.next().unwrap();
            assert!(kind == "HELP" || kind == "TYPE", "bad comment: {line}");
            if kind == "TYPE" {
                let t = parts.nth(1).unwrap();
                assert!(
                    ["counter", "gauge", "untyped", "histogram", "summary"].contains(&t),
                    "{line}"
                );
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("name value");
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => {
                assert!(l.ends_with('}'), "labels: {line}");
                (n, l.trim_end_matches('}'))
            }
            None => (series, ""),
        };
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name: {line}"
        );
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        out.push((name.to_string(), labels.to_string(), v));
    }
    out
}

fn metric(m: &[(String, String, f64)], name: &str, labels: &str) -> f64 {
    m.iter()
        .find(|(n, l, _)| n == name && l == labels)
        .map(|x| x.2)
        .unwrap_or_else(|| panic!("no {name}{{{labels}}}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_move() {
    let b = start().await;
    let before = parse_metrics(&b.text("/metrics").await);
    assert_eq!(
        metric(&before, "rabbitmq_global_messages_received_total", ""),
        0.0
    );
    assert!(metric(&before, "rabbitmq_process_resident_memory_bytes", "") > 0.0);

    let conn = b.amqp("guest", "guest", "/").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare("mq", QueueDeclareOptions::default(), FieldTable::default())
        .await
        .unwrap();
    for _ in 0..3 {
        ch.basic_publish(
            "",
            "mq",
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default(),
        )
        .await
        .unwrap();
    }
    let got = ch
        .basic_get("mq", BasicGetOptions::default())
        .await
        .unwrap()
        .expect("a message");
    let _held = ch
        .basic_get("mq", BasicGetOptions::default())
        .await
        .unwrap()
        .expect("a message");
    got.ack(BasicAckOptions::default()).await.unwrap();
    // Let the ack arrive.
    for _ in 0..50 {
        let m = parse_metrics(&b.text("/metrics").await);
        if metric(&m, "rabbitmq_global_messages_acknowledged_total", "") >= 1.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let m = parse_metrics(&b.text("/metrics").await);
    assert_eq!(
        metric(&m, "rabbitmq_global_messages_received_total", ""),
        3.0
    );
    assert_eq!(
        metric(&m, "rabbitmq_global_messages_delivered_total", ""),
        2.0
    );
    assert_eq!(
        metric(&m, "rabbitmq_global_messages_acknowledged_total", ""),
        1.0
    );
    assert_eq!(metric(&m, "rabbitmq_connections", ""), 1.0);
    assert_eq!(metric(&m, "rabbitmq_channels", ""), 1.0);
    assert_eq!(metric(&m, "rabbitmq_queues", ""), 1.0);
    assert_eq!(metric(&m, "rabbitmq_consumers", ""), 0.0);
    let labels = "vhost=\"/\",queue=\"mq\"";
    assert_eq!(metric(&m, "rabbitmq_queue_messages_ready", labels), 1.0);
    assert_eq!(metric(&m, "rabbitmq_queue_messages_unacked", labels), 1.0);
    // The queue's message_stats in the API count the same flow.
    let q = b.get("/api/queues/%2F/mq").await;
    assert_eq!(q["message_stats"]["publish"], 3);
    assert_eq!(q["message_stats"]["deliver_get"], 2);
    assert_eq!(q["message_stats"]["ack"], 1);
    assert!(q["message_stats"]["ack_details"]["rate"].is_number());
}

#[test]
fn rates_are_computed_from_samples() {
    let broker = warren::broker::Broker::new(&warren::Config::default());
    let rates = warren::admin::metrics::Rates::new();
    rates.sample(&broker);
    warren::broker::Counters::add(&broker.counters.published, 100);
    std::thread::sleep(std::time::Duration::from_millis(200));
    rates.sample(&broker);
    let r = rates.global();
    assert!(r.publish > 100.0 && r.publish <= 500.0, "{r:?}");
    assert_eq!(r.ack, 0.0);
}

/// A broker process with admin enabled on `dir`; (child, amqp port, admin base URL).
async fn spawn_process(dir: &std::path::Path) -> (std::process::Child, u16, String) {
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port")
    };
    let (amqp, admin) = (free(), free());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_warren"))
        .env("WARREN_AMQP_PORT", amqp.to_string())
        .env("WARREN_ADMIN_PORT", admin.to_string())
        .env("WARREN_BIND", "127.0.0.1")
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
            return (child, amqp, format!("http://127.0.0.1:{admin}"));
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("warren did not start");
}

fn stop_process(mut child: std::process::Child) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    for _ in 0..100 {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_permissions_policies_vhosts_survive_restart() {
    let dir = std::env::temp_dir().join(format!("warren-admin-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (child, amqp, base) = spawn_process(&dir).await;
    let b = Broker {
        _warren: None,
        amqp: ([127, 0, 0, 1], amqp).into(),
        base,
    };
    b.ok("PUT", "/api/vhosts/kept", json!({})).await;
    b.ok(
        "PUT",
        "/api/users/carol",
        json!({"password": "c", "tags": "administrator"}),
    )
    .await;
    b.ok(
        "PUT",
        "/api/permissions/kept/carol",
        json!({"configure": "^c", "write": ".*", "read": ".*"}),
    )
    .await;
    b.ok(
        "PUT",
        "/api/policies/kept/lim",
        json!({"pattern": ".*", "definition": {"max-length": 3}}),
    )
    .await;
    b.ok("PUT", "/api/vhosts/gone", json!({})).await;
    assert_eq!(
        b.call("DELETE", "/api/vhosts/gone", GUEST, None).await.0,
        204
    );
    // The default user can be deleted and stays deleted.
    let carol = Some(("carol", "c"));
    assert_eq!(
        b.call("DELETE", "/api/users/guest", carol, None).await.0,
        204
    );
    stop_process(child);

    let (child, amqp, base) = spawn_process(&dir).await;
    let b = Broker {
        _warren: None,
        amqp: ([127, 0, 0, 1], amqp).into(),
        base,
    };
    assert_eq!(b.call("GET", "/api/whoami", GUEST, None).await.0, 401);
    let (s, p) = b
        .call("GET", "/api/permissions/kept/carol", carol, None)
        .await;
    assert_eq!(s, 200, "{p}");
    assert_eq!(p["configure"], "^c");
    let (_, pol) = b.call("GET", "/api/policies/kept/lim", carol, None).await;
    assert_eq!(pol["definition"]["max-length"], 3);
    assert_eq!(b.call("GET", "/api/vhosts/gone", carol, None).await.0, 404);
    b.amqp("carol", "c", "kept")
        .await
        .expect("carol connects after restart");
    stop_process(child);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_alarm_shows_in_health_check_nodes_and_metrics() {
    let dir = std::env::temp_dir().join(format!(
        "warren-admin-alarm-{}-{}",
        std::process::id(),
        common::uniq("d")
    ));
    let mut config = warren::Config::for_tests(dir);
    config.admin_enabled = true;
    config.memory_high_watermark_bytes = 1;
    let w = warren::start(config).await.expect("broker starts");
    let b = Broker {
        amqp: w.amqp_addr(),
        base: format!("http://{}", w.admin_addr().expect("admin")),
        _warren: Some(w),
    };
    let mut status = 0;
    for _ in 0..100 {
        status = b
            .call("GET", "/api/health/checks/alarms", GUEST, None)
            .await
            .0;
        if status == 503 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(status, 503);
    let (_, v) = b
        .call("GET", "/api/health/checks/alarms", GUEST, None)
        .await;
    assert_eq!(v["status"], "failed");
    assert_eq!(v["alarms"][0]["resource"], "memory");
    assert_eq!(b.get("/api/nodes").await[0]["mem_alarm"], true);
    let m = parse_metrics(&b.text("/metrics").await);
    assert_eq!(metric(&m, "rabbitmq_alarms_memory_used_watermark", ""), 1.0);
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
async fn cli_subcommands_talk_to_the_api() {
    let b = start().await;
    let base = b.base.clone();
    let (ok, out, err) = cli(&base, &["add-user", "dave", "pw", "--tags", "management"]).await;
    assert!(ok, "{err}");
    assert_eq!(out, "Added user 'dave'\n");
    assert!(
        cli(
            &base,
            &["set-permissions", "-p", "/", "dave", "^d", ".*", ".*"]
        )
        .await
        .0
    );
    assert_eq!(b.get("/api/permissions/%2F/dave").await["configure"], "^d");
    let (_, users, _) = cli(&base, &["list-users"]).await;
    assert!(users.starts_with("user   tags\n"), "{users}");
    assert!(users.contains("dave   management\n"), "{users}");

    b.ok("PUT", "/api/queues/%2F/cli.q", json!({})).await;
    b.ok(
        "POST",
        "/api/exchanges/%2F/amq.default/publish",
        json!({"properties": {}, "routing_key": "cli.q", "payload": "x", "payload_encoding": "string"}),
    )
    .await;
    let (_, queues, _) = cli(&base, &["list-queues"]).await;
    let lines: Vec<&str> = queues.lines().collect();
    assert_eq!(
        lines[0],
        "name   messages  messages_ready  messages_unacknowledged  consumers"
    );
    assert_eq!(
        lines[1],
        "cli.q  1         1               0                        0"
    );
    let (_, ex, _) = cli(&base, &["list-exchanges"]).await;
    assert!(ex.contains("amq.topic    topic"), "{ex}");
    let (_, bindings, _) = cli(&base, &["list-bindings"]).await;
    assert!(bindings.contains("cli.q"), "{bindings}");
    let (ok, conns, _) = cli(&base, &["list-connections"]).await;
    assert!(ok && conns.starts_with("name"), "{conns}");
    assert!(cli(&base, &["purge-queue", "cli.q"]).await.0);
    assert_eq!(b.get("/api/queues/%2F/cli.q").await["messages_ready"], 0);
    assert!(cli(&base, &["delete-queue", "cli.q"]).await.0);
    assert_eq!(
        b.call("GET", "/api/queues/%2F/cli.q", GUEST, None).await.0,
        404
    );
    assert!(cli(&base, &["delete-user", "dave"]).await.0);
    let (ok, _, err) = cli(&base, &["delete-user", "dave"]).await;
    assert!(!ok);
    assert!(err.contains("404"), "{err}");
    let (ok, _, err) = cli(&base, &["-u", "guest", "--password", "bad", "list-users"]).await;
    assert!(!ok);
    assert!(err.contains("401"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_listing_pages_filters_and_sorts() {
    let b = start().await;
    for (i, name) in ["orders-a", "orders-b", "orders-c", "jobs-1", "jobs-2"]
        .iter()
        .enumerate()
    {
        b.ok("PUT", &format!("/api/queues/%2F/{name}"), json!({}))
            .await;
        for _ in 0..i {
            b.ok(
                "POST",
                "/api/exchanges/%2F/amq.default/publish",
                json!({"routing_key": name, "payload": "x", "payload_encoding": "string", "properties": {}}),
            )
            .await;
        }
    }
    // Without `page` the listing stays a plain array.
    assert_eq!(b.get("/api/queues").await.as_array().unwrap().len(), 5);
    let p = b.get("/api/queues?page=2&page_size=2").await;
    assert_eq!(p["page"], 2);
    assert_eq!(p["page_count"], 3);
    assert_eq!(p["total_count"], 5);
    assert_eq!(p["filtered_count"], 5);
    assert_eq!(p["item_count"], 2);
    let names: Vec<&str> = p["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["orders-a", "orders-b"]);
    let p = b
        .get(
            "/api/queues/%2F?page=1&page_size=10&name=ORDERS&sort=messages_ready&sort_reverse=true",
        )
        .await;
    assert_eq!(p["filtered_count"], 3);
    assert_eq!(p["items"][0]["name"], "orders-c");
    assert_eq!(p["items"][0]["messages_ready"], 2);
    let p = b
        .get("/api/queues?page=1&name=%5Ejobs-%5B2-9%5D%24&use_regex=true")
        .await;
    assert_eq!(p["filtered_count"], 1);
    assert_eq!(p["items"][0]["name"], "jobs-2");
    for bad in [
        "/api/queues?page=9",
        "/api/queues?page=0",
        "/api/queues?page=1&page_size=501",
        "/api/queues?page=1&name=(&use_regex=true",
    ] {
        let (s, v) = b.call("GET", bad, GUEST, None).await;
        assert_eq!(s, 400, "{bad}: {v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_ui_is_served_beside_the_api() {
    let b = start().await;
    let base = b.base.clone();
    let (index, js, css, challenge, plain_challenge) = tokio::task::spawn_blocking(move || {
        let get = |p: &str| ureq::get(&format!("{base}{p}")).call().expect(p);
        let index = get("/");
        let js = get("/ui/app.js");
        let css = get("/ui/style.css");
        let status_and_header = |r: Result<ureq::Response, ureq::Error>| match r {
            Err(ureq::Error::Status(s, r)) => (s, r.header("www-authenticate").map(String::from)),
            other => panic!("expected 401, got {other:?}"),
        };
        let challenge = status_and_header(
            ureq::get(&format!("{base}/api/overview"))
                .set("X-Requested-With", "XMLHttpRequest")
                .call(),
        );
        let plain = status_and_header(ureq::get(&format!("{base}/api/overview")).call());
        (
            (
                index.content_type().to_string(),
                index.into_string().unwrap(),
            ),
            js.content_type().to_string(),
            css.content_type().to_string(),
            challenge,
            plain,
        )
    })
    .await
    .unwrap();
    assert_eq!(index.0, "text/html");
    assert!(index.1.contains("/ui/app.js"));
    assert_eq!(js, "text/javascript");
    assert_eq!(css, "text/css");
    // The UI's own requests get no browser password prompt; other clients do.
    assert_eq!(challenge, (401, None));
    assert_eq!(plain_challenge.0, 401);
    assert!(plain_challenge.1.unwrap().starts_with("Basic"));
    let (s, _) = b.call("GET", "/ui/missing.js", None, None).await;
    assert_eq!(s, 404);
}
