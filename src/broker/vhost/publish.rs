//! Publishing: route a message from an exchange to its queues and enqueue it in
//! each. This is the one place "route, then enqueue" is written: AMQP
//! basic.publish, the admin API's publish, dead-lettering and delayed release all
//! call [`VHost::publish`].
//!
//! Routing follows exchange-to-exchange bindings and alternate exchanges (the
//! `alternate-exchange` argument, or a policy's), visiting each exchange and
//! queue once so cycles end. A delayed exchange takes a message with a positive
//! `x-delay` to hold instead of routing it (see [`super::delayed`]).

use super::VHost;
use crate::broker::exchange::Destination;
use crate::broker::message::{Message, ShortStr};
use crate::broker::queue::{dead_letter, Enqueued, Queue};
use crate::error::{AmqpError, AmqpResult};
use std::collections::HashSet;
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
}

/// What became of a published message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
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
}

impl Published {
    const HELD: Published = Published {
        routed: true,
        accepted: true,
        held: true,
        rejected: false,
        durable: false,
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
        let mut queues = Vec::new();
        if let Some(durable) = self.route(exchange, message, cc, from, now, &mut queues)? {
            return Ok(Published {
                durable,
                ..Published::HELD
            });
        }
        let mut out = Published {
            routed: !queues.is_empty(),
            ..Published::default()
        };
        for q in &queues {
            if from == PublishFrom::DeadLetter && dead_letter::is_cycle(message, q.name()) {
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
        Ok(out)
    }

    /// The queues a message published to `exchange` reaches, pushed into `out`.
    /// Returns `Some(durable)` when a delayed exchange took the message to release
    /// later (`durable`: it was written to the store).
    fn route(
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
            let queues = self.queues.read();
            for k in std::iter::once(key).chain(cc.iter().map(ShortStr::as_str)) {
                if let Some(q) = queues.get(k) {
                    if !out.iter().any(|o| Arc::ptr_eq(o, q)) {
                        out.push(Arc::clone(q));
                    }
                }
            }
            return Ok(None);
        }
        let exchanges = self.exchanges.read();
        let ex = exchanges
            .get(exchange)
            .ok_or_else(|| self.no_exchange(exchange))?;
        if from == PublishFrom::Client && ex.internal {
            return Err(AmqpError::access_refused(format!(
                "cannot publish to internal exchange '{exchange}' in vhost '{}'",
                self.name
            )));
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
                return Ok(Some(durable));
            }
        }
        let headers = message.properties.headers.as_ref();
        let queues = self.queues.read();
        let mut seen_ex: HashSet<Arc<str>> = HashSet::new();
        let mut seen_q: HashSet<Arc<str>> = HashSet::new();
        let mut pending = vec![Destination::Exchange(Arc::clone(&ex.name))];
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
                        continue;
                    };
                    dests.clear();
                    let router = next.router.read();
                    router.route(key, headers, &mut dests);
                    for k in cc {
                        router.route(k, headers, &mut dests);
                    }
                    drop(router);
                    if dests.is_empty() {
                        let ae = next
                            .alternate_exchange()
                            .map(str::to_string)
                            .or_else(|| self.policies.alternate_exchange(&self.name, &next.name));
                        if let Some(ae) = ae {
                            pending.push(Destination::Exchange(ae.into()));
                        }
                    }
                    pending.append(&mut dests);
                }
            }
        }
        Ok(None)
    }
}
