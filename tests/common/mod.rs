//! Shared helpers for the client-level integration tests.
//!
//! Every test obtains the broker address only through [`broker_uri`] and connects
//! only through [`connect`] / [`connect_with`], so switching to an embedded broker
//! is a change to `broker_uri` alone.
#![allow(dead_code)]

/// `(class id, method id)` of a generated method struct: `id!(ConnectionClose)`.
#[macro_export]
macro_rules! id {
    ($m:ident) => {
        (warren::wire::$m::CLASS_ID, warren::wire::$m::METHOD_ID)
    };
}

pub mod cluster;
pub mod jepsen;
pub mod process;
pub mod proxy;
pub mod raw;
pub mod stream;
pub mod tls;

use std::future::Future;
use std::time::Duration;

use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

/// A TCP port on `ip` for a broker child process to listen on.
///
/// Taken from 20000..32000, below the kernel's ephemeral range (32768..60999 by
/// default): a port the OS handed out for `bind(0)` and we released could be
/// handed out again, and the ephemeral range is also where every client
/// connection's local port comes from, so a child process binding it later can
/// find it taken ("Address already in use"). Each test binary starts at an offset
/// of its own (from its pid) and walks on; a port is returned only if it can be
/// bound on `ip` right now.
pub fn free_port(ip: &str) -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        (std::process::id().wrapping_mul(7919)) % SPAN,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::SeqCst) % SPAN) as u16;
        if std::net::TcpListener::bind((ip, port)).is_ok() {
            return port;
        }
    }
    panic!("no free port on {ip} in {LOW}..{}", LOW + SPAN)
}

/// Default timeout around every await that talks to the broker.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// The AMQP URI of the broker under test: env `WARREN_TEST_URI` if set, otherwise
/// an embedded warren started once per test binary on an ephemeral port.
pub async fn broker_uri() -> String {
    match std::env::var("WARREN_TEST_URI") {
        Ok(uri) if !uri.is_empty() => uri,
        _ => embedded_uri().to_string(),
    }
}

/// An in-process broker on its own thread and runtime, so it outlives every test's
/// runtime.
fn embedded_uri() -> &'static str {
    static URI: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    URI.get_or_init(|| {
        if let Ok(filter) = std::env::var("WARREN_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_writer(std::io::stderr)
                .try_init();
        }
        let dir = std::env::temp_dir().join(format!("warren-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut config = warren::Config::for_tests(dir);
        config.admin_enabled = false;
        let addr = spawn_broker(config, |w| w.amqp_addr());
        format!("amqp://guest:guest@{addr}/%2f")
    })
}

/// Start a broker with `config` on its own thread and runtime, running until the
/// test process ends (so it outlives every test's runtime), and return what `pick`
/// reads from it (its addresses).
pub fn spawn_broker<T: Send + 'static>(
    config: warren::Config,
    pick: impl FnOnce(&warren::Warren) -> T + Send + 'static,
) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let broker = warren::start(config).await.expect("broker starts");
            tx.send(pick(&broker)).expect("send the broker's addresses");
            std::future::pending::<()>().await;
            drop(broker);
        });
    });
    rx.recv().expect("the broker's addresses")
}

/// Parsed pieces of an `amqp://user:pass@host:port/vhost` URI.
#[derive(Debug, Clone)]
pub struct UriParts {
    pub user: String,
    pub pass: String,
    pub host: String,
    pub port: u16,
    pub vhost: String,
}

fn pct_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap()
}

/// Splits a broker URI into its parts (defaults as the AMQP URI spec says).
pub fn parse_uri(uri: &str) -> UriParts {
    let rest = uri
        .strip_prefix("amqp://")
        .expect("only amqp:// URIs are supported by the test helpers");
    let rest = rest.split('?').next().unwrap();
    let (auth, hostpart) = match rest.rsplit_once('@') {
        Some((a, h)) => (Some(a), h),
        None => (None, rest),
    };
    let (user, pass) = match auth {
        Some(a) => match a.split_once(':') {
            Some((u, p)) => (pct_decode(u), pct_decode(p)),
            None => (pct_decode(a), String::new()),
        },
        None => ("guest".into(), "guest".into()),
    };
    let (hostport, vhost) = match hostpart.split_once('/') {
        Some((hp, v)) => (
            hp,
            if v.is_empty() {
                "/".to_string()
            } else {
                pct_decode(v)
            },
        ),
        None => (hostpart, "/".to_string()),
    };
    let (host, port) = match hostport.rsplit_once(':') {
        Some((h, p)) => (h.to_string(), p.parse().expect("port")),
        None => (hostport.to_string(), 5672),
    };
    let host = if host.is_empty() {
        "localhost".into()
    } else {
        host
    };
    UriParts {
        user,
        pass,
        host,
        port,
        vhost,
    }
}

