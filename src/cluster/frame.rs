//! The inter-node wire format: one frame is a 4-byte big-endian length, then a
//! 1-byte type, then the payload (`length` counts the type byte and the
//! payload). Payloads are the handshake messages, openraft's RPCs and the
//! other requests and replies as `super::codec` writes them (MessagePack;
//! JSON from earlier versions is still read). Pure bytes in and out: cut with nom, check-then-parse like
//! the AMQP frame codec; too few bytes is `Ok(None)`, not an error.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use nom::number::streaming::{be_u32, u8 as byte};

/// Largest frame accepted from a peer that proved the cookie: one message
/// as large as RabbitMQ allows (`max_message_size` at most 512 MiB) with
/// room for its envelope. Snapshot chunks and append-entries requests are
/// far below it (`quorum::network::RPC_BYTES_MAX`); the decoder never
/// reserves for an announced length.
pub const MAX_FRAME: u32 = 576 * 1024 * 1024;

/// Largest frame accepted before the peer has proved the cookie.
pub const MAX_HANDSHAKE_FRAME: u32 = 4096;

/// What a frame carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Listener -> dialer: a random nonce to prove the cookie against.
    Challenge = 1,
    /// Listener -> dialer, in plain TCP, instead of the challenge: this
    /// listener requires TLS (`[cluster.tls]`); the dialer starts the TLS
    /// handshake and the challenge follows inside TLS.
    StartTls = 4,
    /// Dialer -> listener: who it is, its proof of the cookie, its own nonce.
    Hello = 2,
    /// Listener -> dialer: accepted, with the listener's proof of the cookie.
    Welcome = 3,
    /// openraft append-entries request.
    AppendEntries = 10,
    /// openraft vote request.
    Vote = 11,
    /// openraft install-snapshot request (one chunk).
    InstallSnapshot = 12,
    /// A node asks to be added to the cluster.
    Join = 13,
    /// A follower forwards a metadata command to the leader.
    Propose = 14,
    /// The leader removes a member on behalf of another node.
    Forget = 15,
    /// Liveness probe between members (answered at once).
    Ping = 16,
    /// A member asks for this node's figures (health, queue counts) for the
    /// management API; the query and the answer are JSON.
    Stats = 17,
    /// The dialer makes this connection its data link (payload: its node
    /// name); from then on both sides send [`Kind::Data`] frames, pipelined.
    Link = 18,
    /// One message of a data link: see [`pack`] and `super::forward`.
    Data = 19,
    /// The answer to any request: a JSON `Result<T, String>`.
    Reply = 20,
    /// A quorum queue group's RPC, on a [`Kind::Mux`] connection only
    /// (payload: the request's id, then the group id and the request,
    /// `super::quorum::network::GroupRpc`).
    Quorum = 21,
    /// The dialer makes this connection a multiplexed one for the quorum
    /// groups' RPCs (`super::mux`): from then on it sends [`Kind::Quorum`]
    /// frames and the listener answers [`Kind::Reply`] frames, each headed
    /// by the request's id, in any order.
    Mux = 22,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Challenge,
            2 => Kind::Hello,
            3 => Kind::Welcome,
            4 => Kind::StartTls,
            10 => Kind::AppendEntries,
            11 => Kind::Vote,
            12 => Kind::InstallSnapshot,
            13 => Kind::Join,
            14 => Kind::Propose,
            15 => Kind::Forget,
            16 => Kind::Ping,
            17 => Kind::Stats,
            18 => Kind::Link,
            19 => Kind::Data,
            20 => Kind::Reply,
            21 => Kind::Quorum,
            22 => Kind::Mux,
            _ => return None,
        })
    }
}

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub payload: Bytes,
}

/// Bytes that are not a frame of ours; the connection is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame length {0} out of range")]
    Length(u32),
    #[error("unknown frame type {0}")]
    UnknownType(u8),
}

/// The header of the frame at the start of `input`: (type byte, payload length),
/// or None when fewer than 5 bytes are there.
fn header(input: &[u8], max: u32) -> Result<Option<(u8, usize)>, FrameError> {
    let parsed: nom::IResult<&[u8], (u32, u8)> = nom::sequence::tuple((be_u32, byte))(input);
    match parsed {
        Ok((_, (len, kind))) => {
            if len == 0 || len > max {
                return Err(FrameError::Length(len));
            }
            Ok(Some((kind, len as usize - 1)))
        }
        Err(_) => {
            // Only a length of 0 can be refused before the type byte arrives.
            if input.len() >= 4 {
                let len = u32::from_be_bytes([input[0], input[1], input[2], input[3]]);
                if len == 0 || len > max {
                    return Err(FrameError::Length(len));
                }
            }
            Ok(None)
        }
    }
}

