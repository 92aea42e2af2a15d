//! A quorum queue group's Raft RPCs between nodes: carried by the cluster's
//! own connections (the same `dial`, TLS and cookie handshake), all groups'
//! over one multiplexed connection per peer ([`crate::cluster::mux`]), in
//! [`Kind::Quorum`] frames that name the group; the listener
//! ([`crate::cluster::network::serve`]) hands them to
//! [`super::Manager::handle`]. No listener of their own. Besides openraft's
//! three RPCs, two of ours carry a leadership transfer (rebalancing), and one
//! the pre-vote before an election (`super::elect`).

use super::QTypeConfig;
use crate::cluster::network::CallError;
use crate::cluster::{Identity, NodeInfo};
use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::{Entry, EntryPayload};
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
    Snapshot(
        #[serde(with = "crate::cluster::codec::snapshot_chunk")]
        InstallSnapshotRequest<QTypeConfig>,
    ),
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
            node: node.clone(),
            ident: Arc::clone(&self.ident),
        }
    }
}

pub struct GroupPeer {
    target: NodeId,
    group: String,
    node: NodeInfo,
    ident: Arc<Identity>,
}

/// Send one group's RPC to `node` and wait at most `timeout` for the
/// answer: the listener's `Result` (Err when it has no such group).
pub async fn call(
    ident: &Arc<Identity>,
    node: &NodeInfo,
    req: &GroupRpc,
    timeout: Duration,
) -> Result<Result<serde_json::Value, String>, CallError> {
    let frame = crate::cluster::codec::encode_after(&[0; crate::cluster::mux::ID_LEN], req)?;
    let reply = ident
        .mux
        .call(ident, Some(&node.name), &node.addr, frame, timeout)
        .await?;
    Ok(crate::cluster::codec::decode(&reply)?)
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
        let r = call(&self.ident, &self.node, &req, option.hard_ttl()).await;
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

/// About the most bytes of entries one append-entries RPC carries; the
/// rest go in the next (openraft takes a `PartialSuccess`). openraft sends
/// up to `max_payload_entries` entries whatever their size, and an entry
/// holds up to [`super::command::BATCH_BYTES_MAX`] of bodies (or one larger
/// message): without this, a run of large messages made a request over the
/// frame limit, which no follower could ever accept.
pub const RPC_BYTES_MAX: usize = 1 << 20;

/// How many of `entries`, from the first, fit in `budget` bytes (at least
/// one: an entry larger than the budget goes alone).
pub fn entries_within(entries: &[Entry<QTypeConfig>], budget: usize) -> usize {
    let mut total = 0;
    for (i, e) in entries.iter().enumerate() {
        total += match &e.payload {
            EntryPayload::Normal(cmd) => cmd.size_hint(),
            _ => 64,
        };
        if total > budget {
            return i.max(1);
        }
    }
    entries.len()
}

impl RaftNetwork<QTypeConfig> for GroupPeer {
    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<QTypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, NodeInfo, RaftError<NodeId>>> {
        let keep = entries_within(&rpc.entries, RPC_BYTES_MAX);
        let last_sent = (keep < rpc.entries.len()).then(|| rpc.entries[keep - 1].log_id);
        rpc.entries.truncate(keep);
        let resp = self.rpc(Rpc::Append(rpc), &option).await?;
        Ok(match (resp, last_sent) {
            (AppendEntriesResponse::Success, Some(last)) => {
                AppendEntriesResponse::PartialSuccess(Some(last))
            }
            (resp, _) => resp,
        })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::message::Message;
    use crate::cluster::quorum::command::{QCommand, QMsg};
    use openraft::{CommittedLeaderId, LogId};

    fn entry(index: u64, bodies: &[usize]) -> Entry<QTypeConfig> {
        let batch = bodies
            .iter()
            .map(|n| {
                let m = Message::new("", "q", Default::default(), vec![0u8; *n].into());
                QMsg::of(&m)
            })
            .collect();
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(QCommand::Enqueue(batch)),
        }
    }

    #[test]
    fn an_append_carries_the_entries_that_fit_and_at_least_one() {
        let small: Vec<_> = (1..=64).map(|i| entry(i, &[16; 10])).collect();
        assert_eq!(entries_within(&small, RPC_BYTES_MAX), 64);
        // Entries of a quarter of the budget (less their overhead): four fit.
        let quarter = RPC_BYTES_MAX / 4 - 1024;
        let big: Vec<_> = (1..=64).map(|i| entry(i, &[quarter])).collect();
        let n = entries_within(&big, RPC_BYTES_MAX);
        assert_eq!(n, 4);
        let huge = vec![entry(1, &[4 * RPC_BYTES_MAX]), entry(2, &[16])];
        assert_eq!(entries_within(&huge, RPC_BYTES_MAX), 1, "alone");
        assert_eq!(entries_within(&[], RPC_BYTES_MAX), 0);
        // Encoded, what fits stays under the frame limit.
        let req = GroupRpc {
            group: "g".into(),
            rpc: Rpc::Append(AppendEntriesRequest {
                vote: Default::default(),
                prev_log_id: None,
                leader_commit: None,
                entries: big[..n].to_vec(),
            }),
        };
        let bytes = crate::cluster::codec::encode(&req).expect("encodes");
        assert!(bytes.len() <= RPC_BYTES_MAX, "{}", bytes.len());
        assert!(bytes.len() > 4 * quarter);
    }
}
