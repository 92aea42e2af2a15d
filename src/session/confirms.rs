//! Publisher confirms of one channel: sequence numbers, batching of immediate acks
//! into one `multiple` ack, and durable batches that are confirmed only after the
//! store's flush (a failed flush closes the connection with 541 instead).

use super::output::Output;
use crate::broker::ConfirmGauges;
use crate::error::AmqpError;
use crate::wire::{BasicAck, BasicNack};
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// What the broker did with one publish on a channel in confirm mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Enqueued (or dropped as unroutable); `durable` when a persistent copy must
    /// reach the disk before the confirm.
    Accepted { durable: bool },
    /// A queue refused it (x-overflow reject-publish): nack.
    Rejected,
}

/// Something the caller must wait for in the store before the session goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreWait {
    /// Publishes `first..=last` of `channel` are acked once the store's next flush
    /// ends; answer with [`super::Session::durable_done`].
    Confirms { channel: u16, first: u64, last: u64 },
    /// `tx.commit` on `channel` waits for the store's next flush; answer with
    /// [`super::Session::tx_flushed`].
    TxCommit { channel: u16 },
}

/// Confirm state of one channel.
#[derive(Debug)]
pub struct Confirms {
    enabled: bool,
    next_seq: u64,
    /// Immediate confirms of this batch: (first, last), acked together.
    acks: Option<(u64, u64)>,
    /// Confirms of this batch that wait for the store's next flush.
    durable_batch: Option<(u64, u64)>,
    /// Batches handed to the store and not yet confirmed; while any is out, later
    /// confirms queue behind it so `multiple` acks never cover an unflushed message.
    inflight: usize,
    /// Publishes not acked or nacked yet, and where the channel's figures
    /// want that number (`messages_unconfirmed`) and the count of those
    /// acked, if anywhere.
    unconfirmed: u64,
    gauge: Option<Arc<ConfirmGauges>>,
}

impl Default for Confirms {
    fn default() -> Self {
        Confirms {
            enabled: false,
            next_seq: 1,
            acks: None,
            durable_batch: None,
            inflight: 0,
            unconfirmed: 0,
            gauge: None,
        }
    }
}

fn ack(out: &mut Output, channel: u16, (first, last): (u64, u64)) {
    out.count_confirmed(last + 1 - first);
    out.method(
        channel,
        &BasicAck {
            delivery_tag: last,
            multiple: first != last,
        }
        .into(),
    );
}

impl Confirms {
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The sequence number the next publish gets (in confirm mode).
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// confirm.select.
    pub fn enable(&mut self) {
        self.enabled = true;
    }

    /// Keep `gauge` at the number of publishes not confirmed yet, and
    /// count the confirms there.
    pub fn set_gauge(&mut self, gauge: Arc<ConfirmGauges>) {
        gauge.unconfirmed.store(self.unconfirmed, Ordering::Relaxed);
        self.gauge = Some(gauge);
    }

    /// `n` more publishes wait for their confirm (negative: answered).
    fn unconfirmed_by(&mut self, more: u64, answered: u64) {
        self.unconfirmed = (self.unconfirmed + more).saturating_sub(answered);
        if let Some(g) = &self.gauge {
            g.unconfirmed.store(self.unconfirmed, Ordering::Relaxed);
        }
    }

