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
//! Client (`--client`): `raw` (default) is a minimal built-in AMQP 0-9-1 codec for the
//! data path (batched publishes per write, many deliveries parsed per read, TCP_NODELAY);
//! it costs far less CPU per message than the generic clients, which matters when the
//! load generator shares a small machine with the broker. `amqprs` and `lapin` are kept
//! for cross-checking (amqprs cannot set TCP_NODELAY). Queue declare/delete and the
//! per-second queue-depth probe always use amqprs on a separate connection.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::{Parser, ValueEnum};
use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::sync::{Barrier, Semaphore};

type DynErr = Box<dyn std::error::Error + Send + Sync>;
type Res<T> = Result<T, DynErr>;

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Client {
    /// built-in minimal AMQP codec: batched writes/reads, lowest CPU per message
    Raw,
    Amqprs,
    Lapin,
}

#[derive(Parser, Debug, Clone)]
#[command(about = "PerfTest-like AMQP 0-9-1 load generator (throughput, latency, memory)")]
struct Args {
    /// Broker URI (amqp://user:pass@host:port/vhost, vhost percent-encoded).
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    uri: String,
    /// Number of producers (one connection + channel each).
    #[arg(long, short = 'x', default_value_t = 1)]
    producers: usize,
    /// Number of consumers (one connection + channel each).
    #[arg(long, short = 'y', default_value_t = 1)]
    consumers: usize,
    /// Message body size in bytes (minimum 8: the timestamp).
    #[arg(long, short = 's', default_value_t = 16)]
    size: usize,
    /// Run duration in seconds.
    #[arg(long, short = 'z', default_value_t = 10)]
    duration: u64,
    /// Publisher confirms: max outstanding unconfirmed messages per producer (0 = off).
    #[arg(long, short = 'c', default_value_t = 0)]
    confirm: usize,
    /// Publish with delivery-mode 2.
    #[arg(long)]
    persistent: bool,
    /// Declare the queue durable.
    #[arg(long)]
    durable_queue: bool,
    /// Consumer prefetch (basic.qos prefetch-count, 0 = unlimited).
    #[arg(long, short = 'q', default_value_t = 1000)]
    prefetch: u16,
    /// Consume with no-ack (auto ack).
    #[arg(long, short = 'a')]
    autoack: bool,
    /// Publishing rate per producer in msgs/s (0 = unlimited).
    #[arg(long, short = 'r', default_value_t = 0.0)]
    rate: f64,
    /// Queue name (default: a fresh `perf-<pid>-<ts>` queue, deleted at the end).
    #[arg(long, short = 'u')]
    queue: Option<String>,
    /// Ack with multiple=true every N messages (0/1 = ack each message). Clamped to prefetch.
    #[arg(long, default_value_t = 0)]
    multi_ack_every: usize,
    /// Declare the queue with x-message-ttl (1 day) and x-dead-letter-exchange, configured
    /// but never triggered: measures feature overhead on the plain path.
    #[arg(long)]
    ttl_dlx: bool,
    /// Client library used for producers/consumers.
    #[arg(long, value_enum, default_value_t = Client::Raw)]
    client: Client,
    /// Exchange to publish to ("" = default exchange, routing key = queue name).
    #[arg(long, default_value = "")]
    exchange: String,
    /// Messages per producer; producers stop after that many (0 = unlimited). With
    /// --consumers 0 the run ends once all producers are done.
    #[arg(long, short = 'C', default_value_t = 0)]
    pmessages: u64,
    /// Do not delete the queue at the end (fresh queues are deleted by default).
    #[arg(long)]
    keep_queue: bool,
    /// Producers pause while (published - consumed) exceeds this (0 = unbounded, like PerfTest).
    #[arg(long, default_value_t = 0)]
    max_backlog: u64,
    /// lapin only: max publish futures in flight per producer when confirms are off.
    #[arg(long, default_value_t = 512)]
    pipeline: usize,
    /// Idle-connection mode: open N idle connections, hold them, report broker RSS delta.
    #[arg(long, default_value_t = 0)]
    idle_connections: usize,
    /// Seconds to hold before the final RSS sample (idle mode / publish-only memory runs).
    #[arg(long, default_value_t = 0)]
    hold: u64,
    /// PID of the broker process; VmRSS is sampled before and after the run.
    #[arg(long)]
    rss_pid: Option<u32>,
}

// ---------------------------------------------------------------------------------------
// shared state

const HIST_MAX_US: u64 = 3_600_000_000;

fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("histogram")
}

#[derive(Default)]
struct Stats {
    published: AtomicU64,
    confirmed: AtomicU64,
    nacked: AtomicU64,
    consumed: AtomicU64,
    producers_done: AtomicU64,
    stop: AtomicBool,
    finished: AtomicBool,
    /// one interval histogram per consumer, drained by the reporter every second
    hists: Mutex<Vec<Arc<Mutex<Histogram<u64>>>>>,
}

