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
//!
//! # Bodies on disk
//!
//! The state machine keeps each live message's id, body length and time
//! only ([`QMsg::strip`]), on every member: the message is in the group's
//! log (the `Enqueue` that carried it) or, once the log behind a snapshot is
//! purged, in that snapshot, which holds every message live at its index.
//! The member serving the queue (its leader) hands each new message to its
//! local queue before letting go of it there; the local queue keeps a
//! window of them in memory and pages the rest out to the node's message
//! store, as a classic queue does (`broker::queue`). The bodies are read
//! back ([`read_bodies`]) when the member comes to serve the queue
//! ([`QSm::read_back`]: a batch at a time, each loaded into the queue
//! before the next is read) and when it writes a snapshot; a snapshot is
//! replaced only under the state machine's `reads` lock, so a read never
//! falls between an old snapshot and the log purged behind a new one.
//!
//! # When a group snapshots
//!
//! A snapshot holds every live message, so its cost grows with the queue: a
//! group snapshots once [`SNAPSHOT_EVERY`] entries have been applied since
//! the last one AND the bytes of messages added and removed since then reach
//! what that snapshot held ([`snapshot_due`]). Every byte written to a
//! snapshot is paid for by a byte that came or went (a growing queue
//! snapshots each time it doubles), so a long queue is not rewritten whole
//! every few thousand entries (it was: a 1 GB backlog was encoded and
//! written every 4096 entries), and the log between snapshots holds about
//! as much as the last snapshot at most. A large snapshot is encoded and
//! written on a blocking thread from a copy of the state taken under the
//! lock (applying goes on meanwhile), to a value file of its own synced as
//! it is written (`cluster::values`, [`OWN_FILE_AT`](crate::cluster::values::OWN_FILE_AT)),
//! so the groups' log syncs never wait for it.
//!
//! # Snapshots a part at a time
//!
//! No member holds a long queue's snapshot whole: it is encoded into its
//! file a block at a time ([`WithBodies`], `Disk::put_streamed`), read back
//! from it a part at a time ([`record`]: at start, each body let go of as
//! it is decoded; [`SnapshotMessages`]: a new leader's load), sent to a
//! member that fell behind from that file and received into a file there
//! (`super::snapdata`), and installed in one pass ([`Tee`]).

use super::command::{id, Outcome, QCommand, QMsg, QState, Taken};
use super::snapdata::SnapshotData;
use super::QTypeConfig;
use crate::broker::message::Message;
use crate::broker::queue::{Enqueued, Queue};
use crate::cluster::store::{
    io_err, snapshot_meta, string_err, LogStore, StoredSnapshot, SNAPSHOT,
};
use crate::cluster::NodeInfo;
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership,
};
use parking_lot::Mutex;
use serde::{Serialize, Serializer};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, Read};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

type NodeId = u64;
type SErr = StorageError<NodeId>;

/// One group's log, vote, commit index and snapshot: the store every group
/// uses, on a tree of the shared database ([`LogStore::new`]; in the
/// simulation of the groups, on a simulated disk).
pub type QLog = LogStore<QTypeConfig>;

/// A group snapshots no more often than once per this many applied entries.
pub const SNAPSHOT_EVERY: u64 = 4096;

/// A snapshot of a state at least this large (bytes, [`weight`]) is encoded
/// and written on a blocking thread, and one received is decoded there.
const BLOCKING_AT: u64 = 1 << 20;

/// What one live message counts for in the snapshot rule: its body and a
/// fixed allowance for its properties, routing and ids.
pub fn weight(m: &QMsg) -> u64 {
    m.body_len() as u64 + WEIGHT_EXTRA
}

/// What [`weight`] adds to a message's body.
const WEIGHT_EXTRA: u64 = 64;

/// A snapshot is due: `entries` applied and `changed` bytes of messages
/// added or removed since the last one, which held `held` bytes of them.
pub fn snapshot_due(entries: u64, changed: u64, held: u64) -> bool {
    entries >= SNAPSHOT_EVERY && changed >= held
}

/// `f()`, on a blocking thread when `large` (a large snapshot's encoding,
/// decoding and writing), else right here.
async fn off_runtime_if<T: Send + 'static>(
    large: bool,
    f: impl FnOnce() -> Result<T, SErr> + Send + 'static,
) -> Result<T, SErr> {
    if !large {
        return f();
    }
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StorageIOError::write_snapshot(None, io_err(e)))?
}

/// What the state machine holds.
#[derive(Default)]
pub struct SmInner {
    pub state: QState,
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, NodeInfo>,
    /// This node serves the queue: committed enqueues go into it.
    pub serving: Option<Arc<Queue>>,
    /// The live messages' bytes ([`weight`]).
    live: u64,
    /// The last snapshot's index and live bytes, and the bytes of messages
    /// added and removed since it.
    snapshot_at: u64,
    held: u64,
    changed: u64,
    /// The applied index a snapshot was asked for at, until it is built.
    asked_at: Option<u64>,
}

impl SmInner {
    /// A snapshot of the state as it is now was taken: count from here.
    fn snapshot_taken(&mut self) {
        self.snapshot_at = self.applied_index();
        self.held = self.live;
        self.changed = 0;
        self.asked_at = None;
    }

    /// The state is a snapshot's just loaded: weigh it, count from here.
    fn loaded(&mut self) {
        self.live = self.state.messages.values().map(weight).sum();
        self.snapshot_taken();
    }

    /// The live messages: how many, and their body bytes.
    pub fn lengths(&self) -> (usize, u64) {
        let n = self.state.messages.len();
        (n, self.live.saturating_sub(n as u64 * WEIGHT_EXTRA))
    }

    fn applied_index(&self) -> u64 {
        self.last_applied.map_or(0, |l| l.index)
    }

    /// The live messages whose bodies are not held.
    fn stripped(&self) -> BTreeSet<u64> {
        let m = self.state.messages.iter();
        m.filter(|(_, m)| !m.is_held()).map(|(id, _)| *id).collect()
    }
}

