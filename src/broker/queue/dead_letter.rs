//! Dead-lettering: the `x-death` bookkeeping RabbitMQ does when a message is
//! rejected, expires, is dropped by a length limit or goes past its delivery
//! limit, and cycle detection.

use crate::broker::message::Message;
use crate::wire::{BasicProperties, FieldTable, FieldValue};
use std::sync::Arc;

/// Why a message was dead-lettered (the `reason` in `x-death`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Rejected,
    Expired,
    MaxLen,
    /// Returned more often than the queue's delivery limit allows.
    DeliveryLimit,
}

impl Reason {
    pub fn as_str(&self) -> &'static str {
        match self {
            Reason::Rejected => "rejected",
            Reason::Expired => "expired",
            Reason::MaxLen => "maxlen",
            Reason::DeliveryLimit => "delivery_limit",
        }
    }
}

fn text(v: &FieldValue) -> Option<&str> {
    v.as_str()
}

/// The routing keys a message was published with: its key plus `CC` and `BCC`.
fn routing_keys(message: &Message) -> Vec<FieldValue> {
    let mut keys = vec![FieldValue::string(message.routing_key.clone())];
    if let Some(headers) = &message.properties.headers {
        for h in ["CC", "BCC"] {
            if let Some(FieldValue::Array(extra)) = headers.get(h) {
                keys.extend(extra.iter().filter(|v| text(v).is_some()).cloned());
            }
        }
    }
    keys
}

/// The message as it leaves `queue` for the dead-letter exchange `dlx`: `x-death`
/// gains or bumps the (queue, reason) entry and moves it first, `x-first-death-*`
/// is set once, `x-last-death-*` every time, and a per-message `expiration` is
/// removed (kept as `original-expiration`). `routing_key` is the key to publish with.
pub fn dead_letter(
    message: &Message,
    queue: &str,
    reason: Reason,
    dlx: &str,
    routing_key: Option<&str>,
    now_secs: u64,
) -> Arc<Message> {
    let mut props: BasicProperties = message.properties.clone();
    let mut headers = props.headers.take().unwrap_or_default();
    let mut deaths: Vec<FieldValue> = match headers.remove("x-death") {
        Some(FieldValue::Array(a)) => a,
        _ => Vec::new(),
    };
    let matches = |d: &FieldValue| match d {
        FieldValue::Table(t) => {
            t.get("queue").and_then(text) == Some(queue)
                && t.get("reason").and_then(text) == Some(reason.as_str())
        }
        _ => false,
    };
    let entry = match deaths.iter().position(matches) {
        Some(i) => {
            let mut existing = deaths.remove(i);
            if let FieldValue::Table(t) = &mut existing {
                // Only the count changes: RabbitMQ keeps the first death's time.
                let count = t.get("count").and_then(|c| c.as_i64()).unwrap_or(0);
                t.insert("count", FieldValue::I64(count + 1));
            }
            existing
        }
        None => {
            let mut t = FieldTable::new();
            t.insert("count", FieldValue::I64(1));
            t.insert("reason", FieldValue::string(reason.as_str()));
            t.insert("queue", FieldValue::string(queue));
            t.insert("time", FieldValue::Timestamp(now_secs));
            t.insert("exchange", FieldValue::string(message.exchange.clone()));
            t.insert("routing-keys", FieldValue::Array(routing_keys(message)));
            if let Some(exp) = &props.expiration {
                t.insert("original-expiration", FieldValue::string(exp.clone()));
            }
            FieldValue::Table(t)
        }
    };
    deaths.insert(0, entry);
    props.expiration = None;
    if routing_key.is_some() {
        // Routed by the dead-letter routing key alone: RabbitMQ drops the CC keys.
        headers.remove("CC");
    }
    if headers.get("x-first-death-queue").is_none() {
        headers.insert("x-first-death-queue", FieldValue::string(queue));
        headers.insert("x-first-death-reason", FieldValue::string(reason.as_str()));
        headers.insert(
            "x-first-death-exchange",
            FieldValue::string(message.exchange.clone()),
        );
    }
    headers.insert("x-last-death-queue", FieldValue::string(queue));
    headers.insert("x-last-death-reason", FieldValue::string(reason.as_str()));
    headers.insert(
        "x-last-death-exchange",
        FieldValue::string(message.exchange.clone()),
    );
    headers.insert("x-death", FieldValue::Array(deaths));
    props.headers = Some(headers);
    let key = routing_key.unwrap_or(&message.routing_key).to_string();
    Message::new(dlx, key, props, message.body.clone())
}

