//! Tenancy limits set at run time, as RabbitMQ's `rabbitmqctl set_vhost_limits` /
//! `set_user_limits` and `/api/vhost-limits` / `/api/user-limits` set them:
//! per vhost `max-connections` and `max-queues`, per user `max-connections` and
//! `max-channels`.
//!
//! A limit is a whole number: negative means no limit, 0 allows none. Limits are
//! stored with their vhost's and user's durable records. The checks and
//! RabbitMQ's refusal texts are here; they are applied where the counted thing
//! is made: connection.open ([`crate::broker::Broker::admit_connection`]),
//! channel.open ([`crate::broker::Broker::admit_channel`]) and queue.declare (the
//! vhost's one door, with the configured `max_queues_per_vhost`).

use crate::error::AmqpError;
use parking_lot::RwLock;
use std::collections::BTreeMap;

/// The limits a vhost accepts.
pub const VHOST_LIMITS: &[&str] = &["max-connections", "max-queues"];
/// The limits a user accepts.
pub const USER_LIMITS: &[&str] = &["max-connections", "max-channels"];

/// Limit name to value, as the API shows them (`{"max-connections": 10}`).
pub type LimitMap = BTreeMap<String, i64>;

/// Check one limit (`name` among `known`, an integer value); the error is a
/// reason for a 400, in RabbitMQ's words where it has them.
pub fn validate(known: &[&str], name: &str, value: &serde_json::Value) -> Result<i64, String> {
    if !known.contains(&name) {
        return Err(format!(
            "Validation failed\n\nUnrecognised terms [{{<<\"{name}\">>,{value}}}] in limits"
        ));
    }
    value
        .as_i64()
        .or_else(|| value.as_str().and_then(|s| s.trim().parse().ok()))
        .ok_or_else(|| format!("Validation failed\n\n{name} must be an integer (got {value})"))
}

/// Check a whole limits object (`{"max-connections": 10, ...}`).
pub fn validate_all(known: &[&str], value: &serde_json::Value) -> Result<LimitMap, String> {
    let obj = value
        .as_object()
        .ok_or_else(|| "limits must be a JSON object".to_string())?;
    obj.iter()
        .map(|(k, v)| validate(known, k, v).map(|n| (k.clone(), n)))
        .collect()
}

/// The limit `name` in `map` when it limits anything (not negative).
pub fn active(map: &LimitMap, name: &str) -> Option<usize> {
    map.get(name).and_then(|v| usize::try_from(*v).ok())
}

/// The run-time limits of one vhost.
#[derive(Debug, Default)]
pub struct VHostLimitValues(RwLock<LimitMap>);

impl VHostLimitValues {
    pub fn all(&self) -> LimitMap {
        self.0.read().clone()
    }

    /// The limit `name` when it limits anything (not negative).
    pub fn active(&self, name: &str) -> Option<usize> {
        active(&self.0.read(), name)
    }

    /// Replace every limit (recovery).
    pub fn replace(&self, map: LimitMap) {
        *self.0.write() = map;
    }

    /// Change the limits with `f`, `save` the result (under the lock, so the
    /// store never lags), then keep it; returns the limits before.
    pub fn change<E>(
        &self,
        f: impl FnOnce(&mut LimitMap),
        save: impl FnOnce(&LimitMap) -> Result<(), E>,
    ) -> Result<LimitMap, E> {
        let mut cur = self.0.write();
        let mut next = cur.clone();
        f(&mut next);
        save(&next)?;
        Ok(std::mem::replace(&mut *cur, next))
    }
}

/// connection.open refused by the vhost's `max-connections` (530).
pub fn vhost_connections_reached(vhost: &str, user: &str, limit: usize) -> AmqpError {
    AmqpError::not_allowed(format!(
        "access to vhost '{vhost}' refused for user '{user}': connection limit ({limit}) is reached"
    ))
}

/// connection.open refused by the user's `max-connections` (530).
pub fn user_connections_reached(user: &str, limit: usize) -> AmqpError {
    AmqpError::not_allowed(format!(
        "connection refused for user '{user}': user connection limit ({limit}) is reached"
    ))
}

/// channel.open refused by the user's `max-channels` (530, closes the connection).
pub fn user_channels_reached(user: &str, limit: usize) -> AmqpError {
    AmqpError::not_allowed(format!(
        "number of channels opened for user '{user}' has reached the maximum allowed user limit of ({limit})"
    ))
}

/// queue.declare refused by the vhost's queue limit (406).
pub fn queues_reached(queue: &str, vhost: &str, limit: usize) -> AmqpError {
    AmqpError::precondition_failed(format!(
        "cannot declare queue '{queue}': queue limit in vhost '{vhost}' ({limit}) is reached"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn values_are_checked() {
        assert_eq!(validate(VHOST_LIMITS, "max-queues", &json!(5)), Ok(5));
        assert_eq!(validate(VHOST_LIMITS, "max-queues", &json!("7")), Ok(7));
        assert_eq!(validate(VHOST_LIMITS, "max-queues", &json!(-1)), Ok(-1));
        assert!(validate(VHOST_LIMITS, "max-channels", &json!(5)).is_err());
        assert!(validate(USER_LIMITS, "max-channels", &json!("x")).is_err());
        let all = validate_all(
            USER_LIMITS,
            &json!({"max-connections": 2, "max-channels": 3}),
        )
        .expect("valid");
        assert_eq!(all.get("max-channels"), Some(&3));
        assert!(validate_all(USER_LIMITS, &json!([1])).is_err());
    }

    #[test]
    fn negative_is_no_limit_zero_allows_none() {
        let mut m = LimitMap::new();
        m.insert("max-connections".into(), -1);
        m.insert("max-queues".into(), 0);
        assert_eq!(active(&m, "max-connections"), None);
        assert_eq!(active(&m, "max-queues"), Some(0));
        assert_eq!(active(&m, "other"), None);
    }

    #[test]
    fn texts_are_rabbitmqs() {
        assert_eq!(
            vhost_connections_reached("/", "guest", 1).text,
            "NOT_ALLOWED - access to vhost '/' refused for user 'guest': connection limit (1) is reached"
        );
        assert_eq!(
            queues_reached("q", "/", 2).text,
            "PRECONDITION_FAILED - cannot declare queue 'q': queue limit in vhost '/' (2) is reached"
        );
    }
}
