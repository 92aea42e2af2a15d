//! Inter-node connections: the listener (`[cluster] listen`, default port
//! 25672) and the dialer, both speaking [`super::frame`]. Every connection
//! starts with the cookie handshake (a challenge each way, answered with
//! SHA-256 of the nonce and the cookie, so the cookie never crosses the wire);
//! a peer that fails it is logged and disconnected before anything else is
//! read. After it, the dialer sends requests (openraft's RPCs, join, propose,
//! forget) and the listener answers each with one `Reply` frame, in order.

use super::frame::{Frame, FrameCodec, Kind};
use super::{Cluster, Identity, NodeInfo, TypeConfig};
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
use tokio::net::{TcpListener, TcpStream};
use tokio_util::codec::Framed;

type NodeId = u64;
pub(super) type Conn = Framed<TcpStream, FrameCodec>;

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
    #[error("timed out")]
    Timeout,
    #[error("bad reply: {0}")]
    Decode(#[from] serde_json::Error),
}

async fn next(conn: &mut Conn) -> std::io::Result<Frame> {
    match conn.next().await {
        Some(r) => r,
        None => Err(std::io::ErrorKind::UnexpectedEof.into()),
    }
}

/// Dial `addr` and do the dialer's side of the handshake.
pub async fn dial(addr: &str, cookie: &str, me: &NodeInfo, id: NodeId) -> Result<Conn, CallError> {
    let stream = TcpStream::connect(addr).await?;
    let _ = stream.set_nodelay(true);
    let mut conn = Framed::new(stream, FrameCodec::default());
    let handshake = async {
        let challenge = next(&mut conn).await?;
        if challenge.kind != Kind::Challenge {
            return Err(CallError::Handshake(addr.into(), "no challenge".into()));
        }
        let nonce: [u8; 16] = rand::random();
        let hello = Hello {
            node: me.clone(),
            id,
            proof: proof(cookie, &challenge.payload, "dialer"),
            nonce: nonce.to_vec(),
        };
        conn.send((Kind::Hello, serde_json::to_vec(&hello)?))
            .await?;
        let welcome = next(&mut conn).await?;
        if welcome.kind != Kind::Welcome {
            return Err(CallError::Handshake(addr.into(), "refused".into()));
        }
        let w: Welcome = serde_json::from_slice(&welcome.payload)?;
        if !same(&w.proof, &proof(cookie, &nonce, "listener")) {
            return Err(CallError::Handshake(
                addr.into(),
                "the listener does not know the cookie".into(),
            ));
        }
        Ok(())
    };
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
        Ok(Ok(())) => Ok(conn),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(CallError::Timeout),
    }
}

/// A connection to one peer, opened on first use and again after a failure.
pub struct Peer {
    addr: String,
    ident: Arc<Identity>,
    conn: Option<Conn>,
}

impl Peer {
    pub fn new(addr: String, ident: Arc<Identity>) -> Peer {
        Peer {
            addr,
            ident,
            conn: None,
        }
    }

    /// Send one request and wait for its reply (at most `timeout`).
    pub async fn call<Req: Serialize, Resp: for<'a> Deserialize<'a>>(
        &mut self,
        kind: Kind,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, CallError> {
        let payload = serde_json::to_vec(req)?;
        let r = tokio::time::timeout(timeout, self.exchange(kind, payload)).await;
        let r = match r {
            Ok(r) => r,
            Err(_) => Err(CallError::Timeout),
        };
        match r {
            Ok(bytes) => Ok(serde_json::from_slice(&bytes)?),
            Err(e) => {
                self.conn = None;
                Err(e)
            }
        }
    }

    async fn exchange(&mut self, kind: Kind, payload: Vec<u8>) -> Result<bytes::Bytes, CallError> {
        if self.conn.is_none() {
            let i = &self.ident;
            self.conn = Some(dial(&self.addr, &i.cookie, &i.me, i.id).await?);
        }
        let Some(conn) = self.conn.as_mut() else {
            return Err(CallError::Timeout);
        };
        conn.send((kind, payload)).await?;
        let reply = next(conn).await?;
        if reply.kind != Kind::Reply {
            return Err(CallError::Handshake(
                self.addr.clone(),
                "not a reply".into(),
            ));
        }
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
    let mut conn = Framed::new(stream, FrameCodec::handshake());
    let nonce: [u8; 16] = rand::random();
    let hello = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        conn.send((Kind::Challenge, nonce.to_vec())).await?;
        next(&mut conn).await
    })
    .await
    .map_err(|_| CallError::Timeout)??;
    let hello: Option<Hello> = match hello.kind {
        Kind::Hello => serde_json::from_slice(&hello.payload).ok(),
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
    conn.send((Kind::Welcome, serde_json::to_vec(&welcome)?))
        .await?;
    *conn.codec_mut() = FrameCodec::default();
    tracing::debug!(%peer, node = %hello.node.name, "inter-node connection accepted");
    loop {
        let frame = next(&mut conn).await?;
        if frame.kind == Kind::Link {
            return super::forward::serve_link(conn, Arc::clone(c), hello.node.name).await;
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
                let req: AppendEntriesRequest<TypeConfig> = serde_json::from_slice(p)?;
                serde_json::to_vec(&self.raft().append_entries(req).await)?
            }
            Kind::Vote => {
                let req: VoteRequest<NodeId> = serde_json::from_slice(p)?;
                serde_json::to_vec(&self.raft().vote(req).await)?
            }
            Kind::InstallSnapshot => {
                let req: InstallSnapshotRequest<TypeConfig> = serde_json::from_slice(p)?;
                serde_json::to_vec(&self.raft().install_snapshot(req).await)?
            }
            Kind::Join => {
                let (id, node): (NodeId, NodeInfo) = serde_json::from_slice(p)?;
                serde_json::to_vec(&self.add_member(id, node).await)?
            }
            Kind::Propose => {
                let cmd: super::Command = serde_json::from_slice(p)?;
                serde_json::to_vec(&self.write_here(cmd).await)?
            }
            Kind::Ping => serde_json::to_vec(&())?,
            Kind::Forget => {
                let id: NodeId = serde_json::from_slice(p)?;
                serde_json::to_vec(&self.remove_member(id).await)?
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
            peer: Peer::new(node.addr.clone(), Arc::clone(&self.ident)),
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
            Err(CallError::Decode(e)) => Err(RPCError::Network(NetworkError::new(&e))),
            Err(e) => Err(RPCError::Unreachable(Unreachable::new(&e))),
        }
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
        self.rpc(Kind::InstallSnapshot, &rpc, &option).await
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
}
