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
    /// The `priority` property, for priority queues.
    pub priority: u8,
    /// Paged out: the body (and properties) are only in the store; the value is
    /// the body size. `message` is then a placeholder until paged back in.
    pub paged: Option<u32>,
}

impl Entry {
    pub fn new(seq: u64, message: Arc<Message>, expires_at: Option<u64>) -> Entry {
        Entry {
            seq,
            priority: message.properties.priority.unwrap_or(0),
            message,
            redelivered: false,
            expires_at,
            persisted: false,
            paged: None,
        }
    }

    /// Body size in bytes, whether resident or paged out.
    pub fn size(&self) -> usize {
        match self.paged {
            Some(n) => n as usize,
            None => self.message.size(),
        }
    }

    /// Body bytes held in memory.
    pub fn resident_size(&self) -> usize {
        match self.paged {
            Some(_) => 0,
            None => self.message.size(),
        }
    }
}

/// Bytes of message bodies held in memory by all ready lists, against a limit past
/// which durable queues page persistent messages out to the store.
#[derive(Debug)]
pub struct MemoryBudget {
    limit: usize,
    used: std::sync::atomic::AtomicUsize,
}

impl MemoryBudget {
    /// `limit` 0 means unlimited.
    pub fn new(limit: usize) -> Arc<MemoryBudget> {
        Arc::new(MemoryBudget {
            limit,
            used: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    pub fn unlimited() -> Arc<MemoryBudget> {
        Self::new(0)
    }

    pub fn add(&self, n: usize) {
        self.used.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn sub(&self, n: usize) {
        self.used.fetch_sub(n, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn used(&self) -> usize {
        self.used.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Would holding `n` more bytes go past the limit?
    pub fn over(&self, n: usize) -> bool {
        self.limit != 0 && self.used() + n > self.limit
    }
}

/// The stand-in `message` of a paged-out entry.
pub fn paged_placeholder() -> Arc<Message> {
    static PLACEHOLDER: std::sync::OnceLock<Arc<Message>> = std::sync::OnceLock::new();
    Arc::clone(
        PLACEHOLDER.get_or_init(|| Message::new("", "", BasicProperties::default(), Bytes::new())),
    )
}

/// Milliseconds since the Unix epoch: the broker's clock for TTLs and expiry.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
