//! Single active consumer groups of the Stream protocol, as RabbitMQ's
//! `rabbit_stream_sac_coordinator`: per (vhost, stream, consumer name), the
//! subscriptions in arrival order, at most one of them active.
//!
//! [`Groups`] is the pure part (events in, [`Notify`]s out, no I/O, no
//! locks): a plain stream's group keeps its first member active and promotes
//! the next when it goes; a super stream partition's group (subscriptions
//! with `super-stream`) makes member `partition index % members` active, so a
//! group's consumers spread over the partitions, and rebalances on every join
//! and leave: the active member that must give way is told to step down
//! first, and the new one is activated only once the client has answered
//! that step-down (or the stepping-down member is gone).
//!
//! [`SacRegistry`] shares the groups between the stream connections of a
//! broker and hands each [`Notify`] to its connection as a [`SacEvent`]
//! through the sender the connection registered with.

use std::collections::HashMap;

use parking_lot::Mutex;
use tokio::sync::mpsc::UnboundedSender;

/// What a connection is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SacEvent {
    /// Subscription `subscription_id` is now the group's active consumer.
    Activate { subscription_id: u8 },
    /// Subscription `subscription_id` must stop consuming: the connection
    /// tells its client (consumer update, inactive) and reports the answer
    /// with [`SacRegistry::stepped_down`].
    StepDown { subscription_id: u8 },
}

/// A group's key: (vhost, stream, consumer name).
pub type GroupKey = (String, String, String);

/// A change of one member's state, for its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Notify {
    pub connection: u64,
    pub subscription_id: u8,
    /// true: activate; false: step down.
    pub active: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Inactive,
    Active,
    /// Told to step down, its client's answer not in yet.
    SteppingDown,
}

#[derive(Debug)]
struct Member {
    connection: u64,
    subscription_id: u8,
    state: State,
}

#[derive(Debug)]
struct Group {
    /// The stream's index among its super stream's partitions; None for a
    /// plain stream (the first member is active).
    partition_index: Option<usize>,
    members: Vec<Member>,
}

impl Group {
    /// The member that should be active.
    fn chosen(&self) -> usize {
        match self.partition_index {
            Some(i) if !self.members.is_empty() => i % self.members.len(),
            _ => 0,
        }
    }

    fn find(&self, state: State) -> Option<usize> {
        self.members.iter().position(|m| m.state == state)
    }

    fn notify(&self, i: usize, active: bool) -> Notify {
        Notify {
            connection: self.members[i].connection,
            subscription_id: self.members[i].subscription_id,
            active,
        }
    }

    /// After a join or a leave: step the active member down if another
    /// should be active (super streams), or activate the chosen one if
    /// nobody is active and nobody is stepping down.
    fn rebalance(&mut self, out: &mut Vec<Notify>) {
        if self.members.is_empty() {
            return;
        }
        match self.find(State::Active) {
            Some(active) if self.partition_index.is_some() && active != self.chosen() => {
                self.members[active].state = State::SteppingDown;
                out.push(self.notify(active, false));
            }
            Some(_) => {}
            None if self.find(State::SteppingDown).is_none() => {
                let c = self.chosen();
                self.members[c].state = State::Active;
                out.push(self.notify(c, true));
            }
            None => {}
        }
    }
}

/// Every group of a broker (pure: the registry locks and dispatches).
#[derive(Debug, Default)]
pub struct Groups {
    groups: HashMap<GroupKey, Group>,
}

impl Groups {
    /// A subscription joins `key` (`partition_index` for a super stream's
    /// partition). True when it is active at once (the group was empty); the
    /// notifications are for the others.
    pub fn join(
        &mut self,
        key: GroupKey,
        connection: u64,
        subscription_id: u8,
        partition_index: Option<usize>,
        out: &mut Vec<Notify>,
    ) -> bool {
        let g = self.groups.entry(key).or_insert_with(|| Group {
            partition_index,
            members: Vec::new(),
        });
        let first = g.members.is_empty();
        g.members.push(Member {
            connection,
            subscription_id,
            state: if first {
                State::Active
            } else {
                State::Inactive
            },
        });
        if !first {
            g.rebalance(out);
        }
        first
    }

    /// A subscription leaves (unsubscribed, its connection closed, its stream
    /// deleted).
    pub fn leave(&mut self, key: &GroupKey, connection: u64, subscription_id: u8) -> Vec<Notify> {
        let mut out = Vec::new();
        let Some(g) = self.groups.get_mut(key) else {
            return out;
        };
        let Some(i) = g
            .members
            .iter()
            .position(|m| m.connection == connection && m.subscription_id == subscription_id)
        else {
            return out;
        };
        g.members.remove(i);
        if g.members.is_empty() {
            self.groups.remove(key);
        } else {
            g.rebalance(&mut out);
        }
        out
    }

