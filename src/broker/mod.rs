//! The broker core: vhosts, users, exchanges, queues, routing and delivery. No I/O.
//!
//! `server` drives it from AMQP connections (and `admin` from HTTP). Everything
//! here is synchronous and short: locks are never held across an await. Nothing
//! here reads a clock: operations that need the time take `now` (ms since the
//! Unix epoch) from the caller, who reads [`crate::clock::now_ms`].

pub mod auth;
pub mod cc;
pub mod deleted;
pub mod exchange;
pub mod firehose;
pub mod global;
pub mod limits;
pub mod memory;
pub mod message;
pub mod oauth;
pub mod parameters;
pub mod persist;
pub mod policy;
pub mod queue;
pub mod remote;
pub mod ticks;
pub mod vhost;

use crate::config::Config;
use crate::storage::{StorageError, Store};
use crate::wire::FieldTable;
use parking_lot::RwLock;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
pub use vhost::VHost;

/// The resource alarms in effect, as RabbitMQ names them (`memory`: the
/// process above its memory high watermark; `disk`: free disk space below
/// `disk_free_limit`). While any is on, on this node or on another running
/// member of its cluster (RabbitMQ's alarms are cluster-wide), publishing
/// connections are blocked.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Alarms {
    pub memory: bool,
    pub disk: bool,
}

impl Alarms {
    /// The resources in alarm (RabbitMQ's names).
    pub fn resources(self) -> Vec<&'static str> {
        [("memory", self.memory), ("disk", self.disk)]
            .into_iter()
            .filter_map(|(r, on)| on.then_some(r))
            .collect()
    }

    /// Either's alarms.
    pub fn or(self, other: Alarms) -> Alarms {
        Alarms {
            memory: self.memory || other.memory,
            disk: self.disk || other.disk,
        }
    }

    /// The reason connection.blocked gives (None: no alarm), RabbitMQ's.
    pub fn blocked_reason(self) -> Option<&'static str> {
        match (self.memory, self.disk) {
            (false, false) => None,
            (true, false) => Some("low on memory"),
            (false, true) => Some("low on disk"),
            (true, true) => Some("low on memory & low on disk"),
        }
    }
}

/// Message counters (monotonic totals); rates are derived by whoever samples them.
#[derive(Debug, Default)]
pub struct Counters {
    pub published: AtomicU64,
    pub delivered: AtomicU64,
    pub acked: AtomicU64,
    pub confirmed: AtomicU64,
    pub redelivered: AtomicU64,
    pub returned: AtomicU64,
    pub unroutable: AtomicU64,
    /// Messages a queue dead-lettered to its dead-letter exchange (queues' counters).
    pub dead_lettered: AtomicU64,
    /// Of `delivered` (the broker's counters): to no-ack consumers, and by
    /// basic.get with and without ack; and basic.gets of an empty queue.
    pub delivered_no_ack: AtomicU64,
    pub got: AtomicU64,
    pub got_no_ack: AtomicU64,
    pub get_empty: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// A message delivered to a consumer (`no_ack`: one that does not ack;
    /// `redelivered`: flagged so).
    #[inline]
    pub fn consumer_delivery(&self, no_ack: bool, redelivered: bool) {
        Self::add(&self.delivered, 1);
        if no_ack {
            Self::add(&self.delivered_no_ack, 1);
        }
        if redelivered {
            Self::add(&self.redelivered, 1);
        }
    }

    /// A message handed out by basic.get.
    #[inline]
    pub fn got(&self, no_ack: bool, redelivered: bool) {
        Self::add(&self.delivered, 1);
        Self::add(if no_ack { &self.got_no_ack } else { &self.got }, 1);
        if redelivered {
            Self::add(&self.redelivered, 1);
        }
    }
}

/// A connection's socket traffic, as the management API shows it
/// (RabbitMQ's `recv_oct`, `recv_cnt`, `send_oct`, `send_cnt`). The
/// connection's tasks count with relaxed atomics, one add per socket read and
/// per write call (never per frame); the admin API reads and samples them.
///
/// RabbitMQ counts packets in `recv_cnt` / `send_cnt`; here they count socket
/// reads that returned data and write calls (the AMQP writer coalesces every
/// waiting chunk into one write; a Stream connection counts each vectored
/// write and each `sendfile(2)` call), the nearest user-space measure.
#[derive(Debug, Default)]
pub struct SocketStats {
    /// Bytes read from the socket.
    pub recv_oct: AtomicU64,
    /// Socket reads that returned data.
    pub recv_cnt: AtomicU64,
    /// Bytes written to the socket.
    pub send_oct: AtomicU64,
    /// Socket writes.
    pub send_cnt: AtomicU64,
}

impl SocketStats {
    pub fn new() -> Arc<SocketStats> {
        Arc::new(SocketStats::default())
    }

    /// `n` bytes were read from the socket in one read.
    pub fn received(&self, n: usize) {
        self.recv_oct.fetch_add(n as u64, Ordering::Relaxed);
        self.recv_cnt.fetch_add(1, Ordering::Relaxed);
    }

    /// `n` bytes were written to the socket in one write.
    pub fn sent(&self, n: usize) {
        self.send_oct.fetch_add(n as u64, Ordering::Relaxed);
        self.send_cnt.fetch_add(1, Ordering::Relaxed);
    }

    /// (`recv_oct`, `send_oct`) so far.
    pub fn octets(&self) -> (u64, u64) {
        (
            self.recv_oct.load(Ordering::Relaxed),
            self.send_oct.load(Ordering::Relaxed),
        )
    }
}

