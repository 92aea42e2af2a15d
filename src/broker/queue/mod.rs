//! Queues: ready messages, unacked accounting, consumers and delivery, and the
//! RabbitMQ queue semantics on top (TTL, expiry, length limits, dead-lettering,
//! single active consumer).
//!
//! A queue is an `Arc<Queue>` with its state behind its own mutex: publishers on
//! different queues never contend, and no lock is held across an await. Delivery
//! tags are not known here (the channel owns them): a queue hands a [`Delivery`] to
//! the consumer's [`DeliverySink`] and counts it unacked until the channel acks,
//! rejects or requeues it.
//!
//! # Time
//!
//! No clock is read here: every operation that needs the time takes `now` (ms since
//! the Unix epoch) from its caller, so the same calls at the same `now` give the
//! same result (TTL, `x-expires`, the `x-death` time).
//!
//! # The lock and the store
//!
//! Work under a queue's lock only changes memory. What it implies outside is
//! gathered in [`Effects`] and done once the lock is released: store operations
//! (written to the store in the order the queue made them: the queue takes its
//! submit lock before it releases its state lock, and submitting never blocks),
//! loading stored messages a consumer waits for (then delivery goes on under the
//! lock), and dead letters (routed to other queues, so queues never lock each
//! other). A persistent message's record is encoded before the lock is taken.
//!
//! # Memory
//!
//! A queue holds a bounded window of messages in memory per priority level; the
//! rest of a long queue is a tail in the message store, counted but not held (see
//! [`ready`]). A persistent message on a durable queue joins the tail once the
//! window holds [`PERSISTENT_WINDOW`] messages; any message does when the broker's
//! message memory budget is spent (transient ones then go to the store's ephemeral
//! space, gone after a restart). So does a message of a replicated quorum queue
//! (its group's log holds it durably; the store's ephemeral space, never synced,
//! has a copy at the message's id in the group, read back in the group's order
//! and dropped as it is). Consumers and `basic.get` load the tail's front in batches of
//! [`PAGE_IN_BATCH`] as they reach it.
//!
//! # Statistics
//!
//! Besides ready and unacked counts and bytes, a queue counts its persistent
//! messages (held durably in the store) as they come and go, keeps the
//! timestamps of its unacked messages (for the head message's timestamp), the
//! time it was last active (for `idle_since`) and how well its consumers keep
//! up ([`ConsumerUse`]), all read by [`Queue::stats`].

pub mod args;
pub mod consumer;
pub mod dead_letter;
pub mod ready;
pub mod stream;
#[cfg(test)]
mod tests;

pub use args::{DeadLetterStrategy, LeaderLocator, Overflow, QueueArgs, QueueType};
pub use consumer::{Consumer, Credit, Delivery, DeliverySink};
pub use dead_letter::Reason;

use crate::broker::message::{Entry, MemoryBudget, Message};
use crate::broker::vhost::{PublishFrom, VHost};
use crate::error::{AmqpError, AmqpResult};
use crate::storage::{
    EncodedMessage, LevelSummary, MessageOp, MessageParts, QueueRef, ReadMessage, Store,
};
use crate::wire::FieldTable;
use parking_lot::{Mutex, MutexGuard};
use ready::{level_for, Head, Ready};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

/// How many stored messages at the head are loaded in one go (read-ahead).
pub const PAGE_IN_BATCH: usize = 512;
/// ... or at most about this many record bytes.
const PAGE_IN_BYTES: usize = 4 << 20;
/// A durable queue keeps at most this many persistent messages per level in memory;
/// later ones wait in the store until consumers get near them.
pub const PERSISTENT_WINDOW: usize = 2048;

/// Declared properties of a queue (what queue.declare set).
#[derive(Debug, Clone, PartialEq)]
pub struct QueueSpec {
    pub name: Arc<str>,
    pub vhost: Arc<str>,
    pub durable: bool,
    /// Connection id of the owner of an exclusive queue.
    pub exclusive_owner: Option<u64>,
    pub auto_delete: bool,
    pub arguments: FieldTable,
}

#[derive(Debug)]
pub struct Queue {
    pub spec: QueueSpec,
    /// Effective arguments: declared `x-` arguments combined with the policy in force.
    args: parking_lot::RwLock<Arc<QueueArgs>>,
    /// Totals of messages in, delivered and acked, for the admin API.
    pub counters: crate::broker::Counters,
    vhost: Weak<VHost>,
    /// Where persistent messages of a durable queue are written, and where any
    /// queue pages messages out to.
    store: Option<QueueStore>,
    /// `x-max-priority` (0: a plain queue); a message's level follows from it.
    max_priority: u8,
    /// A quorum queue (`x-queue-type`, fixed at declaration): it stores every
    /// message, transient ones too, as RabbitMQ's quorum queues do.
    quorum: bool,
    /// Resident message bytes broker-wide; past its limit persistent messages page out.
    budget: Arc<MemoryBudget>,
    /// A stream queue's log and readers (`x-queue-type: stream`).
    stream: Option<stream::StreamQueue>,
    /// Clustered: the other node this queue's messages live on (None: here).
    /// Set by the cluster from the queue's replicated record.
    remote: parking_lot::RwLock<Option<Arc<dyn crate::broker::remote::RemoteHome>>>,
    /// Clustered quorum queue on a member node: its Raft group (None: a
    /// queue of this node alone). While set, the queue keeps nothing durable
    /// in the message store (the group's log is its storage; past its window
    /// it pages out transient copies), its entries' `seq` is their id in the
    /// group, and what leaves the queue for good is reported.
    replica: parking_lot::RwLock<Option<Arc<dyn crate::broker::remote::Replica>>>,
    /// `replica` is set (read without its lock on every message).
    replicated: std::sync::atomic::AtomicBool,
    /// Clustered: which replicated declaration of the queue this is (an
    /// opaque stamp the cluster layer sets as declarations are applied; 0:
    /// none), reported when the queue deletes itself.
    declared: std::sync::atomic::AtomicU64,
    /// Replicated queue: the committed delivery horizon, followed by the
    /// gets waiting for it ([`Queue::get_waits_for`]).
    horizon_committed: tokio::sync::watch::Sender<u64>,
    state: Mutex<State>,
    /// Some ready message may carry an expiry (written under the state's
    /// lock; read without it by [`Queue::needs_tick`]).
    may_expire: AtomicBool,
    /// The queue's arguments expire the queue or its messages (written with
    /// them; read without a lock by [`Queue::needs_tick`]).
    timed: AtomicBool,
}

/// A queue's handle on the message store.
#[derive(Debug)]
struct QueueStore {
    store: Store,
    /// The queue in the store (key `vhost \0 name`; durable or ephemeral).
    queue: QueueRef,
    /// A quorum queue's pages while it is replicated (served for its group):
    /// transient copies in the store's ephemeral space, never synced (the
    /// group's log is the durable copy).
    pages: Option<QueueRef>,
    /// Held from before the state lock is released until this operation's store
    /// operations are submitted: the store sees them in the queue's order, and a
    /// reader that takes it knows every earlier write was submitted. Lock order:
    /// `state`, then `order`.
    order: Mutex<()>,
}

/// What a quorum queue's group knows of a message its serving member
/// enqueues: its id in the group, whether it comes redelivered, its returns
/// so far, and when the group took it (ms; 0: not known).
#[derive(Debug, Clone, Copy)]
struct Replicated {
    id: u64,
    redelivered: bool,
    returns: u32,
    at: u64,
    /// Taken only if the queue was not purged since its purge count was
    /// this (a new leader loading the group's messages).
    unless_purged_since: Option<u64>,
}

/// What happened to a published message at one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// Accepted; `durable`: written to the store (confirm after the next flush).
    Accepted { durable: bool },
    /// Refused by `x-overflow` reject-publish(-dlx).
    Rejected,
}

/// `entries`, counted unacked, are no longer.
fn settle_unacked(s: &mut State, entries: &[Entry]) {
    s.unacked = s.unacked.saturating_sub(entries.len());
    let bytes: usize = entries.iter().map(Entry::size).sum();
    s.unacked_bytes = s.unacked_bytes.saturating_sub(bytes);
    for e in entries {
        if e.persisted {
            s.unacked_persistent = s.unacked_persistent.saturating_sub(1);
            s.unacked_persistent_bytes = s.unacked_persistent_bytes.saturating_sub(e.size());
        }
        if e.message.properties.timestamp.is_some() {
            s.unacked_timestamps.remove(&e.seq);
        }
    }
}

/// A delivery that did not reach its consumer goes back where it was, with
/// the consumer's credit.
fn take_back(s: &mut State, consumer: &Consumer, entry: Entry) {
    consumer.give_back_credit();
    if !consumer.no_ack {
        settle_unacked(s, std::slice::from_ref(&entry));
    }
    s.ready.requeue(entry);
}

