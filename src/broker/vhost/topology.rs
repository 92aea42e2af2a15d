//! Topology: declaring and deleting exchanges and queues, binding and unbinding,
//! and setting policies. This is the one door for every change, whether it comes
//! from an AMQP channel, the admin API, definitions import, recovery or clean-up
//! (exclusive, auto-delete, `x-expires`).
//!
//! Applied here once: the vhost's limits (`max_queues` / `max_exchanges`, 406
//! with RabbitMQ's text), and persistence. A durable record is written while the
//! lock of the in-memory change is held, so the store is never older than memory,
//! and a failed write leaves memory unchanged and fails the change with 541
//! INTERNAL_ERROR. Recovery re-applies stored records without limits or writes.

use super::VHost;
use crate::broker::exchange::{self, Binding, Destination, ExchangeKind, ExchangeStats, Router};
use crate::broker::persist;
use crate::broker::policy::Policy;
use crate::broker::queue::{Queue, QueueArgs, QueueSpec, QueueStats, QueueType};
use crate::error::{AmqpError, AmqpResult};
use crate::storage::StorageError;
use crate::wire::{FieldTable, FieldValue};
use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::Arc;

/// An exchange: its declared properties and routing table.
#[derive(Debug)]
pub struct Exchange {
    pub name: Arc<str>,
    /// How bindings match. For a delayed exchange, the `x-delayed-type`.
    pub kind: ExchangeKind,
    /// `x-delayed-message`: messages with an `x-delay` header wait before routing.
    pub delayed: bool,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
    pub(super) router: RwLock<Box<dyn Router>>,
    /// Messages in and out (counted by the publish path).
    pub stats: ExchangeStats,
}

impl Exchange {
    pub(super) fn new(
        name: &str,
        kind: ExchangeKind,
        delayed: bool,
        durable: bool,
        auto_delete: bool,
        internal: bool,
        arguments: FieldTable,
    ) -> Arc<Exchange> {
        Arc::new(Exchange {
            name: name.into(),
            kind,
            delayed,
            durable,
            auto_delete,
            internal,
            arguments,
            router: RwLock::new(exchange::new_router(kind)),
            stats: ExchangeStats::default(),
        })
    }

    /// The type as declared (`x-delayed-message` for delayed exchanges).
    pub fn type_name(&self) -> &'static str {
        if self.delayed {
            "x-delayed-message"
        } else {
            self.kind.as_str()
        }
    }

    /// The `alternate-exchange` argument.
    pub fn alternate_exchange(&self) -> Option<&str> {
        self.arguments
            .get("alternate-exchange")
            .and_then(|v| v.as_str())
    }

    /// Bindings with this exchange as source.
    pub fn bindings(&self) -> Vec<Binding> {
        self.router.read().bindings()
    }
}

/// What queue.declare / exchange.declare ask for.
#[derive(Debug, Clone, Default)]
pub struct QueueDeclare {
    pub name: String,
    pub passive: bool,
    pub durable: bool,
    pub exclusive: bool,
    pub auto_delete: bool,
    pub arguments: FieldTable,
}

#[derive(Debug, Clone, Default)]
pub struct ExchangeDeclare {
    pub name: String,
    pub kind: String,
    pub passive: bool,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: FieldTable,
}

/// Who asks for a change: a client (limits checked, records written) or recovery
/// from the store (neither: the records are already there).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Origin {
    Client,
    Recovery,
}

/// A failed durable write, as the error of the method that asked for it.
fn store_failed(e: StorageError) -> AmqpError {
    AmqpError::internal_error(format!("cannot store topology: {e}"))
}

fn stored(r: Result<(), StorageError>) -> AmqpResult<()> {
    r.map_err(store_failed)
}

/// Keep the first error of a cascade (later steps still run).
fn keep_first(acc: &mut AmqpResult<()>, r: AmqpResult<()>) {
    if acc.is_ok() {
        *acc = r;
    }
}

/// A redeclare with another argument value, in RabbitMQ's words.
fn inequivalent_arg(
    arg: &str,
    name: &str,
    vhost: &str,
    got: Option<&FieldValue>,
    cur: Option<&FieldValue>,
) -> AmqpError {
    AmqpError::precondition_failed(format!(
        "inequivalent arg '{arg}' for queue '{name}' in vhost '{vhost}': received {} but current is {}",
        describe(got),
        describe(cur)
    ))
}

