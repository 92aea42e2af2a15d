//! Deletions the broker makes by itself, in a cluster: a queue whose
//! `x-expires` ran out and an auto-delete queue whose last consumer went are
//! deleted on their home node, and the home node proposes the deletion to
//! the metadata group, so every node drops the queue's record and bindings
//! (an auto-delete exchange they leave without bindings goes too). An
//! auto-delete exchange unbound from its last queue is gone from every
//! node's broker and from the replicated model. Without a majority the home
//! node deletes the queue anyway, logs that the deletion was not committed,
//! and proposes it again later: once the home node reaches a majority again
//! the record goes from every node, with no client action.

mod common;

use common::cluster::*;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::ExchangeKind;
use serde_json::Value;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(15);

/// The queue names `/api/cluster` on `node` lists (the replicated model).
fn model_queues(node: &Node) -> Vec<String> {
    let (_, v) = node.get("/api/cluster");
    v["queues"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|q| q["name"].as_str().map(String::from))
        .collect()
}

/// The replicated model's (exchanges, bindings) counts on `node`.
fn model_counts(node: &Node) -> (u64, u64) {
    let (_, v) = node.get("/api/cluster");
    (
        v["exchanges"].as_u64().unwrap_or(u64::MAX),
        v["bindings"].as_u64().unwrap_or(u64::MAX),
    )
}

/// The status of `GET /api/queues/%2F/{q}` on `node`.
fn api_queue(node: &Node, q: &str) -> u16 {
    node.get(&format!("/api/queues/%2F/{q}")).0
}

fn api_exchange(node: &Node, x: &str) -> u16 {
    node.get(&format!("/api/exchanges/%2F/{x}")).0
}

/// The reply code of a passive declare of queue `q` on `node` (200: found).
async fn passive_queue(node: &Node, q: &str) -> u16 {
    let conn = node.connect().await;
    let ch = common::t(conn.create_channel()).await.expect("channel");
    let opts = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let code = match common::t(ch.queue_declare(q, opts, FieldTable::default())).await {
        Ok(_) => 200,
        Err(e) => common::code(&e).unwrap_or(0),
    };
    let _ = conn.close(200, "bye").await;
    code
}

/// The reply code of a passive declare of exchange `x` on `node`.
async fn passive_exchange(node: &Node, x: &str) -> u16 {
    let conn = node.connect().await;
    let ch = common::t(conn.create_channel()).await.expect("channel");
    let opts = ExchangeDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let r = common::t(ch.exchange_declare(x, ExchangeKind::Direct, opts, FieldTable::default()));
    let code = match r.await {
        Ok(()) => 200,
        Err(e) => common::code(&e).unwrap_or(0),
    };
    let _ = conn.close(200, "bye").await;
    code
}

/// Wait until queue `q` is known to every node: its broker (admin API) and
/// the replicated model.
async fn wait_everywhere(nodes: &[&Node], q: &str) {
    for node in nodes {
        eventually(&format!("{q} on {}", node.name()), WAIT, || {
            api_queue(node, q) == 200 && model_queues(node).iter().any(|n| n == q)
        })
        .await;
    }
}

/// Wait until queue `q` is gone from every node: its broker (admin API) and
/// the replicated model. Fails naming the nodes that still have it.
async fn wait_gone_everywhere(nodes: &[&Node], q: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let left: Vec<String> = nodes
            .iter()
            .filter(|n| api_queue(n, q) != 404 || model_queues(n).iter().any(|m| m == q))
            .map(|n| n.name())
            .collect();
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "queue {q} still on {left:?} (admin API or replicated model)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn expires(ms: i32) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert("x-expires".into(), AMQPValue::LongInt(ms));
    args
}