/// Hold again the bodies of `state`'s messages that [`read_bodies`] found;
/// how many live messages are still without one.
fn hold_found(state: &mut QState, mut found: BTreeMap<u64, Arc<Message>>) -> usize {
    let mut missing = 0;
    for (id, m) in state.messages.iter_mut().filter(|(_, m)| !m.is_held()) {
        match found.remove(id) {
            Some(full) => m.hold(full),
            None => missing += 1,
        }
    }
    missing
}

/// A state whose bodies were let go of, encoded as [`QState`] encodes the
/// whole state (field for field, the same bytes), each message's body
/// read back ([`read_bodies`]) as it is written, [`WRITE_BATCH`] messages
/// at a time: a snapshot being written holds what it wrote so far and one
/// batch of bodies, not every body besides.
struct WithBodies<'a> {
    state: &'a QState,
    log: &'a QLog,
}

/// How many messages [`WithBodies`] reads the bodies of at a time.
const WRITE_BATCH: usize = 4096;

impl Serialize for WithBodies<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        // As `#[derive(Serialize)]` writes `QState`: the fields it skips
        // when empty are left out of the count and the struct.
        let st = self.state;
        let (enqueuers, returns, out) = (
            !st.enqueuers.is_empty(),
            !st.returns.is_empty(),
            !st.out.is_empty(),
        );
        let horizon = st.horizon != 0;
        let len = 1 + [enqueuers, returns, out, horizon]
            .iter()
            .filter(|b| **b)
            .count();
        let mut w = s.serialize_struct("QState", len)?;
        w.serialize_field("messages", &Messages(self))?;
        if enqueuers {
            w.serialize_field("enqueuers", &st.enqueuers)?;
        }
        if returns {
            w.serialize_field("returns", &st.returns)?;
        }
        if out {
            w.serialize_field("out", &st.out)?;
        }
        if horizon {
            w.serialize_field("horizon", &st.horizon)?;
        }
        w.end()
    }
}

/// [`WithBodies`]' messages, as a map by id.
struct Messages<'a>(&'a WithBodies<'a>);

impl Serialize for Messages<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{Error, SerializeMap};
        let WithBodies { state, log } = self.0;
        let mut map = s.serialize_map(Some(state.messages.len()))?;
        // The snapshot's messages, once decoded (by the first batch that
        // wants one), for the later batches.
        let mut snapshot = None;
        let mut messages = state.messages.iter().peekable();
        while messages.peek().is_some() {
            let batch: Vec<(&u64, &QMsg)> = messages.by_ref().take(WRITE_BATCH).collect();
            let want = batch.iter().filter(|(_, m)| !m.is_held());
            let want: BTreeSet<u64> = want.map(|(id, _)| **id).collect();
            let mut found = read_bodies(log, &want, &mut snapshot).map_err(S::Error::custom)?;
            for (id, m) in batch {
                if m.is_held() {
                    map.serialize_entry(id, m)?;
                    continue;
                }
                let Some(body) = found.remove(id) else {
                    let e = format!("the body of live message {id} is not on disk");
                    return Err(S::Error::custom(e));
                };
                let mut full = m.clone();
                full.hold(body);
                map.serialize_entry(id, &full)?;
            }
        }
        map.end()
    }
}

/// How many log entries [`read_bodies`] reads at a time.
const READ_ENTRIES: u64 = 256;

/// The bodies of the live messages `want` (ids), read back from the
/// group's log and, for those whose entries were purged, its snapshot: a
/// live message is in one of them (a snapshot holds every message live at
/// its index, and the log is purged only behind the snapshot kept). Reads
/// the log before the snapshot, so that a purge meanwhile finds the
/// message in the snapshot it followed. Blocking. Ids found in neither are
/// left out (a message settled meanwhile, when the caller does not hold
/// the state still).
///
/// `snapshot`: the snapshot's messages as an earlier call left them, or
/// None (opened here when some wanted id is not in the log); each call must
/// want ids after the last one's ([`SnapshotMessages::take`]).
fn read_bodies(
    log: &QLog,
    want: &BTreeSet<u64>,
    snapshot: &mut Option<SnapshotMessages>,
) -> Result<BTreeMap<u64, Arc<Message>>, String> {
    let mut found = BTreeMap::new();
    let (Some(first), Some(last)) = (want.first(), want.last()) else {
        return Ok(found);
    };
    // A few entries at a time: what is held is what was wanted (an id's
    // entry index is at most 48 bits: no overflow).
    let to = last >> 16;
    for from in (first >> 16..=to).step_by(READ_ENTRIES as usize) {
        let upto = (from + READ_ENTRIES - 1).min(to);
        let entries = log
            .entries_now(from, Some(upto))
            .map_err(|e| format!("reading the log: {e}"))?;
        for entry in entries {
            if let EntryPayload::Normal(QCommand::Enqueue(batch)) = entry.payload {
                let index = entry.log_id.index;
                for (i, m) in batch.into_iter().enumerate() {
                    if want.contains(&id(index, i)) {
                        found.insert(id(index, i), m.message);
                    }
                }
            }
        }
    }
    if found.len() < want.len() {
        if snapshot.is_none() {
            *snapshot = Some(SnapshotMessages::open(log)?);
        }
        if let Some(snap) = snapshot {
            snap.take(want, &mut found)?;
        }
    }
    Ok(found)
}

/// The messages of the snapshot kept, decoded in id order as they are
/// asked for ([`SnapshotMessages::take`]) from its record, read a part at a
/// time ([`QLog::get_reader`]): a long queue's snapshot is not read into
/// memory, nor decoded, whole.
pub struct SnapshotMessages {
    /// At the next message (its id, then it), `left` of them to come.
    reader: Option<Box<dyn BufRead + Send>>,
    left: usize,
    /// One decoded and not asked for yet (past what the last call wanted).
    next: Option<(u64, QMsg)>,
    /// A record of another layout (JSON): decoded whole instead.
    whole: BTreeMap<u64, Arc<Message>>,
}

