//! Message traffic between nodes: RabbitMQ's model, where a classic queue or a
//! stream lives on its home node (named in its replicated record) and every
//! other node reaches it by forwarding.
//!
//! - **The data link.** One persistent connection per peer, opened through
//!   [`super::network::dial`] (the cookie handshake, and whatever transport
//!   the network module gives) and turned into a link by a [`Kind::Link`]
//!   frame; then both sides send [`Kind::Data`] frames, pipelined, each a JSON
//!   [`Msg`] header with an optional AMQP message ([`super::frame::pack`]).
//!   The link task redials every 200 ms while the peer is down.
//! - **Bounded.** At most [`MAX_INFLIGHT`] publishes per link wait for their
//!   home node's answer and [`QUEUE_FRAMES`] frames wait to be written; past
//!   that a forward fails at once (a nack for a confirming publisher), and
//!   above half of it the publishing connections stop reading
//!   ([`Forwarder::has_room`]), as they do for a full store.
//! - **Publishing.** The publishing node routes (the topology is replicated);
//!   for a queue homed elsewhere the vhost hands the message to that queue's
//!   [`RemoteHome`], here a [`RemoteQueue`], which sends it over the link. The
//!   home node enqueues it through the same queue door as a local publish and
//!   answers after its store's fsync when the copy is durable; the answer
//!   settles the publish's [`Ticket`], which the publisher's confirm waits on.
//!   A link that is down or drops with publishes unanswered fails them (nack:
//!   never a false ack).

use super::frame::{pack, unpack, Frame, Kind};
// The connection type is the network module's: whatever transport its
// dial/accept give (plain TCP today) carries the data links too.
use super::network::{dial, CallError, Conn};
use super::{Cluster, Identity};
use crate::broker::message::Message;
use crate::broker::queue::Enqueued;
use crate::broker::queue::{Consumer, Credit, Delivery, DeliverySink, Queue};
use crate::broker::remote::{
    RemoteConsume, RemoteConsumer, RemoteDelivery, RemoteHome, Settle, StreamAnswer, StreamOp,
    Ticket,
};
use crate::broker::Broker;
use crate::cluster::quorum::publisher as quorum_pub;
use crate::wire::stream::SubBatch;
use futures::{SinkExt, StreamExt};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::sync::mpsc;

/// Publishes per link waiting for the home node's answer, at most.
pub const MAX_INFLIGHT: usize = 8192;
/// Frames per link waiting to be written, at most.
pub const QUEUE_FRAMES: usize = 4096;
/// The window of a remote consumer whose client set no prefetch (or
/// consumes with no-ack): deliveries on their way, at most.
pub const REMOTE_PREFETCH: u32 = 256;
/// How long a link waits before dialling a peer again.
const REDIAL: Duration = Duration::from_millis(200);

/// One message of a data link (the JSON header of a [`Kind::Data`] frame).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Msg {
    /// Enqueue the attached message in the home node's `queue`.
    Publish {
        id: u64,
        vhost: String,
        queue: String,
        exchange: String,
        routing_key: String,
        /// For a quorum queue: the publisher on the sending node and the
        /// message's number in its sequence (`quorum::publisher`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seq: Option<(u64, u64)>,
    },
    /// The outcome of request `id`: taken (after the fsync a durable copy
    /// needs), or not (`why`); `resend`: not taken for now (a quorum queue
    /// not served here any more), to be sent again to its leader.
    Done {
        id: u64,
        ok: bool,
        why: Option<String>,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        resend: bool,
    },
    /// Open consumer `cid` on the home node's queue.
    Consume { cid: u64, spec: RemoteConsume },
    /// Home -> consuming node: a delivery of consumer `cid` (message attached);
    /// `tag` is the home node's.
    Deliver {
        cid: u64,
        tag: u64,
        redelivered: bool,
        exchange: String,
        routing_key: String,
    },
    /// Settle deliveries of consumer `cid`.
    Settle {
        cid: u64,
        tags: Vec<u64>,
        how: Settle,
    },
    /// basic.cancel of consumer `cid` (its unacked deliveries stay unacked).
    Cancel { cid: u64 },
    /// The consuming channel is gone: cancel, requeue what is unacked, forget.
    Release { cid: u64 },
    /// Home -> consuming node: consumer `cid` is open (the answer to its
    /// `Consume`, before any of its deliveries).
    Consumed { cid: u64 },
    /// Home -> consuming node: consumer `cid` is no more. `code` 0: it was
    /// open and ended (its queue deleted), `why` for the log; else it could
    /// not be opened: the AMQP reply code and text of the refusal.
    Cancelled { cid: u64, code: u16, why: String },
    /// A queue operation the home node answers ([`Op`]).
    Request {
        id: u64,
        vhost: String,
        queue: String,
        op: Op,
    },
    /// The answer to request `id`: Err is (AMQP reply code, text). A
    /// `Reply::Got` carries the message.
    Reply {
        id: u64,
        reply: Result<Reply, (u16, String)>,
    },
}

/// What another node asks of a queue homed here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// Ready messages and consumers (a passive queue.declare).
    Info,
    /// queue.purge.
    Purge,
    /// The if-unused / if-empty checks of a queue.delete.
    DeleteCheck { if_unused: bool, if_empty: bool },
    /// basic.get; an unacked message is settled as a delivery of `cid`.
    /// `waited`: answered even when its head message is past the delivery
    /// horizon (the asker gave up waiting for one to commit).
    Get {
        no_ack: bool,
        cid: u64,
        #[serde(default)]
        waited: bool,
    },
    /// A Stream protocol request for a stream homed here (a publish's
    /// entries are the frame's body).
    Stream(StreamOp),
}

/// The home node's answer to an [`Op`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Reply {
    /// Ready messages, consumers, and messages delivered and not yet acked.
    Info {
        messages: u64,
        consumers: u64,
        #[serde(default)]
        unacked: u64,
    },
    Purged {
        messages: u64,
    },
    Checked {
        messages: u64,
    },
    Empty,
    /// A get on a replicated queue whose head message is past the committed
    /// delivery horizon (a larger one is asked for): ask again shortly.
    NotYet,
    Stream(StreamAnswer),
    Got {
        tag: u64,
        redelivered: bool,
        remaining: u64,
        exchange: String,
        routing_key: String,
    },
}

/// An answer with the message of a `Reply::Got`.
pub type Answer = (
    Result<Reply, (u16, String)>,
    Option<(Arc<Message>, bytes::Bytes)>,
);