/// What a quorum queue or a stream cannot be, checked in RabbitMQ's order
/// (`rabbit_queue_type_util`): auto-delete, exclusive, non-durable.
fn check_replicated(d: &QueueDeclare, name: &str, vhost: &str) -> AmqpResult<()> {
    let property = if d.auto_delete {
        "auto-delete"
    } else if d.exclusive {
        "exclusive-owner"
    } else if !d.durable {
        "non-durable"
    } else {
        return Ok(());
    };
    Err(AmqpError::precondition_failed(format!(
        "invalid property '{property}' for queue '{name}' in vhost '{vhost}'"
    )))
}

fn inequivalent(
    what: &str,
    kind: &str,
    name: &str,
    vhost: &str,
    got: String,
    cur: String,
) -> AmqpError {
    AmqpError::precondition_failed(format!(
        "inequivalent arg '{what}' for {kind} '{name}' in vhost '{vhost}': received '{got}' but current is '{cur}'"
    ))
}

/// Queue arguments whose values must match on redeclare, as RabbitMQ checks
/// them: those every type takes, then the existing queue's type's own
/// (RabbitMQ compares the type's `queue_arguments`).
const EQUIVALENCE_ARGS: &[&str] = &[
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-expires",
    "x-max-length",
    "x-max-length-bytes",
    "x-message-ttl",
    "x-overflow",
    "x-queue-type",
    "x-single-active-consumer",
];
const CLASSIC_EQUIVALENCE_ARGS: &[&str] = &[
    "x-max-priority",
    "x-queue-mode",
    // warren's extension: classic queues honour a delivery limit too.
    "x-delivery-limit",
];
const STREAM_EQUIVALENCE_ARGS: &[&str] = &[
    "x-max-age",
    "x-stream-max-segment-size-bytes",
    "x-initial-cluster-size",
    "x-queue-leader-locator",
    "x-stream-filter-size-bytes",
];
const QUORUM_EQUIVALENCE_ARGS: &[&str] = &[
    "x-delivery-limit",
    "x-dead-letter-strategy",
    "x-quorum-initial-group-size",
];

/// An argument's value as RabbitMQ's equivalence error shows it.
fn describe(v: Option<&FieldValue>) -> String {
    let Some(v) = v else {
        return "none".into();
    };
    let value = match v {
        FieldValue::LongString(b) => String::from_utf8_lossy(b).into_owned(),
        FieldValue::Bool(b) => b.to_string(),
        other => other
            .as_i64()
            .map(|i| i.to_string())
            .unwrap_or_else(|| format!("{other:?}")),
    };
    format!("the value '{value}' of type '{}'", v.rabbit_type_name())
}

fn same_arg(key: &str, a: Option<&FieldValue>, b: Option<&FieldValue>) -> bool {
    match (a, b) {
        (Some(x), Some(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(i), Some(j)) => i == j,
            _ => x == y,
        },
        (None, None) => true,
        // A classic queue need not carry its type (rabbitmq-common#341).
        (Some(x), None) | (None, Some(x)) => key == "x-queue-type" && x.as_str() == Some("classic"),
    }
}

impl VHost {
    /// exchange.declare (also the admin API's PUT and definitions import).
    pub fn declare_exchange(&self, d: &ExchangeDeclare) -> AmqpResult<Arc<Exchange>> {
        self.declare_exchange_as(d, Origin::Client)
    }

    /// Re-create a stored exchange at start-up.
    pub(crate) fn recover_exchange(&self, d: &ExchangeDeclare) -> AmqpResult<Arc<Exchange>> {
        self.declare_exchange_as(d, Origin::Recovery)
    }