    /// The client answered a step-down: the member is inactive, and the
    /// chosen one is activated.
    pub fn stepped_down(
        &mut self,
        key: &GroupKey,
        connection: u64,
        subscription_id: u8,
    ) -> Vec<Notify> {
        let mut out = Vec::new();
        let Some(g) = self.groups.get_mut(key) else {
            return out;
        };
        let Some(m) = g.members.iter_mut().find(|m| {
            m.connection == connection
                && m.subscription_id == subscription_id
                && m.state == State::SteppingDown
        }) else {
            return out;
        };
        m.state = State::Inactive;
        g.rebalance(&mut out);
        out
    }

    /// (connection, subscription id, active) of a group's members in
    /// arrival order (stepping down counts as not active).
    pub fn members(&self, key: &GroupKey) -> Vec<(u64, u8, bool)> {
        self.groups.get(key).map_or_else(Vec::new, |g| {
            g.members
                .iter()
                .map(|m| (m.connection, m.subscription_id, m.state == State::Active))
                .collect()
        })
    }
}

#[derive(Debug, Default)]
struct Inner {
    groups: Groups,
    /// Each connection's sender, with how many memberships use it.
    senders: HashMap<u64, (UnboundedSender<SacEvent>, usize)>,
}

impl Inner {
    /// Hand notifications to their connections; a connection that is gone
    /// leaves its group (which may notify others in turn).
    fn dispatch(&mut self, key: &GroupKey, mut todo: Vec<Notify>) {
        while let Some(n) = todo.pop() {
            let ev = if n.active {
                SacEvent::Activate {
                    subscription_id: n.subscription_id,
                }
            } else {
                SacEvent::StepDown {
                    subscription_id: n.subscription_id,
                }
            };
            let sent = self
                .senders
                .get(&n.connection)
                .is_some_and(|(tx, _)| tx.send(ev).is_ok());
            if !sent {
                let more = self.groups.leave(key, n.connection, n.subscription_id);
                self.release(n.connection);
                todo.extend(more);
            }
        }
    }

    fn release(&mut self, connection: u64) {
        if let Some((_, n)) = self.senders.get_mut(&connection) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.senders.remove(&connection);
            }
        }
    }
}

/// The groups of a broker, shared by its stream connections.
#[derive(Debug, Default)]
pub struct SacRegistry {
    inner: Mutex<Inner>,
}

impl SacRegistry {
    /// Join a group; true when the member is its active consumer at once.
    /// Members whose state changes are told through their senders.
    pub fn join(
        &self,
        key: GroupKey,
        connection: u64,
        subscription_id: u8,
        partition_index: Option<usize>,
        tx: UnboundedSender<SacEvent>,
    ) -> bool {
        let mut g = self.inner.lock();
        g.senders.entry(connection).or_insert((tx, 0)).1 += 1;
        let mut out = Vec::new();
        let active = g.groups.join(
            key.clone(),
            connection,
            subscription_id,
            partition_index,
            &mut out,
        );
        g.dispatch(&key, out);
        active
    }

    /// Leave a group; the members whose state changes are told.
    pub fn leave(&self, key: &GroupKey, connection: u64, subscription_id: u8) {
        let mut g = self.inner.lock();
        let out = g.groups.leave(key, connection, subscription_id);
        g.release(connection);
        g.dispatch(key, out);
    }

    /// The client answered the step-down of `subscription_id`.
    pub fn stepped_down(&self, key: &GroupKey, connection: u64, subscription_id: u8) {
        let mut g = self.inner.lock();
        let out = g.groups.stepped_down(key, connection, subscription_id);
        g.dispatch(key, out);
    }

