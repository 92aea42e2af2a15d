//! The sled-backed [`Store`]: opening and recovering the data directory, the
//! topology tree, and the segment trees written by a group-commit flusher
//! thread. What a group writes is decided in [`group`](super::group); reads
//! and recovery scans are in [`read`](super::read).
//!
//! # Group commit
//!
//! Message operations ([`MessageOp`]s given to [`Store::submit`] for one
//! queue) are appended, already encoded, to a pending list under a mutex; they
//! never wait for disk. One dedicated thread (`warren-store-flusher`) loops:
//!
//! 1. wait until something is pending, then take *all* pending operations and
//!    *all* registered waiters (`sync` futures, `on_durable` callbacks) at
//!    once;
//! 2. fold the operations, in call order, into one write set: each level's
//!    new messages become one chunk record (a message inserted and settled in
//!    the same group is never written), settlements flip bits in chunk metas,
//!    fully settled chunks are deleted and mostly settled ones compacted;
//!    write the chunks to the data files (synced), then apply the metas with
//!    one atomic `apply_batch` per tree;
//! 3. call `db.flush()` once (fsync), then unlink the data files nothing
//!    points at any more;
//! 4. complete every waiter taken in step 1 with the flush's result.
//!
//! While one flush runs, new operations and waiters accumulate and are served
//! together by the next one, so under load one fsync serves many publishers.
//! A waiter registered when nothing is pending is completed without a flush
//! (everything before it is already durable).
//!
//! # Back-pressure
//!
//! The pending list is bounded by [`StoreOptions::max_pending_bytes`]
//! (default 64 MiB of encoded records, plus a small per-operation overhead).
//! Buffering an operation never blocks (queues submit while they hold a
//! per-queue ordering lock, which a wait would hold up). Producers instead
//! must not outrun the disk for long: their tasks await [`Store::ready`]
//! (resolved when the flusher takes the list, i.e. at most about one batch's
//! apply+flush time) before reading more input, so the excess past the limit
//! is at most what one read of input can buffer per producer. No thread ever
//! blocks on it.
//!
//! # Crash consistency
//!
//! A group first appends the bytes of every chunk it writes (new, compacted,
//! copied forward) to the active data file, one write, and `fdatasync`s it;
//! only then is everything it changes in the `segments` tree (metas pointing
//! at those bytes, deleted metas) applied as one sled batch, atomic, and
//! flushed; sled recovers a prefix of its log. So a kill -9 at any moment,
//! compaction and copy-forward included, leaves the state after some whole
//! number of groups, and every meta in it points at bytes already on disk;
//! bytes of a group that never reached sled are dead space, counted at the
//! next open. A data file is unlinked only after the flush of the batch that
//! removed the last meta pointing into it. The `ephemeral` tree and its
//! files (pages of non-durable queues) are dropped at every open.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use ::sled::{Db, Tree};
use bytes::Bytes;
use parking_lot::{Condvar, Mutex};

use super::files::{self, DataFiles};
use super::segment::{self, Meta};
use super::{codec, StorageError, StoreStats, StoredMessage, TopologyKind, STORE_VERSION};

const TOPOLOGY_TREE: &str = "topology";
const SEGMENTS_TREE: &str = "segments";
const EPHEMERAL_TREE: &str = "ephemeral";
/// Trees of the format 1 store; their presence means an old data directory.
const V1_TREES: [&str; 2] = ["messages", "redelivered"];
/// In the default tree: the store epoch (u64 BE), incremented at every open.
const EPOCH_KEY: &[u8] = b"epoch";
const STORE_DIR: &str = "store";
/// Chunk bytes of durable queues (kept across restarts).
const DATA_DIR: &str = "store-data";
/// Chunk bytes of non-durable queues' pages (emptied at every open).
const EPHEMERAL_DIR: &str = "store-ephemeral";
const VERSION_FILE: &str = "VERSION";
/// Accounted per pending operation on top of its key and record bytes.
const OP_OVERHEAD: usize = 64;

thread_local! {
    static ON_FLUSHER: Cell<bool> = const { Cell::new(false) };
}

/// Tuning knobs; `Store::open` uses the defaults.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Back-pressure threshold for buffered-but-not-yet-applied operations.
    pub max_pending_bytes: usize,
    /// sled's page cache size.
    pub cache_capacity: u64,
    /// Size at which a data file is rolled (see files.rs).
    pub data_file_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            max_pending_bytes: 64 << 20,
            cache_capacity: 256 << 20,
            data_file_bytes: files::DEFAULT_FILE_BYTES,
        }
    }
}

/// A message record encoded for the store, ready to buffer. Encoding is the
/// costly part of a write (the body is copied), so callers do it before they
/// take any lock.
#[derive(Debug, Clone)]
pub struct EncodedMessage(pub(super) Bytes);

impl EncodedMessage {
    pub fn new(msg: &StoredMessage) -> EncodedMessage {
        EncodedMessage(Bytes::from(codec::encode_message(msg)))
    }

    pub fn from_parts(parts: &codec::MessageParts<'_>) -> EncodedMessage {
        EncodedMessage(Bytes::from(codec::encode_parts(parts)))
    }

    /// Encoded size in bytes.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One operation on a queue's stored messages, for [`Store::submit`].
/// Positions are the queue's own, increasing per level (see `segment.rs`).
#[derive(Debug, Clone)]
pub enum MessageOp {
    /// Store a message at `pos` of `level`. `durable`: it survives a restart
    /// (a persistent message on a durable queue); otherwise it is only paged
    /// out to save memory. `size` is what the queue accounts for it (body bytes).
    Insert {
        level: u8,
        pos: u64,
        size: u32,
        durable: bool,
        record: EncodedMessage,
    },
    /// The message at `pos` left the queue for good (acked, expired, dropped).
    /// `size` and `durable` as given to its `Insert`.
    Settle {
        level: u8,
        pos: u64,
        size: u32,
        durable: bool,
    },
    /// The message was handed to a consumer: it comes back redelivered after a restart.
    MarkDelivered { level: u8, pos: u64 },
    /// The message came back to its queue `count` times after reaching a
    /// client (the delivery-limit count): it comes back with it after a restart.
    SetReturns { level: u8, pos: u64, count: u32 },
    /// Settle every message of `level` at `from` or later (a purge of what was
    /// never loaded).
    DropFrom { level: u8, from: u64 },
    /// The queue was deleted: drop all its messages.
    DeleteQueue,
}

impl MessageOp {
    /// Bytes accounted against the pending limit.
    fn size(&self) -> usize {
        OP_OVERHEAD
            + match self {
                MessageOp::Insert { record, .. } => record.len(),
                _ => 0,
            }
    }
}

/// A queue as the store knows it: its key and which tree holds it. Cheap to
/// clone; made by [`Store::queue`].
#[derive(Debug, Clone)]
pub struct QueueRef(Arc<QueueKey>);

#[derive(Debug)]
pub(super) struct QueueKey {
    pub(super) name: String,
    /// `segment::queue_prefix(name)`.
    pub(super) prefix: Vec<u8>,
    /// In the `segments` tree (kept across restarts) or `ephemeral` (dropped).
    pub(super) durable: bool,
}

impl QueueRef {
    pub fn key(&self) -> &str {
        &self.0.name
    }

    pub fn is_durable(&self) -> bool {
        self.0.durable
    }

    pub(super) fn inner(&self) -> &QueueKey {
        &self.0
    }

    pub(super) fn same(&self, other: &QueueRef) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
            || (self.0.durable == other.0.durable && self.0.prefix == other.0.prefix)
    }
}

/// The operations of one `submit` call.
pub(super) struct Submitted {
    pub(super) queue: QueueRef,
    pub(super) ops: Vec<MessageOp>,
}

type Callback = Box<dyn FnOnce(Result<(), StorageError>) + Send>;

enum Waiter {
    Future(tokio::sync::oneshot::Sender<Result<(), StorageError>>),
    Callback(Callback),
}

impl Waiter {
    fn complete(self, result: Result<(), StorageError>) {
        match self {
            Waiter::Future(tx) => {
                let _ = tx.send(result);
            }
            Waiter::Callback(f) => {
                if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(result))).is_err() {
                    tracing::error!("an on_durable callback panicked");
                }
            }
        }
    }
}

#[derive(Default)]
pub(super) struct Pending {
    pub(super) ops: Vec<Submitted>,
    bytes: usize,
    /// A topology write happened since the last flush was started.
    topology_dirty: bool,
    waiters: Vec<Waiter>,
    /// All `Store` handles are gone: drain and exit.
    shutdown: bool,
    /// The flusher thread has exited; nothing more will be written.
    stopped: bool,
}

impl Pending {
    fn idle(&self) -> bool {
        self.ops.is_empty() && self.waiters.is_empty() && !self.topology_dirty
    }
}

