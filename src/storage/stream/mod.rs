//! Streams: append-only logs of messages that consumers read from any offset
//! and that nothing deletes on ack, in store-owned segment files.
//!
//! A [`StreamStore`] owns `<data_dir>/streams/` and one flusher thread for all
//! its streams. A [`StreamLog`] is one stream: [`StreamLog::append`] assigns
//! offsets (and drops publisher duplicates) at once and buffers the messages;
//! the flusher turns each stream's buffer into chunks ([`chunk`], RabbitMQ's
//! osiris format), writes them to the stream's active segment and its index
//! ([`segment`]) and advances each stream's *committed* offset (a `watch`):
//! readers only see chunks below it, whole in the files (the page cache);
//! then it fdatasyncs every file it wrote in one round (group commit) and
//! advances each stream's *durable* offset (another `watch`): publishers are
//! confirmed below it. So consumers see a chunk without waiting for the disk
//! (as on RabbitMQ, whose stream writer does not fsync), and a confirm still
//! means fsynced. [`StreamStore::on_durable`] runs a callback once
//! everything appended before the call is fsynced (AMQP publisher confirms).
//!
//! Publisher sequences (deduplication) travel in the trailer of the chunk
//! that stores the messages; consumer offsets (`store_offset`) in tracking
//! delta chunks; each new segment starts with a tracking snapshot of both, so
//! recovery reads only the last segment (and the first/last index records of
//! the others). Retention drops whole closed segments, with `now` passed in.
//!
//! Memory per stream is a few words per segment plus what waits to be
//! written; nothing per stored message.

pub mod chunk;
pub mod retention;
mod segment;
#[cfg(test)]
mod tests;

pub use chunk::MergeLimits;
pub use retention::{parse_age, Retention, DEFAULT_MAX_SEGMENT_SIZE};

use bytes::{Bytes, BytesMut};
use chunk::Header;
use parking_lot::{Condvar, Mutex};
use segment::{read_at_most, Index, IndexRecord, SegmentInfo};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Where a reader starts: the Stream protocol's offset specification, which the
/// AMQP 0-9-1 `x-stream-offset` argument is also read into.
pub use crate::wire::stream::OffsetSpec;
pub use crate::wire::stream::SubBatch;

/// One message to append.
#[derive(Debug, Clone)]
pub struct StreamMessage {
    /// The AMQP 1.0 encoded message.
    pub data: Bytes,
    /// Its filter value (stream filtering).
    pub filter: Option<String>,
    /// (publisher reference, publishing id): deduplicated against the last id
    /// stored for the reference.
    pub publisher: Option<(Arc<str>, u64)>,
    /// Set when `data` is a Stream protocol sub-entry batch: stored as one
    /// entry holding `records` messages (one offset each).
    pub batch: Option<SubBatch>,
}

/// What an append did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Appended {
    /// Offset of the first message written (= `next_offset` if none was).
    pub first_offset: u64,
    /// The stream's next offset after this append.
    pub next_offset: u64,
    /// Indexes (in the batch) of duplicates: not written, to be confirmed anyway.
    pub duplicates: Vec<usize>,
}

/// Counters of one stream, for the admin API.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamStats {
    pub segments: u64,
    /// Bytes in segment files.
    pub bytes: u64,
    pub first_offset: u64,
    /// First offset of the last chunk written (0 when empty).
    pub last_offset: u64,
    /// Offsets below this are fsynced and readable.
    pub committed_offset: u64,
    pub chunks: u64,
    /// Messages kept (offsets from first to committed).
    pub messages: u64,
    /// Timestamp of the oldest kept chunk (0 when empty).
    pub first_timestamp: i64,
}

#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum StreamError {
    #[error("stream I/O error: {0}")]
    Io(String),
    #[error("the stream is deleted")]
    Deleted,
    #[error(
        "reference too long (publisher: {} bytes at most, consumer: {})",
        chunk::MAX_PUBLISHER_REFERENCE,
        chunk::MAX_REFERENCE
    )]
    ReferenceTooLong,
    #[error("the stream store is shut down")]
    Closed,
}

impl From<std::io::Error> for StreamError {
    fn from(e: std::io::Error) -> Self {
        StreamError::Io(e.to_string())
    }
}

/// A chunk read from a stream: header fields and the stored bytes.
#[derive(Debug, Clone)]
pub struct Chunk {
    pub first_offset: u64,
    pub num_entries: u16,
    pub num_records: u32,
    pub timestamp: i64,
    /// Header, data and trailer (osiris format; the bloom filter, which
    /// Stream protocol clients do not expect, is left out: send as it is).
    pub raw: Bytes,
    pub header: Header,
    /// The chunk's bloom filter of filter values (empty: none of its messages
    /// had one). Stored between header and data, left out of `raw`.
    pub bloom: Bytes,
}

impl Chunk {
    /// The data section (the entries).
    pub fn data(&self) -> Bytes {
        let at = chunk::HEADER_LEN;
        self.raw.slice(at..at + self.header.data_len as usize)
    }

    /// Whether the chunk may hold a message a filtering consumer wants (one
    /// whose filter value is in `values`, or one without a value if
    /// `match_unfiltered`): false means it certainly does not (skip it).
    pub fn may_match<S: AsRef<str>>(&self, values: &[S], match_unfiltered: bool) -> bool {
        may_match(&self.bloom, values, match_unfiltered)
    }

    /// The messages with their offsets: each simple entry, and each record
    /// of a sub-batch entry (uncompressed or gzip; a batch of another codec
    /// is skipped, its offsets too, as RabbitMQ's AMQP 0-9-1 readers do).
    pub fn entries(&self) -> chunk::Records {
        chunk::Records::new(self.data(), self.first_offset)
    }
}

/// Whether a chunk with this bloom filter (empty: none of its messages had a
/// filter value) may hold a message a filtering consumer wants: see
/// [`Chunk::may_match`].
pub fn may_match<S: AsRef<str>>(bloom: &[u8], values: &[S], match_unfiltered: bool) -> bool {
    if bloom.is_empty() {
        return match_unfiltered;
    }
    values
        .iter()
        .any(|v| chunk::bloom_contains(bloom, v.as_ref()))
        || (match_unfiltered && chunk::bloom_contains(bloom, ""))
}

/// Where one chunk of a batch ([`StreamReader::read_batch`]) is in the
/// batch's buffer: its stored bytes start at `at` (header, bloom, data,
/// trailer, as in the segment file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkSpan {
    pub header: Header,
    pub at: usize,
    /// Delivered in one chunk with the span before ([`BatchLimits::merge`]).
    pub joins: bool,
    /// The header of the chunk it is delivered in, up to and with it (its
    /// own `header` when it is alone; the last span of a run holds the
    /// run's [`chunk::Merged`] header).
    pub delivered: Header,
}

impl ChunkSpan {
    /// The stored header (48 bytes).
    pub fn header_range(&self) -> std::ops::Range<usize> {
        self.at..self.at + chunk::HEADER_LEN
    }

    /// The bloom filter (empty: none).
    pub fn bloom_range(&self) -> std::ops::Range<usize> {
        let at = self.at + chunk::HEADER_LEN;
        at..at + usize::from(self.header.bloom_len)
    }

    /// The data section (the entries).
    pub fn data_range(&self) -> std::ops::Range<usize> {
        let at = self.bloom_range().end;
        at..at + self.header.data_len as usize
    }
}

/// What a reader is given to see each user chunk's bloom filter and say
/// whether it is wanted (stream filtering).
pub type Keep<'a> = &'a dyn Fn(&[u8]) -> bool;

/// One chunk of a [`StreamReader::locate_batch`]: its header and where its
/// data section is in its segment file (committed chunks never change, and
/// the open file keeps its bytes even once retention removes it).
#[derive(Debug, Clone)]
pub struct FileSpan {
    pub header: Header,
    /// The header as stored.
    pub raw_header: [u8; chunk::HEADER_LEN],
    pub file: Arc<File>,
    /// Where the data section starts in the file.
    pub data_pos: u64,
    /// Delivered in one chunk with the span before ([`BatchLimits::merge`]).
    pub joins: bool,
    /// As [`ChunkSpan::delivered`].
    pub delivered: Header,
}

/// What one [`StreamReader::read_batch`] may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// User chunks (a consumer's credit); with `merge`, chunks as delivered
    /// (each may be several stored ones).
    pub chunks: usize,
    /// Bytes read at once (a larger first chunk is still read whole).
    pub bytes: usize,
    /// Only what the page cache holds (`preadv2` with `RWF_NOWAIT`): never
    /// wait for the disk; [`BatchRead::WouldBlock`] instead.
    pub cached_only: bool,
    /// Consecutive chunks that may be delivered as one ([`chunk::Merged`]):
    /// marked [`ChunkSpan::joins`] / [`FileSpan::joins`].
    pub merge: Option<MergeLimits>,
}

/// Whether a stored chunk starts a delivered chunk or joins the one before
/// ([`BatchLimits::merge`]), counting the delivered chunks of one read.
struct Groups {
    limits: Option<MergeLimits>,
    current: Option<chunk::Merged>,
    count: usize,
}

impl Groups {
    fn new(limits: Option<MergeLimits>) -> Groups {
        Groups {
            limits,
            current: None,
            count: 0,
        }
    }

    /// Whether `h` joins the delivered chunk before it.
    fn joins(&self, h: &Header) -> bool {
        match (&self.current, &self.limits) {
            (Some(m), Some(l)) => m.fits(h, l),
            _ => false,
        }
    }

    /// Take `h` (after [`joins`](Self::joins) said `joins`): the header of
    /// the delivered chunk it is in, so far.
    fn take(&mut self, h: &Header, joins: bool) -> Header {
        match &mut self.current {
            Some(m) if joins => {
                m.add(h);
                m.header
            }
            _ => {
                self.count += 1;
                self.current = self.limits.map(|_| chunk::Merged::new(h));
                *h
            }
        }
    }

    /// Whether `h` would start a delivered chunk past `limit` of them. A
    /// tracking chunk starts none (it is not sent, and a user chunk after it
    /// may still join the one before it).
    fn starts_past(&self, h: &Header, joins: bool, limit: usize) -> bool {
        !joins && h.chunk_type == chunk::TYPE_USER && self.count >= limit
    }

    /// A stored chunk was passed over: nothing joins across it.
    fn skip(&mut self) {
        self.current = None;
    }
}

/// How a [`StreamReader::read_batch`] ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchRead {
    /// The spans hold what was read (none: caught up with the committed offset).
    Read,
    /// `cached_only` and the bytes are not in the page cache (or a file must
    /// be opened): nothing was read, call again with `cached_only` off on a
    /// thread that may block.
    WouldBlock,
}

