//! `/api/queues[/{vhost}[/{name}]]` (list, show, declare, delete),
//! `/api/queues/{vhost}/{name}/contents` (purge) and `/get` (fetch messages).

use super::cluster::Homes;
use super::metrics::queue_stats;
use super::{
    flag, json_to_table, table_to_json, text, AdminState, ApiError, ApiResult, Body, Caller,
};
use crate::broker::auth::Access;
use crate::broker::queue::{Queue, QueueType};
use crate::broker::vhost::QueueDeclare;
use crate::cluster::Command;
use crate::wire::BasicProperties;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use base64::Engine;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::sync::Arc;

/// Queue `q`'s counters on this node. A quorum queue this node does not
/// serve (a follower, or the recorded leader between two leaders) shows
/// its group's committed messages as this node's member applied them, all
/// ready (its local queue holds nothing then; it showed 0 messages during a
/// failover).
pub fn local_stats(s: &AdminState, q: &Queue, now: u64) -> crate::broker::queue::QueueStats {
    let st = q.stats(now);
    let committed = s
        .cluster
        .as_ref()
        .filter(|_| q.queue_type() == QueueType::Quorum)
        .and_then(|c| c.quorum_lengths(&q.spec.vhost, q.name()));
    match committed {
        Some((n, bytes)) => crate::broker::queue::QueueStats {
            ready: n,
            unacked: 0,
            ready_bytes: bytes as usize,
            unacked_bytes: 0,
            ready_ram: n,
            ready_ram_bytes: bytes as usize,
            ..st
        },
        None => st,
    }
}

