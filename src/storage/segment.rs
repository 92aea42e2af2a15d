//! Byte layout of the segment message store: keys, chunk records and chunk
//! summaries ("metas"). Pure functions on bytes; the flusher in
//! [`sled`](super::sled) decides what to write.
//!
//! # Model
//!
//! Each queue has up to 256 *levels* (one per priority; a plain queue uses
//! level 0). A level is an ordered log of *positions* `0, 1, 2, ...` that the
//! queue assigns as it stores messages. One group flush writes the new
//! messages of one level as one **chunk** (split past [`CHUNK_MAX_ENTRIES`] or
//! [`CHUNK_MAX_BYTES`]): one run of bytes in a store-owned data file (see
//! [`files`](super::files)) holding many messages. Its **meta**, in sled, holds
//! the chunk's position range, live counts and bytes, where its bytes are
//! (file, offset, length, CRC-32) and two bitmaps over the range (settled,
//! delivered). Recovery reads metas only; bodies are read when a consumer
//! reaches them.
//!
//! # Keys of metas (all in one tree, so a flush's metas are one atomic batch)
//!
//! ```text
//! u32 BE  queue key length, then the queue key   (the queue prefix)
//! u8      level
//! u8      kind: b'c' = meta (format 2 also had b'm' chunk pieces; gone)
//! u64 BE  first position of the chunk
//! ```
//!
//! # Chunk record, version 1
//!
//! ```text
//! u8      version (= 1)
//! u32 BE  entry count
//! per entry, in position order:
//!   u64 BE  position
//!   u8      flags: bit 0 = transient (not to be recovered after a restart)
//!   u32 BE  size the queue accounts for it (body bytes)
//!   u32 BE  record length, then the message record (see codec.rs)
//! ```
//!
//! # Meta record, version 2
//!
//! ```text
//! u8      version (= 2)
//! u64 BE  end: one past the last position of the chunk
//! u32 BE  entries in the chunk record (fewer than end - first once compacted)
//! u32 BE  live durable entries
//! u32 BE  live transient entries
//! u64 BE  bytes of live durable entries (sizes as accounted by the queue)
//! u64 BE  store epoch the chunk was written in (transient entries of an older
//!         epoch are dead: the broker restarted since)
//! u64 BE  data file number    u64 BE offset in it
//! u32 BE  chunk length        u32 BE CRC-32 (IEEE) of the chunk's bytes
//! u8      flags: bit 0 = settled bitmap follows, bit 1 = delivered bitmap follows,
//!         bit 2 = return counts follow
//! [ceil((end - first) / 8) bytes]  settled bitmap (bit i = position first + i)
//! [ceil((end - first) / 8) bytes]  delivered bitmap
//! u32 BE n, then n x (u32 BE position - first, u32 BE count), by position:
//!         how often each of those messages came back to its queue after
//!         reaching a client (delivery limits; only messages with one)
//! ```
//!
//! Every decoder here returns a [`DecodeError`] on malformed input; none panics.

use super::codec::{DecodeError, Reader};

pub const CHUNK_VERSION: u8 = 1;
pub const META_VERSION: u8 = 2;
pub const KIND_META: u8 = b'c';

/// A flush splits one level's new messages into chunks of at most this many.
pub const CHUNK_MAX_ENTRIES: usize = 4096;
/// ... and at most about this many record bytes.
pub const CHUNK_MAX_BYTES: usize = 256 << 10;

const CHUNK_TRANSIENT: u8 = 0b1;
const META_SETTLED: u8 = 0b01;
const META_DELIVERED: u8 = 0b10;
const META_RETURNS: u8 = 0b100;

/// The key prefix of everything a queue has in the store.
pub fn queue_prefix(queue: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(4 + queue.len() + 10);
    k.extend_from_slice(&(queue.len() as u32).to_be_bytes());
    k.extend_from_slice(queue.as_bytes());
    k
}

/// The key prefix of one kind of record of one level of a queue.
pub fn level_prefix(queue_prefix: &[u8], level: u8, kind: u8) -> Vec<u8> {
    let mut k = Vec::with_capacity(queue_prefix.len() + 10);
    k.extend_from_slice(queue_prefix);
    k.push(level);
    k.push(kind);
    k
}

/// The key of the meta of the chunk starting at `first`.
pub fn key(queue_prefix: &[u8], level: u8, kind: u8, first: u64) -> Vec<u8> {
    let mut k = level_prefix(queue_prefix, level, kind);
    k.extend_from_slice(&first.to_be_bytes());
    k
}

