//! The queue class: declare, bind, unbind, purge and delete.

use super::{not_from_client, Channel, ConnCtx};
use crate::broker::auth::Access;
use crate::broker::exchange::Destination;
use crate::broker::vhost::QueueDeclare;
use crate::clock::Now;
use crate::error::AmqpResult;
use crate::session::ChannelIo;
use crate::wire::*;

pub fn handle(
    ctx: &ConnCtx,
    ch: &mut Channel,
    io: &mut ChannelIo<'_>,
    method: Method,
    now: Now,
) -> AmqpResult<()> {
    let vhost = &ctx.vhost;
    // Clustered: the home node's counts for this method's reply (taken
    // first, so a method that fails leaves none behind).
    let remote_counts = ch.remote_counts.take();
    match method {
        Method::QueueDeclare(d) => {
            let nowait = d.nowait;
            let server_named = !d.passive && d.queue.is_empty();
            if !d.passive && !d.queue.is_empty() {
                ctx.permit(Access::Configure, "queue", &d.queue)?;
            }
            // Clustered: a durable queue whose home node is unreachable.
            if let Ok(q) = vhost.queue(&d.queue, ctx.id) {
                if let Some(home) = q.remote().filter(|h| q.spec.durable && !h.reachable()) {
                    return Err(super::basic::home_down(ctx, &q, home.node()));
                }
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
                now.ms,
            )?;
            if server_named {
                // RabbitMQ checks configure on the generated name.
                if let Err(e) = ctx.permit(Access::Configure, "queue", q.name()) {
                    vhost.remove_queue(&q)?;
                    return Err(e);
                }
            }
            ch.last_queue = Some(q.name().to_string());
            let (messages, consumers) =
                remote_counts.unwrap_or((stats.ready as u32, stats.consumers as u32));
            if !nowait {
                io.method(
                    &QueueDeclareOk {
                        queue: q.name().to_string(),
                        message_count: messages,
                        consumer_count: consumers,
                    }
                    .into(),
                );
            }
        }
        Method::QueueBind(b) => {
            let name = ch.queue_name(&b.queue)?;
            ctx.permit(Access::Write, "queue", &name)?;
            ctx.permit(Access::Read, "exchange", &b.exchange)?;
            ctx.permit_topic(Access::Read, &b.exchange, [b.routing_key.as_str()])?;
            let dest = Destination::Queue(name.as_str().into());
            vhost.bind(&b.exchange, dest, &b.routing_key, &b.arguments, ctx.id)?;
            if !b.nowait {
                io.method(&QueueBindOk::default().into());
            }
        }
        Method::QueueUnbind(b) => {
            let name = ch.queue_name(&b.queue)?;
            ctx.permit(Access::Write, "queue", &name)?;
            ctx.permit(Access::Read, "exchange", &b.exchange)?;
            ctx.permit_topic(Access::Read, &b.exchange, [b.routing_key.as_str()])?;
            let dest = Destination::Queue(name.as_str().into());
            vhost.unbind(&b.exchange, dest, &b.routing_key, &b.arguments, ctx.id)?;
            io.method(&QueueUnbindOk::default().into());
        }
        Method::QueuePurge(p) => {
            let name = ch.queue_name(&p.queue)?;
            ctx.permit(Access::Read, "queue", &name)?;
            let n = vhost.purge_queue(&name, ctx.id)?;
            if !p.nowait {
                io.method(
                    &QueuePurgeOk {
                        message_count: n as u32,
                    }
                    .into(),
                );
            }
        }
        Method::QueueDelete(d) => {
            let name = ch.queue_name(&d.queue)?;
            ctx.permit(Access::Configure, "queue", &name)?;
            let n = vhost.delete_queue(&name, d.if_unused, d.if_empty, ctx.id, now.ms)?;
            let n = remote_counts.map_or(n, |(m, _)| m as usize);
            if !d.nowait {
                io.method(
                    &QueueDeleteOk {
                        message_count: n as u32,
                    }
                    .into(),
                );
            }
        }
        other => return Err(not_from_client(&other)),
    }
    Ok(())
}
