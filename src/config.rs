//! Broker configuration: defaults, an optional TOML file, `WARREN_*` environment overrides.
//!
//! Loaded once in `main` (or by a test) and passed down; nothing reads it globally.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Every setting of the broker. See `warren.example.toml` for documentation of each key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// Address the AMQP and admin listeners bind to. `::` listens on IPv6 and IPv4.
    pub bind: String,
    /// AMQP port (5672). 0 picks a free port.
    pub amqp_port: u16,
    /// Admin HTTP port (15672). 0 picks a free port.
    pub admin_port: u16,
    /// Run the admin HTTP API.
    pub admin_enabled: bool,
    /// Seconds between samples of the message counters behind the API's rates.
    pub admin_sample_interval_secs: u64,
    /// Directory of the message store and topology.
    pub data_dir: PathBuf,
    /// Heartbeat interval the server proposes, in seconds (0 disables).
    pub heartbeat: u16,
    /// Largest frame the server accepts, in bytes (including the 8 bytes of framing).
    pub frame_max: u32,
    /// Highest channel number a connection may use.
    pub channel_max: u16,
    /// Largest message body accepted, in bytes; bigger publishes get 406.
    pub max_message_size: u64,
    /// Size of the message store's page cache in bytes (sled's cache capacity).
    pub store_cache_size: u64,
    /// Bytes of message bodies kept in memory across all queues; past it, persistent
    /// messages on durable queues are paged out to the store (0: never page).
    pub message_memory_limit: u64,
    /// Memory (RSS) above which publishers are blocked (connection.blocked), as a
    /// fraction of physical memory (RabbitMQ's vm_memory_high_watermark).
    pub vm_memory_high_watermark: f64,
    /// The same as an absolute number of bytes; overrides the fraction when non-zero.
    pub memory_high_watermark_bytes: u64,
    /// Seconds a client has to complete the handshake.
    pub handshake_timeout_secs: u64,
    /// The user created on first start.
    pub default_user: String,
    /// That user's password.
    pub default_pass: String,
    /// The default user may only connect from loopback (RabbitMQ's `loopback_users`).
    pub default_user_loopback_only: bool,
    /// tracing filter, e.g. `info` or `warren=debug`.
    pub log: String,
    /// Most client connections at once (RabbitMQ's `connection_max`); further
    /// connections are logged and their sockets closed. None: unlimited.
    pub max_connections: Option<usize>,
    /// Most queues per vhost (RabbitMQ's `max-queues` vhost limit); a declare
    /// past it gets 406 (admin API and definitions import: 400). None: unlimited.
    pub max_queues_per_vhost: Option<usize>,
    /// Most exchanges per vhost, the predeclared ones included; a declare past
    /// it gets 406 (admin API and definitions import: 400). None: unlimited.
    pub max_exchanges_per_vhost: Option<usize>,
    /// Most consumers on one channel (RabbitMQ's `consumer_max_per_channel`);
    /// basic.consume past it gets 406. None: unlimited.
    pub consumer_max_per_channel: Option<usize>,
    /// Milliseconds a delivery may stay unacknowledged before its channel is
    /// closed with 406 (RabbitMQ's `consumer_timeout`, 30 minutes). The queue
    /// argument `x-consumer-timeout` overrides it. None: no timeout.
    pub consumer_timeout_ms: Option<u64>,
    /// Bytes a connection may have waiting to be written before it stops taking
    /// deliveries and reading input until the peer catches up.
    pub write_backlog_limit: usize,
}

/// RabbitMQ's default `consumer_timeout`: 30 minutes.
pub const DEFAULT_CONSUMER_TIMEOUT_MS: u64 = 30 * 60 * 1000;

/// Default [`Config::write_backlog_limit`]: 4 MiB.
pub const DEFAULT_WRITE_BACKLOG_LIMIT: usize = 4 * 1024 * 1024;