pub(super) struct Shared {
    data_dir: PathBuf,
    store_path: PathBuf,
    pub(super) db: Db,
    topology: Tree,
    /// Metas of durable queues' chunks.
    pub(super) segments: Tree,
    /// Metas of non-durable queues' paged-out chunks.
    pub(super) ephemeral: Tree,
    /// Chunk bytes of durable queues.
    pub(super) data: DataFiles,
    /// Chunk bytes of non-durable queues' pages.
    pub(super) scratch: DataFiles,
    /// This run's epoch: transient entries written in an earlier one are dead.
    pub(super) epoch: u64,
    max_pending_bytes: usize,
    pub(super) pending: Mutex<Pending>,
    /// The group the flusher is applying right now, readable by `read`
    /// until it is in the trees. Lock order: `pending`, then `inflight`.
    pub(super) inflight: Mutex<Option<Arc<Vec<Submitted>>>>,
    /// Signalled when the pending list goes from idle to non-idle, or on shutdown.
    work: Condvar,
    /// Woken when the flusher takes the pending list (back-pressure release).
    room: tokio::sync::Notify,
    /// `pending.bytes`, readable without the lock (for [`Store::has_room`]).
    pending_hint: AtomicUsize,
    pub(super) messages_written: AtomicU64,
    flushes: AtomicU64,
    /// Topology records written or deleted since the store opened.
    topology_writes: AtomicU64,
}

/// Owned by the `Store` clones; the last one to go stops the flusher.
struct Handle {
    shared: Arc<Shared>,
    flusher: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shared.pending.lock().shutdown = true;
        self.shared.work.notify_all();
        self.shared.room.notify_waiters();
        // If the last handle is dropped inside an on_durable callback, the
        // flusher exits by itself after this iteration; joining would deadlock.
        if !ON_FLUSHER.with(Cell::get) {
            if let Some(h) = self.flusher.lock().take() {
                if h.join().is_err() {
                    tracing::error!("the message store flusher thread panicked");
                }
            }
        }
    }
}

/// Handle to the durable store. Cheap to clone; `Send + Sync`. When the last
/// clone is dropped, pending operations are written and flushed and the
/// flusher thread is joined (so the same directory can be reopened).
#[derive(Clone)]
pub struct Store {
    handle: Arc<Handle>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("data_dir", &self.shared().data_dir)
            .finish_non_exhaustive()
    }
}

fn io_open_error(path: &Path, e: io::Error) -> StorageError {
    StorageError::Open {
        path: path.to_owned(),
        source: ::sled::Error::Io(e),
    }
}

impl Store {
    /// Opens (creating if needed) the store in `data_dir`: the sled database
    /// in `<data_dir>/store` and the format marker `<data_dir>/VERSION`.
    pub fn open(data_dir: &Path) -> Result<Store, StorageError> {
        Store::open_with(data_dir, StoreOptions::default())
    }

    pub fn open_with(data_dir: &Path, options: StoreOptions) -> Result<Store, StorageError> {
        let started = Instant::now();
        std::fs::create_dir_all(data_dir).map_err(|e| io_open_error(data_dir, e))?;
        let version_path = data_dir.join(VERSION_FILE);
        let store_path = data_dir.join(STORE_DIR);
        let store_existed = store_path.exists();

        let version_present = match std::fs::read(&version_path) {
            Ok(raw) => {
                let text = String::from_utf8_lossy(&raw);
                if text.trim() != STORE_VERSION {
                    return Err(StorageError::Corrupt {
                        path: version_path,
                        detail: format!(
                            "unknown store format {:?}; this build of warren reads {STORE_VERSION:?} \
                             (format 1, one record per message, and format 2, chunk bytes inside \
                             the sled database, were written by earlier builds and are not \
                             migrated: drain its queues with such a build, then start on a fresh \
                             data directory)",
                            text.trim()
                        ),
                    });
                }
                if !store_existed {
                    return Err(StorageError::Corrupt {
                        path: store_path,
                        detail: format!(
                            "{} exists but the database directory is missing; refusing to start \
                             with an empty store (remove the whole data directory to start afresh)",
                            version_path.display()
                        ),
                    });
                }
                true
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(io_open_error(&version_path, e)),
        };

        let config = ::sled::Config::new()
            .path(&store_path)
            .cache_capacity(options.cache_capacity)
            // Our flusher decides when to fsync.
            .flush_every_ms(None);
        let opened = open_db(&config);
        let db = match opened {
            Ok(Ok(db)) => db,
            Ok(Err(e @ ::sled::Error::Corruption { .. })) => {
                return Err(StorageError::Corrupt {
                    path: store_path,
                    detail: e.to_string(),
                })
            }
            Ok(Err(source)) => {
                return Err(StorageError::Open {
                    path: store_path,
                    source,
                })
            }
            Err(panic) => {
                let why = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("unknown panic");
                return Err(StorageError::Corrupt {
                    path: store_path,
                    detail: format!("the database could not be recovered: {why}"),
                });
            }
        };
        let tree = |name: &str| {
            db.open_tree(name).map_err(|source| StorageError::Open {
                path: store_path.clone(),
                source,
            })
        };
        let names = db.tree_names();
        if let Some(old) = V1_TREES
            .iter()
            .find(|t| names.iter().any(|n| n.as_ref() == t.as_bytes()))
        {
            return Err(StorageError::Corrupt {
                path: store_path,
                detail: format!(
                    "this database has a {old:?} tree, which only store format 1 (warren-store 1, \
                     one record per message) writes; this build reads {STORE_VERSION:?} and will \
                     not guess: drain its queues with the older build (or export definitions and \
                     move messages with a shovel), then start on a fresh data directory"
                ),
            });
        }
        let topology = tree(TOPOLOGY_TREE)?;
        let segments = tree(SEGMENTS_TREE)?;
        // Pages of non-durable queues never outlive the process that wrote them.
        db.drop_tree(EPHEMERAL_TREE)
            .map_err(|source| StorageError::Open {
                path: store_path.clone(),
                source,
            })?;
        let ephemeral = tree(EPHEMERAL_TREE)?;
        let epoch = next_epoch(&db).map_err(|source| StorageError::Open {
            path: store_path.clone(),
            source,
        })?;
        let data_path = data_dir.join(DATA_DIR);
        let data = DataFiles::open(&data_path, true, options.data_file_bytes, false)
            .map_err(|e| io_open_error(&data_path, e))?;
        let scratch_path = data_dir.join(EPHEMERAL_DIR);
        let scratch = DataFiles::open(&scratch_path, false, options.data_file_bytes, true)
            .map_err(|e| io_open_error(&scratch_path, e))?;

        if !version_present {
            if store_existed {
                tracing::warn!(path = %version_path.display(), "VERSION file missing next to an existing store; recreating it");
            }
            write_version(&version_path).map_err(|e| io_open_error(&version_path, e))?;
        }

        let shared = Arc::new(Shared {
            data_dir: data_dir.to_owned(),
            store_path,
            db,
            topology,
            segments,
            ephemeral,
            data,
            scratch,
            epoch,
            max_pending_bytes: options.max_pending_bytes.max(1),
            pending: Mutex::new(Pending::default()),
            inflight: Mutex::new(None),
            work: Condvar::new(),
            room: tokio::sync::Notify::new(),
            pending_hint: AtomicUsize::new(0),
            messages_written: AtomicU64::new(0),
            topology_writes: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
        });
        shared.recover(started, store_existed)?;

        let flusher_shared = shared.clone();
        let flusher = std::thread::Builder::new()
            .name("warren-store-flusher".into())
            .spawn(move || flusher_main(flusher_shared))
            .map_err(|e| io_open_error(data_dir, e))?;
        Ok(Store {
            handle: Arc::new(Handle {
                shared,
                flusher: Mutex::new(Some(flusher)),
            }),
        })
    }

    pub(super) fn shared(&self) -> &Shared {
        &self.handle.shared
    }

    /// The data directory this store was opened on.
    pub fn path(&self) -> &Path {
        &self.shared().data_dir
    }

    /// Stores (or replaces) a topology record. Visible at once; durable after
    /// the next flush (await [`Store::sync`] to be sure).
    pub fn put_topology(
        &self,
        kind: TopologyKind,
        key: &str,
        record: &[u8],
    ) -> Result<(), StorageError> {
        self.shared()
            .topology
            .insert(topology_key(kind, key), record)?;
        self.topology_written();
        Ok(())
    }

    pub fn delete_topology(&self, kind: TopologyKind, key: &str) -> Result<(), StorageError> {
        self.shared().topology.remove(topology_key(kind, key))?;
        self.topology_written();
        Ok(())
    }

    /// All records of `kind`, as `(key, record)` in key order.
    pub fn load_topology(
        &self,
        kind: TopologyKind,
    ) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        let sh = self.shared();
        let prefix = topology_key(kind, "");
        let mut out = Vec::new();
        for item in sh.topology.scan_prefix(&prefix) {
            let (k, v) = item?;
            let key =
                std::str::from_utf8(&k[prefix.len()..]).map_err(|_| StorageError::Corrupt {
                    path: sh.store_path.clone(),
                    detail: format!("topology key {:02x?} is not valid UTF-8", &k[..]),
                })?;
            out.push((key.to_owned(), v.to_vec()));
        }
        Ok(out)
    }

