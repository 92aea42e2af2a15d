//! A virtual host: its exchanges, queues and bindings, and the one door every
//! change and every message goes through.
//!
//! - [`topology`]: declare, delete, bind, unbind and policies, for AMQP channels,
//!   the admin API, definitions import, recovery and clean-up alike. The vhost's
//!   limits are checked there, and durable records are written under the lock of
//!   the in-memory change (a failed write fails the change with 541).
//! - [`publish`]: route a message (exchange-to-exchange bindings, alternate
//!   exchanges) and enqueue it, for basic.publish, the admin API, dead-lettering
//!   and delayed release.
//! - [`delayed`]: messages held by `x-delayed-message` exchanges until due.
//! - [`trace`]: where a message would go, explained, without publishing it.
//!
//! Time is passed in (`now`, ms since the epoch). Lock order: `exchanges`, then
//! `queues`, then an exchange's router, then a queue's own state; the store is
//! only called under these, never the other way round.

mod delayed;
mod publish;
mod topology;
pub mod trace;

pub use publish::{PublishFrom, Published};
pub use topology::{Exchange, ExchangeDeclare, QueueDeclare};
pub use trace::Trace;

use crate::broker::exchange::ExchangeKind;
use crate::broker::message::MemoryBudget;
use crate::broker::queue::{Consumer, Queue};
use crate::config::VHostLimits;
use crate::error::{AmqpError, AmqpResult};
use crate::storage::Store;
use crate::wire::FieldTable;
use parking_lot::RwLock;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

#[derive(Debug)]
pub struct VHost {
    pub name: Arc<str>,
    this: Weak<VHost>,
    exchanges: RwLock<HashMap<String, Arc<Exchange>>>,
    /// The default exchange (also in `exchanges` as ""): the publish path counts
    /// its messages without the map's lock.
    default_exchange: Arc<Exchange>,
    queues: RwLock<HashMap<String, Arc<Queue>>>,
    /// Messages held by delayed exchanges until they are due.
    delayed: delayed::DelayedMessages,
    /// Where durable topology and persistent messages go (None: nothing persists).
    store: Option<Store>,
    /// Where streams keep their logs (unset: streams cannot be declared).
    streams: std::sync::OnceLock<crate::storage::stream::StreamStore>,
    /// The store's handle on this vhost's delayed messages.
    delayed_key: Option<crate::storage::QueueRef>,
    /// Broker-wide resident message bytes (paging threshold).
    budget: Arc<MemoryBudget>,
    /// Most queues and exchanges this vhost holds (checked on every declare).
    limits: VHostLimits,
    /// Limits set at run time (`max-connections`, `max-queues`), through
    /// `/api/vhost-limits` or definitions; stored with the vhost's record.
    pub limit_values: crate::broker::limits::VHostLimitValues,
    /// Policies of this vhost (applied to queues as they are declared). Changed
    /// through [`VHost::put_policy`] / [`VHost::delete_policy`].
    pub policies: crate::broker::policy::Policies,
    /// Operator policies: caps merged over `policies` (see [`crate::broker::policy`]).
    pub operator_policies: crate::broker::policy::Policies,
    /// The firehose tracer is on ([`crate::broker::firehose`]): not stored.
    tracing: AtomicBool,
    /// Message counters of this vhost's channels (the broker's, per vhost:
    /// the API's `message_stats` of the vhost).
    pub counters: crate::broker::Counters,
    /// Bytes received and sent by this vhost's connections that closed (the
    /// API's `recv_oct` / `send_oct` of the vhost add the open ones').
    pub closed_octets: (std::sync::atomic::AtomicU64, std::sync::atomic::AtomicU64),
    /// Description, tags and default queue type (stored with the vhost's record).
    meta: RwLock<VHostMeta>,
    /// The broker's count of queues declared, created and deleted (set by
    /// the broker that holds the vhost: a deleted vhost's counts stay in it).
    churn: std::sync::OnceLock<Arc<QueueChurn>>,
    /// Where the queues this vhost deletes by itself are reported (set by
    /// the broker that holds the vhost).
    self_deletions: std::sync::OnceLock<Arc<crate::broker::deleted::SelfDeletions>>,
    /// The broker's ticker wake-up (set by the broker that holds the vhost).
    ticks: std::sync::OnceLock<Arc<crate::broker::ticks::Ticks>>,
}