/// `e` was handed out and is now counted unacked.
fn count_unacked(s: &mut State, e: &Entry) {
    s.unacked += 1;
    s.unacked_bytes += e.size();
    if e.persisted {
        s.unacked_persistent += 1;
        s.unacked_persistent_bytes += e.size();
    }
    if let Some(ts) = e.message.properties.timestamp {
        s.unacked_timestamps.insert(e.seq, ts);
    }
}

/// How long a queue goes without activity before it counts as idle (RabbitMQ's
/// queue process hibernates after about a second without messages, and reports
/// `idle_since` from then on).
pub const IDLE_AFTER_MS: u64 = 1000;

/// Half-life of the consumer utilisation's moving average (RabbitMQ's
/// `?USE_AVG_HALF_LIFE`, one second).
const USE_HALF_LIFE_MS: f64 = 1000.0;

/// How well a queue's consumers keep up: RabbitMQ's consumer utilisation
/// (`rabbit_queue_consumers`), the fraction of time the queue was able to hand
/// a message to a consumer at once. The queue is *active* while some consumer
/// has room (prefetch, flow, a writable connection) and *inactive* from the
/// moment it had a message to deliver and no consumer, or every consumer
/// full, until one has room again (an ack, a new consumer). Each inactive period closes an
/// active + inactive cycle whose active share is folded into an exponential
/// moving average with a one-second half-life, weighted by the cycle's length.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ConsumerUse {
    /// Active since `since` (ms); `avg` the average before.
    Active { since: u64, avg: f64 },
    /// Inactive since `since`, after `active` ms of activity.
    Inactive { since: u64, active: u64, avg: f64 },
}

impl ConsumerUse {
    /// A queue starts active, at 1.0 (as RabbitMQ's).
    pub fn new(now: u64) -> ConsumerUse {
        ConsumerUse::Active {
            since: now,
            avg: 1.0,
        }
    }

    /// The queue became active (`true`) or inactive at `now`.
    pub fn set(&mut self, active: bool, now: u64) {
        *self = match (*self, active) {
            (ConsumerUse::Active { since, avg }, false) => ConsumerUse::Inactive {
                since: now,
                active: now.saturating_sub(since),
                avg,
            },
            (ConsumerUse::Inactive { since, active, avg }, true) => ConsumerUse::Active {
                since: now,
                avg: use_avg(active, now.saturating_sub(since), avg),
            },
            (same, _) => same,
        };
    }

    pub fn is_active(&self) -> bool {
        matches!(self, ConsumerUse::Active { .. })
    }

    /// The utilisation as of `now`, between 0 and 1.
    pub fn utilisation(&self, now: u64) -> f64 {
        match *self {
            ConsumerUse::Active { since, avg } => use_avg(now.saturating_sub(since), 0, avg),
            ConsumerUse::Inactive { since, active, avg } => {
                use_avg(active, now.saturating_sub(since), avg)
            }
        }
    }
}

/// RabbitMQ's `use_avg`: fold a cycle of `active` then `inactive` ms into `avg`.
fn use_avg(active: u64, inactive: u64, avg: f64) -> f64 {
    let time = active + inactive;
    if time == 0 {
        return avg;
    }
    let weight = (time as f64 * 0.5f64.ln() / USE_HALF_LIFE_MS).exp();
    (active as f64 / time as f64) * (1.0 - weight) + avg * weight
}

#[derive(Debug)]
struct State {
    ready: Ready,
    /// Messages handed to consumers (or basic.get) and not yet acked.
    unacked: usize,
    /// Their body bytes (0 for a stream's, whose credits `unacked` counts).
    unacked_bytes: usize,
    /// Of them, persistent ones (held durably), and their body bytes.
    unacked_persistent: usize,
    unacked_persistent_bytes: usize,
    /// The `timestamp` property of each unacked message that has one, by its
    /// seq (the oldest counts towards the head message's timestamp, as in
    /// RabbitMQ). Messages without one cost nothing here.
    unacked_timestamps: std::collections::BTreeMap<u64, u64>,
    /// Last time messages moved in or out or consumers came or went, ms since
    /// the epoch (for `idle_since`).
    active_at: u64,
    /// Consumer utilisation.
    consumer_use: ConsumerUse,
    /// Sorted by priority, highest first; round-robin within a priority.
    consumers: Vec<Arc<Consumer>>,
    next_consumer: usize,
    next_seq: u64,
    /// A consumer was ever attached (auto-delete only applies after that).
    had_consumer: bool,
    deleted: bool,
    /// How many times the queue was purged (a new leader's load stops at
    /// a purge: [`Queue::load_replicated`]).
    purges: u64,
    /// Messages of its group a new leader has yet to load into the queue
    /// ([`Queue::expect_loads`]): a purge counts them (and the load stops).
    unloaded: usize,
    /// Last time the queue was used (for `x-expires`), ms since the epoch.
    last_used: u64,
    /// Replicated queue: the delivery horizon, see [`Horizon`].
    horizon: Horizon,
}

/// A replicated queue's delivery horizon (RabbitMQ's `rabbit_fifo` commits
/// a checkout before it delivers; this commits ahead, in bulk): a message
/// goes out at once only if its id is at most the horizon the group has
/// committed, so a new leader knows that nothing past that horizon ever went
/// out. A delivery past it waits in `held` until a larger horizon commits;
/// deliveries dispatched while some wait queue up behind them, so each
/// consumer gets its messages in order. A new horizon is asked for before
/// deliveries reach the one asked ([`Queue::ask_horizon`]), so they rarely
/// wait.
#[derive(Debug, Default)]
struct Horizon {
    /// Committed.
    committed: u64,
    /// Asked for (at least `committed`).
    asked: u64,
    /// A delivery past this asks for the next horizon early (half-way to
    /// the one asked before).
    renew_at: u64,
    /// Deliveries waiting for a larger committed horizon, in order.
    held: std::collections::VecDeque<(Arc<Consumer>, Delivery)>,
}

/// How many ready messages past the delivery asking for it a new horizon
/// covers (and then what the group gives next): at most that many, with
/// the group's part, come flagged redelivered after a failover without
/// having gone out.
pub const HORIZON_AHEAD: usize = 1024;

/// Counters of a queue, for declare-ok and the admin API.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct QueueStats {
    pub ready: usize,
    pub unacked: usize,
    pub consumers: usize,
    pub ready_bytes: usize,
    /// Body bytes of the unacked messages (all in memory).
    pub unacked_bytes: usize,
    /// Ready messages held in memory; the rest are only in the store.
    pub ready_ram: usize,
    pub ready_ram_bytes: usize,
    /// Ready and unacked messages held durably (persistent messages on a
    /// durable queue, every message of a quorum queue kept in the store), and
    /// their body bytes: RabbitMQ's `messages_persistent`.
    pub persistent: usize,
    pub persistent_bytes: usize,
    /// The `timestamp` property of the message at the head (the next ready one,
    /// if in memory) or of the oldest unacked one, whichever is older (RabbitMQ
    /// takes the least of these). None if neither has one.
    pub head_timestamp: Option<u64>,
    /// Since when the queue has been idle (ms since the epoch): [`IDLE_AFTER_MS`]
    /// after its last activity, once that is past. None while active.
    pub idle_since: Option<u64>,
    /// Consumer utilisation ([`ConsumerUse`]); None without consumers.
    pub consumer_utilisation: Option<f64>,
    /// Bytes the queue's messages take in memory: [`queue_memory`].
    pub memory: usize,
}

/// What one message held in memory costs besides its body: its queue entry
/// (in the ready list, or in the channel's unacked map), the shared message
/// (exchange and routing key are reference-counted strings, the common
/// properties inline) and the `Arc`'s two counters, and for an unacked one
/// its timestamp slot (a B-tree entry, when it has a timestamp).
pub const MESSAGE_OVERHEAD: usize = std::mem::size_of::<Entry>()
    + std::mem::size_of::<Message>()
    + 2 * std::mem::size_of::<usize>()
    + std::mem::size_of::<(u64, u64)>();

/// An estimate of the memory a queue's messages take: the bodies it holds in
/// memory (ready ones in windows, unacked ones) plus [`MESSAGE_OVERHEAD`] each,
/// and the queue itself with its consumers. Paged-out messages cost nothing.
pub fn queue_memory(st: &QueueStats) -> usize {
    let held = st.ready_ram + st.unacked;
    std::mem::size_of::<Queue>()
        + st.consumers * std::mem::size_of::<Consumer>()
        + st.ready_ram_bytes
        + st.unacked_bytes
        + held * MESSAGE_OVERHEAD
}

/// Whether `args` expire the queue (`x-expires`) or its messages
/// (`x-message-ttl`): it must be looked at periodically ([`Queue::tick`]).
fn is_timed(args: &QueueArgs) -> bool {
    args.expires.is_some() || args.message_ttl.is_some()
}

/// Messages that left the queue to be dead-lettered.
type DeadLetters = Vec<(Entry, Reason)>;

