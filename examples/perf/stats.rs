//! Shared run state: message counters, per-consumer latency histograms (HdrHistogram,
//! µs), the send timestamp in each body, rate pacing, the backlog gate, and RSS samples.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;

use crate::{Args, DynErr};

pub const HIST_MAX_US: u64 = 3_600_000_000;

pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("histogram")
}

#[derive(Default)]
pub struct Stats {
    pub published: AtomicU64,
    pub confirmed: AtomicU64,
    pub nacked: AtomicU64,
    pub consumed: AtomicU64,
    pub producers_done: AtomicU64,
    pub stop: AtomicBool,
    pub finished: AtomicBool,
    /// one interval histogram per consumer, drained by the reporter every second
    pub hists: Mutex<Vec<Arc<Mutex<Histogram<u64>>>>>,
}

impl Stats {
    pub fn register_hist(&self) -> Arc<Mutex<Histogram<u64>>> {
        let h = Arc::new(Mutex::new(new_hist()));
        self.hists.lock().unwrap().push(h.clone());
        h
    }
    /// Move all per-consumer samples into `interval` (and the caller merges into total).
    pub fn drain_hists(&self, interval: &mut Histogram<u64>) {
        for h in self.hists.lock().unwrap().iter() {
            let mut h = h.lock().unwrap();
            let _ = interval.add(&*h);
            h.reset();
        }
    }
}

pub fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[inline]
pub fn record_latency(body: &[u8], h: &Mutex<Histogram<u64>>) {
    if body.len() >= 8 {
        let ts = u64::from_le_bytes(body[..8].try_into().unwrap());
        let us = now_nanos().saturating_sub(ts) / 1000;
        h.lock()
            .unwrap()
            .saturating_record(us.clamp(1, HIST_MAX_US));
    }
}

pub fn fail(what: &str, e: DynErr, st: &Stats) {
    if !st.finished.load(Relaxed) {
        eprintln!("ERROR {what}: {e}");
        std::process::exit(1);
    }
}

pub fn read_rss_kb(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Absolute-schedule rate limiter (catches up after timer overshoot).
pub struct Pacer {
    pub rate: f64,
    pub start: Instant,
    pub n: u64,
}

impl Pacer {
    pub fn new(rate: f64) -> Self {
        Pacer {
            rate,
            start: Instant::now(),
            n: 0,
        }
    }
    /// Instant at which the next message is due, or None if unlimited / already due.
    pub fn next_due(&mut self) -> Option<Instant> {
        if self.rate <= 0.0 {
            return None;
        }
        let due = self.start + Duration::from_secs_f64(self.n as f64 / self.rate);
        self.n += 1;
        (due > Instant::now()).then_some(due)
    }
}

pub async fn backlog_gate(a: &Args, st: &Stats) {
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

pub fn make_body(size: usize) -> Vec<u8> {
    let mut b = vec![0u8; size.max(8)];
    b[..8].copy_from_slice(&now_nanos().to_le_bytes());
    b
}

// ---------------------------------------------------------------------------------------

pub fn pct(h: &Histogram<u64>, q: f64) -> u64 {
    if h.is_empty() {
        0
    } else {
        h.value_at_quantile(q)
    }
}

pub fn ack_every(a: &Args) -> usize {
    let n = a.multi_ack_every.max(1);
    if a.prefetch > 0 {
        n.min(a.prefetch as usize)
    } else {
        n
    }
}
