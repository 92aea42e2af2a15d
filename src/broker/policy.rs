//! Policies: per-vhost named rules (pattern, apply-to, priority, definition) that
//! set queue and exchange options without client arguments, as in RabbitMQ.
//!
//! For a queue or exchange the highest-priority matching policy applies (only one,
//! as RabbitMQ does), to queues declared later and, through [`apply_to_queues`], to
//! existing ones. How a definition combines with declared `x-` arguments is
//! [`effective_arguments`]'s job. With a store, policies are written there.
//!
//! Operator policies (a second [`Policies`] per vhost, [`Policies::operator`])
//! hold caps users' policies cannot lift: for a queue, the highest-priority
//! operator policy is merged with the user policy in force, the lower value
//! winning for each numeric cap ([`merged_definition`], RabbitMQ's rule), and
//! the result combines with the declared arguments as a policy does.

use crate::broker::queue::QueueType;
use crate::error::{AmqpError, AmqpResult};
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
    /// Classic queues only (RabbitMQ 3.12+ `classic_queues`).
    ClassicQueues,
    /// Quorum queues only (`quorum_queues`).
    QuorumQueues,
    /// Streams only: accepted (definitions from RabbitMQ carry it), matches
    /// nothing, as warren has no streams.
    Streams,
    Exchanges,
    All,
}

/// What a policy is matched against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Exchange,
    Queue(QueueType),
}