/// Lets the broker (admin API, shutdown) close a connection it does not own.
pub trait ConnectionControl: Send + Sync + std::fmt::Debug {
    /// Close with 320 CONNECTION_FORCED and this reason.
    fn force_close(&self, reason: &str);

    /// A Stream protocol connection's publishers and consumers (None: an
    /// AMQP 0-9-1 connection).
    fn stream(&self) -> Option<&crate::session::stream_stats::StreamConnStats> {
        None
    }
}

/// A TLS connection's session, as `/api/connections` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    /// `tlsv1.2` or `tlsv1.3`, RabbitMQ's spelling.
    pub protocol: &'static str,
    /// The negotiated cipher suite, e.g. `TLS13_AES_256_GCM_SHA384`.
    pub cipher: String,
    /// The verified client certificate's subject and issuer (RFC 4514).
    pub peer_cert_subject: Option<String>,
    pub peer_cert_issuer: Option<String>,
}

impl TlsInfo {
    /// The cipher suite's key exchange as Erlang's `ssl` (so RabbitMQ's
    /// `ssl_key_exchange`) names it: `any` for TLS 1.3 suites, else the
    /// part before `_WITH_` (`ecdhe_rsa`).
    pub fn key_exchange(&self) -> String {
        match self.cipher.split_once("_WITH_") {
            Some((kx, _)) => kx.trim_start_matches("TLS_").to_ascii_lowercase(),
            None => "any".into(),
        }
    }

    /// The suite's MAC as Erlang's `ssl` (so RabbitMQ's `ssl_hash`) names
    /// it: `aead` for AEAD ciphers (GCM, CCM, ChaCha20-Poly1305), else the
    /// hash at its end (`sha384`).
    pub fn hash(&self) -> String {
        let c = &self.cipher;
        if ["GCM", "CCM", "POLY1305"].iter().any(|a| c.contains(a)) {
            return "aead".into();
        }
        c.rsplit('_')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase()
    }
}

/// Connections and channels opened and closed since start (RabbitMQ's
/// churn rates), and queues' (which the vhosts count into).
#[derive(Debug, Default)]
pub struct Churn {
    pub connection_created: AtomicU64,
    pub connection_closed: AtomicU64,
    pub channel_created: AtomicU64,
    pub channel_closed: AtomicU64,
    pub queues: Arc<vhost::QueueChurn>,
}

/// Login attempts since start, per protocol (RabbitMQ's auth attempt
/// metrics: `/api/auth/attempts/{node}`, `rabbitmq_auth_attempts_*`), and
/// per source (`/api/auth/attempts/{node}/source`): remote address, username
/// and protocol, for at most [`MAX_AUTH_SOURCES`] sources (a new one past
/// that drops the one first seen longest ago).
#[derive(Debug, Default)]
pub struct AuthAttempts {
    /// (succeeded, failed) per [`AuthProtocol`], in its order.
    counts: [(AtomicU64, AtomicU64); 3],
    sources: parking_lot::Mutex<AuthSources>,
}

/// Most sources [`AuthAttempts`] keeps.
pub const MAX_AUTH_SOURCES: usize = 1024;

/// A login's source: remote address (as text), username, protocol.
pub type AuthSource = (String, String, AuthProtocol);

#[derive(Debug, Default)]
struct AuthSources {
    /// (succeeded, failed) per source.
    counts: HashMap<AuthSource, (u64, u64)>,
    /// The sources, first seen first.
    order: std::collections::VecDeque<AuthSource>,
}

/// Where a login was tried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthProtocol {
    Amqp091,
    Stream,
    Http,
}

impl AuthProtocol {
    pub const ALL: [AuthProtocol; 3] = [
        AuthProtocol::Amqp091,
        AuthProtocol::Stream,
        AuthProtocol::Http,
    ];

    /// RabbitMQ's name for it.
    pub fn name(self) -> &'static str {
        match self {
            AuthProtocol::Amqp091 => "amqp091",
            AuthProtocol::Stream => "stream",
            AuthProtocol::Http => "http",
        }
    }
}

impl AuthAttempts {
    /// A login by `username` over `protocol` from `remote` (None: unknown,
    /// counted per protocol only).
    pub fn record(
        &self,
        protocol: AuthProtocol,
        succeeded: bool,
        remote: Option<std::net::IpAddr>,
        username: &str,
    ) {
        let (ok, failed) = &self.counts[protocol as usize];
        Counters::add(if succeeded { ok } else { failed }, 1);
        let Some(ip) = remote else {
            return;
        };
        // An IPv4 client on a dual-stack listener shows as IPv4, as RabbitMQ's.
        let key = (
            ip.to_canonical().to_string(),
            username.to_string(),
            protocol,
        );
        let mut g = self.sources.lock();
        let g = &mut *g;
        if !g.counts.contains_key(&key) {
            if g.order.len() >= MAX_AUTH_SOURCES {
                if let Some(oldest) = g.order.pop_front() {
                    g.counts.remove(&oldest);
                }
            }
            g.order.push_back(key.clone());
        }
        let c = g.counts.entry(key).or_default();
        if succeeded {
            c.0 += 1;
        } else {
            c.1 += 1;
        }
    }

    /// Each tracked source with its (succeeded, failed), first seen first.
    pub fn sources(&self) -> Vec<(AuthSource, (u64, u64))> {
        let g = self.sources.lock();
        g.order
            .iter()
            .filter_map(|k| Some((k.clone(), *g.counts.get(k)?)))
            .collect()
    }

    /// (succeeded, failed) for `protocol`.
    pub fn get(&self, protocol: AuthProtocol) -> (u64, u64) {
        let (ok, failed) = &self.counts[protocol as usize];
        (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed))
    }
}

