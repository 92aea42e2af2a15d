//! This node's links to the other members, as RabbitMQ's `cluster_links`
//! shows its distribution links: per peer node, the bytes every inter-node
//! connection to or from it wrote and read (Raft RPCs, requests, data links
//! alike; inside TLS, the frames' bytes before encryption), the addresses of
//! the last connection this node dialled to it, and the rates between the
//! two newest looks (time passed in).
//!
//! A connection counts into its own [`Tally`] from the start; the handshake
//! names the peer, and [`Links::bind`] then adds what the connection counted
//! so far to the peer's totals and sends the rest there.

use parking_lot::Mutex;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Bytes written to and read from a peer.
#[derive(Debug, Default)]
pub struct Bytes {
    sent: AtomicU64,
    recv: AtomicU64,
}

impl Bytes {
    fn add(&self, sent: u64, recv: u64) {
        self.sent.fetch_add(sent, Ordering::Relaxed);
        self.recv.fetch_add(recv, Ordering::Relaxed);
    }

    fn get(&self) -> (u64, u64) {
        (
            self.sent.load(Ordering::Relaxed),
            self.recv.load(Ordering::Relaxed),
        )
    }
}

/// One connection's counts: its own until the handshake names the peer,
/// the peer's from then on.
#[derive(Debug, Clone, Default)]
pub struct Tally(Arc<TallyInner>);

#[derive(Debug, Default)]
struct TallyInner {
    own: Bytes,
    peer: OnceLock<Arc<Bytes>>,
}

impl Tally {
    fn count(&self, sent: u64, recv: u64) {
        match self.0.peer.get() {
            Some(p) => p.add(sent, recv),
            None => self.0.own.add(sent, recv),
        }
    }
}

/// `io`, counting what goes through it into a [`Tally`].
#[derive(Debug)]
pub struct Counted<T> {
    io: T,
    tally: Tally,
}

