//! `/api/queues[/{vhost}[/{name}]]` (list, show, declare, delete),
//! `/api/queues/{vhost}/{name}/contents` (purge) and `/get` (fetch messages).

use super::metrics::{message_stats, Totals};
use super::{
    flag, json_to_table, table_to_json, text, AdminState, ApiError, ApiResult, Body, Caller,
};
use crate::broker::auth::Access;
use crate::broker::queue::Queue;
use crate::broker::vhost::QueueDeclare;
use crate::wire::BasicProperties;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use base64::Engine;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::Arc;

pub fn queue_json(s: &AdminState, q: &Queue) -> Value {
    let st = q.stats();
    let vhost = &*q.spec.vhost;
    let policy = s
        .broker
        .vhost(vhost)
        .and_then(|v| v.policies.matching(vhost, true, q.name()));
    json!({
        "name": q.name(),
        "vhost": vhost,
        "durable": q.spec.durable,
        "auto_delete": q.spec.auto_delete,
        "exclusive": q.spec.exclusive_owner.is_some(),
        "arguments": table_to_json(&q.spec.arguments),
        "type": "classic",
        "node": super::node_name(),
        "state": "running",
        "messages": st.ready + st.unacked,
        "messages_ready": st.ready,
        "messages_unacknowledged": st.unacked,
        "message_bytes_ready": st.ready_bytes,
        "consumers": st.consumers,
        "policy": policy.as_ref().map(|p| p.name.clone()),
        "effective_policy_definition": policy.map(|p| Value::Object(p.definition)).unwrap_or(json!({})),
        "message_stats": message_stats(&Totals::of(&q.counters), &s.rates.queue(vhost, q.name())),
    })
}

fn collect(s: &AdminState, caller: &Caller, only: Option<&str>) -> Vec<Value> {
    let b = &s.broker;
    let mut out = Vec::new();
    for v in b.vhosts() {
        if only.is_some_and(|o| o != &*v.name) || !caller.sees(b, &v.name) {
            continue;
        }
        for q in v.queues() {
            out.push(queue_json(s, &q));
        }
    }
    super::sort_by_vhost_name(&mut out);
    out
}

pub async fn list(State(s): State<AdminState>, caller: Caller) -> Json<Value> {
    Json(Value::Array(collect(&s, &caller, None)))
}

pub async fn list_vhost(
    State(s): State<AdminState>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult<Json<Value>> {
    caller.require_vhost(&s.broker, &vhost)?;
    Ok(Json(Value::Array(collect(&s, &caller, Some(&vhost)))))
}

/// The queue `name` in `vhost` for the API (exclusive queues included).
pub fn find(s: &AdminState, vhost: &str, name: &str) -> ApiResult<Arc<Queue>> {
    let v = s.broker.vhost(vhost).ok_or_else(ApiError::not_found)?;
    v.queues()
        .into_iter()
        .find(|q| q.name() == name)
        .ok_or_else(ApiError::not_found)
}

pub async fn show(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    caller.require_vhost(&s.broker, &vhost)?;
    let q = find(&s, &vhost, &name)?;
    Ok(Json(queue_json(&s, &q)))
}

/// Declare a queue from an API / definitions body.
pub fn declare_from(s: &AdminState, vhost: &str, name: &str, body: &Value) -> ApiResult<bool> {
    let v = s.broker.vhost(vhost).ok_or_else(ApiError::not_found)?;
    if name.is_empty() {
        return Err(ApiError::bad_request("queue name must not be empty"));
    }
    let existed = v.queues().iter().any(|q| q.name() == name);
    if flag(body, "exclusive", false)? {
        return Err(ApiError::bad_request(
            "exclusive queues can only be declared by AMQP connections",
        ));
    }
    v.declare_queue(
        &QueueDeclare {
            name: name.to_string(),
            passive: false,
            durable: flag(body, "durable", true)?,
            exclusive: false,
            auto_delete: flag(body, "auto_delete", false)?,
            arguments: json_to_table(body.get("arguments").unwrap_or(&Value::Null))?,
        },
        0,
    )?;
    Ok(!existed)
}

pub async fn put(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    Body(body): Body,
) -> ApiResult<StatusCode> {
    caller.require_vhost(&s.broker, &vhost)?;
    caller.permit(&s.broker, &vhost, Access::Configure, "queue", &name)?;
    Ok(if declare_from(&s, &vhost, &name, &body)? {
        StatusCode::CREATED
    } else {
        StatusCode::NO_CONTENT
    })
}

pub async fn remove(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<StatusCode> {
    caller.require_vhost(&s.broker, &vhost)?;
    let q = find(&s, &vhost, &name)?;
    caller.permit(&s.broker, &vhost, Access::Configure, "queue", &name)?;
    let st = q.stats();
    if params.get("if-unused").is_some_and(|x| x == "true") && st.consumers > 0 {
        return Err(ApiError::bad_request(format!("queue '{name}' in use")));
    }
    if params.get("if-empty").is_some_and(|x| x == "true") && st.ready + st.unacked > 0 {
        return Err(ApiError::bad_request(format!(
            "queue '{name}' is not empty"
        )));
    }
    if let Some(v) = s.broker.vhost(&vhost) {
        v.remove_queue(&q);
    }
    Ok(StatusCode::NO_CONTENT)
}

pub async fn purge(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    caller.require_vhost(&s.broker, &vhost)?;
    let q = find(&s, &vhost, &name)?;
    caller.permit(&s.broker, &vhost, Access::Read, "queue", &name)?;
    q.purge();
    Ok(StatusCode::NO_CONTENT)
}

pub fn properties_json(p: &BasicProperties) -> Value {
    let mut m = Map::new();
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            m.insert(k.to_string(), v);
        }
    };
    put("content_type", p.content_type.clone().map(Value::from));
    put(
        "content_encoding",
        p.content_encoding.clone().map(Value::from),
    );
    put("headers", p.headers.as_ref().map(table_to_json));
    put("delivery_mode", p.delivery_mode.map(Value::from));
    put("priority", p.priority.map(Value::from));
    put("correlation_id", p.correlation_id.clone().map(Value::from));
    put("reply_to", p.reply_to.clone().map(Value::from));
    put("expiration", p.expiration.clone().map(Value::from));
    put("message_id", p.message_id.clone().map(Value::from));
    put("timestamp", p.timestamp.map(Value::from));
    put("type", p.kind.clone().map(Value::from));
    put("user_id", p.user_id.clone().map(Value::from));
    put("app_id", p.app_id.clone().map(Value::from));
    put("cluster_id", p.cluster_id.clone().map(Value::from));
    Value::Object(m)
}