/// One AMQP channel's figures for `/api/channels`: written by its
/// connection's task as it handles the channel (relaxed atomics), read by
/// the admin API. Gauges are as of the channel's last event.
#[derive(Debug, Default)]
pub struct ChannelStats {
    /// basic.qos with global=false (per consumer) and global=true.
    pub prefetch_count: AtomicU32,
    pub global_prefetch_count: AtomicU32,
    pub confirm: std::sync::atomic::AtomicBool,
    pub transactional: std::sync::atomic::AtomicBool,
    pub unacked: AtomicU64,
    /// Publishes in confirm mode not acked or nacked yet, and those acked
    /// (kept by the session's confirm state, which holds a clone).
    pub confirms: Arc<ConfirmGauges>,
    /// Publishes and acks held by an open transaction.
    pub uncommitted: AtomicU64,
    pub acks_uncommitted: AtomicU64,
    pub publish: AtomicU64,
    pub deliver: AtomicU64,
    pub deliver_no_ack: AtomicU64,
    pub get: AtomicU64,
    pub get_no_ack: AtomicU64,
    pub get_empty: AtomicU64,
    pub redeliver: AtomicU64,
    pub ack: AtomicU64,
    pub return_unroutable: AtomicU64,
    pub drop_unroutable: AtomicU64,
}

/// A channel's confirm figures, kept by its session's confirm state.
#[derive(Debug, Default)]
pub struct ConfirmGauges {
    /// Publishes not acked or nacked yet (`messages_unconfirmed`).
    pub unconfirmed: AtomicU64,
    /// Publishes acked (`message_stats.confirm`).
    pub confirmed: AtomicU64,
}

/// The names of a channel's `message_stats` counts, in the order of
/// [`ChannelStats::counts`].
pub const CHANNEL_COUNTS: [&str; 12] = [
    "publish",
    "confirm",
    "return_unroutable",
    "drop_unroutable",
    "deliver",
    "deliver_no_ack",
    "get",
    "get_no_ack",
    "get_empty",
    "deliver_get",
    "redeliver",
    "ack",
];

impl ChannelStats {
    /// The channel's message counts, named by [`CHANNEL_COUNTS`]
    /// (`deliver_get`: every message delivered or got).
    pub fn counts(&self) -> [u64; 12] {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (deliver, deliver_no_ack) = (get(&self.deliver), get(&self.deliver_no_ack));
        let (got, got_no_ack) = (get(&self.get), get(&self.get_no_ack));
        [
            get(&self.publish),
            get(&self.confirms.confirmed),
            get(&self.return_unroutable),
            get(&self.drop_unroutable),
            deliver,
            deliver_no_ack,
            got,
            got_no_ack,
            get(&self.get_empty),
            deliver + deliver_no_ack + got + got_no_ack,
            get(&self.redeliver),
            get(&self.ack),
        ]
    }

    /// A delivery to a consumer.
    #[inline]
    pub fn count_deliver(&self, no_ack: bool, redelivered: bool) {
        Counters::add(
            if no_ack {
                &self.deliver_no_ack
            } else {
                &self.deliver
            },
            1,
        );
        if redelivered {
            Counters::add(&self.redeliver, 1);
        }
    }

    /// A basic.get answered with a message.
    #[inline]
    pub fn count_get(&self, no_ack: bool, redelivered: bool) {
        Counters::add(if no_ack { &self.get_no_ack } else { &self.get }, 1);
        if redelivered {
            Counters::add(&self.redeliver, 1);
        }
    }
}

/// What the broker knows of an open AMQP connection.
#[derive(Debug)]
pub struct ConnectionInfo {
    pub id: u64,
    /// RabbitMQ-style name: `peer -> local`.
    pub name: String,
    pub peer: SocketAddr,
    pub local: SocketAddr,
    pub user: String,
    pub vhost: String,
    /// ms since the epoch.
    pub connected_at: u64,
    pub client_properties: FieldTable,
    /// The SASL mechanism of the login (AMQP; a Stream connection's is in its
    /// stream stats).
    pub auth_mechanism: String,
    pub frame_max: u32,
    pub channel_max: u16,
    pub heartbeat: u16,
    /// Set on a TLS connection.
    pub tls: Option<TlsInfo>,
    pub channels: AtomicU32,
    /// The open channels by number, with their figures (for the admin API).
    pub open_channels: parking_lot::Mutex<std::collections::BTreeMap<u16, Arc<ChannelStats>>>,
    pub control: Arc<dyn ConnectionControl>,
    /// Its socket's byte and read/write counters.
    pub socket: Arc<SocketStats>,
}

pub use auth::User;

/// Why a login failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginError {
    /// Unknown user or wrong password.
    Refused,
    /// The user may only connect from localhost.
    LoopbackOnly,
}

