//! The RabbitMQ Stream protocol wire format (port 5552): frames, command
//! keys and versions, response codes, and the commands both ways.
//!
//! Pure code with no I/O. A frame is `size:u32, key:u16, version:u16,
//! content`; a key with the top bit set is a response. [`check_frame`] cuts a
//! frame out of a byte stream (refusing one larger than the negotiated
//! maximum); [`request::parse`] turns a client frame into a
//! [`request::Request`] with nom, refusing unknown keys, unsupported
//! versions and trailing bytes with [`ParseFailure`], which carries the
//! response code the connection answers with; [`response`] encodes what the
//! server sends. The keys, versions and codes here are checked against
//! `amqp-spec/stream-protocol.json` by a test.

pub mod request;
pub mod response;

pub use request::{OffsetSpec, Published, Request, SubBatch};

/// Command keys.
pub mod key {
    pub const DECLARE_PUBLISHER: u16 = 1;
    pub const PUBLISH: u16 = 2;
    pub const PUBLISH_CONFIRM: u16 = 3;
    pub const PUBLISH_ERROR: u16 = 4;
    pub const QUERY_PUBLISHER_SEQUENCE: u16 = 5;
    pub const DELETE_PUBLISHER: u16 = 6;
    pub const SUBSCRIBE: u16 = 7;
    pub const DELIVER: u16 = 8;
    pub const CREDIT: u16 = 9;
    pub const STORE_OFFSET: u16 = 10;
    pub const QUERY_OFFSET: u16 = 11;
    pub const UNSUBSCRIBE: u16 = 12;
    pub const CREATE: u16 = 13;
    pub const DELETE: u16 = 14;
    pub const METADATA: u16 = 15;
    pub const METADATA_UPDATE: u16 = 16;
    pub const PEER_PROPERTIES: u16 = 17;
    pub const SASL_HANDSHAKE: u16 = 18;
    pub const SASL_AUTHENTICATE: u16 = 19;
    pub const TUNE: u16 = 20;
    pub const OPEN: u16 = 21;
    pub const CLOSE: u16 = 22;
    pub const HEARTBEAT: u16 = 23;
    pub const ROUTE: u16 = 24;
    pub const PARTITIONS: u16 = 25;
    pub const CONSUMER_UPDATE: u16 = 26;
    pub const EXCHANGE_COMMAND_VERSIONS: u16 = 27;
    pub const STREAM_STATS: u16 = 28;
    pub const CREATE_SUPER_STREAM: u16 = 29;
    pub const DELETE_SUPER_STREAM: u16 = 30;
    /// The bit that marks a response.
    pub const RESPONSE: u16 = 0x8000;
}

/// Response codes.
pub mod code {
    pub const OK: u16 = 1;
    pub const STREAM_DOES_NOT_EXIST: u16 = 2;
    pub const SUBSCRIPTION_ID_ALREADY_EXISTS: u16 = 3;
    pub const SUBSCRIPTION_ID_DOES_NOT_EXIST: u16 = 4;
    pub const STREAM_ALREADY_EXISTS: u16 = 5;
    pub const STREAM_NOT_AVAILABLE: u16 = 6;
    pub const SASL_MECHANISM_NOT_SUPPORTED: u16 = 7;
    pub const AUTHENTICATION_FAILURE: u16 = 8;
    pub const SASL_ERROR: u16 = 9;
    pub const SASL_CHALLENGE: u16 = 10;
    pub const SASL_AUTHENTICATION_FAILURE_LOOPBACK: u16 = 11;
    pub const VIRTUAL_HOST_ACCESS_FAILURE: u16 = 12;
    pub const UNKNOWN_FRAME: u16 = 13;
    pub const FRAME_TOO_LARGE: u16 = 14;
    pub const INTERNAL_ERROR: u16 = 15;
    pub const ACCESS_REFUSED: u16 = 16;
    pub const PRECONDITION_FAILED: u16 = 17;
    pub const PUBLISHER_DOES_NOT_EXIST: u16 = 18;
    pub const NO_OFFSET: u16 = 19;
}

