//! RabbitMQ's health checks (`/api/health/checks/...`: what
//! `rabbitmq-diagnostics check_*`, load balancers and Kubernetes probes
//! call) beyond the alarms one: a listener on a port or for a protocol,
//! TLS certificates expiring within a period, whether stopping this
//! node would take a quorum queue below its majority (or a mirrored classic
//! queue below its last synchronised mirror: warren has no mirroring, so
//! never), and whether every virtual host runs, plus the deprecated
//! `/api/healthchecks/node[/{node}]`. Each answers 200
//! `{"status": "ok", ...}` when it passes and 503 `{"status": "failed",
//! "reason": ..., ...}` with what failed. Also this node's listeners for
//! `GET /api/overview`.

use super::cluster::this_node;
use super::{AdminState, ApiError, ApiResult, Caller};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use std::net::SocketAddr;

/// One bound listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    /// RabbitMQ's protocol names: `amqp`, `amqp/ssl`, `stream`,
    /// `stream/ssl`, `http`, `https`, `clustering`.
    pub protocol: &'static str,
    pub addr: SocketAddr,
}

fn ok(extra: Value) -> Response {
    let mut body = json!({"status": "ok"});
    if let (Some(o), Value::Object(e)) = (body.as_object_mut(), extra) {
        o.extend(e);
    }
    Json(body).into_response()
}

fn failed(reason: &str, extra: Value) -> Response {
    let mut body = json!({"status": "failed", "reason": reason});
    if let (Some(o), Value::Object(e)) = (body.as_object_mut(), extra) {
        o.extend(e);
    }
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}

pub(super) fn listeners(s: &AdminState) -> Vec<Listener> {
    s.listeners.get().cloned().unwrap_or_default()
}

/// This node's listeners as `GET /api/overview` lists them.
pub fn overview_listeners(s: &AdminState) -> Value {
    let node = this_node(s);
    Value::Array(
        listeners(s)
            .into_iter()
            .map(|l| {
                json!({
                    "node": node,
                    "protocol": l.protocol,
                    "ip_address": l.addr.ip().to_string(),
                    "port": l.addr.port(),
                    "socket_opts": {},
                })
            })
            .collect(),
    )
}

/// `GET /api/health/checks/port-listener/{port}`.
pub async fn port_listener(
    State(s): State<AdminState>,
    _caller: Caller,
    Path(port): Path<String>,
) -> ApiResult<Response> {
    let port: u16 = port
        .parse()
        .map_err(|_| ApiError::bad_request(format!("'{port}' is not a port number")))?;
    let ports: Vec<u16> = listeners(&s).iter().map(|l| l.addr.port()).collect();
    Ok(if ports.contains(&port) {
        ok(json!({"port": port}))
    } else {
        failed(
            "No active listener",
            json!({"missing": port, "ports": ports}),
        )
    })
}

/// A protocol name as RabbitMQ's check accepts it, normalised.
fn protocol_name(p: &str) -> Option<&'static str> {
    Some(match p.to_ascii_lowercase().as_str() {
        "amqp" | "amqp091" | "amqp0-9-1" | "amqp0.9.1" | "amqp09" | "amqp0.9" => "amqp",
        "amqps" | "amqp/ssl" | "amqp091/ssl" | "amqp/tls" => "amqp/ssl",
        "stream" | "rabbitmq_stream" => "stream",
        "stream/ssl" | "streams" | "stream/tls" | "rabbitmq_stream/ssl" => "stream/ssl",
        "http" | "management" | "http/management" => "http",
        "https" | "management/ssl" | "http/ssl" | "https/management" => "https",
        "clustering" | "cluster" | "inter-node" => "clustering",
        "prometheus" | "http/prometheus" => "http/prometheus",
        "https/prometheus" | "prometheus/ssl" => "unsupported",
        // Protocols warren has no listener for: always missing.
        "mqtt" | "mqtt/ssl" | "stomp" | "stomp/ssl" | "http/web-mqtt" | "http/web-stomp"
        | "amqp1.0" | "amqp10" => "unsupported",
        _ => return None,
    })
}

