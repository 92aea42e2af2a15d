//! Quorum queues replicated as Raft groups of their own: three warren
//! processes (127.0.0.1, .2, .3; tests/common/cluster.rs). A quorum queue
//! declared on A has three members; publishes confirmed on another node are
//! committed by a majority; with the leader's node killed (-9) a new leader
//! serves every message (those delivered and unacked before the kill come
//! back redelivered) and confirms keep working; without a majority a publish
//! is never confirmed; a whole-cluster restart keeps the messages and what
//! was acked stays gone.

mod common;

use common::cluster::{
    bodies, declare_quorum_queue, declare_quorum_sized, declare_quorum_with, eventually,
    node_index, publish_confirmed, publish_persistent, quorum_leader, three_nodes,
    three_nodes_with, Node,
};
use futures::StreamExt;
use lapin::options::*;
use lapin::publisher_confirm::Confirmation;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(15);

async fn channel(conn: &Connection) -> Channel {
    common::t(conn.create_channel()).await.expect("channel")
}

/// A connection to `node` and a channel on it in confirm mode.
async fn confirming(node: &Node) -> (Connection, Channel) {
    let conn = node.connect().await;
    let ch = channel(&conn).await;
    common::t(ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    (conn, ch)
}

/// A consumer `tag` of `q` on `node` with manual acks and a prefetch of 5,
/// with its connection and channel.
async fn holding_consumer(
    node: &Node,
    q: &str,
    tag: &str,
) -> (Connection, Channel, lapin::Consumer) {
    let conn = node.connect().await;
    let ch = channel(&conn).await;
    common::t(ch.basic_qos(5, BasicQosOptions::default()))
        .await
        .expect("qos");
    let consumer = common::t(ch.basic_consume(
        q,
        tag,
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("consume");
    (conn, ch, consumer)
}

/// `/api/queues/%2F/{q}` on `node`.
fn queue_api(node: &Node, q: &str) -> Value {
    node.get(&format!("/api/queues/%2F/{q}")).1
}

/// A consumer of `q` on `node` (manual acks, a prefetch of `prefetch`; 0:
/// none) with its connection; None after a pause when the consume is
/// refused or not answered (forwarded to a node that cannot be reached: a
/// cut link, before the new leader is known here).
async fn consumer_of(node: &Node, q: &str, prefetch: u16) -> Option<(Connection, lapin::Consumer)> {
    let conn = node.connect().await;
    let ch = channel(&conn).await;
    if prefetch > 0 {
        common::t(ch.basic_qos(prefetch, BasicQosOptions::default()))
            .await
            .expect("qos");
    }
    let consumer = common::within(
        Duration::from_secs(3),
        ch.basic_consume(q, "", BasicConsumeOptions::default(), FieldTable::default()),
    )
    .await;
    match consumer {
        Some(Ok(consumer)) => Some((conn, consumer)),
        _ => {
            let _ = conn.close(200, "bye").await;
            tokio::time::sleep(Duration::from_millis(200)).await;
            None
        }
    }
}

/// Consume from `q` on `node` (manual acks, acking each) until `want` distinct
/// bodies arrived or `within` passed; a consume refused or cancelled (leader
/// not known yet, or gone) is retried. The bodies seen, with whether each
/// came redelivered.
async fn consume_all(
    node: &Node,
    q: &str,
    want: &BTreeSet<String>,
    within: Duration,
) -> Vec<(String, bool)> {
    let deadline = Instant::now() + within;
    let mut seen: Vec<(String, bool)> = Vec::new();
    let have = |seen: &Vec<(String, bool)>| want.iter().all(|w| seen.iter().any(|(b, _)| b == w));
    while !have(&seen) && Instant::now() < deadline {
        let Some((conn, mut consumer)) = consumer_of(node, q, 0).await else {
            continue;
        };
        while !have(&seen) && Instant::now() < deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left.min(Duration::from_secs(2)), consumer.next()).await {
                Ok(Some(Ok(d))) => {
                    seen.push((String::from_utf8_lossy(&d.data).to_string(), d.redelivered));
                    if !matches!(
                        common::within(Duration::from_secs(3), d.ack(BasicAckOptions::default()))
                            .await,
                        Some(Ok(()))
                    ) {
                        break;
                    }
                }
                // Cancelled, the channel closed, or nothing for 2 s (the
                // consume went to a node that no longer serves the queue):
                // consume again.
                Ok(Some(Err(_)) | None) | Err(_) => break,
            }
        }
        let _ = conn.close(200, "bye").await;
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_queue_survives_its_leaders_node_and_needs_a_majority() {
    let (a, b, c) = three_nodes("quorum-failover").await;
    let mut nodes = [a, b, c];
    let q = "qq-failover";
    declare_quorum_queue(&nodes[0], q).await;

    // The queue's group: three members, a leader, the same on every node.
    let names: BTreeSet<String> = nodes.iter().map(Node::name).collect();
    eventually(
        "the group's record on every node",
        Duration::from_secs(10),
        || {
            nodes.iter().all(|n| {
                let v = queue_api(n, q);
                let members: BTreeSet<String> = v["members"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|m| m.as_str().map(String::from))
                    .collect();
                v["type"] == "quorum" && members == names && v["leader"].is_string()
            })
        },
    )
    .await;
    let leader = quorum_leader(&nodes[0], q).expect("a leader");
    let li = node_index(&nodes, &leader);
    let (pi, ci) = ((li + 1) % 3, (li + 2) % 3);
    assert_eq!(
        queue_api(&nodes[pi], q)["node"],
        Value::String(leader.clone())
    );

    // Publishes with confirms on a follower: all acked (committed).
    let (pconn, pch) = confirming(&nodes[pi]).await;
    let first = bodies("first", 40);
    assert_eq!(publish_confirmed(&pch, q, &first).await, (40, 0));
    let _ = pconn.close(200, "bye").await;
    eventually("40 messages at the leader", Duration::from_secs(10), || {
        queue_api(&nodes[ci], q)["messages"] == 40
    })
    .await;

    // A consumer on the third node takes 5 and acks none of them.
    let (cconn, _, mut consumer) = holding_consumer(&nodes[ci], q, "held").await;
    let mut held = BTreeSet::new();
    while held.len() < 5 {
        let d = common::t(consumer.next())
            .await
            .expect("a delivery")
            .expect("delivery");
        assert!(!d.redelivered, "first delivery");
        held.insert(String::from_utf8_lossy(&d.data).to_string());
    }

    // 400 more while the consumer is full, one log entry each (each
    // confirmed before the next is sent): the delivery horizon the leader
    // committed for its first deliveries reaches 64 log entries past the
    // queue's tail then, so the last of these are past it, never delivered.
    let (pconn, pch) = confirming(&nodes[pi]).await;
    let later = bodies("later", 400);
    for b in &later {
        assert_eq!(
            publish_confirmed(&pch, q, std::slice::from_ref(b)).await,
            (1, 0)
        );
    }
    let _ = pconn.close(200, "bye").await;

    // kill -9 of the leader's node.
    let killed_at = Instant::now();
    nodes[li].kill();
    let _ = cconn.close(200, "bye").await;

    // Every message, from a survivor, within a deadline; the 5 held ones
    // come back redelivered.
    let want: BTreeSet<String> = first.iter().chain(&later).cloned().collect();
    let seen = consume_all(&nodes[ci], q, &want, Duration::from_secs(30)).await;
    let got: BTreeSet<String> = seen.iter().map(|(b, _)| b.clone()).collect();
    assert_eq!(got, want, "every confirmed message after the failover");
    for h in &held {
        assert!(
            seen.iter().any(|(b, r)| b == h && *r),
            "{h} was delivered before the kill: it comes back redelivered"
        );
    }
    // The last later ones are past the committed delivery horizon (a
    // delivery past it waits for a larger one to commit, so nothing past it
    // went out): they come first unflagged (a few may come flagged if a
    // consume above was cut after the broker sent them); those within it
    // come flagged ("may have been delivered"). With every message flagged
    // (before the horizon) none comes unflagged.
    let mut first_seen: BTreeMap<&str, bool> = BTreeMap::new();
    for (b, r) in &seen {
        first_seen.entry(b.as_str()).or_insert(*r);
    }
    let unflagged = first_seen
        .iter()
        .filter(|(b, r)| b.starts_with("later") && !**r)
        .count();
    assert!(
        unflagged >= 100,
        "messages never delivered came flagged redelivered ({unflagged} unflagged): {first_seen:?}"
    );
    println!(
        "failover: all 440 consumed on a survivor {:.2} s after kill -9 of the leader, \
         {unflagged} of the 400 later ones first unflagged",
        killed_at.elapsed().as_secs_f64()
    );
    let new_leader = quorum_leader(&nodes[ci], q).expect("a new leader");
    assert_ne!(new_leader, leader, "a survivor leads now");

    // After the failover publishing with confirms works (on both survivors).
    let after = bodies("after", 10);
    for i in [pi, ci] {
        let (conn, ch) = confirming(&nodes[i]).await;
        let mine: Vec<String> = after.iter().map(|b| format!("{b}@{i}")).collect();
        assert_eq!(publish_confirmed(&ch, q, &mine).await, (10, 0));
        let _ = conn.close(200, "bye").await;
    }
    eventually(
        "the acks reached the group",
        Duration::from_secs(10),
        || queue_api(&nodes[ci], q)["messages"] == 20,
    )
    .await;

    // The killed node comes back as a follower of the group.
    nodes[li].start().await;
    eventually(
        "the old leader knows the new one",
        Duration::from_secs(20),
        || quorum_leader(&nodes[li], q).is_some_and(|l| l != leader),
    )
    .await;

    // No majority: two nodes down, a publish on the third is not confirmed
    // (a nack, or no confirm within 8 s), never acked.
    let lone = (0..3)
        .find(|&i| nodes[i].name() != new_leader)
        .expect("a follower");
    let others: Vec<usize> = (0..3).filter(|&i| i != lone).collect();
    let (conn, ch) = confirming(&nodes[lone]).await;
    for &i in &others {
        nodes[i].kill();
    }
    let c = common::t(ch.basic_publish(
        "",
        q,
        BasicPublishOptions::default(),
        b"minority",
        BasicProperties::default().with_delivery_mode(2),
    ))
    .await
    .expect("publish");
    let outcome = tokio::time::timeout(Duration::from_secs(8), c).await;
    assert!(
        !matches!(outcome, Ok(Ok(Confirmation::Ack(_)))),
        "a publish without a majority was acked"
    );
    let _ = conn.close(200, "bye").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_queue_keeps_its_messages_across_a_whole_cluster_restart() {
    let (a, b, c) = three_nodes("quorum-restart").await;
    let mut nodes = [a, b, c];
    let q = "qq-restart";
    declare_quorum_queue(&nodes[1], q).await;
    let (conn, ch) = confirming(&nodes[2]).await;
    let all = bodies("r", 30);
    assert_eq!(publish_confirmed(&ch, q, &all).await, (30, 0));
    // basic.get 10 with ack on A: their settlement is replicated.
    let gconn = nodes[0].connect().await;
    let gch = channel(&gconn).await;
    let mut acked = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while acked.len() < 10 {
        let got = common::t(gch.basic_get(q, BasicGetOptions { no_ack: false }))
            .await
            .expect("basic.get");
        let Some(m) = got else {
            // Nothing where A reaches the queue (a leader change under way).
            assert!(Instant::now() < deadline, "10 messages from basic.get on A");
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        acked.insert(String::from_utf8_lossy(&m.delivery.data).to_string());
        common::t(m.delivery.ack(BasicAckOptions::default()))
            .await
            .expect("ack");
    }
    let _ = gconn.close(200, "bye").await;
    let _ = conn.close(200, "bye").await;
    eventually("20 left at the leader", Duration::from_secs(10), || {
        queue_api(&nodes[0], q)["messages"] == 20
    })
    .await;
    // The settle is proposed at the ack and committed a few ms later; the
    // only outside sign of its commit is this bound (there is no API for a
    // group's commit index). Then kill all three.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for n in nodes.iter_mut() {
        n.kill();
    }
    for n in nodes.iter_mut() {
        n.start().await;
    }
    let want: BTreeSet<String> = all
        .iter()
        .filter(|b| !acked.contains(*b))
        .cloned()
        .collect();
    let seen = consume_all(&nodes[2], q, &want, Duration::from_secs(40)).await;
    let got: BTreeSet<String> = seen.iter().map(|(b, _)| b.clone()).collect();
    assert_eq!(
        got, want,
        "the 20 unacked messages, and none of the acked ones"
    );

    // Delete it (its group stops and its log goes on every member) with 5
    // messages in it; declared again, on another node, it is a new group:
    // empty, and working.
    let (conn, ch) = confirming(&nodes[2]).await;
    assert_eq!(publish_confirmed(&ch, q, &bodies("old", 5)).await, (5, 0));
    let deleted = common::t(ch.queue_delete(q, QueueDeleteOptions::default()))
        .await
        .expect("queue.delete");
    assert_eq!(deleted, 5, "delete-ok counts the leader's messages");
    let _ = conn.close(200, "bye").await;
    eventually("gone everywhere", Duration::from_secs(10), || {
        nodes
            .iter()
            .all(|n| n.get(&format!("/api/queues/%2F/{q}")).0 == 404)
    })
    .await;
    declare_quorum_queue(&nodes[0], q).await;
    eventually("a new, empty group", Duration::from_secs(10), || {
        let v = queue_api(&nodes[1], q);
        v["messages"] == 0 && v["leader"].is_string()
    })
    .await;
    let (conn, ch) = confirming(&nodes[1]).await;
    assert_eq!(publish_confirmed(&ch, q, &bodies("new", 3)).await, (3, 0));
    let _ = conn.close(200, "bye").await;
    let want: BTreeSet<String> = bodies("new", 3).into_iter().collect();
    let seen = consume_all(&nodes[2], q, &want, Duration::from_secs(20)).await;
    let got: BTreeSet<String> = seen.iter().map(|(b, _)| b.clone()).collect();
    assert_eq!(got, want, "only the new group's messages");
}

/// Confirmed publishes to a quorum queue, pipelined (the whole batch in
/// flight), on the leader and on a follower, against a classic durable
/// queue homed on the same node: every one acked, the rates printed, and
/// the quorum queue delivers them in the order they were published.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_publish_rates_of_a_quorum_queue_and_a_classic_one() {
    let (a, b, c) = three_nodes("quorum-rate").await;
    let nodes = [a, b, c];
    let q = "qq-rate";
    declare_quorum_queue(&nodes[0], q).await;
    let leader = quorum_leader(&nodes[0], q).expect("a leader");
    let li = node_index(&nodes, &leader);
    let classic = "classic-rate";
    {
        let conn = nodes[li].connect().await;
        let ch = channel(&conn).await;
        let qd = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        common::t(ch.queue_declare(classic, qd, FieldTable::default()))
            .await
            .expect("queue.declare");
        let _ = conn.close(200, "bye").await;
    }
    const N: usize = 2000;
    for (what, queue, on) in [
        ("quorum, on the leader", q, li),
        ("quorum, on a follower", q, (li + 1) % 3),
        ("classic, on its home", classic, li),
    ] {
        let (conn, ch) = confirming(&nodes[on]).await;
        let started = Instant::now();
        let acked = publish_confirmed(&ch, queue, &bodies(what, N)).await;
        let secs = started.elapsed().as_secs_f64();
        assert_eq!(acked, (N, 0), "{what}");
        println!(
            "{what}: {N} confirmed publishes of ~20-byte bodies in {secs:.2} s = {:.0}/s",
            N as f64 / secs
        );
        let _ = conn.close(200, "bye").await;
    }
    eventually(
        "every quorum message at the leader",
        Duration::from_secs(10),
        || queue_api(&nodes[li], q)["messages"] == 2 * N,
    )
    .await;
    // x-quorum-initial-group-size 2: the declaring node and one other.
    {
        declare_quorum_sized(&nodes[1], "qq-two", Some(2)).await;
        eventually("qq-two's group on A", Duration::from_secs(10), || {
            queue_api(&nodes[0], "qq-two")["members"]
                .as_array()
                .is_some_and(|m| !m.is_empty())
        })
        .await;
        let v = queue_api(&nodes[0], "qq-two");
        let members: Vec<&str> = v["members"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(members.len(), 2, "{v}");
        assert_eq!(members[0], nodes[1].name(), "the declaring node first");
        assert_eq!(v["replicas"], 2);
    }
    // In the order they were published: the leader's, then the follower's.
    let conn = nodes[li].connect().await;
    let ch = channel(&conn).await;
    let mut consumer = common::t(ch.basic_consume(
        q,
        "order",
        BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .expect("consume");
    let expected: Vec<String> = bodies("quorum, on the leader", N)
        .into_iter()
        .chain(bodies("quorum, on a follower", N))
        .collect();
    for want in &expected {
        let d = common::t(consumer.next())
            .await
            .expect("a delivery")
            .expect("delivery");
        assert_eq!(&String::from_utf8_lossy(&d.data), want, "queue order");
    }
    let _ = conn.close(200, "bye").await;
}

/// The leader's node cut off from the two others (test-owned proxies between
/// every pair): its local consumer is cancelled once it has not heard from a
/// majority for an election timeout, a publish there is never acked, the two
/// others elect a leader that serves every message and confirms new
/// publishes; after the heal the old leader follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_leader_stops_serving_and_the_majority_goes_on() {
    let (nodes, proxies) = common::cluster::start_proxied("quorum-part", 3000).await;
    common::cluster::wait_all_running(&nodes.iter().collect::<Vec<_>>()).await;
    let q = "qq-part";
    declare_quorum_queue(&nodes[0], q).await;
    let leader = quorum_leader(&nodes[0], q).expect("a leader");
    let li = node_index(&nodes, &leader);
    let other = (li + 1) % 3;
    let (conn, ch) = confirming(&nodes[other]).await;
    let before = bodies("before", 20);
    assert_eq!(publish_confirmed(&ch, q, &before).await, (20, 0));
    let _ = conn.close(200, "bye").await;

    // A consumer on the leader's node, holding what it gets.
    let (lconn, lch, mut local) = holding_consumer(&nodes[li], q, "on-leader").await;
    let first = common::t(local.next())
        .await
        .expect("a delivery")
        .expect("ok");
    assert!(!first.redelivered);

    for ((a, b), p) in &proxies {
        if *a == li || *b == li {
            p.cut();
        }
    }
    let cut_at = Instant::now();
    // The cut-off leader stops serving: its consumer is cancelled.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "the cut-off leader kept its consumer");
        match tokio::time::timeout(left, local.next()).await {
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_)) | None) | Err(_) => break,
        }
    }
    assert!(
        Instant::now() < deadline,
        "the cut-off leader kept its consumer"
    );
    println!(
        "isolated leader stopped serving {:.2} s after the cut",
        cut_at.elapsed().as_secs_f64()
    );
    // Not serving, it still shows the queue's committed messages (its local
    // queue is empty now: it showed 0), all ready (nothing is out).
    let shown = queue_api(&nodes[li], q);
    assert_eq!(
        (
            &shown["messages"],
            &shown["messages_ready"],
            &shown["messages_unacknowledged"]
        ),
        (
            &serde_json::json!(20),
            &serde_json::json!(20),
            &serde_json::json!(0)
        ),
        "{shown}"
    );
    // A publish on the cut-off node is never acked.
    common::t(lch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .ok();
    if let Ok(c) = common::t(lch.basic_publish(
        "",
        q,
        BasicPublishOptions::default(),
        b"cut-off",
        BasicProperties::default().with_delivery_mode(2),
    ))
    .await
    {
        let outcome = tokio::time::timeout(Duration::from_secs(5), c).await;
        assert!(
            !matches!(outcome, Ok(Ok(Confirmation::Ack(_)))),
            "a publish on the cut-off leader was acked"
        );
    }
    let _ = lconn.close(200, "bye").await;

    // The majority: a new leader, every message, new publishes confirmed.
    eventually(
        "a new leader on the majority side",
        Duration::from_secs(20),
        || quorum_leader(&nodes[other], q).is_some_and(|l| l != leader),
    )
    .await;
    let (conn, ch) = confirming(&nodes[other]).await;
    let during = bodies("during", 10);
    assert_eq!(publish_confirmed(&ch, q, &during).await, (10, 0));
    let _ = conn.close(200, "bye").await;
    let want: BTreeSet<String> = before.iter().chain(&during).cloned().collect();
    let seen = consume_all(&nodes[(li + 2) % 3], q, &want, Duration::from_secs(30)).await;
    let got: BTreeSet<String> = seen.iter().map(|(b, _)| b.clone()).collect();
    assert!(
        got.is_superset(&want),
        "missing: {:?}",
        want.difference(&got)
    );

    for p in proxies.values() {
        p.heal();
    }
    let new_leader = quorum_leader(&nodes[other], q).expect("leader");
    eventually(
        "the old leader follows the new one",
        Duration::from_secs(20),
        || quorum_leader(&nodes[li], q).as_deref() == Some(new_leader.as_str()),
    )
    .await;
}

/// The names in `v[field]` (a JSON array of node names).
fn names(v: &Value, field: &str) -> BTreeSet<String> {
    v[field]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(String::from)
        .collect()
}

/// Member management (RabbitMQ's `replicas/add`, `replicas/delete`, `grow`,
/// `shrink` endpoints): a two-member queue gets the third node as a voter
/// (proved by losing an original member: the majority left needs the new
/// one to confirm), the other loses it again; refusals are 400s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_are_added_and_removed_through_the_api() {
    let (a, b, c) = three_nodes("qmembers").await;
    let mut nodes = [a, b, c];
    let q = "qq-members";
    declare_quorum_sized(&nodes[0], q, Some(2)).await;
    eventually("a leader", Duration::from_secs(20), || {
        quorum_leader(&nodes[0], q).is_some()
    })
    .await;
    let before = names(&queue_api(&nodes[0], q), "members");
    assert_eq!(before.len(), 2);
    let outsider = nodes
        .iter()
        .position(|n| !before.contains(&n.name()))
        .expect("a node outside the group");
    let leader = quorum_leader(&nodes[0], q).expect("leader");
    let li = node_index(&nodes, &leader);
    let other = (0..3)
        .find(|i| *i != li && *i != outsider)
        .expect("the other member");

    let (conn, ch) = confirming(&nodes[li]).await;
    assert_eq!(
        publish_confirmed(&ch, q, &bodies("before", 10)).await,
        (10, 0)
    );

    // Refusals: unknown node, already a member, the last member, not quorum.
    let path = format!("/api/queues/quorum/%2F/{q}/replicas/add");
    let body = |n: &str| Some(serde_json::json!({ "node": n }));
    assert_eq!(nodes[0].send("POST", &path, body("warren@nowhere")), 400);
    assert_eq!(nodes[0].send("POST", &path, body(&leader)), 400);
    assert_eq!(
        nodes[0].send(
            "POST",
            "/api/queues/quorum/%2F/no-such-queue/replicas/add",
            body(&leader)
        ),
        404
    );

    // Add the outsider (asked on it): it becomes a voter of the group.
    assert_eq!(
        nodes[outsider].send("POST", &path, body(&nodes[outsider].name())),
        204
    );
    let all: BTreeSet<String> = nodes.iter().map(Node::name).collect();
    eventually("three members recorded", Duration::from_secs(10), || {
        names(&queue_api(&nodes[0], q), "members") == all
    })
    .await;
    eventually(
        "the outsider votes in the group",
        Duration::from_secs(30),
        || names(&queue_api(&nodes[outsider], q), "raft_voters") == all,
    )
    .await;

    // The other original member dies: the leader and the new member are a
    // majority, so publishes are still confirmed.
    nodes[other].kill();
    assert_eq!(publish_confirmed(&ch, q, &bodies("after", 5)).await, (5, 0));
    let _ = conn.close(200, "bye").await;

    // Remove the dead member: the group goes on with two voters.
    let del = format!("/api/queues/quorum/%2F/{q}/replicas/delete");
    assert_eq!(
        nodes[li].send("DELETE", &del, body(&nodes[other].name())),
        204
    );
    let two: BTreeSet<String> = [leader.clone(), nodes[outsider].name()].into();
    eventually("two voters", Duration::from_secs(30), || {
        names(&queue_api(&nodes[li], q), "raft_voters") == two
    })
    .await;
    assert_eq!(
        nodes[li].send("DELETE", &del, body(&nodes[other].name())),
        400
    );

    // Shrink the outsider away, then there is one member left, which stays.
    let (status, changed) = {
        let status = nodes[li].send(
            "DELETE",
            &format!(
                "/api/queues/quorum/replicas/on/{}/shrink",
                nodes[outsider].name()
            ),
            None,
        );
        (status, names(&queue_api(&nodes[li], q), "members"))
    };
    assert_eq!(status, 200);
    assert_eq!(changed, BTreeSet::from([leader.clone()]));
    assert_eq!(
        nodes[li].send("DELETE", &del, body(&leader)),
        400,
        "the last member"
    );

    eventually("one voter", Duration::from_secs(30), || {
        names(&queue_api(&nodes[li], q), "raft_voters") == BTreeSet::from([leader.clone()])
    })
    .await;

    // The CLI grows it back onto the outsider (a fresh member: its old log
    // was dropped when it left), which catches up from the leader.
    let (ok, out) = nodes[li].ctl(&["queues", "grow", &nodes[outsider].name()]);
    assert!(ok, "{out}");
    assert!(out.contains(q), "{out}");
    eventually("two voters again", Duration::from_secs(30), || {
        names(&queue_api(&nodes[outsider], q), "raft_voters") == two
    })
    .await;

    // Every message is still there, on the leader.
    let want: BTreeSet<String> = bodies("before", 10)
        .into_iter()
        .chain(bodies("after", 5))
        .collect();
    let got = consume_all(&nodes[li], q, &want, Duration::from_secs(20)).await;
    let got: BTreeSet<String> = got.into_iter().map(|(b, _)| b).collect();
    assert_eq!(got, want);
}

/// Leader rebalancing (RabbitMQ's `rabbitmq-queues rebalance quorum` and
/// `POST /api/rebalance/queues`): six quorum queues led from the node that
/// declared them end up led two per node, by leadership transfers to
/// members, with every confirmed message still there and publishes
/// confirmed by the new leaders.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaders_are_rebalanced_over_the_nodes() {
    let (a, b, c) = three_nodes("qrebalance").await;
    let nodes = [a, b, c];
    let critical = "/api/health/checks/node-is-quorum-critical";
    assert_eq!(nodes[0].get(critical).0, 200, "no quorum queue yet");
    let queues: Vec<String> = (0..6).map(|i| format!("qq-rebalance-{i}")).collect();
    for q in &queues {
        declare_quorum_queue(&nodes[0], q).await;
    }
    let leaders = |n: &Node| -> Vec<Option<String>> {
        let (_, list) = n.get("/api/queues/%2F");
        queues
            .iter()
            .map(|q| {
                list.as_array()
                    .into_iter()
                    .flatten()
                    .find(|v| v["name"] == q.as_str())
                    .and_then(|v| v["leader"].as_str().map(String::from))
            })
            .collect()
    };
    eventually("every queue has a leader", Duration::from_secs(30), || {
        leaders(&nodes[1]).iter().all(Option::is_some)
    })
    .await;
    let per_node = |l: &[Option<String>]| -> Vec<usize> {
        nodes
            .iter()
            .map(|n| l.iter().filter(|x| x.as_deref() == Some(&n.name())).count())
            .collect()
    };
    let before = per_node(&leaders(&nodes[1]));
    let excess: usize = before.iter().map(|c| c.saturating_sub(2)).sum();
    println!("leaders per node before: {before:?}");

    // Messages in every queue, confirmed through A.
    let (conn, ch) = confirming(&nodes[0]).await;
    for q in &queues {
        assert_eq!(
            publish_confirmed(&ch, q, &bodies(&format!("{q}-before"), 5)).await,
            (5, 0)
        );
    }
    let _ = conn.close(200, "bye").await;

    // Refusals before anything moves.
    assert_eq!(
        nodes[0].send(
            "POST",
            "/api/rebalance/queues",
            Some(serde_json::json!({"type": "lavinmq"}))
        ),
        400
    );
    assert_eq!(
        nodes[0].send(
            "POST",
            "/api/rebalance/queues",
            Some(serde_json::json!({"queue_pattern": "("}))
        ),
        400
    );

    let (ok, out) = nodes[2].ctl(&["queues", "rebalance", "quorum"]);
    assert!(ok, "{out}");
    println!("{out}");
    assert_eq!(
        out.lines().filter(|l| l.contains("qq-rebalance-")).count(),
        excess,
        "one move per leader over the share: {out}"
    );
    assert!(!out.contains("false"), "every move succeeded: {out}");
    eventually("two leaders per node", Duration::from_secs(20), || {
        per_node(&leaders(&nodes[0])) == vec![2, 2, 2]
    })
    .await;

    // Balanced now: asked again (on another node), every node ends at its
    // share (nothing to move, unless an election meanwhile moved one).
    let (ok, out) = nodes[0].ctl(&["queues", "rebalance"]);
    assert!(ok, "{out}");
    assert!(!out.contains("false"), "{out}");
    let shares: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("warren@"))
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    assert_eq!(shares, vec!["2", "2", "2"], "{out}");
    // RabbitMQ's asynchronous form answers 204 at once.
    assert_eq!(nodes[1].send("POST", "/api/rebalance/queues", None), 204);

    // Every queue still has its messages and confirms through its new
    // leader (published on B, consumed on C: both forwarded or local).
    let (conn, ch) = confirming(&nodes[1]).await;
    for q in &queues {
        assert_eq!(
            publish_confirmed(&ch, q, &bodies(&format!("{q}-after"), 3)).await,
            (3, 0)
        );
    }
    let _ = conn.close(200, "bye").await;
    for q in &queues {
        let want: BTreeSet<String> = bodies(&format!("{q}-before"), 5)
            .into_iter()
            .chain(bodies(&format!("{q}-after"), 3))
            .collect();
        let got = consume_all(&nodes[2], q, &want, Duration::from_secs(20)).await;
        let got: BTreeSet<String> = got.into_iter().map(|(b, _)| b).collect();
        assert_eq!(got, want, "{q}");
    }

    // RabbitMQ's rolling-restart check: with all three up, stopping one
    // leaves every queue a majority; with C gone, stopping A would not.
    let (status, body) = nodes[0].get(critical);
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("ok")),
        "{body}"
    );
    let (ok, out) = nodes[0].ctl(&["queues", "check-if-node-is-quorum-critical"]);
    assert!(ok, "{out}");
    let mut nodes = nodes;
    nodes[2].kill();
    eventually("A sees C down", Duration::from_secs(10), || {
        nodes[0].get(critical).0 == 503
    })
    .await;
    let (_, body) = nodes[0].get(critical);
    let named: BTreeSet<String> = body["queues"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|q| q["name"].as_str().map(String::from))
        .collect();
    assert_eq!(named, queues.iter().cloned().collect(), "{body}");
    assert_eq!(body["status"], "failed");
    let (ok, out) = nodes[0].ctl(&["queues", "check_if_node_is_quorum_critical"]);
    assert!(!ok, "{out}");
    assert!(out.contains("queue 'qq-rebalance-0' in vhost '/'"), "{out}");
}

