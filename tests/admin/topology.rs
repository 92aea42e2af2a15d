//! Exchanges, queues and bindings through the API (declare, list, publish, get) and
//! the queue list's paging, filtering and sorting.

use crate::helpers::*;

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
    assert_eq!(s, 401);
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
    // Missing ends have no bindings: empty lists, as RabbitMQ answers
    // (clients deleting a binding idempotently list first).
    for path in [
        "/api/bindings/%2F/e/nosuch/q/errors",
        "/api/bindings/%2F/e/logs/q/nosuch",
        "/api/bindings/%2F/e/logs/e/nosuch",
        "/api/exchanges/%2F/nosuch/bindings/source",
        "/api/queues/%2F/nosuch/bindings",
    ] {
        assert_eq!(b.get(path).await, json!([]), "{path}");
    }
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
async fn exchanges_and_connections_are_listed_in_pages() {
    let b = start().await;
    for n in ["pg-a", "pg-b", "pg-c"] {
        b.ok(
            "PUT",
            &format!("/api/exchanges/%2F/{n}"),
            json!({"type": "fanout"}),
        )
        .await;
    }
    let p = b
        .get("/api/exchanges?page=2&page_size=2&name=pg-&sort=name")
        .await;
    assert_eq!(p["filtered_count"], 3, "{p}");
    assert_eq!(p["page_count"], 2);
    assert_eq!(p["items"].as_array().map(Vec::len), Some(1));
    assert_eq!(p["items"][0]["name"], "pg-c");
    let all = b
        .get("/api/exchanges/%2F?sort=name&sort_reverse=true")
        .await;
    assert_eq!(all[0]["name"], "pg-c", "a plain array without page");
    let (status, _) = b
        .call("GET", "/api/exchanges?page=50&page_size=2", GUEST, None)
        .await;
    assert_eq!(status, 400);
    let _conn = b.amqp("guest", "guest", "/").await.expect("connect");
    let c = b.get("/api/connections?page=1&page_size=1").await;
    assert_eq!(c["total_count"], 1, "{c}");
}

/// Where RabbitMQ's API goes through an AMQP channel, its answers name the
/// channel error; an exchange declared without a type is `direct`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_errors_through_the_api_are_rabbitmqs() {
    let b = start().await;
    b.ok("PUT", "/api/exchanges/%2F/untyped", json!({})).await;
    assert_eq!(b.get("/api/exchanges/%2F/untyped").await["type"], "direct");
    let publish =
        json!({"routing_key": "k", "payload": "x", "payload_encoding": "string", "properties": {}});
    let (s, v) = b
        .call(
            "POST",
            "/api/exchanges/%2F/missing/publish",
            GUEST,
            Some(publish),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(
        v["reason"],
        "404 NOT_FOUND - no exchange 'missing' in vhost '/'"
    );
    b.ok(
        "PUT",
        "/api/queues/%2F/log",
        json!({"durable": true, "arguments": {"x-queue-type": "stream"}}),
    )
    .await;
    let get = json!({"count": 1, "ackmode": "ack_requeue_true", "encoding": "auto"});
    let (s, v) = b
        .call("POST", "/api/queues/%2F/log/get", GUEST, Some(get))
        .await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(
        v["reason"],
        "540 basic.get not supported by stream queues queue 'log' in vhost '/'"
    );
}
