//! A TCP proxy owned by a test, put between two cluster nodes (one per
//! directed pair: the connections node A opens to node B go through A->B's
//! proxy, through `[cluster] dial`). It forwards bytes both ways and can
//! [`cut`](Proxy::cut) (drop the connections it carries and blackhole new
//! ones: accepted, never forwarded, never answered), [`delay`](Proxy::delay)
//! every chunk by some milliseconds, and [`heal`](Proxy::heal) (forward again;
//! the blackholed connections are closed so their dialers retry at once).
//!
//! It runs on a thread and a tokio runtime of its own, so a test that blocks
//! its own runtime (a blocking HTTP call, a sleep) does not stall the traffic.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

/// The address proxies listen on: apart from the nodes' 127.0.0.1-9, so a
/// proxy's free port can never be one a node has picked but not bound yet.
pub const PROXY_IP: &str = "127.0.0.100";

pub struct Proxy {
    /// Where the proxy listens ([`PROXY_IP`], a free port).
    pub addr: SocketAddr,
    /// Where it forwards to.
    pub target: String,
    cut: watch::Sender<bool>,
    delay: Arc<AtomicU64>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    /// A proxy to `target` (`host:port`), forwarding from the start.
    pub fn start(target: &str) -> Proxy {
        let std_listener = std::net::TcpListener::bind((PROXY_IP, 0)).expect("proxy bind");
        std_listener.set_nonblocking(true).expect("nonblocking");
        let addr = std_listener.local_addr().expect("proxy addr");
        let (cut, cut_rx) = watch::channel(false);
        let delay = Arc::new(AtomicU64::new(0));
        let (stop, stop_rx) = oneshot::channel();
        let to = target.to_string();
        let d = Arc::clone(&delay);
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("proxy runtime");
            rt.block_on(async move {
                let listener = TcpListener::from_std(std_listener).expect("proxy listener");
                tokio::select! {
                    () = accept_loop(listener, to, cut_rx, d) => {}
                    _ = stop_rx => {}
                }
            });
        });
        Proxy {
            addr,
            target: target.to_string(),
            cut,
            delay,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// Drop every connection through the proxy; blackhole new ones.
    pub fn cut(&self) {
        self.cut.send_replace(true);
    }

    /// Forward again (the blackholed connections are closed).
    pub fn heal(&self) {
        self.cut.send_replace(false);
    }

    /// Hold every chunk `ms` milliseconds before forwarding it (0: none).
    pub fn delay(&self, ms: u64) {
        self.delay.store(ms, Ordering::Relaxed);
    }

    pub fn is_cut(&self) -> bool {
        *self.cut.borrow()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: String,
    cut: watch::Receiver<bool>,
    delay: Arc<AtomicU64>,
) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let (target, cut, delay) = (target.clone(), cut.clone(), Arc::clone(&delay));
        tokio::spawn(async move {
            if *cut.borrow() {
                blackhole(client, cut).await;
            } else {
                forward(client, &target, cut, delay).await;
            }
        });
    }
}

/// Read and discard until the cut heals or the client leaves.
async fn blackhole(mut client: TcpStream, mut cut: watch::Receiver<bool>) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        tokio::select! {
            r = client.read(&mut buf) => if matches!(r, Ok(0) | Err(_)) { return },
            r = cut.wait_for(|c| !*c) => { let _ = r; return }
        }
    }
}

async fn forward(
    client: TcpStream,
    target: &str,
    mut cut: watch::Receiver<bool>,
    delay: Arc<AtomicU64>,
) {
    let Ok(upstream) = TcpStream::connect(target).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    tokio::select! {
        () = pump(cr, uw, Arc::clone(&delay)) => {}
        () = pump(ur, cw, delay) => {}
        r = cut.wait_for(|c| *c) => { let _ = r; }
    }
    // Both halves are dropped here: the connection is closed on both sides.
}

/// Copy `from` to `to`, each chunk held for the delay in force when it was read.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delay: Arc<AtomicU64>,
) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Vec<u8>)>(256);
    let reader = async move {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    let due = Instant::now() + Duration::from_millis(delay.load(Ordering::Relaxed));
                    if tx.send((due, buf[..n].to_vec())).await.is_err() {
                        return;
                    }
                }
            }
        }
    };
    let writer = async move {
        while let Some((due, bytes)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&bytes).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}