/// A graceful stop (SIGTERM) of the leader's node hands the leadership over
/// to another member before the node goes (no election timeout to wait
/// out): its log says so, a survivor leads, and every confirmed message is
/// still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_stop_hands_the_leadership_over() {
    let (a, b, c) = three_nodes("qhandover").await;
    let mut nodes = [a, b, c];
    let q = "qq-handover";
    declare_quorum_queue(&nodes[0], q).await;
    eventually("a leader", Duration::from_secs(20), || {
        quorum_leader(&nodes[1], q).is_some()
    })
    .await;
    let leader = quorum_leader(&nodes[1], q).expect("leader");
    let li = node_index(&nodes, &leader);
    let other = (li + 1) % 3;
    let (conn, ch) = confirming(&nodes[other]).await;
    assert_eq!(publish_confirmed(&ch, q, &bodies("h", 20)).await, (20, 0));
    let _ = conn.close(200, "bye").await;

    nodes[li].stop();
    assert!(
        nodes[li]
            .log()
            .contains("quorum queue leadership transferred"),
        "no hand-over in the stopped node's log:\n{}",
        nodes[li].log()
    );
    eventually("a survivor leads", Duration::from_secs(10), || {
        quorum_leader(&nodes[other], q).is_some_and(|l| l != leader)
    })
    .await;
    let want: BTreeSet<String> = bodies("h", 20).into_iter().collect();
    let got = consume_all(&nodes[other], q, &want, Duration::from_secs(20)).await;
    let got: BTreeSet<String> = got.into_iter().map(|(b, _)| b).collect();
    assert_eq!(got, want);
}