impl Stats {
    fn register_hist(&self) -> Arc<Mutex<Histogram<u64>>> {
        let h = Arc::new(Mutex::new(new_hist()));
        self.hists.lock().unwrap().push(h.clone());
        h
    }
    /// Move all per-consumer samples into `interval` (and the caller merges into total).
    fn drain_hists(&self, interval: &mut Histogram<u64>) {
        for h in self.hists.lock().unwrap().iter() {
            let mut h = h.lock().unwrap();
            let _ = interval.add(&*h);
            h.reset();
        }
    }
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[inline]
fn record_latency(body: &[u8], h: &Mutex<Histogram<u64>>) {
    if body.len() >= 8 {
        let ts = u64::from_le_bytes(body[..8].try_into().unwrap());
        let us = now_nanos().saturating_sub(ts) / 1000;
        h.lock()
            .unwrap()
            .saturating_record(us.clamp(1, HIST_MAX_US));
    }
}

fn fail(what: &str, e: DynErr, st: &Stats) {
    if !st.finished.load(Relaxed) {
        eprintln!("ERROR {what}: {e}");
        std::process::exit(1);
    }
}

fn read_rss_kb(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Absolute-schedule rate limiter (catches up after timer overshoot).
struct Pacer {
    rate: f64,
    start: Instant,
    n: u64,
}

impl Pacer {
    fn new(rate: f64) -> Self {
        Pacer {
            rate,
            start: Instant::now(),
            n: 0,
        }
    }
    /// Instant at which the next message is due, or None if unlimited / already due.
    fn next_due(&mut self) -> Option<Instant> {
        if self.rate <= 0.0 {
            return None;
        }
        let due = self.start + Duration::from_secs_f64(self.n as f64 / self.rate);
        self.n += 1;
        (due > Instant::now()).then_some(due)
    }
}

async fn backlog_gate(a: &Args, st: &Stats) {
    if a.max_backlog == 0 {
        return;
    }
    while !st.stop.load(Relaxed)
        && st
            .published
            .load(Relaxed)
            .saturating_sub(st.consumed.load(Relaxed))
            > a.max_backlog
    {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
}

fn make_body(size: usize) -> Vec<u8> {
    let mut b = vec![0u8; size.max(8)];
    b[..8].copy_from_slice(&now_nanos().to_le_bytes());
    b
}

// ---------------------------------------------------------------------------------------
// URI handling for amqprs (lapin parses URIs itself)

struct UriParts {
    host: String,
    port: u16,
    user: String,
    pass: String,
    vhost: String,
}

fn pct_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_uri(uri: &str) -> Res<UriParts> {
    let rest = uri
        .strip_prefix("amqp://")
        .ok_or("only amqp:// URIs are supported")?;
    let rest = rest.split('?').next().unwrap_or("");
    let (authority, vhost) = match rest.find('/') {
        Some(i) => (&rest[..i], pct_decode(&rest[i + 1..])),
        None => (rest, "/".to_string()),
    };
    let vhost = if vhost.is_empty() {
        "/".to_string()
    } else {
        vhost
    };
    let (auth, hostport) = match authority.rfind('@') {
        Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
        None => (None, authority),
    };
    let (user, pass) = match auth {
        Some(a) => match a.find(':') {
            Some(i) => (pct_decode(&a[..i]), pct_decode(&a[i + 1..])),
            None => (pct_decode(a), String::new()),
        },
        None => ("guest".into(), "guest".into()),
    };
    let (host, port) = match hostport.rfind(':') {
        Some(i) => (hostport[..i].to_string(), hostport[i + 1..].parse::<u16>()?),
        None => (hostport.to_string(), 5672),
    };
    let host = if host.is_empty() {
        "127.0.0.1".into()
    } else {
        host
    };
    Ok(UriParts {
        host,
        port,
        user,
        pass,
        vhost,
    })
}

async fn amqprs_open(u: &UriParts, name: &str) -> Res<amqprs::connection::Connection> {
    let args = amqprs::connection::OpenConnectionArguments::new(&u.host, u.port, &u.user, &u.pass)
        .virtual_host(&u.vhost)
        .connection_name(name)
        .finish();
    Ok(amqprs::connection::Connection::open(&args).await?)
}

async fn lapin_open(uri: &str, name: &str) -> Res<lapin::Connection> {
    let props = lapin::ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio)
        .with_connection_name(name.to_string().into());
    Ok(lapin::Connection::connect(uri, props).await?)
}

// ---------------------------------------------------------------------------------------
// amqprs publisher-confirm tracking (callback based)

struct ConfirmTracker {
    sem: Semaphore,
    outstanding: Mutex<BTreeSet<u64>>,
    stats: Arc<Stats>,
}

impl ConfirmTracker {
    fn settle(&self, tag: u64, multiple: bool, nack: bool) {
        let n = {
            let mut set = self.outstanding.lock().unwrap();
            if multiple {
                let rest = set.split_off(&(tag + 1));
                let n = set.len();
                *set = rest;
                n
            } else {
                set.remove(&tag) as usize
            }
        };
        self.sem.add_permits(n);
        if nack {
            self.stats.nacked.fetch_add(n as u64, Relaxed);
        } else {
            self.stats.confirmed.fetch_add(n as u64, Relaxed);
        }
    }
}

struct ConfirmCb(Arc<ConfirmTracker>);

type BoxFut<'t, T> = Pin<Box<dyn Future<Output = T> + Send + 't>>;
type AmqprsResult<T> = Result<T, amqprs::error::Error>;

// Hand-expanded #[async_trait] impl (avoids an extra async-trait dependency).
impl amqprs::callbacks::ChannelCallback for ConfirmCb {
    fn close<'l0, 'l1, 't>(
        &'l0 mut self,
        _channel: &'l1 amqprs::channel::Channel,
        close: amqprs::CloseChannel,
    ) -> BoxFut<'t, AmqprsResult<()>>
    where
        'l0: 't,
        'l1: 't,
        Self: 't,
    {
        Box::pin(async move {
            eprintln!("WARN producer channel closed by broker: {close}");
            Ok(())
        })
    }
    fn cancel<'l0, 'l1, 't>(
        &'l0 mut self,
        _channel: &'l1 amqprs::channel::Channel,
        _cancel: amqprs::Cancel,
    ) -> BoxFut<'t, AmqprsResult<()>>
    where
        'l0: 't,
        'l1: 't,
        Self: 't,
    {
        Box::pin(async { Ok(()) })
    }
    fn flow<'l0, 'l1, 't>(
        &'l0 mut self,
        _channel: &'l1 amqprs::channel::Channel,
        _active: bool,
    ) -> BoxFut<'t, AmqprsResult<bool>>
    where
        'l0: 't,
        'l1: 't,
        Self: 't,
    {
        Box::pin(async { Ok(true) })
    }
    fn publish_ack<'l0, 'l1, 't>(
        &'l0 mut self,
        _channel: &'l1 amqprs::channel::Channel,
        ack: amqprs::Ack,
    ) -> BoxFut<'t, ()>
    where
        'l0: 't,
        'l1: 't,
        Self: 't,
    {
        self.0.settle(ack.delivery_tag(), ack.mutiple(), false);
        Box::pin(async {})
    }
    fn publish_nack<'l0, 'l1, 't>(
        &'l0 mut self,
        _channel: &'l1 amqprs::channel::Channel,
        nack: amqprs::Nack,
    ) -> BoxFut<'t, ()>
    where
        'l0: 't,
        'l1: 't,
        Self: 't,
    {
        self.0.settle(nack.delivery_tag(), nack.multiple(), true);
        Box::pin(async {})
    }
    fn publish_return<'l0, 'l1, 't>(
        &'l0 mut self,
        _channel: &'l1 amqprs::channel::Channel,
        _ret: amqprs::Return,
        _basic_properties: amqprs::BasicProperties,
        _content: Vec<u8>,
    ) -> BoxFut<'t, ()>
    where
        'l0: 't,
        'l1: 't,
        Self: 't,
    {
        Box::pin(async {})
    }
}