/// A decoded key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Key<'a> {
    pub queue: &'a str,
    pub level: u8,
    pub kind: u8,
    pub first: u64,
}

pub fn decode_key(k: &[u8]) -> Result<Key<'_>, DecodeError> {
    let bad = |why: &str| DecodeError(format!("malformed segment key {k:02x?}: {why}"));
    let len = k
        .get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or_else(|| bad("too short"))?;
    let rest = k
        .get(4 + len..)
        .filter(|r| r.len() >= 2)
        .ok_or_else(|| bad("shorter than its queue-key length prefix"))?;
    let kind = rest[1];
    let want = match kind {
        KIND_META => 2 + 8,
        _ => return Err(bad("unknown record kind")),
    };
    if rest.len() != want {
        return Err(bad("length does not match its kind"));
    }
    let queue = std::str::from_utf8(&k[4..4 + len]).map_err(|_| bad("queue key not UTF-8"))?;
    let mut first = [0u8; 8];
    first.copy_from_slice(&rest[2..10]);
    Ok(Key {
        queue,
        level: rest[0],
        kind,
        first: u64::from_be_bytes(first),
    })
}

/// The position in a meta key (its last 8 bytes).
pub fn key_first(k: &[u8]) -> Option<u64> {
    let tail: [u8; 8] = k.get(k.len().checked_sub(8)?..)?.try_into().ok()?;
    Some(u64::from_be_bytes(tail))
}

/// One message in a chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkEntry<R> {
    pub pos: u64,
    pub transient: bool,
    pub size: u32,
    pub record: R,
}

/// Encodes a chunk; `entries` must be in increasing position order.
pub fn encode_chunk<R: AsRef<[u8]>>(entries: &[ChunkEntry<R>]) -> Vec<u8> {
    let len: usize = entries.iter().map(|e| 17 + e.record.as_ref().len()).sum();
    let mut out = Vec::with_capacity(5 + len);
    out.push(CHUNK_VERSION);
    out.extend_from_slice(&(entries.len() as u32).to_be_bytes());
    for e in entries {
        out.extend_from_slice(&e.pos.to_be_bytes());
        out.push(if e.transient { CHUNK_TRANSIENT } else { 0 });
        out.extend_from_slice(&e.size.to_be_bytes());
        out.extend_from_slice(&(e.record.as_ref().len() as u32).to_be_bytes());
        out.extend_from_slice(e.record.as_ref());
    }
    out
}

/// Decodes a chunk into entries whose `record` is its byte range in `buf`.
pub fn decode_chunk(buf: &[u8]) -> Result<Vec<ChunkEntry<std::ops::Range<usize>>>, DecodeError> {
    let mut r = Reader { buf, pos: 0 };
    let version = r.u8("chunk version")?;
    if version != CHUNK_VERSION {
        return Err(DecodeError(format!(
            "unknown chunk format version {version} (this build reads {CHUNK_VERSION})"
        )));
    }
    let n = r.u32("chunk entry count")? as usize;
    // Each entry takes at least 17 bytes: a count past that is corrupt.
    if n > buf.len() / 17 {
        return Err(DecodeError(format!(
            "chunk claims {n} entries in {} bytes",
            buf.len()
        )));
    }
    let mut out = Vec::with_capacity(n);
    let mut last = None;
    for _ in 0..n {
        let pos = r.u64("entry position")?;
        if last.is_some_and(|l| pos <= l) {
            return Err(DecodeError(format!(
                "chunk positions out of order at {pos}"
            )));
        }
        last = Some(pos);
        let flags = r.u8("entry flags")?;
        if flags & !CHUNK_TRANSIENT != 0 {
            return Err(DecodeError(format!(
                "unknown chunk entry flags {flags:#04x}"
            )));
        }
        let size = r.u32("entry size")?;
        let len = r.u32("record length")? as usize;
        let start = r.pos;
        r.take(len, "record")?;
        out.push(ChunkEntry {
            pos,
            transient: flags & CHUNK_TRANSIENT != 0,
            size,
            record: start..r.pos,
        });
    }
    if r.pos != buf.len() {
        return Err(DecodeError(format!(
            "{} trailing bytes after the chunk",
            buf.len() - r.pos
        )));
    }
    Ok(out)
}

/// Where a chunk's bytes are: `len` bytes at `offset` of data file `file`,
/// whose CRC-32 is `crc`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Loc {
    pub file: u64,
    pub offset: u64,
    pub len: u32,
    pub crc: u32,
}