/// Declare quorum queue `q` on `node` with `x-queue-leader-locator: locator`
/// (none: no such argument); the broker's refusal, if any.
async fn declare_located(node: &Node, q: &str, locator: Option<&str>) -> Result<(), String> {
    use lapin::types::AMQPValue;
    let conn = node.connect().await;
    let ch = channel(&conn).await;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    if let Some(l) = locator {
        args.insert(
            "x-queue-leader-locator".into(),
            AMQPValue::LongString(l.into()),
        );
    }
    let qd = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let r = ch
        .queue_declare(q, qd, args)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string());
    let _ = conn.close(200, "bye").await;
    r
}

/// RabbitMQ's leader locators: without one (or `client-local`) a new quorum
/// queue's leader is the declaring node; with `balanced` (the argument or
/// the `queue-leader-locator` policy) it goes to the running member leading
/// the fewest queues, and serves from there. A value RabbitMQ does not know
/// is its 406 (argument) or a 400 (policy).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_balanced_leader_locator_spreads_new_leaders() {
    let (a, b, c) = three_nodes("qlocator").await;
    let nodes = [a, b, c];
    let first = nodes[0].name();
    let led_by = |q: &str| quorum_leader(&nodes[1], q);
    declare_located(&nodes[0], "qq-local", None)
        .await
        .expect("declare");
    declare_located(&nodes[0], "qq-local-named", Some("client-local"))
        .await
        .expect("declare");
    eventually("client-local leaders", Duration::from_secs(20), || {
        led_by("qq-local").as_ref() == Some(&first)
            && led_by("qq-local-named").as_ref() == Some(&first)
    })
    .await;
    let e = declare_located(&nodes[0], "qq-bad", Some("min-masters"))
        .await
        .expect_err("not a leader locator");
    assert!(e.contains("invalid_queue_locator_arg"), "{e}");
    let policy = |name: &str, locator: &str| {
        nodes[0].send(
            "PUT",
            &format!("/api/policies/%2F/{name}"),
            Some(
                serde_json::json!({"pattern": "^qq-pol", "apply-to": "quorum_queues",
                "definition": {"queue-leader-locator": locator}}),
            ),
        )
    };
    assert_eq!(policy("bad-locator", "nowhere"), 400);
    assert_eq!(policy("locator", "balanced"), 201);
    // The first node leads two: each balanced queue goes to the node leading
    // fewest (B, C, B, C), all declared on the first node.
    let balanced = ["qq-bal-0", "qq-bal-1", "qq-pol-2", "qq-bal-3"];
    for q in balanced {
        let locator = (!q.starts_with("qq-pol")).then_some("balanced");
        declare_located(&nodes[0], q, locator)
            .await
            .expect("declare");
        eventually("the leader placed", Duration::from_secs(20), || {
            led_by(q).is_some_and(|l| l != first)
        })
        .await;
    }
    let per_node: Vec<usize> = nodes
        .iter()
        .map(|n| {
            ["qq-local", "qq-local-named"]
                .iter()
                .chain(balanced.iter())
                .filter(|q| led_by(q) == Some(n.name()))
                .count()
        })
        .collect();
    assert_eq!(per_node, vec![2, 2, 2], "leaders per node");
    // A placed leader serves: confirms through the first node, messages there.
    let (conn, ch) = confirming(&nodes[0]).await;
    assert_eq!(
        publish_confirmed(&ch, "qq-bal-0", &bodies("placed", 10)).await,
        (10, 0)
    );
    let _ = conn.close(200, "bye").await;
    let want: BTreeSet<String> = bodies("placed", 10).into_iter().collect();
    let got = consume_all(&nodes[2], "qq-bal-0", &want, Duration::from_secs(20)).await;
    let got: BTreeSet<String> = got.into_iter().map(|(b, _)| b).collect();
    assert_eq!(got, want);
}

