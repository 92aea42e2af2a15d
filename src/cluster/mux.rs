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
//! connection, on either side (a caller past it waits for room, within its
//! timeout; the listener stops reading until a handler finishes). A
//! connection over which nothing at all came back for as long as a call
//! waited (a link cut without a reset) is closed, and the next call dials
//! again.

use super::frame::Kind;
use super::network::{dial, CallError, Conn};
use super::{Cluster, Identity};
use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use futures::{SinkExt, StreamExt};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::AbortHandle;
use tokio::time::Instant;

/// Requests waiting for their replies on one connection, at most.
pub const IN_FLIGHT_MAX: usize = 4096;

/// A dial under way or done (shared by the calls that wait for it).
type Dialing = Shared<BoxFuture<'static, Result<Arc<MuxConn>, (std::io::ErrorKind, String)>>>;

/// This node's multiplexed connections, by peer address.
#[derive(Default)]
pub struct Muxes {
    conns: Mutex<HashMap<String, Dialing>>,
}

impl Muxes {
    /// Send `payload` (a [`Kind::Quorum`] request) to the node `name` at
    /// `addr` and wait at most `timeout` for its reply.
    pub async fn call(
        &self,
        ident: &Arc<Identity>,
        name: Option<&str>,
        addr: &str,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Bytes, CallError> {
        let deadline = Instant::now() + timeout;
        let conn = match tokio::time::timeout_at(deadline, self.get(ident, name, addr)).await {
            Ok(r) => r?,
            Err(_) => return Err(CallError::Timeout),
        };
        conn.call(payload, deadline, timeout).await
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

    /// Multiplexed connections open now (to any peer).
    pub fn open(&self) -> usize {
        self.conns
            .lock()
            .values()
            .filter(|d| matches!(d.peek(), Some(Ok(c)) if !c.closed.load(Ordering::Acquire)))
            .count()
    }
}

/// One multiplexed connection, dialer's side: a writer task takes the
/// requests from `out` (as many as are queued per write), a reader task
/// hands each reply to the call waiting for its id.
struct MuxConn {
    out: mpsc::Sender<Vec<u8>>,
    waiting: Mutex<HashMap<u64, oneshot::Sender<Bytes>>>,
    next_id: AtomicU64,
    closed: AtomicBool,
    /// When the reader last took a reply.
    last_read: Mutex<Instant>,
    tasks: Mutex<Vec<AbortHandle>>,
}

impl MuxConn {
    fn start(conn: Conn) -> Arc<MuxConn> {
        let (sink, stream) = conn.split();
        let (out, rx) = mpsc::channel(IN_FLIGHT_MAX);
        let me = Arc::new(MuxConn {
            out,
            waiting: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            closed: AtomicBool::new(false),
            last_read: Mutex::new(Instant::now()),
            tasks: Mutex::new(Vec::new()),
        });
        let writer = tokio::spawn({
            let me = Arc::downgrade(&me);
            async move {
                let (mut sink, mut rx) = (sink, rx);
                let r = write_frames(&mut sink, &mut rx, Kind::Quorum).await;
                if let Some(me) = me.upgrade() {
                    tracing::debug!(error = ?r.err(), "multiplexed inter-node connection: writer ended");
                    me.close();
                }
            }
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
                    if frame.kind != Kind::Reply || frame.payload.len() < 8 {
                        break format!("unexpected {:?} frame", frame.kind);
                    }
                    let mut id = [0u8; 8];
                    id.copy_from_slice(&frame.payload[..8]);
                    *me.last_read.lock() = Instant::now();
                    // A call that gave up (timed out) has no sender here.
                    let tx = me.waiting.lock().remove(&u64::from_be_bytes(id));
                    if let Some(tx) = tx {
                        let _ = tx.send(frame.payload.slice(8..));
                    }
                };
                if let Some(me) = me.upgrade() {
                    tracing::debug!(%why, "multiplexed inter-node connection: reader ended");
                    me.close();
                }
            }
        });
        me.tasks
            .lock()
            .extend([writer.abort_handle(), reader.abort_handle()]);
        me
    }

    /// Closed for good: both tasks stopped (the socket with them), every
    /// waiting call told at once (its reply will not come).
    fn close(&self) {
        self.closed.store(true, Ordering::Release);
        for t in self.tasks.lock().drain(..) {
            t.abort();
        }
        self.waiting.lock().clear();
    }

    async fn call(
        &self,
        payload: &[u8],
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Bytes, CallError> {
        let lost = || CallError::Io(std::io::ErrorKind::ConnectionReset.into());
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut waiting = self.waiting.lock();
            if self.closed.load(Ordering::Acquire) {
                return Err(lost());
            }
            waiting.insert(id, tx);
        }
        let _forget = Forget(self, id);
        let mut frame = Vec::with_capacity(8 + payload.len());
        frame.extend_from_slice(&id.to_be_bytes());
        frame.extend_from_slice(payload);
        match tokio::time::timeout_at(deadline, self.out.send(frame)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(lost()),
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

/// Write what `rx` brings as `kind` frames, as many per write as are
/// queued, until it or the connection ends (both sides).
async fn write_frames<S>(
    sink: &mut S,
    rx: &mut mpsc::Receiver<Vec<u8>>,
    kind: Kind,
) -> Result<(), CallError>
where
    S: futures::Sink<(Kind, Vec<u8>), Error = std::io::Error> + Unpin,
{
    while let Some(first) = rx.recv().await {
        sink.feed((kind, first)).await?;
        while let Ok(more) = rx.try_recv() {
            sink.feed((kind, more)).await?;
        }
        sink.flush().await?;
    }
    Ok(())
}

/// The listener's side of a connection the dialer made multiplexed: each
/// request is handled in a task of its own (at most [`IN_FLIGHT_MAX`] at
/// once) and answered as it finishes.
pub(super) async fn serve(conn: Conn, c: Arc<Cluster>) -> Result<(), CallError> {
    let (mut sink, mut stream) = conn.split();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(IN_FLIGHT_MAX);
    let writer = tokio::spawn(async move {
        let r = write_frames(&mut sink, &mut rx, Kind::Reply).await;
        if let Err(e) = r {
            tracing::debug!(error = %e, "multiplexed inter-node connection: replies ended");
        }
    });
    let room = Arc::new(Semaphore::new(IN_FLIGHT_MAX));
    let r = loop {
        let frame = match stream.next().await {
            Some(Ok(f)) => f,
            Some(Err(e)) => break Err(e.into()),
            None => break Ok(()),
        };
        if frame.kind != Kind::Quorum || frame.payload.len() < 8 {
            break Err(CallError::Handshake(
                "peer".into(),
                format!(
                    "unexpected {:?} frame on a multiplexed connection",
                    frame.kind
                ),
            ));
        }
        let Ok(permit) = Arc::clone(&room).acquire_owned().await else {
            break Ok(());
        };
        let (c, tx) = (Arc::clone(&c), tx.clone());
        tokio::spawn(async move {
            let payload = frame.payload;
            let answer = c.quorum.handle(&payload[8..]).await;
            let mut reply = payload[..8].to_vec();
            match super::codec::encode(&answer) {
                Ok(bytes) => reply.extend_from_slice(&bytes),
                Err(e) => {
                    tracing::warn!(error = %e, "quorum RPC reply not encoded");
                    return;
                }
            }
            let _ = tx.send(reply).await;
            drop(permit);
        });
    };
    writer.abort();
    r
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
        tokio::spawn(async move { c.call(body, Instant::now() + wait, wait).await })
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
