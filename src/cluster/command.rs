//! The replicated metadata: the commands of the metadata Raft group (what a
//! client's declare, bind or delete becomes when the node is clustered, and
//! a queue's deletion of itself, [`Command::QueueGone`]), the
//! model they build (RabbitMQ's Khepri tree, cut down to what is replicated
//! today), and how a committed command reaches the local broker: through the
//! same vhost door the AMQP sessions use (`VHost::declare_exchange`, `bind`, ...).

use crate::broker::exchange::Destination;
use crate::broker::vhost::{ExchangeDeclare, QueueDeclare, VHost};
use crate::broker::Broker;
use crate::wire::{encode_field_table, parse_field_table, FieldTable, Method};
use bytes::BytesMut;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Arguments (an AMQP field table) in their wire encoding: exact, whatever the
/// value types.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Args(pub Vec<u8>);

impl Args {
    pub fn from_table(t: &FieldTable) -> Args {
        let mut buf = BytesMut::new();
        encode_field_table(t, &mut buf);
        Args(buf.to_vec())
    }

    pub fn table(&self) -> FieldTable {
        match parse_field_table(&self.0) {
            Ok((_, t)) => t,
            Err(_) => FieldTable::new(),
        }
    }
}

/// One change of the metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    DeclareExchange {
        vhost: String,
        name: String,
        kind: String,
        durable: bool,
        auto_delete: bool,
        internal: bool,
        arguments: Args,
    },
    DeleteExchange {
        vhost: String,
        name: String,
    },
    /// A queue record; `node` is the node the queue was declared on (its home).
    DeclareQueue {
        vhost: String,
        name: String,
        node: String,
        durable: bool,
        auto_delete: bool,
        arguments: Args,
    },
    DeleteQueue {
        vhost: String,
        name: String,
    },
    /// A queue deleted itself on `node` (its `x-expires` ran out, or it was
    /// auto-delete and its last consumer went), proposed by that node.
    /// Applied as a [`Command::DeleteQueue`] only while the record is still
    /// that queue: served on `node` and last declared by the entry
    /// `declared` ([`Metadata::declared`]). A newer declaration of the name
    /// (made elsewhere after it expired, say) is left alone, and a record
    /// already gone makes it nothing.
    QueueGone {
        vhost: String,
        name: String,
        node: String,
        declared: u64,
    },
    /// The leader of a quorum queue's Raft group `group` (see
    /// `super::quorum`), where the queue is served: proposed by the new
    /// leader once it has loaded the queue's messages.
    QueueLeader {
        vhost: String,
        name: String,
        group: String,
        node: String,
    },
    /// The members of a quorum queue's group `group` from now on (member
    /// add/delete, grow/shrink): every node starts or stops its own member;
    /// the group's leader changes the group's voters to match.
    QuorumMembers {
        vhost: String,
        name: String,
        group: String,
        members: Vec<String>,
    },
    Bind(BindingRec),
    Unbind(BindingRec),
    /// A vhost; `creator` (an admin API user) gets full permissions on it when
    /// it is new, as RabbitMQ's management API gives them.
    PutVhost {
        name: String,
        creator: Option<String>,
        /// Its description, tags and default queue type (None: as they are;
        /// absent in entries written before they were replicated).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        meta: Option<crate::broker::vhost::VHostMeta>,
    },
    DeleteVhost {
        name: String,
    },
    /// A user with its password hash (salted once, on the node that took the
    /// request) and tags.
    PutUser {
        name: String,
        password_hash: String,
        tags: Vec<String>,
    },
    DeleteUser {
        name: String,
    },
    SetPermission {
        vhost: String,
        user: String,
        configure: String,
        write: String,
        read: String,
    },
    ClearPermission {
        vhost: String,
        user: String,
    },
    /// A policy (an operator policy when `operator`); `definition` is its
    /// JSON object as text.
    PutPolicy {
        vhost: String,
        name: String,
        pattern: String,
        apply_to: String,
        priority: i64,
        definition: String,
        #[serde(default)]
        operator: bool,
    },
    DeletePolicy {
        vhost: String,
        name: String,
        #[serde(default)]
        operator: bool,
    },
    /// A topic permission: `user`'s routing-key regexes on `exchange`.
    SetTopicPermission {
        vhost: String,
        user: String,
        exchange: String,
        write: String,
        read: String,
    },
    /// Clear `user`'s topic permissions in `vhost` (on one exchange, or all).
    ClearTopicPermission {
        vhost: String,
        user: String,
        exchange: Option<String>,
    },
    /// A vhost's limits, all of them (empty: none).
    SetVhostLimits {
        vhost: String,
        limits: BTreeMap<String, i64>,
    },
    /// A user's limits, all of them (empty: none).
    SetUserLimits {
        user: String,
        limits: BTreeMap<String, i64>,
    },
    /// A global runtime parameter (`cluster_name` among them): its JSON
    /// value as text, or None to clear it.
    SetGlobalParameter {
        name: String,
        value: Option<String>,
    },
    /// A vhost's runtime parameter (component `shovel`, say): its JSON value
    /// as text, or None to clear it.
    SetParameter {
        component: String,
        vhost: String,
        name: String,
        value: Option<String>,
    },
    /// Several changes committed as one entry (a definitions import), applied
    /// in order; one the local broker refuses does not stop the others.
    Batch(Vec<Command>),
}

/// A binding: from an exchange to a queue or an exchange.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BindingRec {
    pub vhost: String,
    pub source: String,
    /// The destination is an exchange (exchange.bind), not a queue.
    pub to_exchange: bool,
    pub destination: String,
    pub routing_key: String,
    pub arguments: Args,
}

impl BindingRec {
    fn key(&self) -> String {
        let mut k = format!(
            "{}\0{}\0{}\0{}\0{}\0",
            self.vhost, self.source, self.to_exchange as u8, self.destination, self.routing_key
        );
        for b in &self.arguments.0 {
            k.push_str(&format!("{b:02x}"));
        }
        k
    }

    fn destination(&self) -> Destination {
        if self.to_exchange {
            Destination::Exchange(self.destination.as_str().into())
        } else {
            Destination::Queue(self.destination.as_str().into())
        }
    }
}

impl Command {
    /// An exchange declared (by the admin API) with `d`.
    pub fn exchange_declared(vhost: &str, d: &ExchangeDeclare) -> Command {
        Command::DeclareExchange {
            vhost: vhost.to_string(),
            name: d.name.clone(),
            kind: d.kind.clone(),
            durable: d.durable,
            auto_delete: d.auto_delete,
            internal: d.internal,
            arguments: Args::from_table(&d.arguments),
        }
    }

    /// A queue declared (by the admin API) with `d` on `node`, its home;
    /// None for an exclusive or server-named queue, which stays local.
    pub fn queue_declared(vhost: &str, d: &QueueDeclare, node: &str) -> Option<Command> {
        (!d.exclusive && !d.name.is_empty()).then(|| Command::DeclareQueue {
            vhost: vhost.to_string(),
            name: d.name.clone(),
            node: node.to_string(),
            durable: d.durable,
            auto_delete: d.auto_delete,
            arguments: Args::from_table(&d.arguments),
        })
    }

