//! Large values of the quorum groups' store, kept out of sled: append-only
//! files `<data_dir>/quorum-values/NNNNNNNNNNNNNNNN.val` that every group of
//! the node shares, with a small pointer in the group's sled tree in place
//! of the value (`super::disk`, `Disk::Shared`).
//!
//! Why: sled keeps values inside its tree nodes and rewrites a whole node
//! when it consolidates it, so log entries that carry message bodies were
//! written many times over (measured: 5-8x the bytes published with 4 KiB
//! messages, and 1 MiB messages stalled). Here a value is written once; the
//! log entry's removal (purge, truncation) drops only its pointer, and a
//! file is deleted once no pointer names it ([`ValueLog::collect`]).
//!
//! Durability: [`ValueLog::put`] writes and the caller [`ValueLog::sync`]s
//! BEFORE the pointers go into sled, so a pointer that reached the disk
//! (sled may write before it is asked to flush) always names bytes that did.
//! Each value carries a CRC-32 in its pointer; a value that does not read
//! back whole is an error, never wrong bytes.

use parking_lot::Mutex;
use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Values longer than this go to the files; shorter ones stay in sled
/// (votes, commit indexes, settlements, small batches).
pub const INLINE_MAX: usize = 4096;

/// A file is closed to new values once it holds this many bytes.
pub const ROLL_AT: u64 = 64 << 20;

/// A value this long (a long queue's snapshot) gets a file of its own,
/// written outside the writer's lock and made durable as it is written, in
/// steps of [`SYNC_STEP`]: in the shared file, the next sync of the logs
/// would have had to write all of it first (a 1 GB snapshot held every
/// group's appends for seconds, long enough to lose leaderships).
pub const OWN_FILE_AT: usize = 8 << 20;
const SYNC_STEP: usize = 16 << 20;

/// First byte of a pointer. The store's own values start with the codec's
/// marker (0xc1) or an ASCII byte (JSON).
const TAG: u8 = 0xfe;
const POINTER_LEN: usize = 1 + 8 + 8 + 4 + 4;

/// Where a value is: file, offset, length, CRC-32 of the bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pointer {
    pub file: u64,
    pub offset: u64,
    pub len: u32,
    pub crc: u32,
}

impl Pointer {
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(POINTER_LEN);
        v.push(TAG);
        v.extend_from_slice(&self.file.to_be_bytes());
        v.extend_from_slice(&self.offset.to_be_bytes());
        v.extend_from_slice(&self.len.to_be_bytes());
        v.extend_from_slice(&self.crc.to_be_bytes());
        v
    }

    /// The pointer `v` is, when it is one (a stored value otherwise).
    pub fn decode(v: &[u8]) -> Option<Pointer> {
        if v.len() != POINTER_LEN || v[0] != TAG {
            return None;
        }
        let u64_at = |i: usize| u64::from_be_bytes(v[i..i + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |i: usize| u32::from_be_bytes(v[i..i + 4].try_into().unwrap_or([0; 4]));
        Some(Pointer {
            file: u64_at(1),
            offset: u64_at(9),
            len: u32_at(17),
            crc: u32_at(21),
        })
    }
}

struct Writer {
    id: u64,
    file: Arc<File>,
    len: u64,
    /// Files written to since the last sync (the current one included).
    dirty: Vec<Arc<File>>,
}

/// The node's value files.
pub struct ValueLog {
    dir: PathBuf,
    writer: Mutex<Writer>,
    /// Open files by id, for reads.
    readers: Mutex<HashMap<u64, Arc<File>>>,
    /// Held through a whole [`Self::sync`]: a sync that finds nothing left
    /// to sync returns only once the one under way (which took its writes)
    /// is done.
    syncing: Mutex<()>,
    /// Held (shared) by a write from its `put` until its pointers are in
    /// sled, and (exclusive) by [`Self::collect`] while it notes the
    /// current file: a pointer not yet in sled is always in a file that
    /// collection leaves alone.
    pub(crate) writes: parking_lot::RwLock<()>,
    /// Files no pointer named at the last collection: deleted if none names
    /// them at the next one either (a reader that took a pointer before the
    /// first has long finished by then).
    unreferenced: Mutex<BTreeSet<u64>>,
    /// Files of their own whose pointers are not in sled yet
    /// ([`Self::put_alone`]): never collected.
    landing: Mutex<BTreeSet<u64>>,
}

/// A file of its own on its way ([`ValueLog::put_alone`]): collection
/// leaves it alone until this is dropped.
pub struct Landing<'a> {
    log: &'a ValueLog,
    id: u64,
}

