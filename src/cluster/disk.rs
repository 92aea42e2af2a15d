//! Where a Raft group's store keeps its bytes: two key spaces, the log (keyed
//! by big-endian index) and the metadata (vote, commit index, state machine,
//! snapshot). Three homes: the metadata group's two trees in a sled database
//! of its own; one tree of a sled database that many groups share (a quorum
//! queue group's: log keys prefixed `l`, metadata keys `m:`; one flush of the
//! database covers every group's writes; values over 4 KiB go to the node's
//! value files, `super::values`, and the tree keeps a pointer); or, for the deterministic
//! simulations of the groups (`tests/raft_sim.rs`, `tests/quorum_sim.rs`),
//! memory that behaves like a disk: a write is volatile until a flush, a flush
//! takes (virtual) time, and a crash keeps what was flushed plus a prefix of
//! the writes after it (a batch is one write, as sled's batches are atomic;
//! an append's entries are a write each, as they go into sled).

use super::values::{self, Pointer, ValueLog};
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::io;
use std::ops::Bound;
use std::sync::Arc;
use std::time::Duration;

/// One of the two trees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tree {
    Log,
    Meta,
}

/// A handle on the store's bytes (cheap to clone).
#[derive(Clone)]
pub(crate) enum Disk {
    Sled {
        db: sled::Db,
        log: sled::Tree,
        meta: sled::Tree,
        /// The metadata keys of [`LARGE_KEYS`], in a tree of their own.
        large: sled::Tree,
    },
    /// One tree of a database shared with other groups: both key spaces in
    /// it, told apart by a prefix ([`shared_key`]); values over
    /// [`values::INLINE_MAX`] in the node's value files, a pointer in the
    /// tree ([`super::values`]).
    Shared {
        db: sled::Db,
        tree: sled::Tree,
        values: Arc<ValueLog>,
    },
    Memory(MemoryHandle),
}

/// The metadata keys whose values grow with the state (the snapshot, the
/// state machine's base): a [`Disk::Sled`] keeps them in a tree of their
/// own. sled stores a tree node larger than its blob threshold as a file
/// and writes it again whenever the node is rewritten, which updates to
/// any key in it cause after a few of them; in one node with the vote,
/// the commit index and the state machine's tail (written at every apply),
/// a declare cost the whole model in blob writes again (measured: 470 KB
/// per declare at 13,000 queues).
const LARGE_KEYS: [&[u8]; 2] = [super::store::SNAPSHOT, super::store::SM];

/// Where the log's keys start in a [`Disk::Shared`] tree.
const SHARED_LOG: u8 = b'l';

/// A key of `tree` as a [`Disk::Shared`] tree spells it: `l` and the index
/// for the log, `m:` and the name for the metadata (the purge mark is
/// `m:purged`, as the quorum groups' store wrote it before it shared the
/// metadata group's code).
fn shared_key(tree: Tree, key: &[u8]) -> Vec<u8> {
    match tree {
        Tree::Log => [&[SHARED_LOG][..], key].concat(),
        Tree::Meta if key == b"last_purged" => b"m:purged".to_vec(),
        Tree::Meta => [&b"m:"[..], key].concat(),
    }
}

/// The log index a stored log key names (a key of another length: past the end).
fn index_of_key(k: &[u8]) -> u64 {
    u64::from_be_bytes(k.try_into().unwrap_or([0xff; 8]))
}

/// A change of one key.
#[derive(Debug, Clone)]
pub(crate) enum Write {
    Put(Tree, Vec<u8>, Vec<u8>),
    Del(Tree, Vec<u8>),
}

/// How much [`Disk::get_reader`] reads from a value file at a time.
const READ_BUF: usize = 256 << 10;

/// Where [`Disk::put_streamed`] writes a value: memory, until a body that
/// grows long on a store with value files goes on to a file of its own.
enum Spill<'a> {
    Memory {
        buf: Vec<u8>,
        head_len: usize,
        values: Option<&'a ValueLog>,
    },
    File(values::AloneWriter<'a>),
}

