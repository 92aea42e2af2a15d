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
//! loading paged-out messages a consumer waits for (then delivery goes on under the
//! lock), and dead letters (routed to other queues, so queues never lock each
//! other). A persistent message's record is encoded before the lock is taken.

pub mod args;
pub mod consumer;
pub mod dead_letter;
pub mod ready;
#[cfg(test)]
mod tests;

pub use args::{Overflow, QueueArgs};
pub use consumer::{Consumer, Credit, Delivery, DeliverySink};
pub use dead_letter::Reason;

use crate::broker::message::{paged_placeholder, Entry, MemoryBudget, Message};
use crate::broker::vhost::{PublishFrom, VHost};
use crate::error::{AmqpError, AmqpResult};
use crate::storage::{EncodedMessage, MessageOp, MessageParts, Store, StoredMessage};
use crate::wire::FieldTable;
use parking_lot::{Mutex, MutexGuard};
use ready::Ready;
use std::sync::{Arc, Weak};

/// How many paged-out messages at the head are loaded in one go for delivery.
const PAGE_IN_BATCH: usize = 32;

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
    /// Where persistent messages of a durable queue are written.
    store: Option<QueueStore>,
    /// Resident message bytes broker-wide; past its limit persistent messages page out.
    budget: Arc<MemoryBudget>,
    state: Mutex<State>,
}

/// A durable queue's handle on the message store.
#[derive(Debug)]
struct QueueStore {
    store: Store,
    /// The queue's key in the store: `vhost \0 name`.
    key: String,
    /// Held from before the state lock is released until this operation's store
    /// operations are submitted: the store sees them in the queue's order, and a
    /// reader that takes it knows every earlier write was submitted. Lock order:
    /// `state`, then `order`.
    order: Mutex<()>,
}

/// What happened to a published message at one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// Accepted; `durable`: written to the store (confirm after the next flush).
    Accepted { durable: bool },
    /// Refused by `x-overflow` reject-publish(-dlx).
    Rejected,
}

#[derive(Debug)]
struct State {
    ready: Ready,
    /// Messages handed to consumers (or basic.get) and not yet acked.
    unacked: usize,
    /// Sorted by priority, highest first; round-robin within a priority.
    consumers: Vec<Arc<Consumer>>,
    next_consumer: usize,
    next_seq: u64,
    /// A consumer was ever attached (auto-delete only applies after that).
    had_consumer: bool,
    deleted: bool,
    /// Some ready message may carry an expiry.
    may_expire: bool,
    /// Last time the queue was used (for `x-expires`), ms since the epoch.
    last_used: u64,
}

/// Counters of a queue, for declare-ok and the admin API.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub ready: usize,
    pub unacked: usize,
    pub consumers: usize,
    pub ready_bytes: usize,
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
}

impl Queue {
    /// A queue; `store` is given for durable queues, whose persistent messages it
    /// keeps. `now` starts its `x-expires` clock.
    pub fn new(
        spec: QueueSpec,
        args: QueueArgs,
        vhost: Weak<VHost>,
        store: Option<Store>,
        budget: Arc<MemoryBudget>,
        now: u64,
    ) -> Arc<Queue> {
        let max_priority = args.max_priority;
        let store = store.map(|store| QueueStore {
            key: store_key(&spec.vhost, &spec.name),
            store,
            order: Mutex::new(()),
        });
        Arc::new(Queue {
            spec,
            args: parking_lot::RwLock::new(Arc::new(args)),
            counters: Default::default(),
            vhost,
            store,
            budget: Arc::clone(&budget),
            state: Mutex::new(State {
                ready: Ready::new(max_priority, budget),
                unacked: 0,
                consumers: Vec::new(),
                next_consumer: 0,
                next_seq: 1,
                had_consumer: false,
                deleted: false,
                may_expire: false,
                last_used: now,
            }),
        })
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// The counters as of `now` (messages due by then are expired first).
    pub fn stats(&self, now: u64) -> QueueStats {
        let mut fx = Effects::default();
        let mut s = self.state.lock();
        self.expire_locked(&mut s, now, &mut fx);
        let stats = QueueStats {
            ready: s.ready.len(),
            unacked: s.unacked,
            consumers: s.consumers.len(),
            ready_bytes: s.ready.bytes(),
        };
        self.finish(s, fx, now);
        stats
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
            Some(owner) if owner != connection => Err(AmqpError::resource_locked(format!(
                "cannot obtain exclusive access to locked queue '{}' in vhost '{}'. It could be \
                 originally declared on another connection or the exclusive property value does \
                 not match that of the original declaration.",
                self.spec.name, self.spec.vhost
            ))),
            _ => Ok(()),
        }
    }

