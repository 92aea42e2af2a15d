//! The delayed-message exchange (`x-delayed-message`, as RabbitMQ's plugin): a
//! message published with a positive `x-delay` header (ms) waits here until it is
//! due; `tick(now)` then routes it from its exchange through [`VHost::publish`]
//! like a new publish (bindings, exchange-to-exchange and the alternate exchange
//! alike). Ties release in publish order.
//!
//! A persistent message held by a durable delayed exchange is also written to the
//! message store (under a per-vhost key no queue can have), so its confirm means
//! what any confirm means: it survives a crash and is released after the restart
//! (at once if it fell due meanwhile). Its record is settled when it is released.
//! Held messages are kept in memory too (the heap orders them by due time).

use super::{PublishFrom, VHost};
use crate::broker::message::Message;
use crate::storage::{MessageOp, QueueRef, StorageError, Store};
use parking_lot::Mutex;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;

/// The messages the delayed exchanges of one vhost hold, earliest due first.
#[derive(Debug, Default)]
pub(super) struct DelayedMessages {
    held: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    heap: BinaryHeap<Reverse<Delayed>>,
    next_seq: u64,
    /// The next store position (level 0 of the vhost's delayed key).
    next_pos: u64,
}

/// A message waiting in a delayed exchange.
#[derive(Debug)]
struct Delayed {
    /// When it is due, ms since the epoch.
    due: u64,
    /// Publish order, to release equal `due` in order.
    seq: u64,
    exchange: Arc<str>,
    message: Arc<Message>,
    /// Its position in the store, if it was written there.
    pos: Option<u64>,
}

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Delayed {}
impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Delayed {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(other.due, other.seq))
    }
}

/// The delay a message asks for: its `x-delay` header, if positive.
pub(super) fn delay_of(message: &Message) -> Option<u64> {
    let delay = message
        .properties
        .headers
        .as_ref()?
        .get("x-delay")?
        .as_i64()?;
    u64::try_from(delay).ok().filter(|d| *d > 0)
}

impl DelayedMessages {
    /// Hold `message` for `exchange` until `due`; `store`: also write it there
    /// (under the lock, so the store sees positions in order).
    pub(super) fn hold(
        &self,
        due: u64,
        exchange: Arc<str>,
        message: Arc<Message>,
        store: Option<(&Store, &QueueRef)>,
    ) {
        let mut held = self.held.lock();
        let pos = store.map(|(store, queue)| {
            let pos = held.next_pos;
            held.next_pos += 1;
            store.submit(
                queue,
                [MessageOp::Insert {
                    level: 0,
                    pos,
                    size: message.size() as u32,
                    durable: true,
                    record: crate::broker::queue::encode(&message, false, Some(due)),
                }],
            );
            pos
        });
        self.push(&mut held, due, exchange, message, pos);
    }

    fn push(
        &self,
        held: &mut Held,
        due: u64,
        exchange: Arc<str>,
        message: Arc<Message>,
        pos: Option<u64>,
    ) {
        let seq = held.next_seq;
        held.next_seq += 1;
        held.heap.push(Reverse(Delayed {
            due,
            seq,
            exchange,
            message,
            pos,
        }));
    }

    /// The earliest held message if it is due at `now`.
    fn pop_due(&self, now: u64) -> Option<Delayed> {
        let mut held = self.held.lock();
        match held.heap.peek() {
            Some(Reverse(d)) if d.due <= now => held.heap.pop().map(|Reverse(d)| d),
            _ => None,
        }
    }

    /// How many messages are held.
    pub(super) fn len(&self) -> usize {
        self.held.lock().heap.len()
    }
}

