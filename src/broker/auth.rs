//! Users, password hashes, tags and per-vhost permissions (RabbitMQ's internal
//! auth backend).
//!
//! Passwords are stored as RabbitMQ's `rabbit_password_hashing_sha256` hashes:
//! `base64(salt(4 bytes) ++ sha256(salt ++ utf8 password))`, so definitions exported
//! here import into RabbitMQ and the other way round. Permissions are three regexes
//! (configure, write, read) per (vhost, user); the empty string means `^$`.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use parking_lot::RwLock;
use regex::Regex;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

/// The only hashing algorithm we produce and accept.
pub const HASHING_ALGORITHM: &str = "rabbit_password_hashing_sha256";

/// A broker user.
#[derive(Debug, Clone)]
pub struct User {
    pub name: String,
    /// base64 salted hash; empty means password logins are refused.
    pub password_hash: String,
    pub tags: Vec<String>,
    /// May only connect from loopback addresses.
    pub loopback_only: bool,
}

impl User {
    pub fn has_tag(&self, tag: &str) -> bool {
        self.tags.iter().any(|t| t == tag)
    }

    /// The tags as RabbitMQ's API lists them.
    pub fn tags_list(&self) -> Vec<String> {
        self.tags.clone()
    }
}

/// The three permission kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Configure,
    Write,
    Read,
}

/// A user's permissions in one vhost.
#[derive(Debug, Clone)]
pub struct Permission {
    pub configure: String,
    pub write: String,
    pub read: String,
    compiled: [Regex; 3],
}

impl Permission {
    /// Compile the three regexes; the error names the bad one.
    pub fn new(configure: &str, write: &str, read: &str) -> Result<Permission, String> {
        let compile = |re: &str| {
            let re = if re.is_empty() { "^$" } else { re };
            Regex::new(re).map_err(|e| format!("invalid regex '{re}': {e}"))
        };
        Ok(Permission {
            configure: configure.into(),
            write: write.into(),
            read: read.into(),
            compiled: [compile(configure)?, compile(write)?, compile(read)?],
        })
    }

    pub fn allows(&self, access: Access, name: &str) -> bool {
        let idx = match access {
            Access::Configure => 0,
            Access::Write => 1,
            Access::Read => 2,
        };
        self.compiled[idx].is_match(name)
    }
}

/// Hash `password` with a fresh random 4-byte salt.
pub fn hash_password(password: &str) -> String {
    let salt: [u8; 4] = rand::random();
    hash_with_salt(salt, password)
}

fn hash_with_salt(salt: [u8; 4], password: &str) -> String {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(password.as_bytes());
    let mut out = salt.to_vec();
    out.extend_from_slice(&h.finalize());
    B64.encode(out)
}

/// Check `password` against a stored hash.
pub fn verify_password(hash: &str, password: &str) -> bool {
    let Ok(raw) = B64.decode(hash) else {
        return false;
    };
    if raw.len() != 4 + 32 {
        return false;
    }
    let salt = [raw[0], raw[1], raw[2], raw[3]];
    hash_with_salt(salt, password) == hash
}

/// Whether a stored hash is well formed (for `password_hash` in the API / definitions).
pub fn valid_hash(hash: &str) -> bool {
    hash.is_empty() || B64.decode(hash).is_ok_and(|raw| raw.len() == 36)
}

/// The user and permission store.
#[derive(Debug, Default)]
pub struct Auth {
    users: RwLock<BTreeMap<String, User>>,
    /// Keyed by (vhost, user).
    permissions: RwLock<BTreeMap<(String, String), Permission>>,
}

impl Auth {
    pub fn user(&self, name: &str) -> Option<User> {
        self.users.read().get(name).cloned()
    }

    pub fn users(&self) -> Vec<User> {
        self.users.read().values().cloned().collect()
    }

    /// Create or replace a user.
    pub fn put_user(&self, user: User) {
        self.users.write().insert(user.name.clone(), user);
    }

    /// Delete a user and their permissions; false if unknown.
    pub fn delete_user(&self, name: &str) -> bool {
        let existed = self.users.write().remove(name).is_some();
        self.permissions.write().retain(|(_, u), _| u != name);
        existed
    }

    /// The user if the password matches.
    pub fn check_password(&self, name: &str, password: &str) -> Option<User> {
        let users = self.users.read();
        let u = users.get(name)?;
        (!u.password_hash.is_empty() && verify_password(&u.password_hash, password))
            .then(|| u.clone())
    }

    pub fn set_permission(&self, vhost: &str, user: &str, p: Permission) {
        self.permissions
            .write()
            .insert((vhost.to_string(), user.to_string()), p);
    }

    pub fn clear_permission(&self, vhost: &str, user: &str) -> bool {
        self.permissions
            .write()
            .remove(&(vhost.to_string(), user.to_string()))
            .is_some()
    }

    /// Drop every permission in a deleted vhost.
    pub fn vhost_deleted(&self, vhost: &str) {
        self.permissions.write().retain(|(v, _), _| v != vhost);
    }

    pub fn permission(&self, vhost: &str, user: &str) -> Option<Permission> {
        self.permissions
            .read()
            .get(&(vhost.to_string(), user.to_string()))
            .cloned()
    }

    /// All permissions as (vhost, user, permission).
    pub fn permissions(&self) -> Vec<(String, String, Permission)> {
        self.permissions
            .read()
            .iter()
            .map(|((v, u), p)| (v.clone(), u.clone(), p.clone()))
            .collect()
    }

    /// May `user` use `vhost` at all (has any permission entry there)?
    pub fn vhost_access(&self, vhost: &str, user: &str) -> bool {
        self.permissions
            .read()
            .contains_key(&(vhost.to_string(), user.to_string()))
    }

    /// May `user` do `access` on the resource `name` in `vhost`?
    pub fn allows(&self, vhost: &str, user: &str, access: Access, name: &str) -> bool {
        self.permissions
            .read()
            .get(&(vhost.to_string(), user.to_string()))
            .is_some_and(|p| p.allows(access, name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify_and_match_rabbitmq() {
        let h = hash_password("secret");
        assert!(verify_password(&h, "secret"));
        assert!(!verify_password(&h, "Secret"));
        // From RabbitMQ's docs: salt 908D C60A, password "test12".
        let salt = [0x90, 0x8d, 0xc6, 0x0a];
        assert_eq!(
            hash_with_salt(salt, "test12"),
            "kI3GCqW5JLMJa4iX1lo7X4D6XbYqlLgxIs30+P6tENUV2POR"
        );
    }

    #[test]
    fn empty_regex_matches_nothing() {
        let p = Permission::new("", "^amq\\.", ".*").unwrap();
        assert!(!p.allows(Access::Configure, "q"));
        assert!(p.allows(Access::Write, "amq.topic"));
        assert!(!p.allows(Access::Write, "x"));
        assert!(p.allows(Access::Read, "anything"));
        assert!(Permission::new("(", "", "").is_err());
    }
}
