//! The chunk: the unit a stream is written, indexed, read and sent in, in
//! RabbitMQ's osiris format (so the Stream protocol's `Deliver` can send the
//! stored bytes as they are). Pure bytes in and out.
//!
//! ```text
//! header (48 bytes, big-endian)
//!   magic/version u8   0x50 (magic 5, chunk format version 0)
//!   chunk type    u8   0 user, 1 tracking delta, 2 tracking snapshot
//!   num entries   u16  entries in the data section
//!   num records   u32  messages (a sub-batch entry holds several)
//!   timestamp     i64  ms since the epoch
//!   epoch         u64  always 1 (one node)
//!   first offset  u64  the chunk id: offset of its first record
//!   data crc      u32  CRC32 (IEEE) of the data section
//!   data length   u32
//!   trailer length u32
//!   bloom size    u8   bytes of bloom filter between header and data (0: none)
//!   reserved      3 bytes
//! bloom filter, data (entries), trailer
//! ```
//!
//! A simple entry is `0:1, size:31, bytes`; a sub-batch entry is
//! `1:1, compression:3, reserved:4, records:16, uncompressed length:32,
//! length:32, bytes`. The trailer of a user chunk lists publisher sequences
//! in osiris's layout, `(0u8, ref len u8, ref, sequence u64)` (the chunk id
//! is the chunk's own; a 256-byte reference's length byte is 0, as osiris
//! writes it), so its `trailer length` is RabbitMQ's for the same chunk
//! (clients see it in `Deliver`). The data of a tracking chunk (never sent
//! to a client) lists tracking records: sequences `(0u8, ref len u16, ref,
//! chunk id u64, sequence u64)`, offsets `(1u8, ref len u16, ref, offset
//! u64)`. Segments written before the trailer took osiris's layout hold user
//! chunk trailers in the tracking layout ([`tracking`] reads them).

use bytes::{BufMut, Bytes, BytesMut};

use crate::wire::stream::request::{compression, MAX_SUB_BATCH_UNCOMPRESSED};
use crate::wire::stream::SubBatch;

pub const HEADER_LEN: usize = 48;
pub const MAGIC_VERSION: u8 = 0x50;
pub const TYPE_USER: u8 = 0;
pub const TYPE_TRACKING_DELTA: u8 = 1;
pub const TYPE_TRACKING_SNAPSHOT: u8 = 2;
pub const EPOCH: u64 = 1;

const TRK_SEQUENCE: u8 = 0;
const TRK_OFFSET: u8 = 1;

/// The fixed header of a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub chunk_type: u8,
    pub num_entries: u16,
    pub num_records: u32,
    pub timestamp: i64,
    pub epoch: u64,
    pub first_offset: u64,
    pub crc: u32,
    pub data_len: u32,
    pub trailer_len: u32,
    pub bloom_len: u8,
}

impl Header {
    /// Parse a header; None if `b` is short or not a chunk header.
    pub fn parse(b: &[u8]) -> Option<Header> {
        if b.len() < HEADER_LEN || b[0] != MAGIC_VERSION || b[1] > TYPE_TRACKING_SNAPSHOT {
            return None;
        }
        let u32_at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        Some(Header {
            chunk_type: b[1],
            num_entries: u16::from_be_bytes([b[2], b[3]]),
            num_records: u32_at(4),
            timestamp: u64_at(b, 8)? as i64,
            epoch: u64_at(b, 16)?,
            first_offset: u64_at(b, 24)?,
            crc: u32_at(32),
            data_len: u32_at(36),
            trailer_len: u32_at(40),
            bloom_len: b[44],
        })
    }

    pub fn write(&self, out: &mut BytesMut) {
        out.put_u8(MAGIC_VERSION);
        out.put_u8(self.chunk_type);
        out.put_u16(self.num_entries);
        out.put_u32(self.num_records);
        out.put_i64(self.timestamp);
        out.put_u64(self.epoch);
        out.put_u64(self.first_offset);
        out.put_u32(self.crc);
        out.put_u32(self.data_len);
        out.put_u32(self.trailer_len);
        out.put_u8(self.bloom_len);
        out.put_slice(&[0, 0, 0]);
    }

