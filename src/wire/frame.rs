//! AMQP frames: the protocol header, the [`Frame`] enum, the [`FrameCodec`]
//! (tokio-util `Decoder` / `Encoder`, enforcing `frame_max` and the `0xCE`
//! frame end) and the hot-path writers that encode straight into a `BytesMut`.

use super::error::WireError;
use super::methods::{constants, BasicProperties, Method};
use super::types::encode_short_string;
use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

/// What a client sends first: `AMQP` 0 0 9 1.
pub const PROTOCOL_HEADER: &[u8; 8] = b"AMQP\x00\x00\x09\x01";

/// Type octet, channel and payload size.
pub const FRAME_HEADER_SIZE: usize = 7;

/// Framing bytes around a payload: the 7-byte header plus the frame end.
pub const FRAME_OVERHEAD: u32 = 8;

/// frame_max before tuning (RabbitMQ's default of 128 KiB).
pub const DEFAULT_FRAME_MAX: u32 = 131_072;

/// Most the decoder reserves ahead for a frame it has only seen the header of.
pub const MAX_RESERVE: usize = 1024 * 1024;

/// One decoded frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Method {
        channel: u16,
        method: Method,
    },
    /// A content header. Properties are decoded only for class 60 (basic), the
    /// only class with content; for any other class they are left empty and
    /// the session is expected to refuse the frame (505 UNEXPECTED_FRAME).
    Header {
        channel: u16,
        class_id: u16,
        body_size: u64,
        properties: BasicProperties,
    },
    /// A content body frame; `payload` is a slice of the read buffer.
    Body {
        channel: u16,
        payload: Bytes,
    },
    /// A heartbeat. Decoded on any channel: a non-zero channel is the
    /// session's protocol error to report, not the codec's.
    Heartbeat {
        channel: u16,
    },
}

impl Frame {
    pub fn channel(&self) -> u16 {
        match *self {
            Frame::Method { channel, .. }
            | Frame::Header { channel, .. }
            | Frame::Body { channel, .. }
            | Frame::Heartbeat { channel } => channel,
        }
    }

    /// Append this frame to `buf` (no splitting: the caller keeps to frame_max).
    pub fn encode(&self, buf: &mut BytesMut) {
        match self {
            Frame::Method { channel, method } => write_method(buf, *channel, method),
            Frame::Header {
                channel,
                class_id,
                body_size,
                properties,
            } => write_header(buf, *channel, *class_id, *body_size, properties),
            Frame::Body { channel, payload } => write_body(buf, *channel, payload),
            Frame::Heartbeat { channel } => {
                buf.reserve(FRAME_OVERHEAD as usize);
                buf.put_u8(constants::FRAME_HEARTBEAT);
                buf.put_u16(*channel);
                buf.put_u32(0);
                buf.put_u8(constants::FRAME_END);
            }
        }
    }
}

/// Write one frame: header with a placeholder size, the payload from `body`,
/// then back-patch the size and add the frame end.
fn write_frame(buf: &mut BytesMut, kind: u8, channel: u16, body: impl FnOnce(&mut BytesMut)) {
    let start = buf.len();
    buf.put_u8(kind);
    buf.put_u16(channel);
    buf.put_u32(0);
    body(buf);
    let size = (buf.len() - start - FRAME_HEADER_SIZE) as u32;
    buf[start + 3..start + FRAME_HEADER_SIZE].copy_from_slice(&size.to_be_bytes());
    buf.put_u8(constants::FRAME_END);
}

/// Append a method frame.
pub fn write_method(buf: &mut BytesMut, channel: u16, method: &Method) {
    write_frame(buf, constants::FRAME_METHOD, channel, |buf| {
        method.encode(buf)
    });
}

fn write_header(
    buf: &mut BytesMut,
    channel: u16,
    class_id: u16,
    body_size: u64,
    properties: &BasicProperties,
) {
    write_frame(buf, constants::FRAME_HEADER, channel, |buf| {
        buf.put_u16(class_id);
        buf.put_u16(0); // weight, always 0
        buf.put_u64(body_size);
        properties.encode(buf);
    });
}

