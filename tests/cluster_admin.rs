//! The management API of a cluster: changes made through any node's admin API
//! (exchanges, queues, bindings, topic permissions, limits, operator
//! policies, global parameters and the cluster name, definitions import) are
//! committed by the metadata group and seen on every node, through the API
//! and over AMQP, also by a member that was down meanwhile and by one that
//! joins later; without a majority they are answered 503; `/api/nodes` on
//! any node has every member's figures, fetched from that member.

mod common;

use common::cluster::*;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::BasicProperties;
use serde_json::{json, Value};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(10);

fn names(list: &Value, key: &str) -> Vec<String> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v[key].as_str().map(String::from))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_writes_on_one_node_are_seen_on_all() {
    let (a, b, c) = three_nodes("admin").await;

    // Exchanges, a queue and bindings (e->q, e->e) made through A's API.
    let (x, x2, q) = (common::uniq("ax"), common::uniq("ax2"), common::uniq("aq"));
    assert_eq!(
        a.put(
            &format!("/api/exchanges/%2F/{x}"),
            json!({"type": "topic", "durable": true})
        ),
        201
    );
    assert_eq!(
        a.put(
            &format!("/api/exchanges/%2F/{x2}"),
            json!({"type": "fanout"})
        ),
        201
    );
    assert_eq!(
        a.put(
            &format!("/api/queues/%2F/{q}"),
            json!({"durable": true, "arguments": {"x-max-length": 7}})
        ),
        201
    );
    let bind = json!({"routing_key": "k.#"});
    assert_eq!(
        a.send(
            "POST",
            &format!("/api/bindings/%2F/e/{x}/q/{q}"),
            Some(bind)
        ),
        201
    );
    assert_eq!(
        a.send(
            "POST",
            &format!("/api/bindings/%2F/e/{x}/e/{x2}"),
            Some(json!({"routing_key": "fan"}))
        ),
        201
    );
    for node in [&b, &c] {
        wait_passive(node, &x, &q).await;
        wait_passive(node, &x2, &q).await;
        eventually("bindings replicated", WAIT, || {
            has_binding(node, &x, &q, "k.#") && has_binding(node, &x, &x2, "fan")
        })
        .await;
        let (_, queue) = node.get(&format!("/api/queues/%2F/{q}"));
        assert_eq!(queue["arguments"]["x-max-length"], 7, "{queue}");
        // The queue's home is A, the node whose API declared it.
        assert_eq!(queue["node"], Value::String(a.name()), "{queue}");
        let (_, ex) = node.get(&format!("/api/exchanges/%2F/{x}"));
        assert_eq!(ex["type"], "topic", "{ex}");
    }

    // Unbind and delete through C's API: gone on A and B.
    assert_eq!(
        c.send(
            "DELETE",
            &format!("/api/bindings/%2F/e/{x}/e/{x2}/fan"),
            None
        ),
        204
    );
    assert_eq!(
        c.send("DELETE", &format!("/api/exchanges/%2F/{x2}"), None),
        204
    );
    for node in [&a, &b] {
        eventually("unbind and delete replicated", WAIT, || {
            !has_binding(node, &x, &x2, "fan")
                && node.get(&format!("/api/exchanges/%2F/{x2}")).0 == 404
        })
        .await;
        assert!(has_binding(node, &x, &q, "k.#"));
    }

    // Topic permissions, vhost and user limits, operator policies through B.
    let tp = json!({"exchange": "amq.topic", "write": "^w", "read": "^r"});
    assert_eq!(b.put("/api/topic-permissions/%2F/guest", tp), 201);
    assert_eq!(
        b.put("/api/vhost-limits/%2F/max-queues", json!({"value": 500})),
        204
    );
    assert_eq!(
        b.put("/api/user-limits/guest/max-channels", json!({"value": 40})),
        204
    );
    let op = json!({"pattern": "^op", "definition": {"max-length": 9}, "apply-to": "queues"});
    assert_eq!(b.put("/api/operator-policies/%2F/cap", op), 201);
    for node in [&a, &c] {
        eventually("tenancy replicated", WAIT, || {
            node.get("/api/topic-permissions/%2F/guest").1[0]["write"] == "^w"
                && node.get("/api/vhost-limits/%2F").1[0]["value"]["max-queues"] == 500
                && node.get("/api/user-limits/guest").1[0]["value"]["max-channels"] == 40
                && node.get("/api/operator-policies/%2F/cap").1["definition"]["max-length"] == 9
        })
        .await;
    }
    assert_eq!(
        b.send("DELETE", "/api/operator-policies/%2F/cap", None),
        204
    );
    assert_eq!(
        b.send("DELETE", "/api/topic-permissions/%2F/guest", None),
        204
    );
    assert_eq!(
        b.send("DELETE", "/api/vhost-limits/%2F/max-queues", None),
        204
    );
    eventually("clears replicated", WAIT, || {
        a.get("/api/operator-policies/%2F/cap").0 == 404
            && a.get("/api/topic-permissions/%2F/guest").0 == 404
            && a.get("/api/vhost-limits/%2F").1 == json!([])
    })
    .await;

    // A definitions import on B is seen on C.
    let (dx, dq) = (common::uniq("dx"), common::uniq("dq"));
    let defs = json!({
        "vhosts": [{"name": "defs-v"}],
        "users": [{"name": "defs-u", "password": "pw", "tags": "management",
                   "limits": {"max-connections": 3}}],
        "permissions": [{"vhost": "defs-v", "user": "defs-u",
                         "configure": ".*", "write": ".*", "read": ".*"}],
        "parameters": [{"vhost": "defs-v", "component": "vhost-limits",
                        "name": "limits", "value": {"max-connections": 11}}],
        "policies": [{"vhost": "defs-v", "name": "dp", "pattern": "^d",
                      "definition": {"max-length": 2}}],
        "exchanges": [{"vhost": "/", "name": dx, "type": "direct", "durable": true}],
        "queues": [{"vhost": "/", "name": dq, "durable": true}],
        "bindings": [{"vhost": "/", "source": dx, "destination": dq,
                      "destination_type": "queue", "routing_key": "dk"}],
    });
    assert_eq!(b.send("POST", "/api/definitions", Some(defs)), 204);
    wait_passive(&c, &dx, &dq).await;
    eventually("definitions replicated", WAIT, || {
        has_binding(&c, &dx, &dq, "dk")
            && names(&c.get("/api/vhosts").1, "name").contains(&"defs-v".to_string())
            && c.get("/api/users/defs-u").1["limits"]["max-connections"] == 3
            && c.get("/api/permissions/defs-v/defs-u").0 == 200
            && c.get("/api/vhost-limits/defs-v").1[0]["value"]["max-connections"] == 11
            && c.get("/api/policies/defs-v/dp").1["definition"]["max-length"] == 2
    })
    .await;
    let (_, queue) = c.get(&format!("/api/queues/%2F/{dq}"));
    assert_eq!(queue["node"], Value::String(b.name()), "{queue}");

    // The imported queue is homed on B on every node (its declare was inside
    // the import's one batch): a message published on C lands on B.
    let conn = c.connect().await;
    let ch = common::t(conn.create_channel()).await.expect("channel");
    common::t(ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    let confirm = common::t(ch.basic_publish(
        &dx,
        "dk",
        BasicPublishOptions::default(),
        b"via c",
        BasicProperties::default(),
    ))
    .await
    .expect("publish");
    assert!(common::t(confirm).await.expect("confirm").is_ack());
    let _ = conn.close(200, "bye").await;
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let conn = b.connect().await;
        let ch = common::t(conn.create_channel()).await.expect("channel");
        let count = common::t(ch.queue_declare(
            &dq,
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ))
        .await
        .expect("passive on b")
        .message_count();
        let _ = conn.close(200, "bye").await;
        if count == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the message published on C is not in B's copy of {dq} ({count})"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // An admin DELETE of the queue on B removes it everywhere.
    assert_eq!(
        b.send("DELETE", &format!("/api/queues/%2F/{dq}"), None),
        204
    );
    eventually("queue delete replicated", WAIT, || {
        a.get(&format!("/api/queues/%2F/{dq}")).0 == 404
            && c.get(&format!("/api/queues/%2F/{dq}")).0 == 404
    })
    .await;
}

/// `node`'s global parameter `name` (Null when it has none).
fn global(node: &Node, name: &str) -> Value {
    match node.get(&format!("/api/global-parameters/{name}")) {
        (200, p) => p["value"].clone(),
        _ => Value::Null,
    }
}

/// What `node` calls its cluster, through `/api/cluster-name` and the overview.
fn cluster_names(node: &Node) -> (Value, Value) {
    (
        node.get("/api/cluster-name").1["name"].clone(),
        node.get("/api/overview").1["cluster_name"].clone(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_parameters_and_the_cluster_name_are_cluster_wide() {
    let (a, b, mut c) = three_nodes("global").await;
    let farm = (json!("farm"), json!("farm"));
    // Each node names the cluster after itself until a name is set.
    assert_ne!(cluster_names(&b), farm);

    // Set through A's API: seen on B and C.
    assert_eq!(a.put("/api/cluster-name", json!({"name": "farm"})), 204);
    assert_eq!(
        a.put(
            "/api/global-parameters/gp1",
            json!({"value": {"k": [1, 2]}})
        ),
        201
    );
    assert_eq!(
        a.put("/api/global-parameters/gp2", json!({"value": "two"})),
        201
    );
    for node in [&b, &c] {
        eventually("global parameters replicated", WAIT, || {
            cluster_names(node) == farm
                && global(node, "gp1") == json!({"k": [1, 2]})
                && global(node, "gp2") == "two"
        })
        .await;
        assert_eq!(global(node, CLUSTER_NAME), "farm");
    }

    // C is down while B clears gp2 and renames the cluster, and A imports
    // gp3 with definitions.
    c.stop();
    assert_eq!(b.send("DELETE", "/api/global-parameters/gp2", None), 204);
    assert_eq!(b.put("/api/cluster-name", json!({"name": "farm-2"})), 204);
    let defs = json!({"global_parameters": [{"name": "gp3", "value": 3}]});
    assert_eq!(a.send("POST", "/api/definitions", Some(defs)), 204);
    let farm2 = (json!("farm-2"), json!("farm-2"));
    eventually("clear, rename and import seen on A and B", WAIT, || {
        a.get("/api/global-parameters/gp2").0 == 404
            && cluster_names(&a) == farm2
            && global(&b, "gp3") == 3
    })
    .await;
    // Deleting what is gone is a 404 on every node.
    assert_eq!(a.send("DELETE", "/api/global-parameters/gp2", None), 404);

    // C catches up when it is back: gp2 gone from its own store too.
    c.start().await;
    eventually("C caught up", Duration::from_secs(20), || {
        cluster_names(&c) == farm2
            && c.get("/api/global-parameters/gp2").0 == 404
            && global(&c, "gp3") == 3
            && global(&c, "gp1") == json!({"k": [1, 2]})
    })
    .await;

    // A node that joins later gets them all.
    let mut d = Node::new(4, "global");
    d.seeds = vec![a.seed()];
    d.start().await;
    eventually(
        "D joined with the global parameters",
        Duration::from_secs(20),
        || cluster_names(&d) == farm2 && global(&d, "gp1") == json!({"k": [1, 2]}),
    )
    .await;
    let (_, listed) = d.get("/api/global-parameters");
    let mut listed = names(&listed, "name");
    listed.sort();
    assert_eq!(listed, [CLUSTER_NAME, "gp1", "gp3"]);
}

const CLUSTER_NAME: &str = "cluster_name";

/// `name`'s record in `node`'s `/api/nodes`.
fn record(node: &Node, name: &str) -> Value {
    let (_, nodes) = node.get("/api/nodes");
    nodes
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["name"].as_str() == Some(name))
        .cloned()
        .unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn figures_of_every_member_and_503_without_a_majority() {
    let (mut a, mut b, c) = three_nodes("figures").await;

    // B's /api/nodes has A's and C's own figures, fetched from them: C holds
    // two AMQP connections, which only C's sockets_used counts.
    let conns = [c.connect().await, c.connect().await];
    eventually("C's figures seen from B", WAIT, || {
        let rc = record(&b, &c.name());
        rc["running"] == true
            && rc["sockets_used"] == 2
            && record(&b, &b.name())["sockets_used"] == 0
    })
    .await;
    for name in [a.name(), c.name()] {
        let r = record(&b, &name);
        for f in [
            "mem_used",
            "fd_used",
            "disk_free",
            "mem_limit",
            "processors",
        ] {
            assert!(r[f].as_u64().is_some_and(|n| n > 0), "{f} of {name}: {r}");
        }
        assert!(r["uptime"].as_u64().is_some(), "{r}");
    }
    // Each member's links to the other two, with the bytes that went over
    // them both ways (each record as its own node answers it).
    for (node, others) in [
        (a.name(), [b.name(), c.name()]),
        (b.name(), [a.name(), c.name()]),
        (c.name(), [a.name(), b.name()]),
    ] {
        let r = record(&b, &node);
        let links = r["cluster_links"].as_array().cloned().unwrap_or_default();
        let mut names: Vec<String> = links
            .iter()
            .filter_map(|l| l["name"].as_str().map(String::from))
            .collect();
        names.sort();
        let mut want = others.to_vec();
        want.sort();
        assert_eq!(names, want, "links of {node}: {r}");
        for l in &links {
            for f in ["send_bytes", "recv_bytes"] {
                assert!(l[f].as_u64() > Some(0), "{f} of {node}: {l}");
                assert_eq!(l[f], l["stats"][f], "{l}");
                assert!(
                    l["stats"][format!("{f}_details")]["rate"].is_number(),
                    "{l}"
                );
            }
        }
    }
    // One member's record on its own, fetched the same way.
    let (status, rc) = b.get(&format!("/api/nodes/{}", c.name()));
    assert_eq!(status, 200, "{rc}");
    assert_eq!(rc["sockets_used"], 2, "{rc}");
    // Its memory breakdown, asked of it too.
    let (status, mc) = b.get(&format!("/api/nodes/{}/memory", c.name()));
    assert_eq!(status, 200, "{mc}");
    let rss = mc["memory"]["total"]["rss"].as_u64().unwrap_or(0);
    assert!(rss > 0, "{mc}");
    assert!(
        mc["memory"]["other_proc"].as_u64().unwrap_or(u64::MAX) <= rss,
        "{mc}"
    );
    assert_eq!(b.get("/api/nodes/warren@nowhere/memory").0, 404);

    // B's API lists C's connections and channels (each row's node is C),
    // counts them in its overview, and closes one of them.
    let _ch = common::t(conns[0].create_channel()).await.expect("channel");
    let (status, listed) = b.get("/api/connections");
    assert_eq!(status, 200, "{listed}");
    let rows = listed.as_array().cloned().unwrap_or_default();
    assert_eq!(rows.len(), 2, "{listed}");
    assert!(
        rows.iter().all(|r| r["node"] == c.name().as_str()),
        "{listed}"
    );
    let (_, channels) = b.get("/api/channels");
    assert_eq!(channels.as_array().map(Vec::len), Some(1), "{channels}");
    assert_eq!(channels[0]["node"], c.name().as_str(), "{channels}");
    let (_, overview) = b.get("/api/overview");
    assert_eq!(overview["object_totals"]["connections"], 2, "{overview}");
    assert_eq!(overview["object_totals"]["channels"], 1, "{overview}");
    let (_, vhost) = b.get("/api/vhosts/%2F");
    assert_eq!(vhost["connections"], 2, "{vhost}");
    let states = vhost["cluster_state"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    assert_eq!(states.len(), 3, "{vhost}");
    assert!(states.values().all(|s| s == "running"), "{vhost}");
    let with_channel = rows
        .iter()
        .find(|r| r["channels"] == 1)
        .and_then(|r| r["name"].as_str())
        .expect("the connection with a channel")
        .to_string();
    let escaped = with_channel
        .replace(' ', "%20")
        .replace('>', "%3E")
        .replace(':', "%3A");
    let path = format!("/api/connections/{escaped}");
    assert_eq!(b.get(&path).0, 200);
    assert_eq!(b.send("DELETE", &path, None), 204);
    eventually("the connection closed by B's API", WAIT, || {
        !conns[0].status().connected()
    })
    .await;
    eventually("one connection left, seen from A", WAIT, || {
        a.get("/api/connections").1.as_array().map(Vec::len) == Some(1)
    })
    .await;
    for conn in conns {
        let _ = conn.close(200, "bye").await;
    }

    // A queue's counts come from its home node: three messages published on
    // A (the home) are counted by B and C, which hold none of them.
    let q = common::uniq("fq");
    assert_eq!(a.put(&format!("/api/queues/%2F/{q}"), json!({})), 201);
    wait_passive(&b, "amq.direct", &q).await;
    wait_passive(&c, "amq.direct", &q).await;
    let publish = json!({"routing_key": q, "payload": "m", "payload_encoding": "string",
                         "properties": {}});
    for _ in 0..3 {
        assert_eq!(
            a.send(
                "POST",
                "/api/exchanges/%2F/amq.default/publish",
                Some(publish.clone())
            ),
            200
        );
    }
    let (_, on_b) = b.get(&format!("/api/queues/%2F/{q}"));
    assert_eq!(on_b["messages"], 3, "{on_b}");
    assert_eq!(on_b["messages_ready"], 3, "{on_b}");
    let (_, listed) = c.get("/api/queues/%2F");
    let row = listed
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["name"].as_str() == Some(q.as_str()))
        .cloned()
        .unwrap_or(Value::Null);
    assert_eq!(row["messages"], 3, "{row}");
    let (_, paged) = c.get(&format!("/api/queues/%2F?page=1&page_size=500&name={q}"));
    assert_eq!(paged["items"][0]["messages"], 3, "{paged}");
    // So are the overview's totals.
    let (_, overview) = c.get("/api/overview");
    assert_eq!(overview["queue_totals"]["messages"], 3, "{overview}");
    assert_eq!(overview["message_stats"]["publish"], 3, "{overview}");
    let (_, vhosts) = c.get("/api/vhosts");
    let root = &vhosts[0];
    assert_eq!(root["name"], "/", "{vhosts}");
    assert_eq!(root["messages"], 3, "{vhosts}");
    assert_eq!(root["message_stats"]["publish"], 3, "{vhosts}");

    // A member that does not answer is not running, and has no figures.
    a.stop();
    eventually("A shown as not running", WAIT, || {
        let ra = record(&b, &a.name());
        ra["running"] == false && ra.get("mem_used").is_none()
    })
    .await;
    assert_eq!(record(&b, &c.name())["running"], true);
    let (status, ra) = b.get(&format!("/api/nodes/{}", a.name()));
    assert_eq!((status, &ra["running"]), (200, &Value::Bool(false)), "{ra}");
    assert_eq!(b.get("/api/nodes/warren@nowhere").0, 404);
    // With its home down, B shows its own counts of the queue (none).
    let (_, on_b) = b.get(&format!("/api/queues/%2F/{q}"));
    assert_eq!(on_b["messages"], 0, "{on_b}");

    // Without a majority, admin writes are 503 {"error": "timeout"}.
    b.stop();
    let started = std::time::Instant::now();
    let url = format!("{}/api/exchanges/%2F/{}", c.url(), common::uniq("nq"));
    let r = ureq::put(&url)
        .set("Authorization", "Basic Z3Vlc3Q6Z3Vlc3Q=")
        .send_json(json!({"type": "direct"}));
    match r {
        Err(ureq::Error::Status(503, resp)) => {
            let body: Value = resp.into_json().expect("json body");
            assert_eq!(body["error"], "timeout", "{body}");
        }
        other => panic!("expected 503, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(8));
    let q = common::uniq("nqq");
    assert_eq!(c.put(&format!("/api/queues/%2F/{q}"), json!({})), 503);
    assert_eq!(
        c.put("/api/vhost-limits/%2F/max-queues", json!({"value": 5})),
        503
    );
    let defs =
        json!({"exchanges": [{"vhost": "/", "name": common::uniq("nqd"), "type": "fanout"}]});
    assert_eq!(c.send("POST", "/api/definitions", Some(defs)), 503);
}