type Callback = Box<dyn FnOnce(Result<(), StreamError>) + Send>;

/// The streams of one data directory and their flusher thread.
#[derive(Clone)]
pub struct StreamStore {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for StreamStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamStore")
            .field("dir", &self.shared.dir)
            .finish()
    }
}

struct Shared {
    dir: PathBuf,
    queue: Mutex<FlushQueue>,
    wake: Condvar,
    /// Bumped by every append and tracking write (after it is buffered).
    appended: AtomicU64,
    /// The `appended` value whose writes are all fsynced.
    synced: AtomicU64,
    waiters: Mutex<Waiters>,
    /// Message bytes appended and not yet taken by the flusher (all streams).
    pending_bytes: AtomicU64,
    /// Notified when the flusher takes buffers (room for more).
    room: tokio::sync::Notify,
    /// A publisher appended before its earlier messages were confirmed
    /// since the flusher last took the buffers ([`Linger`]).
    pipelined: std::sync::atomic::AtomicBool,
}

/// The callbacks of [`StreamStore::on_durable`] that wait for an fsync.
#[derive(Default)]
struct Waiters {
    /// In the order they came, each with the `appended` value it waits for.
    list: Vec<(u64, Callback)>,
    /// The flusher is calling callbacks it took from `list`: a later one
    /// must not run before them ([`answer_waiters`]).
    draining: bool,
}

/// Past this many buffered bytes, producers wait ([`StreamStore::ready`]).
const MAX_PENDING_BYTES: u64 = 64 << 20;

#[derive(Default)]
struct FlushQueue {
    dirty: Vec<Arc<LogInner>>,
    shutdown: bool,
}

impl StreamStore {
    /// Open (creating) `dir` as the streams directory and start the flusher.
    pub fn open(dir: &Path) -> Result<StreamStore, StreamError> {
        std::fs::create_dir_all(dir)?;
        let shared = Arc::new(Shared {
            dir: dir.to_path_buf(),
            queue: Mutex::new(FlushQueue::default()),
            wake: Condvar::new(),
            appended: AtomicU64::new(0),
            synced: AtomicU64::new(0),
            waiters: Mutex::new(Waiters::default()),
            pending_bytes: AtomicU64::new(0),
            room: tokio::sync::Notify::new(),
            pipelined: std::sync::atomic::AtomicBool::new(false),
        });
        let s = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("warren-streams".into())
            .spawn(move || flusher(s))?;
        Ok(StreamStore { shared })
    }

    /// The directory of the stream stored under `key` (e.g. `vhost \0 name`).
    fn log_dir(&self, key: &str) -> PathBuf {
        use sha2::Digest;
        let hash = sha2::Sha256::digest(key.as_bytes());
        let hex: String = hash[..16].iter().map(|b| format!("{b:02x}")).collect();
        self.shared.dir.join(hex)
    }

    /// Open (creating or recovering) the stream stored under `key`.
    pub fn open_log(&self, key: &str, retention: Retention) -> Result<Arc<StreamLog>, StreamError> {
        let dir = self.log_dir(key);
        std::fs::create_dir_all(&dir)?;
        let inner = recover(&dir, key, retention)?;
        Ok(Arc::new(StreamLog {
            inner: Arc::new(inner),
            store: Arc::clone(&self.shared),
        }))
    }

    /// Remove the files of the stream stored under `key` (a deleted stream).
    pub fn remove_log(&self, key: &str) {
        let dir = self.log_dir(key);
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::error!(dir = %dir.display(), error = %e, "cannot remove a deleted stream's files");
            }
        }
    }

    /// Call `f` once everything appended to any stream before this call is
    /// fsynced (at once if nothing waits).
    /// Callbacks run in the order of their calls: one is run at once only
    /// when no earlier one waits or is being run (a publisher's confirms,
    /// forwarded from another node one request after the other, came out of
    /// order when a later request found its data synced while the flusher
    /// had yet to answer an earlier one).
    pub fn on_durable(&self, f: Callback) {
        let target = self.shared.appended.load(Ordering::SeqCst);
        let mut w = self.shared.waiters.lock();
        if self.shared.synced.load(Ordering::SeqCst) >= target && w.list.is_empty() && !w.draining {
            drop(w);
            return f(Ok(()));
        }
        w.list.push((target, f));
    }

    /// Bytes appended to the streams and not yet written out (their write
    /// buffers, in memory).
    pub fn pending_bytes(&self) -> u64 {
        self.shared.pending_bytes.load(Ordering::Relaxed)
    }

    /// Whether the write buffers are below their limit (cheap: no lock).
    pub fn has_room(&self) -> bool {
        self.shared.pending_bytes.load(Ordering::Relaxed) < MAX_PENDING_BYTES
    }

    /// Resolves once the write buffers are below their limit: a producer
    /// (a connection reading publishes) awaits this before taking more input.
    pub async fn ready(&self) {
        loop {
            if self.has_room() {
                return;
            }
            let notified = self.shared.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.has_room() {
                return;
            }
            notified.await;
        }
    }

    /// Stop the flusher after it writes what is buffered.
    pub fn shutdown(&self) {
        self.shared.queue.lock().shutdown = true;
        self.shared.wake.notify_all();
    }
}

/// One stream.
pub struct StreamLog {
    inner: Arc<LogInner>,
    store: Arc<Shared>,
}

impl std::fmt::Debug for StreamLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamLog")
            .field("key", &self.inner.key)
            .finish()
    }
}

struct LogInner {
    dir: PathBuf,
    key: String,
    state: Mutex<LogState>,
    writer: Mutex<Writer>,
    committed: tokio::sync::watch::Sender<u64>,
    /// The next offset not yet fsynced (at most `committed`).
    durable: tokio::sync::watch::Sender<u64>,
    /// Set once by [`StreamLog::mark_deleted`] (`LogState::deleted` too),
    /// read without the lock by connections woken through `committed`.
    deleted: std::sync::atomic::AtomicBool,
}

/// Messages appended and not yet taken by the flusher: their entries
/// encoded as a chunk stores them, back to back (a chunk's data section is
/// then a slice of `data`: no per-message structure, allocation or second
/// copy), and per append what the chunk headers, bloom filters and
/// trailers need.
#[derive(Default)]
struct Pending {
    data: BytesMut,
    appends: Vec<AppendMeta>,
}

/// One append's entries in [`Pending::data`] (one publisher reference).
struct AppendMeta {
    /// Where its entries end in `data`.
    end: usize,
    entries: u32,
    records: u64,
    timestamp: i64,
    /// Each entry's filter value; empty when none had one.
    filters: Vec<Option<String>>,
    /// The publisher reference and each entry's publishing id (increasing:
    /// duplicates are dropped before).
    reference: Option<Arc<str>>,
    ids: Vec<u64>,
}

/// One message for [`StreamLog::append_from`], borrowed from where it came.
#[derive(Debug, Clone, Copy)]
pub struct NewMessage<'a> {
    /// The AMQP 1.0 encoded message (a sub-entry batch's records).
    pub data: &'a [u8],
    pub filter: Option<&'a str>,
    /// Deduplicated against the reference's last id when the append has one.
    pub publishing_id: u64,
    pub batch: Option<SubBatch>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.appends.is_empty()
    }

    /// Encode `msgs` (stamped `timestamp`, published under `reference`)
    /// after what is buffered. With a reference, a publishing id at or
    /// below its last one in `sequences` (updated) is a duplicate: dropped,
    /// its index plus `base` in `duplicates`. Returns the records added.
    fn push<'a>(
        &mut self,
        reference: Option<&Arc<str>>,
        msgs: impl IntoIterator<Item = NewMessage<'a>>,
        timestamp: i64,
        sequences: &mut HashMap<Arc<str>, u64>,
        (duplicates, base): (&mut Vec<usize>, usize),
    ) -> u64 {
        let mut meta = AppendMeta {
            end: 0,
            entries: 0,
            records: 0,
            timestamp,
            filters: Vec::new(),
            reference: reference.cloned(),
            ids: Vec::new(),
        };
        let mut last = reference.and_then(|r| sequences.get(r).copied());
        let before = last;
        for (i, m) in msgs.into_iter().enumerate() {
            if reference.is_some() {
                if last.is_some_and(|l| m.publishing_id <= l) {
                    duplicates.push(base + i);
                    continue;
                }
                last = Some(m.publishing_id);
                meta.ids.push(m.publishing_id);
            }
            match &m.batch {
                None => chunk::put_simple_entry(&mut self.data, m.data),
                Some(b) => chunk::put_sub_batch_entry(&mut self.data, b, m.data),
            }
            if m.filter.is_some() || !meta.filters.is_empty() {
                // The entries before the first with a value had none.
                meta.filters.resize(meta.entries as usize, None);
                meta.filters.push(m.filter.map(str::to_owned));
            }
            meta.records += m.batch.map_or(1, |b| u64::from(b.records));
            meta.entries += 1;
        }
        if let (Some(r), Some(l)) = (reference, last) {
            if before != last {
                sequences.insert(Arc::clone(r), l);
            }
        }
        let records = meta.records;
        if meta.entries > 0 {
            meta.end = self.data.len();
            self.appends.push(meta);
        }
        records
    }
}

struct LogState {
    /// Offset the next appended message gets.
    next_offset: u64,
    pending: Pending,
    pending_offsets: Vec<(String, u64)>,
    /// Last publishing id per reference, appended ones included.
    sequences: HashMap<Arc<str>, u64>,
    /// Stored consumer offsets, pending ones included.
    offsets: HashMap<String, u64>,
    /// The segments (a copy of the writer's, for readers and stats).
    segments: Vec<SegmentInfo>,
    /// First offset of the last chunk written.
    last_chunk: u64,
    queued: bool,
    deleted: bool,
    retention: Retention,
}

struct Writer {
    /// The active segment: (first offset, segment file, index file).
    active: Option<(u64, File, File)>,
    segments: Vec<SegmentInfo>,
    /// What is written to the files (the snapshot a new segment starts with).
    sequences: HashMap<String, (u64, u64)>,
    offsets: HashMap<String, u64>,
    next: u64,
    last_timestamp: i64,
    last_chunk: u64,
    /// A write failed: nothing more is written to this stream.
    failed: Option<StreamError>,
    /// Files written this round, to fsync.
    dirty: bool,
    /// How many entries the next user chunk takes at most.
    batch: Batch,
    /// The active segment is of the format before this one (written by an
    /// older version): the next chunk starts a new segment.
    legacy: bool,
}

/// Most entries (and data bytes, roughly) in one chunk.
const CHUNK_MAX_ENTRIES: usize = u16::MAX as usize;
const CHUNK_TARGET_BYTES: usize = 1 << 20;

