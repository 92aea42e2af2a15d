//! A quorum queue group's storage on this node. Every group's log, vote,
//! commit index and snapshot live in ONE sled database (`<data_dir>/quorum`),
//! a tree per group: an append is acknowledged after a flush of that
//! database, and one flush covers whatever every group wrote before it
//! (sled fsyncs its whole log), so many groups share each fsync. The state
//! machine (the queue's live messages, [`QState`]) is in memory, rebuilt at
//! start from the last snapshot and the committed log after it; snapshots
//! are written to the group's tree, and openraft purges the log behind them,
//! so the tree stays bounded by the live messages plus the entries since the
//! last snapshot.

use super::command::{id, QCommand, QState};
use super::QTypeConfig;
use crate::broker::queue::{Enqueued, Queue};
use crate::cluster::store::{index_range, io_err, string_err, StoredSnapshot};
use crate::cluster::NodeInfo;
use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership, Vote,
};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::sync::Arc;

type NodeId = u64;
type SErr = StorageError<NodeId>;

const VOTE: &[u8] = b"m:vote";
const COMMITTED: &[u8] = b"m:committed";
const PURGED: &[u8] = b"m:purged";
const SNAPSHOT: &[u8] = b"m:snapshot";

fn log_key(index: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = b'l';
    k[1..].copy_from_slice(&index.to_be_bytes());
    k
}

/// One group's log (a tree of the shared database).
#[derive(Clone)]
pub struct QLog {
    db: sled::Db,
    tree: sled::Tree,
}

impl QLog {
    pub fn new(db: sled::Db, tree: sled::Tree) -> QLog {
        QLog { db, tree }
    }

    fn get<T: for<'a> Deserialize<'a>>(&self, key: &[u8]) -> Result<Option<T>, String> {
        match self.tree.get(key).map_err(|e| e.to_string())? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| e.to_string()),
        }
    }

    fn put<T: Serialize>(&self, key: &[u8], value: &T) -> Result<(), String> {
        let v = serde_json::to_vec(value).map_err(|e| e.to_string())?;
        self.tree.insert(key, v).map_err(|e| e.to_string())?;
        Ok(())
    }

    async fn flush(&self) -> std::io::Result<()> {
        self.db
            .flush_async()
            .await
            .map(drop)
            .map_err(std::io::Error::other)
    }

    /// Remove entries `[from, to]` (`to` None: to the end) in one atomic
    /// batch, then flush.
    async fn remove_logs(&self, from: u64, to: Option<u64>) -> Result<(), SErr> {
        let end = log_key(to.unwrap_or(u64::MAX));
        let mut batch = sled::Batch::default();
        for kv in self.tree.range(log_key(from)..=end) {
            let (k, _) = kv.map_err(|e| StorageIOError::write_logs(io_err(e)))?;
            batch.remove(k);
        }
        self.tree
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(io_err(e)))?;
        self.flush()
            .await
            .map_err(|e| StorageIOError::write_logs(io_err(e)))?;
        Ok(())
    }
}

impl RaftLogReader<QTypeConfig> for QLog {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<QTypeConfig>>, SErr> {
        let Some((start, end)) = index_range(&range) else {
            return Ok(Vec::new());
        };
        let end = end.unwrap_or(u64::MAX);
        let mut out = Vec::new();
        for kv in self.tree.range(log_key(start)..=log_key(end)) {
            let (_, v) = kv.map_err(|e| StorageIOError::read_logs(io_err(e)))?;
            let entry: Entry<QTypeConfig> =
                serde_json::from_slice(&v).map_err(|e| StorageIOError::read_logs(io_err(e)))?;
            out.push(entry);
        }
        Ok(out)
    }
}

impl RaftLogStorage<QTypeConfig> for QLog {
    type LogReader = QLog;

