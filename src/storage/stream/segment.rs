//! Segment and index files of one stream, and the recovery scan.
//!
//! ```text
//! <stream dir>/
//!   00000000000000000000.segment   "WSTL" u32 version, then chunks back to back
//!                                  (version 2: user chunk trailers in osiris's
//!                                  layout; 1: in the tracking layout, see chunk)
//!   00000000000000000000.index     "WSTI" u32 version, then one 64-byte record a chunk
//!                                  (version 2): the chunk's 48-byte header as
//!                                  stored, its file position u64, 8 zero bytes;
//!                                  (version 1, still read: 32 bytes: chunk id
//!                                  u64, timestamp i64, file position u64, num
//!                                  records u32, chunk type u8, 3 zero bytes)
//! ```
//! A segment is named by the id of its first chunk. Only the last segment can
//! end in a torn chunk (a segment is fsynced before the next is created), so
//! recovery reads the first and last index records of the others and scans the
//! last one chunk by chunk (checking each data CRC), truncating what does not
//! check and rewriting its index from the scan (in the current version).
//! A reader takes the headers of the chunks it sends from the index (a page
//! of it holds 64), so sending a chunk's data with `sendfile(2)` touches no
//! page of the segment in the broker.

use super::chunk::{self, u64_at, Header, HEADER_LEN};
use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub const SEGMENT_MAGIC: &[u8; 8] = b"WSTL\0\0\0\x02";
/// Segments written before user chunk trailers took osiris's layout: read
/// as they are, never appended to ([`Recovered::legacy`]).
const SEGMENT_MAGIC_V1: &[u8; 8] = b"WSTL\0\0\0\x01";
pub const INDEX_MAGIC: &[u8; 8] = b"WSTI\0\0\0\x02";
/// Indexes written before records held the whole header: read as they are.
const INDEX_MAGIC_V1: &[u8; 8] = b"WSTI\0\0\0\x01";
pub const FILE_HEADER: u64 = 8;
pub const INDEX_RECORD: u64 = 64;
const INDEX_RECORD_V1: u64 = 32;

/// One index record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexRecord {
    pub chunk_id: u64,
    pub timestamp: i64,
    pub pos: u64,
    pub num_records: u32,
    pub chunk_type: u8,
    /// The chunk's header as stored (version 2 records).
    pub raw_header: Option<[u8; HEADER_LEN]>,
}

impl IndexRecord {
    /// The record of the chunk whose stored header is `raw` at `pos`.
    pub fn encode(raw: &[u8; HEADER_LEN], pos: u64) -> [u8; INDEX_RECORD as usize] {
        let mut b = [0u8; INDEX_RECORD as usize];
        b[..HEADER_LEN].copy_from_slice(raw);
        b[HEADER_LEN..HEADER_LEN + 8].copy_from_slice(&pos.to_be_bytes());
        b
    }

    /// A record of the current version; None if `b` is short or its
    /// header is not a chunk header.
    pub fn decode(b: &[u8]) -> Option<IndexRecord> {
        let h = Header::parse(b.get(..HEADER_LEN)?)?;
        let mut raw = [0u8; HEADER_LEN];
        raw.copy_from_slice(&b[..HEADER_LEN]);
        Some(IndexRecord {
            chunk_id: h.first_offset,
            timestamp: h.timestamp,
            pos: u64_at(b, HEADER_LEN)?,
            num_records: h.num_records,
            chunk_type: h.chunk_type,
            raw_header: Some(raw),
        })
    }

    /// A version 1 record.
    fn decode_v1(b: &[u8]) -> Option<IndexRecord> {
        let b = b.get(..INDEX_RECORD_V1 as usize)?;
        Some(IndexRecord {
            chunk_id: u64_at(b, 0)?,
            timestamp: u64_at(b, 8)? as i64,
            pos: u64_at(b, 16)?,
            num_records: u32::from_be_bytes([b[24], b[25], b[26], b[27]]),
            chunk_type: b[28],
            raw_header: None,
        })
    }

    pub fn next_offset(&self) -> u64 {
        self.chunk_id + u64::from(self.num_records)
    }
}

/// An open index file of either version.
pub struct Index {
    file: File,
    record: u64,
}

impl Index {
    /// Open the index at `path` and read its version (a file shorter than
    /// its magic holds no record).
    pub fn open(path: &Path) -> io::Result<Index> {
        Index::of(File::open(path)?)
    }

