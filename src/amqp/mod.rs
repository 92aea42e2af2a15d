//! The broker-facing side of AMQP channels: what exchange, queue, basic, confirm
//! and tx methods do to the broker, one file per class. Pure code over the broker
//! API: no sockets, no clock (callers pass `now`). Replies go out through the
//! session's [`ChannelIo`]; errors come back as [`AmqpError`] for the session to
//! turn into channel.close or connection.close.

pub mod basic;
pub mod confirm;
pub mod exchange;
pub mod queue;
pub mod tx;

use crate::broker::auth::Access;
use crate::broker::message::{Entry, Message};
use crate::broker::queue::{Consumer, Credit, DeliverySink, Queue};
use crate::broker::remote::RemoteConsumer;
use crate::broker::vhost::VHost;
use crate::clock::Now;
use crate::error::{AmqpError, AmqpResult};
use crate::session::ChannelIo;
use crate::wire::Method;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

/// What a channel needs to know about its connection.
#[derive(Debug, Clone)]
pub struct ConnCtx {
    pub broker: Arc<crate::broker::Broker>,
    pub id: u64,
    /// The connection's name as the API shows it (`peer -> local`).
    pub name: String,
    pub vhost: Arc<VHost>,
    pub user: String,
    pub sink: Arc<dyn DeliverySink>,
    /// The client understands server-sent basic.cancel.
    pub cancel_notify: bool,
    /// Configured limits (consumers, consumer timeout); the vhost enforces its own.
    pub limits: crate::config::Limits,
    /// A connection logged in with an access token: its scopes, not the user's
    /// permission records, decide every resource and topic check.
    pub token: Option<Arc<crate::broker::oauth::Grant>>,
}

impl ConnCtx {
    /// Count on the broker's message counters and on its vhost's.
    #[inline]
    pub(crate) fn count(&self, f: impl Fn(&crate::broker::Counters)) {
        self.broker.count(&self.vhost, f);
    }

    /// What the firehose names for a message moved on `channel`.
    pub(crate) fn tap(&self, channel: u16) -> crate::broker::firehose::Tap<'_> {
        crate::broker::firehose::Tap {
            node: &self.broker.node,
            connection: &self.name,
            channel,
            user: &self.user,
        }
    }

    /// RabbitMQ's resource check: 403 unless the user's `access` regex in this vhost
    /// matches `name` (the default exchange is checked as `amq.default`).
    pub(crate) fn permit(&self, access: Access, kind: &str, name: &str) -> AmqpResult<()> {
        let name = if kind == "exchange" && name.is_empty() {
            "amq.default"
        } else {
            name
        };
        let allowed = match &self.token {
            Some(t) => t.allows(&self.vhost.name, access, name),
            None => self
                .broker
                .auth
                .allows(&self.vhost.name, &self.user, access, name),
        };
        if allowed {
            return Ok(());
        }
        Err(AmqpError::access_refused(format!(
            "access to {kind} '{name}' in vhost '{}' refused for user '{}'",
            self.vhost.name, self.user
        )))
    }

    /// RabbitMQ's topic authorisation: on a topic exchange, `access` (write for
    /// a publish, read for a bind or unbind) to each of `keys` must match the
    /// user's topic permission for that exchange, if there is one (403
    /// otherwise). Costs one atomic load while no topic permission exists.
    pub(crate) fn permit_topic<'k>(
        &self,
        access: Access,
        exchange: &str,
        keys: impl IntoIterator<Item = &'k str>,
    ) -> AmqpResult<()> {
        let auth = &self.broker.auth;
        if (self.token.is_none() && !auth.has_topic_permissions()) || exchange.is_empty() {
            return Ok(());
        }
        // A missing exchange is the caller's 404 to report.
        let Ok(ex) = self.vhost.exchange(exchange) else {
            return Ok(());
        };
        if ex.kind != crate::broker::exchange::ExchangeKind::Topic || ex.delayed {
            return Ok(());
        }
        let client_id = || self.broker.client_property(self.id, "client_id");
        for key in keys {
            let allowed = match &self.token {
                Some(t) => t.topic_allows(&self.vhost.name, exchange, access, key),
                None => auth.topic_allows(
                    &self.vhost.name,
                    &self.user,
                    exchange,
                    access,
                    key,
                    &client_id,
                ),
            };
            if !allowed {
                let what = match access {
                    Access::Write => "write",
                    Access::Read => "read",
                    Access::Configure => "configure",
                };
                return Err(AmqpError::access_refused(format!(
                    "{what} access to topic '{key}' in exchange '{exchange}' in vhost '{}' refused for user '{}'",
                    self.vhost.name, self.user
                )));
            }
        }
        Ok(())
    }
}

