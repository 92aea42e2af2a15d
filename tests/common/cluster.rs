//! The multi-process cluster harness: warren processes on 127.0.0.1, .2, .3
//! with their own AMQP, admin and cluster ports (free ones), a shared cookie,
//! `heartbeat_ms = 50` and `commit_timeout_ms = 3000`.

use lapin::{Connection, ConnectionProperties};
use serde_json::Value;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const COOKIE: &str = "cluster-test-cookie";

pub fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// One warren process of the test cluster.
pub struct Node {
    pub ip: String,
    pub dir: PathBuf,
    pub amqp: u16,
    pub admin: u16,
    pub cluster: u16,
    pub seeds: Vec<String>,
    pub child: Option<Child>,
    /// The Stream protocol port, when the node listens for it (off by default).
    pub stream: Option<u16>,
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
            child: None,
            stream: None,
        }
    }

    pub fn name(&self) -> String {
        format!("warren@{}", self.ip)
    }

    pub fn seed(&self) -> String {
        format!("warren@{}:{}", self.ip, self.cluster)
    }

    pub fn config(&self, cookie: &str) -> PathBuf {
        let seeds: Vec<String> = self.seeds.iter().map(|s| format!("\"{s}\"")).collect();
        let text = format!(
            "bind = \"{ip}\"\namqp_port = {amqp}\nadmin_port = {admin}\ndata_dir = \"{dir}\"\n\
             log = \"warn\"\n\n[stream.listeners]\ntcp = {stream}\n\n[cluster]\n\
             node_name = \"warren@{ip}\"\nlisten = \"{ip}:{cluster}\"\ncookie = \"{cookie}\"\n\
             seeds = [{seeds}]\ncommit_timeout_ms = 3000\nheartbeat_ms = 50\n",
            ip = self.ip,
            amqp = self.amqp,
            admin = self.admin,
            dir = self.dir.display(),
            cluster = self.cluster,
            seeds = seeds.join(", "),
            stream = match self.stream {
                Some(port) => format!("{{ default = {port} }}"),
                None => "\"none\"".to_string(),
            },
        );
        std::fs::create_dir_all(&self.dir).expect("data dir");
        let path = self.dir.join("warren.toml");
        std::fs::write(&path, text).expect("config");
        path
    }

    pub async fn start(&mut self) {
        self.start_with_cookie(COOKIE).await
    }

    pub async fn start_with_cookie(&mut self, cookie: &str) {
        let config = self.config(cookie);
        let child = Command::new(env!("CARGO_BIN_EXE_warren"))
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn warren");
        self.child = Some(child);
        for _ in 0..200 {
            if tokio::net::TcpStream::connect((self.ip.as_str(), self.amqp))
                .await
                .is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("warren did not start on {}:{}", self.ip, self.amqp);
    }

    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        for _ in 0..200 {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Listen for the Stream protocol on a free port.
    pub fn with_stream(mut self) -> Node {
        self.stream = Some(free_port(&self.ip));
        self
    }

    /// kill -9: no shutdown of any kind.
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

    pub fn url(&self) -> String {
        format!("http://{}:{}", self.ip, self.admin)
    }

    /// GET on the admin API: (status, JSON body).
    pub fn get(&self, path: &str) -> (u16, Value) {
        let r = ureq::get(&format!("{}{path}", self.url()))
            .set("Authorization", "Basic Z3Vlc3Q6Z3Vlc3Q=")
            .call();
        match r {
            Ok(r) => (r.status(), r.into_json().unwrap_or(Value::Null)),
            Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or(Value::Null)),
            Err(_) => (0, Value::Null),
        }
    }

    /// PUT on the admin API: the status.
    pub fn put(&self, path: &str, body: Value) -> u16 {
        let r = ureq::put(&format!("{}{path}", self.url()))
            .set("Authorization", "Basic Z3Vlc3Q6Z3Vlc3Q=")
            .send_json(body);
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
}

impl Drop for Node {
    fn drop(&mut self) {
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
