//! `/api/cluster` (warren's own; the CLI's `cluster status`, `cluster join`,
//! `cluster forget-node`) and the clustered form of `/api/nodes`: every member
//! of the metadata group, whether this node sees it running, and which one
//! leads the metadata group; and [`Homes`], the node each queue lives on for
//! the queue JSON's `node`. Answers 400 on a node without `[cluster]`.

use super::{AdminState, ApiError, ApiResult, Body, Caller};
use crate::cluster::{Cluster, Command};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};
use std::sync::Arc;

fn clustered(s: &AdminState) -> ApiResult<&Arc<Cluster>> {
    s.cluster.as_ref().ok_or_else(|| {
        ApiError::bad_request("this node is not clustered (no [cluster] in its configuration)")
    })
}

/// Clustered: commit `cmd` (a change this node's API just made) in the
/// metadata group before the request is answered; 503 when it cannot be
/// committed in time (no majority). A node without `[cluster]` does nothing.
pub async fn replicate(s: &AdminState, cmd: impl FnOnce() -> Option<Command>) -> ApiResult<()> {
    let Some(c) = &s.cluster else {
        return Ok(());
    };
    let Some(cmd) = cmd() else {
        return Ok(());
    };
    c.propose(cmd).await.map_err(|reason| ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        error: "timeout",
        reason,
    })
}

/// This node's name as the API shows it: its cluster name when clustered,
/// else `warren@` and the host name.
pub fn this_node(s: &AdminState) -> String {
    s.cluster
        .as_ref()
        .map_or_else(super::node_name, |c| c.me.name.clone())
}

/// The node each queue lives on (RabbitMQ's `node` of a queue): the home
/// node of its replicated record when clustered, else this node (a queue
/// that is not replicated, or no cluster). Taken once per request.
pub struct Homes {
    here: String,
    metadata: Option<crate::cluster::command::Metadata>,
}

impl Homes {
    pub fn of(s: &AdminState) -> Homes {
        Homes {
            here: this_node(s),
            metadata: s.cluster.as_ref().map(|c| c.metadata()),
        }
    }

    /// The home node of `name` in `vhost`.
    pub fn node(&self, vhost: &str, name: &str) -> &str {
        self.metadata
            .as_ref()
            .and_then(|m| m.queue_node(vhost, name))
            .unwrap_or(&self.here)
    }
}

/// `/api/nodes` when clustered: this node's full record plus one per member.
pub fn nodes(c: &Cluster, this_node: Value) -> Vec<Value> {
    c.members()
        .into_iter()
        .map(|m| {
            let mut j = if m.id == c.id {
                this_node.clone()
            } else {
                json!({"type": "disc"})
            };
            if let Some(o) = j.as_object_mut() {
                o.insert("name".into(), json!(m.name));
                o.insert("running".into(), json!(m.running));
                o.insert("metadata_leader".into(), json!(m.leader));
                o.insert("voter".into(), json!(m.voter));
                o.insert("cluster_addr".into(), json!(m.addr));
            }
            j
        })
        .collect()
}

/// `GET /api/cluster`: this node, the leader, the members, the Raft state and
/// the replicated queue records with their home nodes.
pub async fn status(State(s): State<AdminState>, caller: Caller) -> ApiResult<Json<Value>> {
    caller.require_monitor()?;
    let c = clustered(&s)?;
    let meta = c.metadata();
    let queues: Vec<Value> = meta
        .queues
        .values()
        .filter_map(|cmd| match cmd {
            Command::DeclareQueue {
                vhost, name, node, ..
            } => Some(json!({"vhost": vhost, "name": name, "node": node})),
            _ => None,
        })
        .collect();
    Ok(Json(json!({
        "node": c.me.name,
        "cluster_addr": c.me.addr,
        "leader": c.leader(),
        "members": c.members(),
        "raft": c.raft_status(),
        "exchanges": meta.exchanges.len(),
        "bindings": meta.bindings.len(),
        "queues": queues,
    })))
}

/// `POST /api/cluster/join` `{"node": "warren@host:port"}`: this node joins
/// that node's cluster (only a node alone in its own cluster, with no
/// replicated metadata yet, can).
pub async fn join(
    State(s): State<AdminState>,
    caller: Caller,
    Body(body): Body,
) -> ApiResult<StatusCode> {
    caller.require_admin()?;
    let c = clustered(&s)?;
    let Some(node) = body.get("node").and_then(Value::as_str) else {
        return Err(ApiError::bad_request(
            "body must be {\"node\": \"warren@host[:port]\"}",
        ));
    };
    c.join_cluster(node).await.map_err(ApiError::bad_request)?;
    Ok(StatusCode::NO_CONTENT)
}

/// `DELETE /api/cluster/nodes/{node}`: remove a member from the cluster.
pub async fn forget(
    State(s): State<AdminState>,
    caller: Caller,
    Path(node): Path<String>,
) -> ApiResult<StatusCode> {
    caller.require_admin()?;
    let c = clustered(&s)?;
    let name = match crate::cluster::parse_seed(&node) {
        (Some(name), _) => name,
        (None, _) => node,
    };
    c.forget(&name).await.map_err(ApiError::bad_request)?;
    Ok(StatusCode::NO_CONTENT)
}
