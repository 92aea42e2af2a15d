//! Queue `x-` arguments: validated once at declare time into typed settings.
//!
//! A bad argument is a 406 PRECONDITION_FAILED naming it, never a silent default.

use crate::error::{AmqpError, AmqpResult};
use crate::wire::{FieldTable, FieldValue};

/// What happens when a length limit is reached (`x-overflow`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Overflow {
    /// Drop (or dead-letter) the oldest ready message.
    #[default]
    DropHead,
    /// Refuse the new message (publisher gets basic.nack under confirms).
    RejectPublish,
    /// Refuse the new message and dead-letter it.
    RejectPublishDlx,
}

/// The queue type (`x-queue-type`), fixed at declaration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueType {
    #[default]
    Classic,
    /// A quorum queue: durable, never exclusive or auto-delete, every message
    /// stored, a delivery limit (20 unless set), one replica until clustering exists.
    Quorum,
    /// A stream: an append-only log read from any offset (see
    /// [`crate::storage::stream`]); durable, never exclusive or auto-delete.
    Stream,
}

impl QueueType {
    /// The name in `x-queue-type` and in the admin API's `type`.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
            QueueType::Stream => "stream",
        }
    }

    /// The implementing module, as RabbitMQ names the type in its errors.
    pub fn module(self) -> &'static str {
        match self {
            QueueType::Classic => "rabbit_classic_queue",
            QueueType::Quorum => "rabbit_quorum_queue",
            QueueType::Stream => "rabbit_stream_queue",
        }
    }
}

/// Where a replicated queue's first leader goes (`x-queue-leader-locator`,
/// policy `queue-leader-locator`), as RabbitMQ places quorum queue leaders.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LeaderLocator {
    /// On the node the client declared it on (RabbitMQ's default).
    #[default]
    ClientLocal,
    /// On the running member with the fewest quorum queue leaders
    /// (`balanced`; RabbitMQ takes its older `random` and `least-leaders`
    /// as this too).
    Balanced,
}

/// `x-dead-letter-strategy` (quorum queues).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeadLetterStrategy {
    #[default]
    AtMostOnce,
    /// Dead letters are routed before they leave the source's store; needs
    /// `x-overflow: reject-publish` (else RabbitMQ falls back to at-most-once).
    AtLeastOnce,
}

/// The delivery limit of a quorum queue that sets none (RabbitMQ 4.0).
pub const DEFAULT_DELIVERY_LIMIT: u32 = 20;

/// Arguments only some queue types take: declaring another type with one is a
/// 406 naming the type, as RabbitMQ's `check_arguments_key` does.
const CLASSIC_ONLY: &[&str] = &[
    "x-max-priority",
    "x-queue-mode",
    "x-queue-version",
    "x-queue-master-locator",
];
const QUORUM_ONLY: &[&str] = &[
    "x-dead-letter-strategy",
    "x-max-in-memory-length",
    "x-max-in-memory-bytes",
    "x-quorum-initial-group-size",
];
const STREAM_ONLY: &[&str] = &[
    "x-max-age",
    "x-stream-max-segment-size-bytes",
    "x-stream-filter-size-bytes",
    "x-initial-cluster-size",
];
/// Arguments of classic and quorum queues that a stream refuses (RabbitMQ
/// 3.10+: `rabbit_stream_queue` takes only its own and `x-max-length-bytes`).
const NOT_STREAM: &[&str] = &[
    "x-message-ttl",
    "x-expires",
    "x-max-length",
    "x-overflow",
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-single-active-consumer",
    "x-delivery-limit",
    "x-consumer-timeout",
];

