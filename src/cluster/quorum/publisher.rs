//! Publishes to one quorum queue from this node, carried to the group's
//! leader and resent after a failover until each is answered: RabbitMQ's
//! enqueuer (`rabbit_fifo_client`) with its sequence numbers.
//!
//! Every publish a node routes to a quorum queue, on the leader or not,
//! goes through the queue's [`Publisher`] here. It numbers them (1, 2, ...
//! under an id of its own) and keeps each until the group answers it; it
//! sends them, in their order, to wherever the queue is served: this node's
//! member ([`Group::propose`]) or the leader's node over the data link
//! ([`Link::publish_quorum`](crate::cluster::forward::Link::publish_quorum)).
//! When one is not taken (the leader lost, stepped down or was unreachable,
//! its commit did not come in time, or the group saw it out of sequence),
//! the publisher stops sending, waits until the queue is served again, and
//! resends everything not yet answered, in order. The group takes a
//! publisher's numbers in order only and recognises the ones it has
//! ([`super::command::QState::apply`]), so a message whose first copy did
//! commit is not enqueued twice, and none is skipped. A publish still not
//! answered [`Manager::resend_within`] after it came is nacked.

use super::command::QMsg;
use super::serve::Group;
use super::Manager;
use crate::broker::message::Message;
use crate::broker::remote::Ticket;
use parking_lot::Mutex;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// A new publisher id: random over 64 bits, so that two publishers of one
/// queue never share one (they would share a sequence).
fn new_id() -> u64 {
    rand::random::<u64>().max(1)
}

/// What became of one send of a publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Committed and in the queue (or taken before).
    Taken,
    /// Committed, and the queue refused it (`x-overflow: reject-publish`).
    Refused,
    /// Not taken: send it again (with everything after it).
    Resend,
}

/// Where a send's answer goes; called once.
pub type Reply = Box<dyn FnOnce(Answer) + Send>;

/// How often a publisher with publishes waiting looks for the queue's
/// leader (when held) and for publishes waiting too long.
const LOOK_EVERY: Duration = Duration::from_millis(50);
/// How often an idle publisher checks that its queue still exists.
const IDLE_CHECK: Duration = Duration::from_secs(5);

/// One quorum queue's publisher on this node.
pub struct Publisher {
    this: Weak<Publisher>,
    vhost: String,
    name: String,
    manager: Weak<Manager>,
    inner: Mutex<Inner>,
    answers: mpsc::UnboundedSender<(u64, u64, Answer)>,
    /// The manager's count of publishes not answered yet.
    pending_count: Arc<AtomicUsize>,
    give_up: Duration,
}

struct Inner {
    /// Its id in the group's state (random: a restarted node is a new
    /// publisher, and so is one that gave up on its publishes).
    id: u64,
    next: u64,
    /// Bumped when sending stops: answers to earlier sends asking for a
    /// resend are stale then.
    epoch: u64,
    /// Sending stopped until the queue is served again.
    held: bool,
    pending: BTreeMap<u64, Pending>,
    /// Where the sends go (see [`Publisher::send`]).
    target: Option<Target>,
}

struct Pending {
    message: Arc<Message>,
    ticket: Arc<Ticket>,
    since: Instant,
}

/// Where the queue is served now.
enum Target {
    Local(Arc<Group>),
    Remote(Arc<crate::cluster::forward::Link>),
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("quorum::Publisher")
            .field("queue", &self.name)
            .finish_non_exhaustive()
    }
}

impl Publisher {
    /// A publisher for `vhost`/`name`, with its task.
    pub(super) fn start(manager: &Arc<Manager>, vhost: &str, name: &str) -> Arc<Publisher> {
        let (answers, rx) = mpsc::unbounded_channel();
        let p = Arc::new_cyclic(|this| Publisher {
            this: this.clone(),
            vhost: vhost.to_string(),
            name: name.to_string(),
            manager: Arc::downgrade(manager),
            inner: Mutex::new(Inner {
                id: new_id(),
                next: 1,
                epoch: 0,
                held: false,
                pending: BTreeMap::new(),
                target: None,
            }),
            answers,
            pending_count: Arc::clone(&manager.pending),
            give_up: manager.resend_within(),
        });
        tokio::spawn(run(Arc::downgrade(&p), rx));
        p
    }

