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
//! - `cluster`: clustering on openraft (with `[cluster]` only): node names, the
//!   inter-node listener and its cookie handshake, the replicated metadata group.
//! - `server`: the AMQP listener, one task per connection driving a session; the
//!   Stream protocol listener (`server::stream`) likewise.
//! - `admin`: the HTTP management API (RabbitMQ-shaped JSON) and Prometheus metrics.
//! - `config`: settings from defaults, a TOML file and `WARREN_*` variables.
//! - `error`: errors that carry AMQP reply codes.
//! - `tls`: rustls server configurations (reloadable), the TLS handshake and
//!   what it tells (protocol, cipher, client certificate, EXTERNAL user name).
//! - `shovel`: shovels (dynamic runtime parameters and static ones from the
//!   config), each an AMQP client task moving messages between brokers.

pub mod admin;
pub mod amqp;
pub mod broker;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod error;
pub mod server;
pub mod session;
pub mod shovel;
pub mod storage;
pub mod tls;
pub mod wire;

pub use config::Config;

use std::sync::Arc;

/// A running broker: the AMQP server (and, when enabled, the admin API).
pub struct Warren {
    pub server: server::Server,
    /// The shovels this broker runs.
    pub shovels: Arc<shovel::Shovels>,
    /// The Stream protocol listeners (None when `stream.listeners.tcp = "none"`
    /// and `stream.listeners.ssl` is unset).
    pub stream: Option<server::stream::StreamServer>,
    /// This node's part of the cluster (None without `[cluster]`).
    pub cluster: Option<Arc<cluster::Cluster>>,
    admin: admin::Addrs,
    admin_tls: Option<Arc<tls::ServerTls>>,
    /// Where the Prometheus listener listens, when it is on.
    prometheus: Option<std::net::SocketAddr>,
}

impl Warren {
    /// The plain AMQP address (the AMQPS one when the plain listener is off).
    pub fn amqp_addr(&self) -> std::net::SocketAddr {
        self.server.amqp_addr()
    }

    /// The Stream protocol address, when its listener is on.
    pub fn stream_addr(&self) -> Option<std::net::SocketAddr> {
        self.stream.as_ref().and_then(|s| s.addrs.first().copied())
    }

    /// The Stream protocol TLS address, when `stream.listeners.ssl` is set.
    pub fn stream_tls_addr(&self) -> Option<std::net::SocketAddr> {
        self.stream
            .as_ref()
            .and_then(|s| s.tls_addrs.first().copied())
    }

    /// The AMQPS address, when TLS is configured.
    pub fn amqps_addr(&self) -> Option<std::net::SocketAddr> {
        self.server.amqps_addr()
    }

    /// Where the admin HTTP API listens (None when `admin_enabled` is false or
    /// `management.tcp = "none"`).
    pub fn admin_addr(&self) -> Option<std::net::SocketAddr> {
        self.admin.http
    }

    /// Where the Prometheus listener listens, when it is on.
    pub fn prometheus_addr(&self) -> Option<std::net::SocketAddr> {
        self.prometheus
    }

    /// Where the admin API listens over HTTPS, when configured.
    pub fn admin_tls_addr(&self) -> Option<std::net::SocketAddr> {
        self.admin.https
    }

    /// Read the certificate, key and CA files of every TLS listener again (what
    /// SIGHUP does): new connections get the new certificate, open ones keep
    /// going. A listener whose files do not load keeps its configuration.
    pub fn reload_tls(&self) -> Result<(), tls::TlsError> {
        tls::reload_all(&self.tls_listeners())
    }

    /// Every bound listener, by RabbitMQ's protocol names.
    pub fn listeners(&self) -> Vec<admin::health::Listener> {
        use admin::health::Listener;
        let mut all: Vec<Listener> = self
            .server
            .amqp_addrs()
            .iter()
            .map(|a| Listener {
                protocol: "amqp",
                addr: *a,
            })
            .collect();
        let one = |protocol, addr: Option<std::net::SocketAddr>| {
            addr.map(|addr| Listener { protocol, addr })
        };
        all.extend(
            [
                one("amqp/ssl", self.amqps_addr()),
                one("stream", self.stream_addr()),
                one("stream/ssl", self.stream_tls_addr()),
                one("http", self.admin_addr()),
                one("https", self.admin_tls_addr()),
                one("http/prometheus", self.prometheus_addr()),
                one("clustering", self.cluster.as_ref().map(|c| c.listen)),
            ]
            .into_iter()
            .flatten(),
        );
        all
    }

