//! # warren
//!
//! A RabbitMQ-compatible AMQP 0-9-1 message broker.
//!
//! # Layout
//! - `wire`: AMQP frames, methods (generated from `amqp-spec/`), field tables and
//!   content properties; pure bytes in and out, no I/O.
//! - `broker`: vhosts, exchanges, bindings, queues, consumers and routing; no I/O
//!   and no clock: callers pass `now`.
//! - `session`: the AMQP connection and channel protocol state machines, sans-IO
//!   (bytes and `now` in, events and bytes out).
//! - `amqp`: the broker-facing channel methods, one file per AMQP class.
//! - `clock`: the wall clock, read by the I/O side (server, admin, ticker) only.
//! - `server`: the AMQP listener, one task per connection driving a session.
//! - `admin`: the HTTP management API (RabbitMQ-shaped JSON) and Prometheus metrics.
//! - `config`: settings from defaults, a TOML file and `WARREN_*` variables.
//! - `error`: errors that carry AMQP reply codes.

pub mod admin;
pub mod amqp;
pub mod broker;
pub mod clock;
pub mod config;
pub mod error;
pub mod server;
pub mod session;
pub mod storage;
pub mod wire;

pub use config::Config;

use std::sync::Arc;

/// A running broker: the AMQP server (and, when enabled, the admin API).
pub struct Warren {
    pub server: server::Server,
    admin: Option<std::net::SocketAddr>,
}

impl Warren {
    pub fn amqp_addr(&self) -> std::net::SocketAddr {
        self.server.amqp_addr()
    }

    /// Where the admin HTTP API listens (None when `admin_enabled` is false).
    pub fn admin_addr(&self) -> Option<std::net::SocketAddr> {
        self.admin
    }
}

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Storage(#[from] storage::StorageError),
    #[error("cannot listen: {0}")]
    Io(#[from] std::io::Error),
}

/// Start a broker with `config` on the current tokio runtime.
pub async fn start(config: Config) -> Result<Warren, StartError> {
    let config = Arc::new(config);
    let started = std::time::Instant::now();
    let broker = broker::Broker::open(&config, clock::now_ms())?;
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "broker opened"
    );
    let server = server::start(Arc::clone(&config), Arc::clone(&broker)).await?;
    let admin = if config.admin_enabled {
        let addr = format!("{}:{}", bracket(&config.bind), config.admin_port);
        let every = std::time::Duration::from_secs(config.admin_sample_interval_secs.max(1));
        Some(admin::start(&addr, Arc::clone(&broker), every).await?)
    } else {
        None
    };
    let ticker = Arc::downgrade(&broker);
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(std::time::Duration::from_millis(20));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks = 0u32;
        loop {
            interval.tick().await;
            let Some(broker) = ticker.upgrade() else {
                return;
            };
            broker.tick(clock::now_ms());
            ticks = ticks.wrapping_add(1);
            if ticks.is_multiple_of(10) {
                broker.check_memory();
            }
        }
    });
    Ok(Warren { server, admin })
}

/// An IPv6 literal in brackets, for `host:port`.
fn bracket(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}
