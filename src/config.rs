//! Broker configuration: defaults, an optional TOML file, `WARREN_*` environment overrides.
//!
//! Loaded once in `main` (or by a test) and passed down; nothing reads it globally.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Every setting of the broker. See `warren.example.toml` for documentation of each key.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct Config {
    /// The TOML file this configuration was loaded from (none: defaults and
    /// the environment only); not a key of its own.
    #[serde(skip)]
    pub config_file: Option<PathBuf>,
    /// Address the AMQP and admin listeners bind to. `::` listens on IPv6 and IPv4.
    pub bind: String,
    /// AMQP port (5672). 0 picks a free port.
    pub amqp_port: u16,
    /// Admin HTTP port (15672). 0 picks a free port.
    pub admin_port: u16,
    /// Run the admin HTTP API.
    pub admin_enabled: bool,
    /// Port of the Prometheus listener (15692, RabbitMQ's `prometheus.tcp.port`):
    /// `/metrics` and `/metrics/per-object`, without authentication, as
    /// `rabbitmq_prometheus` serves them. 0 picks a free port.
    pub prometheus_port: u16,
    /// Run the Prometheus listener.
    pub prometheus_enabled: bool,
    /// Seconds between samples of the message counters behind the API's rates.
    pub admin_sample_interval_secs: u64,
    /// Directory of the message store and topology.
    pub data_dir: PathBuf,
    /// Heartbeat interval the server proposes, in seconds (0 disables).
    pub heartbeat: u16,
    /// Largest frame the server accepts, in bytes (including the 8 bytes of framing).
    pub frame_max: u32,
    /// Most channels a connection may have open at once (offered in
    /// connection.tune; as on RabbitMQ, channel numbers are not bounded by it).
    pub channel_max: u16,
    /// Largest message body accepted, in bytes; bigger publishes get 406.
    /// Default 128 MiB, RabbitMQ 3.x's (4.0 lowered it to 16 MiB; clients'
    /// suites, aio-pika's and aiormq's, publish 20 MB messages).
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
    /// Free bytes on the data directory's file system below which publishers
    /// are blocked (the disk alarm; RabbitMQ's `disk_free_limit.absolute`,
    /// default 50 MB; 0: no alarm).
    pub disk_free_limit: u64,
    /// The same as a multiple of physical memory; overrides the bytes when
    /// above 0 (RabbitMQ's `disk_free_limit.relative`).
    pub disk_free_limit_relative: f64,
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
    /// The AMQP listeners by RabbitMQ's names: `listeners.tcp` (`"none"` turns
    /// the plain listener off; `{ default = PORT }` overrides `amqp_port`) and
    /// `listeners.ssl.default` (the AMQPS port).
    pub listeners: Listeners,
    /// The AMQPS listener's certificates and peer verification (RabbitMQ's `ssl_options.*`).
    pub ssl_options: SslOptions,
    /// Milliseconds a TLS handshake may take before the socket is closed
    /// (RabbitMQ's `ssl_handshake_timeout`, 5000).
    pub ssl_handshake_timeout: u64,
    /// Which part of a verified client certificate is the user name for SASL
    /// EXTERNAL (rabbitmq_auth_mechanism_ssl's `ssl_cert_login_from`).
    pub ssl_cert_login_from: CertLoginFrom,
    /// The user a SASL `ANONYMOUS` login of a Stream protocol connection logs
    /// in as (RabbitMQ 4's `anonymous_login_user`); unset: `ANONYMOUS` is
    /// not offered.
    pub anonymous_login_user: Option<String>,
    /// That user's password (`anonymous_login_pass`; unset: empty).
    pub anonymous_login_pass: Option<String>,
    /// With `subject_alternative_name`: which kind of SAN (`ssl_cert_login_san_type`).
    pub ssl_cert_login_san_type: SanType,
    /// With `subject_alternative_name`: which SAN of that kind, from 0
    /// (`ssl_cert_login_san_index`).
    pub ssl_cert_login_san_index: usize,
    /// The admin API's listeners by the management plugin's names:
    /// `management.tcp` (`"none"` or `{ port = PORT }`) and `management.ssl.*`.
    pub management: Management,
    /// OAuth 2.0 / JWT access tokens as passwords and Bearer tokens
    /// (rabbitmq_auth_backend_oauth2's `auth_oauth2.*`); None: off.
    pub auth_oauth2: Option<OAuth2>,
    /// Static shovels: `[shovels.<name>]` tables with the keys of a dynamic
    /// shovel's definition (`src-uri`, `src-queue`, `dest-uri`, ...), started
    /// with the broker in vhost `/`.
    pub shovels: std::collections::BTreeMap<String, serde_json::Value>,
    /// The RabbitMQ Stream protocol listener (`stream.*`).
    pub stream: StreamConfig,
    /// Clustering (`[cluster]`): absent means a single node, with no inter-node
    /// listener and nothing of `crate::cluster` running.
    pub cluster: Option<ClusterConfig>,
}

