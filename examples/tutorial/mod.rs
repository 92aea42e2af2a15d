//! Shared by the tutorial examples: connecting, and taking messages with a timeout.

use futures::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, Consumer};
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

/// A subscriber: an exclusive server-named queue bound to `exchange` with each of
/// `keys`, consumed without acks.
#[allow(dead_code)] // not every tutorial subscribes
pub async fn subscribe(ch: &Channel, exchange: &str, keys: &[&str]) -> Res<Consumer> {
    let exclusive = QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    };
    let q = ch
        .queue_declare("", exclusive, FieldTable::default())
        .await?;
    for key in keys {
        ch.queue_bind(
            q.name().as_str(),
            exchange,
            key,
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;
    }
    let no_ack = BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    Ok(ch
        .basic_consume(q.name().as_str(), "", no_ack, FieldTable::default())
        .await?)
}
