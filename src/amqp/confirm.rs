//! The confirm class: confirm.select (the batching itself is the session's).

use super::{not_from_client, Channel};
use crate::error::{AmqpError, AmqpResult};
use crate::session::ChannelIo;
use crate::wire::*;

pub fn handle(ch: &mut Channel, io: &mut ChannelIo<'_>, method: Method) -> AmqpResult<()> {
    match method {
        Method::ConfirmSelect(c) => {
            if ch.tx.is_some() {
                return Err(AmqpError::precondition_failed(
                    "cannot switch from tx to confirm mode",
                ));
            }
            io.confirms.enable();
            ch.stats
                .confirm
                .store(true, std::sync::atomic::Ordering::Relaxed);
            if !c.nowait {
                io.method(&ConfirmSelectOk::default().into());
            }
            Ok(())
        }
        other => Err(not_from_client(&other)),
    }
}
