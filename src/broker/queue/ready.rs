//! The ready list of a queue: messages waiting for a consumer, one FIFO per priority level.
//!
//! Owns ordering only: FIFO within a priority, higher priorities first, and requeued
//! messages going back to their original position (by sequence number). Counting bytes
//! is here too, for length limits. Expiry and dead-lettering live one layer up.

use crate::broker::message::{Entry, MemoryBudget, Message};
use std::collections::VecDeque;
use std::sync::Arc;

#[derive(Debug)]
pub struct Ready {
    /// `levels[p]` holds messages of priority `p`; a plain queue has one level.
    levels: Vec<VecDeque<Entry>>,
    len: usize,
    bytes: usize,
    /// Broker-wide count of resident body bytes, kept up to date here.
    budget: Arc<MemoryBudget>,
}

impl Ready {
    /// `max_priority` 0 is a plain FIFO queue.
    pub fn new(max_priority: u8, budget: Arc<MemoryBudget>) -> Ready {
        Ready {
            levels: (0..=max_priority).map(|_| VecDeque::new()).collect(),
            len: 0,
            bytes: 0,
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

    fn level_of(&self, entry: &Entry) -> usize {
        let top = self.levels.len() - 1;
        if top == 0 {
            return 0;
        }
        usize::from(entry.priority).min(top)
    }

    /// Append a newly published message.
    pub fn push_back(&mut self, entry: Entry) {
        let level = self.level_of(&entry);
        self.bytes += entry.size();
        self.budget.add(entry.resident_size());
        self.len += 1;
        self.levels[level].push_back(entry);
    }

    /// Put a message back at its original position (by sequence number).
    pub fn requeue(&mut self, entry: Entry) {
        let level = self.level_of(&entry);
        self.bytes += entry.size();
        self.budget.add(entry.resident_size());
        self.len += 1;
        let fifo = &mut self.levels[level];
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
    pub fn peek(&self) -> Option<&Entry> {
        self.levels.iter().rev().find_map(|l| l.front())
    }

    /// Remove and return the next message to deliver.
    pub fn pop(&mut self) -> Option<Entry> {
        let entry = self.levels.iter_mut().rev().find_map(|l| l.pop_front())?;
        self.len -= 1;
        self.bytes -= entry.size();
        self.budget.sub(entry.resident_size());
        Some(entry)
    }

    /// Where entry `seq` is: (level, index). Each level is sorted by seq.
    fn find(&self, seq: u64) -> Option<(usize, usize)> {
        self.levels.iter().enumerate().find_map(|(level, fifo)| {
            let i = fifo.partition_point(|e| e.seq < seq);
            (fifo.get(i).is_some_and(|e| e.seq == seq)).then_some((level, i))
        })
    }

    /// Give a paged-out entry its message back (loaded from the store).
    /// False if `seq` is not a paged-out entry here (any more).
    pub fn page_in(&mut self, seq: u64, message: Arc<Message>) -> bool {
        let Some((level, i)) = self.find(seq) else {
            return false;
        };
        let e = &mut self.levels[level][i];
        if e.paged.is_none() {
            return false;
        }
        e.message = message;
        e.paged = None;
        self.budget.add(e.resident_size());
        true
    }

    /// Remove entry `seq` wherever it is.
    pub fn remove(&mut self, seq: u64) -> Option<Entry> {
        let (level, i) = self.find(seq)?;
        let entry = self.levels[level].remove(i)?;
        self.len -= 1;
        self.bytes -= entry.size();
        self.budget.sub(entry.resident_size());
        Some(entry)
    }

    /// Remove everything.
    pub fn drain(&mut self) -> Vec<Entry> {
        self.len = 0;
        self.bytes = 0;
        let all: Vec<Entry> = self.levels.iter_mut().flat_map(|l| l.drain(..)).collect();
        self.budget.sub(all.iter().map(Entry::resident_size).sum());
        all
    }

    /// Iterate in delivery order.
    pub fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.levels.iter().rev().flat_map(|l| l.iter())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::BasicProperties;
    use bytes::Bytes;

    fn entry(seq: u64, priority: Option<u8>) -> Entry {
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
