//! What the server sends on a stream connection: responses to requests and
//! the server's own commands (tune, publish confirm/error, deliver, metadata
//! update, consumer update, close, heartbeat), each encoded as one whole
//! frame appended to a buffer.
//!
//! [`deliver_head`] writes only the start of a deliver frame: the chunk's
//! entries follow as the stored bytes themselves (no copy), so the size
//! field counts them.

use bytes::{BufMut, BytesMut};

use super::key;
use super::request::{frame, put_pairs, put_string, put_strings};

/// The length of an osiris chunk header, as deliver carries it.
pub const CHUNK_HEADER_LEN: usize = 48;

/// A response carrying only its code.
pub fn generic(buf: &mut BytesMut, k: u16, correlation_id: u32, code: u16) {
    frame(buf, k | key::RESPONSE, 1, |b| {
        b.put_u32(correlation_id);
        b.put_u16(code);
    });
}

/// A response with key/value pairs (peer properties, open).
pub fn with_pairs(
    buf: &mut BytesMut,
    k: u16,
    correlation_id: u32,
    code: u16,
    pairs: &[(String, String)],
) {
    frame(buf, k | key::RESPONSE, 1, |b| {
        b.put_u32(correlation_id);
        b.put_u16(code);
        put_pairs(b, pairs);
    });
}

/// A response with a list of strings (SASL mechanisms, route, partitions).
pub fn with_strings(buf: &mut BytesMut, k: u16, correlation_id: u32, code: u16, items: &[String]) {
    frame(buf, k | key::RESPONSE, 1, |b| {
        b.put_u32(correlation_id);
        b.put_u16(code);
        put_strings(b, items);
    });
}

/// A response with one u64 (query publisher sequence, query offset).
pub fn with_u64(buf: &mut BytesMut, k: u16, correlation_id: u32, code: u16, value: u64) {
    frame(buf, k | key::RESPONSE, 1, |b| {
        b.put_u32(correlation_id);
        b.put_u16(code);
        b.put_u64(value);
    });
}

/// The server's tune.
pub fn tune(buf: &mut BytesMut, frame_max: u32, heartbeat: u32) {
    frame(buf, key::TUNE, 1, |b| {
        b.put_u32(frame_max);
        b.put_u32(heartbeat);
    });
}

/// A close the server starts.
pub fn close(buf: &mut BytesMut, correlation_id: u32, code: u16, reason: &str) {
    frame(buf, key::CLOSE, 1, |b| {
        b.put_u32(correlation_id);
        b.put_u16(code);
        put_string(b, reason);
    });
}

pub fn heartbeat(buf: &mut BytesMut) {
    frame(buf, key::HEARTBEAT, 1, |_| {});
}

/// One broker of a metadata response.
pub struct Broker<'a> {
    pub reference: u16,
    pub host: &'a str,
    pub port: u32,
}

/// One stream of a metadata response.
pub struct StreamMetadata<'a> {
    pub stream: &'a str,
    pub code: u16,
    pub leader: u16,
    pub replicas: &'a [u16],
}

