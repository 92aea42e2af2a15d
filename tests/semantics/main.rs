//! RabbitMQ queue semantics: TTLs, queue expiry, priorities, dead-lettering and
//! `x-death`, length limits, argument validation, alternate exchanges, single active
//! consumer, consumer priorities, direct reply-to and the delayed-message exchange.
//!
//! Every test here was checked against RabbitMQ 3.10
//! (`WARREN_TEST_URI=amqp://guest:guest@127.0.0.1:5673/%2f cargo test --test semantics`)
//! except the delayed-message exchange, a plugin that reference broker lacks: those
//! tests skip themselves when the broker under test is on port 5673 (or when
//! `WARREN_TEST_RABBITMQ=1` says another RabbitMQ node is under test).
//! TTLs are tens to hundreds of ms so the file stays fast.

#[path = "../common/mod.rs"]
mod common;
mod helpers;

mod alternate_exchange;
mod arguments;
mod basic_get;
mod consumers;
mod dead_letter;
mod delayed_exchange;
mod direct_reply_to;
mod expires;
mod max_length;
mod priority;
mod ttl;
