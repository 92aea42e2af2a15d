//! `/api/exchanges[/{vhost}[/{name}]]` (list, show, declare, delete) and
//! `/api/exchanges/{vhost}/{name}/publish`. Listed and shown exchanges carry
//! RabbitMQ's `message_stats.publish_in` / `publish_out` (see
//! [`crate::broker::exchange::ExchangeStats`]) with their rates.

use super::{
    flag, json_to_table, table_to_json, text, AdminState, ApiError, ApiResult, Body, Caller,
};
use crate::broker::auth::Access;
use crate::broker::message::Message;
use crate::broker::vhost::{Exchange, ExchangeDeclare};
use crate::broker::Counters;
use crate::clock::now_ms;
use crate::cluster::Command;
use crate::wire::BasicProperties;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use base64::Engine;
use serde_json::{json, Value};
use std::collections::HashMap;

pub fn exchange_json(vhost: &str, e: &Exchange) -> Value {
    // The exchanges every vhost is made with, as RabbitMQ names their maker.
    let builtin = e.name.is_empty() || e.name.starts_with("amq.");
    json!({
        "name": &*e.name,
        "vhost": vhost,
        "type": e.type_name(),
        "durable": e.durable,
        "auto_delete": e.auto_delete,
        "internal": e.internal,
        "arguments": table_to_json(&e.arguments),
        "user_who_performed_action": if builtin { "rmq-internal" } else { "" },
    })
}

/// [`exchange_json`] with the policy in force (`policy`, its name, as RabbitMQ
/// shows it, and warren's `effective_policy_definition`, as for queues) and
/// the message counters and rates (`message_stats`).
fn with_policy(s: &AdminState, v: &crate::broker::VHost, e: &Exchange) -> Value {
    let mut j = exchange_json(&v.name, e);
    let policy = v
        .policies
        .matching(&v.name, crate::broker::policy::Target::Exchange, &e.name);
    if let Value::Object(m) = &mut j {
        m.insert(
            "policy".into(),
            json!(policy.as_ref().map(|p| p.name.clone())),
        );
        m.insert(
            "effective_policy_definition".into(),
            Value::Object(policy.map(|p| p.definition).unwrap_or_default()),
        );
        m.insert(
            "message_stats".into(),
            super::metrics::exchange_stats(&e.stats.totals(), &s.rates.exchange(&v.name, &e.name)),
        );
    }
    j
}

fn collect(s: &AdminState, caller: &Caller, only: Option<&str>) -> Vec<Value> {
    let b = &s.broker;
    let mut out = Vec::new();
    for v in b.vhosts() {
        if only.is_some_and(|o| o != &*v.name) || !caller.sees(b, &v.name) {
            continue;
        }
        for e in v.exchanges() {
            out.push(with_policy(s, &v, &e));
        }
    }
    super::sort_by_vhost_name(&mut out);
    out
}

/// `/api/exchanges`, with the listing parameters (`page`, `page_size`,
/// `name`, `use_regex`, `sort`, `sort_reverse`).
pub async fn list(
    State(s): State<AdminState>,
    caller: Caller,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    super::queues::paged(collect(&s, &caller, None), &params).map(Json)
}

pub async fn list_vhost(
    State(s): State<AdminState>,
    caller: Caller,
    Path(vhost): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    caller.require_vhost(&s.broker, &vhost)?;
    super::queues::paged(collect(&s, &caller, Some(&vhost)), &params).map(Json)
}

pub async fn show(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    caller.require_vhost(&s.broker, &vhost)?;
    let v = s.broker.vhost(&vhost).ok_or_else(ApiError::not_found)?;
    let name = if name == "amq.default" { "" } else { &name };
    let e = v.exchange(name).map_err(|_| ApiError::not_found())?;
    let mut row = with_policy(&s, &v, &e);
    // Per channel and per queue figures: RabbitMQ keeps them only in its
    // `detailed` rates mode; in `basic` (warren's) they are empty.
    row["incoming"] = json!([]);
    row["outgoing"] = json!([]);
    Ok(Json(row))
}

/// Declare an exchange from an API / definitions body: whether it is new,
/// and the command that replicates the declaration.
pub fn declare_from(
    s: &AdminState,
    vhost: &str,
    name: &str,
    body: &Value,
) -> ApiResult<(bool, Command)> {
    let v = s.broker.vhost(vhost).ok_or_else(ApiError::not_found)?;
    let existed = v.exchange(name).is_ok();
    // RabbitMQ's default when the body names none.
    let kind = match body.get("type") {
        None | Some(Value::Null) => "direct",
        Some(t) => t
            .as_str()
            .ok_or_else(|| ApiError::bad_request("type must be a string"))?,
    };
    let d = ExchangeDeclare {
        name: name.to_string(),
        kind: kind.to_string(),
        passive: false,
        durable: flag(body, "durable", true)?,
        auto_delete: flag(body, "auto_delete", false)?,
        internal: flag(body, "internal", false)?,
        arguments: json_to_table(body.get("arguments").unwrap_or(&Value::Null))?,
    };
    v.declare_exchange(&d)?;
    Ok((!existed, Command::exchange_declared(vhost, &d)))
}