    /// The whole chunk's length (header, bloom, data, trailer).
    pub fn total_len(&self) -> u64 {
        HEADER_LEN as u64
            + u64::from(self.bloom_len)
            + u64::from(self.data_len)
            + u64::from(self.trailer_len)
    }

    /// The offset after this chunk's records.
    pub fn next_offset(&self) -> u64 {
        self.first_offset + u64::from(self.num_records)
    }
}

/// What consecutive stored user chunks delivered as one may add up to
/// ([`Merged`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MergeLimits {
    /// Data bytes of the delivered chunk (its frame must fit the client's
    /// frame-max).
    pub data_len: u32,
    /// How much newer than the first part's timestamp a part may be (the
    /// delivered chunk carries the newest part's).
    pub span_ms: i64,
}

/// Consecutive stored user chunks sent to a consumer as one chunk: a
/// credit, a frame and a wake-up of the client for all of them. A consumer
/// pays per chunk, and a stream written by a fast, bursty producer holds
/// many small chunks; RabbitMQ's slower writer cuts larger ones. The
/// delivered header is what a chunk written with all their entries would
/// have: the first part's id and epoch, the sums of entries, records and
/// data, the newest timestamp (every message was written by then), the
/// data's CRC combined from the parts' (their data is not read), and no
/// bloom filter or trailer (neither is sent). Pure.
#[derive(Debug, Clone)]
pub struct Merged {
    pub header: Header,
    /// Stored chunks in it.
    pub parts: usize,
    first_timestamp: i64,
    crc: crc32fast::Hasher,
}

impl Merged {
    pub fn new(first: &Header) -> Merged {
        Merged {
            header: *first,
            parts: 1,
            first_timestamp: first.timestamp,
            crc: crc32fast::Hasher::new_with_initial_len(first.crc, u64::from(first.data_len)),
        }
    }

    /// Whether `next`, the stored chunk read after the last part, may join:
    /// a user chunk of the same epoch right after it (no offset between
    /// them), within `limits` and the header's field widths.
    pub fn fits(&self, next: &Header, limits: &MergeLimits) -> bool {
        let h = &self.header;
        next.chunk_type == TYPE_USER
            && h.chunk_type == TYPE_USER
            && next.epoch == h.epoch
            && next.first_offset == h.next_offset()
            && next.timestamp.saturating_sub(self.first_timestamp) <= limits.span_ms
            && u32::from(h.num_entries) + u32::from(next.num_entries) <= u32::from(u16::MAX)
            && h.num_records.checked_add(next.num_records).is_some()
            && h.data_len
                .checked_add(next.data_len)
                .is_some_and(|d| d <= limits.data_len)
    }

    /// Add `next` (checked with [`fits`](Self::fits)).
    pub fn add(&mut self, next: &Header) {
        let h = &mut self.header;
        h.num_entries = h.num_entries.saturating_add(next.num_entries);
        h.num_records = h.num_records.saturating_add(next.num_records);
        h.timestamp = h.timestamp.max(next.timestamp);
        h.data_len = h.data_len.saturating_add(next.data_len);
        h.trailer_len = 0;
        h.bloom_len = 0;
        self.crc.combine(&crc32fast::Hasher::new_with_initial_len(
            next.crc,
            u64::from(next.data_len),
        ));
        h.crc = self.crc.clone().finalize();
        self.parts += 1;
    }
}

/// The header and bloom filter of a chunk whose data section is `data`
/// (encoded entries) and whose trailer takes `trailer_len` bytes: what goes
/// before the data when the parts are written without being joined.
pub fn build_head(
    chunk_type: u8,
    first_offset: u64,
    timestamp: i64,
    (num_entries, num_records): (u16, u32),
    bloom: &[u8],
    data: &[u8],
    trailer_len: usize,
) -> Bytes {
    let header = Header {
        chunk_type,
        num_entries,
        num_records,
        timestamp,
        epoch: EPOCH,
        first_offset,
        crc: crc32fast::hash(data),
        data_len: data.len() as u32,
        trailer_len: trailer_len as u32,
        bloom_len: bloom.len() as u8,
    };
    let mut out = BytesMut::with_capacity(HEADER_LEN + bloom.len());
    header.write(&mut out);
    out.put_slice(bloom);
    out.freeze()
}

