//! Queues: ready messages, unacked accounting, consumers and delivery, and the
//! RabbitMQ queue semantics on top (TTL, expiry, length limits, dead-lettering,
//! single active consumer).
//!
//! A queue is an `Arc<Queue>` with its state behind its own mutex: publishers on
//! different queues never contend, and no lock is held across an await. Delivery
//! tags are not known here (the channel owns them): a queue hands a [`Delivery`] to
//! the consumer's [`DeliverySink`] and counts it unacked until the channel acks,
//! rejects or requeues it. Dead letters are collected under the lock and routed
//! after it is released, so queues never lock each other.

pub mod args;
pub mod consumer;
pub mod dead_letter;
pub mod ready;

pub use args::{Overflow, QueueArgs};
pub use consumer::{Consumer, Credit, Delivery, DeliverySink};
pub use dead_letter::Reason;

use crate::broker::message::{now_ms, paged_placeholder, Entry, MemoryBudget, Message};
use crate::broker::vhost::{PublishFrom, VHost};
use crate::error::{AmqpError, AmqpResult};
use crate::storage::{Store, StoredMessage};
use crate::wire::FieldTable;
use parking_lot::Mutex;
use ready::Ready;
use std::sync::{Arc, Weak};

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

/// Dead letters gathered under the lock, routed once it is released.
type DeadLetters = Vec<(Entry, Reason)>;

