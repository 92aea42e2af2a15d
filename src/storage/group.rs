//! One group flush: folds the operations taken from the pending list, in call
//! order, into the chunks and metas to write, writes the chunks to the data
//! files (one write per group per space, synced for the durable space) and
//! then applies the metas as one atomic write per tree (`super::apply_changes`).
//!
//! * Each level's inserts become a new chunk (split at the chunk limits) with
//!   a fresh meta. A message settled in the same group it was inserted in is
//!   left out (never written).
//! * A settlement or delivery flips a bit in the meta of the chunk holding the
//!   position (found by a range lookup on meta keys; loaded metas are cached
//!   for the group, so a burst of acks in one chunk reads it once).
//! * At the end, every changed meta is written, or, if nothing in its chunk
//!   is live any more, the chunk and its meta are deleted (space reclaimed);
//!   a chunk whose live entries are a quarter or less of what it holds is
//!   rewritten with only those (compaction), in the same batch as its meta.
//! * Every chunk written in the group (new, compacted, or copied forward out
//!   of a mostly dead data file: a bounded slice of a copy-forward pass per
//!   group) is appended to the active data file in one write; the metas then
//!   point at it. The bytes a deleted or rewritten chunk leaves behind are
//!   freed (counted dead) once the batch is applied; files with nothing live
//!   are unlinked by the flusher after the sled flush (files.rs).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;

use ::sled::Tree;
use bytes::Bytes;

use super::files::{DataFiles, GcPass};
use super::segment::{self, ChunkEntry, Loc, Meta, KIND_META};
use super::sled::{MessageOp, Shared, Submitted};
use super::StorageError;

/// Compaction: a chunk of at least this many entries...
const COMPACT_MIN_ENTRIES: u32 = 32;
/// ... whose live entries are at most 1/COMPACT_RATIO of them is rewritten.
const COMPACT_RATIO: u32 = 4;
/// Copy-forward work per group and space: metas looked at ...
const GC_MAX_METAS: usize = 512;
/// ... and chunk bytes copied (a pass over a large store spreads over groups).
const GC_MAX_BYTES: usize = 4 << 20;

/// A new chunk being gathered from a group's inserts.
#[derive(Default)]
struct Builder {
    entries: Vec<Built>,
    bytes: usize,
    /// Return counts set in the same group as the insert: position -> count.
    returns: BTreeMap<u64, u32>,
}

struct Built {
    entry: ChunkEntry<Bytes>,
    delivered: bool,
    /// Settled in the same group: left out of the chunk (a tombstone, so a
    /// burst of acks in insert order costs no shifting).
    settled: bool,
}

impl Builder {
    fn find(&mut self, pos: u64) -> Option<&mut Built> {
        let i = self
            .entries
            .binary_search_by_key(&pos, |b| b.entry.pos)
            .ok()?;
        self.entries.get_mut(i).filter(|b| !b.settled)
    }
}

/// The write set of one tree.
#[derive(Default)]
struct TreeWork {
    /// The durable tree and space, or the ephemeral ones.
    durable: bool,
    /// Key -> new value (None: delete).
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Meta key -> the chunk's bytes to write in this group (None: deleted).
    chunks: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Locations of chunks deleted or rewritten in this group: dead once the
    /// batch is applied.
    freed: Vec<Loc>,
    /// Meta key -> meta as this group sees it (None: deleted in this group).
    metas: BTreeMap<Vec<u8>, Option<Meta>>,
    dirty: BTreeSet<Vec<u8>>,
    /// Queue prefix -> level -> the chunk being built.
    builders: BTreeMap<Vec<u8>, BTreeMap<u8, Builder>>,
}