impl StreamLog {
    /// Append `msgs` (offsets assigned now, in order) stamped `timestamp_ms`;
    /// they become readable once committed.
    pub fn append(
        &self,
        msgs: Vec<StreamMessage>,
        timestamp_ms: i64,
    ) -> Result<Appended, StreamError> {
        if msgs.iter().any(|m| {
            m.publisher
                .as_ref()
                .is_some_and(|(r, _)| r.len() > chunk::MAX_PUBLISHER_REFERENCE)
        }) {
            return Err(StreamError::ReferenceTooLong);
        }
        // One append per run of messages with the same publisher reference.
        let mut runs: Vec<(usize, usize)> = Vec::new();
        for (i, m) in msgs.iter().enumerate() {
            let r = m.publisher.as_ref().map(|(r, _)| r);
            match runs.last_mut() {
                Some((start, end)) if msgs[*start].publisher.as_ref().map(|(r, _)| r) == r => {
                    *end = i + 1
                }
                _ => runs.push((i, i + 1)),
            }
        }
        self.append_runs(
            runs.iter().map(|&(start, end)| {
                let reference = msgs[start].publisher.as_ref().map(|(r, _)| r);
                let it = msgs[start..end].iter().map(|m| NewMessage {
                    data: &m.data,
                    filter: m.filter.as_deref(),
                    publishing_id: m.publisher.as_ref().map_or(0, |(_, id)| *id),
                    batch: m.batch,
                });
                (reference, start, it)
            }),
            timestamp_ms,
            false,
        )
    }

    /// Append `msgs`, published under `reference` (publisher deduplication:
    /// an id at or below the reference's last one is dropped, its index in
    /// [`Appended::duplicates`]), stamped `timestamp_ms`: as
    /// [`append`](Self::append), with the messages borrowed (a publish
    /// frame's, encoded straight into the write buffer). `pipelined`: the
    /// publisher sends this before its earlier messages are confirmed (it
    /// does not wait for each confirm): sustained load, for which the
    /// flusher lingers to cut larger chunks ([`Linger`]).
    pub fn append_from<'a>(
        &self,
        reference: Option<&Arc<str>>,
        msgs: impl IntoIterator<Item = NewMessage<'a>>,
        timestamp_ms: i64,
        pipelined: bool,
    ) -> Result<Appended, StreamError> {
        if reference.is_some_and(|r| r.len() > chunk::MAX_PUBLISHER_REFERENCE) {
            return Err(StreamError::ReferenceTooLong);
        }
        self.append_runs(
            std::iter::once((reference, 0, msgs)),
            timestamp_ms,
            pipelined,
        )
    }

    fn append_runs<'a, 'r, I: IntoIterator<Item = NewMessage<'a>>>(
        &self,
        runs: impl Iterator<Item = (Option<&'r Arc<str>>, usize, I)>,
        timestamp_ms: i64,
        pipelined: bool,
    ) -> Result<Appended, StreamError> {
        let mut s = self.inner.state.lock();
        if s.deleted {
            return Err(StreamError::Deleted);
        }
        if pipelined {
            self.store.pipelined.store(true, Ordering::Relaxed);
        }
        let first = s.next_offset;
        let mut duplicates = Vec::new();
        let before_len = s.pending.data.len();
        let st = &mut *s;
        for (reference, base, msgs) in runs {
            st.next_offset += st.pending.push(
                reference,
                msgs,
                timestamp_ms,
                &mut st.sequences,
                (&mut duplicates, base),
            );
        }
        let bytes = (s.pending.data.len() - before_len) as u64;
        let first_offset = if s.next_offset == first {
            s.next_offset
        } else {
            first
        };
        let before = self.store.pending_bytes.fetch_add(bytes, Ordering::Relaxed);
        if before < LINGER.min_bytes && before + bytes >= LINGER.min_bytes {
            // A lingering flusher waits for this much.
            self.store.wake.notify_one();
        }
        let out = Appended {
            first_offset,
            next_offset: s.next_offset,
            duplicates,
        };
        self.queue_locked(&mut s);
        Ok(out)
    }

    /// Hand this stream to the flusher (once) and count the write.
    fn queue_locked(&self, s: &mut LogState) {
        if !s.queued {
            s.queued = true;
            self.store.queue.lock().dirty.push(Arc::clone(&self.inner));
            self.store.wake.notify_one();
        }
        self.store.appended.fetch_add(1, Ordering::SeqCst);
    }

    /// Follow the committed next offset: every offset below it is written
    /// and readable (not necessarily fsynced yet: [`durable`](Self::durable)).
    pub fn committed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.committed.subscribe()
    }

    /// Follow the durable next offset: every offset below it is fsynced
    /// (what publisher confirms wait for).
    pub fn durable(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.durable.subscribe()
    }

    /// A reader starting at `spec`, resolved against the log as this call
    /// finds it, messages appended and not yet written included: `next` is
    /// after them, and `last` is resolved once they are committed (the chunk
    /// that holds the newest of them). So a subscription made after a publish
    /// was taken, on whatever connection, sees the log with that publish.
    pub fn reader(&self, spec: OffsetSpec) -> StreamReader {
        let committed_rx = self.inner.committed.subscribe();
        let committed = *committed_rx.borrow();
        let appended = self.next_offset();
        let mut last_after = None;
        let next = match spec {
            OffsetSpec::Next => appended.max(committed),
            OffsetSpec::Last if appended > committed => {
                last_after = Some(appended);
                committed
            }
            spec => self.inner.resolve_or_next(spec, committed),
        };
        StreamReader {
            log: Arc::clone(&self.inner),
            committed: committed_rx,
            start: next,
            next,
            last_after,
            file: None,
            peek: None,
            index: None,
        }
    }
}

impl LogInner {
    /// [`resolve`](Self::resolve), or `committed` (logged) when the index
    /// cannot be read.
    fn resolve_or_next(&self, spec: OffsetSpec, committed: u64) -> u64 {
        match self.resolve(spec, committed) {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(stream = %self.key, error = %e, "cannot resolve an offset; reading from the next one");
                committed
            }
        }
    }

    fn resolve(&self, spec: OffsetSpec, committed: u64) -> Result<u64, StreamError> {
        let segments = self.state.lock().segments.clone();
        let first = segments.first().map_or(committed, |s| s.first_offset);
        Ok(match spec {
            OffsetSpec::First => first,
            OffsetSpec::Next => committed,
            OffsetSpec::Offset(n) => n.clamp(first, committed.max(first)),
            OffsetSpec::Last => {
                for seg in segments.iter().rev() {
                    let idx = Index::open(&segment::index_path(&self.dir, seg.first_offset))?;
                    for i in (0..idx.count()?).rev() {
                        let r = idx.read(i)?;
                        if r.chunk_type == chunk::TYPE_USER && r.chunk_id < committed {
                            return Ok(r.chunk_id);
                        }
                    }
                }
                committed
            }
            OffsetSpec::Timestamp(t) => {
                let Some(seg) = segments
                    .iter()
                    .find(|s| s.chunks > 0 && s.last_timestamp >= t)
                else {
                    return Ok(committed);
                };
                let idx = Index::open(&segment::index_path(&self.dir, seg.first_offset))?;
                let n = idx.count()?;
                let i = idx.search(n, |r| r.timestamp >= t)?;
                if i == n {
                    committed
                } else {
                    idx.read(i)?.chunk_id.min(committed)
                }
            }
        })
    }
}

impl StreamLog {
    /// The oldest offset kept.
    pub fn first_offset(&self) -> u64 {
        let s = self.inner.state.lock();
        s.segments
            .first()
            .map_or(*self.inner.committed.borrow(), |seg| seg.first_offset)
    }

    /// The offset the next appended message gets.
    pub fn next_offset(&self) -> u64 {
        self.inner.state.lock().next_offset
    }

    /// The last publishing id stored (or appended) for `reference`; 0 if none.
    pub fn publisher_sequence(&self, reference: &str) -> u64 {
        self.inner
            .state
            .lock()
            .sequences
            .get(reference)
            .copied()
            .unwrap_or(0)
    }

    /// Store a consumer's offset under `reference` (durable with the next flush).
    pub fn store_offset(&self, reference: &str, offset: u64) -> Result<(), StreamError> {
        if reference.len() > chunk::MAX_REFERENCE {
            return Err(StreamError::ReferenceTooLong);
        }
        let mut s = self.inner.state.lock();
        if s.deleted {
            return Err(StreamError::Deleted);
        }
        s.offsets.insert(reference.to_string(), offset);
        s.pending_offsets.push((reference.to_string(), offset));
        self.queue_locked(&mut s);
        Ok(())
    }

    /// The offset stored under `reference`, if any.
    pub fn query_offset(&self, reference: &str) -> Option<u64> {
        self.inner.state.lock().offsets.get(reference).copied()
    }

    /// Every stored consumer offset, (reference, offset), by reference.
    pub fn stored_offsets(&self) -> Vec<(String, u64)> {
        let mut v: Vec<(String, u64)> = self
            .inner
            .state
            .lock()
            .offsets
            .iter()
            .map(|(k, o)| (k.clone(), *o))
            .collect();
        v.sort();
        v
    }

    pub fn stats(&self) -> StreamStats {
        let committed = *self.inner.committed.borrow();
        let s = self.inner.state.lock();
        let first = s.segments.first().map_or(committed, |seg| seg.first_offset);
        StreamStats {
            segments: s.segments.len() as u64,
            bytes: s.segments.iter().map(|seg| seg.size).sum(),
            first_offset: first,
            last_offset: s.last_chunk,
            committed_offset: committed,
            chunks: s.segments.iter().map(|seg| seg.chunks).sum(),
            messages: committed.saturating_sub(first),
            first_timestamp: s
                .segments
                .iter()
                .find(|seg| seg.chunks > 0)
                .map_or(0, |seg| seg.first_timestamp),
        }
    }

    /// The retention settings in force.
    pub fn retention(&self) -> Retention {
        self.inner.state.lock().retention
    }

    /// Change the retention settings (a policy changed); applied at the next
    /// [`apply_retention`](Self::apply_retention) and segment roll.
    pub fn set_retention(&self, r: Retention) {
        self.inner.state.lock().retention = r;
    }