impl io::Write for Spill<'_> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        match self {
            Spill::Memory {
                buf,
                head_len,
                values,
            } => {
                buf.extend_from_slice(b);
                if let Some(values) = values.filter(|_| buf.len() >= values::OWN_FILE_AT) {
                    let mut w = values.stream_alone(*head_len)?;
                    w.write_all(&buf[*head_len..])?;
                    *self = Spill::File(w);
                }
                Ok(b.len())
            }
            Spill::File(w) => w.write(b),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn sled_err(e: sled::Error) -> io::Error {
    io::Error::other(e)
}

/// A shared tree's stored value: itself, or the value its pointer names.
fn resolve(values: &ValueLog, stored: &[u8]) -> io::Result<Vec<u8>> {
    match Pointer::decode(stored) {
        Some(p) => values.get(&p),
        None => Ok(stored.to_vec()),
    }
}

/// Whether `writes` are an append: log entries only, nothing removed (sled
/// takes them key by key, [`crate::storage::apply_changes`], and a crash can
/// keep a prefix of them).
fn is_append(writes: &[Write]) -> bool {
    writes
        .iter()
        .all(|w| matches!(w, Write::Put(Tree::Log, ..)))
}

/// The value files named by pointers in `db`'s trees (every quorum group's),
/// for [`ValueLog::collect`].
pub(crate) fn referenced_files(db: &sled::Db) -> io::Result<std::collections::BTreeSet<u64>> {
    let mut live = std::collections::BTreeSet::new();
    for name in db.tree_names() {
        let tree = db.open_tree(&name).map_err(sled_err)?;
        for kv in tree.iter().values() {
            if let Some(p) = Pointer::decode(&kv.map_err(sled_err)?) {
                live.insert(p.file);
            }
        }
    }
    Ok(live)
}

impl Disk {
    pub(crate) fn open_sled(dir: &std::path::Path) -> Result<Disk, sled::Error> {
        let db = sled::Config::new().path(dir).flush_every_ms(None).open()?;
        Ok(Disk::Sled {
            log: db.open_tree("log")?,
            meta: db.open_tree("meta")?,
            large: db.open_tree("meta_large")?,
            db,
        })
    }

    pub(crate) fn get(&self, tree: Tree, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        match self {
            Disk::Sled {
                log, meta, large, ..
            } => {
                let t = match tree {
                    Tree::Log => log,
                    // Written by an earlier version: in the metadata tree
                    // until the next write of the key moves it.
                    Tree::Meta if LARGE_KEYS.contains(&key) => {
                        if let Some(v) = large.get(key).map_err(sled_err)? {
                            return Ok(Some(v.to_vec()));
                        }
                        meta
                    }
                    Tree::Meta => meta,
                };
                Ok(t.get(key).map_err(sled_err)?.map(|v| v.to_vec()))
            }
            Disk::Shared {
                tree: t, values, ..
            } => t
                .get(shared_key(tree, key))
                .map_err(sled_err)?
                .map(|v| resolve(values, &v))
                .transpose(),
            Disk::Memory(m) => m.read(|s| s.volatile(tree).get(key).cloned()),
        }
    }

    /// The value of `key` in `tree`, to read a part at a time: a value in
    /// a file ([`Disk::Shared`], a long queue's snapshot) is not read into
    /// memory whole (and, when `checked`, it is checked against its CRC
    /// first, a block at a time: unchecked only to peek at its head).
    pub(crate) fn get_reader(
        &self,
        tree: Tree,
        key: &[u8],
        checked: bool,
    ) -> io::Result<Option<Box<dyn io::BufRead + Send>>> {
        if let Some((values, p)) = self.value_pointer(tree, key)? {
            let r = io::BufReader::with_capacity(READ_BUF, values.reader(&p, checked)?);
            return Ok(Some(Box::new(r)));
        }
        let v = self.get(tree, key)?;
        Ok(v.map(|v| Box::new(io::Cursor::new(v)) as Box<dyn io::BufRead + Send>))
    }

