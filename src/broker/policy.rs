//! Policies: per-vhost named rules (pattern, apply-to, priority, definition) that
//! set queue and exchange options without client arguments, as in RabbitMQ.
//!
//! For a queue or exchange the highest-priority matching policy applies (only one,
//! as RabbitMQ does), to queues declared later and, through [`apply_to_queues`], to
//! existing ones. How a definition combines with declared `x-` arguments is
//! [`effective_arguments`]'s job. With a store, policies are written there.

use crate::storage::{StorageError, Store, TopologyKind};
use crate::wire::{FieldTable, FieldValue};
use parking_lot::RwLock;
use regex::Regex;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What a policy applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApplyTo {
    Queues,
    Exchanges,
    All,
}

impl ApplyTo {
    pub fn parse(s: &str) -> Option<ApplyTo> {
        match s {
            "queues" => Some(ApplyTo::Queues),
            "exchanges" => Some(ApplyTo::Exchanges),
            "all" => Some(ApplyTo::All),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            ApplyTo::Queues => "queues",
            ApplyTo::Exchanges => "exchanges",
            ApplyTo::All => "all",
        }
    }
}

/// Definition keys we understand, with their queue argument names.
pub const QUEUE_KEYS: &[(&str, &str)] = &[
    ("message-ttl", "x-message-ttl"),
    ("expires", "x-expires"),
    ("max-length", "x-max-length"),
    ("max-length-bytes", "x-max-length-bytes"),
    ("overflow", "x-overflow"),
    ("dead-letter-exchange", "x-dead-letter-exchange"),
    ("dead-letter-routing-key", "x-dead-letter-routing-key"),
];

/// Numeric limits where RabbitMQ applies the lower of policy and argument.
const MIN_KEYS: &[&str] = &[
    "x-message-ttl",
    "x-expires",
    "x-max-length",
    "x-max-length-bytes",
];

#[derive(Debug, Clone)]
pub struct Policy {
    pub vhost: String,
    pub name: String,
    pub pattern: String,
    pub apply_to: ApplyTo,
    pub priority: i64,
    pub definition: serde_json::Map<String, serde_json::Value>,
    regex: Regex,
}

impl Policy {
    /// Validate and build a policy; the error is a reason for a 400.
    pub fn new(
        vhost: &str,
        name: &str,
        pattern: &str,
        apply_to: ApplyTo,
        priority: i64,
        definition: serde_json::Map<String, serde_json::Value>,
    ) -> Result<Policy, String> {
        let regex = Regex::new(pattern).map_err(|e| format!("invalid pattern: {e}"))?;
        if definition.is_empty() {
            return Err("definition must not be empty".into());
        }
        for (k, v) in &definition {
            let ok = match k.as_str() {
                "message-ttl" | "expires" | "max-length" | "max-length-bytes" => {
                    v.as_u64().is_some_and(|n| k != "expires" || n > 0)
                }
                "overflow" => matches!(
                    v.as_str(),
                    Some("drop-head" | "reject-publish" | "reject-publish-dlx")
                ),
                "dead-letter-exchange" | "dead-letter-routing-key" | "alternate-exchange" => {
                    v.is_string()
                }
                // Accepted and stored (definitions from RabbitMQ carry them), not acted on.
                _ => true,
            };
            if !ok {
                return Err(format!("invalid value for '{k}': {v}"));
            }
        }
        Ok(Policy {
            vhost: vhost.into(),
            name: name.into(),
            pattern: pattern.into(),
            apply_to,
            priority,
            definition,
            regex,
        })
    }

    fn applies(&self, queue: bool, name: &str) -> bool {
        let kind_ok = match self.apply_to {
            ApplyTo::All => true,
            ApplyTo::Queues => queue,
            ApplyTo::Exchanges => !queue,
        };
        kind_ok && self.regex.is_match(name)
    }
}

/// A policy as stored on disk.
#[derive(Debug, Serialize, Deserialize)]
struct PolicyRecord {
    vhost: String,
    name: String,
    pattern: String,
    apply_to: String,
    priority: i64,
    definition: serde_json::Map<String, serde_json::Value>,
}