    /// A binding made (`bind`) or removed by the admin API.
    pub fn binding(
        bind: bool,
        vhost: &str,
        source: &str,
        destination: &Destination,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Command {
        let (to_exchange, destination) = match destination {
            Destination::Queue(q) => (false, q.to_string()),
            Destination::Exchange(e) => (true, e.to_string()),
        };
        let rec = BindingRec {
            vhost: vhost.to_string(),
            source: source.to_string(),
            to_exchange,
            destination,
            routing_key: routing_key.to_string(),
            arguments: Args::from_table(arguments),
        };
        if bind {
            Command::Bind(rec)
        } else {
            Command::Unbind(rec)
        }
    }

    /// The command a client's method becomes when it changed replicated
    /// metadata, or None (passive declares, exclusive and server-named queues
    /// and bindings to them, everything that is not topology). `node` is this
    /// node's name, `connection` the client's connection id.
    pub fn from_method(
        method: &Method,
        vhost: &VHost,
        connection: u64,
        node: &str,
    ) -> Option<Command> {
        let v = || vhost.name.to_string();
        // A queue only this connection can see is not replicated, nor its bindings.
        let local_queue = |name: &str| {
            name.is_empty()
                || vhost
                    .queue(name, connection)
                    .is_ok_and(|q| q.spec.exclusive_owner.is_some())
        };
        Some(match method {
            Method::ExchangeDeclare(d) if !d.passive => Command::DeclareExchange {
                vhost: v(),
                name: d.exchange.clone(),
                kind: d.kind.clone(),
                durable: d.durable,
                auto_delete: d.auto_delete,
                internal: d.internal,
                arguments: Args::from_table(&d.arguments),
            },
            Method::ExchangeDelete(d) => Command::DeleteExchange {
                vhost: v(),
                name: d.exchange.clone(),
            },
            Method::QueueDeclare(d) if !d.passive && !d.exclusive && !d.queue.is_empty() => {
                Command::DeclareQueue {
                    vhost: v(),
                    name: d.queue.clone(),
                    node: node.to_string(),
                    durable: d.durable,
                    auto_delete: d.auto_delete,
                    arguments: Args::from_table(&d.arguments),
                }
            }
            Method::QueueDelete(d) if !local_queue(&d.queue) => Command::DeleteQueue {
                vhost: v(),
                name: d.queue.clone(),
            },
            Method::QueueBind(b) if !local_queue(&b.queue) => Command::Bind(BindingRec {
                vhost: v(),
                source: b.exchange.clone(),
                to_exchange: false,
                destination: b.queue.clone(),
                routing_key: b.routing_key.clone(),
                arguments: Args::from_table(&b.arguments),
            }),
            Method::QueueUnbind(b) if !local_queue(&b.queue) => Command::Unbind(BindingRec {
                vhost: v(),
                source: b.exchange.clone(),
                to_exchange: false,
                destination: b.queue.clone(),
                routing_key: b.routing_key.clone(),
                arguments: Args::from_table(&b.arguments),
            }),
            Method::ExchangeBind(b) => Command::Bind(BindingRec {
                vhost: v(),
                source: b.source.clone(),
                to_exchange: true,
                destination: b.destination.clone(),
                routing_key: b.routing_key.clone(),
                arguments: Args::from_table(&b.arguments),
            }),
            Method::ExchangeUnbind(b) => Command::Unbind(BindingRec {
                vhost: v(),
                source: b.source.clone(),
                to_exchange: true,
                destination: b.destination.clone(),
                routing_key: b.routing_key.clone(),
                arguments: Args::from_table(&b.arguments),
            }),
            _ => return None,
        })
    }

    /// The command that removes the record this one puts (None for a
    /// command that is itself a removal).
    fn undo(&self) -> Option<Command> {
        Some(match self.clone() {
            Command::DeclareExchange { vhost, name, .. } => Command::DeleteExchange { vhost, name },
            Command::DeclareQueue { vhost, name, .. } => Command::DeleteQueue { vhost, name },
            Command::Bind(b) => Command::Unbind(b),
            Command::PutVhost { name, .. } => Command::DeleteVhost { name },
            Command::PutUser { name, .. } => Command::DeleteUser { name },
            Command::SetPermission { vhost, user, .. } => Command::ClearPermission { vhost, user },
            Command::PutPolicy {
                vhost,
                name,
                operator,
                ..
            } => Command::DeletePolicy {
                vhost,
                name,
                operator,
            },
            Command::SetTopicPermission {
                vhost,
                user,
                exchange,
                ..
            } => Command::ClearTopicPermission {
                vhost,
                user,
                exchange: Some(exchange),
            },
            Command::SetVhostLimits { vhost, .. } => Command::SetVhostLimits {
                vhost,
                limits: BTreeMap::new(),
            },
            Command::SetUserLimits { user, .. } => Command::SetUserLimits {
                user,
                limits: BTreeMap::new(),
            },
            Command::SetGlobalParameter {
                name,
                value: Some(_),
            } => Command::SetGlobalParameter { name, value: None },
            Command::SetParameter {
                component,
                vhost,
                name,
                value: Some(_),
            } => Command::SetParameter {
                component,
                vhost,
                name,
                value: None,
            },
            _ => return None,
        })
    }

    /// Make the change in the local broker ([`Self::apply_to`]) and, when it
    /// took, record it in `model`; a batch does so for each of its commands
    /// (the refusals are joined in the answer).
    pub fn apply_and_record(
        &self,
        target: &dyn super::store::Target,
        now: u64,
        model: &mut Metadata,
    ) -> Result<(), String> {
        if let Command::Batch(cmds) = self {
            let refused: Vec<String> = cmds
                .iter()
                .filter_map(|c| c.apply_and_record(target, now, model).err())
                .collect();
            return if refused.is_empty() {
                Ok(())
            } else {
                Err(refused.join("; "))
            };
        }
        if let Command::QueueGone { vhost, name, .. } = self {
            if !model.is_incarnation(self) {
                tracing::debug!(
                    ?self,
                    "queue deleted by itself: the record is another declaration now, kept"
                );
                return Ok(());
            }
            let delete = Command::DeleteQueue {
                vhost: vhost.clone(),
                name: name.clone(),
            };
            target.apply(&delete, now)?;
            model.record(&delete);
            return Ok(());
        }
        target.apply(self, now)?;
        model.record(self);
        Ok(())
    }

    /// Make the change in the local broker, through the vhost door; the
    /// broker's own answer (a change that is refused on every node alike, e.g.
    /// an inequivalent redeclare, is refused here too) as text.
    pub fn apply_to(&self, broker: &Broker, now: u64) -> Result<(), String> {
        if let Command::Batch(_) = self {
            return self.apply_and_record(broker, now, &mut Metadata::default());
        }
        if let Some(r) = self.apply_access(broker, now) {
            return r;
        }
        let vhost_name = match self {
            Command::DeclareExchange { vhost, .. }
            | Command::DeleteExchange { vhost, .. }
            | Command::DeclareQueue { vhost, .. }
            | Command::DeleteQueue { vhost, .. } => vhost,
            Command::Bind(b) | Command::Unbind(b) => &b.vhost,
            _ => return Ok(()),
        };
        let Some(vhost) = broker.vhost(vhost_name) else {
            return Err(format!("no vhost '{vhost_name}' on this node"));
        };
        let r = match self {
            Command::DeclareExchange {
                name,
                kind,
                durable,
                auto_delete,
                internal,
                arguments,
                ..
            } => vhost
                .declare_exchange(&ExchangeDeclare {
                    name: name.clone(),
                    kind: kind.clone(),
                    passive: false,
                    durable: *durable,
                    auto_delete: *auto_delete,
                    internal: *internal,
                    arguments: arguments.table(),
                })
                .map(drop),
            Command::DeleteExchange { name, .. } => match vhost.delete_exchange(name, false) {
                Err(e) if e.code == crate::wire::reply_code::NOT_FOUND => Ok(()),
                r => r,
            },
            Command::DeclareQueue {
                name,
                durable,
                auto_delete,
                arguments,
                ..
            } => vhost
                .declare_queue(
                    &QueueDeclare {
                        name: name.clone(),
                        passive: false,
                        durable: *durable,
                        exclusive: false,
                        auto_delete: *auto_delete,
                        arguments: arguments.table(),
                    },
                    0,
                    now,
                )
                .map(drop),
            Command::DeleteQueue { name, .. } => {
                vhost.delete_queue(name, false, false, 0, now).map(drop)
            }
            Command::Bind(b) => vhost.bind(
                &b.source,
                b.destination(),
                &b.routing_key,
                &b.arguments.table(),
                0,
            ),
            // What is gone is unbound: `unbind` of a missing end is a no-op
            // (on the node that made the change, an auto-delete source went
            // with its last binding already).
            Command::Unbind(b) => vhost.unbind(
                &b.source,
                b.destination(),
                &b.routing_key,
                &b.arguments.table(),
                0,
            ),
            _ => Ok(()),
        };
        r.map_err(|e| e.text)
    }

    /// Vhosts, users, permissions, policies, limits and global parameters
    /// (None for topology commands).
    fn apply_access(&self, broker: &Broker, now: u64) -> Option<Result<(), String>> {
        use crate::broker::auth::{Permission, TopicPermission, User};
        use crate::broker::policy::{ApplyTo, Policy};
        Some(match self {
            Command::PutVhost {
                name,
                creator,
                meta,
            } => {
                let existed = broker.vhost(name).is_some();
                broker.add_vhost(name);
                if let Some(meta) = meta {
                    if let Err(e) = broker.set_vhost_meta(name, meta.clone()) {
                        return Some(Err(e.text));
                    }
                }
                if let (false, Some(user)) = (existed, creator) {
                    if let Ok(all) = Permission::new(".*", ".*", ".*") {
                        broker.auth.set_permission(name, user, all);
                    }
                }
                Ok(())
            }
            Command::DeleteVhost { name } => {
                broker.delete_vhost(name);
                Ok(())
            }
            Command::PutUser {
                name,
                password_hash,
                tags,
            } => {
                let loopback_only = broker.auth.user(name).is_some_and(|u| u.loopback_only);
                broker.auth.put_user(User {
                    name: name.clone(),
                    password_hash: password_hash.clone(),
                    tags: tags.clone(),
                    loopback_only,
                });
                Ok(())
            }
            Command::DeleteUser { name } => {
                broker.auth.delete_user(name);
                Ok(())
            }
            Command::SetPermission {
                vhost,
                user,
                configure,
                write,
                read,
            } => Permission::new(configure, write, read)
                .map(|p| broker.auth.set_permission(vhost, user, p)),
            Command::ClearPermission { vhost, user } => {
                broker.auth.clear_permission(vhost, user);
                Ok(())
            }
            Command::PutPolicy {
                vhost,
                name,
                pattern,
                apply_to,
                priority,
                definition,
                operator,
            } => {
                let Some(v) = broker.vhost(vhost) else {
                    return Some(Err(format!("no vhost '{vhost}' on this node")));
                };
                let definition = match serde_json::from_str(definition) {
                    Ok(serde_json::Value::Object(m)) => m,
                    _ => return Some(Err("policy definition is not an object".into())),
                };
                let apply_to = ApplyTo::parse(apply_to).unwrap_or(ApplyTo::All);
                if *operator {
                    Policy::new_operator(vhost, name, pattern, apply_to, *priority, definition)
                        .and_then(|p| v.put_operator_policy(p, now).map(drop).map_err(|e| e.text))
                } else {
                    Policy::new(vhost, name, pattern, apply_to, *priority, definition)
                        .and_then(|p| v.put_policy(p, now).map(drop).map_err(|e| e.text))
                }
            }
            Command::DeletePolicy {
                vhost,
                name,
                operator,
            } => match broker.vhost(vhost) {
                Some(v) if *operator => v.delete_operator_policy(name, now).map(drop),
                Some(v) => v.delete_policy(name, now).map(drop),
                None => Ok(()),
            }
            .map_err(|e| e.text),
            Command::SetTopicPermission {
                vhost,
                user,
                exchange,
                write,
                read,
            } => TopicPermission::new(vhost, user, exchange, write, read).map(|p| {
                broker.auth.set_topic_permission(vhost, user, p);
            }),
            Command::ClearTopicPermission {
                vhost,
                user,
                exchange,
            } => {
                broker
                    .auth
                    .clear_topic_permission(vhost, user, exchange.as_deref());
                Ok(())
            }
            Command::SetVhostLimits { vhost, limits } => {
                match broker.change_vhost_limits(vhost, |m| *m = limits.clone()) {
                    Ok(Some(_)) => Ok(()),
                    Ok(None) => Err(format!("no vhost '{vhost}' on this node")),
                    Err(e) => Err(e.text),
                }
            }
            Command::SetUserLimits { user, limits } => broker
                .auth
                .change_user_limits(user, |m| *m = limits.clone())
                .map(drop)
                .ok_or_else(|| format!("no user '{user}' on this node")),
            Command::SetGlobalParameter { name, value } => match value {
                Some(text) => serde_json::from_str(text)
                    .map_err(|e| format!("global parameter '{name}' is not JSON: {e}"))
                    .and_then(|v| broker.global.put(name, v).map_err(|e| e.to_string()))
                    .map(drop),
                None => broker
                    .global
                    .delete(name)
                    .map(drop)
                    .map_err(|e| e.to_string()),
            },
            Command::SetParameter {
                component,
                vhost,
                name,
                value,
            } => {
                if broker.vhost(vhost).is_none() {
                    return Some(Err(format!("no vhost '{vhost}' on this node")));
                }
                let p = &broker.parameters;
                match value {
                    Some(text) => serde_json::from_str(text)
                        .map_err(|e| format!("parameter '{name}' is not JSON: {e}"))
                        .and_then(|v| p.put(component, vhost, name, v).map_err(|e| e.to_string()))
                        .map(drop),
                    None => p
                        .delete(component, vhost, name)
                        .map(drop)
                        .map_err(|e| e.to_string()),
                }
            }
            _ => return None,
        })
    }
}

/// What the metadata group has committed: the records, keyed by vhost and
/// name. A snapshot of the group is this model; installing one replays it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Metadata {
    pub vhosts: BTreeMap<String, Command>,
    pub users: BTreeMap<String, Command>,
    pub permissions: BTreeMap<String, Command>,
    pub policies: BTreeMap<String, Command>,
    pub exchanges: BTreeMap<String, Command>,
    pub queues: BTreeMap<String, Command>,
    pub bindings: BTreeMap<String, BindingRec>,
    pub operator_policies: BTreeMap<String, Command>,
    /// Keyed by vhost, user and exchange.
    pub topic_permissions: BTreeMap<String, Command>,
    pub vhost_limits: BTreeMap<String, Command>,
    pub user_limits: BTreeMap<String, Command>,
    /// Global runtime parameters, keyed by name (absent in models written
    /// before they were replicated).
    pub global_parameters: BTreeMap<String, Command>,
    /// Vhosts' runtime parameters, keyed by vhost, component and name
    /// ([`parameter_key`]; absent in models written before they were
    /// replicated).
    pub parameters: BTreeMap<String, Command>,
    /// Quorum queues' Raft groups, keyed like `queues`.
    pub quorum: BTreeMap<String, QuorumRec>,
    /// Which declaration each queue record is, keyed like `queues`: the log
    /// index of the last entry that declared it (a redeclare too), set by the
    /// state machine; absent (0) in models written before it was kept. A
    /// [`Command::QueueGone`] names the one it deletes.
    pub declared: BTreeMap<String, u64>,
}

