//! The basic class: qos, consume, cancel, get, ack / nack / reject, recover,
//! publish (route and enqueue) and deliveries from queues. Consumer-timeout
//! deadlines are computed from the `now` the caller passes.

use super::{not_from_client, Channel, ConnCtx, ConsumerRef, Settle, Unacked};
use crate::broker::auth::Access;
use crate::broker::message::{Entry, Message, ShortStr};
use crate::broker::queue::{Consumer, Credit, Delivery, Queue, QueueType};
use crate::broker::remote::{
    RemoteConsume, RemoteConsumer, RemoteDelivery, Settle as RemoteSettle,
};
use crate::broker::{ChannelStats, Counters};
use crate::clock::Now;
use crate::error::{AmqpError, AmqpResult};
use crate::session::{Assembled, ChannelIo, Outcome};
use crate::wire::*;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Settled deliveries of one queue, with the consumer windows they held.
struct Returned {
    queue: Arc<Queue>,
    entries: Vec<Entry>,
    credits: Vec<Arc<Credit>>,
}

/// The pseudo-queue of RabbitMQ's direct reply-to.
pub const REPLY_TO: &str = "amq.rabbitmq.reply-to";

fn at_publish(e: AmqpError) -> AmqpError {
    e.at(BasicPublish::CLASS_ID, BasicPublish::METHOD_ID)
}

/// The deadline of a delivery from `queue` made at `now`, if a consumer timeout applies.
fn ack_deadline(ctx: &ConnCtx, queue: &Queue, now: Instant) -> Option<(Instant, u64)> {
    let ms = queue
        .args()
        .consumer_timeout
        .or(ctx.limits.consumer_timeout_ms)?;
    Some((now + Duration::from_millis(ms), ms))
}

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

pub fn handle(
    ctx: &ConnCtx,
    ch: &mut Channel,
    io: &mut ChannelIo<'_>,
    method: Method,
    now: Now,
) -> AmqpResult<()> {
    match method {
        Method::BasicAck(a) => settle(
            ctx,
            ch,
            now,
            Settle::Ack {
                tag: a.delivery_tag,
                multiple: a.multiple,
            },
        ),
        Method::BasicNack(n) => settle(
            ctx,
            ch,
            now,
            Settle::Reject {
                tag: n.delivery_tag,
                multiple: n.multiple,
                requeue: n.requeue,
            },
        ),
        Method::BasicReject(r) => settle(
            ctx,
            ch,
            now,
            Settle::Reject {
                tag: r.delivery_tag,
                multiple: false,
                requeue: r.requeue,
            },
        ),
        Method::BasicQos(q) => {
            if q.prefetch_size != 0 {
                return Err(AmqpError::not_implemented(format!(
                    "prefetch_size!=0 ({})",
                    q.prefetch_size
                )));
            }
            if q.global {
                ch.channel_credit.set_limit(u32::from(q.prefetch_count));
                ch.kick_consumers(now);
            } else {
                ch.consumer_prefetch = u32::from(q.prefetch_count);
            }
            io.method(&BasicQosOk::default().into());
            Ok(())
        }
        Method::BasicConsume(c) => consume(ctx, ch, io, c, now),
        Method::BasicCancel(c) => {
            let tag: Arc<str> = c.consumer_tag.as_str().into();
            if let Some(cref) = ch.consumers.remove(&tag) {
                match cref.remote {
                    Some(r) => {
                        if r.is_alive() {
                            r.home.cancel(r.cid);
                        }
                        ch.cancelled_remote.push(r);
                    }
                    None => {
                        ctx.vhost
                            .cancel_consumer(&cref.queue, ctx.id, io.id, &tag, now.ms);
                    }
                }
            }
            if !c.nowait {
                io.method(
                    &BasicCancelOk {
                        consumer_tag: c.consumer_tag,
                    }
                    .into(),
                );
            }
            Ok(())
        }
        Method::BasicGet(g) => get(ctx, ch, io, g, now),
        Method::BasicRecover(r) => {
            recover(ch, r.requeue, now)?;
            io.method(&BasicRecoverOk::default().into());
            Ok(())
        }
        Method::BasicRecoverAsync(r) => recover(ch, r.requeue, now),
        other => Err(not_from_client(&other)),
    }
}