/// Build a chunk from its parts; `data` holds encoded entries.
pub fn build(
    chunk_type: u8,
    first_offset: u64,
    timestamp: i64,
    counts: (u16, u32),
    bloom: &[u8],
    data: &[u8],
    trailer: &[u8],
) -> Bytes {
    let head = build_head(
        chunk_type,
        first_offset,
        timestamp,
        counts,
        bloom,
        data,
        trailer.len(),
    );
    let mut out = BytesMut::with_capacity(head.len() + data.len() + trailer.len());
    out.put_slice(&head);
    out.put_slice(data);
    out.put_slice(trailer);
    out.freeze()
}

/// Append a simple entry holding `payload` to `data`.
pub fn put_simple_entry(data: &mut BytesMut, payload: &[u8]) {
    data.put_u32(payload.len() as u32 & 0x7fff_ffff);
    data.put_slice(payload);
}

/// Append a sub-batch entry (the client's batch, stored as it came) to `data`.
pub fn put_sub_batch_entry(data: &mut BytesMut, batch: &SubBatch, payload: &[u8]) {
    data.put_u8(0x80 | (batch.compression & 0x07) << 4);
    data.put_u16(batch.records);
    data.put_u32(batch.uncompressed_len);
    data.put_u32(payload.len() as u32);
    data.put_slice(payload);
}

/// The records of a sub-batch's data, uncompressed: the data itself when not
/// compressed, gunzipped for gzip (at most `uncompressed_len` bytes, which
/// must be what it holds). None for snappy, lz4 and zstd (warren does not
/// decode them: AMQP 0-9-1 readers skip such batches, as RabbitMQ's skip
/// every compressed one) and for a gzip stream that does not decode.
pub fn uncompressed(compression: u8, uncompressed_len: u32, data: Bytes) -> Option<Bytes> {
    use std::io::Read;
    match compression {
        compression::NONE => Some(data),
        compression::GZIP => {
            let len = uncompressed_len.min(MAX_SUB_BATCH_UNCOMPRESSED) as usize;
            // Grown as it decodes: a batch only claiming to be large costs
            // what it really holds.
            let mut out = Vec::with_capacity(len.min(1 << 20));
            let mut d = flate2::read::GzDecoder::new(&data[..]).take(len as u64 + 1);
            d.read_to_end(&mut out).ok()?;
            (out.len() == uncompressed_len as usize).then(|| Bytes::from(out))
        }
        _ => None,
    }
}

/// The records of a data section with their offsets, the first at `first`:
/// a simple entry is one record; a sub-batch entry holds `records` records
/// (`size:32, bytes` each, after [`uncompressed`]), one offset each. A batch
/// that cannot be read ([`uncompressed`] says None) is skipped, its offsets
/// too. Stops at the first malformed entry. No allocation for simple
/// entries.
#[derive(Debug)]
pub struct Records {
    data: Bytes,
    pos: usize,
    offset: u64,
    /// The sub-batch being split: its records and how many are left.
    batch: Option<(Bytes, usize, u16)>,
}

impl Records {
    pub fn new(data: Bytes, first: u64) -> Records {
        Records {
            data,
            pos: 0,
            offset: first,
            batch: None,
        }
    }
}

impl Iterator for Records {
    type Item = (u64, Bytes);

