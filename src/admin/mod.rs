//! The admin HTTP API, shaped like RabbitMQ's management plugin (`/api/...`, same
//! JSON field names), plus Prometheus metrics at `/metrics`.
//!
//! Handlers only use `Broker`'s public API. Every `/api` route authenticates with
//! HTTP basic auth against the broker's users, or with an OAuth 2.0 access token
//! (`Authorization: Bearer`, when `auth_oauth2` is configured) whose scopes stand
//! in for tags and permissions ([`Caller`]); errors are RabbitMQ's
//! `{"error": ..., "reason": ...}` bodies ([`ApiError`]).

pub mod bindings;
pub mod charts;
pub mod cluster;
pub mod connections;
pub mod definitions;
pub mod exchanges;
pub mod features;
pub mod global_parameters;
pub mod health;
pub mod history;
mod https;
pub mod limits;
pub mod metrics;
pub mod overview;
pub mod policies;
pub mod queues;
pub mod quorum;
pub mod shovels;
pub mod stream;
pub mod topic_permissions;
pub mod trace;
pub mod ui;
pub mod users;
pub mod vhosts;

use crate::broker::{Broker, User};
use crate::error::AmqpError;
use crate::wire::{FieldTable, FieldValue};
use axum::extract::{FromRef, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use base64::Engine;
use serde_json::{json, Map, Value};
use std::net::SocketAddr;
use std::sync::Arc;

/// What every handler gets.
#[derive(Debug, Clone)]
pub struct AdminState {
    pub broker: Arc<Broker>,
    pub rates: Arc<metrics::Rates>,
    pub started_at: u64,
    pub shovels: Arc<crate::shovel::Shovels>,
    /// The broker's TLS listeners (`POST /api/warren/reload-tls` reloads them).
    pub tls: crate::tls::Listeners,
    /// The charts' history (sampled by [`charts::spawn_sampler`]).
    pub history: Arc<history::History>,
    /// The data directory, whose file system's free space the node reports.
    pub data_dir: Option<std::path::PathBuf>,
    /// The configuration file the node was started with, if any.
    pub config_file: Option<std::path::PathBuf>,
    /// This node's part of the cluster, when clustered.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    /// Every listener of this node, set once they are all bound.
    pub listeners: Arc<std::sync::OnceLock<Vec<health::Listener>>>,
}

impl AdminState {
    /// The state for `broker` and its `shovels`, with fresh rate samples.
    pub fn new(broker: Arc<Broker>, shovels: Arc<crate::shovel::Shovels>) -> AdminState {
        AdminState {
            broker,
            rates: metrics::Rates::new(),
            started_at: crate::clock::now_ms(),
            shovels,
            tls: Vec::new(),
            history: Arc::new(history::History::new()),
            data_dir: None,
            config_file: None,
            cluster: None,
            listeners: Arc::default(),
        }
    }
}

impl FromRef<AdminState> for Arc<Broker> {
    fn from_ref(s: &AdminState) -> Arc<Broker> {
        Arc::clone(&s.broker)
    }
}

/// An API error: status plus RabbitMQ's JSON body.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub error: &'static str,
    pub reason: String,
    /// A failed login: the 401 carries `WWW-Authenticate` (a refusal to an
    /// authenticated user is a 401 without it, as RabbitMQ answers both).
    pub challenge: bool,
}

impl ApiError {
    pub fn not_found() -> ApiError {
        ApiError {
            status: StatusCode::NOT_FOUND,
            error: "Object Not Found",
            reason: "Not Found".into(),
            challenge: false,
        }
    }
    pub fn bad_request(reason: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            error: "bad_request",
            reason: reason.into(),
            challenge: false,
        }
    }
    /// What the request needs cannot be had now (another node did not
    /// answer): 503.
    pub fn unavailable(reason: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            error: "service_unavailable",
            reason: reason.into(),
            challenge: false,
        }
    }
    /// A failed login (no, wrong or refused credentials): 401 with a
    /// `WWW-Authenticate` challenge.
    pub fn unauthorized(reason: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            error: "not_authorised",
            reason: reason.into(),
            challenge: true,
        }
    }
    /// A logged-in user's tags or permissions do not allow the request:
    /// RabbitMQ's `not_authorised`, 401 (3.x answers 401, not 403; a 403
    /// is only "considered for 4.0" there), without a challenge.
    pub fn refused(reason: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            error: "not_authorised",
            reason: reason.into(),
            challenge: false,
        }
    }
}

