//! The AMQP network side: listeners, the accept loop, one task per connection
//! (a thin driver of a [`crate::session::Session`]), mailboxes and socket writes.
//!
//! [`start`] binds the listeners (plain AMQP, AMQPS, either can be off) and
//! returns a [`Server`] handle; dropping or calling [`Server::shutdown`] stops
//! accepting. A TLS connection's handshake (see [`crate::tls`]) runs in the
//! connection's own task, bounded by `ssl_handshake_timeout`, so a stalled or
//! plaintext client holds up nobody else.

pub mod connection;
pub mod mailbox;
pub mod stream;
pub mod writer;

use crate::broker::queue::Queue;
use crate::broker::Broker;
use crate::config::Config;
use crate::tls::ServerTls;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Wait, at most `within`, until a basic.get on the replicated queue `q`
/// may be answered: its head message within the committed delivery horizon
/// ([`Queue::get_waits_for`], asked again each 200 ms round, since an ask
/// that did not commit is not retried on its own). False when `within`
/// passed first (the group commits nothing: no majority) or the queue is
/// gone.
pub async fn horizon_for_get(q: &Queue, within: std::time::Duration) -> bool {
    let give_up = tokio::time::Instant::now() + within;
    let mut committed = q.follow_horizon();
    while q.get_waits_for().is_some() {
        let now = tokio::time::Instant::now();
        if now >= give_up {
            return false;
        }
        let round = (now + std::time::Duration::from_millis(200)).min(give_up);
        if let Ok(Err(_)) = tokio::time::timeout_at(round, committed.changed()).await {
            return false;
        }
    }
    true
}

/// A running AMQP listener.
#[derive(Debug)]
pub struct Server {
    pub broker: Arc<Broker>,
    addrs: Vec<SocketAddr>,
    tls_addrs: Vec<SocketAddr>,
    tls: Option<Arc<ServerTls>>,
    shutdown: watch::Sender<bool>,
}

