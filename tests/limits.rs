//! Limits and slow peers: each test starts its own embedded broker with small
//! configured limits (`warren::start` on port 0) and asserts the exact reply
//! code (and RabbitMQ's wording) when a limit is hit.

mod common;

use bytes::{Bytes, BytesMut};
use common::{assert_code, code, props, t};
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable as LFieldTable};
use lapin::{BasicProperties as LProps, Connection};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::Decoder;
use warren::wire::{self, Frame, FrameCodec, Method};

/// A broker of its own and its data directory, removed after it.
struct Owned {
    warren: warren::Warren,
    _dir: common::TempDir,
}

impl std::ops::Deref for Owned {
    type Target = warren::Warren;
    fn deref(&self) -> &warren::Warren {
        &self.warren
    }
}

/// A broker of its own with `tweak` applied to the test configuration.
async fn broker(tweak: impl FnOnce(&mut warren::Config)) -> (Owned, String) {
    let dir = common::TempDir::new("warren-limits");
    let mut config = warren::Config::for_tests(dir.path());
    config.admin_enabled = false;
    tweak(&mut config);
    let warren = warren::start(config).await.expect("broker starts");
    let uri = format!("amqp://guest:guest@{}/%2f", warren.amqp_addr());
    (Owned { warren, _dir: dir }, uri)
}

async fn connect(uri: &str) -> Connection {
    t(Connection::connect(uri, props())).await.expect("connect")
}

fn message(e: &lapin::Error) -> String {
    match e {
        lapin::Error::ProtocolError(p) => p.get_message().to_string(),
        other => format!("{other:?}"),
    }
}

/// A raw AMQP client speaking through warren's own codec.
struct Raw {
    sock: TcpStream,
    codec: FrameCodec,
    buf: BytesMut,
}

impl Raw {
    async fn connect(addr: SocketAddr) -> Raw {
        let sock = TcpStream::connect(addr).await.expect("tcp connect");
        Raw {
            sock,
            codec: FrameCodec::new(0),
            buf: BytesMut::new(),
        }
    }

    /// Protocol header, start-ok, tune-ok (with `heartbeat`), open.
    async fn open(addr: SocketAddr, heartbeat: u16) -> Raw {
        let mut r = Raw::connect(addr).await;
        r.sock
            .write_all(wire::PROTOCOL_HEADER)
            .await
            .expect("header");
        assert!(matches!(
            r.method().await,
            Some((0, Method::ConnectionStart(_)))
        ));
        r.send(
            0,
            wire::ConnectionStartOk {
                client_properties: wire::FieldTable::new(),
                mechanism: "PLAIN".into(),
                response: Bytes::from_static(b"\0guest\0guest"),
                locale: "en_US".into(),
            }
            .into(),
        )
        .await;
        let Some((0, Method::ConnectionTune(tune))) = r.method().await else {
            panic!("no tune")
        };
        r.send(
            0,
            wire::ConnectionTuneOk {
                channel_max: 0,
                frame_max: tune.frame_max,
                heartbeat,
            }
            .into(),
        )
        .await;
        r.send(
            0,
            wire::ConnectionOpen {
                virtual_host: "/".into(),
                ..Default::default()
            }
            .into(),
        )
        .await;
        assert!(matches!(
            r.method().await,
            Some((0, Method::ConnectionOpenOk(_)))
        ));
        r
    }

    async fn send(&mut self, channel: u16, m: Method) {
        let mut b = BytesMut::new();
        wire::write_method(&mut b, channel, &m);
        self.sock.write_all(&b).await.expect("write");
    }

    /// The next frame; None on EOF or after 10 s.
    async fn frame(&mut self) -> Option<Frame> {
        loop {
            if let Some(f) = self.codec.decode(&mut self.buf).expect("valid frames") {
                return Some(f);
            }
            let mut chunk = vec![0u8; 64 * 1024];
            match tokio::time::timeout(Duration::from_secs(10), self.sock.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => self.buf.extend_from_slice(&chunk[..n]),
                _ => return None,
            }
        }
    }

