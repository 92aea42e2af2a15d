//! `/api/users[/{name}]` and `/api/permissions[/{vhost}/{user}]`: users with
//! salted SHA-256 password hashes and tags, and per-vhost permission regexes.

use super::{AdminState, ApiError, ApiResult, Body, Caller};
use crate::broker::auth::{self, Permission, User, HASHING_ALGORITHM};
use crate::broker::Broker;
use crate::cluster::Command;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

pub fn user_json(u: &User) -> Value {
    json!({
        "name": u.name,
        "password_hash": u.password_hash,
        "hashing_algorithm": auth::hash_algorithm(&u.password_hash).unwrap_or(HASHING_ALGORITHM),
        "tags": u.tags_list(),
        "limits": {},
    })
}

/// [`user_json`] with the user's limits filled in.
pub fn user_json_with_limits(b: &Broker, u: &User) -> Value {
    let mut j = user_json(u);
    j["limits"] = Value::Object(
        b.auth
            .user_limits(&u.name)
            .into_iter()
            .map(|(k, v)| (k, json!(v)))
            .collect(),
    );
    j
}

pub fn permission_json(vhost: &str, user: &str, p: &Permission) -> Value {
    json!({
        "user": user,
        "vhost": vhost,
        "configure": p.configure,
        "write": p.write,
        "read": p.read,
    })
}

/// `tags` as RabbitMQ accepts it: a comma-separated string or a list.
pub fn parse_tags(v: Option<&Value>) -> ApiResult<Vec<String>> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(s
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(String::from)
            .collect()),
        Some(Value::Array(a)) => a
            .iter()
            .map(|t| {
                t.as_str()
                    .map(String::from)
                    .ok_or_else(|| ApiError::bad_request("tags must be strings"))
            })
            .collect(),
        Some(_) => Err(ApiError::bad_request("tags must be a string or a list")),
    }
}

/// Create or update a user from an API / definitions body.
pub fn put_user_from(b: &Broker, name: &str, body: &Value) -> ApiResult<bool> {
    let existing = b.auth.user(name);
    // RabbitMQ requires `tags` (or its older `administrator` flag).
    let tags = match (
        body.get("tags").filter(|t| !t.is_null()),
        body.get("administrator").filter(|a| !a.is_null()),
    ) {
        (Some(t), _) => parse_tags(Some(t))?,
        (None, Some(a)) => match a
            .as_bool()
            .or_else(|| a.as_str().and_then(|a| a.parse().ok()))
        {
            Some(true) => vec!["administrator".to_string()],
            Some(false) => Vec::new(),
            None => return Err(ApiError::bad_request("administrator must be true or false")),
        },
        (None, None) => return Err(ApiError::bad_request("tags_not_present")),
    };
    if body.get("password").is_some() && body.get("password_hash").is_some() {
        return Err(ApiError::bad_request(
            "both_password_and_password_hash_are_provided",
        ));
    }
    let hash = if let Some(pw) = body.get("password") {
        let pw = pw
            .as_str()
            .ok_or_else(|| ApiError::bad_request("password must be a string"))?;
        auth::hash_password(pw)
    } else if let Some(h) = body.get("password_hash") {
        let h = h
            .as_str()
            .ok_or_else(|| ApiError::bad_request("password_hash must be a string"))?;
        // A hash's length tells its algorithm (SHA-256 or SHA-512); a
        // `hashing_algorithm` given must be one of them and agree.
        if !auth::valid_hash(h) {
            return Err(ApiError::bad_request("invalid password_hash"));
        }
        if let Some(algo) = body.get("hashing_algorithm").filter(|v| !v.is_null()) {
            let algo = algo
                .as_str()
                .ok_or_else(|| ApiError::bad_request("hashing_algorithm must be a string"))?;
            if algo != HASHING_ALGORITHM && algo != auth::HASHING_ALGORITHM_SHA512 {
                return Err(ApiError::bad_request(format!(
                    "unsupported hashing_algorithm '{algo}'"
                )));
            }
            if !h.is_empty() && auth::hash_algorithm(h) != Some(algo) {
                return Err(ApiError::bad_request(format!(
                    "password_hash is not a {algo} hash"
                )));
            }
        }
        h.to_string()
    } else {
        // Neither: as RabbitMQ, a user that cannot log in with a password
        // (certificates, tokens), and an existing user's password is cleared.
        String::new()
    };
    b.auth.put_user(User {
        name: name.to_string(),
        password_hash: hash,
        tags,
        loopback_only: existing.as_ref().is_some_and(|u| u.loopback_only),
    });
    Ok(existing.is_none())
}

/// `/api/users`, with the listing parameters (`page`, `page_size`, `name`,
/// `use_regex`, `sort`, `sort_reverse`), as the other listings.
pub async fn list(
    State(s): State<AdminState>,
    caller: Caller,
    Query(params): Query<std::collections::HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    caller.require_admin()?;
    let b = &s.broker;
    let users = b
        .auth
        .users()
        .iter()
        .map(|u| user_json_with_limits(b, u))
        .collect();
    super::queues::paged(users, &params).map(Json)
}

