//! `/api/connections[/{name}]` (list, show, force-close; Stream protocol
//! connections included, shown by [`super::stream`]; both with their
//! socket's counters and byte rates), `/api/channels` and
//! `/api/consumers[/{vhost}]`. Clustered, as RabbitMQ's: the rows of every
//! member that answers ([`member_rows`], asked over the cluster port; each
//! row's `node` is where the connection is), and a connection on another
//! member is shown and closed through this node's API too.

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
    });
    with_socket_stats(s, c, with_tls(with_provided_name(v, c), c.tls.as_ref()))
}

/// `v` (a connection's object) with `user_provided_name`, the name the
/// client gave its connection (the `connection_name` client property), as
/// RabbitMQ shows it when there is one.
fn with_provided_name(mut v: Value, c: &ConnectionInfo) -> Value {
    let given = c
        .client_properties
        .get("connection_name")
        .and_then(|n| n.as_str());
    if let (Value::Object(m), Some(name)) = (&mut v, given) {
        m.insert("user_provided_name".into(), json!(name));
    }
    v
}

/// `v` (a connection's object) with RabbitMQ's TLS keys, null on a plain
/// connection (`peer_cert_validity` always: not kept).
pub(super) fn with_tls(mut v: Value, tls: Option<&crate::broker::TlsInfo>) -> Value {
    if let Value::Object(m) = &mut v {
        for (k, x) in [
            ("ssl", json!(tls.is_some())),
            ("ssl_protocol", json!(tls.map(|t| t.protocol))),
            ("ssl_cipher", json!(tls.map(|t| t.cipher.as_str()))),
            ("ssl_hash", json!(tls.map(|t| t.hash()))),
            ("ssl_key_exchange", json!(tls.map(|t| t.key_exchange()))),
            (
                "peer_cert_subject",
                json!(tls.and_then(|t| t.peer_cert_subject.as_deref())),
            ),
            (
                "peer_cert_issuer",
                json!(tls.and_then(|t| t.peer_cert_issuer.as_deref())),
            ),
            ("peer_cert_validity", Value::Null),
        ] {
            m.insert(k.into(), x);
        }
    }
    v
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

/// Whose objects a listing shows: a caller's (monitors see every
/// connection, others their own), or all of them (another member asked:
/// the asking node filters for its caller).
#[derive(Clone, Copy)]
enum Viewer<'a> {
    All,
    Caller(&'a Caller),
}

impl Viewer<'_> {
    /// Sees the connections (and channels) of `user`.
    fn sees_user(&self, user: &str) -> bool {
        match self {
            Viewer::All => true,
            Viewer::Caller(c) => c.sees_connections_of(user),
        }
    }

    /// Sees the consumers of `vhost`.
    fn sees_vhost(&self, s: &AdminState, vhost: &str) -> bool {
        match self {
            Viewer::All => true,
            Viewer::Caller(c) => c.sees(&s.broker, vhost),
        }
    }

    /// Sees `row`, a connection's or a channel's (by its `user`) or a
    /// consumer's (by its queue's vhost), as another member listed it.
    fn sees_row(&self, s: &AdminState, row: &Value) -> bool {
        match row["queue"]["vhost"].as_str() {
            Some(vhost) => self.sees_vhost(s, vhost),
            None => self.sees_user(row["user"].as_str().unwrap_or_default()),
        }
    }
}

/// Connections the caller may see: monitors all, others their own.
fn visible(s: &AdminState, caller: &Caller) -> Vec<Arc<ConnectionInfo>> {
    visible_to(s, Viewer::Caller(caller))
}

fn visible_to(s: &AdminState, viewer: Viewer<'_>) -> Vec<Arc<ConnectionInfo>> {
    let mut v: Vec<_> = s
        .broker
        .connections()
        .into_iter()
        .filter(|c| viewer.sees_user(&c.user))
        .collect();
    v.sort_by(|a, b| a.name.cmp(&b.name));
    v
}