impl<T> Counted<T> {
    pub fn new(io: T, tally: Tally) -> Counted<T> {
        Counted { io, tally }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        let n = buf.filled().len().saturating_sub(before);
        if n > 0 {
            self.tally.count(0, n as u64);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &r {
            self.tally.count(*n as u64, 0);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &r {
            self.tally.count(*n as u64, 0);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Where a connection runs: this node's end and the peer's.
#[derive(Debug, Clone, Copy)]
pub struct Ends {
    pub sock: SocketAddr,
    pub peer: SocketAddr,
}

/// One peer's link.
#[derive(Debug)]
struct Peer {
    bytes: Arc<Bytes>,
    /// The last connection this node dialled to it (else the last accepted).
    ends: Option<(Ends, bool)>,
    /// The two newest looks: (ms, sent, received).
    looks: [Option<(u64, u64, u64)>; 2],
}

/// Every peer's link, by node name.
#[derive(Debug, Default)]
pub struct Links {
    peers: Mutex<BTreeMap<String, Peer>>,
}

/// How long after a look the next one replaces it (the rates' window, at
/// least): RabbitMQ samples every 5 s.
const LOOK_EVERY_MS: u64 = 5_000;

impl Links {
    /// A connection to or from `node` passed its handshake: count it as the
    /// link's (`dialled`: this node opened it).
    pub fn bind(&self, node: &str, tally: &Tally, ends: Option<Ends>, dialled: bool) {
        let mut peers = self.peers.lock();
        let peer = peers.entry(node.to_string()).or_insert_with(|| Peer {
            bytes: Arc::default(),
            ends: None,
            looks: [None, None],
        });
        if let Some(e) = ends {
            if dialled || !peer.ends.is_some_and(|(_, d)| d) {
                peer.ends = Some((e, dialled));
            }
        }
        if tally.0.peer.set(Arc::clone(&peer.bytes)).is_ok() {
            let (sent, recv) = tally.0.own.get();
            peer.bytes.add(sent, recv);
        }
    }

    /// The links as `cluster_links` lists them at `now_ms`, except the
    /// nodes `keep` refuses (no longer members).
    pub fn json(&self, now_ms: u64, keep: impl Fn(&str) -> bool) -> Vec<Value> {
        let mut peers = self.peers.lock();
        peers.retain(|name, _| keep(name));
        peers
            .iter_mut()
            .map(|(name, p)| {
                let (sent, recv) = p.bytes.get();
                match p.looks {
                    [_, Some((t, ..))] if now_ms.saturating_sub(t) < LOOK_EVERY_MS => {}
                    [_, newest] => p.looks = [newest, Some((now_ms, sent, recv))],
                }
                let (send_rate, recv_rate) = match p.looks {
                    [Some((t0, s0, r0)), Some((t1, s1, r1))] if t1 > t0 => {
                        let secs = (t1 - t0) as f64 / 1000.0;
                        (
                            s1.saturating_sub(s0) as f64 / secs,
                            r1.saturating_sub(r0) as f64 / secs,
                        )
                    }
                    _ => (0.0, 0.0),
                };
                let rate = |r: f64| json!({ "rate": (r * 10.0).round() / 10.0 });
                let mut link = json!({
                    "name": name,
                    "send_bytes": sent,
                    "recv_bytes": recv,
                    "stats": {
                        "send_bytes": sent,
                        "send_bytes_details": rate(send_rate),
                        "recv_bytes": recv,
                        "recv_bytes_details": rate(recv_rate),
                    },
                });
                if let Some((e, _)) = p.ends {
                    link["peer_addr"] = json!(e.peer.ip().to_string());
                    link["peer_port"] = json!(e.peer.port());
                    link["sock_addr"] = json!(e.sock.ip().to_string());
                    link["sock_port"] = json!(e.sock.port());
                }
                link
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn connections_count_into_their_peers_link_with_rates_between_looks() {
        let links = Links::default();
        let (a, b) = tokio::io::duplex(1024);
        let tally = Tally::default();
        let mut a = Counted::new(a, tally.clone());
        let mut b = b;
        // The handshake, before the peer is known: counted, then added.
        a.write_all(b"hello").await.expect("write");
        let mut got = [0u8; 5];
        b.read_exact(&mut got).await.expect("read");
        b.write_all(b"welcome!").await.expect("write");
        let mut got = [0u8; 8];
        a.read_exact(&mut got).await.expect("read");
        let ends = Ends {
            sock: "127.0.0.1:40000".parse().expect("addr"),
            peer: "127.0.0.2:25672".parse().expect("addr"),
        };
        links.bind("warren@b", &tally, Some(ends), true);
        a.write_all(&[0u8; 100]).await.expect("write");
        let all = |_: &str| true;
        let l = links.json(10_000, all);
        assert_eq!(l.len(), 1);
        assert_eq!(l[0]["name"], "warren@b");
        assert_eq!(
            (l[0]["send_bytes"].as_u64(), l[0]["recv_bytes"].as_u64()),
            (Some(105), Some(8))
        );
        assert_eq!(l[0]["peer_addr"], "127.0.0.2");
        assert_eq!(l[0]["peer_port"], 25672);
        assert_eq!(l[0]["sock_port"], 40000);
        assert_eq!(
            l[0]["stats"]["send_bytes_details"]["rate"], 0.0,
            "one look: no rate"
        );
        // A second connection, accepted from the same peer: its counts join
        // the link's; the dialled one's addresses stay.
        let (c, _d) = tokio::io::duplex(1024);
        let t2 = Tally::default();
        let mut c = Counted::new(c, t2.clone());
        let other = Ends {
            sock: "127.0.0.1:25672".parse().expect("addr"),
            peer: "127.0.0.2:50000".parse().expect("addr"),
        };
        links.bind("warren@b", &t2, Some(other), false);
        c.write_all(&[0u8; 1000]).await.expect("write");
        // Within the look's window: the same look, no rate yet.
        assert_eq!(
            links.json(12_000, all)[0]["stats"]["send_bytes_details"]["rate"],
            0.0
        );
        let l = links.json(20_000, all);
        assert_eq!(l[0]["send_bytes"], 1105);
        assert_eq!(l[0]["peer_port"], 25672);
        assert_eq!(
            l[0]["stats"]["send_bytes_details"]["rate"], 100.0,
            "1000 B over 10 s"
        );
        assert_eq!(l[0]["stats"]["recv_bytes_details"]["rate"], 0.0);
        // A node that left the cluster is dropped.
        assert!(links.json(21_000, |n| n != "warren@b").is_empty());
    }
}
