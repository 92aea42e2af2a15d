//! Exchange routing: the contract every exchange type implements, and what they share.
//!
//! Owns [`Destination`], [`ExchangeKind`], [`Binding`], the [`Router`] trait,
//! [`new_router`], [`validate_binding`] and [`ExchangeStats`] (an exchange's
//! message counters). Each exchange type lives in its own
//! file behind [`Router`]: `direct`, `fanout`, `topic`, `headers`.
//!
//! Shared here: `BindingIndex`, which holds every binding of one exchange grouped
//! by destination (identity, listing, per-destination removal), and `Collector`,
//! which dedupes destinations pushed by one `route` call.
//!
//! Binding identity follows RabbitMQ: (destination, routing key, arguments), where
//! the arguments are first stably sorted by name (`rabbit_misc:sort_field_table`),
//! so the same arguments in a different order are the same binding. Stored and
//! listed bindings carry the sorted arguments.
//!
//! Left to other layers: checking that a destination exists, auto-delete, the
//! default exchange, exchange-to-exchange traversal and persistence.

mod direct;
mod fanout;
mod headers;
mod topic;

pub use direct::DirectRouter;
pub use fanout::FanoutRouter;
pub use headers::HeadersRouter;
pub use topic::TopicRouter;

use crate::wire::types::FieldTable;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// An exchange's message counters, RabbitMQ's `publish_in` / `publish_out`
/// (and warren's `alternate_out`), as running totals. The publish path counts
/// with relaxed atomics only: no lock, no allocation. Counted when the exchange
/// routes a message (a delayed exchange: when the delay ends), whether the
/// message was published to it or reached it through an exchange-to-exchange
/// binding, as an alternate exchange or as a dead-letter exchange.
#[derive(Debug, Default)]
pub struct ExchangeStats {
    publish_in: AtomicU64,
    publish_out: AtomicU64,
    alternate_out: AtomicU64,
}

/// A read of [`ExchangeStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExchangeTotals {
    /// Messages that reached the exchange.
    pub publish_in: u64,
    /// Messages that left it: through at least one binding, or to its
    /// alternate exchange.
    pub publish_out: u64,
    /// Messages that matched no binding and went on to its alternate exchange
    /// (part of `publish_out`).
    pub alternate_out: u64,
}

impl ExchangeStats {
    /// A message reached the exchange; `out`: it matched at least one binding.
    #[inline]
    pub fn routed(&self, out: bool) {
        self.publish_in.fetch_add(1, Ordering::Relaxed);
        if out {
            self.publish_out.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// A message that matched no binding went on to the alternate exchange.
    #[inline]
    pub fn alternated(&self) {
        self.publish_out.fetch_add(1, Ordering::Relaxed);
        self.alternate_out.fetch_add(1, Ordering::Relaxed);
    }

    pub fn totals(&self) -> ExchangeTotals {
        ExchangeTotals {
            publish_in: self.publish_in.load(Ordering::Relaxed),
            publish_out: self.publish_out.load(Ordering::Relaxed),
            alternate_out: self.alternate_out.load(Ordering::Relaxed),
        }
    }
}

/// Where a binding leads.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Destination {
    Queue(Arc<str>),
    Exchange(Arc<str>),
}

/// The exchange types warren implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExchangeKind {
    Direct,
    Fanout,
    Topic,
    Headers,
}

impl ExchangeKind {
    /// The kind named by an `exchange.declare` type field (exact, lower case).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "direct" => Some(ExchangeKind::Direct),
            "fanout" => Some(ExchangeKind::Fanout),
            "topic" => Some(ExchangeKind::Topic),
            "headers" => Some(ExchangeKind::Headers),
            _ => None,
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            ExchangeKind::Direct => "direct",
            ExchangeKind::Fanout => "fanout",
            ExchangeKind::Topic => "topic",
            ExchangeKind::Headers => "headers",
        }
    }
}

/// One binding from an exchange (the owner of the router) to a destination.
#[derive(Debug, Clone, PartialEq)]
pub struct Binding {
    pub destination: Destination,
    pub routing_key: String,
    pub arguments: FieldTable,
}

