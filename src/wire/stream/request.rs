//! What a stream client sends: [`Request`], parsed from one frame with nom
//! (all of the frame must be consumed) and encoded back (for clients and
//! tests). Published messages and SASL data are slices of the frame's
//! [`Bytes`], not copies.

use bytes::{BufMut, Bytes, BytesMut};
use nom::bytes::complete::take;
use nom::IResult;

use super::{key, supported, ParseFailure};

/// Where a subscription (or any stream reader) starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OffsetSpec {
    /// The oldest chunk still kept.
    First,
    /// The last chunk written (its first offset).
    Last,
    /// What is written from now on.
    Next,
    /// This offset (the first kept one if it is older; the next one if it is
    /// not written yet).
    Offset(u64),
    /// The first chunk whose timestamp (ms since the epoch) is at or after this.
    Timestamp(i64),
}

/// One entry of a publish frame: a message, or a sub-entry batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    pub publishing_id: u64,
    /// Version 2 only.
    pub filter_value: Option<String>,
    /// The entry as the client encoded it: normally an AMQP 1.0 message; for
    /// a sub-entry batch, its records as sent (maybe compressed).
    pub data: Bytes,
    /// Set for a sub-entry batch (version 1 only): several messages under
    /// one publishing id, stored as one entry and sent to consumers as is.
    pub sub_batch: Option<SubBatch>,
}

/// The header of a sub-entry batch (`1:1, compression:3, reserved:4,
/// records:16, uncompressed length:32`, then the data's length and bytes).
/// The records inside are `size:32, bytes` each, compressed as a whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubBatch {
    /// 0 none, 1 gzip, 2 snappy, 3 lz4, 4 zstd (as the clients number them).
    pub compression: u8,
    pub records: u16,
    pub uncompressed_len: u32,
}

/// Compression types of sub-entry batches (as the clients number them).
pub mod compression {
    pub const NONE: u8 = 0;
    pub const GZIP: u8 = 1;
    pub const SNAPPY: u8 = 2;
    pub const LZ4: u8 = 3;
    pub const ZSTD: u8 = 4;
}

/// Largest uncompressed size a sub-entry batch may declare (RabbitMQ's
/// default limit, 64 MiB).
pub const MAX_SUB_BATCH_UNCOMPRESSED: u32 = 64 << 20;

impl SubBatch {
    /// Whether RabbitMQ would store this batch with `data` (a well-formed
    /// frame can still carry one it refuses with a publish error): a known
    /// compression type (0 to 4), at least one record, at most
    /// [`MAX_SUB_BATCH_UNCOMPRESSED`] bytes uncompressed, room for every
    /// record's 4-byte size, and data unless uncompressed and empty.
    /// Uncompressed batches must also be exactly `records` well-formed
    /// records of `uncompressed_len` bytes (readers split them).
    pub fn is_valid(&self, data: &[u8]) -> bool {
        if self.compression > compression::ZSTD
            || self.records == 0
            || self.uncompressed_len > MAX_SUB_BATCH_UNCOMPRESSED
            || u64::from(self.records) * 4 > u64::from(self.uncompressed_len)
            || data.is_empty()
        {
            return false;
        }
        if self.compression != compression::NONE {
            return true;
        }
        if data.len() != self.uncompressed_len as usize {
            return false;
        }
        let mut rest = data;
        for _ in 0..self.records {
            let Some((size, tail)) = rest.split_first_chunk::<4>() else {
                return false;
            };
            let size = u32::from_be_bytes(*size);
            if size & 0x8000_0000 != 0 || tail.len() < size as usize {
                return false;
            }
            rest = &tail[size as usize..];
        }
        rest.is_empty()
    }
}

/// A frame a client sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    DeclarePublisher {
        correlation_id: u32,
        publisher_id: u8,
        reference: Option<String>,
        stream: String,
    },
    Publish {
        version: u16,
        publisher_id: u8,
        messages: Vec<Published>,
    },
    QueryPublisherSequence {
        correlation_id: u32,
        reference: String,
        stream: String,
    },
    DeletePublisher {
        correlation_id: u32,
        publisher_id: u8,
    },
    Subscribe {
        correlation_id: u32,
        subscription_id: u8,
        stream: String,
        offset: OffsetSpec,
        credit: u16,
        properties: Vec<(String, String)>,
    },
    Credit {
        subscription_id: u8,
        credit: u16,
    },
    StoreOffset {
        reference: String,
        stream: String,
        offset: u64,
    },
    QueryOffset {
        correlation_id: u32,
        reference: String,
        stream: String,
    },
    Unsubscribe {
        correlation_id: u32,
        subscription_id: u8,
    },
    Create {
        correlation_id: u32,
        stream: String,
        arguments: Vec<(String, String)>,
    },
    Delete {
        correlation_id: u32,
        stream: String,
    },
    Metadata {
        correlation_id: u32,
        streams: Vec<String>,
    },
    PeerProperties {
        correlation_id: u32,
        properties: Vec<(String, String)>,
    },
    SaslHandshake {
        correlation_id: u32,
    },
    SaslAuthenticate {
        correlation_id: u32,
        mechanism: String,
        data: Option<Bytes>,
    },
    /// The client's answer to the server's tune.
    Tune {
        frame_max: u32,
        heartbeat: u32,
    },
    Open {
        correlation_id: u32,
        vhost: String,
    },
    Close {
        correlation_id: u32,
        code: u16,
        reason: String,
    },
    /// The client's answer to a close the server sent.
    CloseResponse {
        correlation_id: u32,
        code: u16,
    },
    Heartbeat,
    Route {
        correlation_id: u32,
        routing_key: String,
        super_stream: String,
    },
    Partitions {
        correlation_id: u32,
        super_stream: String,
    },
    /// The client's answer to a consumer update (single active consumer).
    ConsumerUpdateResponse {
        correlation_id: u32,
        code: u16,
        offset: OffsetSpec,
    },
    ExchangeCommandVersions {
        correlation_id: u32,
        commands: Vec<(u16, u16, u16)>,
    },
    StreamStats {
        correlation_id: u32,
        stream: String,
    },
    CreateSuperStream {
        correlation_id: u32,
        name: String,
        partitions: Vec<String>,
        binding_keys: Vec<String>,
        arguments: Vec<(String, String)>,
    },
    DeleteSuperStream {
        correlation_id: u32,
        name: String,
    },
}

