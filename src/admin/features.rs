//! `/api/feature-flags` and `/api/deprecated-features[/used]`, as RabbitMQ
//! 3.13's management API has them (`rabbitmqadmin feature_flags` and
//! `deprecated_features` read them; administrators only).
//!
//! A feature flag listed here is one of RabbitMQ's whose feature warren has,
//! always on, so each is `enabled` and enabling one changes nothing; a flag
//! for a feature warren lacks (mirrored queues, maintenance mode, ...) is not
//! listed, and enabling it is refused as RabbitMQ refuses an unknown one.
//! The deprecated features are RabbitMQ's, with warren's phase for each
//! (`removed` for what warren never had) and, under `used`, the ones in use
//! now: a channel with a channel-wide prefetch (`global_qos`), a queue
//! neither durable nor exclusive (`transient_nonexcl_queues`).

use super::{AdminState, ApiError, ApiResult, Caller};
use crate::broker::Broker;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, put};
use axum::{Json, Router};
use serde_json::{json, Value};
use std::sync::atomic::Ordering::Relaxed;

pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/api/feature-flags", get(flags))
        .route("/api/feature-flags/:name/enable", put(enable))
        .route("/api/deprecated-features", get(deprecated))
        .route("/api/deprecated-features/used", get(deprecated_used))
}

/// RabbitMQ's feature flags for what warren has: (name, description,
/// provided by, documentation), by name.
const FLAGS: &[(&str, &str, &str, &str)] = &[
    (
        "detailed_queues_endpoint",
        "Add a detailed queues HTTP API endpoint",
        "rabbitmq_management",
        "",
    ),
    (
        "drop_unroutable_metric",
        "Count unroutable publishes to be dropped in stats",
        "rabbitmq_management_agent",
        "",
    ),
    (
        "empty_basic_get_metric",
        "Count AMQP `basic.get` on empty queues in stats",
        "rabbitmq_management_agent",
        "",
    ),
    (
        "implicit_default_bindings",
        "Default bindings are now implicit, instead of being stored in the database",
        "rabbit",
        "",
    ),
    (
        "quorum_queue",
        "Support queues of type `quorum`",
        "rabbit",
        "https://www.rabbitmq.com/quorum-queues.html",
    ),
    (
        "stream_filtering",
        "Support for stream filtering.",
        "rabbit",
        "",
    ),
    (
        "stream_queue",
        "Support queues of type `stream`",
        "rabbit",
        "https://www.rabbitmq.com/stream.html",
    ),
    (
        "stream_single_active_consumer",
        "Single active consumer for streams",
        "rabbit",
        "https://www.rabbitmq.com/stream.html",
    ),
    (
        "user_limits",
        "Configure connection and channel limits for a user",
        "rabbit",
        "",
    ),
    (
        "virtual_host_metadata",
        "Virtual host metadata (description, tags, etc)",
        "rabbit",
        "",
    ),
];

async fn flags(caller: Caller) -> ApiResult<Json<Value>> {
    caller.require_admin()?;
    let rows = FLAGS
        .iter()
        .map(|(name, desc, by, doc)| {
            json!({
                "name": name,
                "desc": desc,
                "doc_url": doc,
                "state": "enabled",
                "stability": "stable",
                "provided_by": by,
            })
        })
        .collect();
    Ok(Json(Value::Array(rows)))
}

/// `PUT /api/feature-flags/{name}/enable`: 204 for a flag warren has (it is
/// on), 400 for any other, as RabbitMQ answers a flag it does not support.
async fn enable(caller: Caller, Path(name): Path<String>) -> ApiResult<StatusCode> {
    caller.require_admin()?;
    if FLAGS.iter().any(|f| f.0 == name) {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::bad_request(format!(
            "feature flag '{name}' is unsupported"
        )))
    }
}

/// RabbitMQ's deprecated features and warren's phase for each.
struct Deprecated {
    name: &'static str,
    desc: &'static str,
    phase: &'static str,
    doc_url: &'static str,
    /// Whether the broker uses it now (never, for a removed one).
    used: fn(&Broker) -> bool,
}

const DEPRECATED: &[Deprecated] = &[
    Deprecated {
        name: "classic_queue_mirroring",
        desc: "Classic mirrored queues",
        phase: "removed",
        doc_url: "https://www.rabbitmq.com/ha.html",
        used: |_| false,
    },
    Deprecated {
        name: "global_qos",
        desc: "Global QoS",
        phase: "permitted_by_default",
        doc_url: "https://www.rabbitmq.com/consumer-prefetch.html",
        used: global_qos_in_use,
    },
    Deprecated {
        name: "ram_node_type",
        desc: "Non-disk nodes (RAM nodes)",
        phase: "removed",
        doc_url: "https://www.rabbitmq.com/clustering.html#cluster-node-types",
        used: |_| false,
    },
    Deprecated {
        name: "transient_nonexcl_queues",
        desc: "Transient non-exclusive queues",
        phase: "permitted_by_default",
        doc_url: "https://www.rabbitmq.com/queues.html#temporary-queues",
        used: transient_nonexclusive_queue_exists,
    },
];

fn global_qos_in_use(b: &Broker) -> bool {
    b.connections().iter().any(|c| {
        c.open_channels
            .lock()
            .values()
            .any(|st| st.global_prefetch_count.load(Relaxed) > 0)
    })
}

fn transient_nonexclusive_queue_exists(b: &Broker) -> bool {
    b.vhosts().iter().any(|v| {
        v.queues()
            .iter()
            .any(|q| !q.spec.durable && q.spec.exclusive_owner.is_none())
    })
}

fn deprecated_rows(b: &Broker, only_used: bool) -> Value {
    DEPRECATED
        .iter()
        .filter(|d| !only_used || (d.used)(b))
        .map(|d| {
            json!({
                "name": d.name,
                "desc": d.desc,
                "deprecation_phase": d.phase,
                "provided_by": "rabbit",
                "doc_url": d.doc_url,
            })
        })
        .collect()
}

async fn deprecated(State(s): State<AdminState>, caller: Caller) -> ApiResult<Json<Value>> {
    caller.require_admin()?;
    Ok(Json(deprecated_rows(&s.broker, false)))
}

async fn deprecated_used(State(s): State<AdminState>, caller: Caller) -> ApiResult<Json<Value>> {
    caller.require_admin()?;
    Ok(Json(deprecated_rows(&s.broker, true)))
}