/// The routing table of one exchange; one implementation per exchange type.
pub trait Router: Send + Sync + std::fmt::Debug {
    /// Add a binding; false if an identical binding (same destination, key and arguments) exists.
    fn bind(&mut self, binding: Binding) -> bool;
    /// Remove a binding; false if it did not exist.
    fn unbind(&mut self, binding: &Binding) -> bool;
    /// Push every destination matching this message into `out`, each at most once (dedupe).
    ///
    /// Dedupe covers what this call pushes; entries already in `out` are left alone.
    fn route(&self, routing_key: &str, headers: Option<&FieldTable>, out: &mut Vec<Destination>);
    /// The bindings this message matches, ordered by destination: [`Router::route`]'s
    /// answer binding by binding, found with the same matching (a trace shows it).
    /// Not on the publish path.
    fn matching(&self, routing_key: &str, headers: Option<&FieldTable>) -> Vec<Binding>;
    /// All bindings, for listing and persistence.
    fn bindings(&self) -> Vec<Binding>;
    /// Remove all bindings to `destination` (queue or exchange deleted); returns how many.
    fn remove_destination(&mut self, destination: &Destination) -> usize;
    fn is_empty(&self) -> bool;
    fn has_destination(&self, destination: &Destination) -> bool;
}

/// An empty routing table for an exchange of this kind.
pub fn new_router(kind: ExchangeKind) -> Box<dyn Router> {
    match kind {
        ExchangeKind::Direct => Box::new(DirectRouter::default()),
        ExchangeKind::Fanout => Box::new(FanoutRouter::default()),
        ExchangeKind::Topic => Box::new(TopicRouter::default()),
        ExchangeKind::Headers => Box::new(HeadersRouter::default()),
    }
}

/// Validate binding arguments for this kind.
///
/// Only headers exchanges check anything: `x-match`, when present, must be a long
/// string among all / any / all-with-x / any-with-x. The error text follows
/// RabbitMQ's and mentions `x-match`; the caller turns it into 406 PRECONDITION_FAILED.
/// Direct, fanout and topic accept any arguments (and topic any key), as RabbitMQ does.
pub fn validate_binding(kind: ExchangeKind, arguments: &FieldTable) -> Result<(), String> {
    match kind {
        ExchangeKind::Headers => headers::validate(arguments),
        ExchangeKind::Direct | ExchangeKind::Fanout | ExchangeKind::Topic => Ok(()),
    }
}

/// The binding with its arguments in canonical (stably name-sorted) order.
fn canonical(mut binding: Binding) -> Binding {
    sort_table(&mut binding.arguments);
    binding
}

/// Stable sort of a table's entries by name, as `lists:keysort(1, ...)` does.
fn sort_table(table: &mut FieldTable) {
    table.0.sort_by(|a, b| a.0.cmp(&b.0));
}

/// Every binding of one exchange, grouped by destination.
///
/// Gives the routers binding identity, listing, and O(1) per-destination lookups,
/// and tells them when a (destination, key) pair gains its first binding or loses
/// its last one, which is all that key-based routing structures need to know.
/// Arguments passed in must already be canonical (see [`canonical`]).
#[derive(Debug, Default)]
struct BindingIndex {
    by_dest: HashMap<Destination, Vec<(String, FieldTable)>>,
    len: usize,
}

impl BindingIndex {
    /// Add a binding. `None` if it already exists, else whether it is the first
    /// binding for its (destination, routing key) pair.
    fn insert(&mut self, binding: &Binding) -> Option<bool> {
        let entries = self.by_dest.entry(binding.destination.clone()).or_default();
        let mut first_for_key = true;
        for (key, args) in entries.iter() {
            if *key == binding.routing_key {
                if *args == binding.arguments {
                    return None;
                }
                first_for_key = false;
            }
        }
        entries.push((binding.routing_key.clone(), binding.arguments.clone()));
        self.len += 1;
        Some(first_for_key)
    }

    /// Remove a binding. `None` if it did not exist, else whether it was the last
    /// binding for its (destination, routing key) pair.
    fn remove(&mut self, binding: &Binding) -> Option<bool> {
        let entries = self.by_dest.get_mut(&binding.destination)?;
        let idx = entries
            .iter()
            .position(|(k, a)| *k == binding.routing_key && *a == binding.arguments)?;
        entries.remove(idx);
        let last_for_key = !entries.iter().any(|(k, _)| *k == binding.routing_key);
        if entries.is_empty() {
            self.by_dest.remove(&binding.destination);
        }
        self.len -= 1;
        Some(last_for_key)
    }

    /// Remove and return every (routing key, arguments) bound to `destination`.
    fn remove_destination(&mut self, destination: &Destination) -> Vec<(String, FieldTable)> {
        let entries = self.by_dest.remove(destination).unwrap_or_default();
        self.len -= entries.len();
        entries
    }

    fn contains_destination(&self, destination: &Destination) -> bool {
        self.by_dest.contains_key(destination)
    }