/// Established TCP connections to `ip:port` on this machine (both ends are
/// here: loopback), from /proc/net/tcp.
fn connections_to(ip: &str, port: u16) -> usize {
    let octets: Vec<u8> = ip.split('.').filter_map(|o| o.parse().ok()).collect();
    let want = format!(
        "{:02X}{:02X}{:02X}{:02X}:{port:04X}",
        octets[3], octets[2], octets[1], octets[0]
    );
    std::fs::read_to_string("/proc/net/tcp")
        .expect("/proc/net/tcp")
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[2] == want && f[3] == "01"
        })
        .count()
}

/// Ninety quorum queues' groups reach the other nodes over one shared
/// connection per peer (`cluster::mux`), not one per group and peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_quorum_queues_share_a_few_connections() {
    let (a, b, c) = three_nodes("qpool").await;
    let nodes = [a, b, c];
    let n = 90;
    let queues: Vec<String> = (0..n).map(|i| format!("qq-pool-{i}")).collect();
    for (i, q) in queues.iter().enumerate() {
        declare_quorum_queue(&nodes[i % 3], q).await;
    }
    eventually("every queue has a leader", Duration::from_secs(60), || {
        let (_, list) = nodes[0].get("/api/queues/%2F");
        list.as_array()
            .is_some_and(|l| l.iter().filter(|q| q["leader"].is_string()).count() == n)
    })
    .await;
    // Every group's leader heartbeats its two followers every 300 ms: a
    // connection per group and peer would be one to B's cluster port for
    // each of the ~60 groups led from A or C (the test fails that way);
    // one per RPC in flight (a pool) was a dozen or more. Now A and C each
    // have one for all their groups, beside the metadata group's, the
    // probes' and the data links'.
    let target = &nodes[1];
    eventually(
        "a connection per peer for the groups",
        Duration::from_secs(10),
        || connections_to(&target.ip, target.cluster) <= 10,
    )
    .await;
    println!(
        "connections to B's cluster port with {n} quorum queues: {}",
        connections_to(&target.ip, target.cluster)
    );
    // And the groups work over them: each confirms a publish (a nack, from
    // a leader change on a loaded machine, is retried).
    let (conn, ch) = confirming(&nodes[2]).await;
    for q in &queues {
        let deadline = Instant::now() + Duration::from_secs(20);
        while publish_confirmed(&ch, q, &bodies(q, 1)).await != (1, 0) {
            assert!(Instant::now() < deadline, "{q} never confirmed a publish");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let _ = conn.close(200, "bye").await;
}

/// Publishes with confirms on a follower, 20 in flight, while the leader's
/// node is killed (-9): the follower's publisher of the queue resends what
/// the old leader had not answered to the new one, which recognises what
/// did commit by the publisher's sequence numbers. Every publish is acked
/// (none nacked: with a 10 s commit timeout, the 20 s resend window is far
/// longer than a failover, even on a loaded machine), and every message is
/// in the queue exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_in_flight_at_a_failover_are_resent_and_taken_once() {
    let (a, b, c) = three_nodes_with("qresend", 10_000).await;
    let mut nodes = [a, b, c];
    let q = "qq-resend";
    declare_quorum_queue(&nodes[0], q).await;
    eventually("a leader", Duration::from_secs(20), || {
        nodes.iter().all(|n| quorum_leader(n, q).is_some())
    })
    .await;
    let leader = quorum_leader(&nodes[0], q).expect("leader");
    let li = node_index(&nodes, &leader);
    let pi = (li + 1) % 3;
    let (conn, ch) = confirming(&nodes[pi]).await;
    let all = bodies("r", 600);
    let mut waits = std::collections::VecDeque::new();
    let (mut acked, mut nacked) = (0, 0);
    let mut tally = |c: Confirmation| match c {
        Confirmation::Ack(_) => acked += 1,
        Confirmation::Nack(_) => nacked += 1,
        Confirmation::NotRequested => panic!("confirms not on"),
    };
    let mut killed_at = Instant::now();
    for (i, body) in all.iter().enumerate() {
        if i == 200 {
            nodes[li].kill();
            killed_at = Instant::now();
        }
        waits.push_back(publish_persistent(&ch, q, body).await);
        if waits.len() > 20 {
            let w = waits.pop_front().expect("a confirm");
            tally(
                common::within(Duration::from_secs(30), w)
                    .await
                    .expect("confirmed")
                    .expect("confirm"),
            );
        }
    }
    for w in waits {
        tally(
            common::within(Duration::from_secs(30), w)
                .await
                .expect("confirmed")
                .expect("confirm"),
        );
    }
    println!(
        "resend: 600 publishes answered {:.2} s after kill -9 of the leader",
        killed_at.elapsed().as_secs_f64()
    );
    assert_eq!((acked, nacked), (600, 0), "every publish acked");
    let _ = conn.close(200, "bye").await;
    let want: BTreeSet<String> = all.iter().cloned().collect();
    let seen = consume_all(&nodes[pi], q, &want, Duration::from_secs(30)).await;
    let mut count = std::collections::BTreeMap::new();
    for (b, _) in &seen {
        *count.entry(b.clone()).or_insert(0) += 1;
    }
    let twice: Vec<_> = count.iter().filter(|(_, n)| **n > 1).collect();
    assert_eq!(count.len(), 600, "every message in the queue");
    assert!(twice.is_empty(), "messages taken twice: {twice:?}");
}

