//! Publishing: route a message from an exchange to its queues and enqueue it in
//! each. This is the one place "route, then enqueue" is written: AMQP
//! basic.publish, the admin API's publish, dead-lettering and delayed release all
//! call [`VHost::publish`].
//!
//! Routing follows exchange-to-exchange bindings and alternate exchanges (the
//! `alternate-exchange` argument, or a policy's), visiting each exchange and
//! queue once so cycles end. A delayed exchange takes a message with a positive
//! `x-delay` to hold instead of routing it (see [`super::delayed`]). Each
//! exchange that routes a message counts it in and, if it went anywhere, out
//! ([`crate::broker::exchange::ExchangeStats`], relaxed atomics).

use super::{Exchange, VHost};
use crate::broker::exchange::{Destination, Router};
use crate::broker::firehose;
use crate::broker::message::{Message, ShortStr};
use crate::broker::queue::{dead_letter, Enqueued, Queue};
use crate::error::{AmqpError, AmqpResult};
use crate::wire::FieldTable;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// Who publishes: decides what routing allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PublishFrom {
    /// A client (basic.publish, the admin API): internal exchanges refuse it.
    Client,
    /// A queue dead-lettering a message: internal exchanges are allowed, and a
    /// queue the message would cycle back to (with no rejection) is skipped.
    DeadLetter,
    /// A delayed exchange releasing a held message: routed now, not held again.
    Delayed,
    /// The firehose tracer's copy of a message, to `amq.rabbitmq.trace`
    /// (internal: allowed).
    Firehose,
}

/// What became of a published message.
#[derive(Debug, Clone, Default)]
pub struct Published {
    /// It reached at least one queue, or a delayed exchange holds it. False is
    /// what basic.return (mandatory) and the unroutable counter look at.
    pub routed: bool,
    /// At least one queue accepted it, or a delayed exchange holds it.
    pub accepted: bool,
    /// A delayed exchange holds it.
    pub held: bool,
    /// At least one queue refused it (`x-overflow` reject-publish): nack a confirm.
    pub rejected: bool,
    /// At least one queue wrote it to the store: confirm after the next flush.
    pub durable: bool,
    /// Clustered: copies went to queues homed on other nodes; confirm once
    /// the ticket settles (nack if it fails).
    pub forwarded: Option<Arc<crate::broker::remote::Ticket>>,
}

impl Published {
    const HELD: Published = Published {
        routed: true,
        accepted: true,
        held: true,
        rejected: false,
        durable: false,
        forwarded: None,
    };
}

impl VHost {
    /// Route `message` from `exchange` ("" is the default exchange) and enqueue it
    /// in every queue reached, at time `now`. 404 if the exchange does not exist;
    /// 403 for a client publishing to an internal exchange.
    pub fn publish(
        &self,
        exchange: &str,
        message: &Arc<Message>,
        from: PublishFrom,
        now: u64,
    ) -> AmqpResult<Published> {
        self.publish_cc(exchange, message, &[], from, now)
    }

    /// [`Self::publish`], routed with each of `cc` as well as the message's
    /// routing key (the `CC` / `BCC` headers, see [`crate::broker::cc`]); each
    /// queue reached gets the message once. A delayed exchange holds the message
    /// and routes it with its routing key and `CC` header only.
    pub fn publish_cc(
        &self,
        exchange: &str,
        message: &Arc<Message>,
        cc: &[ShortStr],
        from: PublishFrom,
        now: u64,
    ) -> AmqpResult<Published> {
        self.publish_routed(exchange, message, cc, from, now)
            .map(|(published, _)| published)
    }

    /// A client's publish ([`Self::publish_cc`] from [`PublishFrom::Client`]);
    /// while the vhost's tracing is on, it is also traced to the firehose
    /// with the queues it reached, as `tap` names its publisher.
    pub fn publish_client(
        &self,
        exchange: &str,
        message: &Arc<Message>,
        cc: &[ShortStr],
        tap: &firehose::Tap<'_>,
        now: u64,
    ) -> AmqpResult<Published> {
        if !self.tracing() {
            return self.publish_cc(exchange, message, cc, PublishFrom::Client, now);
        }
        let (published, queues) =
            self.publish_routed(exchange, message, cc, PublishFrom::Client, now)?;
        let names: Vec<&str> = queues.iter().map(|q| q.name()).collect();
        firehose::published(self, message, cc, &names, tap, now);
        Ok(published)
    }