/// A quorum queue's Raft group as the metadata records it: chosen when its
/// declaration is applied (the same on every node: from the metadata
/// group's membership at that log position), its leader as last announced.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuorumRec {
    /// Unique per declaration (a queue deleted and declared again gets a
    /// new group): `vhost/name/<log index of the declaration>`.
    pub group: String,
    /// Node names; the first is the declaring node, which initialises it.
    pub members: Vec<String>,
    /// Where the queue is served (None until a leader announced itself).
    pub leader: Option<String>,
}

pub(crate) fn key(vhost: &str, name: &str) -> String {
    format!("{vhost}\0{name}")
}

/// A runtime parameter's key in [`Metadata::parameters`]: its vhost first,
/// as every per-vhost record's.
fn parameter_key(vhost: &str, component: &str, name: &str) -> String {
    format!("{vhost}\0{component}\0{name}")
}

impl Metadata {
    /// Nothing replicated yet.
    pub fn is_empty(&self) -> bool {
        self.vhosts.is_empty()
            && self.users.is_empty()
            && self.permissions.is_empty()
            && self.policies.is_empty()
            && self.exchanges.is_empty()
            && self.queues.is_empty()
            && self.bindings.is_empty()
            && self.operator_policies.is_empty()
            && self.topic_permissions.is_empty()
            && self.vhost_limits.is_empty()
            && self.user_limits.is_empty()
            && self.global_parameters.is_empty()
            && self.parameters.is_empty()
    }