/// A follower cut off from both other nodes for several election rounds
/// asks for pre-votes, gets none, and so never raises the group's term: at
/// the heal it follows the leader, which goes on leading without a
/// re-election (openraft 0.9 alone, with no pre-vote, makes the leader step
/// down then).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_cut_off_alone_does_not_unseat_the_leader() {
    let (nodes, proxies) = common::cluster::start_proxied("qprevote", 3000).await;
    common::cluster::wait_all_running(&nodes.iter().collect::<Vec<_>>()).await;
    let q = "qq-prevote";
    declare_quorum_queue(&nodes[0], q).await;
    eventually("a leader", Duration::from_secs(20), || {
        nodes.iter().all(|n| quorum_leader(n, q).is_some())
    })
    .await;
    let leader = quorum_leader(&nodes[0], q).expect("a leader");
    let li = node_index(&nodes, &leader);
    let f = (li + 1) % 3;
    let (conn, ch) = confirming(&nodes[li]).await;
    assert_eq!(publish_confirmed(&ch, q, &bodies("pv", 10)).await, (10, 0));

    // Cut off for 5 s: three rounds or more (each 1.4-1.8 s here).
    for ((a, b), p) in &proxies {
        if *a == f || *b == f {
            p.cut();
        }
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    for p in proxies.values() {
        p.heal();
    }
    // Traffic through the leader meanwhile and after the heal: all acked.
    assert_eq!(publish_confirmed(&ch, q, &bodies("pv2", 10)).await, (10, 0));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(publish_confirmed(&ch, q, &bodies("pv3", 10)).await, (10, 0));
    let _ = conn.close(200, "bye").await;
    let flog = nodes[f].log();
    assert!(
        !flog.contains("stands for election"),
        "the cut-off follower stood for election:\n{flog}"
    );
    assert!(
        !nodes[li]
            .log()
            .contains("no longer serving the quorum queue"),
        "the leader stepped down at the heal:\n{}",
        nodes[li].log()
    );
    assert_eq!(quorum_leader(&nodes[f], q), Some(leader));
}

/// 4,400 messages of `filler` bytes and a little (`{tag}-{i}-...`)
/// published to `q` on `node`, each waiting for its confirm (one log entry
/// each, the group's first snapshot at entry 4,096): the bodies.
async fn one_entry_each(node: &Node, q: &str, tag: &str, filler: usize) -> Vec<String> {
    let filler = "f".repeat(filler);
    let all: Vec<String> = (0..4400).map(|i| format!("{tag}-{i}-{filler}")).collect();
    let (conn, ch) = confirming(node).await;
    for body in &all {
        let confirm = publish_persistent(&ch, q, body).await;
        let confirmed = common::t(confirm).await.expect("confirm");
        assert!(matches!(confirmed, Confirmation::Ack(_)), "{body}");
    }
    let _ = conn.close(200, "bye").await;
    all
}

