//! The real `warren` binary as a child process on a data directory of its own:
//! started, connected to, stopped with SIGTERM or killed with SIGKILL, for tests of
//! what survives a restart.

use lapin::{Connection, ConnectionProperties};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running broker process; killed when dropped, so a failing test leaves none.
pub struct BrokerProcess {
    child: Child,
    pub port: u16,
}

fn free_port() -> u16 {
    super::free_port("127.0.0.1")
}

/// A fresh, empty data directory for one test, removed when dropped.
pub fn data_dir(name: &str) -> super::TempDir {
    super::TempDir::new(&format!("warren-proc-{name}"))
}

impl BrokerProcess {
    /// Start the binary on `dir` (AMQP on a free loopback port, no admin API) and
    /// wait until it accepts connections.
    pub async fn start(dir: &Path) -> BrokerProcess {
        Self::start_with(dir, &[]).await
    }

    /// Like [`start`](Self::start), with more `WARREN_*` settings.
    pub async fn start_with(dir: &Path, env: &[(&str, &str)]) -> BrokerProcess {
        let port = free_port();
        let mut child = Command::new(env!("CARGO_BIN_EXE_warren"))
            .envs(env.iter().copied())
            .env("WARREN_AMQP_PORT", port.to_string())
            .env("WARREN_BIND", "127.0.0.1")
            .env("WARREN_ADMIN_ENABLED", "false")
            .env("WARREN_DATA_DIR", dir)
            .env("WARREN_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn warren");
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return BrokerProcess { child, port };
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("warren did not start on port {port}");
    }

    /// Resident set size of the broker process in bytes (from /proc).
    pub fn rss(&self) -> u64 {
        std::fs::read_to_string(format!("/proc/{}/statm", self.child.id()))
            .ok()
            .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map(|pages| pages * 4096)
            .unwrap_or(0)
    }

    pub fn uri(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    pub async fn connect(&self) -> Connection {
        tokio::time::timeout(
            super::TIMEOUT,
            Connection::connect(&self.uri(), ConnectionProperties::default()),
        )
        .await
        .expect("connect timeout")
        .expect("connect")
    }

    /// SIGKILL: no chance to flush anything.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        for _ in 0..200 {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        panic!("warren did not stop on SIGTERM");
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
