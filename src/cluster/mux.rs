//! The quorum queue groups' RPCs multiplexed over one connection per peer
//! (as Ra shares one Erlang distribution link per node pair): a dialed
//! connection ([`super::network::dial`], so the same TLS and cookie
//! handshake) turned into a multiplexed one by a [`Kind::Mux`] frame. Then
//! the dialer sends [`Kind::Quorum`] frames and the listener answers
//! [`Kind::Reply`] frames, each payload headed by the request's id (8 bytes,
//! big-endian), the replies in whatever order their requests finish.
//!
//! Every group of a node heartbeats its followers at the same tick
//! (`quorum::elect`), so a tick's heartbeats to one peer leave in a few
//! writes and their replies come back the same way: a thousand idle groups
//! cost a node a few system calls per tick and peer, not a thousand
//! (one request per pooled connection, before).
//!
//! Bounded: at most [`IN_FLIGHT_MAX`] requests wait for a reply on one
//! connection, and as many frames for the write, on either side (a call
//! past it fails at once; the listener stops reading until a handler
//! finishes). A connection over which nothing at all came back for as long
//! as a call waited (a link cut without a reset) is closed, and the next
//! call dials again. Requests and replies are written by the callers and
//! handlers themselves ([`Writer`]), not handed to a task.

use super::frame::Kind;
use super::network::{dial, CallError, Conn};
use super::{Cluster, Identity};
use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use futures::{SinkExt, StreamExt};
use parking_lot::Mutex;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{oneshot, Semaphore};
use tokio::task::AbortHandle;
use tokio::time::Instant;

/// Requests waiting for their replies on one connection, at most.
pub const IN_FLIGHT_MAX: usize = 4096;

/// The request id at the head of every frame's payload (big-endian).
pub const ID_LEN: usize = 8;

/// A dial under way or done (shared by the calls that wait for it).
type Dialing = Shared<BoxFuture<'static, Result<Arc<MuxConn>, (std::io::ErrorKind, String)>>>;

/// This node's multiplexed connections, by peer address.
#[derive(Default)]
pub struct Muxes {
    conns: Mutex<HashMap<String, Dialing>>,
}

impl Muxes {
    /// Send `frame` (a [`Kind::Quorum`] request after [`ID_LEN`] bytes of
    /// room, where its id is written) to the node `name` at `addr` and wait
    /// at most `timeout` for its reply.
    pub async fn call(
        &self,
        ident: &Arc<Identity>,
        name: Option<&str>,
        addr: &str,
        frame: Vec<u8>,
        timeout: Duration,
    ) -> Result<Bytes, CallError> {
        let deadline = Instant::now() + timeout;
        let conn = match tokio::time::timeout_at(deadline, self.get(ident, name, addr)).await {
            Ok(r) => r?,
            Err(_) => return Err(CallError::Timeout),
        };
        conn.call(frame, deadline, timeout).await
    }

    /// The connection to `addr`: the open one, the dial under way, or a
    /// new dial (in a task of its own, so a slow link still ends up
    /// connected when the calls that waited for it gave up).
    async fn get(
        &self,
        ident: &Arc<Identity>,
        name: Option<&str>,
        addr: &str,
    ) -> Result<Arc<MuxConn>, CallError> {
        let dialing = {
            let mut conns = self.conns.lock();
            let usable = conns.get(addr).and_then(|d| match d.peek() {
                Some(Ok(c)) if !c.closed.load(Ordering::Acquire) => Some(Ok(Arc::clone(c))),
                Some(_) => None,
                None => Some(Err(d.clone())),
            });
            match usable {
                Some(Ok(conn)) => return Ok(conn),
                Some(Err(dialing)) => dialing,
                None => {
                    let (ident, name, to) = (
                        Arc::clone(ident),
                        name.map(str::to_string),
                        addr.to_string(),
                    );
                    let task = tokio::spawn(async move {
                        let mut conn = dial(&ident, name.as_deref(), &to).await?;
                        conn.send((Kind::Mux, Vec::new())).await?;
                        Ok::<_, CallError>(MuxConn::start(conn))
                    });
                    let dialing: Dialing = async move {
                        match task.await {
                            Ok(Ok(conn)) => Ok(conn),
                            Ok(Err(CallError::Io(e))) => Err((e.kind(), e.to_string())),
                            Ok(Err(e)) => Err((std::io::ErrorKind::Other, e.to_string())),
                            Err(e) => Err((std::io::ErrorKind::Other, e.to_string())),
                        }
                    }
                    .boxed()
                    .shared();
                    conns.insert(addr.to_string(), dialing.clone());
                    dialing
                }
            }
        };
        dialing
            .await
            .map_err(|(kind, why)| CallError::Io(std::io::Error::new(kind, why)))
    }
}

