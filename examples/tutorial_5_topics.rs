//! RabbitMQ tutorial 5, "Topics": a topic exchange with `*` and `#` bindings.
//!
//!   cargo run --example tutorial_5_topics [-- amqp://guest:guest@127.0.0.1:5672/%2f]

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
        "topic_logs",
        ExchangeKind::Topic,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let keys = [
        "kern.critical",
        "kern.info",
        "cron.critical",
        "auth.info.user",
    ];
    // Binding patterns and how many of `keys` each should receive.
    let patterns: [(&[&str], usize); 3] = [
        (&["#"], 4),
        (&["kern.*"], 2),
        (&["*.critical", "auth.#"], 3),
    ];
    let mut consumers = Vec::new();
    for (binding_keys, expected) in patterns {
        let c = subscribe(&ch, "topic_logs", binding_keys).await?;
        consumers.push((binding_keys, c, expected));
    }
    for key in keys {
        ch.basic_publish(
            "topic_logs",
            key,
            BasicPublishOptions::default(),
            b"message",
            BasicProperties::default(),
        )
        .await?;
        println!(" [x] Sent {key}");
    }
    for (binding_keys, c, expected) in consumers.iter_mut() {
        for _ in 0..*expected {
            let d = next(c).await?;
            println!(" [{}] received {}", binding_keys.join(" "), d.routing_key);
        }
    }
    conn.close(200, "bye").await?;
    Ok(())
}
