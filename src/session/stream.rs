//! The RabbitMQ Stream protocol connection state machine, sans-IO: frames
//! in (with the time), frames out, no sockets and no clock.
//!
//! The driver (`server::stream`) feeds it bytes ([`StreamSession::handle_input`]),
//! tells it when a stream it uses committed more ([`StreamSession::handle_committed`])
//! and when its timer fires ([`StreamSession::handle_timeout`]), and drains
//! [`StreamSession::poll_output`] into the socket (bytes, and with
//! [`StreamSession::set_zero_copy`] chunk data sections as file ranges for
//! `sendfile(2)`); [`StreamSession::watched`]
//! lists the streams whose commits it must report.
//!
//! Owned here: the handshake (peer properties, SASL PLAIN / AMQPLAIN,
//! EXTERNAL on a TLS connection with a verified client certificate, and
//! ANONYMOUS as `anonymous_login_user` when configured, tune
//! with frame max and heartbeat, open with the vhost access check), the
//! command-version exchange, heartbeats (sent when idle, the peer dead after
//! two silent intervals), stream create / delete through the vhost (a stream
//! is a queue with `x-queue-type: stream`; on a clustered node these and the
//! super stream ones are reported as a [`HeldChange`] whose response waits
//! until the driver says the metadata group committed it), metadata (the
//! leader of each stream: this node, or a clustered stream's home node),
//! publishers (with
//! deduplication by reference and publishing id: the log drops duplicates,
//! and they are confirmed like the rest; clustered, a publisher of a stream
//! homed on another node sends its frames there as [`Forward`] requests, and
//! `query_publisher_sequence` and `store_offset` go the same way), confirms sent only once the log's
//! committed offset passes the messages (one confirm frame per publisher per
//! round), subscriptions with credit (one credit = one chunk, sent as stored),
//! server-side offsets, stream stats, super streams (a direct exchange with
//! its partition streams bound in order), and close in both directions.
//! Frames it cannot parse close the connection with the protocol's code.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

use crate::broker::auth::{Access, User};
use crate::broker::remote::{StreamAnswer, StreamEntry, StreamOp};
use crate::broker::vhost::{ExchangeDeclare, QueueDeclare, VHost};
use crate::broker::{Broker, LoginError};
use crate::session::handshake::{self, EXTERNAL};
use crate::session::stream_sac::{GroupKey, SacEvent, SacRegistry};
use crate::session::stream_stats::{ConsumerStats, PublisherStats, StreamConnStats};
use crate::storage::stream::chunk::{Header, HEADER_LEN};
use crate::storage::stream::{
    BatchLimits, BatchRead, ChunkSpan, FileSpan, Keep, MergeLimits, NewMessage, StreamError,
    StreamLog, StreamReader,
};
use crate::wire::stream::{
    check_frame, code, key, request, response, FrameError, OffsetSpec, Published, Request,
    COMMAND_VERSIONS,
};
use crate::wire::types::{FieldTable, FieldValue};
use tokio::sync::mpsc::UnboundedSender;

/// SASL `ANONYMOUS` (RFC 4505): no credentials, the configured user.
const ANONYMOUS: &str = "ANONYMOUS";

/// What the session was configured with.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    /// Largest frame we accept and propose (0: no limit).
    pub frame_max: u32,
    /// Heartbeat we propose, in seconds (0: none).
    pub heartbeat: u32,
    /// Host and port metadata and open advertise.
    pub advertised_host: String,
    pub advertised_port: u16,
    /// Milliseconds a client has to finish the handshake.
    pub handshake_timeout_ms: u64,
    /// The broker's single active consumer groups.
    pub sac: Arc<SacRegistry>,
    /// SASL `ANONYMOUS` logs in as this user with this password (offered
    /// only when set: `anonymous_login_user` / `anonymous_login_pass`).
    pub anonymous: Option<(String, String)>,
    /// The node is clustered: create / delete of a stream or super stream
    /// report what they changed ([`StreamSession::held_change`]) and their
    /// response waits for the metadata group's commit.
    pub clustered: bool,
    /// Stored chunks written within this many ms of each other go out as one
    /// ([`crate::storage::stream::chunk::Merged`]); 0: as stored.
    pub deliver_merge_ms: u32,
}

/// One change of replicated metadata a request made in the local broker
/// (clustered only), as the vhost door took it.
#[derive(Debug, Clone)]
pub enum MetaChange {
    DeclareQueue(QueueDeclare),
    DeleteQueue(String),
    DeclareExchange(ExchangeDeclare),
    DeleteExchange(String),
    /// A binding from `exchange` to the queue `queue`.
    Bind {
        exchange: String,
        queue: String,
        routing_key: String,
        arguments: FieldTable,
    },
}

/// What a request changed of the replicated metadata, in the order it was
/// made; the request's response is held until the driver reports the
/// commit ([`StreamSession::change_committed`]).
#[derive(Debug, Clone)]
pub struct HeldChange {
    pub vhost: String,
    pub changes: Vec<MetaChange>,
}

/// A response held for a [`HeldChange`].
struct Held {
    change: HeldChange,
    key: u16,
    correlation_id: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    PeerProperties,
    Sasl,
    Tune,
    Open,
    Running,
    /// We sent a close and wait for its answer (or the timeout).
    Closing,
    Closed,
}

struct Publisher {
    stream: String,
    log: Arc<StreamLog>,
    reference: Option<Arc<str>>,
    /// (next offset that must be committed, publishing ids, of which
    /// duplicates) per publish frame; the ids of all of them in
    /// `pending_ids`, each frame's duplicates first.
    pending: VecDeque<(u64, usize, usize)>,
    pending_ids: VecDeque<u64>,
    /// The log's durable (fsynced) next offset: what confirms wait for.
    committed: tokio::sync::watch::Receiver<u64>,
    stats: Arc<PublisherStats>,
    /// Clustered, a stream homed on another node: its name. Publishes go
    /// there ([`Forward`]); `log` is this node's empty copy (watched only
    /// for the stream's deletion).
    home: Option<String>,
    /// Its forwarded publish frames, in order: (token, publishing ids, the
    /// home node's answer once it came). Confirmed in this order.
    forwarded: VecDeque<(u64, Vec<u64>, Option<StreamAnswer>)>,
}

/// Confirm what `p` published that the log has fsynced: one frame, or
/// two when duplicates are among it. As RabbitMQ (whose writer confirms
/// duplicates before the chunk they came with), a duplicate's id goes in a
/// frame of its own before the written ids: a client that keys its waiters
/// by publishing id (the Rust client removes one per id, and panics on an
/// id it no longer waits for) sees every id it waits on before a repeat.
fn confirm_ready(out: &mut BytesMut, id: u8, p: &mut Publisher) {
    let committed = *p.committed.borrow();
    let ready = p
        .pending
        .iter()
        .take_while(|(until, _, _)| *until <= committed)
        .count();
    if ready == 0 {
        return;
    }
    let (count, dups) = p
        .pending
        .iter()
        .take(ready)
        .fold((0, 0), |(c, d), (_, n, k)| (c + n, d + k));
    p.stats
        .confirmed
        .fetch_add(count as u64, std::sync::atomic::Ordering::Relaxed);
    if dups == 0 {
        p.pending.drain(..ready);
        response::publish_confirm(out, id, count, p.pending_ids.drain(..count));
        return;
    }
    let (mut dup_ids, mut ids) = (Vec::with_capacity(dups), Vec::with_capacity(count - dups));
    for (_, n, k) in p.pending.drain(..ready) {
        for (i, pid) in p.pending_ids.drain(..n).enumerate() {
            if i < k {
                dup_ids.push(pid);
            } else {
                ids.push(pid);
            }
        }
    }
    response::publish_confirm(out, id, dups, dup_ids.into_iter());
    if !ids.is_empty() {
        response::publish_confirm(out, id, ids.len(), ids.into_iter());
    }
}

/// Confirm or refuse what the home node answered of `p`'s forwarded
/// publish frames, in their order (a frame answered before an earlier one
/// waits for it); duplicates in a frame of their own first, as
/// [`confirm_ready`] sends them.
fn confirm_forwarded(out: &mut BytesMut, id: u8, p: &mut Publisher) {
    use std::sync::atomic::Ordering::Relaxed;
    while p.forwarded.front().is_some_and(|f| f.2.is_some()) {
        let Some((_, ids, Some(answer))) = p.forwarded.pop_front() else {
            break;
        };
        let duplicates = match answer {
            StreamAnswer::Published { duplicates } => duplicates,
            other => {
                let c = match other {
                    StreamAnswer::Failed(c) => c,
                    _ => code::INTERNAL_ERROR,
                };
                p.stats.errored.fetch_add(ids.len() as u64, Relaxed);
                let errors: Vec<(u64, u16)> = ids.iter().map(|&i| (i, c)).collect();
                response::publish_error(out, id, &errors);
                continue;
            }
        };
        p.stats.confirmed.fetch_add(ids.len() as u64, Relaxed);
        // `duplicates` is in ascending order of index.
        let mut d = duplicates.iter().peekable();
        let (mut dup, mut rest) = (Vec::new(), Vec::with_capacity(ids.len()));
        for (i, &pid) in ids.iter().enumerate() {
            if d.next_if(|&&x| x as usize == i).is_some() {
                dup.push(pid);
            } else {
                rest.push(pid);
            }
        }
        for ids in [dup, rest] {
            if !ids.is_empty() {
                response::publish_confirm(out, id, ids.len(), ids.into_iter());
            }
        }
    }
}

/// The Stream protocol's response code for a stream store error.
pub fn error_code(e: &StreamError) -> u16 {
    match e {
        StreamError::Deleted => code::STREAM_DOES_NOT_EXIST,
        StreamError::ReferenceTooLong => code::PRECONDITION_FAILED,
        _ => code::INTERNAL_ERROR,
    }
}

/// A piece of output for the socket, in order with the rest.
#[derive(Debug, Clone)]
pub enum Out {
    Bytes(Bytes),
    /// `len` bytes of `file` from `pos`: a delivered chunk's data section,
    /// for `sendfile(2)` (committed chunks never change).
    File {
        file: Arc<std::fs::File>,
        pos: u64,
        len: usize,
    },
}

impl Out {
    pub fn len(&self) -> usize {
        match self {
            Out::Bytes(b) => b.len(),
            Out::File { len, .. } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes themselves (a file range is read: the fallback where
    /// `sendfile(2)` cannot be used).
    pub fn into_bytes(self) -> std::io::Result<Bytes> {
        match self {
            Out::Bytes(b) => Ok(b),
            Out::File { file, pos, len } => {
                use std::os::unix::fs::FileExt;
                let mut v = vec![0u8; len];
                file.read_exact_at(&mut v, pos)?;
                Ok(Bytes::from(v))
            }
        }
    }
}

struct Subscription {
    stream: String,
    log: Arc<StreamLog>,
    /// None while a single active consumer is inactive or waits for the
    /// client's answer to its consumer update.
    reader: Option<StreamReader>,
    credit: u32,
    /// Its single active consumer group.
    sac: Option<GroupKey>,
    /// The correlation id of the consumer update it waits an answer for.
    awaiting: Option<u32>,
    /// That consumer update told it to step down (its answer goes to the
    /// group, not to a reader).
    stepping_down: bool,
    /// Stream filtering (`filter.N` values, `match-unfiltered`): chunks whose
    /// bloom filter rules them out are skipped (clients filter the rest).
    filter: Option<Arc<(Vec<String>, bool)>>,
    stats: Arc<ConsumerStats>,
    /// The token of the read in flight (its reader is lent to it).
    reading: Option<u64>,
    /// Stored size of the last chunk sent: sizes the next read.
    last_chunk_len: usize,
    /// No delivery before this time ([`FIRST_DELIVERY_DELAY_MS`]).
    not_before_ms: u64,
}

/// How long after its subscribe response a subscription's first chunk
/// waits. RabbitMQ's reader takes a few hundred microseconds to open its
/// osiris reader before the first chunk goes out, and client code relies on
/// that without knowing: the JavaScript client's own test (and applications
/// written the same way) reference the consumer object in its message
/// handler to store an offset, and that object exists only once the
/// subscribe response has been handled; a chunk arriving in the same read as
/// the response reaches the handler first. A millisecond or two, once per
/// subscription, puts the first chunk in a later read.
const FIRST_DELIVERY_DELAY_MS: u64 = 2;

/// The most one read takes from a segment (and queues for the socket).
const READ_MAX_BYTES: usize = 1 << 20;
/// The least one read takes.
const READ_MIN_BYTES: usize = 16 << 10;

/// A subscription's read of its next chunks ([`StreamSession::poll_read`]):
/// file I/O, run off the connection's state machine. [`ReadJob::run_cached`]
/// reads only what the page cache holds (never blocks: fine on the
/// connection's task); [`ReadJob::run`] may wait for the disk (a blocking
/// thread). Either way one `pread` covers up to the subscription's credit in
/// chunks, and the result goes back through [`StreamSession::handle_read`].
pub struct ReadJob {
    id: u8,
    token: u64,
    /// Leave the data sections in the files when the page cache holds them
    /// ([`Out::File`]).
    zero_copy: bool,
    reader: StreamReader,
    limits: BatchLimits,
    filter: Option<Arc<(Vec<String>, bool)>>,
    buf: Vec<u8>,
    pool: BufPool,
}

/// What a [`ReadJob`] read.
pub struct ReadDone {
    id: u8,
    token: u64,
    reader: StreamReader,
    buf: Vec<u8>,
    spans: Vec<ChunkSpan>,
    /// Chunks left in their files (a zero-copy read).
    files: Vec<FileSpan>,
    result: Result<(), StreamError>,
    pool: BufPool,
}

impl std::fmt::Debug for ReadJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadJob").field("id", &self.id).finish()
    }
}

impl std::fmt::Debug for ReadDone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadDone")
            .field("id", &self.id)
            .field("chunks", &(self.spans.len() + self.files.len()))
            .finish()
    }
}

impl ReadJob {
    fn read(
        &mut self,
        cached_only: bool,
        spans: &mut Vec<ChunkSpan>,
    ) -> Result<BatchRead, StreamError> {
        let limits = BatchLimits {
            cached_only,
            ..self.limits
        };
        let keep = |bloom: &[u8]| match self.filter.as_deref() {
            Some((values, unfiltered)) => {
                crate::storage::stream::may_match(bloom, values, *unfiltered)
            }
            None => true,
        };
        self.reader.read_batch(&mut self.buf, spans, limits, &keep)
    }

    fn done(self, spans: Vec<ChunkSpan>, result: Result<(), StreamError>) -> ReadDone {
        ReadDone {
            id: self.id,
            token: self.token,
            reader: self.reader,
            buf: self.buf,
            spans,
            files: Vec::new(),
            result,
            pool: self.pool,
        }
    }

    /// Read what the page cache holds, here and now; the job back if the
    /// disk would have to be waited for.
    /// A zero-copy job locates the chunks and leaves their data in the
    /// files; if the page cache does not hold them, [`run`](Self::run) reads
    /// them (so `sendfile(2)` never waits for the disk on the connection's task).
    pub fn run_cached(mut self) -> Result<ReadDone, Box<ReadJob>> {
        if self.zero_copy {
            let mut files = Vec::new();
            let limits = BatchLimits {
                cached_only: true,
                ..self.limits
            };
            let filter = self.filter.clone();
            let keep = |bloom: &[u8]| match filter.as_deref() {
                Some((values, unfiltered)) => {
                    crate::storage::stream::may_match(bloom, values, *unfiltered)
                }
                None => true,
            };
            // Without a filter every user chunk is kept: no bloom filter read.
            let keep: Option<Keep<'_>> = filter.is_some().then_some(&keep);
            let r = self.reader.locate_batch(&mut files, limits, keep);
            return match r {
                Ok(BatchRead::WouldBlock) => Err(Box::new(self)),
                Ok(BatchRead::Read) => {
                    let mut done = self.done(Vec::new(), Ok(()));
                    done.files = files;
                    Ok(done)
                }
                Err(e) => {
                    let mut done = self.done(Vec::new(), Err(e));
                    done.files = files;
                    Ok(done)
                }
            };
        }
        let mut spans = Vec::new();
        match self.read(true, &mut spans) {
            Ok(BatchRead::WouldBlock) => Err(Box::new(self)),
            Ok(BatchRead::Read) => Ok(self.done(spans, Ok(()))),
            Err(e) => Ok(self.done(spans, Err(e))),
        }
    }