impl ApplyTo {
    pub fn parse(s: &str) -> Option<ApplyTo> {
        match s {
            "queues" => Some(ApplyTo::Queues),
            "classic_queues" => Some(ApplyTo::ClassicQueues),
            "quorum_queues" => Some(ApplyTo::QuorumQueues),
            "streams" => Some(ApplyTo::Streams),
            "exchanges" => Some(ApplyTo::Exchanges),
            "all" => Some(ApplyTo::All),
            _ => None,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            ApplyTo::Queues => "queues",
            ApplyTo::ClassicQueues => "classic_queues",
            ApplyTo::QuorumQueues => "quorum_queues",
            ApplyTo::Streams => "streams",
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
    ("delivery-limit", "x-delivery-limit"),
    ("max-age", "x-max-age"),
    (
        "stream-max-segment-size-bytes",
        "x-stream-max-segment-size-bytes",
    ),
    ("queue-leader-locator", "x-queue-leader-locator"),
];

/// The policy keys that apply to streams (the others do not reach them, and
/// these reach nothing else).
const STREAM_KEYS: &[&str] = &[
    "x-max-length-bytes",
    "x-max-age",
    "x-stream-max-segment-size-bytes",
];

/// What an operator policy may set (numeric caps, as RabbitMQ allows); where a
/// user policy sets the same key the lower value wins.
pub const OPERATOR_KEYS: &[&str] = &[
    "expires",
    "message-ttl",
    "max-length",
    "max-length-bytes",
    "max-in-memory-length",
    "max-in-memory-bytes",
    "delivery-limit",
    "target-group-size",
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

/// The policy settings RabbitMQ recognises (its core's, classic mirroring's
/// and federation's validators): a definition with any other key is refused,
/// as RabbitMQ refuses it. Those warren does not act on are kept.
pub const POLICY_KEYS: [&str; 31] = [
    "alternate-exchange",
    "dead-letter-exchange",
    "dead-letter-routing-key",
    "dead-letter-strategy",
    "message-ttl",
    "expires",
    "max-length",
    "max-length-bytes",
    "max-in-memory-length",
    "max-in-memory-bytes",
    "delivery-limit",
    "overflow",
    "queue-mode",
    "queue-version",
    "queue-master-locator",
    "queue-leader-locator",
    "initial-cluster-size",
    "target-group-size",
    "max-age",
    "stream-max-segment-size-bytes",
    "stream-filter-size-bytes",
    "consumer-timeout",
    "ha-mode",
    "ha-params",
    "ha-sync-mode",
    "ha-sync-batch-size",
    "ha-promote-on-shutdown",
    "ha-promote-on-failure",
    "federation-upstream",
    "federation-upstream-set",
    "queue-type",
];

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
        let unknown: Vec<&str> = definition
            .keys()
            .map(String::as_str)
            .filter(|k| !POLICY_KEYS.contains(k))
            .collect();
        if !unknown.is_empty() {
            return Err(format!(
                "Validation failed\n\n{} are not recognised policy settings",
                unknown.join(", ")
            ));
        }
        for (k, v) in &definition {
            let ok = match k.as_str() {
                "message-ttl" | "expires" | "max-length" | "max-length-bytes" => {
                    v.as_u64().is_some_and(|n| k != "expires" || n > 0)
                }
                "stream-max-segment-size-bytes" => v.as_u64().is_some_and(|n| n > 0),
                "max-age" => v
                    .as_str()
                    .is_some_and(|s| crate::storage::stream::parse_age(s).is_some()),
                // Any integer; a negative one lifts the limit (RabbitMQ 4).
                "delivery-limit" => v.as_i64().is_some(),
                "overflow" => matches!(
                    v.as_str(),
                    Some("drop-head" | "reject-publish" | "reject-publish-dlx")
                ),
                "queue-leader-locator" => matches!(
                    v.as_str(),
                    Some("client-local" | "balanced" | "random" | "least-leaders")
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

    /// An operator policy: as [`Policy::new`], with only [`OPERATOR_KEYS`],
    /// each a non-negative integer.
    pub fn new_operator(
        vhost: &str,
        name: &str,
        pattern: &str,
        apply_to: ApplyTo,
        priority: i64,
        definition: serde_json::Map<String, serde_json::Value>,
    ) -> Result<Policy, String> {
        let unknown: Vec<&str> = definition
            .keys()
            .map(String::as_str)
            .filter(|k| !OPERATOR_KEYS.contains(k))
            .collect();
        if !unknown.is_empty() {
            return Err(format!(
                "Validation failed\n\n{} are not recognised operator policy settings",
                unknown.join(", ")
            ));
        }
        if let Some((k, v)) = definition.iter().find(|(_, v)| v.as_u64().is_none()) {
            return Err(format!("invalid value for '{k}': {v}"));
        }
        Policy::new(vhost, name, pattern, apply_to, priority, definition)
    }

    fn applies(&self, target: Target, name: &str) -> bool {
        let kind_ok = match (self.apply_to, target) {
            (ApplyTo::All, _) => true,
            (ApplyTo::Queues, Target::Queue(_)) => true,
            (ApplyTo::ClassicQueues, Target::Queue(t)) => t == QueueType::Classic,
            (ApplyTo::QuorumQueues, Target::Queue(t)) => t == QueueType::Quorum,
            (ApplyTo::Streams, Target::Queue(t)) => t == QueueType::Stream,
            (ApplyTo::Exchanges, Target::Exchange) => true,
            _ => false,
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
    /// An operator policy (absent, false, in user policies' records).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    operator: bool,
}

/// Key of a policy record; operator policies' keys have a third part, so the
/// two kinds never collide.
fn policy_key(vhost: &str, name: &str, operator: bool) -> String {
    if operator {
        format!("{vhost}\0{name}\0operator")
    } else {
        format!("{vhost}\0{name}")
    }
}

/// The policies (or the operator policies) of a vhost.
#[derive(Debug, Default)]
pub struct Policies {
    by_key: RwLock<BTreeMap<(String, String), Policy>>,
    store: Option<Store>,
    operator: bool,
}

impl Policies {
    /// Policies written to `store` (if any) as they change.
    pub fn new(store: Option<Store>) -> Policies {
        Policies {
            by_key: RwLock::default(),
            store,
            operator: false,
        }
    }

    /// Operator policies written to `store` (if any) as they change.
    pub fn operator(store: Option<Store>) -> Policies {
        Policies {
            operator: true,
            ..Policies::new(store)
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
                .and_then(|r| match r.operator == self.operator {
                    true => Ok(r),
                    false => Err(String::new()),
                })
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
                // The other kind's record.
                Err(e) if e.is_empty() => {}
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
                operator: self.operator,
            };
            let bytes = serde_json::to_vec(&rec).map_err(|e| StorageError::Corrupt {
                path: store.path().to_path_buf(),
                detail: format!("cannot encode policy: {e}"),
            })?;
            crate::broker::persist::put(
                store,
                TopologyKind::Policy,
                &policy_key(&p.vhost, &p.name, self.operator),
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
            crate::broker::persist::delete(
                store,
                TopologyKind::Policy,
                &policy_key(vhost, name, self.operator),
            )?;
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
                    &policy_key(vhost, name, self.operator),
                );
            }
        }
    }

    /// The policy in force for a queue (`queue` true) or exchange named `name`:
    /// the highest priority match (ties: the first by name).
    pub fn matching(&self, vhost: &str, target: Target, name: &str) -> Option<Policy> {
        let map = self.by_key.read();
        let mut best: Option<&Policy> = None;
        for p in map.values() {
            if p.vhost == vhost
                && p.applies(target, name)
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
        self.matching(vhost, Target::Exchange, name)?
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
        let effective = queue_arguments(vhost, q.name(), &q.spec.arguments);
        match crate::broker::queue::QueueArgs::parse(&effective, q.name(), &vhost.name) {
            Ok(args) if args != *q.args() => q.set_args(args, now),
            Ok(_) => {}
            Err(e) => tracing::warn!(queue = q.name(), error = %e.text, "policy not applied"),
        }
    }
}

impl crate::broker::VHost {
    /// Set an operator policy (stored first) and apply it to the existing
    /// queues; true if it is new.
    pub fn put_operator_policy(&self, policy: Policy, now: u64) -> AmqpResult<bool> {
        let created = self.operator_policies.put(policy).map_err(store_failed)?;
        apply_to_queues(self, now);
        Ok(created)
    }

    /// Clear the operator policy `name` (record dropped first); false if there
    /// was none.
    pub fn delete_operator_policy(&self, name: &str, now: u64) -> AmqpResult<bool> {
        let removed = self
            .operator_policies
            .delete(&self.name, name)
            .map_err(store_failed)?;
        if removed {
            apply_to_queues(self, now);
        }
        Ok(removed)
    }
}

fn store_failed(e: StorageError) -> AmqpError {
    AmqpError::internal_error(format!("cannot store topology: {e}"))
}

fn to_field(v: &serde_json::Value) -> Option<FieldValue> {
    match v {
        serde_json::Value::String(s) => Some(FieldValue::string(s.clone())),
        serde_json::Value::Number(n) => n.as_i64().map(FieldValue::I64),
        _ => None,
    }
}

/// The policy and operator policy in force for queue `name` of `vhost`.
pub fn queue_policies(
    vhost: &crate::broker::VHost,
    name: &str,
    kind: QueueType,
) -> (Option<Policy>, Option<Policy>) {
    let target = Target::Queue(kind);
    (
        vhost.policies.matching(&vhost.name, target, name),
        vhost.operator_policies.matching(&vhost.name, target, name),
    )
}

/// The arguments queue `name` of `vhost` runs with: `declared` combined with
/// its policy merged with its operator policy.
pub fn queue_arguments(
    vhost: &crate::broker::VHost,
    name: &str,
    declared: &FieldTable,
) -> FieldTable {
    // The type comes from the declaration (no policy sets it).
    let kind = match declared.get("x-queue-type").and_then(FieldValue::as_str) {
        Some("quorum") => QueueType::Quorum,
        Some("stream") => QueueType::Stream,
        _ => QueueType::Classic,
    };
    let (user, op) = queue_policies(vhost, name, kind);
    let merged = merged_definition(user.as_ref(), op.as_ref());
    effective_for(declared, merged.as_ref(), kind == QueueType::Stream)
}

/// A policy's definition merged with an operator policy's, as RabbitMQ merges
/// them: the operator's keys are added, and where both set a key the lower
/// value wins. None when neither applies.
pub fn merged_definition(
    user: Option<&Policy>,
    op: Option<&Policy>,
) -> Option<serde_json::Map<String, serde_json::Value>> {
    let Some(op) = op else {
        return user.map(|p| p.definition.clone());
    };
    let mut out = user.map(|p| p.definition.clone()).unwrap_or_default();
    for (k, v) in &op.definition {
        let lower = match (out.get(k).and_then(|u| u.as_i64()), v.as_i64()) {
            (Some(u), Some(o)) if u <= o => None,
            _ => Some(v.clone()),
        };
        if let Some(v) = lower {
            out.insert(k.clone(), v);
        }
    }
    Some(out)
}

/// The arguments a queue runs with: its declared `x-` arguments combined with the
/// policy's definition. As in RabbitMQ, for TTLs and length limits the lower value
/// wins; for every other key the queue's own argument wins over the policy.
pub fn effective_arguments(declared: &FieldTable, policy: Option<&Policy>) -> FieldTable {
    let stream = declared.get("x-queue-type").and_then(FieldValue::as_str) == Some("stream");
    effective_for(declared, policy.map(|p| &p.definition), stream)
}

/// [`effective_arguments`] with a definition (possibly a merged one), for a
/// stream (only [`STREAM_KEYS`] apply) or another queue (all keys but those
/// only streams take).
fn effective_for(
    declared: &FieldTable,
    definition: Option<&serde_json::Map<String, serde_json::Value>>,
    stream: bool,
) -> FieldTable {
    let mut out = declared.clone();
    let Some(definition) = definition else {
        return out;
    };
    for (key, arg) in QUEUE_KEYS {
        let stream_key = STREAM_KEYS.contains(arg);
        if stream != stream_key && *arg != "x-max-length-bytes" {
            continue;
        }
        let Some(value) = definition.get(*key).and_then(to_field) else {
            continue;
        };
        match declared.get(arg) {
            None => out.insert(*arg, value),
            // RabbitMQ's resolve_delivery_limit: a negative (unlimited) side
            // wins, else the lower limit.
            Some(existing) if *arg == "x-delivery-limit" => {
                if let (Some(a), Some(b)) = (existing.as_i64(), value.as_i64()) {
                    let pick = if a < 0 || b < 0 { a.max(b) } else { a.min(b) };
                    out.insert(*arg, FieldValue::I64(pick));
                }
            }
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
    fn delivery_limit_resolves_as_rabbitmq() {
        let cases = [(5, 10, 5), (10, 5, 5), (-1, 5, 5), (5, -1, 5), (-1, -1, -1)];
        for (declared_limit, policy_limit, want) in cases {
            let p = policy(json!({ "delivery-limit": policy_limit }));
            let mut declared = FieldTable::new();
            declared.insert("x-delivery-limit", FieldValue::I64(declared_limit));
            let eff = effective_arguments(&declared, Some(&p));
            // RabbitMQ's resolve_delivery_limit: a negative side wins (max),
            // else the lower.
            let want = if declared_limit < 0 || policy_limit < 0 {
                declared_limit.max(policy_limit)
            } else {
                want
            };
            assert_eq!(
                eff.get("x-delivery-limit").and_then(|v| v.as_i64()),
                Some(want),
                "{declared_limit} / {policy_limit}"
            );
        }
        let eff = effective_arguments(
            &FieldTable::new(),
            Some(&policy(json!({"delivery-limit": 7}))),
        );
        assert_eq!(
            eff.get("x-delivery-limit").and_then(|v| v.as_i64()),
            Some(7)
        );
        let serde_json::Value::Object(bad) = json!({"delivery-limit": "many"}) else {
            panic!()
        };
        assert!(Policy::new("/", "p", ".*", ApplyTo::Queues, 0, bad).is_err());
    }

    #[test]
    fn operator_caps_win_when_lower() {
        let user = policy(json!({"max-length": 100, "message-ttl": 10, "overflow": "drop-head"}));
        let serde_json::Value::Object(m) =
            json!({"max-length": 5, "message-ttl": 60, "expires": 1000})
        else {
            panic!()
        };
        let op = Policy::new_operator("/", "op", ".*", ApplyTo::Queues, 0, m).expect("valid");
        let merged = merged_definition(Some(&user), Some(&op)).expect("merged");
        assert_eq!(merged.get("max-length"), Some(&json!(5)));
        assert_eq!(merged.get("message-ttl"), Some(&json!(10)));
        assert_eq!(merged.get("expires"), Some(&json!(1000)));
        assert_eq!(merged.get("overflow"), Some(&json!("drop-head")));
        assert_eq!(
            merged_definition(None, Some(&op)),
            Some(op.definition.clone())
        );
        assert!(merged_definition(None, None).is_none());
        // A declared argument cannot lift the cap either.
        let mut declared = FieldTable::new();
        declared.insert("x-max-length", FieldValue::I64(50));
        let eff = effective_for(&declared, Some(&merged), false);
        assert_eq!(eff.get("x-max-length").and_then(|v| v.as_i64()), Some(5));
        let serde_json::Value::Object(bad) = json!({"overflow": "drop-head"}) else {
            panic!()
        };
        assert!(Policy::new_operator("/", "op", ".*", ApplyTo::Queues, 0, bad).is_err());
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
            ps.matching("/", Target::Queue(QueueType::Classic), "queue")
                .map(|p| p.name),
            Some("b".into())
        );
        assert!(ps.matching("/", Target::Exchange, "queue").is_none());
        assert!(ps
            .matching("/", Target::Queue(QueueType::Classic), "other")
            .is_none());
        let mut q = policy(json!({"delivery-limit": 3}));
        q.name = "q".into();
        q.priority = 9;
        q.apply_to = ApplyTo::QuorumQueues;
        ps.put(q).expect("put q");
        let quorum = Target::Queue(QueueType::Quorum);
        assert_eq!(
            ps.matching("/", quorum, "queue").map(|p| p.name),
            Some("q".into())
        );
        assert_eq!(
            ps.matching("/", Target::Queue(QueueType::Classic), "queue")
                .map(|p| p.name),
            Some("b".into())
        );
    }
}