impl From<AmqpError> for ApiError {
    fn from(e: AmqpError) -> ApiError {
        use crate::wire::reply_code as rc;
        let status = match e.code {
            rc::NOT_FOUND => StatusCode::NOT_FOUND,
            // RabbitMQ: `not_authorised`, 401 (see `refused`).
            rc::ACCESS_REFUSED => StatusCode::UNAUTHORIZED,
            rc::RESOURCE_LOCKED => StatusCode::LOCKED,
            // A failed durable write (541 INTERNAL_ERROR).
            rc::INTERNAL_ERROR => StatusCode::INTERNAL_SERVER_ERROR,
            // 406 (e.g. a vhost limit) and the rest: RabbitMQ answers 400.
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError {
            status,
            error: match status {
                StatusCode::NOT_FOUND => "Object Not Found",
                StatusCode::INTERNAL_SERVER_ERROR => "internal_server_error",
                StatusCode::UNAUTHORIZED => "not_authorised",
                _ => "bad_request",
            },
            reason: e.text,
            challenge: false,
        }
    }
}

impl From<axum::extract::rejection::JsonRejection> for ApiError {
    fn from(e: axum::extract::rejection::JsonRejection) -> ApiError {
        ApiError::bad_request(e.body_text())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({"error": self.error, "reason": self.reason}));
        if self.challenge {
            (
                self.status,
                [(
                    header::WWW_AUTHENTICATE,
                    "Basic realm=\"RabbitMQ Management\"",
                )],
                body,
            )
                .into_response()
        } else {
            (self.status, body).into_response()
        }
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// A JSON body that reports malformed input as a 400 `ApiError`.
pub struct Body(pub Value);

#[axum::async_trait]
impl<S: Send + Sync> axum::extract::FromRequest<S> for Body {
    type Rejection = ApiError;
    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Body, ApiError> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::bad_request(e.body_text()))?;
        if bytes.iter().all(|b| b.is_ascii_whitespace()) {
            return Ok(Body(Value::Object(Map::new())));
        }
        serde_json::from_slice(&bytes)
            .map(Body)
            .map_err(|e| ApiError::bad_request(format!("failed to decode json: {e}")))
    }
}

/// The authenticated user of a request (HTTP basic auth or a Bearer token,
/// management tags required). With a token, its scopes decide what the caller
/// reaches instead of the user's permission records.
#[derive(Debug, Clone)]
pub struct Caller(pub User, pub Option<Arc<crate::broker::oauth::Token>>);

impl Caller {
    pub fn is_admin(&self) -> bool {
        self.0.has_tag("administrator")
    }
    /// Sees every vhost's objects (monitoring and administrator).
    pub fn is_monitor(&self) -> bool {
        self.is_admin() || self.0.has_tag("monitoring")
    }
    pub fn is_policymaker(&self) -> bool {
        self.is_admin() || self.0.has_tag("policymaker")
    }
    pub fn require_admin(&self) -> ApiResult<()> {
        if self.is_admin() {
            Ok(())
        } else {
            Err(ApiError::refused("Not administrator user"))
        }
    }
    pub fn require_monitor(&self) -> ApiResult<()> {
        if self.is_monitor() {
            Ok(())
        } else {
            Err(ApiError::refused("Not monitor user"))
        }
    }
    /// The connections (and their channels) of `user` are visible: monitors
    /// see every connection, others their own.
    pub fn sees_connections_of(&self, user: &str) -> bool {
        self.is_monitor() || self.0.name == user
    }
    /// Objects of `vhost` are visible: monitors see all, others need permissions there.
    pub fn sees(&self, broker: &Broker, vhost: &str) -> bool {
        self.is_monitor() || self.vhost_access(broker, vhost)
    }

    /// Has a permission entry (or, with a token, a scope) in `vhost`.
    fn vhost_access(&self, broker: &Broker, vhost: &str) -> bool {
        match &self.1 {
            Some(t) => t.vhost_access(vhost),
            None => broker.auth.vhost_access(vhost, &self.0.name),
        }
    }
    /// The caller's own resource permission, as the AMQP side checks it (a 401 refusal otherwise).
    /// The API acts as the user, so administrators need permissions too, as in RabbitMQ.
    pub fn permit(
        &self,
        broker: &Broker,
        vhost: &str,
        access: crate::broker::auth::Access,
        kind: &str,
        name: &str,
    ) -> ApiResult<()> {
        let name = if kind == "exchange" && name.is_empty() {
            "amq.default"
        } else {
            name
        };
        let allowed = match &self.1 {
            Some(t) => t.allows(vhost, access, name),
            None => broker.auth.allows(vhost, &self.0.name, access, name),
        };
        if allowed {
            Ok(())
        } else {
            Err(ApiError::refused(format!(
                "access to {kind} '{name}' in vhost '{vhost}' refused for user '{}'",
                self.0.name
            )))
        }
    }

