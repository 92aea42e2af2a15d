//! Clustering (RabbitMQ's model, on openraft): this node's name and identity,
//! the metadata Raft group every node is a member of, and joining/leaving it.
//!
//! - `frame`: the inter-node frame format (nom), pure bytes.
//! - `codec`: how values are written as bytes in logs, snapshots and
//!   requests (MessagePack; JSON from earlier versions still read).
//! - `network`: the inter-node listener and dialer, the cookie handshake, and
//!   openraft's network traits over them.
//! - `command`: the replicated metadata commands, the model they build (the
//!   group's snapshot) and how a committed command reaches the local broker.
//! - `store`: the group's log, vote and state machine on this node's disk.
//! - `disk`: where the store's bytes live: sled, or memory that models a
//!   disk (with crashes) for the simulation of the group.
//! - `values`: the quorum groups' large values (log entries with bodies,
//!   snapshots) in append-only files, out of sled.
//! - `gone`: the queues the broker deletes by itself
//!   (`crate::broker::deleted`), proposed to the group, and proposed again
//!   after a failure until committed or moot.
//! - `forward`: the data links between nodes, over which queues homed on
//!   another node are reached (publishes, consumers, queue operations).
//!
//! - `quorum`: quorum queues as Raft groups of their own, replicated on a
//!   few nodes each.
//!
//! Nothing here runs without `[cluster]` in the configuration. See docs/cluster.md.

pub mod codec;
pub mod command;
pub mod disk;
pub mod forward;
pub mod frame;
pub mod gone;
pub mod links;
pub mod mux;
pub mod network;
pub mod quorum;
pub mod store;
pub mod values;

pub use command::Command;

use crate::broker::{Alarms, Broker};
use crate::config::{ClusterConfig, Config};
use frame::Kind;
use network::{Network, Peer};
use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, ServerState};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use store::{LogStore, StateMachine};

/// A member of the cluster as the metadata group records it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// `warren@host`.
    pub name: String,
    /// Where its inter-node listener is reached (`host:port`).
    pub addr: String,
    /// Where Stream protocol clients reach it (`host:port`; None: no
    /// Stream protocol listener). Stream `metadata` names a stream's home
    /// node by it.
    #[serde(default)]
    pub stream: Option<String>,
}

openraft::declare_raft_types!(
    /// The metadata group's types.
    pub TypeConfig:
        D = Command,
        R = Option<String>,
        NodeId = u64,
        Node = NodeInfo,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

/// How often members probe each other; one missing four probes is shown as
/// not running.
const PING_EVERY: Duration = Duration::from_millis(250);

/// A member not heard from by the probes for this long is taken for down
/// (`running: false` in [`Cluster::members`]).
pub const DOWN_AFTER: Duration = PING_EVERY.saturating_mul(4);

/// The default inter-node port (RabbitMQ's distribution port).
pub const DEFAULT_PORT: u16 = 25672;

/// Why clustering could not start.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster: {0}")]
    Config(String),
    #[error("cluster store: {0}")]
    Store(String),
    #[error("cluster listener: {0}")]
    Io(#[from] std::io::Error),
}

/// This node's part of the cluster.
pub struct Cluster {
    /// This node's name and address.
    pub me: NodeInfo,
    /// Its Raft id (derived from the name).
    pub id: u64,
    /// Where the inter-node listener is bound.
    pub listen: SocketAddr,
    ident: Arc<Identity>,
    /// Replaced only when a lone node resets to join another cluster.
    raft: parking_lot::RwLock<openraft::Raft<TypeConfig>>,
    raft_config: Arc<openraft::Config>,
    store: LogStore,
    sm: StateMachine,
    commit_timeout: Duration,
    /// When each other member last answered a probe.
    seen: parking_lot::Mutex<BTreeMap<u64, std::time::Instant>>,
    /// What answers a member's [`Kind::Stats`] request (set by the admin API).
    stats: parking_lot::RwLock<Option<StatsFn>>,
    /// The local broker.
    pub(crate) broker: Arc<Broker>,
    /// The data links to the other nodes (queues homed elsewhere).
    pub forward: Arc<forward::Forwarder>,
    /// This node's quorum queue groups.
    pub quorum: Arc<quorum::Manager>,
}

/// This node's figures for a query from another member (JSON in, JSON out:
/// what is asked and answered is the management API's business).
pub type StatsFn = Arc<dyn Fn(&serde_json::Value) -> serde_json::Value + Send + Sync>;

/// How long a member has to answer a stats request before it is shown as
/// not running.
pub const STATS_TIMEOUT: Duration = Duration::from_millis(1000);

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("me", &self.me)
            .field("id", &self.id)
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

/// The answer to forgetting a node that is no member (any more).
const NOT_A_MEMBER: &str = "not a member of this cluster";

/// The Raft id of a node name: stable, the same on every node.
pub fn node_id(name: &str) -> u64 {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(name.as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_be_bytes(b).max(1)
}

/// `warren@host:port`, `warren@host` or `host:port` -> (name or None, address).
pub fn parse_seed(seed: &str) -> (Option<String>, String) {
    let (name, hostport) = match seed.split_once('@') {
        Some((prefix, rest)) => {
            let host = rest.rsplit_once(':').map_or(rest, |(h, _)| h);
            (Some(format!("{prefix}@{host}")), rest)
        }
        None => (None, seed),
    };
    let has_port = hostport
        .rsplit_once(':')
        .is_some_and(|(_, p)| p.parse::<u16>().is_ok());
    let addr = if has_port {
        hostport.to_string()
    } else {
        format!("{hostport}:{DEFAULT_PORT}")
    };
    (name, addr)
}

/// The shared secret: configured, or the cookie file in the data directory
/// (created with a random one, readable by the owner only, on first start).
fn cookie(cc: &ClusterConfig, data_dir: &std::path::Path) -> Result<String, ClusterError> {
    if let Some(c) = cc.cookie.as_ref().filter(|c| !c.is_empty()) {
        return Ok(c.clone());
    }
    let path = data_dir.join(".warren.cookie");
    match std::fs::read_to_string(&path) {
        Ok(c) if !c.trim().is_empty() => return Ok(c.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(ClusterError::Config(format!("{}: {e}", path.display()))),
    }
    let bytes: [u8; 20] = rand::random();
    let c: String = bytes.iter().map(|b| char::from(b'A' + b % 26)).collect();
    std::fs::create_dir_all(data_dir)?;
    std::fs::write(&path, &c)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o400));
    }
    Ok(c)
}