    /// The value of `key` in `tree` when it is a file of its own (a long
    /// queue's snapshot on a [`Disk::Shared`]), checked against its CRC: a
    /// handle at its start, and its length.
    pub(crate) fn get_file(
        &self,
        tree: Tree,
        key: &[u8],
    ) -> io::Result<Option<(std::fs::File, u64)>> {
        let Some((values, p)) = self.value_pointer(tree, key)? else {
            return Ok(None);
        };
        Ok(values.file_alone(&p)?.map(|f| (f, u64::from(p.len))))
    }

    /// Where the value of `key` in `tree` is, when it is in a value file
    /// ([`Disk::Shared`] only), and the log of that file.
    fn value_pointer(&self, tree: Tree, key: &[u8]) -> io::Result<Option<(&ValueLog, Pointer)>> {
        let Disk::Shared {
            tree: t, values, ..
        } = self
        else {
            return Ok(None);
        };
        let stored = t.get(shared_key(tree, key)).map_err(sled_err)?;
        Ok(stored
            .and_then(|v| Pointer::decode(&v))
            .map(|p| (&**values, p)))
    }

    /// Where the value files are ([`Disk::Shared`] only).
    pub(crate) fn values_dir(&self) -> Option<&std::path::Path> {
        self.value_log().map(ValueLog::dir)
    }

    /// The value files ([`Disk::Shared`] only).
    fn value_log(&self) -> Option<&ValueLog> {
        match self {
            Disk::Shared { values, .. } => Some(values),
            Disk::Sled { .. } | Disk::Memory(_) => None,
        }
    }

    /// Put at `key` in `tree` the value `head ++ body`, `body` being what
    /// `write` writes and `head` (`head_len` bytes) what `head` makes of the
    /// body's length once it is written. On a [`Disk::Shared`], a body that
    /// grows to [`values::OWN_FILE_AT`] goes on to a file of its own a block
    /// at a time (a long queue's snapshot is not held whole in memory);
    /// elsewhere, and below that, the value is written as [`Self::write`]
    /// writes it.
    pub(crate) fn put_streamed(
        &self,
        tree: Tree,
        key: &[u8],
        head_len: usize,
        write: impl FnOnce(&mut dyn io::Write) -> io::Result<()>,
        head: impl FnOnce(u64) -> io::Result<Vec<u8>>,
    ) -> io::Result<()> {
        let mut out = Spill::Memory {
            buf: vec![0; head_len],
            head_len,
            values: self.value_log(),
        };
        write(&mut out)?;
        match out {
            Spill::Memory { mut buf, .. } => {
                let h = head((buf.len() - head_len) as u64)?;
                if h.len() != head_len {
                    return Err(io::Error::other("a head of the wrong length"));
                }
                buf[..head_len].copy_from_slice(&h);
                self.write(vec![Write::Put(tree, key.to_vec(), buf)])
            }
            Spill::File(w) => {
                let h = head(w.written())?;
                let (p, landing) = w.finish(&h)?;
                self.write(vec![Write::Put(tree, key.to_vec(), p.encode())])?;
                drop(landing);
                Ok(())
            }
        }
    }