impl SnapshotMessages {
    /// The snapshot kept by `log` (none: no messages).
    fn open(log: &QLog) -> Result<SnapshotMessages, String> {
        Self::of(log.get_reader(SNAPSHOT)?)
    }

    /// The messages of the snapshot record at `r` (none: no messages).
    fn of(r: Option<Box<dyn BufRead + Send>>) -> Result<SnapshotMessages, String> {
        let mut snap = SnapshotMessages {
            reader: None,
            left: 0,
            next: None,
            whole: BTreeMap::new(),
        };
        let Some(mut r) = r else {
            return Ok(snap);
        };
        if record::head(&mut r)?.is_some() {
            snap.left = record::messages(&mut r)?;
            snap.reader = Some(r);
            return Ok(snap);
        }
        let (_, state) = record::whole(r)?;
        snap.whole = state
            .messages
            .into_iter()
            .filter(|(_, m)| m.is_held())
            .map(|(id, m)| (id, m.message))
            .collect();
        Ok(snap)
    }

    /// Add the bodies of those of `want` it holds to `found` (unless found
    /// there already). Each call must want ids after the last one's: the
    /// messages before its last wanted id are passed for good.
    fn take(
        &mut self,
        want: &BTreeSet<u64>,
        found: &mut BTreeMap<u64, Arc<Message>>,
    ) -> Result<(), String> {
        let Some(&last) = want.last() else {
            return Ok(());
        };
        if !self.whole.is_empty() {
            for id in want {
                if let Some(m) = self.whole.remove(id) {
                    found.entry(*id).or_insert(m);
                }
            }
            return Ok(());
        }
        loop {
            let (id, m) = match (self.next.take(), &mut self.reader) {
                (Some(next), _) => next,
                (None, Some(r)) if self.left > 0 => {
                    self.left -= 1;
                    record::message(r)?
                }
                (None, _) => return Ok(()),
            };
            if id > last {
                self.next = Some((id, m));
                return Ok(());
            }
            if want.contains(&id) && m.is_held() {
                found.entry(id).or_insert(m.message);
            }
        }
    }
}

/// A quorum queue's snapshot record (a [`StoredSnapshot`] of a [`QState`],
/// both MessagePack by field name, [`crate::cluster::codec`]) read from a
/// reader a part at a time: its meta, then its state's fields, the
/// messages one by one.
mod record {
    use super::{QMsg, QState, StoredSnapshot};
    use crate::cluster::codec;
    use crate::cluster::codec::read::{self, err};
    use crate::cluster::NodeInfo;
    use openraft::SnapshotMeta;
    use serde::de::IgnoredAny;
    use std::io::{BufRead, Read};

    type Meta = SnapshotMeta<u64, NodeInfo>;

    /// The record's meta, `r` left at the start of its state's bytes (and
    /// their length); None, `r` as it was, for a record of another layout
    /// (JSON, from earlier versions: [`whole`]).
    pub fn head(r: &mut dyn BufRead) -> Result<Option<(Meta, u32)>, String> {
        crate::cluster::store::snapshot_head(r)
    }

    /// How many messages the state at `r` holds, `r` left at the first
    /// (the fields before them skipped).
    pub fn messages(r: &mut dyn BufRead) -> Result<usize, String> {
        read::marker(r)?;
        for _ in 0..read::map_len(r)? {
            if read::key(r)? == b"messages" {
                return Ok(read::map_len(r)? as usize);
            }
            read::value::<IgnoredAny>(r)?;
        }
        Ok(0)
    }

    /// The message at `r` (its id, then it).
    pub fn message(r: &mut dyn BufRead) -> Result<(u64, QMsg), String> {
        Ok((read::value(r)?, read::value(r)?))
    }

    /// The state at `r` (its bytes, MessagePack or JSON), each message's
    /// body let go of as it is read ([`QMsg::strip`]): what a member
    /// keeps, without the bodies held at once.
    pub fn stripped(r: &mut dyn BufRead) -> Result<QState, String> {
        if !read::at_marker(r)? {
            let mut bytes = Vec::new();
            r.read_to_end(&mut bytes).map_err(err)?;
            let mut state: QState = codec::decode(&bytes).map_err(err)?;
            state.messages.values_mut().for_each(QMsg::strip);
            return Ok(state);
        }
        read::marker(r)?;
        // Field for field as `#[derive(Deserialize)]` reads `QState`
        // (fields it does not know skipped; a test checks every field).
        let mut state = QState::default();
        for _ in 0..read::map_len(r)? {
            match read::key(r)?.as_slice() {
                b"messages" => {
                    for _ in 0..read::map_len(r)? {
                        let (id, mut m) = message(r)?;
                        m.strip();
                        state.messages.insert(id, m);
                    }
                }
                b"enqueuers" => state.enqueuers = read::value(r)?,
                b"returns" => state.returns = read::value(r)?,
                b"out" => state.out = read::value(r)?,
                b"horizon" => state.horizon = read::value(r)?,
                _ => {
                    read::value::<IgnoredAny>(r)?;
                }
            }
        }
        Ok(state)
    }

    /// A record of the other layout (JSON), read and decoded whole.
    pub fn whole(mut r: Box<dyn BufRead + Send>) -> Result<(Meta, QState), String> {
        let mut bytes = Vec::new();
        r.read_to_end(&mut bytes).map_err(err)?;
        let stored: StoredSnapshot = codec::decode(&bytes).map_err(err)?;
        let state = codec::decode(&stored.data).map_err(err)?;
        Ok((stored.meta, state))
    }

    /// The meta and the stripped state ([`stripped`]) of the record at `r`.
    pub fn read(mut r: Box<dyn BufRead + Send>) -> Result<(Meta, QState), String> {
        match head(&mut r)? {
            Some((meta, _)) => Ok((meta, stripped(&mut r)?)),
            None => {
                let (meta, mut state) = whole(r)?;
                state.messages.values_mut().for_each(QMsg::strip);
                Ok((meta, state))
            }
        }
    }
}

