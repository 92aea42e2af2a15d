//! Message rates (sampled from the broker's, queues' and exchanges' counters, every 5 s by default),
//! stream connections' byte rates, and the
//! Prometheus text exposition at `/metrics`, with RabbitMQ's metric names.

use super::AdminState;
use crate::broker::exchange::ExchangeTotals;
use crate::broker::{Broker, Counters, CHANNEL_COUNTS};
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::fmt::Write;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// Totals of one counter set at one sample.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Totals {
    pub publish: u64,
    pub deliver_get: u64,
    pub ack: u64,
    pub redeliver: u64,
    /// Shown for queues only (`message_stats.dead_lettered`).
    pub dead_lettered: u64,
    /// The counts named in [`MORE`], in its order.
    pub more: [u64; 8],
}

/// The `message_stats` counts beside publish, deliver_get, ack and
/// redeliver: the deliveries by kind ([`deliveries`]; a queue shows these
/// five), then confirms and unroutable messages returned and dropped (the
/// overview and a vhost show all eight).
pub const MORE: [&str; 8] = [
    "deliver",
    "deliver_no_ack",
    "get",
    "get_no_ack",
    "get_empty",
    "confirm",
    "return_unroutable",
    "drop_unroutable",
];

impl Totals {
    pub fn of(c: &Counters) -> Totals {
        let [d, dn, g, gn, ge] = deliveries(c);
        let returned = Counters::get(&c.returned);
        Totals {
            publish: Counters::get(&c.published),
            deliver_get: Counters::get(&c.delivered),
            ack: Counters::get(&c.acked),
            redeliver: Counters::get(&c.redelivered),
            dead_lettered: Counters::get(&c.dead_lettered),
            more: [
                d,
                dn,
                g,
                gn,
                ge,
                Counters::get(&c.confirmed),
                returned,
                Counters::get(&c.unroutable).saturating_sub(returned),
            ],
        }
    }
}

/// Per-second rates over the last sample interval.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RateSet {
    pub publish: f64,
    pub deliver_get: f64,
    pub ack: f64,
    pub redeliver: f64,
    pub dead_lettered: f64,
    /// The rates of the counts named in [`MORE`].
    pub more: [f64; 8],
}

fn rate(now: &Totals, then: &Totals, secs: f64) -> RateSet {
    let r = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
    RateSet {
        publish: r(now.publish, then.publish),
        deliver_get: r(now.deliver_get, then.deliver_get),
        ack: r(now.ack, then.ack),
        redeliver: r(now.redeliver, then.redeliver),
        dead_lettered: r(now.dead_lettered, then.dead_lettered),
        more: std::array::from_fn(|i| r(now.more[i], then.more[i])),
    }
}

/// Totals sampled now against the previous sample's, `secs` apart (zero
/// rates for a first sample).
fn rates_since<K: std::hash::Hash + Eq>(
    now: HashMap<K, Totals>,
    old: &HashMap<K, (Totals, RateSet)>,
    secs: Option<f64>,
) -> HashMap<K, (Totals, RateSet)> {
    now.into_iter()
        .map(|(k, t)| {
            let r = match (old.get(&k), secs) {
                (Some((prev, _)), Some(d)) => rate(&t, prev, d),
                _ => RateSet::default(),
            };
            (k, (t, r))
        })
        .collect()
}

#[derive(Debug, Default)]
struct Sampled {
    at: Option<Instant>,
    global: Totals,
    global_rate: RateSet,
    /// Keyed by (vhost, queue).
    queues: HashMap<(String, String), (Totals, RateSet)>,
    /// Keyed by vhost.
    vhosts: HashMap<String, (Totals, RateSet)>,
    /// Keyed by (vhost, exchange).
    exchanges: HashMap<(String, String), (ExchangeTotals, ExchangeRates)>,
    /// Connections' (`recv_oct`, `send_oct`) and their rates, by
    /// connection id.
    connections: HashMap<u64, ((u64, u64), OctetRates)>,
    /// Channels' counts, by (connection id, channel number).
    channels: HashMap<(u64, u16), ChannelSample>,
    /// The node's churn counts ([`Broker::churn`]'s order) and their rates.
    churn: ([u64; 7], [f64; 7]),
}

