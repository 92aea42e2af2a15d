//! One AMQP channel: its methods (exchange, queue, basic, confirm, tx), content
//! assembly, delivery tags, unacked messages, prefetch and publisher confirms.
//!
//! The connection task owns every `Channel` and calls in with one frame at a
//! time; replies are encoded into the connection's [`Out`] buffer. Errors come
//! back as [`AmqpError`]; the connection turns them into channel.close or
//! connection.close.

use super::writer::Out;
use crate::broker::auth::Access;
use crate::broker::exchange::Destination;
use crate::broker::message::{Entry, Message};
use crate::broker::queue::{Consumer, Credit, Delivery, DeliverySink, Queue};
use crate::broker::vhost::{ExchangeDeclare, PublishFrom, QueueDeclare, VHost};
use crate::broker::Counters;
use crate::error::{AmqpError, AmqpResult};
use crate::wire::*;
use bytes::{Bytes, BytesMut};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// What a channel needs to know about its connection.
#[derive(Debug, Clone)]
pub struct ConnCtx {
    pub broker: Arc<crate::broker::Broker>,
    pub id: u64,
    pub vhost: Arc<VHost>,
    pub user: String,
    pub sink: Arc<dyn DeliverySink>,
    /// The connection's own mailbox (durable confirms come back through it).
    pub conn: Arc<super::connection::ConnSink>,
    pub max_message_size: u64,
    /// The client understands server-sent basic.cancel.
    pub cancel_notify: bool,
    /// Configured limits (consumers, consumer timeout); the vhost enforces its own.
    pub limits: crate::config::Limits,
}

impl ConnCtx {
    /// RabbitMQ's resource check: 403 unless the user's `access` regex in this vhost
    /// matches `name` (the default exchange is checked as `amq.default`).
    fn permit(&self, access: Access, kind: &str, name: &str) -> AmqpResult<()> {
        let name = if kind == "exchange" && name.is_empty() {
            "amq.default"
        } else {
            name
        };
        if self
            .broker
            .auth
            .allows(&self.vhost.name, &self.user, access, name)
        {
            return Ok(());
        }
        Err(AmqpError::access_refused(format!(
            "access to {kind} '{name}' in vhost '{}' refused for user '{}'",
            self.vhost.name, self.user
        )))
    }
}

/// A message handed out and not yet acked.
#[derive(Debug)]
struct Unacked {
    tag: u64,
    queue: Arc<Queue>,
    entry: Entry,
    /// The consumer's window to give back on ack (None for basic.get).
    credit: Option<Arc<Credit>>,
    /// When the consumer timeout runs out for it: (deadline, timeout in ms).
    deadline: Option<(Instant, u64)>,
}

/// The deadline of a delivery from `queue` made now, if a consumer timeout applies.
fn ack_deadline(ctx: &ConnCtx, queue: &Queue) -> Option<(Instant, u64)> {
    let ms = queue
        .args()
        .consumer_timeout
        .or(ctx.limits.consumer_timeout_ms)?;
    Some((Instant::now() + std::time::Duration::from_millis(ms), ms))
}

#[derive(Debug)]
struct ConsumerRef {
    queue: Arc<Queue>,
    consumer: Arc<Consumer>,
}

