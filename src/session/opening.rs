//! The opening handshake's states inside the session: start-ok, the caller's
//! login decision, tune-ok, connection.open and the caller's vhost decision.

use super::connection::{Event, Session, State};
use super::handshake;
use crate::error::AmqpError;
use crate::wire::*;
use std::time::{Duration, Instant};

impl<T: Default> Session<T> {
    /// The credentials of [`Event::Login`] are good: send connection.tune.
    pub fn accept_login(&mut self) {
        if self.state == State::Login {
            self.out.method(0, &self.offer.tune());
            self.state = State::TuneOk;
        }
    }

    /// The credentials of [`Event::Login`] are refused with `e` (a 403): closed
    /// with connection.close when the client understands it, else dropped.
    pub fn refuse_login(&mut self, e: AmqpError, now: Instant) {
        if self.state != State::Login {
            return;
        }
        if self.auth_close {
            self.close(e, now);
        } else {
            self.finish(Some(e.text), false);
        }
    }

    /// The login's refusal error, in RabbitMQ's words, for [`Self::refuse_login`].
    pub fn login_refused(&self) -> AmqpError {
        handshake::login_refused(&self.mechanism)
    }

    /// The vhost of [`Event::Open`] may be used: send open-ok, start heartbeats.
    pub fn accept_open(&mut self, now: Instant) {
        if self.state != State::OpenAnswer {
            return;
        }
        self.out.method(0, &ConnectionOpenOk::default().into());
        self.state = State::Running;
        self.timers.handshake = None;
        self.timers.heartbeat =
            (self.heartbeat > 0).then(|| Duration::from_secs(u64::from(self.heartbeat)));
        self.timers.last_read = now;
        self.timers.last_write = now;
        self.update_blocked(now);
    }

    /// The vhost of [`Event::Open`] is refused (530).
    pub fn refuse_open(&mut self, e: AmqpError, now: Instant) {
        if self.state == State::OpenAnswer {
            self.close(
                e.at(ConnectionOpen::CLASS_ID, ConnectionOpen::METHOD_ID),
                now,
            );
        }
    }

    /// A handshake step got the wrong method: 503, reported at the expected one.
    pub(super) fn unexpected(
        &mut self,
        got: &Method,
        expected: &str,
        ids: (u16, u16),
        now: Instant,
    ) {
        self.close(
            AmqpError::command_invalid(format!("expected {expected}, got {}", got.name()))
                .at(ids.0, ids.1),
            now,
        );
    }

    pub(super) fn on_handshake_frame(&mut self, frame: Frame, now: Instant) {
        let method = match frame {
            Frame::Heartbeat { .. } => return,
            Frame::Method { channel: 0, method } => method,
            other => {
                return self.finish(
                    Some(format!("unexpected frame during handshake: {other:?}")),
                    false,
                )
            }
        };
        match (self.state, method) {
            (State::StartOk, Method::ConnectionStartOk(s)) => {
                let caps = &s.client_properties;
                self.cancel_notify = handshake::client_capability(caps, "consumer_cancel_notify");
                self.blocked_cap = handshake::client_capability(caps, "connection.blocked");
                self.auth_close =
                    handshake::client_capability(caps, "authentication_failure_close");
                let credentials = if s.mechanism == handshake::EXTERNAL && self.external {
                    // The identity is the client certificate's; the response
                    // (an optional authorization id) is ignored, as RabbitMQ does.
                    Some((String::new(), String::new()))
                } else {
                    handshake::credentials(&s.mechanism, &s.response)
                };
                let Some((user, password)) = credentials else {
                    return self.close(handshake::bad_credentials(&s.mechanism), now);
                };
                self.client_properties = s.client_properties;
                self.mechanism = s.mechanism.clone();
                self.state = State::Login;
                self.events.push_back(Event::Login {
                    mechanism: s.mechanism,
                    user,
                    password,
                });
            }
            (State::StartOk, other) => self.unexpected(
                &other,
                "connection.start-ok",
                (ConnectionStartOk::CLASS_ID, ConnectionStartOk::METHOD_ID),
                now,
            ),
            (State::TuneOk, Method::ConnectionTuneOk(t)) => match self.offer.accept(&t) {
                Err(e) => self.close(e, now),
                Ok((frame_max, channel_max)) => {
                    self.frame_max = frame_max;
                    self.channel_max = channel_max;
                    self.heartbeat = t.heartbeat;
                    self.out.set_frame_max(frame_max);
                    self.codec.set_frame_max(frame_max);
                    self.state = State::Open;
                }
            },
            (State::TuneOk, other) => self.unexpected(
                &other,
                "connection.tune-ok",
                (ConnectionTuneOk::CLASS_ID, ConnectionTuneOk::METHOD_ID),
                now,
            ),
            (State::Open, Method::ConnectionOpen(o)) => {
                self.state = State::OpenAnswer;
                self.events.push_back(Event::Open {
                    vhost: o.virtual_host,
                });
            }
            (_, other) => self.unexpected(
                &other,
                "connection.open",
                (ConnectionOpen::CLASS_ID, ConnectionOpen::METHOD_ID),
                now,
            ),
        }
    }
}