/// A channel's counts ([`CHANNEL_COUNTS`]) at the last sample, their rates,
/// and since when (ms since the epoch) they have not changed: the sample
/// that first saw them as they are.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ChannelSample {
    pub counts: [u64; 12],
    pub rates: [f64; 12],
    pub unchanged_since: u64,
}

/// Per-second rates of the counts `now` against `then`, `secs` apart.
fn per_sec<const N: usize>(now: &[u64; N], then: &[u64; N], secs: f64) -> [f64; N] {
    std::array::from_fn(|i| now[i].saturating_sub(then[i]) as f64 / secs)
}

/// A channel's sample from its `counts` now (`now_ms`, ms since the epoch)
/// and its previous one, `secs` ago; None before it (rates zero).
fn channel_sample(
    counts: [u64; 12],
    prev: Option<&ChannelSample>,
    secs: Option<f64>,
    now_ms: u64,
) -> ChannelSample {
    match (prev, secs) {
        (Some(p), Some(d)) => ChannelSample {
            counts,
            rates: per_sec(&counts, &p.counts, d),
            unchanged_since: if counts == p.counts {
                p.unchanged_since
            } else {
                now_ms
            },
        },
        _ => ChannelSample {
            counts,
            rates: [0.0; 12],
            unchanged_since: now_ms,
        },
    }
}

/// A connection's bytes per second over the last sample interval.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct OctetRates {
    pub recv_oct: f64,
    pub send_oct: f64,
}

/// An exchange's per-second rates over the last sample interval.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ExchangeRates {
    pub publish_in: f64,
    pub publish_out: f64,
    pub alternate_out: f64,
}

fn exchange_rate(now: &ExchangeTotals, then: &ExchangeTotals, secs: f64) -> ExchangeRates {
    let r = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
    ExchangeRates {
        publish_in: r(now.publish_in, then.publish_in),
        publish_out: r(now.publish_out, then.publish_out),
        alternate_out: r(now.alternate_out, then.alternate_out),
    }
}

/// The latest rates, shared by the sampler task and the handlers.
#[derive(Debug, Default)]
pub struct Rates {
    inner: Mutex<Sampled>,
}

impl Rates {
    pub fn new() -> Arc<Rates> {
        Arc::new(Rates::default())
    }

    /// Take a sample now (the sampler task calls this periodically).
    pub fn sample(&self, broker: &Broker) {
        let now = Instant::now();
        let global = Totals::of(&broker.counters);
        let mut queues = HashMap::new();
        let mut exchanges = HashMap::new();
        let mut vhosts = HashMap::new();
        for vhost in broker.vhosts() {
            vhosts.insert(vhost.name.to_string(), Totals::of(&vhost.counters));
            for q in vhost.queues() {
                queues.insert(
                    (vhost.name.to_string(), q.name().to_string()),
                    Totals::of(&q.counters),
                );
            }
            for e in vhost.exchanges() {
                exchanges.insert(
                    (vhost.name.to_string(), e.name.to_string()),
                    e.stats.totals(),
                );
            }
        }
        let open = broker.connections();
        let connections: Vec<(u64, (u64, u64))> =
            open.iter().map(|c| (c.id, c.socket.octets())).collect();
        let channels: Vec<((u64, u16), [u64; 12])> = open
            .iter()
            .flat_map(|c| {
                let chans = c.open_channels.lock();
                chans
                    .iter()
                    .map(|(n, st)| ((c.id, *n), st.counts()))
                    .collect::<Vec<_>>()
            })
            .collect();
        let churn = broker.churn().map(|(_, n)| n);
        let now_ms = crate::clock::now_ms();
        let mut s = self.inner.lock();
        let secs =
            s.at.map(|t| now.duration_since(t).as_secs_f64())
                .filter(|&d| d > 0.0);
        s.global_rate = secs
            .map(|d| rate(&global, &s.global, d))
            .unwrap_or_default();
        s.global = global;
        s.queues = rates_since(queues, &s.queues, secs);
        s.vhosts = rates_since(vhosts, &s.vhosts, secs);
        let old = std::mem::take(&mut s.exchanges);
        s.exchanges = exchanges
            .into_iter()
            .map(|(k, t)| {
                let r = match (old.get(&k), secs) {
                    (Some((prev, _)), Some(d)) => exchange_rate(&t, prev, d),
                    _ => ExchangeRates::default(),
                };
                (k, (t, r))
            })
            .collect();
        let old = std::mem::take(&mut s.connections);
        s.connections = connections
            .into_iter()
            .map(|(id, (recv, send))| {
                let r = match (old.get(&id), secs) {
                    (Some(((r0, s0), _)), Some(d)) => OctetRates {
                        recv_oct: recv.saturating_sub(*r0) as f64 / d,
                        send_oct: send.saturating_sub(*s0) as f64 / d,
                    },
                    _ => OctetRates::default(),
                };
                (id, ((recv, send), r))
            })
            .collect();
        let old = std::mem::take(&mut s.channels);
        s.channels = channels
            .into_iter()
            .map(|(k, counts)| (k, channel_sample(counts, old.get(&k), secs, now_ms)))
            .collect();
        let churn_rates = secs
            .map(|d| per_sec(&churn, &s.churn.0, d))
            .unwrap_or_default();
        s.churn = (churn, churn_rates);
        s.at = Some(now);
    }

