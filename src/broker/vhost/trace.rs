//! Tracing a message: where a message would go if published now, explained
//! step by step, without publishing it. The admin API's
//! `POST /api/exchanges/{vhost}/{name}/trace` and the UI's trace page show it.
//!
//! Nothing here matches or walks on its own: the route is the publish path's
//! own [`VHost::traverse`] (with a [`Watch`] that records each step), the
//! bindings shown are each router's [`Router::matching`] (the same matching
//! `route` does, binding by binding), and a dead-lettered copy is made by
//! [`dead_letter::dead_letter`] and checked with [`dead_letter::is_cycle`], as
//! a queue makes and routes it. Nothing is enqueued, held or counted.

use super::publish::{route_default, Watch};
use super::{Exchange, PublishFrom, VHost};
use crate::broker::exchange::{Binding, Destination, Router};
use crate::broker::message::{Message, ShortStr};
use crate::broker::queue::{dead_letter, Queue, Reason};
use crate::error::AmqpResult;
use crate::wire::FieldTable;
use std::sync::Arc;

/// How many dead-letter steps a trace follows (a dead-lettered copy reaching a
/// queue that dead-letters again, and so on).
pub const DEAD_LETTER_DEPTH: usize = 8;

/// One exchange a traced message passes through.
#[derive(Debug, Clone, PartialEq)]
pub struct Hop {
    pub exchange: String,
    /// The exchange's type as declared.
    pub kind: &'static str,
    /// The bindings that match, each with the key that matched it first (the
    /// routing key, or one from `CC` / `BCC`).
    pub matched: Vec<(Binding, String)>,
    /// Nothing matched and the message goes on to this alternate exchange.
    pub alternate: Option<String>,
}

/// Where a message goes from one exchange.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Route {
    /// The exchanges passed, in the order the router visits them.
    pub hops: Vec<Hop>,
    /// The queues reached, in the order reached.
    pub queues: Vec<String>,
    /// Exchanges named by a binding or an alternate exchange that do not exist.
    pub missing: Vec<String>,
    /// A delayed exchange holds the message this long (ms) before routing it.
    pub delayed_ms: Option<u64>,
}

/// Where a dead-lettered copy of a message goes.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetterStep {
    /// The queue that dead-letters (it was reached by the message, or by an
    /// earlier dead-lettered copy).
    pub queue: String,
    /// 1 for the queues the message reaches, 2 for a copy of a copy, ...
    pub depth: usize,
    /// The queue's dead-letter exchange.
    pub exchange: String,
    /// The key the copy is routed with (`x-dead-letter-routing-key`, else the
    /// message's own).
    pub routing_key: String,
    /// The route from the dead-letter exchange; None if it does not exist (the
    /// copy is dropped, as in RabbitMQ).
    pub route: Option<Route>,
    /// Queues of `route` that drop a copy dead-lettered for expiry or a length
    /// limit, because it would go round a cycle (a rejected copy still goes).
    pub cycle: Vec<String>,
}

/// The answer to "where would this message go".
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    /// Why a client's publish would be refused (an internal exchange); the
    /// route is still shown, as an exchange-to-exchange binding or
    /// dead-lettering would route it.
    pub refused: Option<String>,
    /// The extra routing keys from the `CC` and `BCC` headers.
    pub cc: Vec<String>,
    pub route: Route,
    pub dead_letters: Vec<DeadLetterStep>,
}

/// Records what [`VHost::traverse`] does.
struct Recorder {
    route: Route,
}

impl Watch for Recorder {
    fn exchange(
        &mut self,
        exchange: &Exchange,
        router: &dyn Router,
        key: &str,
        cc: &[ShortStr],
        headers: Option<&FieldTable>,
    ) {
        let mut matched: Vec<(Binding, String)> = Vec::new();
        for k in std::iter::once(key).chain(cc.iter().map(ShortStr::as_str)) {
            for b in router.matching(k, headers) {
                if !matched.iter().any(|(m, _)| *m == b) {
                    matched.push((b, k.to_string()));
                }
            }
        }
        self.route.hops.push(Hop {
            exchange: exchange.name.to_string(),
            kind: exchange.type_name(),
            matched,
            alternate: None,
        });
    }

