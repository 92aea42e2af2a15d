//! A warren cluster node as a child process for the cluster test files: its
//! own address on 127.0.0.n, free AMQP, admin and inter-node ports, a data
//! directory of its own, optional `[cluster.tls]` and `[cluster] dial`
//! overrides, its log in a file; started, stopped (SIGTERM), killed (SIGKILL),
//! and asked over AMQP, the admin API and the CLI; helpers that poll with
//! deadlines for what another process makes true.
#![allow(dead_code)]

use lapin::options::*;
use lapin::publisher_confirm::Confirmation;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const COOKIE: &str = "cluster-test-cookie";

pub use super::free_port;

/// `[cluster.tls]` files of one node.
#[derive(Debug, Clone)]
pub struct NodeTls {
    pub certfile: PathBuf,
    pub keyfile: PathBuf,
    pub cacertfile: PathBuf,
}

/// One warren process of a test cluster.
pub struct Node {
    pub ip: String,
    pub dir: PathBuf,
    pub amqp: u16,
    pub admin: u16,
    pub cluster: u16,
    pub seeds: Vec<String>,
    pub cookie: String,
    pub tls: Option<NodeTls>,
    /// `[cluster] dial`: node name -> address.
    pub dial: Vec<(String, String)>,
    pub commit_timeout_ms: u64,
    /// The Stream protocol port, when the node listens for it (off by default).
    pub stream: Option<u16>,
    /// More top-level configuration lines (`key = value`).
    pub extra: String,
    pub child: Option<Child>,
}

impl Node {
    pub fn new(n: u8, tag: &str) -> Node {
        let ip = format!("127.0.0.{n}");
        let dir = std::env::temp_dir().join(super::uniq(&format!("warren-cluster-{tag}-{n}")));
        let _ = std::fs::remove_dir_all(&dir);
        Node {
            amqp: free_port(&ip),
            admin: free_port(&ip),
            cluster: free_port(&ip),
            ip,
            dir,
            seeds: Vec::new(),
            cookie: COOKIE.into(),
            tls: None,
            dial: Vec::new(),
            commit_timeout_ms: 3000,
            stream: None,
            extra: String::new(),
            child: None,
        }
    }

    pub fn name(&self) -> String {
        format!("warren@{}", self.ip)
    }

    /// `warren@ip:port`, as a seed.
    pub fn seed(&self) -> String {
        format!("warren@{}:{}", self.ip, self.cluster)
    }

    /// The inter-node address the membership records.
    pub fn cluster_addr(&self) -> String {
        format!("{}:{}", self.ip, self.cluster)
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("warren.log")
    }

