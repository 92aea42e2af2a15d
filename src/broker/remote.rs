//! Queues whose messages live on another node (clustered only): what the
//! broker core knows of them. A replicated classic queue or stream has one
//! home node; every other node keeps the queue's record (for routing, bindings
//! and declares) but no messages, and hands what it routes there to a
//! [`RemoteHome`], which the cluster layer implements over its inter-node link
//! (see `crate::cluster::forward`).
//!
//! A [`Ticket`] follows one publish to its home nodes: it settles once every
//! home node has taken (and, for a persistent message on a durable queue,
//! fsynced) its copy, or fails as soon as one cannot. Publisher confirms wait
//! on it; nothing here does I/O or reads a clock.
//!
//! A [`Replica`] is the other seam: a replicated quorum queue (its own Raft
//! group, `crate::cluster::quorum`) on the node that serves it. Publishes
//! routed to it are proposed to the group instead of enqueued (the message
//! enters the queue when the group applies it), and messages that leave the
//! queue for good are reported so the group drops them too.

use crate::broker::message::Message;
use crate::broker::queue::DeliverySink;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The other node a queue's messages live on.
pub trait RemoteHome: Send + Sync + std::fmt::Debug {
    /// The home node's name (`warren@host`).
    fn node(&self) -> &str;
    /// The link to the home node is up now.
    fn reachable(&self) -> bool;
    /// Where Stream protocol clients reach the home node (host, port).
    fn stream_endpoint(&self) -> Option<(String, u16)>;
    /// Send `message` to the home node's queue `queue` in `vhost`. Must not
    /// block: a link that is down or full fails `ticket` at once. Every call
    /// [`Ticket::expect`]s one settlement before it returns.
    fn forward(&self, vhost: &str, queue: &str, message: &Arc<Message>, ticket: &Arc<Ticket>);
    /// Open a consumer on the home node's queue; its deliveries come to
    /// `sink` ([`DeliverySink::deliver_remote`]) for `channel`. Err when the
    /// home node cannot be reached.
    fn consume(
        &self,
        consume: RemoteConsume,
        channel: u16,
        sink: Arc<dyn DeliverySink>,
    ) -> Result<RemoteConsumer, String>;
    /// Settle deliveries (home-node tags) of consumer `cid`.
    fn settle(&self, cid: u64, tags: Vec<u64>, how: Settle);
    /// basic.cancel: the home node stops delivering (what is unacked stays so).
    fn cancel(&self, cid: u64);
    /// The channel is gone: cancel, and requeue whatever is still unacked.
    fn release(&self, cid: u64);
}

/// A queue replicated by a Raft group of its own (clustered quorum queues),
/// on a member node. The core calls it; the cluster layer implements it.
pub trait Replica: Send + Sync + std::fmt::Debug {
    /// This node serves the queue (it leads the group and has loaded its
    /// messages): publishes are proposed here, consumers are served here.
    fn serving(&self) -> bool;
    /// Propose `message` to the group. Must not block: [`Ticket::expect`]s one
    /// settlement, settled true once the group committed it and the queue
    /// took it, false when it did not commit (no majority, leader lost) or
    /// the queue refused it.
    fn enqueue(&self, message: &Arc<Message>, ticket: &Arc<Ticket>);
    /// Messages (by their id in the group) left the queue for
    /// good: acked, rejected, expired, dropped, dead-lettered, purged.
    fn settled(&self, ids: Vec<u64>);
    /// Every message the group holds with an id in `from..to` left the
    /// queue for good (a purge of messages paged out: their ids are not in
    /// memory, only that range, and none of the group's messages in it is
    /// anywhere else in the queue).
    fn settled_range(&self, from: u64, to: u64);
    /// Messages (by id) that reached a client went back into the queue (a
    /// requeue, a consumer gone): each counts one more return towards the
    /// delivery limit, on whichever member serves the queue next.
    fn returned(&self, ids: Vec<u64>);
    /// Messages (by id) handed to a client that must ack them (`out`), and
    /// messages handed out that went back before they reached it (`back`:
    /// not a return), so the group knows what is out with clients.
    fn checked_out(&self, out: Vec<u64>, back: Vec<u64>);
    /// Propose delivery horizon `h` (no message past it has gone out) and
    /// answer with [`crate::broker::queue::Queue::horizon_answered`].
    fn ask_horizon(&self, h: u64);
    /// A delivery horizon past id `last` that also covers ids the group is
    /// about to give (publishes keep arriving while consumers go on).
    fn horizon_after(&self, last: u64) -> u64 {
        last
    }
    /// The implementation, for the cluster layer that made it.
    fn as_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync>;
}

