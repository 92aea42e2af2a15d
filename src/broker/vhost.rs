//! A virtual host: its exchanges, queues and bindings, and routing between them.
//!
//! Every topology change (declare, bind, unbind, delete) goes through the methods
//! here, whether it comes from an AMQP channel or the admin API. Lock order:
//! `exchanges`, then `queues`, then a queue's own state.

use crate::broker::exchange::{self, Binding, Destination, ExchangeKind, Router};
use crate::broker::message::MemoryBudget;
use crate::broker::message::Message;
use crate::broker::persist;
use crate::broker::queue::QueueArgs;
use crate::broker::queue::{Consumer, Queue, QueueSpec, QueueStats};
use crate::error::{AmqpError, AmqpResult};
use crate::storage::Store;
use crate::wire::FieldTable;
use parking_lot::{Mutex, RwLock};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

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
    router: RwLock<Box<dyn Router>>,
}

impl Exchange {
    fn new(
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

#[derive(Debug)]
pub struct VHost {
    pub name: Arc<str>,
    this: Weak<VHost>,
    exchanges: RwLock<HashMap<String, Arc<Exchange>>>,
    queues: RwLock<HashMap<String, Arc<Queue>>>,
    /// Messages held by delayed exchanges: (due ms, order, exchange, message).
    delayed: Mutex<BinaryHeap<Reverse<Delayed>>>,
    delayed_seq: AtomicU64,
    /// Where durable topology and persistent messages go (None: nothing persists).
    store: Option<Store>,
    /// Broker-wide resident message bytes (paging threshold).
    budget: Arc<MemoryBudget>,
    /// Policies of this vhost (applied to queues as they are declared).
    pub policies: crate::broker::policy::Policies,
}

/// A message waiting in a delayed exchange.
#[derive(Debug)]
struct Delayed {
    due: u64,
    seq: u64,
    exchange: Arc<str>,
    message: Arc<Message>,
}

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        (self.due, self.seq) == (other.due, other.seq)
    }
}
impl Eq for Delayed {}
impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Delayed {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (self.due, self.seq).cmp(&(other.due, other.seq))
    }
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

/// Queue arguments whose values must match on redeclare, as RabbitMQ checks them.
const EQUIVALENCE_ARGS: &[&str] = &[
    "x-dead-letter-exchange",
    "x-dead-letter-routing-key",
    "x-expires",
    "x-max-length",
    "x-max-length-bytes",
    "x-max-priority",
    "x-message-ttl",
    "x-overflow",
    "x-queue-mode",
    "x-queue-type",
    "x-single-active-consumer",
];

fn describe(v: Option<&crate::wire::FieldValue>) -> String {
    use crate::wire::FieldValue as V;
    match v {
        None => "none".into(),
        Some(V::LongString(b)) => String::from_utf8_lossy(b).into_owned(),
        Some(V::Bool(b)) => b.to_string(),
        Some(other) => other
            .as_i64()
            .map(|i| i.to_string())
            .unwrap_or_else(|| format!("{other:?}")),
    }
}

fn same_arg(a: Option<&crate::wire::FieldValue>, b: Option<&crate::wire::FieldValue>) -> bool {
    match (a, b) {
        (Some(x), Some(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(i), Some(j)) => i == j,
            _ => x == y,
        },
        (None, None) => true,
        _ => false,
    }
}

impl VHost {
    /// A vhost with the default and `amq.*` exchanges.
    pub fn new(name: &str, store: Option<Store>, budget: Arc<MemoryBudget>) -> Arc<VHost> {
        let policies = crate::broker::policy::Policies::new(store.clone());
        let vhost = Arc::new_cyclic(|this| VHost {
            store,
            budget,
            name: name.into(),
            this: this.clone(),
            exchanges: RwLock::new(HashMap::new()),
            queues: RwLock::new(HashMap::new()),
            delayed: Mutex::new(BinaryHeap::new()),
            delayed_seq: AtomicU64::new(0),
            policies,
        });
        {
            let mut ex = vhost.exchanges.write();
            for (n, k) in [
                ("", ExchangeKind::Direct),
                ("amq.direct", ExchangeKind::Direct),
                ("amq.fanout", ExchangeKind::Fanout),
                ("amq.topic", ExchangeKind::Topic),
                ("amq.headers", ExchangeKind::Headers),
                ("amq.match", ExchangeKind::Headers),
            ] {
                ex.insert(
                    n.to_string(),
                    Exchange::new(n, k, false, true, false, false, FieldTable::new()),
                );
            }
        }
        vhost
    }

