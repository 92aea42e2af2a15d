//! The queues this node deleted by itself (`crate::broker::deleted`),
//! proposed to the metadata group as [`Command::QueueGone`] until the
//! deletion commits or no longer matters.
//!
//! A self-deletion is proposed at once. One that fails (no leader, no
//! majority, the commit timeout) is kept in [`Retries`] and proposed again
//! with a doubling backoff ([`RETRY_FIRST`] up to [`RETRY_MAX`]), at once
//! when the metadata group gets a leader (again) in this node's view. A
//! pending retry is dropped when its proposal commits, and when it became
//! moot: the record is gone, served by another node or declared again since
//! (the same checks that make a stale `QueueGone` harmless when applied), or
//! the queue is back in the local broker (a snapshot replayed the record: it
//! will report its own deletion again). There is at most one pending retry
//! per queue record (keyed by vhost and name; a newer report replaces an
//! older one), and at most one proposal of it in flight. Pending retries are
//! in memory, but a restart finds them again: at start, every record served
//! here (not a quorum queue's) whose queue the node's broker did not
//! recover is taken as gone ([`Cluster::gone_at_start`]): a self-deletion
//! that had not committed, or a non-durable queue, which does not outlive
//! its node's restart (RabbitMQ deletes those records too).
//!
//! [`Retries`] is pure (time is passed in); the driver that feeds it, asks
//! it what is due on a periodic tick and proposes is
//! `Cluster::spawn_self_deletions`.

use super::{Cluster, Command};
use crate::broker::deleted::SelfDeleted;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The wait after a first failed proposal; it doubles with each failure.
pub const RETRY_FIRST: Duration = Duration::from_secs(1);
/// The longest wait between two proposals of the same deletion.
pub const RETRY_MAX: Duration = Duration::from_secs(30);
/// How often the driver looks at what is due (and whether a leader came).
const TICK: Duration = Duration::from_millis(250);

/// One proposal handed out by [`Retries::due`], to be answered with
/// [`Retries::done`] or [`Retries::failed`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    pub gone: SelfDeleted,
    /// Which report of the queue it is (a newer report replaces the entry:
    /// the answer to an older one's attempt then changes nothing).
    seq: u64,
}

#[derive(Debug)]
struct Pending {
    gone: SelfDeleted,
    seq: u64,
    /// Failed proposals so far.
    failures: u32,
    /// When it is due next.
    at: Instant,
    /// A proposal of it is under way.
    in_flight: bool,
}

/// The self-deletions not yet committed, keyed by vhost and queue name, and
/// when each is to be proposed (again).
#[derive(Debug)]
pub struct Retries {
    pending: BTreeMap<(String, String), Pending>,
    first: Duration,
    max: Duration,
    seq: u64,
}

impl Default for Retries {
    fn default() -> Self {
        Retries::new(RETRY_FIRST, RETRY_MAX)
    }
}

impl Retries {
    /// Waits start at `first` after a failure and double up to `max`.
    pub fn new(first: Duration, max: Duration) -> Retries {
        Retries {
            pending: BTreeMap::new(),
            first,
            max: max.max(first),
            seq: 0,
        }
    }

    /// A queue deleted itself: due at once. It replaces what was pending for
    /// the same queue (the newest report wins).
    pub fn add(&mut self, gone: SelfDeleted, now: Instant) {
        self.seq += 1;
        let key = (gone.vhost.clone(), gone.name.clone());
        let p = Pending {
            gone,
            seq: self.seq,
            failures: 0,
            at: now,
            in_flight: false,
        };
        self.pending.insert(key, p);
    }

    /// The deletions to propose now (due, none of them in flight), oldest
    /// queue key first; each is in flight until answered.
    pub fn due(&mut self, now: Instant) -> Vec<Attempt> {
        let mut out = Vec::new();
        for p in self.pending.values_mut() {
            if !p.in_flight && p.at <= now {
                p.in_flight = true;
                out.push(Attempt {
                    gone: p.gone.clone(),
                    seq: p.seq,
                });
            }
        }
        out
    }

