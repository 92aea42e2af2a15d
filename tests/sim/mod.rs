//! The deterministic simulation of a warren Raft group (issue 14), shared by
//! `tests/raft_sim.rs` (the metadata group) and `tests/quorum_sim.rs` (a
//! quorum queue group): what differs between them (the type configuration,
//! the state machine, the commands clients propose and the checks of the
//! state machines) is a [`Kind`]; the rest is here.
//!
//! Three or five members run in one process on a current-thread tokio runtime
//! with paused time, each on warren's own log store (`cluster::store::LogStore`)
//! and the kind's state machine over a simulated disk (`MemoryDisk`: writes are
//! volatile until a flush, which takes 1 to 8 ms; a crash keeps what was
//! flushed plus a prefix of the rest). Messages go through a simulated network that, driven by one seeded
//! RNG, loses, delays (and so reorders) and partitions them. A seed decides
//! everything: client proposals, partitions and heals, crashes (at random and
//! in the middle of store writes) and restarts, membership changes, message
//! fates, election timeouts. Checked during the run: no log id written with
//! two payloads, votes never going back, one entry per applied index on every
//! member, no entry applied twice (in a life, or over lives for a state
//! machine that persists what it applied), an acknowledged proposal durable
//! on a majority of its voters; after a final heal: convergence,
//! no holes and log matching, then the kind's checks of the state machines.
//! A failing seed prints itself and the command that replays it.

// Each test crate uses its own part of the kind's hooks.
#![allow(dead_code)]

use futures::FutureExt;
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError};
use openraft::impls::OneshotResponder;
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    ChangeMembers, Entry, EntryPayload, LogId, Raft, RaftLogReader, ServerState, SnapshotMeta,
    SnapshotPolicy, StorageError, StoredMembership, TokioRuntime, Vote,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use warren::cluster::disk::MemoryDisk;
use warren::cluster::store::{LogConfig, LogStore};
use warren::cluster::NodeInfo;

pub type NodeId = u64;
type SErr = StorageError<NodeId>;
/// A kind's snapshot data.
type SnapshotData<K> = <<K as Kind>::C as openraft::RaftTypeConfig>::SnapshotData;

type Rpc<T, E = openraft::error::Infallible> =
    Result<T, RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>>;

/// What a simulated group is: its types, its state machine, what clients
/// propose to it and what is checked of its state machines.
pub trait Kind: Sized + Send + 'static {
    type C: LogConfig<
        D: Clone + PartialEq + Debug,
        Node = NodeInfo,
        Responder = OneshotResponder<Self::C>,
        AsyncRuntime = TokioRuntime,
    >;
    type Sm: RaftStateMachine<Self::C> + Clone + Send + Sync + 'static;
    /// What the kind records of a run (beside the Raft-level facts).
    type Record: Default + Send;
    /// The test's name, for the replay command.
    const TEST: &'static str;
    /// The prefix of its environment variables (`<ENV>_SEEDS`, `<ENV>_SEED`, `<ENV>_FIRST`).
    const ENV: &'static str;
    /// Whether the state machine persists what it applied (no entry is
    /// applied twice over its lives), or rebuilds from its snapshot at each
    /// start (no entry twice within a life).
    const APPLIED_IS_DURABLE: bool;
    /// A snapshot after this many entries (and this many kept behind it):
    /// snapshots, purges and snapshot installs happen within a run.
    const SNAPSHOT_EVERY: (u64, u64);

    /// The store and state machine of a member starting on `disk`.
    fn open(disk: &MemoryDisk) -> (LogStore<Self::C>, Self::Sm);
    /// A client's next proposal.
    fn command(w: &mut World<Self>) -> <Self::C as openraft::RaftTypeConfig>::D;
    /// The proposal that shows the group converged.
    fn barrier() -> <Self::C as openraft::RaftTypeConfig>::D;
    /// A proposal was answered Ok: committed at `index`.
    fn acked(w: &mut World<Self>, index: u64, cmd: <Self::C as openraft::RaftTypeConfig>::D);
    /// Member `node`'s state machine just applied entries or installed a snapshot.
    fn applied(w: &mut World<Self>, node: usize, sm: &Self::Sm);
    /// After convergence at `barrier`: the state machines.
    fn check_models(w: &mut World<Self>, barrier: u64);
}