    fn no_exchange(&self, name: &str) -> AmqpError {
        AmqpError::not_found(format!("no exchange '{name}' in vhost '{}'", self.name))
    }

    fn no_queue(&self, name: &str) -> AmqpError {
        AmqpError::not_found(format!("no queue '{name}' in vhost '{}'", self.name))
    }

    pub fn exchange(&self, name: &str) -> AmqpResult<Arc<Exchange>> {
        self.exchanges
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| self.no_exchange(name))
    }

    /// A queue the connection may use (404 if missing, 405 if exclusive to another).
    pub fn queue(&self, name: &str, connection: u64) -> AmqpResult<Arc<Queue>> {
        let q = self
            .queues
            .read()
            .get(name)
            .cloned()
            .ok_or_else(|| self.no_queue(name))?;
        q.check_access(connection)?;
        Ok(q)
    }

    pub fn queue_count(&self) -> usize {
        self.queues.read().len()
    }

    pub fn exchange_count(&self) -> usize {
        self.exchanges.read().len()
    }

    pub fn exchanges(&self) -> Vec<Arc<Exchange>> {
        self.exchanges.read().values().cloned().collect()
    }

    pub fn queues(&self) -> Vec<Arc<Queue>> {
        self.queues.read().values().cloned().collect()
    }

    pub fn declare_exchange(&self, d: &ExchangeDeclare) -> AmqpResult<Arc<Exchange>> {
        if d.name.is_empty() {
            return Err(AmqpError::access_refused(
                "operation not permitted on the default exchange",
            ));
        }
        if d.passive {
            return self.exchange(&d.name);
        }
        if d.name.is_empty() || d.name.starts_with("amq.") {
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
            ExchangeKind::parse(&d.kind).ok_or_else(|| {
                AmqpError::command_invalid(format!(
                    "invalid exchange type '{}' for exchange '{}' in vhost '{}'",
                    d.kind, d.name, self.name
                ))
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
        let ex = Exchange::new(
            &d.name,
            kind,
            delayed,
            d.durable,
            d.auto_delete,
            d.internal,
            d.arguments.clone(),
        );
        exchanges.insert(d.name.clone(), Arc::clone(&ex));
        if let (true, Some(store)) = (ex.durable, &self.store) {
            persist::save_exchange(store, &self.name, &ex);
        }
        Ok(ex)
    }

    pub fn delete_exchange(&self, name: &str, if_unused: bool) -> AmqpResult<()> {
        if name.is_empty() || name.starts_with("amq.") {
            return Err(AmqpError::access_refused(format!(
                "operation not permitted on exchange '{name}' in vhost '{}'",
                self.name
            )));
        }
        let mut exchanges = self.exchanges.write();
        let Some(ex) = exchanges.get(name) else {
            // RabbitMQ: deleting a missing exchange succeeds.
            return Ok(());
        };
        if if_unused && !ex.router.read().is_empty() {
            return Err(AmqpError::precondition_failed(format!(
                "exchange '{name}' in vhost '{}' in use",
                self.name
            )));
        }
        if let Some(removed) = exchanges.remove(name) {
            self.forget_exchange(&removed);
        }
        let dest = Destination::Exchange(name.into());
        self.remove_destination_locked(&mut exchanges, &dest);
        Ok(())
    }

    /// Remove every binding to `dest`, then auto-delete exchanges left without bindings.
    fn remove_destination_locked(
        &self,
        exchanges: &mut HashMap<String, Arc<Exchange>>,
        dest: &Destination,
    ) {
        let mut emptied = Vec::new();
        for ex in exchanges.values() {
            let mut router = ex.router.write();
            if router.remove_destination(dest) > 0 {
                if ex.auto_delete && router.is_empty() {
                    emptied.push(ex.name.to_string());
                } else {
                    drop(router);
                    self.save_bindings(ex);
                }
            }
        }
        for name in emptied {
            if let Some(removed) = exchanges.remove(&name) {
                self.forget_exchange(&removed);
            }
            self.remove_destination_locked(exchanges, &Destination::Exchange(name.as_str().into()));
        }
    }

    /// Persist the bindings of a durable exchange.
    fn save_bindings(&self, ex: &Exchange) {
        if let (true, Some(store)) = (ex.durable, &self.store) {
            persist::save_bindings(store, &self.name, &ex.name, &ex.bindings());
        }
    }

    /// A durable exchange is gone: drop its records.
    fn forget_exchange(&self, ex: &Exchange) {
        if let (true, Some(store)) = (ex.durable, &self.store) {
            persist::delete_exchange(store, &self.name, &ex.name);
        }
    }

    pub fn declare_queue(
        &self,
        d: &QueueDeclare,
        connection: u64,
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
            generate_name("amq.gen-")
        } else {
            d.name.clone()
        };
        let policy = self.policies.matching(&self.name, true, &name);
        let effective = crate::broker::policy::effective_arguments(&d.arguments, policy.as_ref());
        let args = QueueArgs::parse(&effective, &name, &self.name)?;
        let mut queues = self.queues.write();
        if let Some(existing) = queues.get(&name) {
            existing.check_access(connection)?;
            let spec = &existing.spec;
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
            if spec.exclusive_owner.is_some() != d.exclusive {
                return Err(e(
                    "exclusive",
                    d.exclusive.to_string(),
                    spec.exclusive_owner.is_some().to_string(),
                ));
            }
            if spec.auto_delete != d.auto_delete {
                return Err(e(
                    "auto_delete",
                    d.auto_delete.to_string(),
                    spec.auto_delete.to_string(),
                ));
            }
            for arg in EQUIVALENCE_ARGS {
                let (got, cur) = (d.arguments.get(arg), spec.arguments.get(arg));
                if !same_arg(got, cur) {
                    return Err(e(arg, describe(got), describe(cur)));
                }
            }
            let q = Arc::clone(existing);
            drop(queues);
            q.touch(now);
            let stats = q.stats(now);
            return Ok((q, stats));
        }
        let q = Queue::new(
            QueueSpec {
                name: name.as_str().into(),
                vhost: Arc::clone(&self.name),
                durable: d.durable,
                exclusive_owner: d.exclusive.then_some(connection),
                auto_delete: d.auto_delete,
                arguments: d.arguments.clone(),
            },
            args,
            self.this.clone(),
            self.store.clone().filter(|_| d.durable && !d.exclusive),
            Arc::clone(&self.budget),
            now,
        );
        if let (true, false, Some(store)) = (d.durable, d.exclusive, &self.store) {
            persist::save_queue(store, &self.name, &name, d.auto_delete, &d.arguments);
        }
        queues.insert(name, Arc::clone(&q));
        Ok((q, QueueStats::default()))
    }

    /// A broker-made exclusive auto-delete queue whose name may use the `amq.` prefix
    /// (direct reply-to).
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
            None,
            Arc::clone(&self.budget),
            now,
        );
        self.queues.write().insert(name.to_string(), Arc::clone(&q));
        Ok((q, QueueStats::default()))
    }

    /// Delete a queue; returns the number of ready messages it held.
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
        let stats = q.stats(now);
        if if_unused && stats.consumers > 0 {
            return Err(AmqpError::precondition_failed(format!(
                "queue '{name}' in vhost '{}' in use",
                self.name
            )));
        }
        if if_empty && stats.ready + stats.unacked > 0 {
            return Err(AmqpError::precondition_failed(format!(
                "queue '{name}' in vhost '{}' is not empty",
                self.name
            )));
        }
        Ok(self.remove_queue(&q))
    }

    /// Remove a queue and its bindings, cancel its consumers; returns ready count.
    pub fn remove_queue(&self, q: &Arc<Queue>) -> usize {
        let mut exchanges = self.exchanges.write();
        {
            let mut queues = self.queues.write();
            match queues.get(q.name()) {
                Some(existing) if Arc::ptr_eq(existing, q) => {
                    queues.remove(q.name());
                    if let (true, Some(store)) = (q.spec.durable, &self.store) {
                        persist::delete_queue(store, &self.name, q.name());
                    }
                }
                _ => return 0,
            }
        }
        self.remove_destination_locked(
            &mut exchanges,
            &Destination::Queue(Arc::clone(&q.spec.name)),
        );
        drop(exchanges);
        let (consumers, count) = q.delete();
        for c in consumers {
            c.sink.cancelled(c.channel, Arc::clone(&c.tag));
        }
        count
    }

    pub fn purge_queue(&self, name: &str, connection: u64) -> AmqpResult<usize> {
        Ok(self.queue(name, connection)?.purge())
    }

    fn check_bindable_source(&self, source: &str) -> AmqpResult<Arc<Exchange>> {
        if source.is_empty() {
            return Err(AmqpError::access_refused(
                "operation not permitted on the default exchange",
            ));
        }
        self.exchange(source)
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
        self.check_destination(&dest, connection)?;
        let ex = self.check_bindable_source(source)?;
        exchange::validate_binding(ex.kind, arguments).map_err(AmqpError::precondition_failed)?;
        let added = ex.router.write().bind(Binding {
            destination: dest,
            routing_key: routing_key.to_string(),
            arguments: arguments.clone(),
        });
        if added {
            self.save_bindings(&ex);
        }
        Ok(())
    }

    pub fn unbind(
        &self,
        source: &str,
        dest: Destination,
        routing_key: &str,
        arguments: &FieldTable,
        connection: u64,
    ) -> AmqpResult<()> {
        self.check_destination(&dest, connection)?;
        let ex = self.check_bindable_source(source)?;
        let binding = Binding {
            destination: dest,
            routing_key: routing_key.to_string(),
            arguments: arguments.clone(),
        };
        let (removed, now_empty) = {
            let mut router = ex.router.write();
            let removed = router.unbind(&binding);
            (removed, removed && router.is_empty())
        };
        if removed && !(now_empty && ex.auto_delete) {
            self.save_bindings(&ex);
        }
        if now_empty && ex.auto_delete {
            let mut exchanges = self.exchanges.write();
            if exchanges.get(source).is_some_and(|e| Arc::ptr_eq(e, &ex))
                && ex.router.read().is_empty()
            {
                if let Some(removed) = exchanges.remove(source) {
                    self.forget_exchange(&removed);
                }
                self.remove_destination_locked(
                    &mut exchanges,
                    &Destination::Exchange(source.into()),
                );
            }
        }
        Ok(())
    }

    fn check_destination(&self, dest: &Destination, connection: u64) -> AmqpResult<()> {
        match dest {
            Destination::Queue(q) => self.queue(q, connection).map(|_| ()),
            Destination::Exchange(e) => self.exchange(e).map(|_| ()),
        }
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

    /// The queues a message published to `exchange` reaches, following
    /// exchange-to-exchange bindings and alternate exchanges (each exchange visited
    /// once, so cycles end). `internal` exchanges refuse direct publishes. Returns
    /// true when a delayed exchange took the message to route later (its delay
    /// counts from `now`).
    pub fn route(
        &self,
        exchange: &str,
        message: &Arc<Message>,
        out: &mut Vec<Arc<Queue>>,
        now: u64,
    ) -> AmqpResult<bool> {
        self.route_inner(exchange, message, out, true, now)
    }

    /// Like [`route`](Self::route) but allowed into internal exchanges (dead-lettering).
    pub fn route_unchecked(
        &self,
        exchange: &str,
        message: &Arc<Message>,
        out: &mut Vec<Arc<Queue>>,
        now: u64,
    ) -> AmqpResult<bool> {
        self.route_inner(exchange, message, out, false, now)
    }

    fn route_inner(
        &self,
        exchange: &str,
        message: &Arc<Message>,
        out: &mut Vec<Arc<Queue>>,
        from_client: bool,
        now: u64,
    ) -> AmqpResult<bool> {
        let key = message.routing_key.as_str();
        if exchange.is_empty() {
            if let Some(q) = self.queues.read().get(key) {
                out.push(Arc::clone(q));
            }
            return Ok(false);
        }
        let exchanges = self.exchanges.read();
        let ex = exchanges
            .get(exchange)
            .ok_or_else(|| self.no_exchange(exchange))?;
        if from_client && ex.internal {
            return Err(AmqpError::access_refused(format!(
                "cannot publish to internal exchange '{exchange}' in vhost '{}'",
                self.name
            )));
        }
        if ex.delayed {
            let delay = message
                .properties
                .headers
                .as_ref()
                .and_then(|h| h.get("x-delay"))
                .and_then(|v| v.as_i64())
                .unwrap_or(0);
            if delay > 0 {
                let seq = self.delayed_seq.fetch_add(1, Ordering::Relaxed);
                self.delayed.lock().push(Reverse(Delayed {
                    due: now.saturating_add(delay as u64),
                    seq,
                    exchange: Arc::clone(&ex.name),
                    message: Arc::clone(message),
                }));
                return Ok(true);
            }
        }
        let headers = message.properties.headers.as_ref();
        let queues = self.queues.read();
        let mut seen_ex: HashSet<Arc<str>> = HashSet::new();
        let mut seen_q: HashSet<Arc<str>> = HashSet::new();
        let mut pending = vec![Destination::Exchange(Arc::clone(&ex.name))];
        let mut dests = Vec::new();
        while let Some(d) = pending.pop() {
            match d {
                Destination::Queue(name) => {
                    if seen_q.insert(Arc::clone(&name)) {
                        if let Some(q) = queues.get(&*name) {
                            out.push(Arc::clone(q));
                        }
                    }
                }
                Destination::Exchange(name) => {
                    if !seen_ex.insert(Arc::clone(&name)) {
                        continue;
                    }
                    let Some(next) = exchanges.get(&*name) else {
                        continue;
                    };
                    dests.clear();
                    next.router.read().route(key, headers, &mut dests);
                    if dests.is_empty() {
                        let ae = next
                            .alternate_exchange()
                            .map(str::to_string)
                            .or_else(|| self.policies.alternate_exchange(&self.name, &next.name));
                        if let Some(ae) = ae {
                            pending.push(Destination::Exchange(ae.into()));
                        }
                    }
                    pending.append(&mut dests);
                }
            }
        }
        Ok(false)
    }

    /// Periodic work: expire messages and queues, release due delayed messages.
    pub fn tick(&self, now: u64) {
        for q in self.queues() {
            if q.needs_tick() && q.tick(now) {
                self.remove_queue(&q);
            }
        }
        loop {
            let due = {
                let mut heap = self.delayed.lock();
                match heap.peek() {
                    Some(Reverse(d)) if d.due <= now => heap.pop().map(|Reverse(d)| d),
                    _ => None,
                }
            };
            let Some(d) = due else { break };
            let mut targets = Vec::new();
            let exchanges = self.exchanges.read();
            if let Some(ex) = exchanges.get(&*d.exchange) {
                let mut dests = Vec::new();
                ex.router.read().route(
                    &d.message.routing_key,
                    d.message.properties.headers.as_ref(),
                    &mut dests,
                );
                drop(exchanges);
                for dest in dests {
                    match dest {
                        Destination::Queue(name) => {
                            if let Some(q) = self.queues.read().get(&*name) {
                                targets.push(Arc::clone(q));
                            }
                        }
                        Destination::Exchange(name) => {
                            let _ = self.route_unchecked(&name, &d.message, &mut targets, now);
                        }
                    }
                }
            }
            for q in targets {
                q.enqueue(Arc::clone(&d.message), now);
            }
        }
    }

    /// Consumer cancelled at `now`: detach it and auto-delete the queue if it was
    /// the last.
    pub fn cancel_consumer(
        &self,
        queue: &Arc<Queue>,
        connection: u64,
        channel: u16,
        tag: &str,
        now: u64,
    ) -> Option<Arc<Consumer>> {
        let (consumer, unused) = queue.remove_consumer(connection, channel, tag, now);
        if unused {
            self.remove_queue(queue);
        }
        consumer
    }

    /// A connection closed: delete its exclusive queues.
    pub fn connection_closed(&self, connection: u64) {
        let owned: Vec<Arc<Queue>> = self
            .queues
            .read()
            .values()
            .filter(|q| q.spec.exclusive_owner == Some(connection))
            .cloned()
            .collect();
        for q in owned {
            self.remove_queue(&q);
        }
    }
}

/// A server-generated name: `prefix` + 22 url-safe random characters, like RabbitMQ's.
pub fn generate_name(prefix: &str) -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut rng = rand::thread_rng();
    let mut s = String::with_capacity(prefix.len() + 22);
    s.push_str(prefix);
    for _ in 0..22 {
        s.push(ALPHABET[rng.gen_range(0..ALPHABET.len())] as char);
    }
    s
}