/// The rows of one kind (`connections`, `channels`, `consumers`) this node
/// has, for another member's request.
fn local_rows(s: &AdminState, kind: &str) -> Vec<Value> {
    match kind {
        "connections" => visible_to(s, Viewer::All)
            .iter()
            .map(|c| connection_json(s, c))
            .collect(),
        "channels" => channel_rows(s, Viewer::All, |_| true),
        "consumers" => consumer_rows(s, Viewer::All, None),
        other => super::stream::local_rows(s, other),
    }
}

/// What another member asks of this node's connections: its rows of a kind
/// (`{"rows": "connections"}`), or to close one of its connections
/// (`{"close_connection": name, "reason": ...}`, checked by the asking
/// node); None for other requests.
pub fn answer_stats(s: &AdminState, query: &Value) -> Option<Value> {
    if let Some(kind) = query.get("rows").and_then(Value::as_str) {
        return Some(json!({ "rows": local_rows(s, kind) }));
    }
    let name = query.get("close_connection").and_then(Value::as_str)?;
    let reason = query["reason"]
        .as_str()
        .unwrap_or("Closed via management plugin");
    Some(json!({ "closed": s.broker.close_connection(name, reason) }))
}

/// This node's connections counted for the overview: by user, how many
/// connections and channels; by vhost, how many Stream protocol
/// subscriptions (consumers, as RabbitMQ counts them).
pub(super) fn local_counts(s: &AdminState) -> Value {
    let mut users: HashMap<String, (u64, u64)> = HashMap::new();
    let mut subscriptions: HashMap<String, u64> = HashMap::new();
    for c in s.broker.connections() {
        let u = users.entry(c.user.clone()).or_default();
        u.0 += 1;
        u.1 += u64::from(c.channels.load(Ordering::Relaxed));
        if let Some(st) = c.control.stream() {
            *subscriptions.entry(c.vhost.clone()).or_default() += st.consumers().len() as u64;
        }
    }
    json!({"users": users, "subscriptions": subscriptions})
}

/// The connections, channels and Stream protocol subscriptions that
/// `caller` sees in `counts` (a member's [`local_counts`]), counted.
pub(super) fn counted(s: &AdminState, caller: &Caller, counts: &Value) -> (u64, u64, u64) {
    let viewer = Viewer::Caller(caller);
    let (mut conns, mut channels, mut subs) = (0, 0, 0);
    for (user, n) in counts["users"].as_object().into_iter().flatten() {
        if viewer.sees_user(user) {
            conns += n[0].as_u64().unwrap_or(0);
            channels += n[1].as_u64().unwrap_or(0);
        }
    }
    for (vhost, n) in counts["subscriptions"].as_object().into_iter().flatten() {
        if viewer.sees_vhost(s, vhost) {
            subs += n.as_u64().unwrap_or(0);
        }
    }
    (conns, channels, subs)
}

/// The rows of `kind` the other members have, that `caller` may see (none
/// on a node without a cluster; a member that does not answer has none).
async fn member_rows(s: &AdminState, caller: &Caller, kind: &str) -> Vec<Value> {
    let viewer = Viewer::Caller(caller);
    member_rows_where(s, kind, |r| viewer.sees_row(s, r)).await
}

/// The rows of `kind` the other members have that `keep` keeps.
pub(super) async fn member_rows_where(
    s: &AdminState,
    kind: &str,
    keep: impl Fn(&Value) -> bool,
) -> Vec<Value> {
    let mut rows = Vec::new();
    for (_, answer) in super::cluster::ask_members(s, &json!({ "rows": kind })).await {
        let Some(Value::Array(theirs)) =
            answer.and_then(|mut a| a.get_mut("rows").map(Value::take))
        else {
            continue;
        };
        rows.extend(theirs.into_iter().filter(|r| keep(r)));
    }
    rows
}

/// This node's rows of `kind` and the other members', by name.
async fn cluster_rows(
    s: &AdminState,
    caller: &Caller,
    kind: &str,
    mut rows: Vec<Value>,
) -> Vec<Value> {
    rows.extend(member_rows(s, caller, kind).await);
    if kind != "consumers" {
        rows.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
    }
    rows
}