impl Drop for Landing<'_> {
    fn drop(&mut self) {
        self.log.landing.lock().remove(&self.id);
    }
}

/// How much a streamed value is written or read at a time.
const STREAM_BLOCK: usize = 1 << 20;

fn damaged(p: &Pointer) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("value at {}:{} fails its checksum", p.file, p.offset),
    )
}

/// A value on its way to a file of its own, written a part at a time
/// ([`ValueLog::stream_alone`]): buffered a block at a time, synced every
/// [`SYNC_STEP`] as [`ValueLog::put_alone`] is, its CRC-32 computed as it
/// goes. Dropped unfinished, its file is collected like any unnamed one.
pub struct AloneWriter<'a> {
    file: Arc<File>,
    id: u64,
    /// Bytes left at the start for [`Self::finish`].
    head_len: u64,
    /// Where the next block goes; how far the file is synced.
    at: u64,
    synced: u64,
    buf: Vec<u8>,
    /// Of what was written after the head.
    crc: crc32fast::Hasher,
    landing: Landing<'a>,
}

impl AloneWriter<'_> {
    /// Bytes written after the head so far.
    pub fn written(&self) -> u64 {
        self.at - self.head_len + self.buf.len() as u64
    }

    fn write_block(&mut self, b: &[u8]) -> io::Result<()> {
        self.file.write_all_at(b, self.at)?;
        self.crc.update(b);
        self.at += b.len() as u64;
        if self.at - self.synced >= SYNC_STEP as u64 {
            self.file.sync_data()?;
            self.synced = self.at;
        }
        Ok(())
    }

    fn spill(&mut self) -> io::Result<()> {
        let buf = std::mem::take(&mut self.buf);
        let done = self.write_block(&buf);
        self.buf = buf;
        self.buf.clear();
        done
    }
}

impl<'a> AloneWriter<'a> {
    /// Write the head (`head_len` bytes, now that the rest is known) and
    /// make the value durable; its pointer, and the [`Landing`] to drop
    /// once the pointer is in sled.
    pub fn finish(mut self, head: &[u8]) -> io::Result<(Pointer, Landing<'a>)> {
        if head.len() as u64 != self.head_len {
            let e = format!("a head of {} bytes for {}", head.len(), self.head_len);
            return Err(io::Error::other(e));
        }
        self.spill()?;
        self.file.write_all_at(head, 0)?;
        self.file.sync_data()?;
        let len = u32::try_from(self.at).map_err(|_| io::Error::other("value over 4 GiB"))?;
        let mut crc = crc32fast::Hasher::new();
        crc.update(head);
        crc.combine(&self.crc);
        let p = Pointer {
            file: self.id,
            offset: 0,
            len,
            crc: crc.finalize(),
        };
        Ok((p, self.landing))
    }
}

impl io::Write for AloneWriter<'_> {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        if self.buf.len() + b.len() < STREAM_BLOCK {
            self.buf.extend_from_slice(b);
            return Ok(b.len());
        }
        self.spill()?;
        if b.len() >= STREAM_BLOCK {
            // Synced every step as it goes, not once at the end.
            for step in b.chunks(SYNC_STEP) {
                self.write_block(step)?;
            }
        } else {
            self.buf.extend_from_slice(b);
        }
        Ok(b.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A value read a part at a time ([`ValueLog::reader`]).
pub struct ValueReader {
    file: Arc<File>,
    at: u64,
    end: u64,
}

impl io::Read for ValueReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = (self.end - self.at).min(buf.len() as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        let got = self.file.read_at(&mut buf[..n], self.at)?;
        if got == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        self.at += got as u64;
        Ok(got)
    }
}

fn file_name(id: u64) -> String {
    format!("{id:016}.val")
}

