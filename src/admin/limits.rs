//! `/api/vhost-limits[/{vhost}[/{name}]]` and `/api/user-limits[/{user}[/{name}]]`:
//! list, set (`PUT {"value": N}`) and clear per-vhost `max-connections` /
//! `max-queues` and per-user `max-connections` / `max-channels`, as RabbitMQ's
//! management API does. Also the definitions' shapes of both.

use super::{AdminState, ApiError, ApiResult, Body, Caller};
use crate::broker::limits::{self, LimitMap, USER_LIMITS, VHOST_LIMITS};
use crate::broker::Broker;
use crate::cluster::Command;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

fn limits_json(map: &LimitMap) -> Value {
    Value::Object(map.iter().map(|(k, v)| (k.clone(), json!(v))).collect())
}

/// `[{"vhost": ..., "value": {...}}]` for the vhosts `keep` picks that have limits.
fn vhost_rows(b: &Broker, keep: impl Fn(&str) -> bool) -> Vec<Value> {
    let mut rows: Vec<Value> = b
        .vhosts()
        .iter()
        .filter(|v| keep(&v.name))
        .filter_map(|v| {
            let map = v.limit_values.all();
            (!map.is_empty()).then(|| json!({"vhost": &*v.name, "value": limits_json(&map)}))
        })
        .collect();
    super::sort_by_vhost_name(&mut rows);
    rows
}

/// The limits of the vhosts `keep` takes as definitions' `parameters`
/// entries (component `vhost-limits`).
pub fn vhost_limit_parameters(b: &Broker, keep: impl Fn(&str) -> bool) -> Vec<Value> {
    vhost_rows(b, keep)
        .into_iter()
        .map(|row| {
            json!({
                "value": row["value"],
                "vhost": row["vhost"],
                "component": "vhost-limits",
                "name": "limits",
            })
        })
        .collect()
}

/// Import one definitions `parameters` entry if it is a vhost's limits,
/// replacing that vhost's limits as `rabbitmqctl set_vhost_limits` does; the
/// command that replicates them (None: not a vhost-limits entry).
pub fn import_parameter(b: &Broker, p: &Value) -> ApiResult<Option<Command>> {
    if p.get("component").and_then(Value::as_str) != Some("vhost-limits") {
        return Ok(None);
    }
    let vhost = p
        .get("vhost")
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_request("vhost missing in vhost-limits parameter"))?;
    let map = limits::validate_all(VHOST_LIMITS, p.get("value").unwrap_or(&Value::Null))
        .map_err(ApiError::bad_request)?;
    b.change_vhost_limits(vhost, |m| *m = map)?
        .ok_or_else(|| ApiError::bad_request(format!("vhost_not_found: {vhost}")))?;
    Ok(vhost_limits_cmd(b, vhost))
}

/// The command that replicates `vhost`'s limits as this node now has them.
pub fn vhost_limits_cmd(b: &Broker, vhost: &str) -> Option<Command> {
    b.vhost(vhost).map(|v| Command::SetVhostLimits {
        vhost: vhost.to_string(),
        limits: v.limit_values.all(),
    })
}

/// The command that replicates `user`'s limits as this node now has them.
pub fn user_limits_cmd(b: &Broker, user: &str) -> Option<Command> {
    b.auth.user(user).map(|_| Command::SetUserLimits {
        user: user.to_string(),
        limits: b.auth.user_limits(user),
    })
}

pub async fn list_vhosts(State(s): State<AdminState>, caller: Caller) -> Json<Value> {
    let b = &s.broker;
    Json(Value::Array(vhost_rows(b, |v| caller.sees(b, v))))
}

