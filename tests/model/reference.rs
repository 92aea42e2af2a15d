//! The reference: RabbitMQ's classic-queue semantics written as plainly as possible,
//! sharing no code with the broker. One channel, at most one consumer per queue.
//!
//! What it encodes (RabbitMQ docs: ttl, dlx, maxlength, priority, confirms; and the
//! classic queue process `rabbit_amqqueue_process`):
//! - A queue's ready messages are delivered highest priority level first (level =
//!   min(priority, x-max-priority), 0 without the property or in a plain queue), FIFO
//!   within a level. A requeued message goes back to its original position and is
//!   marked redelivered.
//! - Expiry (`now >= published + min(x-message-ttl, expiration)`) is applied at the
//!   head only: a message behind an unexpired head waits. The head is expired after
//!   every publish, fetch, requeue and whenever time passes; expired messages are
//!   dead-lettered with reason `expired`. A message goes straight to a waiting consumer
//!   without an expiry check (so TTL 0 reaches a consumer with room).
//! - Publish: if the queue would overflow (ready + 1 > x-max-length or ready bytes +
//!   size > x-max-length-bytes) and overflow is reject-publish(-dlx), the message is
//!   refused (publisher nack; -dlx dead-letters it with `maxlen`). Otherwise it goes to
//!   a consumer with room if there is one, else to the tail; then drop-head removes
//!   (dead-letters, `maxlen`) from the head while over a limit. Unacked messages do not
//!   count towards limits. Requeue applies drop-head too.
//! - Dead-lettering republishes to the DLX with the dead-letter routing key (or the
//!   message's own), `expiration` removed, `x-death` gaining (queue, reason) first.
//! - basic.get's message count is the ready count after the fetch (and its expiry).
//! - purge removes ready messages only, delete-ok counts ready messages; neither
//!   dead-letters.

use super::ops::*;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone)]
struct MMsg {
    msg: Msg,
    seq: u64,
    priority: Option<u8>,
    expires_at: Option<u64>,
}

impl MMsg {
    fn size(&self) -> u64 {
        self.msg.body.len() as u64
    }
}

#[derive(Debug)]
struct MConsumer {
    id: u64,
    prefetch: u32,
    no_ack: bool,
    in_flight: u32,
}

impl MConsumer {
    fn has_room(&self) -> bool {
        self.no_ack || self.prefetch == 0 || self.in_flight < self.prefetch
    }
}

#[derive(Debug)]
struct MQueue {
    args: QArgs,
    /// Ordered by (higher level first, then original position).
    ready: BTreeMap<(Reverse<u8>, u64), MMsg>,
    unacked: usize,
    consumer: Option<MConsumer>,
    next_seq: u64,
}

impl MQueue {
    fn new(args: QArgs) -> MQueue {
        MQueue {
            args,
            ready: BTreeMap::new(),
            unacked: 0,
            consumer: None,
            next_seq: 0,
        }
    }

    fn level(&self, m: &MMsg) -> u8 {
        match self.args.max_priority {
            Some(max) => m.priority.unwrap_or(0).min(max),
            None => 0,
        }
    }

    fn insert(&mut self, m: MMsg) {
        let key = (Reverse(self.level(&m)), m.seq);
        self.ready.insert(key, m);
    }

    fn pop_head(&mut self) -> Option<MMsg> {
        self.ready.pop_first().map(|(_, m)| m)
    }

    fn ready_bytes(&self) -> u64 {
        self.ready.values().map(MMsg::size).sum()
    }

    fn over_limit(&self) -> bool {
        self.args
            .max_length
            .is_some_and(|m| self.ready.len() as u64 > m)
            || self
                .args
                .max_length_bytes
                .is_some_and(|m| self.ready_bytes() > m)
    }

    fn would_overflow(&self, size: u64) -> bool {
        self.args
            .max_length
            .is_some_and(|m| self.ready.len() as u64 + 1 > m)
            || self
                .args
                .max_length_bytes
                .is_some_and(|m| self.ready_bytes() + size > m)
    }
}

/// A delivery the channel holds until it is settled.
#[derive(Debug)]
struct Held {
    queue: String,
    msg: MMsg,
    /// The consumer it went to (None: basic.get).
    consumer: Option<u64>,
}

