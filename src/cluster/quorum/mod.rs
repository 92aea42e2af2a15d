//! Quorum queues replicated in a cluster (RabbitMQ's model): each quorum
//! queue is a Raft group of its own (openraft, a [`QTypeConfig`] of its own)
//! on a few nodes (3 by default, `x-quorum-initial-group-size`), and
//! survives losing a minority of them.
//!
//! - `command`: the group's commands and the state they build (pure).
//! - `store`: every group's log in one sled database per node, and the state
//!   machine, which feeds committed messages to the queue where it is served.
//! - `network`: the groups' RPCs over the cluster's connections.
//! - `serve`: following leadership: the leader loads the messages into its
//!   local queue and serves it; proposals of publishes and settlements;
//!   leadership transfer.
//! - `snapdata`: snapshots on their way between members, a chunk at a time.
//! - `rebalance`: spreading the leaders over the running nodes.
//! - `elect`: elections with a pre-vote (openraft's own timer is off).
//! - `publisher`: each node's publisher per queue, which numbers publishes
//!   and resends them after a failover.
//!
//! The metadata group records each quorum queue's members (chosen when its
//! declaration is applied, see [`choose_members`]) and its leader; this
//! module starts, resumes and stops this node's groups from those records
//! ([`Manager::sync`]). See docs/cluster.md, "Quorum queues".

pub mod command;
pub mod elect;
pub mod network;
pub mod publisher;
pub mod rebalance;
pub mod serve;
pub mod snapdata;
pub mod store;

use super::command::{Metadata, QuorumRec};
use super::{Cluster, Identity, NodeInfo};
use crate::broker::Broker;
use parking_lot::Mutex;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Weak};
use std::time::Duration;

openraft::declare_raft_types!(
    /// A quorum queue group's types.
    pub QTypeConfig:
        D = command::QCommand,
        R = Vec<command::Outcome>,
        NodeId = u64,
        Node = NodeInfo,
        Entry = openraft::Entry<QTypeConfig>,
        SnapshotData = snapdata::SnapshotData,
        AsyncRuntime = openraft::TokioRuntime,
);

/// The default number of members of a quorum queue's group (RabbitMQ's).
pub const DEFAULT_GROUP_SIZE: usize = 3;

/// The members of a new quorum queue's group: the declaring node, then up to
/// `size - 1` of the other `nodes`, picked by a hash of the queue's key and
/// each node's name (spreads queues over the nodes; the same on every node).
pub fn choose_members(
    queue_key: &str,
    declaring: &str,
    nodes: &[String],
    size: usize,
) -> Vec<String> {
    use sha2::{Digest, Sha256};
    let mut others: Vec<(Vec<u8>, &String)> = nodes
        .iter()
        .filter(|n| n.as_str() != declaring)
        .map(|n| {
            let mut h = Sha256::new();
            h.update(queue_key.as_bytes());
            h.update([0]);
            h.update(n.as_bytes());
            (h.finalize().to_vec(), n)
        })
        .collect();
    others.sort();
    let mut members = vec![declaring.to_string()];
    members.extend(
        others
            .into_iter()
            .take(size.max(1) - 1)
            .map(|(_, n)| n.clone()),
    );
    members
}

/// This node's quorum queue groups.
pub struct Manager {
    db: sled::Db,
    /// The groups' large values (`<data_dir>/quorum-values`).
    values: Arc<crate::cluster::values::ValueLog>,
    broker: Arc<Broker>,
    ident: Arc<Identity>,
    config: Arc<openraft::Config>,
    commit_timeout: Duration,
    cluster: Mutex<Weak<Cluster>>,
    /// Running groups, by group id.
    groups: Mutex<HashMap<String, Arc<serve::Group>>>,
    /// Publishes handed to the groups and not answered yet, all groups.
    pending: Arc<std::sync::atomic::AtomicUsize>,
    /// Groups being stopped (their log not dropped yet): started again
    /// only after that, so a drop never takes a new member's log.
    stopping: Arc<Mutex<HashSet<String>>>,
    /// Held while a leader rebalance runs (one at a time).
    rebalancing: tokio::sync::Mutex<()>,
    /// This node's publishers, by vhost and queue ([`publisher`]).
    publishers: Mutex<HashMap<String, HashMap<String, Arc<publisher::Publisher>>>>,
}

