//! A quorum queue group's commands and the state they build (pure: no I/O,
//! no broker). The state is the queue's live messages by id, an id being
//! made of the log index of the message's `Enqueue` and its place in that
//! batch ([`id`]: increasing in the queue's order); it is the group's snapshot.

use crate::broker::message::Message;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// One message as the group keeps it: the broker's own message (shared with
/// the local queue of the member that serves it, so a leader holds each
/// body once), with the publisher that sent it (one per queue and
/// publishing node, see `super::publisher`) and its number in that
/// publisher's sequence; 0: none (taken as it comes, never recognised as a
/// resend).
///
/// A member that does not serve the queue keeps only the message's id,
/// body length and time ([`QMsg::strip`]: the message stays in its log or
/// snapshot on disk, `super::store` reads it back when the member comes to
/// serve the queue or writes a snapshot); a message let go of is never
/// written (encoding one is an error).
#[derive(Debug, Clone)]
pub struct QMsg {
    pub message: Arc<Message>,
    pub publisher: u64,
    pub seq: u64,
    /// When the group's leader took it (ms since the epoch; 0: not known,
    /// an entry written before it was kept): its `x-message-ttl` counts
    /// from then on whichever member serves it.
    pub at: u64,
    /// The message is not held (`message` is an empty one): its body's
    /// length.
    stripped: Option<usize>,
}

impl QMsg {
    pub fn of(m: &Arc<Message>) -> QMsg {
        QMsg {
            message: Arc::clone(m),
            publisher: 0,
            seq: 0,
            at: 0,
            stripped: None,
        }
    }

    /// The body's length, held or not.
    pub fn body_len(&self) -> usize {
        self.stripped.unwrap_or(self.message.body.len())
    }

    /// The body is held in memory.
    pub fn is_held(&self) -> bool {
        self.stripped.is_none()
    }

    /// Let go of the message (its exchange, routing key, properties and
    /// body: one empty message stands for every message let go of): its
    /// bytes are on disk. Kept are its id, body length, time and returns.
    pub fn strip(&mut self) {
        static NONE: std::sync::LazyLock<Arc<Message>> = std::sync::LazyLock::new(|| {
            Message::new(
                "",
                "",
                crate::wire::BasicProperties::default(),
                bytes::Bytes::new(),
            )
        });
        if self.stripped.is_none() {
            self.stripped = Some(self.message.body.len());
            self.message = Arc::clone(&NONE);
        }
    }

    /// Hold the body again: `full` is the message as it was written.
    pub fn hold(&mut self, full: Arc<Message>) {
        self.message = full;
        self.stripped = None;
    }

    /// The same message as number `seq` of `publisher`.
    pub fn sent_by(mut self, publisher: u64, seq: u64) -> QMsg {
        self.publisher = publisher;
        self.seq = seq;
        self
    }

    /// The AMQP message.
    pub fn message(&self) -> Arc<Message> {
        Arc::clone(&self.message)
    }

    /// The message's encoded AMQP properties.
    fn properties(&self) -> bytes::BytesMut {
        let mut props = bytes::BytesMut::new();
        self.message.properties.encode(&mut props);
        props
    }

    /// As written: the publisher's fields and the time only where given
    /// (`p`, `s`, `t`).
    fn wire(&self, p: Option<u64>, s: Option<u64>, t: Option<u64>) -> wire::Ref<'_> {
        wire::Ref {
            exchange: &self.message.exchange,
            routing_key: &self.message.routing_key,
            properties: self.properties(),
            body: &self.message.body,
            p,
            s,
            t,
        }
    }
}

/// Two messages are equal when they would be written the same (properties
/// compared encoded: the same values encode the same).
impl PartialEq for QMsg {
    fn eq(&self, other: &QMsg) -> bool {
        let (a, b) = (&self.message, &other.message);
        self.stripped == other.stripped
            && self.publisher == other.publisher
            && self.seq == other.seq
            && self.at == other.at
            && a.exchange == b.exchange
            && a.routing_key == b.routing_key
            && a.body == b.body
            && self.properties() == other.properties()
    }
}

impl Eq for QMsg {}

impl Serialize for QMsg {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if !self.is_held() {
            return Err(serde::ser::Error::custom(NOT_HELD));
        }
        let some = |v: u64| (v != 0).then_some(v);
        self.wire(some(self.publisher), some(self.seq), some(self.at))
            .serialize(s)
    }
}