    /// Drop the oldest closed segments that retention no longer keeps, as of
    /// `now_ms`. Returns how many were dropped.
    pub fn apply_retention(&self, now_ms: i64) -> usize {
        let mut w = self.inner.writer.lock();
        let r = self.inner.state.lock().retention;
        let mut total: u64 = w.segments.iter().map(|s| s.size).sum();
        let mut dropped = 0;
        while w.segments.len() > 1 {
            let oldest = &w.segments[0];
            let too_big = r.max_bytes.is_some_and(|m| total > m);
            let too_old = r.max_age_ms.is_some_and(|age| {
                oldest.chunks > 0 && oldest.last_timestamp.saturating_add(age as i64) < now_ms
            });
            if !(too_big || too_old) {
                break;
            }
            let seg = w.segments.remove(0);
            total -= seg.size;
            dropped += 1;
            // Readers stop picking it before its files go.
            let segments = w.segments.clone();
            self.inner.state.lock().segments = segments;
            for p in [
                segment::segment_path(&self.inner.dir, seg.first_offset),
                segment::index_path(&self.inner.dir, seg.first_offset),
            ] {
                if let Err(e) = std::fs::remove_file(&p) {
                    tracing::error!(file = %p.display(), error = %e, "cannot remove a stream segment");
                }
            }
        }
        dropped
    }

    /// Whether retention has anything to look at (more than one segment).
    pub fn has_closed_segments(&self) -> bool {
        self.inner.state.lock().segments.len() > 1
    }

    /// The stream was deleted: refuse appends and stop writing. The files are
    /// removed by [`StreamStore::remove_log`]. Whoever follows `committed`
    /// is woken, to see [`StreamLog::is_deleted`] at once.
    pub fn mark_deleted(&self) {
        {
            let mut s = self.inner.state.lock();
            s.deleted = true;
            let bytes = s.pending.data.len() as u64;
            self.store.pending_bytes.fetch_sub(bytes, Ordering::Relaxed);
            self.store.room.notify_waiters();
            s.pending = Pending::default();
            s.pending_offsets.clear();
        }
        self.inner.deleted.store(true, Ordering::Release);
        self.inner.committed.send_modify(|_| {});
        self.inner.durable.send_modify(|_| {});
    }

    /// Whether the stream was deleted.
    pub fn is_deleted(&self) -> bool {
        self.inner.deleted.load(Ordering::Acquire)
    }

