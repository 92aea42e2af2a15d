//! Raft storage on this node. The log store ([`LogStore`], generic over the
//! group's type configuration) serves every group: the Raft log, vote and
//! commit index, flushed to disk before an append or a vote is acknowledged;
//! the metadata group's in a sled database of its own (`<data_dir>/cluster`),
//! each quorum queue group's in a tree of the database they share
//! (`quorum::store`). And the metadata group's state machine, which applies
//! committed commands to the local broker and keeps the replicated model (its
//! snapshot), persisted with the last applied log id so a restart never
//! applies an entry twice. The bytes live on a [`Disk`]: sled in a broker,
//! memory that models a disk in the simulations of the groups
//! (`tests/raft_sim.rs`, `tests/quorum_sim.rs`); the metadata group's
//! simulation applies to a [`Target`] of its own.

use super::command::{Command, Metadata};
use super::disk::{Disk, MemoryDisk, Tree, Write};
use super::{NodeInfo, TypeConfig};
use crate::broker::Broker;
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, RaftLogReader, RaftSnapshotBuilder, RaftTypeConfig, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, Vote,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Debug;
use std::io::{Cursor, Read as _};
use std::marker::PhantomData;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::Arc;

type NodeId = u64;
type SErr = StorageError<NodeId>;

pub(super) fn io_err(e: impl std::error::Error + 'static) -> openraft::AnyError {
    openraft::AnyError::new(&e)
}

/// A Raft group's log, vote and commit index (cheap to clone: a handle on its
/// disk), for any of warren's groups: the metadata group's ([`TypeConfig`],
/// its own sled database), a quorum queue's (`quorum::QTypeConfig`, a tree of
/// the database the groups share), or a simulated member's ([`MemoryDisk`]).
/// The state machines keep their snapshots (and the metadata group its
/// applied state) in the same store ([`Self::get`], [`Self::put`]).
pub struct LogStore<C = TypeConfig> {
    disk: Disk,
    config: PhantomData<fn() -> C>,
}

impl<C> Clone for LogStore<C> {
    fn clone(&self) -> Self {
        LogStore {
            disk: self.disk.clone(),
            config: PhantomData,
        }
    }
}

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const PURGED: &[u8] = b"last_purged";
/// The state machine's base: the whole model as of a log index ([`Applied`]),
/// written at each snapshot (and install), not at every apply.
pub(crate) const SM: &[u8] = b"state_machine";
/// What the state machine applied since its base ([`Tail`]), written after
/// every batch it applies.
const SM_TAIL: &[u8] = b"state_machine_tail";
/// How long a purge waits for the snapshot it follows to be stored.
const SNAPSHOT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
/// Where a state machine keeps its last snapshot ([`StoredSnapshot`]).
pub(crate) const SNAPSHOT: &[u8] = b"snapshot";

impl LogStore<TypeConfig> {
    /// The metadata group's store, in the sled database at `dir`.
    pub fn open(dir: &Path) -> Result<LogStore, sled::Error> {
        Ok(LogStore::on(Disk::open_sled(dir)?))
    }
}

impl<C> LogStore<C> {
    fn on(disk: Disk) -> LogStore<C> {
        LogStore {
            disk,
            config: PhantomData,
        }
    }

    /// The store on a simulated disk, as it is now (after a crash: what the
    /// crash left).
    pub fn in_memory(disk: &MemoryDisk) -> LogStore<C> {
        LogStore::on(Disk::Memory(disk.handle()))
    }

    /// The store in `tree` of the database `db` that other groups share: a
    /// flush of `db` makes every group's writes before it durable; large
    /// values go to the node's value files, `values`.
    pub fn new(
        db: sled::Db,
        tree: sled::Tree,
        values: Arc<super::values::ValueLog>,
    ) -> LogStore<C> {
        LogStore::on(Disk::Shared { db, tree, values })
    }

    pub(crate) fn get<T: for<'a> Deserialize<'a>>(&self, key: &[u8]) -> Result<Option<T>, String> {
        match self.disk.get(Tree::Meta, key).map_err(|e| e.to_string())? {
            None => Ok(None),
            Some(v) => super::codec::decode(&v)
                .map(Some)
                .map_err(|e| e.to_string()),
        }
    }

    /// The value at `key` when it is a file of its own ([`Disk::get_file`]).
    pub(crate) fn get_file(&self, key: &[u8]) -> Result<Option<(std::fs::File, u64)>, String> {
        self.disk
            .get_file(Tree::Meta, key)
            .map_err(|e| e.to_string())
    }

    /// Where the store's value files are, if it has some.
    pub(crate) fn values_dir(&self) -> Option<std::path::PathBuf> {
        self.disk.values_dir().map(|d| d.to_path_buf())
    }

    /// The bytes kept at `key`, to read a part at a time
    /// ([`Disk::get_reader`]).
    pub(crate) fn get_reader(
        &self,
        key: &[u8],
    ) -> Result<Option<Box<dyn std::io::BufRead + Send>>, String> {
        self.disk
            .get_reader(Tree::Meta, key, true)
            .map_err(|e| e.to_string())
    }

    pub(crate) fn put<T: Serialize>(&self, key: &[u8], value: &T) -> Result<(), String> {
        let v = super::codec::encode(value).map_err(|e| e.to_string())?;
        self.disk
            .write(vec![Write::Put(Tree::Meta, key.to_vec(), v)])
            .map_err(|e| e.to_string())
    }

    /// Make every write so far durable.
    pub(crate) async fn flush(&self) -> std::io::Result<()> {
        self.disk.flush().await
    }

    /// Remove the log entries with indexes in `[from, to]` (`to` None: to the
    /// end), then flush: truncating the tail and purging the head alike. One
    /// atomic write (a sled batch): removed one by one, a crash could keep
    /// the first removals of a truncation and not the rest, leaving a hole
    /// with an older leader's entries after it (see
    /// `tests::a_crash_while_removing_entries_leaves_no_hole`).
    async fn remove_logs(&self, from: u64, to: Option<u64>) -> Result<(), SErr> {
        // Their keys only (a purge behind a long queue's snapshot read
        // every body it removed).
        let removals = self
            .disk
            .log_keys(from, to)
            .map_err(|e| StorageIOError::write_logs(io_err(e)))?
            .into_iter()
            .map(|i| Write::Del(Tree::Log, i.to_be_bytes().to_vec()))
            .collect();
        self.disk
            .write(removals)
            .map_err(|e| StorageIOError::write_logs(io_err(e)))?;
        self.flush()
            .await
            .map_err(|e| StorageIOError::write_logs(io_err(e)))?;
        Ok(())
    }

