//! `/api/topic-permissions[/{vhost}[/{user}]]`, `/api/users/{user}/topic-permissions`
//! and `/api/vhosts/{vhost}/topic-permissions`: per user, vhost and exchange
//! write / read regexes on routing keys, as RabbitMQ's management API has them.

use super::{AdminState, ApiError, ApiResult, Body, Caller};
use crate::broker::auth::{Access, TopicPermission};
use crate::broker::exchange::ExchangeKind;
use crate::broker::Broker;
use crate::cluster::Command;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};
use std::collections::HashMap;

pub fn topic_permission_json(vhost: &str, user: &str, p: &TopicPermission) -> Value {
    json!({
        "user": user,
        "vhost": vhost,
        "exchange": p.exchange,
        "write": p.write,
        "read": p.read,
    })
}

fn rows(b: &Broker, keep: impl Fn(&str, &str) -> bool) -> Json<Value> {
    Json(Value::Array(
        b.auth
            .topic_permissions()
            .iter()
            .filter(|(v, u, _)| keep(v, u))
            .map(|(v, u, p)| topic_permission_json(v, u, p))
            .collect(),
    ))
}

pub async fn list(State(s): State<AdminState>, caller: Caller) -> ApiResult<Json<Value>> {
    caller.require_admin()?;
    Ok(rows(&s.broker, |_, _| true))
}

pub async fn list_vhost(
    State(s): State<AdminState>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult<Json<Value>> {
    caller.require_admin()?;
    s.broker.vhost(&vhost).ok_or_else(ApiError::not_found)?;
    Ok(rows(&s.broker, |v, _| v == vhost))
}

pub async fn list_user(
    State(s): State<AdminState>,
    caller: Caller,
    Path(user): Path<String>,
) -> ApiResult<Json<Value>> {
    caller.require_admin()?;
    s.broker.auth.user(&user).ok_or_else(ApiError::not_found)?;
    Ok(rows(&s.broker, |_, u| u == user))
}

pub async fn show(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, user)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    caller.require_admin()?;
    s.broker.vhost(&vhost).ok_or_else(ApiError::not_found)?;
    s.broker.auth.user(&user).ok_or_else(ApiError::not_found)?;
    let Json(list) = rows(&s.broker, |v, u| v == vhost && u == user);
    if list.as_array().is_some_and(Vec::is_empty) {
        return Err(ApiError::not_found());
    }
    Ok(Json(list))
}

/// Set a topic permission from an API / definitions body (`exchange`, `write`,
/// `read`); true if it is new.
pub fn put_from(b: &Broker, vhost: &str, user: &str, body: &Value) -> ApiResult<bool> {
    if b.vhost(vhost).is_none() {
        return Err(ApiError::bad_request(format!("vhost_not_found: {vhost}")));
    }
    if b.auth.user(user).is_none() {
        return Err(ApiError::bad_request(format!("user_not_found: {user}")));
    }
    let field = |k: &str| {
        body.get(k)
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::bad_request(format!("{k} must be set")))
    };
    let p = TopicPermission::new(
        vhost,
        user,
        field("exchange")?,
        field("write")?,
        field("read")?,
    )
    .map_err(ApiError::bad_request)?;
    Ok(b.auth.set_topic_permission(vhost, user, p))
}

pub async fn put(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, user)): Path<(String, String)>,
    Body(body): Body,
) -> ApiResult<StatusCode> {
    caller.require_admin()?;
    let created = put_from(&s.broker, &vhost, &user, &body)?;
    let exchange = body.get("exchange").and_then(Value::as_str).unwrap_or("");
    super::cluster::replicate(&s, || topic_cmd(&s.broker, &vhost, &user, exchange)).await?;
    Ok(super::put_status(created))
}

/// The command that replicates `user`'s topic permission on `exchange` in
/// `vhost` as this node now has it.
pub fn topic_cmd(b: &Broker, vhost: &str, user: &str, exchange: &str) -> Option<Command> {
    b.auth
        .topic_permissions()
        .into_iter()
        .find(|(v, u, p)| v == vhost && u == user && p.exchange == exchange)
        .map(|(vhost, user, p)| Command::SetTopicPermission {
            vhost,
            user,
            exchange: p.exchange,
            write: p.write,
            read: p.read,
        })
}

/// Clear the user's topic permissions in the vhost (only on `?exchange=` when given).
pub async fn remove(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, user)): Path<(String, String)>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<StatusCode> {
    caller.require_admin()?;
    let exchange = params.get("exchange").map(String::as_str);
    if s.broker
        .auth
        .clear_topic_permission(&vhost, &user, exchange)
    {
        let exchange = exchange.map(String::from);
        let cmd = Command::ClearTopicPermission {
            vhost,
            user,
            exchange,
        };
        super::cluster::replicate(&s, || Some(cmd)).await?;
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found())
    }
}

/// The AMQP side's topic check for the API's publish and bind / unbind acting
/// as `user`: on a topic exchange, each key must match the user's topic
/// permission there, if any (a refusal with RabbitMQ's text). There is no client id
/// over HTTP.
pub fn permit_topic(
    b: &Broker,
    vhost: &str,
    user: &str,
    access: Access,
    exchange: &str,
    keys: &[&str],
) -> ApiResult<()> {
    if !b.auth.has_topic_permissions() || exchange.is_empty() {
        return Ok(());
    }
    let topic = b
        .vhost(vhost)
        .and_then(|v| v.exchange(exchange).ok())
        .is_some_and(|x| x.kind == ExchangeKind::Topic && !x.delayed);
    if !topic {
        return Ok(());
    }
    for key in keys {
        if !b
            .auth
            .topic_allows(vhost, user, exchange, access, key, &|| None)
        {
            let what = if access == Access::Read {
                "read"
            } else {
                "write"
            };
            return Err(ApiError::refused(format!(
                "{what} access to topic '{key}' in exchange '{exchange}' in vhost '{vhost}' refused for user '{user}'"
            )));
        }
    }
    Ok(())
}
