//! The sled-backed [`Store`]: opening and recovering the data directory, the
//! topology tree, and the message trees written by a group-commit flusher
//! thread.
//!
//! # Group commit
//!
//! Message operations ([`MessageOp`]s given to `submit`, or one at a time to
//! `insert_message`, `remove_message`, `mark_redelivered`,
//! `delete_queue_messages`) are appended, already encoded, to a pending list
//! under a mutex; they never wait for disk. One
//! dedicated thread (`warren-store-flusher`) loops:
//!
//! 1. wait until something is pending, then take *all* pending operations and
//!    *all* registered waiters (`sync` futures, `on_durable` callbacks) at
//!    once;
//! 2. fold the operations, in call order, into one ordered write set per tree
//!    (so an insert followed by a remove of the same message before the flush
//!    collapses into a no-op delete: the body is never written) and apply it
//!    with one `apply_batch` per tree;
//! 3. call `db.flush()` once (fsync);
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
//! Each tree's batch is atomic in sled, and sled recovers a prefix of its
//! log. The `messages` batch is applied before the `redelivered` one; a crash
//! between them can at worst leave a redelivered flag whose message is gone,
//! and such orphans are removed when the store is opened.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use ::sled::{Batch, Db, IVec, Tree};
use bytes::Bytes;
use parking_lot::{Condvar, Mutex};

use super::codec;
use super::{StorageError, StoreStats, StoredMessage, TopologyKind, STORE_VERSION};

const TOPOLOGY_TREE: &str = "topology";
const MESSAGES_TREE: &str = "messages";
const REDELIVERED_TREE: &str = "redelivered";
const STORE_DIR: &str = "store";
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
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            max_pending_bytes: 64 << 20,
            cache_capacity: 256 << 20,
        }
    }
}

enum Op {
    Insert { key: IVec, record: IVec },
    Remove { key: IVec },
    MarkRedelivered { key: IVec },
    DeleteQueue { prefix: Vec<u8> },
}

impl Op {
    /// Bytes accounted against the pending limit.
    fn size(&self) -> usize {
        OP_OVERHEAD
            + match self {
                Op::Insert { key, record } => key.len() + record.len(),
                Op::Remove { key } | Op::MarkRedelivered { key } => key.len(),
                Op::DeleteQueue { prefix } => prefix.len(),
            }
    }
}

/// A message record encoded for the store, ready to buffer. Encoding is the
/// costly part of a write (the body is copied), so callers do it before they
/// take any lock.
#[derive(Debug, Clone)]
pub struct EncodedMessage(IVec);

impl EncodedMessage {
    pub fn new(msg: &StoredMessage) -> EncodedMessage {
        EncodedMessage(IVec::from(codec::encode_message(msg)))
    }