    async fn get_log_state(&mut self) -> Result<LogState<QTypeConfig>, SErr> {
        let purged: Option<LogId<NodeId>> = self
            .get(PURGED)
            .map_err(|e| StorageIOError::read_logs(string_err(e)))?;
        let last = self
            .tree
            .range(log_key(0)..=log_key(u64::MAX))
            .next_back()
            .transpose()
            .map_err(|e| StorageIOError::read_logs(io_err(e)))?;
        let last = match last {
            Some((_, v)) => {
                let e: Entry<QTypeConfig> =
                    serde_json::from_slice(&v).map_err(|e| StorageIOError::read_logs(io_err(e)))?;
                Some(e.log_id)
            }
            None => purged,
        };
        Ok(LogState {
            last_purged_log_id: purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> QLog {
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

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<QTypeConfig>) -> Result<(), SErr>
    where
        I: IntoIterator<Item = Entry<QTypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut batch = sled::Batch::default();
        for e in entries {
            let v = serde_json::to_vec(&e).map_err(|e| StorageIOError::write_logs(io_err(e)))?;
            batch.insert(&log_key(e.log_id.index)[..], v);
        }
        self.tree
            .apply_batch(batch)
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
        self.put(PURGED, &log_id)
            .map_err(|e| StorageIOError::write_logs(string_err(e)))?;
        self.remove_logs(0, Some(log_id.index)).await
    }
}

/// What the state machine holds.
#[derive(Default)]
pub struct SmInner {
    pub state: QState,
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, NodeInfo>,
    /// This node serves the queue: committed enqueues go into it.
    pub serving: Option<Arc<Queue>>,
}

/// The group's state machine (cheap to clone: a handle).
#[derive(Clone)]
pub struct QSm {
    log: QLog,
    pub inner: Arc<Mutex<SmInner>>,
}

impl QSm {
    /// The state machine of `log`'s group, from its last snapshot.
    pub fn open(log: QLog) -> Result<QSm, String> {
        let mut inner = SmInner::default();
        if let Some(snap) = log.get::<StoredSnapshot>(SNAPSHOT)? {
            inner.state = serde_json::from_slice(&snap.data).map_err(|e| e.to_string())?;
            inner.last_applied = snap.meta.last_log_id;
            inner.membership = snap.meta.last_membership;
        }
        Ok(QSm {
            log,
            inner: Arc::new(Mutex::new(inner)),
        })
    }
}

impl RaftSnapshotBuilder<QTypeConfig> for QSm {
    async fn build_snapshot(&mut self) -> Result<Snapshot<QTypeConfig>, SErr> {
        let (meta, data) = {
            let s = self.inner.lock();
            let data = serde_json::to_vec(&s.state)
                .map_err(|e| StorageIOError::write_snapshot(None, io_err(e)))?;
            let id = match s.last_applied {
                Some(l) => format!("{}-{}-{}", l.leader_id, l.index, crate::clock::now_ms()),
                None => format!("empty-{}", crate::clock::now_ms()),
            };
            let meta = SnapshotMeta {
                last_log_id: s.last_applied,
                last_membership: s.membership.clone(),
                snapshot_id: id,
            };
            (meta, data)
        };
        let stored = StoredSnapshot {
            meta: meta.clone(),
            data: data.clone(),
        };
        self.log
            .put(SNAPSHOT, &stored)
            .map_err(|e| StorageIOError::write_snapshot(None, string_err(e)))?;
        self.log
            .flush()
            .await
            .map_err(|e| StorageIOError::write_snapshot(None, io_err(e)))?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<QTypeConfig> for QSm {
    type SnapshotBuilder = QSm;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, NodeInfo>), SErr> {
        let s = self.inner.lock();
        Ok((s.last_applied, s.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Vec<bool>>, SErr>
    where
        I: IntoIterator<Item = Entry<QTypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let now = crate::clock::now_ms();
        let mut out = Vec::new();
        let mut s = self.inner.lock();
        for entry in entries {
            s.last_applied = Some(entry.log_id);
            let index = entry.log_id.index;
            out.push(match &entry.payload {
                EntryPayload::Blank => Vec::new(),
                EntryPayload::Normal(cmd) => {
                    s.state.apply(index, cmd);
                    match (cmd, &s.serving) {
                        // The node serving the queue delivers them from now
                        // on; each publisher's confirm follows the queue's
                        // answer.
                        (QCommand::Enqueue(batch), Some(q)) => batch
                            .iter()
                            .enumerate()
                            .map(|(i, m)| match m.message() {
                                Some(msg) => !matches!(
                                    q.enqueue_replicated(msg, id(index, i), false, now),
                                    Enqueued::Rejected
                                ),
                                None => false,
                            })
                            .collect(),
                        (QCommand::Enqueue(batch), None) => vec![true; batch.len()],
                        _ => Vec::new(),
                    }
                }
                EntryPayload::Membership(m) => {
                    s.membership = StoredMembership::new(Some(entry.log_id), m.clone());
                    Vec::new()
                }
            });
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> QSm {
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
        let state: QState = serde_json::from_slice(&data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), io_err(e)))?;
        {
            let mut s = self.inner.lock();
            s.state = state;
            s.last_applied = meta.last_log_id;
            s.membership = meta.last_membership.clone();
        }
        self.log
            .put(
                SNAPSHOT,
                &StoredSnapshot {
                    meta: meta.clone(),
                    data,
                },
            )
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), string_err(e)))?;
        self.log
            .flush()
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), io_err(e)))?;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<QTypeConfig>>, SErr> {
        let stored: Option<StoredSnapshot> = self
            .log
            .get(SNAPSHOT)
            .map_err(|e| StorageIOError::read_snapshot(None, string_err(e)))?;
        Ok(stored.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}
