//! The connection handshake's pure parts: the protocol header check, the server
//! properties of `connection.start`, SASL credentials (PLAIN, AMQPLAIN) and the
//! `connection.tune-ok` rules for frame_max and channel_max.

use crate::error::AmqpError;
use crate::wire::*;

/// The smallest frame_max; the handshake runs with it.
pub const FRAME_MIN_SIZE: u32 = constants::FRAME_MIN_SIZE;

/// channel_max offered when the configuration says 0 (no limit).
pub const SERVER_CHANNEL_MAX_DEFAULT: u16 = 2047;

/// What the first 8 bytes say.
#[derive(Debug, PartialEq, Eq)]
pub enum Header {
    /// Fewer than 8 bytes so far.
    Incomplete,
    Ok,
    /// Anything but `AMQP 0 0 9 1`: answer with our header and close.
    Wrong,
}

pub fn check_header(input: &[u8]) -> Header {
    if input.len() < PROTOCOL_HEADER.len() {
        return Header::Incomplete;
    }
    if &input[..PROTOCOL_HEADER.len()] == PROTOCOL_HEADER {
        Header::Ok
    } else {
        Header::Wrong
    }
}

/// What the server says of itself in `connection.start`. Stock clients and
/// their test suites look for RabbitMQ's identity (amqplib's asserts
/// `product` is `RabbitMQ`; clients gate features on `version`), so these
/// are RabbitMQ's, at the feature level warren implements (as on the Stream
/// protocol's peer properties); `platform` and `information` name warren.
/// `cluster_name`: the broker's (its `cluster_name` parameter, else the
/// node's name).
pub fn server_properties(cluster_name: &str) -> FieldTable {
    let mut caps = FieldTable::new();
    for cap in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "consumer_priorities",
        "authentication_failure_close",
        "per_consumer_qos",
        "direct_reply_to",
    ] {
        caps.insert(cap, FieldValue::Bool(true));
    }
    let mut props = FieldTable::new();
    props.insert("capabilities", FieldValue::Table(caps));
    props.insert("cluster_name", FieldValue::string(cluster_name));
    props.insert(
        "copyright",
        FieldValue::string("Copyright (c) the warren authors"),
    );
    props.insert(
        "information",
        FieldValue::string("warren, licensed under the MIT or Apache-2.0 license"),
    );
    props.insert(
        "platform",
        FieldValue::string(concat!("warren ", env!("CARGO_PKG_VERSION"), " (Rust)")),
    );
    props.insert("product", FieldValue::string(PRODUCT));
    props.insert("version", FieldValue::string(RABBITMQ_VERSION));
    props
}

/// The product name both protocols announce.
pub const PRODUCT: &str = "RabbitMQ";
/// The RabbitMQ version whose features warren implements, as both protocols
/// announce it.
pub const RABBITMQ_VERSION: &str = "3.13.0";

/// `connection.start` offering PLAIN and AMQPLAIN.
pub fn start(cluster_name: &str) -> Method {
    start_with(b"PLAIN AMQPLAIN", cluster_name)
}

/// `connection.start` that also offers EXTERNAL (a TLS connection with a
/// verified client certificate). PLAIN stays first for clients that take the
/// first mechanism they know.
pub fn start_external(cluster_name: &str) -> Method {
    start_with(b"PLAIN AMQPLAIN EXTERNAL", cluster_name)
}

fn start_with(mechanisms: &'static [u8], cluster_name: &str) -> Method {
    ConnectionStart {
        version_major: 0,
        version_minor: 9,
        server_properties: server_properties(cluster_name),
        mechanisms: bytes::Bytes::from_static(mechanisms),
        locales: bytes::Bytes::from_static(b"en_US"),
    }
    .into()
}

pub fn client_capability(props: &FieldTable, name: &str) -> bool {
    match props.get("capabilities") {
        Some(FieldValue::Table(caps)) => caps.get(name).and_then(|v| v.as_bool()).unwrap_or(false),
        _ => false,
    }
}