    /// Add a message published at `now` and deliver what can be delivered.
    pub fn enqueue(self: &Arc<Self>, message: Arc<Message>, now: u64) -> Enqueued {
        let args = self.args();
        let ttl = match (args.message_ttl, message.ttl()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let expires_at = ttl.map(|t| now.saturating_add(t));
        // The costly part of a durable write (copying the body) happens unlocked.
        let record = match &self.store {
            Some(_) if message.is_persistent() => Some(encode(&message, false, expires_at)),
            _ => None,
        };
        let mut fx = Effects::default();
        let mut s = self.state.lock();
        if s.deleted {
            return Enqueued::Accepted { durable: false };
        }
        let size = message.size();
        let full = args.max_length.is_some_and(|m| s.ready.len() as u64 >= m)
            || args
                .max_length_bytes
                .is_some_and(|m| (s.ready.bytes() + size) as u64 > m);
        let seq = s.next_seq;
        s.next_seq += 1;
        let mut entry = Entry::new(seq, message, expires_at);
        crate::broker::Counters::add(&self.counters.published, 1);
        let outcome = if full && args.overflow != Overflow::DropHead {
            if args.overflow == Overflow::RejectPublishDlx {
                fx.dead.push((entry, Reason::MaxLen));
            }
            Enqueued::Rejected
        } else {
            if let Some(record) = record {
                fx.ops.push(MessageOp::Insert { seq, record });
                entry.persisted = true;
                if self.budget.over(entry.size()) {
                    page_out(&mut entry);
                }
            }
            let durable = entry.persisted;
            s.may_expire |= entry.expires_at.is_some();
            s.ready.push_back(entry);
            // As RabbitMQ: a waiting consumer takes the message before the length
            // limit applies (max-length 0 still reaches a consumer).
            self.dispatch_locked(&mut s, now, &mut fx);
            self.enforce_limits(&mut s, &args, &mut fx);
            // TTL 0: what no consumer took at once expires now.
            self.expire_locked(&mut s, now, &mut fx);
            Enqueued::Accepted { durable }
        };
        self.settle(s, fx, now);
        outcome
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
            match s.ready.pop() {
                Some(e) => self.discard(e, Reason::MaxLen, args, fx),
                None => return,
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

    /// Drop (dead-letter) messages at the head due by `now`, as RabbitMQ does.
    fn expire_locked(&self, s: &mut State, now: u64, fx: &mut Effects) {
        if !s.may_expire {
            return;
        }
        let mut args = None;
        while let Some(head) = s.ready.peek() {
            match head.expires_at {
                Some(at) if at <= now => {
                    if let Some(e) = s.ready.pop() {
                        let args = args.get_or_insert_with(|| self.args());
                        self.discard(e, Reason::Expired, args, fx);
                    }
                }
                _ => break,
            }
        }
        if s.ready.is_empty() {
            s.may_expire = false;
        }
    }

    /// Periodic work at `now`: expire messages at the head. Returns true if the
    /// queue itself has expired (`x-expires`) and should be deleted.
    pub fn tick(self: &Arc<Self>, now: u64) -> bool {
        let mut fx = Effects::default();
        let mut s = self.state.lock();
        self.expire_locked(&mut s, now, &mut fx);
        let expired = self
            .args()
            .expires
            .is_some_and(|ttl| s.consumers.is_empty() && now.saturating_sub(s.last_used) >= ttl);
        self.finish(s, fx, now);
        expired
    }

    /// Whether `tick` has anything to do for this queue.
    pub fn needs_tick(&self) -> bool {
        let args = self.args();
        args.expires.is_some() || args.message_ttl.is_some() || self.state.lock().may_expire
    }

    /// Deliver ready messages to consumers with credit.
    pub fn dispatch(self: &Arc<Self>, now: u64) {
        let mut fx = Effects::default();
        let mut s = self.state.lock();
        self.dispatch_locked(&mut s, now, &mut fx);
        self.settle(s, fx, now);
    }

    fn dispatch_locked(self: &Arc<Self>, s: &mut State, now: u64, fx: &mut Effects) {
        let single_active = self.args().single_active_consumer;
        // A message due exactly now is still delivered to a consumer waiting for it
        // (TTL 0 reaches a waiting consumer; the caller expires what is left), but
        // after the first delivery, as RabbitMQ's fetch, what is due now expires.
        let mut cutoff = now.saturating_sub(1);
        while !s.ready.is_empty() && !s.consumers.is_empty() && !s.deleted {
            self.expire_locked(s, cutoff, fx);
            cutoff = now;
            let paged = match s.ready.peek() {
                None => return,
                Some(head) => head.paged.is_some(),
            };
            let Some(idx) = pick_consumer(s, single_active) else {
                return;
            };
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
                s.unacked += 1;
            }
            crate::broker::Counters::add(&self.counters.delivered, 1);
            if entry.redelivered {
                crate::broker::Counters::add(&self.counters.redelivered, 1);
            }
            self.handed_out(&entry, consumer.no_ack, fx);
            let delivery = Delivery {
                channel: consumer.channel,
                consumer_tag: Arc::clone(&consumer.tag),
                queue: Arc::clone(self),
                entry,
                no_ack: consumer.no_ack,
            };
            if let Err(back) = consumer.sink.deliver(delivery) {
                // The connection is gone: take the message back and drop the consumer.
                consumer.give_back_credit();
                if !consumer.no_ack {
                    s.unacked -= 1;
                }
                s.ready.requeue(back.entry);
                s.consumers.retain(|c| !Arc::ptr_eq(c, &consumer));
            }
        }
    }

    /// basic.get at `now`: the next message and how many remain. Counted unacked
    /// unless `no_ack`.
    pub fn get(&self, no_ack: bool, now: u64) -> Option<(Entry, usize)> {
        loop {
            let mut fx = Effects::default();
            let mut s = self.state.lock();
            s.last_used = now;
            self.expire_locked(&mut s, now, &mut fx);
            if s.ready.peek().is_some_and(|e| e.paged.is_some()) {
                // Load it with the lock released, then try again.
                let seqs = paged_heads(&s, 1);
                self.release(s, &mut fx, true);
                let loaded = self.load(&seqs);
                let mut s = self.state.lock();
                self.install(&mut s, loaded);
                self.finish(s, fx, now);
                continue;
            }
            let entry = s.ready.pop();
            if let Some(e) = &entry {
                if !no_ack {
                    s.unacked += 1;
                }
                crate::broker::Counters::add(&self.counters.delivered, 1);
                self.handed_out(e, no_ack, &mut fx);
            }
            // The count leaves out what has expired behind the head (RabbitMQ's fetch).
            self.expire_locked(&mut s, now, &mut fx);
            let got = entry.map(|e| (e, s.ready.len()));
            self.finish(s, fx, now);
            return got;
        }
    }

    /// Unacked messages were acked: they are gone for good.
    pub fn ack(&self, entries: &[Entry]) {
        crate::broker::Counters::add(&self.counters.acked, entries.len() as u64);
        let mut fx = Effects::default();
        for e in entries {
            self.forget(e, &mut fx);
        }
        let mut s = self.state.lock();
        s.unacked = s.unacked.saturating_sub(entries.len());
        self.release(s, &mut fx, false);
    }

    /// Unacked messages were rejected at `now` without requeue: drop and
    /// dead-letter them.
    pub fn reject(&self, entries: Vec<Entry>, now: u64) {
        let args = self.args();
        let mut fx = Effects::default();
        let mut s = self.state.lock();
        s.unacked = s.unacked.saturating_sub(entries.len());
        for e in entries {
            self.discard(e, Reason::Rejected, &args, &mut fx);
        }
        self.finish(s, fx, now);
    }

    /// A message left the queue for good: remove it from the store.
    fn forget(&self, e: &Entry, fx: &mut Effects) {
        if e.persisted && self.store.is_some() {
            fx.ops.push(MessageOp::Remove { seq: e.seq });
        }
    }

    /// A message went to a consumer or basic.get: without ack it is gone; with ack
    /// it must come back redelivered after a restart.
    fn handed_out(&self, e: &Entry, no_ack: bool, fx: &mut Effects) {
        if !e.persisted {
            return;
        }
        if no_ack {
            self.forget(e, fx);
        } else if !e.redelivered && self.store.is_some() {
            fx.ops.push(MessageOp::MarkRedelivered { seq: e.seq });
        }
    }

    /// Put recovered messages (from the store) back, in order.
    pub fn restore(&self, messages: Vec<(u64, StoredMessage)>) -> usize {
        let mut s = self.state.lock();
        let n = messages.len();
        for (seq, m) in messages {
            let (expires_at, redelivered) = (m.expires_at, m.redelivered);
            let Some(message) = self.stored_message(seq, m) else {
                continue;
            };
            s.next_seq = s.next_seq.max(seq + 1);
            s.may_expire |= expires_at.is_some();
            let mut entry = Entry::new(seq, message, expires_at);
            entry.redelivered = redelivered;
            entry.persisted = true;
            if self.budget.over(entry.size()) {
                page_out(&mut entry);
            }
            s.ready.push_back(entry);
        }
        n
    }

    /// Put messages back at their original positions, at `now`.
    /// `were_unacked`: they were counted unacked (false for deliveries never sent);
    /// `redelivered`: mark them redelivered (they reached the client).
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
        let mut fx = Effects::default();
        let mut s = self.state.lock();
        if were_unacked {
            s.unacked = s.unacked.saturating_sub(entries.len());
        }
        if s.deleted {
            return;
        }
        for mut entry in entries {
            entry.redelivered |= redelivered;
            s.may_expire |= entry.expires_at.is_some();
            s.ready.requeue(entry);
        }
        // RabbitMQ applies drop-head on requeue too: the requeued head may go.
        let args = self.args();
        if args.overflow == Overflow::DropHead {
            self.enforce_limits(&mut s, &args, &mut fx);
        }
        // A requeued message already past (or at) its expiry is dead, not handed out again.
        self.expire_locked(&mut s, now, &mut fx);
        self.dispatch_locked(&mut s, now, &mut fx);
        self.settle(s, fx, now);
    }

    /// Attach a consumer at `now` and start delivering to it.
    pub fn add_consumer(self: &Arc<Self>, consumer: Arc<Consumer>, now: u64) -> AmqpResult<()> {
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
        let args = Arc::new(args);
        *self.args.write() = Arc::clone(&args);
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
        let mut fx = Effects::default();
        let mut s = self.state.lock();
        let drained = s.ready.drain();
        for e in &drained {
            self.forget(e, &mut fx);
        }
        self.release(s, &mut fx, false);
        drained.len()
    }

    /// Mark deleted, drop the ready messages, and return the consumers to notify and
    /// how many messages were ready.
    pub fn delete(&self) -> (Vec<Arc<Consumer>>, usize) {
        let mut fx = Effects::default();
        let mut s = self.state.lock();
        s.deleted = true;
        let n = s.ready.len();
        s.ready.drain();
        if self.store.is_some() {
            fx.ops.push(MessageOp::DeleteQueue);
        }
        let consumers = std::mem::take(&mut s.consumers);
        self.release(s, &mut fx, false);
        (consumers, n)
    }

    /// Release the lock and submit the store operations gathered under it, in the
    /// queue's order. `barrier`: the caller reads the store next, so first let
    /// earlier operations of the queue be submitted (dead letters to be removed
    /// later need that too: a paged-out body is read before its removal).
    fn release(&self, s: MutexGuard<'_, State>, fx: &mut Effects, barrier: bool) {
        let Some(qs) = &self.store else {
            return;
        };
        if fx.ops.is_empty() && !barrier && !fx.dead.iter().any(|(e, _)| e.persisted) {
            return;
        }
        submit_in_order(qs, s, std::mem::take(&mut fx.ops));
    }

    /// Release the lock, submit store operations and route dead letters.
    fn finish(&self, s: MutexGuard<'_, State>, mut fx: Effects, now: u64) {
        self.release(s, &mut fx, false);
        self.dead_letter(fx.dead, now);
    }

    /// Like [`finish`](Self::finish), and while a consumer waits for paged-out
    /// messages, load them (lock released) and deliver on.
    fn settle<'a>(self: &'a Arc<Self>, mut s: MutexGuard<'a, State>, mut fx: Effects, now: u64) {
        while fx.page_in {
            fx.page_in = false;
            let seqs = paged_heads(&s, PAGE_IN_BATCH);
            self.release(s, &mut fx, true);
            let loaded = self.load(&seqs);
            s = self.state.lock();
            self.install(&mut s, loaded);
            self.dispatch_locked(&mut s, now, &mut fx);
        }
        self.finish(s, fx, now);
    }

