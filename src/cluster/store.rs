//! The metadata group's storage on this node: the Raft log, vote and commit
//! index in a sled database of their own (`<data_dir>/cluster`), flushed to disk
//! before an append or a vote is acknowledged; and the state machine, which
//! applies committed commands to the local broker and keeps the replicated
//! model (its snapshot), persisted with the last applied log id so a restart
//! never applies an entry twice.

use super::command::{Command, Metadata};
use super::{NodeInfo, TypeConfig};
use crate::broker::Broker;
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
use std::path::Path;
use std::sync::Arc;

type NodeId = u64;
type SErr = StorageError<NodeId>;

fn io_err(e: impl std::error::Error + 'static) -> openraft::AnyError {
    openraft::AnyError::new(&e)
}

/// The log, vote and commit index (cheap to clone: sled trees are handles).
#[derive(Clone)]
pub struct LogStore {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
}

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const PURGED: &[u8] = b"last_purged";
const SM: &[u8] = b"state_machine";
const SNAPSHOT: &[u8] = b"snapshot";

impl LogStore {
    pub fn open(dir: &Path) -> Result<LogStore, sled::Error> {
        let db = sled::Config::new().path(dir).flush_every_ms(None).open()?;
        Ok(LogStore {
            log: db.open_tree("log")?,
            meta: db.open_tree("meta")?,
            db,
        })
    }

    fn get<T: for<'a> Deserialize<'a>>(&self, key: &[u8]) -> Result<Option<T>, String> {
        match self.meta.get(key).map_err(|e| e.to_string())? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|e| e.to_string()),
        }
    }

    fn put<T: Serialize>(&self, key: &[u8], value: &T) -> Result<(), String> {
        let v = serde_json::to_vec(value).map_err(|e| e.to_string())?;
        self.meta.insert(key, v).map_err(|e| e.to_string())?;
        Ok(())
    }

    async fn flush(&self) -> Result<(), sled::Error> {
        self.db.flush_async().await.map(drop)
    }

    /// Remove the log entries whose (big-endian) index keys are in `range`,
    /// then flush: truncating the tail and purging the head alike.
    async fn remove_logs(&self, range: impl RangeBounds<[u8; 8]>) -> Result<(), SErr> {
        let keys: Vec<_> = self
            .log
            .range(range)
            .keys()
            .collect::<Result<_, _>>()
            .map_err(|e| StorageIOError::write_logs(io_err(e)))?;
        for k in keys {
            self.log
                .remove(k)
                .map_err(|e| StorageIOError::write_logs(io_err(e)))?;
        }
        self.flush()
            .await
            .map_err(|e| StorageIOError::write_logs(io_err(e)))?;
        Ok(())
    }

    /// Forget the log, vote and state (a lone node about to join another cluster).
    pub fn reset(&self) -> Result<(), sled::Error> {
        self.log.clear()?;
        self.meta.clear()?;
        self.db.flush().map(drop)
    }

    /// Whether this node has ever been part of a cluster (a vote or a log).
    pub fn is_fresh(&self) -> bool {
        self.meta.get(VOTE).ok().flatten().is_none() && self.log.is_empty()
    }
}