impl<'de> Deserialize<'de> for QMsg {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<QMsg, D::Error> {
        let w = wire::Owned::deserialize(d)?;
        let (p, s) = (w.p.unwrap_or(0), w.s.unwrap_or(0));
        Ok(w.into_msg()?.sent_by(p, s))
    }
}

/// Why a message was not written: its body was not read back first.
const NOT_HELD: &str = "a quorum message's body is not held (it was not read back)";

/// One message as the log, the RPCs and the snapshots write it: by field
/// name, the properties encoded as in a content header; bodies and
/// properties are base64 in JSON and raw bytes in the binary encoding
/// (`crate::cluster::codec`).
mod wire {
    use super::QMsg;
    use crate::broker::message::Message;
    use serde::{Deserialize, Serialize};

    #[derive(Serialize)]
    pub struct Ref<'a> {
        pub exchange: &'a str,
        pub routing_key: &'a str,
        #[serde(with = "crate::cluster::codec::bytes")]
        pub properties: bytes::BytesMut,
        #[serde(with = "crate::cluster::codec::bytes")]
        pub body: &'a [u8],
        #[serde(skip_serializing_if = "Option::is_none")]
        pub p: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub s: Option<u64>,
        #[serde(skip_serializing_if = "Option::is_none")]
        pub t: Option<u64>,
    }

    #[derive(Deserialize)]
    pub struct Owned {
        exchange: String,
        routing_key: String,
        #[serde(with = "crate::cluster::codec::bytes")]
        properties: bytes::Bytes,
        #[serde(with = "crate::cluster::codec::bytes")]
        body: bytes::Bytes,
        #[serde(default)]
        pub p: Option<u64>,
        #[serde(default)]
        pub s: Option<u64>,
        #[serde(default)]
        pub t: Option<u64>,
    }

    impl Owned {
        /// The message (its publisher's fields not set); an error when its
        /// properties do not decode.
        pub fn into_msg<E: serde::de::Error>(self) -> Result<QMsg, E> {
            let properties = crate::wire::BasicProperties::decode(&self.properties)
                .map_err(|e| E::custom(format!("message properties: {e:?}")))?;
            let m = Message::new(&self.exchange, &self.routing_key, properties, self.body);
            let mut msg = QMsg::of(&m);
            msg.at = self.t.unwrap_or(0);
            Ok(msg)
        }
    }
}

/// An `Enqueue`'s messages with their publishers' numbers as runs: a
/// message carries `p` only when its publisher differs from the one before
/// it, and `s` only when its number is not the one before plus one (a batch
/// from one publisher numbers only its first message); likewise `t`, the
/// time its group took it, only when it differs from the one before (one
/// per batch: the leader stamps a batch once). Entries written with the
/// numbers on every message, or with none, read the same.
mod runs {
    use super::{wire, QMsg};
    use serde::{Deserialize, Deserializer, Serializer};

    /// The number a message of `publisher` is taken to carry when it does
    /// not say, after one of `prev` numbered `prev_seq`.
    fn implied(publisher: u64, prev: u64, prev_seq: u64) -> u64 {
        if publisher != prev || publisher == 0 {
            0
        } else {
            prev_seq + 1
        }
    }

