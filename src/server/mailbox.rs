//! A connection's mailbox: what the rest of the broker (queues, the store's
//! flusher, operators) sends to a connection task, and the [`ConnSink`] they
//! send it through.

use crate::broker::queue::{Delivery, DeliverySink};
use crate::broker::ConnectionControl;
use crate::error::AmqpError;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;

/// Messages into a connection task from the rest of the broker.
#[derive(Debug)]
pub enum Outbound {
    Deliver(Delivery),
    /// Clustered: a delivery from a consumer on another node.
    RemoteDeliver(crate::broker::remote::RemoteDelivery),
    Cancelled {
        channel: u16,
        tag: Arc<str>,
    },
    /// Clustered: the home node opened (Ok) or refused a remote consumer.
    ConsumeAnswered {
        channel: u16,
        tag: Arc<str>,
        answer: Result<(), (u16, String)>,
    },
    /// Close the connection with this error (e.g. forced by an operator).
    Close(AmqpError),
    /// The store flush a transaction's commit waited for ended (`ok`: it worked).
    TxCommitted {
        channel: u16,
        ok: bool,
    },
    /// The store flushed publishes `first..=last` of `channel` (or failed to);
    /// `forwarded`: every copy of them sent to another node was taken there.
    Durable {
        channel: u16,
        first: u64,
        last: u64,
        ok: bool,
        forwarded: bool,
    },
}

/// The [`DeliverySink`] of a connection: an mpsc into its task.
#[derive(Debug)]
pub struct ConnSink {
    tx: mpsc::UnboundedSender<Outbound>,
    /// Output backlog over the limit: queues skip this connection's consumers.
    blocked: AtomicBool,
}

/// A new mailbox: the sink to hand out and the task's receiver.
pub fn new() -> (Arc<ConnSink>, mpsc::UnboundedReceiver<Outbound>) {
    let (tx, rx) = mpsc::unbounded_channel();
    (
        Arc::new(ConnSink {
            tx,
            blocked: AtomicBool::new(false),
        }),
        rx,
    )
}

impl DeliverySink for ConnSink {
    fn deliver(&self, delivery: Delivery) -> Result<(), Delivery> {
        match self.tx.send(Outbound::Deliver(delivery)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::SendError(Outbound::Deliver(d))) => Err(d),
            // Only a delivery was sent, so nothing else can come back.
            Err(_) => Ok(()),
        }
    }

    fn cancelled(&self, channel: u16, tag: Arc<str>) {
        let _ = self.tx.send(Outbound::Cancelled { channel, tag });
    }

    fn consume_answered(&self, channel: u16, tag: Arc<str>, answer: Result<(), (u16, String)>) {
        let _ = self.tx.send(Outbound::ConsumeAnswered {
            channel,
            tag,
            answer,
        });
    }

    fn deliver_remote(
        &self,
        d: crate::broker::remote::RemoteDelivery,
    ) -> Result<(), crate::broker::remote::RemoteDelivery> {
        match self.tx.send(Outbound::RemoteDeliver(d)) {
            Ok(()) => Ok(()),
            Err(mpsc::error::SendError(Outbound::RemoteDeliver(d))) => Err(d),
            Err(_) => Ok(()),
        }
    }

    fn blocked(&self) -> bool {
        self.blocked.load(Ordering::Acquire)
    }
}

impl ConnSink {
    /// Called from the store's flusher once publishes are on disk (or not).
    pub fn durable(&self, channel: u16, first: u64, last: u64, ok: bool, forwarded: bool) {
        let _ = self.tx.send(Outbound::Durable {
            channel,
            first,
            last,
            ok,
            forwarded,
        });
    }

    /// Called from the store's flusher once a transaction's messages are on disk
    /// (or could not be written).
    pub fn tx_committed(&self, channel: u16, ok: bool) {
        let _ = self.tx.send(Outbound::TxCommitted { channel, ok });
    }

    /// Queues skip this connection's consumers while `on`.
    pub fn set_blocked(&self, on: bool) {
        self.blocked.store(on, Ordering::Release);
    }
}

impl ConnectionControl for ConnSink {
    fn force_close(&self, reason: &str) {
        let _ = self
            .tx
            .send(Outbound::Close(AmqpError::connection_forced(reason)));
    }
}
