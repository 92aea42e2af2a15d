//! The stream management endpoints (RabbitMQ's `rabbitmq_stream_management`):
//! `/api/stream/connections[/{vhost}[/{name}[/publishers|/consumers]]]`
//! (`DELETE` on a connection closes it), `/api/stream/publishers[/{vhost}[/{stream}]]`
//! and `/api/stream/consumers[/{vhost}]`, with RabbitMQ 3.10's field names
//! (checked against one), and [`connection_json`], the form a Stream protocol
//! connection takes in `/api/connections` too (`protocol: "stream"`).
//!
//! Stream connections are the broker's registered connections whose
//! [`crate::broker::ConnectionControl::stream`] is set; their publishers and
//! consumers come from [`StreamConnStats`].

use super::{table_to_json, AdminState, ApiError, ApiResult, Caller};
use crate::broker::ConnectionInfo;
use crate::session::stream_stats::{ConsumerStats, PublisherStats, StreamConnStats};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// A Stream protocol connection as RabbitMQ shows it (in `/api/connections`
/// and `/api/stream/connections`).
/// With its socket's byte counters (`recv_oct`, `send_oct`, `recv_cnt`,
/// `send_cnt`) and their rates over the last sample (`*_details.rate`).
pub fn connection_json(s: &AdminState, c: &ConnectionInfo, st: &StreamConnStats) -> Value {
    let v = json!({
        "name": c.name,
        "vhost": c.vhost,
        "user": c.user,
        "user_who_performed_action": c.user,
        "user_provided_name": c.client_properties.get("connection_name").and_then(|v| v.as_str()),
        "node": s.broker.node,
        "protocol": "stream",
        "state": "running",
        "auth_mechanism": st.auth_mechanism(),
        "peer_host": c.peer.ip().to_string(),
        "peer_port": c.peer.port(),
        "host": c.local.ip().to_string(),
        "port": c.local.port(),
        "channels": 0,
        "channel_max": 0,
        "connected_at": c.connected_at,
        "client_properties": table_to_json(&c.client_properties),
        "frame_max": c.frame_max,
        "timeout": c.heartbeat,
    });
    let v = super::connections::with_tls(v, c.tls.as_ref());
    super::connections::with_socket_stats(s, c, v)
}

/// The Stream protocol subscriptions to `stream` of `vhost`: RabbitMQ counts
/// them in a stream queue's `consumers`, with its AMQP consumers.
pub fn subscriptions_to(b: &crate::broker::Broker, vhost: &str, stream: &str) -> usize {
    b.connections()
        .iter()
        .filter(|c| c.vhost == vhost)
        .filter_map(|c| c.control.stream())
        .map(|st| st.consumers().iter().filter(|x| x.stream == stream).count())
        .sum()
}

/// What `connection_details` says of a publisher's or consumer's connection.
fn details(node: &str, c: &ConnectionInfo) -> Value {
    json!({
        "name": c.name,
        "node": node,
        "peer_host": c.peer.ip().to_string(),
        "peer_port": c.peer.port(),
        "user": c.user,
    })
}

fn publisher_json(node: &str, c: &ConnectionInfo, p: &PublisherStats) -> Value {
    json!({
        "publisher_id": p.id,
        "reference": p.reference,
        "queue": {"name": p.stream, "vhost": c.vhost},
        "connection_details": details(node, c),
        "published": p.published.load(Ordering::Relaxed),
        "confirmed": p.confirmed.load(Ordering::Relaxed),
        "errored": p.errored.load(Ordering::Relaxed),
    })
}

fn consumer_json(s: &AdminState, c: &ConnectionInfo, x: &ConsumerStats) -> Value {
    let offset = x.offset.load(Ordering::Relaxed);
    // The stream's last committed offset, minus what the consumer reached.
    let last = s
        .broker
        .vhost(&c.vhost)
        .and_then(|v| v.queue(&x.stream, 0).ok())
        .and_then(|q| q.stream().map(|log| *log.committed().borrow()))
        .map_or(0, |next| next.saturating_sub(1));
    let properties: serde_json::Map<String, Value> = x
        .properties
        .iter()
        .map(|(k, v)| (k.clone(), json!(v)))
        .collect();
    json!({
        "subscription_id": x.id,
        "queue": {"name": x.stream, "vhost": c.vhost},
        "connection_details": details(&s.broker.node, c),
        "credits": x.credits.load(Ordering::Relaxed),
        "consumed": x.consumed.load(Ordering::Relaxed),
        "offset": offset,
        "offset_lag": last.saturating_sub(offset),
        "properties": properties,
    })
}

