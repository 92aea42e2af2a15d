//! The Stream protocol over TLS (`stream.listeners.ssl`, RabbitMQ's 5551) with
//! certificates made here (rcgen): the stock Rust client
//! (`rabbitmq-stream-client`) creating, publishing with confirms and consuming
//! through the TLS port (its producer and consumer reconnect to the host and
//! port metadata advertises, so that must be the TLS port), open advertising
//! the TLS port, SASL EXTERNAL as the verified client certificate's CN (offered
//! only when a certificate was presented), and plaintext refused on the TLS port.

mod common;

use futures::StreamExt;
use rabbitmq_stream_client::types::{Message, OffsetSpecification};
use rabbitmq_stream_client::{Environment, TlsConfiguration};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use warren::config::{ListenerSetting, SslOptions, Verify};

async fn t<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .expect("timed out")
}

// ------------------------------------------------------------ certificates

struct Pki {
    dir: PathBuf,
    ca: rcgen::Certificate,
    ca_key: KeyPair,
}

struct Leaf {
    cert_pem: String,
    key_pem: String,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let dir = std::env::temp_dir().join(common::uniq(&format!("warren-stls-{name}")));
        std::fs::create_dir_all(&dir).expect("pki dir");
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(DnType::CommonName, "warren stream CA");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_key = KeyPair::generate().expect("ca key");
        let ca = p.self_signed(&ca_key).expect("ca cert");
        let pki = Pki { dir, ca, ca_key };
        let server = pki.issue("localhost", true);
        std::fs::write(pki.path("ca.pem"), pki.ca.pem()).expect("ca.pem");
        std::fs::write(pki.path("server.pem"), &server.cert_pem).expect("server.pem");
        std::fs::write(pki.path("server.key"), &server.key_pem).expect("server.key");
        pki
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// A server certificate for localhost / 127.0.0.1, or a client one for `cn`.
    fn issue(&self, cn: &str, server: bool) -> Leaf {
        let sans = if server {
            vec!["localhost".to_string(), "127.0.0.1".to_string()]
        } else {
            vec![]
        };
        let mut p = CertificateParams::new(sans).expect("params");
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(DnType::OrganizationName, "warren tests");
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        let key = KeyPair::generate().expect("leaf key");
        let cert = p.signed_by(&key, &self.ca, &self.ca_key).expect("leaf");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    fn options(&self) -> SslOptions {
        SslOptions {
            cacertfile: Some(self.path("ca.pem")),
            certfile: Some(self.path("server.pem")),
            keyfile: Some(self.path("server.key")),
            verify: Verify::VerifyPeer,
            fail_if_no_peer_cert: false,
        }
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A broker with the plain and TLS stream listeners on ephemeral ports (no
/// AMQPS listener: the stream TLS port alone must bring the certificates up).
async fn broker(pki: &Pki) -> warren::Warren {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut config = warren::Config::for_tests(pki.path("data"));
    config.admin_enabled = false;
    config.ssl_options = pki.options();
    config.listeners.ssl = Some(ListenerSetting::Off(warren::config::NoListener::None));
    config.stream.listeners.ssl = Some(ListenerSetting::On { default: 0 });
    warren::start(config).await.expect("broker starts")
}

// ------------------------------------------------------------ raw frames

fn frame(key: u16, version: u16, content: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&((content.len() + 4) as u32).to_be_bytes());
    f.extend_from_slice(&key.to_be_bytes());
    f.extend_from_slice(&version.to_be_bytes());
    f.extend_from_slice(content);
    f
}

fn s16(s: &str) -> Vec<u8> {
    let mut v = (s.len() as i16).to_be_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

async fn read_frame<S: AsyncRead + Unpin>(sock: &mut S) -> Vec<u8> {
    let mut len = [0u8; 4];
    t(sock.read_exact(&mut len)).await.expect("frame length");
    let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
    t(sock.read_exact(&mut f)).await.expect("frame");
    f
}

/// The strings of a SASL handshake response.
fn mechanisms(f: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let n = u32::from_be_bytes([f[10], f[11], f[12], f[13]]) as usize;
    let mut at = 14;
    for _ in 0..n {
        let len = u16::from_be_bytes([f[at], f[at + 1]]) as usize;
        out.push(String::from_utf8_lossy(&f[at + 2..at + 2 + len]).into_owned());
        at += 2 + len;
    }
    out
}

/// The (key, value) pairs of an open response.
fn pairs(f: &[u8]) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let n = u32::from_be_bytes([f[10], f[11], f[12], f[13]]) as usize;
    let mut at = 14;
    let s = |at: &mut usize| {
        let len = u16::from_be_bytes([f[*at], f[*at + 1]]) as usize;
        let v = String::from_utf8_lossy(&f[*at + 2..*at + 2 + len]).into_owned();
        *at += 2 + len;
        v
    };
    for _ in 0..n {
        let k = s(&mut at);
        let v = s(&mut at);
        out.push((k, v));
    }
    out
}

/// A TLS connection to `port` trusting the test CA, with `client` as its
/// certificate if given.
async fn tls_connect(
    pki: &Pki,
    port: u16,
    client: Option<&Leaf>,
) -> tokio_rustls::client::TlsStream<TcpStream> {
    use rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(pki.ca.pem().as_bytes()).expect("ca"))
        .expect("root");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let config = match client {
        Some(leaf) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).expect("cert")],
                PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).expect("key"),
            )
            .expect("client cert"),
        None => builder.with_no_client_auth(),
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let name = ServerName::try_from("localhost").expect("name");
    t(connector.connect(name, tcp))
        .await
        .expect("TLS handshake")
}

