//! Authentication and authorisation: 401 from the API (RabbitMQ 3.x's answer to a failed login and to a refusal alike; only the first has a `WWW-Authenticate` challenge), vhost / user / permission
//! CRUD, and AMQP permission checks (configure / write / read) with lapin.

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_failures_and_refusals_are_401() {
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
    assert_eq!(s, 401);
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
    assert_eq!(b.call("GET", "/api/users", m, None).await.0, 401);
    assert_eq!(b.call("GET", "/api/definitions", m, None).await.0, 401);
    assert_eq!(b.call("GET", "/api/nodes", m, None).await.0, 401);
    assert_eq!(
        b.call("PUT", "/api/vhosts/x", m, Some(json!({}))).await.0,
        401
    );
    // Without permissions in "/" a management user sees no queues there.
    assert_eq!(b.call("GET", "/api/queues/%2F", m, None).await.0, 401);
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
    assert_eq!(s, 401);
    assert_eq!(
        v["reason"],
        "access to queue 'x.q' in vhost '/' refused for user 'mgmt'"
    );
    b.ok("PUT", "/api/queues/%2F/x.q", json!({})).await;
    assert_eq!(
        b.call("DELETE", "/api/queues/%2F/x.q/contents", m, None)
            .await
            .0,
        401
    );
    assert_eq!(
        b.call("DELETE", "/api/queues/%2F/x.q", m, None).await.0,
        401
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
        400
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
    assert_eq!(b.call("GET", "/api/users", mon, None).await.0, 401);
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
    // No password nor hash: a user without a password (RabbitMQ's), gone again.
    let (s, _) = b
        .call("PUT", "/api/users/nopw", GUEST, Some(json!({"tags": ""})))
        .await;
    assert_eq!(s, 201);
    assert_eq!(
        b.call("DELETE", "/api/users/nopw", GUEST, None).await.0,
        204
    );
    assert_eq!(b.get("/api/users").await.as_array().unwrap().len(), 3);
    // Paged as the other listings (rabbitmqadmin's `list users --page`).
    let page = b.get("/api/users?page=1&page_size=2&sort=name").await;
    assert_eq!(
        (page["total_count"].as_u64(), page["page_count"].as_u64()),
        (Some(3), Some(2))
    );
    assert_eq!(page["items"].as_array().map(Vec::len), Some(2));

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_without_permissions_and_bulk_delete() {
    let b = start().await;
    for name in ["lone", "bare", "granted"] {
        b.ok(
            "PUT",
            &format!("/api/users/{name}"),
            json!({"password": "p", "tags": ""}),
        )
        .await;
    }
    b.ok(
        "PUT",
        "/api/permissions/%2F/granted",
        json!({"configure": ".*", "write": ".*", "read": ".*"}),
    )
    .await;
    let names = |v: &Value| -> Vec<String> {
        let mut n: Vec<String> = v
            .as_array()
            .expect("list")
            .iter()
            .filter_map(|u| u["name"].as_str().map(String::from))
            .collect();
        n.sort();
        n
    };
    let without = b.get("/api/users/without-permissions").await;
    assert_eq!(names(&without), ["bare", "lone"]);
    let (status, _) = b
        .call(
            "POST",
            "/api/users/bulk-delete",
            GUEST,
            Some(json!({"users": ["bare", "lone", "nobody"]})),
        )
        .await;
    assert_eq!(status, 204);
    assert_eq!(names(&b.get("/api/users").await), ["granted", "guest"]);
    let (status, _) = b
        .call(
            "POST",
            "/api/users/bulk-delete",
            GUEST,
            Some(json!({"users": "x"})),
        )
        .await;
    assert_eq!(status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sha512_password_hash_logs_in() {
    use base64::Engine;
    use sha2::Digest;
    let b = start().await;
    let salt = [9u8, 8, 7, 6];
    let mut h = sha2::Sha512::new();
    h.update(salt);
    h.update(b"pw512");
    let mut raw = salt.to_vec();
    raw.extend_from_slice(&h.finalize());
    let hash = base64::engine::general_purpose::STANDARD.encode(raw);
    // Without hashing_algorithm (the hash's length tells it), and with it.
    for (user, body) in [
        ("u512", json!({"password_hash": hash, "tags": ""})),
        (
            "v512",
            json!({"password_hash": hash, "hashing_algorithm": "rabbit_password_hashing_sha512", "tags": ""}),
        ),
    ] {
        b.ok("PUT", &format!("/api/users/{user}"), body).await;
        b.ok(
            "PUT",
            &format!("/api/permissions/%2F/{user}"),
            json!({"configure": ".*", "write": ".*", "read": ".*"}),
        )
        .await;
        b.amqp(user, "pw512", "/").await.expect("logs in");
        assert!(b.amqp(user, "wrong", "/").await.is_err());
    }
    assert_eq!(
        b.get("/api/users/u512").await["hashing_algorithm"],
        "rabbit_password_hashing_sha512"
    );
    let (status, _) = b
        .call(
            "PUT",
            "/api/users/w512",
            GUEST,
            Some(json!({"password_hash": hash, "hashing_algorithm": "rabbit_password_hashing_sha256"})),
        )
        .await;
    assert_eq!(status, 400, "the named algorithm must match the hash");
}

/// Login attempts are counted per protocol, failures apart: the API's
/// `/api/auth/attempts/{node}` and the `rabbitmq_auth_attempts_*` counters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_attempts_are_counted_per_protocol() {
    let b = start().await;
    let node = b.get("/api/overview").await["node"]
        .as_str()
        .expect("node")
        .to_string();
    assert!(b.amqp("guest", "wrong", "/").await.is_err());
    let _ok = b.amqp("guest", "guest", "/").await.expect("connects");
    assert_eq!(
        b.call("GET", "/api/overview", Some(("guest", "nope")), None)
            .await
            .0,
        401
    );
    let rows = b
        .get(&format!("/api/auth/attempts/{}", node.replace('@', "%40")))
        .await;
    let row = |p: &str| {
        rows.as_array()
            .expect("list")
            .iter()
            .find(|r| r["protocol"] == p)
            .cloned()
            .unwrap_or_else(|| panic!("{p} in {rows}"))
    };
    let amqp = row("amqp091");
    assert_eq!(
        (
            amqp["auth_attempts"].as_u64(),
            amqp["auth_attempts_failed"].as_u64()
        ),
        (Some(2), Some(1))
    );
    assert_eq!(amqp["auth_attempts_succeeded"], 1);
    let http = row("http");
    assert_eq!(http["auth_attempts_failed"], 1);
    assert!(
        http["auth_attempts_succeeded"].as_u64() >= Some(2),
        "{http}"
    );
    // No stream login yet: not listed, as RabbitMQ lists protocols with attempts.
    assert!(rows
        .as_array()
        .expect("list")
        .iter()
        .all(|r| r["protocol"] != "stream"));
    let m = parse_metrics(&b.text("/metrics").await);
    let labels = "protocol=\"amqp091\"";
    assert_eq!(metric(&m, "rabbitmq_auth_attempts_total", labels), 2.0);
    assert_eq!(
        metric(&m, "rabbitmq_auth_attempts_failed_total", labels),
        1.0
    );
    assert_eq!(
        b.call("GET", "/api/auth/attempts/rabbit%40elsewhere", GUEST, None)
            .await
            .0,
        404
    );
}

/// `PUT /api/users/{name}` as RabbitMQ takes it: `tags` required (or the
/// older `administrator` flag), not both a password and a hash, and neither
/// makes a user that cannot log in with a password (an existing user's
/// password is cleared).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_bodies_as_rabbitmq_takes_them() {
    let b = start().await;
    let (s, v) = b
        .call(
            "PUT",
            "/api/users/nt",
            GUEST,
            Some(json!({"password": "p"})),
        )
        .await;
    assert_eq!((s, v["reason"].as_str()), (400, Some("tags_not_present")));
    let both = json!({"password": "p", "password_hash": "", "tags": ""});
    let (s, v) = b.call("PUT", "/api/users/both", GUEST, Some(both)).await;
    assert_eq!(
        (s, v["reason"].as_str()),
        (400, Some("both_password_and_password_hash_are_provided"))
    );
    b.ok(
        "PUT",
        "/api/users/old",
        json!({"password": "p", "administrator": "true"}),
    )
    .await;
    assert_eq!(
        b.get("/api/users/old").await["tags"],
        json!(["administrator"])
    );
    assert_eq!(
        b.call("GET", "/api/whoami", Some(("old", "p")), None)
            .await
            .0,
        200
    );
    // Tags alone: the password goes.
    b.ok("PUT", "/api/users/old", json!({"tags": "management"}))
        .await;
    assert_eq!(b.get("/api/users/old").await["password_hash"], "");
    let (s, _) = b.call("GET", "/api/whoami", Some(("old", "p")), None).await;
    assert_eq!(s, 401);
    b.ok("PUT", "/api/users/nopw", json!({"tags": ""})).await;
    let (s, _) = b.call("GET", "/api/whoami", Some(("nopw", "")), None).await;
    assert_eq!(s, 401);
}
