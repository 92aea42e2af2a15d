//! Shared by the tutorial examples: connecting, and taking messages with a timeout.

use futures::StreamExt;
use lapin::{Connection, ConnectionProperties, Consumer};
use std::time::Duration;

pub type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// The broker URI: the first argument, or warren's default.
pub fn uri() -> String {
    std::env::args()
        .nth(1)
        .unwrap_or_else(|| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

pub async fn connect() -> Res<Connection> {
    let props = ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio);
    Ok(Connection::connect(&uri(), props).await?)
}

/// The next delivery, or an error if none arrives within 5 s.
pub async fn next(consumer: &mut Consumer) -> Res<lapin::message::Delivery> {
    match tokio::time::timeout(Duration::from_secs(5), consumer.next()).await {
        Ok(Some(d)) => Ok(d?),
        Ok(None) => Err("consumer cancelled".into()),
        Err(_) => Err("no message within 5 s".into()),
    }
}