pub async fn show(
    State(s): State<AdminState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<Json<Value>> {
    caller.require_admin()?;
    let u = s.broker.auth.user(&name).ok_or_else(ApiError::not_found)?;
    Ok(Json(user_json_with_limits(&s.broker, &u)))
}

pub async fn put(
    State(s): State<AdminState>,
    caller: Caller,
    Path(name): Path<String>,
    Body(body): Body,
) -> ApiResult<StatusCode> {
    caller.require_admin()?;
    let created = put_user_from(&s.broker, &name, &body)?;
    super::cluster::replicate(&s, || user_cmd(&s.broker, &name)).await?;
    Ok(super::put_status(created))
}

/// The command that replicates user `name` as this node now has it (the
/// password hash, never the password).
pub fn user_cmd(b: &Broker, name: &str) -> Option<Command> {
    b.auth.user(name).map(|u| Command::PutUser {
        name: u.name,
        password_hash: u.password_hash,
        tags: u.tags,
    })
}

/// The command that replicates `user`'s permissions in `vhost` as this node
/// now has them.
pub fn permission_cmd(b: &Broker, vhost: &str, user: &str) -> Option<Command> {
    b.auth
        .permission(vhost, user)
        .map(|p| Command::SetPermission {
            vhost: vhost.to_string(),
            user: user.to_string(),
            configure: p.configure,
            write: p.write,
            read: p.read,
        })
}

pub async fn remove(
    State(s): State<AdminState>,
    caller: Caller,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    caller.require_admin()?;
    if s.broker.auth.delete_user(&name) {
        super::cluster::replicate(&s, || Some(Command::DeleteUser { name })).await?;
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found())
    }
}

/// `GET /api/users/without-permissions`: users with no permissions in any
/// vhost.
pub async fn without_permissions(
    State(s): State<AdminState>,
    caller: Caller,
) -> ApiResult<Json<Value>> {
    caller.require_admin()?;
    let b = &s.broker;
    let with: std::collections::HashSet<String> = b
        .auth
        .permissions()
        .into_iter()
        .map(|(_, u, _)| u)
        .collect();
    Ok(Json(Value::Array(
        b.auth
            .users()
            .iter()
            .filter(|u| !with.contains(&u.name))
            .map(|u| user_json_with_limits(b, u))
            .collect(),
    )))
}

/// `POST /api/users/bulk-delete` with `{"users": [...]}`: delete each that
/// exists (the others are skipped, as RabbitMQ does).
pub async fn bulk_delete(
    State(s): State<AdminState>,
    caller: Caller,
    Body(body): Body,
) -> ApiResult<StatusCode> {
    caller.require_admin()?;
    let names: Vec<String> = match body.get("users") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|n| n.as_str().map(String::from))
            .collect::<Option<_>>()
            .ok_or_else(|| ApiError::bad_request("users must be a list of names"))?,
        _ => return Err(ApiError::bad_request("users must be a list of names")),
    };
    for name in names {
        if s.broker.auth.delete_user(&name) {
            super::cluster::replicate(&s, || Some(Command::DeleteUser { name })).await?;
        }
    }
    Ok(StatusCode::NO_CONTENT)
}

fn permissions_where(b: &Broker, keep: impl Fn(&str, &str) -> bool) -> Json<Value> {
    Json(Value::Array(
        b.auth
            .permissions()
            .iter()
            .filter(|(v, u, _)| keep(v, u))
            .map(|(v, u, p)| permission_json(v, u, p))
            .collect(),
    ))
}

pub async fn permissions(State(s): State<AdminState>, caller: Caller) -> ApiResult<Json<Value>> {
    caller.require_admin()?;
    Ok(permissions_where(&s.broker, |_, _| true))
}

pub async fn vhost_permissions(
    State(s): State<AdminState>,
    caller: Caller,
    Path(vhost): Path<String>,
) -> ApiResult<Json<Value>> {
    caller.require_admin()?;
    s.broker.vhost(&vhost).ok_or_else(ApiError::not_found)?;
    Ok(permissions_where(&s.broker, |v, _| v == vhost))
}

pub async fn user_permissions(
    State(s): State<AdminState>,
    caller: Caller,
    Path(user): Path<String>,
) -> ApiResult<Json<Value>> {
    caller.require_admin()?;
    s.broker.auth.user(&user).ok_or_else(ApiError::not_found)?;
    Ok(permissions_where(&s.broker, |_, u| u == user))
}

pub async fn show_permission(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, user)): Path<(String, String)>,
) -> ApiResult<Json<Value>> {
    caller.require_admin()?;
    let p = s
        .broker
        .auth
        .permission(&vhost, &user)
        .ok_or_else(ApiError::not_found)?;
    Ok(Json(permission_json(&vhost, &user, &p)))
}

/// Set permissions from an API / definitions body.
pub fn put_permission_from(b: &Broker, vhost: &str, user: &str, body: &Value) -> ApiResult<bool> {
    if b.vhost(vhost).is_none() {
        return Err(ApiError::bad_request(format!("vhost_not_found: {vhost}")));
    }
    if b.auth.user(user).is_none() {
        return Err(ApiError::bad_request(format!("user_not_found: {user}")));
    }
    let field = |k: &str| {
        body.get(k)
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::bad_request(format!("{k} must be set (a regex)")))
    };
    let p = Permission::new(field("configure")?, field("write")?, field("read")?)
        .map_err(ApiError::bad_request)?;
    let created = b.auth.permission(vhost, user).is_none();
    b.auth.set_permission(vhost, user, p);
    Ok(created)
}

pub async fn put_permission(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, user)): Path<(String, String)>,
    Body(body): Body,
) -> ApiResult<StatusCode> {
    caller.require_admin()?;
    let created = put_permission_from(&s.broker, &vhost, &user, &body)?;
    super::cluster::replicate(&s, || permission_cmd(&s.broker, &vhost, &user)).await?;
    Ok(super::put_status(created))
}

pub async fn delete_permission(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, user)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    caller.require_admin()?;
    if s.broker.auth.clear_permission(&vhost, &user) {
        super::cluster::replicate(&s, || Some(Command::ClearPermission { vhost, user })).await?;
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found())
    }
}
