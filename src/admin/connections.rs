//! `/api/connections[/{name}]` (list, show, force-close; Stream protocol
//! connections included, shown by [`super::stream`]; both with their
//! socket's counters and byte rates), `/api/channels` and
//! `/api/consumers[/{vhost}]`.

use super::{table_to_json, AdminState, ApiError, ApiResult, Caller};
use crate::broker::{ChannelStats, ConnectionInfo};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::Ordering::{self, Relaxed};
use std::sync::Arc;

pub fn connection_json(s: &AdminState, c: &ConnectionInfo) -> Value {
    if let Some(st) = c.control.stream() {
        return super::stream::connection_json(s, c, st);
    }
    let tls = c.tls.as_ref();
    let v = json!({
        "name": c.name,
        "vhost": c.vhost,
        "user": c.user,
        "node": s.broker.node,
        "type": "network",
        "protocol": "AMQP 0-9-1",
        "state": "running",
        "peer_host": c.peer.ip().to_string(),
        "peer_port": c.peer.port(),
        "host": c.local.ip().to_string(),
        "port": c.local.port(),
        "channels": c.channels.load(Ordering::Relaxed),
        "connected_at": c.connected_at,
        "client_properties": table_to_json(&c.client_properties),
        "auth_mechanism": c.auth_mechanism,
        "user_who_performed_action": c.user,
        "frame_max": c.frame_max,
        "channel_max": c.channel_max,
        "timeout": c.heartbeat,
        // As RabbitMQ: the TLS keys are null on a plain connection.
        "ssl": tls.is_some(),
        "ssl_protocol": tls.map(|t| t.protocol),
        "ssl_cipher": tls.map(|t| t.cipher.as_str()),
        "peer_cert_subject": tls.and_then(|t| t.peer_cert_subject.as_deref()),
        "peer_cert_issuer": tls.and_then(|t| t.peer_cert_issuer.as_deref()),
    });
    with_socket_stats(s, c, v)
}

/// `v` (a connection's object) with its socket's counters (`recv_oct`,
/// `recv_cnt`, `send_oct`, `send_cnt`) and the byte rates over the last
/// sample (`recv_oct_details.rate`, `send_oct_details.rate`), for either
/// protocol.
pub(super) fn with_socket_stats(s: &AdminState, c: &ConnectionInfo, mut v: Value) -> Value {
    let rates = s.rates.connection(c.id);
    let io = &c.socket;
    if let Value::Object(m) = &mut v {
        for (k, x) in [
            ("recv_oct", json!(io.recv_oct.load(Ordering::Relaxed))),
            ("recv_oct_details", super::details(rates.recv_oct)),
            ("recv_cnt", json!(io.recv_cnt.load(Ordering::Relaxed))),
            ("send_oct", json!(io.send_oct.load(Ordering::Relaxed))),
            ("send_oct_details", super::details(rates.send_oct)),
            ("send_cnt", json!(io.send_cnt.load(Ordering::Relaxed))),
        ] {
            m.insert(k.into(), x);
        }
    }
    v
}

/// Connections the caller may see: monitors all, others their own.
fn visible(s: &AdminState, caller: &Caller) -> Vec<Arc<ConnectionInfo>> {
    let mut v: Vec<_> = s
        .broker
        .connections()
        .into_iter()
        .filter(|c| caller.is_monitor() || c.user == caller.0.name)
        .collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

/// `/api/connections`, with the listing parameters (`page`, `name`, `sort`, ...).
pub async fn list(
    State(s): State<AdminState>,
    caller: Caller,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let rows = visible(&s, &caller)
        .iter()
        .map(|c| connection_json(&s, c))
        .collect();
    super::queues::paged(rows, &params).map(Json)
}

pub async fn list_vhost(
    State(s): State<AdminState>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult<Json<Value>> {
    caller.require_vhost(&s.broker, &vhost)?;
    Ok(Json(Value::Array(
        visible(&s, &caller)
            .iter()
            .filter(|c| c.vhost == vhost)
            .map(|c| connection_json(&s, c))
            .collect(),
    )))
}

fn find(s: &AdminState, caller: &Caller, name: &str) -> ApiResult<Arc<ConnectionInfo>> {
    visible(s, caller)
        .into_iter()
        .find(|c| c.name == name)
        .ok_or_else(ApiError::not_found)
}

pub async fn show(
    State(s): State<AdminState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    let c = find(&s, &caller, &name)?;
    Ok(Json(connection_json(&s, &c)))
}

/// The reason to close `c` with (the `X-Reason` header, or the management
/// plugin's default), once `caller` may close it: an administrator, or the
/// connection's own user.
pub(super) fn close_reason<'h>(
    caller: &Caller,
    c: &ConnectionInfo,
    headers: &'h axum::http::HeaderMap,
) -> ApiResult<&'h str> {
    if !caller.is_admin() && c.user != caller.0.name {
        return Err(ApiError::refused("Not administrator user"));
    }
    Ok(headers
        .get("x-reason")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("Closed via management plugin"))
}

