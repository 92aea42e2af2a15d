//! Users, password hashes, tags and per-vhost permissions (RabbitMQ's internal
//! auth backend).
//!
//! Passwords are stored as RabbitMQ's `rabbit_password_hashing_sha256` hashes:
//! `base64(salt(4 bytes) ++ sha256(salt ++ utf8 password))`, so definitions exported
//! here import into RabbitMQ and the other way round. Permissions are three regexes
//! (configure, write, read) per (vhost, user); the empty string means `^$`.
//! Topic permissions add two regexes (write, read) per (vhost, user, exchange),
//! matched against routing keys on topic exchanges, with `{username}`,
//! `{vhost}` and `{client_id}` expanded as RabbitMQ does; user limits
//! (`max-connections`, `max-channels`) are kept per user.
//! Once [`Auth::attach`] gives it the store, every change is written there.

use crate::broker::limits::LimitMap;
use crate::storage::{StorageError, Store, TopologyKind};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use parking_lot::RwLock;
use regex::Regex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

/// The hashing algorithm of the hashes warren makes (RabbitMQ's default).
pub const HASHING_ALGORITHM: &str = "rabbit_password_hashing_sha256";

/// RabbitMQ's other salted hash (a 4-byte salt and SHA-512 of salt and
/// password), accepted in `password_hash` and kept as given.
pub const HASHING_ALGORITHM_SHA512: &str = "rabbit_password_hashing_sha512";

/// The algorithm of a stored hash, told by its length (36 bytes: SHA-256,
/// 68: SHA-512); None for a malformed one.
pub fn hash_algorithm(hash: &str) -> Option<&'static str> {
    match B64.decode(hash).ok()?.len() {
        36 => Some(HASHING_ALGORITHM),
        68 => Some(HASHING_ALGORITHM_SHA512),
        _ => None,
    }
}

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

/// Compile a permission regex; the empty string means `^$` (nothing).
fn compile(re: &str) -> Result<Regex, String> {
    let re = if re.is_empty() { "^$" } else { re };
    Regex::new(re).map_err(|e| format!("invalid regex '{re}': {e}"))
}

