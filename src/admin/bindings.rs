//! `/api/bindings[/{vhost}]`, `/api/bindings/{vhost}/e/{src}/{q|e}/{dst}[/{props}]`
//! and the per-exchange / per-queue binding listings.

use super::{json_to_table, table_to_json, text, AdminState, ApiError, ApiResult, Body, Caller};
use crate::broker::auth::Access;
use crate::broker::exchange::{Binding, Destination};
use crate::cluster::Command;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// Percent-encode everything but unreserved characters.
fn quote(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// RabbitMQ's `properties_key`: the quoted routing key (`~` when empty), plus
/// `~` and a hash of the arguments when there are any.
pub fn properties_key(b: &Binding) -> String {
    if b.arguments.is_empty() {
        if b.routing_key.is_empty() {
            "~".into()
        } else {
            quote(&b.routing_key)
        }
    } else {
        let digest = Sha256::digest(table_to_json(&b.arguments).to_string().as_bytes());
        let hash = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&digest[..9]);
        format!("{}~{hash}", quote(&b.routing_key))
    }
}

pub fn binding_json(vhost: &str, source: &str, b: &Binding) -> Value {
    let (dest, kind) = match &b.destination {
        Destination::Queue(q) => (&**q, "queue"),
        Destination::Exchange(e) => (&**e, "exchange"),
    };
    json!({
        "source": source,
        "vhost": vhost,
        "destination": dest,
        "destination_type": kind,
        "routing_key": b.routing_key,
        "arguments": table_to_json(&b.arguments),
        "properties_key": properties_key(b),
    })
}

/// Every binding visible to the caller, filtered by `keep(vhost, source, binding)`.
fn collect(
    s: &AdminState,
    caller: &Caller,
    keep: impl Fn(&str, &str, &Binding) -> bool,
) -> Vec<Value> {
    let b = &s.broker;
    let mut out = Vec::new();
    for v in b.vhosts() {
        if !caller.sees(b, &v.name) {
            continue;
        }
        let mut list = v.bindings();
        list.sort_by(|x, y| {
            (&x.0, dest_name(&x.1), &x.1.routing_key).cmp(&(
                &y.0,
                dest_name(&y.1),
                &y.1.routing_key,
            ))
        });
        for (source, binding) in list {
            if keep(&v.name, &source, &binding) {
                out.push(binding_json(&v.name, &source, &binding));
            }
        }
    }
    out
}

fn dest_name(b: &Binding) -> &str {
    match &b.destination {
        Destination::Queue(q) | Destination::Exchange(q) => q,
    }
}

fn is_queue(b: &Binding) -> bool {
    matches!(b.destination, Destination::Queue(_))
}

fn source_name(name: &str) -> &str {
    if name == "amq.default" {
        ""
    } else {
        name
    }
}

pub async fn list(State(s): State<AdminState>, caller: Caller) -> Json<Value> {
    Json(Value::Array(collect(&s, &caller, |_, _, _| true)))
}

pub async fn list_vhost(
    State(s): State<AdminState>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult<Json<Value>> {
    caller.require_vhost(&s.broker, &vhost)?;
    Ok(Json(Value::Array(collect(&s, &caller, |v, _, _| {
        v == vhost
    }))))
}

pub async fn exchange_source(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    caller.require_vhost(&s.broker, &vhost)?;
    let src = source_name(&name);
    Ok(Json(Value::Array(collect(&s, &caller, |v, source, _| {
        v == vhost && source == src
    }))))
}

pub async fn exchange_destination(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    caller.require_vhost(&s.broker, &vhost)?;
    Ok(Json(Value::Array(collect(&s, &caller, |v, _, b| {
        v == vhost && !is_queue(b) && dest_name(b) == name
    }))))
}

pub async fn queue_bindings(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    // A queue that does not exist has no bindings: an empty list, as
    // RabbitMQ answers (clients deleting a binding idempotently list first).
    caller.require_vhost(&s.broker, &vhost)?;
    Ok(Json(Value::Array(collect(&s, &caller, |v, _, b| {
        v == vhost && is_queue(b) && dest_name(b) == name
    }))))
}

fn between(
    s: &AdminState,
    caller: &Caller,
    vhost: &str,
    src: &str,
    dst: &str,
    queue: bool,
) -> ApiResult<Vec<Value>> {
    // Missing exchanges or queues have no bindings: an empty list, as
    // RabbitMQ answers.
    caller.require_vhost(&s.broker, vhost)?;
    let src = source_name(src);
    Ok(collect(s, caller, |vh, source, b| {
        vh == vhost && source == src && is_queue(b) == queue && dest_name(b) == dst
    }))
}

pub async fn between_queue(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, src, dst)): Path<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    Ok(Json(Value::Array(between(
        &s, &caller, &vhost, &src, &dst, true,
    )?)))
}

