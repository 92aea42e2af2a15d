//! What the broker deletes by itself, reported to whoever replicates it.
//!
//! A queue whose `x-expires` ran out, or an auto-delete queue whose last
//! consumer went, is deleted by the broker on its own initiative, with no
//! client to answer. In a cluster such a queue's record is replicated
//! (`crate::cluster`), so the deletion must reach the other nodes too. The
//! core does no I/O: it only records the event here ([`SelfDeletions`]), and
//! the cluster layer, when there is one, takes the events and proposes them to
//! the metadata group (again after a failure, until committed or moot:
//! `crate::cluster::gone`). Nothing is recorded until someone [`SelfDeletions::watch`]es:
//! a standalone broker keeps nothing and does nothing more than before.
//!
//! Exclusive queues are the node's own and are never reported. Exchanges are
//! not reported either: an auto-delete exchange goes when its last binding
//! goes, and in a cluster that follows from a replicated change (an unbind, a
//! queue's deletion) that every node applies alike.

use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// A queue that deleted itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SelfDeleted {
    pub vhost: String,
    pub name: String,
    /// Why: `"expired"` (`x-expires`) or `"auto-delete"` (last consumer gone).
    pub why: &'static str,
    /// The replicated declaration the queue was ([`crate::broker::queue::Queue::declared`]:
    /// set by the cluster layer, 0 when none).
    pub declared: u64,
}

/// The broker's queue of [`SelfDeleted`] events, shared by its vhosts.
#[derive(Debug, Default)]
pub struct SelfDeletions {
    /// Someone takes the events (the node is clustered).
    on: AtomicBool,
    pending: Mutex<Vec<SelfDeleted>>,
    wake: tokio::sync::Notify,
}

impl SelfDeletions {
    /// Start recording events (the cluster layer, once, before it waits).
    pub fn watch(&self) {
        self.on.store(true, Ordering::Release);
    }

    /// Whether events are recorded.
    pub fn watched(&self) -> bool {
        self.on.load(Ordering::Acquire)
    }

    /// Record one (nothing when nobody watches).
    pub fn report(&self, event: SelfDeleted) {
        if !self.watched() {
            return;
        }
        self.pending.lock().push(event);
        self.wake.notify_one();
    }

    /// The events recorded so far, oldest first; the queue is left empty.
    pub fn take(&self) -> Vec<SelfDeleted> {
        std::mem::take(&mut *self.pending.lock())
    }

    /// Wait until an event was recorded since the last wait (one that came
    /// before this call counts: the wake-up is kept).
    pub async fn wait(&self) {
        self.wake.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(name: &str) -> SelfDeleted {
        SelfDeleted {
            vhost: "/".into(),
            name: name.into(),
            why: "expired",
            declared: 7,
        }
    }

    #[test]
    fn nothing_is_kept_until_someone_watches() {
        let d = SelfDeletions::default();
        d.report(ev("a"));
        assert!(d.take().is_empty());
        d.watch();
        d.report(ev("b"));
        d.report(ev("c"));
        assert_eq!(d.take(), vec![ev("b"), ev("c")]);
        assert!(d.take().is_empty());
    }

    #[tokio::test]
    async fn a_report_before_the_wait_wakes_it() {
        let d = SelfDeletions::default();
        d.watch();
        d.report(ev("a"));
        tokio::time::timeout(std::time::Duration::from_secs(1), d.wait())
            .await
            .expect("woken by the earlier report");
        assert_eq!(d.take(), vec![ev("a")]);
    }
}