    /// Record a committed command (pure: no broker, no I/O).
    pub fn record(&mut self, cmd: &Command) {
        match cmd {
            Command::DeclareExchange { vhost, name, .. } => {
                self.exchanges.insert(key(vhost, name), cmd.clone());
            }
            Command::DeleteExchange { vhost, name } => {
                self.exchanges.remove(&key(vhost, name));
                self.bindings
                    .retain(|_, b| b.vhost != *vhost || b.source != *name);
                self.remove_destination(vhost, true, name);
            }
            Command::DeclareQueue { vhost, name, .. } => {
                // A redeclare on another node does not move the queue: it
                // keeps the home node of its first declaration.
                let mut cmd = cmd.clone();
                if let (
                    Some(Command::DeclareQueue { node: home, .. }),
                    Command::DeclareQueue { node, .. },
                ) = (self.queues.get(&key(vhost, name)), &mut cmd)
                {
                    node.clone_from(home);
                }
                self.queues.insert(key(vhost, name), cmd);
            }
            Command::QueueLeader {
                vhost,
                name,
                group,
                node,
            } => {
                if let Some(q) = self.quorum.get_mut(&key(vhost, name)) {
                    if q.group == *group {
                        q.leader = Some(node.clone());
                    }
                }
            }
            Command::QuorumMembers {
                vhost,
                name,
                group,
                members,
            } => {
                if let Some(q) = self.quorum.get_mut(&key(vhost, name)) {
                    if q.group == *group && !members.is_empty() {
                        q.members.clone_from(members);
                    }
                }
            }
            Command::DeleteQueue { vhost, name } => {
                self.quorum.remove(&key(vhost, name));
                self.queues.remove(&key(vhost, name));
                self.declared.remove(&key(vhost, name));
                self.remove_destination(vhost, false, name);
            }
            Command::QueueGone { vhost, name, .. } => {
                if self.is_incarnation(cmd) {
                    self.record(&Command::DeleteQueue {
                        vhost: vhost.clone(),
                        name: name.clone(),
                    });
                }
            }
            Command::Bind(b) => {
                self.bindings.insert(b.key(), b.clone());
            }
            Command::Unbind(b) => {
                if self.bindings.remove(&b.key()).is_some() {
                    self.drop_if_unbound(&b.vhost, &b.source);
                }
            }
            Command::PutVhost { name, .. } => {
                self.vhosts.insert(name.clone(), cmd.clone());
            }
            Command::DeleteVhost { name } => {
                let prefix = format!("{name}\0");
                self.vhosts.remove(name);
                for map in [
                    &mut self.permissions,
                    &mut self.policies,
                    &mut self.exchanges,
                    &mut self.queues,
                    &mut self.operator_policies,
                    &mut self.topic_permissions,
                    &mut self.parameters,
                ] {
                    map.retain(|k, _| !k.starts_with(&prefix));
                }
                self.bindings.retain(|_, b| b.vhost != *name);
                self.quorum.retain(|k, _| !k.starts_with(&prefix));
                self.declared.retain(|k, _| !k.starts_with(&prefix));
                self.vhost_limits.remove(name);
            }
            Command::PutUser { name, .. } => {
                self.users.insert(name.clone(), cmd.clone());
            }
            Command::DeleteUser { name } => {
                self.users.remove(name);
                self.permissions.retain(
                    |_, p| !matches!(p, Command::SetPermission { user, .. } if user == name),
                );
                self.topic_permissions.retain(
                    |_, p| !matches!(p, Command::SetTopicPermission { user, .. } if user == name),
                );
                self.user_limits.remove(name);
            }
            Command::SetPermission { vhost, user, .. } => {
                self.permissions.insert(key(vhost, user), cmd.clone());
            }
            Command::ClearPermission { vhost, user } => {
                self.permissions.remove(&key(vhost, user));
            }
            Command::PutPolicy {
                vhost,
                name,
                operator,
                ..
            } => {
                self.policy_map(*operator)
                    .insert(key(vhost, name), cmd.clone());
            }
            Command::DeletePolicy {
                vhost,
                name,
                operator,
            } => {
                self.policy_map(*operator).remove(&key(vhost, name));
            }
            Command::SetTopicPermission {
                vhost,
                user,
                exchange,
                ..
            } => {
                let k = format!("{}\0{exchange}", key(vhost, user));
                self.topic_permissions.insert(k, cmd.clone());
            }
            Command::ClearTopicPermission {
                vhost,
                user,
                exchange,
            } => {
                let prefix = format!("{}\0", key(vhost, user));
                match exchange {
                    Some(x) => drop(self.topic_permissions.remove(&format!("{prefix}{x}"))),
                    None => self
                        .topic_permissions
                        .retain(|k, _| !k.starts_with(&prefix)),
                }
            }
            Command::SetVhostLimits { vhost, limits } => {
                if limits.is_empty() {
                    self.vhost_limits.remove(vhost);
                } else {
                    self.vhost_limits.insert(vhost.clone(), cmd.clone());
                }
            }
            Command::SetUserLimits { user, limits } => {
                if limits.is_empty() {
                    self.user_limits.remove(user);
                } else {
                    self.user_limits.insert(user.clone(), cmd.clone());
                }
            }
            Command::SetGlobalParameter { name, value } => {
                if value.is_some() {
                    self.global_parameters.insert(name.clone(), cmd.clone());
                } else {
                    self.global_parameters.remove(name);
                }
            }
            Command::SetParameter {
                component,
                vhost,
                name,
                value,
            } => {
                let k = parameter_key(vhost, component, name);
                if value.is_some() {
                    self.parameters.insert(k, cmd.clone());
                } else {
                    self.parameters.remove(&k);
                }
            }
            Command::Batch(cmds) => {
                for c in cmds {
                    self.record(c);
                }
            }
        }
    }