/// `[cluster]`: this node's name, the inter-node listener, the shared secret and
/// the seed nodes to join. See docs/cluster.md.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ClusterConfig {
    /// `warren@<host>`; default `warren@` and the machine's host name. The host
    /// part is the address other nodes reach this one at.
    pub node_name: Option<String>,
    /// Address of the inter-node listener (`host:port`, or a port alone for
    /// the node name's host); default port 25672 on the node name's host.
    pub listen: Option<String>,
    /// The shared secret (RabbitMQ's Erlang cookie). When unset, the file
    /// `.warren.cookie` in the data directory (created with a random one on
    /// first start; copy it to every node).
    pub cookie: Option<String>,
    /// Nodes to join at first start (`warren@host:port`, `warren@host` or
    /// `host:port`). Empty: this node starts a cluster of its own.
    pub seeds: Vec<String>,
    /// How long a client's declare, bind or delete waits for the metadata
    /// change to be committed before the connection is closed with 541.
    pub commit_timeout_ms: u64,
    /// Raft heartbeat interval in ms (elections start after 3 to 6 of them).
    pub heartbeat_ms: u64,
    /// `[cluster.tls]`: mutual TLS on every inter-node connection (RabbitMQ's
    /// inter-node TLS). Unset: inter-node traffic is plain TCP.
    pub tls: Option<ClusterTls>,
    /// Where to reach a peer instead of the address the membership records
    /// for it, by node name (`"warren@node-b" = "10.0.0.7:25672"`) or by that
    /// recorded address: for NAT, port forwarding or a proxy between nodes.
    pub dial: BTreeMap<String, String>,
}

/// `[cluster.tls]`: this node's certificate and key, presented to every peer
/// (as server and as client), and the CA every peer's certificate must chain
/// to. All three are required; files are PEM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClusterTls {
    /// CA certificates that peers' certificates must chain to.
    pub cacertfile: Option<PathBuf>,
    /// This node's certificate chain, leaf first; its subject alternative
    /// names must include the host part of the node name.
    pub certfile: Option<PathBuf>,
    /// This node's private key (PKCS#8, PKCS#1 or SEC1).
    pub keyfile: Option<PathBuf>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            node_name: None,
            listen: None,
            cookie: None,
            seeds: Vec::new(),
            commit_timeout_ms: 5000,
            heartbeat_ms: 100,
            tls: None,
            dial: BTreeMap::new(),
        }
    }
}