/// Every connection `caller` sees, on every member.
async fn all_connections(s: &AdminState, caller: &Caller) -> Vec<Value> {
    let here = visible(s, caller)
        .iter()
        .map(|c| connection_json(s, c))
        .collect();
    cluster_rows(s, caller, "connections", here).await
}

/// `/api/connections`, with the listing parameters (`page`, `name`, `sort`, ...).
pub async fn list(
    State(s): State<AdminState>,
    caller: Caller,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let rows = all_connections(&s, &caller).await;
    super::queues::paged(rows, &params).map(Json)
}

pub async fn list_vhost(
    State(s): State<AdminState>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult<Json<Value>> {
    caller.require_vhost(&s.broker, &vhost)?;
    let rows = all_connections(&s, &caller).await.into_iter();
    Ok(Json(Value::Array(
        rows.filter(|r| r["vhost"] == vhost.as_str()).collect(),
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
    if let Ok(c) = find(&s, &caller, &name) {
        return Ok(Json(connection_json(&s, &c)));
    }
    member_rows(&s, &caller, "connections")
        .await
        .into_iter()
        .find(|r| r["name"] == name.as_str())
        .map(Json)
        .ok_or_else(ApiError::not_found)
}

/// The reason to close `c` with (the `X-Reason` header, or the management
/// plugin's default), once `caller` may close it: an administrator, or the
/// connection's own user.
pub(super) fn close_reason<'h>(
    caller: &Caller,
    user: &str,
    headers: &'h axum::http::HeaderMap,
) -> ApiResult<&'h str> {
    if !caller.is_admin() && user != caller.0.name {
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
    if let Ok(c) = find(&s, &caller, &name) {
        let reason = close_reason(&caller, &c.user, &headers)?;
        return if s.broker.close_connection(&name, reason) {
            Ok(StatusCode::NO_CONTENT)
        } else {
            Err(ApiError::not_found())
        };
    }
    let row = member_rows(&s, &caller, "connections")
        .await
        .into_iter()
        .find(|r| r["name"] == name.as_str())
        .ok_or_else(ApiError::not_found)?;
    let reason = close_reason(&caller, row["user"].as_str().unwrap_or_default(), &headers)?;
    if close_remote(&s, &row, reason).await {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found())
    }
}

/// Ask the member named by `row`'s `node` to close its connection `row`.
pub(super) async fn close_remote(s: &AdminState, row: &Value, reason: &str) -> bool {
    let (Some(c), Some(node), Some(name)) =
        (&s.cluster, row["node"].as_str(), row["name"].as_str())
    else {
        return false;
    };
    let ask = json!({"close_connection": name, "reason": reason});
    let answer = c.stats_of(node, &ask).await;
    answer.is_some_and(|a| a["closed"] == true)
}

/// `GET /api/connections/username/{user}`: that user's connections.
pub async fn list_user(
    State(s): State<AdminState>,
    caller: Caller,
    Path(user): Path<String>,
) -> Json<Value> {
    let rows = all_connections(&s, &caller).await.into_iter();
    Json(Value::Array(
        rows.filter(|r| r["user"] == user.as_str()).collect(),
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
        let reason = close_reason(&caller, &c.user, &headers)?;
        s.broker.close_connection(&c.name, reason);
    }
    for row in member_rows(&s, &caller, "connections").await {
        if row["user"] == user.as_str() {
            let reason = close_reason(&caller, &user, &headers)?;
            close_remote(&s, &row, reason).await;
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

/// The channels of the connections `caller` sees that `keep` keeps, as
/// `/api/channels` lists them.
fn channel_rows(
    s: &AdminState,
    viewer: Viewer<'_>,
    keep: impl Fn(&ConnectionInfo) -> bool,
) -> Vec<Value> {
    let consumers = consumer_counts(s);
    let mut out = Vec::new();
    for c in visible_to(s, viewer).into_iter().filter(|c| keep(c)) {
        let open: Vec<(u16, Arc<ChannelStats>)> = c
            .open_channels
            .lock()
            .iter()
            .map(|(n, st)| (*n, Arc::clone(st)))
            .collect();
        for (n, st) in open {
            let get = |a: &std::sync::atomic::AtomicU64| a.load(Relaxed);
            let sample = s.rates.channel(c.id, n);
            let mut row = json!({
                "name": format!("{} ({n})", c.name),
                "number": n,
                "vhost": c.vhost,
                "user": c.user,
                "user_who_performed_action": c.user,
                "node": s.broker.node,
                "state": "running",
                "consumer_count": consumers.get(&(c.id, n)).copied().unwrap_or(0),
                "prefetch_count": st.prefetch_count.load(Relaxed),
                "global_prefetch_count": st.global_prefetch_count.load(Relaxed),
                "confirm": st.confirm.load(Relaxed),
                "transactional": st.transactional.load(Relaxed),
                "messages_unacknowledged": get(&st.unacked),
                "messages_unconfirmed": get(&st.confirms.unconfirmed),
                "messages_uncommitted": get(&st.uncommitted),
                "acks_uncommitted": get(&st.acks_uncommitted),
                "message_stats": super::metrics::channel_stats(
                    &st.counts(),
                    sample.as_ref().map(|x| &x.rates),
                ),
                "connection_details": {
                    "name": c.name,
                    "peer_host": c.peer.ip().to_string(),
                    "peer_port": c.peer.port(),
                },
            });
            // Idle (as RabbitMQ shows it) when the last sample saw no
            // count move: since the sample that first saw them as they are.
            if let Some(x) = sample.filter(|x| x.rates.iter().all(|r| *r == 0.0)) {
                row["idle_since"] = json!(crate::clock::utc_rfc3339(x.unchanged_since));
            }
            out.push(row);
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
    let rows = all_channels(&s, &caller).await;
    super::queues::paged(rows, &params).map(Json)
}

/// Every channel `caller` sees, on every member.
async fn all_channels(s: &AdminState, caller: &Caller) -> Vec<Value> {
    let here = channel_rows(s, Viewer::Caller(caller), |_| true);
    cluster_rows(s, caller, "channels", here).await
}

/// `/api/vhosts/{vhost}/channels`.
pub async fn channels_vhost(
    State(s): State<AdminState>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult<Json<Value>> {
    caller.require_vhost(&s.broker, &vhost)?;
    let rows = all_channels(&s, &caller).await.into_iter();
    Ok(Json(Value::Array(
        rows.filter(|r| r["vhost"] == vhost.as_str()).collect(),
    )))
}

/// `/api/connections/{name}/channels` (404 for a connection `caller` does
/// not see).
pub async fn connection_channels(
    State(s): State<AdminState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    let here = find(&s, &caller, &name).is_ok();
    let rows = if here {
        channel_rows(&s, Viewer::Caller(&caller), |c| c.name == name)
    } else {
        let theirs = member_rows(&s, &caller, "connections").await;
        if !theirs.iter().any(|r| r["name"] == name.as_str()) {
            return Err(ApiError::not_found());
        }
        let all = member_rows(&s, &caller, "channels").await.into_iter();
        all.filter(|r| r["connection_details"]["name"] == name.as_str())
            .collect()
    };
    Ok(Json(Value::Array(rows)))
}

/// `/api/channels/{name}`: one channel, by its name (`<connection> (<number>)`).
pub async fn channel(
    State(s): State<AdminState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    let (conn, _) = name.rsplit_once(" (").ok_or_else(ApiError::not_found)?;
    let here = channel_rows(&s, Viewer::Caller(&caller), |c| c.name == conn);
    let row = match here.into_iter().find(|row| row["name"] == name.as_str()) {
        Some(row) => Some(row),
        None => member_rows(&s, &caller, "channels")
            .await
            .into_iter()
            .find(|row| row["name"] == name.as_str()),
    };
    let mut row = row.ok_or_else(ApiError::not_found)?;
    let consumers =
        cluster_rows(&s, &caller, "consumers", consumers_where(&s, &caller, None)).await;
    row["consumer_details"] = consumers
        .into_iter()
        .filter(|c| c["channel_details"]["name"] == name.as_str())
        .collect();
    // Per exchange and per queue figures are kept only in RabbitMQ's
    // `detailed` rates mode; in `basic` (warren's, as RabbitMQ's default)
    // these lists are empty.
    row["publishes"] = json!([]);
    row["deliveries"] = json!([]);
    Ok(Json(row))
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

/// The consumers of this node's queues (and its Stream protocol
/// subscriptions) that `caller` sees, in vhost `only` or all.
pub(super) fn consumers_where(s: &AdminState, caller: &Caller, only: Option<&str>) -> Vec<Value> {
    consumer_rows(s, Viewer::Caller(caller), only)
}

/// The consumers of queue `name` of `vhost` that `caller` sees, as the
/// queue's `home` node lists them (this one, or another member: asked).
pub(super) async fn consumers_of_queue(
    s: &AdminState,
    caller: &Caller,
    (vhost, name): (&str, &str),
    home: &str,
) -> Vec<Value> {
    let rows = match &s.cluster {
        Some(c) if home != c.me.name => {
            let answer = c.stats_of(home, &json!({"rows": "consumers"})).await;
            match answer.map(|mut a| a["rows"].take()) {
                Some(Value::Array(rows)) => rows,
                _ => Vec::new(),
            }
        }
        _ => consumers_where(s, caller, Some(vhost)),
    };
    rows.into_iter()
        .filter(|c| c["queue"]["name"] == name && c["queue"]["vhost"] == vhost)
        .collect()
}

fn consumer_rows(s: &AdminState, viewer: Viewer<'_>, only: Option<&str>) -> Vec<Value> {
    let conns: HashMap<u64, Arc<ConnectionInfo>> = s
        .broker
        .connections()
        .into_iter()
        .map(|c| (c.id, c))
        .collect();
    let origins = s.broker.remote_origins.lock().clone();
    let mut out = Vec::new();
    for v in s.broker.vhosts() {
        if only.is_some_and(|o| o != &*v.name) || !viewer.sees_vhost(s, &v.name) {
            continue;
        }
        for q in v.queues() {
            for c in q.consumers() {
                let conn = conns.get(&c.connection);
                let origin = origins.get(&c.connection).filter(|_| conn.is_none());
                let details = match (conn, origin) {
                    // Opened from another node: its channel there.
                    (None, Some(o)) => json!({
                        "number": o.channel,
                        "name": format!("{} ({})", o.connection_name, o.channel),
                        "connection_name": o.connection_name,
                        "peer_host": o.peer_host,
                        "peer_port": o.peer_port,
                        "user": o.user,
                        "node": o.node,
                    }),
                    _ => json!({
                        "number": c.channel,
                        "name": conn.map(|x| format!("{} ({})", x.name, c.channel)),
                        "connection_name": conn.map(|x| x.name.clone()),
                        "peer_host": conn.map(|x| x.peer.ip().to_string()),
                        "peer_port": conn.map(|x| x.peer.port()),
                        "user": conn.map(|x| x.user.clone()),
                        "node": &*s.broker.node,
                    }),
                };
                out.push(json!({
                    "consumer_tag": &*c.tag,
                    "queue": {"name": q.name(), "vhost": &*v.name},
                    "channel_details": details,
                    "ack_required": !c.no_ack,
                    "exclusive": c.exclusive,
                    "prefetch_count": origin.map_or(c.credit.limit(), |o| o.prefetch),
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
        if only.is_some_and(|o| o != conn.vhost) || !viewer.sees_vhost(s, &conn.vhost) {
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
    let here = consumers_where(&s, &caller, None);
    Json(Value::Array(
        cluster_rows(&s, &caller, "consumers", here).await,
    ))
}

pub async fn consumers_vhost(
    State(s): State<AdminState>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult<Json<Value>> {
    caller.require_vhost(&s.broker, &vhost)?;
    let here = consumers_where(&s, &caller, Some(&vhost));
    let rows = cluster_rows(&s, &caller, "consumers", here)
        .await
        .into_iter();
    Ok(Json(Value::Array(
        rows.filter(|r| r["queue"]["vhost"] == vhost.as_str())
            .collect(),
    )))
}
