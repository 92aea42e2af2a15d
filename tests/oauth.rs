//! OAuth 2.0 / JWT access tokens end to end, with keys made here (ES256 with
//! rcgen, RS256 with the rsa crate, one served from a JWKS file): a token as the
//! PLAIN password logs in and works within its scopes (403 outside them);
//! expired, badly signed and wrong-audience tokens are refused; an expiring
//! token closes its connection with 320 unless connection.update-secret brings
//! a fresh one (a bad one closes with 530); the admin API takes Bearer tokens
//! (200 / 401). The expiry tests wait real seconds: `exp` is wall time in
//! a black-box broker, so they use the shortest expiries that are still exact.

mod common;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::{code, expect_closed_with, t, watch_connection};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection};
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::Duration;

const RSID: &str = "rabbitmq";

struct Keys {
    /// ES256, configured as `signing_keys.ec-1` and `default_key`.
    ec: EncodingKey,
    /// Another ES256 key under no configured id: its signatures are wrong.
    rogue: EncodingKey,
    /// RS256, served from the JWKS file as `rsa-1`.
    rsa: EncodingKey,
    dir: PathBuf,
}

impl Drop for Keys {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn keys(name: &str) -> Keys {
    let dir = std::env::temp_dir().join(format!("warren-oauth-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let ec = rcgen::KeyPair::generate().expect("ec key");
    std::fs::write(dir.join("ec-1.pem"), ec.public_key_pem()).expect("write");
    let rogue = rcgen::KeyPair::generate().expect("ec key");
    let rsa_key = rsa::RsaPrivateKey::new(&mut rand::thread_rng(), 2048).expect("rsa key");
    let public = rsa_key.to_public_key();
    use rsa::traits::PublicKeyParts;
    let jwks = json!({"keys": [{
        "kty": "RSA",
        "kid": "rsa-1",
        "use": "sig",
        "alg": "RS256",
        "n": URL_SAFE_NO_PAD.encode(public.n().to_bytes_be()),
        "e": URL_SAFE_NO_PAD.encode(public.e().to_bytes_be()),
    }]});
    std::fs::write(dir.join("jwks.json"), jwks.to_string()).expect("write");
    use rsa::pkcs1::EncodeRsaPrivateKey;
    let rsa_pem = rsa_key
        .to_pkcs1_pem(rsa::pkcs1::LineEnding::LF)
        .expect("rsa pem");
    Keys {
        ec: EncodingKey::from_ec_pem(ec.serialize_pem().as_bytes()).expect("ec encoding key"),
        rogue: EncodingKey::from_ec_pem(rogue.serialize_pem().as_bytes()).expect("ec key"),
        rsa: EncodingKey::from_rsa_pem(rsa_pem.as_bytes()).expect("rsa encoding key"),
        dir,
    }
}

/// An embedded broker taking tokens for `rabbitmq`, keys from `keys`.
async fn broker(keys: &Keys) -> warren::Warren {
    if let Ok(filter) = std::env::var("WARREN_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .try_init();
    }
    let mut config = warren::Config::for_tests(keys.dir.join("data"));
    config.auth_oauth2 = Some(warren::config::OAuth2 {
        resource_server_id: RSID.into(),
        additional_scopes_key: Some("extra".into()),
        preferred_username_claims: vec!["user_name".into()],
        default_key: Some("ec-1".into()),
        signing_keys: [("ec-1".to_string(), keys.dir.join("ec-1.pem"))].into(),
        jwks_file: Some(keys.dir.join("jwks.json")),
        ..Default::default()
    });
    warren::start(config).await.expect("broker starts")
}

fn now_secs() -> u64 {
    warren::clock::now_ms() / 1000
}

/// Claims for `user` with `scopes`, expiring `ttl` seconds from now.
fn claims(user: &str, scopes: &[&str], ttl: i64) -> Value {
    json!({
        "sub": "subject-id",
        "user_name": user,
        "aud": [RSID, "other"],
        "exp": now_secs() as i64 + ttl,
        "iat": now_secs(),
        "scope": scopes.join(" "),
    })
}

fn sign(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(String::from);
    jsonwebtoken::encode(&header, claims, key).expect("sign")
}

fn es256(keys: &Keys, claims: &Value) -> String {
    sign(Algorithm::ES256, Some("ec-1"), &keys.ec, claims)
}

async fn connect(b: &warren::Warren, token: &str) -> lapin::Result<Connection> {
    let uri = format!(
        "amqp://ignored:{token}@127.0.0.1:{}/%2f",
        b.amqp_addr().port()
    );
    t(common::connect_with(&uri)).await
}

const APP: &[&str] = &[
    "rabbitmq.configure:%2F/app-*",
    "rabbitmq.write:%2F/app-*",
    "rabbitmq.write:%2F/amq.default",
    "rabbitmq.read:%2F/app-*",
    "openid",
    "other.write:*/*",
];

async fn declare(ch: &lapin::Channel, name: &str) -> lapin::Result<lapin::Queue> {
    t(ch.queue_declare(name, QueueDeclareOptions::default(), FieldTable::default())).await
}

/// Publish to the default exchange and get it back with basic.get.
async fn round_trip(conn: &Connection, queue: &str, body: &[u8]) {
    let ch = t(conn.create_channel()).await.expect("channel");
    declare(&ch, queue).await.expect("declare in scope");
    t(ch.basic_publish(
        "",
        queue,
        BasicPublishOptions::default(),
        body,
        BasicProperties::default(),
    ))
    .await
    .expect("publish");
    let got = loop {
        let g = t(ch.basic_get(queue, BasicGetOptions { no_ack: true }))
            .await
            .expect("get");
        if let Some(m) = g {
            break m;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(got.delivery.data, body);
}

#[tokio::test]
async fn a_token_logs_in_and_works_within_its_scopes_only() {
    let keys = keys("scopes");
    let b = broker(&keys).await;
    let token = es256(&keys, &claims("svc-app", APP, 60));
    let conn = connect(&b, &token).await.expect("token login");
    round_trip(&conn, "app-orders", b"hello").await;

    // A consumer within scope.
    let ch = t(conn.create_channel()).await.expect("channel");
    let mut consumer = t(ch.basic_consume(
        "app-orders",
        "c1",
        BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .expect("consume in scope");
    t(ch.basic_publish(
        "",
        "app-orders",
        BasicPublishOptions::default(),
        b"two",
        BasicProperties::default(),
    ))
    .await
    .expect("publish");
    let d = common::next_delivery(&mut consumer).await;
    assert_eq!(d.data, b"two");

    // Outside its scopes: 403 ACCESS_REFUSED, the connection lives on.
    let ch = t(conn.create_channel()).await.expect("channel");
    common::assert_code(declare(&ch, "billing").await, 403);
    let ch = t(conn.create_channel()).await.expect("channel");
    let r = t(ch.exchange_declare(
        "app-x",
        lapin::ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    ))
    .await;
    assert!(r.is_ok(), "configure:%2F/app-* covers exchanges too: {r:?}");
    let ch = t(conn.create_channel()).await.expect("channel");
    // Write to app-x is in scope, read from amq.direct (to bind) is not.
    let r = t(ch.queue_bind(
        "app-orders",
        "amq.direct",
        "k",
        QueueBindOptions::default(),
        FieldTable::default(),
    ))
    .await;
    common::assert_code(r, 403);
    assert!(conn.status().connected());

    // The connection is the token's user (preferred_username_claims).
    let (status, list) = admin_get(&b, "/api/connections", &admin_token(&keys)).await;
    assert_eq!(status, 200);
    let users: Vec<&str> = list
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|c| c["user"].as_str())
        .collect();
    assert!(users.contains(&"svc-app"), "{users:?}");

    // A vhost no scope reaches: refused at connection.open.
    let (status, _) = admin_put(&b, "/api/vhosts/elsewhere", &admin_token(&keys)).await;
    assert_eq!(status, 201);
    let uri = format!(
        "amqp://:{token}@127.0.0.1:{}/elsewhere",
        b.amqp_addr().port()
    );
    let e = t(common::connect_with(&uri))
        .await
        .expect_err("no scope there");
    assert_eq!(code(&e), Some(530), "{e:?}");
}

#[tokio::test]
async fn rs256_from_jwks_additional_scopes_and_tokens_without_kid() {
    let keys = keys("jwks");
    let b = broker(&keys).await;
    // RS256 by kid from the JWKS file; scopes from the additional key, as a
    // map keyed by the resource server id.
    let mut c = claims("rsa-user", &[], 60);
    c["extra"] = json!({ RSID: ["configure:*/app-*", "write:*/*", "read:*/*"] });
    let token = sign(Algorithm::RS256, Some("rsa-1"), &keys.rsa, &c);
    let conn = connect(&b, &token).await.expect("RS256 token login");
    round_trip(&conn, "app-rsa", b"rsa").await;
    // No kid: the default key.
    let token = sign(Algorithm::ES256, None, &keys.ec, &claims("nokid", APP, 60));
    let conn = connect(&b, &token).await.expect("default_key login");
    round_trip(&conn, "app-nokid", b"ec").await;
    // No username claim but sub: the user is the subject.
    let mut c = claims("x", APP, 60);
    c.as_object_mut().expect("object").remove("user_name");
    let conn = connect(&b, &es256(&keys, &c)).await.expect("login");
    round_trip(&conn, "app-sub", b"sub").await;
}

#[tokio::test]
async fn expired_badly_signed_and_foreign_tokens_are_refused() {
    let keys = keys("refused");
    let b = broker(&keys).await;
    let refused = |r: lapin::Result<Connection>, what: &str| match r {
        Ok(_) => panic!("{what}: logged in"),
        Err(e) => assert_eq!(code(&e), Some(403), "{what}: {e:?}"),
    };
    refused(
        connect(&b, &es256(&keys, &claims("u", APP, -5))).await,
        "expired",
    );
    refused(
        connect(
            &b,
            &sign(
                Algorithm::ES256,
                Some("ec-1"),
                &keys.rogue,
                &claims("u", APP, 60),
            ),
        )
        .await,
        "wrong signature",
    );
    let mut c = claims("u", APP, 60);
    c["aud"] = json!("another-server");
    refused(connect(&b, &es256(&keys, &c)).await, "wrong audience");
    let mut c = claims("u", APP, 60);
    c.as_object_mut().expect("object").remove("exp");
    refused(connect(&b, &es256(&keys, &c)).await, "no exp");
    let mut c = claims("u", APP, 60);
    c["nbf"] = json!(now_secs() + 600);
    refused(connect(&b, &es256(&keys, &c)).await, "not yet valid");
    refused(
        connect(
            &b,
            &sign(
                Algorithm::HS256,
                Some("ec-1"),
                &EncodingKey::from_secret(b"s"),
                &claims("u", APP, 60),
            ),
        )
        .await,
        "HS256",
    );
    refused(
        connect(
            &b,
            &sign(
                Algorithm::ES256,
                Some("nope"),
                &keys.ec,
                &claims("u", APP, 60),
            ),
        )
        .await,
        "unknown kid",
    );
    // Passwords still work beside tokens.
    let uri = format!("amqp://guest:guest@127.0.0.1:{}/%2f", b.amqp_addr().port());
    t(common::connect_with(&uri)).await.expect("guest");
}

#[tokio::test]
async fn expiry_closes_with_320_unless_update_secret_brings_a_fresh_token() {
    let keys = keys("expiry");
    let b = broker(&keys).await;
    // Both tokens expire 3 s from now (2-3 s of real time, exp being in seconds).
    let short = es256(&keys, &claims("svc-app", APP, 3));
    let kept = connect(&b, &short).await.expect("login");
    let dropped = connect(&b, &short).await.expect("login");
    let bad = connect(&b, &short).await.expect("login");
    let other = connect(&b, &short).await.expect("login");
    let dropped_rx = watch_connection(&dropped);
    let bad_rx = watch_connection(&bad);
    let other_rx = watch_connection(&other);

    let fresh = es256(&keys, &claims("svc-app", APP, 120));
    t(kept.update_secret(&fresh, "refresh"))
        .await
        .expect("update-secret-ok");
    // A token that does not verify: 530 at once.
    let _ = bad
        .update_secret(
            &sign(
                Algorithm::ES256,
                Some("ec-1"),
                &keys.rogue,
                &claims("svc-app", APP, 120),
            ),
            "bad",
        )
        .await;
    expect_closed_with(bad_rx, 530).await;
    // Another user's token: 530.
    let _ = other
        .update_secret(&es256(&keys, &claims("someone-else", APP, 120)), "swap")
        .await;
    expect_closed_with(other_rx, 530).await;

    // The un-refreshed connection is closed when its token runs out.
    let started = std::time::Instant::now();
    expect_closed_with(dropped_rx, 320).await;
    assert!(started.elapsed() < Duration::from_secs(4));
    // The refreshed one outlives the first token.
    round_trip(&kept, "app-kept", b"still here").await;
    assert!(kept.status().connected());
}

// ------------------------------------------------------------ admin API

fn admin_token(keys: &Keys) -> String {
    es256(
        keys,
        &claims(
            "ops",
            &[
                "rabbitmq.tag:administrator",
                "rabbitmq.configure:*/*",
                "rabbitmq.write:*/*",
                "rabbitmq.read:*/*",
            ],
            60,
        ),
    )
}

async fn admin_call(
    b: &warren::Warren,
    method: &str,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (u16, Value) {
    let url = format!(
        "http://127.0.0.1:{}{path}",
        b.admin_addr().expect("admin API").port()
    );
    let (method, auth) = (method.to_string(), format!("Bearer {token}"));
    tokio::task::spawn_blocking(move || {
        let req = ureq::request(&method, &url).set("Authorization", &auth);
        let res = match body {
            Some(body) => req.send_json(body),
            None => req.call(),
        };
        let resp = match res {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {url}: {e}"),
        };
        let status = resp.status();
        let text = resp.into_string().unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    })
    .await
    .expect("http task")
}

async fn admin_get(b: &warren::Warren, path: &str, token: &str) -> (u16, Value) {
    admin_call(b, "GET", path, token, None).await
}

async fn admin_put(b: &warren::Warren, path: &str, token: &str) -> (u16, Value) {
    admin_call(b, "PUT", path, token, Some(json!({}))).await
}

#[tokio::test]
async fn the_admin_api_takes_bearer_tokens() {
    let keys = keys("admin");
    let b = broker(&keys).await;
    let (status, me) = admin_get(&b, "/api/whoami", &admin_token(&keys)).await;
    assert_eq!(status, 200, "{me}");
    assert_eq!(me["name"], "ops");
    assert_eq!(
        admin_get(&b, "/api/overview", &admin_token(&keys)).await.0,
        200
    );

    // Invalid or expired: 401.
    let expired = es256(&keys, &claims("ops", &["rabbitmq.tag:administrator"], -5));
    assert_eq!(admin_get(&b, "/api/overview", &expired).await.0, 401);
    assert_eq!(admin_get(&b, "/api/overview", "not.a.token").await.0, 401);
    let rogue = sign(
        Algorithm::ES256,
        Some("ec-1"),
        &keys.rogue,
        &claims("ops", &["rabbitmq.tag:administrator"], 60),
    );
    assert_eq!(admin_get(&b, "/api/overview", &rogue).await.0, 401);

    // No management tag: 401 without a challenge (RabbitMQ's refusal).
    let plain = es256(&keys, &claims("app", APP, 60));
    assert_eq!(admin_get(&b, "/api/overview", &plain).await.0, 401);

    // A management token reaches what its scopes reach, and no further.
    let mut scopes = APP.to_vec();
    scopes.push("rabbitmq.tag:management");
    let mgmt = es256(&keys, &claims("app", &scopes, 60));
    assert_eq!(admin_put(&b, "/api/queues/%2F/app-api", &mgmt).await.0, 201);
    assert_eq!(admin_put(&b, "/api/queues/%2F/billing", &mgmt).await.0, 401);
    assert_eq!(admin_put(&b, "/api/vhosts/new-vhost", &mgmt).await.0, 401);
    assert_eq!(admin_get(&b, "/api/queues/%2F/app-api", &mgmt).await.0, 200);
    let fanout = Some(json!({"type": "fanout"}));
    let (status, _) = admin_call(&b, "PUT", "/api/exchanges/%2F/app-x", &mgmt, fanout).await;
    assert_eq!(status, 201);
    let bind = || Some(json!({"routing_key": "k"}));
    let (status, _) = admin_call(
        &b,
        "POST",
        "/api/bindings/%2F/e/app-x/q/app-api",
        &mgmt,
        bind(),
    )
    .await;
    assert_eq!(status, 201, "write app-api and read app-x are in scope");
    let (status, _) = admin_call(
        &b,
        "POST",
        "/api/bindings/%2F/e/amq.fanout/q/app-api",
        &mgmt,
        bind(),
    )
    .await;
    assert_eq!(status, 401, "read on amq.fanout is not");
    let (status, _) = admin_put(&b, "/api/vhosts/hidden", &admin_token(&keys)).await;
    assert_eq!(status, 201);
    assert_eq!(admin_get(&b, "/api/queues/hidden", &mgmt).await.0, 401);
}