/// The files in `node`'s `<data_dir>/quorum-values`, with their lengths.
fn value_files(node: &Node) -> Vec<(String, u64)> {
    let Ok(dir) = std::fs::read_dir(node.dir.join("quorum-values")) else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let len = e.metadata().ok()?.len();
        Some((e.file_name().to_string_lossy().into_owned(), len))
    })
    .collect()
}

/// The bytes in `node`'s quorum value files (`<data_dir>/quorum-values`).
fn value_file_bytes(node: &Node) -> u64 {
    std::fs::read_dir(node.dir.join("quorum-values"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Messages of 700 KiB (each a log entry of its own, each append-entries
/// RPC one of them) and small ones, published with confirms on a follower:
/// every member writes the large entries to its value files, not sled, and
/// after all three nodes are killed (-9) and started again every message
/// comes back whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_messages_are_replicated_through_the_value_files_and_survive_a_restart() {
    let (a, b, c) = three_nodes("quorum-large").await;
    let mut nodes = [a, b, c];
    let q = "qq-large";
    declare_quorum_queue(&nodes[0], q).await;
    let filler = "x".repeat(700 * 1024);
    let large: Vec<String> = (0..12).map(|i| format!("large-{i}-{filler}")).collect();
    let small = bodies("small", 30);
    let (conn, ch) = confirming(&nodes[1]).await;
    assert_eq!(publish_confirmed(&ch, q, &large).await, (12, 0));
    assert_eq!(publish_confirmed(&ch, q, &small).await, (30, 0));
    let _ = conn.close(200, "bye").await;
    // A majority has every entry at the confirm; the third catches up.
    eventually(
        "every member's value files hold the large messages",
        Duration::from_secs(20),
        || nodes.iter().all(|n| value_file_bytes(n) >= 12 * 700 * 1024),
    )
    .await;
    for n in nodes.iter_mut() {
        n.kill();
    }
    for n in nodes.iter_mut() {
        n.start().await;
    }
    let want: BTreeSet<String> = large.iter().chain(&small).cloned().collect();
    let seen = consume_all(&nodes[2], q, &want, Duration::from_secs(40)).await;
    let got: BTreeSet<String> = seen.into_iter().map(|(b, _)| b).collect();
    assert_eq!(got.len(), want.len(), "every message, once each");
    assert!(got == want, "the bodies come back whole");
}

/// `x-delivery-count` of a delivery (None: no header).
fn delivery_count(d: &lapin::message::Delivery) -> Option<i64> {
    let headers = d.properties.headers().as_ref()?;
    match headers.inner().get("x-delivery-count")? {
        lapin::types::AMQPValue::LongLongInt(n) => Some(*n),
        other => panic!("x-delivery-count is not a long: {other:?}"),
    }
}

/// A message nacked back three times on the leader, then got once more and
/// held unacked, and the leader killed (-9): the new leader delivers it with
/// `x-delivery-count` 4, the returns the group counted and one more for the
/// delivery out with a client whose channel died with the leader (the
/// delivery limit does not start again at a failover); a message never
/// delivered comes with no count.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_delivery_count_survives_a_failover() {
    let (a, b, c) = three_nodes("quorum-returns").await;
    let mut nodes = [a, b, c];
    let q = "qq-returns";
    declare_quorum_queue(&nodes[0], q).await;
    let (conn, ch) = confirming(&nodes[1]).await;
    assert_eq!(publish_confirmed(&ch, q, &bodies("dc", 2)).await, (2, 0));
    let _ = conn.close(200, "bye").await;
    let leader = quorum_leader(&nodes[1], q).expect("a leader");
    let l = node_index(&nodes, &leader);
    let gconn = nodes[l].connect().await;
    let gch = channel(&gconn).await;
    for want in [None, Some(1)] {
        let got = common::t(gch.basic_get(q, BasicGetOptions { no_ack: false }))
            .await
            .expect("basic.get")
            .expect("the message");
        assert_eq!(delivery_count(&got.delivery), want);
        common::t(got.delivery.nack(BasicNackOptions {
            requeue: true,
            multiple: false,
        }))
        .await
        .expect("nack");
    }
    let got = common::t(gch.basic_get(q, BasicGetOptions { no_ack: false }))
        .await
        .expect("basic.get")
        .expect("the message");
    assert_eq!(delivery_count(&got.delivery), Some(2));
    common::t(got.delivery.nack(BasicNackOptions {
        requeue: true,
        multiple: false,
    }))
    .await
    .expect("nack");
    let held = common::t(gch.basic_get(q, BasicGetOptions { no_ack: false }))
        .await
        .expect("basic.get")
        .expect("the message");
    assert_eq!(String::from_utf8_lossy(&held.delivery.data), "dc-0");
    assert_eq!(delivery_count(&held.delivery), Some(3));
    // The returns and the checkout are proposed at once and committed a few
    // ms later (no API shows a group's commit index): then the leader's
    // node dies, the connection holding the delivery with it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    nodes[l].kill();
    drop(gconn);
    let other = (l + 1) % 3;
    let deadline = Instant::now() + Duration::from_secs(30);
    let got = loop {
        assert!(Instant::now() < deadline, "the message on a new leader");
        let conn = nodes[other].connect().await;
        let ch = channel(&conn).await;
        let got = common::within(
            Duration::from_secs(3),
            ch.basic_get(q, BasicGetOptions { no_ack: true }),
        )
        .await;
        let _ = conn.close(200, "bye").await;
        match got {
            Some(Ok(Some(m))) => break m,
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    assert_eq!(String::from_utf8_lossy(&got.delivery.data), "dc-0");
    assert!(got.delivery.redelivered);
    assert_eq!(
        delivery_count(&got.delivery),
        Some(4),
        "three returns, and the delivery out at the failover"
    );
    let conn = nodes[other].connect().await;
    let ch = channel(&conn).await;
    let never = common::t(ch.basic_get(q, BasicGetOptions { no_ack: true }))
        .await
        .expect("basic.get")
        .expect("the other message");
    assert_eq!(String::from_utf8_lossy(&never.delivery.data), "dc-1");
    assert_eq!(delivery_count(&never.delivery), None, "never delivered");
    let _ = conn.close(200, "bye").await;
}

/// Declare the quorum queues `src` and `dst` on `on`, then define through
/// `through`'s API the dynamic shovel `name` moving from one to the other
/// (`amqp://`: the node that runs it); its parameter's path.
async fn define_shovel(on: &Node, through: &Node, name: &str, (src, dst): (&str, &str)) -> String {
    declare_quorum_queue(on, src).await;
    declare_quorum_queue(on, dst).await;
    let path = format!("/api/parameters/shovel/%2F/{name}");
    let value = serde_json::json!({"value": {
        "src-uri": "amqp://", "src-queue": src,
        "dest-uri": "amqp://", "dest-queue": dst,
    }});
    assert_eq!(through.put(&path, value), 201);
    path
}

/// The rows of `/api/shovels` on `node` for shovel `name`: (its node, its state).
fn shovel_rows(node: &Node, name: &str) -> Vec<(String, String)> {
    let (status, rows) = node.get("/api/shovels");
    assert_eq!(status, 200, "{rows}");
    rows.as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["name"] == name)
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap_or_default().to_string();
            (s("node"), s("state"))
        })
        .collect()
}

/// A dynamic shovel defined through one node's API is a replicated runtime
/// parameter: every node has it, one node runs it (every node's
/// `/api/shovels` shows that one), and when that node is killed another runs
/// it and moves what is published meanwhile; deleted through a survivor,
/// it stops and is gone everywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dynamic_shovel_runs_on_one_node_and_moves_when_it_goes() {
    let (a, b, c) = three_nodes("shovel-move").await;
    let mut nodes = [a, b, c];
    let (src, dst, name) = ("sh-src", "sh-dst", "mover");
    let path = define_shovel(&nodes[0], &nodes[1], name, (src, dst)).await;
    eventually("the parameter on every node", WAIT, || {
        nodes.iter().all(|n| n.get(&path).0 == 200)
    })
    .await;

    // One node runs it, and every node says which.
    let mut runner = String::new();
    eventually("one running shovel seen from every node", WAIT, || {
        let rows: Vec<Vec<(String, String)>> = nodes.iter().map(|n| shovel_rows(n, name)).collect();
        let one = rows
            .iter()
            .all(|r| r.len() == 1 && r[0].1 == "running" && r[0] == rows[0][0]);
        if one {
            runner.clone_from(&rows[0][0].0);
        }
        one
    })
    .await;
    let ri = node_index(&nodes, &runner);
    let other = (ri + 1) % 3;

    // It moves what is published, wherever the publisher is.
    let (pconn, pch) = confirming(&nodes[other]).await;
    let first = bodies("before", 30);
    assert_eq!(publish_confirmed(&pch, src, &first).await, (30, 0));
    let _ = pconn.close(200, "bye").await;
    eventually("30 moved", WAIT, || {
        queue_api(&nodes[other], dst)["messages"] == 30
    })
    .await;

    // Its node goes: another runs it.
    nodes[ri].kill();
    let (pconn, pch) = confirming(&nodes[other]).await;
    let second = bodies("after", 30);
    assert_eq!(publish_confirmed(&pch, src, &second).await, (30, 0));
    let _ = pconn.close(200, "bye").await;
    let survivors: Vec<usize> = (0..3).filter(|i| *i != ri).collect();
    eventually("the shovel running on a survivor", WAIT, || {
        survivors.iter().all(|i| {
            let rows = shovel_rows(&nodes[*i], name);
            rows.len() == 1 && rows[0].1 == "running" && rows[0].0 != runner
        })
    })
    .await;
    let want: BTreeSet<String> = first.iter().chain(&second).cloned().collect();
    let seen = consume_all(&nodes[other], dst, &want, Duration::from_secs(30)).await;
    let got: BTreeSet<String> = seen.into_iter().map(|(b, _)| b).collect();
    assert_eq!(
        got, want,
        "every message moved, before and after the failover"
    );

    // Deleted through a survivor: gone from both, and stopped.
    assert_eq!(nodes[other].send("DELETE", &path, None), 204);
    eventually("the shovel gone from the survivors", WAIT, || {
        survivors
            .iter()
            .all(|i| nodes[*i].get(&path).0 == 404 && shovel_rows(&nodes[*i], name).is_empty())
    })
    .await;
}