fn file_ids(dir: &Path) -> io::Result<Vec<u64>> {
    let mut ids = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let name = e?.file_name();
        let name = name.to_string_lossy();
        if let Some(id) = name.strip_suffix(".val").and_then(|n| n.parse().ok()) {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

fn create(dir: &Path, id: u64) -> io::Result<Arc<File>> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(dir.join(file_name(id)))?;
    // The new file's name must survive a crash with the bytes in it.
    File::open(dir)?.sync_all()?;
    Ok(Arc::new(f))
}

impl ValueLog {
    /// Open `dir` (created if missing); new values go to a new file.
    pub fn open(dir: &Path) -> io::Result<Arc<ValueLog>> {
        std::fs::create_dir_all(dir)?;
        let id = file_ids(dir)?.last().map_or(0, |l| l + 1);
        let file = create(dir, id)?;
        Ok(Arc::new(ValueLog {
            dir: dir.to_path_buf(),
            writer: Mutex::new(Writer {
                id,
                file,
                len: 0,
                dirty: Vec::new(),
            }),
            readers: Mutex::new(HashMap::new()),
            syncing: Mutex::new(()),
            writes: parking_lot::RwLock::new(()),
            unreferenced: Mutex::new(BTreeSet::new()),
            landing: Mutex::new(BTreeSet::new()),
        }))
    }

    /// Append `v`; its pointer. Durable once [`Self::sync`] returns.
    pub fn put(&self, v: &[u8]) -> io::Result<Pointer> {
        let len = u32::try_from(v.len()).map_err(|_| io::Error::other("value over 4 GiB"))?;
        let mut w = self.writer.lock();
        if w.len > 0 && w.len + v.len() as u64 > ROLL_AT {
            let next = w.id + 1;
            let file = create(&self.dir, next)?;
            w.id = next;
            w.file = file;
            w.len = 0;
        }
        w.file.write_all_at(v, w.len)?;
        let p = Pointer {
            file: w.id,
            offset: w.len,
            len,
            crc: crc32fast::hash(v),
        };
        w.len += v.len() as u64;
        if !w.dirty.iter().any(|f| Arc::ptr_eq(f, &w.file)) {
            let f = Arc::clone(&w.file);
            w.dirty.push(f);
        }
        Ok(p)
    }

    /// Write `v` (of [`OWN_FILE_AT`] bytes or more) to a file of its own
    /// (the next id; new values go to the one after it), durable when this
    /// returns. Called without [`Self::writes`] (it can take seconds, and a
    /// collection waiting for that lock would hold every other write):
    /// collection leaves the file alone while the [`Landing`] lives, which
    /// the caller drops once the pointer is in sled.
    pub fn put_alone(&self, v: &[u8]) -> io::Result<(Pointer, Landing<'_>)> {
        let mut w = self.stream_alone(0)?;
        w.write_all(v)?;
        w.finish(&[])
    }

    /// [`Self::put_alone`] for a value written a part at a time through the
    /// [`AloneWriter`] returned (a long queue's snapshot, encoded as it is
    /// written): its first `head_len` bytes are left for
    /// [`AloneWriter::finish`], which takes them once the rest is written.
    pub fn stream_alone(&self, head_len: usize) -> io::Result<AloneWriter<'_>> {
        let id = {
            let mut w = self.writer.lock();
            let id = w.id + 1;
            let file = create(&self.dir, id + 1)?;
            w.id = id + 1;
            w.file = file;
            w.len = 0;
            self.landing.lock().insert(id);
            id
        };
        let landing = Landing { log: self, id };
        let file = create(&self.dir, id)?;
        Ok(AloneWriter {
            file,
            id,
            head_len: head_len as u64,
            at: head_len as u64,
            synced: 0,
            buf: Vec::new(),
            crc: crc32fast::Hasher::new(),
            landing,
        })
    }

    /// Make every value put so far durable.
    pub fn sync(&self) -> io::Result<()> {
        let _one_at_a_time = self.syncing.lock();
        let dirty = std::mem::take(&mut self.writer.lock().dirty);
        for f in dirty {
            f.sync_data()?;
        }
        Ok(())
    }

    /// The value `p` points at.
    pub fn get(&self, p: &Pointer) -> io::Result<Vec<u8>> {
        let file = self.file(p.file)?;
        let mut buf = vec![0u8; p.len as usize];
        file.read_exact_at(&mut buf, p.offset)?;
        if crc32fast::hash(&buf) != p.crc {
            return Err(damaged(p));
        }
        Ok(buf)
    }

    /// The value `p` points at, to read a part at a time (a long queue's
    /// snapshot): when `checked`, checked against its CRC first, read
    /// through once a block at a time, so that what the reader gives is
    /// what was written.
    pub fn reader(&self, p: &Pointer, checked: bool) -> io::Result<ValueReader> {
        let file = self.file(p.file)?;
        let region = |file| ValueReader {
            file,
            at: p.offset,
            end: p.offset + u64::from(p.len),
        };
        if !checked {
            return Ok(region(file));
        }
        let mut check = region(Arc::clone(&file));
        let mut crc = crc32fast::Hasher::new();
        let mut block = vec![0u8; STREAM_BLOCK];
        loop {
            let n = check.read(&mut block)?;
            if n == 0 {
                break;
            }
            crc.update(&block[..n]);
        }
        if crc.finalize() != p.crc {
            return Err(damaged(p));
        }
        Ok(region(file))
    }

    /// The file of its own `p` points at, when it is one (a long queue's
    /// snapshot, [`Self::put_alone`]), checked against its CRC as
    /// [`Self::reader`] does: a handle of the caller's, at the start.
    pub fn file_alone(&self, p: &Pointer) -> io::Result<Option<File>> {
        let file = File::open(self.dir.join(file_name(p.file)))?;
        if p.offset != 0 || file.metadata()?.len() != u64::from(p.len) {
            return Ok(None);
        }
        // The check reads it through once; the reader itself is not needed.
        self.reader(p, true)?;
        Ok(Some(file))
    }

    /// Where the files are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Value file `id`, opened once for reads.
    fn file(&self, id: u64) -> io::Result<Arc<File>> {
        let mut readers = self.readers.lock();
        if let Some(f) = readers.get(&id) {
            return Ok(Arc::clone(f));
        }
        let f = Arc::new(File::open(self.dir.join(file_name(id)))?);
        readers.insert(id, Arc::clone(&f));
        Ok(f)
    }

    /// The file new values go to now, noted with no write half-way (see
    /// [`Self::writes`]).
    pub fn current(&self) -> u64 {
        let _quiet = self.writes.write();
        self.writer.lock().id
    }

    /// Delete the files before `current` (from [`Self::current`], taken
    /// before the pointers were listed) that no pointer in `live` names,
    /// now and at the previous collection; the number deleted.
    pub fn collect(&self, current: u64, live: &BTreeSet<u64>) -> io::Result<usize> {
        let idle: BTreeSet<u64> = file_ids(&self.dir)?
            .into_iter()
            .filter(|id| *id < current && !live.contains(id))
            .collect();
        let idle: BTreeSet<u64> = idle.difference(&self.landing.lock()).copied().collect();
        let mut unreferenced = self.unreferenced.lock();
        let mut deleted = 0;
        for id in idle.intersection(&unreferenced) {
            match std::fs::remove_file(self.dir.join(file_name(*id))) {
                Ok(()) => deleted += 1,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            self.readers.lock().remove(id);
        }
        *unreferenced = idle;
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("warren-values-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn values_read_back_and_damage_is_an_error() {
        let d = dir("rw");
        let log = ValueLog::open(&d).unwrap();
        let a = log.put(&[7u8; 5000]).unwrap();
        let b = log.put(b"second").unwrap();
        log.sync().unwrap();
        assert_eq!(log.get(&a).unwrap(), vec![7u8; 5000]);
        assert_eq!(log.get(&b).unwrap(), b"second");
        assert_eq!((b.file, b.offset), (a.file, 5000));
        let enc = b.encode();
        assert_eq!(Pointer::decode(&enc), Some(b));
        assert_eq!(Pointer::decode(&enc[1..]), None);
        assert_eq!(Pointer::decode(&[0xc1; POINTER_LEN]), None);
        // A flipped byte, a value past the end: errors.
        let bad = Pointer {
            crc: b.crc ^ 1,
            ..b
        };
        assert_eq!(
            log.get(&bad).unwrap_err().kind(),
            io::ErrorKind::InvalidData
        );
        let past = Pointer {
            offset: 1 << 30,
            ..b
        };
        assert!(log.get(&past).is_err());
        // Reopened: the values are there, new ones go to a new file.
        drop(log);
        let log = ValueLog::open(&d).unwrap();
        assert_eq!(log.get(&a).unwrap(), vec![7u8; 5000]);
        let c = log.put(b"third").unwrap();
        assert_eq!(c.file, a.file + 1);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn files_roll_and_unreferenced_ones_go_at_the_second_collection() {
        let d = dir("gc");
        let log = ValueLog::open(&d).unwrap();
        // The largest values that share files: a file holds `per_file`.
        let big = vec![1u8; OWN_FILE_AT - 1];
        let per_file = (ROLL_AT / big.len() as u64) as usize;
        let p0 = log.put(&big).unwrap();
        for _ in 1..per_file {
            assert_eq!(log.put(&big).unwrap().file, 0);
        }
        let p1 = log.put(&big).unwrap();
        let p2 = log.put(b"small").unwrap();
        assert_eq!((p0.file, p1.file, p2.file), (0, 1, 1), "rolled when full");
        log.sync().unwrap();
        let current = log.current();
        assert_eq!(current, 1);
        // File 0 is named by nothing: kept at the first collection, gone at
        // the second; the current file is never collected.
        assert_eq!(log.collect(current, &BTreeSet::new()).unwrap(), 0);
        assert!(log.get(&p0).is_ok());
        assert_eq!(log.collect(current, &BTreeSet::new()).unwrap(), 1);
        assert!(!d.join(file_name(0)).exists());
        assert!(log.get(&p1).is_ok());
        // A file named again in between is kept.
        for _ in 1..per_file {
            assert_eq!(log.put(&big).unwrap().file, 1);
        }
        let p3 = log.put(&big).unwrap();
        assert_eq!(p3.file, 2);
        let current = log.current();
        assert_eq!(log.collect(current, &BTreeSet::new()).unwrap(), 0);
        assert_eq!(log.collect(current, &BTreeSet::from([1])).unwrap(), 0);
        assert!(log.get(&p1).is_ok());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_large_value_gets_a_file_of_its_own() {
        let d = dir("alone");
        let log = ValueLog::open(&d).unwrap();
        let a = log.put(b"before").unwrap();
        let big: Vec<u8> = (0..OWN_FILE_AT + SYNC_STEP + 3).map(|i| i as u8).collect();
        let (b, landing) = log.put_alone(&big).unwrap();
        let c = log.put(b"after").unwrap();
        assert_eq!((a.file, b.file, b.offset, c.file), (0, 1, 0, 2));
        assert_eq!(
            std::fs::metadata(d.join(file_name(1))).unwrap().len(),
            big.len() as u64
        );
        log.sync().unwrap();
        assert_eq!(log.get(&b).unwrap(), big);
        assert_eq!(log.get(&a).unwrap(), b"before");
        assert_eq!(log.get(&c).unwrap(), b"after");
        // Never collected while it lands; once no pointer names it, it
        // goes like any other file.
        let current = log.current();
        assert_eq!(log.collect(current, &BTreeSet::from([0])).unwrap(), 0);
        assert_eq!(log.collect(current, &BTreeSet::from([0])).unwrap(), 0);
        assert!(log.get(&b).is_ok());
        drop(landing);
        assert_eq!(log.collect(current, &BTreeSet::from([0])).unwrap(), 0);
        assert_eq!(log.collect(current, &BTreeSet::from([0])).unwrap(), 1);
        assert!(log.get(&b).is_err());
        assert!(log.get(&a).is_ok());
        // Written a part at a time, its head last: the same as put whole,
        // read back whole or a part at a time; damage is an error before
        // anything is read.
        let mut w = log.stream_alone(4).unwrap();
        for part in big[4..].chunks(STREAM_BLOCK / 3 + 1) {
            w.write_all(part).unwrap();
        }
        assert_eq!(w.written(), (big.len() - 4) as u64);
        let (s, landing) = w.finish(&big[..4]).unwrap();
        drop(landing);
        assert_eq!((s.len, s.crc, s.offset), (b.len, b.crc, 0));
        assert_eq!(log.get(&s).unwrap(), big);
        let mut read = Vec::new();
        log.reader(&s, true)
            .unwrap()
            .read_to_end(&mut read)
            .unwrap();
        assert!(read == big);
        let f = OpenOptions::new()
            .write(true)
            .open(d.join(file_name(s.file)))
            .unwrap();
        f.write_all_at(&[big[SYNC_STEP + 1] ^ 1], SYNC_STEP as u64 + 1)
            .unwrap();
        assert_eq!(
            log.reader(&s, true).err().map(|e| e.kind()),
            Some(io::ErrorKind::InvalidData)
        );
        let _ = std::fs::remove_dir_all(&d);
    }
}