// ---------------------------------------------------------------------------------------
// producers

struct Ctx {
    a: Args,
    uri: UriParts,
    queue: String,
    routing_key: String,
    st: Arc<Stats>,
}

async fn producer_amqprs(id: usize, cx: Arc<Ctx>, start: Arc<Barrier>) -> Res<()> {
    use amqprs::channel::{BasicPublishArguments, ConfirmSelectArguments};
    let (a, st) = (&cx.a, &cx.st);
    let conn = amqprs_open(&cx.uri, &format!("perf-producer-{id}")).await?;
    let ch = conn.open_channel(None).await?;
    let tracker = if a.confirm > 0 {
        let t = Arc::new(ConfirmTracker {
            sem: Semaphore::new(a.confirm),
            outstanding: Mutex::new(BTreeSet::new()),
            stats: st.clone(),
        });
        ch.register_callback(ConfirmCb(t.clone())).await?;
        ch.confirm_select(ConfirmSelectArguments::new(false))
            .await?;
        Some(t)
    } else {
        None
    };
    let mut props = amqprs::BasicProperties::default();
    if a.persistent {
        props.with_delivery_mode(amqprs::DELIVERY_MODE_PERSISTENT);
    }
    let props = props.finish();
    let pargs = BasicPublishArguments::new(&a.exchange, &cx.routing_key);
    start.wait().await;
    let mut pacer = Pacer::new(a.rate);
    let mut seq = 0u64;
    while !st.stop.load(Relaxed) && (a.pmessages == 0 || seq < a.pmessages) {
        if let Some(due) = pacer.next_due() {
            tokio::time::sleep_until(due.into()).await;
        }
        backlog_gate(a, st).await;
        if let Some(t) = &tracker {
            loop {
                match tokio::time::timeout(Duration::from_millis(100), t.sem.acquire()).await {
                    Ok(p) => {
                        p?.forget();
                        break;
                    }
                    Err(_) if st.stop.load(Relaxed) => break,
                    Err(_) => {}
                }
            }
            if st.stop.load(Relaxed) {
                break;
            }
            t.outstanding.lock().unwrap().insert(seq + 1);
        }
        seq += 1;
        ch.basic_publish(props.clone(), make_body(a.size), pargs.clone())
            .await?;
        st.published.fetch_add(1, Relaxed);
    }
    st.producers_done.fetch_add(1, Relaxed);
    if let Some(t) = &tracker {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !t.outstanding.lock().unwrap().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let _ = ch.close().await;
    let _ = conn.close().await;
    Ok(())
}

async fn producer_lapin(id: usize, cx: Arc<Ctx>, start: Arc<Barrier>) -> Res<()> {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    use lapin::publisher_confirm::Confirmation;
    let (a, st) = (&cx.a, &cx.st);
    let conn = lapin_open(&a.uri, &format!("perf-producer-{id}")).await?;
    let ch = conn.create_channel().await?;
    let confirm = a.confirm > 0;
    if confirm {
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
    }
    let mut props = lapin::BasicProperties::default();
    if a.persistent {
        props = props.with_delivery_mode(2);
    }
    // With confirms, a publish future lives until its confirm arrives, so the window
    // bounds outstanding confirms exactly; otherwise it bounds frames queued in lapin.
    let window = if confirm {
        a.confirm
    } else {
        a.pipeline.max(1)
    };
    let exchange: Arc<str> = a.exchange.as_str().into();
    let rk: Arc<str> = cx.routing_key.as_str().into();
    let mut inflight: FuturesUnordered<BoxFuture<'static, Res<()>>> = FuturesUnordered::new();
    start.wait().await;
    let mut pacer = Pacer::new(a.rate);
    let mut seq = 0u64;
    while !st.stop.load(Relaxed) && (a.pmessages == 0 || seq < a.pmessages) {
        if let Some(due) = pacer.next_due() {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(due.into()) => break,
                    r = inflight.next(), if !inflight.is_empty() => { if let Some(r) = r { r?; } }
                }
            }
        }
        backlog_gate(a, st).await;
        while inflight.len() >= window && !st.stop.load(Relaxed) {
            if let Ok(Some(r)) =
                tokio::time::timeout(Duration::from_millis(100), inflight.next()).await
            {
                r?
            }
        }
        if st.stop.load(Relaxed) {
            break;
        }
        seq += 1;
        let (ch2, st2, props2, ex, rk) = (
            ch.clone(),
            st.clone(),
            props.clone(),
            exchange.clone(),
            rk.clone(),
        );
        let body = make_body(a.size);
        inflight.push(Box::pin(async move {
            let pc = ch2
                .basic_publish(&ex, &rk, BasicPublishOptions::default(), &body, props2)
                .await?;
            st2.published.fetch_add(1, Relaxed);
            if confirm {
                match pc.await? {
                    Confirmation::Nack(_) => st2.nacked.fetch_add(1, Relaxed),
                    _ => st2.confirmed.fetch_add(1, Relaxed),
                };
            }
            Ok(())
        }));
        // First poll hands the frames to lapin's IO loop in publish order.
        while let Some(Some(r)) = inflight.next().now_or_never() {
            r?;
        }
    }
    st.producers_done.fetch_add(1, Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(r) = inflight.next().await {
            let _ = r;
        }
    })
    .await;
    let _ = ch.close(200, "bye").await;
    let _ = conn.close(200, "bye").await;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// consumers