pub(super) fn apply(sh: &Shared, group: &[Submitted]) -> Result<(), StorageError> {
    let mut work = [
        TreeWork::default(),
        TreeWork {
            durable: true,
            ..TreeWork::default()
        },
    ];
    let mut inserts = 0u64;
    for sub in group {
        let q = sub.queue.inner();
        let durable = q.durable;
        let tree = sh.tree(durable);
        let w = &mut work[usize::from(durable)];
        for op in &sub.ops {
            match op {
                MessageOp::Insert {
                    level,
                    pos,
                    size,
                    durable: d,
                    record,
                } => {
                    inserts += 1;
                    if !w.builders.contains_key(q.prefix.as_slice()) {
                        w.builders.insert(q.prefix.clone(), BTreeMap::new());
                    }
                    let b = w
                        .builders
                        .get_mut(q.prefix.as_slice())
                        .map(|levels| levels.entry(*level).or_default())
                        .ok_or_else(|| sh.corrupt("builder vanished"))?;
                    b.bytes += record.len();
                    b.entries.push(Built {
                        entry: ChunkEntry {
                            pos: *pos,
                            transient: !*d,
                            size: *size,
                            record: record.0.clone(),
                        },
                        delivered: false,
                        settled: false,
                    });
                    if b.entries.len() >= segment::CHUNK_MAX_ENTRIES
                        || b.bytes >= segment::CHUNK_MAX_BYTES
                    {
                        w.seal(sh, &q.prefix, *level);
                    }
                }
                MessageOp::Settle {
                    level,
                    pos,
                    size,
                    durable: d,
                } => {
                    if let Some(b) = w.builder(&q.prefix, *level).and_then(|b| b.find(*pos)) {
                        b.settled = true;
                        continue;
                    }
                    if let Some(key) = w.find_meta(sh, tree, &q.prefix, *level, *pos)? {
                        if let Some(Some(m)) = w.metas.get_mut(&key) {
                            if m.settle(*pos) {
                                if *d {
                                    m.live_durable = m.live_durable.saturating_sub(1);
                                    m.durable_bytes =
                                        m.durable_bytes.saturating_sub(u64::from(*size));
                                } else {
                                    m.live_transient = m.live_transient.saturating_sub(1);
                                }
                                w.dirty.insert(key);
                            }
                        }
                    }
                }
                MessageOp::MarkDelivered { level, pos } => {
                    if let Some(b) = w.builder(&q.prefix, *level).and_then(|b| b.find(*pos)) {
                        b.delivered = true;
                        continue;
                    }
                    if let Some(key) = w.find_meta(sh, tree, &q.prefix, *level, *pos)? {
                        if let Some(Some(m)) = w.metas.get_mut(&key) {
                            if !m.is_delivered(*pos) {
                                m.deliver(*pos);
                                w.dirty.insert(key);
                            }
                        }
                    }
                }
                MessageOp::SetReturns { level, pos, count } => {
                    if let Some(b) = w.builder(&q.prefix, *level) {
                        if b.find(*pos).is_some() {
                            b.returns.insert(*pos, *count);
                            continue;
                        }
                    }
                    if let Some(key) = w.find_meta(sh, tree, &q.prefix, *level, *pos)? {
                        if let Some(Some(m)) = w.metas.get_mut(&key) {
                            if m.set_returns(*pos, *count) {
                                w.dirty.insert(key);
                            }
                        }
                    }
                }
                MessageOp::DropFrom { level, from } => {
                    w.drop_from(sh, tree, &q.prefix, *level, *from)?;
                }
                MessageOp::DeleteQueue => w.delete_queue(sh, tree, &q.prefix)?,
            }
        }
    }
    for (durable, mut w) in work.into_iter().enumerate() {
        let keys: Vec<(Vec<u8>, u8)> = w
            .builders
            .iter()
            .flat_map(|(p, levels)| levels.keys().map(move |l| (p.clone(), *l)))
            .collect();
        for (prefix, level) in keys {
            w.seal(sh, &prefix, level);
        }
        let tree = sh.tree(durable == 1);
        let files = sh.files(durable == 1);
        w.finish(sh)?;
        w.copy_forward(sh, tree, files)?;
        w.write_chunks(files)?;
        // One meta (a publish-only group's new chunk: a publisher waiting
        // for each confirm makes one per flush) goes in without a batch.
        super::apply_changes(tree, w.writes, false)?;
        for loc in w.freed {
            files.free(loc);
        }
    }
    sh.messages_written.fetch_add(inserts, Ordering::Relaxed);
    Ok(())
}

impl TreeWork {
    fn builder(&mut self, prefix: &[u8], level: u8) -> Option<&mut Builder> {
        self.builders.get_mut(prefix)?.get_mut(&level)
    }