    /// Read paged-out messages from the store (no lock held). `None` for one the
    /// store does not have (removed meanwhile, or lost).
    fn load(&self, seqs: &[u64]) -> Vec<(u64, Option<Arc<Message>>)> {
        seqs.iter().map(|&seq| (seq, self.load_one(seq))).collect()
    }

    fn load_one(&self, seq: u64) -> Option<Arc<Message>> {
        let qs = self.store.as_ref()?;
        match qs.store.get_message(&qs.key, seq) {
            Ok(Some(m)) => self.stored_message(seq, m),
            Ok(None) => None,
            Err(err) => {
                tracing::error!(queue = %self.spec.name, seq, error = %err, "cannot page a message in");
                None
            }
        }
    }

    /// The message a stored record holds; `None` (logged) if its properties do not
    /// decode.
    fn stored_message(&self, seq: u64, m: StoredMessage) -> Option<Arc<Message>> {
        match crate::wire::BasicProperties::decode(&m.properties) {
            Ok(properties) => Some(Message::new(m.exchange, m.routing_key, properties, m.body)),
            Err(err) => {
                tracing::error!(queue = %self.spec.name, seq, error = %err, "unreadable stored properties; message skipped");
                None
            }
        }
    }

    /// Put loaded messages back into their paged-out entries. An entry the store
    /// did not have is dropped (a bug if it is still queued: logged).
    fn install(&self, s: &mut State, loaded: Vec<(u64, Option<Arc<Message>>)>) {
        for (seq, message) in loaded {
            match message {
                Some(m) => {
                    s.ready.page_in(seq, m);
                }
                None => {
                    if s.ready.remove(seq).is_some() {
                        tracing::error!(queue = %self.spec.name, seq, "paged-out message missing from the store; dropped");
                    }
                }
            }
        }
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
        for (entry, reason) in dead {
            if entry.persisted && self.store.is_some() {
                removes.push(MessageOp::Remove { seq: entry.seq });
            }
            let Some((dlx, vhost)) = &target else {
                continue;
            };
            let message = match entry.paged {
                Some(_) => match self.load_one(entry.seq) {
                    Some(m) => m,
                    None => continue,
                },
                None => entry.message,
            };
            let m = dead_letter::dead_letter(&message, self.name(), reason, dlx, key, now / 1000);
            // A missing dead-letter exchange drops the message, as in RabbitMQ.
            let _ = vhost.publish(dlx, &m, PublishFrom::DeadLetter, now);
        }
        if let (false, Some(qs)) = (removes.is_empty(), &self.store) {
            // In the queue's order, unless it was deleted meanwhile (its deletion
            // removed them, and a new queue of the same name may reuse the seqs).
            let s = self.state.lock();
            if s.deleted {
                return;
            }
            submit_in_order(qs, s, removes);
        }
    }
}

/// Release a queue's state lock and submit `ops` (if any) in the queue's order: its
/// submit lock is taken before the state lock goes, and held until they are buffered.
fn submit_in_order(qs: &QueueStore, s: MutexGuard<'_, State>, ops: Vec<MessageOp>) {
    let order = qs.order.lock();
    drop(s);
    if !ops.is_empty() {
        qs.store.submit(&qs.key, ops);
    }
    drop(order);
}

/// The seqs of paged-out entries among the first `n` in delivery order.
fn paged_heads(s: &State, n: usize) -> Vec<u64> {
    s.ready
        .iter()
        .take(n)
        .filter(|e| e.paged.is_some())
        .map(|e| e.seq)
        .collect()
}

/// Drop an entry's body from memory; the store has it.
fn page_out(e: &mut Entry) {
    e.paged = Some(u32::try_from(e.message.size()).unwrap_or(u32::MAX));
    e.message = paged_placeholder();
}

/// The store key of a queue.
pub fn store_key(vhost: &str, name: &str) -> String {
    format!("{vhost}\0{name}")
}

/// The store record of a message.
fn encode(m: &Message, redelivered: bool, expires_at: Option<u64>) -> EncodedMessage {
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