pub async fn show_vhost(
    State(s): State<AdminState>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult<Json<Value>> {
    caller.require_vhost(&s.broker, &vhost)?;
    Ok(Json(Value::Array(vhost_rows(&s.broker, |v| v == vhost))))
}

/// The `value` of a limit PUT body, checked.
fn body_value(known: &[&str], name: &str, body: &Value) -> ApiResult<i64> {
    let value = body
        .get("value")
        .ok_or_else(|| ApiError::bad_request("value must be set"))?;
    limits::validate(known, name, value).map_err(ApiError::bad_request)
}

pub async fn put_vhost(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    Body(body): Body,
) -> ApiResult<StatusCode> {
    caller.require_admin()?;
    let value = body_value(VHOST_LIMITS, &name, &body)?;
    s.broker
        .change_vhost_limits(&vhost, |m| {
            m.insert(name.clone(), value);
        })?
        .ok_or_else(ApiError::not_found)?;
    super::cluster::replicate(&s, || vhost_limits_cmd(&s.broker, &vhost)).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn delete_vhost(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    caller.require_admin()?;
    s.broker
        .change_vhost_limits(&vhost, |m| {
            m.remove(&name);
        })?
        .ok_or_else(ApiError::not_found)?;
    super::cluster::replicate(&s, || vhost_limits_cmd(&s.broker, &vhost)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The `vhost-limits` runtime parameters `caller` sees (in vhost `only`),
/// as `/api/parameters` lists them.
pub fn visible_limit_parameters(b: &Broker, caller: &Caller, only: Option<&str>) -> Vec<Value> {
    vhost_limit_parameters(b, |v| only.is_none_or(|o| o == v) && caller.sees(b, v))
}

/// `GET /api/parameters/vhost-limits`.
pub async fn parameters(State(s): State<AdminState>, caller: Caller) -> Json<Value> {
    Json(Value::Array(visible_limit_parameters(
        &s.broker, &caller, None,
    )))
}

/// `GET /api/parameters/vhost-limits/{vhost}`.
pub async fn parameters_vhost(
    State(s): State<AdminState>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult<Json<Value>> {
    caller.require_vhost(&s.broker, &vhost)?;
    let rows = visible_limit_parameters(&s.broker, &caller, Some(&vhost));
    Ok(Json(Value::Array(rows)))
}

/// `GET /api/parameters/vhost-limits/{vhost}/limits` (the one name this
/// component has).
pub async fn parameter(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    caller.require_vhost(&s.broker, &vhost)?;
    visible_limit_parameters(&s.broker, &caller, Some(&vhost))
        .into_iter()
        .find(|p| p["name"] == name.as_str())
        .map(Json)
        .ok_or_else(ApiError::not_found)
}

/// `PUT /api/parameters/vhost-limits/{vhost}/limits` with `{"value": {...}}`:
/// the vhost's limits replaced, as a definitions entry replaces them.
pub async fn put_parameter(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    Body(body): Body,
) -> ApiResult<StatusCode> {
    caller.require_admin()?;
    if name != "limits" {
        return Err(ApiError::bad_request(format!(
            "vhost-limits parameters are named 'limits', not '{name}'"
        )));
    }
    let existed = s
        .broker
        .vhost(&vhost)
        .is_some_and(|v| !v.limit_values.all().is_empty());
    let entry = json!({"component": "vhost-limits", "vhost": vhost, "value": body.get("value")});
    import_parameter(&s.broker, &entry)?;
    super::cluster::replicate(&s, || vhost_limits_cmd(&s.broker, &vhost)).await?;
    Ok(super::put_status(!existed))
}

/// `DELETE /api/parameters/vhost-limits/{vhost}/limits`: every limit cleared.
pub async fn delete_parameter(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    caller.require_admin()?;
    if name != "limits" {
        return Err(ApiError::not_found());
    }
    let before = s
        .broker
        .change_vhost_limits(&vhost, |m| m.clear())?
        .ok_or_else(ApiError::not_found)?;
    if before.is_empty() {
        return Err(ApiError::not_found());
    }
    super::cluster::replicate(&s, || vhost_limits_cmd(&s.broker, &vhost)).await?;
    Ok(StatusCode::NO_CONTENT)
}

fn user_rows(b: &Broker, keep: impl Fn(&str) -> bool) -> Vec<Value> {
    b.auth
        .all_user_limits()
        .iter()
        .filter(|(u, _)| keep(u))
        .map(|(u, l)| json!({"user": u, "value": limits_json(l)}))
        .collect()
}

pub async fn list_users(State(s): State<AdminState>, caller: Caller) -> ApiResult<Json<Value>> {
    caller.require_admin()?;
    Ok(Json(Value::Array(user_rows(&s.broker, |_| true))))
}

pub async fn show_user(
    State(s): State<AdminState>,
    caller: Caller,
    Path(user): Path<String>,
) -> ApiResult<Json<Value>> {
    caller.require_admin()?;
    s.broker.auth.user(&user).ok_or_else(ApiError::not_found)?;
    Ok(Json(Value::Array(user_rows(&s.broker, |u| u == user))))
}

pub async fn put_user(
    State(s): State<AdminState>,
    caller: Caller,
    Path((user, name)): Path<(String, String)>,
    Body(body): Body,
) -> ApiResult<StatusCode> {
    caller.require_admin()?;
    let value = body_value(USER_LIMITS, &name, &body)?;
    s.broker
        .auth
        .change_user_limits(&user, |m| {
            m.insert(name.clone(), value);
        })
        .ok_or_else(ApiError::not_found)?;
    super::cluster::replicate(&s, || user_limits_cmd(&s.broker, &user)).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn delete_user(
    State(s): State<AdminState>,
    caller: Caller,
    Path((user, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    caller.require_admin()?;
    s.broker
        .auth
        .change_user_limits(&user, |m| {
            m.remove(&name);
        })
        .ok_or_else(ApiError::not_found)?;
    super::cluster::replicate(&s, || user_limits_cmd(&s.broker, &user)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Set a user's limits from a definitions / API user body's `limits` object,
/// when it has one (replacing the user's limits); the command that
/// replicates them.
pub fn import_user_limits(b: &Broker, user: &str, body: &Value) -> ApiResult<Option<Command>> {
    let Some(value) = body.get("limits").filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let map = limits::validate_all(USER_LIMITS, value).map_err(ApiError::bad_request)?;
    b.auth
        .change_user_limits(user, |m| *m = map)
        .ok_or_else(|| ApiError::bad_request(format!("user_not_found: {user}")))?;
    Ok(user_limits_cmd(b, user))
}
