//! Stream retention settings and RabbitMQ's `x-max-age` syntax.

/// Default `x-stream-max-segment-size-bytes` (RabbitMQ's 500 MB).
pub const DEFAULT_MAX_SEGMENT_SIZE: u64 = 500_000_000;

/// How much of a stream is kept. Only whole segments are dropped, oldest
/// first, never the one being written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// `x-max-length-bytes`: drop old segments while the rest is still larger.
    pub max_bytes: Option<u64>,
    /// `x-max-age` in ms: drop segments whose newest chunk is older.
    pub max_age_ms: Option<u64>,
    /// `x-stream-max-segment-size-bytes`: a new segment starts past this size.
    pub max_segment_size: u64,
    /// `x-stream-filter-size-bytes`: the size of a chunk's bloom filter (16
    /// to 255), when any of its messages has a filter value.
    pub filter_size: u8,
}

/// Default `x-stream-filter-size-bytes` (RabbitMQ's).
pub const DEFAULT_FILTER_SIZE: u8 = 16;

impl Default for Retention {
    fn default() -> Self {
        Retention {
            max_bytes: None,
            max_age_ms: None,
            max_segment_size: DEFAULT_MAX_SEGMENT_SIZE,
            filter_size: DEFAULT_FILTER_SIZE,
        }
    }
}

/// Parse an age as RabbitMQ writes it: a positive integer and one unit of
/// `Y` (365 days), `M` (30 days), `D`, `h`, `m`, `s`. Returns milliseconds.
pub fn parse_age(s: &str) -> Option<u64> {
    let unit = s.chars().last()?;
    let n: u64 = s[..s.len() - unit.len_utf8()].parse().ok()?;
    if s.len() < 2 || !s.as_bytes()[0].is_ascii_digit() {
        return None;
    }
    let secs = match unit {
        'Y' => 365 * 86_400,
        'M' => 30 * 86_400,
        'D' => 86_400,
        'h' => 3_600,
        'm' => 60,
        's' => 1,
        _ => return None,
    };
    n.checked_mul(secs * 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_in_rabbitmq_units() {
        assert_eq!(parse_age("7D"), Some(7 * 86_400_000));
        assert_eq!(parse_age("12h"), Some(12 * 3_600_000));
        assert_eq!(parse_age("30m"), Some(1_800_000));
        assert_eq!(parse_age("10s"), Some(10_000));
        assert_eq!(parse_age("1Y"), Some(365 * 86_400_000));
        assert_eq!(parse_age("1M"), Some(30 * 86_400_000));
        for bad in ["", "D", "10", "10x", "-1D", "1.5h", "+1h", "1d"] {
            assert_eq!(parse_age(bad), None, "{bad}");
        }
    }
}