/// A queue's counts (messages, bytes, consumers, message stats) as this node
/// has them: what a queue's home node answers other members. A stream's
/// consumers are its AMQP consumers and its Stream protocol subscriptions.
///
/// RabbitMQ's classic-queue figures besides: `messages_persistent` /
/// `message_bytes_persistent` (messages held durably: persistent ones on a
/// durable queue; on a quorum queue every message, as RabbitMQ's quorum
/// queues report), `head_message_timestamp` (the `timestamp` property of the
/// ready head or the oldest unacked message, the older; null if neither has
/// one or the head is paged out), `idle_since` (from a second after the last
/// activity, as RabbitMQ 3.10 shows it once the queue process hibernates;
/// absent while active), `consumer_utilisation` / `consumer_capacity`
/// (RabbitMQ's moving average of the time the queue could deliver at once,
/// see [`crate::broker::queue::ConsumerUse`]; 0 without consumers),
/// `memory` (an estimate: [`crate::broker::queue::queue_memory`]) and the
/// rates of the three lengths (`messages_details` ...) from the history
/// samples. Quorum queues have no `head_message_timestamp` or `idle_since`
/// (nor have RabbitMQ's); streams have neither, nor the persistent counts.
pub fn queue_counts(s: &AdminState, q: &Queue) -> Map<String, Value> {
    let now = crate::clock::now_ms();
    let mut st = local_stats(s, q, now);
    let vhost = &*q.spec.vhost;
    if q.stream().is_some() {
        st.consumers += super::stream::subscriptions_to(&s.broker, vhost, q.name());
    }
    let counts = json!({
        "messages": st.ready + st.unacked,
        "messages_ready": st.ready,
        "messages_unacknowledged": st.unacked,
        "messages_unacknowledged_ram": st.unacked,
        "message_bytes_ready": st.ready_bytes,
        "message_bytes_unacknowledged": st.unacked_bytes,
        "message_bytes": st.ready_bytes + st.unacked_bytes,
        "messages_ram": st.ready_ram + st.unacked,
        "messages_ready_ram": st.ready_ram,
        "messages_paged_out": st.ready - st.ready_ram,
        "message_bytes_ram": st.ready_ram_bytes + st.unacked_bytes,
        "message_bytes_paged_out": st.ready_bytes - st.ready_ram_bytes,
        "consumers": st.consumers,
        "message_stats": queue_stats(&q.counters, &s.rates.queue(vhost, q.name())),
    });
    let mut m = match counts {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    // The consumer holding the queue exclusively, and the active one of a
    // single-active-consumer queue (the longest-standing: the one served).
    let consumers = q.consumers();
    let exclusive = consumers.iter().find(|c| c.exclusive).map(|c| &*c.tag);
    let active = consumers
        .first()
        .filter(|_| q.stream().is_none() && q.args().single_active_consumer)
        .map(|c| &*c.tag);
    m.insert("exclusive_consumer_tag".into(), json!(exclusive));
    m.insert("single_active_consumer_tag".into(), json!(active));
    let key = (vhost.to_string(), q.name().to_string());
    super::charts::insert_length_details(&mut m, super::charts::length_rates(&s.history, &key));
    let utilisation = match st.consumer_utilisation {
        Some(u) => json!(u),
        None => json!(0),
    };
    m.insert("consumer_utilisation".into(), utilisation.clone());
    m.insert("consumer_capacity".into(), utilisation);
    m.insert("memory".into(), json!(st.memory));
    let kind = q.queue_type();
    match kind {
        QueueType::Classic => {
            m.insert("messages_persistent".into(), json!(st.persistent));
            m.insert(
                "message_bytes_persistent".into(),
                json!(st.persistent_bytes),
            );
            m.insert("head_message_timestamp".into(), json!(st.head_timestamp));
            if let Some(at) = st.idle_since {
                m.insert("idle_since".into(), json!(crate::clock::utc_rfc3339(at)));
            }
        }
        QueueType::Quorum => {
            m.insert("messages_persistent".into(), json!(st.ready + st.unacked));
            m.insert(
                "message_bytes_persistent".into(),
                json!(st.ready_bytes + st.unacked_bytes),
            );
        }
        QueueType::Stream => {
            // Its readers (AMQP consumers and Stream protocol
            // subscriptions) on its node, which holds its one copy.
            m.insert(
                "readers".into(),
                json!({ super::cluster::this_node(s): st.consumers }),
            );
        }
    }
    m
}

/// A queue as the API shows it; `homes` (taken once per request) gives its
/// `node` and, when its home is another member that answered, its counts.
pub fn queue_json(s: &AdminState, homes: &Homes, q: &Queue) -> Value {
    let vhost = &*q.spec.vhost;
    let node = homes.node(vhost, q.name());
    let (policy, operator) = s
        .broker
        .vhost(vhost)
        .map(|v| crate::broker::policy::queue_policies(&v, q.name(), q.queue_type()))
        .unwrap_or_default();
    let effective = crate::broker::policy::merged_definition(policy.as_ref(), operator.as_ref());
    let kind = q.queue_type();
    let mut v = json!({
        "name": q.name(),
        "vhost": vhost,
        "durable": q.spec.durable,
        "auto_delete": q.spec.auto_delete,
        "exclusive": q.spec.exclusive_owner.is_some(),
        "arguments": table_to_json(&q.spec.arguments),
        "type": kind.as_str(),
        "node": node,
        "state": "running",
        "policy": policy.as_ref().map(|p| p.name.clone()),
        "operator_policy": operator.as_ref().map(|p| p.name.clone()),
        "effective_policy_definition": effective.map(Value::Object).unwrap_or(json!({})),
    });
    if let Value::Object(m) = &mut v {
        match homes.counts(vhost, q.name()).and_then(Value::as_object) {
            Some(remote) => m.extend(remote.clone()),
            None => m.extend(queue_counts(s, q)),
        }
    }
    if kind == QueueType::Quorum {
        // RabbitMQ's quorum-queue fields. Clustered: the queue's Raft group
        // (its members, its leader as last announced, the members this node
        // sees running); alone, the one replica on this node is all three.
        let args = q.args();
        let group = s
            .cluster
            .as_ref()
            .and_then(|c| Some((c.quorum_record(vhost, q.name())?, c.members())));
        let (members, leader, online) = match group {
            Some((rec, nodes)) => {
                let online: Vec<&String> = rec
                    .members
                    .iter()
                    .filter(|m| nodes.iter().any(|n| &n.name == *m && n.running))
                    .collect();
                (json!(rec.members), json!(rec.leader), json!(online))
            }
            None => (json!([node]), json!(node), json!([node])),
        };
        let voters = s
            .cluster
            .as_ref()
            .and_then(|c| c.quorum_voters(vhost, q.name()));
        if let Value::Object(m) = &mut v {
            if let Some(voters) = voters {
                // The group's voters as this node's member sees them (a
                // membership change shows here once the group made it).
                m.insert("raft_voters".into(), json!(voters));
            }
            let replicas = members.as_array().map_or(1, Vec::len);
            m.insert("members".into(), members);
            m.insert("leader".into(), leader);
            m.insert("online".into(), online);
            m.insert("replicas".into(), json!(replicas));
            m.insert(
                "delivery_limit".into(),
                args.delivery_limit.map_or(json!("unlimited"), |l| json!(l)),
            );
        }
    }
    if let (Some(log), Value::Object(m)) = (q.stream(), &mut v) {
        // RabbitMQ's stream fields (one replica on the queue's node), with
        // the log's offsets and segments.
        let st = log.stats();
        m.insert("members".into(), json!([node]));
        m.insert("leader".into(), json!(node));
        m.insert("online".into(), json!([node]));
        m.insert("segments".into(), json!(st.segments));
        m.insert("first_offset".into(), json!(st.first_offset));
        m.insert("last_offset".into(), json!(st.last_offset));
        m.insert("committed_offset".into(), json!(st.committed_offset));
        m.insert("first_timestamp".into(), json!(st.first_timestamp));
        m.insert("chunks".into(), json!(st.chunks));
    }
    v
}

/// The visible queues (of `only` if given) whose names pass `keep`, in vhost / name
/// order, and how many visible queues there are in all.
fn collect(
    s: &AdminState,
    caller: &Caller,
    only: Option<&str>,
    keep: &dyn Fn(&str) -> bool,
) -> (Vec<Arc<Queue>>, usize) {
    let b = &s.broker;
    let mut out = Vec::new();
    let mut total = 0;
    for v in b.vhosts() {
        if only.is_some_and(|o| o != &*v.name) || !caller.sees(b, &v.name) {
            continue;
        }
        for q in v.queues() {
            total += 1;
            if keep(q.name()) {
                out.push(q);
            }
        }
    }
    out.sort_by(|a, b| (&*a.spec.vhost, a.name()).cmp(&(&*b.spec.vhost, b.name())));
    (out, total)
}

/// The value at a dotted path (`message_stats.publish_details.rate`).
fn at_path<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, k| v.get(k))
}