    pub fn serialize<S: Serializer>(msgs: &[QMsg], s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(Some(msgs.len()))?;
        let (mut prev, mut prev_seq, mut prev_at) = (0, 0, 0);
        for m in msgs {
            if !m.is_held() {
                return Err(serde::ser::Error::custom(super::NOT_HELD));
            }
            let implied = implied(m.publisher, prev, prev_seq);
            seq.serialize_element(&m.wire(
                (m.publisher != prev).then_some(m.publisher),
                (m.seq != implied).then_some(m.seq),
                (m.at != prev_at).then_some(m.at),
            ))?;
            (prev, prev_seq, prev_at) = (m.publisher, m.seq, m.at);
        }
        seq.end()
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<QMsg>, D::Error> {
        let wire = Vec::<wire::Owned>::deserialize(d)?;
        let (mut prev, mut prev_seq, mut prev_at) = (0, 0, 0);
        wire.into_iter()
            .map(|w| {
                let publisher = w.p.unwrap_or(prev);
                let seq = w.s.unwrap_or_else(|| implied(publisher, prev, prev_seq));
                let at = w.t.unwrap_or(prev_at);
                (prev, prev_seq, prev_at) = (publisher, seq, at);
                let mut m = w.into_msg()?.sent_by(publisher, seq);
                m.at = at;
                Ok(m)
            })
            .collect()
    }
}

/// Most messages in one `Enqueue`.
pub const BATCH_MAX: usize = 1024;

/// Most body bytes in one `Enqueue` (one message larger than this goes in
/// an entry of its own): a log entry, and so an append-entries RPC, stays
/// well under the inter-node frame limit whatever the message size.
pub const BATCH_BYTES_MAX: usize = 256 << 10;

impl QCommand {
    /// About how many bytes the command takes encoded: its bodies, plus
    /// a little per message and per id (for a budget, not exact).
    pub fn size_hint(&self) -> usize {
        match self {
            QCommand::Enqueue(batch) => batch.iter().map(|m| m.size_hint()).sum(),
            QCommand::Settle(ids) | QCommand::Return(ids) => ids.len() * 9 + 16,
            QCommand::Checkout { out, back } => (out.len() + back.len()) * 9 + 16,
            QCommand::Horizon(_) => 16,
        }
    }
}

impl QMsg {
    /// About how many bytes the message takes encoded.
    pub fn size_hint(&self) -> usize {
        let m = &self.message;
        self.body_len() + m.exchange.len() + m.routing_key.len() + 64
    }
}

/// The id of the `i`th message of the `Enqueue` at log index `index`.
pub fn id(index: u64, i: usize) -> u64 {
    (index << 16) | (i as u64 & 0xffff)
}

/// One change of a quorum queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum QCommand {
    /// Published messages (at most [`BATCH_MAX`]), in their order; ids by
    /// [`id`]. Their publishers' numbers are written as runs ([`runs`]).
    Enqueue(#[serde(with = "runs")] Vec<QMsg>),
    /// Messages that left the queue for good (acked, rejected, expired,
    /// dropped, dead-lettered, purged), by id.
    Settle(Vec<u64>),
    /// Messages that reached a client and went back into the queue, by id:
    /// one more return each (RabbitMQ's delivery count, which
    /// `x-delivery-limit` bounds), kept for the next leader; no longer
    /// out with a client.
    Return(Vec<u64>),
    /// Messages handed to a client that must ack them (`out`: a consumer
    /// or a basic.get), and messages handed out that went back before they
    /// reached it (`back`: not a return), by id: the next leader counts one
    /// more return for each message still out at the failover (its
    /// client's channel was on the old leader, or is cancelled with it).
    Checkout { out: Vec<u64>, back: Vec<u64> },
    /// The serving leader's delivery horizon: no message with a larger id
    /// has gone out to a client (it delivers past it only once a larger one
    /// commits), so the next leader flags redelivered only what is at most
    /// this, was returned, or is out.
    Horizon(u64),
}

impl std::fmt::Display for QCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QCommand::Enqueue(m) => write!(f, "enqueue({} messages)", m.len()),
            QCommand::Settle(ids) => write!(f, "settle({} ids)", ids.len()),
            QCommand::Return(ids) => write!(f, "return({} ids)", ids.len()),
            QCommand::Checkout { out, back } => {
                write!(f, "checkout({} out, {} back)", out.len(), back.len())
            }
            QCommand::Horizon(h) => write!(f, "horizon({h})"),
        }
    }
}

/// What an `Enqueue` did with one of its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// Into the queue's state.
    New,
    /// Its publisher's number was taken before (a resend after a failover
    /// or a lost answer): the first copy stands.
    Duplicate,
    /// Past its publisher's next number (one before it never committed):
    /// not taken; the publisher resends from its first unanswered message.
    OutOfSequence,
}

/// A quorum publish's outcome, the group's answer to its publisher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// Committed and in the queue (or taken before: a resend).
    Taken,
    /// Committed, and the queue refused it (`x-overflow: reject-publish`).
    Refused,
    /// Not taken: resend from the publisher's first unanswered message.
    OutOfSequence,
}

/// One publisher as the group knows it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enqueuer {
    /// The number its next message must carry.
    pub next: u64,
    /// The log index of its last `Enqueue`.
    pub at: u64,
}

