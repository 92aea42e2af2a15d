//! A shovel's definition: the JSON value of a `shovel` runtime parameter (or a
//! static shovel's config table) with RabbitMQ's keys, checked and turned into a
//! [`Definition`]. Pure: no I/O.
//!
//! Keys (as RabbitMQ's shovel plugin reads them): `src-protocol` / `dest-protocol`
//! (`amqp091`), `src-uri` / `dest-uri` (a string or a list; `amqp://` and
//! `amqps://`), `src-queue` or `src-exchange` + `src-exchange-key`, `dest-queue` or
//! `dest-exchange` + `dest-exchange-key`, `src-prefetch-count` (default 1000),
//! `ack-mode` (`on-confirm` by default, `on-publish`, `no-ack`), `src-delete-after`
//! (`never`, `queue-length`, a number), `reconnect-delay` (seconds, default 5),
//! `dest-add-forward-headers`, `dest-add-timestamp-header`,
//! `dest-publish-properties`, `src-predeclared` / `dest-predeclared`. The older
//! unprefixed spellings (`prefetch-count`, `delete-after`, `add-forward-headers`)
//! are accepted too.

use serde_json::{Map, Value};
use std::time::Duration;

/// When to acknowledge a message at the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckMode {
    /// After the destination confirmed it (publisher confirms): nothing is lost.
    OnConfirm,
    /// As soon as it is published to the destination.
    OnPublish,
    /// Never: the source forgets a message once it is delivered to the shovel.
    NoAck,
}

impl AckMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AckMode::OnConfirm => "on-confirm",
            AckMode::OnPublish => "on-publish",
            AckMode::NoAck => "no-ack",
        }
    }
}

/// When the shovel stops and deletes itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteAfter {
    Never,
    /// After moving the messages the source queue held when the shovel started.
    QueueLength,
    /// After moving this many messages.
    Count(u64),
}

/// Where messages are consumed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// A queue (declared durable if absent, unless predeclared).
    Queue(String),
    /// An exchange: the shovel consumes from an exclusive queue of its own bound
    /// to it with `key`.
    Exchange { exchange: String, key: String },
}

/// Where messages are published to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// The default exchange with the queue's name as routing key (declared
    /// durable if absent, unless predeclared).
    Queue(String),
    /// An exchange, with `key` or else each message's own routing key.
    Exchange {
        exchange: String,
        key: Option<String>,
    },
    /// Each message's own exchange and routing key.
    Same,
}

/// A checked shovel definition.
#[derive(Debug, Clone, PartialEq)]
pub struct Definition {
    pub src_uris: Vec<String>,
    pub dest_uris: Vec<String>,
    pub source: Source,
    pub destination: Destination,
    pub prefetch_count: u16,
    pub ack_mode: AckMode,
    pub delete_after: DeleteAfter,
    pub reconnect_delay: Duration,
    pub src_predeclared: bool,
    pub dest_predeclared: bool,
    pub add_forward_headers: bool,
    pub add_timestamp_header: bool,
    /// Message properties set on every published message (`delivery_mode`,
    /// `content_type`, ...), by their AMQP names.
    pub publish_properties: Map<String, Value>,
}

/// The keys a definition may have.
const KNOWN: &[&str] = &[
    "src-protocol",
    "dest-protocol",
    "src-uri",
    "dest-uri",
    "src-queue",
    "src-queue-args",
    "src-exchange",
    "src-exchange-key",
    "src-consumer-args",
    "dest-queue",
    "dest-queue-args",
    "dest-exchange",
    "dest-exchange-key",
    "src-prefetch-count",
    "prefetch-count",
    "ack-mode",
    "src-delete-after",
    "delete-after",
    "reconnect-delay",
    "dest-add-forward-headers",
    "add-forward-headers",
    "dest-add-timestamp-header",
    "dest-publish-properties",
    "src-predeclared",
    "dest-predeclared",
];

/// The property names `dest-publish-properties` accepts.
pub const PUBLISH_PROPERTIES: &[&str] = &[
    "content_type",
    "content_encoding",
    "delivery_mode",
    "priority",
    "correlation_id",
    "reply_to",
    "expiration",
    "message_id",
    "timestamp",
    "type",
    "user_id",
    "app_id",
    "cluster_id",
];