/// `GET /api/health/checks/protocol-listener/{protocol}`.
pub async fn protocol_listener(
    State(s): State<AdminState>,
    _caller: Caller,
    Path(protocol): Path<String>,
) -> ApiResult<Response> {
    // A name RabbitMQ does not know either has no listener: the check fails
    // (503), as RabbitMQ's does, rather than refusing the request.
    let wanted = protocol_name(&protocol).unwrap_or("unsupported");
    let mut protocols: Vec<&str> = listeners(&s).iter().map(|l| l.protocol).collect();
    protocols.dedup();
    Ok(if protocols.contains(&wanted) {
        ok(json!({"protocol": wanted}))
    } else {
        failed(
            "No active listener",
            json!({"missing": protocol, "protocols": protocols}),
        )
    })
}

/// How many seconds `within` `unit`s are (RabbitMQ's units).
fn period_secs(within: &str, unit: &str) -> Option<u64> {
    let n: u64 = within.parse().ok()?;
    let per = match unit {
        "day" | "days" => 86_400,
        "week" | "weeks" => 7 * 86_400,
        "month" | "months" => 30 * 86_400,
        "year" | "years" => 365 * 86_400,
        _ => return None,
    };
    n.checked_mul(per)
}

/// `GET /api/health/checks/certificate-expiration/{within}/{unit}`: fails
/// when a certificate of a TLS listener (the whole chain in its certfile)
/// expires within that period.
pub async fn certificate_expiration(
    State(s): State<AdminState>,
    _caller: Caller,
    Path((within, unit)): Path<(String, String)>,
) -> ApiResult<Response> {
    let secs = period_secs(&within, &unit).ok_or_else(|| {
        ApiError::bad_request(format!(
            "'{within} {unit}': a whole number of days, weeks, months or years"
        ))
    })?;
    let now = crate::clock::now_ms() / 1000;
    let limit = i64::try_from(now.saturating_add(secs)).unwrap_or(i64::MAX);
    let node = this_node(&s);
    let mut expiring = Vec::new();
    for (what, t) in &s.tls {
        for (subject, not_after) in t.certificate_expiries() {
            if not_after <= limit {
                let protocol = match *what {
                    "AMQPS" => "amqp/ssl",
                    "admin HTTPS" => "https",
                    "inter-node" => "clustering",
                    other => other,
                };
                expiring.push(json!({
                    "node": node,
                    "protocol": protocol,
                    "certfile": t.certfile_name(),
                    "subject": subject,
                    "expires": not_after,
                }));
            }
        }
    }
    Ok(if expiring.is_empty() {
        ok(json!({}))
    } else {
        failed("Certificates expiring", json!({"expired": expiring}))
    })
}

/// The quorum queues (vhost, name) that lose their majority if `me` stops:
/// those `me` is a member of whose online members (per `running`) less
/// `me` are fewer than a majority of all members.
pub fn quorum_critical(
    quorum: &std::collections::BTreeMap<String, crate::cluster::command::QuorumRec>,
    me: &str,
    running: &std::collections::BTreeSet<String>,
) -> Vec<(String, String)> {
    quorum
        .iter()
        .filter(|(_, rec)| rec.members.iter().any(|m| m == me))
        .filter(|(_, rec)| {
            let online = rec
                .members
                .iter()
                .filter(|m| *m != me && running.contains(*m))
                .count();
            online < rec.members.len() / 2 + 1
        })
        .filter_map(|(key, _)| {
            key.split_once('\0')
                .map(|(v, n)| (v.to_string(), n.to_string()))
        })
        .collect()
}

/// `GET /api/health/checks/node-is-quorum-critical`: fails when a quorum
/// queue this node is a member of would lose its majority if this node
/// stopped (what a rolling restart checks before stopping a node). A node
/// alone (not clustered) has no replicated queue and passes, as
/// RabbitMQ's.
/// What RabbitMQ adds to a node-is-*-critical check on a node alone: no
/// other node to stop, so nothing can be critical.
fn single_node() -> Response {
    ok(json!({"reason": "single node cluster"}))
}

/// `GET /api/health/checks/node-is-mirror-sync-critical`: classic queue
/// mirroring does not exist in warren (replication is by quorum queues), so
/// stopping a node never leaves a mirrored queue without a synchronised
/// mirror.
pub async fn node_is_mirror_sync_critical(
    State(s): State<AdminState>,
    _caller: Caller,
) -> Response {
    match &s.cluster {
        Some(c) if c.members().len() > 1 => ok(json!({})),
        _ => single_node(),
    }
}

/// `GET /api/health/checks/virtual-hosts`: every virtual host runs. A
/// warren vhost has no process of its own that could be stopped or have
/// crashed: each runs while the node does.
pub async fn virtual_hosts(_caller: Caller) -> Response {
    ok(json!({}))
}

