//! `/api/cluster` (warren's own; the CLI's `cluster status`, `cluster join`,
//! `cluster forget-node`) and the clustered form of `/api/nodes`: every member
//! of the metadata group, whether this node sees it running, and which one
//! leads the metadata group, with each member's figures asked of it
//! ([`answer_stats`] is what this node answers); [`Homes`], the node each
//! queue lives on for the queue JSON's `node`, and the counts it has of the
//! queue; and [`replicate`], the one door through which every admin write
//! reaches the metadata group. Answers 400 on a node without `[cluster]`.

use super::{AdminState, ApiError, ApiResult, Body, Caller};
use crate::cluster::{Cluster, Command};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
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
        challenge: false,
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
/// that is not replicated, or no cluster). Taken once per request; with
/// [`Homes::fetch`], also the counts of queues whose home is another member,
/// as that member has them.
pub struct Homes {
    here: String,
    metadata: Option<crate::cluster::command::Metadata>,
    /// Counts answered by the home node, by vhost and name.
    remote: HashMap<(String, String), Value>,
}

impl Homes {
    pub fn of(s: &AdminState) -> Homes {
        Homes {
            here: this_node(s),
            metadata: s.cluster.as_ref().map(|c| c.metadata()),
            remote: HashMap::new(),
        }
    }

    /// The home node of `name` in `vhost`.
    pub fn node(&self, vhost: &str, name: &str) -> &str {
        self.metadata
            .as_ref()
            .and_then(|m| m.queue_node(vhost, name))
            .unwrap_or(&self.here)
    }

    /// Ask each home node (one request per member, all at once) for the
    /// counts of those of `queues` that live there; a member that does not
    /// answer leaves this node's own counts in place.
    pub async fn fetch(&mut self, s: &AdminState, queues: &[Arc<crate::broker::queue::Queue>]) {
        let Some(c) = &s.cluster else {
            return;
        };
        let mut by_node: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
        for q in queues {
            let (vhost, name) = (q.spec.vhost.to_string(), q.name().to_string());
            let node = self.node(&vhost, &name);
            if node != self.here && !self.remote.contains_key(&(vhost.clone(), name.clone())) {
                by_node
                    .entry(node.to_string())
                    .or_default()
                    .push((vhost, name));
            }
        }
        let asks = by_node.into_iter().map(|(node, wanted)| async move {
            let answer = c.stats_of(&node, &json!({ "queues": wanted })).await;
            (wanted, answer)
        });
        for (wanted, answer) in futures::future::join_all(asks).await {
            let Some(Value::Array(counts)) =
                answer.and_then(|mut a| a.get_mut("queues").map(Value::take))
            else {
                continue;
            };
            for (key, counts) in wanted.into_iter().zip(counts) {
                if counts.is_object() {
                    self.remote.insert(key, counts);
                }
            }
        }
    }

    /// The counts the home node answered for `name` in `vhost`, if it did.
    pub fn counts(&self, vhost: &str, name: &str) -> Option<&Value> {
        self.remote.get(&(vhost.to_string(), name.to_string()))
    }

    /// Queue `q`'s ready and unacknowledged messages and consumers: its home
    /// node's answer when another member answered for it, else this node's.
    pub fn lengths(&self, s: &AdminState, q: &crate::broker::queue::Queue) -> Lengths {
        match self.counts(&q.spec.vhost, q.name()) {
            Some(c) => {
                let n = |k: &str| c[k].as_u64().unwrap_or(0) as usize;
                Lengths {
                    ready: n("messages_ready"),
                    unacked: n("messages_unacknowledged"),
                    consumers: n("consumers"),
                    from_home: true,
                }
            }
            None => {
                let st = super::queues::local_stats(s, q, crate::clock::now_ms());
                Lengths {
                    ready: st.ready,
                    unacked: st.unacked,
                    consumers: st.consumers,
                    from_home: false,
                }
            }
        }
    }
}

