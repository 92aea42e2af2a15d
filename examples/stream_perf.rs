//! `stream_perf` — load client for the RabbitMQ Stream protocol (warren or RabbitMQ),
//! built on the stock `rabbitmq-stream-client` crate, version 0.4 (it predates the
//! exchange-command-versions command, so it also talks to RabbitMQ 3.10). Used by `bench/streams.sh`;
//! method in `docs/benchmarks.md`.
//!
//! Modes:
//! - `pubsub`: one producer publishing `--messages` messages in batches of `--batch`
//!   with confirms (at most `--inflight` unconfirmed), and one consumer reading them
//!   from `next` at the same time; the rate is messages consumed per second.
//! - `publish`: the producer alone; the rate is messages confirmed per second.
//! - `consume`: one consumer reads `--messages` stored messages from `first`.
//! - `amqp-consume`: the same over AMQP 0-9-1 (`--amqp-uri`): a stream-queue consumer
//!   with `x-stream-offset: first`, prefetch `--prefetch`, a multiple ack every 100.
//! - `delete`: delete the stream.
//!
//! Prints one line: `mode=... messages=... secs=... rate=...` (msg/s).
//!
//!   cargo run --release --example stream_perf -- --port 5552 --mode publish

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use futures::StreamExt;
use rabbitmq_stream_client_04::types::{ByteCapacity, Message, OffsetSpecification};
use rabbitmq_stream_client_04::Environment;
use tokio::sync::Semaphore;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Pubsub,
    Publish,
    Consume,
    AmqpConsume,
    /// Delete the stream.
    Delete,
}

#[derive(Parser, Debug)]
#[command(about = "Stream protocol load client")]
struct Args {
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    #[arg(long, default_value_t = 5552)]
    port: u16,
    #[arg(long, value_enum, default_value = "pubsub")]
    mode: Mode,
    #[arg(long, default_value = "perf-stream")]
    stream: String,
    #[arg(long, default_value_t = 2_000_000)]
    messages: u64,
    /// Message body size in bytes.
    #[arg(long, default_value_t = 16)]
    size: usize,
    /// Messages per batch_send call.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Unconfirmed messages allowed at once.
    #[arg(long, default_value_t = 20_000)]
    inflight: usize,
    /// Keep the stream (publish mode: for a later consume run); else it is
    /// deleted and created afresh first.
    #[arg(long)]
    keep: bool,
    /// The broker's AMQP 0-9-1 URI, for `amqp-consume`.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_uri: String,
    #[arg(long, default_value_t = 1000)]
    prefetch: u16,
}

async fn publish(env: &Environment, a: &Args) -> Res<u64> {
    let producer = env.producer().batch_size(a.batch).build(&a.stream).await?;
    let permits = Arc::new(Semaphore::new(a.inflight));
    let confirmed = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let body = vec![b'x'; a.size];
    let mut sent = 0u64;
    while sent < a.messages {
        let n = (a.messages - sent).min(a.batch as u64) as usize;
        permits.acquire_many(n as u32).await?.forget();
        let batch: Vec<Message> = (0..n)
            .map(|_| Message::builder().body(body.clone()).build())
            .collect();
        let (p, c, f) = (permits.clone(), confirmed.clone(), failed.clone());
        producer
            .batch_send(batch, move |status| {
                match status {
                    Ok(s) if s.confirmed() => c.fetch_add(1, Ordering::Relaxed),
                    _ => f.fetch_add(1, Ordering::Relaxed),
                };
                p.add_permits(1);
                async {}
            })
            .await?;
        sent += n as u64;
    }
    // All confirmed (or failed) once every permit is back.
    let _all = permits.acquire_many(a.inflight as u32).await?;
    producer.close().await?;
    let bad = failed.load(Ordering::Relaxed);
    if bad > 0 {
        return Err(format!("{bad} messages not confirmed").into());
    }
    Ok(confirmed.load(Ordering::Relaxed))
}

async fn consume(env: &Environment, a: &Args, from: OffsetSpecification) -> Res<u64> {
    let mut consumer = env.consumer().offset(from).build(&a.stream).await?;
    let mut n = 0u64;
    while n < a.messages {
        match tokio::time::timeout(Duration::from_secs(30), consumer.next()).await {
            Ok(Some(Ok(_))) => n += 1,
            Ok(Some(Err(e))) => return Err(e.into()),
            Ok(None) => break,
            Err(_) => return Err(format!("no delivery for 30 s after {n}").into()),
        }
    }
    let _ = consumer.handle().close().await;
    Ok(n)
}

async fn amqp_consume(a: &Args) -> Res<u64> {
    use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
    use lapin::types::{AMQPValue, FieldTable};
    let conn = lapin::Connection::connect(
        &a.amqp_uri,
        lapin::ConnectionProperties::default()
            .with_executor(tokio_executor_trait::Tokio::current())
            .with_reactor(tokio_reactor_trait::Tokio),
    )
    .await?;
    let ch = conn.create_channel().await?;
    ch.basic_qos(a.prefetch, BasicQosOptions::default()).await?;
    let mut args = FieldTable::default();
    args.insert(
        "x-stream-offset".into(),
        AMQPValue::LongString("first".into()),
    );
    let mut consumer = ch
        .basic_consume(&a.stream, "perf", BasicConsumeOptions::default(), args)
        .await?;
    let mut n = 0u64;
    while n < a.messages {
        match tokio::time::timeout(Duration::from_secs(30), consumer.next()).await {
            Ok(Some(Ok(d))) => {
                n += 1;
                if n.is_multiple_of(100) || n == a.messages {
                    d.acker.ack(BasicAckOptions { multiple: true }).await?;
                }
            }
            Ok(Some(Err(e))) => return Err(e.into()),
            Ok(None) => break,
            Err(_) => return Err(format!("no delivery for 30 s after {n}").into()),
        }
    }
    let _ = conn.close(200, "done").await;
    Ok(n)
}

#[tokio::main]
async fn main() -> Res<()> {
    let a = Args::parse();
    let env = Environment::builder()
        .host(&a.host)
        .port(a.port)
        .build()
        .await?;
    let writes = a.mode == Mode::Publish || a.mode == Mode::Pubsub;
    if writes && !a.keep {
        let _ = env.delete_stream(&a.stream).await;
    }
    if writes {
        let _ = env
            .stream_creator()
            .max_length(ByteCapacity::GB(20))
            .create(&a.stream)
            .await;
    }
    let start = Instant::now();
    let moved = match a.mode {
        Mode::Publish => publish(&env, &a).await?,
        Mode::Consume => consume(&env, &a, OffsetSpecification::First).await?,
        Mode::AmqpConsume => amqp_consume(&a).await?,
        Mode::Delete => {
            env.delete_stream(&a.stream).await?;
            0
        }
        Mode::Pubsub => {
            let reader = {
                let env = env.clone();
                let a = Args { ..Args::parse() };
                tokio::spawn(async move { consume(&env, &a, OffsetSpecification::First).await })
            };
            publish(&env, &a).await?;
            reader.await??
        }
    };
    let secs = start.elapsed().as_secs_f64();
    println!(
        "mode={:?} messages={moved} secs={secs:.3} rate={:.0}",
        a.mode,
        moved as f64 / secs
    );
    Ok(())
}
