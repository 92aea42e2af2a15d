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
        let (mut child, port) = spawn(dir, env);
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

    /// SIGTERM and wait for a clean exit (see [`stop_cleanly`]).
    pub fn stop(mut self) {
        stop_cleanly(&mut self.child);
    }
}

/// The binary on `dir` (AMQP on a free loopback port, no admin API), not
/// waited for.
fn spawn(dir: &Path, env: &[(&str, &str)]) -> (Child, u16) {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_warren"))
        .envs(env.iter().copied())
        .env("WARREN_AMQP_PORT", port.to_string())
        .env("WARREN_BIND", "127.0.0.1")
        .env("WARREN_PROMETHEUS_ENABLED", "false")
        .env("WARREN_ADMIN_ENABLED", "false")
        .env("WARREN_DATA_DIR", dir)
        .env("WARREN_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn warren");
    (child, port)
}

/// Start the binary on `dir` and send it SIGTERM the moment its AMQP port
/// first accepts a connection (while it may still be starting); how it
/// exited.
pub fn terminate_once_listening(dir: &Path) -> std::process::ExitStatus {
    let (mut child, port) = spawn(dir, &[]);
    let deadline = std::time::Instant::now() + super::TIMEOUT;
    // No sleep between attempts: a refused connect returns at once, and the
    // point is to land as close as possible to the listener's opening.
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("warren did not start on port {port}");
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("warren exited before listening: {status}");
        }
    }
    terminate(&mut child).unwrap_or_else(|| panic!("warren did not stop on SIGTERM"))
}

/// SIGTERM to `child` (sent directly, no `kill` process to start first) and
/// its exit status, or `None` (and SIGKILL) if it has not exited within 10 s.
pub fn terminate(child: &mut Child) -> Option<std::process::ExitStatus> {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) touches no memory of ours; `pid` is our own child,
        // not yet reaped, so it cannot name another process.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    for _ in 0..400 {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// [`terminate`], asserting a clean exit: status 0, the broker shut down and
/// flushed, it was not killed by the signal nor had to be killed after it.
pub fn stop_cleanly(child: &mut Child) {
    match terminate(child) {
        Some(status) => assert!(
            status.success(),
            "warren did not shut down cleanly on SIGTERM: {status}"
        ),
        None => panic!("warren did not stop within 10 s of SIGTERM"),
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