/// A publish being assembled from method, header and body frames.
#[derive(Debug)]
struct Pending {
    publish: BasicPublish,
    header: Option<(BasicProperties, u64)>,
    parts: Vec<Bytes>,
    received: u64,
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

#[derive(Debug, Default)]
struct Tx {
    publishes: Vec<(String, bool, Arc<Message>)>,
    settles: Vec<Settle>,
}

#[derive(Debug)]
pub struct Channel {
    pub id: u16,
    /// We sent channel.close and wait for close-ok; other frames are dropped.
    pub closing: bool,
    pending: Option<Pending>,
    consumers: HashMap<Arc<str>, ConsumerRef>,
    unacked: VecDeque<Unacked>,
    next_tag: u64,
    /// basic.qos global=false: the window of consumers started afterwards.
    consumer_prefetch: u32,
    /// basic.qos global=true: shared by all consumers of the channel.
    channel_credit: Arc<Credit>,
    flow: Arc<AtomicBool>,
    confirm: bool,
    next_publish_seq: u64,
    /// Confirms accumulated in this batch: (first, last) publish seq, acked together.
    confirm_acks: Option<(u64, u64)>,
    /// Confirms of this batch that wait for the store's next flush.
    durable_batch: Option<(u64, u64)>,
    /// Batches handed to the store and not yet confirmed; while any is out, later
    /// confirms queue behind it so `multiple` acks never cover an unflushed message.
    durable_inflight: usize,
    tx: Option<Tx>,
    /// The queue last declared on this channel (an empty queue name means it).
    last_queue: Option<String>,
    /// The hidden queue behind this channel's direct reply-to consumer.
    reply_queue: Option<String>,
}

/// The pseudo-queue of RabbitMQ's direct reply-to.
pub const REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// The `expiration` property must be a non-negative integer (ms), as RabbitMQ checks.
fn validate_expiration(exp: &str) -> AmqpResult<()> {
    match exp.parse::<i64>() {
        Ok(v) if v >= 0 => Ok(()),
        Ok(v) => Err(AmqpError::precondition_failed(format!(
            "invalid expiration '{exp}': {{value_negative,{v}}}"
        ))),
        Err(_) => Err(AmqpError::precondition_failed(format!(
            "invalid expiration '{exp}': no_integer"
        ))),
    }
}

fn args_of(m: &Method) -> (u16, u16) {
    (m.class_id(), m.method_id())
}

impl Channel {
    pub fn new(id: u16) -> Channel {
        Channel {
            id,
            closing: false,
            pending: None,
            consumers: HashMap::new(),
            unacked: VecDeque::new(),
            next_tag: 1,
            consumer_prefetch: 0,
            channel_credit: Credit::new(0),
            flow: Arc::new(AtomicBool::new(true)),
            confirm: false,
            next_publish_seq: 1,
            confirm_acks: None,
            durable_batch: None,
            durable_inflight: 0,
            tx: None,
            last_queue: None,
            reply_queue: None,
        }
    }

    /// True while a publish waits for its header or body frames.
    pub fn expecting_content(&self) -> bool {
        self.pending.is_some()
    }

    fn queue_name(&self, name: &str) -> AmqpResult<String> {
        if !name.is_empty() {
            return Ok(name.to_string());
        }
        self.last_queue
            .clone()
            .ok_or_else(|| AmqpError::not_found("no previously declared queue"))
    }

    /// Handle a method frame for this channel (not channel.open / close).
    pub fn handle_method(
        &mut self,
        ctx: &ConnCtx,
        method: Method,
        out: &mut Out,
    ) -> AmqpResult<()> {
        let (class_id, method_id) = args_of(&method);
        self.dispatch(ctx, method, out)
            .map_err(|e| e.at(class_id, method_id))
    }