type Res<'a, T> = IResult<&'a [u8], T, nom::error::Error<&'a [u8]>>;

// The number parsers at this module's error type.
macro_rules! numbers {
    ($($name:ident: $t:ty),*) => {$(
        fn $name(i: &[u8]) -> Res<'_, $t> {
            nom::number::complete::$name(i)
        }
    )*};
}
numbers!(be_u8: u8, be_u16: u16, be_u32: u32, be_u64: u64, be_i16: i16, be_i32: i32, be_i64: i64);

/// A nullable string (`int16` length, -1 for null).
fn nstring(i: &[u8]) -> Res<'_, Option<String>> {
    let (i, len) = be_i16(i)?;
    if len < 0 {
        return Ok((i, None));
    }
    let (i, s) = take(len as usize)(i)?;
    match std::str::from_utf8(s) {
        Ok(s) => Ok((i, Some(s.to_owned()))),
        Err(_) => Err(nom::Err::Error(nom::error::Error::new(
            i,
            nom::error::ErrorKind::Verify,
        ))),
    }
}

/// A string that must not be null.
fn string(i: &[u8]) -> Res<'_, String> {
    let (i, s) = nstring(i)?;
    match s {
        Some(s) => Ok((i, s)),
        None => Err(nom::Err::Error(nom::error::Error::new(
            i,
            nom::error::ErrorKind::Verify,
        ))),
    }
}

/// An array: `int32` count, then `count` items; at least `min_item` bytes
/// each, so a hostile count cannot make us reserve much.
fn array<'a, T>(
    i: &'a [u8],
    min_item: usize,
    mut item: impl FnMut(&'a [u8]) -> Res<'a, T>,
) -> Res<'a, Vec<T>> {
    let (mut i, n) = be_i32(i)?;
    let n = n.max(0) as usize;
    let mut out = Vec::with_capacity(n.min(i.len() / min_item.max(1)));
    for _ in 0..n {
        let (rest, v) = item(i)?;
        i = rest;
        out.push(v);
    }
    Ok((i, out))
}

fn pairs(i: &[u8]) -> Res<'_, Vec<(String, String)>> {
    array(i, 4, |i| {
        let (i, k) = string(i)?;
        let (i, v) = string(i)?;
        Ok((i, (k, v)))
    })
}

fn offset_spec(i: &[u8]) -> Res<'_, OffsetSpec> {
    let (i, kind) = be_u16(i)?;
    match kind {
        1 => Ok((i, OffsetSpec::First)),
        2 => Ok((i, OffsetSpec::Last)),
        3 => Ok((i, OffsetSpec::Next)),
        4 => be_u64(i).map(|(i, o)| (i, OffsetSpec::Offset(o))),
        5 => be_i64(i).map(|(i, t)| (i, OffsetSpec::Timestamp(t))),
        _ => Err(nom::Err::Error(nom::error::Error::new(
            i,
            nom::error::ErrorKind::Switch,
        ))),
    }
}

/// Parse one whole frame (size field included).
pub fn parse(frame: &Bytes) -> Result<Request, ParseFailure> {
    let body = frame.get(4..).unwrap_or_default();
    let (k, version) = match body {
        [a, b, c, d, ..] => (u16::from_be_bytes([*a, *b]), u16::from_be_bytes([*c, *d])),
        _ => {
            return Err(ParseFailure::Malformed {
                key: 0,
                detail: "frame too short".into(),
            })
        }
    };
    let content = &body[4..];
    let known = super::COMMAND_VERSIONS
        .iter()
        .any(|&(kk, ..)| kk == k & !key::RESPONSE);
    if !known {
        return Err(ParseFailure::UnknownKey { key: k, version });
    }
    // Responses a client sends carry their request's version rules.
    if !supported(k & !key::RESPONSE, version) {
        return Err(ParseFailure::UnsupportedVersion { key: k, version });
    }
    let malformed = |detail: &str| ParseFailure::Malformed {
        key: k,
        detail: detail.to_owned(),
    };
    let result = parse_content(k, version, content, frame);
    match result {
        Ok(([], r)) => Ok(r),
        Ok((_, _)) => Err(malformed("trailing bytes")),
        Err(ParseError::Unknown) => Err(ParseFailure::UnknownKey { key: k, version }),
        Err(ParseError::Nom) => Err(malformed("truncated or invalid field")),
    }
}