    fn declare_exchange_as(
        &self,
        d: &ExchangeDeclare,
        origin: Origin,
    ) -> AmqpResult<Arc<Exchange>> {
        if d.name.is_empty() {
            return Err(AmqpError::access_refused(
                "operation not permitted on the default exchange",
            ));
        }
        if d.passive {
            return self.exchange(&d.name);
        }
        if d.name.starts_with("amq.") {
            // Redeclaring a predeclared exchange with its own properties is allowed.
            if let Ok(existing) = self.exchange(&d.name) {
                if existing.kind.as_str() == d.kind && existing.durable == d.durable {
                    return Ok(existing);
                }
            }
            return Err(AmqpError::access_refused(format!(
                "exchange name '{}' contains reserved prefix 'amq.*'",
                d.name
            )));
        }
        let delayed = d.kind == "x-delayed-message";
        let kind = if delayed {
            d.arguments
                .get("x-delayed-type")
                .and_then(|v| v.as_str())
                .and_then(ExchangeKind::parse)
                .ok_or_else(|| {
                    AmqpError::precondition_failed(
                        "Invalid argument, 'x-delayed-type' must be an existing exchange type",
                    )
                })?
        } else {
            // RabbitMQ 4.0 made this a channel error (406); 3.13 closed the
            // connection with 503 COMMAND_INVALID.
            ExchangeKind::parse(&d.kind).ok_or_else(|| {
                AmqpError::precondition_failed(format!("unknown exchange type '{}'", d.kind))
            })?
        };
        let mut exchanges = self.exchanges.write();
        if let Some(existing) = exchanges.get(&d.name) {
            let e = |what: &str, got: String, cur: String| {
                inequivalent(what, "exchange", &d.name, &self.name, got, cur)
            };
            if existing.kind != kind || existing.delayed != delayed {
                return Err(e("type", d.kind.clone(), existing.type_name().into()));
            }
            if existing.durable != d.durable {
                return Err(e(
                    "durable",
                    d.durable.to_string(),
                    existing.durable.to_string(),
                ));
            }
            if existing.auto_delete != d.auto_delete {
                return Err(e(
                    "auto_delete",
                    d.auto_delete.to_string(),
                    existing.auto_delete.to_string(),
                ));
            }
            if existing.internal != d.internal {
                return Err(e(
                    "internal",
                    d.internal.to_string(),
                    existing.internal.to_string(),
                ));
            }
            return Ok(Arc::clone(existing));
        }
        if origin == Origin::Client {
            if let Some(max) = self.limits.max_exchanges {
                if exchanges.len() >= max {
                    return Err(AmqpError::precondition_failed(format!(
                        "cannot declare exchange '{}' in vhost '{}': exchange limit ({max}) is reached",
                        d.name, self.name
                    )));
                }
            }
        }
        let ex = Exchange::new(
            &d.name,
            kind,
            delayed,
            d.durable,
            d.auto_delete,
            d.internal,
            d.arguments.clone(),
        );
        if let (Origin::Client, true, Some(store)) = (origin, ex.durable, &self.store) {
            stored(persist::save_exchange(store, &self.name, &ex))?;
        }
        exchanges.insert(d.name.clone(), Arc::clone(&ex));
        Ok(ex)
    }

    /// exchange.delete: the exchange and every binding to or from it.
    pub fn delete_exchange(&self, name: &str, if_unused: bool) -> AmqpResult<()> {
        if name.is_empty() {
            return Err(AmqpError::access_refused(
                "operation not permitted on the default exchange",
            ));
        }
        if name.starts_with("amq.") {
            return Err(AmqpError::access_refused(format!(
                "deletion of system exchange '{name}' in vhost '{}' not allowed",
                self.name
            )));
        }
        let mut exchanges = self.exchanges.write();
        let Some(ex) = exchanges.get(name).cloned() else {
            // RabbitMQ: deleting a missing exchange succeeds.
            return Ok(());
        };
        if if_unused && !ex.router.read().is_empty() {
            return Err(AmqpError::precondition_failed(format!(
                "exchange '{name}' in vhost '{}' in use",
                self.name
            )));
        }
        self.forget_exchange(&ex)?;
        exchanges.remove(name);
        self.remove_destination_locked(&mut exchanges, &Destination::Exchange(name.into()))
    }

    /// Remove every binding to `dest`, then auto-delete exchanges left without
    /// bindings. Every step runs; the first failed write is returned.
    fn remove_destination_locked(
        &self,
        exchanges: &mut HashMap<String, Arc<Exchange>>,
        dest: &Destination,
    ) -> AmqpResult<()> {
        let mut result = Ok(());
        let mut emptied = Vec::new();
        for ex in exchanges.values() {
            let mut router = ex.router.write();
            if router.remove_destination(dest) > 0 {
                if ex.auto_delete && router.is_empty() {
                    emptied.push(Arc::clone(ex));
                } else {
                    keep_first(&mut result, self.save_bindings(ex, &**router));
                }
            }
        }
        for ex in emptied {
            match self.forget_exchange(&ex) {
                Ok(()) => {
                    exchanges.remove(&*ex.name);
                    let next = Destination::Exchange(Arc::clone(&ex.name));
                    keep_first(
                        &mut result,
                        self.remove_destination_locked(exchanges, &next),
                    );
                }
                // Kept (empty) in memory, as the store still has it.
                Err(e) => keep_first(&mut result, Err(e)),
            }
        }
        result
    }

    /// Write the bindings of a durable exchange; the caller holds its router lock.
    fn save_bindings(&self, ex: &Exchange, router: &dyn Router) -> AmqpResult<()> {
        match (ex.durable, &self.store) {
            (true, Some(store)) => stored(persist::save_bindings(
                store,
                &self.name,
                &ex.name,
                &router.bindings(),
            )),
            _ => Ok(()),
        }
    }

