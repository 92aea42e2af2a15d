//! Messages as the broker holds them: immutable, shared by every queue they route to.
//!
//! Kept small, because a queued message costs this much memory: the exchange and
//! routing key are shared [`ShortStr`]s (interned per thread, so a stream of
//! publishes to one key allocates nothing for it) and the content properties are
//! stored out of line only when they carry more than a delivery mode and a
//! priority (see [`Properties`]).

use crate::wire::BasicProperties;
use bytes::{BufMut, Bytes, BytesMut};
use std::cell::RefCell;
use std::fmt;
use std::ops::Deref;
use std::sync::{Arc, LazyLock};

/// An immutable, reference-counted string (exchange names, routing keys): 16 bytes,
/// cloned without allocating.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShortStr(Arc<str>);

/// Per-thread cache of recently interned strings (round-robin replacement).
const INTERN_SLOTS: usize = 8;

struct InternCache {
    slots: [Option<ShortStr>; INTERN_SLOTS],
    next: usize,
}

thread_local! {
    static INTERN: RefCell<InternCache> = const {
        RefCell::new(InternCache {
            slots: [const { None }; INTERN_SLOTS],
            next: 0,
        })
    };
}

impl ShortStr {
    /// A shared copy of `s`, reusing one recently made on this thread when equal.
    pub fn intern(s: &str) -> ShortStr {
        // Long strings are unlikely to repeat and costly to compare: just copy.
        if s.len() > 255 {
            return ShortStr(Arc::from(s));
        }
        INTERN.with(|cache| {
            let mut cache = cache.borrow_mut();
            if let Some(hit) = cache.slots.iter().flatten().find(|c| &*c.0 == s) {
                return hit.clone();
            }
            let made = ShortStr(Arc::from(s));
            let i = cache.next;
            cache.slots[i] = Some(made.clone());
            cache.next = (i + 1) % INTERN_SLOTS;
            made
        })
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Deref for ShortStr {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl AsRef<str> for ShortStr {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for ShortStr {
    fn borrow(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ShortStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for ShortStr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&*self.0, f)
    }
}

impl serde::Serialize for ShortStr {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl From<&str> for ShortStr {
    fn from(s: &str) -> ShortStr {
        ShortStr::intern(s)
    }
}

impl From<String> for ShortStr {
    fn from(s: String) -> ShortStr {
        ShortStr::intern(&s)
    }
}

impl From<ShortStr> for String {
    fn from(s: ShortStr) -> String {
        s.0.to_string()
    }
}

impl From<ShortStr> for Arc<str> {
    fn from(s: ShortStr) -> Arc<str> {
        s.0
    }
}

impl PartialEq<str> for ShortStr {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for ShortStr {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl PartialEq<String> for ShortStr {
    fn eq(&self, other: &String) -> bool {
        *self.0 == **other
    }
}

/// Flags of the properties a [`Properties::Simple`] can hold: delivery-mode, priority.
const SIMPLE_FLAGS: u16 = 0x1000 | 0x0800;
const PRIORITIES: usize = 11; // None, 0..=9

/// Every "simple" property set (only delivery-mode in {none, 1, 2} and priority in
/// {none, 0..=9}), so messages that carry nothing else share one of these.
static SIMPLE: LazyLock<Vec<BasicProperties>> = LazyLock::new(|| {
    let mut v = Vec::with_capacity(3 * PRIORITIES);
    for mode in [None, Some(1), Some(2)] {
        for p in 0..PRIORITIES {
            v.push(BasicProperties {
                delivery_mode: mode,
                priority: p.checked_sub(1).map(|p| p as u8),
                ..Default::default()
            });
        }
    }
    v
});

fn simple_index(p: &BasicProperties) -> Option<u8> {
    if p.flags() & !SIMPLE_FLAGS != 0 {
        return None;
    }
    let mode = match p.delivery_mode {
        None => 0,
        Some(1) => 1,
        Some(2) => 2,
        Some(_) => return None,
    };
    let prio = match p.priority {
        None => 0,
        Some(x) if (x as usize) < PRIORITIES - 1 => x as usize + 1,
        Some(_) => return None,
    };
    Some((mode * PRIORITIES + prio) as u8)
}

/// A message's content properties. Dereferences to [`BasicProperties`]; the common
/// case (at most delivery-mode and a small priority) takes no allocation.
pub enum Properties {
    Simple(u8),
    Full(Box<BasicProperties>),
}

impl Properties {
    /// Append the property flags and values (the content header's tail).
    #[inline]
    pub fn encode(&self, buf: &mut BytesMut) {
        match self {
            Properties::Simple(0) => buf.put_u16(0),
            Properties::Simple(_) => {
                let p: &BasicProperties = self;
                let mut flags = 0u16;
                if p.delivery_mode.is_some() {
                    flags |= 0x1000;
                }
                if p.priority.is_some() {
                    flags |= 0x0800;
                }
                buf.put_u16(flags);
                if let Some(m) = p.delivery_mode {
                    buf.put_u8(m);
                }
                if let Some(x) = p.priority {
                    buf.put_u8(x);
                }
            }
            Properties::Full(p) => p.encode(buf),
        }
    }
}

impl From<BasicProperties> for Properties {
    fn from(p: BasicProperties) -> Properties {
        match simple_index(&p) {
            Some(i) => Properties::Simple(i),
            None => Properties::Full(Box::new(p)),
        }
    }
}

impl Deref for Properties {
    type Target = BasicProperties;
    #[inline]
    fn deref(&self) -> &BasicProperties {
        match self {
            Properties::Simple(i) => &SIMPLE[*i as usize],
            Properties::Full(p) => p,
        }
    }
}

impl fmt::Debug for Properties {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}

/// A published message. Shared (`Arc`) between all queues it was routed to;
/// the body is a `Bytes` slice of the frame it arrived in, never copied per queue.
#[derive(Debug)]
pub struct Message {
    pub exchange: ShortStr,
    pub routing_key: ShortStr,
    pub properties: Properties,
    pub body: Bytes,
}

impl Message {
    pub fn new(
        exchange: impl AsRef<str>,
        routing_key: impl AsRef<str>,
        properties: BasicProperties,
        body: Bytes,
    ) -> Arc<Message> {
        Arc::new(Message {
            exchange: ShortStr::intern(exchange.as_ref()),
            routing_key: ShortStr::intern(routing_key.as_ref()),
            properties: properties.into(),
            body,
        })
    }

    /// delivery_mode 2.
    pub fn is_persistent(&self) -> bool {
        self.properties.delivery_mode == Some(2)
    }

    /// The per-message TTL in ms from the `expiration` property, if valid.
    #[inline]
    pub fn ttl(&self) -> Option<u64> {
        match &self.properties {
            Properties::Simple(_) => None,
            Properties::Full(p) => p.expiration.as_deref()?.parse().ok(),
        }
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
    /// Times it came back to the queue after reaching a client (nack / reject
    /// with requeue, recover, a channel closed with it unacked), counted on
    /// queues with a delivery limit and on quorum queues: RabbitMQ 4's
    /// acquired count, sent as `x-delivery-count` on redelivery. Kept in the
    /// message store for stored messages (`MessageOp::SetReturns`).
    pub delivery_count: u32,
    /// Where it is in the message store (its position at its level), if it
    /// was written there: durably if `persisted`, else paged out to save memory
    /// while it waited in a tail.
    pub pos: Option<u64>,
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
            pos: None,
            delivery_count: 0,
        }
    }

    /// Append the content properties a delivery of this entry carries: the
    /// message's own, plus an `x-delivery-count` header once it has been
    /// returned (RabbitMQ 4 quorum queues). The common case copies nothing.
    #[inline]
    pub fn encode_properties(&self, buf: &mut BytesMut) {
        if self.delivery_count == 0 {
            return self.message.properties.encode(buf);
        }
        self.delivery_properties().encode(buf);
    }

    /// The content properties a delivery of this entry carries (see
    /// [`encode_properties`](Self::encode_properties)).
    pub fn delivery_properties(&self) -> std::borrow::Cow<'_, BasicProperties> {
        if self.delivery_count == 0 {
            return std::borrow::Cow::Borrowed(&self.message.properties);
        }
        let mut p: BasicProperties = (*self.message.properties).clone();
        p.headers.get_or_insert_with(Default::default).insert(
            "x-delivery-count",
            crate::wire::FieldValue::I64(i64::from(self.delivery_count)),
        );
        std::borrow::Cow::Owned(p)
    }

    /// Body size in bytes.
    pub fn size(&self) -> usize {
        self.message.size()
    }

    /// Body bytes held in memory.
    pub fn resident_size(&self) -> usize {
        self.message.size()
    }
}

/// Bytes of message bodies held in memory by all ready lists, against a limit past
/// which queues page new messages out to the store.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(p: &BasicProperties) -> BytesMut {
        let mut b = BytesMut::new();
        p.encode(&mut b);
        b
    }

    #[test]
    fn properties_round_trip_simple_and_full() {
        let cases = vec![
            BasicProperties::default(),
            BasicProperties {
                delivery_mode: Some(1),
                ..Default::default()
            },
            BasicProperties {
                delivery_mode: Some(2),
                priority: Some(9),
                ..Default::default()
            },
            BasicProperties {
                priority: Some(200),
                ..Default::default()
            },
            BasicProperties {
                delivery_mode: Some(7),
                ..Default::default()
            },
            BasicProperties {
                delivery_mode: Some(2),
                expiration: Some("100".into()),
                content_type: Some("text/plain".into()),
                ..Default::default()
            },
        ];
        for p in cases {
            let props = Properties::from(p.clone());
            assert_eq!(*props, p);
            let mut b = BytesMut::new();
            props.encode(&mut b);
            assert_eq!(b, encoded(&p), "{p:?}");
        }
        assert!(matches!(
            Properties::from(BasicProperties::default()),
            Properties::Simple(0)
        ));
    }

    #[test]
    fn message_ttl_and_interning() {
        let m = Message::new(
            "ex",
            String::from("rk"),
            BasicProperties {
                expiration: Some("250".into()),
                ..Default::default()
            },
            Bytes::new(),
        );
        assert_eq!(m.ttl(), Some(250));
        assert_eq!(m.routing_key, "rk");
        let n = Message::new("ex", "rk", BasicProperties::default(), Bytes::new());
        assert_eq!(n.ttl(), None);
        assert!(Arc::ptr_eq(&m.routing_key.0, &n.routing_key.0));
        assert!(Arc::ptr_eq(&m.exchange.0, &n.exchange.0));
    }

    #[test]
    fn message_is_small() {
        assert!(std::mem::size_of::<Message>() <= 80);
    }
}