    /// Writes the builder of (`prefix`, `level`) as a chunk and its meta.
    fn seal(&mut self, sh: &Shared, prefix: &[u8], level: u8) {
        let Some(b) = self.builders.get_mut(prefix).and_then(|l| l.remove(&level)) else {
            return;
        };
        let live: Vec<Built> = b.entries.into_iter().filter(|b| !b.settled).collect();
        let (Some(first), Some(last)) = (live.first(), live.last()) else {
            return;
        };
        let (first, end) = (first.entry.pos, last.entry.pos + 1);
        let mut meta = Meta::new(first, end, sh.epoch);
        meta.entries = live.len() as u32;
        for b in &live {
            if b.entry.transient {
                meta.live_transient += 1;
            } else {
                meta.live_durable += 1;
                meta.durable_bytes += u64::from(b.entry.size);
            }
            if b.delivered {
                meta.deliver(b.entry.pos);
            }
        }
        for (pos, count) in &b.returns {
            meta.set_returns(*pos, *count);
        }
        let entries: Vec<ChunkEntry<Bytes>> = live.into_iter().map(|b| b.entry).collect();
        let key = segment::key(prefix, level, KIND_META, first);
        self.chunks
            .insert(key.clone(), Some(segment::encode_chunk(&entries)));
        self.metas.insert(key.clone(), Some(meta));
        self.dirty.insert(key);
    }

    /// The meta key of the chunk holding `pos` of `level`, loaded into
    /// `self.metas`; `None` if no chunk holds it.
    fn find_meta(
        &mut self,
        sh: &Shared,
        tree: &Tree,
        prefix: &[u8],
        level: u8,
        pos: u64,
    ) -> Result<Option<Vec<u8>>, StorageError> {
        let lo = segment::level_prefix(prefix, level, KIND_META);
        let hi = segment::key(prefix, level, KIND_META, pos);
        let cached = self
            .metas
            .range(lo.clone()..=hi.clone())
            .next_back()
            .map(|(k, m)| (k.clone(), m.as_ref().is_some_and(|m| m.contains(pos))));
        // Chunks never overlap: a cached chunk holding `pos` is the one (the
        // common case: a burst of acks in one chunk costs one tree lookup).
        let cached = match cached {
            Some((k, true)) => return Ok(Some(k)),
            Some((k, false)) => Some(k),
            None => None,
        };
        let stored = match tree.range(lo..=hi).next_back() {
            Some(item) => Some(item?.0.to_vec()),
            None => None,
        };
        let key = match (cached, stored) {
            (Some(c), Some(s)) => c.max(s),
            (Some(c), None) => c,
            (None, Some(s)) => s,
            (None, None) => return Ok(None),
        };
        if !self.metas.contains_key(&key) {
            let meta = self.load_meta(sh, tree, &key)?;
            self.metas.insert(key.clone(), meta);
        }
        Ok(match self.metas.get(&key) {
            Some(Some(m)) if m.contains(pos) => Some(key),
            _ => None,
        })
    }

    fn load_meta(
        &self,
        sh: &Shared,
        tree: &Tree,
        key: &[u8],
    ) -> Result<Option<Meta>, StorageError> {
        let Some(raw) = tree.get(key)? else {
            return Ok(None);
        };
        let first = segment::key_first(key).unwrap_or(0);
        Meta::decode(first, &raw)
            .map(Some)
            .map_err(|e| sh.corrupt(format!("chunk meta {key:02x?}: {e}")))
    }

    /// The chunk record of `meta_key` as this group sees it (its meta loaded).
    fn chunk(
        &self,
        sh: &Shared,
        files: &DataFiles,
        meta_key: &[u8],
    ) -> Result<Option<Vec<u8>>, StorageError> {
        if let Some(v) = self.chunks.get(meta_key) {
            return Ok(v.clone());
        }
        let Some(Some(loc)) = self
            .metas
            .get(meta_key)
            .map(|m| m.as_ref().and_then(|m| m.loc))
        else {
            return Ok(None);
        };
        // Only this thread unlinks files, and not while a meta points at them.
        match files.read(loc)? {
            Some(raw) => Ok(Some(raw)),
            None => Err(sh.corrupt(format!(
                "chunk {meta_key:02x?}: data file {} is missing",
                files.path_of(loc.file).display()
            ))),
        }
    }

    /// Deletes the chunk of `meta_key` and its meta (loaded, or new in this group).
    fn delete_chunk(&mut self, meta_key: &[u8]) {
        if let Some(Some(Meta { loc: Some(loc), .. })) = self.metas.get(meta_key) {
            self.freed.push(*loc);
        }
        self.chunks.insert(meta_key.to_vec(), None);
        self.writes.insert(meta_key.to_vec(), None);
        self.metas.insert(meta_key.to_vec(), None);
        self.dirty.remove(meta_key);
    }