    /// Read, waiting for the disk if need be (on a thread that may block).
    pub fn run(mut self) -> ReadDone {
        let mut spans = Vec::new();
        let r = self.read(false, &mut spans).map(|_| ());
        self.done(spans, r)
    }
}

/// Read buffers of one connection: a buffer whose chunks were all written
/// comes back here (when the last [`Bytes`] slice of it is dropped) and is
/// reused, so steady reading allocates and zeroes nothing.
#[derive(Clone, Default)]
struct BufPool(Arc<parking_lot::Mutex<Vec<Vec<u8>>>>);

/// Buffers a connection keeps for reuse.
const POOL_KEEP: usize = 4;

impl BufPool {
    fn take(&self) -> Vec<u8> {
        self.0.lock().pop().unwrap_or_default()
    }

    fn put(&self, buf: Vec<u8>) {
        let mut p = self.0.lock();
        if p.len() < POOL_KEEP && buf.capacity() > 0 {
            p.push(buf);
        }
    }
}

/// A read buffer lent to the [`Bytes`] slices sent from it.
struct Lent {
    buf: Vec<u8>,
    pool: BufPool,
}

impl AsRef<[u8]> for Lent {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        self.pool.put(std::mem::take(&mut self.buf));
    }
}

/// The most data one delivered chunk of merged stored ones carries.
const MERGED_DATA_MAX: u32 = 256 << 10;

/// The most data a delivered chunk of merged stored chunks may carry for
/// its `Deliver` frame (of `version`) to fit `frame_max` (0: no limit).
fn merged_data_max(frame_max: u32, version: u16) -> u32 {
    // The frame's length field and the rest of its head.
    let head = 4 + response::deliver_size(version, 0);
    match frame_max {
        0 => MERGED_DATA_MAX,
        f => MERGED_DATA_MAX.min(f.saturating_sub(head)),
    }
}

/// One stored chunk read for a subscription: whether it joins the one
/// before in a delivered chunk, the header of the chunk it is delivered in
/// (up to and with it), its stored header and its data.
struct Part {
    joins: bool,
    delivered: Header,
    stored: [u8; HEADER_LEN],
    data: Out,
}

/// Where a read's deliveries for subscription `id` are queued.
struct Deliveries<'a> {
    out: &'a mut BytesMut,
    ready: &'a mut VecDeque<Out>,
    ready_bytes: &'a mut usize,
    version: u16,
    id: u8,
    committed: u64,
}

impl Deliveries<'_> {
    /// Queue `parts`: each run of parts joined to the one before goes out
    /// as one chunk (the deliver frame's head, then each part's data), for
    /// one of `sub`'s credits.
    fn runs(&mut self, sub: &mut Subscription, parts: impl Iterator<Item = Part>) {
        let mut parts = parts.peekable();
        while let Some(first) = parts.next() {
            let mut run = vec![first.data];
            let mut header = first.delivered;
            while let Some(p) = parts.next_if(|p| p.joins) {
                header = p.delivered;
                run.push(p.data);
            }
            let raw = delivered_raw(run.len(), &first.stored, &header);
            let len = header.data_len as usize;
            response::deliver_head(
                self.out,
                self.version,
                self.id,
                self.committed,
                &raw,
                len as u32,
            );
            let head = self.out.split().freeze();
            *self.ready_bytes += head.len() + len;
            self.ready.push_back(Out::Bytes(head));
            self.ready.extend(run);
            sub.last_chunk_len = header.total_len() as usize;
            sub.credit = sub.credit.saturating_sub(1);
            sub.stats
                .delivered(header.first_offset, header.num_records, sub.credit);
        }
    }
}

/// The header bytes a delivered chunk of `parts` stored chunks is sent
/// with: the stored ones (`first_raw`) for a chunk alone, else its
/// `delivered` ([`crate::storage::stream::chunk::Merged`]) header written out.
fn delivered_raw(
    parts: usize,
    first_raw: &[u8; HEADER_LEN],
    delivered: &Header,
) -> [u8; HEADER_LEN] {
    if parts == 1 {
        return *first_raw;
    }
    let mut raw = [0u8; HEADER_LEN];
    let mut b = BytesMut::with_capacity(HEADER_LEN);
    delivered.write(&mut b);
    raw.copy_from_slice(&b);
    raw
}

/// How often the streams a connection uses are checked for deletion.
const CHECK_INTERVAL_MS: u64 = 1000;

/// Past this much output queued for the socket, no read starts.
const DELIVER_BUDGET: usize = 4 << 20;

/// The largest frame an open connection may send over its frame-max, when
/// the frame comes in several reads (see [`StreamSession::handle_input`]).
pub const LONG_FRAME_LIMIT: u32 = 64 << 20;

/// One stream connection.
pub struct StreamSession {
    broker: Arc<Broker>,
    settings: StreamSettings,
    connection_id: u64,
    from_loopback: bool,
    state: State,
    user: Option<User>,
    vhost: Option<Arc<VHost>>,
    /// What we accept (the negotiated value once tuned).
    frame_max: u32,
    /// The frame at the head of the input is over `frame_max` but was let
    /// through when it was first seen in part ([`LONG_FRAME_LIMIT`]).
    long_frame: bool,
    heartbeat_ms: u64,
    deliver_version: u16,
    started_ms: u64,
    last_recv_ms: u64,
    last_send_ms: u64,
    /// When a close we sent gives up waiting for its answer.
    closing_deadline_ms: u64,
    /// When streams in use are next checked for deletion.
    next_check_ms: u64,
    /// The time the session was last given (input, timeouts, commits).
    now_ms: u64,
    publishers: HashMap<u8, Publisher>,
    subscriptions: HashMap<u8, Subscription>,
    /// The caller does not read input ([`StreamSession::set_input_paused`]):
    /// the peer's silence is not held against it.
    input_paused: bool,
    watch_changed: bool,
    /// A subscription that became active while subscribing.
    pending_activation: Option<u8>,
    /// Where this connection hears of its subscriptions becoming active.
    sac_tx: UnboundedSender<SacEvent>,
    /// Correlation ids of the requests the server sends.
    next_correlation: u32,
    /// Small frames being assembled.
    out: BytesMut,
    /// Whole pieces ready for the socket, in order.
    ready: VecDeque<Out>,
    /// Deliver chunk data as file ranges ([`Out::File`]).
    zero_copy: bool,
    /// Bytes in `ready`.
    ready_bytes: usize,
    /// Tokens of reads ([`ReadJob`]).
    next_read: u64,
    read_bufs: BufPool,
    /// Why the connection ended, once it has.
    pub close_reason: Option<String>,
    /// The TLS session of a TLS connection (its client certificate's login).
    tls: Option<crate::tls::Established>,
    /// The SASL mechanism the client logged in with.
    auth_mechanism: &'static str,
    /// The client's peer properties (its `client_properties` in the admin API).
    peer_properties: Vec<(String, String)>,
    /// How the admin API sees this connection, once given; registered with
    /// the broker while open.
    admin: Option<Admin>,
    /// Clustered: a response waiting for its change's commit (no frame is
    /// handled meanwhile).
    held: Option<Held>,
    /// Clustered: requests for streams homed on other nodes, for the
    /// driver to send ([`StreamSession::poll_forward`]).
    forwards: VecDeque<Forward>,
    /// What each forwarded request that is not answered yet is for.
    awaiting: HashMap<u64, Awaited>,
    next_token: u64,
}

/// A Stream protocol request for a stream homed on another node (clustered:
/// publishes, `query_publisher_sequence` and `store_offset` go to the
/// stream's home node, as RabbitMQ's go to its leader), for the driver to
/// send there; its answer comes back through
/// [`StreamSession::handle_forwarded`].
#[derive(Debug, Clone)]
pub struct Forward {
    pub token: u64,
    /// The home node.
    pub node: String,
    pub vhost: String,
    pub stream: String,
    pub op: StreamOp,
    /// A publish's entries, one after the other.
    pub body: Bytes,
}

/// What a forwarded request answers.
#[derive(Debug, Clone, Copy)]
enum Awaited {
    /// A publish frame of the publisher with this id.
    Publish(u8),
    /// A `query_publisher_sequence` (its correlation id).
    Sequence(u32),
    StoreOffset,
}

/// The admin API's view of a connection and where it came from.
struct Admin {
    stats: Arc<StreamConnStats>,
    peer: std::net::SocketAddr,
    local: std::net::SocketAddr,
    registered: bool,
}

impl StreamSession {
    pub fn new(
        broker: Arc<Broker>,
        settings: StreamSettings,
        connection_id: u64,
        from_loopback: bool,
        sac_tx: UnboundedSender<SacEvent>,
        now_ms: u64,
    ) -> Self {
        StreamSession {
            broker,
            frame_max: settings.frame_max,
            long_frame: false,
            settings,
            connection_id,
            from_loopback,
            state: State::PeerProperties,
            user: None,
            vhost: None,
            heartbeat_ms: 0,
            deliver_version: 1,
            started_ms: now_ms,
            last_recv_ms: now_ms,
            last_send_ms: now_ms,
            closing_deadline_ms: 0,
            next_check_ms: now_ms + CHECK_INTERVAL_MS,
            now_ms,
            publishers: HashMap::new(),
            input_paused: false,
            subscriptions: HashMap::new(),
            watch_changed: false,
            sac_tx,
            pending_activation: None,
            next_correlation: 1,
            out: BytesMut::with_capacity(4096),
            ready: VecDeque::new(),
            zero_copy: false,
            ready_bytes: 0,
            next_read: 1,
            read_bufs: BufPool::default(),
            close_reason: None,
            tls: None,
            auth_mechanism: "PLAIN",
            peer_properties: Vec::new(),
            admin: None,
            held: None,
            forwards: VecDeque::new(),
            awaiting: HashMap::new(),
            next_token: 1,
        }
    }

    /// Deliver chunks' data sections as file ranges ([`Out::File`]) when the
    /// page cache holds them: the driver sends them with `sendfile(2)` (a
    /// plain TCP socket).
    pub fn set_zero_copy(&mut self, on: bool) {
        self.zero_copy = on;
    }

    /// The connection is TLS: a verified client certificate makes SASL
    /// EXTERNAL available (its user name from `ssl_cert_login_from`).
    pub fn set_tls(&mut self, tls: crate::tls::Established) {
        self.tls = Some(tls);
    }

    /// Show the connection in the admin API (registered with the broker
    /// from open to the end) with `stats`, reached from `peer` on `local`.
    pub fn set_admin(
        &mut self,
        stats: Arc<StreamConnStats>,
        peer: std::net::SocketAddr,
        local: std::net::SocketAddr,
    ) {
        self.admin = Some(Admin {
            stats,
            peer,
            local,
            registered: false,
        });
    }

    /// Closed through the admin API: as RabbitMQ, the socket is closed
    /// without a close frame.
    pub fn force_close(&mut self, reason: &str) {
        self.close_reason = Some(format!("closed by the broker: {reason}"));
        self.state = State::Closed;
    }

    /// The TLS session, on a TLS connection.
    pub fn tls(&self) -> Option<&crate::tls::Established> {
        self.tls.as_ref()
    }

    /// The connection is over: flush what is queued, then close the socket.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// The user, once authenticated.
    pub fn user(&self) -> Option<&str> {
        self.user.as_ref().map(|u| u.name.as_str())
    }

    /// Frames from the socket: every whole frame in `buf` is handled and
    /// removed; a partial one stays. Clustered, a request whose response
    /// waits for a commit ([`Self::held_change`]) stops the handling: the
    /// frames after it stay in `buf` until [`Self::change_committed`] and
    /// the next call.
    pub fn handle_input(&mut self, buf: &mut BytesMut, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
        if !buf.is_empty() {
            self.last_recv_ms = now_ms;
        }
        while !matches!(self.state, State::Closed) {
            if self.held.is_some() {
                return;
            }
            let max = match self.state {
                // Before tune: a generous bound for handshake frames.
                State::PeerProperties | State::Sasl | State::Tune | State::Open => self
                    .settings
                    .frame_max
                    .max(crate::wire::stream::MIN_FRAME_MAX),
                _ => self.frame_max,
            };
            let checked = match check_frame(buf, max) {
                // As RabbitMQ's stream reader: a frame over frame-max is
                // refused when it is all there at once (its first read held
                // it whole); one that comes over several reads is taken, up
                // to LONG_FRAME_LIMIT (RabbitMQ has no bound). Clients count
                // on it: rstream's producer sends batches of 1.5 MB over the
                // 1 MiB it negotiated.
                Err(FrameError::TooLarge { size, .. })
                    if matches!(self.state, State::Running)
                        && size <= LONG_FRAME_LIMIT
                        && (self.long_frame || buf.len() < 4 + size as usize) =>
                {
                    self.long_frame = true;
                    check_frame(buf, LONG_FRAME_LIMIT)
                }
                r => r,
            };
            match checked {
                Ok(None) => return,
                Ok(Some(len)) => {
                    self.long_frame = false;
                    let frame = buf.split_to(len).freeze();
                    self.handle_frame(&frame, now_ms);
                }
                Err(e) => {
                    buf.clear();
                    self.fail(e.code(), &e.to_string(), now_ms);
                    return;
                }
            }
        }
        buf.clear();
    }

    /// Clustered: the replicated metadata the last request changed in the
    /// local broker. Its response is held, and no other frame is handled,
    /// until the driver has proposed it to the metadata group and reports
    /// the outcome with [`Self::change_committed`].
    pub fn held_change(&self) -> Option<&HeldChange> {
        self.held.as_ref().map(|h| &h.change)
    }

    /// The held change is committed (`true`), or was not within the commit
    /// timeout: its response goes out, OK or INTERNAL_ERROR (what RabbitMQ's
    /// stream reader answers a create that failed; never OK for a change
    /// that may not be there). The local change is not undone (the proposal
    /// may still commit). Feed what is left of the input again after this.
    pub fn change_committed(&mut self, committed: bool) {
        let Some(h) = self.held.take() else { return };
        let c = if committed {
            code::OK
        } else {
            code::INTERNAL_ERROR
        };
        response::generic(&mut self.out, h.key, h.correlation_id, c);
        // A delete's metadata updates follow its response, as RabbitMQ sends them.
        self.check_deleted();
    }

    /// Answer `key` with `c`, or, clustered, hold an OK that changed
    /// replicated metadata until the change is committed.
    fn respond_after(&mut self, key: u16, correlation_id: u32, c: u16, changes: Vec<MetaChange>) {
        let vhost = self.vhost.as_ref().map(|v| v.name.to_string());
        match vhost {
            Some(vhost) if self.settings.clustered && c == code::OK && !changes.is_empty() => {
                self.held = Some(Held {
                    change: HeldChange { vhost, changes },
                    key,
                    correlation_id,
                });
            }
            _ => response::generic(&mut self.out, key, correlation_id, c),
        }
    }

    /// The socket reached its end.
    pub fn handle_eof(&mut self) {
        self.state = State::Closed;
        self.close_reason
            .get_or_insert_with(|| "client closed the socket".into());
    }

    /// The earliest time a new subscription's first delivery waits for
    /// (`u64::MAX`: none waits).
    fn first_delivery_due(&self) -> u64 {
        self.subscriptions
            .values()
            .map(|s| s.not_before_ms)
            .filter(|t| *t > self.now_ms)
            .min()
            .unwrap_or(u64::MAX)
    }

