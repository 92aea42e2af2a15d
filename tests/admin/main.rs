//! The admin HTTP API and `/metrics` against a real broker (admin enabled, port 0),
//! plus AMQP permission enforcement with lapin.

#[path = "../common/mod.rs"]
mod common;
mod helpers;

mod access;
mod charts;
mod cli;
mod connections;
mod definitions;
mod metrics;
mod overview;
mod policies;
mod queue_stats;
mod restart;
mod topology;
mod vhosts;
mod web_ui;