    /// What the node logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    fn config(&self) -> PathBuf {
        let seeds: Vec<String> = self.seeds.iter().map(|s| format!("\"{s}\"")).collect();
        let dial: Vec<String> = self
            .dial
            .iter()
            .map(|(k, v)| format!("\"{k}\" = \"{v}\""))
            .collect();
        let mut text = format!(
            "bind = \"{ip}\"\namqp_port = {amqp}\nadmin_port = {admin}\ndata_dir = \"{dir}\"\n\
             log = \"warn,warren::cluster::quorum=info\"\n{extra}\n[stream.listeners]\ntcp = {stream}\n\n[cluster]\n\
             node_name = \"warren@{ip}\"\nlisten = \"{ip}:{cluster}\"\ncookie = \"{cookie}\"\n\
             seeds = [{seeds}]\ncommit_timeout_ms = {timeout}\nheartbeat_ms = 50\n\
             dial = {{ {dial} }}\n",
            ip = self.ip,
            amqp = self.amqp,
            admin = self.admin,
            dir = self.dir.display(),
            cluster = self.cluster,
            cookie = self.cookie,
            seeds = seeds.join(", "),
            timeout = self.commit_timeout_ms,
            dial = dial.join(", "),
            extra = self.extra,
            stream = match self.stream {
                Some(port) => format!("{{ default = {port} }}"),
                None => "\"none\"".to_string(),
            },
        );
        if let Some(tls) = &self.tls {
            text.push_str(&format!(
                "\n[cluster.tls]\ncertfile = \"{}\"\nkeyfile = \"{}\"\ncacertfile = \"{}\"\n",
                tls.certfile.display(),
                tls.keyfile.display(),
                tls.cacertfile.display()
            ));
        }
        std::fs::create_dir_all(&self.dir).expect("data dir");
        let path = self.dir.join("warren.toml");
        std::fs::write(&path, text).expect("config");
        path
    }

    /// Start the process and wait until it takes AMQP connections.
    pub async fn start(&mut self) {
        let config = self.config();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_warren"))
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::from(log))
            .spawn()
            .expect("spawn warren");
        self.child = Some(child);
        for _ in 0..400 {
            if tokio::net::TcpStream::connect((self.ip.as_str(), self.amqp))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "warren did not start on {}:{}; log:\n{}",
            self.ip,
            self.amqp,
            self.log()
        );
    }

    /// SIGTERM, and wait for a clean exit (status 0: it shut down, it was
    /// not killed by the signal).
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        match super::process::terminate(&mut child) {
            Some(status) => assert!(
                status.success(),
                "{} did not shut down cleanly on SIGTERM: {status}; log:\n{}",
                self.ip,
                self.log()
            ),
            None => panic!(
                "{} did not stop within 10 s of SIGTERM; log:\n{}",
                self.ip,
                self.log()
            ),
        }
    }

    /// Listen for the Stream protocol on a free port.
    pub fn with_stream(mut self) -> Node {
        self.stream = Some(free_port(&self.ip));
        self
    }

    /// kill -9 (SIGKILL): no shutdown of any kind, no goodbye to anyone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub async fn connect(&self) -> Connection {
        let uri = format!("amqp://guest:guest@{}:{}/%2f", self.ip, self.amqp);
        super::t(Connection::connect(&uri, ConnectionProperties::default()))
            .await
            .expect("connect")
    }

    /// Start with another cookie than the cluster's.
    pub async fn start_with_cookie(&mut self, cookie: &str) {
        self.cookie = cookie.into();
        self.start().await
    }

    pub fn url(&self) -> String {
        format!("http://{}:{}", self.ip, self.admin)
    }

    /// GET on the admin API: (status, JSON body); (0, Null) when unreachable.
    pub fn get(&self, path: &str) -> (u16, Value) {
        let r = ureq::get(&format!("{}{path}", self.url()))
            .set("Authorization", "Basic Z3Vlc3Q6Z3Vlc3Q=")
            .timeout(Duration::from_secs(5))
            .call();
        match r {
            Ok(r) => (r.status(), r.into_json().unwrap_or(Value::Null)),
            Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or(Value::Null)),
            Err(_) => (0, Value::Null),
        }
    }

    /// PUT on the admin API: the status.
    pub fn put(&self, path: &str, body: Value) -> u16 {
        self.send("PUT", path, Some(body))
    }

    /// `method` on the admin API, with a JSON body or none: the status.
    pub fn send(&self, method: &str, path: &str, body: Option<Value>) -> u16 {
        let req = ureq::request(method, &format!("{}{path}", self.url()))
            .set("Authorization", "Basic Z3Vlc3Q6Z3Vlc3Q=")
            .timeout(Duration::from_secs(15));
        let r = match body {
            Some(b) => req.send_json(b),
            None => req.call(),
        };
        match r {
            Ok(r) => r.status(),
            Err(ureq::Error::Status(code, _)) => code,
            Err(_) => 0,
        }
    }

    /// `warren <args>` (the CLI) against this node's admin API: (ok, stdout + stderr).
    pub fn ctl(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_warren"))
            .arg("--url")
            .arg(self.url())
            .args(args)
            .output()
            .expect("run warren cli");
        let mut text = String::from_utf8_lossy(&out.stdout).to_string();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        (out.status.success(), text)
    }

    /// The members this node's `/api/nodes` lists as running.
    pub fn running(&self) -> Vec<String> {
        let (_, nodes) = self.get("/api/nodes");
        nodes
            .as_array()
            .into_iter()
            .flatten()
            .filter(|n| n["running"] == Value::Bool(true))
            .filter_map(|n| n["name"].as_str().map(String::from))
            .collect()
    }

    /// `/api/nodes`' member count.
    pub fn members(&self) -> usize {
        self.get("/api/nodes").1.as_array().map_or(0, Vec::len)
    }

    /// The metadata leader this node knows of, if any.
    pub fn leader(&self) -> Option<String> {
        self.get("/api/cluster").1["leader"]
            .as_str()
            .map(String::from)
    }

    /// This node's Raft state (`Leader`, `Follower`, `Candidate`, ...).
    pub fn raft_state(&self) -> String {
        self.get("/api/cluster").1["raft"]["state"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // On a failure (or with WARREN_TEST_LOGS set), what the node logged.
        if std::thread::panicking() || std::env::var_os("WARREN_TEST_LOGS").is_some() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(60)..].join("\n");
            eprintln!("--- last lines of {}'s log ---\n{tail}", self.name());
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Poll `check` until it holds (at most `within`).
pub async fn eventually(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Declare the durable fanout exchange `x` on `node`: Ok when answered
/// `-ok`, Err with the reply code (or 0 for no answer within `within`).
pub async fn declare(node: &Node, x: &str, within: Duration) -> Result<(), u16> {
    let uri = format!("amqp://guest:guest@{}:{}/%2f", node.ip, node.amqp);
    let attempt = async {
        let conn = Connection::connect(&uri, ConnectionProperties::default())
            .await
            .map_err(|e| super::code(&e).unwrap_or(0))?;
        let ch = conn
            .create_channel()
            .await
            .map_err(|e| super::code(&e).unwrap_or(0))?;
        let opts = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
        let r = ch
            .exchange_declare(x, ExchangeKind::Fanout, opts, FieldTable::default())
            .await
            .map_err(|e| super::code(&e).unwrap_or(0));
        let _ = conn.close(200, "bye").await;
        r
    };
    match tokio::time::timeout(within, attempt).await {
        Ok(r) => r,
        Err(_) => Err(0),
    }
}

/// Which of `names` a passive declare finds on `node` (one connection).
pub async fn passive_present(node: &Node, names: &[String]) -> Vec<String> {
    let mut present = Vec::new();
    let conn = node.connect().await;
    let mut ch = super::t(conn.create_channel()).await.expect("channel");
    let passive = ExchangeDeclareOptions {
        passive: true,
        ..Default::default()
    };
    for x in names {
        let r =
            super::t(ch.exchange_declare(x, ExchangeKind::Fanout, passive, FieldTable::default()))
                .await;
        match r {
            Ok(()) => present.push(x.clone()),
            // 404 closes the channel: open another for the next name.
            Err(_) => ch = super::t(conn.create_channel()).await.expect("channel"),
        }
    }
    let _ = conn.close(200, "bye").await;
    present
}

/// Wait until every one of `names` exists on `node` (passive declares).
pub async fn wait_all_present(node: &Node, names: &[String], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let present = passive_present(node, names).await;
        if present.len() == names.len() {
            return;
        }
        let missing: Vec<&String> = names.iter().filter(|n| !present.contains(n)).collect();
        assert!(
            Instant::now() < deadline,
            "{} of {} acknowledged declares missing on {}: {missing:?}",
            missing.len(),
            names.len(),
            node.name()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether a passive declare of exchange `x` and queue `q` succeeds on `node`.
pub async fn passive_ok(node: &Node, x: &str, q: &str) -> bool {
    let conn = node.connect().await;
    let ch = super::t(conn.create_channel()).await.expect("channel");
    let passive = ExchangeDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let ex = super::t(ch.exchange_declare(x, ExchangeKind::Direct, passive, FieldTable::default()))
        .await
        .is_ok();
    let ok = ex
        && super::t(ch.queue_declare(
            q,
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ))
        .await
        .is_ok();
    let _ = conn.close(200, "bye").await;
    ok
}

pub async fn wait_passive(node: &Node, x: &str, q: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !passive_ok(node, x, q).await {
        assert!(
            Instant::now() < deadline,
            "{x} / {q} not visible on {}",
            node.name()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn has_binding(node: &Node, x: &str, q: &str, key: &str) -> bool {
    let (status, list) = node.get(&format!("/api/exchanges/%2F/{x}/bindings/source"));
    status == 200
        && list
            .as_array()
            .into_iter()
            .flatten()
            .any(|b| b["destination"].as_str() == Some(q) && b["routing_key"].as_str() == Some(key))
}

pub async fn declare_and_bind(node: &Node, x: &str, q: &str, key: &str) {
    let conn = node.connect().await;
    let ch = super::t(conn.create_channel()).await.expect("channel");
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    super::t(ch.exchange_declare(x, ExchangeKind::Direct, durable, FieldTable::default()))
        .await
        .expect("exchange.declare");
    let qd = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    super::t(ch.queue_declare(q, qd, FieldTable::default()))
        .await
        .expect("queue.declare");
    super::t(ch.queue_bind(
        q,
        x,
        key,
        QueueBindOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("queue.bind");
    let _ = conn.close(200, "bye").await;
}

/// Three nodes on 127.0.0.1, .2 and .3 (B seeded with A, C with A and B),
/// started, and running as members in every node's view.
pub async fn three_nodes(tag: &str) -> (Node, Node, Node) {
    three_nodes_with(tag, Node::new(1, tag).commit_timeout_ms).await
}

/// [`three_nodes`] with a commit timeout of `commit_timeout_ms`.
pub async fn three_nodes_with(tag: &str, commit_timeout_ms: u64) -> (Node, Node, Node) {
    let [mut a, mut b, mut c] = [1, 2, 3].map(|i| {
        let mut n = Node::new(i, tag);
        n.commit_timeout_ms = commit_timeout_ms;
        n
    });
    b.seeds = vec![a.seed()];
    c.seeds = vec![a.seed(), b.seed()];
    a.start().await;
    b.start().await;
    c.start().await;
    wait_all_running(&[&a, &b, &c]).await;
    (a, b, c)
}

/// Wait (at most 30 s) until every one of `nodes` sees all of them running.
pub async fn wait_all_running(nodes: &[&Node]) {
    let all: Vec<String> = nodes.iter().map(|n| n.name()).collect();
    eventually(
        "every member running in every node's view",
        Duration::from_secs(30),
        || {
            nodes.iter().all(|n| {
                let r = n.running();
                all.iter().all(|m| r.contains(m))
            })
        },
    )
    .await;
}

/// Three nodes that reach each other only through a test-owned proxy per
/// directed pair (`[cluster] dial` overrides; key `(from, to)`), each with
/// `commit_timeout_ms`, started (B and C seeded with A). Not yet waited on.
pub async fn start_proxied(
    tag: &str,
    commit_timeout_ms: u64,
) -> (
    Vec<Node>,
    std::collections::BTreeMap<(usize, usize), super::proxy::Proxy>,
) {
    start_proxied_with(tag, commit_timeout_ms, false).await
}

/// [`start_proxied`], the nodes with Stream listeners when `stream`.
pub async fn start_proxied_with(
    tag: &str,
    commit_timeout_ms: u64,
    stream: bool,
) -> (
    Vec<Node>,
    std::collections::BTreeMap<(usize, usize), super::proxy::Proxy>,
) {
    let mut nodes: Vec<Node> = (1..=3)
        .map(|n| {
            let node = Node::new(n, tag);
            if stream {
                node.with_stream()
            } else {
                node
            }
        })
        .collect();
    for n in nodes.iter_mut() {
        n.commit_timeout_ms = commit_timeout_ms;
    }
    let mut proxies = std::collections::BTreeMap::new();
    for i in 0..3 {
        for j in 0..3 {
            if i != j {
                let p = super::proxy::Proxy::start(&nodes[j].cluster_addr());
                let to = (nodes[j].name(), p.addr.to_string());
                nodes[i].dial.push(to);
                proxies.insert((i, j), p);
            }
        }
    }
    let seed = nodes[0].seed();
    nodes[1].seeds = vec![seed.clone()];
    nodes[2].seeds = vec![seed];
    for n in nodes.iter_mut() {
        n.start().await;
    }
    (nodes, proxies)
}

/// Two nodes on 127.0.0.1 and .2 with Stream protocol listeners (B seeded
/// with A), started, and both running in B's view.
pub async fn two_stream_nodes(tag: &str) -> (Node, Node) {
    let mut a = Node::new(1, tag).with_stream();
    let mut b = Node::new(2, tag).with_stream();
    b.seeds = vec![a.seed()];
    a.start().await;
    b.start().await;
    let all = [a.name(), b.name()];
    eventually("two running members", Duration::from_secs(20), || {
        let r = b.running();
        all.iter().all(|n| r.contains(n))
    })
    .await;
    (a, b)
}

/// Publish `body` persistent to `q` on `ch`: its confirm, to wait on.
pub async fn publish_persistent(
    ch: &Channel,
    q: &str,
    body: &str,
) -> lapin::publisher_confirm::PublisherConfirm {
    super::t(ch.basic_publish(
        "",
        q,
        BasicPublishOptions::default(),
        body.as_bytes(),
        BasicProperties::default().with_delivery_mode(2),
    ))
    .await
    .expect("publish")
}

/// Publish `bodies` persistent to `q` with confirms on `ch`: (acked, nacked).
pub async fn publish_confirmed(ch: &Channel, q: &str, bodies: &[String]) -> (usize, usize) {
    let mut waits = Vec::new();
    for body in bodies {
        waits.push(publish_persistent(ch, q, body).await);
    }
    let (mut acked, mut nacked) = (0, 0);
    for w in waits {
        match super::t(w).await.expect("confirm") {
            Confirmation::Ack(_) => acked += 1,
            Confirmation::Nack(_) => nacked += 1,
            Confirmation::NotRequested => panic!("confirms not on"),
        }
    }
    (acked, nacked)
}

/// `n` message bodies: `tag-0`, `tag-1`, ...
pub fn bodies(tag: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{tag}-{i}")).collect()
}

/// Declare the durable quorum queue `q` (`x-queue-type: quorum`) on `node`.
pub async fn declare_quorum_queue(node: &Node, q: &str) {
    declare_quorum_sized(node, q, None).await;
}

/// Declare the durable quorum queue `q` on `node`, with
/// `x-quorum-initial-group-size` when `size` is given.
pub async fn declare_quorum_sized(node: &Node, q: &str, size: Option<i32>) {
    let size = size.map(|n| {
        (
            "x-quorum-initial-group-size",
            lapin::types::AMQPValue::LongInt(n),
        )
    });
    declare_quorum_with(node, q, size.as_slice()).await;
}

/// Declare the durable quorum queue `q` on `node`, with the arguments
/// `more` besides `x-queue-type`.
pub async fn declare_quorum_with(node: &Node, q: &str, more: &[(&str, lapin::types::AMQPValue)]) {
    use lapin::types::AMQPValue;
    let conn = node.connect().await;
    let ch = super::t(conn.create_channel()).await.expect("channel");
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    for (k, v) in more {
        args.insert((*k).into(), v.clone());
    }
    let qd = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    super::t(ch.queue_declare(q, qd, args))
        .await
        .expect("queue.declare (quorum)");
    let _ = conn.close(200, "bye").await;
}

/// Where the node named `name` is in `nodes`.
pub fn node_index(nodes: &[Node], name: &str) -> usize {
    nodes
        .iter()
        .position(|n| n.name() == name)
        .unwrap_or_else(|| panic!("no node named {name}"))
}

/// The leader of quorum queue `q` (vhost `/`) as `node`'s `/api/queues`
/// names it (the metadata's last announcement), if any.
pub fn quorum_leader(node: &Node, q: &str) -> Option<String> {
    node.get(&format!("/api/queues/%2F/{q}")).1["leader"]
        .as_str()
        .map(String::from)
}