    /// Apply `writes` together: all of them or none survive a crash.
    pub(crate) fn write(&self, mut writes: Vec<Write>) -> io::Result<()> {
        match self {
            Disk::Sled {
                log, meta, large, ..
            } => {
                let (mut to_log, mut to_meta, mut to_large) = (Vec::new(), Vec::new(), Vec::new());
                for w in writes {
                    let (tree, k, v) = match w {
                        Write::Put(t, k, v) => (t, k, Some(v)),
                        Write::Del(t, k) => (t, k, None),
                    };
                    match tree {
                        Tree::Log => to_log.push((k, v)),
                        Tree::Meta if LARGE_KEYS.contains(&k.as_slice()) => {
                            // An earlier version's copy goes once this is in.
                            if meta.contains_key(&k).map_err(sled_err)? {
                                to_meta.push((k.clone(), None));
                            }
                            to_large.push((k, v));
                        }
                        Tree::Meta => to_meta.push((k, v)),
                    }
                }
                let append = to_log.iter().all(|(_, v)| v.is_some());
                crate::storage::apply_changes(log, to_log, append).map_err(sled_err)?;
                crate::storage::apply_changes(large, to_large, false).map_err(sled_err)?;
                crate::storage::apply_changes(meta, to_meta, false).map_err(sled_err)
            }
            Disk::Shared { tree, values, .. } => {
                // Very large values (snapshots of long queues) first, each
                // to a file of its own, outside the lock below; their
                // pointers go in like small values.
                let mut landing = Vec::new();
                for w in &mut writes {
                    if let Write::Put(_, _, v) = w {
                        if v.len() >= values::OWN_FILE_AT {
                            let (p, l) = values.put_alone(v)?;
                            landing.push(l);
                            *v = p.encode();
                        }
                    }
                }
                // No collection of the value files while the pointers are
                // on their way into the tree.
                let _writing = values.writes.read();
                let mut changes = Vec::with_capacity(writes.len());
                let mut spilled = false;
                let append = is_append(&writes);
                for w in writes {
                    match w {
                        Write::Put(t, k, v) if v.len() > values::INLINE_MAX => {
                            let p = values.put(&v)?;
                            changes.push((shared_key(t, &k), Some(p.encode())));
                            spilled = true;
                        }
                        Write::Put(t, k, v) => changes.push((shared_key(t, &k), Some(v))),
                        Write::Del(t, k) => changes.push((shared_key(t, &k), None)),
                    }
                }
                // The values are durable before any pointer can be.
                if spilled {
                    values.sync()?;
                }
                crate::storage::apply_changes(tree, changes, append).map_err(sled_err)?;
                drop(landing);
                Ok(())
            }
            Disk::Memory(m) => m.write(writes),
        }
    }

    /// Empty both trees.
    pub(crate) fn clear(&self) -> io::Result<()> {
        match self {
            Disk::Sled {
                log, meta, large, ..
            } => {
                log.clear().map_err(sled_err)?;
                large.clear().map_err(sled_err)?;
                meta.clear().map_err(sled_err)
            }
            Disk::Shared { tree, .. } => tree.clear().map_err(sled_err),
            Disk::Memory(m) => {
                let all = m.read(|s| {
                    [Tree::Log, Tree::Meta]
                        .into_iter()
                        .flat_map(|t| s.volatile(t).keys().map(move |k| Write::Del(t, k.clone())))
                        .collect()
                })?;
                m.write(all)
            }
        }
    }

    /// The log entries with index keys in `[from, to]` (`to` None: to the end), in order.
    pub(crate) fn log_range(&self, from: u64, to: Option<u64>) -> io::Result<Vec<(u64, Vec<u8>)>> {
        self.log_rows(from, to, true)
    }

    /// The indexes of the log entries in `[from, to]`, in order: their
    /// values are not read (a purge behind a long queue's snapshot read
    /// every body it removed).
    pub(crate) fn log_keys(&self, from: u64, to: Option<u64>) -> io::Result<Vec<u64>> {
        let rows = self.log_rows(from, to, false)?;
        Ok(rows.into_iter().map(|(i, _)| i).collect())
    }

    /// [`Self::log_range`], the values left empty unless `values`.
    fn log_rows(
        &self,
        from: u64,
        to: Option<u64>,
        with_values: bool,
    ) -> io::Result<Vec<(u64, Vec<u8>)>> {
        let value = |v: &[u8]| if with_values { v.to_vec() } else { Vec::new() };
        let start = Bound::Included(from.to_be_bytes().to_vec());
        let end = match to {
            Some(t) => Bound::Included(t.to_be_bytes().to_vec()),
            None => Bound::Unbounded,
        };
        match self {
            Disk::Sled { log, .. } => log
                .range::<Vec<u8>, _>((start, end))
                .map(|kv| {
                    kv.map(|(k, v)| (index_of_key(&k), value(&v)))
                        .map_err(sled_err)
                })
                .collect(),
            Disk::Shared { tree, values, .. } => {
                let prefixed = |b: Bound<Vec<u8>>| match b {
                    Bound::Included(k) => Bound::Included(shared_key(Tree::Log, &k)),
                    // The end of the log's keys, before the metadata's.
                    _ => Bound::Excluded(vec![SHARED_LOG + 1]),
                };
                tree.range::<Vec<u8>, _>((prefixed(start), prefixed(end)))
                    .map(|kv| {
                        let (k, v) = kv.map_err(sled_err)?;
                        let v = if with_values {
                            resolve(values, &v)?
                        } else {
                            Vec::new()
                        };
                        Ok((index_of_key(&k[1..]), v))
                    })
                    .collect()
            }
            Disk::Memory(m) => m.read(|s| {
                s.volatile(Tree::Log)
                    .range((start, end))
                    .map(|(k, v)| (index_of_key(k), value(v)))
                    .collect()
            }),
        }
    }

