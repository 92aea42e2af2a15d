//! The segment message store through the real binary: a queue many times larger
//! than the broker's memory settings is filled, survives a kill -9 without being
//! read back into memory, and drains in order with bounded RSS; delayed messages
//! are stored like any confirmed message.

mod common;

use common::process::{data_dir, BrokerProcess as Broker};
use futures::StreamExt;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel};
use std::time::{Duration, Instant};

const MIB: u64 = 1 << 20;

/// Small memory settings so a queue of a CI-sized volume is "many times" them.
const SMALL: &[(&str, &str)] = &[
    ("WARREN_MESSAGE_MEMORY_LIMIT", "4194304"),
    ("WARREN_STORE_CACHE_SIZE", "8388608"),
];

/// Bytes of the files under `dir`, walked (what `du --apparent-size` says).
fn dir_size(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn persistent() -> BasicProperties {
    BasicProperties::default().with_delivery_mode(2)
}

async fn durable_queue(ch: &Channel, name: &str) -> u32 {
    ch.queue_declare(
        name,
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare")
    .message_count()
}

/// Publishes `n` bodies of `size` bytes numbered from 0, confirmed, sampling the
/// broker's RSS; returns the largest sample.
async fn fill(
    b: &Broker,
    ch: &Channel,
    queue: &str,
    n: usize,
    size: usize,
    props: BasicProperties,
) -> u64 {
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    let mut max_rss = b.rss();
    let mut window = std::collections::VecDeque::new();
    for i in 0..n {
        let mut body = format!("{i:08}").into_bytes();
        body.resize(size, b'x');
        let c = ch
            .basic_publish(
                "",
                queue,
                BasicPublishOptions::default(),
                &body,
                props.clone(),
            )
            .await
            .expect("publish");
        window.push_back(c);
        if window.len() >= 500 {
            if let Some(c) = window.pop_front() {
                assert!(c.await.expect("confirm").is_ack());
            }
        }
        if i % 1000 == 0 {
            max_rss = max_rss.max(b.rss());
        }
        if i % 20000 == 0 && std::env::var("WARREN_SEGMENT_TEST_N").is_ok() {
            eprintln!("  {i}: RSS {} MiB", b.rss() / MIB);
        }
    }
    for c in window {
        assert!(c.await.expect("confirm").is_ack());
    }
    max_rss.max(b.rss())
}

/// Consumes `n` messages expecting bodies numbered `from..from + n` in order;
/// returns the largest RSS sample.
async fn drain(b: &Broker, ch: &Channel, queue: &str, from: usize, n: usize) -> u64 {
    ch.basic_qos(1000, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = ch
        .basic_consume(
            queue,
            "drain",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut max_rss = b.rss();
    for i in from..from + n {
        let d = tokio::time::timeout(Duration::from_secs(20), consumer.next())
            .await
            .expect("delivery in time")
            .expect("stream open")
            .expect("delivery");
        assert_eq!(&d.data[..8], format!("{i:08}").as_bytes(), "order at {i}");
        if i % 100 == 99 {
            d.acker
                .ack(BasicAckOptions { multiple: true })
                .await
                .expect("ack");
        }
        if i % 1000 == 0 {
            max_rss = max_rss.max(b.rss());
        }
    }
    ch.basic_cancel("drain", BasicCancelOptions::default())
        .await
        .expect("cancel");
    max_rss
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_many_times_memory_fills_restarts_and_drains_with_bounded_rss() {
    let dir = data_dir("segments");
    // WARREN_SEGMENT_TEST_N: a bigger run by hand.
    let n_env = std::env::var("WARREN_SEGMENT_TEST_N").ok();
    let n: usize = n_env.and_then(|v| v.parse().ok()).unwrap_or(60_000);
    #[allow(non_snake_case)]
    let N = n;
    const SIZE: usize = 4096; // 234 MiB of bodies: 60x the message memory limit
    let b = Broker::start_with(&dir, SMALL).await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.expect("channel");
    durable_queue(&ch, "big").await;
    let base = b.rss();
    let empty_disk = dir_size(&dir);
    let fill_rss = fill(&b, &ch, "big", N, SIZE, persistent()).await;
    let data = (N * SIZE) as u64;
    // Every body is confirmed, so on disk: the data files hold the chunks, sled
    // the metas.
    let full_disk = dir_size(&dir);
    eprintln!(
        "disk: {} KiB empty, {} KiB (sled {} KiB) holding {} KiB of bodies ({:.2}x)",
        empty_disk >> 10,
        full_disk >> 10,
        dir_size(&dir.join("store")) >> 10,
        data >> 10,
        full_disk as f64 / data as f64
    );
    assert!(
        full_disk * 10 <= data * 13,
        "{full_disk} bytes on disk for {data} bytes of bodies (more than 1.3x)"
    );
    eprintln!(
        "fill: base RSS {} MiB, max {} MiB for {} MiB of bodies",
        base / MIB,
        fill_rss / MIB,
        data / MIB
    );
    // What stays resident is the store's own footprint (sled's page cache and log
    // buffers, the queue's window), not the bodies.
    assert!(
        fill_rss < base + data / 2,
        "RSS {fill_rss} while filling {data} bytes (base {base})"
    );
    drop(conn);
    b.kill9();

    // Back after a kill -9: serving at once, nothing read into memory.
    let started = Instant::now();
    let b = Broker::start_with(&dir, SMALL).await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.expect("channel");
    assert_eq!(durable_queue(&ch, "big").await as usize, N);
    let up = started.elapsed();
    let after = b.rss();
    eprintln!("restart: serving after {up:?}, RSS {} MiB", after / MIB);
    assert!(after < base + 32 * MIB, "RSS {after} after recovery");

    let drain_rss = drain(&b, &ch, "big", 0, N).await;
    eprintln!("drain: max RSS {} MiB", drain_rss / MIB);
    assert!(
        drain_rss < base + data / 2,
        "RSS {drain_rss} while draining {data} bytes"
    );
    assert_eq!(durable_queue(&ch, "big").await, 0);

    // Drained: the data files go once the flush settling their last chunks is
    // durable (the broker's own timing, so polled with a deadline); the active
    // file is kept while it holds less than 4 MiB.
    let deadline = Instant::now() + Duration::from_secs(30);
    while dir_size(&dir.join("store-data")) > 4 * MIB && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drained_disk = dir_size(&dir);
    eprintln!(
        "disk after the drain: {} KiB (sled {} KiB, data files {} KiB; empty: {} KiB)",
        drained_disk >> 10,
        dir_size(&dir.join("store")) >> 10,
        dir_size(&dir.join("store-data")) >> 10,
        empty_disk >> 10
    );
    assert!(
        drained_disk <= empty_disk + 64 * MIB,
        "{drained_disk} bytes on disk after draining (empty: {empty_disk})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_backlog_pages_out_and_is_gone_after_a_restart() {
    // In process, to read the broker's own accounting.
    let dir = data_dir("transient-pages");
    let mut config = warren::Config::for_tests(dir.path());
    config.admin_enabled = false;
    const LIMIT: u64 = 1 << 20;
    config.message_memory_limit = LIMIT;
    let broker = warren::start(config).await.expect("start");
    let uri = format!("amqp://guest:guest@{}/%2f", broker.amqp_addr());
    let conn = lapin::Connection::connect(&uri, lapin::ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_declare("t", QueueDeclareOptions::default(), FieldTable::default())
        .await
        .expect("declare");
    const N: usize = 5000;
    const SIZE: usize = 4096; // 20x the limit
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    for i in 0..N {
        let mut body = format!("{i:08}").into_bytes();
        body.resize(SIZE, b'x');
        ch.basic_publish(
            "",
            "t",
            BasicPublishOptions::default(),
            &body,
            BasicProperties::default(),
        )
        .await
        .expect("publish");
    }
    assert!(ch.wait_for_confirms().await.expect("confirms").is_empty());
    let core = &broker.server.broker;
    let resident = core.budget.used() as u64;
    assert!(
        resident <= LIMIT + SIZE as u64,
        "{resident} bytes resident with a limit of {LIMIT}"
    );
    let q = core
        .vhost("/")
        .and_then(|v| v.queue("t", 0).ok())
        .expect("queue");
    let st = q.stats(0);
    assert_eq!(st.ready, N);
    assert!(
        st.ready_ram * SIZE <= (LIMIT as usize) + SIZE,
        "{} in memory",
        st.ready_ram
    );
    // Drained in order, loaded back as the consumer reaches them.
    ch.basic_qos(500, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut consumer = ch
        .basic_consume(
            "t",
            "c",
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume");
    for i in 0..N {
        let d = tokio::time::timeout(Duration::from_secs(20), consumer.next())
            .await
            .expect("delivery in time")
            .expect("stream open")
            .expect("delivery");
        assert_eq!(&d.data[..8], format!("{i:08}").as_bytes(), "order at {i}");
    }
    drop(conn);
    drop(broker);

    // A durable queue's transient messages paged out: gone after a restart.
    let dir = data_dir("transient-durable");
    let b = Broker::start_with(&dir, SMALL).await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.expect("channel");
    durable_queue(&ch, "mixed").await;
    fill(&b, &ch, "mixed", 3000, SIZE, BasicProperties::default()).await;
    fill(&b, &ch, "mixed", 10, SIZE, persistent()).await;
    drop(conn);
    b.stop();
    let b = Broker::start_with(&dir, SMALL).await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.expect("channel");
    assert_eq!(durable_queue(&ch, "mixed").await, 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirmed_delayed_messages_survive_a_kill_9() {
    let dir = data_dir("delayed-store");
    let b = Broker::start(&dir).await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.expect("channel");
    let mut args = FieldTable::default();
    args.insert(
        "x-delayed-type".into(),
        AMQPValue::LongString("direct".into()),
    );
    ch.exchange_declare(
        "later",
        lapin::ExchangeKind::Custom("x-delayed-message".into()),
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .expect("exchange");
    durable_queue(&ch, "due").await;
    ch.queue_bind(
        "due",
        "later",
        "k",
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirm.select");
    const N: usize = 20;
    for i in 0..N {
        let mut headers = FieldTable::default();
        headers.insert(
            "x-delay".into(),
            AMQPValue::LongLongInt(1500 + 50 * i as i64),
        );
        let c = ch
            .basic_publish(
                "later",
                "k",
                BasicPublishOptions::default(),
                format!("d{i}").as_bytes(),
                persistent().with_headers(headers),
            )
            .await
            .expect("publish");
        assert!(c.await.expect("confirm").is_ack());
    }
    drop(conn);
    b.kill9();

    let b = Broker::start(&dir).await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.expect("channel");
    let mut consumer = ch
        .basic_consume(
            "due",
            "c",
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut got = Vec::new();
    while got.len() < N {
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("every delayed message arrives after the restart")
            .expect("stream open")
            .expect("delivery");
        got.push(String::from_utf8_lossy(&d.data).into_owned());
    }
    let want: Vec<String> = (0..N).map(|i| format!("d{i}")).collect();
    assert_eq!(got, want, "released once each, in due order");
    // Released messages are settled: a further restart brings none back.
    drop(conn);
    b.stop();
    let b = Broker::start(&dir).await;
    let conn = b.connect().await;
    let ch = conn.create_channel().await.expect("channel");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(durable_queue(&ch, "due").await, 0);
}