/// `stream.*`: the Stream protocol listener, as RabbitMQ's stream plugin names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct StreamConfig {
    /// `stream.listeners.tcp`: `"none"` or `{ default = PORT }`; unset: 5552.
    pub listeners: StreamListeners,
    /// Host the metadata and open responses advertise (unset: the address
    /// the client connected to).
    pub advertised_host: Option<String>,
    /// Port they advertise (unset: the listener's).
    pub advertised_port: Option<u16>,
    /// Port they advertise on a TLS connection (RabbitMQ's
    /// `stream.advertised_tls_port`; unset: the TLS listener's).
    pub advertised_tls_port: Option<u16>,
    /// Largest frame accepted and proposed in the tune, in bytes (0: no limit).
    pub frame_max: u32,
    /// Heartbeat proposed in the tune, in seconds (0: none).
    pub heartbeat: u32,
    /// Send delivered chunks' data straight from the segment files to plain
    /// TCP sockets (`sendfile(2)`, as osiris does) instead of reading them
    /// into memory first (TLS connections always read). Default on.
    pub sendfile: bool,
    /// Consecutive stored chunks written within this many milliseconds of
    /// the first are delivered to a Stream-protocol consumer as one chunk
    /// (one credit, one frame; up to 1 MiB of data and the frame-max), its
    /// timestamp the newest of theirs. 0: each stored chunk as it is.
    pub deliver_merge_ms: u32,
}

/// `stream.listeners.*`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct StreamListeners {
    pub tcp: Option<ListenerSetting>,
    /// `stream.listeners.ssl`: `{ default = PORT }` (RabbitMQ's 5551) serves
    /// the Stream protocol over TLS with the `ssl_options` certificates; unset
    /// or `"none"`: off.
    pub ssl: Option<ListenerSetting>,
}

/// RabbitMQ's default Stream protocol port.
pub const DEFAULT_STREAM_PORT: u16 = 5552;

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            listeners: StreamListeners::default(),
            advertised_host: None,
            advertised_port: None,
            advertised_tls_port: None,
            frame_max: 1_048_576,
            heartbeat: 60,
            sendfile: true,
            deliver_merge_ms: 10,
        }
    }
}

/// `auth_oauth2.*`: how access tokens are verified and what their scopes mean.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct OAuth2 {
    /// The audience tokens must carry and the scopes' prefix (`rabbitmq`).
    pub resource_server_id: String,
    /// Scopes are `<scope_prefix>read:...`; unset: `<resource_server_id>.`.
    pub scope_prefix: Option<String>,
    /// Space-separated claim paths (dots for nesting) holding more scopes.
    pub additional_scopes_key: Option<String>,
    /// Claims tried for the user name, before `sub` and `client_id`.
    pub preferred_username_claims: Vec<String>,
    /// Require `resource_server_id` in the token's `aud`.
    pub verify_aud: bool,
    /// The key of tokens whose header has no `kid`.
    pub default_key: Option<String>,
    /// Public keys (PEM, RSA or EC) by key id.
    pub signing_keys: std::collections::BTreeMap<String, PathBuf>,
    /// A JWKS file (JSON, `{"keys": [...]}`) with more keys by `kid`.
    pub jwks_file: Option<PathBuf>,
}

impl Default for OAuth2 {
    fn default() -> Self {
        OAuth2 {
            resource_server_id: String::new(),
            scope_prefix: None,
            additional_scopes_key: None,
            preferred_username_claims: Vec::new(),
            verify_aud: true,
            default_key: None,
            signing_keys: Default::default(),
            jwks_file: None,
        }
    }
}

/// A listener that can be switched off: `"none"`, or `{ default = PORT }`
/// (also spelled `{ port = PORT }`, as the management plugin does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ListenerSetting {
    Off(NoListener),
    On {
        #[serde(alias = "port")]
        default: u16,
    },
}

/// The word `none` (RabbitMQ's `listeners.tcp = none`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NoListener {
    #[serde(rename = "none")]
    None,
}

/// `listeners.tcp` and `listeners.ssl`; unset means: plain on `amqp_port`, TLS
/// on 5671 only when `ssl_options.certfile` is set.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Listeners {
    pub tcp: Option<ListenerSetting>,
    pub ssl: Option<ListenerSetting>,
}

