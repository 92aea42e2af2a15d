//! The wall clock, read on the I/O side only.
//!
//! The broker core (`broker`) never reads a clock: every entry point that needs
//! the time takes `now` (ms since the Unix epoch) from its caller. The server,
//! the admin API and the ticker read it here, once per event, and pass it in, so
//! the core behaves the same for the same inputs and tests can choose `now`.
//! Also here: writing such a time as a UTC date ([`utc_date`]).

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

/// The UTC calendar date and time of `ms` since the epoch: (year, month, day,
/// hour, minute, second, millisecond).
pub fn utc_parts(ms: u64) -> (i64, u32, u32, u32, u32, u32, u32) {
    let secs = ms / 1000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        m as u32,
        d as u32,
        (rem / 3600) as u32,
        (rem % 3600 / 60) as u32,
        (rem % 60) as u32,
        (ms % 1000) as u32,
    )
}

/// `YYYY-MM-DD HH:MM:SS` (UTC), as RabbitMQ's shovel status timestamps.
pub fn utc_date(ms: u64) -> String {
    let (y, mo, d, h, mi, s, _) = utc_parts(ms);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}")
}

/// RFC 3339 in UTC with milliseconds (`2026-12-03T21:12:20.973+00:00`), as
/// RabbitMQ 3.10's management API writes a queue's `idle_since`.
pub fn utc_rfc3339(ms: u64) -> String {
    let (y, mo, d, h, mi, s, milli) = utc_parts(ms);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{mi:02}:{s:02}.{milli:03}+00:00")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc_date(0), "1970-01-01 00:00:00");
        assert_eq!(utc_date(1_709_251_199_000), "2024-02-29 23:59:59");
        assert_eq!(utc_date(1_798_761_600_000), "2027-01-01 00:00:00");
        assert_eq!(
            utc_rfc3339(1_796_332_340_973),
            "2026-12-03T21:12:20.973+00:00"
        );
    }
}
