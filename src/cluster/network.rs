//! Inter-node connections: the listener (`[cluster] listen`, default port
//! 25672) and the dialer, both speaking [`super::frame`]. Every connection
//! starts with the cookie handshake (a challenge each way, answered with
//! SHA-256 of the nonce and the cookie, so the cookie never crosses the wire);
//! a peer that fails it is logged and disconnected before anything else is
//! read. After it, the dialer sends requests (openraft's RPCs, join, propose,
//! forget, ping, stats) and the listener answers each with one `Reply` frame,
//! in order.
//!
//! With `[cluster.tls]` every connection, whatever it carries, is mutual TLS
//! ([`crate::tls::MutualTls`]): the listener sends a plain `StartTls` frame
//! instead of the challenge, the dialer starts the TLS handshake, and the
//! cookie handshake then runs inside TLS. A node with TLS and one without
//! recognise each other from that first frame and say so in the log.
//! [`dial`] and [`serve`] are the only ways in and out, so every connection
//! type gets the same TLS and handshake. The dialer reaches a peer at the
//! address `[cluster] dial` gives for it, if any (NAT, proxies).

use super::codec::snapshot_chunk::Chunk;
use super::frame::{self, Frame, FrameCodec, Kind};
use super::links::{Counted, Ends, Tally};
use super::{Cluster, Identity, NodeInfo, TypeConfig};
use crate::tls::HandshakeError;
use futures::{SinkExt, StreamExt};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::sync::{Arc, Weak};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::{Framed, FramedParts};

type NodeId = u64;

/// What an inter-node connection runs over: TCP, or TLS over TCP.
pub trait Link: AsyncRead + AsyncWrite + Unpin + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + Sync> Link for T {}

/// An inter-node connection after the handshake.
pub type Conn = Framed<Box<dyn Link>, FrameCodec>;