/// RabbitMQ's default AMQPS port.
pub const DEFAULT_AMQPS_PORT: u16 = 5671;
/// The management plugin's default HTTPS port.
pub const DEFAULT_MANAGEMENT_SSL_PORT: u16 = 15671;

/// `verify_none` (no client certificate asked for) or `verify_peer`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verify {
    #[default]
    VerifyNone,
    VerifyPeer,
}

/// Certificates and client verification of one TLS listener (RabbitMQ's
/// `ssl_options.*`). Files are PEM.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SslOptions {
    /// CA certificates that client certificates must chain to (verify_peer).
    pub cacertfile: Option<PathBuf>,
    /// The server's certificate chain, leaf first.
    pub certfile: Option<PathBuf>,
    /// The server's private key (PKCS#8, PKCS#1 or SEC1).
    pub keyfile: Option<PathBuf>,
    pub verify: Verify,
    /// With verify_peer: refuse clients that present no certificate.
    pub fail_if_no_peer_cert: bool,
}

/// Where the EXTERNAL user name comes from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CertLoginFrom {
    /// The subject's CN (exactly one).
    #[default]
    CommonName,
    /// The whole subject as an RFC 4514 string, e.g. `CN=alice,O=Example`.
    DistinguishedName,
    /// A subject alternative name, see `ssl_cert_login_san_type` / `_index`.
    SubjectAlternativeName,
}

/// The kinds of subject alternative name a login can come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SanType {
    #[default]
    Dns,
    Email,
    Uri,
    Ip,
}

/// `management.tcp` and `management.ssl`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Management {
    /// `"none"` turns the plain HTTP listener off; `{ port = P }` overrides `admin_port`.
    pub tcp: Option<ListenerSetting>,
    pub ssl: ManagementSsl,
}

