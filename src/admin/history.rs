//! In-memory history for the charts: per-queue counters (publish, deliver/get,
//! ack, redeliver, dead-lettered) and depth (ready, unacked), per-exchange
//! counters (publish in / out, to the alternate exchange), per-stream size
//! (bytes, segments, first and committed offsets) and stored consumer offsets
//! with their lag, the broker's global counters, and node gauges (memory,
//! connections, channels, file descriptors, free disk).
//!
//! Sampled from counters that already exist (no per-message work): the sampler
//! task records a snapshot when a tier's slot is due. Two tiers, as RabbitMQ's
//! `basic` retention: one point every 5 s for 10 minutes, one every 60 s for an
//! hour. Every object's points line up with one clock per tier, so a point is
//! only its values (queue: 28 bytes; counters kept as their low 32 bits, which
//! the reader widens again against the live total). At most [`MAX_OBJECTS`]
//! queues and exchanges have history (about 5 KiB each when full), so the total
//! stays bounded (a stream's size and each of its at most [`MAX_OFFSETS`] stored
//! consumer offsets count as objects too); an object missing from a snapshot
//! (deleted) loses its history.
//!
//! Read back as RabbitMQ's range samples (`?lengths_age=600&lengths_incr=5`,
//! `msg_rates_*`, `node_stats_*`): see [`History::window`]. Time is passed in
//! (ms), so all of this is tested without a clock.

use crate::broker::exchange::ExchangeTotals;
use std::collections::{HashMap, VecDeque};

/// Most queues plus exchanges with history; further ones get none until others go.
pub const MAX_OBJECTS: usize = 5_000;

/// Most stored consumer offsets kept per stream (the first by reference).
pub const MAX_OFFSETS: usize = 16;

/// (step in ms, points kept) per tier, finest first.
pub const TIERS: [(u64, usize); 2] = [(5_000, 121), (60_000, 61)];

/// A queue's sample. Counters are the low 32 bits of the running totals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueuePoint {
    pub publish: u32,
    pub deliver_get: u32,
    pub ack: u32,
    pub redeliver: u32,
    pub dead_lettered: u32,
    pub ready: u32,
    pub unacked: u32,
}

/// An exchange's sample: its counters' low 32 bits.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExchangePoint {
    pub publish_in: u32,
    pub publish_out: u32,
    pub alternate_out: u32,
}

/// A stream's size at one sample (gauges).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StreamPoint {
    /// Bytes in segment files.
    pub bytes: u64,
    pub first_offset: u64,
    pub committed_offset: u64,
    pub segments: u32,
}

/// A stored consumer offset at one sample, and how far it is behind the
/// committed offset then.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OffsetPoint {
    pub offset: u64,
    pub lag: u64,
}

/// One stream in a snapshot: its size and stored consumer offsets
/// (reference, offset), at most [`MAX_OFFSETS`] of them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamTotals {
    pub size: StreamPoint,
    pub offsets: Vec<(String, u64)>,
}

/// The broker-wide counters (low 32 bits) and node gauges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodePoint {
    pub publish: u32,
    pub deliver_get: u32,
    pub ack: u32,
    pub redeliver: u32,
    pub mem_used: u64,
    pub disk_free: u64,
    pub connections: u32,
    pub channels: u32,
    pub fd_used: u32,
}

/// One queue in a snapshot: full counter totals and depth.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueTotals {
    pub publish: u64,
    pub deliver_get: u64,
    pub ack: u64,
    pub redeliver: u64,
    pub dead_lettered: u64,
    pub ready: u64,
    pub unacked: u64,
}

/// (vhost, name).
pub type Key = (String, String);

/// What the sampler read at one instant.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub queues: HashMap<Key, QueueTotals>,
    pub exchanges: HashMap<Key, ExchangeTotals>,
    /// Streams (also in `queues`), by queue key.
    pub streams: HashMap<Key, StreamTotals>,
    pub node: NodePoint,
}

/// The low 32 bits of a total.
fn low(v: u64) -> u32 {
    v as u32
}

/// Saturating narrowing for gauges.
fn gauge(v: u64) -> u32 {
    u32::try_from(v).unwrap_or(u32::MAX)
}

/// The full value of an earlier sample whose low bits are `earlier`, given a
/// later full value `full` with low bits `later`: exact while fewer than 2^32
/// counts happen between them.
pub fn widen(full: u64, later: u32, earlier: u32) -> u64 {
    full.saturating_sub(u64::from(later.wrapping_sub(earlier)))
}