fn write_body(buf: &mut BytesMut, channel: u16, payload: &[u8]) {
    buf.reserve(payload.len() + FRAME_OVERHEAD as usize);
    buf.put_u8(constants::FRAME_BODY);
    buf.put_u16(channel);
    buf.put_u32(payload.len() as u32);
    buf.put_slice(payload);
    buf.put_u8(constants::FRAME_END);
}

/// Append a content header frame and the body frames for `body`, each body
/// frame at most `frame_max` bytes in all (`frame_max` 0: no limit). An empty
/// body is sent as the header alone.
pub fn write_content(
    buf: &mut BytesMut,
    channel: u16,
    class_id: u16,
    properties: &BasicProperties,
    body: &[u8],
    frame_max: u32,
) {
    write_content_with(
        buf,
        channel,
        class_id,
        |b| properties.encode(b),
        body,
        frame_max,
    );
}

/// [`write_content`] with the properties (flags and values) written by `properties`,
/// e.g. from a compact or pre-encoded form.
pub fn write_content_with(
    buf: &mut BytesMut,
    channel: u16,
    class_id: u16,
    properties: impl FnOnce(&mut BytesMut),
    body: &[u8],
    frame_max: u32,
) {
    let chunk = match frame_max {
        0 => body.len().max(1),
        max => (max.saturating_sub(FRAME_OVERHEAD) as usize).max(1),
    };
    buf.reserve(64 + body.len() + body.len().div_ceil(chunk) * FRAME_OVERHEAD as usize);
    write_frame(buf, constants::FRAME_HEADER, channel, |buf| {
        buf.put_u16(class_id);
        buf.put_u16(0); // weight, always 0
        buf.put_u64(body.len() as u64);
        properties(buf);
    });
    if body.len() <= chunk {
        if !body.is_empty() {
            write_body(buf, channel, body);
        }
        return;
    }
    for part in body.chunks(chunk) {
        write_body(buf, channel, part);
    }
}

/// The arguments of a `basic.deliver`, borrowed: the delivery hot path encodes
/// them straight into the output buffer without building a [`Method`].
#[derive(Debug, Clone, Copy)]
pub struct DeliverArgs<'a> {
    pub consumer_tag: &'a str,
    pub delivery_tag: u64,
    pub redelivered: bool,
    pub exchange: &'a str,
    pub routing_key: &'a str,
}

/// Append `basic.deliver`, its content header (properties written by `properties`)
/// and the body frames, with a single reservation. Byte-identical to
/// `write_method(BasicDeliver)` followed by `write_content`.
pub fn write_deliver(
    buf: &mut BytesMut,
    channel: u16,
    args: &DeliverArgs<'_>,
    properties: impl FnOnce(&mut BytesMut),
    body: &[u8],
    frame_max: u32,
) {
    buf.reserve(
        FRAME_OVERHEAD as usize
            + 16
            + args.consumer_tag.len()
            + args.exchange.len()
            + args.routing_key.len(),
    );
    write_frame(buf, constants::FRAME_METHOD, channel, |buf| {
        buf.put_u16(60);
        buf.put_u16(60);
        encode_short_string(args.consumer_tag, buf);
        buf.put_u64(args.delivery_tag);
        buf.put_u8(u8::from(args.redelivered));
        encode_short_string(args.exchange, buf);
        encode_short_string(args.routing_key, buf);
    });
    write_content_with(buf, channel, 60, properties, body, frame_max);
}

/// Append a heartbeat frame (channel 0).
pub fn write_heartbeat(buf: &mut BytesMut) {
    Frame::Heartbeat { channel: 0 }.encode(buf);
}

/// Splits a byte stream into [`Frame`]s and writes frames back.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    frame_max: u32,
    /// Bytes decoded since the decoder last ran out of input: how busy the
    /// connection is, to size the read buffer (small when idle, large under load).
    burst: usize,
}

/// The read buffer of an idle connection stays as small as its socket needs; once
/// more than BUSY_BURST bytes arrive between two waits for input, the free space is
/// topped up to READ_BUSY so a busy connection reads in large chunks.
const BUSY_BURST: usize = 2 * 1024;
const READ_BUSY: usize = 32 * 1024;

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec::new(DEFAULT_FRAME_MAX)
    }
}

impl FrameCodec {
    /// `frame_max` counts the whole frame (payload + 8); 0 means no limit.
    pub fn new(frame_max: u32) -> Self {
        FrameCodec {
            frame_max,
            burst: 0,
        }
    }

