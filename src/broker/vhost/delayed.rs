//! The delayed-message exchange (`x-delayed-message`, as RabbitMQ's plugin): a
//! message published with a positive `x-delay` header (ms) waits here, in memory,
//! until it is due; `tick(now)` then routes it from its exchange through
//! [`VHost::publish`] like a new publish (bindings, exchange-to-exchange and the
//! alternate exchange alike). Ties release in publish order.

use super::{PublishFrom, VHost};
use crate::broker::message::Message;
use parking_lot::Mutex;
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Arc;

/// The messages the delayed exchanges of one vhost hold, earliest due first.
#[derive(Debug, Default)]
pub(super) struct DelayedMessages {
    heap: Mutex<(BinaryHeap<Reverse<Delayed>>, u64)>,
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
    /// Hold `message` for `exchange` until `due`.
    pub(super) fn hold(&self, due: u64, exchange: Arc<str>, message: Arc<Message>) {
        let mut guard = self.heap.lock();
        let (heap, next_seq) = &mut *guard;
        let seq = *next_seq;
        *next_seq += 1;
        heap.push(Reverse(Delayed {
            due,
            seq,
            exchange,
            message,
        }));
    }

    /// The earliest held message if it is due at `now`.
    fn pop_due(&self, now: u64) -> Option<(Arc<str>, Arc<Message>)> {
        let mut guard = self.heap.lock();
        let heap = &mut guard.0;
        match heap.peek() {
            Some(Reverse(d)) if d.due <= now => {
                heap.pop().map(|Reverse(d)| (d.exchange, d.message))
            }
            _ => None,
        }
    }

    /// How many messages are held.
    pub(super) fn len(&self) -> usize {
        self.heap.lock().0.len()
    }
}

impl VHost {
    /// Route every delayed message due at `now`. One whose exchange has been
    /// deleted meanwhile is dropped.
    pub(super) fn release_delayed(&self, now: u64) {
        while let Some((exchange, message)) = self.delayed.pop_due(now) {
            if let Err(e) = self.publish(&exchange, &message, PublishFrom::Delayed, now) {
                tracing::debug!(exchange = %exchange, error = %e.text, "delayed message dropped");
            }
        }
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
        d.hold(20, "a".into(), delayed_message("a", "k", 1, "late"));
        d.hold(10, "a".into(), delayed_message("a", "k", 1, "first"));
        d.hold(10, "a".into(), delayed_message("a", "k", 1, "second"));
        assert!(d.pop_due(9).is_none());
        let body = |x: Option<(Arc<str>, Arc<Message>)>| x.map(|(_, m)| m.body.clone());
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
