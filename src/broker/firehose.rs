//! The firehose tracer (RabbitMQ's `rabbitmqctl trace_on`, or `"tracing": true`
//! on a vhost through the management API): while a vhost's tracing is on,
//! every message a client publishes and every message delivered to a client
//! (consumers and basic.get) is published again, as a copy, to the vhost's
//! `amq.rabbitmq.trace` exchange (internal, topic), with routing key
//! `publish.<exchange>` or `deliver.<queue>` and the headers RabbitMQ's
//! `rabbit_trace` gives it: `exchange_name`, `routing_keys`, `properties`,
//! `node`, then `vhost`, `connection`, `channel`, `user` and `routed_queues`
//! (publish) or `redelivered` (deliver). The copy carries only those headers
//! (so it is transient) and the original body.
//!
//! Messages published to `amq.rabbitmq.trace` itself are never traced, so a
//! consumer of a trace queue does not feed it. The state is the node's and
//! is not stored: tracing is off after a restart, as in RabbitMQ.

use super::message::{Message, ShortStr};
use super::vhost::{PublishFrom, VHost};
use crate::wire::{BasicProperties, FieldTable, FieldValue};

/// The trace exchange every vhost has.
pub const EXCHANGE: &str = "amq.rabbitmq.trace";

/// Where a traced message moved: the node, connection, channel and user the
/// trace names.
#[derive(Debug, Clone, Copy)]
pub struct Tap<'a> {
    pub node: &'a str,
    pub connection: &'a str,
    pub channel: u16,
    pub user: &'a str,
}

/// The connection name the firehose gives what the management API publishes
/// and gets (it has no AMQP connection).
pub const HTTP_API: &str = "HTTP API";

impl<'a> Tap<'a> {
    /// The management API acting for `user` (channel 1).
    pub fn http_api(node: &'a str, user: &'a str) -> Tap<'a> {
        Tap {
            node,
            connection: HTTP_API,
            channel: 1,
            user,
        }
    }
}

/// Trace a publish of `message` (routed with its routing key and `cc`) that
/// reached the queues `routed`.
pub fn published(
    vhost: &VHost,
    message: &Message,
    cc: &[ShortStr],
    routed: &[&str],
    tap: &Tap<'_>,
    now: u64,
) {
    if &*message.exchange == EXCHANGE {
        return;
    }
    let mut headers = common(message, cc, tap.node);
    headers.extend(identity(&vhost.name, tap));
    headers.push((
        "routed_queues".into(),
        FieldValue::Array(routed.iter().map(|q| FieldValue::string(*q)).collect()),
    ));
    emit(vhost, "publish", &message.exchange, headers, message, now);
}

/// Trace a delivery of `message` from `queue` to a client.
pub fn delivered(
    vhost: &VHost,
    queue: &str,
    message: &Message,
    redelivered: bool,
    tap: &Tap<'_>,
    now: u64,
) {
    if &*message.exchange == EXCHANGE {
        return;
    }
    let cc = super::cc::cc_keys(&message.properties);
    let mut headers = common(message, &cc, tap.node);
    headers.push((
        "redelivered".into(),
        FieldValue::I32(i32::from(redelivered)),
    ));
    headers.extend(identity(&vhost.name, tap));
    emit(vhost, "deliver", queue, headers, message, now);
}

/// `exchange_name`, `routing_keys`, `properties` and `node`.
fn common(message: &Message, cc: &[ShortStr], node: &str) -> Vec<(String, FieldValue)> {
    let keys = std::iter::once(&message.routing_key)
        .chain(cc)
        .map(|k| FieldValue::string(k.as_str()))
        .collect();
    vec![
        (
            "exchange_name".into(),
            FieldValue::string(&*message.exchange),
        ),
        ("routing_keys".into(), FieldValue::Array(keys)),
        (
            "properties".into(),
            FieldValue::Table(properties(&message.properties)),
        ),
        ("node".into(), FieldValue::string(node)),
    ]
}

fn identity(vhost: &str, tap: &Tap<'_>) -> [(String, FieldValue); 4] {
    [
        ("vhost".into(), FieldValue::string(vhost)),
        ("connection".into(), FieldValue::string(tap.connection)),
        ("channel".into(), FieldValue::I32(i32::from(tap.channel))),
        ("user".into(), FieldValue::string(tap.user)),
    ]
}

