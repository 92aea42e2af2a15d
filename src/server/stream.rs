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

use crate::broker::Broker;
use crate::clock;
use crate::config::Config;
use crate::session::stream::{Out, ReadDone, StreamSession, StreamSettings};
use crate::session::stream_sac::SacRegistry;
use crate::session::stream_stats::StreamConnStats;
use crate::tls::{CertLogin, Established, ServerTls};

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
/// both are off.
pub async fn start(
    config: Arc<Config>,
    broker: Arc<Broker>,
    tls: Option<Arc<ServerTls>>,
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
    for (listener, tls) in bound {
        let addr = listener.local_addr()?;
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
            Arc::clone(&broker),
            Arc::clone(&config),
            Arc::clone(&sac),
            rx.clone(),
        ));
    }
    Ok(Some(StreamServer {
        addrs,
        tls_addrs,
        shutdown: tx,
    }))
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    broker: Arc<Broker>,
    config: Arc<Config>,
    sac: Arc<SacRegistry>,
    mut shutdown: watch::Receiver<bool>,
) {
    let handshake_timeout = crate::tls::handshake_timeout(&config);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let (broker, config) = (Arc::clone(&broker), Arc::clone(&config));
                    let sac = Arc::clone(&sac);
                    let tls = tls.clone();
                    tokio::spawn(async move {
                        let end = match tls {
                            None => run(stream, peer, broker, config, sac).await,
                            Some(tls) => {
                                match crate::tls::accept(&tls, stream, handshake_timeout).await {
                                    Ok(stream) => run_tls(stream, peer, broker, config, sac).await,
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
pub async fn run(
    sock: TcpStream,
    peer: SocketAddr,
    broker: Arc<Broker>,
    config: Arc<Config>,
    sac: Arc<SacRegistry>,
) -> std::io::Result<()> {
    let _ = sock.set_nodelay(true);
    let local = sock.local_addr()?;
    let advertised_port = config.stream.advertised_port.unwrap_or(local.port());
    serve(
        sock,
        peer,
        local,
        advertised_port,
        None,
        broker,
        config,
        sac,
    )
    .await
}

/// Serve one TLS stream connection, its handshake done, until it closes.
/// Metadata and open advertise the TLS port (`stream.advertised_tls_port`).
pub async fn run_tls(
    sock: TlsStream<TcpStream>,
    peer: SocketAddr,
    broker: Arc<Broker>,
    config: Arc<Config>,
    sac: Arc<SacRegistry>,
) -> std::io::Result<()> {
    let (tcp, session) = sock.get_ref();
    let _ = tcp.set_nodelay(true);
    let local = tcp.local_addr()?;
    let established = crate::tls::established(session, CertLogin::from_config(&config));
    tracing::debug!(
        %peer,
        protocol = established.info.protocol,
        cipher = %established.info.cipher,
        subject = ?established.info.peer_cert_subject,
        "stream TLS handshake done"
    );
    let advertised_port = config.stream.advertised_tls_port.unwrap_or(local.port());
    serve(
        sock,
        peer,
        local,
        advertised_port,
        Some(established),
        broker,
        config,
        sac,
    )
    .await
}

#[allow(clippy::too_many_arguments)]
async fn serve<S: Sink>(
    mut sock: S,
    peer: SocketAddr,
    local: SocketAddr,
    advertised_port: u16,
    tls: Option<Established>,
    broker: Arc<Broker>,
    config: Arc<Config>,
    sac: Arc<SacRegistry>,
) -> std::io::Result<()> {
    let settings = StreamSettings {
        frame_max: config.stream.frame_max,
        heartbeat: config.stream.heartbeat,
        advertised_host: config
            .stream
            .advertised_host
            .clone()
            // An IPv4 client on a dual-stack socket: its IPv4 address, not `::ffff:a.b.c.d`.
            .unwrap_or_else(|| local.ip().to_canonical().to_string()),
        advertised_port,
        handshake_timeout_ms: config.handshake_timeout_secs * 1000,
        sac,
        anonymous: config.anonymous_login_user.clone().map(|u| {
            let pass = config.anonymous_login_pass.clone().unwrap_or_default();
            (u, pass)
        }),
    };
    let (sac_tx, mut sac_rx) = tokio::sync::mpsc::unbounded_channel();
    let id = broker.next_connection_id();
    // Back-pressure: past the stream store's write buffer limit, no input is
    // read until the flusher catches up.
    let streams = broker.streams.clone();
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
    let result = loop {
        let now = clock::now_ms();
        if let Some(w) = session.watched() {
            watches.set(w);
        }
        // Write what is queued; deliveries continue while there is credit.
        loop {
            start_reads(&mut session, &mut reads);
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
        let deadline = session
            .poll_timeout()
            .map(|t| t.saturating_sub(clock::now_ms()))
            .unwrap_or(60_000);
        if rbuf.capacity() - rbuf.len() < 16 * 1024 {
            rbuf.reserve(64 * 1024);
        }
        let full = streams.as_ref().is_some_and(|s| !s.has_room());
        tokio::select! {
            _ = async {
                if let Some(s) = &streams {
                    s.ready().await
                }
            }, if full => {}
            r = sock.read_buf(&mut rbuf), if !full => match r {
                Ok(0) => {
                    session.handle_eof();
                    break Ok(());
                }
                Ok(n) => {
                    stats.socket.received(n);
                    session.handle_input(&mut rbuf, clock::now_ms());
                }
                Err(e) => break Err(e),
            },
            _ = notify.notified() => session.handle_committed(clock::now_ms()),
            Some(done) = reads.join_next(), if !reads.is_empty() => match done {
                Ok(done) => session.handle_read(done),
                Err(e) => break Err(std::io::Error::other(e)),
            },
            Some(ev) = sac_rx.recv() => session.handle_sac(ev),
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