/// A node cut off from the others stops its dynamic shovels (it may be the
/// one the others gave up on) while the majority's side runs them: after the
/// runner is isolated, one row runs on the majority's side, the isolated
/// node runs none, and what is published on the majority's side is moved;
/// after the heal exactly one node runs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_isolated_node_stops_its_shovels_and_the_majority_runs_them() {
    let (nodes, proxies) = common::cluster::start_proxied("shovel-cut", 2000).await;
    common::cluster::wait_all_running(&nodes.iter().collect::<Vec<_>>()).await;
    let (src, dst, name) = ("cut-src", "cut-dst", "cutter");
    define_shovel(&nodes[0], &nodes[0], name, (src, dst)).await;
    let mut runner = String::new();
    eventually("one running shovel", WAIT, || {
        let rows = shovel_rows(&nodes[0], name);
        let one = rows.len() == 1 && rows[0].1 == "running";
        if one {
            runner.clone_from(&rows[0].0);
        }
        one
    })
    .await;
    let ri = node_index(&nodes, &runner);

    // The runner is cut off from both others.
    for ((from, to), p) in &proxies {
        if *from == ri || *to == ri {
            p.cut();
        }
    }
    let others: Vec<usize> = (0..3).filter(|i| *i != ri).collect();
    eventually(
        "the isolated node runs nothing, a survivor runs it",
        WAIT,
        || {
            let mine = shovel_rows(&nodes[ri], name);
            let theirs = shovel_rows(&nodes[others[0]], name);
            mine.is_empty()
                && theirs.len() == 1
                && theirs[0].1 == "running"
                && theirs[0].0 != runner
        },
    )
    .await;
    let (pconn, pch) = confirming(&nodes[others[0]]).await;
    let moved = bodies("cut", 20);
    assert_eq!(publish_confirmed(&pch, src, &moved).await, (20, 0));
    let _ = pconn.close(200, "bye").await;
    eventually("20 moved on the majority's side", WAIT, || {
        queue_api(&nodes[others[1]], dst)["messages"] == 20
    })
    .await;

    // Healed: one node runs it, seen alike from every node.
    for p in proxies.values() {
        p.heal();
    }
    eventually("one running shovel after the heal", WAIT, || {
        let rows: Vec<Vec<(String, String)>> = nodes.iter().map(|n| shovel_rows(n, name)).collect();
        rows.iter()
            .all(|r| r.len() == 1 && r[0].1 == "running" && r[0] == rows[0][0])
    })
    .await;
}

/// A message's `x-message-ttl` counts from when its group took it, not
/// from when a new leader loads it: a message published 2.5 s before its
/// leader's node is killed expires 6 s after it was published (or at once
/// when the new leader serves later than that), where a clock started at the
/// load would keep it 6 s past the failover.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_ttl_keeps_counting_across_a_failover() {
    use lapin::types::AMQPValue;
    let (a, b, c) = three_nodes("quorum-ttl").await;
    let mut nodes = [a, b, c];
    let q = "qq-ttl";
    let ttl = ("x-message-ttl", AMQPValue::LongInt(6000));
    declare_quorum_with(&nodes[0], q, &[ttl]).await;
    eventually("a leader", WAIT, || quorum_leader(&nodes[0], q).is_some()).await;
    let leader = quorum_leader(&nodes[0], q).expect("a leader");
    let li = node_index(&nodes, &leader);
    let other = (li + 1) % 3;
    let (pconn, pch) = confirming(&nodes[other]).await;
    assert_eq!(publish_confirmed(&pch, q, &bodies("ttl", 1)).await, (1, 0));
    let published = Instant::now();
    let _ = pconn.close(200, "bye").await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(queue_api(&nodes[other], q)["messages"], 1);

    nodes[li].kill();
    eventually("a new leader", Duration::from_secs(30), || {
        quorum_leader(&nodes[other], q).is_some_and(|l| l != leader)
            && queue_api(&nodes[other], q)["messages"].is_u64()
    })
    .await;
    let served = Instant::now();
    let due = (published + Duration::from_secs(6)).max(served) + Duration::from_secs(2);
    loop {
        if queue_api(&nodes[other], q)["messages"] == 0 {
            break;
        }
        assert!(
            Instant::now() < due,
            "still there {:?} after publishing (served again after {:?})",
            published.elapsed(),
            served - published
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Consume `n` distinct bodies from `q` on `node` (prefetch 1000, acked
/// together), consuming again while a leader is not known or until
/// `within` passed: the bodies seen.
async fn drain_quorum(node: &Node, q: &str, n: usize, within: Duration) -> BTreeSet<String> {
    let deadline = Instant::now() + within;
    let mut seen = BTreeSet::new();
    while seen.len() < n && Instant::now() < deadline {
        let Some((conn, mut consumer)) = consumer_of(node, q, 1000).await else {
            continue;
        };
        let mut unacked = 0;
        while seen.len() < n && Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_secs(2), consumer.next()).await {
                Ok(Some(Ok(d))) => {
                    seen.insert(String::from_utf8_lossy(&d.data).to_string());
                    unacked += 1;
                    if unacked == 500 || seen.len() == n {
                        let multiple = BasicAckOptions { multiple: true };
                        let _ = common::within(Duration::from_secs(3), d.ack(multiple)).await;
                        unacked = 0;
                    }
                }
                Ok(Some(Err(_)) | None) | Err(_) => break,
            }
        }
        let _ = conn.close(200, "bye").await;
    }
    seen
}

/// Three nodes (named after `name`), a quorum queue `q` declared on the
/// first, and the index of its leader's node.
async fn quorum_queue_on_three(name: &str, q: &str) -> ([Node; 3], usize) {
    let (a, b, c) = three_nodes(name).await;
    let nodes = [a, b, c];
    declare_quorum_queue(&nodes[0], q).await;
    let leader = quorum_leader(&nodes[0], q).expect("a leader");
    let leader = node_index(&nodes, &leader);
    (nodes, leader)
}

/// The followers keep the messages on disk only (in their log, and in the
/// snapshot written after 4096 entries, the log behind it purged): with
/// the leader's node killed, the new leader reads every message back and
/// serves it whole; what was acked before stays gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_leader_reads_the_messages_back_from_its_snapshot_and_log() {
    let q = "qq-read-back";
    let (mut nodes, leader) = quorum_queue_on_three("quorum-read-back", q).await;
    // One log entry a message: each waits for its confirm.
    let all = one_entry_each(&nodes[leader], q, "rb", 200).await;
    // The first 100 taken and acked.
    {
        let conn = nodes[leader].connect().await;
        let ch = channel(&conn).await;
        for want in &all[..100] {
            let got = common::t(ch.basic_get(q, BasicGetOptions::default()))
                .await
                .expect("basic.get")
                .expect("a message");
            assert_eq!(
                String::from_utf8_lossy(&got.delivery.data),
                *want,
                "in order"
            );
            common::t(got.delivery.ack(BasicAckOptions::default()))
                .await
                .expect("ack");
        }
        let _ = conn.close(200, "bye").await;
    }
    // The acks committed: the followers' committed counts.
    for n in nodes.iter().filter(|n| n.name() != nodes[leader].name()) {
        eventually("the acks committed", WAIT, || {
            queue_api(n, q)["messages"].as_u64() == Some(4300)
        })
        .await;
    }
    // Every member wrote a snapshot (its live messages, over 4 KiB: in the
    // value files; the entries of one small message each are not).
    eventually(
        "every member wrote a snapshot",
        Duration::from_secs(30),
        || nodes.iter().all(|n| value_file_bytes(n) >= 4000 * 200),
    )
    .await;
    nodes[leader].kill();
    let other = (leader + 1) % 3;
    let want: BTreeSet<String> = all[100..].iter().cloned().collect();
    let got = drain_quorum(&nodes[other], q, want.len(), Duration::from_secs(60)).await;
    assert_eq!(got.len(), want.len(), "every message");
    assert!(got == want, "whole, and none of those acked before");
}