    /// Members of a group (for tests and the admin side).
    pub fn members(&self, key: &GroupKey) -> usize {
        self.inner.lock().groups.members(key).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(stream: &str) -> GroupKey {
        ("/".to_string(), stream.to_string(), "app".to_string())
    }

    fn n(connection: u64, subscription_id: u8, active: bool) -> Notify {
        Notify {
            connection,
            subscription_id,
            active,
        }
    }

    #[test]
    fn plain_stream_first_is_active_and_the_next_is_promoted() {
        let mut g = Groups::default();
        let k = key("s");
        let mut out = Vec::new();
        assert!(g.join(k.clone(), 1, 0, None, &mut out));
        assert!(!g.join(k.clone(), 2, 5, None, &mut out));
        assert!(!g.join(k.clone(), 3, 1, None, &mut out));
        assert!(
            out.is_empty(),
            "newcomers of a plain stream are just passive"
        );
        // An inactive member leaving changes nothing.
        assert!(g.leave(&k, 3, 1).is_empty());
        // The active one leaving promotes the next at once.
        assert_eq!(g.leave(&k, 1, 0), vec![n(2, 5, true)]);
        assert_eq!(g.members(&k), vec![(2, 5, true)]);
        assert!(g.leave(&k, 2, 5).is_empty());
        assert!(g.members(&k).is_empty());
        // Unknown members and groups are ignored.
        assert!(g.leave(&k, 9, 9).is_empty());
        assert!(g.stepped_down(&k, 9, 9).is_empty());
    }

    /// Three partitions, consumers joining one by one as a super stream
    /// consumer does (each joins every partition's group).
    #[test]
    fn super_stream_groups_spread_and_rebalance_on_join_and_leave() {
        let mut g = Groups::default();
        let parts = [key("s-0"), key("s-1"), key("s-2")];
        let join = |g: &mut Groups, c: u64| -> Vec<Notify> {
            let mut out = Vec::new();
            for (i, k) in parts.iter().enumerate() {
                g.join(k.clone(), c, i as u8, Some(i), &mut out);
            }
            out
        };
        let active = |g: &Groups, k: &GroupKey| -> Vec<u64> {
            g.members(k)
                .into_iter()
                .filter(|m| m.2)
                .map(|m| m.0)
                .collect()
        };
        // Consumer 1 alone: active on every partition, nobody told (the
        // joiner learns it from the join).
        assert!(join(&mut g, 1).is_empty());
        // Consumer 2: partition 1 goes to it (1 % 2): consumer 1 steps down
        // there first, and nothing is active there until it answers.
        assert_eq!(join(&mut g, 2), vec![n(1, 1, false)]);
        assert_eq!(active(&g, &parts[1]), Vec::<u64>::new());
        assert_eq!(g.stepped_down(&parts[1], 1, 1), vec![n(2, 1, true)]);
        assert_eq!(active(&g, &parts[0]), vec![1]);
        assert_eq!(active(&g, &parts[1]), vec![2]);
        assert_eq!(active(&g, &parts[2]), vec![1]);
        // Consumer 3: partition 2 goes to it (2 % 3); 0 and 1 stay.
        assert_eq!(join(&mut g, 3), vec![n(1, 2, false)]);
        // A second answer, or one for a member not stepping down, is ignored.
        assert!(g.stepped_down(&parts[0], 1, 0).is_empty());
        assert_eq!(g.stepped_down(&parts[2], 1, 2), vec![n(3, 2, true)]);
        assert!(g.stepped_down(&parts[2], 1, 2).is_empty());
        for (i, k) in parts.iter().enumerate() {
            assert_eq!(active(&g, k), vec![i as u64 + 1]);
        }
        // Consumer 1 leaves: [2, 3] remain; partition 0 (0 % 2) goes to 2 at
        // once (its active member is gone), partition 1 (1 % 2) moves from 2
        // to 3 with a step-down first, partition 2 (2 % 2) moves from 3 to 2.
        assert_eq!(g.leave(&parts[0], 1, 0), vec![n(2, 0, true)]);
        assert_eq!(g.leave(&parts[1], 1, 1), vec![n(2, 1, false)]);
        assert_eq!(g.leave(&parts[2], 1, 2), vec![n(3, 2, false)]);
        // The stepping-down member goes away instead of answering: the
        // chosen one is activated anyway.
        assert_eq!(g.leave(&parts[1], 2, 1), vec![n(3, 1, true)]);
        assert_eq!(g.stepped_down(&parts[2], 3, 2), vec![n(2, 2, true)]);
        assert_eq!(active(&g, &parts[0]), vec![2]);
        assert_eq!(active(&g, &parts[1]), vec![3]);
        assert_eq!(active(&g, &parts[2]), vec![2]);
    }

    #[test]
    fn a_join_while_stepping_down_waits_for_the_answer() {
        let mut g = Groups::default();
        let k = key("s-1");
        let mut out = Vec::new();
        g.join(k.clone(), 1, 0, Some(1), &mut out);
        g.join(k.clone(), 2, 0, Some(1), &mut out);
        assert_eq!(out, vec![n(1, 0, false)]);
        out.clear();
        // A third joins before the answer: 1 % 3 is still member 2.
        g.join(k.clone(), 3, 0, Some(1), &mut out);
        assert!(out.is_empty());
        assert_eq!(g.stepped_down(&k, 1, 0), vec![n(2, 0, true)]);
    }

    #[test]
    fn registry_tells_connections_and_drops_the_gone() {
        let r = SacRegistry::default();
        let k = key("s-1");
        let (tx1, mut rx1) = tokio::sync::mpsc::unbounded_channel();
        let (tx2, rx2) = tokio::sync::mpsc::unbounded_channel();
        let (tx3, mut rx3) = tokio::sync::mpsc::unbounded_channel();
        assert!(r.join(k.clone(), 1, 4, Some(1), tx1));
        assert!(!r.join(k.clone(), 2, 5, Some(1), tx2));
        assert_eq!(
            rx1.try_recv(),
            Ok(SacEvent::StepDown { subscription_id: 4 })
        );
        // Connection 2 is gone before it is activated: it leaves, and with
        // two members left (1 % 2 = member 3) the third gets it.
        drop(rx2);
        assert!(!r.join(k.clone(), 3, 6, Some(1), tx3));
        r.stepped_down(&k, 1, 4);
        assert_eq!(
            rx3.try_recv(),
            Ok(SacEvent::Activate { subscription_id: 6 })
        );
        assert_eq!(r.members(&k), 2);
        r.leave(&k, 1, 4);
        r.leave(&k, 3, 6);
        assert_eq!(r.members(&k), 0);
        assert!(r.inner.lock().senders.is_empty());
    }
}