    /// `cmd`, committed as the log entry `index`, was recorded: every queue
    /// record it declared (or declared again) is that declaration from now
    /// on ([`Self::declared`]). Returns those queues (vhost, name).
    pub fn note_declared(&mut self, cmd: &Command, index: u64) -> Vec<(String, String)> {
        let mut out = Vec::new();
        match cmd {
            Command::DeclareQueue { vhost, name, .. } => {
                let k = key(vhost, name);
                if self.queues.contains_key(&k) {
                    self.declared.insert(k, index);
                    out.push((vhost.clone(), name.clone()));
                }
            }
            Command::Batch(cmds) => {
                for c in cmds {
                    out.extend(self.note_declared(c, index));
                }
            }
            _ => {}
        }
        out
    }

    /// Whether `gone` (a [`Command::QueueGone`]) names the queue record as
    /// it is now: the same node serves it and no declaration came since.
    pub fn is_incarnation(&self, gone: &Command) -> bool {
        let Command::QueueGone {
            vhost,
            name,
            node,
            declared,
        } = gone
        else {
            return false;
        };
        let k = key(vhost, name);
        self.queues.contains_key(&k)
            && self.queue_node(vhost, name) == Some(node.as_str())
            && self.declared.get(&k).copied().unwrap_or(0) == *declared
    }

    /// Remove every binding to the queue (or exchange, `to_exchange`) `name`
    /// of `vhost`, and the auto-delete exchanges that leaves without
    /// bindings, as the broker does (`VHost::remove_queue`, `delete_exchange`).
    fn remove_destination(&mut self, vhost: &str, to_exchange: bool, name: &str) {
        let mut sources = std::collections::BTreeSet::new();
        self.bindings.retain(|_, b| {
            let to_it = b.vhost == vhost && b.to_exchange == to_exchange && b.destination == name;
            if to_it {
                sources.insert(b.source.clone());
            }
            !to_it
        });
        for source in sources {
            self.drop_if_unbound(vhost, &source);
        }
    }

    /// An auto-delete exchange whose last binding went is deleted, as the
    /// broker deletes it on every node that applies the change (what goes
    /// with it goes too).
    fn drop_if_unbound(&mut self, vhost: &str, source: &str) {
        let auto_delete = matches!(
            self.exchanges.get(&key(vhost, source)),
            Some(Command::DeclareExchange {
                auto_delete: true,
                ..
            })
        );
        let bound = self
            .bindings
            .values()
            .any(|b| b.vhost == vhost && b.source == source);
        if auto_delete && !bound {
            self.record(&Command::DeleteExchange {
                vhost: vhost.to_string(),
                name: source.to_string(),
            });
        }
    }

    fn policy_map(&mut self, operator: bool) -> &mut BTreeMap<String, Command> {
        if operator {
            &mut self.operator_policies
        } else {
            &mut self.policies
        }
    }

    /// The commands that rebuild this model on an empty node, in an order that
    /// works: global parameters, vhosts, users, permissions, topic
    /// permissions, limits, policies, exchanges, queues, bindings.
    pub fn replay(&self) -> Vec<Command> {
        let mut out: Vec<Command> = self.global_parameters.values().cloned().collect();
        out.extend(self.vhosts.values().cloned());
        out.extend(self.users.values().cloned());
        out.extend(self.permissions.values().cloned());
        out.extend(self.topic_permissions.values().cloned());
        out.extend(self.vhost_limits.values().cloned());
        out.extend(self.parameters.values().cloned());
        out.extend(self.user_limits.values().cloned());
        out.extend(self.policies.values().cloned());
        out.extend(self.operator_policies.values().cloned());
        out.extend(self.exchanges.values().cloned());
        out.extend(self.queues.values().cloned());
        out.extend(self.bindings.values().cloned().map(Command::Bind));
        out
    }

    /// What `broker` has of the replicated kinds, as a model (for
    /// [`Self::removals`]): its exchanges (not the default and `amq.*` ones
    /// every vhost has), named non-exclusive queues and their bindings, topic
    /// permissions, limits, policies, operator policies, global and vhost
    /// runtime parameters. Vhosts, users and
    /// permissions are taken from `replicated` (the model this node had)
    /// instead: every node makes the default vhost and user at boot, and those
    /// are not records of the group until someone changes them.
    pub fn of_broker(broker: &Broker, replicated: &Metadata) -> Metadata {
        let mut m = Metadata {
            vhosts: replicated.vhosts.clone(),
            users: replicated.users.clone(),
            permissions: replicated.permissions.clone(),
            ..Metadata::default()
        };
        let put = |vhost: &str, p: &crate::broker::policy::Policy, operator| Command::PutPolicy {
            vhost: vhost.to_string(),
            name: p.name.clone(),
            pattern: p.pattern.clone(),
            apply_to: p.apply_to.as_str().into(),
            priority: p.priority,
            definition: serde_json::Value::Object(p.definition.clone()).to_string(),
            operator,
        };
        for v in broker.vhosts() {
            let vhost = v.name.to_string();
            for p in v.policies.list() {
                m.record(&put(&vhost, &p, false));
            }
            for p in v.operator_policies.list() {
                m.record(&put(&vhost, &p, true));
            }
            m.record(&Command::SetVhostLimits {
                vhost: vhost.clone(),
                limits: v.limit_values.all(),
            });
            for e in v.exchanges() {
                if e.name.is_empty() || e.name.starts_with("amq.") {
                    continue;
                }
                m.record(&Command::DeclareExchange {
                    vhost: vhost.clone(),
                    name: e.name.to_string(),
                    kind: e.type_name().into(),
                    durable: e.durable,
                    auto_delete: e.auto_delete,
                    internal: e.internal,
                    arguments: Args::from_table(&e.arguments),
                });
            }
            let mut local = std::collections::BTreeSet::new();
            for q in v.queues() {
                // Exclusive and server-named queues are this node's own.
                if q.spec.exclusive_owner.is_some() || q.name().starts_with("amq.") {
                    local.insert(q.name().to_string());
                    continue;
                }
                m.record(&Command::DeclareQueue {
                    vhost: vhost.clone(),
                    name: q.name().to_string(),
                    node: String::new(),
                    durable: q.spec.durable,
                    auto_delete: q.spec.auto_delete,
                    arguments: Args::from_table(&q.spec.arguments),
                });
            }
            for (source, b) in v.bindings() {
                let to_local =
                    matches!(&b.destination, Destination::Queue(q) if local.contains(&**q));
                if source.is_empty() || to_local {
                    continue;
                }
                m.record(&Command::binding(
                    true,
                    &vhost,
                    &source,
                    &b.destination,
                    &b.routing_key,
                    &b.arguments,
                ));
            }
        }
        for (vhost, user, p) in broker.auth.topic_permissions() {
            m.record(&Command::SetTopicPermission {
                vhost,
                user,
                exchange: p.exchange,
                write: p.write,
                read: p.read,
            });
        }
        for (user, limits) in broker.auth.all_user_limits() {
            m.record(&Command::SetUserLimits { user, limits });
        }
        for (name, value) in broker.global.list() {
            m.record(&Command::SetGlobalParameter {
                name,
                value: Some(value.to_string()),
            });
        }
        for (component, vhost, name, value) in broker.parameters.all() {
            m.record(&Command::SetParameter {
                component,
                vhost,
                name,
                value: Some(value.to_string()),
            });
        }
        m
    }