    fn dispatch(&mut self, ctx: &ConnCtx, method: Method, out: &mut Out) -> AmqpResult<()> {
        let ch = self.id;
        let vhost = &ctx.vhost;
        match method {
            Method::BasicPublish(p) => {
                if p.immediate {
                    return Err(AmqpError::not_implemented("immediate=true"));
                }
                self.pending = Some(Pending {
                    publish: p,
                    header: None,
                    parts: Vec::new(),
                    received: 0,
                });
            }
            Method::BasicAck(a) => self.settle(
                ctx,
                Settle::Ack {
                    tag: a.delivery_tag,
                    multiple: a.multiple,
                },
            )?,
            Method::BasicNack(n) => self.settle(
                ctx,
                Settle::Reject {
                    tag: n.delivery_tag,
                    multiple: n.multiple,
                    requeue: n.requeue,
                },
            )?,
            Method::BasicReject(r) => self.settle(
                ctx,
                Settle::Reject {
                    tag: r.delivery_tag,
                    multiple: false,
                    requeue: r.requeue,
                },
            )?,
            Method::BasicQos(q) => {
                if q.prefetch_size != 0 {
                    return Err(AmqpError::not_implemented(format!(
                        "prefetch_size!=0 ({})",
                        q.prefetch_size
                    )));
                }
                if q.global {
                    self.channel_credit.set_limit(u32::from(q.prefetch_count));
                    self.kick_consumers();
                } else {
                    self.consumer_prefetch = u32::from(q.prefetch_count);
                }
                out.method(ch, &BasicQosOk::default().into());
            }
            Method::BasicConsume(c) => self.consume(ctx, c, out)?,
            Method::BasicCancel(c) => {
                let tag: Arc<str> = c.consumer_tag.as_str().into();
                if let Some(cref) = self.consumers.remove(&tag) {
                    vhost.cancel_consumer(&cref.queue, ctx.id, ch, &tag, crate::clock::now_ms());
                }
                if !c.nowait {
                    out.method(
                        ch,
                        &BasicCancelOk {
                            consumer_tag: c.consumer_tag,
                        }
                        .into(),
                    );
                }
            }
            Method::BasicGet(g) => {
                let name = self.queue_name(&g.queue)?;
                ctx.permit(Access::Read, "queue", &name)?;
                let q = vhost.queue(&name, ctx.id)?;
                match q.get(g.no_ack, crate::clock::now_ms()) {
                    None => out.method(ch, &BasicGetEmpty::default().into()),
                    Some((entry, remaining)) => {
                        Counters::add(&ctx.broker.counters.delivered, 1);
                        let tag = self.next_tag;
                        self.next_tag += 1;
                        let m = Arc::clone(&entry.message);
                        out.method(
                            ch,
                            &BasicGetOk {
                                delivery_tag: tag,
                                redelivered: entry.redelivered,
                                exchange: m.exchange.to_string(),
                                routing_key: m.routing_key.to_string(),
                                message_count: remaining as u32,
                            }
                            .into(),
                        );
                        out.content(ch, &m.properties, &m.body);
                        if !g.no_ack {
                            let deadline = ack_deadline(ctx, &q);
                            self.unacked.push_back(Unacked {
                                tag,
                                queue: q,
                                entry,
                                credit: None,
                                deadline,
                            });
                        }
                    }
                }
            }
            Method::BasicRecover(r) => {
                self.recover(r.requeue)?;
                out.method(ch, &BasicRecoverOk::default().into());
            }
            Method::BasicRecoverAsync(r) => self.recover(r.requeue)?,
            Method::ExchangeDeclare(d) => {
                let nowait = d.nowait;
                if !d.passive {
                    ctx.permit(Access::Configure, "exchange", &d.exchange)?;
                }
                vhost.declare_exchange(&ExchangeDeclare {
                    name: d.exchange,
                    kind: d.kind,
                    passive: d.passive,
                    durable: d.durable,
                    auto_delete: d.auto_delete,
                    internal: d.internal,
                    arguments: d.arguments,
                })?;
                if !nowait {
                    out.method(ch, &ExchangeDeclareOk::default().into());
                }
            }
            Method::ExchangeDelete(d) => {
                ctx.permit(Access::Configure, "exchange", &d.exchange)?;
                vhost.delete_exchange(&d.exchange, d.if_unused)?;
                if !d.nowait {
                    out.method(ch, &ExchangeDeleteOk::default().into());
                }
            }
            Method::ExchangeBind(b) => {
                ctx.permit(Access::Write, "exchange", &b.destination)?;
                ctx.permit(Access::Read, "exchange", &b.source)?;
                let dest = Destination::Exchange(b.destination.as_str().into());
                vhost.bind(&b.source, dest, &b.routing_key, &b.arguments, ctx.id)?;
                if !b.nowait {
                    out.method(ch, &ExchangeBindOk::default().into());
                }
            }
            Method::ExchangeUnbind(b) => {
                ctx.permit(Access::Write, "exchange", &b.destination)?;
                ctx.permit(Access::Read, "exchange", &b.source)?;
                let dest = Destination::Exchange(b.destination.as_str().into());
                vhost.unbind(&b.source, dest, &b.routing_key, &b.arguments, ctx.id)?;
                if !b.nowait {
                    out.method(ch, &ExchangeUnbindOk::default().into());
                }
            }
            Method::QueueDeclare(d) => {
                let nowait = d.nowait;
                let server_named = !d.passive && d.queue.is_empty();
                if !d.passive && !d.queue.is_empty() {
                    ctx.permit(Access::Configure, "queue", &d.queue)?;
                }
                let (q, stats) = vhost.declare_queue(
                    &QueueDeclare {
                        name: d.queue,
                        passive: d.passive,
                        durable: d.durable,
                        exclusive: d.exclusive,
                        auto_delete: d.auto_delete,
                        arguments: d.arguments,
                    },
                    ctx.id,
                    crate::clock::now_ms(),
                )?;
                if server_named {
                    // RabbitMQ checks configure on the generated name.
                    if let Err(e) = ctx.permit(Access::Configure, "queue", q.name()) {
                        vhost.remove_queue(&q)?;
                        return Err(e);
                    }
                }
                self.last_queue = Some(q.name().to_string());
                if !nowait {
                    out.method(
                        ch,
                        &QueueDeclareOk {
                            queue: q.name().to_string(),
                            message_count: stats.ready as u32,
                            consumer_count: stats.consumers as u32,
                        }
                        .into(),
                    );
                }
            }
            Method::QueueBind(b) => {
                let name = self.queue_name(&b.queue)?;
                ctx.permit(Access::Write, "queue", &name)?;
                ctx.permit(Access::Read, "exchange", &b.exchange)?;
                let dest = Destination::Queue(name.as_str().into());
                vhost.bind(&b.exchange, dest, &b.routing_key, &b.arguments, ctx.id)?;
                if !b.nowait {
                    out.method(ch, &QueueBindOk::default().into());
                }
            }
            Method::QueueUnbind(b) => {
                let name = self.queue_name(&b.queue)?;
                ctx.permit(Access::Write, "queue", &name)?;
                ctx.permit(Access::Read, "exchange", &b.exchange)?;
                let dest = Destination::Queue(name.as_str().into());
                vhost.unbind(&b.exchange, dest, &b.routing_key, &b.arguments, ctx.id)?;
                out.method(ch, &QueueUnbindOk::default().into());
            }
            Method::QueuePurge(p) => {
                let name = self.queue_name(&p.queue)?;
                ctx.permit(Access::Read, "queue", &name)?;
                let n = vhost.purge_queue(&name, ctx.id)?;
                if !p.nowait {
                    out.method(
                        ch,
                        &QueuePurgeOk {
                            message_count: n as u32,
                        }
                        .into(),
                    );
                }
            }
            Method::QueueDelete(d) => {
                let name = self.queue_name(&d.queue)?;
                ctx.permit(Access::Configure, "queue", &name)?;
                let n = vhost.delete_queue(
                    &name,
                    d.if_unused,
                    d.if_empty,
                    ctx.id,
                    crate::clock::now_ms(),
                )?;
                if !d.nowait {
                    out.method(
                        ch,
                        &QueueDeleteOk {
                            message_count: n as u32,
                        }
                        .into(),
                    );
                }
            }
            Method::ChannelFlow(f) => {
                if !f.active {
                    // RabbitMQ refuses to stop deliveries with channel.flow.
                    return Err(AmqpError::not_implemented("active=false"));
                }
                self.flow.store(f.active, Ordering::Release);
                out.method(ch, &ChannelFlowOk { active: f.active }.into());
                if f.active {
                    self.kick_consumers();
                }
            }
            Method::ChannelFlowOk(_) => {}
            Method::AccessRequest(_) => {
                out.method(ch, &AccessRequestOk { reserved_1: 1 }.into());
            }
            Method::ConfirmSelect(c) => {
                if self.tx.is_some() {
                    return Err(AmqpError::precondition_failed(
                        "cannot switch from tx to confirm mode",
                    ));
                }
                self.confirm = true;
                if !c.nowait {
                    out.method(ch, &ConfirmSelectOk::default().into());
                }
            }
            Method::TxSelect(_) => {
                if self.confirm {
                    return Err(AmqpError::precondition_failed(
                        "cannot switch from confirm to tx mode",
                    ));
                }
                if self.tx.is_none() {
                    self.tx = Some(Tx::default());
                }
                out.method(ch, &TxSelectOk::default().into());
            }
            Method::TxCommit(_) => {
                let tx = self.tx.take().ok_or_else(|| {
                    AmqpError::precondition_failed("channel is not transactional")
                })?;
                self.tx = Some(Tx::default());
                let mut durable = false;
                for (exchange, mandatory, message) in tx.publishes {
                    durable |= self.route_and_enqueue(ctx, &exchange, mandatory, message, out)?;
                }
                for s in tx.settles {
                    self.apply_settle(ctx, s)?;
                }
                match (&ctx.broker.store, durable) {
                    // commit-ok once the persistent messages are on disk.
                    (Some(store), true) => {
                        let conn = Arc::clone(&ctx.conn);
                        store.on_durable(Box::new(move |_| conn.tx_committed(ch)));
                    }
                    _ => out.method(ch, &TxCommitOk::default().into()),
                }
            }
            Method::TxRollback(_) => {
                let tx = self.tx.as_mut().ok_or_else(|| {
                    AmqpError::precondition_failed("channel is not transactional")
                })?;
                *tx = Tx::default();
                out.method(ch, &TxRollbackOk::default().into());
            }
            other => {
                return Err(AmqpError::command_invalid(format!(
                    "method {} is not valid from a client on a channel",
                    other.name()
                )));
            }
        }
        Ok(())
    }

