//! `/api/overview`, `/api/nodes`, `/api/whoami`, `/api/health/checks/alarms`,
//! `/api/auth/attempts/{node}[/source]` and `/api/aliveness-test/{vhost}`.

use super::cluster::this_node;
use super::metrics::resident_memory;
use super::{AdminState, ApiError, ApiResult, Caller};
use crate::broker::message::Message;
use crate::broker::vhost::{PublishFrom, QueueDeclare};
use crate::clock::now_ms;
use axum::extract::{Path, State};
use axum::Json;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;

/// warren's version: the `product_version` (RabbitMQ's field for a
/// distribution's own, beside `product_name`).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The RabbitMQ version whose features warren implements: what
/// `rabbitmq_version` says (tools gate features on it), as the protocols'
/// handshakes do.
pub const RABBITMQ_VERSION: &str = crate::session::handshake::RABBITMQ_VERSION;

pub async fn overview(State(s): State<AdminState>, caller: Caller) -> Json<Value> {
    let b = &s.broker;
    let visible: Vec<_> = b
        .vhosts()
        .into_iter()
        .filter(|v| caller.sees(b, &v.name))
        .collect();
    let (mut ready, mut unacked, mut consumers, mut queues, mut exchanges) = (0, 0, 0, 0, 0);
    let mut rates = [0.0; 3];
    // Clustered, a queue's counts are its home node's (one request per
    // member), as RabbitMQ's overview totals the whole cluster.
    let mut homes = super::cluster::Homes::of(&s);
    let all_queues: Vec<_> = visible.iter().flat_map(|v| v.queues()).collect();
    homes.fetch(&s, &all_queues).await;
    for v in &visible {
        exchanges += v.exchanges().len();
        let vq = v.queues();
        let vr = super::charts::summed_length_rates(&s.history, vq.iter().map(|q| &**q));
        for (r, x) in rates.iter_mut().zip(vr) {
            *r += x;
        }
        for q in vq {
            queues += 1;
            let l = homes.lengths(&s, &q);
            ready += l.ready;
            unacked += l.unacked;
            // A stream's counts from its home node include that node's
            // Stream protocol subscriptions, which every member's count
            // below has.
            if !(l.from_home && q.stream().is_some()) {
                consumers += l.consumers;
            }
        }
    }
    let conns: Vec<_> = b
        .connections()
        .into_iter()
        .filter(|c| caller.sees_connections_of(&c.user))
        .collect();
    // Stream protocol subscriptions are consumers too (RabbitMQ registers
    // each as `stream.subid-N` of its connection).
    consumers += b
        .connections()
        .iter()
        .filter(|c| caller.sees(b, &c.vhost))
        .filter_map(|c| c.control.stream())
        .map(|st| st.consumers().len())
        .sum::<usize>();
    let channels: u64 = conns
        .iter()
        .map(|c| u64::from(c.channels.load(Ordering::Relaxed)))
        .sum();
    // The other members' connections, channels, subscriptions and message
    // counts (RabbitMQ's overview totals the cluster).
    let (mut their_conns, mut their_channels) = (0, 0);
    let mut message_stats = super::metrics::full_stats(&b.counters, &s.rates.global());
    let answers = super::cluster::ask_members(&s, &json!({"overview": true})).await;
    for theirs in answers.into_iter().filter_map(|(_, a)| a) {
        let counts = &theirs["connection_counts"];
        let (c, ch, subs) = super::connections::counted(&s, &caller, counts);
        their_conns += c;
        their_channels += ch;
        consumers += subs as usize;
        add_numbers(&mut message_stats, &theirs["message_stats"]);
    }
    let mut queue_totals = serde_json::Map::new();
    queue_totals.insert("messages".into(), json!(ready + unacked));
    queue_totals.insert("messages_ready".into(), json!(ready));
    queue_totals.insert("messages_unacknowledged".into(), json!(unacked));
    super::charts::insert_length_details(&mut queue_totals, rates.map(super::charts::round_rate));
    Json(json!({
        "management_version": VERSION,
        "rabbitmq_version": RABBITMQ_VERSION,
        "product_name": "warren",
        "product_version": VERSION,
        "rates_mode": "basic",
        "cluster_name": s.broker.cluster_name(),
        "node": this_node(&s),
        "listeners": super::health::overview_listeners(&s),
        "message_stats": message_stats,
        "churn_rates": churn_json(&s),
        "sample_retention_policies": retention(),
        "contexts": contexts(&s, Some(&this_node(&s))),
        "disable_stats": false,
        "enable_queue_totals": false,
        // Counters are read where they are kept: no event queue to a
        // statistics database to fall behind.
        "statistics_db_event_queue": 0,
        "exchange_types": exchange_types(),
        "queue_totals": queue_totals,
        "object_totals": {
            "connections": conns.len() as u64 + their_conns,
            "channels": channels + their_channels,
            "exchanges": exchanges,
            "queues": queues,
            "consumers": consumers,
        },
    }))
}

