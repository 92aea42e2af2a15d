//! The charts' data on RabbitMQ's own endpoints: the sampler task that feeds
//! [`History`], and RabbitMQ's range parameters (`lengths_age` / `_incr`,
//! `msg_rates_*`, `node_stats_*`, in seconds) on `/api/queues/{vhost}/{name}`,
//! `/api/exchanges/{vhost}/{name}`, `/api/nodes/{node}` and `/api/overview`.
//! With a range, a `*_details` object carries `samples` (newest first,
//! `{"sample", "timestamp"}`; running totals for message counters, values for
//! gauges), `avg` and `avg_rate`, as RabbitMQ's do. A stream's queue, with a
//! `lengths` range, also has its size and stored consumer offsets over time
//! (see [`stream_samples`]).
//!
//! warren's own additions: a queue's `message_stats.dead_lettered`, and an
//! exchange's `message_stats.alternate_out` (messages it passed to its
//! alternate exchange) next to RabbitMQ's `publish_in` / `publish_out`.

use super::history::{
    widen, ExchangePoint, History, Key, NodePoint, QueuePoint, QueueTotals, Snapshot, StreamPoint,
    StreamTotals, MAX_OFFSETS,
};
use super::{AdminState, ApiError, ApiResult, Caller};
use crate::broker::{Broker, Counters};
use axum::extract::{Path, Query, State};
use axum::Json;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// Record a snapshot into `history` whenever a slot is due (checked every
/// `every`), until the broker is dropped.
pub fn spawn_sampler(
    broker: Weak<Broker>,
    history: Arc<History>,
    data_dir: Option<PathBuf>,
    every: Duration,
) {
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(every.min(Duration::from_secs(5)));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let Some(broker) = broker.upgrade() else {
                return;
            };
            let now = crate::clock::now_ms();
            if history.due(now) {
                let snap = snapshot(&broker, data_dir.as_deref(), now);
                history.record(now, &snap);
            }
        }
    });
}

/// Read every counter and gauge the history keeps.
pub fn snapshot(broker: &Broker, data_dir: Option<&std::path::Path>, now: u64) -> Snapshot {
    let mut snap = Snapshot::default();
    for v in broker.vhosts() {
        for q in v.queues() {
            let st = q.stats(now);
            let c = &q.counters;
            snap.queues.insert(
                (v.name.to_string(), q.name().to_string()),
                QueueTotals {
                    publish: Counters::get(&c.published),
                    deliver_get: Counters::get(&c.delivered),
                    ack: Counters::get(&c.acked),
                    redeliver: Counters::get(&c.redelivered),
                    dead_lettered: Counters::get(&c.dead_lettered),
                    ready: st.ready as u64,
                    unacked: st.unacked as u64,
                },
            );
            if let Some(log) = q.stream() {
                let st = log.stats();
                let mut offsets = log.stored_offsets();
                offsets.truncate(MAX_OFFSETS);
                snap.streams.insert(
                    (v.name.to_string(), q.name().to_string()),
                    StreamTotals {
                        size: StreamPoint {
                            bytes: st.bytes,
                            first_offset: st.first_offset,
                            committed_offset: st.committed_offset,
                            segments: u32::try_from(st.segments).unwrap_or(u32::MAX),
                        },
                        offsets,
                    },
                );
            }
        }
        for e in v.exchanges() {
            snap.exchanges
                .insert((v.name.to_string(), e.name.to_string()), e.stats.totals());
        }
    }
    let c = &broker.counters;
    let connections = broker.connections();
    snap.node = NodePoint {
        publish: Counters::get(&c.published) as u32,
        deliver_get: Counters::get(&c.delivered) as u32,
        ack: Counters::get(&c.acked) as u32,
        redeliver: Counters::get(&c.redelivered) as u32,
        mem_used: super::metrics::resident_memory().unwrap_or(0),
        disk_free: disk_free(broker, data_dir),
        connections: connections.len() as u32,
        channels: connections
            .iter()
            .map(|c| c.channels.load(std::sync::atomic::Ordering::Relaxed))
            .sum(),
        fd_used: fd_used() as u32,
    };
    snap
}

/// Free bytes on the data directory's file system: as the disk alarm last
/// measured them (every 200 ms), else measured now; 0 when unknown.
pub fn disk_free(broker: &Broker, data_dir: Option<&std::path::Path>) -> u64 {
    broker
        .disk_free()
        .or_else(|| data_dir.and_then(crate::broker::memory::disk_free))
        .unwrap_or(0)
}