/// A message handed out and not yet acked.
#[derive(Debug)]
struct Unacked {
    tag: u64,
    queue: Arc<Queue>,
    entry: Entry,
    /// The consumer's window to give back on ack (None for basic.get). A
    /// remote consumer's delivery has the channel's window here when it holds
    /// a unit of it (`basic::settle_remote` gives that back; its own window
    /// is on the home node).
    credit: Option<Arc<Credit>>,
    /// When the consumer timeout runs out for it: (deadline, timeout in ms).
    deadline: Option<(Instant, u64)>,
    /// Clustered: delivered by a consumer on the queue's home node, with the
    /// home node's tag; settled there, never in the local `queue`.
    remote: Option<(RemoteConsumer, u64)>,
}

#[derive(Debug)]
struct ConsumerRef {
    queue: Arc<Queue>,
    consumer: Arc<Consumer>,
    /// Clustered: the consumer lives on the queue's home node.
    remote: Option<RemoteConsumer>,
    /// Clustered: the home node has not answered its opening yet (the
    /// `nowait` flag of its basic.consume): consume-ok waits for it.
    unanswered: Option<bool>,
}

/// Acknowledgement operations, kept aside inside a transaction.
#[derive(Debug, Clone, Copy)]
enum Settle {
    Ack {
        tag: u64,
        multiple: bool,
    },
    Reject {
        tag: u64,
        multiple: bool,
        requeue: bool,
    },
}

/// A transaction's publishes and settlements, applied at commit.
#[derive(Debug, Default)]
struct Tx {
    /// (exchange, mandatory, message, `CC` / `BCC` routing keys).
    publishes: Vec<(
        String,
        bool,
        Arc<Message>,
        Vec<crate::broker::message::ShortStr>,
    )>,
    settles: Vec<Settle>,
}

/// The broker-side state of one channel.
#[derive(Debug)]
pub struct Channel {
    consumers: HashMap<Arc<str>, ConsumerRef>,
    unacked: VecDeque<Unacked>,
    next_tag: u64,
    /// basic.qos global=false: the window of consumers started afterwards.
    consumer_prefetch: u32,
    /// basic.qos global=true: shared by all consumers of the channel.
    channel_credit: Arc<Credit>,
    flow: Arc<AtomicBool>,
    tx: Option<Tx>,
    /// The queue last declared on this channel (an empty queue name means it).
    last_queue: Option<String>,
    /// The hidden queue behind this channel's direct reply-to consumer.
    reply_queue: Option<String>,
    /// Clustered: publishes with copies forwarded to other nodes, by confirm
    /// sequence number (0: in the transaction being committed), until the
    /// connection waits on them with their confirm batch.
    pub(crate) forwarded: VecDeque<(u64, Arc<crate::broker::remote::Ticket>)>,
    /// Clustered: remote consumers cancelled by the client, released on the
    /// home node (their unacked deliveries requeued) when the channel closes.
    cancelled_remote: Vec<RemoteConsumer>,
    /// Clustered: per queue homed elsewhere, the consumer id its basic.gets
    /// are settled under on the home node (released with the channel).
    remote_getters: HashMap<String, RemoteConsumer>,
    /// Clustered: deliveries of consumers on other nodes that came while the
    /// channel-wide prefetch (basic.qos global) was full, in arrival order,
    /// written as acks make room ([`basic::release_held`]). Bounded by those
    /// consumers' windows on their home nodes.
    held_remote: VecDeque<crate::broker::remote::RemoteDelivery>,
    /// Clustered: the queue's home node's counts (messages, consumers) for
    /// the declare-ok or delete-ok of the method being run.
    remote_counts: Option<(u32, u32)>,
    /// What `/api/channels` shows of this channel (detached until the
    /// connection registers the channel: [`Channel::set_stats`]).
    pub(crate) stats: Arc<crate::broker::ChannelStats>,
}

impl Default for Channel {
    fn default() -> Self {
        Channel {
            consumers: HashMap::new(),
            unacked: VecDeque::new(),
            next_tag: 1,
            consumer_prefetch: 0,
            channel_credit: Credit::new(0),
            flow: Arc::new(AtomicBool::new(true)),
            tx: None,
            last_queue: None,
            reply_queue: None,
            forwarded: VecDeque::new(),
            cancelled_remote: Vec::new(),
            remote_getters: HashMap::new(),
            held_remote: VecDeque::new(),
            remote_counts: None,
            stats: Arc::default(),
        }
    }
}

impl Channel {
    /// The queue `name` means on this channel ("" is the last declared one).
    pub fn queue_name(&self, name: &str) -> AmqpResult<String> {
        if !name.is_empty() {
            return Ok(name.to_string());
        }
        self.last_queue
            .clone()
            .ok_or_else(|| AmqpError::not_found("no previously declared queue"))
    }

    /// The tickets of forwarded publishes `first..=last` (confirm sequence
    /// numbers; 0..=0 for a transaction's), taken out of the channel.
    pub fn take_forwarded(
        &mut self,
        first: u64,
        last: u64,
    ) -> Vec<Arc<crate::broker::remote::Ticket>> {
        let mut out = Vec::new();
        self.forwarded.retain(|(seq, t)| {
            let hit = (first..=last).contains(seq);
            if hit {
                out.push(Arc::clone(t));
            }
            !hit
        });
        out
    }