    /// Wait (blocking) until everything appended so far is committed and
    /// fsynced; for tests and shutdown.
    pub fn wait_committed_blocking(&self) {
        let target = self.next_offset();
        let mut rx = self.durable();
        while *rx.borrow_and_update() < target {
            if self.inner.state.lock().deleted {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

/// Reads a stream's committed chunks in order, from the files.
pub struct StreamReader {
    log: Arc<LogInner>,
    committed: tokio::sync::watch::Receiver<u64>,
    /// Where the reader started (entries of the first chunk below it are
    /// before the requested offset).
    start: u64,
    /// Offset of the next chunk to return.
    next: u64,
    /// Started at `last` while messages were appended and not committed: the
    /// offset they end at. Until it is committed the reader reads nothing;
    /// then it starts at the last chunk ([`StreamReader::settle`]).
    last_after: Option<u64>,
    /// (segment first offset, open segment file, position of the next chunk).
    file: Option<(u64, Arc<File>, u64)>,
    /// The start of the next chunk (header and bloom filter), read ahead
    /// with the last bytes of the one before ([`locate_batch`](Self::locate_batch)).
    peek: Option<Peek>,
    /// The records of the segment being read, read ahead from its index.
    index: Option<Cursor>,
}

/// Where a located span's chunk is, and whether its last data byte was
/// read from the page cache ([`StreamReader::locate_batch`]).
struct SpanAt {
    seg: u64,
    pos: u64,
    probed: bool,
}

/// Index records a [`Cursor`] reads at once (a page of a version 2 index).
const CURSOR_AHEAD: usize = 64;

/// The records of one segment's index (of version 2: they hold the chunks'
/// headers), read ahead a page at a time.
struct Cursor {
    seg: u64,
    index: Index,
    ahead: std::collections::VecDeque<IndexRecord>,
    /// The number of the record after those read.
    next: u64,
}

impl Cursor {
    fn open(seg: u64, index: Index) -> Option<Cursor> {
        index.holds_headers().then(|| Cursor {
            seg,
            index,
            ahead: Default::default(),
            next: 0,
        })
    }

    /// The stored header of the committed chunk at `pos`; None if the index
    /// cannot tell (then the segment is read).
    fn at(&mut self, pos: u64, committed: u64) -> Option<[u8; chunk::HEADER_LEN]> {
        let mut sought = false;
        loop {
            while self.ahead.front().is_some_and(|r| r.pos < pos) {
                self.ahead.pop_front();
            }
            match self.ahead.front() {
                Some(r) if r.pos == pos => return r.raw_header,
                Some(_) if sought => return None,
                Some(_) => {}
                None => {
                    let read = self
                        .index
                        .read_run(self.next, CURSOR_AHEAD, committed, &mut self.ahead)
                        .ok()?;
                    self.next += read as u64;
                    if read == 0 {
                        return None;
                    }
                    if self.ahead.back().is_some_and(|r| r.pos >= pos) {
                        continue;
                    }
                    if sought {
                        return None;
                    }
                }
            }
            // `pos` is not where the records read are: look it up.
            sought = true;
            self.ahead.clear();
            let n = self.index.count().ok()?;
            self.next = self.index.search(n, |r| r.pos >= pos).ok()?;
        }
    }
}

/// Bytes read ahead at (segment, position): a chunk's header and at most
/// 255 bytes of bloom filter.
struct Peek {
    seg: u64,
    pos: u64,
    len: usize,
    bytes: [u8; chunk::HEADER_LEN + 255],
}

impl Peek {
    /// What was read ahead at (`seg`, `pos`): `read`, at most a header and
    /// 255 bytes of bloom filter.
    fn of(seg: u64, pos: u64, read: &[u8]) -> Peek {
        let mut bytes = [0u8; chunk::HEADER_LEN + 255];
        bytes[..read.len()].copy_from_slice(read);
        Peek {
            seg,
            pos,
            len: read.len(),
            bytes,
        }
    }
}

/// The most trailer bytes read through to reach the next chunk's header.
const PEEK_TRAILER_MAX: usize = 1024;

impl std::fmt::Debug for StreamReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamReader")
            .field("stream", &self.log.key)
            .field("next", &self.next)
            .finish()
    }
}

impl StreamReader {
    /// The offset the reader was asked to start at (resolved): entries of the
    /// first chunk below it come before it.
    pub fn start(&self) -> u64 {
        self.start
    }

    /// The offset of the next chunk this reader returns.
    pub fn position(&self) -> u64 {
        self.next
    }

    /// Follow the stream's committed offset (to wait for new chunks).
    pub fn committed(&self) -> tokio::sync::watch::Receiver<u64> {
        self.committed.clone()
    }

    /// The next committed user chunk; None when caught up with the committed
    /// offset (wait on [`committed`](Self::committed) and call again).
    pub fn next_chunk(&mut self) -> Result<Option<Chunk>, StreamError> {
        if !self.settle() {
            return Ok(None);
        }
        loop {
            let committed = *self.committed.borrow_and_update();
            if self.next >= committed {
                return Ok(None);
            }
            if self.file.is_none() {
                self.locate()?;
            }
            let Some((seg_first, file, pos)) = &mut self.file else {
                return Ok(None);
            };
            let mut head = [0u8; chunk::HEADER_LEN];
            let n = read_at_most(file, &mut head, *pos)?;
            if n < chunk::HEADER_LEN {
                // The end of this segment: on to the next one.
                let cur = *seg_first;
                if !self.next_segment(cur) {
                    return Ok(None);
                }
                continue;
            }
            let h = Header::parse(&head)
                .ok_or_else(|| StreamError::Io(format!("bad chunk header at {}", *pos)))?;
            let mut raw = vec![0u8; h.total_len() as usize];
            file.read_exact_at(&mut raw, *pos)?;
            *pos += h.total_len();
            self.next = h.next_offset().max(self.next);
            if h.chunk_type != chunk::TYPE_USER {
                continue;
            }
            let bloom_end = chunk::HEADER_LEN + usize::from(h.bloom_len);
            let bloom = Bytes::copy_from_slice(&raw[chunk::HEADER_LEN..bloom_end]);
            raw.drain(chunk::HEADER_LEN..bloom_end);
            return Ok(Some(Chunk {
                bloom,
                first_offset: h.first_offset,
                num_entries: h.num_entries,
                num_records: h.num_records,
                timestamp: h.timestamp,
                raw: Bytes::from(raw),
                header: h,
            }));
        }
    }

    /// Whether committed chunks wait to be read.
    pub fn has_more(&self) -> bool {
        let committed = *self.committed.borrow();
        match self.last_after {
            Some(t) => committed >= t,
            None => self.next < committed,
        }
    }

    /// A reader started at `last` before the appends it waits for were
    /// committed: false while they are not; once they are, it starts at
    /// the last chunk (true).
    fn settle(&mut self) -> bool {
        let Some(t) = self.last_after else {
            return true;
        };
        let committed = *self.committed.borrow();
        if committed < t {
            return false;
        }
        self.last_after = None;
        self.next = self.log.resolve_or_next(OffsetSpec::Last, committed);
        self.start = self.start.min(self.next);
        self.file = None;
        self.peek = None;
        self.index = None;
        true
    }

    /// Read the next committed chunks that `keep` wants (it sees each user
    /// chunk's bloom filter; tracking chunks are skipped) with as few reads as
    /// it can: one `pread` of a contiguous range of the segment (`limits.bytes`,
    /// or the first chunk whole if it is larger) into `buf` (grown as needed,
    /// never shrunk, so a reused buffer costs no allocation), and the chunks
    /// whole in that range become `spans` (at most `limits.chunks`). Stops at
    /// the end of a segment (the next call goes on in the next one).
    pub fn read_batch(
        &mut self,
        buf: &mut Vec<u8>,
        spans: &mut Vec<ChunkSpan>,
        limits: BatchLimits,
        keep: &dyn Fn(&[u8]) -> bool,
    ) -> Result<BatchRead, StreamError> {
        spans.clear();
        if !self.settle() {
            return Ok(BatchRead::Read);
        }
        let mut groups = Groups::new(limits.merge);
        loop {
            let committed = *self.committed.borrow_and_update();
            if self.next >= committed || limits.chunks == 0 {
                return Ok(BatchRead::Read);
            }
            if self.file.is_none() {
                if limits.cached_only {
                    return Ok(BatchRead::WouldBlock);
                }
                self.locate()?;
            }
            let Some((seg_first, file, pos)) = &mut self.file else {
                return Ok(BatchRead::Read);
            };
            let want = limits.bytes.max(chunk::HEADER_LEN);
            if buf.len() < want {
                buf.resize(want, 0);
            }
            let Some(mut n) = read_into(file, &mut buf[..want], *pos, limits.cached_only)? else {
                return Ok(BatchRead::WouldBlock);
            };
            if n < chunk::HEADER_LEN {
                if limits.cached_only && n > 0 {
                    return Ok(BatchRead::WouldBlock);
                }
                // The end of this segment: on to the next one.
                if limits.cached_only {
                    return Ok(BatchRead::WouldBlock);
                }
                let cur = *seg_first;
                if !self.next_segment(cur) {
                    return Ok(BatchRead::Read);
                }
                continue;
            }
            let (mut at, mut next, mut p) = (0usize, self.next, *pos);
            let mut full = false;
            // Only committed chunks are whole on disk: look at none past it.
            while at + chunk::HEADER_LEN <= n && next < committed {
                let h = Header::parse(&buf[at..])
                    .ok_or_else(|| StreamError::Io(format!("bad chunk header at {p}")))?;
                let joins = groups.joins(&h);
                if groups.starts_past(&h, joins, limits.chunks) {
                    full = true;
                    break;
                }
                let total = h.total_len() as usize;
                if at + total > n {
                    if at > 0 {
                        break;
                    }
                    // One chunk larger than the range: read it whole.
                    if buf.len() < total {
                        buf.resize(total, 0);
                    }
                    match read_into(file, &mut buf[..total], p, limits.cached_only)? {
                        Some(m) if m == total => n = total,
                        _ if limits.cached_only => return Ok(BatchRead::WouldBlock),
                        _ => return Err(StreamError::Io(format!("short chunk at {p}"))),
                    }
                }
                let mut span = ChunkSpan {
                    header: h,
                    at,
                    joins,
                    delivered: h,
                };
                if h.chunk_type == chunk::TYPE_USER && keep(&buf[span.bloom_range()]) {
                    span.delivered = groups.take(&h, joins);
                    spans.push(span);
                } else if h.chunk_type == chunk::TYPE_USER {
                    groups.skip();
                }
                at += total;
                p += total as u64;
                next = h.next_offset().max(next);
            }
            *pos = p;
            self.next = next;
            if !spans.is_empty() || full {
                return Ok(BatchRead::Read);
            }
            // Only skipped chunks: read on (the buffer is free again).
        }
    }

    /// As [`read_batch`](Self::read_batch), but only the chunks' headers are
    /// read: the data sections stay in the segment file, for `sendfile(2)`.
    /// The headers come from the segment's index (one `pread` for many
    /// chunks; an index of version 1 holds no header: then one small `pread`
    /// of the segment per chunk), and each bloom filter from the segment when
    /// there is a `keep` to see it (`None`: every user chunk is kept).
    /// `limits.bytes` bounds the chunks' stored bytes (the first is taken
    /// whatever its size). With `cached_only`, the page cache must hold the
    /// headers and bloom filters read and the chunks' data sections: the
    /// chunks found up to the first one it does not hold, or
    /// [`BatchRead::WouldBlock`] if none.
    pub fn locate_batch(
        &mut self,
        spans: &mut Vec<FileSpan>,
        limits: BatchLimits,
        keep: Option<Keep<'_>>,
    ) -> Result<BatchRead, StreamError> {
        spans.clear();
        let mut at = Vec::new();
        let r = self.locate_run(spans, &mut at, limits, keep);
        if !limits.cached_only {
            return r;
        }
        // The data of the chunks whose headers came from the index: one
        // look at the page cache for all of them, one each if that fails.
        let mut unprobed = at.iter().enumerate().filter(|(_, a)| !a.probed);
        if let (Some((i, _)), Some((j, _))) = (unprobed.clone().next(), unprobed.next_back()) {
            let (a, b) = (&spans[i], &spans[j]);
            let end = b.data_pos + u64::from(b.header.data_len);
            if Arc::ptr_eq(&a.file, &b.file)
                && cache_holds(&a.file, a.data_pos, end - a.data_pos) == Some(true)
            {
                return r;
            }
        } else {
            return r;
        }
        let Some(k) = spans
            .iter()
            .zip(&at)
            .position(|(s, a)| !a.probed && !data_cached(s))
        else {
            return r;
        };
        // Not cached from span k on: read on from it next time (where the
        // disk may be waited for, if it is the first).
        let (seg, pos) = (at[k].seg, at[k].pos);
        self.next = spans[k].header.first_offset;
        self.file = Some((seg, Arc::clone(&spans[k].file), pos));
        self.peek = None;
        spans.truncate(k);
        Ok(if k == 0 {
            BatchRead::WouldBlock
        } else {
            BatchRead::Read
        })
    }

    /// The walk of [`locate_batch`](Self::locate_batch): `at` gets where each
    /// span's chunk is and whether the page cache was seen to hold its data.
    fn locate_run(
        &mut self,
        spans: &mut Vec<FileSpan>,
        at: &mut Vec<SpanAt>,
        limits: BatchLimits,
        keep: Option<Keep<'_>>,
    ) -> Result<BatchRead, StreamError> {
        if !self.settle() {
            return Ok(BatchRead::Read);
        }
        let mut head = [0u8; chunk::HEADER_LEN + 255];
        let mut taken = 0usize;
        let mut groups = Groups::new(limits.merge);
        let would_block = |spans: &Vec<FileSpan>| {
            Ok(if spans.is_empty() {
                BatchRead::WouldBlock
            } else {
                BatchRead::Read
            })
        };
        loop {
            let committed = *self.committed.borrow_and_update();
            if self.next >= committed
                || (groups.count >= limits.chunks.max(1) && groups.current.is_none())
            {
                return Ok(BatchRead::Read);
            }
            if !spans.is_empty() && taken >= limits.bytes {
                return Ok(BatchRead::Read);
            }
            if self.file.is_none() {
                if limits.cached_only {
                    return would_block(spans);
                }
                self.locate()?;
            }
            let Some((seg_first, file, pos)) = &mut self.file else {
                return Ok(BatchRead::Read);
            };
            let p = *pos;
            // The header: read ahead with the chunk before, or from the index,
            // or from the segment.
            let peeked = match self.peek.take() {
                Some(pk) if pk.seg == *seg_first && pk.pos == p => {
                    head[..pk.len].copy_from_slice(&pk.bytes[..pk.len]);
                    Some(pk.len)
                }
                _ => None,
            };
            let indexed = match (peeked, &mut self.index) {
                (None, Some(c)) if c.seg == *seg_first => c.at(p, committed),
                _ => None,
            };
            let n = match (peeked, &indexed) {
                (Some(n), _) => n,
                (None, Some(raw)) => {
                    head[..chunk::HEADER_LEN].copy_from_slice(raw);
                    chunk::HEADER_LEN
                }
                (None, None) => match read_into(file, &mut head, p, limits.cached_only)? {
                    Some(n) => n,
                    None => return would_block(spans),
                },
            };
            if n < chunk::HEADER_LEN {
                if limits.cached_only {
                    // The end of the segment (or an uncached header): the
                    // next segment is opened on a thread that may block.
                    return would_block(spans);
                }
                let cur = *seg_first;
                if !self.next_segment(cur) {
                    return Ok(BatchRead::Read);
                }
                continue;
            }
            let h = Header::parse(&head[..n])
                .ok_or_else(|| StreamError::Io(format!("bad chunk header at {p}")))?;
            let joins = groups.joins(&h);
            if groups.starts_past(&h, joins, limits.chunks.max(1)) {
                // Starts a delivered chunk past the limit: left for the next
                // read (with what was read of it).
                if peeked.is_some() {
                    self.peek = Some(Peek::of(*seg_first, p, &head[..n]));
                }
                return Ok(BatchRead::Read);
            }
            let bloom_end = chunk::HEADER_LEN + usize::from(h.bloom_len);
            let user = h.chunk_type == chunk::TYPE_USER;
            let n = if indexed.is_some() && user && keep.is_some() && n < bloom_end {
                // The bloom filter, for `keep`: from the segment.
                let bloom = &mut head[chunk::HEADER_LEN..bloom_end];
                match read_into(
                    file,
                    bloom,
                    p + chunk::HEADER_LEN as u64,
                    limits.cached_only,
                )? {
                    Some(m) => chunk::HEADER_LEN + m,
                    None => return would_block(spans),
                }
            } else {
                n
            };
            let bloom_seen = n >= bloom_end || (indexed.is_some() && (!user || keep.is_none()));
            if !bloom_seen && peeked.is_some() {
                // Read ahead short of the whole bloom filter: read it here.
                continue;
            }
            if !bloom_seen {
                // Part of the bloom filter is not cached.
                if limits.cached_only {
                    return would_block(spans);
                }
                return Err(StreamError::Io(format!("short chunk at {p}")));
            }
            let data_pos = p + bloom_end as u64;
            let mut probed = false;
            if limits.cached_only && h.data_len > 0 && indexed.is_none() {
                let end = data_pos + u64::from(h.data_len) - 1;
                let tail = 1 + h.trailer_len as usize;
                // The next chunk is whole on disk once the committed offset
                // is past its id: its header is read with this chunk's last
                // byte (one `pread` per chunk).
                let ahead = h.next_offset() < committed && tail <= PEEK_TRAILER_MAX;
                let mut look = [0u8; PEEK_TRAILER_MAX + chunk::HEADER_LEN + 255];
                let want = if ahead {
                    tail + chunk::HEADER_LEN + 255
                } else {
                    1
                };
                match read_into(file, &mut look[..want], end, true)? {
                    Some(m) if m >= 1 => {
                        if ahead && m >= tail + chunk::HEADER_LEN {
                            let at = p + h.total_len();
                            self.peek = Some(Peek::of(*seg_first, at, &look[tail..m]));
                        }
                    }
                    _ => return would_block(spans),
                }
                probed = true;
            }
            let kept = user
                && match keep {
                    Some(keep) => keep(head.get(chunk::HEADER_LEN..bloom_end).unwrap_or(&[])),
                    None => true,
                };
            if kept {
                let mut raw_header = [0u8; chunk::HEADER_LEN];
                raw_header.copy_from_slice(&head[..chunk::HEADER_LEN]);
                let delivered = groups.take(&h, joins);
                spans.push(FileSpan {
                    header: h,
                    raw_header,
                    file: Arc::clone(file),
                    data_pos,
                    joins,
                    delivered,
                });
                at.push(SpanAt {
                    seg: *seg_first,
                    pos: p,
                    probed: probed || h.data_len == 0,
                });
                taken += h.total_len() as usize;
            } else if user {
                groups.skip();
            }
            *pos = p + h.total_len();
            self.next = h.next_offset().max(self.next);
        }
    }

    /// Move to the segment after the one starting at `cur`; false if none.
    fn next_segment(&mut self, cur: u64) -> bool {
        let next_seg = {
            let s = self.log.state.lock();
            s.segments
                .iter()
                .find(|seg| seg.first_offset > cur)
                .map(|seg| seg.first_offset)
        };
        let Some(first) = next_seg else {
            return false;
        };
        match File::open(segment::segment_path(&self.log.dir, first)) {
            Ok(f) => {
                self.file = Some((first, Arc::new(f), segment::FILE_HEADER));
                self.index = Index::open(&segment::index_path(&self.log.dir, first))
                    .ok()
                    .and_then(|i| Cursor::open(first, i));
            }
            Err(_) => {
                self.file = None;
                self.index = None;
                self.next = self.next.max(first);
            }
        }
        true
    }

    /// Open the segment holding `self.next` at the chunk holding it.
    fn locate(&mut self) -> Result<(), StreamError> {
        // Retention may drop the segment between the look-up and the open:
        // look again (it never drops the active one, so this ends).
        for _ in 0..1000 {
            let segments = self.log.state.lock().segments.clone();
            let Some(seg) = segments
                .iter()
                .rev()
                .find(|s| s.first_offset <= self.next)
                .or(segments.first())
            else {
                return Ok(());
            };
            let first = seg.first_offset;
            let (f, idx) = match (
                File::open(segment::segment_path(&self.log.dir, first)),
                Index::open(&segment::index_path(&self.log.dir, first)),
            ) {
                (Ok(f), Ok(i)) => (f, i),
                // Dropped by retention meanwhile: look again.
                _ => continue,
            };
            if self.next < first {
                self.next = first;
            }
            let n = idx.count()?;
            let target = self.next;
            let i = idx.search(n, |r: &IndexRecord| r.chunk_id > target)?;
            let pos = if i == 0 {
                segment::FILE_HEADER
            } else {
                let r = idx.read(i - 1)?;
                // A user chunk at the same id follows a tracking chunk: start there.
                let j = idx.search(i, |x: &IndexRecord| x.chunk_id >= r.chunk_id)?;
                let r = idx.read(j)?;
                self.next = r.chunk_id.min(self.next);
                r.pos
            };
            self.file = Some((first, Arc::new(f), pos));
            self.index = Cursor::open(first, idx);
            return Ok(());
        }
        Err(StreamError::Io(format!(
            "cannot open the segment holding offset {}",
            self.next
        )))
    }
}

/// Whether the page cache holds a span's data section: `cachestat(2)` where
/// the kernel has it, else its last byte read with `RWF_NOWAIT` (a chunk is
/// written whole, so its pages are cached and evicted together).
fn data_cached(s: &FileSpan) -> bool {
    let len = u64::from(s.header.data_len);
    if len == 0 {
        return true;
    }
    if let Some(held) = cache_holds(&s.file, s.data_pos, len) {
        return held;
    }
    let mut last = [0u8; 1];
    matches!(
        read_into(&s.file, &mut last, s.data_pos + len - 1, true),
        Ok(Some(1))
    )
}

/// Whether the page cache holds every page of `len` bytes of `f` from
/// `pos`, with `cachestat(2)` (Linux 6.5; it touches none of them); None
/// where the kernel (or a seccomp filter) does not offer it.
fn cache_holds(f: &File, pos: u64, len: u64) -> Option<bool> {
    #[cfg(all(
        target_os = "linux",
        any(
            target_arch = "x86_64",
            target_arch = "aarch64",
            target_arch = "riscv64"
        )
    ))]
    {
        use std::os::fd::AsRawFd;
        use std::sync::atomic::AtomicBool;
        /// The same number on these architectures.
        const SYS_CACHESTAT: libc::c_long = 451;
        static REFUSED: AtomicBool = AtomicBool::new(false);
        #[repr(C)]
        struct Range {
            off: u64,
            len: u64,
        }
        #[repr(C)]
        #[derive(Default)]
        struct Stat {
            nr_cache: u64,
            nr_dirty: u64,
            nr_writeback: u64,
            nr_evicted: u64,
            nr_recently_evicted: u64,
        }
        if len == 0 || REFUSED.load(Ordering::Relaxed) {
            return None;
        }
        let range = Range { off: pos, len };
        let mut stat = Stat::default();
        // SAFETY: `range` and `stat` are live locals of the kernel's layouts
        // (`struct cachestat_range`, `struct cachestat`); the fd is open for
        // the call; flags must be 0.
        let r = unsafe {
            libc::syscall(
                SYS_CACHESTAT,
                f.as_raw_fd(),
                &range as *const Range,
                &mut stat as *mut Stat,
                0u32,
            )
        };
        if r != 0 {
            REFUSED.store(true, Ordering::Relaxed);
            return None;
        }
        let page = page_size();
        let pages = (pos + len - 1) / page - pos / page + 1;
        Some(stat.nr_cache >= pages)
    }
    #[cfg(not(all(
        target_os = "linux",
        any(
            target_arch = "x86_64",
            target_arch = "aarch64",
            target_arch = "riscv64"
        )
    )))]
    {
        let _ = (f, pos, len);
        None
    }
}

