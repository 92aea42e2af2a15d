//! The AMQP network side: listeners, the accept loop, one task per connection
//! (a thin driver of a [`crate::session::Session`]), mailboxes and socket writes.
//!
//! [`start`] binds the listeners and returns a [`Server`] handle; dropping or
//! calling [`Server::shutdown`] stops accepting.

pub mod connection;
pub mod mailbox;
pub mod writer;

use crate::broker::Broker;
use crate::config::Config;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// A running AMQP listener.
#[derive(Debug)]
pub struct Server {
    pub broker: Arc<Broker>,
    addrs: Vec<SocketAddr>,
    shutdown: watch::Sender<bool>,
}

impl Server {
    /// The first bound AMQP address (with the real port when 0 was asked).
    pub fn amqp_addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    pub fn amqp_addrs(&self) -> &[SocketAddr] {
        &self.addrs
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

/// Bind `config.bind:config.amqp_port`. `::` binds a dual-stack IPv6 socket and
/// falls back to IPv4 where IPv6 is unavailable.
async fn bind(config: &Config) -> std::io::Result<Vec<TcpListener>> {
    let host = config.bind.as_str();
    let addr = if host.contains(':') {
        format!("[{host}]:{}", config.amqp_port)
    } else {
        format!("{host}:{}", config.amqp_port)
    };
    match TcpListener::bind(&addr).await {
        Ok(l) => Ok(vec![l]),
        Err(e) if host == "::" => {
            tracing::warn!(error = %e, "IPv6 unavailable, listening on IPv4 only");
            Ok(vec![
                TcpListener::bind(("0.0.0.0", config.amqp_port)).await?,
            ])
        }
        Err(e) => Err(e),
    }
}

/// Bind the AMQP listener(s) and start accepting.
pub async fn start(config: Arc<Config>, broker: Arc<Broker>) -> std::io::Result<Server> {
    let listeners = bind(&config).await?;
    let (tx, rx) = watch::channel(false);
    let mut addrs = Vec::new();
    for listener in listeners {
        let addr = listener.local_addr()?;
        tracing::info!(%addr, "AMQP listener started");
        addrs.push(addr);
        tokio::spawn(accept_loop(
            listener,
            Arc::clone(&broker),
            Arc::clone(&config),
            rx.clone(),
        ));
    }
    Ok(Server {
        broker,
        addrs,
        shutdown: tx,
    })
}

async fn accept_loop(
    listener: TcpListener,
    broker: Arc<Broker>,
    config: Arc<Config>,
    mut shutdown: watch::Receiver<bool>,
) {
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
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
                    tokio::spawn(async move {
                        connection::run(stream, peer, broker, config).await;
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