/// Open file descriptors of this process.
pub fn fd_used() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count())
}

/// The process's open file limit (the soft `RLIMIT_NOFILE`), if known.
pub fn fd_total() -> Option<u64> {
    let mut lim = std::mem::MaybeUninit::<libc::rlimit>::uninit();
    // SAFETY: `lim` is writable memory of the right type; getrlimit only
    // writes into it, and we read it only on success.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, lim.as_mut_ptr()) };
    if rc != 0 {
        return None;
    }
    // SAFETY: getrlimit succeeded, so it wrote the whole struct.
    let lim = unsafe { lim.assume_init() };
    // RLIM_INFINITY and other huge values as the largest a client expects.
    Some(lim.rlim_cur.min(u64::from(u32::MAX)))
}

/// RabbitMQ's range parameters `{prefix}_age` and `{prefix}_incr` (seconds), in ms.
pub fn range(params: &HashMap<String, String>, prefix: &str) -> ApiResult<Option<(u64, u64)>> {
    let get = |k: &str| params.get(&format!("{prefix}_{k}"));
    let (Some(age), Some(incr)) = (get("age"), get("incr")) else {
        return Ok(None);
    };
    let parse = |v: &String| v.parse::<u64>().ok().filter(|n| *n > 0 && *n <= 86_400);
    match (parse(age), parse(incr)) {
        (Some(a), Some(i)) => Ok(Some((a * 1000, i * 1000))),
        _ => Err(ApiError::bad_request(format!(
            "{prefix}_age and {prefix}_incr must be positive integers (seconds, at most a day)"
        ))),
    }
}

/// A `*_details` object with samples (newest first): `rate` as given, `avg`
/// the mean sample, `avg_rate` the change per second across the window.
fn details(rate: f64, samples: &[(u64, f64)]) -> Value {
    let list: Vec<Value> = samples
        .iter()
        .map(|(t, v)| json!({"sample": v, "timestamp": t}))
        .collect();
    let avg = if samples.is_empty() {
        0.0
    } else {
        samples.iter().map(|s| s.1).sum::<f64>() / samples.len() as f64
    };
    let avg_rate = match (samples.first(), samples.last()) {
        (Some(new), Some(old)) if new.0 > old.0 => {
            (new.1 - old.1) / ((new.0 - old.0) as f64 / 1000.0)
        }
        _ => 0.0,
    };
    json!({
        "rate": round_rate(rate),
        "samples": list,
        "avg": round_rate(avg),
        "avg_rate": round_rate(avg_rate),
    })
}

/// A rate as the API shows it: to one decimal.
pub fn round_rate(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// `stats["{field}_details"]` with `samples`, keeping the rate the plain
/// endpoint already put there (0 if none).
fn with_samples(stats: &mut Map<String, Value>, field: &str, samples: &[(u64, f64)]) {
    let key = format!("{field}_details");
    let rate = stats
        .get(&key)
        .and_then(|d| d.get("rate"))
        .and_then(Value::as_f64)
        .unwrap_or(0.0);
    stats.insert(key, details(rate, samples));
}

/// The rate between the two newest samples (per second), for gauges.
fn last_rate(samples: &[(u64, f64)]) -> f64 {
    match samples {
        [new, old, ..] if new.0 > old.0 => (new.1 - old.1) / ((new.0 - old.0) as f64 / 1000.0),
        _ => 0.0,
    }
}

/// How fast a queue's length changes (per second, between its two newest
/// samples): messages, ready, unacked; 0 without two samples yet. Rounded as
/// the `rate` of a `*_details` with samples.
pub fn length_rates(history: &History, key: &Key) -> [f64; 3] {
    let (incr, _) = super::history::TIERS[0];
    let w = history.queue(key, 2 * incr, incr);
    [
        |p: &QueuePoint| f64::from(p.ready) + f64::from(p.unacked),
        |p: &QueuePoint| f64::from(p.ready),
        |p: &QueuePoint| f64::from(p.unacked),
    ]
    .map(|pick| round_rate(last_rate(&gauges(&w, pick))))
}

/// Reads one gauge from a node's sample.
type NodeGauge = fn(&NodePoint) -> f64;

/// A node's gauges kept in its history, by their fields in its record.
const NODE_GAUGES: [(&str, NodeGauge); 5] = [
    ("mem_used", |p| p.mem_used as f64),
    ("disk_free", |p| p.disk_free as f64),
    ("fd_used", |p| f64::from(p.fd_used)),
    ("sockets_used", |p| f64::from(p.connections)),
    ("channels", |p| f64::from(p.channels)),
];

/// `{field}_details` (`{"rate": ...}`: its change per second between the
/// two newest samples) beside each of this node's [`NODE_GAUGES`] that the
/// record `m` has.
pub fn insert_node_gauge_details(history: &History, m: &mut Map<String, Value>) {
    let (incr, _) = super::history::TIERS[0];
    let w = history.node(2 * incr, incr);
    for (field, pick) in NODE_GAUGES {
        if m.contains_key(field) {
            let rate = round_rate(last_rate(&gauges(&w, pick)));
            m.insert(format!("{field}_details"), json!({ "rate": rate }));
        }
    }
}

/// The sum of [`length_rates`] over `queues` (a vhost's, the visible ones):
/// the rates of their total lengths (they are sampled on one clock).
pub fn summed_length_rates<'a>(
    history: &History,
    queues: impl IntoIterator<Item = &'a crate::broker::queue::Queue>,
) -> [f64; 3] {
    let mut sum = [0.0; 3];
    for q in queues {
        let key = (q.spec.vhost.to_string(), q.name().to_string());
        for (s, r) in sum.iter_mut().zip(length_rates(history, &key)) {
            *s += r;
        }
    }
    sum.map(round_rate)
}