    /// [`Self::publish_cc`], and the queues routing reached (none when a
    /// delayed exchange holds the message).
    fn publish_routed(
        &self,
        exchange: &str,
        message: &Arc<Message>,
        cc: &[ShortStr],
        from: PublishFrom,
        now: u64,
    ) -> AmqpResult<(Published, Vec<Arc<Queue>>)> {
        let mut queues = Vec::new();
        if let Some(durable) = self.route(exchange, message, cc, from, now, &mut queues)? {
            let held = Published {
                durable,
                ..Published::HELD
            };
            return Ok((held, queues));
        }
        let mut out = Published {
            routed: !queues.is_empty(),
            ..Published::default()
        };
        for q in &queues {
            if from == PublishFrom::DeadLetter && dead_letter::is_cycle(message, q.name()) {
                continue;
            }
            // Clustered: a queue homed on another node keeps nothing here.
            if let Some(home) = q.remote() {
                let ticket = out
                    .forwarded
                    .get_or_insert_with(crate::broker::remote::Ticket::new);
                home.forward(&self.name, q.name(), message, ticket);
                out.accepted = true;
                continue;
            }
            // Clustered quorum queue served here: proposed to its Raft group;
            // it enters the queue when committed, the confirm waits for that.
            if let Some(replica) = q.replica() {
                let ticket = out
                    .forwarded
                    .get_or_insert_with(crate::broker::remote::Ticket::new);
                replica.enqueue(message, ticket);
                out.accepted = true;
                continue;
            }
            match q.enqueue(Arc::clone(message), now) {
                Enqueued::Rejected => out.rejected = true,
                Enqueued::Accepted { durable } => {
                    out.accepted = true;
                    out.durable |= durable;
                }
            }
        }
        if let Some(t) = &out.forwarded {
            t.seal();
        }
        Ok((out, queues))
    }

    /// Enqueue a message another node routed to this node's queue `queue`
    /// (its home): the same enqueue as a local publish, with no routing.
    /// None when the queue is not here (deleted, or homed elsewhere).
    pub fn enqueue_forwarded(
        &self,
        queue: &str,
        message: Arc<Message>,
        now: u64,
    ) -> Option<Enqueued> {
        let q = self.queues.read().get(queue).cloned()?;
        if q.remote().is_some() || q.is_deleted() {
            return None;
        }
        Some(q.enqueue(message, now))
    }

    /// The queues a message published to `exchange` reaches, pushed into `out`.
    /// Returns `Some(durable)` when a delayed exchange took the message to release
    /// later (`durable`: it was written to the store).
    pub(super) fn route(
        &self,
        exchange: &str,
        message: &Arc<Message>,
        cc: &[ShortStr],
        from: PublishFrom,
        now: u64,
        out: &mut Vec<Arc<Queue>>,
    ) -> AmqpResult<Option<bool>> {
        let key = message.routing_key.as_str();
        if exchange.is_empty() {
            route_default(&self.queues.read(), key, cc, out);
            self.default_exchange.stats.routed(!out.is_empty());
            return Ok(None);
        }
        let exchanges = self.exchanges.read();
        let ex = exchanges
            .get(exchange)
            .ok_or_else(|| self.no_exchange(exchange))?;
        if let Some(refused) = self.refuses(ex, from) {
            return Err(refused);
        }
        if ex.delayed && from != PublishFrom::Delayed {
            if let Some(delay) = super::delayed::delay_of(message) {
                let store = self
                    .delayed_store()
                    .filter(|_| ex.durable && message.is_persistent());
                let durable = store.is_some();
                self.delayed.hold(
                    now.saturating_add(delay),
                    Arc::clone(&ex.name),
                    Arc::clone(message),
                    store,
                );
                self.want_ticks();
                return Ok(Some(durable));
            }
        }
        let headers = message.properties.headers.as_ref();
        let queues = self.queues.read();
        self.traverse(&exchanges, &queues, ex, key, cc, headers, out, &mut Count);
        Ok(None)
    }