/// How long a peer has for the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// Proof of the cookie for `nonce`, for one side (`role`) of the handshake.
pub fn proof(cookie: &str, nonce: &[u8], role: &str) -> String {
    let mut h = Sha256::new();
    h.update(role.as_bytes());
    h.update([0]);
    h.update(nonce);
    h.update([0]);
    h.update(cookie.as_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Equal, in time that does not depend on where they differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[derive(Debug, Serialize, Deserialize)]
struct Hello {
    node: NodeInfo,
    id: NodeId,
    proof: String,
    nonce: Vec<u8>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Welcome {
    node: NodeInfo,
    id: NodeId,
    proof: String,
}

/// Why a call to another node failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("handshake with {0} failed: {1}")]
    Handshake(String, String),
    #[error("TLS with {0} failed: {1}")]
    Tls(String, String),
    #[error("timed out")]
    Timeout,
    #[error("bad reply: {0}")]
    Decode(#[from] super::codec::CodecError),
}

async fn next<T: Link>(conn: &mut Framed<T, FrameCodec>) -> std::io::Result<Frame> {
    match conn.next().await {
        Some(r) => r,
        None => Err(std::io::ErrorKind::UnexpectedEof.into()),
    }
}

/// The host a node name or an address names (`warren@host`, `host:port`,
/// `[::1]:port`).
fn host_of(name: Option<&str>, addr: &str) -> String {
    if let Some((_, host)) = name.and_then(|n| n.split_once('@')) {
        return host.to_string();
    }
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .to_string()
}

/// This node's end of `stream` and the peer's.
fn ends_of(stream: &TcpStream) -> Option<Ends> {
    Some(Ends {
        sock: stream.local_addr().ok()?,
        peer: stream.peer_addr().ok()?,
    })
}

/// Re-frame a connection's bytes (and what was read ahead of them) over a
/// boxed link.
fn boxed<T: Link + 'static>(
    io: T,
    codec: FrameCodec,
    read_ahead: bytes::BytesMut,
    tally: &Tally,
) -> Conn {
    let io = Counted::new(io, tally.clone());
    let mut parts = FramedParts::new::<(Kind, Vec<u8>)>(Box::new(io) as Box<dyn Link>, codec);
    parts.read_buf = read_ahead;
    Framed::from_parts(parts)
}

/// Dial the node `name` (when known) recorded at `addr`, reached where
/// `[cluster] dial` says or at `addr`, and do the dialer's side of the
/// handshake: TLS first when the node has `[cluster.tls]`, then the cookie.
/// A TLS/plain mismatch or a failed TLS handshake is logged (once in a while
/// per address) and returned.
pub async fn dial(ident: &Identity, name: Option<&str>, addr: &str) -> Result<Conn, CallError> {
    let target = ident.route(name, addr);
    let r = tokio::time::timeout(HANDSHAKE_TIMEOUT, dial_inner(ident, name, addr, &target)).await;
    let r = r.unwrap_or(Err(CallError::Timeout));
    if let Err(e @ CallError::Tls(..)) = &r {
        ident.complain(&target, || {
            tracing::warn!(peer = %addr, via = %target, error = %e, "inter-node connection failed")
        });
    }
    r
}

async fn dial_inner(
    ident: &Identity,
    name: Option<&str>,
    addr: &str,
    target: &str,
) -> Result<Conn, CallError> {
    let stream = TcpStream::connect(target).await?;
    let _ = stream.set_nodelay(true);
    let ends = ends_of(&stream);
    let tally = Tally::default();
    // Nothing large is expected before the handshake is over.
    let mut plain = Framed::new(stream, FrameCodec::handshake());
    let first = next(&mut plain).await?;
    let tls_error = |why: &str| CallError::Tls(addr.into(), why.into());
    let (mut conn, challenge) =
        match (first.kind, &ident.tls) {
            (Kind::StartTls, Some(tls)) => {
                let parts = plain.into_parts();
                if !parts.read_buf.is_empty() {
                    return Err(tls_error("bytes in plain text after the StartTls frame"));
                }
                let host = host_of(name, addr);
                let stream = tls
                    .connect(parts.io, &host, HANDSHAKE_TIMEOUT)
                    .await
                    .map_err(|e| CallError::Tls(addr.into(), e.to_string()))?;
                let mut conn = boxed(
                    stream,
                    FrameCodec::default(),
                    bytes::BytesMut::new(),
                    &tally,
                );
                let challenge = next(&mut conn).await?;
                (conn, challenge)
            }
            (Kind::StartTls, None) => {
                return Err(tls_error(
                    "the peer requires TLS between nodes and this node has no [cluster.tls]",
                ))
            }
            (Kind::Challenge, Some(_)) => return Err(tls_error(
                "the peer does not use TLS between nodes and this node requires it ([cluster.tls])",
            )),
            (_, _) => {
                let parts = plain.into_parts();
                (
                    boxed(parts.io, FrameCodec::default(), parts.read_buf, &tally),
                    first,
                )
            }
        };
    if challenge.kind != Kind::Challenge {
        return Err(CallError::Handshake(addr.into(), "no challenge".into()));
    }
    let nonce: [u8; 16] = rand::random();
    let hello = Hello {
        node: ident.me.clone(),
        id: ident.id,
        proof: proof(&ident.cookie, &challenge.payload, "dialer"),
        nonce: nonce.to_vec(),
    };
    conn.send((Kind::Hello, super::codec::encode(&hello)?))
        .await?;
    let welcome = next(&mut conn).await?;
    if welcome.kind != Kind::Welcome {
        return Err(CallError::Handshake(addr.into(), "refused".into()));
    }
    let w: Welcome = super::codec::decode(&welcome.payload)?;
    if !same(&w.proof, &proof(&ident.cookie, &nonce, "listener")) {
        return Err(CallError::Handshake(
            addr.into(),
            "the listener does not know the cookie".into(),
        ));
    }
    ident.links.bind(&w.node.name, &tally, ends, true);
    Ok(conn)
}

/// A connection to one peer, opened on first use and again after a failure.
pub struct Peer {
    /// The node's name, when known (a seed may be a bare address).
    name: Option<String>,
    addr: String,
    ident: Arc<Identity>,
    conn: Option<Conn>,
    /// A dial under way (outlives a call abandoned while it runs).
    dialing: Option<tokio::task::JoinHandle<Result<Conn, CallError>>>,
}

impl Peer {
    /// A peer known by its address only.
    pub fn new(addr: String, ident: Arc<Identity>) -> Peer {
        Peer {
            name: None,
            addr,
            ident,
            conn: None,
            dialing: None,
        }
    }

    /// A member, by its name and recorded address.
    pub fn to(node: &NodeInfo, ident: Arc<Identity>) -> Peer {
        Peer {
            name: Some(node.name.clone()),
            addr: node.addr.clone(),
            ident,
            conn: None,
            dialing: None,
        }
    }

    /// A seed (`warren@host:port`, `warren@host` or `host:port`).
    pub fn seed(seed: &str, ident: Arc<Identity>) -> Peer {
        let (name, addr) = super::parse_seed(seed);
        Peer {
            name,
            addr,
            ident,
            conn: None,
            dialing: None,
        }
    }

    /// Send one request and wait for its reply (at most `timeout`).
    pub async fn call<Req: Serialize, Resp: for<'a> Deserialize<'a>>(
        &mut self,
        kind: Kind,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, CallError> {
        let payload = super::codec::encode(req)?;
        let r = tokio::time::timeout(timeout, self.exchange(kind, payload)).await;
        let r = match r {
            Ok(r) => r,
            Err(_) => Err(CallError::Timeout),
        };
        match r {
            Ok(bytes) => Ok(super::codec::decode(&bytes)?),
            Err(e) => {
                self.conn = None;
                Err(e)
            }
        }
    }

    /// One request and its reply. Cancel-safe: the connection is taken out
    /// of `self` while a request is in flight, so a call abandoned halfway
    /// (openraft times its RPCs out by dropping them) drops that connection
    /// rather than leaving a reply behind for the next request to mistake for
    /// its own; and the dial runs in a task of its own, kept across abandoned
    /// calls, so a slow link still ends up connected.
    async fn exchange(&mut self, kind: Kind, payload: Vec<u8>) -> Result<bytes::Bytes, CallError> {
        let mut conn = match self.conn.take() {
            Some(conn) => conn,
            None => {
                let dialing = self.dialing.get_or_insert_with(|| {
                    let (ident, name, addr) = (
                        Arc::clone(&self.ident),
                        self.name.clone(),
                        self.addr.clone(),
                    );
                    tokio::spawn(async move { dial(&ident, name.as_deref(), &addr).await })
                });
                let r = dialing.await;
                self.dialing = None;
                r.map_err(|e| CallError::Io(std::io::Error::other(e)))??
            }
        };
        conn.send((kind, payload)).await?;
        let reply = next(&mut conn).await?;
        if reply.kind != Kind::Reply {
            return Err(CallError::Handshake(
                self.addr.clone(),
                "not a reply".into(),
            ));
        }
        self.conn = Some(conn);
        Ok(reply.payload)
    }
}

/// Accept inter-node connections until the cluster is dropped.
pub fn serve(listener: TcpListener, cluster: Weak<Cluster>) {
    tokio::spawn(async move {
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            let Some(c) = cluster.upgrade() else { return };
            tokio::spawn(async move {
                if let Err(e) = serve_conn(stream, &c).await {
                    tracing::debug!(%peer, error = %e, "inter-node connection ended");
                }
            });
        }
    });
}

async fn serve_conn(stream: TcpStream, c: &Arc<Cluster>) -> Result<(), CallError> {
    let peer = stream.peer_addr()?;
    let _ = stream.set_nodelay(true);
    let ends = ends_of(&stream);
    let tally = Tally::default();
    let link: Box<dyn Link> = match &c.ident.tls {
        None => Box::new(stream),
        Some(tls) => {
            let mut stream = stream;
            let mut marker = bytes::BytesMut::new();
            frame::encode(Kind::StartTls, &[], &mut marker);
            stream.write_all(&marker).await?;
            match tls.accept(stream, HANDSHAKE_TIMEOUT).await {
                Ok(s) => Box::new(s),
                Err(e) => {
                    let why = match e {
                        HandshakeError::Plaintext => {
                            "not a TLS client: a node without [cluster.tls]?".to_string()
                        }
                        HandshakeError::Failed(e)
                            if e.kind() == std::io::ErrorKind::UnexpectedEof =>
                        {
                            "closed before the TLS handshake: a node without [cluster.tls]?"
                                .to_string()
                        }
                        e => e.to_string(),
                    };
                    c.ident.complain(
                        &format!("{} {why}", peer.ip()),
                        || tracing::warn!(%peer, "inter-node connection refused: {why}"),
                    );
                    return Ok(());
                }
            }
        }
    };
    let link: Box<dyn Link> = Box::new(Counted::new(link, tally.clone()));
    let mut conn = Framed::new(link, FrameCodec::handshake());
    let nonce: [u8; 16] = rand::random();
    let hello = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        conn.send((Kind::Challenge, nonce.to_vec())).await?;
        next(&mut conn).await
    })
    .await
    .map_err(|_| CallError::Timeout)??;
    let hello: Option<Hello> = match hello.kind {
        Kind::Hello => super::codec::decode(&hello.payload).ok(),
        _ => None,
    };
    let Some(hello) = hello.filter(|h| same(&h.proof, &proof(&c.ident.cookie, &nonce, "dialer")))
    else {
        tracing::warn!(%peer, "inter-node connection refused: wrong cookie (or not a warren node)");
        return Ok(());
    };
    let welcome = Welcome {
        node: c.me.clone(),
        id: c.id,
        proof: proof(&c.ident.cookie, &hello.nonce, "listener"),
    };
    conn.send((Kind::Welcome, super::codec::encode(&welcome)?))
        .await?;
    *conn.codec_mut() = FrameCodec::default();
    c.ident.links.bind(&hello.node.name, &tally, ends, false);
    tracing::debug!(%peer, node = %hello.node.name, "inter-node connection accepted");
    loop {
        let frame = next(&mut conn).await?;
        if frame.kind == Kind::Link {
            return super::forward::serve_link(conn, Arc::clone(c), hello.node.name).await;
        }
        if frame.kind == Kind::Mux {
            return super::mux::serve(conn, Arc::clone(c)).await;
        }
        let reply = c.handle_request(frame).await?;
        conn.send((Kind::Reply, reply)).await?;
    }
}

