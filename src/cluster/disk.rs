//! Where the metadata group's store keeps its bytes: two trees (the log, keyed
//! by big-endian index, and the metadata: vote, commit index, state machine,
//! snapshot) in a sled database on this node's disk; or, for the deterministic
//! simulation of the group (`tests/raft_sim.rs`), in memory that behaves like a
//! disk: a write is volatile until a flush, a flush takes (virtual) time, and a
//! crash keeps what was flushed plus a prefix of the writes after it (a batch
//! is one write, as sled's batches are atomic).

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
    },
    Memory(MemoryHandle),
}

/// A change of one key.
#[derive(Debug, Clone)]
pub(crate) enum Write {
    Put(Tree, Vec<u8>, Vec<u8>),
    Del(Tree, Vec<u8>),
}

fn sled_err(e: sled::Error) -> io::Error {
    io::Error::other(e)
}

impl Disk {
    pub(crate) fn open_sled(dir: &std::path::Path) -> Result<Disk, sled::Error> {
        let db = sled::Config::new().path(dir).flush_every_ms(None).open()?;
        Ok(Disk::Sled {
            log: db.open_tree("log")?,
            meta: db.open_tree("meta")?,
            db,
        })
    }

    pub(crate) fn get(&self, tree: Tree, key: &[u8]) -> io::Result<Option<Vec<u8>>> {
        match self {
            Disk::Sled { log, meta, .. } => {
                let t = if tree == Tree::Log { log } else { meta };
                Ok(t.get(key).map_err(sled_err)?.map(|v| v.to_vec()))
            }
            Disk::Memory(m) => m.read(|s| s.volatile(tree).get(key).cloned()),
        }
    }

    /// Apply `writes` together: all of them or none survive a crash.
    pub(crate) fn write(&self, writes: Vec<Write>) -> io::Result<()> {
        match self {
            Disk::Sled { log, meta, .. } => {
                let (mut lb, mut mb) = (sled::Batch::default(), sled::Batch::default());
                let (mut to_log, mut to_meta) = (false, false);
                for w in writes {
                    let (batch, touched, k, v) = match w {
                        Write::Put(Tree::Log, k, v) => (&mut lb, &mut to_log, k, Some(v)),
                        Write::Del(Tree::Log, k) => (&mut lb, &mut to_log, k, None),
                        Write::Put(Tree::Meta, k, v) => (&mut mb, &mut to_meta, k, Some(v)),
                        Write::Del(Tree::Meta, k) => (&mut mb, &mut to_meta, k, None),
                    };
                    match v {
                        Some(v) => batch.insert(k, v),
                        None => batch.remove(k),
                    }
                    *touched = true;
                }
                if to_log {
                    log.apply_batch(lb).map_err(sled_err)?;
                }
                if to_meta {
                    meta.apply_batch(mb).map_err(sled_err)?;
                }
                Ok(())
            }
            Disk::Memory(m) => m.write(writes),
        }
    }

    /// Empty both trees.
    pub(crate) fn clear(&self) -> io::Result<()> {
        match self {
            Disk::Sled { log, meta, .. } => {
                log.clear().map_err(sled_err)?;
                meta.clear().map_err(sled_err)
            }
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
        let start = Bound::Included(from.to_be_bytes().to_vec());
        let end = match to {
            Some(t) => Bound::Included(t.to_be_bytes().to_vec()),
            None => Bound::Unbounded,
        };
        let index = |k: &[u8]| u64::from_be_bytes(k.try_into().unwrap_or([0xff; 8]));
        match self {
            Disk::Sled { log, .. } => log
                .range::<Vec<u8>, _>((start, end))
                .map(|kv| kv.map(|(k, v)| (index(&k), v.to_vec())).map_err(sled_err))
                .collect(),
            Disk::Memory(m) => m.read(|s| {
                s.volatile(Tree::Log)
                    .range((start, end))
                    .map(|(k, v)| (index(k), v.clone()))
                    .collect()
            }),
        }
    }

    /// The last log entry's value.
    pub(crate) fn log_last(&self) -> io::Result<Option<Vec<u8>>> {
        match self {
            Disk::Sled { log, .. } => Ok(log.last().map_err(sled_err)?.map(|(_, v)| v.to_vec())),
            Disk::Memory(m) => m.read(|s| s.volatile(Tree::Log).values().next_back().cloned()),
        }
    }

    pub(crate) fn log_is_empty(&self) -> bool {
        match self {
            Disk::Sled { log, .. } => log.is_empty(),
            Disk::Memory(m) => m.read(|s| s.volatile(Tree::Log).is_empty()).unwrap_or(true),
        }
    }

    /// Make every write so far durable.
    pub(crate) async fn flush(&self) -> io::Result<()> {
        match self {
            Disk::Sled { db, .. } => db.flush_async().await.map(drop).map_err(sled_err),
            Disk::Memory(m) => m.flush().await,
        }
    }

    /// [`Self::flush`], blocking.
    pub(crate) fn flush_blocking(&self) -> io::Result<()> {
        match self {
            Disk::Sled { db, .. } => db.flush().map(drop).map_err(sled_err),
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
        s.pending.push(writes);
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
        for d in [
            Disk::open_sled(&dir).unwrap(),
            Disk::Memory(memory.handle()),
        ] {
            let batch = (1u64..=4)
                .map(|i| Write::Put(Tree::Log, i.to_be_bytes().to_vec(), vec![i as u8]))
                .collect();
            d.write(batch).unwrap();
            d.write(put("vote", "v")).unwrap();
            d.write(vec![Write::Del(Tree::Log, 4u64.to_be_bytes().to_vec())])
                .unwrap();
            d.flush_blocking().unwrap();
            let rows = d.log_range(2, Some(3)).unwrap();
            assert_eq!(rows, vec![(2, vec![2]), (3, vec![3])]);
            assert_eq!(d.log_range(2, None).unwrap().len(), 2);
            assert_eq!(d.log_last().unwrap(), Some(vec![3]));
            assert_eq!(d.get(Tree::Meta, b"vote").unwrap(), Some(b"v".to_vec()));
            d.clear().unwrap();
            assert!(d.log_is_empty());
            assert_eq!(d.get(Tree::Meta, b"vote").unwrap(), None);
        }
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