    /// Publish `message`; `ticket` settles with the group's answer.
    pub fn publish(&self, message: &Arc<Message>, ticket: &Arc<Ticket>) {
        ticket.expect();
        self.pending_count.fetch_add(1, Ordering::Relaxed);
        let mut s = self.inner.lock();
        let seq = s.next;
        s.next += 1;
        s.pending.insert(
            seq,
            Pending {
                message: Arc::clone(message),
                ticket: Arc::clone(ticket),
                since: Instant::now(),
            },
        );
        if !s.held {
            // Sent under the lock: the sends leave in their numbers' order.
            self.send(&mut s, seq, message);
        }
    }

    /// Send number `seq` to wherever the queue is served: where the last
    /// sends went, until one is not taken (a target that no longer serves
    /// the queue answers so), then wherever it is served now.
    fn send(&self, s: &mut Inner, seq: u64, message: &Arc<Message>) {
        let (id, epoch) = (s.id, s.epoch);
        let tx = self.answers.clone();
        let this = self.this.clone();
        // Taken where it comes (the group's commit task, the link's reader)
        // when the publisher is free, else through its task: never waits
        // for the publisher's lock (a send that fails at once answers
        // under it). A resend always goes through the task: it stops the
        // sending, and the task (asleep until its idle check when it was
        // idle) must then look for the leader at once.
        let reply: Reply = Box::new(move |a| {
            if a != Answer::Resend {
                if let Some(p) = this.upgrade() {
                    if let Some(mut s) = p.inner.try_lock() {
                        return p.answered_locked(&mut s, seq, epoch, a);
                    }
                }
            }
            let _ = tx.send((seq, epoch, a));
        });
        if s.target.is_none() {
            s.target = self.target(s.epoch);
        }
        match &s.target {
            Some(Target::Local(g)) => g.propose(QMsg::of(message).sent_by(id, seq), reply, false),
            Some(Target::Remote(link)) => {
                link.publish_quorum(&self.vhost, &self.name, message, (id, seq), reply)
            }
            None => reply(Answer::Resend),
        }
    }

    /// This node's member when it serves the queue, else the link to the
    /// leader's node when it is up: the leader this node's member heard
    /// from (it knows a new one first), or the one the metadata records.
    /// When both are up and differ, rounds of sends (`epoch`) alternate
    /// between them: the member's view can be the stale one (it heard
    /// nothing from a leader the metadata already records).
    fn target(&self, epoch: u64) -> Option<Target> {
        let m = self.manager.upgrade()?;
        let q = m.queue(&self.vhost, &self.name)?;
        let member = Group::of(&q);
        if let Some(g) = member.as_ref().filter(|g| g.is_serving()) {
            // (not while it loads the queue: resent after)
            return g.takes_publishes().then(|| Target::Local(Arc::clone(g)));
        }
        let c = m.cluster.lock().upgrade()?;
        let heard = member
            .and_then(|g| g.leader_elsewhere(m.ident.id))
            .filter(|node| c.forward.is_up(node));
        let recorded = q
            .remote()
            .filter(|home| home.reachable())
            .map(|home| home.node().to_string());
        let node = match (heard, recorded) {
            (Some(h), Some(r)) if h != r && epoch % 2 == 1 => r,
            (Some(h), _) => h,
            (None, r) => r?,
        };
        Some(Target::Remote(c.forward.link(&node)))
    }

