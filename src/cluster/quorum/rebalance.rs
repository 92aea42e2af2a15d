//! Leader rebalancing of quorum queues (RabbitMQ's `rabbitmq-queues
//! rebalance` and `POST /api/rebalance/queues`): [`plan`] (pure) picks which
//! queues' leaderships move where so that no running node leads more than
//! its share (the number of queues over the number of running nodes,
//! rounded up), always to a member of that queue's group on a running node
//! with fewer; [`Manager::rebalance`] carries the moves out one at a time,
//! each by the queue's leader ([`super::serve::Group::transfer_to`]),
//! reached over the inter-node link when it is another node.

use super::network::{GroupRpc, Rpc};
use super::Manager;
use crate::cluster::command::QuorumRec;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

/// One leadership to move.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Move {
    pub vhost: String,
    pub name: String,
    #[serde(skip)]
    pub group: String,
    pub from: String,
    pub to: String,
}

/// What a rebalance did: every move tried (with its error when it failed)
/// and how many leaders each running node has after it.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub moves: Vec<Moved>,
    pub leaders: Vec<NodeLeaders>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Moved {
    #[serde(flatten)]
    pub to: Move,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeLeaders {
    pub node: String,
    pub quorum_leaders: usize,
}

/// Leaders per running node among `queues` (key `vhost\0name` → record).
fn counts<'a>(
    queues: impl Iterator<Item = &'a QuorumRec>,
    running: &BTreeSet<String>,
) -> BTreeMap<String, usize> {
    let mut counts: BTreeMap<String, usize> = running.iter().map(|n| (n.clone(), 0)).collect();
    for rec in queues {
        if let Some(c) = rec.leader.as_ref().and_then(|l| counts.get_mut(l)) {
            *c += 1;
        }
    }
    counts
}

/// The moves that bring every running node to at most its share of the
/// leaders of `queues`: from a node over the share, each queue (in key
/// order) goes to the running member of its group with the fewest leaders,
/// if that one has fewer than the share. Queues without a running leader
/// stay (their group elects one on its own).
pub fn plan(queues: &BTreeMap<String, QuorumRec>, running: &BTreeSet<String>) -> Vec<Move> {
    let mut counts = counts(queues.values(), running);
    let total: usize = counts.values().sum();
    if running.is_empty() || total == 0 {
        return Vec::new();
    }
    let share = total.div_ceil(running.len());
    let mut moves = Vec::new();
    for (key, rec) in queues {
        let Some(from) = rec.leader.as_ref() else {
            continue;
        };
        if counts.get(from).is_none_or(|c| *c <= share) {
            continue;
        }
        let to = rec
            .members
            .iter()
            .filter(|m| *m != from)
            .filter_map(|m| counts.get(m).map(|c| (*c, m)))
            .filter(|(c, _)| *c < share)
            .min()
            .map(|(_, m)| m.clone());
        let (Some(to), Some((vhost, name))) = (to, key.split_once('\0')) else {
            continue;
        };
        if let Some(c) = counts.get_mut(from) {
            *c -= 1;
        }
        if let Some(c) = counts.get_mut(&to) {
            *c += 1;
        }
        moves.push(Move {
            vhost: vhost.to_string(),
            name: name.to_string(),
            group: rec.group.clone(),
            from: from.clone(),
            to,
        });
    }
    moves
}

/// Where the leader of a new quorum queue (group `group`, members
/// `members`) goes with `x-queue-leader-locator: balanced`, as RabbitMQ
/// places it: on the running member with the fewest leaders among `queues`
/// (a queue whose leader is not announced yet counts for its first member,
/// which starts it); `me` (where it starts) on a tie, else the first by
/// name; `me` when no member runs.
pub fn balanced_leader(
    queues: &BTreeMap<String, QuorumRec>,
    group: &str,
    members: &[String],
    running: &BTreeSet<String>,
    me: &str,
) -> String {
    let mut counts: BTreeMap<&str, usize> = members
        .iter()
        .filter(|m| running.contains(*m))
        .map(|m| (m.as_str(), 0))
        .collect();
    for rec in queues.values().filter(|r| r.group != group) {
        let leader = rec.leader.as_ref().or(rec.members.first());
        if let Some(c) = leader.and_then(|l| counts.get_mut(l.as_str())) {
            *c += 1;
        }
    }
    counts
        .into_iter()
        .min_by_key(|(n, c)| (*c, *n != me, *n))
        .map_or_else(|| me.to_string(), |(n, _)| n.to_string())
}