/// What another member asks for its overview (`{"overview": true}`): this
/// node's connections counted ([`super::connections::local_counts`]) and its
/// message counts with their rates; None for other requests.
pub fn answer_stats(s: &AdminState, query: &Value) -> Option<Value> {
    query.get("overview")?;
    Some(json!({
        "connection_counts": super::connections::local_counts(s),
        "message_stats": super::metrics::full_stats(&s.broker.counters, &s.rates.global()),
    }))
}

/// Add the numbers of `from` to those at the same places in `into` (counts,
/// and rates rounded as the API shows them); other values stay.
pub(super) fn add_numbers(into: &mut Value, from: &Value) {
    match (into, from) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a.iter_mut() {
                if let Some(w) = b.get(k) {
                    add_numbers(v, w);
                }
            }
        }
        (n @ Value::Number(_), Value::Number(m)) => {
            *n = match (n.as_u64(), m.as_u64()) {
                (Some(x), Some(y)) => json!(x.saturating_add(y)),
                _ => {
                    let sum = n.as_f64().unwrap_or(0.0) + m.as_f64().unwrap_or(0.0);
                    json!(super::charts::round_rate(sum))
                }
            }
        }
        _ => {}
    }
}

/// The exchange types a declare may name, as the overview lists them (the
/// management UI's type choices).
const EXCHANGE_TYPES: [(&str, &str); 5] = [
    (
        "direct",
        "AMQP direct exchange, as per the AMQP specification",
    ),
    (
        "fanout",
        "AMQP fanout exchange, as per the AMQP specification",
    ),
    (
        "headers",
        "AMQP headers exchange, as per the AMQP specification",
    ),
    (
        "topic",
        "AMQP topic exchange, as per the AMQP specification",
    ),
    ("x-delayed-message", "Delayed Message Exchange"),
];

/// [`EXCHANGE_TYPES`] as the API lists them.
fn exchange_types() -> Vec<Value> {
    EXCHANGE_TYPES
        .iter()
        .map(|(name, description)| json!({"name": name, "description": description, "enabled": true}))
        .collect()
}

/// The SASL mechanisms connection.start offers (EXTERNAL too on a TLS
/// listener that verifies client certificates).
const AUTH_MECHANISMS: [(&str, &str); 3] = [
    ("PLAIN", "SASL PLAIN authentication mechanism"),
    ("AMQPLAIN", "QPid AMQPLAIN mechanism"),
    ("EXTERNAL", "SASL EXTERNAL authentication mechanism"),
];

/// The node's churn counts and their rates over the last sample
/// (`churn_rates` in the overview; the same keys at the top of a node's
/// record).
fn churn_json(s: &AdminState) -> serde_json::Map<String, Value> {
    let rates = s.rates.churn();
    let mut m = serde_json::Map::new();
    for ((k, v), r) in s.broker.churn().into_iter().zip(rates) {
        m.insert(k.to_string(), v.into());
        m.insert(format!("{k}_details"), super::details(r));
    }
    m
}

/// The HTTP listeners (management and Prometheus), as RabbitMQ's
/// `contexts` (with `node` in the overview's).
fn contexts(s: &AdminState, node: Option<&str>) -> Vec<Value> {
    super::health::listeners(s)
        .into_iter()
        .filter(|l| l.protocol.starts_with("http"))
        .map(|l| {
            let mut c = json!({
                "description": "RabbitMQ Management",
                "path": "/",
                "port": l.addr.port().to_string(),
                "ssl": l.protocol == "https",
            });
            if l.protocol == "http/prometheus" {
                c["description"] = json!("RabbitMQ Prometheus");
                c["protocol"] = json!(l.protocol);
            }
            if let Some(n) = node {
                c["node"] = json!(n);
            }
            c
        })
        .collect()
}