/// What a remote consumer asks of the home node.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RemoteConsume {
    pub vhost: String,
    pub queue: String,
    pub tag: String,
    /// The client's per-consumer prefetch (0: the link's own cap).
    pub prefetch: u32,
    pub exclusive: bool,
    pub priority: i32,
    /// The consume arguments in their wire encoding (`x-stream-offset`...).
    pub arguments: Vec<u8>,
    /// Whose consumer it is, for the home node's consumer listings (absent
    /// from nodes that did not send it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<ConsumerOrigin>,
}

/// Where a consumer opened from another node is: its channel there, as the
/// management API's `channel_details` show it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ConsumerOrigin {
    pub connection_name: String,
    pub channel: u16,
    pub peer_host: String,
    pub peer_port: u16,
    pub user: String,
    pub node: String,
    /// The consumer's own prefetch as its client set it (0: none).
    #[serde(default)]
    pub prefetch: u32,
}

/// How deliveries are settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Settle {
    Ack,
    Requeue,
    /// basic.reject / nack without requeue: dropped or dead-lettered.
    Reject,
    /// Never reached a client (its consumer or channel went while it was on
    /// the way): back to the queue as it was, not marked redelivered.
    Unsent,
}

/// A Stream protocol request for a stream homed on another node, which the
/// client's node forwards there (RabbitMQ goes to the stream's leader for
/// these three, from any node): the home node answers a [`StreamAnswer`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum StreamOp {
    /// Append entries under the publisher `reference` (deduplicated by it
    /// on the home node); their data travels after the request, one after
    /// the other, `len` bytes each. Answered once fsynced.
    Publish {
        reference: Option<String>,
        entries: Vec<StreamEntry>,
        /// More is likely to follow (the publisher has unconfirmed
        /// messages): the home node's flusher may linger for it.
        #[serde(default)]
        pipelined: bool,
    },
    /// The last publishing id stored for `reference`.
    PublisherSequence { reference: String },
    /// Store a consumer's offset under `reference` (no answer is awaited).
    StoreOffset { reference: String, offset: u64 },
}

/// One entry of a [`StreamOp::Publish`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StreamEntry {
    /// Its publishing id.
    pub id: u64,
    pub len: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filter: Option<String>,
    /// A sub-entry batch's header: compression, records, uncompressed size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<(u8, u16, u32)>,
}

/// The home node's answer to a [`StreamOp`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum StreamAnswer {
    /// Appended and fsynced; the entries (by index) that were duplicates
    /// of their reference's earlier ids (not stored, confirmed anyway).
    Published {
        duplicates: Vec<u32>,
    },
    Sequence(u64),
    Stored,
    /// Refused with this Stream protocol response code.
    Failed(u16),
}

/// A consumer opened on another node: its id on the link, and whether the
/// link it lives on is still up (false: its deliveries are gone, the home
/// node requeued them; settling them does nothing).
#[derive(Debug, Clone)]
pub struct RemoteConsumer {
    pub home: Arc<dyn RemoteHome>,
    pub cid: u64,
    pub alive: Arc<AtomicBool>,
}

impl RemoteConsumer {
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire)
    }
}

/// One message from a consumer on another node, on its way to a channel.
#[derive(Debug)]
pub struct RemoteDelivery {
    pub channel: u16,
    pub consumer_tag: Arc<str>,
    /// The home node's delivery tag.
    pub tag: u64,
    pub redelivered: bool,
    pub message: Arc<Message>,
    /// The message's encoded properties as the home node delivers them.
    pub properties: bytes::Bytes,
    pub consumer: RemoteConsumer,
}

impl RemoteDelivery {
    /// It never reached a client: back to the home node's queue as it was.
    pub fn unsent(self) {
        self.consumer
            .home
            .settle(self.consumer.cid, vec![self.tag], Settle::Unsent);
    }
}

type Waiter = Box<dyn FnOnce(bool) + Send>;

#[derive(Default)]
struct TicketState {
    /// Copies sent and not yet settled.
    pending: usize,
    /// One copy could not be delivered (or was refused).
    failed: bool,
    /// No more copies will be added: a settle to zero completes.
    sealed: bool,
    waiters: Vec<Waiter>,
}

/// The fate of one publish's forwarded copies.
#[derive(Default)]
pub struct Ticket {
    state: Mutex<TicketState>,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.state.lock();
        f.debug_struct("Ticket")
            .field("pending", &s.pending)
            .field("failed", &s.failed)
            .field("sealed", &s.sealed)
            .finish()
    }
}

