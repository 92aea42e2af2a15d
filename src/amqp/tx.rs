//! The tx class: select, commit (publishes and settlements applied, commit-ok once
//! persistent messages are on disk) and rollback.

use super::{basic, not_from_client, Channel, ConnCtx, Tx};
use crate::clock::Now;
use crate::error::{AmqpError, AmqpResult};
use crate::session::ChannelIo;
use crate::wire::*;

pub fn handle(
    ctx: &ConnCtx,
    ch: &mut Channel,
    io: &mut ChannelIo<'_>,
    method: Method,
    now: Now,
) -> AmqpResult<()> {
    match method {
        Method::TxSelect(_) => {
            if io.confirms.enabled() {
                return Err(AmqpError::precondition_failed(
                    "cannot switch from confirm to tx mode",
                ));
            }
            if ch.tx.is_none() {
                ch.tx = Some(Tx::default());
            }
            io.method(&TxSelectOk::default().into());
        }
        Method::TxCommit(_) => {
            let tx = ch
                .tx
                .take()
                .ok_or_else(|| AmqpError::precondition_failed("channel is not transactional"))?;
            ch.tx = Some(Tx::default());
            let mut durable = false;
            for (exchange, mandatory, message, cc) in tx.publishes {
                let (d, forwarded) = basic::route_and_enqueue(
                    ctx, &ch.stats, io, &exchange, mandatory, message, &cc, now,
                )?;
                durable |= d;
                // Copies sent to other nodes: commit-ok waits for them too.
                if let Some(t) = forwarded {
                    ch.forwarded.push_back((0, t));
                    durable = true;
                }
            }
            for s in tx.settles {
                basic::apply_settle(ctx, ch, s, now)?;
            }
            if durable && (ctx.broker.store.is_some() || !ch.forwarded.is_empty()) {
                // commit-ok once the persistent messages are on disk.
                io.await_tx_flush();
            } else {
                io.method(&TxCommitOk::default().into());
            }
        }
        Method::TxRollback(_) => {
            let tx = ch
                .tx
                .as_mut()
                .ok_or_else(|| AmqpError::precondition_failed("channel is not transactional"))?;
            *tx = Tx::default();
            io.method(&TxRollbackOk::default().into());
        }
        other => return Err(not_from_client(&other)),
    }
    Ok(())
}