impl VHost {
    /// Route every delayed message due at `now`. One whose exchange has been
    /// deleted meanwhile is dropped. A stored one is settled after it is routed
    /// (a crash in between may release it twice, never lose it).
    pub(super) fn release_delayed(&self, now: u64) {
        while let Some(d) = self.delayed.pop_due(now) {
            if let Err(e) = self.publish(&d.exchange, &d.message, PublishFrom::Delayed, now) {
                tracing::debug!(exchange = %d.exchange, error = %e.text, "delayed message dropped");
            }
            if let (Some(pos), Some((store, queue))) = (d.pos, self.delayed_store()) {
                store.submit(
                    queue,
                    [MessageOp::Settle {
                        level: 0,
                        pos,
                        size: d.message.size() as u32,
                        durable: true,
                    }],
                );
            }
        }
    }

    /// Where this vhost's delayed exchanges store persistent messages.
    pub(super) fn delayed_store(&self) -> Option<(&Store, &QueueRef)> {
        Some((self.store.as_ref()?, self.delayed_key.as_ref()?))
    }

    /// Recovery: hold again every delayed message the store has for this vhost
    /// (due ones are released by the next tick). Returns how many.
    pub fn recover_delayed(&self) -> Result<usize, StorageError> {
        let Some((store, queue)) = self.delayed_store() else {
            return Ok(0);
        };
        let stored = store.read(queue, 0, 0, usize::MAX, usize::MAX)?;
        let mut held = self.delayed.held.lock();
        let n = stored.len();
        for r in stored {
            held.next_pos = held.next_pos.max(r.pos + 1);
            let due = r.message.expires_at.unwrap_or(0);
            let exchange: Arc<str> = r.message.exchange.as_str().into();
            let message = match crate::broker::queue::stored_message(r.message) {
                Ok(m) => m,
                Err(err) => {
                    tracing::error!(pos = r.pos, error = %err, "unreadable stored delayed message; skipped");
                    continue;
                }
            };
            self.delayed
                .push(&mut held, due, exchange, message, Some(r.pos));
        }
        Ok(n)
    }

    /// The store key of a vhost's delayed messages: starts with NUL, which no
    /// queue key (`vhost NUL name`, vhost names are never empty) does.
    pub fn delayed_store_key(vhost: &str) -> String {
        format!("\0delayed\0{vhost}")
    }