pub fn metadata(
    buf: &mut BytesMut,
    correlation_id: u32,
    brokers: &[Broker<'_>],
    streams: &[StreamMetadata<'_>],
) {
    frame(buf, key::METADATA | key::RESPONSE, 1, |b| {
        b.put_u32(correlation_id);
        b.put_i32(brokers.len() as i32);
        for br in brokers {
            b.put_u16(br.reference);
            put_string(b, br.host);
            b.put_u32(br.port);
        }
        b.put_i32(streams.len() as i32);
        for s in streams {
            put_string(b, s.stream);
            b.put_u16(s.code);
            b.put_u16(s.leader);
            b.put_i32(s.replicas.len() as i32);
            for r in s.replicas {
                b.put_u16(*r);
            }
        }
    });
}

pub fn metadata_update(buf: &mut BytesMut, code: u16, stream: &str) {
    frame(buf, key::METADATA_UPDATE, 1, |b| {
        b.put_u16(code);
        put_string(b, stream);
    });
}

/// A confirm of `count` publishing ids (what `ids` yields).
pub fn publish_confirm(
    buf: &mut BytesMut,
    publisher_id: u8,
    count: usize,
    ids: impl Iterator<Item = u64>,
) {
    frame(buf, key::PUBLISH_CONFIRM, 1, |b| {
        b.put_u8(publisher_id);
        b.put_i32(count as i32);
        for id in ids {
            b.put_u64(id);
        }
    });
}

pub fn publish_error(buf: &mut BytesMut, publisher_id: u8, errors: &[(u64, u16)]) {
    frame(buf, key::PUBLISH_ERROR, 1, |b| {
        b.put_u8(publisher_id);
        b.put_i32(errors.len() as i32);
        for (id, code) in errors {
            b.put_u64(*id);
            b.put_u16(*code);
        }
    });
}

/// The answer to a credit for an unknown subscription (no correlation id).
pub fn credit_error(buf: &mut BytesMut, code: u16, subscription_id: u8) {
    frame(buf, key::CREDIT | key::RESPONSE, 1, |b| {
        b.put_u16(code);
        b.put_u8(subscription_id);
    });
}

/// The size (the frame's length field) of a deliver frame of `version`
/// carrying `data_len` bytes of entries.
pub fn deliver_size(version: u16, data_len: u32) -> u32 {
    let extra = if version >= 2 { 8 } else { 0 };
    (4 + 1 + extra + CHUNK_HEADER_LEN as u32).saturating_add(data_len)
}

/// The start of a deliver frame: its size counts `data_len` bytes of
/// entries the caller sends right after. `header` is the chunk's stored
/// header, sent as stored (as RabbitMQ's osiris sends it): its trailer
/// length and bloom size stay, though the bloom filter and the trailer are
/// not sent (clients read `data_len` bytes of entries). Version 2 carries
/// the committed chunk id.
pub fn deliver_head(
    buf: &mut BytesMut,
    version: u16,
    subscription_id: u8,
    committed_chunk_id: u64,
    header: &[u8; CHUNK_HEADER_LEN],
    data_len: u32,
) {
    buf.put_u32(deliver_size(version, data_len));
    buf.put_u16(key::DELIVER);
    buf.put_u16(version);
    buf.put_u8(subscription_id);
    if version >= 2 {
        buf.put_u64(committed_chunk_id);
    }
    buf.put_slice(header);
}

pub fn consumer_update(buf: &mut BytesMut, correlation_id: u32, subscription_id: u8, active: bool) {
    frame(buf, key::CONSUMER_UPDATE, 1, |b| {
        b.put_u32(correlation_id);
        b.put_u8(subscription_id);
        b.put_u8(u8::from(active));
    });
}

pub fn command_versions(
    buf: &mut BytesMut,
    correlation_id: u32,
    code: u16,
    versions: &[(u16, u16, u16)],
) {
    frame(
        buf,
        key::EXCHANGE_COMMAND_VERSIONS | key::RESPONSE,
        1,
        |b| {
            b.put_u32(correlation_id);
            b.put_u16(code);
            b.put_i32(versions.len() as i32);
            for (k, lo, hi) in versions {
                b.put_u16(*k);
                b.put_u16(*lo);
                b.put_u16(*hi);
            }
        },
    );
}

pub fn stream_stats(buf: &mut BytesMut, correlation_id: u32, code: u16, stats: &[(&str, i64)]) {
    frame(buf, key::STREAM_STATS | key::RESPONSE, 1, |b| {
        b.put_u32(correlation_id);
        b.put_u16(code);
        b.put_i32(stats.len() as i32);
        for (k, v) in stats {
            put_string(b, k);
            b.put_i64(*v);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::stream::code;

    #[test]
    fn known_bytes() {
        let mut b = BytesMut::new();
        generic(&mut b, key::DECLARE_PUBLISHER, 7, code::OK);
        assert_eq!(&b[..], &[0, 0, 0, 10, 0x80, 1, 0, 1, 0, 0, 0, 7, 0, 1]);
        b.clear();
        publish_confirm(&mut b, 3, 2, [1u64, 2].into_iter());
        assert_eq!(
            &b[..],
            &[
                0, 0, 0, 25, 0, 3, 0, 1, 3, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0,
                0, 2
            ]
        );
        b.clear();
        credit_error(&mut b, code::SUBSCRIPTION_ID_DOES_NOT_EXIST, 5);
        assert_eq!(&b[..], &[0, 0, 0, 7, 0x80, 9, 0, 1, 0, 4, 5]);
        b.clear();
        tune(&mut b, 1 << 20, 60);
        assert_eq!(
            &b[..],
            &[0, 0, 0, 12, 0, 20, 0, 1, 0, 0x10, 0, 0, 0, 0, 0, 60]
        );
        b.clear();
        metadata(
            &mut b,
            1,
            &[Broker {
                reference: 0,
                host: "h",
                port: 5552,
            }],
            &[StreamMetadata {
                stream: "s",
                code: code::OK,
                leader: 0,
                replicas: &[],
            }],
        );
        let expect: &[u8] = &[
            0, 0, 0, 36, 0x80, 15, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, b'h', 0, 0, 0x15,
            0xb0, 0, 0, 0, 1, 0, 1, b's', 0, 1, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(&b[..], expect);
    }

    #[test]
    fn deliver_head_counts_the_entries() {
        let mut header = [0u8; CHUNK_HEADER_LEN];
        header[0] = 0x50;
        header[40..48].copy_from_slice(&[0, 0, 0, 9, 4, 1, 2, 3]);
        let mut b = BytesMut::new();
        deliver_head(&mut b, 1, 2, 0, &header, 10);
        assert_eq!(b.len(), 4 + 4 + 1 + 48);
        assert_eq!(&b[..4], &(4 + 1 + 48 + 10u32).to_be_bytes());
        assert_eq!(b[9], 0x50);
        // Trailer length and bloom size as stored (RabbitMQ sends them).
        assert_eq!(&b[b.len() - 8..], &[0, 0, 0, 9, 4, 1, 2, 3]);
        b.clear();
        deliver_head(&mut b, 2, 2, 99, &header, 10);
        assert_eq!(&b[..4], &(4 + 1 + 8 + 48 + 10u32).to_be_bytes());
        assert_eq!(&b[9..17], &99u64.to_be_bytes());
    }
}