/// (key, lowest version, highest version) of every command this codec
/// knows, as the command-version exchange reports them: in key order from
/// 1 with no gap (`rstream` reads a key's entry at index key - 1).
pub const COMMAND_VERSIONS: &[(u16, u16, u16)] = &[
    (key::DECLARE_PUBLISHER, 1, 1),
    (key::PUBLISH, 1, 2),
    (key::PUBLISH_CONFIRM, 1, 1),
    (key::PUBLISH_ERROR, 1, 1),
    (key::QUERY_PUBLISHER_SEQUENCE, 1, 1),
    (key::DELETE_PUBLISHER, 1, 1),
    (key::SUBSCRIBE, 1, 1),
    (key::DELIVER, 1, 2),
    (key::CREDIT, 1, 1),
    (key::STORE_OFFSET, 1, 1),
    (key::QUERY_OFFSET, 1, 1),
    (key::UNSUBSCRIBE, 1, 1),
    (key::CREATE, 1, 1),
    (key::DELETE, 1, 1),
    (key::METADATA, 1, 1),
    (key::METADATA_UPDATE, 1, 1),
    (key::PEER_PROPERTIES, 1, 1),
    (key::SASL_HANDSHAKE, 1, 1),
    (key::SASL_AUTHENTICATE, 1, 1),
    (key::TUNE, 1, 1),
    (key::OPEN, 1, 1),
    (key::CLOSE, 1, 1),
    (key::HEARTBEAT, 1, 1),
    (key::ROUTE, 1, 1),
    (key::PARTITIONS, 1, 1),
    (key::CONSUMER_UPDATE, 1, 1),
    (key::EXCHANGE_COMMAND_VERSIONS, 1, 1),
    (key::STREAM_STATS, 1, 1),
    (key::CREATE_SUPER_STREAM, 1, 1),
    (key::DELETE_SUPER_STREAM, 1, 1),
];

/// Whether `version` of command `key` is one this codec reads.
pub fn supported(key: u16, version: u16) -> bool {
    COMMAND_VERSIONS
        .iter()
        .any(|&(k, lo, hi)| k == key && (lo..=hi).contains(&version))
}

/// The smallest frame-max a peer may set (RabbitMQ's floor for the tune).
pub const MIN_FRAME_MAX: u32 = 8192;

/// Why bytes could not be cut into a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {size} bytes is larger than the maximum {max}")]
    TooLarge { size: u32, max: u32 },
    #[error("frame of {0} bytes is too short for a key and version")]
    TooShort(u32),
}

impl FrameError {
    /// The response code the connection closes with.
    pub fn code(&self) -> u16 {
        match self {
            FrameError::TooLarge { .. } => code::FRAME_TOO_LARGE,
            FrameError::TooShort(_) => code::UNKNOWN_FRAME,
        }
    }
}

/// The length of the whole frame (size field included) at the start of
/// `buf`, once all of it is there; `max` (0: none) bounds the size field.
pub fn check_frame(buf: &[u8], max: u32) -> Result<Option<usize>, FrameError> {
    let Some(head) = buf.get(..4) else {
        return Ok(None);
    };
    let size = u32::from_be_bytes([head[0], head[1], head[2], head[3]]);
    if max != 0 && size > max {
        return Err(FrameError::TooLarge { size, max });
    }
    if size < 4 {
        return Err(FrameError::TooShort(size));
    }
    let total = 4 + size as usize;
    Ok((buf.len() >= total).then_some(total))
}

/// Why a frame's content was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseFailure {
    #[error("unknown command key {key:#06x}")]
    UnknownKey { key: u16, version: u16 },
    #[error("unsupported version {version} of command {key:#06x}")]
    UnsupportedVersion { key: u16, version: u16 },
    #[error("malformed command {key:#06x}: {detail}")]
    Malformed { key: u16, detail: String },
}

