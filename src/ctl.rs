//! `warren <command>`: rabbitmqctl-style daily operations (list, purge, delete,
//! users, permissions, topic permissions, vhost and user limits) performed
//! through the admin HTTP API with `ureq`.

use base64::Engine;
use clap::Subcommand;
use serde_json::{json, Value};

/// The admin subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List queues with message and consumer counts.
    ListQueues {
        #[arg(short = 'p', long, default_value = "/")]
        vhost: String,
    },
    /// List exchanges.
    ListExchanges {
        #[arg(short = 'p', long, default_value = "/")]
        vhost: String,
    },
    /// List bindings.
    ListBindings {
        #[arg(short = 'p', long, default_value = "/")]
        vhost: String,
    },
    /// List client connections.
    ListConnections,
    /// List users and their tags.
    ListUsers,
    /// Remove every ready message from a queue.
    PurgeQueue {
        name: String,
        #[arg(short = 'p', long, default_value = "/")]
        vhost: String,
    },
    /// Delete a queue.
    DeleteQueue {
        name: String,
        #[arg(short = 'p', long, default_value = "/")]
        vhost: String,
        /// Only if it has no consumers.
        #[arg(long)]
        if_unused: bool,
        /// Only if it has no messages.
        #[arg(long)]
        if_empty: bool,
    },
    /// Create a user (or change its password).
    AddUser {
        name: String,
        password: String,
        /// Comma-separated tags, e.g. `administrator` or `management`.
        #[arg(long, default_value = "")]
        tags: String,
    },
    /// Delete a user.
    DeleteUser { name: String },
    /// Remove a user's password: it can then log in only with a client
    /// certificate (SASL EXTERNAL), as rabbitmqctl clear_password.
    ClearPassword { name: String },
    /// Read the TLS certificate, key and CA files of the broker's listeners again
    /// (what SIGHUP does): new connections get the new certificate.
    #[command(alias = "reload_tls")]
    ReloadTls,
    /// Set a user's configure / write / read regexes in a vhost.
    SetPermissions {
        user: String,
        configure: String,
        write: String,
        read: String,
        #[arg(short = 'p', long, default_value = "/")]
        vhost: String,
    },
    /// Set a user's topic permission regexes on an exchange in a vhost.
    #[command(alias = "set_topic_permissions")]
    SetTopicPermissions {
        user: String,
        exchange: String,
        write: String,
        read: String,
        #[arg(short = 'p', long, default_value = "/")]
        vhost: String,
    },
    /// Clear a user's topic permissions in a vhost (on one exchange if given).
    #[command(alias = "clear_topic_permissions")]
    ClearTopicPermissions {
        user: String,
        exchange: Option<String>,
        #[arg(short = 'p', long, default_value = "/")]
        vhost: String,
    },
    /// Set a vhost's limits, replacing its others: `'{"max-connections": 10, "max-queues": 50}'`.
    #[command(alias = "set_vhost_limits")]
    SetVhostLimits {
        definition: String,
        #[arg(short = 'p', long, default_value = "/")]
        vhost: String,
    },
    /// Clear every limit of a vhost.
    #[command(alias = "clear_vhost_limits")]
    ClearVhostLimits {
        #[arg(short = 'p', long, default_value = "/")]
        vhost: String,
    },
    /// List vhost limits (of one vhost with -p).
    #[command(alias = "list_vhost_limits")]
    ListVhostLimits {
        #[arg(short = 'p', long)]
        vhost: Option<String>,
    },
    /// Set a user's limits, replacing their others: `'{"max-connections": 5, "max-channels": 20}'`.
    #[command(alias = "set_user_limits")]
    SetUserLimits { user: String, definition: String },
    /// Clear one limit of a user (`max-connections`, `max-channels`) or `all`.
    #[command(alias = "clear_user_limits")]
    ClearUserLimits { user: String, limit: String },
    /// List vhosts with their description, tags, default queue type and
    /// whether the firehose is on.
    #[command(alias = "list_vhosts")]
    ListVhosts,
    /// Create a vhost (or change its description, tags and default queue type).
    #[command(alias = "add_vhost")]
    AddVhost {
        name: String,
        #[arg(long, default_value = "")]
        description: String,
        /// Comma-separated tags.
        #[arg(long, default_value = "")]
        tags: String,
        /// The type of queues declared durable without `x-queue-type`.
        #[arg(long, value_parser = ["classic", "quorum", "stream"])]
        default_queue_type: Option<String>,
    },
    /// Delete a vhost and everything in it.
    #[command(alias = "delete_vhost")]
    DeleteVhost { name: String },
    /// Turn the firehose tracer on for a vhost: every message published and
    /// delivered there is copied to its `amq.rabbitmq.trace` exchange.
    #[command(alias = "trace_on")]
    TraceOn {
        #[arg(short = 'p', long, default_value = "/")]
        vhost: String,
    },
    /// Turn the firehose tracer off for a vhost.
    #[command(alias = "trace_off")]
    TraceOff {
        #[arg(short = 'p', long, default_value = "/")]
        vhost: String,
    },
    /// Cluster membership (a node with `[cluster]` in its configuration).
    #[command(subcommand)]
    Cluster(ClusterCommand),
    /// Quorum queue members (RabbitMQ's `rabbitmq-queues`).
    #[command(subcommand)]
    Queues(QueuesCommand),
}

