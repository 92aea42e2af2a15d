//! Reading the segment store: a level's messages from a position on (paging
//! in, with read-ahead), and the per-level summaries recovery starts from.
//!
//! Reads see inserts still buffered or being applied: a queue may page in a
//! message whose group has not been flushed yet. A buffered `DropFrom` or
//! `DeleteQueue` hides buffered inserts at once but what is already in the
//! tree only once applied: a queue never reads what it dropped (its tail moves
//! past it first).

use std::collections::BTreeMap;

use bytes::Bytes;

use super::segment::{self, Meta, KIND_META};
use super::sled::{MessageOp, QueueRef, Shared, Store, Submitted};
use super::{codec, StorageError, StoredMessage};

/// A message read back from the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadMessage {
    pub pos: u64,
    /// As given to its `Insert`.
    pub size: u32,
    pub durable: bool,
    /// `redelivered` is set if it was handed to a consumer before.
    pub message: StoredMessage,
    /// Times it came back to its queue after reaching a client
    /// ([`MessageOp::SetReturns`](super::MessageOp::SetReturns)).
    pub returns: u32,
}

/// What recovery finds of one level of a queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LevelSummary {
    pub level: u8,
    /// Where to start reading.
    pub first: u64,
    /// One past the last position used: where the queue goes on.
    pub next: u64,
    /// Live messages.
    pub count: u64,
    /// Their accounted sizes.
    pub bytes: u64,
}

impl Store {
    /// Up to `max_count` live messages of `level` at position `from` or
    /// later, in position order, stopping once `max_bytes` of records are
    /// read (at least one message is returned if there is one).
    pub fn read(
        &self,
        queue: &QueueRef,
        level: u8,
        from: u64,
        max_count: usize,
        max_bytes: usize,
    ) -> Result<Vec<ReadMessage>, StorageError> {
        let sh = self.shared();
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut next = from;
        read_applied(
            sh, queue, level, &mut next, max_count, max_bytes, &mut bytes, &mut out,
        )?;
        if out.len() >= max_count || bytes >= max_bytes {
            return Ok(out);
        }
        // Not enough applied: take what is buffered or being applied, then
        // read the tree again (a group may have been applied meanwhile; it is
        // in the tree now, or in what was taken).
        let buffered = buffered_inserts(sh, queue, level, next);
        read_applied(
            sh, queue, level, &mut next, max_count, max_bytes, &mut bytes, &mut out,
        )?;
        for (pos, size, durable, record) in buffered {
            if pos < next {
                continue;
            }
            if out.len() >= max_count || bytes >= max_bytes {
                break;
            }
            bytes += record.len();
            next = pos + 1;
            let message = codec::decode_message(record).map_err(|e| {
                sh.corrupt(format!("buffered message {pos} of {:?}: {e}", queue.key()))
            })?;
            // Not flushed yet: a return count of it would be pending too, but
            // a returned message stays in its queue's memory until a restart.
            out.push(ReadMessage {
                pos,
                size,
                durable,
                message,
                returns: 0,
            });
        }
        Ok(out)
    }

    /// The live messages of every level of durable queue `queue`, summarized
    /// from chunk metas (no message is read). Chunks with nothing live any
    /// more were deleted when the store was opened.
    pub fn recover_queue(&self, queue: &QueueRef) -> Result<Vec<LevelSummary>, StorageError> {
        let sh = self.shared();
        let tree = sh.tree(queue.is_durable());
        let mut levels: BTreeMap<u8, LevelSummary> = BTreeMap::new();
        let metas = (0..=u8::MAX).flat_map(|level| {
            tree.scan_prefix(segment::level_prefix(
                &queue.inner().prefix,
                level,
                KIND_META,
            ))
        });
        for item in metas {
            let (k, v) = item?;
            let key =
                segment::decode_key(&k).map_err(|e| sh.corrupt(format!("segment key: {e}")))?;
            if key.kind != KIND_META {
                continue;
            }
            let meta = Meta::decode(key.first, &v)
                .map_err(|e| sh.corrupt(format!("chunk meta of {:?}: {e}", queue.key())))?;
            let live = meta.live(sh.epoch);
            if live == 0 {
                continue;
            }
            let l = levels.entry(key.level).or_insert(LevelSummary {
                level: key.level,
                first: meta.first,
                next: meta.end,
                count: 0,
                bytes: 0,
            });
            l.first = l.first.min(meta.first);
            l.next = l.next.max(meta.end);
            l.count += u64::from(live);
            l.bytes += meta.durable_bytes;
        }
        Ok(levels.into_values().collect())
    }

    /// Keys of durable queues with anything stored, in key order.
    pub fn queue_keys_with_messages(&self) -> Result<Vec<String>, StorageError> {
        self.shared().queue_keys()
    }
}

