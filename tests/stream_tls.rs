//! The Stream protocol over TLS (`stream.listeners.ssl`, RabbitMQ's 5551) with
//! certificates made here (rcgen): the stock Rust client
//! (`rabbitmq-stream-client`) creating, publishing with confirms and consuming
//! through the TLS port (its producer and consumer reconnect to the host and
//! port metadata advertises, so that must be the TLS port), open advertising
//! the TLS port, SASL EXTERNAL as the verified client certificate's CN (offered
//! only when a certificate was presented), and plaintext refused on the TLS port.

mod common;

use common::stream::{authenticate, frame, hello, open, t};
use common::tls::{Leaf, Pki};
use futures::StreamExt;
use rabbitmq_stream_client::types::{Message, OffsetSpecification};
use rabbitmq_stream_client::{Environment, TlsConfiguration};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;
use warren::config::{ListenerSetting, Verify};

/// A broker with the plain and TLS stream listeners on ephemeral ports (no
/// AMQPS listener: the stream TLS port alone must bring the certificates up).
async fn broker(pki: &Pki) -> warren::Warren {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut config = warren::Config::for_tests(pki.path("data"));
    config.admin_enabled = false;
    config.ssl_options = pki.options(Verify::VerifyPeer, false);
    config.listeners.ssl = Some(ListenerSetting::Off(warren::config::NoListener::None));
    config.stream.listeners.ssl = Some(ListenerSetting::On { default: 0 });
    // The name the certificate has: clients connect to the advertised host
    // (by default this node's host name, as RabbitMQ's).
    config.stream.advertised_host = Some("localhost".into());
    warren::start(config).await.expect("broker starts")
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
    let carol = pki.ca.issue("carol", false, false);
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
    let mallory = pki.ca.issue("mallory", false, false);
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