/// Peer properties and the SASL handshake: the mechanisms offered.
async fn hello<S: AsyncRead + AsyncWrite + Unpin>(sock: &mut S) -> Vec<String> {
    let mut pp = 1u32.to_be_bytes().to_vec();
    pp.extend_from_slice(&0i32.to_be_bytes());
    sock.write_all(&frame(17, 1, &pp)).await.expect("write");
    assert_eq!(&read_frame(sock).await[..2], &[0x80, 17]);
    sock.write_all(&frame(18, 1, &2u32.to_be_bytes()))
        .await
        .expect("write");
    mechanisms(&read_frame(sock).await)
}

/// SASL authenticate with `mechanism` and `data`: the response code.
async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    sock: &mut S,
    mechanism: &str,
    data: &[u8],
) -> u16 {
    let mut auth = 3u32.to_be_bytes().to_vec();
    auth.extend(s16(mechanism));
    auth.extend_from_slice(&(data.len() as i32).to_be_bytes());
    auth.extend_from_slice(data);
    sock.write_all(&frame(19, 1, &auth)).await.expect("write");
    let f = read_frame(sock).await;
    assert_eq!(&f[..2], &[0x80, 19]);
    u16::from_be_bytes([f[8], f[9]])
}

/// Tune and open vhost `/`: the open response's code and properties.
async fn open<S: AsyncRead + AsyncWrite + Unpin>(sock: &mut S) -> (u16, Vec<(String, String)>) {
    let tune = read_frame(sock).await;
    assert_eq!(&tune[..2], &[0, 20]);
    let mut tr = (1u32 << 20).to_be_bytes().to_vec();
    tr.extend_from_slice(&0u32.to_be_bytes());
    sock.write_all(&frame(20, 1, &tr)).await.expect("write");
    let mut o = 4u32.to_be_bytes().to_vec();
    o.extend(s16("/"));
    sock.write_all(&frame(21, 1, &o)).await.expect("write");
    let f = read_frame(sock).await;
    assert_eq!(&f[..2], &[0x80, 21]);
    (u16::from_be_bytes([f[8], f[9]]), pairs(&f))
}

fn add_user(b: &warren::Warren, name: &str) {
    let broker = &b.server.broker;
    broker.auth.put_user(warren::broker::User {
        name: name.into(),
        password_hash: String::new(),
        tags: vec![],
        loopback_only: false,
    });
    broker.auth.set_permission(
        "/",
        name,
        warren::broker::auth::Permission::new(".*", ".*", ".*").expect("permission"),
    );
}

// ------------------------------------------------------------ tests

