//! `/api/vhosts[/{vhost}]`: list, show, create (with its `amq.*` exchanges)
//! or update (description, tags, default queue type, firehose tracing), delete.

use super::cluster::Homes;
use super::{AdminState, ApiError, ApiResult, Body, Caller};
use crate::broker::vhost::VHostMeta;
use crate::broker::VHost;
use crate::cluster::Command;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

/// A vhost as the API shows it: with its queues' message counts and the
/// rates of their lengths (`messages_details` ...), its channels'
/// `message_stats` and its connections' bytes (`recv_oct`, `send_oct`:
/// those that closed and the open ones; rates of the open ones), as
/// RabbitMQ's. Clustered, the whole cluster's: each queue's counts from its
/// home node (`homes`), the connections, message counts and bytes of every
/// member that answered (`theirs`: each member's name and its
/// [`answer_stats`] figures, None when it did not answer: down).
fn vhost_json(
    s: &AdminState,
    v: &VHost,
    homes: &Homes,
    theirs: &[(String, Option<Value>)],
) -> Value {
    let (mut ready, mut unacked) = (0, 0);
    let queues = v.queues();
    for q in &queues {
        let l = homes.lengths(s, q);
        ready += l.ready;
        unacked += l.unacked;
    }
    let rates = super::charts::summed_length_rates(&s.history, queues.iter().map(|q| &**q));
    let meta = v.meta();
    let mut figures = vhost_figures(s, v);
    let mut cluster_state = serde_json::Map::new();
    cluster_state.insert(super::cluster::this_node(s), json!("running"));
    for (node, answer) in theirs {
        let state = match answer {
            Some(t) => {
                super::overview::add_numbers(&mut figures, &t[&*v.name]);
                "running"
            }
            None => "nodedown",
        };
        cluster_state.insert(node.clone(), json!(state));
    }
    let mut j = json!({
        "name": &*v.name,
        "description": &meta.description,
        "tags": &meta.tags,
        "default_queue_type": meta.default_queue_type.as_deref().unwrap_or("undefined"),
        "metadata": metadata_json(&meta),
        "tracing": v.tracing(),
        "cluster_state": cluster_state,
        "messages": ready + unacked,
        "messages_ready": ready,
        "messages_unacknowledged": unacked,
    });
    if let (Value::Object(m), Value::Object(f)) = (&mut j, figures) {
        m.extend(f);
        super::charts::insert_length_details(m, rates);
    }
    j
}

/// What this node has of vhost `v`'s traffic: its connections (how many),
/// its channels' `message_stats`, its connections' bytes and their rates.
fn vhost_figures(s: &AdminState, v: &VHost) -> Value {
    let conns: Vec<_> = s
        .broker
        .connections()
        .into_iter()
        .filter(|c| c.vhost == *v.name)
        .collect();
    let (mut recv, mut send) = (
        crate::broker::Counters::get(&v.closed_octets.0),
        crate::broker::Counters::get(&v.closed_octets.1),
    );
    let (mut recv_rate, mut send_rate) = (0.0, 0.0);
    for c in &conns {
        let (r, w) = c.socket.octets();
        let rates = s.rates.connection(c.id);
        (recv, send) = (recv + r, send + w);
        (recv_rate, send_rate) = (recv_rate + rates.recv_oct, send_rate + rates.send_oct);
    }
    json!({
        "connections": conns.len(),
        "message_stats": super::metrics::full_stats(&v.counters, &s.rates.vhost(&v.name)),
        "recv_oct": recv,
        "recv_oct_details": super::details(recv_rate),
        "send_oct": send,
        "send_oct_details": super::details(send_rate),
    })
}

/// What another member asks of this node's vhosts (`{"vhosts": true}`):
/// each vhost's [`vhost_figures`], by name; None for other requests.
pub fn answer_stats(s: &AdminState, query: &Value) -> Option<Value> {
    query.get("vhosts")?;
    let all: serde_json::Map<String, Value> = s
        .broker
        .vhosts()
        .iter()
        .map(|v| (v.name.to_string(), vhost_figures(s, v)))
        .collect();
    Some(json!({ "vhosts": all }))
}

/// The vhosts `vs` as the API shows them (one request per member for
/// their figures and the queue counts).
async fn vhosts_json(s: &AdminState, vs: &[std::sync::Arc<VHost>]) -> Vec<Value> {
    let mut homes = Homes::of(s);
    let queues: Vec<_> = vs.iter().flat_map(|v| v.queues()).collect();
    homes.fetch(s, &queues).await;
    let theirs: Vec<(String, Option<Value>)> =
        super::cluster::ask_members(s, &json!({"vhosts": true}))
            .await
            .into_iter()
            .map(|(node, a)| (node, a.map(|mut a| a["vhosts"].take())))
            .collect();
    vs.iter()
        .map(|v| vhost_json(s, v, &homes, &theirs))
        .collect()
}

