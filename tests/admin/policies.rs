//! Policies: applied to matching queues declared afterwards.

use crate::helpers::*;

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
async fn unknown_policy_settings_are_refused_known_ones_kept() {
    let b = start().await;
    let (status, v) = b
        .call(
            "PUT",
            "/api/policies/%2F/bad",
            GUEST,
            Some(json!({"pattern": "^q$", "definition": {"foo": "bar", "max-length": 3}})),
        )
        .await;
    assert_eq!(status, 400, "{v}");
    let reason = v["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("foo are not recognised policy settings"),
        "{reason}"
    );
    assert_eq!(
        b.call("GET", "/api/policies/%2F/bad", GUEST, None).await.0,
        404
    );
    // Settings RabbitMQ knows and warren does not act on are kept.
    b.ok(
        "PUT",
        "/api/policies/%2F/mirrored",
        json!({"pattern": "^q$", "definition": {"ha-mode": "all", "queue-mode": "lazy"}}),
    )
    .await;
    let p = b.get("/api/policies/%2F/mirrored").await;
    assert_eq!(p["definition"]["ha-mode"], "all", "{p}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vhost_limits_as_runtime_parameters() {
    let b = start().await;
    let path = "/api/parameters/vhost-limits/%2F/limits";
    let created = b
        .ok(
            "PUT",
            path,
            json!({"vhost": "/", "component": "vhost-limits", "name": "limits", "value": {"max-connections": 9988}}),
        )
        .await;
    assert_eq!(created, 201);
    assert_eq!(b.get(path).await["value"]["max-connections"], 9988);
    let limits = b.get("/api/vhost-limits/%2F").await;
    assert_eq!(limits[0]["value"]["max-connections"], 9988, "{limits}");
    let all = b.get("/api/parameters").await;
    assert!(
        all.as_array()
            .is_some_and(|a| a.iter().any(|p| p["component"] == "vhost-limits")),
        "{all}"
    );
    let (status, _) = b
        .call(
            "PUT",
            path,
            GUEST,
            Some(json!({"value": {"max-nonsense": 1}})),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(b.call("DELETE", path, GUEST, None).await.0, 204);
    assert_eq!(b.call("GET", path, GUEST, None).await.0, 404);
}
