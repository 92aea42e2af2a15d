//! `POST /api/exchanges/{vhost}/{name}/trace` (warren's own): where a message
//! would go, computed by the broker's router without publishing anything
//! ([`crate::broker::vhost::trace`]). The body is the publish endpoint's
//! (`routing_key`, `properties` with `headers`; no payload needed), `CC` and
//! `BCC` headers included.

use super::exchanges::properties_from;
use super::{table_to_json, text, AdminState, ApiError, ApiResult, Body, Caller};
use crate::broker::exchange::Destination;
use crate::broker::message::Message;
use crate::broker::vhost::trace::{Hop, Route};
use crate::clock::now_ms;
use axum::extract::{Path, State};
use axum::Json;
use serde_json::{json, Value};

fn hop_json(h: &Hop) -> Value {
    let matched: Vec<Value> = h
        .matched
        .iter()
        .map(|(b, by)| {
            let (kind, name) = match &b.destination {
                Destination::Queue(n) => ("queue", n),
                Destination::Exchange(n) => ("exchange", n),
            };
            json!({
                "destination": &**name,
                "destination_type": kind,
                "routing_key": b.routing_key,
                "arguments": table_to_json(&b.arguments),
                "matched_by": by,
            })
        })
        .collect();
    json!({
        "exchange": h.exchange,
        "type": h.kind,
        "matched": matched,
        "alternate_exchange": h.alternate,
    })
}

fn route_json(r: &Route) -> Value {
    json!({
        "hops": r.hops.iter().map(hop_json).collect::<Vec<_>>(),
        "queues": r.queues,
        "missing_exchanges": r.missing,
        "delayed_ms": r.delayed_ms,
    })
}

pub async fn trace(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    Body(body): Body,
) -> ApiResult<Json<Value>> {
    caller.require_vhost(&s.broker, &vhost)?;
    let v = s.broker.vhost(&vhost).ok_or_else(ApiError::not_found)?;
    let exchange = if name == "amq.default" { "" } else { &name };
    let routing_key = text(&body, "routing_key", "")?;
    let mut props = properties_from(body.get("properties").unwrap_or(&Value::Null))?;
    let cc = crate::broker::cc::take_cc_keys(&mut props)?;
    let message = Message::new(exchange, routing_key, props, bytes::Bytes::new());
    let t = v.trace(exchange, &message, &cc, now_ms())?;
    let mut out = route_json(&t.route);
    let dead: Vec<Value> = t
        .dead_letters
        .iter()
        .map(|d| {
            let mut step = d.route.as_ref().map(route_json).unwrap_or_else(|| {
                json!({"hops": [], "queues": [], "missing_exchanges": [d.exchange], "delayed_ms": null})
            });
            if let Value::Object(m) = &mut step {
                m.insert("queue".into(), json!(d.queue));
                m.insert("depth".into(), json!(d.depth));
                m.insert("dead_letter_exchange".into(), json!(d.exchange));
                m.insert("routing_key".into(), json!(d.routing_key));
                m.insert("exchange_exists".into(), json!(d.route.is_some()));
                m.insert("dropped_as_cycle".into(), json!(d.cycle));
            }
            step
        })
        .collect();
    if let Value::Object(m) = &mut out {
        m.insert("vhost".into(), json!(vhost));
        m.insert("exchange".into(), json!(exchange));
        m.insert("routing_key".into(), json!(routing_key));
        m.insert("cc".into(), json!(t.cc));
        m.insert("routed".into(), json!(!t.route.queues.is_empty()));
        m.insert("refused".into(), json!(t.refused));
        m.insert("dead_letters".into(), Value::Array(dead));
    }
    Ok(Json(out))
}
