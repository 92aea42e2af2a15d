//! The store's data files: append-only files holding chunk bytes (sled holds
//! only the metas that point into them). Owns one directory of files per
//! space, the live bytes of every file (in memory, rebuilt at open from the
//! metas), rolling the active file, unlinking files nothing refers to, and
//! choosing mostly dead files for copy-forward.
//!
//! Files are named `NNNNNNNNNNNNNNNN.seg` (16 hex digits, increasing, never
//! reused within a run). Only the flusher thread appends, always to the
//! *active* file, one write per group; a new run never appends to a file of
//! an earlier one (its tail may be torn), it starts a new file. Bytes are
//! never overwritten, so a location read with a stale meta is either still
//! there, byte for byte, or its file is gone.
//!
//! Rules (the flusher follows them; see group.rs and sled.rs):
//! * a durable space's write is `fdatasync`ed (and a new file's directory
//!   entry synced) before the sled batch whose metas point at it is applied;
//! * a file other than the active one whose live bytes reach 0 is unlinked
//!   only by [`DataFiles::reclaim`], which the flusher calls after the sled
//!   flush that removed the last reference is durable; the active file is let
//!   go the same way once nothing in it is live and it holds at least
//!   [`EARLY_ROLL_BYTES`];
//! * the ephemeral space (pages of non-durable queues) is emptied at open and
//!   never synced.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use parking_lot::Mutex;

use super::segment::Loc;
use super::StorageError;

/// The active file is rolled when a write would take it past this size.
/// 64 MiB: large enough that a roll (a file creation and a directory sync)
/// is rare next to the fsyncs of groups, small enough that the dead bytes the
/// active file can hold after a queue is drained stay inside the disk target.
pub const DEFAULT_FILE_BYTES: u64 = 64 << 20;
/// The active file is let go (and unlinked) once nothing in it is live and it
/// holds at least this much: a drained store gives its space back without
/// waiting for a roll, and a queue that keeps up does not create a file per group.
pub const EARLY_ROLL_BYTES: u64 = 4 << 20;
/// A file whose live bytes are less than 1/GC_RATIO of its size is copied forward.
const GC_RATIO: u64 = 2;

/// One directory of data files.
pub(super) struct DataFiles {
    dir: PathBuf,
    /// Sync writes (durable space) or not (ephemeral).
    durable: bool,
    roll_bytes: u64,
    inner: Mutex<Inner>,
    /// The copy-forward pass in progress (used by the flusher only).
    pub(super) gc: Mutex<Option<GcPass>>,
    /// Chunk bytes copied forward so far (for logs and tests).
    pub(super) copied: AtomicU64,
}

/// Files picked for copy-forward and how far through the metas the pass is.
pub(super) struct GcPass {
    pub(super) victims: BTreeSet<u64>,
    /// The next meta key to look at.
    pub(super) cursor: Vec<u8>,
}

#[derive(Default)]
struct Inner {
    files: BTreeMap<u64, FileState>,
    active: Option<u64>,
    next: u64,
}

struct FileState {
    file: Arc<File>,
    /// Bytes in the file (written, torn or dead included).
    size: u64,
    /// Bytes of chunks a meta points at.
    live: u64,
}

/// What [`DataFiles::reclaim`] unlinked.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Reclaimed {
    pub(super) files: usize,
    pub(super) bytes: u64,
}

fn file_name(n: u64) -> String {
    format!("{n:016x}.seg")
}