    /// The next method frame (skipping heartbeats and content).
    async fn method(&mut self) -> Option<(u16, Method)> {
        loop {
            match self.frame().await? {
                Frame::Method { channel, method } => return Some((channel, method)),
                _ => continue,
            }
        }
    }

    /// Wait for connection.close; returns (code, text).
    async fn expect_connection_close(&mut self) -> (u16, String) {
        loop {
            match self.method().await {
                Some((0, Method::ConnectionClose(c))) => return (c.reply_code, c.reply_text),
                Some(_) => continue,
                None => panic!("connection ended without connection.close"),
            }
        }
    }

    /// True if the server closes the socket within `d`.
    async fn closed_within(&mut self, d: Duration) -> bool {
        let mut chunk = [0u8; 4096];
        let deadline = tokio::time::Instant::now() + d;
        loop {
            match tokio::time::timeout_at(deadline, self.sock.read(&mut chunk)).await {
                Err(_) => return false,
                Ok(Ok(0)) | Ok(Err(_)) => return true,
                Ok(Ok(_)) => continue,
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_refuses_and_recovers() {
    let (w, uri) = broker(|c| c.max_connections = Some(2)).await;
    let a = connect(&uri).await;
    let b = connect(&uri).await;
    // The third socket is closed before the handshake.
    let mut r = Raw::connect(w.amqp_addr()).await;
    let _ = r.sock.write_all(wire::PROTOCOL_HEADER).await;
    assert!(
        r.closed_within(Duration::from_secs(5)).await,
        "over-limit socket is closed"
    );
    assert!(
        t(Connection::connect(&uri, props())).await.is_err(),
        "lapin cannot connect past the limit"
    );
    t(a.close(200, "bye")).await.expect("close");
    // The slot comes back once the connection task ends.
    let mut ok = false;
    for _ in 0..50 {
        if let Ok(c) = t(Connection::connect(&uri, props())).await {
            ok = true;
            let _ = c.close(200, "bye").await;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(ok, "a new connection is accepted after one closed");
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_max_is_530_with_rabbitmq_text() {
    let (w, _) = broker(|c| c.channel_max = 3).await;
    let mut r = Raw::open(w.amqp_addr(), 0).await;
    for ch in 1..=3 {
        r.send(ch, wire::ChannelOpen::default().into()).await;
        assert!(matches!(r.method().await, Some((c, Method::ChannelOpenOk(_))) if c == ch));
    }
    // Channel 3 was the last allowed; a fourth channel (any number) is refused.
    r.send(4, wire::ChannelOpen::default().into()).await;
    let (code, text) = r.expect_connection_close().await;
    assert_eq!(code, 530);
    assert_eq!(
        text,
        "NOT_ALLOWED - number of channels opened (3) has reached the negotiated channel_max (3)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_max_is_enforced_with_501() {
    let (w, _) = broker(|c| c.frame_max = 8192).await;
    let mut r = Raw::open(w.amqp_addr(), 0).await;
    // A body frame announcing more than frame_max: refused from its header.
    let mut b = BytesMut::new();
    b.extend_from_slice(&[3, 0, 1]);
    b.extend_from_slice(&9000u32.to_be_bytes());
    r.sock.write_all(&b).await.expect("write");
    let (code, _) = r.expect_connection_close().await;
    assert_eq!(code, 501);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_message_size_is_406() {
    let (_w, uri) = broker(|c| c.max_message_size = 1000).await;
    let conn = connect(&uri).await;
    let ch = t(conn.create_channel()).await.expect("channel");
    t(ch.basic_publish(
        "",
        "nowhere",
        BasicPublishOptions::default(),
        &[0u8; 1000],
        LProps::default(),
    ))
    .await
    .expect("publish at the limit");
    let errors = common::watch_channel(&ch);
    let _ = t(ch.basic_publish(
        "",
        "nowhere",
        BasicPublishOptions::default(),
        &[0u8; 1001],
        LProps::default(),
    ))
    .await;
    let e = t(errors).await.expect("channel closed");
    assert_eq!(code(&e), Some(406), "{e:?}");
    assert!(
        message(&e).contains("larger than configured max size 1000"),
        "{}",
        message(&e)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn field_table_nesting_limit_is_a_syntax_error() {
    let (w, _) = broker(|_| {}).await;
    let mut r = Raw::open(w.amqp_addr(), 0).await;
    r.send(1, wire::ChannelOpen::default().into()).await;
    assert!(matches!(
        r.method().await,
        Some((1, Method::ChannelOpenOk(_)))
    ));
    // queue.declare whose arguments nest tables 200 deep (the limit is 128).
    let mut table = Vec::new();
    table.extend_from_slice(&0u32.to_be_bytes());
    for _ in 0..200 {
        let mut outer = Vec::new();
        let mut entries = vec![1u8, b'a', b'F'];
        entries.extend_from_slice(&table);
        outer.extend_from_slice(&(entries.len() as u32).to_be_bytes());
        outer.extend_from_slice(&entries);
        table = outer;
    }
    let mut payload = vec![0, 50, 0, 10, 0, 0, 1, b'q', 0];
    payload.extend_from_slice(&table);
    let mut b = BytesMut::new();
    b.extend_from_slice(&[1, 0, 1]);
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(&payload);
    b.extend_from_slice(&[0xce]);
    r.sock.write_all(&b).await.expect("write");
    let (code, text) = r.expect_connection_close().await;
    assert_eq!(code, 502, "{text}");
    assert!(
        text.starts_with("SYNTAX_ERROR - cannot decode queue.declare (50.10) arguments: "),
        "{text}"
    );
    assert!(
        text.contains("nested deeper than 128 levels"),
        "the reason survives the 255-byte cut: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_limit_per_vhost_is_406() {
    let (_w, uri) = broker(|c| c.max_queues_per_vhost = Some(2)).await;
    let conn = connect(&uri).await;
    let ch = t(conn.create_channel()).await.expect("channel");
    for q in ["q1", "q2"] {
        t(ch.queue_declare(q, QueueDeclareOptions::default(), LFieldTable::default()))
            .await
            .expect("under the limit");
    }
    // Redeclaring an existing queue is fine at the limit.
    t(ch.queue_declare("q1", QueueDeclareOptions::default(), LFieldTable::default()))
        .await
        .expect("redeclare");
    let e = t(ch.queue_declare("q3", QueueDeclareOptions::default(), LFieldTable::default()))
        .await
        .expect_err("over the limit");
    assert_eq!(code(&e), Some(406));
    assert_eq!(
        message(&e),
        "PRECONDITION_FAILED - cannot declare queue 'q3': queue limit in vhost '/' (2) is reached"
    );
    // Deleting one makes room again.
    let ch = t(conn.create_channel()).await.expect("channel");
    t(ch.queue_delete("q2", QueueDeleteOptions::default()))
        .await
        .expect("delete");
    t(ch.queue_declare("q3", QueueDeclareOptions::default(), LFieldTable::default()))
        .await
        .expect("room again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_limit_per_vhost_is_406() {
    let (w, uri) = broker(|_| {}).await;
    let predeclared = w.server.broker.vhost("/").expect("vhost").exchanges().len();
    drop(w);
    let (_w, uri2) = broker(|c| c.max_exchanges_per_vhost = Some(predeclared + 1)).await;
    let _ = uri;
    let conn = connect(&uri2).await;
    let ch = t(conn.create_channel()).await.expect("channel");
    t(ch.exchange_declare(
        "x1",
        lapin::ExchangeKind::Direct,
        ExchangeDeclareOptions::default(),
        LFieldTable::default(),
    ))
    .await
    .expect("under the limit");
    let e = t(ch.exchange_declare(
        "x2",
        lapin::ExchangeKind::Direct,
        ExchangeDeclareOptions::default(),
        LFieldTable::default(),
    ))
    .await
    .expect_err("over the limit");
    assert_eq!(code(&e), Some(406));
    assert!(message(&e).contains("exchange limit"), "{}", message(&e));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_per_channel_limit_is_406() {
    let (_w, uri) = broker(|c| c.consumer_max_per_channel = Some(2)).await;
    let conn = connect(&uri).await;
    let ch = t(conn.create_channel()).await.expect("channel");
    t(ch.queue_declare("cq", QueueDeclareOptions::default(), LFieldTable::default()))
        .await
        .expect("declare");
    // Kept alive: lapin cancels a consumer when it is dropped.
    let mut keep = Vec::new();
    for tag in ["c1", "c2"] {
        keep.push(
            t(ch.basic_consume(
                "cq",
                tag,
                BasicConsumeOptions::default(),
                LFieldTable::default(),
            ))
            .await
            .expect("under the limit"),
        );
    }
    let e = t(ch.basic_consume(
        "cq",
        "c3",
        BasicConsumeOptions::default(),
        LFieldTable::default(),
    ))
    .await
    .expect_err("over the limit");
    assert_eq!(code(&e), Some(406));
    assert_eq!(
        message(&e),
        "PRECONDITION_FAILED - reached maximum (2) of consumers per channel"
    );
    // Another channel has its own allowance.
    let ch2 = t(conn.create_channel()).await.expect("channel");
    assert_code(
        t(ch2.basic_consume(
            "missing",
            "c",
            BasicConsumeOptions::default(),
            LFieldTable::default(),
        ))
        .await,
        404,
    );
    let ch3 = t(conn.create_channel()).await.expect("channel");
    let _c = t(ch3.basic_consume(
        "cq",
        "c1",
        BasicConsumeOptions::default(),
        LFieldTable::default(),
    ))
    .await
    .expect("other channel");
    drop(keep);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_timeout_closes_the_socket() {
    let (w, _) = broker(|c| c.handshake_timeout_secs = 1).await;
    // Nothing at all.
    let mut r = Raw::connect(w.amqp_addr()).await;
    assert!(
        r.closed_within(Duration::from_secs(4)).await,
        "silent socket closed"
    );
    // Protocol header, then silence after connection.start.
    let mut r = Raw::connect(w.amqp_addr()).await;
    r.sock
        .write_all(wire::PROTOCOL_HEADER)
        .await
        .expect("header");
    assert!(
        r.closed_within(Duration::from_secs(4)).await,
        "stalled handshake closed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missed_heartbeats_close_the_connection() {
    let (w, _) = broker(|c| c.heartbeat = 1).await;
    let mut r = Raw::open(w.amqp_addr(), 1).await;
    let started = std::time::Instant::now();
    // We never send anything: after two missed intervals the broker hangs up.
    assert!(
        r.closed_within(Duration::from_secs(6)).await,
        "dead peer dropped"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        started.elapsed()
    );
}

async fn consumer_timeout_case(
    tweak: impl FnOnce(&mut warren::Config),
    queue_args: LFieldTable,
    ms: u64,
) {
    let (_w, uri) = broker(tweak).await;
    let conn = connect(&uri).await;
    let ch = t(conn.create_channel()).await.expect("channel");
    t(ch.queue_declare("slow", QueueDeclareOptions::default(), queue_args))
        .await
        .expect("declare");
    let errors = common::watch_channel(&ch);
    let _consumer = t(ch.basic_consume(
        "slow",
        "",
        BasicConsumeOptions::default(),
        LFieldTable::default(),
    ))
    .await
    .expect("consume");
    t(ch.basic_publish(
        "",
        "slow",
        BasicPublishOptions::default(),
        b"never acked",
        LProps::default(),
    ))
    .await
    .expect("publish");
    let e = tokio::time::timeout(Duration::from_secs(10), errors)
        .await
        .expect("channel closed in time")
        .expect("error");
    assert_eq!(code(&e), Some(406));
    assert_eq!(
        message(&e),
        format!(
            "PRECONDITION_FAILED - delivery acknowledgement on channel 1 timed out. Timeout value used: {ms} ms. \
             This timeout value can be configured, see consumers doc guide to learn more"
        )
    );
    // The message went back to the queue.
    let ch = t(conn.create_channel()).await.expect("channel");
    let q = t(ch.queue_declare(
        "slow",
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        LFieldTable::default(),
    ))
    .await
    .expect("passive");
    assert_eq!(q.message_count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_timeout_closes_the_channel_with_406() {
    consumer_timeout_case(
        |c| c.consumer_timeout_ms = Some(300),
        LFieldTable::default(),
        300,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_consumer_timeout_queue_argument_overrides() {
    let mut args = LFieldTable::default();
    args.insert("x-consumer-timeout".into(), AMQPValue::LongLongInt(200));
    consumer_timeout_case(|_| {}, args, 200).await;
}

/// A no-ack consumer that stops reading its socket: the broker stops handing it
/// messages once the write backlog is over the limit (they stay in the queue),
/// another consumer of the same queue keeps receiving, and when the slow one
/// reads again it gets the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_not_buffered_without_bound() {
    let (w, uri) = broker(|c| c.write_backlog_limit = 64 * 1024).await;
    let conn = connect(&uri).await;
    let ch = t(conn.create_channel()).await.expect("channel");
    t(ch.queue_declare("bp", QueueDeclareOptions::default(), LFieldTable::default()))
        .await
        .expect("declare");
    // The slow consumer: raw, no-ack, never reads after consume-ok.
    let mut slow = Raw::open(w.amqp_addr(), 0).await;
    slow.send(1, wire::ChannelOpen::default().into()).await;
    assert!(matches!(
        slow.method().await,
        Some((1, Method::ChannelOpenOk(_)))
    ));
    slow.send(
        1,
        wire::BasicConsume {
            queue: "bp".into(),
            consumer_tag: "slow".into(),
            no_ack: true,
            ..Default::default()
        }
        .into(),
    )
    .await;
    assert!(matches!(
        slow.method().await,
        Some((1, Method::BasicConsumeOk(_)))
    ));
    // 3000 x 10 KiB = 30 MiB: far more than socket buffers and the backlog bound.
    let body = vec![7u8; 10 * 1024];
    let total = 3000u32;
    for _ in 0..total {
        ch.basic_publish(
            "",
            "bp",
            BasicPublishOptions::default(),
            &body,
            LProps::default(),
        )
        .await
        .expect("publish");
    }
    let q = |ch: lapin::Channel| async move {
        t(ch.queue_declare(
            "bp",
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            LFieldTable::default(),
        ))
        .await
        .expect("passive")
        .message_count()
    };
    // Let dispatch settle, then most messages must still be in the queue.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ready = q(ch.clone()).await;
    assert!(
        ready > total / 2,
        "only {ready} of {total} left in the queue: the slow consumer was flooded"
    );
    // Another consumer on another connection is unaffected.
    let conn2 = connect(&uri).await;
    let ch2 = t(conn2.create_channel()).await.expect("channel");
    let mut fast = t(ch2.basic_consume(
        "bp",
        "fast",
        BasicConsumeOptions {
            no_ack: true,
            ..Default::default()
        },
        LFieldTable::default(),
    ))
    .await
    .expect("consume");
    use futures::StreamExt;
    let mut got = 0u32;
    while got < 100 {
        let d = t(fast.next()).await.expect("delivery").expect("ok");
        assert_eq!(d.data.len(), body.len());
        got += 1;
    }
    t(ch2.basic_cancel("fast", BasicCancelOptions::default()))
        .await
        .expect("cancel");
    // The slow consumer reads again and drains the queue.
    let mut seen = 0u32;
    loop {
        match tokio::time::timeout(Duration::from_secs(3), slow.frame()).await {
            Ok(Some(Frame::Method {
                method: Method::BasicDeliver(_),
                ..
            })) => seen += 1,
            Ok(Some(_)) => {}
            _ => break,
        }
    }
    let left = q(ch.clone()).await;
    assert_eq!(
        left, 0,
        "queue drained by the slow consumer once it reads (it got {seen}, fast got {got})"
    );
    // (The fast consumer may have taken a large share meanwhile.)
    assert!(seen >= 100, "slow consumer got {seen}");
}

/// The fuzz target's record format: `[kind][channel][len16][payload]`.
fn fuzz_records(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while data.len() >= 4 {
        let kind = [1u8, 2, 3, 8][usize::from(data[0] % 4)];
        let channel = u16::from(data[1] % 4);
        let len = (usize::from(data[2]) << 8 | usize::from(data[3])).min(data.len() - 4);
        out.push(kind);
        out.extend_from_slice(&channel.to_be_bytes());
        out.extend_from_slice(&(len as u32).to_be_bytes());
        out.extend_from_slice(&data[4..4 + len]);
        out.push(0xce);
        data = &data[4 + len..];
    }
    out
}

/// Inputs the `connection` fuzz target aborted on (tests/fuzz/connection-*.bin),
/// replayed: the broker must answer them and then accept a fresh connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzz_connection_inputs_replay_cleanly() {
    let (w, _) = broker(|_| {}).await;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz");
    for entry in std::fs::read_dir(&dir).expect("tests/fuzz") {
        let path = entry.expect("entry").path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_string();
        if !name.starts_with("connection-") {
            continue;
        }
        let input = std::fs::read(&path).expect("read input");
        for _ in 0..3 {
            let mut r = Raw::open(w.amqp_addr(), 0).await;
            r.send(1, wire::ChannelOpen::default().into()).await;
            assert!(
                matches!(r.method().await, Some((1, Method::ChannelOpenOk(_)))),
                "{name}"
            );
            r.sock
                .write_all(&fuzz_records(&input))
                .await
                .expect("write");
            r.send(
                0,
                wire::ConnectionClose {
                    reply_code: 200,
                    reply_text: "bye".into(),
                    class_id: 0,
                    method_id: 0,
                }
                .into(),
            )
            .await;
            // Some reply to the close (close-ok, or the broker's own close) or EOF.
            tokio::time::timeout(Duration::from_secs(5), async {
                while let Some((ch, m)) = r.method().await {
                    if ch == 0
                        && matches!(m, Method::ConnectionCloseOk(_) | Method::ConnectionClose(_))
                    {
                        break;
                    }
                }
            })
            .await
            .expect("the broker answers connection.close");
        }
    }
    // And it still serves a fresh connection.
    let mut r = Raw::open(w.amqp_addr(), 0).await;
    r.send(1, wire::ChannelOpen::default().into()).await;
    assert!(matches!(
        r.method().await,
        Some((1, Method::ChannelOpenOk(_)))
    ));
}

/// The OOM input `frame_decoder` found (tests/fuzz/frame_decoder-*.bin): with
/// no frame_max the decoder must not reserve what a header claims.
#[test]
fn fuzz_frame_decoder_oom_input() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fuzz/frame_decoder-oom-4f4148b4.bin");
    let data = std::fs::read(path).expect("input");
    let mut codec = FrameCodec::new(0);
    let mut src = BytesMut::from(&data[1..]);
    while let Ok(Some(_)) = codec.decode(&mut src) {}
    assert!(
        src.capacity() <= wire::MAX_RESERVE + 4096,
        "{}",
        src.capacity()
    );
}
