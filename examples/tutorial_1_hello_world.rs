//! RabbitMQ tutorial 1, "Hello World": one producer, one consumer, one queue.
//!
//!   cargo run --example tutorial_1_hello_world [-- amqp://guest:guest@127.0.0.1:5672/%2f]

#[path = "tutorial/mod.rs"]
mod tutorial;

use lapin::options::*;
use lapin::{types::FieldTable, BasicProperties};
use tutorial::*;

#[tokio::main]
async fn main() -> Res<()> {
    let conn = connect().await?;
    let ch = conn.create_channel().await?;
    ch.queue_declare(
        "hello",
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await?;
    ch.basic_publish(
        "",
        "hello",
        BasicPublishOptions::default(),
        b"Hello World!",
        BasicProperties::default(),
    )
    .await?;
    println!(" [x] Sent 'Hello World!'");
    let mut consumer = ch
        .basic_consume(
            "hello",
            "",
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let d = next(&mut consumer).await?;
    println!(" [x] Received '{}'", String::from_utf8_lossy(&d.data));
    conn.close(200, "bye").await?;
    Ok(())
}
