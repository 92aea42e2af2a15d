//! One AMQP connection: protocol header, handshake (start / tune / open),
//! heartbeats, frame dispatch to channels, deliveries from queues, and closing.
//!
//! Runs as one task per connection; a second task writes (see [`super::writer`]).

use super::channel::{Channel, ConnCtx};
use super::writer::{self, Out};
use crate::broker::queue::{Delivery, DeliverySink};
use crate::broker::{Broker, ConnectionControl, ConnectionInfo, LoginError};
use crate::config::Config;
use crate::error::AmqpError;
use crate::wire::*;
use bytes::Bytes;
use futures::{FutureExt, StreamExt};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::codec::FramedRead;

/// Messages into a connection task from the rest of the broker.
#[derive(Debug)]
pub enum Outbound {
    Deliver(Delivery),
    Cancelled {
        channel: u16,
        tag: Arc<str>,
    },
    /// Close the connection with this error (e.g. forced by an operator).
    Close(AmqpError),
    /// A transaction's persistent messages are on disk: send tx.commit-ok.
    TxCommitted {
        channel: u16,
    },
    /// The store flushed publishes `first..=last` of `channel` (or failed to).
    Durable {
        channel: u16,
        first: u64,
        last: u64,
        ok: bool,
    },
}

/// The [`DeliverySink`] of a connection: an mpsc into its task.
#[derive(Debug)]
pub struct ConnSink {
    tx: mpsc::UnboundedSender<Outbound>,
    /// Output backlog over the limit: queues skip this connection's consumers.
    blocked: std::sync::atomic::AtomicBool,
}

impl DeliverySink for ConnSink {
    fn deliver(&self, delivery: Delivery) -> Result<(), Delivery> {
        match self.tx.send(Outbound::Deliver(delivery)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::SendError(Outbound::Deliver(d))) => Err(d),
            // Only a delivery was sent, so nothing else can come back.
            Err(_) => Ok(()),
        }
    }

    fn cancelled(&self, channel: u16, tag: Arc<str>) {
        let _ = self.tx.send(Outbound::Cancelled { channel, tag });
    }

    fn blocked(&self) -> bool {
        self.blocked.load(std::sync::atomic::Ordering::Acquire)
    }
}

impl ConnSink {
    /// Called from the store's flusher once publishes are on disk.
    pub fn durable(&self, channel: u16, first: u64, last: u64, ok: bool) {
        let _ = self.tx.send(Outbound::Durable {
            channel,
            first,
            last,
            ok,
        });
    }
}

impl ConnSink {
    /// Called from the store's flusher once a transaction's messages are on disk.
    pub fn tx_committed(&self, channel: u16) {
        let _ = self.tx.send(Outbound::TxCommitted { channel });
    }
}

impl ConnectionControl for ConnSink {
    fn force_close(&self, reason: &str) {
        let _ = self
            .tx
            .send(Outbound::Close(AmqpError::connection_forced(reason)));
    }
}

const SERVER_CHANNEL_MAX_DEFAULT: u16 = 2047;

