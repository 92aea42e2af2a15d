//! A quorum group's snapshot data as openraft moves it between members (the
//! group's `SnapshotData`): what a leader sends a member that fell behind
//! its log, read from the snapshot kept a chunk at a time, and what that
//! member receives, written to a file a chunk at a time. A long queue's
//! snapshot (about its backlog's size) is so never held whole in memory on
//! its way; a short one is a buffer.

use std::io::{self, BufRead, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};

/// Snapshot data: a buffer, or the bytes of a file from an offset to its
/// end (the state's bytes at the end of the record kept, or a file being
/// received into).
pub enum SnapshotData {
    Memory(io::Cursor<Vec<u8>>),
    File {
        file: tokio::fs::File,
        start: u64,
        /// A seek started and not completed yet.
        seeking: bool,
        /// A file received into: removed once this is dropped.
        _temp: Option<TempPath>,
    },
}

/// A file removed when this is dropped.
pub struct TempPath(PathBuf);

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// What files received into are called in their directory.
const PART: &str = ".part";

/// Remove the files left received into by a process that stopped (called
/// at start, before any is made).
pub fn remove_parts(dir: &Path) -> io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let path = e?.path();
        if path.to_string_lossy().ends_with(PART) {
            std::fs::remove_file(path)?;
        }
    }
    Ok(())
}

impl SnapshotData {
    pub fn memory(bytes: Vec<u8>) -> SnapshotData {
        SnapshotData::Memory(io::Cursor::new(bytes))
    }

    /// The bytes of `file` from `start` to its end.
    pub fn file(file: std::fs::File, start: u64) -> SnapshotData {
        SnapshotData::File {
            file: tokio::fs::File::from_std(file),
            start,
            seeking: false,
            _temp: None,
        }
    }

    /// A new, empty file in `dir` to receive a snapshot into (a buffer when
    /// there is no directory: the simulated disk).
    pub async fn receive_into(dir: Option<&Path>) -> io::Result<SnapshotData> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let Some(dir) = dir else {
            return Ok(SnapshotData::memory(Vec::new()));
        };
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("snapshot-{n}{PART}"));
        let file = tokio::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .await?;
        Ok(SnapshotData::File {
            file,
            start: 0,
            seeking: false,
            _temp: Some(TempPath(path)),
        })
    }

    /// Every byte, from the first, to read a part at a time (blocking); a
    /// file received into is removed once the reader is dropped.
    pub async fn into_reader(self) -> io::Result<Box<dyn BufRead + Send>> {
        match self {
            SnapshotData::Memory(c) => Ok(Box::new(io::Cursor::new(c.into_inner()))),
            SnapshotData::File {
                file, start, _temp, ..
            } => {
                let mut file = file.into_std().await;
                file.seek(SeekFrom::Start(start))?;
                let file = Received { file, _temp };
                Ok(Box::new(io::BufReader::with_capacity(256 << 10, file)))
            }
        }
    }

    /// All the bytes, in memory (tests).
    #[cfg(test)]
    pub async fn bytes(self) -> io::Result<Vec<u8>> {
        let mut r = self.into_reader().await?;
        tokio::task::spawn_blocking(move || {
            let mut v = Vec::new();
            r.read_to_end(&mut v).map(|_| v)
        })
        .await
        .map_err(io::Error::other)?
    }
}

/// A file received into, read back ([`SnapshotData::into_reader`]).
struct Received {
    file: std::fs::File,
    _temp: Option<TempPath>,
}

impl Read for Received {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }
}

impl AsyncRead for SnapshotData {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SnapshotData::Memory(c) => Pin::new(c).poll_read(cx, buf),
            SnapshotData::File { file, .. } => Pin::new(file).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for SnapshotData {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            SnapshotData::Memory(c) => Pin::new(c).poll_write(cx, buf),
            SnapshotData::File { file, .. } => Pin::new(file).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SnapshotData::Memory(c) => Pin::new(c).poll_flush(cx),
            SnapshotData::File { file, .. } => Pin::new(file).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SnapshotData::Memory(c) => Pin::new(c).poll_shutdown(cx),
            SnapshotData::File { file, .. } => Pin::new(file).poll_shutdown(cx),
        }
    }
}