/// The times of one tier's slots, oldest first; slot `seq - times.len() + i` is `times[i]`.
#[derive(Debug, Clone)]
struct Clock {
    step: u64,
    len: usize,
    times: VecDeque<u64>,
    /// Slots recorded so far.
    seq: u64,
    last_slot: Option<u64>,
}

/// One object's points in one tier, oldest first, ending at slot `end`.
#[derive(Debug, Clone)]
struct Ring<P> {
    points: VecDeque<P>,
    end: u64,
}

#[derive(Debug, Clone)]
struct Series<P> {
    tiers: [Ring<P>; 2],
}

impl<P> Default for Series<P> {
    fn default() -> Self {
        Series {
            tiers: [
                Ring {
                    points: VecDeque::new(),
                    end: 0,
                },
                Ring {
                    points: VecDeque::new(),
                    end: 0,
                },
            ],
        }
    }
}

impl<P: Copy> Series<P> {
    fn push(&mut self, tier: usize, seq: u64, len: usize, p: P) {
        let r = &mut self.tiers[tier];
        if r.end + 1 != seq {
            // Missed slots (the object was out of the sample, or new): start over.
            r.points.clear();
        }
        r.points.push_back(p);
        while r.points.len() > len {
            r.points.pop_front();
        }
        r.end = seq;
    }
}

#[derive(Debug, Default)]
struct Inner {
    clocks: Vec<Clock>,
    queues: HashMap<Key, Series<QueuePoint>>,
    exchanges: HashMap<Key, Series<ExchangePoint>>,
    streams: HashMap<Key, Series<StreamPoint>>,
    /// Per stream, per consumer reference.
    offsets: HashMap<Key, HashMap<String, Series<OffsetPoint>>>,
    node: Series<NodePoint>,
}

/// The charts' history, shared by the sampler task and the handlers.
#[derive(Debug)]
pub struct History {
    inner: parking_lot::Mutex<Inner>,
}

impl Default for History {
    fn default() -> Self {
        History::new()
    }
}

/// A window of samples, newest first: (time in ms, point).
pub type Samples<P> = Vec<(u64, P)>;

impl History {
    pub fn new() -> History {
        let clocks = TIERS
            .iter()
            .map(|&(step, len)| Clock {
                step,
                len,
                times: VecDeque::new(),
                seq: 0,
                last_slot: None,
            })
            .collect();
        History {
            inner: parking_lot::Mutex::new(Inner {
                clocks,
                ..Inner::default()
            }),
        }
    }

    /// Whether a snapshot taken at `now` would be recorded (a tier's slot is due).
    pub fn due(&self, now: u64) -> bool {
        let g = self.inner.lock();
        g.clocks.iter().any(|c| c.last_slot != Some(now / c.step))
    }