/// Handle one accepted socket until it closes.
pub async fn run(stream: TcpStream, peer: SocketAddr, broker: Arc<Broker>, config: Arc<Config>) {
    let _ = stream.set_nodelay(true);
    match serve(stream, peer, broker, config).await {
        Ok(()) => tracing::debug!(%peer, "connection closed"),
        Err(reason) => tracing::info!(%peer, %reason, "connection ended"),
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

fn server_properties() -> FieldTable {
    let mut caps = FieldTable::new();
    for cap in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "consumer_priorities",
        "authentication_failure_close",
        "per_consumer_qos",
        "direct_reply_to",
    ] {
        caps.insert(cap, FieldValue::Bool(true));
    }
    let mut props = FieldTable::new();
    props.insert("capabilities", FieldValue::Table(caps));
    props.insert("cluster_name", FieldValue::string("warren@localhost"));
    props.insert(
        "copyright",
        FieldValue::string("Copyright (c) the warren authors"),
    );
    props.insert(
        "information",
        FieldValue::string("Licensed under the MIT or Apache-2.0 license"),
    );
    props.insert("platform", FieldValue::string("Rust"));
    props.insert("product", FieldValue::string("warren"));
    props.insert("version", FieldValue::string(env!("CARGO_PKG_VERSION")));
    props
}

fn client_capability(props: &FieldTable, name: &str) -> bool {
    match props.get("capabilities") {
        Some(FieldValue::Table(caps)) => caps.get(name).and_then(|v| v.as_bool()).unwrap_or(false),
        _ => false,
    }
}

/// Parse a SASL response into (user, password).
fn credentials(mechanism: &str, response: &[u8]) -> Option<(String, String)> {
    match mechanism {
        "PLAIN" => {
            let mut parts = response.split(|b| *b == 0);
            let _authzid = parts.next()?;
            let user = std::str::from_utf8(parts.next()?).ok()?.to_string();
            let pass = std::str::from_utf8(parts.next()?).ok()?.to_string();
            Some((user, pass))
        }
        "AMQPLAIN" => {
            let table = parse_table_entries(response)?;
            let user = table.get("LOGIN")?.as_str()?.to_string();
            let pass = table.get("PASSWORD")?.as_str()?.to_string();
            Some((user, pass))
        }
        _ => None,
    }
}

type Reader = FramedRead<tokio::net::tcp::OwnedReadHalf, FrameCodec>;

struct Conn {
    id: u64,
    broker: Arc<Broker>,
    out: Out,
    reader: Reader,
    channel_max: u16,
    heartbeat: Duration,
    last_read: Instant,
    last_write: Instant,
    /// Shared so that taking it per frame costs a refcount, not a deep clone.
    ctx: Option<Arc<ConnCtx>>,
    channels: HashMap<u16, Channel>,
    rx: mpsc::UnboundedReceiver<Outbound>,
    sink: Arc<ConnSink>,
    local: SocketAddr,
    registered: bool,
    /// We sent connection.close during the handshake.
    close_sent: bool,
    /// The client published at least once (only publishers get blocked).
    published: bool,
    /// The client understands connection.blocked.
    blocked_cap: bool,
    /// We told the client it is blocked.
    blocked_sent: bool,
    /// Unwritten output above which the connection stops taking deliveries
    /// and reading input (back-pressure on a peer that does not read).
    backlog_limit: usize,
}

/// How the main loop ended.
enum End {
    /// Peer closed the socket or we finished a close handshake.
    Done,
    /// A hard error: send connection.close and wait briefly for close-ok.
    Error(AmqpError, bool),
}

async fn serve(
    mut stream: TcpStream,
    peer: SocketAddr,
    broker: Arc<Broker>,
    config: Arc<Config>,
) -> Result<(), String> {
    let handshake_timeout = Duration::from_secs(config.handshake_timeout_secs.max(1));
    // Protocol header.
    let mut header = [0u8; 8];
    match tokio::time::timeout(handshake_timeout, stream.read_exact(&mut header)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(format!("reading protocol header: {e}")),
        Err(_) => return Err("handshake timeout".into()),
    }
    if &header != PROTOCOL_HEADER {
        let _ = stream.write_all(PROTOCOL_HEADER).await;
        let _ = stream.shutdown().await;
        return Err(format!("bad protocol header {header:?}"));
    }
    let local = stream
        .local_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let (read_half, write_half) = stream.into_split();
    let frame_max = config.frame_max.max(FRAME_MIN_SIZE_BYTES);
    let reader = FramedRead::with_capacity(read_half, FrameCodec::new(frame_max), 1024);
    let (out, writer_task) = writer::spawn(write_half, FRAME_MIN_SIZE_BYTES);
    let (tx, rx) = mpsc::unbounded_channel();
    let now = Instant::now();
    let mut conn = Conn {
        id: broker.next_connection_id(),
        broker,
        out,
        reader,
        channel_max: config.channel_max,
        heartbeat: Duration::ZERO,
        last_read: now,
        last_write: now,
        ctx: None,
        channels: HashMap::new(),
        rx,
        sink: Arc::new(ConnSink {
            tx,
            blocked: Default::default(),
        }),
        backlog_limit: config.write_backlog_limit.max(64 * 1024),
        local,
        registered: false,
        close_sent: false,
        published: false,
        blocked_cap: false,
        blocked_sent: false,
    };
    let result = match tokio::time::timeout(handshake_timeout, conn.handshake(peer, &config)).await
    {
        Err(_) => Err("handshake timeout".to_string()),
        Ok(Err(e)) => {
            if conn.close_sent {
                conn.await_close_ok().await;
            }
            Err(e)
        }
        Ok(Ok(())) => {
            tracing::debug!(%peer, id = conn.id, "connection opened");
            let end = conn.main_loop().await;
            let r = match end {
                End::Done => {
                    // Release queues and exclusive queues at once, then let the
                    // client close first (it does on close-ok), so neither side
                    // sees a reset with frames still unread.
                    conn.cleanup();
                    conn.drain_input().await;
                    Ok(())
                }
                End::Error(e, readable) => {
                    tracing::warn!(%peer, code = e.code, text = %e.text, "closing connection");
                    conn.send_close(&e);
                    if readable {
                        conn.await_close_ok().await;
                    }
                    Err(e.text)
                }
            };
            conn.cleanup();
            r
        }
    };
    drop(conn);
    let _ = tokio::time::timeout(Duration::from_secs(5), writer_task).await;
    result
}

fn no_channel(channel: u16) -> AmqpError {
    AmqpError::channel_error(format!("expected 'channel.open' on channel {channel}"))
}

/// The smallest frame_max; the handshake runs with it.
const FRAME_MIN_SIZE_BYTES: u32 = 4096;

impl Conn {
    async fn next_frame(&mut self) -> Result<Frame, String> {
        match self.reader.next().await {
            Some(Ok(frame)) => {
                self.last_read = Instant::now();
                Ok(frame)
            }
            Some(Err(e)) => Err(e.to_string()),
            None => Err("socket closed during handshake".into()),
        }
    }

    async fn expect_method(&mut self) -> Result<Method, String> {
        loop {
            match self.next_frame().await? {
                Frame::Method { channel: 0, method } => return Ok(method),
                Frame::Heartbeat { .. } => continue,
                other => return Err(format!("unexpected frame during handshake: {other:?}")),
            }
        }
    }

    fn handshake_fail(&mut self, e: AmqpError) -> String {
        self.send_close(&e);
        self.close_sent = true;
        e.text
    }

    /// A handshake step got the wrong method: 503, answered at `method_id`.
    fn unexpected(&mut self, got: &Method, expected: &str, method_id: u16) -> String {
        self.handshake_fail(
            AmqpError::command_invalid(format!("expected {expected}, got {}", got.name()))
                .at(10, method_id),
        )
    }

    async fn handshake(&mut self, peer: SocketAddr, config: &Config) -> Result<(), String> {
        self.out.method(
            0,
            &ConnectionStart {
                version_major: 0,
                version_minor: 9,
                server_properties: server_properties(),
                mechanisms: Bytes::from_static(b"PLAIN AMQPLAIN"),
                locales: Bytes::from_static(b"en_US"),
            }
            .into(),
        );
        self.out.flush();
        let start_ok = match self.expect_method().await? {
            Method::ConnectionStartOk(s) => s,
            other => return Err(self.unexpected(&other, "connection.start-ok", 11)),
        };
        let cancel_notify =
            client_capability(&start_ok.client_properties, "consumer_cancel_notify");
        self.blocked_cap = client_capability(&start_ok.client_properties, "connection.blocked");
        let auth_close =
            client_capability(&start_ok.client_properties, "authentication_failure_close");
        let mechanism = start_ok.mechanism.clone();
        let refused = |why: &str| {
            AmqpError::access_refused_hard(format!(
                "{why}Login was refused using authentication mechanism {mechanism}. For details see the broker logfile."
            ))
            .at(10, 11)
        };
        let Some((user, pass)) = credentials(&start_ok.mechanism, &start_ok.response) else {
            let e = if start_ok.mechanism == "PLAIN" || start_ok.mechanism == "AMQPLAIN" {
                refused("")
            } else {
                AmqpError::access_refused_hard(format!(
                    "unsupported authentication mechanism '{}'",
                    start_ok.mechanism
                ))
                .at(10, 11)
            };
            return Err(self.handshake_fail(e));
        };
        let login = self.broker.authenticate(&user, &pass, loopback(&peer));
        let user = match login {
            Ok(u) => u,
            Err(why) => {
                let e = match why {
                    LoginError::Refused => refused(""),
                    LoginError::LoopbackOnly => AmqpError::access_refused_hard(format!(
                        "user '{user}' can only connect via localhost"
                    ))
                    .at(10, 11),
                };
                tracing::warn!(%peer, user = %user, "login refused");
                if auth_close {
                    return Err(self.handshake_fail(e));
                }
                return Err(e.text);
            }
        };
        let server_frame_max = config.frame_max.max(FRAME_MIN_SIZE_BYTES);
        let server_channel_max = if config.channel_max == 0 {
            SERVER_CHANNEL_MAX_DEFAULT
        } else {
            config.channel_max
        };
        self.out.method(
            0,
            &ConnectionTune {
                channel_max: server_channel_max,
                frame_max: server_frame_max,
                heartbeat: config.heartbeat,
            }
            .into(),
        );
        self.out.flush();
        let tune_ok = match self.expect_method().await? {
            Method::ConnectionTuneOk(t) => t,
            other => return Err(self.unexpected(&other, "connection.tune-ok", 31)),
        };
        let frame_max = match tune_ok.frame_max {
            0 => server_frame_max,
            f if f < FRAME_MIN_SIZE_BYTES => {
                return Err(self.handshake_fail(
                    AmqpError::not_allowed(format!(
                        "frame_max={f} < {FRAME_MIN_SIZE_BYTES} min size"
                    ))
                    .at(10, 31),
                ))
            }
            f if f > server_frame_max => {
                return Err(self.handshake_fail(
                    AmqpError::not_allowed(format!("frame_max={f} > {server_frame_max} max size"))
                        .at(10, 31),
                ))
            }
            f => f,
        };
        self.channel_max = match tune_ok.channel_max {
            0 => server_channel_max,
            c => c.min(server_channel_max),
        };
        self.out.frame_max = frame_max;
        self.reader.decoder_mut().set_frame_max(frame_max);
        self.heartbeat = Duration::from_secs(u64::from(tune_ok.heartbeat));
        let open = match self.expect_method().await? {
            Method::ConnectionOpen(o) => o,
            other => return Err(self.unexpected(&other, "connection.open", 40)),
        };
        let Some(vhost) = self.broker.vhost(&open.virtual_host) else {
            return Err(self.handshake_fail(
                AmqpError::not_allowed(format!("vhost {} not found", open.virtual_host)).at(10, 40),
            ));
        };
        if !self
            .broker
            .auth
            .vhost_access(&open.virtual_host, &user.name)
        {
            return Err(self.handshake_fail(
                AmqpError::not_allowed(format!(
                    "access to vhost '{}' refused for user '{}'",
                    open.virtual_host, user.name
                ))
                .at(10, 40),
            ));
        }
        self.out.method(0, &ConnectionOpenOk::default().into());
        self.out.flush();
        let local = self.local;
        self.broker.register_connection(Arc::new(ConnectionInfo {
            id: self.id,
            name: format!("{peer} -> {local}"),
            peer,
            local,
            user: user.name.clone(),
            vhost: open.virtual_host.clone(),
            connected_at: crate::clock::now_ms(),
            client_properties: start_ok.client_properties.clone(),
            frame_max,
            channel_max: self.channel_max,
            heartbeat: tune_ok.heartbeat,
            channels: Default::default(),
            open_channels: Default::default(),
            control: Arc::clone(&self.sink) as Arc<dyn ConnectionControl>,
        }));
        self.registered = true;
        self.ctx = Some(Arc::new(ConnCtx {
            broker: Arc::clone(&self.broker),
            id: self.id,
            vhost,
            user: user.name,
            sink: Arc::clone(&self.sink) as Arc<dyn DeliverySink>,
            conn: Arc::clone(&self.sink),
            max_message_size: config.max_message_size,
            cancel_notify,
            limits: config.limits(),
        }));
        Ok(())
    }

    fn send_close(&mut self, e: &AmqpError) {
        self.out.method(
            0,
            &ConnectionClose {
                reply_code: e.code,
                reply_text: e.text.clone(),
                class_id: e.class_id,
                method_id: e.method_id,
            }
            .into(),
        );
        self.out.flush();
    }

    /// Publishers are not read from while the memory alarm is on.
    fn is_blocked(&self, alarm: &tokio::sync::watch::Receiver<bool>) -> bool {
        self.published && *alarm.borrow()
    }

    /// After the close handshake: read (and drop) until the peer closes, so unread
    /// input does not turn our close into a reset.
    async fn drain_input(&mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while let Some(Ok(_)) = self.reader.next().await {}
        })
        .await;
    }

    /// After we sent connection.close: drop frames until close-ok, EOF or a timeout.
    async fn await_close_ok(&mut self) {
        let deadline = tokio::time::sleep(Duration::from_secs(3));
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                _ = &mut deadline => return,
                f = self.reader.next() => match f {
                    Some(Ok(Frame::Method { channel: 0, method: Method::ConnectionCloseOk(_) })) => return,
                    Some(Ok(Frame::Method { channel: 0, method: Method::ConnectionClose(_) })) => {
                        self.out.method(0, &ConnectionCloseOk::default().into());
                        self.out.flush();
                        return;
                    }
                    Some(Ok(_)) => continue,
                    _ => return,
                }
            }
        }
    }

    async fn main_loop(&mut self) -> End {
        let tick = if self.heartbeat.is_zero() {
            Duration::from_secs(3600)
        } else {
            (self.heartbeat / 2).max(Duration::from_millis(500))
        };
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut alarm = self.broker.watch_alarm();
        let mut alarm_open = true;
        // Consumer timeouts are checked on their own, finer tick.
        let timeout_tick = self
            .ctx
            .as_ref()
            .and_then(|c| c.limits.consumer_timeout_ms)
            .map_or(Duration::from_secs(3600), |ms| {
                Duration::from_millis(ms / 4)
                    .clamp(Duration::from_millis(50), Duration::from_secs(5))
            });
        let mut timeouts = tokio::time::interval(timeout_tick);
        timeouts.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut backpressure = false;
        let store = self.broker.store.clone();
        loop {
            // Back-pressure: while the peer has not read what we wrote, take no
            // deliveries from the mailbox and read no more input.
            let over = self.out.backlog() > self.backlog_limit;
            if over != backpressure {
                backpressure = over;
                self.sink
                    .blocked
                    .store(backpressure, std::sync::atomic::Ordering::Release);
                if backpressure {
                    tracing::debug!(
                        id = self.id,
                        backlog = self.out.backlog(),
                        "output backlog over the limit; pausing"
                    );
                } else {
                    for ch in self.channels.values() {
                        ch.resume_deliveries();
                    }
                }
            }
            // The memory alarm: publishers are not read from.
            let alarm_blocked = self.is_blocked(&alarm);
            if alarm_blocked && !self.blocked_sent && self.blocked_cap {
                self.out.method(
                    0,
                    &ConnectionBlocked {
                        reason: "low on memory".into(),
                    }
                    .into(),
                );
                self.blocked_sent = true;
                self.out.flush();
            }
            // The message store's write buffer is full: read no input until it drains
            // (an async wait; no thread blocks on the store).
            let store_full = store.as_ref().is_some_and(|s| !s.has_room());
            let blocked = backpressure || alarm_blocked || store_full;
            tokio::select! {
                _ = async { if let Some(s) = &store { s.ready().await } }, if store_full => {}
                changed = alarm.changed(), if alarm_open => {
                    if changed.is_err() {
                        alarm_open = false;
                    } else if !*alarm.borrow_and_update() && self.blocked_sent {
                        self.out.method(0, &ConnectionUnblocked::default().into());
                        self.blocked_sent = false;
                    }
                }
                _ = tokio::time::sleep(Duration::from_millis(5)), if backpressure => {
                    // The peer is not reading, so it cannot be expected to send
                    // heartbeats we would read: do not count this time against it.
                    self.last_read = Instant::now();
                }
                _ = timeouts.tick() => {
                    let now = std::time::Instant::now();
                    let expired: Vec<(u16, AmqpError)> = self
                        .channels
                        .values()
                        .filter_map(|ch| ch.ack_timed_out(now).map(|e| (ch.id, e)))
                        .collect();
                    if let Some(ctx) = self.ctx.clone() {
                        for (channel, e) in expired {
                            tracing::warn!(id = self.id, channel, "{}", e.text);
                            if let Err(e) = self.channel_result(&ctx, channel, Err(e)) {
                                return End::Error(e, true);
                            }
                        }
                    }
                }
                frame = self.reader.next(), if !blocked => {
                    match self.on_read(frame) {
                        Ok(true) => {}
                        Ok(false) => return End::Done,
                        Err(end) => return end,
                    }
                    // Take what is already buffered before writing, to batch replies.
                    for _ in 0..128 {
                        if self.is_blocked(&alarm)
                            || self.out.backlog() > self.backlog_limit
                            || store.as_ref().is_some_and(|s| !s.has_room())
                        {
                            break;
                        }
                        let Some(frame) = self.reader.next().now_or_never() else { break };
                        match self.on_read(frame) {
                            Ok(true) => {}
                            Ok(false) => return End::Done,
                            Err(end) => return end,
                        }
                    }
                }
                msg = self.rx.recv(), if !backpressure => {
                    if let Some(msg) = msg {
                        if let Err(e) = self.on_outbound(msg) {
                            return End::Error(e, true);
                        }
                        for _ in 0..256 {
                            let Ok(more) = self.rx.try_recv() else { break };
                            if let Err(e) = self.on_outbound(more) {
                                return End::Error(e, true);
                            }
                        }
                    }
                }
                _ = ticker.tick() => {
                    if !self.heartbeat.is_zero() {
                        let now = Instant::now();
                        if blocked {
                            // Not reading while blocked: the peer is not at fault.
                            self.last_read = now;
                        }
                        if now.duration_since(self.last_read) > self.heartbeat * 2 {
                            tracing::warn!(id = self.id, "missed heartbeats from client, timeout: {:?}", self.heartbeat);
                            return End::Done;
                        }
                        if now.duration_since(self.last_write) >= tick && self.out.is_empty() {
                            self.out.heartbeat();
                        }
                    }
                }
            }
            if let Some(ctx) = &self.ctx {
                for ch in self.channels.values_mut() {
                    ch.flush_confirms(ctx, &mut self.out);
                }
            }
            if !self.out.is_empty() {
                self.last_write = Instant::now();
                if !self.out.flush() {
                    return End::Done;
                }
            }
        }
    }

    /// Ok(true): go on; Ok(false): the connection finished closing.
    fn on_read(&mut self, frame: Option<Result<Frame, WireError>>) -> Result<bool, End> {
        match frame {
            None => Ok(false),
            Some(Err(WireError::Io(_))) => Ok(false),
            Some(Err(e)) => {
                let (class_id, method_id) = e.class_method();
                let err = AmqpError {
                    code: e.reply_code(),
                    text: format!("{} - {}", reply_code::reply_text(e.reply_code()), e),
                    hard: true,
                    class_id,
                    method_id,
                };
                Err(End::Error(err, false))
            }
            Some(Ok(frame)) => {
                self.last_read = Instant::now();
                tracing::trace!(id = self.id, ?frame, "frame in");
                self.on_frame(frame).map_err(|e| End::Error(e, true))
            }
        }
    }

    fn on_frame(&mut self, frame: Frame) -> Result<bool, AmqpError> {
        let Some(ctx) = self.ctx.clone() else {
            return Err(AmqpError::internal_error("connection not open"));
        };
        match frame {
            Frame::Heartbeat { channel: 0 } => Ok(true),
            Frame::Heartbeat { channel } => Err(AmqpError::frame_error(format!(
                "heartbeat frame on channel {channel}"
            ))),
            Frame::Method { channel: 0, method } => self.on_connection_method(method),
            Frame::Method { channel, method } => {
                let (class_id, method_id) = (method.class_id(), method.method_id());
                if matches!(method, Method::BasicPublish(_)) {
                    self.published = true;
                }
                if class_id == 10 {
                    return Err(AmqpError::command_invalid(format!(
                        "{} on channel {channel}",
                        method.name()
                    ))
                    .at(class_id, method_id));
                }
                self.on_channel_method(&ctx, channel, method)
                    .map(|_| true)
                    .map_err(|e| e.at(class_id, method_id))
            }
            Frame::Header {
                channel,
                class_id,
                body_size,
                properties,
            } => {
                let out = &mut self.out;
                let ch = self
                    .channels
                    .get_mut(&channel)
                    .ok_or_else(|| no_channel(channel))?;
                if ch.closing {
                    return Ok(true);
                }
                let r = ch.handle_header(&ctx, class_id, body_size, properties, out);
                self.channel_result(&ctx, channel, r).map(|_| true)
            }
            Frame::Body { channel, payload } => {
                let out = &mut self.out;
                let ch = self
                    .channels
                    .get_mut(&channel)
                    .ok_or_else(|| no_channel(channel))?;
                if ch.closing {
                    return Ok(true);
                }
                let r = ch.handle_body(&ctx, payload, out);
                self.channel_result(&ctx, channel, r).map(|_| true)
            }
        }
    }

    /// Turn a soft error into channel.close; pass hard errors up.
    fn channel_result(
        &mut self,
        ctx: &ConnCtx,
        channel: u16,
        r: Result<(), AmqpError>,
    ) -> Result<(), AmqpError> {
        match r {
            Ok(()) => Ok(()),
            Err(e) if e.hard => Err(e),
            Err(e) => {
                tracing::debug!(channel, code = e.code, text = %e.text, "channel error");
                if let Some(ch) = self.channels.get_mut(&channel) {
                    ch.close(ctx);
                    ch.closing = true;
                }
                self.out.method(
                    channel,
                    &ChannelClose {
                        reply_code: e.code,
                        reply_text: e.text,
                        class_id: e.class_id,
                        method_id: e.method_id,
                    }
                    .into(),
                );
                Ok(())
            }
        }
    }

    fn on_connection_method(&mut self, method: Method) -> Result<bool, AmqpError> {
        match method {
            Method::ConnectionClose(_) => {
                // Release exclusive queues and consumers before close-ok, so a
                // client that saw close-ok never finds them still held.
                self.cleanup();
                self.out.method(0, &ConnectionCloseOk::default().into());
                self.out.flush();
                Ok(false)
            }
            Method::ConnectionCloseOk(_) => Ok(false),
            Method::ConnectionUpdateSecret(_) => {
                self.out
                    .method(0, &ConnectionUpdateSecretOk::default().into());
                Ok(true)
            }
            Method::ConnectionBlocked(_) | Method::ConnectionUnblocked(_) => Ok(true),
            other => Err(AmqpError::command_invalid(format!(
                "{} is not valid on channel 0",
                other.name()
            ))
            .at(other.class_id(), other.method_id())),
        }
    }

    fn on_channel_method(
        &mut self,
        ctx: &ConnCtx,
        channel: u16,
        method: Method,
    ) -> Result<(), AmqpError> {
        // RabbitMQ's check: opening one more channel than channel_max (530).
        if matches!(method, Method::ChannelOpen(_))
            && self.channel_max != 0
            && !self.channels.contains_key(&channel)
            && self.channels.len() >= usize::from(self.channel_max)
        {
            return Err(AmqpError::not_allowed(format!(
                "number of channels opened ({}) has reached the negotiated channel_max ({})",
                self.channels.len(),
                self.channel_max
            )));
        }
        if channel > self.channel_max {
            return Err(AmqpError::channel_error(format!(
                "channel {channel} is above the negotiated channel_max {}",
                self.channel_max
            )));
        }
        match method {
            Method::ChannelOpen(_) => {
                if self.channels.contains_key(&channel) {
                    return Err(AmqpError::channel_error(format!(
                        "second 'channel.open' seen on channel {channel}"
                    )));
                }

                self.channels.insert(channel, Channel::new(channel));
                self.broker.channel_opened(self.id, channel);
                self.out.method(channel, &ChannelOpenOk::default().into());
                Ok(())
            }
            Method::ChannelClose(_) => {
                let mut ch = self
                    .channels
                    .remove(&channel)
                    .ok_or_else(|| no_channel(channel))?;
                self.broker.channel_closed(self.id, channel);
                ch.flush_confirms(ctx, &mut self.out);
                ch.close(ctx);
                self.out.method(channel, &ChannelCloseOk::default().into());
                Ok(())
            }
            Method::ChannelCloseOk(_) => {
                match self.channels.get(&channel) {
                    Some(ch) if ch.closing => {
                        self.channels.remove(&channel);
                        self.broker.channel_closed(self.id, channel);
                    }
                    _ => {}
                }
                Ok(())
            }
            method => {
                let out = &mut self.out;
                let ch = self
                    .channels
                    .get_mut(&channel)
                    .ok_or_else(|| no_channel(channel))?;
                if ch.closing {
                    return Ok(());
                }
                if ch.expecting_content() {
                    return Err(AmqpError::unexpected_frame(format!(
                        "expected content header for class 60, got non content header frame {} instead",
                        method.name()
                    )));
                }
                let r = ch.handle_method(ctx, method, out);
                self.channel_result(ctx, channel, r)
            }
        }
    }

    fn on_outbound(&mut self, msg: Outbound) -> Result<(), AmqpError> {
        match msg {
            Outbound::Deliver(d) => match (self.channels.get_mut(&d.channel), self.ctx.as_ref()) {
                (Some(ch), Some(ctx)) => ch.deliver(ctx, d, &mut self.out),
                _ => d
                    .queue
                    .requeue(vec![d.entry], !d.no_ack, false, crate::clock::now_ms()),
            },
            Outbound::Cancelled { channel, tag } => {
                let notify = self.ctx.as_ref().is_some_and(|c| c.cancel_notify);
                if let Some(ch) = self.channels.get_mut(&channel) {
                    ch.consumer_cancelled(&tag, notify, &mut self.out);
                }
            }
            Outbound::Close(e) => return Err(e),
            Outbound::TxCommitted { channel } => {
                if self.channels.get(&channel).is_some_and(|c| !c.closing) {
                    self.out.method(channel, &TxCommitOk::default().into());
                }
            }
            Outbound::Durable {
                channel,
                first,
                last,
                ok,
            } => {
                if let Some(ch) = self.channels.get_mut(&channel) {
                    ch.durable_done(first, last, ok, &mut self.out);
                }
            }
        }
        Ok(())
    }

    /// Release everything the connection holds in the broker.
    /// Idempotent: a second call finds nothing left to release.
    fn cleanup(&mut self) {
        if std::mem::take(&mut self.registered) {
            self.broker.unregister_connection(self.id);
            self.registered = false;
        }
        let Some(ctx) = self.ctx.take() else { return };
        for (_, mut ch) in self.channels.drain() {
            ch.close(&ctx);
        }
        // Deliveries still in the mailbox go back to their queues.
        self.rx.close();
        while let Ok(msg) = self.rx.try_recv() {
            if let Outbound::Deliver(d) = msg {
                d.queue
                    .requeue(vec![d.entry], !d.no_ack, false, crate::clock::now_ms());
            }
        }
        ctx.vhost.connection_closed(self.id);
    }
}