/// `management.ssl.*`: the HTTPS listener of the admin API. Unset files fall
/// back to `ssl_options`'.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ManagementSsl {
    /// The HTTPS port (15671 when unset and a certificate is configured).
    pub port: Option<u16>,
    pub cacertfile: Option<PathBuf>,
    pub certfile: Option<PathBuf>,
    pub keyfile: Option<PathBuf>,
    pub verify: Option<Verify>,
    pub fail_if_no_peer_cert: Option<bool>,
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
    /// This node's name: `[cluster] node_name`, else `warren@` and the host
    /// name (the name the API, the firehose and the cluster use).
    pub fn node_name(&self) -> String {
        self.cluster
            .as_ref()
            .and_then(|c| c.node_name.clone())
            .unwrap_or_else(|| format!("warren@{}", host_name()))
    }

    pub fn limits(&self) -> Limits {
        Limits {
            consumer_max_per_channel: self.consumer_max_per_channel,
            consumer_timeout_ms: self.consumer_timeout_ms.filter(|ms| *ms > 0),
        }
    }

    /// The Stream protocol port, None when `stream.listeners.tcp = "none"`.
    pub fn stream_tcp_port(&self) -> Option<u16> {
        match self.stream.listeners.tcp {
            Some(ListenerSetting::Off(_)) => None,
            Some(ListenerSetting::On { default }) => Some(default),
            None => Some(DEFAULT_STREAM_PORT),
        }
    }

    /// The Stream protocol TLS port (`stream.listeners.ssl`), None unless set:
    /// as in RabbitMQ, certificates alone do not open it.
    pub fn stream_ssl_port(&self) -> Option<u16> {
        match self.stream.listeners.ssl {
            Some(ListenerSetting::On { default }) => Some(default),
            Some(ListenerSetting::Off(_)) | None => None,
        }
    }

    /// The plain AMQP port, None when `listeners.tcp = "none"`.
    pub fn amqp_tcp_port(&self) -> Option<u16> {
        match self.listeners.tcp {
            Some(ListenerSetting::Off(_)) => None,
            Some(ListenerSetting::On { default }) => Some(default),
            None => Some(self.amqp_port),
        }
    }

    /// The AMQPS port: `listeners.ssl.default`, or 5671 when a certificate is
    /// configured and `listeners.ssl` is unset.
    pub fn amqp_ssl_port(&self) -> Option<u16> {
        match self.listeners.ssl {
            Some(ListenerSetting::Off(_)) => None,
            Some(ListenerSetting::On { default }) => Some(default),
            None => self
                .ssl_options
                .certfile
                .is_some()
                .then_some(DEFAULT_AMQPS_PORT),
        }
    }

    /// The plain admin HTTP port, None when switched off (or the API is disabled).
    pub fn admin_tcp_port(&self) -> Option<u16> {
        if !self.admin_enabled {
            return None;
        }
        match self.management.tcp {
            Some(ListenerSetting::Off(_)) => None,
            Some(ListenerSetting::On { default }) => Some(default),
            None => Some(self.admin_port),
        }
    }

    /// The admin HTTPS port: `management.ssl.port`, or 15671 when a
    /// `management.ssl.certfile` is configured.
    pub fn admin_ssl_port(&self) -> Option<u16> {
        if !self.admin_enabled {
            return None;
        }
        let ssl = &self.management.ssl;
        ssl.port.or(ssl
            .certfile
            .is_some()
            .then_some(DEFAULT_MANAGEMENT_SSL_PORT))
    }

    /// The admin HTTPS listener's options: `management.ssl.*`, unset ones from `ssl_options`.
    pub fn admin_ssl_options(&self) -> SslOptions {
        let (m, o) = (&self.management.ssl, &self.ssl_options);
        SslOptions {
            cacertfile: m.cacertfile.clone().or_else(|| o.cacertfile.clone()),
            certfile: m.certfile.clone().or_else(|| o.certfile.clone()),
            keyfile: m.keyfile.clone().or_else(|| o.keyfile.clone()),
            verify: m.verify.unwrap_or(o.verify),
            fail_if_no_peer_cert: m.fail_if_no_peer_cert.unwrap_or(o.fail_if_no_peer_cert),
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
            config_file: None,
            bind: "::".into(),
            amqp_port: 5672,
            admin_port: 15672,
            admin_enabled: true,
            prometheus_port: 15692,
            prometheus_enabled: true,
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
            disk_free_limit: 50_000_000,
            disk_free_limit_relative: 0.0,
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
            listeners: Listeners::default(),
            ssl_options: SslOptions::default(),
            ssl_handshake_timeout: 5000,
            ssl_cert_login_from: CertLoginFrom::default(),
            ssl_cert_login_san_type: SanType::default(),
            ssl_cert_login_san_index: 0,
            anonymous_login_user: None,
            anonymous_login_pass: None,
            management: Management::default(),
            auth_oauth2: None,
            shovels: Default::default(),
            stream: StreamConfig::default(),
            cluster: None,
        }
    }
}

/// The keys whose `WARREN_*` environment variable is a comma-separated list.
const ENV_LISTS: &[&str] = &["cluster.seeds"];

/// A configuration that could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(#[from] config::ConfigError);

