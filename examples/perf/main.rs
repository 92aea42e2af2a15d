//! `perf` — a PerfTest-like load generator for warren (or any AMQP 0-9-1 broker).
//!
//! Throughput / latency run (producers and consumers on one fresh queue):
//!
//!   cargo run --release --example perf -- --uri amqp://guest:guest@127.0.0.1:5672/%2f \
//!       --producers 1 --consumers 1 --size 16 --prefetch 1000 --duration 15
//!
//! Every message carries its send time (u64 little-endian nanoseconds since the UNIX epoch)
//! in the first 8 bytes of the body; consumers record end-to-end latency into an
//! HdrHistogram.  One `TICK` line is printed per second and a single `RESULT` line at
//! the end (key=value pairs, stable order, easy to grep/parse).
//!
//! Memory per queued message (publish N messages, no consumers, keep the queue, then
//! sample the broker's VmRSS):
//!
//!   perf --consumers 0 --pmessages 1000000 --queue mem-test --keep-queue \
//!        --rss-pid <broker pid> --hold 5 --duration 600
//!
//! Idle connection cost:
//!
//!   perf --idle-connections 1000 --hold 10 --rss-pid <broker pid>
//!
//! Client (`--client`): `raw` (default, [`raw`]) speaks AMQP 0-9-1 through warren's own
//! codec (`warren::wire`) on the data path (batched publishes per write, many deliveries
//! decoded per read, TCP_NODELAY); it costs far less CPU per message than the generic
//! clients, which matters when the load generator shares a small machine with the
//! broker. `amqprs` and `lapin` are kept for cross-checking (amqprs cannot set
//! TCP_NODELAY). Queue declare/delete and the per-second queue-depth probe always use
//! amqprs on a separate connection.
//!
//! Modules: [`scenarios`] (the throughput / memory run and the idle-connection run, with
//! their `START` / `TICK` / `RESULT` lines), [`raw`], [`generic`] (amqprs and lapin),
//! [`confirm`] (publisher-confirm accounting), [`connect`] (URI parsing, connection
//! set-up for the generic clients) and [`stats`] (counters, latency histograms, pacing).

mod confirm;
mod connect;
mod generic;
mod raw;
mod scenarios;
mod stats;

use clap::{Parser, ValueEnum};

use scenarios::{idle_mode, run};

pub type DynErr = Box<dyn std::error::Error + Send + Sync>;
pub type Res<T> = Result<T, DynErr>;

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Client {
    /// warren::wire on the socket: batched writes/reads, lowest CPU per message
    Raw,
    Amqprs,
    Lapin,
}

#[derive(Parser, Debug, Clone)]
#[command(about = "PerfTest-like AMQP 0-9-1 load generator (throughput, latency, memory)")]
pub struct Args {
    /// Broker URI (amqp://user:pass@host:port/vhost, vhost percent-encoded).
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub uri: String,
    /// Number of producers (one connection + channel each).
    #[arg(long, short = 'x', default_value_t = 1)]
    pub producers: usize,
    /// Number of consumers (one connection + channel each).
    #[arg(long, short = 'y', default_value_t = 1)]
    pub consumers: usize,
    /// Message body size in bytes (minimum 8: the timestamp).
    #[arg(long, short = 's', default_value_t = 16)]
    pub size: usize,
    /// Run duration in seconds.
    #[arg(long, short = 'z', default_value_t = 10)]
    pub duration: u64,
    /// Publisher confirms: max outstanding unconfirmed messages per producer (0 = off).
    #[arg(long, short = 'c', default_value_t = 0)]
    pub confirm: usize,
    /// Publish with delivery-mode 2.
    #[arg(long)]
    pub persistent: bool,
    /// Declare the queue durable.
    #[arg(long)]
    pub durable_queue: bool,
    /// `x-queue-type` of the declared queue (`quorum`, `classic`); implies a durable queue.
    #[arg(long)]
    pub queue_type: Option<String>,
    /// Consumer prefetch (basic.qos prefetch-count, 0 = unlimited).
    #[arg(long, short = 'q', default_value_t = 1000)]
    pub prefetch: u16,
    /// Consume with no-ack (auto ack).
    #[arg(long, short = 'a')]
    pub autoack: bool,
    /// Publishing rate per producer in msgs/s (0 = unlimited).
    #[arg(long, short = 'r', default_value_t = 0.0)]
    pub rate: f64,
    /// Queue name (default: a fresh `perf-<pid>-<ts>` queue, deleted at the end).
    #[arg(long, short = 'u')]
    pub queue: Option<String>,
    /// Ack with multiple=true every N messages (0/1 = ack each message). Clamped to prefetch.
    #[arg(long, default_value_t = 0)]
    pub multi_ack_every: usize,
    /// Declare the queue with x-message-ttl (1 day) and x-dead-letter-exchange, configured
    /// but never triggered: measures feature overhead on the plain path.
    #[arg(long)]
    pub ttl_dlx: bool,
    /// Client library used for producers/consumers.
    #[arg(long, value_enum, default_value_t = Client::Raw)]
    pub client: Client,
    /// Exchange to publish to ("" = default exchange, routing key = queue name).
    #[arg(long, default_value = "")]
    pub exchange: String,
    /// Messages per producer; producers stop after that many (0 = unlimited). With
    /// --consumers 0 the run ends once all producers are done.
    #[arg(long, short = 'C', default_value_t = 0)]
    pub pmessages: u64,
    /// Stop once consumers have consumed this many in all (0 = as many as published; with
    /// --producers 0: drain an existing queue, e.g. `-x0 -u big --keep-queue --cmessages N`).
    #[arg(long, default_value_t = 0)]
    pub cmessages: u64,
    /// Do not delete the queue at the end (fresh queues are deleted by default).
    #[arg(long)]
    pub keep_queue: bool,
    /// Producers pause while (published - consumed) exceeds this (0 = unbounded, like PerfTest).
    #[arg(long, default_value_t = 0)]
    pub max_backlog: u64,
    /// lapin only: max publish futures in flight per producer when confirms are off.
    #[arg(long, default_value_t = 512)]
    pub pipeline: usize,
    /// Idle-connection mode: open N idle connections, hold them, report broker RSS delta.
    #[arg(long, default_value_t = 0)]
    pub idle_connections: usize,
    /// Seconds to hold before the final RSS sample (idle mode / publish-only memory runs).
    #[arg(long, default_value_t = 0)]
    pub hold: u64,
    /// PID of the broker process; VmRSS is sampled before and after the run.
    #[arg(long)]
    pub rss_pid: Option<u32>,
}

// ---------------------------------------------------------------------------------------
// shared state

fn main() {
    let a = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let r = rt.block_on(async {
        if a.idle_connections > 0 {
            idle_mode(&a).await
        } else {
            run(a).await
        }
    });
    if let Err(e) = r {
        eprintln!("ERROR {e}");
        std::process::exit(1);
    }
    // don't wait for lingering client IO tasks/threads
    std::process::exit(0);
}