/// Cut one frame (at most `max` bytes after the length) off the front of
/// `buf`: None until it is complete.
pub fn decode(buf: &mut BytesMut, max: u32) -> Result<Option<Frame>, FrameError> {
    let Some((kind, len)) = header(buf, max)? else {
        return Ok(None);
    };
    let kind = Kind::from_u8(kind).ok_or(FrameError::UnknownType(kind))?;
    // No reserve for the announced length: memory grows with bytes received.
    if buf.len() < 5 + len {
        return Ok(None);
    }
    buf.advance(5);
    let payload = buf.split_to(len).freeze();
    Ok(Some(Frame { kind, payload }))
}

/// Append `frame` to `buf`.
pub fn encode(kind: Kind, payload: &[u8], buf: &mut BytesMut) {
    buf.reserve(5 + payload.len());
    buf.put_u32(payload.len() as u32 + 1);
    buf.put_u8(kind as u8);
    buf.put_slice(payload);
}

/// A data-link payload: a JSON header, then an AMQP message's encoded
/// properties and its body (both empty when the header carries no message):
/// `u32 header length, header, u32 properties length, properties, body`.
pub fn pack(header: &[u8], properties: &[u8], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(8 + header.len() + properties.len() + body.len());
    out.extend_from_slice(&(header.len() as u32).to_be_bytes());
    out.extend_from_slice(header);
    out.extend_from_slice(&(properties.len() as u32).to_be_bytes());
    out.extend_from_slice(properties);
    out.extend_from_slice(body);
    out
}

/// A data-link payload cut into (header, properties, body), sharing `payload`'s
/// memory; an error when a length points past the end.
pub fn unpack(payload: &Bytes) -> Result<(Bytes, Bytes, Bytes), FrameError> {
    fn part(b: &Bytes, at: usize) -> Result<(Bytes, usize), FrameError> {
        let Some(len) = b.get(at..at + 4) else {
            return Err(FrameError::Length(b.len() as u32));
        };
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]);
        let start = at + 4;
        let end = start
            .checked_add(len as usize)
            .filter(|e| *e <= b.len())
            .ok_or(FrameError::Length(len))?;
        Ok((b.slice(start..end), end))
    }
    let (header, at) = part(payload, 0)?;
    let (properties, at) = part(payload, at)?;
    Ok((header, properties, payload.slice(at..)))
}

/// The codec for `tokio_util::codec::Framed` over an inter-node socket.
#[derive(Debug)]
pub struct FrameCodec {
    /// The largest frame accepted from the peer.
    pub max: u32,
}

impl FrameCodec {
    /// For a connection whose peer has not proved the cookie yet.
    pub fn handshake() -> FrameCodec {
        FrameCodec {
            max: MAX_HANDSHAKE_FRAME,
        }
    }
}

impl Default for FrameCodec {
    fn default() -> FrameCodec {
        FrameCodec { max: MAX_FRAME }
    }
}

impl tokio_util::codec::Decoder for FrameCodec {
    type Item = Frame;
    type Error = std::io::Error;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, std::io::Error> {
        decode(src, self.max).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }
}

impl tokio_util::codec::Encoder<(Kind, Vec<u8>)> for FrameCodec {
    type Error = std::io::Error;