/// The SASL mechanism whose identity comes from the TLS client certificate.
pub const EXTERNAL: &str = "EXTERNAL";

/// Parse a SASL response into (user, password) (PLAIN, AMQPLAIN; EXTERNAL
/// carries no credentials and is handled by the session).
pub fn credentials(mechanism: &str, response: &[u8]) -> Option<(String, String)> {
    match mechanism {
        "PLAIN" => {
            let mut parts = response.split(|b| *b == 0);
            let _authzid = parts.next()?;
            let user = std::str::from_utf8(parts.next()?).ok()?.to_string();
            let pass = std::str::from_utf8(parts.next()?).ok()?.to_string();
            Some((user, pass))
        }
        "AMQPLAIN" => {
            let table = parse_table_entries(response)?;
            let user = table.get("LOGIN")?.as_str()?.to_string();
            let pass = table.get("PASSWORD")?.as_str()?.to_string();
            Some((user, pass))
        }
        _ => None,
    }
}

/// 403 for a login that failed, in RabbitMQ's words.
pub fn login_refused(mechanism: &str) -> AmqpError {
    AmqpError::access_refused_hard(format!(
        "Login was refused using authentication mechanism {mechanism}. For details see the broker logfile."
    ))
    .at(ConnectionStartOk::CLASS_ID, ConnectionStartOk::METHOD_ID)
}

/// The start-ok's response cannot be read: 403 as RabbitMQ answers.
pub fn bad_credentials(mechanism: &str) -> AmqpError {
    if mechanism == "PLAIN" || mechanism == "AMQPLAIN" {
        login_refused(mechanism)
    } else {
        AmqpError::access_refused_hard(format!(
            "unsupported authentication mechanism '{mechanism}'"
        ))
        .at(ConnectionStartOk::CLASS_ID, ConnectionStartOk::METHOD_ID)
    }
}

/// A `connection.update-secret` whose new secret was refused: 530, in
/// RabbitMQ's words.
pub fn secret_refused() -> AmqpError {
    AmqpError::not_allowed("New secret was refused by one of the backends").at(
        ConnectionUpdateSecret::CLASS_ID,
        ConnectionUpdateSecret::METHOD_ID,
    )
}

/// What the server offers in `connection.tune`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offer {
    pub channel_max: u16,
    pub frame_max: u32,
    pub heartbeat: u16,
}

impl Offer {
    /// From the configured values: frame_max at least the minimum, channel_max 0
    /// offered as 2047.
    pub fn new(frame_max: u32, channel_max: u16, heartbeat: u16) -> Offer {
        Offer {
            channel_max: if channel_max == 0 {
                SERVER_CHANNEL_MAX_DEFAULT
            } else {
                channel_max
            },
            frame_max: frame_max.max(FRAME_MIN_SIZE),
            heartbeat,
        }
    }

    pub fn tune(&self) -> Method {
        ConnectionTune {
            channel_max: self.channel_max,
            frame_max: self.frame_max,
            heartbeat: self.heartbeat,
        }
        .into()
    }

    /// The client's tune-ok: (frame_max, channel_max) in force, or 530.
    pub fn accept(&self, ok: &ConnectionTuneOk) -> Result<(u32, u16), AmqpError> {
        let at = |e: AmqpError| e.at(ConnectionTuneOk::CLASS_ID, ConnectionTuneOk::METHOD_ID);
        let frame_max = match ok.frame_max {
            0 => self.frame_max,
            f if f < FRAME_MIN_SIZE => {
                return Err(at(AmqpError::not_allowed(format!(
                    "frame_max={f} < {FRAME_MIN_SIZE} min size"
                ))))
            }
            f if f > self.frame_max => {
                return Err(at(AmqpError::not_allowed(format!(
                    "frame_max={f} > {} max size",
                    self.frame_max
                ))))
            }
            f => f,
        };
        let channel_max = match ok.channel_max {
            0 => self.channel_max,
            c => c.min(self.channel_max),
        };
        Ok((frame_max, channel_max))
    }
}