type D<K> = <<K as Kind>::C as openraft::RaftTypeConfig>::D;
pub type Payload<K> = EntryPayload<<K as Kind>::C>;

pub const HEARTBEAT_MS: u64 = 50;
/// How long a client waits for its proposal.
pub const CLIENT_TIMEOUT: Duration = Duration::from_millis(1500);
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
    /// How long a flush takes (the window of a crash point): as fast as the
    /// network, or slower (an fsync of a few ms against a LAN's round trip).
    flush: Duration,
}

impl Plan {
    fn of(rng: &mut StdRng) -> Plan {
        Plan {
            nodes: if rng.gen_bool(0.65) { 3 } else { 5 },
            chaos: Duration::from_millis(rng.gen_range(500..1500)),
            io_crash: [0.0, 0.02, 0.1, 0.1][rng.gen_range(0..4)],
            flush: Duration::from_millis([1, 1, 3, 8][rng.gen_range(0..4)]),
        }
    }
}

/// A member: its disk outlives its lives.
pub struct Slot<K: Kind> {
    disk: MemoryDisk,
    /// Bumped by each crash; messages of an earlier life are dead.
    life: u64,
    raft: Option<Raft<K::C>>,
    pub sm: Option<K::Sm>,
    /// The highest index this member's state machine applied (over all its
    /// lives when that is durable).
    pub applied: Option<u64>,
    /// The highest vote it acted on, over all its lives.
    vote: Option<Vote<NodeId>>,
}

/// Everything the simulation shares: the RNG, the network's state, the
/// members, and what the checks record.
pub struct World<K: Kind> {
    pub rng: StdRng,
    start: Instant,
    pub slots: Vec<Slot<K>>,
    /// Partition group of each member: messages pass only within a group.
    group: Vec<u8>,
    loss: f64,
    max_delay_ms: u64,
    io_crash: f64,
    flush: Duration,
    trace: Vec<String>,
    keep_trace: bool,
    hash: u64,
    violations: Vec<String>,
    /// Every log id ever written by any member, with its payload.
    written: BTreeMap<LogId<NodeId>, Payload<K>>,
    /// Every index any member's state machine was given, with its entry.
    pub committed: BTreeMap<u64, (LogId<NodeId>, Payload<K>)>,
    /// The members that were leader in each term (openraft's default mode
    /// allows several, ordered by node id).
    leaders: BTreeMap<u64, BTreeSet<NodeId>>,
    /// How many proposals were answered Ok.
    pub acks: usize,
    /// What the kind records.
    pub record: K::Record,
}

pub type Shared<K> = Arc<Mutex<World<K>>>;

pub fn lock<K: Kind>(w: &Shared<K>) -> std::sync::MutexGuard<'_, World<K>> {
    w.lock().unwrap_or_else(|p| p.into_inner())
}

impl<K: Kind> World<K> {
    fn ms(&self) -> u128 {
        self.start.elapsed().as_millis()
    }

    /// The number of members.
    pub fn n(&self) -> usize {
        self.slots.len()
    }