/// Shared state of one broker instance.
#[derive(Debug)]
pub struct Broker {
    vhosts: RwLock<HashMap<String, Arc<VHost>>>,
    /// Users and permissions.
    pub auth: auth::Auth,
    next_connection_id: AtomicU64,
    connections: RwLock<HashMap<u64, Arc<ConnectionInfo>>>,
    /// Broker-wide message totals.
    pub counters: Counters,
    /// The message and topology store (None: a broker that persists nothing).
    pub store: Option<Store>,
    /// The streams' logs, in `<data_dir>/streams` (None without a store).
    pub streams: Option<crate::storage::stream::StreamStore>,
    /// Resident message bytes in all queues, and the paging limit.
    pub budget: Arc<message::MemoryBudget>,
    /// The resource alarms in effect ([`Alarms`]): this node's and those
    /// of the other running members of its cluster.
    alarm: tokio::sync::watch::Sender<Alarms>,
    /// This node's own alarms, and the other members' (from the cluster's
    /// pings).
    alarms: parking_lot::Mutex<(Alarms, Alarms)>,
    /// The high watermark in bytes (0: no alarm).
    watermark: AtomicU64,
    /// The disk alarm's limit: free bytes on the data directory's file
    /// system below this raise it (0: no alarm).
    disk_limit: AtomicU64,
    /// Free bytes there at the last check (`u64::MAX`: not measured).
    disk_free: AtomicU64,
    /// What each vhost may hold (given to it at creation).
    vhost_limits: crate::config::VHostLimits,
    /// Serialises channel admissions of users with a `max-channels` limit.
    admission: parking_lot::Mutex<()>,
    /// This node's name (`warren@host`, [`Config::node_name`]).
    pub node: String,
    /// Connections and channels opened and closed.
    pub churn: Churn,
    /// Logins tried, per protocol.
    pub auth_attempts: AuthAttempts,
    /// Global runtime parameters (`cluster_name` among them).
    pub global: global::GlobalParameters,
    /// Runtime parameters of vhosts (`shovel` among their components).
    pub parameters: parameters::Parameters,
    /// Where the consumers other nodes opened on queues homed here are, by
    /// the connection id each is attached under here (the cluster layer
    /// adds and removes them with the consumers).
    pub remote_origins: parking_lot::Mutex<HashMap<u64, Arc<remote::ConsumerOrigin>>>,
    /// Queues that deleted themselves (`x-expires`, auto-delete), for the
    /// cluster layer to replicate (recorded only while it watches).
    pub self_deletions: Arc<deleted::SelfDeletions>,
    /// The ticker's wake-up: the vhosts call it when something starts
    /// wanting ticks ([`ticks`]).
    pub ticks: Arc<ticks::Ticks>,
}

impl Broker {
    /// The cluster's name: the `cluster_name` global parameter, else this
    /// node's name.
    pub fn cluster_name(&self) -> String {
        match self.global.get(global::CLUSTER_NAME) {
            Some(serde_json::Value::String(name)) => name,
            _ => self.node.clone(),
        }
    }