    fn alternate(&mut self, from: &Exchange, to: &str) {
        if let Some(hop) = self
            .route
            .hops
            .iter_mut()
            .rev()
            .find(|h| h.exchange == *from.name)
        {
            hop.alternate = Some(to.to_string());
        }
    }

    fn missing_exchange(&mut self, name: &str) {
        self.route.missing.push(name.to_string());
    }
}

impl VHost {
    /// Where `message` (its routing key, headers and `x-delay`), published to
    /// `exchange` ("" is the default exchange) with the extra keys `cc`, would
    /// go now, and where dead-lettered copies would go from each queue with a
    /// dead-letter exchange. 404 if the exchange does not exist.
    pub fn trace(
        &self,
        exchange: &str,
        message: &Arc<Message>,
        cc: &[ShortStr],
        now: u64,
    ) -> AmqpResult<Trace> {
        let (route, queues, refused) = self.explain(exchange, message, cc, PublishFrom::Client)?;
        let mut dead_letters = Vec::new();
        let mut next: Vec<(Arc<Queue>, Arc<Message>)> = queues
            .into_iter()
            .map(|q| (q, Arc::clone(message)))
            .collect();
        for depth in 1..=DEAD_LETTER_DEPTH {
            let mut further = Vec::new();
            for (q, m) in next {
                let args = q.args();
                let Some(dlx) = args.dead_letter_exchange.as_deref() else {
                    continue;
                };
                let key = args.dead_letter_routing_key.as_deref();
                // Expiry stands for every reason but rejection (see `cycle`).
                let copy =
                    dead_letter::dead_letter(&m, q.name(), Reason::Expired, dlx, key, now / 1000);
                let mut step = DeadLetterStep {
                    queue: q.name().to_string(),
                    depth,
                    exchange: dlx.to_string(),
                    routing_key: copy.routing_key.to_string(),
                    route: None,
                    cycle: Vec::new(),
                };
                // Queues dead-letter as `publish` does: no CC keys.
                if let Ok((route, reached, _)) =
                    self.explain(dlx, &copy, &[], PublishFrom::DeadLetter)
                {
                    for r in reached {
                        if dead_letter::is_cycle(&copy, r.name()) {
                            step.cycle.push(r.name().to_string());
                        } else {
                            further.push((r, Arc::clone(&copy)));
                        }
                    }
                    step.route = Some(route);
                }
                dead_letters.push(step);
            }
            if further.is_empty() {
                break;
            }
            next = further;
        }
        Ok(Trace {
            refused,
            cc: cc.iter().map(|k| k.as_str().to_string()).collect(),
            route,
            dead_letters,
        })
    }