/// `messages_details`, `messages_ready_details` and
/// `messages_unacknowledged_details` (`{"rate": ...}`) for the rates
/// [`length_rates`] gives, into `m`.
pub fn insert_length_details(m: &mut Map<String, Value>, [all, ready, unacked]: [f64; 3]) {
    m.insert("messages_details".into(), json!({ "rate": all }));
    m.insert("messages_ready_details".into(), json!({ "rate": ready }));
    m.insert(
        "messages_unacknowledged_details".into(),
        json!({ "rate": unacked }),
    );
}

/// Counter samples widened to full totals against the live total `full`.
fn totals<P>(samples: &[(u64, P)], full: u64, pick: impl Fn(&P) -> u32) -> Vec<(u64, f64)> {
    samples
        .iter()
        .map(|(t, p)| (*t, widen(full, full as u32, pick(p)) as f64))
        .collect()
}

fn gauges<P>(samples: &[(u64, P)], pick: impl Fn(&P) -> f64) -> Vec<(u64, f64)> {
    samples.iter().map(|(t, p)| (*t, pick(p))).collect()
}

fn object(v: &mut Value) -> &mut Map<String, Value> {
    if !v.is_object() {
        *v = Value::Object(Map::new());
    }
    match v {
        Value::Object(m) => m,
        _ => unreachable!("made an object above"),
    }
}

/// `GET /api/queues/{vhost}/{name}`, with samples when a range is asked for.
pub async fn queue(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let lengths = range(&params, "lengths")?;
    let rates = range(&params, "msg_rates")?;
    let Json(mut v) = super::queues::show(
        State(s.clone()),
        caller,
        Path((vhost.clone(), name.clone())),
    )
    .await?;
    let q = super::queues::find(&s, &vhost, &name)?;
    let key: Key = (vhost, name);
    let c = &q.counters;
    let dead = Counters::get(&c.dead_lettered);
    let root = object(&mut v);
    if let Some((age, incr)) = lengths {
        let w = s.history.queue(&key, age, incr);
        for (field, pick) in [
            (
                "messages_details",
                (|p: &QueuePoint| f64::from(p.ready) + f64::from(p.unacked))
                    as fn(&QueuePoint) -> f64,
            ),
            ("messages_ready_details", |p| f64::from(p.ready)),
            ("messages_unacknowledged_details", |p| f64::from(p.unacked)),
        ] {
            let g = gauges(&w, pick);
            root.insert(field.into(), details(last_rate(&g), &g));
        }
    }
    if let (Some((age, incr)), Some(log)) = (lengths, q.stream()) {
        stream_samples(&s.history, &key, log, age, incr, root);
    }
    let stats = object(root.entry("message_stats").or_insert(json!({})));
    if let Some((age, incr)) = rates {
        let w = s.history.queue(&key, age, incr);
        for (field, full, pick) in [
            (
                "publish",
                Counters::get(&c.published),
                (|p: &QueuePoint| p.publish) as fn(&QueuePoint) -> u32,
            ),
            ("deliver_get", Counters::get(&c.delivered), |p| {
                p.deliver_get
            }),
            ("ack", Counters::get(&c.acked), |p| p.ack),
            ("redeliver", Counters::get(&c.redelivered), |p| p.redeliver),
            ("dead_lettered", dead, |p| p.dead_lettered),
        ] {
            with_samples(stats, field, &totals(&w, full, pick));
        }
    }
    Ok(Json(v))
}

