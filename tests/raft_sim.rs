//! Deterministic simulation of warren's metadata Raft group (issue 14).
//!
//! Three or five members run in one process on a current-thread tokio runtime
//! with paused time, each on warren's own log store and state machine
//! (`warren::cluster::store`) over a simulated disk (`MemoryDisk`: writes are
//! volatile until a flush; a crash keeps what was flushed plus a prefix of the
//! rest). Messages go through a simulated network that, driven by one seeded
//! RNG, loses, delays (and so reorders) and partitions them. A seed decides
//! everything: client proposals of metadata commands, partitions and heals,
//! crashes and restarts, message fates, election timeouts. Checked during the
//! run: no log id written with two payloads, votes never going back, one
//! entry per applied index on every member, no entry applied twice; after a
//! final heal: convergence, no holes and log matching, acknowledged proposals
//! committed, the same model on every member (docs/cluster.md has the why).
//! A failing seed prints itself and the command that replays it.
//!
//! - `WARREN_SIM_SEEDS=N`: how many seeds (default 2000), from
//!   `WARREN_SIM_FIRST` (default 0).
//! - `WARREN_SIM_SEED=S`: only seed S, with its event trace printed.

use futures::FutureExt;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    ChangeMembers, Entry, EntryPayload, LogId, Raft, RaftLogReader, ServerState, SnapshotMeta,
    SnapshotPolicy, StorageError, StoredMembership, Vote,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use warren::cluster::command::{Args, BindingRec, Metadata};
use warren::cluster::disk::MemoryDisk;
use warren::cluster::store::{LogStore, StateMachine, Target};
use warren::cluster::{Command, NodeInfo, TypeConfig};

type NodeId = u64;
type SErr = StorageError<NodeId>;
type Rpc<T, E = openraft::error::Infallible> =
    Result<T, RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>>;

const HEARTBEAT_MS: u64 = 50;
/// How long a client waits for its proposal.
const CLIENT_TIMEOUT: Duration = Duration::from_millis(1500);
/// How long the group has to converge after the final heal.
const CONVERGE_WITHIN: Duration = Duration::from_secs(30);

/// The shape of one seed's run.
#[derive(Debug, Clone)]
struct Plan {
    nodes: usize,
    /// Virtual time of the chaos phase.
    chaos: Duration,
    /// The chance that a store write (append, truncate, purge, vote, apply,
    /// snapshot install) has its member crash while it is being flushed.
    io_crash: f64,
}

impl Plan {
    fn of(rng: &mut StdRng) -> Plan {
        Plan {
            nodes: if rng.gen_bool(0.65) { 3 } else { 5 },
            chaos: Duration::from_millis(rng.gen_range(500..1500)),
            io_crash: [0.0, 0.02, 0.1, 0.1][rng.gen_range(0..4)],
        }
    }
}

/// A simulated disk's flush takes this long: the window of a crash point.
const FLUSH_LATENCY: Duration = Duration::from_millis(1);

/// A member: its disk outlives its lives.
struct Slot {
    disk: MemoryDisk,
    /// Bumped by each crash; messages of an earlier life are dead.
    life: u64,
    raft: Option<Raft<TypeConfig>>,
    sm: Option<StateMachine>,
    /// The highest index this member's state machine applied, over all its lives.
    applied: Option<u64>,
    /// The highest vote it acted on, over all its lives.
    vote: Option<Vote<NodeId>>,
}

/// Everything the simulation shares: the RNG, the network's state, the
/// members, and what the checks record.
struct World {
    rng: StdRng,
    start: Instant,
    slots: Vec<Slot>,
    /// Partition group of each member: messages pass only within a group.
    group: Vec<u8>,
    loss: f64,
    max_delay_ms: u64,
    io_crash: f64,
    trace: Vec<String>,
    keep_trace: bool,
    hash: u64,
    violations: Vec<String>,
    /// Every log id ever written by any member, with its payload.
    written: BTreeMap<LogId<NodeId>, Payload>,
    /// Every index any member's state machine was given, with its entry.
    committed: BTreeMap<u64, (LogId<NodeId>, Payload)>,
    /// The members that were leader in each term (openraft's default mode
    /// allows several, ordered by node id).
    leaders: BTreeMap<u64, BTreeSet<NodeId>>,
    /// Proposals a member answered Ok.
    acked: Vec<Command>,
}

type Shared = Arc<Mutex<World>>;
type Payload = EntryPayload<TypeConfig>;

fn lock(w: &Shared) -> std::sync::MutexGuard<'_, World> {
    w.lock().unwrap_or_else(|p| p.into_inner())
}

impl World {
    fn ms(&self) -> u128 {
        self.start.elapsed().as_millis()
    }

