//! `/api/policies[/{vhost}[/{name}]]`: list, show, set and clear policies; and
//! `/api/operator-policies[/{vhost}[/{name}]]`, the same for operator policies
//! (administrators only, numeric caps only, as in RabbitMQ).

use super::{AdminState, ApiError, ApiResult, Body, Caller};
use crate::broker::policy::{ApplyTo, Policies, Policy};
use crate::broker::VHost;
use crate::cluster::Command;
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

/// Which of a vhost's two policy sets a route is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    User,
    Operator,
}

impl Kind {
    fn of(self, v: &VHost) -> &Policies {
        match self {
            Kind::User => &v.policies,
            Kind::Operator => &v.operator_policies,
        }
    }

    /// Who may change these: policymakers, or administrators for operator policies.
    fn require_writer(self, caller: &Caller) -> ApiResult<()> {
        match self {
            Kind::User if !caller.is_policymaker() => {
                Err(ApiError::refused("Not policymaker user"))
            }
            Kind::Operator => caller.require_admin(),
            Kind::User => Ok(()),
        }
    }
}

fn collect(s: &AdminState, caller: &Caller, only: Option<&str>, kind: Kind) -> Vec<Value> {
    let mut out = Vec::new();
    for v in s.broker.vhosts() {
        if only.is_some_and(|o| o != &*v.name) || !caller.sees(&s.broker, &v.name) {
            continue;
        }
        out.extend(kind.of(&v).list().iter().map(policy_json));
    }
    super::sort_by_vhost_name(&mut out);
    out
}

pub async fn list(State(s): State<AdminState>, caller: Caller) -> Json<Value> {
    Json(Value::Array(collect(&s, &caller, None, Kind::User)))
}

pub async fn list_vhost(
    State(s): State<AdminState>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult<Json<Value>> {
    caller.require_vhost(&s.broker, &vhost)?;
    Ok(Json(Value::Array(collect(
        &s,
        &caller,
        Some(&vhost),
        Kind::User,
    ))))
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
    put_kind_from(s, vhost, name, body, Kind::User)
}

/// Set a policy or an operator policy from an API / definitions body.
pub fn put_kind_from(
    s: &AdminState,
    vhost: &str,
    name: &str,
    body: &Value,
    kind: Kind,
) -> ApiResult<bool> {
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
    let now = crate::clock::now_ms();
    match kind {
        Kind::User => {
            let p = Policy::new(vhost, name, pattern, apply_to, priority, definition)
                .map_err(ApiError::bad_request)?;
            Ok(v.put_policy(p, now)?)
        }
        Kind::Operator => {
            let p = Policy::new_operator(vhost, name, pattern, apply_to, priority, definition)
                .map_err(ApiError::bad_request)?;
            Ok(v.put_operator_policy(p, now)?)
        }
    }
}

/// The command that replicates policy `name` as this node now has it.
pub fn policy_cmd(s: &AdminState, vhost: &str, name: &str, kind: Kind) -> Option<Command> {
    let v = s.broker.vhost(vhost)?;
    let p = kind.of(&v).get(vhost, name)?;
    Some(Command::PutPolicy {
        vhost: p.vhost.clone(),
        name: p.name.clone(),
        pattern: p.pattern.clone(),
        apply_to: p.apply_to.as_str().into(),
        priority: p.priority,
        definition: Value::Object(p.definition.clone()).to_string(),
        operator: kind == Kind::Operator,
    })
}

/// Set a policy of either kind, replicated when clustered.
async fn put_kind(
    s: AdminState,
    caller: Caller,
    (vhost, name): (String, String),
    body: Value,
    kind: Kind,
) -> ApiResult<StatusCode> {
    kind.require_writer(&caller)?;
    caller.require_vhost(&s.broker, &vhost)?;
    let created = put_kind_from(&s, &vhost, &name, &body, kind)?;
    super::cluster::replicate(&s, || policy_cmd(&s, &vhost, &name, kind)).await?;
    Ok(super::put_status(created))
}

/// Clear a policy of either kind, replicated when clustered.
async fn remove_kind(
    s: AdminState,
    caller: Caller,
    (vhost, name): (String, String),
    kind: Kind,
) -> ApiResult<StatusCode> {
    kind.require_writer(&caller)?;
    caller.require_vhost(&s.broker, &vhost)?;
    let v = s.broker.vhost(&vhost).ok_or_else(ApiError::not_found)?;
    let now = crate::clock::now_ms();
    let removed = match kind {
        Kind::User => v.delete_policy(&name, now)?,
        Kind::Operator => v.delete_operator_policy(&name, now)?,
    };
    if !removed {
        return Err(ApiError::not_found());
    }
    let operator = kind == Kind::Operator;
    let cmd = Command::DeletePolicy {
        vhost,
        name,
        operator,
    };
    super::cluster::replicate(&s, || Some(cmd)).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn put(
    State(s): State<AdminState>,
    caller: Caller,
    Path(path): Path<(String, String)>,
    Body(body): Body,
) -> ApiResult<StatusCode> {
    put_kind(s, caller, path, body, Kind::User).await
}

pub async fn remove(
    State(s): State<AdminState>,
    caller: Caller,
    Path(path): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    remove_kind(s, caller, path, Kind::User).await
}

pub async fn list_operator(State(s): State<AdminState>, caller: Caller) -> Json<Value> {
    Json(Value::Array(collect(&s, &caller, None, Kind::Operator)))
}

pub async fn list_operator_vhost(
    State(s): State<AdminState>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult<Json<Value>> {
    caller.require_vhost(&s.broker, &vhost)?;
    Ok(Json(Value::Array(collect(
        &s,
        &caller,
        Some(&vhost),
        Kind::Operator,
    ))))
}

pub async fn show_operator(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    caller.require_vhost(&s.broker, &vhost)?;
    let v = s.broker.vhost(&vhost).ok_or_else(ApiError::not_found)?;
    let p = v
        .operator_policies
        .get(&vhost, &name)
        .ok_or_else(ApiError::not_found)?;
    Ok(Json(policy_json(&p)))
}

pub async fn put_operator(
    State(s): State<AdminState>,
    caller: Caller,
    Path(path): Path<(String, String)>,
    Body(body): Body,
) -> ApiResult<StatusCode> {
    put_kind(s, caller, path, body, Kind::Operator).await
}

pub async fn remove_operator(
    State(s): State<AdminState>,
    caller: Caller,
    Path(path): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    remove_kind(s, caller, path, Kind::Operator).await
}