    /// Why `from` may not publish to `ex`: a client publishing to an internal
    /// exchange gets 403.
    pub(super) fn refuses(&self, ex: &Exchange, from: PublishFrom) -> Option<AmqpError> {
        (from == PublishFrom::Client && ex.internal).then(|| {
            AmqpError::access_refused(format!(
                "cannot publish to internal exchange '{}' in vhost '{}'",
                ex.name, self.name
            ))
        })
    }

    /// Route from exchange `start` (not the default exchange) with `key` and
    /// each of `cc`, following exchange-to-exchange bindings and alternate
    /// exchanges, visiting each exchange and queue once so cycles end; the
    /// queues reached are pushed into `out`. `watch` hears every step (a trace);
    /// publishing passes [`Count`].
    #[allow(clippy::too_many_arguments)]
    pub(super) fn traverse<W: Watch>(
        &self,
        exchanges: &HashMap<String, Arc<Exchange>>,
        queues: &HashMap<String, Arc<Queue>>,
        start: &Exchange,
        key: &str,
        cc: &[ShortStr],
        headers: Option<&FieldTable>,
        out: &mut Vec<Arc<Queue>>,
        watch: &mut W,
    ) {
        let mut seen_ex: HashSet<Arc<str>> = HashSet::new();
        let mut seen_q: HashSet<Arc<str>> = HashSet::new();
        let mut pending = vec![Destination::Exchange(Arc::clone(&start.name))];
        let mut dests = Vec::new();
        while let Some(d) = pending.pop() {
            match d {
                Destination::Queue(name) => {
                    if seen_q.insert(Arc::clone(&name)) {
                        if let Some(q) = queues.get(&*name) {
                            out.push(Arc::clone(q));
                        }
                    }
                }
                Destination::Exchange(name) => {
                    if !seen_ex.insert(Arc::clone(&name)) {
                        continue;
                    }
                    let Some(next) = exchanges.get(&*name) else {
                        watch.missing_exchange(&name);
                        continue;
                    };
                    dests.clear();
                    let router = next.router.read();
                    router.route(key, headers, &mut dests);
                    for k in cc {
                        router.route(k, headers, &mut dests);
                    }
                    watch.exchange(next, &**router, key, cc, headers);
                    drop(router);
                    watch.routed(next, !dests.is_empty());
                    if dests.is_empty() {
                        let ae = next
                            .alternate_exchange()
                            .map(str::to_string)
                            .or_else(|| self.policies.alternate_exchange(&self.name, &next.name));
                        if let Some(ae) = ae {
                            watch.alternate(next, &ae);
                            pending.push(Destination::Exchange(ae.into()));
                        }
                    }
                    pending.append(&mut dests);
                }
            }
        }
    }
}

/// The default exchange: the queue named by the routing key (and by each of `cc`).
pub(super) fn route_default(
    queues: &HashMap<String, Arc<Queue>>,
    key: &str,
    cc: &[ShortStr],
    out: &mut Vec<Arc<Queue>>,
) {
    for k in std::iter::once(key).chain(cc.iter().map(ShortStr::as_str)) {
        if let Some(q) = queues.get(k) {
            if !out.iter().any(|o| Arc::ptr_eq(o, q)) {
                out.push(Arc::clone(q));
            }
        }
    }
}