/// The limits a connection enforces, copied out of the [`Config`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    pub consumer_max_per_channel: Option<usize>,
    pub consumer_timeout_ms: Option<u64>,
}

/// The limits every vhost enforces on declares, whoever asks (AMQP, the admin
/// API, definitions import); given to each vhost when it is created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VHostLimits {
    /// Most queues (`max_queues_per_vhost`).
    pub max_queues: Option<usize>,
    /// Most exchanges, the predeclared ones included (`max_exchanges_per_vhost`).
    pub max_exchanges: Option<usize>,
}

impl Config {
    pub fn limits(&self) -> Limits {
        Limits {
            consumer_max_per_channel: self.consumer_max_per_channel,
            consumer_timeout_ms: self.consumer_timeout_ms.filter(|ms| *ms > 0),
        }
    }

    pub fn vhost_limits(&self) -> VHostLimits {
        VHostLimits {
            max_queues: self.max_queues_per_vhost,
            max_exchanges: self.max_exchanges_per_vhost,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            bind: "::".into(),
            amqp_port: 5672,
            admin_port: 15672,
            admin_enabled: true,
            admin_sample_interval_secs: 5,
            data_dir: PathBuf::from("warren-data"),
            heartbeat: 60,
            frame_max: 131_072,
            channel_max: 2047,
            max_message_size: 128 * 1024 * 1024,
            handshake_timeout_secs: 10,
            message_memory_limit: 256 * 1024 * 1024,
            store_cache_size: 256 * 1024 * 1024,
            vm_memory_high_watermark: 0.4,
            memory_high_watermark_bytes: 0,
            default_user: "guest".into(),
            default_pass: "guest".into(),
            default_user_loopback_only: true,
            log: "info".into(),
            max_connections: None,
            max_queues_per_vhost: None,
            max_exchanges_per_vhost: None,
            consumer_max_per_channel: None,
            consumer_timeout_ms: Some(DEFAULT_CONSUMER_TIMEOUT_MS),
            write_backlog_limit: DEFAULT_WRITE_BACKLOG_LIMIT,
        }
    }
}

/// A configuration that could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(#[from] config::ConfigError);

impl Config {
    /// Defaults, then `path` (TOML) if given, then `WARREN_<KEY>` environment variables.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(path) = path {
            builder = builder.add_source(config::File::from(path).required(true));
        }
        builder = builder.add_source(
            config::Environment::with_prefix("WARREN")
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true),
        );
        Ok(builder.build()?.try_deserialize()?)
    }

    /// A configuration for tests: loopback, ephemeral ports, a fresh data dir.
    pub fn for_tests(data_dir: impl Into<PathBuf>) -> Config {
        Config {
            bind: "127.0.0.1".into(),
            amqp_port: 0,
            admin_port: 0,
            data_dir: data_dir.into(),
            ..Config::default()
        }
    }
}

#[cfg(test)]
mod limit_tests {
    use super::*;

    #[test]
    fn example_file_parses_with_the_defaults_and_limit_keys() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("warren.example.toml");
        let c = Config::load(Some(&path)).expect("example config loads");
        assert_eq!(c.max_connections, None);
        assert_eq!(c.max_queues_per_vhost, None);
        assert_eq!(c.consumer_max_per_channel, None);
        assert_eq!(c.consumer_timeout_ms, Some(DEFAULT_CONSUMER_TIMEOUT_MS));
        assert_eq!(c.write_backlog_limit, DEFAULT_WRITE_BACKLOG_LIMIT);
        assert_eq!(c.channel_max, 2047);
    }

    #[test]
    fn limits_come_from_the_config() {
        let c = Config {
            max_queues_per_vhost: Some(5),
            consumer_timeout_ms: Some(0),
            ..Config::default()
        };
        let l = c.limits();
        assert_eq!(c.vhost_limits().max_queues, Some(5));
        assert_eq!(c.vhost_limits().max_exchanges, None);
        assert_eq!(l.consumer_timeout_ms, None, "0 disables the timeout");
    }
}
