//! One channel's protocol state inside the session: open or closing (we sent
//! `channel.close` and drop everything but close / close-ok), the publish being
//! assembled, publisher confirms, and the caller's own per-channel data `T`.
//!
//! [`ChannelIo`] is what the broker-facing handlers get to answer on a channel.

use super::confirms::{Confirms, Outcome, StoreWait};
use super::content::Pending;
use super::output::Output;
use crate::wire::Method;
use std::collections::VecDeque;

#[derive(Debug)]
pub(crate) struct Channel<T> {
    /// We sent channel.close and wait for close-ok.
    pub closing: bool,
    pub pending: Option<Pending>,
    pub confirms: Confirms,
    pub data: T,
}

impl<T: Default> Channel<T> {
    pub fn new() -> Channel<T> {
        Channel {
            closing: false,
            pending: None,
            confirms: Confirms::default(),
            data: T::default(),
        }
    }
}

/// A channel's way out: replies, confirms and store waits.
#[derive(Debug)]
pub struct ChannelIo<'a> {
    pub id: u16,
    /// We sent channel.close: deliveries must go back to their queues.
    pub closing: bool,
    pub out: &'a mut Output,
    pub confirms: &'a mut Confirms,
    pub(crate) waits: &'a mut VecDeque<StoreWait>,
}

impl ChannelIo<'_> {
    /// Send a method on this channel.
    pub fn method(&mut self, method: &Method) {
        self.out.method(self.id, method);
    }

    /// Record what happened to a publish (for confirms; nothing outside confirm mode).
    pub fn published(&mut self, outcome: Outcome) {
        self.confirms
            .published(self.id, outcome, self.out, self.waits);
    }

    /// Send the confirms gathered so far (before a nack or a close).
    pub fn flush_confirms(&mut self) {
        self.confirms.flush(self.id, self.out, self.waits);
    }

    /// tx.commit must wait for the store's next flush before commit-ok.
    pub fn await_tx_flush(&mut self) {
        self.waits
            .push_back(StoreWait::TxCommit { channel: self.id });
    }
}
