//! Durable topology: the records vhosts, exchanges, queues and bindings are
//! stored as, and recovery of a broker from the store at start-up.
//!
//! Records are JSON (argument tables kept as their AMQP encoding, so every type
//! survives). Bindings are stored as one record per durable source exchange,
//! rewritten whenever that exchange's bindings change.
//!
//! Every write returns its result: the vhost calls these under the lock of the
//! change they record and fails that change (541) when the write fails.

use crate::broker::exchange::{Binding, Destination};
use crate::broker::queue::store_key;
use crate::broker::vhost::{Exchange, ExchangeDeclare, QueueDeclare, VHost};
use crate::storage::{StorageError, Store, TopologyKind};
use crate::wire::{encode_field_table, parse_field_table, FieldTable};
use bytes::BytesMut;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

#[derive(Debug, Serialize, Deserialize)]
pub struct VHostRecord {
    pub name: String,
    /// Run-time limits (`max-connections`, `max-queues`); absent in records
    /// written before limits existed.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub limits: crate::broker::limits::LimitMap,
    /// Description, tags, default queue type; absent in records written
    /// before they were kept.
    #[serde(default, flatten)]
    pub meta: crate::broker::vhost::VHostMeta,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct ExchangeRecord {
    pub vhost: String,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: Vec<u8>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct QueueRecord {
    pub vhost: String,
    pub name: String,
    pub auto_delete: bool,
    pub arguments: Vec<u8>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct BindingRecord {
    /// "queue" or "exchange".
    pub destination_type: String,
    pub destination: String,
    pub routing_key: String,
    pub arguments: Vec<u8>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct BindingsRecord {
    pub vhost: String,
    pub source: String,
    pub bindings: Vec<BindingRecord>,
}

fn table_bytes(t: &FieldTable) -> Vec<u8> {
    let mut b = BytesMut::new();
    encode_field_table(t, &mut b);
    b.to_vec()
}

fn table_from(bytes: &[u8], store: &Store) -> Result<FieldTable, StorageError> {
    parse_field_table(bytes)
        .map(|(_, t)| t)
        .map_err(|e| corrupt(store, format!("bad argument table: {e:?}")))
}

fn corrupt(store: &Store, detail: String) -> StorageError {
    StorageError::Corrupt {
        path: store.path().to_path_buf(),
        detail,
    }
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing these plain structs cannot fail.
    serde_json::to_vec(v).unwrap_or_default()
}

/// Write one topology record (every topology write goes through here or [`delete`]).
pub(crate) fn put(
    store: &Store,
    kind: TopologyKind,
    key: &str,
    record: &[u8],
) -> Result<(), StorageError> {
    failpoint::check(store)?;
    store.put_topology(kind, key, record).inspect_err(|e| {
        tracing::error!(error = %e, key, "cannot persist topology");
    })
}

/// Drop one topology record.
pub(crate) fn delete(store: &Store, kind: TopologyKind, key: &str) -> Result<(), StorageError> {
    failpoint::check(store)?;
    store.delete_topology(kind, key).inspect_err(|e| {
        tracing::error!(error = %e, key, "cannot delete topology record");
    })
}

/// Write a vhost's record: its limits and metadata.
pub fn save_vhost(
    store: &Store,
    name: &str,
    limits: &crate::broker::limits::LimitMap,
    meta: &crate::broker::vhost::VHostMeta,
) -> Result<(), StorageError> {
    put(
        store,
        TopologyKind::VHost,
        name,
        &json(&VHostRecord {
            name: name.into(),
            limits: limits.clone(),
            meta: meta.clone(),
        }),
    )
}

pub fn save_exchange(store: &Store, vhost: &str, ex: &Exchange) -> Result<(), StorageError> {
    let rec = ExchangeRecord {
        vhost: vhost.into(),
        name: ex.name.to_string(),
        kind: ex.type_name().into(),
        auto_delete: ex.auto_delete,
        internal: ex.internal,
        arguments: table_bytes(&ex.arguments),
    };
    put(
        store,
        TopologyKind::Exchange,
        &store_key(vhost, &ex.name),
        &json(&rec),
    )
}

/// Drop an exchange's record, then its bindings record. If only the first
/// succeeds, what is left is a bindings record without a source, which recovery
/// skips: never an exchange that silently lost its bindings.
pub fn delete_exchange(store: &Store, vhost: &str, name: &str) -> Result<(), StorageError> {
    let key = store_key(vhost, name);
    delete(store, TopologyKind::Exchange, &key)?;
    delete(store, TopologyKind::Binding, &key)
}

pub fn save_queue(
    store: &Store,
    vhost: &str,
    name: &str,
    auto_delete: bool,
    arguments: &FieldTable,
) -> Result<(), StorageError> {
    let rec = QueueRecord {
        vhost: vhost.into(),
        name: name.into(),
        auto_delete,
        arguments: table_bytes(arguments),
    };
    put(
        store,
        TopologyKind::Queue,
        &store_key(vhost, name),
        &json(&rec),
    )
}

pub fn delete_queue(store: &Store, vhost: &str, name: &str) -> Result<(), StorageError> {
    delete(store, TopologyKind::Queue, &store_key(vhost, name))
}

/// Rewrite the bindings record of a durable source exchange.
pub fn save_bindings(
    store: &Store,
    vhost: &str,
    source: &str,
    bindings: &[Binding],
) -> Result<(), StorageError> {
    let key = store_key(vhost, source);
    if bindings.is_empty() {
        return delete(store, TopologyKind::Binding, &key);
    }
    let rec = BindingsRecord {
        vhost: vhost.into(),
        source: source.into(),
        bindings: bindings
            .iter()
            .map(|b| {
                let (t, d) = match &b.destination {
                    Destination::Queue(q) => ("queue", q),
                    Destination::Exchange(e) => ("exchange", e),
                };
                BindingRecord {
                    destination_type: t.into(),
                    destination: d.to_string(),
                    routing_key: b.routing_key.clone(),
                    arguments: table_bytes(&b.arguments),
                }
            })
            .collect(),
    };
    put(store, TopologyKind::Binding, &key, &json(&rec))
}

fn parse<T: for<'de> Deserialize<'de>>(
    store: &Store,
    key: &str,
    bytes: &[u8],
) -> Result<T, StorageError> {
    serde_json::from_slice(bytes).map_err(|e| corrupt(store, format!("record {key}: {e}")))
}

/// What recovery found.
#[derive(Debug, Default)]
pub struct Recovered {
    pub vhosts: usize,
    pub exchanges: usize,
    pub queues: usize,
    pub bindings: usize,
    pub messages: usize,
    /// Messages held by delayed exchanges.
    pub delayed: usize,
}

/// Rebuild vhosts, exchanges, queues (with their messages) and bindings.
/// `vhost` creates (or returns) a vhost by name.
pub fn recover(
    store: &Store,
    vhost: &dyn Fn(&str) -> Arc<VHost>,
    now: u64,
) -> Result<Recovered, StorageError> {
    let mut r = Recovered::default();
    for (key, bytes) in store.load_topology(TopologyKind::VHost)? {
        let rec: VHostRecord = parse(store, &key, &bytes)?;
        let v = vhost(&rec.name);
        v.limit_values.replace(rec.limits);
        v.set_meta(rec.meta);
        r.vhosts += 1;
    }
    for (key, bytes) in store.load_topology(TopologyKind::Exchange)? {
        let rec: ExchangeRecord = parse(store, &key, &bytes)?;
        let v = vhost(&rec.vhost);
        let arguments = table_from(&rec.arguments, store)?;
        let d = ExchangeDeclare {
            name: rec.name.clone(),
            kind: rec.kind,
            passive: false,
            durable: true,
            auto_delete: rec.auto_delete,
            internal: rec.internal,
            arguments,
        };
        match v.recover_exchange(&d) {
            Ok(_) => r.exchanges += 1,
            Err(e) => {
                tracing::error!(exchange = %rec.name, error = %e.text, "cannot recover exchange")
            }
        }
    }
    let mut live_keys = std::collections::HashSet::new();
    // Delayed messages of every vhost (exchanges are back, so they can route).
    let mut names: Vec<String> = store
        .load_topology(TopologyKind::VHost)?
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    names.sort();
    names.dedup();
    for name in names {
        let v = vhost(&name);
        r.delayed += v.recover_delayed()?;
        live_keys.insert(VHost::delayed_store_key(&name));
    }
    for (key, bytes) in store.load_topology(TopologyKind::Queue)? {
        let rec: QueueRecord = parse(store, &key, &bytes)?;
        let v = vhost(&rec.vhost);
        let d = QueueDeclare {
            name: rec.name.clone(),
            passive: false,
            durable: true,
            exclusive: false,
            auto_delete: rec.auto_delete,
            arguments: table_from(&rec.arguments, store)?,
        };
        match v.recover_queue(&d, now) {
            Ok(q) => {
                let qkey = store_key(&rec.vhost, &rec.name);
                let levels = store.recover_queue(&store.queue(&qkey, true))?;
                r.messages += q.restore(&levels);
                live_keys.insert(qkey);
                r.queues += 1;
            }
            Err(e) => tracing::error!(queue = %rec.name, error = %e.text, "cannot recover queue"),
        }
    }
    // Messages of queues deleted just before a crash.
    for key in store.queue_keys_with_messages()? {
        if !live_keys.contains(&key) {
            store.delete_queue_messages(&key);
        }
    }
    for (key, bytes) in store.load_topology(TopologyKind::Binding)? {
        let rec: BindingsRecord = parse(store, &key, &bytes)?;
        let v = vhost(&rec.vhost);
        for b in rec.bindings {
            let dest = match b.destination_type.as_str() {
                "exchange" => Destination::Exchange(b.destination.as_str().into()),
                _ => Destination::Queue(b.destination.as_str().into()),
            };
            let args = table_from(&b.arguments, store)?;
            if v.recover_binding(&rec.source, dest, &b.routing_key, &args)
                .is_ok()
            {
                r.bindings += 1;
            }
        }
    }
    Ok(r)
}

/// Test-only failure injection: topology writes to a store whose data directory
/// is listed fail with [`StorageError::Closed`], as a store that has gone away.
#[cfg(test)]
pub(crate) mod failpoint {
    use crate::storage::{StorageError, Store};
    use parking_lot::Mutex;
    use std::path::{Path, PathBuf};

    static FAILING: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

    /// Make every later topology write to the store in `data_dir` fail (or
    /// succeed again).
    pub fn set(data_dir: &Path, fail: bool) {
        let mut failing = FAILING.lock();
        failing.retain(|p| p != data_dir);
        if fail {
            failing.push(data_dir.to_path_buf());
        }
    }

    pub(super) fn check(store: &Store) -> Result<(), StorageError> {
        if FAILING.lock().iter().any(|p| p == store.path()) {
            return Err(StorageError::Closed {
                path: store.path().to_path_buf(),
            });
        }
        Ok(())
    }
}

#[cfg(not(test))]
mod failpoint {
    use crate::storage::{StorageError, Store};

    #[inline(always)]
    pub(super) fn check(_: &Store) -> Result<(), StorageError> {
        Ok(())
    }
}
