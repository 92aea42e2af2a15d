//! `/api/definitions[/{vhost}]`: export and import of users (with their limits), vhosts,
//! permissions, topic permissions, vhost limits and shovels (`parameters` of
//! components `vhost-limits` and `shovel`), global parameters, policies, exchanges, queues
//! and bindings in RabbitMQ's definitions JSON format.

use super::policies::Kind;
use super::{AdminState, ApiError, ApiResult, Body, Caller};
use crate::cluster::Command;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use std::collections::HashMap;

/// `GET /api/definitions`: everything, as RabbitMQ exports it
/// (`?download=<file>` names the attachment, as the UI's download link).
pub async fn export(
    State(s): State<AdminState>,
    caller: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    caller.require_admin()?;
    let b = &s.broker;
    let users: Vec<Value> = b
        .auth
        .users()
        .iter()
        .map(|u| super::users::user_json_with_limits(b, u))
        .collect();
    let mut vhosts: Vec<Value> = b
        .vhosts()
        .iter()
        .map(|v| json!({"name": &*v.name, "metadata": super::vhosts::metadata_json(&v.meta())}))
        .collect();
    super::sort_by_vhost_name(&mut vhosts);
    let permissions: Vec<Value> = b
        .auth
        .permissions()
        .iter()
        .map(|(v, u, p)| super::users::permission_json(v, u, p))
        .collect();
    let topic_permissions: Vec<Value> = b
        .auth
        .topic_permissions()
        .iter()
        .map(|(v, u, p)| super::topic_permissions::topic_permission_json(v, u, p))
        .collect();
    let t = topology(&s, None);
    let doc = json!({
        "rabbit_version": super::overview::RABBITMQ_VERSION,
        "rabbitmq_version": super::overview::RABBITMQ_VERSION,
        "product_name": "warren",
        "product_version": super::overview::VERSION,
        "users": users,
        "vhosts": vhosts,
        "permissions": permissions,
        "topic_permissions": topic_permissions,
        "parameters": t.parameters,
        "global_parameters": b
            .global
            .list()
            .into_iter()
            .map(|(name, value)| json!({"name": name, "value": value}))
            .collect::<Vec<_>>(),
        "policies": t.policies,
        "queues": t.queues,
        "exchanges": t.exchanges,
        "bindings": t.bindings,
    });
    Ok(download(doc, &q))
}

/// `GET /api/definitions/{vhost}`: one vhost's parameters, policies,
/// queues, exchanges and bindings, the last three without their `vhost`
/// fields (as RabbitMQ 3.10 exports a vhost, to import into another).
pub async fn export_vhost(
    State(s): State<AdminState>,
    caller: Caller,
    Path(vhost): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    caller.require_admin()?;
    if s.broker.vhost(&vhost).is_none() {
        // RabbitMQ's answer for a vhost that is not there.
        return Err(ApiError::bad_request("vhost_not_found"));
    }
    let t = topology(&s, Some(&vhost));
    let strip = |items: Vec<Value>| -> Vec<Value> {
        items
            .into_iter()
            .map(|mut i| {
                if let Some(o) = i.as_object_mut() {
                    o.remove("vhost");
                }
                i
            })
            .collect()
    };
    let doc = json!({
        "rabbit_version": super::overview::RABBITMQ_VERSION,
        "rabbitmq_version": super::overview::RABBITMQ_VERSION,
        "product_name": "warren",
        "product_version": super::overview::VERSION,
        "parameters": t.parameters,
        "policies": t.policies,
        "queues": strip(t.queues),
        "exchanges": strip(t.exchanges),
        "bindings": strip(t.bindings),
    });
    Ok(download(doc, &q))
}

/// The JSON, as an attachment named by `?download=` when there is one.
fn download(doc: Value, q: &HashMap<String, String>) -> Response {
    let mut r = Json(doc).into_response();
    if let Some(name) = q.get("download").filter(|n| !n.is_empty()) {
        let name: String = name
            .chars()
            .filter(|c| !c.is_control() && *c != '"' && *c != '\\')
            .collect();
        if let Ok(v) = format!("attachment; filename=\"{name}\"").parse() {
            r.headers_mut().insert(header::CONTENT_DISPOSITION, v);
        }
    }
    r
}

/// The exported topology of every vhost, or of `only`.
struct Topology {
    parameters: Vec<Value>,
    policies: Vec<Value>,
    queues: Vec<Value>,
    exchanges: Vec<Value>,
    bindings: Vec<Value>,
}