    /// The last log entry's value.
    pub(crate) fn log_last(&self) -> io::Result<Option<Vec<u8>>> {
        match self {
            Disk::Sled { log, .. } => Ok(log.last().map_err(sled_err)?.map(|(_, v)| v.to_vec())),
            Disk::Shared { tree, values, .. } => tree
                .range(vec![SHARED_LOG]..vec![SHARED_LOG + 1])
                .next_back()
                .transpose()
                .map_err(sled_err)?
                .map(|(_, v)| resolve(values, &v))
                .transpose(),
            Disk::Memory(m) => m.read(|s| s.volatile(Tree::Log).values().next_back().cloned()),
        }
    }

    pub(crate) fn log_is_empty(&self) -> bool {
        match self {
            Disk::Sled { log, .. } => log.is_empty(),
            Disk::Shared { tree, .. } => tree
                .range(vec![SHARED_LOG]..vec![SHARED_LOG + 1])
                .next()
                .is_none(),
            Disk::Memory(m) => m.read(|s| s.volatile(Tree::Log).is_empty()).unwrap_or(true),
        }
    }

    /// Make every write so far durable.
    pub(crate) async fn flush(&self) -> io::Result<()> {
        match self {
            Disk::Sled { db, .. } | Disk::Shared { db, .. } => {
                db.flush_async().await.map(drop).map_err(sled_err)
            }
            Disk::Memory(m) => m.flush().await,
        }
    }

    /// [`Self::flush`], blocking.
    pub(crate) fn flush_blocking(&self) -> io::Result<()> {
        match self {
            Disk::Sled { db, .. } | Disk::Shared { db, .. } => {
                db.flush().map(drop).map_err(sled_err)
            }
            Disk::Memory(m) => m.flush_now(),
        }
    }
}

#[derive(Default)]
struct MemState {
    /// Bumped by each crash: handles of an earlier life fail.
    generation: u64,
    durable: [BTreeMap<Vec<u8>, Vec<u8>>; 2],
    volatile: [BTreeMap<Vec<u8>, Vec<u8>>; 2],
    /// The writes since the last flush, in order; each entry is one atomic write.
    pending: Vec<Vec<Write>>,
    flush_latency: Duration,
}

fn slot(tree: Tree) -> usize {
    match tree {
        Tree::Log => 0,
        Tree::Meta => 1,
    }
}

fn apply(trees: &mut [BTreeMap<Vec<u8>, Vec<u8>>; 2], w: &Write) {
    match w {
        Write::Put(t, k, v) => {
            trees[slot(*t)].insert(k.clone(), v.clone());
        }
        Write::Del(t, k) => {
            trees[slot(*t)].remove(k);
        }
    }
}

impl MemState {
    fn volatile(&self, tree: Tree) -> &BTreeMap<Vec<u8>, Vec<u8>> {
        &self.volatile[slot(tree)]
    }
}

/// A disk in memory for the simulation: it outlives the store handles of a
/// node, so a node "restarts" by opening a store on the same disk after
/// [`MemoryDisk::crash`].
#[derive(Clone, Default)]
pub struct MemoryDisk {
    state: Arc<Mutex<MemState>>,
}

impl MemoryDisk {
    /// An empty disk whose flushes take `flush_latency` of (tokio) time.
    pub fn new(flush_latency: Duration) -> MemoryDisk {
        let d = MemoryDisk::default();
        d.state.lock().flush_latency = flush_latency;
        d
    }

