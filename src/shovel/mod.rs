//! Shovels, as RabbitMQ's shovel plugin has them: tasks that consume from a queue
//! or exchange on one AMQP 0-9-1 broker and publish to another (or the same),
//! acknowledging at the source per the ack mode.
//!
//! Dynamic shovels are runtime parameters of component `shovel`
//! (`/api/parameters/shovel/{vhost}/{name}`, definitions' `parameters`), stored as
//! durable topology records so they survive a restart; static shovels come from
//! the config file (`[shovels.<name>]`). [`Shovels`] owns both: it checks
//! definitions ([`definition`]), stores the dynamic ones, runs one task per shovel
//! ([`worker`], an AMQP client through lapin) and reports their status in
//! RabbitMQ's `/api/shovels` shape.

pub mod definition;
mod worker;

pub use definition::{parse, redact, AckMode, Definition, DeleteAfter, Destination, Source};

use crate::storage::{StorageError, Store, TopologyKind};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

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

/// The stored record of a dynamic shovel (a runtime parameter).
#[derive(Debug, Serialize, Deserialize)]
struct ParameterRecord {
    component: String,
    vhost: String,
    name: String,
    value: Value,
}

fn record_key(vhost: &str, name: &str) -> String {
    format!("{COMPONENT}\0{vhost}\0{name}")
}

/// Every shovel of a broker, dynamic and static, with their tasks.
pub struct Shovels {
    store: Option<Store>,
    /// `host:port` (with `user:pass@`) that `amqp://` without a host means: this broker.
    local: String,
    node: String,
    me: Weak<Shovels>,
    entries: Mutex<BTreeMap<(String, String), Entry>>,
    generations: AtomicU64,
}

impl std::fmt::Debug for Shovels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shovels")
            .field("count", &self.entries.lock().len())
            .finish()
    }
}

impl Shovels {
    /// A registry storing dynamic shovels in `store`; `local` is the
    /// `user:pass@host:port` an `amqp://` URI without a host connects to.
    pub fn new(store: Option<Store>, local: String) -> Arc<Shovels> {
        Arc::new_cyclic(|me| Shovels {
            store,
            local,
            node: crate::admin::node_name(),
            me: me.clone(),
            entries: Mutex::new(BTreeMap::new()),
            generations: AtomicU64::new(0),
        })
    }

    /// Start the dynamic shovels found in the store. Records that no longer
    /// parse are logged and skipped.
    pub fn recover(&self) -> Result<usize, StorageError> {
        let Some(store) = &self.store else {
            return Ok(0);
        };
        let mut n = 0;
        for (key, bytes) in store.load_topology(TopologyKind::Parameter)? {
            let rec: ParameterRecord = match serde_json::from_slice(&bytes) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(key = %key.escape_debug(), error = %e, "unreadable parameter record skipped");
                    continue;
                }
            };
            if rec.component != COMPONENT {
                continue;
            }
            match parse(&rec.value) {
                Ok(def) => {
                    self.install(&rec.vhost, &rec.name, Kind::Dynamic, rec.value, def);
                    n += 1;
                }
                Err(e) => {
                    tracing::error!(vhost = %rec.vhost, name = %rec.name, error = %e, "stored shovel is invalid; not started")
                }
            }
        }
        Ok(n)
    }

    /// Start a static shovel (from the config file) in vhost `/`.
    pub fn start_static(&self, name: &str, value: Value) -> Result<(), String> {
        let def = parse(&value)?;
        self.install("/", name, Kind::Static, value, def);
        Ok(())
    }

    /// Set dynamic shovel `name` in `vhost` (starting it, or restarting it with the
    /// new definition); true when it is new. The vhost's existence is the caller's
    /// to check.
    pub fn put(&self, vhost: &str, name: &str, value: Value) -> Result<bool, PutError> {
        let def = parse(&value).map_err(PutError::Invalid)?;
        if let Some(e) = self
            .entries
            .lock()
            .get(&(vhost.to_string(), name.to_string()))
        {
            if e.kind == Kind::Static {
                return Err(PutError::Invalid(format!(
                    "shovel '{name}' is a static shovel (from the config file)"
                )));
            }
        }
        if let Some(store) = &self.store {
            let rec = ParameterRecord {
                component: COMPONENT.into(),
                vhost: vhost.into(),
                name: name.into(),
                value: value.clone(),
            };
            let bytes = serde_json::to_vec(&rec).map_err(|e| PutError::Invalid(e.to_string()))?;
            store.put_topology(TopologyKind::Parameter, &record_key(vhost, name), &bytes)?;
        }
        Ok(self.install(vhost, name, Kind::Dynamic, value, def))
    }

    /// Delete dynamic shovel `name` in `vhost`, stopping it; false if there is none.
    pub fn delete(&self, vhost: &str, name: &str) -> Result<bool, StorageError> {
        let key = (vhost.to_string(), name.to_string());
        let mut entries = self.entries.lock();
        match entries.get(&key) {
            Some(e) if e.kind == Kind::Dynamic => {}
            _ => return Ok(false),
        }
        if let Some(store) = &self.store {
            store.delete_topology(TopologyKind::Parameter, &record_key(vhost, name))?;
        }
        if let Some(e) = entries.remove(&key) {
            if let Some(t) = e.task {
                t.abort();
            }
        }
        tracing::info!(vhost, name, "shovel deleted");
        Ok(true)
    }

    /// Delete every dynamic shovel of `vhost` (the vhost was deleted). Failures
    /// to delete a record are logged.
    pub fn delete_vhost(&self, vhost: &str) {
        let names: Vec<String> = self
            .entries
            .lock()
            .iter()
            .filter(|((v, _), e)| v == vhost && e.kind == Kind::Dynamic)
            .map(|((_, n), _)| n.clone())
            .collect();
        for name in names {
            if let Err(e) = self.delete(vhost, &name) {
                tracing::error!(vhost, name, error = %e, "cannot delete the shovel of a deleted vhost");
            }
        }
    }

    /// Restart a shovel's task (`DELETE /api/shovels/vhost/{vhost}/{name}/restart`).
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

    /// Stop every shovel's task (shutdown).
    pub fn stop_all(&self) {
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
    /// itself (as RabbitMQ's does); a static one stays, terminated.
    fn completed(&self, vhost: &str, name: &str, generation: u64) {
        let kind = self
            .entries
            .lock()
            .get(&(vhost.to_string(), name.to_string()))
            .filter(|e| e.generation == generation)
            .map(|e| e.kind);
        if kind == Some(Kind::Dynamic) {
            if let Err(e) = self.delete(vhost, name) {
                tracing::error!(vhost, name, error = %e, "cannot delete the finished shovel's parameter");
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
    /// definitions), in `vhost` or all.
    pub fn parameters(&self, vhost: Option<&str>) -> Vec<Value> {
        self.entries
            .lock()
            .iter()
            .filter(|((v, _), e)| e.kind == Kind::Dynamic && vhost.is_none_or(|w| w == v))
            .map(|((v, n), e)| parameter_json(v, n, &e.value))
            .collect()
    }

    /// One dynamic shovel's parameter.
    pub fn parameter(&self, vhost: &str, name: &str) -> Option<Value> {
        self.entries
            .lock()
            .get(&(vhost.to_string(), name.to_string()))
            .filter(|e| e.kind == Kind::Dynamic)
            .map(|e| parameter_json(vhost, name, &e.value))
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