    fn consume(&mut self, ctx: &ConnCtx, c: BasicConsume, out: &mut Out) -> AmqpResult<()> {
        let q = if c.queue == REPLY_TO {
            self.reply_to_queue(ctx, &c)?
        } else {
            let name = self.queue_name(&c.queue)?;
            ctx.permit(Access::Read, "queue", &name)?;
            ctx.vhost.queue(&name, ctx.id)?
        };
        let tag: Arc<str> = if c.consumer_tag.is_empty() {
            crate::broker::vhost::generate_name("amq.ctag-").into()
        } else {
            c.consumer_tag.as_str().into()
        };
        if self.consumers.contains_key(&tag) {
            return Err(AmqpError::not_allowed(format!(
                "attempt to reuse consumer tag '{tag}'"
            )));
        }
        if let Some(max) = ctx.limits.consumer_max_per_channel {
            if self.consumers.len() >= max {
                return Err(AmqpError::precondition_failed(format!(
                    "reached maximum ({max}) of consumers per channel"
                )));
            }
        }
        let priority = match c.arguments.get("x-priority") {
            None => 0,
            Some(v) => v
                .as_i64()
                .and_then(|p| i32::try_from(p).ok())
                .ok_or_else(|| {
                    AmqpError::precondition_failed(format!(
                        "invalid arg 'x-priority' for consumer '{tag}': {v:?}"
                    ))
                })?,
        };
        let consumer = Arc::new(Consumer {
            tag: Arc::clone(&tag),
            connection: ctx.id,
            channel: self.id,
            no_ack: c.no_ack,
            exclusive: c.exclusive,
            priority,
            arguments: c.arguments.clone(),
            credit: Credit::new(self.consumer_prefetch),
            channel_credit: Arc::clone(&self.channel_credit),
            flow: Arc::clone(&self.flow),
            sink: Arc::clone(&ctx.sink),
        });
        q.add_consumer(Arc::clone(&consumer), crate::clock::now_ms())?;
        self.consumers
            .insert(Arc::clone(&tag), ConsumerRef { queue: q, consumer });
        // consume-ok still precedes every delivery: deliveries reach this task
        // through its mailbox, after this method has been answered.
        if !c.nowait {
            out.method(
                self.id,
                &BasicConsumeOk {
                    consumer_tag: tag.to_string(),
                }
                .into(),
            );
        }
        Ok(())
    }