fn get(
    ctx: &ConnCtx,
    ch: &mut Channel,
    io: &mut ChannelIo<'_>,
    g: BasicGet,
    now: Now,
) -> AmqpResult<()> {
    let name = ch.queue_name(&g.queue)?;
    ctx.permit(Access::Read, "queue", &name)?;
    let q = ctx.vhost.queue(&name, ctx.id)?;
    if q.queue_type() == QueueType::Stream {
        return Err(AmqpError::not_implemented(stream_get_refused(
            &name,
            &ctx.vhost.name,
        )));
    }
    match q.get(g.no_ack, now.ms) {
        None => {
            Counters::add(&ch.stats.get_empty, 1);
            ctx.count(|c| Counters::add(&c.get_empty, 1));
            io.method(&BasicGetEmpty::default().into())
        }
        Some((entry, remaining)) => {
            ctx.count(|c| c.got(g.no_ack, entry.redelivered));
            ch.stats.count_get(g.no_ack, entry.redelivered);
            let tag = ch.next_tag;
            ch.next_tag += 1;
            let m = Arc::clone(&entry.message);
            io.method(
                &BasicGetOk {
                    delivery_tag: tag,
                    redelivered: entry.redelivered,
                    exchange: m.exchange.to_string(),
                    routing_key: m.routing_key.to_string(),
                    message_count: remaining as u32,
                }
                .into(),
            );
            io.out
                .content(io.id, |b| entry.encode_properties(b), &m.body);
            trace_delivery(ctx, io.id, &name, &m, entry.redelivered, now);
            if !g.no_ack {
                let deadline = ack_deadline(ctx, &q, now.at);
                ch.unacked.push_back(Unacked {
                    tag,
                    queue: q,
                    entry,
                    credit: None,
                    deadline,
                    remote: None,
                });
            }
        }
    }
    Ok(())
}

fn consume(
    ctx: &ConnCtx,
    ch: &mut Channel,
    io: &mut ChannelIo<'_>,
    c: BasicConsume,
    now: Now,
) -> AmqpResult<()> {
    let q = if c.queue == REPLY_TO {
        reply_to_queue(ctx, ch, &c, now)?
    } else {
        let name = ch.queue_name(&c.queue)?;
        ctx.permit(Access::Read, "queue", &name)?;
        let q = ctx.vhost.queue(&name, ctx.id)?;
        // Quorum queues have no channel-wide (global) prefetch: RabbitMQ
        // refuses the consumer with a connection error.
        if q.queue_type() == QueueType::Quorum && ch.channel_credit.limit() > 0 {
            return Err(AmqpError::not_implemented(format!(
                "queue '{name}' in vhost '{}' does not support global qos",
                ctx.vhost.name
            )));
        }
        if q.queue_type() == QueueType::Stream {
            // RabbitMQ's order: no-ack first, then the prefetch (a channel-wide
            // one does not count).
            if c.no_ack {
                return Err(AmqpError::not_implemented(format!(
                    "automatic acknowledgement not supported by stream queues queue '{name}' in vhost '{}'",
                    ctx.vhost.name
                )));
            }
            if ch.consumer_prefetch == 0 {
                return Err(AmqpError::precondition_failed(format!(
                    "consumer prefetch count is not set for 'queue '{name}' in vhost '{}''",
                    ctx.vhost.name
                )));
            }
        }
        q
    };
    let tag: Arc<str> = if c.consumer_tag.is_empty() {
        crate::broker::vhost::generate_name("amq.ctag-").into()
    } else {
        c.consumer_tag.as_str().into()
    };
    if ch.consumers.contains_key(&tag) {
        return Err(AmqpError::not_allowed(format!(
            "attempt to reuse consumer tag '{tag}'"
        )));
    }
    if let Some(max) = ctx.limits.consumer_max_per_channel {
        if ch.consumers.len() >= max {
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
                    "invalid arg 'x-priority' for queue '{}' in vhost '{}': \"expected integer, got {}\"",
                    c.queue,
                    ctx.vhost.name,
                    v.rabbit_type_name()
                ))
            })?,
    };
    let consumer = Arc::new(Consumer {
        tag: Arc::clone(&tag),
        connection: ctx.id,
        channel: io.id,
        no_ack: c.no_ack,
        exclusive: c.exclusive,
        priority,
        arguments: c.arguments.clone(),
        credit: Credit::new(ch.consumer_prefetch),
        channel_credit: Arc::clone(&ch.channel_credit),
        flow: Arc::clone(&ch.flow),
        sink: Arc::clone(&ctx.sink),
    });
    let remote = match q.remote().filter(|_| c.queue != REPLY_TO) {
        // Clustered: the queue lives on another node; the consumer is opened
        // there and its deliveries come back over the data link.
        Some(home) => {
            let spec = RemoteConsume {
                vhost: ctx.vhost.name.to_string(),
                queue: q.name().to_string(),
                tag: tag.to_string(),
                // A channel-wide prefetch also bounds its window there, so
                // what waits here for room in it stays within that.
                prefetch: match (ch.consumer_prefetch, ch.channel_credit.limit()) {
                    _ if c.no_ack => 0,
                    (own, _) if q.stream().is_some() => own,
                    (0, global) => global,
                    (own, 0) => own,
                    (own, global) => own.min(global),
                },
                exclusive: c.exclusive,
                priority,
                arguments: {
                    let mut b = bytes::BytesMut::new();
                    encode_field_table(&c.arguments, &mut b);
                    b.to_vec()
                },
                origin: ctx.broker.connection(ctx.id).map(|info| {
                    crate::broker::remote::ConsumerOrigin {
                        connection_name: ctx.name.clone(),
                        channel: io.id,
                        peer_host: info.peer.ip().to_string(),
                        peer_port: info.peer.port(),
                        user: ctx.user.clone(),
                        node: ctx.broker.node.clone(),
                        prefetch: ch.consumer_prefetch,
                    }
                }),
            };
            let r = home
                .consume(spec, io.id, Arc::clone(&ctx.sink))
                .map_err(|_| home_down(ctx, &q, home.node()))?;
            Some(r)
        }
        None => {
            q.add_consumer(Arc::clone(&consumer), now.ms)?;
            None
        }
    };
    // Clustered: consume-ok (or the channel error of a refusal) comes with
    // the home node's answer ([`consume_answered`]), as RabbitMQ answers
    // after the queue's own process has taken the consumer.
    let unanswered = remote.as_ref().map(|_| c.nowait);
    let answered_here = unanswered.is_none();
    ch.consumers.insert(
        Arc::clone(&tag),
        ConsumerRef {
            queue: q,
            consumer,
            remote,
            unanswered,
        },
    );
    // consume-ok still precedes every delivery: deliveries reach the connection
    // through its mailbox, after this method has been answered.
    if !c.nowait && answered_here {
        io.method(
            &BasicConsumeOk {
                consumer_tag: tag.to_string(),
            }
            .into(),
        );
    }
    Ok(())
}