fn string_err(e: String) -> openraft::AnyError {
    openraft::AnyError::error(e)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, SErr> {
        use std::ops::Bound;
        let start = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => i + 1,
            Bound::Unbounded => 0,
        };
        let mut out = Vec::new();
        for kv in self.log.range(start.to_be_bytes()..) {
            let (k, v) = kv.map_err(|e| StorageIOError::read_logs(io_err(e)))?;
            let idx = u64::from_be_bytes(k.as_ref().try_into().unwrap_or([0xff; 8]));
            if !range.contains(&idx) {
                break;
            }
            let entry: Entry<TypeConfig> =
                serde_json::from_slice(&v).map_err(|e| StorageIOError::read_logs(io_err(e)))?;
            out.push(entry);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, SErr> {
        let purged: Option<LogId<NodeId>> = self
            .get(PURGED)
            .map_err(|e| StorageIOError::read_logs(string_err(e)))?;
        let last = match self
            .log
            .last()
            .map_err(|e| StorageIOError::read_logs(io_err(e)))?
        {
            Some((_, v)) => {
                let e: Entry<TypeConfig> =
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

    async fn get_log_reader(&mut self) -> LogStore {
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

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), SErr>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + Send,
        I::IntoIter: Send,
    {
        let mut batch = sled::Batch::default();
        for e in entries {
            let v = serde_json::to_vec(&e).map_err(|e| StorageIOError::write_logs(io_err(e)))?;
            batch.insert(&e.log_id.index.to_be_bytes(), v);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(io_err(e)))?;
        // Acknowledged only once on disk.
        let r = self.flush().await.map_err(std::io::Error::other);
        callback.log_io_completed(r);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        self.remove_logs(log_id.index.to_be_bytes()..).await
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), SErr> {
        self.put(PURGED, &log_id)
            .map_err(|e| StorageIOError::write_logs(string_err(e)))?;
        self.remove_logs(..=log_id.index.to_be_bytes()).await
    }
}

/// What the state machine persists after each batch it applies.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Applied {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, NodeInfo>,
    metadata: Metadata,
}

/// A snapshot as kept on disk: its meta and the model's JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, NodeInfo>,
    data: Vec<u8>,
}

/// The state machine: the local broker, and the replicated model.
#[derive(Clone)]
pub struct StateMachine {
    broker: Arc<Broker>,
    store: LogStore,
    state: Arc<Mutex<Applied>>,
    /// Told each queue record's home node as records are applied.
    forwarder: Arc<std::sync::OnceLock<Arc<super::forward::Forwarder>>>,
}

impl StateMachine {
    /// The state machine over `broker`, resumed from what `store` persisted.
    pub fn open(broker: Arc<Broker>, store: LogStore) -> Result<StateMachine, String> {
        let state: Applied = store.get(SM)?.unwrap_or_default();
        Ok(StateMachine {
            broker,
            store,
            state: Arc::new(Mutex::new(state)),
            forwarder: Arc::default(),
        })
    }

    /// Where queue records' home nodes are told (set once at start).
    pub fn set_forwarder(&self, f: Arc<super::forward::Forwarder>) {
        let _ = self.forwarder.set(f);
    }

    /// Tell every queue of the model where its messages live.
    pub fn mark_all(&self) {
        let Some(f) = self.forwarder.get() else {
            return;
        };
        let queues: Vec<(String, String, String)> = {
            let s = self.state.lock();
            s.metadata
                .queues
                .values()
                .filter_map(|c| match c {
                    Command::DeclareQueue {
                        vhost, name, node, ..
                    } => Some((vhost.clone(), name.clone(), node.clone())),
                    _ => None,
                })
                .collect()
        };
        for (vhost, name, node) in queues {
            f.mark(&self.broker, &vhost, &name, &node);
        }
    }

    /// Back to nothing applied (with [`LogStore::reset`]).
    pub fn reset(&self) {
        *self.state.lock() = Applied::default();
    }

    /// The committed model (for status and the admin API).
    pub fn metadata(&self) -> Metadata {
        self.state.lock().metadata.clone()
    }

    fn persist(&self, state: &Applied) -> Result<(), String> {
        self.store.put(SM, state)
    }

    fn apply_command(&self, state: &mut Applied, cmd: &Command, now: u64) -> Option<String> {
        match cmd.apply_and_record(&self.broker, now, &mut state.metadata) {
            Ok(()) => {
                if let (Command::DeclareQueue { vhost, name, .. }, Some(f)) =
                    (cmd, self.forwarder.get())
                {
                    if let Some(home) = state.metadata.queue_node(vhost, name) {
                        f.mark(&self.broker, vhost, name, home);
                    }
                }
                None
            }
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
            let s = self.state.lock();
            let data = serde_json::to_vec(&s.metadata)
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
        self.store
            .put(SNAPSHOT, &stored)
            .map_err(|e| StorageIOError::write_snapshot(None, string_err(e)))?;
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
        let mut out = Vec::new();
        let snapshot = {
            let mut s = self.state.lock();
            for entry in entries {
                s.last_applied = Some(entry.log_id);
                out.push(match &entry.payload {
                    EntryPayload::Blank => None,
                    EntryPayload::Normal(cmd) => self.apply_command(&mut s, cmd, now),
                    EntryPayload::Membership(m) => {
                        s.membership = StoredMembership::new(Some(entry.log_id), m.clone());
                        None
                    }
                });
            }
            s.clone()
        };
        self.persist(&snapshot)
            .map_err(|e| StorageIOError::write_state_machine(string_err(e)))?;
        // On disk before openraft moves on: a restart must not apply these again.
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
        let metadata: Metadata = serde_json::from_slice(&data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), io_err(e)))?;
        let now = crate::clock::now_ms();
        let state = {
            let mut s = self.state.lock();
            // Exact: what this node has of the replicated kinds and the
            // snapshot lacks goes first (a record the group deleted while this
            // node was behind, or a change made here that never committed).
            let have = Metadata::of_broker(&self.broker, &s.metadata);
            for cmd in metadata.removals(&have) {
                if let Err(why) = cmd.apply_to(&self.broker, now) {
                    tracing::debug!(?cmd, %why, "removal for a snapshot refused locally");
                }
            }
            s.metadata = Metadata::default();
            for cmd in metadata.replay() {
                self.apply_command(&mut s, &cmd, now);
            }
            // The model is the snapshot's, whatever this node's broker said.
            s.metadata = metadata;
            if let Some(f) = self.forwarder.get() {
                for c in s.metadata.queues.values() {
                    if let Command::DeclareQueue {
                        vhost, name, node, ..
                    } = c
                    {
                        f.mark(&self.broker, vhost, name, node);
                    }
                }
            }
            s.last_applied = meta.last_log_id;
            s.membership = meta.last_membership.clone();
            s.clone()
        };
        self.persist(&state)
            .map_err(|e| StorageIOError::write_state_machine(string_err(e)))?;
        self.store
            .put(
                SNAPSHOT,
                &StoredSnapshot {
                    meta: meta.clone(),
                    data,
                },
            )
            .map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), string_err(e)))?;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, SErr> {
        let stored: Option<StoredSnapshot> = self
            .store
            .get(SNAPSHOT)
            .map_err(|e| StorageIOError::read_snapshot(None, string_err(e)))?;
        Ok(stored.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(s.data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::vhost::{ExchangeDeclare, QueueDeclare};
    use crate::cluster::command::{Args, Command};
    use openraft::CommittedLeaderId;

    fn exchange(name: &str) -> Command {
        Command::DeclareExchange {
            vhost: "/".into(),
            name: name.into(),
            kind: "direct".into(),
            durable: true,
            auto_delete: false,
            internal: false,
            arguments: Args::default(),
        }
    }

    fn queue(name: &str) -> Command {
        Command::DeclareQueue {
            vhost: "/".into(),
            name: name.into(),
            node: "warren@a".into(),
            durable: true,
            auto_delete: false,
            arguments: Args::default(),
        }
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
        let mut sm = StateMachine::open(Arc::clone(&broker), store).expect("state machine");
        let now = 1;
        // Committed earlier: a vhost the group has since deleted.
        let old = Command::PutVhost {
            name: "gone-v".into(),
            creator: None,
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
}