pub async fn put(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    Body(body): Body,
) -> ApiResult<StatusCode> {
    caller.require_vhost(&s.broker, &vhost)?;
    caller.permit(&s.broker, &vhost, Access::Configure, "exchange", &name)?;
    let (created, cmd) = declare_from(&s, &vhost, &name, &body)?;
    super::cluster::replicate(&s, || Some(cmd)).await?;
    Ok(super::put_status(created))
}

pub async fn remove(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<StatusCode> {
    caller.require_vhost(&s.broker, &vhost)?;
    let v = s.broker.vhost(&vhost).ok_or_else(ApiError::not_found)?;
    v.exchange(&name).map_err(|_| ApiError::not_found())?;
    caller.permit(&s.broker, &vhost, Access::Configure, "exchange", &name)?;
    let if_unused = q.get("if-unused").is_some_and(|x| x == "true");
    v.delete_exchange(&name, if_unused)?;
    super::cluster::replicate(&s, || Some(Command::DeleteExchange { vhost, name })).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Message properties from the API's JSON (RabbitMQ's names).
pub fn properties_from(v: &Value) -> ApiResult<BasicProperties> {
    let mut p = BasicProperties::default();
    let Some(m) = v.as_object() else {
        return Ok(p);
    };
    let s = |k: &str| m.get(k).and_then(Value::as_str).map(String::from);
    let n = |k: &str| m.get(k).and_then(Value::as_u64);
    p.content_type = s("content_type");
    p.content_encoding = s("content_encoding");
    p.correlation_id = s("correlation_id");
    p.reply_to = s("reply_to");
    p.expiration = s("expiration");
    p.message_id = s("message_id");
    p.kind = s("type");
    p.user_id = s("user_id");
    p.app_id = s("app_id");
    p.cluster_id = s("cluster_id");
    p.timestamp = n("timestamp");
    p.delivery_mode = n("delivery_mode").and_then(|d| u8::try_from(d).ok());
    p.priority = n("priority").and_then(|d| u8::try_from(d).ok());
    if let Some(h) = m.get("headers") {
        let t = json_to_table(h)?;
        if !t.is_empty() {
            p.headers = Some(t);
        }
    }
    Ok(p)
}

pub async fn publish(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    Body(body): Body,
) -> ApiResult<Json<Value>> {
    caller.require_vhost(&s.broker, &vhost)?;
    let b = &s.broker;
    let v = b.vhost(&vhost).ok_or_else(ApiError::not_found)?;
    let exchange = if name == "amq.default" {
        ""
    } else {
        name.as_str()
    };
    // RabbitMQ publishes through an AMQP channel: a missing exchange is a
    // bad request naming the channel error.
    if !exchange.is_empty() {
        v.exchange(exchange)
            .map_err(|e| ApiError::bad_request(format!("{} {}", e.code, e.text)))?;
    }
    // RabbitMQ publishes through an AMQP channel and answers its refusal as
    // a bad request naming the channel error.
    let refused = |e: ApiError| ApiError::bad_request(format!("403 ACCESS_REFUSED - {}", e.reason));
    caller
        .permit(b, &vhost, Access::Write, "exchange", exchange)
        .map_err(refused)?;
    let routing_key = text(&body, "routing_key", "")?;
    let payload = text(&body, "payload", "")?;
    let payload = match text(&body, "payload_encoding", "string")? {
        "string" => bytes::Bytes::from(payload.to_string()),
        "base64" => base64::engine::general_purpose::STANDARD
            .decode(payload)
            .map(bytes::Bytes::from)
            .map_err(|_| ApiError::bad_request("payload is not valid base64"))?,
        other => {
            return Err(ApiError::bad_request(format!(
                "payload_encoding must be string or base64, not '{other}'"
            )))
        }
    };
    let mut props = properties_from(body.get("properties").unwrap_or(&Value::Null))?;
    let cc = crate::broker::cc::take_cc_keys(&mut props)?;
    let mut keys = vec![routing_key];
    keys.extend(cc.iter().map(|k| k.as_str()));
    super::topic_permissions::permit_topic(
        b,
        &vhost,
        &caller.0.name,
        Access::Write,
        exchange,
        &keys,
    )
    .map_err(refused)?;
    let message = Message::new(exchange, routing_key, props, payload);
    let tap = crate::broker::firehose::Tap::http_api(&b.node, &caller.0.name);
    let published = v.publish_client(exchange, &message, &cc, &tap, now_ms())?;
    b.count(&v, |c| {
        Counters::add(&c.published, 1);
        if !published.routed {
            Counters::add(&c.unroutable, 1);
        }
    });
    Ok(Json(json!({ "routed": published.accepted })))
}
