//! TLS end to end, with certificates made here (rcgen): AMQPS with a stock
//! client (lapin over rustls), client certificates under verify_peer (trusted,
//! untrusted, expired, none), SASL EXTERNAL as the certificate's CN, the admin
//! API over HTTPS reporting the connection's TLS session, clean refusals
//! (plaintext on the TLS port, a stalled handshake) that disturb no one, and a
//! certificate reload on SIGHUP in the real binary that old connections survive.

mod common;

use common::tls::{Ca, Leaf, Pki};
use common::{t, TIMEOUT};
use lapin::options::*;
use lapin::tcp::OwnedTLSConfig;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use warren::config::{ListenerSetting, Verify};

// ------------------------------------------------------------ broker and clients

/// An embedded broker with AMQPS and HTTPS (and plain AMQP and HTTP) on
/// ephemeral loopback ports, and the default 5 s handshake timeout.
async fn broker(pki: &Pki, verify: Verify, fail_if_no_peer_cert: bool) -> warren::Warren {
    broker_with(pki, verify, fail_if_no_peer_cert, 5000).await
}

async fn broker_with(
    pki: &Pki,
    verify: Verify,
    fail_if_no_peer_cert: bool,
    handshake_timeout_ms: u64,
) -> warren::Warren {
    if let Ok(filter) = std::env::var("WARREN_TEST_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .try_init();
    }
    let mut config = warren::Config::for_tests(pki.path("data"));
    config.listeners.ssl = Some(ListenerSetting::On { default: 0 });
    config.ssl_options = pki.options(verify, fail_if_no_peer_cert);
    config.ssl_handshake_timeout = handshake_timeout_ms;
    config.management.ssl.port = Some(0);
    config.management.ssl.verify = Some(Verify::VerifyNone);
    warren::start(config).await.expect("broker starts")
}

fn port(b: &warren::Warren) -> u16 {
    b.amqps_addr().expect("AMQPS listener").port()
}

/// lapin over amqps, trusting `ca_pem`, with an optional client certificate;
/// `login` is `user:pass@` or empty with `?auth_mechanism=external` in `query`.
async fn amqps(
    port: u16,
    login: &str,
    query: &str,
    ca_pem: &str,
    client: Option<&Leaf>,
) -> lapin::Result<Connection> {
    // lapin's rustls client takes the process default provider; with the
    // stream client's dev-dependency both ring and aws-lc-rs are compiled in
    // (no automatic default), so name warren's (ring).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let uri = format!("amqps://{login}localhost:{port}/%2f{query}");
    let tls = OwnedTLSConfig {
        identity: client.map(Leaf::identity),
        cert_chain: Some(ca_pem.to_string()),
    };
    tokio::time::timeout(
        TIMEOUT,
        Connection::connect_with_config(&uri, common::props(), tls),
    )
    .await
    .expect("amqps connect timed out")
}

async fn guest(b: &warren::Warren, pki: &Pki) -> Connection {
    amqps(port(b), "guest:guest@", "", &pki.ca.pem(), None)
        .await
        .expect("guest over amqps")
}

/// Publish one message to a fresh queue and get it back on the same connection.
async fn round_trip(conn: &Connection, body: &[u8]) {
    let ch = t(conn.create_channel()).await.expect("channel");
    let q = t(ch.queue_declare(
        "",
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .expect("declare");
    let mut consumer = t(ch.basic_consume(
        q.name().as_str(),
        "",
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("consume");
    t(ch.basic_publish(
        "",
        q.name().as_str(),
        BasicPublishOptions::default(),
        body,
        BasicProperties::default(),
    ))
    .await
    .expect("publish");
    let d = common::next_delivery(&mut consumer).await;
    assert_eq!(d.data, body);
    t(d.ack(BasicAckOptions::default())).await.expect("ack");
    let _ = t(ch.close(200, "bye")).await;
}

/// A rustls client trusting only `ca_pem`, optionally with a client certificate.
fn client_config(ca_pem: &str, client: Option<&Leaf>) -> Arc<rustls::ClientConfig> {
    use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.expect("ca pem")).expect("root");
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some(leaf) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from(leaf.cert_der.clone())],
                PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).expect("key"),
            )
            .expect("client cert"),
    };
    Arc::new(config)
}