    /// The deletes that take `have` to this model: one for every record of
    /// `have` this model lacks, the dependent ones first (bindings, queues,
    /// runtime parameters, exchanges, policies, limits, topic permissions,
    /// permissions, users, vhosts, global parameters). Records both have are left to the replay,
    /// which updates them.
    pub fn removals(&self, have: &Metadata) -> Vec<Command> {
        let gone = |mine: &BTreeMap<String, Command>, theirs: &BTreeMap<String, Command>| {
            theirs
                .iter()
                .filter(|(k, _)| !mine.contains_key(*k))
                .map(|(_, c)| c.clone())
                .collect::<Vec<_>>()
        };
        let mut out: Vec<Command> = have
            .bindings
            .iter()
            .filter(|(k, _)| !self.bindings.contains_key(*k))
            .map(|(_, b)| Command::Unbind(b.clone()))
            .collect();
        let deletes = gone(&self.queues, &have.queues)
            .into_iter()
            .chain(gone(&self.parameters, &have.parameters))
            .chain(gone(&self.exchanges, &have.exchanges))
            .chain(gone(&self.policies, &have.policies))
            .chain(gone(&self.operator_policies, &have.operator_policies))
            .chain(gone(&self.vhost_limits, &have.vhost_limits))
            .chain(gone(&self.user_limits, &have.user_limits))
            .chain(gone(&self.topic_permissions, &have.topic_permissions))
            .chain(gone(&self.permissions, &have.permissions))
            .chain(gone(&self.users, &have.users))
            .chain(gone(&self.vhosts, &have.vhosts))
            .chain(gone(&self.global_parameters, &have.global_parameters))
            .filter_map(|c| c.undo());
        out.extend(deletes);
        out
    }

    /// What forgetting `node` for good changes, as RabbitMQ's
    /// `forget_cluster_node` does: the queue records homed on it that are not
    /// quorum queues (classic queues and streams: their only copy was
    /// there) are deleted, with their bindings; `node` leaves the quorum
    /// queues' groups it was a member of, except where it is the only member
    /// (such a queue stays, unavailable, until deleted).
    pub fn forgotten(&self, node: &str) -> Vec<Command> {
        let mut cmds = Vec::new();
        for (k, cmd) in &self.queues {
            if let Command::DeclareQueue {
                vhost,
                name,
                node: home,
                ..
            } = cmd
            {
                if home == node && !self.quorum.contains_key(k) {
                    cmds.push(Command::DeleteQueue {
                        vhost: vhost.clone(),
                        name: name.clone(),
                    });
                }
            }
        }
        for (k, rec) in &self.quorum {
            let Some(Command::DeclareQueue { vhost, name, .. }) = self.queues.get(k) else {
                continue;
            };
            if rec.members.iter().any(|m| m == node) && rec.members.len() > 1 {
                cmds.push(Command::QuorumMembers {
                    vhost: vhost.clone(),
                    name: name.clone(),
                    group: rec.group.clone(),
                    members: rec.members.iter().filter(|m| *m != node).cloned().collect(),
                });
            }
        }
        cmds
    }

