//! One quorum queue group on this node: follows the group's leadership and
//! serves the queue while this node leads. On becoming leader (and having
//! applied everything committed before: `ensure_linearizable`) it reads the
//! messages' bodies back from the group's log and snapshot and loads them
//! into the local queue (which keeps a window in memory and pages the rest
//! out to the message store), flagged redelivered if
//! they may have gone out before (at most the committed delivery horizon,
//! returned or out: no delivery goes past the committed horizon, so the
//! others never went out) and with the returns the group counted
//! (`x-delivery-count`, `x-delivery-limit`), one more for each message out
//! with a client (whose channel went with the old leader: a return,
//! proposed as such), attaches itself as the queue's
//! [`Replica`] door and announces itself to the metadata group (other
//! nodes then forward to it). On losing leadership it empties the local
//! queue (the group keeps the messages) and cancels its consumers.
//!
//! Publishes are proposed in their order as `Enqueue` batches: at most two
//! batches wait for their commit, the publishes that arrive meanwhile form
//! the next one (each confirm waits for its batch's commit); messages
//! leaving the queue are proposed as `Settle`, messages going back into
//! it after reaching a client as `Return` (their delivery count), and
//! messages handed to a client that must ack them as `Checkout`, and the
//! delivery horizons the queue asks for as `Horizon`, batched: one batch in
//! flight, what arrives meanwhile goes in the next; a horizon is answered
//! to the queue once its batch committed (it then sends the deliveries that
//! waited for it).

use super::command::{Outcome, QCommand, QMsg};
use super::publisher::{Answer, Reply};
use super::store::QSm;
use super::{Manager, QTypeConfig};
use crate::broker::message::Message;
use crate::broker::remote::{Replica, Ticket};
use openraft::ServerState;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;
use tokio::sync::mpsc;

type Raft = openraft::Raft<QTypeConfig>;

/// This node's member of one quorum queue's group.
pub struct Group {
    pub id: String,
    pub vhost: String,
    pub name: String,
    raft: OnceLock<Raft>,
    sm: QSm,
    serving: AtomicBool,
    /// The queue this member is loading the group's messages into, while
    /// it does ([`Group::serve`]; then the state machine's `serving`).
    loading: parking_lot::Mutex<Option<Arc<crate::broker::queue::Queue>>>,
    /// Counts this member's spells of serving: a change the queue reported
    /// in an earlier one is not proposed (the queue was emptied and loaded
    /// again from the group's state since), a horizon asked then not
    /// answered.
    epoch: AtomicU64,
    settle_tx: mpsc::UnboundedSender<(u64, Change)>,
    settle_rx: parking_lot::Mutex<Option<mpsc::UnboundedReceiver<(u64, Change)>>>,
    enqueue_tx: mpsc::UnboundedSender<Publish>,
    enqueue_rx: parking_lot::Mutex<Option<mpsc::UnboundedReceiver<Publish>>>,
    commit_timeout: Duration,
    manager: Weak<Manager>,
    /// The manager's count of publishes not answered yet.
    pending: Arc<AtomicUsize>,
    /// The members the metadata records (node names); the leader makes the
    /// group's voters match them.
    members: parking_lot::Mutex<Vec<String>>,
    /// A leadership transfer is under way ([`Group::transfer_to`]): nothing
    /// is proposed and no heartbeat sent until it ends.
    transferring: AtomicBool,
    /// The transfer has stopped this leader's heartbeats (sent by the
    /// node's ticker, `super::elect::run`, for every group it leads).
    pub(super) quiet: AtomicBool,
    /// openraft has made this member the leader (kept by [`watch`], so
    /// that the ticker need not read every group's metrics).
    pub(super) leading: AtomicBool,
    /// Wakes the proposal loops when a transfer ends.
    transferred: tokio::sync::Notify,
    /// Wakes those waiting for this member to serve ([`Group::serves_within`]).
    served: tokio::sync::Notify,
    /// When this member last heard from a leader ([`super::elect`]).
    pub(super) timer: parking_lot::Mutex<super::elect::Timer>,
}

impl std::fmt::Debug for Group {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("quorum::Group")
            .field("id", &self.id)
            .field("serving", &self.is_serving())
            .finish_non_exhaustive()
    }
}

impl Group {
    pub(super) fn new(
        id: String,
        vhost: String,
        name: String,
        sm: QSm,
        commit_timeout: Duration,
        manager: Weak<Manager>,
        pending: Arc<AtomicUsize>,
    ) -> Arc<Group> {
        let wait = manager
            .upgrade()
            .map(|m| super::elect::draw(&m))
            .unwrap_or_default();
        let (settle_tx, settle_rx) = mpsc::unbounded_channel();
        let (enqueue_tx, enqueue_rx) = mpsc::unbounded_channel();
        Arc::new(Group {
            enqueue_tx,
            enqueue_rx: parking_lot::Mutex::new(Some(enqueue_rx)),
            id,
            vhost,
            name,
            raft: OnceLock::new(),
            sm,
            serving: AtomicBool::new(false),
            loading: parking_lot::Mutex::new(None),
            epoch: AtomicU64::new(0),
            settle_tx,
            settle_rx: parking_lot::Mutex::new(Some(settle_rx)),
            commit_timeout,
            manager,
            pending,
            members: parking_lot::Mutex::new(Vec::new()),
            transferring: AtomicBool::new(false),
            quiet: AtomicBool::new(false),
            leading: AtomicBool::new(false),
            transferred: tokio::sync::Notify::new(),
            served: tokio::sync::Notify::new(),
            timer: parking_lot::Mutex::new(super::elect::Timer::new(wait)),
        })
    }