fn policy_key(vhost: &str, name: &str) -> String {
    format!("{vhost}\0{name}")
}

/// The policies of a vhost.
#[derive(Debug, Default)]
pub struct Policies {
    by_key: RwLock<BTreeMap<(String, String), Policy>>,
    store: Option<Store>,
}

impl Policies {
    /// Policies written to `store` (if any) as they change.
    pub fn new(store: Option<Store>) -> Policies {
        Policies {
            by_key: RwLock::default(),
            store,
        }
    }

    /// Load the stored policies of `vhost`.
    pub fn recover(&self, vhost: &str) -> Result<usize, StorageError> {
        let Some(store) = &self.store else {
            return Ok(0);
        };
        let mut n = 0;
        for (key, bytes) in store.load_topology(TopologyKind::Policy)? {
            let parsed = serde_json::from_slice::<PolicyRecord>(&bytes)
                .map_err(|e| e.to_string())
                .and_then(|r| {
                    let apply_to = ApplyTo::parse(&r.apply_to).ok_or("bad apply-to")?;
                    Policy::new(
                        &r.vhost,
                        &r.name,
                        &r.pattern,
                        apply_to,
                        r.priority,
                        r.definition,
                    )
                });
            match parsed {
                Ok(p) if p.vhost == vhost => {
                    self.by_key
                        .write()
                        .insert((p.vhost.clone(), p.name.clone()), p);
                    n += 1;
                }
                Ok(_) => {}
                Err(e) => tracing::error!(key, error = %e, "skipping bad policy record"),
            }
        }
        Ok(n)
    }

    /// Store and set a policy (under the map's lock, so the store never lags);
    /// true if it is new. Changed through [`VHost::put_policy`](crate::broker::VHost::put_policy).
    pub fn put(&self, p: Policy) -> Result<bool, StorageError> {
        let mut map = self.by_key.write();
        if let Some(store) = &self.store {
            let rec = PolicyRecord {
                vhost: p.vhost.clone(),
                name: p.name.clone(),
                pattern: p.pattern.clone(),
                apply_to: p.apply_to.as_str().into(),
                priority: p.priority,
                definition: p.definition.clone(),
            };
            let bytes = serde_json::to_vec(&rec).map_err(|e| StorageError::Corrupt {
                path: store.path().to_path_buf(),
                detail: format!("cannot encode policy: {e}"),
            })?;
            crate::broker::persist::put(
                store,
                TopologyKind::Policy,
                &policy_key(&p.vhost, &p.name),
                &bytes,
            )?;
        }
        Ok(map.insert((p.vhost.clone(), p.name.clone()), p).is_none())
    }

    /// Drop a policy (record first); false if there was none.
    pub fn delete(&self, vhost: &str, name: &str) -> Result<bool, StorageError> {
        let mut map = self.by_key.write();
        let key = (vhost.to_string(), name.to_string());
        if !map.contains_key(&key) {
            return Ok(false);
        }
        if let Some(store) = &self.store {
            crate::broker::persist::delete(store, TopologyKind::Policy, &policy_key(vhost, name))?;
        }
        Ok(map.remove(&key).is_some())
    }

    pub fn get(&self, vhost: &str, name: &str) -> Option<Policy> {
        self.by_key
            .read()
            .get(&(vhost.to_string(), name.to_string()))
            .cloned()
    }

    pub fn list(&self) -> Vec<Policy> {
        self.by_key.read().values().cloned().collect()
    }

    /// The vhost is being deleted: forget (and unstore) all its policies.
    pub fn clear(&self) {
        let all = std::mem::take(&mut *self.by_key.write());
        if let Some(store) = &self.store {
            for (vhost, name) in all.keys() {
                crate::broker::auth::drop_record(
                    store,
                    TopologyKind::Policy,
                    &policy_key(vhost, name),
                );
            }
        }
    }

    /// The policy in force for a queue (`queue` true) or exchange named `name`:
    /// the highest priority match (ties: the first by name).
    pub fn matching(&self, vhost: &str, queue: bool, name: &str) -> Option<Policy> {
        let map = self.by_key.read();
        let mut best: Option<&Policy> = None;
        for p in map.values() {
            if p.vhost == vhost
                && p.applies(queue, name)
                && best.is_none_or(|b| p.priority > b.priority)
            {
                best = Some(p);
            }
        }
        best.cloned()
    }
}

