//! Shovels in the management API, as RabbitMQ's shovel management plugin has
//! them: the `shovel` runtime parameters (`/api/parameters/shovel[/{vhost}[/{name}]]`,
//! set and cleared by policymakers) and the status of every shovel, dynamic and
//! static (`/api/shovels[/{vhost}]`, `/api/shovels/vhost/{vhost}/{name}`, and its
//! `/restart`). Clustered, the parameters are replicated like the rest of
//! the metadata (committed before the answer) and each dynamic shovel runs
//! on one node ([`crate::shovel::ClusterPlacement`]): the statuses are asked
//! of every member ([`member_statuses`]) and a restart goes to the node that
//! runs the shovel.

use super::{AdminState, ApiError, ApiResult, Body, Caller};
use crate::cluster::Command;
use crate::shovel::{PutError, COMPONENT};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde_json::{json, Value};

pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/api/parameters", get(list_every))
        .route("/api/parameters/shovel", get(list_all))
        .route("/api/parameters/shovel/:vhost", get(list_vhost))
        .route(
            "/api/parameters/shovel/:vhost/:name",
            get(show).put(put).delete(remove),
        )
        .route("/api/shovels", get(status_all))
        .route("/api/shovels/:vhost", get(status_vhost))
        .route("/api/shovels/vhost/:vhost/:name", get(status_one))
        .route("/api/shovels/vhost/:vhost/:name/restart", delete(restart))
}

/// Rows of vhosts the caller may see.
fn visible(s: &AdminState, caller: &Caller, rows: Vec<Value>) -> Vec<Value> {
    rows.into_iter()
        .filter(|r| {
            r.get("vhost")
                .and_then(Value::as_str)
                .is_some_and(|v| caller.sees(&s.broker, v))
        })
        .collect()
}

/// `GET /api/parameters`: every runtime parameter `caller` sees (vhost
/// limits and shovels).
async fn list_every(State(s): State<AdminState>, caller: Caller) -> Json<Value> {
    let mut rows = super::limits::visible_limit_parameters(&s.broker, &caller, None);
    rows.extend(visible(&s, &caller, s.shovels.parameters(None)));
    Json(Value::Array(rows))
}

async fn list_all(State(s): State<AdminState>, caller: Caller) -> Json<Value> {
    Json(Value::Array(visible(
        &s,
        &caller,
        s.shovels.parameters(None),
    )))
}