/// A stream's size and stored consumer offsets over a `lengths` range:
/// `stream_bytes` (bytes in segment files) and samples of it, of
/// `first_offset`, `committed_offset` and `segments` (`*_details`), and
/// `consumer_offsets`: each stored offset (`reference`, `offset`, `lag` behind
/// the committed offset) with samples of both.
fn stream_samples(
    history: &History,
    key: &Key,
    log: &crate::storage::stream::StreamLog,
    age: u64,
    incr: u64,
    root: &mut Map<String, Value>,
) {
    let st = log.stats();
    root.insert("stream_bytes".into(), json!(st.bytes));
    let w = history.stream(key, age, incr);
    for (field, pick) in [
        (
            "stream_bytes_details",
            (|p: &StreamPoint| p.bytes as f64) as fn(&StreamPoint) -> f64,
        ),
        ("first_offset_details", |p| p.first_offset as f64),
        ("committed_offset_details", |p| p.committed_offset as f64),
        ("segments_details", |p| f64::from(p.segments)),
    ] {
        let g = gauges(&w, pick);
        root.insert(field.into(), details(last_rate(&g), &g));
    }
    let sampled = history.stream_offsets(key, age, incr);
    let consumers: Vec<Value> = log
        .stored_offsets()
        .into_iter()
        .take(MAX_OFFSETS)
        .map(|(reference, offset)| {
            let w = sampled
                .iter()
                .find(|(r, _)| *r == reference)
                .map(|(_, w)| w.as_slice())
                .unwrap_or_default();
            let off = gauges(w, |p| p.offset as f64);
            let lag = gauges(w, |p| p.lag as f64);
            json!({
                "reference": reference,
                "offset": offset,
                "lag": st.committed_offset.saturating_sub(offset),
                "offset_details": details(last_rate(&off), &off),
                "lag_details": details(last_rate(&lag), &lag),
            })
        })
        .collect();
    root.insert("consumer_offsets".into(), Value::Array(consumers));
}

/// `GET /api/exchanges/{vhost}/{name}`, with samples of `publish_in`,
/// `publish_out` and `alternate_out` when a `msg_rates` range is asked for.
pub async fn exchange(
    State(s): State<AdminState>,
    caller: Caller,
    Path((vhost, name)): Path<(String, String)>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let rates = range(&params, "msg_rates")?;
    let Json(mut v) = super::exchanges::show(
        State(s.clone()),
        caller,
        Path((vhost.clone(), name.clone())),
    )
    .await?;
    let Some((age, incr)) = rates else {
        return Ok(Json(v));
    };
    let name = if name == "amq.default" {
        String::new()
    } else {
        name
    };
    let totals_now = s
        .broker
        .vhost(&vhost)
        .and_then(|vh| vh.exchange(&name).ok())
        .map(|e| e.stats.totals())
        .unwrap_or_default();
    let w = s.history.exchange(&(vhost, name), age, incr);
    let root = object(&mut v);
    let stats = object(root.entry("message_stats").or_insert(json!({})));
    for (field, full, pick) in [
        (
            "publish_in",
            totals_now.publish_in,
            (|p: &ExchangePoint| p.publish_in) as fn(&ExchangePoint) -> u32,
        ),
        ("publish_out", totals_now.publish_out, |p| p.publish_out),
        ("alternate_out", totals_now.alternate_out, |p| {
            p.alternate_out
        }),
    ] {
        with_samples(stats, field, &totals(&w, full, pick));
    }
    Ok(Json(v))
}

