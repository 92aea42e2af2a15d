//! One AMQP connection's task: a thin driver of a sans-IO [`Session`]. It reads
//! the socket into the session, feeds it mailbox messages, timers and the memory
//! alarm, answers its events through the broker-facing handlers in
//! [`crate::amqp`], and hands its output to the writer task (see
//! [`super::writer`]). Back-pressure: while the writer's backlog is over the
//! limit, no input is read and queues skip this connection's consumers.
//!
//! The driver is generic over the stream's read half: plain TCP uses tokio's
//! owned halves (no lock between reader and writer), TLS the halves of
//! `tokio::io::split` over a rustls stream. Each is its own monomorphised copy.

use super::mailbox::{self, ConnSink, Outbound};
use super::writer::{self, Out};
use crate::amqp::{self, ConnCtx};
use crate::broker::oauth::{Grant, Verifier};
use crate::broker::queue::DeliverySink;
use crate::broker::remote::Ticket;
use crate::broker::AuthProtocol;
use crate::broker::{Broker, ConnectionControl, ConnectionInfo, LoginError, SocketStats};
use crate::clock::Now;
use crate::cluster::{Cluster, Command};
use crate::config::Config;
use crate::error::AmqpError;
use crate::session::handshake::{self, EXTERNAL};
use crate::session::{self, Event, Session, StoreWait};
use crate::tls::{CertLogin, Established};
use crate::wire::{ConnectionStartOk, ConnectionUpdateSecret};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;

/// Handle one accepted socket until it closes.
pub async fn run(
    stream: TcpStream,
    peer: SocketAddr,
    broker: Arc<Broker>,
    config: Arc<Config>,
    cluster: Option<Arc<Cluster>>,
) {
    let _ = stream.set_nodelay(true);
    let local = local_addr(&stream);
    let (read, write) = stream.into_split();
    let end = serve(read, write, peer, local, None, broker, config, cluster).await;
    log_end(peer, end);
}

/// Handle one TLS connection, its handshake done, until it closes.
pub async fn run_tls(
    stream: TlsStream<TcpStream>,
    peer: SocketAddr,
    broker: Arc<Broker>,
    config: Arc<Config>,
    cluster: Option<Arc<Cluster>>,
) {
    let (tcp, tls) = stream.get_ref();
    let _ = tcp.set_nodelay(true);
    let local = local_addr(tcp);
    let established = crate::tls::established(tls, CertLogin::from_config(&config));
    tracing::debug!(
        %peer,
        protocol = established.info.protocol,
        cipher = %established.info.cipher,
        subject = ?established.info.peer_cert_subject,
        "TLS handshake done"
    );
    let (read, write) = tokio::io::split(stream);
    let end = serve(
        read,
        write,
        peer,
        local,
        Some(established),
        broker,
        config,
        cluster,
    )
    .await;
    log_end(peer, end);
}

fn local_addr(stream: &TcpStream) -> SocketAddr {
    stream
        .local_addr()
        .map(super::canonical)
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
}