enum ParseError {
    Unknown,
    Nom,
}

impl<'a> From<nom::Err<nom::error::Error<&'a [u8]>>> for ParseError {
    fn from(_: nom::Err<nom::error::Error<&'a [u8]>>) -> Self {
        ParseError::Nom
    }
}

fn parse_content<'a>(
    k: u16,
    version: u16,
    i: &'a [u8],
    frame: &Bytes,
) -> Result<(&'a [u8], Request), ParseError> {
    Ok(match k {
        key::DECLARE_PUBLISHER => {
            let (i, correlation_id) = be_u32(i)?;
            let (i, publisher_id) = be_u8(i)?;
            let (i, reference) = nstring(i)?;
            let (i, stream) = string(i)?;
            let reference = reference.filter(|r| !r.is_empty());
            (
                i,
                Request::DeclarePublisher {
                    correlation_id,
                    publisher_id,
                    reference,
                    stream,
                },
            )
        }
        key::PUBLISH => {
            let (i, publisher_id) = be_u8(i)?;
            let min = if version == 2 { 14 } else { 12 };
            let (i, messages) = array(i, min, |i| {
                let (i, publishing_id) = be_u64(i)?;
                let (i, filter_value) = if version == 2 { nstring(i)? } else { (i, None) };
                let (i, sub_batch, len) = match i.first() {
                    Some(b) if b & 0x80 != 0 && version == 1 => {
                        // A sub-entry batch: `1:1, compression:3,
                        // reserved:4, records:16, uncompressed length:32,
                        // length:32, data`.
                        let (i, kind) = be_u8(i)?;
                        let (i, records) = be_u16(i)?;
                        let (i, uncompressed_len) = be_u32(i)?;
                        let (i, len) = be_u32(i)?;
                        let sb = SubBatch {
                            compression: (kind >> 4) & 0x07,
                            records,
                            uncompressed_len,
                        };
                        (i, Some(sb), len)
                    }
                    Some(b) if b & 0x80 != 0 => {
                        // Publish v2 (filtering) carries no sub-entry batches.
                        return Err(nom::Err::Error(nom::error::Error::new(
                            i,
                            nom::error::ErrorKind::Verify,
                        )));
                    }
                    _ => {
                        let (i, len) = be_u32(i)?;
                        (i, None, len)
                    }
                };
                let (i, data) = take(len as usize)(i)?;
                Ok((
                    i,
                    Published {
                        publishing_id,
                        filter_value,
                        data: frame.slice_ref(data),
                        sub_batch,
                    },
                ))
            })?;
            (
                i,
                Request::Publish {
                    version,
                    publisher_id,
                    messages,
                },
            )
        }
        key::QUERY_PUBLISHER_SEQUENCE => {
            let (i, correlation_id) = be_u32(i)?;
            let (i, reference) = string(i)?;
            let (i, stream) = string(i)?;
            (
                i,
                Request::QueryPublisherSequence {
                    correlation_id,
                    reference,
                    stream,
                },
            )
        }
        key::DELETE_PUBLISHER => {
            let (i, correlation_id) = be_u32(i)?;
            let (i, publisher_id) = be_u8(i)?;
            (
                i,
                Request::DeletePublisher {
                    correlation_id,
                    publisher_id,
                },
            )
        }
        key::SUBSCRIBE => {
            let (i, correlation_id) = be_u32(i)?;
            let (i, subscription_id) = be_u8(i)?;
            let (i, stream) = string(i)?;
            let (i, offset) = offset_spec(i)?;
            let (i, credit) = be_u16(i)?;
            // Properties are optional (older clients omit the array).
            let (i, properties) = if i.is_empty() {
                (i, Vec::new())
            } else {
                pairs(i)?
            };
            (
                i,
                Request::Subscribe {
                    correlation_id,
                    subscription_id,
                    stream,
                    offset,
                    credit,
                    properties,
                },
            )
        }
        key::CREDIT => {
            let (i, subscription_id) = be_u8(i)?;
            let (i, credit) = be_u16(i)?;
            (
                i,
                Request::Credit {
                    subscription_id,
                    credit,
                },
            )
        }
        key::STORE_OFFSET => {
            let (i, reference) = string(i)?;
            let (i, stream) = string(i)?;
            let (i, offset) = be_u64(i)?;
            (
                i,
                Request::StoreOffset {
                    reference,
                    stream,
                    offset,
                },
            )
        }
        key::QUERY_OFFSET => {
            let (i, correlation_id) = be_u32(i)?;
            let (i, reference) = string(i)?;
            let (i, stream) = string(i)?;
            (
                i,
                Request::QueryOffset {
                    correlation_id,
                    reference,
                    stream,
                },
            )
        }
        key::UNSUBSCRIBE => {
            let (i, correlation_id) = be_u32(i)?;
            let (i, subscription_id) = be_u8(i)?;
            (
                i,
                Request::Unsubscribe {
                    correlation_id,
                    subscription_id,
                },
            )
        }
        key::CREATE => {
            let (i, correlation_id) = be_u32(i)?;
            let (i, stream) = string(i)?;
            let (i, arguments) = pairs(i)?;
            (
                i,
                Request::Create {
                    correlation_id,
                    stream,
                    arguments,
                },
            )
        }
        key::DELETE => {
            let (i, correlation_id) = be_u32(i)?;
            let (i, stream) = string(i)?;
            (
                i,
                Request::Delete {
                    correlation_id,
                    stream,
                },
            )
        }
        key::METADATA => {
            let (i, correlation_id) = be_u32(i)?;
            let (i, streams) = array(i, 2, string)?;
            (
                i,
                Request::Metadata {
                    correlation_id,
                    streams,
                },
            )
        }
        key::PEER_PROPERTIES => {
            let (i, correlation_id) = be_u32(i)?;
            let (i, properties) = pairs(i)?;
            (
                i,
                Request::PeerProperties {
                    correlation_id,
                    properties,
                },
            )
        }
        key::SASL_HANDSHAKE => {
            let (i, correlation_id) = be_u32(i)?;
            // Some clients add a mechanism string the server ignores.
            let i: &[u8] = if i.is_empty() { i } else { nstring(i)?.0 };
            (i, Request::SaslHandshake { correlation_id })
        }
        key::SASL_AUTHENTICATE => {
            let (i, correlation_id) = be_u32(i)?;
            let (i, mechanism) = string(i)?;
            let (i, len) = be_i32(i)?;
            let (i, data) = if len < 0 {
                (i, None)
            } else {
                let (i, d) = take(len as usize)(i)?;
                (i, Some(frame.slice_ref(d)))
            };
            (
                i,
                Request::SaslAuthenticate {
                    correlation_id,
                    mechanism,
                    data,
                },
            )
        }
        key::TUNE => {
            let (i, frame_max) = be_u32(i)?;
            let (i, heartbeat) = be_u32(i)?;
            (
                i,
                Request::Tune {
                    frame_max,
                    heartbeat,
                },
            )
        }
        key::OPEN => {
            let (i, correlation_id) = be_u32(i)?;
            let (i, vhost) = string(i)?;
            (
                i,
                Request::Open {
                    correlation_id,
                    vhost,
                },
            )
        }
        key::CLOSE => {
            let (i, correlation_id) = be_u32(i)?;
            let (i, code) = be_u16(i)?;
            let (i, reason) = nstring(i)?;
            (
                i,
                Request::Close {
                    correlation_id,
                    code,
                    reason: reason.unwrap_or_default(),
                },
            )
        }
        k if k == key::CLOSE | key::RESPONSE => {
            let (i, correlation_id) = be_u32(i)?;
            let (i, code) = be_u16(i)?;
            (
                i,
                Request::CloseResponse {
                    correlation_id,
                    code,
                },
            )
        }
        key::HEARTBEAT => (i, Request::Heartbeat),
        key::ROUTE => {
            let (i, correlation_id) = be_u32(i)?;
            let (i, routing_key) = string(i)?;
            let (i, super_stream) = string(i)?;
            (
                i,
                Request::Route {
                    correlation_id,
                    routing_key,
                    super_stream,
                },
            )
        }
        key::PARTITIONS => {
            let (i, correlation_id) = be_u32(i)?;
            let (i, super_stream) = string(i)?;
            (
                i,
                Request::Partitions {
                    correlation_id,
                    super_stream,
                },
            )
        }
        k if k == key::CONSUMER_UPDATE | key::RESPONSE => {
            let (i, correlation_id) = be_u32(i)?;
            let (i, code) = be_u16(i)?;
            let (i, offset) = offset_spec(i)?;
            // `first`, `last` and `next` carry no value, but clients (rstream)
            // send one anyway, which RabbitMQ ignores: so do we.
            let i = match (offset, i.len()) {
                (OffsetSpec::First | OffsetSpec::Last | OffsetSpec::Next, 8) => &i[8..],
                _ => i,
            };
            (
                i,
                Request::ConsumerUpdateResponse {
                    correlation_id,
                    code,
                    offset,
                },
            )
        }
        key::EXCHANGE_COMMAND_VERSIONS => {
            let (i, correlation_id) = be_u32(i)?;
            let (i, commands) = array(i, 6, |i| {
                let (i, k) = be_u16(i)?;
                let (i, lo) = be_u16(i)?;
                let (i, hi) = be_u16(i)?;
                Ok((i, (k, lo, hi)))
            })?;
            (
                i,
                Request::ExchangeCommandVersions {
                    correlation_id,
                    commands,
                },
            )
        }
        key::STREAM_STATS => {
            let (i, correlation_id) = be_u32(i)?;
            let (i, stream) = string(i)?;
            (
                i,
                Request::StreamStats {
                    correlation_id,
                    stream,
                },
            )
        }
        key::CREATE_SUPER_STREAM => {
            let (i, correlation_id) = be_u32(i)?;
            let (i, name) = string(i)?;
            let (i, partitions) = array(i, 2, string)?;
            let (i, binding_keys) = array(i, 2, string)?;
            let (i, arguments) = pairs(i)?;
            (
                i,
                Request::CreateSuperStream {
                    correlation_id,
                    name,
                    partitions,
                    binding_keys,
                    arguments,
                },
            )
        }
        key::DELETE_SUPER_STREAM => {
            let (i, correlation_id) = be_u32(i)?;
            let (i, name) = string(i)?;
            (
                i,
                Request::DeleteSuperStream {
                    correlation_id,
                    name,
                },
            )
        }
        // Server-to-client commands and other responses are not for us.
        _ => return Err(ParseError::Unknown),
    })
}