    /// Wait until the state machine's snapshot in this store covers
    /// `log_id`. openraft 0.9 purges the log behind a snapshot a follower
    /// receives without waiting for the state machine to install it: purged
    /// first, a crash before the install is durable would leave neither the
    /// entries nor the snapshot (the quorum group's simulation found it).
    /// Written before the purge's writes, the snapshot is durable with them
    /// (a flush covers every earlier write; a crash keeps a prefix).
    async fn snapshot_covers(&self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        /// A stored snapshot's meta (its data skipped).
        #[derive(Deserialize)]
        struct Meta {
            meta: SnapshotMeta<NodeId, serde_json::Value>,
        }
        // Only the record's head is read (a long queue's snapshot is not
        // read whole for its index; nor checked here, which its readers do).
        let stored_at = || -> Result<Option<u64>, String> {
            let Some(mut r) = self
                .disk
                .get_reader(Tree::Meta, SNAPSHOT, false)
                .map_err(|e| e.to_string())?
            else {
                return Ok(None);
            };
            let meta = match snapshot_head::<serde_json::Value>(&mut r)? {
                Some((meta, _)) => meta,
                None => {
                    let mut bytes = Vec::new();
                    r.read_to_end(&mut bytes).map_err(|e| e.to_string())?;
                    super::codec::decode::<Meta>(&bytes)
                        .map_err(|e| e.to_string())?
                        .meta
                }
            };
            Ok(meta.last_log_id.map(|l| l.index))
        };
        let deadline = tokio::time::Instant::now() + SNAPSHOT_WAIT;
        loop {
            let at = stored_at().map_err(|e| StorageIOError::read_snapshot(None, string_err(e)))?;
            if at >= Some(log_id.index) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                let why = format!("no snapshot covers {log_id} to purge the log behind");
                return Err(StorageIOError::write_logs(string_err(why)).into());
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }

    /// Forget the log, vote and state (a lone node about to join another cluster).
    pub fn reset(&self) -> std::io::Result<()> {
        self.disk.clear()?;
        self.disk.flush_blocking()
    }

    /// Whether this node has ever been part of a cluster (a vote or a log).
    pub fn is_fresh(&self) -> bool {
        self.disk.get(Tree::Meta, VOTE).ok().flatten().is_none() && self.disk.log_is_empty()
    }
}

pub(super) fn string_err(e: String) -> openraft::AnyError {
    openraft::AnyError::error(e)
}

/// The log indexes openraft asks for as `[start, end]` (`end` None: to the
/// last entry); None when the range is empty.
pub(super) fn index_range(range: &impl RangeBounds<u64>) -> Option<(u64, Option<u64>)> {
    use std::ops::Bound;
    let start = match range.start_bound() {
        Bound::Included(&i) => i,
        Bound::Excluded(&i) => i.checked_add(1)?,
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(&i) => Some(i),
        Bound::Excluded(&i) => Some(i.checked_sub(1)?),
        Bound::Unbounded => None,
    };
    match end {
        Some(e) if e < start => None,
        _ => Some((start, end)),
    }
}

/// The meta of a snapshot built now by a state machine that has applied up
/// to `last_applied` (its id names the leader, the index and the time of the
/// build, so two builds never share one).
pub(crate) fn snapshot_meta(
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, NodeInfo>,
) -> SnapshotMeta<NodeId, NodeInfo> {
    let snapshot_id = match last_applied {
        Some(l) => format!("{}-{}-{}", l.leader_id, l.index, crate::clock::now_ms()),
        None => format!("empty-{}", crate::clock::now_ms()),
    };
    SnapshotMeta {
        last_log_id: last_applied,
        last_membership: membership,
        snapshot_id,
    }
}

/// The groups' type configurations a [`LogStore`] serves: node ids are
/// `u64`, entries openraft's.
pub trait LogConfig: RaftTypeConfig<NodeId = NodeId, Entry = Entry<Self>> {}

impl<C: RaftTypeConfig<NodeId = NodeId, Entry = Entry<C>>> LogConfig for C {}

impl<C: LogConfig<Node = NodeInfo>> LogStore<C> {
    /// Keep the snapshot `meta` describes, its state's bytes written by
    /// `encode` (as [`super::codec::encode_to`] writes them) straight into
    /// the snapshot's record: the one a state machine answers openraft's
    /// `get_current_snapshot` with, and purges wait for. A long one is
    /// written a block at a time into a file of its own
    /// ([`Disk::put_streamed`]): a long quorum queue's snapshot is not held
    /// in memory whole. Blocking.
    #[allow(clippy::result_large_err)] // openraft's error, as the callers'
    pub(crate) fn put_snapshot_streamed(
        &self,
        meta: &SnapshotMeta<NodeId, NodeInfo>,
        encode: impl FnOnce(&mut dyn std::io::Write) -> Result<(), String>,
    ) -> Result<(), SErr> {
        let err = |e: String| StorageIOError::write_snapshot(Some(meta.signature()), string_err(e));
        let head = super::codec::encode(&StoredSnapshotRef { meta, data: &[] })
            .map_err(|e| err(e.to_string()))?;
        // The record ends with its (here empty) state bytes, last field:
        // the same with a 32-bit length, set once they are written.
        let Some(prefix) = head.strip_suffix(&[BIN8, 0]) else {
            return Err(err("the snapshot record does not end with its data".into()).into());
        };
        let head_len = prefix.len() + 5;
        let written = self.disk.put_streamed(
            Tree::Meta,
            SNAPSHOT,
            head_len,
            |out| encode(out).map_err(std::io::Error::other),
            |len| {
                let len = u32::try_from(len)
                    .map_err(|_| std::io::Error::other(format!("a snapshot of {len} bytes")))?;
                let mut h = prefix.to_vec();
                h.push(BIN32);
                h.extend_from_slice(&len.to_be_bytes());
                Ok(h)
            },
        );
        // (an encoding error reads as `encode` put it)
        written.map_err(|e| err(e.to_string()).into())
    }