impl Server {
    /// The first bound plain AMQP address (with the real port when 0 was
    /// asked); the first AMQPS address when the plain listener is off.
    pub fn amqp_addr(&self) -> SocketAddr {
        self.addrs
            .first()
            .or(self.tls_addrs.first())
            .copied()
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The plain AMQP addresses (none when `listeners.tcp = "none"`).
    pub fn amqp_addrs(&self) -> &[SocketAddr] {
        &self.addrs
    }

    /// The first AMQPS address, if TLS is configured.
    pub fn amqps_addr(&self) -> Option<SocketAddr> {
        self.tls_addrs.first().copied()
    }

    /// The AMQPS listener's TLS configuration (to reload it).
    pub fn tls(&self) -> Option<&Arc<ServerTls>> {
        self.tls.as_ref()
    }

    /// Stop accepting connections.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

/// Bind `config.bind:port`. `::` binds a dual-stack IPv6 socket and falls back
/// to IPv4 where IPv6 is unavailable.
pub async fn bind(config: &Config, port: u16) -> std::io::Result<Vec<TcpListener>> {
    let host = config.bind.as_str();
    let addr = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    match TcpListener::bind(&addr).await {
        Ok(l) => Ok(vec![l]),
        Err(e) if host == "::" => {
            tracing::warn!(error = %e, "IPv6 unavailable, listening on IPv4 only");
            Ok(vec![TcpListener::bind(("0.0.0.0", port)).await?])
        }
        Err(e) => Err(e),
    }
}

/// A protocol's listeners: plain ones on `tcp_port`, TLS ones (with `tls`)
/// on `ssl_port` when both are given.
pub(crate) type Bound = Vec<(TcpListener, Option<Arc<ServerTls>>)>;

/// Bind a protocol's plain and TLS ports ([`bind`] each).
pub(crate) async fn bind_plain_and_tls(
    config: &Config,
    tcp_port: Option<u16>,
    ssl_port: Option<u16>,
    tls: Option<&Arc<ServerTls>>,
) -> std::io::Result<Bound> {
    let mut bound = Vec::new();
    if let Some(port) = tcp_port {
        for listener in bind(config, port).await? {
            bound.push((listener, None));
        }
    }
    if let (Some(port), Some(tls)) = (ssl_port, tls) {
        for listener in bind(config, port).await? {
            bound.push((listener, Some(Arc::clone(tls))));
        }
    }
    Ok(bound)
}

/// Bind the AMQP listener(s) and start accepting: plain on
/// [`Config::amqp_tcp_port`], TLS with `tls` on [`Config::amqp_ssl_port`].
/// `max_connections` counts both.
pub async fn start(
    config: Arc<Config>,
    broker: Arc<Broker>,
    tls: Option<Arc<ServerTls>>,
    cluster: Option<Arc<crate::cluster::Cluster>>,
) -> std::io::Result<Server> {
    let (tx, rx) = watch::channel(false);
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut addrs = Vec::new();
    let mut tls_addrs = Vec::new();
    let bound = bind_plain_and_tls(
        &config,
        config.amqp_tcp_port(),
        config.amqp_ssl_port(),
        tls.as_ref(),
    )
    .await?;
    for (listener, tls) in bound {
        let addr = listener.local_addr()?;
        if tls.is_some() {
            tracing::info!(%addr, "AMQPS (TLS) listener started");
            tls_addrs.push(addr);
        } else {
            tracing::info!(%addr, "AMQP listener started");
            addrs.push(addr);
        }
        tokio::spawn(accept_loop(
            listener,
            tls,
            Arc::clone(&open),
            Arc::clone(&broker),
            Arc::clone(&config),
            cluster.clone(),
            rx.clone(),
        ));
    }
    Ok(Server {
        broker,
        addrs,
        tls_addrs,
        tls,
        shutdown: tx,
    })
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<Arc<ServerTls>>,
    open: Arc<std::sync::atomic::AtomicUsize>,
    broker: Arc<Broker>,
    config: Arc<Config>,
    cluster: Option<Arc<crate::cluster::Cluster>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let handshake_timeout = crate::tls::handshake_timeout(&config);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let peer = canonical(peer);
                    let Some(slot) = ConnectionSlot::take(&open, config.max_connections) else {
                        tracing::warn!(
                            %peer,
                            limit = config.max_connections.unwrap_or(0),
                            "connection refused: connection limit ({}) reached",
                            config.max_connections.unwrap_or(0)
                        );
                        drop(stream);
                        continue;
                    };
                    let (broker, config) = (Arc::clone(&broker), Arc::clone(&config));
                    let cluster = cluster.clone();
                    let Some(tls) = tls.clone() else {
                        tokio::spawn(async move {
                            connection::run(stream, peer, broker, config, cluster).await;
                            drop(slot);
                        });
                        continue;
                    };
                    tokio::spawn(async move {
                        match crate::tls::accept(&tls, stream, handshake_timeout).await {
                            Ok(stream) => {
                                connection::run_tls(stream, peer, broker, config, cluster).await
                            }
                            Err(e) => tracing::warn!(%peer, "TLS connection refused: {e}"),
                        }
                        drop(slot);
                    });
                }
                Err(e) => {
                    // Out of fds and the like: log, back off briefly, keep serving.
                    tracing::error!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// One of the `max_connections` places, given back when dropped.
struct ConnectionSlot(Arc<std::sync::atomic::AtomicUsize>);

impl ConnectionSlot {
    fn take(open: &Arc<std::sync::atomic::AtomicUsize>, max: Option<usize>) -> Option<Self> {
        use std::sync::atomic::Ordering;
        let prev = open.fetch_add(1, Ordering::AcqRel);
        if max.is_some_and(|max| prev >= max) {
            open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(ConnectionSlot(Arc::clone(open)))
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// `addr` with an IPv4-mapped IPv6 address (what a dual-stack listener
/// reports for IPv4 peers) as the IPv4 address it is, as RabbitMQ shows
/// connection names and peer hosts.
pub fn canonical(addr: std::net::SocketAddr) -> std::net::SocketAddr {
    std::net::SocketAddr::new(addr.ip().to_canonical(), addr.port())
}
