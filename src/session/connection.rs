//! The connection state machine's core: its states and events, the caller's API
//! (input, timers, transmit, answers and notices), the protocol header, wire
//! errors and the close handshakes in both directions. The handshake states are
//! in `opening`, the frames of a running connection in `routing`.

use super::channel::{Channel, ChannelIo};
use super::confirms::StoreWait;
use super::content::Assembled;
use super::handshake::{self, Header, Offer, FRAME_MIN_SIZE};
use super::output::Output;
use super::timer::{Expired, Timers, CLOSE_OK_TIMEOUT};
use crate::error::AmqpError;
use crate::wire::*;
use bytes::{Bytes, BytesMut};
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};
use tokio_util::codec::Decoder;

/// What the session is configured with.
#[derive(Debug, Clone)]
pub struct Config {
    /// Largest frame_max offered (raised to the 4096 minimum).
    pub frame_max: u32,
    /// channel_max offered (0: 2047).
    pub channel_max: u16,
    /// Heartbeat interval offered, in seconds (0: off).
    pub heartbeat: u16,
    /// The handshake must finish within this.
    pub handshake_timeout: Duration,
    /// Largest message body accepted.
    pub max_message_size: u64,
    /// The `cluster_name` server property.
    pub cluster_name: String,
}

/// Where the connection is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    /// Waiting for the 8-byte protocol header.
    Header,
    StartOk,
    /// [`Event::Login`] is out; waiting for `accept_login` / `refuse_login`.
    Login,
    TuneOk,
    Open,
    /// [`Event::Open`] is out; waiting for `accept_open` / `refuse_open`.
    OpenAnswer,
    Running,
    /// We sent connection.close; everything but close / close-ok is dropped.
    CloseSent,
    Closed,
}

/// What the session needs its caller to act on.
/// (Not boxed: a publish is moved once, and a box would be an allocation per message.)
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Event<T> {
    /// `connection.start-ok` with readable credentials: answer with
    /// [`Session::accept_login`] or [`Session::refuse_login`].
    Login {
        mechanism: String,
        user: String,
        password: String,
    },
    /// `connection.open`: answer with [`Session::accept_open`] or
    /// [`Session::refuse_open`].
    Open { vhost: String },
    /// channel.open-ok went out.
    ChannelOpened { channel: u16 },
    /// The channel had an error and waits for close-ok: release what `data` holds
    /// in the broker (it stays in the session until close-ok).
    Release { channel: u16 },
    /// The channel is gone: release what `data` holds in the broker.
    ChannelClosed { channel: u16, data: T },
    /// channel.flow active=true: deliveries may resume.
    Resume { channel: u16 },
    /// A method for the broker-facing handlers (exchange, queue, basic, confirm, tx).
    Method { channel: u16, method: Method },
    /// A complete publish.
    Publish { channel: u16, message: Assembled },
    /// `connection.update-secret` (a refreshed access token): answer with
    /// [`Session::accept_update_secret`], or close with
    /// [`handshake::secret_refused`].
    UpdateSecret { secret: Bytes, reason: String },
    /// The connection is over: transmit what is left, then close the socket.
    /// `drain`: a close handshake finished; read until the peer closes.
    Closed { reason: Option<String>, drain: bool },
}

/// One AMQP connection's protocol state; see the [module docs](super).
#[derive(Debug)]
pub struct Session<T> {
    pub(super) config: Config,
    pub(super) offer: Offer,
    pub(super) state: State,
    pub(super) input: BytesMut,
    pub(super) codec: FrameCodec,
    pub(super) out: Output,
    pub(super) timers: Timers,
    pub(super) channels: HashMap<u16, Channel<T>>,
    pub(super) events: VecDeque<Event<T>>,
    pub(super) waits: VecDeque<StoreWait>,
    pub(super) frame_max: u32,
    pub(super) channel_max: u16,
    pub(super) heartbeat: u16,
    pub(super) client_properties: FieldTable,
    pub(super) mechanism: String,
    /// EXTERNAL is offered (see [`Session::offer_external`]).
    pub(super) external: bool,
    pub(super) cancel_notify: bool,
    pub(super) blocked_cap: bool,
    pub(super) auth_close: bool,
    /// The client published at least once (only publishers get blocked).
    pub(super) published: bool,
    /// A resource alarm is on: connection.blocked's reason.
    pub(super) alarm: Option<&'static str>,
    /// We told the client it is blocked.
    pub(super) blocked_sent: bool,
    /// The caller stopped reading (output back-pressure).
    pub(super) backpressure: bool,
    /// The message store's write buffer is full: no input until it drains.
    pub(super) store_full: bool,
    /// The error we closed with, for the final event.
    pub(super) close_reason: Option<String>,
    /// Admits each channel.open (per-user channel limits), if set.
    pub(super) channel_gate: Option<ChannelGate>,
}

