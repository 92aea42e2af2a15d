//! The fanout exchange: a message goes to every bound destination; keys and arguments are ignored.
//!
//! Owns [`FanoutRouter`]. Bindings still differ by key and arguments (RabbitMQ
//! lists them separately), but each destination is routed to once, so routing is
//! just the [`BindingIndex`]'s distinct destinations.

use super::{canonical, Binding, BindingIndex, Destination, Router};
use crate::wire::types::FieldTable;

/// Routing table of a fanout exchange.
#[derive(Debug, Default)]
pub struct FanoutRouter {
    index: BindingIndex,
}

impl Router for FanoutRouter {
    fn bind(&mut self, binding: Binding) -> bool {
        self.index.insert(&canonical(binding)).is_some()
    }

    fn unbind(&mut self, binding: &Binding) -> bool {
        self.index.remove(&canonical(binding.clone())).is_some()
    }

    fn route(&self, _routing_key: &str, _headers: Option<&FieldTable>, out: &mut Vec<Destination>) {
        out.extend(self.index.destinations().cloned());
    }

    fn matching(&self, _routing_key: &str, _headers: Option<&FieldTable>) -> Vec<Binding> {
        self.index.bindings()
    }

    fn bindings(&self) -> Vec<Binding> {
        self.index.bindings()
    }

    fn remove_destination(&mut self, destination: &Destination) -> usize {
        self.index.remove_destination(destination).len()
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
    fn every_destination_once_whatever_the_key() {
        let mut r = FanoutRouter::default();
        assert_eq!(route(&r, "x"), vec![]);
        assert!(r.bind(b("q1", "")));
        assert!(r.bind(b("q1", "other")));
        assert!(r.bind(Binding {
            arguments: FieldTable(vec![("a".into(), FieldValue::Void)]),
            ..b("q1", "")
        }));
        assert!(!r.bind(b("q1", "other")));
        assert!(r.bind(b("q2", "#")));
        let e = Destination::Exchange("e".into());
        assert!(r.bind(Binding {
            destination: e.clone(),
            ..b("", "")
        }));
        let mut all = vec![q("q1"), q("q2"), e];
        all.sort();
        for key in ["", "x", "a.b.c", "#"] {
            assert_eq!(route(&r, key), all);
        }
        assert_eq!(r.bindings().len(), 5);
    }

    #[test]
    fn unbind_and_remove_destination() {
        let mut r = FanoutRouter::default();
        r.bind(b("q1", "a"));
        r.bind(b("q1", "b"));
        r.bind(b("q2", "a"));
        assert!(r.unbind(&b("q1", "a")));
        assert!(!r.unbind(&b("q1", "a")));
        assert!(!r.unbind(&b("q3", "a")));
        assert_eq!(route(&r, ""), vec![q("q1"), q("q2")]);
        assert!(r.unbind(&b("q1", "b")));
        assert!(!r.has_destination(&q("q1")));
        assert_eq!(route(&r, ""), vec![q("q2")]);
        assert_eq!(r.remove_destination(&q("q2")), 1);
        assert!(r.is_empty());
        assert_eq!(route(&r, ""), vec![]);
    }
}
