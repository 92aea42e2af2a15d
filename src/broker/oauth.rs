//! OAuth 2.0 / JWT access tokens, as rabbitmq_auth_backend_oauth2 reads them:
//! the signing keys ([`Verifier`], from `auth_oauth2.*`), token verification
//! (signature with RS256/ES256-family keys, `exp`, `nbf`, the audience), and
//! what a verified [`Token`] grants: its user name, management tags and the
//! `<prefix>read|write|configure:<vhost>/<name>[/<routing key>]` scopes with
//! `*` wildcards (`%2F` for `/`). A connection logged in with a token asks its
//! [`Grant`] instead of the permission records.
//!
//! Pure: the time is passed in (`now_secs`), keys are read once at start.

use crate::broker::auth::{Access, User};
use crate::config::OAuth2;
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use parking_lot::RwLock;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// The configuration's keys could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("auth_oauth2: {0}")]
pub struct OAuth2Error(pub String);

/// Which kind of public key: it decides the algorithms a token may use with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    Rsa,
    Ec,
}

impl Family {
    fn of(alg: Algorithm) -> Option<Family> {
        match alg {
            Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 => Some(Family::Rsa),
            Algorithm::ES256 | Algorithm::ES384 => Some(Family::Ec),
            _ => None,
        }
    }
}

struct Key {
    decoding: DecodingKey,
    family: Family,
}

/// The keys and rules tokens are checked with (built once from `auth_oauth2.*`).
pub struct Verifier {
    config: OAuth2,
    prefix: String,
    keys: HashMap<String, Key>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut kids: Vec<&String> = self.keys.keys().collect();
        kids.sort();
        f.debug_struct("Verifier")
            .field("resource_server_id", &self.config.resource_server_id)
            .field("keys", &kids)
            .finish()
    }
}

/// A PEM public key, RSA or EC.
fn pem_key(pem: &[u8]) -> Option<Key> {
    if let Ok(decoding) = DecodingKey::from_rsa_pem(pem) {
        return Some(Key {
            decoding,
            family: Family::Rsa,
        });
    }
    DecodingKey::from_ec_pem(pem).ok().map(|decoding| Key {
        decoding,
        family: Family::Ec,
    })
}

impl Verifier {
    /// Read the signing keys (`signing_keys`, `jwks_file`); an unreadable key
    /// or a missing `resource_server_id` is an error.
    pub fn new(config: &OAuth2) -> Result<Verifier, OAuth2Error> {
        if config.resource_server_id.is_empty() {
            return Err(OAuth2Error("resource_server_id is required".into()));
        }
        let mut keys = HashMap::new();
        for (kid, path) in &config.signing_keys {
            let pem = std::fs::read(path)
                .map_err(|e| OAuth2Error(format!("signing key {kid} ({}): {e}", path.display())))?;
            let key = pem_key(&pem).ok_or_else(|| {
                OAuth2Error(format!(
                    "signing key {kid} ({}): not a PEM RSA or EC public key",
                    path.display()
                ))
            })?;
            keys.insert(kid.clone(), key);
        }
        if let Some(path) = &config.jwks_file {
            let text = std::fs::read(path)
                .map_err(|e| OAuth2Error(format!("jwks_file {}: {e}", path.display())))?;
            let set: JwkSet = serde_json::from_slice(&text)
                .map_err(|e| OAuth2Error(format!("jwks_file {}: {e}", path.display())))?;
            for jwk in &set.keys {
                let Some(kid) = jwk.common.key_id.clone() else {
                    tracing::warn!("jwks_file: skipping a key without kid");
                    continue;
                };
                let family = match jwk.algorithm {
                    AlgorithmParameters::RSA(_) => Family::Rsa,
                    AlgorithmParameters::EllipticCurve(_) => Family::Ec,
                    _ => {
                        tracing::warn!(kid, "jwks_file: skipping a key that is not RSA or EC");
                        continue;
                    }
                };
                let decoding = DecodingKey::from_jwk(jwk)
                    .map_err(|e| OAuth2Error(format!("jwks_file key {kid}: {e}")))?;
                keys.insert(kid, Key { decoding, family });
            }
        }
        if let Some(kid) = &config.default_key {
            if !keys.contains_key(kid) {
                return Err(OAuth2Error(format!("default_key {kid} is not a known key")));
            }
        }
        if keys.is_empty() {
            return Err(OAuth2Error("no signing_keys and no jwks_file".into()));
        }
        let prefix = config
            .scope_prefix
            .clone()
            .unwrap_or_else(|| format!("{}.", config.resource_server_id));
        Ok(Verifier {
            config: config.clone(),
            prefix,
            keys,
        })
    }

