//! Deterministic simulation of warren's metadata Raft group (issue 14), on
//! the harness in `tests/sim` (which says what it runs and checks): warren's
//! log store and metadata state machine (`warren::cluster::store`, applying to
//! the pure model), clients proposing metadata commands (declares, deletes,
//! bindings, vhosts, users, permissions, policies; some refused by every
//! member alike). Checked of the state machines after the final heal:
//! acknowledged proposals committed, the same model on every member, and the
//! committed sequence's (docs/cluster.md has the why).
//!
//! - `WARREN_SIM_SEEDS=N`: how many seeds (default 2000), from
//!   `WARREN_SIM_FIRST` (default 0).
//! - `WARREN_SIM_SEED=S`: only seed S, with its event trace printed.

mod sim;

use openraft::EntryPayload;
use rand::rngs::StdRng;
use rand::Rng;
use sim::{id_of, Kind, World};
use std::collections::BTreeMap;
use std::sync::Arc;
use warren::cluster::command::{Args, BindingRec, Metadata};
use warren::cluster::disk::MemoryDisk;
use warren::cluster::store::{LogStore, StateMachine, Target};
use warren::cluster::{Command, TypeConfig};

/// The metadata group.
struct Meta;

impl Kind for Meta {
    type C = TypeConfig;
    type Sm = StateMachine;
    /// Proposals a member answered Ok.
    type Record = Vec<Command>;
    const TEST: &'static str = "raft_sim";
    const ENV: &'static str = "WARREN_SIM";
    // The model is rebuilt at each start from its base (written at each
    // snapshot) and the entries after it, applied again to the model only:
    // no entry twice within a life here; that the broker is not given them
    // again is the store's unit test
    // (`after_a_restart_the_entries_since_the_base_rebuild_the_model_only`),
    // and every member's model is checked against the others'.
    const APPLIED_IS_DURABLE: bool = false;
    const SNAPSHOT_EVERY: (u64, u64) = (20, 5);

    fn open(disk: &MemoryDisk) -> (LogStore, StateMachine) {
        let store = LogStore::in_memory(disk);
        let sm = StateMachine::open(Arc::new(ModelTarget), store.clone()).expect("state machine");
        (store, sm)
    }

    fn command(w: &mut World<Meta>) -> Command {
        let n = w.n();
        command(&mut w.rng, n)
    }

    fn barrier() -> Command {
        Command::PutVhost {
            name: "barrier".into(),
            creator: None,
            meta: None,
        }
    }

    fn acked(w: &mut World<Meta>, _index: u64, cmd: Command) {
        w.record.push(cmd);
    }

    fn applied(_: &mut World<Meta>, _: usize, _: &StateMachine) {}

    fn check_models(w: &mut World<Meta>, barrier: u64) {
        check_models(w, barrier);
    }
}

/// The state machine's target in the simulation: the pure model only. It
/// refuses one kind of command (an exchange of type `x-refused`) on every
/// member alike, as a broker refuses an inequivalent declare.
struct ModelTarget;

fn refused(cmd: &Command) -> bool {
    matches!(cmd, Command::DeclareExchange { kind, .. } if kind == "x-refused")
}

impl Target for ModelTarget {
    fn apply(&self, cmd: &Command, _now: u64) -> Result<(), String> {
        if refused(cmd) {
            Err("refused".into())
        } else {
            Ok(())
        }
    }
}