    /// Drop the records of a durable exchange (before it leaves memory).
    fn forget_exchange(&self, ex: &Exchange) -> AmqpResult<()> {
        match (ex.durable, &self.store) {
            (true, Some(store)) => stored(persist::delete_exchange(store, &self.name, &ex.name)),
            _ => Ok(()),
        }
    }

    /// queue.declare (also the admin API's PUT and definitions import, as
    /// connection 0). Returns the queue and its counters.
    pub fn declare_queue(
        &self,
        d: &QueueDeclare,
        connection: u64,
        now: u64,
    ) -> AmqpResult<(Arc<Queue>, QueueStats)> {
        self.declare_queue_as(d, connection, Origin::Client, now)
    }

    /// Re-create a stored durable queue at start-up.
    pub(crate) fn recover_queue(&self, d: &QueueDeclare, now: u64) -> AmqpResult<Arc<Queue>> {
        self.declare_queue_as(d, 0, Origin::Recovery, now)
            .map(|(q, _)| q)
    }

    fn declare_queue_as(
        &self,
        d: &QueueDeclare,
        connection: u64,
        origin: Origin,
        now: u64,
    ) -> AmqpResult<(Arc<Queue>, QueueStats)> {
        if d.passive {
            let q = self.queue(&d.name, connection)?;
            q.touch(now);
            let stats = q.stats(now);
            return Ok((q, stats));
        }
        if d.name.starts_with("amq.") {
            return Err(AmqpError::access_refused(format!(
                "queue name '{}' contains reserved prefix 'amq.*'",
                d.name
            )));
        }
        let name = if d.name.is_empty() {
            let module = match d.arguments.get("x-queue-type").and_then(FieldValue::as_str) {
                Some("quorum") => Some(QueueType::Quorum.module()),
                Some("stream") => Some(QueueType::Stream.module()),
                _ => None,
            };
            if let Some(module) = module {
                return Err(AmqpError::precondition_failed(format!(
                    "Cannot declare a server-named queue for type {module}"
                )));
            }
            super::generate_name("amq.gen-")
        } else {
            d.name.clone()
        };
        let effective = crate::broker::policy::queue_arguments(self, &name, &d.arguments);
        let args = QueueArgs::parse(&effective, &name, &self.name)?;
        let mut queues = self.queues.write();
        if let Some(existing) = queues.get(&name) {
            existing.check_access(connection)?;
            let spec = &existing.spec;
            if spec.exclusive_owner.is_some() != d.exclusive {
                return Err(existing.locked());
            }
            let e = |what: &str, got: String, cur: String| {
                inequivalent(what, "queue", &name, &self.name, got, cur)
            };
            if spec.durable != d.durable {
                return Err(e(
                    "durable",
                    d.durable.to_string(),
                    spec.durable.to_string(),
                ));
            }
            if spec.auto_delete != d.auto_delete {
                return Err(e(
                    "auto_delete",
                    d.auto_delete.to_string(),
                    spec.auto_delete.to_string(),
                ));
            }
            let own = match existing.queue_type() {
                QueueType::Classic => CLASSIC_EQUIVALENCE_ARGS,
                QueueType::Quorum => QUORUM_EQUIVALENCE_ARGS,
                QueueType::Stream => STREAM_EQUIVALENCE_ARGS,
            };
            for arg in EQUIVALENCE_ARGS.iter().chain(own) {
                let (got, cur) = (d.arguments.get(arg), spec.arguments.get(arg));
                if !same_arg(arg, got, cur) {
                    return Err(inequivalent_arg(arg, &name, &self.name, got, cur));
                }
            }
            let q = Arc::clone(existing);
            drop(queues);
            q.touch(now);
            let stats = q.stats(now);
            self.count_declared(origin, false);
            return Ok((q, stats));
        }
        if matches!(args.queue_type, QueueType::Quorum | QueueType::Stream) {
            check_replicated(d, &name, &self.name)?;
        }
        if origin == Origin::Client {
            if let Some(max) = self.max_queues() {
                if queues.len() >= max {
                    return Err(crate::broker::limits::queues_reached(
                        &d.name, &self.name, max,
                    ));
                }
            }
        }
        let persisted = d.durable && !d.exclusive;
        let spec = QueueSpec {
            name: name.as_str().into(),
            vhost: Arc::clone(&self.name),
            durable: d.durable,
            exclusive_owner: d.exclusive.then_some(connection),
            auto_delete: d.auto_delete,
            arguments: d.arguments.clone(),
        };
        let q = if args.queue_type == QueueType::Stream {
            let streams = self.streams.get().ok_or_else(|| {
                AmqpError::precondition_failed(format!(
                    "cannot declare stream '{name}' in vhost '{}': this broker has no data directory",
                    self.name
                ))
            })?;
            let key = crate::broker::queue::store_key(&self.name, &name);
            let sq = crate::broker::queue::stream::StreamQueue::open(streams, key, &args)?;
            Queue::new_stream(
                spec,
                args,
                self.this.clone(),
                sq,
                Arc::clone(&self.budget),
                now,
            )
        } else {
            Queue::new(
                spec,
                args,
                self.this.clone(),
                self.store.clone().map(|store| (store, persisted)),
                Arc::clone(&self.budget),
                now,
            )
        };
        if let (Origin::Client, true, Some(store)) = (origin, persisted, &self.store) {
            stored(persist::save_queue(
                store,
                &self.name,
                &name,
                d.auto_delete,
                &d.arguments,
            ))?;
        }
        queues.insert(name, Arc::clone(&q));
        if q.wants_ticks() {
            self.want_ticks();
        }
        self.count_declared(origin, true);
        Ok((q, QueueStats::default()))
    }