    /// How many writes are not flushed yet.
    pub fn unflushed(&self) -> usize {
        self.state.lock().pending.len()
    }

    /// The node dies: the first `keep` unflushed writes reach the disk (as
    /// they may have before the power went), the rest are lost, and every
    /// handle opened before fails from now on.
    pub fn crash(&self, keep: usize) {
        let mut s = self.state.lock();
        s.generation += 1;
        let pending = std::mem::take(&mut s.pending);
        for batch in pending.iter().take(keep) {
            for w in batch {
                apply(&mut s.durable, w);
            }
        }
        s.volatile = s.durable.clone();
    }

    /// A disk of its own holding what this one holds durably: what a crash
    /// now that kept none of the unflushed writes would leave (the
    /// simulation checks what was acknowledged against it).
    pub fn durable_copy(&self) -> MemoryDisk {
        let s = self.state.lock();
        let copy = MemoryDisk::new(s.flush_latency);
        {
            let mut c = copy.state.lock();
            c.durable = s.durable.clone();
            c.volatile = s.durable.clone();
        }
        copy
    }

    pub(crate) fn handle(&self) -> MemoryHandle {
        MemoryHandle {
            generation: self.state.lock().generation,
            state: Arc::clone(&self.state),
        }
    }
}

/// A store's handle on a [`MemoryDisk`], valid until the next crash.
#[derive(Clone)]
pub(crate) struct MemoryHandle {
    state: Arc<Mutex<MemState>>,
    generation: u64,
}

fn crashed() -> io::Error {
    io::Error::other("the simulated node crashed")
}

impl MemoryHandle {
    fn read<T>(&self, f: impl FnOnce(&MemState) -> T) -> io::Result<T> {
        let s = self.state.lock();
        if s.generation != self.generation {
            return Err(crashed());
        }
        Ok(f(&s))
    }

    fn write(&self, writes: Vec<Write>) -> io::Result<()> {
        let mut s = self.state.lock();
        if s.generation != self.generation {
            return Err(crashed());
        }
        for w in &writes {
            apply(&mut s.volatile, w);
        }
        // An append is written key by key, as sled writes it: a crash can
        // keep a prefix of it.
        if is_append(&writes) {
            s.pending.extend(writes.into_iter().map(|w| vec![w]));
        } else {
            s.pending.push(writes);
        }
        Ok(())
    }

    async fn flush(&self) -> io::Result<()> {
        let latency = self.read(|s| s.flush_latency)?;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        self.flush_now()
    }