#[derive(Debug)]
pub struct Model {
    now: u64,
    queues: BTreeMap<String, MQueue>,
    /// Bindings on [`EXCHANGE`]: (queue, key).
    bindings: BTreeSet<(String, String)>,
    outstanding: Vec<Held>,
    /// Deliveries of the current step (appended to `outstanding` when it ends).
    pushed: Vec<(Pushed, Option<Held>)>,
    next_consumer: u64,
}

/// How a settle step treats the messages it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    Ack,
    Requeue,
    Discard,
}

impl Model {
    /// The state after setup: the dead-letter queues exist, empty.
    pub fn new() -> Model {
        let mut queues = BTreeMap::new();
        for d in DLQS {
            queues.insert(d.to_string(), MQueue::new(QArgs::default()));
        }
        Model {
            now: T0,
            queues,
            bindings: BTreeSet::new(),
            outstanding: Vec::new(),
            pushed: Vec::new(),
            next_consumer: 0,
        }
    }

    pub fn declare(&mut self, name: &str, args: &QArgs) -> Reply {
        if let Some(q) = self.queues.get(name) {
            if &q.args != args {
                return Reply::Error(406);
            }
            return Reply::Declared {
                messages: q.ready.len(),
                consumers: usize::from(q.consumer.is_some()),
            };
        }
        self.queues
            .insert(name.to_string(), MQueue::new(args.clone()));
        Reply::Declared {
            messages: 0,
            consumers: 0,
        }
    }

    pub fn bind(&mut self, queue: &str, key: &str, bind: bool) -> Reply {
        // Binding a missing queue is 404; unbinding one is a no-op (as
        // RabbitMQ's `rabbit_binding:remove` ignores missing ends).
        if !self.queues.contains_key(queue) {
            return if bind { Reply::Error(404) } else { Reply::Done };
        }
        let b = (queue.to_string(), key.to_string());
        if bind {
            self.bindings.insert(b);
        } else {
            self.bindings.remove(&b);
        }
        Reply::Done
    }

    pub fn publish(
        &mut self,
        exchange: &str,
        key: &str,
        body: &str,
        priority: Option<u8>,
        expiration: Option<u64>,
    ) -> Reply {
        let targets: Vec<String> = if exchange.is_empty() {
            self.queues
                .contains_key(key)
                .then(|| key.to_string())
                .into_iter()
                .collect()
        } else {
            self.bindings
                .iter()
                .filter(|(_, k)| k == key)
                .map(|(q, _)| q.clone())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect()
        };
        let msg = Msg {
            body: body.to_string(),
            exchange: exchange.to_string(),
            routing_key: key.to_string(),
            redelivered: false,
            expiration: expiration.map(|e| e.to_string()),
            deaths: Vec::new(),
        };
        let mut rejected = false;
        for q in &targets {
            rejected |= !self.enqueue(q, msg.clone(), priority);
        }
        Reply::Published {
            routed: !targets.is_empty(),
            rejected,
        }
    }

    /// One queue receives a message; false if it refused it (reject-publish).
    fn enqueue(&mut self, name: &str, msg: Msg, priority: Option<u8>) -> bool {
        let now = self.now;
        let Some(q) = self.queues.get_mut(name) else {
            return true;
        };
        let seq = q.next_seq;
        q.next_seq += 1;
        let per_message = msg
            .expiration
            .as_deref()
            .and_then(|e| e.parse::<u64>().ok());
        let ttl = match (q.args.message_ttl, per_message) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let m = MMsg {
            msg,
            seq,
            priority,
            expires_at: ttl.map(|t| now + t),
        };
        if q.would_overflow(m.size()) && q.args.overflow() != Overflow::DropHead {
            if q.args.overflow() == Overflow::RejectPublishDlx {
                self.dead_letter(name, m.msg, "maxlen");
            }
            return false;
        }
        if q.ready.is_empty() && q.consumer.as_ref().is_some_and(MConsumer::has_room) {
            self.push(name, m);
            return true;
        }
        q.insert(m);
        self.drop_head(name);
        self.expire(name);
        true
    }

    /// drop-head: dead-letter from the head while over a limit.
    fn drop_head(&mut self, name: &str) {
        loop {
            let Some(q) = self.queues.get_mut(name) else {
                return;
            };
            if q.args.overflow() != Overflow::DropHead || !q.over_limit() {
                return;
            }
            let Some(m) = q.pop_head() else { return };
            self.dead_letter(name, m.msg, "maxlen");
        }
    }