/// One member, as `warren cluster status` and `/api/nodes` show it.
#[derive(Debug, Clone, Serialize)]
pub struct Member {
    pub name: String,
    pub addr: String,
    pub id: u64,
    /// A voter (false: a learner still catching up).
    pub voter: bool,
    /// This node sees it as up: itself, or a member that answered one of
    /// this node's probes within the last second.
    pub running: bool,
    pub leader: bool,
}

impl Member {
    /// Its name and address, to dial it by (through the `dial` overrides,
    /// as every request to a member).
    fn node_info(&self) -> NodeInfo {
        NodeInfo {
            name: self.name.clone(),
            addr: self.addr.clone(),
            stream: None,
        }
    }
}

/// [`Cluster::runner_of`] over `members` as a node sees them (pure).
pub fn runner<'a>(members: &'a [Member], key: &str) -> Option<&'a str> {
    let voters = members.iter().filter(|m| m.voter).count();
    let running: Vec<&Member> = members.iter().filter(|m| m.voter && m.running).collect();
    if running.len() * 2 <= voters {
        return None;
    }
    running
        .into_iter()
        .max_by_key(|m| node_id(&format!("{}\0{key}", m.name)))
        .map(|m| m.name.as_str())
}

impl Cluster {
    /// `[cluster.tls]`, loaded (None: the inter-node connections are plain).
    pub fn tls(&self) -> Option<Arc<crate::tls::MutualTls>> {
        self.ident.tls.clone()
    }

