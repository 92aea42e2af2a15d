//! Deterministic simulation of a warren quorum queue group (issue 14), on the
//! harness in `tests/sim` (which says what it runs and checks at the Raft
//! level): 3 or 5 members, each on warren's log store over a simulated disk
//! and the quorum queue state machine (`warren::cluster::quorum::store`,
//! `QSm`, which rebuilds from its snapshot at each start), clients proposing
//! `Enqueue` batches of messages with unique bodies, `Settle`s of ids
//! whose enqueue was acknowledged, and `Checkout`s and `Return`s of such
//! ids (a serving leader's reports). Checked besides the Raft level: after each
//! apply or snapshot install, no id settled at or before it is live, every
//! id out with a client or with returns counted is live, and every
//! live message is the one its id's committed `Enqueue` carried; after the
//! final heal, every acknowledged enqueue no client proposed to settle is
//! live on every member, no message was enqueued under two ids, and every
//! member's queue state is the same and the committed sequence's.
//!
//! - `WARREN_QSIM_SEEDS=N`: how many seeds (default 500), from
//!   `WARREN_QSIM_FIRST` (default 0).
//! - `WARREN_QSIM_SEED=S`: only seed S, with its event trace printed.

mod sim;

use openraft::EntryPayload;
use rand::Rng;
use sim::{id_of, Kind, World};
use std::collections::{BTreeMap, BTreeSet};
use warren::broker::message::Message;
use warren::cluster::disk::MemoryDisk;
use warren::cluster::quorum::command::{id, QCommand, QMsg, QState};
use warren::cluster::quorum::store::{QLog, QSm};
use warren::cluster::quorum::QTypeConfig;

/// A quorum queue's group.
struct Quorum;

/// What the simulation of a quorum group records.
#[derive(Default)]
struct Record {
    /// Bodies handed out so far (each message's is unique).
    bodies: u64,
    /// The ids of acknowledged enqueues, with their bodies.
    acked: BTreeMap<u64, Vec<u8>>,
    /// The ids any client proposed to settle (acknowledged or not).
    proposed_settles: BTreeSet<u64>,
    /// The index of the first committed `Settle` of each id.
    settled: BTreeMap<u64, u64>,
    /// The committed entries looked at for `settled` (indexes).
    scanned: BTreeSet<u64>,
}

fn msg(body: u64) -> QMsg {
    let m = Message::new(
        "",
        "q",
        warren::wire::BasicProperties::default(),
        bytes::Bytes::from(format!("m{body}")),
    );
    QMsg::of(&m)
}

impl Kind for Quorum {
    type C = QTypeConfig;
    type Sm = QSm;
    type Record = Record;
    const TEST: &'static str = "quorum_sim";
    const ENV: &'static str = "WARREN_QSIM";
    const APPLIED_IS_DURABLE: bool = false;
    // Often: the state machine rebuilds from its snapshot at every start.
    const SNAPSHOT_EVERY: (u64, u64) = (8, 2);

    fn open(disk: &MemoryDisk) -> (QLog, QSm) {
        let log = QLog::in_memory(disk);
        let sm = QSm::open(log.clone()).expect("the state machine opens from its snapshot");
        (log, sm)
    }

    fn command(w: &mut World<Quorum>) -> QCommand {
        let known: Vec<u64> = w.record.acked.keys().copied().collect();
        if !known.is_empty() && w.rng.gen_bool(0.2) {
            // A serving leader's report of deliveries: some ids out with a
            // client, some back unsent, or returned (counted).
            let pick = |w: &mut World<Quorum>| -> Vec<u64> {
                let k = w.rng.gen_range(0..=known.len().min(3));
                (0..k)
                    .map(|_| known[w.rng.gen_range(0..known.len())])
                    .collect::<BTreeSet<u64>>()
                    .into_iter()
                    .collect()
            };
            if w.rng.gen_bool(0.3) {
                return QCommand::Return(pick(w));
            }
            let (out, back) = (pick(w), pick(w));
            let back = back.into_iter().filter(|i| !out.contains(i)).collect();
            return QCommand::Checkout { out, back };
        }
        if !known.is_empty() && w.rng.gen_bool(0.45) {
            // Mostly ids not proposed for settling yet; now and then one again
            // (a settle resent after a lost answer).
            let fresh: Vec<u64> = known
                .iter()
                .copied()
                .filter(|i| !w.record.proposed_settles.contains(i))
                .collect();
            let pool = if fresh.is_empty() || w.rng.gen_bool(0.1) {
                &known
            } else {
                &fresh
            };
            let k = w.rng.gen_range(1..=pool.len().min(3));
            let ids: BTreeSet<u64> = (0..k)
                .map(|_| pool[w.rng.gen_range(0..pool.len())])
                .collect();
            w.record.proposed_settles.extend(&ids);
            return QCommand::Settle(ids.into_iter().collect());
        }
        let k = w.rng.gen_range(1..=4);
        let batch = (0..k)
            .map(|_| {
                w.record.bodies += 1;
                msg(w.record.bodies)
            })
            .collect();
        QCommand::Enqueue(batch)
    }

    fn barrier() -> QCommand {
        QCommand::Settle(Vec::new())
    }

    fn acked(w: &mut World<Quorum>, index: u64, cmd: QCommand) {
        if let QCommand::Enqueue(batch) = cmd {
            for (i, m) in batch.into_iter().enumerate() {
                w.record.acked.insert(id(index, i), m.message.body.to_vec());
            }
        }
    }

