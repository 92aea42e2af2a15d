//! Definitions export and import: a round trip through a wiped broker.

use crate::helpers::*;

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
    publish_routes_to_jobs(&b, ("svc", "s3cret"), "app", "job").await;
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

/// `/api/definitions/{vhost}`: one vhost's topology without `vhost` fields,
/// imported into another vhost whatever vhost its items name; users and
/// vhosts in the document are ignored; a missing vhost is 404.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vhost_definitions_copy_one_vhost_into_another() {
    let b = start().await;
    b.ok("PUT", "/api/vhosts/src", json!({})).await;
    b.ok("PUT", "/api/vhosts/dst", json!({})).await;
    b.ok(
        "PUT",
        "/api/exchanges/src/events",
        json!({"type": "topic", "durable": true}),
    )
    .await;
    b.ok(
        "PUT",
        "/api/queues/src/jobs",
        json!({"durable": true, "arguments": {"x-max-length": 5}}),
    )
    .await;
    b.ok(
        "POST",
        "/api/bindings/src/e/events/q/jobs",
        json!({"routing_key": "job.#"}),
    )
    .await;
    b.ok(
        "PUT",
        "/api/policies/src/ttl",
        json!({"pattern": "^jobs$", "apply-to": "queues", "definition": {"message-ttl": 1000}}),
    )
    .await;
    b.ok(
        "PUT",
        "/api/parameters/vhost-limits/src/limits",
        json!({"value": {"max-queues": 10}}),
    )
    .await;
    // Something elsewhere that must stay out of the export.
    b.ok("PUT", "/api/queues/dst/other", json!({"durable": true}))
        .await;

    let defs = b.get("/api/definitions/src").await;
    for key in ["users", "vhosts", "permissions"] {
        assert!(defs.get(key).is_none(), "{key} in a vhost export: {defs}");
    }
    let names = |key: &str| -> Vec<String> {
        defs[key]
            .as_array()
            .unwrap_or_else(|| panic!("{key}: {defs}"))
            .iter()
            .map(|i| {
                let topology = ["queues", "exchanges", "bindings"].contains(&key);
                assert_eq!(i.get("vhost").is_none(), topology, "{key}: {i}");
                i.get("name")
                    .or(i.get("destination"))
                    .unwrap()
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    };
    assert_eq!(names("queues"), ["jobs"]);
    assert_eq!(names("exchanges"), ["events"]);
    assert_eq!(names("bindings"), ["jobs"]);
    assert_eq!(names("policies"), ["ttl"]);
    assert_eq!(defs["parameters"][0]["component"], "vhost-limits");
    assert_eq!(defs["queues"][0]["arguments"]["x-max-length"], 5);

    // A trailing slash and the download name (the UI's download link).
    let (status, _) = b
        .call(
            "GET",
            "/api/definitions/src/?download=src.json",
            GUEST,
            None,
        )
        .await;
    assert_eq!(status, 200);

    // Into dst: a user in the document is ignored, vhost fields overridden.
    let mut doc = defs.clone();
    doc["users"] = json!([{"name": "intruder", "password_hash": "", "tags": "administrator"}]);
    doc["queues"][0]["vhost"] = json!("src");
    assert_eq!(b.ok("POST", "/api/definitions/dst", doc).await, 204);
    assert_eq!(
        b.get("/api/queues/dst/jobs").await["arguments"]["x-max-length"],
        5
    );
    assert_eq!(b.get("/api/exchanges/dst/events").await["type"], "topic");
    assert_eq!(
        b.get("/api/policies/dst/ttl").await["definition"]["message-ttl"],
        1000
    );
    assert_eq!(
        b.get("/api/vhost-limits/dst").await[0]["value"]["max-queues"],
        10
    );
    let bindings = b.get("/api/bindings/dst/e/events/q/jobs").await;
    assert_eq!(bindings[0]["routing_key"], "job.#");
    assert_eq!(
        b.call("GET", "/api/users/intruder", GUEST, None).await.0,
        404
    );
    // The source is as it was; dst keeps what it had.
    assert_eq!(b.get("/api/queues/src/jobs").await["name"], "jobs");
    assert_eq!(b.get("/api/queues/dst/other").await["name"], "other");

    // Routing in dst works with the imported binding.
    publish_routes_to_jobs(&b, ("guest", "guest"), "dst", "job.1").await;

    // RabbitMQ's answers for a vhost that is not there.
    for (method, path, want, error) in [
        ("GET", "/api/definitions/nope", 400, "bad_request"),
        ("POST", "/api/definitions/nope", 404, "not_found"),
    ] {
        let (status, body) = b.call(method, path, GUEST, Some(json!({}))).await;
        assert_eq!(status, want, "{method} {path}");
        assert_eq!(body["error"], error, "{method} {path}: {body}");
        assert_eq!(body["reason"], "vhost_not_found", "{method} {path}: {body}");
    }
    let (status, _) = b
        .call(
            "POST",
            "/api/definitions/dst",
            GUEST,
            Some(json!({"queues": [1]})),
        )
        .await;
    assert_eq!(status, 400);
}

/// A message published as `user` to exchange `events` of `vhost` with `key`
/// lands in its queue `jobs` (the one message there).
async fn publish_routes_to_jobs(b: &Broker, (user, pass): (&str, &str), vhost: &str, key: &str) {
    let conn = b.amqp(user, pass, vhost).await.expect("connects");
    let ch = conn.create_channel().await.unwrap();
    ch.basic_publish(
        "events",
        key,
        BasicPublishOptions::default(),
        b"j",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    // A round trip after the publish: it has been routed.
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    ch.queue_declare("jobs", passive, FieldTable::default())
        .await
        .unwrap();
    let q = b.get(&format!("/api/queues/{vhost}/jobs")).await;
    assert_eq!(q["messages_ready"], 1);
}
