//! What the admin API sees of a Stream protocol connection: its publishers
//! and consumers with their counters (RabbitMQ's stream management plugin's
//! `published` / `confirmed` / `errored` and `consumed` / `credits` /
//! `offset`), and the way to close it.
//!
//! A [`StreamConnStats`] is made by the connection's task and handed to its
//! [`super::stream::StreamSession`], which registers it with the broker as the
//! connection's [`ConnectionControl`] once open and keeps the member lists in
//! step when publishers and subscriptions come and go. Counters are relaxed
//! atomics bumped once per publish frame, confirm frame and delivered chunk
//! (never per message); the lists are locked only when they change and when
//! the admin API reads them. The connection's task counts the socket's bytes
//! and reads/writes in its [`SocketStats`], as an AMQP connection's does.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::mpsc::UnboundedSender;

use crate::broker::{ConnectionControl, SocketStats};

/// One publisher of a stream connection.
#[derive(Debug)]
pub struct PublisherStats {
    pub id: u8,
    pub stream: String,
    /// Its deduplication reference (`""` without one).
    pub reference: String,
    /// Messages received in publish frames.
    pub published: AtomicU64,
    /// Publishing ids confirmed.
    pub confirmed: AtomicU64,
    /// Publishing ids answered with a publish error.
    pub errored: AtomicU64,
}

impl PublisherStats {
    pub fn new(id: u8, stream: &str, reference: Option<&str>) -> Arc<PublisherStats> {
        Arc::new(PublisherStats {
            id,
            stream: stream.to_owned(),
            reference: reference.unwrap_or_default().to_owned(),
            published: AtomicU64::new(0),
            confirmed: AtomicU64::new(0),
            errored: AtomicU64::new(0),
        })
    }
}

/// One subscription of a stream connection.
#[derive(Debug)]
pub struct ConsumerStats {
    pub id: u8,
    pub stream: String,
    /// The subscribe request's properties (`name`, `single-active-consumer`,
    /// `filter.N`, ...).
    pub properties: Vec<(String, String)>,
    /// Chunks it may still be sent.
    pub credits: AtomicU64,
    /// Messages sent to it (the records of the chunks delivered).
    pub consumed: AtomicU64,
    /// The last offset delivered (0 before the first delivery).
    pub offset: AtomicU64,
}

impl ConsumerStats {
    pub fn new(
        id: u8,
        stream: &str,
        properties: &[(String, String)],
        credits: u32,
    ) -> Arc<ConsumerStats> {
        Arc::new(ConsumerStats {
            id,
            stream: stream.to_owned(),
            properties: properties.to_vec(),
            credits: AtomicU64::new(u64::from(credits)),
            consumed: AtomicU64::new(0),
            offset: AtomicU64::new(0),
        })
    }

    /// A chunk of `records` messages from `first_offset` was sent, leaving
    /// `credits`.
    pub fn delivered(&self, first_offset: u64, records: u32, credits: u32) {
        self.consumed
            .fetch_add(u64::from(records), Ordering::Relaxed);
        self.offset.store(
            first_offset + u64::from(records.max(1)) - 1,
            Ordering::Relaxed,
        );
        self.credits.store(u64::from(credits), Ordering::Relaxed);
    }
}

/// A Stream protocol connection as the admin API sees it.
#[derive(Debug)]
pub struct StreamConnStats {
    close: UnboundedSender<String>,
    /// The SASL mechanism it logged in with.
    auth_mechanism: Mutex<&'static str>,
    publishers: Mutex<BTreeMap<u8, Arc<PublisherStats>>>,
    consumers: Mutex<BTreeMap<u8, Arc<ConsumerStats>>>,
    /// Its socket's counters (the connection's task counts them).
    pub socket: Arc<SocketStats>,
}

impl StreamConnStats {
    /// `close` is where a forced close's reason goes (the connection's task).
    pub fn new(close: UnboundedSender<String>) -> Arc<StreamConnStats> {
        Arc::new(StreamConnStats {
            close,
            auth_mechanism: Mutex::new("PLAIN"),
            publishers: Mutex::new(BTreeMap::new()),
            consumers: Mutex::new(BTreeMap::new()),
            socket: SocketStats::new(),
        })
    }

    pub fn auth_mechanism(&self) -> &'static str {
        *self.auth_mechanism.lock()
    }

    pub(crate) fn set_auth_mechanism(&self, m: &'static str) {
        *self.auth_mechanism.lock() = m;
    }

    /// The publishers, by id.
    pub fn publishers(&self) -> Vec<Arc<PublisherStats>> {
        self.publishers.lock().values().cloned().collect()
    }

    /// The subscriptions, by id.
    pub fn consumers(&self) -> Vec<Arc<ConsumerStats>> {
        self.consumers.lock().values().cloned().collect()
    }

    /// Replace the member lists (the session calls this when they changed).
    pub(crate) fn set_members(
        &self,
        publishers: impl Iterator<Item = Arc<PublisherStats>>,
        consumers: impl Iterator<Item = Arc<ConsumerStats>>,
    ) {
        *self.publishers.lock() = publishers.map(|p| (p.id, p)).collect();
        *self.consumers.lock() = consumers.map(|c| (c.id, c)).collect();
    }
}

impl ConnectionControl for StreamConnStats {
    /// RabbitMQ closes the socket without a close frame.
    fn force_close(&self, reason: &str) {
        let _ = self.close.send(reason.to_owned());
    }

    fn stream(&self) -> Option<&StreamConnStats> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivered_counts_records_and_keeps_the_last_offset() {
        let c = ConsumerStats::new(3, "s", &[], 10);
        c.delivered(0, 5, 9);
        c.delivered(5, 2, 8);
        assert_eq!(c.consumed.load(Ordering::Relaxed), 7);
        assert_eq!(c.offset.load(Ordering::Relaxed), 6);
        assert_eq!(c.credits.load(Ordering::Relaxed), 8);
    }

    #[test]
    fn force_close_reaches_the_task_and_members_are_replaced() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let s = StreamConnStats::new(tx);
        s.force_close("bye");
        assert_eq!(rx.try_recv().ok().as_deref(), Some("bye"));
        assert!(s.stream().is_some());
        let p = PublisherStats::new(1, "s", Some("ref"));
        s.set_members(std::iter::once(p), std::iter::empty());
        assert_eq!(s.publishers()[0].reference, "ref");
        s.set_members(std::iter::empty(), std::iter::empty());
        assert!(s.publishers().is_empty() && s.consumers().is_empty());
    }
}
