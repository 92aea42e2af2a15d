//! Errors from decoding the wire: each one knows the reply code and the
//! offending class and method that the connection reports in `connection.close`.

use super::methods::{method_name, reply_code};

/// Why bytes from the peer could not be turned into a frame. All of these are
/// connection (hard) errors; the `Display` text is the detail of the
/// `connection.close` reply text (the caller prefixes `FRAME_ERROR - ` etc.).
#[derive(thiserror::Error, Debug)]
pub enum WireError {
    /// The octet after the payload was not `0xCE`.
    #[error("frame end octet is {0:#04x}, expected 0xce")]
    FrameEnd(u8),
    /// A frame (payload plus 8 octets of framing) larger than the negotiated frame_max.
    #[error("frame of {size} bytes is larger than the negotiated frame_max {max}")]
    FrameTooLarge { size: u32, max: u32 },
    /// A frame type other than method, header, body or heartbeat.
    #[error("unknown frame type {0}")]
    UnknownFrameType(u8),
    /// A heartbeat frame must have an empty payload.
    #[error("heartbeat frame with a payload of {0} bytes")]
    HeartbeatPayload(u32),
    /// A method frame for a class or method id we do not know.
    #[error("unknown method {class_id}.{method_id}")]
    UnknownMethod { class_id: u16, method_id: u16 },
    /// A method frame whose arguments do not parse, or have bytes left over.
    #[error("cannot decode {}: {detail}", describe(*.class_id, *.method_id))]
    Syntax {
        class_id: u16,
        method_id: u16,
        detail: String,
    },
    /// A content header frame that does not parse.
    #[error("malformed content header: {0}")]
    BadContentHeader(String),
    /// The transport failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

fn describe(class_id: u16, method_id: u16) -> String {
    match method_name(class_id, method_id) {
        Some(name) => format!("{name} ({class_id}.{method_id}) arguments"),
        None => "method frame".to_string(),
    }
}

impl WireError {
    /// The reply code for `connection.close`.
    ///
    /// RabbitMQ has no dedicated code for an unknown class or method id; we
    /// answer 503 COMMAND_INVALID (the peer sent a command we cannot accept).
    pub fn reply_code(&self) -> u16 {
        match self {
            WireError::FrameEnd(_)
            | WireError::FrameTooLarge { .. }
            | WireError::UnknownFrameType(_)
            | WireError::HeartbeatPayload(_) => reply_code::FRAME_ERROR,
            WireError::UnknownMethod { .. } => reply_code::COMMAND_INVALID,
            WireError::Syntax { .. } | WireError::BadContentHeader(_) => reply_code::SYNTAX_ERROR,
            WireError::Io(_) => reply_code::INTERNAL_ERROR,
        }
    }

    /// The (class id, method id) to report, or (0, 0) when no method is involved.
    pub fn class_method(&self) -> (u16, u16) {
        match *self {
            WireError::UnknownMethod {
                class_id,
                method_id,
            }
            | WireError::Syntax {
                class_id,
                method_id,
                ..
            } => (class_id, method_id),
            _ => (0, 0),
        }
    }
}