    /// A broker-made exclusive auto-delete queue whose name may use the `amq.` prefix
    /// (direct reply-to). Not counted against the queue limit, never stored.
    pub fn declare_internal_queue(
        &self,
        name: &str,
        connection: u64,
        now: u64,
    ) -> AmqpResult<(Arc<Queue>, QueueStats)> {
        let q = Queue::new(
            QueueSpec {
                name: name.into(),
                vhost: Arc::clone(&self.name),
                durable: false,
                exclusive_owner: Some(connection),
                auto_delete: true,
                arguments: FieldTable::new(),
            },
            QueueArgs::default(),
            self.this.clone(),
            self.store.clone().map(|store| (store, false)),
            Arc::clone(&self.budget),
            now,
        );
        self.queues.write().insert(name.to_string(), Arc::clone(&q));
        Ok((q, QueueStats::default()))
    }

    /// queue.delete; returns the number of ready messages the queue held.
    pub fn delete_queue(
        &self,
        name: &str,
        if_unused: bool,
        if_empty: bool,
        connection: u64,
        now: u64,
    ) -> AmqpResult<usize> {
        let q = match self.queue(name, connection) {
            Ok(q) => q,
            // RabbitMQ: deleting a missing queue succeeds with a count of 0.
            Err(e) if e.code == crate::wire::reply_code::NOT_FOUND => return Ok(0),
            Err(e) => return Err(e),
        };
        if let Some(e) = q.delete_refusal(if_unused, if_empty, now) {
            return Err(e);
        }
        self.remove_queue(&q)
    }

    /// Remove a queue and its bindings, cancel its consumers; returns its ready
    /// count (0 if it was already gone). If its record cannot be deleted the queue
    /// stays and the error (541) is returned.
    pub fn remove_queue(&self, q: &Arc<Queue>) -> AmqpResult<usize> {
        let mut exchanges = self.exchanges.write();
        {
            let mut queues = self.queues.write();
            match queues.get(q.name()) {
                Some(existing) if Arc::ptr_eq(existing, q) => {
                    let persisted = q.spec.durable && q.spec.exclusive_owner.is_none();
                    if let (true, Some(store)) = (persisted, &self.store) {
                        stored(persist::delete_queue(store, &self.name, q.name()))?;
                    }
                    queues.remove(q.name());
                    self.count_deleted();
                }
                _ => return Ok(0),
            }
        }
        let dest = Destination::Queue(Arc::clone(&q.spec.name));
        let cascade = self.remove_destination_locked(&mut exchanges, &dest);
        drop(exchanges);
        let (consumers, count) = q.delete();
        for c in consumers {
            c.sink.cancelled(c.channel, Arc::clone(&c.tag));
        }
        cascade.map(|()| count)
    }

    pub fn purge_queue(&self, name: &str, connection: u64) -> AmqpResult<usize> {
        let q = self.queue(name, connection)?;
        if q.queue_type() == QueueType::Stream {
            return Err(AmqpError::not_implemented(format!(
                "queue.purge not supported by stream queues queue '{name}' in vhost '{}'",
                self.name
            )));
        }
        Ok(q.purge())
    }

