//! Whether the broker's periodic work is wanted soon. The core reads no
//! clock: the server's ticker calls [`Broker::tick`](crate::broker::Broker::tick)
//! with the time. While a queue may have messages to expire, a queue may
//! expire itself (`x-expires`, `x-message-ttl`) or a delayed exchange holds
//! messages, it ticks every [`FAST`]; otherwise every [`SLOW`] (streams'
//! retention, resource checks), and the core calls [`Ticks::want`] when
//! something starts wanting ticks, so an idle broker wakes a few times a
//! second instead of fifty.

use std::time::Duration;

/// The ticker's period while anything wants ticks (message expiry's precision).
pub const FAST: Duration = Duration::from_millis(20);
/// The ticker's period otherwise.
pub const SLOW: Duration = Duration::from_millis(200);

/// The wake-up the core gives the ticker. One per broker, shared with its
/// vhosts.
#[derive(Debug, Default)]
pub struct Ticks {
    wanted: tokio::sync::Notify,
}

impl Ticks {
    /// Something began to want ticks (a message that may expire went into a
    /// queue, a queue became timed, a delayed message is held). Kept until
    /// the ticker looks, if it is not waiting.
    pub fn want(&self) {
        self.wanted.notify_one();
    }

    /// Wait for [`want`](Self::want) (at once if it was called meanwhile).
    pub async fn wanted(&self) {
        self.wanted.notified().await;
    }
}