    /// A channel's last sample (None before one saw it).
    pub fn channel(&self, connection: u64, channel: u16) -> Option<ChannelSample> {
        self.inner
            .lock()
            .channels
            .get(&(connection, channel))
            .copied()
    }

    /// The rates of the node's churn counts, in [`Broker::churn`]'s order.
    pub fn churn(&self) -> [f64; 7] {
        self.inner.lock().churn.1
    }

    /// A connection's byte rates (zero before two samples saw it).
    pub fn connection(&self, id: u64) -> OctetRates {
        self.inner
            .lock()
            .connections
            .get(&id)
            .map(|(_, r)| *r)
            .unwrap_or_default()
    }

    pub fn global(&self) -> RateSet {
        self.inner.lock().global_rate
    }

    pub fn queue(&self, vhost: &str, queue: &str) -> RateSet {
        self.inner
            .lock()
            .queues
            .get(&(vhost.to_string(), queue.to_string()))
            .map(|(_, r)| *r)
            .unwrap_or_default()
    }

    pub fn vhost(&self, vhost: &str) -> RateSet {
        self.inner
            .lock()
            .vhosts
            .get(vhost)
            .map(|(_, r)| *r)
            .unwrap_or_default()
    }

    pub fn exchange(&self, vhost: &str, exchange: &str) -> ExchangeRates {
        self.inner
            .lock()
            .exchanges
            .get(&(vhost.to_string(), exchange.to_string()))
            .map(|(_, r)| *r)
            .unwrap_or_default()
    }
}

/// RabbitMQ's `message_stats` of an exchange (`publish_in`, `publish_out`),
/// with warren's `alternate_out` (messages passed to its alternate exchange).
pub fn exchange_stats(t: &ExchangeTotals, r: &ExchangeRates) -> serde_json::Value {
    serde_json::json!({
        "publish_in": t.publish_in,
        "publish_in_details": super::details(r.publish_in),
        "publish_out": t.publish_out,
        "publish_out_details": super::details(r.publish_out),
        "alternate_out": t.alternate_out,
        "alternate_out_details": super::details(r.alternate_out),
    })
}

/// Sample every `every` until the broker is dropped.
pub fn spawn_sampler(broker: Weak<Broker>, rates: Arc<Rates>, every: Duration) {
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let Some(broker) = broker.upgrade() else {
                return;
            };
            rates.sample(&broker);
        }
    });
}

/// RabbitMQ's `message_stats` object for a set of totals and rates.
pub fn message_stats(t: &Totals, r: &RateSet) -> serde_json::Value {
    serde_json::json!({
        "publish": t.publish,
        "publish_details": super::details(r.publish),
        "deliver_get": t.deliver_get,
        "deliver_get_details": super::details(r.deliver_get),
        "ack": t.ack,
        "ack_details": super::details(r.ack),
        "redeliver": t.redeliver,
        "redeliver_details": super::details(r.redeliver),
    })
}

/// A channel's `message_stats`: its [`CHANNEL_COUNTS`] and their rates
/// (zero before a sample saw the channel).
pub fn channel_stats(counts: &[u64; 12], rates: Option<&[f64; 12]>) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for (i, k) in CHANNEL_COUNTS.iter().enumerate() {
        m.insert((*k).into(), counts[i].into());
        let r = rates.map_or(0.0, |r| r[i]);
        m.insert(format!("{k}_details"), super::details(r));
    }
    serde_json::Value::Object(m)
}