    /// The members the metadata records from now on.
    pub(super) fn set_members(&self, members: Vec<String>) {
        *self.members.lock() = members;
    }

    /// The voters of the group's configuration as this member sees it, by
    /// id with their names; None while a membership change is half-way (a
    /// joint configuration) or before the group runs.
    pub fn voters(&self) -> Option<BTreeMap<u64, String>> {
        let raft = self.raft()?;
        let metrics = raft.metrics();
        let m = metrics.borrow();
        let membership = m.membership_config.membership();
        if membership.get_joint_config().len() != 1 {
            return None;
        }
        Some(
            membership
                .voter_ids()
                .map(|id| {
                    let name = membership.get_node(&id).map(|n| n.name.clone());
                    (id, name.unwrap_or_default())
                })
                .collect(),
        )
    }

    /// The node this member last heard lead the group, when not node `me`:
    /// known from the group itself as soon as an election ends, before the
    /// metadata group commits the new leader's announcement (which a
    /// failover may have left leaderless too).
    pub fn leader_elsewhere(&self, me: u64) -> Option<String> {
        let raft = self.raft()?;
        let metrics = raft.metrics();
        let m = metrics.borrow();
        let id = m.current_leader.filter(|l| *l != me)?;
        let node = m.membership_config.membership().get_node(&id)?;
        Some(node.name.clone())
    }

    /// This node is no longer a recorded member ([`Manager::members_changed`])
    /// and the group has removed it from its voters: its member can stop.
    fn has_left(&self, me: u64) -> bool {
        let recorded = self
            .members
            .lock()
            .iter()
            .any(|n| super::super::node_id(n) == me);
        !recorded && self.voters().is_some_and(|v| !v.contains_key(&me))
    }

    /// The member a local quorum queue is attached to ([`Replica`]).
    pub fn of(q: &crate::broker::queue::Queue) -> Option<Arc<Group>> {
        q.replica()?.as_any().downcast::<Group>().ok()
    }

    pub fn raft(&self) -> Option<Raft> {
        self.raft.get().cloned()
    }

    pub fn is_serving(&self) -> bool {
        self.serving.load(Ordering::Acquire)
    }

    /// The group's live messages as this member applied them: how many,
    /// and their body bytes.
    pub fn committed_lengths(&self) -> (usize, u64) {
        self.sm.inner.lock().lengths()
    }

    /// This member takes publishes for the queue: it serves it and has
    /// loaded the group's messages into it (a publish committed during the
    /// load would be confirmed before the queue, which could refuse it by
    /// its length limit, had it).
    pub fn takes_publishes(&self) -> bool {
        self.is_serving() && self.loading.lock().is_none()
    }

    /// This member serves the queue, or starts to within `within`.
    pub async fn serves_within(&self, within: Duration) -> bool {
        let give_up = tokio::time::Instant::now() + within;
        loop {
            let served = self.served.notified();
            if self.is_serving() {
                return true;
            }
            if tokio::time::timeout_at(give_up, served).await.is_err() {
                return self.is_serving();
            }
        }
    }

    /// Propose one publish (numbered by its publisher) while this node
    /// serves the queue; `reply` gets the group's answer ([`Answer::Resend`]
    /// at once when it does not serve). `count`: counted in this node's
    /// pending publishes (a publisher on another node).
    pub fn propose(&self, m: QMsg, reply: Reply, count: bool) {
        if self.raft().is_none() || !self.takes_publishes() {
            return reply(Answer::Resend);
        }
        let counter = count.then(|| {
            self.pending.fetch_add(1, Ordering::Relaxed);
            Arc::clone(&self.pending)
        });
        // Not sent: the loop is gone and the publish is dropped, answering.
        let _ = self.enqueue_tx.send((m, Counted(Some(reply), counter)));
    }

    /// The group's Raft node is up: follow its leadership, propose settles.
    pub(super) fn run(self: &Arc<Self>, raft: Raft) {
        let _ = self.raft.set(raft.clone());
        if let Some(rx) = self.settle_rx.lock().take() {
            tokio::spawn(settle_loop(Arc::downgrade(self), raft.clone(), rx));
        }
        if let Some(rx) = self.enqueue_rx.lock().take() {
            tokio::spawn(propose_loop(Arc::downgrade(self), raft.clone(), rx));
        }
        tokio::spawn(watch(Arc::downgrade(self), raft));
    }

    pub(super) async fn shutdown(&self) {
        self.unserve();
        if let Some(r) = self.raft() {
            let _ = r.shutdown().await;
        }
    }