    /// Record an event in the trace (only when a trace is kept: a run of
    /// thousands of seeds does not pay for the formatting).
    pub fn note(&mut self, what: impl FnOnce() -> String) {
        if !self.keep_trace {
            return;
        }
        let line = format!("{:>6} ms  {}", self.ms(), what());
        for b in line.bytes() {
            self.hash = (self.hash ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
        self.trace.push(line);
    }

    pub fn violation(&mut self, what: String) {
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

    /// Whether every index up to `barrier` was seen committed (no member
    /// skipped any of it by installing a snapshot over it everywhere).
    pub fn full(&self, barrier: u64) -> bool {
        (0..=barrier).all(|i| self.committed.contains_key(&i))
    }
}

pub fn id_of(node: usize) -> NodeId {
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

struct Net<K: Kind> {
    world: Shared<K>,
    from: usize,
    life: u64,
}

impl<K: Kind> RaftNetworkFactory<K::C> for Net<K> {
    type Network = Link<K>;

    async fn new_client(&mut self, target: NodeId, _node: &NodeInfo) -> Link<K> {
        Link {
            world: Arc::clone(&self.world),
            from: self.from,
            life: self.life,
            to: index_of(target),
        }
    }
}

struct Link<K: Kind> {
    world: Shared<K>,
    from: usize,
    life: u64,
    to: usize,
}

fn lost<E: std::error::Error>(what: &str) -> RPCError<NodeId, NodeInfo, RaftError<NodeId, E>> {
    RPCError::Network(NetworkError::new(&std::io::Error::other(what.to_string())))
}

impl<K: Kind> Link<K> {
    /// Carry one request to the target's current life and its answer back,
    /// each leg delayed and possibly lost. The delivery runs on its own task,
    /// so a request the caller gave up on still arrives (late, reordered).
    /// A lost leg looks like silence until `ttl`.
    async fn carry<T, F, Fut>(&self, kind: &'static str, ttl: Duration, call: F) -> Option<T>
    where
        T: Send + 'static,
        F: FnOnce(Raft<K::C>) -> Fut + Send + 'static,
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

impl<K: Kind> RaftNetwork<K::C> for Link<K> {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<K::C>,
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
        rpc: InstallSnapshotRequest<K::C>,
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

/// warren's log store, with every entry written recorded.
struct ObservedLog<K: Kind> {
    inner: LogStore<K::C>,
    world: Shared<K>,
    node: usize,
    life: u64,
}

/// Maybe (by the plan's chance) crash member `node` in the middle of the
/// store write it is starting: while the write is being flushed. The rare
/// writes (truncate, purge, snapshot install) crash five times as often.
fn crash_point<K: Kind>(world: &Shared<K>, node: usize, life: u64, what: &'static str) {
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
        let micros = w.flush.as_micros() as u64;
        Duration::from_micros(w.rng.gen_range(1..micros))
    };
    let world = Arc::clone(world);
    tokio::spawn(async move {
        tokio::time::sleep(at).await;
        lock(&world).note(|| format!("n{} crash point: {what}", id_of(node)));
        crash(&world, node, Some(life)).await;
    });
}

impl<K: Kind> RaftLogReader<K::C> for ObservedLog<K> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<K::C>>, SErr> {
        self.inner.try_get_log_entries(range).await
    }
}

impl<K: Kind> RaftLogStorage<K::C> for ObservedLog<K> {
    type LogReader = LogStore<K::C>;

    async fn get_log_state(&mut self) -> Result<LogState<K::C>, SErr> {
        self.inner.get_log_state().await
    }

    async fn get_log_reader(&mut self) -> LogStore<K::C> {
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

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<K::C>) -> Result<(), SErr>
    where
        I: IntoIterator<Item = Entry<K::C>> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<_> = entries.into_iter().collect();
        let written: Vec<(LogId<NodeId>, Payload<K>)> = entries
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
                            show::<K>(q),
                            show::<K>(&p)
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

pub fn show<K: Kind>(p: &Payload<K>) -> String {
    match p {
        EntryPayload::Blank => "blank".into(),
        EntryPayload::Normal(c) => format!("{c:?}"),
        EntryPayload::Membership(m) => format!("{m:?}"),
    }
}

/// The kind's state machine, with every entry it is given and applies recorded.
struct ObservedSm<K: Kind> {
    inner: K::Sm,
    world: Shared<K>,
    node: usize,
    life: u64,
}

type Builder<K> = <<K as Kind>::Sm as RaftStateMachine<<K as Kind>::C>>::SnapshotBuilder;
type Resp<K> = <<K as Kind>::C as openraft::RaftTypeConfig>::R;

impl<K: Kind> RaftStateMachine<K::C> for ObservedSm<K> {
    type SnapshotBuilder = Builder<K>;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, NodeInfo>), SErr> {
        self.inner.applied_state().await
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Resp<K>>, SErr>
    where
        I: IntoIterator<Item = Entry<K::C>> + Send,
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
                            show::<K>(&e.payload),
                            id_of(self.node),
                            show::<K>(q)
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
            if w.slots[self.node].life != self.life {
                return r;
            }
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
            K::applied(&mut w, self.node, &self.inner);
        }
        r
    }

    async fn get_snapshot_builder(&mut self) -> Builder<K> {
        self.inner.get_snapshot_builder().await
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotData<K>>, SErr> {
        self.inner.begin_receiving_snapshot().await
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, NodeInfo>,
        snapshot: Box<SnapshotData<K>>,
    ) -> Result<(), SErr> {
        crash_point(&self.world, self.node, self.life, "install_snapshot");
        let r = self.inner.install_snapshot(meta, snapshot).await;
        if r.is_ok() {
            let mut w = lock(&self.world);
            if w.slots[self.node].life != self.life {
                return r;
            }
            let at = meta.last_log_id.map(|l| l.index);
            w.note(|| format!("n{} installed snapshot to {at:?}", id_of(self.node)));
            let s = &mut w.slots[self.node];
            s.applied = s.applied.max(at);
            K::applied(&mut w, self.node, &self.inner);
        }
        r
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<K::C>>, SErr> {
        self.inner.get_current_snapshot().await
    }
}

// ---------------------------------------------------------------- members

fn config<K: Kind>(rng: &mut StdRng) -> Arc<openraft::Config> {
    // openraft draws an election timeout from thread_rng, which no seed
    // controls: a range of one value takes it out, and the seed picks the
    // value per member and life instead.
    let timeout = rng.gen_range(150..400);
    let c = openraft::Config {
        cluster_name: "sim".into(),
        heartbeat_interval: HEARTBEAT_MS,
        election_timeout_min: timeout,
        election_timeout_max: timeout + 1,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(K::SNAPSHOT_EVERY.0),
        max_in_snapshot_log_to_keep: K::SNAPSHOT_EVERY.1,
        ..Default::default()
    };
    Arc::new(c.validate().expect("valid raft config"))
}

/// Start (or restart) member `node` on its disk as it is.
async fn start<K: Kind>(world: &Shared<K>, node: usize) {
    let (disk, life, cfg) = {
        let mut w = lock(world);
        let cfg = config::<K>(&mut w.rng);
        let s = &w.slots[node];
        (s.disk.clone(), s.life, cfg)
    };
    let (store, mut sm) = K::open(&disk);
    // Where the state machine resumes: a state machine that persists what
    // it applied resumes where it was; one that rebuilds from its snapshot
    // applies the entries after it again (this life's count starts there).
    let resumed = match sm.applied_state().now_or_never() {
        Some(Ok((l, _))) => l.map(|l| l.index),
        _ => None,
    };
    {
        let mut w = lock(world);
        let before = w.slots[node].applied;
        if !K::APPLIED_IS_DURABLE {
            w.slots[node].applied = resumed;
        } else if resumed < before {
            let v = format!(
                "n{} resumes at {resumed:?} but had applied up to {before:?}",
                id_of(node)
            );
            w.violation(v);
        }
    }
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
fn watch<K: Kind>(world: &Shared<K>, node: usize, life: u64, raft: &Raft<K::C>) {
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
fn leader<K: Kind>(world: &Shared<K>) -> Option<usize> {
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
async fn crash<K: Kind>(world: &Shared<K>, node: usize, life: Option<u64>) {
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
        let mut store = LogStore::<K::C>::in_memory(&w.slots[node].disk);
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

/// A client's proposal through member `node`, following redirections to the
/// leader; Ok with the entry's log id once committed, and the membership the
/// leader had then.
async fn propose<K: Kind>(
    world: &Shared<K>,
    mut node: usize,
    cmd: D<K>,
) -> Result<(LogId<NodeId>, Membership), String> {
    for _ in 0..3 {
        let raft = lock(world).slots[node].raft.clone();
        let Some(raft) = raft else {
            return Err("member down".into());
        };
        match raft.client_write(cmd.clone()).await {
            Ok(resp) => {
                let m = raft.metrics().borrow().membership_config.clone();
                return Ok((resp.log_id, m));
            }
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

type Membership = Arc<StoredMembership<NodeId, NodeInfo>>;

/// An acknowledged entry is durable on a majority of each of the voter sets
/// in force at its position (in its member's log, or behind its purge
/// mark): whatever crashes now, it stays committed. Checked when the leader
/// that answered knows no later membership than the entry.
fn check_durable<K: Kind>(w: &mut World<K>, id: LogId<NodeId>, membership: &Membership) {
    if membership.log_id().is_some_and(|m| m.index > id.index) {
        return;
    }
    let has: Vec<bool> = w
        .slots
        .iter()
        .map(|s| {
            let mut store = LogStore::<K::C>::in_memory(&s.disk.durable_copy());
            let purged = match store.get_log_state().now_or_never() {
                Some(Ok(state)) => state.last_purged_log_id,
                _ => None,
            };
            let entry = match store
                .try_get_log_entries(id.index..=id.index)
                .now_or_never()
            {
                Some(Ok(e)) => e.first().map(|e| e.log_id),
                _ => None,
            };
            entry == Some(id) || purged.is_some_and(|p| p.index >= id.index)
        })
        .collect();
    for voters in membership.membership().get_joint_config() {
        let durable = voters.iter().filter(|v| has[index_of(**v)]).count();
        if durable * 2 <= voters.len() {
            let v = format!("{id} acknowledged but durable on {durable} of voters {voters:?} only");
            w.violation(v);
        }
    }
}

fn spawn_client<K: Kind>(world: &Shared<K>, n: usize) -> tokio::task::JoinHandle<()> {
    let leader = leader(world);
    let (node, cmd) = {
        let mut w = lock(world);
        // Half the clients are on the leader's node (even one cut off, whose
        // uncommitted entries others truncate later), half on any node.
        let node = match leader {
            Some(l) if w.rng.gen_bool(0.5) => l,
            _ => w.rng.gen_range(0..n),
        };
        let cmd = K::command(&mut w);
        (node, cmd)
    };
    let world = Arc::clone(world);
    tokio::spawn(async move {
        let r = tokio::time::timeout(CLIENT_TIMEOUT, propose(&world, node, cmd.clone())).await;
        let mut w = lock(&world);
        match r {
            Ok(Ok((id, membership))) => {
                w.note(|| format!("client via n{}: committed at {id}: {cmd:?}", id_of(node)));
                check_durable(&mut w, id, &membership);
                w.acks += 1;
                K::acked(&mut w, id.index, cmd);
            }
            Ok(Err(e)) => w.note(|| format!("client via n{}: {e}", id_of(node))),
            Err(_) => w.note(|| format!("client via n{}: timed out", id_of(node))),
        }
    })
}

/// Through the leader: make a learner a voter again, or a voter (while more
/// than a majority of the members are voters) a learner.
fn spawn_membership_change<K: Kind>(world: &Shared<K>, n: usize) -> tokio::task::JoinHandle<()> {
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
pub struct Outcome {
    pub violations: Vec<String>,
    pub trace: Vec<String>,
    /// A digest of everything that happened, for the determinism check.
    pub hash: u64,
}

async fn run<K: Kind>(seed: u64, keep_trace: bool) -> Outcome {
    let mut rng = StdRng::seed_from_u64(seed);
    let plan = Plan::of(&mut rng);
    let n = plan.nodes;
    let world: Shared<K> = Arc::new(Mutex::new(World {
        rng,
        start: Instant::now(),
        slots: (0..n)
            .map(|_| Slot {
                disk: MemoryDisk::new(plan.flush),
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
        flush: plan.flush,
        trace: Vec::new(),
        keep_trace,
        hash: 0xcbf2_9ce4_8422_2325,
        violations: Vec::new(),
        written: BTreeMap::new(),
        committed: BTreeMap::new(),
        leaders: BTreeMap::new(),
        acks: 0,
        record: K::Record::default(),
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
async fn converge<K: Kind>(world: &Shared<K>, n: usize) -> Option<u64> {
    let deadline = Instant::now() + CONVERGE_WITHIN;
    let mut node = 0;
    let index = loop {
        if Instant::now() >= deadline {
            return None;
        }
        let r = tokio::time::timeout(CLIENT_TIMEOUT, propose(world, node, K::barrier())).await;
        if let Ok(Ok((id, _))) = r {
            break id.index;
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
            let state = raft.metrics().borrow().running_state.clone();
            lock(world).note(|| format!("n{} did not reach the barrier: {state:?}", id_of(node)));
            return None;
        }
    }
    Some(index)
}

/// The checks after the final heal (the per-event ones ran during the run).
async fn check<K: Kind>(world: &Shared<K>, n: usize, converged: Option<u64>) {
    let Some(barrier) = converged else {
        lock(world).violation("no convergence within 30 s of the final heal".into());
        return;
    };
    K::check_models(&mut lock(world), barrier);
    // Log matching: where two members' logs hold the same log id, they hold
    // the same entries up to it.
    let mut logs = Vec::new();
    for i in 0..n {
        let disk = lock(world).slots[i].disk.clone();
        let mut store = LogStore::<K::C>::in_memory(&disk);
        let entries = store.try_get_log_entries(..).await.unwrap_or_default();
        let by_index: BTreeMap<u64, (LogId<NodeId>, Payload<K>)> = entries
            .into_iter()
            .map(|e| (e.log_id.index, (e.log_id, e.payload)))
            .collect();
        logs.push(by_index);
    }
    check_logs(&mut lock(world), &logs, barrier);
}

type Log<K> = BTreeMap<u64, (LogId<NodeId>, Payload<K>)>;

/// No log has a hole; two logs that hold the same log id hold the same
/// entries up to it.
fn check_logs<K: Kind>(w: &mut World<K>, logs: &[Log<K>], barrier: u64) {
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
    let (acked, terms) = (w.acks, w.leaders.len());
    w.note(|| format!(
        "checked: barrier {barrier}, {acked} acknowledged, {terms} terms, {several} with several leaders"
    ));
}

pub fn run_seed<K: Kind>(seed: u64, keep_trace: bool) -> Outcome {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("runtime");
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rt.block_on(run::<K>(seed, keep_trace))
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

/// The seeds the environment asks for (`<ENV>_SEED`: one, its trace
/// printed; else `<ENV>_SEEDS` of them, default `default`, from
/// `<ENV>_FIRST`), each run and checked; the failing ones are printed with
/// the command that replays them.
pub fn run_seeds<K: Kind>(default: u64) {
    let var = |s: &str| format!("{}_{s}", K::ENV);
    let replay = |seed: &str| {
        format!(
            "{}={seed} cargo test --test {} -- --nocapture",
            var("SEED"),
            K::TEST
        )
    };
    if let Some(seed) = env_u64(&var("SEED")) {
        let o = run_seed::<K>(seed, true);
        for line in &o.trace {
            println!("{line}");
        }
        assert!(o.violations.is_empty(), "seed {seed}: {:#?}", o.violations);
        return;
    }
    let count = env_u64(&var("SEEDS")).unwrap_or(default);
    let first = env_u64(&var("FIRST")).unwrap_or(0);
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
                let o = run_seed::<K>(seed, false);
                if !o.violations.is_empty() {
                    eprintln!(
                        "{}: seed {seed} failed: {:#?}\n  replay: {}",
                        K::TEST,
                        o.violations,
                        replay(&seed.to_string())
                    );
                    lock_failures(&failures).push(seed);
                }
            });
        }
    });
    let failed = lock_failures(&failures).clone();
    assert!(
        failed.is_empty(),
        "{} of {count} seeds failed: {failed:?} (replay one: {})",
        failed.len(),
        replay("<seed>")
    );
}

fn lock_failures(m: &Mutex<Vec<u64>>) -> std::sync::MutexGuard<'_, Vec<u64>> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The same seed runs the same schedule; different seeds, different ones.
pub fn a_seed_is_a_schedule<K: Kind>() {
    for seed in [7, 1234] {
        let a = run_seed::<K>(seed, true);
        let b = run_seed::<K>(seed, true);
        assert!(
            a.trace.len() > 30,
            "seed {seed}: a trace of {} events",
            a.trace.len()
        );
        assert_eq!(a.hash, b.hash, "seed {seed} ran two different schedules");
    }
    assert_ne!(run_seed::<K>(1, true).hash, run_seed::<K>(2, true).hash);
}
