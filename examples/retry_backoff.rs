//! `retry_backoff` — retry failed work after a delay, with dead-lettering and a TTL queue.
//!
//! Topology (all through the default exchange, so nothing but two queues is needed):
//!
//! ```text
//!   publish --> retry-demo.work --(consumer rejects, requeue=false)--> DLX ""
//!                    ^                                                   |
//!                    |                                   key retry-demo.wait
//!                    |                                                   v
//!                    +---- DLX "" key retry-demo.work <-- retry-demo.wait (x-message-ttl)
//! ```
//!
//! The consumer reads the `x-death` header to see how many times a job was already
//! rejected; jobs that keep failing are parked in `retry-demo.parked` after
//! `--max-attempts`. Each retry waits `--delay-ms` in the wait queue (the backoff).
//!
//!   cargo run --example retry_backoff -- --uri amqp://guest:guest@127.0.0.1:5672/%2f

use std::collections::HashMap;
use std::time::{Duration, Instant};

use clap::Parser;
use futures::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

#[derive(Parser, Debug)]
#[command(about = "Retry-with-backoff through a dead-letter exchange and a TTL queue")]
struct Args {
    /// Broker URI (amqp://user:pass@host:port/vhost, vhost percent-encoded).
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    uri: String,
    /// How long a failed job waits before it is retried (ms).
    #[arg(long, default_value_t = 200)]
    delay_ms: u32,
    /// Attempts before a job is parked.
    #[arg(long, default_value_t = 4)]
    max_attempts: i64,
}

const WORK: &str = "retry-demo.work";
const WAIT: &str = "retry-demo.wait";
const PARKED: &str = "retry-demo.parked";

fn args(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}

/// How many times `x-death` says this message was rejected from the work queue.
fn rejections(props: &BasicProperties) -> i64 {
    let Some(AMQPValue::FieldArray(deaths)) = props
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-death"))
    else {
        return 0;
    };
    deaths
        .as_slice()
        .iter()
        .filter_map(|d| match d {
            AMQPValue::FieldTable(t) => Some(t.inner()),
            _ => None,
        })
        .find(|t| {
            matches!(t.get("queue"), Some(AMQPValue::LongString(q)) if q.as_bytes() == WORK.as_bytes())
                && matches!(t.get("reason"), Some(AMQPValue::LongString(r)) if r.as_bytes() == b"rejected")
        })
        .and_then(|t| match t.get("count") {
            Some(AMQPValue::LongLongInt(n)) => Some(*n),
            _ => None,
        })
        .unwrap_or(0)
}

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

    // Start clean so repeated runs behave the same.
    for q in [WORK, WAIT, PARKED] {
        ch.queue_delete(q, QueueDeleteOptions::default()).await?;
    }
    let s = |v: &str| AMQPValue::LongString(v.into());
    ch.queue_declare(
        WORK,
        QueueDeclareOptions::default(),
        args(&[
            ("x-dead-letter-exchange", s("")),
            ("x-dead-letter-routing-key", s(WAIT)),
        ]),
    )
    .await?;
    ch.queue_declare(
        WAIT,
        QueueDeclareOptions::default(),
        args(&[
            ("x-message-ttl", AMQPValue::LongInt(a.delay_ms as i32)),
            ("x-dead-letter-exchange", s("")),
            ("x-dead-letter-routing-key", s(WORK)),
        ]),
    )
    .await?;
    ch.queue_declare(
        PARKED,
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await?;
    println!(
        "declared {WORK} (DLX -> {WAIT}), {WAIT} (TTL {} ms, DLX -> {WORK}), {PARKED}",
        a.delay_ms
    );

    // Jobs and how many attempts each needs before it succeeds (0 = never).
    let jobs: Vec<(&str, i64)> = vec![("resize-image", 1), ("send-email", 3), ("charge-card", 0)];
    let needed: HashMap<String, i64> = jobs.iter().map(|(j, n)| (j.to_string(), *n)).collect();
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let start = Instant::now();
    for (job, _) in &jobs {
        ch.basic_publish(
            "",
            WORK,
            BasicPublishOptions::default(),
            job.as_bytes(),
            BasicProperties::default().with_delivery_mode(2),
        )
        .await?
        .await?;
        println!("published {job}");
    }

    ch.basic_qos(1, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            WORK,
            "worker",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut finished = 0;
    while finished < jobs.len() {
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .map_err(|_| "no delivery within 10 s")?
            .ok_or("consumer cancelled")??;
        let job = String::from_utf8_lossy(&d.data).into_owned();
        let attempt = rejections(&d.properties) + 1;
        let at = start.elapsed().as_millis();
        let need = needed.get(&job).copied().unwrap_or(1);
        if need != 0 && attempt >= need {
            println!("[{at:>5} ms] {job}: attempt {attempt} succeeded");
            d.acker.ack(BasicAckOptions::default()).await?;
            finished += 1;
        } else if attempt >= a.max_attempts {
            println!("[{at:>5} ms] {job}: attempt {attempt} failed, giving up -> {PARKED}");
            ch.basic_publish(
                "",
                PARKED,
                BasicPublishOptions::default(),
                &d.data,
                d.properties.clone(),
            )
            .await?
            .await?;
            d.acker.ack(BasicAckOptions::default()).await?;
            finished += 1;
        } else {
            println!(
                "[{at:>5} ms] {job}: attempt {attempt} failed, retrying in {} ms",
                a.delay_ms
            );
            d.acker
                .reject(BasicRejectOptions { requeue: false })
                .await?;
        }
    }
    let parked = ch
        .queue_declare(
            PARKED,
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?
        .message_count();
    println!(
        "done in {} ms: {} jobs finished, {parked} parked",
        start.elapsed().as_millis(),
        jobs.len()
    );
    for q in [WORK, WAIT, PARKED] {
        ch.queue_delete(q, QueueDeleteOptions::default()).await?;
    }
    conn.close(200, "bye").await?;
    Ok(())
}
