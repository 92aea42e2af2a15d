//! The RabbitMQ Stream protocol listeners (`stream.listeners.tcp`, 5552, and
//! `stream.listeners.ssl`, RabbitMQ's 5551, with the AMQPS certificates) and
//! one task per connection driving a sans-IO [`StreamSession`]. A TLS
//! connection's handshake runs in its own task (as for AMQPS); a verified
//! client certificate makes SASL EXTERNAL available to it.
//!
//! The task reads the socket into the session, writes what it produces
//! (deliveries as the stored chunk bytes, without copies, through vectored
//! writes: many chunks per `writev`; on plain TCP, with `stream.sendfile`, a
//! chunk's data section goes from its segment file with `sendfile(2)` when
//! the page cache holds it, the frame heads written around it in order),
//! fires its timer, and wakes it when a
//! stream it follows commits more: one small forwarder task per followed
//! stream turns the log's committed `watch` into a wake-up of the connection.
//! It runs the session's chunk reads ([`ReadJob`]): here when the page cache
//! holds the bytes (`RWF_NOWAIT`: no blocking), else on a blocking thread, so
//! a cold read never stalls other connections on this worker.
//!
//! Clustered, a create or delete of a stream or super stream that changed
//! replicated metadata ([`StreamSession::held_change`]) is proposed to the
//! metadata group here, as the commands AMQP and the admin API use, and its
//! response released only once committed (INTERNAL_ERROR when not within
//! the commit timeout). Publishes, `query_publisher_sequence` and
//! `store_offset` for a stream homed on another node
//! ([`StreamSession::poll_forward`]) go to that node over the cluster's data
//! link, their answers back into the session; past
//! [`MAX_FORWARDS`] unanswered, the connection reads no more input.

use std::collections::HashMap;
use std::io::IoSlice;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tokio_rustls::server::TlsStream;

use crate::broker::remote::StreamAnswer;
use crate::broker::Broker;
use crate::clock;
use crate::cluster::forward::{Op, Reply};
use crate::cluster::{Cluster, Command};
use crate::config::Config;
use crate::session::stream::{
    Forward, HeldChange, MetaChange, Out, ReadDone, StreamSession, StreamSettings,
};
use crate::session::stream_sac::SacRegistry;
use crate::session::stream_stats::StreamConnStats;
use crate::tls::{CertLogin, Established, ServerTls};
use crate::wire::stream::code;
use futures::future::BoxFuture;
use futures::stream::{FuturesOrdered, StreamExt};

/// A running stream listener.
pub struct StreamServer {
    pub addrs: Vec<SocketAddr>,
    /// The TLS listener's addresses (`stream.listeners.ssl`).
    pub tls_addrs: Vec<SocketAddr>,
    shutdown: watch::Sender<bool>,
}

