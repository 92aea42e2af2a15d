//! The session's outgoing bytes: frames are encoded straight into one buffer that
//! the I/O side takes with [`Output::take`] (no per-frame allocation).

use crate::wire::{self, DeliverArgs, Method};
use bytes::{Bytes, BytesMut};

/// Initial capacity of the encode buffer: enough for the handshake replies. An idle
/// connection keeps no more than this.
const BUF_INITIAL: usize = 512;

/// A connection that handed out at least this much at once is busy: its encode
/// buffer is topped up to BUF_BUSY afterwards instead of growing by small steps.
const BUSY_CHUNK: usize = 2 * 1024;
const BUF_BUSY: usize = 32 * 1024;

/// Frames waiting to be transmitted, encoded for the negotiated frame size.
#[derive(Debug)]
pub struct Output {
    buf: BytesMut,
    frame_max: u32,
    /// Publishes confirmed (basic.ack) in what was written, not yet taken by
    /// [`Output::take_confirmed`] (the broker's confirm counter).
    confirmed: u64,
}

impl Output {
    pub(crate) fn new(frame_max: u32) -> Output {
        Output {
            buf: BytesMut::with_capacity(BUF_INITIAL),
            frame_max,
            confirmed: 0,
        }
    }

    /// `n` publishes were confirmed in what was just written.
    pub(crate) fn count_confirmed(&mut self, n: u64) {
        self.confirmed += n;
    }

    /// The publishes confirmed since the last call.
    pub(crate) fn take_confirmed(&mut self) -> u64 {
        std::mem::take(&mut self.confirmed)
    }

    pub(crate) fn set_frame_max(&mut self, frame_max: u32) {
        self.frame_max = frame_max;
    }

    pub fn method(&mut self, channel: u16, method: &Method) {
        wire::write_method(&mut self.buf, channel, method);
    }

    /// A basic content header (properties written by `properties`) and body frames.
    pub fn content(&mut self, channel: u16, properties: impl FnOnce(&mut BytesMut), body: &[u8]) {
        wire::write_content_with(
            &mut self.buf,
            channel,
            wire::BasicPublish::CLASS_ID,
            properties,
            body,
            self.frame_max,
        );
    }

    /// `basic.deliver` with its content, encoded in one go (the delivery hot path).
    pub fn deliver(
        &mut self,
        channel: u16,
        args: &DeliverArgs<'_>,
        properties: impl FnOnce(&mut BytesMut),
        body: &[u8],
    ) {
        wire::write_deliver(
            &mut self.buf,
            channel,
            args,
            properties,
            body,
            self.frame_max,
        );
    }

    pub(crate) fn heartbeat(&mut self) {
        wire::write_heartbeat(&mut self.buf);
    }

    pub(crate) fn raw(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Everything encoded so far, or None when there is nothing.
    pub(crate) fn take(&mut self) -> Option<Bytes> {
        if self.buf.is_empty() {
            return None;
        }
        let chunk = self.buf.split().freeze();
        if chunk.len() >= BUSY_CHUNK && self.buf.capacity() < BUSY_CHUNK {
            self.buf.reserve(BUF_BUSY);
        }
        Some(chunk)
    }
}