    /// When the peer's silence closes the connection (two heartbeat
    /// intervals without input), never while input is paused.
    fn silence_limit_ms(&self) -> u64 {
        if self.input_paused {
            u64::MAX
        } else {
            self.last_recv_ms + 2 * self.heartbeat_ms
        }
    }

    /// The caller stops (or resumes) reading input at `now_ms`: a full
    /// stream store, or a resource alarm while this connection publishes.
    /// Its silence meanwhile is not the peer's: the heartbeat count starts
    /// again when reading resumes.
    pub fn set_input_paused(&mut self, on: bool, now_ms: u64) {
        if self.input_paused && !on {
            self.last_recv_ms = self.last_recv_ms.max(now_ms);
        }
        self.input_paused = on;
    }

    /// The connection has declared publishers (a resource alarm blocks it).
    pub fn is_publishing(&self) -> bool {
        !self.publishers.is_empty()
    }

    /// When `handle_timeout` is next due.
    pub fn poll_timeout(&self) -> Option<u64> {
        match self.state {
            State::Closed => None,
            State::Closing => Some(self.closing_deadline_ms),
            State::Running if self.heartbeat_ms > 0 => Some(
                (self.last_send_ms + self.heartbeat_ms)
                    .min(self.silence_limit_ms())
                    .min(self.next_check_ms)
                    .min(self.first_delivery_due()),
            ),
            State::Running => Some(self.next_check_ms.min(self.first_delivery_due())),
            _ => Some(self.started_ms + self.settings.handshake_timeout_ms),
        }
    }

    pub fn handle_timeout(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
        match self.state {
            State::Closed => {}
            State::Closing => {
                if now_ms >= self.closing_deadline_ms {
                    self.state = State::Closed;
                }
            }
            State::Running => {
                if self.heartbeat_ms > 0 && now_ms >= self.silence_limit_ms() {
                    self.close_reason = Some("missed heartbeats from client".into());
                    self.state = State::Closed;
                    return;
                }
                if self.heartbeat_ms > 0 && now_ms >= self.last_send_ms + self.heartbeat_ms {
                    response::heartbeat(&mut self.out);
                    self.last_send_ms = now_ms;
                }
                if now_ms >= self.next_check_ms {
                    self.next_check_ms = now_ms + CHECK_INTERVAL_MS;
                    self.check_deleted();
                }
            }
            _ => {
                if now_ms >= self.started_ms + self.settings.handshake_timeout_ms {
                    self.close_reason = Some("handshake timeout".into());
                    self.state = State::Closed;
                }
            }
        }
    }

    /// The offsets this session follows, keyed `d:<stream>` (durable:
    /// publishers' confirms) and `c:<stream>` (committed: subscriptions'
    /// deliveries). None when the set did not change since the last call.
    pub fn watched(&mut self) -> Option<Vec<(String, tokio::sync::watch::Receiver<u64>)>> {
        if !std::mem::take(&mut self.watch_changed) {
            return None;
        }
        if let Some(a) = &self.admin {
            a.stats.set_members(
                self.publishers.values().map(|p| Arc::clone(&p.stats)),
                self.subscriptions.values().map(|s| Arc::clone(&s.stats)),
            );
        }
        // Publishers follow what is fsynced, subscriptions what is written.
        let mut seen: HashMap<(bool, &str), tokio::sync::watch::Receiver<u64>> = HashMap::new();
        for p in self.publishers.values() {
            seen.entry((true, &p.stream))
                .or_insert_with(|| p.log.durable());
        }
        for s in self.subscriptions.values() {
            seen.entry((false, &s.stream))
                .or_insert_with(|| s.log.committed());
        }
        Some(
            seen.into_iter()
                .map(|((durable, k), v)| (format!("{}{k}", if durable { "d:" } else { "c:" }), v))
                .collect(),
        )
    }

    /// Some stream this session uses committed more: send the confirms it
    /// allows (deliveries: [`poll_read`](Self::poll_read)).
    pub fn handle_committed(&mut self, now_ms: u64) {
        self.now_ms = self.now_ms.max(now_ms);
        self.flush_confirms();
        // A deletion wakes the followers of its log too: its publishers and
        // subscribers hear of it now, not at the next periodic check.
        let deleted = self.publishers.values().any(|p| p.log.is_deleted())
            || self.subscriptions.values().any(|s| s.log.is_deleted());
        if deleted {
            self.check_deleted();
        }
    }

    /// Output for the socket, in order.
    pub fn poll_output(&mut self, now_ms: u64) -> Option<Out> {
        if !self.out.is_empty() {
            let b = self.out.split().freeze();
            self.ready_bytes += b.len();
            self.ready.push_back(Out::Bytes(b));
        }
        let b = self.ready.pop_front()?;
        self.ready_bytes -= b.len();
        self.last_send_ms = now_ms;
        Some(b)
    }

    /// Bytes for the socket, in order (file ranges read).
    #[cfg(test)]
    pub fn poll_transmit(&mut self, now_ms: u64) -> Option<Bytes> {
        self.poll_output(now_ms)
            .map(|o| o.into_bytes().expect("the file range reads"))
    }

    /// Whether there is output waiting.
    pub fn has_output(&self) -> bool {
        !self.out.is_empty() || !self.ready.is_empty()
    }

    /// The next read to run: a subscription with credit whose stream has
    /// committed chunks it has not read (its reader is lent to the job until
    /// [`handle_read`](Self::handle_read)). None while the output queued for
    /// the socket is over its budget.
    pub fn poll_read(&mut self) -> Option<ReadJob> {
        if self.state != State::Running || self.ready_bytes + self.out.len() >= DELIVER_BUDGET {
            return None;
        }
        let now_ms = self.now_ms;
        let (&id, sub) = self.subscriptions.iter_mut().find(|(_, s)| {
            s.credit > 0
                && s.reading.is_none()
                && s.not_before_ms <= now_ms
                && s.reader.as_ref().is_some_and(|r| r.has_more())
        })?;
        let reader = sub.reader.take()?;
        let token = self.next_read;
        self.next_read += 1;
        sub.reading = Some(token);
        let chunks = sub.credit as usize;
        let merge = (self.settings.deliver_merge_ms > 0).then(|| MergeLimits {
            data_len: merged_data_max(self.frame_max, self.deliver_version),
            span_ms: i64::from(self.settings.deliver_merge_ms),
        });
        // A credit's worth of chunks the size of the last one, within bounds.
        let bytes = sub
            .last_chunk_len
            .saturating_mul(chunks)
            .saturating_add(sub.last_chunk_len / 4)
            .clamp(READ_MIN_BYTES, READ_MAX_BYTES);
        Some(ReadJob {
            id,
            token,
            zero_copy: self.zero_copy,
            reader,
            limits: BatchLimits {
                chunks,
                bytes,
                cached_only: false,
                merge,
            },
            filter: sub.filter.clone(),
            buf: self.read_bufs.take(),
            pool: self.read_bufs.clone(),
        })
    }

    /// A read ended: its chunks go out as Deliver frames, one per chunk (the
    /// frame's head and the chunk's header as stored, then the data section
    /// as a slice of the read buffer: no copy), each taking one credit.
    pub fn handle_read(&mut self, done: ReadDone) {
        let ReadDone {
            id,
            token,
            reader,
            buf,
            spans,
            files,
            result,
            pool,
        } = done;
        let Some(sub) = self
            .subscriptions
            .get_mut(&id)
            .filter(|s| s.reading == Some(token))
        else {
            // Unsubscribed (or restarted by a consumer update) meanwhile.
            pool.put(buf);
            return;
        };
        sub.reading = None;
        if sub.reader.is_none() {
            sub.reader = Some(reader);
        }
        if let Err(e) = result {
            tracing::warn!(stream = %sub.stream, error = %e, "stream read failed");
        }
        let committed = sub
            .reader
            .as_ref()
            .map_or(0, |r| *r.committed().borrow())
            .saturating_sub(1);
        let mut q = Deliveries {
            out: &mut self.out,
            ready: &mut self.ready,
            ready_bytes: &mut self.ready_bytes,
            version: self.deliver_version,
            id,
            committed,
        };
        q.runs(
            sub,
            files.iter().map(|span| Part {
                joins: span.joins,
                delivered: span.delivered,
                stored: span.raw_header,
                data: Out::File {
                    file: Arc::clone(&span.file),
                    pos: span.data_pos,
                    len: span.header.data_len as usize,
                },
            }),
        );
        if spans.is_empty() {
            pool.put(buf);
            return;
        }
        let lent = Bytes::from_owner(Lent { buf, pool });
        q.runs(
            sub,
            spans.iter().map(|span| {
                let mut stored = [0u8; HEADER_LEN];
                stored.copy_from_slice(&lent[span.header_range()]);
                Part {
                    joins: span.joins,
                    delivered: span.delivered,
                    stored,
                    data: Out::Bytes(lent.slice(span.data_range())),
                }
            }),
        );
    }

    // ---- frames ----

