//! Frame routing once the connection runs: connection-level methods, channel
//! open / close / flow, content frames to assembly, and broker-class methods
//! out as events; protocol violations become their hard or soft errors.

use super::channel::Channel;
use super::connection::{broker_class, no_channel, Event, Session};
use super::content::{Assembled, Pending};
use crate::error::AmqpError;
use crate::wire::*;
use std::time::Instant;

impl<T: Default> Session<T> {
    pub(super) fn on_running_frame(&mut self, frame: Frame, now: Instant) -> Result<(), AmqpError> {
        match frame {
            Frame::Heartbeat { channel: 0 } => Ok(()),
            Frame::Heartbeat { channel } => Err(AmqpError::frame_error(format!(
                "heartbeat frame on channel {channel}"
            ))),
            Frame::Method { channel: 0, method } => self.on_connection_method(method),
            Frame::Method { channel, method } => {
                let (class_id, method_id) = (method.class_id(), method.method_id());
                if class_id == ConnectionClose::CLASS_ID {
                    return Err(AmqpError::command_invalid(format!(
                        "{} on channel {channel}",
                        method.name()
                    ))
                    .at(class_id, method_id));
                }
                if matches!(method, Method::BasicPublish(_)) && !self.published {
                    self.published = true;
                    self.update_blocked(now);
                }
                match self.on_channel_method(channel, method) {
                    Ok(()) => Ok(()),
                    Err(e) => {
                        self.channel_error(channel, e.at(class_id, method_id), now);
                        Ok(())
                    }
                }
            }
            Frame::Header {
                channel,
                class_id,
                body_size,
                properties,
            } => {
                let max = self.config.max_message_size;
                let Some(p) = self.pending_content(channel, "header")? else {
                    return Ok(());
                };
                let r = p.header(channel, class_id, body_size, properties, max);
                self.content_result(channel, r, now);
                Ok(())
            }
            Frame::Body { channel, payload } => {
                let Some(p) = self.pending_content(channel, "body")? else {
                    return Ok(());
                };
                let r = p.body(channel, payload);
                self.content_result(channel, r, now);
                Ok(())
            }
        }
    }

    /// The publish a content `part` (header or body) frame continues: None on a
    /// channel that is closing (the frame is dropped); 505 if none is under way.
    fn pending_content(&mut self, channel: u16, part: &str) -> Result<Option<Pending>, AmqpError> {
        let ch = self
            .channels
            .get_mut(&channel)
            .ok_or_else(|| no_channel(channel))?;
        if ch.closing {
            return Ok(None);
        }
        ch.pending.take().map(Some).ok_or_else(|| {
            AmqpError::unexpected_frame(format!(
                "expected method frame, got content {part} on channel {channel}"
            ))
        })
    }

    pub(super) fn content_result(
        &mut self,
        channel: u16,
        r: Result<Result<Assembled, Pending>, AmqpError>,
        now: Instant,
    ) {
        match r {
            Ok(Ok(message)) => self.events.push_back(Event::Publish { channel, message }),
            Ok(Err(pending)) => {
                if let Some(ch) = self.channels.get_mut(&channel) {
                    ch.pending = Some(pending);
                }
            }
            Err(e) => self.channel_error(channel, e, now),
        }
    }

    pub(super) fn on_connection_method(&mut self, method: Method) -> Result<(), AmqpError> {
        match method {
            Method::ConnectionClose(_) => {
                // The caller releases channels (events) before close-ok is written
                // out, so a client that saw close-ok never finds them still held.
                self.out.method(0, &ConnectionCloseOk::default().into());
                self.finish(None, true);
                Ok(())
            }
            Method::ConnectionCloseOk(_) => {
                self.finish(None, true);
                Ok(())
            }
            Method::ConnectionUpdateSecret(m) => {
                self.events.push_back(Event::UpdateSecret {
                    secret: m.new_secret,
                    reason: m.reason,
                });
                Ok(())
            }
            Method::ConnectionBlocked(_) | Method::ConnectionUnblocked(_) => Ok(()),
            other => Err(AmqpError::command_invalid(format!(
                "{} is not valid on channel 0",
                other.name()
            ))
            .at(other.class_id(), other.method_id())),
        }
    }

    pub(super) fn on_channel_method(
        &mut self,
        channel: u16,
        method: Method,
    ) -> Result<(), AmqpError> {
        // RabbitMQ's check: opening one more channel than channel_max (530).
        // It counts the open channels, never bounds their numbers: a client
        // may open channel 65535 under channel_max 2047 (aiormq's suite does).
        if matches!(method, Method::ChannelOpen(_))
            && self.channel_max != 0
            && !self.channels.contains_key(&channel)
            && self.channels.len() >= usize::from(self.channel_max)
        {
            return Err(AmqpError::not_allowed(format!(
                "number of channels opened ({}) has reached the negotiated channel_max ({})",
                self.channels.len(),
                self.channel_max
            )));
        }
        match method {
            Method::ChannelOpen(_) => {
                if self.channels.contains_key(&channel) {
                    return Err(AmqpError::channel_error("second 'channel.open' seen"));
                }
                if let Some(gate) = self.channel_gate.as_mut() {
                    (gate.0)(channel)?;
                }
                self.channels.insert(channel, Channel::new());
                self.out.method(channel, &ChannelOpenOk::default().into());
                self.events.push_back(Event::ChannelOpened { channel });
                Ok(())
            }
            Method::ChannelClose(_) => {
                let mut ch = self
                    .channels
                    .remove(&channel)
                    .ok_or_else(|| no_channel(channel))?;
                ch.confirms.flush(channel, &mut self.out, &mut self.waits);
                self.out.method(channel, &ChannelCloseOk::default().into());
                self.events.push_back(Event::ChannelClosed {
                    channel,
                    data: ch.data,
                });
                Ok(())
            }
            Method::ChannelCloseOk(_) => {
                if self.channels.get(&channel).is_some_and(|c| c.closing) {
                    if let Some(ch) = self.channels.remove(&channel) {
                        self.events.push_back(Event::ChannelClosed {
                            channel,
                            data: ch.data,
                        });
                    }
                }
                Ok(())
            }
            method => {
                let ch = self
                    .channels
                    .get_mut(&channel)
                    .ok_or_else(|| no_channel(channel))?;
                if ch.closing {
                    return Ok(());
                }
                if ch.pending.is_some() {
                    return Err(AmqpError::unexpected_frame(format!(
                        "expected content header for class 60, got non content header frame {} instead",
                        method.name()
                    )));
                }
                match method {
                    Method::BasicPublish(p) => {
                        if p.immediate {
                            return Err(AmqpError::not_implemented("immediate=true"));
                        }
                        ch.pending = Some(Pending::new(p));
                    }
                    Method::ChannelFlow(f) => {
                        if !f.active {
                            // RabbitMQ refuses to stop deliveries with channel.flow.
                            return Err(AmqpError::not_implemented("active=false"));
                        }
                        self.out
                            .method(channel, &ChannelFlowOk { active: true }.into());
                        self.events.push_back(Event::Resume { channel });
                    }
                    Method::ChannelFlowOk(_) => {}
                    Method::AccessRequest(_) => {
                        self.out
                            .method(channel, &AccessRequestOk { reserved_1: 1 }.into());
                    }
                    m if broker_class(m.class_id()) => {
                        self.events.push_back(Event::Method { channel, method: m })
                    }
                    other => {
                        return Err(AmqpError::command_invalid(format!(
                            "method {} is not valid from a client on a channel",
                            other.name()
                        )))
                    }
                }
                Ok(())
            }
        }
    }
}
