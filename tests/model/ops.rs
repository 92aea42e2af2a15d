//! The vocabulary shared by the reference model and the adapter: the fixed universe of
//! names, queue argument profiles, the operations of a sequence (and how a seed
//! generates them), and the observations compared after every step.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::BTreeMap;

/// Source queues (declared, deleted, bound, published to). Index 0..3.
pub const SOURCES: [&str; 3] = ["q0", "q1", "q2"];
/// Dead-letter queues, declared once at setup: `dlq<i>` is bound to the dead-letter
/// exchange with key `q<i>`. Index 3..6 in [`queue_name`].
pub const DLQS: [&str; 3] = ["dlq0", "dlq1", "dlq2"];
/// The direct exchange `bind`/`unbind`/`publish` use.
pub const EXCHANGE: &str = "ex";
/// The direct dead-letter exchange.
pub const DLX: &str = "dlx";
/// Routing keys for bindings on [`EXCHANGE`]. None of them is a dead-letter key
/// (`q<i>`), so every dead-letter queue is fed by its one source queue only, and the
/// order of its contents is well defined.
pub const KEYS: [&str; 2] = ["a", "b"];
/// Virtual time starts here (ms since the epoch).
pub const T0: u64 = 1_700_000_000_000;
/// A TTL no sequence outlives (used when time is not driven).
pub const FOREVER: u64 = 3_600_000;

/// Queue `i`: 0..3 are the sources, 3..6 the dead-letter queues.
pub fn queue_name(i: u8) -> &'static str {
    let i = usize::from(i) % 6;
    if i < 3 {
        SOURCES[i]
    } else {
        DLQS[i - 3]
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overflow {
    DropHead,
    RejectPublish,
    RejectPublishDlx,
}

/// The `x-` arguments a source queue is declared with.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct QArgs {
    pub message_ttl: Option<u64>,
    pub max_length: Option<u64>,
    pub max_length_bytes: Option<u64>,
    /// `None`: the argument is not given (drop-head).
    pub overflow: Option<Overflow>,
    /// Dead-letter to [`DLX`]; `Some(rk)` also sets `x-dead-letter-routing-key`.
    pub dlx: Option<Option<String>>,
    pub max_priority: Option<u8>,
}

impl QArgs {
    pub fn overflow(&self) -> Overflow {
        self.overflow.unwrap_or(Overflow::DropHead)
    }

    fn random(rng: &mut StdRng, queue: usize, timed: bool) -> QArgs {
        let ttls: &[u64] = if timed { &[0, 10, 25, 60] } else { &[FOREVER] };
        QArgs {
            message_ttl: rng
                .gen_bool(0.35)
                .then(|| ttls[rng.gen_range(0..ttls.len())]),
            max_length: rng.gen_bool(0.4).then(|| rng.gen_range(0..=4)),
            max_length_bytes: rng.gen_bool(0.15).then(|| rng.gen_range(4..=30)),
            overflow: match rng.gen_range(0..4) {
                0 => None,
                1 => Some(Overflow::DropHead),
                2 => Some(Overflow::RejectPublish),
                _ => Some(Overflow::RejectPublishDlx),
            },
            dlx: rng
                .gen_bool(0.7)
                .then(|| rng.gen_bool(0.6).then(|| SOURCES[queue].to_string())),
            max_priority: rng.gen_bool(0.3).then(|| rng.gen_range(1..=5)),
        }
    }
}

/// Where a publish goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// [`EXCHANGE`] with `KEYS[i]`.
    Exchange(u8),
    /// The default exchange with routing key [`queue_name`]`(i)`; 6 is a missing queue.
    Default(u8),
}

/// One step of a sequence. Indices that pick among outstanding deliveries are taken
/// modulo their number when the step runs (a step with nothing to pick is a no-op),
/// so any sub-sequence of a sequence is a valid sequence (for shrinking).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Declare source queue `q` with its primary (or alternative) arguments.
    Declare {
        q: u8,
        alt: bool,
    },
    Bind {
        q: u8,
        key: u8,
    },
    Unbind {
        q: u8,
        key: u8,
    },
    Publish {
        to: Target,
        priority: Option<u8>,
        expiration: Option<u64>,
        pad: u8,
    },
    Get {
        q: u8,
        no_ack: bool,
    },
    /// A consumer on queue `q` (one per queue; a second is a no-op). Prefetch 0: unlimited.
    Consume {
        q: u8,
        prefetch: u8,
        no_ack: bool,
    },
    Cancel {
        q: u8,
    },
    Ack {
        pick: u16,
        multiple: bool,
    },
    Nack {
        pick: u16,
        multiple: bool,
        requeue: bool,
    },
    Reject {
        pick: u16,
        requeue: bool,
    },
    Purge {
        q: u8,
    },
    /// Delete source queue `q` (unconditionally).
    Delete {
        q: u8,
    },
    /// Let `ms` of virtual time pass (the broker's periodic tick runs at the new time).
    Advance {
        ms: u64,
    },
}