    /// Serve the queue: from here this member proposes what the local queue
    /// reports, and loads the group's messages into it in the group's
    /// order, a batch at a time, their bodies read back from the log and
    /// snapshot ([`QSm::read_back`]; the queue keeps a window in memory and
    /// pages the rest out). Consumers are served as the messages come in.
    /// What applies meanwhile (publishes, what the queue reports) is in the
    /// group's state, and loaded from it too; once nothing is left to load,
    /// under the state machine's lock, committed messages go straight into
    /// the queue. False (the caller stops serving) when the leadership or
    /// the queue goes meanwhile, or a body cannot be read.
    async fn serve(self: &Arc<Self>, raft: &Raft) -> bool {
        let Some(m) = self.manager.upgrade() else {
            return false;
        };
        let Some(q) = m.queue(&self.vhost, &self.name) else {
            return false;
        };
        let mut reader = self.sm.read_back().await;
        // (and the horizon as the last leader left it: what this one asks
        // for while it loads covers messages not loaded yet)
        let (epoch, horizon, purges) = {
            let s = self.sm.inner.lock();
            let epoch = self.epoch.fetch_add(1, Ordering::AcqRel) + 1;
            q.set_replica(Some(self.clone()));
            q.set_remote(None);
            *self.loading.lock() = Some(Arc::clone(&q));
            self.serving.store(true, Ordering::Release);
            // The local queue is empty here (nothing enqueues into it while
            // this node does not serve it); consumers already attached to
            // it (this node was the recorded leader) stay and get the
            // messages. A message out with a client at the failover went
            // back with its client's channel (on the old leader, or
            // cancelled with it): one more return, proposed here (before
            // anything can settle it) and counted as each is loaded.
            let out: Vec<u64> = s.state.out.iter().copied().collect();
            self.report(Change::Returned(out));
            // Redelivered: those that may have gone out (a delivery past
            // the committed horizon waited for a larger one to commit).
            q.horizon_start(s.state.horizon);
            // A purge from here on also drops (and counts) what is not
            // loaded yet.
            let purges = q.expect_loads(s.state.messages.len());
            (epoch, s.state.horizon, purges)
        };
        m.announce(self);
        self.served.notify_waiters();
        let (mut next, mut n, mut bytes) = (0u64, 0usize, 0u64);
        loop {
            if raft.metrics().borrow().state != ServerState::Leader {
                return false;
            }
            // What the last batch paged out is written before the next is
            // read (the pages are copies: memory stays about a batch).
            q.store_ready().await;
            let want: BTreeSet<u64> = {
                let mut s = self.sm.inner.lock();
                if !self.loads(epoch) {
                    return false;
                }
                let ids = s.state.messages.range(next..).map(|(id, _)| *id);
                let want: BTreeSet<u64> = ids.take(LOAD_BATCH).collect();
                if want.is_empty() {
                    // Everything loaded: committed messages go into the
                    // queue as they apply from now on.
                    q.expect_loads(0);
                    s.serving = Some(Arc::clone(&q));
                    *self.loading.lock() = None;
                    break;
                }
                want
            };
            let read = tokio::task::spawn_blocking(move || {
                let found = reader.read(&want);
                found.map(|found| (reader, want, found))
            })
            .await
            .map_err(|e| e.to_string())
            .and_then(|read| read);
            let (r, w, found) = match read {
                Ok(read) => read,
                Err(e) => {
                    tracing::error!(queue = %self.name, vhost = %self.vhost, error = %e, "reading the quorum queue's messages back");
                    return false;
                }
            };
            reader = r;
            next = w.last().map_or(next, |l| l + 1);
            let now = crate::clock::now_ms();
            let mut s = self.sm.inner.lock();
            if !self.loads(epoch) {
                return false;
            }
            // A wanted id not found was settled meanwhile (consumers are
            // served as the messages come in), or its body is missing.
            let missing = if found.len() < w.len() {
                let live = |id: &&u64| s.state.messages.contains_key(*id);
                w.iter()
                    .filter(|id| !found.contains_key(*id))
                    .filter(live)
                    .count()
            } else {
                0
            };
            if missing > 0 {
                tracing::error!(queue = %self.name, vhost = %self.vhost, missing, "live quorum queue messages' bodies not found on disk");
                return false;
            }
            let (mut purged_from, mut taken) = (None, 0);
            for (id, msg) in found {
                // Those settled while their bodies were read are gone.
                let Some(at) = s.state.messages.get(&id).map(|m| m.at) else {
                    continue;
                };
                let out = u32::from(s.state.out.contains(&id));
                let returns = s.state.returns(id).saturating_add(out);
                let redelivered = id <= horizon || returns > 0;
                let size = msg.body.len() as u64;
                let flags = (redelivered, returns);
                if q.load_replicated(msg, id, flags, at, now, Some(purges))
                    .is_none()
                {
                    purged_from = Some(id);
                    break;
                }
                taken += 1;
                bytes += size;
                n += 1;
            }
            if let Some(from) = purged_from {
                // The queue was purged meanwhile: what is not loaded yet
                // went with it (every message from here on; none of them
                // reached the queue), settled in the group as the rest of
                // the purge was.
                let rest = s.state.messages.range(from..).map(|(id, _)| *id).collect();
                self.report(Change::Settled(rest));
                s.serving = Some(Arc::clone(&q));
                *self.loading.lock() = None;
                break;
            }
            // (those of the batch settled meanwhile: none is left to load)
            q.loads_gone(w.len() - taken);
        }
        drop(reader);
        if bytes >= GIVE_BACK_AT {
            // Read back, paged out again: the memory back to the system
            // once the store has written the pages (they held copies).
            let written = q.written();
            tokio::spawn(async move {
                written.await;
                let _ = tokio::task::spawn_blocking(crate::broker::memory::give_back_freed).await;
            });
        }
        tracing::info!(queue = %self.name, vhost = %self.vhost, messages = n, "serving the quorum queue (group leader)");
        true
    }

    /// The queue this member serves, or is loading to serve.
    fn served_queue(&self) -> Option<Arc<crate::broker::queue::Queue>> {
        let s = self.sm.inner.lock();
        s.serving.clone().or_else(|| self.loading.lock().clone())
    }

    /// Still loading the queue in spell `epoch` (checked under the state
    /// machine's lock, which [`Group::unserve`] takes to stop it).
    fn loads(&self, epoch: u64) -> bool {
        self.epoch.load(Ordering::Acquire) == epoch && self.loading.lock().is_some()
    }