impl Cluster {
    /// Answer one request from a peer.
    async fn handle_request(self: &Arc<Self>, frame: Frame) -> Result<Vec<u8>, CallError> {
        let p = &frame.payload;
        Ok(match frame.kind {
            Kind::AppendEntries => {
                let req: AppendEntriesRequest<TypeConfig> = super::codec::decode(p)?;
                super::codec::encode(&self.raft().append_entries(req).await)?
            }
            Kind::Vote => {
                let req: VoteRequest<NodeId> = super::codec::decode(p)?;
                super::codec::encode(&self.raft().vote(req).await)?
            }
            Kind::InstallSnapshot => {
                let req: Chunk<TypeConfig> = super::codec::decode(p)?;
                super::codec::encode(&self.raft().install_snapshot(req.0).await)?
            }
            Kind::Join => {
                let (id, node): (NodeId, NodeInfo) = super::codec::decode(p)?;
                super::codec::encode(&self.add_member(id, node).await)?
            }
            Kind::Propose => {
                let cmd: super::Command = super::codec::decode(p)?;
                super::codec::encode(&self.write_here(cmd).await)?
            }
            // The answer carries this node's resource alarms (cluster-wide).
            Kind::Ping => super::codec::encode(&self.broker.alarms())?,
            Kind::Stats => {
                let query: serde_json::Value = super::codec::decode(p)?;
                super::codec::encode(&self.local_stats(&query))?
            }
            Kind::Forget => {
                let id: NodeId = super::codec::decode(p)?;
                super::codec::encode(&self.remove_member(id).await)?
            }
            other => {
                return Err(CallError::Handshake(
                    "peer".into(),
                    format!("unexpected {other:?} frame"),
                ))
            }
        })
    }
}