async fn list_vhost(
    State(s): State<AdminState>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult<Json<Value>> {
    caller.require_vhost(&s.broker, &vhost)?;
    Ok(Json(Value::Array(s.shovels.parameters(Some(&vhost)))))
}

async fn show(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    caller.require_vhost(&s.broker, &vhost)?;
    s.shovels
        .parameter(&vhost, &name)
        .map(Json)
        .ok_or_else(ApiError::not_found)
}

fn require_policymaker(caller: &Caller) -> ApiResult<()> {
    if caller.is_policymaker() {
        Ok(())
    } else {
        Err(ApiError::refused("Not policymaker user"))
    }
}

/// Set a shovel from a parameter body (`{"value": {...}}`); true when new.
pub fn put_from(s: &AdminState, vhost: &str, name: &str, body: &Value) -> ApiResult<bool> {
    if s.broker.vhost(vhost).is_none() {
        return Err(ApiError::bad_request(format!("vhost_not_found: {vhost}")));
    }
    if name.is_empty() {
        return Err(ApiError::bad_request("a shovel needs a name"));
    }
    let value = body
        .get("value")
        .ok_or_else(|| ApiError::bad_request("Validation failed\n\nvalue must be set"))?;
    s.shovels
        .put(vhost, name, value.clone())
        .map_err(|e| match e {
            PutError::Invalid(reason) => ApiError::bad_request(reason),
            PutError::Storage(e) => ApiError::from(crate::error::AmqpError::internal_error(
                format!("cannot store the shovel: {e}"),
            )),
        })
}

/// The command that replicates shovel `name` of `vhost` as this node now has
/// it (cleared when it has none).
pub fn shovel_cmd(s: &AdminState, vhost: &str, name: &str) -> Option<Command> {
    Some(Command::SetParameter {
        component: COMPONENT.into(),
        vhost: vhost.into(),
        name: name.into(),
        value: s
            .broker
            .parameters
            .get(COMPONENT, vhost, name)
            .map(|v| v.to_string()),
    })
}

async fn put(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    Body(body): Body,
) -> ApiResult<StatusCode> {
    require_policymaker(&caller)?;
    caller.require_vhost(&s.broker, &vhost)?;
    let created = put_from(&s, &vhost, &name, &body)?;
    super::cluster::replicate(&s, || shovel_cmd(&s, &vhost, &name)).await?;
    Ok(super::put_status(created))
}

async fn remove(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    require_policymaker(&caller)?;
    caller.require_vhost(&s.broker, &vhost)?;
    match s.shovels.delete(&vhost, &name) {
        Ok(true) => {
            super::cluster::replicate(&s, || shovel_cmd(&s, &vhost, &name)).await?;
            Ok(StatusCode::NO_CONTENT)
        }
        Ok(false) => Err(ApiError::not_found()),
        Err(e) => Err(ApiError::from(crate::error::AmqpError::internal_error(
            format!("cannot delete the shovel: {e}"),
        ))),
    }
}

/// The statuses of the shovels running on this node and, clustered, on
/// every member that answers (in `vhost`, or all).
async fn member_statuses(s: &AdminState, vhost: Option<&str>) -> Vec<Value> {
    let mut rows = s.shovels.statuses(vhost);
    for (_, answer) in super::cluster::ask_members(s, &json!({"shovels": true})).await {
        let theirs = answer
            .as_ref()
            .and_then(|a| a.get("shovels"))
            .and_then(Value::as_array);
        let wanted =
            |r: &&Value| vhost.is_none_or(|v| r.get("vhost").and_then(Value::as_str) == Some(v));
        rows.extend(theirs.into_iter().flatten().filter(wanted).cloned());
    }
    rows
}

/// A member's answer to a stats request about shovels: the statuses of the
/// shovels running on it (`{"shovels": true}`), or whether it restarted one
/// it runs (`{"restart_shovel": [vhost, name]}`); None for other requests.
pub fn answer_stats(s: &AdminState, query: &Value) -> Option<Value> {
    if let Some([vhost, name]) = query
        .get("restart_shovel")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
    {
        let (vhost, name) = (vhost.as_str()?, name.as_str()?);
        return Some(json!({"restarted": s.shovels.restart(vhost, name)}));
    }
    query
        .get("shovels")
        .map(|_| json!({"shovels": s.shovels.statuses(None)}))
}

async fn status_all(State(s): State<AdminState>, caller: Caller) -> Json<Value> {
    Json(Value::Array(visible(
        &s,
        &caller,
        member_statuses(&s, None).await,
    )))
}

async fn status_vhost(
    State(s): State<AdminState>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult<Json<Value>> {
    caller.require_vhost(&s.broker, &vhost)?;
    Ok(Json(Value::Array(member_statuses(&s, Some(&vhost)).await)))
}

async fn status_one(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    caller.require_vhost(&s.broker, &vhost)?;
    member_statuses(&s, Some(&vhost))
        .await
        .into_iter()
        .find(|r| r.get("name").and_then(Value::as_str) == Some(name.as_str()))
        .map(Json)
        .ok_or_else(ApiError::not_found)
}

async fn restart(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    require_policymaker(&caller)?;
    caller.require_vhost(&s.broker, &vhost)?;
    if s.shovels.restart(&vhost, &name) {
        return Ok(StatusCode::NO_CONTENT);
    }
    let ask = json!({"restart_shovel": [vhost, name]});
    for (_, answer) in super::cluster::ask_members(&s, &ask).await {
        if answer.and_then(|a| a.get("restarted").and_then(Value::as_bool)) == Some(true) {
            return Ok(StatusCode::NO_CONTENT);
        }
    }
    Err(ApiError::not_found())
}