impl Shared {
    /// Distinct queue keys in the durable tree, skipping from one queue's
    /// prefix to the next (cost proportional to the number of queues).
    pub(super) fn queue_keys(&self) -> Result<Vec<String>, StorageError> {
        let mut out = Vec::new();
        let mut from: Vec<u8> = Vec::new();
        while let Some(item) = self.segments.range(from.as_slice()..).next() {
            let (k, _) = item?;
            let key =
                segment::decode_key(&k).map_err(|e| self.corrupt(format!("segment key: {e}")))?;
            out.push(key.queue.to_owned());
            match codec::prefix_successor(&segment::queue_prefix(key.queue)) {
                Some(next) => from = next,
                None => break,
            }
        }
        Ok(out)
    }
}

/// Reads applied chunks of `level` from `*next` on into `out`.
#[allow(clippy::too_many_arguments)]
fn read_applied(
    sh: &Shared,
    queue: &QueueRef,
    level: u8,
    next: &mut u64,
    max_count: usize,
    max_bytes: usize,
    bytes: &mut usize,
    out: &mut Vec<ReadMessage>,
) -> Result<(), StorageError> {
    let tree = sh.tree(queue.is_durable());
    let prefix = &queue.inner().prefix;
    let lo = segment::level_prefix(prefix, level, KIND_META);
    let at = segment::key(prefix, level, KIND_META, *next);
    // The chunk holding `next` starts at or before it; later ones after it.
    let start = match tree.range(lo.clone()..=at.clone()).next_back() {
        Some(item) => item?.0.to_vec(),
        None => at,
    };
    let hi = segment::key(prefix, level, KIND_META, u64::MAX);
    for item in tree.range(start..=hi) {
        if out.len() >= max_count || *bytes >= max_bytes {
            break;
        }
        let (k, v) = item?;
        let first = segment::key_first(&k).unwrap_or(0);
        let decode = |v: &[u8]| {
            Meta::decode(first, v)
                .map_err(|e| sh.corrupt(format!("chunk meta of {:?}: {e}", queue.key())))
        };
        let mut meta = decode(&v)?;
        if meta.end <= *next {
            continue;
        }
        // The flusher may delete the chunk, or move it (compaction,
        // copy-forward) and unlink its old file, after the meta was read: a
        // missing file sends us back to the meta.
        let files = sh.files(queue.is_durable());
        let raw = loop {
            let Some(loc) = meta.loc else {
                break None;
            };
            if let Some(raw) = files.read(loc)? {
                break Some(raw);
            }
            match tree.get(&k)? {
                None => break None, // deleted: everything in it was settled
                Some(v) => {
                    let again = decode(&v)?;
                    if again.loc == meta.loc {
                        return Err(sh.corrupt(format!(
                            "chunk of {:?} at {first}: data file {} is missing",
                            queue.key(),
                            files.path_of(loc.file).display()
                        )));
                    }
                    meta = again;
                }
            }
        };
        let Some(raw) = raw else {
            continue;
        };
        let raw = Bytes::from(raw);
        let entries = segment::decode_chunk(&raw)
            .map_err(|e| sh.corrupt(format!("chunk of {:?} at {first}: {e}", queue.key())))?;
        let old_epoch = meta.epoch != sh.epoch;
        for e in entries {
            if e.pos < *next || meta.is_settled(e.pos) || (e.transient && old_epoch) {
                continue;
            }
            if out.len() >= max_count || *bytes >= max_bytes {
                break;
            }
            *bytes += e.record.len();
            *next = e.pos + 1;
            let mut message =
                codec::decode_message(raw.slice(e.record.clone())).map_err(|err| {
                    sh.corrupt(format!(
                        "message {} of {:?} level {level}: {err}",
                        e.pos,
                        queue.key()
                    ))
                })?;
            message.redelivered |= meta.is_delivered(e.pos);
            out.push(ReadMessage {
                pos: e.pos,
                size: e.size,
                durable: !e.transient,
                message,
                returns: meta.returns(e.pos),
            });
        }
    }
    Ok(())
}

/// Inserts of `level` at `from` or later that are buffered or being applied,
/// in position order, minus those a later drop in the same lists cancels.
fn buffered_inserts(
    sh: &Shared,
    queue: &QueueRef,
    level: u8,
    from: u64,
) -> Vec<(u64, u32, bool, Bytes)> {
    let mut found: BTreeMap<u64, (u32, bool, Bytes)> = BTreeMap::new();
    let mut scan = |subs: &[Submitted]| {
        for sub in subs.iter().filter(|s| s.queue.same(queue)) {
            for op in &sub.ops {
                match op {
                    MessageOp::Insert {
                        level: l,
                        pos,
                        size,
                        durable,
                        record,
                    } if *l == level && *pos >= from => {
                        found.insert(*pos, (*size, *durable, record.0.clone()));
                    }
                    MessageOp::DropFrom { level: l, from: f } if *l == level => {
                        found.retain(|p, _| p < f);
                    }
                    MessageOp::DeleteQueue => found.clear(),
                    _ => {}
                }
            }
        }
    };
    let p = sh.pending.lock();
    let inflight = sh.inflight.lock().clone();
    // The group being applied is older than what is pending.
    if let Some(group) = inflight {
        scan(&group);
    }
    scan(&p.ops);
    drop(p);
    found
        .into_iter()
        .map(|(pos, (size, durable, record))| (pos, size, durable, record))
        .collect()
}
