//! On-disk encoding of message records (the unit inside a chunk, see segment.rs).
//!
//! This module owns the byte layout of everything the message store writes
//! for a message; nothing else in the storage layer knows these formats.
//!
//! # Message record, format version 1
//!
//! ```text
//! u8        format version (= 1)
//! u32 BE    exchange length,     then the exchange name (UTF-8)
//! u32 BE    routing key length,  then the routing key (UTF-8)
//! u32 BE    properties length,   then the properties (opaque bytes, encoded by the caller)
//! u32 BE    body length,         then the body
//! u8        flags: bit 0 = redelivered, bit 1 = expires_at present (other bits must be 0)
//! u64 BE    expires_at           only if flag bit 1 is set
//! ```
//!
//! Nothing may follow the record. [`decode_message`] never panics: any
//! truncated, oversized, unknown-version or otherwise malformed input is
//! returned as a [`DecodeError`] that the store turns into
//! `StorageError::Corrupt` naming the store's path.
//!
use bytes::Bytes;

use super::StoredMessage;

/// The only record format version this build writes and reads.
pub const RECORD_VERSION: u8 = 1;

const FLAG_REDELIVERED: u8 = 0b01;
const FLAG_EXPIRES: u8 = 0b10;
const KNOWN_FLAGS: u8 = FLAG_REDELIVERED | FLAG_EXPIRES;

/// Why a record or key could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(pub String);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Encoded size of `msg`, in bytes.
#[cfg(test)]
fn encoded_len(msg: &StoredMessage) -> usize {
    parts(msg).encoded_len()
}

/// Encodes `msg` in the current record format.
pub fn encode_message(msg: &StoredMessage) -> Vec<u8> {
    encode_parts(&parts(msg))
}

/// The borrowed fields of a stored message.
fn parts(msg: &StoredMessage) -> MessageParts<'_> {
    MessageParts {
        exchange: &msg.exchange,
        routing_key: &msg.routing_key,
        properties: &msg.properties,
        body: &msg.body,
        redelivered: msg.redelivered,
        expires_at: msg.expires_at,
    }
}

/// The fields of a message record, borrowed (so a caller holding them in
/// other types encodes without building a [`StoredMessage`] first).
#[derive(Debug, Clone, Copy)]
pub struct MessageParts<'a> {
    pub exchange: &'a str,
    pub routing_key: &'a str,
    /// Opaque: encoded by the caller.
    pub properties: &'a [u8],
    pub body: &'a [u8],
    pub redelivered: bool,
    pub expires_at: Option<u64>,
}

impl MessageParts<'_> {
    /// Encoded size in bytes.
    fn encoded_len(&self) -> usize {
        1 + 4 * 4
            + self.exchange.len()
            + self.routing_key.len()
            + self.properties.len()
            + self.body.len()
            + 1
            + if self.expires_at.is_some() { 8 } else { 0 }
    }
}

/// Encodes borrowed message fields in the current record format.
pub fn encode_parts(msg: &MessageParts<'_>) -> Vec<u8> {
    let mut out = Vec::with_capacity(msg.encoded_len());
    out.push(RECORD_VERSION);
    for part in [
        msg.exchange.as_bytes(),
        msg.routing_key.as_bytes(),
        msg.properties,
        msg.body,
    ] {
        put_len(&mut out, part.len());
        out.extend_from_slice(part);
    }
    let mut flags = 0u8;
    if msg.redelivered {
        flags |= FLAG_REDELIVERED;
    }
    if msg.expires_at.is_some() {
        flags |= FLAG_EXPIRES;
    }
    out.push(flags);
    if let Some(at) = msg.expires_at {
        out.extend_from_slice(&at.to_be_bytes());
    }
    out
}

fn put_len(out: &mut Vec<u8>, len: usize) {
    let len = u32::try_from(len).expect("message field larger than 4 GiB");
    out.extend_from_slice(&len.to_be_bytes());
}

