//! RabbitMQ tutorial 3, "Publish/Subscribe": a fanout exchange and two subscribers,
//! each with its own exclusive server-named queue.
//!
//!   cargo run --example tutorial_3_publish_subscribe [-- amqp://guest:guest@127.0.0.1:5672/%2f]

#[path = "tutorial/mod.rs"]
mod tutorial;

use lapin::options::*;
use lapin::{types::FieldTable, BasicProperties, ExchangeKind};
use tutorial::*;

#[tokio::main]
async fn main() -> Res<()> {
    let conn = connect().await?;
    let ch = conn.create_channel().await?;
    ch.exchange_declare(
        "logs",
        ExchangeKind::Fanout,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let mut subscribers = Vec::new();
    for _ in 0..2 {
        subscribers.push(subscribe(&ch, "logs", &[""]).await?);
    }
    for msg in ["info: Hello World!", "warning: disk at 80%"] {
        ch.basic_publish(
            "logs",
            "",
            BasicPublishOptions::default(),
            msg.as_bytes(),
            BasicProperties::default(),
        )
        .await?;
        println!(" [x] Sent {msg}");
    }
    for (i, s) in subscribers.iter_mut().enumerate() {
        for _ in 0..2 {
            let d = next(s).await?;
            println!(
                " [subscriber {}] {}",
                i + 1,
                String::from_utf8_lossy(&d.data)
            );
        }
    }
    conn.close(200, "bye").await?;
    Ok(())
}