fn topology(s: &AdminState, only: Option<&str>) -> Topology {
    let b = &s.broker;
    let (mut exchanges, mut queues, mut bindings, mut policies) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for v in b.vhosts() {
        if only.is_some_and(|o| o != &*v.name) {
            continue;
        }
        policies.extend(v.policies.list().iter().map(super::policies::policy_json));
        for e in v.exchanges() {
            if e.name.is_empty() || e.name.starts_with("amq.") {
                continue;
            }
            let mut j = super::exchanges::exchange_json(&v.name, &e);
            if let Some(o) = j.as_object_mut() {
                o.remove("user_who_performed_action");
            }
            exchanges.push(j);
        }
        for q in v.queues() {
            if q.spec.exclusive_owner.is_some() {
                continue;
            }
            queues.push(json!({
                "name": q.name(),
                "vhost": &*v.name,
                "durable": q.spec.durable,
                "auto_delete": q.spec.auto_delete,
                "arguments": super::table_to_json(&q.spec.arguments),
            }));
        }
        for (source, binding) in v.bindings() {
            if source.is_empty() {
                continue;
            }
            let mut j = super::bindings::binding_json(&v.name, &source, &binding);
            if let Some(o) = j.as_object_mut() {
                o.remove("properties_key");
            }
            bindings.push(j);
        }
    }
    super::sort_by_vhost_name(&mut exchanges);
    super::sort_by_vhost_name(&mut queues);
    let mut parameters = super::limits::vhost_limit_parameters(b, |v| only.is_none_or(|o| o == v));
    parameters.extend(s.shovels.parameters(only));
    Topology {
        parameters,
        policies,
        queues,
        exchanges,
        bindings,
    }
}

fn items<'a>(body: &'a Value, key: &str) -> ApiResult<&'a [Value]> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(a)) => Ok(a),
        Some(_) => Err(ApiError::bad_request(format!("{key} must be a list"))),
    }
}

fn field<'a>(item: &'a Value, key: &str) -> ApiResult<&'a str> {
    item.get(key)
        .and_then(Value::as_str)
        .ok_or_else(|| ApiError::bad_request(format!("{key} missing in {item}")))
}

/// Apply a definitions document: vhosts and users first, then permissions, topic
/// permissions, vhost limits, global parameters and policies, then exchanges,
/// queues and bindings
/// (RabbitMQ's order). Pushes onto `cmds` the commands that replicate what
/// was imported, in that order (shovels, which run on the node that has them,
/// excepted), also for the part imported before an error.
pub fn import_definitions(s: &AdminState, body: &Value, cmds: &mut Vec<Command>) -> ApiResult<()> {
    let b = &s.broker;
    for v in items(body, "vhosts")? {
        let name = field(v, "name")?;
        // An entry without metadata (RabbitMQ 3.10 exports none) leaves an
        // existing vhost's as it is.
        let given = ["description", "tags", "default_queue_type", "metadata"]
            .iter()
            .any(|k| v.get(k).is_some_and(|x| !x.is_null()));
        let meta = given
            .then(|| super::vhosts::meta_from(v, b.vhost(name).map(|v| v.meta())))
            .transpose()?;
        b.add_vhost(name);
        if let Some(meta) = &meta {
            b.set_vhost_meta(name, meta.clone())?;
        }
        cmds.push(Command::PutVhost {
            name: name.to_string(),
            creator: None,
            meta,
        });
    }
    for u in items(body, "users")? {
        let name = field(u, "name")?;
        super::users::put_user_from(b, name, u)?;
        cmds.extend(super::users::user_cmd(b, name));
        cmds.extend(super::limits::import_user_limits(b, name, u)?);
    }
    for p in items(body, "permissions")? {
        let (vhost, user) = (field(p, "vhost")?, field(p, "user")?);
        super::users::put_permission_from(b, vhost, user, p)?;
        cmds.extend(super::users::permission_cmd(b, vhost, user));
    }
    for p in items(body, "topic_permissions")? {
        let (vhost, user) = (field(p, "vhost")?, field(p, "user")?);
        super::topic_permissions::put_from(b, vhost, user, p)?;
        let exchange = field(p, "exchange")?;
        cmds.extend(super::topic_permissions::topic_cmd(
            b, vhost, user, exchange,
        ));
    }
    for p in items(body, "parameters")? {
        if p.get("component").and_then(Value::as_str) == Some(crate::shovel::COMPONENT) {
            let (vhost, name) = (field(p, "vhost")?, field(p, "name")?);
            super::shovels::put_from(s, vhost, name, p)?;
            cmds.extend(super::shovels::shovel_cmd(s, vhost, name));
            continue;
        }
        cmds.extend(super::limits::import_parameter(b, p)?);
    }
    for p in items(body, "global_parameters")? {
        let name = field(p, "name")?;
        let value = p.get("value").cloned().unwrap_or(Value::Null);
        b.global
            .put(name, value)
            .map_err(super::global_parameters::stored)?;
        cmds.extend(super::global_parameters::global_cmd(b, name));
    }
    for p in items(body, "policies")? {
        let (vhost, name) = (field(p, "vhost")?, field(p, "name")?);
        super::policies::put_from(s, vhost, name, p)?;
        cmds.extend(super::policies::policy_cmd(s, vhost, name, Kind::User));
    }
    for e in items(body, "exchanges")? {
        let (vhost, name) = (field(e, "vhost")?, field(e, "name")?);
        cmds.push(super::exchanges::declare_from(s, vhost, name, e)?.1);
    }
    for q in items(body, "queues")? {
        let (vhost, name) = (field(q, "vhost")?, field(q, "name")?);
        cmds.extend(super::queues::declare_from(s, vhost, name, q)?.1);
    }
    for bd in items(body, "bindings")? {
        let queue = match field(bd, "destination_type")? {
            "queue" => true,
            "exchange" => false,
            other => {
                return Err(ApiError::bad_request(format!(
                    "bad destination_type '{other}'"
                )))
            }
        };
        let (_, cmd) = super::bindings::create_from(
            s,
            None,
            field(bd, "vhost")?,
            field(bd, "source")?,
            field(bd, "destination")?,
            queue,
            bd,
        )?;
        cmds.extend(cmd);
    }
    Ok(())
}

