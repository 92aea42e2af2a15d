//! The topic exchange: binding keys are dot-separated word patterns with `*` and `#`.
//!
//! Owns [`TopicRouter`]: a trie with one level per word of the binding key, whose
//! edges are literal words, `*` (exactly one word) or `#` (zero or more words).
//! Routing walks the trie once per message, never a regex per binding.
//!
//! # Words, and the empty key
//!
//! Keys (binding and routing alike) split on every `.`, so `"a..b"` is the three
//! words `a`, `` (empty), `b`, and `"a."` is `a`, ``. The empty key `""` is
//! **zero words**, not one empty word. RabbitMQ does the same: its
//! `split_topic_key` (and `split_topic_key_binary` in `rabbit_db_topic_exchange`)
//! maps `<<>>` to `[]` by a dedicated first clause, while any non-empty key goes
//! through the per-byte split (or `binary:split(.., [global])`), which keeps empty
//! words. So, matching RabbitMQ:
//! - `#` matches `""`; `*` does not match `""` (it needs one word);
//! - a binding key `""` matches only the routing key `""`;
//! - `"."` is two empty words: `*.*` and `#` match it, `*` and `""` do not.
//!
//! A `*` or `#` is a wildcard only as a whole word: `a*` and `#b` are literals.
//!
//! # Matching
//!
//! The trie is run as an NFA: the set of trie nodes reachable after each word,
//! deduped, where a node reached through a `#` edge may also consume the word and
//! stay, and any node's `#` child is reachable without consuming a word. Cost is
//! O(words x live nodes), also for patterns with several `#`, where naive
//! backtracking is exponential. The bindings on the nodes live at the end match.

use super::{canonical, Binding, BindingIndex, Collector, Destination, Router};
use crate::wire::types::FieldTable;
use std::collections::HashMap;

/// Routing table of a topic exchange.
#[derive(Debug, Default)]
pub struct TopicRouter {
    root: Node,
    index: BindingIndex,
}

/// One trie node: the pattern prefix spelled by the path from the root.
#[derive(Debug, Default)]
struct Node {
    literal: HashMap<Box<str>, Node>,
    star: Option<Box<Node>>,
    hash: Option<Box<Node>>,
    /// Reached through a `#` edge, so it may consume any number of further words.
    is_hash: bool,
    /// Distinct destinations bound with exactly this pattern.
    dests: Vec<Destination>,
}

impl Node {
    fn is_vacant(&self) -> bool {
        self.dests.is_empty()
            && self.literal.is_empty()
            && self.star.is_none()
            && self.hash.is_none()
    }

    fn child_or_insert(&mut self, word: &str) -> &mut Node {
        match word {
            "*" => self.star.get_or_insert_with(Box::default),
            "#" => self.hash.get_or_insert_with(|| {
                Box::new(Node {
                    is_hash: true,
                    ..Node::default()
                })
            }),
            _ => self.literal.entry(word.into()).or_default(),
        }
    }

    /// Remove `dest` from the node at `words` below this one, pruning nodes left
    /// vacant. Returns whether it was there.
    fn remove(&mut self, words: &[&str], dest: &Destination) -> bool {
        let Some((first, rest)) = words.split_first() else {
            let Some(pos) = self.dests.iter().position(|d| d == dest) else {
                return false;
            };
            self.dests.swap_remove(pos);
            return true;
        };
        match *first {
            "*" => remove_below(&mut self.star, rest, dest),
            "#" => remove_below(&mut self.hash, rest, dest),
            word => {
                let Some(child) = self.literal.get_mut(word) else {
                    return false;
                };
                let removed = child.remove(rest, dest);
                if child.is_vacant() {
                    self.literal.remove(word);
                }
                removed
            }
        }
    }
}