    fn tls_listeners(&self) -> tls::Listeners {
        tls_listeners(
            self.server.tls(),
            self.admin_tls.as_ref(),
            self.cluster.as_ref(),
        )
    }
}

/// The TLS configurations in use, by name: the listeners' and the
/// inter-node connections'.
fn tls_listeners(
    amqps: Option<&Arc<tls::ServerTls>>,
    admin: Option<&Arc<tls::ServerTls>>,
    cluster: Option<&Arc<cluster::Cluster>>,
) -> tls::Listeners {
    let listener = |t: Option<&Arc<tls::ServerTls>>| -> Option<Arc<dyn tls::TlsFiles>> {
        Some(Arc::clone(t?) as Arc<dyn tls::TlsFiles>)
    };
    let inter_node = cluster
        .and_then(|c| c.tls())
        .map(|t| t as Arc<dyn tls::TlsFiles>);
    [
        ("AMQPS", listener(amqps)),
        ("admin HTTPS", listener(admin)),
        ("inter-node", inter_node),
    ]
    .into_iter()
    .filter_map(|(what, t)| Some((what, t?)))
    .collect()
}

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Storage(#[from] storage::StorageError),
    #[error("cannot listen: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    OAuth2(#[from] broker::oauth::OAuth2Error),
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
}

/// Start a broker with `config` on the current tokio runtime.
pub async fn start(config: Config) -> Result<Warren, StartError> {
    let config = Arc::new(config);
    tls::install_default_provider();
    let started = std::time::Instant::now();
    let broker = broker::Broker::open(&config, clock::now_ms())?;
    if let Some(oauth2) = &config.auth_oauth2 {
        broker
            .auth
            .set_oauth2(broker::oauth::Verifier::new(oauth2)?);
    }
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "broker opened"
    );
    // AMQPS and the Stream protocol's TLS port share `ssl_options` (and reloads).
    let amqp_tls = match config.amqp_ssl_port().or(config.stream_ssl_port()) {
        Some(_) => Some(tls::ServerTls::new(&config.ssl_options, &[])?),
        None => None,
    };
    let cluster = match &config.cluster {
        Some(_) => Some(cluster::Cluster::start(&config, Arc::clone(&broker)).await?),
        None => None,
    };
    let server = server::start(
        Arc::clone(&config),
        Arc::clone(&broker),
        amqp_tls,
        cluster.clone(),
    )
    .await?;
    // A stream port that cannot be bound is logged, not fatal: the AMQP
    // side stays up (several brokers on one host share the default 5552).
    let stream_tls = server.tls().cloned();
    let stream = match server::stream::start(
        Arc::clone(&config),
        Arc::clone(&broker),
        stream_tls,
        cluster.clone(),
    )
    .await
    {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "stream protocol listener not started");
            None
        }
    };
    let shovels = start_shovels(&config, &broker, server.amqp_addr(), cluster.as_ref());
    let admin_tls = match config.admin_ssl_port() {
        Some(_) => Some(tls::ServerTls::new(
            &config.admin_ssl_options(),
            &[b"http/1.1"],
        )?),
        None => None,
    };
    let host = bracket(&config.bind);
    let http = config.admin_tcp_port().map(|port| format!("{host}:{port}"));
    let https = config
        .admin_ssl_port()
        .zip(admin_tls.clone())
        .map(|(port, tls)| admin::Https {
            addr: format!("{host}:{port}"),
            tls,
            handshake_timeout: tls::handshake_timeout(&config),
        });
    // One state for the admin API and the Prometheus listener (the node's
    // start time, its data directory's file system, its listeners).
    let mut state = admin::AdminState::new(Arc::clone(&broker), Arc::clone(&shovels));
    state.tls = tls_listeners(server.tls(), admin_tls.as_ref(), cluster.as_ref());
    state.data_dir = Some(config.data_dir.clone());
    state.config_file = config.config_file.clone();
    state.cluster = cluster.clone();
    let listeners = Arc::clone(&state.listeners);
    let admin = if http.is_some() || https.is_some() {
        let every = std::time::Duration::from_secs(config.admin_sample_interval_secs.max(1));
        admin::start(http.as_deref(), https, state.clone(), every).await?
    } else {
        admin::Addrs::default()
    };
    let prometheus = match config.prometheus_enabled {
        true => {
            let addr = format!("{host}:{}", config.prometheus_port);
            admin::start_prometheus(&addr, state)
                .await
                .inspect_err(|e| {
                    // As the Stream listener's: the broker runs without it.
                    tracing::error!(%addr, error = %e, "prometheus listener not started");
                })
                .ok()
        }
        false => None,
    };
    tokio::spawn(run_ticker(Arc::downgrade(&broker), config.data_dir.clone()));
    let warren = Warren {
        server,
        shovels,
        stream,
        cluster,
        admin,
        admin_tls,
        prometheus,
    };
    let _ = listeners.set(warren.listeners());
    Ok(warren)
}