    /// The proposal `a` was not committed: due again after the backoff (the
    /// failures so far, this one included); the number of failures of the
    /// entry (0: it was replaced or dropped meanwhile, nothing kept).
    pub fn failed(&mut self, a: &Attempt, now: Instant) -> u32 {
        let (first, max) = (self.first, self.max);
        let Some(p) = self.entry(a) else { return 0 };
        p.failures = p.failures.saturating_add(1);
        p.in_flight = false;
        p.at = now + backoff(first, max, p.failures);
        p.failures
    }

    /// The proposal `a` committed: its entry goes (unless a newer report
    /// replaced it meanwhile).
    pub fn done(&mut self, a: &Attempt) {
        if self.entry(a).is_some() {
            self.pending
                .remove(&(a.gone.vhost.clone(), a.gone.name.clone()));
        }
    }

    /// Keep only the entries `keep` says still matter (the rest are moot:
    /// the record was deleted or declared again, ...); the dropped ones.
    pub fn retain(&mut self, mut keep: impl FnMut(&SelfDeleted) -> bool) -> Vec<SelfDeleted> {
        let mut dropped = Vec::new();
        self.pending.retain(|_, p| {
            let k = keep(&p.gone);
            if !k {
                dropped.push(p.gone.clone());
            }
            k
        });
        dropped
    }

    /// The metadata group has a leader again: every entry waiting for its
    /// backoff is due now (its failures count on, for the next wait).
    pub fn hurry(&mut self, now: Instant) {
        for p in self.pending.values_mut() {
            if !p.in_flight && p.at > now {
                p.at = now;
            }
        }
    }

    /// How many deletions are pending (in flight or waiting).
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    fn entry(&mut self, a: &Attempt) -> Option<&mut Pending> {
        let key = (a.gone.vhost.clone(), a.gone.name.clone());
        self.pending.get_mut(&key).filter(|p| p.seq == a.seq)
    }
}

/// The wait after `failures` failed proposals: `first`, doubled for each
/// failure after the first, at most `max`.
fn backoff(first: Duration, max: Duration, failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(31);
    first.saturating_mul(1 << doublings).min(max)
}

impl Cluster {
    /// The [`Command::QueueGone`] that replicates `gone`, a queue that
    /// deleted itself here.
    fn gone_command(&self, gone: &SelfDeleted) -> Command {
        Command::QueueGone {
            vhost: gone.vhost.clone(),
            name: gone.name.clone(),
            node: self.me.name.clone(),
            declared: gone.declared,
        }
    }

    /// Whether proposing `gone` still matters: the record is the queue that
    /// deleted itself (served here, not declared again since) and the queue
    /// is not back in the local broker.
    fn gone_matters(&self, gone: &SelfDeleted) -> bool {
        !self.has_queue(&gone.vhost, &gone.name) && self.sm.is_incarnation(&self.gone_command(gone))
    }

    /// This node's broker has queue `name` of `vhost`.
    fn has_queue(&self, vhost: &str, name: &str) -> bool {
        let v = self.broker.vhost(vhost);
        v.is_some_and(|v| v.queue(name, 0).is_ok())
    }

    /// The queue records served here (by their home node, not quorum
    /// queues') whose queue this node's broker does not have: at start, the
    /// queues that deleted themselves before a restart without their
    /// deletion committing, and the non-durable ones (a restart loses them).
    fn gone_at_start(&self) -> Vec<SelfDeleted> {
        let m = self.sm.metadata();
        let mut gone = Vec::new();
        for (k, cmd) in &m.queues {
            let Command::DeclareQueue {
                vhost, name, node, ..
            } = cmd
            else {
                continue;
            };
            if *node != self.me.name || m.quorum.contains_key(k) || self.has_queue(vhost, name) {
                continue;
            }
            gone.push(SelfDeleted {
                vhost: vhost.clone(),
                name: name.clone(),
                why: "gone at restart",
                declared: m.declared.get(k).copied().unwrap_or(0),
            });
        }
        gone
    }