    fn handle_frame(&mut self, frame: &Bytes, now_ms: u64) {
        let req = match request::parse(frame) {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(error = %e, "stream frame refused");
                self.fail(e.code(), &e.to_string(), now_ms);
                return;
            }
        };
        match (self.state, req) {
            (_, Request::Heartbeat) => {}
            (State::Closing, Request::CloseResponse { .. }) => self.state = State::Closed,
            (State::Closing, _) => {}
            (
                _,
                Request::Close {
                    correlation_id,
                    code: c,
                    reason,
                },
            ) => {
                response::generic(&mut self.out, key::CLOSE, correlation_id, code::OK);
                self.close_reason = Some(format!("client closed: {c} {reason}"));
                self.state = State::Closed;
            }
            (
                State::PeerProperties,
                Request::PeerProperties {
                    correlation_id,
                    properties,
                },
            ) => {
                self.peer_properties = properties;
                let props = vec![
                    ("product".to_string(), handshake::PRODUCT.to_string()),
                    (
                        "version".to_string(),
                        handshake::RABBITMQ_VERSION.to_string(),
                    ),
                    (
                        "platform".to_string(),
                        concat!("warren ", env!("CARGO_PKG_VERSION")).to_string(),
                    ),
                    ("cluster_name".to_string(), self.broker.cluster_name()),
                ];
                response::with_pairs(
                    &mut self.out,
                    key::PEER_PROPERTIES,
                    correlation_id,
                    code::OK,
                    &props,
                );
                self.state = State::Sasl;
            }
            (State::Sasl | State::PeerProperties, Request::SaslHandshake { correlation_id }) => {
                let mut mechs = vec!["PLAIN".to_string(), "AMQPLAIN".to_string()];
                if self.tls.as_ref().is_some_and(|t| t.login.is_some()) {
                    mechs.push(EXTERNAL.to_string());
                }
                if self.settings.anonymous.is_some() {
                    mechs.push(ANONYMOUS.to_string());
                }
                response::with_strings(
                    &mut self.out,
                    key::SASL_HANDSHAKE,
                    correlation_id,
                    code::OK,
                    &mechs,
                );
                self.state = State::Sasl;
            }
            (
                State::Sasl,
                Request::SaslAuthenticate {
                    correlation_id,
                    mechanism,
                    data,
                },
            ) => self.authenticate(correlation_id, &mechanism, data.as_deref(), now_ms),
            (
                State::Tune,
                Request::Tune {
                    frame_max,
                    heartbeat,
                },
            ) => {
                self.frame_max = negotiate(self.settings.frame_max, frame_max);
                if self.frame_max != 0 {
                    self.frame_max = self.frame_max.max(crate::wire::stream::MIN_FRAME_MAX);
                }
                self.heartbeat_ms = u64::from(negotiate(self.settings.heartbeat, heartbeat)) * 1000;
                self.state = State::Open;
            }
            (
                State::Open,
                Request::Open {
                    correlation_id,
                    vhost,
                },
            ) => self.open(correlation_id, &vhost, now_ms),
            (State::Running, req) => self.running(req, now_ms),
            (_, other) => {
                let what = format!("{other:?}");
                let what = what.split([' ', '{']).next().unwrap_or("frame").to_owned();
                self.fail(
                    code::UNKNOWN_FRAME,
                    &format!("unexpected {what} in the handshake"),
                    now_ms,
                );
            }
        }
    }

    fn authenticate(
        &mut self,
        correlation_id: u32,
        mechanism: &str,
        data: Option<&[u8]>,
        now_ms: u64,
    ) {
        let offered = |t: &crate::tls::Established| t.login.is_some();
        if mechanism == EXTERNAL && self.tls.as_ref().is_some_and(offered) {
            return self.authenticate_external(correlation_id);
        }
        if mechanism == ANONYMOUS {
            if let Some((user, pass)) = self.settings.anonymous.clone() {
                let result = self.broker.authenticate(&user, &pass, self.from_loopback);
                return self.login_result(correlation_id, mechanism, &user, result);
            }
        }
        if mechanism != "PLAIN" && mechanism != "AMQPLAIN" {
            response::generic(
                &mut self.out,
                key::SASL_AUTHENTICATE,
                correlation_id,
                code::SASL_MECHANISM_NOT_SUPPORTED,
            );
            return;
        }
        let Some((user, pass)) =
            crate::session::handshake::credentials(mechanism, data.unwrap_or_default())
        else {
            response::generic(
                &mut self.out,
                key::SASL_AUTHENTICATE,
                correlation_id,
                code::SASL_ERROR,
            );
            return;
        };
        let _ = now_ms;
        let result = self.broker.authenticate(&user, &pass, self.from_loopback);
        self.login_result(correlation_id, mechanism, &user, result);
    }

    /// SASL EXTERNAL: the user named by the verified client certificate (CN,
    /// DN or a SAN per `ssl_cert_login_from`, as AMQPS), without a password.
    fn authenticate_external(&mut self, correlation_id: u32) {
        let login = self
            .tls
            .as_ref()
            .and_then(|t| t.login.clone())
            .unwrap_or_else(|| Err("no verified client certificate".into()));
        let (user, result) = match login {
            Ok(name) => {
                let r = self.broker.authenticate_external(&name, self.from_loopback);
                (name, r)
            }
            Err(why) => {
                tracing::warn!("stream EXTERNAL login refused: {why}");
                (String::new(), Err(LoginError::Refused))
            }
        };
        self.login_result(correlation_id, EXTERNAL, &user, result);
    }

    /// Answer a SASL authenticate: on success, tune follows; on failure the
    /// connection ends.
    fn login_result(
        &mut self,
        correlation_id: u32,
        mechanism: &str,
        user: &str,
        result: Result<User, LoginError>,
    ) {
        self.broker.auth_attempts.record(
            crate::broker::AuthProtocol::Stream,
            result.is_ok(),
            self.admin.as_ref().map(|a| a.peer.ip()),
            user,
        );
        match result {
            Ok(u) => {
                self.user = Some(u);
                self.auth_mechanism = match mechanism {
                    "AMQPLAIN" => "AMQPLAIN",
                    EXTERNAL => EXTERNAL,
                    ANONYMOUS => ANONYMOUS,
                    _ => "PLAIN",
                };
                if let Some(a) = &self.admin {
                    a.stats.set_auth_mechanism(self.auth_mechanism);
                }
                response::generic(
                    &mut self.out,
                    key::SASL_AUTHENTICATE,
                    correlation_id,
                    code::OK,
                );
                response::tune(
                    &mut self.out,
                    self.settings.frame_max,
                    self.settings.heartbeat,
                );
                self.state = State::Tune;
            }
            Err(e) => {
                let c = match e {
                    LoginError::LoopbackOnly => code::SASL_AUTHENTICATION_FAILURE_LOOPBACK,
                    _ => code::AUTHENTICATION_FAILURE,
                };
                response::generic(&mut self.out, key::SASL_AUTHENTICATE, correlation_id, c);
                self.close_reason = Some(format!("authentication failed for user '{user}'"));
                self.state = State::Closed;
            }
        }
    }

    fn open(&mut self, correlation_id: u32, vhost: &str, now_ms: u64) {
        let user = self
            .user
            .as_ref()
            .map(|u| u.name.clone())
            .unwrap_or_default();
        let access = |_: &_| self.broker.auth.vhost_access(vhost, &user);
        let Some(v) = self.broker.vhost(vhost).filter(access) else {
            return self.refuse_open(correlation_id, format!("no access to vhost '{vhost}'"));
        };
        if let Err(e) = self.register(vhost, &user, now_ms) {
            return self.refuse_open(correlation_id, e.text.to_string());
        }
        self.vhost = Some(v);
        let props = vec![
            (
                "advertised_host".to_string(),
                self.settings.advertised_host.clone(),
            ),
            (
                "advertised_port".to_string(),
                self.settings.advertised_port.to_string(),
            ),
        ];
        response::with_pairs(&mut self.out, key::OPEN, correlation_id, code::OK, &props);
        self.state = State::Running;
        self.last_recv_ms = now_ms;
    }

    /// Answer open with VIRTUAL_HOST_ACCESS_FAILURE and close for `reason`.
    fn refuse_open(&mut self, correlation_id: u32, reason: String) {
        response::with_pairs(
            &mut self.out,
            key::OPEN,
            correlation_id,
            code::VIRTUAL_HOST_ACCESS_FAILURE,
            &[],
        );
        self.close_reason = Some(reason);
        self.state = State::Closed;
    }

    /// Register with the broker for the admin API (when shown there),
    /// unless the vhost's or user's `max-connections` is reached.
    fn register(&mut self, vhost: &str, user: &str, now_ms: u64) -> crate::error::AmqpResult<()> {
        let Some(a) = &mut self.admin else {
            return Ok(());
        };
        let mut client_properties = FieldTable::new();
        for (k, v) in &self.peer_properties {
            client_properties.insert(k.as_str(), FieldValue::string(v.as_str()));
        }
        let info = crate::broker::ConnectionInfo {
            id: self.connection_id,
            name: format!("{} -> {}", a.peer, a.local),
            peer: a.peer,
            local: a.local,
            user: user.to_owned(),
            vhost: vhost.to_owned(),
            connected_at: now_ms,
            client_properties,
            auth_mechanism: self.auth_mechanism.to_string(),
            frame_max: self.frame_max,
            channel_max: 0,
            heartbeat: u16::try_from(self.heartbeat_ms / 1000).unwrap_or(u16::MAX),
            tls: self.tls.as_ref().map(|t| t.info.clone()),
            channels: Default::default(),
            open_channels: Default::default(),
            control: Arc::clone(&a.stats) as Arc<dyn crate::broker::ConnectionControl>,
            socket: Arc::clone(&a.stats.socket),
        };
        self.broker.admit_connection(Arc::new(info))?;
        a.registered = true;
        Ok(())
    }

    /// Send a close with `c` and wait (briefly) for the answer.
    fn fail(&mut self, c: u16, reason: &str, now_ms: u64) {
        if matches!(self.state, State::Closing | State::Closed) {
            return;
        }
        response::close(&mut self.out, 0, c, reason);
        self.close_reason = Some(reason.to_owned());
        self.state = State::Closing;
        self.closing_deadline_ms = now_ms + 1000;
    }

    fn allowed(&self, access: Access, name: &str) -> bool {
        match (&self.vhost, &self.user) {
            (Some(v), Some(u)) => self.broker.auth.allows(&v.name, &u.name, access, name),
            _ => false,
        }
    }

    /// The log of stream `name` in this vhost.
    fn log(&self, name: &str) -> Option<Arc<StreamLog>> {
        let v = self.vhost.as_ref()?;
        let q = v.queue(name, self.connection_id).ok()?;
        q.stream().cloned()
    }

    /// Clustered: stream `name` is homed on another node (the forwarder's
    /// `remote()` marker on the queue), so this node has no member of it and
    /// its local log is an empty copy that must not be read or written.
    fn homed_elsewhere(&self, name: &str) -> bool {
        self.home_elsewhere(name).is_some()
    }

    /// Clustered: the home node of stream `name` when that is another node,
    /// and whether this node reaches it now.
    fn home_elsewhere(&self, name: &str) -> Option<(String, bool)> {
        let q = self.vhost.as_ref()?.queue(name, self.connection_id).ok()?;
        let home = q.remote()?;
        Some((home.node().to_string(), home.reachable()))
    }

    /// Queue `op` on `stream` for its home node `node`, answered to `what`;
    /// its token.
    fn forward(
        &mut self,
        node: String,
        stream: &str,
        op: StreamOp,
        body: Bytes,
        what: Awaited,
    ) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        let vhost = self
            .vhost
            .as_ref()
            .map(|v| v.name.to_string())
            .unwrap_or_default();
        self.forwards.push_back(Forward {
            token,
            node,
            vhost,
            stream: stream.to_owned(),
            op,
            body,
        });
        self.awaiting.insert(token, what);
        token
    }

    /// The next request for another node (clustered), in order.
    pub fn poll_forward(&mut self) -> Option<Forward> {
        self.forwards.pop_front()
    }

    /// Forwarded requests not answered yet (the driver reads no more input
    /// past a bound).
    pub fn forwards_in_flight(&self) -> usize {
        self.awaiting.len()
    }

    /// The home node answered forwarded request `token` (None: it could
    /// not be reached, or the link went down first).
    pub fn handle_forwarded(&mut self, token: u64, answer: Option<StreamAnswer>) {
        let Some(what) = self.awaiting.remove(&token) else {
            return;
        };
        let answer = answer.unwrap_or(StreamAnswer::Failed(code::STREAM_NOT_AVAILABLE));
        match what {
            Awaited::Sequence(correlation_id) => {
                let (c, seq) = match answer {
                    StreamAnswer::Sequence(n) => (code::OK, n),
                    StreamAnswer::Failed(c) => (c, 0),
                    _ => (code::INTERNAL_ERROR, 0),
                };
                let k = key::QUERY_PUBLISHER_SEQUENCE;
                response::with_u64(&mut self.out, k, correlation_id, c, seq);
            }
            Awaited::StoreOffset => {
                if let StreamAnswer::Failed(c) = answer {
                    tracing::warn!(code = c, "store offset on the stream's home node failed");
                }
            }
            Awaited::Publish(id) => {
                let Some(p) = self.publishers.get_mut(&id) else {
                    return;
                };
                if let Some(f) = p.forwarded.iter_mut().find(|f| f.0 == token) {
                    f.2 = Some(answer);
                }
                confirm_forwarded(&mut self.out, id, p);
            }
        }
    }

    fn running(&mut self, req: Request, now_ms: u64) {
        match req {
            Request::Publish {
                publisher_id,
                messages,
                ..
            } => self.publish(publisher_id, messages, now_ms),
            Request::Credit {
                subscription_id,
                credit,
            } => match self.subscriptions.get_mut(&subscription_id) {
                Some(s) => {
                    s.credit = s.credit.saturating_add(u32::from(credit));
                    s.stats
                        .credits
                        .store(u64::from(s.credit), std::sync::atomic::Ordering::Relaxed);
                }
                None => response::credit_error(
                    &mut self.out,
                    code::SUBSCRIPTION_ID_DOES_NOT_EXIST,
                    subscription_id,
                ),
            },
            Request::DeclarePublisher {
                correlation_id,
                publisher_id,
                reference,
                stream,
            } => {
                let c = self.declare_publisher(publisher_id, reference, &stream);
                response::generic(&mut self.out, key::DECLARE_PUBLISHER, correlation_id, c);
            }
            Request::DeletePublisher {
                correlation_id,
                publisher_id,
            } => {
                let c = match self.publishers.remove(&publisher_id) {
                    Some(mut p) => {
                        // What it published is confirmed when committed, even now.
                        confirm_ready(&mut self.out, publisher_id, &mut p);
                        self.watch_changed = true;
                        code::OK
                    }
                    None => code::PUBLISHER_DOES_NOT_EXIST,
                };
                response::generic(&mut self.out, key::DELETE_PUBLISHER, correlation_id, c);
            }
            Request::QueryPublisherSequence {
                correlation_id,
                reference,
                stream,
            } => {
                // Permission first, then the stream, as RabbitMQ checks them.
                let (c, seq) = match self.log(&stream) {
                    _ if !self.allowed(Access::Read, &stream) => (code::ACCESS_REFUSED, 0),
                    None => (code::STREAM_DOES_NOT_EXIST, 0),
                    // Clustered, homed elsewhere: asked of the home node.
                    Some(log) => match self.home_elsewhere(&stream) {
                        Some((node, true)) => {
                            let op = StreamOp::PublisherSequence { reference };
                            let what = Awaited::Sequence(correlation_id);
                            self.forward(node, &stream, op, Bytes::new(), what);
                            return;
                        }
                        Some((_, false)) => (code::STREAM_NOT_AVAILABLE, 0),
                        None => (code::OK, log.publisher_sequence(&reference)),
                    },
                };
                response::with_u64(
                    &mut self.out,
                    key::QUERY_PUBLISHER_SEQUENCE,
                    correlation_id,
                    c,
                    seq,
                );
            }
            Request::Subscribe {
                correlation_id,
                subscription_id,
                stream,
                offset,
                credit,
                properties,
            } => {
                let c = self.subscribe(subscription_id, &stream, offset, credit, &properties);
                response::generic(&mut self.out, key::SUBSCRIBE, correlation_id, c);
                // The consumer update follows the subscribe response.
                if let Some(id) = self.pending_activation.take() {
                    self.activate(id, true);
                }
            }
            Request::Unsubscribe {
                correlation_id,
                subscription_id,
            } => {
                let c = match self.subscriptions.remove(&subscription_id) {
                    Some(sub) => {
                        self.leave_group(subscription_id, &sub);
                        self.watch_changed = true;
                        code::OK
                    }
                    None => code::SUBSCRIPTION_ID_DOES_NOT_EXIST,
                };
                response::generic(&mut self.out, key::UNSUBSCRIBE, correlation_id, c);
            }
            Request::StoreOffset {
                reference,
                stream,
                offset,
            } => {
                // No response; failures are only logged, as RabbitMQ does.
                // Never into the empty local copy of a stream homed
                // elsewhere: stored on its home node.
                let Some(log) = self
                    .log(&stream)
                    .filter(|_| self.allowed(Access::Read, &stream))
                else {
                    return;
                };
                match self.home_elsewhere(&stream) {
                    Some((node, true)) => {
                        let op = StreamOp::StoreOffset { reference, offset };
                        self.forward(node, &stream, op, Bytes::new(), Awaited::StoreOffset);
                    }
                    Some((_, false)) => {
                        tracing::warn!(%stream, "store offset: the stream's home node is down");
                    }
                    None => {
                        if let Err(e) = log.store_offset(&reference, offset) {
                            tracing::warn!(%stream, error = %e, "store offset failed");
                        }
                    }
                }
            }
            Request::QueryOffset {
                correlation_id,
                reference,
                stream,
            } => {
                let (c, o) = match self.log(&stream) {
                    _ if !self.allowed(Access::Read, &stream) => (code::ACCESS_REFUSED, 0),
                    Some(_) if self.homed_elsewhere(&stream) => (code::STREAM_NOT_AVAILABLE, 0),
                    Some(log) => match log.query_offset(&reference) {
                        Some(o) => (code::OK, o),
                        None => (code::NO_OFFSET, 0),
                    },
                    None => (code::STREAM_DOES_NOT_EXIST, 0),
                };
                response::with_u64(&mut self.out, key::QUERY_OFFSET, correlation_id, c, o);
            }
            Request::Create {
                correlation_id,
                stream,
                arguments,
            } => {
                let mut changes = Vec::new();
                let c = self.create(&stream, &arguments, now_ms, &mut changes);
                self.respond_after(key::CREATE, correlation_id, c, changes);
            }
            Request::Delete {
                correlation_id,
                stream,
            } => {
                let mut changes = Vec::new();
                let c = self.delete(&stream, now_ms, &mut changes);
                self.respond_after(key::DELETE, correlation_id, c, changes);
                if self.held.is_none() {
                    self.check_deleted();
                }
            }
            Request::Metadata {
                correlation_id,
                streams,
            } => self.metadata(correlation_id, &streams),
            Request::ExchangeCommandVersions {
                correlation_id,
                commands,
            } => {
                if let Some(&(_, _, hi)) = commands.iter().find(|(k, ..)| *k == key::DELIVER) {
                    self.deliver_version = hi.clamp(1, 2);
                }
                response::command_versions(
                    &mut self.out,
                    correlation_id,
                    code::OK,
                    COMMAND_VERSIONS,
                );
            }
            Request::StreamStats {
                correlation_id,
                stream,
            } => match self.log(&stream) {
                Some(log) => {
                    let s = log.stats();
                    let first = if s.messages == 0 {
                        -1
                    } else {
                        s.first_offset as i64
                    };
                    let committed = if s.committed_offset == 0 {
                        -1
                    } else {
                        s.committed_offset as i64 - 1
                    };
                    let last_chunk = if s.chunks == 0 {
                        -1
                    } else {
                        s.last_offset as i64
                    };
                    // RabbitMQ's two (first and committed chunk ids), the
                    // last chunk's id (chunks are committed once written on
                    // one node) and the last committed message's offset,
                    // under the names clients read them by.
                    let stats = [
                        ("first_chunk_id", first),
                        ("committed_chunk_id", last_chunk),
                        ("last_chunk_id", last_chunk),
                        ("committed_offset", committed),
                        ("last_offset", committed),
                    ];
                    response::stream_stats(&mut self.out, correlation_id, code::OK, &stats);
                }
                None => response::stream_stats(
                    &mut self.out,
                    correlation_id,
                    code::STREAM_DOES_NOT_EXIST,
                    &[],
                ),
            },
            Request::Route {
                correlation_id,
                routing_key,
                super_stream,
            } => {
                let (c, streams) = self.route(&routing_key, &super_stream);
                response::with_strings(&mut self.out, key::ROUTE, correlation_id, c, &streams);
            }
            Request::Partitions {
                correlation_id,
                super_stream,
            } => {
                let (c, streams) = self.partitions(&super_stream);
                response::with_strings(&mut self.out, key::PARTITIONS, correlation_id, c, &streams);
            }
            Request::CreateSuperStream {
                correlation_id,
                name,
                partitions,
                binding_keys,
                arguments,
            } => {
                let mut changes = Vec::new();
                let c = self.create_super_stream(
                    &name,
                    &partitions,
                    &binding_keys,
                    &arguments,
                    now_ms,
                    &mut changes,
                );
                self.respond_after(key::CREATE_SUPER_STREAM, correlation_id, c, changes);
            }
            Request::DeleteSuperStream {
                correlation_id,
                name,
            } => {
                let mut changes = Vec::new();
                let c = self.delete_super_stream(&name, now_ms, &mut changes);
                self.respond_after(key::DELETE_SUPER_STREAM, correlation_id, c, changes);
                if self.held.is_none() {
                    self.check_deleted();
                }
            }
            Request::ConsumerUpdateResponse {
                correlation_id,
                offset,
                ..
            } => {
                let sub = self
                    .subscriptions
                    .iter_mut()
                    .find(|(_, s)| s.awaiting == Some(correlation_id));
                if let Some((&id, sub)) = sub {
                    sub.awaiting = None;
                    if std::mem::take(&mut sub.stepping_down) {
                        if let Some(key) = &sub.sac {
                            self.settings.sac.stepped_down(key, self.connection_id, id);
                        }
                    } else {
                        sub.reader = Some(sub.log.reader(offset));
                        // A read in flight from before is dropped when it ends.
                        sub.reading = None;
                    }
                }
            }
            Request::CloseResponse { .. } => {}
            Request::PeerProperties { .. }
            | Request::SaslHandshake { .. }
            | Request::SaslAuthenticate { .. }
            | Request::Tune { .. }
            | Request::Open { .. } => {
                self.fail(
                    code::UNKNOWN_FRAME,
                    "handshake command on an open connection",
                    now_ms,
                );
            }
            Request::Heartbeat | Request::Close { .. } => {}
        }
    }

    fn declare_publisher(&mut self, id: u8, reference: Option<String>, stream: &str) -> u16 {
        if self.publishers.contains_key(&id) {
            return code::PRECONDITION_FAILED;
        }
        if reference.as_ref().is_some_and(|r| r.len() > 256) {
            return code::PRECONDITION_FAILED;
        }
        // Permission first, then the stream, as RabbitMQ checks them.
        if !self.allowed(Access::Write, stream) {
            return code::ACCESS_REFUSED;
        }
        let Some(log) = self.log(stream) else {
            return code::STREAM_DOES_NOT_EXIST;
        };
        // Clustered: the stream's leader is another node; its publishes go
        // there (never into the local copy), while this node reaches it.
        let home = match self.home_elsewhere(stream) {
            Some((_, false)) => return code::STREAM_NOT_AVAILABLE,
            Some((node, true)) => Some(node),
            None => None,
        };
        // One publisher per reference and stream on a connection, as RabbitMQ.
        if let Some(r) = &reference {
            if self
                .publishers
                .values()
                .any(|p| p.stream == stream && p.reference.as_deref() == Some(r.as_str()))
            {
                return code::PRECONDITION_FAILED;
            }
        }
        let stats = PublisherStats::new(id, stream, reference.as_deref());
        self.publishers.insert(
            id,
            Publisher {
                stats,
                stream: stream.to_owned(),
                committed: log.durable(),
                log,
                reference: reference.map(Arc::from),
                pending: VecDeque::new(),
                pending_ids: VecDeque::new(),
                home,
                forwarded: VecDeque::new(),
            },
        );
        self.watch_changed = true;
        code::OK
    }

    fn publish(&mut self, publisher_id: u8, mut messages: Vec<Published>, now_ms: u64) {
        // A sub-entry batch RabbitMQ would not store (unknown codec, no
        // records, sizes that cannot hold them) is refused with a publish
        // error, and so is the rest of the frame (no gap in the ids).
        let refused = messages
            .iter()
            .position(|m| m.sub_batch.is_some_and(|b| !b.is_valid(&m.data)))
            .filter(|_| self.publishers.contains_key(&publisher_id))
            .map(|i| messages.split_off(i));
        if let Some(refused) = refused {
            let errors: Vec<(u64, u16)> = refused
                .iter()
                .map(|m| (m.publishing_id, code::PRECONDITION_FAILED))
                .collect();
            if !messages.is_empty() {
                self.publish(publisher_id, messages, now_ms);
            }
            response::publish_error(&mut self.out, publisher_id, &errors);
            return;
        }
        let Some(p) = self.publishers.get_mut(&publisher_id) else {
            let errors: Vec<(u64, u16)> = messages
                .iter()
                .map(|m| (m.publishing_id, code::PUBLISHER_DOES_NOT_EXIST))
                .collect();
            response::publish_error(&mut self.out, publisher_id, &errors);
            return;
        };
        p.stats
            .published
            .fetch_add(messages.len() as u64, std::sync::atomic::Ordering::Relaxed);
        if let Some(node) = p.home.clone() {
            return self.publish_forwarded(publisher_id, node, &messages);
        }
        // Encoded straight from the frame into the log's write buffer.
        let batch = messages.iter().map(|m| NewMessage {
            data: &m.data,
            filter: m.filter_value.as_deref(),
            publishing_id: m.publishing_id,
            batch: m.sub_batch,
        });
        // Sent before its earlier messages were confirmed: the publisher
        // does not wait for each confirm, so more is likely to follow.
        let pipelined = !p.pending.is_empty();
        match p
            .log
            .append_from(p.reference.as_ref(), batch, now_ms as i64, pipelined)
        {
            Ok(a) => {
                let dups = a.duplicates.len();
                p.pending.push_back((a.next_offset, messages.len(), dups));
                // `duplicates` is in ascending order of index.
                p.pending_ids
                    .extend(a.duplicates.iter().map(|&i| messages[i].publishing_id));
                let mut d = a.duplicates.iter().peekable();
                for (i, m) in messages.iter().enumerate() {
                    if d.next_if(|&&x| x == i).is_none() {
                        p.pending_ids.push_back(m.publishing_id);
                    }
                }
                confirm_ready(&mut self.out, publisher_id, p);
            }
            Err(e) => {
                let c = error_code(&e);
                p.stats
                    .errored
                    .fetch_add(messages.len() as u64, std::sync::atomic::Ordering::Relaxed);
                let errors: Vec<(u64, u16)> =
                    messages.iter().map(|m| (m.publishing_id, c)).collect();
                response::publish_error(&mut self.out, publisher_id, &errors);
            }
        }
    }

    /// Send a publish frame of publisher `id` to its stream's home node.
    fn publish_forwarded(&mut self, id: u8, node: String, messages: &[Published]) {
        let Some(p) = self.publishers.get(&id) else {
            return;
        };
        let mut body = BytesMut::with_capacity(messages.iter().map(|m| m.data.len()).sum());
        let entries = messages
            .iter()
            .map(|m| {
                body.extend_from_slice(&m.data);
                StreamEntry {
                    id: m.publishing_id,
                    len: m.data.len() as u32,
                    filter: m.filter_value.clone(),
                    batch: m
                        .sub_batch
                        .map(|b| (b.compression, b.records, b.uncompressed_len)),
                }
            })
            .collect();
        let op = StreamOp::Publish {
            reference: p.reference.as_deref().map(str::to_owned),
            entries,
            pipelined: !p.forwarded.is_empty(),
        };
        let stream = p.stream.clone();
        let body = body.freeze();
        let token = self.forward(node, &stream, op, body, Awaited::Publish(id));
        if let Some(p) = self.publishers.get_mut(&id) {
            let ids = messages.iter().map(|m| m.publishing_id).collect();
            p.forwarded.push_back((token, ids, None));
        }
    }

    fn flush_confirms(&mut self) {
        for (id, p) in self.publishers.iter_mut() {
            if !p.pending.is_empty() {
                confirm_ready(&mut self.out, *id, p);
            }
        }
    }

    fn subscribe(
        &mut self,
        id: u8,
        stream: &str,
        offset: OffsetSpec,
        credit: u16,
        properties: &[(String, String)],
    ) -> u16 {
        if self.subscriptions.contains_key(&id) {
            return code::SUBSCRIPTION_ID_ALREADY_EXISTS;
        }
        if !self.allowed(Access::Read, stream) {
            return code::ACCESS_REFUSED;
        }
        let Some(log) = self.log(stream) else {
            return code::STREAM_DOES_NOT_EXIST;
        };
        // Clustered: no member of the stream on this node (RabbitMQ's
        // `lookup_local_member` failing), as RabbitMQ answers.
        if self.homed_elsewhere(stream) {
            return code::STREAM_NOT_AVAILABLE;
        }
        let prop = |k: &str| {
            properties
                .iter()
                .find(|(pk, _)| pk == k)
                .map(|(_, v)| v.as_str())
        };
        let sac = prop("single-active-consumer") == Some("true");
        let mut group = None;
        let mut reader = None;
        let mut activate = false;
        if sac {
            let (Some(name), Some(v)) = (prop("name").filter(|n| !n.is_empty()), &self.vhost)
            else {
                return code::PRECONDITION_FAILED;
            };
            let key: GroupKey = (v.name.to_string(), stream.to_owned(), name.to_owned());
            // A super stream's partition: its index picks the group's active
            // member (RabbitMQ's `partition index % consumers`).
            let partition = prop("super-stream")
                .and_then(|ss| self.partitions(ss).1.iter().position(|p| p == stream));
            activate = self.settings.sac.join(
                key.clone(),
                self.connection_id,
                id,
                partition,
                self.sac_tx.clone(),
            );
            group = Some(key);
        } else {
            reader = Some(log.reader(offset));
        }
        let values: Vec<String> = properties
            .iter()
            .filter(|(k, _)| k.starts_with("filter."))
            .map(|(_, v)| v.clone())
            .collect();
        let filter = (!values.is_empty())
            .then(|| Arc::new((values, prop("match-unfiltered") == Some("true"))));
        let stats = ConsumerStats::new(id, stream, properties, u32::from(credit));
        self.subscriptions.insert(
            id,
            Subscription {
                stats,
                stream: stream.to_owned(),
                log,
                reader,
                credit: u32::from(credit),
                sac: group,
                awaiting: None,
                stepping_down: false,
                filter,
                reading: None,
                last_chunk_len: READ_MIN_BYTES,
                not_before_ms: self.now_ms + FIRST_DELIVERY_DELAY_MS,
            },
        );
        if activate {
            self.pending_activation = Some(id);
        }
        self.watch_changed = true;
        code::OK
    }

    /// A subscription of this connection became its group's active consumer.
    pub fn handle_sac(&mut self, event: SacEvent) {
        match event {
            SacEvent::Activate { subscription_id } => self.activate(subscription_id, true),
            SacEvent::StepDown { subscription_id } => self.activate(subscription_id, false),
        }
    }

    /// Tell the client whether `id` is active. Active: deliveries start from
    /// the offset it answers. Stepping down: deliveries stop now, and its
    /// answer lets the group activate the next member.
    fn activate(&mut self, id: u8, active: bool) {
        let correlation = self.next_correlation;
        let Some(sub) = self.subscriptions.get_mut(&id) else {
            return;
        };
        self.next_correlation = self.next_correlation.wrapping_add(1);
        sub.awaiting = Some(correlation);
        sub.stepping_down = !active;
        if !active {
            sub.reader = None;
        }
        response::consumer_update(&mut self.out, correlation, id, active);
    }

    fn leave_group(&self, id: u8, sub: &Subscription) {
        if let Some(key) = &sub.sac {
            self.settings.sac.leave(key, self.connection_id, id);
        }
    }

    /// Create stream `stream` (a durable queue with `x-queue-type: stream`);
    /// what it made goes to `changes`.
    fn create(
        &mut self,
        stream: &str,
        arguments: &[(String, String)],
        now_ms: u64,
        changes: &mut Vec<MetaChange>,
    ) -> u16 {
        let Some(v) = self.vhost.clone() else {
            return code::INTERNAL_ERROR;
        };
        if stream.is_empty() || stream.len() > 255 || stream.starts_with("amq.") {
            return code::PRECONDITION_FAILED;
        }
        if !self.allowed(Access::Configure, stream) {
            return code::ACCESS_REFUSED;
        }
        if v.queue(stream, self.connection_id).is_ok() {
            return code::STREAM_ALREADY_EXISTS;
        }
        let Some(args) = create_arguments(arguments) else {
            return code::PRECONDITION_FAILED;
        };
        let d = QueueDeclare {
            name: stream.to_owned(),
            durable: true,
            arguments: args,
            ..Default::default()
        };
        match v.declare_queue(&d, self.connection_id, now_ms) {
            Ok(_) => {
                changes.push(MetaChange::DeclareQueue(d));
                code::OK
            }
            Err(e) => {
                tracing::debug!(%stream, error = %e.text, "stream create refused");
                code::PRECONDITION_FAILED
            }
        }
    }

    /// Delete stream `stream`; what it removed goes to `changes`.
    fn delete(&mut self, stream: &str, now_ms: u64, changes: &mut Vec<MetaChange>) -> u16 {
        let Some(v) = self.vhost.clone() else {
            return code::INTERNAL_ERROR;
        };
        // Permission first, then the stream, as RabbitMQ checks them.
        if !self.allowed(Access::Configure, stream) {
            return code::ACCESS_REFUSED;
        }
        if self.log(stream).is_none() {
            return code::STREAM_DOES_NOT_EXIST;
        }
        match v.delete_queue(stream, false, false, self.connection_id, now_ms) {
            Ok(_) => {
                changes.push(MetaChange::DeleteQueue(stream.to_owned()));
                code::OK
            }
            Err(_) => code::INTERNAL_ERROR,
        }
    }

    /// Where stream `name` is led, as a metadata answer gives it.
    fn lead(&self, name: &str) -> Lead {
        let Some(v) = &self.vhost else {
            return Lead::Missing;
        };
        if !self.allowed(Access::Read, name) && !self.allowed(Access::Write, name) {
            return Lead::Refused;
        }
        let Some(q) = v
            .queue(name, self.connection_id)
            .ok()
            .filter(|q| q.stream().is_some())
        else {
            return Lead::Missing;
        };
        match q.remote() {
            None => Lead::Here,
            // Clustered: the home node, where its log is; none while that
            // node is down (or has no Stream listener to name).
            Some(home) if home.reachable() => match home.stream_endpoint() {
                Some(endpoint) => Lead::There(endpoint),
                None => Lead::Nobody,
            },
            Some(_) => Lead::Nobody,
        }
    }

    /// The metadata answer, as RabbitMQ's stream reader gives it: the
    /// brokers that lead one of `streams` (this node's advertised host and
    /// port for its own, the home node's for a stream homed elsewhere);
    /// per stream OK with its leader, STREAM_DOES_NOT_EXIST, ACCESS_REFUSED
    /// (neither read nor write permission), or OK with no leader (reference
    /// 0xffff, no replicas) while its home node is down, as RabbitMQ
    /// answers for a stream whose members are all down.
    fn metadata(&mut self, correlation_id: u32, streams: &[String]) {
        let leads: Vec<Lead> = streams.iter().map(|s| self.lead(s)).collect();
        let here = (
            self.settings.advertised_host.clone(),
            self.settings.advertised_port,
        );
        let mut endpoints: Vec<(String, u16)> = Vec::new();
        let mut reference = |e: &(String, u16)| match endpoints.iter().position(|x| x == e) {
            Some(i) => i as u16,
            None => {
                endpoints.push(e.clone());
                endpoints.len() as u16 - 1
            }
        };
        let meta: Vec<response::StreamMetadata<'_>> = streams
            .iter()
            .zip(&leads)
            .map(|(s, lead)| {
                let (code, leader) = match lead {
                    Lead::Missing => (code::STREAM_DOES_NOT_EXIST, u16::MAX),
                    Lead::Refused => (code::ACCESS_REFUSED, u16::MAX),
                    Lead::Nobody => (code::OK, u16::MAX),
                    Lead::Here => (code::OK, reference(&here)),
                    Lead::There(e) => (code::OK, reference(e)),
                };
                response::StreamMetadata {
                    stream: s,
                    code,
                    leader,
                    replicas: &[],
                }
            })
            .collect();
        let brokers: Vec<response::Broker<'_>> = endpoints
            .iter()
            .enumerate()
            .map(|(i, (host, port))| response::Broker {
                reference: i as u16,
                host,
                port: u32::from(*port),
            })
            .collect();
        response::metadata(&mut self.out, correlation_id, &brokers, &meta);
    }

    /// Publishers and subscriptions on streams that are gone get a
    /// metadata update ("stream not available") and are dropped.
    fn check_deleted(&mut self) {
        let mut gone: Vec<String> = Vec::new();
        let still = |s: &Self, stream: &str, log: &Arc<StreamLog>| {
            s.log(stream).is_some_and(|l| Arc::ptr_eq(&l, log))
        };
        for p in self.publishers.values() {
            if !still(self, &p.stream, &p.log) && !gone.contains(&p.stream) {
                gone.push(p.stream.clone());
            }
        }
        for s in self.subscriptions.values() {
            if !still(self, &s.stream, &s.log) && !gone.contains(&s.stream) {
                gone.push(s.stream.clone());
            }
        }
        for stream in gone {
            response::metadata_update(&mut self.out, code::STREAM_NOT_AVAILABLE, &stream);
            self.publishers.retain(|_, p| p.stream != stream);
            let gone_subs: Vec<u8> = self
                .subscriptions
                .iter()
                .filter(|(_, s)| s.stream == stream)
                .map(|(id, _)| *id)
                .collect();
            for id in gone_subs {
                if let Some(sub) = self.subscriptions.remove(&id) {
                    self.leave_group(id, &sub);
                }
            }
            self.watch_changed = true;
        }
    }

    // ---- super streams ----

    fn route(&self, routing_key: &str, super_stream: &str) -> (u16, Vec<String>) {
        let Some(v) = &self.vhost else {
            return (code::INTERNAL_ERROR, Vec::new());
        };
        let Ok(ex) = v.exchange(super_stream) else {
            return (code::STREAM_DOES_NOT_EXIST, Vec::new());
        };
        let streams: Vec<String> = ex
            .bindings()
            .into_iter()
            .filter(|b| b.routing_key == routing_key)
            .filter_map(|b| queue_of(&b.destination))
            .collect();
        (code::OK, streams)
    }

    fn partitions(&self, super_stream: &str) -> (u16, Vec<String>) {
        let Some(v) = &self.vhost else {
            return (code::INTERNAL_ERROR, Vec::new());
        };
        let Ok(ex) = v.exchange(super_stream) else {
            return (code::STREAM_DOES_NOT_EXIST, Vec::new());
        };
        let mut parts: Vec<(i64, String)> = ex
            .bindings()
            .into_iter()
            .filter_map(|b| {
                // RabbitMQ's key too (super streams it defined, imported).
                let order = b
                    .arguments
                    .get("x-super-stream-partition-order")
                    .or_else(|| b.arguments.get("x-stream-partition-order"))
                    .and_then(FieldValue::as_i64)
                    .unwrap_or(i64::MAX);
                queue_of(&b.destination).map(|q| (order, q))
            })
            .collect();
        parts.sort();
        parts.dedup_by(|a, b| a.1 == b.1);
        (code::OK, parts.into_iter().map(|(_, s)| s).collect())
    }

    /// Create super stream `name`: a direct exchange (`x-super-stream`)
    /// with the partition streams bound in order, each with its binding
    /// key. What it made goes to `changes`; a failure part way undoes what
    /// was made (as RabbitMQ's stream manager rolls back).
    fn create_super_stream(
        &mut self,
        name: &str,
        partitions: &[String],
        binding_keys: &[String],
        arguments: &[(String, String)],
        now_ms: u64,
        changes: &mut Vec<MetaChange>,
    ) -> u16 {
        let Some(v) = self.vhost.clone() else {
            return code::INTERNAL_ERROR;
        };
        if name.is_empty() || partitions.is_empty() || partitions.len() != binding_keys.len() {
            return code::PRECONDITION_FAILED;
        }
        if !self.allowed(Access::Configure, name)
            || partitions
                .iter()
                .any(|p| !self.allowed(Access::Configure, p))
        {
            return code::ACCESS_REFUSED;
        }
        if v.exchange(name).is_ok()
            || partitions
                .iter()
                .any(|p| v.queue(p, self.connection_id).is_ok())
        {
            return code::STREAM_ALREADY_EXISTS;
        }
        let Some(args) = create_arguments(arguments) else {
            return code::PRECONDITION_FAILED;
        };
        let mut ex_args = FieldTable::new();
        ex_args.insert("x-super-stream", FieldValue::Bool(true));
        let d = ExchangeDeclare {
            name: name.to_owned(),
            kind: "direct".into(),
            durable: true,
            arguments: ex_args,
            ..Default::default()
        };
        if v.declare_exchange(&d).is_err() {
            return code::PRECONDITION_FAILED;
        }
        changes.push(MetaChange::DeclareExchange(d));
        for (i, (p, k)) in partitions.iter().zip(binding_keys).enumerate() {
            let d = QueueDeclare {
                name: p.clone(),
                durable: true,
                arguments: args.clone(),
                ..Default::default()
            };
            if v.declare_queue(&d, self.connection_id, now_ms).is_err() {
                self.undo(&v, changes, now_ms);
                return code::PRECONDITION_FAILED;
            }
            changes.push(MetaChange::DeclareQueue(d));
            let mut bargs = FieldTable::new();
            bargs.insert("x-super-stream-partition-order", FieldValue::I32(i as i32));
            let dest = crate::broker::exchange::Destination::Queue(Arc::from(p.as_str()));
            if v.bind(name, dest, k, &bargs, self.connection_id).is_err() {
                self.undo(&v, changes, now_ms);
                return code::PRECONDITION_FAILED;
            }
            changes.push(MetaChange::Bind {
                exchange: name.to_owned(),
                queue: p.clone(),
                routing_key: k.clone(),
                arguments: bargs,
            });
        }
        code::OK
    }

    /// Remove what a failed super stream creation made (queues and the
    /// exchange, which takes its bindings along); `changes` ends empty.
    fn undo(&self, v: &VHost, changes: &mut Vec<MetaChange>, now_ms: u64) {
        for c in changes.drain(..).rev() {
            match c {
                MetaChange::DeclareQueue(d) => {
                    let _ = v.delete_queue(&d.name, false, false, self.connection_id, now_ms);
                }
                MetaChange::DeclareExchange(d) => {
                    let _ = v.delete_exchange(&d.name, false);
                }
                _ => {}
            }
        }
    }

    /// Delete super stream `name`: its exchange (and bindings), then its
    /// partition streams, as RabbitMQ's stream manager does; what it
    /// removed goes to `changes`.
    fn delete_super_stream(
        &mut self,
        name: &str,
        now_ms: u64,
        changes: &mut Vec<MetaChange>,
    ) -> u16 {
        let Some(v) = self.vhost.clone() else {
            return code::INTERNAL_ERROR;
        };
        let (c, partitions) = self.partitions(name);
        if c != code::OK {
            return c;
        }
        if !self.allowed(Access::Configure, name)
            || partitions
                .iter()
                .any(|p| !self.allowed(Access::Configure, p))
        {
            return code::ACCESS_REFUSED;
        }
        if v.delete_exchange(name, false).is_err() {
            return code::INTERNAL_ERROR;
        }
        changes.push(MetaChange::DeleteExchange(name.to_owned()));
        for p in &partitions {
            if v.delete_queue(p, false, false, self.connection_id, now_ms)
                .is_ok()
            {
                changes.push(MetaChange::DeleteQueue(p.clone()));
            }
        }
        code::OK
    }
}

