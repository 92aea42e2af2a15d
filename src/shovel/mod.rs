//! Shovels, as RabbitMQ's shovel plugin has them: tasks that consume from a queue
//! or exchange on one AMQP 0-9-1 broker and publish to another (or the same),
//! acknowledging at the source per the ack mode.
//!
//! Dynamic shovels are runtime parameters of component `shovel`
//! (`/api/parameters/shovel/{vhost}/{name}`, definitions' `parameters`), which
//! the broker holds and stores ([`crate::broker::parameters`]) and a cluster
//! replicates; static shovels come from the config file (`[shovels.<name>]`).
//! [`Shovels`] runs them: it checks definitions ([`definition`]), keeps one
//! task per shovel running here ([`worker`], an AMQP client through lapin) —
//! every static one, and the dynamic ones its [`Placement`] puts on this node
//! (all of them on a node without a cluster) — and reports their status in
//! RabbitMQ's `/api/shovels` shape.

pub mod definition;
mod worker;

pub use definition::{parse, redact, AckMode, Definition, DeleteAfter, Destination, Source};

use crate::broker::Broker;
use crate::storage::StorageError;
use parking_lot::Mutex;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};

/// The runtime parameter component shovels are stored under.
pub const COMPONENT: &str = "shovel";

/// How a shovel was defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A runtime parameter (API, definitions); stored, deletable.
    Dynamic,
    /// From the config file; lives as long as the process.
    Static,
}

/// A shovel's state, by RabbitMQ's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Connecting and declaring.
    Starting,
    /// Consuming and publishing.
    Running,
    /// Failed (waiting to reconnect, see `reason`) or finished.
    Terminated,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Running => "running",
            State::Terminated => "terminated",
        }
    }
}

#[derive(Debug)]
struct Phase {
    state: State,
    reason: Option<String>,
    since_ms: u64,
    src_uri: String,
    dest_uri: String,
}

/// What a shovel's task reports: its state and counters.
#[derive(Debug)]
pub struct Status {
    phase: Mutex<Phase>,
    /// Messages published to the destination.
    pub forwarded: AtomicU64,
    /// Messages acknowledged at the source.
    pub acknowledged: AtomicU64,
    /// Published, waiting for the destination's confirm.
    pub unconfirmed: AtomicU64,
    /// Messages left before `src-delete-after` stops the shovel; -1: unlimited,
    /// -2: not known yet (`queue-length` before the first connection).
    pub remaining: AtomicI64,
}

impl Status {
    fn new(def: &Definition) -> Status {
        let remaining = match def.delete_after {
            DeleteAfter::Never => -1,
            DeleteAfter::QueueLength => -2,
            DeleteAfter::Count(n) => i64::try_from(n).unwrap_or(i64::MAX),
        };
        Status {
            phase: Mutex::new(Phase {
                state: State::Starting,
                reason: None,
                since_ms: crate::clock::now_ms(),
                src_uri: redact(def.src_uris.first().map_or("", String::as_str)),
                dest_uri: redact(def.dest_uris.first().map_or("", String::as_str)),
            }),
            forwarded: AtomicU64::new(0),
            acknowledged: AtomicU64::new(0),
            unconfirmed: AtomicU64::new(0),
            remaining: AtomicI64::new(remaining),
        }
    }

    pub fn state(&self) -> State {
        self.phase.lock().state
    }

    /// Why the shovel last terminated, if it did.
    pub fn reason(&self) -> Option<String> {
        self.phase.lock().reason.clone()
    }

    fn set(&self, state: State, reason: Option<String>) {
        let mut p = self.phase.lock();
        p.state = state;
        p.reason = reason;
        p.since_ms = crate::clock::now_ms();
    }

    fn set_uris(&self, src: &str, dest: &str) {
        let mut p = self.phase.lock();
        p.src_uri = redact(src);
        p.dest_uri = redact(dest);
    }
}

/// One shovel the registry knows.
struct Entry {
    kind: Kind,
    value: Value,
    def: Arc<Definition>,
    status: Arc<Status>,
    generation: u64,
    task: Option<tokio::task::AbortHandle>,
}