// ---- encoding (clients, tests) ----

pub(crate) fn put_string(buf: &mut BytesMut, s: &str) {
    buf.put_i16(s.len().min(i16::MAX as usize) as i16);
    buf.put_slice(&s.as_bytes()[..s.len().min(i16::MAX as usize)]);
}

pub(crate) fn put_nstring(buf: &mut BytesMut, s: Option<&str>) {
    match s {
        Some(s) => put_string(buf, s),
        None => buf.put_i16(-1),
    }
}

pub(crate) fn put_pairs(buf: &mut BytesMut, pairs: &[(String, String)]) {
    buf.put_i32(pairs.len() as i32);
    for (k, v) in pairs {
        put_string(buf, k);
        put_string(buf, v);
    }
}

pub(crate) fn put_strings(buf: &mut BytesMut, items: &[String]) {
    buf.put_i32(items.len() as i32);
    for s in items {
        put_string(buf, s);
    }
}

fn put_offset_spec(buf: &mut BytesMut, o: &OffsetSpec) {
    match *o {
        OffsetSpec::First => buf.put_u16(1),
        OffsetSpec::Last => buf.put_u16(2),
        OffsetSpec::Next => buf.put_u16(3),
        OffsetSpec::Offset(x) => {
            buf.put_u16(4);
            buf.put_u64(x);
        }
        OffsetSpec::Timestamp(t) => {
            buf.put_u16(5);
            buf.put_i64(t);
        }
    }
}

