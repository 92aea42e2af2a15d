//! The AMQP 0-9-1 connection and channel protocol state machines, sans-IO.
//!
//! A fully deterministic implementation of the session protocol: it contains no
//! networking code and reads no clock. The caller (the connection task in
//! `server`, a test, or the fuzz target) feeds it bytes and the current time, and
//! drains what it produces:
//!
//! - in: [`Session::handle_input`] (or [`Session::input_buffer`] +
//!   [`Session::handle_read`]), [`Session::handle_timeout`], [`Session::handle_eof`],
//!   and the answers and notices below;
//! - out: [`Session::poll_event`] (login and vhost decisions, methods and
//!   publishes for the broker-facing handlers, channel life cycle, the end),
//!   [`Session::poll_transmit`] (bytes for the socket), [`Session::poll_timeout`]
//!   (when to call `handle_timeout` next) and [`Session::poll_store_wait`]
//!   (store flushes that confirms or a commit wait for).
//!
//! Owned here: the protocol header check, start / tune / open, heartbeats (sent
//! when idle, the peer dead after two silent intervals not counting time we were
//! not reading), the handshake timeout, channel open / close / flow, content
//! assembly, publisher confirm batching, connection.blocked / unblocked, close
//! handshakes in both directions and every hard error (501-505, 530, 403, 541),
//! and the credential's expiry (an access token's `exp`, closing with 320 unless
//! a `connection.update-secret` the caller accepts moves it).
//!
//! Files by concern: [`handshake`] (pure handshake rules), `opening` (the
//! handshake states), [`connection`] (the state machine's API, input, timers,
//! closing), `routing` (frames of a running connection), [`channel`]
//! (per-channel state and the handlers' [`ChannelIo`]), [`content`] (content
//! assembly), [`confirms`], [`timer`] and [`output`].

pub mod channel;
pub mod confirms;
pub mod connection;
pub mod content;
pub mod handshake;
mod opening;
pub mod output;
mod routing;
pub mod stream;
pub mod stream_sac;
pub mod stream_stats;
pub mod timer;

#[cfg(test)]
mod tests;

pub use channel::ChannelIo;
pub use confirms::{Confirms, Outcome, StoreWait};
pub use connection::{ChannelGate, Config, Event, Session};
pub use content::Assembled;
pub use output::Output;