/// `POST /api/definitions`: import, then (clustered) commit everything
/// imported as one entry of the metadata group before answering (503 when
/// it cannot be committed in time).
pub async fn import(
    State(s): State<AdminState>,
    caller: Caller,
    Body(body): Body,
) -> ApiResult<StatusCode> {
    caller.require_admin()?;
    if !body.is_object() {
        return Err(ApiError::bad_request("definitions must be a JSON object"));
    }
    apply(&s, &body).await
}

/// `POST /api/definitions/{vhost}`: import the parameters, policies, queues,
/// exchanges and bindings of a document into an existing vhost, whatever
/// vhost its items name (RabbitMQ's per-vhost import; users, vhosts and
/// permissions in it are ignored).
pub async fn import_vhost(
    State(s): State<AdminState>,
    caller: Caller,
    Path(vhost): Path<String>,
    Body(body): Body,
) -> ApiResult<StatusCode> {
    caller.require_admin()?;
    if s.broker.vhost(&vhost).is_none() {
        return Err(ApiError {
            status: axum::http::StatusCode::NOT_FOUND,
            error: "not_found",
            reason: "vhost_not_found".into(),
            challenge: false,
        });
    }
    if !body.is_object() {
        return Err(ApiError::bad_request("definitions must be a JSON object"));
    }
    let mut doc = serde_json::Map::new();
    for key in ["parameters", "policies", "queues", "exchanges", "bindings"] {
        let list = items(&body, key)?
            .iter()
            .map(|item| {
                let mut item = item.clone();
                match item.as_object_mut() {
                    Some(o) => {
                        o.insert("vhost".into(), json!(vhost));
                        Ok(item)
                    }
                    None => Err(ApiError::bad_request(format!(
                        "{key} must be a list of objects"
                    ))),
                }
            })
            .collect::<ApiResult<Vec<Value>>>()?;
        doc.insert(key.into(), Value::Array(list));
    }
    apply(&s, &Value::Object(doc)).await
}

/// Import `body`, replicating what was imported (all of it, or what came
/// before an error) before answering.
async fn apply(s: &AdminState, body: &Value) -> ApiResult<StatusCode> {
    let mut cmds = Vec::new();
    let imported = import_definitions(s, body, &mut cmds);
    // What was imported before an error is replicated too: every node has it.
    let batch = (!cmds.is_empty()).then_some(Command::Batch(cmds));
    super::cluster::replicate(s, || batch).await?;
    imported?;
    Ok(StatusCode::NO_CONTENT)
}