    /// The source of a bind or unbind: not the default exchange, and existing.
    fn bindable_source(
        &self,
        exchanges: &HashMap<String, Arc<Exchange>>,
        source: &str,
    ) -> AmqpResult<Arc<Exchange>> {
        not_default_exchange(source)?;
        exchanges
            .get(source)
            .cloned()
            .ok_or_else(|| self.no_exchange(source))
    }

    /// The destination exists and the connection may use it.
    fn check_destination(
        &self,
        exchanges: &HashMap<String, Arc<Exchange>>,
        dest: &Destination,
        connection: u64,
    ) -> AmqpResult<()> {
        match dest {
            Destination::Queue(name) => {
                let q = self.queues.read().get(&**name).cloned();
                q.ok_or_else(|| self.no_queue(name))?
                    .check_access(connection)
            }
            Destination::Exchange(name) => match exchanges.contains_key(&**name) {
                true => Ok(()),
                false => Err(self.no_exchange(name)),
            },
        }
    }

    /// queue.bind / exchange.bind (destination exchange given as `Destination::Exchange`).
    pub fn bind(
        &self,
        source: &str,
        dest: Destination,
        routing_key: &str,
        arguments: &FieldTable,
        connection: u64,
    ) -> AmqpResult<()> {
        self.bind_as(
            source,
            dest,
            routing_key,
            arguments,
            connection,
            Origin::Client,
        )
    }