    fn encode(
        &mut self,
        (kind, payload): (Kind, Vec<u8>),
        dst: &mut BytesMut,
    ) -> std::io::Result<()> {
        if payload.len() as u64 + 1 > MAX_FRAME as u64 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "frame too large",
            ));
        }
        encode(kind, &payload, dst);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_round_trips() {
        let mut buf = BytesMut::new();
        encode(Kind::Vote, b"{\"x\":1}", &mut buf);
        assert_eq!(&buf[..5], &[0, 0, 0, 8, 11]);
        let f = decode(&mut buf, MAX_FRAME).unwrap().unwrap();
        assert_eq!(f.kind, Kind::Vote);
        assert_eq!(&f.payload[..], b"{\"x\":1}");
        assert!(buf.is_empty());
    }

    #[test]
    fn partial_input_is_incomplete_at_every_cut() {
        let mut whole = BytesMut::new();
        encode(Kind::Reply, b"hello", &mut whole);
        for cut in 0..whole.len() {
            let mut part = BytesMut::from(&whole[..cut]);
            assert_eq!(decode(&mut part, MAX_FRAME), Ok(None), "cut at {cut}");
            assert_eq!(part.len(), cut, "nothing consumed at {cut}");
        }
    }

    #[test]
    fn two_frames_in_one_read_come_out_in_order() {
        let mut buf = BytesMut::new();
        encode(Kind::Challenge, &[7; 16], &mut buf);
        encode(Kind::Hello, b"", &mut buf);
        buf.extend_from_slice(&[0, 0]); // the start of a third
        assert_eq!(
            decode(&mut buf, MAX_FRAME).unwrap().unwrap().kind,
            Kind::Challenge
        );
        let f = decode(&mut buf, MAX_FRAME).unwrap().unwrap();
        assert_eq!((f.kind, f.payload.len()), (Kind::Hello, 0));
        assert_eq!(decode(&mut buf, MAX_FRAME), Ok(None));
        assert_eq!(&buf[..], &[0, 0]);
    }

    #[test]
    fn bad_lengths_and_types_are_errors() {
        let mut zero = BytesMut::from(&[0u8, 0, 0, 0][..]);
        assert_eq!(decode(&mut zero, MAX_FRAME), Err(FrameError::Length(0)));
        let mut huge = BytesMut::from(&[0xffu8, 0xff, 0xff, 0xff, 10][..]);
        assert_eq!(
            decode(&mut huge, MAX_FRAME),
            Err(FrameError::Length(u32::MAX))
        );
        let mut unknown = BytesMut::from(&[0u8, 0, 0, 1, 99][..]);
        assert_eq!(
            decode(&mut unknown, MAX_FRAME),
            Err(FrameError::UnknownType(99))
        );
        // An AMQP client that dials the cluster port by mistake.
        let mut amqp = BytesMut::from(&b"AMQP\x00\x00\x09\x01"[..]);
        assert!(decode(&mut amqp, MAX_FRAME).is_err());
    }

    #[test]
    fn data_payloads_round_trip_and_bad_lengths_are_errors() {
        let packed = Bytes::from(pack(b"{\"Done\":1}", &[0x80, 0, 2], b"body"));
        let (h, p, b) = unpack(&packed).unwrap();
        assert_eq!(
            (&h[..], &p[..], &b[..]),
            (&b"{\"Done\":1}"[..], &[0x80u8, 0, 2][..], &b"body"[..])
        );
        let empty = Bytes::from(pack(b"{}", &[], &[]));
        let (h, p, b) = unpack(&empty).unwrap();
        assert_eq!((&h[..], p.len(), b.len()), (&b"{}"[..], 0, 0));
        // Every cut of a payload is refused, never read past its end.
        for cut in 0..packed.len() - 4 {
            let short = packed.slice(..cut);
            assert!(unpack(&short).is_err(), "cut at {cut}");
        }
        let lying = Bytes::from_static(&[0, 0, 0, 9, b'{', b'}']);
        assert_eq!(unpack(&lying), Err(FrameError::Length(9)));
        let huge = Bytes::from_static(&[0xff, 0xff, 0xff, 0xff]);
        assert!(unpack(&huge).is_err());
        // The new kinds are known.
        let mut buf = BytesMut::new();
        encode(Kind::Data, &packed, &mut buf);
        encode(Kind::Link, b"warren@a", &mut buf);
        assert_eq!(
            decode(&mut buf, MAX_FRAME).unwrap().unwrap().kind,
            Kind::Data
        );
        assert_eq!(
            decode(&mut buf, MAX_FRAME).unwrap().unwrap().kind,
            Kind::Link
        );
    }

    #[test]
    fn before_the_handshake_frames_are_small() {
        let mut buf = BytesMut::new();
        encode(Kind::Hello, &[b'x'; 5000], &mut buf);
        assert_eq!(
            decode(&mut buf.clone(), MAX_HANDSHAKE_FRAME),
            Err(FrameError::Length(5001))
        );
        assert!(decode(&mut buf, MAX_FRAME).unwrap().is_some());
    }
}
