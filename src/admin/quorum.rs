//! Quorum queue membership through the management API, RabbitMQ's endpoints
//! (`rabbitmq-queues add_member / delete_member / grow / shrink` over HTTP):
//! each computes the queue's new member list from the replicated record and
//! commits it as one `QuorumMembers` metadata command; the group's leader
//! then changes the group's voters to match (`cluster::quorum`). Answered
//! once the metadata change is committed; administrators only. And leader
//! rebalancing (`POST /api/rebalance/queues`, `cluster::quorum::rebalance`).

use super::{AdminState, ApiError, ApiResult, Caller};
use crate::broker::queue::QueueType;
use crate::cluster::command::{Command, QuorumRec};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::Value;

#[derive(Debug, Deserialize)]
pub struct NodeBody {
    node: String,
}

#[derive(Debug, Default, Deserialize)]
pub struct GrowBody {
    #[serde(default)]
    vhost_pattern: Option<String>,
    #[serde(default)]
    queue_pattern: Option<String>,
    /// `all` (every matching queue the node is not a member of) or `even`
    /// (only those with an even number of members).
    #[serde(default)]
    strategy: Option<String>,
}

/// The cluster and this queue's group record, for an administrator; 404 for
/// a queue that does not exist, 400 for one that is not a replicated quorum
/// queue.
fn record(
    s: &AdminState,
    caller: &Caller,
    vhost: &str,
    name: &str,
) -> ApiResult<(std::sync::Arc<crate::cluster::Cluster>, QuorumRec)> {
    caller.require_admin()?;
    let q = s
        .broker
        .vhost(vhost)
        .and_then(|v| v.queue(name, 0).ok())
        .ok_or_else(ApiError::not_found)?;
    if q.queue_type() != QueueType::Quorum {
        return Err(ApiError::bad_request(format!(
            "queue '{name}' in vhost '{vhost}' is not a quorum queue"
        )));
    }
    let c = s.cluster.clone().ok_or_else(|| {
        ApiError::bad_request("this node is not clustered: a quorum queue has one member")
    })?;
    let rec = c
        .quorum_record(vhost, name)
        .ok_or_else(|| ApiError::bad_request(format!("quorum queue '{name}' has no group yet")))?;
    Ok((c, rec))
}

fn clustered(s: &AdminState) -> ApiResult<std::sync::Arc<crate::cluster::Cluster>> {
    s.cluster
        .clone()
        .ok_or_else(|| ApiError::bad_request("this node is not clustered"))
}

fn cluster_node(c: &crate::cluster::Cluster, node: &str) -> ApiResult<()> {
    if c.members().iter().any(|m| m.name == node) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "node '{node}' is not a cluster member"
        )))
    }
}

async fn commit(c: &crate::cluster::Cluster, cmd: Command) -> ApiResult<()> {
    c.propose(cmd).await.map_err(|reason| ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        error: "timeout",
        reason,
        challenge: false,
    })
}

fn members_cmd(vhost: &str, name: &str, rec: &QuorumRec, members: Vec<String>) -> Command {
    Command::QuorumMembers {
        vhost: vhost.to_string(),
        name: name.to_string(),
        group: rec.group.clone(),
        members,
    }
}

/// `POST /api/queues/quorum/{vhost}/{name}/replicas/add` `{"node": ...}`.
pub async fn add_member(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    Json(body): Json<NodeBody>,
) -> ApiResult<StatusCode> {
    let (c, rec) = record(&s, &caller, &vhost, &name)?;
    cluster_node(&c, &body.node)?;
    if rec.members.contains(&body.node) {
        return Err(ApiError::bad_request(format!(
            "node '{}' is already a member of quorum queue '{name}'",
            body.node
        )));
    }
    let mut members = rec.members.clone();
    members.push(body.node);
    commit(&c, members_cmd(&vhost, &name, &rec, members)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// `DELETE /api/queues/quorum/{vhost}/{name}/replicas/delete` `{"node": ...}`.
pub async fn delete_member(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    Json(body): Json<NodeBody>,
) -> ApiResult<StatusCode> {
    let (c, rec) = record(&s, &caller, &vhost, &name)?;
    if !rec.members.contains(&body.node) {
        return Err(ApiError::bad_request(format!(
            "node '{}' is not a member of quorum queue '{name}'",
            body.node
        )));
    }
    if rec.members.len() == 1 {
        return Err(ApiError::bad_request(format!(
            "cannot delete the last member of quorum queue '{name}'"
        )));
    }
    let members = rec
        .members
        .iter()
        .filter(|m| **m != body.node)
        .cloned()
        .collect();
    commit(&c, members_cmd(&vhost, &name, &rec, members)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Whether `text` matches the regular expression `pattern` (None: all).
fn matches(pattern: &Option<String>, text: &str) -> ApiResult<bool> {
    match pattern {
        None => Ok(true),
        Some(p) => regex::Regex::new(p)
            .map(|r| r.is_match(text))
            .map_err(|e| ApiError::bad_request(format!("invalid pattern '{p}': {e}"))),
    }
}

/// `POST /api/queues/quorum/replicas/on/{node}/grow`: add `node` to every
/// matching quorum queue it is not a member of. Answers the queues changed.
pub async fn grow(
    State(s): State<AdminState>,
    caller: Caller,
    Path(node): Path<String>,
    body: Option<Json<GrowBody>>,
) -> ApiResult<Json<Value>> {
    caller.require_admin()?;
    let body = body.map(|Json(b)| b).unwrap_or_default();
    let even = match body.strategy.as_deref() {
        None | Some("all") => false,
        Some("even") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "strategy must be 'all' or 'even', not '{other}'"
            )))
        }
    };
    let c = clustered(&s)?;
    cluster_node(&c, &node)?;
    let mut changed = Vec::new();
    for (key, rec) in c.metadata().quorum {
        let Some((vhost, name)) = key.split_once('\0') else {
            continue;
        };
        if rec.members.contains(&node)
            || (even && rec.members.len() % 2 != 0)
            || !matches(&body.vhost_pattern, vhost)?
            || !matches(&body.queue_pattern, name)?
        {
            continue;
        }
        let mut members = rec.members.clone();
        members.push(node.clone());
        commit(&c, members_cmd(vhost, name, &rec, members)).await?;
        changed.push(serde_json::json!({"vhost": vhost, "name": name}));
    }
    Ok(Json(Value::Array(changed)))
}