    /// Settle number `seq` with `ok`.
    fn settle(&self, s: &mut Inner, seq: u64, ok: bool) {
        if let Some(p) = s.pending.remove(&seq) {
            p.ticket.settle(ok);
            self.pending_count.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// Take an answer.
    fn answered(&self, seq: u64, epoch: u64, a: Answer) {
        self.answered_locked(&mut self.inner.lock(), seq, epoch, a);
    }

    fn answered_locked(&self, s: &mut Inner, seq: u64, epoch: u64, a: Answer) {
        match a {
            Answer::Taken => self.settle(s, seq, true),
            Answer::Refused => self.settle(s, seq, false),
            Answer::Resend => {
                if epoch == s.epoch && !s.held && s.pending.contains_key(&seq) {
                    s.held = true;
                    s.epoch += 1;
                    s.target = None;
                }
            }
        }
    }

    /// While held: nack what waited too long, and resend the rest, in
    /// order, once the queue is served. False once the queue is gone and
    /// nothing waits (the publisher can go).
    fn tick(&self) -> bool {
        let mut s = self.inner.lock();
        let now = Instant::now();
        // The oldest waited too long: all are nacked (their number may
        // never have committed, so the ones after it would be out of
        // sequence for good) and the publisher starts again as a new one.
        let oldest = s.pending.first_key_value().map(|(_, p)| p.since);
        if oldest.is_some_and(|t| now.duration_since(t) >= self.give_up) {
            tracing::warn!(queue = %self.name, vhost = %self.vhost, nacked = s.pending.len(), "quorum queue publishes not taken in time");
            nack_all(&mut s.pending, &self.pending_count);
            s.id = new_id();
            s.next = 1;
            s.epoch += 1;
            s.held = false;
            s.target = None;
        }
        let queue = self
            .manager
            .upgrade()
            .and_then(|m| m.queue(&self.vhost, &self.name));
        if queue.is_none() {
            nack_all(&mut s.pending, &self.pending_count);
            return false;
        }
        if s.held && s.target.is_none() {
            s.target = self.target(s.epoch);
        }
        if s.held && (s.pending.is_empty() || s.target.is_some()) {
            s.held = false;
            let resend: Vec<(u64, Arc<Message>)> = s
                .pending
                .iter()
                .map(|(seq, p)| (*seq, Arc::clone(&p.message)))
                .collect();
            for (seq, message) in &resend {
                self.send(&mut s, *seq, message);
            }
            if !s.pending.is_empty() {
                tracing::debug!(queue = %self.name, vhost = %self.vhost, resent = s.pending.len(), "quorum queue publishes resent");
            }
        }
        true
    }
}

/// A publisher's task: takes answers; while publishes wait, checks every
/// [`LOOK_EVERY`] for the leader and for publishes waiting too long; when
/// none wait, every [`IDLE_CHECK`] whether the queue is still there.
async fn run(p: Weak<Publisher>, mut answers: mpsc::UnboundedReceiver<(u64, u64, Answer)>) {
    let mut next = tokio::time::Instant::now() + LOOK_EVERY;
    loop {
        tokio::select! {
            a = answers.recv() => {
                let (Some((seq, epoch, a)), Some(p)) = (a, p.upgrade()) else { return };
                p.answered(seq, epoch, a);
                while let Ok((seq, epoch, a)) = answers.try_recv() {
                    p.answered(seq, epoch, a);
                }
            }
            () = tokio::time::sleep_until(next) => {
                let Some(p) = p.upgrade() else { return };
                if !p.tick() {
                    if let Some(m) = p.manager.upgrade() {
                        m.publisher_gone(&p);
                    }
                    return;
                }
                let busy = !p.inner.lock().pending.is_empty();
                next = tokio::time::Instant::now() + if busy { LOOK_EVERY } else { IDLE_CHECK };
            }
        }
        // Publishes came while idle: look again soon.
        if let Some(p) = p.upgrade() {
            let soon = tokio::time::Instant::now() + LOOK_EVERY;
            if next > soon && !p.inner.lock().pending.is_empty() {
                next = soon;
            }
        }
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        nack_all(&mut self.inner.get_mut().pending, &self.pending_count);
    }
}

/// Nack every publish waiting (and uncount it).
fn nack_all(pending: &mut BTreeMap<u64, Pending>, count: &AtomicUsize) {
    for (_, p) in std::mem::take(pending) {
        p.ticket.settle(false);
        count.fetch_sub(1, Ordering::Relaxed);
    }
}