/// One multiplexed connection, dialer's side: callers write their requests
/// themselves ([`Writer`]), a reader task hands each reply to the call
/// waiting for its id.
struct MuxConn {
    writer: Writer,
    waiting: Mutex<HashMap<u64, oneshot::Sender<Bytes>>>,
    next_id: AtomicU64,
    closed: AtomicBool,
    /// When the reader last took a reply.
    last_read: Mutex<Instant>,
    reader: Mutex<Option<AbortHandle>>,
}

impl MuxConn {
    fn start(conn: Conn) -> Arc<MuxConn> {
        let (sink, stream) = conn.split();
        let me = Arc::new(MuxConn {
            writer: Writer::new(sink, Kind::Quorum),
            waiting: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            last_read: Mutex::new(Instant::now()),
            reader: Mutex::new(None),
        });
        let reader = tokio::spawn({
            let me = Arc::downgrade(&me);
            let mut stream = stream;
            async move {
                let why = loop {
                    let frame = match stream.next().await {
                        Some(Ok(f)) => f,
                        Some(Err(e)) => break e.to_string(),
                        None => break "closed by the peer".to_string(),
                    };
                    let Some(me) = me.upgrade() else { return };
                    if frame.kind != Kind::Reply || frame.payload.len() < ID_LEN {
                        break format!("unexpected {:?} frame", frame.kind);
                    }
                    let mut id = [0u8; ID_LEN];
                    id.copy_from_slice(&frame.payload[..ID_LEN]);
                    *me.last_read.lock() = Instant::now();
                    // A call that gave up (timed out) has no sender here.
                    let tx = me.waiting.lock().remove(&u64::from_be_bytes(id));
                    if let Some(tx) = tx {
                        let _ = tx.send(frame.payload.slice(ID_LEN..));
                    }
                };
                if let Some(me) = me.upgrade() {
                    tracing::debug!(%why, "multiplexed inter-node connection: reader ended");
                    me.close();
                }
            }
        });
        *me.reader.lock() = Some(reader.abort_handle());
        me
    }

    /// Closed for good: the reader stopped, every waiting call told at
    /// once (its reply will not come); the socket closes when the last
    /// call holding the connection lets it go.
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        if let Some(t) = self.reader.lock().take() {
            t.abort();
        }
        self.waiting.lock().clear();
    }

    async fn call(
        &self,
        mut frame: Vec<u8>,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Bytes, CallError> {
        if frame.len() < ID_LEN {
            return Err(CallError::Io(std::io::Error::other(
                "a request without room for its id",
            )));
        }
        let lost = || CallError::Io(std::io::ErrorKind::ConnectionReset.into());
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut waiting = self.waiting.lock();
            if self.closed.load(Ordering::Acquire) {
                return Err(lost());
            }
            if waiting.len() >= IN_FLIGHT_MAX {
                return Err(CallError::Io(std::io::Error::other(
                    "too many requests in flight to the peer",
                )));
            }
            waiting.insert(id, tx);
        }
        let _forget = Forget(self, id);
        frame[..ID_LEN].copy_from_slice(&id.to_be_bytes());
        match tokio::time::timeout_at(deadline, self.writer.send(frame)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                self.close();
                return Err(e.into());
            }
            Err(_) => return Err(CallError::Timeout),
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(reply)) => Ok(reply),
            Ok(Err(_)) => Err(lost()),
            Err(_) => {
                // Nothing came back for the whole wait, for any call: the
                // link is most likely cut (no reset came); the next call
                // dials again.
                if self.last_read.lock().elapsed() >= timeout {
                    tracing::debug!("multiplexed inter-node connection silent: closed");
                    self.close();
                }
                Err(CallError::Timeout)
            }
        }
    }
}

/// Takes a call's id out of the waiting ones when the call ends (answered,
/// timed out or dropped), so abandoned calls leave nothing behind.
struct Forget<'a>(&'a MuxConn, u64);

impl Drop for Forget<'_> {
    fn drop(&mut self) {
        self.0.waiting.lock().remove(&self.1);
    }
}

type Sink = futures::stream::SplitSink<Conn, (Kind, Vec<u8>)>;

/// A connection's write half, written by whoever sends (flat combining): a
/// frame joins the queue, and a sender that finds the half free writes
/// every queued frame (its own, and those of the senders that found it
/// busy meanwhile) and flushes them together. No task of its own and no
/// hand-off: a lone request is written by its caller, a burst of them in a
/// few writes.
struct Writer {
    kind: Kind,
    queue: Mutex<VecDeque<Vec<u8>>>,
    sink: tokio::sync::Mutex<Sink>,
}

impl Writer {
    fn new(sink: Sink, kind: Kind) -> Writer {
        Writer {
            kind,
            queue: Mutex::new(VecDeque::new()),
            sink: tokio::sync::Mutex::new(sink),
        }
    }