/// Of the messages delivered (`deliver_get`): to consumers that ack, to
/// no-ack consumers, by basic.get with and without ack; and the basic.gets
/// that found nothing: the first five counts of [`MORE`].
fn deliveries(c: &Counters) -> [u64; 5] {
    let get = Counters::get;
    let (no_ack, got, got_no_ack) = (get(&c.delivered_no_ack), get(&c.got), get(&c.got_no_ack));
    let deliver = get(&c.delivered).saturating_sub(no_ack + got + got_no_ack);
    [deliver, no_ack, got, got_no_ack, get(&c.get_empty)]
}

/// [`message_stats`] with the first `n` counts of [`MORE`] and their rates.
fn stats_with(t: &Totals, r: &RateSet, n: usize) -> serde_json::Value {
    let mut v = message_stats(t, r);
    if let serde_json::Value::Object(m) = &mut v {
        for (i, k) in MORE.iter().enumerate().take(n) {
            m.insert((*k).into(), t.more[i].into());
            m.insert(format!("{k}_details"), super::details(r.more[i]));
        }
    }
    v
}

/// The `message_stats` of the node's overview and of a vhost: those of
/// [`message_stats`] and every count of [`MORE`], with their rates.
pub fn full_stats(c: &Counters, r: &RateSet) -> serde_json::Value {
    stats_with(&Totals::of(c), r, MORE.len())
}

/// A queue's `message_stats`: [`message_stats`], its [`deliveries`], and
/// warren's `dead_lettered` (messages it dead-lettered to its dead-letter
/// exchange), with their rates.
pub fn queue_stats(c: &Counters, r: &RateSet) -> serde_json::Value {
    let t = Totals::of(c);
    let mut v = stats_with(&t, r, 5);
    if let serde_json::Value::Object(m) = &mut v {
        m.insert("dead_lettered".into(), t.dead_lettered.into());
        m.insert(
            "dead_lettered_details".into(),
            super::details(r.dead_lettered),
        );
    }
    v
}

/// Resident memory of this process from `/proc/self/status` (VmRSS), in bytes.
pub fn resident_memory() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Escape a label value for the text format.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn metric(out: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
    );
}

/// Every queue's figures (of the vhosts in `only`, or all), by vhost and
/// name: (vhost, queue, stats), a stream's consumers counting its Stream
/// protocol subscriptions.
fn queue_lines(
    broker: &Broker,
    only: Option<&[&str]>,
) -> Vec<(String, String, crate::broker::queue::QueueStats)> {
    let mut lines = Vec::new();
    for v in broker.vhosts() {
        if only.is_some_and(|only| !only.contains(&&*v.name)) {
            continue;
        }
        for q in v.queues() {
            let mut s = q.stats(crate::clock::now_ms());
            if q.stream().is_some() {
                s.consumers += super::stream::subscriptions_to(broker, &v.name, q.name());
            }
            lines.push((v.name.to_string(), q.name().to_string(), s));
        }
    }
    lines.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    lines
}

/// `rabbitmq_identity_info` and `rabbitmq_build_info`, which every
/// exposition starts with.
fn identity(out: &mut String, broker: &Broker) {
    let _ = writeln!(
        out,
        "# HELP rabbitmq_identity_info RabbitMQ node & cluster identity info\n\
         # TYPE rabbitmq_identity_info untyped\n\
         rabbitmq_identity_info{{rabbitmq_node=\"{}\",rabbitmq_cluster=\"{}\",rabbitmq_cluster_permanent_id=\"{}\"}} 1",
        label(&broker.node),
        label(&broker.cluster_name()),
        label(&format!("warren-cluster-id-{}", broker.node)),
    );
    let _ = writeln!(
        out,
        "# HELP rabbitmq_build_info RabbitMQ & Erlang/OTP version info\n\
         # TYPE rabbitmq_build_info untyped\n\
         rabbitmq_build_info{{rabbitmq_version=\"{}\",prometheus_plugin_version=\"{}\",product=\"warren\",product_version=\"{}\"}} 1",
        super::overview::RABBITMQ_VERSION,
        super::overview::RABBITMQ_VERSION,
        env!("CARGO_PKG_VERSION"),
    );
}