    /// Report this channel's figures into `stats` (the connection's record
    /// of the channel) from now on.
    pub fn set_stats(&mut self, stats: Arc<crate::broker::ChannelStats>) {
        self.stats = stats;
        self.update_gauges();
    }

    /// The unacked gauge of [`Self::stats`], after a delivery.
    #[inline]
    pub(crate) fn count_unacked(&self) {
        let n = self.unacked.len() as u64;
        self.stats
            .unacked
            .store(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// After a publish: only a transaction's count changed (if any).
    #[inline]
    pub(crate) fn after_publish(&self) {
        if self.tx.is_some() {
            self.update_gauges();
        }
    }

    /// Bring the gauges of [`Self::stats`] up to date (after each event the
    /// channel handled).
    pub(crate) fn update_gauges(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &self.stats;
        self.count_unacked();
        s.prefetch_count.store(self.consumer_prefetch, Relaxed);
        s.global_prefetch_count
            .store(self.channel_credit.limit(), Relaxed);
        s.transactional.store(self.tx.is_some(), Relaxed);
        let (publishes, settles) = self
            .tx
            .as_ref()
            .map_or((0, 0), |t| (t.publishes.len(), t.settles.len()));
        s.uncommitted.store(publishes as u64, Relaxed);
        s.acks_uncommitted.store(settles as u64, Relaxed);
    }

    /// A passive declare answered by the queue's home node: the queue is the
    /// channel's last declared one.
    pub fn set_last_queue(&mut self, name: &str) {
        self.last_queue = Some(name.to_string());
    }

    /// The next queue.declare-ok or delete-ok reports these counts (messages,
    /// consumers) of the queue's home node instead of the local copy's.
    pub fn set_remote_counts(&mut self, messages: u32, consumers: u32) {
        self.remote_counts = Some((messages, consumers));
    }

    /// The consumer id basic.get on `queue` (homed elsewhere) uses, made by
    /// `make` the first time.
    pub fn remote_getter(
        &mut self,
        queue: &str,
        make: impl FnOnce() -> RemoteConsumer,
    ) -> RemoteConsumer {
        match self.remote_getters.get(queue).filter(|r| r.is_alive()) {
            Some(r) => r.clone(),
            None => {
                let r = make();
                self.remote_getters.insert(queue.to_string(), r.clone());
                r
            }
        }
    }

    /// Let every consumer's queue deliver again (credit, flow or back-pressure
    /// changed).
    pub fn kick_consumers(&self, now: Now) {
        for cref in self.consumers.values() {
            cref.queue.dispatch(now.ms);
        }
    }

    /// The channel is closing: cancel consumers, requeue unacked messages in order.
    /// Idempotent.
    pub fn close(&mut self, ctx: &ConnCtx, channel: u16, now: Now) {
        let mut remote = std::mem::take(&mut self.cancelled_remote);
        remote.extend(self.remote_getters.drain().map(|(_, r)| r));
        for (tag, cref) in self.consumers.drain() {
            match cref.remote {
                Some(r) => remote.push(r),
                None => {
                    ctx.vhost
                        .cancel_consumer(&cref.queue, ctx.id, channel, &tag, now.ms);
                }
            }
        }
        // Never written: back to their home nodes' queues as they were.
        for d in self.held_remote.drain(..) {
            d.unsent();
        }
        self.requeue_all(now);
        // The home nodes requeue what is still unacked there.
        for r in remote {
            if r.is_alive() {
                r.home.release(r.cid);
            }
        }
        self.tx = None;
    }
}

/// Handle a method of the exchange, queue, basic, confirm or tx class.
pub fn dispatch(
    ctx: &ConnCtx,
    ch: &mut Channel,
    io: &mut ChannelIo<'_>,
    method: Method,
    now: Now,
) -> AmqpResult<()> {
    let (class_id, method_id) = (method.class_id(), method.method_id());
    let r = match class_id {
        crate::wire::ExchangeDeclare::CLASS_ID => exchange::handle(ctx, io, method),
        crate::wire::QueueDeclare::CLASS_ID => queue::handle(ctx, ch, io, method, now),
        crate::wire::BasicQos::CLASS_ID => basic::handle(ctx, ch, io, method, now),
        crate::wire::ConfirmSelect::CLASS_ID => confirm::handle(ch, io, method),
        crate::wire::TxSelect::CLASS_ID => tx::handle(ctx, ch, io, method, now),
        _ => Err(not_from_client(&method)),
    };
    // An ack, a qos or a commit may have made room in the channel-wide window.
    basic::release_held(ctx, ch, io, now);
    ch.update_gauges();
    r.map_err(|e| e.at(class_id, method_id))
}

/// A method only the server sends.
fn not_from_client(method: &Method) -> AmqpError {
    AmqpError::command_invalid(format!(
        "method {} is not valid from a client on a channel",
        method.name()
    ))
}