    fn applied(w: &mut World<Quorum>, node: usize, sm: &QSm) {
        // The settles committed so far.
        let new: Vec<(u64, Vec<u64>)> = w
            .committed
            .iter()
            .filter(|(i, _)| !w.record.scanned.contains(i))
            .map(|(i, (_, p))| match p {
                EntryPayload::Normal(QCommand::Settle(ids)) => (*i, ids.clone()),
                _ => (*i, Vec::new()),
            })
            .collect();
        for (index, ids) in new {
            w.record.scanned.insert(index);
            for i in ids {
                let at = w.record.settled.entry(i).or_insert(index);
                *at = (*at).min(index);
            }
        }
        let Some(applied) = w.slots[node].applied else {
            return;
        };
        let mut found = Vec::new();
        // Bodies a member does not hold are read back from its disk (a
        // follower keeps them there only): checked as well.
        let state = match sm.full_state() {
            Ok(Some(state)) => state,
            Ok(None) => return,
            Err(e) => {
                w.violation(format!("n{}: reading bodies back: {e}", id_of(node)));
                return;
            }
        };
        for mid in state.out.iter().chain(state.returns.keys()) {
            if !state.messages.contains_key(mid) {
                found.push(format!(
                    "n{}: id {mid:#x} is out or counted but not live",
                    id_of(node)
                ));
            }
        }
        for (mid, m) in &state.messages {
            if w.record.settled.get(mid).is_some_and(|s| *s <= applied) {
                found.push(format!(
                    "n{}: id {mid:#x}, settled, is live again (applied to {applied})",
                    id_of(node)
                ));
            }
            let index = mid >> 16;
            let i = (mid & 0xffff) as usize;
            let carried = match w.committed.get(&index) {
                Some((_, EntryPayload::Normal(QCommand::Enqueue(b)))) => b.get(i),
                // Its enqueue was never seen applied (every member installed
                // a snapshot over it): nothing to compare with.
                None => Some(m),
                Some(_) => None,
            };
            if carried != Some(m) {
                found.push(format!(
                    "n{}: id {mid:#x} holds a message its committed entry did not enqueue",
                    id_of(node)
                ));
            }
        }
        for v in found {
            w.violation(v);
        }
    }

    fn check_models(w: &mut World<Quorum>, barrier: u64) {
        let n = w.n();
        let states: Vec<Option<QState>> = (0..n)
            .map(|i| match w.slots[i].sm.as_ref().map(|sm| sm.full_state()) {
                Some(Ok(Some(state))) => Ok(Some(state)),
                Some(Ok(None)) => Err("a snapshot was being replaced".to_string()),
                Some(Err(e)) => Err(e),
                None => Ok(None),
            })
            .collect::<Result<_, _>>()
            .unwrap_or_else(|e| {
                w.violation(format!("reading bodies back after convergence: {e}"));
                vec![None; n]
            });
        let mut found = Vec::new();
        // The committed sequence's state, when every entry of it was seen.
        let full = w.full(barrier);
        let mut reference = QState::default();
        // No message enqueued under two ids.
        let mut ids_of: BTreeMap<&[u8], u64> = BTreeMap::new();
        for (index, (_, p)) in w.committed.range(..=barrier) {
            if let EntryPayload::Normal(cmd) = p {
                reference.apply(*index, cmd);
                if let QCommand::Enqueue(batch) = cmd {
                    for (i, m) in batch.iter().enumerate() {
                        if let Some(other) = ids_of.insert(&m.message.body, id(*index, i)) {
                            found.push(format!(
                                "message {} enqueued twice: ids {other:#x} and {:#x}",
                                String::from_utf8_lossy(&m.message.body),
                                id(*index, i)
                            ));
                        }
                    }
                }
            }
        }
        for (i, s) in states.iter().enumerate() {
            let Some(s) = s else {
                found.push(format!("n{} is down after convergence", id_of(i)));
                continue;
            };
            if Some(s) != states[0].as_ref() {
                found.push(format!("n{}'s queue state differs from n1's", id_of(i)));
            }
            if full && *s != reference {
                found.push(format!(
                    "n{}'s queue state is not the committed sequence's",
                    id_of(i)
                ));
            }
            // Every acknowledged enqueue is live unless a client settled it.
            for (mid, body) in &w.record.acked {
                if w.record.proposed_settles.contains(mid) {
                    continue;
                }
                if s.messages.get(mid).map(|m| &m.message.body[..]) != Some(&body[..]) {
                    found.push(format!(
                        "n{}: acknowledged id {mid:#x} ({}) is not live",
                        id_of(i),
                        String::from_utf8_lossy(body)
                    ));
                }
            }
            for (mid, at) in &w.record.settled {
                if *at <= barrier && s.messages.contains_key(mid) {
                    found.push(format!(
                        "n{}: id {mid:#x} settled at {at} is live",
                        id_of(i)
                    ));
                }
            }
        }
        for v in found {
            w.violation(v);
        }
        let (live, settled) = (reference.messages.len(), w.record.settled.len());
        let acked = w.record.acked.len();
        w.note(|| {
            format!("queue: {acked} enqueues acknowledged, {settled} ids settled, {live} live")
        });
    }
}

#[test]
fn seeded_schedules_keep_the_quorum_queue_invariants() {
    sim::run_seeds::<Quorum>(500);
}

#[test]
fn a_seed_is_a_schedule() {
    sim::a_seed_is_a_schedule::<Quorum>();
}