/// Per-queue gauges of the detailed families: (family, metric, help, pick
/// from ready, unacked, consumers, ready bytes, unacked bytes, messages,
/// bytes).
const DETAILED_QUEUE: [(&str, &str, &str, usize); 8] = [
    (
        "queue_coarse_metrics",
        "rabbitmq_detailed_queue_messages_ready",
        "Messages ready to be delivered to consumers",
        0,
    ),
    (
        "queue_coarse_metrics",
        "rabbitmq_detailed_queue_messages_unacked",
        "Messages delivered to consumers but not yet acknowledged",
        1,
    ),
    (
        "queue_coarse_metrics",
        "rabbitmq_detailed_queue_messages",
        "Sum of ready and unacknowledged messages - total queue depth",
        5,
    ),
    (
        "queue_consumer_count",
        "rabbitmq_detailed_queue_consumers",
        "Consumers on a queue",
        2,
    ),
    (
        "queue_metrics",
        "rabbitmq_detailed_queue_consumers",
        "Consumers on a queue",
        2,
    ),
    (
        "queue_metrics",
        "rabbitmq_detailed_queue_messages_ready_bytes",
        "Size in bytes of ready messages",
        3,
    ),
    (
        "queue_metrics",
        "rabbitmq_detailed_queue_messages_unacked_bytes",
        "Size in bytes of all unacknowledged messages",
        4,
    ),
    (
        "queue_metrics",
        "rabbitmq_detailed_queue_messages_bytes",
        "Size in bytes of ready and unacknowledged messages",
        6,
    ),
];

/// Gauge `name`, one line per queue of `lines` labelled with its vhost and
/// name, its value [`pick`]ed by `which`.
fn per_queue(
    out: &mut String,
    name: &str,
    help: &str,
    lines: &[(String, String, crate::broker::queue::QueueStats)],
    which: usize,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
    for (vhost, queue, s) in lines {
        let _ = writeln!(
            out,
            "{name}{{vhost=\"{}\",queue=\"{}\"}} {}",
            label(vhost),
            label(queue),
            pick(s, which)
        );
    }
}

fn pick(s: &crate::broker::queue::QueueStats, which: usize) -> usize {
    [
        s.ready,
        s.unacked,
        s.consumers,
        s.ready_bytes,
        s.unacked_bytes,
        s.ready + s.unacked,
        s.ready_bytes + s.unacked_bytes,
    ][which]
}

/// `/metrics/detailed`: the metric families named by the `family`
/// parameters, per object, as `rabbitmq_prometheus` names them (queue
/// families restricted to the `vhost` parameters' vhosts when given):
/// `queue_coarse_metrics`, `queue_consumer_count`, `queue_metrics` (the
/// figures warren keeps), `exchange_names`, `exchange_bindings`,
/// `vhost_status`. Families it does not know give nothing, as there.
pub fn render_detailed(state: &AdminState, params: &[(String, String)]) -> String {
    let broker = &*state.broker;
    let mut out = String::new();
    identity(&mut out, broker);
    let families: Vec<&str> = params
        .iter()
        .filter(|(k, _)| k == "family")
        .map(|(_, v)| v.as_str())
        .collect();
    let vhosts: Vec<&str> = params
        .iter()
        .filter(|(k, _)| k == "vhost")
        .map(|(_, v)| v.as_str())
        .collect();
    let asked = |f: &str| families.contains(&f);
    if DETAILED_QUEUE.iter().any(|(f, ..)| asked(f)) {
        let lines = queue_lines(broker, (!vhosts.is_empty()).then_some(&vhosts[..]));
        let mut done: Vec<&str> = Vec::new();
        for (family, name, help, which) in DETAILED_QUEUE {
            if !asked(family) || done.contains(&name) {
                continue;
            }
            done.push(name);
            per_queue(&mut out, name, help, &lines, which);
        }
    }
    for (family, name, help) in [
        (
            "exchange_names",
            "rabbitmq_cluster_exchange_name",
            "Enumerates exchanges without any additional info. This value is cluster-wide. A cheaper alternative to `exchange_bindings`",
        ),
        (
            "exchange_bindings",
            "rabbitmq_cluster_exchange_bindings",
            "Number of bindings for an exchange. This value is cluster-wide.",
        ),
    ] {
        if !asked(family) {
            continue;
        }
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for v in broker.vhosts() {
            for e in v.exchanges().iter().filter(|e| !e.name.is_empty()) {
                let value = match family {
                    "exchange_bindings" => e.bindings().len(),
                    _ => 1,
                };
                let _ = writeln!(
                    out,
                    "{name}{{vhost=\"{}\",exchange=\"{}\",type=\"{}\"}} {value}",
                    label(&v.name),
                    label(&e.name),
                    e.type_name()
                );
            }
        }
    }
    if asked("vhost_status") {
        let name = "rabbitmq_cluster_vhost_status";
        let _ = writeln!(
            out,
            "# HELP {name} Whether a given vhost is running\n# TYPE {name} gauge"
        );
        for v in broker.vhosts() {
            let _ = writeln!(out, "{name}{{vhost=\"{}\"}} 1", label(&v.name));
        }
    }
    out
}