pub async fn between_exchange(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, src, dst)): Path<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    Ok(Json(Value::Array(between(
        &s, &caller, &vhost, &src, &dst, false,
    )?)))
}

/// Bind from an API / definitions body; returns the new binding's properties key.
pub fn create_from(
    s: &AdminState,
    caller: Option<&Caller>,
    vhost: &str,
    src: &str,
    dst: &str,
    queue: bool,
    body: &Value,
) -> ApiResult<(String, Option<Command>)> {
    let v = s.broker.vhost(vhost).ok_or_else(ApiError::not_found)?;
    if let Some(caller) = caller {
        let kind = if queue { "queue" } else { "exchange" };
        caller.permit(&s.broker, vhost, Access::Write, kind, dst)?;
        caller.permit(&s.broker, vhost, Access::Read, "exchange", src)?;
    }
    let routing_key = text(body, "routing_key", "")?.to_string();
    if let Some(caller) = caller {
        let (user, keys) = (&caller.0.name, [routing_key.as_str()]);
        super::topic_permissions::permit_topic(&s.broker, vhost, user, Access::Read, src, &keys)?;
    }
    let arguments = json_to_table(body.get("arguments").unwrap_or(&Value::Null))?;
    let dest = if queue {
        Destination::Queue(dst.into())
    } else {
        Destination::Exchange(dst.into())
    };
    if queue {
        super::queues::find(s, vhost, dst)?;
    }
    let binding = Binding {
        destination: dest.clone(),
        routing_key: routing_key.clone(),
        arguments: arguments.clone(),
    };
    // The admin API acts as no connection: exclusive queues are bound like any other.
    let owner = match &dest {
        Destination::Queue(q) => super::queues::find(s, vhost, q)?
            .spec
            .exclusive_owner
            .unwrap_or(0),
        Destination::Exchange(_) => 0,
    };
    v.bind(src, dest.clone(), &routing_key, &arguments, owner)?;
    // A binding of an exclusive queue is its connection's own: not replicated.
    let cmd =
        (owner == 0).then(|| Command::binding(true, vhost, src, &dest, &routing_key, &arguments));
    Ok((properties_key(&binding), cmd))
}

fn created(vhost: &str, src: &str, kind: &str, dst: &str, key: &str) -> Response {
    let location = format!(
        "/api/bindings/{}/e/{}/{kind}/{}/{key}",
        quote(vhost),
        quote(src),
        quote(dst)
    );
    (StatusCode::CREATED, [(header::LOCATION, location)]).into_response()
}

pub async fn create_queue(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, src, dst)): Path<(String, String, String)>,
    Body(body): Body,
) -> ApiResult<Response> {
    caller.require_vhost(&s.broker, &vhost)?;
    let (key, cmd) = create_from(&s, Some(&caller), &vhost, &src, &dst, true, &body)?;
    super::cluster::replicate(&s, || cmd).await?;
    Ok(created(&vhost, &src, "q", &dst, &key))
}