/// `warren queues ...`.
#[derive(Debug, Subcommand)]
pub enum QueuesCommand {
    /// Add a node (`warren@host`) to a quorum queue's members.
    #[command(alias = "add_member")]
    AddMember {
        queue: String,
        node: String,
        #[arg(short = 'p', long, default_value = "/")]
        vhost: String,
    },
    /// Remove a node from a quorum queue's members.
    #[command(alias = "delete_member")]
    DeleteMember {
        queue: String,
        node: String,
        #[arg(short = 'p', long, default_value = "/")]
        vhost: String,
    },
    /// Add a node to every matching quorum queue (`all`) or to those with an
    /// even number of members (`even`).
    Grow {
        node: String,
        #[arg(default_value = "all")]
        strategy: String,
        #[arg(long, default_value = ".*")]
        vhost_pattern: String,
        #[arg(long, default_value = ".*")]
        queue_pattern: String,
    },
    /// Remove a node from every quorum queue it is a member of (never the
    /// last member).
    Shrink { node: String },
    /// Fail (exit code 1) when stopping this node would take a quorum queue
    /// below its majority, listing those queues; for rolling restarts.
    #[command(alias = "check_if_node_is_quorum_critical")]
    CheckIfNodeIsQuorumCritical,
    /// Spread the quorum queues' leaders over the running nodes (`all`,
    /// `quorum`, `classic`, `stream`: only quorum queues have leaders to
    /// move).
    Rebalance {
        #[arg(default_value = "all")]
        queue_type: String,
        #[arg(long, default_value = ".*")]
        vhost_pattern: String,
        #[arg(long, default_value = ".*")]
        queue_pattern: String,
    },
}

/// `warren cluster ...`.
#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// This node, the metadata leader and every member with its state.
    Status,
    /// Join the cluster of another node (`warren@host[:port]`); only a node
    /// alone in its own cluster, with no replicated metadata, can.
    Join { node: String },
    /// Remove a member (`warren@host`) from the cluster.
    #[command(alias = "forget_cluster_node")]
    ForgetNode { node: String },
}

/// Where and as whom to call the admin API.
#[derive(Debug, Clone)]
pub struct Target {
    pub url: String,
    pub user: String,
    pub password: String,
    /// PEM CA certificates to trust for an `https://` URL (as curl's
    /// `--cacert`); None: the public web PKI roots.
    pub cacert: Option<std::path::PathBuf>,
}