    /// Stop serving: the local queue forgets its messages (the group keeps
    /// them) and its consumers are cancelled.
    fn unserve(&self) {
        let q = {
            let mut s = self.sm.inner.lock();
            self.serving.store(false, Ordering::Release);
            s.serving.take().or_else(|| self.loading.lock().take())
        };
        if let Some(q) = q {
            for c in q.reset_replicated() {
                c.sink.cancelled(c.channel, Arc::clone(&c.tag));
            }
            tracing::info!(queue = %self.name, vhost = %self.vhost, "no longer serving the quorum queue");
        }
    }
}

impl Group {
    pub(super) fn is_transferring(&self) -> bool {
        self.transferring.load(Ordering::Acquire)
    }

    /// Wait while a leadership transfer is under way.
    async fn not_transferring(&self) {
        loop {
            let woken = self.transferred.notified();
            if !self.transferring.load(Ordering::Acquire) {
                return;
            }
            woken.await;
        }
    }

    /// On the leader: hand the leadership to member `to` (rebalancing).
    /// openraft 0.9 has no leadership transfer, so this makes one from what
    /// it has: proposals pause until everything proposed is applied and `to`
    /// has all of it, heartbeats stop, and `to` is asked to stand
    /// (`trigger().elect()`, [`Rpc::Elect`](super::network::Rpc::Elect)):
    /// this leader grants the vote at once (no RPC of a leader renews its
    /// own lease) and steps down; the other members grant it once their
    /// lease has lapsed without heartbeats (an election timeout), so `to`
    /// is asked again until it leads. Always before the other members' own
    /// timers (lease plus election timeout), so none of them stands first;
    /// given up (and heartbeats resumed) before those could fire.
    /// Publishes that arrive meanwhile wait, then are nacked if this node no
    /// longer leads (the queue's publishers may resend through the new
    /// leader). Ok once `to` leads.
    pub async fn transfer_to(self: &Arc<Self>, to: u64) -> Result<(), String> {
        let raft = self.raft().ok_or("the group is not running here")?;
        let manager = self.manager.upgrade().ok_or("shutting down")?;
        let me = manager.ident.id;
        let target = {
            let metrics = raft.metrics();
            let m = metrics.borrow();
            if m.state != ServerState::Leader || !self.is_serving() {
                return Err("this node does not lead the queue".into());
            }
            if to == me {
                return Ok(());
            }
            let membership = m.membership_config.membership();
            if !membership.voter_ids().any(|v| v == to) {
                return Err(format!("node {to} is not a voting member"));
            }
            membership
                .get_node(&to)
                .cloned()
                .ok_or_else(|| format!("node {to} has no address"))?
        };
        if !manager.running_ids().contains(&to) {
            return Err(format!("node {to} is not running"));
        }
        if self.transferring.swap(true, Ordering::AcqRel) {
            return Err("a leadership transfer is already under way".into());
        }
        let _resume = Resume(self);
        // Everything proposed is applied here and replicated to `to`: its
        // log is as long as this leader's, so it can win.
        let caught_up = raft
            .wait(Some(self.commit_timeout))
            .metrics(
                |m| {
                    let last = m.last_log_index;
                    let matched = m
                        .replication
                        .as_ref()
                        .and_then(|r| r.get(&to).copied().flatten())
                        .map(|l| l.index);
                    m.state == ServerState::Leader
                        && m.last_applied.map(|l| l.index) == last
                        && matched == last
                },
                "the transfer's target caught up",
            )
            .await;
        if caught_up.is_err() {
            return Err(format!("node {to} did not catch up in time"));
        }
        self.quiet.store(true, Ordering::Release);
        let ask_every = Duration::from_millis(manager.config.heartbeat_interval);
        // Given up before any other member's own timer (lease plus an
        // election timeout) can fire, so a transfer that fails does not
        // cause an election of its own.
        let give_up = tokio::time::Instant::now()
            + Duration::from_millis(
                manager.config.election_timeout_max + 2 * manager.config.heartbeat_interval,
            );
        let mut metrics = raft.metrics();
        loop {
            let req = super::network::GroupRpc {
                group: self.id.clone(),
                rpc: super::network::Rpc::Elect,
            };
            let asked = super::network::call(&manager.ident, &target, &req, ask_every).await;
            if let Err(e) = asked {
                tracing::debug!(group = %self.id, error = %e, "leadership transfer: member not reached");
            }
            let until = tokio::time::Instant::now() + ask_every;
            loop {
                let leader = metrics.borrow_and_update().current_leader;
                if leader == Some(to) {
                    tracing::info!(queue = %self.name, vhost = %self.vhost, to, "quorum queue leadership transferred");
                    return Ok(());
                }
                if leader.is_some_and(|l| l != me) {
                    return Err(format!("node {} was elected instead", leader.unwrap_or(0)));
                }
                if tokio::time::timeout_at(until, metrics.changed())
                    .await
                    .is_err()
                {
                    break;
                }
            }
            if tokio::time::Instant::now() >= give_up {
                return Err(format!("node {to} was not elected in time"));
            }
        }
    }
}

/// Ends a leadership transfer, however it went: heartbeats again (a leader
/// that stayed goes on leading) and proposals resume.
struct Resume<'a>(&'a Group);

impl Drop for Resume<'_> {
    fn drop(&mut self) {
        self.0.quiet.store(false, Ordering::Release);
        self.0.transferring.store(false, Ordering::Release);
        self.0.transferred.notify_waiters();
    }
}

impl Replica for Group {
    fn serving(&self) -> bool {
        self.is_serving()
    }