/// How long the charts keep samples, in seconds per tier, as RabbitMQ's
/// `sample_retention_policies` (`detailed`: none kept, as warren's rates
/// mode is `basic`).
fn retention() -> Value {
    let tiers: Vec<u64> = super::history::TIERS
        .iter()
        .map(|(step, points)| step * (*points as u64 - 1) / 1000)
        .collect();
    json!({"global": tiers, "basic": tiers, "detailed": []})
}

/// Context switches of every thread of this process (voluntary and not),
/// from `/proc/self/task/*/status`.
fn context_switches() -> Option<u64> {
    let mut total = 0;
    for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        total += status
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum::<u64>();
    }
    Some(total)
}

/// This node's links to the other members, as RabbitMQ's `cluster_links`
/// (none when alone; `crate::cluster::links`).
fn cluster_links(s: &AdminState) -> Vec<Value> {
    s.cluster
        .as_ref()
        .map_or_else(Vec::new, |c| c.links(now_ms()))
}

/// This node's health figures, as `/api/nodes` shows them (and as this node
/// answers another member's stats request).
pub fn node_figures(s: &AdminState) -> Value {
    let disk_free = super::charts::disk_free(&s.broker, s.data_dir.as_deref());
    let mut figures = json!({
        "mem_used": resident_memory().unwrap_or(0),
        "mem_alarm": s.broker.memory_alarm(),
        "mem_limit": s.broker.memory_watermark(),
        "disk_free_alarm": s.broker.disk_alarm(),
        "disk_free": disk_free,
        "disk_free_limit": s.broker.disk_free_limit(),
        "uptime": now_ms().saturating_sub(s.started_at),
        "processors": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "fd_used": super::charts::fd_used(),
        "fd_total": super::charts::fd_total(),
        "os_pid": std::process::id().to_string(),
        "rabbitmq_version": RABBITMQ_VERSION,
        // Warren has no maintenance mode: a node is never drained of its
        // clients and queue leaders.
        "being_drained": false,
        "exchange_types": exchange_types(),
        "enabled_plugins": enabled_plugins(s),
    "auth_mechanisms": AUTH_MECHANISMS
            .iter()
            .map(|(name, description)| {
                // EXTERNAL: offered on TLS listeners, to verified client certificates.
                let enabled = *name != "EXTERNAL" || s.tls.iter().any(|(_, t)| t.serves_clients());
                json!({"name": name, "description": description, "enabled": enabled})
            })
            .collect::<Vec<_>>(),
        "sockets_used": s.broker.connections().len(),
        // No limit of warren's own below the file descriptors'.
        "sockets_total": super::charts::fd_total(),
        "rates_mode": "basic",
        "db_dir": s.data_dir.as_ref().map(|d| d.display().to_string()),
        "cluster_links": cluster_links(s),
        "config_files": s.config_file.iter().map(|f| f.display().to_string()).collect::<Vec<_>>(),
        // The log goes to standard output (RabbitMQ's name for its console log).
        "log_files": ["<stdout>"],
        // `mem_used` is the process's resident set (`VmRSS`).
        "mem_calculation_strategy": "rss",
        "contexts": contexts(s, None),
        // Tasks ready to run and waiting in the runtime's shared queue (the
        // nearest to Erlang's scheduler run queue).
        "run_queue": tokio::runtime::Handle::try_current()
            .map_or(0, |h| h.metrics().global_queue_depth()),
        "context_switches": context_switches(),
        // Seconds without an answer to its probes after which this node
        // takes another member for down (RabbitMQ: `net_ticktime`).
        "net_ticktime": crate::cluster::DOWN_AFTER.as_secs_f64().ceil() as u64,
        // Members this node cannot reach (the nodes' records answer
        // `partitions` from these: `super::cluster::nodes`).
        "unreachable": s.cluster.as_ref().map_or_else(Vec::new, |c| c.unreachable()),
    });
    if let Value::Object(m) = &mut figures {
        m.extend(churn_json(s));
        super::charts::insert_node_gauge_details(&s.history, m);
    }
    figures
}