    /// Record an event in the trace (only when a trace is kept: a run of
    /// thousands of seeds does not pay for the formatting).
    fn note(&mut self, what: impl FnOnce() -> String) {
        if !self.keep_trace {
            return;
        }
        let line = format!("{:>6} ms  {}", self.ms(), what());
        for b in line.bytes() {
            self.hash = (self.hash ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        self.trace.push(line);
    }

    fn violation(&mut self, what: String) {
        self.note(|| format!("VIOLATION {what}"));
        self.violations.push(what);
    }

    fn up(&self, node: usize) -> bool {
        self.slots[node].raft.is_some()
    }

    /// A message from `a` reaches `b` now: both up, same side of any partition,
    /// and not lost.
    fn passes(&mut self, a: usize, b: usize) -> bool {
        self.up(a) && self.up(b) && self.group[a] == self.group[b] && !self.rng.gen_bool(self.loss)
    }

    fn delay(&mut self) -> Duration {
        let ms = if self.rng.gen_bool(0.03) {
            self.rng.gen_range(50..400)
        } else {
            self.rng.gen_range(1..=self.max_delay_ms)
        };
        Duration::from_millis(ms)
    }
}

fn id_of(node: usize) -> NodeId {
    node as NodeId + 1
}

fn index_of(id: NodeId) -> usize {
    (id - 1) as usize
}

fn info(node: usize) -> NodeInfo {
    NodeInfo {
        name: format!("sim@n{}", id_of(node)),
        addr: format!("n{}", id_of(node)),
        ..Default::default()
    }
}

// ---------------------------------------------------------------- network

struct Net {
    world: Shared,
    from: usize,
    life: u64,
}

impl RaftNetworkFactory<TypeConfig> for Net {
    type Network = Link;

    async fn new_client(&mut self, target: NodeId, _node: &NodeInfo) -> Link {
        Link {
            world: Arc::clone(&self.world),
            from: self.from,
            life: self.life,
            to: index_of(target),
        }
    }
}

struct Link {
    world: Shared,
    from: usize,
    life: u64,
    to: usize,
}

fn lost<E: std::error::Error>(what: &str) -> RPCError<NodeId, NodeInfo, RaftError<NodeId, E>> {
    RPCError::Network(NetworkError::new(&std::io::Error::other(what.to_string())))
}

impl Link {
    /// Carry one request to the target's current life and its answer back,
    /// each leg delayed and possibly lost. The delivery runs on its own task,
    /// so a request the caller gave up on still arrives (late, reordered).
    /// A lost leg looks like silence until `ttl`.
    async fn carry<T, F, Fut>(&self, kind: &'static str, ttl: Duration, call: F) -> Option<T>
    where
        T: Send + 'static,
        F: FnOnce(Raft<TypeConfig>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T> + Send,
    {
        let started = Instant::now();
        let (from, to) = (self.from, self.to);
        let d1 = {
            let mut w = lock(&self.world);
            if w.slots[from].life != self.life {
                return None;
            }
            w.delay()
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        let world = Arc::clone(&self.world);
        tokio::spawn(async move {
            tokio::time::sleep(d1).await;
            let target = {
                let mut w = lock(&world);
                let ok = w.passes(from, to);
                w.note(|| {
                    format!(
                        "{kind} n{}->n{} {}",
                        id_of(from),
                        id_of(to),
                        if ok { "delivered" } else { "lost" }
                    )
                });
                if !ok {
                    return;
                }
                w.slots[to].raft.clone()
            };
            let Some(raft) = target else { return };
            let resp = call(raft).await;
            let d2 = lock(&world).delay();
            tokio::time::sleep(d2).await;
            let ok = {
                let mut w = lock(&world);
                let ok = w.passes(to, from);
                w.note(|| {
                    format!(
                        "{kind} reply n{}->n{} {}",
                        id_of(to),
                        id_of(from),
                        if ok { "delivered" } else { "lost" }
                    )
                });
                ok
            };
            if ok {
                let _ = tx.send(resp);
            }
        });
        match rx.await {
            Ok(r) => Some(r),
            Err(_) => {
                tokio::time::sleep_until(started + ttl).await;
                None
            }
        }
    }
}

// openraft's error type, as its RaftNetwork trait returns it.
#[allow(clippy::result_large_err)]
fn answer<T, E: std::error::Error>(
    to: usize,
    r: Option<Result<T, RaftError<NodeId, E>>>,
) -> Rpc<T, E> {
    match r {
        Some(Ok(v)) => Ok(v),
        Some(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(id_of(to), e))),
        None => Err(lost("message lost")),
    }
}

impl RaftNetwork<TypeConfig> for Link {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Rpc<AppendEntriesResponse<NodeId>> {
        let r = self
            .carry("append", option.hard_ttl(), move |raft| async move {
                raft.append_entries(rpc).await
            })
            .await;
        answer(self.to, r)
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Rpc<InstallSnapshotResponse<NodeId>, InstallSnapshotError> {
        let r = self
            .carry("snapshot", option.hard_ttl(), move |raft| async move {
                raft.install_snapshot(rpc).await
            })
            .await;
        answer(self.to, r)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Rpc<VoteResponse<NodeId>> {
        let r = self
            .carry("vote", option.hard_ttl(), move |raft| async move {
                raft.vote(rpc).await
            })
            .await;
        answer(self.to, r)
    }
}

// ---------------------------------------------------------------- storage, observed

/// The state machine's target in the simulation: the pure model only. It
/// refuses one kind of command (an exchange of type `x-refused`) on every
/// member alike, as a broker refuses an inequivalent declare.
struct ModelTarget;

fn refused(cmd: &Command) -> bool {
    matches!(cmd, Command::DeclareExchange { kind, .. } if kind == "x-refused")
}

impl Target for ModelTarget {
    fn apply(&self, cmd: &Command, _now: u64) -> Result<(), String> {
        if refused(cmd) {
            Err("refused".into())
        } else {
            Ok(())
        }
    }
}

/// warren's log store, with every entry written recorded.
struct ObservedLog {
    inner: LogStore,
    world: Shared,
    node: usize,
    life: u64,
}

/// Maybe (by the plan's chance) crash member `node` in the middle of the
/// store write it is starting: while the write is being flushed. The rare
/// writes (truncate, purge, snapshot install) crash five times as often.
fn crash_point(world: &Shared, node: usize, life: u64, what: &'static str) {
    let at = {
        let mut w = lock(world);
        let rare = matches!(what, "truncate" | "purge" | "install_snapshot");
        let chance = if rare {
            (w.io_crash * 5.0).min(0.5)
        } else {
            w.io_crash
        };
        if w.slots[node].life != life || !w.rng.gen_bool(chance) {
            return;
        }
        let micros = FLUSH_LATENCY.as_micros() as u64;
        Duration::from_micros(w.rng.gen_range(1..micros))
    };
    let world = Arc::clone(world);
    tokio::spawn(async move {
        tokio::time::sleep(at).await;
        lock(&world).note(|| format!("n{} crash point: {what}", id_of(node)));
        crash(&world, node, Some(life)).await;
    });
}

impl RaftLogReader<TypeConfig> for ObservedLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, SErr> {
        self.inner.try_get_log_entries(range).await
    }
}

impl RaftLogStorage<TypeConfig> for ObservedLog {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SErr> {
        self.inner.get_log_state().await
    }

    async fn get_log_reader(&mut self) -> LogStore {
        self.inner.get_log_reader().await
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), SErr> {
        crash_point(&self.world, self.node, self.life, "save_vote");
        self.inner.save_vote(vote).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, SErr> {
        self.inner.read_vote().await
    }

    async fn save_committed(&mut self, c: Option<LogId<NodeId>>) -> Result<(), SErr> {
        self.inner.save_committed(c).await
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, SErr> {
        self.inner.read_committed().await
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<_> = entries.into_iter().collect();
        let written: Vec<(LogId<NodeId>, Payload)> = entries
            .iter()
            .map(|e| (e.log_id, e.payload.clone()))
            .collect();
        crash_point(&self.world, self.node, self.life, "append");
        let r = self.inner.append(entries, callback).await;
        // An append cut by a crash counts only if its entries reach another
        // member's log (they are recorded there): a leader that lost an
        // unflushed entry no one saw may write another under its log id.
        let mut w = lock(&self.world);
        if r.is_ok() && w.slots[self.node].life == self.life {
            for (id, p) in written {
                match w.written.get(&id) {
                    Some(q) if *q != p => {
                        let v = format!(
                            "log id {id} written with two payloads (n{} now): {} / {}",
                            id_of(self.node),
                            show(q),
                            show(&p)
                        );
                        w.violation(v);
                    }
                    Some(_) => {}
                    None => {
                        w.written.insert(id, p);
                    }
                }
            }
        }
        r
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        lock(&self.world).note(|| format!("n{} truncate from {}", id_of(self.node), log_id));
        crash_point(&self.world, self.node, self.life, "truncate");
        self.inner.truncate(log_id).await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        lock(&self.world).note(|| format!("n{} purge to {}", id_of(self.node), log_id));
        crash_point(&self.world, self.node, self.life, "purge");
        self.inner.purge(log_id).await
    }
}

fn show(p: &Payload) -> String {
    match p {
        EntryPayload::Blank => "blank".into(),
        EntryPayload::Normal(c) => format!("{c:?}"),
        EntryPayload::Membership(m) => format!("{m:?}"),
    }
}

/// warren's state machine, with every entry it is given and applies recorded.
struct ObservedSm {
    inner: StateMachine,
    world: Shared,
    node: usize,
    life: u64,
}

impl RaftStateMachine<TypeConfig> for ObservedSm {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, NodeInfo>), SErr> {
        self.inner.applied_state().await
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Option<String>>, SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<_> = entries.into_iter().collect();
        let ids: Vec<LogId<NodeId>> = entries.iter().map(|e| e.log_id).collect();
        {
            // Only committed entries reach a state machine: each index has one entry.
            let mut w = lock(&self.world);
            for e in &entries {
                match w.committed.get(&e.log_id.index) {
                    Some((id, q)) if *id != e.log_id || *q != e.payload => {
                        let v = format!(
                            "index {} applied as {} {} on n{} but as {id} {} before",
                            e.log_id.index,
                            e.log_id,
                            show(&e.payload),
                            id_of(self.node),
                            show(q)
                        );
                        w.violation(v);
                    }
                    Some(_) => {}
                    None => {
                        w.committed
                            .insert(e.log_id.index, (e.log_id, e.payload.clone()));
                    }
                }
            }
        }
        crash_point(&self.world, self.node, self.life, "apply");
        let r = self.inner.apply(entries).await;
        if r.is_ok() {
            let mut w = lock(&self.world);
            for id in ids {
                let before = w.slots[self.node].applied;
                if before.is_some_and(|b| id.index <= b) {
                    let v = format!(
                        "n{} applied index {} again (it had applied up to {before:?})",
                        id_of(self.node),
                        id.index
                    );
                    w.violation(v);
                }
                w.slots[self.node].applied = Some(id.index);
            }
        }
        r
    }

    async fn get_snapshot_builder(&mut self) -> StateMachine {
        self.inner.get_snapshot_builder().await
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, SErr> {
        self.inner.begin_receiving_snapshot().await
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, NodeInfo>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), SErr> {
        crash_point(&self.world, self.node, self.life, "install_snapshot");
        let r = self.inner.install_snapshot(meta, snapshot).await;
        if r.is_ok() {
            let mut w = lock(&self.world);
            let at = meta.last_log_id.map(|l| l.index);
            w.note(|| format!("n{} installed snapshot to {at:?}", id_of(self.node)));
            let s = &mut w.slots[self.node];
            s.applied = s.applied.max(at);
        }
        r
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SErr> {
        self.inner.get_current_snapshot().await
    }
}

// ---------------------------------------------------------------- members

fn config(rng: &mut StdRng) -> Arc<openraft::Config> {
    // openraft draws an election timeout from thread_rng, which no seed
    // controls: a range of one value takes it out, and the seed picks the
    // value per member and life instead.
    let timeout = rng.gen_range(150..400);
    let c = openraft::Config {
        cluster_name: "sim".into(),
        heartbeat_interval: HEARTBEAT_MS,
        election_timeout_min: timeout,
        election_timeout_max: timeout + 1,
        // Snapshots, purges and snapshot installs happen within a run.
        snapshot_policy: SnapshotPolicy::LogsSinceLast(20),
        max_in_snapshot_log_to_keep: 5,
        ..Default::default()
    };
    Arc::new(c.validate().expect("valid raft config"))
}

/// Start (or restart) member `node` on its disk as it is.
async fn start(world: &Shared, node: usize) {
    let (disk, life, cfg) = {
        let mut w = lock(world);
        let cfg = config(&mut w.rng);
        let s = &w.slots[node];
        (s.disk.clone(), s.life, cfg)
    };
    let store = LogStore::in_memory(&disk);
    let sm = StateMachine::open(Arc::new(ModelTarget), store.clone()).expect("state machine");
    let log = ObservedLog {
        inner: store,
        world: Arc::clone(world),
        node,
        life,
    };
    let osm = ObservedSm {
        inner: sm.clone(),
        world: Arc::clone(world),
        node,
        life,
    };
    let net = Net {
        world: Arc::clone(world),
        from: node,
        life,
    };
    let raft = match Raft::new(id_of(node), cfg, net, log, osm).await {
        Ok(raft) => raft,
        Err(e) => {
            // It stays down (and the run cannot converge).
            let v = format!("n{} cannot start from its store: {e}", id_of(node));
            lock(world).violation(v);
            return;
        }
    };
    watch(world, node, life, &raft);
    let mut w = lock(world);
    w.note(|| format!("n{} started (life {life})", id_of(node)));
    w.slots[node].raft = Some(raft);
    w.slots[node].sm = Some(sm);
}

/// Follow a member's metrics: its vote never goes back (over all its lives),
/// and who led which term.
fn watch(world: &Shared, node: usize, life: u64, raft: &Raft<TypeConfig>) {
    let mut rx = raft.metrics();
    let world = Arc::clone(world);
    tokio::spawn(async move {
        loop {
            let (vote, leader) = {
                let m = rx.borrow_and_update();
                (m.vote, m.state == ServerState::Leader)
            };
            {
                let mut w = lock(&world);
                if w.slots[node].life != life {
                    return;
                }
                match w.slots[node].vote {
                    // Before it has read its store, a member shows the default vote.
                    _ if vote == Vote::default() => {}
                    Some(before)
                        if matches!(vote.partial_cmp(&before), None | Some(Ordering::Less)) =>
                    {
                        let v = format!("n{} vote went back from {before} to {vote}", id_of(node));
                        w.violation(v);
                    }
                    _ => {}
                }
                if vote != Vote::default() {
                    w.slots[node].vote = Some(vote);
                }
                if leader {
                    let term = vote.leader_id.term;
                    if w.leaders.entry(term).or_default().insert(id_of(node)) {
                        w.note(|| format!("n{} leads term {term}", id_of(node)));
                    }
                }
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    });
}

/// The member that leads with the highest vote, if any does.
fn leader(world: &Shared) -> Option<usize> {
    let w = lock(world);
    let mut best: Option<(Vote<NodeId>, usize)> = None;
    for (i, s) in w.slots.iter().enumerate() {
        let Some(raft) = &s.raft else { continue };
        let m = raft.metrics().borrow().clone();
        if m.state == ServerState::Leader && best.as_ref().is_none_or(|(v, _)| m.vote > *v) {
            best = Some((m.vote, i));
        }
    }
    best.map(|(_, i)| i)
}

/// Crash member `node`: its disk keeps the flushed writes and a random
/// prefix of the others; everything of this life stops.
async fn crash(world: &Shared, node: usize, life: Option<u64>) {
    let raft = {
        let mut w = lock(world);
        // A crash point fires only in its member's life, and not after the
        // final heal.
        if life.is_some_and(|l| l != w.slots[node].life || w.io_crash == 0.0) {
            return;
        }
        let Some(raft) = w.slots[node].raft.take() else {
            return;
        };
        let unflushed = w.slots[node].disk.unflushed();
        let keep = w.rng.gen_range(0..=unflushed);
        w.slots[node].disk.crash(keep);
        // What the crash left must be a log openraft can start from: no hole
        // (one a later truncation would repair is still one at restart).
        let mut store = LogStore::in_memory(&w.slots[node].disk);
        if let Some(Ok(entries)) = store.try_get_log_entries(..).now_or_never() {
            let at: Vec<u64> = entries.iter().map(|e| e.log_id.index).collect();
            if let (Some(f), Some(l)) = (at.first(), at.last()) {
                if l - f + 1 != at.len() as u64 {
                    let v = format!("n{}'s crash left a hole in its log: {at:?}", id_of(node));
                    w.violation(v);
                }
            }
        }
        w.slots[node].life += 1;
        w.slots[node].sm = None;
        w.note(|| {
            format!(
                "n{} crashed (kept {keep} of {unflushed} unflushed writes)",
                id_of(node)
            )
        });
        raft
    };
    let _ = raft.shutdown().await;
}

// ---------------------------------------------------------------- clients

fn command(rng: &mut StdRng, nodes: usize) -> Command {
    let vhost = ["/", "/", "v1"][rng.gen_range(0..3)].to_string();
    let x = format!("x{}", rng.gen_range(0..4));
    let q = format!("q{}", rng.gen_range(0..5));
    let user = ["ann", "bob", "cy"][rng.gen_range(0..3)].to_string();
    let binding = |rng: &mut StdRng| BindingRec {
        vhost: vhost.clone(),
        source: x.clone(),
        to_exchange: rng.gen_bool(0.2),
        destination: if rng.gen_bool(0.2) {
            format!("x{}", rng.gen_range(0..4))
        } else {
            q.clone()
        },
        routing_key: format!("k{}", rng.gen_range(0..3)),
        arguments: Args::default(),
    };
    match rng.gen_range(0..100) {
        0..=19 => Command::DeclareQueue {
            vhost,
            name: q,
            node: format!("sim@n{}", rng.gen_range(1..=nodes)),
            durable: rng.gen_bool(0.8),
            auto_delete: false,
            arguments: Args::default(),
        },
        20..=27 => Command::DeleteQueue { vhost, name: q },
        28..=43 => Command::DeclareExchange {
            vhost,
            name: x,
            kind: ["direct", "fanout", "topic", "x-refused"][rng.gen_range(0..4)].into(),
            durable: true,
            auto_delete: false,
            internal: false,
            arguments: Args::default(),
        },
        44..=49 => Command::DeleteExchange { vhost, name: x },
        50..=64 => Command::Bind(binding(rng)),
        65..=71 => Command::Unbind(binding(rng)),
        72..=76 => Command::PutVhost {
            name: ["v1", "v2"][rng.gen_range(0..2)].into(),
            creator: Some(user),
        },
        77..=78 => Command::DeleteVhost {
            name: ["v1", "v2"][rng.gen_range(0..2)].into(),
        },
        79..=84 => Command::PutUser {
            name: user,
            password_hash: format!("{:016x}", rng.gen::<u64>()),
            tags: vec!["management".into()],
        },
        85..=86 => Command::DeleteUser { name: user },
        87..=91 => Command::SetPermission {
            vhost,
            user,
            configure: ".*".into(),
            write: ".*".into(),
            read: format!("^q{}", rng.gen_range(0..3)),
        },
        92..=93 => Command::ClearPermission { vhost, user },
        94..=97 => Command::PutPolicy {
            vhost,
            name: format!("p{}", rng.gen_range(0..2)),
            pattern: "^q".into(),
            apply_to: "queues".into(),
            priority: rng.gen_range(0..3),
            definition: r#"{"max-length":10}"#.into(),
            operator: false,
        },
        _ => Command::DeletePolicy {
            vhost,
            name: format!("p{}", rng.gen_range(0..2)),
            operator: false,
        },
    }
}

/// A client's proposal through member `node`, following redirections to the
/// leader; Ok with the entry's index once committed.
async fn propose(world: &Shared, mut node: usize, cmd: Command) -> Result<u64, String> {
    for _ in 0..3 {
        let raft = lock(world).slots[node].raft.clone();
        let Some(raft) = raft else {
            return Err("member down".into());
        };
        match raft.client_write(cmd.clone()).await {
            Ok(resp) => return Ok(resp.log_id.index),
            Err(RaftError::APIError(openraft::error::ClientWriteError::ForwardToLeader(f))) => {
                match f.leader_id {
                    Some(l) => node = index_of(l),
                    None => return Err("no leader known".into()),
                }
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    Err("redirected too often".into())
}

fn spawn_client(world: &Shared, n: usize) -> tokio::task::JoinHandle<()> {
    let leader = leader(world);
    let (node, cmd) = {
        let mut w = lock(world);
        // Half the clients are on the leader's node (even one cut off, whose
        // uncommitted entries others truncate later), half on any node.
        let node = match leader {
            Some(l) if w.rng.gen_bool(0.5) => l,
            _ => w.rng.gen_range(0..n),
        };
        let cmd = command(&mut w.rng, n);
        (node, cmd)
    };
    let world = Arc::clone(world);
    tokio::spawn(async move {
        let r = tokio::time::timeout(CLIENT_TIMEOUT, propose(&world, node, cmd.clone())).await;
        let mut w = lock(&world);
        match r {
            Ok(Ok(index)) => {
                w.note(|| format!("client via n{}: committed at {index}: {cmd:?}", id_of(node)));
                w.acked.push(cmd);
            }
            Ok(Err(e)) => w.note(|| format!("client via n{}: {e}", id_of(node))),
            Err(_) => w.note(|| format!("client via n{}: timed out", id_of(node))),
        }
    })
}

/// Through the leader: make a learner a voter again, or a voter (while more
/// than a majority of the members are voters) a learner.
fn spawn_membership_change(world: &Shared, n: usize) -> tokio::task::JoinHandle<()> {
    let world = Arc::clone(world);
    tokio::spawn(async move {
        let Some(l) = leader(&world) else { return };
        let change = {
            let mut w = lock(&world);
            let Some(raft) = w.slots[l].raft.clone() else {
                return;
            };
            let m = raft.metrics().borrow().membership_config.clone();
            let voters: Vec<NodeId> = m.membership().voter_ids().collect();
            let learners: Vec<NodeId> = m.membership().learner_ids().collect();
            let change =
                if !learners.is_empty() && (voters.len() <= n / 2 + 1 || w.rng.gen_bool(0.5)) {
                    let id = learners[w.rng.gen_range(0..learners.len())];
                    ChangeMembers::AddVoterIds(BTreeSet::from([id]))
                } else if voters.len() > n / 2 + 1 {
                    let id = voters[w.rng.gen_range(0..voters.len())];
                    ChangeMembers::RemoveVoters(BTreeSet::from([id]))
                } else {
                    return;
                };
            w.note(|| format!("membership change via n{}: {change:?}", id_of(l)));
            (raft, change)
        };
        let (raft, change) = change;
        // Removed voters stay as learners (retain), so every member keeps
        // receiving the log.
        let r = tokio::time::timeout(CLIENT_TIMEOUT, raft.change_membership(change, true)).await;
        let mut w = lock(&world);
        match r {
            Ok(Ok(resp)) => w.note(|| format!("membership changed at {}", resp.log_id)),
            Ok(Err(e)) => w.note(|| format!("membership change failed: {e}")),
            Err(_) => w.note(|| "membership change timed out".into()),
        }
    })
}

// ---------------------------------------------------------------- one run

/// What one seed's run found.
struct Outcome {
    violations: Vec<String>,
    trace: Vec<String>,
    /// A digest of everything that happened, for the determinism check.
    hash: u64,
}

async fn run(seed: u64, keep_trace: bool) -> Outcome {
    let mut rng = StdRng::seed_from_u64(seed);
    let plan = Plan::of(&mut rng);
    let n = plan.nodes;
    let world: Shared = Arc::new(Mutex::new(World {
        rng,
        start: Instant::now(),
        slots: (0..n)
            .map(|_| Slot {
                disk: MemoryDisk::new(FLUSH_LATENCY),
                life: 0,
                raft: None,
                sm: None,
                applied: None,
                vote: None,
            })
            .collect(),
        group: vec![0; n],
        loss: 0.0,
        max_delay_ms: 5,
        io_crash: 0.0,
        trace: Vec::new(),
        keep_trace,
        hash: 0xcbf2_9ce4_8422_2325,
        violations: Vec::new(),
        written: BTreeMap::new(),
        committed: BTreeMap::new(),
        leaders: BTreeMap::new(),
        acked: Vec::new(),
    }));
    lock(&world).note(|| format!("plan {plan:?}"));
    for node in 0..n {
        start(&world, node).await;
    }
    let members: BTreeMap<NodeId, NodeInfo> = (0..n).map(|i| (id_of(i), info(i))).collect();
    let first = lock(&world).slots[0].raft.clone();
    if let Some(r) = first {
        r.initialize(members).await.expect("initialize");
    }
    // Crash points from here on (a group that never formed tells nothing).
    lock(&world).io_crash = plan.io_crash;

    // Chaos.
    let mut clients = Vec::new();
    let end = Instant::now() + plan.chaos;
    while Instant::now() < end {
        let (pause, roll) = {
            let mut w = lock(&world);
            (
                Duration::from_millis(w.rng.gen_range(2..50)),
                w.rng.gen_range(0..100),
            )
        };
        tokio::time::sleep(pause).await;
        match roll {
            0..=47 => clients.push(spawn_client(&world, n)),
            48..=51 => clients.push(spawn_membership_change(&world, n)),
            52..=61 => {
                let leader = leader(&world);
                let mut w = lock(&world);
                let groups: Vec<u8> = match leader {
                    // Half the partitions cut the leader off.
                    Some(l) if w.rng.gen_bool(0.5) => (0..n).map(|i| u8::from(i == l)).collect(),
                    _ => (0..n).map(|_| w.rng.gen_range(0..2)).collect(),
                };
                w.note(|| format!("partition {groups:?}"));
                w.group = groups;
            }
            62..=69 => {
                let mut w = lock(&world);
                w.note(|| "heal".into());
                w.group = vec![0; n];
            }
            70..=79 => {
                // Half the crashes are the leader's.
                let leader = leader(&world);
                let node = {
                    let mut w = lock(&world);
                    match leader {
                        Some(l) if w.rng.gen_bool(0.5) => l,
                        _ => w.rng.gen_range(0..n),
                    }
                };
                crash(&world, node, None).await;
            }
            80..=91 => {
                let down: Vec<usize> = {
                    let w = lock(&world);
                    (0..n).filter(|i| !w.up(*i)).collect()
                };
                if !down.is_empty() {
                    let node = down[lock(&world).rng.gen_range(0..down.len())];
                    start(&world, node).await;
                }
            }
            _ => {
                let mut w = lock(&world);
                w.loss = [0.0, 0.0, 0.05, 0.2, 0.5][w.rng.gen_range(0..5)];
                w.max_delay_ms = [2, 5, 20, 60][w.rng.gen_range(0..4)];
                let (loss, delay) = (w.loss, w.max_delay_ms);
                w.note(|| format!("network: loss {loss}, delays up to {delay} ms"));
            }
        }
    }

    // Final heal: every member up, one network, no loss.
    {
        let mut w = lock(&world);
        w.note(|| "final heal".into());
        w.group = vec![0; n];
        w.loss = 0.0;
        w.max_delay_ms = 5;
        w.io_crash = 0.0;
    }
    for node in 0..n {
        if !lock(&world).up(node) {
            start(&world, node).await;
        }
    }
    // Clients still waiting give up: their proposals may or may not commit
    // (nothing is checked of them but that they break nothing).
    for c in clients {
        c.abort();
    }
    let converged = converge(&world, n).await;
    check(&world, n, converged).await;

    for node in 0..n {
        let raft = lock(&world).slots[node].raft.take();
        if let Some(r) = raft {
            let _ = r.shutdown().await;
        }
    }
    let mut w = lock(&world);
    let hash = w.hash;
    Outcome {
        violations: std::mem::take(&mut w.violations),
        trace: std::mem::take(&mut w.trace),
        hash,
    }
}

/// After the final heal: a barrier entry commits, and every member applies
/// up to it. The barrier's index, or None when that did not happen in time.
async fn converge(world: &Shared, n: usize) -> Option<u64> {
    let deadline = Instant::now() + CONVERGE_WITHIN;
    let barrier = Command::PutVhost {
        name: "barrier".into(),
        creator: None,
    };
    let mut node = 0;
    let index = loop {
        if Instant::now() >= deadline {
            return None;
        }
        let r = tokio::time::timeout(CLIENT_TIMEOUT, propose(world, node, barrier.clone())).await;
        if let Ok(Ok(index)) = r {
            break index;
        }
        node = (node + 1) % n;
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    lock(world).note(|| format!("barrier committed at {index}"));
    for node in 0..n {
        let raft = lock(world).slots[node].raft.clone()?;
        let mut rx = raft.metrics();
        let reached = tokio::time::timeout_at(deadline, async {
            loop {
                if rx
                    .borrow_and_update()
                    .last_applied
                    .is_some_and(|l| l.index >= index)
                {
                    return true;
                }
                if rx.changed().await.is_err() {
                    return false;
                }
            }
        })
        .await;
        if reached != Ok(true) {
            return None;
        }
    }
    Some(index)
}

/// The checks after the final heal (the per-event ones ran during the run).
async fn check(world: &Shared, n: usize, converged: Option<u64>) {
    let Some(barrier) = converged else {
        lock(world).violation("no convergence within 30 s of the final heal".into());
        return;
    };
    check_models(&mut lock(world), n, barrier);
    // Log matching: where two members' logs hold the same log id, they hold
    // the same entries up to it.
    let mut logs = Vec::new();
    for i in 0..n {
        let disk = lock(world).slots[i].disk.clone();
        let mut store = LogStore::in_memory(&disk);
        let entries = store.try_get_log_entries(..).await.unwrap_or_default();
        let by_index: BTreeMap<u64, (LogId<NodeId>, Payload)> = entries
            .into_iter()
            .map(|e| (e.log_id.index, (e.log_id, e.payload)))
            .collect();
        logs.push(by_index);
    }
    check_logs(&mut lock(world), &logs, barrier);
}

/// Acknowledged proposals are committed; every member's model is the same
/// and the committed sequence's.
fn check_models(w: &mut World, n: usize, barrier: u64) {
    // The committed sequence, as the state machines were given it.
    let mut reference = Metadata::default();
    for i in 0..=barrier {
        match w.committed.get(&i) {
            Some((_, EntryPayload::Normal(cmd))) if !refused(cmd) => reference.record(cmd),
            Some(_) => {}
            None => {
                // Every member installed a snapshot over it: only the
                // snapshot's model is known. Compare the models only.
                reference = Metadata::default();
                break;
            }
        }
    }
    let full = (0..=barrier).all(|i| w.committed.contains_key(&i));
    // Every proposal answered Ok is in the committed sequence.
    let mut in_log: BTreeMap<String, usize> = BTreeMap::new();
    for (_, p) in w.committed.values() {
        if let EntryPayload::Normal(c) = p {
            *in_log.entry(format!("{c:?}")).or_default() += 1;
        }
    }
    let mut acked: BTreeMap<String, usize> = BTreeMap::new();
    for c in &w.acked {
        *acked.entry(format!("{c:?}")).or_default() += 1;
    }
    let mut found = Vec::new();
    for (c, k) in &acked {
        let have = in_log.get(c).copied().unwrap_or(0);
        if have < *k && full {
            found.push(format!(
                "acknowledged {k} time(s) but committed {have}: {c}"
            ));
        }
    }
    // Every member's model is the same, and the committed sequence's.
    let models: Vec<Option<Metadata>> = (0..n)
        .map(|i| w.slots[i].sm.as_ref().map(|sm| sm.metadata()))
        .collect();
    for (i, m) in models.iter().enumerate() {
        let Some(m) = m else { continue };
        if Some(m) != models[0].as_ref() {
            found.push(format!("n{}'s model differs from n1's", id_of(i)));
        }
        if full && *m != reference {
            found.push(format!(
                "n{}'s model is not the committed sequence's",
                id_of(i)
            ));
        }
    }
    for v in found {
        w.violation(v);
    }
}

/// No log has a hole; two logs that hold the same log id hold the same
/// entries up to it.
fn check_logs(w: &mut World, logs: &[BTreeMap<u64, (LogId<NodeId>, Payload)>], barrier: u64) {
    let n = logs.len();
    for a in 0..n {
        let first = logs[a].keys().next().copied();
        let last = logs[a].keys().next_back().copied();
        if let (Some(f), Some(l)) = (first, last) {
            if l - f + 1 != logs[a].len() as u64 {
                let v = format!("n{}'s log has a hole between {f} and {l}", id_of(a));
                w.violation(v);
            }
        }
        for b in a + 1..n {
            let common = logs[a]
                .iter()
                .rev()
                .find(|(i, (id, _))| logs[b].get(i).is_some_and(|(j, _)| j == id))
                .map(|(i, _)| *i);
            let Some(upto) = common else { continue };
            for (i, e) in logs[a].range(..=upto) {
                if let Some(f) = logs[b].get(i) {
                    if f != e {
                        let v = format!(
                            "log matching: n{} and n{} agree at {upto} but differ at {i}",
                            id_of(a),
                            id_of(b)
                        );
                        w.violation(v);
                        break;
                    }
                }
            }
        }
    }
    let several = w.leaders.values().filter(|l| l.len() > 1).count();
    let (acked, terms) = (w.acked.len(), w.leaders.len());
    w.note(|| format!(
        "checked: barrier {barrier}, {acked} acknowledged, {terms} terms, {several} with several leaders"
    ));
}

fn run_seed(seed: u64, keep_trace: bool) -> Outcome {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rt.block_on(run(seed, keep_trace))
    }));
    match r {
        Ok(o) => o,
        Err(p) => {
            let why = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            Outcome {
                violations: vec![format!("panicked: {why}")],
                trace: Vec::new(),
                hash: 0,
            }
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[test]
fn seeded_schedules_keep_the_raft_invariants() {
    if let Some(seed) = env_u64("WARREN_SIM_SEED") {
        let o = run_seed(seed, true);
        for line in &o.trace {
            println!("{line}");
        }
        assert!(o.violations.is_empty(), "seed {seed}: {:#?}", o.violations);
        return;
    }
    let count = env_u64("WARREN_SIM_SEEDS").unwrap_or(2000);
    let first = env_u64("WARREN_SIM_FIRST").unwrap_or(0);
    let next = std::sync::atomic::AtomicU64::new(first);
    let failures = Mutex::new(Vec::new());
    let threads = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .min(8);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let seed = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if seed >= first + count {
                    return;
                }
                let o = run_seed(seed, false);
                if !o.violations.is_empty() {
                    eprintln!(
                        "raft_sim: seed {seed} failed: {:#?}\n  replay: WARREN_SIM_SEED={seed} cargo test --test raft_sim -- --nocapture",
                        o.violations
                    );
                    lock_failures(&failures).push(seed);
                }
            });
        }
    });
    let failed = lock_failures(&failures).clone();
    assert!(
        failed.is_empty(),
        "{} of {count} seeds failed: {failed:?} (replay one: WARREN_SIM_SEED=<seed> cargo test --test raft_sim -- --nocapture)",
        failed.len()
    );
}

fn lock_failures(m: &Mutex<Vec<u64>>) -> std::sync::MutexGuard<'_, Vec<u64>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[test]
fn a_seed_is_a_schedule() {
    for seed in [7, 1234] {
        let a = run_seed(seed, true);
        let b = run_seed(seed, true);
        assert!(
            a.trace.len() > 30,
            "seed {seed}: a trace of {} events",
            a.trace.len()
        );
        assert_eq!(a.hash, b.hash, "seed {seed} ran two different schedules");
    }
    assert_ne!(run_seed(1, true).hash, run_seed(2, true).hash);
}