    /// Direct reply-to: a hidden exclusive auto-delete queue per channel, named so
    /// that the default exchange routes replies to it.
    fn reply_to_queue(&mut self, ctx: &ConnCtx, c: &BasicConsume) -> AmqpResult<Arc<Queue>> {
        if !c.no_ack {
            return Err(AmqpError::precondition_failed(
                "reply consumer cannot acknowledge",
            ));
        }
        if self.reply_queue.is_some() {
            return Err(AmqpError::precondition_failed("reply consumer already set"));
        }
        let name = crate::broker::vhost::generate_name("amq.rabbitmq.reply-to.");
        let (q, _) = ctx
            .vhost
            .declare_internal_queue(&name, ctx.id, crate::clock::now_ms())?;
        self.reply_queue = Some(name);
        Ok(q)
    }

    /// Let every consumer's queue deliver again (credit or flow changed).
    fn kick_consumers(&self) {
        let now = crate::clock::now_ms();
        for cref in self.consumers.values() {
            cref.queue.dispatch(now);
        }
    }

    fn settle(&mut self, ctx: &ConnCtx, s: Settle) -> AmqpResult<()> {
        // Unknown tags fail at once, even inside a transaction.
        let (tag, multiple) = match s {
            Settle::Ack { tag, multiple } | Settle::Reject { tag, multiple, .. } => (tag, multiple),
        };
        if !(multiple && tag == 0) && self.position(tag).is_none() {
            return Err(AmqpError::precondition_failed(format!(
                "unknown delivery tag {tag}"
            )));
        }
        if let Some(tx) = self.tx.as_mut() {
            tx.settles.push(s);
            return Ok(());
        }
        self.apply_settle(ctx, s)
    }

    fn position(&self, tag: u64) -> Option<usize> {
        self.unacked.binary_search_by_key(&tag, |u| u.tag).ok()
    }

    /// Take the unacked messages a (tag, multiple) pair names.
    fn take_unacked(&mut self, tag: u64, multiple: bool) -> AmqpResult<Vec<Unacked>> {
        if multiple {
            let end = if tag == 0 {
                self.unacked.len()
            } else {
                self.unacked.partition_point(|u| u.tag <= tag)
            };
            if end == 0 && tag != 0 {
                return Err(AmqpError::precondition_failed(format!(
                    "unknown delivery tag {tag}"
                )));
            }
            Ok(self.unacked.drain(..end).collect())
        } else {
            let i = self.position(tag).ok_or_else(|| {
                AmqpError::precondition_failed(format!("unknown delivery tag {tag}"))
            })?;
            Ok(self.unacked.remove(i).into_iter().collect())
        }
    }