    /// Keep `data` as the snapshot `meta` describes, and the metadata keys `also` in one atomic
    /// write (the state machine's base goes with the snapshot it is: a crash
    /// between the two left a base no snapshot covered, and openraft then
    /// purged up to it at the next start, waiting for that snapshot).
    #[allow(clippy::result_large_err)] // openraft's error, as the callers'
    pub(crate) fn put_snapshot_with(
        &self,
        meta: &SnapshotMeta<NodeId, NodeInfo>,
        data: &[u8],
        also: Vec<(&[u8], Vec<u8>)>,
    ) -> Result<(), SErr> {
        let err = |e: String| StorageIOError::write_snapshot(Some(meta.signature()), string_err(e));
        let stored = super::codec::encode(&StoredSnapshotRef { meta, data })
            .map_err(|e| err(e.to_string()))?;
        let mut writes = vec![Write::Put(Tree::Meta, SNAPSHOT.to_vec(), stored)];
        writes.extend(
            also.into_iter()
                .map(|(k, v)| Write::Put(Tree::Meta, k.to_vec(), v)),
        );
        self.disk
            .write(writes)
            .map_err(|e| err(e.to_string()).into())
    }
}

impl<C: LogConfig<Node = NodeInfo, SnapshotData = Cursor<Vec<u8>>>> LogStore<C> {
    /// The last snapshot kept, for openraft's `get_current_snapshot`.
    pub(crate) async fn current_snapshot(&self) -> Result<Option<Snapshot<C>>, SErr> {
        let stored: Option<StoredSnapshot> = self
            .get(SNAPSHOT)
            .map_err(|e| StorageIOError::read_snapshot(None, string_err(e)))?;
        Ok(stored.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}

impl<C: LogConfig> RaftLogReader<C> for LogStore<C> {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<C>>, SErr> {
        let Some((start, end)) = index_range(&range) else {
            return Ok(Vec::new());
        };
        self.entries_now(start, end)
            .map_err(|e| StorageIOError::read_logs(io_err(e)).into())
    }
}

impl<C: LogConfig> LogStore<C> {
    /// Write `entry` into the log (tests: a state machine's entries
    /// without a Raft group).
    #[cfg(test)]
    pub(crate) fn put_entry_now(&self, entry: &Entry<C>) -> std::io::Result<()> {
        let v = super::codec::encode(entry).map_err(std::io::Error::other)?;
        let key = entry.log_id.index.to_be_bytes().to_vec();
        self.disk.write(vec![Write::Put(Tree::Log, key, v)])
    }

    /// The entries kept from index `from` to `to` (included; None: the
    /// last), read here and now (blocking).
    pub(crate) fn entries_now(&self, from: u64, to: Option<u64>) -> std::io::Result<Vec<Entry<C>>> {
        let rows = self.disk.log_range(from, to)?;
        rows.into_iter()
            .map(|(_, v)| super::codec::decode(&v).map_err(std::io::Error::other))
            .collect()
    }
}

impl<C: LogConfig> RaftLogStorage<C> for LogStore<C> {
    type LogReader = LogStore<C>;

    async fn get_log_state(&mut self) -> Result<LogState<C>, SErr> {
        let purged: Option<LogId<NodeId>> = self
            .get(PURGED)
            .map_err(|e| StorageIOError::read_logs(string_err(e)))?;
        let last = match self
            .disk
            .log_last()
            .map_err(|e| StorageIOError::read_logs(io_err(e)))?
        {
            Some(v) => {
                let e: Entry<C> =
                    super::codec::decode(&v).map_err(|e| StorageIOError::read_logs(io_err(e)))?;
                Some(e.log_id)
            }
            None => purged,
        };
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> LogStore<C> {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), SErr> {
        self.put(VOTE, vote)
            .map_err(|e| StorageIOError::write_vote(string_err(e)))?;
        self.flush()
            .await
            .map_err(|e| StorageIOError::write_vote(io_err(e)))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, SErr> {
        Ok(self
            .get(VOTE)
            .map_err(|e| StorageIOError::read_vote(string_err(e)))?)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> Result<(), SErr> {
        self.put(COMMITTED, &committed)
            .map_err(|e| StorageIOError::write_logs(string_err(e)))?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, SErr> {
        let c: Option<Option<LogId<NodeId>>> = self
            .get(COMMITTED)
            .map_err(|e| StorageIOError::read_logs(string_err(e)))?;
        Ok(c.flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<C>) -> Result<(), SErr>
    where
        I: IntoIterator<Item = Entry<C>> + Send,
        I::IntoIter: Send,
    {
        let mut batch = Vec::new();
        for e in entries {
            let v = super::codec::encode(&e).map_err(|e| StorageIOError::write_logs(io_err(e)))?;
            batch.push(Write::Put(
                Tree::Log,
                e.log_id.index.to_be_bytes().to_vec(),
                v,
            ));
        }
        self.disk
            .write(batch)
            .map_err(|e| StorageIOError::write_logs(io_err(e)))?;
        // Acknowledged only once on disk.
        let r = self.flush().await;
        callback.log_io_completed(r);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        self.remove_logs(log_id.index, None).await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        self.snapshot_covers(log_id).await?;
        self.put(PURGED, &log_id)
            .map_err(|e| StorageIOError::write_logs(string_err(e)))?;
        self.remove_logs(0, Some(log_id.index)).await
    }
}

/// The state machine's state; persisted whole as its base ([`SM`]) at each
/// snapshot, and after every batch as a [`Tail`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Applied {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, NodeInfo>,
    metadata: Metadata,
    /// The changes the broker refused since the base, by log index: the
    /// places, in the order [`Command::apply_and_record`] makes them, of the
    /// entry's refused changes (kept in the tail, not the base).
    #[serde(skip)]
    refused: BTreeMap<u64, Vec<u32>>,
}

/// What the state machine writes after every batch it applies: how far it
/// applied and what the broker refused since the base. Writing the whole
/// model at every apply made each declare cost the size of the model (a
/// cluster's declare rate fell from 500/s to 56/s over 6,000 queues). At a
/// restart the model is the base's, and the entries after it up to
/// `last_applied` are applied again to the model only (the broker made
/// them already; made again, a delete would take a later declaration's
/// queue), refusing what the broker refused ([`Replaying`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Tail {
    last_applied: Option<LogId<NodeId>>,
    refused: BTreeMap<u64, Vec<u32>>,
}

/// A target that passes every change to `inner` and notes the places of
/// those it refused.
struct Recording {
    inner: Arc<dyn Target>,
    calls: std::sync::atomic::AtomicU32,
    refused: Mutex<Vec<u32>>,
}

impl Target for Recording {
    fn apply(&self, cmd: &Command, now: u64) -> Result<(), String> {
        let at = self
            .calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let r = self.inner.apply(cmd, now);
        if r.is_err() {
            self.refused.lock().push(at);
        }
        r
    }
}

/// The target of a replay after a restart: refuses the changes the broker
/// refused when it made them ([`Tail::refused`]), takes the rest, does
/// nothing.
struct Replaying {
    refused: Vec<u32>,
    calls: std::sync::atomic::AtomicU32,
}

impl Target for Replaying {
    fn apply(&self, _: &Command, _: u64) -> Result<(), String> {
        let at = self
            .calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if self.refused.contains(&at) {
            Err("refused when it was first applied".into())
        } else {
            Ok(())
        }
    }
}

/// A snapshot as kept on disk: its meta and the state's bytes (the metadata
/// model here, a quorum queue's messages in `quorum::store`; see
/// `super::codec`), raw bytes in the binary encoding (JSON wrote them as an
/// array of numbers, still read).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct StoredSnapshot {
    pub meta: SnapshotMeta<NodeId, NodeInfo>,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// A snapshot record's meta and the length of its state's bytes.
pub(crate) type SnapshotHead<N> = Option<(SnapshotMeta<NodeId, N>, u32)>;

/// The meta of the [`StoredSnapshot`] record at `r` and the length of its
/// state's bytes, `r` left at their start (a long record is not read
/// whole); None, `r` as it was, for a record in JSON (earlier versions).
pub(crate) fn snapshot_head<N: openraft::Node>(
    r: &mut dyn std::io::BufRead,
) -> Result<SnapshotHead<N>, String> {
    use super::codec::read;
    if !read::at_marker(r)? {
        return Ok(None);
    }
    read::marker(r)?;
    let mut meta = None;
    for _ in 0..read::map_len(r)? {
        match read::key(r)?.as_slice() {
            b"meta" => meta = Some(read::value(r)?),
            b"data" => {
                let len = read::bin_len(r)?;
                let meta = meta.ok_or("a snapshot record's data before its meta")?;
                return Ok(Some((meta, len)));
            }
            _ => {
                read::value::<serde::de::IgnoredAny>(r)?;
            }
        }
    }
    Err("a snapshot record without data".into())
}

/// MessagePack's markers of a byte string with an 8-bit and a 32-bit length.
const BIN8: u8 = 0xc4;
const BIN32: u8 = 0xc6;

/// A [`StoredSnapshot`] to write, borrowed (encodes the same).
#[derive(Serialize)]
struct StoredSnapshotRef<'a> {
    meta: &'a SnapshotMeta<NodeId, NodeInfo>,
    #[serde(with = "serde_bytes")]
    data: &'a [u8],
}

/// Where a committed command takes effect, besides the model: the local
/// broker ([`Command::apply_to`]). A command the target refuses is not
/// recorded in the model. The simulation of the group has a target of its own.
pub trait Target: Send + Sync + 'static {
    /// Make one committed change (a batch's commands each) in the target.
    fn apply(&self, cmd: &Command, now: u64) -> Result<(), String>;

    /// The replicated records the target holds now, given the model it was
    /// last told (an exact snapshot install removes what it holds and the
    /// snapshot lacks); a target that is the model holds the model.
    fn holdings(&self, model: &Metadata) -> Metadata {
        model.clone()
    }

    /// The broker, when the target is one (queue records' home nodes are told
    /// to its queues).
    fn broker(&self) -> Option<&Broker> {
        None
    }

    /// Resolves once every change [`apply`](Self::apply) made so far is on
    /// disk, where the target keeps its own records (the broker's message
    /// store); None: nothing to wait for.
    fn sync(&self) -> Option<BoxSync> {
        None
    }
}

/// A target's [`Target::sync`].
pub type BoxSync = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), String>> + Send>>;

impl Target for Broker {
    fn apply(&self, cmd: &Command, now: u64) -> Result<(), String> {
        cmd.apply_to(self, now)
    }

    fn holdings(&self, model: &Metadata) -> Metadata {
        Metadata::of_broker(self, model)
    }

    fn broker(&self) -> Option<&Broker> {
        Some(self)
    }

    fn sync(&self) -> Option<BoxSync> {
        let sync = self.store.as_ref()?.sync();
        Some(Box::pin(
            async move { sync.await.map_err(|e| e.to_string()) },
        ))
    }
}

/// The state machine: the local broker, and the replicated model.
#[derive(Clone)]
pub struct StateMachine {
    target: Arc<dyn Target>,
    store: LogStore,
    state: Arc<Mutex<Applied>>,
    /// Told each queue record's home node as records are applied.
    forwarder: Arc<std::sync::OnceLock<Arc<super::forward::Forwarder>>>,
    /// Starts and stops this node's quorum queue groups as their records
    /// are applied.
    quorum: Arc<std::sync::OnceLock<Arc<super::quorum::Manager>>>,
    /// After a restart: entries up to this index were applied before it, and
    /// are applied again to the model only ([`Tail`]).
    replay_upto: Arc<std::sync::atomic::AtomicU64>,
}

/// Record on the local queue `vhost`/`name`, if there is one, which
/// replicated declaration it is.
fn stamp(broker: &Broker, vhost: &str, name: &str, declared: u64) {
    if let Some(q) = broker.vhost(vhost).and_then(|v| v.queue(name, 0).ok()) {
        q.set_declared(declared);
    }
}

/// Whether queue arguments make a quorum queue.
pub fn is_quorum(arguments: &super::command::Args) -> bool {
    arguments
        .table()
        .get("x-queue-type")
        .and_then(|v| v.as_str())
        .is_some_and(|t| t == "quorum")
}

/// The quorum records `cmd` may change (the queue it names; a vhost's,
/// deleting it), as they are before it is applied: what
/// [`StateMachine::quorum_after`] compares with (a copy of every record per
/// command cost a node with a thousand quorum queues more than the rest of
/// applying).
fn quorum_before(
    cmd: &Command,
    quorum: &BTreeMap<String, super::command::QuorumRec>,
    out: &mut BTreeMap<String, super::command::QuorumRec>,
) {
    match cmd {
        Command::QueueLeader { vhost, name, .. }
        | Command::QuorumMembers { vhost, name, .. }
        | Command::DeleteQueue { vhost, name }
        | Command::QueueGone { vhost, name, .. } => {
            let k = super::command::key(vhost, name);
            if let Some(rec) = quorum.get(&k) {
                out.insert(k, rec.clone());
            }
        }
        Command::DeleteVhost { name } => {
            let prefix = format!("{name}\0");
            let of_vhost = quorum.range(prefix.clone()..);
            out.extend(
                of_vhost
                    .take_while(|(k, _)| k.starts_with(&prefix))
                    .map(|(k, rec)| (k.clone(), rec.clone())),
            );
        }
        Command::Batch(cmds) => {
            for c in cmds {
                quorum_before(c, quorum, out);
            }
        }
        _ => {}
    }
}

/// The quorum queue declarations in `cmd` (a batch's too).
fn quorum_declares(cmd: &Command, out: &mut Vec<(String, String, String, usize)>) {
    match cmd {
        Command::DeclareQueue {
            vhost,
            name,
            node,
            arguments,
            ..
        } if is_quorum(arguments) => {
            let size = crate::broker::queue::QueueArgs::parse(&arguments.table(), name, vhost)
                .ok()
                .and_then(|a| a.initial_group_size)
                .map_or(super::quorum::DEFAULT_GROUP_SIZE, |n| {
                    usize::try_from(n).unwrap_or(usize::MAX)
                });
            out.push((vhost.clone(), name.clone(), node.clone(), size));
        }
        Command::Batch(cmds) => {
            for c in cmds {
                quorum_declares(c, out);
            }
        }
        _ => {}
    }
}

impl StateMachine {
    /// The state machine over `target` (the broker), resumed from what
    /// `store` persisted.
    pub fn open(target: Arc<dyn Target>, store: LogStore) -> Result<StateMachine, String> {
        let mut state: Applied = store.get(SM)?.unwrap_or_default();
        let tail: Tail = store.get(SM_TAIL)?.unwrap_or_default();
        let base = state.last_applied.map_or(0, |l| l.index);
        let mut replay_upto = 0;
        if tail.last_applied.map_or(0, |l| l.index) > base {
            replay_upto = tail.last_applied.map_or(0, |l| l.index);
            state.refused = tail.refused;
            state.refused.retain(|i, _| *i > base);
        }
        Ok(StateMachine {
            target,
            store,
            state: Arc::new(Mutex::new(state)),
            forwarder: Arc::default(),
            quorum: Arc::default(),
            replay_upto: Arc::new(std::sync::atomic::AtomicU64::new(replay_upto)),
        })
    }

    /// Wait for the target's records to be on disk ([`Target::sync`]).
    async fn sync_target(&self) -> Result<(), SErr> {
        match self.target.sync() {
            Some(sync) => sync
                .await
                .map_err(|e| StorageIOError::write_state_machine(string_err(e)).into()),
            None => Ok(()),
        }
    }

    /// Where quorum queue records are acted on (set once at start).
    pub fn set_quorum(&self, q: Arc<super::quorum::Manager>) {
        let _ = self.quorum.set(q);
    }

    /// A quorum queue's group record.
    pub fn quorum_record(&self, vhost: &str, name: &str) -> Option<super::command::QuorumRec> {
        let key = super::command::key(vhost, name);
        self.state.lock().metadata.quorum.get(&key).cloned()
    }

    /// After `cmd` (at log index `index`) was applied: record the groups of
    /// the quorum queues it declared (members from the membership in force
    /// at this log position, the same on every node) and start this node's
    /// members; stop the groups of queues it removed; point the queues whose
    /// leader changed at it.
    fn quorum_after(
        &self,
        state: &mut Applied,
        before: &BTreeMap<String, super::command::QuorumRec>,
        cmd: &Command,
        index: u64,
        replaying: bool,
    ) {
        let mut declares = Vec::new();
        quorum_declares(cmd, &mut declares);
        let nodes: Vec<String> = {
            let m = state.membership.membership();
            m.voter_ids()
                .filter_map(|id| m.get_node(&id).map(|n| n.name.clone()))
                .collect()
        };
        let mut started = Vec::new();
        for (vhost, name, node, size) in declares {
            let key = super::command::key(&vhost, &name);
            if state.metadata.quorum.contains_key(&key) || !state.metadata.queues.contains_key(&key)
            {
                continue;
            }
            let rec = super::command::QuorumRec {
                group: format!("{vhost}/{name}/{index}"),
                members: super::quorum::choose_members(&key, &node, &nodes, size),
                leader: None,
            };
            state.metadata.quorum.insert(key, rec.clone());
            started.push((vhost, name, rec));
        }
        // A replay changes the model only (the groups are started from the
        // whole model after it: `mark_all`).
        let Some(q) = self.quorum.get().filter(|_| !replaying) else {
            return;
        };
        for (vhost, name, rec) in &started {
            q.declared(vhost, name, rec);
        }
        for (key, rec) in before {
            let now = state.metadata.quorum.get(key);
            if now.is_none_or(|n| n.group != rec.group) {
                q.stop(&rec.group);
            }
        }
        let marks = self.forwarder.get().zip(self.target.broker());
        for (key, b) in before {
            let (Some(rec), Some((vhost, name))) =
                (state.metadata.quorum.get(key), key.split_once('\0'))
            else {
                continue;
            };
            if b.group == rec.group && b.members != rec.members {
                q.members_changed(vhost, name, rec);
            }
            if let (true, Some((f, broker)), Some(leader)) =
                (b.leader != rec.leader, marks, &rec.leader)
            {
                f.mark(broker, vhost, name, leader);
            }
        }
    }

    /// The node the replicated queue `vhost`/`name` is served on (None: no
    /// such record).
    pub fn queue_node(&self, vhost: &str, name: &str) -> Option<String> {
        let s = self.state.lock();
        s.metadata.queue_node(vhost, name).map(str::to_string)
    }

    /// Whether `gone` (a [`Command::QueueGone`]) names the queue
    /// record as it is now ([`Metadata::is_incarnation`]).
    pub fn is_incarnation(&self, gone: &Command) -> bool {
        self.state.lock().metadata.is_incarnation(gone)
    }

    /// Where queue records' home nodes are told (set once at start).
    pub fn set_forwarder(&self, f: Arc<super::forward::Forwarder>) {
        let _ = self.forwarder.set(f);
    }

    /// Tell every queue of the model where its messages live.
    pub fn mark_all(&self) {
        let (Some(f), Some(broker)) = (self.forwarder.get(), self.target.broker()) else {
            return;
        };
        let (queues, metadata): (Vec<(String, String, String)>, Metadata) = {
            let s = self.state.lock();
            let queues = s
                .metadata
                .queues
                .values()
                .filter_map(|c| match c {
                    Command::DeclareQueue { vhost, name, .. } => {
                        let node = s.metadata.queue_node(vhost, name)?;
                        Some((vhost.clone(), name.clone(), node.to_string()))
                    }
                    _ => None,
                })
                .collect();
            (queues, s.metadata.clone())
        };
        for (vhost, name, node) in queues {
            f.mark(broker, &vhost, &name, &node);
        }
        self.stamp_all(&metadata);
        if let Some(q) = self.quorum.get() {
            q.sync(&metadata);
        }
    }

    /// Back to nothing applied (with [`LogStore::reset`]).
    pub fn reset(&self) {
        *self.state.lock() = Applied::default();
        self.replay_upto
            .store(0, std::sync::atomic::Ordering::Relaxed);
    }

    /// The committed model (for status and the admin API).
    pub fn metadata(&self) -> Metadata {
        self.state.lock().metadata.clone()
    }

    /// Tell the forwarder the home node of every queue `cmd` declared, those
    /// inside a batch (a definitions import, a super stream) included.
    fn mark_homes(&self, state: &Applied, cmd: &Command) {
        let (Some(f), Some(broker)) = (self.forwarder.get(), self.target.broker()) else {
            return;
        };
        match cmd {
            Command::DeclareQueue { vhost, name, .. } => {
                if let Some(home) = state.metadata.queue_node(vhost, name) {
                    f.mark(broker, vhost, name, home);
                }
            }
            Command::Batch(cmds) => cmds.iter().for_each(|c| self.mark_homes(state, c)),
            _ => {}
        }
    }

    /// After `cmd` (at log index `index`) was applied: every queue record it
    /// declared (or declared again) is that declaration from now on
    /// ([`Metadata::declared`], the same on every node), and so is the local
    /// queue ([`crate::broker::queue::Queue::set_declared`]), which reports it
    /// when it deletes itself.
    fn note_declarations(&self, state: &mut Applied, cmd: &Command, index: u64) {
        let declared = state.metadata.note_declared(cmd, index);
        if let Some(broker) = self.target.broker() {
            for (vhost, name) in declared {
                stamp(broker, &vhost, &name, index);
            }
        }
    }

    /// Stamp every local queue with the declaration its record is (at start
    /// and after a snapshot install).
    fn stamp_all(&self, metadata: &Metadata) {
        let Some(broker) = self.target.broker() else {
            return;
        };
        for k in metadata.queues.keys() {
            if let Some((vhost, name)) = k.split_once('\0') {
                stamp(
                    broker,
                    vhost,
                    name,
                    metadata.declared.get(k).copied().unwrap_or(0),
                );
            }
        }
    }

    fn apply_command(&self, state: &mut Applied, cmd: &Command, now: u64) -> Option<String> {
        self.apply_command_to(&*self.target, state, cmd, now)
    }

    fn apply_command_to(
        &self,
        target: &dyn Target,
        state: &mut Applied,
        cmd: &Command,
        now: u64,
    ) -> Option<String> {
        let applied = cmd.apply_and_record(target, now, &mut state.metadata);
        // What of a batch took is recorded even when a part was refused.
        self.mark_homes(state, cmd);
        match applied {
            Ok(()) => None,
            Err(why) => {
                tracing::debug!(?cmd, %why, "committed metadata change refused locally");
                Some(why)
            }
        }
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, SErr> {
        let (meta, data) = {
            let mut s = self.state.lock();
            let data = super::codec::encode(&s.metadata)
                .map_err(|e| StorageIOError::write_snapshot(None, io_err(e)))?;
            let base = super::codec::encode(&*s)
                .map_err(|e| StorageIOError::write_snapshot(None, io_err(e)))?;
            let meta = snapshot_meta(s.last_applied, s.membership.clone());
            // The snapshot and the new base, written before any later tail
            // (under the lock): a crash that keeps a tail keeps them.
            self.store
                .put_snapshot_with(&meta, &data, vec![(SM, base)])?;
            let at = s.last_applied.map_or(0, |l| l.index);
            s.refused.retain(|i, _| *i > at);
            (meta, data)
        };
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, NodeInfo>), SErr> {
        let s = self.state.lock();
        Ok((s.last_applied, s.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Option<String>>, SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let now = crate::clock::now_ms();
        let replay_upto = self.replay_upto.load(std::sync::atomic::Ordering::Relaxed);
        let mut out = Vec::new();
        // Some entry made a change in the broker.
        let mut changed = false;
        let tail = {
            let mut s = self.state.lock();
            for entry in entries {
                let index = entry.log_id.index;
                s.last_applied = Some(entry.log_id);
                out.push(match &entry.payload {
                    EntryPayload::Blank => None,
                    EntryPayload::Normal(cmd) if index <= replay_upto => {
                        // Made before the restart: the model only.
                        let replaying = Replaying {
                            refused: s.refused.get(&index).cloned().unwrap_or_default(),
                            calls: Default::default(),
                        };
                        let r = cmd.apply_and_record(&replaying, now, &mut s.metadata).err();
                        s.metadata.note_declared(cmd, index);
                        let before = BTreeMap::new();
                        self.quorum_after(&mut s, &before, cmd, index, true);
                        r
                    }
                    EntryPayload::Normal(cmd) => {
                        let mut before = BTreeMap::new();
                        quorum_before(cmd, &s.metadata.quorum, &mut before);
                        #[cfg(debug_assertions)]
                        let all_before = s.metadata.quorum.clone();
                        let recording = Recording {
                            inner: Arc::clone(&self.target),
                            calls: Default::default(),
                            refused: Mutex::new(Vec::new()),
                        };
                        let r = self.apply_command_to(&recording, &mut s, cmd, now);
                        changed |= recording.calls.load(std::sync::atomic::Ordering::Relaxed) > 0;
                        let refused = recording.refused.into_inner();
                        if !refused.is_empty() {
                            s.refused.insert(index, refused);
                        }
                        self.note_declarations(&mut s, cmd, index);
                        #[cfg(debug_assertions)]
                        for (k, rec) in &all_before {
                            debug_assert!(
                                before.contains_key(k) || s.metadata.quorum.get(k) == Some(rec),
                                "{cmd:?} changed quorum record {k:?}, which quorum_before left out"
                            );
                        }
                        self.quorum_after(&mut s, &before, cmd, index, false);
                        r
                    }
                    EntryPayload::Membership(m) => {
                        s.membership = StoredMembership::new(Some(entry.log_id), m.clone());
                        None
                    }
                });
            }
            Tail {
                last_applied: s.last_applied,
                refused: s.refused.clone(),
            }
        };
        // The broker's records of these changes are on disk before the tail
        // says they were made: a crash between the two would otherwise leave
        // the broker without them for good (the restart makes them in the
        // model only). The other way round, a crash re-applies this batch to
        // the broker, which the commands' idempotence absorbs.
        if changed {
            self.sync_target().await?;
        }
        self.store
            .put(SM_TAIL, &tail)
            .map_err(|e| StorageIOError::write_state_machine(string_err(e)))?;
        // On disk before openraft moves on: a restart must not apply these
        // again (to the broker; see `Tail`).
        self.store
            .flush()
            .await
            .map_err(|e| StorageIOError::write_state_machine(io_err(e)))?;
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> StateMachine {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, SErr> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, NodeInfo>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), SErr> {
        let data = snapshot.into_inner();
        let metadata: Metadata = super::codec::decode(&data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), io_err(e)))?;
        let now = crate::clock::now_ms();
        let (base, tail) = {
            let mut s = self.state.lock();
            // Exact: what this node has of the replicated kinds and the
            // snapshot lacks goes first (a record the group deleted while this
            // node was behind, or a change made here that never committed).
            let have = self.target.holdings(&s.metadata);
            for cmd in metadata.removals(&have) {
                if let Err(why) = self.target.apply(&cmd, now) {
                    tracing::debug!(?cmd, %why, "removal for a snapshot refused locally");
                }
            }
            s.metadata = Metadata::default();
            for cmd in metadata.replay() {
                self.apply_command(&mut s, &cmd, now);
            }
            // The model is the snapshot's, whatever this node's broker said.
            s.metadata = metadata;
            self.stamp_all(&s.metadata);
            if let (Some(f), Some(broker)) = (self.forwarder.get(), self.target.broker()) {
                for c in s.metadata.queues.values() {
                    if let Command::DeclareQueue { vhost, name, .. } = c {
                        if let Some(node) = s.metadata.queue_node(vhost, name) {
                            f.mark(broker, vhost, name, node);
                        }
                    }
                }
            }
            if let Some(q) = self.quorum.get() {
                q.sync(&s.metadata);
            }
            s.last_applied = meta.last_log_id;
            s.membership = meta.last_membership.clone();
            s.refused.clear();
            self.replay_upto
                .store(0, std::sync::atomic::Ordering::Relaxed);
            // The snapshot, the new base and a tail that adds nothing to
            // it, in one write.
            let encoded = super::codec::encode(&*s).and_then(|base| {
                let tail = Tail {
                    last_applied: s.last_applied,
                    refused: BTreeMap::new(),
                };
                Ok((base, super::codec::encode(&tail)?))
            });
            encoded.map_err(|e| StorageIOError::write_state_machine(io_err(e)))?
        };
        // The broker's records first, as in `apply`.
        self.sync_target().await?;
        self.store
            .put_snapshot_with(meta, &data, vec![(SM, base), (SM_TAIL, tail)])?;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SErr> {
        self.store.current_snapshot().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::vhost::{ExchangeDeclare, QueueDeclare};
    use crate::cluster::command::tests::{exchange, queue};
    use crate::cluster::command::Command;
    use openraft::CommittedLeaderId;
    use std::time::Duration;

    /// A snapshot is written from borrowed parts and read back as the owned
    /// record: the two encode alike (snapshots on disk stay readable).
    #[test]
    fn a_borrowed_snapshot_encodes_as_the_stored_one() {
        let meta = snapshot_meta(
            Some(LogId::new(CommittedLeaderId::new(3, 1), 42)),
            StoredMembership::default(),
        );
        let data = vec![0u8, 1, 2, 255];
        let owned = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        let borrowed = StoredSnapshotRef {
            meta: &meta,
            data: &data,
        };
        let bytes = super::super::codec::encode(&borrowed).expect("encode");
        assert_eq!(bytes, super::super::codec::encode(&owned).expect("encode"));
        let back: StoredSnapshot = super::super::codec::decode(&bytes).expect("decode");
        assert_eq!((back.meta, back.data), (meta, data));
    }

    /// Installing a snapshot removes the replicated records the node has and
    /// the snapshot lacks (made here and never committed, or deleted by the
    /// group while this node was behind), keeps the node's own (exclusive,
    /// server-named queues, the boot vhost and user) and adds the rest.
    #[tokio::test]
    async fn installing_a_snapshot_is_exact() {
        let dir = std::env::temp_dir().join(format!("warren-sm-exact-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let broker = Broker::new(&crate::Config::default());
        let store = LogStore::open(&dir).expect("store");
        let mut sm = StateMachine::open(broker.clone(), store).expect("state machine");
        let now = 1;
        // Committed earlier: a vhost the group has since deleted.
        let old = Command::PutVhost {
            name: "gone-v".into(),
            creator: None,
            meta: None,
        };
        assert_eq!(sm.apply_command(&mut sm.state.lock(), &old, now), None);
        // Made here only: an exchange, a queue, a binding between them, a policy.
        let v = broker.vhost("/").expect("default vhost");
        v.declare_exchange(&ExchangeDeclare {
            name: "stale-x".into(),
            kind: "direct".into(),
            durable: true,
            ..Default::default()
        })
        .expect("declare");
        let plain = |name: &str| QueueDeclare {
            name: name.into(),
            durable: true,
            ..Default::default()
        };
        v.declare_queue(&plain("stale-q"), 0, now).expect("declare");
        v.declare_queue(&plain("keep-q"), 0, now).expect("declare");
        let q = crate::broker::exchange::Destination::Queue("stale-q".into());
        v.bind("stale-x", q, "k", &Default::default(), 0)
            .expect("bind");
        let def = serde_json::json!({"max-length": 1});
        let p = crate::broker::policy::Policy::new(
            "/",
            "stale-p",
            ".*",
            crate::broker::policy::ApplyTo::All,
            0,
            def.as_object().cloned().unwrap_or_default(),
        )
        .expect("policy");
        v.put_policy(p, now).expect("policy");
        // This node's own: an exclusive and a server-named queue.
        let exclusive = QueueDeclare {
            name: "excl".into(),
            exclusive: true,
            ..Default::default()
        };
        v.declare_queue(&exclusive, 7, now).expect("declare");
        let (named, _) = v
            .declare_queue(&QueueDeclare::default(), 0, now)
            .expect("declare");

        let mut snapshot = Metadata::default();
        for c in [exchange("keep-x"), queue("keep-q")] {
            snapshot.record(&c);
        }
        let meta = SnapshotMeta {
            last_log_id: Some(LogId::new(CommittedLeaderId::new(1, 1), 10)),
            last_membership: StoredMembership::default(),
            snapshot_id: "t".into(),
        };
        let data = serde_json::to_vec(&snapshot).expect("json");
        sm.install_snapshot(&meta, Box::new(Cursor::new(data)))
            .await
            .expect("install");

        let v = broker.vhost("/").expect("the boot vhost stays");
        assert!(broker.auth.user("guest").is_some(), "the boot user stays");
        assert!(broker.vhost("gone-v").is_none());
        assert!(v.exchange("stale-x").is_err());
        assert!(v.queue("stale-q", 0).is_err());
        assert!(v.policies.get("/", "stale-p").is_none());
        assert!(v.exchange("keep-x").is_ok() && v.queue("keep-q", 0).is_ok());
        assert!(v.queue("excl", 7).is_ok(), "exclusive queues are local");
        assert!(
            v.queue(named.name(), 0).is_ok(),
            "server-named queues are local"
        );
        assert!(v.exchange("amq.direct").is_ok());
        assert_eq!(sm.metadata(), snapshot);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A target that counts the changes it is given and refuses vhosts
    /// named `bad...`.
    #[derive(Default)]
    struct Counting(std::sync::atomic::AtomicUsize);

    impl Target for Counting {
        fn apply(&self, cmd: &Command, _now: u64) -> Result<(), String> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            match cmd {
                Command::PutVhost { name, .. } if name.starts_with("bad") => {
                    Err(format!("{name} refused"))
                }
                _ => Ok(()),
            }
        }
    }

    fn vhost(name: &str) -> Command {
        Command::PutVhost {
            name: name.into(),
            creator: None,
            meta: None,
        }
    }

    fn normal(index: u64, cmd: Command) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(cmd),
        }
    }

    /// The state machine writes its whole model only at a snapshot; after a
    /// restart the entries applied since are applied again to the model
    /// alone (the broker is not given them again), refusing what the broker
    /// refused, so the model is the one before the restart.
    #[tokio::test]
    async fn after_a_restart_the_entries_since_the_base_rebuild_the_model_only() {
        let disk = MemoryDisk::new(Duration::ZERO);
        let first = Arc::new(Counting::default());
        let mut sm = StateMachine::open(first.clone(), LogStore::in_memory(&disk)).unwrap();
        let before_base = vec![
            normal(1, vhost("a")),
            normal(2, vhost("bad-1")),
            normal(
                3,
                Command::Batch(vec![vhost("b"), vhost("bad-2"), vhost("c")]),
            ),
        ];
        sm.apply(before_base).await.unwrap();
        sm.build_snapshot().await.unwrap();
        let after_base = || {
            vec![
                normal(4, vhost("d")),
                normal(5, Command::Batch(vec![vhost("bad-3"), vhost("e")])),
                normal(6, Command::DeleteVhost { name: "a".into() }),
            ]
        };
        let answers = sm.apply(after_base()).await.unwrap();
        assert_eq!(answers[1].as_deref(), Some("bad-3 refused"));
        assert_eq!(first.0.load(std::sync::atomic::Ordering::Relaxed), 9);
        let model = sm.metadata();
        let vhosts: Vec<&String> = model.vhosts.keys().collect();
        assert_eq!(vhosts, ["b", "c", "d", "e"]);

        // Restart: the base is at 3, the tail at 6.
        let second = Arc::new(Counting::default());
        let mut again = StateMachine::open(second.clone(), LogStore::in_memory(&disk)).unwrap();
        let (applied, _) = again.applied_state().await.unwrap();
        assert_eq!(applied.map(|l| l.index), Some(3));
        let answers = again.apply(after_base()).await.unwrap();
        assert_eq!(
            answers[1].as_deref(),
            Some("refused when it was first applied")
        );
        assert_eq!(
            second.0.load(std::sync::atomic::Ordering::Relaxed),
            0,
            "not made again"
        );
        assert_eq!(again.metadata(), model);
        // What comes next is made.
        again.apply(vec![normal(7, vhost("f"))]).await.unwrap();
        assert_eq!(second.0.load(std::sync::atomic::Ordering::Relaxed), 1);
        assert!(again.metadata().vhosts.contains_key("f"));
    }

    /// A target whose records are on disk once its `sync` resolves, which
    /// notes how far the state machine's tail said it had applied then.
    struct Syncing {
        store: LogStore,
        tails_at_sync: Mutex<Vec<Option<u64>>>,
    }

    impl Target for Syncing {
        fn apply(&self, _: &Command, _: u64) -> Result<(), String> {
            Ok(())
        }

        fn sync(&self) -> Option<BoxSync> {
            let tail: Option<Tail> = self.store.get(SM_TAIL).expect("reads");
            self.tails_at_sync
                .lock()
                .push(tail.and_then(|t| t.last_applied).map(|l| l.index));
            Some(Box::pin(async { Ok(()) }))
        }
    }

    /// The broker's records of a batch are synced before the tail says the
    /// batch was applied (else a crash between the two loses them in the
    /// broker for good: a restart makes them in the model only); a batch that
    /// changes nothing in the broker does not wait for it.
    #[tokio::test]
    async fn the_brokers_records_are_synced_before_the_tail() {
        let disk = MemoryDisk::new(Duration::ZERO);
        let target = Arc::new(Syncing {
            store: LogStore::in_memory(&disk),
            tails_at_sync: Mutex::new(Vec::new()),
        });
        let mut sm = StateMachine::open(target.clone(), LogStore::in_memory(&disk)).unwrap();
        sm.apply(vec![normal(1, vhost("a")), normal(2, vhost("b"))])
            .await
            .unwrap();
        sm.apply(vec![normal(3, vhost("c"))]).await.unwrap();
        assert_eq!(*target.tails_at_sync.lock(), [None, Some(2)]);
        let blank = Entry {
            log_id: LogId::new(CommittedLeaderId::new(2, 1), 4),
            payload: EntryPayload::Blank,
        };
        sm.apply(vec![blank]).await.unwrap();
        assert_eq!(target.tails_at_sync.lock().len(), 2);
        let tail: Option<Tail> = target.store.get(SM_TAIL).unwrap();
        assert_eq!(tail.and_then(|t| t.last_applied).map(|l| l.index), Some(4));
    }

    fn entry(term: u64, index: u64) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(term, 1), index),
            payload: EntryPayload::Blank,
        }
    }

    /// A log of entries 1..=5, on disk.
    fn five(disk: &MemoryDisk) -> LogStore {
        let store = LogStore::in_memory(disk);
        let batch = (1..=5)
            .map(|i| {
                let v = serde_json::to_vec(&entry(1, i)).unwrap();
                Write::Put(Tree::Log, i.to_be_bytes().to_vec(), v)
            })
            .collect();
        store.disk.write(batch).unwrap();
        // A snapshot to 3 (a purge waits for one that covers it).
        let snapshot = StoredSnapshot {
            meta: SnapshotMeta {
                last_log_id: Some(LogId::new(CommittedLeaderId::new(1, 1), 3)),
                last_membership: StoredMembership::default(),
                snapshot_id: "s".into(),
            },
            data: Vec::new(),
        };
        store.put(SNAPSHOT, &snapshot).unwrap();
        store.disk.flush_blocking().unwrap();
        store
    }

    /// A store written as JSON (before the binary encoding) is read as it
    /// was: its vote, entries and snapshot; what is written now is binary.
    #[tokio::test]
    async fn a_store_written_as_json_is_still_read() {
        let disk = MemoryDisk::new(Duration::from_millis(1));
        let mut store = five(&disk);
        let vote = Vote::new(3, 2);
        fn json<T: Serialize>(v: &T) -> Vec<u8> {
            serde_json::to_vec(v).unwrap()
        }
        store
            .disk
            .write(vec![Write::Put(Tree::Meta, VOTE.to_vec(), json(&vote))])
            .unwrap();
        let snapshot = StoredSnapshot {
            meta: SnapshotMeta {
                last_log_id: Some(LogId::new(CommittedLeaderId::new(1, 1), 3)),
                last_membership: StoredMembership::default(),
                snapshot_id: "s".into(),
            },
            data: vec![1, 2, 250],
        };
        store
            .disk
            .write(vec![Write::Put(
                Tree::Meta,
                SNAPSHOT.to_vec(),
                json(&snapshot),
            )])
            .unwrap();
        assert_eq!(store.read_vote().await.unwrap(), Some(vote));
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id.map(|l| l.index), Some(5));
        let entries = store.try_get_log_entries(2..=4).await.unwrap();
        assert_eq!(
            entries.iter().map(|e| e.log_id.index).collect::<Vec<_>>(),
            [2, 3, 4]
        );
        let current = store.current_snapshot().await.unwrap().expect("a snapshot");
        assert_eq!(current.snapshot.into_inner(), vec![1, 2, 250]);
        // Written again: binary, read back the same.
        store.put(SNAPSHOT, &snapshot).unwrap();
        let raw = store.disk.get(Tree::Meta, SNAPSHOT).unwrap().unwrap();
        assert_eq!(raw[0], super::super::codec::MARKER);
        let current = store.current_snapshot().await.unwrap().expect("a snapshot");
        assert_eq!(current.snapshot.into_inner(), vec![1, 2, 250]);
    }

    /// A purge waits for the snapshot it follows to be stored: openraft
    /// purges behind a snapshot a follower receives without waiting for the
    /// state machine to install it.
    #[tokio::test(start_paused = true)]
    async fn a_purge_waits_for_its_snapshot() {
        let disk = MemoryDisk::new(Duration::from_millis(1));
        let mut store = five(&disk);
        let at = |i| LogId::new(CommittedLeaderId::new(1, 1), i);
        let task = tokio::spawn({
            let mut store = store.clone();
            async move { store.purge(at(4)).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!task.is_finished(), "no snapshot covers 4 yet");
        assert_eq!(
            store.get_log_state().await.unwrap().last_purged_log_id,
            None
        );
        let snapshot = StoredSnapshot {
            meta: SnapshotMeta {
                last_log_id: Some(at(5)),
                last_membership: StoredMembership::default(),
                snapshot_id: "s2".into(),
            },
            data: b"[]".to_vec(),
        };
        store.put(SNAPSHOT, &snapshot).unwrap();
        task.await.unwrap().unwrap();
        let state = store.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(at(4)));
        assert_eq!(store.try_get_log_entries(..).await.unwrap().len(), 1);
        // Never: an error, not a hang.
        assert!(store.purge(at(9)).await.is_err());
    }

    /// Whatever a crash in the middle of a truncation or a purge keeps, the
    /// log left is consecutive (openraft's first rule for a log store): the
    /// removal is one atomic write, not one write per entry, which a crash
    /// could cut after the first ones and leave the newer entries of an
    /// older leader behind a hole.
    #[tokio::test(start_paused = true)]
    async fn a_crash_while_removing_entries_leaves_no_hole() {
        for purge in [false, true] {
            for keep in 0..=4 {
                let disk = MemoryDisk::new(Duration::from_millis(1));
                let mut store = five(&disk);
                let at = LogId::new(CommittedLeaderId::new(1, 1), 2);
                let task = tokio::spawn({
                    let mut store = store.clone();
                    async move {
                        if purge {
                            store.purge(at).await
                        } else {
                            store.truncate(at).await
                        }
                    }
                });
                // The removal is written and being flushed when the power goes.
                tokio::task::yield_now().await;
                disk.crash(keep.min(disk.unflushed()));
                assert!(task.await.unwrap().is_err(), "the old handle fails");
                store = LogStore::in_memory(&disk);
                let state = store.get_log_state().await.unwrap();
                let from = state.last_purged_log_id.map_or(1, |l| l.index + 1);
                let last = state.last_log_id.map_or(0, |l| l.index);
                let got = store.try_get_log_entries(from..=last).await.unwrap();
                let want: Vec<u64> = (from..=last).collect();
                let have: Vec<u64> = got.iter().map(|e| e.log_id.index).collect();
                assert_eq!(have, want, "purge {purge}, {keep} writes kept");
            }
        }
    }
}