/// The broker's clock: [`broker::Broker::tick`] with the time, every
/// [`broker::ticks::FAST`] while anything wants ticks (message and queue
/// expiry, delayed messages), else every [`broker::ticks::SLOW`] or when the
/// core says something began to want them (never twice within `FAST`); the
/// memory and disk checks every `SLOW`. Ends with the broker.
async fn run_ticker(broker: std::sync::Weak<broker::Broker>, data_dir: std::path::PathBuf) {
    use broker::ticks::{FAST, SLOW};
    use tokio::time::{sleep_until, Instant};
    let Some(ticks) = broker.upgrade().map(|b| Arc::clone(&b.ticks)) else {
        return;
    };
    let mut checked = Instant::now();
    let mut ticked = Instant::now();
    let Some(mut fast) = broker.upgrade().map(|b| b.wants_ticks()) else {
        return;
    };
    loop {
        if fast {
            sleep_until(ticked + FAST).await;
        } else {
            tokio::select! {
                _ = sleep_until(ticked + SLOW) => {}
                _ = ticks.wanted() => sleep_until(ticked + FAST).await,
            }
        }
        let Some(broker) = broker.upgrade() else {
            return;
        };
        ticked = Instant::now();
        // What the tick leaves wanting ticks, found on its walk (what
        // starts wanting them later calls `want`).
        fast = broker.tick(clock::now_ms());
        if ticked.duration_since(checked) >= SLOW {
            checked = ticked;
            broker.check_memory();
            broker.check_disk(broker::memory::disk_free(&data_dir));
        }
    }
}

/// The shovel registry: the dynamic shovels of the broker's runtime
/// parameters (those the cluster places here, when clustered) and the static
/// ones in the config, started. `amqp://` without a host in a shovel URI
/// means this broker, reached on loopback as the default user.
fn start_shovels(
    config: &Config,
    broker: &Arc<broker::Broker>,
    amqp: std::net::SocketAddr,
    cluster: Option<&Arc<cluster::Cluster>>,
) -> Arc<shovel::Shovels> {
    let enc = |s: &str| -> String {
        s.bytes()
            .map(|c| match c {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    (c as char).to_string()
                }
                _ => format!("%{c:02X}"),
            })
            .collect()
    };
    // A listener on one address is dialled there (nodes of a test cluster
    // share a port on several loopback addresses); on all of them, on loopback.
    let host = match amqp.ip() {
        ip if ip.is_unspecified() && ip.is_ipv6() => "[::1]".to_string(),
        ip if ip.is_unspecified() => "127.0.0.1".to_string(),
        std::net::IpAddr::V6(ip) => format!("[{ip}]"),
        std::net::IpAddr::V4(ip) => ip.to_string(),
    };
    let local = format!(
        "{}:{}@{host}:{}",
        enc(&config.default_user),
        enc(&config.default_pass),
        amqp.port()
    );
    let node = cluster.map_or_else(admin::node_name, |c| c.me.name.clone());
    let shovels = shovel::Shovels::new(Arc::clone(broker), local, node);
    if let Some(c) = cluster {
        shovels.place_with(Arc::new(shovel::ClusterPlacement(Arc::downgrade(c))));
    }
    let n = shovels.start();
    if n > 0 {
        tracing::info!(count = n, "dynamic shovels started");
    }
    for (name, value) in &config.shovels {
        if let Err(e) = shovels.start_static(name, value.clone()) {
            tracing::error!(name, error = %e, "static shovel not started");
        }
    }
    shovels
}

/// An IPv6 literal in brackets, for `host:port`.
fn bracket(host: &str) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}