/// A member that was down while the group snapshotted (its log purged
/// behind the snapshot) catches up from the snapshot: sent from the
/// record's own file (over 8 MiB) a chunk at a time, received into a file,
/// installed into its own record; its count is the group's, no received
/// file is left, and after a restart of it and the leader's death every
/// message is still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_behind_the_log_catches_up_from_the_snapshot_file() {
    let q = "qq-behind";
    let (mut nodes, leader) = quorum_queue_on_three("quorum-behind", q).await;
    let f = (leader + 1) % 3;
    nodes[f].kill();
    // One log entry a message (each waits for its confirm), 2.5 KB each:
    // ~11 MB, a snapshot file of its own.
    let all = one_entry_each(&nodes[leader], q, "cb", 2500).await;
    // The snapshot at index 4096 holds about 4,090 of them (in the value
    // files: the entries, under 4 KiB each, are not).
    let snapshot = 4000 * 2500;
    assert!(snapshot > 8 << 20, "over a value file's own size");
    eventually(
        "the live members wrote the snapshot",
        Duration::from_secs(30),
        || {
            (0..3)
                .filter(|i| *i != f)
                .all(|i| value_file_bytes(&nodes[i]) >= snapshot)
        },
    )
    .await;
    nodes[f].start().await;
    // Installed: the snapshot in its value files, the file received into
    // (a chunk at a time) gone.
    let installed = || {
        let files = value_files(&nodes[f]);
        let val: u64 = files
            .iter()
            .filter(|(n, _)| n.ends_with(".val"))
            .map(|(_, l)| l)
            .sum();
        let parts = files.iter().filter(|(n, _)| n.ends_with(".part")).count();
        val >= snapshot && parts == 0
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    while !installed() {
        assert!(
            Instant::now() < deadline,
            "not installed: {:?}\n{}",
            value_files(&nodes[f]),
            nodes[f].log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Restarted from what it installed, then the leader gone: the two
    // left serve every message.
    nodes[f].kill();
    nodes[f].start().await;
    nodes[leader].kill();
    let want: BTreeSet<String> = all.iter().cloned().collect();
    let got = drain_quorum(&nodes[f], q, want.len(), Duration::from_secs(90)).await;
    assert_eq!(got.len(), want.len(), "every message");
    assert!(got == want, "whole");
}

/// The leader keeps a window of a long quorum queue in memory and the rest
/// paged out to its message store; gets read the paged-out messages back
/// in order, and a purge settles them in the group too: the next leader
/// does not have them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_pages_a_long_quorum_queue_out_and_a_purge_settles_it_in_the_group() {
    let q = "qq-paging";
    let (mut nodes, leader) = quorum_queue_on_three("quorum-paging", q).await;
    let all: Vec<String> = (0..3000).map(|i| format!("pg-{i}")).collect();
    let (conn, ch) = confirming(&nodes[leader]).await;
    assert_eq!(publish_confirmed(&ch, q, &all).await, (3000, 0));
    let st = queue_api(&nodes[leader], q);
    assert_eq!(st["messages_ready"].as_u64(), Some(3000), "{st}");
    let in_memory = st["messages_ready_ram"]
        .as_u64()
        .expect("messages_ready_ram");
    assert!(in_memory <= 2048, "{in_memory} in memory: a window only");
    let get = |ch: Channel| async move {
        let got = common::t(ch.basic_get(q, BasicGetOptions { no_ack: true }))
            .await
            .expect("basic.get")
            .expect("a message");
        String::from_utf8_lossy(&got.delivery.data).into_owned()
    };
    // Past the window, in order.
    for want in &all[..2100] {
        assert_eq!(get(ch.clone()).await, *want);
    }
    let purged = common::t(ch.queue_purge(q, QueuePurgeOptions::default()))
        .await
        .expect("purge");
    assert_eq!(purged, 900);
    // A get past every horizon committed so far waits for a new one, which
    // commits after the purge's settlement (proposed in order).
    let after = vec!["after".to_string()];
    assert_eq!(publish_confirmed(&ch, q, &after).await, (1, 0));
    assert_eq!(get(ch.clone()).await, "after");
    let _ = conn.close(200, "bye").await;
    // The next leader has none of the purged messages.
    nodes[leader].kill();
    let other = &nodes[(leader + 1) % 3];
    let (conn, ch) = confirming(other).await;
    confirmed_once_led(&ch, q, "last").await;
    // (the get of "after" settled it without an ack: that settlement may
    // not have committed before the kill, and then it comes again)
    let mut got = get(ch.clone()).await;
    if got == "after" {
        got = get(ch.clone()).await;
    }
    assert_eq!(got, "last", "no purged message comes back");
    let _ = conn.close(200, "bye").await;
}

/// `body` published to `q` until a confirm comes (a new leader takes
/// publishes once elected and loaded; nacks before then), within 30 s.
async fn confirmed_once_led(ch: &Channel, q: &str, body: &str) {
    let one = vec![body.to_string()];
    let deadline = Instant::now() + Duration::from_secs(30);
    while publish_confirmed(ch, q, &one).await != (1, 0) {
        assert!(Instant::now() < deadline, "no leader confirmed {body}");
    }
}

/// `n` messages of ~110 bytes (`{tag}-{i}-...`) published to `q` on its
/// leader's node (with confirms, 5,000 at a time), then that node killed:
/// the bodies.
async fn backlog_then_kill(leader: &mut Node, q: &str, tag: &str, n: usize) -> Vec<String> {
    let filler = "f".repeat(100);
    let all: Vec<String> = (0..n).map(|i| format!("{tag}-{i}-{filler}")).collect();
    let (conn, ch) = confirming(leader).await;
    for part in all.chunks(5000) {
        assert_eq!(publish_confirmed(&ch, q, part).await, (part.len(), 0));
    }
    let _ = conn.close(200, "bye").await;
    leader.kill();
    all
}

/// A new leader serves consumers while it loads a long backlog into its
/// queue (a batch at a time): a consumer that attaches during the load gets
/// every message (the delivery horizons its queue asks for meanwhile are
/// answered), and publishes made meanwhile are taken once it has loaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_during_a_new_leaders_load_gets_every_message() {
    let q = "qq-load";
    let (mut nodes, leader) = quorum_queue_on_three("quorum-load", q).await;
    let all = backlog_then_kill(&mut nodes[leader], q, "ld", 40_000).await;
    let other = &nodes[(leader + 1) % 3];
    // Consumes as soon as the new leader serves (it serves while it loads).
    let drain = drain_quorum(other, q, all.len() + 1, Duration::from_secs(90));
    let publish = async {
        let (conn, ch) = confirming(other).await;
        confirmed_once_led(&ch, q, "late").await;
        let _ = conn.close(200, "bye").await;
    };
    let (got, ()) = tokio::join!(drain, publish);
    let mut want: BTreeSet<String> = all.into_iter().collect();
    want.insert("late".to_string());
    assert_eq!(got.len(), want.len(), "every message");
    assert!(got == want, "the same messages");
}

/// A purge while a new leader loads a long backlog drops the messages it
/// has not loaded yet too (the load stops there and settles them in the
/// group), and `purge-ok` counts them: no message published before the
/// purge comes afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_while_a_new_leader_loads_drops_what_it_has_not_loaded() {
    let q = "qq-load-purge";
    let (mut nodes, leader) = quorum_queue_on_three("quorum-load-purge", q).await;
    let all = backlog_then_kill(&mut nodes[leader], q, "lp", 60_000).await;
    let next = (leader + 1) % 3;
    // Purged as soon as a new leader answers (it does while it loads).
    let deadline = Instant::now() + Duration::from_secs(30);
    let purged = loop {
        assert!(Instant::now() < deadline, "no purge answered");
        let conn = nodes[next].connect().await;
        let ch = channel(&conn).await;
        let purge = common::t(ch.queue_purge(q, QueuePurgeOptions::default())).await;
        let _ = conn.close(200, "bye").await;
        match purge {
            Ok(n) => break n,
            // (no leader yet: the channel was closed)
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    assert_eq!(purged as usize, all.len(), "purge-ok counts every message");
    // Taken once the (stopped) load is done; the only message there is.
    let (conn, ch) = confirming(&nodes[next]).await;
    confirmed_once_led(&ch, q, "after").await;
    let _ = conn.close(200, "bye").await;
    let got = drain_quorum(&nodes[next], q, 1, Duration::from_secs(30)).await;
    assert_eq!(got, BTreeSet::from(["after".to_string()]));
    // Nothing else comes.
    let got = drain_quorum(&nodes[next], q, 1, Duration::from_secs(3)).await;
    assert!(got.is_empty(), "{} purged messages came back", got.len());
}