/// Check a shovel's JSON value; the error is the reason for a 400.
pub fn parse(value: &Value) -> Result<Definition, String> {
    let def = value.as_object().ok_or_else(|| {
        "Validation failed\n\nshovel definition must be a JSON object".to_string()
    })?;
    let fail = |text: String| format!("Validation failed\n\n{text}");
    if let Some(k) = def.keys().find(|k| !KNOWN.contains(&k.as_str())) {
        return Err(fail(format!("Unrecognised terms [{k}] in shovel")));
    }
    for key in ["src-protocol", "dest-protocol"] {
        match def.get(key) {
            None => {}
            Some(Value::String(p)) if p == "amqp091" => {}
            Some(other) => {
                return Err(fail(format!(
                    "{key} must be \"amqp091\" (the only protocol warren shovels), got {other}"
                )))
            }
        }
    }
    let src_uris = uris(def, "src-uri").map_err(fail)?;
    let dest_uris = uris(def, "dest-uri").map_err(fail)?;
    let text = |key: &str| -> Result<Option<String>, String> {
        match def.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(other) => Err(fail(format!(
                "{key} should be a string, actually was {other}"
            ))),
        }
    };
    let source = match (text("src-queue")?, text("src-exchange")?) {
        (Some(q), None) => Source::Queue(q),
        (None, Some(x)) => Source::Exchange {
            exchange: x,
            key: text("src-exchange-key")?.unwrap_or_default(),
        },
        (None, None) => return Err(fail("Must specify 'src-exchange' or 'src-queue'".into())),
        (Some(_), Some(_)) => {
            return Err(fail("Cannot specify 'src-exchange' and 'src-queue'".into()))
        }
    };
    let destination = match (text("dest-queue")?, text("dest-exchange")?) {
        (Some(q), None) => Destination::Queue(q),
        (None, Some(x)) => Destination::Exchange {
            exchange: x,
            key: text("dest-exchange-key")?,
        },
        (None, None) => Destination::Same,
        (Some(_), Some(_)) => {
            return Err(fail(
                "Cannot specify 'dest-exchange' and 'dest-queue'".into(),
            ))
        }
    };
    let prefetch = either(def, "src-prefetch-count", "prefetch-count");
    let prefetch_count = match prefetch {
        None => 1000,
        Some(v) => v
            .as_u64()
            .and_then(|n| u16::try_from(n).ok())
            .ok_or_else(|| {
                fail(format!(
                    "src-prefetch-count should be a number from 0 to 65535, actually was {v}"
                ))
            })?,
    };
    let ack_mode = match def.get("ack-mode") {
        None => AckMode::OnConfirm,
        Some(Value::String(s)) if s == "on-confirm" => AckMode::OnConfirm,
        Some(Value::String(s)) if s == "on-publish" => AckMode::OnPublish,
        Some(Value::String(s)) if s == "no-ack" => AckMode::NoAck,
        Some(other) => {
            return Err(fail(format!(
                "ack-mode should be one of \"on-confirm\", \"on-publish\", \"no-ack\", actually was {other}"
            )))
        }
    };
    let delete_after = match either(def, "src-delete-after", "delete-after") {
        None => DeleteAfter::Never,
        Some(Value::String(s)) if s == "never" => DeleteAfter::Never,
        Some(Value::String(s)) if s == "queue-length" => DeleteAfter::QueueLength,
        Some(v) if v.as_u64().is_some() => DeleteAfter::Count(v.as_u64().unwrap_or(0)),
        Some(other) => {
            return Err(fail(format!(
                "src-delete-after should be a number, \"never\" or \"queue-length\", actually was {other}"
            )))
        }
    };
    if ack_mode == AckMode::NoAck && matches!(delete_after, DeleteAfter::Count(_)) {
        return Err(fail(
            "Cannot specify 'no-ack' and numerical 'delete-after'".into(),
        ));
    }
    if matches!(source, Source::Exchange { .. }) && delete_after == DeleteAfter::QueueLength {
        return Err(fail(
            "Shovel src-delete-after \"queue-length\" needs a src-queue".into(),
        ));
    }
    let reconnect_delay = match def.get("reconnect-delay") {
        None => Duration::from_secs(5),
        Some(v) => v
            .as_f64()
            .filter(|s| s.is_finite() && *s >= 0.0 && *s <= 86_400.0)
            .map(Duration::from_secs_f64)
            .ok_or_else(|| {
                fail(format!(
                    "reconnect-delay should be a number of seconds, actually was {v}"
                ))
            })?,
    };
    let flag = |keys: &[&str]| -> Result<bool, String> {
        match keys.iter().find_map(|k| def.get(*k).map(|v| (k, v))) {
            None => Ok(false),
            Some((_, Value::Bool(b))) => Ok(*b),
            Some((k, other)) => Err(fail(format!(
                "{k} should be a boolean, actually was {other}"
            ))),
        }
    };
    let publish_properties = match def.get("dest-publish-properties") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => {
            if let Some(k) = m.keys().find(|k| !PUBLISH_PROPERTIES.contains(&k.as_str())) {
                return Err(fail(format!(
                    "dest-publish-properties: unknown property {k}"
                )));
            }
            for (k, v) in m {
                let ok = match k.as_str() {
                    "delivery_mode" | "priority" => v.as_u64().is_some_and(|n| n <= 255),
                    "timestamp" => v.as_u64().is_some(),
                    _ => v.is_string(),
                };
                if !ok {
                    return Err(fail(format!(
                        "dest-publish-properties: bad value {v} for {k}"
                    )));
                }
            }
            m.clone()
        }
        Some(other) => {
            return Err(fail(format!(
                "dest-publish-properties should be an object, actually was {other}"
            )))
        }
    };
    Ok(Definition {
        src_uris,
        dest_uris,
        source,
        destination,
        prefetch_count,
        ack_mode,
        delete_after,
        reconnect_delay,
        src_predeclared: flag(&["src-predeclared"])?,
        dest_predeclared: flag(&["dest-predeclared"])?,
        add_forward_headers: flag(&["dest-add-forward-headers", "add-forward-headers"])?,
        add_timestamp_header: flag(&["dest-add-timestamp-header"])?,
        publish_properties,
    })
}

