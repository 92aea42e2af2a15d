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

/// The typed form of a queue's arguments.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QueueArgs {
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
}

/// The field type as RabbitMQ names it in `{unacceptable_type,...}`.
fn type_name(v: &FieldValue) -> &'static str {
    match v {
        FieldValue::Bool(_) => "bool",
        FieldValue::I8(_) => "byte",
        FieldValue::U8(_) => "unsignedbyte",
        FieldValue::I16(_) => "short",
        FieldValue::U16(_) => "unsignedshort",
        FieldValue::I32(_) => "signedint",
        FieldValue::U32(_) => "unsignedint",
        FieldValue::I64(_) => "long",
        FieldValue::LongString(_) => "longstr",
        FieldValue::Table(_) => "table",
        FieldValue::Array(_) => "array",
        FieldValue::Void => "void",
        FieldValue::F32(_) => "float",
        FieldValue::F64(_) => "double",
        FieldValue::Decimal(..) => "decimal",
        FieldValue::ByteArray(_) => "binary",
        FieldValue::Timestamp(_) => "timestamp",
        #[allow(unreachable_patterns)]
        _ => "unknown",
    }
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
                .ok_or_else(|| bad(name, format!("\"expected integer, got {}\"", type_name(v))))?;
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
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| bad(name, format!("{{unacceptable_type,{}}}", type_name(v))))
        };
        let mut a = QueueArgs::default();
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
                            type_name(v)
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
                        bad(name, format!("{{unacceptable_type,{}}}", type_name(v)))
                    })?
                }
                "x-queue-mode" => match string(name, v)?.as_str() {
                    "default" | "lazy" => {}
                    other => {
                        return Err(bad(name, format!("\"unsupported queue mode '{other}'\"")))
                    }
                },
                "x-queue-type" => match string(name, v)?.as_str() {
                    "classic" => {}
                    other => {
                        return Err(bad(
                            name,
                            format!("\"unsupported queue type '{other}'\""),
                        ))
                    }
                },
                _ => {}
            }
        }
        if a.dead_letter_routing_key.is_some() && a.dead_letter_exchange.is_none() {
            return Err(AmqpError::precondition_failed(format!(
                "invalid arg 'x-dead-letter-routing-key' for queue '{queue}' in vhost '{vhost}': \
                 Key x-dead-letter-routing-key should be specified together with x-dead-letter-exchange"
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
        assert!(e.text.contains("x-dead-letter-exchange"));
    }
}