    fn next(&mut self) -> Option<(u64, Bytes)> {
        loop {
            if let Some((buf, pos, left)) = &mut self.batch {
                if *left > 0 {
                    let rest = buf.get(*pos..)?;
                    let size = rest
                        .first_chunk::<4>()
                        .map(|b| u32::from_be_bytes(*b) as usize & 0x7fff_ffff)?;
                    let end = pos.checked_add(4 + size).filter(|&e| e <= buf.len())?;
                    let rec = buf.slice(*pos + 4..end);
                    *pos = end;
                    *left -= 1;
                    let at = self.offset;
                    self.offset += 1;
                    return Some((at, rec));
                }
                self.batch = None;
            }
            let rest = self.data.get(self.pos..)?;
            let first = *rest.first()?;
            if first & 0x80 == 0 {
                let size = rest
                    .first_chunk::<4>()
                    .map(|b| u32::from_be_bytes(*b) as usize)?;
                let end = self
                    .pos
                    .checked_add(4 + size)
                    .filter(|&e| e <= self.data.len())?;
                let rec = self.data.slice(self.pos + 4..end);
                self.pos = end;
                let at = self.offset;
                self.offset += 1;
                return Some((at, rec));
            }
            let Some(Entry::SubBatch {
                compression,
                records,
                uncompressed_len,
                data,
            }) = entries(self.data.slice(self.pos..)).next()
            else {
                return None;
            };
            self.pos += 11 + data.len();
            match uncompressed(compression, uncompressed_len, data) {
                Some(buf) => self.batch = Some((buf, 0, records)),
                None => self.offset += u64::from(records),
            }
        }
    }
}

/// One entry of a chunk's data section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// One message.
    Simple(Bytes),
    /// Several messages as the client batched (and maybe compressed) them.
    SubBatch {
        compression: u8,
        records: u16,
        uncompressed_len: u32,
        data: Bytes,
    },
}

impl Entry {
    pub fn records(&self) -> u64 {
        match self {
            Entry::Simple(_) => 1,
            Entry::SubBatch { records, .. } => u64::from(*records),
        }
    }
}

/// Iterate the entries of a data section; stops at the first malformed one.
pub fn entries(data: Bytes) -> impl Iterator<Item = Entry> {
    let mut pos = 0usize;
    std::iter::from_fn(move || {
        let rest = data.get(pos..)?;
        if rest.len() < 4 {
            return None;
        }
        if rest[0] & 0x80 == 0 {
            let size =
                (u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) & 0x7fff_ffff) as usize;
            let end = pos.checked_add(4 + size).filter(|&e| e <= data.len())?;
            let e = Entry::Simple(data.slice(pos + 4..end));
            pos = end;
            Some(e)
        } else {
            if rest.len() < 11 {
                return None;
            }
            let compression = (rest[0] >> 4) & 0x07;
            let records = u16::from_be_bytes([rest[1], rest[2]]);
            let uncompressed_len = u32::from_be_bytes([rest[3], rest[4], rest[5], rest[6]]);
            let len = u32::from_be_bytes([rest[7], rest[8], rest[9], rest[10]]) as usize;
            let end = pos.checked_add(11 + len).filter(|&e| e <= data.len())?;
            let e = Entry::SubBatch {
                compression,
                records,
                uncompressed_len,
                data: data.slice(pos + 11..end),
            };
            pos = end;
            Some(e)
        }
    })
}

/// The two bit positions of `value` in a bloom filter of `len` bytes (CRC32
/// of the value, and of the value after a 0xff byte: stable on disk).
fn bloom_bits(len: usize, value: &str) -> [usize; 2] {
    let bits = len * 8;
    let a = crc32fast::hash(value.as_bytes()) as usize;
    let mut h = crc32fast::Hasher::new();
    h.update(&[0xff]);
    h.update(value.as_bytes());
    let b = h.finalize() as usize;
    [a % bits, b % bits]
}

/// Add a filter value (`""`: a message without one) to a bloom filter.
pub fn bloom_insert(bloom: &mut [u8], value: &str) {
    if bloom.is_empty() {
        return;
    }
    for bit in bloom_bits(bloom.len(), value) {
        bloom[bit / 8] |= 1 << (bit % 8);
    }
}