/// `POST .../get`: fetch up to `count` messages, then ack or requeue them per `ackmode`.
pub async fn get_messages(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    Body(body): Body,
) -> ApiResult<Json<Value>> {
    caller.require_vhost(&s.broker, &vhost)?;
    let q = find(&s, &vhost, &name)?;
    caller.permit(&s.broker, &vhost, Access::Read, "queue", &name)?;
    let count = match body.get("count") {
        None => 1,
        Some(v) => v
            .as_u64()
            .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
            .ok_or_else(|| ApiError::bad_request("count must be a number"))?,
    };
    let ackmode = body
        .get("ackmode")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_request("ackmode must be set"))?;
    let (requeue, reject) = match ackmode {
        "ack_requeue_true" => (true, false),
        "ack_requeue_false" => (false, false),
        "reject_requeue_true" => (true, true),
        "reject_requeue_false" => (false, true),
        other => return Err(ApiError::bad_request(format!("unknown ackmode '{other}'"))),
    };
    let encoding = text(&body, "encoding", "auto")?;
    if encoding != "auto" && encoding != "base64" {
        return Err(ApiError::bad_request("encoding must be auto or base64"));
    }
    let truncate = match body.get("truncate") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                .ok_or_else(|| ApiError::bad_request("truncate must be a number"))?
                as usize,
        ),
    };
    let mut entries = Vec::new();
    let mut out = Vec::new();
    while (entries.len() as u64) < count {
        let Some((entry, remaining)) = q.get(false) else {
            break;
        };
        let m = &entry.message;
        let mut payload = &m.body[..];
        if let Some(t) = truncate {
            payload = &payload[..payload.len().min(t)];
        }
        let (text_payload, enc) = match (encoding, std::str::from_utf8(payload)) {
            ("auto", Ok(s)) => (s.to_string(), "string"),
            _ => (
                base64::engine::general_purpose::STANDARD.encode(payload),
                "base64",
            ),
        };
        out.push(json!({
            "payload_bytes": m.body.len(),
            "redelivered": entry.redelivered,
            "exchange": m.exchange,
            "routing_key": m.routing_key,
            "message_count": remaining,
            "properties": properties_json(&m.properties),
            "payload": text_payload,
            "payload_encoding": enc,
        }));
        entries.push(entry);
    }
    crate::broker::Counters::add(&s.broker.counters.delivered, entries.len() as u64);
    if requeue {
        q.requeue(entries, true, true);
    } else if reject {
        q.reject(entries);
    } else {
        crate::broker::Counters::add(&s.broker.counters.acked, entries.len() as u64);
        q.ack(&entries);
    }
    Ok(Json(Value::Array(out)))
}