fn command(rng: &mut StdRng, nodes: usize) -> Command {
    let vhost = ["/", "/", "v1"][rng.gen_range(0..3)].to_string();
    let x = format!("x{}", rng.gen_range(0..4));
    let q = format!("q{}", rng.gen_range(0..5));
    let user = ["ann", "bob", "cy"][rng.gen_range(0..3)].to_string();
    let binding = |rng: &mut StdRng| BindingRec {
        vhost: vhost.clone(),
        source: x.clone(),
        to_exchange: rng.gen_bool(0.2),
        destination: if rng.gen_bool(0.2) {
            format!("x{}", rng.gen_range(0..4))
        } else {
            q.clone()
        },
        routing_key: format!("k{}", rng.gen_range(0..3)),
        arguments: Args::default(),
    };
    match rng.gen_range(0..100) {
        0..=19 => Command::DeclareQueue {
            vhost,
            name: q,
            node: format!("sim@n{}", rng.gen_range(1..=nodes)),
            durable: rng.gen_bool(0.8),
            auto_delete: false,
            arguments: Args::default(),
        },
        20..=27 => Command::DeleteQueue { vhost, name: q },
        28..=43 => Command::DeclareExchange {
            vhost,
            name: x,
            kind: ["direct", "fanout", "topic", "x-refused"][rng.gen_range(0..4)].into(),
            durable: true,
            auto_delete: false,
            internal: false,
            arguments: Args::default(),
        },
        44..=49 => Command::DeleteExchange { vhost, name: x },
        50..=64 => Command::Bind(binding(rng)),
        65..=71 => Command::Unbind(binding(rng)),
        72..=76 => Command::PutVhost {
            name: ["v1", "v2"][rng.gen_range(0..2)].into(),
            creator: Some(user),
            meta: None,
        },
        77..=78 => Command::DeleteVhost {
            name: ["v1", "v2"][rng.gen_range(0..2)].into(),
        },
        79..=84 => Command::PutUser {
            name: user,
            password_hash: format!("{:016x}", rng.gen::<u64>()),
            tags: vec!["management".into()],
        },
        85..=86 => Command::DeleteUser { name: user },
        87..=91 => Command::SetPermission {
            vhost,
            user,
            configure: ".*".into(),
            write: ".*".into(),
            read: format!("^q{}", rng.gen_range(0..3)),
        },
        92..=93 => Command::ClearPermission { vhost, user },
        94..=97 => Command::PutPolicy {
            vhost,
            name: format!("p{}", rng.gen_range(0..2)),
            pattern: "^q".into(),
            apply_to: "queues".into(),
            priority: rng.gen_range(0..3),
            definition: r#"{"max-length":10}"#.into(),
            operator: false,
        },
        _ => Command::DeletePolicy {
            vhost,
            name: format!("p{}", rng.gen_range(0..2)),
            operator: false,
        },
    }
}

/// Acknowledged proposals are committed; every member's model is the same
/// and the committed sequence's.
fn check_models(w: &mut World<Meta>, barrier: u64) {
    let n = w.n();
    // The committed sequence, as the state machines were given it.
    let mut reference = Metadata::default();
    for i in 0..=barrier {
        match w.committed.get(&i) {
            Some((_, EntryPayload::Normal(cmd))) if !refused(cmd) => {
                reference.record(cmd);
                reference.note_declared(cmd, i);
            }
            Some(_) => {}
            None => {
                // Every member installed a snapshot over it: only the
                // snapshot's model is known. Compare the models only.
                reference = Metadata::default();
                break;
            }
        }
    }
    let full = w.full(barrier);
    // Every proposal answered Ok is in the committed sequence.
    let mut in_log: BTreeMap<String, usize> = BTreeMap::new();
    for (_, p) in w.committed.values() {
        if let EntryPayload::Normal(c) = p {
            *in_log.entry(format!("{c:?}")).or_default() += 1;
        }
    }
    let mut acked: BTreeMap<String, usize> = BTreeMap::new();
    for c in &w.record {
        *acked.entry(format!("{c:?}")).or_default() += 1;
    }
    let mut found = Vec::new();
    for (c, k) in &acked {
        let have = in_log.get(c).copied().unwrap_or(0);
        if have < *k && full {
            found.push(format!(
                "acknowledged {k} time(s) but committed {have}: {c}"
            ));
        }
    }
    // Every member's model is the same, and the committed sequence's.
    let models: Vec<Option<Metadata>> = (0..n)
        .map(|i| w.slots[i].sm.as_ref().map(|sm| sm.metadata()))
        .collect();
    for (i, m) in models.iter().enumerate() {
        let Some(m) = m else { continue };
        if Some(m) != models[0].as_ref() {
            found.push(format!("n{}'s model differs from n1's", id_of(i)));
        }
        if full && *m != reference {
            found.push(format!(
                "n{}'s model is not the committed sequence's",
                id_of(i)
            ));
        }
    }
    for v in found {
        w.violation(v);
    }
}

#[test]
fn seeded_schedules_keep_the_raft_invariants() {
    sim::run_seeds::<Meta>(2000);
}

#[test]
fn a_seed_is_a_schedule() {
    sim::a_seed_is_a_schedule::<Meta>();
}