/// openraft's view of the network: a [`Peer`] per target node.
pub struct Network {
    pub ident: Arc<Identity>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerNetwork;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> PeerNetwork {
        PeerNetwork {
            target,
            peer: Peer::to(node, Arc::clone(&self.ident)),
        }
    }
}

pub struct PeerNetwork {
    target: NodeId,
    peer: Peer,
}

impl PeerNetwork {
    async fn rpc<Req, Resp, E>(
        &mut self,
        kind: Kind,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: for<'a> Deserialize<'a>,
        E: std::error::Error + for<'a> Deserialize<'a>,
    {
        let r: Result<Result<Resp, RaftError<NodeId, E>>, CallError> =
            self.peer.call(kind, req, option.hard_ttl()).await;
        match r {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            Err(e) => Err(rpc_error(e)),
        }
    }
}

/// A failed call as openraft's error. Only a peer that could not be reached
/// is `Unreachable`, which makes openraft pause replication to it (the
/// backoff); a reply that was slow or did not decode is a `Network` error,
/// retried at the next heartbeat: on a loaded machine a slow reply paused
/// for a backoff longer than the election timeout made the followers elect
/// again and again, and a majority committed nothing for seconds.
pub(crate) fn rpc_error<E: std::error::Error>(e: CallError) -> RPCError<NodeId, NodeInfo, E> {
    match e {
        CallError::Decode(_) | CallError::Timeout => RPCError::Network(NetworkError::new(&e)),
        e => RPCError::Unreachable(Unreachable::new(&e)),
    }
}

impl RaftNetwork<TypeConfig> for PeerNetwork {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId>>> {
        self.rpc(Kind::AppendEntries, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, NodeInfo, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.rpc(Kind::InstallSnapshot, &Chunk(rpc), &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId>>> {
        self.rpc(Kind::Vote, &rpc, &option).await
    }

    fn backoff(&self) -> openraft::network::Backoff {
        openraft::network::Backoff::new(std::iter::repeat(Duration::from_millis(200)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_depend_on_cookie_nonce_and_side() {
        let a = proof("secret", b"0123456789abcdef", "dialer");
        assert_eq!(a.len(), 64);
        assert_eq!(a, proof("secret", b"0123456789abcdef", "dialer"));
        assert_ne!(a, proof("other", b"0123456789abcdef", "dialer"));
        assert_ne!(a, proof("secret", b"0123456789abcdefX", "dialer"));
        assert_ne!(a, proof("secret", b"0123456789abcdef", "listener"));
        assert!(same(&a, &a.clone()));
        assert!(!same(&a, &a[1..]));
    }

    #[test]
    fn the_tls_host_is_the_node_names_else_the_addresses() {
        assert_eq!(host_of(Some("warren@node-b"), "10.0.0.2:25672"), "node-b");
        assert_eq!(host_of(None, "127.0.0.3:4000"), "127.0.0.3");
        assert_eq!(host_of(None, "[::1]:4000"), "::1");
        assert_eq!(host_of(None, "node-c"), "node-c");
    }
}
