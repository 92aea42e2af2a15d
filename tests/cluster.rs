//! Clustering: three warren processes on 127.0.0.1, .2 and .3 form a cluster
//! through seeds; a declare and a bind on one node are committed by the
//! metadata group and visible (admin API, passive declare) on the others; a
//! restarted node catches up; `warren cluster status` / `forget-node` work;
//! with no majority a declare fails with 541 instead of hanging; a peer with
//! the wrong cookie is refused.

mod common;

use common::cluster::*;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties, ExchangeKind};
use serde_json::Value;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_replicate_metadata_catch_up_and_refuse_without_quorum() {
    let (a, mut b, mut c) = three_nodes("form").await;
    let all = [a.name(), b.name(), c.name()];
    let (_, nodes) = b.get("/api/nodes");
    let leaders: Vec<&Value> = nodes
        .as_array()
        .expect("nodes")
        .iter()
        .filter(|n| n["metadata_leader"] == Value::Bool(true))
        .collect();
    assert_eq!(leaders.len(), 1, "one metadata leader in {nodes}");
    assert_eq!(nodes.as_array().map(Vec::len), Some(3));

    // A declare and a bind on B (a follower or the leader) are seen everywhere.
    let (x, q) = (common::uniq("cx"), common::uniq("cq"));
    declare_and_bind(&b, &x, &q, "k1").await;
    for node in [&a, &b, &c] {
        wait_passive(node, &x, &q).await;
        let (status, _) = node.get(&format!("/api/exchanges/%2F/{x}"));
        assert_eq!(status, 200, "exchange on {}", node.name());
        eventually("binding replicated", Duration::from_secs(10), || {
            has_binding(node, &x, &q, "k1")
        })
        .await;
    }
    let (_, status) = a.get("/api/cluster");
    let home = status["queues"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|r| r["name"].as_str() == Some(q.as_str()))
        .map(|r| r["node"].clone());
    assert_eq!(
        home,
        Some(Value::String(b.name())),
        "queue record: {status}"
    );
    // Every node's queue JSON names that home node (RabbitMQ's `node`), and
    // lists every member with its figures (asked of that member).
    for node in [&a, &b, &c] {
        let (_, queue) = node.get(&format!("/api/queues/%2F/{q}"));
        assert_eq!(queue["node"], Value::String(b.name()), "on {}", node.name());
        let (_, nodes) = node.get("/api/nodes");
        for n in nodes.as_array().expect("nodes") {
            assert!(
                n["mem_used"].as_u64().is_some_and(|m| m > 0),
                "{n} seen from {}",
                node.name()
            );
        }
    }

    // Vhosts, users, permissions and policies made through B's admin API too.
    assert_eq!(b.put("/api/vhosts/cv", serde_json::json!({})), 201);
    let user = serde_json::json!({"password": "secret", "tags": "management"});
    assert_eq!(b.put("/api/users/cann", user), 201);
    let perm = serde_json::json!({"configure": "^c", "write": ".*", "read": ".*"});
    assert_eq!(b.put("/api/permissions/cv/cann", perm), 201);
    let policy = serde_json::json!({"pattern": "^cq", "definition": {"max-length": 5}});
    assert_eq!(b.put("/api/policies/cv/cp", policy), 201);
    for node in [&a, &c] {
        eventually("access replicated", Duration::from_secs(10), || {
            node.get("/api/vhosts/cv").0 == 200
                && node.get("/api/users/cann").1["tags"] == serde_json::json!(["management"])
                && node.get("/api/permissions/cv/cann").1["configure"] == "^c"
                && node.get("/api/policies/cv/cp").1["definition"]["max-length"] == 5
        })
        .await;
    }
    // The password works on another node (the hash was replicated).
    let uri = format!("amqp://cann:secret@{}:{}/cv", a.ip, a.amqp);
    let conn = common::t(Connection::connect(&uri, ConnectionProperties::default()))
        .await
        .expect("the replicated user logs in on A");
    let _ = conn.close(200, "bye").await;

    // C stops; a change made meanwhile reaches it when it is back.
    c.stop();
    let (x2, q2) = (common::uniq("cx2"), common::uniq("cq2"));
    declare_and_bind(&a, &x2, &q2, "k2").await;
    c.start().await;
    wait_passive(&c, &x2, &q2).await;
    eventually("binding caught up", Duration::from_secs(10), || {
        has_binding(&c, &x2, &q2, "k2")
    })
    .await;

    // The CLI: status lists the three members and the leader.
    let (ok, out) = a.ctl(&["cluster", "status"]);
    assert!(ok, "cluster status failed: {out}");
    for n in &all {
        assert!(out.contains(n.as_str()), "{n} missing in:\n{out}");
    }
    assert!(out.contains("Metadata leader: warren@127.0.0."), "{out}");

    // forget-node: C leaves the membership for good, and what was only on it
    // goes (RabbitMQ's forget_cluster_node): a classic queue homed on C and
    // its binding; C leaves the group of a quorum queue. Stopped, it is
    // first listed as not running.
    let (x3, q3) = (common::uniq("cx3"), common::uniq("cq3"));
    declare_and_bind(&c, &x3, &q3, "k3").await;
    wait_passive(&a, &x3, &q3).await;
    let qq = common::uniq("cqq");
    declare_quorum_queue(&a, &qq).await;
    let members = |node: &Node| -> usize {
        let (_, v) = node.get(&format!("/api/queues/%2F/{qq}"));
        v["members"].as_array().map(Vec::len).unwrap_or(0)
    };
    eventually("three members", Duration::from_secs(10), || {
        members(&a) == 3
    })
    .await;
    c.stop();
    eventually("C shown as not running", Duration::from_secs(10), || {
        let (_, nodes) = b.get("/api/nodes");
        nodes.as_array().into_iter().flatten().any(|n| {
            n["name"].as_str() == Some(c.name().as_str()) && n["running"] == Value::Bool(false)
        })
    })
    .await;
    let (ok, out) = a.ctl(&["cluster", "forget-node", &c.name()]);
    assert!(ok, "forget-node failed: {out}");
    eventually("two members left", Duration::from_secs(10), || {
        b.get("/api/nodes").1.as_array().map(Vec::len) == Some(2)
    })
    .await;
    for node in [&a, &b] {
        assert_eq!(node.get(&format!("/api/queues/%2F/{q3}")).0, 404);
        assert!(!has_binding(node, &x3, &q3, "k3"), "binding to {q3} kept");
        eventually("C left the quorum queue", Duration::from_secs(10), || {
            members(node) == 2
        })
        .await;
    }
    // The name is free again: declared on A, A is its home.
    declare_and_bind(&a, &x3, &q3, "k3").await;
    eventually("the new record on B", Duration::from_secs(10), || {
        b.get(&format!("/api/queues/%2F/{q3}")).1["node"] == Value::String(a.name())
    })
    .await;

    // With B down too, A has no majority (1 of 2): a declare is refused with
    // 541 after the commit timeout, never answered -ok, never hanging.
    b.stop();
    let conn = a.connect().await;
    let ch = common::t(conn.create_channel()).await.expect("channel");
    let started = Instant::now();
    let r = common::within(
        Duration::from_secs(10),
        ch.exchange_declare(
            &common::uniq("nox"),
            ExchangeKind::Fanout,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
    .expect("the declare hung instead of failing");
    common::assert_code(r, 541);
    assert!(started.elapsed() < Duration::from_secs(8));
    // The admin API answers 503 instead of 201.
    assert_eq!(a.put("/api/vhosts/noquorum", serde_json::json!({})), 503);
}

#[tokio::test]
async fn a_peer_with_the_wrong_cookie_is_refused() {
    let mut a = Node::new(1, "cookie");
    a.start().await;
    let addr = format!("{}:{}", a.ip, a.cluster);
    let me = warren::cluster::NodeInfo {
        name: "warren@intruder".into(),
        addr: "127.0.0.9:1".into(),
        ..Default::default()
    };
    use warren::cluster::{network::dial, Identity};
    let wrong = dial(
        &Identity::new(me.clone(), 7, "not-the-cookie".into()),
        None,
        &addr,
    )
    .await;
    assert!(wrong.is_err(), "a wrong cookie was accepted");
    let right = dial(&Identity::new(me, 7, COOKIE.into()), None, &addr).await;
    assert!(
        right.is_ok(),
        "the right cookie was refused: {:?}",
        right.err()
    );

    // A node configured with another cookie never joins.
    let mut b = Node::new(2, "cookie");
    b.seeds = vec![a.seed()];
    b.start_with_cookie("another-cookie").await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (_, nodes) = a.get("/api/nodes");
    assert_eq!(nodes.as_array().map(Vec::len), Some(1), "{nodes}");
}

#[tokio::test]
async fn a_lone_node_joins_by_cli() {
    let mut a = Node::new(1, "join");
    let mut d = Node::new(4, "join");
    a.start().await;
    d.start().await;
    let (x, q) = (common::uniq("jx"), common::uniq("jq"));
    declare_and_bind(&a, &x, &q, "k").await;
    // A has replicated metadata of its own: it cannot be reset into D's cluster.
    let (ok, out) = a.ctl(&["cluster", "join", &d.seed()]);
    assert!(!ok, "a node with metadata joined: {out}");
    assert!(out.contains("replicated metadata"), "{out}");
    // D is alone and empty: it joins A's cluster and gets A's metadata.
    let (ok, out) = d.ctl(&["cluster", "join", &a.seed()]);
    assert!(ok, "join failed: {out}");
    wait_passive(&d, &x, &q).await;
    eventually("two running members", Duration::from_secs(10), || {
        a.running().len() == 2
    })
    .await;
}

/// RabbitMQ's alarms are cluster-wide: a node whose free disk space is
/// under its `disk_free_limit` blocks the publishers of every node (they
/// get connection.blocked and are not read from); the alarms health check
/// of any node names it, the local one only on that node; once the node
/// has room again (restarted with a lower limit) the others unblock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disk_alarm_on_one_node_blocks_the_publishers_of_every_node() {
    let (a, b, mut c) = three_nodes("diskalarm").await;
    let conn = a.connect().await;
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_declare(
        "alarmed",
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("declare");
    ch.basic_publish(
        "",
        "alarmed",
        BasicPublishOptions::default(),
        b"before",
        Default::default(),
    )
    .await
    .expect("publish");
    assert_eq!(a.get("/api/health/checks/alarms").0, 200);

    // C comes back with more than any disk has free as its limit.
    c.stop();
    c.extra = "disk_free_limit = 1000000000000000\n".into();
    c.start().await;
    eventually("connection.blocked on A", Duration::from_secs(20), || {
        conn.status().blocked()
    })
    .await;
    let (status, body) = a.get("/api/health/checks/alarms");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["alarms"][0]["node"], c.name(), "{body}");
    assert_eq!(body["alarms"][0]["resource"], "disk", "{body}");
    assert_eq!(
        a.get("/api/health/checks/local-alarms").0,
        200,
        "A has none"
    );
    assert_eq!(c.get("/api/health/checks/local-alarms").0, 503);
    let nodes = b.get("/api/nodes").1;
    let of = |name: String| {
        nodes
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["name"] == name.as_str())
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(of(c.name())["disk_free_alarm"], true, "{nodes}");
    assert_eq!(of(a.name())["disk_free_alarm"], false, "{nodes}");

    c.stop();
    c.extra.clear();
    c.start().await;
    eventually("connection.unblocked on A", Duration::from_secs(20), || {
        !conn.status().blocked()
    })
    .await;
    assert_eq!(a.get("/api/health/checks/alarms").0, 200);
}