/// The group's state machine (cheap to clone: a handle).
#[derive(Clone)]
pub struct QSm {
    log: QLog,
    pub inner: Arc<Mutex<SmInner>>,
    /// Held while bodies are read back from the snapshot kept, and while it
    /// is replaced (a snapshot built or installed): a read never misses a
    /// message between an old snapshot and a new one.
    reads: Arc<tokio::sync::Mutex<()>>,
    /// Bytes of bodies read back (or decoded from a snapshot) and let go of
    /// again since the group's watch loop last gave freed memory back to
    /// the system ([`QSm::take_freed`]).
    freed: Arc<AtomicU64>,
}

/// Reads the live messages' bodies back in the group's order, a batch at a
/// time, for a member loading them into the queue it is about to serve
/// ([`QSm::read_back`]). Holds the state machine's `reads` lock while it
/// lives: no snapshot is built or installed meanwhile, so the snapshot it
/// decodes (once, for the messages whose log entries were purged behind
/// it) stays the one the log was purged behind.
pub struct ReadBack {
    log: QLog,
    _reads: tokio::sync::OwnedMutexGuard<()>,
    /// The snapshot's messages not read yet, once opened.
    snapshot: Option<SnapshotMessages>,
}

impl ReadBack {
    /// The bodies of the live messages `want` (ids), each call's after the
    /// last one's. Blocking. Ids found nowhere (settled meanwhile) are
    /// left out.
    pub fn read(&mut self, want: &BTreeSet<u64>) -> Result<BTreeMap<u64, Arc<Message>>, String> {
        read_bodies(&self.log, want, &mut self.snapshot)
    }
}

impl QSm {
    /// The state machine of `log`'s group, from its last snapshot.
    pub fn open(log: QLog) -> Result<QSm, String> {
        let mut inner = SmInner::default();
        // Read a part at a time, each body let go of as it is read.
        if let Some(r) = log.get_reader(SNAPSHOT)? {
            let (meta, state) = record::read(r)?;
            inner.state = state;
            inner.last_applied = meta.last_log_id;
            inner.membership = meta.last_membership;
        }
        inner.loaded();
        let freed = Arc::new(AtomicU64::new(inner.live));
        Ok(QSm {
            log,
            inner: Arc::new(Mutex::new(inner)),
            reads: Arc::default(),
            freed,
        })
    }

    /// A reader of the live messages' bodies, for a member about to
    /// serve the queue ([`ReadBack`]).
    pub async fn read_back(&self) -> ReadBack {
        ReadBack {
            log: self.log.clone(),
            _reads: Arc::clone(&self.reads).lock_owned().await,
            snapshot: None,
        }
    }

    /// `bytes` of bodies held for a while were let go of.
    pub fn note_freed(&self, bytes: u64) {
        self.freed.fetch_add(bytes, Ordering::Relaxed);
    }

    /// How many bytes of bodies were let go of since the last call.
    pub fn take_freed(&self) -> u64 {
        self.freed.swap(0, Ordering::Relaxed)
    }

    /// The state with every body read back (for checks: blocking, and
    /// None while a snapshot is being replaced).
    pub fn full_state(&self) -> Result<Option<QState>, String> {
        let Ok(_reads) = self.reads.try_lock() else {
            return Ok(None);
        };
        let (mut state, want) = {
            let s = self.inner.lock();
            (s.state.clone(), s.stripped())
        };
        let found = read_bodies(&self.log, &want, &mut None)?;
        hold_found(&mut state, found);
        Ok(Some(state))
    }
}

impl RaftSnapshotBuilder<QTypeConfig> for QSm {
    // The closure sent to a blocking thread returns openraft's own error.
    #[allow(clippy::result_large_err)]
    async fn build_snapshot(&mut self) -> Result<Snapshot<QTypeConfig>, SErr> {
        // The bodies not held are read back from the snapshot this one
        // replaces (and the log after it) before it is replaced.
        let reads = self.reads.lock().await;
        let (meta, state, live, read_back) = {
            let mut s = self.inner.lock();
            s.snapshot_taken();
            let meta = snapshot_meta(s.last_applied, s.membership.clone());
            let read_back = s.state.messages.values().any(|m| !m.is_held());
            (meta, s.state.clone(), s.live, read_back)
        };
        let write = {
            let (log, meta) = (self.log.clone(), meta.clone());
            move || {
                // Bodies read back a batch at a time as the state is
                // encoded, into the record written (no copy of it).
                log.put_snapshot_streamed(&meta, |out| {
                    let state = WithBodies {
                        state: &state,
                        log: &log,
                    };
                    crate::cluster::codec::encode_to(out, &state).map_err(|e| e.to_string())
                })
            }
        };
        off_runtime_if(live >= BLOCKING_AT, write).await?;
        drop(reads);
        if read_back {
            self.note_freed(live);
        }
        self.flush_snapshot(&meta).await?;
        // openraft takes the meta of a snapshot built (0.9:
        // `Response::BuildSnapshot(snap.meta)`) and reads what it sends a
        // follower with `get_current_snapshot`: the data is not kept twice.
        Ok(Snapshot {
            meta,
            snapshot: Box::new(SnapshotData::memory(Vec::new())),
        })
    }
}

impl QSm {
    /// A snapshot is due ([`snapshot_due`]) and was not asked for in the
    /// last [`SNAPSHOT_EVERY`] entries: it counts as asked for now (the
    /// group's watch loop triggers it; openraft's own policy is off).
    pub fn snapshot_wanted(&self) -> bool {
        let mut s = self.inner.lock();
        let at = s.applied_index();
        let due = snapshot_due(at.saturating_sub(s.snapshot_at), s.changed, s.held)
            && s.asked_at
                .is_none_or(|a| at.saturating_sub(a) >= SNAPSHOT_EVERY);
        if due {
            s.asked_at = Some(at);
        }
        due
    }