/// What an operation under the lock leaves to do once the lock is released.
/// Empty (and allocation-free) in the common case.
#[derive(Debug, Default)]
struct Effects {
    /// Store operations, in the order the queue made them.
    ops: Vec<MessageOp>,
    /// Messages to route to the dead-letter exchange. Their store removals are
    /// submitted after routing (a dead letter is not lost to a crash in between).
    dead: DeadLetters,
    /// A consumer waits for paged-out messages at the head: load them, deliver on.
    page_in: bool,
    /// Replicated queue: ids of messages that left for good, to report.
    settled: Vec<u64>,
    /// Replicated queue: ids of messages handed to a client that must ack
    /// them, to report (before `settled`).
    checked_out: Vec<u64>,
    /// Replicated queue: a new delivery horizon to ask the group for
    /// ([`Horizon`]).
    horizon: Option<u64>,
}

impl Queue {
    /// A queue; with a `store` it pages messages out there, and if `durable` also
    /// keeps its persistent messages there across restarts. `now` starts its
    /// `x-expires` clock.
    pub fn new(
        spec: QueueSpec,
        args: QueueArgs,
        vhost: Weak<VHost>,
        store: Option<(Store, bool)>,
        budget: Arc<MemoryBudget>,
        now: u64,
    ) -> Arc<Queue> {
        Self::build(spec, args, vhost, store, None, budget, now)
    }

    /// A stream queue writing to `log` (no message-store queue of its own).
    pub fn new_stream(
        spec: QueueSpec,
        args: QueueArgs,
        vhost: Weak<VHost>,
        log: stream::StreamQueue,
        budget: Arc<MemoryBudget>,
        now: u64,
    ) -> Arc<Queue> {
        Self::build(spec, args, vhost, None, Some(log), budget, now)
    }