/// The caller's decision on each channel.open, asked before channel.open-ok is
/// sent (the broker's per-user `max-channels`): an error refuses the channel and
/// closes the connection with it, as RabbitMQ does.
pub struct ChannelGate(pub Box<dyn FnMut(u16) -> Result<(), AmqpError> + Send>);

impl std::fmt::Debug for ChannelGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ChannelGate")
    }
}

pub(super) fn no_channel(channel: u16) -> AmqpError {
    AmqpError::channel_error(format!("expected 'channel.open' on channel {channel}"))
}

/// AMQP classes whose methods go to the broker-facing handlers.
pub(super) fn broker_class(class_id: u16) -> bool {
    matches!(
        class_id,
        ExchangeDeclare::CLASS_ID
            | QueueDeclare::CLASS_ID
            | BasicQos::CLASS_ID
            | ConfirmSelect::CLASS_ID
            | TxSelect::CLASS_ID
    )
}

impl<T: Default> Session<T> {
    /// A session for a connection accepted at `now`.
    pub fn new(config: Config, now: Instant) -> Session<T> {
        let offer = Offer::new(config.frame_max, config.channel_max, config.heartbeat);
        Session {
            offer,
            state: State::Header,
            input: BytesMut::with_capacity(1024),
            codec: FrameCodec::new(offer.frame_max),
            out: Output::new(FRAME_MIN_SIZE),
            timers: Timers::new(now, config.handshake_timeout),
            channels: HashMap::new(),
            events: VecDeque::new(),
            waits: VecDeque::new(),
            frame_max: FRAME_MIN_SIZE,
            channel_max: offer.channel_max,
            heartbeat: 0,
            client_properties: FieldTable::new(),
            mechanism: String::new(),
            external: false,
            cancel_notify: false,
            blocked_cap: false,
            auth_close: false,
            published: false,
            alarm: None,
            blocked_sent: false,
            backpressure: false,
            store_full: false,
            close_reason: None,
            channel_gate: None,
            config,
        }
    }

    /// Ask `gate` about every later channel.open.
    pub fn set_channel_gate(&mut self, gate: ChannelGate) {
        self.channel_gate = Some(gate);
    }

    /// Offer SASL EXTERNAL in connection.start: the caller has a verified
    /// client certificate to take the user name from. Call before any input.
    /// An EXTERNAL login comes out as [`Event::Login`] with empty user and
    /// password; the caller supplies the name.
    pub fn offer_external(&mut self) {
        self.external = true;
    }

    // ---- input -------------------------------------------------------------

    /// Bytes read from the peer at `now`.
    pub fn handle_input(&mut self, data: &[u8], now: Instant) {
        self.input.extend_from_slice(data);
        self.handle_read(now);
    }

    /// The buffer to read into directly (saves a copy); call
    /// [`Self::handle_read`] after a read added bytes to it.
    pub fn input_buffer(&mut self) -> &mut BytesMut {
        &mut self.input
    }

    /// Bytes were added to [`Self::input_buffer`] at `now`.
    pub fn handle_read(&mut self, now: Instant) {
        self.timers.last_read = now;
    }

    /// The peer closed its side.
    pub fn handle_eof(&mut self) {
        if self.state != State::Closed {
            let reason = match self.state {
                State::Running | State::CloseSent => None,
                _ => Some("socket closed during handshake".to_string()),
            };
            self.finish(reason, false);
        }
    }