impl Manager {
    /// A queue declared here with `x-queue-leader-locator: balanced` (or
    /// that policy): once this node serves it, its leadership goes to the
    /// member [`balanced_leader`] picks, if that is another node.
    pub(super) async fn place_balanced(m: std::sync::Weak<Manager>, rec: QuorumRec) {
        let Some((g, within)) = m
            .upgrade()
            .and_then(|m| Some((m.group(&rec.group)?, m.commit_timeout * 2)))
        else {
            return;
        };
        if !g.serves_within(within).await {
            return;
        }
        let Some(m) = m.upgrade() else { return };
        let Some(cluster) = m.cluster.lock().upgrade() else {
            return;
        };
        let running: BTreeSet<String> = cluster
            .members()
            .into_iter()
            .filter(|n| n.running)
            .map(|n| n.name)
            .collect();
        let queues = cluster.metadata().quorum;
        drop(cluster);
        let to = balanced_leader(&queues, &rec.group, &rec.members, &running, m.me());
        if to == m.me() {
            return;
        }
        match m.transfer(&rec.group, m.me(), &to).await {
            Ok(()) => {
                tracing::info!(queue = %g.name, vhost = %g.vhost, to = %to, "quorum queue leader placed (balanced)")
            }
            Err(e) => {
                tracing::warn!(queue = %g.name, vhost = %g.vhost, to = %to, error = %e, "quorum queue leader not placed (balanced)")
            }
        }
    }

    /// Move the leaders of the quorum queues `keep` selects (by vhost and
    /// name) so that they spread over the running nodes ([`plan`]), one
    /// transfer at a time. One rebalance at a time per node.
    pub async fn rebalance(&self, keep: impl Fn(&str, &str) -> bool) -> Result<Outcome, String> {
        let _one = self
            .rebalancing
            .try_lock()
            .map_err(|_| "a rebalance is already running on this node".to_string())?;
        let cluster = self.cluster.lock().upgrade().ok_or("shutting down")?;
        let running: BTreeSet<String> = cluster
            .members()
            .into_iter()
            .filter(|m| m.running)
            .map(|m| m.name)
            .collect();
        let mut queues: BTreeMap<String, QuorumRec> = cluster
            .metadata()
            .quorum
            .into_iter()
            .filter(|(key, _)| {
                key.split_once('\0')
                    .is_some_and(|(vhost, name)| keep(vhost, name))
            })
            .collect();
        drop(cluster);
        tracing::info!(
            queues = queues.len(),
            nodes = running.len(),
            "starting quorum queue leader rebalance"
        );
        let mut moves = Vec::new();
        for m in plan(&queues, &running) {
            let r = self.transfer(&m.group, &m.from, &m.to).await;
            if r.is_ok() {
                if let Some(rec) = queues.get_mut(&crate::cluster::command::key(&m.vhost, &m.name))
                {
                    rec.leader = Some(m.to.clone());
                }
            } else {
                tracing::warn!(queue = %m.name, vhost = %m.vhost, from = %m.from, to = %m.to, error = ?r, "quorum queue leadership not moved");
            }
            moves.push(Moved {
                to: m,
                ok: r.is_ok(),
                error: r.err(),
            });
        }
        let leaders = counts(queues.values(), &running)
            .into_iter()
            .map(|(node, quorum_leaders)| NodeLeaders {
                node,
                quorum_leaders,
            })
            .collect();
        tracing::info!("finished quorum queue leader rebalance");
        Ok(Outcome { moves, leaders })
    }

