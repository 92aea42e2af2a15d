//! `stream_perf` — Stream protocol throughput with the stock Rust client
//! (`rabbitmq-stream-client`), against warren or RabbitMQ:
//!
//!   cargo run --release --example stream_perf -- --port 5552 --messages 5000000 --size 16
//!
//! Two phases on a fresh stream: publish `--messages` messages of `--size`
//! bytes with confirms, `--batch` messages per `batch_send` (the client
//! pipelines up to `--inflight` unconfirmed batches); then consume them all
//! from `first`. One `RESULT` line per phase (msg/s and elapsed seconds).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use futures::StreamExt;
use rabbitmq_stream_client::types::{Message, OffsetSpecification};
use rabbitmq_stream_client::Environment;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 5552)]
    port: u16,
    #[arg(long, default_value = "guest")]
    user: String,
    #[arg(long, default_value = "guest")]
    password: String,
    #[arg(long, default_value_t = 1_000_000)]
    messages: u64,
    #[arg(long, default_value_t = 16)]
    size: usize,
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Unconfirmed batches in flight at most.
    #[arg(long, default_value_t = 64)]
    inflight: usize,
    /// Skip publishing (consume an existing stream).
    #[arg(long)]
    consume_only: bool,
    #[arg(long, default_value = "stream-perf")]
    stream: String,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let a = Args::parse();
    let env = Environment::builder()
        .host(&a.host)
        .port(a.port)
        .username(&a.user)
        .password(&a.password)
        .build()
        .await?;
    if !a.consume_only {
        let _ = env.delete_stream(&a.stream).await;
        env.stream_creator().create(&a.stream).await?;
        let producer = env.producer().build(&a.stream).await?;
        let body = vec![b'x'; a.size];
        let confirmed = Arc::new(AtomicU64::new(0));
        let wake = Arc::new(tokio::sync::Notify::new());
        let start = Instant::now();
        let mut sent = 0u64;
        while sent < a.messages {
            let n = (a.messages - sent).min(a.batch as u64) as usize;
            let batch: Vec<Message> = (0..n)
                .map(|_| Message::builder().body(body.clone()).build())
                .collect();
            let c = Arc::clone(&confirmed);
            let w = Arc::clone(&wake);
            producer
                .batch_send(batch, move |r| {
                    if r.map(|s| s.confirmed()).unwrap_or(false) {
                        c.fetch_add(1, Ordering::Relaxed);
                    }
                    w.notify_one();
                    async {}
                })
                .await?;
            sent += n as u64;
            // Keep at most `inflight` batches unconfirmed.
            while sent - confirmed.load(Ordering::Relaxed) > (a.inflight * a.batch) as u64 {
                wake.notified().await;
            }
        }
        while confirmed.load(Ordering::Relaxed) < a.messages {
            if start.elapsed() > Duration::from_secs(600) {
                break;
            }
            let _ = tokio::time::timeout(Duration::from_millis(10), wake.notified()).await;
        }
        let secs = start.elapsed().as_secs_f64();
        println!(
            "RESULT phase=publish_confirm messages={} confirmed={} secs={secs:.3} msg_per_s={:.0}",
            a.messages,
            confirmed.load(Ordering::Relaxed),
            a.messages as f64 / secs
        );
        producer.close().await?;
    }
    let mut consumer = env
        .consumer()
        .offset(OffsetSpecification::First)
        .build(&a.stream)
        .await?;
    let start = Instant::now();
    let mut got = 0u64;
    while got < a.messages {
        match tokio::time::timeout(Duration::from_secs(10), consumer.next()).await {
            Ok(Some(Ok(_))) => got += 1,
            _ => break,
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "RESULT phase=consume_first messages={got} secs={secs:.3} msg_per_s={:.0}",
        got as f64 / secs
    );
    let _ = consumer.handle().close().await;
    Ok(())
}