/// What routing tells as it goes, for a trace to explain a route. Publishing
/// passes [`Count`], which only counts each exchange's messages.
pub(super) trait Watch {
    /// `exchange` was reached, routing table `router` (read-locked), routed
    /// with `key` and each of `cc`.
    fn exchange(
        &mut self,
        _exchange: &Exchange,
        _router: &dyn Router,
        _key: &str,
        _cc: &[ShortStr],
        _headers: Option<&FieldTable>,
    ) {
    }
    /// `exchange` routed the message; `out`: to at least one destination.
    fn routed(&mut self, _exchange: &Exchange, _out: bool) {}
    /// Nothing matched at `from`: the message goes on to `to`, its alternate exchange.
    fn alternate(&mut self, _from: &Exchange, _to: &str) {}
    /// An exchange a binding or an alternate exchange names does not exist.
    fn missing_exchange(&mut self, _name: &str) {}
}

/// The publish path's [`Watch`]: counts each exchange's messages in and out
/// ([`crate::broker::exchange::ExchangeStats`], relaxed atomics); a trace does not.
pub(super) struct Count;

impl Watch for Count {
    #[inline]
    fn routed(&mut self, exchange: &Exchange, out: bool) {
        exchange.stats.routed(out);
    }

    #[inline]
    fn alternate(&mut self, from: &Exchange, _to: &str) {
        from.stats.alternated();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::exchange::ExchangeTotals;
    use crate::broker::message::MemoryBudget;
    use crate::broker::vhost::{ExchangeDeclare, QueueDeclare};
    use crate::config::VHostLimits;
    use crate::wire::{BasicProperties, FieldValue};
    use bytes::Bytes;

    fn vhost() -> Arc<VHost> {
        let v = VHost::new("/", None, MemoryBudget::new(0), VHostLimits::default());
        for (name, kind, ae) in [
            ("ae", "fanout", None),
            ("in", "direct", Some("ae")),
            ("mid", "fanout", None),
            ("none", "direct", None),
        ] {
            let arguments = FieldTable(
                ae.map(|a| ("alternate-exchange".to_string(), FieldValue::string(a)))
                    .into_iter()
                    .collect(),
            );
            v.declare_exchange(&ExchangeDeclare {
                name: name.into(),
                kind: kind.into(),
                arguments,
                ..Default::default()
            })
            .expect("exchange");
        }
        for q in ["q", "lost"] {
            v.declare_queue(
                &QueueDeclare {
                    name: q.into(),
                    ..Default::default()
                },
                0,
                0,
            )
            .expect("queue");
        }
        let none = FieldTable::new();
        v.bind("in", Destination::Exchange("mid".into()), "k", &none, 0)
            .expect("bind");
        v.bind("mid", Destination::Queue("q".into()), "", &none, 0)
            .expect("bind");
        v.bind("ae", Destination::Queue("lost".into()), "", &none, 0)
            .expect("bind");
        v
    }

    fn send(v: &VHost, ex: &str, key: &str) {
        let m = Message::new(ex, key, BasicProperties::default(), Bytes::new());
        v.publish(ex, &m, PublishFrom::Client, 0).expect("publish");
    }

    fn totals(v: &VHost, ex: &str) -> (u64, u64, u64) {
        let ExchangeTotals {
            publish_in,
            publish_out,
            alternate_out,
        } = v.exchange(ex).expect("exchange").stats.totals();
        (publish_in, publish_out, alternate_out)
    }

    #[test]
    fn exchanges_count_in_and_out_along_the_route_and_a_trace_counts_nothing() {
        let v = vhost();
        for _ in 0..3 {
            send(&v, "in", "k"); // in -> mid -> q
        }
        send(&v, "in", "other"); // in -> ae -> lost
        send(&v, "none", "x"); // nowhere
        send(&v, "", "q");
        send(&v, "", "no-such-queue");
        let m = Message::new("in", "k", BasicProperties::default(), Bytes::new());
        v.trace("in", &m, &[], 0).expect("trace");
        assert_eq!(totals(&v, "in"), (4, 4, 1));
        assert_eq!(totals(&v, "mid"), (3, 3, 0));
        assert_eq!(totals(&v, "ae"), (1, 1, 0));
        assert_eq!(totals(&v, "none"), (1, 0, 0));
        assert_eq!(totals(&v, ""), (2, 1, 0));
    }
}