    fn apply_settle(&mut self, ctx: &ConnCtx, s: Settle) -> AmqpResult<()> {
        let (tag, multiple, requeue) = match s {
            Settle::Ack { tag, multiple } => (tag, multiple, None),
            Settle::Reject {
                tag,
                multiple,
                requeue,
            } => (tag, multiple, Some(requeue)),
        };
        let taken = self.take_unacked(tag, multiple)?;
        if requeue.is_none() {
            Counters::add(&ctx.broker.counters.acked, taken.len() as u64);
        }
        let now = crate::clock::now_ms();
        for (q, entries) in self.release(taken) {
            match requeue {
                Some(true) => q.requeue(entries, true, true, now),
                Some(false) => q.reject(entries, now),
                None => q.ack(&entries),
            }
        }
        self.kick_consumers();
        Ok(())
    }

    fn recover(&mut self, requeue: bool) -> AmqpResult<()> {
        if !requeue {
            return Err(AmqpError::not_implemented("requeue=false"));
        }
        self.requeue_all();
        self.kick_consumers();
        Ok(())
    }

    /// Give every unacked message back to its queue, in original order.
    fn requeue_all(&mut self) {
        let all: Vec<Unacked> = self.unacked.drain(..).collect();
        let now = crate::clock::now_ms();
        for (q, entries) in self.release(all) {
            q.requeue(entries, true, true, now);
        }
    }

    /// Settled messages give their prefetch credit back; returns them grouped by
    /// queue, in delivery order within each queue.
    fn release(&self, settled: Vec<Unacked>) -> Vec<(Arc<Queue>, Vec<Entry>)> {
        let mut by_queue: Vec<(Arc<Queue>, Vec<Entry>)> = Vec::new();
        for u in settled {
            if let Some(credit) = &u.credit {
                credit.release(1);
                self.channel_credit.release(1);
            }
            match by_queue.iter_mut().find(|(q, _)| Arc::ptr_eq(q, &u.queue)) {
                Some((_, v)) => v.push(u.entry),
                None => by_queue.push((u.queue, vec![u.entry])),
            }
        }
        by_queue
    }

    /// A content header frame arrived.
    pub fn handle_header(
        &mut self,
        ctx: &ConnCtx,
        class_id: u16,
        body_size: u64,
        properties: BasicProperties,
        out: &mut Out,
    ) -> AmqpResult<()> {
        let Some(p) = self.pending.as_mut() else {
            return Err(AmqpError::unexpected_frame(format!(
                "expected method frame, got content header on channel {}",
                self.id
            )));
        };
        if p.header.is_some() {
            return Err(AmqpError::unexpected_frame(format!(
                "expected content body, got content header on channel {}",
                self.id
            )));
        }
        if class_id != 60 {
            return Err(AmqpError::unexpected_frame(format!(
                "content header for class {class_id} does not match basic.publish"
            )));
        }
        if body_size > ctx.max_message_size {
            self.pending = None;
            return Err(AmqpError::precondition_failed(format!(
                "message size {body_size} is larger than configured max size {}",
                ctx.max_message_size
            ))
            .at(60, 40));
        }
        p.header = Some((properties, body_size));
        if body_size == 0 {
            return self.finish_publish(ctx, out);
        }
        Ok(())
    }

    /// A content body frame arrived.
    pub fn handle_body(&mut self, ctx: &ConnCtx, payload: Bytes, out: &mut Out) -> AmqpResult<()> {
        let Some(p) = self.pending.as_mut() else {
            return Err(AmqpError::unexpected_frame(format!(
                "expected method frame, got content body on channel {}",
                self.id
            )));
        };
        let Some((_, size)) = p.header.as_ref() else {
            return Err(AmqpError::unexpected_frame(format!(
                "expected content header, got content body on channel {}",
                self.id
            )));
        };
        p.received += payload.len() as u64;
        if p.received > *size {
            return Err(AmqpError::frame_error(format!(
                "content body is longer than the {size} bytes its header declared"
            )));
        }
        p.parts.push(payload);
        if p.received == *size {
            return self.finish_publish(ctx, out);
        }
        Ok(())
    }