    /// Have the leader of `group` (node `leader`) hand it to node `to`.
    pub async fn transfer(&self, group: &str, leader: &str, to: &str) -> Result<(), String> {
        let to = crate::cluster::node_id(to);
        if leader == self.me() {
            let g = self
                .group(group)
                .ok_or_else(|| format!("quorum group '{group}' does not run here"))?;
            return g.transfer_to(to).await;
        }
        let info = self
            .node_info(leader)
            .ok_or_else(|| format!("node '{leader}' is not a cluster member"))?;
        let req = GroupRpc {
            group: group.to_string(),
            rpc: Rpc::Transfer { to },
        };
        let within = self.commit_timeout
            + Duration::from_millis(self.config.election_timeout_max * 2)
            + Duration::from_secs(1);
        match super::network::call(&self.ident, &info, &req, within).await {
            Ok(Ok(v)) => serde_json::from_value::<Result<(), String>>(v)
                .map_err(|e| format!("bad reply from {leader}: {e}"))?,
            Ok(Err(e)) => Err(e),
            Err(e) => Err(format!("{leader}: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(group: &str, members: &[&str], leader: &str) -> QuorumRec {
        QuorumRec {
            group: group.into(),
            members: members.iter().map(|m| m.to_string()).collect(),
            leader: Some(leader.into()),
        }
    }

    fn nodes(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    fn leaders_after(
        queues: &BTreeMap<String, QuorumRec>,
        moves: &[Move],
        running: &BTreeSet<String>,
    ) -> BTreeMap<String, usize> {
        let mut q = queues.clone();
        for m in moves {
            q.get_mut(&format!("{}\0{}", m.vhost, m.name))
                .expect("moved queue")
                .leader = Some(m.to.clone());
        }
        counts(q.values(), running)
    }

    #[test]
    fn leaders_all_on_one_node_spread_evenly() {
        let all = ["a", "b", "c"];
        let queues: BTreeMap<String, QuorumRec> = (0..6)
            .map(|i| (format!("/\0q{i}"), rec(&format!("g{i}"), &all, "a")))
            .collect();
        let running = nodes(&all);
        let moves = plan(&queues, &running);
        assert_eq!(moves.len(), 4);
        assert!(moves.iter().all(|m| m.from == "a" && m.to != "a"));
        let after = leaders_after(&queues, &moves, &running);
        assert_eq!(after.values().copied().collect::<Vec<_>>(), vec![2, 2, 2]);
    }

    #[test]
    fn a_leader_moves_only_to_a_running_member_under_its_share() {
        // q0 and q1 are on a and b only; c is a member of q2 alone; d is down.
        let mut queues = BTreeMap::new();
        queues.insert("/\0q0".to_string(), rec("g0", &["a", "b"], "a"));
        queues.insert("/\0q1".to_string(), rec("g1", &["a", "b"], "a"));
        queues.insert("/\0q2".to_string(), rec("g2", &["a", "c", "d"], "a"));
        queues.insert("/\0q3".to_string(), rec("g3", &["a", "d"], "a"));
        let running = nodes(&["a", "b", "c"]);
        let moves = plan(&queues, &running);
        // Share: 4 leaders over 3 running nodes = 2.
        for m in &moves {
            assert_ne!(m.to, "d", "never to a node that is down");
            let members = &queues[&format!("{}\0{}", m.vhost, m.name)].members;
            assert!(members.contains(&m.to), "only to a member: {m:?}");
        }
        let after = leaders_after(&queues, &moves, &running);
        assert!(after.values().all(|c| *c <= 2), "{after:?}");
        assert_eq!(after["a"], 2);
    }

    #[test]
    fn a_balanced_cluster_moves_nothing() {
        let all = ["a", "b", "c"];
        let mut queues = BTreeMap::new();
        for (i, l) in ["a", "b", "c", "a"].iter().enumerate() {
            queues.insert(format!("/\0q{i}"), rec(&format!("g{i}"), &all, l));
        }
        assert!(plan(&queues, &nodes(&all)).is_empty());
        assert!(plan(&BTreeMap::new(), &nodes(&all)).is_empty());
        assert!(plan(&queues, &BTreeSet::new()).is_empty());
    }

    #[test]
    fn a_balanced_leader_goes_to_the_running_member_leading_fewest() {
        let members: Vec<String> = ["a", "b", "c"].iter().map(|m| m.to_string()).collect();
        let mut queues = BTreeMap::new();
        let all = nodes(&["a", "b", "c"]);
        // Nothing else: stays where it starts.
        assert_eq!(balanced_leader(&queues, "new", &members, &all, "a"), "a");
        queues.insert("/\0q1".to_string(), rec("g1", &["a", "b", "c"], "a"));
        // The new queue's own record (announced by its starter) is left out.
        queues.insert("/\0new".to_string(), rec("new", &["a", "b", "c"], "a"));
        assert_eq!(balanced_leader(&queues, "new", &members, &all, "a"), "b");
        queues.insert("/\0q2".to_string(), rec("g2", &["a", "b", "c"], "b"));
        assert_eq!(balanced_leader(&queues, "new", &members, &all, "a"), "c");
        // A queue with no leader announced yet counts for its first member.
        let mut pending = rec("g3", &["c", "a", "b"], "c");
        pending.leader = None;
        queues.insert("/\0q3".to_string(), pending);
        assert_eq!(balanced_leader(&queues, "new", &members, &all, "b"), "b");
        // Only running members, and only members, are candidates.
        assert_eq!(
            balanced_leader(&queues, "new", &members, &nodes(&["a", "c", "d"]), "a"),
            "a"
        );
        assert_eq!(
            balanced_leader(&queues, "new", &members, &BTreeSet::new(), "a"),
            "a"
        );
    }
}
