//! `/api/vhosts[/{vhost}]`: list, show, create (with its `amq.*` exchanges), delete.

use super::{AdminState, ApiError, ApiResult, Body, Caller};
use crate::broker::{Broker, VHost};
use crate::cluster::Command;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

fn vhost_json(b: &Broker, v: &VHost) -> Value {
    let (mut ready, mut unacked) = (0, 0);
    for q in v.queues() {
        let s = q.stats(crate::clock::now_ms());
        ready += s.ready;
        unacked += s.unacked;
    }
    json!({
        "name": &*v.name,
        "description": "",
        "tags": [],
        "tracing": false,
        "messages": ready + unacked,
        "messages_ready": ready,
        "messages_unacknowledged": unacked,
        "connections": b.connections().iter().filter(|c| c.vhost == *v.name).count(),
    })
}

pub async fn list(State(s): State<AdminState>, caller: Caller) -> Json<Value> {
    let b = &s.broker;
    let mut out: Vec<Value> = b
        .vhosts()
        .iter()
        .filter(|v| caller.sees(b, &v.name))
        .map(|v| vhost_json(b, v))
        .collect();
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
        return Err(ApiError::forbidden("Access refused."));
    }
    Ok(Json(vhost_json(b, &v)))
}

pub async fn put(
    State(s): State<AdminState>,
    caller: Caller,
    Path(name): Path<String>,
    _body: Body,
) -> ApiResult<StatusCode> {
    caller.require_admin()?;
    if name.is_empty() {
        return Err(ApiError::bad_request("vhost name must not be empty"));
    }
    let existed = s.broker.vhost(&name).is_some();
    s.broker.add_vhost(&name);
    if !existed {
        // As RabbitMQ's management API does: the creating user gets full permissions.
        if let Ok(all) = crate::broker::auth::Permission::new(".*", ".*", ".*") {
            s.broker.auth.set_permission(&name, &caller.0.name, all);
        }
    }
    let creator = (!existed).then(|| caller.0.name.clone());
    super::cluster::replicate(&s, || Some(Command::PutVhost { name, creator })).await?;
    Ok(super::put_status(!existed))
}

pub async fn remove(
    State(s): State<AdminState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    caller.require_admin()?;
    if s.broker.delete_vhost(&name) {
        // Its runtime parameters go with it, as in RabbitMQ.
        s.shovels.delete_vhost(&name);
        super::cluster::replicate(&s, || Some(Command::DeleteVhost { name })).await?;
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found())
    }
}