/// The stream connections the caller may see (monitors all, others their
/// own), of `vhost` if given, by name.
fn visible(s: &AdminState, caller: &Caller, vhost: Option<&str>) -> Vec<Arc<ConnectionInfo>> {
    let mut v = all_here(s);
    v.retain(|c| vhost.is_none_or(|v| c.vhost == v) && caller.sees_connections_of(&c.user));
    v
}

/// Every stream connection of this node, by name.
fn all_here(s: &AdminState) -> Vec<Arc<ConnectionInfo>> {
    let mut v: Vec<_> = s
        .broker
        .connections()
        .into_iter()
        .filter(|c| c.control.stream().is_some())
        .collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

/// This node's rows of a kind (`stream_connections`, `stream_publishers`,
/// `stream_consumers`) for another member's request.
pub(super) fn local_rows(s: &AdminState, kind: &str) -> Vec<Value> {
    let rows = match kind {
        "stream_connections" => connections_json(s, &all_here(s)),
        "stream_publishers" => publishers_of(&s.broker.node, &all_here(s), None),
        "stream_consumers" => consumers_of(s, &all_here(s)),
        _ => return Vec::new(),
    };
    match rows {
        Value::Array(rows) => rows,
        _ => Vec::new(),
    }
}

/// What a row (a connection's, or a publisher's or consumer's with its
/// `connection_details`) is of: (vhost, connection name, user).
fn row_keys(row: &Value) -> (&str, &str, &str) {
    fn s(v: &Value) -> &str {
        v.as_str().unwrap_or_default()
    }
    match row.get("connection_details") {
        Some(d) => (s(&row["queue"]["vhost"]), s(&d["name"]), s(&d["user"])),
        None => (s(&row["vhost"]), s(&row["name"]), s(&row["user"])),
    }
}

/// `here` (this node's rows of `kind`), with the other members' rows that
/// `caller` sees (as [`visible`]), of `vhost` and of connection `name` when
/// given.
async fn with_members(
    s: &AdminState,
    caller: &Caller,
    kind: &str,
    here: Value,
    vhost: Option<&str>,
    name: Option<&str>,
) -> Value {
    let mut rows = match here {
        Value::Array(rows) => rows,
        _ => Vec::new(),
    };
    rows.extend(
        super::connections::member_rows_where(s, kind, |r| {
            let (v, n, user) = row_keys(r);
            caller.sees_connections_of(user)
                && vhost.is_none_or(|w| w == v)
                && name.is_none_or(|w| w == n)
        })
        .await,
    );
    Value::Array(rows)
}

/// Connection `name` of `vhost` on another member, as `caller` sees it.
async fn find_remote(s: &AdminState, caller: &Caller, vhost: &str, name: &str) -> ApiResult<Value> {
    let rows = with_members(
        s,
        caller,
        "stream_connections",
        json!([]),
        Some(vhost),
        Some(name),
    );
    match rows.await {
        Value::Array(mut rows) if !rows.is_empty() => Ok(rows.swap_remove(0)),
        _ => Err(ApiError::not_found()),
    }
}

fn find(
    s: &AdminState,
    caller: &Caller,
    vhost: &str,
    name: &str,
) -> ApiResult<Arc<ConnectionInfo>> {
    visible(s, caller, Some(vhost))
        .into_iter()
        .find(|c| c.name == name)
        .ok_or_else(ApiError::not_found)
}

fn connections_json(s: &AdminState, conns: &[Arc<ConnectionInfo>]) -> Value {
    Value::Array(
        conns
            .iter()
            .filter_map(|c| c.control.stream().map(|st| connection_json(s, c, st)))
            .collect(),
    )
}

pub async fn connections(State(s): State<AdminState>, caller: Caller) -> Json<Value> {
    let here = connections_json(&s, &visible(&s, &caller, None));
    Json(with_members(&s, &caller, "stream_connections", here, None, None).await)
}

pub async fn connections_vhost(
    State(s): State<AdminState>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult<Json<Value>> {
    caller.require_vhost(&s.broker, &vhost)?;
    let here = connections_json(&s, &visible(&s, &caller, Some(&vhost)));
    let kind = "stream_connections";
    Ok(Json(
        with_members(&s, &caller, kind, here, Some(&vhost), None).await,
    ))
}

pub async fn connection(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let Ok(c) = find(&s, &caller, &vhost, &name) else {
        return find_remote(&s, &caller, &vhost, &name).await.map(Json);
    };
    let st = c.control.stream().ok_or_else(ApiError::not_found)?;
    Ok(Json(connection_json(&s, &c, st)))
}

/// Close it, as `DELETE /api/connections/{name}` does (204).
pub async fn close(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
) -> ApiResult<StatusCode> {
    let Ok(c) = find(&s, &caller, &vhost, &name) else {
        let row = find_remote(&s, &caller, &vhost, &name).await?;
        let user = row["user"].as_str().unwrap_or_default();
        let reason = super::connections::close_reason(&caller, user, &headers)?;
        return if super::connections::close_remote(&s, &row, reason).await {
            Ok(StatusCode::NO_CONTENT)
        } else {
            Err(ApiError::not_found())
        };
    };
    let reason = super::connections::close_reason(&caller, &c.user, &headers)?;
    c.control.force_close(reason);
    Ok(StatusCode::NO_CONTENT)
}

pub async fn connection_publishers(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let Ok(c) = find(&s, &caller, &vhost, &name) else {
        find_remote(&s, &caller, &vhost, &name).await?;
        let kind = "stream_publishers";
        let theirs = with_members(&s, &caller, kind, json!([]), Some(&vhost), Some(&name));
        return Ok(Json(theirs.await));
    };
    Ok(Json(publishers_of(&s.broker.node, &[c], None)))
}

pub async fn connection_consumers(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    let Ok(c) = find(&s, &caller, &vhost, &name) else {
        find_remote(&s, &caller, &vhost, &name).await?;
        let kind = "stream_consumers";
        let theirs = with_members(&s, &caller, kind, json!([]), Some(&vhost), Some(&name));
        return Ok(Json(theirs.await));
    };
    Ok(Json(consumers_of(&s, &[c])))
}

fn publishers_of(node: &str, conns: &[Arc<ConnectionInfo>], stream: Option<&str>) -> Value {
    let mut out = Vec::new();
    for c in conns {
        let Some(st) = c.control.stream() else {
            continue;
        };
        for p in st.publishers() {
            if stream.is_none_or(|s| s == p.stream) {
                out.push(publisher_json(node, c, &p));
            }
        }
    }
    Value::Array(out)
}

fn consumers_of(s: &AdminState, conns: &[Arc<ConnectionInfo>]) -> Value {
    let mut out = Vec::new();
    for c in conns {
        let Some(st) = c.control.stream() else {
            continue;
        };
        for x in st.consumers() {
            out.push(consumer_json(s, c, &x));
        }
    }
    Value::Array(out)
}

pub async fn publishers(State(s): State<AdminState>, caller: Caller) -> Json<Value> {
    let here = publishers_of(&s.broker.node, &visible(&s, &caller, None), None);
    Json(with_members(&s, &caller, "stream_publishers", here, None, None).await)
}

pub async fn publishers_vhost(
    State(s): State<AdminState>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult<Json<Value>> {
    caller.require_vhost(&s.broker, &vhost)?;
    let here = publishers_of(&s.broker.node, &visible(&s, &caller, Some(&vhost)), None);
    let kind = "stream_publishers";
    Ok(Json(
        with_members(&s, &caller, kind, here, Some(&vhost), None).await,
    ))
}

pub async fn publishers_stream(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, stream)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    caller.require_vhost(&s.broker, &vhost)?;
    let conns = visible(&s, &caller, Some(&vhost));
    let here = publishers_of(&s.broker.node, &conns, Some(&stream));
    let theirs = with_members(
        &s,
        &caller,
        "stream_publishers",
        json!([]),
        Some(&vhost),
        None,
    );
    let mut rows = match here {
        Value::Array(rows) => rows,
        _ => Vec::new(),
    };
    if let Value::Array(theirs) = theirs.await {
        rows.extend(
            theirs
                .into_iter()
                .filter(|r| r["queue"]["name"] == stream.as_str()),
        );
    }
    Ok(Json(Value::Array(rows)))
}

pub async fn consumers(State(s): State<AdminState>, caller: Caller) -> Json<Value> {
    let here = consumers_of(&s, &visible(&s, &caller, None));
    Json(with_members(&s, &caller, "stream_consumers", here, None, None).await)
}

pub async fn consumers_vhost(
    State(s): State<AdminState>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult<Json<Value>> {
    caller.require_vhost(&s.broker, &vhost)?;
    let here = consumers_of(&s, &visible(&s, &caller, Some(&vhost)));
    let kind = "stream_consumers";
    Ok(Json(
        with_members(&s, &caller, kind, here, Some(&vhost), None).await,
    ))
}