impl Drop for StreamServer {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

/// Bind the stream listeners: plain on [`Config::stream_tcp_port`], TLS with
/// `tls` (the AMQPS configuration) on [`Config::stream_ssl_port`]. None when
/// both are off. With `cluster`, stream and super stream creates and deletes
/// are committed by the metadata group before they are answered.
pub async fn start(
    config: Arc<Config>,
    broker: Arc<Broker>,
    tls: Option<Arc<ServerTls>>,
    cluster: Option<Arc<Cluster>>,
) -> std::io::Result<Option<StreamServer>> {
    let sac: Arc<SacRegistry> = Arc::default();
    let bound = super::bind_plain_and_tls(
        &config,
        config.stream_tcp_port(),
        config.stream_ssl_port(),
        tls.as_ref(),
    )
    .await?;
    if bound.is_empty() {
        return Ok(None);
    }
    let (tx, rx) = watch::channel(false);
    let mut addrs = Vec::new();
    let mut tls_addrs = Vec::new();
    let node_host = config.node_name().rsplit('@').next().map(str::to_owned);
    let resolved = match node_host {
        Some(h) if config.stream.advertised_host.is_none() => resolve(&h).await.map(|a| (h, a)),
        _ => None,
    };
    for (listener, tls) in bound {
        let addr = listener.local_addr()?;
        let advertised_host = match (&config.stream.advertised_host, &resolved) {
            (Some(h), _) => Some(Arc::from(h.as_str())),
            (None, Some((h, ips))) if ips.iter().any(|ip| reaches(addr, *ip)) => {
                Some(Arc::from(h.as_str()))
            }
            _ => None,
        };
        if tls.is_some() {
            tracing::info!(%addr, "stream protocol TLS listener started");
            tls_addrs.push(addr);
        } else {
            tracing::info!(%addr, "stream protocol listener started");
            addrs.push(addr);
        }
        tokio::spawn(accept_loop(
            listener,
            tls,
            Conn {
                broker: Arc::clone(&broker),
                config: Arc::clone(&config),
                sac: Arc::clone(&sac),
                cluster: cluster.clone(),
                advertised_host,
            },
            rx.clone(),
        ));
    }
    Ok(Some(StreamServer {
        addrs,
        tls_addrs,
        shutdown: tx,
    }))
}

/// The addresses `host` resolves to (None when it does not, in 2 s).
async fn resolve(host: &str) -> Option<Vec<std::net::IpAddr>> {
    let lookup = tokio::net::lookup_host((host, 0));
    let found = tokio::time::timeout(Duration::from_secs(2), lookup).await;
    let ips: Vec<_> = found.ok()?.ok()?.map(|a| a.ip()).collect();
    (!ips.is_empty()).then_some(ips)
}

/// Whether a client dialling `ip` reaches a listener bound to `listener`:
/// the same address, or any address of this machine (one a socket can be
/// bound to) when the listener is bound to all of them.
fn reaches(listener: SocketAddr, ip: std::net::IpAddr) -> bool {
    let bound = super::canonical(listener).ip();
    if bound.is_unspecified() {
        // A dual-stack `[::]` listener takes IPv4 clients too.
        (bound.is_ipv6() || ip.is_ipv4()) && std::net::UdpSocket::bind((ip, 0)).is_ok()
    } else {
        bound == ip
    }
}

/// What every connection of a listener shares.
#[derive(Clone)]
pub struct Conn {
    pub broker: Arc<Broker>,
    pub config: Arc<Config>,
    pub sac: Arc<SacRegistry>,
    /// The cluster, when this node is clustered.
    pub cluster: Option<Arc<Cluster>>,
    /// The host name clients are told to connect to: `stream.advertised_host`,
    /// else (as RabbitMQ) the host of this node's name when it resolves to
    /// an address this listener takes; None: the address the client used.
    pub advertised_host: Option<Arc<str>>,
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    conn: Conn,
    mut shutdown: watch::Receiver<bool>,
) {
    let handshake_timeout = crate::tls::handshake_timeout(&conn.config);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let peer = super::canonical(peer);
                    let conn = conn.clone();
                    let tls = tls.clone();
                    tokio::spawn(async move {
                        let end = match tls {
                            None => run(stream, peer, conn).await,
                            Some(tls) => {
                                match crate::tls::accept(&tls, stream, handshake_timeout).await {
                                    Ok(stream) => run_tls(stream, peer, conn).await,
                                    Err(e) => {
                                        tracing::warn!(%peer, "stream TLS connection refused: {e}");
                                        Ok(())
                                    }
                                }
                            }
                        };
                        if let Err(e) = end {
                            tracing::debug!(%peer, error = %e, "stream connection ended");
                        }
                    });
                }
                Err(e) => {
                    tracing::error!(error = %e, "stream accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

fn loopback(addr: &SocketAddr) -> bool {
    match addr.ip() {
        std::net::IpAddr::V4(v4) => v4.is_loopback(),
        std::net::IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Forwarders of the followed streams' commits, by stream.
struct Watches {
    notify: Arc<Notify>,
    tasks: HashMap<String, JoinHandle<()>>,
}

impl Watches {
    fn set(&mut self, wanted: Vec<(String, watch::Receiver<u64>)>) {
        let keep: std::collections::HashSet<&str> =
            wanted.iter().map(|(k, _)| k.as_str()).collect();
        self.tasks.retain(|k, t| {
            let on = keep.contains(k.as_str());
            if !on {
                t.abort();
            }
            on
        });
        for (k, mut rx) in wanted {
            if self.tasks.contains_key(&k) {
                continue;
            }
            let notify = Arc::clone(&self.notify);
            let task = tokio::spawn(async move {
                while rx.changed().await.is_ok() {
                    notify.notify_one();
                }
            });
            self.tasks.insert(k, task);
        }
    }
}

impl Drop for Watches {
    fn drop(&mut self) {
        for t in self.tasks.values() {
            t.abort();
        }
    }
}

/// Start the session's reads: those the page cache answers are done here and
/// now, the others go to a blocking thread (one at a time per subscription).
fn start_reads(session: &mut StreamSession, reads: &mut tokio::task::JoinSet<ReadDone>) {
    while let Some(job) = session.poll_read() {
        match job.run_cached() {
            Ok(done) => session.handle_read(done),
            Err(job) => {
                reads.spawn_blocking(move || (*job).run());
            }
        }
    }
}

/// Most slices one `writev` takes (two per delivered chunk).
const MAX_SLICES: usize = 512;

/// A connection's socket: plain TCP takes file ranges with `sendfile(2)`.
trait Sink: AsyncRead + AsyncWrite + Unpin {
    fn tcp(&self) -> Option<&TcpStream> {
        None
    }
}

impl Sink for TcpStream {
    fn tcp(&self) -> Option<&TcpStream> {
        Some(self)
    }
}

impl Sink for TlsStream<TcpStream> {}

fn bytes_of(o: &Out) -> &[u8] {
    match o {
        Out::Bytes(b) => b,
        Out::File { .. } => &[],
    }
}

/// Write every piece in order: runs of bytes vectored, file ranges with
/// `sendfile(2)` on plain TCP (read, then written, elsewhere or where the
/// kernel refuses it).
async fn write_pieces<S: Sink>(
    sock: &mut S,
    pieces: &mut Vec<Out>,
    stats: &StreamConnStats,
) -> std::io::Result<()> {
    let mut i = 0;
    while i < pieces.len() {
        let run = pieces[i..]
            .iter()
            .position(|o| matches!(o, Out::File { .. }))
            .unwrap_or(pieces.len() - i);
        if run > 0 {
            match sock.tcp() {
                // The frame heads before a file range: held back (`MSG_MORE`)
                // to leave in the same segments as the data.
                Some(tcp) if pieces.get(i + run).is_some_and(|o| !o.is_empty()) => {
                    send_more(tcp, &pieces[i..i + run], stats).await?
                }
                _ => write_run(sock, &pieces[i..i + run], stats).await?,
            }
            i += run;
            continue;
        }
        if let Out::File { file, pos, len } = &pieces[i] {
            let left = match sock.tcp() {
                Some(tcp) => send_file(tcp, file, *pos, *len, stats).await?,
                None => Some((*pos, *len)),
            };
            if let Some((pos, len)) = left {
                let rest = Out::File {
                    file: Arc::clone(file),
                    pos,
                    len,
                }
                .into_bytes()?;
                write_run(sock, &[Out::Bytes(rest)], stats).await?;
            }
        }
        i += 1;
    }
    pieces.clear();
    Ok(())
}

/// `len` bytes of `file` from `pos` to the socket with `sendfile(2)`. What
/// is left when the kernel cannot (`EINVAL`, `ENOSYS`, `EOPNOTSUPP`): the
/// caller writes it another way.
async fn send_file(
    tcp: &TcpStream,
    file: &std::fs::File,
    mut pos: u64,
    mut len: usize,
    stats: &StreamConnStats,
) -> std::io::Result<Option<(u64, usize)>> {
    use std::os::fd::AsRawFd;
    while len > 0 {
        let Ok(mut off) = libc::off_t::try_from(pos) else {
            return Ok(Some((pos, len)));
        };
        let r = tcp
            .async_io(tokio::io::Interest::WRITABLE, || {
                // SAFETY: both descriptors are open for the call (the
                // socket and the file are borrowed); `off` is a local the
                // kernel updates.
                let n = unsafe { libc::sendfile(tcp.as_raw_fd(), file.as_raw_fd(), &mut off, len) };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            })
            .await;
        match r {
            // The file is shorter than the chunk said: never for a committed chunk.
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => {
                stats.socket.sent(n);
                pos += n as u64;
                len -= n;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP)
                ) =>
            {
                return Ok(Some((pos, len)));
            }
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// Write byte pieces, vectored, in order, with `MSG_MORE`: more follows at
/// once (`sendfile(2)` of a chunk's data, which sends the held bytes with it).
async fn send_more(
    tcp: &TcpStream,
    pieces: &[Out],
    stats: &StreamConnStats,
) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut first = 0usize;
    let mut offset = 0usize;
    while first < pieces.len() {
        // `IoSlice` is ABI-compatible with `iovec` on Unix (and `Send`).
        let iov = slices(pieces, first, offset);
        let r = tcp
            .async_io(tokio::io::Interest::WRITABLE, || {
                // SAFETY: a zeroed msghdr is valid; its iovecs point into
                // `pieces`, borrowed (and unchanged) for the call; the
                // socket is open for it.
                let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
                msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
                msg.msg_iovlen = iov.len() as _;
                let n = unsafe {
                    libc::sendmsg(tcp.as_raw_fd(), &msg, libc::MSG_MORE | libc::MSG_NOSIGNAL)
                };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            })
            .await;
        let n = match r {
            Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        stats.socket.sent(n);
        (first, offset) = advance(pieces, first, offset, n);
    }
    Ok(())
}

/// The slices of `pieces` not written yet: from byte `offset` of piece
/// `first`, at most [`MAX_SLICES`].
fn slices(pieces: &[Out], first: usize, offset: usize) -> Vec<IoSlice<'_>> {
    let mut iov = Vec::with_capacity((pieces.len() - first).min(MAX_SLICES));
    iov.push(IoSlice::new(&bytes_of(&pieces[first])[offset..]));
    for p in pieces.iter().skip(first + 1).take(MAX_SLICES - 1) {
        iov.push(IoSlice::new(bytes_of(p)));
    }
    iov
}

/// Where writing resumes after `n` more bytes went out from `(first, offset)`
/// (empty pieces skipped).
fn advance(pieces: &[Out], mut first: usize, mut offset: usize, n: usize) -> (usize, usize) {
    let mut left = n;
    while left > 0 && first < pieces.len() {
        let avail = pieces[first].len() - offset;
        if left >= avail {
            left -= avail;
            first += 1;
            offset = 0;
        } else {
            offset += left;
            left = 0;
        }
    }
    while first < pieces.len() && pieces[first].len() == offset {
        first += 1;
        offset = 0;
    }
    (first, offset)
}

/// Write byte pieces, vectored, in order.
async fn write_run<S: Sink>(
    sock: &mut S,
    pieces: &[Out],
    stats: &StreamConnStats,
) -> std::io::Result<()> {
    let mut first = 0usize;
    let mut offset = 0usize;
    while first < pieces.len() {
        let n = sock.write_vectored(&slices(pieces, first, offset)).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        stats.socket.sent(n);
        (first, offset) = advance(pieces, first, offset, n);
    }
    Ok(())
}

/// Serve one stream connection until it closes.
pub async fn run(sock: TcpStream, peer: SocketAddr, conn: Conn) -> std::io::Result<()> {
    let _ = sock.set_nodelay(true);
    let local = super::canonical(sock.local_addr()?);
    let advertised_port = conn.config.stream.advertised_port.unwrap_or(local.port());
    serve(sock, peer, local, advertised_port, None, conn).await
}

/// Serve one TLS stream connection, its handshake done, until it closes.
/// Metadata and open advertise the TLS port (`stream.advertised_tls_port`).
pub async fn run_tls(
    sock: TlsStream<TcpStream>,
    peer: SocketAddr,
    conn: Conn,
) -> std::io::Result<()> {
    let (tcp, session) = sock.get_ref();
    let _ = tcp.set_nodelay(true);
    let local = super::canonical(tcp.local_addr()?);
    let established = crate::tls::established(session, CertLogin::from_config(&conn.config));
    tracing::debug!(
        %peer,
        protocol = established.info.protocol,
        cipher = %established.info.cipher,
        subject = ?established.info.peer_cert_subject,
        "stream TLS handshake done"
    );
    let advertised_port = conn
        .config
        .stream
        .advertised_tls_port
        .unwrap_or(local.port());
    serve(sock, peer, local, advertised_port, Some(established), conn).await
}

async fn serve<S: Sink>(
    mut sock: S,
    peer: SocketAddr,
    local: SocketAddr,
    advertised_port: u16,
    tls: Option<Established>,
    conn: Conn,
) -> std::io::Result<()> {
    let Conn {
        broker,
        config,
        sac,
        cluster,
        advertised_host,
    } = conn;
    let settings = StreamSettings {
        frame_max: config.stream.frame_max,
        heartbeat: config.stream.heartbeat,
        advertised_host: advertised_host
            .map(|h| h.to_string())
            // (`local` is canonical: an IPv4 client on a dual-stack socket
            // gets its IPv4 address, not `::ffff:a.b.c.d`.)
            .unwrap_or_else(|| local.ip().to_string()),
        advertised_port,
        handshake_timeout_ms: config.handshake_timeout_secs * 1000,
        sac,
        anonymous: config.anonymous_login_user.clone().map(|u| {
            let pass = config.anonymous_login_pass.clone().unwrap_or_default();
            (u, pass)
        }),
        clustered: cluster.is_some(),
        deliver_merge_ms: config.stream.deliver_merge_ms,
    };
    let (sac_tx, mut sac_rx) = tokio::sync::mpsc::unbounded_channel();
    let id = broker.next_connection_id();
    // Single node: a request that wrote durable topology (a stream or super
    // stream created or deleted) is answered once the store has flushed the
    // write, so an answered create survives a crash; clustered, the metadata
    // group's commit is what the answer waits for (`held_change`).
    let store = broker.store.clone().filter(|_| cluster.is_none());
    let mut unflushed = false;
    // Back-pressure: past the stream store's write buffer limit, no input is
    // read until the flusher catches up.
    let streams = broker.streams.clone();
    // A resource alarm blocks publishing connections (no input read).
    let mut alarm = broker.watch_alarm();
    let mut alarm_open = true;
    let mut session = StreamSession::new(
        broker,
        settings,
        id,
        loopback(&peer),
        sac_tx,
        clock::now_ms(),
    );
    match tls {
        Some(tls) => session.set_tls(tls),
        None => session.set_zero_copy(config.stream.sendfile && sock.tcp().is_some()),
    }
    // The admin API's view, and its way to close the connection.
    let (close_tx, mut close_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let stats = StreamConnStats::new(close_tx);
    session.set_admin(Arc::clone(&stats), peer, local);
    let mut watches = Watches {
        notify: Arc::new(Notify::new()),
        tasks: HashMap::new(),
    };
    let notify = Arc::clone(&watches.notify);
    let mut rbuf = BytesMut::with_capacity(64 * 1024);
    let mut pieces: Vec<Out> = Vec::new();
    let mut reads = tokio::task::JoinSet::new();
    // Answered in the order asked, as the requests were made (a second
    // publish's confirm was seen before the first's when both answers came
    // in between two polls).
    let mut forwards: FuturesOrdered<Forwarded> = FuturesOrdered::new();
    let result = loop {
        let now = clock::now_ms();
        if let Some(w) = session.watched() {
            watches.set(w);
        }
        // (`unflushed` is only ever set with a store.)
        if let Some(store) = store.as_ref().filter(|_| unflushed) {
            unflushed = false;
            if let Err(e) = store.sync().await {
                // The answers written so far do not go out.
                tracing::warn!(%peer, error = %e, "cannot store a stream change; closing the connection");
                break Err(std::io::Error::other(e.to_string()));
            }
        }
        // Write what is queued; deliveries continue while there is credit.
        loop {
            start_reads(&mut session, &mut reads);
            while let Some(f) = session.poll_forward() {
                let answer = send_forward(cluster.as_deref(), f)
                    .unwrap_or_else(|token| Box::pin(futures::future::ready((token, None))));
                forwards.push_back(answer);
            }
            while let Some(b) = session.poll_output(now) {
                pieces.push(b);
            }
            if pieces.is_empty() {
                break;
            }
            write_pieces(&mut sock, &mut pieces, &stats).await?;
        }
        if session.is_closed() {
            break Ok(());
        }
        // Clustered: a create or delete changed replicated metadata; its
        // response goes out once the metadata group has committed it (what
        // came before it is written above), frames after it wait.
        if let Some(held) = session.held_change().cloned() {
            let committed = match &cluster {
                Some(c) => commit(c, &held, id, peer).await,
                None => true,
            };
            session.change_committed(committed);
            session.handle_input(&mut rbuf, clock::now_ms());
            continue;
        }
        let deadline = session
            .poll_timeout()
            .map(|t| t.saturating_sub(clock::now_ms()))
            .unwrap_or(60_000);
        if rbuf.capacity() - rbuf.len() < 16 * 1024 {
            rbuf.reserve(64 * 1024);
        }
        let blocked = alarm.borrow().blocked_reason().is_some() && session.is_publishing();
        let full = blocked
            || streams.as_ref().is_some_and(|s| !s.has_room())
            || session.forwards_in_flight() >= MAX_FORWARDS;
        session.set_input_paused(full, clock::now_ms());
        tokio::select! {
            changed = alarm.changed(), if alarm_open => {
                alarm_open = changed.is_ok();
            }
            _ = async {
                if let Some(s) = &streams {
                    s.ready().await
                }
            }, if full && !blocked => {}
            r = sock.read_buf(&mut rbuf), if !full => match r {
                Ok(0) => {
                    session.handle_eof();
                    break Ok(());
                }
                Ok(n) => {
                    stats.socket.received(n);
                    let before = store.as_ref().map(crate::storage::Store::topology_writes);
                    session.handle_input(&mut rbuf, clock::now_ms());
                    unflushed = before != store.as_ref().map(crate::storage::Store::topology_writes);
                }
                Err(e) => break Err(e),
            },
            _ = notify.notified() => session.handle_committed(clock::now_ms()),
            Some(done) = reads.join_next(), if !reads.is_empty() => match done {
                Ok(done) => session.handle_read(done),
                Err(e) => break Err(std::io::Error::other(e)),
            },
            Some(ev) = sac_rx.recv() => session.handle_sac(ev),
            Some((token, answer)) = forwards.next(), if !forwards.is_empty() => {
                session.handle_forwarded(token, answer);
            }
            Some(reason) = close_rx.recv() => session.force_close(&reason),
            _ = tokio::time::sleep(Duration::from_millis(deadline)) => session.handle_timeout(clock::now_ms()),
        }
    };
    if let Some(reason) = &session.close_reason {
        tracing::debug!(%peer, user = session.user().unwrap_or(""), reason, "stream connection closed");
    }
    let _ = sock.shutdown().await;
    result
}

/// Requests of a connection for streams homed on other nodes that may wait
/// for their answers, at most.
pub const MAX_FORWARDS: usize = 1024;

/// A forwarded request's answer: its token and what the home node said
/// (None: no answer, the link went down first).
type Forwarded = BoxFuture<'static, (u64, Option<StreamAnswer>)>;

/// Send `f` to its home node over the data link; Err(its token) when the
/// link is down (or the node is not clustered).
fn send_forward(cluster: Option<&Cluster>, f: Forward) -> Result<Forwarded, u64> {
    let token = f.token;
    let link = cluster.ok_or(token)?.forward.link(&f.node);
    let rx = link
        .send_request(&f.vhost, &f.stream, Op::Stream(f.op), &f.body)
        .ok_or(token)?;
    Ok(Box::pin(async move {
        let answer = match rx.await {
            Ok((Ok(Reply::Stream(a)), _)) => Some(a),
            // The home node has no such stream (any more).
            Ok((Err((crate::wire::reply_code::NOT_FOUND, _)), _)) => {
                Some(StreamAnswer::Failed(code::STREAM_DOES_NOT_EXIST))
            }
            Ok(_) => Some(StreamAnswer::Failed(code::INTERNAL_ERROR)),
            Err(_) => None,
        };
        (token, answer)
    }))
}

/// Propose what a Stream protocol request changed to the metadata group, as
/// the same commands AMQP and the admin API use ([`proposals`]), one after
/// the other; true once all are committed, false at the first that is not
/// within the commit timeout.
async fn commit(cluster: &Cluster, held: &HeldChange, id: u64, peer: SocketAddr) -> bool {
    for cmd in proposals(held, &cluster.me.name) {
        if let Err(why) = cluster.propose(cmd).await {
            tracing::warn!(id, %peer, "stream protocol: {why}");
            return false;
        }
    }
    true
}

/// The metadata commands for `held`, made on the node `node` (the home of
/// the streams it creates). Each stream's queue record is an entry of its
/// own (the state machine tells the forwarder of a queue's home node for a
/// queue record it applies alone, not inside a batch); everything else
/// (a super stream's exchange and bindings, deletes) goes as one entry:
/// one command, or a `Command::Batch` of them in their order.
fn proposals(held: &HeldChange, node: &str) -> Vec<Command> {
    let vhost = held.vhost.as_str();
    let mut out = Vec::new();
    let mut rest = Vec::new();
    for c in &held.changes {
        match c {
            MetaChange::DeclareQueue(d) => out.extend(Command::queue_declared(vhost, d, node)),
            MetaChange::DeleteQueue(name) => rest.push(Command::DeleteQueue {
                vhost: vhost.to_string(),
                name: name.clone(),
            }),
            MetaChange::DeclareExchange(d) => rest.push(Command::exchange_declared(vhost, d)),
            MetaChange::DeleteExchange(name) => rest.push(Command::DeleteExchange {
                vhost: vhost.to_string(),
                name: name.clone(),
            }),
            MetaChange::Bind {
                exchange,
                queue,
                routing_key,
                arguments,
            } => rest.push(Command::binding(
                true,
                vhost,
                exchange,
                &crate::broker::exchange::Destination::Queue(Arc::from(queue.as_str())),
                routing_key,
                arguments,
            )),
        }
    }
    match rest.len() {
        0 => {}
        1 => out.extend(rest),
        _ => out.push(Command::Batch(rest)),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::vhost::{ExchangeDeclare, QueueDeclare};
    use crate::wire::types::FieldTable;

    fn queue(name: &str) -> MetaChange {
        MetaChange::DeclareQueue(QueueDeclare {
            name: name.into(),
            durable: true,
            ..Default::default()
        })
    }

    #[test]
    fn queue_records_go_alone_and_the_rest_as_one_entry() {
        let create = HeldChange {
            vhost: "v".into(),
            changes: vec![queue("s")],
        };
        let p = proposals(&create, "warren@a");
        assert!(
            matches!(&p[..], [Command::DeclareQueue { vhost, name, node, durable: true, .. }]
            if vhost == "v" && name == "s" && node == "warren@a")
        );

        let bind = |q: &str| MetaChange::Bind {
            exchange: "ss".into(),
            queue: q.into(),
            routing_key: "k".into(),
            arguments: FieldTable::new(),
        };
        let super_stream = HeldChange {
            vhost: "v".into(),
            changes: vec![
                MetaChange::DeclareExchange(ExchangeDeclare {
                    name: "ss".into(),
                    kind: "direct".into(),
                    durable: true,
                    ..Default::default()
                }),
                queue("ss-0"),
                bind("ss-0"),
                queue("ss-1"),
                bind("ss-1"),
            ],
        };
        let p = proposals(&super_stream, "warren@a");
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(matches!(&p[0], Command::DeclareQueue { name, .. } if name == "ss-0"));
        assert!(matches!(&p[1], Command::DeclareQueue { name, .. } if name == "ss-1"));
        let Command::Batch(rest) = &p[2] else {
            panic!("{p:?}")
        };
        assert!(matches!(&rest[..], [Command::DeclareExchange { name, .. },
            Command::Bind(a), Command::Bind(b)]
            if name == "ss" && a.destination == "ss-0" && b.destination == "ss-1"
                && !a.to_exchange && a.source == "ss"));

        let delete = HeldChange {
            vhost: "v".into(),
            changes: vec![
                MetaChange::DeleteExchange("ss".into()),
                MetaChange::DeleteQueue("ss-0".into()),
            ],
        };
        let p = proposals(&delete, "warren@a");
        assert!(matches!(&p[..], [Command::Batch(b)] if matches!(&b[..],
            [Command::DeleteExchange { name, .. }, Command::DeleteQueue { name: q, .. }]
            if name == "ss" && q == "ss-0")));
    }
}