/// The summary of one chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Meta {
    /// First position (from the key; not encoded in the value).
    pub first: u64,
    pub end: u64,
    pub entries: u32,
    pub live_durable: u32,
    pub live_transient: u32,
    pub durable_bytes: u64,
    pub epoch: u64,
    /// Where the chunk's bytes are; `None` until the flusher has written them
    /// (a meta is only ever encoded with one).
    pub loc: Option<Loc>,
    settled: Vec<u8>,
    delivered: Vec<u8>,
    /// (position - first, times returned), sorted by position.
    returns: Vec<(u32, u32)>,
}

impl Meta {
    /// A fresh chunk's meta: every entry live, none delivered.
    pub fn new(first: u64, end: u64, epoch: u64) -> Meta {
        Meta {
            first,
            end,
            entries: 0,
            live_durable: 0,
            live_transient: 0,
            durable_bytes: 0,
            epoch,
            loc: None,
            settled: Vec::new(),
            delivered: Vec::new(),
            returns: Vec::new(),
        }
    }

    pub fn contains(&self, pos: u64) -> bool {
        pos >= self.first && pos < self.end
    }

    fn bit(&self, pos: u64) -> Option<(usize, u8)> {
        self.contains(pos).then(|| {
            let i = (pos - self.first) as usize;
            (i / 8, 1u8 << (i % 8))
        })
    }

    fn bytes_len(&self) -> usize {
        (self.end - self.first).div_ceil(8) as usize
    }

    pub fn is_settled(&self, pos: u64) -> bool {
        self.bit(pos)
            .is_some_and(|(i, m)| self.settled.get(i).is_some_and(|b| b & m != 0))
    }

    pub fn is_delivered(&self, pos: u64) -> bool {
        self.bit(pos)
            .is_some_and(|(i, m)| self.delivered.get(i).is_some_and(|b| b & m != 0))
    }

    /// Marks `pos` settled; false if it was already (or is not in this chunk).
    pub fn settle(&mut self, pos: u64) -> bool {
        let Some((i, m)) = self.bit(pos) else {
            return false;
        };
        let len = self.bytes_len();
        if self.settled.is_empty() {
            self.settled = vec![0; len];
        }
        if self.settled[i] & m != 0 {
            return false;
        }
        self.settled[i] |= m;
        true
    }

    pub fn deliver(&mut self, pos: u64) {
        let Some((i, m)) = self.bit(pos) else {
            return;
        };
        let len = self.bytes_len();
        if self.delivered.is_empty() {
            self.delivered = vec![0; len];
        }
        self.delivered[i] |= m;
    }

    /// How often the message at `pos` came back after reaching a client.
    pub fn returns(&self, pos: u64) -> u32 {
        let Some(off) = self.offset(pos) else {
            return 0;
        };
        self.returns
            .binary_search_by_key(&off, |(o, _)| *o)
            .map_or(0, |i| self.returns[i].1)
    }

    /// Records that the message at `pos` came back `count` times; false if
    /// that is what the meta says already (or `pos` is not in this chunk).
    pub fn set_returns(&mut self, pos: u64, count: u32) -> bool {
        let Some(off) = self.offset(pos) else {
            return false;
        };
        match self.returns.binary_search_by_key(&off, |(o, _)| *o) {
            Ok(i) if self.returns[i].1 == count => false,
            Ok(i) => {
                self.returns[i].1 = count;
                true
            }
            Err(i) => {
                self.returns.insert(i, (off, count));
                true
            }
        }
    }

    fn offset(&self, pos: u64) -> Option<u32> {
        self.contains(pos).then(|| (pos - self.first) as u32)
    }