async fn tls_connect(
    port: u16,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    tokio::time::timeout(
        TIMEOUT,
        tokio_rustls::TlsConnector::from(config).connect(name, tcp),
    )
    .await
    .map_err(|_| std::io::Error::other("TLS connect timed out"))?
}

/// GET `path` over HTTPS as guest: (status, JSON body).
async fn https_get(port: u16, ca_pem: &str, path: &str) -> (u16, serde_json::Value) {
    let mut s = tls_connect(port, client_config(ca_pem, None))
        .await
        .expect("HTTPS handshake");
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Basic Z3Vlc3Q6Z3Vlc3Q=\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("write");
    let mut raw = Vec::new();
    let _ = t(s.read_to_end(&mut raw)).await;
    let text = String::from_utf8_lossy(&raw).to_string();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    // Chunked or not, the JSON is the one line that parses.
    let json = body
        .lines()
        .find_map(|l| serde_json::from_str(l).ok())
        .or_else(|| serde_json::from_str(body).ok())
        .unwrap_or(serde_json::Value::Null);
    (status, json)
}

/// The server closes `s` (EOF or reset) within `within`.
async fn closed_by_server(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 256];
    tokio::time::timeout(within, async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

fn find_connection<'a>(list: &'a serde_json::Value, user: &str) -> &'a serde_json::Value {
    list.as_array()
        .and_then(|a| a.iter().find(|c| c["user"] == user))
        .unwrap_or_else(|| panic!("no connection of {user} in {list}"))
}