/// A publisher not heard from for this many log entries is forgotten (it
/// answered everything long ago: its node restarted, or it has been idle).
pub const ENQUEUER_IDLE: u64 = 1 << 20;

/// The live messages of the queue, by id (ascending: the queue's order),
/// the returns of those returned, and its publishers' next numbers. A
/// snapshot's state is also read field by field, by name, as it streams
/// from disk (`quorum::store::record::stripped`): a field added here is
/// read there too.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QState {
    pub messages: BTreeMap<u64, QMsg>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub enqueuers: BTreeMap<u64, Enqueuer>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub returns: BTreeMap<u64, u32>,
    /// Live messages out with a client (checked out, not yet settled or
    /// returned).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub out: BTreeSet<u64>,
    /// The delivery horizon ([`QCommand::Horizon`]): 0 until one commits.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub horizon: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl QState {
    /// Apply the command at log index `index`; for an `Enqueue`, what became
    /// of each message. A publisher's messages are taken in its order: a
    /// number below its next one is a duplicate, above it out of sequence
    /// (RabbitMQ's `rabbit_fifo` enqueuers); a publisher not known takes
    /// whatever number comes first.
    pub fn apply(&mut self, index: u64, cmd: &QCommand) -> Vec<Taken> {
        match cmd {
            QCommand::Enqueue(batch) => {
                if index.is_multiple_of(4096) {
                    self.enqueuers
                        .retain(|_, e| index.saturating_sub(e.at) < ENQUEUER_IDLE);
                }
                let mut out = Vec::with_capacity(batch.len());
                for (i, m) in batch.iter().enumerate() {
                    let taken = if m.publisher == 0 {
                        Taken::New
                    } else {
                        let e = self.enqueuers.entry(m.publisher).or_insert(Enqueuer {
                            next: m.seq,
                            at: index,
                        });
                        e.at = index;
                        match m.seq.cmp(&e.next) {
                            std::cmp::Ordering::Less => Taken::Duplicate,
                            std::cmp::Ordering::Greater => Taken::OutOfSequence,
                            std::cmp::Ordering::Equal => {
                                e.next += 1;
                                Taken::New
                            }
                        }
                    };
                    if taken == Taken::New {
                        // The state needs no numbers (smaller snapshots).
                        self.messages.insert(id(index, i), m.clone().sent_by(0, 0));
                    }
                    out.push(taken);
                }
                out
            }
            QCommand::Settle(ids) => {
                for id in ids {
                    self.messages.remove(id);
                    self.returns.remove(id);
                    self.out.remove(id);
                }
                Vec::new()
            }
            QCommand::Return(ids) => {
                for id in ids.iter().filter(|id| self.messages.contains_key(id)) {
                    let n = self.returns.entry(*id).or_default();
                    *n = n.saturating_add(1);
                    self.out.remove(id);
                }
                Vec::new()
            }
            QCommand::Checkout { out, back } => {
                for id in back {
                    self.out.remove(id);
                }
                let live = out.iter().filter(|id| self.messages.contains_key(id));
                self.out.extend(live);
                Vec::new()
            }
            QCommand::Horizon(h) => {
                self.horizon = self.horizon.max(*h);
                Vec::new()
            }
        }
    }

    /// How many times message `id` went back into the queue.
    pub fn returns(&self, id: u64) -> u32 {
        self.returns.get(&id).copied().unwrap_or(0)
    }

    /// Message `id` may have reached a client before: at most the delivery
    /// horizon, returned, or out.
    pub fn may_have_gone_out(&self, id: u64) -> bool {
        id <= self.horizon || self.returns.contains_key(&id) || self.out.contains(&id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(body: &str) -> QMsg {
        bytes_msg(body.as_bytes())
    }

    fn bytes_msg(body: &[u8]) -> QMsg {
        let m = Message::new(
            "x",
            "k",
            crate::wire::BasicProperties::default(),
            bytes::Bytes::copy_from_slice(body),
        );
        QMsg::of(&m)
    }

    #[test]
    fn enqueue_settle_and_order() {
        let mut s = QState::default();
        s.apply(3, &QCommand::Enqueue(vec![msg("a"), msg("b")]));
        s.apply(7, &QCommand::Enqueue(vec![msg("c")]));
        let ids: Vec<u64> = s.messages.keys().copied().collect();
        assert_eq!(ids, vec![id(3, 0), id(3, 1), id(7, 0)]);
        assert!(id(3, 1) < id(4, 0), "ids follow the log, then the batch");
        s.apply(8, &QCommand::Settle(vec![id(3, 1), 99]));
        let ids: Vec<u64> = s.messages.keys().copied().collect();
        assert_eq!(ids, vec![id(3, 0), id(7, 0)]);
        // Settling again (a resent batch) changes nothing.
        s.apply(9, &QCommand::Settle(vec![id(3, 1)]));
        assert_eq!(s.messages.len(), 2);
        let m = s.messages[&id(7, 0)].message();
        assert_eq!(&m.body[..], b"c");
        assert_eq!(m.routing_key.as_str(), "k");
    }

    #[test]
    fn returns_are_counted_for_live_messages_and_kept_in_the_snapshot() {
        let mut s = QState::default();
        s.apply(1, &QCommand::Enqueue(vec![msg("a"), msg("b")]));
        let (a, b) = (id(1, 0), id(1, 1));
        s.apply(2, &QCommand::Return(vec![a, b]));
        s.apply(3, &QCommand::Return(vec![a, 99]));
        assert_eq!((s.returns(a), s.returns(b), s.returns(99)), (2, 1, 0));
        assert!(
            !s.returns.contains_key(&99),
            "nothing kept for an id not live"
        );
        let back: QState =
            crate::cluster::codec::decode(&crate::cluster::codec::encode(&s).expect("encodes"))
                .expect("decodes");
        assert_eq!(back, s);
        // Settled: forgotten with its message; a late return changes nothing.
        s.apply(4, &QCommand::Settle(vec![a]));
        s.apply(5, &QCommand::Return(vec![a]));
        assert_eq!((s.returns(a), s.returns(b)), (0, 1));
        assert!(!s.returns.contains_key(&a));
        // A state written before returns were counted reads as none.
        let old: QState = serde_json::from_str(r#"{"messages":{}}"#).expect("decodes");
        assert!(old.returns.is_empty());
    }

    #[test]
    fn checkouts_mark_live_messages_out_until_returned_or_settled() {
        let mut s = QState::default();
        s.apply(1, &QCommand::Enqueue(vec![msg("a"), msg("b"), msg("c")]));
        let (a, b, c) = (id(1, 0), id(1, 1), id(1, 2));
        let out = |v: Vec<u64>, back: Vec<u64>| QCommand::Checkout { out: v, back };
        s.apply(2, &out(vec![a, b, c, 99], vec![]));
        assert_eq!(s.out, BTreeSet::from([a, b, c]), "not an id not live");
        // Returned: counted, no longer out; back unsent: not counted.
        s.apply(3, &QCommand::Return(vec![a]));
        s.apply(4, &out(vec![], vec![b]));
        assert_eq!(s.out, BTreeSet::from([c]));
        assert_eq!((s.returns(a), s.returns(b)), (1, 0));
        // Out again after a return; settled: forgotten.
        s.apply(5, &out(vec![a], vec![]));
        s.apply(6, &QCommand::Settle(vec![c]));
        assert_eq!(s.out, BTreeSet::from([a]));
        // Kept in the snapshot; a state written before reads as none out.
        let back: QState =
            crate::cluster::codec::decode(&crate::cluster::codec::encode(&s).expect("encodes"))
                .expect("decodes");
        assert_eq!(back, s);
        let old: QState = serde_json::from_str(r#"{"messages":{}}"#).expect("decodes");
        assert!(old.out.is_empty());
        let cmd = out(vec![a, b], vec![c]);
        let bin = crate::cluster::codec::encode(&cmd).expect("encodes");
        assert_eq!(
            crate::cluster::codec::decode::<QCommand>(&bin).ok(),
            Some(cmd)
        );
    }

    #[test]
    fn the_delivery_horizon_only_grows_and_says_what_may_have_gone_out() {
        let mut s = QState::default();
        s.apply(1, &QCommand::Enqueue(vec![msg("a"), msg("b"), msg("c")]));
        let (a, b, c) = (id(1, 0), id(1, 1), id(1, 2));
        assert!(![a, b, c].iter().any(|i| s.may_have_gone_out(*i)));
        s.apply(2, &QCommand::Horizon(a));
        s.apply(3, &QCommand::Horizon(0));
        assert_eq!(s.horizon, a, "never lowered");
        // Returned or out (a basic.get) counts too, past the horizon.
        s.apply(
            4,
            &QCommand::Checkout {
                out: vec![c],
                back: vec![],
            },
        );
        let gone: Vec<bool> = [a, b, c].iter().map(|i| s.may_have_gone_out(*i)).collect();
        assert_eq!(gone, [true, false, true]);
        // Kept in the snapshot; a state written before has none.
        let back: QState =
            crate::cluster::codec::decode(&crate::cluster::codec::encode(&s).expect("encodes"))
                .expect("decodes");
        assert_eq!(back.horizon, a);
        let old: QState = serde_json::from_str(r#"{"messages":{}}"#).expect("decodes");
        assert_eq!(old.horizon, 0);
        let cmd = QCommand::Horizon(b);
        let bin = crate::cluster::codec::encode(&cmd).expect("encodes");
        assert_eq!(
            crate::cluster::codec::decode::<QCommand>(&bin).ok(),
            Some(cmd)
        );
    }

    #[test]
    fn a_publishers_messages_are_taken_once_and_in_order() {
        let mut s = QState::default();
        let by = |seq: u64, body: &str| msg(body).sent_by(7, seq);
        // A publisher not known starts where it starts.
        let t = s.apply(2, &QCommand::Enqueue(vec![by(5, "a"), by(6, "b")]));
        assert_eq!(t, vec![Taken::New, Taken::New]);
        // Resent after a failover with one more: the first two are known.
        let t = s.apply(
            3,
            &QCommand::Enqueue(vec![by(5, "a"), by(6, "b"), by(7, "c")]),
        );
        assert_eq!(t, vec![Taken::Duplicate, Taken::Duplicate, Taken::New]);
        // 8 never committed: 9 is not taken, and neither is 10 behind it.
        let t = s.apply(4, &QCommand::Enqueue(vec![by(9, "e"), by(10, "f")]));
        assert_eq!(t, vec![Taken::OutOfSequence, Taken::OutOfSequence]);
        let t = s.apply(
            5,
            &QCommand::Enqueue(vec![by(8, "d"), by(9, "e"), msg("x")]),
        );
        assert_eq!(t, vec![Taken::New, Taken::New, Taken::New]);
        let bodies: Vec<&[u8]> = s.messages.values().map(|m| &m.message.body[..]).collect();
        assert_eq!(bodies, [&b"a"[..], b"b", b"c", b"d", b"e", b"x"]);
        assert_eq!(s.enqueuers[&7], Enqueuer { next: 10, at: 5 });
        // Idle publishers are forgotten (checked every 4096 entries).
        s.apply(ENQUEUER_IDLE + 4096, &QCommand::Enqueue(vec![msg("y")]));
        assert!(s.enqueuers.is_empty());
        // The enqueuers are part of the snapshot.
        s.apply(ENQUEUER_IDLE + 4097, &QCommand::Enqueue(vec![by(1, "z")]));
        let json = serde_json::to_vec(&s).expect("encodes");
        assert_eq!(serde_json::from_slice::<QState>(&json).ok(), Some(s));
    }

    #[test]
    fn an_enqueue_writes_its_numbers_as_runs() {
        let by = |p: u64, seq: u64| msg("m").sent_by(p, seq);
        let batch = vec![
            by(7, 5),
            by(7, 6),
            by(7, 7),
            by(0, 0),
            by(0, 0),
            by(9, 1),
            by(9, 3),
            by(7, 8),
        ];
        let cmd = QCommand::Enqueue(batch.clone());
        let json = String::from_utf8(serde_json::to_vec(&cmd).expect("encodes")).expect("utf8");
        assert_eq!(json.matches("\"p\":").count(), 4, "{json}");
        assert_eq!(json.matches("\"s\":").count(), 4, "{json}");
        let back: QCommand = serde_json::from_str(&json).expect("decodes");
        assert_eq!(back, cmd);
        // A batch stamped once writes its time once; a change writes it again.
        let mut stamped = batch;
        for (i, m) in stamped.iter_mut().enumerate() {
            m.at = if i < 6 { 1_000 } else { 2_000 };
        }
        let cmd = QCommand::Enqueue(stamped);
        let json = String::from_utf8(serde_json::to_vec(&cmd).expect("encodes")).expect("utf8");
        assert_eq!(json.matches("\"t\":").count(), 2, "{json}");
        let back: QCommand = serde_json::from_str(&json).expect("decodes");
        assert_eq!(back, cmd);
        // Numbers on every message (or on none) read the same.
        let every = r#"{"Enqueue":[{"exchange":"x","routing_key":"k","properties":"AAA=","body":"","p":7,"s":5},{"exchange":"x","routing_key":"k","properties":"AAA=","body":"","p":7,"s":9}]}"#;
        let QCommand::Enqueue(b) = serde_json::from_str(every).expect("decodes") else {
            panic!("an enqueue")
        };
        assert_eq!(
            (b[0].publisher, b[0].seq, b[1].publisher, b[1].seq),
            (7, 5, 7, 9)
        );
        let none = r#"{"Enqueue":[{"exchange":"x","routing_key":"k","properties":"AAA=","body":""},{"exchange":"x","routing_key":"k","properties":"AAA=","body":""}]}"#;
        let QCommand::Enqueue(b) = serde_json::from_str(none).expect("decodes") else {
            panic!("an enqueue")
        };
        assert!(b.iter().all(|m| m.publisher == 0 && m.seq == 0));
    }

    #[test]
    fn commands_and_state_round_trip_through_the_binary_encoding() {
        use crate::cluster::codec::{decode, encode};
        let body: Vec<u8> = (0..=255u8).collect();
        let mut taken = bytes_msg(b"x");
        taken.at = 1_764_892_800_123;
        let batch = vec![
            bytes_msg(&body).sent_by(7, 1),
            bytes_msg(b"").sent_by(7, 2),
            taken,
        ];
        let cmd = QCommand::Enqueue(batch);
        let bin = encode(&cmd).expect("encodes");
        let json = serde_json::to_vec(&cmd).expect("encodes");
        assert!(bin.len() + 80 < json.len(), "{} {}", bin.len(), json.len());
        assert_eq!(decode::<QCommand>(&bin).expect("decodes"), cmd);
        // Entries written as JSON before are still read.
        assert_eq!(decode::<QCommand>(&json).expect("decodes"), cmd);
        let mut s = QState::default();
        s.apply(1, &cmd);
        let back: QState = decode(&encode(&s).expect("encodes")).expect("decodes");
        assert_eq!(back, s);
        assert_eq!(back.messages[&id(1, 0)].message.body, body);
        // When the group took a message stays with it (its TTL's start).
        assert_eq!(back.messages[&id(1, 2)].at, 1_764_892_800_123);
        assert_eq!(back.messages[&id(1, 0)].at, 0);
        // Properties that do not decode make the entry unreadable.
        let settle = encode(&QCommand::Settle(vec![1, 2])).expect("encodes");
        assert_eq!(
            decode::<QCommand>(&settle).ok(),
            Some(QCommand::Settle(vec![1, 2]))
        );
        let mut bad = bytes::BytesMut::new();
        bad.extend_from_slice(&[0xff, 0xff]);
        let w = wire::Ref {
            exchange: "",
            routing_key: "",
            properties: bad,
            body: b"",
            p: None,
            s: None,
            t: None,
        };
        let bad =
            encode(&std::collections::BTreeMap::from([("Enqueue", vec![w])])).expect("encodes");
        assert!(decode::<QCommand>(&bad).is_err());
    }

    #[test]
    fn commands_and_state_round_trip_through_json() {
        let mut s = QState::default();
        let body: Vec<u8> = (0..=255u8).collect();
        let m = bytes_msg(&body);
        let cmd = QCommand::Enqueue(vec![m]);
        let json = serde_json::to_vec(&cmd).expect("encodes");
        let back: QCommand = serde_json::from_slice(&json).expect("decodes");
        assert_eq!(back, cmd);
        s.apply(1, &back);
        let json = serde_json::to_vec(&s).expect("encodes");
        let back: QState = serde_json::from_slice(&json).expect("decodes");
        assert_eq!(back, s);
        assert_eq!(back.messages[&id(1, 0)].message.body, body);
        assert!(serde_json::from_slice::<QCommand>(
            br#"{"Enqueue":[{"exchange":"","routing_key":"","properties":"!!","body":""}]}"#
        )
        .is_err());
    }
}