    /// The route of `message` from `exchange` as `from` would publish it, the
    /// queues it reaches, and why a client would be refused.
    fn explain(
        &self,
        exchange: &str,
        message: &Arc<Message>,
        cc: &[ShortStr],
        from: PublishFrom,
    ) -> AmqpResult<(Route, Vec<Arc<Queue>>, Option<String>)> {
        let key = message.routing_key.as_str();
        let mut out = Vec::new();
        let mut recorder = Recorder {
            route: Route::default(),
        };
        let mut refused = None;
        if exchange.is_empty() {
            route_default(&self.queues.read(), key, cc, &mut out);
            // The default exchange's implicit binding to each queue, by its name.
            let matched = out
                .iter()
                .map(|q| {
                    let b = Binding {
                        destination: Destination::Queue(q.name().into()),
                        routing_key: q.name().to_string(),
                        arguments: FieldTable::new(),
                    };
                    (b, q.name().to_string())
                })
                .collect();
            recorder.route.hops.push(Hop {
                exchange: String::new(),
                kind: "direct",
                matched,
                alternate: None,
            });
        } else {
            let exchanges = self.exchanges.read();
            let ex = exchanges
                .get(exchange)
                .ok_or_else(|| self.no_exchange(exchange))?;
            refused = self.refuses(ex, from).map(|e| e.text);
            let mut cc = cc;
            if ex.delayed && from != PublishFrom::Delayed {
                if let Some(delay) = super::delayed::delay_of(message) {
                    recorder.route.delayed_ms = Some(delay);
                    // Released through `publish`: routed without the CC keys.
                    cc = &[];
                }
            }
            let headers = message.properties.headers.as_ref();
            let queues = self.queues.read();
            self.traverse(
                &exchanges,
                &queues,
                ex,
                key,
                cc,
                headers,
                &mut out,
                &mut recorder,
            );
        }
        let mut route = recorder.route;
        route.queues = out.iter().map(|q| q.name().to_string()).collect();
        Ok((route, out, refused))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::message::MemoryBudget;
    use crate::broker::vhost::{ExchangeDeclare, QueueDeclare};
    use crate::config::VHostLimits;
    use crate::wire::{BasicProperties, FieldValue};
    use bytes::Bytes;

    fn vhost() -> Arc<VHost> {
        VHost::new("/", None, MemoryBudget::new(0), VHostLimits::default())
    }

    fn exchange(v: &VHost, name: &str, kind: &str, args: &[(&str, FieldValue)]) {
        v.declare_exchange(&ExchangeDeclare {
            name: name.into(),
            kind: kind.into(),
            arguments: table(args),
            ..Default::default()
        })
        .expect("exchange");
    }

    fn internal(v: &VHost, name: &str) {
        v.declare_exchange(&ExchangeDeclare {
            name: name.into(),
            kind: "fanout".into(),
            internal: true,
            ..Default::default()
        })
        .expect("exchange");
    }

    fn queue(v: &VHost, name: &str, args: &[(&str, FieldValue)]) {
        v.declare_queue(
            &QueueDeclare {
                name: name.into(),
                arguments: table(args),
                ..Default::default()
            },
            0,
            0,
        )
        .expect("queue");
    }

    fn table(args: &[(&str, FieldValue)]) -> FieldTable {
        FieldTable(
            args.iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        )
    }

    fn s(v: &str) -> FieldValue {
        FieldValue::string(v)
    }

    fn bind_q(v: &VHost, ex: &str, q: &str, key: &str, args: &[(&str, FieldValue)]) {
        v.bind(ex, Destination::Queue(q.into()), key, &table(args), 0)
            .expect("bind");
    }

    fn bind_e(v: &VHost, ex: &str, dest: &str, key: &str) {
        v.bind(
            ex,
            Destination::Exchange(dest.into()),
            key,
            &FieldTable::new(),
            0,
        )
        .expect("bind");
    }

    fn msg(key: &str, headers: &[(&str, FieldValue)]) -> Arc<Message> {
        let props = BasicProperties {
            headers: (!headers.is_empty()).then(|| table(headers)),
            ..Default::default()
        };
        Message::new("", key, props, Bytes::new())
    }

    fn trace(v: &VHost, ex: &str, m: &Arc<Message>) -> Trace {
        v.trace(ex, m, &[], 0).expect("trace")
    }

    /// The queues a real publish reaches, to hold the trace against.
    fn published(v: &VHost, ex: &str, m: &Arc<Message>) -> Vec<String> {
        let mut out = Vec::new();
        v.route(ex, m, &[], PublishFrom::Client, 0, &mut out)
            .expect("route");
        let mut names: Vec<String> = out.iter().map(|q| q.name().to_string()).collect();
        names.sort();
        names
    }

    fn sorted(mut v: Vec<String>) -> Vec<String> {
        v.sort();
        v
    }

    fn matched(hop: &Hop) -> Vec<(String, String)> {
        hop.matched
            .iter()
            .map(|(b, _)| {
                let d = match &b.destination {
                    Destination::Queue(n) => format!("q:{n}"),
                    Destination::Exchange(n) => format!("e:{n}"),
                };
                (d, b.routing_key.clone())
            })
            .collect()
    }

    /// Every case: the trace's queues are the ones publishing reaches.
    fn agrees(v: &VHost, ex: &str, m: &Arc<Message>) -> Trace {
        let t = trace(v, ex, m);
        assert_eq!(sorted(t.route.queues.clone()), published(v, ex, m), "{ex}");
        t
    }

    #[test]
    fn direct_shows_the_bindings_with_the_key() {
        let v = vhost();
        exchange(&v, "d", "direct", &[]);
        for q in ["a", "b", "c"] {
            queue(&v, q, &[]);
        }
        bind_q(&v, "d", "a", "k", &[]);
        bind_q(&v, "d", "a", "k", &[("x", FieldValue::I32(1))]);
        bind_q(&v, "d", "b", "k", &[]);
        bind_q(&v, "d", "c", "other", &[]);
        let t = agrees(&v, "d", &msg("k", &[]));
        assert_eq!(t.route.hops.len(), 1);
        let hop = &t.route.hops[0];
        assert_eq!((hop.exchange.as_str(), hop.kind), ("d", "direct"));
        assert_eq!(
            matched(hop),
            [
                ("q:a".into(), "k".into()),
                ("q:a".into(), "k".into()),
                ("q:b".into(), "k".into())
            ]
        );
        assert_eq!(sorted(t.route.queues), ["a", "b"]);
        assert!(agrees(&v, "d", &msg("none", &[])).route.queues.is_empty());
    }

    #[test]
    fn fanout_matches_every_binding() {
        let v = vhost();
        exchange(&v, "f", "fanout", &[]);
        queue(&v, "a", &[]);
        queue(&v, "b", &[]);
        bind_q(&v, "f", "a", "x", &[]);
        bind_q(&v, "f", "b", "", &[]);
        let t = agrees(&v, "f", &msg("anything", &[]));
        assert_eq!(matched(&t.route.hops[0]).len(), 2);
    }

    #[test]
    fn topic_shows_the_patterns_that_match() {
        let v = vhost();
        exchange(&v, "t", "topic", &[]);
        for q in ["eu", "all", "orders", "none"] {
            queue(&v, q, &[]);
        }
        bind_q(&v, "t", "eu", "*.eu.#", &[]);
        bind_q(&v, "t", "all", "#", &[]);
        bind_q(&v, "t", "orders", "orders.*.created", &[]);
        bind_q(&v, "t", "orders", "orders.#", &[]);
        bind_q(&v, "t", "none", "payments.*", &[]);
        let t = agrees(&v, "t", &msg("orders.eu.created", &[]));
        let m = matched(&t.route.hops[0]);
        assert_eq!(
            m,
            [
                ("q:all".into(), "#".into()),
                ("q:eu".into(), "*.eu.#".into()),
                ("q:orders".into(), "orders.*.created".into()),
                ("q:orders".into(), "orders.#".into()),
            ]
        );
        let t = agrees(&v, "t", &msg("orders", &[]));
        assert_eq!(
            matched(&t.route.hops[0]),
            [
                ("q:all".into(), "#".into()),
                ("q:orders".into(), "orders.#".into())
            ]
        );
    }

    #[test]
    fn headers_x_match_variants() {
        let v = vhost();
        exchange(&v, "h", "headers", &[]);
        for q in ["all", "any", "allx", "anyx"] {
            queue(&v, q, &[]);
        }
        let both = |m: &str| vec![("x-match", s(m)), ("a", s("1")), ("x-b", s("2"))];
        bind_q(&v, "h", "all", "", &both("all"));
        bind_q(&v, "h", "any", "", &both("any"));
        bind_q(&v, "h", "allx", "", &both("all-with-x"));
        bind_q(&v, "h", "anyx", "", &both("any-with-x"));
        let reached = |headers: &[(&str, FieldValue)]| {
            let t = agrees(&v, "h", &msg("", headers));
            let m: Vec<String> = matched(&t.route.hops[0]).into_iter().map(|x| x.0).collect();
            assert_eq!(m.len(), t.route.queues.len());
            sorted(t.route.queues)
        };
        // `a` alone: all and any match (x- arguments do not count), any-with-x too.
        assert_eq!(reached(&[("a", s("1"))]), ["all", "any", "anyx"]);
        // Both: everything.
        assert_eq!(
            reached(&[("a", s("1")), ("x-b", s("2"))]),
            ["all", "allx", "any", "anyx"]
        );
        // Only the x- header: any-with-x alone.
        assert_eq!(reached(&[("x-b", s("2"))]), ["anyx"]);
        assert!(reached(&[]).is_empty());
    }

    #[test]
    fn exchange_to_exchange_and_cycles() {
        let v = vhost();
        exchange(&v, "a", "topic", &[]);
        exchange(&v, "b", "fanout", &[]);
        queue(&v, "q", &[]);
        bind_e(&v, "a", "b", "k.#");
        bind_e(&v, "b", "a", "");
        bind_q(&v, "b", "q", "", &[]);
        let t = agrees(&v, "a", &msg("k.1", &[]));
        let names: Vec<&str> = t.route.hops.iter().map(|h| h.exchange.as_str()).collect();
        assert_eq!(names, ["a", "b"], "each exchange once, the cycle ends");
        assert_eq!(matched(&t.route.hops[0]), [("e:b".into(), "k.#".into())]);
        assert_eq!(t.route.queues, ["q"]);
        // No match at a: nothing further.
        let t = agrees(&v, "a", &msg("other", &[]));
        assert_eq!(t.route.hops.len(), 1);
        assert!(t.route.queues.is_empty());
    }

    #[test]
    fn alternate_exchange_when_nothing_matches() {
        let v = vhost();
        exchange(&v, "unrouted", "fanout", &[]);
        exchange(
            &v,
            "main",
            "direct",
            &[("alternate-exchange", s("unrouted"))],
        );
        exchange(&v, "broken", "direct", &[("alternate-exchange", s("gone"))]);
        queue(&v, "hit", &[]);
        queue(&v, "lost", &[]);
        bind_q(&v, "main", "hit", "k", &[]);
        bind_q(&v, "unrouted", "lost", "", &[]);
        let t = agrees(&v, "main", &msg("k", &[]));
        assert_eq!(t.route.hops[0].alternate, None);
        assert_eq!(t.route.queues, ["hit"]);
        let t = agrees(&v, "main", &msg("x", &[]));
        assert_eq!(t.route.hops[0].alternate.as_deref(), Some("unrouted"));
        assert_eq!(t.route.hops[1].exchange, "unrouted");
        assert_eq!(t.route.queues, ["lost"]);
        let t = agrees(&v, "broken", &msg("x", &[]));
        assert_eq!(t.route.missing, ["gone"]);
    }

    #[test]
    fn cc_and_bcc_keys_route_as_publishing_does() {
        let v = vhost();
        exchange(&v, "d", "direct", &[]);
        queue(&v, "a", &[]);
        queue(&v, "b", &[]);
        bind_q(&v, "d", "a", "ka", &[]);
        bind_q(&v, "d", "b", "kb", &[]);
        let mut props = BasicProperties {
            headers: Some(table(&[("BCC", FieldValue::Array(vec![s("kb")]))])),
            ..Default::default()
        };
        let cc = crate::broker::cc::take_cc_keys(&mut props).expect("cc");
        let m = Message::new("d", "ka", props, Bytes::new());
        let t = v.trace("d", &m, &cc, 0).expect("trace");
        assert_eq!(t.cc, ["kb"]);
        assert_eq!(sorted(t.route.queues.clone()), ["a", "b"]);
        let by: Vec<&str> = t.route.hops[0]
            .matched
            .iter()
            .map(|(_, k)| k.as_str())
            .collect();
        assert_eq!(by, ["ka", "kb"]);
        let mut out = Vec::new();
        v.route("d", &m, &cc, PublishFrom::Client, 0, &mut out)
            .expect("route");
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn dead_letter_copies_and_their_cycles() {
        let v = vhost();
        exchange(&v, "work", "direct", &[]);
        exchange(&v, "dlx", "direct", &[]);
        queue(
            &v,
            "jobs",
            &[
                ("x-dead-letter-exchange", s("dlx")),
                ("x-dead-letter-routing-key", s("retry")),
            ],
        );
        // retry dead-letters back to jobs by expiry: a cycle for expired copies.
        queue(
            &v,
            "retry",
            &[
                ("x-dead-letter-exchange", s("work")),
                ("x-dead-letter-routing-key", s("job")),
            ],
        );
        queue(&v, "audit", &[]);
        bind_q(&v, "work", "jobs", "job", &[]);
        bind_q(&v, "dlx", "retry", "retry", &[]);
        bind_q(&v, "dlx", "audit", "retry", &[]);
        let t = agrees(&v, "work", &msg("job", &[]));
        assert_eq!(t.route.queues, ["jobs"]);
        let steps: Vec<(&str, usize, &str, &str)> = t
            .dead_letters
            .iter()
            .map(|d| {
                (
                    d.queue.as_str(),
                    d.depth,
                    d.exchange.as_str(),
                    d.routing_key.as_str(),
                )
            })
            .collect();
        assert_eq!(
            steps,
            [("jobs", 1, "dlx", "retry"), ("retry", 2, "work", "job")]
        );
        let first = t.dead_letters[0].route.as_ref().expect("dlx exists");
        assert_eq!(sorted(first.queues.clone()), ["audit", "retry"]);
        assert!(t.dead_letters[0].cycle.is_empty());
        // The copy from retry reaches jobs again: dropped unless it was rejected.
        assert_eq!(t.dead_letters[1].cycle, ["jobs"]);
    }

    #[test]
    fn missing_dead_letter_exchange_and_internal_and_default() {
        let v = vhost();
        queue(&v, "q", &[("x-dead-letter-exchange", s("nowhere"))]);
        let t = agrees(&v, "", &msg("q", &[]));
        assert_eq!(t.route.hops[0].exchange, "");
        assert_eq!(matched(&t.route.hops[0]), [("q:q".into(), "q".into())]);
        assert_eq!(t.dead_letters.len(), 1);
        assert_eq!(t.dead_letters[0].route, None);
        internal(&v, "inner");
        bind_q(&v, "inner", "q", "", &[]);
        let t = trace(&v, "inner", &msg("", &[]));
        assert!(t.refused.as_deref().is_some_and(|r| r.contains("internal")));
        assert_eq!(t.route.queues, ["q"]);
        assert!(v.trace("absent", &msg("", &[]), &[], 0).is_err());
    }

    #[test]
    fn delayed_exchange_holds_then_routes() {
        let v = vhost();
        exchange(
            &v,
            "later",
            "x-delayed-message",
            &[("x-delayed-type", s("direct"))],
        );
        queue(&v, "q", &[]);
        bind_q(&v, "later", "q", "k", &[]);
        let m = msg("k", &[("x-delay", FieldValue::I32(500))]);
        let t = trace(&v, "later", &m);
        assert_eq!(t.route.delayed_ms, Some(500));
        assert_eq!(t.route.queues, ["q"]);
        assert_eq!(v.delayed.len(), 0, "the trace holds nothing");
    }
}
