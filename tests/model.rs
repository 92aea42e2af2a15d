//! Model-based test of the broker core: seeded random sequences of declare / bind /
//! unbind / publish / get / consume / cancel / ack / nack / reject / purge / delete /
//! advance-time, run against the broker (no TCP: `tests/model/sut.rs` drives the vhost
//! and its queues like one channel) and against a small reference model of RabbitMQ's
//! queue semantics (`tests/model/reference.rs`), compared after every step: replies
//! (get-ok body, redelivered, message count; confirm outcome; purge/delete counts;
//! error codes), deliveries to consumers, unacked deliveries, and every queue's depths.
//! At the end every queue is drained and compared message by message. Time is virtual:
//! the adapter passes its own `now` to every broker call and `Advance` moves it and runs
//! the broker's periodic tick, so TTLs (0 included) fire at exact moments, no sleeps.
//!
//! `WARREN_MODEL_SEEDS=N` runs seeds 0..N (default 2000); `WARREN_MODEL_SEED=S` replays
//! seed S alone and prints its steps and deliveries. A failure prints the seed, a shrunk
//! step list, both observations and the command that replays it.
//!
//! The model expects RabbitMQ's semantics exactly: the four differences it first found
//! (length limit before delivery, get-ok counting expired messages, due-now messages
//! handed out again on requeue, credit returned ahead of requeues) are fixed.

#[path = "model/ops.rs"]
mod ops;
#[path = "model/reference.rs"]
mod reference;
#[path = "model/sut.rs"]
mod sut;

use ops::*;
use reference::{Model, Settle};
use sut::Sut;

/// Where a run diverged.
#[derive(Debug)]
struct Divergence {
    /// Index of the step in the scenario (`ops.len()` for the final drain).
    step: usize,
    what: String,
    expected: String,
    actual: String,
}

/// Run one step on both sides; the model decides whether the step applies.
fn step(
    model: &mut Model,
    sut: &mut Sut,
    s: &Scenario,
    op: &Op,
    next_body: &mut u64,
) -> (Observation, Observation) {
    let both = |model: &mut Model, sut: &mut Sut, r: (Reply, Reply)| {
        (model.observe(r.0), sut.observe(r.1))
    };
    let settle = |model: &mut Model, sut: &mut Sut, pick: u16, multiple: bool, how: Settle| {
        let n = model.outstanding_len();
        if n > 0 {
            let i = usize::from(pick) % n;
            model.settle(i, multiple, how);
            sut.settle(i, multiple, how);
        }
        (Reply::Done, Reply::Done)
    };
    let replies = match *op {
        Op::Declare { q, alt } => {
            let name = SOURCES[usize::from(q) % 3];
            let args = s.args(q, alt);
            (model.declare(name, args), sut.declare(name, args))
        }
        Op::Bind { q, key } | Op::Unbind { q, key } => {
            let name = SOURCES[usize::from(q) % 3];
            let key = KEYS[usize::from(key) % 2];
            let bind = matches!(op, Op::Bind { .. });
            (model.bind(name, key, bind), sut.bind(name, key, bind))
        }
        Op::Publish {
            to,
            priority,
            expiration,
            pad,
        } => {
            let body = format!("m{}{}", next_body, ".".repeat(usize::from(pad)));
            *next_body += 1;
            let (exchange, key) = match to {
                Target::Exchange(k) => (EXCHANGE, KEYS[usize::from(k) % 2]),
                Target::Default(6) => ("", "nowhere"),
                Target::Default(i) => ("", queue_name(i)),
            };
            (
                model.publish(exchange, key, &body, priority, expiration),
                sut.publish(exchange, key, &body, priority, expiration),
            )
        }
        Op::Get { q, no_ack } => {
            let name = queue_name(q);
            (model.get(name, no_ack), sut.get(name, no_ack))
        }
        Op::Consume {
            q,
            prefetch,
            no_ack,
        } => {
            let name = queue_name(q);
            match model.consume(name, u32::from(prefetch), no_ack) {
                Some(r) => (r, sut.consume(name, u32::from(prefetch), no_ack)),
                None => (Reply::Done, Reply::Done),
            }
        }
        Op::Cancel { q } => {
            let name = queue_name(q);
            if model.has_consumer(name) {
                model.cancel(name);
                sut.cancel(name);
            }
            (Reply::Done, Reply::Done)
        }
        Op::Ack { pick, multiple } => settle(model, sut, pick, multiple, Settle::Ack),
        Op::Nack {
            pick,
            multiple,
            requeue,
        } => {
            let how = if requeue {
                Settle::Requeue
            } else {
                Settle::Discard
            };
            settle(model, sut, pick, multiple, how)
        }
        Op::Reject { pick, requeue } => {
            let how = if requeue {
                Settle::Requeue
            } else {
                Settle::Discard
            };
            settle(model, sut, pick, false, how)
        }
        Op::Purge { q } => {
            let name = queue_name(q);
            (model.purge(name), sut.purge(name))
        }
        Op::Delete { q } => {
            let name = SOURCES[usize::from(q) % 3];
            (model.delete(name), sut.delete(name))
        }
        Op::Advance { ms } => {
            model.advance(ms);
            sut.advance(ms);
            (Reply::Done, Reply::Done)
        }
    };
    both(model, sut, replies)
}