/// Write a frame: the size is patched in once `content` has written.
pub(crate) fn frame(buf: &mut BytesMut, k: u16, version: u16, content: impl FnOnce(&mut BytesMut)) {
    let at = buf.len();
    buf.put_u32(0);
    buf.put_u16(k);
    buf.put_u16(version);
    content(buf);
    let size = (buf.len() - at - 4) as u32;
    buf[at..at + 4].copy_from_slice(&size.to_be_bytes());
}

impl Request {
    /// Encode as a whole frame.
    pub fn encode(&self, buf: &mut BytesMut) {
        match self {
            Request::DeclarePublisher {
                correlation_id,
                publisher_id,
                reference,
                stream,
            } => frame(buf, key::DECLARE_PUBLISHER, 1, |b| {
                b.put_u32(*correlation_id);
                b.put_u8(*publisher_id);
                put_nstring(b, reference.as_deref());
                put_string(b, stream);
            }),
            Request::Publish {
                version,
                publisher_id,
                messages,
            } => frame(buf, key::PUBLISH, *version, |b| {
                b.put_u8(*publisher_id);
                b.put_i32(messages.len() as i32);
                for m in messages {
                    b.put_u64(m.publishing_id);
                    if *version == 2 {
                        put_nstring(b, m.filter_value.as_deref());
                    }
                    match m.sub_batch {
                        None => b.put_u32(m.data.len() as u32 & 0x7fff_ffff),
                        Some(sb) => {
                            b.put_u8(0x80 | (sb.compression & 0x07) << 4);
                            b.put_u16(sb.records);
                            b.put_u32(sb.uncompressed_len);
                            b.put_u32(m.data.len() as u32);
                        }
                    }
                    b.put_slice(&m.data);
                }
            }),
            Request::QueryPublisherSequence {
                correlation_id,
                reference,
                stream,
            } => frame(buf, key::QUERY_PUBLISHER_SEQUENCE, 1, |b| {
                b.put_u32(*correlation_id);
                put_string(b, reference);
                put_string(b, stream);
            }),
            Request::DeletePublisher {
                correlation_id,
                publisher_id,
            } => frame(buf, key::DELETE_PUBLISHER, 1, |b| {
                b.put_u32(*correlation_id);
                b.put_u8(*publisher_id);
            }),
            Request::Subscribe {
                correlation_id,
                subscription_id,
                stream,
                offset,
                credit,
                properties,
            } => frame(buf, key::SUBSCRIBE, 1, |b| {
                b.put_u32(*correlation_id);
                b.put_u8(*subscription_id);
                put_string(b, stream);
                put_offset_spec(b, offset);
                b.put_u16(*credit);
                put_pairs(b, properties);
            }),
            Request::Credit {
                subscription_id,
                credit,
            } => frame(buf, key::CREDIT, 1, |b| {
                b.put_u8(*subscription_id);
                b.put_u16(*credit);
            }),
            Request::StoreOffset {
                reference,
                stream,
                offset,
            } => frame(buf, key::STORE_OFFSET, 1, |b| {
                put_string(b, reference);
                put_string(b, stream);
                b.put_u64(*offset);
            }),
            Request::QueryOffset {
                correlation_id,
                reference,
                stream,
            } => frame(buf, key::QUERY_OFFSET, 1, |b| {
                b.put_u32(*correlation_id);
                put_string(b, reference);
                put_string(b, stream);
            }),
            Request::Unsubscribe {
                correlation_id,
                subscription_id,
            } => frame(buf, key::UNSUBSCRIBE, 1, |b| {
                b.put_u32(*correlation_id);
                b.put_u8(*subscription_id);
            }),
            Request::Create {
                correlation_id,
                stream,
                arguments,
            } => frame(buf, key::CREATE, 1, |b| {
                b.put_u32(*correlation_id);
                put_string(b, stream);
                put_pairs(b, arguments);
            }),
            Request::Delete {
                correlation_id,
                stream,
            } => frame(buf, key::DELETE, 1, |b| {
                b.put_u32(*correlation_id);
                put_string(b, stream);
            }),
            Request::Metadata {
                correlation_id,
                streams,
            } => frame(buf, key::METADATA, 1, |b| {
                b.put_u32(*correlation_id);
                put_strings(b, streams);
            }),
            Request::PeerProperties {
                correlation_id,
                properties,
            } => frame(buf, key::PEER_PROPERTIES, 1, |b| {
                b.put_u32(*correlation_id);
                put_pairs(b, properties);
            }),
            Request::SaslHandshake { correlation_id } => frame(buf, key::SASL_HANDSHAKE, 1, |b| {
                b.put_u32(*correlation_id);
            }),
            Request::SaslAuthenticate {
                correlation_id,
                mechanism,
                data,
            } => frame(buf, key::SASL_AUTHENTICATE, 1, |b| {
                b.put_u32(*correlation_id);
                put_string(b, mechanism);
                match data {
                    Some(d) => {
                        b.put_i32(d.len() as i32);
                        b.put_slice(d);
                    }
                    None => b.put_i32(-1),
                }
            }),
            Request::Tune {
                frame_max,
                heartbeat,
            } => frame(buf, key::TUNE, 1, |b| {
                b.put_u32(*frame_max);
                b.put_u32(*heartbeat);
            }),
            Request::Open {
                correlation_id,
                vhost,
            } => frame(buf, key::OPEN, 1, |b| {
                b.put_u32(*correlation_id);
                put_string(b, vhost);
            }),
            Request::Close {
                correlation_id,
                code,
                reason,
            } => frame(buf, key::CLOSE, 1, |b| {
                b.put_u32(*correlation_id);
                b.put_u16(*code);
                put_string(b, reason);
            }),
            Request::CloseResponse {
                correlation_id,
                code,
            } => frame(buf, key::CLOSE | key::RESPONSE, 1, |b| {
                b.put_u32(*correlation_id);
                b.put_u16(*code);
            }),
            Request::Heartbeat => frame(buf, key::HEARTBEAT, 1, |_| {}),
            Request::Route {
                correlation_id,
                routing_key,
                super_stream,
            } => frame(buf, key::ROUTE, 1, |b| {
                b.put_u32(*correlation_id);
                put_string(b, routing_key);
                put_string(b, super_stream);
            }),
            Request::Partitions {
                correlation_id,
                super_stream,
            } => frame(buf, key::PARTITIONS, 1, |b| {
                b.put_u32(*correlation_id);
                put_string(b, super_stream);
            }),
            Request::ConsumerUpdateResponse {
                correlation_id,
                code,
                offset,
            } => frame(buf, key::CONSUMER_UPDATE | key::RESPONSE, 1, |b| {
                b.put_u32(*correlation_id);
                b.put_u16(*code);
                put_offset_spec(b, offset);
            }),
            Request::ExchangeCommandVersions {
                correlation_id,
                commands,
            } => frame(buf, key::EXCHANGE_COMMAND_VERSIONS, 1, |b| {
                b.put_u32(*correlation_id);
                b.put_i32(commands.len() as i32);
                for (k, lo, hi) in commands {
                    b.put_u16(*k);
                    b.put_u16(*lo);
                    b.put_u16(*hi);
                }
            }),
            Request::StreamStats {
                correlation_id,
                stream,
            } => frame(buf, key::STREAM_STATS, 1, |b| {
                b.put_u32(*correlation_id);
                put_string(b, stream);
            }),
            Request::CreateSuperStream {
                correlation_id,
                name,
                partitions,
                binding_keys,
                arguments,
            } => frame(buf, key::CREATE_SUPER_STREAM, 1, |b| {
                b.put_u32(*correlation_id);
                put_string(b, name);
                put_strings(b, partitions);
                put_strings(b, binding_keys);
                put_pairs(b, arguments);
            }),
            Request::DeleteSuperStream {
                correlation_id,
                name,
            } => frame(buf, key::DELETE_SUPER_STREAM, 1, |b| {
                b.put_u32(*correlation_id);
                put_string(b, name);
            }),
        }
    }