fn cmp_values(a: Option<&Value>, b: Option<&Value>) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    match (a, b) {
        (Some(Value::Number(x)), Some(Value::Number(y))) => x
            .as_f64()
            .partial_cmp(&y.as_f64())
            .unwrap_or(Ordering::Equal),
        (Some(Value::String(x)), Some(Value::String(y))) => x.cmp(y),
        (Some(Value::Null) | None, Some(Value::Null) | None) => Ordering::Equal,
        (Some(Value::Null) | None, _) => Ordering::Less,
        (_, Some(Value::Null) | None) => Ordering::Greater,
        (Some(x), Some(y)) => x.to_string().cmp(&y.to_string()),
    }
}

fn number_param(params: &HashMap<String, String>, key: &str, default: usize) -> ApiResult<usize> {
    match params.get(key) {
        None => Ok(default),
        Some(v) => v
            .parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| ApiError::bad_request(format!("{key} must be a positive integer"))),
    }
}

/// The name filter of a listing (`name`: a case-insensitive substring, or a
/// regex with `use_regex=true`).
fn name_filter(params: &HashMap<String, String>) -> ApiResult<impl Fn(&str) -> bool> {
    let name = params.get("name").map(String::as_str).unwrap_or("");
    let regex = if params.get("use_regex").is_some_and(|x| x == "true") && !name.is_empty() {
        Some(
            regex::Regex::new(name)
                .map_err(|e| ApiError::bad_request(format!("invalid regex: {e}")))?,
        )
    } else {
        None
    };
    let needle = name.to_lowercase();
    Ok(move |n: &str| match &regex {
        Some(r) => r.is_match(n),
        None => needle.is_empty() || n.to_lowercase().contains(&needle),
    })
}

/// The page `page` of `page_size` (max 500) of `filtered` items, as its
/// bounds and the page count; 400 past the last page.
fn page_bounds(
    params: &HashMap<String, String>,
    filtered: usize,
) -> ApiResult<(usize, usize, usize, usize)> {
    let page = number_param(params, "page", 1)?;
    let page_size = number_param(params, "page_size", 100)?;
    if page_size > 500 {
        return Err(ApiError::bad_request("page_size must not exceed 500"));
    }
    let page_count = filtered.div_ceil(page_size).max(1);
    if page > page_count {
        return Err(ApiError::bad_request(format!(
            "page out of range: {page} of {page_count}"
        )));
    }
    Ok((page, page_size, page_count, (page - 1) * page_size))
}

/// One page of a listing: its `items` (page `page` of `page_count`, of
/// `page_size`), with how many matched the filter and how many there are.
fn page_json(
    items: Vec<Value>,
    (page, page_size, page_count): (usize, usize, usize),
    filtered: usize,
    total: usize,
) -> Value {
    json!({
        "filtered_count": filtered,
        "item_count": items.len(),
        "items": items,
        "page": page,
        "page_count": page_count,
        "page_size": page_size,
        "total_count": total,
    })
}