/// How long an RPC for a member still starting here waits for it.
const STARTING_WAIT: Duration = Duration::from_millis(500);

/// How often the value files no log entry or snapshot names any more are
/// looked for (a file goes at the second look that finds it unnamed).
const COLLECT_EVERY: Duration = Duration::from_secs(30);

/// Delete the value files that purges, truncations and dropped groups left
/// unnamed ([`crate::cluster::values::ValueLog::collect`]), until the
/// manager is dropped.
async fn collect_values(m: Weak<Manager>) {
    loop {
        tokio::time::sleep(COLLECT_EVERY).await;
        let Some(m) = m.upgrade() else { return };
        let (db, values) = (m.db.clone(), Arc::clone(&m.values));
        drop(m);
        let r = tokio::task::spawn_blocking(move || {
            let current = values.current();
            let live = crate::cluster::disk::referenced_files(&db)?;
            // The removals of the pointers not seen are durable before any
            // file they named goes.
            db.flush().map_err(std::io::Error::other)?;
            values.collect(current, &live)
        })
        .await;
        match r {
            Ok(Ok(n)) if n > 0 => tracing::debug!(files = n, "quorum value files deleted"),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "quorum value files not collected"),
            Err(e) => tracing::warn!(error = %e, "quorum value files not collected"),
        }
    }
}

/// How long a graceful stop waits for this node's leaderships to move.
pub const HAND_OVER_WITHIN: Duration = Duration::from_secs(3);

/// Publishes waiting for their group's commit on this node, at most, before
/// the publishing connections stop reading (as for a full message store).
pub const MAX_PENDING: usize = 16384;

impl std::fmt::Debug for Manager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("quorum::Manager").finish_non_exhaustive()
    }
}

impl Manager {
    /// Open `<data_dir>/quorum` and the value files beside it
    /// (`quorum-values`).
    pub fn open(
        dir: &std::path::Path,
        broker: Arc<Broker>,
        ident: Arc<Identity>,
        heartbeat_ms: u64,
        commit_timeout: Duration,
    ) -> Result<Arc<Manager>, String> {
        let db = sled::open(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let values_dir = dir.with_file_name("quorum-values");
        let values = crate::cluster::values::ValueLog::open(&values_dir)
            .map_err(|e| format!("{}: {e}", values_dir.display()))?;
        // Snapshots half received when the node stopped.
        snapdata::remove_parts(&values_dir)
            .map_err(|e| format!("{}: {e}", values_dir.display()))?;
        // openraft gives an append-entries RPC one heartbeat interval: a
        // group's appends carry message bodies and a follower fsyncs them
        // before answering, so the interval is longer than the metadata
        // group's (at least 200 ms). A follower that knew a leader waits its
        // leader lease (openraft: `election_timeout_max`) plus an election
        // timeout before it stands, and refuses votes within that lease, so
        // failover takes `max + [min, max]`: 5-7 heartbeats each keeps that
        // at 2.4-2.8 s with the default 100 ms (it was 6-8 s with 5-10 of
        // 400 ms).
        let heartbeat = (heartbeat_ms * 2).max(200);
        let config = openraft::Config {
            cluster_name: "warren-quorum".into(),
            heartbeat_interval: heartbeat,
            election_timeout_min: heartbeat * 5,
            election_timeout_max: heartbeat * 7,
            max_payload_entries: 64,
            // A member that fell behind the log is sent the snapshot in
            // chunks; the last one's RPC also waits for the install (a long
            // queue's snapshot is decoded and written there, seconds for a
            // GB): openraft's 200 ms made every chunk of a few MiB time out
            // and the send start over.
            snapshot_max_chunk_size: 1 << 20,
            install_snapshot_timeout: 60_000,
            // Snapshots by the state's size instead (`store`, "When a group
            // snapshots"), triggered by the group's watch loop.
            snapshot_policy: openraft::SnapshotPolicy::Never,
            max_in_snapshot_log_to_keep: 256,
            // Elections are this module's, with a pre-vote (`elect`), and
            // so are heartbeats: the node's ticker sends every group's at
            // the same moment, so that one peer's go out together over
            // their shared connection (`crate::cluster::mux`).
            enable_elect: false,
            enable_heartbeat: false,
            ..Default::default()
        }
        .validate()
        .map_err(|e| e.to_string())?;
        let m = Arc::new(Manager {
            db,
            values,
            broker,
            ident,
            config: Arc::new(config),
            commit_timeout,
            cluster: Mutex::new(Weak::new()),
            groups: Mutex::new(HashMap::new()),
            pending: Arc::default(),
            stopping: Arc::default(),
            rebalancing: tokio::sync::Mutex::new(()),
            publishers: Mutex::new(HashMap::new()),
        });
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => {
                rt.spawn(elect::run(Arc::downgrade(&m)));
                rt.spawn(collect_values(Arc::downgrade(&m)));
            }
            Err(_) => return Err("the quorum groups need a tokio runtime".into()),
        }
        Ok(m)
    }