    /// How many topology records were written or deleted since the store
    /// opened: a caller that sees it move across a change it made waits for
    /// [`Store::sync`] before answering, so what it answers survives a crash.
    pub fn topology_writes(&self) -> u64 {
        self.shared().topology_writes.load(Ordering::Acquire)
    }

    fn topology_written(&self) {
        let sh = self.shared();
        sh.topology_writes.fetch_add(1, Ordering::AcqRel);
        let mut p = sh.pending.lock();
        let was_idle = p.idle();
        p.topology_dirty = true;
        drop(p);
        if was_idle {
            sh.work.notify_one();
        }
    }

    /// The store's handle on queue `key`: `durable` for a durable queue's
    /// messages (kept across restarts), else for paging out only.
    pub fn queue(&self, key: &str, durable: bool) -> QueueRef {
        QueueRef(Arc::new(QueueKey {
            name: key.to_owned(),
            prefix: segment::queue_prefix(key),
            durable,
        }))
    }

    /// Buffers the removal of every message of durable queue `key` (e.g. a
    /// queue deleted just before a crash). Operations buffered after this
    /// call are kept.
    pub fn delete_queue_messages(&self, key: &str) {
        self.submit(&self.queue(key, true), [MessageOp::DeleteQueue]);
    }

    /// Buffers operations on the messages of `queue`, in order, into the
    /// current group-commit batch (one lock acquisition for all of them).
    /// Never blocks; see [`Store::ready`] for back-pressure.
    pub fn submit(&self, queue: &QueueRef, ops: impl IntoIterator<Item = MessageOp>) {
        let ops: Vec<MessageOp> = ops.into_iter().collect();
        if ops.is_empty() {
            return;
        }
        let size = ops.iter().map(MessageOp::size).sum();
        self.push(
            Submitted {
                queue: queue.clone(),
                ops,
            },
            size,
        );
    }

    fn push(&self, ops: Submitted, size: usize) {
        let sh = self.shared();
        let mut p = sh.pending.lock();
        if p.stopped {
            drop(p);
            tracing::error!(path = %sh.data_dir.display(), "message store is shut down; dropping a write");
            return;
        }
        let was_idle = p.idle();
        p.ops.push(ops);
        p.bytes += size;
        sh.pending_hint.store(p.bytes, Ordering::Relaxed);
        drop(p);
        if was_idle {
            sh.work.notify_one();
        }
    }

    /// Whether the pending buffer is below its limit (cheap: no lock).
    pub fn has_room(&self) -> bool {
        let sh = self.shared();
        sh.pending_hint.load(Ordering::Relaxed) < sh.max_pending_bytes
    }

    /// Resolves once the pending buffer is below its limit (at once if it is,
    /// or if the store has stopped). A producer awaits this before taking more
    /// input, so a full buffer makes its task wait instead of a thread block.
    pub async fn ready(&self) {
        let sh = self.shared();
        loop {
            if self.has_room() {
                return;
            }
            let notified = sh.room.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let p = sh.pending.lock();
                if p.bytes < sh.max_pending_bytes || p.stopped || p.shutdown {
                    return;
                }
            }
            notified.await;
        }
    }

    fn register(&self, waiter: Waiter) {
        let sh = self.shared();
        let mut p = sh.pending.lock();
        if p.stopped {
            drop(p);
            waiter.complete(Err(StorageError::Closed {
                path: sh.data_dir.clone(),
            }));
            return;
        }
        let was_idle = p.idle();
        p.waiters.push(waiter);
        drop(p);
        if was_idle {
            sh.work.notify_one();
        }
    }

    /// Resolves once everything buffered before this call is durable. One
    /// flush serves every waiter registered before it started.
    pub fn sync(&self) -> impl Future<Output = Result<(), StorageError>> + Send + 'static {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.register(Waiter::Future(tx));
        let path = self.shared().data_dir.clone();
        async move { rx.await.unwrap_or(Err(StorageError::Closed { path })) }
    }

    /// Runs `f` on the flusher thread once everything buffered before this
    /// call is durable (or with the error if the flush failed). `f` must be
    /// quick and must not call [`Store::flush_blocking`].
    pub fn on_durable(&self, f: Box<dyn FnOnce(Result<(), StorageError>) + Send>) {
        self.register(Waiter::Callback(f));
    }

    /// Blocks until everything buffered before this call is durable. Meant
    /// for shutdown and tests; not for async contexts' hot paths.
    pub fn flush_blocking(&self) -> Result<(), StorageError> {
        if ON_FLUSHER.with(Cell::get) {
            return Err(StorageError::Io(::sled::Error::Unsupported(
                "flush_blocking called from an on_durable callback".into(),
            )));
        }
        let (tx, rx) = std::sync::mpsc::channel();
        self.on_durable(Box::new(move |r| {
            let _ = tx.send(r);
        }));
        rx.recv().unwrap_or_else(|_| {
            Err(StorageError::Closed {
                path: self.shared().data_dir.clone(),
            })
        })
    }

    pub fn stats(&self) -> StoreStats {
        let sh = self.shared();
        StoreStats {
            messages_written: sh.messages_written.load(Ordering::Relaxed),
            flushes: sh.flushes.load(Ordering::Relaxed),
            bytes_on_disk: sh.db.size_on_disk().unwrap_or(0)
                + sh.data.size_on_disk()
                + sh.scratch.size_on_disk(),
        }
    }

    #[cfg(test)]
    fn pending_bytes(&self) -> usize {
        self.shared().pending.lock().bytes
    }
}

/// Opens the sled database, turning a panic during recovery into `Err`.
///
/// sled's file lock can outlive a dropped `Db` for a moment (its background
/// threads hold references), so a lock conflict is retried for up to two
/// seconds before it is reported; a quick restart in the same process, or a
/// previous broker process that is still exiting, then succeeds.
fn open_db(config: &::sled::Config) -> std::thread::Result<Result<Db, ::sled::Error>> {
    let deadline = Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let opened = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| config.open()));
        match &opened {
            Ok(Err(::sled::Error::Io(e)))
                if e.to_string().contains("could not acquire lock")
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            _ => return opened,
        }
    }
}

fn topology_key(kind: TopologyKind, key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(kind.as_str().len() + 1 + key.len());
    k.extend_from_slice(kind.as_str().as_bytes());
    k.push(b'/');
    k.extend_from_slice(key.as_bytes());
    k
}

fn write_version(path: &Path) -> io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(format!("{STORE_VERSION}\n").as_bytes())?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        // Make the rename durable; not supported everywhere, so best effort.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

impl Shared {
    pub(super) fn corrupt(&self, detail: impl Into<String>) -> StorageError {
        StorageError::Corrupt {
            path: self.store_path.clone(),
            detail: detail.into(),
        }
    }

    pub(super) fn tree(&self, durable: bool) -> &Tree {
        if durable {
            &self.segments
        } else {
            &self.ephemeral
        }
    }

    pub(super) fn files(&self, durable: bool) -> &DataFiles {
        if durable {
            &self.data
        } else {
            &self.scratch
        }
    }

    /// Startup: reads every meta (never a chunk) to count the live bytes of
    /// each data file; deletes metas with nothing live (transient pages of an
    /// earlier run) and makes that durable; then unlinks the data files
    /// nothing points at. Logs what was found.
    fn recover(&self, started: Instant, existed: bool) -> Result<(), StorageError> {
        let mut live: BTreeMap<u64, u64> = BTreeMap::new();
        let mut dead = ::sled::Batch::default();
        let (mut chunks, mut dead_chunks) = (0u64, 0u64);
        for item in self.segments.iter() {
            let (k, v) = item?;
            let key =
                segment::decode_key(&k).map_err(|e| self.corrupt(format!("segment key: {e}")))?;
            let meta = Meta::decode(key.first, &v)
                .map_err(|e| self.corrupt(format!("chunk meta of {:?}: {e}", key.queue)))?;
            if meta.live(self.epoch) == 0 {
                dead.remove(k);
                dead_chunks += 1;
                continue;
            }
            if let Some(loc) = meta.loc {
                *live.entry(loc.file).or_default() += u64::from(loc.len);
            }
            chunks += 1;
        }
        if dead_chunks > 0 {
            self.segments.apply_batch(dead)?;
            self.db.flush()?;
        }
        let dead_bytes = self.data.recover(&live)?;
        let queues = self.queue_keys()?.len();
        let mut topo = Vec::new();
        for kind in TopologyKind::ALL {
            let n = self
                .topology
                .scan_prefix(topology_key(kind, ""))
                .keys()
                .count();
            if n > 0 {
                topo.push(format!("{}={n}", kind.as_str()));
            }
        }
        tracing::info!(
            path = %self.data_dir.display(),
            new = !existed,
            epoch = self.epoch,
            queues_with_messages = queues,
            topology = %topo.join(" "),
            chunks,
            dropped_chunks = dead_chunks,
            data_files = live.len(),
            data_bytes = self.data.size_on_disk(),
            dead_data_bytes = dead_bytes,
            sled_bytes = self.db.size_on_disk().unwrap_or(0),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "message store opened"
        );
        Ok(())
    }
}