/// Percent-encode one path segment (`/` becomes `%2F`).
fn seg(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Target {
    /// An HTTP agent that trusts `cacert` when one is given.
    fn agent(&self) -> Result<ureq::Agent, String> {
        use tokio_rustls::rustls::{self, pki_types::pem::PemObject, pki_types::CertificateDer};
        let Some(path) = &self.cacert else {
            return Ok(ureq::agent());
        };
        let mut roots = rustls::RootCertStore::empty();
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        for cert in certs {
            let cert = cert.map_err(|e| format!("cannot read {}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
        let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
        Ok(ureq::AgentBuilder::new()
            .tls_config(std::sync::Arc::new(config))
            .build())
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let url = format!("{}{}", self.url.trim_end_matches('/'), path);
        let auth = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", self.user, self.password));
        let req = self
            .agent()?
            .request(method, &url)
            .set("Authorization", &format!("Basic {auth}"));
        let res = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match res {
            Ok(r) => {
                let text = r.into_string().map_err(|e| e.to_string())?;
                Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
            }
            Err(ureq::Error::Status(code, r)) => {
                let body: Value = r.into_json().unwrap_or(Value::Null);
                let reason = body
                    .get("reason")
                    .and_then(Value::as_str)
                    .unwrap_or("request failed");
                // A failed health check lists what failed (RabbitMQ's
                // `queues` of node-is-quorum-critical).
                let listed: Vec<&str> = body
                    .get("queues")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .filter_map(|q| q.get("readable_name").and_then(Value::as_str))
                    .collect();
                if listed.is_empty() {
                    Err(format!("{code}: {reason}"))
                } else {
                    Err(format!("{code}: {reason}:\n{}", listed.join("\n")))
                }
            }
            Err(e) => Err(format!("cannot reach {url}: {e}")),
        }
    }
}

/// Print rows as a table with aligned columns.
fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            widths[i] = widths[i].max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<String>, out: &mut String| {
        let last = cells.len().saturating_sub(1);
        for (i, c) in cells.into_iter().enumerate() {
            if i == last {
                out.push_str(&c);
            } else {
                let pad = widths[i] - c.chars().count();
                out.push_str(&c);
                out.push_str(&" ".repeat(pad + 2));
            }
        }
        out.push('\n');
    };
    line(headers.iter().map(|h| h.to_string()).collect(), &mut out);
    for r in rows {
        line(r, &mut out);
    }
    out
}

fn cell(v: &Value, key: &str) -> String {
    match v.get(key) {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_str()
                    .map(String::from)
                    .unwrap_or_else(|| x.to_string())
            })
            .collect::<Vec<_>>()
            .join(","),
        Some(other) => other.to_string(),
    }
}

fn rows(list: &Value, keys: &[&str]) -> Vec<Vec<String>> {
    list.as_array()
        .map(|a| {
            a.iter()
                .map(|v| keys.iter().map(|k| cell(v, k)).collect())
                .collect()
        })
        .unwrap_or_default()
}

/// The limit names already set in a `[{"value": {...}}]` listing.
fn limit_names(list: &Value) -> Vec<String> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|row| row.get("value").and_then(Value::as_object))
        .flat_map(|m| m.keys().cloned())
        .collect()
}

/// Make the limits at `base` (`/api/vhost-limits/{vhost}` or
/// `/api/user-limits/{user}`) exactly `definition` (a JSON object).
fn replace_limits(target: &Target, base: &str, definition: &str) -> Result<(), String> {
    let wanted: serde_json::Map<String, Value> = serde_json::from_str(definition)
        .map_err(|e| format!("the limits must be a JSON object: {e}"))?;
    for name in limit_names(&target.call("GET", base, None)?) {
        if !wanted.contains_key(&name) {
            target.call("DELETE", &format!("{base}/{}", seg(&name)), None)?;
        }
    }
    for (name, value) in wanted {
        target.call(
            "PUT",
            &format!("{base}/{}", seg(&name)),
            Some(json!({ "value": value })),
        )?;
    }
    Ok(())
}

/// `warren cluster status`, as rabbitmqctl cluster_status prints it, shorter.
fn cluster_status(target: &Target) -> Result<String, String> {
    let s = target.call("GET", "/api/cluster", None)?;
    let mut out = format!(
        "Cluster status of node {}\nMetadata leader: {}\nRaft: {}\n\n",
        cell(&s, "node"),
        s.get("leader")
            .and_then(Value::as_str)
            .unwrap_or("(none: no majority)"),
        s.get("raft").map(Value::to_string).unwrap_or_default(),
    );
    let members = s.get("members").cloned().unwrap_or(Value::Null);
    out.push_str(&table(
        &["node", "address", "voter", "running", "leader"],
        rows(&members, &["name", "addr", "voter", "running", "leader"]),
    ));
    Ok(out)
}