/// `GET /api/nodes/{node}` (with `sockets_used`, the AMQP connections, and
/// `disk_free`) and, for a `node_stats` range on the answering node, samples
/// of them and of `mem_used`, `fd_used` and `channels`.
pub async fn node(
    State(s): State<AdminState>,
    caller: Caller,
    path: Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let stats = range(&params, "node_stats")?;
    let here = path.0 == super::cluster::this_node(&s);
    let name = path.0.clone();
    let Json(mut v) = super::overview::node(State(s.clone()), caller, path).await?;
    // `?memory=true`: the memory breakdown too (null when the node did not answer).
    let memory = if params.get("memory").map(String::as_str) == Some("true") {
        Some(super::overview::memory_of(&s, &name).await.ok().flatten())
    } else {
        None
    };
    let root = object(&mut v);
    if let Some(m) = memory {
        root.insert("memory".into(), m.unwrap_or(Value::Null));
    }
    // The samples are this node's own history.
    if let Some((age, incr)) = stats.filter(|_| here) {
        let w = s.history.node(age, incr);
        for (field, pick) in NODE_GAUGES {
            let g = gauges(&w, pick);
            root.insert(format!("{field}_details"), details(last_rate(&g), &g));
        }
    }
    Ok(Json(v))
}

/// `GET /api/overview`, with samples of the global message counters for a
/// `msg_rates` range.
pub async fn overview(
    State(s): State<AdminState>,
    caller: Caller,
    Query(params): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let rates = range(&params, "msg_rates")?;
    let Json(mut v) = super::overview::overview(State(s.clone()), caller).await;
    if let Some((age, incr)) = rates {
        let w = s.history.node(age, incr);
        let c = &s.broker.counters;
        let root = object(&mut v);
        let stats = object(root.entry("message_stats").or_insert(json!({})));
        for (field, full, pick) in [
            (
                "publish",
                Counters::get(&c.published),
                (|p| p.publish) as fn(&NodePoint) -> u32,
            ),
            ("deliver_get", Counters::get(&c.delivered), |p| {
                p.deliver_get
            }),
            ("ack", Counters::get(&c.acked), |p| p.ack),
            ("redeliver", Counters::get(&c.redelivered), |p| p.redeliver),
        ] {
            with_samples(stats, field, &totals(&w, full, pick));
        }
    }
    Ok(Json(v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_rates_come_from_the_two_newest_samples() {
        let h = History::new();
        let key: Key = ("/".into(), "q".into());
        assert_eq!(length_rates(&h, &key), [0.0; 3], "no history yet");
        let t0 = 1_000_000_000;
        for (i, (ready, unacked)) in [(10, 0), (10, 0), (30, 5)].into_iter().enumerate() {
            let mut snap = Snapshot::default();
            let totals = super::super::history::QueueTotals {
                ready,
                unacked,
                ..Default::default()
            };
            snap.queues.insert(key.clone(), totals);
            let now = t0 + i as u64 * 5_000;
            assert!(h.due(now));
            h.record(now, &snap);
            if i == 0 {
                assert_eq!(length_rates(&h, &key), [0.0; 3], "one sample");
            }
        }
        // +20 ready and +5 unacked over 5 s.
        assert_eq!(length_rates(&h, &key), [5.0, 4.0, 1.0]);
    }

    #[test]
    fn range_parameters() {
        let p = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(range(&p(&[]), "lengths").ok(), Some(None));
        assert_eq!(
            range(
                &p(&[("lengths_age", "60"), ("lengths_incr", "5")]),
                "lengths"
            )
            .ok(),
            Some(Some((60_000, 5_000)))
        );
        assert!(range(
            &p(&[("lengths_age", "x"), ("lengths_incr", "5")]),
            "lengths"
        )
        .is_err());
        assert!(range(
            &p(&[("lengths_age", "0"), ("lengths_incr", "5")]),
            "lengths"
        )
        .is_err());
    }

    #[test]
    fn details_average_and_rate() {
        let d = details(1.0, &[(10_000, 30.0), (5_000, 20.0), (0, 10.0)]);
        assert_eq!(d["avg"], 20.0);
        assert_eq!(d["avg_rate"], 2.0);
        assert_eq!(d["samples"][0]["sample"], 30.0);
        assert_eq!(d["samples"][0]["timestamp"], 10_000);
        assert_eq!(last_rate(&[(10_000, 30.0), (5_000, 20.0)]), 2.0);
    }
}