/// The Prometheus text exposition of the node, as RabbitMQ's
/// `rabbitmq_prometheus` gives it: queue figures summed over the node's
/// queues (its default, `/metrics`), or one line per queue labelled with its
/// vhost and name (`per_object`: `/metrics/per-object`, and warren's admin
/// `/metrics`).
pub fn render(state: &AdminState, per_object: bool) -> String {
    let broker = &*state.broker;
    let mut out = String::new();
    identity(&mut out, broker);
    let c = &broker.counters;
    let churn = broker.churn();
    let connections = broker.connections();
    let channels: u64 = connections
        .iter()
        .map(|c| u64::from(c.channels.load(std::sync::atomic::Ordering::Relaxed)))
        .sum();
    let queue_lines = queue_lines(broker, None);
    let consumers: u64 = queue_lines.iter().map(|(_, _, s)| s.consumers as u64).sum();
    metric(
        &mut out,
        "rabbitmq_connections",
        "gauge",
        "Connections currently open",
        connections.len() as u64,
    );
    metric(
        &mut out,
        "rabbitmq_channels",
        "gauge",
        "Channels currently open",
        channels,
    );
    metric(
        &mut out,
        "rabbitmq_consumers",
        "gauge",
        "Consumers currently connected",
        consumers,
    );
    metric(
        &mut out,
        "rabbitmq_queues",
        "gauge",
        "Queues available",
        queue_lines.len() as u64,
    );
    metric(
        &mut out,
        "rabbitmq_global_messages_received_total",
        "counter",
        "Total number of messages received from publishers",
        Counters::get(&c.published),
    );
    metric(
        &mut out,
        "rabbitmq_global_messages_delivered_total",
        "counter",
        "Total number of messages delivered to consumers",
        Counters::get(&c.delivered),
    );
    metric(
        &mut out,
        "rabbitmq_global_messages_acknowledged_total",
        "counter",
        "Total number of messages acknowledged by consumers",
        Counters::get(&c.acked),
    );
    metric(
        &mut out,
        "rabbitmq_global_messages_redelivered_total",
        "counter",
        "Total number of messages redelivered to consumers",
        Counters::get(&c.redelivered),
    );
    metric(
        &mut out,
        "rabbitmq_global_messages_unroutable_dropped_total",
        "counter",
        "Total number of messages published as non-mandatory into an exchange and dropped as unroutable",
        Counters::get(&c.unroutable).saturating_sub(Counters::get(&c.returned)),
    );
    metric(
        &mut out,
        "rabbitmq_global_messages_unroutable_returned_total",
        "counter",
        "Total number of messages published as mandatory into an exchange and returned to the publisher as unroutable",
        Counters::get(&c.returned),
    );
    metric(
        &mut out,
        "rabbitmq_global_messages_confirmed_total",
        "counter",
        "Total number of messages confirmed to publishers",
        Counters::get(&c.confirmed),
    );
    metric(
        &mut out,
        "rabbitmq_global_messages_routed_total",
        "counter",
        "Total number of messages routed to queues or streams",
        Counters::get(&c.published).saturating_sub(Counters::get(&c.unroutable)),
    );
    // `delivered` counts basic.get's too (see `Counters`).
    let (delivered, no_ack) = (
        Counters::get(&c.delivered),
        Counters::get(&c.delivered_no_ack),
    );
    let (got, got_no_ack) = (Counters::get(&c.got), Counters::get(&c.got_no_ack));
    for (name, help, value) in [
        (
            "rabbitmq_global_messages_delivered_consume_auto_ack_total",
            "Total number of messages delivered to consumers using basic.consume with automatic acknowledgment",
            no_ack,
        ),
        (
            "rabbitmq_global_messages_delivered_consume_manual_ack_total",
            "Total number of messages delivered to consumers using basic.consume with manual acknowledgment",
            delivered.saturating_sub(no_ack + got + got_no_ack),
        ),
        (
            "rabbitmq_global_messages_delivered_get_auto_ack_total",
            "Total number of messages delivered to consumers using basic.get with automatic acknowledgment",
            got_no_ack,
        ),
        (
            "rabbitmq_global_messages_delivered_get_manual_ack_total",
            "Total number of messages delivered to consumers using basic.get with manual acknowledgment",
            got,
        ),
        (
            "rabbitmq_global_messages_get_empty_total",
            "Total number of times basic.get operations fetched no message",
            Counters::get(&c.get_empty),
        ),
    ] {
        metric(&mut out, name, "counter", help, value);
    }
    for (key, name, help) in [
        (
            "connection_created",
            "rabbitmq_connections_opened_total",
            "Total number of connections opened",
        ),
        (
            "connection_closed",
            "rabbitmq_connections_closed_total",
            "Total number of connections closed or terminated",
        ),
        (
            "channel_created",
            "rabbitmq_channels_opened_total",
            "Total number of channels opened",
        ),
        (
            "channel_closed",
            "rabbitmq_channels_closed_total",
            "Total number of channels closed",
        ),
        (
            "queue_declared",
            "rabbitmq_queues_declared_total",
            "Total number of queues declared",
        ),
        (
            "queue_created",
            "rabbitmq_queues_created_total",
            "Total number of queues created",
        ),
        (
            "queue_deleted",
            "rabbitmq_queues_deleted_total",
            "Total number of queues deleted",
        ),
    ] {
        let value = churn.iter().find(|(k, _)| *k == key).map_or(0, |(_, v)| *v);
        metric(&mut out, name, "counter", help, value);
    }
    // Login attempts per protocol (RabbitMQ's `rabbitmq_auth_attempts_*`).
    for (name, help, pick) in [
        (
            "rabbitmq_auth_attempts_total",
            "Total number of authentication attempts",
            0,
        ),
        (
            "rabbitmq_auth_attempts_succeeded_total",
            "Total number of successful authentication attempts",
            1,
        ),
        (
            "rabbitmq_auth_attempts_failed_total",
            "Total number of failed authentication attempts",
            2,
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
        for p in crate::broker::AuthProtocol::ALL {
            let (ok, failed) = broker.auth_attempts.get(p);
            let value = [ok + failed, ok, failed][pick];
            let _ = writeln!(out, "{name}{{protocol=\"{}\"}} {value}", p.name());
        }
    }
    metric(
        &mut out,
        "rabbitmq_alarms_memory_used_watermark",
        "gauge",
        "is set to 1 when the memory alarm is in effect",
        u64::from(broker.memory_alarm()),
    );
    metric(
        &mut out,
        "rabbitmq_alarms_free_disk_space_watermark",
        "gauge",
        "is set to 1 when the free disk space alarm is in effect",
        u64::from(broker.disk_alarm()),
    );
    if let Some(rss) = resident_memory() {
        metric(
            &mut out,
            "rabbitmq_process_resident_memory_bytes",
            "gauge",
            "Memory used in bytes",
            rss,
        );
    }
    let max_fds = super::charts::fd_total().unwrap_or(0);
    for (name, help, value) in [
        (
            "rabbitmq_resident_memory_limit_bytes",
            "Memory high watermark in bytes",
            broker.memory_watermark(),
        ),
        (
            "rabbitmq_disk_space_available_bytes",
            "Disk space available in bytes",
            super::charts::disk_free(broker, state.data_dir.as_deref()),
        ),
        (
            "rabbitmq_disk_space_available_limit_bytes",
            "Free disk space low watermark in bytes",
            broker.disk_free_limit(),
        ),
        (
            "rabbitmq_process_open_fds",
            "Open file descriptors",
            super::charts::fd_used() as u64,
        ),
        (
            "rabbitmq_process_max_fds",
            "Open file descriptors limit",
            max_fds,
        ),
        (
            "rabbitmq_process_open_tcp_sockets",
            "Open TCP sockets",
            connections.len() as u64,
        ),
        (
            "rabbitmq_process_max_tcp_sockets",
            "Open TCP sockets limit",
            max_fds,
        ),
    ] {
        metric(&mut out, name, "gauge", help, value);
    }
    let _ = writeln!(
        out,
        "# HELP rabbitmq_erlang_uptime_seconds Node uptime\n\
         # TYPE rabbitmq_erlang_uptime_seconds gauge\n\
         rabbitmq_erlang_uptime_seconds {:.3}",
        crate::clock::now_ms().saturating_sub(state.started_at) as f64 / 1000.0
    );
    for (name, help, pick) in [
        (
            "rabbitmq_queue_messages_ready",
            "Messages ready to be delivered to consumers",
            0,
        ),
        (
            "rabbitmq_queue_messages_unacked",
            "Messages delivered to consumers but not yet acknowledged",
            1,
        ),
        ("rabbitmq_queue_consumers", "Consumers on a queue", 2),
        (
            "rabbitmq_queue_messages_ready_bytes",
            "Size in bytes of ready messages",
            3,
        ),
        (
            "rabbitmq_queue_messages_unacked_bytes",
            "Size in bytes of all unacknowledged messages",
            4,
        ),
        (
            "rabbitmq_queue_messages",
            "Sum of ready and unacknowledged messages - total queue depth",
            5,
        ),
        (
            "rabbitmq_queue_messages_bytes",
            "Size in bytes of ready and unacknowledged messages",
            6,
        ),
    ] {
        if per_object {
            per_queue(&mut out, name, help, &queue_lines, pick);
        } else {
            let sum: usize = queue_lines
                .iter()
                .map(|(_, _, s)| self::pick(s, pick))
                .sum();
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {sum}"
            );
        }
    }
    out
}

