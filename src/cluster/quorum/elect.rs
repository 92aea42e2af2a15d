//! Elections of the quorum queue groups, with a pre-vote (the Raft thesis,
//! §9.6), which openraft 0.9 does not have. openraft's own election timer
//! is off for these groups (`enable_elect: false`); this module stands
//! members for election instead.
//!
//! A member that heard nothing from a leader (no append or snapshot it
//! took, no vote it granted) for the leader lease (openraft refuses votes
//! within it: `election_timeout_max`) plus a random part of the election
//! timeout's spread, drawn again every round, first asks the other voters
//! whether they would vote for it ([`Rpc::PreVote`], which changes nothing
//! on them): yes only from a member that is not the leader, has heard from
//! no leader within the lease either, and whose log is no longer than the
//! asker's. Only with a majority of yeses does it stand (openraft's
//! `trigger().elect()`, a real vote with a new term). So:
//! - a member cut off alone never raises its term, and does not make the
//!   leader step down when the cut heals (openraft without a pre-vote does:
//!   a re-election for nothing);
//! - in a partial partition, a member that cannot hear the leader while a
//!   majority still does is refused, and leaves the leader alone;
//! - after a leader's death the member with the shorter log is refused
//!   before it takes a term, so the one with the longest log wins the first
//!   round rather than both splitting it (and openraft's extra wait after a
//!   refusal for log never comes in).
//!
//! One task per node ticks every group ([`run`]).

use super::network::{GroupRpc, Rpc};
use super::serve::Group;
use super::Manager;
use futures::StreamExt;
use openraft::ServerState;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// When a member last heard from a leader, and how long it waits from then
/// (or from its last round, if later) before it asks for pre-votes.
#[derive(Debug)]
pub struct Timer {
    /// The last append, snapshot or granted vote (or leadership of its own).
    heard: Instant,
    /// The end of its last pre-vote round: not leader contact, so it does
    /// not make it refuse others' pre-votes.
    round: Instant,
    wait: Duration,
    /// A pre-vote round (and the election after it) is under way.
    asking: bool,
}

impl Timer {
    pub fn new(wait: Duration) -> Timer {
        Timer {
            heard: Instant::now(),
            round: Instant::now(),
            wait,
            asking: false,
        }
    }
}

/// The lease and the spread of the election timeout, from the groups'
/// openraft config.
fn timing(m: &Manager) -> (Duration, Duration) {
    let c = &m.config;
    (
        Duration::from_millis(c.election_timeout_max),
        Duration::from_millis(
            c.election_timeout_max
                .saturating_sub(c.election_timeout_min)
                .max(1),
        ),
    )
}

/// The lease plus a random part of the spread: a member's wait for one round.
pub(super) fn draw(m: &Manager) -> Duration {
    let (lease, spread) = timing(m);
    lease + Duration::from_millis(rand::random::<u64>() % (spread.as_millis() as u64 + 1))
}

impl Group {
    /// A leader was heard from (an append or a snapshot taken, or a vote
    /// granted to a candidate): the member waits a whole round again.
    pub(super) fn heard(&self) {
        self.timer.lock().heard = Instant::now();
    }

    /// A pre-vote for a candidate whose log ends at `candidate_last`.
    pub(super) fn pre_vote(&self, candidate_last: Option<u64>, lease: Duration) -> bool {
        let Some(raft) = self.raft() else {
            return false;
        };
        let metrics = raft.metrics();
        let m = metrics.borrow();
        m.state != ServerState::Leader
            && self.timer.lock().heard.elapsed() >= lease
            && candidate_last >= m.last_log_index
    }

    /// What the ticker does for this member now: a leader heartbeats
    /// (unless a transfer stopped it); a voter that heard from no leader
    /// for its wait asks for pre-votes (and is marked as asking).
    fn due(&self, me: u64, now: Instant) -> Due {
        let leading = self.leading.load(Ordering::Acquire);
        {
            let mut t = self.timer.lock();
            if leading || self.is_transferring() {
                // A leader that steps down waits a whole round first.
                t.heard = now;
                let quiet = self.quiet.load(Ordering::Acquire);
                return match (leading && !quiet).then(|| self.raft()).flatten() {
                    Some(raft) => Due::Beat(raft),
                    None => Due::Nothing,
                };
            }
            if t.asking || now.duration_since(t.heard.max(t.round)) < t.wait {
                return Due::Nothing;
            }
        }
        // Only a member whose wait is over reads its metrics.
        let Some(raft) = self.raft() else {
            return Due::Nothing;
        };
        let (leader, voter) = {
            let metrics = raft.metrics();
            let m = metrics.borrow();
            let voter = m
                .membership_config
                .membership()
                .voter_ids()
                .any(|v| v == me);
            (m.state == ServerState::Leader, voter)
        };
        let mut t = self.timer.lock();
        if leader {
            // Not yet seen by the watch loop: it heartbeats from the next
            // tick on (the fast path above).
            t.heard = now;
            return Due::Nothing;
        }
        if !voter || t.asking {
            return Due::Nothing;
        }
        t.asking = true;
        Due::Stand
    }