impl Config {
    /// Defaults, then `path` (TOML) if given, then `WARREN_<KEY>` environment variables.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        Config::load_with_env(path, None)
    }

    /// [`Config::load`] with the environment given (`None`: the process's).
    /// `WARREN_A__B` sets key `b` of table `[a]`; the list keys in
    /// [`ENV_LISTS`] take comma-separated values
    /// (`WARREN_CLUSTER__SEEDS=warren@a:25672,warren@b:25672`).
    fn load_with_env(
        path: Option<&Path>,
        env: Option<std::collections::HashMap<String, String>>,
    ) -> Result<Config, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(path) = path {
            builder = builder.add_source(config::File::from(path).required(true));
        }
        let mut environment = config::Environment::with_prefix("WARREN")
            .prefix_separator("_")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .source(env);
        for key in ENV_LISTS {
            environment = environment.with_list_parse_key(key);
        }
        builder = builder.add_source(environment);
        let mut config: Config = builder.build()?.try_deserialize()?;
        config.config_file = path.map(|p| p.canonicalize().unwrap_or_else(|_| p.to_path_buf()));
        Ok(config)
    }

    /// A configuration for tests: loopback, ephemeral ports, a fresh data dir.
    pub fn for_tests(data_dir: impl Into<PathBuf>) -> Config {
        Config {
            bind: "127.0.0.1".into(),
            amqp_port: 0,
            admin_port: 0,
            prometheus_enabled: false,
            data_dir: data_dir.into(),
            stream: StreamConfig {
                listeners: StreamListeners {
                    tcp: Some(ListenerSetting::On { default: 0 }),
                    ssl: None,
                },
                ..StreamConfig::default()
            },
            ..Config::default()
        }
    }
}