    /// Whether `secret` looks like a JWT at all (three dot-separated parts).
    pub fn looks_like_token(secret: &str) -> bool {
        secret.split('.').count() == 3
    }

    /// Verify `token` at `now_secs` (Unix seconds): signature, `nbf`, the
    /// audience, and `exp` when `check_exp` (connection.update-secret takes an
    /// expired token and lets the expiry timer close the connection, as
    /// RabbitMQ does). The error says why, for the log.
    pub fn verify(&self, token: &str, now_secs: u64, check_exp: bool) -> Result<Token, String> {
        let header = jsonwebtoken::decode_header(token).map_err(|e| format!("bad token: {e}"))?;
        let family =
            Family::of(header.alg).ok_or_else(|| format!("algorithm {:?} refused", header.alg))?;
        let kid = match (&header.kid, &self.config.default_key) {
            (Some(kid), _) => kid.as_str(),
            (None, Some(default)) => default.as_str(),
            (None, None) if self.keys.len() == 1 => {
                self.keys.keys().next().map(String::as_str).unwrap_or("")
            }
            (None, None) => return Err("token has no kid and there is no default_key".into()),
        };
        let key = self
            .keys
            .get(kid)
            .ok_or_else(|| format!("unknown signing key {kid}"))?;
        if key.family != family {
            return Err(format!("algorithm {:?} does not fit key {kid}", header.alg));
        }
        let mut validation = Validation::new(header.alg);
        // The claims are checked below, against the time passed in.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.required_spec_claims = HashSet::new();
        let data = jsonwebtoken::decode::<Value>(token, &key.decoding, &validation)
            .map_err(|e| format!("token refused: {e}"))?;
        let claims = data.claims;
        let exp = match claims.get("exp") {
            Some(Value::Number(n)) => n.as_f64().unwrap_or(0.0).max(0.0) as u64,
            Some(_) => return Err("invalid exp claim: value is not a number".into()),
            None => return Err("token has no exp claim".into()),
        };
        if check_exp && exp <= now_secs {
            return Err(format!(
                "token has expired at timestamp {exp} (validated at {now_secs})"
            ));
        }
        if let Some(nbf) = claims.get("nbf").and_then(Value::as_f64) {
            if nbf as u64 > now_secs {
                return Err(format!("token is not valid before {nbf}"));
            }
        }
        if self.config.verify_aud && !self.audience_ok(claims.get("aud")) {
            return Err(format!(
                "audience does not include {}",
                self.config.resource_server_id
            ));
        }
        Ok(self.token(&claims, exp))
    }

    fn audience_ok(&self, aud: Option<&Value>) -> bool {
        let id = self.config.resource_server_id.as_str();
        match aud {
            Some(Value::String(a)) => a == id,
            Some(Value::Array(all)) => all.iter().any(|a| a.as_str() == Some(id)),
            _ => false,
        }
    }

    /// The user name, tags and permission scopes of verified claims.
    fn token(&self, claims: &Value, exp: u64) -> Token {
        let rsid = self.config.resource_server_id.as_str();
        let mut scopes = claims
            .get("scope")
            .map_or_else(Vec::new, |v| scope_list(v, rsid));
        if let Some(keys) = &self.config.additional_scopes_key {
            for path in keys.split(' ').filter(|p| !p.is_empty()) {
                let mut at = Some(claims);
                for part in path.split('.').filter(|p| !p.is_empty()) {
                    at = at.and_then(|v| v.get(part));
                }
                if let Some(v) = at {
                    scopes.extend(scope_list(v, rsid));
                }
            }
        }
        let mut tags = Vec::new();
        let mut granted = Vec::new();
        for scope in scopes.iter().filter_map(|s| s.strip_prefix(&self.prefix)) {
            if let Some(tag) = scope.strip_prefix("tag:") {
                if !tag.is_empty() && !tags.iter().any(|t| t == tag) {
                    tags.push(tag.to_string());
                }
            } else if let Some(s) = Scope::parse(scope) {
                granted.push(s);
            }
        }
        let defaults = ["sub", "client_id"];
        let user = self
            .config
            .preferred_username_claims
            .iter()
            .map(String::as_str)
            .chain(defaults)
            .find_map(|c| claims.get(c).and_then(Value::as_str))
            .unwrap_or("unknown")
            .to_string();
        Token {
            user,
            exp,
            tags,
            scopes: granted,
        }
    }
}