    /// One round: ask the other voters for pre-votes, stand if a majority
    /// (counting this member) would vote for it; then wait a new round.
    async fn stand(self: Arc<Self>, m: Arc<Manager>) {
        if let Some(raft) = self.raft() {
            let me = m.ident.id;
            let started = Instant::now();
            let (others, voters, last, vote) = {
                let metrics = raft.metrics();
                let x = metrics.borrow();
                let membership = x.membership_config.membership();
                let others: Vec<_> = membership
                    .voter_ids()
                    .filter(|v| *v != me)
                    .filter_map(|v| membership.get_node(&v).cloned())
                    .collect();
                (
                    others,
                    membership.voter_ids().count(),
                    x.last_log_index,
                    x.vote,
                )
            };
            let within = Duration::from_millis(m.config.heartbeat_interval);
            let mut asks: futures::stream::FuturesUnordered<_> = others
                .iter()
                .map(|node| {
                    let req = GroupRpc {
                        group: self.id.clone(),
                        rpc: Rpc::PreVote {
                            last_log_index: last,
                        },
                    };
                    let ident = Arc::clone(&m.ident);
                    async move {
                        let r = super::network::call(&ident, node, &req, within).await;
                        matches!(r, Ok(Ok(serde_json::Value::Bool(true))))
                    }
                })
                .collect();
            // Counting this member; done at a majority, not at the slowest
            // answer (a dead member's is a timeout).
            let mut yes = 1;
            while 2 * yes <= voters {
                match asks.next().await {
                    Some(true) => yes += 1,
                    Some(false) => {}
                    None => break,
                }
            }
            // A leader heard from, or a vote granted, while asking: another
            // member won meanwhile (its round overlapped this one), and a
            // new term from this member now would only unseat it.
            let moved = self.timer.lock().heard > started || raft.metrics().borrow().vote != vote;
            if 2 * yes > voters && !moved {
                tracing::info!(group = %self.id, queue = %self.name, votes = yes, voters, "quorum queue member stands for election (pre-vote won)");
                let _ = raft.trigger().elect().await;
            } else {
                tracing::debug!(group = %self.id, votes = yes, voters, moved, "pre-vote lost");
            }
        }
        let mut t = self.timer.lock();
        t.round = Instant::now();
        t.wait = draw(&m);
        t.asking = false;
    }
}

/// What [`run`] does for a member at a tick.
enum Due {
    Nothing,
    Stand,
    Beat(openraft::Raft<super::QTypeConfig>),
}

/// Tick every group of this node every half heartbeat: start a pre-vote
/// round for each one due, and every third tick (one and a half heartbeat
/// intervals, as often as openraft's own tick sent them) send the
/// heartbeats of every group this node leads (openraft's own are off), all
/// at once, so that those to one peer share its connection's writes and
/// reads ([`crate::cluster::mux`]) instead of a thousand groups' being
/// spread over the interval one by one.
pub(super) async fn run(m: Weak<Manager>) {
    let every = match m.upgrade() {
        Some(m) => Duration::from_millis((m.config.heartbeat_interval / 2).max(10)),
        None => return,
    };
    let mut ticks = 0u64;
    loop {
        tokio::time::sleep(every).await;
        let Some(m) = m.upgrade() else { return };
        let now = Instant::now();
        ticks += 1;
        let beat = ticks.is_multiple_of(3);
        let groups: Vec<Arc<Group>> = m.groups.lock().values().cloned().collect();
        for g in groups {
            match g.due(m.ident.id, now) {
                Due::Nothing => {}
                Due::Stand => {
                    tokio::spawn(g.stand(Arc::clone(&m)));
                }
                Due::Beat(raft) if beat => {
                    let _ = raft.trigger().heartbeat().await;
                }
                Due::Beat(_) => {}
            }
        }
    }
}

/// The lease a pre-vote answer checks (see [`Group::pre_vote`]).
pub(super) fn lease(m: &Manager) -> Duration {
    timing(m).0
}
