//! Users, password hashes, tags and per-vhost permissions (RabbitMQ's internal
//! auth backend).
//!
//! Passwords are stored as RabbitMQ's `rabbit_password_hashing_sha256` hashes:
//! `base64(salt(4 bytes) ++ sha256(salt ++ utf8 password))`, so definitions exported
//! here import into RabbitMQ and the other way round. Permissions are three regexes
//! (configure, write, read) per (vhost, user); the empty string means `^$`.
//! Once [`Auth::attach`] gives it the store, every change is written there.

use crate::storage::{StorageError, Store, TopologyKind};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use parking_lot::RwLock;
use regex::Regex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::OnceLock;

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

/// A user as stored on disk.
#[derive(Debug, Serialize, Deserialize)]
struct UserRecord {
    name: String,
    password_hash: String,
    tags: Vec<String>,
    loopback_only: bool,
}

/// A permission as stored on disk.
#[derive(Debug, Serialize, Deserialize)]
struct PermissionRecord {
    vhost: String,
    user: String,
    configure: String,
    write: String,
    read: String,
}

/// Key of a permission record: vhost and user, NUL-separated.
fn permission_key(vhost: &str, user: &str) -> String {
    format!("{vhost}\0{user}")
}

/// The user and permission store.
#[derive(Debug, Default)]
pub struct Auth {
    users: RwLock<BTreeMap<String, User>>,
    /// Keyed by (vhost, user).
    permissions: RwLock<BTreeMap<(String, String), Permission>>,
    store: OnceLock<Store>,
}

impl Auth {
    /// Persist from now on. If the store holds users, they and their permissions
    /// replace what is in memory (the default user is only created on first start,
    /// as in RabbitMQ); otherwise what is in memory is written to it.
    pub fn attach(&self, store: &Store) -> Result<(), StorageError> {
        let users = store.load_topology(TopologyKind::User)?;
        if users.is_empty() {
            for u in self.users() {
                save_user(store, &u);
            }
            for (v, u, p) in self.permissions() {
                save_permission(store, &v, &u, &p);
            }
        } else {
            let mut map = BTreeMap::new();
            for (key, bytes) in users {
                match serde_json::from_slice::<UserRecord>(&bytes) {
                    Ok(r) => {
                        map.insert(
                            r.name.clone(),
                            User {
                                name: r.name,
                                password_hash: r.password_hash,
                                tags: r.tags,
                                loopback_only: r.loopback_only,
                            },
                        );
                    }
                    Err(e) => tracing::error!(key, error = %e, "skipping bad user record"),
                }
            }
            let mut perms = BTreeMap::new();
            for (key, bytes) in store.load_topology(TopologyKind::Permission)? {
                let parsed = serde_json::from_slice::<PermissionRecord>(&bytes)
                    .map_err(|e| e.to_string())
                    .and_then(|r| Permission::new(&r.configure, &r.write, &r.read).map(|p| (r, p)));
                match parsed {
                    Ok((r, p)) => {
                        perms.insert((r.vhost, r.user), p);
                    }
                    Err(e) => tracing::error!(key, error = %e, "skipping bad permission record"),
                }
            }
            *self.users.write() = map;
            *self.permissions.write() = perms;
        }
        let _ = self.store.set(store.clone());
        Ok(())
    }

    pub fn user(&self, name: &str) -> Option<User> {
        self.users.read().get(name).cloned()
    }

    pub fn users(&self) -> Vec<User> {
        self.users.read().values().cloned().collect()
    }

    /// Create or replace a user.
    pub fn put_user(&self, user: User) {
        if let Some(store) = self.store.get() {
            save_user(store, &user);
        }
        self.users.write().insert(user.name.clone(), user);
    }

    /// Delete a user and their permissions; false if unknown.
    pub fn delete_user(&self, name: &str) -> bool {
        let existed = self.users.write().remove(name).is_some();
        self.permissions.write().retain(|(v, u), _| {
            if u == name {
                self.forget_permission(v, u);
            }
            u != name
        });
        if let Some(store) = self.store.get() {
            drop_record(store, TopologyKind::User, name);
        }
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
        if let Some(store) = self.store.get() {
            save_permission(store, vhost, user, &p);
        }
        self.permissions
            .write()
            .insert((vhost.to_string(), user.to_string()), p);
    }

    pub fn clear_permission(&self, vhost: &str, user: &str) -> bool {
        self.forget_permission(vhost, user);
        self.permissions
            .write()
            .remove(&(vhost.to_string(), user.to_string()))
            .is_some()
    }

    /// Drop every permission in a deleted vhost.
    pub fn vhost_deleted(&self, vhost: &str) {
        self.permissions.write().retain(|(v, u), _| {
            if v == vhost {
                self.forget_permission(v, u);
            }
            v != vhost
        });
    }

    fn forget_permission(&self, vhost: &str, user: &str) {
        if let Some(store) = self.store.get() {
            drop_record(
                store,
                TopologyKind::Permission,
                &permission_key(vhost, user),
            );
        }
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

fn save_user(store: &Store, u: &User) {
    let rec = UserRecord {
        name: u.name.clone(),
        password_hash: u.password_hash.clone(),
        tags: u.tags.clone(),
        loopback_only: u.loopback_only,
    };
    write_record(store, TopologyKind::User, &u.name, &rec);
}

fn save_permission(store: &Store, vhost: &str, user: &str, p: &Permission) {
    let rec = PermissionRecord {
        vhost: vhost.into(),
        user: user.into(),
        configure: p.configure.clone(),
        write: p.write.clone(),
        read: p.read.clone(),
    };
    write_record(
        store,
        TopologyKind::Permission,
        &permission_key(vhost, user),
        &rec,
    );
}

/// Write one topology record; failures are logged (the change stays in memory).
pub(crate) fn write_record(store: &Store, kind: TopologyKind, key: &str, rec: &impl Serialize) {
    let result = serde_json::to_vec(rec)
        .map_err(|e| e.to_string())
        .and_then(|bytes| {
            store
                .put_topology(kind, key, &bytes)
                .map_err(|e| e.to_string())
        });
    if let Err(e) = result {
        tracing::error!(key, kind = kind.as_str(), error = %e, "cannot write record");
    }
}

pub(crate) fn drop_record(store: &Store, kind: TopologyKind, key: &str) {
    if let Err(e) = store.delete_topology(kind, key) {
        tracing::error!(key, kind = kind.as_str(), error = %e, "cannot delete record");
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