/// Reads, increments and writes back the store epoch.
fn next_epoch(db: &Db) -> Result<u64, ::sled::Error> {
    let current = db
        .get(EPOCH_KEY)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map(u64::from_be_bytes)
        .unwrap_or(0);
    let next = current + 1;
    db.insert(EPOCH_KEY, &next.to_be_bytes())?;
    db.flush()?;
    Ok(next)
}

impl Shared {
    /// Unlinks data files with nothing live; called after a successful flush.
    fn reclaim(&self) {
        for files in [&self.data, &self.scratch] {
            match files.reclaim() {
                Ok(r) if r.files > 0 => {
                    tracing::debug!(files = r.files, bytes = r.bytes, "data files reclaimed")
                }
                Ok(_) => {}
                Err(e) => tracing::error!(error = %e, "cannot remove a data file"),
            }
        }
    }
}

/// Fails whatever is still queued if the flusher exits (normally or by panic).
struct StopGuard(Arc<Shared>);

impl Drop for StopGuard {
    fn drop(&mut self) {
        let sh = &self.0;
        let waiters = {
            let mut p = sh.pending.lock();
            p.stopped = true;
            p.ops.clear();
            p.bytes = 0;
            sh.pending_hint.store(0, Ordering::Relaxed);
            std::mem::take(&mut p.waiters)
        };
        sh.room.notify_waiters();
        for w in waiters {
            w.complete(Err(StorageError::Closed {
                path: sh.data_dir.clone(),
            }));
        }
    }
}

fn flusher_main(sh: Arc<Shared>) {
    ON_FLUSHER.with(|f| f.set(true));
    let _guard = StopGuard(sh.clone());
    loop {
        let (ops, waiters, dirty) = {
            let mut p = sh.pending.lock();
            while p.idle() && !p.shutdown {
                sh.work.wait(&mut p);
            }
            if p.idle() && p.shutdown {
                break;
            }
            p.bytes = 0;
            sh.pending_hint.store(0, Ordering::Relaxed);
            let dirty = std::mem::take(&mut p.topology_dirty);
            let ops = Arc::new(std::mem::take(&mut p.ops));
            *sh.inflight.lock() = Some(Arc::clone(&ops));
            (ops, std::mem::take(&mut p.waiters), dirty)
        };
        sh.room.notify_waiters();

        let result = if ops.is_empty() && !dirty {
            // Everything registered before these waiters was flushed already.
            Ok(())
        } else {
            let n = ops.len();
            let applied = super::group::apply(&sh, &ops);
            *sh.inflight.lock() = None;
            let r = applied.and_then(|()| {
                sh.db.flush()?;
                Ok(())
            });
            // What this flush stopped pointing at can go now.
            if r.is_ok() {
                sh.reclaim();
            }
            sh.flushes.fetch_add(1, Ordering::Relaxed);
            match &r {
                Ok(()) => tracing::trace!(ops = n, waiters = waiters.len(), "store group flush"),
                Err(e) => {
                    tracing::error!(path = %sh.store_path.display(), error = %e, "store group flush failed")
                }
            }
            r
        };
        for w in waiters {
            w.complete(result.clone());
        }
    }
    // Final flush so a clean shutdown leaves nothing unsynced (e.g. topology
    // writes whose dirty flag was consumed by a failed iteration).
    if let Err(e) = sh.db.flush() {
        tracing::error!(path = %sh.store_path.display(), error = %e, "final store flush failed");
    }
}

#[cfg(test)]
mod tests {
    use super::super::LevelSummary;
    use super::*;
    use std::io::BufRead;
    use std::sync::atomic::AtomicUsize;