/// Scopes from a claim: a space-separated string, a list, or a map keyed by
/// the resource server id (whose entries get the `<rsid>.` prefix).
fn scope_list(v: &Value, rsid: &str) -> Vec<String> {
    let words = |s: &str| -> Vec<String> {
        s.split(' ')
            .filter(|w| !w.is_empty())
            .map(String::from)
            .collect()
    };
    match v {
        Value::String(s) => words(s),
        Value::Array(a) => a
            .iter()
            .filter_map(Value::as_str)
            .map(String::from)
            .collect(),
        Value::Object(m) => {
            let own = match m.get(rsid) {
                Some(Value::String(s)) => words(s),
                Some(Value::Array(a)) => a
                    .iter()
                    .filter_map(Value::as_str)
                    .map(String::from)
                    .collect(),
                _ => Vec::new(),
            };
            own.into_iter().map(|s| format!("{rsid}.{s}")).collect()
        }
        _ => Vec::new(),
    }
}

/// A wildcard pattern: `*` matches any run of characters; the literal parts
/// are percent-decoded (`%2F` is `/`). An undecodable pattern matches nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern(Option<Vec<String>>);

impl Pattern {
    fn new(source: &str) -> Pattern {
        Pattern(source.split('*').map(percent_decode).collect())
    }

    fn matches(&self, subject: &str) -> bool {
        let Some(parts) = &self.0 else { return false };
        let Some((first, rest)) = parts.split_first() else {
            return false;
        };
        let Some(mut left) = subject.strip_prefix(first.as_str()) else {
            return false;
        };
        let Some((last, middle)) = rest.split_last() else {
            return left.is_empty();
        };
        for part in middle.iter().filter(|p| !p.is_empty()) {
            match left.find(part.as_str()) {
                Some(at) => left = &left[at + part.len()..],
                None => return false,
            }
        }
        left.ends_with(last.as_str())
    }
}

/// `%XX` decoded and `+` as a space (as RabbitMQ's scope parser does).
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// One permission scope, the prefix removed: `read:<vhost>/<name>[/<routing key>]`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Scope {
    access: Access,
    vhost: Pattern,
    name: Pattern,
    routing_key: Option<Pattern>,
}

impl Scope {
    fn parse(scope: &str) -> Option<Scope> {
        let (access, rest) = if let Some(r) = scope.strip_prefix("read:") {
            (Access::Read, r)
        } else if let Some(r) = scope.strip_prefix("write:") {
            (Access::Write, r)
        } else if let Some(r) = scope.strip_prefix("configure:") {
            (Access::Configure, r)
        } else {
            return None;
        };
        let parts: Vec<&str> = rest.split('/').collect();
        let (vhost, name, routing_key) = match parts[..] {
            [v, n] => (v, n, None),
            [v, n, k] => (v, n, Some(Pattern::new(k))),
            _ => return None,
        };
        Some(Scope {
            access,
            vhost: Pattern::new(vhost),
            name: Pattern::new(name),
            routing_key,
        })
    }
}

/// What a verified token says: who, until when, and what it may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    /// From `preferred_username_claims`, then `sub`, then `client_id`.
    pub user: String,
    /// `exp`, Unix seconds.
    pub exp: u64,
    /// Management tags from `<prefix>tag:<tag>` scopes.
    pub tags: Vec<String>,
    scopes: Vec<Scope>,
}

impl Token {
    /// Any scope reaches `vhost`.
    pub fn vhost_access(&self, vhost: &str) -> bool {
        self.scopes.iter().any(|s| s.vhost.matches(vhost))
    }

    /// A scope grants `access` to the resource `name` in `vhost`.
    pub fn allows(&self, vhost: &str, access: Access, name: &str) -> bool {
        self.scopes
            .iter()
            .any(|s| s.access == access && s.vhost.matches(vhost) && s.name.matches(name))
    }

