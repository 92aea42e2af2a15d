//! A Jepsen-style check of a quorum queue (one openraft group per queue,
//! tests/cluster_quorum.rs) while partitions, kills and restarts come and go:
//! three warren processes on 127.0.0.1-3, each reaching the others only
//! through a test-owned TCP proxy per directed pair (`[cluster] dial`
//! overrides, as in tests/cluster_jepsen.rs).
//!
//! A quorum queue is declared on A. Publishers with confirms (persistent
//! messages, a unique id in each body) run on two of the nodes (seeded); a
//! consumer with manual acks (prefetch 10, each delivery acked as it comes)
//! consumes in sessions of 2.5 s, each on the next node of a rotation
//! (whichever answers: a refused or unanswered consume moves on), so it
//! consumes at the leader and through forwarding. Meanwhile a seeded nemesis
//! (`WARREN_QJEPSEN_SEED`, printed) runs five scenarios in a seeded order,
//! each followed by a heal and a wait until the three nodes run and name the
//! same leader:
//! - **random halves**: a seeded node alone against the two others;
//! - **majority ring**: the link between the leader and a seeded other node
//!   cut both ways, so every node sees a majority but not the same one;
//! - **isolated leader**: whichever node leads the queue then, alone;
//! - **kill -9 of the leader's node**, restarted 7 s later;
//! - **restart of a node**: a seeded node stopped (SIGTERM) and started 1 s
//!   later.
//!
//! Every publish is recorded as acked, nacked or unknown (connection or
//! channel lost before the confirm); every delivery with its `redelivered`
//! flag and the moment its ack was sent. Checked:
//! - every acked message is consumed at least once (none lost);
//! - nothing is consumed that was never published;
//! - no publish or confirm waits more than 20 s (no hang);
//! - a message consumed again was, the time before, not acked (the ack
//!   failed), or acked at most [`SETTLE_WINDOW`] (1 s; [`CUT_OFF_WINDOW`],
//!   2.4 s, for an ack sent while a partition was in force) before a
//!   disruption that can lose the ack's `Settle` before it commits: a nemesis
//!   action (cut, heal, kill, stop, start), the leader seen changing (the
//!   leader a majority of the nodes' `/api/queues` names, polled every 100
//!   ms), or a consumer session ended by the broker (consumer cancelled,
//!   channel or connection lost: the leader stopped serving, or the data link
//!   to it died); and it comes again flagged redelivered;
//! - after each heal the cluster recovers within 30 s (all nodes running
//!   and naming one leader, a publish sent after the heal acked on each
//!   publishing node, a delivery after the heal); after the final heal and a
//!   drain at the leader, a confirmed publish on each of the three nodes is
//!   acked and consumed.
//!
//! A second test kills the leader's node five times under traffic and starts
//! it again at once, so that openraft restores it as the leader (the path of
//! the bug described in docs/cluster.md): whatever comes twice must come
//! flagged redelivered. The two tests run one at a time.
//!
//! A summary line per phase is printed (published / acked / nacked / unknown
//! / consumed / duplicates), and the longest ack-to-disruption gap of a
//! duplicate.

mod common;

use common::cluster::{declare_quorum_queue, quorum_leader, start_proxied, Node};
use common::jepsen::{Net, Outcome};
use futures::StreamExt;
use lapin::options::*;
use lapin::publisher_confirm::Confirmation;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use parking_lot::Mutex;
use rand::seq::SliceRandom;
use rand::Rng;
use serde_json::Value;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const QUEUE: &str = "qjepsen";
const NAMES: [&str; 3] = ["A", "B", "C"];
/// The nodes' commit timeout: a publish not committed within it is nacked.
const COMMIT_TIMEOUT_MS: u64 = 3000;
/// How long a partition lasts: longer than a failover under this traffic
/// (2.4-2.8 s at best, up to about 6 s seen; see docs/cluster.md), so that
/// a majority that lost its leader mostly elects another before the heal.
const FAULT: Duration = Duration::from_millis(7000);
/// How long a killed node stays down (as long, for the same reason).
const DOWN: Duration = Duration::from_millis(7000);
/// How long a stopped node stays down.
const STOPPED: Duration = Duration::from_millis(1000);
/// Traffic after a heal has converged, before the next fault.
const HEAL: Duration = Duration::from_millis(1500);
/// After a heal, the cluster must have recovered within this: the nodes all
/// run and name the same leader, each publisher had a publish sent after the
/// heal acked, and the consumer got a delivery after the heal.
const CONVERGE_WITHIN: Duration = Duration::from_secs(30);
/// A publish or confirm not answered within this is a hang (a failure).
const CONFIRM_WITHIN: Duration = Duration::from_secs(20);
/// A consumer session is closed (cleanly) after this and the next one
/// opened on the next node.
const SESSION: Duration = Duration::from_millis(2500);
/// How long after its ack was sent a delivery's `Settle` may still be on its
/// way (client -> node -> data link -> leader -> proposed -> committed by a
/// majority): only a delivery acked at most this long before a disruption
/// may come again.
const SETTLE_WINDOW: Duration = Duration::from_millis(1000);
/// The same for an ack sent while a partition was in force: a leader cut
/// off from the majority keeps serving (and taking acks it cannot commit)
/// until its check fails, which runs every two group heartbeats (2 x 200
/// ms) and gives up after an election timeout (5 x 200 ms), so up to 1.4 s
/// after the cut; then it cancels its consumers. Plus [`SETTLE_WINDOW`].
const CUT_OFF_WINDOW: Duration = Duration::from_millis(1400 + 1000);