    fn finish_publish(&mut self, ctx: &ConnCtx, out: &mut Out) -> AmqpResult<()> {
        let Some(p) = self.pending.take() else {
            return Ok(());
        };
        let Some((properties, _)) = p.header else {
            return Ok(());
        };
        let body = match p.parts.len() {
            0 => Bytes::new(),
            1 => p.parts.into_iter().next().unwrap_or_default(),
            _ => {
                let mut b = BytesMut::with_capacity(p.received as usize);
                for part in &p.parts {
                    b.extend_from_slice(part);
                }
                b.freeze()
            }
        };
        let publish = p.publish;
        ctx.permit(Access::Write, "exchange", &publish.exchange)
            .map_err(|e| e.at(60, 40))?;
        if let Some(uid) = properties.user_id.as_deref() {
            if uid != ctx.user {
                return Err(AmqpError::precondition_failed(format!(
                    "user_id property set to '{uid}' but authenticated user was '{}'",
                    ctx.user
                ))
                .at(60, 40));
            }
        }
        if let Some(exp) = properties.expiration.as_deref() {
            validate_expiration(exp).map_err(|e| e.at(60, 40))?;
        }
        let mut properties = properties;
        if properties.reply_to.as_deref() == Some(REPLY_TO) {
            let queue = self.reply_queue.as_ref().ok_or_else(|| {
                AmqpError::precondition_failed("fast reply consumer does not exist").at(60, 40)
            })?;
            properties.reply_to = Some(queue.clone());
        }
        let message = Message::new(
            publish.exchange.clone(),
            publish.routing_key,
            properties,
            body,
        );
        if let Some(tx) = self.tx.as_mut() {
            // Check the exchange now, as RabbitMQ does, but enqueue at commit.
            if !publish.exchange.is_empty() {
                ctx.vhost
                    .exchange(&publish.exchange)
                    .map_err(|e| e.at(60, 40))?;
            }
            tx.publishes
                .push((publish.exchange, publish.mandatory, message));
            return Ok(());
        }
        self.route_and_enqueue(ctx, &publish.exchange, publish.mandatory, message, out)
            .map(|_| ())
            .map_err(|e| e.at(60, 40))
    }

    fn route_and_enqueue(
        &mut self,
        ctx: &ConnCtx,
        exchange: &str,
        mandatory: bool,
        message: Arc<Message>,
        out: &mut Out,
    ) -> AmqpResult<bool> {
        let now = crate::clock::now_ms();
        let published = ctx
            .vhost
            .publish(exchange, &message, PublishFrom::Client, now)?;
        let counters = &ctx.broker.counters;
        Counters::add(&counters.published, 1);
        if !published.routed {
            Counters::add(&counters.unroutable, 1);
        }
        if !published.routed && mandatory {
            Counters::add(&counters.returned, 1);
            out.method(
                self.id,
                &BasicReturn {
                    reply_code: reply_code::NO_ROUTE,
                    reply_text: "NO_ROUTE".into(),
                    exchange: message.exchange.to_string(),
                    routing_key: message.routing_key.to_string(),
                }
                .into(),
            );
            out.content(self.id, &message.properties, &message.body);
        }
        let (rejected, durable) = (published.rejected, published.durable);
        if self.confirm {
            let seq = self.next_publish_seq;
            self.next_publish_seq += 1;
            if rejected {
                // One queue refusing (x-overflow reject-publish) is enough to nack.
                self.flush_confirms(ctx, out);
                out.method(
                    self.id,
                    &BasicNack {
                        delivery_tag: seq,
                        multiple: false,
                        requeue: false,
                    }
                    .into(),
                );
                return Ok(durable);
            }
            if durable || self.durable_inflight > 0 || self.durable_batch.is_some() {
                // Immediate confirms gathered before this one go out first.
                if let Some((first, last)) = self.confirm_acks.take() {
                    out.method(
                        self.id,
                        &BasicAck {
                            delivery_tag: last,
                            multiple: first != last,
                        }
                        .into(),
                    );
                }
                self.durable_batch = Some(match self.durable_batch {
                    Some((first, _)) => (first, seq),
                    None => (seq, seq),
                });
            } else {
                self.confirm_acks = match self.confirm_acks {
                    Some((first, last)) if last + 1 == seq => Some((first, seq)),
                    Some(_) => {
                        self.flush_confirms(ctx, out);
                        Some((seq, seq))
                    }
                    None => Some((seq, seq)),
                };
            }
        }
        Ok(durable)
    }

