//! A tiny, self-contained raw AMQP 0-9-1 frame client for wire-level tests.
//!
//! It hand-encodes only what the tests need: the protocol header, the
//! connection handshake (PLAIN), channel.open and a few methods, and can
//! decode frames, connection.start's field table and close methods.
#![allow(dead_code)]

use std::io;
use std::time::Duration;
use warren::wire::ConnectionCloseOk;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

pub const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";
pub const FRAME_METHOD: u8 = 1;
pub const FRAME_HEADER: u8 = 2;
pub const FRAME_BODY: u8 = 3;
pub const FRAME_HEARTBEAT: u8 = 8;
pub const FRAME_END: u8 = 0xCE;

const RAW_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------- encoding

pub fn put_u8(b: &mut Vec<u8>, v: u8) {
    b.push(v);
}
pub fn put_u16(b: &mut Vec<u8>, v: u16) {
    b.extend_from_slice(&v.to_be_bytes());
}
pub fn put_u32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_be_bytes());
}
pub fn put_u64(b: &mut Vec<u8>, v: u64) {
    b.extend_from_slice(&v.to_be_bytes());
}
pub fn put_shortstr(b: &mut Vec<u8>, s: &str) {
    assert!(s.len() < 256);
    b.push(s.len() as u8);
    b.extend_from_slice(s.as_bytes());
}
pub fn put_longstr(b: &mut Vec<u8>, s: &[u8]) {
    put_u32(b, s.len() as u32);
    b.extend_from_slice(s);
}
/// An empty field table.
pub fn put_empty_table(b: &mut Vec<u8>) {
    put_u32(b, 0);
}

/// Method frame payload: class id, method id, arguments.
pub fn method(class: u16, method: u16, args: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + args.len());
    put_u16(&mut b, class);
    put_u16(&mut b, method);
    b.extend_from_slice(args);
    b
}

/// A complete frame with the given frame-end octet.
pub fn frame_with_end(typ: u8, channel: u16, payload: &[u8], end: u8) -> Vec<u8> {
    let mut b = Vec::with_capacity(8 + payload.len());
    put_u8(&mut b, typ);
    put_u16(&mut b, channel);
    put_u32(&mut b, payload.len() as u32);
    b.extend_from_slice(payload);
    put_u8(&mut b, end);
    b
}

pub fn frame(typ: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
    frame_with_end(typ, channel, payload, FRAME_END)
}

/// queue.declare (50.10) arguments.
pub fn queue_declare_args(
    name: &str,
    passive: bool,
    durable: bool,
    exclusive: bool,
    auto_delete: bool,
) -> Vec<u8> {
    let mut a = vec![];
    put_u16(&mut a, 0);
    put_shortstr(&mut a, name);
    let bits =
        (passive as u8) | (durable as u8) << 1 | (exclusive as u8) << 2 | (auto_delete as u8) << 3;
    put_u8(&mut a, bits);
    put_empty_table(&mut a);
    a
}

/// basic.publish (60.40) arguments.
pub fn basic_publish_args(
    exchange: &str,
    routing_key: &str,
    mandatory: bool,
    immediate: bool,
) -> Vec<u8> {
    let mut a = vec![];
    put_u16(&mut a, 0);
    put_shortstr(&mut a, exchange);
    put_shortstr(&mut a, routing_key);
    put_u8(&mut a, (mandatory as u8) | (immediate as u8) << 1);
    a
}

/// Content header payload for class basic with no properties.
pub fn content_header(body_size: u64) -> Vec<u8> {
    let mut b = vec![];
    put_u16(&mut b, 60);
    put_u16(&mut b, 0);
    put_u64(&mut b, body_size);
    put_u16(&mut b, 0); // property flags: none
    b
}

// ---------------------------------------------------------------- decoding

/// A decoded field-table value (RabbitMQ's type letters).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Bool(bool),
    I8(i8),
    U8(u8),
    I16(i16),
    U16(u16),
    I32(i32),
    U32(u32),
    I64(i64),
    F32(f32),
    F64(f64),
    Decimal(u8, u32),
    Str(Vec<u8>),
    Array(Vec<Value>),
    Timestamp(u64),
    Table(Vec<(String, Value)>),
    Void,
    Bytes(Vec<u8>),
}