    /// Acting on `vhost` needs a permission entry there (administrators included,
    /// as in RabbitMQ).
    pub fn require_vhost(&self, broker: &Broker, vhost: &str) -> ApiResult<()> {
        if broker.vhost(vhost).is_none() {
            return Err(ApiError::not_found());
        }
        if self.vhost_access(broker, vhost) || self.is_admin() {
            Ok(())
        } else {
            Err(ApiError::refused("Access refused."))
        }
    }
}

const MANAGEMENT_TAGS: &[&str] = &["administrator", "monitoring", "policymaker", "management"];

#[axum::async_trait]
impl<S> FromRequestParts<S> for Caller
where
    Arc<Broker>: FromRef<S>,
    S: Send + Sync,
{
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Caller, ApiError> {
        let broker = Arc::<Broker>::from_ref(state);
        let remote = parts
            .extensions
            .get::<axum::extract::ConnectInfo<SocketAddr>>()
            .map(|c| c.0);
        if let Some(token) = bearer_token(parts) {
            return token_caller(&broker, token, remote);
        }
        let (user, pass) =
            basic_credentials(parts).ok_or_else(|| ApiError::unauthorized("Login failed"))?;
        let from_loopback = remote.as_ref().is_none_or(is_loopback);
        // The broker's login check (password, then loopback-only users), as
        // AMQP and stream logins use it: a loopback-only user logging in
        // from elsewhere counts as a failed attempt there too.
        let login = broker.authenticate(&user, &pass, from_loopback);
        broker.auth_attempts.record(
            crate::broker::AuthProtocol::Http,
            login.is_ok(),
            remote.map(|r| r.ip()),
            &user,
        );
        let u = login.map_err(|e| match e {
            crate::broker::LoginError::Refused => ApiError::unauthorized("Login failed"),
            crate::broker::LoginError::LoopbackOnly => {
                ApiError::unauthorized("User can only log in via localhost")
            }
        })?;
        if !u.tags.iter().any(|t| MANAGEMENT_TAGS.contains(&t.as_str())) {
            return Err(ApiError::refused("Not management user"));
        }
        Ok(Caller(u, None))
    }
}

/// A Bearer token's caller: a failed login (401 with a challenge) unless it
/// verifies now, a refusal (401 without one) without a management tag scope.
fn token_caller(
    broker: &Broker,
    token: &str,
    remote: Option<SocketAddr>,
) -> Result<Caller, ApiError> {
    let verifier = broker
        .auth
        .oauth2()
        .ok_or_else(|| ApiError::unauthorized("Login failed"))?;
    let verified = verifier.verify(token, crate::clock::now_ms() / 1000, true);
    // A refused token names nobody.
    let name = verified
        .as_ref()
        .map(|t| t.as_user().name)
        .unwrap_or_default();
    broker.auth_attempts.record(
        crate::broker::AuthProtocol::Http,
        verified.is_ok(),
        remote.map(|r| r.ip()),
        &name,
    );
    let t = verified.map_err(|why| {
        tracing::warn!("admin API: OAuth 2 token refused: {why}");
        ApiError::unauthorized("Login failed")
    })?;
    if !t.tags.iter().any(|t| MANAGEMENT_TAGS.contains(&t.as_str())) {
        return Err(ApiError::refused("Not management user"));
    }
    Ok(Caller(t.as_user(), Some(Arc::new(t))))
}

fn bearer_token(parts: &Parts) -> Option<&str> {
    let value = parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim)
}

