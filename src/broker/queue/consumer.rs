//! Consumers as a queue sees them: where to send deliveries and how much credit is left.
//!
//! Prefetch is enforced with [`Credit`] counters shared between the queue (which takes
//! credit when it hands a message out) and the channel (which gives it back on ack).
//! A consumer has its own credit (basic.qos global=false, RabbitMQ's per-consumer meaning)
//! and shares its channel's credit (global=true); both must have room.

use super::Queue;
use crate::broker::message::Entry;
use crate::wire::FieldTable;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

/// A prefetch window: `limit` 0 means unlimited.
#[derive(Debug, Default)]
pub struct Credit {
    limit: AtomicU32,
    used: AtomicU32,
}

impl Credit {
    pub fn new(limit: u32) -> Arc<Credit> {
        Arc::new(Credit {
            limit: AtomicU32::new(limit),
            used: AtomicU32::new(0),
        })
    }

    pub fn set_limit(&self, limit: u32) {
        self.limit.store(limit, Ordering::Release);
    }

    pub fn limit(&self) -> u32 {
        self.limit.load(Ordering::Acquire)
    }

    pub fn used(&self) -> u32 {
        self.used.load(Ordering::Acquire)
    }

    /// Take one unit if the window has room.
    pub fn try_acquire(&self) -> bool {
        let mut used = self.used.load(Ordering::Acquire);
        loop {
            let limit = self.limit.load(Ordering::Acquire);
            if limit != 0 && used >= limit {
                return false;
            }
            match self.used.compare_exchange_weak(
                used,
                used + 1,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => return true,
                Err(actual) => used = actual,
            }
        }
    }

    /// Give back `n` units (never below zero).
    pub fn release(&self, n: u32) {
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |u| {
                Some(u.saturating_sub(n))
            });
    }

    pub fn has_room(&self) -> bool {
        let limit = self.limit();
        limit == 0 || self.used() < limit
    }
}

/// One message handed from a queue to a consumer, on its way to the connection.
#[derive(Debug)]
pub struct Delivery {
    pub channel: u16,
    pub consumer_tag: Arc<str>,
    pub queue: Arc<Queue>,
    pub entry: Entry,
    pub no_ack: bool,
}

/// Where a queue sends deliveries and cancel notifications; the server implements it
/// for each connection. Must not block: it is called with the queue locked.
pub trait DeliverySink: Send + Sync + std::fmt::Debug {
    /// Hand over a delivery; gives it back if the connection is gone.
    fn deliver(&self, delivery: Delivery) -> Result<(), Delivery>;
    /// The queue went away under this consumer (basic.cancel from the server).
    fn cancelled(&self, channel: u16, consumer_tag: Arc<str>);
    /// Clustered: the home node answered the opening of a remote consumer:
    /// open, or refused with (AMQP reply code, text).
    fn consume_answered(
        &self,
        _channel: u16,
        _consumer_tag: Arc<str>,
        _answer: Result<(), (u16, String)>,
    ) {
    }
    /// Clustered: a delivery from a consumer on another node (see
    /// [`crate::broker::remote`]); gives it back if the connection is gone.
    fn deliver_remote(
        &self,
        delivery: crate::broker::remote::RemoteDelivery,
    ) -> Result<(), crate::broker::remote::RemoteDelivery> {
        Err(delivery)
    }
    /// The connection behind this sink has too much unwritten output: hand it
    /// nothing until it catches up (it kicks its queues when it does).
    fn blocked(&self) -> bool {
        false
    }
}

/// A consumer attached to a queue.
#[derive(Debug)]
pub struct Consumer {
    pub tag: Arc<str>,
    pub connection: u64,
    pub channel: u16,
    pub no_ack: bool,
    pub exclusive: bool,
    /// `x-priority` consume argument: higher priorities are served first.
    pub priority: i32,
    pub arguments: FieldTable,
    /// Per-consumer prefetch window.
    pub credit: Arc<Credit>,
    /// The channel's shared prefetch window.
    pub channel_credit: Arc<Credit>,
    /// channel.flow: false pauses deliveries on the channel.
    pub flow: Arc<AtomicBool>,
    pub sink: Arc<dyn DeliverySink>,
}

impl Consumer {
    /// Reserve room for one more delivery (no-ack consumers are never limited).
    pub fn try_take_credit(&self) -> bool {
        if !self.flow.load(Ordering::Acquire) || self.sink.blocked() {
            return false;
        }
        if self.no_ack {
            return true;
        }
        if !self.credit.try_acquire() {
            return false;
        }
        if !self.channel_credit.try_acquire() {
            self.credit.release(1);
            return false;
        }
        true
    }

    /// Whether a delivery could be handed to it now (as `try_take_credit`, without
    /// taking anything).
    pub fn has_room(&self) -> bool {
        self.flow.load(Ordering::Acquire)
            && !self.sink.blocked()
            && (self.no_ack || (self.credit.has_room() && self.channel_credit.has_room()))
    }

    /// Undo `try_take_credit` for a delivery that did not happen.
    pub fn give_back_credit(&self) {
        if !self.no_ack {
            self.credit.release(1);
            self.channel_credit.release(1);
        }
    }

    pub fn is(&self, connection: u64, channel: u16, tag: &str) -> bool {
        self.connection == connection && self.channel == channel && &*self.tag == tag
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credit_limits_and_releases() {
        let c = Credit::new(2);
        assert!(c.try_acquire());
        assert!(c.try_acquire());
        assert!(!c.try_acquire());
        c.release(1);
        assert!(c.try_acquire());
        c.release(5);
        assert_eq!(c.used(), 0);
        let unlimited = Credit::new(0);
        for _ in 0..1000 {
            assert!(unlimited.try_acquire());
        }
    }
}