/// Why a shovel parameter was not set.
#[derive(Debug, thiserror::Error)]
pub enum PutError {
    /// The definition is invalid (400).
    #[error("{0}")]
    Invalid(String),
    /// The store refused the record (500).
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// Where dynamic shovels run when the node is one of a cluster: each on one
/// node (RabbitMQ runs a dynamic shovel on one node of the cluster, and on
/// another when that one goes).
pub trait Placement: Send + Sync {
    /// Whether this node runs dynamic shovel `name` of `vhost` now.
    fn runs_here(&self, vhost: &str, name: &str) -> bool;
    /// Dynamic shovel `name` of `vhost` finished (`src-delete-after`) and
    /// its parameter was cleared on this node: clear it everywhere.
    fn deleted(&self, vhost: &str, name: &str);
}

/// The placement of a clustered node: each dynamic shovel runs on the
/// running member [`crate::cluster::Cluster::runner_of`] names, and only
/// while this node sees a majority of the cluster (a node cut off from the
/// others stops its shovels rather than run them twice). Weak: the cluster's
/// stats answers hold the registry.
pub struct ClusterPlacement(pub Weak<crate::cluster::Cluster>);

/// What [`Cluster::runner_of`](crate::cluster::Cluster::runner_of) places.
fn placement_key(vhost: &str, name: &str) -> String {
    format!("{COMPONENT}\0{vhost}\0{name}")
}

impl Placement for ClusterPlacement {
    fn runs_here(&self, vhost: &str, name: &str) -> bool {
        self.0.upgrade().is_some_and(|c| {
            c.runner_of(&placement_key(vhost, name))
                .is_some_and(|n| n == c.me.name)
        })
    }

    fn deleted(&self, vhost: &str, name: &str) {
        let Some(c) = self.0.upgrade() else { return };
        let cmd = crate::cluster::Command::SetParameter {
            component: COMPONENT.into(),
            vhost: vhost.into(),
            name: name.into(),
            value: None,
        };
        let (vhost, name) = (vhost.to_string(), name.to_string());
        tokio::spawn(async move {
            if let Err(e) = c.propose(cmd).await {
                tracing::error!(vhost, name, error = %e, "the finished shovel's deletion was not replicated");
            }
        });
    }
}

/// Every shovel of a broker, dynamic and static, with their tasks.
pub struct Shovels {
    /// Holds the dynamic shovels' definitions (runtime parameters of
    /// component [`COMPONENT`]).
    broker: Arc<Broker>,
    /// `host:port` (with `user:pass@`) that `amqp://` without a host means: this broker.
    local: String,
    node: String,
    me: Weak<Shovels>,
    /// The shovels running here: the static ones and the dynamic ones
    /// placed here.
    entries: Mutex<BTreeMap<(String, String), Entry>>,
    generations: AtomicU64,
    /// Clustered: which node runs each dynamic shovel.
    placement: OnceLock<Arc<dyn Placement>>,
    /// Dynamic shovels whose stored definition does not parse, with that
    /// definition (logged once, not started).
    refused: Mutex<BTreeMap<(String, String), Value>>,
    /// Shut down: nothing starts any more.
    stopped: AtomicBool,
    /// Clustered: since when each dynamic shovel has been placed here (see
    /// [`HOLD_OFF`]).
    placed: Mutex<BTreeMap<(String, String), std::time::Instant>>,
}

/// Clustered, a shovel newly placed on this node starts only once it has
/// been placed here this long: the node that ran it sees the change about
/// when this one does (each acts on its own view of the members, fresh to
/// about a second), and stops it by then, so the two do not run it at once
/// (an exchange-sourced shovel would move what was published meanwhile
/// twice). A shovel that stays placed here restarts at once (a new
/// definition).
pub const HOLD_OFF: std::time::Duration = std::time::Duration::from_millis(1500);

impl std::fmt::Debug for Shovels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shovels")
            .field("count", &self.entries.lock().len())
            .finish()
    }
}

