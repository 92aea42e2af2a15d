//! Outgoing bytes of one connection: the session encodes frames into its buffer,
//! the connection task hands them in chunks to a writer task that owns the
//! socket's write half, so a slow reader never blocks the connection's read loop.
//!
//! The writer coalesces every chunk waiting in its mailbox into one `write`,
//! and counts each one in the connection's [`SocketStats`] (`send_oct`,
//! `send_cnt`: one count per coalesced write, not per frame).

use crate::broker::SocketStats;
use bytes::{Bytes, BytesMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// Chunks at most this big are copied into one buffer and written together.
const COALESCE_MAX: usize = 64 * 1024;

/// The connection task's handle on its writer task.
#[derive(Debug)]
pub struct Out {
    tx: Option<mpsc::UnboundedSender<Bytes>>,
    /// Bytes handed to the writer and not yet written to the socket.
    in_flight: Arc<AtomicUsize>,
}

impl Out {
    /// Hand a chunk of encoded frames to the writer. Returns false if it is gone.
    pub fn send(&mut self, chunk: Bytes) -> bool {
        self.in_flight.fetch_add(chunk.len(), Ordering::AcqRel);
        self.tx.as_ref().is_some_and(|tx| tx.send(chunk).is_ok())
    }

    /// Bytes the writer has not written yet (for back-pressure).
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Let the writer finish and half-close the socket (FIN).
    pub fn close(&mut self) {
        self.tx = None;
    }
}

/// Start the writer task for `sink`, counting what it writes in `stats`;
/// returns its handle and the task.
pub fn spawn<W>(sink: W, stats: Arc<SocketStats>) -> (Out, tokio::task::JoinHandle<()>)
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let task = tokio::spawn(write_loop(sink, rx, Arc::clone(&in_flight), stats));
    (
        Out {
            tx: Some(tx),
            in_flight,
        },
        task,
    )
}

async fn write_loop<W>(
    mut sink: W,
    mut rx: mpsc::UnboundedReceiver<Bytes>,
    in_flight: Arc<AtomicUsize>,
    stats: Arc<SocketStats>,
) where
    W: AsyncWrite + Unpin,
{
    // Everything waiting in the mailbox is written with one syscall: a lone chunk
    // as it is, several (up to COALESCE_MAX bytes) copied into `joined` first.
    let mut batch: Vec<Bytes> = Vec::new();
    let mut joined = BytesMut::new();
    while let Some(first) = rx.recv().await {
        let mut total = first.len();
        batch.push(first);
        while total < COALESCE_MAX && batch.len() < 256 {
            match rx.try_recv() {
                Ok(more) => {
                    total += more.len();
                    batch.push(more);
                }
                Err(_) => break,
            }
        }
        let result = if batch.len() == 1 {
            sink.write_all(&batch[0]).await
        } else {
            joined.reserve(total);
            for chunk in &batch {
                joined.extend_from_slice(chunk);
            }
            let r = sink.write_all(&joined).await;
            joined.clear();
            if joined.capacity() > 4 * COALESCE_MAX {
                joined = BytesMut::new();
            }
            r
        };
        batch.clear();
        if result.is_err() {
            return;
        }
        in_flight.fetch_sub(total, Ordering::AcqRel);
        stats.sent(total);
        if sink.flush().await.is_err() {
            return;
        }
    }
    let _ = sink.shutdown().await;
}