    /// How many messages this vhost's delayed exchanges hold.
    pub fn delayed_count(&self) -> usize {
        self.delayed.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::exchange::Destination;
    use crate::broker::message::MemoryBudget;
    use crate::broker::vhost::{ExchangeDeclare, QueueDeclare};
    use crate::config::VHostLimits;
    use crate::wire::{BasicProperties, FieldTable, FieldValue};
    use bytes::Bytes;

    fn delayed_message(exchange: &str, key: &str, delay: i64, body: &'static str) -> Arc<Message> {
        let mut headers = FieldTable::new();
        headers.insert("x-delay", FieldValue::I64(delay));
        let props = BasicProperties {
            headers: Some(headers),
            ..Default::default()
        };
        Message::new(exchange, key, props, Bytes::from_static(body.as_bytes()))
    }

    fn vhost() -> Arc<VHost> {
        VHost::new("/", None, MemoryBudget::new(0), VHostLimits::default())
    }

    fn declare_queue(v: &VHost, name: &str) {
        v.declare_queue(
            &QueueDeclare {
                name: name.into(),
                ..Default::default()
            },
            0,
            0,
        )
        .expect("queue");
    }

    fn ready(v: &VHost, name: &str) -> usize {
        v.queue(name, 0).expect("queue").stats(0).ready
    }

    #[test]
    fn heap_releases_by_due_then_publish_order() {
        let d = DelayedMessages::default();
        d.hold(20, "a".into(), delayed_message("a", "k", 1, "late"), None);
        d.hold(10, "a".into(), delayed_message("a", "k", 1, "first"), None);
        d.hold(10, "a".into(), delayed_message("a", "k", 1, "second"), None);
        assert!(d.pop_due(9).is_none());
        let body = |x: Option<Delayed>| x.map(|d| d.message.body.clone());
        assert_eq!(body(d.pop_due(10)), Some(Bytes::from_static(b"first")));
        assert_eq!(body(d.pop_due(10)), Some(Bytes::from_static(b"second")));
        assert!(d.pop_due(19).is_none());
        assert_eq!(body(d.pop_due(25)), Some(Bytes::from_static(b"late")));
        assert_eq!(d.len(), 0);
    }

    #[test]
    fn delay_header_must_be_positive() {
        assert_eq!(delay_of(&delayed_message("x", "k", 5, "")), Some(5));
        assert_eq!(delay_of(&delayed_message("x", "k", 0, "")), None);
        assert_eq!(delay_of(&delayed_message("x", "k", -3, "")), None);
    }

    /// Release routes like a publish: a message no binding matches goes to the
    /// delayed exchange's alternate exchange, exactly when it is due.
    #[test]
    fn release_honours_the_alternate_exchange() {
        let v = vhost();
        let mut args = FieldTable::new();
        args.insert("x-delayed-type", FieldValue::string("direct"));
        args.insert("alternate-exchange", FieldValue::string("ae"));
        v.declare_exchange(&ExchangeDeclare {
            name: "delayed".into(),
            kind: "x-delayed-message".into(),
            arguments: args,
            ..Default::default()
        })
        .expect("delayed exchange");
        v.declare_exchange(&ExchangeDeclare {
            name: "ae".into(),
            kind: "fanout".into(),
            ..Default::default()
        })
        .expect("alternate exchange");
        declare_queue(&v, "bound");
        declare_queue(&v, "unrouted");
        let none = FieldTable::new();
        v.bind("delayed", Destination::Queue("bound".into()), "k", &none, 0)
            .expect("bind");
        v.bind("ae", Destination::Queue("unrouted".into()), "", &none, 0)
            .expect("bind ae");

        let t0 = 1_000_000;
        let p = v
            .publish(
                "delayed",
                &delayed_message("delayed", "k", 500, "a"),
                PublishFrom::Client,
                t0,
            )
            .expect("publish");
        assert!(p.held && p.routed && p.accepted);
        let p = v
            .publish(
                "delayed",
                &delayed_message("delayed", "other", 700, "b"),
                PublishFrom::Client,
                t0,
            )
            .expect("publish");
        assert!(p.held);
        assert_eq!(v.delayed_count(), 2);

        v.tick(t0 + 499);
        assert_eq!((ready(&v, "bound"), ready(&v, "unrouted")), (0, 0));
        v.tick(t0 + 500);
        assert_eq!((ready(&v, "bound"), ready(&v, "unrouted")), (1, 0));
        v.tick(t0 + 699);
        assert_eq!(ready(&v, "unrouted"), 0);
        v.tick(t0 + 700);
        assert_eq!((ready(&v, "bound"), ready(&v, "unrouted")), (1, 1));
        assert_eq!(v.delayed_count(), 0);
    }

    /// A message released from a delayed exchange is routed, not held again,
    /// even though it still carries its `x-delay` header.
    #[test]
    fn released_message_is_not_delayed_again() {
        let v = vhost();
        let mut args = FieldTable::new();
        args.insert("x-delayed-type", FieldValue::string("fanout"));
        v.declare_exchange(&ExchangeDeclare {
            name: "d".into(),
            kind: "x-delayed-message".into(),
            arguments: args,
            ..Default::default()
        })
        .expect("delayed exchange");
        declare_queue(&v, "q");
        v.bind(
            "d",
            Destination::Queue("q".into()),
            "",
            &FieldTable::new(),
            0,
        )
        .expect("bind");
        v.publish(
            "d",
            &delayed_message("d", "", 100, "x"),
            PublishFrom::Client,
            0,
        )
        .expect("publish");
        v.tick(100);
        assert_eq!(ready(&v, "q"), 1);
        assert_eq!(v.delayed_count(), 0);
    }
}