/// [`Node::remove`] through a `*` or `#` edge, dropping the child if left vacant.
fn remove_below(slot: &mut Option<Box<Node>>, words: &[&str], dest: &Destination) -> bool {
    let Some(child) = slot.as_deref_mut() else {
        return false;
    };
    let removed = child.remove(words, dest);
    if child.is_vacant() {
        *slot = None;
    }
    removed
}

/// The words of a topic key; the empty key has none (see the module docs).
fn words(key: &str) -> Vec<&str> {
    if key.is_empty() {
        Vec::new()
    } else {
        key.split('.').collect()
    }
}

/// Add `node` to the live set unless present, then its `#` child (which matches
/// zero words), recursively.
fn enter<'a>(live: &mut Vec<&'a Node>, node: &'a Node) {
    if live.iter().any(|n| std::ptr::eq(*n, node)) {
        return;
    }
    live.push(node);
    if let Some(hash) = node.hash.as_deref() {
        enter(live, hash);
    }
}

impl TopicRouter {
    /// The trie node of the binding key `pattern`, if any binding made it.
    fn node_at(&self, pattern: &str) -> Option<&Node> {
        let mut node = &self.root;
        for word in words(pattern) {
            node = match word {
                "*" => node.star.as_deref()?,
                "#" => node.hash.as_deref()?,
                _ => node.literal.get(word)?,
            };
        }
        Some(node)
    }

    /// The trie nodes whose pattern matches `routing_key`.
    fn matching_nodes(&self, routing_key: &str) -> Vec<&Node> {
        let mut live = Vec::new();
        enter(&mut live, &self.root);
        if routing_key.is_empty() {
            return live;
        }
        let mut next = Vec::new();
        for word in routing_key.split('.') {
            for node in &live {
                if let Some(child) = node.literal.get(word) {
                    enter(&mut next, child);
                }
                if let Some(child) = node.star.as_deref() {
                    enter(&mut next, child);
                }
                if node.is_hash {
                    enter(&mut next, node);
                }
            }
            std::mem::swap(&mut live, &mut next);
            next.clear();
            if live.is_empty() {
                break;
            }
        }
        live
    }
}

impl Router for TopicRouter {
    fn bind(&mut self, binding: Binding) -> bool {
        let binding = canonical(binding);
        match self.index.insert(&binding) {
            None => false,
            Some(first_for_key) => {
                if first_for_key {
                    let mut node = &mut self.root;
                    for word in words(&binding.routing_key) {
                        node = node.child_or_insert(word);
                    }
                    node.dests.push(binding.destination);
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
                    let removed = self
                        .root
                        .remove(&words(&binding.routing_key), &binding.destination);
                    debug_assert!(removed, "trie out of step with the binding index");
                }
                true
            }
        }
    }

    fn route(&self, routing_key: &str, _headers: Option<&FieldTable>, out: &mut Vec<Destination>) {
        let nodes = self.matching_nodes(routing_key);
        let mut with_dests = nodes.iter().filter(|n| !n.dests.is_empty());
        match (with_dests.next(), with_dests.next()) {
            (None, _) => {}
            // One pattern matched: its destinations are already distinct.
            (Some(only), None) => out.extend(only.dests.iter().cloned()),
            (Some(first), Some(second)) => {
                let mut collector = Collector::new(out);
                for node in [first, second].into_iter().chain(with_dests) {
                    for dest in &node.dests {
                        collector.push(dest);
                    }
                }
            }
        }
    }

    fn matching(&self, routing_key: &str, _headers: Option<&FieldTable>) -> Vec<Binding> {
        let nodes = self.matching_nodes(routing_key);
        self.index.bindings_where(|dest, pattern| {
            self.node_at(pattern).is_some_and(|node| {
                node.dests.contains(dest) && nodes.iter().any(|n| std::ptr::eq(*n, node))
            })
        })
    }

    fn bindings(&self) -> Vec<Binding> {
        self.index.bindings()
    }

