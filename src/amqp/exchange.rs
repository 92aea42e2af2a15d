//! The exchange class: declare, delete, bind and unbind (exchange to exchange).

use super::{not_from_client, ConnCtx};
use crate::broker::auth::Access;
use crate::broker::exchange::Destination;
use crate::broker::vhost::ExchangeDeclare;
use crate::error::AmqpResult;
use crate::session::ChannelIo;
use crate::wire::*;

pub fn handle(ctx: &ConnCtx, io: &mut ChannelIo<'_>, method: Method) -> AmqpResult<()> {
    let vhost = &ctx.vhost;
    match method {
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
                io.method(&ExchangeDeclareOk::default().into());
            }
        }
        Method::ExchangeDelete(d) => {
            ctx.permit(Access::Configure, "exchange", &d.exchange)?;
            vhost.delete_exchange(&d.exchange, d.if_unused)?;
            if !d.nowait {
                io.method(&ExchangeDeleteOk::default().into());
            }
        }
        Method::ExchangeBind(b) => {
            ctx.permit(Access::Write, "exchange", &b.destination)?;
            ctx.permit(Access::Read, "exchange", &b.source)?;
            ctx.permit_topic(Access::Read, &b.source, [b.routing_key.as_str()])?;
            let dest = Destination::Exchange(b.destination.as_str().into());
            vhost.bind(&b.source, dest, &b.routing_key, &b.arguments, ctx.id)?;
            if !b.nowait {
                io.method(&ExchangeBindOk::default().into());
            }
        }
        Method::ExchangeUnbind(b) => {
            ctx.permit(Access::Write, "exchange", &b.destination)?;
            ctx.permit(Access::Read, "exchange", &b.source)?;
            ctx.permit_topic(Access::Read, &b.source, [b.routing_key.as_str()])?;
            let dest = Destination::Exchange(b.destination.as_str().into());
            vhost.unbind(&b.source, dest, &b.routing_key, &b.arguments, ctx.id)?;
            if !b.nowait {
                io.method(&ExchangeUnbindOk::default().into());
            }
        }
        other => return Err(not_from_client(&other)),
    }
    Ok(())
}