    /// Queue `frame` (a `kind` frame's payload) and write what is queued
    /// unless another sender is writing (it takes this one too). A frame
    /// leaves the queue only once the connection has room for it, so a
    /// sender dropped while it writes loses none; what it had written but
    /// not flushed goes out with the next flush.
    async fn send(&self, frame: Vec<u8>) -> std::io::Result<()> {
        use futures::Sink as _;
        {
            let mut queue = self.queue.lock();
            if queue.len() >= IN_FLIGHT_MAX {
                return Err(std::io::Error::other(
                    "too many frames waiting to be written",
                ));
            }
            queue.push_back(frame);
        }
        loop {
            let Ok(mut sink) = self.sink.try_lock() else {
                return Ok(());
            };
            while !self.queue.lock().is_empty() {
                futures::future::poll_fn(|cx| std::pin::Pin::new(&mut *sink).poll_ready(cx))
                    .await?;
                let Some(f) = self.queue.lock().pop_front() else {
                    break;
                };
                std::pin::Pin::new(&mut *sink).start_send((self.kind, f))?;
            }
            sink.flush().await?;
            drop(sink);
            // A frame queued while this sender held the half, by one that
            // found it busy after this one's last look: written now.
            if self.queue.lock().is_empty() {
                return Ok(());
            }
        }
    }
}