    /// Dead-letter expired messages at the head.
    fn expire(&mut self, name: &str) {
        self.expire_at(name, self.now);
    }

    /// Dead-letter messages at the head that are due at `now`.
    fn expire_at(&mut self, name: &str, now: u64) {
        loop {
            let Some(q) = self.queues.get_mut(name) else {
                return;
            };
            let due = q
                .ready
                .values()
                .next()
                .is_some_and(|m| m.expires_at.is_some_and(|at| now >= at));
            if !due {
                return;
            }
            let Some(m) = q.pop_head() else { return };
            self.dead_letter(name, m.msg, "expired");
        }
    }

    fn dead_letter(&mut self, from: &str, mut msg: Msg, reason: &str) {
        let Some(q) = self.queues.get(from) else {
            return;
        };
        let Some(dl_key) = q.args.dlx.clone() else {
            return;
        };
        match msg
            .deaths
            .iter()
            .position(|(dq, r, _)| dq == from && r == reason)
        {
            Some(i) => {
                let mut d = msg.deaths.remove(i);
                d.2 += 1;
                msg.deaths.insert(0, d);
            }
            None => msg
                .deaths
                .insert(0, (from.to_string(), reason.to_string(), 1)),
        }
        let key = dl_key.unwrap_or_else(|| msg.routing_key.clone());
        msg.expiration = None;
        msg.redelivered = false;
        msg.exchange = DLX.to_string();
        msg.routing_key = key.clone();
        // The DLX binds `dlq<i>` with key `q<i>`.
        if let Some(i) = SOURCES.iter().position(|s| *s == key) {
            self.enqueue(DLQS[i], msg, None);
        }
    }

    /// Hand a message to the queue's consumer.
    fn push(&mut self, name: &str, m: MMsg) {
        let Some(q) = self.queues.get_mut(name) else {
            return;
        };
        let Some(c) = q.consumer.as_mut() else { return };
        let pushed = Pushed {
            queue: name.to_string(),
            msg: m.msg.clone(),
            no_ack: c.no_ack,
        };
        let held = (!c.no_ack).then(|| Held {
            queue: name.to_string(),
            msg: m,
            consumer: Some(c.id),
        });
        if !c.no_ack {
            c.in_flight += 1;
            q.unacked += 1;
        }
        self.pushed.push((pushed, held));
    }

    /// Deliver to the consumer while it has room.
    fn run(&mut self, name: &str) {
        loop {
            let Some(q) = self.queues.get(name) else {
                return;
            };
            if q.consumer.is_none() || q.ready.is_empty() {
                return;
            }
            let Some(q) = self.queues.get_mut(name) else {
                return;
            };
            if !q.consumer.as_ref().is_some_and(MConsumer::has_room) {
                return;
            }
            let Some(m) = q.pop_head() else { return };
            self.push(name, m);
            self.expire(name);
        }
    }

    pub fn get(&mut self, name: &str, no_ack: bool) -> Reply {
        // A no-op for RabbitMQ's eager expiry; catches up warren's lazy one.
        self.expire(name);
        let Some(q) = self.queues.get_mut(name) else {
            return Reply::Error(404);
        };
        let Some(m) = q.pop_head() else {
            return Reply::GetEmpty;
        };
        let msg = m.msg.clone();
        if !no_ack {
            q.unacked += 1;
            self.outstanding.push(Held {
                queue: name.to_string(),
                msg: m,
                consumer: None,
            });
        }
        self.expire(name);
        let message_count = self.queues.get(name).map_or(0, |q| q.ready.len());
        Reply::GetOk { msg, message_count }
    }

    /// Returns false if the step is a no-op (the queue already has a consumer).
    pub fn consume(&mut self, name: &str, prefetch: u32, no_ack: bool) -> Option<Reply> {
        let id = self.next_consumer;
        let Some(q) = self.queues.get_mut(name) else {
            return Some(Reply::Error(404));
        };
        if q.consumer.is_some() {
            return None;
        }
        self.next_consumer += 1;
        q.consumer = Some(MConsumer {
            id,
            prefetch,
            no_ack,
            in_flight: 0,
        });
        self.run(name);
        Some(Reply::Done)
    }