fn parse_name(name: &str) -> Option<u64> {
    let hex = name.strip_suffix(".seg")?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

fn with_path(path: &Path, e: io::Error) -> StorageError {
    StorageError::Io(::sled::Error::Io(io::Error::new(
        e.kind(),
        format!("{}: {e}", path.display()),
    )))
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

impl DataFiles {
    /// Opens the files in `dir` (created if needed); `wipe` deletes them all
    /// first (the ephemeral space). Live bytes start at 0: call
    /// [`DataFiles::recover`] with the metas' locations.
    pub(super) fn open(
        dir: &Path,
        durable: bool,
        roll_bytes: u64,
        wipe: bool,
    ) -> io::Result<DataFiles> {
        if wipe && dir.exists() {
            std::fs::remove_dir_all(dir)?;
        }
        std::fs::create_dir_all(dir)?;
        let mut inner = Inner {
            next: 1,
            ..Inner::default()
        };
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let Some(n) = entry.file_name().to_str().and_then(parse_name) else {
                continue;
            };
            let file = OpenOptions::new().read(true).open(entry.path())?;
            let size = file.metadata()?.len();
            inner.next = inner.next.max(n + 1);
            inner.files.insert(
                n,
                FileState {
                    file: Arc::new(file),
                    size,
                    live: 0,
                },
            );
        }
        Ok(DataFiles {
            dir: dir.to_owned(),
            durable,
            roll_bytes: roll_bytes.max(1),
            inner: Mutex::new(inner),
            gc: Mutex::new(None),
            copied: AtomicU64::new(0),
        })
    }

    pub(super) fn path_of(&self, file: u64) -> PathBuf {
        self.dir.join(file_name(file))
    }

    /// Startup: `live` is, per file, the bytes of the chunks the metas point
    /// at. A location outside its file is corruption; files nothing points at
    /// (every chunk settled, or only bytes of a group that never reached
    /// sled) are unlinked. Returns the bytes found dead.
    pub(super) fn recover(&self, live: &BTreeMap<u64, u64>) -> Result<u64, StorageError> {
        let mut inner = self.inner.lock();
        for (&n, &bytes) in live {
            match inner.files.get_mut(&n) {
                Some(f) if bytes <= f.size => f.live = bytes,
                Some(f) => {
                    return Err(StorageError::Corrupt {
                        path: self.path_of(n),
                        detail: format!(
                            "chunk metas point at {bytes} bytes of a {} byte data file",
                            f.size
                        ),
                    })
                }
                None => {
                    return Err(StorageError::Corrupt {
                        path: self.path_of(n),
                        detail: "chunk metas point into this data file, which is missing".into(),
                    })
                }
            }
        }
        let dead: u64 = inner.files.values().map(|f| f.size - f.live).sum();
        let empty: Vec<u64> = inner
            .files
            .iter()
            .filter(|(_, f)| f.live == 0)
            .map(|(n, _)| *n)
            .collect();
        for n in empty {
            inner.files.remove(&n);
            let path = self.path_of(n);
            std::fs::remove_file(&path).map_err(|e| with_path(&path, e))?;
        }
        Ok(dead)
    }

    /// Appends `buf` to the active file (rolling to a new one if it would pass
    /// the roll size), synced if the space is durable; returns the file and
    /// the offset of `buf`, whose bytes count as live.
    pub(super) fn append(&self, buf: &[u8]) -> Result<(u64, u64), StorageError> {
        let len = buf.len() as u64;
        let (n, file, offset, created) = {
            let mut inner = self.inner.lock();
            let roll = match inner.active.and_then(|a| inner.files.get(&a)) {
                Some(f) => f.size > 0 && f.size + len > self.roll_bytes,
                None => true,
            };
            let mut created = false;
            if roll {
                let n = inner.next;
                let path = self.path_of(n);
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .map_err(|e| with_path(&path, e))?;
                inner.next = n + 1;
                inner.active = Some(n);
                inner.files.insert(
                    n,
                    FileState {
                        file: Arc::new(file),
                        size: 0,
                        live: 0,
                    },
                );
                created = true;
            }
            let n = inner
                .active
                .ok_or_else(|| with_path(&self.dir, io::Error::other("no active data file")))?;
            let f = inner
                .files
                .get_mut(&n)
                .ok_or_else(|| with_path(&self.dir, io::Error::other("active file vanished")))?;
            let offset = f.size;
            // Counted now: only this thread appends, and readers only reach
            // these bytes through metas applied after this call returns.
            f.size += len;
            f.live += len;
            (n, f.file.clone(), offset, created)
        };
        let path = || self.path_of(n);
        file.write_all_at(buf, offset)
            .map_err(|e| with_path(&path(), e))?;
        if self.durable {
            file.sync_data().map_err(|e| with_path(&path(), e))?;
            if created {
                sync_dir(&self.dir).map_err(|e| with_path(&self.dir, e))?;
            }
        }
        Ok((n, offset))
    }

    /// The chunk at `loc`, its CRC checked; `None` if its file is gone (the
    /// chunk was deleted or moved since its meta was read).
    pub(super) fn read(&self, loc: Loc) -> Result<Option<Vec<u8>>, StorageError> {
        let Some(file) = self
            .inner
            .lock()
            .files
            .get(&loc.file)
            .map(|f| f.file.clone())
        else {
            return Ok(None);
        };
        let path = || self.path_of(loc.file);
        let mut buf = vec![0u8; loc.len as usize];
        file.read_exact_at(&mut buf, loc.offset).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                StorageError::Corrupt {
                    path: path(),
                    detail: format!(
                        "chunk of {} bytes at offset {} runs past the end of the file",
                        loc.len, loc.offset
                    ),
                }
            } else {
                with_path(&path(), e)
            }
        })?;
        let crc = crc32fast::hash(&buf);
        if crc != loc.crc {
            return Err(StorageError::Corrupt {
                path: path(),
                detail: format!(
                    "CRC mismatch in the chunk of {} bytes at offset {}: stored {:08x}, read {crc:08x}",
                    loc.len, loc.offset, loc.crc
                ),
            });
        }
        Ok(Some(buf))
    }

    /// The chunk at `loc` is no longer referenced (once the batch saying so
    /// is applied): its bytes are dead.
    pub(super) fn free(&self, loc: Loc) {
        if let Some(f) = self.inner.lock().files.get_mut(&loc.file) {
            f.live = f.live.saturating_sub(u64::from(loc.len));
        }
    }

    /// Unlinks every file with nothing live (the active one only past
    /// [`EARLY_ROLL_BYTES`]). Call only once the sled state that stopped
    /// pointing at them is durable.
    pub(super) fn reclaim(&self) -> Result<Reclaimed, StorageError> {
        let mut out = Reclaimed::default();
        let mut inner = self.inner.lock();
        let active = inner.active;
        let empty: Vec<u64> = inner
            .files
            .iter()
            .filter(|(n, f)| f.live == 0 && (Some(**n) != active || f.size >= EARLY_ROLL_BYTES))
            .map(|(n, _)| *n)
            .collect();
        for n in empty {
            if let Some(f) = inner.files.remove(&n) {
                out.files += 1;
                out.bytes += f.size;
            }
            if active == Some(n) {
                inner.active = None;
            }
            let path = self.path_of(n);
            std::fs::remove_file(&path).map_err(|e| with_path(&path, e))?;
        }
        Ok(out)
    }

    /// Files (not the active one) with something live but less than
    /// 1/GC_RATIO of their bytes: their live chunks are worth copying forward.
    pub(super) fn victims(&self) -> BTreeSet<u64> {
        let inner = self.inner.lock();
        inner
            .files
            .iter()
            .filter(|(n, f)| Some(**n) != inner.active && f.live > 0 && f.live * GC_RATIO < f.size)
            .map(|(n, _)| *n)
            .collect()
    }

    /// Bytes in all files.
    pub(super) fn size_on_disk(&self) -> u64 {
        self.inner.lock().files.values().map(|f| f.size).sum()
    }

    /// (file, size, live) of every file, for tests and logs.
    #[cfg(test)]
    pub(super) fn summary(&self) -> Vec<(u64, u64, u64)> {
        self.inner
            .lock()
            .files
            .iter()
            .map(|(n, f)| (*n, f.size, f.live))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!(
            "warren-files-{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        let _ = std::fs::remove_dir_all(&p);
        p
    }

    fn loc(files: &DataFiles, buf: &[u8]) -> Loc {
        let (file, offset) = files.append(buf).unwrap();
        Loc {
            file,
            offset,
            len: buf.len() as u32,
            crc: crc32fast::hash(buf),
        }
    }

    #[test]
    fn roll_read_free_reclaim() {
        let dir = temp("roll");
        let files = DataFiles::open(&dir, true, 100, false).unwrap();
        let a = loc(&files, &[1u8; 60]);
        let b = loc(&files, &[2u8; 60]); // would pass 100: new file
        let c = loc(&files, &[3u8; 30]);
        assert_eq!((a.file, b.file, c.file), (1, 2, 2));
        assert_eq!((b.offset, c.offset), (0, 60));
        assert_eq!(files.read(c).unwrap().unwrap(), vec![3u8; 30]);
        // One big write goes to a fresh file whole.
        let d = loc(&files, &[4u8; 500]);
        assert_eq!((d.file, d.offset), (3, 0));
        assert_eq!(
            files.summary(),
            vec![(1, 60, 60), (2, 90, 90), (3, 500, 500)]
        );

        files.free(b);
        assert_eq!(files.reclaim().unwrap(), Reclaimed::default(), "c is live");
        assert_eq!(files.victims(), BTreeSet::from([2]), "30 of 90 live");
        files.free(a);
        files.free(c);
        let r = files.reclaim().unwrap();
        assert_eq!((r.files, r.bytes), (2, 150));
        assert!(!files.path_of(1).exists() && !files.path_of(2).exists());
        assert_eq!(
            files.read(a).unwrap(),
            None,
            "file gone: chunk moved or deleted"
        );
        // The active file stays while small, even with nothing live.
        files.free(d);
        assert_eq!(files.reclaim().unwrap(), Reclaimed::default());
        assert!(files.path_of(3).exists());
        drop(files);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn crc_mismatch_and_short_file_are_errors() {
        let dir = temp("crc");
        let files = DataFiles::open(&dir, true, 1 << 20, false).unwrap();
        let a = loc(&files, b"hello chunk");
        let bad = Loc {
            crc: a.crc ^ 1,
            ..a
        };
        let err = files.read(bad).unwrap_err();
        assert!(matches!(err, StorageError::Corrupt { .. }), "{err:?}");
        assert!(err.to_string().contains("CRC mismatch"), "{err}");
        let past = Loc { len: 100, ..a };
        let err = files.read(past).unwrap_err();
        assert!(err.to_string().contains("past the end"), "{err}");
        drop(files);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn recovery_counts_dead_bytes_and_a_torn_tail() {
        let dir = temp("recover");
        let (a, b) = {
            let files = DataFiles::open(&dir, true, 1 << 20, false).unwrap();
            let a = loc(&files, &[1u8; 40]);
            let b = loc(&files, &[2u8; 40]);
            (a, b)
        };
        // A group whose write was torn by a crash: bytes nobody points at.
        {
            let f = OpenOptions::new()
                .append(true)
                .open(dir.join(file_name(1)))
                .unwrap();
            f.write_all_at(&[9u8; 13], 80).unwrap();
        }
        // An older file nothing points at any more, and a stray file.
        std::fs::write(dir.join(file_name(7)), b"old").unwrap();
        std::fs::write(dir.join("notes.txt"), b"x").unwrap();
        let files = DataFiles::open(&dir, true, 1 << 20, false).unwrap();
        let dead = files
            .recover(&BTreeMap::from([(1, u64::from(b.len))]))
            .unwrap();
        assert_eq!(dead, 40 + 13 + 3);
        assert!(
            !dir.join(file_name(7)).exists(),
            "unreferenced file unlinked"
        );
        assert!(dir.join("notes.txt").exists(), "not ours: left alone");
        assert_eq!(files.read(b).unwrap().unwrap(), vec![2u8; 40]);
        assert_eq!(
            files.read(a).unwrap().unwrap(),
            vec![1u8; 40],
            "dead but intact"
        );
        // A new run never appends after a possibly torn tail.
        let c = loc(&files, b"next");
        assert_eq!((c.file, c.offset), (8, 0));
        // Metas pointing past a file's end are corruption.
        let again = DataFiles::open(&dir, true, 1 << 20, false).unwrap();
        assert!(matches!(
            again.recover(&BTreeMap::from([(8, 1000)])),
            Err(StorageError::Corrupt { .. })
        ));
        assert!(matches!(
            again.recover(&BTreeMap::from([(99, 1)])),
            Err(StorageError::Corrupt { .. })
        ));
        drop((files, again));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn wipe_empties_the_ephemeral_space() {
        let dir = temp("wipe");
        {
            let files = DataFiles::open(&dir, false, 1 << 20, false).unwrap();
            loc(&files, b"page");
        }
        let files = DataFiles::open(&dir, false, 1 << 20, true).unwrap();
        assert!(files.summary().is_empty());
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