    /// A unique directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> TempDir {
            static N: AtomicUsize = AtomicUsize::new(0);
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let p = std::env::temp_dir().join(format!(
                "warren-storage-test-{}-{}-{nanos}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
        fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn msg(i: u64) -> StoredMessage {
        StoredMessage {
            exchange: "ex".into(),
            routing_key: format!("rk.{i}"),
            properties: Bytes::from(format!("props-{i}").into_bytes()),
            body: Bytes::from(i.to_be_bytes().to_vec()),
            redelivered: false,
            expires_at: if i.is_multiple_of(2) {
                Some(i * 1000)
            } else {
                None
            },
        }
    }

    fn seqs(v: &[(u64, StoredMessage)]) -> Vec<u64> {
        v.iter().map(|(s, _)| *s).collect()
    }

    /// The old one-message helpers, on level 0 of a durable queue.
    impl Store {
        fn insert_message(&self, queue: &str, pos: u64, msg: &StoredMessage) {
            self.submit(
                &self.queue(queue, true),
                [MessageOp::Insert {
                    level: 0,
                    pos,
                    size: msg.body.len() as u32,
                    durable: true,
                    record: EncodedMessage::new(msg),
                }],
            );
        }

        fn remove_message(&self, queue: &str, pos: u64) {
            self.submit(
                &self.queue(queue, true),
                [MessageOp::Settle {
                    level: 0,
                    pos,
                    size: 8,
                    durable: true,
                }],
            );
        }

        fn mark_redelivered(&self, queue: &str, pos: u64) {
            self.submit(
                &self.queue(queue, true),
                [MessageOp::MarkDelivered { level: 0, pos }],
            );
        }

        fn load_messages(&self, queue: &str) -> Result<Vec<(u64, StoredMessage)>, StorageError> {
            Ok(self
                .read(&self.queue(queue, true), 0, 0, usize::MAX, usize::MAX)?
                .into_iter()
                .map(|r| (r.pos, r.message))
                .collect())
        }
    }

    fn block_on<F: Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn store_and_sync_future_are_send_sync() {
        fn send_sync<T: Send + Sync + Clone + 'static>(_: &T) {}
        fn send<T: Send + 'static>(_: &T) {}
        let dir = TempDir::new();
        let store = Store::open(dir.path()).unwrap();
        send_sync(&store);
        let fut = store.sync();
        send(&fut);
        block_on(fut).unwrap();
    }

    #[test]
    fn topology_writes_count_puts_and_deletes_not_reads() {
        let dir = TempDir::new();
        let store = Store::open(dir.path()).unwrap();
        let start = store.topology_writes();
        store.put_topology(TopologyKind::Queue, "q", b"{}").unwrap();
        assert_eq!(store.topology_writes(), start + 1);
        store.load_topology(TopologyKind::Queue).unwrap();
        assert_eq!(store.topology_writes(), start + 1);
        store.delete_topology(TopologyKind::Queue, "q").unwrap();
        assert_eq!(store.topology_writes(), start + 2);
    }

    #[test]
    fn round_trip_in_order() {
        let dir = TempDir::new();
        let store = Store::open(dir.path()).unwrap();
        for i in [1u64, 2, 3, 256, 300] {
            store.insert_message("v\0q", i, &msg(i));
        }
        store.insert_message("v\0other", 1, &msg(99));
        block_on(store.sync()).unwrap();
        let got = store.load_messages("v\0q").unwrap();
        assert_eq!(seqs(&got), vec![1, 2, 3, 256, 300]);
        for (s, m) in &got {
            assert_eq!(m, &msg(*s));
        }
        assert_eq!(store.load_messages("v\0other").unwrap(), vec![(1, msg(99))]);
        assert!(store.load_messages("v").unwrap().is_empty());
        let mut keys = store.queue_keys_with_messages().unwrap();
        keys.sort();
        assert_eq!(keys, vec!["v\0other".to_string(), "v\0q".to_string()]);
        assert_eq!(store.stats().messages_written, 6);
        // Reads from a position, bounded by count and bytes.
        let q = store.queue("v\0q", true);
        let r = store.read(&q, 0, 3, 2, usize::MAX).unwrap();
        assert_eq!(r.iter().map(|m| m.pos).collect::<Vec<_>>(), vec![3, 256]);
        let r = store.read(&q, 0, 4, 10, 1).unwrap();
        assert_eq!(
            r.iter().map(|m| m.pos).collect::<Vec<_>>(),
            vec![256],
            "at least one"
        );
        assert!(store.read(&q, 0, 301, 10, usize::MAX).unwrap().is_empty());
    }

    #[test]
    fn read_sees_buffered_and_flushed_writes() {
        let dir = TempDir::new();
        let store = Store::open(dir.path()).unwrap();
        store.insert_message("v\0q", 7, &msg(7));
        // Buffered (maybe not yet applied) writes are visible at once.
        assert_eq!(store.load_messages("v\0q").unwrap(), vec![(7, msg(7))]);
        store.flush_blocking().unwrap();
        assert_eq!(store.load_messages("v\0q").unwrap(), vec![(7, msg(7))]);
        store.insert_message("v\0q", 8, &msg(8));
        assert_eq!(seqs(&store.load_messages("v\0q").unwrap()), vec![7, 8]);
        store.remove_message("v\0q", 7);
        store.flush_blocking().unwrap();
        assert_eq!(seqs(&store.load_messages("v\0q").unwrap()), vec![8]);
        // What a delete removes is gone once it is applied.
        store.insert_message("v\0q", 9, &msg(9));
        store.delete_queue_messages("v\0q");
        store.flush_blocking().unwrap();
        assert!(store.load_messages("v\0q").unwrap().is_empty());
    }

    #[test]
    fn remove_hides_a_message() {
        let dir = TempDir::new();
        let store = Store::open(dir.path()).unwrap();
        for i in 1..=5 {
            store.insert_message("q", i, &msg(i));
        }
        store.flush_blocking().unwrap();
        store.remove_message("q", 2);
        store.remove_message("q", 4);
        // Insert and remove in the same group: never visible.
        store.insert_message("q", 6, &msg(6));
        store.remove_message("q", 6);
        store.flush_blocking().unwrap();
        assert_eq!(seqs(&store.load_messages("q").unwrap()), vec![1, 3, 5]);
        drop(store);
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(seqs(&store.load_messages("q").unwrap()), vec![1, 3, 5]);
    }

    #[test]
    fn mark_redelivered_survives_reopen() {
        let dir = TempDir::new();
        {
            let store = Store::open(dir.path()).unwrap();
            for i in 1..=4 {
                store.insert_message("q", i, &msg(i));
            }
            store.mark_redelivered("q", 2);
            store.mark_redelivered("q", 3);
            store.remove_message("q", 3); // acked after delivery: gone, flag too
            block_on(store.sync()).unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let got = store.load_messages("q").unwrap();
        let flags: Vec<(u64, bool)> = got.iter().map(|(s, m)| (*s, m.redelivered)).collect();
        assert_eq!(flags, vec![(1, false), (2, true), (4, false)]);
    }

    #[test]
    fn return_counts_survive_reopen() {
        let dir = TempDir::new();
        let q = |store: &Store| store.queue("q", true);
        {
            let store = Store::open(dir.path()).unwrap();
            for i in 1..=3 {
                store.insert_message("q", i, &msg(i));
            }
            // Set in the group of its insert (a builder) ...
            store.submit(
                &q(&store),
                [MessageOp::SetReturns {
                    level: 0,
                    pos: 3,
                    count: 1,
                }],
            );
            block_on(store.sync()).unwrap();
            // ... and on a written chunk, twice (the last count wins).
            for count in [1, 2] {
                store.submit(
                    &q(&store),
                    [MessageOp::SetReturns {
                        level: 0,
                        pos: 2,
                        count,
                    }],
                );
            }
            block_on(store.sync()).unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let got: Vec<(u64, u32)> = store
            .read(&q(&store), 0, 0, usize::MAX, usize::MAX)
            .unwrap()
            .into_iter()
            .map(|r| (r.pos, r.returns))
            .collect();
        assert_eq!(got, vec![(1, 0), (2, 2), (3, 1)]);
    }

    /// Submits `n` inserts at `level` from position `from` (durable or not).
    fn fill(store: &Store, q: &QueueRef, level: u8, from: u64, n: u64) {
        store.submit(
            q,
            (from..from + n).map(|i| MessageOp::Insert {
                level,
                pos: i,
                size: 8,
                durable: q.is_durable(),
                record: EncodedMessage::new(&msg(i)),
            }),
        );
    }

    fn settle(store: &Store, q: &QueueRef, level: u8, positions: impl Iterator<Item = u64>) {
        store.submit(
            q,
            positions.map(|pos| MessageOp::Settle {
                level,
                pos,
                size: 8,
                durable: q.is_durable(),
            }),
        );
    }

    fn chunks(store: &Store, q: &QueueRef) -> Vec<(u8, u8, u64)> {
        store
            .shared()
            .tree(q.is_durable())
            .scan_prefix(&q.inner().prefix)
            .keys()
            .map(|k| {
                let k = k.unwrap();
                let d = segment::decode_key(&k).unwrap();
                (d.level, d.kind, d.first)
            })
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    #[test]
    fn one_chunk_per_level_per_flush_and_settled_chunks_are_reclaimed() {
        let dir = TempDir::new();
        let store = Store::open(dir.path()).unwrap();
        let q = store.queue("v\0q", true);
        fill(&store, &q, 0, 0, 100);
        fill(&store, &q, 3, 0, 10);
        store.flush_blocking().unwrap();
        fill(&store, &q, 0, 100, 100);
        store.flush_blocking().unwrap();
        let c = chunks(&store, &q);
        // Metas only in sled: the bytes are in the data files.
        assert_eq!(c.len(), 3, "{c:?}");
        // Settling all of the first chunk deletes it and its meta.
        settle(&store, &q, 0, 0..100);
        store.flush_blocking().unwrap();
        let c = chunks(&store, &q);
        assert!(c.iter().all(|&(l, _, f)| !(l == 0 && f == 0)), "{c:?}");
        assert_eq!(c.len(), 2);
        let levels = store.recover_queue(&q).unwrap();
        assert_eq!(
            levels,
            vec![
                LevelSummary {
                    level: 0,
                    first: 100,
                    next: 200,
                    count: 100,
                    bytes: 800
                },
                LevelSummary {
                    level: 3,
                    first: 0,
                    next: 10,
                    count: 10,
                    bytes: 80
                },
            ]
        );
        // Inserted and settled in one group: never written.
        let written = store.stats().messages_written;
        fill(&store, &q, 0, 200, 5);
        settle(&store, &q, 0, 200..205);
        store.flush_blocking().unwrap();
        assert_eq!(store.stats().messages_written, written + 5);
        assert_eq!(chunks(&store, &q).len(), 2);
    }

    #[test]
    fn mostly_settled_chunks_are_compacted_and_survive_reopen() {
        let dir = TempDir::new();
        {
            let store = Store::open(dir.path()).unwrap();
            let q = store.queue("q", true);
            fill(&store, &q, 0, 0, 1000);
            store.flush_blocking().unwrap();
            let key = segment::key(&q.inner().prefix, 0, segment::KIND_META, 0);
            let read = |key: &[u8]| {
                let raw = store.shared().segments.get(key).unwrap().unwrap();
                let loc = Meta::decode(0, &raw).unwrap().loc.unwrap();
                store.shared().data.read(loc).unwrap().unwrap().len()
            };
            let before = read(&key);
            // Keep every 10th.
            settle(&store, &q, 0, (0..1000).filter(|i| i % 10 != 0));
            store.mark_redelivered("q", 500);
            store.flush_blocking().unwrap();
            let after = read(&key);
            assert!(after * 5 < before, "compacted {before} -> {after}");
        }
        let store = Store::open(dir.path()).unwrap();
        let got = store.load_messages("q").unwrap();
        assert_eq!(seqs(&got), (0..1000).step_by(10).collect::<Vec<_>>());
        assert!(got.iter().all(|(s, m)| m.redelivered == (*s == 500)));
        let q = store.queue("q", true);
        assert_eq!(store.recover_queue(&q).unwrap()[0].count, 100);
    }

    #[test]
    fn drop_from_settles_the_rest_of_a_level() {
        let dir = TempDir::new();
        let store = Store::open(dir.path()).unwrap();
        let q = store.queue("q", true);
        fill(&store, &q, 0, 0, 50);
        store.flush_blocking().unwrap();
        fill(&store, &q, 0, 50, 50);
        store.flush_blocking().unwrap();
        fill(&store, &q, 0, 100, 10);
        // From the middle of the first chunk: 0..20 stay (e.g. unacked).
        store.submit(&q, [MessageOp::DropFrom { level: 0, from: 20 }]);
        store.flush_blocking().unwrap();
        assert_eq!(
            seqs(&store.load_messages("q").unwrap()),
            (0..20).collect::<Vec<_>>()
        );
        let l = store.recover_queue(&q).unwrap();
        assert_eq!((l[0].count, l[0].bytes), (20, 160));
        assert_eq!(chunks(&store, &q).len(), 1, "later chunks deleted whole");
    }

    #[test]
    fn transient_pages_die_with_the_process() {
        let dir = TempDir::new();
        {
            let store = Store::open(dir.path()).unwrap();
            let q = store.queue("q", true);
            // A durable queue with persistent and transient messages paged out.
            store.submit(
                &q,
                (0..10u64).map(|i| MessageOp::Insert {
                    level: 0,
                    pos: i,
                    size: 8,
                    durable: i % 2 == 0,
                    record: EncodedMessage::new(&msg(i)),
                }),
            );
            let e = store.queue("q", false);
            fill(&store, &e, 0, 0, 5);
            store.flush_blocking().unwrap();
            assert_eq!(store.load_messages("q").unwrap().len(), 10);
            assert_eq!(store.read(&e, 0, 0, 100, usize::MAX).unwrap().len(), 5);
        }
        let store = Store::open(dir.path()).unwrap();
        let got = store.load_messages("q").unwrap();
        assert_eq!(seqs(&got), vec![0, 2, 4, 6, 8]);
        let q = store.queue("q", true);
        assert_eq!(store.recover_queue(&q).unwrap()[0].count, 5);
        let e = store.queue("q", false);
        assert!(store.read(&e, 0, 0, 100, usize::MAX).unwrap().is_empty());
        // Settling the durable ones reclaims the chunk despite its dead transients.
        settle(&store, &q, 0, [0u64, 2, 4, 6, 8].into_iter());
        store.flush_blocking().unwrap();
        assert!(chunks(&store, &q).is_empty());
    }

    #[test]
    fn delete_queue_messages_removes_only_that_queue() {
        let dir = TempDir::new();
        let store = Store::open(dir.path()).unwrap();
        for i in 1..=3 {
            store.insert_message("a", i, &msg(i));
            store.insert_message("a\0b", i, &msg(i));
            store.insert_message("ab", i, &msg(i));
        }
        store.mark_redelivered("a", 1);
        store.flush_blocking().unwrap();
        store.insert_message("a", 4, &msg(4)); // same group as the delete, before it
        store.delete_queue_messages("a");
        store.insert_message("a", 1, &msg(1)); // after the delete: kept
        store.flush_blocking().unwrap();
        let got = store.load_messages("a").unwrap();
        assert_eq!(seqs(&got), vec![1]);
        assert!(
            !got[0].1.redelivered,
            "old flag must not leak onto a new message"
        );
        assert_eq!(seqs(&store.load_messages("a\0b").unwrap()), vec![1, 2, 3]);
        assert_eq!(seqs(&store.load_messages("ab").unwrap()), vec![1, 2, 3]);
        store.delete_queue_messages("a");
        store.flush_blocking().unwrap();
        let mut keys = store.queue_keys_with_messages().unwrap();
        keys.sort();
        assert_eq!(keys, vec!["a\0b".to_string(), "ab".to_string()]);
    }

    #[test]
    fn topology_per_kind() {
        let dir = TempDir::new();
        {
            let store = Store::open(dir.path()).unwrap();
            for kind in TopologyKind::ALL {
                for k in ["/", "a/b", "z"] {
                    let rec = format!("{}:{k}", kind.as_str());
                    store.put_topology(kind, k, rec.as_bytes()).unwrap();
                }
            }
            store
                .put_topology(TopologyKind::Queue, "z", b"replaced")
                .unwrap();
            store
                .delete_topology(TopologyKind::Exchange, "a/b")
                .unwrap();
            store.delete_topology(TopologyKind::User, "absent").unwrap();
            block_on(store.sync()).unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        for kind in TopologyKind::ALL {
            let got = store.load_topology(kind).unwrap();
            let keys: Vec<&str> = got.iter().map(|(k, _)| k.as_str()).collect();
            if kind == TopologyKind::Exchange {
                assert_eq!(keys, vec!["/", "z"]);
            } else {
                assert_eq!(keys, vec!["/", "a/b", "z"]);
            }
            for (k, v) in &got {
                if kind == TopologyKind::Queue && k == "z" {
                    assert_eq!(v, b"replaced");
                } else {
                    assert_eq!(v, format!("{}:{k}", kind.as_str()).as_bytes());
                }
            }
        }
    }

    #[test]
    fn reopen_after_drop_keeps_synced_and_shutdown_drains() {
        let dir = TempDir::new();
        {
            let store = Store::open(dir.path()).unwrap();
            let clone = store.clone();
            for i in 1..=100 {
                store.insert_message("q1", i, &msg(i));
            }
            block_on(clone.sync()).unwrap();
            // Buffered but never explicitly synced: a clean drop flushes it.
            store.insert_message("q2", 1, &msg(1));
            drop(clone);
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.load_messages("q1").unwrap().len(), 100);
        assert_eq!(seqs(&store.load_messages("q2").unwrap()), vec![1]);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("VERSION")).unwrap(),
            "warren-store 3\n"
        );
        assert!(dir.path().join("store").is_dir());
    }

    #[test]
    fn sync_resolves_after_a_flush_and_flushes_are_grouped() {
        let dir = TempDir::new();
        let store = Store::open(dir.path()).unwrap();

        // Nothing pending: resolves without a flush.
        block_on(store.sync()).unwrap();
        assert_eq!(store.stats().flushes, 0);
        store.insert_message("q", 1, &msg(1));
        block_on(store.sync()).unwrap();
        assert_eq!(store.stats().flushes, 1);

        const THREADS: u64 = 4;
        const PER: u64 = 2500;
        let confirmed = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let store = store.clone();
                let confirmed = confirmed.clone();
                std::thread::spawn(move || {
                    let queue = format!("q{t}");
                    let mut syncs = Vec::new();
                    for i in 1..=PER {
                        // Read before the insert: the flusher may take it at once.
                        let flushes_before = store.shared().flushes.load(Ordering::SeqCst);
                        store.insert_message(&queue, i, &msg(i));
                        let s = store.clone();
                        let c = confirmed.clone();
                        if i.is_multiple_of(2) {
                            store.on_durable(Box::new(move |r| {
                                r.unwrap();
                                assert!(s.shared().flushes.load(Ordering::SeqCst) > flushes_before);
                                assert_eq!(
                                    std::thread::current().name(),
                                    Some("warren-store-flusher")
                                );
                                c.fetch_add(1, Ordering::Relaxed);
                            }));
                        } else {
                            let fut = store.sync();
                            syncs.push(async move {
                                fut.await.unwrap();
                                assert!(s.shared().flushes.load(Ordering::SeqCst) > flushes_before);
                                c.fetch_add(1, Ordering::Relaxed);
                            });
                        }
                    }
                    block_on(async {
                        for f in syncs {
                            f.await;
                        }
                    });
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        store.flush_blocking().unwrap();
        let inserts = THREADS * PER;
        assert_eq!(confirmed.load(Ordering::Relaxed), inserts);
        let flushes = store.stats().flushes - 1;
        eprintln!("{inserts} inserts took {flushes} flushes");
        assert!(
            flushes < inserts / 5,
            "{flushes} flushes for {inserts} inserts"
        );
        for t in 0..THREADS {
            assert_eq!(
                store.load_messages(&format!("q{t}")).unwrap().len() as u64,
                PER
            );
        }
        assert_eq!(store.stats().messages_written, inserts + 1);
        assert!(store.stats().bytes_on_disk > 0);
    }

    #[test]
    fn back_pressure_bounds_pending_bytes() {
        let dir = TempDir::new();
        let limit = 256 << 10;
        let store = Store::open_with(
            dir.path(),
            StoreOptions {
                max_pending_bytes: limit,
                ..StoreOptions::default()
            },
        )
        .unwrap();
        let big = StoredMessage {
            body: Bytes::from(vec![7u8; 32 << 10]),
            ..msg(0)
        };
        let mut max_seen = 0;
        let mut waited = 0;
        for i in 0..300 {
            // A producer awaits room before it takes more input.
            if !store.has_room() {
                waited += 1;
            }
            block_on(store.ready());
            store.insert_message("q", i, &big);
            max_seen = max_seen.max(store.pending_bytes());
        }
        assert!(waited > 0, "the buffer never filled");
        store.flush_blocking().unwrap();
        assert!(
            max_seen <= limit + (33 << 10) + 4 * OP_OVERHEAD,
            "pending reached {max_seen}"
        );
        assert_eq!(store.load_messages("q").unwrap().len(), 300);
    }

    #[test]
    fn corrupt_record_is_a_corrupt_error_naming_the_path() {
        let dir = TempDir::new();
        let store = Store::open(dir.path()).unwrap();
        store.insert_message("q", 1, &msg(1));
        store.flush_blocking().unwrap();
        let sh = store.shared();
        let q = store.queue("q", true);
        let key = segment::key(&q.inner().prefix, 0, segment::KIND_META, 1);
        let loc = Meta::decode(1, &sh.segments.get(&key).unwrap().unwrap())
            .unwrap()
            .loc
            .unwrap();
        // A flipped byte in the chunk's bytes: a CRC mismatch, reported, not a panic.
        let path = sh.data.path_of(loc.file);
        let mut raw = std::fs::read(&path).unwrap();
        raw[loc.offset as usize + 3] ^= 0x40;
        std::fs::write(&path, raw).unwrap();
        let err = store.load_messages("q").unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, StorageError::Corrupt { .. }), "{err:?}");
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains("CRC mismatch"), "{text}");
        // A garbage meta is reported naming the store.
        sh.segments.insert(&key, &b"\x02garbage"[..]).unwrap();
        let err = store.load_messages("q").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(&dir.path().join("store").display().to_string()),
            "{text}"
        );
        assert!(text.contains("chunk meta of \"q\""), "{text}");

        // A malformed key is reported too.
        sh.segments.insert(b"xx", &b""[..]).unwrap();
        assert!(matches!(
            store.queue_keys_with_messages(),
            Err(StorageError::Corrupt { .. })
        ));
    }

    fn big(i: u64, size: usize) -> EncodedMessage {
        let mut body = i.to_be_bytes().to_vec();
        body.resize(size, b'x');
        EncodedMessage::new(&StoredMessage {
            body: Bytes::from(body),
            ..msg(i)
        })
    }

    fn fill_big(store: &Store, q: &QueueRef, from: u64, n: u64, size: usize) {
        store.submit(
            q,
            (from..from + n).map(|i| MessageOp::Insert {
                level: 0,
                pos: i,
                size: size as u32,
                durable: q.is_durable(),
                record: big(i, size),
            }),
        );
    }

    fn small_files() -> StoreOptions {
        StoreOptions {
            data_file_bytes: 16 << 10,
            ..StoreOptions::default()
        }
    }

    fn seg_files(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir.join(DATA_DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn data_files_roll_and_go_once_everything_is_settled() {
        let dir = TempDir::new();
        {
            let store = Store::open_with(dir.path(), small_files()).unwrap();
            let q = store.queue("q", true);
            for g in 0..20 {
                fill_big(&store, &q, g * 10, 10, 1000);
                store.flush_blocking().unwrap();
            }
            let files = store.shared().data.summary();
            assert!(files.len() >= 10, "rolled at 16 KiB: {files:?}");
            assert!(files.iter().all(|(_, size, live)| size == live));
            assert_eq!(seg_files(dir.path()).len(), files.len());
            // Chunks hold their messages, read back through the metas.
            let got = store.read(&q, 0, 0, usize::MAX, usize::MAX).unwrap();
            assert_eq!(got.len(), 200);
            assert!(got
                .iter()
                .all(|m| m.message.body[..8] == m.pos.to_be_bytes()));
            settle(&store, &q, 0, 0..200);
            store.flush_blocking().unwrap();
            // Every file but the (small) active one is unlinked after the flush.
            let left = store.shared().data.summary();
            assert!(left.len() <= 1, "{left:?}");
            assert!(left.iter().all(|(_, _, live)| *live == 0));
            assert_eq!(seg_files(dir.path()).len(), left.len());
            assert!(chunks(&store, &q).is_empty());
        }
        // Nothing points at what is left: unlinked at open.
        let store = Store::open_with(dir.path(), small_files()).unwrap();
        assert!(seg_files(dir.path()).is_empty());
        assert!(store.shared().data.summary().is_empty());
    }

    #[test]
    fn copy_forward_moves_live_chunks_out_of_mostly_dead_files() {
        let dir = TempDir::new();
        let store = Store::open_with(dir.path(), small_files()).unwrap();
        let (a, b) = (store.queue("a", true), store.queue("b", true));
        // Each group: 6 KiB for "a", 600 bytes for "b", side by side in a file.
        for g in 0..16 {
            fill_big(&store, &a, g * 6, 6, 1000);
            fill_big(&store, &b, g * 6, 6, 100);
            store.flush_blocking().unwrap();
        }
        let before = store.shared().data.summary();
        assert!(before.len() >= 5, "{before:?}");
        settle(&store, &a, 0, 0..96);
        store.flush_blocking().unwrap();
        let victims = store.shared().data.victims();
        assert!(!victims.is_empty(), "{:?}", store.shared().data.summary());
        // Groups go on (another queue's traffic); each copies a bounded slice.
        let c = store.queue("c", true);
        for i in 0..8 {
            fill_big(&store, &c, i, 1, 10);
            store.flush_blocking().unwrap();
        }
        assert!(store.shared().data.victims().is_empty());
        let after = store.shared().data.summary();
        for (n, _, _) in &before {
            if victims.contains(n) {
                assert!(!after.iter().any(|(m, _, _)| m == n), "{n} still there");
                assert!(!store.shared().data.path_of(*n).exists());
            }
        }
        let check = |store: &Store| {
            let got = store.read(&b, 0, 0, usize::MAX, usize::MAX).unwrap();
            assert_eq!(
                got.iter().map(|m| m.pos).collect::<Vec<_>>(),
                (0..96).collect::<Vec<_>>()
            );
            assert!(got
                .iter()
                .all(|m| m.message.body[..8] == m.pos.to_be_bytes()));
            // Every meta points at a file that exists.
            for item in store.shared().segments.iter() {
                let (k, v) = item.unwrap();
                let loc = Meta::decode(segment::key_first(&k).unwrap(), &v)
                    .unwrap()
                    .loc
                    .unwrap();
                assert!(store.shared().data.read(loc).unwrap().is_some());
            }
        };
        check(&store);
        drop(store);
        let store = Store::open_with(dir.path(), small_files()).unwrap();
        check(&store);
    }

    #[test]
    fn dead_bytes_and_a_torn_tail_are_accounted_at_open() {
        let dir = TempDir::new();
        {
            let store = Store::open(dir.path()).unwrap();
            let q = store.queue("q", true);
            fill_big(&store, &q, 0, 10, 1000);
            store.flush_blocking().unwrap();
            fill_big(&store, &q, 10, 10, 1000);
            store.flush_blocking().unwrap();
            settle(&store, &q, 0, 0..10);
            store.flush_blocking().unwrap();
        }
        // A group torn by a crash: bytes at the tail no meta points at.
        let name = seg_files(dir.path()).pop().unwrap();
        let path = dir.path().join(DATA_DIR).join(&name);
        let len = std::fs::metadata(&path).unwrap().len();
        {
            use std::io::Write;
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&path)
                .unwrap();
            f.write_all(&[0xAB; 777]).unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let files = store.shared().data.summary();
        assert_eq!(files.len(), 1);
        let (_, size, live) = files[0];
        assert_eq!(size, len + 777);
        assert!(
            live * 2 < size && live > 0,
            "{files:?}: first chunk and tail dead"
        );
        let q = store.queue("q", true);
        let got = store.read(&q, 0, 0, usize::MAX, usize::MAX).unwrap();
        assert_eq!(
            got.iter().map(|m| m.pos).collect::<Vec<_>>(),
            (10..20).collect::<Vec<_>>()
        );
        // New writes go to a new file, never after the torn tail.
        fill_big(&store, &q, 20, 1, 10);
        store.flush_blocking().unwrap();
        let names = seg_files(dir.path());
        assert_ne!(names.last(), Some(&name), "{names:?}");
        assert_eq!(
            store.read(&q, 0, 0, usize::MAX, usize::MAX).unwrap().len(),
            11
        );
    }

    #[test]
    fn a_format_2_store_is_refused_not_misread() {
        let dir = TempDir::new();
        drop(Store::open(dir.path()).unwrap());
        std::fs::write(dir.path().join("VERSION"), "warren-store 2\n").unwrap();
        let err = Store::open(dir.path()).unwrap_err();
        assert!(matches!(err, StorageError::Corrupt { .. }), "{err:?}");
        let text = err.to_string();
        assert!(
            text.contains("\"warren-store 2\"") && text.contains("format 2"),
            "{text}"
        );
        assert!(text.contains("not migrated"), "{text}");
    }

    #[test]
    fn a_format_1_store_is_refused_not_misread() {
        let dir = TempDir::new();
        drop(Store::open(dir.path()).unwrap());
        {
            let db = ::sled::open(dir.path().join("store")).unwrap();
            db.open_tree("messages")
                .unwrap()
                .insert(b"k", b"v")
                .unwrap();
            db.flush().unwrap();
        }
        let err = Store::open(dir.path()).unwrap_err();
        assert!(matches!(err, StorageError::Corrupt { .. }), "{err:?}");
        assert!(err.to_string().contains("store format 1"), "{err}");
        std::fs::write(dir.path().join("VERSION"), "warren-store 1\n").unwrap();
        let err = Store::open(dir.path()).unwrap_err();
        assert!(err.to_string().contains("format 1"), "{err}");
    }

    #[test]
    fn version_mismatch_and_missing_store_are_refused() {
        let dir = TempDir::new();
        drop(Store::open(dir.path()).unwrap());
        std::fs::write(dir.path().join("VERSION"), "warren-store 99\n").unwrap();
        let err = Store::open(dir.path()).unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, StorageError::Corrupt { .. }), "{err:?}");
        assert!(
            text.contains("VERSION") && text.contains("warren-store 99"),
            "{text}"
        );

        let dir = TempDir::new();
        drop(Store::open(dir.path()).unwrap());
        std::fs::remove_dir_all(dir.path().join("store")).unwrap();
        let err = Store::open(dir.path()).unwrap_err();
        assert!(matches!(err, StorageError::Corrupt { .. }), "{err:?}");
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn unreadable_store_is_an_open_error_naming_the_path() {
        let dir = TempDir::new();
        std::fs::write(dir.path().join("store"), b"not a directory").unwrap();
        let err = Store::open(dir.path()).unwrap_err();
        assert!(
            err.to_string()
                .contains(&dir.path().join("store").display().to_string()),
            "{err}"
        );
    }

    const CRASH_ENV: &str = "WARREN_STORE_CRASH_CHILD_DIR";

    /// Child half of `kill_9_keeps_every_synced_message`; does nothing
    /// unless the parent set `CRASH_ENV`.
    #[test]
    fn crash_child() {
        let Ok(dir) = std::env::var(CRASH_ENV) else {
            return;
        };
        let store = Store::open_with(Path::new(&dir), crash_options()).unwrap();
        store
            .put_topology(TopologyKind::Queue, "q", b"durable")
            .unwrap();
        // Unsynced background load, so the kill tends to land mid-batch.
        let noise = store.clone();
        std::thread::spawn(move || {
            let m = StoredMessage {
                body: Bytes::from(vec![1u8; 2048]),
                ..msg(0)
            };
            for i in 0u64.. {
                noise.insert_message("noise", i, &m);
                if i >= 16 {
                    noise.remove_message("noise", i - 16);
                }
                if i.is_multiple_of(50) {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
        });
        let started = Instant::now();
        let mut next = 1u64;
        let mut to_ack: Vec<u64> = Vec::new();
        while started.elapsed().as_secs() < 60 {
            let acked_through = to_ack.last().copied().unwrap_or(0);
            for s in to_ack.drain(..) {
                store.remove_message("q", s);
            }
            let first = next;
            for _ in 0..50 {
                store.insert_message("q", next, &msg(next));
                next += 1;
            }
            store.flush_blocking().unwrap();
            // Ack two of every three of this batch in the next group (chunks stay a
            // third live: their files are picked for copy-forward).
            to_ack.extend((first..next).filter(|s| !s.is_multiple_of(3)));
            println!(
                "synced {} acked_through {acked_through} copied {}",
                next - 1,
                store.shared().data.copied.load(Ordering::Relaxed)
            );
        }
    }

    /// Small data files, so the kill lands among rolls, unlinks and
    /// copy-forward passes: the noise queue's chunks (2 KiB messages) die a
    /// group or two after they are written while "q"'s stay, so files are
    /// mostly dead and "q"'s chunks are copied forward again and again.
    fn crash_options() -> StoreOptions {
        StoreOptions {
            data_file_bytes: 256 << 10,
            ..StoreOptions::default()
        }
    }

    #[test]
    fn kill_9_keeps_every_synced_message() {
        if std::env::var(CRASH_ENV).is_ok() {
            return;
        }
        let copied: u64 = (0..3).map(kill_9_round).sum();
        assert!(
            copied > 0,
            "no round copied anything forward before its kill"
        );
    }

    /// Returns the bytes the child copied forward before it was killed.
    fn kill_9_round(round: u64) -> u64 {
        let dir = TempDir::new();
        let module = module_path!();
        let test_name = format!("{}::crash_child", &module[module.find("::").unwrap() + 2..]);
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                test_name.as_str(),
                "--exact",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CRASH_ENV, dir.path())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut synced = 0u64;
        let mut acked_through = 0u64;
        let mut copied = 0u64;
        let mut killed = false;
        for line in stdout.lines() {
            let line = line.unwrap();
            let Some(rest) = line.strip_prefix("synced ") else {
                continue;
            };
            let mut parts = rest.split([' ']);
            synced = parts.next().unwrap().parse().unwrap();
            acked_through = parts.nth(1).unwrap().parse().unwrap();
            copied = parts.nth(1).unwrap().parse().unwrap();
            if synced >= 1000 && !killed {
                // A little jitter so rounds stop at different points.
                let jitter = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .subsec_nanos() as u64
                    % 15;
                std::thread::sleep(std::time::Duration::from_millis(jitter + 5 * round));
                child.kill().unwrap(); // SIGKILL on Unix
                killed = true;
            }
        }
        child.wait().unwrap();
        assert!(killed, "child stopped early after synced {synced}");
        assert!(synced >= 1000);

        let store = Store::open_with(dir.path(), crash_options()).unwrap();
        assert_eq!(store.load_topology(TopologyKind::Queue).unwrap().len(), 1);
        let got = store.load_messages("q").unwrap();
        assert!(
            got.windows(2).all(|w| w[0].0 < w[1].0),
            "seqs not strictly increasing"
        );
        let present: std::collections::HashSet<u64> = got.iter().map(|(s, _)| *s).collect();
        for s in 1..=synced {
            if !s.is_multiple_of(3) && s > acked_through {
                // Its ack may have been issued (not yet confirmed) before the
                // kill: present or absent are both correct.
                continue;
            }
            let acked = !s.is_multiple_of(3);
            assert_eq!(
                present.contains(&s),
                !acked,
                "seq {s} (synced {synced}, acked through {acked_through})"
            );
        }
        for (s, m) in &got {
            assert_eq!(m, &msg(*s));
        }
        eprintln!(
            "round {round}: kill -9 after {synced} synced (acked through {acked_through}, {copied} bytes copied forward): {} present, noise {}, data files {:?}",
            got.len(),
            store.load_messages("noise").unwrap().len(),
            store.shared().data.summary()
        );
        copied
    }

    /// `cargo test -- --ignored --nocapture bench_group_commit`
    #[test]
    #[ignore]
    fn bench_group_commit() {
        let dir = TempDir::new();
        let store = Store::open(dir.path()).unwrap();
        let publishers = 16u64;
        let per = 5000u64;
        let started = Instant::now();
        let threads: Vec<_> = (0..publishers)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    let body = Bytes::from(vec![b'x'; 1024]);
                    let m = StoredMessage { body, ..msg(0) };
                    let queue = format!("q{t}");
                    block_on(async {
                        let mut window = std::collections::VecDeque::new();
                        for i in 1..=per {
                            store.insert_message(&queue, i, &m);
                            window.push_back(store.sync());
                            // 64 unconfirmed messages in flight per publisher
                            if window.len() >= 64 {
                                window.pop_front().unwrap().await.unwrap();
                            }
                        }
                        for f in window {
                            f.await.unwrap();
                        }
                    })
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let secs = started.elapsed().as_secs_f64();
        let stats = store.stats();
        eprintln!(
            "{} confirmed 1 KiB inserts in {secs:.2}s: {:.0} inserts/s, {} flushes ({:.0} flushes/s, {:.1} msgs/flush)",
            publishers * per,
            (publishers * per) as f64 / secs,
            stats.flushes,
            stats.flushes as f64 / secs,
            (publishers * per) as f64 / stats.flushes as f64
        );

        // One publisher waiting for each confirm: bounded by flush latency.
        let before = store.stats().flushes;
        let started = Instant::now();
        let n = 500u64;
        block_on(async {
            for i in 1..=n {
                store.insert_message("serial", i, &msg(i));
                store.sync().await.unwrap();
            }
        });
        let secs = started.elapsed().as_secs_f64();
        eprintln!(
            "{n} serial insert+sync: {:.0} flushes/s ({:.2} ms per confirm)",
            (store.stats().flushes - before) as f64 / secs,
            secs * 1000.0 / n as f64
        );
    }
}

#[cfg(test)]
mod memory_probe {
    use super::*;

    fn rss_mib() -> u64 {
        std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map(|p| (p * 4096) >> 20)
            .unwrap_or(0)
    }

    /// RSS while 312 MiB of 4 KiB messages are written in 500-message groups
    /// (by hand: `cargo test --lib -- --ignored --nocapture memory_probe`).
    #[test]
    #[ignore]
    fn memory_probe() {
        let dir = std::env::temp_dir().join(format!("warren-probe-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open_with(
            &dir,
            StoreOptions {
                cache_capacity: 8 << 20,
                ..StoreOptions::default()
            },
        )
        .unwrap();
        let q = store.queue("q", true);
        let m = StoredMessage {
            exchange: String::new(),
            routing_key: "q".into(),
            properties: Bytes::new(),
            body: Bytes::from(vec![7u8; 4096]),
            redelivered: false,
            expires_at: None,
        };
        let rec = EncodedMessage::new(&m);
        let mut pos = 0;
        for round in 0..160 {
            store.submit(
                &q,
                (0..500).map(|_| {
                    pos += 1;
                    MessageOp::Insert {
                        level: 0,
                        pos,
                        size: 4096,
                        durable: true,
                        record: rec.clone(),
                    }
                }),
            );
            store.flush_blocking().unwrap();
            if round % 20 == 0 {
                eprintln!("{} MiB written: RSS {} MiB", pos * 4 / 1024, rss_mib());
            }
        }
        let rss = rss_mib();
        eprintln!(
            "done: RSS {rss} MiB, disk {} MiB",
            store.stats().bytes_on_disk >> 20
        );
        // 312 MiB written: what stays resident is sled's cache and buffers, not
        // data (measured with chunk bytes in data files: flat at 44 MiB).
        assert!(rss < 160, "RSS {rss} MiB");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