/// A queue's lengths, as [`Homes::lengths`] takes them.
#[derive(Debug, Clone, Copy)]
pub struct Lengths {
    pub ready: usize,
    pub unacked: usize,
    pub consumers: usize,
    /// Answered by its home node (another member).
    pub from_home: bool,
}

/// `/api/nodes` when clustered: this node's full record plus one per member,
/// with the figures each member answered over the inter-node port (asked
/// all at once; one that does not answer within a second is shown as not
/// running, without figures).
pub async fn nodes(c: &Cluster, this_node: Value) -> Vec<Value> {
    c.member_stats(&json!({}))
        .await
        .into_iter()
        .map(|(m, answer)| {
            let here = m.id == c.id;
            let mut j = if here {
                this_node.clone()
            } else {
                let figures = answer.as_ref().and_then(|a| a.get("node"));
                super::overview::node_record(&m.name, answer.is_some(), figures)
            };
            if let Some(o) = j.as_object_mut() {
                o.insert("name".into(), json!(m.name));
                o.insert("running".into(), json!(here || answer.is_some()));
                o.insert("metadata_leader".into(), json!(m.leader));
                o.insert("voter".into(), json!(m.voter));
                o.insert("cluster_addr".into(), json!(m.addr));
            }
            j
        })
        .collect()
}

/// This node's answer to another member's stats request: its health
/// figures (`node`), its memory breakdown (`memory`) and, for `{"queues": [[vhost, name], ...]}`, the counts
/// of those queues (`queues`, in the same order; null for one it does not
/// have).
pub fn answer_stats(s: &AdminState, query: &Value) -> Value {
    if let Some(answer) = super::shovels::answer_stats(s, query)
        .or_else(|| super::connections::answer_stats(s, query))
        .or_else(|| super::overview::answer_stats(s, query))
        .or_else(|| super::vhosts::answer_stats(s, query))
    {
        return answer;
    }
    let wanted = query.get("queues").and_then(Value::as_array);
    let queues: Vec<Value> = wanted
        .into_iter()
        .flatten()
        .take(MAX_QUEUES_ASKED)
        .map(|pair| {
            let (Some(vhost), Some(name)) = (pair[0].as_str(), pair[1].as_str()) else {
                return Value::Null;
            };
            super::queues::find(s, vhost, name)
                .map(|q| Value::Object(super::queues::queue_counts(s, &q)))
                .unwrap_or(Value::Null)
        })
        .collect();
    json!({
        "node": super::overview::node_figures(s),
        "memory": super::overview::memory_breakdown(s),
        "queues": queues,
    })
}

/// Every other member's answer to the stats request `query` ([`answer_stats`],
/// asked all at once; None: no answer within a second), as member name and
/// answer; none on a node without a cluster.
pub async fn ask_members(s: &AdminState, query: &Value) -> Vec<(String, Option<Value>)> {
    let Some(c) = &s.cluster else {
        return Vec::new();
    };
    let answers = c.member_stats(query).await.into_iter();
    answers
        .filter(|(m, _)| m.id != c.id)
        .map(|(m, a)| (m.name, a))
        .collect()
}

/// Another member's answer to a stats request ([`answer_stats`], asked
/// over the cluster port): 404 when `node` is no member (or this node is
/// not clustered), None when it did not answer.
pub async fn member_stats(s: &AdminState, node: &str) -> ApiResult<Option<Value>> {
    let c = s.cluster.as_ref().ok_or_else(ApiError::not_found)?;
    if !c.members().iter().any(|m| m.name == node) {
        return Err(ApiError::not_found());
    }
    Ok(c.stats_of(node, &json!({})).await)
}

/// The most queues one stats request answers for: a bound on the work a
/// single request makes.
const MAX_QUEUES_ASKED: usize = 100_000;

/// Let other members ask this node for its figures ([`answer_stats`]).
pub fn serve_stats(s: &AdminState) {
    let Some(c) = &s.cluster else {
        return;
    };
    // The answering state holds no cluster handle: the cluster keeps this
    // closure, and a cycle would keep both alive.
    let mut local = s.clone();
    local.cluster = None;
    c.set_stats(Arc::new(move |query| answer_stats(&local, query)));
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