/// A listing other than queues' (rendered already, `items`) filtered by
/// `name`, sorted by `sort` / `sort_reverse`, and paginated when `page` is
/// given, as [`listing`] does for queues.
pub(super) fn paged(items: Vec<Value>, params: &HashMap<String, String>) -> ApiResult<Value> {
    let total = items.len();
    let keep = name_filter(params)?;
    let mut items: Vec<Value> = items
        .into_iter()
        .filter(|v| keep(v["name"].as_str().unwrap_or("")))
        .collect();
    if let Some(sort) = params.get("sort").filter(|s| !s.is_empty()) {
        items.sort_by(|a, b| cmp_values(at_path(a, sort), at_path(b, sort)));
    }
    if params.get("sort_reverse").is_some_and(|x| x == "true") {
        items.reverse();
    }
    if !params.contains_key("page") {
        return Ok(Value::Array(items));
    }
    let filtered = items.len();
    let (page, page_size, page_count, start) = page_bounds(params, filtered)?;
    let items: Vec<Value> = items.into_iter().skip(start).take(page_size).collect();
    Ok(page_json(
        items,
        (page, page_size, page_count),
        filtered,
        total,
    ))
}

/// A listing, paginated as RabbitMQ's management API does when `page` is given
/// (`page`, `page_size` (max 500), `name` (substring, or a regex with
/// `use_regex=true`), `sort` (a dotted field path), `sort_reverse`); a plain
/// array otherwise.
async fn listing(
    s: &AdminState,
    caller: &Caller,
    only: Option<&str>,
    params: &HashMap<String, String>,
) -> ApiResult<Value> {
    let keep = name_filter(params)?;
    let (mut queues, total) = collect(s, caller, only, &keep);
    let sort = params.get("sort").map(String::as_str).unwrap_or("");
    let reverse = params.get("sort_reverse").is_some_and(|x| x == "true");
    // Sorting by name or vhost needs no JSON, so a page of 10,000 queues only
    // renders the queues on that page.
    let by_name = matches!(sort, "" | "name" | "vhost");
    if sort == "name" {
        queues.sort_by(|a, b| a.name().cmp(b.name()));
    }
    if by_name && reverse {
        queues.reverse();
    }
    let mut homes = Homes::of(s);
    let render = |homes: &Homes, qs: &[Arc<Queue>]| -> Vec<Value> {
        qs.iter().map(|q| queue_json(s, homes, q)).collect()
    };
    let mut items = if by_name && params.contains_key("page") {
        Vec::new()
    } else {
        homes.fetch(s, &queues).await;
        render(&homes, &queues)
    };
    if !by_name {
        items.sort_by(|a, b| cmp_values(at_path(a, sort), at_path(b, sort)));
        if reverse {
            items.reverse();
        }
    }
    if !params.contains_key("page") {
        return Ok(Value::Array(items));
    }
    let filtered = queues.len();
    let (page, page_size, page_count, start) = page_bounds(params, filtered)?;
    let items: Vec<Value> = if by_name {
        let page = &queues[start.min(filtered)..(start + page_size).min(filtered)];
        homes.fetch(s, page).await;
        render(&homes, page)
    } else {
        items.into_iter().skip(start).take(page_size).collect()
    };
    Ok(page_json(
        items,
        (page, page_size, page_count),
        filtered,
        total,
    ))
}

pub async fn list(
    State(s): State<AdminState>,
    caller: Caller,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    Ok(Json(listing(&s, &caller, None, &params).await?))
}

pub async fn list_vhost(
    State(s): State<AdminState>,
    caller: Caller,
    Path(vhost): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    caller.require_vhost(&s.broker, &vhost)?;
    Ok(Json(listing(&s, &caller, Some(&vhost), &params).await?))
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
    let mut homes = Homes::of(&s);
    homes.fetch(&s, std::slice::from_ref(&q)).await;
    let mut v = queue_json(&s, &homes, &q);
    // As RabbitMQ's single-queue view: its consumers, as /api/consumers
    // lists them (asked of its home node when that is another member).
    let home = homes.node(&vhost, &name).to_string();
    let consumers =
        super::connections::consumers_of_queue(&s, &caller, (&vhost, &name), &home).await;
    if let Value::Object(m) = &mut v {
        m.insert("consumer_details".into(), Value::Array(consumers));
        // Per channel and per exchange figures: RabbitMQ keeps them only in
        // its `detailed` rates mode; in `basic` (warren's) they are empty.
        m.insert("incoming".into(), json!([]));
        m.insert("deliveries".into(), json!([]));
    }
    Ok(Json(v))
}