    /// Settles every position of `level` from `from` on.
    fn drop_from(
        &mut self,
        sh: &Shared,
        tree: &Tree,
        prefix: &[u8],
        level: u8,
        from: u64,
    ) -> Result<(), StorageError> {
        if let Some(b) = self.builder(prefix, level) {
            b.entries.retain(|b| b.entry.pos < from);
        }
        // The chunk holding `from` may also hold earlier positions: settle its
        // entries from `from` on one by one.
        if let Some(key) = self.find_meta(sh, tree, prefix, level, from)? {
            let starts_before = matches!(self.metas.get(&key), Some(Some(m)) if m.first < from);
            if starts_before {
                let raw = self
                    .chunk(sh, sh.files(self.durable), &key)?
                    .unwrap_or_default();
                let entries = segment::decode_chunk(&raw)
                    .map_err(|e| sh.corrupt(format!("chunk {key:02x?}: {e}")))?;
                if let Some(Some(m)) = self.metas.get_mut(&key) {
                    for e in entries.iter().filter(|e| e.pos >= from) {
                        if m.settle(e.pos) {
                            if e.transient {
                                m.live_transient = m.live_transient.saturating_sub(1);
                            } else {
                                m.live_durable = m.live_durable.saturating_sub(1);
                                m.durable_bytes = m.durable_bytes.saturating_sub(u64::from(e.size));
                            }
                        }
                    }
                }
                self.dirty.insert(key);
            }
        }
        // Every chunk starting at `from` or later goes whole.
        let lo = segment::key(prefix, level, KIND_META, from);
        let hi = segment::key(prefix, level, KIND_META, u64::MAX);
        let mut doomed: BTreeSet<Vec<u8>> = self
            .metas
            .range(lo.clone()..=hi.clone())
            .filter(|(_, m)| m.is_some())
            .map(|(k, _)| k.clone())
            .collect();
        for item in tree.range(lo..=hi) {
            let (k, v) = item?;
            let k = k.to_vec();
            if !self.metas.contains_key(&k) {
                let meta = decode_meta(sh, &k, &v)?;
                self.metas.insert(k.clone(), Some(meta));
            }
            if !matches!(self.metas.get(&k), Some(None)) {
                doomed.insert(k);
            }
        }
        for k in doomed {
            self.delete_chunk(&k);
        }
        Ok(())
    }

