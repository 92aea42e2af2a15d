//! Raw RabbitMQ Stream protocol helpers for the stream test files: frame
//! building and reading, the handshake steps (peer properties, SASL, tune and
//! open), a request/response round trip, the one in-process broker each
//! stream test file shares, and a stock client's publish confirms and errors
//! as a channel.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// `f` within the stream tests' 20 s (consumers wait for chunks).
pub async fn t<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .expect("timed out")
}

/// One broker for the whole test file, its data under `name`: (AMQP, stream)
/// addresses. The first call starts it; later calls return its addresses.
pub fn shared_broker(name: &str) -> (SocketAddr, SocketAddr) {
    shared_broker_with(name, |_| {})
}

/// [`shared_broker`], its configuration changed by `set` first.
pub fn shared_broker_with(
    name: &str,
    set: impl FnOnce(&mut warren::Config),
) -> (SocketAddr, SocketAddr) {
    static ADDRS: std::sync::OnceLock<(SocketAddr, SocketAddr)> = std::sync::OnceLock::new();
    *ADDRS.get_or_init(|| {
        let dir = super::process::data_dir(name).keep();
        let mut config = warren::Config::for_tests(dir);
        config.admin_enabled = false;
        set(&mut config);
        super::spawn_broker(config, |w| {
            (w.amqp_addr(), w.stream_addr().expect("stream listener"))
        })
    })
}

/// A frame: `size:32, key:16, version:16, content`.
pub fn frame(key: u16, version: u16, content: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(&((content.len() + 4) as u32).to_be_bytes());
    f.extend_from_slice(&key.to_be_bytes());
    f.extend_from_slice(&version.to_be_bytes());
    f.extend_from_slice(content);
    f
}

/// A protocol string: `len:16, bytes`.
pub fn s16(s: &str) -> Vec<u8> {
    let mut v = (s.len() as i16).to_be_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

/// The next frame without its size; `None` when the connection ended.
pub async fn read_frame<S: AsyncRead + Unpin>(sock: &mut S) -> Option<Vec<u8>> {
    let mut len = [0u8; 4];
    t(sock.read_exact(&mut len)).await.ok()?;
    let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
    t(sock.read_exact(&mut f)).await.ok()?;
    Some(f)
}

/// The next frame with command `key` (others, like heartbeats, skipped).
pub async fn expect<S: AsyncRead + Unpin>(sock: &mut S, key: u16) -> Vec<u8> {
    loop {
        let f = read_frame(sock).await.expect("a frame");
        if u16::from_be_bytes([f[0], f[1]]) == key {
            return f;
        }
    }
}

/// A request with a correlation id; its response code.
pub async fn request<S: AsyncRead + AsyncWrite + Unpin>(
    sock: &mut S,
    key: u16,
    body: &[u8],
) -> u16 {
    let mut c = 77u32.to_be_bytes().to_vec();
    c.extend_from_slice(body);
    sock.write_all(&frame(key, 1, &c)).await.expect("write");
    let f = expect(sock, 0x8000 | key).await;
    assert_eq!(&f[4..8], &77u32.to_be_bytes());
    u16::from_be_bytes([f[8], f[9]])
}

/// The strings of a SASL handshake response.
pub fn mechanisms(f: &[u8]) -> Vec<String> {
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
pub fn pairs(f: &[u8]) -> Vec<(String, String)> {
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

/// Peer properties and the SASL handshake: the mechanisms offered.
pub async fn hello<S: AsyncRead + AsyncWrite + Unpin>(sock: &mut S) -> Vec<String> {
    let mut pp = 1u32.to_be_bytes().to_vec();
    pp.extend_from_slice(&0i32.to_be_bytes());
    sock.write_all(&frame(17, 1, &pp)).await.expect("write");
    let f = read_frame(sock).await.expect("peer properties");
    assert_eq!(&f[..2], &[0x80, 17]);
    sock.write_all(&frame(18, 1, &2u32.to_be_bytes()))
        .await
        .expect("write");
    mechanisms(&read_frame(sock).await.expect("handshake"))
}

/// SASL authenticate with `mechanism` and `data`: the response code.
pub async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    sock: &mut S,
    mechanism: &str,
    data: &[u8],
) -> u16 {
    let mut auth = 3u32.to_be_bytes().to_vec();
    auth.extend(s16(mechanism));
    auth.extend_from_slice(&(data.len() as i32).to_be_bytes());
    auth.extend_from_slice(data);
    sock.write_all(&frame(19, 1, &auth)).await.expect("write");
    let f = read_frame(sock).await.expect("authenticate response");
    assert_eq!(&f[..2], &[0x80, 19]);
    u16::from_be_bytes([f[8], f[9]])
}

/// Tune and open vhost `/`: the open response's code and properties.
pub async fn open<S: AsyncRead + AsyncWrite + Unpin>(sock: &mut S) -> (u16, Vec<(String, String)>) {
    let tune = read_frame(sock).await.expect("tune");
    assert_eq!(&tune[..2], &[0, 20]);
    let mut tr = (1u32 << 20).to_be_bytes().to_vec();
    tr.extend_from_slice(&0u32.to_be_bytes());
    sock.write_all(&frame(20, 1, &tr)).await.expect("write");
    let mut o = 4u32.to_be_bytes().to_vec();
    o.extend(s16("/"));
    sock.write_all(&frame(21, 1, &o)).await.expect("write");
    let f = read_frame(sock).await.expect("open");
    assert_eq!(&f[..2], &[0x80, 21]);
    (u16::from_be_bytes([f[8], f[9]]), pairs(&f))
}

/// A raw connection to `addr` through the handshake (PLAIN as guest) to vhost `/`.
pub async fn raw_open(addr: SocketAddr) -> TcpStream {
    let mut sock = TcpStream::connect(addr).await.expect("connect");
    hello(&mut sock).await;
    let code = authenticate(&mut sock, "PLAIN", b"\0guest\0guest").await;
    assert_eq!(code, 1, "authenticated");
    assert_eq!(open(&mut sock).await.0, 1, "opened");
    sock
}

/// Declare `name` over AMQP 0-9-1 as a durable stream queue.
pub async fn declare_stream(ch: &lapin::Channel, name: &str) {
    use lapin::options::QueueDeclareOptions;
    use lapin::types::{AMQPValue, FieldTable};
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("stream".into()),
    );
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    t(ch.queue_declare(name, durable, args))
        .await
        .expect("declare");
}

/// What a client's handler hears of its publishes, a frame at a time:
/// (confirmed publishing ids, errors as (id, response code)).
pub type Heard = tokio::sync::mpsc::UnboundedReceiver<(Vec<u64>, Vec<(u64, u16)>)>;

/// Send what `client` hears of its publishes (confirms, errors) to the
/// channel returned.
pub async fn hear_publishes(client: &rabbitmq_stream_client::Client) -> Heard {
    use rabbitmq_stream_client::types::{MessageResult, ResponseKind};
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    client
        .set_handler(move |item: MessageResult| {
            let tx = tx.clone();
            async move {
                if let Some(Ok(r)) = item {
                    match r.kind_ref() {
                        ResponseKind::PublishConfirm(c) => {
                            let _ = tx.send((c.publishing_ids.clone(), Vec::new()));
                        }
                        ResponseKind::PublishError(e) => {
                            let errors = e
                                .publishing_errors
                                .iter()
                                .map(|x| (x.publishing_id, u16::from(&x.error_code)))
                                .collect();
                            let _ = tx.send((Vec::new(), errors));
                        }
                        _ => {}
                    }
                }
                Ok(())
            }
        })
        .await;
    rx
}