    fn build(
        spec: QueueSpec,
        args: QueueArgs,
        vhost: Weak<VHost>,
        store: Option<(Store, bool)>,
        stream: Option<stream::StreamQueue>,
        budget: Arc<MemoryBudget>,
        now: u64,
    ) -> Arc<Queue> {
        let max_priority = args.max_priority;
        let quorum = args.queue_type == QueueType::Quorum;
        let store = store.map(|(store, durable)| QueueStore {
            queue: store.queue(&store_key(&spec.vhost, &spec.name), durable),
            pages: quorum.then(|| store.queue(&pages_key(&spec.vhost, &spec.name), false)),
            store,
            order: Mutex::new(()),
        });
        Arc::new(Queue {
            spec,
            timed: AtomicBool::new(is_timed(&args)),
            may_expire: AtomicBool::new(false),
            args: parking_lot::RwLock::new(Arc::new(args)),
            counters: Default::default(),
            vhost,
            store,
            max_priority,
            quorum,
            stream,
            remote: parking_lot::RwLock::new(None),
            replica: parking_lot::RwLock::new(None),
            replicated: std::sync::atomic::AtomicBool::new(false),
            declared: std::sync::atomic::AtomicU64::new(0),
            horizon_committed: tokio::sync::watch::channel(0).0,
            budget: Arc::clone(&budget),
            state: Mutex::new(State {
                ready: Ready::new(max_priority, budget),
                unacked: 0,
                unacked_bytes: 0,
                unacked_persistent: 0,
                unacked_persistent_bytes: 0,
                unacked_timestamps: Default::default(),
                active_at: now,
                consumer_use: ConsumerUse::new(now),
                consumers: Vec::new(),
                next_consumer: 0,
                next_seq: 1,
                had_consumer: false,
                deleted: false,
                purges: 0,
                unloaded: 0,
                last_used: now,
                horizon: Horizon::default(),
            }),
        })
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// Clustered: where this queue's messages live when that is another node.
    pub fn remote(&self) -> Option<Arc<dyn crate::broker::remote::RemoteHome>> {
        self.remote.read().clone()
    }

    /// The cluster records (or clears, with None) the queue's other home node.
    pub fn set_remote(&self, home: Option<Arc<dyn crate::broker::remote::RemoteHome>>) {
        *self.remote.write() = home;
    }

    /// Clustered quorum queue: its Raft group on this node, if it is a member.
    pub fn replica(&self) -> Option<Arc<dyn crate::broker::remote::Replica>> {
        self.replica.read().clone()
    }

    /// The cluster attaches (or detaches, with None) the queue's Raft group.
    pub fn set_replica(&self, replica: Option<Arc<dyn crate::broker::remote::Replica>>) {
        let mut r = self.replica.write();
        self.replicated
            .store(replica.is_some(), std::sync::atomic::Ordering::Release);
        *r = replica;
    }

    /// The replicated declaration this queue is (0: none recorded).
    pub fn declared(&self) -> u64 {
        self.declared.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The cluster records which replicated declaration this queue is.
    pub fn set_declared(&self, declaration: u64) {
        self.declared
            .store(declaration, std::sync::atomic::Ordering::Release);
    }

    fn is_replicated(&self) -> bool {
        self.replicated.load(std::sync::atomic::Ordering::Acquire)
    }

    /// A message the queue's Raft group committed, with its id there
    /// (increasing in the group's order), on the node serving the queue: enqueued
    /// like a publish, nothing durable written to the message store (past the
    /// window, a transient copy at its id). A message a new
    /// leader loads comes `redelivered` if it went out before, with the
    /// `returns` the group counted (towards the delivery limit, as
    /// `x-delivery-count`).
    pub fn enqueue_replicated(
        self: &Arc<Self>,
        message: Arc<Message>,
        id: u64,
        flags: (bool, u32),
        at: u64,
        now: u64,
    ) -> Enqueued {
        self.load_replicated(message, id, flags, at, now, None)
            .unwrap_or(Enqueued::Accepted { durable: false })
    }

    /// `n` messages of the group are to be loaded ([`Queue::load_replicated`],
    /// each taken counts one off): until then a purge counts them too. The
    /// queue's purge count as it is now, under the same lock (a purge in
    /// between would have counted them and not stopped the load): what the
    /// loads are to give `load_replicated`.
    pub fn expect_loads(&self, n: usize) -> u64 {
        let mut s = self.state.lock();
        s.unloaded = n;
        s.purges
    }

    /// `n` of the messages to load will not come (settled meanwhile).
    pub fn loads_gone(&self, n: usize) {
        let mut s = self.state.lock();
        s.unloaded = s.unloaded.saturating_sub(n);
    }

    /// [`Queue::enqueue_replicated`] for a message a new leader loads from
    /// its group, unless the queue was purged since [`Queue::expect_loads`]
    /// said `purges` (if given; None back: nothing enqueued, the purge
    /// covers it, and the caller lets the group know).
    pub fn load_replicated(
        self: &Arc<Self>,
        message: Arc<Message>,
        id: u64,
        (redelivered, returns): (bool, u32),
        at: u64,
        now: u64,
        purges: Option<u64>,
    ) -> Option<Enqueued> {
        let replicated = Replicated {
            id,
            redelivered,
            returns,
            at,
            unless_purged_since: purges,
        };
        self.enqueue_inner(message, now, Some(replicated))
    }

    /// Resolves once the message store has written what the queue gave it
    /// so far (at once for a queue without a store; a store error counts
    /// as written: nothing more will be).
    pub fn written(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let sync = self.store.as_ref().map(|qs| qs.store.sync());
        async move {
            if let Some(sync) = sync {
                let _ = sync.await;
            }
        }
    }

    /// Resolves once the message store has room for more of what the queue
    /// pages out (its buffer of writes below its limit; at once without a
    /// store): a caller loading many messages awaits it between batches.
    pub fn store_ready(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let store = self.store.as_ref().map(|qs| qs.store.clone());
        async move {
            if let Some(store) = store {
                store.ready().await;
            }
        }
    }

    /// This node stopped serving the replicated queue (it lost the group's
    /// leadership): forget the ready messages without reporting them (the
    /// group keeps them) and detach every consumer; returns the consumers,
    /// to be told they are cancelled.
    pub fn reset_replicated(&self) -> Vec<Arc<Consumer>> {
        let mut fx = Effects::default();
        let mut s = self.state.lock();
        let (_, tails) = s.ready.drain();
        // The paged-out copies go too.
        self.drop_tails(tails, &mut fx);
        s.unacked = 0;
        s.unacked_bytes = 0;
        s.unacked_persistent = 0;
        s.unacked_persistent_bytes = 0;
        s.unacked_timestamps.clear();
        s.unloaded = 0;
        self.may_expire.store(false, Ordering::Relaxed);
        s.horizon = Horizon::default();
        self.horizon_committed.send_replace(0);
        let consumers = std::mem::take(&mut s.consumers);
        self.release(s, &mut fx, false);
        consumers
    }

    /// The queue type, fixed at declaration.
    pub fn queue_type(&self) -> QueueType {
        if self.stream.is_some() {
            QueueType::Stream
        } else if self.quorum {
            QueueType::Quorum
        } else {
            QueueType::Classic
        }
    }

    /// The log of a stream queue (None for other queue types).
    pub fn stream(&self) -> Option<&Arc<crate::storage::stream::StreamLog>> {
        self.stream.as_ref().map(|sq| &sq.log)
    }

    /// What queue.delete's `if-unused` / `if-empty` flags find against
    /// deleting this queue as of `now`, as RabbitMQ 3.x answers: a classic
    /// queue is "in use" with consumers and "not empty" with ready messages
    /// (as its `is_empty`: deliveries awaiting their ack do not count), 406
    /// either way; a quorum queue refuses either flag (540, not implemented
    /// for quorum queues); a stream ignores them.
    pub fn delete_refusal(&self, if_unused: bool, if_empty: bool, now: u64) -> Option<AmqpError> {
        let what = format!("queue '{}' in vhost '{}'", self.name(), self.spec.vhost);
        match self.queue_type() {
            QueueType::Stream => return None,
            QueueType::Quorum => {
                let flag = match (if_unused, if_empty) {
                    (true, _) => "if-unused",
                    (false, true) => "if-empty",
                    (false, false) => return None,
                };
                return Some(AmqpError::not_implemented(format!(
                    "cannot delete {what}. queue.delete operations with {flag} flag set \
                     are not supported by quorum queues"
                )));
            }
            _ => {}
        }
        let st = self.stats(now);
        if if_unused && st.consumers > 0 {
            Some(AmqpError::precondition_failed(format!("{what} in use")))
        } else if if_empty && st.ready > 0 {
            Some(AmqpError::precondition_failed(format!(
                "{what} is not empty"
            )))
        } else {
            None
        }
    }

    /// The counters as of `now` (messages due by then are expired first). A
    /// stream's ready messages are the messages it keeps.
    pub fn stats(&self, now: u64) -> QueueStats {
        if let Some(sq) = &self.stream {
            let st = sq.log.stats();
            let s = self.state.lock();
            return QueueStats {
                ready: st.messages as usize,
                unacked: s.unacked,
                consumers: s.consumers.len(),
                ready_bytes: st.bytes as usize,
                unacked_bytes: 0,
                ready_ram: 0,
                ready_ram_bytes: 0,
                persistent: st.messages as usize,
                persistent_bytes: st.bytes as usize,
                consumer_utilisation: (!s.consumers.is_empty())
                    .then(|| s.consumer_use.utilisation(now)),
                ..QueueStats::default()
            };
        }
        let mut fx = Effects::default();
        let mut s = self.state.lock();
        self.expire_locked(&mut s, now, &mut fx);
        let (ready_ram, ready_ram_bytes) = s.ready.in_memory();
        let (persistent, persistent_bytes) = s.ready.persistent();
        let head = match s.ready.peek() {
            Head::Entry(e) => e.message.properties.timestamp,
            // Not in memory: unknown without a read, as RabbitMQ's (which
            // only looks at the messages it holds in memory).
            Head::Paged(_) | Head::Empty => None,
        };
        let oldest_unacked = s.unacked_timestamps.values().next().copied();
        let idle_at = s.active_at.saturating_add(IDLE_AFTER_MS);
        let stats = QueueStats {
            ready: s.ready.len(),
            unacked: s.unacked,
            consumers: s.consumers.len(),
            ready_bytes: s.ready.bytes(),
            unacked_bytes: s.unacked_bytes,
            ready_ram,
            ready_ram_bytes,
            persistent: persistent + s.unacked_persistent,
            persistent_bytes: persistent_bytes + s.unacked_persistent_bytes,
            head_timestamp: match (head, oldest_unacked) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
            idle_since: (now >= idle_at).then_some(idle_at),
            consumer_utilisation: (!s.consumers.is_empty())
                .then(|| s.consumer_use.utilisation(now)),
            memory: 0,
        };
        self.finish(s, fx, now);
        QueueStats {
            memory: queue_memory(&stats),
            ..stats
        }
    }

    pub fn is_deleted(&self) -> bool {
        self.state.lock().deleted
    }

    /// Mark the queue used at `now` (declare, get, consume) for `x-expires`.
    pub fn touch(&self, now: u64) {
        self.state.lock().last_used = now;
    }

    /// Check that `connection` may use this queue (exclusive queues: only the owner).
    pub fn check_access(&self, connection: u64) -> AmqpResult<()> {
        match self.spec.exclusive_owner {
            Some(owner) if owner != connection => Err(self.locked()),
            _ => Ok(()),
        }
    }

    /// 405 RESOURCE_LOCKED, as RabbitMQ answers a use of an exclusive queue
    /// from another connection, and a redeclare whose `exclusive` flag
    /// differs from the queue's (its `check_exclusive_access`, strict).
    pub fn locked(&self) -> AmqpError {
        AmqpError::resource_locked(format!(
            "cannot obtain exclusive access to locked queue '{}' in vhost '{}'. It could be \
             originally declared on another connection or the exclusive property value does \
             not match that of the original declaration.",
            self.spec.name, self.spec.vhost
        ))
    }

    /// Add a message published at `now` and deliver what can be delivered.
    pub fn enqueue(self: &Arc<Self>, message: Arc<Message>, now: u64) -> Enqueued {
        self.enqueue_inner(message, now, None)
            .unwrap_or(Enqueued::Accepted { durable: false })
    }

    /// `replicated`: what the queue's Raft group knows of the message (a
    /// replicated queue writes nothing durable to the store).
    fn enqueue_inner(
        self: &Arc<Self>,
        message: Arc<Message>,
        now: u64,
        replicated: Option<Replicated>,
    ) -> Option<Enqueued> {
        if let Some(sq) = &self.stream {
            return Some(self.stream_enqueue(sq, &message, now));
        }
        let args = self.args();
        let ttl = match (args.message_ttl, message.ttl()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        // A replicated message's TTL counts from when its group took it
        // (a new leader loading it keeps its clock).
        let arrived = replicated.map_or(now, |r| if r.at == 0 { now } else { r.at.min(now) });
        let expires_at = ttl.map(|t| arrived.saturating_add(t));
        let durable =
            replicated.is_none() && self.is_durable() && (self.quorum || message.is_persistent());
        // The costly part of a durable write (copying the body) happens unlocked.
        let record = durable.then(|| encode(&message, false, expires_at));
        let mut fx = Effects::default();
        let mut s = self.state.lock();
        if s.deleted {
            return Some(Enqueued::Accepted { durable: false });
        }
        if let Some(p) = replicated.and_then(|r| r.unless_purged_since) {
            if p != s.purges {
                return None;
            }
            s.unloaded = s.unloaded.saturating_sub(1);
        }
        s.active_at = now;
        let size = message.size();
        let full = args.max_length.is_some_and(|m| s.ready.len() as u64 >= m)
            || args
                .max_length_bytes
                .is_some_and(|m| (s.ready.bytes() + size) as u64 > m);
        let seq = match replicated {
            Some(r) => r.id,
            None => {
                s.next_seq += 1;
                s.next_seq - 1
            }
        };
        let mut entry = Entry::new(seq, message, expires_at);
        if let Some(Replicated {
            redelivered,
            returns,
            ..
        }) = replicated
        {
            entry.redelivered = redelivered;
            entry.delivery_count = returns;
            // Loaded by a new leader past its delivery limit (a return at
            // the failover): dead-lettered or dropped, as on any return.
            if args.delivery_limit.is_some_and(|l| returns > l) {
                self.discard(entry, Reason::DeliveryLimit, &args, &mut fx);
                self.finish(s, fx, now);
                return Some(Enqueued::Accepted { durable: false });
            }
        }
        crate::broker::Counters::add(&self.counters.published, 1);
        let outcome = if full && args.overflow != Overflow::DropHead {
            if args.overflow == Overflow::RejectPublishDlx {
                fx.dead.push((entry, Reason::MaxLen));
            } else if replicated.is_some() {
                fx.settled.push(seq);
            }
            Enqueued::Rejected
        } else {
            let level = level_for(entry.priority, self.max_priority);
            // A replicated message is durable in its group: it pages out as
            // a persistent one does (to the store's transient space, since
            // the group, not this copy, is what survives a restart).
            let tail = s.ready.tail(level);
            let to_tail = self.store.is_some()
                // (never behind the tail's end: it reads back in position order)
                && replicated.is_none_or(|r| tail.count == 0 || r.id >= tail.to)
                && (tail.count > 0
                    || ((durable || replicated.is_some())
                        && s.ready.window_len(level) >= PERSISTENT_WINDOW)
                    || self.budget.over(size));
            if to_tail {
                // Only in the store until a consumer gets near it. A
                // replicated message's position is its id in the group
                // (increasing: the tail reads back in the group's order).
                let pos = match replicated {
                    Some(r) => r.id,
                    None => s.ready.alloc_pos(level),
                };
                let record =
                    record.unwrap_or_else(|| encode(&entry.message, entry.redelivered, expires_at));
                fx.ops.push(MessageOp::Insert {
                    level,
                    pos,
                    size: size as u32,
                    durable,
                    record,
                });
                if entry.delivery_count > 0 {
                    fx.ops.push(MessageOp::SetReturns {
                        level,
                        pos,
                        count: entry.delivery_count,
                    });
                }
                s.ready
                    .push_tail(level, pos, size, expires_at.is_some(), durable);
                self.note_expiry(expires_at.is_some());
            } else {
                if let Some(record) = record {
                    let pos = s.ready.alloc_pos(level);
                    fx.ops.push(MessageOp::Insert {
                        level,
                        pos,
                        size: size as u32,
                        durable: true,
                        record,
                    });
                    entry.persisted = true;
                    entry.pos = Some(pos);
                }
                self.note_expiry(entry.expires_at.is_some());
                s.ready.push_back(entry);
            }
            // As RabbitMQ: a waiting consumer takes the message before the length
            // limit applies (max-length 0 still reaches a consumer).
            self.dispatch_locked(&mut s, now, &mut fx);
            self.enforce_limits(&mut s, &args, &mut fx);
            // TTL 0: what no consumer took at once expires now.
            self.expire_locked(&mut s, now, &mut fx);
            Enqueued::Accepted { durable }
        };
        self.settle(s, fx, now);
        Some(outcome)
    }

    /// drop-head: remove the oldest messages until the limits hold.
    fn enforce_limits(&self, s: &mut State, args: &QueueArgs, fx: &mut Effects) {
        loop {
            let over_len = args.max_length.is_some_and(|m| s.ready.len() as u64 > m);
            let over_bytes = args
                .max_length_bytes
                .is_some_and(|m| s.ready.bytes() as u64 > m);
            if !(over_len || over_bytes) {
                return;
            }
            // The head is the next message to deliver: in a priority queue RabbitMQ
            // drops the highest-priority one.
            match s.ready.peek() {
                Head::Entry(_) => {
                    if let Some(e) = s.ready.pop() {
                        self.discard(e, Reason::MaxLen, args, fx);
                    }
                }
                // Loaded once the lock is released; the limit is applied after that.
                Head::Paged(_) => {
                    fx.page_in = true;
                    return;
                }
                Head::Empty => return,
            }
        }
    }

    /// A message left the queue for good: dead-letter it if there is somewhere to
    /// send it, else forget it.
    fn discard(&self, e: Entry, reason: Reason, args: &QueueArgs, fx: &mut Effects) {
        if args.dead_letter_exchange.is_some() {
            fx.dead.push((e, reason));
        } else {
            self.forget(&e, fx);
        }
    }

    /// A ready message that `may` carry an expiry went in (under the state's
    /// lock, which orders the flag's writes: a plain store, no atomic
    /// read-modify-write on every publish).
    fn note_expiry(&self, may: bool) {
        if may && !self.may_expire.load(Ordering::Relaxed) {
            self.may_expire.store(true, Ordering::Relaxed);
            self.want_ticks();
        }
    }

    /// This queue began to want ticks: tell the broker's ticker.
    fn want_ticks(&self) {
        if let Some(v) = self.vhost.upgrade() {
            v.want_ticks();
        }
    }

    /// Drop (dead-letter) messages at the head due by `now`, as RabbitMQ does.
    fn expire_locked(&self, s: &mut State, now: u64, fx: &mut Effects) {
        if !self.may_expire.load(Ordering::Relaxed) {
            return;
        }
        let mut args = None;
        loop {
            match s.ready.peek() {
                Head::Entry(head) => match head.expires_at {
                    Some(at) if at <= now => {
                        if let Some(e) = s.ready.pop() {
                            let args = args.get_or_insert_with(|| self.args());
                            self.discard(e, Reason::Expired, args, fx);
                        }
                    }
                    _ => break,
                },
                // Stored messages that may be due: load them to look.
                Head::Paged(level) => {
                    if s.ready.tail(level).may_expire {
                        fx.page_in = true;
                    }
                    break;
                }
                Head::Empty => break,
            }
        }
        if s.ready.is_empty() {
            self.may_expire.store(false, Ordering::Relaxed);
        }
    }

    /// Periodic work at `now`: expire messages at the head. Returns true if the
    /// queue itself has expired (`x-expires`) and should be deleted.
    pub fn tick(self: &Arc<Self>, now: u64) -> bool {
        if let Some(sq) = &self.stream {
            sq.log.apply_retention(now as i64);
            return false;
        }
        let mut fx = Effects::default();
        let mut s = self.state.lock();
        self.expire_locked(&mut s, now, &mut fx);
        // A copy of a queue homed on another node never expires here: its
        // use (consumers, gets) happens on the home node.
        let expired = self.remote.read().is_none()
            && self.args().expires.is_some_and(|ttl| {
                s.consumers.is_empty() && now.saturating_sub(s.last_used) >= ttl
            });
        self.settle(s, fx, now);
        expired
    }

    /// Whether `tick` has anything to do for this queue.
    pub fn needs_tick(&self) -> bool {
        match &self.stream {
            Some(sq) => sq.log.has_closed_segments(),
            None => self.wants_ticks(),
        }
    }

    /// Whether this queue wants the ticker's fast period: it may have
    /// messages to expire, or may expire itself. (A stream's retention is
    /// applied at the slow period.)
    pub fn wants_ticks(&self) -> bool {
        self.stream.is_none()
            && (self.timed.load(Ordering::Relaxed) || self.may_expire.load(Ordering::Relaxed))
    }

    /// Deliver ready messages to consumers with credit.
    pub fn dispatch(self: &Arc<Self>, now: u64) {
        if let Some(sq) = &self.stream {
            return sq.wake();
        }
        let mut fx = Effects::default();
        let mut s = self.state.lock();
        self.dispatch_locked(&mut s, now, &mut fx);
        self.settle(s, fx, now);
    }

    fn dispatch_locked(self: &Arc<Self>, s: &mut State, now: u64, fx: &mut Effects) {
        let single_active = self.args().single_active_consumer;
        // A message with no consumer to take it starts an inactive spell (as
        // RabbitMQ's delivery attempt without consumers); a consumer with room
        // again (an ack, credit, flow) ends one.
        if s.consumers.is_empty() {
            if !s.ready.is_empty() {
                s.consumer_use.set(false, now);
            }
        } else if !s.consumer_use.is_active() && s.consumers.iter().any(|c| c.has_room()) {
            s.consumer_use.set(true, now);
        }
        // A message due exactly now is still delivered to a consumer waiting for it
        // (TTL 0 reaches a waiting consumer; the caller expires what is left), but
        // after the first delivery, as RabbitMQ's fetch, what is due now expires.
        let mut cutoff = now.saturating_sub(1);
        while !s.ready.is_empty() && !s.consumers.is_empty() && !s.deleted {
            self.expire_locked(s, cutoff, fx);
            cutoff = now;
            let paged = match s.ready.peek() {
                Head::Empty => return,
                Head::Entry(_) => false,
                Head::Paged(_) => true,
            };
            let Some(idx) = pick_consumer(s, single_active) else {
                // A message waits and every consumer is full.
                s.consumer_use.set(false, now);
                return;
            };
            s.active_at = now;
            if paged {
                // Loaded once the lock is released; delivery goes on after that.
                s.consumers[idx].give_back_credit();
                fx.page_in = true;
                return;
            }
            let Some(entry) = s.ready.pop() else {
                s.consumers[idx].give_back_credit();
                return;
            };
            let consumer = Arc::clone(&s.consumers[idx]);
            if !consumer.no_ack {
                count_unacked(s, &entry);
            }
            self.counters
                .consumer_delivery(consumer.no_ack, entry.redelivered);
            // A replicated queue's delivery past the committed horizon
            // waits for a larger one to commit.
            let replicated = entry.pos.is_none() && self.is_replicated();
            let hold =
                replicated && (!s.horizon.held.is_empty() || entry.seq > s.horizon.committed);
            if replicated {
                self.ask_horizon(s, entry.seq, fx);
            }
            self.handed_out(&entry, consumer.no_ack, fx);
            let delivery = Delivery {
                channel: consumer.channel,
                consumer_tag: Arc::clone(&consumer.tag),
                queue: Arc::clone(self),
                entry,
                no_ack: consumer.no_ack,
            };
            if hold {
                if delivery.no_ack {
                    // Settled once it reaches its client (a connection gone
                    // meanwhile puts it back).
                    fx.settled.retain(|i| *i != delivery.entry.seq);
                }
                s.horizon.held.push_back((consumer, delivery));
            } else if let Err(back) = consumer.sink.deliver(delivery) {
                // The connection is gone: take the message back and drop the consumer.
                self.not_delivered(s, &consumer, back, fx);
            }
        }
    }

    /// A delivery's connection is gone: the message goes back where it was
    /// (with its consumer's credit; a replicated queue reports it back,
    /// not a return) and the consumer is dropped.
    fn not_delivered(
        &self,
        s: &mut State,
        consumer: &Arc<Consumer>,
        back: Delivery,
        fx: &mut Effects,
    ) {
        let id = back.entry.seq;
        let replicated = back.entry.pos.is_none() && self.is_replicated();
        take_back(s, consumer, back.entry);
        if replicated && !consumer.no_ack {
            fx.checked_out.retain(|i| *i != id);
            if let Some(r) = self.replica() {
                r.checked_out(Vec::new(), vec![id]);
            }
        }
        s.consumers.retain(|c| !Arc::ptr_eq(c, consumer));
    }

    /// A replicated queue hands out message `seq`: past the horizon asked
    /// for, or (no ask in flight) past half-way to it, ask for a new one
    /// covering [`HORIZON_AHEAD`] ready messages and what the group gives
    /// after them ([`crate::broker::remote::Replica::horizon_after`]), so
    /// that deliveries rarely wait for one.
    fn ask_horizon(&self, s: &mut State, seq: u64, fx: &mut Effects) {
        let hz = &s.horizon;
        let renew = seq > hz.renew_at && hz.asked == hz.committed;
        if seq <= hz.asked && !renew {
            return;
        }
        let max = s
            .ready
            .iter()
            .take(HORIZON_AHEAD)
            .fold(seq, |m, e| m.max(e.seq));
        let h = self.replica().map_or(max, |r| r.horizon_after(max));
        let hz = &mut s.horizon;
        if h > hz.asked {
            hz.asked = h;
            hz.renew_at = seq + (h - seq) / 2;
            fx.horizon = Some(h);
        }
    }

    /// This node starts serving the replicated queue: the group's
    /// delivery horizon ([`Horizon`]) is `h`.
    pub fn horizon_start(&self, h: u64) {
        self.state.lock().horizon = Horizon {
            committed: h,
            asked: h,
            ..Horizon::default()
        };
        self.horizon_committed.send_replace(h);
    }

    /// basic.get on a replicated queue hands out only a message within the
    /// committed delivery horizon, as a consumer's delivery waits for it
    /// ([`Horizon`]): the id of the message at the head when it is past it
    /// (a horizon covering it is asked for, unless one is on its way; the
    /// get waits for [`Queue::follow_horizon`] to reach it, then asks
    /// again), None when the get may be answered now.
    pub fn get_waits_for(&self) -> Option<u64> {
        if self.stream.is_some() || !self.is_replicated() {
            return None;
        }
        loop {
            let mut fx = Effects::default();
            let mut s = self.state.lock();
            let seq = match s.ready.peek() {
                Head::Entry(e) if e.pos.is_none() && e.seq > s.horizon.committed => e.seq,
                Head::Paged(level) => {
                    // Loaded first: its id is the one to wait for.
                    let s = self.page_in(s, level, &mut fx);
                    self.release(s, &mut fx, false);
                    continue;
                }
                _ => return None,
            };
            self.ask_horizon(&mut s, seq, &mut fx);
            self.release(s, &mut fx, false);
            return Some(seq);
        }
    }

    /// The committed delivery horizon of a replicated queue, as it grows.
    pub fn follow_horizon(&self) -> tokio::sync::watch::Receiver<u64> {
        self.horizon_committed.subscribe()
    }

    /// The group answered the ask for delivery horizon `h`: committed, the
    /// deliveries now within it go out (in order); else it is asked again.
    pub fn horizon_answered(self: &Arc<Self>, h: u64, committed: bool, now: u64) {
        let mut fx = Effects::default();
        let mut s = self.state.lock();
        if committed {
            s.horizon.committed = s.horizon.committed.max(h);
            s.horizon.asked = s.horizon.asked.max(h);
            self.horizon_committed.send_replace(s.horizon.committed);
        } else {
            s.horizon.asked = s.horizon.committed;
        }
        let mut gone = false;
        while let Some((_, d)) = s.horizon.held.front() {
            if d.entry.seq > s.horizon.committed {
                // Still past it: ask (again) for one that covers them all.
                let last = s.horizon.held.iter().map(|(_, d)| d.entry.seq).max();
                self.ask_horizon(&mut s, last.unwrap_or(0), &mut fx);
                break;
            }
            let Some((c, d)) = s.horizon.held.pop_front() else {
                break;
            };
            let (id, no_ack) = (d.entry.seq, d.no_ack);
            match c.sink.deliver(d) {
                Ok(()) if no_ack => fx.settled.push(id),
                Ok(()) => {}
                Err(back) => {
                    self.not_delivered(&mut s, &c, back, &mut fx);
                    gone = true;
                }
            }
        }
        if gone {
            self.dispatch_locked(&mut s, now, &mut fx);
        }
        self.settle(s, fx, now);
    }

    /// basic.get at `now`: the next message and how many remain. Counted unacked
    /// unless `no_ack`.
    pub fn get(&self, no_ack: bool, now: u64) -> Option<(Entry, usize)> {
        if self.stream.is_some() {
            return None;
        }
        loop {
            let mut fx = Effects::default();
            let mut s = self.state.lock();
            s.last_used = now;
            s.active_at = now;
            self.expire_locked(&mut s, now, &mut fx);
            if let Head::Paged(level) = s.ready.peek() {
                // Load it with the lock released, then try again.
                let s = self.page_in(s, level, &mut fx);
                self.finish(s, fx, now);
                continue;
            }
            let entry = s.ready.pop();
            match &entry {
                Some(e) => {
                    if !no_ack {
                        count_unacked(&mut s, e);
                    }
                    self.counters.got(no_ack, e.redelivered);
                    self.handed_out(e, no_ack, &mut fx);
                }
                None => crate::broker::Counters::add(&self.counters.get_empty, 1),
            }
            // The count leaves out what has expired behind the head (RabbitMQ's fetch).
            self.expire_locked(&mut s, now, &mut fx);
            let got = entry.map(|e| (e, s.ready.len()));
            self.finish(s, fx, now);
            return got;
        }
    }

    /// Unacked messages were acked at `now`: they are gone for good.
    pub fn ack(&self, entries: &[Entry], now: u64) {
        crate::broker::Counters::add(&self.counters.acked, entries.len() as u64);
        if self.stream.is_some() {
            return self.stream_settled(entries.len());
        }
        let mut fx = Effects::default();
        for e in entries {
            self.forget(e, &mut fx);
        }
        let mut s = self.state.lock();
        settle_unacked(&mut s, entries);
        s.active_at = now;
        self.release(s, &mut fx, false);
    }

    /// Unacked messages were rejected at `now` without requeue: drop and
    /// dead-letter them.
    pub fn reject(&self, entries: Vec<Entry>, now: u64) {
        if self.stream.is_some() {
            return self.stream_settled(entries.len());
        }
        let args = self.args();
        let mut fx = Effects::default();
        let mut s = self.state.lock();
        settle_unacked(&mut s, &entries);
        s.active_at = now;
        for e in entries {
            self.discard(e, Reason::Rejected, &args, &mut fx);
        }
        self.finish(s, fx, now);
    }

    /// A message left the queue for good: remove it from the store.
    fn forget(&self, e: &Entry, fx: &mut Effects) {
        if self.is_replicated() {
            fx.settled.push(e.seq);
        }
        if let Some(op) = self.settle_op(e) {
            fx.ops.push(op);
        }
    }

    /// The store operation that settles `e`, if it is in the store.
    fn settle_op(&self, e: &Entry) -> Option<MessageOp> {
        let pos = e.pos?;
        self.store.as_ref()?;
        Some(MessageOp::Settle {
            level: level_for(e.priority, self.max_priority),
            pos,
            size: e.size() as u32,
            durable: e.persisted,
        })
    }

    /// Drop from the store the tails [`Ready::drain`] gave up (each level's
    /// from its first position on).
    fn drop_tails(&self, tails: Vec<(u8, u64)>, fx: &mut Effects) {
        if self.store.is_some() {
            let drops = tails
                .into_iter()
                .map(|(level, from)| MessageOp::DropFrom { level, from });
            fx.ops.extend(drops);
        }
    }

    /// Where the queue's store operations go: its pages while it is
    /// replicated, else its own space.
    fn space<'a>(&self, qs: &'a QueueStore) -> &'a QueueRef {
        match &qs.pages {
            Some(pages) if self.is_replicated() => pages,
            _ => &qs.queue,
        }
    }

    fn is_durable(&self) -> bool {
        self.store.as_ref().is_some_and(|qs| qs.queue.is_durable())
    }

    /// A message went to a consumer or basic.get: without ack it is gone; with ack
    /// it must come back redelivered after a restart.
    fn handed_out(&self, e: &Entry, no_ack: bool, fx: &mut Effects) {
        if e.pos.is_none() && self.is_replicated() {
            if no_ack {
                fx.settled.push(e.seq);
            } else {
                fx.checked_out.push(e.seq);
            }
        }
        if e.pos.is_none() {
            return;
        }
        if no_ack {
            self.forget(e, fx);
        } else if let (true, false, Some(pos)) = (e.persisted, e.redelivered, e.pos) {
            fx.ops.push(MessageOp::MarkDelivered {
                level: level_for(e.priority, self.max_priority),
                pos,
            });
        }
    }

    /// Count recovered messages (per level, as the store summarized them) back
    /// in; they are read as consumers reach them. Returns how many.
    pub fn restore(&self, levels: &[LevelSummary]) -> usize {
        let mut s = self.state.lock();
        let mut n = 0;
        for l in levels {
            let count = usize::try_from(l.count).unwrap_or(usize::MAX);
            let bytes = usize::try_from(l.bytes).unwrap_or(usize::MAX);
            s.ready.restore_tail(l.level, l.first, l.next, count, bytes);
            self.note_expiry(count > 0);
            n += count;
        }
        n
    }

    /// Put messages back at their original positions, at `now`.
    /// `were_unacked`: they were counted unacked (false for deliveries never sent);
    /// `redelivered`: mark them redelivered (they reached the client); on a
    /// queue that counts deliveries this is a return, and a message returned
    /// more often than the delivery limit is dead-lettered (`delivery_limit`)
    /// or dropped instead.
    pub fn requeue(
        self: &Arc<Self>,
        entries: Vec<Entry>,
        were_unacked: bool,
        redelivered: bool,
        now: u64,
    ) {
        if entries.is_empty() {
            return;
        }
        if self.stream.is_some() {
            // Nothing goes back into a stream.
            if were_unacked {
                self.stream_settled(entries.len());
            }
            return;
        }
        let mut fx = Effects::default();
        let mut s = self.state.lock();
        s.active_at = now;
        if were_unacked {
            settle_unacked(&mut s, &entries);
        }
        if s.deleted {
            return;
        }
        let args = self.args();
        // A return of a message that reached a client counts towards the
        // delivery limit (RabbitMQ 4: the acquired count, on every return).
        let counting = redelivered && (self.quorum || args.delivery_limit.is_some());
        // A replicated queue's group counts them too, for the next leader,
        // and hears of those that never reached a client.
        let mut returned = Vec::new();
        let replicated = counting && self.is_replicated();
        if !redelivered && self.is_replicated() {
            if let Some(r) = self.replica() {
                r.checked_out(Vec::new(), entries.iter().map(|e| e.seq).collect());
            }
        }
        for mut entry in entries {
            entry.redelivered |= redelivered;
            if counting {
                entry.delivery_count = entry.delivery_count.saturating_add(1);
                if args
                    .delivery_limit
                    .is_some_and(|l| entry.delivery_count > l)
                {
                    self.discard(entry, Reason::DeliveryLimit, &args, &mut fx);
                    continue;
                }
                if replicated {
                    returned.push(entry.seq);
                }
                // A stored message keeps its count across a restart.
                if let (true, Some(pos), Some(_)) = (entry.persisted, entry.pos, &self.store) {
                    fx.ops.push(MessageOp::SetReturns {
                        level: level_for(entry.priority, self.max_priority),
                        pos,
                        count: entry.delivery_count,
                    });
                }
            }
            self.note_expiry(entry.expires_at.is_some());
            s.ready.requeue(entry);
        }
        // RabbitMQ applies drop-head on requeue too: the requeued head may go.
        if args.overflow == Overflow::DropHead {
            self.enforce_limits(&mut s, &args, &mut fx);
        }
        // Told before anything settles them again (in order, through one
        // channel of the group's).
        if let (false, Some(r)) = (returned.is_empty(), self.replica()) {
            r.returned(returned);
        }
        // A requeued message already past (or at) its expiry is dead, not handed out again.
        self.expire_locked(&mut s, now, &mut fx);
        self.dispatch_locked(&mut s, now, &mut fx);
        self.settle(s, fx, now);
    }

    /// Attach a consumer at `now` and start delivering to it.
    pub fn add_consumer(self: &Arc<Self>, consumer: Arc<Consumer>, now: u64) -> AmqpResult<()> {
        if let Some(sq) = &self.stream {
            return self.stream_consume(sq, consumer, now);
        }
        let mut fx = Effects::default();
        let mut s = self.state.lock();
        if s.deleted {
            return Err(AmqpError::not_found(format!(
                "no queue '{}' in vhost '{}'",
                self.spec.name, self.spec.vhost
            )));
        }
        if s.consumers.iter().any(|c| c.exclusive)
            || (consumer.exclusive && !s.consumers.is_empty())
        {
            return Err(AmqpError::access_refused(format!(
                "queue '{}' in vhost '{}' in exclusive use",
                self.spec.name, self.spec.vhost
            )));
        }
        // Single active consumer: the first registered stays active, whatever the
        // priorities (RabbitMQ 3.10 classic queues).
        let pos = if self.args().single_active_consumer {
            s.consumers.len()
        } else {
            s.consumers
                .partition_point(|c| c.priority >= consumer.priority)
        };
        s.consumers.insert(pos, consumer);
        s.had_consumer = true;
        s.last_used = now;
        s.active_at = now;
        s.consumer_use.set(true, now);
        self.dispatch_locked(&mut s, now, &mut fx);
        self.settle(s, fx, now);
        Ok(())
    }

    /// Detach a consumer at `now`. Returns it, and whether the queue is now due for
    /// auto-delete.
    pub fn remove_consumer(
        self: &Arc<Self>,
        connection: u64,
        channel: u16,
        tag: &str,
        now: u64,
    ) -> (Option<Arc<Consumer>>, bool) {
        let mut s = self.state.lock();
        let removed = s
            .consumers
            .iter()
            .position(|c| c.is(connection, channel, tag))
            .map(|i| s.consumers.remove(i));
        s.last_used = now;
        s.active_at = now;
        if let (Some(sq), Some(c)) = (&self.stream, &removed) {
            sq.stop(c);
        }
        let unused = self.spec.auto_delete && s.had_consumer && s.consumers.is_empty();
        if removed.is_some() && self.args().single_active_consumer && !unused {
            // The next consumer becomes active.
            let mut fx = Effects::default();
            self.dispatch_locked(&mut s, now, &mut fx);
            self.settle(s, fx, now);
        }
        (removed.clone(), removed.is_some() && unused)
    }

    /// The effective arguments (declared, combined with the policy in force).
    pub fn args(&self) -> Arc<QueueArgs> {
        Arc::clone(&self.args.read())
    }

    /// A policy changed at `now`: run with `args` from now on, and apply new
    /// length limits at once.
    pub fn set_args(self: &Arc<Self>, args: QueueArgs, now: u64) {
        if let Some(sq) = &self.stream {
            sq.log.set_retention(stream::retention(&args));
        }
        let args = Arc::new(args);
        {
            let mut held = self.args.write();
            *held = Arc::clone(&args);
            self.timed.store(is_timed(&args), Ordering::Relaxed);
        }
        if is_timed(&args) {
            self.want_ticks();
        }
        let mut fx = Effects::default();
        let mut s = self.state.lock();
        self.enforce_limits(&mut s, &args, &mut fx);
        self.finish(s, fx, now);
    }

    /// The attached consumers (for the admin API).
    pub fn consumers(&self) -> Vec<Arc<Consumer>> {
        self.state.lock().consumers.clone()
    }

    /// Remove every ready message; returns how many.
    pub fn purge(&self) -> usize {
        if self.stream.is_some() {
            return 0;
        }
        let mut fx = Effects::default();
        let mut s = self.state.lock();
        s.purges += 1;
        // (with those a new leader has yet to load: the load stops here)
        let n = s.ready.len() + std::mem::take(&mut s.unloaded);
        // A replicated queue's paged-out messages are reported by their
        // ids' range (a quorum queue has one level).
        let tail = s.ready.tail(0);
        if tail.count > 0 && self.is_replicated() {
            if let Some(r) = self.replica() {
                r.settled_range(tail.from, tail.to);
            }
        }
        let (drained, tails) = s.ready.drain();
        for e in &drained {
            self.forget(e, &mut fx);
        }
        self.drop_tails(tails, &mut fx);
        self.release(s, &mut fx, false);
        n
    }

    /// Mark deleted, drop the ready messages, and return the consumers to notify and
    /// how many messages were ready.
    pub fn delete(&self) -> (Vec<Arc<Consumer>>, usize) {
        let mut fx = Effects::default();
        let mut s = self.state.lock();
        s.deleted = true;
        let n = s.ready.len();
        s.ready.drain();
        // Deliveries waiting for a delivery horizon go with the queue.
        s.horizon.held.clear();
        if self.store.is_some() {
            fx.ops.push(MessageOp::DeleteQueue);
        }
        let consumers = std::mem::take(&mut s.consumers);
        self.release(s, &mut fx, false);
        // A quorum queue's other space too (`release` wrote to the one in use).
        if let Some((qs, pages)) = self
            .store
            .as_ref()
            .and_then(|qs| Some((qs, qs.pages.as_ref()?)))
        {
            let other = if self.is_replicated() {
                &qs.queue
            } else {
                pages
            };
            qs.store.submit(other, vec![MessageOp::DeleteQueue]);
        }
        if let Some(sq) = &self.stream {
            sq.delete();
        }
        (consumers, n)
    }

    /// Release the lock and submit the store operations gathered under it, in the
    /// queue's order. `barrier`: the caller reads the store next, so first let
    /// earlier operations of the queue be submitted (dead letters to be removed
    /// later need that too: a paged-out body is read before its removal).
    fn release(&self, s: MutexGuard<'_, State>, fx: &mut Effects, barrier: bool) {
        // Reported under the state lock, so in the order the changes were
        // made (returns are reported under it too).
        if !fx.checked_out.is_empty() {
            let out = std::mem::take(&mut fx.checked_out);
            if let Some(r) = self.replica() {
                r.checked_out(out, Vec::new());
            }
        }
        if !fx.settled.is_empty() {
            let settled = std::mem::take(&mut fx.settled);
            if let Some(r) = self.replica() {
                r.settled(settled);
            }
        }
        if let (Some(h), Some(r)) = (fx.horizon.take(), self.replica()) {
            r.ask_horizon(h);
        }
        let Some(qs) = &self.store else {
            return;
        };
        if fx.ops.is_empty() && !barrier && !fx.dead.iter().any(|(e, _)| e.pos.is_some()) {
            return;
        }
        submit_in_order(qs, self.space(qs), s, std::mem::take(&mut fx.ops));
    }

    /// Release the lock, submit store operations and route dead letters.
    fn finish(&self, s: MutexGuard<'_, State>, mut fx: Effects, now: u64) {
        self.release(s, &mut fx, false);
        self.dead_letter(fx.dead, now);
    }

    /// Like [`finish`](Self::finish), and while the head is wanted but only in the
    /// store (a consumer waits, a length limit or an expiry applies), load the next
    /// batch (lock released) and go on.
    fn settle<'a>(self: &'a Arc<Self>, mut s: MutexGuard<'a, State>, mut fx: Effects, now: u64) {
        while fx.page_in {
            fx.page_in = false;
            let Head::Paged(level) = s.ready.peek() else {
                break;
            };
            s = self.page_in(s, level, &mut fx);
            let args = self.args();
            self.enforce_limits(&mut s, &args, &mut fx);
            self.expire_locked(&mut s, now, &mut fx);
            self.dispatch_locked(&mut s, now, &mut fx);
        }
        self.finish(s, fx, now);
    }