impl ParseFailure {
    /// The response code the connection closes with (RabbitMQ answers any
    /// frame it cannot parse with "unknown frame").
    pub fn code(&self) -> u16 {
        code::UNKNOWN_FRAME
    }
}

#[cfg(test)]
mod spec_tests {
    use super::*;

    #[derive(serde::Deserialize)]
    struct Spec {
        response_flag: u16,
        commands: Vec<Command>,
        response_codes: Vec<Code>,
    }

    #[derive(serde::Deserialize)]
    struct Command {
        name: String,
        key: u16,
        versions: Vec<u16>,
    }

    #[derive(serde::Deserialize)]
    struct Code {
        code: u16,
    }

    /// The codec's tables are the spec file's.
    #[test]
    fn tables_match_the_spec_file() {
        let spec: Spec =
            serde_json::from_str(include_str!("../../../amqp-spec/stream-protocol.json"))
                .expect("spec parses");
        assert_eq!(spec.response_flag, key::RESPONSE);
        assert_eq!(spec.commands.len(), COMMAND_VERSIONS.len());
        for (c, &(k, lo, hi)) in spec.commands.iter().zip(COMMAND_VERSIONS) {
            assert_eq!(c.key, k, "{}", c.name);
            let (min, max) = (
                c.versions.iter().copied().min().unwrap_or(0),
                c.versions.iter().copied().max().unwrap_or(0),
            );
            assert_eq!((min, max), (lo, hi), "{}", c.name);
            assert_eq!(c.versions.len(), usize::from(hi - lo + 1), "{}", c.name);
        }
        let codes: Vec<u16> = spec.response_codes.iter().map(|c| c.code).collect();
        assert_eq!(
            codes,
            vec![
                code::OK,
                code::STREAM_DOES_NOT_EXIST,
                code::SUBSCRIPTION_ID_ALREADY_EXISTS,
                code::SUBSCRIPTION_ID_DOES_NOT_EXIST,
                code::STREAM_ALREADY_EXISTS,
                code::STREAM_NOT_AVAILABLE,
                code::SASL_MECHANISM_NOT_SUPPORTED,
                code::AUTHENTICATION_FAILURE,
                code::SASL_ERROR,
                code::SASL_CHALLENGE,
                code::SASL_AUTHENTICATION_FAILURE_LOOPBACK,
                code::VIRTUAL_HOST_ACCESS_FAILURE,
                code::UNKNOWN_FRAME,
                code::FRAME_TOO_LARGE,
                code::INTERNAL_ERROR,
                code::ACCESS_REFUSED,
                code::PRECONDITION_FAILED,
                code::PUBLISHER_DOES_NOT_EXIST,
                code::NO_OFFSET,
            ]
        );
    }

    #[test]
    fn frames_are_cut_and_bounded() {
        assert_eq!(check_frame(&[0, 0], 0), Ok(None));
        assert_eq!(check_frame(&[0, 0, 0, 4, 0, 23, 0], 0), Ok(None));
        assert_eq!(check_frame(&[0, 0, 0, 4, 0, 23, 0, 1, 9], 0), Ok(Some(8)));
        assert_eq!(
            check_frame(&[0, 1, 0, 0], 100),
            Err(FrameError::TooLarge {
                size: 65536,
                max: 100
            })
        );
        assert_eq!(
            check_frame(&[0, 0, 0, 3, 0, 0, 0], 0),
            Err(FrameError::TooShort(3))
        );
        assert!(supported(key::PUBLISH, 2) && !supported(key::PUBLISH, 3));
        for (i, (k, ..)) in COMMAND_VERSIONS.iter().enumerate() {
            assert_eq!(usize::from(*k), i + 1);
        }
        assert!(!supported(99, 1));
    }
}