    /// Timers that ran out by `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        while self.state != State::Closed {
            match self.timers.expired(now) {
                None => return,
                Some(Expired::Handshake) => self.finish(Some("handshake timeout".into()), false),
                Some(Expired::CloseOk) => {
                    let reason = self.close_reason.take();
                    self.finish(reason, false)
                }
                Some(Expired::PeerDead) => {
                    let reason = format!(
                        "missed heartbeats from client, timeout: {}s",
                        self.heartbeat
                    );
                    self.finish(Some(reason), false)
                }
                Some(Expired::SendHeartbeat) => {
                    self.out.heartbeat();
                    self.timers.last_write = now;
                }
                Some(Expired::Credential) => {
                    self.timers.credential = None;
                    // RabbitMQ's words: 320 CONNECTION_FORCED - credential expired.
                    self.close(AmqpError::connection_forced("credential expired"), now);
                }
            }
        }
    }

    /// The next moment [`Self::handle_timeout`] must be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.state == State::Closed {
            return None;
        }
        self.timers.next()
    }

    // ---- output ------------------------------------------------------------

    /// Bytes to write to the socket (confirms of this batch included), at `now`.
    /// Publishes confirmed (acked) since the last call, for the broker's
    /// counter.
    pub fn take_confirmed(&mut self) -> u64 {
        self.out.take_confirmed()
    }

    pub fn poll_transmit(&mut self, now: Instant) -> Option<Bytes> {
        for (&id, ch) in self.channels.iter_mut() {
            ch.confirms.flush(id, &mut self.out, &mut self.waits);
        }
        let chunk = self.out.take()?;
        self.timers.last_write = now;
        Some(chunk)
    }

    /// Bytes encoded and not yet taken by [`Self::poll_transmit`].
    pub fn pending_output(&self) -> usize {
        self.out.len()
    }

    /// The next store flush to wait for.
    pub fn poll_store_wait(&mut self) -> Option<StoreWait> {
        self.waits.pop_front()
    }

    /// The next event, processing buffered input as far as needed.
    pub fn poll_event(&mut self, now: Instant) -> Option<Event<T>> {
        loop {
            if let Some(e) = self.events.pop_front() {
                return Some(e);
            }
            match self.state {
                State::Closed | State::Login | State::OpenAnswer => return None,
                State::Running if self.reading_paused() => return None,
                State::Header => match handshake::check_header(&self.input) {
                    Header::Incomplete => return None,
                    Header::Wrong => {
                        self.out.raw(PROTOCOL_HEADER);
                        let got = self.input.split_to(PROTOCOL_HEADER.len());
                        self.finish(Some(format!("bad protocol header {:?}", &got[..])), false);
                    }
                    Header::Ok => {
                        self.input.advance_header();
                        let start = if self.external {
                            handshake::start_external(&self.config.cluster_name)
                        } else {
                            handshake::start(&self.config.cluster_name)
                        };
                        self.out.method(0, &start);
                        self.state = State::StartOk;
                    }
                },
                _ => match self.codec.decode(&mut self.input) {
                    Ok(None) => return None,
                    Ok(Some(frame)) => self.on_frame(frame, now),
                    Err(e) => self.on_wire_error(e, now),
                },
            }
        }
    }

    // ---- answers and notices from the caller --------------------------------

    /// The connection's credential (an access token) runs out at `at`: then the
    /// connection is closed with 320 `credential expired`. None: never.
    pub fn set_credential_expiry(&mut self, at: Option<Instant>) {
        if !matches!(self.state, State::CloseSent | State::Closed) {
            self.timers.credential = at;
        }
    }

    /// The secret of an [`Event::UpdateSecret`] was accepted: update-secret-ok
    /// goes out and the credential now runs out at `expiry` (None: never).
    pub fn accept_update_secret(&mut self, expiry: Option<Instant>) {
        if self.state != State::Running {
            return;
        }
        self.out
            .method(0, &ConnectionUpdateSecretOk::default().into());
        self.timers.credential = expiry;
    }

    /// A handler failed on `channel`: a soft error closes the channel
    /// (after [`Event::Release`]), a hard one the connection.
    pub fn channel_error(&mut self, channel: u16, e: AmqpError, now: Instant) {
        if e.hard {
            return self.close(e, now);
        }
        let Some(ch) = self.channels.get_mut(&channel) else {
            return;
        };
        if ch.closing {
            return;
        }
        tracing::warn!(channel, code = e.code, "closing channel: {}", e.text);
        ch.closing = true;
        ch.pending = None;
        ch.confirms.drop_pending();
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
        self.events.push_back(Event::Release { channel });
    }

    /// Close the connection with a hard error: connection.close goes out, and
    /// the session waits (at most 3 s) for close-ok.
    pub fn close(&mut self, e: AmqpError, now: Instant) {
        if matches!(self.state, State::CloseSent | State::Closed) {
            return;
        }
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
        for ch in self.channels.values_mut() {
            ch.closing = true;
            ch.pending = None;
        }
        self.close_reason = Some(e.text);
        self.state = State::CloseSent;
        self.timers.handshake = None;
        self.timers.heartbeat = None;
        self.timers.credential = None;
        self.timers.close = Some(now + CLOSE_OK_TIMEOUT);
    }

    /// The store flushed (`ok`) or failed to flush a batch of [`StoreWait::Confirms`].
    /// A failure closes the connection with 541 instead of confirming.
    pub fn durable_done(&mut self, channel: u16, first: u64, last: u64, ok: bool, now: Instant) {
        let Some(ch) = self.channels.get_mut(&channel) else {
            return;
        };
        let closing = ch.closing;
        if let Err(e) = ch
            .confirms
            .durable_done(channel, (first, last), ok, closing, &mut self.out)
        {
            self.close(e, now);
        }
    }

    /// A batch of [`StoreWait::Confirms`] is to be nacked: a copy forwarded to
    /// another node was not taken there (the publisher may publish it again).
    pub fn durable_nacked(&mut self, channel: u16, first: u64, last: u64) {
        let Some(ch) = self.channels.get_mut(&channel) else {
            return;
        };
        let closing = ch.closing;
        ch.confirms
            .durable_nacked(channel, (first, last), closing, &mut self.out);
    }

    /// The store flush a [`StoreWait::TxCommit`] waited for ended: commit-ok, or
    /// 541 when it failed.
    pub fn tx_flushed(&mut self, channel: u16, ok: bool, now: Instant) {
        if !ok {
            return self.close(
                AmqpError::internal_error(format!(
                    "the transaction on channel {channel} could not be written to disk"
                ))
                .at(TxCommit::CLASS_ID, TxCommit::METHOD_ID),
                now,
            );
        }
        if self.channels.get(&channel).is_some_and(|c| !c.closing) {
            self.out.method(channel, &TxCommitOk::default().into());
        }
    }

    /// The memory alarm went on or off: publishers stop being read, and clients
    /// that understand it get connection.blocked / unblocked.
    pub fn set_alarm(&mut self, reason: Option<&'static str>, now: Instant) {
        self.alarm = reason;
        self.update_blocked(now);
    }

    /// The caller's output backlog went over (or back under) its limit: while
    /// over, input is not read and the peer's silence is not held against it.
    pub fn set_backpressure(&mut self, on: bool, now: Instant) {
        self.backpressure = on;
        self.timers.set_paused(self.reading_paused(), now);
    }

    /// The message store's write buffer is full (or has room again): while full,
    /// input is not read (the publish that would add to it waits, asynchronously,
    /// in the caller) and the peer's silence is not held against it.
    pub fn set_store_full(&mut self, on: bool, now: Instant) {
        self.store_full = on;
        self.timers.set_paused(self.reading_paused(), now);
    }

    /// True while input must not be read (back-pressure or a blocked publisher).
    pub fn reading_paused(&self) -> bool {
        self.state == State::Running
            && (self.backpressure || self.store_full || (self.alarm.is_some() && self.published))
    }

    // ---- state for the caller -------------------------------------------------

    pub fn is_running(&self) -> bool {
        self.state == State::Running
    }

    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Negotiated frame_max (4096 until tune-ok).
    pub fn frame_max(&self) -> u32 {
        self.frame_max
    }

    pub fn channel_max(&self) -> u16 {
        self.channel_max
    }

    /// Negotiated heartbeat in seconds (0: off).
    pub fn heartbeat(&self) -> u16 {
        self.heartbeat
    }

    pub fn client_properties(&self) -> &FieldTable {
        &self.client_properties
    }

    /// The SASL mechanism the client chose (`PLAIN`, `AMQPLAIN`, `EXTERNAL`).
    pub fn mechanism(&self) -> &str {
        &self.mechanism
    }

    /// The client understands a server-sent basic.cancel.
    pub fn cancel_notify(&self) -> bool {
        self.cancel_notify
    }

    pub fn channel_count(&self) -> usize {
        self.channels.len()
    }

    /// An open channel's data and its way out.
    pub fn channel(&mut self, id: u16) -> Option<(&mut T, ChannelIo<'_>)> {
        let ch = self.channels.get_mut(&id)?;
        Some(channel_io(id, ch, &mut self.out, &mut self.waits))
    }

    /// Visit every channel.
    pub fn for_each_channel(&mut self, mut f: impl FnMut(&mut T, ChannelIo<'_>)) {
        for (&id, ch) in self.channels.iter_mut() {
            let (data, io) = channel_io(id, ch, &mut self.out, &mut self.waits);
            f(data, io);
        }
    }

    // ---- internals -------------------------------------------------------------

    /// The connection is over; hand every channel back and say so.
    pub(super) fn finish(&mut self, reason: Option<String>, drain: bool) {
        self.state = State::Closed;
        self.timers.handshake = None;
        self.timers.close = None;
        self.timers.heartbeat = None;
        self.timers.credential = None;
        for (channel, ch) in self.channels.drain() {
            self.events.push_back(Event::ChannelClosed {
                channel,
                data: ch.data,
            });
        }
        self.events.push_back(Event::Closed { reason, drain });
    }

    pub(super) fn update_blocked(&mut self, now: Instant) {
        if self.state != State::Running {
            return;
        }
        if let Some(reason) = self.alarm.filter(|_| self.published) {
            if !self.blocked_sent && self.blocked_cap {
                self.out.method(
                    0,
                    &ConnectionBlocked {
                        reason: reason.into(),
                    }
                    .into(),
                );
                self.blocked_sent = true;
            }
        } else if self.alarm.is_none() && self.blocked_sent {
            self.out.method(0, &ConnectionUnblocked::default().into());
            self.blocked_sent = false;
        }
        self.timers.set_paused(self.reading_paused(), now);
    }

    fn on_wire_error(&mut self, e: WireError, now: Instant) {
        match self.state {
            State::Running => {
                let (class_id, method_id) = e.class_method();
                let err = AmqpError {
                    code: e.reply_code(),
                    text: format!("{} - {}", reply_code::reply_text(e.reply_code()), e),
                    hard: true,
                    class_id,
                    method_id,
                };
                // The input is garbage from here on: no wait for close-ok.
                self.close(err, now);
                self.input.clear();
                let reason = self.close_reason.take();
                self.finish(reason, false);
            }
            _ => {
                self.input.clear();
                let reason = self.close_reason.take().unwrap_or_else(|| e.to_string());
                self.finish(Some(reason), false)
            }
        }
    }

    fn on_frame(&mut self, frame: Frame, now: Instant) {
        match self.state {
            State::StartOk | State::TuneOk | State::Open => self.on_handshake_frame(frame, now),
            State::Running => {
                if let Err(e) = self.on_running_frame(frame, now) {
                    self.close(e, now);
                }
            }
            State::CloseSent => match frame {
                Frame::Method {
                    channel: 0,
                    method: Method::ConnectionCloseOk(_),
                } => {
                    let reason = self.close_reason.take();
                    self.finish(reason, false);
                }
                Frame::Method {
                    channel: 0,
                    method: Method::ConnectionClose(_),
                } => {
                    self.out.method(0, &ConnectionCloseOk::default().into());
                    let reason = self.close_reason.take();
                    self.finish(reason, false);
                }
                _ => {}
            },
            State::Header | State::Login | State::OpenAnswer | State::Closed => {}
        }
    }
}

/// Drop the protocol header from the front of the input.
trait AdvanceHeader {
    fn advance_header(&mut self);
}

impl AdvanceHeader for BytesMut {
    fn advance_header(&mut self) {
        bytes::Buf::advance(self, PROTOCOL_HEADER.len());
    }
}

/// A channel's data and its way out, borrowed from the session's parts.
fn channel_io<'a, T>(
    id: u16,
    ch: &'a mut Channel<T>,
    out: &'a mut Output,
    waits: &'a mut VecDeque<StoreWait>,
) -> (&'a mut T, ChannelIo<'a>) {
    (
        &mut ch.data,
        ChannelIo {
            id,
            closing: ch.closing,
            out,
            confirms: &mut ch.confirms,
            waits,
        },
    )
}