fn is_loopback(addr: &SocketAddr) -> bool {
    match addr.ip() {
        std::net::IpAddr::V4(ip) => ip.is_loopback(),
        std::net::IpAddr::V6(ip) => {
            ip.is_loopback() || ip.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

fn basic_credentials(parts: &Parts) -> Option<(String, String)> {
    let value = parts.headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

/// The admin router (also usable with `tower::ServiceExt::oneshot` in tests).
pub fn router(state: AdminState) -> Router {
    // Routed on the path with its percent-encoded unreserved characters
    // decoded (clients that encode every non-alphanumeric character of a
    // segment send `vhost%2Dlimits`, which RabbitMQ routes as `vhost-limits`)
    // and without a trailing slash (RabbitMQ's router ignores it:
    // `/api/connections/` lists the connections).
    Router::new()
        .fallback_service(routes(state))
        .layer(axum::middleware::map_request(normalize_path))
}

/// The request with `%XX` escapes of unreserved characters (RFC 3986:
/// letters, digits, `-`, `.`, `_`, `~`) in its path decoded (escapes of
/// anything else, `%2F` in a vhost name, stay for the path parameters) and
/// its trailing slashes dropped.
async fn normalize_path(mut req: axum::extract::Request) -> axum::extract::Request {
    let uri = req.uri();
    let path = uri.path();
    let trailing_slash = path.starts_with("/api/") && path.ends_with('/');
    if !path.contains('%') && !trailing_slash {
        return req;
    }
    let decoded = normalized_path(path);
    if decoded == path {
        return req;
    }
    let path_and_query = match uri.query() {
        Some(q) => format!("{decoded}?{q}"),
        None => decoded,
    };
    let mut parts = uri.clone().into_parts();
    if let Ok(pq) = path_and_query.parse() {
        parts.path_and_query = Some(pq);
        if let Ok(new) = axum::http::Uri::from_parts(parts) {
            *req.uri_mut() = new;
        }
    }
    req
}

/// [`normalize_path`] on a path.
fn normalized_path(path: &str) -> String {
    let b = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
            if let Some(c) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                    out.push(char::from(c));
                    i += 3;
                    continue;
                }
            }
        }
        out.push(char::from(b[i]));
        i += 1;
    }
    while out.starts_with("/api/") && out.ends_with('/') {
        out.pop();
    }
    out
}