    /// Re-create a stored binding at start-up.
    pub(crate) fn recover_binding(
        &self,
        source: &str,
        dest: Destination,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> AmqpResult<()> {
        self.bind_as(source, dest, routing_key, arguments, 0, Origin::Recovery)
    }

    fn bind_as(
        &self,
        source: &str,
        dest: Destination,
        routing_key: &str,
        arguments: &FieldTable,
        connection: u64,
        origin: Origin,
    ) -> AmqpResult<()> {
        // Held (shared) throughout: neither end can be deleted meanwhile.
        let exchanges = self.exchanges.read();
        self.check_destination(&exchanges, &dest, connection)?;
        let ex = self.bindable_source(&exchanges, source)?;
        exchange::validate_binding(ex.kind, arguments).map_err(AmqpError::precondition_failed)?;
        let binding = Binding {
            destination: dest,
            routing_key: routing_key.to_string(),
            arguments: arguments.clone(),
        };
        let persist = origin == Origin::Client && ex.durable && self.store.is_some();
        let undo = persist.then(|| binding.clone());
        let mut router = ex.router.write();
        if router.bind(binding) {
            if let Some(binding) = undo {
                if let Err(e) = self.save_bindings(&ex, &**router) {
                    router.unbind(&binding);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// queue.unbind / exchange.unbind. An auto-delete source left without
    /// bindings is deleted. As on RabbitMQ (`rabbit_binding:remove` ignores
    /// missing ends), unbinding from or to a queue or exchange that does not
    /// exist is a no-op: the binding is gone either way (an auto-deleted
    /// exchange's clean-up unbind succeeds).
    pub fn unbind(
        &self,
        source: &str,
        dest: Destination,
        routing_key: &str,
        arguments: &FieldTable,
        connection: u64,
    ) -> AmqpResult<()> {
        not_default_exchange(source)?;
        // Exclusive: the source may be auto-deleted within this change.
        let mut exchanges = self.exchanges.write();
        let Some(ex) = exchanges.get(source).cloned() else {
            return Ok(());
        };
        let dest_exists = match &dest {
            Destination::Queue(name) => {
                let q = self.queues.read().get(&**name).cloned();
                match q {
                    Some(q) => q.check_access(connection).map(|()| true)?,
                    None => false,
                }
            }
            Destination::Exchange(name) => exchanges.contains_key(&**name),
        };
        if !dest_exists {
            return Ok(());
        }
        let binding = Binding {
            destination: dest,
            routing_key: routing_key.to_string(),
            arguments: arguments.clone(),
        };
        let mut router = ex.router.write();
        if !router.unbind(&binding) {
            return Ok(());
        }
        if ex.auto_delete && router.is_empty() {
            if let Err(e) = self.forget_exchange(&ex) {
                router.bind(binding);
                return Err(e);
            }
            drop(router);
            exchanges.remove(source);
            let gone = Destination::Exchange(Arc::clone(&ex.name));
            return self.remove_destination_locked(&mut exchanges, &gone);
        }
        if let Err(e) = self.save_bindings(&ex, &**router) {
            router.bind(binding);
            return Err(e);
        }
        Ok(())
    }

    /// All bindings in the vhost as (source, binding), default-exchange ones included.
    pub fn bindings(&self) -> Vec<(Arc<str>, Binding)> {
        let mut out = Vec::new();
        for q in self.queues.read().values() {
            out.push((
                Arc::from(""),
                Binding {
                    destination: Destination::Queue(Arc::clone(&q.spec.name)),
                    routing_key: q.name().to_string(),
                    arguments: FieldTable::new(),
                },
            ));
        }
        for ex in self.exchanges.read().values() {
            for b in ex.bindings() {
                out.push((Arc::clone(&ex.name), b));
            }
        }
        out
    }

    /// Set a policy (stored first) and apply it to the existing queues; true if
    /// it is new.
    pub fn put_policy(&self, policy: Policy, now: u64) -> AmqpResult<bool> {
        let created = self.policies.put(policy).map_err(store_failed)?;
        crate::broker::policy::apply_to_queues(self, now);
        Ok(created)
    }

    /// Clear the policy `name` (record dropped first); false if there was none.
    pub fn delete_policy(&self, name: &str, now: u64) -> AmqpResult<bool> {
        let removed = self
            .policies
            .delete(&self.name, name)
            .map_err(store_failed)?;
        if removed {
            crate::broker::policy::apply_to_queues(self, now);
        }
        Ok(removed)
    }
}

/// Binds and unbinds name a source other than the default exchange.
fn not_default_exchange(source: &str) -> AmqpResult<()> {
    match source.is_empty() {
        true => Err(AmqpError::access_refused(
            "operation not permitted on the default exchange",
        )),
        false => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::message::MemoryBudget;
    use crate::broker::persist::{failpoint, BindingsRecord};
    use crate::config::VHostLimits;
    use crate::storage::{Store, TopologyKind};
    use crate::wire::reply_code;

    fn store(name: &str) -> Store {
        let dir =
            std::env::temp_dir().join(format!("warren-topology-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Store::open(&dir).expect("store opens")
    }

    fn vhost(store: Option<Store>, limits: VHostLimits) -> Arc<VHost> {
        VHost::new("/", store, MemoryBudget::new(0), limits)
    }

    fn queue(name: &str, durable: bool) -> QueueDeclare {
        QueueDeclare {
            name: name.into(),
            durable,
            ..Default::default()
        }
    }

    fn exchange(name: &str, durable: bool) -> ExchangeDeclare {
        ExchangeDeclare {
            name: name.into(),
            kind: "direct".into(),
            durable,
            ..Default::default()
        }
    }

    fn to_queue(name: &str) -> Destination {
        Destination::Queue(name.into())
    }

    /// The stored bindings of `source` as (destination, key) pairs, sorted.
    fn stored_bindings(store: &Store, source: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (_, bytes) in store.load_topology(TopologyKind::Binding).expect("load") {
            let rec: BindingsRecord = serde_json::from_slice(&bytes).expect("record");
            if rec.source == source {
                out.extend(
                    rec.bindings
                        .into_iter()
                        .map(|b| (b.destination, b.routing_key)),
                );
            }
        }
        out.sort();
        out
    }

    #[test]
    fn failed_durable_write_is_541_and_memory_stays_as_stored() {
        let store = store("fail");
        let v = vhost(Some(store.clone()), VHostLimits::default());
        v.declare_exchange(&exchange("x", true)).expect("exchange");
        v.declare_queue(&queue("q", true), 0, 0).expect("queue");
        let none = FieldTable::new();
        v.bind("x", to_queue("q"), "kept", &none, 0).expect("bind");

        failpoint::set(store.path(), true);
        let code = |r: AmqpResult<()>| r.map_err(|e| (e.code, e.hard)).err();
        let internal = Some((reply_code::INTERNAL_ERROR, true));
        assert_eq!(code(v.bind("x", to_queue("q"), "new", &none, 0)), internal);
        assert_eq!(
            code(v.unbind("x", to_queue("q"), "kept", &none, 0)),
            internal
        );
        assert_eq!(
            code(v.declare_exchange(&exchange("y", true)).map(drop)),
            internal
        );
        assert_eq!(
            code(v.declare_queue(&queue("q2", true), 0, 0).map(drop)),
            internal
        );
        assert_eq!(code(v.delete_exchange("x", false)), internal);
        assert_eq!(
            code(v.delete_queue("q", false, false, 0, 0).map(drop)),
            internal
        );
        let policy = Policy::new(
            "/",
            "p",
            ".*",
            crate::broker::policy::ApplyTo::All,
            0,
            serde_json::json!({"max-length": 1})
                .as_object()
                .cloned()
                .unwrap_or_default(),
        )
        .expect("policy");
        assert_eq!(code(v.put_policy(policy, 0).map(drop)), internal);
        // Nothing durable changed in memory either.
        let keys: Vec<String> = v
            .exchange("x")
            .expect("x is still there")
            .bindings()
            .into_iter()
            .map(|b| b.routing_key)
            .collect();
        assert_eq!(keys, vec!["kept".to_string()]);
        assert!(v.exchange("y").is_err());
        assert!(v.queue("q2", 0).is_err());
        assert!(v.queue("q", 0).is_ok());
        assert!(v.policies.list().is_empty());
        // Transient topology needs no write.
        v.declare_queue(&queue("transient", false), 0, 0)
            .expect("transient queue");

        failpoint::set(store.path(), false);
        v.bind("x", to_queue("q"), "new", &none, 0).expect("bind");
        assert_eq!(
            stored_bindings(&store, "x"),
            vec![("q".into(), "kept".into()), ("q".into(), "new".into())]
        );
    }

    /// Binds from many threads to one durable exchange, all released at once:
    /// the stored record ends with every binding (each write happens under the
    /// router's lock, so the last write is never an older snapshot).
    #[test]
    fn concurrent_binds_leave_every_binding_stored() {
        const ROUNDS: usize = 40;
        const THREADS: usize = 16;
        let store = store("binds");
        let v = vhost(Some(store.clone()), VHostLimits::default());
        v.declare_queue(&queue("q", true), 0, 0).expect("queue");
        for r in 0..ROUNDS {
            v.declare_exchange(&exchange(&format!("x{r}"), true))
                .expect("exchange");
        }
        let barrier = std::sync::Barrier::new(THREADS);
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let (v, barrier) = (&v, &barrier);
                s.spawn(move || {
                    for r in 0..ROUNDS {
                        barrier.wait();
                        v.bind(
                            &format!("x{r}"),
                            to_queue("q"),
                            &t.to_string(),
                            &FieldTable::new(),
                            0,
                        )
                        .expect("bind");
                    }
                });
            }
        });
        for r in 0..ROUNDS {
            let source = format!("x{r}");
            assert_eq!(v.exchange(&source).expect("x").bindings().len(), THREADS);
            assert_eq!(stored_bindings(&store, &source).len(), THREADS, "{source}");
        }
    }

    #[test]
    fn limits_hold_for_every_declare_but_recovery() {
        let limits = VHostLimits {
            max_queues: Some(2),
            max_exchanges: Some(8),
        };
        let v = vhost(None, limits);
        v.declare_queue(&queue("a", false), 0, 0).expect("a");
        v.declare_queue(&queue("b", false), 0, 0).expect("b");
        v.declare_queue(&queue("a", false), 0, 0)
            .expect("redeclare at the limit");
        let e = v.declare_queue(&queue("c", false), 0, 0).expect_err("c");
        assert_eq!(e.code, reply_code::PRECONDITION_FAILED);
        assert_eq!(
            e.text,
            "PRECONDITION_FAILED - cannot declare queue 'c': queue limit in vhost '/' (2) is reached"
        );
        assert_eq!(v.queue_count(), 2);
        v.recover_queue(&queue("stored", true), 0)
            .expect("recovery is not limited");

        // Seven predeclared exchanges (amq.rabbitmq.trace among them) plus one.
        v.declare_exchange(&exchange("x1", false)).expect("x1");
        let e = v.declare_exchange(&exchange("x2", false)).expect_err("x2");
        assert_eq!(
            e.text,
            "PRECONDITION_FAILED - cannot declare exchange 'x2' in vhost '/': exchange limit (8) is reached"
        );
        v.declare_exchange(&exchange("x1", false))
            .expect("redeclare at the limit");
    }

    #[test]
    fn auto_delete_exchange_goes_with_its_last_binding() {
        let store = store("autodelete");
        let v = vhost(Some(store.clone()), VHostLimits::default());
        v.declare_exchange(&ExchangeDeclare {
            auto_delete: true,
            ..exchange("ad", true)
        })
        .expect("exchange");
        v.declare_queue(&queue("q", true), 0, 0).expect("queue");
        let none = FieldTable::new();
        v.bind("ad", to_queue("q"), "k", &none, 0).expect("bind");
        assert_eq!(stored_bindings(&store, "ad").len(), 1);
        v.unbind("ad", to_queue("q"), "k", &none, 0)
            .expect("unbind");
        assert!(v.exchange("ad").is_err());
        assert!(stored_bindings(&store, "ad").is_empty());
        let stored_exchanges = store.load_topology(TopologyKind::Exchange).expect("load");
        assert!(stored_exchanges.is_empty(), "{stored_exchanges:?}");
    }
}