fn either<'a>(def: &'a Map<String, Value>, key: &str, old: &str) -> Option<&'a Value> {
    def.get(key).or_else(|| def.get(old))
}

/// `src-uri` / `dest-uri`: one URI or a non-empty list of them.
fn uris(def: &Map<String, Value>, key: &str) -> Result<Vec<String>, String> {
    let list: Vec<&Value> = match def.get(key) {
        None => return Err(format!("Key \"{key}\" not found in shovel")),
        Some(Value::Array(a)) if !a.is_empty() => a.iter().collect(),
        Some(v @ Value::String(_)) => vec![v],
        Some(other) => {
            return Err(format!(
                "{key} should be a URI or a list of URIs, actually was {other}"
            ))
        }
    };
    list.into_iter()
        .map(|v| {
            let s = v
                .as_str()
                .ok_or_else(|| format!("{key}: {v} is not a string"))?;
            check_uri(s).map_err(|e| format!("\"{}\" not a valid URI: {e}", redact(s)))?;
            Ok(s.to_string())
        })
        .collect()
}

/// An `amqp://` or `amqps://` URI (an empty host means this broker).
fn check_uri(uri: &str) -> Result<(), String> {
    let rest = uri
        .strip_prefix("amqp://")
        .or_else(|| uri.strip_prefix("amqps://"))
        .ok_or("the scheme must be amqp:// or amqps://")?;
    if rest.is_empty() || rest.starts_with('/') || rest.starts_with('?') {
        return Ok(());
    }
    if uri.contains(char::is_whitespace) {
        return Err("it contains white space".into());
    }
    Ok(())
}

