//! `/api/global-parameters[/{name}]` (administrators: list, show, set,
//! clear) and `/api/cluster-name` (anyone may read it, administrators set
//! it), over [`crate::broker::global`]. Cluster-wide, as in RabbitMQ: a
//! change made here is committed by the metadata group
//! ([`Command::SetGlobalParameter`]) before it is answered, and every member
//! applies it.

use super::{AdminState, ApiError, ApiResult, Body, Caller};
use crate::broker::global::CLUSTER_NAME;
use crate::broker::Broker;
use crate::cluster::Command;
use crate::error::AmqpError;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};

pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/api/global-parameters", get(list))
        .route(
            "/api/global-parameters/:name",
            get(show).put(put).delete(remove),
        )
        .route("/api/cluster-name", get(cluster_name).put(set_cluster_name))
}

/// A failed store write, as the API reports it.
pub(super) fn stored(e: crate::storage::StorageError) -> ApiError {
    AmqpError::internal_error(format!("cannot store the parameter: {e}")).into()
}

/// The command that replicates the global parameter `name` as this node now
/// has it (cleared when it has none).
pub fn global_cmd(b: &Broker, name: &str) -> Option<Command> {
    Some(Command::SetGlobalParameter {
        name: name.to_string(),
        value: b.global.get(name).map(|v| v.to_string()),
    })
}

async fn list(State(s): State<AdminState>, caller: Caller) -> ApiResult<Json<Value>> {
    caller.require_admin()?;
    let rows: Vec<Value> = s
        .broker
        .global
        .list()
        .into_iter()
        .map(|(name, value)| json!({"name": name, "value": value}))
        .collect();
    Ok(Json(Value::Array(rows)))
}

async fn show(
    State(s): State<AdminState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    caller.require_admin()?;
    let value = s.broker.global.get(&name).ok_or_else(ApiError::not_found)?;
    Ok(Json(json!({"name": name, "value": value})))
}

/// `PUT` with `{"value": ...}` (a `name` in the body must be the path's).
async fn put(
    State(s): State<AdminState>,
    caller: Caller,
    Path(name): Path<String>,
    Body(body): Body,
) -> ApiResult<StatusCode> {
    caller.require_admin()?;
    if body
        .get("name")
        .and_then(Value::as_str)
        .is_some_and(|n| n != name)
    {
        return Err(ApiError::bad_request(
            "name in the body differs from the path",
        ));
    }
    let value = match body.get("value") {
        None | Some(Value::Null) => return Err(ApiError::bad_request("value must be set")),
        Some(v) => v.clone(),
    };
    if name == CLUSTER_NAME && !value.is_string() {
        return Err(ApiError::bad_request("cluster_name must be a string"));
    }
    let created = s.broker.global.put(&name, value).map_err(stored)?;
    super::cluster::replicate(&s, || global_cmd(&s.broker, &name)).await?;
    Ok(super::put_status(created))
}

async fn remove(
    State(s): State<AdminState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    caller.require_admin()?;
    if !s.broker.global.delete(&name).map_err(stored)? {
        return Err(ApiError::not_found());
    }
    super::cluster::replicate(&s, || global_cmd(&s.broker, &name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn cluster_name(State(s): State<AdminState>, _caller: Caller) -> Json<Value> {
    Json(json!({"name": s.broker.cluster_name()}))
}

/// `PUT /api/cluster-name` with `{"name": "..."}`.
async fn set_cluster_name(
    State(s): State<AdminState>,
    caller: Caller,
    Body(body): Body,
) -> ApiResult<StatusCode> {
    caller.require_admin()?;
    let name = body
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::bad_request("name must be a non-empty string"))?;
    s.broker
        .global
        .put(CLUSTER_NAME, Value::from(name))
        .map_err(stored)?;
    super::cluster::replicate(&s, || global_cmd(&s.broker, CLUSTER_NAME)).await?;
    Ok(StatusCode::NO_CONTENT)
}