/// The typed form of a queue's arguments.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueArgs {
    pub queue_type: QueueType,
    /// Returns after which a message is dead-lettered (`x-delivery-limit`,
    /// policy `delivery-limit`); `None`: unlimited. Quorum queues default to
    /// [`DEFAULT_DELIVERY_LIMIT`]; warren also honours it on classic queues.
    pub delivery_limit: Option<u32>,
    pub dead_letter_strategy: DeadLetterStrategy,
    /// `x-quorum-initial-group-size`: recorded (one replica is all there is).
    pub initial_group_size: Option<u64>,
    pub message_ttl: Option<u64>,
    pub expires: Option<u64>,
    pub max_length: Option<u64>,
    pub max_length_bytes: Option<u64>,
    pub overflow: Overflow,
    pub dead_letter_exchange: Option<String>,
    pub dead_letter_routing_key: Option<String>,
    pub max_priority: u8,
    pub single_active_consumer: bool,
    /// `x-consumer-timeout` (ms): overrides the broker's `consumer_timeout`.
    pub consumer_timeout: Option<u64>,
    /// Streams: `x-max-age` in ms.
    pub max_age: Option<u64>,
    /// Streams: `x-stream-max-segment-size-bytes`.
    pub stream_max_segment_size: Option<u64>,
    /// Streams: `x-initial-cluster-size` (recorded; one node is all there is).
    pub initial_cluster_size: Option<u64>,
    /// Streams: `x-stream-filter-size-bytes` (16 to 255).
    pub stream_filter_size: Option<u8>,
    /// `x-queue-leader-locator` (acted on by replicated quorum queues).
    pub leader_locator: LeaderLocator,
}