/// `uri` with its password replaced by `***`, as RabbitMQ shows shovel URIs.
pub fn redact(uri: &str) -> String {
    let Some((scheme, rest)) = uri.split_once("://") else {
        return uri.to_string();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return uri.to_string();
    };
    let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
    format!("{scheme}://{user}:***@{host}{tail}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({"src-uri": "amqp://a", "src-queue": "q", "dest-uri": ["amqp://b"], "dest-queue": "d"})
    }

    fn with(k: &str, v: Value) -> Value {
        let mut b = base();
        b[k] = v;
        b
    }

    #[test]
    fn defaults_are_rabbitmqs() {
        let d = parse(&base()).expect("valid");
        assert_eq!(d.prefetch_count, 1000);
        assert_eq!(d.ack_mode, AckMode::OnConfirm);
        assert_eq!(d.delete_after, DeleteAfter::Never);
        assert_eq!(d.reconnect_delay, Duration::from_secs(5));
        assert_eq!(d.source, Source::Queue("q".into()));
        assert_eq!(d.destination, Destination::Queue("d".into()));
        assert_eq!(d.dest_uris, vec!["amqp://b".to_string()]);
    }

    #[test]
    fn keys_are_read() {
        let d = parse(&json!({
            "src-protocol": "amqp091", "dest-protocol": "amqp091",
            "src-uri": "amqps://u:p@h:5671/v", "src-exchange": "x", "src-exchange-key": "k.#",
            "dest-uri": "amqp://", "dest-exchange": "y",
            "src-prefetch-count": 10, "ack-mode": "on-publish", "src-delete-after": 7,
            "reconnect-delay": 0.5, "dest-add-forward-headers": true,
            "dest-publish-properties": {"delivery_mode": 2}
        }))
        .expect("valid");
        assert_eq!(
            d.source,
            Source::Exchange {
                exchange: "x".into(),
                key: "k.#".into()
            }
        );
        assert_eq!(
            d.destination,
            Destination::Exchange {
                exchange: "y".into(),
                key: None
            }
        );
        assert_eq!(d.prefetch_count, 10);
        assert_eq!(d.ack_mode, AckMode::OnPublish);
        assert_eq!(d.delete_after, DeleteAfter::Count(7));
        assert_eq!(d.reconnect_delay, Duration::from_millis(500));
        assert!(d.add_forward_headers);
        assert_eq!(d.publish_properties.get("delivery_mode"), Some(&json!(2)));
        let d = parse(&with("src-delete-after", json!("queue-length"))).expect("valid");
        assert_eq!(d.delete_after, DeleteAfter::QueueLength);
    }

    #[test]
    fn bad_definitions_say_why() {
        let cases = [
            (with("src-uri", json!("http://x")), "not a valid URI"),
            (with("src-uri", json!([])), "src-uri should be"),
            (
                with("src-exchange", json!("x")),
                "Cannot specify 'src-exchange' and 'src-queue'",
            ),
            (
                with("dest-exchange", json!("x")),
                "Cannot specify 'dest-exchange' and 'dest-queue'",
            ),
            (with("ack-mode", json!("sometimes")), "ack-mode should be"),
            (
                with("src-delete-after", json!("later")),
                "src-delete-after should be",
            ),
            (with("src-prefetch-count", json!(-1)), "src-prefetch-count"),
            (with("reconnect-delay", json!("soon")), "reconnect-delay"),
            (with("src-protocol", json!("amqp10")), "amqp091"),
            (with("dest-add-forward-headers", json!("yes")), "boolean"),
            (with("bogus", json!(1)), "Unrecognised terms [bogus]"),
            (
                with("dest-publish-properties", json!({"colour": "red"})),
                "unknown property colour",
            ),
            (
                json!({"src-uri": "amqp://", "dest-uri": "amqp://"}),
                "Must specify 'src-exchange' or 'src-queue'",
            ),
            (
                json!({"src-queue": "q", "dest-uri": "amqp://"}),
                "Key \"src-uri\" not found",
            ),
            (json!([1]), "JSON object"),
        ];
        for (value, want) in cases {
            let e = parse(&value).expect_err(&value.to_string());
            assert!(e.contains(want), "{value}: {e}");
        }
        let mut v = with("ack-mode", json!("no-ack"));
        v["src-delete-after"] = json!(3);
        assert!(parse(&v).expect_err("no-ack + count").contains("no-ack"));
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("amqps://user:secret@host:5671/vh?x=1"),
            "amqps://user:***@host:5671/vh?x=1"
        );
        assert_eq!(redact("amqp://host"), "amqp://host");
        assert_eq!(redact("amqp://"), "amqp://");
        assert_eq!(redact("amqp://u:p:q@h"), "amqp://u:***@h");
    }
}
