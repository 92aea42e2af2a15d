//! A quorum queue group's storage on this node. The log store is the one
//! every Raft group of warren uses (`cluster::store::LogStore`, here over
//! [`QTypeConfig`]); every quorum group's log, vote, commit index and
//! snapshot live in ONE sled database (`<data_dir>/quorum`), a tree per
//! group (`cluster::disk`, `Disk::Shared`; values over 4 KiB in the node's
//! value files, `cluster::values`, a pointer in the tree), or on a simulated disk in the
//! simulation of the groups (`tests/quorum_sim.rs`). An append is acknowledged after a flush of that
//! database, and one flush covers whatever every group wrote before it
//! (sled fsyncs its whole log), so many groups share each fsync. The state
//! machine (the queue's live messages, [`QState`]) is in memory, rebuilt at
//! start from the last snapshot and the committed log after it; snapshots
//! are written to the group's tree, and openraft purges the log behind them,
//! so the tree stays bounded by the live messages plus the entries since the
//! last snapshot.

use super::command::{id, Outcome, QCommand, QState, Taken};
use super::QTypeConfig;
use crate::broker::queue::{Enqueued, Queue};
use crate::cluster::store::{io_err, snapshot_meta, LogStore, StoredSnapshot, SNAPSHOT};
use crate::cluster::NodeInfo;
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership,
};
use parking_lot::Mutex;
use std::io::Cursor;
use std::sync::Arc;

type NodeId = u64;
type SErr = StorageError<NodeId>;

/// One group's log, vote, commit index and snapshot: the store every group
/// uses, on a tree of the shared database ([`LogStore::new`]; in the
/// simulation of the groups, on a simulated disk).
pub type QLog = LogStore<QTypeConfig>;

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
            inner.state = crate::cluster::codec::decode(&snap.data).map_err(|e| e.to_string())?;
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
            let data = crate::cluster::codec::encode(&s.state)
                .map_err(|e| StorageIOError::write_snapshot(None, io_err(e)))?;
            (snapshot_meta(s.last_applied, s.membership.clone()), data)
        };
        self.put_snapshot(&meta, &data).await?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl QSm {
    /// Keep a snapshot, flushed (the quorum groups' store flushes only when
    /// asked).
    async fn put_snapshot(
        &self,
        meta: &SnapshotMeta<NodeId, NodeInfo>,
        data: &[u8],
    ) -> Result<(), SErr> {
        self.log.put_snapshot(meta, data).await?;
        self.log
            .flush()
            .await
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), io_err(e)).into())
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

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Vec<Outcome>>, SErr>
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
                    let taken = s.state.apply(index, cmd);
                    let batch = match cmd {
                        QCommand::Enqueue(batch) => batch.as_slice(),
                        QCommand::Settle(_)
                        | QCommand::Return(_)
                        | QCommand::Checkout { .. }
                        | QCommand::Horizon(_) => &[],
                    };
                    // The node serving the queue delivers new messages from
                    // now on; each publisher's confirm follows the queue's
                    // answer.
                    batch
                        .iter()
                        .zip(taken)
                        .enumerate()
                        .map(|(i, (m, taken))| match (taken, &s.serving) {
                            (Taken::Duplicate, _) => Outcome::Taken,
                            (Taken::OutOfSequence, _) => Outcome::OutOfSequence,
                            (Taken::New, None) => Outcome::Taken,
                            (Taken::New, Some(q)) => {
                                match q.enqueue_replicated(
                                    m.message(),
                                    id(index, i),
                                    (false, 0),
                                    m.at,
                                    now,
                                ) {
                                    Enqueued::Rejected => Outcome::Refused,
                                    Enqueued::Accepted { .. } => Outcome::Taken,
                                }
                            }
                        })
                        .collect()
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
        let state: QState = crate::cluster::codec::decode(&data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), io_err(e)))?;
        {
            let mut s = self.inner.lock();
            s.state = state;
            s.last_applied = meta.last_log_id;
            s.membership = meta.last_membership.clone();
        }
        self.put_snapshot(meta, &data).await
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<QTypeConfig>>, SErr> {
        self.log.current_snapshot().await
    }
}