    /// Topic authorisation on a topic exchange: only scopes with a routing-key
    /// part grant it (as in RabbitMQ).
    pub fn topic_allows(&self, vhost: &str, exchange: &str, access: Access, key: &str) -> bool {
        self.scopes.iter().any(|s| {
            s.access == access
                && s.routing_key.as_ref().is_some_and(|k| k.matches(key))
                && s.vhost.matches(vhost)
                && s.name.matches(exchange)
        })
    }

    /// The token as a broker user (no password; the token's tags).
    pub fn as_user(&self) -> User {
        User {
            name: self.user.clone(),
            password_hash: String::new(),
            tags: self.tags.clone(),
            loopback_only: false,
        }
    }
}

/// One connection's token: the permission source that replaces the user's
/// permission records for it, swapped by `connection.update-secret`.
#[derive(Debug)]
pub struct Grant(RwLock<Arc<Token>>);

impl Grant {
    pub fn new(token: Token) -> Arc<Grant> {
        Arc::new(Grant(RwLock::new(Arc::new(token))))
    }

    /// The token in force.
    pub fn token(&self) -> Arc<Token> {
        Arc::clone(&self.0.read())
    }

    /// A refreshed token takes over.
    pub fn replace(&self, token: Token) {
        *self.0.write() = Arc::new(token);
    }

    pub fn allows(&self, vhost: &str, access: Access, name: &str) -> bool {
        self.0.read().allows(vhost, access, name)
    }

    pub fn topic_allows(&self, vhost: &str, exchange: &str, access: Access, key: &str) -> bool {
        self.0.read().topic_allows(vhost, exchange, access, key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_as_rabbitmq_scopes_do() {
        let p = Pattern::new;
        assert!(p("*").matches(""));
        assert!(p("*").matches("anything"));
        assert!(p("q").matches("q"));
        assert!(!p("q").matches("q1"));
        assert!(p("q*").matches("q1"));
        assert!(!p("q*").matches("x1"));
        assert!(p("*-log").matches("app-log"));
        assert!(!p("*-log").matches("app-logs"));
        assert!(p("a*b*c").matches("axxbyyc"));
        assert!(p("a*b").matches("abb"));
        assert!(!p("a*b*c").matches("axxc"));
        assert!(p("%2F").matches("/"));
        assert!(!p("%2").matches("%2"), "bad escapes match nothing");
    }

    #[test]
    fn scopes_parse_into_permissions() {
        let s = Scope::parse("read:%2F/q*").expect("scope");
        assert_eq!(s.access, Access::Read);
        assert!(s.vhost.matches("/") && s.name.matches("q1"));
        assert!(Scope::parse("write:v/x/rk.*").is_some_and(|s| s.routing_key.is_some()));
        assert!(Scope::parse("configure:v").is_none());
        assert!(Scope::parse("delete:v/x").is_none());
        let t = Token {
            user: "u".into(),
            exp: 0,
            tags: vec![],
            scopes: ["read:%2F/q*", "write:dev/*", "write:%2F/amq.topic/a.*"]
                .iter()
                .filter_map(|s| Scope::parse(s))
                .collect(),
        };
        assert!(t.vhost_access("/") && t.vhost_access("dev") && !t.vhost_access("prod"));
        assert!(t.allows("/", Access::Read, "q1"));
        assert!(!t.allows("/", Access::Write, "q1"));
        assert!(!t.allows("/", Access::Configure, "q1"));
        assert!(t.allows("dev", Access::Write, "anything"));
        assert!(t.topic_allows("/", "amq.topic", Access::Write, "a.b"));
        assert!(!t.topic_allows("/", "amq.topic", Access::Write, "b.a"));
        assert!(!t.topic_allows("dev", "amq.topic", Access::Write, "a.b"));
    }

    #[test]
    fn scope_claims_may_be_strings_lists_or_maps() {
        assert_eq!(
            scope_list(&Value::String("a  b".into()), "r"),
            vec!["a".to_string(), "b".to_string()]
        );
        assert_eq!(
            scope_list(&serde_json::json!(["x", 1, "y"]), "r"),
            vec!["x".to_string(), "y".to_string()]
        );
        assert_eq!(
            scope_list(&serde_json::json!({"r": "read:*/*", "other": ["z"]}), "r"),
            vec!["r.read:*/*".to_string()]
        );
    }
}
