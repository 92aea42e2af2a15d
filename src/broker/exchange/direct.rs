//! The direct exchange: a message goes to every destination bound with exactly its routing key.
//!
//! Owns [`DirectRouter`]: a map from routing key to the distinct destinations bound
//! with it, so routing is one hash lookup. Two bindings that differ only in their
//! arguments share one entry in that list; the [`BindingIndex`] keeps them apart.

use super::{canonical, Binding, BindingIndex, Destination, Router};
use crate::wire::types::FieldTable;
use std::collections::HashMap;

/// Routing table of a direct exchange.
#[derive(Debug, Default)]
pub struct DirectRouter {
    /// Routing key -> distinct destinations bound with it.
    by_key: HashMap<String, Vec<Destination>>,
    index: BindingIndex,
}

impl DirectRouter {
    fn drop_key_dest(&mut self, key: &str, destination: &Destination) {
        if let Some(dests) = self.by_key.get_mut(key) {
            if let Some(pos) = dests.iter().position(|d| d == destination) {
                dests.swap_remove(pos);
            }
            if dests.is_empty() {
                self.by_key.remove(key);
            }
        }
    }
}

impl Router for DirectRouter {
    fn bind(&mut self, binding: Binding) -> bool {
        let binding = canonical(binding);
        match self.index.insert(&binding) {
            None => false,
            Some(first_for_key) => {
                if first_for_key {
                    self.by_key
                        .entry(binding.routing_key)
                        .or_default()
                        .push(binding.destination);
                }
                true
            }
        }
    }

    fn unbind(&mut self, binding: &Binding) -> bool {
        let binding = canonical(binding.clone());
        match self.index.remove(&binding) {
            None => false,
            Some(last_for_key) => {
                if last_for_key {
                    self.drop_key_dest(&binding.routing_key, &binding.destination);
                }
                true
            }
        }
    }

    fn route(&self, routing_key: &str, _headers: Option<&FieldTable>, out: &mut Vec<Destination>) {
        if let Some(dests) = self.by_key.get(routing_key) {
            out.extend(dests.iter().cloned());
        }
    }

    fn matching(&self, routing_key: &str, _headers: Option<&FieldTable>) -> Vec<Binding> {
        let Some(dests) = self.by_key.get(routing_key) else {
            return Vec::new();
        };
        self.index
            .bindings_where(|dest, key| key == routing_key && dests.contains(dest))
    }

    fn bindings(&self) -> Vec<Binding> {
        self.index.bindings()
    }

    fn remove_destination(&mut self, destination: &Destination) -> usize {
        let removed = self.index.remove_destination(destination);
        for (key, _) in &removed {
            self.drop_key_dest(key, destination);
        }
        removed.len()
    }

    fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    fn has_destination(&self, destination: &Destination) -> bool {
        self.index.contains_destination(destination)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::exchange::test_util::{b, q, route};
    use crate::wire::types::FieldValue;

    #[test]
    fn exact_key_equality() {
        let mut r = DirectRouter::default();
        assert!(r.bind(b("q1", "a")));
        assert!(r.bind(b("q2", "a")));
        assert!(r.bind(b("q3", "a.b")));
        assert!(r.bind(b("q4", "")));
        assert!(r.bind(b("q5", "*")));
        assert_eq!(route(&r, "a"), vec![q("q1"), q("q2")]);
        assert_eq!(route(&r, "a.b"), vec![q("q3")]);
        assert_eq!(route(&r, ""), vec![q("q4")]);
        assert_eq!(route(&r, "*"), vec![q("q5")]);
        assert_eq!(route(&r, "A"), vec![]);
        assert_eq!(route(&r, "a "), vec![]);
        assert_eq!(route(&r, "b"), vec![]);
    }

    #[test]
    fn bindings_differing_in_arguments_route_once() {
        let mut r = DirectRouter::default();
        let with_args = Binding {
            arguments: FieldTable(vec![("x".into(), FieldValue::I32(1))]),
            ..b("q1", "k")
        };
        assert!(r.bind(b("q1", "k")));
        assert!(r.bind(with_args.clone()));
        assert!(!r.bind(with_args.clone()));
        assert_eq!(r.bindings().len(), 2);
        assert_eq!(route(&r, "k"), vec![q("q1")]);
        // Removing one of the two keeps the route.
        assert!(r.unbind(&b("q1", "k")));
        assert_eq!(route(&r, "k"), vec![q("q1")]);
        assert!(r.unbind(&with_args));
        assert_eq!(route(&r, "k"), vec![]);
        assert!(r.is_empty());
        assert!(r.by_key.is_empty());
    }

    #[test]
    fn remove_destination_cleans_every_key() {
        let mut r = DirectRouter::default();
        for key in ["a", "b", "c"] {
            assert!(r.bind(b("gone", key)));
        }
        assert!(r.bind(b("stays", "a")));
        assert!(r.has_destination(&q("gone")));
        assert_eq!(r.remove_destination(&q("gone")), 3);
        assert!(!r.has_destination(&q("gone")));
        assert_eq!(route(&r, "a"), vec![q("stays")]);
        assert_eq!(route(&r, "b"), vec![]);
        assert_eq!(r.by_key.len(), 1);
        assert_eq!(r.bindings(), vec![b("stays", "a")]);
        assert!(!r.unbind(&b("gone", "a")));
        assert!(!r.is_empty());
    }

    #[test]
    fn route_appends_to_existing_output() {
        let mut r = DirectRouter::default();
        r.bind(b("q1", "k"));
        let mut out = vec![q("q0")];
        r.route("k", None, &mut out);
        assert_eq!(out, vec![q("q0"), q("q1")]);
    }
}