    /// Record `snap`, taken at `now`, in every tier whose slot is due.
    pub fn record(&self, now: u64, snap: &Snapshot) {
        let mut g = self.inner.lock();
        let g = &mut *g;
        let due: Vec<usize> = (0..g.clocks.len())
            .filter(|&t| g.clocks[t].last_slot != Some(now / g.clocks[t].step))
            .collect();
        if due.is_empty() {
            return;
        }
        // Deleted objects lose their history.
        g.queues.retain(|k, _| snap.queues.contains_key(k));
        g.exchanges.retain(|k, _| snap.exchanges.contains_key(k));
        g.streams.retain(|k, _| snap.streams.contains_key(k));
        g.offsets.retain(|k, refs| match snap.streams.get(k) {
            Some(st) => {
                refs.retain(|r, _| st.offsets.iter().any(|(name, _)| name == r));
                !refs.is_empty()
            }
            None => false,
        });
        for t in due {
            let c = &mut g.clocks[t];
            c.last_slot = Some(now / c.step);
            c.seq += 1;
            c.times.push_back(now);
            while c.times.len() > c.len {
                c.times.pop_front();
            }
            let (seq, len) = (c.seq, c.len);
            for (k, q) in &snap.queues {
                let room = g.objects() < MAX_OBJECTS;
                let series = match g.queues.get_mut(k) {
                    Some(s) => s,
                    None if room => g.queues.entry(k.clone()).or_default(),
                    None => continue,
                };
                series.push(
                    t,
                    seq,
                    len,
                    QueuePoint {
                        publish: low(q.publish),
                        deliver_get: low(q.deliver_get),
                        ack: low(q.ack),
                        redeliver: low(q.redeliver),
                        dead_lettered: low(q.dead_lettered),
                        ready: gauge(q.ready),
                        unacked: gauge(q.unacked),
                    },
                );
            }
            for (k, x) in &snap.exchanges {
                let room = g.objects() < MAX_OBJECTS;
                let series = match g.exchanges.get_mut(k) {
                    Some(s) => s,
                    None if room => g.exchanges.entry(k.clone()).or_default(),
                    None => continue,
                };
                series.push(
                    t,
                    seq,
                    len,
                    ExchangePoint {
                        publish_in: low(x.publish_in),
                        publish_out: low(x.publish_out),
                        alternate_out: low(x.alternate_out),
                    },
                );
            }
            for (k, st) in &snap.streams {
                let room = g.objects() < MAX_OBJECTS;
                let series = match g.streams.get_mut(k) {
                    Some(s) => s,
                    None if room => g.streams.entry(k.clone()).or_default(),
                    None => continue,
                };
                series.push(t, seq, len, st.size);
                for (reference, offset) in st.offsets.iter().take(MAX_OFFSETS) {
                    let room = g.objects() < MAX_OBJECTS;
                    let refs = g.offsets.entry(k.clone()).or_default();
                    let series = match refs.get_mut(reference) {
                        Some(s) => s,
                        None if room => refs.entry(reference.clone()).or_default(),
                        None => continue,
                    };
                    series.push(
                        t,
                        seq,
                        len,
                        OffsetPoint {
                            offset: *offset,
                            lag: st.size.committed_offset.saturating_sub(*offset),
                        },
                    );
                }
            }
            g.node.push(t, seq, len, snap.node);
        }
    }

    /// A queue's samples over the last `age_ms`, one every `incr_ms`, newest first.
    pub fn queue(&self, key: &Key, age_ms: u64, incr_ms: u64) -> Samples<QueuePoint> {
        let g = self.inner.lock();
        g.queues
            .get(key)
            .map(|s| window(&g.clocks, s, age_ms, incr_ms))
            .unwrap_or_default()
    }

    pub fn exchange(&self, key: &Key, age_ms: u64, incr_ms: u64) -> Samples<ExchangePoint> {
        let g = self.inner.lock();
        g.exchanges
            .get(key)
            .map(|s| window(&g.clocks, s, age_ms, incr_ms))
            .unwrap_or_default()
    }

    /// A stream's size samples.
    pub fn stream(&self, key: &Key, age_ms: u64, incr_ms: u64) -> Samples<StreamPoint> {
        let g = self.inner.lock();
        g.streams
            .get(key)
            .map(|s| window(&g.clocks, s, age_ms, incr_ms))
            .unwrap_or_default()
    }