    /// Make the snapshot just kept durable (the quorum groups' store
    /// flushes only when asked).
    async fn flush_snapshot(&self, meta: &SnapshotMeta<NodeId, NodeInfo>) -> Result<(), SErr> {
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
                    if let QCommand::Settle(ids) = cmd {
                        let mut ids = ids.clone();
                        ids.sort_unstable();
                        ids.dedup();
                        let gone: u64 = ids
                            .iter()
                            .filter_map(|id| s.state.messages.get(id))
                            .map(weight)
                            .sum();
                        s.live = s.live.saturating_sub(gone);
                        s.changed = s.changed.saturating_add(gone);
                    }
                    let taken = s.state.apply(index, cmd);
                    let batch = match cmd {
                        QCommand::Enqueue(batch) => batch.as_slice(),
                        QCommand::Settle(_)
                        | QCommand::Return(_)
                        | QCommand::Checkout { .. }
                        | QCommand::Horizon(_) => &[],
                    };
                    let added: u64 = batch
                        .iter()
                        .zip(&taken)
                        .filter(|(_, t)| **t == Taken::New)
                        .map(|(m, _)| weight(m))
                        .sum();
                    s.live = s.live.saturating_add(added);
                    s.changed = s.changed.saturating_add(added);
                    // The node serving the queue delivers new messages from
                    // now on; each publisher's confirm follows the queue's
                    // answer.
                    let outcomes = batch
                        .iter()
                        .zip(&taken)
                        .enumerate()
                        .map(|(i, (m, taken))| match (*taken, &s.serving) {
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
                        .collect();
                    // The bodies stay on disk only (the serving queue has
                    // its own copies, paged out past its window).
                    for (i, _) in taken.iter().enumerate().filter(|(_, t)| **t == Taken::New) {
                        if let Some(m) = s.state.messages.get_mut(&id(index, i)) {
                            m.strip();
                        }
                    }
                    outcomes
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

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<SnapshotData>, SErr> {
        // A file next to the value files, written a chunk at a time.
        let dir = self.log.values_dir();
        let data = SnapshotData::receive_into(dir.as_deref())
            .await
            .map_err(|e| StorageIOError::write_snapshot(None, io_err(e)))?;
        Ok(Box::new(data))
    }

    // The closure sent to a blocking thread returns openraft's own error.
    #[allow(clippy::result_large_err)]
    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, NodeInfo>,
        snapshot: Box<SnapshotData>,
    ) -> Result<(), SErr> {
        let large = match &*snapshot {
            SnapshotData::Memory(c) => c.get_ref().len() as u64 >= BLOCKING_AT,
            SnapshotData::File { .. } => true,
        };
        let from = snapshot
            .into_reader()
            .await
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), io_err(e)))?;
        let reads = self.reads.lock().await;
        let keep = {
            let (log, meta) = (self.log.clone(), meta.clone());
            move || {
                // Read once, a part at a time: each body let go of as it
                // is decoded, every byte written to the snapshot kept as
                // it passes (the bytes are kept as they came).
                let mut state = None;
                log.put_snapshot_streamed(&meta, |to| {
                    let mut tee = std::io::BufReader::new(Tee { from, to });
                    let read = record::stripped(&mut tee)?;
                    std::io::copy(&mut tee, &mut std::io::sink()).map_err(|e| e.to_string())?;
                    state = Some(read);
                    Ok(())
                })?;
                state.ok_or_else(|| {
                    let e = string_err("a snapshot installed without its state".into());
                    StorageIOError::read_snapshot(Some(meta.signature()), e).into()
                })
            }
        };
        let state = off_runtime_if(large, keep).await?;
        {
            let mut s = self.inner.lock();
            s.state = state;
            s.last_applied = meta.last_log_id;
            s.membership = meta.last_membership.clone();
            s.loaded();
            self.note_freed(s.live);
        }
        drop(reads);
        self.flush_snapshot(meta).await
    }

    // The closure sent to a blocking thread returns openraft's own error.
    #[allow(clippy::result_large_err)]
    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<QTypeConfig>>, SErr> {
        let log = self.log.clone();
        let read = move || -> Result<Option<Snapshot<QTypeConfig>>, String> {
            // A long one: the state's bytes end the record's own file, and
            // are sent from there a chunk at a time.
            if let Some((file, len)) = log.get_file(SNAPSHOT)? {
                let head = file.try_clone().map_err(|e| e.to_string())?;
                if let Some((meta, data)) = record::head(&mut std::io::BufReader::new(head))? {
                    let start = len
                        .checked_sub(u64::from(data))
                        .ok_or("a snapshot's data longer than its record")?;
                    let snapshot = Box::new(SnapshotData::file(file, start));
                    return Ok(Some(Snapshot { meta, snapshot }));
                }
            }
            // A short one: its state's bytes read into one buffer.
            let Some(mut r) = log.get_reader(SNAPSHOT)? else {
                return Ok(None);
            };
            let Some((meta, len)) = record::head(&mut r)? else {
                let (meta, state) = record::whole(r)?;
                let data = crate::cluster::codec::encode(&state).map_err(|e| e.to_string())?;
                let snapshot = Box::new(SnapshotData::memory(data));
                return Ok(Some(Snapshot { meta, snapshot }));
            };
            let mut data = vec![0u8; len as usize];
            r.read_exact(&mut data)
                .map_err(crate::cluster::codec::read::err)?;
            let snapshot = Box::new(SnapshotData::memory(data));
            Ok(Some(Snapshot { meta, snapshot }))
        };
        // Off the runtime on a real disk (file reads); inline on the
        // simulated one, whose runs must replay the same.
        let on_disk = self.log.values_dir().is_some();
        off_runtime_if(on_disk, move || {
            read().map_err(|e| StorageIOError::read_snapshot(None, string_err(e)).into())
        })
        .await
    }
}

/// A reader that writes what it reads from `from` to `to`.
struct Tee<'a> {
    from: Box<dyn BufRead + Send>,
    to: &'a mut dyn std::io::Write,
}