impl QueueArgs {
    /// Parse and validate `arguments` of queue `queue` in `vhost`.
    pub fn parse(arguments: &FieldTable, queue: &str, vhost: &str) -> AmqpResult<QueueArgs> {
        let bad = |name: &str, why: String| {
            AmqpError::precondition_failed(format!(
                "invalid arg '{name}' for queue '{queue}' in vhost '{vhost}': {why}"
            ))
        };
        let int = |name: &str, v: &FieldValue, min: i64| -> AmqpResult<u64> {
            let i = v
                .as_i64()
                .filter(|_| !matches!(v, FieldValue::Timestamp(_)))
                .ok_or_else(|| {
                    bad(
                        name,
                        format!("\"expected integer, got {}\"", v.rabbit_type_name()),
                    )
                })?;
            if i < min {
                let what = if i == 0 {
                    "value_zero"
                } else {
                    "value_negative"
                };
                return Err(bad(name, format!("{{{what},{i}}}")));
            }
            Ok(i as u64)
        };
        let string = |name: &str, v: &FieldValue| -> AmqpResult<String> {
            v.as_str().map(str::to_string).ok_or_else(|| {
                bad(
                    name,
                    format!("{{unacceptable_type,{}}}", v.rabbit_type_name()),
                )
            })
        };
        let mut a = QueueArgs::default();
        // The type first: which arguments are valid depends on it.
        if let Some(v) = arguments.get("x-queue-type") {
            a.queue_type = match string("x-queue-type", v)?.as_str() {
                // RabbitMQ treats an empty or "undefined" type as the default.
                "classic" | "" | "undefined" => QueueType::Classic,
                "quorum" => QueueType::Quorum,
                "stream" => QueueType::Stream,
                other => {
                    return Err(bad(
                        "x-queue-type",
                        format!("\"unsupported queue type '{other}'\""),
                    ))
                }
            };
        }
        let foreign: &[&[&str]] = match a.queue_type {
            QueueType::Classic => &[QUORUM_ONLY, STREAM_ONLY],
            QueueType::Quorum => &[CLASSIC_ONLY, STREAM_ONLY],
            QueueType::Stream => &[CLASSIC_ONLY, QUORUM_ONLY, NOT_STREAM],
        };
        if let Some((name, _)) = arguments
            .iter()
            .find(|(k, _)| foreign.iter().any(|list| list.contains(k)))
        {
            return Err(AmqpError::precondition_failed(format!(
                "invalid arg '{name}' for queue '{queue}' in vhost '{vhost}' of queue type {}",
                a.queue_type.module()
            )));
        }
        let mut delivery_limit = None;
        for (name, v) in arguments.iter() {
            match name {
                "x-message-ttl" => a.message_ttl = Some(int(name, v, 0)?),
                "x-expires" => a.expires = Some(int(name, v, 1)?),
                "x-max-length" => a.max_length = Some(int(name, v, 0)?),
                "x-max-length-bytes" => a.max_length_bytes = Some(int(name, v, 0)?),
                "x-max-priority" => {
                    let p = int(name, v, 0)?;
                    if p > 255 {
                        return Err(bad(name, format!("{{max_value_exceeded,{p}}}")));
                    }
                    a.max_priority = p as u8;
                }
                "x-consumer-timeout" => a.consumer_timeout = Some(int(name, v, 1)?),
                "x-dead-letter-exchange" => {
                    a.dead_letter_exchange = Some(v.as_str().map(str::to_string).ok_or_else(|| {
                        AmqpError::precondition_failed(format!(
                            "invalid type '{}' for arg '{name}' in queue '{queue}' in vhost '{vhost}'",
                            v.rabbit_type_name()
                        ))
                    })?)
                }
                "x-dead-letter-routing-key" => a.dead_letter_routing_key = Some(string(name, v)?),
                "x-overflow" => {
                    a.overflow = match string(name, v)?.as_str() {
                        "drop-head" => Overflow::DropHead,
                        "reject-publish" => Overflow::RejectPublish,
                        "reject-publish-dlx" => Overflow::RejectPublishDlx,
                        _ => return Err(bad(name, "invalid_overflow".to_string())),
                    }
                }
                "x-single-active-consumer" => {
                    a.single_active_consumer = v.as_bool().ok_or_else(|| {
                        bad(name, format!("{{unacceptable_type,{}}}", v.rabbit_type_name()))
                    })?
                }
                "x-queue-mode" => match string(name, v)?.as_str() {
                    "default" | "lazy" => {}
                    other => {
                        return Err(bad(name, format!("\"unsupported queue mode '{other}'\"")))
                    }
                },
                "x-delivery-limit" => {
                    let i = v.as_i64().filter(|_| !matches!(v, FieldValue::Timestamp(_)));
                    delivery_limit = Some(i.ok_or_else(|| {
                        bad(name, format!("\"expected integer, got {}\"", v.rabbit_type_name()))
                    })?);
                }
                "x-dead-letter-strategy" => {
                    a.dead_letter_strategy = match string(name, v)?.as_str() {
                        "at-most-once" => DeadLetterStrategy::AtMostOnce,
                        "at-least-once" => DeadLetterStrategy::AtLeastOnce,
                        _ => return Err(bad(name, "invalid_dlx_strategy".to_string())),
                    }
                }
                "x-quorum-initial-group-size" => a.initial_group_size = Some(int(name, v, 1)?),
                "x-queue-leader-locator" => {
                    a.leader_locator = match string(name, v)?.as_str() {
                        "client-local" => LeaderLocator::ClientLocal,
                        "balanced" | "random" | "least-leaders" => LeaderLocator::Balanced,
                        _ => return Err(bad(name, "invalid_queue_locator_arg".to_string())),
                    }
                }
                // Classic queue storage versions RabbitMQ (3.13 to 4.2) knows;
                // warren has one store for both.
                "x-queue-version" => match int(name, v, 0)? {
                    1 | 2 => {}
                    n => return Err(bad(name, format!("\"unsupported queue version '{n}'\""))),
                },
                "x-max-in-memory-length" | "x-max-in-memory-bytes" => {
                    int(name, v, 0)?;
                }
                "x-max-age" => {
                    let s = v.as_str().ok_or_else(|| {
                        bad(name, format!("{{unacceptable_type,{}}}", v.rabbit_type_name()))
                    })?;
                    a.max_age = Some(
                        crate::storage::stream::parse_age(s)
                            .ok_or_else(|| bad(name, "invalid_max_age".to_string()))?,
                    );
                }
                "x-stream-max-segment-size-bytes" => {
                    a.stream_max_segment_size = Some(int(name, v, 1)?)
                }
                "x-initial-cluster-size" => a.initial_cluster_size = Some(int(name, v, 1)?),
                "x-stream-filter-size-bytes" => {
                    let n = int(name, v, 1)?;
                    if !(16..=255).contains(&n) {
                        return Err(bad(name, format!("{{value_out_of_range,{n}}}")));
                    }
                    a.stream_filter_size = Some(n as u8);
                }
                _ => {}
            }
        }
        // A negative limit means none (RabbitMQ 4's way back to 3.13's unlimited).
        a.delivery_limit = match delivery_limit {
            Some(l) if l < 0 => None,
            Some(l) => Some(u32::try_from(l).unwrap_or(u32::MAX)),
            None if a.queue_type == QueueType::Quorum => Some(DEFAULT_DELIVERY_LIMIT),
            None => None,
        };
        if a.queue_type == QueueType::Quorum {
            // Quorum queues have no reject-publish-dlx: RabbitMQ warns and uses
            // its default (drop-head).
            if a.overflow == Overflow::RejectPublishDlx {
                tracing::warn!(queue, vhost, "invalid overflow strategy reject-publish-dlx for quorum queue; using drop-head");
                a.overflow = Overflow::DropHead;
            }
            // at-least-once needs reject-publish and a dead-letter exchange;
            // otherwise RabbitMQ falls back to at-most-once (with a warning).
            if a.dead_letter_strategy == DeadLetterStrategy::AtLeastOnce
                && (a.overflow != Overflow::RejectPublish || a.dead_letter_exchange.is_none())
            {
                tracing::warn!(queue, vhost, "dead-letter-strategy at-least-once needs overflow reject-publish and a dead-letter exchange; falling back to at-most-once");
                a.dead_letter_strategy = DeadLetterStrategy::AtMostOnce;
            }
        }
        if a.dead_letter_routing_key.is_some() && a.dead_letter_exchange.is_none() {
            return Err(AmqpError::precondition_failed(format!(
                "invalid arg 'x-dead-letter-routing-key' for queue '{queue}' in vhost '{vhost}': \
                 routing_key_but_no_dlx_defined"
            )));
        }
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(pairs: &[(&str, FieldValue)]) -> FieldTable {
        FieldTable(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        )
    }

    #[test]
    fn parses_valid_arguments() {
        let a = QueueArgs::parse(
            &table(&[
                ("x-message-ttl", FieldValue::I32(1000)),
                ("x-max-length", FieldValue::I64(10)),
                ("x-overflow", FieldValue::string("reject-publish")),
                ("x-dead-letter-exchange", FieldValue::string("dlx")),
                ("x-max-priority", FieldValue::U8(10)),
            ]),
            "q",
            "/",
        )
        .expect("valid");
        assert_eq!(a.message_ttl, Some(1000));
        assert_eq!(a.max_length, Some(10));
        assert_eq!(a.overflow, Overflow::RejectPublish);
        assert_eq!(a.dead_letter_exchange.as_deref(), Some("dlx"));
        assert_eq!(a.max_priority, 10);
    }

    #[test]
    fn rejects_bad_arguments_naming_them() {
        for (k, v) in [
            ("x-message-ttl", FieldValue::I32(-1)),
            ("x-message-ttl", FieldValue::string("10")),
            ("x-expires", FieldValue::I32(0)),
            ("x-max-priority", FieldValue::I32(256)),
            ("x-overflow", FieldValue::string("nope")),
            ("x-max-length", FieldValue::Bool(true)),
        ] {
            let e = QueueArgs::parse(&table(&[(k, v)]), "q", "/").expect_err(k);
            assert_eq!(e.code, 406);
            assert!(e.text.contains(k), "{}", e.text);
        }
        let e = QueueArgs::parse(
            &table(&[("x-dead-letter-routing-key", FieldValue::string("k"))]),
            "q",
            "/",
        )
        .expect_err("dlrk without dlx");
        assert!(
            e.text.ends_with("'x-dead-letter-routing-key' for queue 'q' in vhost '/': routing_key_but_no_dlx_defined"),
            "{}",
            e.text
        );
    }

    #[test]
    fn quorum_type_limits_and_fallbacks() {
        let quorum = ("x-queue-type", FieldValue::string("quorum"));
        let a = QueueArgs::parse(&table(std::slice::from_ref(&quorum)), "q", "/").expect("quorum");
        assert_eq!(a.queue_type, QueueType::Quorum);
        assert_eq!(a.delivery_limit, Some(DEFAULT_DELIVERY_LIMIT));
        // Classic: no limit unless set; a negative one is none anywhere.
        let a = QueueArgs::parse(&table(&[]), "q", "/").expect("classic");
        assert_eq!((a.queue_type, a.delivery_limit), (QueueType::Classic, None));
        let a = QueueArgs::parse(
            &table(&[("x-delivery-limit", FieldValue::I16(3))]),
            "q",
            "/",
        )
        .expect("classic limit");
        assert_eq!(a.delivery_limit, Some(3));
        let a = QueueArgs::parse(
            &table(&[quorum.clone(), ("x-delivery-limit", FieldValue::I64(-1))]),
            "q",
            "/",
        )
        .expect("unlimited");
        assert_eq!(a.delivery_limit, None);
        // reject-publish-dlx: drop-head on a quorum queue (RabbitMQ warns).
        let a = QueueArgs::parse(
            &table(&[
                quorum.clone(),
                ("x-overflow", FieldValue::string("reject-publish-dlx")),
            ]),
            "q",
            "/",
        )
        .expect("accepted");
        assert_eq!(a.overflow, Overflow::DropHead);
        // at-least-once only with reject-publish and a dead-letter exchange.
        let strategy = (
            "x-dead-letter-strategy",
            FieldValue::string("at-least-once"),
        );
        let dlx = ("x-dead-letter-exchange", FieldValue::string("dlx"));
        let a = QueueArgs::parse(
            &table(&[quorum.clone(), strategy.clone(), dlx.clone()]),
            "q",
            "/",
        )
        .expect("falls back");
        assert_eq!(a.dead_letter_strategy, DeadLetterStrategy::AtMostOnce);
        let a = QueueArgs::parse(
            &table(&[
                quorum.clone(),
                strategy,
                dlx,
                ("x-overflow", FieldValue::string("reject-publish")),
            ]),
            "q",
            "/",
        )
        .expect("at-least-once");
        assert_eq!(a.dead_letter_strategy, DeadLetterStrategy::AtLeastOnce);
        // Arguments of another type name that type.
        let e = QueueArgs::parse(
            &table(&[quorum, ("x-max-priority", FieldValue::U8(2))]),
            "q",
            "/",
        )
        .expect_err("classic-only");
        assert_eq!(
            e.text,
            "PRECONDITION_FAILED - invalid arg 'x-max-priority' for queue 'q' in vhost '/' of queue type rabbit_quorum_queue"
        );
        for (v, ok) in [(1, true), (2, true), (3, false)] {
            let r = QueueArgs::parse(&table(&[("x-queue-version", FieldValue::I32(v))]), "q", "/");
            assert_eq!(r.is_ok(), ok, "x-queue-version {v}");
        }
        let e = QueueArgs::parse(&table(&[("x-queue-version", FieldValue::I32(3))]), "q", "/")
            .expect_err("version 3");
        assert!(
            e.text.ends_with("\"unsupported queue version '3'\""),
            "{}",
            e.text
        );
        let e = QueueArgs::parse(&table(&[("x-max-age", FieldValue::string("1D"))]), "q", "/")
            .expect_err("stream-only");
        assert!(
            e.text.ends_with("of queue type rabbit_classic_queue"),
            "{}",
            e.text
        );
    }

    #[test]
    fn the_leader_locator_takes_rabbitmqs_values_and_refuses_others() {
        let quorum = ("x-queue-type", FieldValue::string("quorum"));
        let locator = |v: FieldValue| {
            QueueArgs::parse(
                &table(&[quorum.clone(), ("x-queue-leader-locator", v)]),
                "q",
                "/",
            )
        };
        let default =
            QueueArgs::parse(&table(std::slice::from_ref(&quorum)), "q", "/").expect("no locator");
        assert_eq!(default.leader_locator, LeaderLocator::ClientLocal);
        for (v, want) in [
            ("client-local", LeaderLocator::ClientLocal),
            ("balanced", LeaderLocator::Balanced),
            ("random", LeaderLocator::Balanced),
            ("least-leaders", LeaderLocator::Balanced),
        ] {
            let a = locator(FieldValue::string(v)).expect(v);
            assert_eq!(a.leader_locator, want, "{v}");
        }
        let e = locator(FieldValue::string("min-masters")).expect_err("not a leader locator");
        assert_eq!(
            e.text,
            "PRECONDITION_FAILED - invalid arg 'x-queue-leader-locator' for queue 'q' in vhost '/': invalid_queue_locator_arg"
        );
        let e = locator(FieldValue::I32(5)).expect_err("not a string");
        assert!(
            e.text.ends_with("{unacceptable_type,signedint}"),
            "{}",
            e.text
        );
    }
}