/// A generated sequence: the queue argument profiles and the steps.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub seed: u64,
    /// Whether time is driven (TTLs short, `Advance` steps present).
    pub timed: bool,
    /// (primary, alternative) arguments of each source queue.
    pub profiles: [(QArgs, QArgs); 3],
    pub ops: Vec<Op>,
}

impl Scenario {
    pub fn generate(seed: u64, timed: bool) -> Scenario {
        let mut rng = StdRng::seed_from_u64(seed);
        let profiles = [0, 1, 2].map(|i| {
            (
                QArgs::random(&mut rng, i, timed),
                QArgs::random(&mut rng, i, timed),
            )
        });
        let mut ops = Vec::new();
        for q in 0..3 {
            ops.push(Op::Declare { q, alt: false });
            ops.push(Op::Bind {
                q,
                key: rng.gen_range(0..2),
            });
        }
        let len = rng.gen_range(30..90);
        while ops.len() < len {
            if let Some(op) = random_op(&mut rng, timed) {
                ops.push(op);
            }
        }
        Scenario {
            seed,
            timed,
            profiles,
            ops,
        }
    }

    pub fn args(&self, q: u8, alt: bool) -> &QArgs {
        let p = &self.profiles[usize::from(q) % 3];
        if alt {
            &p.1
        } else {
            &p.0
        }
    }
}

fn random_op(rng: &mut StdRng, timed: bool) -> Option<Op> {
    let src = |rng: &mut StdRng| rng.gen_range(0..3u8);
    let any = |rng: &mut StdRng| rng.gen_range(0..6u8);
    let pick = |rng: &mut StdRng| rng.gen_range(0..64u16);
    Some(match rng.gen_range(0..100) {
        0..=4 => Op::Declare {
            q: src(rng),
            alt: rng.gen_bool(0.15),
        },
        5..=8 => Op::Bind {
            q: src(rng),
            key: rng.gen_range(0..2),
        },
        9..=10 => Op::Unbind {
            q: src(rng),
            key: rng.gen_range(0..2),
        },
        11..=38 => {
            let expirations: &[u64] = if timed { &[0, 5, 20, 50] } else { &[FOREVER] };
            Op::Publish {
                to: if rng.gen_bool(0.6) {
                    Target::Exchange(rng.gen_range(0..2))
                } else {
                    Target::Default(rng.gen_range(0..7))
                },
                priority: rng.gen_bool(0.4).then(|| rng.gen_range(0..8)),
                expiration: rng
                    .gen_bool(0.25)
                    .then(|| expirations[rng.gen_range(0..expirations.len())]),
                pad: rng.gen_range(0..8),
            }
        }
        39..=51 => Op::Get {
            q: any(rng),
            no_ack: rng.gen_bool(0.3),
        },
        52..=56 => Op::Consume {
            q: any(rng),
            prefetch: rng.gen_range(0..4),
            no_ack: rng.gen_bool(0.15),
        },
        57..=59 => Op::Cancel { q: any(rng) },
        60..=68 => Op::Ack {
            pick: pick(rng),
            multiple: rng.gen_bool(0.3),
        },
        69..=76 => Op::Nack {
            pick: pick(rng),
            multiple: rng.gen_bool(0.4),
            requeue: rng.gen_bool(0.6),
        },
        77..=83 => Op::Reject {
            pick: pick(rng),
            requeue: rng.gen_bool(0.5),
        },
        84..=85 => Op::Purge { q: any(rng) },
        86..=87 => Op::Delete { q: src(rng) },
        _ if timed => Op::Advance {
            ms: [1, 4, 10, 25, 60][rng.gen_range(0..5)],
        },
        _ => return None,
    })
}

/// A message as a client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Msg {
    pub body: String,
    pub exchange: String,
    pub routing_key: String,
    pub redelivered: bool,
    pub expiration: Option<String>,
    /// `x-death`: (queue, reason, count), most recent first.
    pub deaths: Vec<(String, String, i64)>,
}

/// What one step answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// Nothing to compare (the step was a no-op, or it only changed state).
    Done,
    /// The method failed with this reply code.
    Error(u16),
    /// declare-ok: ready messages and consumers.
    Declared {
        messages: usize,
        consumers: usize,
    },
    /// `routed`: reached at least one queue; `rejected`: some queue refused it
    /// (the publisher's confirm is a nack).
    Published {
        routed: bool,
        rejected: bool,
    },
    GetEmpty,
    GetOk {
        msg: Msg,
        message_count: usize,
    },
    /// purge-ok / delete-ok message count.
    Count(usize),
}

/// A message pushed to a consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    pub queue: String,
    pub msg: Msg,
    pub no_ack: bool,
}

/// Everything observable after a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observation {
    pub reply: Reply,
    /// Deliveries made during the step, grouped by queue (stable within a queue:
    /// the order between queues is not defined).
    pub pushed: Vec<Pushed>,
    /// Per queue: (ready, unacked, consumers).
    pub depths: BTreeMap<String, (usize, usize, usize)>,
    /// Deliveries awaiting ack, in delivery-tag order: (queue, body).
    pub outstanding: Vec<(String, String)>,
}