/// Whether sending `message` (already dead-lettered) to `target` would close a cycle
/// with no rejection in it; RabbitMQ drops the message for such a queue.
pub fn is_cycle(message: &Message, target: &str) -> bool {
    let Some(FieldValue::Array(deaths)) = message
        .properties
        .headers
        .as_ref()
        .and_then(|h| h.get("x-death"))
    else {
        return false;
    };
    let mut seen_target = false;
    for d in deaths {
        if let FieldValue::Table(t) = d {
            if t.get("reason").and_then(text) == Some("rejected") {
                return false;
            }
            if t.get("queue").and_then(text) == Some(target) {
                seen_target = true;
            }
        }
    }
    seen_target
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn msg() -> Arc<Message> {
        let props = BasicProperties {
            expiration: Some("5000".into()),
            ..Default::default()
        };
        Message::new("ex", "rk", props, Bytes::from_static(b"body"))
    }

    fn death(m: &Message, i: usize) -> FieldTable {
        match m.properties.headers.as_ref().and_then(|h| h.get("x-death")) {
            Some(FieldValue::Array(a)) => match &a[i] {
                FieldValue::Table(t) => t.clone(),
                other => panic!("not a table: {other:?}"),
            },
            other => panic!("no x-death: {other:?}"),
        }
    }

    #[test]
    fn first_death_builds_entry_and_headers() {
        let d = dead_letter(&msg(), "q1", Reason::Expired, "dlx", None, 42);
        assert_eq!(d.exchange, "dlx");
        assert_eq!(d.routing_key, "rk");
        assert_eq!(d.properties.expiration, None);
        let t = death(&d, 0);
        assert_eq!(t.get("count"), Some(&FieldValue::I64(1)));
        assert_eq!(t.get("reason").and_then(text), Some("expired"));
        assert_eq!(t.get("queue").and_then(text), Some("q1"));
        assert_eq!(t.get("exchange").and_then(text), Some("ex"));
        assert_eq!(t.get("time"), Some(&FieldValue::Timestamp(42)));
        assert_eq!(t.get("original-expiration").and_then(text), Some("5000"));
        assert_eq!(
            t.get("routing-keys"),
            Some(&FieldValue::Array(vec![FieldValue::string("rk")]))
        );
        let h = d.properties.headers.as_ref().expect("headers");
        assert_eq!(h.get("x-first-death-queue").and_then(text), Some("q1"));
        assert_eq!(h.get("x-last-death-reason").and_then(text), Some("expired"));
    }

    #[test]
    fn repeated_death_folds_count_and_moves_first() {
        let a = dead_letter(&msg(), "q1", Reason::Rejected, "dlx", Some("retry"), 1);
        assert_eq!(a.routing_key, "retry");
        let b = dead_letter(&a, "q2", Reason::Expired, "dlx", None, 2);
        let c = dead_letter(&b, "q1", Reason::Rejected, "dlx", None, 3);
        let first = death(&c, 0);
        assert_eq!(first.get("queue").and_then(text), Some("q1"));
        assert_eq!(first.get("count"), Some(&FieldValue::I64(2)));
        assert_eq!(first.get("time"), Some(&FieldValue::Timestamp(1)));
        assert_eq!(death(&c, 1).get("queue").and_then(text), Some("q2"));
        let h = c.properties.headers.as_ref().expect("headers");
        assert_eq!(
            h.get("x-first-death-reason").and_then(text),
            Some("rejected")
        );
        assert_eq!(h.get("x-last-death-queue").and_then(text), Some("q1"));
    }

    #[test]
    fn cycles_without_rejection_are_detected() {
        let a = dead_letter(&msg(), "q1", Reason::Expired, "dlx", None, 1);
        assert!(is_cycle(&a, "q1"));
        assert!(!is_cycle(&a, "q2"));
        let r = dead_letter(&msg(), "q1", Reason::Rejected, "dlx", None, 1);
        assert!(!is_cycle(&r, "q1"));
    }
}