/// The RabbitMQ plugins whose function (and HTTP API) this node provides,
/// by their names, as RabbitMQ lists the plugins it has enabled (tools look
/// for them there): built in, so always on, except the stream plugins
/// (only with a stream listener) and OAuth 2 (only when configured).
fn enabled_plugins(s: &AdminState) -> Vec<&'static str> {
    let mut plugins = vec![
        "rabbitmq_management",
        "rabbitmq_prometheus",
        "rabbitmq_shovel",
        "rabbitmq_shovel_management",
    ];
    let listeners = super::health::listeners(s);
    if listeners.iter().any(|l| l.protocol.starts_with("stream")) {
        plugins.extend(["rabbitmq_stream", "rabbitmq_stream_management"]);
    }
    if s.broker.auth.oauth2().is_some() {
        plugins.push("rabbitmq_auth_backend_oauth2");
    }
    plugins.sort_unstable();
    plugins
}

/// A node's record: its name, type, whether it runs, and `figures`' fields.
pub fn node_record(name: &str, running: bool, figures: Option<&Value>) -> Value {
    let mut j = json!({"name": name, "type": "disc", "running": running});
    if let (Some(Value::Object(f)), Value::Object(o)) = (figures, &mut j) {
        for (k, v) in f {
            o.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    j
}

fn node_json(s: &AdminState) -> Value {
    node_record(&this_node(s), true, Some(&node_figures(s)))
}

/// Every node's record (this one's alone, or every member's), with their
/// `partitions`.
async fn node_records(s: &AdminState) -> Vec<Value> {
    let mut records = match &s.cluster {
        Some(c) => super::cluster::nodes(c, node_json(s)).await,
        None => vec![node_json(s)],
    };
    with_partitions(&mut records);
    records
}

/// Each record's `partitions` (RabbitMQ's: the nodes it is cut off from
/// that still run) from the `unreachable` members its node reported: those
/// another running node reaches (or that answered this one). A member that
/// is down is in no one's partitions, as in RabbitMQ.
fn with_partitions(records: &mut [Value]) {
    let names = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    };
    let views: Vec<(String, bool, Vec<String>)> = records
        .iter()
        .map(|r| {
            let name = r["name"].as_str().unwrap_or_default().to_string();
            (name, r["running"] == true, names(&r["unreachable"]))
        })
        .collect();
    for r in records.iter_mut() {
        let Some(o) = r.as_object_mut() else { continue };
        let me = o
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        let cut = names(o.get("unreachable").unwrap_or(&Value::Null));
        let partitions: Vec<&String> = cut
            .iter()
            .filter(|y| {
                views.iter().any(|(z, running, theirs)| {
                    *z != me && *running && (*z == **y || !theirs.contains(y))
                })
            })
            .collect();
        o.remove("unreachable");
        o.insert("partitions".into(), json!(partitions));
    }
}

pub async fn nodes(State(s): State<AdminState>, caller: Caller) -> ApiResult<Json<Value>> {
    caller.require_monitor()?;
    Ok(Json(json!(node_records(&s).await)))
}

/// `GET /api/nodes/{node}`: this node's record, or (clustered) another
/// member's, with the figures it answered (`running: false` and none when
/// it did not answer; 404 when it is not a member).
pub async fn node(
    State(s): State<AdminState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    caller.require_monitor()?;
    node_records(&s)
        .await
        .into_iter()
        .find(|r| r["name"] == name.as_str())
        .map(Json)
        .ok_or_else(ApiError::not_found)
}

/// A node's memory by what uses it, in RabbitMQ's categories
/// (`/api/nodes/{node}/memory`, `?memory=true`): what warren can tell
/// apart is attributed — message bodies held in memory by queues
/// (`queue_procs`: classic queues and a quorum queue leader's, which share
/// one copy), streams' write buffers (`stream_queue_procs`) — and the rest
/// of the resident memory is `other_proc` (connections, quorum queue group
/// state, the metadata, the allocator's slack). Categories of the Erlang
/// runtime warren has no counterpart of (code, atoms, ETS, Mnesia, ...)
/// are 0. `total`: the resident set size (the strategy RabbitMQ calls
/// `rss`), the same in each of its three figures.
pub fn memory_breakdown(s: &AdminState) -> Value {
    let rss = resident_memory().unwrap_or(0);
    let queues = s.broker.budget.used() as u64;
    let streams = s.broker.streams.as_ref().map_or(0, |st| st.pending_bytes());
    let other = rss.saturating_sub(queues).saturating_sub(streams);
    let mut m = serde_json::Map::new();
    for k in MEMORY_CATEGORIES {
        m.insert((*k).into(), json!(0));
    }
    m.insert("queue_procs".into(), json!(queues));
    m.insert("stream_queue_procs".into(), json!(streams));
    m.insert("other_proc".into(), json!(other));
    m.insert("strategy".into(), json!("rss"));
    m.insert(
        "total".into(),
        json!({"rss": rss, "allocated": rss, "erlang": rss}),
    );
    Value::Object(m)
}

/// RabbitMQ's memory categories (3.10's, and 4.x's metadata store).
const MEMORY_CATEGORIES: &[&str] = &[
    "connection_readers",
    "connection_writers",
    "connection_channels",
    "connection_other",
    "queue_procs",
    "queue_slave_procs",
    "quorum_queue_procs",
    "quorum_queue_dlx_procs",
    "stream_queue_procs",
    "stream_queue_replica_reader_procs",
    "stream_queue_coordinator_procs",
    "plugins",
    "metadata_store",
    "other_proc",
    "metrics",
    "mgmt_db",
    "mnesia",
    "quorum_ets",
    "metadata_store_ets",
    "other_ets",
    "binary",
    "msg_index",
    "code",
    "atom",
    "other_system",
    "allocated_unused",
    "reserved_unallocated",
];

/// The same in whole percent of the total (`/api/nodes/{node}/memory/relative`).
fn relative(breakdown: &Value) -> Value {
    let total = breakdown["total"]["rss"].as_u64().unwrap_or(0).max(1);
    let mut m = serde_json::Map::new();
    m.insert("total".into(), json!(100));
    for k in MEMORY_CATEGORIES {
        let v = breakdown[*k].as_u64().unwrap_or(0);
        m.insert((*k).into(), json!(v * 100 / total));
    }
    Value::Object(m)
}

/// `node`'s memory breakdown: this node's, or asked of another member
/// (404: no such member; None: it did not answer).
pub async fn memory_of(s: &AdminState, node: &str) -> ApiResult<Option<Value>> {
    if node == this_node(s) {
        return Ok(Some(memory_breakdown(s)));
    }
    let answer = super::cluster::member_stats(s, node).await?;
    Ok(answer.and_then(|a| a.get("memory").cloned()))
}

/// `GET /api/nodes/{node}/memory`: `{"memory": ...}` ([`memory_breakdown`]);
/// 404 for a node that is not a member, 503 for one that does not answer.
pub async fn node_memory(
    State(s): State<AdminState>,
    caller: Caller,
    Path(node): Path<String>,
) -> ApiResult<Json<Value>> {
    caller.require_monitor()?;
    let memory = memory_of(&s, &node)
        .await?
        .ok_or_else(|| ApiError::unavailable(format!("node {node} did not answer")))?;
    Ok(Json(json!({ "memory": memory })))
}

/// `GET /api/nodes/{node}/memory/relative`: the same in percent.
pub async fn node_memory_relative(
    state: State<AdminState>,
    caller: Caller,
    node: Path<String>,
) -> ApiResult<Json<Value>> {
    let Json(v) = node_memory(state, caller, node).await?;
    Ok(Json(json!({ "memory": relative(&v["memory"]) })))
}

/// `GET /api/auth`: the management UI's single sign-on settings (RabbitMQ
/// 3.10's `management.enable_uaa` and its client and provider). warren's
/// UI logs in with a user name and password only (the API also takes
/// OAuth 2 bearer tokens when `auth_oauth2` is configured), so SSO is off.
pub async fn auth_settings() -> Json<Value> {
    Json(json!({"enable_uaa": false, "uaa_client_id": "", "uaa_location": ""}))
}

pub async fn whoami(caller: Caller) -> Json<Value> {
    Json(json!({"name": caller.0.name, "tags": caller.0.tags_list()}))
}

/// `GET /api/extensions`: the management UI's plugin scripts, as RabbitMQ
/// lists them for its plugins' pages; warren's UI has none, so the list is
/// empty.
pub async fn extensions(_caller: Caller) -> Json<Value> {
    Json(json!([]))
}

/// `POST /api/warren/reload-tls` (administrators; warren's own, the CLI's
/// `reload-tls`): read the certificate, key and CA files of every TLS listener
/// again, as SIGHUP does. 204; 400 when no TLS listener is configured; 500 with
/// the reason when a file does not load (that listener keeps its certificate).
pub async fn reload_tls(
    State(s): State<AdminState>,
    caller: Caller,
) -> Result<axum::http::StatusCode, super::ApiError> {
    caller.require_admin()?;
    if s.tls.is_empty() {
        return Err(super::ApiError::bad_request(
            "no TLS listener is configured",
        ));
    }
    crate::tls::reload_all(&s.tls).map_err(|e| super::ApiError {
        status: axum::http::StatusCode::INTERNAL_SERVER_ERROR,
        error: "reload_failed",
        reason: e.to_string(),
        challenge: false,
    })?;
    Ok(axum::http::StatusCode::NO_CONTENT)
}

/// `alarms` of `node`, as the alarm checks list them.
fn alarm_rows(node: &str, alarms: crate::broker::Alarms) -> Vec<Value> {
    alarms
        .resources()
        .into_iter()
        .map(|r| json!({"node": node, "resource": r}))
        .collect()
}

/// The resource alarms in effect on this node, as the alarm checks list them.
fn local_alarm_list(s: &AdminState) -> Vec<Value> {
    alarm_rows(&this_node(s), s.broker.alarms())
}

/// 200 when none of `alarms` is in effect, 503 listing them otherwise
/// (RabbitMQ's shape; `place`: "the cluster" or "this node").
fn alarms_answer(alarms: Vec<Value>, place: &str) -> axum::response::Response {
    use axum::response::IntoResponse;
    if alarms.is_empty() {
        return Json(json!({"status": "ok"})).into_response();
    }
    (
        axum::http::StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({
            "status": "failed",
            "reason": format!("There are alarms in effect in {place}"),
            "alarms": alarms,
        })),
    )
        .into_response()
}