    /// Send the confirms gathered in this batch: immediate ones as one basic.ack, and
    /// hand the durable ones to the store, to be acked after its next flush.
    pub fn flush_confirms(&mut self, ctx: &ConnCtx, out: &mut Out) {
        if let Some((first, last)) = self.confirm_acks.take() {
            out.method(
                self.id,
                &BasicAck {
                    delivery_tag: last,
                    multiple: first != last,
                }
                .into(),
            );
        }
        if let Some((first, last)) = self.durable_batch.take() {
            self.durable_inflight += 1;
            let channel = self.id;
            let conn = Arc::clone(&ctx.conn);
            match &ctx.broker.store {
                Some(store) => store.on_durable(Box::new(move |result| {
                    conn.durable(channel, first, last, result.is_ok());
                })),
                None => conn.durable(channel, first, last, true),
            }
        }
    }

    /// The store flushed a batch of this channel's publishes: confirm them.
    pub fn durable_done(&mut self, first: u64, last: u64, ok: bool, out: &mut Out) {
        self.durable_inflight = self.durable_inflight.saturating_sub(1);
        if self.closing || !self.confirm {
            return;
        }
        if ok {
            out.method(
                self.id,
                &BasicAck {
                    delivery_tag: last,
                    multiple: first != last,
                }
                .into(),
            );
        } else {
            for tag in first..=last {
                out.method(
                    self.id,
                    &BasicNack {
                        delivery_tag: tag,
                        multiple: false,
                        requeue: false,
                    }
                    .into(),
                );
            }
        }
    }

    /// A queue handed this channel a delivery: assign a tag and write it.
    pub fn deliver(&mut self, ctx: &ConnCtx, d: Delivery, out: &mut Out) {
        let credit = match self.consumers.get(&d.consumer_tag) {
            Some(cref) if Arc::ptr_eq(&cref.queue, &d.queue) && !self.closing => {
                Arc::clone(&cref.consumer.credit)
            }
            _ => {
                // Cancelled meanwhile: the message goes back untouched.
                if !d.no_ack {
                    self.channel_credit.release(1);
                }
                d.queue
                    .requeue(vec![d.entry], !d.no_ack, false, crate::clock::now_ms());
                return;
            }
        };
        let tag = self.next_tag;
        self.next_tag += 1;
        Counters::add(&ctx.broker.counters.delivered, 1);
        let m = &d.entry.message;
        let args = DeliverArgs {
            consumer_tag: &d.consumer_tag,
            delivery_tag: tag,
            redelivered: d.entry.redelivered,
            exchange: &m.exchange,
            routing_key: &m.routing_key,
        };
        out.deliver(self.id, &args, &m.properties, &m.body);
        if !d.no_ack {
            let deadline = ack_deadline(ctx, &d.queue);
            self.unacked.push_back(Unacked {
                tag,
                queue: d.queue,
                entry: d.entry,
                credit: Some(credit),
                deadline,
            });
        }
    }

    /// A delivery has stayed unacked past its consumer timeout: the error to
    /// close this channel with (RabbitMQ's wording).
    pub fn ack_timed_out(&self, now: Instant) -> Option<AmqpError> {
        if self.closing {
            return None;
        }
        let ms = self
            .unacked
            .iter()
            .filter_map(|u| u.deadline)
            .find(|(at, _)| *at <= now)?
            .1;
        Some(AmqpError::precondition_failed(format!(
            "delivery acknowledgement on channel {} timed out. Timeout value used: {ms} ms. \
             This timeout value can be configured, see consumers doc guide to learn more",
            self.id
        )))
    }

    /// Let every consumer's queue deliver again (the connection caught up on output).
    pub fn resume_deliveries(&self) {
        self.kick_consumers();
    }

    /// The queue behind a consumer was deleted.
    pub fn consumer_cancelled(&mut self, tag: &Arc<str>, notify: bool, out: &mut Out) {
        if self.consumers.remove(tag).is_some() && notify && !self.closing {
            out.method(
                self.id,
                &BasicCancel {
                    consumer_tag: tag.to_string(),
                    nowait: true,
                }
                .into(),
            );
        }
    }

    /// The channel is closing: cancel consumers, requeue unacked messages in order.
    pub fn close(&mut self, ctx: &ConnCtx) {
        for (tag, cref) in self.consumers.drain() {
            ctx.vhost
                .cancel_consumer(&cref.queue, ctx.id, self.id, &tag, crate::clock::now_ms());
        }
        self.requeue_all();
        self.pending = None;
        self.tx = None;
        self.confirm_acks = None;
    }
}