pub async fn list(State(s): State<AdminState>, caller: Caller) -> Json<Value> {
    let b = &s.broker;
    let visible: Vec<_> = b
        .vhosts()
        .into_iter()
        .filter(|v| caller.sees(b, &v.name))
        .collect();
    let mut out = vhosts_json(&s, &visible).await;
    super::sort_by_vhost_name(&mut out);
    Json(Value::Array(out))
}

pub async fn show(
    State(s): State<AdminState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    let b = &s.broker;
    let v = b.vhost(&name).ok_or_else(ApiError::not_found)?;
    if !caller.sees(b, &name) {
        return Err(ApiError::refused("Access refused."));
    }
    let mut one = vhosts_json(&s, &[v]).await;
    Ok(Json(one.pop().unwrap_or(Value::Null)))
}

/// A vhost's `metadata` object (in its JSON and in definitions).
pub fn metadata_json(meta: &VHostMeta) -> Value {
    let mut m = json!({"description": &meta.description, "tags": &meta.tags});
    if let Some(t) = &meta.default_queue_type {
        m["default_queue_type"] = json!(t);
    }
    m
}

/// The metadata a PUT or a definitions entry gives a vhost, as RabbitMQ
/// reads it: `description` (default empty) and `tags` (a list, or a
/// comma-separated string; default none) replace the vhost's, at the top
/// level or inside `metadata`; `default_queue_type` (`classic`, `quorum` or
/// `stream`) replaces it when given, else `current`'s stays.
pub fn meta_from(body: &Value, current: Option<VHostMeta>) -> ApiResult<VHostMeta> {
    let get = |key: &str| {
        body.get(key)
            .or_else(|| body.get("metadata").and_then(|m| m.get(key)))
            .filter(|v| !v.is_null())
    };
    let description = match get("description") {
        None => String::new(),
        Some(Value::String(d)) => d.clone(),
        Some(_) => return Err(ApiError::bad_request("description must be a string")),
    };
    let tags = match get("tags") {
        None => Vec::new(),
        Some(Value::String(t)) => t
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(String::from)
            .collect(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|t| t.as_str().map(String::from))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| ApiError::bad_request("tags must be strings"))?,
        Some(_) => return Err(ApiError::bad_request("tags must be a list or a string")),
    };
    let default_queue_type = match get("default_queue_type") {
        None => current.and_then(|m| m.default_queue_type),
        Some(Value::String(t)) if t == "undefined" => None,
        Some(Value::String(t)) if VHostMeta::QUEUE_TYPES.contains(&t.as_str()) => Some(t.clone()),
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "default_queue_type must be one of classic, quorum, stream, not {other}"
            )))
        }
    };
    Ok(VHostMeta {
        description,
        tags,
        default_queue_type,
    })
}

/// Whether a PUT turns the firehose on or off (`tracing`, a boolean or
/// "true"/"false"); None leaves it as it is.
fn tracing_from(body: &Value) -> ApiResult<Option<bool>> {
    match body.get("tracing") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(Value::String(t)) if t == "true" || t == "false" => Ok(Some(t == "true")),
        Some(_) => Err(ApiError::bad_request("tracing must be true or false")),
    }
}

pub async fn put(
    State(s): State<AdminState>,
    caller: Caller,
    Path(name): Path<String>,
    Body(body): Body,
) -> ApiResult<StatusCode> {
    caller.require_admin()?;
    if name.is_empty() {
        return Err(ApiError::bad_request("vhost name must not be empty"));
    }
    let existed = s.broker.vhost(&name).is_some();
    let meta = meta_from(&body, s.broker.vhost(&name).map(|v| v.meta()))?;
    let tracing = tracing_from(&body)?;
    let v = s.broker.add_vhost(&name);
    s.broker.set_vhost_meta(&name, meta.clone())?;
    if let Some(on) = tracing {
        v.set_tracing(on);
    }
    if !existed {
        // As RabbitMQ's management API does: the creating user gets full permissions.
        if let Ok(all) = crate::broker::auth::Permission::new(".*", ".*", ".*") {
            s.broker.auth.set_permission(&name, &caller.0.name, all);
        }
    }
    let creator = (!existed).then(|| caller.0.name.clone());
    let meta = Some(meta);
    super::cluster::replicate(&s, || {
        Some(Command::PutVhost {
            name,
            creator,
            meta,
        })
    })
    .await?;
    Ok(super::put_status(!existed))
}

pub async fn remove(
    State(s): State<AdminState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    caller.require_admin()?;
    // Its runtime parameters (shovels) go with it, as in RabbitMQ.
    if s.broker.delete_vhost(&name) {
        super::cluster::replicate(&s, || Some(Command::DeleteVhost { name })).await?;
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found())
    }
}