impl Queue {
    /// A queue; `store` is given for durable queues, whose persistent messages it keeps.
    pub fn new(
        spec: QueueSpec,
        args: QueueArgs,
        vhost: Weak<VHost>,
        store: Option<Store>,
        budget: Arc<MemoryBudget>,
    ) -> Arc<Queue> {
        let max_priority = args.max_priority;
        let store = store.map(|store| QueueStore {
            key: store_key(&spec.vhost, &spec.name),
            store,
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
                last_used: now_ms(),
            }),
        })
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    pub fn stats(&self) -> QueueStats {
        let mut dead = DeadLetters::new();
        let stats = {
            let mut s = self.state.lock();
            self.expire_locked(&mut s, now_ms(), &mut dead);
            QueueStats {
                ready: s.ready.len(),
                unacked: s.unacked,
                consumers: s.consumers.len(),
                ready_bytes: s.ready.bytes(),
            }
        };
        self.dead_letter(dead);
        stats
    }

    pub fn is_deleted(&self) -> bool {
        self.state.lock().deleted
    }

    /// Mark the queue used now (declare, get, consume) for `x-expires`.
    pub fn touch(&self) {
        self.state.lock().last_used = now_ms();
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

    /// Add a published message and deliver what can be delivered.
    pub fn enqueue(self: &Arc<Self>, message: Arc<Message>) -> Enqueued {
        let now = now_ms();
        let args = self.args();
        let mut dead = DeadLetters::new();
        let accepted = {
            let mut s = self.state.lock();
            if s.deleted {
                return Enqueued::Accepted { durable: false };
            }
            let ttl = match (args.message_ttl, message.ttl()) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let size = message.size();
            let full = args.max_length.is_some_and(|m| s.ready.len() as u64 >= m)
                || args
                    .max_length_bytes
                    .is_some_and(|m| (s.ready.bytes() + size) as u64 > m);
            let seq = s.next_seq;
            s.next_seq += 1;
            let mut entry = Entry::new(seq, message, ttl.map(|t| now.saturating_add(t)));
            crate::broker::Counters::add(&self.counters.published, 1);
            if full && args.overflow != Overflow::DropHead {
                if args.overflow == Overflow::RejectPublishDlx {
                    dead.push((entry, Reason::MaxLen));
                }
                Enqueued::Rejected
            } else {
                if let Some(qs) = &self.store {
                    if entry.message.is_persistent() {
                        qs.store.insert_message(&qs.key, seq, &stored(&entry));
                        entry.persisted = true;
                        if self.budget.over(entry.size()) {
                            page_out(&mut entry);
                        }
                    }
                }
                let durable = entry.persisted;
                s.may_expire |= entry.expires_at.is_some();
                s.ready.push_back(entry);
                self.enforce_limits(&mut s, &mut dead);
                self.dispatch_locked(&mut s, now, &mut dead);
                // TTL 0: what no consumer took at once expires now.
                self.expire_locked(&mut s, now, &mut dead);
                Enqueued::Accepted { durable }
            }
        };
        self.dead_letter(dead);
        accepted
    }

    /// drop-head: remove the oldest messages until the limits hold.
    fn enforce_limits(&self, s: &mut State, dead: &mut DeadLetters) {
        let args = self.args();
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
                Some(e) => {
                    let Some(e) = self.page_in(e) else { continue };
                    self.forget(&e);
                    dead.push((e, Reason::MaxLen));
                }
                None => return,
            }
        }
    }

    /// Drop (dead-letter) expired messages at the head, as RabbitMQ does.
    fn expire_locked(&self, s: &mut State, now: u64, dead: &mut DeadLetters) {
        if !s.may_expire {
            return;
        }
        while let Some(head) = s.ready.peek() {
            match head.expires_at {
                Some(at) if at <= now => {
                    if let Some(e) = s.ready.pop().and_then(|e| self.page_in(e)) {
                        self.forget(&e);
                        dead.push((e, Reason::Expired));
                    }
                }
                _ => break,
            }
        }
        if s.ready.is_empty() {
            s.may_expire = false;
        }
    }

    /// Periodic work: expire messages at the head. Returns true if the queue itself
    /// has expired (`x-expires`) and should be deleted.
    pub fn tick(self: &Arc<Self>, now: u64) -> bool {
        let mut dead = DeadLetters::new();
        let expired = {
            let mut s = self.state.lock();
            self.expire_locked(&mut s, now, &mut dead);
            self.args()
                .expires
                .is_some_and(|ttl| s.consumers.is_empty() && now.saturating_sub(s.last_used) >= ttl)
        };
        self.dead_letter(dead);
        expired
    }

    /// Whether `tick` has anything to do for this queue.
    pub fn needs_tick(&self) -> bool {
        let args = self.args();
        args.expires.is_some() || args.message_ttl.is_some() || self.state.lock().may_expire
    }

    /// Deliver ready messages to consumers with credit.
    pub fn dispatch(self: &Arc<Self>) {
        let mut dead = DeadLetters::new();
        {
            let mut s = self.state.lock();
            self.dispatch_locked(&mut s, now_ms(), &mut dead);
        }
        self.dead_letter(dead);
    }

    fn dispatch_locked(self: &Arc<Self>, s: &mut State, now: u64, dead: &mut DeadLetters) {
        let single_active = self.args().single_active_consumer;
        while !s.ready.is_empty() && !s.consumers.is_empty() && !s.deleted {
            // A message due exactly now is still delivered: TTL 0 reaches a waiting
            // consumer (the caller expires what is left).
            self.expire_locked(s, now.saturating_sub(1), dead);
            if s.ready.is_empty() {
                return;
            }
            let Some(idx) = pick_consumer(s, single_active) else {
                return;
            };
            let Some(entry) = s.ready.pop() else {
                return;
            };
            let Some(entry) = self.page_in(entry) else {
                consumer_give_back(&s.consumers[idx]);
                continue;
            };
            let consumer = Arc::clone(&s.consumers[idx]);
            if !consumer.no_ack {
                s.unacked += 1;
            }
            crate::broker::Counters::add(&self.counters.delivered, 1);
            if entry.redelivered {
                crate::broker::Counters::add(&self.counters.redelivered, 1);
            }
            self.handed_out(&entry, consumer.no_ack);
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

    /// basic.get: the next message and how many remain. Counted unacked unless `no_ack`.
    pub fn get(&self, no_ack: bool) -> Option<(Entry, usize)> {
        let mut dead = DeadLetters::new();
        let got = {
            let mut s = self.state.lock();
            let now = now_ms();
            s.last_used = now;
            self.expire_locked(&mut s, now, &mut dead);
            let mut entry = s.ready.pop();
            while let Some(e) = entry {
                match self.page_in(e) {
                    Some(e) => {
                        entry = Some(e);
                        break;
                    }
                    None => entry = s.ready.pop(),
                }
            }
            if entry.is_some() && !no_ack {
                s.unacked += 1;
            }
            if let Some(e) = &entry {
                crate::broker::Counters::add(&self.counters.delivered, 1);
                self.handed_out(e, no_ack);
            }
            entry.map(|e| (e, s.ready.len()))
        };
        self.dead_letter(dead);
        got
    }

    /// Unacked messages were acked: they are gone for good.
    pub fn ack(&self, entries: &[Entry]) {
        crate::broker::Counters::add(&self.counters.acked, entries.len() as u64);
        for e in entries {
            self.forget(e);
        }
        let mut s = self.state.lock();
        s.unacked = s.unacked.saturating_sub(entries.len());
    }

    /// Unacked messages were rejected without requeue: drop and dead-letter them.
    pub fn reject(&self, entries: Vec<Entry>) {
        for e in &entries {
            self.forget(e);
        }
        {
            let mut s = self.state.lock();
            s.unacked = s.unacked.saturating_sub(entries.len());
        }
        self.dead_letter(entries.into_iter().map(|e| (e, Reason::Rejected)).collect());
    }

    /// Load a paged-out entry back from the store. `None` (logged) if the store no
    /// longer has it, which would be a bug: the entry is dropped.
    fn page_in(&self, mut e: Entry) -> Option<Entry> {
        if e.paged.is_none() {
            return Some(e);
        }
        let qs = self.store.as_ref()?;
        let loaded = match qs.store.get_message(&qs.key, e.seq) {
            Ok(Some(m)) => m,
            Ok(None) => {
                tracing::error!(queue = %self.spec.name, seq = e.seq, "paged-out message missing from the store");
                return None;
            }
            Err(err) => {
                tracing::error!(queue = %self.spec.name, seq = e.seq, error = %err, "cannot page a message in");
                return None;
            }
        };
        let properties = crate::wire::BasicProperties::decode(&loaded.properties).ok()?;
        e.message = Message::new(loaded.exchange, loaded.routing_key, properties, loaded.body);
        e.paged = None;
        Some(e)
    }

    /// A message left the queue for good: remove it from the store.
    fn forget(&self, e: &Entry) {
        if e.persisted {
            if let Some(qs) = &self.store {
                qs.store.remove_message(&qs.key, e.seq);
            }
        }
    }

    /// A message went to a consumer or basic.get: without ack it is gone; with ack
    /// it must come back redelivered after a restart.
    fn handed_out(&self, e: &Entry, no_ack: bool) {
        if !e.persisted {
            return;
        }
        if no_ack {
            self.forget(e);
        } else if !e.redelivered {
            if let Some(qs) = &self.store {
                qs.store.mark_redelivered(&qs.key, e.seq);
            }
        }
    }

    /// Put recovered messages (from the store) back, in order.
    pub fn restore(&self, messages: Vec<(u64, StoredMessage)>) -> usize {
        let mut s = self.state.lock();
        let n = messages.len();
        for (seq, m) in messages {
            let properties = match crate::wire::BasicProperties::decode(&m.properties) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(queue = %self.spec.name, seq, error = %e, "unreadable stored properties; message skipped");
                    continue;
                }
            };
            s.next_seq = s.next_seq.max(seq + 1);
            s.may_expire |= m.expires_at.is_some();
            let mut entry = Entry::new(
                seq,
                Message::new(m.exchange, m.routing_key, properties, m.body),
                m.expires_at,
            );
            entry.redelivered = m.redelivered;
            entry.persisted = true;
            if self.budget.over(entry.size()) {
                page_out(&mut entry);
            }
            s.ready.push_back(entry);
        }
        n
    }

    /// Put messages back at their original positions.
    /// `were_unacked`: they were counted unacked (false for deliveries never sent);
    /// `redelivered`: mark them redelivered (they reached the client).
    pub fn requeue(self: &Arc<Self>, entries: Vec<Entry>, were_unacked: bool, redelivered: bool) {
        if entries.is_empty() {
            return;
        }
        let mut dead = DeadLetters::new();
        {
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
            if self.args().overflow == Overflow::DropHead {
                self.enforce_limits(&mut s, &mut dead);
            }
            self.dispatch_locked(&mut s, now_ms(), &mut dead);
        }
        self.dead_letter(dead);
    }

    /// Attach a consumer and start delivering to it.
    pub fn add_consumer(self: &Arc<Self>, consumer: Arc<Consumer>) -> AmqpResult<()> {
        let mut dead = DeadLetters::new();
        {
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
            let now = now_ms();
            s.last_used = now;
            self.dispatch_locked(&mut s, now, &mut dead);
        }
        self.dead_letter(dead);
        Ok(())
    }

    /// Detach a consumer. Returns it, and whether the queue is now due for auto-delete.
    pub fn remove_consumer(
        self: &Arc<Self>,
        connection: u64,
        channel: u16,
        tag: &str,
    ) -> (Option<Arc<Consumer>>, bool) {
        let mut s = self.state.lock();
        let removed = s
            .consumers
            .iter()
            .position(|c| c.is(connection, channel, tag))
            .map(|i| s.consumers.remove(i));
        s.last_used = now_ms();
        let unused = self.spec.auto_delete && s.had_consumer && s.consumers.is_empty();
        if removed.is_some() && self.args().single_active_consumer && !unused {
            // The next consumer becomes active.
            let mut dead = DeadLetters::new();
            self.dispatch_locked(&mut s, now_ms(), &mut dead);
            drop(s);
            self.dead_letter(dead);
        }
        (removed.clone(), removed.is_some() && unused)
    }

    /// The effective arguments (declared, combined with the policy in force).
    pub fn args(&self) -> Arc<QueueArgs> {
        Arc::clone(&self.args.read())
    }

    /// A policy changed: run with `args` from now on, and apply new length limits at once.
    pub fn set_args(self: &Arc<Self>, args: QueueArgs) {
        *self.args.write() = Arc::new(args);
        let mut dead = DeadLetters::new();
        {
            let mut s = self.state.lock();
            self.enforce_limits(&mut s, &mut dead);
        }
        self.dead_letter(dead);
    }

    /// The attached consumers (for the admin API).
    pub fn consumers(&self) -> Vec<Arc<Consumer>> {
        self.state.lock().consumers.clone()
    }

    /// Remove every ready message; returns how many.
    pub fn purge(&self) -> usize {
        let mut s = self.state.lock();
        let drained = s.ready.drain();
        for e in &drained {
            self.forget(e);
        }
        drained.len()
    }

    /// Mark deleted, drop the ready messages, and return the consumers to notify and
    /// how many messages were ready.
    pub fn delete(&self) -> (Vec<Arc<Consumer>>, usize) {
        let mut s = self.state.lock();
        s.deleted = true;
        let n = s.ready.len();
        s.ready.drain();
        if let Some(qs) = &self.store {
            qs.store.delete_queue_messages(&qs.key);
        }
        (std::mem::take(&mut s.consumers), n)
    }

    /// Route dead letters to the dead-letter exchange (dropped if there is none).
    fn dead_letter(&self, dead: DeadLetters) {
        if dead.is_empty() {
            return;
        }
        let args = self.args();
        let Some(dlx) = args.dead_letter_exchange.as_deref() else {
            return;
        };
        let Some(vhost) = self.vhost.upgrade() else {
            return;
        };
        let now = now_ms();
        let key = args.dead_letter_routing_key.as_deref();
        for (entry, reason) in dead {
            let m =
                dead_letter::dead_letter(&entry.message, self.name(), reason, dlx, key, now / 1000);
            // A missing dead-letter exchange drops the message, as in RabbitMQ.
            let _ = vhost.publish(dlx, &m, PublishFrom::DeadLetter, now);
        }
    }
}

/// Drop an entry's body from memory; the store has it.
fn page_out(e: &mut Entry) {
    e.paged = Some(u32::try_from(e.message.size()).unwrap_or(u32::MAX));
    e.message = paged_placeholder();
}

/// Undo the credit taken for a delivery that could not be made.
fn consumer_give_back(c: &Consumer) {
    c.give_back_credit();
}

/// The store key of a queue.
pub fn store_key(vhost: &str, name: &str) -> String {
    format!("{vhost}\0{name}")
}

/// The stored form of an entry.
fn stored(e: &Entry) -> StoredMessage {
    let mut props = bytes::BytesMut::new();
    e.message.properties.encode(&mut props);
    StoredMessage {
        exchange: e.message.exchange.to_string(),
        routing_key: e.message.routing_key.to_string(),
        properties: props.freeze(),
        body: e.message.body.clone(),
        redelivered: e.redelivered,
        expires_at: e.expires_at,
    }
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