    /// Apply the frame_max agreed in `connection.tune-ok`.
    pub fn set_frame_max(&mut self, frame_max: u32) {
        self.frame_max = frame_max;
    }

    pub fn frame_max(&self) -> u32 {
        self.frame_max
    }
}

fn parse_header_payload(payload: &[u8]) -> Result<(u16, u64, BasicProperties), WireError> {
    if payload.len() < 12 {
        return Err(WireError::BadContentHeader(format!(
            "content header payload of {} bytes is shorter than the 12 bytes of class, weight and body size",
            payload.len()
        )));
    }
    let (mut fixed, props) = payload.split_at(12);
    let class_id = fixed.get_u16();
    let _weight = fixed.get_u16();
    let body_size = fixed.get_u64();
    let properties = if class_id == 60 {
        BasicProperties::decode(props)?
    } else {
        BasicProperties::default()
    };
    Ok((class_id, body_size, properties))
}

impl FrameCodec {
    /// The decoder needs `need` bytes in all and has fewer: make room for them, and
    /// for a large read if the connection is busy.
    fn out_of_input(&mut self, src: &mut BytesMut, need: usize) {
        let mut want = need.saturating_sub(src.len()).min(MAX_RESERVE);
        if self.burst >= BUSY_BURST {
            want = want.max(READ_BUSY);
        }
        self.burst = 0;
        if src.capacity() - src.len() < want {
            src.reserve(want);
        }
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = WireError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, WireError> {
        if src.len() < FRAME_HEADER_SIZE {
            self.out_of_input(src, FRAME_HEADER_SIZE);
            return Ok(None);
        }
        let kind = src[0];
        let channel = u16::from_be_bytes([src[1], src[2]]);
        let size = u32::from_be_bytes([src[3], src[4], src[5], src[6]]);
        if !matches!(
            kind,
            constants::FRAME_METHOD
                | constants::FRAME_HEADER
                | constants::FRAME_BODY
                | constants::FRAME_HEARTBEAT
        ) {
            return Err(WireError::UnknownFrameType(kind));
        }
        if self.frame_max != 0 && size > self.frame_max.saturating_sub(FRAME_OVERHEAD) {
            return Err(WireError::FrameTooLarge {
                size: size.saturating_add(FRAME_OVERHEAD),
                max: self.frame_max,
            });
        }
        let total = FRAME_HEADER_SIZE + size as usize + 1;
        if src.len() < total {
            // Reserve for the rest of the frame, but never more than
            // MAX_RESERVE on the word of a header alone: with no frame_max a
            // 7-byte header could otherwise ask for 4 GiB up front.
            self.out_of_input(src, total);
            return Ok(None);
        }
        self.burst += total;
        let end = src[total - 1];
        if end != constants::FRAME_END {
            return Err(WireError::FrameEnd(end));
        }
        let frame = match kind {
            constants::FRAME_BODY => {
                src.advance(FRAME_HEADER_SIZE);
                let payload = src.split_to(size as usize).freeze();
                src.advance(1);
                return Ok(Some(Frame::Body { channel, payload }));
            }
            constants::FRAME_METHOD => {
                let method = Method::decode(&src[FRAME_HEADER_SIZE..total - 1])?;
                Frame::Method { channel, method }
            }
            constants::FRAME_HEADER => {
                let (class_id, body_size, properties) =
                    parse_header_payload(&src[FRAME_HEADER_SIZE..total - 1])?;
                Frame::Header {
                    channel,
                    class_id,
                    body_size,
                    properties,
                }
            }
            _ if size != 0 => return Err(WireError::HeartbeatPayload(size)),
            _ => Frame::Heartbeat { channel },
        };
        src.advance(total);
        Ok(Some(frame))
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = WireError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), WireError> {
        frame.encode(dst);
        Ok(())
    }
}

impl Encoder<&Frame> for FrameCodec {
    type Error = WireError;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), WireError> {
        frame.encode(dst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::methods::*;
    use crate::wire::types::FieldTable;

    fn method_frame(channel: u16, method: Method) -> BytesMut {
        let mut buf = BytesMut::new();
        write_method(&mut buf, channel, &method);
        buf
    }

    #[test]
    fn method_frame_golden_and_decode() {
        let buf = method_frame(
            1,
            BasicAck {
                delivery_tag: 5,
                multiple: true,
            }
            .into(),
        );
        let expected: &[u8] = &[
            1, 0, 1, 0, 0, 0, 13, 0, 60, 0, 80, 0, 0, 0, 0, 0, 0, 0, 5, 1, 0xce,
        ];
        assert_eq!(&buf[..], expected);
        let mut src = BytesMut::from(expected);
        let frame = FrameCodec::default()
            .decode(&mut src)
            .expect("ok")
            .expect("complete");
        assert_eq!(
            frame,
            Frame::Method {
                channel: 1,
                method: BasicAck {
                    delivery_tag: 5,
                    multiple: true
                }
                .into()
            }
        );
        assert!(src.is_empty());
    }

    #[test]
    fn partial_input_waits() {
        let full = method_frame(
            3,
            QueueDeclare {
                queue: "q".into(),
                ..Default::default()
            }
            .into(),
        );
        let mut codec = FrameCodec::default();
        let mut src = BytesMut::new();
        for (n, b) in full.iter().enumerate() {
            assert_eq!(
                codec.decode(&mut src).expect("no error"),
                None,
                "after {n} bytes"
            );
            src.extend_from_slice(&[*b]);
        }
        assert!(src.capacity() >= full.len());
        assert!(matches!(
            codec.decode(&mut src),
            Ok(Some(Frame::Method { channel: 3, .. }))
        ));
        assert_eq!(codec.decode(&mut src).expect("empty"), None);
    }

    #[test]
    fn several_frames_in_one_buffer() {
        let mut src = method_frame(0, ConnectionCloseOk {}.into());
        write_heartbeat(&mut src);
        src.extend_from_slice(&method_frame(2, ChannelOpen::default().into()));
        let mut codec = FrameCodec::default();
        assert!(matches!(
            codec.decode(&mut src),
            Ok(Some(Frame::Method { channel: 0, .. }))
        ));
        assert_eq!(
            codec.decode(&mut src).expect("ok"),
            Some(Frame::Heartbeat { channel: 0 })
        );
        assert!(matches!(
            codec.decode(&mut src),
            Ok(Some(Frame::Method { channel: 2, .. }))
        ));
        assert_eq!(codec.decode(&mut src).expect("ok"), None);
    }

    #[test]
    fn heartbeat_frames() {
        let mut buf = BytesMut::new();
        write_heartbeat(&mut buf);
        assert_eq!(&buf[..], &[8, 0, 0, 0, 0, 0, 0, 0xce]);
        let mut src = BytesMut::from(&[8, 0, 5, 0, 0, 0, 0, 0xce][..]);
        assert_eq!(
            FrameCodec::default().decode(&mut src).expect("ok"),
            Some(Frame::Heartbeat { channel: 5 })
        );
        let mut src = BytesMut::from(&[8, 0, 0, 0, 0, 0, 1, 0, 0xce][..]);
        assert!(matches!(
            FrameCodec::default().decode(&mut src),
            Err(WireError::HeartbeatPayload(1))
        ));
    }

    #[test]
    fn bad_frame_end() {
        let mut src = method_frame(1, BasicAck::default().into());
        let last = src.len() - 1;
        src[last] = 0xcd;
        let e = FrameCodec::default()
            .decode(&mut src)
            .expect_err("frame end");
        assert!(matches!(e, WireError::FrameEnd(0xcd)));
        assert_eq!(e.reply_code(), reply_code::FRAME_ERROR);
    }

    #[test]
    fn oversize_frames_are_refused_from_the_header_alone() {
        let mut codec = FrameCodec::new(4096);
        // Payload 4088 + 8 = 4096: fine (wait for the rest).
        let mut src = BytesMut::from(&[3, 0, 1, 0, 0, 0x0f, 0xf8][..]);
        assert_eq!(codec.decode(&mut src).expect("fits"), None);
        let mut src = BytesMut::from(&[3, 0, 1, 0, 0, 0x0f, 0xf9][..]);
        let e = codec.decode(&mut src).expect_err("too large");
        assert!(
            matches!(
                e,
                WireError::FrameTooLarge {
                    size: 4097,
                    max: 4096
                }
            ),
            "{e:?}"
        );
        assert_eq!(e.reply_code(), reply_code::FRAME_ERROR);
        // frame_max 0: no limit.
        codec.set_frame_max(0);
        assert_eq!(codec.frame_max(), 0);
        let mut src = BytesMut::from(&[3, 0, 1, 0xff, 0xff, 0xff, 0xf0][..]);
        assert_eq!(codec.decode(&mut src).expect("no limit"), None);
    }

    #[test]
    fn unknown_frame_type_and_method() {
        let mut src = BytesMut::from(&[4, 0, 0, 0, 0, 0, 0, 0xce][..]);
        let e = FrameCodec::default().decode(&mut src).expect_err("type");
        assert!(matches!(e, WireError::UnknownFrameType(4)));
        assert_eq!(e.reply_code(), reply_code::FRAME_ERROR);

        let mut src = BytesMut::from(&[1, 0, 1, 0, 0, 0, 4, 0, 60, 0, 99, 0xce][..]);
        let e = FrameCodec::default().decode(&mut src).expect_err("method");
        assert!(matches!(
            e,
            WireError::UnknownMethod {
                class_id: 60,
                method_id: 99
            }
        ));
        assert_eq!(e.class_method(), (60, 99));
        assert_eq!(e.reply_code(), reply_code::COMMAND_INVALID);
    }

    #[test]
    fn truncated_args_and_trailing_junk_are_syntax_errors() {
        // basic.ack without its bits octet.
        let mut src = BytesMut::from(
            &[
                1, 0, 1, 0, 0, 0, 12, 0, 60, 0, 80, 0, 0, 0, 0, 0, 0, 0, 5, 0xce,
            ][..],
        );
        let e = FrameCodec::default()
            .decode(&mut src)
            .expect_err("truncated");
        assert!(
            matches!(
                e,
                WireError::Syntax {
                    class_id: 60,
                    method_id: 80,
                    ..
                }
            ),
            "{e:?}"
        );
        assert_eq!(e.reply_code(), reply_code::SYNTAX_ERROR);
        assert_eq!(
            e.to_string(),
            "cannot decode basic.ack (60.80) arguments: multiple: unexpected end of data"
        );

        let mut src = BytesMut::from(
            &[
                1, 0, 1, 0, 0, 0, 14, 0, 60, 0, 80, 0, 0, 0, 0, 0, 0, 0, 5, 1, 9, 0xce,
            ][..],
        );
        let e = FrameCodec::default().decode(&mut src).expect_err("junk");
        assert!(
            matches!(&e, WireError::Syntax { class_id: 60, method_id: 80, detail } if detail.contains("trailing"))
        );
    }

    #[test]
    fn content_round_trip_and_body_frames_are_slices() {
        let props = BasicProperties {
            content_type: Some("application/json".into()),
            headers: Some(FieldTable::new()),
            delivery_mode: Some(2),
            ..Default::default()
        };
        let body: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
        let mut buf = BytesMut::new();
        write_content(&mut buf, 7, 60, &props, &body, 4096);
        // Header + 3 body frames (4088 + 4088 + 1824).
        let mut codec = FrameCodec::new(4096);
        let header = codec.decode(&mut buf).expect("ok").expect("header");
        assert_eq!(
            header,
            Frame::Header {
                channel: 7,
                class_id: 60,
                body_size: 10_000,
                properties: props.clone()
            }
        );
        let base = buf.as_ptr() as usize;
        let range = base..base + buf.len();
        let mut got = Vec::new();
        let mut sizes = Vec::new();
        while let Some(frame) = codec.decode(&mut buf).expect("ok") {
            match frame {
                Frame::Body {
                    channel: 7,
                    payload,
                } => {
                    let p = payload.as_ptr() as usize;
                    assert!(
                        range.contains(&p) && p + payload.len() <= range.end,
                        "body is a slice of the input"
                    );
                    sizes.push(payload.len());
                    got.extend_from_slice(&payload);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        assert_eq!(sizes, vec![4088, 4088, 1824]);
        assert_eq!(got, body);
    }

    #[test]
    fn empty_body_is_header_only() {
        let mut buf = BytesMut::new();
        write_content(&mut buf, 1, 60, &BasicProperties::default(), &[], 4096);
        let expected: &[u8] = &[
            2, 0, 1, 0, 0, 0, 14, 0, 60, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xce,
        ];
        assert_eq!(&buf[..], expected);
        let mut buf = BytesMut::new();
        write_content(&mut buf, 1, 60, &BasicProperties::default(), b"abc", 0);
        assert_eq!(
            &buf[expected.len()..],
            &[3, 0, 1, 0, 0, 0, 3, b'a', b'b', b'c', 0xce]
        );
    }

    #[test]
    fn header_frames_for_other_classes_and_bad_headers() {
        let mut src = BytesMut::from(
            &[
                2, 0, 1, 0, 0, 0, 14, 0, 50, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9, 0x80, 0, 0xce,
            ][..],
        );
        assert_eq!(
            FrameCodec::default().decode(&mut src).expect("ok"),
            Some(Frame::Header {
                channel: 1,
                class_id: 50,
                body_size: 9,
                properties: BasicProperties::default()
            })
        );
        let mut src = BytesMut::from(&[2, 0, 1, 0, 0, 0, 3, 0, 60, 0, 0xce][..]);
        let e = FrameCodec::default()
            .decode(&mut src)
            .expect_err("short header");
        assert!(matches!(e, WireError::BadContentHeader(_)));
        assert_eq!(e.reply_code(), reply_code::SYNTAX_ERROR);
    }

    #[test]
    fn encoder_matches_writers() {
        let frames = vec![
            Frame::Method {
                channel: 1,
                method: BasicQos {
                    prefetch_count: 10,
                    ..Default::default()
                }
                .into(),
            },
            Frame::Header {
                channel: 1,
                class_id: 60,
                body_size: 2,
                properties: BasicProperties::default(),
            },
            Frame::Body {
                channel: 1,
                payload: Bytes::from_static(b"hi"),
            },
            Frame::Heartbeat { channel: 0 },
        ];
        let mut codec = FrameCodec::default();
        let mut buf = BytesMut::new();
        for f in &frames {
            codec.encode(f, &mut buf).expect("encodes");
        }
        let mut decoded = Vec::new();
        while let Some(f) = codec.decode(&mut buf).expect("ok") {
            assert!(f.channel() <= 1);
            decoded.push(f);
        }
        assert_eq!(decoded, frames);
    }

    /// Fuzz regression (frame_decoder, oom-4f4148b4): with no frame_max, a
    /// header announcing a 4 GiB payload made the decoder reserve 4 GiB.
    #[test]
    fn huge_size_without_frame_max_does_not_preallocate() {
        let mut codec = FrameCodec::new(0);
        let mut src = BytesMut::from(&[3, 0, 1, 0xff, 0xff, 0xff, 0xf0, 1, 2][..]);
        assert_eq!(codec.decode(&mut src).expect("waits"), None);
        assert!(src.capacity() <= MAX_RESERVE + 64, "{}", src.capacity());
    }

    #[test]
    fn protocol_header() {
        assert_eq!(PROTOCOL_HEADER, b"AMQP\x00\x00\x09\x01");
    }

    #[test]
    fn write_deliver_matches_generic_encoding() {
        let props = BasicProperties {
            delivery_mode: Some(1),
            message_id: Some("m".into()),
            ..Default::default()
        };
        for (body, frame_max) in [
            (&b""[..], 4096u32),
            (&b"0123456789abcdef"[..], 0),
            (&[7u8; 9000][..], 4096),
        ] {
            for redelivered in [false, true] {
                let mut expected = BytesMut::new();
                write_method(
                    &mut expected,
                    3,
                    &BasicDeliver {
                        consumer_tag: "ctag".into(),
                        delivery_tag: 42,
                        redelivered,
                        exchange: "ex".into(),
                        routing_key: "key".into(),
                    }
                    .into(),
                );
                write_content(&mut expected, 3, 60, &props, body, frame_max);
                let mut got = BytesMut::new();
                let args = DeliverArgs {
                    consumer_tag: "ctag",
                    delivery_tag: 42,
                    redelivered,
                    exchange: "ex",
                    routing_key: "key",
                };
                write_deliver(&mut got, 3, &args, |b| props.encode(b), body, frame_max);
                assert_eq!(got, expected);
            }
        }
    }
}