impl Read for Tee<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.from.read(buf)?;
        self.to.write_all(&buf[..n])?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::disk::MemoryDisk;
    use openraft::CommittedLeaderId;
    use std::io::Cursor;

    fn msg(len: usize) -> QMsg {
        let m = crate::broker::message::Message::new(
            "",
            "q",
            crate::wire::BasicProperties::default(),
            bytes::Bytes::from(vec![7u8; len]),
        );
        QMsg::of(&m)
    }

    /// Write the entry into the log and apply it, as a member does.
    async fn apply(sm: &mut QSm, index: u64, cmd: QCommand) {
        let entry = Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 0), index),
            payload: EntryPayload::Normal(cmd),
        };
        sm.log.put_entry_now(&entry).expect("written");
        sm.apply([entry]).await.expect("applied");
    }

    fn body(n: u64) -> QMsg {
        let m = crate::broker::message::Message::new(
            "",
            "q",
            crate::wire::BasicProperties::default(),
            bytes::Bytes::from(format!("message {n}")),
        );
        QMsg::of(&m)
    }

    /// The live messages' bodies, which must all be held.
    fn bodies(sm: &QSm) -> Vec<String> {
        let s = sm.inner.lock();
        let held = s.state.messages.values().filter(|m| m.is_held());
        held.map(|m| String::from_utf8_lossy(&m.message.body).into_owned())
            .collect()
    }

    #[tokio::test]
    async fn a_member_not_serving_keeps_bodies_on_disk_and_reads_them_back() {
        use openraft::storage::RaftLogStorage;
        let disk = MemoryDisk::new(std::time::Duration::ZERO);
        let mut sm = QSm::open(QLog::in_memory(&disk)).expect("opens");
        let mut index = 0;
        let mut n = 0;
        let mut enqueue = |index: &mut u64, k: u64| {
            *index += 1;
            let batch: Vec<QMsg> = (0..k)
                .map(|_| {
                    n += 1;
                    body(n)
                })
                .collect();
            (*index, QCommand::Enqueue(batch))
        };
        for _ in 0..10 {
            let (i, cmd) = enqueue(&mut index, 3);
            apply(&mut sm, i, cmd).await;
        }
        {
            let s = sm.inner.lock();
            assert_eq!(s.state.messages.len(), 30);
            assert!(
                s.state.messages.values().all(|m| !m.is_held()),
                "no body held"
            );
            assert_eq!(
                s.lengths(),
                (
                    30,
                    (1..=30).map(|n| format!("message {n}").len() as u64).sum()
                )
            );
        }
        // Every field of the state in use.
        index += 1;
        apply(&mut sm, index, QCommand::Return(vec![id(2, 0)])).await;
        index += 1;
        let out = QCommand::Checkout {
            out: vec![id(3, 1)],
            back: vec![],
        };
        apply(&mut sm, index, out).await;
        index += 1;
        apply(&mut sm, index, QCommand::Horizon(id(4, 0))).await;
        let full = sm.full_state().expect("read").expect("not replacing");
        assert!(!full.returns.is_empty() && !full.out.is_empty() && full.horizon > 0);
        // A snapshot reads them back from the log and writes them all, the
        // same bytes as the whole state encodes to.
        sm.build_snapshot().await.expect("built");
        let snapshot_at = index;
        let (data, state) = stored(&mut sm).await;
        assert_eq!(state.messages.len(), 30);
        assert_eq!(state.messages[&id(1, 0)].message.body, "message 1");
        assert!(state == full, "the state as it was");
        assert!(data == crate::cluster::codec::encode(&full).expect("encodes"));
        // The log behind it purged: bodies from the snapshot now; some
        // settled, more enqueued (in the log).
        let mut log = sm.log.clone();
        log.purge(LogId::new(CommittedLeaderId::new(1, 0), index))
            .await
            .expect("purged");
        index += 1;
        apply(&mut sm, index, QCommand::Settle(vec![id(1, 0), id(2, 1)])).await;
        for _ in 0..2 {
            let (i, cmd) = enqueue(&mut index, 2);
            apply(&mut sm, i, cmd).await;
        }
        let want: Vec<String> = (1..=34)
            .filter(|n| *n != 1 && *n != 5)
            .map(|n| format!("message {n}"))
            .collect();
        let full = sm.full_state().expect("read").expect("not replacing");
        assert_eq!(full.messages.len(), 32);
        assert!(full.messages.values().all(QMsg::is_held));
        // About to serve: read back in the group's order, a batch at a
        // time (the snapshot decoded once), nothing held by the state.
        assert_eq!(read_all(&sm, 5).await, want);
        assert!(bodies(&sm).is_empty(), "nothing held");
        let (i, cmd) = enqueue(&mut index, 1);
        apply(&mut sm, i, cmd).await;
        assert!(bodies(&sm).is_empty(), "nor as it comes");
        // Restarted: the snapshot and the log after it give them back.
        let sm = QSm::open(QLog::in_memory(&disk)).expect("reopens");
        assert!(bodies(&sm).is_empty(), "not held at start");
        let mut sm2 = sm.clone();
        for e in sm2
            .log
            .entries_now(snapshot_at + 1, None)
            .expect("log: after the snapshot")
        {
            sm2.apply([e]).await.expect("re-applied");
        }
        let all = read_all(&sm, 7).await;
        assert_eq!(all.len(), 33);
        assert_eq!(all[..32], want[..]);
        // A second snapshot: bodies from the first one and from the log.
        let full = sm2.full_state().expect("read").expect("not replacing");
        sm2.build_snapshot().await.expect("built");
        let (data, state) = stored(&mut sm2).await;
        assert!(state == full, "the state as it is");
        assert!(data == crate::cluster::codec::encode(&full).expect("encodes"));
    }

    /// A long queue's snapshot goes from the record's own file to a member
    /// that fell behind a chunk at a time (openraft's chunked transfer, as
    /// `network::snapshot_transport` runs it), into a file there, and is
    /// installed from it: the same state, the bodies read back from it.
    #[tokio::test]
    async fn a_long_snapshot_moves_between_members_from_file_to_file() {
        use crate::cluster::values::{ValueLog, OWN_FILE_AT};
        use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
        let root = std::env::temp_dir().join(format!("warren-qsnap-move-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let member = |name: &str| {
            let db = sled::open(root.join(name).join("quorum")).expect("sled");
            let values = ValueLog::open(&root.join(name).join("quorum-values")).expect("values");
            let tree = db.open_tree("q").expect("tree");
            QSm::open(QLog::new(db, tree, values)).expect("opens")
        };
        let mut a = member("a");
        // 64 KiB bodies past a value file of its own.
        let n = (OWN_FILE_AT / (64 << 10)) as u64 + 8;
        let mut index = 0;
        for k in 0..n {
            index += 1;
            apply(
                &mut a,
                index,
                QCommand::Enqueue(vec![msg((64 << 10) + k as usize)]),
            )
            .await;
        }
        a.build_snapshot().await.expect("built");
        let full = a.full_state().expect("read").expect("not replacing");
        let snap = a.get_current_snapshot().await.expect("read").expect("one");
        assert!(
            matches!(*snap.snapshot, SnapshotData::File { .. }),
            "sent from its file"
        );
        let mut sent = snap.snapshot;
        let end = sent.seek(std::io::SeekFrom::End(0)).await.expect("seek");
        assert!(end > OWN_FILE_AT as u64);
        let mut b = member("b");
        let mut received = b.begin_receiving_snapshot().await.expect("begins");
        assert!(
            matches!(*received, SnapshotData::File { .. }),
            "received into a file"
        );
        let mut offset = 0;
        while offset < end {
            sent.seek(std::io::SeekFrom::Start(offset))
                .await
                .expect("seek");
            let mut chunk = Vec::with_capacity(3 << 20);
            while chunk.len() < chunk.capacity() {
                if sent.read_buf(&mut chunk).await.expect("read") == 0 {
                    break;
                }
            }
            received
                .seek(std::io::SeekFrom::Start(offset))
                .await
                .expect("seek");
            received.write_all(&chunk).await.expect("written");
            offset += chunk.len() as u64;
        }
        received.shutdown().await.expect("shut");
        b.install_snapshot(&snap.meta, received)
            .await
            .expect("installed");
        assert!(
            b.inner.lock().state.messages.values().all(|m| !m.is_held()),
            "held nowhere"
        );
        let got = b.full_state().expect("read").expect("not replacing");
        assert!(got == full, "the same state, bodies and all");
        let (data, _) = stored(&mut b).await;
        assert!(data == crate::cluster::codec::encode(&full).expect("encodes"));
        drop((a, b));
        let _ = std::fs::remove_dir_all(&root);
    }

    /// The snapshot kept: its state's bytes, decoded.
    async fn stored(sm: &mut QSm) -> (Vec<u8>, QState) {
        let snap = sm.get_current_snapshot().await.expect("read").expect("one");
        let data = snap.snapshot.bytes().await.expect("read");
        let state = crate::cluster::codec::decode(&data).expect("decodes");
        (data, state)
    }

    /// A snapshot's messages are read from its record in order, wherever
    /// its other fields are, and from a JSON record (written by older
    /// versions) too.
    #[test]
    fn a_snapshots_messages_are_read_from_its_record_a_few_at_a_time() {
        /// The state's fields in another order.
        #[derive(serde::Serialize)]
        struct OthersFirst<'a> {
            horizon: u64,
            out: &'a BTreeSet<u64>,
            returns: &'a BTreeMap<u64, u32>,
            enqueuers: &'a BTreeMap<u64, super::super::command::Enqueuer>,
            messages: &'a BTreeMap<u64, QMsg>,
        }
        let messages: BTreeMap<u64, QMsg> = (1..=5).map(|n| (id(n, 0), body(n))).collect();
        let meta = snapshot_meta(None, StoredMembership::default());
        // Every field set: a field the streamed reading missed would show.
        let state = QState {
            messages: messages.clone(),
            horizon: 7,
            out: [id(2, 0)].into(),
            returns: [(id(3, 0), 2)].into(),
            enqueuers: [(9, super::super::command::Enqueuer { next: 4, at: 5 })].into(),
        };
        let record = |data: Vec<u8>, json: bool| {
            let stored = StoredSnapshot {
                meta: meta.clone(),
                data,
            };
            if json {
                serde_json::to_vec(&stored).expect("json")
            } else {
                crate::cluster::codec::encode(&stored).expect("encodes")
            }
        };
        let first = crate::cluster::codec::encode(&state).expect("encodes");
        let later = crate::cluster::codec::encode(&OthersFirst {
            horizon: state.horizon,
            out: &state.out,
            returns: &state.returns,
            enqueuers: &state.enqueuers,
            messages: &messages,
        })
        .expect("encodes");
        let json = serde_json::to_vec(&state).expect("json");
        for (name, rec, streamed) in [
            ("messages first", record(first, false), true),
            ("messages after another field", record(later, false), true),
            ("JSON", record(json, true), false),
        ] {
            let head = record::head(&mut &rec[..]).expect(name);
            assert_eq!(
                head.map(|(m, _)| m.snapshot_id),
                streamed.then(|| meta.snapshot_id.clone()),
                "{name}"
            );
            // The meta and every field, each body let go of as it is read.
            let (m, got) = record::read(Box::new(Cursor::new(rec.clone()))).expect(name);
            assert_eq!(m, meta, "{name}");
            let mut want = state.clone();
            want.messages.values_mut().for_each(QMsg::strip);
            assert!(got == want, "{name}");
            let mut snap = SnapshotMessages::of(Some(Box::new(Cursor::new(rec)))).expect(name);
            let body_of = |found: &BTreeMap<u64, Arc<Message>>, n: u64| {
                String::from_utf8_lossy(&found[&id(n, 0)].body).into_owned()
            };
            // 1 and 2, then 4 and 5 (3 passed for good), then nothing.
            let mut found = BTreeMap::new();
            snap.take(&[id(1, 0), id(2, 0)].into(), &mut found)
                .expect(name);
            assert_eq!(found.len(), 2, "{name}");
            assert_eq!(body_of(&found, 2), "message 2", "{name}");
            let mut found = BTreeMap::new();
            snap.take(&[id(4, 0), id(5, 0)].into(), &mut found)
                .expect(name);
            assert_eq!(found.len(), 2, "{name}");
            assert_eq!(body_of(&found, 5), "message 5", "{name}");
            let mut found = BTreeMap::new();
            snap.take(&[id(6, 0)].into(), &mut found).expect(name);
            assert!(found.is_empty(), "{name}");
        }
        assert!(SnapshotMessages::of(None).expect("none").left == 0);
    }

    /// Every live message's body, read back `per` ids at a time.
    async fn read_all(sm: &QSm, per: usize) -> Vec<String> {
        let live: Vec<u64> = sm.inner.lock().state.messages.keys().copied().collect();
        let mut reader = sm.read_back().await;
        let mut got = Vec::new();
        for ids in live.chunks(per) {
            let found = reader
                .read(&ids.iter().copied().collect())
                .expect("read back");
            assert_eq!(found.len(), ids.len(), "every one found");
            got.extend(
                found
                    .values()
                    .map(|m| String::from_utf8_lossy(&m.body).into_owned()),
            );
        }
        got
    }

    #[test]
    fn the_rule_pays_each_snapshot_with_as_many_bytes_changed() {
        assert!(
            !snapshot_due(SNAPSHOT_EVERY - 1, 10, 0),
            "a few entries: not yet"
        );
        assert!(
            snapshot_due(SNAPSHOT_EVERY, 0, 0),
            "small state: every few thousand entries"
        );
        assert!(!snapshot_due(SNAPSHOT_EVERY * 100, 999, 1000));
        assert!(snapshot_due(SNAPSHOT_EVERY, 1000, 1000));
    }

    #[tokio::test]
    async fn a_long_queue_snapshots_once_what_changed_reaches_what_the_last_one_held() {
        let disk = MemoryDisk::new(std::time::Duration::ZERO);
        let mut sm = QSm::open(QLog::in_memory(&disk)).expect("opens");
        let mut index = 0;
        for _ in 0..SNAPSHOT_EVERY {
            index += 1;
            apply(&mut sm, index, QCommand::Enqueue(vec![msg(1000)])).await;
        }
        assert!(
            sm.snapshot_wanted(),
            "the first one after the first entries"
        );
        assert!(!sm.snapshot_wanted(), "asked for once");
        sm.build_snapshot().await.expect("built");
        let held = SNAPSHOT_EVERY * 1064;
        // Entries that change no message: never due, however many.
        for _ in 0..SNAPSHOT_EVERY {
            index += 1;
            apply(&mut sm, index, QCommand::Settle(vec![u64::MAX])).await;
        }
        assert!(!sm.snapshot_wanted());
        // Half of it settled (each id once, however often listed), as many
        // bytes enqueued: due.
        let ids: Vec<u64> = sm.inner.lock().state.messages.keys().copied().collect();
        let half: Vec<u64> = ids[..ids.len() / 2].to_vec();
        index += 1;
        apply(
            &mut sm,
            index,
            QCommand::Settle([half.clone(), half].concat()),
        )
        .await;
        assert_eq!(sm.inner.lock().changed, held / 2);
        assert!(!sm.snapshot_wanted());
        index += 1;
        let batch = (0..SNAPSHOT_EVERY / 2 - 1).map(|_| msg(1000)).collect();
        apply(&mut sm, index, QCommand::Enqueue(batch)).await;
        assert!(!sm.snapshot_wanted(), "{} short", 1064);
        index += 1;
        apply(&mut sm, index, QCommand::Enqueue(vec![msg(1000)])).await;
        assert!(sm.snapshot_wanted());
        assert_eq!(sm.inner.lock().live, held);
        // Reopened from the snapshot: counted from it.
        sm.build_snapshot().await.expect("built");
        let sm = QSm::open(QLog::in_memory(&disk)).expect("reopens");
        let s = sm.inner.lock();
        assert_eq!(
            (s.live, s.held, s.changed, s.snapshot_at),
            (held, held, 0, index)
        );
    }

    #[tokio::test]
    async fn a_large_snapshot_is_written_to_a_file_of_its_own_and_read_back() {
        let dir = std::env::temp_dir().join(format!("warren-qsnap-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let values_dir = dir.join("values");
        let open = || {
            let db = sled::open(dir.join("db")).expect("sled");
            let tree = db.open_tree("g").expect("tree");
            let values = crate::cluster::values::ValueLog::open(&values_dir).expect("values");
            QSm::open(QLog::new(db, tree, values)).expect("opens")
        };
        let mut sm = open();
        // 16 MiB of messages: built on a blocking thread, kept in a file
        // of its own.
        for index in 1..=SNAPSHOT_EVERY {
            apply(&mut sm, index, QCommand::Enqueue(vec![msg(4096)])).await;
        }
        assert!(sm.snapshot_wanted());
        sm.build_snapshot().await.expect("built");
        let (data, state) = stored(&mut sm).await;
        assert!(data.len() >= crate::cluster::values::OWN_FILE_AT);
        assert_eq!(state.messages.len() as u64, SNAPSHOT_EVERY);
        let files = || {
            let mut sizes: Vec<u64> = std::fs::read_dir(&values_dir)
                .expect("dir")
                .map(|e| e.expect("entry").metadata().expect("meta").len())
                .collect();
            sizes.sort_unstable();
            sizes
        };
        let sizes = files();
        assert!(
            sizes.last().copied().unwrap_or(0) >= crate::cluster::values::OWN_FILE_AT as u64,
            "{sizes:?}"
        );
        let state = sm.inner.lock().state.clone();
        drop(sm);
        let sm = open();
        let s = sm.inner.lock();
        assert_eq!(s.state, state);
        assert_eq!(s.state.messages.len() as u64, SNAPSHOT_EVERY);
        assert_eq!(s.snapshot_at, SNAPSHOT_EVERY);
        drop(s);
        drop(sm);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
