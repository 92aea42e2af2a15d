//! Outgoing bytes of one connection: frames are encoded into a buffer by the
//! connection task and handed in batches to a writer task that owns the socket's
//! write half, so a slow reader never blocks the connection's read loop.
//!
//! Hot-path notes: deliveries are encoded straight from the stored message (no
//! `Method` built, no strings copied, properties written from their compact form),
//! and the writer coalesces every chunk waiting in its mailbox into one `write`.

use crate::broker::message::Properties;
use crate::wire::{self, DeliverArgs, Method};
use bytes::{Bytes, BytesMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// Initial capacity of the encode buffer: enough for the handshake replies. An idle
/// connection keeps no more than this.
const BUF_INITIAL: usize = 512;

/// A connection that flushed at least this much at once is busy: its encode buffer is
/// topped up to BUF_BUSY after a flush instead of growing by small steps.
const BUSY_CHUNK: usize = 2 * 1024;
const BUF_BUSY: usize = 32 * 1024;

/// Chunks at most this big are copied into one buffer and written together.
const COALESCE_MAX: usize = 64 * 1024;

/// Frames waiting to be written, plus the negotiated frame size.
#[derive(Debug)]
pub struct Out {
    buf: BytesMut,
    pub frame_max: u32,
    tx: Option<mpsc::UnboundedSender<Bytes>>,
    /// Bytes handed to the writer and not yet written to the socket.
    in_flight: Arc<AtomicUsize>,
}

impl Out {
    pub fn method(&mut self, channel: u16, method: &Method) {
        wire::write_method(&mut self.buf, channel, method);
    }

    /// A content header and body frames.
    pub fn content(&mut self, channel: u16, properties: &Properties, body: &[u8]) {
        wire::write_content_with(
            &mut self.buf,
            channel,
            60,
            |b| properties.encode(b),
            body,
            self.frame_max,
        );
    }

    /// `basic.deliver` with its content, encoded in one go (the delivery hot path).
    pub fn deliver(
        &mut self,
        channel: u16,
        args: &DeliverArgs<'_>,
        properties: &Properties,
        body: &[u8],
    ) {
        wire::write_deliver(
            &mut self.buf,
            channel,
            args,
            |b| properties.encode(b),
            body,
            self.frame_max,
        );
    }

    pub fn heartbeat(&mut self) {
        wire::write_heartbeat(&mut self.buf);
    }

    /// Raw bytes (the protocol header).
    pub fn raw(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Bytes the writer has not written yet (for back-pressure).
    pub fn backlog(&self) -> usize {
        self.in_flight.load(Ordering::Acquire) + self.buf.len()
    }

    /// Flush, then let the writer finish and half-close the socket (FIN).
    pub fn close(&mut self) {
        self.flush();
        self.tx = None;
    }

    /// Hand everything buffered to the writer task. Returns false if it is gone.
    pub fn flush(&mut self) -> bool {
        if self.buf.is_empty() {
            return true;
        }
        let chunk = self.buf.split().freeze();
        let chunk_len = chunk.len();
        self.in_flight.fetch_add(chunk_len, Ordering::AcqRel);
        let ok = self.tx.as_ref().is_some_and(|tx| tx.send(chunk).is_ok());
        if chunk_len >= BUSY_CHUNK && self.buf.capacity() < BUSY_CHUNK {
            self.buf.reserve(BUF_BUSY);
        }
        ok
    }
}

/// Start the writer task for `sink`; returns the buffer to encode into and the task.
pub fn spawn<W>(sink: W, frame_max: u32) -> (Out, tokio::task::JoinHandle<()>)
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let in_flight = Arc::new(AtomicUsize::new(0));
    let task = tokio::spawn(write_loop(sink, rx, Arc::clone(&in_flight)));
    (
        Out {
            buf: BytesMut::with_capacity(BUF_INITIAL),
            frame_max,
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
        if sink.flush().await.is_err() {
            return;
        }
    }
    let _ = sink.shutdown().await;
}