    /// Load the front of `level`'s tail: the lock is released for the read
    /// (the queue's earlier store operations submitted first) and taken
    /// again to install what was read.
    fn page_in<'a>(
        &'a self,
        s: MutexGuard<'a, State>,
        level: u8,
        fx: &mut Effects,
    ) -> MutexGuard<'a, State> {
        let from = s.ready.tail(level).from;
        self.release(s, fx, true);
        let loaded = self.load(level, from);
        let mut s = self.state.lock();
        self.install(&mut s, level, from, loaded, fx);
        s
    }

    /// Read the next batch of `level` from the store, from position `from` (no
    /// lock held). Empty if there is none, or on a store error (logged).
    fn load(&self, level: u8, from: u64) -> Vec<ReadMessage> {
        let Some(qs) = &self.store else {
            return Vec::new();
        };
        match qs
            .store
            .read(self.space(qs), level, from, PAGE_IN_BATCH, PAGE_IN_BYTES)
        {
            Ok(v) => v,
            Err(err) => {
                tracing::error!(queue = %self.spec.name, level, from, error = %err, "cannot read stored messages");
                Vec::new()
            }
        }
    }

    /// Put messages loaded from the front of `level`'s tail into its window, if the
    /// tail is still where the read started.
    ///
    /// A replicated queue's message comes back as it went (its id in the
    /// group, no position: the group holds it durably) and its paged-out
    /// copy is dropped from the store.
    fn install(
        &self,
        s: &mut State,
        level: u8,
        from: u64,
        loaded: Vec<ReadMessage>,
        fx: &mut Effects,
    ) {
        if s.ready.tail(level).from != from || s.ready.tail(level).count == 0 {
            return;
        }
        let next = loaded.last().map_or(from, |r| r.pos + 1);
        let replicated = self.is_replicated();
        let mut entries = Vec::with_capacity(loaded.len());
        for r in loaded {
            if replicated {
                fx.ops.push(MessageOp::Settle {
                    level,
                    pos: r.pos,
                    size: r.size,
                    durable: false,
                });
            }
            let (expires_at, redelivered) = (r.message.expires_at, r.message.redelivered);
            let message = match stored_message(r.message) {
                Ok(m) => m,
                Err(err) => {
                    tracing::error!(queue = %self.spec.name, pos = r.pos, error = %err, "unreadable stored properties; message skipped");
                    continue;
                }
            };
            let seq = if replicated {
                r.pos
            } else {
                s.next_seq += 1;
                s.next_seq - 1
            };
            let mut entry = Entry::new(seq, message, expires_at);
            entry.redelivered = redelivered;
            entry.delivery_count = r.returns;
            entry.persisted = r.durable;
            entry.pos = (!replicated).then_some(r.pos);
            self.note_expiry(expires_at.is_some());
            entries.push(entry);
        }
        s.ready.install(level, from, next, entries);
    }

    /// Route dead letters (at `now`, the `x-death` time) to the dead-letter exchange
    /// (dropped if there is none), then remove them from the store.
    fn dead_letter(&self, dead: DeadLetters, now: u64) {
        if dead.is_empty() {
            return;
        }
        let args = self.args();
        let target = args
            .dead_letter_exchange
            .as_deref()
            .and_then(|dlx| Some((dlx, self.vhost.upgrade()?)));
        let key = args.dead_letter_routing_key.as_deref();
        let mut removes = Vec::new();
        let mut settled = Vec::new();
        let replicated = self.is_replicated();
        for (entry, reason) in dead {
            if replicated {
                settled.push(entry.seq);
            }
            removes.extend(self.settle_op(&entry));
            let Some((dlx, vhost)) = &target else {
                continue;
            };
            crate::broker::Counters::add(&self.counters.dead_lettered, 1);
            let m =
                dead_letter::dead_letter(&entry.message, self.name(), reason, dlx, key, now / 1000);
            // A missing dead-letter exchange drops the message, as in RabbitMQ.
            let _ = vhost.publish(dlx, &m, PublishFrom::DeadLetter, now);
        }
        if let (false, Some(r)) = (settled.is_empty(), self.replica()) {
            r.settled(settled);
        }
        if let (false, Some(qs)) = (removes.is_empty(), &self.store) {
            // In the queue's order, unless it was deleted meanwhile (its deletion
            // removed them, and a new queue of the same name may reuse the seqs).
            let s = self.state.lock();
            if s.deleted {
                return;
            }
            submit_in_order(qs, &qs.queue, s, removes);
        }
    }
}