    /// Drops everything of the queue with key prefix `prefix`.
    fn delete_queue(
        &mut self,
        sh: &Shared,
        tree: &Tree,
        prefix: &[u8],
    ) -> Result<(), StorageError> {
        self.builders.remove(prefix);
        let mut keys: BTreeSet<Vec<u8>> = self
            .metas
            .range(prefix.to_vec()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .filter(|(_, m)| m.is_some())
            .map(|(k, _)| k.clone())
            .collect();
        for item in tree.scan_prefix(prefix) {
            let (k, v) = item?;
            let k = k.to_vec();
            if !self.metas.contains_key(&k) {
                let meta = decode_meta(sh, &k, &v)?;
                self.metas.insert(k.clone(), Some(meta));
                keys.insert(k);
            }
        }
        for k in keys {
            self.delete_chunk(&k);
        }
        Ok(())
    }

    /// Writes (or deletes, or compacts) every meta this group changed.
    fn finish(&mut self, sh: &Shared) -> Result<(), StorageError> {
        let dirty = std::mem::take(&mut self.dirty);
        for key in dirty {
            let Some(Some(mut meta)) = self.metas.get(&key).cloned() else {
                continue;
            };
            let live = meta.live(sh.epoch);
            if live == 0 {
                self.delete_chunk(&key);
                continue;
            }
            if meta.entries >= COMPACT_MIN_ENTRIES && live * COMPACT_RATIO <= meta.entries {
                if let Some(raw) = self.chunk(sh, sh.files(self.durable), &key)? {
                    let entries = segment::decode_chunk(&raw)
                        .map_err(|e| sh.corrupt(format!("chunk {key:02x?}: {e}")))?;
                    let old_epoch = meta.epoch != sh.epoch;
                    let kept: Vec<ChunkEntry<&[u8]>> = entries
                        .iter()
                        .filter(|e| !(meta.is_settled(e.pos) || e.transient && old_epoch))
                        .map(|e| ChunkEntry {
                            pos: e.pos,
                            transient: e.transient,
                            size: e.size,
                            record: &raw[e.record.clone()],
                        })
                        .collect();
                    meta.entries = kept.len() as u32;
                    if old_epoch {
                        meta.live_transient = 0;
                        meta.epoch = sh.epoch;
                    }
                    let chunk = segment::encode_chunk(&kept);
                    self.chunks.insert(key.clone(), Some(chunk));
                    if let Some(loc) = meta.loc.take() {
                        self.freed.push(loc);
                    }
                }
            }
            self.writes.insert(key.clone(), Some(meta.encode()));
            self.metas.insert(key, Some(meta));
        }
        Ok(())
    }

    /// One slice of the copy-forward pass over this tree's metas: chunks in
    /// a victim file (mostly dead, see files.rs) are read and queued for
    /// writing to the active file under the same meta key, their metas
    /// repointed in this group's batch. A pass starts when there are victims
    /// and ends when its cursor reaches the end of the tree; each group looks
    /// at no more than `GC_MAX_METAS` metas and copies `GC_MAX_BYTES`.
    fn copy_forward(
        &mut self,
        sh: &Shared,
        tree: &Tree,
        files: &DataFiles,
    ) -> Result<(), StorageError> {
        let mut gc = files.gc.lock();
        if gc.is_none() {
            let victims = files.victims();
            if victims.is_empty() {
                return Ok(());
            }
            tracing::debug!(files = ?victims, "copy-forward pass started");
            *gc = Some(GcPass {
                victims,
                cursor: Vec::new(),
            });
        }
        let Some(pass) = gc.as_mut() else {
            return Ok(());
        };
        let (mut looked, mut copied) = (0usize, 0usize);
        let mut iter = tree.range(pass.cursor.clone()..);
        loop {
            if looked >= GC_MAX_METAS || copied >= GC_MAX_BYTES {
                return Ok(());
            }
            let Some(item) = iter.next() else {
                tracing::debug!(files = ?pass.victims, "copy-forward pass done");
                *gc = None;
                return Ok(());
            };
            let (k, v) = item?;
            looked += 1;
            let key = k.to_vec();
            pass.cursor = key.clone();
            pass.cursor.push(0);
            if self.chunks.contains_key(&key) {
                continue; // written (or deleted) by this group anyway
            }
            let mut meta = match self.metas.get(&key) {
                Some(None) => continue,
                Some(Some(m)) => m.clone(),
                None => decode_meta(sh, &key, &v)?,
            };
            let Some(loc) = meta.loc else {
                continue;
            };
            if !pass.victims.contains(&loc.file) {
                continue;
            }
            let Some(raw) = files.read(loc)? else {
                return Err(sh.corrupt(format!(
                    "chunk {key:02x?}: data file {} is missing",
                    files.path_of(loc.file).display()
                )));
            };
            copied += raw.len();
            files.copied.fetch_add(raw.len() as u64, Ordering::Relaxed);
            self.freed.push(loc);
            meta.loc = None;
            self.chunks.insert(key.clone(), Some(raw));
            self.metas.insert(key, Some(meta));
        }
    }

    /// Writes the group's chunks to the active data file (one write) and the
    /// metas pointing at them.
    fn write_chunks(&mut self, files: &DataFiles) -> Result<(), StorageError> {
        let chunks = std::mem::take(&mut self.chunks);
        let total: usize = chunks.values().flatten().map(Vec::len).sum();
        if total == 0 {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(total);
        let mut placed = Vec::with_capacity(chunks.len());
        for (key, bytes) in chunks {
            if let Some(bytes) = bytes {
                placed.push((
                    key,
                    buf.len() as u64,
                    bytes.len() as u32,
                    crc32fast::hash(&bytes),
                ));
                buf.extend_from_slice(&bytes);
            }
        }
        let (file, base) = files.append(&buf)?;
        for (key, offset, len, crc) in placed {
            if let Some(Some(m)) = self.metas.get_mut(&key) {
                m.loc = Some(Loc {
                    file,
                    offset: base + offset,
                    len,
                    crc,
                });
                self.writes.insert(key, Some(m.encode()));
            }
        }
        Ok(())
    }
}

fn decode_meta(sh: &Shared, key: &[u8], raw: &[u8]) -> Result<Meta, StorageError> {
    let first = segment::key_first(key).unwrap_or(0);
    Meta::decode(first, raw).map_err(|e| sh.corrupt(format!("chunk meta {key:02x?}: {e}")))
}