/// Queue churn (RabbitMQ's `queue_declared`, `queue_created`,
/// `queue_deleted`), counted by the vhosts of a broker: declares by clients
/// (recovery is not one), the ones that made a queue, and queues deleted for
/// any reason.
#[derive(Debug, Default)]
pub struct QueueChurn {
    pub declared: std::sync::atomic::AtomicU64,
    pub created: std::sync::atomic::AtomicU64,
    pub deleted: std::sync::atomic::AtomicU64,
}

impl VHost {
    /// Count queue churn into `churn` (once, before any declare).
    pub fn set_churn(&self, churn: Arc<QueueChurn>) {
        let _ = self.churn.set(churn);
    }

    /// Report the queues deleted by the broker itself into `d` (once).
    pub fn set_self_deletions(&self, d: Arc<crate::broker::deleted::SelfDeletions>) {
        let _ = self.self_deletions.set(d);
    }

    /// Wake the broker's ticker through `ticks` (once, before any declare).
    pub fn set_ticks(&self, ticks: Arc<crate::broker::ticks::Ticks>) {
        let _ = self.ticks.set(ticks);
    }

    /// Something here began to want ticks: tell the broker's ticker.
    pub(crate) fn want_ticks(&self) {
        if let Some(t) = self.ticks.get() {
            t.want();
        }
    }

    /// Whether anything here wants the ticker's fast period: a queue that
    /// may expire messages or itself, or held delayed messages.
    pub fn wants_ticks(&self) -> bool {
        self.delayed.len() > 0 || self.queues.read().values().any(|q| q.wants_ticks())
    }

    /// A queue declare by `origin` succeeded (`created`: it made the queue).
    fn count_declared(&self, origin: topology::Origin, created: bool) {
        let Some(c) = self.churn.get() else { return };
        if origin == topology::Origin::Recovery {
            return;
        }
        crate::broker::Counters::add(&c.declared, 1);
        if created {
            crate::broker::Counters::add(&c.created, 1);
        }
    }

    /// A queue was deleted.
    fn count_deleted(&self) {
        if let Some(c) = self.churn.get() {
            crate::broker::Counters::add(&c.deleted, 1);
        }
    }
}

/// What a vhost says of itself (RabbitMQ's vhost metadata): a description,
/// tags, and the type of the queues declared without `x-queue-type`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VHostMeta {
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub tags: Vec<String>,
    /// `classic`, `quorum` or `stream`: given (as `x-queue-type`) to durable,
    /// non-exclusive, non-auto-delete queues declared without a type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub default_queue_type: Option<String>,
}

