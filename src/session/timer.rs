//! The session's clocks, all driven by the `now` its caller passes in: the
//! handshake deadline, heartbeats to send when idle, the peer's heartbeat loss
//! (two missed intervals; time spent not reading is not counted against the
//! peer), the wait for `connection.close-ok` and the expiry of the
//! connection's credential (an access token's `exp`).

use std::time::{Duration, Instant};

/// How long we wait for `connection.close-ok` after sending `connection.close`.
pub const CLOSE_OK_TIMEOUT: Duration = Duration::from_secs(3);

#[derive(Debug)]
pub(crate) struct Timers {
    /// The handshake must finish by then.
    pub handshake: Option<Instant>,
    /// After we sent connection.close: give up waiting for close-ok then.
    pub close: Option<Instant>,
    /// The negotiated heartbeat (None: off).
    pub heartbeat: Option<Duration>,
    pub last_read: Instant,
    pub last_write: Instant,
    /// We are not reading from the peer (back-pressure or a blocked publisher).
    pub paused: bool,
    /// The credential (an access token) expires then: the connection is closed.
    pub credential: Option<Instant>,
}

/// What a timeout means.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Expired {
    Handshake,
    CloseOk,
    PeerDead,
    SendHeartbeat,
    Credential,
}

impl Timers {
    pub fn new(now: Instant, handshake_timeout: Duration) -> Timers {
        Timers {
            handshake: Some(now + handshake_timeout),
            close: None,
            heartbeat: None,
            last_read: now,
            last_write: now,
            paused: false,
            credential: None,
        }
    }

    /// The peer is dead when nothing was read for two intervals.
    fn dead_at(&self) -> Option<Instant> {
        match (self.heartbeat, self.paused) {
            (Some(hb), false) => Some(self.last_read + hb * 2),
            _ => None,
        }
    }

    /// A heartbeat goes out when nothing was written for half an interval.
    fn send_at(&self) -> Option<Instant> {
        self.heartbeat.map(|hb| self.last_write + hb / 2)
    }

    pub fn next(&self) -> Option<Instant> {
        [
            self.handshake,
            self.close,
            self.dead_at(),
            self.send_at(),
            self.credential,
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// The most urgent timer that has run out at `now`.
    pub fn expired(&self, now: Instant) -> Option<Expired> {
        let due = |t: Option<Instant>| t.is_some_and(|t| t <= now);
        if due(self.handshake) {
            Some(Expired::Handshake)
        } else if due(self.close) {
            Some(Expired::CloseOk)
        } else if due(self.credential) {
            Some(Expired::Credential)
        } else if due(self.dead_at()) {
            Some(Expired::PeerDead)
        } else if due(self.send_at()) {
            Some(Expired::SendHeartbeat)
        } else {
            None
        }
    }

    /// Reading stops or resumes; a resumed peer gets a fresh interval.
    pub fn set_paused(&mut self, paused: bool, now: Instant) {
        if self.paused && !paused {
            self.last_read = now;
        }
        self.paused = paused;
    }
}