/// Positions count from `start` in a file.
impl AsyncSeek for SnapshotData {
    fn start_seek(self: Pin<&mut Self>, pos: SeekFrom) -> io::Result<()> {
        match self.get_mut() {
            SnapshotData::Memory(c) => Pin::new(c).start_seek(pos),
            SnapshotData::File {
                file,
                start,
                seeking,
                ..
            } => {
                *seeking = true;
                let pos = match pos {
                    SeekFrom::Start(at) => SeekFrom::Start(at.saturating_add(*start)),
                    other => other,
                };
                Pin::new(file).start_seek(pos)
            }
        }
    }

    fn poll_complete(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<u64>> {
        match self.get_mut() {
            SnapshotData::Memory(c) => Pin::new(c).poll_complete(cx),
            SnapshotData::File {
                file,
                start,
                seeking,
                ..
            } => {
                let at = std::task::ready!(Pin::new(file).poll_complete(cx))?;
                // Asked with no seek under way too (tokio's `seek` does,
                // first): where the file is, from the data's start.
                let sought = std::mem::take(seeking);
                Poll::Ready(match at.checked_sub(*start) {
                    Some(at) => Ok(at),
                    None if sought => Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        "a seek before the snapshot's data",
                    )),
                    None => Ok(0),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

    /// What openraft does with snapshot data: a leader seeks to the end
    /// for the length, then reads chunks from offsets; a member writes
    /// chunks at offsets, then reads the whole back.
    #[tokio::test]
    async fn snapshot_data_moves_a_chunk_at_a_time_from_an_offset_of_a_file() {
        let dir = std::env::temp_dir().join(format!("warren-snapdata-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("kept");
        let bytes: Vec<u8> = (0..100_000u32).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, [&b"head"[..], &bytes].concat()).unwrap();
        for mut sent in [
            SnapshotData::file(std::fs::File::open(&path).unwrap(), 4),
            SnapshotData::memory(bytes.clone()),
        ] {
            assert_eq!(sent.seek(SeekFrom::End(0)).await.unwrap(), 100_000);
            let mut received = SnapshotData::receive_into(Some(&dir)).await.unwrap();
            let mut offset = 0u64;
            loop {
                assert_eq!(sent.seek(SeekFrom::Start(offset)).await.unwrap(), offset);
                let mut chunk = vec![0u8; 30_000];
                let n = sent.read(&mut chunk).await.unwrap();
                if n == 0 {
                    break;
                }
                received.seek(SeekFrom::Start(offset)).await.unwrap();
                received.write_all(&chunk[..n]).await.unwrap();
                offset += n as u64;
            }
            received.shutdown().await.unwrap();
            assert_eq!(offset, 100_000);
            let parts = || {
                std::fs::read_dir(&dir)
                    .unwrap()
                    .filter(|e| e.as_ref().unwrap().path().to_string_lossy().ends_with(PART))
                    .count()
            };
            assert_eq!(parts(), 1, "received into a file");
            assert!(received.bytes().await.unwrap() == bytes);
            assert_eq!(parts(), 0, "removed once read");
        }
        // A seek before the data is an error, not the head's bytes.
        let mut sent = SnapshotData::file(std::fs::File::open(&path).unwrap(), 4);
        assert_eq!(sent.seek(SeekFrom::Start(0)).await.unwrap(), 0);
        let e = sent.seek(SeekFrom::Current(-2)).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        // Left behind by a crash: removed at start.
        std::fs::write(dir.join(format!("x{PART}")), b"left").unwrap();
        remove_parts(&dir).unwrap();
        assert!(!dir.join(format!("x{PART}")).exists() && path.exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