fn log_end(peer: SocketAddr, end: Option<String>) {
    match end {
        None => tracing::debug!(%peer, "connection closed"),
        Some(reason) => tracing::info!(%peer, %reason, "connection ended"),
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

/// The session settings from the broker's configuration.
fn session_config(config: &Config, broker: &Broker) -> session::Config {
    session::Config {
        frame_max: config.frame_max,
        channel_max: config.channel_max,
        heartbeat: config.heartbeat,
        handshake_timeout: Duration::from_secs(config.handshake_timeout_secs.max(1)),
        max_message_size: config.max_message_size,
        cluster_name: broker.cluster_name(),
    }
}

struct Conn<R> {
    id: u64,
    broker: Arc<Broker>,
    config: Arc<Config>,
    session: Session<amqp::Channel>,
    out: Out,
    read: R,
    rx: mpsc::UnboundedReceiver<Outbound>,
    sink: Arc<ConnSink>,
    /// The socket's byte and read/write counters (the writer task counts
    /// what it writes; reads are counted here, one add per read).
    socket: Arc<SocketStats>,
    peer: SocketAddr,
    local: SocketAddr,
    /// The TLS session of a TLS connection.
    tls: Option<Established>,
    /// Set once the connection is open (vhost chosen).
    ctx: Option<ConnCtx>,
    /// The logged-in user, between login and open.
    user: Option<String>,
    /// The access token of a connection that logged in with one.
    grant: Option<Arc<Grant>>,
    registered: bool,
    /// Unwritten output above which the connection stops taking deliveries
    /// and reading input (back-pressure on a peer that does not read).
    backlog_limit: usize,
    backpressure: bool,
    /// The cluster, when this node is clustered (None: nothing below costs anything).
    cluster: Option<Arc<Cluster>>,
    /// A metadata change made by the last method, whose reply is held until the
    /// cluster has committed it.
    commit: Option<Command>,
    /// Confirm batches handed out per channel, in order, with their outcome
    /// once known ((store ok, forwarded copies ok)): they are answered in the
    /// order they were made, so a `multiple` ack never covers an earlier batch
    /// still waiting (a forwarded one can take longer than a later local one).
    batches: std::collections::HashMap<u16, std::collections::VecDeque<Batch>>,
    /// Clustered: a queue operation whose answer is the queue's home node's;
    /// the session's output is held until it comes.
    remote: Option<RemoteOp>,
    /// The next method runs locally even if its queue lives elsewhere (a
    /// delete whose checks the home node passed).
    skip_remote: bool,
    /// A basic.get on a local replicated queue whose head message is past
    /// the committed delivery horizon: answered once a horizon covering it
    /// commits (the session's output is held until then).
    gated: Option<(u16, crate::wire::Method, Arc<crate::broker::queue::Queue>)>,
    /// The next method is answered even if its get would wait (it waited).
    skip_gate: bool,
    /// Single node: the last method wrote durable topology; the session's
    /// output is held until the store has flushed it (see `await_topology`).
    topology_sync: bool,
}

/// A passive declare, basic.get, purge or checked delete of a queue homed on
/// another node.
struct RemoteOp {
    channel: u16,
    method: crate::wire::Method,
    queue: Arc<crate::broker::queue::Queue>,
    home: Arc<dyn crate::broker::remote::RemoteHome>,
}

/// One confirm batch waiting for the store and for other nodes.
struct Batch {
    first: u64,
    last: u64,
    done: Option<(bool, bool)>,
}

/// How the session ended.
struct End {
    reason: Option<String>,
    drain: bool,
}

// One more than clippy's limit since the cluster handle joined the list.
#[allow(clippy::too_many_arguments)]
async fn serve<R, W>(
    read: R,
    write: W,
    peer: SocketAddr,
    local: SocketAddr,
    tls: Option<Established>,
    broker: Arc<Broker>,
    config: Arc<Config>,
    cluster: Option<Arc<Cluster>>,
) -> Option<String>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let socket = SocketStats::new();
    let (out, writer_task) = writer::spawn(write, Arc::clone(&socket));
    let (sink, rx) = mailbox::new();
    let mut session = Session::new(session_config(&config, &broker), Instant::now());
    if tls.as_ref().is_some_and(|t| t.login.is_some()) {
        session.offer_external();
    }
    let mut conn = Conn {
        id: broker.next_connection_id(),
        session,
        broker,
        backlog_limit: config.write_backlog_limit.max(64 * 1024),
        config,
        out,
        read,
        rx,
        sink,
        socket,
        peer,
        local,
        tls,
        ctx: None,
        user: None,
        grant: None,
        registered: false,
        backpressure: false,
        cluster,
        commit: None,
        batches: Default::default(),
        remote: None,
        gated: None,
        skip_gate: false,
        skip_remote: false,
        topology_sync: false,
    };
    let end = conn.main_loop().await;
    conn.cleanup();
    conn.transmit();
    if end.drain {
        conn.drain_input().await;
    }
    conn.out.close();
    drop(conn);
    let _ = tokio::time::timeout(Duration::from_secs(5), writer_task).await;
    end.reason
}

impl<R: AsyncRead + Unpin> Conn<R> {
    async fn main_loop(&mut self) -> End {
        let mut alarm = self.broker.watch_alarm();
        let mut alarm_open = true;
        // Consumer timeouts are checked on their own tick.
        let timeout_tick =
            self.config
                .limits()
                .consumer_timeout_ms
                .map_or(Duration::from_secs(3600), |ms| {
                    Duration::from_millis(ms / 4)
                        .clamp(Duration::from_millis(50), Duration::from_secs(5))
                });
        let mut timeouts = tokio::time::interval(timeout_tick);
        timeouts.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let store = self.broker.store.clone();
        let streams = self.broker.streams.clone();
        let fwd = self.cluster.as_ref().map(|c| Arc::clone(&c.forward));
        let mut was_full = false;
        loop {
            if let Some(end) = self.process_events() {
                return end;
            }
            if let Some(change) = self.commit.take() {
                self.await_commit(change).await;
                continue;
            }
            if std::mem::take(&mut self.topology_sync) {
                self.await_topology().await;
                continue;
            }
            if let Some(op) = self.remote.take() {
                self.await_remote(op).await;
                continue;
            }
            if let Some((channel, method, q)) = self.gated.take() {
                crate::server::horizon_for_get(&q, self.commit_timeout()).await;
                self.skip_gate = true;
                if let Some(end) = self.on_event(Event::Method { channel, method }, Now::read()) {
                    return end;
                }
                continue;
            }
            self.transmit();
            self.update_backpressure();
            // The message store's write buffer is full: read no input until it
            // drains (an async wait; no thread blocks on the store).
            // Clustered: so are the data links' windows of forwarded publishes.
            let store_full = store.as_ref().is_some_and(|s| !s.has_room())
                || streams.as_ref().is_some_and(|s| !s.has_room())
                || fwd.as_ref().is_some_and(|f| !f.has_room());
            if store_full != was_full {
                was_full = store_full;
                self.session.set_store_full(store_full, Instant::now());
            }
            let running = self.session.is_running();
            let reading = !self.session.reading_paused();
            let deadline = self
                .session
                .poll_timeout()
                .map(tokio::time::Instant::from_std);
            tokio::select! {
                changed = alarm.changed(), if alarm_open && running => {
                    if changed.is_err() {
                        alarm_open = false;
                    } else {
                        let on = alarm.borrow_and_update().blocked_reason();
                        self.session.set_alarm(on, Instant::now());
                    }
                }
                _ = async {
                    if let Some(s) = &store { s.ready().await }
                    if let Some(s) = &streams { s.ready().await }
                    if let Some(f) = &fwd { f.ready().await }
                }, if store_full => {}
                // The writer makes progress without telling us: look again soon.
                _ = tokio::time::sleep(Duration::from_millis(5)), if self.backpressure => {}
                _ = timeouts.tick(), if running => self.check_consumer_timeouts(),
                read = self.read.read_buf(self.session.input_buffer()), if reading => match read {
                    Ok(0) | Err(_) => self.session.handle_eof(),
                    Ok(n) => {
                        self.socket.received(n);
                        self.session.handle_read(Instant::now());
                    }
                },
                msg = self.rx.recv(), if !self.backpressure => {
                    if let Some(msg) = msg {
                        let now = Now::read();
                        self.on_outbound(msg, now);
                        for _ in 0..256 {
                            let Ok(more) = self.rx.try_recv() else { break };
                            self.on_outbound(more, now);
                        }
                    }
                }
                _ = sleep_until(deadline), if deadline.is_some() => {
                    self.session.handle_timeout(Instant::now());
                }
            }
        }
    }

    /// Clustered: wait until `change` (made locally by the last method) is
    /// committed by the metadata group before its reply goes out. When it
    /// cannot be (no quorum within `[cluster] commit_timeout_ms`), the held
    /// output is dropped and the connection is closed with 541, as RabbitMQ's
    /// Khepri does on a timeout: the client must not see `-ok`.
    async fn await_commit(&mut self, change: Command) {
        let Some(cluster) = self.cluster.clone() else {
            return;
        };
        if let Err(why) = cluster.propose(change).await {
            self.drop_held_output(why);
        }
    }

    /// Single node: the last method wrote durable topology (a durable queue,
    /// exchange or binding declared or deleted, ...): its reply waits until
    /// the store has flushed the write, so an answered change survives a
    /// crash, as RabbitMQ's, which answers after writing its metadata log.
    /// When the flush fails, the held output is dropped and the connection
    /// closed with 541: the client must not see `-ok`.
    async fn await_topology(&mut self) {
        let Some(store) = self.broker.store.clone() else {
            return;
        };
        if let Err(e) = store.sync().await {
            self.drop_held_output(format!("cannot store the change: {e}"));
        }
    }

    /// A held reply cannot be given: drop the session's output and close
    /// the connection with 541 and `why`.
    fn drop_held_output(&mut self, why: String) {
        tracing::warn!(id = self.id, peer = %self.peer, "{why}");
        let now = Instant::now();
        while self.session.poll_transmit(now).is_some() {}
        self.session.close(AmqpError::internal_error(why), now);
    }

    /// Clustered: the method is about a queue homed on another node and its
    /// answer is that node's (declare: its counts; basic.get; purge;
    /// delete: its if-unused / if-empty checks and its count). Checks made here first
    /// (permissions; 404 when the home node is down).
    fn remote_op(
        &mut self,
        channel: u16,
        method: &crate::wire::Method,
    ) -> Option<Result<RemoteOp, AmqpError>> {
        use crate::broker::auth::Access;
        use crate::wire::Method as M;
        self.cluster.as_ref()?;
        let ctx = self.ctx.as_ref()?;
        let (name, access) = match method {
            // ("" is the last declared queue only for a passive declare; a
            // non-passive one gets a server-named queue.)
            M::QueueDeclare(d) if d.passive || (!d.exclusive && !d.queue.is_empty()) => {
                (&d.queue, None)
            }
            M::BasicGet(g) => (&g.queue, Some(Access::Read)),
            M::QueuePurge(p) => (&p.queue, Some(Access::Read)),
            M::QueueDelete(d) => (&d.queue, Some(Access::Configure)),
            _ => return None,
        };
        let (data, _) = self.session.channel(channel)?;
        let name = data.queue_name(name).ok()?;
        let q = ctx.vhost.queue(&name, ctx.id).ok()?;
        let home = q.remote()?;
        if q.queue_type() == crate::broker::queue::QueueType::Stream
            && matches!(method, M::BasicGet(_))
        {
            return None;
        }
        let at = |e: AmqpError| e.at(method.class_id(), method.method_id());
        if let Some(access) = access {
            if let Err(e) = ctx.permit(access, "queue", &name) {
                return Some(Err(at(e)));
            }
        }
        if !home.reachable() {
            return Some(Err(at(amqp::basic::home_down(ctx, &q, home.node()))));
        }
        Some(Ok(RemoteOp {
            channel,
            method: method.clone(),
            queue: q,
            home,
        }))
    }

    /// A basic.get on a local replicated queue that must wait for a larger
    /// delivery horizon ([`crate::broker::queue::Queue::get_waits_for`]): the
    /// queue; None for any other method or queue (answered as they come).
    fn get_gate(
        &mut self,
        channel: u16,
        method: &crate::wire::Method,
    ) -> Option<Arc<crate::broker::queue::Queue>> {
        use crate::broker::auth::Access;
        let crate::wire::Method::BasicGet(g) = method else {
            return None;
        };
        // Only a clustered node has replicated queues: no lookup otherwise.
        self.cluster.as_ref()?;
        let ctx = self.ctx.as_ref()?;
        let (data, _) = self.session.channel(channel)?;
        let name = data.queue_name(&g.queue).ok()?;
        let q = ctx.vhost.queue(&name, ctx.id).ok()?;
        if q.remote().is_some() {
            return None;
        }
        // (Nothing to look at unless replicated; the permission before any
        // wait, its refusal is the get's to answer.)
        q.get_waits_for()?;
        ctx.permit(Access::Read, "queue", &name).ok()?;
        Some(q)
    }

    /// How long a replicated change may take to commit.
    fn commit_timeout(&self) -> Duration {
        Duration::from_millis(
            self.config
                .cluster
                .as_ref()
                .map_or(5000, |c| c.commit_timeout_ms.max(1)),
        )
    }

    /// Ask the queue's home node and answer the method with what it says.
    async fn await_remote(&mut self, op: RemoteOp) {
        use crate::cluster::forward::{Op, Reply};
        use crate::wire::Method as M;
        let (Some(cluster), Some(ctx)) = (self.cluster.clone(), self.ctx.clone()) else {
            return;
        };
        let link = cluster.forward.link(op.home.node());
        let RemoteOp {
            channel,
            method,
            queue,
            home,
        } = op;
        let name = queue.name().to_string();
        let mut getter = None;
        let req = match &method {
            M::QueueDeclare(_) => Op::Info,
            M::QueuePurge(_) => Op::Purge,
            M::QueueDelete(d) => Op::DeleteCheck {
                if_unused: d.if_unused,
                if_empty: d.if_empty,
            },
            M::BasicGet(g) => {
                let Some((data, _)) = self.session.channel(channel) else {
                    return;
                };
                let sink = Arc::clone(&ctx.sink);
                let g2 =
                    data.remote_getter(&name, || link.getter(Arc::clone(&home), channel, sink));
                let cid = g2.cid;
                getter = Some(g2);
                Op::Get {
                    no_ack: g.no_ack,
                    cid,
                    waited: false,
                }
            }
            _ => return,
        };
        // A get the home node cannot answer yet (its head message is past
        // the committed delivery horizon) is asked again until it can.
        // (Past the commit timeout it is answered as it is, as a local
        // one is.)
        let timeout = self.commit_timeout();
        let give_up = tokio::time::Instant::now() + timeout;
        let mut req = req;
        let answer = loop {
            let asked = link.request(&ctx.vhost.name, &name, req.clone());
            let answer = tokio::time::timeout(timeout, asked).await.ok().flatten();
            match (answer, &mut req) {
                (Some((Ok(Reply::NotYet), _)), Op::Get { waited, .. }) => {
                    if tokio::time::Instant::now() >= give_up {
                        *waited = true;
                    } else {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }
                (other, _) => break other,
            }
        };
        let now = Now::read();
        let at = |e: AmqpError| e.at(method.class_id(), method.method_id());
        let (reply, msg) = match answer {
            None => {
                let e = at(amqp::basic::home_down(&ctx, &queue, home.node()));
                return self.session.channel_error(channel, e, now.at);
            }
            Some((Err((code, text)), _)) => {
                return self.session.channel_error(
                    channel,
                    at(AmqpError::relayed(code, text)),
                    now.at,
                );
            }
            Some((Ok(reply), msg)) => (reply, msg),
        };
        // A delete whose checks the home node passed, a non-passive declare:
        // run here (checks, the replicated change) with the home's counts.
        let counts = match (&method, &reply) {
            (M::QueueDelete(_), Reply::Checked { messages }) => Some((*messages as u32, 0)),
            (
                M::QueueDeclare(d),
                Reply::Info {
                    messages,
                    consumers,
                    ..
                },
            ) if !d.passive => Some((*messages as u32, *consumers as u32)),
            _ => None,
        };
        if let Some((messages, consumers)) = counts {
            if let Some((data, _)) = self.session.channel(channel) {
                data.set_remote_counts(messages, consumers);
            }
            self.skip_remote = true;
            let _ = self.on_event(Event::Method { channel, method }, now);
            return;
        }
        let Some((data, mut io)) = self.session.channel(channel) else {
            return;
        };
        match (method, reply) {
            (
                M::QueueDeclare(d),
                Reply::Info {
                    messages,
                    consumers,
                    ..
                },
            ) => {
                data.set_last_queue(&name);
                if !d.nowait {
                    io.method(
                        &crate::wire::QueueDeclareOk {
                            queue: name,
                            message_count: messages as u32,
                            consumer_count: consumers as u32,
                        }
                        .into(),
                    );
                }
            }
            (M::QueuePurge(p), Reply::Purged { messages }) if !p.nowait => {
                io.method(
                    &crate::wire::QueuePurgeOk {
                        message_count: messages as u32,
                    }
                    .into(),
                );
            }
            (M::BasicGet(_), Reply::Empty) => {
                io.method(&crate::wire::BasicGetEmpty::default().into());
            }
            (
                M::BasicGet(g),
                Reply::Got {
                    tag,
                    redelivered,
                    remaining,
                    ..
                },
            ) => {
                if let (Some(getter), Some(msg)) = (getter, msg) {
                    amqp::basic::got_remote(
                        &ctx,
                        data,
                        &mut io,
                        queue,
                        getter,
                        g.no_ack,
                        (tag, redelivered, remaining),
                        msg,
                        now,
                    );
                }
            }
            _ => {}
        }
    }

    /// Answer the session's events until it wants more input; Some when it ended.
    fn process_events(&mut self) -> Option<End> {
        let now = Now::read();
        while let Some(event) = self.session.poll_event(now.at) {
            if let Some(end) = self.on_event(event, now) {
                return Some(end);
            }
            if self.commit.is_some()
                || self.remote.is_some()
                || self.gated.is_some()
                || self.topology_sync
            {
                return None;
            }
            if !self.backpressure && self.backlog() > self.backlog_limit {
                self.update_backpressure();
            }
        }
        None
    }

    fn on_event(&mut self, event: Event<amqp::Channel>, now: Now) -> Option<End> {
        match event {
            Event::Login {
                mechanism,
                user,
                password,
            } => {
                let from_loopback = loopback(&self.peer);
                let (user, result) = if mechanism == EXTERNAL {
                    let login = self
                        .tls
                        .as_ref()
                        .and_then(|t| t.login.clone())
                        .unwrap_or_else(|| Err("no verified client certificate".into()));
                    match login {
                        Ok(name) => {
                            let r = self.broker.authenticate_external(&name, from_loopback);
                            (name, r)
                        }
                        Err(why) => {
                            tracing::warn!(peer = %self.peer, "EXTERNAL login refused: {why}");
                            (String::new(), Err(LoginError::Refused))
                        }
                    }
                } else {
                    match self.broker.authenticate(&user, &password, from_loopback) {
                        Err(LoginError::Refused) => self.token_login(user, &password, now),
                        r => (user, r),
                    }
                };
                self.broker.auth_attempts.record(
                    AuthProtocol::Amqp091,
                    result.is_ok(),
                    Some(self.peer.ip()),
                    &user,
                );
                match result {
                    Ok(u) => {
                        self.user = Some(u.name);
                        self.session.accept_login();
                    }
                    Err(why) => {
                        tracing::warn!(peer = %self.peer, user = %user, "login refused");
                        let e = match why {
                            LoginError::Refused => self.session.login_refused(),
                            LoginError::LoopbackOnly => AmqpError::access_refused_hard(format!(
                                "user '{user}' can only connect via localhost"
                            ))
                            .at(ConnectionStartOk::CLASS_ID, ConnectionStartOk::METHOD_ID),
                        };
                        self.session.refuse_login(e, now.at);
                    }
                }
            }
            Event::Open { vhost } => self.open(vhost, now),
            Event::UpdateSecret { secret, reason } => self.update_secret(&secret, &reason, now),
            Event::ChannelOpened { channel } => {
                if let Some(stats) = self.broker.channel_opened(self.id, channel) {
                    if let Some((data, io)) = self.session.channel(channel) {
                        io.confirms.set_gauge(Arc::clone(&stats.confirms));
                        data.set_stats(stats);
                    }
                }
            }
            Event::Release { channel } => {
                if let (Some(ctx), Some((data, _))) = (&self.ctx, self.session.channel(channel)) {
                    data.close(ctx, channel, now);
                }
            }
            Event::ChannelClosed { channel, mut data } => {
                self.batches.remove(&channel);
                if self.registered {
                    self.broker.channel_closed(self.id, channel);
                }
                if let Some(ctx) = &self.ctx {
                    data.close(ctx, channel, now);
                }
            }
            Event::Resume { channel } => {
                if let Some((data, _)) = self.session.channel(channel) {
                    data.kick_consumers(now);
                }
            }
            Event::Method {
                channel,
                mut method,
            } => {
                // The vhost's default queue type, before anything (forwarding,
                // the replicated change) reads the declare.
                if let (Some(ctx), crate::wire::Method::QueueDeclare(d)) = (&self.ctx, &mut method)
                {
                    if !d.passive {
                        let (durable, exclusive, auto_delete) =
                            (d.durable, d.exclusive, d.auto_delete);
                        let args = &mut d.arguments;
                        ctx.vhost
                            .augment_declare(&d.queue, durable, exclusive, auto_delete, args);
                    }
                }
                if !std::mem::take(&mut self.skip_gate) {
                    if let Some(q) = self.get_gate(channel, &method) {
                        self.transmit();
                        self.gated = Some((channel, method, q));
                        return None;
                    }
                }
                if !std::mem::take(&mut self.skip_remote) {
                    match self.remote_op(channel, &method) {
                        None => {}
                        Some(Ok(op)) => {
                            self.transmit();
                            self.remote = Some(op);
                            return None;
                        }
                        Some(Err(e)) => {
                            self.session.channel_error(channel, e, now.at);
                            return None;
                        }
                    }
                }
                let Some(ctx) = &self.ctx else { return None };
                // Clustered: a change of replicated metadata is made here, and
                // its reply held until the cluster has committed it (see
                // `await_commit`); what came before it goes out now.
                let change = match &self.cluster {
                    Some(c) => Command::from_method(&method, &ctx.vhost, ctx.id, &c.me.name),
                    None => None,
                };
                if change.is_some() {
                    self.transmit();
                }
                let Some(ctx) = &self.ctx else { return None };
                // Single node: whether the method writes durable topology
                // (the count also moves with other connections' writes: then
                // the reply waits for a flush it did not need, no more).
                let writes = match (&self.cluster, &self.broker.store) {
                    (None, Some(store)) => Some((store, store.topology_writes())),
                    _ => None,
                };
                let r = match self.session.channel(channel) {
                    Some((data, mut io)) => amqp::dispatch(ctx, data, &mut io, method, now),
                    None => Ok(()),
                };
                self.topology_sync =
                    writes.is_some_and(|(store, before)| store.topology_writes() != before);
                match r {
                    Err(e) => self.session.channel_error(channel, e, now.at),
                    Ok(()) => self.commit = change,
                }
            }
            Event::Publish { channel, message } => {
                let Some(ctx) = &self.ctx else { return None };
                let r = match self.session.channel(channel) {
                    Some((data, mut io)) => {
                        let r = amqp::basic::publish(ctx, data, &mut io, message, now);
                        data.after_publish();
                        r
                    }
                    None => Ok(()),
                };
                if let Err(e) = r {
                    self.session.channel_error(channel, e, now.at);
                }
            }
            Event::Closed { reason, drain } => {
                if let Some(text) = &reason {
                    tracing::warn!(id = self.id, peer = %self.peer, "closing connection: {text}");
                }
                return Some(End { reason, drain });
            }
        }
        None
    }

    /// A password that is no user's may be an access token (with
    /// `auth_oauth2` configured): the login's user name and outcome.
    fn token_login(
        &mut self,
        user: String,
        password: &str,
        now: Now,
    ) -> (String, Result<crate::broker::User, LoginError>) {
        let broker = Arc::clone(&self.broker);
        let Some(verifier) = broker.auth.oauth2() else {
            return (user, Err(LoginError::Refused));
        };
        if !Verifier::looks_like_token(password) {
            return (user, Err(LoginError::Refused));
        }
        match verifier.verify(password, now.ms / 1000, true) {
            Ok(token) => {
                let u = token.as_user();
                self.grant = Some(Grant::new(token));
                (u.name.clone(), Ok(u))
            }
            Err(why) => {
                tracing::warn!(peer = %self.peer, "OAuth 2 token refused: {why}");
                (user, Err(LoginError::Refused))
            }
        }
    }

    /// connection.update-secret: a token connection takes a fresh token (same
    /// user, still reaching its vhost) and its expiry; anything else closes it
    /// with RabbitMQ's 530. Other connections have nothing to update.
    fn update_secret(&mut self, secret: &[u8], reason: &str, now: Now) {
        let Some(grant) = self.grant.clone() else {
            return self.session.accept_update_secret(None);
        };
        let broker = Arc::clone(&self.broker);
        let verified = match (broker.auth.oauth2(), std::str::from_utf8(secret)) {
            (Some(v), Ok(token)) => v.verify(token, now.ms / 1000, false),
            _ => Err("not a token".into()),
        };
        let current = grant.token();
        let token = match verified {
            Ok(t) if t.user != current.user => {
                Err("Not allowed to change username on refreshed token".to_string())
            }
            other => other,
        };
        match token {
            Err(why) => {
                tracing::warn!(id = self.id, user = %current.user, "secret update refused: {why}");
                self.session.close(handshake::secret_refused(), now.at);
            }
            Ok(t) => {
                let vhost = self.ctx.as_ref().map(|c| c.vhost.name.clone());
                if let Some(vhost) = vhost.filter(|v| !t.vhost_access(v)) {
                    let e = AmqpError::not_allowed(format!(
                        "access to vhost '{vhost}' refused for user '{}'",
                        t.user
                    ))
                    .at(
                        ConnectionUpdateSecret::CLASS_ID,
                        ConnectionUpdateSecret::METHOD_ID,
                    );
                    return self.session.close(e, now.at);
                }
                tracing::info!(id = self.id, user = %t.user, %reason, "secret updated");
                let expiry = expiry_at(now, t.exp);
                grant.replace(t);
                self.session.accept_update_secret(Some(expiry));
            }
        }
    }

    /// connection.open: the vhost must exist and the user may use it.
    fn open(&mut self, vhost_name: String, now: Now) {
        let token = self.grant.as_ref().map(|g| g.token());
        let now_ms = now.ms;
        let now = now.at;
        let user = self.user.clone().unwrap_or_default();
        let Some(vhost) = self.broker.vhost(&vhost_name) else {
            return self.session.refuse_open(
                AmqpError::not_allowed(format!("vhost {vhost_name} not found")),
                now,
            );
        };
        let access = match &token {
            Some(t) => t.vhost_access(&vhost_name),
            None => self.broker.auth.vhost_access(&vhost_name, &user),
        };
        if !access {
            return self.session.refuse_open(
                AmqpError::not_allowed(format!(
                    "access to vhost '{vhost_name}' refused for user '{user}'"
                )),
                now,
            );
        }
        let (peer, local) = (self.peer, self.local);
        let name = format!("{peer} -> {local}");
        let admitted = self.broker.admit_connection(Arc::new(ConnectionInfo {
            id: self.id,
            name: name.clone(),
            peer,
            local,
            user: user.clone(),
            vhost: vhost_name,
            connected_at: crate::clock::now_ms(),
            client_properties: self.session.client_properties().clone(),
            auth_mechanism: self.session.mechanism().to_string(),
            frame_max: self.session.frame_max(),
            channel_max: self.session.channel_max(),
            heartbeat: self.session.heartbeat(),
            tls: self.tls.as_ref().map(|t| t.info.clone()),
            channels: Default::default(),
            open_channels: Default::default(),
            control: Arc::clone(&self.sink) as Arc<dyn ConnectionControl>,
            socket: Arc::clone(&self.socket),
        }));
        if let Err(e) = admitted {
            return self.session.refuse_open(e, now);
        }
        self.session.accept_open(now);
        if let Some(t) = &token {
            let expiry = expiry_at(
                Now {
                    at: now,
                    ms: now_ms,
                },
                t.exp,
            );
            self.session.set_credential_expiry(Some(expiry));
        }
        tracing::debug!(peer = %self.peer, id = self.id, "connection opened");
        self.registered = true;
        let (broker, id) = (Arc::clone(&self.broker), self.id);
        self.session
            .set_channel_gate(crate::session::ChannelGate(Box::new(move |channel| {
                broker.admit_channel(id, channel)
            })));
        self.ctx = Some(ConnCtx {
            broker: Arc::clone(&self.broker),
            id: self.id,
            name,
            vhost,
            user,
            sink: Arc::clone(&self.sink) as Arc<dyn DeliverySink>,
            cancel_notify: self.session.cancel_notify(),
            limits: self.config.limits(),
            token: self.grant.clone(),
        });
        let alarm = self.broker.alarms_in_effect().blocked_reason();
        self.session.set_alarm(alarm, now);
    }

    fn on_outbound(&mut self, msg: Outbound, now: Now) {
        match msg {
            Outbound::Deliver(d) => match (&self.ctx, self.session.channel(d.channel)) {
                (Some(ctx), Some((data, mut io))) => {
                    amqp::basic::deliver(ctx, data, &mut io, d, now)
                }
                _ => d.queue.requeue(vec![d.entry], !d.no_ack, false, now.ms),
            },
            Outbound::RemoteDeliver(d) => match (&self.ctx, self.session.channel(d.channel)) {
                (Some(ctx), Some((data, mut io))) => {
                    amqp::basic::deliver_remote(ctx, data, &mut io, d, now)
                }
                _ => d.unsent(),
            },
            Outbound::Cancelled { channel, tag } => {
                let notify = self.session.cancel_notify();
                let failed = match (&self.ctx, self.session.channel(channel)) {
                    (Some(ctx), Some((data, mut io))) => {
                        amqp::basic::consumer_cancelled(ctx, data, &mut io, &tag, notify).err()
                    }
                    _ => None,
                };
                if let Some(e) = failed {
                    self.session.channel_error(channel, e, now.at);
                }
            }
            Outbound::ConsumeAnswered {
                channel,
                tag,
                answer,
            } => {
                let notify = self.session.cancel_notify();
                let failed = match self.session.channel(channel) {
                    Some((data, mut io)) => {
                        amqp::basic::consume_answered(data, &mut io, &tag, answer, notify).err()
                    }
                    None => None,
                };
                if let Some(e) = failed {
                    self.session.channel_error(channel, e, now.at);
                }
            }
            Outbound::Close(e) => self.session.close(e, now.at),
            Outbound::TxCommitted { channel, ok } => self.session.tx_flushed(channel, ok, now.at),
            Outbound::Durable {
                channel,
                first,
                last,
                ok,
                forwarded,
            } => self.batch_done(channel, first, last, (ok, forwarded), now.at),
        }
    }

    /// Channels with a delivery unacked past its consumer timeout are closed.
    fn check_consumer_timeouts(&mut self) {
        let now = Instant::now();
        let mut expired: Vec<(u16, AmqpError)> = Vec::new();
        self.session.for_each_channel(|data, io| {
            if let Some(e) = amqp::basic::ack_timed_out(data, &io, now) {
                expired.push((io.id, e));
            }
        });
        for (channel, e) in expired {
            tracing::warn!(id = self.id, channel, "{}", e.text);
            self.session.channel_error(channel, e, now);
        }
    }

    /// Unwritten output: handed to the writer, or still in the session.
    fn backlog(&self) -> usize {
        self.out.in_flight() + self.session.pending_output()
    }

    /// While the peer has not read what we wrote, take no deliveries from the
    /// mailbox and read no more input.
    fn update_backpressure(&mut self) {
        let over = self.backlog() > self.backlog_limit;
        if over == self.backpressure {
            return;
        }
        self.backpressure = over;
        self.sink.set_blocked(over);
        self.session.set_backpressure(over, Instant::now());
        if over {
            tracing::debug!(
                id = self.id,
                backlog = self.backlog(),
                "output backlog over the limit; pausing"
            );
        } else {
            let now = Now::read();
            self.session
                .for_each_channel(|data, _| data.kick_consumers(now));
        }
    }

    /// Hand the session's output to the writer and its store waits to the store.
    fn transmit(&mut self) {
        let now = Instant::now();
        loop {
            let chunk = self.session.poll_transmit(now);
            let confirmed = self.session.take_confirmed();
            if confirmed > 0 {
                crate::broker::Counters::add(&self.broker.counters.confirmed, confirmed);
                if let Some(ctx) = &self.ctx {
                    crate::broker::Counters::add(&ctx.vhost.counters.confirmed, confirmed);
                }
            }
            if let Some(chunk) = chunk {
                if !self.out.send(chunk) {
                    self.session.handle_eof();
                }
            }
            let mut more = false;
            while let Some(wait) = self.session.poll_store_wait() {
                more |= self.store_wait(wait, now);
            }
            if !more {
                return;
            }
        }
    }

    /// A confirm batch's outcome is known: answer it and every batch after it
    /// that is known too, in order.
    fn batch_done(&mut self, channel: u16, first: u64, last: u64, r: (bool, bool), now: Instant) {
        let Some(fifo) = self.batches.get_mut(&channel) else {
            return self.answer_batch(channel, first, last, r, now);
        };
        match fifo.iter_mut().find(|b| b.first == first && b.last == last) {
            Some(b) => b.done = Some(r),
            None => return self.answer_batch(channel, first, last, r, now),
        }
        let mut ready = Vec::new();
        while let Some(b) = fifo.front() {
            let Some(r) = b.done else { break };
            ready.push((b.first, b.last, r));
            fifo.pop_front();
        }
        if fifo.is_empty() {
            self.batches.remove(&channel);
        }
        for (first, last, r) in ready {
            self.answer_batch(channel, first, last, r, now);
        }
    }

    /// Store failure: 541 (as before); a forwarded copy lost or refused: nack.
    fn answer_batch(&mut self, channel: u16, first: u64, last: u64, r: (bool, bool), now: Instant) {
        match r {
            (true, false) => self.session.durable_nacked(channel, first, last),
            (ok, _) => self.session.durable_done(channel, first, last, ok, now),
        }
    }

    /// The tickets of copies forwarded to other nodes by publishes
    /// `first..=last` of `channel` (0..=0: its transaction).
    fn forwarded(&mut self, channel: u16, first: u64, last: u64) -> Vec<Arc<Ticket>> {
        match self.session.channel(channel) {
            Some((data, _)) => data.take_forwarded(first, last),
            None => Vec::new(),
        }
    }

    /// Ask the store to call back after its next flush; true if answered at once.
    fn store_wait(&mut self, wait: StoreWait, now: Instant) -> bool {
        let tickets = match wait {
            StoreWait::Confirms {
                channel,
                first,
                last,
            } => {
                self.batches.entry(channel).or_default().push_back(Batch {
                    first,
                    last,
                    done: None,
                });
                self.forwarded(channel, first, last)
            }
            StoreWait::TxCommit { channel } => self.forwarded(channel, 0, 0),
        };
        let sink = Arc::clone(&self.sink);
        let Some(store) = &self.broker.store else {
            // Nothing to flush: only copies on other nodes to wait for.
            match wait {
                StoreWait::Confirms {
                    channel,
                    first,
                    last,
                } if tickets.is_empty() => self.batch_done(channel, first, last, (true, true), now),
                StoreWait::Confirms {
                    channel,
                    first,
                    last,
                } => {
                    Ticket::all(tickets, move |fwd| {
                        sink.durable(channel, first, last, true, fwd)
                    });
                    return false;
                }
                StoreWait::TxCommit { channel } if tickets.is_empty() => {
                    self.session.tx_flushed(channel, true, now)
                }
                StoreWait::TxCommit { channel } => {
                    Ticket::all(tickets, move |fwd| sink.tx_committed(channel, fwd));
                    return false;
                }
            }
            return true;
        };
        // Streams fsync their own files: a confirm also waits for every stream
        // append made before it (at once when none is pending).
        let streams = self.broker.streams.clone();
        let then_streams =
            move |r: Result<(), crate::storage::StorageError>,
                  done: Box<dyn FnOnce(bool) + Send>| match (r, streams) {
                (Ok(()), Some(streams)) => streams.on_durable(Box::new(move |r| done(r.is_ok()))),
                (r, _) => done(r.is_ok()),
            };
        match wait {
            StoreWait::Confirms {
                channel,
                first,
                last,
            } => store.on_durable(Box::new(move |r| {
                then_streams(
                    r,
                    Box::new(move |ok| {
                        Ticket::all(tickets, move |fwd| {
                            sink.durable(channel, first, last, ok, fwd)
                        })
                    }),
                )
            })),
            StoreWait::TxCommit { channel } => store.on_durable(Box::new(move |r| {
                then_streams(
                    r,
                    Box::new(move |ok| {
                        Ticket::all(tickets, move |fwd| sink.tx_committed(channel, ok && fwd))
                    }),
                )
            })),
        }
        false
    }

    /// Release everything the connection holds in the broker.
    /// Idempotent: a second call finds nothing left to release.
    fn cleanup(&mut self) {
        if std::mem::take(&mut self.registered) {
            self.broker.unregister_connection(self.id);
        }
        let Some(ctx) = self.ctx.take() else { return };
        let id = self.id;
        let now = Now::read();
        self.session
            .for_each_channel(|data, io| data.close(&ctx, io.id, now));
        // Deliveries still in the mailbox go back to their queues.
        self.rx.close();
        while let Ok(msg) = self.rx.try_recv() {
            match msg {
                Outbound::Deliver(d) => d.queue.requeue(vec![d.entry], !d.no_ack, false, now.ms),
                Outbound::RemoteDeliver(d) => d.unsent(),
                _ => {}
            }
        }
        ctx.vhost.connection_closed(id);
    }

    /// After the close handshake: read (and drop) until the peer closes, so unread
    /// input does not turn our close into a reset.
    async fn drain_input(&mut self) {
        let mut buf = [0u8; 4096];
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while let Ok(n) = self.read.read(&mut buf).await {
                if n == 0 {
                    break;
                }
                self.socket.received(n);
            }
        })
        .await;
    }
}

/// The moment a credential with `exp` (Unix seconds) runs out, on the clock of `now`.
fn expiry_at(now: Now, exp_secs: u64) -> Instant {
    now.at + Duration::from_millis(exp_secs.saturating_mul(1000).saturating_sub(now.ms))
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