    /// Encode to a fresh frame.
    pub fn to_frame(&self) -> Bytes {
        let mut b = BytesMut::new();
        self.encode(&mut b);
        b.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::stream::check_frame;

    fn all() -> Vec<Request> {
        let s = |x: &str| x.to_string();
        vec![
            Request::DeclarePublisher {
                correlation_id: 1,
                publisher_id: 2,
                reference: Some(s("ref")),
                stream: s("st"),
            },
            Request::DeclarePublisher {
                correlation_id: 1,
                publisher_id: 2,
                reference: None,
                stream: s("st"),
            },
            Request::Publish {
                version: 1,
                publisher_id: 3,
                messages: vec![
                    Published {
                        publishing_id: 7,
                        filter_value: None,
                        data: Bytes::from_static(b"abc"),
                        sub_batch: None,
                    },
                    Published {
                        publishing_id: 8,
                        filter_value: None,
                        data: Bytes::new(),
                        sub_batch: None,
                    },
                    Published {
                        publishing_id: 9,
                        filter_value: None,
                        data: Bytes::from_static(b"gz"),
                        sub_batch: Some(SubBatch {
                            compression: compression::GZIP,
                            records: 3,
                            uncompressed_len: 40,
                        }),
                    },
                ],
            },
            Request::Publish {
                version: 2,
                publisher_id: 3,
                messages: vec![Published {
                    publishing_id: 7,
                    filter_value: Some(s("eu")),
                    data: Bytes::from_static(b"abc"),
                    sub_batch: None,
                }],
            },
            Request::QueryPublisherSequence {
                correlation_id: 4,
                reference: s("r"),
                stream: s("s"),
            },
            Request::DeletePublisher {
                correlation_id: 5,
                publisher_id: 1,
            },
            Request::Subscribe {
                correlation_id: 6,
                subscription_id: 0,
                stream: s("s"),
                offset: OffsetSpec::Timestamp(-5),
                credit: 10,
                properties: vec![(s("single-active-consumer"), s("true"))],
            },
            Request::Subscribe {
                correlation_id: 6,
                subscription_id: 0,
                stream: s("s"),
                offset: OffsetSpec::Offset(42),
                credit: 10,
                properties: vec![],
            },
            Request::Credit {
                subscription_id: 1,
                credit: 2,
            },
            Request::StoreOffset {
                reference: s("c"),
                stream: s("s"),
                offset: 9,
            },
            Request::QueryOffset {
                correlation_id: 7,
                reference: s("c"),
                stream: s("s"),
            },
            Request::Unsubscribe {
                correlation_id: 8,
                subscription_id: 1,
            },
            Request::Create {
                correlation_id: 9,
                stream: s("s"),
                arguments: vec![(s("max-age"), s("1h"))],
            },
            Request::Delete {
                correlation_id: 10,
                stream: s("s"),
            },
            Request::Metadata {
                correlation_id: 11,
                streams: vec![s("a"), s("b")],
            },
            Request::PeerProperties {
                correlation_id: 12,
                properties: vec![(s("product"), s("x"))],
            },
            Request::SaslHandshake { correlation_id: 13 },
            Request::SaslAuthenticate {
                correlation_id: 14,
                mechanism: s("PLAIN"),
                data: Some(Bytes::from_static(b"\0guest\0guest")),
            },
            Request::SaslAuthenticate {
                correlation_id: 14,
                mechanism: s("ANONYMOUS"),
                data: None,
            },
            Request::Tune {
                frame_max: 1 << 20,
                heartbeat: 60,
            },
            Request::Open {
                correlation_id: 15,
                vhost: s("/"),
            },
            Request::Close {
                correlation_id: 16,
                code: 1,
                reason: s("OK"),
            },
            Request::CloseResponse {
                correlation_id: 16,
                code: 1,
            },
            Request::Heartbeat,
            Request::Route {
                correlation_id: 17,
                routing_key: s("k"),
                super_stream: s("ss"),
            },
            Request::Partitions {
                correlation_id: 18,
                super_stream: s("ss"),
            },
            Request::ConsumerUpdateResponse {
                correlation_id: 19,
                code: 1,
                offset: OffsetSpec::Next,
            },
            Request::ExchangeCommandVersions {
                correlation_id: 20,
                commands: vec![(8, 1, 2)],
            },
            Request::StreamStats {
                correlation_id: 21,
                stream: s("s"),
            },
            Request::CreateSuperStream {
                correlation_id: 22,
                name: s("ss"),
                partitions: vec![s("ss-0"), s("ss-1")],
                binding_keys: vec![s("0"), s("1")],
                arguments: vec![],
            },
            Request::DeleteSuperStream {
                correlation_id: 23,
                name: s("ss"),
            },
        ]
    }

    #[test]
    fn every_request_round_trips() {
        for r in all() {
            let f = r.to_frame();
            assert_eq!(check_frame(&f, 0), Ok(Some(f.len())));
            assert_eq!(parse(&f), Ok(r.clone()), "{r:?}");
            // Every truncation is refused, never a panic.
            for cut in 4..f.len() {
                let mut t = BytesMut::from(&f[..cut]);
                let size = (cut - 4) as u32;
                t[..4].copy_from_slice(&size.to_be_bytes());
                let _ = parse(&t.freeze());
            }
            // Trailing bytes are refused.
            let mut t = BytesMut::from(&f[..]);
            t.put_u8(0);
            let size = (t.len() - 4) as u32;
            t[..4].copy_from_slice(&size.to_be_bytes());
            assert!(
                matches!(parse(&t.freeze()), Err(ParseFailure::Malformed { .. })),
                "{r:?}"
            );
        }
    }

    #[test]
    fn known_bytes() {
        // Credit: size 7, key 9, version 1, subscription 1, credit 2.
        let f = Bytes::from_static(&[0, 0, 0, 7, 0, 9, 0, 1, 1, 0, 2]);
        assert_eq!(
            parse(&f),
            Ok(Request::Credit {
                subscription_id: 1,
                credit: 2
            })
        );
        // Heartbeat.
        assert_eq!(
            parse(&Bytes::from_static(&[0, 0, 0, 4, 0, 23, 0, 1])),
            Ok(Request::Heartbeat)
        );
        // Publish v1 data is a slice of the frame.
        let f = Request::Publish {
            version: 1,
            publisher_id: 0,
            messages: vec![Published {
                publishing_id: 1,
                filter_value: None,
                data: Bytes::from_static(b"xyz"),
                sub_batch: None,
            }],
        }
        .to_frame();
        let Ok(Request::Publish { messages, .. }) = parse(&f) else {
            panic!("publish parses");
        };
        assert_eq!(messages[0].data.as_ptr(), f[f.len() - 3..].as_ptr());
    }

    #[test]
    fn unknown_and_bad_versions() {
        assert_eq!(
            parse(&Bytes::from_static(&[0, 0, 0, 4, 0, 99, 0, 1])),
            Err(ParseFailure::UnknownKey {
                key: 99,
                version: 1
            })
        );
        assert_eq!(
            parse(&Bytes::from_static(&[0, 0, 0, 7, 0, 9, 0, 7, 1, 0, 2])),
            Err(ParseFailure::UnsupportedVersion { key: 9, version: 7 })
        );
        // A server-to-client command from a client.
        assert!(matches!(
            parse(&Bytes::from_static(&[0, 0, 0, 5, 0, 8, 0, 1, 0])),
            Err(ParseFailure::UnknownKey { .. })
        ));
        // Huge array counts do not allocate.
        assert!(parse(&Bytes::from_static(&[
            0, 0, 0, 9, 0, 2, 0, 1, 0, 0x7f, 0xff, 0xff, 0xff
        ]))
        .is_err());
        // A sub-entry batch in publish v1 parses (its data a slice of the
        // frame) and re-encodes to the same bytes; in v2 it is refused.
        let mut b = BytesMut::new();
        frame(&mut b, key::PUBLISH, 1, |b| {
            b.put_u8(3);
            b.put_i32(1);
            b.put_u64(7);
            b.put_u8(0x80 | 1 << 4);
            b.put_u16(2);
            b.put_u32(100);
            b.put_u32(3);
            b.put_slice(b"abc");
        });
        let f = b.freeze();
        let Ok(r @ Request::Publish { .. }) = parse(&f) else {
            panic!("sub-entry publish parses");
        };
        let Request::Publish { messages, .. } = &r else {
            unreachable!()
        };
        assert_eq!(
            messages[0].sub_batch,
            Some(SubBatch {
                compression: compression::GZIP,
                records: 2,
                uncompressed_len: 100
            })
        );
        assert_eq!(messages[0].publishing_id, 7);
        assert_eq!(messages[0].data.as_ptr(), f[f.len() - 3..].as_ptr());
        assert_eq!(r.to_frame(), f);
        let mut v2 = BytesMut::new();
        frame(&mut v2, key::PUBLISH, 2, |b| {
            b.put_u8(3);
            b.put_i32(1);
            b.put_u64(7);
            b.put_i16(-1);
            b.put_u8(0x80);
            b.put_u16(1);
            b.put_u32(5);
            b.put_u32(5);
            b.put_slice(&[0, 0, 0, 1, 9]);
        });
        assert!(parse(&v2.freeze()).is_err());
        // Lengths past the frame: malformed.
        for cut in 1..=12 {
            let short = f.slice(..f.len() - cut);
            let mut g = BytesMut::from(&short[..]);
            let n = (g.len() - 4) as u32;
            g[..4].copy_from_slice(&n.to_be_bytes());
            assert!(parse(&g.freeze()).is_err(), "cut {cut}");
        }
    }

    #[test]
    fn consumer_update_response_value_after_first_is_ignored() {
        // rstream sends the offset value even for `first`.
        let mut b = BytesMut::new();
        frame(&mut b, key::CONSUMER_UPDATE | key::RESPONSE, 1, |b| {
            b.put_u32(5);
            b.put_u16(1);
            b.put_u16(1);
            b.put_u64(0);
        });
        assert_eq!(
            parse(&b.freeze()),
            Ok(Request::ConsumerUpdateResponse {
                correlation_id: 5,
                code: 1,
                offset: OffsetSpec::First
            })
        );
    }

    #[test]
    fn sub_batch_validity_is_rabbitmqs() {
        let sb = |compression, records, uncompressed_len| SubBatch {
            compression,
            records,
            uncompressed_len,
        };
        // Two uncompressed records: 4 + 1 and 4 + 0 bytes.
        let none = [0, 0, 0, 1, b'x', 0, 0, 0, 0];
        assert!(sb(0, 2, 9).is_valid(&none));
        assert!(
            !sb(0, 3, 9).is_valid(&none),
            "more records than the data holds"
        );
        assert!(
            !sb(0, 1, 9).is_valid(&none),
            "fewer records than the data holds"
        );
        assert!(!sb(0, 2, 10).is_valid(&none), "length differs");
        assert!(
            !sb(0, 1, 5).is_valid(&[0x80, 0, 0, 1, 1]),
            "top bit in a record"
        );
        // Compressed: only the header is checked (RabbitMQ's rules).
        for c in 1..=4 {
            assert!(sb(c, 2, 100).is_valid(b"zz"));
        }
        for c in 5..=7 {
            assert!(!sb(c, 1, 40).is_valid(b"0123456789"), "compression {c}");
        }
        assert!(!sb(1, 0, 40).is_valid(b"x"), "no records");
        assert!(!sb(1, 100, 10).is_valid(b"x"), "records cannot fit");
        assert!(!sb(1, 1, 40).is_valid(b""), "empty data");
        assert!(sb(4, 65535, MAX_SUB_BATCH_UNCOMPRESSED).is_valid(b"tiny"));
        assert!(!sb(1, 1, MAX_SUB_BATCH_UNCOMPRESSED + 1).is_valid(b"x"));
    }
}
