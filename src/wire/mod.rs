//! The AMQP 0-9-1 wire format: bytes in, frames and methods out, and back.
//!
//! Pure code with no I/O. Methods, content properties, reply codes and
//! constants are generated from `amqp-spec/` at build time; see
//! [`methods`]. [`frame`] splits a byte stream into frames, [`types`] owns
//! field tables, and [`error`] says why input was refused.

pub mod amqp10;
pub mod error;
pub mod frame;
pub mod methods;
pub mod stream;
pub mod types;

pub use error::WireError;
pub use frame::*;
pub use methods::*;
pub use types::*;
