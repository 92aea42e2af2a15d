//! `priority_queue` — a priority work queue (`x-max-priority`).
//!
//! Publishes a backlog of tasks with mixed priorities, then a worker with prefetch 1
//! takes them: higher priorities first, FIFO within a priority, no priority counting as
//! 0. Halfway through, an urgent task is published and overtakes the rest of the
//! backlog.
//!
//!   cargo run --example priority_queue -- --uri amqp://guest:guest@127.0.0.1:5672/%2f

use std::time::Duration;

use clap::Parser;
use futures::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[derive(Parser, Debug)]
#[command(about = "A priority work queue")]
struct Args {
    /// Broker URI (amqp://user:pass@host:port/vhost, vhost percent-encoded).
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    uri: String,
    /// The queue's x-max-priority (1..=255; RabbitMQ recommends at most 10).
    #[arg(long, default_value_t = 10)]
    max_priority: u8,
}

const QUEUE: &str = "priority-demo.tasks";

#[tokio::main]
async fn main() -> Res<()> {
    let a = Args::parse();
    let conn = Connection::connect(
        &a.uri,
        ConnectionProperties::default()
            .with_executor(tokio_executor_trait::Tokio::current())
            .with_reactor(tokio_reactor_trait::Tokio),
    )
    .await?;
    let ch = conn.create_channel().await?;
    ch.queue_delete(QUEUE, QueueDeleteOptions::default())
        .await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-max-priority".into(),
        AMQPValue::LongInt(i32::from(a.max_priority)),
    );
    ch.queue_declare(QUEUE, QueueDeclareOptions::default(), args)
        .await?;
    println!("declared {QUEUE} with x-max-priority {}", a.max_priority);

    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let publish = |body: String, priority: Option<u8>| {
        let ch = ch.clone();
        async move {
            let mut props = BasicProperties::default();
            if let Some(p) = priority {
                props = props.with_priority(p);
            }
            ch.basic_publish(
                "",
                QUEUE,
                BasicPublishOptions::default(),
                body.as_bytes(),
                props,
            )
            .await?
            .await?;
            let shown = priority.map_or("none".to_string(), |p| p.to_string());
            println!("published {body:<18} priority {shown}");
            Res::Ok(())
        }
    };
    let backlog: Vec<(&str, Option<u8>)> = vec![
        ("cleanup-1", Some(1)),
        ("report-1", None),
        ("invoice-1", Some(5)),
        ("cleanup-2", Some(1)),
        ("invoice-2", Some(5)),
        ("report-2", Some(0)),
        ("alert-1", Some(9)),
    ];
    let total = backlog.len() + 1;
    for (task, p) in backlog {
        publish(task.to_string(), p).await?;
    }

    ch.basic_qos(1, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            QUEUE,
            "worker",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut order = Vec::new();
    for n in 1..=total {
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .map_err(|_| "no delivery within 10 s")?
            .ok_or("consumer cancelled")??;
        let task = String::from_utf8_lossy(&d.data).into_owned();
        let p = d
            .properties
            .priority()
            .map_or("none".to_string(), |p| p.to_string());
        println!("worker got #{n}: {task:<18} priority {p}");
        // Simulated work; the urgent task arrives while the backlog is being drained.
        tokio::time::sleep(Duration::from_millis(20)).await;
        if n == 3 {
            publish("urgent-outage".to_string(), Some(a.max_priority)).await?;
        }
        d.acker.ack(BasicAckOptions::default()).await?;
        order.push(task);
    }
    println!("processing order: {}", order.join(", "));
    ch.queue_delete(QUEUE, QueueDeleteOptions::default())
        .await?;
    conn.close(200, "bye").await?;
    Ok(())
}