    /// Churn since start, as RabbitMQ names it: connections, channels and
    /// queues created, closed, declared, deleted.
    pub fn churn(&self) -> [(&'static str, u64); 7] {
        let c = &self.churn;
        let q = &c.queues;
        let (declared, created, deleted) = (
            Counters::get(&q.declared),
            Counters::get(&q.created),
            Counters::get(&q.deleted),
        );
        [
            ("connection_created", Counters::get(&c.connection_created)),
            ("connection_closed", Counters::get(&c.connection_closed)),
            ("channel_created", Counters::get(&c.channel_created)),
            ("channel_closed", Counters::get(&c.channel_closed)),
            ("queue_declared", declared),
            ("queue_created", created),
            ("queue_deleted", deleted),
        ]
    }

    /// A broker backed by the store in `config.data_dir`, with what it holds
    /// recovered; `now` starts the recovered queues' `x-expires` clocks.
    pub fn open(config: &Config, now: u64) -> Result<Arc<Broker>, StorageError> {
        let options = crate::storage::StoreOptions {
            cache_capacity: config.store_cache_size,
            ..Default::default()
        };
        let store = Store::open_with(&config.data_dir, options)?;
        let streams = crate::storage::stream::StreamStore::open(&config.data_dir.join("streams"))
            .map_err(|e| StorageError::Corrupt {
            path: config.data_dir.join("streams"),
            detail: e.to_string(),
        })?;
        let global = global::GlobalParameters::open(Some(store.clone()))?;
        let parameters =
            parameters::Parameters::open(Some(store.clone()), |c| c != global::COMPONENT)?;
        let broker = Self::build(
            config,
            Some(store.clone()),
            Some(streams),
            global,
            parameters,
        );
        // Policies are loaded with their vhost, before its queues are recovered.
        let recovered = persist::recover(
            &store,
            &|name| {
                let v = broker.add_vhost(name);
                if let Err(e) = v.policies.recover(name) {
                    tracing::error!(vhost = name, error = %e, "cannot load policies");
                }
                if let Err(e) = v.operator_policies.recover(name) {
                    tracing::error!(vhost = name, error = %e, "cannot load operator policies");
                }
                v
            },
            now,
        )?;
        broker.auth.attach(&store)?;
        tracing::info!(
            path = %store.path().display(),
            vhosts = recovered.vhosts,
            exchanges = recovered.exchanges,
            queues = recovered.queues,
            bindings = recovered.bindings,
            messages = recovered.messages,
            delayed = recovered.delayed,
            "recovered from the message store"
        );
        Ok(broker)
    }

    /// A broker that keeps everything in memory only.
    pub fn new(config: &Config) -> Arc<Broker> {
        Self::build(config, None, None, Default::default(), Default::default())
    }

    fn build(
        config: &Config,
        store: Option<Store>,
        streams: Option<crate::storage::stream::StreamStore>,
        global: global::GlobalParameters,
        parameters: parameters::Parameters,
    ) -> Arc<Broker> {
        let broker = Broker {
            store,
            streams,
            budget: message::MemoryBudget::new(config.message_memory_limit as usize),
            alarm: tokio::sync::watch::channel(Alarms::default()).0,
            alarms: parking_lot::Mutex::new(Default::default()),
            watermark: AtomicU64::new(memory::watermark_bytes(config)),
            disk_limit: AtomicU64::new(memory::disk_limit_bytes(config)),
            disk_free: AtomicU64::new(u64::MAX),
            vhosts: RwLock::new(HashMap::new()),
            auth: auth::Auth::default(),
            next_connection_id: AtomicU64::new(1),
            connections: RwLock::new(HashMap::new()),
            counters: Counters::default(),
            vhost_limits: config.vhost_limits(),
            admission: parking_lot::Mutex::new(()),
            node: config.node_name(),
            churn: Churn::default(),
            auth_attempts: AuthAttempts::default(),
            global,
            parameters,
            remote_origins: Default::default(),
            self_deletions: Arc::default(),
            ticks: Arc::default(),
        };
        broker.add_vhost("/");
        broker.auth.put_user(User {
            name: config.default_user.clone(),
            password_hash: auth::hash_password(&config.default_pass),
            tags: vec!["administrator".into()],
            loopback_only: config.default_user_loopback_only,
        });
        if let Ok(all) = auth::Permission::new(".*", ".*", ".*") {
            broker.auth.set_permission("/", &config.default_user, all);
        }
        Arc::new(broker)
    }

    /// The vhost `name`, created (and persisted) if it does not exist.
    pub fn add_vhost(&self, name: &str) -> Arc<VHost> {
        let mut vhosts = self.vhosts.write();
        if let Some(v) = vhosts.get(name) {
            return Arc::clone(v);
        }
        let v = VHost::new(
            name,
            self.store.clone(),
            Arc::clone(&self.budget),
            self.vhost_limits,
        );
        if let Some(streams) = &self.streams {
            v.set_streams(streams.clone());
        }
        v.set_churn(Arc::clone(&self.churn.queues));
        v.set_self_deletions(Arc::clone(&self.self_deletions));
        v.set_ticks(Arc::clone(&self.ticks));
        if name == "/" {
            v.set_meta(vhost::VHostMeta {
                description: "Default virtual host".into(),
                ..Default::default()
            });
        }
        if let Some(store) = &self.store {
            if let Err(e) = persist::save_vhost(store, name, &Default::default(), &v.meta()) {
                tracing::error!(vhost = name, error = %e, "cannot persist vhost");
            }
        }
        vhosts.insert(name.to_string(), Arc::clone(&v));
        v
    }

    /// Delete a vhost: its objects, permissions, and connections (closed with 320).
    /// False if there was no such vhost.
    pub fn delete_vhost(&self, name: &str) -> bool {
        let Some(vhost) = self.vhosts.write().remove(name) else {
            return false;
        };
        self.auth.vhost_deleted(name);
        self.parameters.delete_vhost(name);
        vhost.policies.clear();
        vhost.operator_policies.clear();
        if let Some(store) = &self.store {
            auth::drop_record(store, crate::storage::TopologyKind::VHost, name);
        }
        for e in vhost.exchanges() {
            if !e.name.is_empty() && !e.name.starts_with("amq.") {
                let _ = vhost.delete_exchange(&e.name, false);
            }
        }
        for c in self.connections() {
            if c.vhost == name {
                c.control.force_close(&format!("vhost '{name}' is deleted"));
            }
        }
        for q in vhost.queues() {
            if let Err(e) = vhost.remove_queue(&q) {
                tracing::error!(queue = q.name(), error = %e.text, "cannot delete queue");
            }
        }
        true
    }

    pub fn vhost(&self, name: &str) -> Option<Arc<VHost>> {
        self.vhosts.read().get(name).cloned()
    }

    pub fn vhosts(&self) -> Vec<Arc<VHost>> {
        self.vhosts.read().values().cloned().collect()
    }

    /// Periodic work of every vhost (TTL, queue expiry, delayed messages).
    /// Returns whether anything still wants the ticker's fast period
    /// ([`Broker::wants_ticks`], found on the same walk).
    pub fn tick(&self, now: u64) -> bool {
        let mut wants = false;
        for vhost in self.vhosts() {
            wants |= vhost.tick(now);
        }
        wants
    }

    /// Whether anything wants the ticker's fast period ([`ticks`]): messages
    /// that may expire, timed queues, held delayed messages.
    pub fn wants_ticks(&self) -> bool {
        self.vhosts.read().values().any(|v| v.wants_ticks())
    }

    /// Count on this node's message counters and on `vhost`'s.
    #[inline]
    pub fn count(&self, vhost: &VHost, f: impl Fn(&Counters)) {
        f(&self.counters);
        f(&vhost.counters);
    }

    /// Whether this node's memory alarm is on.
    pub fn memory_alarm(&self) -> bool {
        self.alarms.lock().0.memory
    }

    /// Whether this node's disk alarm is on.
    pub fn disk_alarm(&self) -> bool {
        self.alarms.lock().0.disk
    }

    /// This node's own alarms.
    pub fn alarms(&self) -> Alarms {
        self.alarms.lock().0
    }

    /// The alarms that block this node's publishers: its own and the other
    /// running members'.
    pub fn alarms_in_effect(&self) -> Alarms {
        *self.alarm.borrow()
    }

    /// Follow the alarms in effect (connections block publishers while any
    /// is on).
    pub fn watch_alarm(&self) -> tokio::sync::watch::Receiver<Alarms> {
        self.alarm.subscribe()
    }

    /// Set one of this node's alarms on or off, logging the change with the
    /// measure that made it (`value` against `limit`).
    fn set_alarm(
        &self,
        which: fn(&mut Alarms) -> &mut bool,
        on: bool,
        what: &str,
        (value, limit): (u64, u64),
    ) {
        let mut alarms = self.alarms.lock();
        let flag = which(&mut alarms.0);
        if *flag == on {
            return;
        }
        *flag = on;
        if on {
            tracing::warn!(value, limit, "{what} alarm set: blocking publishers");
        } else {
            tracing::info!(value, limit, "{what} alarm cleared");
        }
        self.publish_alarms(&alarms);
    }

    /// Tell the connections the alarms now in effect (this node's and the
    /// other members').
    fn publish_alarms(&self, (local, remote): &(Alarms, Alarms)) {
        let effective = local.or(*remote);
        self.alarm
            .send_if_modified(|cur| std::mem::replace(cur, effective) != effective);
    }

    /// The other running members' alarms, together (from the cluster's
    /// pings; none when the node is alone).
    pub fn set_remote_alarms(&self, remote: Alarms) {
        let mut alarms = self.alarms.lock();
        if alarms.1 == remote {
            return;
        }
        if remote != Alarms::default() {
            tracing::warn!(resources = ?remote.resources(), "resource alarm on another cluster member: blocking publishers");
        } else {
            tracing::info!("no resource alarm on the other cluster members");
        }
        alarms.1 = remote;
        self.publish_alarms(&alarms);
    }

    /// The disk alarm's limit in bytes of free space (0: none).
    pub fn disk_free_limit(&self) -> u64 {
        self.disk_limit.load(Ordering::Relaxed)
    }

    /// A new disk limit (RabbitMQ's `rabbitmqctl set_disk_free_limit`),
    /// checked at once against the last free space measured.
    pub fn set_disk_free_limit(&self, bytes: u64) {
        self.disk_limit.store(bytes, Ordering::Relaxed);
        let free = self.disk_free.load(Ordering::Relaxed);
        self.check_disk((free != u64::MAX).then_some(free));
    }

    /// Free bytes on the data directory's file system at the last check.
    pub fn disk_free(&self) -> Option<u64> {
        let free = self.disk_free.load(Ordering::Relaxed);
        (free != u64::MAX).then_some(free)
    }

    /// The data directory's file system has `free` bytes free (None: not
    /// known): below the limit the disk alarm goes on, at or above it off
    /// (RabbitMQ's `disk_free_limit`).
    pub fn check_disk(&self, free: Option<u64>) {
        self.disk_free
            .store(free.unwrap_or(u64::MAX), Ordering::Relaxed);
        let limit = self.disk_free_limit();
        let on = free.is_some_and(|f| f < limit);
        self.set_alarm(|a| &mut a.disk, on, "disk", (free.unwrap_or(0), limit));
    }

    /// The memory high watermark in bytes (0: none).
    pub fn memory_watermark(&self) -> u64 {
        self.watermark.load(Ordering::Relaxed)
    }

    pub fn set_memory_watermark(&self, bytes: u64) {
        self.watermark.store(bytes, Ordering::Relaxed);
    }

    /// Compare the process's memory with the watermark and raise or clear the alarm.
    pub fn check_memory(&self) {
        let limit = self.memory_watermark();
        let rss = memory::resident_bytes();
        let on = limit != 0 && rss > limit;
        self.set_alarm(|a| &mut a.memory, on, "memory", (rss, limit));
    }

    /// A fresh id for a connection (used for exclusive ownership and consumers).
    pub fn next_connection_id(&self) -> u64 {
        self.next_connection_id.fetch_add(1, Ordering::Relaxed)
    }

    pub fn register_connection(&self, info: Arc<ConnectionInfo>) {
        self.connections.write().insert(info.id, info);
    }

    /// connection.open: register the connection unless its vhost's or user's
    /// `max-connections` is reached (530 with RabbitMQ's text). The count and the
    /// registration happen under one lock.
    pub fn admit_connection(&self, info: Arc<ConnectionInfo>) -> crate::error::AmqpResult<()> {
        let vhost_max = self
            .vhost(&info.vhost)
            .and_then(|v| v.limit_values.active("max-connections"));
        let user_max = limits::active(&self.auth.user_limits(&info.user), "max-connections");
        let mut connections = self.connections.write();
        if let Some(max) = vhost_max {
            if connections
                .values()
                .filter(|c| c.vhost == info.vhost)
                .count()
                >= max
            {
                return Err(limits::vhost_connections_reached(
                    &info.vhost,
                    &info.user,
                    max,
                ));
            }
        }
        if let Some(max) = user_max {
            if connections.values().filter(|c| c.user == info.user).count() >= max {
                return Err(limits::user_connections_reached(&info.user, max));
            }
        }
        connections.insert(info.id, info);
        Counters::add(&self.churn.connection_created, 1);
        Ok(())
    }

    /// channel.open on connection `id`: counted, unless the user's
    /// `max-channels` is reached (530, which closes the connection, as in
    /// RabbitMQ).
    pub fn admit_channel(&self, id: u64, channel: u16) -> crate::error::AmqpResult<()> {
        let connections = self.connections.read();
        let Some(c) = connections.get(&id) else {
            return Ok(());
        };
        let max = limits::active(&self.auth.user_limits(&c.user), "max-channels");
        let _serial = max.map(|_| self.admission.lock());
        if let Some(max) = max {
            let used: usize = connections
                .values()
                .filter(|o| o.user == c.user)
                .map(|o| o.channels.load(Ordering::Relaxed) as usize)
                .sum();
            if used >= max {
                return Err(limits::user_channels_reached(&c.user, max));
            }
        }
        if let std::collections::btree_map::Entry::Vacant(e) = c.open_channels.lock().entry(channel)
        {
            e.insert(Arc::default());
            c.channels.fetch_add(1, Ordering::Relaxed);
            Counters::add(&self.churn.channel_created, 1);
        }
        Ok(())
    }

    /// Change the limits of `vhost` with `f` (stored first; 541 if that fails).
    /// The limits before, or None if there is no such vhost.
    pub fn change_vhost_limits(
        &self,
        vhost: &str,
        f: impl FnOnce(&mut limits::LimitMap),
    ) -> crate::error::AmqpResult<Option<limits::LimitMap>> {
        let Some(v) = self.vhost(vhost) else {
            return Ok(None);
        };
        v.limit_values
            .change(f, |next| match &self.store {
                Some(store) => persist::save_vhost(store, vhost, next, &v.meta()).map_err(|e| {
                    crate::error::AmqpError::internal_error(format!("cannot store limits: {e}"))
                }),
                None => Ok(()),
            })
            .map(Some)
    }

    /// Replace the metadata of `vhost` (stored first; 541 if that fails).
    /// False if there is no such vhost.
    pub fn set_vhost_meta(
        &self,
        vhost: &str,
        meta: vhost::VHostMeta,
    ) -> crate::error::AmqpResult<bool> {
        let Some(v) = self.vhost(vhost) else {
            return Ok(false);
        };
        if let Some(store) = &self.store {
            persist::save_vhost(store, vhost, &v.limit_values.all(), &meta).map_err(|e| {
                crate::error::AmqpError::internal_error(format!("cannot store vhost: {e}"))
            })?;
        }
        v.set_meta(meta);
        Ok(true)
    }

    pub fn unregister_connection(&self, id: u64) {
        let gone = self.connections.write().remove(&id);
        if let Some(c) = gone {
            Counters::add(&self.churn.connection_closed, 1);
            if let Some(v) = self.vhost(&c.vhost) {
                let (recv, send) = c.socket.octets();
                Counters::add(&v.closed_octets.0, recv);
                Counters::add(&v.closed_octets.1, send);
            }
            // Its channels end with it.
            let open = c.open_channels.lock().len() as u64;
            Counters::add(&self.churn.channel_closed, open);
        }
    }

    /// A channel was opened on connection `id` (counted for the admin API).
    /// The figures the admin API shows for it (None: no such connection).
    pub fn channel_opened(&self, id: u64, channel: u16) -> Option<Arc<ChannelStats>> {
        let connections = self.connections.read();
        let c = connections.get(&id)?;
        let mut open = c.open_channels.lock();
        let stats = open.entry(channel).or_insert_with(|| {
            c.channels.fetch_add(1, Ordering::Relaxed);
            Counters::add(&self.churn.channel_created, 1);
            Arc::default()
        });
        Some(Arc::clone(stats))
    }

    /// A channel of connection `id` was closed.
    pub fn channel_closed(&self, id: u64, channel: u16) {
        if let Some(c) = self.connections.read().get(&id) {
            if c.open_channels.lock().remove(&channel).is_some() {
                c.channels.fetch_sub(1, Ordering::Relaxed);
                Counters::add(&self.churn.channel_closed, 1);
            }
        }
    }

    /// The string client property `name` of connection `id` (e.g. `client_id`).
    pub fn client_property(&self, id: u64, name: &str) -> Option<String> {
        let connections = self.connections.read();
        let value = connections.get(&id)?.client_properties.get(name)?;
        value.as_str().map(String::from)
    }

    pub fn connections(&self) -> Vec<Arc<ConnectionInfo>> {
        self.connections.read().values().cloned().collect()
    }

    /// The connection with id `id`, if open.
    pub fn connection(&self, id: u64) -> Option<Arc<ConnectionInfo>> {
        self.connections.read().get(&id).cloned()
    }

    /// Close the connection named `name` (or with id `id`); false if unknown.
    pub fn close_connection(&self, name: &str, reason: &str) -> bool {
        let found = self
            .connections
            .read()
            .values()
            .find(|c| c.name == name)
            .cloned();
        match found {
            Some(c) => {
                c.control.force_close(reason);
                true
            }
            None => false,
        }
    }

    /// Close every connection (shutdown).
    pub fn close_all_connections(&self, reason: &str) {
        for c in self.connections() {
            c.control.force_close(reason);
        }
    }

    /// Check a user's password; `from_loopback` says whether the peer is local.
    pub fn authenticate(
        &self,
        user: &str,
        password: &str,
        from_loopback: bool,
    ) -> Result<User, LoginError> {
        let u = self
            .auth
            .check_password(user, password)
            .ok_or(LoginError::Refused)?;
        if u.loopback_only && !from_loopback {
            return Err(LoginError::LoopbackOnly);
        }
        Ok(u)
    }

    /// SASL EXTERNAL: the name came from a verified client certificate; the
    /// user must exist (with or without a password).
    pub fn authenticate_external(
        &self,
        user: &str,
        from_loopback: bool,
    ) -> Result<User, LoginError> {
        let u = self.auth.user(user).ok_or(LoginError::Refused)?;
        if u.loopback_only && !from_loopback {
            return Err(LoginError::LoopbackOnly);
        }
        Ok(u)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_stats_count_bytes_and_calls() {
        let s = SocketStats::new();
        s.received(100);
        s.received(28);
        s.sent(7);
        assert_eq!(s.octets(), (128, 7));
        assert_eq!(s.recv_cnt.load(Ordering::Relaxed), 2);
        assert_eq!(s.send_cnt.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn the_disk_alarm_follows_free_space_against_its_limit() {
        let b = Broker::new(&crate::config::Config {
            disk_free_limit: 1000,
            ..Default::default()
        });
        let mut seen = b.watch_alarm();
        b.check_disk(Some(1000));
        assert!(!b.disk_alarm(), "at the limit: no alarm");
        b.check_disk(Some(999));
        assert!(b.disk_alarm());
        assert!(seen.has_changed().unwrap_or(false));
        assert_eq!(
            seen.borrow_and_update().blocked_reason(),
            Some("low on disk")
        );
        assert!(!b.memory_alarm());
        // Not measured: no alarm; a new limit is checked against the last
        // measure at once.
        b.check_disk(None);
        assert!(!b.disk_alarm());
        assert_eq!(b.disk_free(), None);
        b.check_disk(Some(5000));
        b.set_disk_free_limit(6000);
        assert!(b.disk_alarm());
        b.set_disk_free_limit(0);
        assert!(!b.disk_alarm(), "0: no alarm");
        let both = Alarms {
            memory: true,
            disk: true,
        };
        assert_eq!(both.resources(), vec!["memory", "disk"]);
        assert_eq!(both.blocked_reason(), Some("low on memory & low on disk"));
        assert_eq!(Alarms::default().blocked_reason(), None);
    }
}

#[cfg(test)]
mod ticks_tests {
    use super::*;
    use crate::broker::vhost::{ExchangeDeclare, QueueDeclare};
    use crate::wire::{BasicProperties, FieldTable, FieldValue};
    use futures::FutureExt;

    /// Whether the ticker was told (consumes the wake-up).
    fn told(b: &Broker) -> bool {
        b.ticks.wanted().now_or_never().is_some()
    }

    fn publish(v: &VHost, exchange: &str, key: &str, props: BasicProperties) {
        let m = message::Message::new(exchange, key, props, bytes::Bytes::from_static(b"x"));
        v.publish(exchange, &m, vhost::PublishFrom::Client, 0)
            .expect("publish");
    }

    #[test]
    fn an_idle_broker_wants_no_ticks_and_what_may_expire_wakes_the_ticker() {
        let b = Broker::new(&crate::config::Config::default());
        let v = b.add_vhost("/");
        let plain = QueueDeclare {
            name: "plain".into(),
            ..Default::default()
        };
        v.declare_queue(&plain, 0, 0).expect("queue");
        publish(&v, "", "plain", BasicProperties::default());
        assert!(!b.wants_ticks(), "no expiry anywhere: the slow period");
        assert!(!told(&b));
        assert_eq!(v.purge_queue("plain", 0), Ok(1));

        // A message with a TTL: the queue may expire it.
        let expiring = BasicProperties {
            expiration: Some("100".into()),
            ..Default::default()
        };
        publish(&v, "", "plain", expiring.clone());
        assert!(b.wants_ticks());
        assert!(
            told(&b),
            "the first message that may expire wakes the ticker"
        );
        publish(&v, "", "plain", expiring);
        assert!(!told(&b), "told once, not per message");
        publish(&v, "", "plain", BasicProperties::default());
        assert!(b.tick(50), "not due yet");
        assert!(b.wants_ticks());
        assert!(b.tick(100), "a message is left");
        let q = v.queue("plain", 0).expect("queue");
        assert_eq!(
            q.stats(100).ready,
            1,
            "the two expired, the plain one stays"
        );
        // Messages are left: the queue still looks at its head.
        assert!(b.wants_ticks());
        assert_eq!(q.purge(), 1);
        assert!(!b.tick(120), "an empty queue has nothing to expire");
        assert!(!b.wants_ticks());

        // A queue that may expire itself wants ticks from its declaration.
        let args = FieldTable(vec![("x-expires".to_string(), FieldValue::I32(1000))]);
        let timed = QueueDeclare {
            name: "timed".into(),
            arguments: args,
            ..Default::default()
        };
        v.declare_queue(&timed, 0, 0).expect("queue");
        assert!(b.wants_ticks());
        assert!(told(&b));
        v.delete_queue("timed", false, false, 0, 0).expect("delete");
        assert!(!b.wants_ticks());

        // A delayed exchange holding a message.
        let ex = ExchangeDeclare {
            name: "later".into(),
            kind: "x-delayed-message".into(),
            arguments: FieldTable(vec![(
                "x-delayed-type".to_string(),
                FieldValue::string("direct"),
            )]),
            ..Default::default()
        };
        v.declare_exchange(&ex).expect("exchange");
        let delayed = BasicProperties {
            headers: Some(FieldTable(vec![(
                "x-delay".to_string(),
                FieldValue::I32(500),
            )])),
            ..Default::default()
        };
        publish(&v, "later", "plain", delayed);
        assert!(b.wants_ticks());
        assert!(told(&b));
        assert!(!b.tick(600), "released");
        assert!(!b.wants_ticks());
    }
}

#[cfg(test)]
mod auth_attempt_tests {
    use super::*;

    #[test]
    fn sources_are_counted_and_bounded_dropping_the_first_seen() {
        let a = AuthAttempts::default();
        let ip: std::net::IpAddr = "::ffff:10.0.0.1".parse().expect("ip");
        a.record(AuthProtocol::Amqp091, true, Some(ip), "u");
        a.record(AuthProtocol::Amqp091, false, Some(ip), "u");
        a.record(AuthProtocol::Http, false, None, "u");
        let got = a.sources();
        assert_eq!(
            got,
            vec![(
                ("10.0.0.1".into(), "u".into(), AuthProtocol::Amqp091),
                (1, 1)
            )]
        );
        assert_eq!(a.get(AuthProtocol::Http), (0, 1));
        for i in 0..MAX_AUTH_SOURCES {
            a.record(AuthProtocol::Stream, true, Some(ip), &format!("n{i}"));
        }
        let got = a.sources();
        assert_eq!(got.len(), MAX_AUTH_SOURCES);
        assert_eq!(got[0].0 .1, "n0", "the first seen went");
        assert_eq!(
            got[MAX_AUTH_SOURCES - 1].0 .1,
            format!("n{}", MAX_AUTH_SOURCES - 1)
        );
    }
}