    /// Record one publish; writes what must go out before later confirms.
    pub(crate) fn published(
        &mut self,
        channel: u16,
        outcome: Outcome,
        out: &mut Output,
        waits: &mut VecDeque<StoreWait>,
    ) {
        if !self.enabled {
            return;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.unconfirmed_by(1, 0);
        match outcome {
            Outcome::Rejected => {
                // One queue refusing is enough to nack.
                self.flush(channel, out, waits);
                self.unconfirmed_by(0, 1);
                out.method(
                    channel,
                    &BasicNack {
                        delivery_tag: seq,
                        multiple: false,
                        requeue: false,
                    }
                    .into(),
                );
            }
            Outcome::Accepted { durable }
                if durable || self.inflight > 0 || self.durable_batch.is_some() =>
            {
                // Immediate confirms gathered before this one go out first.
                if let Some(range) = self.acks.take() {
                    self.acked(out, channel, range);
                }
                self.durable_batch = Some(match self.durable_batch {
                    Some((first, _)) => (first, seq),
                    None => (seq, seq),
                });
            }
            Outcome::Accepted { .. } => {
                self.acks = match self.acks {
                    Some((first, last)) if last + 1 == seq => Some((first, seq)),
                    Some(_) => {
                        self.flush(channel, out, waits);
                        Some((seq, seq))
                    }
                    None => Some((seq, seq)),
                };
            }
        }
    }

    /// End of a batch: immediate confirms as one ack; the durable batch is handed
    /// to the store.
    pub(crate) fn flush(
        &mut self,
        channel: u16,
        out: &mut Output,
        waits: &mut VecDeque<StoreWait>,
    ) {
        if let Some(range) = self.acks.take() {
            self.acked(out, channel, range);
        }
        if let Some((first, last)) = self.durable_batch.take() {
            self.inflight += 1;
            waits.push_back(StoreWait::Confirms {
                channel,
                first,
                last,
            });
        }
    }

    /// The store flushed (or failed to flush) a batch handed out by [`Self::flush`].
    pub(crate) fn durable_done(
        &mut self,
        channel: u16,
        (first, last): (u64, u64),
        ok: bool,
        closing: bool,
        out: &mut Output,
    ) -> Result<(), AmqpError> {
        self.inflight = self.inflight.saturating_sub(1);
        if !ok {
            return Err(AmqpError::internal_error(format!(
                "publishes {first}..={last} on channel {channel} could not be written to disk"
            )));
        }
        if !closing && self.enabled {
            self.acked(out, channel, (first, last));
        }
        Ok(())
    }

    /// A batch handed out by [`Self::flush`] cannot be confirmed (a copy
    /// forwarded to another node was lost or refused): one nack for it.
    pub(crate) fn durable_nacked(
        &mut self,
        channel: u16,
        (first, last): (u64, u64),
        closing: bool,
        out: &mut Output,
    ) {
        self.inflight = self.inflight.saturating_sub(1);
        if !closing && self.enabled {
            self.unconfirmed_by(0, last + 1 - first);
            out.method(
                channel,
                &BasicNack {
                    delivery_tag: last,
                    multiple: first != last,
                    requeue: false,
                }
                .into(),
            );
        }
    }

    /// Ack publishes `first..=last`.
    fn acked(&mut self, out: &mut Output, channel: u16, range: (u64, u64)) {
        self.unconfirmed_by(0, range.1 + 1 - range.0);
        if let Some(g) = &self.gauge {
            g.confirmed
                .fetch_add(range.1 + 1 - range.0, Ordering::Relaxed);
        }
        ack(out, channel, range);
    }

    /// The channel is closing: immediate confirms not sent yet are dropped.
    pub(crate) fn drop_pending(&mut self) {
        self.acks = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gauge_counts_publishes_until_their_ack_or_nack() {
        let (mut out, mut waits) = (Output::new(4096), VecDeque::new());
        let mut c = Confirms::default();
        c.enable();
        let gauges = Arc::new(ConfirmGauges::default());
        gauges.unconfirmed.store(99, Ordering::Relaxed);
        c.set_gauge(Arc::clone(&gauges));
        let gauge = &gauges.unconfirmed;
        assert_eq!(gauge.load(Ordering::Relaxed), 0);
        let immediate = Outcome::Accepted { durable: false };
        for _ in 0..3 {
            c.published(1, immediate, &mut out, &mut waits);
        }
        assert_eq!(gauge.load(Ordering::Relaxed), 3);
        c.flush(1, &mut out, &mut waits);
        assert_eq!(gauge.load(Ordering::Relaxed), 0, "acked 1..=3");
        c.published(1, Outcome::Accepted { durable: true }, &mut out, &mut waits);
        c.published(1, Outcome::Accepted { durable: true }, &mut out, &mut waits);
        c.flush(1, &mut out, &mut waits);
        assert_eq!(gauge.load(Ordering::Relaxed), 2, "waiting for the store");
        let Some(StoreWait::Confirms { first, last, .. }) = waits.pop_front() else {
            panic!("a store wait");
        };
        c.durable_done(1, (first, last), true, false, &mut out)
            .expect("flushed");
        assert_eq!(gauge.load(Ordering::Relaxed), 0);
        c.published(1, Outcome::Rejected, &mut out, &mut waits);
        assert_eq!(gauge.load(Ordering::Relaxed), 0, "nacked at once");
        assert_eq!(out.take_confirmed(), 5);
        assert_eq!(
            gauges.confirmed.load(Ordering::Relaxed),
            5,
            "acked, not nacked"
        );
    }
}
