//! Content assembly: a `basic.publish` method, its content header and body frames
//! become one message, with today's checks (505 for frames out of order or a class
//! other than basic, 406 for a body over the size limit, 501 for a body longer
//! than its header said). Bodies stay `Bytes` slices of the read buffer; only a
//! body split over several frames is copied, once.

use crate::error::AmqpError;
use crate::wire::{BasicProperties, BasicPublish};
use bytes::{Bytes, BytesMut};

/// A publish waiting for its header or body frames.
#[derive(Debug)]
pub(crate) struct Pending {
    publish: BasicPublish,
    header: Option<(BasicProperties, u64)>,
    body: Body,
    received: u64,
}

#[derive(Debug)]
enum Body {
    Empty,
    One(Bytes),
    Many(BytesMut),
}

/// A message put together from its frames.
#[derive(Debug)]
pub struct Assembled {
    pub publish: BasicPublish,
    pub properties: BasicProperties,
    pub body: Bytes,
}

fn at_publish(e: AmqpError) -> AmqpError {
    e.at(BasicPublish::CLASS_ID, BasicPublish::METHOD_ID)
}

impl Pending {
    pub fn new(publish: BasicPublish) -> Pending {
        Pending {
            publish,
            header: None,
            body: Body::Empty,
            received: 0,
        }
    }

    /// The content header arrived. Ok(Some) when the message is complete (empty body).
    pub fn header(
        mut self,
        channel: u16,
        class_id: u16,
        body_size: u64,
        properties: BasicProperties,
        max_message_size: u64,
    ) -> Result<Result<Assembled, Pending>, AmqpError> {
        if self.header.is_some() {
            return Err(AmqpError::unexpected_frame(format!(
                "expected content body, got content header on channel {channel}"
            )));
        }
        if class_id != BasicPublish::CLASS_ID {
            return Err(AmqpError::unexpected_frame(format!(
                "content header for class {class_id} does not match basic.publish"
            )));
        }
        if body_size > max_message_size {
            return Err(at_publish(AmqpError::precondition_failed(format!(
                "message size {body_size} is larger than configured max size {max_message_size}"
            ))));
        }
        self.header = Some((properties, body_size));
        if body_size == 0 {
            return Ok(Ok(self.finish()));
        }
        Ok(Err(self))
    }

    /// A body frame arrived. Ok(Some) when the message is complete.
    pub fn body(
        mut self,
        channel: u16,
        payload: Bytes,
    ) -> Result<Result<Assembled, Pending>, AmqpError> {
        let Some((_, size)) = self.header.as_ref() else {
            return Err(AmqpError::unexpected_frame(format!(
                "expected content header, got content body on channel {channel}"
            )));
        };
        let size = *size;
        self.received += payload.len() as u64;
        if self.received > size {
            return Err(AmqpError::frame_error(format!(
                "content body is longer than the {size} bytes its header declared"
            )));
        }
        self.body = match std::mem::replace(&mut self.body, Body::Empty) {
            Body::Empty => Body::One(payload),
            Body::One(first) => {
                let mut b = BytesMut::with_capacity((size as usize).min(crate::wire::MAX_RESERVE));
                b.extend_from_slice(&first);
                b.extend_from_slice(&payload);
                Body::Many(b)
            }
            Body::Many(mut b) => {
                b.extend_from_slice(&payload);
                Body::Many(b)
            }
        };
        if self.received == size {
            return Ok(Ok(self.finish()));
        }
        Ok(Err(self))
    }

    fn finish(self) -> Assembled {
        let properties = self.header.map(|(p, _)| p).unwrap_or_default();
        let body = match self.body {
            Body::Empty => Bytes::new(),
            Body::One(b) => b,
            Body::Many(b) => b.freeze(),
        };
        Assembled {
            publish: self.publish,
            properties,
            body,
        }
    }
}