    fn remove_destination(&mut self, destination: &Destination) -> usize {
        let removed = self.index.remove_destination(destination);
        for (key, _) in &removed {
            // Several bindings may share a key; the first removal clears the node.
            self.root.remove(&words(key), destination);
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

impl TopicRouter {
    /// Whether `pattern` matches `routing_key`, using a one-binding trie (tests, tools).
    #[cfg(test)]
    fn pattern_matches(pattern: &str, routing_key: &str) -> bool {
        let mut r = TopicRouter::default();
        r.bind(Binding {
            destination: Destination::Queue("q".into()),
            routing_key: pattern.into(),
            arguments: FieldTable::new(),
        });
        let mut out = Vec::new();
        r.route(routing_key, None, &mut out);
        !out.is_empty()
    }

    #[cfg(test)]
    fn node_count(&self) -> usize {
        fn count(n: &Node) -> usize {
            1 + n.literal.values().map(count).sum::<usize>()
                + n.star.as_deref().map_or(0, count)
                + n.hash.as_deref().map_or(0, count)
        }
        count(&self.root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::exchange::test_util::{b, q, route};

    /// Reference matcher: plain recursion over word lists, written independently
    /// of the trie, with the same empty-key rule.
    fn reference(pattern: &[&str], key: &[&str]) -> bool {
        match pattern.split_first() {
            None => key.is_empty(),
            Some((&"#", rest)) => (0..=key.len()).any(|skip| reference(rest, &key[skip..])),
            Some((&"*", rest)) => !key.is_empty() && reference(rest, &key[1..]),
            Some((word, rest)) => key.first() == Some(word) && reference(rest, &key[1..]),
        }
    }

    const CASES: &[(&str, &str, bool)] = &[
        // Literals.
        ("a.b.c", "a.b.c", true),
        ("a.b.c", "a.b", false),
        ("a.b", "a.b.c", false),
        ("a.b.c", "a.b.d", false),
        ("a", "A", false),
        // The empty key is zero words.
        ("", "", true),
        ("", "a", false),
        ("a", "", false),
        ("#", "", true),
        ("*", "", false),
        ("#.#", "", true),
        ("*.#", "", false),
        ("#.*", "", false),
        // Empty words are ordinary words.
        ("*", ".", false),
        ("*.*", ".", true),
        ("#", ".", true),
        (".", ".", true),
        ("", ".", false),
        ("a..b", "a..b", true),
        ("a.*.b", "a..b", true),
        ("a.#.b", "a..b", true),
        ("a.b", "a..b", false),
        ("a.", "a.", true),
        ("a.*", "a.", true),
        ("a.#", "a.", true),
        ("a", "a.", false),
        (".a", ".a", true),
        ("*.a", ".a", true),
        ("a..", "a..", true),
        ("a.*.*", "a..", true),
        // `*` is exactly one word.
        ("*", "a", true),
        ("*", "a.b", false),
        ("a.*", "a.b", true),
        ("a.*", "a", false),
        ("a.*", "a.b.c", false),
        ("*.b", "a.b", true),
        ("*.*", "a.b", true),
        ("*.*", "a", false),
        ("a.*.c", "a.b.c", true),
        ("a.*.c", "a.c", false),
        // `#` at the end.
        ("#", "a", true),
        ("#", "a.b.c", true),
        ("a.#", "a", true),
        ("a.#", "a.b", true),
        ("a.#", "a.b.c", true),
        ("a.#", "b.a", false),
        ("a.#", "", false),
        // `#` at the start.
        ("#.a", "a", true),
        ("#.a", "b.a", true),
        ("#.a", "c.b.a", true),
        ("#.a", "a.b", false),
        ("#.a", "", false),
        // `#` in the middle.
        ("a.#.b", "a.b", true),
        ("a.#.b", "a.x.b", true),
        ("a.#.b", "a.x.y.b", true),
        ("a.#.b", "a.x.y", false),
        ("a.#.b", "a.b.b", true),
        ("a.#.b", "b.a.b", false),
        // Several `#`.
        ("#.#", "a.b", true),
        ("#.a.#", "a", true),
        ("#.a.#", "x.a.y", true),
        ("#.a.#", "x.y", false),
        ("a.#.#.b", "a.b", true),
        ("a.#.b.#", "a.x.b", true),
        ("a.#.b.#", "a.x.b.y.z", true),
        ("#.b.#.d", "a.b.c.d", true),
        ("#.b.#.d", "b.d", true),
        ("#.b.#.d", "a.b.c.e", false),
        // `#` with `*`.
        ("#.*", "a", true),
        ("*.#", "a", true),
        ("*.#", "a.b.c", true),
        ("#.*.#", "a", true),
        ("#.*.c", "c", false),
        ("#.*.c", "b.c", true),
        ("*.#.*", "a", false),
        ("*.#.*", "a.b", true),
        ("*.#.*", "a.b.c.d", true),
        // Wildcards are whole words only.
        ("a*", "ab", false),
        ("a*", "a*", true),
        ("#b", "a.b", false),
        ("a.#b", "a.#b", true),
        // Literal `*` / `#` in a routing key are just words.
        ("a.*", "a.*", true),
        ("a.#", "a.#", true),
        ("a.b", "a.*", false),
        // RabbitMQ tutorial examples.
        ("*.orange.*", "quick.orange.rabbit", true),
        ("*.*.rabbit", "quick.orange.rabbit", true),
        ("lazy.#", "lazy.orange.elephant", true),
        ("*.orange.*", "quick.orange.fox", true),
        ("*.*.rabbit", "lazy.brown.fox", false),
        ("lazy.#", "lazy.pink.rabbit", true),
        ("*.orange.*", "quick.brown.fox", false),
        ("*.orange.*", "orange", false),
        ("*.orange.*", "quick.orange.male.rabbit", false),
        ("lazy.#", "lazy.orange.male.rabbit", true),
    ];

    #[test]
    fn matching_table() {
        assert!(CASES.len() >= 30);
        for &(pattern, key, expect) in CASES {
            assert_eq!(
                TopicRouter::pattern_matches(pattern, key),
                expect,
                "pattern {pattern:?} key {key:?}"
            );
            assert_eq!(
                reference(&words(pattern), &words(key)),
                expect,
                "reference disagrees with table: {pattern:?} {key:?}"
            );
        }
    }

    #[test]
    fn one_trie_matches_the_reference_on_all_pairs() {
        let patterns: Vec<&str> = {
            let mut p: Vec<&str> = CASES.iter().map(|c| c.0).collect();
            p.sort();
            p.dedup();
            p
        };
        let mut r = TopicRouter::default();
        for (i, p) in patterns.iter().enumerate() {
            assert!(r.bind(b(&format!("q{i:03}"), p)));
        }
        let mut keys: Vec<&str> = CASES.iter().map(|c| c.1).collect();
        keys.extend(["", "a.b.c.d.e", "x", "#", "*", "a.a.a", "b.b"]);
        for key in keys {
            let expect: Vec<Destination> = patterns
                .iter()
                .enumerate()
                .filter(|(_, p)| reference(&words(p), &words(key)))
                .map(|(i, _)| q(&format!("q{i:03}")))
                .collect();
            assert_eq!(route(&r, key), expect, "key {key:?}");
        }
    }

    #[test]
    fn destinations_are_deduped_across_patterns() {
        let mut r = TopicRouter::default();
        for p in ["#", "a.#", "*.b", "a.b", "#.b", "a.*"] {
            assert!(r.bind(b("q1", p)));
        }
        assert!(r.bind(b("q2", "a.b")));
        assert_eq!(route(&r, "a.b"), vec![q("q1"), q("q2")]);
        assert_eq!(route(&r, "z"), vec![q("q1")]);
        // Many destinations on many patterns (past the collector's linear limit).
        for i in 0..50 {
            r.bind(b(&format!("m{i:02}"), "#"));
            r.bind(b(&format!("m{i:02}"), "a.*"));
        }
        let out = route(&r, "a.b");
        assert_eq!(out.len(), 52);
        let mut dedup = out.clone();
        dedup.dedup();
        assert_eq!(out, dedup);
    }

    #[test]
    fn bind_unbind_and_pruning() {
        let mut r = TopicRouter::default();
        assert!(r.bind(b("q1", "a.*.#")));
        assert!(!r.bind(b("q1", "a.*.#")));
        assert!(r.bind(b("q2", "a.*.#")));
        assert!(r.bind(b("q1", "a.b")));
        assert_eq!(route(&r, "a.b"), vec![q("q1"), q("q2")]);
        assert!(r.unbind(&b("q1", "a.*.#")));
        assert!(!r.unbind(&b("q1", "a.*.#")));
        assert_eq!(route(&r, "a.b"), vec![q("q1"), q("q2")]);
        assert_eq!(route(&r, "a.c"), vec![q("q2")]);
        assert!(r.unbind(&b("q2", "a.*.#")));
        assert_eq!(route(&r, "a.c"), vec![]);
        // Only root -> a -> b is left.
        assert_eq!(r.node_count(), 3);
        assert!(r.unbind(&b("q1", "a.b")));
        assert_eq!(r.node_count(), 1);
        assert!(r.is_empty());
    }

    #[test]
    fn same_key_different_arguments() {
        let mut r = TopicRouter::default();
        let with_args = Binding {
            arguments: FieldTable(vec![(
                "x".into(),
                crate::wire::types::FieldValue::Bool(true),
            )]),
            ..b("q1", "a.#")
        };
        assert!(r.bind(b("q1", "a.#")));
        assert!(r.bind(with_args.clone()));
        assert_eq!(route(&r, "a.x"), vec![q("q1")]);
        assert!(r.unbind(&b("q1", "a.#")));
        assert_eq!(route(&r, "a.x"), vec![q("q1")]);
        assert!(r.unbind(&with_args));
        assert_eq!(route(&r, "a.x"), vec![]);
        assert_eq!(r.node_count(), 1);
    }

    #[test]
    fn remove_destination_prunes_the_trie() {
        let mut r = TopicRouter::default();
        for p in ["a.b", "a.#", "#", "*.c.*", ""] {
            r.bind(b("gone", p));
        }
        r.bind(Binding {
            arguments: FieldTable(vec![("k".into(), crate::wire::types::FieldValue::Void)]),
            ..b("gone", "a.b")
        });
        r.bind(b("stays", "a.b"));
        assert_eq!(r.remove_destination(&q("gone")), 6);
        assert_eq!(r.remove_destination(&q("gone")), 0);
        assert!(!r.has_destination(&q("gone")));
        assert!(r.has_destination(&q("stays")));
        assert_eq!(r.node_count(), 3);
        assert_eq!(route(&r, "a.b"), vec![q("stays")]);
        assert_eq!(route(&r, ""), vec![]);
        assert_eq!(r.bindings(), vec![b("stays", "a.b")]);
    }

    #[test]
    fn many_hashes_and_a_long_key_stay_fast() {
        let mut r = TopicRouter::default();
        r.bind(b("q", "#.a.#.a.#.a.#.a.#.a.#.a.#.z"));
        let key = vec!["a"; 200].join(".");
        assert_eq!(route(&r, &key), vec![]);
        assert_eq!(route(&r, &format!("{key}.z")), vec![q("q")]);
    }

    #[test]
    fn bindings_list_keeps_original_keys() {
        let mut r = TopicRouter::default();
        for k in ["", ".", "a..b", "#", "*.x"] {
            r.bind(b("q", k));
        }
        let mut keys: Vec<String> = r.bindings().into_iter().map(|b| b.routing_key).collect();
        keys.sort();
        assert_eq!(keys, vec!["", "#", "*.x", ".", "a..b"]);
    }
}