/// Something that can lose a settle not yet committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Ev {
    /// A nemesis action: cut, heal, kill, stop, start.
    Nemesis,
    /// The leader a majority of the nodes name changed.
    LeaderChanged,
    /// A consumer session ended by the broker (cancelled, channel or
    /// connection lost).
    ConsumerLost,
    /// Not an event: the earlier delivery's ack failed (never sent).
    Unacked,
}

/// One delivery the consumer, the drain or the final check got.
struct Got {
    id: String,
    /// When it was received.
    at: Instant,
    redelivered: bool,
    phase: usize,
    /// When its ack was sent (for a `basic.get` with no-ack: when it was
    /// got); None when the ack failed.
    acked: Option<Instant>,
}

#[derive(Default)]
struct History {
    /// Every publish sent: id -> (phase it was published in, outcome).
    published: HashMap<String, (usize, Option<Outcome>)>,
    /// Every delivery, in order.
    got: Vec<Got>,
    /// Disruptions, in order.
    events: Vec<(Instant, Ev)>,
    /// The leader as a majority of the nodes named it, when it changed.
    leaders: Vec<(Instant, String)>,
    /// Publishes or confirms never answered.
    hung: u64,
    /// Per node: when the last publish there that was acked had been sent.
    acked_sent: HashMap<usize, Instant>,
    /// When each phase began.
    phase_starts: Vec<Instant>,
    /// The partitions (cut, heal) so far, and the one in force.
    partitions: Vec<(Instant, Instant)>,
    cut_at: Option<Instant>,
}

impl History {
    /// Why delivery `g` may be delivered again: its ack failed, or the first
    /// disruption after its ack was sent, and how long after.
    fn explanation(&self, g: &Got) -> Option<(Duration, Ev)> {
        let Some(acked) = g.acked else {
            return Some((Duration::ZERO, Ev::Unacked));
        };
        self.events
            .iter()
            .filter(|(t, _)| *t >= acked)
            .map(|(t, ev)| (*t - acked, *ev))
            .min()
    }

    /// How long before the disruption that explains it delivery `g`'s ack
    /// may have been sent: [`CUT_OFF_WINDOW`] when a partition was in force
    /// then, else [`SETTLE_WINDOW`].
    fn window(&self, g: &Got) -> Duration {
        let partitioned = |t: Instant| {
            self.partitions.iter().any(|(a, b)| *a <= t && t <= *b)
                || self.cut_at.is_some_and(|a| a <= t)
        };
        match g.acked {
            Some(t) if partitioned(t) => CUT_OFF_WINDOW,
            _ => SETTLE_WINDOW,
        }
    }

    /// A partition begins (a nemesis action).
    fn cut(&mut self) {
        self.event(Ev::Nemesis);
        self.cut_at = Some(Instant::now());
    }

    /// The partition in force, if any, is healed (a nemesis action).
    fn heal(&mut self) {
        self.event(Ev::Nemesis);
        if let Some(c) = self.cut_at.take() {
            self.partitions.push((c, Instant::now()));
        }
    }

    fn event(&mut self, ev: Ev) {
        self.events.push((Instant::now(), ev));
    }
}

struct Shared {
    /// (ip, AMQP port) per node.
    amqp: Vec<(String, u16)>,
    /// Admin base URL per node.
    admin: Vec<String>,
    history: Mutex<History>,
    phase: AtomicUsize,
    /// Publishers and consumer stop.
    stop: AtomicBool,
    /// The leader monitor stops.
    monitor_stop: AtomicBool,
}

impl Shared {
    fn uri(&self, i: usize) -> String {
        let (ip, port) = &self.amqp[i];
        format!("amqp://guest:guest@{ip}:{port}/%2f")
    }

    fn phase(&self) -> usize {
        self.phase.load(Ordering::Acquire)
    }

    fn set_outcome(&self, id: &str, o: Outcome) {
        if let Some(p) = self.history.lock().published.get_mut(id) {
            p.1 = Some(o);
        }
    }
}