    /// Through the queue's publisher on this node, which numbers it and
    /// resends it after a failover ([`super::publisher`]).
    fn enqueue(&self, message: &Arc<Message>, ticket: &Arc<Ticket>) {
        match self.manager.upgrade() {
            Some(m) => m
                .publisher(&self.vhost, &self.name)
                .publish(message, ticket),
            None => {
                ticket.expect();
                ticket.settle(false);
            }
        }
    }

    fn as_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync> {
        self
    }

    fn settled(&self, ids: Vec<u64>) {
        self.report(Change::Settled(ids));
    }

    fn settled_range(&self, from: u64, to: u64) {
        if from < to {
            self.report(Change::SettledRange(from, to));
        }
    }

    fn returned(&self, ids: Vec<u64>) {
        self.report(Change::Returned(ids));
    }

    fn checked_out(&self, out: Vec<u64>, back: Vec<u64>) {
        self.report(Change::CheckedOut { out, back });
    }

    fn ask_horizon(&self, h: u64) {
        self.report(Change::Horizon(h));
    }

    /// [`HORIZON_ENTRIES`] log entries' messages past `last`.
    fn horizon_after(&self, last: u64) -> u64 {
        let index = (last >> 16).saturating_add(HORIZON_ENTRIES);
        super::command::id(index, 0xffff)
    }
}

impl Group {
    /// A change as the group's commands name it: a range of ids settled
    /// becomes the live messages of the group in it.
    fn expand(&self, change: Change) -> Change {
        match change {
            Change::SettledRange(from, to) => {
                let s = self.sm.inner.lock();
                Change::Settled(
                    s.state
                        .messages
                        .range(from..to)
                        .map(|(id, _)| *id)
                        .collect(),
                )
            }
            other => other,
        }
    }

    /// Hand a change of the serving queue to the settle loop, in the
    /// queue's order (called under its lock), tagged with this spell of
    /// serving.
    fn report(&self, change: Change) {
        if !change.is_empty() {
            let epoch = self.epoch.load(Ordering::Acquire);
            // Not sent: the group stopped; the next leader has the messages.
            let _ = self.settle_tx.send((epoch, change));
        }
    }
}