impl Shovels {
    /// A registry running the dynamic shovels among `broker`'s runtime
    /// parameters, as node `node`; `local` is the `user:pass@host:port` an
    /// `amqp://` URI without a host connects to. Nothing runs before
    /// [`Self::start`].
    pub fn new(broker: Arc<Broker>, local: String, node: String) -> Arc<Shovels> {
        Arc::new_cyclic(|me| Shovels {
            broker,
            local,
            node,
            me: me.clone(),
            entries: Mutex::new(BTreeMap::new()),
            generations: AtomicU64::new(0),
            placement: OnceLock::new(),
            refused: Mutex::new(BTreeMap::new()),
            stopped: AtomicBool::new(false),
            placed: Mutex::new(BTreeMap::new()),
        })
    }

    /// Run dynamic shovels only where `p` places them (a clustered node; set
    /// before [`Self::start`]).
    pub fn place_with(&self, p: Arc<dyn Placement>) {
        let _ = self.placement.set(p);
    }

    /// Start the dynamic shovels placed here, and keep the running ones
    /// those the parameters and the placement say: at every change of the
    /// parameters, and every second (a cluster's members come and go).
    /// Returns how many started now.
    pub fn start(&self) -> usize {
        let n = self.reconcile();
        let weak = self.me.clone();
        let mut changes = self.broker.parameters.changes();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    r = changes.changed() => if r.is_err() { return },
                    _ = tick.tick() => {}
                }
                let Some(s) = weak.upgrade() else { return };
                if s.stopped.load(Ordering::Relaxed) {
                    return;
                }
                s.reconcile();
            }
        });
        n
    }

    /// Whether this node runs dynamic shovel `name` of `vhost`.
    fn runs_here(&self, vhost: &str, name: &str) -> bool {
        match self.placement.get() {
            None => true,
            Some(p) => p.runs_here(vhost, name),
        }
    }

    /// Make the dynamic shovels running here those the parameters define and
    /// the placement puts here: stop the others (and those whose definition
    /// changed), start the missing ones. Returns how many started.
    pub fn reconcile(&self) -> usize {
        if self.stopped.load(Ordering::Relaxed) {
            return 0;
        }
        let wanted: BTreeMap<(String, String), Value> = self
            .broker
            .parameters
            .list(COMPONENT, None)
            .into_iter()
            .filter(|(v, n, _)| self.runs_here(v, n))
            .map(|(v, n, value)| ((v, n), value))
            .collect();
        let mut missing = Vec::new();
        {
            let mut entries = self.entries.lock();
            entries.retain(|k, e| {
                let keep = e.kind == Kind::Static || wanted.get(k) == Some(&e.value);
                if !keep {
                    if let Some(t) = e.task.take() {
                        t.abort();
                    }
                    tracing::info!(vhost = k.0, name = k.1, "shovel stopped here");
                }
                keep
            });
            for (k, value) in &wanted {
                if !entries.contains_key(k) {
                    missing.push((k.clone(), value.clone()));
                }
            }
        }
        self.refused.lock().retain(|k, _| wanted.contains_key(k));
        let held = {
            let now = std::time::Instant::now();
            let mut placed = self.placed.lock();
            placed.retain(|k, _| wanted.contains_key(k));
            for k in wanted.keys() {
                placed.entry(k.clone()).or_insert(now);
            }
            let clustered = self.placement.get().is_some();
            move |k: &(String, String)| {
                clustered
                    && placed
                        .get(k)
                        .is_some_and(|at| now.duration_since(*at) < HOLD_OFF)
            }
        };
        missing.retain(|(k, _)| !held(k));
        drop(held);
        let mut started = 0;
        for ((vhost, name), value) in missing {
            match parse(&value) {
                Ok(def) => {
                    self.install(&vhost, &name, Kind::Dynamic, value, def);
                    started += 1;
                }
                Err(e) => {
                    let mut refused = self.refused.lock();
                    if refused.get(&(vhost.clone(), name.clone())) != Some(&value) {
                        tracing::error!(vhost, name, error = %e, "stored shovel is invalid; not started");
                        refused.insert((vhost, name), value);
                    }
                }
            }
        }
        started
    }

    /// Start a static shovel (from the config file) in vhost `/`.
    pub fn start_static(&self, name: &str, value: Value) -> Result<(), String> {
        let def = parse(&value)?;
        self.install("/", name, Kind::Static, value, def);
        Ok(())
    }

    /// Set dynamic shovel `name` in `vhost` (started where it is placed, or
    /// restarted with the new definition); true when it is new. The vhost's
    /// existence is the caller's to check.
    pub fn put(&self, vhost: &str, name: &str, value: Value) -> Result<bool, PutError> {
        parse(&value).map_err(PutError::Invalid)?;
        if self
            .entries
            .lock()
            .get(&(vhost.to_string(), name.to_string()))
            .is_some_and(|e| e.kind == Kind::Static)
        {
            return Err(PutError::Invalid(format!(
                "shovel '{name}' is a static shovel (from the config file)"
            )));
        }
        let created = self.broker.parameters.put(COMPONENT, vhost, name, value)?;
        self.reconcile();
        Ok(created)
    }

    /// Delete dynamic shovel `name` in `vhost`, stopping it; false if there is none.
    pub fn delete(&self, vhost: &str, name: &str) -> Result<bool, StorageError> {
        let gone = self.broker.parameters.delete(COMPONENT, vhost, name)?;
        if gone {
            self.reconcile();
            tracing::info!(vhost, name, "shovel deleted");
        }
        Ok(gone)
    }

    /// Restart a shovel's task (`DELETE /api/shovels/vhost/{vhost}/{name}/restart`);
    /// false if it does not run here.
    pub fn restart(&self, vhost: &str, name: &str) -> bool {
        let found = self
            .entries
            .lock()
            .get(&(vhost.to_string(), name.to_string()))
            .map(|e| (e.kind, e.value.clone(), Arc::clone(&e.def)));
        match found {
            Some((kind, value, def)) => {
                self.install(vhost, name, kind, value, (*def).clone());
                true
            }
            None => false,
        }
    }

    /// Stop every shovel's task for good (shutdown).
    pub fn stop_all(&self) {
        self.stopped.store(true, Ordering::Relaxed);
        for e in self.entries.lock().values_mut() {
            if let Some(t) = e.task.take() {
                t.abort();
            }
        }
    }

    /// Replace (or add) the entry and start its task; true when it is new.
    fn install(&self, vhost: &str, name: &str, kind: Kind, value: Value, def: Definition) -> bool {
        let def = Arc::new(def);
        let status = Arc::new(Status::new(&def));
        let generation = self.generations.fetch_add(1, Ordering::Relaxed);
        let job = worker::Job {
            shovels: self.me.clone(),
            vhost: vhost.to_string(),
            name: name.to_string(),
            generation,
            def: Arc::clone(&def),
            status: Arc::clone(&status),
            local: self.local.clone(),
        };
        let mut entries = self.entries.lock();
        // Spawned under the lock, so a task that finishes at once finds its entry.
        let task = tokio::spawn(worker::run(job)).abort_handle();
        let old = entries.insert(
            (vhost.to_string(), name.to_string()),
            Entry {
                kind,
                value,
                def,
                status,
                generation,
                task: Some(task),
            },
        );
        drop(entries);
        tracing::info!(vhost, name, ?kind, "shovel started");
        match old {
            Some(e) => {
                if let Some(t) = e.task {
                    t.abort();
                }
                false
            }
            None => true,
        }
    }

    /// A task finished its `src-delete-after` work: a dynamic shovel deletes
    /// itself (as RabbitMQ's does; on every node of a cluster); a static one
    /// stays, terminated.
    fn completed(&self, vhost: &str, name: &str, generation: u64) {
        let kind = self
            .entries
            .lock()
            .get(&(vhost.to_string(), name.to_string()))
            .filter(|e| e.generation == generation)
            .map(|e| e.kind);
        if kind == Some(Kind::Dynamic) {
            match self.delete(vhost, name) {
                Ok(_) => {
                    if let Some(p) = self.placement.get() {
                        p.deleted(vhost, name);
                    }
                }
                Err(e) => {
                    tracing::error!(vhost, name, error = %e, "cannot delete the finished shovel's parameter")
                }
            }
        }
    }

    /// The status of shovel `name` in `vhost`, if it exists.
    pub fn status_of(&self, vhost: &str, name: &str) -> Option<Arc<Status>> {
        self.entries
            .lock()
            .get(&(vhost.to_string(), name.to_string()))
            .map(|e| Arc::clone(&e.status))
    }

    /// Dynamic shovels as runtime parameters (`/api/parameters/shovel`,
    /// definitions), in `vhost` or all: every one defined, wherever it runs.
    pub fn parameters(&self, vhost: Option<&str>) -> Vec<Value> {
        let all = self.broker.parameters.list(COMPONENT, vhost).into_iter();
        all.map(|(v, n, value)| parameter_json(&v, &n, &value))
            .collect()
    }

    /// One dynamic shovel's parameter.
    pub fn parameter(&self, vhost: &str, name: &str) -> Option<Value> {
        let value = self.broker.parameters.get(COMPONENT, vhost, name)?;
        Some(parameter_json(vhost, name, &value))
    }

    /// `/api/shovels` rows, in `vhost` or all.
    pub fn statuses(&self, vhost: Option<&str>) -> Vec<Value> {
        self.entries
            .lock()
            .iter()
            .filter(|((v, _), _)| vhost.is_none_or(|w| w == v))
            .map(|((v, n), e)| self.status_json(v, n, e))
            .collect()
    }

    fn status_json(&self, vhost: &str, name: &str, e: &Entry) -> Value {
        let p = e.status.phase.lock();
        let s = &e.status;
        let remaining = match s.remaining.load(Ordering::Relaxed) {
            -1 => json!("unlimited"),
            n if n < 0 => Value::Null,
            n => json!(n),
        };
        let mut j = json!({
            "node": self.node,
            "timestamp": timestamp(p.since_ms),
            "name": name,
            "vhost": vhost,
            "type": match e.kind { Kind::Dynamic => "dynamic", Kind::Static => "static" },
            "state": p.state.as_str(),
            "src_protocol": "amqp091",
            "dest_protocol": "amqp091",
            "src_uri": p.src_uri,
            "dest_uri": p.dest_uri,
            "ack_mode": e.def.ack_mode.as_str(),
            "blocked_status": "running",
            "forwarded": s.forwarded.load(Ordering::Relaxed),
            "messages_acknowledged": s.acknowledged.load(Ordering::Relaxed),
            "remaining": remaining,
            "remaining_unacked": s.unconfirmed.load(Ordering::Relaxed),
            "pending": 0,
        });
        let Some(o) = j.as_object_mut() else {
            return j;
        };
        match &e.def.source {
            Source::Queue(q) => {
                o.insert("src_queue".into(), json!(q));
            }
            Source::Exchange { exchange, key } => {
                o.insert("src_exchange".into(), json!(exchange));
                o.insert("src_exchange_key".into(), json!(key));
            }
        }
        match &e.def.destination {
            Destination::Queue(q) => {
                o.insert("dest_queue".into(), json!(q));
            }
            Destination::Exchange { exchange, key } => {
                o.insert("dest_exchange".into(), json!(exchange));
                if let Some(k) = key {
                    o.insert("dest_exchange_key".into(), json!(k));
                }
            }
            Destination::Same => {}
        }
        if let Some(r) = &p.reason {
            o.insert("reason".into(), json!(r));
        }
        j
    }
}

/// A runtime parameter as the API and definitions show it.
pub fn parameter_json(vhost: &str, name: &str, value: &Value) -> Value {
    json!({"value": value, "vhost": vhost, "component": COMPONENT, "name": name})
}

/// `YYYY-MM-DD HH:MM:SS` (UTC), as RabbitMQ's shovel status timestamps.
fn timestamp(ms: u64) -> String {
    crate::clock::utc_date(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_dates() {
        assert_eq!(timestamp(0), "1970-01-01 00:00:00");
        assert_eq!(timestamp(1_709_251_199_000), "2024-02-29 23:59:59");
        assert_eq!(timestamp(1_798_761_600_000), "2027-01-01 00:00:00");
    }
}