/// RabbitMQ's error for a queue whose home node cannot be reached.
pub fn home_down(ctx: &ConnCtx, q: &Queue, node: &str) -> AmqpError {
    AmqpError::not_found(format!(
        "home node '{node}' of durable queue '{}' in vhost '{}' is down or inaccessible",
        q.name(),
        ctx.vhost.name
    ))
}

/// Direct reply-to: a hidden exclusive auto-delete queue per channel, named so
/// that the default exchange routes replies to it.
fn reply_to_queue(
    ctx: &ConnCtx,
    ch: &mut Channel,
    c: &BasicConsume,
    now: Now,
) -> AmqpResult<Arc<Queue>> {
    if !c.no_ack {
        return Err(AmqpError::precondition_failed(
            "reply consumer cannot acknowledge",
        ));
    }
    if ch.reply_queue.is_some() {
        return Err(AmqpError::precondition_failed("reply consumer already set"));
    }
    let name = crate::broker::vhost::generate_name("amq.rabbitmq.reply-to.");
    let (q, _) = ctx.vhost.declare_internal_queue(&name, ctx.id, now.ms)?;
    ch.reply_queue = Some(name);
    Ok(q)
}

fn settle(ctx: &ConnCtx, ch: &mut Channel, now: Now, s: Settle) -> AmqpResult<()> {
    // Unknown tags fail at once, even inside a transaction.
    let (tag, multiple) = match s {
        Settle::Ack { tag, multiple } | Settle::Reject { tag, multiple, .. } => (tag, multiple),
    };
    if !(multiple && tag == 0) && ch.position(tag).is_none() {
        return Err(AmqpError::precondition_failed(format!(
            "unknown delivery tag {tag}"
        )));
    }
    if let Settle::Reject { .. } = s {
        ch.refuse_stream_reject(tag, multiple, &ctx.vhost.name)?;
    }
    if let Some(tx) = ch.tx.as_mut() {
        tx.settles.push(s);
        return Ok(());
    }
    apply_settle(ctx, ch, s, now)
}

pub(super) fn apply_settle(ctx: &ConnCtx, ch: &mut Channel, s: Settle, now: Now) -> AmqpResult<()> {
    let (tag, multiple, requeue) = match s {
        Settle::Ack { tag, multiple } => (tag, multiple, None),
        Settle::Reject {
            tag,
            multiple,
            requeue,
        } => (tag, multiple, Some(requeue)),
    };
    let mut taken = ch.take_unacked(tag, multiple)?;
    if requeue.is_none() {
        ctx.count(|c| Counters::add(&c.acked, taken.len() as u64));
        Counters::add(&ch.stats.ack, taken.len() as u64);
    }
    settle_remote(
        &ch.channel_credit,
        &mut taken,
        match requeue {
            None => RemoteSettle::Ack,
            Some(true) => RemoteSettle::Requeue,
            Some(false) => RemoteSettle::Reject,
        },
    );
    for back in ch.release(taken) {
        // The queue's consumers get their credit back together with its messages,
        // so another queue's dead letters cannot overtake the requeued ones.
        ch.give_back(&back.credits);
        match requeue {
            Some(true) => back.queue.requeue(back.entries, true, true, now.ms),
            Some(false) => back.queue.reject(back.entries, now.ms),
            None => back.queue.ack(&back.entries, now.ms),
        }
    }
    ch.kick_consumers(now);
    Ok(())
}