    /// Distinct destinations, in no particular order.
    fn destinations(&self) -> impl Iterator<Item = &Destination> {
        self.by_dest.keys()
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// All bindings, ordered by destination, then in binding order.
    fn bindings(&self) -> Vec<Binding> {
        self.bindings_where(|_, _| true)
    }

    /// The bindings `(destination, routing key)` for which `keep` holds, ordered
    /// as [`Self::bindings`].
    fn bindings_where(&self, keep: impl Fn(&Destination, &str) -> bool) -> Vec<Binding> {
        let mut dests: Vec<&Destination> = self.by_dest.keys().collect();
        dests.sort();
        let mut out = Vec::new();
        for dest in dests {
            for (key, args) in &self.by_dest[dest] {
                if keep(dest, key) {
                    out.push(Binding {
                        destination: dest.clone(),
                        routing_key: key.clone(),
                        arguments: args.clone(),
                    });
                }
            }
        }
        out
    }
}

/// Pushes destinations into a `route` output, skipping ones this call already pushed.
///
/// A linear scan while the result is small, a hash set once it grows.
struct Collector<'a> {
    out: &'a mut Vec<Destination>,
    start: usize,
    seen: Option<HashSet<Destination>>,
}

/// Results up to this size are deduped by scanning.
const LINEAR_DEDUPE_MAX: usize = 16;

impl<'a> Collector<'a> {
    fn new(out: &'a mut Vec<Destination>) -> Self {
        let start = out.len();
        Collector {
            out,
            start,
            seen: None,
        }
    }