async fn connect(uri: &str) -> Option<Connection> {
    common::within(
        Duration::from_secs(5),
        Connection::connect(uri, ConnectionProperties::default()),
    )
    .await?
    .ok()
}

async fn channel(conn: &Connection) -> Option<Channel> {
    common::within(Duration::from_secs(5), conn.create_channel())
        .await?
        .ok()
}

async fn close(conn: Connection) {
    let _ = common::within(Duration::from_secs(3), conn.close(200, "bye")).await;
}

/// Publish persistent messages with confirms on node `i` until stopped, five
/// in flight at a time; record each outcome.
async fn publisher(s: Arc<Shared>, i: usize, name: &'static str) {
    let mut seq = 0u64;
    while !s.stop.load(Ordering::Acquire) {
        let Some(conn) = connect(&s.uri(i)).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let Some(ch) = channel(&conn).await else {
            close(conn).await;
            continue;
        };
        let selected = common::within(
            Duration::from_secs(5),
            ch.confirm_select(ConfirmSelectOptions::default()),
        )
        .await;
        if !matches!(selected, Some(Ok(()))) {
            close(conn).await;
            continue;
        }
        while !s.stop.load(Ordering::Acquire) {
            let mut waits = Vec::new();
            let mut lost = false;
            for _ in 0..5 {
                seq += 1;
                let id = format!("{name}-{seq}");
                let phase = s.phase();
                s.history.lock().published.insert(id.clone(), (phase, None));
                let r = common::within(
                    CONFIRM_WITHIN,
                    ch.basic_publish(
                        "",
                        QUEUE,
                        BasicPublishOptions::default(),
                        id.as_bytes(),
                        BasicProperties::default().with_delivery_mode(2),
                    ),
                )
                .await;
                match r {
                    Some(Ok(c)) => waits.push((id, c, Instant::now())),
                    Some(Err(_)) => {
                        s.set_outcome(&id, Outcome::Unknown);
                        lost = true;
                        break;
                    }
                    None => {
                        s.history.lock().hung += 1;
                        s.set_outcome(&id, Outcome::Unknown);
                        lost = true;
                        break;
                    }
                }
            }
            for (id, w, sent) in waits {
                let outcome = match common::within(CONFIRM_WITHIN, w).await {
                    Some(Ok(Confirmation::Ack(_))) => {
                        s.history.lock().acked_sent.insert(i, sent);
                        Outcome::Acked
                    }
                    Some(Ok(Confirmation::Nack(_))) => Outcome::Nacked,
                    Some(Ok(Confirmation::NotRequested)) => panic!("confirms are on"),
                    Some(Err(_)) => {
                        lost = true;
                        Outcome::Unknown
                    }
                    None => {
                        s.history.lock().hung += 1;
                        lost = true;
                        Outcome::Unknown
                    }
                };
                s.set_outcome(&id, outcome);
            }
            if lost {
                break;
            }
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
        close(conn).await;
    }
}

/// One consumer session on node `i`: Ok(true) when it ended by itself
/// (session time or stop) and its channel closed cleanly, Ok(false) when the
/// broker ended it (consumer cancelled, channel or connection lost), Err
/// when it could not start (no connection, consume refused or unanswered).
async fn consume_session(s: &Shared, i: usize) -> Result<bool, ()> {
    let conn = connect(&s.uri(i)).await.ok_or(())?;
    let r = session_on(s, &conn).await;
    close(conn).await;
    r
}

async fn session_on(s: &Shared, conn: &Connection) -> Result<bool, ()> {
    let ch = channel(conn).await.ok_or(())?;
    let qos = common::within(
        Duration::from_secs(3),
        ch.basic_qos(10, BasicQosOptions::default()),
    )
    .await;
    if !matches!(qos, Some(Ok(()))) {
        return Err(());
    }
    // A consume forwarded to a leader that cannot be reached may not be
    // answered: given up after 3 s.
    let consumer = common::within(
        Duration::from_secs(3),
        ch.basic_consume(
            QUEUE,
            "qjepsen-consumer",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await;
    let Some(Ok(mut consumer)) = consumer else {
        return Err(());
    };
    let started = Instant::now();
    loop {
        if s.stop.load(Ordering::Acquire) || started.elapsed() > SESSION {
            break;
        }
        let next = tokio::time::timeout(Duration::from_millis(200), consumer.next()).await;
        let d = match next {
            Err(_) => continue,
            Ok(Some(Ok(d))) => d,
            // Cancelled by the broker, or the channel/connection is gone.
            Ok(_) => return Ok(false),
        };
        let at = Instant::now();
        let id = String::from_utf8_lossy(&d.data).to_string();
        let phase = s.phase();
        let sent = Instant::now();
        let r = common::within(
            Duration::from_secs(3),
            d.acker.ack(BasicAckOptions::default()),
        )
        .await;
        let ok = matches!(r, Some(Ok(())));
        s.history.lock().got.push(Got {
            id,
            at,
            redelivered: d.redelivered,
            phase,
            acked: ok.then_some(sent),
        });
        if !ok {
            return Ok(false);
        }
    }
    let closed = common::within(Duration::from_secs(3), ch.close(200, "bye")).await;
    Ok(matches!(closed, Some(Ok(()))))
}

/// Consume until stopped, each session on the next node that takes it.
async fn consumer(s: Arc<Shared>, first: usize) {
    let mut next = first;
    while !s.stop.load(Ordering::Acquire) {
        let mut any = false;
        for k in 0..3 {
            let i = (next + k) % 3;
            let r = consume_session(&s, i).await;
            if r == Ok(false) {
                s.history.lock().event(Ev::ConsumerLost);
            }
            if r.is_ok() {
                next = i + 1;
                any = true;
                break;
            }
        }
        if !any {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// GET on a node's admin API with a short timeout.
fn api_get(base: &str, path: &str) -> Option<Value> {
    let r = ureq::get(&format!("{base}{path}"))
        .set("Authorization", "Basic Z3Vlc3Q6Z3Vlc3Q=")
        .timeout(Duration::from_secs(1))
        .call()
        .ok()?;
    r.into_json().ok()
}

/// The queue's leader per node, as each node's `/api/queues` names it.
fn views(admin: &[String]) -> Vec<Option<String>> {
    admin
        .iter()
        .map(|base| {
            api_get(base, &format!("/api/queues/%2F/{QUEUE}"))
                .and_then(|v| v["leader"].as_str().map(String::from))
        })
        .collect()
}

/// The leader at least two nodes name.
fn majority(views: &[Option<String>]) -> Option<String> {
    views
        .iter()
        .flatten()
        .find(|l| views.iter().flatten().filter(|m| m == l).count() >= 2)
        .cloned()
}

/// Poll the nodes' views of the leader every 100 ms until stopped; record
/// when the leader a majority names changes.
fn monitor(s: Arc<Shared>) {
    let mut last: Option<String> = None;
    while !s.monitor_stop.load(Ordering::Acquire) {
        if let Some(l) = majority(&views(&s.admin)) {
            if last.as_ref() != Some(&l) {
                let mut h = s.history.lock();
                if last.is_some() {
                    h.event(Ev::LeaderChanged);
                }
                h.leaders.push((Instant::now(), l.clone()));
                last = Some(l);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// With `WARREN_QJEPSEN_LOGS=<dir>` the nodes' logs are copied there at the
/// end, passed or failed (the nodes log at `warn`, or as `RUST_LOG` says).
struct KeepLogs(Vec<std::path::PathBuf>);

impl Drop for KeepLogs {
    fn drop(&mut self) {
        let Some(dir) = std::env::var_os("WARREN_QJEPSEN_LOGS") else {
            return;
        };
        let dir = std::path::PathBuf::from(dir);
        let _ = std::fs::create_dir_all(&dir);
        for (i, log) in self.0.iter().enumerate() {
            let _ = std::fs::copy(log, dir.join(format!("{}.log", NAMES[i])));
        }
    }
}

impl Net {
    /// Wait until the three nodes run in every node's view and all three
    /// name the same leader of the queue, and, with `traffic`, each of the
    /// `publishing` nodes had a publish sent after `since` acked and the
    /// consumer got a delivery after it: the leader's index.
    async fn converge(
        &self,
        what: &str,
        since: Instant,
        traffic: Option<(&Shared, &[usize])>,
    ) -> usize {
        let deadline = since + CONVERGE_WITHIN;
        loop {
            let flowing = traffic.is_none_or(|(s, publishing)| {
                let h = s.history.lock();
                publishing
                    .iter()
                    .all(|i| h.acked_sent.get(i).is_some_and(|t| *t >= since))
                    && h.got.last().is_some_and(|g| g.at >= since)
            });
            let agreed = flowing.then(|| {
                tokio::task::block_in_place(|| {
                    let all_running = self.nodes.iter().all(|n| n.running().len() == 3);
                    let v: Vec<Option<String>> =
                        self.nodes.iter().map(|n| quorum_leader(n, QUEUE)).collect();
                    match &v[0] {
                        Some(l) if all_running && v.iter().all(|m| m.as_ref() == Some(l)) => {
                            self.index(l)
                        }
                        _ => None,
                    }
                })
            });
            if let Some(i) = agreed.flatten() {
                return i;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not recovered within {CONVERGE_WITHIN:?} (all nodes running and naming \
                 one leader, an ack for each publisher, a delivery)"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// `/api/queues/%2F/qjepsen` on node `i`.
fn queue_api(net: &Net, i: usize) -> Value {
    tokio::task::block_in_place(|| net.nodes[i].get(&format!("/api/queues/%2F/{QUEUE}")).1)
}

/// `basic.get` with no-ack on node `i` until the queue answers empty: what
/// was got is recorded in `phase`. False when the node or channel failed.
async fn drain_on(s: &Shared, i: usize, phase: usize) -> bool {
    let Some(conn) = connect(&s.uri(i)).await else {
        return false;
    };
    let Some(ch) = channel(&conn).await else {
        close(conn).await;
        return false;
    };
    let ok = loop {
        let got = common::within(
            Duration::from_secs(5),
            ch.basic_get(QUEUE, BasicGetOptions { no_ack: true }),
        )
        .await;
        match got {
            Some(Ok(Some(m))) => {
                let id = String::from_utf8_lossy(&m.delivery.data).to_string();
                s.history.lock().got.push(Got {
                    id,
                    at: Instant::now(),
                    redelivered: m.delivery.redelivered,
                    phase,
                    acked: Some(Instant::now()),
                });
            }
            Some(Ok(None)) => break true,
            _ => break false,
        }
    };
    close(conn).await;
    ok
}

/// The tests of this file take the machine's two cores each: one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quorum_queue_under_partitions_kills_and_restarts() {
    let _serial = SERIAL.lock().await;
    // The seed replays the order of the nemesis and each choice relative
    // to the leader of the moment.
    let (mut rng, seed) = common::jepsen::seeded("WARREN_QJEPSEN_SEED", "qjepsen");
    let test_started = Instant::now();

    let (nodes, proxies) = start_proxied("qjepsen", COMMIT_TIMEOUT_MS).await;
    let mut net = Net { nodes, proxies };
    let _logs = KeepLogs(net.nodes.iter().map(Node::log_path).collect());
    declare_quorum_queue(&net.nodes[0], QUEUE).await;
    let mut leader = net.converge("start", Instant::now(), None).await;

    let shared = Arc::new(Shared {
        amqp: net.nodes.iter().map(|n| (n.ip.clone(), n.amqp)).collect(),
        admin: net.nodes.iter().map(Node::url).collect(),
        history: Mutex::new(History::default()),
        phase: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        monitor_stop: AtomicBool::new(false),
    });
    shared.history.lock().phase_starts.push(Instant::now());
    let monitoring = {
        let s = Arc::clone(&shared);
        std::thread::spawn(move || monitor(s))
    };

    // Publishers on two seeded nodes, the consumer's rotation from a seeded one.
    let quiet = rng.gen_range(0..3);
    let publishing: Vec<usize> = (0..3).filter(|&i| i != quiet).collect();
    let first_consumer = rng.gen_range(0..3);
    let mut scenarios = vec![
        "random halves",
        "majority ring",
        "isolated leader",
        "kill -9 leader",
        "restart node",
    ];
    scenarios.shuffle(&mut rng);
    println!(
        "qjepsen: leader {}, publishers on {} and {}, consumer from {}; scenarios {scenarios:?}",
        NAMES[leader], NAMES[publishing[0]], NAMES[publishing[1]], NAMES[first_consumer]
    );
    let mut phases: Vec<String> = vec!["start (healed)".into()];
    let publishers: Vec<_> = publishing
        .iter()
        .map(|&i| {
            let name = ["a", "b", "c"][i];
            tokio::spawn(publisher(Arc::clone(&shared), i, name))
        })
        .collect();
    let consuming = tokio::spawn(consumer(Arc::clone(&shared), first_consumer));
    tokio::time::sleep(HEAL).await;

    let nemesis = |s: &Shared| s.history.lock().event(Ev::Nemesis);
    let enter = |phases: &mut Vec<String>, name: String| {
        phases.push(name);
        shared.history.lock().phase_starts.push(Instant::now());
        shared.phase.store(phases.len() - 1, Ordering::Release);
    };
    for sc in scenarios {
        let l = NAMES[leader];
        match sc {
            "random halves" => {
                let alone = rng.gen_range(0..3);
                net.isolate(alone);
                shared.history.lock().cut();
                enter(
                    &mut phases,
                    format!("random halves ({} alone, {l} led)", NAMES[alone]),
                );
                tokio::time::sleep(FAULT).await;
                net.heal();
            }
            "majority ring" => {
                let other = (leader + rng.gen_range(1..3)) % 3;
                net.cut(leader, other);
                shared.history.lock().cut();
                enter(
                    &mut phases,
                    format!("majority ring ({l}-{} cut, {l} led)", NAMES[other]),
                );
                tokio::time::sleep(FAULT).await;
                net.heal();
            }
            "isolated leader" => {
                net.isolate(leader);
                shared.history.lock().cut();
                enter(&mut phases, format!("isolated leader ({l})"));
                tokio::time::sleep(FAULT).await;
                net.heal();
            }
            "kill -9 leader" => {
                net.nodes[leader].kill();
                nemesis(&shared);
                enter(&mut phases, format!("kill -9 leader ({l})"));
                tokio::time::sleep(DOWN).await;
                net.nodes[leader].start().await;
            }
            _ => {
                let n = rng.gen_range(0..3);
                let who = if n == leader {
                    "the leader"
                } else {
                    "a follower"
                };
                enter(&mut phases, format!("restart node ({}, {who})", NAMES[n]));
                nemesis(&shared);
                tokio::task::block_in_place(|| net.nodes[n].stop());
                nemesis(&shared);
                tokio::time::sleep(STOPPED).await;
                net.nodes[n].start().await;
            }
        }
        // The heal, or the node's start.
        shared.history.lock().heal();
        let healed = Instant::now();
        enter(&mut phases, "heal".into());
        leader = net
            .converge(
                &phases[phases.len() - 2],
                healed,
                Some((&shared, &publishing)),
            )
            .await;
        let took = healed.elapsed();
        let last = phases.len() - 1;
        phases[last] = format!(
            "heal ({} leads, up in {:.1} s)",
            NAMES[leader],
            took.as_secs_f64()
        );
        tokio::time::sleep(HEAL).await;
    }

    // Final heal: stop publishing and consuming, then drain at the leader.
    net.heal();
    enter(&mut phases, "final drain".into());
    let drain_phase = phases.len() - 1;
    shared.stop.store(true, Ordering::Release);
    for p in publishers {
        p.await.expect("publisher");
    }
    consuming.await.expect("consumer");
    // What dead consumers held goes back to the leader's queue once it sees
    // them gone: wait for no unacked message and no consumer there, then
    // get everything left there until its count says empty.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        leader = net.converge("final drain", Instant::now(), None).await;
        let q = queue_api(&net, leader);
        let idle =
            q["messages_unacknowledged"].as_u64() == Some(0) && q["consumers"].as_u64() == Some(0);
        if idle
            && q["messages"].as_u64() == Some(0)
            && quorum_leader(&net.nodes[leader], QUEUE).as_deref()
                == Some(net.nodes[leader].name().as_str())
        {
            break;
        }
        if idle {
            drain_on(&shared, leader, drain_phase).await;
        }
        assert!(
            Instant::now() < deadline,
            "not drained at the leader ({}) within 40 s: {q}",
            NAMES[leader]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Healed: a confirmed publish on each node is acked (within 20 s) and
    // then consumed.
    enter(&mut phases, "after the heal".into());
    let after_phase = phases.len() - 1;
    let mut acked_after = Vec::new();
    for (i, node) in NAMES.iter().enumerate() {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut attempt = 0;
        'node: loop {
            assert!(
                Instant::now() < deadline,
                "no confirmed publish on {node} within 20 s of the final heal"
            );
            let Some(conn) = connect(&shared.uri(i)).await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let Some(ch) = channel(&conn).await else {
                close(conn).await;
                continue;
            };
            if !matches!(
                common::within(
                    Duration::from_secs(5),
                    ch.confirm_select(ConfirmSelectOptions::default())
                )
                .await,
                Some(Ok(()))
            ) {
                close(conn).await;
                continue;
            }
            while Instant::now() < deadline {
                attempt += 1;
                let id = format!("after-{node}-{attempt}");
                shared
                    .history
                    .lock()
                    .published
                    .insert(id.clone(), (after_phase, None));
                let sent = common::within(
                    CONFIRM_WITHIN,
                    ch.basic_publish(
                        "",
                        QUEUE,
                        BasicPublishOptions::default(),
                        id.as_bytes(),
                        BasicProperties::default().with_delivery_mode(2),
                    ),
                )
                .await;
                let Some(Ok(c)) = sent else {
                    shared.set_outcome(&id, Outcome::Unknown);
                    close(conn).await;
                    continue 'node;
                };
                match common::within(CONFIRM_WITHIN, c).await {
                    Some(Ok(Confirmation::Ack(_))) => {
                        shared.set_outcome(&id, Outcome::Acked);
                        acked_after.push(id);
                        close(conn).await;
                        break 'node;
                    }
                    Some(Ok(_)) => shared.set_outcome(&id, Outcome::Nacked),
                    Some(Err(_)) => {
                        shared.set_outcome(&id, Outcome::Unknown);
                        close(conn).await;
                        continue 'node;
                    }
                    None => panic!("the confirm of {id} after the heal hung"),
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let missing: Vec<&String> = {
            let h = shared.history.lock();
            acked_after
                .iter()
                .filter(|id| !h.got.iter().any(|g| &g.id == *id))
                .collect()
        };
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "acked after the heal, never consumed: {missing:?}"
        );
        let at = net.converge("after the heal", Instant::now(), None).await;
        drain_on(&shared, at, after_phase).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    shared.monitor_stop.store(true, Ordering::Release);
    monitoring.join().expect("monitor");

    // The checks.
    let h = shared.history.lock();
    let mut consumed: HashMap<&str, u32> = HashMap::new();
    let mut last: HashMap<&str, &Got> = HashMap::new();
    let mut never_published = Vec::new();
    let mut bad_dups = Vec::new();
    // The longest an ack of a message delivered again was sent before the
    // disruption that explains it, and what explained the duplicates.
    let mut longest_gap = Duration::ZERO;
    let mut longest_partitioned = Duration::ZERO;
    // The duplicates with the longest gaps: (gap, what explained it, the
    // phase of the earlier delivery).
    let mut widest: Vec<(Duration, Ev, usize)> = Vec::new();
    let mut explained_by: BTreeMap<String, u64> = BTreeMap::new();
    let mut consumed_in: BTreeMap<usize, (u64, u64)> = BTreeMap::new();
    for g in &h.got {
        if !h.published.contains_key(&g.id) {
            never_published.push(g.id.clone());
        }
        *consumed.entry(&g.id).or_default() += 1;
        let e = consumed_in.entry(g.phase).or_default();
        e.0 += 1;
        if let Some(prev) = last.insert(&g.id, g) {
            e.1 += 1;
            match h.explanation(prev) {
                Some((gap, ev)) if gap <= h.window(prev) => {
                    widest.push((gap, ev, prev.phase));
                    if h.window(prev) == CUT_OFF_WINDOW {
                        longest_partitioned = longest_partitioned.max(gap);
                    } else {
                        longest_gap = longest_gap.max(gap);
                    }
                    *explained_by.entry(format!("{ev:?}")).or_default() += 1;
                    if !g.redelivered {
                        bad_dups.push(format!(
                            "{}: delivered again without redelivered (in '{}'; before in '{}', \
                             acked {gap:?} before {ev:?})",
                            g.id, phases[g.phase], phases[prev.phase]
                        ));
                    }
                }
                other => bad_dups.push(format!(
                    "{}: acked, and the next disruption came {:?} later",
                    g.id, other
                )),
            }
        }
    }
    let common::jepsen::Tally {
        rows,
        lost,
        nacked_consumed,
    } = common::jepsen::tally(&h.published, &consumed, &consumed_in, phases.len());
    let total = common::jepsen::print(&rows, &phases, 38);
    widest.sort_by(|a, b| b.cmp(a));
    for (gap, ev, phase) in widest.iter().take(3) {
        println!(
            "qjepsen: a duplicate acked {gap:?} before {ev:?}, delivered before in '{}'",
            phases[*phase]
        );
    }
    // Each leader seen, with the phase it appeared in and how far into it.
    let changes: Vec<String> = h
        .leaders
        .iter()
        .map(|(t, l)| {
            let p = h.phase_starts.iter().rposition(|s| s <= t).unwrap_or(0);
            let name = net.index(l).map_or("?", |i| NAMES[i]);
            let into = t.saturating_duration_since(h.phase_starts[p]);
            format!("{name} in '{}' +{:.1} s", phases[p], into.as_secs_f64())
        })
        .collect();
    println!(
        "qjepsen: seed {seed}; {:.1} s; leaders seen {changes:?}; {} consumer sessions ended by \
         the broker; {nacked_consumed} nacked publishes were consumed (nack: maybe there); \
         duplicates explained by {explained_by:?}; the longest ack-to-disruption gap of a \
         duplicate {longest_gap:?} (window {SETTLE_WINDOW:?}), acked during a partition \
         {longest_partitioned:?} (window {CUT_OFF_WINDOW:?})",
        test_started.elapsed().as_secs_f64(),
        h.events
            .iter()
            .filter(|(_, e)| *e == Ev::ConsumerLost)
            .count(),
    );
    assert_eq!(h.hung, 0, "publishes or confirms never answered");
    common::jepsen::assert_none_lost(&never_published, &lost);
    assert!(
        bad_dups.is_empty(),
        "duplicates not explained: {:?}",
        &bad_dups[..bad_dups.len().min(20)]
    );
    assert!(total[1] > 0, "nothing was acked at all");
    assert!(
        total[2] + total[3] > 0,
        "the nemesis never made a publish fail (no nack, no unknown)"
    );
    assert!(
        h.leaders.len() > 1,
        "the queue's leader never changed under the nemesis"
    );
}

/// kill -9 of the leader's node under traffic, started again at once (before
/// the others' election timeout): openraft restores it as the leader, and
/// the entries past the commit index it had saved commit again after it
/// serves. Five rounds; whatever comes twice must come flagged redelivered,
/// every acked publish is consumed, nothing unpublished is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_killed_and_back_at_once_redelivers_what_it_had_delivered() {
    const ROUNDS: usize = 5;
    let _serial = SERIAL.lock().await;
    let (a, b, c) = common::cluster::three_nodes("qjepsen-back").await;
    let mut nodes = vec![a, b, c];
    declare_quorum_queue(&nodes[0], QUEUE).await;
    let shared = Arc::new(Shared {
        amqp: nodes.iter().map(|n| (n.ip.clone(), n.amqp)).collect(),
        admin: nodes.iter().map(Node::url).collect(),
        history: Mutex::new(History::default()),
        phase: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        monitor_stop: AtomicBool::new(false),
    });
    let leader_index = |nodes: &[Node]| {
        tokio::task::block_in_place(|| {
            let v: Vec<Option<String>> = nodes.iter().map(|n| quorum_leader(n, QUEUE)).collect();
            majority(&v).and_then(|l| nodes.iter().position(|n| n.name() == l))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut leader = loop {
        if let Some(l) = leader_index(&nodes) {
            break l;
        }
        assert!(Instant::now() < deadline, "no leader for the queue");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // Publishers on the two others, the consumer from the third.
    let publishers: Vec<_> = (0..3)
        .filter(|&i| i != leader)
        .map(|i| tokio::spawn(publisher(Arc::clone(&shared), i, ["a", "b", "c"][i])))
        .collect();
    let consuming = tokio::spawn(consumer(Arc::clone(&shared), (leader + 2) % 3));
    let mut restored = 0;
    for _ in 0..ROUNDS {
        tokio::time::sleep(Duration::from_millis(2000)).await;
        shared.history.lock().event(Ev::Nemesis);
        nodes[leader].kill();
        nodes[leader].start().await;
        shared.history.lock().event(Ev::Nemesis);
        // Who leads once things settle: the same node when it was restored.
        let killed = leader;
        let deadline = Instant::now() + Duration::from_secs(30);
        leader = loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if let Some(l) = leader_index(&nodes) {
                if tokio::task::block_in_place(|| nodes.iter().all(|n| n.running().len() == 3)) {
                    break l;
                }
            }
            assert!(Instant::now() < deadline, "no leader after the restart");
        };
        restored += usize::from(leader == killed);
    }
    tokio::time::sleep(Duration::from_millis(2000)).await;
    shared.stop.store(true, Ordering::Release);
    for p in publishers {
        p.await.expect("publisher");
    }
    consuming.await.expect("consumer");
    // Drain at the leader.
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        let l = leader_index(&nodes).unwrap_or(leader);
        let q = tokio::task::block_in_place(|| nodes[l].get(&format!("/api/queues/%2F/{QUEUE}")).1);
        let idle =
            q["messages_unacknowledged"].as_u64() == Some(0) && q["consumers"].as_u64() == Some(0);
        if idle && q["messages"].as_u64() == Some(0) {
            break;
        }
        if idle {
            drain_on(&shared, l, 0).await;
        }
        assert!(Instant::now() < deadline, "not drained within 40 s: {q}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let h = shared.history.lock();
    let mut seen: HashMap<&str, u32> = HashMap::new();
    let mut not_flagged = Vec::new();
    for g in &h.got {
        let n = seen.entry(&g.id).or_default();
        *n += 1;
        if *n > 1 && !g.redelivered {
            not_flagged.push(g.id.clone());
        }
    }
    let acked: Vec<&String> = h
        .published
        .iter()
        .filter(|(_, (_, o))| *o == Some(Outcome::Acked))
        .map(|(id, _)| id)
        .collect();
    let lost: Vec<&&String> = acked
        .iter()
        .filter(|id| !seen.contains_key(id.as_str()))
        .collect();
    let unpublished: Vec<&String> = h
        .got
        .iter()
        .map(|g| &g.id)
        .filter(|id| !h.published.contains_key(*id))
        .collect();
    let dups = h.got.len() - seen.len();
    println!(
        "qjepsen-back: {} published, {} acked, {} consumed, {dups} duplicates; the killed \
         leader led again at once in {restored} of {ROUNDS} rounds",
        h.published.len(),
        acked.len(),
        seen.len()
    );
    assert_eq!(h.hung, 0, "publishes or confirms never answered");
    assert!(lost.is_empty(), "acked, never consumed: {lost:?}");
    assert!(
        unpublished.is_empty(),
        "consumed, never published: {unpublished:?}"
    );
    assert!(
        not_flagged.is_empty(),
        "delivered again without redelivered: {not_flagged:?}"
    );
    assert!(
        restored > 0,
        "the killed leader never came back as the leader: the path was not exercised"
    );
}