fn routes(state: AdminState) -> Router {
    Router::new()
        .route("/api/overview", get(charts::overview))
        .route("/api/nodes", get(overview::nodes))
        .route("/api/cluster", get(cluster::status))
        .route("/api/cluster/join", axum::routing::post(cluster::join))
        .route(
            "/api/cluster/nodes/:node",
            axum::routing::delete(cluster::forget),
        )
        .route("/api/nodes/:node", get(charts::node))
        .route("/api/nodes/:node/memory", get(overview::node_memory))
        .route(
            "/api/nodes/:node/memory/relative",
            get(overview::node_memory_relative),
        )
        .route("/api/auth", get(overview::auth_settings))
        .route("/api/auth/attempts/:node", get(overview::auth_attempts))
        .route(
            "/api/auth/attempts/:node/source",
            get(overview::auth_attempts_by_source),
        )
        .route("/api/whoami", get(overview::whoami))
        .route("/api/extensions", get(overview::extensions))
        .route(
            "/api/warren/reload-tls",
            axum::routing::post(overview::reload_tls),
        )
        .route("/api/health/checks/alarms", get(overview::alarms))
        .route(
            "/api/health/checks/local-alarms",
            get(overview::local_alarms),
        )
        .route(
            "/api/health/checks/port-listener/:port",
            get(health::port_listener),
        )
        .route(
            "/api/health/checks/protocol-listener/:protocol",
            get(health::protocol_listener),
        )
        .route(
            "/api/health/checks/certificate-expiration/:within/:unit",
            get(health::certificate_expiration),
        )
        .route(
            "/api/health/checks/node-is-quorum-critical",
            get(health::node_is_quorum_critical),
        )
        .route(
            "/api/health/checks/node-is-mirror-sync-critical",
            get(health::node_is_mirror_sync_critical),
        )
        .route(
            "/api/health/checks/virtual-hosts",
            get(health::virtual_hosts),
        )
        .route("/api/healthchecks/node", get(health::legacy_node))
        .route("/api/healthchecks/node/:node", get(health::legacy_node))
        .route("/api/aliveness-test/:vhost", get(overview::aliveness))
        .route("/api/vhosts", get(vhosts::list))
        .route(
            "/api/vhosts/:vhost",
            get(vhosts::show).put(vhosts::put).delete(vhosts::remove),
        )
        .route(
            "/api/vhosts/:vhost/permissions",
            get(users::vhost_permissions),
        )
        .route("/api/users", get(users::list))
        .route(
            "/api/users/without-permissions",
            get(users::without_permissions),
        )
        .route("/api/users/bulk-delete", post(users::bulk_delete))
        .route(
            "/api/users/:name",
            get(users::show).put(users::put).delete(users::remove),
        )
        .route("/api/users/:name/permissions", get(users::user_permissions))
        .route("/api/permissions", get(users::permissions))
        .route(
            "/api/permissions/:vhost/:user",
            get(users::show_permission)
                .put(users::put_permission)
                .delete(users::delete_permission),
        )
        .route("/api/exchanges", get(exchanges::list))
        .route("/api/exchanges/:vhost", get(exchanges::list_vhost))
        .route(
            "/api/exchanges/:vhost/:name",
            get(charts::exchange)
                .put(exchanges::put)
                .delete(exchanges::remove),
        )
        .route(
            "/api/exchanges/:vhost/:name/publish",
            post(exchanges::publish),
        )
        .route("/api/exchanges/:vhost/:name/trace", post(trace::trace))
        .route(
            "/api/exchanges/:vhost/:name/bindings/source",
            get(bindings::exchange_source),
        )
        .route(
            "/api/exchanges/:vhost/:name/bindings/destination",
            get(bindings::exchange_destination),
        )
        .route("/api/queues", get(queues::list))
        // RabbitMQ 4's every-field listing (`detailed_queues_endpoint`):
        // warren's `/api/queues` has every field already.
        .route("/api/queues/detailed", get(queues::list))
        .route("/api/queues/:vhost", get(queues::list_vhost))
        .route(
            "/api/queues/:vhost/:name",
            get(charts::queue).put(queues::put).delete(queues::remove),
        )
        .route("/api/queues/:vhost/:name/contents", delete(queues::purge))
        .route(
            "/api/queues/quorum/:vhost/:name/replicas/add",
            post(quorum::add_member),
        )
        .route(
            "/api/queues/quorum/:vhost/:name/replicas/delete",
            delete(quorum::delete_member),
        )
        .route(
            "/api/queues/quorum/replicas/on/:node/grow",
            post(quorum::grow),
        )
        .route(
            "/api/queues/quorum/replicas/on/:node/shrink",
            delete(quorum::shrink),
        )
        .route("/api/rebalance/queues", post(quorum::rebalance))
        .route("/api/rebalance/queues/", post(quorum::rebalance))
        .route("/api/queues/:vhost/:name/get", post(queues::get_messages))
        .route(
            "/api/queues/:vhost/:name/bindings",
            get(bindings::queue_bindings),
        )
        .route("/api/bindings", get(bindings::list))
        .route("/api/bindings/:vhost", get(bindings::list_vhost))
        .route(
            "/api/bindings/:vhost/e/:src/q/:dst",
            get(bindings::between_queue).post(bindings::create_queue),
        )
        .route(
            "/api/bindings/:vhost/e/:src/q/:dst/:props",
            get(bindings::show_queue).delete(bindings::delete_queue),
        )
        .route(
            "/api/bindings/:vhost/e/:src/e/:dst",
            get(bindings::between_exchange).post(bindings::create_exchange),
        )
        .route(
            "/api/bindings/:vhost/e/:src/e/:dst/:props",
            get(bindings::show_exchange).delete(bindings::delete_exchange),
        )
        .route("/api/connections", get(connections::list))
        .route(
            "/api/connections/:name",
            get(connections::show).delete(connections::close),
        )
        .route(
            "/api/vhosts/:vhost/connections",
            get(connections::list_vhost),
        )
        .route("/api/stream/connections", get(stream::connections))
        .route(
            "/api/stream/connections/:vhost",
            get(stream::connections_vhost),
        )
        .route(
            "/api/stream/connections/:vhost/:name",
            get(stream::connection).delete(stream::close),
        )
        .route(
            "/api/stream/connections/:vhost/:name/publishers",
            get(stream::connection_publishers),
        )
        .route(
            "/api/stream/connections/:vhost/:name/consumers",
            get(stream::connection_consumers),
        )
        .route("/api/stream/publishers", get(stream::publishers))
        .route(
            "/api/stream/publishers/:vhost",
            get(stream::publishers_vhost),
        )
        .route(
            "/api/stream/publishers/:vhost/:stream",
            get(stream::publishers_stream),
        )
        .route("/api/stream/consumers", get(stream::consumers))
        .route("/api/stream/consumers/:vhost", get(stream::consumers_vhost))
        .route("/api/channels", get(connections::channels))
        .route("/api/channels/:name", get(connections::channel))
        .route(
            "/api/connections/username/:user",
            get(connections::list_user).delete(connections::close_user),
        )
        .route(
            "/api/connections/:name/channels",
            get(connections::connection_channels),
        )
        .route(
            "/api/vhosts/:vhost/channels",
            get(connections::channels_vhost),
        )
        .route("/api/consumers", get(connections::consumers))
        .route("/api/consumers/:vhost", get(connections::consumers_vhost))
        .route(
            "/api/definitions",
            get(definitions::export).post(definitions::import),
        )
        // RabbitMQ's older name for the same (still served by 3.x).
        .route(
            "/api/all-configuration",
            get(definitions::export).post(definitions::import),
        )
        .route(
            "/api/definitions/:vhost",
            get(definitions::export_vhost).post(definitions::import_vhost),
        )
        .route("/api/policies", get(policies::list))
        .route("/api/policies/:vhost", get(policies::list_vhost))
        .route(
            "/api/policies/:vhost/:name",
            get(policies::show)
                .put(policies::put)
                .delete(policies::remove),
        )
        .merge(tenancy_routes())
        .merge(shovels::routes())
        .merge(global_parameters::routes())
        .merge(features::routes())
        .route("/metrics", get(metrics::prometheus))
        .merge(ui::routes())
        .fallback(|| async { ApiError::not_found() })
        .layer(axum::middleware::from_fn(no_browser_challenge))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            durable_answers,
        ))
        .with_state(state)
}

