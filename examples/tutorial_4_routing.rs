//! RabbitMQ tutorial 4, "Routing": a direct exchange; one consumer takes only errors,
//! another takes every severity.
//!
//!   cargo run --example tutorial_4_routing [-- amqp://guest:guest@127.0.0.1:5672/%2f]

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
        "direct_logs",
        ExchangeKind::Direct,
        ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await?;
    let mut consumers = Vec::new();
    for severities in [&["error"][..], &["info", "warning", "error"][..]] {
        let c = subscribe(&ch, "direct_logs", severities).await?;
        consumers.push((severities, c, severities.len()));
    }
    for (severity, msg) in [
        ("info", "started"),
        ("warning", "slow disk"),
        ("error", "disk failed"),
    ] {
        ch.basic_publish(
            "direct_logs",
            severity,
            BasicPublishOptions::default(),
            msg.as_bytes(),
            BasicProperties::default(),
        )
        .await?;
        println!(" [x] Sent {severity}:{msg}");
    }
    for (severities, c, expected) in consumers.iter_mut() {
        for _ in 0..*expected {
            let d = next(c).await?;
            println!(
                " [{}] {}:{}",
                severities.join(","),
                d.routing_key,
                String::from_utf8_lossy(&d.data)
            );
        }
    }
    conn.close(200, "bye").await?;
    Ok(())
}
