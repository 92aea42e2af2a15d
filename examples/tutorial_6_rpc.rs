//! RabbitMQ tutorial 6, "RPC": a Fibonacci server on `rpc_queue`; the client sends
//! requests with `reply_to` (an exclusive callback queue) and `correlation_id`.
//!
//!   cargo run --example tutorial_6_rpc [-- amqp://guest:guest@127.0.0.1:5672/%2f]

#[path = "tutorial/mod.rs"]
mod tutorial;

use lapin::options::*;
use lapin::{types::FieldTable, BasicProperties};
use tutorial::*;

fn fib(n: u64) -> u64 {
    (0..n)
        .fold((0u64, 1u64), |(a, b), _| (b, a.saturating_add(b)))
        .0
}

async fn server() -> Res<()> {
    let conn = connect().await?;
    let ch = conn.create_channel().await?;
    ch.queue_declare(
        "rpc_queue",
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await?;
    ch.basic_qos(1, BasicQosOptions::default()).await?;
    let mut requests = ch
        .basic_consume(
            "rpc_queue",
            "rpc-server",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    loop {
        let d = next(&mut requests).await?;
        let n: u64 = String::from_utf8_lossy(&d.data).parse().unwrap_or(0);
        println!(" [.] fib({n})");
        if let Some(reply_to) = d.properties.reply_to() {
            let mut props = BasicProperties::default();
            if let Some(id) = d.properties.correlation_id() {
                props = props.with_correlation_id(id.clone());
            }
            ch.basic_publish(
                "",
                reply_to.as_str(),
                BasicPublishOptions::default(),
                fib(n).to_string().as_bytes(),
                props,
            )
            .await?;
        }
        d.ack(BasicAckOptions::default()).await?;
    }
}

#[tokio::main]
async fn main() -> Res<()> {
    let conn = connect().await?;
    let ch = conn.create_channel().await?;
    ch.queue_declare(
        "rpc_queue",
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await?;
    tokio::spawn(async {
        if let Err(e) = server().await {
            eprintln!("server: {e}");
        }
    });
    let exclusive = QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    };
    let callback = ch
        .queue_declare("", exclusive, FieldTable::default())
        .await?;
    let no_ack = BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    let mut replies = ch
        .basic_consume(callback.name().as_str(), "", no_ack, FieldTable::default())
        .await?;
    for n in [10u64, 30] {
        let id = format!("req-{n}");
        let props = BasicProperties::default()
            .with_reply_to(callback.name().clone())
            .with_correlation_id(id.clone().into());
        ch.basic_publish(
            "",
            "rpc_queue",
            BasicPublishOptions::default(),
            n.to_string().as_bytes(),
            props,
        )
        .await?;
        println!(" [x] Requesting fib({n})");
        loop {
            let d = next(&mut replies).await?;
            if d.properties.correlation_id().as_ref().map(|c| c.as_str()) == Some(id.as_str()) {
                println!(" [.] Got {}", String::from_utf8_lossy(&d.data));
                break;
            }
        }
    }
    conn.close(200, "bye").await?;
    Ok(())
}