pub async fn create_exchange(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, src, dst)): Path<(String, String, String)>,
    Body(body): Body,
) -> ApiResult<Response> {
    caller.require_vhost(&s.broker, &vhost)?;
    let (key, cmd) = create_from(&s, Some(&caller), &vhost, &src, &dst, false, &body)?;
    super::cluster::replicate(&s, || cmd).await?;
    Ok(created(&vhost, &src, "e", &dst, &key))
}

fn find_binding(
    s: &AdminState,
    vhost: &str,
    src: &str,
    dst: &str,
    queue: bool,
    props: &str,
) -> ApiResult<Binding> {
    let v = s.broker.vhost(vhost).ok_or_else(ApiError::not_found)?;
    let src = source_name(src);
    v.bindings()
        .into_iter()
        .find(|(source, b)| {
            &**source == src
                && is_queue(b) == queue
                && dest_name(b) == dst
                && (properties_key(b) == props || quote(props) == properties_key(b))
        })
        .map(|(_, b)| b)
        .ok_or_else(ApiError::not_found)
}

pub async fn show_queue(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, src, dst, props)): Path<(String, String, String, String)>,
) -> ApiResult<Json<Value>> {
    caller.require_vhost(&s.broker, &vhost)?;
    let b = find_binding(&s, &vhost, &src, &dst, true, &props)?;
    Ok(Json(binding_json(&vhost, source_name(&src), &b)))
}

pub async fn show_exchange(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, src, dst, props)): Path<(String, String, String, String)>,
) -> ApiResult<Json<Value>> {
    caller.require_vhost(&s.broker, &vhost)?;
    let b = find_binding(&s, &vhost, &src, &dst, false, &props)?;
    Ok(Json(binding_json(&vhost, source_name(&src), &b)))
}

fn delete(
    s: &AdminState,
    vhost: &str,
    src: &str,
    dst: &str,
    queue: bool,
    props: &str,
) -> ApiResult<Option<Command>> {
    let b = find_binding(s, vhost, src, dst, queue, props)?;
    let v = s.broker.vhost(vhost).ok_or_else(ApiError::not_found)?;
    let owner = if queue {
        super::queues::find(s, vhost, dst)?
            .spec
            .exclusive_owner
            .unwrap_or(0)
    } else {
        0
    };
    let source = source_name(src);
    v.unbind(
        source,
        b.destination.clone(),
        &b.routing_key,
        &b.arguments,
        owner,
    )?;
    Ok((owner == 0).then(|| {
        Command::binding(
            false,
            vhost,
            source,
            &b.destination,
            &b.routing_key,
            &b.arguments,
        )
    }))
}

pub async fn delete_queue(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, src, dst, props)): Path<(String, String, String, String)>,
) -> ApiResult<StatusCode> {
    let cmd = delete_checked(&s, &caller, &vhost, &src, &dst, true, &props)?;
    super::cluster::replicate(&s, || cmd).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn delete_exchange(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, src, dst, props)): Path<(String, String, String, String)>,
) -> ApiResult<StatusCode> {
    let cmd = delete_checked(&s, &caller, &vhost, &src, &dst, false, &props)?;
    super::cluster::replicate(&s, || cmd).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Unbind as the caller: write on the destination, read on the source.
fn delete_checked(
    s: &AdminState,
    caller: &Caller,
    vhost: &str,
    src: &str,
    dst: &str,
    to_queue: bool,
    props: &str,
) -> ApiResult<Option<Command>> {
    caller.require_vhost(&s.broker, vhost)?;
    let kind = if to_queue { "queue" } else { "exchange" };
    caller.permit(&s.broker, vhost, Access::Write, kind, dst)?;
    caller.permit(&s.broker, vhost, Access::Read, "exchange", source_name(src))?;
    let b = find_binding(s, vhost, src, dst, to_queue, props)?;
    super::topic_permissions::permit_topic(
        &s.broker,
        vhost,
        &caller.0.name,
        Access::Read,
        source_name(src),
        &[b.routing_key.as_str()],
    )?;
    delete(s, vhost, src, dst, to_queue, props)
}