/// Decodes a record. `buf` is shared: properties and body are zero-copy
/// slices of it.
pub fn decode_message(buf: Bytes) -> Result<StoredMessage, DecodeError> {
    let mut r = Reader { buf: &buf, pos: 0 };
    let version = r.u8("format version")?;
    if version != RECORD_VERSION {
        return Err(DecodeError(format!(
            "unknown message record format version {version} (this build reads version {RECORD_VERSION})"
        )));
    }
    let exchange = r.string("exchange")?;
    let routing_key = r.string("routing key")?;
    let (p0, p1) = r.field("properties")?;
    let (b0, b1) = r.field("body")?;
    let flags = r.u8("flags")?;
    if flags & !KNOWN_FLAGS != 0 {
        return Err(DecodeError(format!("unknown flag bits {flags:#04x}")));
    }
    let expires_at = if flags & FLAG_EXPIRES != 0 {
        Some(r.u64("expires_at")?)
    } else {
        None
    };
    if r.pos != buf.len() {
        return Err(DecodeError(format!(
            "{} trailing bytes after the record",
            buf.len() - r.pos
        )));
    }
    Ok(StoredMessage {
        exchange,
        routing_key,
        properties: buf.slice(p0..p1),
        body: buf.slice(b0..b1),
        redelivered: flags & FLAG_REDELIVERED != 0,
        expires_at,
    })
}

/// A bounds-checked reader over a record (shared by the segment formats).
pub(super) struct Reader<'a> {
    pub(super) buf: &'a [u8],
    pub(super) pos: usize,
}

impl Reader<'_> {
    pub(super) fn take(&mut self, n: usize, what: &str) -> Result<&[u8], DecodeError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.buf.len())
            .ok_or_else(|| {
                DecodeError(format!(
                    "record truncated reading {what}: need {n} bytes at offset {}, record is {} bytes",
                    self.pos,
                    self.buf.len()
                ))
            })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    pub(super) fn u8(&mut self, what: &str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }

    pub(super) fn u32(&mut self, what: &str) -> Result<u32, DecodeError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(super) fn u64(&mut self, what: &str) -> Result<u64, DecodeError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// A length-prefixed field; returns its byte range within the buffer.
    fn field(&mut self, what: &str) -> Result<(usize, usize), DecodeError> {
        let len = self.u32(what)? as usize;
        let start = self.pos;
        self.take(len, what)?;
        Ok((start, self.pos))
    }

    fn string(&mut self, what: &str) -> Result<String, DecodeError> {
        let (a, b) = self.field(what)?;
        std::str::from_utf8(&self.buf[a..b])
            .map(str::to_owned)
            .map_err(|e| DecodeError(format!("{what} is not valid UTF-8: {e}")))
    }
}

/// The smallest key greater than every key starting with `prefix`, or
/// `None` if there is none (prefix is all 0xff).
pub fn prefix_successor(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut k = prefix.to_vec();
    while let Some(last) = k.pop() {
        if last != 0xff {
            k.push(last + 1);
            return Some(k);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> StoredMessage {
        StoredMessage {
            exchange: "amq.direct".into(),
            routing_key: "rk.1".into(),
            properties: Bytes::from_static(b"\x01\x02props"),
            body: Bytes::from_static(b"hello body"),
            redelivered: true,
            expires_at: Some(1_700_000_000_123),
        }
    }

    #[test]
    fn round_trip() {
        let m = sample();
        let enc = encode_message(&m);
        assert_eq!(enc.len(), encoded_len(&m));
        assert_eq!(decode_message(Bytes::from(enc)).unwrap(), m);
        let m2 = StoredMessage {
            exchange: String::new(),
            routing_key: String::new(),
            properties: Bytes::new(),
            body: Bytes::new(),
            redelivered: false,
            expires_at: None,
        };
        let enc = encode_message(&m2);
        assert_eq!(enc.len(), encoded_len(&m2));
        assert_eq!(decode_message(Bytes::from(enc)).unwrap(), m2);
    }

    #[test]
    fn every_truncation_and_garbage_is_an_error_not_a_panic() {
        let enc = encode_message(&sample());
        for n in 0..enc.len() {
            assert!(decode_message(Bytes::copy_from_slice(&enc[..n])).is_err());
        }
        let mut extra = enc.clone();
        extra.push(0);
        assert!(decode_message(Bytes::from(extra)).is_err());
        let mut v2 = enc.clone();
        v2[0] = 2;
        assert!(decode_message(Bytes::from(v2)).is_err());
        // Pseudo-random garbage, including huge length prefixes.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in 0..300 {
            let mut g = Vec::with_capacity(len);
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                g.push(x as u8);
            }
            let _ = decode_message(Bytes::from(g));
        }
        let huge = [1u8, 0xff, 0xff, 0xff, 0xff, 0];
        assert!(decode_message(Bytes::copy_from_slice(&huge)).is_err());
    }

    #[test]
    fn prefix_successor_skips_ff() {
        assert_eq!(prefix_successor(&[1, 0xff]), Some(vec![2]));
        assert_eq!(prefix_successor(&[0xff]), None);
    }
}