    /// Start this node's part of the cluster: open the store, start the Raft
    /// node and the inter-node listener, and on a first start either form a
    /// cluster of one (no seeds) or join through the seeds (in the background).
    pub async fn start(config: &Config, broker: Arc<Broker>) -> Result<Arc<Cluster>, ClusterError> {
        let cc = config.cluster.clone().unwrap_or_default();
        let name = config.node_name();
        let Some((_, host)) = name.split_once('@') else {
            return Err(ClusterError::Config(format!(
                "node name '{name}' is not of the form warren@host"
            )));
        };
        let listen_spec = cc
            .listen
            .clone()
            .unwrap_or_else(|| DEFAULT_PORT.to_string());
        let listen_addr = match listen_spec.parse::<u16>() {
            Ok(port) => format!("{host}:{port}"),
            Err(_) => listen_spec.clone(),
        };
        let listener = tokio::net::TcpListener::bind(&listen_addr).await?;
        let listen = listener.local_addr()?;
        let stream = config.stream_tcp_port().map(|port| {
            let h = config.stream.advertised_host.as_deref().unwrap_or(host);
            format!("{h}:{}", config.stream.advertised_port.unwrap_or(port))
        });
        let me = NodeInfo {
            addr: format!("{host}:{}", listen.port()),
            name: name.clone(),
            stream,
        };
        let id = node_id(&name);
        let cookie = cookie(&cc, &config.data_dir)?;
        let store = LogStore::open(&config.data_dir.join("cluster"))
            .map_err(|e| ClusterError::Store(e.to_string()))?;
        let fresh = store.is_fresh();
        let sm = StateMachine::open(broker.clone(), store.clone()).map_err(ClusterError::Store)?;
        let hb = cc.heartbeat_ms.max(10);
        let raft_config = openraft::Config {
            cluster_name: "warren".into(),
            heartbeat_interval: hb,
            election_timeout_min: hb * 3,
            election_timeout_max: hb * 6,
            ..Default::default()
        }
        .validate()
        .map_err(|e| ClusterError::Config(e.to_string()))?;
        let tls = match &cc.tls {
            Some(t) => {
                Some(Arc::new(crate::tls::MutualTls::new(t).map_err(|e| {
                    ClusterError::Config(format!("[cluster.tls]: {e}"))
                })?))
            }
            None => None,
        };
        let ident = Arc::new(Identity {
            tls,
            dial: cc.dial.clone(),
            ..Identity::new(me.clone(), id, cookie)
        });
        let network = Network {
            ident: Arc::clone(&ident),
        };
        let fwd = forward::Forwarder::new(Arc::clone(&ident));
        sm.set_forwarder(Arc::clone(&fwd));
        let quorum = quorum::Manager::open(
            &config.data_dir.join("quorum"),
            Arc::clone(&broker),
            Arc::clone(&ident),
            hb,
            Duration::from_millis(cc.commit_timeout_ms.max(1)),
        )
        .map_err(ClusterError::Store)?;
        sm.set_quorum(Arc::clone(&quorum));
        let raft_config = Arc::new(raft_config);
        let raft = openraft::Raft::new(
            id,
            Arc::clone(&raft_config),
            network,
            store.clone(),
            sm.clone(),
        )
        .await
        .map_err(|e| ClusterError::Store(e.to_string()))?;
        let cluster = Arc::new(Cluster {
            me,
            id,
            listen,
            ident,
            raft: parking_lot::RwLock::new(raft),
            raft_config,
            store,
            sm,
            commit_timeout: Duration::from_millis(cc.commit_timeout_ms.max(1)),
            seen: Default::default(),
            stats: Default::default(),
            broker,
            forward: fwd,
            quorum,
        });
        cluster.forward.set_cluster(&cluster);
        cluster.quorum.set_cluster(&cluster);
        // Queues homed elsewhere keep no messages here, from the first publish on.
        sm_mark_all(&cluster.sm);
        cluster.spawn_self_deletions();
        network::serve(listener, Arc::downgrade(&cluster));
        cluster.spawn_pinger();
        let tls = cluster.ident.tls.is_some();
        tracing::info!(node = %name, %listen, id, tls, "cluster node started");
        if fresh {
            let seeds: Vec<String> = cc
                .seeds
                .iter()
                .filter(|s| parse_seed(s).1 != cluster.me.addr)
                .cloned()
                .collect();
            if seeds.is_empty() {
                let members = BTreeMap::from([(id, cluster.me.clone())]);
                if let Err(e) = cluster.raft().initialize(members).await {
                    tracing::error!(error = %e, "cannot form a cluster of one");
                }
            } else {
                let c = Arc::clone(&cluster);
                tokio::spawn(async move { c.join_seeds(seeds).await });
            }
        }
        Ok(cluster)
    }