/// Encode a link message with its AMQP message, if any.
pub fn encode(msg: &Msg, message: Option<&Message>) -> Vec<u8> {
    let header = serde_json::to_vec(msg).unwrap_or_default();
    match message {
        Some(m) => {
            let mut props = bytes::BytesMut::new();
            m.properties.encode(&mut props);
            pack(&header, &props, &m.body)
        }
        None => pack(&header, &[], &[]),
    }
}

/// Decode a link message; the AMQP message is built from the header's
/// exchange and routing key by the caller.
pub fn decode(payload: &bytes::Bytes) -> Result<(Msg, bytes::Bytes, bytes::Bytes), String> {
    let (header, props, body) = unpack(payload).map_err(|e| e.to_string())?;
    let msg: Msg = serde_json::from_slice(&header).map_err(|e| e.to_string())?;
    Ok((msg, props, body))
}

fn message(
    exchange: &str,
    routing_key: &str,
    props: &[u8],
    body: bytes::Bytes,
) -> Option<Arc<Message>> {
    let properties = crate::wire::BasicProperties::decode(props).ok()?;
    Some(Message::new(exchange, routing_key, properties, body))
}

/// This node's links to the other nodes, by node name.
pub struct Forwarder {
    ident: Arc<Identity>,
    cluster: Mutex<Weak<Cluster>>,
    links: Mutex<HashMap<String, Arc<Link>>>,
    /// Wakes publishers paused by [`Self::has_room`].
    room: tokio::sync::Notify,
}

impl std::fmt::Debug for Forwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarder").finish_non_exhaustive()
    }
}

impl Forwarder {
    pub fn new(ident: Arc<Identity>) -> Arc<Forwarder> {
        Arc::new(Forwarder {
            ident,
            cluster: Mutex::new(Weak::new()),
            links: Mutex::new(HashMap::new()),
            room: tokio::sync::Notify::new(),
        })
    }

    pub(super) fn set_cluster(&self, c: &Arc<Cluster>) {
        *self.cluster.lock() = Arc::downgrade(c);
    }

    /// The link to `node`, started on first use.
    pub fn link(self: &Arc<Self>, node: &str) -> Arc<Link> {
        let mut links = self.links.lock();
        if let Some(l) = links.get(node) {
            return Arc::clone(l);
        }
        let (link, rx, ctl_rx) = Link::new(node, Arc::downgrade(self));
        let link = Arc::new(link);
        links.insert(node.to_string(), Arc::clone(&link));
        tokio::spawn(run_link(Arc::clone(self), Arc::clone(&link), rx, ctl_rx));
        link
    }

    /// Whether `node`'s link is connected now.
    pub fn is_up(&self, node: &str) -> bool {
        self.links
            .lock()
            .get(node)
            .is_some_and(|l| l.up.load(Ordering::Acquire))
    }

    /// Every link has room for more publishes (under half its window), and
    /// so have this node's quorum queue groups.
    pub fn has_room(&self) -> bool {
        let quorum = self.cluster.lock().upgrade().map(|c| Arc::clone(&c.quorum));
        quorum.is_none_or(|q| q.has_room())
            && self
                .links
                .lock()
                .values()
                .all(|l| l.pending.lock().len() < MAX_INFLIGHT / 2)
    }

    /// Wait until [`Self::has_room`] may have changed.
    pub async fn ready(&self) {
        if self.has_room() {
            return;
        }
        let _ = tokio::time::timeout(Duration::from_millis(50), self.room.notified()).await;
    }

    /// Record where `vhost`/`name`'s messages live: `home` is this node, or
    /// another (then publishes here go there). For a replicated quorum queue
    /// `home` is its group's leader; a node serving it stays its home.
    pub fn mark(self: &Arc<Self>, broker: &Broker, vhost: &str, name: &str, home: &str) {
        let Some(v) = broker.vhost(vhost) else { return };
        let Ok(q) = v.queue(name, 0) else { return };
        if home == self.ident.me.name || q.replica().is_some_and(|r| r.serving()) {
            q.set_remote(None);
            return;
        }
        if q.remote().is_some_and(|r| r.node() == home) {
            return;
        }
        if q.replica().is_some() {
            // A member of a quorum queue's group that does not serve it:
            // consumers attached here would wait for nothing.
            for c in q.reset_replicated() {
                c.sink.cancelled(c.channel, Arc::clone(&c.tag));
            }
        }
        let link = self.link(home);
        let quorum = q.queue_type() == crate::broker::queue::QueueType::Quorum;
        let this = Arc::new_cyclic(|this| RemoteQueue {
            link,
            this: this.clone(),
            quorum,
        });
        q.set_remote(Some(this));
    }

    /// Whether the metadata group's probes see `node` running (None: not a
    /// member, or the cluster is gone).
    fn running(&self, node: &str) -> Option<bool> {
        let c = self.cluster.lock().upgrade()?;
        c.members()
            .into_iter()
            .find(|m| m.name == node)
            .map(|m| m.running)
    }

    /// A queue's figures (ready, unacked, consumers) from its home node, when
    /// it is homed elsewhere and that node answers within `within`.
    pub async fn home_figures(
        self: &Arc<Self>,
        broker: &Broker,
        vhost: &str,
        queue: &str,
        within: Duration,
    ) -> Option<(u64, u64, u64)> {
        let q = broker.vhost(vhost)?.queue(queue, 0).ok()?;
        let home = q.remote()?;
        let link = self.link(home.node());
        let answer = tokio::time::timeout(within, link.request(vhost, queue, Op::Info)).await;
        match answer.ok()?? {
            (
                Ok(Reply::Info {
                    messages,
                    consumers,
                    unacked,
                }),
                _,
            ) => Some((messages, unacked, consumers)),
            _ => None,
        }
    }

    fn address(&self, node: &str) -> Option<String> {
        let c = self.cluster.lock().upgrade()?;
        c.members()
            .into_iter()
            .find(|m| m.name == node)
            .map(|m| m.addr)
    }
}

/// The sending side of the link to one peer.
pub struct Link {
    node: String,
    tx: mpsc::Sender<(u64, Vec<u8>)>,
    up: AtomicBool,
    next_id: AtomicU64,
    /// Publishes sent and not answered yet.
    pending: Mutex<HashMap<u64, Waiting>>,
    /// Consumer traffic (consume, settle, cancel): bounded by the consumers'
    /// windows, so it is never refused for lack of room.
    ctl: mpsc::UnboundedSender<Vec<u8>>,
    /// Consumers opened through this link, by id.
    consumers: Mutex<HashMap<u64, Reg>>,
    /// Queue operations waiting for the home node's answer.
    requests: Mutex<HashMap<u64, tokio::sync::oneshot::Sender<Answer>>>,
    forwarder: Weak<Forwarder>,
}