impl Policies {
    /// The `alternate-exchange` of the policy in force for exchange `name`, if any.
    /// Looked up at routing time, so policies apply to existing exchanges too.
    pub fn alternate_exchange(&self, vhost: &str, name: &str) -> Option<String> {
        if self.by_key.read().is_empty() {
            return None;
        }
        self.matching(vhost, false, name)?
            .definition
            .get("alternate-exchange")?
            .as_str()
            .map(String::from)
    }
}

/// Re-apply the vhost's policies to its existing queues (after a policy changed):
/// each queue whose effective arguments differ runs with the new ones from now on.
pub fn apply_to_queues(vhost: &crate::broker::VHost, now: u64) {
    for q in vhost.queues() {
        let policy = vhost.policies.matching(&vhost.name, true, q.name());
        let effective = effective_arguments(&q.spec.arguments, policy.as_ref());
        match crate::broker::queue::QueueArgs::parse(&effective, q.name(), &vhost.name) {
            Ok(args) if args != *q.args() => q.set_args(args, now),
            Ok(_) => {}
            Err(e) => tracing::warn!(queue = q.name(), error = %e.text, "policy not applied"),
        }
    }
}

fn to_field(v: &serde_json::Value) -> Option<FieldValue> {
    match v {
        serde_json::Value::String(s) => Some(FieldValue::string(s.clone())),
        serde_json::Value::Number(n) => n.as_i64().map(FieldValue::I64),
        _ => None,
    }
}

/// The arguments a queue runs with: its declared `x-` arguments combined with the
/// policy's definition. As in RabbitMQ, for TTLs and length limits the lower value
/// wins; for every other key the queue's own argument wins over the policy.
pub fn effective_arguments(declared: &FieldTable, policy: Option<&Policy>) -> FieldTable {
    let mut out = declared.clone();
    let Some(policy) = policy else {
        return out;
    };
    for (key, arg) in QUEUE_KEYS {
        let Some(value) = policy.definition.get(*key).and_then(to_field) else {
            continue;
        };
        match declared.get(arg) {
            None => out.insert(*arg, value),
            Some(existing) if MIN_KEYS.contains(arg) => {
                if let (Some(a), Some(b)) = (existing.as_i64(), value.as_i64()) {
                    if b < a {
                        out.insert(*arg, value);
                    }
                }
            }
            Some(_) => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(def: serde_json::Value) -> Policy {
        let serde_json::Value::Object(m) = def else {
            panic!()
        };
        Policy::new("/", "p", "^q", ApplyTo::Queues, 0, m).unwrap()
    }

    #[test]
    fn lower_limit_wins_other_keys_argument_wins() {
        let p =
            policy(json!({"message-ttl": 500, "max-length": 10, "dead-letter-exchange": "dlx"}));
        let mut declared = FieldTable::new();
        declared.insert("x-message-ttl", FieldValue::I64(1000));
        declared.insert("x-max-length", FieldValue::I64(5));
        declared.insert("x-dead-letter-exchange", FieldValue::string("mine"));
        let eff = effective_arguments(&declared, Some(&p));
        assert_eq!(eff.get("x-message-ttl").and_then(|v| v.as_i64()), Some(500));
        assert_eq!(eff.get("x-max-length").and_then(|v| v.as_i64()), Some(5));
        assert_eq!(
            eff.get("x-dead-letter-exchange").and_then(|v| v.as_str()),
            Some("mine")
        );
    }

    #[test]
    fn highest_priority_matches() {
        let ps = Policies::default();
        let mut a = policy(json!({"max-length": 1}));
        a.name = "a".into();
        let mut b = policy(json!({"max-length": 2}));
        b.name = "b".into();
        b.priority = 5;
        ps.put(a).expect("put a");
        ps.put(b).expect("put b");
        assert_eq!(
            ps.matching("/", true, "queue").map(|p| p.name),
            Some("b".into())
        );
        assert!(ps.matching("/", false, "queue").is_none());
        assert!(ps.matching("/", true, "other").is_none());
    }
}
