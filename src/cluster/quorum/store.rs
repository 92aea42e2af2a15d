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

use super::command::{id, Outcome, QCommand, QMsg, QState, Taken};
use super::QTypeConfig;
use crate::broker::message::Message;
use crate::broker::queue::{Enqueued, Queue};
use crate::cluster::store::{io_err, snapshot_meta, LogStore, StoredSnapshot, SNAPSHOT};
use crate::cluster::NodeInfo;
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    Entry, EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership,
};
use parking_lot::Mutex;
use serde::{Serialize, Serializer};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
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

    /// Let go of every body (they are on disk, see the module doc).
    fn strip(&mut self) {
        self.state.messages.values_mut().for_each(QMsg::strip);
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
/// asked for ([`SnapshotMessages::take`]) from its record, which is held
/// as read: a long queue's snapshot is not decoded into memory whole.
pub struct SnapshotMessages {
    record: Vec<u8>,
    /// Where the next message (its id, then it) starts in `record`, and
    /// how many are left after it.
    pos: usize,
    left: usize,
    /// One decoded and not asked for yet (past what the last call wanted).
    next: Option<(u64, QMsg)>,
    /// A record of another layout (JSON): decoded whole instead.
    whole: BTreeMap<u64, Arc<Message>>,
}

impl SnapshotMessages {
    /// The snapshot kept by `log` (none: no messages).
    fn open(log: &QLog) -> Result<SnapshotMessages, String> {
        Self::of(log.get_raw(SNAPSHOT)?.unwrap_or_default())
    }

    /// The messages of a snapshot `record` (empty: none).
    fn of(record: Vec<u8>) -> Result<SnapshotMessages, String> {
        let mut snap = SnapshotMessages {
            record: Vec::new(),
            pos: 0,
            left: 0,
            next: None,
            whole: BTreeMap::new(),
        };
        if record.is_empty() {
            return Ok(snap);
        }
        match messages_at(&record) {
            Some((pos, left)) => {
                (snap.record, snap.pos, snap.left) = (record, pos, left);
            }
            None => {
                let stored: StoredSnapshot =
                    crate::cluster::codec::decode(&record).map_err(|e| e.to_string())?;
                let state: QState =
                    crate::cluster::codec::decode(&stored.data).map_err(|e| e.to_string())?;
                snap.whole = state
                    .messages
                    .into_iter()
                    .filter(|(_, m)| m.is_held())
                    .map(|(id, m)| (id, m.message))
                    .collect();
            }
        }
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
            let (id, m) = match self.next.take() {
                Some(next) => next,
                None if self.left == 0 => return Ok(()),
                None => self.decode_next()?,
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

    /// Decode the message at `pos` and move past it.
    fn decode_next(&mut self) -> Result<(u64, QMsg), String> {
        use serde::Deserialize;
        let rest = self.record.get(self.pos..).unwrap_or_default();
        let mut cursor = std::io::Cursor::new(rest);
        let (id, m) = {
            let mut de = rmp_serde::Deserializer::new(&mut cursor);
            let id = u64::deserialize(&mut de).map_err(|e| e.to_string())?;
            let m = QMsg::deserialize(&mut de).map_err(|e| e.to_string())?;
            (id, m)
        };
        self.pos += cursor.position() as usize;
        self.left -= 1;
        Ok((id, m))
    }
}

/// Where the messages of a snapshot record (a [`StoredSnapshot`] of a
/// [`QState`], both MessagePack by field name) start, and how many there
/// are; None for another layout.
fn messages_at(record: &[u8]) -> Option<(usize, usize)> {
    use crate::cluster::codec::MARKER;
    // The state's bytes, borrowed from the record.
    #[derive(serde::Deserialize)]
    struct Data<'a> {
        #[serde(borrow, with = "serde_bytes")]
        data: &'a [u8],
    }
    let (&MARKER, rest) = record.split_first()? else {
        return None;
    };
    let data = rmp_serde::from_slice::<Data<'_>>(rest).ok()?.data;
    let start = (data.as_ptr() as usize).checked_sub(record.as_ptr() as usize)?;
    let (&MARKER, _) = data.split_first()? else {
        return None;
    };
    let mut pos = start + 1;
    for _ in 0..msgpack::map_len(record, &mut pos)? {
        let key = msgpack::str_at(record, &mut pos)?;
        if key == b"messages" {
            let n = msgpack::map_len(record, &mut pos)?;
            return Some((pos, n));
        }
        // Another field first: skipped.
        let mut cursor = std::io::Cursor::new(record.get(pos..)?);
        {
            use serde::Deserialize;
            let mut de = rmp_serde::Deserializer::new(&mut cursor);
            serde::de::IgnoredAny::deserialize(&mut de).ok()?;
        }
        pos += cursor.position() as usize;
    }
    // No messages.
    Some((pos, 0))
}

/// The few MessagePack heads [`messages_at`] reads.
mod msgpack {
    fn take<'a>(b: &'a [u8], pos: &mut usize, n: usize) -> Option<&'a [u8]> {
        let s = b.get(*pos..pos.checked_add(n)?)?;
        *pos += n;
        Some(s)
    }

    fn uint(b: &[u8], pos: &mut usize, n: usize) -> Option<usize> {
        let s = take(b, pos, n)?;
        Some(s.iter().fold(0usize, |v, d| (v << 8) | usize::from(*d)))
    }

    /// A map's length.
    pub fn map_len(b: &[u8], pos: &mut usize) -> Option<usize> {
        let m = *take(b, pos, 1)?.first()?;
        match m {
            0x80..=0x8f => Some(usize::from(m & 0x0f)),
            0xde => uint(b, pos, 2),
            0xdf => uint(b, pos, 4),
            _ => None,
        }
    }

    /// A string's bytes.
    pub fn str_at<'a>(b: &'a [u8], pos: &mut usize) -> Option<&'a [u8]> {
        let m = *take(b, pos, 1)?.first()?;
        let n = match m {
            0xa0..=0xbf => usize::from(m & 0x1f),
            0xd9 => uint(b, pos, 1)?,
            0xda => uint(b, pos, 2)?,
            0xdb => uint(b, pos, 4)?,
            _ => return None,
        };
        take(b, pos, n)
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
        if let Some(snap) = log.get::<StoredSnapshot>(SNAPSHOT)? {
            inner.state = crate::cluster::codec::decode(&snap.data).map_err(|e| e.to_string())?;
            inner.last_applied = snap.meta.last_log_id;
            inner.membership = snap.meta.last_membership;
        }
        inner.loaded();
        inner.strip();
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
                log.put_snapshot_encoded(&meta, |head| {
                    let state = WithBodies {
                        state: &state,
                        log: &log,
                    };
                    crate::cluster::codec::encode_after(head, &state).map_err(|e| e.to_string())
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
            snapshot: Box::new(Cursor::new(Vec::new())),
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

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, SErr> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    // The closure sent to a blocking thread returns openraft's own error.
    #[allow(clippy::result_large_err)]
    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, NodeInfo>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), SErr> {
        let data = snapshot.into_inner();
        let large = data.len() as u64 >= BLOCKING_AT;
        let reads = self.reads.lock().await;
        let keep = {
            let (log, meta) = (self.log.clone(), meta.clone());
            move || {
                let state = crate::cluster::codec::decode::<QState>(&data).map_err(|e| {
                    StorageIOError::read_snapshot(Some(meta.signature()), io_err(e))
                })?;
                log.put_snapshot_now(&meta, &data)?;
                Ok(state)
            }
        };
        let state = off_runtime_if(large, keep).await?;
        {
            let mut s = self.inner.lock();
            s.state = state;
            s.last_applied = meta.last_log_id;
            s.membership = meta.last_membership.clone();
            s.loaded();
            s.strip();
            self.note_freed(s.live);
        }
        drop(reads);
        self.flush_snapshot(meta).await
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<QTypeConfig>>, SErr> {
        self.log.current_snapshot().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::disk::MemoryDisk;
    use openraft::CommittedLeaderId;

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

    /// The snapshot kept: its state's bytes, decoded.
    async fn stored(sm: &mut QSm) -> (Vec<u8>, QState) {
        let snap = sm.get_current_snapshot().await.expect("read").expect("one");
        let data = snap.snapshot.into_inner();
        let state = crate::cluster::codec::decode(&data).expect("decodes");
        (data, state)
    }

    /// A snapshot's messages are read from its record in order, wherever
    /// its other fields are, and from a JSON record (written by older
    /// versions) too.
    #[test]
    fn a_snapshots_messages_are_read_from_its_record_a_few_at_a_time() {
        #[derive(serde::Serialize)]
        struct HorizonFirst<'a> {
            horizon: u64,
            messages: &'a BTreeMap<u64, QMsg>,
        }
        let messages: BTreeMap<u64, QMsg> = (1..=5).map(|n| (id(n, 0), body(n))).collect();
        let meta = snapshot_meta(None, StoredMembership::default());
        let state = QState {
            messages: messages.clone(),
            horizon: 7,
            ..QState::default()
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
        let later = crate::cluster::codec::encode(&HorizonFirst {
            horizon: 7,
            messages: &messages,
        })
        .expect("encodes");
        let json = serde_json::to_vec(&state).expect("json");
        for (name, rec, streamed) in [
            ("messages first", record(first, false), true),
            ("messages after another field", record(later, false), true),
            ("JSON", record(json, true), false),
        ] {
            assert_eq!(messages_at(&rec).is_some(), streamed, "{name}");
            let mut snap = SnapshotMessages::of(rec).expect(name);
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
        assert!(SnapshotMessages::of(Vec::new()).expect("none").left == 0);
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
