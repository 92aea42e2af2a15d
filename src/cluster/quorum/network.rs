//! A quorum queue group's Raft RPCs between nodes: carried by the cluster's
//! own connections ([`crate::cluster::network::Peer`], so the same `dial`,
//! TLS and cookie handshake), borrowed from the node's shared pool (so the
//! connections to a node number the RPCs in flight, not the groups), in
//! [`Kind::Quorum`] frames that name the group; the listener
//! ([`crate::cluster::network::serve`]) hands them to
//! [`super::Manager::handle`]. No listener of their own. Besides openraft's
//! three RPCs, two of ours carry a leadership transfer (rebalancing), and one
//! the pre-vote before an election (`super::elect`).

use super::QTypeConfig;
use crate::cluster::frame::Kind;
use crate::cluster::network::{CallError, Peer};
use crate::cluster::{Identity, NodeInfo};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

type NodeId = u64;

/// One RPC of one group (the JSON payload of a [`Kind::Quorum`] frame).
#[derive(Debug, Serialize, Deserialize)]
pub struct GroupRpc {
    pub group: String,
    pub rpc: Rpc,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Rpc {
    Append(AppendEntriesRequest<QTypeConfig>),
    Vote(VoteRequest<NodeId>),
    Snapshot(InstallSnapshotRequest<QTypeConfig>),
    /// To the leader: hand the leadership to member `to`
    /// ([`super::serve::Group::transfer_to`]); answers `Result<(), String>`.
    Transfer {
        to: NodeId,
    },
    /// To a member, from the leader handing over: stand for election now
    /// (openraft's `trigger().elect()`); answers `Result<(), String>`.
    Elect,
    /// Would the member vote for one whose log ends at `last_log_index`
    /// ([`super::elect`])? Answers a bool; changes nothing.
    PreVote {
        last_log_index: Option<u64>,
    },
}

/// openraft's view of the network, for one group.
pub struct GroupNetwork {
    pub ident: Arc<Identity>,
    pub group: String,
}

impl RaftNetworkFactory<QTypeConfig> for GroupNetwork {
    type Network = GroupPeer;

    async fn new_client(&mut self, target: NodeId, node: &NodeInfo) -> GroupPeer {
        GroupPeer {
            target,
            group: self.group.clone(),
            peer: Peer::pooled(node, Arc::clone(&self.ident)),
        }
    }
}

pub struct GroupPeer {
    target: NodeId,
    group: String,
    peer: Peer,
}

impl GroupPeer {
    async fn rpc<Resp, E>(
        &mut self,
        rpc: Rpc,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, NodeInfo, RaftError<NodeId, E>>>
    where
        Resp: for<'a> Deserialize<'a>,
        E: std::error::Error + for<'a> Deserialize<'a>,
    {
        let req = GroupRpc {
            group: self.group.clone(),
            rpc,
        };
        // The listener answers Err when it has no such group (not started
        // yet, or deleted): unreachable, for now.
        let r: Result<Result<serde_json::Value, String>, CallError> =
            self.peer.call(Kind::Quorum, &req, option.hard_ttl()).await;
        let value = match r {
            Ok(Ok(v)) => v,
            Ok(Err(why)) => {
                let e = std::io::Error::other(why);
                return Err(RPCError::Unreachable(Unreachable::new(&e)));
            }
            Err(e) => return Err(crate::cluster::network::rpc_error(e)),
        };
        match serde_json::from_value::<Result<Resp, RaftError<NodeId, E>>>(value) {
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(RPCError::RemoteError(RemoteError::new(self.target, e))),
            Err(e) => Err(RPCError::Network(NetworkError::new(&e))),
        }
    }
}

impl RaftNetwork<QTypeConfig> for GroupPeer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<QTypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId>>> {
        self.rpc(Rpc::Append(rpc), &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<QTypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, NodeInfo, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.rpc(Rpc::Snapshot(rpc), &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId>>> {
        self.rpc(Rpc::Vote(rpc), &option).await
    }

    fn backoff(&self) -> openraft::network::Backoff {
        openraft::network::Backoff::new(std::iter::repeat(Duration::from_millis(200)))
    }
}