/// The size of a page of memory (and of the page cache).
fn page_size() -> u64 {
    static PAGE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *PAGE.get_or_init(|| {
        // SAFETY: sysconf has no preconditions.
        let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        u64::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
    })
}

/// Read into `buf` at `pos`: up to its length, fewer at the end of the file.
/// With `cached_only`, one `preadv2(RWF_NOWAIT)`: what the page cache holds
/// (`None` if nothing, or if the kernel cannot tell).
fn read_into(
    f: &File,
    buf: &mut [u8],
    pos: u64,
    cached_only: bool,
) -> std::io::Result<Option<usize>> {
    if !cached_only {
        return read_at_most(f, buf, pos).map(Some);
    }
    use std::os::fd::AsRawFd;
    let Ok(off) = libc::off_t::try_from(pos) else {
        return Ok(None);
    };
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: `iov` points into `buf`, which outlives the call and is
    // writable for `iov_len` bytes; the fd is open for the call's duration.
    let n = unsafe { libc::preadv2(f.as_raw_fd(), &iov, 1, off, libc::RWF_NOWAIT) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN)
            | Some(libc::EOPNOTSUPP)
            | Some(libc::EINVAL)
            | Some(libc::ENOSYS)
            | Some(libc::EINTR) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(n as usize))
}

/// Open a stream's directory: recover its segments and tracking state.
fn recover(dir: &Path, key: &str, retention: Retention) -> Result<LogInner, StreamError> {
    let mut firsts = segment::list(dir)?;
    let mut scanned = Vec::new();
    let mut legacy = false;
    // The last segment is scanned; an empty one (a crash right after a roll)
    // is dropped and the one before becomes the last.
    while let Some(&last) = firsts.last() {
        segment::Recovered {
            chunks: scanned,
            legacy,
        } = segment::recover_last(dir, last)?;
        if scanned.is_empty() && firsts.len() > 1 {
            let _ = std::fs::remove_file(segment::segment_path(dir, last));
            let _ = std::fs::remove_file(segment::index_path(dir, last));
            firsts.pop();
            continue;
        }
        break;
    }
    let mut segments = Vec::with_capacity(firsts.len());
    for &first in firsts.iter().take(firsts.len().saturating_sub(1)) {
        let info = match segment::summarize_closed(dir, first)? {
            Some(i) => i,
            None => {
                // No usable index: rebuild it by a scan (rare: a lost index file).
                let found = segment::recover_last(dir, first)?;
                let mut info = SegmentInfo::empty(first);
                for c in &found.chunks {
                    info.add(&c.header);
                }
                info
            }
        };
        segments.push(info);
    }
    let mut sequences: HashMap<String, (u64, u64)> = HashMap::new();
    let mut offsets: HashMap<String, u64> = HashMap::new();
    let mut last_chunk = 0;
    let mut last_timestamp = 0;
    if let Some(&last) = firsts.last() {
        let mut info = SegmentInfo::empty(last);
        for c in &scanned {
            info.add(&c.header);
            if c.header.chunk_type == chunk::TYPE_TRACKING_SNAPSHOT {
                sequences.clear();
                offsets.clear();
            }
            if c.header.chunk_type == chunk::TYPE_USER {
                last_chunk = c.header.first_offset;
            }
            last_timestamp = c.header.timestamp;
            for t in &c.tracking {
                match t {
                    chunk::Tracking::Sequence {
                        reference,
                        chunk,
                        sequence,
                    } => {
                        sequences.insert(reference.clone(), (*chunk, *sequence));
                    }
                    chunk::Tracking::Offset { reference, offset } => {
                        offsets.insert(reference.clone(), *offset);
                    }
                }
            }
        }
        segments.push(info);
    }
    let next = segments.last().map_or(0, |s| s.next_offset);
    if last_chunk == 0 {
        // The last user chunk is in an earlier segment: its index says.
        for s in segments.iter().rev().skip(1) {
            if let Ok(idx) = Index::open(&segment::index_path(dir, s.first_offset)) {
                let n = idx.count()?;
                if let Some(r) = (0..n)
                    .rev()
                    .filter_map(|i| idx.read(i).ok())
                    .find(|r| r.chunk_type == chunk::TYPE_USER)
                {
                    last_chunk = r.chunk_id;
                    break;
                }
            }
        }
    }
    let active = match firsts.last() {
        Some(&last) => {
            let open = |p: PathBuf| std::fs::OpenOptions::new().read(true).write(true).open(p);
            Some((
                last,
                open(segment::segment_path(dir, last))?,
                open(segment::index_path(dir, last))?,
            ))
        }
        None => None,
    };
    let state = LogState {
        next_offset: next,
        pending: Pending::default(),
        pending_offsets: Vec::new(),
        sequences: sequences
            .iter()
            .map(|(k, (_, s))| (Arc::from(k.as_str()), *s))
            .collect(),
        offsets: offsets.clone(),
        segments: segments.clone(),
        last_chunk,
        queued: false,
        deleted: false,
        retention,
    };
    let writer = Writer {
        active,
        segments,
        sequences,
        offsets,
        next,
        last_timestamp,
        last_chunk,
        failed: None,
        dirty: false,
        batch: Batch::ADAPTIVE,
        legacy,
    };
    Ok(LogInner {
        dir: dir.to_path_buf(),
        key: key.to_string(),
        state: Mutex::new(state),
        writer: Mutex::new(writer),
        committed: tokio::sync::watch::channel(next).0,
        durable: tokio::sync::watch::channel(next).0,
        deleted: std::sync::atomic::AtomicBool::new(false),
    })
}

