//! What the Jepsen-style checks (tests/cluster_jepsen.rs for a classic queue,
//! tests/cluster_quorum_jepsen.rs for a quorum queue,
//! tests/cluster_stream_jepsen.rs for Stream protocol publishing) share: the
//! three proxied nodes and the link faults the nemesis makes, how a publish
//! ended, and the per-phase table of what was published and consumed, with
//! the acked publishes never consumed (lost).

use super::cluster::Node;
use super::proxy::Proxy;
use rand::Rng;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// Three nodes that reach each other only through the test's proxies
/// (`start_proxied`, key `(from, to)`): what the nemesis cuts and heals.
pub struct Net {
    pub nodes: Vec<Node>,
    pub proxies: BTreeMap<(usize, usize), Proxy>,
}

impl Net {
    /// Three proxied nodes (with Stream listeners when `stream`), a 5 s
    /// commit timeout, started and all running in every node's view.
    pub async fn start(tag: &str, stream: bool) -> Net {
        let (nodes, proxies) = super::cluster::start_proxied_with(tag, 5000, stream).await;
        let net = Net { nodes, proxies };
        super::cluster::eventually("three running members", Duration::from_secs(30), || {
            net.nodes.iter().all(|n| n.running().len() == 3)
        })
        .await;
        net
    }

    /// Cut both directions between `a` and `b`.
    pub fn cut(&self, a: usize, b: usize) {
        self.proxies[&(a, b)].cut();
        self.proxies[&(b, a)].cut();
    }

    /// Cut `i` from the two others.
    pub fn isolate(&self, i: usize) {
        for j in 0..3 {
            if j != i {
                self.cut(i, j);
            }
        }
    }

    pub fn heal(&self) {
        for p in self.proxies.values() {
            p.heal();
        }
    }

    /// The index of the node named `name`.
    pub fn index(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name() == name)
    }

    /// Make one of the link faults around node 0 (A, the home node):
    /// [`LINK_FAULTS`] by name, `random halves` isolating a node `rng`
    /// picks; what was done, for the phase's name.
    pub fn link_fault(&self, fault: &str, rng: &mut impl Rng) -> String {
        match fault {
            "cut A-B" => self.cut(0, 1),
            "cut A-C" => self.cut(0, 2),
            "isolate A" => self.isolate(0),
            _ => {
                let alone = rng.gen_range(0..3);
                self.isolate(alone);
                return format!("random halves ({} alone)", ["A", "B", "C"][alone]);
            }
        }
        fault.to_string()
    }
}

impl Net {
    /// The nemesis' rounds: each of `faults` (in their order, see
    /// [`Net::link_fault`]) for `fault`, then healed for `heal`; every
    /// phase named in `phases` and the current one's index in `phase`;
    /// `on_cut` runs as each fault starts.
    pub async fn run_link_faults(
        &self,
        faults: &[&str],
        rng: &mut impl Rng,
        (fault, heal): (Duration, Duration),
        phases: &mut Vec<String>,
        phase: &std::sync::atomic::AtomicUsize,
        mut on_cut: impl FnMut(),
    ) {
        use std::sync::atomic::Ordering;
        for f in faults {
            let name = self.link_fault(f, rng);
            on_cut();
            phases.push(name);
            phase.store(phases.len() - 1, Ordering::Release);
            tokio::time::sleep(fault).await;
            self.heal();
            phases.push("heal".into());
            phase.store(phases.len() - 1, Ordering::Release);
            tokio::time::sleep(heal).await;
        }
    }
}

/// The nemesis' random source: seeded from the environment variable `var`
/// when set (a run replayed), else from a fresh seed; the seed is printed
/// with `label` and `var`, so any run can be replayed; and the seed.
pub fn seeded(var: &str, label: &str) -> (rand::rngs::StdRng, u64) {
    use rand::SeedableRng;
    let seed: u64 = std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen_range(0..10_000));
    println!("{label}: seed {seed} ({var}={seed} replays the nemesis)");
    (rand::rngs::StdRng::seed_from_u64(seed), seed)
}

/// The link faults of the classic queue and stream checks, each followed by
/// a heal (their order is seeded).
pub const LINK_FAULTS: [&str; 4] = ["cut A-B", "cut A-C", "isolate A", "random halves"];

/// How a publish ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Acked,
    Nacked,
    /// The connection or channel was lost before the confirm.
    Unknown,
}

/// The table's columns, per phase: published, acked, nacked, unknown,
/// consumed, duplicates.
pub type Row = [u64; 6];

/// What a run's history adds up to.
pub struct Tally {
    /// A row per phase (every phase, empty ones too).
    pub rows: BTreeMap<usize, Row>,
    /// Acked publishes never consumed.
    pub lost: Vec<String>,
    /// Nacked publishes that were consumed all the same (a nack is "maybe
    /// not there", never a false ack).
    pub nacked_consumed: u64,
}

/// Add up `published` (id -> phase it was published in and its outcome),
/// `consumed` (id -> times consumed) and `consumed_in` (phase -> consumed,
/// duplicates) over `phases` phases.
pub fn tally(
    published: &HashMap<String, (usize, Option<Outcome>)>,
    consumed: &HashMap<&str, u32>,
    consumed_in: &BTreeMap<usize, (u64, u64)>,
    phases: usize,
) -> Tally {
    let mut rows: BTreeMap<usize, Row> = (0..phases).map(|p| (p, Row::default())).collect();
    let mut lost = Vec::new();
    let mut nacked_consumed = 0u64;
    for (id, (phase, outcome)) in published {
        let r = rows.entry(*phase).or_default();
        r[0] += 1;
        let n = consumed.get(id.as_str()).copied().unwrap_or(0);
        match outcome {
            Some(Outcome::Acked) => {
                r[1] += 1;
                if n == 0 {
                    lost.push(id.clone());
                }
            }
            Some(Outcome::Nacked) => {
                r[2] += 1;
                nacked_consumed += u64::from(n > 0);
            }
            Some(Outcome::Unknown) | None => r[3] += 1,
        }
    }
    for (phase, (n, dups)) in consumed_in {
        let r = rows.entry(*phase).or_default();
        r[4] += n;
        r[5] += dups;
    }
    lost.sort();
    Tally {
        rows,
        lost,
        nacked_consumed,
    }
}

/// Print the table (phase names from `phases`, the first column `width`
/// wide) and its total row; the totals.
pub fn print(rows: &BTreeMap<usize, Row>, phases: &[String], width: usize) -> Row {
    let line = |name: &str, r: &Row| {
        println!(
            "{name:<width$} {:>9} {:>6} {:>6} {:>7} {:>8} {:>4}",
            r[0], r[1], r[2], r[3], r[4], r[5]
        )
    };
    println!(
        "{:<width$} {:>9} {:>6} {:>6} {:>7} {:>8} {:>4}",
        "phase", "published", "acked", "nacked", "unknown", "consumed", "dups"
    );
    let mut total = Row::default();
    for (phase, r) in rows {
        line(phases.get(*phase).map_or("?", String::as_str), r);
        for (t, v) in total.iter_mut().zip(r) {
            *t += v;
        }
    }
    line("total", &total);
    total
}

/// The safety checks both runs make: nothing consumed that was never
/// published, no acked publish lost.
pub fn assert_none_lost(never_published: &[String], lost: &[String]) {
    assert!(
        never_published.is_empty(),
        "consumed, never published: {never_published:?}"
    );
    assert!(
        lost.is_empty(),
        "{} acked messages never consumed (lost): {:?}",
        lost.len(),
        &lost[..lost.len().min(20)]
    );
}