/// Follow the group's leadership until it shuts down. While it serves, the
/// leader checks every other heartbeat that a majority still answers it
/// (openraft's `millis_since_quorum_ack`, kept from the replies to its
/// heartbeats); one that no majority answered for an election timeout stops
/// serving (the others may have elected another
/// leader by then; openraft 0.9 keeps such a leader leading until it hears
/// of a higher term), and serves again once a majority answers it.
async fn watch(g: Weak<Group>, raft: Raft) {
    let mut metrics = raft.metrics();
    let (tick, lost_after) = match g.upgrade().and_then(|g| g.manager.upgrade()) {
        Some(m) => (
            Duration::from_millis(m.config.heartbeat_interval * 2),
            Duration::from_millis(m.config.election_timeout_min),
        ),
        None => return,
    };
    let mut checked = tokio::time::Instant::now();
    let mut next_tick = checked + tick;
    loop {
        let (leader, seen) = {
            let m = metrics.borrow_and_update();
            (m.state == ServerState::Leader, Seen::of(&m))
        };
        let Some(group) = g.upgrade() else { return };
        group.leading.store(leader, Ordering::Release);
        if let Some(m) = group.manager.upgrade() {
            if group.has_left(m.ident.id) {
                tracing::info!(queue = %group.name, vhost = %group.vhost, "left the quorum queue's group");
                m.left(&group);
                return;
            }
        }
        let transferring = group.transferring.load(Ordering::Acquire);
        // From the replies to its heartbeats (no round of its own: with a
        // round per group every other heartbeat, a node leading hundreds
        // of groups spent as much again on these checks).
        let cut_off =
            leader && group.is_serving() && !transferring && checked.elapsed() >= tick && {
                checked = tokio::time::Instant::now();
                let acked = raft.metrics().borrow().millis_since_quorum_ack;
                acked.is_none_or(|ms| u128::from(ms) > lost_after.as_millis())
            };
        if leader && !group.is_serving() {
            // Everything committed before this term is applied first, and
            // everything already in this member's log: a leader restored at
            // start (openraft makes a node whose saved vote is its own
            // committed one leader again at once, with no new blank entry)
            // may hold entries past its commit index that commit only now;
            // loaded before they apply, their messages would be enqueued
            // again when they do, as first deliveries (not redelivered,
            // and even when a later `Settle` in that tail had acked them).
            let last = raft.metrics().borrow().last_log_index;
            let ready = async {
                raft.ensure_linearizable().await.map_err(|_| ())?;
                raft.wait(None)
                    .applied_index_at_least(last, "the leader's log applied")
                    .await
                    .map_err(|_| ())
            };
            let ok = tokio::time::timeout(group.commit_timeout, ready).await;
            let still = raft.metrics().borrow().state == ServerState::Leader;
            if matches!(ok, Ok(Ok(_))) && still {
                if !group.serve(&raft).await {
                    group.unserve();
                    drop(group);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            } else {
                drop(group);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            continue;
        }
        if leader && !cut_off && !transferring && group.is_serving() {
            reconcile(&group, &raft).await;
        }
        if (!leader || cut_off) && group.is_serving() {
            if cut_off {
                tracing::warn!(queue = %group.name, vhost = %group.vhost, "quorum queue leader cut off from its members");
            }
            group.unserve();
        }
        if group.sm.snapshot_wanted() {
            let _ = raft.trigger().snapshot().await;
        }
        if group.sm.take_freed() >= GIVE_BACK_AT {
            // A backlog read back and let go of: its memory back to the
            // system (else the allocator keeps the peak resident).
            tokio::task::spawn_blocking(crate::broker::memory::give_back_freed);
        }
        drop(group);
        // Until what this loop looks at changes, or the tick: the metrics
        // also change at every reply to a heartbeat (replication progress,
        // the quorum's last ack), which asks nothing of this loop.
        loop {
            tokio::select! {
                r = metrics.changed() => {
                    if r.is_err() {
                        if let Some(group) = g.upgrade() {
                            group.unserve();
                        }
                        return;
                    }
                    if Seen::of(&metrics.borrow_and_update()) != seen {
                        break;
                    }
                }
                () = tokio::time::sleep_until(next_tick) => {
                    next_tick = tokio::time::Instant::now() + tick;
                    break;
                }
            }
        }
    }
}

/// What [`watch`] reacts to in a member's metrics: its role, the leader,
/// the vote, the membership, its log and applied entries, and how far the
/// learners have replicated (a learner being removed goes once it has the
/// configuration that removes it, see [`reconcile`]; there are learners
/// only while the membership changes).
#[derive(PartialEq)]
struct Seen {
    state: ServerState,
    leader: Option<u64>,
    vote: openraft::Vote<u64>,
    membership: Option<openraft::LogId<u64>>,
    last_log: Option<u64>,
    applied: Option<u64>,
    learners: Vec<(u64, Option<u64>)>,
}

impl Seen {
    fn of(m: &openraft::RaftMetrics<u64, crate::cluster::NodeInfo>) -> Seen {
        let learners = match &m.replication {
            Some(r) => m
                .membership_config
                .membership()
                .learner_ids()
                .map(|id| (id, r.get(&id).copied().flatten().map(|l| l.index)))
                .collect(),
            None => Vec::new(),
        };
        Seen {
            state: m.state,
            leader: m.current_leader,
            vote: m.vote,
            membership: *m.membership_config.log_id(),
            last_log: m.last_log_index,
            applied: m.last_applied.map(|l| l.index),
            learners,
        }
    }
}

/// On the leader: make the group's voters the members the metadata records.
/// A node to add is added as a learner first (openraft sends it the log or a
/// snapshot; this waits until it has caught up), then made a voter. A node
/// to remove is made a learner, so that it still receives the configuration
/// without it (and so stops its member, [`Group::has_left`]); it is dropped
/// from the group once it has that entry, or at once when the cluster sees
/// it down (it drops its log when it comes back: it is no member). One
/// change per call; the watch loop calls again until they match.
async fn reconcile(group: &Arc<Group>, raft: &Raft) {
    use openraft::ChangeMembers;
    let wanted: BTreeSet<u64> = group
        .members
        .lock()
        .iter()
        .map(|n| super::super::node_id(n))
        .collect();
    let Some(voters) = group.voters() else {
        return;
    };
    let voters: BTreeSet<u64> = voters.into_keys().collect();
    let (learners, config_at, replicated) = {
        let metrics = raft.metrics();
        let m = metrics.borrow();
        let membership = m.membership_config.membership();
        let learners: BTreeSet<u64> = membership.learner_ids().collect();
        let config_at = m.membership_config.log_id().map(|l| l.index);
        (
            learners,
            config_at,
            m.replication.clone().unwrap_or_default(),
        )
    };
    let Some(manager) = group.manager.upgrade() else {
        return;
    };
    if wanted.is_empty() {
        return;
    }
    let within = group.commit_timeout;
    let name_of = |id: u64| {
        group
            .members
            .lock()
            .iter()
            .find(|n| super::super::node_id(n) == id)
            .cloned()
    };
    let change = if let Some(add) = wanted.difference(&voters).next().copied() {
        let Some(info) = name_of(add).and_then(|n| manager.node_info(&n)) else {
            return;
        };
        let learner = tokio::time::timeout(within, raft.add_learner(add, info, true)).await;
        if !matches!(learner, Ok(Ok(_))) {
            tracing::debug!(group = %group.id, node = add, "quorum queue member not caught up yet");
            return;
        }
        ChangeMembers::AddVoterIds(BTreeSet::from([add]))
    } else if voters != wanted {
        let remove: BTreeSet<u64> = voters.difference(&wanted).copied().collect();
        let r = tokio::time::timeout(
            within,
            raft.change_membership(ChangeMembers::RemoveVoters(remove), true),
        )
        .await;
        tracing::info!(group = %group.id, ok = matches!(r, Ok(Ok(_))), "quorum queue member removed");
        return;
    } else {
        let running = manager.running_ids();
        let gone: BTreeSet<u64> = learners
            .difference(&wanted)
            .filter(|id| {
                let has_config = replicated
                    .get(id)
                    .and_then(|l| l.map(|l| l.index))
                    .zip(config_at)
                    .is_some_and(|(at, config)| at >= config);
                has_config || !running.contains(id)
            })
            .copied()
            .collect();
        if gone.is_empty() {
            return;
        }
        ChangeMembers::RemoveNodes(gone)
    };
    let r = tokio::time::timeout(within, raft.change_membership(change, false)).await;
    tracing::info!(group = %group.id, ok = matches!(r, Ok(Ok(_))), "quorum queue membership changed");
}

/// A publish waiting to be proposed, and where its answer goes.
type Publish = (QMsg, Counted);

/// A publish's reply, counted in the manager's pending publishes until it
/// is answered when its publisher is on another node (this node's own
/// publishers count theirs); one dropped unanswered (its group stopped) is
/// answered [`Answer::Resend`], so no publish waits forever.
struct Counted(Option<Reply>, Option<Arc<AtomicUsize>>);

impl Counted {
    fn answer(mut self, a: Answer) {
        if let Some(r) = self.0.take() {
            r(a);
        }
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        if let Some(r) = self.0.take() {
            r(Answer::Resend);
        }
        if let Some(n) = &self.1 {
            n.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// Batches of publishes awaiting their commit, at most: while they wait,
/// the next publishes gather into the next batch.
const BATCHES_IN_FLIGHT: usize = 2;

/// Propose publishes in the order they came, as batches (one `Enqueue` of
/// up to [`super::command::BATCH_MAX`] messages and about
/// [`super::command::BATCH_BYTES_MAX`] of bodies: one log entry, one fsync
/// per member), and settle each one's ticket with the outcome.
async fn propose_loop(g: Weak<Group>, raft: Raft, mut rx: mpsc::UnboundedReceiver<Publish>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            return;
        };
        let mut bytes = first.0.size_hint();
        let mut batch = vec![first];
        while batch.len() < super::command::BATCH_MAX && bytes < super::command::BATCH_BYTES_MAX {
            match rx.try_recv() {
                Ok(p) => {
                    bytes += p.0.size_hint();
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let (mut messages, tickets): (Vec<QMsg>, Vec<Counted>) = batch.into_iter().unzip();
        // Taken now: their TTLs count from here on every member (one time
        // per batch, written once).
        let at = crate::clock::now_ms();
        for m in &mut messages {
            m.at = at;
        }
        let Some(group) = g.upgrade() else { return };
        group.not_transferring().await;
        let within = group.commit_timeout;
        let serving = group.takes_publishes();
        drop(group);
        if !serving {
            for t in tickets {
                t.answer(Answer::Resend);
            }
            continue;
        }
        // Handed to the Raft core here, in order; the commit is awaited
        // aside, so the next batch can be proposed meanwhile.
        let sent = tokio::time::timeout(within, raft.client_write_ff(QCommand::Enqueue(messages)));
        let answer = match sent.await {
            Ok(Ok(answer)) => answer,
            _ => {
                for t in tickets {
                    t.answer(Answer::Resend);
                }
                continue;
            }
        };
        tokio::spawn(async move {
            let oks = match tokio::time::timeout(within, answer).await {
                Ok(Ok(Ok(resp))) => resp.data,
                Ok(Ok(Err(e))) => {
                    tracing::debug!(error = %e, "quorum queue publishes not committed");
                    Vec::new()
                }
                _ => {
                    tracing::debug!("quorum queue publishes not committed in time");
                    Vec::new()
                }
            };
            for (i, t) in tickets.into_iter().enumerate() {
                t.answer(match oks.get(i) {
                    Some(Outcome::Taken) => Answer::Taken,
                    Some(Outcome::Refused) => Answer::Refused,
                    Some(Outcome::OutOfSequence) | None => Answer::Resend,
                });
            }
            drop(slot);
        });
    }
}

/// What the serving queue reports of its messages, in its order.
enum Change {
    /// Gone for good: proposed as `Settle`.
    Settled(Vec<u64>),
    /// Every message of the group with an id in this range is gone for
    /// good (paged out of the queue, so only the range is known there):
    /// made [`Change::Settled`] from the group's state by the settle loop
    /// ([`Group::expand`]), which the queue's lock cannot take.
    SettledRange(u64, u64),
    /// Back in the queue after reaching a client: proposed as `Return`.
    Returned(Vec<u64>),
    /// Handed to a client that must ack them, or back before reaching it:
    /// proposed as `Checkout`.
    CheckedOut { out: Vec<u64>, back: Vec<u64> },
    /// A delivery horizon the queue asks for: proposed as `Horizon`, then
    /// answered to the queue.
    Horizon(u64),
}

impl Change {
    fn is_empty(&self) -> bool {
        match self {
            Change::Settled(ids) | Change::Returned(ids) => ids.is_empty(),
            Change::CheckedOut { out, back } => out.is_empty() && back.is_empty(),
            Change::Horizon(_) | Change::SettledRange(..) => false,
        }
    }
}

/// The commands for a batch of changes, in the order they apply: every
/// return (one each, repeats counted), then what is out with a client and
/// what came back unsent (each id as its last such change left it), then
/// the settled, then the largest horizon asked. The same state as the
/// changes applied one by one: a message's returns only add up, its last
/// hand-out or unsent return decides whether it is out, a settle ends it,
/// and the horizon only grows.
fn batch_commands(changes: Vec<Change>) -> Vec<QCommand> {
    let (mut returned, mut settled, mut horizon) = (Vec::new(), Vec::new(), None);
    // Per id, whether it is out after its last change of the batch.
    let mut last: BTreeMap<u64, bool> = BTreeMap::new();
    for change in changes {
        match change {
            Change::Returned(ids) => {
                for id in ids {
                    last.remove(&id);
                    returned.push(id);
                }
            }
            Change::Settled(ids) => settled.extend(ids),
            Change::SettledRange(from, to) => {
                debug_assert!(false, "unexpanded range {from}..{to}");
            }
            Change::CheckedOut { out, back } => {
                last.extend(back.into_iter().map(|id| (id, false)));
                last.extend(out.into_iter().map(|id| (id, true)));
            }
            Change::Horizon(h) => horizon = horizon.max(Some(h)),
        }
    }
    let (mut out, mut back) = (Vec::new(), Vec::new());
    for (id, is_out) in last {
        if is_out {
            out.push(id);
        } else {
            back.push(id);
        }
    }
    let mut cmds = Vec::new();
    if !returned.is_empty() {
        cmds.push(QCommand::Return(returned));
    }
    if !out.is_empty() || !back.is_empty() {
        cmds.push(QCommand::Checkout { out, back });
    }
    if !settled.is_empty() {
        cmds.push(QCommand::Settle(settled));
    }
    cmds.extend(horizon.map(QCommand::Horizon));
    cmds
}

/// How many messages a new leader loads into its queue at a time.
const LOAD_BATCH: usize = 4096;

/// Bytes of bodies let go of after which a group's watch loop gives the
/// freed memory back to the system
/// ([`crate::broker::memory::give_back_freed`]).
const GIVE_BACK_AT: u64 = 32 << 20;

/// How many log entries past the messages it covers a delivery horizon
/// reaches ([`Replica::horizon_after`]): consumers keep going for that many
/// entries' messages (batches of publishes) while the next horizon commits
/// (asked half-way); after a failover, at most the messages of that many
/// entries (and [`crate::broker::queue::HORIZON_AHEAD`]) come flagged
/// redelivered without having gone out.
const HORIZON_ENTRIES: u64 = 64;

/// Propose the changes the serving queue reported, a round at a time
/// (whatever arrived meanwhile, as [`batch_commands`]: one round in flight,
/// so that a busy queue makes few, large rounds), and answer a round's
/// delivery horizon to the queue: committed once all its commands
/// committed (deliveries that waited for it go out), else not (it is asked
/// again).
async fn settle_loop(g: Weak<Group>, raft: Raft, mut rx: mpsc::UnboundedReceiver<(u64, Change)>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while let Ok(change) = rx.try_recv() {
            batch.push(change);
        }
        let Some(group) = g.upgrade() else { return };
        group.not_transferring().await;
        let epoch = group.epoch.load(Ordering::Acquire);
        if !group.is_serving() {
            // The next leader has them (and redelivers what went out).
            continue;
        }
        let within = group.commit_timeout;
        drop(group);
        // Those of an earlier spell of serving are dropped: the queue was
        // emptied and loaded again from the group's state since.
        let Some(group) = g.upgrade() else { return };
        let changes: Vec<Change> = batch
            .into_iter()
            .filter(|(e, _)| *e == epoch)
            .map(|(_, c)| group.expand(c))
            .collect();
        drop(group);
        let cmds = batch_commands(changes);
        let horizon = cmds.iter().find_map(|c| match c {
            QCommand::Horizon(h) => Some(*h),
            _ => None,
        });
        // Handed to the Raft core in order (one commit can carry them all),
        // then their commits awaited.
        let mut committed = true;
        let mut proposed = Vec::new();
        for cmd in cmds {
            let what = cmd.to_string();
            match tokio::time::timeout(within, raft.client_write_ff(cmd)).await {
                Ok(Ok(answer)) => proposed.push((what, answer)),
                _ => {
                    tracing::debug!(%what, "quorum queue change not proposed");
                    committed = false;
                    break;
                }
            }
        }
        for (what, answer) in proposed {
            match tokio::time::timeout(within, answer).await {
                Ok(Ok(Ok(_))) => {}
                Ok(Ok(Err(e))) => {
                    committed = false;
                    tracing::debug!(error = %e, %what, "quorum queue change not committed")
                }
                _ => {
                    committed = false;
                    tracing::debug!(%what, "quorum queue change not committed in time")
                }
            }
        }
        let Some(h) = horizon else {
            continue;
        };
        // Still the same spell of serving: else the queue was emptied (its
        // consumers cancelled) and what waited for it is gone.
        let Some(group) = g.upgrade() else { return };
        let queue = group.served_queue();
        let still = group.is_serving() && group.epoch.load(Ordering::Acquire) == epoch;
        drop(group);
        if let (true, Some(queue)) = (still, queue) {
            queue.horizon_answered(h, committed, crate::clock::now_ms());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_of_changes_proposes_the_state_they_make_one_by_one() {
        let out = |ids: &[u64]| Change::CheckedOut {
            out: ids.to_vec(),
            back: vec![],
        };
        let back = |ids: &[u64]| Change::CheckedOut {
            out: vec![],
            back: ids.to_vec(),
        };
        let changes = vec![
            out(&[1, 2, 3, 4]),
            Change::Returned(vec![1]),
            out(&[1]),
            Change::Returned(vec![1, 2]),
            back(&[3]),
            Change::Horizon(9),
            Change::Settled(vec![4]),
            out(&[5]),
            Change::Horizon(3),
        ];
        let cmds = batch_commands(changes);
        assert_eq!(
            cmds,
            vec![
                QCommand::Return(vec![1, 1, 2]),
                QCommand::Checkout {
                    out: vec![4, 5],
                    back: vec![3]
                },
                QCommand::Settle(vec![4]),
                QCommand::Horizon(9),
            ]
        );
        // Applied, the same as the changes one by one would leave it.
        let mut s = super::super::command::QState::default();
        let batch: Vec<QMsg> = (0..6)
            .map(|i| {
                QMsg::of(&crate::broker::message::Message::new(
                    "",
                    "q",
                    crate::wire::BasicProperties::default(),
                    bytes::Bytes::from(vec![i]),
                ))
            })
            .collect();
        s.apply(0, &QCommand::Enqueue(batch));
        for (i, c) in cmds.iter().enumerate() {
            s.apply(i as u64 + 1, c);
        }
        assert_eq!(s.out, BTreeSet::from([5]));
        assert_eq!((s.returns(1), s.returns(2), s.returns(3)), (2, 1, 0));
        assert!(!s.messages.contains_key(&4));
        // Nothing to propose for nothing; settles alone stay alone.
        assert!(batch_commands(vec![]).is_empty());
        assert_eq!(
            batch_commands(vec![Change::Settled(vec![7])]),
            vec![QCommand::Settle(vec![7])]
        );
    }
}