    /// The node a queue is served on: its home node, or for a replicated
    /// quorum queue the leader of its group once one announced itself.
    pub fn queue_node(&self, vhost: &str, name: &str) -> Option<&str> {
        if let Some(l) = self
            .quorum
            .get(&key(vhost, name))
            .and_then(|q| q.leader.as_deref())
        {
            return Some(l);
        }
        match self.queues.get(&key(vhost, name)) {
            Some(Command::DeclareQueue { node, .. }) => Some(node),
            _ => None,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn bind(source: &str, queue: &str) -> Command {
        Command::Bind(BindingRec {
            vhost: "/".into(),
            source: source.into(),
            to_exchange: false,
            destination: queue.into(),
            routing_key: "k".into(),
            arguments: Args::default(),
        })
    }

    pub(crate) fn queue(name: &str) -> Command {
        Command::DeclareQueue {
            vhost: "/".into(),
            name: name.into(),
            node: "warren@a".into(),
            durable: true,
            auto_delete: false,
            arguments: Args::default(),
        }
    }

    #[test]
    fn quorum_members_replace_the_members_of_that_group_only() {
        let mut m = Metadata::default();
        m.quorum.insert(
            key("/", "q"),
            QuorumRec {
                group: "//q/7".into(),
                members: vec!["warren@a".into(), "warren@b".into()],
                leader: Some("warren@a".into()),
            },
        );
        let change = |group: &str, members: &[&str]| Command::QuorumMembers {
            vhost: "/".into(),
            name: "q".into(),
            group: group.into(),
            members: members.iter().map(|s| s.to_string()).collect(),
        };
        // Another (older) group of a queue with the same name: ignored.
        m.record(&change("//q/3", &["warren@c"]));
        // No members at all: ignored (a group keeps at least one).
        m.record(&change("//q/7", &[]));
        assert_eq!(m.quorum[&key("/", "q")].members, ["warren@a", "warren@b"]);
        m.record(&change("//q/7", &["warren@a", "warren@b", "warren@c"]));
        let rec = &m.quorum[&key("/", "q")];
        assert_eq!(rec.members, ["warren@a", "warren@b", "warren@c"]);
        assert_eq!(rec.leader.as_deref(), Some("warren@a"), "the leader stays");
        // A queue without a group record gets none from it.
        m.record(&Command::QuorumMembers {
            vhost: "/".into(),
            name: "other".into(),
            group: "//other/9".into(),
            members: vec!["warren@a".into()],
        });
        assert!(!m.quorum.contains_key(&key("/", "other")));
    }

    #[test]
    fn forgetting_a_node_deletes_its_queues_and_leaves_its_groups() {
        let on = |name: &str, node: &str| Command::DeclareQueue {
            vhost: "/".into(),
            name: name.into(),
            node: node.into(),
            durable: true,
            auto_delete: false,
            arguments: Args::default(),
        };
        let mut m = Metadata::default();
        for c in [on("cq.c", "warren@c"), on("cq.a", "warren@a")] {
            m.record(&c);
        }
        for (name, members) in [
            ("qq.abc", &["warren@c", "warren@a", "warren@b"][..]),
            ("qq.c", &["warren@c"][..]),
            ("qq.ab", &["warren@a", "warren@b"][..]),
        ] {
            m.record(&on(name, members[0]));
            m.quorum.insert(
                key("/", name),
                QuorumRec {
                    group: format!("//{name}/1"),
                    members: members.iter().map(|s| s.to_string()).collect(),
                    leader: None,
                },
            );
        }
        assert_eq!(
            m.forgotten("warren@c"),
            vec![
                Command::DeleteQueue {
                    vhost: "/".into(),
                    name: "cq.c".into(),
                },
                Command::QuorumMembers {
                    vhost: "/".into(),
                    name: "qq.abc".into(),
                    group: "//qq.abc/1".into(),
                    members: vec!["warren@a".into(), "warren@b".into()],
                },
            ]
        );
        assert!(m.forgotten("warren@z").is_empty());
    }

    pub(crate) fn exchange(name: &str) -> Command {
        Command::DeclareExchange {
            vhost: "/".into(),
            name: name.into(),
            kind: "direct".into(),
            durable: true,
            auto_delete: false,
            internal: false,
            arguments: Args::default(),
        }
    }

    #[test]
    fn deletes_take_their_bindings_along() {
        let mut m = Metadata::default();
        for c in [
            exchange("x"),
            queue("q"),
            queue("r"),
            bind("x", "q"),
            bind("x", "r"),
        ] {
            m.record(&c);
        }
        assert_eq!(m.bindings.len(), 2);
        assert_eq!(m.queue_node("/", "q"), Some("warren@a"));
        m.record(&Command::DeleteQueue {
            vhost: "/".into(),
            name: "q".into(),
        });
        assert_eq!(m.bindings.len(), 1);
        m.record(&Command::DeleteExchange {
            vhost: "/".into(),
            name: "x".into(),
        });
        assert!(m.bindings.is_empty());
        assert_eq!(m.replay(), vec![queue("r")]);
    }

    #[test]
    fn a_self_deleted_queue_goes_only_while_the_record_is_that_declaration() {
        let gone = |node: &str, declared: u64| Command::QueueGone {
            vhost: "/".into(),
            name: "q".into(),
            node: node.into(),
            declared,
        };
        let mut m = Metadata::default();
        for c in [exchange("x"), queue("q"), bind("x", "q")] {
            m.record(&c);
        }
        m.declared.insert(key("/", "q"), 5);
        // Declared again since (entry 9): the older incarnation's deletion
        // leaves the record and its binding alone.
        m.declared.insert(key("/", "q"), 9);
        m.record(&gone("warren@a", 5));
        assert!(m.queues.contains_key(&key("/", "q")));
        assert_eq!(m.bindings.len(), 1);
        // Another node does not speak for a queue served on warren@a.
        m.record(&gone("warren@b", 9));
        assert!(m.queues.contains_key(&key("/", "q")));
        // The home node, that declaration: gone, with its binding.
        m.record(&gone("warren@a", 9));
        assert!(!m.queues.contains_key(&key("/", "q")));
        assert!(!m.declared.contains_key(&key("/", "q")));
        assert!(m.bindings.is_empty());
        assert_eq!(m.replay(), vec![exchange("x")]);
        // Again (a retry, a duplicate): nothing to do, nothing refused.
        let before = m.clone();
        m.record(&gone("warren@a", 9));
        assert_eq!(m, before);
        // A record from before declarations were kept counts as 0.
        m.record(&queue("q"));
        m.record(&gone("warren@a", 0));
        assert!(m.queues.is_empty());
    }

    #[test]
    fn an_auto_delete_exchange_goes_with_its_last_binding() {
        let auto = |name: &str| match exchange(name) {
            Command::DeclareExchange {
                vhost,
                name,
                kind,
                durable,
                internal,
                arguments,
                ..
            } => Command::DeclareExchange {
                vhost,
                name,
                kind,
                durable,
                auto_delete: true,
                internal,
                arguments,
            },
            c => c,
        };
        let e2e = |source: &str, dest: &str| match bind(source, dest) {
            Command::Bind(mut b) => {
                b.to_exchange = true;
                Command::Bind(b)
            }
            c => c,
        };
        let mut m = Metadata::default();
        for c in [
            auto("ad"),
            auto("up"),
            exchange("plain"),
            queue("q"),
            queue("r"),
            bind("ad", "q"),
            bind("ad", "r"),
            bind("plain", "q"),
            e2e("up", "ad"),
        ] {
            m.record(&c);
        }
        let unbind = |source: &str, queue: &str| match bind(source, queue) {
            Command::Bind(b) => Command::Unbind(b),
            c => c,
        };
        // Not its last binding: stays.
        m.record(&unbind("ad", "q"));
        assert!(m.exchanges.contains_key(&key("/", "ad")));
        // An unbind of what is not bound removes nothing.
        m.record(&unbind("ad", "q"));
        assert!(m.exchanges.contains_key(&key("/", "ad")));
        // Its last binding goes with its queue: "ad" goes, and "up", whose
        // only binding was to "ad", with it; "plain" is not auto-delete.
        m.record(&unbind("plain", "q"));
        m.record(&Command::DeleteQueue {
            vhost: "/".into(),
            name: "r".into(),
        });
        assert!(!m.exchanges.contains_key(&key("/", "ad")));
        assert!(!m.exchanges.contains_key(&key("/", "up")));
        assert!(m.exchanges.contains_key(&key("/", "plain")));
        assert!(m.bindings.is_empty());
    }

    #[test]
    fn replay_puts_bindings_after_their_ends_and_survives_json() {
        let mut m = Metadata::default();
        for c in [bind("x", "q"), queue("q"), exchange("x")] {
            m.record(&c);
        }
        let json = serde_json::to_vec(&m).unwrap();
        let back: Metadata = serde_json::from_slice(&json).unwrap();
        assert_eq!(back, m);
        assert_eq!(
            back.replay(),
            vec![exchange("x"), queue("q"), bind("x", "q")]
        );
    }

    #[test]
    fn deleting_a_vhost_or_user_takes_what_hangs_off_it() {
        let mut m = Metadata::default();
        let perm = |vhost: &str, user: &str| Command::SetPermission {
            vhost: vhost.into(),
            user: user.into(),
            configure: ".*".into(),
            write: ".*".into(),
            read: ".*".into(),
        };
        for c in [
            Command::PutVhost {
                name: "/".into(),
                creator: None,
                meta: None,
            },
            Command::PutUser {
                name: "ann".into(),
                password_hash: "h".into(),
                tags: vec![],
            },
            perm("/", "ann"),
            perm("other", "ann"),
            perm("/", "bob"),
            exchange("x"),
            queue("q"),
            bind("x", "q"),
        ] {
            m.record(&c);
        }
        m.record(&Command::DeleteUser { name: "ann".into() });
        assert_eq!(m.permissions.len(), 1);
        m.record(&Command::DeleteVhost { name: "/".into() });
        assert!(m.permissions.is_empty() && m.exchanges.is_empty() && m.queues.is_empty());
        assert!(m.bindings.is_empty() && m.vhosts.is_empty());
        assert!(m.is_empty());
    }

    #[test]
    fn a_batch_records_each_command_and_tenancy_goes_with_its_vhost_and_user() {
        let mut m = Metadata::default();
        let limits = BTreeMap::from([("max-queues".to_string(), 5)]);
        m.record(&Command::Batch(vec![
            Command::PutVhost {
                name: "v".into(),
                creator: None,
                meta: None,
            },
            Command::SetTopicPermission {
                vhost: "v".into(),
                user: "ann".into(),
                exchange: "amq.topic".into(),
                write: "^w".into(),
                read: ".*".into(),
            },
            Command::SetTopicPermission {
                vhost: "v".into(),
                user: "ann".into(),
                exchange: "t2".into(),
                write: ".*".into(),
                read: ".*".into(),
            },
            Command::SetVhostLimits {
                vhost: "v".into(),
                limits: limits.clone(),
            },
            Command::SetUserLimits {
                user: "ann".into(),
                limits,
            },
            Command::PutPolicy {
                vhost: "v".into(),
                name: "cap".into(),
                pattern: ".*".into(),
                apply_to: "queues".into(),
                priority: 0,
                definition: "{}".into(),
                operator: true,
            },
            Command::SetGlobalParameter {
                name: "cluster_name".into(),
                value: Some(r#""farm""#.into()),
            },
        ]));
        assert_eq!(m.topic_permissions.len(), 2);
        assert_eq!(m.operator_policies.len(), 1);
        assert!(m.policies.is_empty(), "an operator policy is not a policy");
        assert_eq!(m.global_parameters.len(), 1);
        // Replayed after the vhost, as JSON and back.
        let back: Metadata = serde_json::from_slice(&serde_json::to_vec(&m).unwrap()).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.replay().len(), 7);
        // And as the cluster's codec writes snapshots.
        let packed = crate::cluster::codec::encode(&m).unwrap();
        assert_eq!(
            crate::cluster::codec::decode::<Metadata>(&packed).unwrap(),
            m
        );
        m.record(&Command::ClearTopicPermission {
            vhost: "v".into(),
            user: "ann".into(),
            exchange: Some("t2".into()),
        });
        assert_eq!(m.topic_permissions.len(), 1);
        m.record(&Command::DeleteUser { name: "ann".into() });
        assert!(m.topic_permissions.is_empty() && m.user_limits.is_empty());
        m.record(&Command::DeleteVhost { name: "v".into() });
        assert!(!m.is_empty(), "a global parameter is still there");
        m.record(&Command::SetGlobalParameter {
            name: "cluster_name".into(),
            value: None,
        });
        assert!(m.is_empty(), "{m:?}");
    }

    #[test]
    fn global_parameters_are_set_cleared_removed_and_read_from_old_models() {
        let set = |name: &str, value: Option<&str>| Command::SetGlobalParameter {
            name: name.into(),
            value: value.map(String::from),
        };
        let mut m = Metadata::default();
        m.record(&set("cluster_name", Some(r#""farm""#)));
        m.record(&set("other", Some(r#"{"a":[1,2]}"#)));
        m.record(&set("cluster_name", Some(r#""farm-2""#)));
        assert_eq!(m.global_parameters.len(), 2);
        assert_eq!(
            m.replay()[0],
            set("cluster_name", Some(r#""farm-2""#)),
            "the last value is replayed"
        );
        // Clearing what is not set is nothing; clearing what is removes it.
        m.record(&set("absent", None));
        m.record(&set("other", None));
        assert_eq!(m.replay(), vec![set("cluster_name", Some(r#""farm-2""#))]);
        // A snapshot without it clears what a node holds; one with it keeps it.
        let mut have = Metadata::default();
        have.record(&set("cluster_name", Some(r#""old""#)));
        have.record(&set("stale", Some("1")));
        assert_eq!(m.removals(&have), vec![set("stale", None)]);
        // Every command survives the log's codec.
        for c in [set("a", Some("null")), set("a", None)] {
            let packed = crate::cluster::codec::encode(&c).unwrap();
            assert_eq!(
                crate::cluster::codec::decode::<Command>(&packed).unwrap(),
                c
            );
        }
        // A model written before global parameters were replicated has none.
        let old: Metadata = serde_json::from_str(r#"{"vhosts":{}}"#).unwrap();
        assert!(old.global_parameters.is_empty() && old.is_empty());
    }

    #[test]
    fn vhost_parameters_are_replayed_removed_and_go_with_their_vhost() {
        let set = |vhost: &str, name: &str, value: Option<&str>| Command::SetParameter {
            component: "shovel".into(),
            vhost: vhost.into(),
            name: name.into(),
            value: value.map(String::from),
        };
        let mut m = Metadata::default();
        m.record(&Command::PutVhost {
            name: "v".into(),
            creator: None,
            meta: None,
        });
        m.record(&set("/", "a", Some("1")));
        m.record(&set("v", "b", Some("2")));
        m.record(&set("/", "a", Some("3")));
        assert!(!m.is_empty());
        let replay = m.replay();
        let vhost_at = replay
            .iter()
            .position(|c| matches!(c, Command::PutVhost { .. }));
        let param_at = replay.iter().position(|c| *c == set("v", "b", Some("2")));
        assert!(vhost_at < param_at, "a vhost before its parameters");
        assert!(replay.contains(&set("/", "a", Some("3"))), "the last value");
        // A snapshot without one clears it on a node that has it.
        let mut have = Metadata::default();
        have.record(&set("/", "stale", Some("0")));
        have.record(&set("/", "a", Some("1")));
        assert_eq!(m.removals(&have), vec![set("/", "stale", None)]);
        // A deleted vhost takes its parameters.
        m.record(&Command::DeleteVhost { name: "v".into() });
        assert_eq!(m.parameters.len(), 1);
        m.record(&set("/", "a", None));
        assert!(m.parameters.is_empty());
        // Applied to a broker: set, cleared, refused for a missing vhost.
        let broker = Broker::new(&crate::Config::default());
        set("/", "a", Some(r#"{"x":1}"#))
            .apply_to(&broker, 0)
            .expect("set");
        assert_eq!(
            broker.parameters.get("shovel", "/", "a"),
            Some(serde_json::json!({"x": 1}))
        );
        assert!(set("nope", "a", Some("1")).apply_to(&broker, 0).is_err());
        set("/", "a", None).apply_to(&broker, 0).expect("clear");
        assert_eq!(broker.parameters.get("shovel", "/", "a"), None);
    }

    #[test]
    fn a_global_parameter_is_applied_to_the_broker() {
        let broker = Broker::new(&crate::Config::default());
        let set = |value: Option<&str>| Command::SetGlobalParameter {
            name: "cluster_name".into(),
            value: value.map(String::from),
        };
        set(Some(r#""farm""#)).apply_to(&broker, 0).expect("set");
        assert_eq!(broker.cluster_name(), "farm");
        let model = Metadata::of_broker(&broker, &Metadata::default());
        assert_eq!(model.replay(), vec![set(Some(r#""farm""#))]);
        assert!(set(Some("not json")).apply_to(&broker, 0).is_err());
        assert_eq!(broker.cluster_name(), "farm");
        set(None).apply_to(&broker, 0).expect("clear");
        assert!(broker.global.get("cluster_name").is_none());
        // Clearing again is no error (a replay, a duplicate).
        set(None).apply_to(&broker, 0).expect("clear again");
    }

    #[test]
    fn a_policy_logged_before_operator_policies_reads_as_a_user_policy() {
        let old = r#"{"DeletePolicy":{"vhost":"/","name":"p"}}"#;
        let cmd: Command = serde_json::from_str(old).unwrap();
        assert_eq!(
            cmd,
            Command::DeletePolicy {
                vhost: "/".into(),
                name: "p".into(),
                operator: false
            }
        );
    }

    #[test]
    fn arguments_keep_their_wire_types() {
        let mut t = FieldTable::new();
        t.insert("x-max-length", crate::wire::FieldValue::I32(10));
        t.insert("x-queue-type", crate::wire::FieldValue::string("classic"));
        assert_eq!(Args::from_table(&t).table(), t);
    }
}