    pub(super) fn set_cluster(&self, c: &Arc<Cluster>) {
        *self.cluster.lock() = Arc::downgrade(c);
    }

    /// The groups have room for more publishes (under [`MAX_PENDING`]).
    pub fn has_room(&self) -> bool {
        self.pending.load(std::sync::atomic::Ordering::Relaxed) < MAX_PENDING
    }

    fn me(&self) -> &str {
        &self.ident.me.name
    }

    /// The group `id` when it runs here.
    pub fn group(&self, id: &str) -> Option<Arc<serve::Group>> {
        self.groups.lock().get(id).cloned()
    }

    /// This node's member of quorum queue `vhost`/`name`, when it is one.
    pub fn group_of(&self, vhost: &str, name: &str) -> Option<Arc<serve::Group>> {
        serve::Group::of(&*self.queue(vhost, name)?)
    }

    /// The publisher through which this node publishes to quorum queue
    /// `vhost`/`name` (started on first use).
    pub fn publisher(self: &Arc<Self>, vhost: &str, name: &str) -> Arc<publisher::Publisher> {
        let mut publishers = self.publishers.lock();
        if let Some(p) = publishers.get(vhost).and_then(|v| v.get(name)) {
            return Arc::clone(p);
        }
        let p = publisher::Publisher::start(self, vhost, name);
        publishers
            .entry(vhost.to_string())
            .or_default()
            .insert(name.to_string(), Arc::clone(&p));
        p
    }

    /// A publisher whose queue is gone ends.
    fn publisher_gone(&self, p: &Arc<publisher::Publisher>) {
        let mut publishers = self.publishers.lock();
        for v in publishers.values_mut() {
            v.retain(|_, q| !Arc::ptr_eq(p, q));
        }
        publishers.retain(|_, v| !v.is_empty());
    }

    /// How long a publisher resends a publish before it nacks it: twice the
    /// commit timeout (an election, and the commit after it, fit in).
    fn resend_within(&self) -> Duration {
        self.commit_timeout * 2
    }

    /// A forwarded publish, numbered by its publisher on another node, for
    /// the queue this node serves; `reply` gets the group's answer.
    pub fn take_forwarded(
        &self,
        vhost: &str,
        name: &str,
        message: &Arc<crate::broker::message::Message>,
        (publisher, seq): (u64, u64),
        reply: publisher::Reply,
    ) {
        match self.group_of(vhost, name) {
            Some(g) => g.propose(
                command::QMsg::of(message).sent_by(publisher, seq),
                reply,
                true,
            ),
            None => reply(publisher::Answer::Resend),
        }
    }

    /// A quorum queue's record was just committed (its declaration applied):
    /// start this node's member of it, and initialise the group when this
    /// node declared the queue.
    pub fn declared(self: &Arc<Self>, vhost: &str, name: &str, rec: &QuorumRec) {
        let init = rec.members.first().is_some_and(|m| m == self.me());
        self.start(vhost, name, rec, init);
        let balanced = self.queue(vhost, name).is_some_and(|q| {
            q.args().leader_locator == crate::broker::queue::LeaderLocator::Balanced
        });
        if init && balanced {
            tokio::spawn(Manager::place_balanced(Arc::downgrade(self), rec.clone()));
        }
    }

