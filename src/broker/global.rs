//! Global runtime parameters (RabbitMQ's `rabbitmqctl set_global_parameter`,
//! `/api/global-parameters`): named JSON values not tied to a vhost, among
//! them `cluster_name` (what `/api/cluster-name` and the overview show; the
//! node's name until one is set). Stored with the topology as parameter
//! records of component `global`, so they survive restarts.

use super::parameters::Parameters;
use crate::storage::{StorageError, Store};
use serde_json::Value;

/// The record component of global parameters (shovels use `shovel`).
pub const COMPONENT: &str = "global";

/// The parameter `/api/cluster-name` reads and writes.
pub const CLUSTER_NAME: &str = "cluster_name";

/// The global parameters of a broker: the runtime parameters of component
/// `global`, with an empty vhost.
#[derive(Debug, Default)]
pub struct GlobalParameters(Parameters);

impl GlobalParameters {
    /// The parameters kept in `store` (none without one); records of other
    /// components are not ours, unreadable ones are logged and skipped.
    pub fn open(store: Option<Store>) -> Result<GlobalParameters, StorageError> {
        Parameters::open(store, |c| c == COMPONENT).map(GlobalParameters)
    }

    pub fn get(&self, name: &str) -> Option<Value> {
        self.0.get(COMPONENT, "", name)
    }

    /// Every parameter, by name.
    pub fn list(&self) -> Vec<(String, Value)> {
        let all = self.0.list(COMPONENT, None).into_iter();
        all.map(|(_, name, value)| (name, value)).collect()
    }

    /// Set `name` (stored first); whether it is new.
    pub fn put(&self, name: &str, value: Value) -> Result<bool, StorageError> {
        self.0.put(COMPONENT, "", name, value)
    }

    /// Clear `name`; whether it was set.
    pub fn delete(&self, name: &str) -> Result<bool, StorageError> {
        self.0.delete(COMPONENT, "", name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::TopologyKind;

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
