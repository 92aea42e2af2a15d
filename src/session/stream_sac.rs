//! Single active consumer groups of the Stream protocol: per (vhost,
//! stream, consumer name), the subscriptions in arrival order; the first is
//! active. Shared by all stream connections of a broker; a connection
//! learns that one of its subscriptions became active through the sender it
//! registered with (its driver hands that to the session).

use std::collections::HashMap;

use parking_lot::Mutex;
use tokio::sync::mpsc::UnboundedSender;

/// What a connection is told.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SacEvent {
    /// Subscription `subscription_id` is now the group's active consumer.
    Activate { subscription_id: u8 },
}

#[derive(Debug)]
struct Member {
    connection: u64,
    subscription_id: u8,
    tx: UnboundedSender<SacEvent>,
}

/// The groups: (vhost, stream, name) → members, active first.
#[derive(Debug, Default)]
pub struct SacRegistry {
    groups: Mutex<HashMap<(String, String, String), Vec<Member>>>,
}

/// A group's key.
pub type GroupKey = (String, String, String);

impl SacRegistry {
    /// Join a group; true when the member is its active consumer.
    pub fn join(
        &self,
        key: GroupKey,
        connection: u64,
        subscription_id: u8,
        tx: UnboundedSender<SacEvent>,
    ) -> bool {
        let mut g = self.groups.lock();
        let members = g.entry(key).or_default();
        members.push(Member {
            connection,
            subscription_id,
            tx,
        });
        members.len() == 1
    }

    /// Leave a group; if the member was active, the next one is told it is.
    pub fn leave(&self, key: &GroupKey, connection: u64, subscription_id: u8) {
        let mut g = self.groups.lock();
        let Some(members) = g.get_mut(key) else {
            return;
        };
        let Some(i) = members
            .iter()
            .position(|m| m.connection == connection && m.subscription_id == subscription_id)
        else {
            return;
        };
        members.remove(i);
        if i == 0 {
            // Promote the first member whose connection is still there.
            while let Some(next) = members.first() {
                let ev = SacEvent::Activate {
                    subscription_id: next.subscription_id,
                };
                if next.tx.send(ev).is_ok() {
                    break;
                }
                members.remove(0);
            }
        }
        if members.is_empty() {
            g.remove(key);
        }
    }

    /// Members of a group (for tests and the admin side).
    pub fn members(&self, key: &GroupKey) -> usize {
        self.groups.lock().get(key).map_or(0, Vec::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_is_active_and_the_next_is_promoted() {
        let r = SacRegistry::default();
        let key = ("/".to_string(), "s".to_string(), "app".to_string());
        let (tx1, _rx1) = tokio::sync::mpsc::unbounded_channel();
        let (tx2, mut rx2) = tokio::sync::mpsc::unbounded_channel();
        assert!(r.join(key.clone(), 1, 0, tx1));
        assert!(!r.join(key.clone(), 2, 5, tx2));
        assert_eq!(r.members(&key), 2);
        // An inactive member leaving changes nothing.
        r.leave(&key, 1, 0);
        assert_eq!(
            rx2.try_recv(),
            Ok(SacEvent::Activate { subscription_id: 5 })
        );
        r.leave(&key, 2, 5);
        assert_eq!(r.members(&key), 0);
    }
}