/// Release a queue's state lock and submit `ops` (if any) in the queue's order: its
/// submit lock is taken before the state lock goes, and held until they are buffered.
fn submit_in_order(
    qs: &QueueStore,
    space: &QueueRef,
    s: MutexGuard<'_, State>,
    ops: Vec<MessageOp>,
) {
    let order = qs.order.lock();
    drop(s);
    if !ops.is_empty() {
        qs.store.submit(space, ops);
    }
    drop(order);
}

/// The store key of a quorum queue's pages ([`QueueStore::pages`]).
fn pages_key(vhost: &str, name: &str) -> String {
    format!("{vhost}\0{name}\0pages")
}

/// The store key of a queue.
pub fn store_key(vhost: &str, name: &str) -> String {
    format!("{vhost}\0{name}")
}

/// The message a stored record holds (its properties decoded); the error if they
/// do not decode.
pub(crate) fn stored_message(
    m: crate::storage::StoredMessage,
) -> Result<Arc<Message>, crate::wire::WireError> {
    let properties = crate::wire::BasicProperties::decode(&m.properties)?;
    Ok(Message::new(m.exchange, m.routing_key, properties, m.body))
}

/// The store record of a message.
pub(crate) fn encode(m: &Message, redelivered: bool, expires_at: Option<u64>) -> EncodedMessage {
    let mut props = bytes::BytesMut::new();
    m.properties.encode(&mut props);
    EncodedMessage::from_parts(&MessageParts {
        exchange: &m.exchange,
        routing_key: &m.routing_key,
        properties: &props,
        body: &m.body,
        redelivered,
        expires_at,
    })
}

/// The consumer to serve next: the highest priority with credit, round-robin within
/// it. With single active consumer only the first (longest-standing) one is served.
fn pick_consumer(s: &mut State, single_active: bool) -> Option<usize> {
    if single_active {
        return s
            .consumers
            .first()
            .filter(|c| c.try_take_credit())
            .map(|_| 0);
    }
    let n = s.consumers.len();
    let mut start = 0;
    while start < n {
        let priority = s.consumers[start].priority;
        let end = start + s.consumers[start..].partition_point(|c| c.priority == priority);
        let group = end - start;
        for k in 0..group {
            let idx = start + (s.next_consumer + k) % group;
            if s.consumers[idx].try_take_credit() {
                s.next_consumer = s.next_consumer.wrapping_add(k + 1);
                return Some(idx);
            }
        }
        start = end;
    }
    None
}