/// The listener's side of a connection the dialer made multiplexed: each
/// request is handled in a task of its own (at most [`IN_FLIGHT_MAX`] at
/// once) and answered as it finishes.
pub(super) async fn serve(conn: Conn, c: Arc<Cluster>) -> Result<(), CallError> {
    let (sink, mut stream) = conn.split();
    let writer = Arc::new(Writer::new(sink, Kind::Reply));
    let room = Arc::new(Semaphore::new(IN_FLIGHT_MAX));
    loop {
        let frame = match stream.next().await {
            Some(Ok(f)) => f,
            Some(Err(e)) => return Err(e.into()),
            None => return Ok(()),
        };
        if frame.kind != Kind::Quorum || frame.payload.len() < ID_LEN {
            return Err(CallError::Handshake(
                "peer".into(),
                format!(
                    "unexpected {:?} frame on a multiplexed connection",
                    frame.kind
                ),
            ));
        }
        let Ok(permit) = Arc::clone(&room).acquire_owned().await else {
            return Ok(());
        };
        let (c, writer) = (Arc::clone(&c), Arc::clone(&writer));
        tokio::spawn(async move {
            let payload = frame.payload;
            let answer = c.quorum.handle(&payload[ID_LEN..]).await;
            let reply = match super::codec::encode_after(&payload[..ID_LEN], &answer) {
                Ok(reply) => reply,
                Err(e) => {
                    tracing::warn!(error = %e, "quorum RPC reply not encoded");
                    return;
                }
            };
            // A failed write is the connection's end, which the reads see.
            let _ = writer.send(reply).await;
            drop(permit);
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::frame::FrameCodec;
    use crate::cluster::network::Link;
    use tokio_util::codec::Framed;

    type Far = Framed<tokio::io::DuplexStream, FrameCodec>;

    /// A multiplexed connection whose far end the test plays.
    fn pair() -> (Arc<MuxConn>, Far) {
        let (near, far) = tokio::io::duplex(1 << 16);
        let conn: Conn = Framed::new(Box::new(near) as Box<dyn Link>, FrameCodec::default());
        (
            MuxConn::start(conn),
            Framed::new(far, FrameCodec::default()),
        )
    }

    /// The next request at the far end: (id, body).
    async fn request(far: &mut Far) -> ([u8; 8], Bytes) {
        let f = far.next().await.expect("a frame").expect("decodes");
        assert_eq!(f.kind, Kind::Quorum);
        let mut id = [0u8; 8];
        id.copy_from_slice(&f.payload[..8]);
        (id, f.payload.slice(8..))
    }

    /// `body` after the room a request's id is written in.
    fn room_for_id(body: &[u8]) -> Vec<u8> {
        let mut frame = vec![0; ID_LEN];
        frame.extend_from_slice(body);
        frame
    }

    async fn reply(far: &mut Far, id: [u8; 8], body: &[u8]) {
        let mut p = id.to_vec();
        p.extend_from_slice(body);
        far.send((Kind::Reply, p)).await.expect("sent");
    }

    fn call(
        c: &Arc<MuxConn>,
        body: &'static [u8],
        wait: Duration,
    ) -> tokio::task::JoinHandle<Result<Bytes, CallError>> {
        let c = Arc::clone(c);
        tokio::spawn(async move { c.call(room_for_id(body), Instant::now() + wait, wait).await })
    }

    #[tokio::test(start_paused = true)]
    async fn replies_in_any_order_reach_their_own_calls() {
        let (c, mut far) = pair();
        let wait = Duration::from_secs(5);
        let calls = [
            call(&c, b"one", wait),
            call(&c, b"two", wait),
            call(&c, b"three", wait),
        ];
        let mut got = Vec::new();
        for _ in 0..3 {
            got.push(request(&mut far).await);
        }
        // Answered last first, each with its body upper-cased.
        for (id, body) in got.iter().rev() {
            reply(&mut far, *id, &body.to_ascii_uppercase()).await;
        }
        let mut answers = Vec::new();
        for h in calls {
            answers.push(h.await.expect("joined").expect("answered"));
        }
        assert_eq!(answers, [&b"ONE"[..], b"TWO", b"THREE"]);
        assert!(c.waiting.lock().is_empty(), "nothing left waiting");
        assert!(!c.closed.load(Ordering::Acquire));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_calls_from_many_tasks_is_written_whole() {
        let (c, mut far) = pair();
        let calls: Vec<_> = (0..300u32)
            .map(|i| {
                let c = Arc::clone(&c);
                tokio::spawn(async move {
                    let wait = Duration::from_secs(30);
                    c.call(room_for_id(&i.to_be_bytes()), Instant::now() + wait, wait)
                        .await
                })
            })
            .collect();
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..300 {
            let (id, body) = request(&mut far).await;
            assert!(seen.insert(body.clone()), "each request once");
            reply(&mut far, id, &body).await;
        }
        for (i, h) in calls.into_iter().enumerate() {
            let got = h.await.expect("joined").expect("answered");
            assert_eq!(got, &(i as u32).to_be_bytes()[..]);
        }
        assert!(c.writer.queue.lock().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_call_that_times_out_leaves_nothing_and_its_late_reply_is_dropped() {
        let (c, mut far) = pair();
        let slow = call(&c, b"slow", Duration::from_millis(300));
        let (slow_id, _) = request(&mut far).await;
        // Another call is answered meanwhile: the link is alive.
        let quick = call(&c, b"quick", Duration::from_secs(5));
        let (quick_id, _) = request(&mut far).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        reply(&mut far, quick_id, b"q").await;
        assert_eq!(quick.await.expect("joined").expect("answered"), &b"q"[..]);
        assert!(matches!(
            slow.await.expect("joined"),
            Err(CallError::Timeout)
        ));
        assert!(
            c.waiting.lock().is_empty(),
            "the timed-out call is forgotten"
        );
        assert!(
            !c.closed.load(Ordering::Acquire),
            "replies came: still open"
        );
        // Its reply, late, goes nowhere; the next call gets its own.
        reply(&mut far, slow_id, b"late").await;
        let next = call(&c, b"next", Duration::from_secs(5));
        let (next_id, body) = request(&mut far).await;
        assert_eq!(body, &b"next"[..]);
        reply(&mut far, next_id, b"n").await;
        assert_eq!(next.await.expect("joined").expect("answered"), &b"n"[..]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_link_is_closed_and_a_closed_one_fails_its_calls_at_once() {
        let (c, mut far) = pair();
        // Nothing comes back for the whole wait: closed.
        let silent = call(&c, b"a", Duration::from_millis(300));
        let _ = request(&mut far).await;
        assert!(matches!(
            silent.await.expect("joined"),
            Err(CallError::Timeout)
        ));
        assert!(c.closed.load(Ordering::Acquire), "a silent link is closed");
        let after = call(&c, b"b", Duration::from_secs(5))
            .await
            .expect("joined");
        assert!(matches!(after, Err(CallError::Io(_))), "{after:?}");

        // The peer going away fails the calls waiting on it, not at their
        // timeouts.
        let (c, mut far) = pair();
        let waiting = call(&c, b"c", Duration::from_secs(60));
        let _ = request(&mut far).await;
        let started = Instant::now();
        drop(far);
        let r = waiting.await.expect("joined");
        assert!(matches!(r, Err(CallError::Io(_))), "{r:?}");
        assert!(started.elapsed() < Duration::from_secs(1));
        assert!(c.closed.load(Ordering::Acquire));
    }

    #[tokio::test(start_paused = true)]
    async fn a_reply_frame_of_another_kind_closes_the_connection() {
        let (c, mut far) = pair();
        let waiting = call(&c, b"x", Duration::from_secs(60));
        let (id, _) = request(&mut far).await;
        far.send((Kind::Ping, id.to_vec())).await.expect("sent");
        let r = waiting.await.expect("joined");
        assert!(matches!(r, Err(CallError::Io(_))), "{r:?}");
        assert!(c.closed.load(Ordering::Acquire));
    }
}