/// When the flusher takes what is buffered: at once, unless producers do not
/// wait for each confirm (sustained load): a publisher appended before its
/// earlier messages were confirmed ([`StreamLog::append_from`]'s
/// `pipelined`), or the last round saw more appends arrive while it wrote.
/// Then it lingers up to `max_wait_us` after
/// waking, or until `min_bytes` are buffered, so a round merges more appends
/// into each chunk (fewer, larger chunks: a consumer pays per chunk, and
/// each round's writes and fsyncs are paid once for more messages) — but
/// only while appends keep coming: `quiet_us` without one (producers
/// waiting for their confirms, e.g. a full window of unconfirmed messages)
/// ends the wait. A producer that waits for each confirm never makes a
/// round busy (its next append comes after the commit), so it never waits
/// here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Linger {
    max_wait_us: u64,
    min_bytes: u64,
    quiet_us: u64,
}

const LINGER: Linger = Linger {
    max_wait_us: 5_000,
    min_bytes: 512 << 10,
    quiet_us: 200,
};

impl Linger {
    /// How long to wait more (µs) before taking the buffers, `now_us` after
    /// the flusher woke to a round, with `pending` bytes buffered; 0: now.
    /// `before`: what was buffered when it last waited (None: it has not
    /// yet): nothing more since then ends the wait. Each wait is at most
    /// `quiet_us`.
    fn wait_us(&self, busy: bool, pending: u64, before: Option<u64>, now_us: u64) -> u64 {
        if !busy || pending >= self.min_bytes || before == Some(pending) {
            return 0;
        }
        self.max_wait_us.saturating_sub(now_us).min(self.quiet_us)
    }
}

/// The flusher: write what streams buffered, publish committed offsets, fsync,
/// publish durable offsets, run durability callbacks; repeat.
fn flusher(shared: Arc<Shared>) {
    let mut busy = false;
    loop {
        let dirty = {
            let mut q = shared.queue.lock();
            // Writes buffered while the last round ran were taken by it
            // without being counted in its target: one more (maybe empty)
            // round counts them.
            while q.dirty.is_empty()
                && !q.shutdown
                && shared.synced.load(Ordering::SeqCst) >= shared.appended.load(Ordering::SeqCst)
            {
                shared.wake.wait(&mut q);
            }
            if q.dirty.is_empty() && q.shutdown {
                return;
            }
            let woke = std::time::Instant::now();
            let mut before = None;
            let busy = busy || shared.pipelined.load(Ordering::Relaxed);
            while !q.shutdown {
                let waited = woke.elapsed().as_micros() as u64;
                let pending = shared.pending_bytes.load(Ordering::Relaxed);
                let more = LINGER.wait_us(busy, pending, before, waited);
                if more == 0 {
                    break;
                }
                before = Some(pending);
                // Appends that cross `min_bytes` notify.
                shared
                    .wake
                    .wait_for(&mut q, std::time::Duration::from_micros(more));
            }
            shared.pipelined.store(false, Ordering::Relaxed);
            tracing::trace!(
                busy,
                waited_us = woke.elapsed().as_micros() as u64,
                bytes = shared.pending_bytes.load(Ordering::Relaxed),
                "flusher round"
            );
            std::mem::take(&mut q.dirty)
        };
        // Every write counted up to here is in a buffer taken below.
        let target = shared.appended.load(Ordering::SeqCst);
        let mut failed = None;
        busy = false;
        for log in &dirty {
            match flush_log(&shared, log) {
                Ok(b) => busy |= b,
                Err(e) => {
                    tracing::error!(stream = %log.key, error = %e, "cannot write a stream");
                    failed = Some(e);
                }
            }
        }
        shared.synced.fetch_max(target, Ordering::SeqCst);
        answer_waiters(&shared, failed.as_ref());
    }
}

/// Run, in order, the [`StreamStore::on_durable`] callbacks whose writes are
/// synced now (with `failed`, the error of the round that synced them), and
/// those that come meanwhile already synced, until none is left (marked
/// `draining` while the callbacks run outside the lock, so that no later
/// one runs ahead of them).
fn answer_waiters(shared: &Shared, failed: Option<&StreamError>) {
    loop {
        let due: Vec<(u64, Callback)> = {
            let mut w = shared.waiters.lock();
            let synced = shared.synced.load(Ordering::SeqCst);
            let (due, keep) = std::mem::take(&mut w.list)
                .into_iter()
                .partition(|(t, _)| *t <= synced);
            w.list = keep;
            w.draining = !due.is_empty();
            due
        };
        if due.is_empty() {
            return;
        }
        for (_, f) in due {
            f(match failed {
                None => Ok(()),
                Some(e) => Err(e.clone()),
            });
        }
    }
}

/// Write one stream's buffered messages and offsets as chunks, commit, fsync,
/// mark durable.
/// `Ok(true)`: more appends arrived while it wrote (before the commit, so not
/// from a producer waiting for this round's confirms).
fn flush_log(shared: &Shared, log: &LogInner) -> Result<bool, StreamError> {
    let (msgs, offsets, retention) = {
        let mut s = log.state.lock();
        s.queued = false;
        if s.deleted {
            return Ok(false);
        }
        // The buffer's allocation stays (reclaimed once these bytes are written).
        let data = s.pending.data.split().freeze();
        let appends = std::mem::take(&mut s.pending.appends);
        (
            (data, appends),
            std::mem::take(&mut s.pending_offsets),
            s.retention,
        )
    };
    let bytes = msgs.0.len() as u64;
    shared.pending_bytes.fetch_sub(bytes, Ordering::Relaxed);
    shared.room.notify_waiters();
    let mut w = log.writer.lock();
    if let Some(e) = &w.failed {
        return Err(e.clone());
    }
    if let Err(e) = write_all(log, &mut w, msgs, offsets, retention) {
        w.failed = Some(e.clone());
        return Err(e);
    }
    let (segments, next, last_chunk) = (w.segments.clone(), w.next, w.last_chunk);
    // Readable now (the chunks are whole in the files); durable after the
    // fsync below.
    {
        let mut s = log.state.lock();
        s.segments = segments;
        s.last_chunk = last_chunk;
    }
    advance(&log.committed, next);
    if std::mem::take(&mut w.dirty) {
        if let Some((_, seg, idx)) = &w.active {
            if let Err(e) = seg.sync_data().and_then(|()| idx.sync_data()) {
                let e = StreamError::from(e);
                w.failed = Some(e.clone());
                return Err(e);
            }
        }
    }
    drop(w);
    let busy = !log.state.lock().pending.is_empty();
    if !busy {
        log.writer.lock().batch.quiet();
    }
    advance(&log.durable, next);
    Ok(busy)
}

/// Move a watched offset to `next`, waking its followers if it changed.
fn advance(offset: &tokio::sync::watch::Sender<u64>, next: u64) {
    offset.send_if_modified(|c| {
        let changed = *c != next;
        *c = next;
        changed
    });
}

/// The most a user chunk built by the flusher takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ChunkLimits {
    entries: usize,
    /// Data bytes: a chunk stops taking messages once it holds this many.
    bytes: usize,
}

const CHUNK_LIMITS: ChunkLimits = ChunkLimits {
    entries: CHUNK_MAX_ENTRIES,
    bytes: CHUNK_TARGET_BYTES,
};

/// How many entries the next user chunk takes at most, adapted in the manner
/// of osiris's writer (a `gen_batch_server`), whose batches become its chunks:
/// from `min` it doubles (up to `max`) each time a chunk fills up to it, and
/// when the writer runs dry — a round whose last chunk did not fill and
/// during whose write no more appends came ([`Batch::quiet`]) — it starts
/// again from twice what came since the last time it ran dry (at least
/// `min`). `gen_batch_server` halves instead, but its mailbox is rarely dry
/// under load, where each flusher round here ends dry by construction:
/// halving there cut steady rounds in two chunks, and so did restarting from
/// the round's own size when the next round was larger. So a burst after a
/// quiet spell is
/// cut 32, 64, 128, ... (its last chunk, what a consumer from `last` is sent
/// first, is small, as on RabbitMQ), and steady load is written a round to
/// a chunk, up to `max` entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Batch {
    size: usize,
    min: usize,
    max: usize,
    /// The last chunk cut did not fill.
    short: bool,
    /// Entries cut into chunks since the writer last ran dry.
    taken: usize,
}

impl Batch {
    /// `gen_batch_server`'s bounds (its `min_batch_size` / `max_batch_size`
    /// defaults, which osiris's writer keeps).
    const ADAPTIVE: Batch = Batch {
        size: 32,
        min: 32,
        max: 8192,
        short: false,
        taken: 0,
    };

    /// Always `n`.
    #[cfg(test)]
    const fn fixed(n: usize) -> Batch {
        Batch {
            size: n,
            min: n,
            max: n,
            short: false,
            taken: 0,
        }
    }

    /// A chunk of `n` entries was cut; `last`: the appends ran out with it.
    fn cut(&mut self, n: usize, last: bool) {
        self.taken = self.taken.saturating_add(n);
        if n >= self.size {
            self.size = self.size.saturating_mul(2).min(self.max);
            self.short = false;
        } else if last {
            self.short = true;
        }
    }

    /// The round is written and nothing more came meanwhile: if its last
    /// chunk did not fill, the writer ran dry.
    fn quiet(&mut self) {
        if std::mem::take(&mut self.short) {
            self.size = self.taken.saturating_mul(2).clamp(self.min, self.max);
        }
        self.taken = 0;
    }
}

/// A user chunk built from buffered appends: its header and bloom filter,
/// its data section (a slice of the write buffer) and its trailer.
struct BuiltChunk {
    head: Bytes,
    data: Bytes,
    trailer: Bytes,
    /// The highest publishing id per reference among its messages (its
    /// trailer's sequences).
    refs: Vec<(Arc<str>, u64)>,
}

impl BuiltChunk {
    /// The chunk as stored.
    #[cfg(test)]
    fn bytes(&self) -> Bytes {
        [&self.head[..], &self.data[..], &self.trailer[..]]
            .concat()
            .into()
    }
}

/// The stored length and records of the entry at the start of `b` (a
/// simple entry or a sub-batch, as [`chunk::put_simple_entry`] and
/// [`chunk::put_sub_batch_entry`] wrote it).
fn entry_at(b: &[u8]) -> (usize, u64) {
    match b.first() {
        Some(k) if k & 0x80 != 0 && b.len() >= 11 => {
            let records = u16::from_be_bytes([b[1], b[2]]);
            let len = u32::from_be_bytes([b[7], b[8], b[9], b[10]]) as usize;
            (11 + len, u64::from(records))
        }
        _ if b.len() >= 4 => {
            let len = u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff;
            (4 + len as usize, 1)
        }
        _ => (b.len(), 1),
    }
}