/// Close with 320 CONNECTION_FORCED; the reason comes from the `X-Reason` header.
pub async fn close(
    State(s): State<AdminState>,
    caller: Caller,
    Path(name): Path<String>,
    headers: axum::http::HeaderMap,
) -> ApiResult<StatusCode> {
    let c = find(&s, &caller, &name)?;
    let reason = close_reason(&caller, &c, &headers)?;
    if s.broker.close_connection(&name, reason) {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found())
    }
}

/// `GET /api/connections/username/{user}`: that user's connections.
pub async fn list_user(
    State(s): State<AdminState>,
    caller: Caller,
    Path(user): Path<String>,
) -> Json<Value> {
    Json(Value::Array(
        visible(&s, &caller)
            .iter()
            .filter(|c| c.user == user)
            .map(|c| connection_json(&s, c))
            .collect(),
    ))
}

/// `DELETE /api/connections/username/{user}`: close every connection of
/// that user (an administrator, or the user itself), with the `X-Reason`
/// header's reason.
pub async fn close_user(
    State(s): State<AdminState>,
    caller: Caller,
    Path(user): Path<String>,
    headers: axum::http::HeaderMap,
) -> ApiResult<StatusCode> {
    for c in visible(&s, &caller).iter().filter(|c| c.user == user) {
        let reason = close_reason(&caller, c, &headers)?;
        s.broker.close_connection(&c.name, reason);
    }
    Ok(StatusCode::NO_CONTENT)
}

/// The channels of the connections `caller` sees that `keep` keeps, as
/// `/api/channels` lists them.
fn channel_rows(
    s: &AdminState,
    caller: &Caller,
    keep: impl Fn(&ConnectionInfo) -> bool,
) -> Vec<Value> {
    let consumers = consumer_counts(s);
    let mut out = Vec::new();
    for c in visible(s, caller).into_iter().filter(|c| keep(c)) {
        let open: Vec<(u16, Arc<ChannelStats>)> = c
            .open_channels
            .lock()
            .iter()
            .map(|(n, st)| (*n, Arc::clone(st)))
            .collect();
        for (n, st) in open {
            let get = |a: &std::sync::atomic::AtomicU64| a.load(Relaxed);
            let (deliver, deliver_no_ack) = (get(&st.deliver), get(&st.deliver_no_ack));
            let (got, get_no_ack) = (get(&st.get), get(&st.get_no_ack));
            out.push(json!({
                "name": format!("{} ({n})", c.name),
                "number": n,
                "vhost": c.vhost,
                "user": c.user,
                "node": s.broker.node,
                "state": "running",
                "consumer_count": consumers.get(&(c.id, n)).copied().unwrap_or(0),
                "prefetch_count": st.prefetch_count.load(Relaxed),
                "global_prefetch_count": st.global_prefetch_count.load(Relaxed),
                "confirm": st.confirm.load(Relaxed),
                "transactional": st.transactional.load(Relaxed),
                "messages_unacknowledged": get(&st.unacked),
                "messages_unconfirmed": get(&st.unconfirmed),
                "messages_uncommitted": get(&st.uncommitted),
                "acks_uncommitted": get(&st.acks_uncommitted),
                "message_stats": {
                    "publish": get(&st.publish),
                    "deliver": deliver,
                    "deliver_no_ack": deliver_no_ack,
                    "get": got,
                    "get_no_ack": get_no_ack,
                    "get_empty": get(&st.get_empty),
                    "deliver_get": deliver + deliver_no_ack + got + get_no_ack,
                    "redeliver": get(&st.redeliver),
                    "ack": get(&st.ack),
                    "return_unroutable": get(&st.return_unroutable),
                    "drop_unroutable": get(&st.drop_unroutable),
                },
                "connection_details": {
                    "name": c.name,
                    "peer_host": c.peer.ip().to_string(),
                    "peer_port": c.peer.port(),
                },
            }));
        }
    }
    out
}

/// `/api/channels`, with the listing parameters (`page`, `name`, `sort`, ...).
pub async fn channels(
    State(s): State<AdminState>,
    caller: Caller,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    super::queues::paged(channel_rows(&s, &caller, |_| true), &params).map(Json)
}