/// Topic permissions, vhost and user limits, operator policies.
fn tenancy_routes() -> Router<AdminState> {
    Router::new()
        .route("/api/topic-permissions", get(topic_permissions::list))
        .route(
            "/api/topic-permissions/:vhost",
            get(topic_permissions::list_vhost),
        )
        .route(
            "/api/topic-permissions/:vhost/:user",
            get(topic_permissions::show)
                .put(topic_permissions::put)
                .delete(topic_permissions::remove),
        )
        .route(
            "/api/users/:name/topic-permissions",
            get(topic_permissions::list_user),
        )
        .route(
            "/api/vhosts/:vhost/topic-permissions",
            get(topic_permissions::list_vhost),
        )
        .route("/api/parameters/vhost-limits", get(limits::parameters))
        .route(
            "/api/parameters/vhost-limits/:vhost",
            get(limits::parameters_vhost),
        )
        .route(
            "/api/parameters/vhost-limits/:vhost/:name",
            get(limits::parameter)
                .put(limits::put_parameter)
                .delete(limits::delete_parameter),
        )
        .route("/api/vhost-limits", get(limits::list_vhosts))
        .route("/api/vhost-limits/:vhost", get(limits::show_vhost))
        .route(
            "/api/vhost-limits/:vhost/:name",
            axum::routing::put(limits::put_vhost).delete(limits::delete_vhost),
        )
        .route("/api/user-limits", get(limits::list_users))
        .route("/api/user-limits/:user", get(limits::show_user))
        .route(
            "/api/user-limits/:user/:name",
            axum::routing::put(limits::put_user).delete(limits::delete_user),
        )
        .route("/api/operator-policies", get(policies::list_operator))
        .route(
            "/api/operator-policies/:vhost",
            get(policies::list_operator_vhost),
        )
        .route(
            "/api/operator-policies/:vhost/:name",
            get(policies::show_operator)
                .put(policies::put_operator)
                .delete(policies::remove_operator),
        )
}

/// A request that wrote durable topology (a vhost, user, permission, queue,
/// exchange, binding, policy, limit, parameter, definitions) is answered once
/// the store has flushed the write, so what the API said it did survives a
/// crash, as RabbitMQ answers after writing its metadata store. A flush that
/// fails turns the answer into a 500: the change may be gone after a
/// restart. (Other requests' writes made meanwhile can make one wait for a
/// flush it did not need, no more.)
async fn durable_answers(
    axum::extract::State(s): axum::extract::State<AdminState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let store = match &s.broker.store {
        Some(store)
            if !matches!(
                *req.method(),
                axum::http::Method::GET | axum::http::Method::HEAD
            ) =>
        {
            store.clone()
        }
        _ => return next.run(req).await,
    };
    let before = store.topology_writes();
    let res = next.run(req).await;
    if store.topology_writes() != before {
        if let Err(e) = store.sync().await {
            tracing::error!(error = %e, "cannot store an admin API change");
            return ApiError::from(AmqpError::internal_error(format!(
                "cannot store the change: {e}"
            )))
            .into_response();
        }
    }
    res
}

/// Requests marked `X-Requested-With: XMLHttpRequest` (the web UI's) get their 401s
/// without `WWW-Authenticate`, so browsers show the UI's own login form instead of
/// a native password prompt; `X-Warren-Login: failed` tells the UI such a 401 was
/// a failed login (not a refusal of a logged-in user's request).
async fn no_browser_challenge(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let from_script = req
        .headers()
        .get("x-requested-with")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"XMLHttpRequest"));
    let mut res = next.run(req).await;
    if from_script && res.headers_mut().remove(header::WWW_AUTHENTICATE).is_some() {
        res.headers_mut().insert(
            header::HeaderName::from_static("x-warren-login"),
            header::HeaderValue::from_static("failed"),
        );
    }
    res
}

/// The admin API's HTTPS listener: where, with which TLS configuration, and
/// how long a handshake may take.
pub struct Https {
    pub addr: String,
    pub tls: Arc<crate::tls::ServerTls>,
    pub handshake_timeout: std::time::Duration,
}

