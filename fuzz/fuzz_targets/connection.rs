//! The connection state machine under arbitrary frame sequences.
//!
//! One embedded broker (`warren::start(Config::for_tests(tmp))`) is started
//! lazily on its own runtime thread. Each input: open a fresh TCP connection
//! and complete a valid handshake (this doubles as the liveness check: if the
//! broker stopped accepting or answering, the target aborts), open channel 1,
//! then send the input as a sequence of well-framed frames:
//!
//! `[kind] [channel] [len_hi] [len_lo] payload[len]`, repeated, where `kind % 4`
//! picks method / header / body / heartbeat, `channel % 4` the channel, and the
//! length is capped at what is left. Frame size and frame end are always
//! right so the input gets past the framing layer. Finally send
//! `connection.close` and read until close-ok, the broker's own close, or EOF.
//!
//! Any panic anywhere in the process (broker tasks included) aborts.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::OnceLock;
use std::time::Duration;
use tokio_util::codec::Decoder;
use warren::wire::{self, Frame, FrameCodec, Method};

static BROKER: OnceLock<SocketAddr> = OnceLock::new();

fn broker() -> SocketAddr {
    *BROKER.get_or_init(|| {
        std::panic::set_hook(Box::new(|info| {
            eprintln!("panic: {info}");
            std::process::abort();
        }));
        let dir = std::env::temp_dir().join(format!("warren-fuzz-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut config = warren::Config::for_tests(&dir);
        config.heartbeat = 0;
        config.handshake_timeout_secs = 5;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let w = warren::start(config).await.expect("broker starts");
                tx.send(w.amqp_addr()).expect("send addr");
                std::future::pending::<()>().await;
                drop(w);
            });
        });
        rx.recv().expect("broker address")
    })
}

struct Conn {
    sock: TcpStream,
    codec: FrameCodec,
    buf: BytesMut,
}

impl Conn {
    fn send(&mut self, channel: u16, m: Method) -> std::io::Result<()> {
        let mut b = BytesMut::new();
        wire::write_method(&mut b, channel, &m);
        self.sock.write_all(&b)
    }

    /// Next frame, or `None` on EOF / error / timeout.
    fn read(&mut self) -> Option<Frame> {
        loop {
            match self.codec.decode(&mut self.buf) {
                Ok(Some(f)) => return Some(f),
                Ok(None) => {}
                Err(e) => panic!("broker sent an undecodable frame: {e}"),
            }
            let mut chunk = [0u8; 16 * 1024];
            match self.sock.read(&mut chunk) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    fn expect(&mut self, what: &str, ok: impl Fn(&Method) -> bool) {
        match self.read() {
            Some(Frame::Method { method, .. }) if ok(&method) => {}
            other => panic!("broker does not answer the handshake ({what}): {other:?}"),
        }
    }
}

fn handshake() -> Conn {
    let sock = TcpStream::connect(broker()).expect("broker accepts a fresh connection");
    sock.set_read_timeout(Some(Duration::from_secs(5))).ok();
    sock.set_nodelay(true).ok();
    let mut c = Conn {
        sock,
        codec: FrameCodec::new(0),
        buf: BytesMut::new(),
    };
    c.sock.write_all(wire::PROTOCOL_HEADER).expect("write header");
    c.expect("start", |m| matches!(m, Method::ConnectionStart(_)));
    c.send(
        0,
        wire::ConnectionStartOk {
            client_properties: wire::FieldTable::new(),
            mechanism: "PLAIN".into(),
            response: bytes::Bytes::from_static(b"\0guest\0guest"),
            locale: "en_US".into(),
        }
        .into(),
    )
    .expect("write start-ok");
    c.expect("tune", |m| matches!(m, Method::ConnectionTune(_)));
    c.send(
        0,
        wire::ConnectionTuneOk {
            channel_max: 16,
            frame_max: 131_072,
            heartbeat: 0,
        }
        .into(),
    )
    .expect("write tune-ok");
    c.send(
        0,
        wire::ConnectionOpen {
            virtual_host: "/".into(),
            ..Default::default()
        }
        .into(),
    )
    .expect("write open");
    c.expect("open-ok", |m| matches!(m, Method::ConnectionOpenOk(_)));
    c.send(1, wire::ChannelOpen::default().into())
        .expect("write channel.open");
    c.expect("channel.open-ok", |m| matches!(m, Method::ChannelOpenOk(_)));
    c
}

fn frames(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + 64);
    while data.len() >= 4 {
        let kind = [1u8, 2, 3, 8][usize::from(data[0] % 4)];
        let channel = u16::from(data[1] % 4);
        let len = (usize::from(data[2]) << 8 | usize::from(data[3])).min(data.len() - 4);
        let payload = &data[4..4 + len];
        data = &data[4 + len..];
        out.push(kind);
        out.extend_from_slice(&channel.to_be_bytes());
        out.extend_from_slice(&(len as u32).to_be_bytes());
        out.extend_from_slice(payload);
        out.push(0xCE);
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let mut c = handshake();
    if c.sock.write_all(&frames(data)).is_err() {
        return;
    }
    let _ = c.send(
        0,
        wire::ConnectionClose {
            reply_code: 200,
            reply_text: "bye".into(),
            class_id: 0,
            method_id: 0,
        }
        .into(),
    );
    while let Some(f) = c.read() {
        if let Frame::Method { channel: 0, method } = f {
            match method {
                Method::ConnectionCloseOk(_) => break,
                Method::ConnectionClose(_) => {
                    let _ = c.send(0, wire::ConnectionCloseOk {}.into());
                    break;
                }
                _ => {}
            }
        }
    }
});
