//! Messages as the broker holds them: immutable, shared by every queue they route to.

use crate::wire::BasicProperties;
use bytes::Bytes;
use std::sync::Arc;

/// A published message. Shared (`Arc`) between all queues it was routed to;
/// the body is a `Bytes` slice of the frame it arrived in, never copied per queue.
#[derive(Debug)]
pub struct Message {
    pub exchange: String,
    pub routing_key: String,
    pub properties: BasicProperties,
    pub body: Bytes,
}

impl Message {
    pub fn new(
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
        properties: BasicProperties,
        body: Bytes,
    ) -> Arc<Message> {
        Arc::new(Message {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            properties,
            body,
        })
    }

    /// delivery_mode 2.
    pub fn is_persistent(&self) -> bool {
        self.properties.delivery_mode == Some(2)
    }

    /// The per-message TTL in ms from the `expiration` property, if valid.
    pub fn ttl(&self) -> Option<u64> {
        self.properties.expiration.as_deref()?.parse().ok()
    }

    /// Body size in bytes.
    pub fn size(&self) -> usize {
        self.body.len()
    }
}

/// One message's place in one queue.
#[derive(Debug, Clone)]
pub struct Entry {
    /// Position in the queue: increases with every enqueue; requeues go back by it.
    pub seq: u64,
    pub message: Arc<Message>,
    /// The message was delivered before (requeued).
    pub redelivered: bool,
    /// When it expires (ms since the epoch), from the queue's or the message's TTL.
    pub expires_at: Option<u64>,
    /// Written to the message store (persistent message on a durable queue).
    pub persisted: bool,
}

/// Milliseconds since the Unix epoch: the broker's clock for TTLs and expiry.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
