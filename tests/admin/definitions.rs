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
