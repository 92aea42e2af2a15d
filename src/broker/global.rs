//! Global runtime parameters (RabbitMQ's `rabbitmqctl set_global_parameter`,
//! `/api/global-parameters`): named JSON values not tied to a vhost, among
//! them `cluster_name` (what `/api/cluster-name` and the overview show; the
//! node's name until one is set). Stored with the topology as parameter
//! records of component `global`, so they survive restarts.

use crate::storage::{StorageError, Store, TopologyKind};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// The record component of global parameters (shovels use `shovel`).
const COMPONENT: &str = "global";

/// The parameter `/api/cluster-name` reads and writes.
pub const CLUSTER_NAME: &str = "cluster_name";

/// A stored parameter record (the same shape as a shovel's).
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    component: String,
    vhost: String,
    name: String,
    value: Value,
}

fn key(name: &str) -> String {
    format!("{COMPONENT}\0\0{name}")
}

/// The global parameters of a broker.
#[derive(Debug, Default)]
pub struct GlobalParameters {
    values: RwLock<BTreeMap<String, Value>>,
    store: Option<Store>,
}

impl GlobalParameters {
    /// The parameters kept in `store` (none without one); records of other
    /// components are not ours, unreadable ones are logged and skipped.
    pub fn open(store: Option<Store>) -> Result<GlobalParameters, StorageError> {
        let mut values = BTreeMap::new();
        if let Some(s) = &store {
            for (k, bytes) in s.load_topology(TopologyKind::Parameter)? {
                match serde_json::from_slice::<Record>(&bytes) {
                    Ok(r) if r.component == COMPONENT => {
                        values.insert(r.name, r.value);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(key = %k.escape_debug(), error = %e, "unreadable parameter record skipped")
                    }
                }
            }
        }
        Ok(GlobalParameters {
            values: RwLock::new(values),
            store,
        })
    }

    pub fn get(&self, name: &str) -> Option<Value> {
        self.values.read().get(name).cloned()
    }

    /// Every parameter, by name.
    pub fn list(&self) -> Vec<(String, Value)> {
        self.values
            .read()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Set `name` (stored first); whether it is new.
    pub fn put(&self, name: &str, value: Value) -> Result<bool, StorageError> {
        if let Some(s) = &self.store {
            let rec = Record {
                component: COMPONENT.into(),
                vhost: String::new(),
                name: name.into(),
                value: value.clone(),
            };
            let bytes = serde_json::to_vec(&rec).unwrap_or_default();
            s.put_topology(TopologyKind::Parameter, &key(name), &bytes)?;
        }
        Ok(self.values.write().insert(name.into(), value).is_none())
    }

    /// Clear `name`; whether it was set.
    pub fn delete(&self, name: &str) -> Result<bool, StorageError> {
        if let Some(s) = &self.store {
            s.delete_topology(TopologyKind::Parameter, &key(name))?;
        }
        Ok(self.values.write().remove(name).is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_survive_a_reopen_and_leave_other_components_alone() {
        let dir = std::env::temp_dir().join(format!("warren-global-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir).expect("store");
        // A shovel's record in the same kind.
        let shovel = br#"{"component":"shovel","vhost":"/","name":"s","value":{}}"#;
        store
            .put_topology(TopologyKind::Parameter, "shovel\0/\0s", shovel)
            .expect("put");
        let g = GlobalParameters::open(Some(store.clone())).expect("open");
        assert!(g.put(CLUSTER_NAME, Value::from("rusty")).expect("put"));
        assert!(!g.put(CLUSTER_NAME, Value::from("rustier")).expect("put"));
        assert!(g.put("other", serde_json::json!({"a": 1})).expect("put"));
        assert!(g.delete("other").expect("delete"));
        assert!(!g.delete("other").expect("delete"));
        drop(g);
        let g = GlobalParameters::open(Some(store)).expect("reopen");
        assert_eq!(
            g.list(),
            vec![(CLUSTER_NAME.to_string(), Value::from("rustier"))]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