    /// Live entries that a reader in store epoch `epoch` would return.
    pub fn live(&self, epoch: u64) -> u32 {
        if self.epoch == epoch {
            self.live_durable + self.live_transient
        } else {
            self.live_durable
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(62 + self.settled.len() + self.delivered.len());
        out.push(META_VERSION);
        out.extend_from_slice(&self.end.to_be_bytes());
        out.extend_from_slice(&self.entries.to_be_bytes());
        out.extend_from_slice(&self.live_durable.to_be_bytes());
        out.extend_from_slice(&self.live_transient.to_be_bytes());
        out.extend_from_slice(&self.durable_bytes.to_be_bytes());
        out.extend_from_slice(&self.epoch.to_be_bytes());
        let loc = self.loc.unwrap_or_default();
        out.extend_from_slice(&loc.file.to_be_bytes());
        out.extend_from_slice(&loc.offset.to_be_bytes());
        out.extend_from_slice(&loc.len.to_be_bytes());
        out.extend_from_slice(&loc.crc.to_be_bytes());
        let mut flags = 0;
        if !self.settled.is_empty() {
            flags |= META_SETTLED;
        }
        if !self.delivered.is_empty() {
            flags |= META_DELIVERED;
        }
        if !self.returns.is_empty() {
            flags |= META_RETURNS;
        }
        out.push(flags);
        out.extend_from_slice(&self.settled);
        out.extend_from_slice(&self.delivered);
        if !self.returns.is_empty() {
            out.extend_from_slice(&(self.returns.len() as u32).to_be_bytes());
            for (off, count) in &self.returns {
                out.extend_from_slice(&off.to_be_bytes());
                out.extend_from_slice(&count.to_be_bytes());
            }
        }
        out
    }

    pub fn decode(first: u64, buf: &[u8]) -> Result<Meta, DecodeError> {
        let mut r = Reader { buf, pos: 0 };
        let version = r.u8("meta version")?;
        if version != META_VERSION {
            return Err(DecodeError(format!(
                "unknown chunk meta format version {version} (this build reads {META_VERSION})"
            )));
        }
        let end = r.u64("end")?;
        if end <= first || end - first > u32::MAX as u64 {
            return Err(DecodeError(format!(
                "chunk meta range {first}..{end} is empty or too long"
            )));
        }
        let mut m = Meta::new(first, end, 0);
        m.entries = r.u32("entries")?;
        m.live_durable = r.u32("live durable")?;
        m.live_transient = r.u32("live transient")?;
        m.durable_bytes = r.u64("durable bytes")?;
        m.epoch = r.u64("epoch")?;
        let loc = Loc {
            file: r.u64("data file")?,
            offset: r.u64("chunk offset")?,
            len: r.u32("chunk length")?,
            crc: r.u32("chunk CRC")?,
        };
        if loc.len == 0 {
            return Err(DecodeError(format!(
                "chunk meta at {first} has no chunk location"
            )));
        }
        m.loc = Some(loc);
        let flags = r.u8("meta flags")?;
        if flags & !(META_SETTLED | META_DELIVERED | META_RETURNS) != 0 {
            return Err(DecodeError(format!(
                "unknown chunk meta flags {flags:#04x}"
            )));
        }
        let len = m.bytes_len();
        if flags & META_SETTLED != 0 {
            m.settled = r.take(len, "settled bitmap")?.to_vec();
        }
        if flags & META_DELIVERED != 0 {
            m.delivered = r.take(len, "delivered bitmap")?.to_vec();
        }
        if flags & META_RETURNS != 0 {
            let n = r.u32("return counts")?;
            let span = end - first;
            let mut last = None;
            for _ in 0..n {
                let (off, count) = (r.u32("return offset")?, r.u32("return count")?);
                if u64::from(off) >= span || last.is_some_and(|l| off <= l) {
                    return Err(DecodeError(format!(
                        "chunk meta at {first}: return count at offset {off} out of order or range"
                    )));
                }
                last = Some(off);
                m.returns.push((off, count));
            }
        }
        if r.pos != buf.len() {
            return Err(DecodeError(format!(
                "{} trailing bytes after the chunk meta",
                buf.len() - r.pos
            )));
        }
        if u64::from(m.live_durable) + u64::from(m.live_transient) > u64::from(m.entries) {
            return Err(DecodeError(format!(
                "chunk meta at {first} counts more live entries than it has"
            )));
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOC: Loc = Loc {
        file: 3,
        offset: 4096,
        len: 700,
        crc: 0xdead_beef,
    };

    #[test]
    fn meta_location_round_trip_and_required() {
        let mut m = Meta::new(5, 9, 1);
        m.entries = 4;
        m.live_durable = 4;
        m.loc = Some(LOC);
        let back = Meta::decode(5, &m.encode()).unwrap();
        assert_eq!(back.loc, Some(LOC));
        m.loc = None;
        assert!(Meta::decode(5, &m.encode()).is_err(), "no location");
        // A format-2 meta (version 1) is refused, not misread.
        let mut old = back.encode();
        old[0] = 1;
        assert!(Meta::decode(5, &old).is_err());
    }

    #[test]
    fn keys_order_and_decode() {
        let p = queue_prefix("v\0q");
        assert!(key(&p, 0, KIND_META, 255) < key(&p, 0, KIND_META, 256));
        assert!(key(&p, 0, KIND_META, u64::MAX) < key(&p, 1, KIND_META, 0));
        // Format 2's chunk-piece keys are not read as metas.
        let mut piece = key(&p, 3, b'm', 42);
        piece.extend_from_slice(&7u32.to_be_bytes());
        assert!(decode_key(&piece).is_err());
        let k = key(&p, 3, KIND_META, 42);
        assert_eq!(
            decode_key(&k).unwrap(),
            Key {
                queue: "v\0q",
                level: 3,
                kind: KIND_META,
                first: 42
            }
        );
        assert_eq!(key_first(&k), Some(42));
        assert!(!key(&queue_prefix("a\0b"), 0, KIND_META, 0).starts_with(&queue_prefix("a")));
        assert!(decode_key(b"xx").is_err());
        let mut bad = k.clone();
        bad[4 + 3 + 1] = b'z';
        assert!(decode_key(&bad).is_err());
    }

    #[test]
    fn chunk_round_trip_and_garbage() {
        let entries = vec![
            ChunkEntry {
                pos: 7,
                transient: false,
                size: 3,
                record: b"abc".to_vec(),
            },
            ChunkEntry {
                pos: 9,
                transient: true,
                size: 0,
                record: Vec::new(),
            },
        ];
        let enc = encode_chunk(&entries);
        let dec = decode_chunk(&enc).unwrap();
        assert_eq!(dec.len(), 2);
        assert_eq!((dec[0].pos, dec[0].transient, dec[0].size), (7, false, 3));
        assert_eq!(&enc[dec[0].record.clone()], b"abc");
        assert_eq!((dec[1].pos, dec[1].transient), (9, true));
        for n in 0..enc.len() {
            assert!(decode_chunk(&enc[..n]).is_err(), "truncated at {n}");
        }
        let mut v = enc.clone();
        v[0] = 9;
        assert!(decode_chunk(&v).is_err());
        let mut huge = enc.clone();
        huge[1..5].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode_chunk(&huge).is_err());
    }

    #[test]
    fn meta_return_counts_round_trip() {
        let mut m = Meta::new(100, 110, 4);
        m.loc = Some(LOC);
        m.entries = 10;
        m.live_durable = 10;
        assert!(!m.encode().is_empty());
        assert!(m.set_returns(107, 2));
        assert!(m.set_returns(101, 1));
        assert!(!m.set_returns(101, 1), "unchanged");
        assert!(m.set_returns(107, 3));
        assert!(!m.set_returns(110, 1), "outside the chunk");
        let enc = m.encode();
        let back = Meta::decode(100, &enc).unwrap();
        assert_eq!(back, m);
        assert_eq!(
            (back.returns(101), back.returns(107), back.returns(102)),
            (1, 3, 0)
        );
        for n in 0..enc.len() {
            assert!(Meta::decode(100, &enc[..n]).is_err(), "truncated at {n}");
        }
        // Offsets out of order or past the chunk are corruption, not misread.
        let tail = enc.len() - 16;
        let mut swapped = enc.clone();
        swapped[tail..tail + 8].copy_from_slice(&enc[tail + 8..]);
        swapped[tail + 8..].copy_from_slice(&enc[tail..tail + 8]);
        assert!(Meta::decode(100, &swapped).is_err());
        let mut far = enc.clone();
        far[tail..tail + 4].copy_from_slice(&10u32.to_be_bytes());
        assert!(Meta::decode(100, &far).is_err());
    }

    #[test]
    fn meta_bitmaps_round_trip() {
        let mut m = Meta::new(100, 110, 4);
        m.loc = Some(LOC);
        m.entries = 10;
        m.live_durable = 8;
        m.live_transient = 2;
        m.durable_bytes = 80;
        assert_eq!(Meta::decode(100, &m.encode()).unwrap(), m);
        assert!(m.encode().len() < 64, "fresh meta carries no bitmaps");
        assert!(m.settle(100));
        assert!(!m.settle(100));
        assert!(m.settle(109));
        assert!(!m.settle(110), "outside the chunk");
        m.deliver(105);
        let back = Meta::decode(100, &m.encode()).unwrap();
        assert!(back.is_settled(100) && back.is_settled(109) && !back.is_settled(101));
        assert!(back.is_delivered(105) && !back.is_delivered(100));
        assert_eq!(back.live(4), 10);
        assert_eq!(back.live(5), 8);
        let enc = m.encode();
        for n in 0..enc.len() {
            assert!(Meta::decode(100, &enc[..n]).is_err());
        }
        assert!(Meta::decode(200, &enc).is_err(), "end before first");
    }
}