/// `DELETE /api/queues/quorum/replicas/on/{node}/shrink`: remove `node` from
/// every quorum queue it is a member of, except where it is the only one.
pub async fn shrink(
    State(s): State<AdminState>,
    caller: Caller,
    Path(node): Path<String>,
) -> ApiResult<Json<Value>> {
    caller.require_admin()?;
    let c = clustered(&s)?;
    let mut changed = Vec::new();
    for (key, rec) in c.metadata().quorum {
        let Some((vhost, name)) = key.split_once('\0') else {
            continue;
        };
        if !rec.members.contains(&node) || rec.members.len() == 1 {
            continue;
        }
        let members = rec
            .members
            .iter()
            .filter(|m| **m != node)
            .cloned()
            .collect();
        commit(&c, members_cmd(vhost, name, &rec, members)).await?;
        changed.push(serde_json::json!({"vhost": vhost, "name": name}));
    }
    Ok(Json(Value::Array(changed)))
}

#[derive(Debug, Default, Deserialize)]
pub struct RebalanceBody {
    /// `all`, `quorum`, `classic` or `stream` (RabbitMQ's
    /// `rabbitmq-queues rebalance <type>`); only quorum queues have
    /// replicas to lead, so only they move.
    #[serde(default, rename = "type")]
    queue_type: Option<String>,
    #[serde(default)]
    vhost_pattern: Option<String>,
    #[serde(default)]
    queue_pattern: Option<String>,
    /// Answer when done, with what moved (`warren queues rebalance`);
    /// without it the rebalance runs in the background and the answer is
    /// 204 at once, as RabbitMQ's.
    #[serde(default)]
    wait: bool,
}

/// `POST /api/rebalance/queues`: spread the quorum queues' leaders over the
/// running nodes. RabbitMQ runs it in the background and answers 204 (the
/// log says how it went); with `{"wait": true}` the answer is the moves
/// and the leaders per node after them. A node alone has nothing to move.
pub async fn rebalance(
    State(s): State<AdminState>,
    caller: Caller,
    body: Option<Json<RebalanceBody>>,
) -> ApiResult<Response> {
    caller.require_admin()?;
    let body = body.map(|Json(b)| b).unwrap_or_default();
    let quorum = match body.queue_type.as_deref() {
        None | Some("all") | Some("quorum") => true,
        Some("classic") | Some("stream") => false,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "type must be all, quorum, classic or stream, not '{other}'"
            )))
        }
    };
    // Checked now, so a bad pattern is a 400 rather than a log line.
    matches(&body.vhost_pattern, "")?;
    matches(&body.queue_pattern, "")?;
    let (Some(c), true) = (s.cluster.clone(), quorum) else {
        return Ok(if body.wait {
            Json(serde_json::json!({"moves": [], "leaders": []})).into_response()
        } else {
            StatusCode::NO_CONTENT.into_response()
        });
    };
    let keep = move |vhost: &str, name: &str| {
        matches(&body.vhost_pattern, vhost).unwrap_or(false)
            && matches(&body.queue_pattern, name).unwrap_or(false)
    };
    if body.wait {
        let outcome = c.quorum.rebalance(keep).await.map_err(|reason| ApiError {
            status: StatusCode::CONFLICT,
            error: "conflict",
            reason,
            challenge: false,
        })?;
        return Ok(Json(outcome).into_response());
    }
    tokio::spawn(async move {
        if let Err(e) = c.quorum.rebalance(keep).await {
            tracing::warn!(error = %e, "quorum queue leader rebalance not run");
        }
    });
    Ok(StatusCode::NO_CONTENT.into_response())
}