impl Value {
    pub fn as_table(&self) -> Option<&Vec<(String, Value)>> {
        if let Value::Table(t) = self {
            Some(t)
        } else {
            None
        }
    }
    pub fn as_str(&self) -> Option<String> {
        if let Value::Str(s) = self {
            Some(String::from_utf8_lossy(s).into_owned())
        } else {
            None
        }
    }
}

pub fn lookup<'a>(t: &'a [(String, Value)], key: &str) -> Option<&'a Value> {
    t.iter().find(|(k, _)| k == key).map(|(_, v)| v)
}

/// A cursor over a method payload.
pub struct Reader<'a> {
    pub buf: &'a [u8],
    pub pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    fn take(&mut self, n: usize) -> &'a [u8] {
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        s
    }
    pub fn u8(&mut self) -> u8 {
        self.take(1)[0]
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.take(2).try_into().unwrap())
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.take(4).try_into().unwrap())
    }
    pub fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.take(8).try_into().unwrap())
    }
    pub fn shortstr(&mut self) -> String {
        let n = self.u8() as usize;
        String::from_utf8_lossy(self.take(n)).into_owned()
    }
    pub fn longstr(&mut self) -> Vec<u8> {
        let n = self.u32() as usize;
        self.take(n).to_vec()
    }
    pub fn table(&mut self) -> Vec<(String, Value)> {
        let n = self.u32() as usize;
        let end = self.pos + n;
        let mut out = vec![];
        while self.pos < end {
            let k = self.shortstr();
            let v = self.value();
            out.push((k, v));
        }
        out
    }
    pub fn value(&mut self) -> Value {
        match self.u8() {
            b't' => Value::Bool(self.u8() != 0),
            b'b' => Value::I8(self.u8() as i8),
            b'B' => Value::U8(self.u8()),
            b's' => Value::I16(self.u16() as i16),
            b'u' => Value::U16(self.u16()),
            b'I' => Value::I32(self.u32() as i32),
            b'i' => Value::U32(self.u32()),
            b'l' => Value::I64(self.u64() as i64),
            b'f' => Value::F32(f32::from_bits(self.u32())),
            b'd' => Value::F64(f64::from_bits(self.u64())),
            b'D' => {
                let s = self.u8();
                Value::Decimal(s, self.u32())
            }
            b'S' => Value::Str(self.longstr()),
            b'A' => {
                let n = self.u32() as usize;
                let end = self.pos + n;
                let mut v = vec![];
                while self.pos < end {
                    v.push(self.value());
                }
                Value::Array(v)
            }
            b'T' => Value::Timestamp(self.u64()),
            b'F' => Value::Table(self.table()),
            b'V' => Value::Void,
            b'x' => Value::Bytes(self.longstr()),
            other => panic!("unknown field type {:?}", other as char),
        }
    }
}

/// One decoded frame.
#[derive(Debug, Clone)]
pub struct Frame {
    pub typ: u8,
    pub channel: u16,
    pub payload: Vec<u8>,
}

impl Frame {
    /// (class, method) for a method frame.
    pub fn method_id(&self) -> Option<(u16, u16)> {
        if self.typ != FRAME_METHOD || self.payload.len() < 4 {
            return None;
        }
        let mut r = Reader::new(&self.payload);
        Some((r.u16(), r.u16()))
    }
    /// For connection.close (10.50) / channel.close (20.40): (code, text, class, method).
    pub fn close_info(&self) -> Option<(u16, String, u16, u16)> {
        match self.method_id()? {
            id if id == id!(ConnectionClose) || id == id!(ChannelClose) => {
                let mut r = Reader::new(&self.payload[4..]);
                let code = r.u16();
                let text = r.shortstr();
                let c = r.u16();
                let m = r.u16();
                Some((code, text, c, m))
            }
            _ => None,
        }
    }
}

/// Results of the handshake.
#[derive(Debug, Clone)]
pub struct Tune {
    pub channel_max: u16,
    pub frame_max: u32,
    pub heartbeat: u16,
}