impl Drop for StreamSession {
    /// Leave every single active consumer group (the next member takes over).
    fn drop(&mut self) {
        for (id, sub) in &self.subscriptions {
            self.leave_group(*id, sub);
        }
        if self.admin.as_ref().is_some_and(|a| a.registered) {
            self.broker.unregister_connection(self.connection_id);
        }
    }
}

/// Where a stream is led, for a metadata answer.
enum Lead {
    Missing,
    Refused,
    /// This node has its log.
    Here,
    /// Its home node, reached there (host, port).
    There((String, u16)),
    /// Its home node is down: no leader.
    Nobody,
}

fn queue_of(d: &crate::broker::exchange::Destination) -> Option<String> {
    match d {
        crate::broker::exchange::Destination::Queue(q) => Some(q.to_string()),
        crate::broker::exchange::Destination::Exchange(_) => None,
    }
}

/// Negotiate a tune value: 0 on one side means the other's.
fn negotiate(server: u32, client: u32) -> u32 {
    match (server, client) {
        (0, c) => c,
        (s, 0) => s,
        (s, c) => s.min(c),
    }
}

/// Stream-protocol create arguments as queue arguments, as RabbitMQ's
/// `rabbit_stream_manager` maps them: its known keys become `x-` arguments
/// (a bad value: None, RabbitMQ's precondition failed), any other key is
/// ignored.
fn create_arguments(arguments: &[(String, String)]) -> Option<FieldTable> {
    let mut t = FieldTable::new();
    t.insert("x-queue-type", FieldValue::string("stream"));
    for (k, v) in arguments {
        match k.as_str() {
            "max-length-bytes" | "stream-max-segment-size-bytes" => {
                let n: i64 = v.parse().ok().filter(|n| *n >= 0)?;
                t.insert(format!("x-{k}"), FieldValue::I64(n));
            }
            "initial-cluster-size" => {
                let n: i64 = v.parse().ok().filter(|n| *n > 0)?;
                t.insert("x-initial-cluster-size", FieldValue::I64(n));
            }
            "stream-filter-size-bytes" => {
                let n: i64 = v.parse().ok().filter(|n| (16..=255).contains(n))?;
                t.insert("x-stream-filter-size-bytes", FieldValue::I64(n));
            }
            "max-age" => {
                crate::storage::stream::parse_age(v)?;
                t.insert("x-max-age", FieldValue::string(v.clone()));
            }
            "queue-leader-locator" => {
                if !matches!(
                    v.as_str(),
                    "client-local" | "balanced" | "random" | "least-leaders"
                ) {
                    return None;
                }
                t.insert("x-queue-leader-locator", FieldValue::string(v.clone()));
            }
            _ => {}
        }
    }
    Some(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::stream::request::Request as R;

    fn session() -> StreamSession {
        let broker = Broker::new(&crate::Config::default());
        StreamSession::new(
            broker,
            StreamSettings {
                frame_max: 1 << 20,
                heartbeat: 60,
                advertised_host: "localhost".into(),
                advertised_port: 5552,
                handshake_timeout_ms: 10_000,
                sac: Arc::default(),
                anonymous: None,
                clustered: false,
                deliver_merge_ms: 10,
            },
            1,
            true,
            tokio::sync::mpsc::unbounded_channel().0,
            0,
        )
    }

    fn feed(s: &mut StreamSession, reqs: &[R], now: u64) -> Vec<u8> {
        let mut b = BytesMut::new();
        for r in reqs {
            r.encode(&mut b);
        }
        s.handle_input(&mut b, now);
        let mut out = Vec::new();
        while let Some(x) = s.poll_transmit(now) {
            out.extend_from_slice(&x);
        }
        out
    }

    /// (key, correlation id or first u32, code) of each frame in `out`.
    fn frames(out: &[u8]) -> Vec<(u16, u32, u16)> {
        split_frames(out)
            .into_iter()
            .map(|f| {
                let k = u16::from_be_bytes([f[0], f[1]]);
                let corr = f
                    .get(4..8)
                    .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
                let c = f.get(8..10).map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
                (k, corr, c)
            })
            .collect()
    }

    /// The frames in `out`, each without its size.
    fn split_frames(out: &[u8]) -> Vec<&[u8]> {
        let mut v = Vec::new();
        let mut i = 0;
        while i + 4 <= out.len() {
            let size = u32::from_be_bytes([out[i], out[i + 1], out[i + 2], out[i + 3]]) as usize;
            v.push(&out[i + 4..i + 4 + size]);
            i += 4 + size;
        }
        v
    }

    /// Tune (`frame_max`, `heartbeat`) and open `vhost` (correlation id 4)
    /// at `now`: the frames the session answers.
    fn tune_and_open(
        s: &mut StreamSession,
        frame_max: u32,
        heartbeat: u32,
        vhost: &str,
        now: u64,
    ) -> Vec<u8> {
        feed(
            s,
            &[
                R::Tune {
                    frame_max,
                    heartbeat,
                },
                R::Open {
                    correlation_id: 4,
                    vhost: vhost.into(),
                },
            ],
            now,
        )
    }

    fn handshake(s: &mut StreamSession, user: &str, pass: &str) -> Vec<(u16, u32, u16)> {
        let mut data = vec![0u8];
        data.extend_from_slice(user.as_bytes());
        data.push(0);
        data.extend_from_slice(pass.as_bytes());
        frames(&feed(
            s,
            &[
                R::PeerProperties {
                    correlation_id: 1,
                    properties: vec![],
                },
                R::SaslHandshake { correlation_id: 2 },
                R::SaslAuthenticate {
                    correlation_id: 3,
                    mechanism: "PLAIN".into(),
                    data: Some(Bytes::from(data)),
                },
            ],
            0,
        ))
    }

    #[test]
    fn handshake_then_open() {
        let mut s = session();
        let f = handshake(&mut s, "guest", "guest");
        assert_eq!(f[0], (0x8011, 1, code::OK));
        assert_eq!(f[1], (0x8012, 2, code::OK));
        assert_eq!(f[2], (0x8013, 3, code::OK));
        assert_eq!(f[3].0, key::TUNE);
        let f = frames(&tune_and_open(&mut s, 65536, 10, "/", 0));
        assert_eq!(f, vec![(0x8015, 4, code::OK)]);
        assert_eq!(s.frame_max, 65536);
        assert_eq!(s.heartbeat_ms, 10_000);
        // Heartbeats: sent when idle, the peer dead after two silent intervals.
        assert_eq!(s.poll_timeout(), Some(1000));
        // The periodic check moves on (no busy loop on a quiet connection).
        s.handle_timeout(1000);
        assert_eq!(s.poll_timeout(), Some(2000));
        s.handle_timeout(10_000);
        let mut hb = Vec::new();
        while let Some(x) = s.poll_transmit(10_000) {
            hb.extend_from_slice(&x);
        }
        assert_eq!(hb, vec![0, 0, 0, 4, 0, 23, 0, 1]);
        s.handle_timeout(20_000);
        assert!(s.is_closed());
    }

    fn established(login: Option<Result<String, String>>) -> crate::tls::Established {
        crate::tls::Established {
            info: crate::broker::TlsInfo {
                protocol: "tlsv1.3",
                cipher: "TLS13_AES_128_GCM_SHA256".into(),
                peer_cert_subject: Some("CN=guest".into()),
                peer_cert_issuer: Some("CN=ca".into()),
            },
            login,
        }
    }

    /// The mechanisms of the SASL handshake response in `out`.
    fn mechanisms(out: &[u8]) -> Vec<String> {
        let mut i = 0;
        while i + 4 <= out.len() {
            let size = u32::from_be_bytes([out[i], out[i + 1], out[i + 2], out[i + 3]]) as usize;
            let f = &out[i + 4..i + 4 + size];
            if f[..2] == [0x80, 18] {
                let n = u32::from_be_bytes([f[10], f[11], f[12], f[13]]) as usize;
                let mut at = 14;
                let mut v = Vec::new();
                for _ in 0..n {
                    let len = u16::from_be_bytes([f[at], f[at + 1]]) as usize;
                    v.push(String::from_utf8_lossy(&f[at + 2..at + 2 + len]).into_owned());
                    at += 2 + len;
                }
                return v;
            }
            i += 4 + size;
        }
        Vec::new()
    }

    fn external(s: &mut StreamSession) -> (Vec<String>, u16) {
        let out = feed(
            s,
            &[
                R::PeerProperties {
                    correlation_id: 1,
                    properties: vec![("connection_name".into(), "app".into())],
                },
                R::SaslHandshake { correlation_id: 2 },
                R::SaslAuthenticate {
                    correlation_id: 3,
                    mechanism: "EXTERNAL".into(),
                    data: None,
                },
            ],
            0,
        );
        let code = frames(&out)
            .into_iter()
            .find(|f| f.0 == 0x8013)
            .map_or(0, |f| f.2);
        (mechanisms(&out), code)
    }

    #[test]
    fn external_only_with_a_verified_certificate() {
        // Plain TCP: not offered, refused as unsupported.
        let mut s = session();
        let (mechs, c) = external(&mut s);
        assert_eq!(mechs, vec!["PLAIN", "AMQPLAIN"]);
        assert_eq!(c, code::SASL_MECHANISM_NOT_SUPPORTED);
        // TLS without a client certificate: the same.
        let mut s = session();
        s.set_tls(established(None));
        assert_eq!(external(&mut s).1, code::SASL_MECHANISM_NOT_SUPPORTED);
        // A certificate without a usable name: offered, and a failure.
        let mut s = session();
        s.set_tls(established(Some(Err("no CN".into()))));
        let (mechs, c) = external(&mut s);
        assert!(mechs.contains(&"EXTERNAL".to_string()));
        assert_eq!(c, code::AUTHENTICATION_FAILURE);
        assert!(s.is_closed());
        // A certificate naming a known user: logged in as that user.
        let mut s = session();
        s.set_tls(established(Some(Ok("guest".into()))));
        assert_eq!(external(&mut s).1, code::OK);
        assert_eq!(s.user(), Some("guest"));
        assert_eq!(s.auth_mechanism, EXTERNAL);
        // An unknown one: authentication failure.
        let mut s = session();
        s.set_tls(established(Some(Ok("mallory".into()))));
        assert_eq!(external(&mut s).1, code::AUTHENTICATION_FAILURE);
    }

    #[test]
    fn registered_for_the_admin_api_from_open_until_dropped() {
        let mut s = session();
        let broker = Arc::clone(&s.broker);
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let stats = StreamConnStats::new(tx);
        let peer: std::net::SocketAddr = "127.0.0.1:4000".parse().expect("addr");
        let local: std::net::SocketAddr = "127.0.0.1:5552".parse().expect("addr");
        s.set_admin(Arc::clone(&stats), peer, local);
        s.set_tls(established(Some(Ok("guest".into()))));
        external(&mut s);
        assert!(broker.connections().is_empty(), "not before open");
        tune_and_open(&mut s, 0, 30, "/", 7);
        let c = broker.connections();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].name, "127.0.0.1:4000 -> 127.0.0.1:5552");
        assert_eq!((c[0].user.as_str(), c[0].vhost.as_str()), ("guest", "/"));
        assert_eq!(c[0].heartbeat, 30);
        assert_eq!(c[0].connected_at, 7);
        assert_eq!(
            c[0].client_properties
                .get("connection_name")
                .and_then(|v| v.as_str()),
            Some("app")
        );
        assert_eq!(c[0].tls.as_ref().map(|t| t.protocol), Some("tlsv1.3"));
        assert_eq!(stats.auth_mechanism(), EXTERNAL);
        assert!(c[0].control.stream().is_some());
        s.force_close("by the admin");
        assert!(s.is_closed());
        drop(s);
        assert!(broker.connections().is_empty(), "gone once dropped");
    }

    #[test]
    fn bad_password_and_vhost() {
        let mut s = session();
        let f = handshake(&mut s, "guest", "nope");
        assert_eq!(f[2], (0x8013, 3, code::AUTHENTICATION_FAILURE));
        assert!(s.is_closed());

        let mut s = session();
        handshake(&mut s, "guest", "guest");
        let f = frames(&tune_and_open(&mut s, 0, 0, "nope", 0));
        assert_eq!(f, vec![(0x8015, 4, code::VIRTUAL_HOST_ACCESS_FAILURE)]);
        assert!(s.is_closed());
    }

    #[test]
    fn unknown_and_oversized_frames_close_with_codes() {
        let mut s = session();
        let mut b = BytesMut::from(&[0u8, 0, 0, 4, 0, 99, 0, 1][..]);
        s.handle_input(&mut b, 0);
        let mut out = Vec::new();
        while let Some(x) = s.poll_transmit(0) {
            out.extend_from_slice(&x);
        }
        assert_eq!(frames(&out), vec![(key::CLOSE, 0, code::UNKNOWN_FRAME)]);
        // The close's answer ends it.
        feed(
            &mut s,
            &[R::CloseResponse {
                correlation_id: 0,
                code: code::OK,
            }],
            1,
        );
        assert!(s.is_closed());

        let mut s = session();
        let mut b = BytesMut::from(&[0x7fu8, 0, 0, 0, 0, 17, 0, 1][..]);
        s.handle_input(&mut b, 0);
        let mut out = Vec::new();
        while let Some(x) = s.poll_transmit(0) {
            out.extend_from_slice(&x);
        }
        assert_eq!(frames(&out), vec![(key::CLOSE, 0, code::FRAME_TOO_LARGE)]);
        s.handle_timeout(2000);
        assert!(s.is_closed());
    }

    #[test]
    fn a_frame_over_frame_max_is_refused_whole_and_taken_in_parts() {
        // A metadata request of about 12 KB against a frame-max of 8192.
        let big = R::Metadata {
            correlation_id: 7,
            streams: vec!["x".repeat(200); 60],
        };
        let mut bytes = BytesMut::new();
        big.encode(&mut bytes);
        assert!(bytes.len() > 12_000);
        let tuned = || {
            let mut s = session();
            handshake(&mut s, "guest", "guest");
            let f = frames(&tune_and_open(&mut s, 8192, 0, "/", 0));
            assert_eq!(f, vec![(0x8015, 4, code::OK)]);
            s
        };
        // All there at once (what one read held): FRAME_TOO_LARGE, as
        // RabbitMQ's reader.
        let mut s = tuned();
        let mut b = bytes.clone();
        s.handle_input(&mut b, 1);
        assert_eq!(drain(&mut s), vec![(key::CLOSE, 0, code::FRAME_TOO_LARGE)]);
        // In two reads: taken and answered, and the next frame is checked
        // afresh.
        let mut s = tuned();
        let mut b = BytesMut::from(&bytes[..4000]);
        s.handle_input(&mut b, 1);
        assert!(drain(&mut s).is_empty());
        b.extend_from_slice(&bytes[4000..]);
        s.handle_input(&mut b, 2);
        assert_eq!(drain(&mut s), vec![(key::METADATA | 0x8000, 7, 0)]);
        assert!(b.is_empty());
        let mut b = bytes.clone();
        s.handle_input(&mut b, 3);
        assert_eq!(drain(&mut s), vec![(key::CLOSE, 0, code::FRAME_TOO_LARGE)]);
        // Past LONG_FRAME_LIMIT: refused however it comes.
        let mut s = tuned();
        let mut b = BytesMut::from(&(LONG_FRAME_LIMIT + 1).to_be_bytes()[..]);
        b.extend_from_slice(&[0, 0x0f, 0, 1]);
        s.handle_input(&mut b, 1);
        assert_eq!(drain(&mut s), vec![(key::CLOSE, 0, code::FRAME_TOO_LARGE)]);
    }

    /// An open session on a broker with a data directory (streams need
    /// one), clustered or not.
    fn opened(tag: &str, clustered: bool) -> (StreamSession, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "warren-session-stream-{tag}-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let broker = Broker::open(&crate::Config::for_tests(dir.clone()), 0).expect("broker");
        let mut s = StreamSession::new(
            broker,
            StreamSettings {
                frame_max: 1 << 20,
                heartbeat: 0,
                advertised_host: "localhost".into(),
                advertised_port: 5552,
                handshake_timeout_ms: 10_000,
                sac: Arc::default(),
                anonymous: None,
                clustered,
                deliver_merge_ms: 10,
            },
            1,
            true,
            tokio::sync::mpsc::unbounded_channel().0,
            0,
        );
        handshake(&mut s, "guest", "guest");
        let f = frames(&tune_and_open(&mut s, 0, 0, "/", 0));
        assert_eq!(f, vec![(0x8015, 4, code::OK)]);
        (s, dir)
    }

    fn drain(s: &mut StreamSession) -> Vec<(u16, u32, u16)> {
        let mut out = Vec::new();
        while let Some(x) = s.poll_transmit(0) {
            out.extend_from_slice(&x);
        }
        frames(&out)
    }

    fn create(id: u32, stream: &str) -> R {
        R::Create {
            correlation_id: id,
            stream: stream.into(),
            arguments: vec![],
        }
    }

    /// A stream's home node, elsewhere (clustered), reachable or not.
    #[derive(Debug)]
    struct Elsewhere(bool);

    impl crate::broker::remote::RemoteHome for Elsewhere {
        fn node(&self) -> &str {
            "warren@b"
        }
        fn reachable(&self) -> bool {
            self.0
        }
        fn stream_endpoint(&self) -> Option<(String, u16)> {
            None
        }
        fn forward(
            &self,
            _: &str,
            _: &str,
            _: &Arc<crate::broker::message::Message>,
            t: &Arc<crate::broker::remote::Ticket>,
        ) {
            t.expect();
            t.settle(false);
        }
        fn consume(
            &self,
            _: crate::broker::remote::RemoteConsume,
            _: u16,
            _: Arc<dyn crate::broker::queue::DeliverySink>,
        ) -> Result<crate::broker::remote::RemoteConsumer, String> {
            Err("not in this test".into())
        }
        fn settle(&self, _: u64, _: Vec<u64>, _: crate::broker::remote::Settle) {}
        fn cancel(&self, _: u64) {}
        fn release(&self, _: u64) {}
    }

    /// One publish confirm (ids) or error ((id, code)s) frame.
    type PublishAnswer = (Vec<u64>, Vec<(u64, u16)>);

    /// Publish confirms and errors in `out`, in order.
    fn publish_answers(out: &[u8]) -> Vec<PublishAnswer> {
        let mut v = Vec::new();
        let mut i = 0;
        let u64_at =
            |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        while i + 4 <= out.len() {
            let size = u32::from_be_bytes([out[i], out[i + 1], out[i + 2], out[i + 3]]) as usize;
            let f = &out[i + 4..i + 4 + size];
            let n = u32::from_be_bytes([f[5], f[6], f[7], f[8]]) as usize;
            match u16::from_be_bytes([f[0], f[1]]) {
                key::PUBLISH_CONFIRM => {
                    v.push(((0..n).map(|k| u64_at(f, 9 + 8 * k)).collect(), vec![]));
                }
                key::PUBLISH_ERROR => v.push((
                    vec![],
                    (0..n)
                        .map(|k| {
                            let at = 9 + 10 * k;
                            (u64_at(f, at), u16::from_be_bytes([f[at + 8], f[at + 9]]))
                        })
                        .collect(),
                )),
                _ => {}
            }
            i += 4 + size;
        }
        v
    }

    #[test]
    fn publishes_to_a_stream_homed_elsewhere_are_forwarded_and_confirmed_in_order() {
        let (mut s, dir) = opened("forwarded", false);
        feed(&mut s, &[create(10, "fs")], 0);
        let q = s.vhost.as_ref().expect("vhost").queue("fs", 1).expect("fs");
        q.set_remote(Some(Arc::new(Elsewhere(true))));
        let publish = |ids: &[u64]| R::Publish {
            version: 1,
            publisher_id: 0,
            messages: ids
                .iter()
                .map(|i| Published {
                    publishing_id: *i,
                    filter_value: None,
                    data: Bytes::from(format!("m{i}")),
                    sub_batch: None,
                })
                .collect(),
        };
        let declare = |id: u8| R::DeclarePublisher {
            correlation_id: 11,
            publisher_id: id,
            reference: Some("r".into()),
            stream: "fs".into(),
        };
        let f = frames(&feed(
            &mut s,
            &[declare(0), publish(&[1, 2]), publish(&[3])],
            0,
        ));
        assert_eq!(f, vec![(key::DECLARE_PUBLISHER | 0x8000, 11, code::OK)]);
        // Two requests for the home node, in order; nothing written here.
        let (a, b) = (s.poll_forward().expect("a"), s.poll_forward().expect("b"));
        assert!(s.poll_forward().is_none());
        assert_eq!((a.node.as_str(), a.stream.as_str()), ("warren@b", "fs"));
        let StreamOp::Publish {
            reference,
            entries,
            pipelined,
        } = &a.op
        else {
            panic!("a publish: {:?}", a.op)
        };
        assert_eq!(reference.as_deref(), Some("r"));
        let ids: Vec<(u64, u32)> = entries.iter().map(|e| (e.id, e.len)).collect();
        assert_eq!(ids, vec![(1, 2), (2, 2)]);
        assert!(!pipelined);
        assert_eq!(&a.body[..], b"m1m2");
        assert!(matches!(
            &b.op,
            StreamOp::Publish {
                pipelined: true,
                ..
            }
        ));
        assert_eq!(s.log("fs").expect("log").publisher_sequence("r"), 0);
        assert_eq!(s.forwards_in_flight(), 2);
        // The second frame's answer waits for the first's.
        s.handle_forwarded(
            b.token,
            Some(StreamAnswer::Published { duplicates: vec![] }),
        );
        assert!(publish_answers(&feed(&mut s, &[], 0)).is_empty());
        // The first's: its duplicate (index 1, id 2) confirmed alone first.
        let dup = StreamAnswer::Published {
            duplicates: vec![1],
        };
        s.handle_forwarded(a.token, Some(dup));
        assert_eq!(
            publish_answers(&feed(&mut s, &[], 0)),
            vec![(vec![2], vec![]), (vec![1], vec![]), (vec![3], vec![])]
        );
        // No answer (the link went down): refused, never confirmed.
        feed(&mut s, &[publish(&[4])], 0);
        let c = s.poll_forward().expect("c");
        s.handle_forwarded(c.token, None);
        assert_eq!(
            publish_answers(&feed(&mut s, &[], 0)),
            vec![(vec![], vec![(4, code::STREAM_NOT_AVAILABLE)])]
        );
        // The sequence is the home node's.
        let query = R::QueryPublisherSequence {
            correlation_id: 20,
            reference: "r".into(),
            stream: "fs".into(),
        };
        assert!(feed(&mut s, &[query], 0).is_empty(), "answered later");
        let d = s.poll_forward().expect("d");
        assert!(matches!(&d.op, StreamOp::PublisherSequence { reference } if reference == "r"));
        s.handle_forwarded(d.token, Some(StreamAnswer::Sequence(7)));
        let out = feed(&mut s, &[], 0);
        assert_eq!(
            frames(&out),
            vec![(key::QUERY_PUBLISHER_SEQUENCE | 0x8000, 20, code::OK)]
        );
        assert_eq!(&out[out.len() - 8..], &7u64.to_be_bytes());
        // Offsets are stored there too.
        let store = R::StoreOffset {
            reference: "c".into(),
            stream: "fs".into(),
            offset: 5,
        };
        feed(&mut s, std::slice::from_ref(&store), 0);
        let e = s.poll_forward().expect("e");
        assert!(matches!(&e.op, StreamOp::StoreOffset { offset: 5, .. }));
        s.handle_forwarded(e.token, Some(StreamAnswer::Stored));
        assert_eq!(s.forwards_in_flight(), 0);
        // The home node down: no new publisher, no offset sent anywhere.
        q.set_remote(Some(Arc::new(Elsewhere(false))));
        let f = frames(&feed(&mut s, &[declare(1), store], 0));
        assert_eq!(
            f,
            vec![(
                key::DECLARE_PUBLISHER | 0x8000,
                11,
                code::STREAM_NOT_AVAILABLE
            )]
        );
        assert!(s.poll_forward().is_none());
        assert_eq!(s.log("fs").expect("log").query_offset("c"), None);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn a_subscriptions_first_chunk_waits_after_its_response() {
        let (mut s, dir) = opened("first-delivery", false);
        feed(
            &mut s,
            &[
                create(10, "fd"),
                R::DeclarePublisher {
                    correlation_id: 11,
                    publisher_id: 0,
                    reference: None,
                    stream: "fd".into(),
                },
                R::Publish {
                    version: 1,
                    publisher_id: 0,
                    messages: vec![Published {
                        publishing_id: 1,
                        filter_value: None,
                        data: Bytes::from_static(b"m"),
                        sub_batch: None,
                    }],
                },
            ],
            100,
        );
        s.publishers[&0].log.wait_committed_blocking();
        s.handle_timeout(1_000); // (the periodic check, next at 2 000)
        let f = frames(&feed(
            &mut s,
            &[R::Subscribe {
                correlation_id: 12,
                subscription_id: 1,
                stream: "fd".into(),
                offset: OffsetSpec::First,
                credit: 10,
                properties: vec![],
            }],
            1_000,
        ));
        assert!(
            f.contains(&(key::SUBSCRIBE | 0x8000, 12, code::OK)),
            "{f:?}"
        );
        // The chunk is there, but not before the response has gone alone.
        assert!(s.poll_read().is_none());
        assert_eq!(s.poll_timeout(), Some(1_000 + FIRST_DELIVERY_DELAY_MS));
        s.handle_timeout(1_000 + FIRST_DELIVERY_DELAY_MS);
        let job = s.poll_read().expect("the first read");
        assert_eq!(job.id, 1);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Three messages published a frame each at 100, 101 and 102 ms (each
    /// stored as a chunk of its own), then a subscription from `first` with
    /// one credit: the Deliver frames of its read (after their size).
    fn deliveries(tag: &str, merge_ms: u32, zero_copy: bool) -> Vec<Vec<u8>> {
        let (mut s, dir) = opened(tag, false);
        s.settings.deliver_merge_ms = merge_ms;
        s.set_zero_copy(zero_copy);
        let declare = R::DeclarePublisher {
            correlation_id: 11,
            publisher_id: 0,
            reference: None,
            stream: "m".into(),
        };
        feed(&mut s, &[create(10, "m"), declare], 100);
        for (i, body) in ["a", "bb", "ccc"].into_iter().enumerate() {
            let publish = R::Publish {
                version: 1,
                publisher_id: 0,
                messages: vec![Published {
                    publishing_id: i as u64,
                    filter_value: None,
                    data: Bytes::from(body),
                    sub_batch: None,
                }],
            };
            feed(&mut s, &[publish], 100 + i as u64);
            s.publishers[&0].log.wait_committed_blocking();
        }
        let subscribe = R::Subscribe {
            correlation_id: 12,
            subscription_id: 1,
            stream: "m".into(),
            offset: OffsetSpec::First,
            credit: 1,
            properties: vec![],
        };
        feed(&mut s, &[subscribe], 1_000);
        let now = 1_000 + FIRST_DELIVERY_DELAY_MS;
        s.handle_timeout(now);
        let job = s.poll_read().expect("a read");
        let done = match job.run_cached() {
            Ok(done) => done,
            Err(job) => job.run(),
        };
        s.handle_read(done);
        let mut out = Vec::new();
        while let Some(x) = s.poll_transmit(now) {
            out.extend_from_slice(&x);
        }
        // The one credit is spent.
        assert!(s.poll_read().is_none());
        let delivers = split_frames(&out)
            .into_iter()
            .filter(|f| u16::from_be_bytes([f[0], f[1]]) == key::DELIVER)
            .map(<[u8]>::to_vec)
            .collect();
        let _ = std::fs::remove_dir_all(dir);
        delivers
    }

    /// A Deliver frame's chunk header and entries.
    fn delivered(f: &[u8]) -> (Header, Vec<Bytes>) {
        let version = u16::from_be_bytes([f[2], f[3]]);
        let at = 5 + if version >= 2 { 8 } else { 0 };
        let h = Header::parse(&f[at..]).expect("a chunk header");
        let data = Bytes::copy_from_slice(&f[at + HEADER_LEN..]);
        assert_eq!(data.len(), h.data_len as usize);
        assert_eq!(h.crc, crc32fast::hash(&data), "the data's CRC");
        let entries = crate::storage::stream::chunk::entries(data)
            .map(|e| match e {
                crate::storage::stream::chunk::Entry::Simple(b) => b,
                other => panic!("{other:?}"),
            })
            .collect();
        (h, entries)
    }

    #[test]
    fn stored_chunks_written_close_together_go_out_as_one_for_a_credit() {
        for zero_copy in [false, true] {
            let f = deliveries("merged", 10, zero_copy);
            assert_eq!(f.len(), 1, "one Deliver for the one credit");
            let (h, entries) = delivered(&f[0]);
            assert_eq!(entries, [&b"a"[..], b"bb", b"ccc"].map(Bytes::from_static));
            assert_eq!((h.first_offset, h.num_entries, h.num_records), (0, 3, 3));
            // The newest part's timestamp; no bloom filter or trailer.
            assert_eq!((h.timestamp, h.bloom_len, h.trailer_len), (102, 0, 0));
        }
        // Merging off: the first stored chunk alone, as stored.
        let f = deliveries("unmerged", 0, true);
        assert_eq!(f.len(), 1);
        let (h, entries) = delivered(&f[0]);
        assert_eq!(entries, [Bytes::from_static(b"a")]);
        assert_eq!((h.first_offset, h.num_records, h.timestamp), (0, 1, 100));
        // Written further apart than the span: one at a time too.
        let f = deliveries("apart", 1, false);
        let (h, _) = delivered(&f[0]);
        assert_eq!((h.num_records, h.timestamp), (2, 101));
    }

    #[test]
    fn clustered_create_is_answered_after_its_commit_and_holds_later_frames() {
        let (mut s, dir) = opened("held", true);
        let mut b = BytesMut::new();
        for r in [
            create(10, "s1"),
            R::Metadata {
                correlation_id: 11,
                streams: vec!["s1".into()],
            },
        ] {
            r.encode(&mut b);
        }
        s.handle_input(&mut b, 1);
        // Made locally, reported, not answered; the metadata request waits.
        assert!(drain(&mut s).is_empty());
        assert!(!b.is_empty(), "the frame after it stays in the buffer");
        let held = s.held_change().expect("held").clone();
        assert_eq!(held.vhost, "/");
        assert!(matches!(&held.changes[..], [MetaChange::DeclareQueue(d)]
            if d.name == "s1" && d.durable
                && d.arguments.get("x-queue-type") == Some(&FieldValue::string("stream"))));
        s.handle_input(&mut b, 2);
        assert!(drain(&mut s).is_empty(), "nothing handled while held");
        s.change_committed(true);
        assert_eq!(drain(&mut s), vec![(key::CREATE | 0x8000, 10, code::OK)]);
        s.handle_input(&mut b, 3);
        assert_eq!(drain(&mut s), vec![(key::METADATA | 0x8000, 11, 0)]);
        assert!(s.held_change().is_none());

        // Not committed in time: INTERNAL_ERROR (0x0f), never OK.
        let f = feed(&mut s, &[create(12, "s2")], 4);
        assert!(f.is_empty());
        s.change_committed(false);
        assert_eq!(
            drain(&mut s),
            vec![(key::CREATE | 0x8000, 12, code::INTERNAL_ERROR)]
        );
        // A create refused locally is answered at once, nothing held.
        let f = frames(&feed(&mut s, &[create(13, "s1")], 5));
        assert_eq!(
            f,
            vec![(key::CREATE | 0x8000, 13, code::STREAM_ALREADY_EXISTS)]
        );
        assert!(s.held_change().is_none());

        // A delete: held, then its response before the metadata update.
        let f = feed(
            &mut s,
            &[R::Delete {
                correlation_id: 14,
                stream: "s1".into(),
            }],
            6,
        );
        assert!(f.is_empty());
        assert!(matches!(&s.held_change().expect("held").changes[..],
            [MetaChange::DeleteQueue(n)] if n == "s1"));
        s.change_committed(true);
        assert_eq!(drain(&mut s), vec![(key::DELETE | 0x8000, 14, code::OK)]);
        drop(s);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn clustered_super_stream_reports_its_exchange_partitions_and_bindings() {
        let (mut s, dir) = opened("super", true);
        let f = feed(
            &mut s,
            &[R::CreateSuperStream {
                correlation_id: 20,
                name: "ss".into(),
                partitions: vec!["ss-0".into(), "ss-1".into()],
                binding_keys: vec!["a".into(), "b".into()],
                arguments: vec![],
            }],
            1,
        );
        assert!(f.is_empty());
        let names: Vec<String> = s
            .held_change()
            .expect("held")
            .changes
            .iter()
            .map(|c| match c {
                MetaChange::DeclareExchange(d) => format!("x:{}", d.name),
                MetaChange::DeclareQueue(d) => format!("q:{}", d.name),
                MetaChange::Bind {
                    exchange,
                    queue,
                    routing_key,
                    arguments,
                } => format!(
                    "b:{exchange}>{queue}:{routing_key}:{:?}",
                    arguments
                        .get("x-super-stream-partition-order")
                        .and_then(FieldValue::as_i64)
                ),
                other => format!("{other:?}"),
            })
            .collect();
        assert_eq!(
            names,
            [
                "x:ss",
                "q:ss-0",
                "b:ss>ss-0:a:Some(0)",
                "q:ss-1",
                "b:ss>ss-1:b:Some(1)"
            ]
        );
        s.change_committed(true);
        assert_eq!(
            drain(&mut s),
            vec![(key::CREATE_SUPER_STREAM | 0x8000, 20, code::OK)]
        );
        // A partition the broker refuses (a reserved name) after the first
        // was made: PRECONDITION_FAILED, nothing held, nothing left.
        let f = frames(&feed(
            &mut s,
            &[R::CreateSuperStream {
                correlation_id: 22,
                name: "tt".into(),
                partitions: vec!["tt-0".into(), "amq.tt-1".into()],
                binding_keys: vec!["a".into(), "b".into()],
                arguments: vec![],
            }],
            3,
        ));
        assert_eq!(
            f,
            vec![(
                key::CREATE_SUPER_STREAM | 0x8000,
                22,
                code::PRECONDITION_FAILED
            )]
        );
        assert!(s.held_change().is_none());
        let v = s.vhost.clone().expect("vhost");
        assert!(v.exchange("tt").is_err() && v.queue("tt-0", 1).is_err());
        // Delete: the exchange, then the partitions, as one held change.
        let f = feed(
            &mut s,
            &[R::DeleteSuperStream {
                correlation_id: 23,
                name: "ss".into(),
            }],
            4,
        );
        assert!(f.is_empty());
        let changes = &s.held_change().expect("held").changes;
        assert!(matches!(&changes[..], [MetaChange::DeleteExchange(x),
            MetaChange::DeleteQueue(a), MetaChange::DeleteQueue(b)]
            if x == "ss" && a == "ss-0" && b == "ss-1"));
        s.change_committed(true);
        assert_eq!(
            drain(&mut s),
            vec![(key::DELETE_SUPER_STREAM | 0x8000, 23, code::OK)]
        );
        drop(s);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn unclustered_creates_are_answered_at_once_and_metadata_names_this_node() {
        let (mut s, dir) = opened("plain", false);
        let f = frames(&feed(&mut s, &[create(30, "p")], 1));
        assert_eq!(f, vec![(key::CREATE | 0x8000, 30, code::OK)]);
        assert!(s.held_change().is_none());
        let out = feed(
            &mut s,
            &[R::Metadata {
                correlation_id: 31,
                streams: vec!["p".into(), "nope".into()],
            }],
            2,
        );
        // One broker (this node), "p" led by it, "nope" missing.
        let f = &out[4..];
        assert_eq!(&f[..2], &[0x80, 15]);
        assert_eq!(i32::from_be_bytes([f[8], f[9], f[10], f[11]]), 1);
        let tail = &f[f.len() - 25..];
        // "p": OK, leader 0, no replicas; "nope": 2, 0xffff.
        assert_eq!(
            tail,
            &[
                0, 1, b'p', 0, 1, 0, 0, 0, 0, 0, 0, 0, 4, b'n', b'o', b'p', b'e', 0, 2, 0xff, 0xff,
                0, 0, 0, 0
            ][..]
        );
        drop(s);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// (stream, code, leader reference) of each stream of a metadata
    /// response (the one frame in `out`), and the number of brokers.
    fn metadata_of(out: &[u8]) -> (u32, Vec<(String, u16, u16)>) {
        let f = &out[4..];
        assert_eq!(&f[..2], &[0x80, 15]);
        let u16_at = |at: usize| u16::from_be_bytes([f[at], f[at + 1]]);
        let u32_at = |at: usize| u32::from_be_bytes([f[at], f[at + 1], f[at + 2], f[at + 3]]);
        let brokers = u32_at(8);
        let mut at = 12;
        for _ in 0..brokers {
            at += 2;
            at += 2 + u16_at(at) as usize + 4;
        }
        let n = u32_at(at);
        at += 4;
        let mut v = Vec::new();
        for _ in 0..n {
            let len = u16_at(at) as usize;
            let name = String::from_utf8_lossy(&f[at + 2..at + 2 + len]).into_owned();
            at += 2 + len;
            v.push((name, u16_at(at), u16_at(at + 2)));
            at += 4 + 4 + 2 * u32_at(at + 4) as usize;
        }
        (brokers, v)
    }

    #[test]
    fn permission_is_checked_before_existence_as_rabbitmq_does() {
        let (mut s, dir) = opened("perm", false);
        for (i, name) in ["w1", "x1"].iter().enumerate() {
            let f = frames(&feed(&mut s, &[create(40 + i as u32, name)], 1));
            assert_eq!(f, vec![(key::CREATE | 0x8000, 40 + i as u32, code::OK)]);
        }
        // guest may write "w…" streams and read none.
        let p = crate::broker::auth::Permission::new(".*", "^w", "^$").expect("regexes");
        s.broker.auth.set_permission("/", "guest", p);
        let out = feed(
            &mut s,
            &[R::Metadata {
                correlation_id: 42,
                streams: vec!["w1".into(), "x1".into(), "w-none".into()],
            }],
            2,
        );
        let (brokers, meta) = metadata_of(&out);
        assert_eq!(brokers, 1);
        assert_eq!(
            meta,
            vec![
                ("w1".to_string(), code::OK, 0),
                ("x1".to_string(), code::ACCESS_REFUSED, u16::MAX),
                ("w-none".to_string(), code::STREAM_DOES_NOT_EXIST, u16::MAX),
            ]
        );
        let f = frames(&feed(
            &mut s,
            &[
                R::DeclarePublisher {
                    correlation_id: 43,
                    publisher_id: 1,
                    reference: None,
                    stream: "x-none".into(),
                },
                R::QueryOffset {
                    correlation_id: 44,
                    reference: "r".into(),
                    stream: "x-none".into(),
                },
                R::Delete {
                    correlation_id: 45,
                    stream: "w-none".into(),
                },
            ],
            3,
        ));
        assert_eq!(
            f,
            vec![
                (key::DECLARE_PUBLISHER | 0x8000, 43, code::ACCESS_REFUSED),
                (key::QUERY_OFFSET | 0x8000, 44, code::ACCESS_REFUSED),
                (key::DELETE | 0x8000, 45, code::STREAM_DOES_NOT_EXIST),
            ]
        );
        drop(s);
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn create_arguments_map_to_queue_arguments() {
        let t = create_arguments(&[
            ("max-length-bytes".into(), "1000".into()),
            ("max-age".into(), "1h".into()),
        ])
        .expect("valid");
        assert_eq!(t.get("x-queue-type"), Some(&FieldValue::string("stream")));
        assert_eq!(t.get("x-max-length-bytes"), Some(&FieldValue::I64(1000)));
        // Keys RabbitMQ does not know are ignored; bad values of those it
        // knows refused.
        let t = create_arguments(&[("bogus".into(), "1".into())]).expect("ignored");
        assert_eq!(t.iter().count(), 1, "only the type");
        for (k, v) in [
            ("max-length-bytes", "x"),
            ("initial-cluster-size", "0"),
            ("stream-filter-size-bytes", "8"),
            ("queue-leader-locator", "min-masters"),
            ("max-age", "10X"),
        ] {
            assert!(
                create_arguments(&[(k.into(), v.into())]).is_none(),
                "{k}={v}"
            );
        }
        let t =
            create_arguments(&[("stream-filter-size-bytes".into(), "32".into())]).expect("valid");
        assert_eq!(
            t.get("x-stream-filter-size-bytes"),
            Some(&FieldValue::I64(32))
        );
        assert_eq!(negotiate(0, 5), 5);
        assert_eq!(negotiate(7, 5), 5);
        assert_eq!(negotiate(7, 0), 7);
    }
}