/// The resource alarms a member's figures ([`node_figures`], from a stats
/// request) say are in effect on it.
pub fn alarms_of_figures(figures: &Value) -> crate::broker::Alarms {
    crate::broker::Alarms {
        memory: figures["mem_alarm"] == true,
        disk: figures["disk_free_alarm"] == true,
    }
}

/// `GET /api/health/checks/alarms`: the memory and disk alarms of every
/// running member of the cluster (each other member asked over the
/// cluster port; one that does not answer adds none).
pub async fn alarms(State(s): State<AdminState>, _caller: Caller) -> axum::response::Response {
    let mut list = local_alarm_list(&s);
    if let Some(c) = &s.cluster {
        let me = this_node(&s);
        for m in c.members() {
            if !m.running || m.name == me {
                continue;
            }
            if let Some(stats) = c.stats_of(&m.name, &json!({})).await {
                list.extend(alarm_rows(&m.name, alarms_of_figures(&stats["node"])));
            }
        }
    }
    alarms_answer(list, "the cluster")
}

/// `GET /api/health/checks/local-alarms`: this node's alarms only.
pub async fn local_alarms(
    State(s): State<AdminState>,
    _caller: Caller,
) -> axum::response::Response {
    alarms_answer(local_alarm_list(&s), "this node")
}