/// Builds a URI for the same broker with other credentials / vhost / query.
pub async fn uri_with(user: &str, pass: &str, vhost: &str, query: &str) -> String {
    let p = parse_uri(&broker_uri().await);
    let vhost_enc: String = vhost
        .bytes()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == b'-' || c == b'_' || c == b'.' {
                (c as char).to_string()
            } else {
                format!("%{:02x}", c)
            }
        })
        .collect();
    let q = if query.is_empty() {
        String::new()
    } else {
        format!("?{query}")
    };
    format!("amqp://{user}:{pass}@{}:{}/{vhost_enc}{q}", p.host, p.port)
}

pub fn props() -> ConnectionProperties {
    ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio)
}

/// Connects lapin to the broker under test.
pub async fn connect() -> Connection {
    let uri = broker_uri().await;
    connect_with(&uri).await.expect("connect to broker")
}

/// Connects lapin to an explicit URI (for auth/vhost/heartbeat tests).
pub async fn connect_with(uri: &str) -> lapin::Result<Connection> {
    tokio::time::timeout(TIMEOUT, Connection::connect(uri, props()))
        .await
        .expect("timeout connecting")
}

/// Connection + one open channel.
pub async fn connect_channel() -> (Connection, Channel) {
    let conn = connect().await;
    let ch = t(conn.create_channel()).await.expect("create channel");
    (conn, ch)
}

/// Awaits `fut` with [`TIMEOUT`]; a hang panics instead of blocking the suite.
pub async fn t<F: Future>(fut: F) -> F::Output {
    tokio::time::timeout(TIMEOUT, fut)
        .await
        .expect("operation timed out")
}

/// Awaits `fut` for at most `d`; `None` when it did not complete.
pub async fn within<F: Future>(d: Duration, fut: F) -> Option<F::Output> {
    tokio::time::timeout(d, fut).await.ok()
}

/// A test's data directory under the system's temporary one, empty at
/// first and removed when dropped (declare it before the broker that uses
/// it, so the broker goes first).
pub struct TempDir(std::path::PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let dir = std::env::temp_dir().join(uniq(prefix));
        let _ = std::fs::remove_dir_all(&dir);
        TempDir(dir)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }

    /// The directory, kept (a broker that lives as long as the process).
    pub fn keep(self) -> std::path::PathBuf {
        let me = std::mem::ManuallyDrop::new(self);
        me.0.clone()
    }
}

impl std::ops::Deref for TempDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.0
    }
}

