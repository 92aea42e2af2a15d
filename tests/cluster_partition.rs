//! Partitions of the metadata group: three warren processes on 127.0.0.1-3
//! with a TCP proxy owned by the test between every directed pair (each node
//! reaches the others only through `[cluster] dial` overrides pointing at the
//! proxies), which the test cuts, delays and heals.
//!
//! Scenarios: an isolated leader (the majority elects another and keeps
//! committing, the old leader's clients get 541, it converges after the heal),
//! seeded random halves, a majority ring (each node reaches only one other),
//! kill -9 of the leader (time to a new leader accepting a declare is printed
//! and bounded) and the restart of a whole node. After every heal the
//! invariant is checked: every declare answered `-ok` exists on every node
//! (passive declares on all three).

mod common;

use common::cluster::{declare, eventually, start_proxied, wait_all_present, Node};
use common::proxy::Proxy;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The nodes' `commit_timeout_ms`.
const COMMIT_TIMEOUT_MS: u64 = 5000;

/// How long a declare may take before the test calls it hung.
const DECLARE_WITHIN: Duration = Duration::from_secs(15);

/// Three nodes and a proxy for each directed pair: `proxies[(i, j)]` carries
/// the connections node i opens to node j.
struct Net {
    nodes: Vec<Node>,
    proxies: BTreeMap<(usize, usize), Proxy>,
    /// Every exchange whose declare was answered -ok.
    acked: Vec<String>,
}

impl Net {
    async fn start(tag: &str) -> Net {
        let (nodes, proxies) = start_proxied(tag, COMMIT_TIMEOUT_MS).await;
        let net = Net {
            nodes,
            proxies,
            acked: Vec::new(),
        };
        net.wait_agreed_leader(Duration::from_secs(30)).await;
        eventually("three running members", Duration::from_secs(20), || {
            net.nodes.iter().all(|n| n.running().len() == 3)
        })
        .await;
        net
    }

    /// Cut every link to and from node `i`.
    fn isolate(&self, i: usize) {
        for ((a, b), p) in &self.proxies {
            if *a == i || *b == i {
                p.cut();
            }
        }
    }

    fn heal(&self) {
        for p in self.proxies.values() {
            p.heal();
            p.delay(0);
        }
    }

    /// The index of the node every node in `among` names as leader, once
    /// they agree (and it is among them).
    fn agreed(&self, among: &[usize]) -> Option<usize> {
        let views: Vec<Option<String>> = among.iter().map(|&i| self.nodes[i].leader()).collect();
        let first = views.first()?.clone()?;
        if views.iter().any(|v| v.as_deref() != Some(first.as_str())) {
            return None;
        }
        among
            .iter()
            .copied()
            .find(|&i| self.nodes[i].name() == first && self.nodes[i].raft_state() == "Leader")
    }