/// Declare `aliveness-test`, publish to it and get the message back, as RabbitMQ does.
pub async fn aliveness(
    State(s): State<AdminState>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult<Json<Value>> {
    caller.require_vhost(&s.broker, &vhost)?;
    let v = s.broker.vhost(&vhost).ok_or_else(ApiError::not_found)?;
    let (q, _) = v.declare_queue(
        &QueueDeclare {
            name: "aliveness-test".into(),
            ..Default::default()
        },
        0,
        now_ms(),
    )?;
    let body = bytes::Bytes::from_static(b"test_message");
    let message = Message::new("", "aliveness-test", Default::default(), body.clone());
    v.publish("", &message, PublishFrom::Client, now_ms())?;
    match q.get(true, now_ms()) {
        Some((e, _)) if e.message.body == body => Ok(Json(json!({"status": "ok"}))),
        _ => Ok(Json(
            json!({"status": "failed", "reason": "message not received"}),
        )),
    }
}

/// `GET /api/auth/attempts/{node}`: this node's login attempts since start,
/// per protocol that had any (RabbitMQ's auth attempt metrics); another
/// node's are not kept here (404).
pub async fn auth_attempts(
    State(s): State<AdminState>,
    caller: Caller,
    Path(node): Path<String>,
) -> ApiResult<Json<Value>> {
    own_node(&s, &caller, &node)?;
    let rows: Vec<Value> = crate::broker::AuthProtocol::ALL
        .iter()
        .filter_map(|&p| {
            let (ok, failed) = s.broker.auth_attempts.get(p);
            (ok + failed > 0).then(|| attempts_row(json!({"protocol": p.name()}), ok, failed))
        })
        .collect();
    Ok(Json(Value::Array(rows)))
}

/// The auth attempt endpoints answer for this node only (a monitor's view).
fn own_node(s: &AdminState, caller: &Caller, node: &str) -> ApiResult<()> {
    caller.require_monitor()?;
    match node == s.broker.node {
        true => Ok(()),
        false => Err(ApiError::not_found()),
    }
}

/// `row` (what the attempts are of) with RabbitMQ's three counts.
fn attempts_row(mut row: Value, ok: u64, failed: u64) -> Value {
    if let Value::Object(m) = &mut row {
        m.insert("auth_attempts".into(), json!(ok + failed));
        m.insert("auth_attempts_failed".into(), json!(failed));
        m.insert("auth_attempts_succeeded".into(), json!(ok));
    }
    row
}

/// `GET /api/auth/attempts/{node}/source`: this node's login attempts per
/// source (remote address, username, protocol), as RabbitMQ gives them with
/// `track_auth_attempt_source` on; warren always tracks them, for at most
/// [`crate::broker::MAX_AUTH_SOURCES`] sources (the first seen go first).
pub async fn auth_attempts_by_source(
    State(s): State<AdminState>,
    caller: Caller,
    Path(node): Path<String>,
) -> ApiResult<Json<Value>> {
    own_node(&s, &caller, &node)?;
    let rows: Vec<Value> = s
        .broker
        .auth_attempts
        .sources()
        .into_iter()
        .map(|((remote, username, protocol), (ok, failed))| {
            let of = json!({
                "remote_address": remote,
                "username": username,
                "protocol": protocol.name(),
            });
            attempts_row(of, ok, failed)
        })
        .collect();
    Ok(Json(Value::Array(rows)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_numbers_are_added_in_place() {
        let mut ours =
            json!({"publish": 3, "publish_details": {"rate": 1.5}, "name": "x", "only": 1});
        let theirs =
            json!({"publish": 4, "publish_details": {"rate": 0.25}, "name": "y", "extra": 9});
        add_numbers(&mut ours, &theirs);
        assert_eq!(
            ours,
            json!({"publish": 7, "publish_details": {"rate": 1.8}, "name": "x", "only": 1})
        );
    }

    #[test]
    fn a_partition_is_a_member_cut_off_that_another_reaches() {
        // a cannot reach c or d; b reaches c but not d (down); c did not
        // answer a; d is down.
        let mut records = vec![
            json!({"name": "a", "running": true, "unreachable": ["c", "d"]}),
            json!({"name": "b", "running": true, "unreachable": ["d"]}),
            json!({"name": "c", "running": false}),
            json!({"name": "d", "running": false}),
        ];
        with_partitions(&mut records);
        let partitions: Vec<&Value> = records.iter().map(|r| &r["partitions"]).collect();
        assert_eq!(
            partitions,
            [&json!(["c"]), &json!([]), &json!([]), &json!([])]
        );
        assert!(records.iter().all(|r| r.get("unreachable").is_none()));
        // Alone: nothing to be cut off from.
        let mut alone = vec![json!({"name": "a", "running": true, "unreachable": []})];
        with_partitions(&mut alone);
        assert_eq!(alone[0]["partitions"], json!([]));
    }
}