/// The message's properties as a table of those that are set, named as
/// RabbitMQ's `P_basic` record fields (integers as signed ints, the headers
/// as a table, the rest as long strings).
fn properties(p: &BasicProperties) -> FieldTable {
    fn text(t: &mut Vec<(String, FieldValue)>, name: &str, v: &Option<String>) {
        if let Some(v) = v {
            t.push((name.to_string(), FieldValue::string(v.as_str())));
        }
    }
    fn int(t: &mut Vec<(String, FieldValue)>, name: &str, v: Option<i64>) {
        if let Some(v) = v {
            let v = i32::try_from(v).map_or(FieldValue::I64(v), FieldValue::I32);
            t.push((name.to_string(), v));
        }
    }
    let mut t = Vec::new();
    text(&mut t, "content_type", &p.content_type);
    text(&mut t, "content_encoding", &p.content_encoding);
    if let Some(h) = &p.headers {
        t.push(("headers".to_string(), FieldValue::Table(h.clone())));
    }
    int(&mut t, "delivery_mode", p.delivery_mode.map(i64::from));
    int(&mut t, "priority", p.priority.map(i64::from));
    text(&mut t, "correlation_id", &p.correlation_id);
    text(&mut t, "reply_to", &p.reply_to);
    text(&mut t, "expiration", &p.expiration);
    text(&mut t, "message_id", &p.message_id);
    int(
        &mut t,
        "timestamp",
        p.timestamp.map(|ts| i64::try_from(ts).unwrap_or(i64::MAX)),
    );
    text(&mut t, "type", &p.kind);
    text(&mut t, "user_id", &p.user_id);
    text(&mut t, "app_id", &p.app_id);
    text(&mut t, "cluster_id", &p.cluster_id);
    FieldTable(t)
}

/// Publish the trace copy of `message` to the vhost's trace exchange with
/// routing key `<prefix>.<suffix>`; where it goes (or that the exchange is
/// gone) is not the traced client's concern.
fn emit(
    vhost: &VHost,
    prefix: &str,
    suffix: &str,
    headers: Vec<(String, FieldValue)>,
    message: &Message,
    now: u64,
) {
    let properties = BasicProperties {
        headers: Some(FieldTable(headers)),
        ..Default::default()
    };
    let copy = Message::new(
        EXCHANGE,
        format!("{prefix}.{suffix}"),
        properties,
        message.body.clone(),
    );
    if let Err(e) = vhost.publish(EXCHANGE, &copy, PublishFrom::Firehose, now) {
        tracing::debug!(vhost = %vhost.name, error = %e.text, "firehose: trace not published");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::message::MemoryBudget;
    use crate::broker::vhost::QueueDeclare;
    use crate::config::VHostLimits;
    use crate::wire::FieldValue as F;
    use bytes::Bytes;

    fn tap() -> Tap<'static> {
        Tap {
            node: "warren@n",
            connection: "c",
            channel: 7,
            user: "u",
        }
    }

    #[test]
    fn properties_are_named_and_typed_as_rabbit_trace_does() {
        let p = BasicProperties {
            priority: Some(3),
            timestamp: Some(1_700_000_000),
            kind: Some("t".into()),
            ..Default::default()
        };
        let t = properties(&p);
        assert_eq!(
            t.0,
            vec![
                ("priority".to_string(), F::I32(3)),
                ("timestamp".to_string(), F::I32(1_700_000_000)),
                ("type".to_string(), F::string("t")),
            ]
        );
        let late = properties(&BasicProperties {
            timestamp: Some(1 << 40),
            ..Default::default()
        });
        assert_eq!(late.get("timestamp"), Some(&F::I64(1 << 40)));
    }

    #[test]
    fn traces_reach_queues_bound_to_the_trace_exchange_and_never_loop() {
        let v = VHost::new("/", None, MemoryBudget::new(0), VHostLimits::default());
        let q = QueueDeclare {
            name: "t".into(),
            ..Default::default()
        };
        let (traces, _) = v.declare_queue(&q, 0, 0).expect("queue");
        v.bind(
            EXCHANGE,
            crate::broker::exchange::Destination::Queue("t".into()),
            "deliver.#",
            &FieldTable::new(),
            0,
        )
        .expect("bind");
        let m = Message::new(
            "x",
            "k",
            BasicProperties::default(),
            Bytes::from_static(b"b"),
        );
        published(&v, &m, &[], &["q"], &tap(), 0);
        assert_eq!(traces.stats(0).ready, 0, "publish.x is not bound");
        delivered(&v, "q", &m, true, &tap(), 0);
        let (e, _) = traces.get(true, 0).expect("deliver.q traced");
        assert_eq!(&*e.message.routing_key, "deliver.q");
        let h = e.message.properties.headers.clone().expect("headers");
        assert_eq!(h.get("redelivered"), Some(&F::I32(1)));
        assert_eq!(h.get("channel"), Some(&F::I32(7)));
        // Delivering a trace message traces nothing.
        delivered(&v, "t", &e.message, false, &tap(), 0);
        assert_eq!(traces.stats(0).ready, 0);
    }
}
