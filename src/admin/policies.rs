//! `/api/policies[/{vhost}[/{name}]]`: list, show, set and clear policies.

use super::{AdminState, ApiError, ApiResult, Body, Caller};
use crate::broker::policy::{ApplyTo, Policy};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

pub fn policy_json(p: &Policy) -> Value {
    json!({
        "vhost": p.vhost,
        "name": p.name,
        "pattern": p.pattern,
        "apply-to": p.apply_to.as_str(),
        "priority": p.priority,
        "definition": Value::Object(p.definition.clone()),
    })
}

fn collect(s: &AdminState, caller: &Caller, only: Option<&str>) -> Vec<Value> {
    let mut out = Vec::new();
    for v in s.broker.vhosts() {
        if only.is_some_and(|o| o != &*v.name) || !caller.sees(&s.broker, &v.name) {
            continue;
        }
        out.extend(v.policies.list().iter().map(policy_json));
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

pub async fn show(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    caller.require_vhost(&s.broker, &vhost)?;
    let v = s.broker.vhost(&vhost).ok_or_else(ApiError::not_found)?;
    let p = v
        .policies
        .get(&vhost, &name)
        .ok_or_else(ApiError::not_found)?;
    Ok(Json(policy_json(&p)))
}

/// Set a policy from an API / definitions body.
pub fn put_from(s: &AdminState, vhost: &str, name: &str, body: &Value) -> ApiResult<bool> {
    let v = s.broker.vhost(vhost).ok_or_else(ApiError::not_found)?;
    let pattern = body
        .get("pattern")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_request("pattern must be set"))?;
    let apply_to = match body.get("apply-to") {
        None | Some(Value::Null) => ApplyTo::All,
        Some(a) => a
            .as_str()
            .and_then(ApplyTo::parse)
            .ok_or_else(|| ApiError::bad_request("apply-to must be queues, exchanges or all"))?,
    };
    let priority = match body.get("priority") {
        None | Some(Value::Null) => 0,
        Some(p) => p
            .as_i64()
            .ok_or_else(|| ApiError::bad_request("priority must be an integer"))?,
    };
    let definition = body
        .get("definition")
        .and_then(Value::as_object)
        .cloned()
        .ok_or_else(|| ApiError::bad_request("definition must be an object"))?;
    let p = Policy::new(vhost, name, pattern, apply_to, priority, definition)
        .map_err(ApiError::bad_request)?;
    Ok(v.put_policy(p, crate::clock::now_ms())?)
}

pub async fn put(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    Body(body): Body,
) -> ApiResult<StatusCode> {
    if !caller.is_policymaker() {
        return Err(ApiError::forbidden("Not policymaker user"));
    }
    caller.require_vhost(&s.broker, &vhost)?;
    Ok(super::put_status(put_from(&s, &vhost, &name, &body)?))
}

pub async fn remove(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    if !caller.is_policymaker() {
        return Err(ApiError::forbidden("Not policymaker user"));
    }
    caller.require_vhost(&s.broker, &vhost)?;
    let v = s.broker.vhost(&vhost).ok_or_else(ApiError::not_found)?;
    if v.delete_policy(&name, crate::clock::now_ms())? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found())
    }
}