    /// Whether `name` has a consumer to cancel.
    pub fn has_consumer(&self, name: &str) -> bool {
        self.queues.get(name).is_some_and(|q| q.consumer.is_some())
    }

    pub fn cancel(&mut self, name: &str) {
        if let Some(q) = self.queues.get_mut(name) {
            q.consumer = None;
        }
    }

    /// How many deliveries await a settle.
    pub fn outstanding_len(&self) -> usize {
        self.outstanding.len()
    }

    /// Settle outstanding deliveries `[..=i]` (multiple) or `[i]`.
    pub fn settle(&mut self, i: usize, multiple: bool, how: Settle) {
        let taken: Vec<Held> = if multiple {
            self.outstanding.drain(..=i).collect()
        } else {
            vec![self.outstanding.remove(i)]
        };
        let mut by_queue: Vec<(String, Vec<Held>)> = Vec::new();
        for h in taken {
            match by_queue.iter_mut().find(|(q, _)| *q == h.queue) {
                Some((_, v)) => v.push(h),
                None => by_queue.push((h.queue.clone(), vec![h])),
            }
        }
        // Each queue handles its part in turn and delivers what it can at once; a
        // dead letter reaches its target queue immediately.
        for (name, held) in by_queue {
            self.give_room(&held);
            let Some(q) = self.queues.get_mut(&name) else {
                continue;
            };
            q.unacked -= held.len();
            match how {
                Settle::Ack => {}
                Settle::Discard => {
                    for h in held {
                        self.dead_letter(&name, h.msg.msg, "rejected");
                    }
                }
                Settle::Requeue => {
                    for mut h in held {
                        h.msg.msg.redelivered = true;
                        q.insert(h.msg);
                    }
                    self.drop_head(&name);
                    self.expire(&name);
                }
            }
            self.run(&name);
        }
        let names: Vec<String> = self.queues.keys().cloned().collect();
        for name in names {
            self.run(&name);
        }
    }

    /// Settled deliveries give their consumer room again.
    fn give_room(&mut self, held: &[Held]) {
        for h in held {
            let q = self.queues.get_mut(&h.queue);
            if let Some(c) = q.and_then(|q| q.consumer.as_mut()) {
                if Some(c.id) == h.consumer {
                    c.in_flight -= 1;
                }
            }
        }
    }

    pub fn purge(&mut self, name: &str) -> Reply {
        match self.queues.get_mut(name) {
            None => Reply::Error(404),
            Some(q) => {
                let n = q.ready.len();
                q.ready.clear();
                Reply::Count(n)
            }
        }
    }

    /// Delete a queue: its bindings go, and the channel forgets its deliveries from it.
    pub fn delete(&mut self, name: &str) -> Reply {
        let Some(q) = self.queues.remove(name) else {
            return Reply::Count(0);
        };
        self.bindings.retain(|(b, _)| b != name);
        self.outstanding.retain(|h| h.queue != name);
        Reply::Count(q.ready.len())
    }

    pub fn advance(&mut self, ms: u64) {
        self.now += ms;
        let names: Vec<String> = self.queues.keys().cloned().collect();
        for name in names {
            self.expire(&name);
        }
    }

    /// What the step delivered, and the state now.
    pub fn observe(&mut self, reply: Reply) -> Observation {
        // Reading the counters applies due expiry (a no-op for RabbitMQ's eager
        // semantics).
        let names: Vec<String> = self.queues.keys().cloned().collect();
        for name in names {
            self.expire(&name);
        }
        let mut step = std::mem::take(&mut self.pushed);
        step.sort_by(|a, b| a.0.queue.cmp(&b.0.queue));
        let mut pushed = Vec::new();
        for (p, held) in step {
            pushed.push(p);
            self.outstanding.extend(held);
        }
        Observation {
            reply,
            pushed,
            depths: self
                .queues
                .iter()
                .map(|(n, q)| {
                    (
                        n.clone(),
                        (q.ready.len(), q.unacked, usize::from(q.consumer.is_some())),
                    )
                })
                .collect(),
            outstanding: self
                .outstanding
                .iter()
                .map(|h| (h.queue.clone(), h.msg.msg.body.clone()))
                .collect(),
        }
    }
}