/// Where the admin API listens.
#[derive(Debug, Clone, Copy, Default)]
pub struct Addrs {
    pub http: Option<SocketAddr>,
    pub https: Option<SocketAddr>,
}

/// Bind the admin listeners (plain HTTP on `http`, HTTPS on `https`) and serve
/// them in the background; returns their addresses.
pub async fn start(
    http: Option<&str>,
    https: Option<Https>,
    state: AdminState,
    sample_every: std::time::Duration,
) -> std::io::Result<Addrs> {
    let plain = match http {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await?),
        None => None,
    };
    let secure = match https {
        Some(h) => Some((tokio::net::TcpListener::bind(&h.addr).await?, h)),
        None => None,
    };
    let mut addrs = Addrs::default();
    metrics::spawn_sampler(
        Arc::downgrade(&state.broker),
        Arc::clone(&state.rates),
        sample_every,
    );
    charts::spawn_sampler(
        Arc::downgrade(&state.broker),
        Arc::clone(&state.history),
        state.data_dir.clone(),
        sample_every,
    );
    cluster::serve_stats(&state);
    let app = router(state);
    if let Some((listener, h)) = secure {
        addrs.https = Some(listener.local_addr()?);
        tokio::spawn(https::serve(
            listener,
            h.tls,
            app.clone(),
            h.handshake_timeout,
        ));
    }
    if let Some(listener) = plain {
        addrs.http = Some(listener.local_addr()?);
        tokio::spawn(async move {
            let service = app.into_make_service_with_connect_info::<SocketAddr>();
            if let Err(e) = axum::serve(listener, service).await {
                tracing::error!(error = %e, "admin listener stopped");
            }
        });
    }
    Ok(addrs)
}

/// Bind the Prometheus listener on `addr` and serve
/// [`metrics::prometheus_routes`] in the background; returns its address.
pub async fn start_prometheus(addr: &str, state: AdminState) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let app = metrics::prometheus_routes(state);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "prometheus listener stopped");
        }
    });
    Ok(local)
}

/// A field table as RabbitMQ renders arguments and headers in JSON.
pub fn table_to_json(t: &FieldTable) -> Value {
    Value::Object(
        t.iter()
            .map(|(k, v)| (k.to_string(), value_to_json(v)))
            .collect(),
    )
}

pub fn value_to_json(v: &FieldValue) -> Value {
    match v {
        FieldValue::Bool(b) => json!(b),
        FieldValue::F32(f) => json!(f),
        FieldValue::F64(f) => json!(f),
        FieldValue::Decimal(scale, n) => json!(f64::from(*n) / 10f64.powi(i32::from(*scale))),
        FieldValue::LongString(b) | FieldValue::ByteArray(b) => match std::str::from_utf8(b) {
            Ok(s) => json!(s),
            Err(_) => json!(base64::engine::general_purpose::STANDARD.encode(b)),
        },
        FieldValue::Array(a) => Value::Array(a.iter().map(value_to_json).collect()),
        FieldValue::Table(t) => table_to_json(t),
        FieldValue::Void => Value::Null,
        other => other.as_i64().map(|i| json!(i)).unwrap_or(Value::Null),
    }
}

/// JSON arguments (`{"x-message-ttl": 1000}`) as a field table.
pub fn json_to_table(v: &Value) -> ApiResult<FieldTable> {
    match v {
        Value::Null => Ok(FieldTable::new()),
        Value::Object(m) => Ok(FieldTable(
            m.iter()
                .map(|(k, v)| (k.clone(), json_to_value(v)))
                .collect(),
        )),
        _ => Err(ApiError::bad_request("arguments must be an object")),
    }
}

pub fn json_to_value(v: &Value) -> FieldValue {
    match v {
        Value::Null => FieldValue::Void,
        Value::Bool(b) => FieldValue::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => FieldValue::I64(i),
            None => FieldValue::F64(n.as_f64().unwrap_or(0.0)),
        },
        Value::String(s) => FieldValue::string(s.clone()),
        Value::Array(a) => FieldValue::Array(a.iter().map(json_to_value).collect()),
        Value::Object(m) => FieldValue::Table(FieldTable(
            m.iter()
                .map(|(k, v)| (k.clone(), json_to_value(v)))
                .collect(),
        )),
    }
}

/// A boolean field of a request body, with a default.
pub fn flag(body: &Value, key: &str, default: bool) -> ApiResult<bool> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(Value::String(s)) if s == "true" => Ok(true),
        Some(Value::String(s)) if s == "false" => Ok(false),
        Some(_) => Err(ApiError::bad_request(format!("{key} must be a boolean"))),
    }
}

