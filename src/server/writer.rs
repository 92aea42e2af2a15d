//! Outgoing bytes of one connection: frames are encoded into a buffer by the
//! connection task and handed in batches to a writer task that owns the socket's
//! write half, so a slow reader never blocks the connection's read loop.

use crate::wire::{self, BasicProperties, Method};
use bytes::{Bytes, BytesMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

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

    pub fn content(&mut self, channel: u16, properties: &BasicProperties, body: &[u8]) {
        wire::write_content(&mut self.buf, channel, 60, properties, body, self.frame_max);
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
        self.in_flight.fetch_add(chunk.len(), Ordering::AcqRel);
        let ok = self.tx.as_ref().is_some_and(|tx| tx.send(chunk).is_ok());
        if self.buf.capacity() < 4096 {
            self.buf.reserve(16 * 1024);
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
            buf: BytesMut::with_capacity(16 * 1024),
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
    let mut batch: Vec<Bytes> = Vec::new();
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < 64 {
            match rx.try_recv() {
                Ok(more) => batch.push(more),
                Err(_) => break,
            }
        }
        for chunk in batch.drain(..) {
            let n = chunk.len();
            if sink.write_all(&chunk).await.is_err() {
                return;
            }
            in_flight.fetch_sub(n, Ordering::AcqRel);
        }
        if sink.flush().await.is_err() {
            return;
        }
    }
    let _ = sink.shutdown().await;
}
