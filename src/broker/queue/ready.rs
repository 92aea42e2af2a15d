//! The ready list of a queue: messages waiting for a consumer, one FIFO per priority level.
//!
//! Owns ordering only: FIFO within a priority, higher priorities first, and requeued
//! messages going back to their original position (by sequence number). Counting
//! messages and bytes is here too, for length limits. Expiry and dead-lettering live
//! one layer up.
//!
//! Each level is a *window* of entries held in memory followed by a *tail* of messages
//! that are only in the message store (positions `tail.from..` of the level), counted
//! but costing no memory per message. New messages join the tail once it is non-empty
//! (order), and the window is refilled from the tail's front as consumers reach it
//! ([`Ready::install`]). Every window entry is older than every tail message.
//!
//! Persistent messages (held durably in the store: [`Entry::persisted`], and a
//! tail's messages inserted durably) are counted beside the totals, for the
//! admin API's `messages_persistent` / `message_bytes_persistent`.

use crate::broker::message::{Entry, MemoryBudget};
use std::collections::VecDeque;
use std::sync::Arc;

#[derive(Debug)]
pub struct Ready {
    levels: Vec<Level>,
    /// Messages in windows and tails.
    len: usize,
    /// Their body bytes.
    bytes: usize,
    /// Of them, persistent ones (see the module doc), and their body bytes.
    persistent: usize,
    persistent_bytes: usize,
    /// Broker-wide count of resident body bytes, kept up to date here.
    budget: Arc<MemoryBudget>,
}

#[derive(Debug, Default)]
struct Level {
    window: VecDeque<Entry>,
    tail: Tail,
    /// The next store position of this level.
    next_pos: u64,
}

/// The messages of a level that are only in the store.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tail {
    pub count: usize,
    pub bytes: usize,
    /// Of them, stored durably (persistent), and their bytes.
    pub persistent: usize,
    pub persistent_bytes: usize,
    /// Store position to read from.
    pub from: u64,
    /// One past the last position in the tail (the tail's messages are in
    /// `from..to`, not necessarily at every position).
    pub to: u64,
    /// Some of them may carry an expiry.
    pub may_expire: bool,
}

/// What is next to deliver.
#[derive(Debug)]
pub enum Head<'a> {
    Entry(&'a Entry),
    /// The next message is in the tail of this level: load it first.
    Paged(u8),
    Empty,
}

/// The level of a message of `priority` in a queue with `max_priority` (0: plain).
pub fn level_for(priority: u8, max_priority: u8) -> u8 {
    priority.min(max_priority)
}