/// `GET /api/healthchecks/node[/{node}]` (deprecated in RabbitMQ 3.8 for
/// the checks above, still served): fails with a resource alarm in effect
/// on this node; another member is asked for its alarm over the cluster
/// port (it fails when it does not answer).
pub async fn legacy_node(
    State(s): State<AdminState>,
    _caller: Caller,
    node: Option<Path<String>>,
) -> ApiResult<Response> {
    let name = node.map(|Path(n)| n).unwrap_or_else(|| this_node(&s));
    let alarms: Vec<&str> = if name == this_node(&s) {
        s.broker.alarms().resources()
    } else {
        match super::cluster::member_stats(&s, &name).await? {
            Some(a) => super::overview::alarms_of_figures(&a["node"]).resources(),
            None => return Ok(failed(&format!("node {name} is not reachable"), json!({}))),
        }
    };
    Ok(if alarms.is_empty() {
        ok(json!({}))
    } else {
        failed(
            &format!("resource alarm(s) in effect: [{}]", alarms.join(",")),
            json!({}),
        )
    })
}

pub async fn node_is_quorum_critical(
    State(s): State<AdminState>,
    _caller: Caller,
) -> ApiResult<Response> {
    let Some(c) = s.cluster.clone().filter(|c| c.members().len() > 1) else {
        return Ok(single_node());
    };
    let running = c
        .members()
        .into_iter()
        .filter(|m| m.running)
        .map(|m| m.name)
        .collect();
    let critical = quorum_critical(&c.metadata().quorum, &c.me.name, &running);
    Ok(if critical.is_empty() {
        ok(json!({}))
    } else {
        let queues: Vec<Value> = critical
            .into_iter()
            .map(|(vhost, name)| {
                json!({
                    "name": name,
                    "readable_name": format!("queue '{name}' in vhost '{vhost}'"),
                    "virtual_host": vhost,
                    "type": "quorum",
                })
            })
            .collect();
        failed(
            "There are quorum queues that would lose their quorum if the target node is shut down",
            json!({"queues": queues}),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::command::QuorumRec;
    use std::collections::{BTreeMap, BTreeSet};

    #[test]
    fn protocol_names_are_normalised() {
        assert_eq!(protocol_name("AMQP0-9-1"), Some("amqp"));
        assert_eq!(protocol_name("amqps"), Some("amqp/ssl"));
        assert_eq!(protocol_name("management"), Some("http"));
        assert_eq!(protocol_name("stream"), Some("stream"));
        assert_eq!(protocol_name("prometheus"), Some("http/prometheus"));
        assert_eq!(protocol_name("mqtt"), Some("unsupported"));
        assert_eq!(protocol_name("gopher"), None);
    }

    #[test]
    fn periods_in_rabbitmq_units() {
        assert_eq!(period_secs("2", "weeks"), Some(14 * 86_400));
        assert_eq!(period_secs("1", "years"), Some(365 * 86_400));
        assert_eq!(period_secs("1", "fortnights"), None);
        assert_eq!(period_secs("-1", "days"), None);
        assert_eq!(period_secs(&u64::MAX.to_string(), "years"), None);
    }

    #[test]
    fn a_node_is_critical_where_its_loss_leaves_no_majority() {
        let rec = |members: &[&str]| QuorumRec {
            group: "g".into(),
            members: members.iter().map(|m| m.to_string()).collect(),
            leader: None,
        };
        let mut quorum = BTreeMap::new();
        quorum.insert("/\0three".to_string(), rec(&["a", "b", "c"]));
        quorum.insert("/\0two".to_string(), rec(&["a", "b"]));
        quorum.insert("/\0elsewhere".to_string(), rec(&["b", "c"]));
        let all: BTreeSet<String> = ["a", "b", "c"].iter().map(|n| n.to_string()).collect();
        // All up: a two-member queue needs both, so a is critical for it.
        assert_eq!(
            quorum_critical(&quorum, "a", &all),
            vec![("/".to_string(), "two".to_string())]
        );
        // c down: the three-member queue now needs a too.
        let ab: BTreeSet<String> = ["a", "b"].iter().map(|n| n.to_string()).collect();
        let mut got = quorum_critical(&quorum, "a", &ab);
        got.sort();
        assert_eq!(
            got,
            vec![
                ("/".to_string(), "three".to_string()),
                ("/".to_string(), "two".to_string())
            ]
        );
        // A node that is no member is never critical.
        assert!(quorum_critical(&quorum, "d", &all).is_empty());
    }
}