fn ack_every(a: &Args) -> usize {
    let n = a.multi_ack_every.max(1);
    if a.prefetch > 0 {
        n.min(a.prefetch as usize)
    } else {
        n
    }
}

async fn consumer_amqprs(id: usize, cx: Arc<Ctx>, ready: Arc<Barrier>) -> Res<()> {
    use amqprs::channel::{BasicAckArguments, BasicConsumeArguments, BasicQosArguments};
    let (a, st) = (&cx.a, &cx.st);
    let hist = st.register_hist();
    let conn = amqprs_open(&cx.uri, &format!("perf-consumer-{id}")).await?;
    let ch = conn.open_channel(None).await?;
    if a.prefetch > 0 {
        ch.basic_qos(BasicQosArguments::new(0, a.prefetch, false))
            .await?;
    }
    let mut cargs = BasicConsumeArguments::new(&cx.queue, &format!("perf-consumer-{id}"));
    cargs.no_ack = a.autoack;
    let (_tag, mut rx) = ch.basic_consume_rx(cargs).await?;
    ready.wait().await;
    let every = ack_every(a);
    let mut since = 0usize;
    while let Some(m) = rx.recv().await {
        if let Some(c) = &m.content {
            record_latency(c, &hist);
        }
        st.consumed.fetch_add(1, Relaxed);
        if !a.autoack {
            let tag = m.deliver.as_ref().map(|d| d.delivery_tag()).unwrap_or(0);
            since += 1;
            if since >= every {
                ch.basic_ack(BasicAckArguments::new(tag, every > 1)).await?;
                since = 0;
            }
        }
    }
    let _ = conn; // keep the connection alive for the whole loop
    Ok(())
}

async fn consumer_lapin(id: usize, cx: Arc<Ctx>, ready: Arc<Barrier>) -> Res<()> {
    use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
    let (a, st) = (&cx.a, &cx.st);
    let hist = st.register_hist();
    let conn = lapin_open(&a.uri, &format!("perf-consumer-{id}")).await?;
    let ch = conn.create_channel().await?;
    if a.prefetch > 0 {
        ch.basic_qos(a.prefetch, BasicQosOptions::default()).await?;
    }
    let opts = BasicConsumeOptions {
        no_ack: a.autoack,
        ..Default::default()
    };
    let mut consumer = ch
        .basic_consume(
            &cx.queue,
            &format!("perf-consumer-{id}"),
            opts,
            Default::default(),
        )
        .await?;
    ready.wait().await;
    let every = ack_every(a);
    let mut since = 0usize;
    let mut acks: FuturesUnordered<BoxFuture<'static, lapin::Result<()>>> = FuturesUnordered::new();
    loop {
        tokio::select! {
            biased;
            r = acks.next(), if !acks.is_empty() => { if let Some(r) = r { r?; } }
            d = consumer.next() => {
                let Some(d) = d else { break };
                let d = d?;
                record_latency(&d.data, &hist);
                st.consumed.fetch_add(1, Relaxed);
                if !a.autoack {
                    since += 1;
                    if since >= every {
                        let (ch2, tag, multiple) = (ch.clone(), d.delivery_tag, every > 1);
                        acks.push(Box::pin(async move {
                            ch2.basic_ack(tag, BasicAckOptions { multiple }).await
                        }));
                        since = 0;
                    }
                }
            }
        }
    }
    let _ = conn;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// `--client raw`: a minimal built-in AMQP 0-9-1 client for the data path only.
//
// Generic clients spend several µs of CPU per message (task hops, one write syscall per
// publish, per-delivery channel sends). On a small box the load generator shares the CPU
// with the broker, so the data path here encodes many publishes into one write and
// parses many deliveries per read; acks are batched into one write per read batch.

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

struct FrameReader {
    r: OwnedReadHalf,
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl FrameReader {
    fn new(r: OwnedReadHalf) -> Self {
        FrameReader {
            r,
            buf: vec![0; 256 * 1024],
            start: 0,
            end: 0,
        }
    }
    /// Next complete buffered frame: (type, channel, payload start, payload end).
    fn parse(&mut self) -> Res<Option<(u8, u16, usize, usize)>> {
        let b = &self.buf[self.start..self.end];
        if b.len() < 7 {
            return Ok(None);
        }
        let size = u32::from_be_bytes([b[3], b[4], b[5], b[6]]) as usize;
        if b.len() < size + 8 {
            return Ok(None);
        }
        if b[7 + size] != 0xCE {
            return Err("bad frame end octet".into());
        }
        let f = (
            b[0],
            u16::from_be_bytes([b[1], b[2]]),
            self.start + 7,
            self.start + 7 + size,
        );
        self.start += size + 8;
        Ok(Some(f))
    }
    async fn fill(&mut self) -> Res<()> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            let n = self.buf.len() * 2;
            self.buf.resize(n, 0);
        }
        let n = self.r.read(&mut self.buf[self.end..]).await?;
        if n == 0 {
            return Err("connection closed by broker".into());
        }
        self.end += n;
        Ok(())
    }
    async fn next(&mut self) -> Res<(u8, u16, usize, usize)> {
        loop {
            if let Some(f) = self.parse()? {
                return Ok(f);
            }
            self.fill().await?;
        }
    }
}

/// Cursor over a method payload.
struct Rd<'a>(&'a [u8], usize);

