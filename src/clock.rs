//! The wall clock, read on the I/O side only.
//!
//! The broker core (`broker`) never reads a clock: every entry point that needs
//! the time takes `now` (ms since the Unix epoch) from its caller. The server,
//! the admin API and the ticker read it here, once per event, and pass it in, so
//! the core behaves the same for the same inputs and tests can choose `now`.

/// Milliseconds since the Unix epoch (0 if the system clock is before it).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// One reading of both clocks, taken by the I/O side and passed down: `at`
/// (monotonic) for deadlines such as consumer timeouts, `ms` (the wall clock, ms
/// since the epoch) for the broker's message times (TTL, x-expires, x-death).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub at: std::time::Instant,
    pub ms: u64,
}

impl Now {
    /// Read both clocks now.
    pub fn read() -> Now {
        Now {
            at: std::time::Instant::now(),
            ms: now_ms(),
        }
    }
}