/// The receiving end of a link's publishes (id, encoded frame).
type FrameRx = mpsc::Receiver<(u64, Vec<u8>)>;
/// The receiving end of a link's consumer traffic.
type CtlRx = mpsc::UnboundedReceiver<Vec<u8>>;

/// A consumer opened through a link: where its deliveries go.
struct Reg {
    sink: Arc<dyn DeliverySink>,
    channel: u16,
    tag: Arc<str>,
    consumer: RemoteConsumer,
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("node", &self.node)
            .field("up", &self.up.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Link {
    /// A link to `node`, down, with the receiving ends of its publish and
    /// consumer-traffic queues (for its task).
    fn new(node: &str, forwarder: Weak<Forwarder>) -> (Link, FrameRx, CtlRx) {
        let (tx, rx) = mpsc::channel(QUEUE_FRAMES);
        let (ctl, ctl_rx) = mpsc::unbounded_channel();
        let link = Link {
            node: node.to_string(),
            tx,
            ctl,
            consumers: Mutex::new(HashMap::new()),
            requests: Mutex::new(HashMap::new()),
            up: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
            forwarder,
        };
        (link, rx, ctl_rx)
    }

    /// Send one publish; `ticket` settles with the home node's answer.
    fn publish(&self, vhost: &str, queue: &str, message: &Arc<Message>, ticket: &Arc<Ticket>) {
        ticket.expect();
        self.send_publish(
            vhost,
            queue,
            message,
            None,
            Waiting::Ticket(Arc::clone(ticket)),
        );
    }

    /// Send one publish of a quorum queue's publisher on this node (number
    /// `seq` of it) to the queue's leader; `reply` gets its answer
    /// (`Resend` when the link is down or goes down first).
    pub fn publish_quorum(
        &self,
        vhost: &str,
        queue: &str,
        message: &Arc<Message>,
        seq: (u64, u64),
        reply: quorum_pub::Reply,
    ) {
        self.send_publish(vhost, queue, message, Some(seq), Waiting::Quorum(reply));
    }

    fn send_publish(
        &self,
        vhost: &str,
        queue: &str,
        message: &Arc<Message>,
        seq: Option<(u64, u64)>,
        waiting: Waiting,
    ) {
        if !self.up.load(Ordering::Acquire) {
            return waiting.answer(false, true);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut pending = self.pending.lock();
            if pending.len() >= MAX_INFLIGHT {
                drop(pending);
                return waiting.answer(false, true);
            }
            pending.insert(id, waiting);
        }
        let msg = Msg::Publish {
            id,
            vhost: vhost.to_string(),
            queue: queue.to_string(),
            exchange: message.exchange.to_string(),
            routing_key: message.routing_key.to_string(),
            seq,
        };
        let sent = self.tx.try_send((id, encode(&msg, Some(message)))).is_ok();
        // Down meanwhile: the task failed what it saw pending; fail this one too.
        if !sent || !self.up.load(Ordering::Acquire) {
            self.answer(id, false, true);
        }
    }

    /// Settle request `id` (once); `resend`: the home node asks for it
    /// again elsewhere.
    fn answer(&self, id: u64, ok: bool, resend: bool) {
        let t = self.pending.lock().remove(&id);
        if let Some(t) = t {
            t.answer(ok, resend);
            if let Some(f) = self.forwarder.upgrade() {
                f.room.notify_waiters();
            }
        }
    }

    /// Ask the home node about `vhost`/`queue`: its answer, or None when the
    /// link is down or goes down first.
    pub async fn request(&self, vhost: &str, queue: &str, op: Op) -> Option<Answer> {
        self.send_request(vhost, queue, op, &[])?.await.ok()
    }

    /// Send a request now, in order with the link's other requests, with
    /// `body` after its header; its answer comes through the receiver,
    /// which fails when the link goes down first. None: the link is down.
    pub fn send_request(
        &self,
        vhost: &str,
        queue: &str,
        op: Op,
        body: &[u8],
    ) -> Option<tokio::sync::oneshot::Receiver<Answer>> {
        if !self.up.load(Ordering::Acquire) {
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.requests.lock().insert(id, tx);
        // Down meanwhile: `fail_all` may have run before the insert.
        if !self.up.load(Ordering::Acquire) {
            self.requests.lock().remove(&id);
            return None;
        }
        let msg = Msg::Request {
            id,
            vhost: vhost.to_string(),
            queue: queue.to_string(),
            op,
        };
        let header = serde_json::to_vec(&msg).unwrap_or_default();
        let _ = self.ctl.send(pack(&header, &[], body));
        Some(rx)
    }

    /// A consumer id for basic.get on `home`'s queue from `channel`: what it
    /// gets unacked is settled like a consumer's deliveries.
    pub fn getter(
        &self,
        home: Arc<dyn RemoteHome>,
        channel: u16,
        sink: Arc<dyn DeliverySink>,
    ) -> RemoteConsumer {
        let cid = self.next_id.fetch_add(1, Ordering::Relaxed);
        let consumer = RemoteConsumer {
            home,
            cid,
            alive: Arc::new(AtomicBool::new(self.up.load(Ordering::Acquire))),
        };
        self.consumers.lock().insert(
            cid,
            Reg {
                sink,
                channel,
                tag: "".into(),
                consumer: consumer.clone(),
            },
        );
        consumer
    }

    fn control(&self, msg: &Msg) {
        let _ = self.ctl.send(encode(msg, None));
    }

    /// A delivery for consumer `cid` arrived.
    fn delivered(
        &self,
        cid: u64,
        tag: u64,
        redelivered: bool,
        message: Arc<Message>,
        properties: bytes::Bytes,
    ) {
        let reg = self.consumers.lock().get(&cid).map(|r| {
            (
                Arc::clone(&r.sink),
                r.channel,
                Arc::clone(&r.tag),
                r.consumer.clone(),
            )
        });
        // Cancelled or released meanwhile, or the channel gone: back to the
        // home node's queue (after a release the home node requeued it
        // already and ignores this; after a cancel it would otherwise stay
        // unacked there until the channel closed).
        let delivered = reg.is_some_and(|(sink, channel, consumer_tag, consumer)| {
            let d = RemoteDelivery {
                channel,
                consumer_tag,
                tag,
                redelivered,
                message,
                properties,
                consumer,
            };
            sink.deliver_remote(d).is_ok()
        });
        if !delivered {
            self.control(&Msg::Settle {
                cid,
                tags: vec![tag],
                how: Settle::Unsent,
            });
        }
    }

    /// The home node answered consumer `cid`'s `Consume`: open, or refused
    /// (then it is forgotten here).
    fn answered(&self, cid: u64, answer: Result<(), (u16, String)>) {
        let mut consumers = self.consumers.lock();
        let reg = match &answer {
            Ok(()) => consumers
                .get(&cid)
                .map(|r| (Arc::clone(&r.sink), r.channel, Arc::clone(&r.tag))),
            Err(_) => consumers.remove(&cid).map(|r| {
                r.consumer.alive.store(false, Ordering::Release);
                (r.sink, r.channel, r.tag)
            }),
        };
        drop(consumers);
        if let Some((sink, channel, tag)) = reg {
            sink.consume_answered(channel, tag, answer);
        }
    }

    /// The home node ended consumer `cid`.
    fn cancelled(&self, cid: u64) {
        let reg = self.consumers.lock().remove(&cid);
        if let Some(r) = reg {
            r.sink.cancelled(r.channel, r.tag);
        }
    }

    /// The link went down: every publish not answered is lost to its
    /// publisher, every consumer through it is cancelled (its unacked
    /// deliveries are the home node's to requeue).
    fn fail_all(&self) {
        self.requests.lock().clear();
        let regs: Vec<Reg> = self.consumers.lock().drain().map(|(_, r)| r).collect();
        for r in regs {
            r.consumer.alive.store(false, Ordering::Release);
            r.sink.cancelled(r.channel, r.tag);
        }
        let all: Vec<Waiting> = self.pending.lock().drain().map(|(_, t)| t).collect();
        for t in all {
            t.answer(false, true);
        }
        if let Some(f) = self.forwarder.upgrade() {
            f.room.notify_waiters();
        }
    }
}

/// What waits for a forwarded publish's answer.
enum Waiting {
    /// A classic queue's or stream's copy.
    Ticket(Arc<Ticket>),
    /// A quorum queue publisher's send.
    Quorum(quorum_pub::Reply),
}

impl Waiting {
    /// The home node's answer: `ok`, or not and `resend` (not taken for
    /// now; also a publish lost with the link: the quorum publisher sends it
    /// to the queue's next leader, whose group recognises a copy that did
    /// commit), or refused.
    fn answer(self, ok: bool, resend: bool) {
        match self {
            Waiting::Ticket(t) => t.settle(ok),
            Waiting::Quorum(reply) => reply(match (ok, resend) {
                (true, _) => quorum_pub::Answer::Taken,
                (false, true) => quorum_pub::Answer::Resend,
                (false, false) => quorum_pub::Answer::Refused,
            }),
        }
    }
}

/// A quorum group's answer as a `Done`'s `ok`, `why` and `resend` (read
/// back by [`Waiting::answer`]).
fn quorum_done(a: quorum_pub::Answer) -> (bool, Option<String>, bool) {
    match a {
        quorum_pub::Answer::Taken => (true, None, false),
        quorum_pub::Answer::Refused => (false, Some("rejected (x-overflow)".into()), false),
        quorum_pub::Answer::Resend => (false, Some("not taken by the group's leader".into()), true),
    }
}

/// A queue homed on another node, as the vhost sees it.
#[derive(Debug)]
pub struct RemoteQueue {
    link: Arc<Link>,
    this: Weak<RemoteQueue>,
    /// A quorum queue (homed on its group's leader): publishes go through
    /// this node's publisher of it, which resends them after a failover.
    quorum: bool,
}

impl RemoteHome for RemoteQueue {
    fn node(&self) -> &str {
        &self.link.node
    }

    fn reachable(&self) -> bool {
        self.link.up.load(Ordering::Acquire)
    }

    fn stream_endpoint(&self) -> Option<(String, u16)> {
        let f = self.link.forwarder.upgrade()?;
        let c = f.cluster.lock().upgrade()?;
        let stream = c.node_info(&self.link.node)?.stream?;
        let (host, port) = stream.rsplit_once(':')?;
        Some((host.to_string(), port.parse().ok()?))
    }

    fn forward(&self, vhost: &str, queue: &str, message: &Arc<Message>, ticket: &Arc<Ticket>) {
        let quorum = self.quorum.then(|| {
            let f = self.link.forwarder.upgrade()?;
            let c = f.cluster.lock().upgrade()?;
            Some(Arc::clone(&c.quorum))
        });
        match quorum.flatten() {
            Some(m) => m.publisher(vhost, queue).publish(message, ticket),
            None => self.link.publish(vhost, queue, message, ticket),
        }
    }

    fn consume(
        &self,
        spec: RemoteConsume,
        channel: u16,
        sink: Arc<dyn DeliverySink>,
    ) -> Result<RemoteConsumer, String> {
        let link = &self.link;
        let Some(home) = self.this.upgrade() else {
            return Err("shutting down".into());
        };
        // Checked, registered and sent under the consumers' lock, which the
        // link takes to mark itself down: a consumer is either refused here or
        // registered with its `Consume` queued before the link goes down, and
        // then cancelled by `fail_all` (never registered and forgotten).
        let mut consumers = link.consumers.lock();
        if !link.up.load(Ordering::Acquire) {
            return Err(format!("node '{}' is down or inaccessible", link.node));
        }
        let cid = link.next_id.fetch_add(1, Ordering::Relaxed);
        let consumer = RemoteConsumer {
            home,
            cid,
            alive: Arc::new(AtomicBool::new(true)),
        };
        let tag = spec.tag.as_str().into();
        link.control(&Msg::Consume { cid, spec });
        consumers.insert(
            cid,
            Reg {
                sink,
                channel,
                tag,
                consumer: consumer.clone(),
            },
        );
        Ok(consumer)
    }

    fn settle(&self, cid: u64, tags: Vec<u64>, how: Settle) {
        self.link.control(&Msg::Settle { cid, tags, how });
    }

    fn cancel(&self, cid: u64) {
        self.link.consumers.lock().remove(&cid);
        self.link.control(&Msg::Cancel { cid });
    }

    fn release(&self, cid: u64) {
        self.link.consumers.lock().remove(&cid);
        self.link.control(&Msg::Release { cid });
    }
}

/// Keep the link to `link.node` connected: dial, serve, and on loss fail what
/// was unanswered and dial again.
async fn run_link(fwd: Arc<Forwarder>, link: Arc<Link>, mut rx: FrameRx, mut ctl_rx: CtlRx) {
    let weak = Arc::downgrade(&fwd);
    drop(fwd);
    let mut logged = false;
    loop {
        let Some(fwd) = weak.upgrade() else { return };
        let addr = fwd.address(&link.node);
        let ident = Arc::clone(&fwd.ident);
        drop(fwd);
        let conn = match addr {
            Some(addr) => open(&link.node, &addr, &ident).await,
            None => Err(CallError::Handshake(
                link.node.clone(),
                "not a member".into(),
            )),
        };
        match conn {
            Ok(conn) => {
                tracing::info!(node = %link.node, "data link up");
                logged = false;
                link.up.store(true, Ordering::Release);
                let why = serve_dialer(conn, &link, &mut rx, &mut ctl_rx).await;
                {
                    // Under the consumers' lock: see `RemoteQueue::consume`.
                    let _consumers = link.consumers.lock();
                    link.up.store(false, Ordering::Release);
                }
                tracing::warn!(node = %link.node, error = %why, "data link down");
                link.fail_all();
                while let Ok((id, _)) = rx.try_recv() {
                    link.answer(id, false, true);
                }
                // Consumer traffic of the old connection means nothing now.
                while ctl_rx.try_recv().is_ok() {}
            }
            Err(e) => {
                if !logged {
                    tracing::debug!(node = %link.node, error = %e, "data link cannot connect");
                    logged = true;
                }
            }
        }
        tokio::time::sleep(REDIAL).await;
    }
}

/// Dial `node` (its `[cluster] dial` override and TLS name checked as for any
/// inter-node connection) and turn the connection into a data link.
async fn open(node: &str, addr: &str, ident: &Identity) -> Result<Conn, CallError> {
    let mut conn = dial(ident, Some(node), addr).await?;
    conn.send((Kind::Link, ident.me.name.clone().into_bytes()))
        .await?;
    Ok(conn)
}

/// The dialer's side of a link: write what is queued, read answers.
async fn serve_dialer(conn: Conn, link: &Link, rx: &mut FrameRx, ctl_rx: &mut CtlRx) -> CallError {
    let (mut sink, mut stream) = conn.split();
    // A peer that stops answering without closing the socket (a partition, a
    // hung process) is found by the members' probes: the link is dropped
    // once they miss it, after a grace period for them to start.
    let opened = tokio::time::Instant::now();
    let mut probe = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = probe.tick() => {
                if opened.elapsed() > Duration::from_secs(2) {
                    let running = link.forwarder.upgrade().and_then(|f| f.running(&link.node));
                    if running == Some(false) {
                        return CallError::Timeout;
                    }
                }
            }
            out = ctl_rx.recv() => {
                let Some(bytes) = out else {
                    return CallError::Timeout;
                };
                if let Err(e) = sink.feed((Kind::Data, bytes)).await {
                    return e.into();
                }
                while let Ok(more) = ctl_rx.try_recv() {
                    if let Err(e) = sink.feed((Kind::Data, more)).await {
                        return e.into();
                    }
                }
                if let Err(e) = sink.flush().await {
                    return e.into();
                }
            }
            out = rx.recv() => {
                let Some((_, bytes)) = out else {
                    return CallError::Timeout;
                };
                if let Err(e) = sink.feed((Kind::Data, bytes)).await {
                    return e.into();
                }
                // Write out a burst together.
                while let Ok((_, more)) = rx.try_recv() {
                    if let Err(e) = sink.feed((Kind::Data, more)).await {
                        return e.into();
                    }
                }
                if let Err(e) = sink.flush().await {
                    return e.into();
                }
            }
            frame = stream.next() => {
                let frame: Frame = match frame {
                    Some(Ok(f)) => f,
                    Some(Err(e)) => return e.into(),
                    None => return std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into(),
                };
                if frame.kind != Kind::Data {
                    continue;
                }
                match decode(&frame.payload) {
                    Ok((Msg::Done { id, ok, why, resend }, _, _)) => {
                        if let Some(why) = why.filter(|_| !ok) {
                            tracing::debug!(node = %link.node, %why, "forwarded publish refused");
                        }
                        link.answer(id, ok, resend);
                    }
                    Ok((Msg::Deliver { cid, tag, redelivered, exchange, routing_key }, props, body)) => {
                        match message(&exchange, &routing_key, &props, body) {
                            Some(m) => link.delivered(cid, tag, redelivered, m, props),
                            None => return CallError::Handshake(link.node.clone(), "bad delivery".into()),
                        }
                    }
                    Ok((Msg::Reply { id, reply }, props, body)) => {
                        let msg = match &reply {
                            Ok(Reply::Got { exchange, routing_key, .. }) => {
                                message(exchange, routing_key, &props, body).map(|m| (m, props))
                            }
                            _ => None,
                        };
                        let waiter = link.requests.lock().remove(&id);
                        if let Some(w) = waiter {
                            let _ = w.send((reply, msg));
                        }
                    }
                    Ok((Msg::Consumed { cid }, _, _)) => link.answered(cid, Ok(())),
                    Ok((Msg::Cancelled { cid, code: 0, why }, _, _)) => {
                        tracing::debug!(node = %link.node, cid, %why, "remote consumer ended");
                        link.cancelled(cid);
                    }
                    Ok((Msg::Cancelled { cid, code, why }, _, _)) => {
                        tracing::debug!(node = %link.node, cid, %why, "remote consumer refused");
                        link.answered(cid, Err((code, why)));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        return CallError::Handshake(link.node.clone(), e);
                    }
                }
            }
        }
    }
}

/// The home node's side of a data link (the connection's first frame after
/// the handshake was [`Kind::Link`]): take publishes and answer each; serve
/// the consumers the other node opens here.
pub(super) async fn serve_link(conn: Conn, c: Arc<Cluster>, peer: String) -> Result<(), CallError> {
    let (mut sink, mut stream) = conn.split();
    // Answers and deliveries: bounded by the dialer's window of unanswered
    // publishes and by the consumers' windows.
    let (tx, mut rx) = mpsc::unbounded_channel::<Vec<u8>>();
    let writer = tokio::spawn(async move {
        while let Some(bytes) = rx.recv().await {
            if sink.feed((Kind::Data, bytes)).await.is_err() {
                return;
            }
            while let Ok(more) = rx.try_recv() {
                if sink.feed((Kind::Data, more)).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    });
    let broker = Arc::clone(&c.broker);
    let quorum = Arc::clone(&c.quorum);
    drop(c);
    tracing::debug!(node = %peer, "data link accepted");
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<SinkEvent>();
    let mut home = Served {
        broker: Arc::clone(&broker),
        out: tx.clone(),
        events: ev_tx,
        consumers: HashMap::new(),
    };
    let r = loop {
        let frame = tokio::select! {
            ev = ev_rx.recv() => {
                if let Some(ev) = ev {
                    home.on_sink(ev);
                }
                continue;
            }
            frame = stream.next() => frame,
        };
        let frame = match frame {
            Some(Ok(f)) => f,
            Some(Err(e)) => break Err(e.into()),
            None => break Ok(()),
        };
        if frame.kind != Kind::Data {
            continue;
        }
        let (msg, props, body) = match decode(&frame.payload) {
            Ok(d) => d,
            Err(e) => break Err(CallError::Handshake(peer.clone(), e)),
        };
        match msg {
            Msg::Publish {
                id,
                vhost,
                queue,
                exchange,
                routing_key,
                seq,
            } => {
                let tx = tx.clone();
                let Some(seq) = seq else {
                    take_publish(
                        &broker,
                        &vhost,
                        &queue,
                        &exchange,
                        &routing_key,
                        &props,
                        body,
                        move |ok, why| done_to(&tx, id, ok, why, false),
                    );
                    continue;
                };
                let done = move |a: quorum_pub::Answer| {
                    let (ok, why, resend) = quorum_done(a);
                    done_to(&tx, id, ok, why, resend);
                };
                match message(&exchange, &routing_key, &props, body) {
                    Some(m) => quorum.take_forwarded(&vhost, &queue, &m, seq, Box::new(done)),
                    None => done(quorum_pub::Answer::Refused),
                }
            }
            Msg::Consume { cid, spec } => home.consume(cid, spec),
            Msg::Settle { cid, tags, how } => home.settle(cid, tags, how),
            Msg::Cancel { cid } => home.cancel(cid),
            Msg::Release { cid } => home.release(cid),
            Msg::Request {
                id,
                vhost,
                queue,
                op,
            } => home.request(id, &vhost, &queue, op, body),
            Msg::Done { .. }
            | Msg::Deliver { .. }
            | Msg::Consumed { .. }
            | Msg::Cancelled { .. }
            | Msg::Reply { .. } => {}
        }
    };
    // The other node is gone: its consumers here end (detached first, so no
    // queue hands them anything more), the deliveries their queues handed
    // them that this task had not taken yet go back untouched (dropped with
    // the channel they would stay unacked for good, owned by nobody), and
    // their unacked deliveries go back redelivered.
    let cids: Vec<u64> = home.consumers.keys().copied().collect();
    for &cid in &cids {
        home.cancel(cid);
    }
    while let Ok(ev) = ev_rx.try_recv() {
        home.on_sink(ev);
    }
    for cid in cids {
        home.release(cid);
    }
    drop(home);
    drop(tx);
    let _ = writer.await;
    r
}

/// What a link's consumer sinks hand the link task (from under a queue's lock).
enum SinkEvent {
    Deliver(u64, Delivery),
    Cancelled(u64),
}

/// The [`DeliverySink`] of a consumer another node opened here.
#[derive(Debug)]
struct LinkSink {
    cid: u64,
    events: mpsc::UnboundedSender<SinkEvent>,
}

impl DeliverySink for LinkSink {
    fn deliver(&self, d: Delivery) -> Result<(), Delivery> {
        match self.events.send(SinkEvent::Deliver(self.cid, d)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::SendError(SinkEvent::Deliver(_, d))) => Err(d),
            Err(_) => Ok(()),
        }
    }

    fn cancelled(&self, _channel: u16, _tag: Arc<str>) {
        let _ = self.events.send(SinkEvent::Cancelled(self.cid));
    }
}

/// One consumer another node opened on a queue homed here.
struct Served1 {
    queue: Arc<Queue>,
    /// The broker connection id it is attached under (one per consumer).
    connection: u64,
    tag: Arc<str>,
    /// None once cancelled (its unacked deliveries may still be settled).
    consumer: Option<Arc<Consumer>>,
    unacked: std::collections::BTreeMap<u64, crate::broker::message::Entry>,
    next_tag: u64,
}

/// The consumers served over one link.
struct Served {
    broker: Arc<Broker>,
    out: mpsc::UnboundedSender<Vec<u8>>,
    events: mpsc::UnboundedSender<SinkEvent>,
    consumers: HashMap<u64, Served1>,
}

impl Served {
    /// Consumer `cid` could not be opened (`code` nonzero: the refusal's
    /// reply code) or ended (0).
    fn refuse(&self, cid: u64, code: u16, why: String) {
        let _ = self
            .out
            .send(encode(&Msg::Cancelled { cid, code, why }, None));
    }

    fn consume(&mut self, cid: u64, spec: RemoteConsume) {
        let now = crate::clock::now_ms();
        let q = self
            .broker
            .vhost(&spec.vhost)
            .and_then(|v| v.queue(&spec.queue, 0).ok());
        let Some(q) = q.filter(|q| q.remote().is_none()) else {
            return self.refuse(
                cid,
                crate::wire::reply_code::NOT_FOUND,
                format!(
                    "NOT_FOUND - no queue '{}' in vhost '{}'",
                    spec.queue, spec.vhost
                ),
            );
        };
        let arguments = crate::cluster::command::Args(spec.arguments).table();
        let tag: Arc<str> = spec.tag.as_str().into();
        let connection = self.broker.next_connection_id();
        let consumer = Arc::new(Consumer {
            tag: Arc::clone(&tag),
            connection,
            channel: 1,
            no_ack: false,
            exclusive: spec.exclusive,
            priority: spec.priority,
            arguments,
            credit: Credit::new(if spec.prefetch == 0 {
                REMOTE_PREFETCH
            } else {
                spec.prefetch
            }),
            channel_credit: Credit::new(0),
            flow: Arc::new(AtomicBool::new(true)),
            sink: Arc::new(LinkSink {
                cid,
                events: self.events.clone(),
            }),
        });
        if let Some(origin) = spec.origin {
            let origins = &self.broker.remote_origins;
            origins.lock().insert(connection, Arc::new(origin));
        }
        // Registered first: the first deliveries may come at once.
        self.consumers.insert(
            cid,
            Served1 {
                queue: Arc::clone(&q),
                connection,
                tag,
                consumer: Some(Arc::clone(&consumer)),
                unacked: Default::default(),
                next_tag: 1,
            },
        );
        if let Err(e) = q.add_consumer(consumer, now) {
            self.consumers.remove(&cid);
            self.broker.remote_origins.lock().remove(&connection);
            self.refuse(cid, e.code, e.text);
        } else {
            let _ = self.out.send(encode(&Msg::Consumed { cid }, None));
        }
    }

    fn on_sink(&mut self, ev: SinkEvent) {
        let now = crate::clock::now_ms();
        match ev {
            SinkEvent::Deliver(cid, d) => {
                let Some(s) = self
                    .consumers
                    .get_mut(&cid)
                    .filter(|s| s.consumer.is_some())
                else {
                    // Cancelled meanwhile: back untouched.
                    d.queue.requeue(vec![d.entry], true, false, now);
                    return;
                };
                let tag = s.next_tag;
                s.next_tag += 1;
                let m = &d.entry.message;
                let mut props = bytes::BytesMut::new();
                d.entry.encode_properties(&mut props);
                let header = serde_json::to_vec(&Msg::Deliver {
                    cid,
                    tag,
                    redelivered: d.entry.redelivered,
                    exchange: m.exchange.to_string(),
                    routing_key: m.routing_key.to_string(),
                })
                .unwrap_or_default();
                let _ = self.out.send(pack(&header, &props, &m.body));
                s.unacked.insert(tag, d.entry);
            }
            SinkEvent::Cancelled(cid) => {
                if let Some(s) = self.consumers.get_mut(&cid) {
                    s.consumer = None;
                }
                self.refuse(cid, 0, "queue deleted".into());
            }
        }
    }

    /// Answer a queue operation.
    fn request(&mut self, id: u64, vhost: &str, queue: &str, op: Op, body: bytes::Bytes) {
        let now = crate::clock::now_ms();
        let v = self.broker.vhost(vhost);
        let q = v
            .as_ref()
            .and_then(|v| v.queue(queue, 0).ok())
            .filter(|q| q.remote().is_none());
        let (Some(v), Some(q)) = (v, q) else {
            let reply = Err((
                crate::wire::reply_code::NOT_FOUND,
                format!("NOT_FOUND - no queue '{queue}' in vhost '{vhost}'"),
            ));
            let _ = self.out.send(encode(&Msg::Reply { id, reply }, None));
            return;
        };
        let err = |e: crate::error::AmqpError| Err((e.code, e.text));
        let mut attached: Option<(bytes::BytesMut, bytes::Bytes)> = None;
        let reply = match op {
            Op::Info => {
                let st = q.stats(now);
                Ok(Reply::Info {
                    messages: st.ready as u64,
                    consumers: st.consumers as u64,
                    unacked: st.unacked as u64,
                })
            }
            Op::Purge => match v.purge_queue(queue, 0) {
                Ok(n) => Ok(Reply::Purged { messages: n as u64 }),
                Err(e) => err(e),
            },
            Op::DeleteCheck {
                if_unused,
                if_empty,
            } => match q.delete_refusal(if_unused, if_empty, now) {
                Some(e) => err(e),
                None => Ok(Reply::Checked {
                    messages: q.stats(now).ready as u64,
                }),
            },
            Op::Stream(op) => return self.stream_request(id, &q, op, &body),
            Op::Get { waited: false, .. } if q.get_waits_for().is_some() => Ok(Reply::NotYet),
            Op::Get { no_ack, cid, .. } => match q.get(no_ack, now) {
                None => Ok(Reply::Empty),
                Some((entry, remaining)) => {
                    let m = Arc::clone(&entry.message);
                    let mut props = bytes::BytesMut::new();
                    entry.encode_properties(&mut props);
                    attached = Some((props, m.body.clone()));
                    let redelivered = entry.redelivered;
                    let mut tag = 0;
                    if !no_ack {
                        let s = self.consumers.entry(cid).or_insert_with(|| Served1 {
                            queue: Arc::clone(&q),
                            connection: 0,
                            tag: "".into(),
                            consumer: None,
                            unacked: Default::default(),
                            next_tag: 1,
                        });
                        tag = s.next_tag;
                        s.next_tag += 1;
                        s.unacked.insert(tag, entry);
                    }
                    Ok(Reply::Got {
                        tag,
                        redelivered,
                        remaining: remaining as u64,
                        exchange: m.exchange.to_string(),
                        routing_key: m.routing_key.to_string(),
                    })
                }
            },
        };
        let header = serde_json::to_vec(&Msg::Reply { id, reply }).unwrap_or_default();
        let bytes = match attached {
            Some((props, body)) => pack(&header, &props, &body),
            None => pack(&header, &[], &[]),
        };
        let _ = self.out.send(bytes);
    }

    /// A Stream protocol request for the stream `q` homed here, from a
    /// client on the other node: answered at once, a publish once its
    /// entries are fsynced (what a confirm promises).
    fn stream_request(&self, id: u64, q: &Arc<Queue>, op: StreamOp, body: &[u8]) {
        use crate::session::stream::error_code;
        use crate::wire::stream::code;
        let out = self.out.clone();
        let answer = move |a: StreamAnswer| {
            let reply = Ok(Reply::Stream(a));
            let _ = out.send(encode(&Msg::Reply { id, reply }, None));
        };
        let (Some(log), Some(streams)) = (q.stream().cloned(), self.broker.streams.clone()) else {
            return answer(StreamAnswer::Failed(code::STREAM_DOES_NOT_EXIST));
        };
        let (reference, entries, pipelined) = match op {
            StreamOp::PublisherSequence { reference } => {
                return answer(StreamAnswer::Sequence(log.publisher_sequence(&reference)));
            }
            StreamOp::StoreOffset { reference, offset } => {
                return answer(match log.store_offset(&reference, offset) {
                    Ok(()) => StreamAnswer::Stored,
                    Err(e) => StreamAnswer::Failed(error_code(&e)),
                });
            }
            StreamOp::Publish {
                reference,
                entries,
                pipelined,
            } => (reference, entries, pipelined),
        };
        let mut at = 0usize;
        let mut msgs = Vec::with_capacity(entries.len());
        for e in &entries {
            let end = at.saturating_add(e.len as usize);
            let Some(data) = body.get(at..end) else {
                return answer(StreamAnswer::Failed(code::INTERNAL_ERROR));
            };
            at = end;
            msgs.push(crate::storage::stream::NewMessage {
                data,
                filter: e.filter.as_deref(),
                publishing_id: e.id,
                batch: e
                    .batch
                    .map(|(compression, records, uncompressed_len)| SubBatch {
                        compression,
                        records,
                        uncompressed_len,
                    }),
            });
        }
        let reference: Option<Arc<str>> = reference.map(Arc::from);
        let now = crate::clock::now_ms() as i64;
        let appended = match log.append_from(reference.as_ref(), msgs, now, pipelined) {
            Ok(a) => a,
            Err(e) => return answer(StreamAnswer::Failed(error_code(&e))),
        };
        let duplicates = appended.duplicates.iter().map(|&i| i as u32).collect();
        // Answered when the stream store has fsynced it, as an AMQP
        // publisher's confirm to a stream is (`StreamStore::on_durable`).
        streams.on_durable(Box::new(move |r| {
            answer(match r {
                // Deleted meanwhile: what was not written never will be.
                Ok(()) if log.is_deleted() => StreamAnswer::Failed(code::STREAM_DOES_NOT_EXIST),
                Ok(()) => StreamAnswer::Published { duplicates },
                Err(e) => StreamAnswer::Failed(error_code(&e)),
            })
        }));
    }

    fn settle(&mut self, cid: u64, tags: Vec<u64>, how: Settle) {
        let now = crate::clock::now_ms();
        let Some(s) = self.consumers.get_mut(&cid) else {
            return;
        };
        let entries: Vec<_> = tags.iter().filter_map(|t| s.unacked.remove(t)).collect();
        if entries.is_empty() {
            return;
        }
        if let Some(c) = &s.consumer {
            c.credit.release(entries.len() as u32);
            c.channel_credit.release(entries.len() as u32);
        }
        let q = Arc::clone(&s.queue);
        match how {
            Settle::Ack => q.ack(&entries, now),
            Settle::Requeue => q.requeue(entries, true, true, now),
            Settle::Unsent => q.requeue(entries, true, false, now),
            Settle::Reject => q.reject(entries, now),
        }
        q.dispatch(now);
    }

    fn cancel(&mut self, cid: u64) {
        let now = crate::clock::now_ms();
        let Some(s) = self.consumers.get_mut(&cid) else {
            return;
        };
        if s.consumer.take().is_some() {
            if let Some(v) = self.broker.vhost(&s.queue.spec.vhost) {
                v.cancel_consumer(&s.queue, s.connection, 1, &s.tag, now);
            }
        }
        self.broker.remote_origins.lock().remove(&s.connection);
    }

    fn release(&mut self, cid: u64) {
        self.cancel(cid);
        let now = crate::clock::now_ms();
        if let Some(s) = self.consumers.remove(&cid) {
            let entries: Vec<_> = s.unacked.into_values().collect();
            s.queue.requeue(entries, true, true, now);
            s.queue.dispatch(now);
        }
    }
}

/// Answer publish `id` on a data link (a `Done`).
fn done_to(
    tx: &mpsc::UnboundedSender<Vec<u8>>,
    id: u64,
    ok: bool,
    why: Option<String>,
    resend: bool,
) {
    let done = Msg::Done {
        id,
        ok,
        why,
        resend,
    };
    let _ = tx.send(encode(&done, None));
}

/// Enqueue a forwarded message here, its home; `answer` once it is taken
/// (after the fsync when the copy is durable) or refused.
#[allow(clippy::too_many_arguments)]
fn take_publish(
    broker: &Arc<Broker>,
    vhost: &str,
    queue: &str,
    exchange: &str,
    routing_key: &str,
    props: &[u8],
    body: bytes::Bytes,
    answer: impl FnOnce(bool, Option<String>) + Send + 'static,
) {
    let Some(m) = message(exchange, routing_key, props, body) else {
        return answer(false, Some("bad message properties".into()));
    };
    let Some(v) = broker.vhost(vhost) else {
        return answer(false, Some(format!("no vhost '{vhost}'")));
    };
    let now = crate::clock::now_ms();
    // A replicated quorum queue served here: proposed to its group, answered
    // once committed.
    if let Some(replica) = v
        .queue(queue, 0)
        .ok()
        .filter(|q| q.remote().is_none())
        .and_then(|q| q.replica())
    {
        let ticket = Ticket::new();
        replica.enqueue(&m, &ticket);
        ticket.on_done(move |ok| answer(ok, (!ok).then(|| "not committed".to_string())));
        ticket.seal();
        return;
    }
    match v.enqueue_forwarded(queue, m, now) {
        None => answer(false, Some(format!("no queue '{queue}' homed here"))),
        Some(Enqueued::Rejected) => answer(false, Some("rejected (x-overflow)".into())),
        Some(Enqueued::Accepted { durable: false }) => answer(true, None),
        Some(Enqueued::Accepted { durable: true }) => {
            let streams = broker.streams.clone();
            let then_streams = move |ok: bool| match (ok, streams) {
                (true, Some(s)) => s.on_durable(Box::new(move |r| answer(r.is_ok(), None))),
                (ok, _) => answer(ok, (!ok).then(|| "not written to disk".to_string())),
            };
            match &broker.store {
                Some(store) => store.on_durable(Box::new(move |r| then_streams(r.is_ok()))),
                None => then_streams(true),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::BasicProperties;

    #[test]
    fn a_publish_round_trips_with_its_message() {
        let props = BasicProperties {
            delivery_mode: Some(2),
            content_type: Some("text/plain".into()),
            ..Default::default()
        };
        let m = Message::new("x", "k", props.clone(), bytes::Bytes::from_static(b"hello"));
        let msg = Msg::Publish {
            id: 7,
            vhost: "/".into(),
            queue: "q".into(),
            exchange: "x".into(),
            routing_key: "k".into(),
            seq: Some((3, 9)),
        };
        let payload = bytes::Bytes::from(encode(&msg, Some(&m)));
        let (back, p, body) = decode(&payload).unwrap();
        assert_eq!(back, msg);
        let m2 = message("x", "k", &p, body).unwrap();
        assert_eq!(&m2.body[..], b"hello");
        assert_eq!(m2.properties.delivery_mode, Some(2));
        assert_eq!(m2.properties.content_type.as_deref(), Some("text/plain"));
        let done = Msg::Done {
            id: 7,
            ok: false,
            why: Some("no queue".into()),
            resend: true,
        };
        let (back, p, b) = decode(&bytes::Bytes::from(encode(&done, None))).unwrap();
        assert_eq!((back, p.len(), b.len()), (done, 0, 0));
        assert!(decode(&bytes::Bytes::from_static(b"\0\0\0\x02{}")).is_err());
    }

    /// A delivery for a consumer cancelled on this node while it was on the
    /// wire goes back to the home node's queue (else it would stay unacked
    /// there until the channel closed).
    #[test]
    fn a_delivery_for_a_consumer_gone_here_is_requeued_at_home() {
        let (link, _rx, mut ctl_rx) = Link::new("a", Weak::new());
        let m = Message::new(
            "",
            "q",
            Default::default(),
            bytes::Bytes::from_static(b"late"),
        );
        link.delivered(4, 12, false, m, bytes::Bytes::new());
        let sent = ctl_rx.try_recv().expect("a settle went back");
        let (msg, _, _) = decode(&bytes::Bytes::from(sent)).unwrap();
        assert_eq!(
            msg,
            Msg::Settle {
                cid: 4,
                tags: vec![12],
                how: Settle::Unsent
            }
        );
        assert!(ctl_rx.try_recv().is_err(), "one settle only");
    }
}
