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
}

impl Default for Config {
    fn default() -> Self {
        Config {
            bind: "::".into(),
            amqp_port: 5672,
            admin_port: 15672,
            admin_enabled: true,
            data_dir: PathBuf::from("warren-data"),
            heartbeat: 60,
            frame_max: 131_072,
            channel_max: 2047,
            max_message_size: 128 * 1024 * 1024,
            handshake_timeout_secs: 10,
            message_memory_limit: 256 * 1024 * 1024,
            vm_memory_high_watermark: 0.4,
            memory_high_watermark_bytes: 0,
            default_user: "guest".into(),
            default_pass: "guest".into(),
            default_user_loopback_only: true,
            log: "info".into(),
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