/// Merge the messages buffered since the last flush (every append, in
/// order) into as few user chunks as `limits` and `batch` allow (`batch`
/// adapts as it cuts them), as osiris's writer does with what its mailbox
/// holds: the first gets id `first_id`, each the next
/// one's; a chunk's timestamp is the newest of its messages' (never below
/// `last_timestamp`); its trailer holds each reference's highest publishing
/// id; its bloom filter (`filter_size` bytes) is there when any message has
/// a filter value. A chunk's data section is a slice of `data`: whole
/// appends are taken at once, an append is walked entry by entry only where
/// a chunk must end inside it. Pure: bytes in, bytes out.
fn build_user_chunks(
    (data, appends): (Bytes, Vec<AppendMeta>),
    first_id: u64,
    last_timestamp: i64,
    filter_size: u8,
    limits: ChunkLimits,
    batch: &mut Batch,
) -> Vec<BuiltChunk> {
    let most_entries = limits.entries.clamp(1, CHUNK_MAX_ENTRIES);
    let mut out = Vec::new();
    let mut id = first_id;
    let mut ts = last_timestamp;
    // Where the next entry starts in `data`, and in which append (and
    // which entry of it).
    let (mut pos, mut a, mut e) = (0usize, 0usize, 0u32);
    // Each append's start in `data`.
    let mut starts = Vec::with_capacity(appends.len());
    let mut at = 0;
    for m in &appends {
        starts.push(at);
        at = m.end;
    }
    while a < appends.len() {
        let max_entries = most_entries.min(batch.size.max(1));
        let chunk_start = pos;
        let mut n = 0usize;
        let mut records = 0u64;
        let mut refs: Vec<(Arc<str>, u64)> = Vec::new();
        let mut filters = false;
        // (append, first entry, end entry) pieces of this chunk.
        let mut pieces: Vec<(usize, u32, u32)> = Vec::new();
        while a < appends.len() && n < max_entries && pos - chunk_start < limits.bytes {
            let m = &appends[a];
            // Appends with filter values and appends without are not merged
            // into one chunk: a filtering consumer is sent whole chunks whose
            // Bloom filter matches, so a merged chunk would bring it every
            // unfiltered message published around its values (a publish frame
            // stays one chunk however it mixes them, as RabbitMQ's batch).
            if n > 0 && e == 0 && m.filters.is_empty() == filters {
                break;
            }
            let left = (m.entries - e) as usize;
            let take_all = n + left <= max_entries && m.end - chunk_start <= limits.bytes;
            let (end_e, end_pos, recs) = if take_all && e == 0 {
                (m.entries, m.end, m.records)
            } else {
                // Entry by entry, as long as the chunk takes more.
                let (mut k, mut p, mut r) = (e, pos, 0u64);
                while k < m.entries
                    && n + ((k - e) as usize) < max_entries
                    && p - chunk_start < limits.bytes
                {
                    let (len, rec) = entry_at(&data[p..m.end]);
                    p += len;
                    r += rec;
                    k += 1;
                }
                (k, p, r)
            };
            if end_e == e {
                break;
            }
            pieces.push((a, e, end_e));
            n += (end_e - e) as usize;
            records += recs;
            ts = ts.max(m.timestamp);
            filters |= !m.filters.is_empty();
            if let Some(r) = &m.reference {
                if let Some(&seq) = m.ids.get(end_e as usize - 1) {
                    match refs.iter_mut().find(|(x, _)| x == r) {
                        Some(x) => x.1 = x.1.max(seq),
                        None => refs.push((Arc::clone(r), seq)),
                    }
                }
            }
            pos = end_pos;
            if end_e == m.entries {
                a += 1;
                e = 0;
                if let Some(&s) = starts.get(a) {
                    pos = s;
                }
            } else {
                e = end_e;
            }
        }
        let mut trailer = BytesMut::new();
        // (An empty reference is none: RabbitMQ's clients send it so.)
        for (r, seq) in refs.iter().filter(|(r, _)| !r.is_empty()) {
            chunk::put_trailer_sequence(&mut trailer, r, *seq);
        }
        let bloom = if filters {
            let mut b = vec![0u8; usize::from(filter_size.max(1))];
            for &(i, from, to) in &pieces {
                let f = &appends[i].filters;
                for k in from..to {
                    let v = f.get(k as usize).and_then(|v| v.as_deref());
                    chunk::bloom_insert(&mut b, v.unwrap_or(""));
                }
            }
            b
        } else {
            Vec::new()
        };
        batch.cut(n, a >= appends.len());
        let body = data.slice(chunk_start..pos);
        let records = u32::try_from(records).unwrap_or(u32::MAX);
        let head = chunk::build_head(
            chunk::TYPE_USER,
            id,
            ts,
            (n as u16, records),
            &bloom,
            &body,
            trailer.len(),
        );
        id += u64::from(records);
        out.push(BuiltChunk {
            head,
            data: body,
            trailer: trailer.freeze(),
            refs,
        });
    }
    out
}

fn write_all(
    log: &LogInner,
    w: &mut Writer,
    msgs: (Bytes, Vec<AppendMeta>),
    offsets: Vec<(String, u64)>,
    retention: Retention,
) -> Result<(), StreamError> {
    let built = build_user_chunks(
        msgs,
        w.next,
        w.last_timestamp,
        retention.filter_size,
        CHUNK_LIMITS,
        &mut w.batch,
    );
    for c in built {
        let id = w.next;
        write_chunk(log, w, &[&c.head, &c.data, &c.trailer], retention)?;
        for (r, seq) in c.refs {
            w.sequences.insert(r.to_string(), (id, seq));
        }
    }
    if !offsets.is_empty() {
        let mut d = BytesMut::new();
        for (reference, offset) in offsets {
            chunk::put_tracking(
                &mut d,
                &chunk::Tracking::Offset {
                    reference: reference.clone(),
                    offset,
                },
            );
            w.offsets.insert(reference, offset);
        }
        let c = chunk::build(
            chunk::TYPE_TRACKING_DELTA,
            w.next,
            w.last_timestamp,
            (1, 0),
            &[],
            &d,
            &[],
        );
        write_chunk(log, w, &[&c], retention)?;
    }
    Ok(())
}

/// Append one built chunk to the active segment (starting a new one first if
/// this one is full), with its index record (`parts`: its
/// bytes in order, the first holding the header).
fn write_chunk(
    log: &LogInner,
    w: &mut Writer,
    parts: &[&[u8]],
    retention: Retention,
) -> Result<(), StreamError> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let full = w
        .segments
        .last()
        .is_none_or(|s| s.chunks > 0 && s.size + len as u64 > retention.max_segment_size);
    if w.active.is_none() || full || w.legacy {
        roll(log, w)?;
    }
    let h = parts
        .first()
        .and_then(|p| Header::parse(p))
        .ok_or_else(|| StreamError::Io("built a bad chunk".into()))?;
    let seg = w
        .segments
        .last_mut()
        .ok_or_else(|| StreamError::Io("no active segment".into()))?;
    let pos = seg.size;
    let index_pos = segment::FILE_HEADER + seg.chunks * segment::INDEX_RECORD;
    let Some((_, file, idx)) = &w.active else {
        return Err(StreamError::Io("no active segment".into()));
    };
    let mut raw = [0u8; chunk::HEADER_LEN];
    raw.copy_from_slice(&parts[0][..chunk::HEADER_LEN]);
    write_all_vectored_at(file, parts, pos)?;
    idx.write_all_at(&IndexRecord::encode(&raw, pos), index_pos)?;
    seg.add(&h);
    w.next = h.next_offset();
    w.last_timestamp = w.last_timestamp.max(h.timestamp);
    if h.chunk_type == chunk::TYPE_USER {
        w.last_chunk = h.first_offset;
    }
    w.dirty = true;
    Ok(())
}

/// Write `parts` back to back at `pos` with `pwritev(2)` (no copy into one
/// buffer), looping on short writes.
fn write_all_vectored_at(f: &File, parts: &[&[u8]], mut pos: u64) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut parts: Vec<&[u8]> = parts.iter().copied().filter(|p| !p.is_empty()).collect();
    let mut first = 0;
    while first < parts.len() {
        let iov: Vec<libc::iovec> = parts[first..]
            .iter()
            .take(64)
            .map(|p| libc::iovec {
                iov_base: p.as_ptr() as *mut libc::c_void,
                iov_len: p.len(),
            })
            .collect();
        let off = libc::off_t::try_from(pos)
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: every iovec points into a slice of `parts`, borrowed and
        // unchanged for the call; the file is open for it.
        let n =
            unsafe { libc::pwritev(f.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int, off) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let mut n = n as usize;
        pos += n as u64;
        while n > 0 && first < parts.len() {
            let p = parts[first];
            if n >= p.len() {
                n -= p.len();
                first += 1;
            } else {
                parts[first] = &p[n..];
                n = 0;
            }
        }
    }
    Ok(())
}

/// Close the active segment (fsynced) and start a new one at `w.next`, with a
/// tracking snapshot first if there is anything to track.
fn roll(log: &LogInner, w: &mut Writer) -> Result<(), StreamError> {
    if let Some((_, seg, idx)) = w.active.take() {
        seg.sync_data()?;
        idx.sync_data()?;
    }
    let first = w.next;
    let (seg, idx) = segment::create(&log.dir, first)?;
    // The directory entry of the new files must survive a crash too.
    File::open(&log.dir)?.sync_all()?;
    w.active = Some((first, seg, idx));
    w.legacy = false;
    w.segments.push(SegmentInfo::empty(first));
    if !w.sequences.is_empty() || !w.offsets.is_empty() {
        let mut d = BytesMut::new();
        for (reference, (chunk, sequence)) in &w.sequences {
            chunk::put_tracking(
                &mut d,
                &chunk::Tracking::Sequence {
                    reference: reference.clone(),
                    chunk: *chunk,
                    sequence: *sequence,
                },
            );
        }
        for (reference, offset) in &w.offsets {
            chunk::put_tracking(
                &mut d,
                &chunk::Tracking::Offset {
                    reference: reference.clone(),
                    offset: *offset,
                },
            );
        }
        let c = chunk::build(
            chunk::TYPE_TRACKING_SNAPSHOT,
            first,
            w.last_timestamp,
            (1, 0),
            &[],
            &d,
            &[],
        );
        // A snapshot never rolls (the segment is empty).
        write_chunk(
            log,
            w,
            &[&c],
            Retention {
                max_segment_size: u64::MAX,
                ..Retention::default()
            },
        )?;
    }
    Ok(())
}