    fn flush_now(&self) -> io::Result<()> {
        let mut s = self.state.lock();
        if s.generation != self.generation {
            return Err(crashed());
        }
        let pending = std::mem::take(&mut s.pending);
        for batch in &pending {
            for w in batch {
                apply(&mut s.durable, w);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(k: &str, v: &str) -> Vec<Write> {
        vec![Write::Put(Tree::Meta, k.into(), v.into())]
    }

    #[test]
    fn a_crash_keeps_the_flushed_writes_and_a_prefix_of_the_rest() {
        let disk = MemoryDisk::new(Duration::ZERO);
        let d = Disk::Memory(disk.handle());
        d.write(put("a", "1")).unwrap();
        d.flush_blocking().unwrap();
        d.write(put("b", "2")).unwrap();
        d.write(put("c", "3")).unwrap();
        assert_eq!(disk.unflushed(), 2);
        let copy = Disk::Memory(disk.durable_copy().handle());
        assert_eq!(copy.get(Tree::Meta, b"a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(copy.get(Tree::Meta, b"b").unwrap(), None);
        assert_eq!(d.get(Tree::Meta, b"b").unwrap(), Some(b"2".to_vec()));
        disk.crash(1);
        assert!(d.get(Tree::Meta, b"a").is_err(), "an old handle fails");
        let d = Disk::Memory(disk.handle());
        assert_eq!(d.get(Tree::Meta, b"a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(d.get(Tree::Meta, b"b").unwrap(), Some(b"2".to_vec()));
        assert_eq!(d.get(Tree::Meta, b"c").unwrap(), None);
    }

    #[test]
    fn sled_and_memory_answer_alike() {
        let dir = std::env::temp_dir().join(format!("warren-disk-{}", std::process::id()));
        let memory = MemoryDisk::new(Duration::ZERO);
        let shared = sled::Config::new().temporary(true).open().unwrap();
        // A neighbour group's tree in the same database is left alone.
        let other = shared.open_tree("other").unwrap();
        other
            .insert(shared_key(Tree::Log, &[0; 8]), &b"x"[..])
            .unwrap();
        let values = ValueLog::open(&dir.join("values")).unwrap();
        let large = vec![5u8; values::INLINE_MAX + 1];
        for d in [
            Disk::open_sled(&dir.join("sled")).unwrap(),
            Disk::Shared {
                tree: shared.open_tree("group").unwrap(),
                db: shared.clone(),
                values: Arc::clone(&values),
            },
            Disk::Memory(memory.handle()),
        ] {
            let batch = (1u64..=4)
                .map(|i| Write::Put(Tree::Log, i.to_be_bytes().to_vec(), vec![i as u8]))
                .collect();
            d.write(batch).unwrap();
            // A large value reads back the same wherever it is kept.
            let key = 9u64.to_be_bytes().to_vec();
            d.write(vec![Write::Put(Tree::Log, key.clone(), large.clone())])
                .unwrap();
            d.write(vec![Write::Put(
                Tree::Meta,
                b"snap".to_vec(),
                large.clone(),
            )])
            .unwrap();
            assert_eq!(d.log_range(9, None).unwrap(), vec![(9, large.clone())]);
            assert_eq!(d.log_last().unwrap(), Some(large.clone()));
            assert_eq!(d.get(Tree::Meta, b"snap").unwrap(), Some(large.clone()));
            if let Disk::Shared { db, tree, .. } = &d {
                let stored = tree.get(shared_key(Tree::Log, &key)).unwrap().unwrap();
                assert_eq!(
                    Pointer::decode(&stored).map(|p| p.len as usize),
                    Some(large.len())
                );
                assert_eq!(referenced_files(db).unwrap().len(), 1);
            }
            // A value written a part at a time reads back the same, whole
            // or a part at a time; a long one on the shared store goes to
            // a file of its own.
            for body_len in [10, values::OWN_FILE_AT + 10] {
                let body: Vec<u8> = (0..body_len).map(|i| (i % 251) as u8).collect();
                let parts =
                    |w: &mut dyn io::Write| body.chunks(1000).try_for_each(|p| w.write_all(p));
                let head = |n: u64| Ok(vec![1, 2, (n % 256) as u8]);
                d.put_streamed(Tree::Meta, b"streamed", 3, parts, head)
                    .unwrap();
                let want = [&[1, 2, (body_len % 256) as u8][..], &body].concat();
                assert_eq!(d.get(Tree::Meta, b"streamed").unwrap(), Some(want.clone()));
                let mut read = Vec::new();
                let mut r = d
                    .get_reader(Tree::Meta, b"streamed", true)
                    .unwrap()
                    .unwrap();
                r.read_to_end(&mut read).unwrap();
                assert!(read == want, "read a part at a time");
                if let Disk::Shared { tree, .. } = &d {
                    let stored = tree.get(shared_key(Tree::Meta, b"streamed")).unwrap();
                    let p = stored.and_then(|v| Pointer::decode(&v));
                    let alone = body_len >= values::OWN_FILE_AT;
                    assert_eq!(
                        p.map(|p| (p.offset, p.len as usize)),
                        alone.then_some((0, want.len()))
                    );
                }
            }
            d.write(vec![
                Write::Del(Tree::Log, key),
                Write::Del(Tree::Meta, b"snap".to_vec()),
                Write::Del(Tree::Meta, b"streamed".to_vec()),
            ])
            .unwrap();
            d.write(put("vote", "v")).unwrap();
            d.write(vec![Write::Del(Tree::Log, 4u64.to_be_bytes().to_vec())])
                .unwrap();
            d.flush_blocking().unwrap();
            assert_eq!(d.log_keys(2, None).unwrap(), vec![2, 3]);
            let rows = d.log_range(2, Some(3)).unwrap();
            assert_eq!(rows, vec![(2, vec![2]), (3, vec![3])]);
            assert_eq!(d.log_range(2, None).unwrap().len(), 2);
            assert_eq!(d.log_last().unwrap(), Some(vec![3]));
            assert_eq!(d.get(Tree::Meta, b"vote").unwrap(), Some(b"v".to_vec()));
            d.clear().unwrap();
            assert!(d.log_is_empty());
            assert_eq!(d.log_last().unwrap(), None);
            assert_eq!(d.get(Tree::Meta, b"vote").unwrap(), None);
        }
        assert_eq!(other.len(), 1);
        // The shared layout is the one the quorum store wrote before.
        let tree = shared.open_tree("group").unwrap();
        let d = Disk::Shared {
            tree: tree.clone(),
            db: shared.clone(),
            values,
        };
        d.write(vec![
            Write::Put(Tree::Log, 3u64.to_be_bytes().to_vec(), vec![3]),
            Write::Put(Tree::Meta, b"last_purged".to_vec(), vec![1]),
            Write::Put(Tree::Meta, b"vote".to_vec(), vec![2]),
        ])
        .unwrap();
        let keys: Vec<Vec<u8>> = tree.iter().keys().map(|k| k.unwrap().to_vec()).collect();
        let log_key = [&b"l"[..], &3u64.to_be_bytes()].concat();
        assert_eq!(
            keys,
            vec![log_key, b"m:purged".to_vec(), b"m:vote".to_vec()]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_snapshot_and_base_live_apart_from_the_small_keys() {
        let dir = std::env::temp_dir().join(format!("warren-disk-large-{}", std::process::id()));
        let d = Disk::open_sled(&dir).unwrap();
        let Disk::Sled { meta, large, .. } = &d else {
            panic!("a sled disk");
        };
        // An earlier version kept the base in the metadata tree: read there
        // until the next write moves it.
        meta.insert(super::super::store::SM, &b"old base"[..])
            .unwrap();
        assert_eq!(
            d.get(Tree::Meta, super::super::store::SM).unwrap(),
            Some(b"old base".to_vec())
        );
        d.write(vec![
            Write::Put(
                Tree::Meta,
                super::super::store::SNAPSHOT.to_vec(),
                b"snap".to_vec(),
            ),
            Write::Put(
                Tree::Meta,
                super::super::store::SM.to_vec(),
                b"base".to_vec(),
            ),
            Write::Put(Tree::Meta, b"vote".to_vec(), b"v".to_vec()),
        ])
        .unwrap();
        assert_eq!(
            d.get(Tree::Meta, super::super::store::SM).unwrap(),
            Some(b"base".to_vec())
        );
        let keys = |t: &sled::Tree| -> Vec<Vec<u8>> {
            t.iter().keys().map(|k| k.unwrap().to_vec()).collect()
        };
        assert_eq!(keys(meta), vec![b"vote".to_vec()], "only the small keys");
        assert_eq!(
            keys(large),
            vec![b"snapshot".to_vec(), b"state_machine".to_vec()]
        );
        d.write(vec![Write::Del(
            Tree::Meta,
            super::super::store::SNAPSHOT.to_vec(),
        )])
        .unwrap();
        assert_eq!(
            d.get(Tree::Meta, super::super::store::SNAPSHOT).unwrap(),
            None
        );
        d.clear().unwrap();
        assert!(keys(large).is_empty() && keys(meta).is_empty());
        drop(d);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_batch_survives_whole_or_not_at_all() {
        let disk = MemoryDisk::new(Duration::ZERO);
        let d = Disk::Memory(disk.handle());
        let batch = (0u64..3)
            .map(|i| Write::Put(Tree::Log, i.to_be_bytes().to_vec(), vec![i as u8]))
            .collect();
        d.write(batch).unwrap();
        assert_eq!(d.log_range(1, None).unwrap().len(), 2);
        disk.crash(0);
        let d = Disk::Memory(disk.handle());
        assert!(d.log_is_empty());
        assert_eq!(d.log_last().unwrap(), None);
    }
}