pub struct RawConn {
    pub stream: TcpStream,
    pub server_properties: Vec<(String, Value)>,
    pub mechanisms: String,
    pub tune: Option<Tune>,
}

/// Opens a TCP connection to the broker under test.
pub async fn tcp() -> TcpStream {
    let p = super::parse_uri(&super::broker_uri().await);
    let s = tokio::time::timeout(RAW_TIMEOUT, TcpStream::connect((p.host.as_str(), p.port)))
        .await
        .expect("tcp connect timeout")
        .expect("tcp connect");
    s.set_nodelay(true).ok();
    s
}

/// Reads until EOF (or error such as reset); returns the bytes received. Panics on timeout.
pub async fn read_to_eof(s: &mut TcpStream) -> Vec<u8> {
    let mut out = vec![];
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(RAW_TIMEOUT, s.read(&mut buf)).await {
            Err(_) => panic!("socket was not closed by the server (got {out:?})"),
            Ok(Ok(0)) | Ok(Err(_)) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

impl RawConn {
    /// TCP connect + protocol header + read connection.start.
    pub async fn start() -> RawConn {
        Self::start_on(tcp().await).await
    }

    /// [`RawConn::start`] on the broker at `addr`.
    pub async fn start_at(addr: std::net::SocketAddr) -> RawConn {
        let s = tokio::time::timeout(RAW_TIMEOUT, TcpStream::connect(addr))
            .await
            .expect("tcp connect timeout")
            .expect("tcp connect");
        Self::start_on(s).await
    }

    async fn start_on(mut stream: TcpStream) -> RawConn {
        stream.write_all(PROTOCOL_HEADER).await.unwrap();
        let mut c = RawConn {
            stream,
            server_properties: vec![],
            mechanisms: String::new(),
            tune: None,
        };
        let f = c.read_frame().await.expect("connection.start");
        assert_eq!(
            f.method_id(),
            Some(id!(ConnectionStart)),
            "expected connection.start, got {f:?}"
        );
        let mut r = Reader::new(&f.payload[4..]);
        assert_eq!((r.u8(), r.u8()), (0, 9), "version-major/minor");
        c.server_properties = r.table();
        c.mechanisms = String::from_utf8_lossy(&r.longstr()).into_owned();
        c
    }

    /// Full handshake: start-ok PLAIN, tune-ok (heartbeat 0), open vhost.
    pub async fn open() -> RawConn {
        Self::open_with_heartbeat(0).await
    }

    /// Full handshake, answering tune with the given heartbeat (seconds).
    pub async fn open_with_heartbeat(heartbeat: u16) -> RawConn {
        let p = super::parse_uri(&super::broker_uri().await);
        let mut c = Self::start().await;
        // connection.start-ok
        let mut a = vec![];
        put_empty_table(&mut a);
        put_shortstr(&mut a, "PLAIN");
        let resp = format!("\0{}\0{}", p.user, p.pass);
        put_longstr(&mut a, resp.as_bytes());
        put_shortstr(&mut a, "en_US");
        c.send_method(0, 10, 11, &a).await;
        // connection.tune
        let f = c.read_frame().await.expect("connection.tune");
        assert_eq!(
            f.method_id(),
            Some(id!(ConnectionTune)),
            "expected connection.tune, got {f:?}"
        );
        let mut r = Reader::new(&f.payload[4..]);
        let tune = Tune {
            channel_max: r.u16(),
            frame_max: r.u32(),
            heartbeat: r.u16(),
        };
        // connection.tune-ok: accept channel-max/frame-max, our heartbeat
        let mut a = vec![];
        put_u16(&mut a, tune.channel_max);
        put_u32(&mut a, tune.frame_max);
        put_u16(&mut a, heartbeat);
        c.send_method(0, 10, 31, &a).await;
        c.tune = Some(tune);
        // connection.open
        let mut a = vec![];
        put_shortstr(&mut a, &p.vhost);
        put_shortstr(&mut a, "");
        put_u8(&mut a, 0);
        c.send_method(0, 10, 40, &a).await;
        let f = c.read_frame().await.expect("connection.open-ok");
        assert_eq!(
            f.method_id(),
            Some(id!(ConnectionOpenOk)),
            "expected connection.open-ok, got {f:?}"
        );
        c
    }

    /// channel.open on `ch`, waits for open-ok.
    pub async fn open_channel(&mut self, ch: u16) {
        let mut a = vec![];
        put_shortstr(&mut a, "");
        self.send_method(ch, 20, 10, &a).await;
        let f = self.read_frame().await.expect("channel.open-ok");
        assert_eq!(
            f.method_id(),
            Some(id!(ChannelOpenOk)),
            "expected channel.open-ok, got {f:?}"
        );
        assert_eq!(f.channel, ch);
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.expect("write");
        self.stream.flush().await.ok();
    }

    pub async fn send_frame(&mut self, typ: u8, channel: u16, payload: &[u8]) {
        self.send_raw(&frame(typ, channel, payload)).await;
    }

    pub async fn send_method(&mut self, channel: u16, class: u16, meth: u16, args: &[u8]) {
        self.send_frame(FRAME_METHOD, channel, &method(class, meth, args))
            .await;
    }

    /// Reads one frame (skipping heartbeats). Err on EOF/IO error; panics on timeout.
    pub async fn read_frame(&mut self) -> io::Result<Frame> {
        loop {
            let f = self.read_any_frame().await?;
            if f.typ != FRAME_HEARTBEAT {
                return Ok(f);
            }
        }
    }

    /// Reads one frame, heartbeats included. Err on EOF/IO error; panics on timeout.
    pub async fn read_any_frame(&mut self) -> io::Result<Frame> {
        {
            let mut hdr = [0u8; 7];
            tokio::time::timeout(RAW_TIMEOUT, self.stream.read_exact(&mut hdr))
                .await
                .expect("timeout reading frame header")?;
            let typ = hdr[0];
            let channel = u16::from_be_bytes([hdr[1], hdr[2]]);
            let size = u32::from_be_bytes([hdr[3], hdr[4], hdr[5], hdr[6]]) as usize;
            let mut payload = vec![0u8; size + 1];
            tokio::time::timeout(RAW_TIMEOUT, self.stream.read_exact(&mut payload))
                .await
                .expect("timeout reading frame payload")?;
            let end = payload.pop().unwrap();
            assert_eq!(end, FRAME_END, "server sent a bad frame-end");
            Ok(Frame {
                typ,
                channel,
                payload,
            })
        }
    }

    /// Reads frames until a connection.close or channel.close arrives; returns it.
    pub async fn expect_close(&mut self) -> Frame {
        loop {
            let f = self
                .read_frame()
                .await
                .expect("socket closed before a close method");
            if f.close_info().is_some() {
                return f;
            }
        }
    }

    /// Expects connection.close with `code`; then sends close-ok and expects EOF.
    pub async fn expect_connection_close(&mut self, code: u16) -> String {
        let f = self.expect_close().await;
        assert_eq!(
            f.method_id(),
            Some(id!(ConnectionClose)),
            "expected connection.close, got {f:?}"
        );
        assert_eq!(f.channel, 0);
        let (c, text, _, _) = f.close_info().unwrap();
        assert_eq!(c, code, "connection.close reply code (text: {text})");
        // Reply with close-ok (the server may already have closed the socket).
        let _ = self
            .stream
            .write_all(&frame(
                FRAME_METHOD,
                0,
                &method(
                    ConnectionCloseOk::CLASS_ID,
                    ConnectionCloseOk::METHOD_ID,
                    &[],
                ),
            ))
            .await;
        let rest = read_to_eof(&mut self.stream).await;
        assert!(
            rest.is_empty() || rest.len() < 64,
            "unexpected trailing data {rest:?}"
        );
        text
    }

    /// Expects connection.close with `code`, then EOF *without* us sending close-ok
    /// (what RabbitMQ does after a fatal framing error).
    pub async fn expect_connection_close_then_eof(&mut self, code: u16) -> String {
        let f = self.expect_close().await;
        assert_eq!(
            f.method_id(),
            Some(id!(ConnectionClose)),
            "expected connection.close, got {f:?}"
        );
        let (c, text, _, _) = f.close_info().unwrap();
        assert_eq!(c, code, "connection.close reply code (text: {text})");
        read_to_eof(&mut self.stream).await;
        text
    }
}