impl AsRef<std::path::Path> for TempDir {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A unique name for a queue/exchange so tests run in parallel and re-run.
pub fn uniq(prefix: &str) -> String {
    use rand::Rng;
    let n: u64 = rand::thread_rng().gen();
    format!("itest.{prefix}.{n:016x}")
}

/// The AMQP reply code carried by a lapin error (channel or connection close).
pub fn code(e: &lapin::Error) -> Option<u16> {
    match e {
        lapin::Error::ProtocolError(p) => Some(p.get_id()),
        _ => None,
    }
}

/// Asserts the result is an error carrying `expected` reply code.
#[track_caller]
pub fn assert_code<T: std::fmt::Debug>(r: lapin::Result<T>, expected: u16) {
    match r {
        Ok(v) => panic!("expected AMQP error {expected}, got Ok({v:?})"),
        Err(e) => assert_eq!(code(&e), Some(expected), "unexpected error: {e:?}"),
    }
}

/// Declares a non-durable, auto-delete=false, server-side plain queue.
pub async fn declare_queue(ch: &Channel, name: &str) -> lapin::Queue {
    t(ch.queue_declare(name, QueueDeclareOptions::default(), FieldTable::default()))
        .await
        .expect("queue.declare")
}

/// A unique queue that is deleted when the connection closes (exclusive).
pub async fn temp_queue(ch: &Channel, prefix: &str) -> String {
    let name = uniq(prefix);
    t(ch.queue_declare(
        &name,
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .expect("queue.declare exclusive");
    name
}

/// Publishes `body` to `exchange` with `routing_key` (no confirm wait).
pub async fn publish(ch: &Channel, exchange: &str, routing_key: &str, body: &[u8]) {
    t(ch.basic_publish(
        exchange,
        routing_key,
        BasicPublishOptions::default(),
        body,
        BasicProperties::default(),
    ))
    .await
    .expect("basic.publish");
}

/// basic.get with no-ack, returning only the body.
pub async fn get_body(ch: &Channel, queue: &str) -> Option<Vec<u8>> {
    t(ch.basic_get(queue, BasicGetOptions { no_ack: true }))
        .await
        .expect("basic.get")
        .map(|m| m.delivery.data)
}

/// Message count of a queue via passive declare.
pub async fn message_count(ch: &Channel, queue: &str) -> u32 {
    t(ch.queue_declare(
        queue,
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .expect("passive queue.declare")
    .message_count()
}

/// Polls `message_count` until it equals `n` (publishes are async without confirms).
pub async fn wait_message_count(ch: &Channel, queue: &str, n: u32) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let c = message_count(ch, queue).await;
        if c == n {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("queue {queue}: expected {n} messages, have {c}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Drains every message currently in `queue` (no-ack get) and returns bodies as strings.
pub async fn drain(ch: &Channel, queue: &str) -> Vec<String> {
    let mut out = vec![];
    while let Some(b) = get_body(ch, queue).await {
        out.push(String::from_utf8(b).unwrap());
    }
    out
}

/// Puts the channel in confirm mode.
pub async fn confirm_mode(ch: &Channel) {
    t(ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .expect("confirm.select");
}

/// Publishes and waits for the publisher confirm (channel must be in confirm mode).
pub async fn publish_confirmed(ch: &Channel, exchange: &str, routing_key: &str, body: &[u8]) {
    let c = t(ch.basic_publish(
        exchange,
        routing_key,
        BasicPublishOptions::default(),
        body,
        BasicProperties::default(),
    ))
    .await
    .expect("basic.publish");
    let conf = t(c).await.expect("confirm");
    assert!(conf.is_ack(), "expected ack, got {conf:?}");
}

/// Next delivery of a consumer stream, with timeout; panics on cancel/error.
pub async fn next_delivery(consumer: &mut lapin::Consumer) -> lapin::message::Delivery {
    use futures::StreamExt;
    t(consumer.next())
        .await
        .expect("consumer stream ended")
        .expect("consumer error")
}

/// Asserts no delivery arrives on the consumer within `d`.
pub async fn assert_no_delivery(consumer: &mut lapin::Consumer, d: Duration) {
    use futures::StreamExt;
    if let Some(x) = within(d, consumer.next()).await {
        panic!(
            "unexpected delivery: {:?}",
            x.map(|r| r.map(|d| String::from_utf8_lossy(&d.data).to_string()))
        );
    }
}

/// A receiver that yields the first error reported on a channel
/// (lapin calls the channel's on_error handler when the server closes it).
pub fn watch_channel(ch: &Channel) -> tokio::sync::oneshot::Receiver<lapin::Error> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let tx = std::sync::Mutex::new(Some(tx));
    ch.on_error(move |e| {
        if let Some(tx) = tx.lock().unwrap().take() {
            let _ = tx.send(e);
        }
    });
    rx
}

/// A receiver that yields the first error reported on a connection.
pub fn watch_connection(conn: &Connection) -> tokio::sync::oneshot::Receiver<lapin::Error> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let tx = std::sync::Mutex::new(Some(tx));
    conn.on_error(move |e| {
        if let Some(tx) = tx.lock().unwrap().take() {
            let _ = tx.send(e);
        }
    });
    rx
}

/// Waits for the watched error and asserts its reply code.
pub async fn expect_closed_with(rx: tokio::sync::oneshot::Receiver<lapin::Error>, expected: u16) {
    let e = t(rx).await.expect("no error was reported");
    assert_eq!(code(&e), Some(expected), "unexpected error: {e:?}");
}

/// A FieldTable from (key, long-string value) pairs.
pub fn str_table(pairs: &[(&str, &str)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert(
            (*k).into(),
            lapin::types::AMQPValue::LongString((*v).into()),
        );
    }
    t
}

/// Publishes on a confirm-mode channel with explicit options/properties and
/// returns the confirmation.
pub async fn publish_with(
    ch: &Channel,
    exchange: &str,
    routing_key: &str,
    options: BasicPublishOptions,
    properties: BasicProperties,
    body: &[u8],
) -> lapin::Result<lapin::publisher_confirm::Confirmation> {
    let c = t(ch.basic_publish(exchange, routing_key, options, body, properties)).await?;
    t(c).await
}

/// Asserts that the passive declare of `queue` fails with 404 (on a throwaway channel),
/// polling because some deletions (exclusive/auto-delete) are asynchronous.
pub async fn wait_queue_gone(conn: &Connection, queue: &str) {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let ch = t(conn.create_channel()).await.expect("channel");
        let r = t(ch.queue_declare(
            queue,
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ))
        .await;
        match r {
            Err(e) if code(&e) == Some(404) => return,
            Err(e) => panic!("unexpected error {e:?}"),
            Ok(_) => {
                let _ = ch.close(200, "").await;
                if tokio::time::Instant::now() > deadline {
                    panic!("queue {queue} still exists");
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
    }
}

/// One HTTP call to `url` (with basic auth when given): the status and the JSON body
/// (Null when it is not JSON). Error statuses are answers, not failures.
pub async fn http(
    method: &str,
    url: &str,
    auth: Option<(&str, &str)>,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let (method, url) = (method.to_string(), url.to_string());
    let auth = auth.map(|(u, p)| {
        use base64::Engine;
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
        )
    });
    tokio::task::spawn_blocking(move || {
        let mut req = ureq::request(&method, &url);
        if let Some(a) = &auth {
            req = req.set("Authorization", a);
        }
        let res = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        let resp = match res {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {url}: {e}"),
        };
        let status = resp.status();
        let text = resp.into_string().unwrap_or_default();
        (
            status,
            serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
        )
    })
    .await
    .expect("http task")
}