#[tokio::test(flavor = "multi_thread")]
async fn stock_client_publishes_and_consumes_over_tls() {
    let pki = Pki::new("client");
    let b = broker(&pki).await;
    let port = b.stream_tls_addr().expect("stream TLS listener").port();
    assert!(b.amqps_addr().is_none(), "AMQPS stays off");
    let tls = TlsConfiguration::builder()
        .add_root_certificates(pki.path("ca.pem").to_string_lossy().to_string())
        .build()
        .expect("tls config");
    let env = t(Environment::builder()
        .host("localhost")
        .port(port)
        .tls(tls)
        .build())
    .await
    .expect("environment over TLS");
    let stream = common::uniq("stls");
    t(env.stream_creator().create(&stream))
        .await
        .expect("create");
    let producer = t(env.producer().build(&stream)).await.expect("producer");
    for i in 0..10 {
        let m = Message::builder().body(format!("m{i}")).build();
        t(producer.send_with_confirm(m)).await.expect("confirmed");
    }
    let mut consumer = t(env
        .consumer()
        .offset(OffsetSpecification::First)
        .build(&stream))
    .await
    .expect("consumer");
    for i in 0..10 {
        let d = t(consumer.next()).await.expect("delivery").expect("ok");
        assert_eq!(d.offset(), i);
        assert_eq!(d.message().data(), Some(format!("m{i}").as_bytes()));
    }
    let _ = t(producer.close()).await;
    t(env.delete_stream(&stream)).await.expect("delete");
}

#[tokio::test(flavor = "multi_thread")]
async fn open_advertises_the_tls_port_and_external_logs_in_by_cn() {
    let pki = Pki::new("external");
    let b = broker(&pki).await;
    let tls_port = b.stream_tls_addr().expect("TLS").port();
    let plain_port = b.stream_addr().expect("plain").port();
    add_user(&b, "carol");

    // With a verified certificate: EXTERNAL is offered and logs in as its CN.
    let carol = pki.issue("carol", false);
    let mut sock = tls_connect(&pki, tls_port, Some(&carol)).await;
    let mechs = hello(&mut sock).await;
    assert!(mechs.contains(&"EXTERNAL".to_string()), "{mechs:?}");
    assert_eq!(authenticate(&mut sock, "EXTERNAL", b"").await, 1);
    let (c, props) = open(&mut sock).await;
    assert_eq!(c, 1);
    let port = props
        .iter()
        .find(|(k, _)| k == "advertised_port")
        .map(|(_, v)| v.clone());
    assert_eq!(port, Some(tls_port.to_string()), "{props:?}");

    // Without a certificate: no EXTERNAL, and asking for it is refused.
    let mut sock = tls_connect(&pki, tls_port, None).await;
    let mechs = hello(&mut sock).await;
    assert!(!mechs.contains(&"EXTERNAL".to_string()), "{mechs:?}");
    assert_eq!(authenticate(&mut sock, "EXTERNAL", b"").await, 7);
    // PLAIN still works over TLS.
    assert_eq!(authenticate(&mut sock, "PLAIN", b"\0guest\0guest").await, 1);
    let (c, _) = open(&mut sock).await;
    assert_eq!(c, 1);

    // A certificate for a user the broker does not know: authentication failure.
    let mallory = pki.issue("mallory", false);
    let mut sock = tls_connect(&pki, tls_port, Some(&mallory)).await;
    hello(&mut sock).await;
    assert_eq!(authenticate(&mut sock, "EXTERNAL", b"").await, 8);

    // The plain port still advertises itself and never offers EXTERNAL.
    let mut sock = TcpStream::connect(("127.0.0.1", plain_port))
        .await
        .expect("connect");
    let mechs = hello(&mut sock).await;
    assert!(!mechs.contains(&"EXTERNAL".to_string()), "{mechs:?}");
    assert_eq!(authenticate(&mut sock, "PLAIN", b"\0guest\0guest").await, 1);
    let (_, props) = open(&mut sock).await;
    assert!(
        props.contains(&("advertised_port".into(), plain_port.to_string())),
        "{props:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn plaintext_on_the_tls_port_is_refused() {
    let pki = Pki::new("plain");
    let b = broker(&pki).await;
    let port = b.stream_tls_addr().expect("TLS").port();
    let mut sock = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let mut pp = 1u32.to_be_bytes().to_vec();
    pp.extend_from_slice(&0i32.to_be_bytes());
    sock.write_all(&frame(17, 1, &pp)).await.expect("write");
    let mut buf = [0u8; 16];
    let n = t(sock.read(&mut buf)).await.unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    // The listener still serves TLS clients.
    let mut sock = tls_connect(&pki, port, None).await;
    assert!(hello(&mut sock).await.contains(&"PLAIN".to_string()));
}