/// Whether a bloom filter may hold `value` (false: certainly not).
pub fn bloom_contains(bloom: &[u8], value: &str) -> bool {
    !bloom.is_empty()
        && bloom_bits(bloom.len(), value)
            .iter()
            .all(|&bit| bloom[bit / 8] & (1 << (bit % 8)) != 0)
}

/// A tracking record: a publisher's last sequence or a consumer's offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tracking {
    Sequence {
        reference: String,
        chunk: u64,
        sequence: u64,
    },
    Offset {
        reference: String,
        offset: u64,
    },
}

/// Longest reference a tracking record holds.
pub const MAX_REFERENCE: usize = u16::MAX as usize;

/// Longest publisher reference a user chunk's trailer holds (RabbitMQ's
/// limit on a publisher's reference).
pub const MAX_PUBLISHER_REFERENCE: usize = 256;

/// Append a trailer record: `reference` (1 to [`MAX_PUBLISHER_REFERENCE`]
/// bytes) published up to `sequence` in this chunk.
pub fn put_trailer_sequence(out: &mut BytesMut, reference: &str, sequence: u64) {
    out.put_u8(TRK_SEQUENCE);
    // 256 wraps to 0, as in osiris (a reference is never empty).
    out.put_u8(reference.len() as u8);
    out.put_slice(reference.as_bytes());
    out.put_u64(sequence);
}

/// Parse the trailer of user chunk `chunk` (osiris's layout); stops at the
/// first malformed record.
pub fn trailer(b: &[u8], chunk: u64) -> Vec<Tracking> {
    let mut out = Vec::new();
    let mut rest = b;
    while let [kind, len, tail @ ..] = rest {
        let len = if *len == 0 { 256 } else { usize::from(*len) };
        if *kind != TRK_SEQUENCE || tail.len() < len + 8 {
            break;
        }
        let Ok(reference) = std::str::from_utf8(&tail[..len]) else {
            break;
        };
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&tail[len..len + 8]);
        out.push(Tracking::Sequence {
            reference: reference.to_string(),
            chunk,
            sequence: u64::from_be_bytes(seq),
        });
        rest = &tail[len + 8..];
    }
    out
}

pub fn put_tracking(out: &mut BytesMut, t: &Tracking) {
    match t {
        Tracking::Sequence {
            reference,
            chunk,
            sequence,
        } => {
            out.put_u8(TRK_SEQUENCE);
            out.put_u16(reference.len() as u16);
            out.put_slice(reference.as_bytes());
            out.put_u64(*chunk);
            out.put_u64(*sequence);
        }
        Tracking::Offset { reference, offset } => {
            out.put_u8(TRK_OFFSET);
            out.put_u16(reference.len() as u16);
            out.put_slice(reference.as_bytes());
            out.put_u64(*offset);
        }
    }
}

/// The big-endian u64 at `i` of `b`; None if `b` ends before it.
pub fn u64_at(b: &[u8], i: usize) -> Option<u64> {
    let mut a = [0u8; 8];
    a.copy_from_slice(b.get(i..i.checked_add(8)?)?);
    Some(u64::from_be_bytes(a))
}

