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

use super::frame::{pack, unpack, Frame, FrameCodec, Kind};
use super::network::{dial, CallError};
use super::{Cluster, Identity};
use crate::broker::message::Message;
use crate::broker::queue::{Enqueued, QueueType};
use crate::broker::remote::{RemoteHome, Ticket};
use crate::broker::Broker;
use futures::{SinkExt, StreamExt};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::codec::Framed;

/// Publishes per link waiting for the home node's answer, at most.
pub const MAX_INFLIGHT: usize = 8192;
/// Frames per link waiting to be written, at most.
pub const QUEUE_FRAMES: usize = 4096;
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
    },
    /// The outcome of request `id`: taken (after the fsync a durable copy
    /// needs), or not (`why`).
    Done {
        id: u64,
        ok: bool,
        why: Option<String>,
    },
}

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

type Conn = Framed<TcpStream, FrameCodec>;

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
        let (tx, rx) = mpsc::channel(QUEUE_FRAMES);
        let link = Arc::new(Link {
            node: node.to_string(),
            tx,
            up: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
            pending: Mutex::new(HashMap::new()),
            forwarder: Arc::downgrade(self),
        });
        links.insert(node.to_string(), Arc::clone(&link));
        tokio::spawn(run_link(Arc::clone(self), Arc::clone(&link), rx));
        link
    }

    /// Whether `node`'s link is connected now.
    pub fn is_up(&self, node: &str) -> bool {
        self.links
            .lock()
            .get(node)
            .is_some_and(|l| l.up.load(Ordering::Acquire))
    }

    /// Every link has room for more publishes (under half its window).
    pub fn has_room(&self) -> bool {
        self.links
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
    /// another (then publishes here go there). Quorum queues are left alone.
    pub fn mark(self: &Arc<Self>, broker: &Broker, vhost: &str, name: &str, home: &str) {
        let Some(v) = broker.vhost(vhost) else { return };
        let Ok(q) = v.queue(name, 0) else { return };
        if home == self.ident.me.name || q.queue_type() == QueueType::Quorum {
            q.set_remote(None);
            return;
        }
        if q.remote().is_some_and(|r| r.node() == home) {
            return;
        }
        let link = self.link(home);
        q.set_remote(Some(Arc::new(RemoteQueue { link })));
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
    pending: Mutex<HashMap<u64, Arc<Ticket>>>,
    forwarder: Weak<Forwarder>,
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
    /// Send one publish; `ticket` settles with the home node's answer.
    fn publish(&self, vhost: &str, queue: &str, message: &Arc<Message>, ticket: &Arc<Ticket>) {
        ticket.expect();
        if !self.up.load(Ordering::Acquire) {
            return ticket.settle(false);
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        {
            let mut pending = self.pending.lock();
            if pending.len() >= MAX_INFLIGHT {
                drop(pending);
                return ticket.settle(false);
            }
            pending.insert(id, Arc::clone(ticket));
        }
        let msg = Msg::Publish {
            id,
            vhost: vhost.to_string(),
            queue: queue.to_string(),
            exchange: message.exchange.to_string(),
            routing_key: message.routing_key.to_string(),
        };
        let sent = self.tx.try_send((id, encode(&msg, Some(message)))).is_ok();
        // Down meanwhile: the task failed what it saw pending; fail this one too.
        if !sent || !self.up.load(Ordering::Acquire) {
            self.answer(id, false);
        }
    }

    /// Settle request `id` (once).
    fn answer(&self, id: u64, ok: bool) {
        let t = self.pending.lock().remove(&id);
        if let Some(t) = t {
            t.settle(ok);
            if let Some(f) = self.forwarder.upgrade() {
                f.room.notify_waiters();
            }
        }
    }

    /// The link went down: every publish not answered is lost to its publisher.
    fn fail_all(&self) {
        let all: Vec<Arc<Ticket>> = self.pending.lock().drain().map(|(_, t)| t).collect();
        for t in all {
            t.settle(false);
        }
        if let Some(f) = self.forwarder.upgrade() {
            f.room.notify_waiters();
        }
    }
}

/// A queue homed on another node, as the vhost sees it.
#[derive(Debug)]
pub struct RemoteQueue {
    link: Arc<Link>,
}

impl RemoteHome for RemoteQueue {
    fn node(&self) -> &str {
        &self.link.node
    }

    fn forward(&self, vhost: &str, queue: &str, message: &Arc<Message>, ticket: &Arc<Ticket>) {
        self.link.publish(vhost, queue, message, ticket);
    }
}

/// Keep the link to `link.node` connected: dial, serve, and on loss fail what
/// was unanswered and dial again.
async fn run_link(fwd: Arc<Forwarder>, link: Arc<Link>, mut rx: mpsc::Receiver<(u64, Vec<u8>)>) {
    let weak = Arc::downgrade(&fwd);
    drop(fwd);
    let mut logged = false;
    loop {
        let Some(fwd) = weak.upgrade() else { return };
        let addr = fwd.address(&link.node);
        let ident = Arc::clone(&fwd.ident);
        drop(fwd);
        let conn = match addr {
            Some(addr) => open(&addr, &ident).await,
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
                let why = serve_dialer(conn, &link, &mut rx).await;
                link.up.store(false, Ordering::Release);
                tracing::warn!(node = %link.node, error = %why, "data link down");
                link.fail_all();
                while let Ok((id, _)) = rx.try_recv() {
                    link.answer(id, false);
                }
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

/// Dial and turn the connection into a data link.
async fn open(addr: &str, ident: &Identity) -> Result<Conn, CallError> {
    let mut conn = dial(addr, &ident.cookie, &ident.me, ident.id).await?;
    conn.send((Kind::Link, ident.me.name.clone().into_bytes()))
        .await?;
    Ok(conn)
}

/// The dialer's side of a link: write what is queued, read answers.
async fn serve_dialer(
    conn: Conn,
    link: &Link,
    rx: &mut mpsc::Receiver<(u64, Vec<u8>)>,
) -> CallError {
    let (mut sink, mut stream) = conn.split();
    loop {
        tokio::select! {
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
                    Ok((Msg::Done { id, ok, why }, _, _)) => {
                        if let Some(why) = why.filter(|_| !ok) {
                            tracing::debug!(node = %link.node, %why, "forwarded publish refused");
                        }
                        link.answer(id, ok);
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
/// the handshake was [`Kind::Link`]): take publishes, answer each.
pub(super) async fn serve_link(conn: Conn, c: Arc<Cluster>, peer: String) -> Result<(), CallError> {
    let (mut sink, mut stream) = conn.split();
    // Answers: bounded by the dialer's window of unanswered publishes.
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
    drop(c);
    tracing::debug!(node = %peer, "data link accepted");
    let r = loop {
        let frame = match stream.next().await {
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
            } => {
                let tx = tx.clone();
                take_publish(
                    &broker,
                    &vhost,
                    &queue,
                    &exchange,
                    &routing_key,
                    &props,
                    body,
                    move |ok, why| {
                        let _ = tx.send(encode(&Msg::Done { id, ok, why }, None));
                    },
                );
            }
            Msg::Done { .. } => {}
        }
    };
    drop(tx);
    let _ = writer.await;
    r
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
        };
        let (back, p, b) = decode(&bytes::Bytes::from(encode(&done, None))).unwrap();
        assert_eq!((back, p.len(), b.len()), (done, 0, 0));
        assert!(decode(&bytes::Bytes::from_static(b"\0\0\0\x02{}")).is_err());
    }
}