    async fn wait_agreed_leader(&self, within: Duration) -> usize {
        let deadline = Instant::now() + within;
        loop {
            if let Some(l) = self.agreed(&[0, 1, 2]) {
                return l;
            }
            assert!(Instant::now() < deadline, "no agreed leader");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Declare a fresh exchange on node `i`; recorded when answered -ok.
    async fn declare_on(&mut self, i: usize, tag: &str) -> Result<(), u16> {
        let x = common::uniq(tag);
        let r = declare(&self.nodes[i], &x, DECLARE_WITHIN).await;
        if r.is_ok() {
            self.acked.push(x);
        }
        r
    }

    /// The invariant: every declare answered -ok exists on every node.
    async fn check_invariant(&self) {
        for n in &self.nodes {
            wait_all_present(n, &self.acked, Duration::from_secs(20)).await;
        }
    }
}

fn others(i: usize) -> [usize; 2] {
    [(i + 1) % 3, (i + 2) % 3]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_leader_then_random_halves() {
    let mut net = Net::start("isol").await;
    for i in 0..3 {
        net.declare_on(i, "before")
            .await
            .expect("declare before any cut");
    }

    // The leader is cut off from both others.
    let old = net.wait_agreed_leader(Duration::from_secs(10)).await;
    let [p, q] = others(old);
    net.isolate(old);
    // The majority elects a new leader and keeps committing declares, made
    // on either of its nodes (the first ones may still be on their way to
    // the old leader when the cut happens).
    for k in 0..6 {
        let on = if k % 2 == 0 { p } else { q };
        let r = net.declare_on(on, "majority").await;
        assert_eq!(r, Ok(()), "declare on the majority side (node {on})");
    }
    let new = net
        .agreed(&[p, q])
        .expect("the majority agrees on a leader");
    assert_ne!(new, old, "the isolated node still leads the majority");
    // The old leader's clients: 541 within the commit timeout, never -ok.
    let started = Instant::now();
    let r = net.declare_on(old, "minority").await;
    assert_eq!(r, Err(541), "declare on the isolated old leader");
    assert!(started.elapsed() < Duration::from_millis(COMMIT_TIMEOUT_MS + 4000));

    // Heal: the old leader follows the new one and has everything.
    net.heal();
    eventually("the old leader follows", Duration::from_secs(20), || {
        net.nodes[old].leader() == Some(net.nodes[new].name())
    })
    .await;
    net.check_invariant().await;

    // Random halves (one node against two), seeded; a few rounds.
    let seed: u64 = std::env::var("WARREN_PARTITION_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(14);
    println!("random halves: seed {seed}");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for round in 0..3 {
        let alone = rng.gen_range(0..3);
        let delay = rng.gen_range(0..=8);
        for p in net.proxies.values() {
            p.delay(delay);
        }
        net.isolate(alone);
        for on in others(alone) {
            let r = net.declare_on(on, "half").await;
            assert_eq!(
                r,
                Ok(()),
                "round {round}: declare on node {on} of the majority"
            );
        }
        let r = net.declare_on(alone, "alone").await;
        assert_eq!(
            r,
            Err(541),
            "round {round}: declare on the lone node {alone}"
        );
        net.heal();
        net.check_invariant().await;
        net.wait_agreed_leader(Duration::from_secs(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_majority_ring() {
    let mut net = Net::start("ring").await;
    // Node i reaches node i+1 only: 0 -> 1 -> 2 -> 0. Every node has a
    // majority (itself and one other), each a different one.
    for ((a, b), p) in &net.proxies {
        if *b != (*a + 1) % 3 {
            p.cut();
        }
    }
    // Node 0's `/api/nodes`: it is cut off from node 2, which node 1
    // reaches (a partition, as RabbitMQ lists them); node 1 from node 0,
    // which answers node 0 itself; node 2 does not answer node 0.
    let partitions = || -> Vec<Value> {
        let (_, nodes) = net.nodes[0].get("/api/nodes");
        (0..3)
            .map(|i| {
                let name = net.nodes[i].name();
                let all = nodes.as_array().into_iter().flatten();
                let mut mine = all.filter(|n| n["name"] == name.as_str());
                mine.next().map_or(Value::Null, |n| n["partitions"].clone())
            })
            .collect()
    };
    let expected = vec![
        serde_json::json!([net.nodes[2].name()]),
        serde_json::json!([net.nodes[0].name()]),
        serde_json::json!([]),
    ];
    eventually(
        "the ring's partitions listed",
        Duration::from_secs(20),
        || partitions() == expected,
    )
    .await;
    // Declares on every node at once for a while: each either commits or is
    // refused with 541; none hangs. A declare made on the leader commits (it
    // reaches one follower: a majority); one made on a follower whose link to
    // the leader is cut cannot be forwarded and gets 541.
    let until = Instant::now() + Duration::from_secs(6);
    let run = |i: usize| {
        let node = &net.nodes[i];
        async move {
            let (mut acked, mut refused) = (Vec::new(), 0);
            while Instant::now() < until {
                let x = common::uniq("ring");
                match declare(node, &x, DECLARE_WITHIN).await {
                    Ok(()) => acked.push(x),
                    Err(541) => refused += 1,
                    Err(code) => panic!("declare in the ring on node {i}: unexpected {code}"),
                }
            }
            (acked, refused)
        }
    };
    let results = futures::future::join_all((0..3).map(run)).await;
    let ok: usize = results.iter().map(|(a, _)| a.len()).sum();
    let refused: usize = results.iter().map(|(_, r)| r).sum();
    for (acked, _) in results {
        net.acked.extend(acked);
    }
    assert!(ok > 0, "no declare committed in the majority ring");
    println!("majority ring: {ok} declares committed, {refused} refused with 541");
    net.heal();
    net.wait_agreed_leader(Duration::from_secs(20)).await;
    let none = vec![serde_json::json!([]); 3];
    eventually("no partitions once healed", Duration::from_secs(20), || {
        partitions() == none
    })
    .await;
    // Committing works again everywhere, and nothing acknowledged was lost.
    for i in 0..3 {
        net.declare_on(i, "after")
            .await
            .expect("declare after the heal");
    }
    net.check_invariant().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_leader_then_a_whole_node_restarts() {
    let mut net = Net::start("kill").await;
    for i in 0..3 {
        net.declare_on(i, "before")
            .await
            .expect("declare before the kill");
    }
    let old = net.wait_agreed_leader(Duration::from_secs(10)).await;
    let [p, q] = others(old);
    net.nodes[old].kill();
    let killed = Instant::now();
    // Time until a declare on a survivor is answered -ok: the new leader is
    // elected, knows itself and commits.
    let mut k = 0;
    let failover = loop {
        let on = if k % 2 == 0 { p } else { q };
        if net.declare_on(on, "failover").await.is_ok() {
            break killed.elapsed();
        }
        k += 1;
        assert!(
            killed.elapsed() < Duration::from_secs(15),
            "no new leader accepted a declare within 15 s"
        );
    };
    println!("failover after kill -9 of the leader: {failover:?} to a committed declare");
    assert!(
        failover < Duration::from_secs(10),
        "failover took {failover:?}"
    );
    let new = net.agreed(&[p, q]).expect("survivors agree on a leader");
    assert_ne!(new, old);
    for on in [p, q] {
        net.declare_on(on, "without")
            .await
            .expect("declare on a survivor");
    }

    // The killed node comes back on its data directory and catches up.
    net.nodes[old].start().await;
    net.check_invariant().await;
    eventually(
        "three running members again",
        Duration::from_secs(20),
        || net.nodes.iter().all(|n| n.running().len() == 3),
    )
    .await;

    // A whole node (a follower) restarts while the others keep committing;
    // declares on it work again once it is back.
    let f = others(new)[0];
    net.nodes[f].stop();
    for on in others(f) {
        net.declare_on(on, "meanwhile")
            .await
            .expect("declare while one is down");
    }
    net.nodes[f].start().await;
    let back = Instant::now();
    loop {
        if net.declare_on(f, "restarted").await.is_ok() {
            break;
        }
        assert!(
            back.elapsed() < Duration::from_secs(15),
            "the restarted node never committed a declare"
        );
    }
    net.check_invariant().await;
}