/// `/api/vhosts/{vhost}/channels`.
pub async fn channels_vhost(
    State(s): State<AdminState>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult<Json<Value>> {
    caller.require_vhost(&s.broker, &vhost)?;
    Ok(Json(Value::Array(channel_rows(&s, &caller, |c| {
        c.vhost == vhost
    }))))
}

/// `/api/connections/{name}/channels` (404 for a connection `caller` does
/// not see).
pub async fn connection_channels(
    State(s): State<AdminState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    find(&s, &caller, &name)?;
    Ok(Json(Value::Array(channel_rows(&s, &caller, |c| {
        c.name == name
    }))))
}

/// `/api/channels/{name}`: one channel, by its name (`<connection> (<number>)`).
pub async fn channel(
    State(s): State<AdminState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    let (conn, _) = name.rsplit_once(" (").ok_or_else(ApiError::not_found)?;
    channel_rows(&s, &caller, |c| c.name == conn)
        .into_iter()
        .find(|row| row["name"] == name.as_str())
        .map(Json)
        .ok_or_else(ApiError::not_found)
}

fn consumer_counts(s: &AdminState) -> HashMap<(u64, u16), usize> {
    let mut m = HashMap::new();
    for v in s.broker.vhosts() {
        for q in v.queues() {
            for c in q.consumers() {
                *m.entry((c.connection, c.channel)).or_insert(0) += 1;
            }
        }
    }
    m
}

pub(super) fn consumers_where(s: &AdminState, caller: &Caller, only: Option<&str>) -> Vec<Value> {
    let conns: HashMap<u64, Arc<ConnectionInfo>> = s
        .broker
        .connections()
        .into_iter()
        .map(|c| (c.id, c))
        .collect();
    let mut out = Vec::new();
    for v in s.broker.vhosts() {
        if only.is_some_and(|o| o != &*v.name) || !caller.sees(&s.broker, &v.name) {
            continue;
        }
        for q in v.queues() {
            for c in q.consumers() {
                let conn = conns.get(&c.connection);
                out.push(json!({
                    "consumer_tag": &*c.tag,
                    "queue": {"name": q.name(), "vhost": &*v.name},
                    "channel_details": {
                        "number": c.channel,
                        "name": conn.map(|x| format!("{} ({})", x.name, c.channel)),
                        "connection_name": conn.map(|x| x.name.clone()),
                        "peer_host": conn.map(|x| x.peer.ip().to_string()),
                        "peer_port": conn.map(|x| x.peer.port()),
                        "user": conn.map(|x| x.user.clone()),
                        "node": &*s.broker.node,
                    },
                    "ack_required": !c.no_ack,
                    "exclusive": c.exclusive,
                    "prefetch_count": c.credit.limit(),
                    "priority": c.priority,
                    "active": true,
                    "activity_status": "up",
                    "arguments": table_to_json(&c.arguments),
                }));
            }
        }
    }
    // Stream protocol subscriptions, as RabbitMQ lists them: `stream.subid-N`
    // of the connection, no ack, no prefetch, the subscription's properties
    // as arguments.
    let mut by_name: Vec<&Arc<ConnectionInfo>> = conns.values().collect();
    by_name.sort_by(|a, b| a.name.cmp(&b.name));
    for conn in by_name {
        let Some(st) = conn.control.stream() else {
            continue;
        };
        if only.is_some_and(|o| o != conn.vhost) || !caller.sees(&s.broker, &conn.vhost) {
            continue;
        }
        for x in st.consumers() {
            let arguments: serde_json::Map<String, Value> = x
                .properties
                .iter()
                .map(|(k, v)| (k.clone(), json!(v)))
                .collect();
            out.push(json!({
                "consumer_tag": format!("stream.subid-{}", x.id),
                "queue": {"name": x.stream, "vhost": conn.vhost},
                "channel_details": {
                    "number": 0,
                    "name": conn.name,
                    "connection_name": conn.name,
                    "peer_host": conn.peer.ip().to_string(),
                    "peer_port": conn.peer.port(),
                    "user": conn.user,
                    "node": &*s.broker.node,
                },
                "ack_required": false,
                "exclusive": false,
                "prefetch_count": 0,
                "priority": 0,
                "active": true,
                "activity_status": "up",
                "arguments": arguments,
            }));
        }
    }
    out
}

pub async fn consumers(State(s): State<AdminState>, caller: Caller) -> Json<Value> {
    Json(Value::Array(consumers_where(&s, &caller, None)))
}

pub async fn consumers_vhost(
    State(s): State<AdminState>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult<Json<Value>> {
    caller.require_vhost(&s.broker, &vhost)?;
    Ok(Json(Value::Array(consumers_where(
        &s,
        &caller,
        Some(&vhost),
    ))))
}
