//! Protocol errors that carry an AMQP reply code.
//!
//! Broker and server code return [`AmqpError`]; the connection task turns a
//! soft error into `channel.close` and a hard error into `connection.close`,
//! adding the class and method id of the method being processed.

use crate::wire::reply_code;

/// An error to be reported to the peer with a reply code.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("{text}")]
pub struct AmqpError {
    /// The AMQP reply code (404, 406, 501, ...).
    pub code: u16,
    /// Reply text as RabbitMQ formats it: `NOT_FOUND - no queue 'q' in vhost '/'`.
    pub text: String,
    /// True for connection-level (hard) errors.
    pub hard: bool,
    /// Class and method that caused it, when known (0, 0 otherwise).
    pub class_id: u16,
    pub method_id: u16,
}

impl AmqpError {
    fn new(code: u16, hard: bool, detail: impl AsRef<str>) -> Self {
        AmqpError {
            code,
            text: format!("{} - {}", reply_code::reply_text(code), detail.as_ref()),
            hard,
            class_id: 0,
            method_id: 0,
        }
    }

    /// A channel error another node answered with (its code and full text).
    pub fn relayed(code: u16, text: String) -> Self {
        AmqpError {
            code,
            text,
            hard: false,
            class_id: 0,
            method_id: 0,
        }
    }

    /// Attach the offending method, unless one is already set.
    pub fn at(mut self, class_id: u16, method_id: u16) -> Self {
        if self.class_id == 0 && self.method_id == 0 {
            self.class_id = class_id;
            self.method_id = method_id;
        }
        self
    }

    // Channel (soft) errors.
    pub fn not_found(detail: impl AsRef<str>) -> Self {
        Self::new(reply_code::NOT_FOUND, false, detail)
    }
    pub fn precondition_failed(detail: impl AsRef<str>) -> Self {
        Self::new(reply_code::PRECONDITION_FAILED, false, detail)
    }
    pub fn access_refused(detail: impl AsRef<str>) -> Self {
        Self::new(reply_code::ACCESS_REFUSED, false, detail)
    }
    pub fn resource_locked(detail: impl AsRef<str>) -> Self {
        Self::new(reply_code::RESOURCE_LOCKED, false, detail)
    }

    // Connection (hard) errors.
    pub fn frame_error(detail: impl AsRef<str>) -> Self {
        Self::new(reply_code::FRAME_ERROR, true, detail)
    }
    pub fn syntax_error(detail: impl AsRef<str>) -> Self {
        Self::new(reply_code::SYNTAX_ERROR, true, detail)
    }
    pub fn command_invalid(detail: impl AsRef<str>) -> Self {
        Self::new(reply_code::COMMAND_INVALID, true, detail)
    }
    pub fn channel_error(detail: impl AsRef<str>) -> Self {
        Self::new(reply_code::CHANNEL_ERROR, true, detail)
    }
    pub fn unexpected_frame(detail: impl AsRef<str>) -> Self {
        Self::new(reply_code::UNEXPECTED_FRAME, true, detail)
    }
    pub fn resource_error(detail: impl AsRef<str>) -> Self {
        Self::new(reply_code::RESOURCE_ERROR, true, detail)
    }
    pub fn not_allowed(detail: impl AsRef<str>) -> Self {
        Self::new(reply_code::NOT_ALLOWED, true, detail)
    }
    pub fn not_implemented(detail: impl AsRef<str>) -> Self {
        Self::new(reply_code::NOT_IMPLEMENTED, true, detail)
    }
    pub fn internal_error(detail: impl AsRef<str>) -> Self {
        Self::new(reply_code::INTERNAL_ERROR, true, detail)
    }
    pub fn connection_forced(detail: impl AsRef<str>) -> Self {
        Self::new(reply_code::CONNECTION_FORCED, true, detail)
    }
    /// 403 as a connection error (login refused).
    pub fn access_refused_hard(detail: impl AsRef<str>) -> Self {
        Self::new(reply_code::ACCESS_REFUSED, true, detail)
    }
}

/// Result of broker and channel operations.
pub type AmqpResult<T> = Result<T, AmqpError>;