impl VHostMeta {
    /// The queue types a vhost may default to.
    pub const QUEUE_TYPES: [&'static str; 3] = ["classic", "quorum", "stream"];
}

impl VHost {
    /// A vhost with the default and `amq.*` exchanges (`amq.rabbitmq.trace`
    /// included).
    pub fn new(
        name: &str,
        store: Option<Store>,
        budget: Arc<MemoryBudget>,
        limits: VHostLimits,
    ) -> Arc<VHost> {
        let policies = crate::broker::policy::Policies::new(store.clone());
        let delayed_key = store
            .as_ref()
            .map(|s| s.queue(&VHost::delayed_store_key(name), true));
        let operator_policies = crate::broker::policy::Policies::operator(store.clone());
        let default_exchange = Exchange::new(
            "",
            ExchangeKind::Direct,
            false,
            true,
            false,
            false,
            FieldTable::new(),
        );
        let vhost = Arc::new_cyclic(|this| VHost {
            default_exchange: Arc::clone(&default_exchange),
            delayed_key,
            store,
            streams: std::sync::OnceLock::new(),
            budget,
            limits,
            name: name.into(),
            this: this.clone(),
            exchanges: RwLock::new(HashMap::new()),
            queues: RwLock::new(HashMap::new()),
            delayed: delayed::DelayedMessages::default(),
            policies,
            operator_policies,
            limit_values: Default::default(),
            tracing: AtomicBool::new(false),
            counters: crate::broker::Counters::default(),
            closed_octets: Default::default(),
            meta: RwLock::new(VHostMeta::default()),
            churn: std::sync::OnceLock::new(),
            self_deletions: std::sync::OnceLock::new(),
            ticks: std::sync::OnceLock::new(),
        });
        {
            let mut ex = vhost.exchanges.write();
            ex.insert(String::new(), default_exchange);
            for (n, k) in [
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
            let trace = crate::broker::firehose::EXCHANGE;
            ex.insert(
                trace.to_string(),
                Exchange::new(
                    trace,
                    ExchangeKind::Topic,
                    false,
                    true,
                    false,
                    true,
                    FieldTable::new(),
                ),
            );
        }
        vhost
    }

    /// Give this vhost the broker's stream store (once, before any declare).
    pub fn set_streams(&self, streams: crate::storage::stream::StreamStore) {
        let _ = self.streams.set(streams);
    }

    /// Whether the firehose tracer is on ([`crate::broker::firehose`]).
    #[inline]
    pub fn tracing(&self) -> bool {
        self.tracing.load(Ordering::Relaxed)
    }

    /// Turn the firehose tracer on or off (RabbitMQ's `trace_on` / `trace_off`).
    pub fn set_tracing(&self, on: bool) {
        self.tracing.store(on, Ordering::Relaxed);
    }

    /// The vhost's description, tags and default queue type.
    pub fn meta(&self) -> VHostMeta {
        self.meta.read().clone()
    }

    /// Replace the vhost's metadata (the caller stores it).
    pub fn set_meta(&self, meta: VHostMeta) {
        *self.meta.write() = meta;
    }

    /// Give a queue declare without `x-queue-type` the vhost's default queue
    /// type, as RabbitMQ's `augment_declare_args` does: only a durable,
    /// non-exclusive, non-auto-delete, non-passive declare. When the queue
    /// exists, the type it was declared with (if any) is given instead, so a
    /// redeclare by the same code stays equivalent.
    ///
    /// `durable`, `exclusive`, `auto_delete` are the declare's flags, `name`
    /// its queue, `arguments` what is augmented (a passive declare is not).
    pub fn augment_declare(
        &self,
        name: &str,
        durable: bool,
        exclusive: bool,
        auto_delete: bool,
        arguments: &mut FieldTable,
    ) {
        if !durable || exclusive || auto_delete || arguments.get("x-queue-type").is_some() {
            return;
        }
        let Some(default) = self.meta.read().default_queue_type.clone() else {
            return;
        };
        let existing = self.queues.read().get(name).cloned();
        let kind = match existing {
            Some(q) => match q.spec.arguments.get("x-queue-type") {
                Some(v) => v.clone(),
                None => return,
            },
            None => crate::wire::FieldValue::string(default),
        };
        arguments.insert("x-queue-type", kind);
    }

    /// The limits this vhost enforces.
    pub fn limits(&self) -> VHostLimits {
        self.limits
    }

    /// The queue limit in force: the lower of the configured one and the
    /// vhost's `max-queues`.
    pub fn max_queues(&self) -> Option<usize> {
        let set = self.limit_values.active("max-queues");
        match (self.limits.max_queues, set) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
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

    /// Periodic work at `now`: expire messages and queues, release due delayed messages.
    /// Only the queues that need it are looked at, found without a lock of
    /// theirs ([`Queue::needs_tick`]): every queue's locks, 50 times a
    /// second, took a quarter of a core at 16,000 idle queues.
    /// Returns whether anything here still wants the ticker's fast period
    /// ([`VHost::wants_ticks`], found on the same walk).
    pub fn tick(&self, now: u64) -> bool {
        let due: Vec<Arc<Queue>> = self
            .queues
            .read()
            .values()
            .filter(|q| q.needs_tick())
            .cloned()
            .collect();
        let mut wants = false;
        for q in due {
            if q.tick(now) {
                self.clean_up(&q, "expired");
            } else {
                wants |= q.wants_ticks();
            }
        }
        self.release_delayed(now);
        wants || self.delayed.len() > 0
    }

    /// Consumer cancelled: detach it and auto-delete the queue if it was the last.
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
            self.clean_up(queue, "auto-delete");
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
            self.clean_up(&q, "exclusive");
        }
    }

    /// Delete a queue on the broker's own initiative (no client to answer): a
    /// failed durable write is logged, and the queue stays as the store has it.
    /// A non-exclusive queue that went is reported ([`crate::broker::deleted`]):
    /// clustered, its record is replicated.
    fn clean_up(&self, q: &Arc<Queue>, why: &'static str) {
        if let Err(e) = self.remove_queue(q) {
            tracing::error!(queue = q.name(), vhost = %self.name, why, error = %e.text, "cannot delete queue");
            return;
        }
        if let (None, Some(d)) = (q.spec.exclusive_owner, self.self_deletions.get()) {
            d.report(crate::broker::deleted::SelfDeleted {
                vhost: self.name.to_string(),
                name: q.name().to_string(),
                why,
                declared: q.declared(),
            });
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