/// Run one command; the output to print, or an error message.
pub fn run(target: &Target, cmd: Command) -> Result<String, String> {
    match cmd {
        Command::Cluster(ClusterCommand::Status) => cluster_status(target),
        Command::Cluster(ClusterCommand::Join { node }) => {
            target.call("POST", "/api/cluster/join", Some(json!({ "node": node })))?;
            Ok(format!("Joined the cluster of {node}\n"))
        }
        Command::Cluster(ClusterCommand::ForgetNode { node }) => {
            target.call(
                "DELETE",
                &format!("/api/cluster/nodes/{}", seg(&node)),
                None,
            )?;
            Ok(format!("Removed {node} from the cluster\n"))
        }
        Command::Queues(QueuesCommand::AddMember { queue, node, vhost }) => {
            target.call(
                "POST",
                &format!(
                    "/api/queues/quorum/{}/{}/replicas/add",
                    seg(&vhost),
                    seg(&queue)
                ),
                Some(json!({ "node": node })),
            )?;
            Ok(format!(
                "Added {node} to quorum queue '{queue}' in vhost '{vhost}'\n"
            ))
        }
        Command::Queues(QueuesCommand::DeleteMember { queue, node, vhost }) => {
            target.call(
                "DELETE",
                &format!(
                    "/api/queues/quorum/{}/{}/replicas/delete",
                    seg(&vhost),
                    seg(&queue)
                ),
                Some(json!({ "node": node })),
            )?;
            Ok(format!(
                "Removed {node} from quorum queue '{queue}' in vhost '{vhost}'\n"
            ))
        }
        Command::Queues(QueuesCommand::Grow {
            node,
            strategy,
            vhost_pattern,
            queue_pattern,
        }) => {
            let changed = target.call(
                "POST",
                &format!("/api/queues/quorum/replicas/on/{}/grow", seg(&node)),
                Some(json!({
                    "strategy": strategy,
                    "vhost_pattern": vhost_pattern,
                    "queue_pattern": queue_pattern,
                })),
            )?;
            Ok(table(
                &["vhost", "name"],
                rows(&changed, &["vhost", "name"]),
            ))
        }
        Command::Queues(QueuesCommand::CheckIfNodeIsQuorumCritical) => {
            target.call("GET", "/api/health/checks/node-is-quorum-critical", None)?;
            Ok(
                "Ok: this node can be stopped without any quorum queue losing its majority\n"
                    .into(),
            )
        }
        Command::Queues(QueuesCommand::Rebalance {
            queue_type,
            vhost_pattern,
            queue_pattern,
        }) => {
            let outcome = target.call(
                "POST",
                "/api/rebalance/queues",
                Some(json!({
                    "type": queue_type,
                    "vhost_pattern": vhost_pattern,
                    "queue_pattern": queue_pattern,
                    "wait": true,
                })),
            )?;
            let mut out = table(
                &["vhost", "name", "from", "to", "ok", "error"],
                rows(
                    &outcome["moves"],
                    &["vhost", "name", "from", "to", "ok", "error"],
                ),
            );
            out.push_str(&table(
                &["node", "quorum_leaders"],
                rows(&outcome["leaders"], &["node", "quorum_leaders"]),
            ));
            Ok(out)
        }
        Command::Queues(QueuesCommand::Shrink { node }) => {
            let changed = target.call(
                "DELETE",
                &format!("/api/queues/quorum/replicas/on/{}/shrink", seg(&node)),
                None,
            )?;
            Ok(table(
                &["vhost", "name"],
                rows(&changed, &["vhost", "name"]),
            ))
        }
        Command::ListQueues { vhost } => {
            let list = target.call("GET", &format!("/api/queues/{}", seg(&vhost)), None)?;
            let keys = [
                "name",
                "messages",
                "messages_ready",
                "messages_unacknowledged",
                "consumers",
            ];
            Ok(table(&keys, rows(&list, &keys)))
        }
        Command::ListExchanges { vhost } => {
            let list = target.call("GET", &format!("/api/exchanges/{}", seg(&vhost)), None)?;
            let keys = ["name", "type", "durable", "auto_delete", "internal"];
            Ok(table(&keys, rows(&list, &keys)))
        }
        Command::ListBindings { vhost } => {
            let list = target.call("GET", &format!("/api/bindings/{}", seg(&vhost)), None)?;
            let keys = ["source", "destination", "destination_type", "routing_key"];
            Ok(table(
                &[
                    "source_name",
                    "destination_name",
                    "destination_kind",
                    "routing_key",
                ],
                rows(&list, &keys),
            ))
        }
        Command::ListConnections => {
            let list = target.call("GET", "/api/connections", None)?;
            let keys = ["name", "user", "vhost", "channels", "state"];
            Ok(table(&keys, rows(&list, &keys)))
        }
        Command::ListUsers => {
            let list = target.call("GET", "/api/users", None)?;
            Ok(table(&["user", "tags"], rows(&list, &["name", "tags"])))
        }
        Command::PurgeQueue { name, vhost } => {
            target.call(
                "DELETE",
                &format!("/api/queues/{}/{}/contents", seg(&vhost), seg(&name)),
                None,
            )?;
            Ok(format!("Purged queue '{name}' in vhost '{vhost}'\n"))
        }
        Command::DeleteQueue {
            name,
            vhost,
            if_unused,
            if_empty,
        } => {
            target.call(
                "DELETE",
                &format!(
                    "/api/queues/{}/{}?if-unused={if_unused}&if-empty={if_empty}",
                    seg(&vhost),
                    seg(&name)
                ),
                None,
            )?;
            Ok(format!("Deleted queue '{name}' in vhost '{vhost}'\n"))
        }
        Command::AddUser {
            name,
            password,
            tags,
        } => {
            target.call(
                "PUT",
                &format!("/api/users/{}", seg(&name)),
                Some(json!({"password": password, "tags": tags})),
            )?;
            Ok(format!("Added user '{name}'\n"))
        }
        Command::DeleteUser { name } => {
            target.call("DELETE", &format!("/api/users/{}", seg(&name)), None)?;
            Ok(format!("Deleted user '{name}'\n"))
        }
        Command::ReloadTls => {
            target.call("POST", "/api/warren/reload-tls", None)?;
            Ok("Reloaded the TLS certificates\n".into())
        }
        Command::ClearPassword { name } => {
            let path = format!("/api/users/{}", seg(&name));
            let user = target.call("GET", &path, None)?;
            let tags = user.get("tags").cloned().unwrap_or(Value::Null);
            target.call(
                "PUT",
                &path,
                Some(json!({"password_hash": "", "tags": tags})),
            )?;
            Ok(format!("Cleared password for user '{name}'\n"))
        }
        Command::SetPermissions {
            user,
            configure,
            write,
            read,
            vhost,
        } => {
            target.call(
                "PUT",
                &format!("/api/permissions/{}/{}", seg(&vhost), seg(&user)),
                Some(json!({"configure": configure, "write": write, "read": read})),
            )?;
            Ok(format!(
                "Set permissions for user '{user}' in vhost '{vhost}'\n"
            ))
        }
        Command::SetTopicPermissions {
            user,
            exchange,
            write,
            read,
            vhost,
        } => {
            target.call(
                "PUT",
                &format!("/api/topic-permissions/{}/{}", seg(&vhost), seg(&user)),
                Some(json!({"exchange": exchange, "write": write, "read": read})),
            )?;
            Ok(format!(
                "Set topic permissions on {exchange} for user '{user}' in vhost '{vhost}'\n"
            ))
        }
        Command::ClearTopicPermissions {
            user,
            exchange,
            vhost,
        } => {
            let query = exchange
                .as_deref()
                .map(|e| format!("?exchange={}", seg(e)))
                .unwrap_or_default();
            target.call(
                "DELETE",
                &format!(
                    "/api/topic-permissions/{}/{}{query}",
                    seg(&vhost),
                    seg(&user)
                ),
                None,
            )?;
            Ok(format!(
                "Cleared topic permissions for user '{user}' in vhost '{vhost}'\n"
            ))
        }
        Command::SetVhostLimits { definition, vhost } => {
            replace_limits(
                target,
                &format!("/api/vhost-limits/{}", seg(&vhost)),
                &definition,
            )?;
            Ok(format!("Set vhost limits for vhost '{vhost}'\n"))
        }
        Command::ClearVhostLimits { vhost } => {
            replace_limits(target, &format!("/api/vhost-limits/{}", seg(&vhost)), "{}")?;
            Ok(format!("Cleared vhost limits for vhost '{vhost}'\n"))
        }
        Command::ListVhostLimits { vhost } => {
            let path = match &vhost {
                Some(v) => format!("/api/vhost-limits/{}", seg(v)),
                None => "/api/vhost-limits".into(),
            };
            let list = target.call("GET", &path, None)?;
            Ok(table(
                &["vhost", "limits"],
                rows(&list, &["vhost", "value"]),
            ))
        }
        Command::SetUserLimits { user, definition } => {
            replace_limits(
                target,
                &format!("/api/user-limits/{}", seg(&user)),
                &definition,
            )?;
            Ok(format!("Set user limits for user '{user}'\n"))
        }
        Command::ListVhosts => {
            let list = target.call("GET", "/api/vhosts", None)?;
            Ok(table(
                &[
                    "name",
                    "description",
                    "tags",
                    "default_queue_type",
                    "tracing",
                ],
                rows(
                    &list,
                    &[
                        "name",
                        "description",
                        "tags",
                        "default_queue_type",
                        "tracing",
                    ],
                ),
            ))
        }
        Command::AddVhost {
            name,
            description,
            tags,
            default_queue_type,
        } => {
            let mut body = json!({ "description": description, "tags": tags });
            if let Some(t) = default_queue_type {
                body["default_queue_type"] = json!(t);
            }
            target.call("PUT", &format!("/api/vhosts/{}", seg(&name)), Some(body))?;
            Ok(format!("Added vhost '{name}'\n"))
        }
        Command::DeleteVhost { name } => {
            target.call("DELETE", &format!("/api/vhosts/{}", seg(&name)), None)?;
            Ok(format!("Deleted vhost '{name}'\n"))
        }
        Command::TraceOn { vhost } => {
            set_tracing(target, &vhost, true)?;
            Ok(format!("Started tracing for vhost '{vhost}'\n"))
        }
        Command::TraceOff { vhost } => {
            set_tracing(target, &vhost, false)?;
            Ok(format!("Stopped tracing for vhost '{vhost}'\n"))
        }
        Command::ClearUserLimits { user, limit } => {
            let base = format!("/api/user-limits/{}", seg(&user));
            if limit == "all" {
                replace_limits(target, &base, "{}")?;
            } else {
                target.call("DELETE", &format!("{base}/{}", seg(&limit)), None)?;
            }
            Ok(format!("Cleared user limit '{limit}' for user '{user}'\n"))
        }
    }
}

/// Turn a vhost's firehose on or off, keeping its description, tags and
/// default queue type (a PUT without them would clear the first two).
fn set_tracing(target: &Target, vhost: &str, on: bool) -> Result<(), String> {
    let path = format!("/api/vhosts/{}", seg(vhost));
    let current = target.call("GET", &path, None)?;
    let mut body = json!({
        "description": current.get("description").cloned().unwrap_or(Value::Null),
        "tags": current.get("tags").cloned().unwrap_or(Value::Null),
        "tracing": on,
    });
    if let Some(t) = current
        .get("default_queue_type")
        .and_then(Value::as_str)
        .filter(|t| *t != "undefined")
    {
        body["default_queue_type"] = json!(t);
    }
    target.call("PUT", &path, Some(body))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let t = table(
            &["name", "messages"],
            vec![
                vec!["a-long-name".into(), "1".into()],
                vec!["b".into(), "20".into()],
            ],
        );
        assert_eq!(
            t,
            "name         messages\na-long-name  1\nb            20\n"
        );
    }

    #[test]
    fn segments_are_encoded() {
        assert_eq!(seg("/"), "%2F");
        assert_eq!(seg("a b.c"), "a%20b.c");
    }
}
