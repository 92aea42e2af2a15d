//! A quorum queue group's commands and the state they build (pure: no I/O,
//! no broker). The state is the queue's live messages by id, an id being
//! made of the log index of the message's `Enqueue` and its place in that
//! batch ([`id`]: increasing in the queue's order); it is the group's snapshot.

use crate::broker::message::Message;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

/// One message as the group keeps it: enough to rebuild the AMQP message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QMsg {
    pub exchange: String,
    pub routing_key: String,
    /// The encoded AMQP properties.
    #[serde(with = "b64")]
    pub properties: Vec<u8>,
    #[serde(with = "b64")]
    pub body: Vec<u8>,
}

impl QMsg {
    pub fn of(m: &Message) -> QMsg {
        let mut props = bytes::BytesMut::new();
        m.properties.encode(&mut props);
        QMsg {
            exchange: m.exchange.to_string(),
            routing_key: m.routing_key.to_string(),
            properties: props.to_vec(),
            body: m.body.to_vec(),
        }
    }

    /// The AMQP message (None if its properties do not decode).
    pub fn message(&self) -> Option<Arc<Message>> {
        let properties = crate::wire::BasicProperties::decode(&self.properties).ok()?;
        Some(Message::new(
            &self.exchange,
            &self.routing_key,
            properties,
            bytes::Bytes::copy_from_slice(&self.body),
        ))
    }
}

/// Bytes as base64 in the JSON the log and the RPCs carry.
mod b64 {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s.as_bytes())
            .map_err(serde::de::Error::custom)
    }
}

/// Most messages in one `Enqueue`.
pub const BATCH_MAX: usize = 1024;

/// The id of the `i`th message of the `Enqueue` at log index `index`.
pub fn id(index: u64, i: usize) -> u64 {
    (index << 16) | (i as u64 & 0xffff)
}

/// One change of a quorum queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum QCommand {
    /// Published messages (at most [`BATCH_MAX`]), in their order; ids by [`id`].
    Enqueue(Vec<QMsg>),
    /// Messages that left the queue for good (acked, rejected, expired,
    /// dropped, dead-lettered, purged), by id.
    Settle(Vec<u64>),
}

impl std::fmt::Display for QCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            QCommand::Enqueue(m) => write!(f, "enqueue({} messages)", m.len()),
            QCommand::Settle(ids) => write!(f, "settle({} ids)", ids.len()),
        }
    }
}

/// The live messages of the queue, by id (ascending: the queue's order).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QState {
    pub messages: BTreeMap<u64, QMsg>,
}

impl QState {
    /// Apply the command at log index `index`.
    pub fn apply(&mut self, index: u64, cmd: &QCommand) {
        match cmd {
            QCommand::Enqueue(batch) => {
                for (i, m) in batch.iter().enumerate() {
                    self.messages.insert(id(index, i), m.clone());
                }
            }
            QCommand::Settle(ids) => {
                for id in ids {
                    self.messages.remove(id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(body: &str) -> QMsg {
        let m = Message::new(
            "x",
            "k",
            crate::wire::BasicProperties::default(),
            bytes::Bytes::copy_from_slice(body.as_bytes()),
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
        let m = s.messages[&id(7, 0)].message().expect("decodes");
        assert_eq!(&m.body[..], b"c");
        assert_eq!(m.routing_key.as_str(), "k");
    }

    #[test]
    fn commands_and_state_round_trip_through_json() {
        let mut s = QState::default();
        let body: Vec<u8> = (0..=255u8).collect();
        let mut m = msg("");
        m.body = body.clone();
        let cmd = QCommand::Enqueue(vec![m]);
        let json = serde_json::to_vec(&cmd).expect("encodes");
        let back: QCommand = serde_json::from_slice(&json).expect("decodes");
        assert_eq!(back, cmd);
        s.apply(1, &back);
        let json = serde_json::to_vec(&s).expect("encodes");
        let back: QState = serde_json::from_slice(&json).expect("decodes");
        assert_eq!(back, s);
        assert_eq!(back.messages[&id(1, 0)].body, body);
        assert!(serde_json::from_slice::<QCommand>(
            br#"{"Enqueue":[{"exchange":"","routing_key":"","properties":"!!","body":""}]}"#
        )
        .is_err());
    }
}
