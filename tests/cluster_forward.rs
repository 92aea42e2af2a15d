//! Queues live on their home node and are reached from the others by
//! forwarding: three warren processes (127.0.0.1, .2, .3; the harness of
//! tests/common/cluster.rs), a durable queue declared on A, publishes with
//! confirms on B, the messages only on A; with A killed (-9) a confirming
//! publish on B is nacked; A restarted still has its persistent messages.

mod common;

use common::cluster::{eventually, three_nodes, two_stream_nodes, Node};
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use std::time::{Duration, Instant};

async fn channel(conn: &Connection) -> Channel {
    common::t(conn.create_channel()).await.expect("channel")
}

/// Declare durable queue `q` on `node` (its home).
async fn declare_durable(node: &Node, q: &str) {
    let conn = node.connect().await;
    let ch = channel(&conn).await;
    let qd = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    common::t(ch.queue_declare(q, qd, FieldTable::default()))
        .await
        .expect("queue.declare");
    let _ = conn.close(200, "bye").await;
}

/// A passive declare of `q` on `node`: (messages, consumers), or the error text.
async fn passive(node: &Node, q: &str) -> Result<(u32, u32), String> {
    let conn = node.connect().await;
    let ch = channel(&conn).await;
    let r = common::t(ch.queue_declare(
        q,
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .map(|q| (q.message_count(), q.consumer_count()))
    .map_err(|e| e.to_string());
    let _ = conn.close(200, "bye").await;
    r
}

async fn wait_visible(node: &Node, q: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while passive(node, q).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "{q} not visible on {}",
            node.name()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Publish `n` persistent messages `tag-i` to `q` (default exchange) with
/// confirms: how many were acked and how many nacked.
async fn publish_confirmed(ch: &Channel, q: &str, n: usize, tag: &str) -> (usize, usize) {
    common::cluster::publish_confirmed(ch, q, &common::cluster::bodies(tag, n)).await
}

/// basic.get everything from `q` on `node` (acked): the bodies.
async fn drain(node: &Node, q: &str) -> Vec<String> {
    let conn = node.connect().await;
    let ch = channel(&conn).await;
    let mut out = Vec::new();
    while let Some(m) = common::t(ch.basic_get(q, BasicGetOptions { no_ack: true }))
        .await
        .expect("basic.get")
    {
        out.push(String::from_utf8_lossy(&m.delivery.data).to_string());
    }
    let _ = conn.close(200, "bye").await;
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_on_another_node_live_on_the_home_node_and_are_nacked_when_it_is_down() {
    let (mut a, b, c) = three_nodes("fwd-pub").await;
    declare_durable(&a, "fq").await;
    wait_visible(&b, "fq").await;
    wait_visible(&c, "fq").await;

    // Confirms on B come after A has the messages (on disk: persistent,
    // durable queue).
    let conn_b = b.connect().await;
    let ch_b = channel(&conn_b).await;
    common::t(ch_b.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    // The data link from B to A may still be opening: the first publishes
    // can be nacked, never lost silently; retry until one is acked.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (acked, nacked) = publish_confirmed(&ch_b, "fq", 1, "probe").await;
        if acked == 1 {
            break;
        }
        assert_eq!(nacked, 1);
        assert!(Instant::now() < deadline, "B never forwarded to A");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (acked, nacked) = publish_confirmed(&ch_b, "fq", 20, "b").await;
    assert_eq!((acked, nacked), (20, 0));
    // A publish on C reaches A too.
    let conn_c = c.connect().await;
    let ch_c = channel(&conn_c).await;
    common::t(ch_c.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (acked, _) = publish_confirmed(&ch_c, "fq", 1, "c").await;
        if acked == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "C never forwarded to A");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let on_a = passive(&a, "fq").await.expect("passive on A");
    assert_eq!(
        on_a.0, 22,
        "A holds every message: probe, 20 from B, 1 from C"
    );
    // The admin API on B and C shows the home node's figures.
    for n in [&b, &c] {
        let (status, q) = n.get("/api/queues/%2F/fq");
        assert_eq!(status, 200);
        assert_eq!(q["messages"].as_u64(), Some(22), "on {}", n.name());
        assert_eq!(q["node"].as_str(), Some(a.name().as_str()));
        let (_, list) = n.get("/api/queues");
        let fq = list
            .as_array()
            .into_iter()
            .flatten()
            .find(|q| q["name"] == "fq")
            .expect("fq listed");
        assert_eq!(fq["messages_ready"].as_u64(), Some(22), "on {}", n.name());
    }

    // A killed: B's confirming publishes are nacked, never acked.
    a.kill();
    eventually("A seen down by B", Duration::from_secs(10), || {
        !b.running().contains(&a.name())
    })
    .await;
    // With A down the API shows B's and C's own copies: they keep nothing.
    for n in [&b, &c] {
        let (_, q) = n.get("/api/queues/%2F/fq");
        assert_eq!(q["messages"].as_u64(), Some(0), "{} keeps none", n.name());
    }
    let (acked, nacked) = publish_confirmed(&ch_b, "fq", 5, "lost").await;
    assert_eq!(
        (acked, nacked),
        (0, 5),
        "no false ack with the home node down"
    );
    let _ = conn_c.close(200, "bye").await;

    // A back: the persistent messages are still there, and only those; B's
    // link comes back by itself.
    a.start().await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while passive(&a, "fq").await != Ok((22, 0)) {
        assert!(Instant::now() < deadline, "{:?}", passive(&a, "fq").await);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if publish_confirmed(&ch_b, "fq", 1, "again").await.0 == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "B never reached A again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = conn_b.close(200, "bye").await;
    let bodies = drain(&a, "fq").await;
    assert_eq!(bodies.len(), 23, "{bodies:?}");
    assert_eq!(bodies[1], "b-0");
    assert_eq!(bodies[20], "b-19");
    assert_eq!(bodies[22], "again-0");
    assert!(bodies.iter().all(|b| !b.starts_with("lost")));
}

/// Publish on `ch` (confirming) until one publish is acked: the data link to
/// the home node is up.
async fn until_acked(ch: &Channel, q: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if publish_confirmed(ch, q, 1, "probe").await.0 == 1 {
            return;
        }
        assert!(Instant::now() < deadline, "never forwarded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Close a channel that holds deliveries from a consumer on another node
/// (with more time than `common::t`: this machine is shared while testing).
async fn close_channel(ch: &Channel) {
    tokio::time::timeout(Duration::from_secs(15), ch.close(200, "bye"))
        .await
        .expect("close-ok within 15 s")
        .expect("close");
}

async fn until_count(node: &Node, q: &str, want: u32) {
    until_passive(node, q, ("messages", |(m, _)| m), want).await;
}

/// Wait until `q`'s consumer count on `node` is `want`.
async fn until_consumers(node: &Node, q: &str, want: u32) {
    until_passive(node, q, ("consumers", |(_, c)| c), want).await;
}

/// A count a passive declare answers (named, and how to pick it from the
/// messages and consumers).
type Count = (&'static str, fn((u32, u32)) -> u32);

/// Wait (10 s at most) until the count `what` picks from a passive declare
/// of `q` on `node` is `want`.
async fn until_passive(node: &Node, q: &str, what: Count, want: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = what.1(passive(node, q).await.expect("passive"));
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{q} on {}: {got} {}, want {want}",
            node.name(),
            what.0
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_on_other_nodes_are_served_by_the_home_node_and_cancelled_when_it_dies() {
    use futures::StreamExt;
    let (mut a, b, c) = three_nodes("fwd-con").await;
    declare_durable(&a, "cq").await;
    wait_visible(&b, "cq").await;
    wait_visible(&c, "cq").await;
    let conn_b = b.connect().await;
    let ch_b = channel(&conn_b).await;
    common::t(ch_b.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    until_acked(&ch_b, "cq").await;
    assert_eq!(publish_confirmed(&ch_b, "cq", 10, "m").await, (10, 0));
    until_count(&a, "cq", 11).await;

    // Consumed on C with a prefetch of 3, acked one by one: C's own tags.
    let conn_c = c.connect().await;
    let ch_c = channel(&conn_c).await;
    common::t(ch_c.basic_qos(3, BasicQosOptions::default()))
        .await
        .expect("qos");
    let mut consumer = common::t(ch_c.basic_consume(
        "cq",
        "c1",
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("consume on C");
    let mut bodies = Vec::new();
    for i in 0..11u64 {
        let d = common::t(consumer.next())
            .await
            .expect("a delivery")
            .expect("delivery ok");
        assert_eq!(d.delivery_tag, i + 1, "C numbers its own deliveries");
        assert!(!d.redelivered);
        bodies.push(String::from_utf8_lossy(&d.data).to_string());
        common::t(d.ack(BasicAckOptions::default()))
            .await
            .expect("ack");
    }
    assert_eq!(bodies[0], "probe-0");
    assert_eq!(
        bodies[1..],
        (0..10).map(|i| format!("m-{i}")).collect::<Vec<_>>()[..]
    );
    until_count(&a, "cq", 0).await;
    // The consumer counts on the home node (passive declare there).
    assert_eq!(passive(&a, "cq").await.expect("passive").1, 1);
    // Every node's API lists it once, with its channel on C.
    for node in [&a, &b, &c] {
        let (_, listed) = node.get("/api/consumers");
        let rows = listed.as_array().cloned().unwrap_or_default();
        assert_eq!(rows.len(), 1, "{listed}");
        let d = &rows[0]["channel_details"];
        assert_eq!(d["node"], c.name().as_str(), "{listed}");
        assert_eq!(d["user"], "guest", "{listed}");
        assert_eq!(d["number"], 1, "{listed}");
        assert_eq!(rows[0]["prefetch_count"], 3, "the client's own: {listed}");
        let conn = d["connection_name"].as_str().unwrap_or_default();
        assert!(conn.ends_with(&format!("{}:{}", c.ip, c.amqp)), "{listed}");
        // And the queue's own view, from its home node.
        let (_, queue) = node.get("/api/queues/%2F/cq");
        let details = queue["consumer_details"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert_eq!(details.len(), 1, "{queue}");
        assert_eq!(details[0]["consumer_tag"], "c1", "{queue}");
        assert_eq!(details[0]["channel_details"]["node"], c.name().as_str());
    }
    // A consume the home node refuses (exclusive, with c1 there) gets the
    // channel error a local one gets, instead of consume-ok; c1 goes on.
    let ch_x = channel(&conn_c).await;
    let r = common::t(ch_x.basic_consume(
        "cq",
        "cx",
        BasicConsumeOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await;
    common::assert_code(r.map(drop), 403);
    assert_eq!(publish_confirmed(&ch_b, "cq", 1, "after").await, (1, 0));
    let d = common::t(consumer.next())
        .await
        .expect("a delivery")
        .expect("delivery ok");
    assert_eq!(String::from_utf8_lossy(&d.data), "after-0");
    common::t(d.ack(BasicAckOptions::default()))
        .await
        .expect("ack");
    until_count(&a, "cq", 0).await;
    common::t(ch_c.basic_cancel("c1", BasicCancelOptions::default()))
        .await
        .expect("cancel");

    // A channel-wide prefetch (basic.qos global) holds across the channel's
    // remote consumers: two consumers on C, at most 2 unacked between them,
    // more only as they are acked; all 6 reach them in the end.
    assert_eq!(publish_confirmed(&ch_b, "cq", 6, "g").await, (6, 0));
    let ch_g = channel(&conn_c).await;
    common::t(ch_g.basic_qos(2, BasicQosOptions { global: true }))
        .await
        .expect("qos global");
    let mut consumers = Vec::new();
    for tag in ["g1", "g2"] {
        let opts = BasicConsumeOptions::default();
        let consumer = common::t(ch_g.basic_consume("cq", tag, opts, FieldTable::default()));
        consumers.push(consumer.await.expect("consume"));
    }
    let mut both = futures::stream::select_all(consumers);
    let mut held = std::collections::VecDeque::new();
    let mut got = Vec::new();
    while got.len() < 6 {
        while held.len() < 2 && got.len() < 6 {
            let d = common::t(both.next())
                .await
                .expect("a delivery")
                .expect("delivery ok");
            got.push(String::from_utf8_lossy(&d.data).to_string());
            held.push_back(d);
        }
        // The window is full: nothing more until an ack.
        let more = tokio::time::timeout(Duration::from_millis(300), both.next()).await;
        assert!(more.is_err(), "a third unacked delivery: {more:?}");
        let d = held.pop_front().expect("one held");
        common::t(d.ack(BasicAckOptions::default()))
            .await
            .expect("ack");
    }
    for d in held {
        common::t(d.ack(BasicAckOptions::default()))
            .await
            .expect("ack");
    }
    got.sort();
    assert_eq!(got, (0..6).map(|i| format!("g-{i}")).collect::<Vec<_>>());
    until_count(&a, "cq", 0).await;
    close_channel(&ch_g).await;
    // The home node learns of the channel's end after its close-ok (as a
    // RabbitMQ queue learns of a channel's end from its monitor): a
    // message published before could go to its consumers and come back
    // redelivered.
    until_consumers(&a, "cq", 0).await;

    // Unacked on C when its channel closes: the home node requeues them,
    // redelivered.
    assert_eq!(publish_confirmed(&ch_b, "cq", 4, "r").await, (4, 0));
    let ch_c2 = channel(&conn_c).await;
    let mut consumer2 = common::t(ch_c2.basic_consume(
        "cq",
        "c2",
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("consume on C");
    for _ in 0..4 {
        let d = common::t(consumer2.next())
            .await
            .expect("delivery")
            .expect("ok");
        assert!(!d.redelivered);
    }
    until_count(&a, "cq", 0).await;
    close_channel(&ch_c2).await;
    until_count(&a, "cq", 4).await;
    let on_a = a.connect().await;
    let ch_a = channel(&on_a).await;
    let m = common::t(ch_a.basic_get("cq", BasicGetOptions { no_ack: true }))
        .await
        .expect("get")
        .expect("a message");
    assert!(
        m.delivery.redelivered,
        "requeued by the home node: redelivered"
    );
    let _ = on_a.close(200, "bye").await;

    // The home node dies: C's consumer is cancelled (basic.cancel), and a
    // declare of the queue on C names the home node as down.
    let ch_c3 = channel(&conn_c).await;
    let mut consumer3 = common::t(ch_c3.basic_consume(
        "cq",
        "c3",
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("consume on C");
    for _ in 0..3 {
        let d = common::t(consumer3.next())
            .await
            .expect("delivery")
            .expect("ok");
        assert!(d.redelivered, "the rest of the requeued ones");
        common::t(d.ack(BasicAckOptions::default()))
            .await
            .expect("ack");
    }
    until_count(&a, "cq", 0).await;
    a.kill();
    let end = tokio::time::timeout(Duration::from_secs(10), consumer3.next())
        .await
        .expect("basic.cancel within 10 s");
    assert!(
        end.is_none() || end.as_ref().is_some_and(|d| d.is_err()),
        "the consumer ended: {end:?}"
    );
    let err = passive(&c, "cq")
        .await
        .expect_err("404 with the home node down");
    assert!(err.contains("NOT_FOUND") || err.contains("404"), "{err}");
    assert!(
        err.contains(&format!(
            "home node '{}' of durable queue 'cq' in vhost '/' is down or inaccessible",
            a.name()
        )),
        "{err}"
    );
    let _ = conn_b.close(200, "bye").await;
    let _ = conn_c.close(200, "bye").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_operations_on_other_nodes_are_answered_by_the_home_node() {
    let (a, b, c) = three_nodes("fwd-ops").await;
    declare_durable(&a, "oq").await;
    wait_visible(&b, "oq").await;
    wait_visible(&c, "oq").await;
    let conn_b = b.connect().await;
    let ch_b = channel(&conn_b).await;
    common::t(ch_b.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    until_acked(&ch_b, "oq").await;
    assert_eq!(publish_confirmed(&ch_b, "oq", 5, "m").await, (5, 0));

    // Passive declare on every node: the home node's counts; so does a
    // (non-passive) redeclare on another node.
    for n in [&a, &b, &c] {
        assert_eq!(passive(n, "oq").await, Ok((6, 0)), "on {}", n.name());
    }
    let redeclared = common::t(ch_b.queue_declare(
        "oq",
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .expect("redeclare on B");
    assert_eq!(redeclared.message_count(), 6);
    // A consumer on C counts everywhere.
    let conn_c = c.connect().await;
    let ch_c = channel(&conn_c).await;
    common::t(ch_c.basic_qos(1, BasicQosOptions::default()))
        .await
        .expect("qos");
    let consumer = common::t(ch_c.basic_consume(
        "oq",
        "held",
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("consume");
    let deadline = Instant::now() + Duration::from_secs(10);
    while passive(&b, "oq").await != Ok((5, 1)) {
        assert!(Instant::now() < deadline, "{:?}", passive(&b, "oq").await);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // queue.delete if-unused / if-empty on B: checked on the home node.
    let ch_del = channel(&conn_b).await;
    let err = common::t(ch_del.queue_delete(
        "oq",
        QueueDeleteOptions {
            if_unused: true,
            ..Default::default()
        },
    ))
    .await
    .expect_err("in use on the home node");
    assert!(err.to_string().contains("in use"), "{err}");
    // Closed with its consumer still held: lapin cancels a dropped consumer
    // from a task of its own, and a close racing that cancel fails the
    // whole connection on the client side (its `basic_cancel` finds the
    // channel closing and reports that as a connection error).
    close_channel(&ch_c).await;
    drop(consumer);
    until_count(&b, "oq", 6).await;
    let ch_del = channel(&conn_b).await;
    let err = common::t(ch_del.queue_delete(
        "oq",
        QueueDeleteOptions {
            if_empty: true,
            ..Default::default()
        },
    ))
    .await
    .expect_err("not empty on the home node");
    assert!(err.to_string().contains("is not empty"), "{err}");

    // basic.get on B: from the home node, acked on B, gone on A.
    let ch_get = channel(&conn_b).await;
    let m = common::t(ch_get.basic_get("oq", BasicGetOptions { no_ack: false }))
        .await
        .expect("get")
        .expect("a message");
    assert_eq!(m.delivery.data, b"probe-0");
    assert_eq!(m.message_count, 5);
    assert!(m.delivery.redelivered, "requeued when C's channel closed");
    common::t(m.delivery.ack(BasicAckOptions::default()))
        .await
        .expect("ack");
    until_count(&a, "oq", 5).await;
    // One got and not acked goes back when the channel closes.
    let m = common::t(ch_get.basic_get("oq", BasicGetOptions { no_ack: false }))
        .await
        .expect("get")
        .expect("a message");
    assert_eq!(m.delivery.data, b"m-0");
    until_count(&a, "oq", 4).await;
    close_channel(&ch_get).await;
    until_count(&a, "oq", 5).await;

    // queue.purge on C: the home node's messages, counted.
    let ch_p = channel(&conn_c).await;
    let purged = common::t(ch_p.queue_purge("oq", QueuePurgeOptions::default()))
        .await
        .expect("purge");
    assert_eq!(purged, 5);
    assert_eq!(passive(&a, "oq").await, Ok((0, 0)));
    // A queue.delete on B reports the home node's count and is replicated.
    assert_eq!(publish_confirmed(&ch_b, "oq", 2, "d").await, (2, 0));
    let ch_e = channel(&conn_c).await;
    let empty = common::t(ch_e.basic_get("oq", BasicGetOptions { no_ack: true }))
        .await
        .expect("get")
        .expect("one of the two");
    assert_eq!(empty.delivery.data, b"d-0");
    let ch_d = channel(&conn_b).await;
    let deleted = common::t(ch_d.queue_delete("oq", QueueDeleteOptions::default()))
        .await
        .expect("delete on B");
    assert_eq!(deleted, 1);
    for n in [&a, &b, &c] {
        let deadline = Instant::now() + Duration::from_secs(10);
        while passive(n, "oq").await.is_ok() {
            assert!(Instant::now() < deadline, "oq still on {}", n.name());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let ch_e = channel(&conn_c).await;
    let gone = common::t(ch_e.basic_get("oq", BasicGetOptions { no_ack: true })).await;
    assert!(gone.is_err(), "404 once deleted: {gone:?}");
    let _ = conn_b.close(200, "bye").await;
    let _ = conn_c.close(200, "bye").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_is_led_by_its_home_node_and_consumed_from_another_node() {
    use futures::StreamExt;
    use rabbitmq_stream_client::{Client, ClientOptions};
    let (a, b) = two_stream_nodes("fwd-stream").await;
    // A stream declared over AMQP on A.
    let conn_a = a.connect().await;
    let ch_a = channel(&conn_a).await;
    common::stream::declare_stream(&ch_a, "sq").await;
    let _ = conn_a.close(200, "bye").await;
    wait_visible(&b, "sq").await;

    // Stream protocol metadata on B names A as the leader.
    let client = Client::connect(
        ClientOptions::builder()
            .host(&b.ip)
            .port(b.stream.expect("stream port"))
            .build(),
    )
    .await
    .expect("stream client on B");
    let m = common::t(client.metadata(vec!["sq".to_string()]))
        .await
        .expect("metadata");
    let md = m.get("sq").expect("sq metadata");
    assert_eq!(md.leader.host, a.ip);
    assert_eq!(md.leader.port, u32::from(a.stream.expect("stream port")));
    let _ = client.close().await;

    // Published over AMQP on B (forwarded to A's log), read over AMQP on B
    // from the first offset (the consumer lives on A).
    let conn_b = b.connect().await;
    let ch_b = channel(&conn_b).await;
    common::t(ch_b.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
    until_acked(&ch_b, "sq").await;
    assert_eq!(publish_confirmed(&ch_b, "sq", 3, "s").await, (3, 0));
    let ch_c = channel(&conn_b).await;
    common::t(ch_c.basic_qos(10, BasicQosOptions::default()))
        .await
        .expect("qos");
    let mut cargs = FieldTable::default();
    cargs.insert(
        "x-stream-offset".into(),
        lapin::types::AMQPValue::LongString("first".into()),
    );
    let mut consumer =
        common::t(ch_c.basic_consume("sq", "reader", BasicConsumeOptions::default(), cargs))
            .await
            .expect("consume the stream on B");
    let mut bodies = Vec::new();
    while bodies.len() < 4 {
        let d = common::t(consumer.next())
            .await
            .expect("delivery")
            .expect("ok");
        bodies.push(String::from_utf8_lossy(&d.data).to_string());
        common::t(d.ack(BasicAckOptions::default()))
            .await
            .expect("ack");
    }
    assert_eq!(bodies[1..], ["s-0", "s-1", "s-2"]);
    let _ = conn_b.close(200, "bye").await;
}