fn run(s: &Scenario, trace: bool) -> Result<(), Divergence> {
    let mut model = Model::new();
    let mut sut = Sut::new();
    let mut next_body = 0;
    for (i, op) in s.ops.iter().enumerate() {
        let (expected, actual) = step(&mut model, &mut sut, s, op, &mut next_body);
        if trace {
            eprintln!("{i:>3} {op:?}\n    {:?}", actual.reply);
            for p in &actual.pushed {
                eprintln!("    -> {} {:?}", p.queue, p.msg);
            }
        }
        if expected != actual {
            return Err(Divergence {
                step: i,
                what: format!("{op:?}"),
                expected: format!("{expected:#?}"),
                actual: format!("{actual:#?}"),
            });
        }
    }
    // Drain everything that is left, message by message.
    let names: Vec<&str> = SOURCES.iter().chain(DLQS.iter()).copied().collect();
    for name in names {
        for _ in 0..10_000 {
            let e = model.get(name, true);
            let a = sut.get(name, true);
            if e != a {
                return Err(Divergence {
                    step: s.ops.len(),
                    what: format!("final drain: get {name}"),
                    expected: format!("{e:#?}"),
                    actual: format!("{a:#?}"),
                });
            }
            if !matches!(e, Reply::GetOk { .. }) {
                break;
            }
        }
    }
    Ok(())
}

/// Drop steps while the scenario still diverges, for a short replay.
fn shrink(s: &Scenario) -> Scenario {
    let mut best = s.clone();
    loop {
        let mut progress = false;
        let mut i = best.ops.len();
        while i > 0 {
            i -= 1;
            let mut candidate = best.clone();
            candidate.ops.remove(i);
            if run(&candidate, false).is_err() {
                best = candidate;
                progress = true;
            }
        }
        if !progress {
            return best;
        }
    }
}

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    Some(
        v.parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, got {v:?}")),
    )
}

fn report(s: &Scenario, d: &Divergence) -> String {
    let small = shrink(s);
    let why = run(&small, false).err();
    let mut out = format!(
        "model and broker diverge: seed {} (timed: {}), step {} of {}: {}\n",
        s.seed,
        s.timed,
        d.step,
        s.ops.len(),
        d.what
    );
    out += &format!(
        "replay: WARREN_MODEL_SEED={} cargo test --test model -- --nocapture\n",
        s.seed
    );
    out += "queue arguments (primary, alternative):\n";
    for (i, p) in s.profiles.iter().enumerate() {
        out += &format!("  {}: {:?}\n      {:?}\n", SOURCES[i], p.0, p.1);
    }
    out += &format!("shrunk to {} steps:\n", small.ops.len());
    for (i, op) in small.ops.iter().enumerate() {
        out += &format!("  {i:>3} {op:?}\n");
    }
    let d = why.as_ref().unwrap_or(d);
    out += &format!(
        "diverging at step {} ({})\nexpected (model):\n{}\nactual (broker):\n{}\n",
        d.step, d.what, d.expected, d.actual
    );
    out
}

#[test]
fn broker_matches_reference_model() {
    let timed = sut::TIMED;
    if let Some(seed) = env_u64("WARREN_MODEL_SEED") {
        let s = Scenario::generate(seed, timed);
        if let Err(d) = run(&s, true) {
            panic!("{}", report(&s, &d));
        }
        return;
    }
    let seeds = env_u64("WARREN_MODEL_SEEDS").unwrap_or(2000);
    let mut steps = 0;
    for seed in 0..seeds {
        let s = Scenario::generate(seed, timed);
        steps += s.ops.len();
        if let Err(d) = run(&s, false) {
            panic!("{}", report(&s, &d));
        }
    }
    eprintln!("{seeds} sequences, {steps} steps: broker and model agree");
}