/// Parse tracking records; stops at the first malformed one.
pub fn tracking(b: &[u8]) -> Vec<Tracking> {
    let mut out = Vec::new();
    let mut p = 0usize;
    while p + 3 <= b.len() {
        let kind = b[p];
        let len = u16::from_be_bytes([b[p + 1], b[p + 2]]) as usize;
        let s = p + 3;
        let Some(reference) = b
            .get(s..s + len)
            .and_then(|r| std::str::from_utf8(r).ok())
            .map(str::to_string)
        else {
            break;
        };
        let v = s + len;
        match kind {
            TRK_SEQUENCE => {
                let (Some(chunk), Some(sequence)) = (u64_at(b, v), u64_at(b, v + 8)) else {
                    break;
                };
                out.push(Tracking::Sequence {
                    reference,
                    chunk,
                    sequence,
                });
                p = v + 16;
            }
            TRK_OFFSET => {
                let Some(offset) = u64_at(b, v) else { break };
                out.push(Tracking::Offset { reference, offset });
                p = v + 8;
            }
            _ => break,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_is_48_bytes() {
        let mut data = BytesMut::new();
        put_simple_entry(&mut data, b"hello");
        put_simple_entry(&mut data, b"");
        let c = build(TYPE_USER, 42, 1_700_000_000_000, (2, 2), &[], &data, b"tr");
        let h = Header::parse(&c).expect("header");
        assert_eq!(c[0], 0x50);
        assert_eq!(h.total_len() as usize, c.len());
        assert_eq!(c.len(), HEADER_LEN + data.len() + 2);
        assert_eq!((h.first_offset, h.num_entries, h.num_records), (42, 2, 2));
        assert_eq!(h.timestamp, 1_700_000_000_000);
        assert_eq!(h.crc, crc32fast::hash(&data));
        let es: Vec<Entry> = entries(c.slice(HEADER_LEN..HEADER_LEN + data.len())).collect();
        assert_eq!(
            es,
            vec![
                Entry::Simple(Bytes::from_static(b"hello")),
                Entry::Simple(Bytes::new())
            ]
        );
        assert!(Header::parse(&c[..47]).is_none());
    }

    #[test]
    fn merged_chunks_read_as_one_written_with_all_their_entries() {
        // Three stored chunks of 2, 1 and 3 messages, written 0, 5 and 9 ms apart.
        let parts: Vec<(u64, i64, Vec<&[u8]>)> = vec![
            (10, 1_000, vec![b"a", b"bb"]),
            (12, 1_005, vec![b"ccc"]),
            (13, 1_009, vec![b"", b"dddd", b"e"]),
        ];
        let mut all = BytesMut::new();
        let mut headers = Vec::new();
        for (first, ts, msgs) in &parts {
            let mut d = BytesMut::new();
            for m in msgs {
                put_simple_entry(&mut d, m);
            }
            all.put_slice(&d);
            let n = msgs.len();
            let c = build(
                TYPE_USER,
                *first,
                *ts,
                (n as u16, n as u32),
                &[7; 4],
                &d,
                b"tr",
            );
            headers.push(Header::parse(&c).expect("header"));
        }
        let wide = MergeLimits {
            data_len: 1 << 20,
            span_ms: 10,
        };
        let mut m = Merged::new(&headers[0]);
        for h in &headers[1..] {
            assert!(m.fits(h, &wide));
            m.add(h);
        }
        let h = m.header;
        assert_eq!(m.parts, 3);
        assert_eq!((h.first_offset, h.num_entries, h.num_records), (10, 6, 6));
        assert_eq!(
            (h.timestamp, h.epoch, h.chunk_type),
            (1_009, EPOCH, TYPE_USER)
        );
        assert_eq!(h.data_len as usize, all.len());
        assert_eq!(h.crc, crc32fast::hash(&all));
        // Neither the parts' bloom filters nor their trailers are sent.
        assert_eq!((h.bloom_len, h.trailer_len), (0, 0));
        let es: Vec<Entry> = entries(all.freeze()).collect();
        assert_eq!(es.len(), 6);

        // What may not join: past the time span, past the data limit, a gap
        // in the offsets, another epoch, a tracking chunk.
        let first = Merged::new(&headers[0]);
        let narrow = MergeLimits { span_ms: 4, ..wide };
        assert!(!first.fits(&headers[1], &narrow));
        let small = MergeLimits {
            data_len: headers[0].data_len + headers[1].data_len - 1,
            ..wide
        };
        assert!(!first.fits(&headers[1], &small));
        assert!(!first.fits(&headers[2], &wide));
        let other_epoch = Header {
            epoch: 2,
            ..headers[1]
        };
        assert!(!first.fits(&other_epoch, &wide));
        let tracking = Header {
            chunk_type: TYPE_TRACKING_DELTA,
            ..headers[1]
        };
        assert!(!first.fits(&tracking, &wide));
        // Entries beyond the header's u16.
        let many = Header {
            num_entries: u16::MAX,
            ..headers[1]
        };
        assert!(!first.fits(&many, &wide));
    }

    #[test]
    fn sub_batches_and_tracking_parse() {
        let mut d = BytesMut::new();
        d.put_u8(0x80 | (1 << 4));
        d.put_u16(3);
        d.put_u32(100);
        d.put_u32(2);
        d.put_slice(b"zz");
        put_simple_entry(&mut d, b"x");
        let es: Vec<Entry> = entries(d.freeze()).collect();
        assert_eq!(es.len(), 2);
        assert_eq!(es[0].records(), 3);
        let mut t = BytesMut::new();
        let recs = vec![
            Tracking::Sequence {
                reference: "p".into(),
                chunk: 7,
                sequence: 9,
            },
            Tracking::Offset {
                reference: "c".into(),
                offset: 5,
            },
        ];
        for r in &recs {
            put_tracking(&mut t, r);
        }
        assert_eq!(tracking(&t), recs);
        // Truncated: what parses before the cut.
        assert_eq!(tracking(&t[..t.len() - 1]), recs[..1].to_vec());
    }

    #[test]
    fn trailers_take_osiris_layout() {
        // RabbitMQ's trailer for one message of publisher "test-reference":
        // 24 bytes (what rstream's `test_deliver` expects in Deliver).
        let mut t = BytesMut::new();
        put_trailer_sequence(&mut t, "test-reference", 1);
        assert_eq!(t.len(), 24);
        assert_eq!(&t[..2], &[0, 14]);
        assert_eq!(&t[16..], &1u64.to_be_bytes());
        let long = "r".repeat(MAX_PUBLISHER_REFERENCE);
        put_trailer_sequence(&mut t, &long, u64::MAX);
        let seq = |reference: &str, sequence| Tracking::Sequence {
            reference: reference.into(),
            chunk: 40,
            sequence,
        };
        let both = vec![seq("test-reference", 1), seq(&long, u64::MAX)];
        assert_eq!(trailer(&t, 40), both);
        // Truncated, or an unknown record type: what parses before it.
        assert_eq!(trailer(&t[..t.len() - 1], 40), both[..1].to_vec());
        let mut bad = t.clone();
        bad[24] = 9;
        assert_eq!(trailer(&bad, 40), both[..1].to_vec());
        assert_eq!(trailer(&[], 40), vec![]);
    }

    #[test]
    fn records_split_batches_and_skip_unreadable_codecs() {
        use std::io::Write;
        let raw = [0, 0, 0, 2, b'h', b'i', 0, 0, 0, 1, b'!'];
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&raw).expect("gzip");
        let gz = gz.finish().expect("gzip");
        let sb = |compression| SubBatch {
            compression,
            records: 2,
            uncompressed_len: raw.len() as u32,
        };
        let mut d = BytesMut::new();
        put_simple_entry(&mut d, b"a");
        put_sub_batch_entry(&mut d, &sb(compression::NONE), &raw);
        put_sub_batch_entry(&mut d, &sb(compression::ZSTD), b"opaque");
        put_sub_batch_entry(&mut d, &sb(compression::GZIP), &gz);
        // A gzip batch whose declared length is wrong is skipped too.
        put_sub_batch_entry(
            &mut d,
            &SubBatch {
                uncompressed_len: 99,
                ..sb(compression::GZIP)
            },
            &gz,
        );
        put_simple_entry(&mut d, b"z");
        let d = d.freeze();
        assert_eq!(entries(d.clone()).count(), 6);
        let got: Vec<(u64, Bytes)> = Records::new(d.clone(), 10).collect();
        let want: Vec<(u64, &[u8])> = vec![
            (10, b"a"),
            (11, b"hi"),
            (12, b"!"),
            (15, b"hi"),
            (16, b"!"),
            (19, b"z"),
        ];
        assert_eq!(
            got.iter().map(|(o, b)| (*o, &b[..])).collect::<Vec<_>>(),
            want
        );
        // Cut anywhere: what parses before the cut, never a panic.
        for cut in 0..d.len() {
            let n = Records::new(d.slice(..cut), 0).count();
            assert!(n <= 6);
        }
    }
}