/// A string field of a request body, with a default.
pub fn text<'a>(body: &'a Value, key: &str, default: &'a str) -> ApiResult<&'a str> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(ApiError::bad_request(format!("{key} must be a string"))),
    }
}

/// `{"rate": r}` as RabbitMQ's `*_details` objects.
pub fn details(rate: f64) -> Value {
    json!({ "rate": (rate * 10.0).round() / 10.0 })
}

/// Sort API listings by vhost then name, as RabbitMQ does.
pub fn sort_by_vhost_name(items: &mut [Value]) {
    items.sort_by(|a, b| {
        let key = |v: &Value| {
            (
                v.get("vhost")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
                v.get("name")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string(),
            )
        };
        key(a).cmp(&key(b))
    });
}

/// The node name reported by the API (`warren@hostname`).
pub fn node_name() -> String {
    format!("warren@{}", crate::config::host_name())
}

/// The answer to a PUT, as RabbitMQ gives it: 201 when it created the object, 204 when
/// it updated an existing one.
pub(crate) fn put_status(created: bool) -> StatusCode {
    if created {
        StatusCode::CREATED
    } else {
        StatusCode::NO_CONTENT
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::persist::failpoint;

    #[test]
    fn paths_are_normalized_before_routing() {
        assert_eq!(
            normalized_path("/api/parameters/vhost%2Dlimits/a%2Fb/limits"),
            "/api/parameters/vhost-limits/a%2Fb/limits"
        );
        assert_eq!(normalized_path("/api/x%5Fy%7E%2e"), "/api/x_y~.");
        // Reserved or broken escapes stay as they are.
        assert_eq!(normalized_path("/a%20b%2"), "/a%20b%2");
        assert_eq!(normalized_path("/a%zzb%"), "/a%zzb%");
        assert_eq!(normalized_path("/api/connections/"), "/api/connections");
        assert_eq!(normalized_path("/api/queues/%2F//"), "/api/queues/%2F");
        assert_eq!(normalized_path("/api/"), "/api");
        assert_eq!(normalized_path("/"), "/");
    }

    #[test]
    fn amqp_errors_map_to_rabbitmq_statuses() {
        let status = |e: AmqpError| ApiError::from(e).status;
        assert_eq!(
            status(AmqpError::precondition_failed("limit")),
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            status(AmqpError::internal_error("store")),
            StatusCode::INTERNAL_SERVER_ERROR
        );
        assert_eq!(status(AmqpError::not_found("q")), StatusCode::NOT_FOUND);
    }

    /// With the store refusing topology writes, a durable declare fails on
    /// every door: 500 from the admin API, connection.close 541 over AMQP; and
    /// nothing is created.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn failed_durable_write_is_500_and_541() {
        let dir = std::env::temp_dir().join(format!("warren-admin-541-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut config = crate::Config::for_tests(&dir);
        config.admin_enabled = true;
        let w = crate::start(config).await.expect("broker starts");
        let admin = w.admin_addr().expect("admin enabled");
        failpoint::set(&dir, true);

        let url = format!("http://{admin}/api/queues/%2f/durable-q");
        let (status, body) = tokio::task::spawn_blocking(move || {
            let auth = base64::engine::general_purpose::STANDARD.encode("guest:guest");
            let resp = ureq::put(&url)
                .set("Authorization", &format!("Basic {auth}"))
                .send_json(json!({"durable": true}));
            match resp {
                Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
                Err(ureq::Error::Status(s, r)) => (s, r.into_string().unwrap_or_default()),
                Err(e) => (0, e.to_string()),
            }
        })
        .await
        .expect("http");
        assert_eq!(status, 500, "{body}");
        assert!(body.contains("INTERNAL_ERROR"), "{body}");

        let uri = format!("amqp://guest:guest@{}/%2f", w.amqp_addr());
        let conn = lapin::Connection::connect(&uri, lapin::ConnectionProperties::default())
            .await
            .expect("connect");
        let ch = conn.create_channel().await.expect("channel");
        let e = ch
            .queue_declare(
                "durable-q",
                lapin::options::QueueDeclareOptions {
                    durable: true,
                    ..Default::default()
                },
                lapin::types::FieldTable::default(),
            )
            .await
            .expect_err("declare with a failing store");
        match &e {
            lapin::Error::ProtocolError(p) => assert_eq!(p.get_id(), 541, "{e:?}"),
            other => panic!("expected 541, got {other:?}"),
        }
        failpoint::set(&dir, false);
        let vhost = w.server.broker.vhost("/").expect("default vhost");
        assert!(vhost.queue("durable-q", 0).is_err(), "nothing was created");
    }
}
