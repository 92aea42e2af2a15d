//! `POST /api/exchanges/{vhost}/{name}/trace` (the router's answer, nothing
//! published) and the charts' samples on the queue, exchange and node endpoints.

use crate::helpers::*;

async fn trace(b: &Broker, exchange: &str, body: Value) -> Value {
    let (s, v) = b
        .call(
            "POST",
            &format!("/api/exchanges/%2F/{exchange}/trace"),
            GUEST,
            Some(body),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    v
}

fn sorted(v: &Value) -> Vec<String> {
    let mut out: Vec<String> = v
        .as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_str().expect("string").to_string())
        .collect();
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_answers_like_the_router_without_publishing() {
    let b = start().await;
    for (name, kind, args) in [
        ("t-unrouted", "fanout", json!({})),
        (
            "t-topic",
            "topic",
            json!({"alternate-exchange": "t-unrouted"}),
        ),
        ("t-headers", "headers", json!({})),
        ("t-dlx", "direct", json!({})),
    ] {
        b.ok(
            "PUT",
            &format!("/api/exchanges/%2F/{name}"),
            json!({"type": kind, "arguments": args}),
        )
        .await;
    }
    for (name, args) in [
        (
            "t-eu",
            json!({"x-dead-letter-exchange": "t-dlx", "x-dead-letter-routing-key": "dead"}),
        ),
        ("t-all", json!({})),
        ("t-lost", json!({})),
        ("t-dead", json!({})),
        ("t-h", json!({})),
    ] {
        b.ok(
            "PUT",
            &format!("/api/queues/%2F/{name}"),
            json!({"arguments": args}),
        )
        .await;
    }
    for (src, dest, key, args) in [
        ("t-topic", "t-eu", "*.eu", json!({})),
        ("t-topic", "t-all", "orders.#", json!({})),
        ("t-unrouted", "t-lost", "", json!({})),
        ("t-dlx", "t-dead", "dead", json!({})),
        (
            "t-headers",
            "t-h",
            "",
            json!({"x-match": "any", "a": "1", "b": "2"}),
        ),
    ] {
        b.ok(
            "POST",
            &format!("/api/bindings/%2F/e/{src}/q/{dest}"),
            json!({"routing_key": key, "arguments": args}),
        )
        .await;
    }

    // Topic: both patterns match; the dead-letter exchange of t-eu leads to t-dead.
    let t = trace(&b, "t-topic", json!({"routing_key": "orders.eu"})).await;
    assert_eq!(sorted(&t["queues"]), ["t-all", "t-eu"], "{t}");
    assert_eq!(t["routed"], true);
    let hop = &t["hops"][0];
    assert_eq!(hop["exchange"], "t-topic");
    assert_eq!(hop["type"], "topic");
    assert_eq!(hop["matched"].as_array().map(Vec::len), Some(2), "{t}");
    let dl = &t["dead_letters"][0];
    assert_eq!(dl["queue"], "t-eu");
    assert_eq!(dl["dead_letter_exchange"], "t-dlx");
    assert_eq!(dl["routing_key"], "dead");
    assert_eq!(dl["queues"], json!(["t-dead"]));

    // No match: the alternate exchange.
    let t = trace(&b, "t-topic", json!({"routing_key": "payments"})).await;
    assert_eq!(t["hops"][0]["alternate_exchange"], "t-unrouted", "{t}");
    assert_eq!(t["queues"], json!(["t-lost"]));

    // CC / BCC keys route too.
    let t = trace(
        &b,
        "t-topic",
        json!({"routing_key": "payments", "properties": {"headers": {"BCC": ["x.eu"]}}}),
    )
    .await;
    assert_eq!(t["cc"], json!(["x.eu"]));
    assert_eq!(t["queues"], json!(["t-eu"]), "{t}");
    assert_eq!(t["hops"][0]["matched"][0]["matched_by"], "x.eu");

    // Headers: x-match any.
    let t = trace(
        &b,
        "t-headers",
        json!({"properties": {"headers": {"b": "2"}}}),
    )
    .await;
    assert_eq!(t["queues"], json!(["t-h"]), "{t}");
    let t = trace(
        &b,
        "t-headers",
        json!({"properties": {"headers": {"b": "3"}}}),
    )
    .await;
    assert_eq!(t["queues"], json!([]));
    assert_eq!(t["routed"], false);

    // The default exchange.
    let t = trace(&b, "amq.default", json!({"routing_key": "t-all"})).await;
    assert_eq!(t["queues"], json!(["t-all"]));

    // Nothing was published.
    for q in ["t-eu", "t-all", "t-lost", "t-dead", "t-h"] {
        let v = b.get(&format!("/api/queues/%2F/{q}")).await;
        assert_eq!(v["messages"], 0, "{q}");
    }

    // A policy's alternate exchange: followed by the trace, shown on the exchange.
    b.ok(
        "PUT",
        "/api/policies/%2F/t-ae",
        json!({"pattern": "^t-headers$", "apply-to": "exchanges", "definition": {"alternate-exchange": "t-unrouted"}}),
    )
    .await;
    let t = trace(
        &b,
        "t-headers",
        json!({"properties": {"headers": {"b": "3"}}}),
    )
    .await;
    assert_eq!(t["hops"][0]["alternate_exchange"], "t-unrouted", "{t}");
    assert_eq!(t["queues"], json!(["t-lost"]));
    let x = b.get("/api/exchanges/%2F/t-headers").await;
    assert_eq!(x["policy"], "t-ae");
    assert_eq!(
        x["effective_policy_definition"]["alternate-exchange"],
        "t-unrouted"
    );
    let listed = b.get("/api/exchanges/%2F").await;
    let topic = listed
        .as_array()
        .and_then(|a| a.iter().find(|x| x["name"] == "t-topic"))
        .expect("t-topic listed");
    assert_eq!(topic["policy"], Value::Null);

    let (s, _) = b
        .call(
            "POST",
            "/api/exchanges/%2F/nope/trace",
            GUEST,
            Some(json!({})),
        )
        .await;
    assert_eq!(s, 404);
    let (s, v) = b
        .call(
            "POST",
            "/api/exchanges/%2F/t-topic/trace",
            GUEST,
            Some(json!({"properties": {"headers": {"CC": "not-an-array"}}})),
        )
        .await;
    assert_eq!(s, 400, "{v}");
    let (s, _) = b
        .call(
            "POST",
            "/api/exchanges/%2F/t-topic/trace",
            None,
            Some(json!({})),
        )
        .await;
    assert_eq!(s, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_exchange_and_node_samples() {
    let b = start().await;
    b.ok("PUT", "/api/queues/%2F/c-q", json!({})).await;
    b.ok("PUT", "/api/exchanges/%2F/c-x", json!({"type": "fanout"}))
        .await;
    b.ok(
        "POST",
        "/api/bindings/%2F/e/c-x/q/c-q",
        json!({"routing_key": ""}),
    )
    .await;
    let publish = |n: usize| {
        let b = &b;
        async move {
            for _ in 0..n {
                b.ok(
                    "POST",
                    "/api/exchanges/%2F/c-x/publish",
                    json!({"routing_key": "", "payload": "x"}),
                )
                .await;
            }
        }
    };
    publish(3).await;
    let path =
        "/api/queues/%2F/c-q?lengths_age=60&lengths_incr=5&msg_rates_age=60&msg_rates_incr=5";
    // The sampler records a point every 5 s: wait for one that saw the messages.
    let mut q = Value::Null;
    for _ in 0..150 {
        q = b.get(path).await;
        if q["messages_ready_details"]["samples"][0]["sample"] == 3.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        q["messages_ready_details"]["samples"][0]["sample"], 3.0,
        "{q}"
    );
    assert_eq!(
        q["message_stats"]["publish_details"]["samples"][0]["sample"], 3.0,
        "{q}"
    );
    assert!(q["message_stats"]["publish_details"]["avg_rate"].is_number());
    assert_eq!(q["message_stats"]["dead_lettered"], 0);
    // Without a range: no samples, RabbitMQ's shape unchanged (the length
    // rates are there, as always in RabbitMQ, without samples).
    let plain = b.get("/api/queues/%2F/c-q").await;
    assert!(plain["messages_ready_details"]["rate"].is_f64(), "{plain}");
    assert!(plain["messages_ready_details"]["samples"].is_null());
    assert!(plain["message_stats"]["publish_details"]["samples"].is_null());

    // The exchange's own counters: five messages in, five routed out, and
    // samples of them once a point saw the last two.
    publish(2).await;
    let mut x = Value::Null;
    for _ in 0..150 {
        x = b
            .get("/api/exchanges/%2F/c-x?msg_rates_age=60&msg_rates_incr=5")
            .await;
        if x["message_stats"]["publish_in_details"]["samples"][0]["sample"] == 5.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let ms = &x["message_stats"];
    assert_eq!(ms["publish_in"], 5, "{x}");
    assert_eq!(ms["publish_out"], 5, "{x}");
    assert_eq!(ms["publish_in_details"]["samples"][0]["sample"], 5.0, "{x}");
    assert_eq!(
        ms["publish_out_details"]["samples"][0]["sample"], 5.0,
        "{x}"
    );
    assert!(ms["publish_in_details"]["avg_rate"].is_number(), "{x}");
    assert!(ms["publish_in_details"]["rate"].is_number(), "{x}");
    let plain = b.get("/api/exchanges/%2F/c-x").await;
    assert_eq!(plain["message_stats"]["publish_in"], 5, "{plain}");
    assert!(plain["message_stats"]["publish_in_details"]["samples"].is_null());

    let nodes = b.get("/api/nodes").await;
    let name = nodes[0]["name"].as_str().expect("node name").to_string();
    // The RabbitMQ plugins whose API this node serves, by their names.
    let plugins = nodes[0]["enabled_plugins"]
        .as_array()
        .expect("plugins")
        .clone();
    for p in [
        "rabbitmq_management",
        "rabbitmq_prometheus",
        "rabbitmq_shovel",
    ] {
        assert!(plugins.contains(&json!(p)), "{p} in {plugins:?}");
    }
    assert!(
        !plugins.contains(&json!("rabbitmq_auth_backend_oauth2")),
        "not configured"
    );
    let n = b
        .get(&format!(
            "/api/nodes/{name}?node_stats_age=60&node_stats_incr=5"
        ))
        .await;
    assert!(
        n["mem_used_details"]["samples"][0]["sample"].as_f64() > Some(0.0),
        "{n}"
    );
    assert!(n["disk_free"].as_u64() > Some(0), "{n}");
    assert!(n["sockets_used_details"]["samples"].is_array());
    let o = b
        .get("/api/overview?msg_rates_age=60&msg_rates_incr=5")
        .await;
    assert!(
        o["message_stats"]["publish_details"]["samples"].is_array(),
        "{o}"
    );

    let (s, _) = b
        .call(
            "GET",
            "/api/queues/%2F/c-q?lengths_age=abc&lengths_incr=5",
            GUEST,
            None,
        )
        .await;
    assert_eq!(s, 400);
}

/// `publish_in` / `publish_out` count where messages go: through an
/// exchange-to-exchange binding, to an alternate exchange, through the default
/// exchange, and not when nothing matches. Tracing counts nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_counters_follow_e2e_alternate_and_default_routes() {
    let b = start().await;
    b.ok("PUT", "/api/exchanges/%2F/n-ae", json!({"type": "fanout"}))
        .await;
    b.ok(
        "PUT",
        "/api/exchanges/%2F/n-in",
        json!({"type": "direct", "arguments": {"alternate-exchange": "n-ae"}}),
    )
    .await;
    b.ok("PUT", "/api/exchanges/%2F/n-mid", json!({"type": "fanout"}))
        .await;
    b.ok(
        "PUT",
        "/api/exchanges/%2F/n-none",
        json!({"type": "direct"}),
    )
    .await;
    for q in ["n-q", "n-lost"] {
        b.ok("PUT", &format!("/api/queues/%2F/{q}"), json!({}))
            .await;
    }
    for (path, key) in [
        ("e/n-in/e/n-mid", "k"),
        ("e/n-mid/q/n-q", ""),
        ("e/n-ae/q/n-lost", ""),
    ] {
        b.ok(
            "POST",
            &format!("/api/bindings/%2F/{path}"),
            json!({"routing_key": key}),
        )
        .await;
    }
    let send = |exchange: &'static str, key: &'static str| {
        let b = &b;
        async move {
            b.ok(
                "POST",
                &format!("/api/exchanges/%2F/{exchange}/publish"),
                json!({"routing_key": key, "payload": "x"}),
            )
            .await;
        }
    };
    let before = b.get("/api/exchanges/%2F/amq.default").await["message_stats"]["publish_in"]
        .as_u64()
        .expect("default exchange counts");
    for _ in 0..3 {
        send("n-in", "k").await; // n-in -> n-mid -> n-q
    }
    send("n-in", "other").await; // n-in -> n-ae -> n-lost
    send("n-none", "nothing").await; // matches nothing, no alternate
    send("amq.default", "n-q").await;
    send("amq.default", "no-such-queue").await;
    b.ok(
        "POST",
        "/api/exchanges/%2F/n-in/trace",
        json!({"routing_key": "k"}),
    )
    .await;
    let stats = |name: &'static str| {
        let b = &b;
        async move { b.get(&format!("/api/exchanges/%2F/{name}")).await["message_stats"].clone() }
    };
    let ms = stats("n-in").await;
    assert_eq!(
        (&ms["publish_in"], &ms["publish_out"], &ms["alternate_out"]),
        (&json!(4), &json!(4), &json!(1)),
        "{ms}"
    );
    let ms = stats("n-mid").await;
    assert_eq!(
        (&ms["publish_in"], &ms["publish_out"]),
        (&json!(3), &json!(3)),
        "{ms}"
    );
    let ms = stats("n-ae").await;
    assert_eq!(
        (&ms["publish_in"], &ms["publish_out"]),
        (&json!(1), &json!(1)),
        "{ms}"
    );
    let ms = stats("n-none").await;
    assert_eq!(
        (&ms["publish_in"], &ms["publish_out"]),
        (&json!(1), &json!(0)),
        "{ms}"
    );
    let ms = stats("amq.default").await;
    assert_eq!(ms["publish_in"].as_u64(), Some(before + 2), "{ms}");
    // The list carries the same counters.
    let list = b.get("/api/exchanges/%2F").await;
    let mid = list
        .as_array()
        .and_then(|l| l.iter().find(|x| x["name"] == "n-mid"))
        .expect("n-mid listed");
    assert_eq!(mid["message_stats"]["publish_out"], 3, "{mid}");
    assert!(mid["message_stats"]["publish_out_details"]["rate"].is_number());
}

/// A stream's queue, with a `lengths` range, has its size and each stored
/// consumer offset (with its lag behind the committed offset) over time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_size_and_consumer_offsets_over_time() {
    let b = start().await;
    b.ok(
        "PUT",
        "/api/queues/%2F/c-stream",
        json!({"durable": true, "arguments": {"x-queue-type": "stream"}}),
    )
    .await;
    for i in 0..5 {
        b.ok(
            "POST",
            "/api/exchanges/%2F/amq.default/publish",
            json!({"routing_key": "c-stream", "payload": format!("m{i}")}),
        )
        .await;
    }
    let w = b._warren.as_ref().expect("in-process broker");
    let q = w
        .server
        .broker
        .vhost("/")
        .expect("default vhost")
        .queue("c-stream", 0)
        .expect("the stream");
    q.stream()
        .expect("a stream log")
        .store_offset("reader-1", 2)
        .expect("offset stored");
    let path = "/api/queues/%2F/c-stream?lengths_age=60&lengths_incr=5";
    let mut v = Value::Null;
    for _ in 0..150 {
        v = b.get(path).await;
        let sampled = v["committed_offset_details"]["samples"][0]["sample"] == 5.0
            && v["consumer_offsets"][0]["lag_details"]["samples"][0]["sample"] == 3.0;
        if sampled {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        v["committed_offset_details"]["samples"][0]["sample"], 5.0,
        "{v}"
    );
    assert!(v["stream_bytes"].as_u64() > Some(0), "{v}");
    assert!(
        v["stream_bytes_details"]["samples"][0]["sample"].as_f64() > Some(0.0),
        "{v}"
    );
    assert_eq!(v["segments_details"]["samples"][0]["sample"], 1.0, "{v}");
    let c = &v["consumer_offsets"][0];
    assert_eq!(
        (&c["reference"], &c["offset"], &c["lag"]),
        (&json!("reader-1"), &json!(2), &json!(3)),
        "{v}"
    );
    assert_eq!(c["offset_details"]["samples"][0]["sample"], 2.0, "{v}");
    assert_eq!(c["lag_details"]["samples"][0]["sample"], 3.0, "{v}");
    // Without a range, the queue's JSON is as before.
    let plain = b.get("/api/queues/%2F/c-stream").await;
    assert!(plain["consumer_offsets"].is_null(), "{plain}");
}