    /// Start (or resume from disk) this node's member of `rec`'s group, if
    /// it is one and it is not running. `init`: initialise the group with
    /// its members (the declaring node, once).
    fn start(self: &Arc<Self>, vhost: &str, name: &str, rec: &QuorumRec, init: bool) {
        if !rec.members.iter().any(|m| m == self.me()) {
            return;
        }
        if self.stopping.lock().contains(&rec.group) {
            // Its previous member here is still being stopped: start once
            // its log is dropped.
            let (m, vhost, name, rec) = (
                Arc::downgrade(self),
                vhost.to_string(),
                name.to_string(),
                rec.clone(),
            );
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if let Some(m) = m.upgrade() {
                    m.start(&vhost, &name, &rec, init);
                }
            });
            return;
        }
        let mut groups = self.groups.lock();
        if groups.contains_key(&rec.group) {
            return;
        }
        let tree = match self.db.open_tree(rec.group.as_bytes()) {
            Ok(t) => t,
            Err(e) => {
                tracing::error!(group = %rec.group, error = %e, "cannot open the quorum queue's log");
                return;
            }
        };
        let log = store::QLog::new(self.db.clone(), tree, Arc::clone(&self.values));
        let sm = match store::QSm::open(log.clone()) {
            Ok(sm) => sm,
            Err(e) => {
                tracing::error!(group = %rec.group, error = %e, "cannot read the quorum queue's snapshot");
                return;
            }
        };
        let group = serve::Group::new(
            rec.group.clone(),
            vhost.to_string(),
            name.to_string(),
            sm.clone(),
            self.commit_timeout,
            Arc::downgrade(self),
            Arc::clone(&self.pending),
        );
        group.set_members(rec.members.clone());
        groups.insert(rec.group.clone(), Arc::clone(&group));
        drop(groups);
        // The queue proposes its publishes from now on (refused until this
        // node serves it).
        if let Some(q) = self.queue(vhost, name) {
            q.set_replica(Some(group.clone()));
        }
        let members: BTreeMap<u64, NodeInfo> = rec
            .members
            .iter()
            .filter_map(|n| Some((super::node_id(n), self.node_info(n)?)))
            .collect();
        let network = network::GroupNetwork {
            ident: Arc::clone(&self.ident),
            group: rec.group.clone(),
        };
        let config = Arc::clone(&self.config);
        let id = self.ident.id;
        tokio::spawn(async move {
            let raft = match openraft::Raft::new(id, config, network, log, sm).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(group = %group.id, error = %e, "cannot start the quorum queue's group");
                    return;
                }
            };
            if init {
                if let Err(e) = raft.initialize(members).await {
                    tracing::debug!(group = %group.id, error = %e, "group not initialised");
                }
            }
            group.run(raft);
        });
    }

    /// A quorum queue's members changed (a committed `QuorumMembers`): a
    /// node added starts its (empty) member, which the leader adds to the
    /// group as a learner and then a voter; a node removed stops its member,
    /// drops its log and reaches the queue through the leader like any other
    /// node; the members that stay tell their group, whose leader makes the
    /// group's voters match.
    pub fn members_changed(self: &Arc<Self>, vhost: &str, name: &str, rec: &QuorumRec) {
        match self.group(&rec.group) {
            // A member removed is not stopped here: the group still counts
            // it until its leader has removed it (a two-member group needs
            // both to commit that); its watch loop stops it then
            // (`Group::has_left`).
            Some(g) => g.set_members(rec.members.clone()),
            // `start` does nothing on a node that is not a member.
            None => self.start(vhost, name, rec, false),
        }
    }

    /// A member that left its group (see [`Self::members_changed`]): stop
    /// it, drop its log, and reach the queue through the leader.
    pub(super) fn left(&self, g: &serve::Group) {
        if let Some(q) = self.queue(&g.vhost, &g.name) {
            q.set_replica(None);
        }
        self.stop(&g.id);
    }

    /// The Raft ids of the cluster members this node sees running.
    pub(super) fn running_ids(&self) -> BTreeSet<u64> {
        self.cluster
            .lock()
            .upgrade()
            .map(|c| {
                c.members()
                    .into_iter()
                    .filter(|m| m.running)
                    .map(|m| m.id)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Where `name` listens for inter-node traffic, when it is a member of
    /// the cluster.
    pub(super) fn node_info(&self, name: &str) -> Option<NodeInfo> {
        self.cluster.lock().upgrade()?.node_info(name)
    }

    /// The local queue `vhost`/`name`.
    pub(crate) fn queue(
        &self,
        vhost: &str,
        name: &str,
    ) -> Option<Arc<crate::broker::queue::Queue>> {
        self.broker.vhost(vhost)?.queue(name, 0).ok()
    }

    /// Stop the group `id` and drop its log (its queue was deleted).
    pub fn stop(&self, id: &str) {
        let group = self.groups.lock().remove(id);
        let db = self.db.clone();
        let id = id.to_string();
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let stopping = Arc::clone(&self.stopping);
        stopping.lock().insert(id.clone());
        rt.spawn(async move {
            if let Some(g) = group {
                g.shutdown().await;
            }
            if let Err(e) = db.drop_tree(id.as_bytes()) {
                tracing::warn!(group = %id, error = %e, "cannot drop the quorum queue's log");
            }
            stopping.lock().remove(&id);
        });
    }

    /// Make the running groups those `metadata` gives this node: resume the
    /// missing ones from disk, stop the ones whose queue is gone (and drop
    /// their logs, and logs left by queues deleted while this node was down).
    pub fn sync(self: &Arc<Self>, metadata: &Metadata) {
        let me = self.me().to_string();
        let mut wanted: HashMap<String, (String, String, QuorumRec)> = HashMap::new();
        for (key, rec) in &metadata.quorum {
            if !rec.members.contains(&me) {
                continue;
            }
            let Some((vhost, name)) = key.split_once('\0') else {
                continue;
            };
            wanted.insert(
                rec.group.clone(),
                (vhost.to_string(), name.to_string(), rec.clone()),
            );
        }
        let running: Vec<String> = self.groups.lock().keys().cloned().collect();
        for id in running {
            if !wanted.contains_key(&id) {
                self.stop(&id);
            }
        }
        for name in self.db.tree_names() {
            let Ok(id) = std::str::from_utf8(&name) else {
                continue;
            };
            if id != "__sled__default" && !wanted.contains_key(id) && self.group(id).is_none() {
                let _ = self.db.drop_tree(&name);
            }
        }
        for (vhost, name, rec) in wanted.values() {
            self.start(vhost, name, rec, false);
        }
    }

    /// Tell the metadata group that this node leads `group` (retried until
    /// committed, while it still does).
    fn announce(&self, g: &Arc<serve::Group>) {
        let Some(c) = self.cluster.lock().upgrade() else {
            return;
        };
        let cmd = super::Command::QueueLeader {
            vhost: g.vhost.clone(),
            name: g.name.clone(),
            group: g.id.clone(),
            node: self.me().to_string(),
        };
        let g = Arc::downgrade(g);
        let c = Arc::downgrade(&c);
        tokio::spawn(async move {
            loop {
                let (Some(c), Some(g)) = (c.upgrade(), g.upgrade()) else {
                    return;
                };
                if !g.is_serving() {
                    return;
                }
                drop(g);
                match c.propose(cmd.clone()).await {
                    Ok(()) => return,
                    Err(e) => tracing::debug!(error = %e, "quorum queue leader not announced yet"),
                }
                drop(c);
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }

    /// Before a graceful stop: every group this node leads hands its
    /// leadership to its running voter with the longest log, all at once and
    /// for at most [`HAND_OVER_WITHIN`], so that its queues go on at once
    /// rather than after an election timeout (a node killed outright still
    /// costs that). A group with no such member keeps its leader until the
    /// stop.
    async fn hand_over(&self) {
        let running = self.running_ids();
        let me = self.ident.id;
        let groups: Vec<Arc<serve::Group>> = self.groups.lock().values().cloned().collect();
        let moves = groups.into_iter().filter_map(|g| {
            let raft = g.raft()?;
            let target = {
                let metrics = raft.metrics();
                let m = metrics.borrow();
                let replication = m.replication.as_ref()?;
                m.membership_config
                    .membership()
                    .voter_ids()
                    .filter(|id| *id != me && running.contains(id))
                    .max_by_key(|id| replication.get(id).copied().flatten())?
            };
            Some(async move {
                let r = g.transfer_to(target).await;
                if let Err(e) = r {
                    tracing::info!(queue = %g.name, vhost = %g.vhost, error = %e, "quorum queue leadership not handed over");
                }
            })
        });
        let all = futures::future::join_all(moves);
        if tokio::time::timeout(HAND_OVER_WITHIN, all).await.is_err() {
            tracing::warn!("quorum queue leaderships not all handed over in time");
        }
    }

    /// A peer's RPC for one of this node's groups: the JSON of openraft's
    /// answer, or Err when the group does not run here.
    pub async fn handle(&self, payload: &[u8]) -> Result<serde_json::Value, String> {
        let req: network::GroupRpc =
            crate::cluster::codec::decode(payload).map_err(|e| e.to_string())?;
        // A member not started yet (this node has not applied the
        // declaration, or its Raft is being opened: the declaring node's
        // first vote request often comes that soon) answers once it runs,
        // rather than failing the election for a whole round.
        let until = tokio::time::Instant::now() + STARTING_WAIT;
        let (group, raft) = loop {
            let group = self.group(&req.group);
            let raft = group.as_ref().and_then(|g| g.raft());
            match (group, raft) {
                (Some(g), Some(r)) => break (g, r),
                (group, _) if tokio::time::Instant::now() >= until => {
                    return Err(match group {
                        None => format!("no quorum group '{}' here", req.group),
                        Some(_) => format!("quorum group '{}' not started", req.group),
                    });
                }
                _ => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        };
        let v = match req.rpc {
            network::Rpc::Append(r) => {
                let resp = raft.append_entries(r).await;
                if matches!(&resp, Ok(a) if !matches!(a, openraft::raft::AppendEntriesResponse::HigherVote(_)))
                {
                    group.heard();
                }
                serde_json::to_value(resp)
            }
            network::Rpc::Vote(r) => {
                let resp = raft.vote(r).await;
                if matches!(&resp, Ok(v) if v.vote_granted) {
                    group.heard();
                }
                serde_json::to_value(resp)
            }
            network::Rpc::Snapshot(r) => {
                let resp = raft.install_snapshot(r).await;
                if resp.is_ok() {
                    group.heard();
                }
                serde_json::to_value(resp)
            }
            network::Rpc::PreVote { last_log_index } => {
                serde_json::to_value(group.pre_vote(last_log_index, elect::lease(self)))
            }
            network::Rpc::Transfer { to } => serde_json::to_value(group.transfer_to(to).await),
            network::Rpc::Elect => {
                serde_json::to_value(raft.trigger().elect().await.map_err(|e| e.to_string()))
            }
        };
        v.map_err(|e| e.to_string())
    }

    /// Stop every group (broker shutdown), after handing the leadership of
    /// those this node leads to another member ([`Self::hand_over`]).
    pub async fn shutdown(&self) {
        self.hand_over().await;
        let groups: Vec<_> = self.groups.lock().drain().map(|(_, g)| g).collect();
        for g in groups {
            g.shutdown().await;
        }
        let _ = self.db.flush_async().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_are_the_declaring_node_and_a_stable_pick() {
        let nodes: Vec<String> = (1..=5).map(|i| format!("warren@n{i}")).collect();
        let m = choose_members("/\0q", "warren@n3", &nodes, 3);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0], "warren@n3");
        assert!(!m[1..].contains(&"warren@n3".to_string()));
        assert_eq!(
            m,
            choose_members("/\0q", "warren@n3", &nodes, 3),
            "deterministic"
        );
        assert_eq!(
            choose_members("/\0q", "warren@n1", &nodes, 9).len(),
            5,
            "at most every node"
        );
        assert_eq!(
            choose_members("/\0q", "warren@n1", &nodes, 1),
            vec!["warren@n1".to_string()]
        );
        // Different queues spread over different nodes.
        let picks: std::collections::BTreeSet<Vec<String>> = (0..20)
            .map(|i| choose_members(&format!("/\0q{i}"), "warren@n1", &nodes, 2))
            .collect();
        assert!(picks.len() > 1);
    }
}