/// Take the deliveries of consumers on other nodes out of `taken` and settle
/// them there, one message per consumer (nothing for a consumer whose link
/// went down: its home node requeued them already); their units of the
/// channel-wide prefetch are given back here.
fn settle_remote(channel_credit: &Credit, taken: &mut Vec<Unacked>, how: RemoteSettle) {
    if taken.iter().all(|u| u.remote.is_none()) {
        return;
    }
    let mut by_consumer: Vec<(RemoteConsumer, Vec<u64>)> = Vec::new();
    let mut units = 0;
    taken.retain_mut(|u| {
        let Some((r, tag)) = u.remote.take() else {
            return true;
        };
        units += u32::from(u.credit.is_some());
        match by_consumer
            .iter_mut()
            .find(|(c, _)| c.cid == r.cid && Arc::ptr_eq(&c.alive, &r.alive))
        {
            Some((_, tags)) => tags.push(tag),
            None => by_consumer.push((r, vec![tag])),
        }
        false
    });
    channel_credit.release(units);
    for (r, tags) in by_consumer {
        if r.is_alive() {
            r.home.settle(r.cid, tags, how);
        }
    }
}

fn recover(ch: &mut Channel, requeue: bool, now: Now) -> AmqpResult<()> {
    if !requeue {
        return Err(AmqpError::not_implemented("requeue=false"));
    }
    ch.requeue_all(now);
    ch.kick_consumers(now);
    Ok(())
}