    /// Replicate the deletions the broker makes by itself
    /// ([`crate::broker::deleted`]): each queue that deleted itself here and
    /// is a replicated record served here is proposed as a
    /// [`Command::QueueGone`] naming this node and the declaration it was, so
    /// every node drops the record (and its bindings) unless a newer
    /// declaration took its place. Not committed (no quorum): logged at
    /// warn, and proposed again ([`Retries`]) until it commits or is moot;
    /// the local deletion stays done. Proposed first: the records
    /// [`Self::gone_at_start`] finds.
    pub(super) fn spawn_self_deletions(self: &Arc<Self>) {
        let deletions = Arc::clone(&self.broker.self_deletions);
        deletions.watch();
        let weak = Arc::downgrade(self);
        let at_start = self.gone_at_start();
        tokio::spawn(async move {
            let mut retries = Retries::default();
            for gone in at_start {
                tracing::info!(vhost = %gone.vhost, queue = %gone.name, "queue served here not recovered: its record is deleted");
                retries.add(gone, Instant::now());
            }
            let (answers, mut answered) =
                tokio::sync::mpsc::unbounded_channel::<(Attempt, Result<(), String>)>();
            let mut tick = tokio::time::interval(TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut leader: Option<String> = None;
            loop {
                let mut answer = None;
                tokio::select! {
                    () = deletions.wait() => {}
                    _ = tick.tick() => {}
                    a = answered.recv() => answer = a,
                }
                let Some(c) = weak.upgrade() else { return };
                let now = Instant::now();
                for gone in deletions.take() {
                    retries.add(gone, now);
                }
                let answers_now = std::iter::from_fn(|| answered.try_recv().ok());
                for (attempt, r) in answer.into_iter().chain(answers_now) {
                    let gone = &attempt.gone;
                    match r {
                        Ok(()) => {
                            retries.done(&attempt);
                            tracing::debug!(vhost = %gone.vhost, queue = %gone.name, why = gone.why, "queue deletion replicated");
                        }
                        Err(e) => match retries.failed(&attempt, now) {
                            0 => {}
                            1 => {
                                tracing::warn!(vhost = %gone.vhost, queue = %gone.name, why = gone.why, error = %e, "queue deleted here, its deletion not committed: proposed again later")
                            }
                            n => {
                                tracing::debug!(vhost = %gone.vhost, queue = %gone.name, failures = n, error = %e, "queue deletion still not committed")
                            }
                        },
                    }
                }
                if retries.is_empty() {
                    leader = c.leader();
                    continue;
                }
                let now_leader = c.leader();
                if now_leader.is_some() && now_leader != leader {
                    retries.hurry(now);
                }
                leader = now_leader;
                for gone in retries.retain(|g| c.gone_matters(g)) {
                    tracing::debug!(vhost = %gone.vhost, queue = %gone.name, "self-deleted queue: the record is not that queue served here (any more), not proposed");
                }
                for attempt in retries.due(now) {
                    let cmd = c.gone_command(&attempt.gone);
                    let (c, answers) = (Arc::clone(&c), answers.clone());
                    tokio::spawn(async move {
                        let r = c.propose(cmd).await;
                        let _ = answers.send((attempt, r));
                    });
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(name: &str, declared: u64) -> SelfDeleted {
        SelfDeleted {
            vhost: "/".into(),
            name: name.into(),
            why: "expired",
            declared,
        }
    }

    fn names(a: &[Attempt]) -> Vec<(&str, u64)> {
        a.iter()
            .map(|a| (a.gone.name.as_str(), a.gone.declared))
            .collect()
    }

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_report_is_due_at_once_and_only_once_in_flight() {
        let t0 = Instant::now();
        let mut r = Retries::new(S, 8 * S);
        assert!(r.due(t0).is_empty());
        r.add(ev("a", 3), t0);
        let a = r.due(t0);
        assert_eq!(names(&a), vec![("a", 3)]);
        // In flight: not handed out again, however late.
        assert!(r.due(t0 + 100 * S).is_empty());
        r.done(&a[0]);
        assert!(r.is_empty());
        assert!(r.due(t0 + 100 * S).is_empty());
    }

    #[test]
    fn failures_back_off_doubling_up_to_the_cap() {
        let t0 = Instant::now();
        let mut r = Retries::new(S, 8 * S);
        r.add(ev("a", 3), t0);
        let mut now = t0;
        for (n, wait) in [1, 2, 4, 8, 8, 8].into_iter().enumerate() {
            let a = r.due(now);
            assert_eq!(names(&a), vec![("a", 3)], "attempt {} due", n + 1);
            assert_eq!(r.failed(&a[0], now), n as u32 + 1);
            let wait = wait * S;
            // Not due a moment before its wait is over.
            assert!(r.due(now + wait - Duration::from_millis(1)).is_empty());
            now += wait;
        }
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn backoff_is_first_doubled_and_capped() {
        let waits: Vec<u64> = (1..=6).map(|n| backoff(S, 8 * S, n).as_secs()).collect();
        assert_eq!(waits, vec![1, 2, 4, 8, 8, 8]);
        assert_eq!(backoff(S, 8 * S, u32::MAX), 8 * S);
        assert_eq!(backoff(S, 8 * S, 0), S);
    }

    #[test]
    fn a_newer_report_wins_and_an_older_answer_changes_nothing() {
        let t0 = Instant::now();
        let mut r = Retries::new(S, 8 * S);
        r.add(ev("a", 3), t0);
        let old = r.due(t0);
        // The queue came back and deleted itself again (a newer declaration).
        r.add(ev("a", 9), t0 + S);
        assert_eq!(r.len(), 1);
        // The old proposal's answers do not touch the new entry.
        assert_eq!(r.failed(&old[0], t0 + S), 0);
        r.done(&old[0]);
        assert_eq!(r.len(), 1);
        let new = r.due(t0 + S);
        assert_eq!(names(&new), vec![("a", 9)]);
        r.done(&new[0]);
        assert!(r.is_empty());
    }

    #[test]
    fn moot_entries_are_dropped_and_others_kept() {
        let t0 = Instant::now();
        let mut r = Retries::new(S, 8 * S);
        for (q, d) in [("a", 1), ("b", 2), ("c", 3)] {
            r.add(ev(q, d), t0);
        }
        let in_flight = r.due(t0);
        assert_eq!(in_flight.len(), 3);
        // b's record was deleted by a client meanwhile.
        let dropped = r.retain(|g| g.name != "b");
        assert_eq!(dropped, vec![ev("b", 2)]);
        assert_eq!(r.len(), 2);
        // Its proposal's failure does not bring it back.
        assert_eq!(r.failed(&in_flight[1], t0), 0);
        assert_eq!(r.len(), 2);
        for a in &in_flight {
            r.done(a);
        }
        assert!(r.is_empty());
    }

    #[test]
    fn a_leader_again_makes_the_waiting_ones_due_now() {
        let t0 = Instant::now();
        let mut r = Retries::new(S, 30 * S);
        r.add(ev("a", 1), t0);
        let mut now = t0;
        for _ in 0..3 {
            let a = r.due(now);
            assert_eq!(a.len(), 1);
            r.failed(&a[0], now);
            now += 30 * S;
        }
        // Three failures: a waits 4 s. b is reported meanwhile (in flight).
        let now = now - 30 * S;
        r.add(ev("b", 2), now);
        assert_eq!(names(&r.due(now)), vec![("b", 2)]);
        assert!(r.due(now + S).is_empty());
        // A leader again: a is due at once; b, in flight, is left be.
        let t = now + S;
        r.hurry(t);
        let a = r.due(t);
        assert_eq!(names(&a), vec![("a", 1)]);
        assert!(r.due(t + 100 * S).is_empty());
        // Its failures count on: the fourth waits 8 s.
        assert_eq!(r.failed(&a[0], t), 4);
        assert!(r.due(t + 8 * S - Duration::from_millis(1)).is_empty());
        assert_eq!(names(&r.due(t + 8 * S)), vec![("a", 1)]);
    }
}