    /// Ask the seeds, in turn and again until one accepts, to add this node.
    async fn join_seeds(self: Arc<Self>, seeds: Vec<String>) {
        let mut round = 0u32;
        loop {
            for seed in &seeds {
                match self.join(seed).await {
                    Ok(()) => {
                        tracing::info!(%seed, "joined the cluster");
                        return;
                    }
                    Err(e) => {
                        if round.is_multiple_of(20) {
                            tracing::info!(%seed, error = %e, "cannot join yet");
                        }
                    }
                }
            }
            round += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The Raft handle (a cheap clone).
    fn raft(&self) -> openraft::Raft<TypeConfig> {
        self.raft.read().clone()
    }

    /// `warren cluster join <node>`: join the cluster of `node`
    /// (`warren@host[:port]` or `host:port`).
    /// Only a node that is alone (a cluster of one, or not yet in any) and has
    /// no replicated metadata of its own can: its one-node group is dropped
    /// and it starts afresh as a learner of the other cluster.
    pub async fn join_cluster(&self, node: &str) -> Result<(), String> {
        let members = self.members();
        if members.len() > 1 {
            return Err(format!(
                "this node is already a member of a cluster of {} nodes; forget-node it there first",
                members.len()
            ));
        }
        if !members.is_empty() {
            if !self.sm.metadata().is_empty() {
                return Err(
                    "this node has replicated metadata of its own, which joining would \
                     discard (resetting a node is not supported yet)"
                        .into(),
                );
            }
            let old = self.raft();
            old.shutdown().await.map_err(|e| e.to_string())?;
            self.store.reset().map_err(|e| e.to_string())?;
            self.sm.reset();
            let network = Network {
                ident: Arc::clone(&self.ident),
            };
            let raft = openraft::Raft::new(
                self.id,
                Arc::clone(&self.raft_config),
                network,
                self.store.clone(),
                self.sm.clone(),
            )
            .await
            .map_err(|e| e.to_string())?;
            *self.raft.write() = raft;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match self.join(node).await {
                Ok(()) => return Ok(()),
                Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// Ask the node `seed` (`warren@host[:port]` or `host:port`), or its
    /// leader, to add this node to its cluster.
    pub async fn join(&self, seed: &str) -> Result<(), String> {
        let mut peer = Peer::seed(seed, Arc::clone(&self.ident));
        let r: Result<(), String> = peer
            .call(
                Kind::Join,
                &(self.id, self.me.clone()),
                Duration::from_secs(10),
            )
            .await
            .map_err(|e| e.to_string())?;
        r
    }

    /// The leader's side of a join: add as a learner (it catches up), then
    /// make it a voter. Elsewhere: forwarded to the leader.
    async fn add_member(&self, id: u64, node: NodeInfo) -> Result<(), String> {
        if let Some(leader) = self.remote_leader().await? {
            let mut peer = Peer::to(&leader, Arc::clone(&self.ident));
            return peer
                .call(Kind::Join, &(id, node), Duration::from_secs(10))
                .await
                .map_err(|e| e.to_string())?;
        }
        if self.voters().contains(&id) {
            return Ok(());
        }
        self.raft()
            .add_learner(id, node, true)
            .await
            .map_err(|e| e.to_string())?;
        self.raft()
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Remove a member (the leader does it; elsewhere forwarded to it).
    async fn remove_member(&self, id: u64) -> Result<(), String> {
        if let Some(leader) = self.remote_leader().await? {
            let mut peer = Peer::to(&leader, Arc::clone(&self.ident));
            return peer
                .call(Kind::Forget, &id, Duration::from_secs(10))
                .await
                .map_err(|e| e.to_string())?;
        }
        let m = self.raft().metrics().borrow().membership_config.clone();
        if !m.membership().nodes().any(|(n, _)| *n == id) {
            return Err(NOT_A_MEMBER.into());
        }
        if self.voters().contains(&id) {
            self.raft()
                .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
                .await
                .map_err(|e| e.to_string())?;
        } else {
            self.raft()
                .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// `warren cluster forget-node <name>`: remove a member by name, then
    /// what was only there (RabbitMQ's `forget_cluster_node`): the records of
    /// its classic queues and streams go, and it leaves the quorum queues'
    /// groups ([`command::Metadata::forgotten`]). Run again after a partial
    /// failure, it finishes the clean-up of a node no longer a member.
    pub async fn forget(&self, name: &str) -> Result<(), String> {
        let id = node_id(name);
        if id == self.id {
            return Err("a node cannot forget itself; run this on another member".into());
        }
        let removed = tokio::time::timeout(self.commit_timeout * 2, self.remove_member(id))
            .await
            .map_err(|_| {
                "timed out: no metadata leader (is a majority of nodes up?)".to_string()
            })?;
        let cleanup = self.sm.metadata().forgotten(name);
        match removed {
            Ok(()) => {}
            Err(e) if e == NOT_A_MEMBER && !cleanup.is_empty() => {}
            Err(e) => return Err(e),
        }
        if cleanup.is_empty() {
            return Ok(());
        }
        tracing::info!(
            node = name,
            changes = cleanup.len(),
            "forgetting what was on the node"
        );
        self.propose(Command::Batch(cleanup)).await
    }

    fn voters(&self) -> BTreeSet<u64> {
        let m = self.raft().metrics().borrow().membership_config.clone();
        m.membership().voter_ids().collect()
    }

    /// The leader when it is another node; None when this node leads. Waits
    /// (up to the commit timeout) while no leader is known.
    async fn remote_leader(&self) -> Result<Option<NodeInfo>, String> {
        let deadline = tokio::time::Instant::now() + self.commit_timeout;
        loop {
            let m = self.raft().metrics().borrow().clone();
            match m.current_leader {
                Some(l) if l == self.id && m.state == ServerState::Leader => return Ok(None),
                Some(l) if l != self.id => {
                    if let Some(n) = m.membership_config.membership().get_node(&l) {
                        return Ok(Some(n.clone()));
                    }
                }
                _ => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err("no metadata leader: is a majority of the cluster up?".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Commit a metadata command, through the leader wherever it is; Ok once
    /// it is committed (and applied on the leader). Errs after the commit
    /// timeout (no majority, no leader): the change may still commit later.
    pub async fn propose(&self, cmd: Command) -> Result<(), String> {
        let timeout = self.commit_timeout;
        let quorum_queue = quorum_declare(&cmd);
        match tokio::time::timeout(timeout, self.propose_loop(cmd)).await {
            Ok(Ok(())) => {
                if let Some((vhost, name)) = quorum_queue {
                    // The declare of a quorum queue is answered once its group
                    // has a leader serving it (at most the commit timeout
                    // more): publishes right after it are replicated.
                    self.wait_quorum_leader(&vhost, &name).await;
                }
                Ok(())
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!(
                "metadata change not committed within {} ms: no quorum of cluster nodes",
                timeout.as_millis()
            )),
        }
    }

    /// Wait (up to the commit timeout) until the quorum queue `vhost`/`name`
    /// has a leader recorded and this node knows where to reach it.
    async fn wait_quorum_leader(&self, vhost: &str, name: &str) {
        let deadline = tokio::time::Instant::now() + self.commit_timeout;
        let key = command::key(vhost, name);
        while tokio::time::Instant::now() < deadline {
            let m = self.sm.metadata();
            match m.quorum.get(&key) {
                None => return,
                Some(rec) if rec.leader.is_some() => return,
                Some(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A quorum queue's group record (members, leader), when it has one.
    pub fn quorum_record(&self, vhost: &str, name: &str) -> Option<command::QuorumRec> {
        self.sm.quorum_record(vhost, name)
    }

    /// A quorum queue's committed messages and their body bytes, from this
    /// node's member of its group when it has one and does not serve the
    /// queue (between leaders, or a follower): what a serving leader's
    /// local queue would hold, with nothing out with clients.
    pub fn quorum_lengths(&self, vhost: &str, name: &str) -> Option<(usize, u64)> {
        let rec = self.quorum_record(vhost, name)?;
        let g = self.quorum.group(&rec.group)?;
        (!g.is_serving()).then(|| g.committed_lengths())
    }

    /// The voters of a quorum queue's group as this node's member of it
    /// sees them, once a membership change is complete (None: the group
    /// does not run here, or a change is half-way).
    pub fn quorum_voters(&self, vhost: &str, name: &str) -> Option<Vec<String>> {
        let rec = self.quorum_record(vhost, name)?;
        let voters = self.quorum.group(&rec.group)?.voters()?;
        Some(voters.into_values().collect())
    }

    async fn propose_loop(&self, cmd: Command) -> Result<(), String> {
        loop {
            match self.remote_leader().await {
                Ok(None) => match self.write_here(cmd.clone()).await {
                    Ok(()) => return Ok(()),
                    Err(e) => tracing::debug!(error = %e, "metadata write failed; retrying"),
                },
                Ok(Some(leader)) => {
                    let mut peer = Peer::to(&leader, Arc::clone(&self.ident));
                    let call = peer.call(Kind::Propose, &cmd, self.commit_timeout);
                    // A leader cut off from this node may never answer: when
                    // another leader is known meanwhile, ask that one instead
                    // (a command that reached both is applied twice, which
                    // every command absorbs).
                    let r: Result<Result<(), String>, _> = tokio::select! {
                        r = call => r,
                        () = self.leader_other_than(&leader.name) => {
                            tracing::debug!(old = %leader.name, "leader changed; retrying");
                            continue;
                        }
                    };
                    match r {
                        Ok(Ok(())) => return Ok(()),
                        Ok(Err(e)) => tracing::debug!(error = %e, "leader refused; retrying"),
                        Err(e) => tracing::debug!(error = %e, "leader unreachable; retrying"),
                    }
                }
                Err(e) => tracing::debug!(error = %e, "no leader yet"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Returns once this node knows of a leader that is not `name`.
    async fn leader_other_than(&self, name: &str) {
        let mut metrics = self.raft().metrics();
        loop {
            let other = {
                let m = metrics.borrow_and_update();
                m.current_leader.is_some_and(|l| {
                    m.membership_config
                        .membership()
                        .get_node(&l)
                        .is_some_and(|n| n.name != name)
                })
            };
            if other {
                return;
            }
            if metrics.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Write on this node, which must be the leader.
    async fn write_here(&self, cmd: Command) -> Result<(), String> {
        match self.raft().client_write(cmd).await {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                Err(format!("not the leader (leader: {:?})", f.leader_id))
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// This node's links to the other members (`cluster_links`) at
    /// `now_ms`: the current members' only.
    pub fn links(&self, now_ms: u64) -> Vec<serde_json::Value> {
        let members: Vec<String> = self
            .members()
            .into_iter()
            .filter(|m| m.id != self.id)
            .map(|m| m.name)
            .collect();
        self.ident
            .links
            .json(now_ms, |name| members.iter().any(|m| m == name))
    }

    /// Every member with what this node knows of it.
    pub fn members(&self) -> Vec<Member> {
        let m = self.raft().metrics().borrow().clone();
        let leader = m.current_leader;
        let membership = m.membership_config.membership().clone();
        let voters: BTreeSet<u64> = membership.voter_ids().collect();
        let seen = self.seen.lock();
        let fresh = |id: &u64| seen.get(id).is_some_and(|at| at.elapsed() < DOWN_AFTER);
        membership
            .nodes()
            .map(|(id, n)| Member {
                name: n.name.clone(),
                addr: n.addr.clone(),
                id: *id,
                voter: voters.contains(id),
                running: *id == self.id || fresh(id),
                leader: Some(*id) == leader,
            })
            .collect()
    }

    /// The running member that does the work named `key` (a dynamic shovel,
    /// say) now: of the running voters, the one whose name hashed with `key`
    /// is highest (rendezvous hashing: the same answer on every node that
    /// sees the same members running, and a member's coming or going moves
    /// only the work it gains or had). None while this node does not see a
    /// majority of the voters running: a node cut off from the others leaves
    /// the work to the majority's side.
    pub fn runner_of(&self, key: &str) -> Option<String> {
        runner(&self.members(), key).map(String::from)
    }

    /// Probe every other member every [`PING_EVERY`]: what `running` in
    /// [`Self::members`] is made of, the same on every node.
    fn spawn_pinger(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let ident = Arc::clone(&self.ident);
        tokio::spawn(async move {
            let mut peers: BTreeMap<u64, Peer> = BTreeMap::new();
            let mut tick = tokio::time::interval(PING_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(c) = weak.upgrade() else { return };
                let m = c.raft().metrics().borrow().membership_config.clone();
                let members: Vec<(u64, NodeInfo)> = m
                    .membership()
                    .nodes()
                    .filter(|(id, _)| **id != c.id)
                    .map(|(id, n)| (*id, n.clone()))
                    .collect();
                drop(c);
                peers.retain(|id, _| members.iter().any(|(m, _)| m == id));
                let probes = members.into_iter().map(|(id, node)| {
                    let peer = peers
                        .remove(&id)
                        .unwrap_or_else(|| Peer::to(&node, Arc::clone(&ident)));
                    async move {
                        let mut peer = peer;
                        let r: Result<Alarms, _> = peer.call(Kind::Ping, &(), PING_EVERY).await;
                        (id, peer, r.ok())
                    }
                });
                let results = futures::future::join_all(probes).await;
                let Some(c) = weak.upgrade() else { return };
                // The answering members' alarms block this node's
                // publishers too (RabbitMQ's alarms are cluster-wide).
                let mut remote = Alarms::default();
                let mut seen = c.seen.lock();
                for (id, peer, alarms) in results {
                    if let Some(a) = alarms {
                        seen.insert(id, std::time::Instant::now());
                        remote = remote.or(a);
                    }
                    peers.insert(id, peer);
                }
                drop(seen);
                c.broker.set_remote_alarms(remote);
            }
        });
    }

    /// Answer other members' stats requests with `f`.
    pub fn set_stats(&self, f: StatsFn) {
        *self.stats.write() = Some(f);
    }

    /// This node's answer to a stats request.
    /// With its node figures, the members this node cannot reach
    /// (`unreachable`: the asker's `partitions` come from these) and its
    /// links to the others (`cluster_links`).
    fn local_stats(&self, query: &serde_json::Value) -> Result<serde_json::Value, String> {
        let f = self.stats.read().clone();
        let mut answer = f
            .map(|f| f(query))
            .ok_or_else(|| "this node has no management API to answer".to_string())?;
        if let Some(node) = answer.get_mut("node").and_then(|n| n.as_object_mut()) {
            node.insert("unreachable".into(), self.unreachable().into());
            let links = self.links(crate::clock::now_ms());
            node.insert("cluster_links".into(), links.into());
        }
        Ok(answer)
    }

    /// The members this node's probes do not reach now.
    pub fn unreachable(&self) -> Vec<String> {
        let members = self.members().into_iter();
        members.filter(|m| !m.running).map(|m| m.name).collect()
    }

    /// Ask every other member (all at once, each on a connection of its own,
    /// at most [`STATS_TIMEOUT`]) for its figures: the members with the
    /// answer of those that gave one.
    pub async fn member_stats(
        &self,
        query: &serde_json::Value,
    ) -> Vec<(Member, Option<serde_json::Value>)> {
        let asks = self.members().into_iter().map(|m| async move {
            if m.id == self.id {
                return (m, None);
            }
            let mut peer = Peer::to(&m.node_info(), Arc::clone(&self.ident));
            let r: Result<Result<serde_json::Value, String>, _> =
                peer.call(Kind::Stats, query, STATS_TIMEOUT).await;
            match r {
                Ok(Ok(v)) => (m, Some(v)),
                Ok(Err(e)) => {
                    tracing::debug!(node = %m.name, error = %e, "no figures");
                    (m, None)
                }
                Err(e) => {
                    tracing::debug!(node = %m.name, error = %e, "stats request failed");
                    (m, None)
                }
            }
        });
        futures::future::join_all(asks).await
    }

    /// Ask one member, by name, for its figures (None: not a member, or no
    /// answer within [`STATS_TIMEOUT`]).
    pub async fn stats_of(
        &self,
        node: &str,
        query: &serde_json::Value,
    ) -> Option<serde_json::Value> {
        let m = self.members().into_iter().find(|m| m.name == node)?;
        if m.id == self.id {
            return self.local_stats(query).ok();
        }
        let mut peer = Peer::to(&m.node_info(), Arc::clone(&self.ident));
        let r: Result<Result<serde_json::Value, String>, _> =
            peer.call(Kind::Stats, query, STATS_TIMEOUT).await;
        r.ok()?.ok()
    }

    /// A member's record, by name.
    pub fn node_info(&self, name: &str) -> Option<NodeInfo> {
        let m = self.raft().metrics().borrow().membership_config.clone();
        let found = m.membership().nodes().find(|(_, n)| n.name == name);
        found.map(|(_, n)| n.clone())
    }

    /// The leader's name, when one is known.
    pub fn leader(&self) -> Option<String> {
        let m = self.raft().metrics().borrow().clone();
        let l = m.current_leader?;
        m.membership_config
            .membership()
            .get_node(&l)
            .map(|n| n.name.clone())
    }

    /// The committed metadata model.
    /// How long a replicated change may take to commit (`commit_timeout_ms`).
    pub fn commit_timeout(&self) -> Duration {
        self.commit_timeout
    }

    pub fn metadata(&self) -> command::Metadata {
        self.sm.metadata()
    }

    /// Raft state, term, last log index and last applied index, for status.
    pub fn raft_status(&self) -> serde_json::Value {
        let m = self.raft().metrics().borrow().clone();
        serde_json::json!({
            "state": format!("{:?}", m.state),
            "term": m.current_term,
            "last_log_index": m.last_log_index,
            "last_applied": m.last_applied.map(|l| l.index),
        })
    }

    /// Stop the Raft node (at broker shutdown).
    pub async fn shutdown(&self) {
        self.quorum.shutdown().await;
        let _ = self.raft().shutdown().await;
    }
}

/// Tell every replicated queue where its messages live.
fn sm_mark_all(sm: &StateMachine) {
    sm.mark_all();
}

/// The vhost and name of a quorum queue `cmd` declares.
fn quorum_declare(cmd: &Command) -> Option<(String, String)> {
    match cmd {
        Command::DeclareQueue {
            vhost,
            name,
            arguments,
            ..
        } if store::is_quorum(arguments) => Some((vhost.clone(), name.clone())),
        _ => None,
    }
}

/// What the network needs to know of this node: its name, id, the cookie,
/// its inter-node TLS and where to dial peers.
pub struct Identity {
    pub me: NodeInfo,
    pub id: u64,
    pub cookie: String,
    /// `[cluster.tls]`, loaded: every inter-node connection is mutual TLS.
    pub tls: Option<Arc<crate::tls::MutualTls>>,
    /// `[cluster] dial`: node name or recorded address -> where to connect.
    pub dial: BTreeMap<String, String>,
    /// When a connection problem with a peer was last logged, by peer.
    complaints: parking_lot::Mutex<std::collections::HashMap<String, std::time::Instant>>,
    /// The quorum queue groups' connections, one per peer ([`mux`]).
    pub mux: mux::Muxes,
    /// Bytes to and from each peer, for `cluster_links`.
    pub links: links::Links,
}

/// How often the same connection problem with one peer is logged.
const COMPLAIN_EVERY: Duration = Duration::from_secs(10);

impl Identity {
    /// A node's identity without TLS or dial overrides (set the fields for them).
    pub fn new(me: NodeInfo, id: u64, cookie: String) -> Identity {
        Identity {
            me,
            id,
            cookie,
            tls: None,
            dial: BTreeMap::new(),
            complaints: Default::default(),
            mux: mux::Muxes::default(),
            links: links::Links::default(),
        }
    }

    /// Where to connect to reach the node `name` recorded at `addr`. Keys
    /// match without regard to case (host names do not have one, and the
    /// configuration loader lowercases keys).
    pub fn route(&self, name: Option<&str>, addr: &str) -> String {
        let get = |key: &str| {
            self.dial
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(key))
                .map(|(_, v)| v.clone())
        };
        name.and_then(get)
            .or_else(|| get(addr))
            .unwrap_or_else(|| addr.to_string())
    }

    /// Run `log` unless a problem with `peer` was logged in the last
    /// [`COMPLAIN_EVERY`] (peers retry every few hundred ms).
    pub fn complain(&self, peer: &str, log: impl FnOnce()) {
        let mut seen = self.complaints.lock();
        let now = std::time::Instant::now();
        if seen.len() > 1024 {
            seen.retain(|_, at| now.duration_since(*at) < COMPLAIN_EVERY);
            if seen.len() > 1024 {
                // A flood of distinct peers: forget them all rather than grow.
                seen.clear();
            }
        }
        match seen.get(peer) {
            Some(at) if now.duration_since(*at) < COMPLAIN_EVERY => {}
            _ => {
                seen.insert(peer.to_string(), now);
                log();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    fn member(name: &str, voter: bool, running: bool) -> Member {
        Member {
            name: name.into(),
            addr: String::new(),
            id: node_id(name),
            voter,
            running,
            leader: false,
        }
    }

    #[test]
    fn work_goes_to_one_running_voter_and_only_with_a_majority() {
        let names = ["warren@a", "warren@b", "warren@c"];
        let all: Vec<Member> = names.iter().map(|n| member(n, true, true)).collect();
        let keys: Vec<String> = (0..60).map(|i| format!("shovel\0/\0s{i}")).collect();
        // Every key has a runner; the three nodes share them.
        let runners: Vec<&str> = keys.iter().map(|k| runner(&all, k).unwrap()).collect();
        for n in names {
            let mine = runners.iter().filter(|r| **r == n).count();
            assert!(mine > 5, "{n} runs {mine} of 60");
        }
        // One node down: only its keys move, to the running ones.
        let mut b_down = all.clone();
        b_down[1].running = false;
        for (k, before) in keys.iter().zip(&runners) {
            let now = runner(&b_down, k).unwrap();
            if *before == "warren@b" {
                assert_ne!(now, "warren@b");
            } else {
                assert_eq!(now, *before, "a key that did not run on b stays");
            }
        }
        // A learner runs nothing; a minority's view runs nothing.
        let mut learner = all.clone();
        learner.push(member("warren@d", false, true));
        assert!(keys.iter().all(|k| runner(&learner, k) != Some("warren@d")));
        let mut alone = all.clone();
        alone[1].running = false;
        alone[2].running = false;
        assert!(keys.iter().all(|k| runner(&alone, k).is_none()));
        // A single-node cluster runs everything.
        assert_eq!(runner(&all[..1], &keys[0]), Some("warren@a"));
    }

    #[test]
    fn seeds_in_every_form() {
        assert_eq!(
            parse_seed("warren@127.0.0.2:25673"),
            (Some("warren@127.0.0.2".into()), "127.0.0.2:25673".into())
        );
        assert_eq!(
            parse_seed("warren@node-b"),
            (Some("warren@node-b".into()), "node-b:25672".into())
        );
        assert_eq!(parse_seed("10.0.0.3:4000"), (None, "10.0.0.3:4000".into()));
    }

    #[test]
    fn dial_overrides_by_name_then_recorded_address() {
        let ident = Identity {
            dial: BTreeMap::from([
                ("warren@b".to_string(), "127.0.0.1:7000".to_string()),
                ("10.0.0.3:25672".to_string(), "127.0.0.1:7001".to_string()),
            ]),
            ..Identity::new(NodeInfo::default(), 1, "c".into())
        };
        assert_eq!(ident.route(Some("warren@b"), "b:25672"), "127.0.0.1:7000");
        assert_eq!(ident.route(Some("warren@B"), "B:25672"), "127.0.0.1:7000");
        assert_eq!(ident.route(None, "10.0.0.3:25672"), "127.0.0.1:7001");
        assert_eq!(
            ident.route(Some("warren@c"), "10.0.0.3:25672"),
            "127.0.0.1:7001"
        );
        assert_eq!(ident.route(Some("warren@d"), "d:25672"), "d:25672");
        let mut logged = 0;
        ident.complain("x", || logged += 1);
        ident.complain("x", || logged += 1);
        ident.complain("y", || logged += 1);
        assert_eq!(logged, 2, "the same peer is logged once in a while");
    }

    #[test]
    fn node_ids_are_stable_and_distinct() {
        assert_eq!(node_id("warren@a"), node_id("warren@a"));
        assert_ne!(node_id("warren@a"), node_id("warren@b"));
        assert_ne!(node_id("warren@a"), 0);
    }
}