    fn push(&mut self, dest: &Destination) {
        match &mut self.seen {
            Some(seen) => {
                if seen.insert(dest.clone()) {
                    self.out.push(dest.clone());
                }
            }
            None => {
                if self.out[self.start..].contains(dest) {
                    return;
                }
                self.out.push(dest.clone());
                if self.out.len() - self.start > LINEAR_DEDUPE_MAX {
                    self.seen = Some(self.out[self.start..].iter().cloned().collect());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::types::FieldValue;

    pub(super) fn q(name: &str) -> Destination {
        Destination::Queue(name.into())
    }

    #[test]
    fn kind_parse_round_trips() {
        for kind in [
            ExchangeKind::Direct,
            ExchangeKind::Fanout,
            ExchangeKind::Topic,
            ExchangeKind::Headers,
        ] {
            assert_eq!(ExchangeKind::parse(kind.as_str()), Some(kind));
            assert_eq!(new_router(kind).bindings(), vec![]);
        }
        assert_eq!(ExchangeKind::parse("Direct"), None);
        assert_eq!(ExchangeKind::parse("x-delayed-message"), None);
        assert_eq!(ExchangeKind::parse(""), None);
    }

    #[test]
    fn argument_order_does_not_change_identity() {
        for kind in [
            ExchangeKind::Direct,
            ExchangeKind::Fanout,
            ExchangeKind::Topic,
            ExchangeKind::Headers,
        ] {
            let mut r = new_router(kind);
            let ab = FieldTable(vec![
                ("a".into(), FieldValue::I32(1)),
                ("b".into(), FieldValue::I32(2)),
            ]);
            let ba = FieldTable(vec![
                ("b".into(), FieldValue::I32(2)),
                ("a".into(), FieldValue::I32(1)),
            ]);
            let mk = |arguments: FieldTable| Binding {
                destination: q("q"),
                routing_key: "k".into(),
                arguments,
            };
            assert!(r.bind(mk(ba.clone())), "{kind:?}");
            assert!(!r.bind(mk(ab.clone())), "{kind:?}");
            assert_eq!(r.bindings(), vec![mk(ab.clone())], "{kind:?}");
            assert!(r.unbind(&mk(ba)), "{kind:?}");
            assert!(r.is_empty(), "{kind:?}");
        }
    }

    #[test]
    fn every_kind_dedupes_and_removes_destinations() {
        for kind in [
            ExchangeKind::Direct,
            ExchangeKind::Fanout,
            ExchangeKind::Topic,
            ExchangeKind::Headers,
        ] {
            let mut r = new_router(kind);
            let b = |d: &str, k: &str| Binding {
                destination: q(d),
                routing_key: k.into(),
                arguments: FieldTable::new(),
            };
            assert!(r.is_empty());
            assert!(r.bind(b("q1", "k")));
            assert!(!r.bind(b("q1", "k")));
            assert!(r.bind(b("q1", "k2")));
            assert!(r.bind(b("q2", "k")));
            let ex = Binding {
                destination: Destination::Exchange("q1".into()),
                ..b("q1", "k")
            };
            assert!(r.bind(ex.clone()));
            assert_eq!(r.bindings().len(), 4);
            let mut out = Vec::new();
            r.route("k", None, &mut out);
            let mut expect = vec![q("q1"), q("q2"), ex.destination.clone()];
            out.sort();
            expect.sort();
            assert_eq!(out, expect, "{kind:?}");

            assert_eq!(r.remove_destination(&q("q1")), 2);
            assert_eq!(r.remove_destination(&q("q1")), 0);
            assert!(!r.has_destination(&q("q1")));
            assert!(r.has_destination(&ex.destination));
            assert!(!r.unbind(&b("q1", "k")));
            assert!(r.unbind(&ex));
            assert!(!r.unbind(&ex));
            assert!(r.unbind(&b("q2", "k")));
            assert!(r.is_empty(), "{kind:?}");
            let mut out = Vec::new();
            r.route("k", None, &mut out);
            assert!(out.is_empty());
        }
    }

    /// `matching` explains `route`: its bindings' destinations are exactly the
    /// routed ones, and each is a binding the router holds.
    #[test]
    fn matching_agrees_with_route() {
        let patterns = ["a", "a.b", "*.b", "#", "a.#", "#.b", "", "*", "a.*.c", "x"];
        let keys = ["a", "a.b", "a.x.c", "b", "", "x", "a.b.c"];
        let header_sets: Vec<FieldTable> = vec![
            FieldTable::new(),
            FieldTable(vec![("h".into(), FieldValue::string("a"))]),
            FieldTable(vec![
                ("h".into(), FieldValue::string("a.b")),
                ("x-k".into(), FieldValue::string("x")),
            ]),
        ];
        for kind in [
            ExchangeKind::Direct,
            ExchangeKind::Fanout,
            ExchangeKind::Topic,
            ExchangeKind::Headers,
        ] {
            let mut r = new_router(kind);
            for (i, p) in patterns.iter().enumerate() {
                let mode = ["all", "any", "all-with-x", "any-with-x"][i % 4];
                r.bind(Binding {
                    destination: q(&format!("q{}", i % 4)),
                    routing_key: p.to_string(),
                    arguments: FieldTable(vec![
                        ("x-match".into(), FieldValue::string(mode)),
                        ("h".into(), FieldValue::string(*p)),
                        ("x-k".into(), FieldValue::string("x")),
                    ]),
                });
            }
            let all = r.bindings();
            for key in keys {
                for h in &header_sets {
                    let mut routed = Vec::new();
                    r.route(key, Some(h), &mut routed);
                    routed.sort();
                    let m = r.matching(key, Some(h));
                    assert!(m.iter().all(|b| all.contains(b)), "{kind:?}");
                    let mut dests: Vec<Destination> =
                        m.into_iter().map(|b| b.destination).collect();
                    dests.dedup();
                    assert_eq!(dests, routed, "{kind:?} {key:?} {h:?}");
                }
            }
        }
    }

    #[test]
    fn collector_dedupes_past_the_linear_limit() {
        let mut out = vec![q("before")];
        let mut c = Collector::new(&mut out);
        for _ in 0..2 {
            for i in 0..40 {
                c.push(&q(&format!("q{i}")));
            }
        }
        c.push(&q("before"));
        assert_eq!(out.len(), 42);
    }

    #[test]
    fn validate_only_checks_headers() {
        let bad = FieldTable(vec![("x-match".into(), FieldValue::string("nope"))]);
        assert!(validate_binding(ExchangeKind::Direct, &bad).is_ok());
        assert!(validate_binding(ExchangeKind::Fanout, &bad).is_ok());
        assert!(validate_binding(ExchangeKind::Topic, &bad).is_ok());
        let err = validate_binding(ExchangeKind::Headers, &bad).unwrap_err();
        assert!(err.contains("x-match"), "{err}");
    }
}

/// Helpers shared by the routers' unit tests.
#[cfg(test)]
pub(crate) mod test_util {
    use super::{Binding, Destination, Router};
    use crate::wire::types::FieldTable;

    pub fn q(name: &str) -> Destination {
        Destination::Queue(name.into())
    }

    /// A binding of queue `dest` with `key` and no arguments.
    pub fn b(dest: &str, key: &str) -> Binding {
        Binding {
            destination: q(dest),
            routing_key: key.into(),
            arguments: FieldTable::new(),
        }
    }

    /// Where `key` (without headers) routes, sorted.
    pub fn route(r: &dyn Router, key: &str) -> Vec<Destination> {
        let mut out = Vec::new();
        r.route(key, None, &mut out);
        out.sort();
        out
    }
}