/// The machine's host name (`localhost` if it has none).
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod limit_tests {
    use super::*;

    #[test]
    fn stream_listener_settings() {
        assert_eq!(
            Config::default().stream_tcp_port(),
            Some(DEFAULT_STREAM_PORT)
        );
        let dir = std::env::temp_dir().join(format!("warren-stream-conf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("w.toml");
        std::fs::write(
            &path,
            "[stream]\nlisteners.tcp = { default = 5999 }\nadvertised_host = \"h\"\nheartbeat = 5\n",
        )
        .expect("write");
        let c = Config::load(Some(&path)).expect("loads");
        assert_eq!(c.stream_tcp_port(), Some(5999));
        assert_eq!(c.stream.advertised_host.as_deref(), Some("h"));
        assert_eq!((c.stream.heartbeat, c.stream.frame_max), (5, 1_048_576));
        assert_eq!(c.stream_ssl_port(), None, "TLS is off unless asked for");
        std::fs::write(&path, "[stream]\nlisteners.tcp = \"none\"\n").expect("write");
        assert_eq!(
            Config::load(Some(&path)).expect("loads").stream_tcp_port(),
            None
        );
        std::fs::write(
            &path,
            "[stream]\nlisteners.ssl = { default = 5551 }\nadvertised_tls_port = 6551\n",
        )
        .expect("write");
        let c = Config::load(Some(&path)).expect("loads");
        assert_eq!(c.stream_ssl_port(), Some(5551));
        assert_eq!(c.stream.advertised_tls_port, Some(6551));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn example_file_parses_with_the_defaults_and_limit_keys() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("warren.example.toml");
        let c = Config::load(Some(&path)).expect("example config loads");
        let file = c.config_file.as_deref().expect("the file is recorded");
        assert!(file.is_absolute() && file.ends_with("warren.example.toml"));
        assert_eq!(Config::load(None).expect("loads").config_file, None);
        assert_eq!(c.max_connections, None);
        assert_eq!(c.max_queues_per_vhost, None);
        assert_eq!(c.consumer_max_per_channel, None);
        assert_eq!(c.consumer_timeout_ms, Some(DEFAULT_CONSUMER_TIMEOUT_MS));
        assert_eq!(c.write_backlog_limit, DEFAULT_WRITE_BACKLOG_LIMIT);
        assert_eq!(c.channel_max, 2047);
    }

    #[test]
    fn rabbitmq_listener_and_ssl_keys_load_from_toml() {
        let dir = std::env::temp_dir().join(format!("warren-config-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("tls.toml");
        std::fs::write(
            &path,
            r#"
listeners.tcp = "none"
listeners.ssl.default = 5671
ssl_handshake_timeout = 2000
ssl_cert_login_from = "distinguished_name"
[ssl_options]
cacertfile = "/etc/warren/ca.pem"
certfile = "/etc/warren/server.pem"
keyfile = "/etc/warren/server.key"
verify = "verify_peer"
fail_if_no_peer_cert = true
[management.ssl]
port = 15671
certfile = "/etc/warren/admin.pem"
"#,
        )
        .expect("write");
        let c = Config::load(Some(&path)).expect("loads");
        assert_eq!(c.amqp_tcp_port(), None);
        assert_eq!(c.amqp_ssl_port(), Some(5671));
        assert_eq!(c.ssl_options.verify, Verify::VerifyPeer);
        assert!(c.ssl_options.fail_if_no_peer_cert);
        assert_eq!(c.ssl_handshake_timeout, 2000);
        assert_eq!(c.ssl_cert_login_from, CertLoginFrom::DistinguishedName);
        assert_eq!(c.admin_tcp_port(), Some(15672));
        assert_eq!(c.admin_ssl_port(), Some(15671));
        let admin = c.admin_ssl_options();
        assert_eq!(admin.certfile, Some(PathBuf::from("/etc/warren/admin.pem")));
        assert_eq!(admin.keyfile, Some(PathBuf::from("/etc/warren/server.key")));
        assert_eq!(admin.verify, Verify::VerifyPeer);
        std::fs::write(&path, "listeners.tcp.default = 5673\n").expect("write");
        let c = Config::load(Some(&path)).expect("loads");
        assert_eq!(c.amqp_tcp_port(), Some(5673));
        assert_eq!(c.amqp_ssl_port(), None, "no certificate, no TLS listener");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_certificate_alone_listens_on_the_default_tls_ports() {
        let c = Config {
            ssl_options: SslOptions {
                certfile: Some("s.pem".into()),
                ..SslOptions::default()
            },
            ..Config::default()
        };
        assert_eq!(c.amqp_tcp_port(), Some(5672));
        assert_eq!(c.amqp_ssl_port(), Some(DEFAULT_AMQPS_PORT));
        assert_eq!(
            c.admin_ssl_port(),
            None,
            "the admin API needs management.ssl"
        );
    }

    #[test]
    fn auth_oauth2_keys_load_from_toml() {
        let dir = std::env::temp_dir().join(format!("warren-config-oauth-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("oauth.toml");
        std::fs::write(
            &path,
            r#"
[auth_oauth2]
resource_server_id = "rabbitmq"
additional_scopes_key = "roles groups"
preferred_username_claims = ["user_name"]
default_key = "id1"
verify_aud = false
jwks_file = "/etc/warren/jwks.json"
[auth_oauth2.signing_keys]
id1 = "/etc/warren/id1.pem"
"#,
        )
        .expect("write");
        let c = Config::load(Some(&path)).expect("loads");
        let o = c.auth_oauth2.expect("auth_oauth2");
        assert_eq!(o.resource_server_id, "rabbitmq");
        assert_eq!(o.additional_scopes_key.as_deref(), Some("roles groups"));
        assert_eq!(o.preferred_username_claims, vec!["user_name".to_string()]);
        assert!(!o.verify_aud);
        assert_eq!(o.default_key.as_deref(), Some("id1"));
        assert_eq!(
            o.signing_keys.get("id1"),
            Some(&PathBuf::from("/etc/warren/id1.pem"))
        );
        std::fs::write(&path, "[auth_oauth2]\nresource_server_id = \"r\"\n").expect("write");
        let o = Config::load(Some(&path)).expect("loads").auth_oauth2;
        assert!(o.is_some_and(|o| o.verify_aud && o.signing_keys.is_empty()));
        assert!(Config::default().auth_oauth2.is_none());
        let _ = std::fs::remove_dir_all(&dir);
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

#[cfg(test)]
mod env_tests {
    use super::*;
    use std::collections::HashMap;

    fn env(vars: &[(&str, &str)]) -> Config {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::load_with_env(None, Some(map)).expect("loads")
    }

    #[test]
    fn cluster_settings_and_a_seed_list_come_from_the_environment() {
        let c = env(&[
            ("WARREN_CLUSTER__NODE_NAME", "warren@node2"),
            ("WARREN_CLUSTER__LISTEN", "0.0.0.0:25672"),
            ("WARREN_CLUSTER__COOKIE", "s3cret"),
            (
                "WARREN_CLUSTER__SEEDS",
                "warren@node1:25672,warren@node3:25672",
            ),
            ("WARREN_CLUSTER__HEARTBEAT_MS", "50"),
            ("WARREN_AMQP_PORT", "5673"),
        ]);
        let cc = c.cluster.expect("[cluster] from the environment");
        assert_eq!(cc.node_name.as_deref(), Some("warren@node2"));
        assert_eq!(cc.listen.as_deref(), Some("0.0.0.0:25672"));
        assert_eq!(cc.cookie.as_deref(), Some("s3cret"));
        assert_eq!(cc.seeds, ["warren@node1:25672", "warren@node3:25672"]);
        assert_eq!(cc.heartbeat_ms, 50);
        assert_eq!(cc.commit_timeout_ms, 5000);
        assert_eq!(c.amqp_port, 5673);
    }

    #[test]
    fn one_seed_is_a_list_of_one_and_other_strings_stay_strings() {
        let c = env(&[
            ("WARREN_CLUSTER__SEEDS", "warren@node1"),
            ("WARREN_CLUSTER__COOKIE", "12345"),
            ("WARREN_DEFAULT_USER", "a,b"),
        ]);
        let cc = c.cluster.expect("cluster");
        assert_eq!(cc.seeds, ["warren@node1"]);
        assert_eq!(cc.cookie.as_deref(), Some("12345"));
        assert_eq!(c.default_user, "a,b");
    }

    #[test]
    fn cluster_tls_comes_from_the_environment_and_dial_from_toml() {
        let c = env(&[
            ("WARREN_CLUSTER__TLS__CERTFILE", "/etc/warren/node.pem"),
            ("WARREN_CLUSTER__TLS__KEYFILE", "/etc/warren/node.key"),
            ("WARREN_CLUSTER__TLS__CACERTFILE", "/etc/warren/ca.pem"),
        ]);
        let tls = c.cluster.expect("cluster").tls.expect("[cluster.tls]");
        assert_eq!(
            tls.certfile.as_deref(),
            Some(Path::new("/etc/warren/node.pem"))
        );
        assert_eq!(
            tls.keyfile.as_deref(),
            Some(Path::new("/etc/warren/node.key"))
        );
        assert_eq!(
            tls.cacertfile.as_deref(),
            Some(Path::new("/etc/warren/ca.pem"))
        );
        assert!(env(&[("WARREN_CLUSTER__COOKIE", "x")])
            .cluster
            .expect("cluster")
            .tls
            .is_none());

        let dir = std::env::temp_dir().join(format!("warren-config-dial-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("dial.toml");
        std::fs::write(
            &path,
            "[cluster]\ndial = { \"warren@127.0.0.2\" = \"127.0.0.1:7000\" }\n\n\
             [cluster.tls]\ncertfile = \"n.pem\"\nkeyfile = \"n.key\"\ncacertfile = \"ca.pem\"\n",
        )
        .expect("write");
        let cc = Config::load(Some(&path))
            .expect("loads")
            .cluster
            .expect("cluster");
        assert_eq!(
            cc.dial.get("warren@127.0.0.2").map(String::as_str),
            Some("127.0.0.1:7000")
        );
        assert_eq!(cc.tls.and_then(|t| t.keyfile), Some(PathBuf::from("n.key")));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn no_cluster_variables_no_cluster() {
        assert!(env(&[("WARREN_AMQP_PORT", "5673")]).cluster.is_none());
    }
}