    /// Each stored consumer offset of a stream with its samples, by reference.
    pub fn stream_offsets(
        &self,
        key: &Key,
        age_ms: u64,
        incr_ms: u64,
    ) -> Vec<(String, Samples<OffsetPoint>)> {
        let g = self.inner.lock();
        let mut out: Vec<(String, Samples<OffsetPoint>)> = g
            .offsets
            .get(key)
            .map(|refs| {
                refs.iter()
                    .map(|(r, s)| (r.clone(), window(&g.clocks, s, age_ms, incr_ms)))
                    .collect()
            })
            .unwrap_or_default();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    pub fn node(&self, age_ms: u64, incr_ms: u64) -> Samples<NodePoint> {
        let g = self.inner.lock();
        window(&g.clocks, &g.node, age_ms, incr_ms)
    }

    /// How many objects have history (queues, exchanges, streams' sizes and
    /// stored consumer offsets).
    pub fn objects(&self) -> usize {
        self.inner.lock().objects()
    }
}

impl Inner {
    fn objects(&self) -> usize {
        self.queues.len()
            + self.exchanges.len()
            + self.streams.len()
            + self.offsets.values().map(HashMap::len).sum::<usize>()
    }
}

/// The samples of `series` over the last `age_ms` (up to the newest recorded
/// slot), about one every `incr_ms`, newest first: for each step back, the
/// latest point at or before it, with the time it was recorded (each point
/// once). From the finest tier that reaches back far enough, else the coarsest.
fn window<P: Copy>(clocks: &[Clock], series: &Series<P>, age_ms: u64, incr_ms: u64) -> Samples<P> {
    let incr = incr_ms.max(1);
    let timed = |t: usize| -> Vec<(u64, P)> {
        let c = &clocks[t];
        let r = &series.tiers[t];
        let first_seq = c.seq + 1 - c.times.len() as u64;
        let start = r.end + 1 - r.points.len() as u64;
        r.points
            .iter()
            .enumerate()
            .filter_map(|(i, p)| {
                let seq = start + i as u64;
                let idx = seq.checked_sub(first_seq)?;
                c.times.get(idx as usize).map(|&time| (time, *p))
            })
            .collect()
    };
    let span = |p: &[(u64, P)]| match (p.first(), p.last()) {
        (Some(a), Some(b)) => b.0 - a.0,
        _ => 0,
    };
    let mut chosen = timed(0);
    for t in 1..clocks.len() {
        if span(&chosen) >= age_ms {
            break;
        }
        let coarser = timed(t);
        if span(&coarser) > span(&chosen) {
            chosen = coarser;
        }
    }
    let Some(&(newest, _)) = chosen.last() else {
        return Vec::new();
    };
    let mut out: Vec<(u64, P)> = Vec::new();
    let mut idx = chosen.len();
    let mut last = usize::MAX;
    let mut at = newest;
    loop {
        while idx > 0 && chosen[idx - 1].0 > at {
            idx -= 1;
        }
        if idx == 0 {
            break;
        }
        // A point's own time (slots are recorded a little late or early), each
        // point once: rates between samples then divide by the real interval.
        if idx - 1 != last {
            out.push(chosen[idx - 1]);
            last = idx - 1;
        }
        match at.checked_sub(incr) {
            Some(next) if newest - next <= age_ms => at = next,
            _ => break,
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: &str) -> Key {
        ("/".into(), n.into())
    }

    fn snap(publish: u64, ready: u64, queues: &[&str]) -> Snapshot {
        let mut s = Snapshot::default();
        for q in queues {
            s.queues.insert(
                key(q),
                QueueTotals {
                    publish,
                    ready,
                    ..Default::default()
                },
            );
        }
        s.exchanges.insert(
            key("x"),
            ExchangeTotals {
                publish_in: publish,
                publish_out: publish / 2,
                alternate_out: 0,
            },
        );
        s.node.mem_used = ready;
        s
    }

    #[test]
    fn records_once_per_slot_and_windows_newest_first() {
        let h = History::new();
        let t0 = 1_000_000_000;
        for i in 0..30u64 {
            let now = t0 + i * 1_000; // every second; the fine tier keeps one per 5 s
            if h.due(now) {
                h.record(now, &snap(i * 10, i, &["q"]));
            }
        }
        let w = h.queue(&key("q"), 20_000, 5_000);
        let times: Vec<u64> = w.iter().map(|x| x.0 - t0).collect();
        assert_eq!(times, [25_000, 20_000, 15_000, 10_000, 5_000]);
        let ready: Vec<u32> = w.iter().map(|x| x.1.ready).collect();
        assert_eq!(ready, [25, 20, 15, 10, 5]);
        assert!(!h.due(t0 + 29_000), "this slot is recorded");
        assert!(h.due(t0 + 30_000));
    }

    #[test]
    fn fine_tier_is_bounded_and_the_hour_uses_the_coarse_tier() {
        let h = History::new();
        let t0 = 0;
        for i in 0..(2 * 3_600 / 5) as u64 {
            let now = t0 + i * 5_000;
            h.record(now, &snap(i, i, &["q"]));
        }
        let g = h.inner.lock();
        assert_eq!(g.queues[&key("q")].tiers[0].points.len(), TIERS[0].1);
        assert_eq!(g.queues[&key("q")].tiers[1].points.len(), TIERS[1].1);
        assert_eq!(g.clocks[0].times.len(), TIERS[0].1);
        drop(g);
        let ten = h.queue(&key("q"), 600_000, 5_000);
        assert_eq!(ten.len(), 121);
        let hour = h.queue(&key("q"), 3_600_000, 60_000);
        assert_eq!(hour.len(), 61);
        // Coarse points are a minute apart.
        assert_eq!(hour[0].0 - hour[1].0, 60_000);
    }

    #[test]
    fn jittered_slots_keep_their_own_times_once() {
        let h = History::new();
        for (now, publish) in [(0, 0), (5_900, 10), (10_000, 20)] {
            h.record(now, &snap(publish, 0, &["q"]));
        }
        let w = h.queue(&key("q"), 10_000, 5_000);
        let got: Vec<(u64, u32)> = w.iter().map(|(t, p)| (*t, p.publish)).collect();
        assert_eq!(
            got,
            [(10_000, 20), (0, 0)],
            "5.9 s is after the 5 s step: skipped, not repeated"
        );
        let w = h.queue(&key("q"), 10_000, 1_000);
        let got: Vec<u64> = w.iter().map(|(t, _)| *t).collect();
        assert_eq!(got, [10_000, 5_900, 0]);
    }

    #[test]
    fn deleted_objects_lose_history_and_new_ones_start_empty() {
        let h = History::new();
        h.record(0, &snap(1, 1, &["a", "b"]));
        h.record(5_000, &snap(2, 2, &["a"]));
        assert!(h.queue(&key("b"), 60_000, 5_000).is_empty());
        assert_eq!(h.queue(&key("a"), 60_000, 5_000).len(), 2);
        h.record(10_000, &snap(3, 3, &["a", "b"]));
        assert_eq!(h.queue(&key("b"), 60_000, 5_000).len(), 1);
        assert_eq!(h.objects(), 3, "a, b and the exchange");
    }

    #[test]
    fn exchange_counters_are_kept_per_slot() {
        let h = History::new();
        h.record(0, &snap(100, 0, &["a", "b"]));
        h.record(5_000, &snap(110, 0, &["a", "b"]));
        h.record(10_000, &snap(130, 0, &["a", "b"]));
        let w = h.exchange(&key("x"), 10_000, 5_000);
        let v: Vec<(u32, u32)> = w
            .iter()
            .map(|x| (x.1.publish_in, x.1.publish_out))
            .collect();
        assert_eq!(v, [(130, 65), (110, 55), (100, 50)]);
    }

    #[test]
    fn stream_size_and_consumer_lag_are_kept_and_dropped_with_the_stream() {
        let h = History::new();
        let stream = |committed: u64, offsets: &[(&str, u64)]| {
            let mut s = snap(0, 0, &["s"]);
            s.streams.insert(
                key("s"),
                StreamTotals {
                    size: StreamPoint {
                        bytes: committed * 100,
                        first_offset: 0,
                        committed_offset: committed,
                        segments: 1,
                    },
                    offsets: offsets.iter().map(|(r, o)| (r.to_string(), *o)).collect(),
                },
            );
            s
        };
        h.record(0, &stream(10, &[("c1", 5)]));
        h.record(5_000, &stream(30, &[("c1", 25), ("c2", 0)]));
        let size: Vec<u64> = h
            .stream(&key("s"), 60_000, 5_000)
            .iter()
            .map(|p| p.1.bytes)
            .collect();
        assert_eq!(size, [3_000, 1_000]);
        let offsets = h.stream_offsets(&key("s"), 60_000, 5_000);
        let lags: Vec<(&str, Vec<u64>)> = offsets
            .iter()
            .map(|(r, w)| (r.as_str(), w.iter().map(|p| p.1.lag).collect()))
            .collect();
        assert_eq!(lags, [("c1", vec![5, 5]), ("c2", vec![30])]);
        assert_eq!(h.objects(), 5, "queue, exchange, stream, two offsets");
        // c2 is no longer stored: its history goes; then the stream goes.
        h.record(10_000, &stream(40, &[("c1", 40)]));
        assert_eq!(h.stream_offsets(&key("s"), 60_000, 5_000).len(), 1);
        h.record(15_000, &snap(0, 0, &["s"]));
        assert!(h.stream(&key("s"), 60_000, 5_000).is_empty());
        assert!(h.stream_offsets(&key("s"), 60_000, 5_000).is_empty());
        assert_eq!(h.objects(), 2);
    }

    #[test]
    fn object_count_is_capped() {
        let h = History::new();
        let names: Vec<String> = (0..MAX_OBJECTS + 10).map(|i| format!("q{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        h.record(0, &snap(0, 0, &refs));
        assert_eq!(h.objects(), MAX_OBJECTS);
    }

    #[test]
    fn counters_widen_across_the_32_bit_wrap() {
        let full = (1u64 << 32) + 5;
        assert_eq!(widen(full, low(full), low(full - 10)), full - 10);
        assert_eq!(widen(7, 7, 2), 2);
    }

    #[test]
    fn node_gauges_are_kept() {
        let h = History::new();
        h.record(0, &snap(0, 7, &[]));
        assert_eq!(h.node(60_000, 5_000)[0].1.mem_used, 7);
    }
}
