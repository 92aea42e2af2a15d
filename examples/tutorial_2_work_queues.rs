//! RabbitMQ tutorial 2, "Work Queues": a durable task queue, persistent messages, two
//! workers with prefetch 1 and manual acks sharing the work fairly.
//!
//!   cargo run --example tutorial_2_work_queues [-- amqp://guest:guest@127.0.0.1:5672/%2f]

#[path = "tutorial/mod.rs"]
mod tutorial;

use lapin::options::*;
use lapin::{types::FieldTable, BasicProperties};
use std::time::Duration;
use tutorial::*;

async fn worker(id: usize, done: tokio::sync::mpsc::Sender<(usize, String)>) -> Res<()> {
    let conn = connect().await?;
    let ch = conn.create_channel().await?;
    ch.basic_qos(1, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            "task_queue",
            &format!("worker-{id}"),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    loop {
        let d = next(&mut consumer).await?;
        let task = String::from_utf8_lossy(&d.data).to_string();
        // Each dot is a unit of work (50 ms here).
        let dots = task.chars().filter(|c| *c == '.').count() as u64;
        tokio::time::sleep(Duration::from_millis(50 * dots)).await;
        d.ack(BasicAckOptions::default()).await?;
        if done.send((id, task)).await.is_err() {
            return Ok(());
        }
    }
}

#[tokio::main]
async fn main() -> Res<()> {
    let conn = connect().await?;
    let ch = conn.create_channel().await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    ch.queue_declare("task_queue", durable, FieldTable::default())
        .await?;
    let (tx, mut rx) = tokio::sync::mpsc::channel(16);
    for id in 1..=2 {
        let tx = tx.clone();
        tokio::spawn(async move {
            if let Err(e) = worker(id, tx).await {
                eprintln!("worker {id}: {e}");
            }
        });
    }
    let tasks = [
        "First message.",
        "Second message..",
        "Third message...",
        "Fourth message....",
        "Fifth message.....",
    ];
    for t in tasks {
        let persistent = BasicProperties::default().with_delivery_mode(2);
        ch.basic_publish(
            "",
            "task_queue",
            BasicPublishOptions::default(),
            t.as_bytes(),
            persistent,
        )
        .await?;
        println!(" [x] Sent {t}");
    }
    for _ in tasks {
        let (id, task) = rx.recv().await.ok_or("workers stopped")?;
        println!(" [worker {id}] Done: {task}");
    }
    conn.close(200, "bye").await?;
    Ok(())
}