/// Declare the durable queue `q` expiring after `ms` through `ch`.
async fn declare_expiring(ch: &lapin::Channel, q: &str, ms: i32) {
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    common::t(ch.queue_declare(q, durable, expires(ms)))
        .await
        .expect("queue.declare");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_queue_is_gone_on_every_node() {
    let (a, mut b, mut c) = three_nodes("selfdel-expires").await;
    let (q, x) = (common::uniq("xq"), common::uniq("xx"));
    let conn = a.connect().await;
    let ch = common::t(conn.create_channel()).await.expect("channel");
    // An auto-delete exchange whose only binding is to the queue: it goes
    // with the queue, on every node.
    let ad = ExchangeDeclareOptions {
        auto_delete: true,
        ..Default::default()
    };
    common::t(ch.exchange_declare(&x, ExchangeKind::Direct, ad, FieldTable::default()))
        .await
        .expect("exchange.declare");
    declare_expiring(&ch, &q, 1500).await;
    common::t(ch.queue_bind(&q, &x, "k", Default::default(), FieldTable::default()))
        .await
        .expect("queue.bind");
    let _ = conn.close(200, "bye").await;
    let declared = Instant::now();
    let nodes = [&a, &b, &c];
    wait_everywhere(&nodes, &q).await;
    for node in [&b, &c] {
        assert_eq!(passive_queue(node, &q).await, 200, "{q} on {}", node.name());
        assert_eq!(api_exchange(node, &x), 200, "{x} on {}", node.name());
        assert!(has_binding(node, &x, &q, "k"), "binding on {}", node.name());
    }
    let (_, home) = b.get(&format!("/api/queues/%2F/{q}"));
    assert_eq!(home["node"], a.name(), "{home}");

    // Its home node expires it 1.5 s after its last use; every node drops it.
    wait_gone_everywhere(&nodes, &q, WAIT).await;
    assert!(
        declared.elapsed() >= Duration::from_millis(1400),
        "gone before it could expire"
    );
    for node in [&b, &c] {
        assert_eq!(passive_queue(node, &q).await, 404, "{q} on {}", node.name());
    }
    for node in nodes {
        eventually(&format!("{x} gone on {}", node.name()), WAIT, || {
            api_exchange(node, &x) == 404 && model_counts(node) == (0, 0)
        })
        .await;
    }
    assert_eq!(passive_exchange(&b, &x).await, 404);

    // Declared again on B after it expired: a new queue, homed on B, that
    // the old one's expiry does not touch.
    let conn = b.connect().await;
    let ch = common::t(conn.create_channel()).await.expect("channel");
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    common::t(ch.queue_declare(&q, durable, FieldTable::default()))
        .await
        .expect("queue.declare again");
    let _ = conn.close(200, "bye").await;
    wait_everywhere(&nodes, &q).await;
    let (_, home) = c.get(&format!("/api/queues/%2F/{q}"));
    assert_eq!(home["node"], b.name(), "{home}");

    // No majority: A deletes its expired queue all the same, and says the
    // deletion was not committed (B and C, stopped, keep the record).
    let q2 = common::uniq("xq2");
    let conn = a.connect().await;
    let ch = common::t(conn.create_channel()).await.expect("channel");
    declare_expiring(&ch, &q2, 1000).await;
    let _ = conn.close(200, "bye").await;
    wait_everywhere(&nodes, &q2).await;
    b.stop();
    c.stop();
    eventually("A's queue expired locally", WAIT, || {
        api_queue(&a, &q2) == 404
    })
    .await;
    assert_eq!(passive_queue(&a, &q2).await, 404);
    eventually("the uncommitted deletion logged", WAIT, || {
        a.log()
            .lines()
            .any(|l| l.contains("WARN") && l.contains(&q2) && l.contains("not committed"))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auto_delete_queue_goes_everywhere_with_its_last_consumer() {
    let (a, b, c) = three_nodes("selfdel-auto").await;
    let q = common::uniq("aq");
    let conn = a.connect().await;
    let ch = common::t(conn.create_channel()).await.expect("channel");
    let ad = QueueDeclareOptions {
        auto_delete: true,
        ..Default::default()
    };
    common::t(ch.queue_declare(&q, ad, FieldTable::default()))
        .await
        .expect("queue.declare");
    let _consumer = common::t(ch.basic_consume(
        &q,
        "c1",
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("basic.consume");
    let nodes = [&a, &b, &c];
    wait_everywhere(&nodes, &q).await;
    for node in [&b, &c] {
        assert_eq!(passive_queue(node, &q).await, 200, "{q} on {}", node.name());
    }
    // The consumer keeps it: still everywhere a while later.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for node in nodes {
        assert_eq!(api_queue(node, &q), 200, "{q} on {}", node.name());
    }

    common::t(ch.basic_cancel("c1", BasicCancelOptions::default()))
        .await
        .expect("basic.cancel");
    wait_gone_everywhere(&nodes, &q, WAIT).await;
    for node in [&b, &c] {
        assert_eq!(passive_queue(node, &q).await, 404, "{q} on {}", node.name());
    }
    let _ = conn.close(200, "bye").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auto_delete_exchange_unbound_is_gone_everywhere() {
    let (a, b, c) = three_nodes("selfdel-exchange").await;
    let (x, q) = (common::uniq("ax"), common::uniq("aq"));
    let nodes = [&a, &b, &c];
    let base: Vec<(u64, u64)> = nodes.iter().map(|n| model_counts(n)).collect();
    let conn = a.connect().await;
    let ch = common::t(conn.create_channel()).await.expect("channel");
    let ad = ExchangeDeclareOptions {
        auto_delete: true,
        ..Default::default()
    };
    common::t(ch.exchange_declare(&x, ExchangeKind::Direct, ad, FieldTable::default()))
        .await
        .expect("exchange.declare");
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    common::t(ch.queue_declare(&q, durable, FieldTable::default()))
        .await
        .expect("queue.declare");
    common::t(ch.queue_bind(&q, &x, "k", Default::default(), FieldTable::default()))
        .await
        .expect("queue.bind");
    for (node, (e, bnd)) in nodes.iter().zip(&base) {
        wait_passive(node, &x, &q).await;
        eventually(&format!("{x} bound on {}", node.name()), WAIT, || {
            has_binding(node, &x, &q, "k") && model_counts(node) == (e + 1, bnd + 1)
        })
        .await;
    }

    common::t(ch.queue_unbind(&q, &x, "k", FieldTable::default()))
        .await
        .expect("queue.unbind");
    let _ = conn.close(200, "bye").await;
    // Gone from every broker and from every node's replicated model (which
    // a snapshot would otherwise bring back); the queue stays.
    for (node, counts) in nodes.iter().zip(&base) {
        eventually(&format!("{x} gone on {}", node.name()), WAIT, || {
            api_exchange(node, &x) == 404 && model_counts(node) == *counts
        })
        .await;
        assert_eq!(api_queue(node, &q), 200);
    }
    for node in [&b, &c] {
        assert_eq!(
            passive_exchange(node, &x).await,
            404,
            "{x} on {}",
            node.name()
        );
    }
    let (_, v): (u16, Value) = a.get("/api/cluster");
    assert!(v["queues"].to_string().contains(&q), "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deletion_not_committed_is_proposed_again_after_the_heal() {
    // Every link between nodes goes through a proxy the test cuts.
    let (nodes, proxies) = start_proxied("selfdel-retry", 2000).await;
    let [a, b, c] = [&nodes[0], &nodes[1], &nodes[2]];
    wait_all_running(&[a, b, c]).await;
    let q = common::uniq("rq");
    let conn = a.connect().await;
    let ch = common::t(conn.create_channel()).await.expect("channel");
    declare_expiring(&ch, &q, 2000).await;
    let _ = conn.close(200, "bye").await;
    let all_nodes = [a, b, c];
    wait_everywhere(&all_nodes, &q).await;
    let (_, home) = b.get(&format!("/api/queues/%2F/{q}"));
    assert_eq!(home["node"], a.name(), "{home}");

    // A, the queue's home, is cut off from B and C while the queue expires:
    // A deletes it and its proposal cannot commit.
    for ((from, to), p) in &proxies {
        if *from == 0 || *to == 0 {
            p.cut();
        }
    }
    eventually("A's queue expired locally", WAIT, || {
        api_queue(a, &q) == 404
    })
    .await;
    eventually("the uncommitted deletion logged", WAIT, || {
        a.log()
            .lines()
            .any(|l| l.contains("WARN") && l.contains(&q) && l.contains("not committed"))
    })
    .await;
    // The majority still has the record.
    for node in [b, c] {
        assert!(
            model_queues(node).iter().any(|n| n == &q),
            "{q} left the model on {} without A",
            node.name()
        );
        assert_eq!(api_queue(node, &q), 200, "{q} on {}", node.name());
    }

    // The links heal: A proposes the deletion again by itself, and the
    // record goes from every node (no client touches the queue).
    for p in proxies.values() {
        p.heal();
    }
    wait_gone_everywhere(&all_nodes, &q, Duration::from_secs(40)).await;
    for node in [b, c] {
        assert_eq!(passive_queue(node, &q).await, 404, "{q} on {}", node.name());
    }
}

/// A restart of the home node does not lose a deletion that had not
/// committed: a queue that expired while its home was cut off, and a
/// non-durable queue (which a restart loses, as RabbitMQ's transient
/// queues), are both deleted from every node once the home node is back,
/// while a durable queue it recovers stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_home_nodes_restart_deletes_the_records_of_queues_it_lost() {
    let (mut nodes, proxies) = start_proxied("selfdel-restart", 2000).await;
    wait_all_running(&nodes.iter().collect::<Vec<_>>()).await;
    let (expiring, transient, kept) = (common::uniq("rx"), common::uniq("rt"), common::uniq("rk"));
    let conn = nodes[0].connect().await;
    let ch = common::t(conn.create_channel()).await.expect("channel");
    declare_expiring(&ch, &expiring, 2000).await;
    let transient_opts = QueueDeclareOptions::default();
    common::t(ch.queue_declare(&transient, transient_opts, FieldTable::default()))
        .await
        .expect("queue.declare (non-durable)");
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    common::t(ch.queue_declare(&kept, durable, FieldTable::default()))
        .await
        .expect("queue.declare (durable)");
    let _ = conn.close(200, "bye").await;
    {
        let [a, b, c] = [&nodes[0], &nodes[1], &nodes[2]];
        for q in [&expiring, &transient, &kept] {
            wait_everywhere(&[a, b, c], q).await;
        }
    }

    // A, the home, is cut off while the first expires: its deletion cannot
    // commit. Then A stops, the links heal, and A starts again.
    for ((from, to), p) in &proxies {
        if *from == 0 || *to == 0 {
            p.cut();
        }
    }
    eventually("the uncommitted deletion logged", WAIT, || {
        nodes[0]
            .log()
            .lines()
            .any(|l| l.contains("WARN") && l.contains(&expiring) && l.contains("not committed"))
    })
    .await;
    nodes[0].stop();
    for p in proxies.values() {
        p.heal();
    }
    for node in [&nodes[1], &nodes[2]] {
        assert!(
            model_queues(node).iter().any(|n| n == &expiring),
            "{expiring} left the model on {} without A",
            node.name()
        );
    }
    nodes[0].start().await;

    let [a, b, c] = [&nodes[0], &nodes[1], &nodes[2]];
    wait_gone_everywhere(&[a, b, c], &expiring, Duration::from_secs(40)).await;
    wait_gone_everywhere(&[a, b, c], &transient, Duration::from_secs(40)).await;
    for node in [a, b, c] {
        assert_eq!(
            passive_queue(node, &transient).await,
            404,
            "on {}",
            node.name()
        );
        assert_eq!(passive_queue(node, &kept).await, 200, "on {}", node.name());
        assert!(model_queues(node).iter().any(|n| n == &kept));
    }
}