    pub fn from_parts(parts: &codec::MessageParts<'_>) -> EncodedMessage {
        EncodedMessage(IVec::from(codec::encode_parts(parts)))
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
#[derive(Debug, Clone)]
pub enum MessageOp {
    /// Write a message (a persistent message reached a durable queue).
    Insert { seq: u64, record: EncodedMessage },
    /// The message left the queue for good (acked, expired, dropped, purged).
    Remove { seq: u64 },
    /// The message was handed to a consumer: it comes back redelivered after a restart.
    MarkRedelivered { seq: u64 },
    /// The queue was deleted: drop all its messages.
    DeleteQueue,
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
struct Pending {
    ops: Vec<Op>,
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

struct Shared {
    data_dir: PathBuf,
    store_path: PathBuf,
    db: Db,
    topology: Tree,
    messages: Tree,
    redelivered: Tree,
    max_pending_bytes: usize,
    pending: Mutex<Pending>,
    /// The group the flusher is applying right now, readable by `get_message`
    /// until it is in the trees. Lock order: `pending`, then `inflight`.
    inflight: Mutex<Option<Arc<Vec<Op>>>>,
    /// Signalled when the pending list goes from idle to non-idle, or on shutdown.
    work: Condvar,
    /// Woken when the flusher takes the pending list (back-pressure release).
    room: tokio::sync::Notify,
    /// `pending.bytes`, readable without the lock (for [`Store::has_room`]).
    pending_hint: AtomicUsize,
    messages_written: AtomicU64,
    flushes: AtomicU64,
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
                            "unknown store format {:?}; this build of warren reads {STORE_VERSION:?}",
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
        let topology = tree(TOPOLOGY_TREE)?;
        let messages = tree(MESSAGES_TREE)?;
        let redelivered = tree(REDELIVERED_TREE)?;

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
            messages,
            redelivered,
            max_pending_bytes: options.max_pending_bytes.max(1),
            pending: Mutex::new(Pending::default()),
            inflight: Mutex::new(None),
            work: Condvar::new(),
            room: tokio::sync::Notify::new(),
            pending_hint: AtomicUsize::new(0),
            messages_written: AtomicU64::new(0),
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

    fn shared(&self) -> &Shared {
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

    fn topology_written(&self) {
        let sh = self.shared();
        let mut p = sh.pending.lock();
        let was_idle = p.idle();
        p.topology_dirty = true;
        drop(p);
        if was_idle {
            sh.work.notify_one();
        }
    }

    /// Buffers a message write into the current group-commit batch. Does not
    /// wait for disk, and never blocks (see the module docs on back-pressure).
    pub fn insert_message(&self, queue: &str, seq: u64, msg: &StoredMessage) {
        self.submit(
            queue,
            [MessageOp::Insert {
                seq,
                record: EncodedMessage::new(msg),
            }],
        );
    }

    /// Buffers the removal (ack) of a message and of its redelivered flag.
    pub fn remove_message(&self, queue: &str, seq: u64) {
        self.submit(queue, [MessageOp::Remove { seq }]);
    }

    /// Buffers a "this message has been delivered" flag, so it is loaded with
    /// `redelivered = true` after a restart. Writes a small key only.
    pub fn mark_redelivered(&self, queue: &str, seq: u64) {
        self.submit(queue, [MessageOp::MarkRedelivered { seq }]);
    }

    /// Buffers the removal of every message of `queue` (queue deleted or
    /// purged). Operations on the queue buffered after this call are kept.
    pub fn delete_queue_messages(&self, queue: &str) {
        self.submit(queue, [MessageOp::DeleteQueue]);
    }

    /// Buffers operations on the messages of `queue`, in order, into the
    /// current group-commit batch (one lock acquisition for all of them).
    /// Never blocks; see [`Store::ready`] for back-pressure.
    pub fn submit(&self, queue: &str, ops: impl IntoIterator<Item = MessageOp>) {
        let mut size = 0;
        let built: Vec<Op> = ops
            .into_iter()
            .map(|op| {
                let op = match op {
                    MessageOp::Insert { seq, record } => Op::Insert {
                        key: IVec::from(codec::message_key(queue, seq)),
                        record: record.0,
                    },
                    MessageOp::Remove { seq } => Op::Remove {
                        key: IVec::from(codec::message_key(queue, seq)),
                    },
                    MessageOp::MarkRedelivered { seq } => Op::MarkRedelivered {
                        key: IVec::from(codec::message_key(queue, seq)),
                    },
                    MessageOp::DeleteQueue => Op::DeleteQueue {
                        prefix: codec::queue_prefix(queue),
                    },
                };
                size += op.size();
                op
            })
            .collect();
        if built.is_empty() {
            return;
        }
        self.push(built, size);
    }

    fn push(&self, mut ops: Vec<Op>, size: usize) {
        let sh = self.shared();
        let mut p = sh.pending.lock();
        if p.stopped {
            drop(p);
            tracing::error!(path = %sh.data_dir.display(), "message store is shut down; dropping a write");
            return;
        }
        let was_idle = p.idle();
        if p.ops.is_empty() {
            p.ops = ops;
        } else {
            p.ops.append(&mut ops);
        }
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

    /// The messages of `queue` that have been applied (after a restart: that
    /// were durable), in seq order, with redelivered flags applied.
    pub fn load_messages(&self, queue: &str) -> Result<Vec<(u64, StoredMessage)>, StorageError> {
        let sh = self.shared();
        let prefix = codec::queue_prefix(queue);
        let mut flags = Vec::new();
        for item in sh.redelivered.scan_prefix(&prefix) {
            let (k, _) = item?;
            flags.push(sh.decode_key(&k)?.1);
        }
        let mut flags = flags.into_iter().peekable();
        let mut out = Vec::new();
        for item in sh.messages.scan_prefix(&prefix) {
            let (k, v) = item?;
            let (_, seq) = sh.decode_key(&k)?;
            let mut msg = codec::decode_message(Bytes::from(v.to_vec())).map_err(|e| {
                StorageError::Corrupt {
                    path: sh.store_path.clone(),
                    detail: format!("message {seq} of queue {queue:?}: {e}"),
                }
            })?;
            while flags.next_if(|&f| f < seq).is_some() {}
            if flags.next_if_eq(&seq).is_some() {
                msg.redelivered = true;
            }
            out.push((seq, msg));
        }
        Ok(out)
    }

    /// One message of `queue`, including writes still buffered or being applied
    /// (for paging a message back in). `None` if it was removed or never stored.
    /// The redelivered flag is not applied.
    pub fn get_message(
        &self,
        queue: &str,
        seq: u64,
    ) -> Result<Option<StoredMessage>, StorageError> {
        let sh = self.shared();
        let key = codec::message_key(queue, seq);
        let decode = |record: &[u8]| {
            codec::decode_message(Bytes::copy_from_slice(record)).map_err(|e| {
                StorageError::Corrupt {
                    path: sh.store_path.clone(),
                    detail: format!("message {seq} of queue {queue:?}: {e}"),
                }
            })
        };
        // Newest first: the buffered ops, then the group being applied.
        let found = {
            let p = sh.pending.lock();
            let inflight = sh.inflight.lock();
            let groups = [
                Some(p.ops.as_slice()),
                inflight.as_ref().map(|o| o.as_slice()),
            ];
            let mut found = None;
            'search: for ops in groups.into_iter().flatten() {
                for op in ops.iter().rev() {
                    match op {
                        Op::Insert { key: k, record } if k.as_ref() == key.as_slice() => {
                            found = Some(Some(record.clone()));
                            break 'search;
                        }
                        Op::Remove { key: k } if k.as_ref() == key.as_slice() => {
                            found = Some(None);
                            break 'search;
                        }
                        Op::DeleteQueue { prefix } if key.starts_with(prefix) => {
                            found = Some(None);
                            break 'search;
                        }
                        _ => {}
                    }
                }
            }
            found
        };
        match found {
            Some(Some(record)) => Ok(Some(decode(&record)?)),
            Some(None) => Ok(None),
            None => match sh.messages.get(&key)? {
                Some(record) => Ok(Some(decode(&record)?)),
                None => Ok(None),
            },
        }
    }

    /// Queue keys that have at least one stored message (applied ones).
    pub fn queue_keys_with_messages(&self) -> Result<Vec<String>, StorageError> {
        self.shared().queue_keys(&self.shared().messages)
    }

    pub fn stats(&self) -> StoreStats {
        let sh = self.shared();
        StoreStats {
            messages_written: sh.messages_written.load(Ordering::Relaxed),
            flushes: sh.flushes.load(Ordering::Relaxed),
            bytes_on_disk: sh.db.size_on_disk().unwrap_or(0),
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
    fn corrupt(&self, detail: impl Into<String>) -> StorageError {
        StorageError::Corrupt {
            path: self.store_path.clone(),
            detail: detail.into(),
        }
    }

    fn decode_key<'k>(&self, key: &'k [u8]) -> Result<(&'k str, u64), StorageError> {
        codec::decode_key(key).map_err(|e| self.corrupt(e.0))
    }

    /// Distinct queue keys in `tree`, skipping from one queue's prefix to the
    /// next (cost proportional to the number of queues, not messages).
    fn queue_keys(&self, tree: &Tree) -> Result<Vec<String>, StorageError> {
        let mut out = Vec::new();
        let mut from: Vec<u8> = Vec::new();
        while let Some(item) = tree.range(from.as_slice()..).next() {
            let (k, _) = item?;
            let (queue, _) = self.decode_key(&k)?;
            out.push(queue.to_owned());
            match codec::prefix_successor(&codec::queue_prefix(queue)) {
                Some(next) => from = next,
                None => break,
            }
        }
        Ok(out)
    }

    /// Startup: drop orphaned redelivered flags and log what was found.
    fn recover(&self, started: Instant, existed: bool) -> Result<(), StorageError> {
        let mut orphans = Batch::default();
        let mut orphan_count = 0usize;
        let mut flags = 0usize;
        for item in self.redelivered.iter() {
            let (k, _) = item?;
            flags += 1;
            if !self.messages.contains_key(&k)? {
                orphans.remove(k);
                orphan_count += 1;
            }
        }
        if orphan_count > 0 {
            self.redelivered.apply_batch(orphans)?;
            self.db.flush()?;
        }
        let queues = self.queue_keys(&self.messages)?.len();
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
            queues_with_messages = queues,
            redelivered_flags = flags - orphan_count,
            orphaned_flags_removed = orphan_count,
            topology = %topo.join(" "),
            bytes_on_disk = self.db.size_on_disk().unwrap_or(0),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "message store opened"
        );
        Ok(())
    }

    /// Folds one group of operations into per-tree write sets and applies them.
    fn apply(&self, ops: &[Op]) -> Result<(), StorageError> {
        let mut msgs: BTreeMap<IVec, Option<IVec>> = BTreeMap::new();
        let mut flags: BTreeMap<IVec, Option<IVec>> = BTreeMap::new();
        let mut inserts = 0u64;
        for op in ops {
            match op {
                Op::Insert { key, record } => {
                    inserts += 1;
                    msgs.insert(key.clone(), Some(record.clone()));
                }
                Op::Remove { key } => {
                    // Deleting an absent key is a no-op in sled, so an insert
                    // and remove in the same group cost nothing on disk.
                    flags.insert(key.clone(), None);
                    msgs.insert(key.clone(), None);
                }
                Op::MarkRedelivered { key } => {
                    flags.insert(key.clone(), Some(IVec::default()));
                }
                Op::DeleteQueue { prefix } => {
                    for (tree, set) in
                        [(&self.messages, &mut msgs), (&self.redelivered, &mut flags)]
                    {
                        for v in set.range_mut::<[u8], _>((
                            std::ops::Bound::Included(prefix.as_slice()),
                            std::ops::Bound::Unbounded,
                        )) {
                            if !v.0.starts_with(prefix) {
                                break;
                            }
                            *v.1 = None;
                        }
                        for k in tree.scan_prefix(prefix).keys() {
                            set.insert(k?, None);
                        }
                    }
                }
            }
        }
        let to_batch = |set: BTreeMap<IVec, Option<IVec>>| {
            let mut b = Batch::default();
            for (k, v) in set {
                match v {
                    Some(v) => b.insert(k, v),
                    None => b.remove(k),
                }
            }
            b
        };
        if !msgs.is_empty() {
            self.messages.apply_batch(to_batch(msgs))?;
        }
        if !flags.is_empty() {
            self.redelivered.apply_batch(to_batch(flags))?;
        }
        self.messages_written.fetch_add(inserts, Ordering::Relaxed);
        Ok(())
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
            let applied = sh.apply(&ops);
            *sh.inflight.lock() = None;
            let r = applied.and_then(|()| {
                sh.db.flush()?;
                Ok(())
            });
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
    fn round_trip_in_order() {
        let dir = TempDir::new();
        let store = Store::open(dir.path()).unwrap();
        // Out-of-order inserts still load in seq order.
        for i in [3u64, 1, 2, 300, 256] {
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
    }

    #[test]
    fn get_message_sees_buffered_and_flushed_writes() {
        let dir = TempDir::new();
        let store = Store::open(dir.path()).unwrap();
        store.insert_message("v\0q", 7, &msg(7));
        // Buffered (maybe not yet applied) writes are visible at once.
        assert_eq!(store.get_message("v\0q", 7).unwrap(), Some(msg(7)));
        store.flush_blocking().unwrap();
        assert_eq!(store.get_message("v\0q", 7).unwrap(), Some(msg(7)));
        assert_eq!(store.get_message("v\0q", 8).unwrap(), None);
        store.remove_message("v\0q", 7);
        assert_eq!(store.get_message("v\0q", 7).unwrap(), None);
        store.flush_blocking().unwrap();
        assert_eq!(store.get_message("v\0q", 7).unwrap(), None);
        store.insert_message("v\0q", 9, &msg(9));
        store.delete_queue_messages("v\0q");
        assert_eq!(store.get_message("v\0q", 9).unwrap(), None);
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
        assert_eq!(store.shared().redelivered.len(), 1);
    }

    #[test]
    fn orphaned_redelivered_flags_are_dropped_on_open() {
        let dir = TempDir::new();
        {
            let store = Store::open(dir.path()).unwrap();
            store.insert_message("q", 1, &msg(1));
            store.flush_blocking().unwrap();
            // Simulate a crash between the two trees' batches.
            let sh = store.shared();
            sh.redelivered
                .insert(codec::message_key("q", 7), &[])
                .unwrap();
            sh.db.flush().unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert!(store.shared().redelivered.is_empty());
        store.insert_message("q", 7, &msg(7));
        store.flush_blocking().unwrap();
        assert!(store
            .load_messages("q")
            .unwrap()
            .iter()
            .all(|(_, m)| !m.redelivered));
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
            "warren-store 1\n"
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
        sh.messages
            .insert(codec::message_key("q", 2), &b"\x01garbage"[..])
            .unwrap();
        let err = store.load_messages("q").unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, StorageError::Corrupt { .. }), "{err:?}");
        assert!(
            text.contains(&dir.path().join("store").display().to_string()),
            "{text}"
        );
        assert!(text.contains("message 2 of queue \"q\""), "{text}");

        // A malformed key is reported too.
        sh.messages.insert(b"xx", &b""[..]).unwrap();
        assert!(matches!(
            store.queue_keys_with_messages(),
            Err(StorageError::Corrupt { .. })
        ));
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
        let store = Store::open(Path::new(&dir)).unwrap();
        store
            .put_topology(TopologyKind::Queue, "q", b"durable")
            .unwrap();
        // Unsynced background load, so the kill tends to land mid-batch.
        let noise = store.clone();
        std::thread::spawn(move || {
            let m = StoredMessage {
                body: Bytes::from(vec![1u8; 512]),
                ..msg(0)
            };
            for i in 0u64.. {
                noise.insert_message("noise", i, &m);
                if i >= 2 {
                    noise.remove_message("noise", i - 2);
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
            // Ack multiples of 3 of this batch in the next group.
            to_ack.extend((first..next).filter(|s| s.is_multiple_of(3)));
            println!("synced {} acked_through {acked_through}", next - 1);
        }
    }

    #[test]
    fn kill_9_keeps_every_synced_message() {
        if std::env::var(CRASH_ENV).is_ok() {
            return;
        }
        for round in 0..3 {
            kill_9_round(round);
        }
    }

    fn kill_9_round(round: u64) {
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
        let mut killed = false;
        for line in stdout.lines() {
            let line = line.unwrap();
            let Some(rest) = line.strip_prefix("synced ") else {
                continue;
            };
            let mut parts = rest.split(" acked_through ");
            synced = parts.next().unwrap().parse().unwrap();
            acked_through = parts.next().unwrap().parse().unwrap();
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

        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.load_topology(TopologyKind::Queue).unwrap().len(), 1);
        let got = store.load_messages("q").unwrap();
        assert!(
            got.windows(2).all(|w| w[0].0 < w[1].0),
            "seqs not strictly increasing"
        );
        let present: std::collections::HashSet<u64> = got.iter().map(|(s, _)| *s).collect();
        for s in 1..=synced {
            if s.is_multiple_of(3) && s > acked_through {
                // Its ack may have been issued (not yet confirmed) before the
                // kill: present or absent are both correct.
                continue;
            }
            let acked = s.is_multiple_of(3);
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
            "round {round}: kill -9 after {synced} synced (acked through {acked_through}): {} present, noise {}",
            got.len(),
            store.load_messages("noise").unwrap().len()
        );
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