impl Ticket {
    pub fn new() -> Arc<Ticket> {
        Arc::new(Ticket::default())
    }

    /// One more copy to wait for.
    pub fn expect(&self) {
        self.state.lock().pending += 1;
    }

    /// A copy was taken (`ok`) or lost.
    pub fn settle(&self, ok: bool) {
        let waiters = {
            let mut s = self.state.lock();
            s.pending = s.pending.saturating_sub(1);
            s.failed |= !ok;
            Self::finished(&mut s)
        };
        for w in waiters.0 {
            w(waiters.1);
        }
    }

    /// Every copy has been sent (publish routing is over).
    pub fn seal(&self) {
        let waiters = {
            let mut s = self.state.lock();
            s.sealed = true;
            Self::finished(&mut s)
        };
        for w in waiters.0 {
            w(waiters.1);
        }
    }

    fn finished(s: &mut TicketState) -> (Vec<Waiter>, bool) {
        if s.sealed && (s.pending == 0 || s.failed) {
            (std::mem::take(&mut s.waiters), !s.failed)
        } else {
            (Vec::new(), false)
        }
    }

    /// Settled: Some(every copy taken).
    pub fn outcome(&self) -> Option<bool> {
        let s = self.state.lock();
        (s.sealed && (s.pending == 0 || s.failed)).then_some(!s.failed)
    }

    /// Call `f` with the outcome once settled (at once if it is).
    pub fn on_done(&self, f: impl FnOnce(bool) + Send + 'static) {
        let mut s = self.state.lock();
        if s.sealed && (s.pending == 0 || s.failed) {
            let ok = !s.failed;
            drop(s);
            return f(ok);
        }
        s.waiters.push(Box::new(f));
    }

    /// Call `f` once every ticket of `tickets` is settled: true if all were
    /// taken everywhere.
    pub fn all(tickets: Vec<Arc<Ticket>>, f: impl FnOnce(bool) + Send + 'static) {
        let all = Ticket::new();
        for t in &tickets {
            all.expect();
            let all = Arc::clone(&all);
            t.on_done(move |ok| all.settle(ok));
        }
        all.on_done(f);
        all.seal();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU8;

    fn watch(t: &Ticket) -> Arc<AtomicU8> {
        let seen = Arc::new(AtomicU8::new(0));
        let s = Arc::clone(&seen);
        t.on_done(move |ok| s.store(if ok { 1 } else { 2 }, Ordering::SeqCst));
        seen
    }

    #[test]
    fn a_ticket_settles_once_sealed_and_every_copy_is_taken() {
        let t = Ticket::new();
        t.expect();
        t.expect();
        let seen = watch(&t);
        t.settle(true);
        t.settle(true);
        assert_eq!(seen.load(Ordering::SeqCst), 0, "not sealed yet");
        t.seal();
        assert_eq!(seen.load(Ordering::SeqCst), 1);
        assert_eq!(t.outcome(), Some(true));
    }

    #[test]
    fn one_lost_copy_fails_the_ticket_without_waiting_for_the_rest() {
        let t = Ticket::new();
        t.expect();
        t.expect();
        t.seal();
        let seen = watch(&t);
        t.settle(false);
        assert_eq!(seen.load(Ordering::SeqCst), 2);
        assert_eq!(t.outcome(), Some(false));
        // A late success changes nothing.
        t.settle(true);
        assert_eq!(t.outcome(), Some(false));
    }

    #[test]
    fn all_waits_for_every_ticket() {
        let (a, b) = (Ticket::new(), Ticket::new());
        a.expect();
        b.expect();
        a.seal();
        b.seal();
        let seen = Arc::new(AtomicU8::new(0));
        let s = Arc::clone(&seen);
        Ticket::all(vec![Arc::clone(&a), Arc::clone(&b)], move |ok| {
            s.store(if ok { 1 } else { 2 }, Ordering::SeqCst)
        });
        a.settle(true);
        assert_eq!(seen.load(Ordering::SeqCst), 0);
        b.settle(true);
        assert_eq!(seen.load(Ordering::SeqCst), 1);
        let seen2 = Arc::new(AtomicU8::new(0));
        let s2 = Arc::clone(&seen2);
        Ticket::all(vec![], move |ok| {
            s2.store(if ok { 1 } else { 2 }, Ordering::SeqCst)
        });
        assert_eq!(seen2.load(Ordering::SeqCst), 1, "nothing to wait for");
    }
}