impl Channel {
    /// basic.nack and basic.reject of a stream delivery: RabbitMQ's 540.
    fn refuse_stream_reject(&self, tag: u64, multiple: bool, vhost: &str) -> AmqpResult<()> {
        let named = if multiple {
            let end = if tag == 0 {
                self.unacked.len()
            } else {
                self.unacked.partition_point(|u| u.tag <= tag)
            };
            self.unacked
                .range(..end)
                .find(|u| u.queue.stream().is_some())
        } else {
            self.position(tag)
                .map(|i| &self.unacked[i])
                .filter(|u| u.queue.stream().is_some())
        };
        match named {
            Some(u) => Err(AmqpError::not_implemented(format!(
                "basic.nack and basic.reject not supported by stream queues queue '{}' in vhost '{vhost}'",
                u.queue.name()
            ))),
            None => Ok(()),
        }
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

    /// Give every unacked message back to its queue, in original order.
    pub(super) fn requeue_all(&mut self, now: Now) {
        let mut all: Vec<Unacked> = self.unacked.drain(..).collect();
        settle_remote(&self.channel_credit, &mut all, RemoteSettle::Requeue);
        for back in self.release(all) {
            self.give_back(&back.credits);
            back.queue.requeue(back.entries, true, true, now.ms);
        }
    }

    /// Settled messages grouped by queue, in delivery order within each queue,
    /// with the consumer windows they hold (given back by the caller together
    /// with that queue's messages).
    fn release(&self, settled: Vec<Unacked>) -> Vec<Returned> {
        let mut by_queue: Vec<Returned> = Vec::new();
        for u in settled {
            let i = match by_queue
                .iter()
                .position(|r| Arc::ptr_eq(&r.queue, &u.queue))
            {
                Some(i) => i,
                None => {
                    by_queue.push(Returned {
                        queue: u.queue,
                        entries: Vec::new(),
                        credits: Vec::new(),
                    });
                    by_queue.len() - 1
                }
            };
            by_queue[i].entries.push(u.entry);
            by_queue[i].credits.extend(u.credit);
        }
        by_queue
    }

    /// Give settled deliveries' prefetch credit back (consumer and channel).
    fn give_back(&self, credits: &[Arc<Credit>]) {
        for credit in credits {
            credit.release(1);
            self.channel_credit.release(1);
        }
    }
}

/// A complete publish from the session: checks, then route and enqueue (or keep
/// it for the transaction's commit).
pub fn publish(
    ctx: &ConnCtx,
    ch: &mut Channel,
    io: &mut ChannelIo<'_>,
    message: Assembled,
    now: Now,
) -> AmqpResult<()> {
    let Assembled {
        publish,
        mut properties,
        body,
    } = message;
    ctx.permit(Access::Write, "exchange", &publish.exchange)
        .map_err(at_publish)?;
    if let Some(uid) = properties.user_id.as_deref() {
        if uid != ctx.user {
            return Err(at_publish(AmqpError::precondition_failed(format!(
                "user_id property set to '{uid}' but authenticated user was '{}'",
                ctx.user
            ))));
        }
    }
    if let Some(exp) = properties.expiration.as_deref() {
        validate_expiration(exp).map_err(at_publish)?;
    }
    let cc = crate::broker::cc::take_cc_keys(&mut properties).map_err(at_publish)?;
    ctx.permit_topic(
        Access::Write,
        &publish.exchange,
        std::iter::once(publish.routing_key.as_str()).chain(cc.iter().map(ShortStr::as_str)),
    )
    .map_err(at_publish)?;
    if properties.reply_to.as_deref() == Some(REPLY_TO) {
        let queue = ch.reply_queue.as_ref().ok_or_else(|| {
            at_publish(AmqpError::precondition_failed(
                "fast reply consumer does not exist",
            ))
        })?;
        properties.reply_to = Some(queue.clone());
    }
    let message = Message::new(
        publish.exchange.clone(),
        publish.routing_key,
        properties,
        body,
    );
    if let Some(tx) = ch.tx.as_mut() {
        // Check the exchange now, as RabbitMQ does, but enqueue at commit.
        if !publish.exchange.is_empty() {
            ctx.vhost.exchange(&publish.exchange).map_err(at_publish)?;
        }
        tx.publishes
            .push((publish.exchange, publish.mandatory, message, cc));
        return Ok(());
    }
    let seq = io.confirms.next_seq();
    let (_, forwarded) = route_and_enqueue(
        ctx,
        &ch.stats,
        io,
        &publish.exchange,
        publish.mandatory,
        message,
        &cc,
        now,
    )
    .map_err(at_publish)?;
    if let Some(t) = forwarded.filter(|_| io.confirms.enabled()) {
        ch.forwarded.push_back((seq, t));
    }
    Ok(())
}

/// Route `message` (also with the `cc` keys) and enqueue it; returns whether a
/// durable copy was stored, and the ticket of copies forwarded to other nodes
/// (its confirm waits for them: counted as durable here).
#[allow(clippy::too_many_arguments)]
pub(super) fn route_and_enqueue(
    ctx: &ConnCtx,
    stats: &ChannelStats,
    io: &mut ChannelIo<'_>,
    exchange: &str,
    mandatory: bool,
    message: Arc<Message>,
    cc: &[ShortStr],
    now: Now,
) -> AmqpResult<(bool, Option<Arc<crate::broker::remote::Ticket>>)> {
    let published = ctx
        .vhost
        .publish_client(exchange, &message, cc, &ctx.tap(io.id), now.ms)?;
    ctx.count(|c| Counters::add(&c.published, 1));
    Counters::add(&stats.publish, 1);
    if !published.routed {
        ctx.count(|c| Counters::add(&c.unroutable, 1));
        let dropped = if mandatory {
            &stats.return_unroutable
        } else {
            &stats.drop_unroutable
        };
        Counters::add(dropped, 1);
    }
    if !published.routed && mandatory {
        ctx.count(|c| Counters::add(&c.returned, 1));
        io.method(
            &BasicReturn {
                reply_code: reply_code::NO_ROUTE,
                reply_text: "NO_ROUTE".into(),
                exchange: message.exchange.to_string(),
                routing_key: message.routing_key.to_string(),
            }
            .into(),
        );
        io.out
            .content(io.id, |b| message.properties.encode(b), &message.body);
    }
    let (rejected, durable) = (published.rejected, published.durable);
    let forwarded = published.forwarded;
    let durable_confirm = (durable && ctx.broker.store.is_some()) || forwarded.is_some();
    io.published(if rejected {
        Outcome::Rejected
    } else {
        Outcome::Accepted {
            durable: durable_confirm,
        }
    });
    Ok((durable, forwarded))
}

/// A queue handed this channel a delivery: assign a tag and write it.
pub fn deliver(ctx: &ConnCtx, ch: &mut Channel, io: &mut ChannelIo<'_>, d: Delivery, now: Now) {
    let credit = match ch.consumers.get(&d.consumer_tag) {
        Some(cref) if Arc::ptr_eq(&cref.queue, &d.queue) && !io.closing => {
            Arc::clone(&cref.consumer.credit)
        }
        _ => {
            // Cancelled meanwhile: the message goes back untouched.
            if !d.no_ack {
                ch.channel_credit.release(1);
            }
            d.queue.requeue(vec![d.entry], !d.no_ack, false, now.ms);
            return release_held(ctx, ch, io, now);
        }
    };
    let tag = ch.next_tag;
    ch.next_tag += 1;
    ctx.count(|c| c.consumer_delivery(d.no_ack, d.entry.redelivered));
    ch.stats.count_deliver(d.no_ack, d.entry.redelivered);
    let m = &d.entry.message;
    let args = DeliverArgs {
        consumer_tag: &d.consumer_tag,
        delivery_tag: tag,
        redelivered: d.entry.redelivered,
        exchange: &m.exchange,
        routing_key: &m.routing_key,
    };
    io.out
        .deliver(io.id, &args, |b| d.entry.encode_properties(b), &m.body);
    trace_delivery(ctx, io.id, d.queue.name(), m, d.entry.redelivered, now);
    if !d.no_ack {
        let deadline = ack_deadline(ctx, &d.queue, now.at);
        ch.unacked.push_back(Unacked {
            tag,
            queue: d.queue,
            entry: d.entry,
            credit: Some(credit),
            deadline,
            remote: None,
        });
        ch.count_unacked();
    }
}

/// A delivery (or get-ok) of `message` from `queue` on `channel`, traced to
/// the firehose while the vhost's tracing is on.
#[inline]
fn trace_delivery(
    ctx: &ConnCtx,
    channel: u16,
    queue: &str,
    message: &Message,
    redelivered: bool,
    now: Now,
) {
    if ctx.vhost.tracing() {
        crate::broker::firehose::delivered(
            &ctx.vhost,
            queue,
            message,
            redelivered,
            &ctx.tap(channel),
            now.ms,
        );
    }
}

/// basic.get answered by the queue's home node: get-ok with this channel's
/// tag (the message unacked on the home node under `getter` unless no-ack).
#[allow(clippy::too_many_arguments)]
pub fn got_remote(
    ctx: &ConnCtx,
    ch: &mut Channel,
    io: &mut ChannelIo<'_>,
    queue: Arc<Queue>,
    getter: RemoteConsumer,
    no_ack: bool,
    (home_tag, redelivered, remaining): (u64, bool, u64),
    (message, properties): (Arc<Message>, bytes::Bytes),
    now: Now,
) {
    ctx.count(|c| c.got(no_ack, redelivered));
    ch.stats.count_get(no_ack, redelivered);
    let tag = ch.next_tag;
    ch.next_tag += 1;
    io.method(
        &BasicGetOk {
            delivery_tag: tag,
            redelivered,
            exchange: message.exchange.to_string(),
            routing_key: message.routing_key.to_string(),
            message_count: remaining as u32,
        }
        .into(),
    );
    io.out
        .content(io.id, |b| b.extend_from_slice(&properties), &message.body);
    trace_delivery(ctx, io.id, queue.name(), &message, redelivered, now);
    if !no_ack {
        let deadline = ack_deadline(ctx, &queue, now.at);
        let mut entry = Entry::new(0, message, None);
        entry.redelivered = redelivered;
        ch.unacked.push_back(Unacked {
            tag,
            queue,
            entry,
            credit: None,
            deadline,
            remote: Some((getter, home_tag)),
        });
        ch.count_unacked();
    }
}

/// Why a stream refuses basic.get (RabbitMQ's words; the admin API's get
/// answers it too).
pub fn stream_get_refused(queue: &str, vhost: &str) -> String {
    format!("basic.get not supported by stream queues queue '{queue}' in vhost '{vhost}'")
}

/// A consumer on another node delivered: assign a tag of this channel and
/// write it (no-ack consumers ack it on the home node at once). While the
/// channel-wide prefetch (basic.qos global) is full it waits here, behind
/// any delivery already waiting, for acks to make room ([`release_held`]).
pub fn deliver_remote(
    ctx: &ConnCtx,
    ch: &mut Channel,
    io: &mut ChannelIo<'_>,
    d: RemoteDelivery,
    now: Now,
) {
    let Some((queue, no_ack, windowed)) = remote_target(ch, io, &d) else {
        // Cancelled meanwhile: back to the home node's queue.
        return d.unsent();
    };
    if windowed && (!ch.held_remote.is_empty() || !ch.channel_credit.try_acquire()) {
        ch.held_remote.push_back(d);
        return;
    }
    write_remote(ctx, ch, io, d, queue, no_ack, windowed, now);
}

/// Write the deliveries of remote consumers that wait for room in the
/// channel-wide prefetch, in their order, while it has room (those of
/// consumers cancelled meanwhile go back to their home nodes).
pub fn release_held(ctx: &ConnCtx, ch: &mut Channel, io: &mut ChannelIo<'_>, now: Now) {
    while let Some(d) = ch.held_remote.front() {
        let target = remote_target(ch, io, d);
        if target.as_ref().is_some_and(|t| t.2) && !ch.channel_credit.try_acquire() {
            return;
        }
        let Some(d) = ch.held_remote.pop_front() else {
            return;
        };
        match target {
            Some((queue, no_ack, windowed)) => {
                write_remote(ctx, ch, io, d, queue, no_ack, windowed, now)
            }
            None => d.unsent(),
        }
    }
}

/// The queue of the remote consumer `d` came from, whether that consumer is
/// no-ack, and whether its deliveries count against the channel-wide
/// prefetch (not no-ack ones, nor a stream's, as locally); None when the
/// consumer is gone from this channel or the channel is closing.
fn remote_target(
    ch: &Channel,
    io: &ChannelIo<'_>,
    d: &RemoteDelivery,
) -> Option<(Arc<Queue>, bool, bool)> {
    let cref = ch.consumers.get(&d.consumer_tag)?;
    if io.closing || cref.remote.as_ref().is_none_or(|r| r.cid != d.consumer.cid) {
        return None;
    }
    let no_ack = cref.consumer.no_ack;
    let windowed = !no_ack && cref.queue.stream().is_none();
    Some((Arc::clone(&cref.queue), no_ack, windowed))
}

/// Write remote delivery `d` under a new tag of this channel; `windowed`: it
/// holds a unit of the channel-wide prefetch, given back when it is settled.
#[allow(clippy::too_many_arguments)]
fn write_remote(
    ctx: &ConnCtx,
    ch: &mut Channel,
    io: &mut ChannelIo<'_>,
    d: RemoteDelivery,
    queue: Arc<Queue>,
    no_ack: bool,
    windowed: bool,
    now: Now,
) {
    let tag = ch.next_tag;
    ch.next_tag += 1;
    ctx.count(|c| c.consumer_delivery(no_ack, d.redelivered));
    ch.stats.count_deliver(no_ack, d.redelivered);
    let m = &d.message;
    let args = DeliverArgs {
        consumer_tag: &d.consumer_tag,
        delivery_tag: tag,
        redelivered: d.redelivered,
        exchange: &m.exchange,
        routing_key: &m.routing_key,
    };
    let props = &d.properties;
    io.out
        .deliver(io.id, &args, |b| b.extend_from_slice(props), &m.body);
    trace_delivery(ctx, io.id, queue.name(), m, d.redelivered, now);
    if no_ack {
        return d
            .consumer
            .home
            .settle(d.consumer.cid, vec![d.tag], RemoteSettle::Ack);
    }
    let deadline = ack_deadline(ctx, &queue, now.at);
    let mut entry = Entry::new(0, Arc::clone(&d.message), None);
    entry.redelivered = d.redelivered;
    ch.unacked.push_back(Unacked {
        tag,
        queue,
        entry,
        // Marks the channel-wide unit it holds (see `settle_remote`).
        credit: windowed.then(|| Arc::clone(&ch.channel_credit)),
        deadline,
        remote: Some((d.consumer, d.tag)),
    });
    ch.count_unacked();
}

/// A delivery has stayed unacked past its consumer timeout at `now`: the error
/// to close this channel with (RabbitMQ's wording).
pub fn ack_timed_out(ch: &Channel, io: &ChannelIo<'_>, now: Instant) -> Option<AmqpError> {
    if io.closing {
        return None;
    }
    let ms = ch
        .unacked
        .iter()
        .filter(|u| u.remote.as_ref().is_none_or(|(r, _)| r.is_alive()))
        .filter_map(|u| u.deadline)
        .find(|(at, _)| *at <= now)?
        .1;
    Some(AmqpError::precondition_failed(format!(
        "delivery acknowledgement on channel {} timed out. Timeout value used: {ms} ms. \
         This timeout value can be configured, see consumers doc guide to learn more",
        io.id
    )))
}

/// The queue behind a consumer was deleted.
/// Clustered: the home node answered the opening of consumer `tag`: its
/// consume-ok goes out now, or its refusal closes the channel (the error
/// returned), with the home node's reply code and text, as a local
/// basic.consume would have been refused.
pub fn consume_answered(
    ch: &mut Channel,
    io: &mut ChannelIo<'_>,
    tag: &Arc<str>,
    answer: Result<(), (u16, String)>,
    notify: bool,
) -> Result<(), AmqpError> {
    let Some(c) = ch.consumers.get(tag) else {
        return Ok(());
    };
    let Some(nowait) = c.unanswered else {
        // (Answered already: a refusal now can only be an end.)
        if answer.is_err() {
            ch.consumers.remove(tag);
            if notify && !io.closing {
                io.method(
                    &BasicCancel {
                        consumer_tag: tag.to_string(),
                        nowait: true,
                    }
                    .into(),
                );
            }
        }
        return Ok(());
    };
    match answer {
        Ok(()) => {
            if let Some(c) = ch.consumers.get_mut(tag) {
                c.unanswered = None;
            }
            if !nowait && !io.closing {
                io.method(
                    &BasicConsumeOk {
                        consumer_tag: tag.to_string(),
                    }
                    .into(),
                );
            }
            Ok(())
        }
        Err((code, text)) => {
            ch.consumers.remove(tag);
            Err(AmqpError {
                code,
                text,
                hard: false,
                class_id: 60,
                method_id: 20,
            })
        }
    }
}

/// The queue went away under consumer `tag` (or, clustered, the link to its
/// home node did). One whose opening the home node never answered gets the
/// channel error a basic.consume on a queue whose home node is down gets
/// (returned); the others a basic.cancel when the client takes them.
pub fn consumer_cancelled(
    ctx: &ConnCtx,
    ch: &mut Channel,
    io: &mut ChannelIo<'_>,
    tag: &Arc<str>,
    notify: bool,
) -> Result<(), AmqpError> {
    if let Some(c) = ch.consumers.get(tag).filter(|c| c.unanswered.is_some()) {
        let node = c.remote.as_ref().map_or("", |r| r.home.node());
        let e = home_down(ctx, &c.queue, node).at(60, 20);
        ch.consumers.remove(tag);
        return Err(e);
    }
    if ch.consumers.remove(tag).is_some() && notify && !io.closing {
        io.method(
            &BasicCancel {
                consumer_tag: tag.to_string(),
                nowait: true,
            }
            .into(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    //! Consumer timeouts on virtual time: a delivery's deadline comes from the `now`
    //! it was delivered at, and the timeout fires at that exact moment, not before.

    use super::*;
    use crate::broker::queue::DeliverySink;
    use crate::broker::vhost::PublishFrom;
    use crate::broker::vhost::QueueDeclare;
    use crate::broker::Broker;
    use crate::session::{Confirms, Output};
    use std::collections::VecDeque;

    /// Deliveries the queue hands this "connection", kept for the test to pass on.
    #[derive(Debug, Default)]
    struct Mailbox(parking_lot::Mutex<Vec<Delivery>>);

    impl DeliverySink for Mailbox {
        fn deliver(&self, d: Delivery) -> Result<(), Delivery> {
            self.0.lock().push(d);
            Ok(())
        }
        fn cancelled(&self, _: u16, _: Arc<str>) {}
    }

    fn at(t0: Now, ms: u64) -> Now {
        Now {
            at: t0.at + Duration::from_millis(ms),
            ms: t0.ms + ms,
        }
    }

    #[test]
    fn consumer_timeout_fires_at_the_exact_moment() {
        let broker = Broker::new(&crate::Config::default());
        let mailbox = Arc::new(Mailbox::default());
        let ctx = ConnCtx {
            vhost: broker.vhost("/").expect("default vhost"),
            broker,
            id: 1,
            name: "test".into(),
            user: "guest".into(),
            sink: Arc::clone(&mailbox) as Arc<dyn DeliverySink>,
            cancel_notify: true,
            limits: crate::config::Limits {
                consumer_timeout_ms: Some(300),
                ..Default::default()
            },
            token: None,
        };
        // Any origin works: only the distances from it matter.
        let t0 = Now {
            at: Instant::now(),
            ms: 1_000_000,
        };
        ctx.vhost
            .declare_queue(
                &QueueDeclare {
                    name: "q".into(),
                    ..Default::default()
                },
                ctx.id,
                t0.ms,
            )
            .expect("declare");
        let (mut out, mut confirms, mut waits) =
            (Output::new(4096), Confirms::default(), VecDeque::new());
        let mut io = ChannelIo {
            id: 1,
            closing: false,
            out: &mut out,
            confirms: &mut confirms,
            waits: &mut waits,
        };
        let mut ch = Channel::default();
        let consume = BasicConsume {
            queue: "q".into(),
            consumer_tag: "c".into(),
            ..Default::default()
        };
        super::super::dispatch(&ctx, &mut ch, &mut io, consume.into(), t0).expect("consume");
        let publish = |body: &'static [u8], now: Now| {
            let m = Message::new(
                "",
                "q",
                BasicProperties::default(),
                bytes::Bytes::from_static(body),
            );
            ctx.vhost
                .publish("", &m, PublishFrom::Client, now.ms)
                .expect("publish");
            let ds: Vec<Delivery> = std::mem::take(&mut *mailbox.0.lock());
            assert_eq!(ds.len(), 1, "one delivery");
            ds
        };
        // Delivered at t0 + 100: due at t0 + 400.
        for d in publish(b"a", at(t0, 100)) {
            deliver(&ctx, &mut ch, &mut io, d, at(t0, 100));
        }
        assert!(ack_timed_out(&ch, &io, at(t0, 399).at).is_none());
        let e = ack_timed_out(&ch, &io, at(t0, 400).at).expect("timed out at t0 + 400");
        assert_eq!(e.code, crate::wire::reply_code::PRECONDITION_FAILED);
        assert!(e.text.contains("Timeout value used: 300 ms"), "{}", e.text);
        // Acked in time: no timeout ever after.
        let ack = BasicAck {
            delivery_tag: 1,
            multiple: false,
        };
        super::super::dispatch(&ctx, &mut ch, &mut io, ack.into(), at(t0, 399)).expect("ack");
        assert!(ack_timed_out(&ch, &io, at(t0, 10_000).at).is_none());
        // The next delivery's deadline counts from its own delivery.
        for d in publish(b"b", at(t0, 5_000)) {
            deliver(&ctx, &mut ch, &mut io, d, at(t0, 5_000));
        }
        assert!(ack_timed_out(&ch, &io, at(t0, 5_299).at).is_none());
        assert!(ack_timed_out(&ch, &io, at(t0, 5_300).at).is_some());
    }
}