/// Declare a queue from an API / definitions body: whether it is new, and
/// the command that replicates the declaration (this node is its home).
pub fn declare_from(
    s: &AdminState,
    vhost: &str,
    name: &str,
    body: &Value,
) -> ApiResult<(bool, Option<Command>)> {
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
    let mut d = QueueDeclare {
        name: name.to_string(),
        passive: false,
        durable: flag(body, "durable", true)?,
        exclusive: false,
        auto_delete: flag(body, "auto_delete", false)?,
        arguments: json_to_table(body.get("arguments").unwrap_or(&Value::Null))?,
    };
    v.augment_declare(&d.name, d.durable, false, d.auto_delete, &mut d.arguments);
    v.declare_queue(&d, 0, crate::clock::now_ms())?;
    let node = super::cluster::this_node(s);
    Ok((!existed, Command::queue_declared(vhost, &d, &node)))
}

pub async fn put(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    Body(body): Body,
) -> ApiResult<StatusCode> {
    caller.require_vhost(&s.broker, &vhost)?;
    caller.permit(&s.broker, &vhost, Access::Configure, "queue", &name)?;
    let (created, cmd) = declare_from(&s, &vhost, &name, &body)?;
    super::cluster::replicate(&s, || cmd).await?;
    Ok(super::put_status(created))
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
    let asked = |k: &str| params.get(k).is_some_and(|x| x == "true");
    let now = crate::clock::now_ms();
    if let Some(e) = q.delete_refusal(asked("if-unused"), asked("if-empty"), now) {
        return Err(ApiError::bad_request(e.text));
    }
    if let Some(v) = s.broker.vhost(&vhost) {
        v.remove_queue(&q)?;
    }
    // An exclusive queue (its connection's own) is not replicated.
    let replicated = q.spec.exclusive_owner.is_none();
    let cmd = replicated.then_some(Command::DeleteQueue { vhost, name });
    super::cluster::replicate(&s, || cmd).await?;
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
    if q.stream().is_some() {
        return Err(ApiError::bad_request(format!(
            "queue.purge not supported by stream queues queue '{name}' in vhost '{vhost}'"
        )));
    }
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
    let v = s.broker.vhost(&vhost).ok_or_else(ApiError::not_found)?;
    caller.permit(&s.broker, &vhost, Access::Read, "queue", &name)?;
    // RabbitMQ gets through an AMQP channel: a stream refuses basic.get.
    if q.queue_type() == crate::broker::queue::QueueType::Stream {
        return Err(ApiError::bad_request(format!(
            "{} {}",
            crate::wire::reply_code::NOT_IMPLEMENTED,
            crate::amqp::basic::stream_get_refused(&name, &vhost)
        )));
    }
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
    // A replicated queue hands out only what its committed delivery horizon
    // covers (one asked for covers the next 1024 messages).
    if q.get_waits_for().is_some() {
        let within = s
            .cluster
            .as_ref()
            .map_or(std::time::Duration::from_secs(5), |c| c.commit_timeout());
        crate::server::horizon_for_get(&q, within).await;
    }
    let mut entries = Vec::new();
    let mut out = Vec::new();
    while (entries.len() as u64) < count {
        let Some((entry, remaining)) = q.get(false, crate::clock::now_ms()) else {
            break;
        };
        let m = &entry.message;
        if v.tracing() {
            let tap = crate::broker::firehose::Tap::http_api(&s.broker.node, &caller.0.name);
            let now = crate::clock::now_ms();
            crate::broker::firehose::delivered(&v, &name, m, entry.redelivered, &tap, now);
        }
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
            "properties": properties_json(&entry.delivery_properties()),
            "payload": text_payload,
            "payload_encoding": enc,
        }));
        entries.push(entry);
    }
    let redelivered = entries.iter().filter(|e| e.redelivered).count() as u64;
    s.broker.count(&v, |c| {
        crate::broker::Counters::add(&c.delivered, entries.len() as u64);
        crate::broker::Counters::add(&c.got, entries.len() as u64);
        crate::broker::Counters::add(&c.redelivered, redelivered);
        if !requeue && !reject {
            crate::broker::Counters::add(&c.acked, entries.len() as u64);
        }
    });
    if requeue {
        q.requeue(entries, true, true, crate::clock::now_ms());
    } else if reject {
        q.reject(entries, crate::clock::now_ms());
    } else {
        q.ack(&entries, crate::clock::now_ms());
    }
    Ok(Json(Value::Array(out)))
}