/// `/api/connections` (over HTTPS) until a connection of `user` shows up.
async fn connections_with(port: u16, ca_pem: &str, user: &str) -> serde_json::Value {
    for _ in 0..50 {
        let (status, list) = https_get(port, ca_pem, "/api/connections").await;
        assert_eq!(status, 200, "{list}");
        if list
            .as_array()
            .is_some_and(|a| a.iter().any(|c| c["user"] == user))
        {
            return list;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{user} never listed in /api/connections");
}

// ------------------------------------------------------------ tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lapin_publishes_and_consumes_over_amqps_and_the_api_reports_tls() {
    let pki = Pki::new("lapin");
    let b = broker(&pki, Verify::VerifyNone, false).await;
    let conn = guest(&b, &pki).await;
    round_trip(&conn, b"over tls").await;

    // The admin API over HTTPS sees the connection's TLS session; the plain
    // listener is still there and answers too.
    let https = b.admin_tls_addr().expect("HTTPS admin").port();
    let list = connections_with(https, &pki.ca.pem(), "guest").await;
    let c = find_connection(&list, "guest");
    assert_eq!(c["ssl"], true, "{c}");
    assert_eq!(c["ssl_protocol"], "tlsv1.3", "{c}");
    assert!(
        c["ssl_cipher"]
            .as_str()
            .is_some_and(|s| s.starts_with("TLS13_")),
        "{c}"
    );
    assert_eq!(c["peer_cert_subject"], serde_json::Value::Null, "{c}");
    let http = b.admin_addr().expect("HTTP admin");
    let (status, overview) = common::http(
        "GET",
        &format!("http://{http}/api/overview"),
        Some(("guest", "guest")),
        None,
    )
    .await;
    assert_eq!(status, 200, "{overview}");

    // A plain connection reports ssl false, as RabbitMQ does.
    let plain = common::connect_with(&format!(
        "amqp://guest:guest@{}/%2f",
        b.server.amqp_addrs()[0]
    ))
    .await
    .expect("plain AMQP still listens");
    let (_, list) = https_get(https, &pki.ca.pem(), "/api/connections").await;
    let plain_rows: Vec<_> = list
        .as_array()
        .expect("list")
        .iter()
        .filter(|c| c["ssl"] == false)
        .collect();
    assert_eq!(plain_rows.len(), 1, "{list}");
    assert_eq!(plain_rows[0]["ssl_protocol"], serde_json::Value::Null);
    let _ = t(plain.close(200, "bye")).await;
    let _ = t(conn.close(200, "bye")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_peer_accepts_trusted_and_refuses_untrusted_expired_and_missing_certificates() {
    let pki = Pki::new("verify");
    let b = broker(&pki, Verify::VerifyPeer, true).await;
    let ca = pki.ca.pem();

    let trusted = pki.ca.issue("guest", false, false);
    let conn = amqps(port(&b), "guest:guest@", "", &ca, Some(&trusted))
        .await
        .expect("a trusted client certificate is accepted");
    round_trip(&conn, b"trusted").await;

    let stranger = Ca::new("someone else's CA").issue("guest", false, false);
    let expired = pki.ca.issue("guest", false, true);
    for (what, client) in [
        ("untrusted", Some(&stranger)),
        ("expired", Some(&expired)),
        ("missing", None),
    ] {
        let r = amqps(port(&b), "guest:guest@", "", &ca, client).await;
        assert!(r.is_err(), "a {what} client certificate must be refused");
    }
    // The raw rustls client sees the refusal as a failed handshake or a
    // connection closed right after it.
    let r = async {
        let mut s = tls_connect(port(&b), client_config(&ca, Some(&stranger))).await?;
        s.write_all(b"AMQP\x00\x00\x09\x01").await?;
        let mut buf = [0u8; 16];
        match s.read(&mut buf).await? {
            0 => Err(std::io::Error::other("closed")),
            n => Ok(n),
        }
    }
    .await;
    assert!(
        r.is_err(),
        "untrusted certificate got an AMQP answer: {r:?}"
    );

    // The accepted connection was not disturbed by any of it.
    round_trip(&conn, b"still here").await;
    let _ = t(conn.close(200, "bye")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_logs_in_as_the_certificate_cn_and_passwordless_users_cannot_use_plain() {
    let pki = Pki::new("external");
    let b = broker(&pki, Verify::VerifyPeer, false).await;
    let broker = &b.server.broker;
    // alice has no password: only her certificate lets her in.
    broker.auth.put_user(warren::broker::User {
        name: "alice".into(),
        password_hash: String::new(),
        tags: vec![],
        loopback_only: false,
    });
    broker.auth.set_permission(
        "/",
        "alice",
        warren::broker::auth::Permission::new(".*", ".*", ".*").expect("permission"),
    );
    let ca = pki.ca.pem();
    let alice = pki.ca.issue("alice", false, false);
    let conn = amqps(port(&b), "", "?auth_mechanism=external", &ca, Some(&alice))
        .await
        .expect("EXTERNAL with alice's certificate");
    round_trip(&conn, b"as alice").await;
    let https = b.admin_tls_addr().expect("HTTPS admin").port();
    let list = connections_with(https, &ca, "alice").await;
    let c = find_connection(&list, "alice");
    assert_eq!(c["ssl"], true);
    assert_eq!(c["peer_cert_subject"], "CN=alice,O=warren tests", "{c}");
    assert_eq!(c["peer_cert_issuer"], "CN=warren test CA", "{c}");

    // No password to match: PLAIN (over TLS, with her certificate) is refused.
    let r = amqps(port(&b), "alice:@", "", &ca, Some(&alice)).await;
    assert!(r.is_err(), "a user without a password logged in with PLAIN");
    let r = amqps(port(&b), "alice:anything@", "", &ca, Some(&alice)).await;
    assert!(r.is_err(), "a user without a password logged in with PLAIN");
    // A certificate whose CN is no user is refused.
    let mallory = pki.ca.issue("mallory", false, false);
    let r = amqps(
        port(&b),
        "",
        "?auth_mechanism=external",
        &ca,
        Some(&mallory),
    )
    .await;
    assert!(r.is_err(), "EXTERNAL for an unknown user");
    // Without a client certificate EXTERNAL is not offered.
    let r = amqps(port(&b), "", "?auth_mechanism=external", &ca, None).await;
    assert!(r.is_err(), "EXTERNAL without a certificate");
    let plain = format!(
        "amqp://{}/%2f?auth_mechanism=external",
        b.server.amqp_addrs()[0]
    );
    assert!(
        common::connect_with(&plain).await.is_err(),
        "EXTERNAL on plain TCP"
    );

    round_trip(&conn, b"undisturbed").await;
    let _ = t(conn.close(200, "bye")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_and_stalled_handshakes_are_refused_without_harming_others() {
    let pki = Pki::new("refusals");
    // Short enough for a test, long enough for lapin (which loads the system's
    // CA store during its handshake) on a busy machine.
    let b = broker_with(&pki, Verify::VerifyNone, false, 1500).await;
    let conn = guest(&b, &pki).await;

    // An AMQP client speaking plaintext to the TLS port: closed at once.
    let mut plain = TcpStream::connect(("127.0.0.1", port(&b)))
        .await
        .expect("tcp");
    plain
        .write_all(b"AMQP\x00\x00\x09\x01")
        .await
        .expect("write header");
    assert!(
        closed_by_server(&mut plain, Duration::from_secs(2)).await,
        "plaintext client not refused"
    );

    // A client that starts a TLS record and stalls, and one that sends
    // nothing: both closed after ssl_handshake_timeout (1.5 s here).
    let started = Instant::now();
    let mut stalled = TcpStream::connect(("127.0.0.1", port(&b)))
        .await
        .expect("tcp");
    stalled.write_all(&[0x16, 0x03, 0x01]).await.expect("write");
    let mut silent = TcpStream::connect(("127.0.0.1", port(&b)))
        .await
        .expect("tcp");
    // Meanwhile others connect and work.
    round_trip(&conn, b"during a stalled handshake").await;
    let other = guest(&b, &pki).await;
    round_trip(&other, b"new connection").await;
    assert!(closed_by_server(&mut stalled, Duration::from_secs(5)).await);
    assert!(closed_by_server(&mut silent, Duration::from_secs(5)).await);
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "closed before the handshake timeout"
    );

    round_trip(&conn, b"after the refusals").await;
    let _ = t(other.close(200, "bye")).await;
    let _ = t(conn.close(200, "bye")).await;
}

/// RabbitMQ's health checks over the admin API: listeners by port and by
/// protocol (also listed by `/api/overview`), TLS certificates expiring
/// within a period (the certificate file as it is now), and a node alone
/// is never quorum-critical.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_checks_report_listeners_and_expiring_certificates() {
    let pki = Pki::new("health");
    let b = broker(&pki, Verify::VerifyNone, false).await;
    let https = b.admin_tls_addr().expect("HTTPS listener").port();
    let ca = pki.ca.pem();
    let get = |path: String| {
        let ca = ca.clone();
        async move { https_get(https, &ca, &path).await }
    };
    let (_, overview) = get("/api/overview".into()).await;
    let listed: Vec<(String, u64)> = overview["listeners"]
        .as_array()
        .expect("listeners")
        .iter()
        .map(|l| {
            (
                l["protocol"].as_str().unwrap_or_default().to_string(),
                l["port"].as_u64().unwrap_or_default(),
            )
        })
        .collect();
    assert!(
        listed.contains(&("amqp/ssl".into(), u64::from(port(&b)))),
        "{listed:?}"
    );
    assert!(
        listed.contains(&("https".into(), u64::from(https))),
        "{listed:?}"
    );
    assert!(
        listed.contains(&("amqp".into(), u64::from(b.amqp_addr().port()))),
        "{listed:?}"
    );

    let (status, body) = get(format!("/api/health/checks/port-listener/{}", port(&b))).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("ok")),
        "{body}"
    );
    let (status, body) = get("/api/health/checks/port-listener/1".into()).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["status"], "failed");
    assert_eq!(body["missing"], 1);
    assert_eq!(
        get("/api/health/checks/port-listener/x".into()).await.0,
        400
    );

    for p in ["amqp", "amqps", "https", "management"] {
        let (status, body) = get(format!("/api/health/checks/protocol-listener/{p}")).await;
        assert_eq!(status, 200, "{p}: {body}");
    }
    let (status, body) = get("/api/health/checks/protocol-listener/mqtt".into()).await;
    assert_eq!(
        (status, body["missing"].as_str()),
        (503, Some("mqtt")),
        "{body}"
    );
    // An unknown name has no listener either: 503, as RabbitMQ answers.
    let (status, body) = get("/api/health/checks/protocol-listener/gopher".into()).await;
    assert_eq!((status, body["missing"].as_str()), (503, Some("gopher")));

    // The test CA's server certificate is good until 4096.
    let (status, body) = get("/api/health/checks/certificate-expiration/1/years".into()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        get("/api/health/checks/certificate-expiration/1/fortnights".into())
            .await
            .0,
        400
    );
    // One that ends on January 1st, three years from about now: more than
    // a year away, less than five.
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let year = 1970 + (secs / 31_556_952) as i32;
    pki.write_server_until(year + 3);
    let (status, body) = get("/api/health/checks/certificate-expiration/5/years".into()).await;
    assert_eq!(status, 503, "{body}");
    let expired = body["expired"].as_array().expect("expired");
    assert!(
        expired.iter().any(|e| e["protocol"] == "amqp/ssl"),
        "{body}"
    );
    let (status, body) = get("/api/health/checks/certificate-expiration/1/years".into()).await;
    assert_eq!(status, 200, "{body}");

    let (status, body) = get("/api/health/checks/node-is-quorum-critical".into()).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (200, Some("ok")),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_listener_can_be_turned_off() {
    let pki = Pki::new("tls-only");
    let mut config = warren::Config::for_tests(pki.path("data"));
    config.listeners.tcp = Some(ListenerSetting::Off(warren::config::NoListener::None));
    config.listeners.ssl = Some(ListenerSetting::On { default: 0 });
    config.ssl_options = pki.options(Verify::VerifyNone, false);
    config.admin_enabled = false;
    let b = warren::start(config).await.expect("broker starts");
    assert!(b.server.amqp_addrs().is_empty());
    assert_eq!(b.amqp_addr(), b.amqps_addr().expect("amqps"));
    let conn = guest(&b, &pki).await;
    round_trip(&conn, b"tls only").await;
    let _ = t(conn.close(200, "bye")).await;
}

// ------------------------------------------------------------ SIGHUP, real binary

fn free_port() -> u16 {
    common::free_port("127.0.0.1")
}

struct Child(std::process::Child);

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn write_config(pki: &Pki, amqps: u16, https: u16) -> PathBuf {
    let path = pki.path("warren.toml");
    let p = |f: &str| pki.path(f).display().to_string();
    let text = format!(
        r#"bind = "127.0.0.1"
data_dir = "{data}"
log = "warn"
listeners.tcp = "none"
listeners.ssl.default = {amqps}
management.tcp = "none"
management.ssl.port = {https}

[ssl_options]
cacertfile = "{ca}"
certfile = "{cert}"
keyfile = "{key}"
verify = "verify_peer"
fail_if_no_peer_cert = false
"#,
        data = p("data"),
        ca = p("ca.pem"),
        cert = p("server.pem"),
        key = p("server.key"),
    );
    std::fs::write(&path, text).expect("config");
    path
}

async fn wait_listening(port: u16) {
    for _ in 0..200 {
        if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("nothing listens on {port}");
}

/// The leaf certificate the server presents to a client trusting `ca_pem`.
async fn served_cert(port: u16, ca_pem: &str) -> std::io::Result<Vec<u8>> {
    let s = tls_connect(port, client_config(ca_pem, None)).await?;
    let (_, conn) = s.get_ref();
    conn.peer_certificates()
        .and_then(|c| c.first())
        .map(|c| c.to_vec())
        .ok_or_else(|| std::io::Error::other("no server certificate"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_serves_the_new_certificate_to_new_connections_and_keeps_old_ones() {
    let pki = Pki::new("sighup");
    let first = pki.write_server(&pki.ca);
    let (amqps_port, https_port) = (free_port(), free_port());
    let config = write_config(&pki, amqps_port, https_port);
    let child = Child(
        std::process::Command::new(env!("CARGO_BIN_EXE_warren"))
            .arg("--config")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("spawn warren"),
    );
    wait_listening(amqps_port).await;
    wait_listening(https_port).await;
    let old_ca = pki.ca.pem();
    assert_eq!(
        served_cert(amqps_port, &old_ca).await.expect("tls"),
        first.cert_der
    );
    let old = amqps(amqps_port, "guest:guest@", "", &old_ca, None)
        .await
        .expect("old connection");
    round_trip(&old, b"before reload").await;

    // A new CA and a server certificate from it; the client CA file gains it too.
    let new_ca = Ca::new("warren test CA 2");
    let second = pki.write_server(&new_ca);
    std::fs::write(pki.path("ca.pem"), format!("{old_ca}{}", new_ca.pem())).expect("ca.pem");
    // Before the signal the old certificate is still served.
    assert_eq!(
        served_cert(amqps_port, &old_ca).await.expect("tls"),
        first.cert_der
    );
    let status = std::process::Command::new("kill")
        .args(["-HUP", &child.0.id().to_string()])
        .status()
        .expect("kill -HUP");
    assert!(status.success());

    let mut served = Vec::new();
    for _ in 0..100 {
        if let Ok(der) = served_cert(amqps_port, &new_ca.pem()).await {
            served = der;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(served, second.cert_der, "AMQPS serves the new certificate");
    assert_eq!(
        served_cert(https_port, &new_ca.pem()).await.expect("HTTPS"),
        second.cert_der,
        "HTTPS serves the new certificate"
    );
    // The old connection kept going; a new one trusting the new CA works, and
    // a client certificate from the new CA is now trusted.
    round_trip(&old, b"after reload").await;
    let client = new_ca.issue("guest", false, false);
    let new = amqps(amqps_port, "guest:guest@", "", &new_ca.pem(), Some(&client))
        .await
        .expect("new connection with the new certificates");
    round_trip(&new, b"new").await;
    let (status, _) = https_get(https_port, &new_ca.pem(), "/api/overview").await;
    assert_eq!(status, 200);

    // The CLI reaches the HTTPS-only admin API, trusting the CA it is given.
    std::fs::write(pki.path("new-ca.pem"), new_ca.pem()).expect("new-ca.pem");
    let cli = |cacert: PathBuf| {
        let url = format!("https://localhost:{https_port}");
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_warren"));
        cmd.args(["--url", &url, "--cacert"])
            .arg(cacert)
            .arg("list-connections");
        cmd
    };
    let mut trusting = cli(pki.path("new-ca.pem"));
    let mut distrusting = cli(pki.path("other.pem"));
    std::fs::write(pki.path("other.pem"), Ca::new("unrelated").pem()).expect("other.pem");
    let (ok, bad) = tokio::task::spawn_blocking(move || {
        (
            trusting.output().expect("run warren"),
            distrusting.output().expect("run warren"),
        )
    })
    .await
    .expect("cli");
    let listed = String::from_utf8_lossy(&ok.stdout).to_string();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(
        listed.starts_with("name") && listed.contains("guest"),
        "{listed}"
    );
    assert!(
        !bad.status.success(),
        "an untrusted server certificate was accepted"
    );

    // `warren reload-tls` does what SIGHUP does, through the admin API: a third
    // certificate (same CA) is served once the command returns.
    let third = pki.write_server(&new_ca);
    assert_ne!(third.cert_der, second.cert_der);
    let url = format!("https://localhost:{https_port}");
    let mut reload = std::process::Command::new(env!("CARGO_BIN_EXE_warren"));
    reload
        .args(["--url", &url, "--cacert"])
        .arg(pki.path("new-ca.pem"))
        .arg("reload-tls");
    let out = tokio::task::spawn_blocking(move || reload.output().expect("run warren"))
        .await
        .expect("cli");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        served_cert(amqps_port, &new_ca.pem()).await.expect("tls"),
        third.cert_der,
        "AMQPS serves the certificate reloaded by the CLI"
    );

    let _ = t(new.close(200, "bye")).await;
    let _ = t(old.close(200, "bye")).await;
    drop(child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_fails_keeps_the_certificate_in_use() {
    let pki = Pki::new("bad-reload");
    let b = broker(&pki, Verify::VerifyNone, false).await;
    let before = served_cert(port(&b), &pki.ca.pem()).await.expect("tls");
    let conn = guest(&b, &pki).await;
    std::fs::write(pki.path("server.key"), "garbage").expect("write");
    assert!(b.reload_tls().is_err(), "a broken key must not load");
    assert_eq!(
        served_cert(port(&b), &pki.ca.pem()).await.expect("tls"),
        before
    );
    round_trip(&conn, b"after a failed reload").await;
    let _ = t(conn.close(200, "bye")).await;
}
