//! Runtime parameters (RabbitMQ's `rabbitmqctl set_parameter`,
//! `/api/parameters/{component}/{vhost}/{name}`): JSON values named by a
//! component, a vhost and a name, stored as topology records of kind
//! `Parameter` so they survive restarts. The broker keeps them as data only;
//! what a component does with its values is the component's (shovels run
//! from the `shovel` ones, see `crate::shovel`), told of every change through
//! [`Parameters::changes`]. Global parameters ([`super::global`]) are the
//! same records with an empty vhost under component `global`.

use crate::storage::{StorageError, Store, TopologyKind};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// A stored parameter record.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    component: String,
    vhost: String,
    name: String,
    value: Value,
}

/// (component, vhost, name).
type Key = (String, String, String);

fn record_key(component: &str, vhost: &str, name: &str) -> String {
    format!("{component}\0{vhost}\0{name}")
}

/// Runtime parameters of the components a [`Parameters`] was opened for.
#[derive(Debug)]
pub struct Parameters {
    values: RwLock<BTreeMap<Key, Value>>,
    store: Option<Store>,
    /// Bumped after every change.
    changed: tokio::sync::watch::Sender<u64>,
}

impl Default for Parameters {
    fn default() -> Parameters {
        Parameters {
            values: RwLock::new(BTreeMap::new()),
            store: None,
            changed: tokio::sync::watch::channel(0).0,
        }
    }
}

impl Parameters {
    /// The parameters in `store` (none without one) of the components `ours`
    /// takes; unreadable records are logged and skipped.
    pub fn open(
        store: Option<Store>,
        ours: impl Fn(&str) -> bool,
    ) -> Result<Parameters, StorageError> {
        let mut values = BTreeMap::new();
        if let Some(s) = &store {
            for (k, bytes) in s.load_topology(TopologyKind::Parameter)? {
                match serde_json::from_slice::<Record>(&bytes) {
                    Ok(r) if ours(&r.component) => {
                        values.insert((r.component, r.vhost, r.name), r.value);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::error!(key = %k.escape_debug(), error = %e, "unreadable parameter record skipped")
                    }
                }
            }
        }
        Ok(Parameters {
            values: RwLock::new(values),
            store,
            ..Parameters::default()
        })
    }

    pub fn get(&self, component: &str, vhost: &str, name: &str) -> Option<Value> {
        let key = (component.to_string(), vhost.to_string(), name.to_string());
        self.values.read().get(&key).cloned()
    }

    /// The parameters of `component` (in `vhost`, or all): (vhost, name, value),
    /// by vhost and name.
    pub fn list(&self, component: &str, vhost: Option<&str>) -> Vec<(String, String, Value)> {
        self.values
            .read()
            .iter()
            .filter(|((c, v, _), _)| c == component && vhost.is_none_or(|w| w == v))
            .map(|((_, v, n), value)| (v.clone(), n.clone(), value.clone()))
            .collect()
    }

    /// Every parameter: (component, vhost, name, value).
    pub fn all(&self) -> Vec<(String, String, String, Value)> {
        self.values
            .read()
            .iter()
            .map(|((c, v, n), value)| (c.clone(), v.clone(), n.clone(), value.clone()))
            .collect()
    }

    /// Set a parameter (stored first); whether it is new. Setting the value it
    /// has already is no change (watchers are not told).
    pub fn put(
        &self,
        component: &str,
        vhost: &str,
        name: &str,
        value: Value,
    ) -> Result<bool, StorageError> {
        let key = (component.to_string(), vhost.to_string(), name.to_string());
        if self.values.read().get(&key) == Some(&value) {
            return Ok(false);
        }
        if let Some(s) = &self.store {
            let rec = Record {
                component: component.into(),
                vhost: vhost.into(),
                name: name.into(),
                value: value.clone(),
            };
            let bytes = serde_json::to_vec(&rec).unwrap_or_default();
            s.put_topology(
                TopologyKind::Parameter,
                &record_key(component, vhost, name),
                &bytes,
            )?;
        }
        let new = self.values.write().insert(key, value).is_none();
        self.changed.send_modify(|n| *n += 1);
        Ok(new)
    }

    /// Clear a parameter; whether it was set.
    pub fn delete(&self, component: &str, vhost: &str, name: &str) -> Result<bool, StorageError> {
        let key = (component.to_string(), vhost.to_string(), name.to_string());
        if !self.values.read().contains_key(&key) {
            return Ok(false);
        }
        if let Some(s) = &self.store {
            s.delete_topology(TopologyKind::Parameter, &record_key(component, vhost, name))?;
        }
        let gone = self.values.write().remove(&key).is_some();
        self.changed.send_modify(|n| *n += 1);
        Ok(gone)
    }

    /// Clear every parameter of `vhost` (it was deleted: its parameters go
    /// with it, as in RabbitMQ); failures to delete a record are logged.
    pub fn delete_vhost(&self, vhost: &str) {
        let keys: Vec<Key> = self
            .values
            .read()
            .keys()
            .filter(|(_, v, _)| v == vhost)
            .cloned()
            .collect();
        for (c, v, n) in keys {
            if let Err(e) = self.delete(&c, &v, &n) {
                tracing::error!(component = c, vhost = v, name = n, error = %e, "cannot delete the parameter of a deleted vhost");
            }
        }
    }

    /// A receiver that sees every change made from now on.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parameters_survive_a_reopen_and_go_with_their_vhost() {
        let dir = std::env::temp_dir().join(format!("warren-params-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Store::open(&dir).expect("store");
        let p = Parameters::open(Some(store.clone()), |c| c != "global").expect("open");
        let mut seen = p.changes();
        assert!(p.put("shovel", "/", "a", json!({"x": 1})).expect("put"));
        assert!(seen.has_changed().expect("sender"));
        seen.mark_unchanged();
        // The same value again changes nothing.
        assert!(!p.put("shovel", "/", "a", json!({"x": 1})).expect("put"));
        assert!(!seen.has_changed().expect("sender"));
        assert!(!p.put("shovel", "/", "a", json!({"x": 2})).expect("put"));
        assert!(p.put("shovel", "v2", "b", json!(2)).expect("put"));
        assert!(p.put("other", "v2", "c", json!(3)).expect("put"));
        assert!(!p.delete("shovel", "/", "missing").expect("delete"));
        drop(p);
        let p = Parameters::open(Some(store.clone()), |c| c != "global").expect("reopen");
        assert_eq!(
            p.list("shovel", None),
            vec![
                ("/".to_string(), "a".to_string(), json!({"x": 2})),
                ("v2".to_string(), "b".to_string(), json!(2)),
            ]
        );
        p.delete_vhost("v2");
        assert_eq!(p.all().len(), 1);
        drop(p);
        let p = Parameters::open(Some(store), |c| c != "global").expect("reopen");
        assert_eq!(p.list("shovel", Some("v2")), vec![]);
        assert_eq!(p.get("shovel", "/", "a"), Some(json!({"x": 2})));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