impl Permission {
    /// Compile the three regexes; the error names the bad one.
    pub fn new(configure: &str, write: &str, read: &str) -> Result<Permission, String> {
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

/// The `{client_id}` placeholder: the one topic-permission variable that is not
/// known when the permission is set.
const CLIENT_ID: &str = "{client_id}";

/// Compiled `{client_id}` expansions kept per pattern before the cache is reset.
const EXPANSION_CACHE: usize = 256;

/// One topic-permission regex. `{username}` and `{vhost}` are expanded when the
/// permission is set (it belongs to one user in one vhost); a pattern still
/// holding `{client_id}` is compiled per client id, and those are cached.
#[derive(Debug)]
struct TopicPattern {
    fixed: Option<Regex>,
    template: String,
    expanded: parking_lot::Mutex<HashMap<String, Option<Regex>>>,
}

impl TopicPattern {
    fn new(source: &str, vhost: &str, user: &str) -> Result<TopicPattern, String> {
        let template = source.replace("{username}", user).replace("{vhost}", vhost);
        if template.contains(CLIENT_ID) {
            // Refuse what cannot compile whatever the client id.
            compile(&template.replace(CLIENT_ID, "client"))?;
            Ok(TopicPattern {
                fixed: None,
                template,
                expanded: Default::default(),
            })
        } else {
            Ok(TopicPattern {
                fixed: Some(compile(&template)?),
                template,
                expanded: Default::default(),
            })
        }
    }

    /// Whether `key` matches; `client_id` is asked for only when the pattern uses
    /// it (no client id: the empty string, as RabbitMQ expands a missing one).
    fn is_match(&self, key: &str, client_id: &dyn Fn() -> Option<String>) -> bool {
        if let Some(re) = &self.fixed {
            return re.is_match(key);
        }
        let id = client_id().unwrap_or_default();
        let mut cache = self.expanded.lock();
        if cache.len() >= EXPANSION_CACHE && !cache.contains_key(&id) {
            cache.clear();
        }
        cache
            .entry(id)
            .or_insert_with_key(|id| compile(&self.template.replace(CLIENT_ID, id)).ok())
            .as_ref()
            .is_some_and(|re| re.is_match(key))
    }
}

/// A user's topic permissions on one exchange of one vhost.
#[derive(Debug, Clone)]
pub struct TopicPermission {
    pub exchange: String,
    pub write: String,
    pub read: String,
    compiled: Arc<[TopicPattern; 2]>,
}

impl TopicPermission {
    /// Compile the write and read regexes for `user` in `vhost`; the error names
    /// the bad one.
    pub fn new(
        vhost: &str,
        user: &str,
        exchange: &str,
        write: &str,
        read: &str,
    ) -> Result<TopicPermission, String> {
        Ok(TopicPermission {
            exchange: exchange.into(),
            write: write.into(),
            read: read.into(),
            compiled: Arc::new([
                TopicPattern::new(write, vhost, user)?,
                TopicPattern::new(read, vhost, user)?,
            ]),
        })
    }

    /// Whether `access` (write or read) to `routing_key` is allowed.
    pub fn allows(
        &self,
        access: Access,
        routing_key: &str,
        client_id: &dyn Fn() -> Option<String>,
    ) -> bool {
        let i = match access {
            Access::Write => 0,
            Access::Read => 1,
            Access::Configure => return true,
        };
        self.compiled[i].is_match(routing_key, client_id)
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
    match raw.len() {
        36 => hash_with_salt([raw[0], raw[1], raw[2], raw[3]], password) == hash,
        68 => {
            let mut h = sha2::Sha512::new();
            h.update(&raw[..4]);
            h.update(password.as_bytes());
            h.finalize().as_slice() == &raw[4..]
        }
        _ => false,
    }
}

/// Whether a stored hash is well formed (for `password_hash` in the API / definitions).
pub fn valid_hash(hash: &str) -> bool {
    hash.is_empty() || hash_algorithm(hash).is_some()
}

/// A user as stored on disk.
#[derive(Debug, Serialize, Deserialize)]
struct UserRecord {
    name: String,
    password_hash: String,
    tags: Vec<String>,
    loopback_only: bool,
    /// `max-connections`, `max-channels`; absent in older records.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    limits: LimitMap,
}

/// A permission as stored on disk; with an `exchange`, a topic permission.
#[derive(Debug, Serialize, Deserialize)]
struct PermissionRecord {
    vhost: String,
    user: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exchange: Option<String>,
    #[serde(default)]
    configure: String,
    write: String,
    read: String,
}

/// Key of a permission record: vhost and user, NUL-separated.
fn permission_key(vhost: &str, user: &str) -> String {
    format!("{vhost}\0{user}")
}

/// Key of a topic-permission record: vhost, user and exchange, NUL-separated
/// (three parts, so never equal to a [`permission_key`]).
fn topic_permission_key(vhost: &str, user: &str, exchange: &str) -> String {
    format!("{vhost}\0{user}\0{exchange}")
}

/// Topic permissions by vhost, then user, then exchange: a publish looks one up
/// by `&str`s, without allocating a key.
#[derive(Debug, Default)]
struct TopicMap(BTreeMap<String, BTreeMap<String, BTreeMap<String, TopicPermission>>>);

impl TopicMap {
    fn get(&self, vhost: &str, user: &str, exchange: &str) -> Option<&TopicPermission> {
        self.0.get(vhost)?.get(user)?.get(exchange)
    }

    /// Set `user`'s permission on `p.exchange` in `vhost`; true if new.
    fn insert(&mut self, vhost: &str, user: &str, p: TopicPermission) -> bool {
        self.0
            .entry(vhost.to_string())
            .or_default()
            .entry(user.to_string())
            .or_default()
            .insert(p.exchange.clone(), p)
            .is_none()
    }

    /// Keep what `keep(vhost, user, exchange)` says to keep.
    fn retain(&mut self, mut keep: impl FnMut(&str, &str, &str) -> bool) {
        for (v, users) in self.0.iter_mut() {
            for (u, exchanges) in users.iter_mut() {
                exchanges.retain(|x, _| keep(v, u, x));
            }
            users.retain(|_, exchanges| !exchanges.is_empty());
        }
        self.0.retain(|_, users| !users.is_empty());
    }

    fn iter(&self) -> impl Iterator<Item = (&str, &str, &TopicPermission)> {
        self.0.iter().flat_map(|(v, users)| {
            users
                .iter()
                .flat_map(move |(u, xs)| xs.values().map(move |p| (v.as_str(), u.as_str(), p)))
        })
    }

    fn len(&self) -> usize {
        self.0
            .values()
            .flat_map(|users| users.values())
            .map(BTreeMap::len)
            .sum()
    }
}

/// The user and permission store.
#[derive(Debug, Default)]
pub struct Auth {
    users: RwLock<BTreeMap<String, User>>,
    /// Keyed by (vhost, user).
    permissions: RwLock<BTreeMap<(String, String), Permission>>,
    topic_permissions: RwLock<TopicMap>,
    /// How many topic permissions exist: publishes skip the lookup when none do.
    topic_count: AtomicUsize,
    /// Per-user limits (users without any are absent).
    user_limits: RwLock<BTreeMap<String, LimitMap>>,
    store: OnceLock<Store>,
    /// Access tokens are accepted when set (`auth_oauth2.*`).
    oauth2: OnceLock<crate::broker::oauth::Verifier>,
}

impl Auth {
    /// Persist from now on. If the store holds users, they and their permissions
    /// replace what is in memory (the default user is only created on first start,
    /// as in RabbitMQ); otherwise what is in memory is written to it.
    pub fn attach(&self, store: &Store) -> Result<(), StorageError> {
        let users = store.load_topology(TopologyKind::User)?;
        if users.is_empty() {
            for u in self.users() {
                save_user(store, &u, &self.user_limits(&u.name));
            }
            for (v, u, p) in self.permissions() {
                save_permission(store, &v, &u, &p);
            }
            for (v, u, p) in self.topic_permissions() {
                save_topic_permission(store, &v, &u, &p);
            }
        } else {
            let mut map = BTreeMap::new();
            let mut limits = BTreeMap::new();
            for (key, bytes) in users {
                match serde_json::from_slice::<UserRecord>(&bytes) {
                    Ok(r) => {
                        if !r.limits.is_empty() {
                            limits.insert(r.name.clone(), r.limits);
                        }
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
            let mut topics = TopicMap::default();
            for (key, bytes) in store.load_topology(TopologyKind::Permission)? {
                let parsed =
                    serde_json::from_slice::<PermissionRecord>(&bytes).map_err(|e| e.to_string());
                let loaded = parsed.and_then(|r| match &r.exchange {
                    Some(x) => {
                        TopicPermission::new(&r.vhost, &r.user, x, &r.write, &r.read).map(|p| {
                            topics.insert(&r.vhost, &r.user, p);
                        })
                    }
                    None => Permission::new(&r.configure, &r.write, &r.read).map(|p| {
                        perms.insert((r.vhost.clone(), r.user.clone()), p);
                    }),
                });
                if let Err(e) = loaded {
                    tracing::error!(key, error = %e, "skipping bad permission record");
                }
            }
            *self.users.write() = map;
            *self.permissions.write() = perms;
            self.topic_count.store(topics.len(), Ordering::Relaxed);
            *self.topic_permissions.write() = topics;
            *self.user_limits.write() = limits;
        }
        let _ = self.store.set(store.clone());
        Ok(())
    }

    /// Accept OAuth 2.0 access tokens, checked by `verifier` (set once, at start).
    pub fn set_oauth2(&self, verifier: crate::broker::oauth::Verifier) {
        let _ = self.oauth2.set(verifier);
    }

    /// The access-token verifier, when tokens are accepted.
    pub fn oauth2(&self) -> Option<&crate::broker::oauth::Verifier> {
        self.oauth2.get()
    }

    pub fn user(&self, name: &str) -> Option<User> {
        self.users.read().get(name).cloned()
    }

    pub fn users(&self) -> Vec<User> {
        self.users.read().values().cloned().collect()
    }

    /// Create or replace a user (their limits stay).
    pub fn put_user(&self, user: User) {
        if let Some(store) = self.store.get() {
            save_user(store, &user, &self.user_limits(&user.name));
        }
        self.users.write().insert(user.name.clone(), user);
    }

    /// Delete a user, their permissions, topic permissions and limits; false if
    /// unknown.
    pub fn delete_user(&self, name: &str) -> bool {
        let existed = self.users.write().remove(name).is_some();
        self.user_limits.write().remove(name);
        self.permissions.write().retain(|(v, u), _| {
            if u == name {
                self.forget_permission(v, u);
            }
            u != name
        });
        self.forget_topic_permissions(|_, u, _| u == name);
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

    /// Drop every permission and topic permission in a deleted vhost.
    pub fn vhost_deleted(&self, vhost: &str) {
        self.permissions.write().retain(|(v, u), _| {
            if v == vhost {
                self.forget_permission(v, u);
            }
            v != vhost
        });
        self.forget_topic_permissions(|v, _, _| v == vhost);
    }

    /// Drop the topic permissions whose (vhost, user, exchange) `doomed` picks.
    fn forget_topic_permissions(&self, doomed: impl Fn(&str, &str, &str) -> bool) {
        let mut topics = self.topic_permissions.write();
        topics.retain(|v, u, x| {
            let gone = doomed(v, u, x);
            if gone {
                if let Some(store) = self.store.get() {
                    drop_record(
                        store,
                        TopologyKind::Permission,
                        &topic_permission_key(v, u, x),
                    );
                }
            }
            !gone
        });
        self.topic_count.store(topics.len(), Ordering::Relaxed);
    }

    /// Set `user`'s topic permission on `p.exchange` in `vhost`; true if new.
    pub fn set_topic_permission(&self, vhost: &str, user: &str, p: TopicPermission) -> bool {
        let mut topics = self.topic_permissions.write();
        if let Some(store) = self.store.get() {
            save_topic_permission(store, vhost, user, &p);
        }
        let created = topics.insert(vhost, user, p);
        self.topic_count.store(topics.len(), Ordering::Relaxed);
        created
    }

    /// Clear `user`'s topic permissions in `vhost`: on `exchange` only, or all of
    /// them (None). False if there were none.
    pub fn clear_topic_permission(&self, vhost: &str, user: &str, exchange: Option<&str>) -> bool {
        let before = self.topic_count.load(Ordering::Relaxed);
        self.forget_topic_permissions(|v, u, x| {
            v == vhost && u == user && exchange.is_none_or(|e| e == x)
        });
        self.topic_count.load(Ordering::Relaxed) != before
    }

    /// All topic permissions as (vhost, user, permission), sorted.
    pub fn topic_permissions(&self) -> Vec<(String, String, TopicPermission)> {
        self.topic_permissions
            .read()
            .iter()
            .map(|(v, u, p)| (v.to_string(), u.to_string(), p.clone()))
            .collect()
    }

    /// RabbitMQ's topic authorisation: may `user` `access` (write: publish, read:
    /// bind) `routing_key` on the topic exchange `exchange` of `vhost`? Allowed
    /// when the user has no topic permission on that exchange. `client_id` is
    /// asked for only when a pattern uses `{client_id}`.
    pub fn topic_allows(
        &self,
        vhost: &str,
        user: &str,
        exchange: &str,
        access: Access,
        routing_key: &str,
        client_id: &dyn Fn() -> Option<String>,
    ) -> bool {
        if self.topic_count.load(Ordering::Relaxed) == 0 {
            return true;
        }
        match self.topic_permissions.read().get(vhost, user, exchange) {
            None => true,
            Some(p) => p.allows(access, routing_key, client_id),
        }
    }

    /// Whether any topic permission exists (checks can be skipped when none do).
    pub fn has_topic_permissions(&self) -> bool {
        self.topic_count.load(Ordering::Relaxed) > 0
    }

    /// `user`'s limits (empty when none are set).
    pub fn user_limits(&self, user: &str) -> LimitMap {
        self.user_limits
            .read()
            .get(user)
            .cloned()
            .unwrap_or_default()
    }

    /// Every user's limits, users without limits left out.
    pub fn all_user_limits(&self) -> Vec<(String, LimitMap)> {
        self.user_limits
            .read()
            .iter()
            .map(|(u, l)| (u.clone(), l.clone()))
            .collect()
    }

    /// Change `user`'s limits with `f` (stored with the user's record); the
    /// limits before, or None if there is no such user.
    pub fn change_user_limits(
        &self,
        user: &str,
        f: impl FnOnce(&mut LimitMap),
    ) -> Option<LimitMap> {
        let u = self.user(user)?;
        let mut all = self.user_limits.write();
        let before = all.get(user).cloned().unwrap_or_default();
        let mut next = before.clone();
        f(&mut next);
        if let Some(store) = self.store.get() {
            save_user(store, &u, &next);
        }
        if next.is_empty() {
            all.remove(user);
        } else {
            all.insert(user.to_string(), next);
        }
        Some(before)
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

fn save_user(store: &Store, u: &User, limits: &LimitMap) {
    let rec = UserRecord {
        name: u.name.clone(),
        password_hash: u.password_hash.clone(),
        tags: u.tags.clone(),
        loopback_only: u.loopback_only,
        limits: limits.clone(),
    };
    write_record(store, TopologyKind::User, &u.name, &rec);
}

fn save_topic_permission(store: &Store, vhost: &str, user: &str, p: &TopicPermission) {
    let rec = PermissionRecord {
        vhost: vhost.into(),
        user: user.into(),
        exchange: Some(p.exchange.clone()),
        configure: String::new(),
        write: p.write.clone(),
        read: p.read.clone(),
    };
    write_record(
        store,
        TopologyKind::Permission,
        &topic_permission_key(vhost, user, &p.exchange),
        &rec,
    );
}

fn save_permission(store: &Store, vhost: &str, user: &str, p: &Permission) {
    let rec = PermissionRecord {
        vhost: vhost.into(),
        user: user.into(),
        exchange: None,
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
    fn sha512_hashes_as_rabbitmq_makes_them_are_verified() {
        use sha2::Sha512;
        let salt = [1u8, 2, 3, 4];
        let mut h = Sha512::new();
        h.update(salt);
        h.update(b"s3cret");
        let mut raw = salt.to_vec();
        raw.extend_from_slice(&h.finalize());
        let hash = B64.encode(raw);
        assert_eq!(hash_algorithm(&hash), Some(HASHING_ALGORITHM_SHA512));
        assert!(valid_hash(&hash));
        assert!(verify_password(&hash, "s3cret"));
        assert!(!verify_password(&hash, "s3cre"));
        let sha256 = hash_password("x");
        assert_eq!(hash_algorithm(&sha256), Some(HASHING_ALGORITHM));
        assert!(verify_password(&sha256, "x"));
        assert_eq!(hash_algorithm("AAAA"), None);
    }

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

    #[test]
    fn topic_patterns_expand_username_vhost_and_client_id() {
        let none = || None;
        let p = TopicPermission::new("/", "alice", "amq.topic", "^{username}\\.", "^{vhost}|x")
            .expect("valid");
        assert!(p.allows(Access::Write, "alice.orders", &none));
        assert!(!p.allows(Access::Write, "bob.orders", &none));
        assert!(p.allows(Access::Read, "/", &none));
        assert!(!p.allows(Access::Read, "y", &none));
        let p = TopicPermission::new("/", "alice", "t", "^c\\.{client_id}$", "").expect("valid");
        assert!(p.allows(Access::Write, "c.app1", &|| Some("app1".into())));
        assert!(!p.allows(Access::Write, "c.app1", &|| Some("app2".into())));
        assert!(!p.allows(Access::Write, "c.app1", &none));
        assert!(!p.allows(Access::Read, "anything", &none), "empty is ^$");
        assert!(TopicPermission::new("/", "a", "t", "(", ".*").is_err());
    }

    #[test]
    fn without_topic_permissions_everything_is_allowed() {
        let auth = Auth::default();
        let none = || None;
        assert!(auth.topic_allows("/", "u", "amq.topic", Access::Write, "k", &none));
        let p = TopicPermission::new("/", "u", "amq.topic", "^a", "^a").expect("valid");
        assert!(auth.set_topic_permission("/", "u", p));
        assert!(!auth.topic_allows("/", "u", "amq.topic", Access::Write, "b", &none));
        assert!(auth.topic_allows("/", "u", "other", Access::Write, "b", &none));
        assert!(auth.topic_allows("/", "v", "amq.topic", Access::Write, "b", &none));
        assert!(auth.clear_topic_permission("/", "u", None));
        assert!(!auth.has_topic_permissions());
        assert!(!auth.clear_topic_permission("/", "u", None));
    }
}