impl<'a> Rd<'a> {
    fn take(&mut self, n: usize) -> Res<&'a [u8]> {
        let s = self.0.get(self.1..self.1 + n).ok_or("short method frame")?;
        self.1 += n;
        Ok(s)
    }
    fn u8(&mut self) -> Res<u8> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Res<u16> {
        Ok(u16::from_be_bytes(self.take(2)?.try_into().unwrap()))
    }
    fn u32(&mut self) -> Res<u32> {
        Ok(u32::from_be_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn u64(&mut self) -> Res<u64> {
        Ok(u64::from_be_bytes(self.take(8)?.try_into().unwrap()))
    }
    fn shortstr(&mut self) -> Res<String> {
        let n = self.u8()? as usize;
        Ok(String::from_utf8_lossy(self.take(n)?).into_owned())
    }
}

fn put_shortstr(v: &mut Vec<u8>, s: &str) {
    let b = &s.as_bytes()[..s.len().min(255)];
    v.push(b.len() as u8);
    v.extend_from_slice(b);
}

fn put_longstr(v: &mut Vec<u8>, s: &[u8]) {
    v.extend_from_slice(&(s.len() as u32).to_be_bytes());
    v.extend_from_slice(s);
}

fn put_frame(out: &mut Vec<u8>, ty: u8, ch: u16, payload: &[u8]) {
    out.push(ty);
    out.extend_from_slice(&ch.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.push(0xCE);
}

fn method(class: u16, method: u16) -> Vec<u8> {
    let mut v = Vec::with_capacity(64);
    v.extend_from_slice(&class.to_be_bytes());
    v.extend_from_slice(&method.to_be_bytes());
    v
}

async fn send_method(w: &mut OwnedWriteHalf, ch: u16, payload: &[u8]) -> Res<()> {
    let mut out = Vec::with_capacity(payload.len() + 8);
    put_frame(&mut out, 1, ch, payload);
    w.write_all(&out).await?;
    Ok(())
}

/// Error text for connection.close / channel.close payloads, if `p` is one.
fn close_error(p: &[u8]) -> Option<String> {
    let mut r = Rd(p, 0);
    let (c, m) = (r.u16().ok()?, r.u16().ok()?);
    if (c, m) == (10, 50) || (c, m) == (20, 40) {
        let code = r.u16().ok()?;
        let text = r.shortstr().ok()?;
        Some(format!(
            "broker closed {}: {code} {text}",
            if c == 10 { "connection" } else { "channel" }
        ))
    } else {
        None
    }
}

/// Wait for method (class, method), skipping heartbeats and unrelated methods.
async fn expect_method(rd: &mut FrameReader, class: u16, meth: u16) -> Res<Vec<u8>> {
    loop {
        let (ty, _ch, s, e) = rd.next().await?;
        if ty != 1 {
            continue;
        }
        let p = &rd.buf[s..e];
        if p.len() >= 4
            && u16::from_be_bytes([p[0], p[1]]) == class
            && u16::from_be_bytes([p[2], p[3]]) == meth
        {
            return Ok(p[4..].to_vec());
        }
        if let Some(err) = close_error(p) {
            return Err(err.into());
        }
    }
}

/// Connect, authenticate (PLAIN), tune (heartbeats off), open vhost and channel 1.
async fn raw_connect(u: &UriParts, name: &str) -> Res<(FrameReader, OwnedWriteHalf, usize)> {
    let s = tokio::net::TcpStream::connect((u.host.as_str(), u.port)).await?;
    s.set_nodelay(true)?;
    let (r, mut w) = s.into_split();
    let mut rd = FrameReader::new(r);
    w.write_all(b"AMQP\x00\x00\x09\x01").await?;
    expect_method(&mut rd, 10, 10).await?; // connection.start
    let mut p = method(10, 11); // start-ok
    let mut props = Vec::new();
    for (k, v) in [("product", "warren-perf"), ("connection_name", name)] {
        put_shortstr(&mut props, k);
        props.push(b'S');
        put_longstr(&mut props, v.as_bytes());
    }
    put_longstr(&mut p, &props);
    put_shortstr(&mut p, "PLAIN");
    put_longstr(&mut p, format!("\0{}\0{}", u.user, u.pass).as_bytes());
    put_shortstr(&mut p, "en_US");
    send_method(&mut w, 0, &p).await?;
    let tune = expect_method(&mut rd, 10, 30).await?;
    let mut t = Rd(&tune, 0);
    let (channel_max, frame_max) = (t.u16()?, t.u32()?);
    let frame_max = if frame_max == 0 {
        131072
    } else {
        frame_max.min(131072)
    };
    let mut p = method(10, 31); // tune-ok
    p.extend_from_slice(&(if channel_max == 0 { 2047 } else { channel_max }).to_be_bytes());
    p.extend_from_slice(&frame_max.to_be_bytes());
    p.extend_from_slice(&0u16.to_be_bytes()); // no heartbeats
    send_method(&mut w, 0, &p).await?;
    let mut p = method(10, 40); // connection.open
    put_shortstr(&mut p, &u.vhost);
    put_shortstr(&mut p, "");
    p.push(0);
    send_method(&mut w, 0, &p).await?;
    expect_method(&mut rd, 10, 41).await?;
    let mut p = method(20, 10); // channel.open
    put_shortstr(&mut p, "");
    send_method(&mut w, 1, &p).await?;
    expect_method(&mut rd, 20, 11).await?;
    Ok((rd, w, frame_max as usize))
}

async fn raw_close(w: &mut OwnedWriteHalf) {
    let mut p = method(10, 50);
    p.extend_from_slice(&200u16.to_be_bytes());
    put_shortstr(&mut p, "bye");
    p.extend_from_slice(&[0, 0, 0, 0]);
    let _ = send_method(w, 0, &p).await;
}

async fn producer_raw(id: usize, cx: Arc<Ctx>, start: Arc<Barrier>) -> Res<()> {
    let (a, st) = (&cx.a, &cx.st);
    let (mut rd, mut w, frame_max) = raw_connect(&cx.uri, &format!("perf-producer-{id}")).await?;
    let tracker = Arc::new(ConfirmTracker {
        sem: Semaphore::new(a.confirm),
        outstanding: Mutex::new(BTreeSet::new()),
        stats: st.clone(),
    });
    let confirm = a.confirm > 0;
    if confirm {
        let mut p = method(85, 10);
        p.push(0);
        send_method(&mut w, 1, &p).await?;
        expect_method(&mut rd, 85, 11).await?;
    }
    // reader: publisher confirms and broker-initiated closes
    let (t2, st2) = (tracker.clone(), st.clone());
    let reader = tokio::spawn(async move {
        let r: Res<()> = async {
            loop {
                let (ty, _, s, e) = rd.next().await?;
                if ty != 1 {
                    continue;
                }
                let p = &rd.buf[s..e];
                let mut r = Rd(p, 0);
                match (r.u16()?, r.u16()?) {
                    (60, 80) => {
                        let tag = r.u64()?;
                        t2.settle(tag, r.u8()? & 1 != 0, false)
                    }
                    (60, 120) => {
                        let tag = r.u64()?;
                        t2.settle(tag, r.u8()? & 1 != 0, true)
                    }
                    (10, 51) => return Ok(()),
                    _ => {
                        if let Some(err) = close_error(p) {
                            return Err(err.into());
                        }
                    }
                }
            }
        }
        .await;
        if let Err(e) = r {
            fail(&format!("producer {id} reader"), e, &st2);
        }
    });

    // frame templates
    let body_len = a.size.max(8);
    let mut m = method(60, 40);
    m.extend_from_slice(&0u16.to_be_bytes());
    put_shortstr(&mut m, &a.exchange);
    put_shortstr(&mut m, &cx.routing_key);
    m.push(0);
    let mut h = Vec::new();
    h.extend_from_slice(&60u16.to_be_bytes());
    h.extend_from_slice(&0u16.to_be_bytes());
    h.extend_from_slice(&(body_len as u64).to_be_bytes());
    if a.persistent {
        h.extend_from_slice(&0x1000u16.to_be_bytes()); // delivery-mode present
        h.push(2);
    } else {
        h.extend_from_slice(&0u16.to_be_bytes());
    }
    let mut prefix = Vec::new();
    put_frame(&mut prefix, 1, 1, &m);
    put_frame(&mut prefix, 2, 1, &h);
    let chunk = frame_max - 8;
    let body_template = vec![0u8; body_len];
    let per_msg = prefix.len() + body_len + 8 * (1 + body_len / chunk);
    let batch_max = (32 * 1024 / per_msg).clamp(1, 1000) as u64;
    let mut wbuf: Vec<u8> = Vec::with_capacity(64 * 1024 + per_msg);

    start.wait().await;
    let t_start = Instant::now();
    let mut seq = 0u64;
    loop {
        if st.stop.load(Relaxed) || (a.pmessages > 0 && seq >= a.pmessages) {
            break;
        }
        let mut k = batch_max;
        if a.pmessages > 0 {
            k = k.min(a.pmessages - seq);
        }
        if a.rate > 0.0 {
            let due = (t_start.elapsed().as_secs_f64() * a.rate) as u64 + 1;
            if due <= seq {
                let at = t_start + Duration::from_secs_f64(seq as f64 / a.rate);
                tokio::time::sleep_until(at.into()).await;
                continue;
            }
            k = k.min(due - seq);
        }
        backlog_gate(a, st).await;
        if confirm {
            let avail = tracker.sem.available_permits() as u64;
            if avail == 0 {
                match tokio::time::timeout(Duration::from_millis(100), tracker.sem.acquire()).await
                {
                    Ok(p) => p?.forget(),
                    Err(_) => continue, // re-check stop
                }
                let extra = (k - 1).min(tracker.sem.available_permits() as u64) as u32;
                let got = match tracker.sem.try_acquire_many(extra) {
                    Ok(p) => {
                        p.forget();
                        extra as u64
                    }
                    Err(_) => 0,
                };
                k = 1 + got;
            } else {
                k = k.min(avail);
                tracker.sem.try_acquire_many(k as u32)?.forget();
            }
            let mut o = tracker.outstanding.lock().unwrap();
            o.extend(seq + 1..=seq + k);
        }
        for _ in 0..k {
            wbuf.extend_from_slice(&prefix);
            let mut body = body_template.clone();
            body[..8].copy_from_slice(&now_nanos().to_le_bytes());
            for c in body.chunks(chunk) {
                put_frame(&mut wbuf, 3, 1, c);
            }
        }
        w.write_all(&wbuf).await?;
        wbuf.clear();
        seq += k;
        st.published.fetch_add(k, Relaxed);
    }
    st.producers_done.fetch_add(1, Relaxed);
    if confirm {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !tracker.outstanding.lock().unwrap().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    raw_close(&mut w).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), reader).await;
    Ok(())
}

async fn consumer_raw(id: usize, cx: Arc<Ctx>, ready: Arc<Barrier>) -> Res<()> {
    let (a, st) = (&cx.a, &cx.st);
    let hist = st.register_hist();
    let (mut rd, mut w, _) = raw_connect(&cx.uri, &format!("perf-consumer-{id}")).await?;
    if a.prefetch > 0 {
        let mut p = method(60, 10);
        p.extend_from_slice(&0u32.to_be_bytes());
        p.extend_from_slice(&a.prefetch.to_be_bytes());
        p.push(0);
        send_method(&mut w, 1, &p).await?;
        expect_method(&mut rd, 60, 11).await?;
    }
    let mut p = method(60, 20);
    p.extend_from_slice(&0u16.to_be_bytes());
    put_shortstr(&mut p, &cx.queue);
    put_shortstr(&mut p, &format!("perf-consumer-{id}"));
    p.push(if a.autoack { 0b10 } else { 0 });
    p.extend_from_slice(&0u32.to_be_bytes()); // empty arguments table
    send_method(&mut w, 1, &p).await?;
    expect_method(&mut rd, 60, 21).await?;
    ready.wait().await;

    let every = ack_every(a) as u64;
    let mut since = 0u64;
    let mut tag = 0u64;
    let mut remaining = 0u64; // body bytes still expected for the current message
    let mut first_body = false;
    let mut acks: Vec<u8> = Vec::with_capacity(16 * 1024);
    let ack_frame = |acks: &mut Vec<u8>, tag: u64, multiple: bool| {
        let mut p = [0u8; 13];
        p[..4].copy_from_slice(&[0, 60, 0, 80]);
        p[4..12].copy_from_slice(&tag.to_be_bytes());
        p[12] = multiple as u8;
        put_frame(acks, 1, 1, &p);
    };
    loop {
        rd.fill().await?;
        let now = now_nanos(); // all frames of this read arrived together
        let mut n = 0u64;
        {
            let mut h = hist.lock().unwrap();
            while let Some((ty, _ch, s, e)) = rd.parse()? {
                let p = &rd.buf[s..e];
                let mut done = false;
                match ty {
                    1 => {
                        let mut r = Rd(p, 0);
                        match (r.u16()?, r.u16()?) {
                            (60, 60) => {
                                let _ctag = r.shortstr()?;
                                tag = r.u64()?;
                            }
                            (60, 30) => return Ok(()), // basic.cancel (queue deleted)
                            _ => {
                                if let Some(err) = close_error(p) {
                                    return Err(err.into());
                                }
                            }
                        }
                    }
                    2 => {
                        remaining = Rd(p, 4).u64()?;
                        first_body = true;
                        done = remaining == 0;
                    }
                    3 => {
                        if first_body && p.len() >= 8 {
                            let ts = u64::from_le_bytes(p[..8].try_into().unwrap());
                            let us = now.saturating_sub(ts) / 1000;
                            h.saturating_record(us.clamp(1, HIST_MAX_US));
                        }
                        first_body = false;
                        remaining = remaining.saturating_sub(p.len() as u64);
                        done = remaining == 0;
                    }
                    _ => {}
                }
                if done {
                    n += 1;
                    if !a.autoack {
                        since += 1;
                        if since >= every {
                            ack_frame(&mut acks, tag, every > 1);
                            since = 0;
                        }
                    }
                }
            }
        }
        if n > 0 {
            st.consumed.fetch_add(n, Relaxed);
        }
        if !acks.is_empty() {
            w.write_all(&acks).await?;
            acks.clear();
        }
    }
}

// ---------------------------------------------------------------------------------------
// modes

async fn idle_mode(a: &Args) -> Res<()> {
    let uri = parse_uri(&a.uri)?;
    let rss0 = a.rss_pid.and_then(read_rss_kb);
    let t0 = Instant::now();
    let conns: Vec<_> = futures::stream::iter(0..a.idle_connections)
        .map(|i| {
            let uri = &uri;
            async move { amqprs_open(uri, &format!("perf-idle-{i}")).await }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let mut ok = Vec::with_capacity(conns.len());
    let mut failed = 0usize;
    for c in conns {
        match c {
            Ok(c) => ok.push(c),
            Err(e) => {
                failed += 1;
                if failed <= 3 {
                    eprintln!("WARN connection failed: {e}");
                }
            }
        }
    }
    let open_s = t0.elapsed().as_secs_f64();
    println!(
        "opened {} connections in {:.2}s ({} failed); holding {}s",
        ok.len(),
        open_s,
        failed,
        a.hold
    );
    tokio::time::sleep(Duration::from_secs(a.hold)).await;
    let rss1 = a.rss_pid.and_then(read_rss_kb);
    let mut line = format!(
        "IDLE connections={} failed={} open_s={:.2}",
        ok.len(),
        failed,
        open_s
    );
    if let (Some(r0), Some(r1)) = (rss0, rss1) {
        let per = (r1 as f64 - r0 as f64) * 1024.0 / ok.len().max(1) as f64;
        line += &format!(" rss_before_kb={r0} rss_after_kb={r1} rss_per_conn_bytes={per:.0}");
    }
    println!("{line}");
    for c in ok {
        let _ = c.close().await;
    }
    Ok(())
}

fn pct(h: &Histogram<u64>, q: f64) -> u64 {
    if h.is_empty() {
        0
    } else {
        h.value_at_quantile(q)
    }
}

async fn queue_depth(ch: &amqprs::channel::Channel, q: &str) -> i64 {
    use amqprs::channel::QueueDeclareArguments;
    let args = QueueDeclareArguments::new(q).passive(true).finish();
    match tokio::time::timeout(Duration::from_secs(2), ch.queue_declare(args)).await {
        Ok(Ok(Some((_, n, _)))) => n as i64,
        _ => -1,
    }
}

async fn run(a: Args) -> Res<()> {
    use amqprs::channel::{ExchangeDeclareArguments, QueueDeclareArguments, QueueDeleteArguments};
    use amqprs::{FieldTable, FieldValue};

    if a.size < 8 {
        eprintln!("WARN --size {} < 8; bodies are 8 bytes (timestamp)", a.size);
    }
    let uri = parse_uri(&a.uri)?;
    let st = Arc::new(Stats::default());

    // management connection: declare / depth / delete
    let mconn = amqprs_open(&uri, "perf-mgmt").await?;
    let mch = mconn.open_channel(None).await?;
    let fresh = a.queue.is_none();
    let queue = a
        .queue
        .clone()
        .unwrap_or_else(|| format!("perf-{}-{}", std::process::id(), now_nanos() / 1_000_000));
    let mut table = FieldTable::new();
    if a.ttl_dlx {
        let dlx = format!("{queue}.dlx");
        mch.exchange_declare(ExchangeDeclareArguments::new(&dlx, "fanout"))
            .await?;
        table.insert(
            "x-message-ttl".try_into().unwrap(),
            FieldValue::l(86_400_000),
        );
        table.insert(
            "x-dead-letter-exchange".try_into().unwrap(),
            FieldValue::from(dlx.as_str()),
        );
    }
    let qargs = QueueDeclareArguments::new(&queue)
        .durable(a.durable_queue)
        .arguments(table)
        .finish();
    mch.queue_declare(qargs).await?;
    let routing_key = queue.clone();

    let rss0 = a.rss_pid.and_then(read_rss_kb);
    let cx = Arc::new(Ctx {
        a: a.clone(),
        uri,
        queue: queue.clone(),
        routing_key,
        st: st.clone(),
    });

    // consumers first, wait until all are consuming
    let ready = Arc::new(Barrier::new(a.consumers + 1));
    let mut ctasks = Vec::new();
    for i in 0..a.consumers {
        let (cx, ready) = (cx.clone(), ready.clone());
        ctasks.push(tokio::spawn(async move {
            let st = cx.st.clone();
            let r = match cx.a.client {
                Client::Raw => consumer_raw(i, cx, ready).await,
                Client::Amqprs => consumer_amqprs(i, cx, ready).await,
                Client::Lapin => consumer_lapin(i, cx, ready).await,
            };
            if let Err(e) = r {
                fail(&format!("consumer {i}"), e, &st);
            }
        }));
    }
    ready.wait().await;

    let start = Arc::new(Barrier::new(a.producers + 1));
    let mut ptasks = Vec::new();
    for i in 0..a.producers {
        let (cx, start) = (cx.clone(), start.clone());
        ptasks.push(tokio::spawn(async move {
            let st = cx.st.clone();
            let r = match cx.a.client {
                Client::Raw => producer_raw(i, cx, start).await,
                Client::Amqprs => producer_amqprs(i, cx, start).await,
                Client::Lapin => producer_lapin(i, cx, start).await,
            };
            if let Err(e) = r {
                fail(&format!("producer {i}"), e, &st);
            }
        }));
    }
    start.wait().await;
    let t0 = Instant::now();
    println!(
        "START client={:?} queue={} producers={} consumers={} size={} confirm={} persistent={} durable_queue={} prefetch={} autoack={} rate={} multi_ack_every={} ttl_dlx={}",
        a.client, queue, a.producers, a.consumers, a.size.max(8), a.confirm, a.persistent,
        a.durable_queue, a.prefetch, a.autoack, a.rate, a.multi_ack_every, a.ttl_dlx
    );

    let mut total = new_hist();
    let mut interval = new_hist();
    let (mut last_p, mut last_c, mut last_k) = (0u64, 0u64, 0u64);
    let mut last_t = Instant::now();
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::from_std(t0 + Duration::from_secs(1)),
        Duration::from_secs(1),
    );
    let deadline = t0 + Duration::from_secs(a.duration);
    let expected = a.pmessages * a.producers as u64;
    let mut sec = 0u64;
    let end: Instant;
    loop {
        // end conditions
        let producers_finished =
            a.pmessages > 0 && st.producers_done.load(Relaxed) == a.producers as u64;
        let all_consumed = a.consumers == 0 || st.consumed.load(Relaxed) >= expected;
        if Instant::now() >= deadline || (producers_finished && all_consumed) {
            end = Instant::now();
            break;
        }
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::time::sleep(Duration::from_millis(20)) => { continue; }
        }
        sec += 1;
        let now = Instant::now();
        let dt = now.duration_since(last_t).as_secs_f64();
        let (p, c, k) = (
            st.published.load(Relaxed),
            st.consumed.load(Relaxed),
            st.confirmed.load(Relaxed),
        );
        interval.reset();
        st.drain_hists(&mut interval);
        let _ = total.add(&interval);
        let depth = queue_depth(&mch, &queue).await;
        println!(
            "TICK t={} publish_rate={:.0} consume_rate={:.0} confirm_rate={:.0} published={} consumed={} queued={} p50_us={} p99_us={} max_us={}",
            sec,
            (p - last_p) as f64 / dt,
            (c - last_c) as f64 / dt,
            (k - last_k) as f64 / dt,
            p,
            c,
            depth,
            pct(&interval, 0.5),
            pct(&interval, 0.99),
            interval.max()
        );
        (last_p, last_c, last_k, last_t) = (p, c, k, now);
    }
    // snapshot at the end of the measurement window (later deliveries are not counted)
    let elapsed = end.duration_since(t0).as_secs_f64().max(1e-9);
    let (p, c) = (st.published.load(Relaxed), st.consumed.load(Relaxed));
    interval.reset();
    st.drain_hists(&mut interval);
    let _ = total.add(&interval);
    st.stop.store(true, Relaxed);
    for t in ptasks {
        let _ = t.await; // producers wait (bounded) for outstanding confirms
    }
    let (k, n) = (st.confirmed.load(Relaxed), st.nacked.load(Relaxed));
    let depth = queue_depth(&mch, &queue).await;
    st.finished.store(true, Relaxed);
    for t in &ctasks {
        t.abort();
    }

    let mut mem = String::new();
    if let (Some(pid), Some(r0)) = (a.rss_pid, rss0) {
        if a.hold > 0 {
            tokio::time::sleep(Duration::from_secs(a.hold)).await;
        }
        if let Some(r1) = read_rss_kb(pid) {
            let q = if depth > 0 {
                depth as f64
            } else {
                p.saturating_sub(c).max(1) as f64
            };
            mem = format!(
                " rss_before_kb={r0} rss_after_kb={r1} rss_per_queued_msg_bytes={:.1}",
                (r1 as f64 - r0 as f64) * 1024.0 / q
            );
        }
    }

    if fresh && !a.keep_queue {
        let _ = mch.queue_delete(QueueDeleteArguments::new(&queue)).await;
        if a.ttl_dlx {
            let _ = mch
                .exchange_delete(amqprs::channel::ExchangeDeleteArguments::new(&format!(
                    "{queue}.dlx"
                )))
                .await;
        }
    }
    println!(
        "RESULT client={:?} producers={} consumers={} size={} duration_s={:.2} published={} consumed={} confirmed={} nacked={} publish_rate={:.0} consume_rate={:.0} backlog={} queued={} p50_us={} p95_us={} p99_us={} p999_us={} max_us={} mean_us={:.1} samples={}{}",
        a.client,
        a.producers,
        a.consumers,
        a.size.max(8),
        elapsed,
        p,
        c,
        k,
        n,
        p as f64 / elapsed,
        c as f64 / elapsed,
        p.saturating_sub(c),
        depth,
        pct(&total, 0.5),
        pct(&total, 0.95),
        pct(&total, 0.99),
        pct(&total, 0.999),
        total.max(),
        total.mean(),
        total.len(),
        mem
    );
    let _ = mch.close().await;
    let _ = mconn.close().await;
    Ok(())
}

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