/// `GET /metrics` of the admin API: one line per queue; no authentication,
/// like RabbitMQ's prometheus plugin.
pub async fn prometheus(State(state): State<AdminState>) -> impl IntoResponse {
    exposition(render(&state, true))
}

fn exposition(body: String) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
}

/// The Prometheus listener's routes (`prometheus_port`, 15692), as
/// `rabbitmq_prometheus` serves them: `/metrics` with the queue figures
/// summed over the node, `/metrics/per-object` with one line per queue,
/// `/metrics/detailed` with the families asked for ([`render_detailed`]).
pub fn prometheus_routes(state: AdminState) -> axum::Router {
    use axum::routing::get;
    axum::Router::new()
        .route(
            "/metrics",
            get(|State(s): State<AdminState>| async move { exposition(render(&s, false)) }),
        )
        .route(
            "/metrics/per-object",
            get(|State(s): State<AdminState>| async move { exposition(render(&s, true)) }),
        )
        .route(
            "/metrics/detailed",
            get(
                |State(s): State<AdminState>,
                 axum::extract::Query(params): axum::extract::Query<Vec<(String, String)>>| async move {
                    exposition(render_detailed(&s, &params))
                },
            ),
        )
        .fallback(|| async { (axum::http::StatusCode::NOT_FOUND, "Not Found") })
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_channel_sample_has_rates_and_the_time_its_counts_stopped() {
        let first = channel_sample([0; 12], None, None, 1_000);
        assert_eq!((first.rates, first.unchanged_since), ([0.0; 12], 1_000));
        let mut counts = [0; 12];
        counts[0] = 50; // publish
        let busy = channel_sample(counts, Some(&first), Some(5.0), 6_000);
        assert_eq!(busy.rates[0], 10.0);
        assert_eq!(busy.unchanged_since, 6_000, "moved in this interval");
        let quiet = channel_sample(counts, Some(&busy), Some(5.0), 11_000);
        assert_eq!(quiet.rates, [0.0; 12]);
        assert_eq!(quiet.unchanged_since, 6_000, "as they were at 6 s");
        let json = channel_stats(&quiet.counts, Some(&busy.rates));
        assert_eq!(json["publish"], 50);
        assert_eq!(json["publish_details"]["rate"], 10.0);
        assert_eq!(json["ack_details"]["rate"], 0.0);
    }
}