    pub fn of(file: File) -> io::Result<Index> {
        let mut magic = [0u8; 8];
        let n = read_at_most(&file, &mut magic, 0)?;
        let record = if n == magic.len() && &magic == INDEX_MAGIC_V1 {
            INDEX_RECORD_V1
        } else if n < magic.len() || &magic == INDEX_MAGIC {
            INDEX_RECORD
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a stream index of a known version",
            ));
        };
        Ok(Index { file, record })
    }

    /// The number of records.
    pub fn count(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len().saturating_sub(FILE_HEADER) / self.record)
    }

    /// Record `i`.
    pub fn read(&self, i: u64) -> io::Result<IndexRecord> {
        let mut b = [0u8; INDEX_RECORD as usize];
        let b = &mut b[..self.record as usize];
        self.file.read_exact_at(b, FILE_HEADER + i * self.record)?;
        self.decode(b)
            .ok_or_else(|| io::Error::other("bad index record"))
    }

    /// Whether its records hold the chunks' headers (version 2).
    pub fn holds_headers(&self) -> bool {
        self.record == INDEX_RECORD
    }

    /// Records from `i` on, at most `max` and only of chunks below `below`
    /// (committed: their records are whole), appended to `out` (fewer at
    /// the end of the file); one `pread`. How many it appended.
    pub fn read_run(
        &self,
        i: u64,
        max: usize,
        below: u64,
        out: &mut VecDeque<IndexRecord>,
    ) -> io::Result<usize> {
        let mut buf = vec![0u8; max * self.record as usize];
        let n = read_at_most(&self.file, &mut buf, FILE_HEADER + i * self.record)?;
        let mut added = 0;
        for b in buf[..n].chunks_exact(self.record as usize) {
            match self.decode(b) {
                Some(r) if r.chunk_id < below => out.push_back(r),
                _ => break,
            }
            added += 1;
        }
        Ok(added)
    }

    fn decode(&self, b: &[u8]) -> Option<IndexRecord> {
        if self.record == INDEX_RECORD_V1 {
            IndexRecord::decode_v1(b)
        } else {
            IndexRecord::decode(b)
        }
    }

    /// The first of its `n` records for which `past` is true (records are
    /// sorted by chunk id and by timestamp); `n` if none.
    pub fn search(&self, n: u64, past: impl Fn(&IndexRecord) -> bool) -> io::Result<u64> {
        let (mut lo, mut hi) = (0u64, n);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if past(&self.read(mid)?) {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        Ok(lo)
    }
}

/// Read up to `buf.len()` bytes at `pos`; fewer at the end of the file.
pub fn read_at_most(f: &File, buf: &mut [u8], pos: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read_at(&mut buf[n..], pos + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// What the log keeps in memory about one segment (a few words, not per message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentInfo {
    /// Id of its first chunk (its name).
    pub first_offset: u64,
    /// Offset after its last chunk.
    pub next_offset: u64,
    /// Timestamps of its first and last chunks (0 when empty).
    pub first_timestamp: i64,
    pub last_timestamp: i64,
    /// File size in bytes.
    pub size: u64,
    pub chunks: u64,
    /// User records (messages).
    pub records: u64,
}

impl SegmentInfo {
    pub fn empty(first_offset: u64) -> SegmentInfo {
        SegmentInfo {
            first_offset,
            next_offset: first_offset,
            first_timestamp: 0,
            last_timestamp: 0,
            size: FILE_HEADER,
            chunks: 0,
            records: 0,
        }
    }

    /// Account for a chunk appended to this segment.
    pub fn add(&mut self, h: &Header) {
        if self.chunks == 0 {
            self.first_timestamp = h.timestamp;
        }
        self.last_timestamp = h.timestamp;
        self.chunks += 1;
        if h.chunk_type == chunk::TYPE_USER {
            self.records += u64::from(h.num_records);
        }
        self.next_offset = h.next_offset();
        self.size += h.total_len();
    }
}

pub fn segment_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.segment"))
}

pub fn index_path(dir: &Path, first: u64) -> PathBuf {
    dir.join(format!("{first:020}.index"))
}

/// The first offsets of the segments in `dir`, sorted.
pub fn list(dir: &Path) -> io::Result<Vec<u64>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let name = e?.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(n) = name.strip_suffix(".segment") {
            if let Ok(first) = n.parse::<u64>() {
                v.push(first);
            }
        }
    }
    v.sort_unstable();
    Ok(v)
}

/// Create a new segment and its index (headers written, not yet synced).
pub fn create(dir: &Path, first: u64) -> io::Result<(File, File)> {
    let open = |p: PathBuf| {
        std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(p)
    };
    let mut seg = open(segment_path(dir, first))?;
    seg.write_all(SEGMENT_MAGIC)?;
    let mut idx = open(index_path(dir, first))?;
    idx.write_all(INDEX_MAGIC)?;
    Ok((seg, idx))
}