impl Ready {
    /// `max_priority` 0 is a plain FIFO queue.
    pub fn new(max_priority: u8, budget: Arc<MemoryBudget>) -> Ready {
        Ready {
            levels: (0..=max_priority).map(|_| Level::default()).collect(),
            len: 0,
            bytes: 0,
            persistent: 0,
            persistent_bytes: 0,
            budget,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Total body bytes of the ready messages.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Persistent ready messages (in windows and tails) and their body bytes.
    pub fn persistent(&self) -> (usize, usize) {
        (self.persistent, self.persistent_bytes)
    }

    fn count_persistent(&mut self, e: &Entry) {
        if e.persisted {
            self.persistent += 1;
            self.persistent_bytes += e.size();
        }
    }

    fn uncount_persistent(&mut self, e: &Entry) {
        if e.persisted {
            self.persistent = self.persistent.saturating_sub(1);
            self.persistent_bytes = self.persistent_bytes.saturating_sub(e.size());
        }
    }

    fn level(&self, level: u8) -> &Level {
        &self.levels[usize::from(level).min(self.levels.len() - 1)]
    }

    fn level_mut(&mut self, level: u8) -> &mut Level {
        let top = self.levels.len() - 1;
        &mut self.levels[usize::from(level).min(top)]
    }

    fn level_of(&self, entry: &Entry) -> u8 {
        level_for(entry.priority, (self.levels.len() - 1) as u8)
    }

    /// Ready messages held in memory (in windows), and their body bytes.
    pub fn in_memory(&self) -> (usize, usize) {
        let (n, b) = self
            .levels
            .iter()
            .fold((0, 0), |(n, b), l| (n + l.tail.count, b + l.tail.bytes));
        (self.len - n, self.bytes - b)
    }

    /// Entries held in memory at `level`.
    pub fn window_len(&self, level: u8) -> usize {
        self.level(level).window.len()
    }

    pub fn tail(&self, level: u8) -> Tail {
        self.level(level).tail
    }

    /// A new store position at `level`.
    pub fn alloc_pos(&mut self, level: u8) -> u64 {
        let l = self.level_mut(level);
        let pos = l.next_pos;
        l.next_pos += 1;
        pos
    }

    /// Append a newly published message to the window of its level (whose tail
    /// must be empty).
    pub fn push_back(&mut self, entry: Entry) {
        let level = self.level_of(&entry);
        self.bytes += entry.size();
        self.count_persistent(&entry);
        self.budget.add(entry.resident_size());
        self.len += 1;
        self.level_mut(level).window.push_back(entry);
    }

    /// Count a newly published message stored at `pos` of `level` into its tail;
    /// `durable`: stored durably (a persistent message).
    pub fn push_tail(&mut self, level: u8, pos: u64, size: usize, expires: bool, durable: bool) {
        self.len += 1;
        self.bytes += size;
        if durable {
            self.persistent += 1;
            self.persistent_bytes += size;
        }
        let l = self.level_mut(level);
        l.next_pos = l.next_pos.max(pos + 1);
        let tail = &mut l.tail;
        if tail.count == 0 {
            tail.from = pos;
            tail.may_expire = false;
        }
        tail.to = pos + 1;
        tail.count += 1;
        tail.bytes += size;
        tail.may_expire |= expires;
        if durable {
            tail.persistent += 1;
            tail.persistent_bytes += size;
        }
    }

    /// Recovery: `level` has `count` stored messages (`bytes`) from position `from`,
    /// and goes on at `next`. They are durable (persistent): only those survive.
    pub fn restore_tail(&mut self, level: u8, from: u64, next: u64, count: usize, bytes: usize) {
        self.len += count;
        self.bytes += bytes;
        self.persistent += count;
        self.persistent_bytes += bytes;
        let l = self.level_mut(level);
        l.next_pos = l.next_pos.max(next);
        l.tail = Tail {
            count: l.tail.count + count,
            bytes: l.tail.bytes + bytes,
            persistent: l.tail.persistent + count,
            persistent_bytes: l.tail.persistent_bytes + bytes,
            from: if l.tail.count == 0 { from } else { l.tail.from },
            to: next.max(l.tail.to),
            may_expire: true,
        };
    }

    /// Entries loaded from the front of `level`'s tail (read from position `from`,
    /// `next` is where the read stopped). False (nothing changed) if the tail moved
    /// on meanwhile. `entries` must be in order and newer than the window's.
    pub fn install(&mut self, level: u8, from: u64, next: u64, entries: Vec<Entry>) -> bool {
        let budget = Arc::clone(&self.budget);
        let l = self.level_mut(level);
        if l.tail.count == 0 || l.tail.from != from {
            return false;
        }
        let (n, bytes) = (
            entries.len(),
            entries.iter().map(Entry::size).sum::<usize>(),
        );
        let (durable, durable_bytes) = entries
            .iter()
            .filter(|e| e.persisted)
            .fold((0, 0), |(n, b), e| (n + 1, b + e.size()));
        let lost = n == 0;
        for e in entries {
            budget.add(e.resident_size());
            l.window.push_back(e);
        }
        let (count, tail_bytes, tail_durable, tail_durable_bytes) = if lost || n >= l.tail.count {
            // The store has no more of this tail (a bug, or a lost store): forget it.
            (
                l.tail.count,
                l.tail.bytes,
                l.tail.persistent,
                l.tail.persistent_bytes,
            )
        } else {
            (
                n,
                bytes.min(l.tail.bytes),
                durable.min(l.tail.persistent),
                durable_bytes.min(l.tail.persistent_bytes),
            )
        };
        if lost {
            tracing::error!(
                level,
                from,
                missing = l.tail.count,
                "messages counted in the store are missing from it; dropped"
            );
        }
        l.tail.count -= count;
        l.tail.bytes -= tail_bytes;
        l.tail.persistent -= tail_durable;
        l.tail.persistent_bytes -= tail_durable_bytes;
        l.tail.from = next;
        self.len = self.len - count + n;
        self.bytes = self.bytes - tail_bytes + bytes;
        self.persistent = (self.persistent + durable).saturating_sub(tail_durable);
        self.persistent_bytes =
            (self.persistent_bytes + durable_bytes).saturating_sub(tail_durable_bytes);
        true
    }

    /// Put a message back at its original position (by sequence number).
    pub fn requeue(&mut self, entry: Entry) {
        let level = self.level_of(&entry);
        self.bytes += entry.size();
        self.count_persistent(&entry);
        self.budget.add(entry.resident_size());
        self.len += 1;
        let fifo = &mut self.level_mut(level).window;
        match fifo.front() {
            None => fifo.push_back(entry),
            Some(front) if entry.seq < front.seq => fifo.push_front(entry),
            Some(_) => {
                let pos = fifo.partition_point(|e| e.seq < entry.seq);
                fifo.insert(pos, entry);
            }
        }
    }

    /// The next message to deliver, without removing it.
    pub fn peek(&self) -> Head<'_> {
        for (i, l) in self.levels.iter().enumerate().rev() {
            if let Some(e) = l.window.front() {
                return Head::Entry(e);
            }
            if l.tail.count > 0 {
                return Head::Paged(i as u8);
            }
        }
        Head::Empty
    }

    /// Remove and return the next message to deliver; `None` if there is none or
    /// it must be loaded first ([`Head::Paged`]).
    pub fn pop(&mut self) -> Option<Entry> {
        let level = match self.peek() {
            Head::Entry(e) => self.level_of(e),
            _ => return None,
        };
        let entry = self.level_mut(level).window.pop_front()?;
        self.len -= 1;
        self.bytes -= entry.size();
        self.uncount_persistent(&entry);
        self.budget.sub(entry.resident_size());
        Some(entry)
    }

    /// Remove everything: the window entries, and for each level with a tail the
    /// position its tail starts at (everything from there on is to be dropped).
    pub fn drain(&mut self) -> (Vec<Entry>, Vec<(u8, u64)>) {
        self.len = 0;
        self.bytes = 0;
        self.persistent = 0;
        self.persistent_bytes = 0;
        let mut tails = Vec::new();
        let mut all = Vec::new();
        for (i, l) in self.levels.iter_mut().enumerate() {
            all.extend(l.window.drain(..));
            if l.tail.count > 0 {
                tails.push((i as u8, l.tail.from));
            }
            l.tail = Tail::default();
        }
        self.budget.sub(all.iter().map(Entry::resident_size).sum());
        (all, tails)
    }

    /// Iterate the entries in memory in delivery order.
    pub fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.levels.iter().rev().flat_map(|l| l.window.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::BasicProperties;
    use bytes::Bytes;

    fn entry(seq: u64, priority: Option<u8>) -> Entry {
        use crate::broker::message::Message;
        let props = BasicProperties {
            priority,
            ..Default::default()
        };
        Entry::new(
            seq,
            Message::new("", "k", props, Bytes::from_static(b"abc")),
            None,
        )
    }

    #[test]
    fn fifo_and_requeue_order() {
        let mut r = Ready::new(0, MemoryBudget::unlimited());
        for s in 1..=5 {
            r.push_back(entry(s, None));
        }
        let a = r.pop().map(|e| e.seq);
        let b = r.pop().map(|e| e.seq);
        let c = r.pop().map(|e| e.seq);
        assert_eq!((a, b, c), (Some(1), Some(2), Some(3)));
        r.requeue(entry(3, None));
        r.requeue(entry(1, None));
        r.requeue(entry(2, None));
        let order: Vec<u64> = r.iter().map(|e| e.seq).collect();
        assert_eq!(order, vec![1, 2, 3, 4, 5]);
        assert_eq!(r.len(), 5);
        assert_eq!(r.bytes(), 15);
    }

    #[test]
    fn priorities_deliver_highest_first_fifo_within() {
        let mut r = Ready::new(5, MemoryBudget::unlimited());
        r.push_back(entry(1, None));
        r.push_back(entry(2, Some(9)));
        r.push_back(entry(3, Some(2)));
        r.push_back(entry(4, Some(5)));
        let order: Vec<u64> = std::iter::from_fn(|| r.pop().map(|e| e.seq)).collect();
        assert_eq!(order, vec![2, 4, 3, 1]);
    }
}

#[cfg(test)]
mod tail_tests {
    use super::*;
    use crate::broker::message::Message;
    use crate::wire::BasicProperties;
    use bytes::Bytes;

    fn entry(seq: u64) -> Entry {
        Entry::new(
            seq,
            Message::new(
                "",
                "k",
                BasicProperties::default(),
                Bytes::from_static(b"abcd"),
            ),
            None,
        )
    }

    #[test]
    fn tail_counts_and_install_in_order() {
        let budget = MemoryBudget::unlimited();
        let mut r = Ready::new(0, Arc::clone(&budget));
        r.push_back(entry(1));
        for _ in 0..3 {
            let pos = r.alloc_pos(0);
            r.push_tail(0, pos, 4, false, false);
        }
        assert_eq!((r.len(), r.bytes(), budget.used()), (4, 16, 4));
        assert_eq!(r.tail(0).from, 0);
        assert!(matches!(r.peek(), Head::Entry(e) if e.seq == 1));
        assert_eq!(r.pop().map(|e| e.seq), Some(1));
        assert!(matches!(r.peek(), Head::Paged(0)));
        assert!(r.pop().is_none(), "a paged head is not popped");
        // A stale load (read from elsewhere) changes nothing.
        assert!(!r.install(0, 7, 8, vec![entry(9)]));
        assert!(r.install(0, 0, 2, vec![entry(2), entry(3)]));
        assert_eq!((r.len(), r.tail(0).count, r.tail(0).from), (3, 1, 2));
        assert_eq!(budget.used(), 8);
        let (drained, tails) = r.drain();
        assert_eq!(drained.len(), 2);
        assert_eq!(tails, vec![(0, 2)]);
        assert_eq!((r.len(), r.bytes(), budget.used()), (0, 0, 0));
        assert!(matches!(r.peek(), Head::Empty));
    }

    #[test]
    fn a_load_that_finds_nothing_drops_the_tail() {
        let mut r = Ready::new(0, MemoryBudget::unlimited());
        r.push_tail(0, 0, 4, false, false);
        assert!(r.install(0, 0, 0, Vec::new()));
        assert_eq!((r.len(), r.bytes()), (0, 0));
        assert!(matches!(r.peek(), Head::Empty));
    }
}
