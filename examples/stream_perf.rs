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
//!   `--amqp-client raw` (the default) speaks AMQP 0-9-1 through warren's own codec
//!   (`warren::wire`: every frame one read brought decoded in place, the acks of a read
//!   in one write), as `examples/perf` does: it costs far less CPU per message than
//!   lapin (`--amqp-client lapin`), which tops out near 300k msg/s here, below what
//!   the brokers serve.
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

/// The AMQP URI parser of `examples/perf` (its connection helpers are not used here).
#[path = "perf/connect.rs"]
#[allow(dead_code)]
mod connect;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    Pubsub,
    Publish,
    Consume,
    AmqpConsume,
    /// Delete the stream.
    Delete,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum AmqpClient {
    Raw,
    Lapin,
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
    /// The AMQP 0-9-1 client of `amqp-consume`.
    #[arg(long, value_enum, default_value = "raw")]
    amqp_client: AmqpClient,
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

/// `amqp-consume` with warren's codec: connect (PLAIN, no heartbeats), qos, consume
/// from `first`, then read deliveries, acking every 100th (multiple) per read.
async fn amqp_consume_raw(a: &Args) -> Res<u64> {
    use bytes::{Bytes, BytesMut};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_util::codec::Decoder;
    use warren::wire::{
        self, BasicAck, BasicConsume, BasicQos, ChannelOpen, ConnectionOpen, ConnectionStartOk,
        ConnectionTuneOk, FieldTable, FieldValue, Frame, FrameCodec, Method, DEFAULT_FRAME_MAX,
        PROTOCOL_HEADER,
    };
    let connect::UriParts {
        host,
        port,
        user,
        pass,
        vhost,
    } = connect::parse_uri(&a.amqp_uri)?;
    let mut sock = tokio::net::TcpStream::connect((host.as_str(), port)).await?;
    sock.set_nodelay(true)?;
    let mut codec = FrameCodec::new(DEFAULT_FRAME_MAX);
    let mut rbuf = BytesMut::with_capacity(1 << 20);
    let mut wbuf = BytesMut::with_capacity(4096);
    sock.write_all(PROTOCOL_HEADER).await?;
    // The handshake: the next method, skipping anything else.
    macro_rules! next_method {
        () => {
            loop {
                match codec.decode(&mut rbuf)? {
                    Some(Frame::Method { method, .. }) => break method,
                    Some(_) => {}
                    None => {
                        if sock.read_buf(&mut rbuf).await? == 0 {
                            return Err("closed by the broker".into());
                        }
                    }
                }
            }
        };
    }
    macro_rules! send {
        ($ch:expr, $m:expr) => {{
            wire::write_method(&mut wbuf, $ch, &Method::from($m));
            sock.write_all(&wbuf).await?;
            wbuf.clear();
        }};
    }
    next_method!(); // start
    let mut client_properties = FieldTable::new();
    client_properties.insert("product", FieldValue::string("stream_perf"));
    send!(
        0,
        ConnectionStartOk {
            client_properties,
            mechanism: "PLAIN".into(),
            response: Bytes::from(format!("\0{user}\0{pass}")),
            locale: "en_US".into(),
        }
    );
    let tune = match next_method!() {
        Method::ConnectionTune(t) => t,
        other => return Err(format!("expected tune, got {other:?}").into()),
    };
    let frame_max = match tune.frame_max {
        0 => DEFAULT_FRAME_MAX,
        m => m.min(DEFAULT_FRAME_MAX),
    };
    send!(
        0,
        ConnectionTuneOk {
            channel_max: tune.channel_max,
            frame_max,
            heartbeat: 0,
        }
    );
    codec.set_frame_max(frame_max);
    send!(
        0,
        ConnectionOpen {
            virtual_host: vhost,
            ..Default::default()
        }
    );
    next_method!(); // open-ok
    send!(1, ChannelOpen::default());
    next_method!(); // channel open-ok
    send!(
        1,
        BasicQos {
            prefetch_count: a.prefetch,
            ..Default::default()
        }
    );
    next_method!(); // qos-ok
    let mut arguments = FieldTable::new();
    arguments.insert("x-stream-offset", FieldValue::string("first"));
    send!(
        1,
        BasicConsume {
            queue: a.stream.clone(),
            consumer_tag: "perf".into(),
            arguments,
            ..Default::default()
        }
    );
    match next_method!() {
        Method::BasicConsumeOk(_) => {}
        other => return Err(format!("consume refused: {other:?}").into()),
    }
    let (mut n, mut tag, mut remaining) = (0u64, 0u64, 0u64);
    while n < a.messages {
        loop {
            let done = match codec.decode(&mut rbuf)? {
                None => break,
                Some(Frame::Method {
                    method: Method::BasicDeliver(d),
                    ..
                }) => {
                    tag = d.delivery_tag;
                    false
                }
                Some(Frame::Method { method, .. }) => {
                    return Err(format!("unexpected {method:?}").into())
                }
                Some(Frame::Header { body_size, .. }) => {
                    remaining = body_size;
                    remaining == 0
                }
                Some(Frame::Body { payload, .. }) => {
                    remaining = remaining.saturating_sub(payload.len() as u64);
                    remaining == 0
                }
                Some(Frame::Heartbeat { .. }) => false,
            };
            if done {
                n += 1;
                if n.is_multiple_of(100) || n == a.messages {
                    wire::write_method(
                        &mut wbuf,
                        1,
                        &Method::from(BasicAck {
                            delivery_tag: tag,
                            multiple: true,
                        }),
                    );
                }
            }
        }
        if !wbuf.is_empty() {
            sock.write_all(&wbuf).await?;
            wbuf.clear();
        }
        if n >= a.messages {
            break;
        }
        if rbuf.capacity() - rbuf.len() < 256 << 10 {
            rbuf.reserve(1 << 20);
        }
        match tokio::time::timeout(Duration::from_secs(30), sock.read_buf(&mut rbuf)).await {
            Ok(Ok(0)) => return Err("closed by the broker".into()),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => return Err(format!("no delivery for 30 s after {n}").into()),
        }
    }
    Ok(n)
}

async fn amqp_consume(a: &Args) -> Res<u64> {
    if a.amqp_client == AmqpClient::Raw {
        return amqp_consume_raw(a).await;
    }
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