/// The summary of a closed (not last) segment from its index's first and last
/// records; None if the index is missing, not an index, or holds no record.
pub fn summarize_closed(dir: &Path, first: u64) -> io::Result<Option<SegmentInfo>> {
    let idx = match Index::open(&index_path(dir, first)) {
        Ok(f) => f,
        // Missing, or not an index: rebuilt by a scan.
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::InvalidData
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    let n = idx.count()?;
    if n == 0 {
        return Ok(None);
    }
    let a = idx.read(0)?;
    let b = idx.read(n - 1)?;
    let size = std::fs::metadata(segment_path(dir, first))?.len();
    Ok(Some(SegmentInfo {
        first_offset: a.chunk_id,
        next_offset: b.next_offset(),
        first_timestamp: a.timestamp,
        last_timestamp: b.timestamp,
        size,
        chunks: n,
        // Not known without reading every record: the offset span (tracking
        // chunks hold no records, so this is exact).
        records: b.next_offset() - a.chunk_id,
    }))
}

/// A valid chunk found by the recovery scan.
pub struct Scanned {
    pub header: Header,
    /// The header as stored.
    pub raw_header: [u8; HEADER_LEN],
    pub pos: u64,
    /// The tracking records it carries (its trailer, or its data if a tracking chunk).
    pub tracking: Vec<chunk::Tracking>,
}

/// What the recovery scan of a segment found.
pub struct Recovered {
    pub chunks: Vec<Scanned>,
    /// A version 1 segment with chunks: new chunks go to a new segment.
    pub legacy: bool,
}

/// Scan a segment from the start, keep the valid chunks, truncate a torn or
/// corrupt tail and rewrite the index.
pub fn recover_last(dir: &Path, first: u64) -> io::Result<Recovered> {
    let path = segment_path(dir, first);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)?;
    let len = f.metadata()?.len();
    let mut magic = [0u8; 8];
    let valid_magic = len >= FILE_HEADER && {
        f.read_exact(&mut magic)?;
        &magic == SEGMENT_MAGIC || &magic == SEGMENT_MAGIC_V1
    };
    let v1 = &magic == SEGMENT_MAGIC_V1;
    let mut found = Vec::new();
    let mut pos = FILE_HEADER;
    let mut expected: Option<u64> = None;
    if valid_magic {
        let mut head = [0u8; HEADER_LEN];
        while pos + HEADER_LEN as u64 <= len {
            f.read_exact_at(&mut head, pos)?;
            let Some(h) = Header::parse(&head) else { break };
            if pos + h.total_len() > len || expected.is_some_and(|e| e != h.first_offset) {
                break;
            }
            let mut rest = vec![0u8; (h.total_len() - HEADER_LEN as u64) as usize];
            f.read_exact_at(&mut rest, pos + HEADER_LEN as u64)?;
            let data_at = usize::from(h.bloom_len);
            let data = &rest[data_at..data_at + h.data_len as usize];
            if crc32fast::hash(data) != h.crc {
                break;
            }
            let tracking = if h.chunk_type == chunk::TYPE_USER {
                let trailer = &rest[data_at + h.data_len as usize..];
                if v1 {
                    chunk::tracking(trailer)
                } else {
                    chunk::trailer(trailer, h.first_offset)
                }
            } else {
                chunk::tracking(data)
            };
            expected = Some(h.next_offset());
            found.push(Scanned {
                header: h,
                raw_header: head,
                pos,
                tracking,
            });
            pos += h.total_len();
        }
    }
    // Nothing kept: an empty segment of the current version.
    let fresh = !valid_magic || (v1 && found.is_empty());
    if fresh {
        f.set_len(0)?;
        f.write_all_at(SEGMENT_MAGIC, 0)?;
        pos = FILE_HEADER;
    }
    if pos < len || fresh {
        tracing::warn!(segment = %path.display(), kept = pos, dropped = len.saturating_sub(pos), "stream segment: truncating a torn or corrupt tail");
        f.set_len(pos)?;
        f.sync_data()?;
    }
    let mut idx = Vec::with_capacity(8 + found.len() * INDEX_RECORD as usize);
    idx.extend_from_slice(INDEX_MAGIC);
    for s in &found {
        idx.extend_from_slice(&IndexRecord::encode(&s.raw_header, s.pos));
    }
    let tmp = dir.join("index.tmp");
    {
        let mut t = File::create(&tmp)?;
        t.write_all(&idx)?;
        t.sync_data()?;
    }
    std::fs::rename(&tmp, index_path(dir, first))?;
    Ok(Recovered {
        legacy: v1 && !fresh,
        chunks: found,
    })
}
