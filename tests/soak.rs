//! A short soak: connections publish with confirms, consume, ack, nack, reject and
//! disconnect at random. At the end every confirmed message was acked exactly once,
//! nothing is left behind in the broker (connections, consumers, messages, resident
//! bodies). `WARREN_SOAK_SECS` lengthens each of the two rounds (default 4 s).

use futures::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use rand::Rng;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const QUEUE: &str = "soak";

#[derive(Default)]
struct Ledger {
    confirmed: HashSet<String>,
    acked: HashMap<String, u32>,
}

/// A random number in `lo..hi` (the RNG is not held across awaits).
fn range(lo: u32, hi: u32) -> u32 {
    rand::thread_rng().gen_range(lo..hi)
}

fn chance(p: f64) -> bool {
    rand::thread_rng().gen_bool(p)
}

fn roll() -> f64 {
    rand::thread_rng().gen()
}

async fn connect(uri: &str) -> Connection {
    Connection::connect(uri, ConnectionProperties::default())
        .await
        .expect("connect")
}

async fn publisher(uri: String, id: usize, stop: Arc<AtomicBool>, ledger: Arc<Mutex<Ledger>>) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let conn = connect(&uri).await;
        let ch = conn.create_channel().await.expect("channel");
        ch.confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirms");
        let rounds = range(1, 20);
        for _ in 0..rounds {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let mut pending = Vec::new();
            for _ in 0..range(1, 50) {
                let body = format!("p{id}-{n}");
                n += 1;
                let persistent = chance(0.3);
                let props = if persistent {
                    BasicProperties::default().with_delivery_mode(2)
                } else {
                    BasicProperties::default()
                };
                let c = ch
                    .basic_publish(
                        "",
                        QUEUE,
                        BasicPublishOptions::default(),
                        body.as_bytes(),
                        props,
                    )
                    .await
                    .expect("publish");
                pending.push((body, c));
            }
            for (body, c) in pending {
                if c.await.expect("confirm").is_ack() {
                    ledger.lock().unwrap().confirmed.insert(body);
                }
            }
        }
        conn.close(200, "bye").await.expect("close");
    }
}

async fn consumer(uri: String, id: usize, stop: Arc<AtomicBool>, ledger: Arc<Mutex<Ledger>>) {
    loop {
        let conn = connect(&uri).await;
        let ch = conn.create_channel().await.expect("channel");
        ch.basic_qos(range(1, 100) as u16, BasicQosOptions::default())
            .await
            .expect("qos");
        let mut c = ch
            .basic_consume(
                QUEUE,
                &format!("c{id}"),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .expect("consume");
        let mut left = range(10, 400);
        loop {
            let d = match tokio::time::timeout(Duration::from_millis(500), c.next()).await {
                Ok(Some(Ok(d))) => d,
                Ok(_) => break,
                Err(_) => {
                    if stop.load(Ordering::Relaxed) {
                        conn.close(200, "bye").await.expect("close");
                        return;
                    }
                    // Idle (e.g. all our prefetch is held unacked): reconnect.
                    break;
                }
            };
            let roll = roll();
            if roll < 0.75 {
                d.ack(BasicAckOptions::default()).await.expect("ack");
                let body = String::from_utf8_lossy(&d.data).to_string();
                *ledger.lock().unwrap().acked.entry(body).or_default() += 1;
            } else if roll < 0.9 {
                d.nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await
                .expect("nack");
            } else if roll < 0.97 {
                d.reject(BasicRejectOptions { requeue: true })
                    .await
                    .expect("reject");
            } // else: leave it unacked; it is requeued when the connection closes.
            left -= 1;
            if left == 0 {
                break;
            }
        }
        // Disconnect with whatever is unacked: the broker requeues it.
        conn.close(200, "bye").await.expect("close");
    }
}

/// One soak round: random traffic for `secs`, then drain and check the ledger.
async fn round(uri: &str, core: &warren::broker::Broker, secs: u64, round: usize) {
    let stop_publishing = Arc::new(AtomicBool::new(false));
    let stop_consuming = Arc::new(AtomicBool::new(false));
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut pubs = Vec::new();
    for id in 0..4 {
        pubs.push(tokio::spawn(publisher(
            uri.to_string(),
            round * 10 + id,
            Arc::clone(&stop_publishing),
            Arc::clone(&ledger),
        )));
    }
    let mut subs = Vec::new();
    for id in 0..4 {
        subs.push(tokio::spawn(consumer(
            uri.to_string(),
            id,
            Arc::clone(&stop_consuming),
            Arc::clone(&ledger),
        )));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop_publishing.store(true, Ordering::Relaxed);
    for p in pubs {
        tokio::time::timeout(Duration::from_secs(30), p)
            .await
            .expect("publisher stops")
            .expect("publisher ok");
    }
    // Let the consumers drain everything that was confirmed.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let done = {
            let l = ledger.lock().unwrap();
            l.confirmed.iter().all(|b| l.acked.contains_key(b))
        };
        if done {
            break;
        }
        if Instant::now() > deadline {
            let l = ledger.lock().unwrap();
            let missing: Vec<_> = l
                .confirmed
                .iter()
                .filter(|b| !l.acked.contains_key(*b))
                .collect();
            let stats = core
                .vhost("/")
                .and_then(|v| v.queue(QUEUE, 0).ok())
                .map(|q| q.stats(warren::clock::now_ms()));
            panic!(
                "{} of {} confirmed messages were never acked, e.g. {:?}; queue {stats:?}; {} connections",
                missing.len(),
                l.confirmed.len(),
                &missing[..missing.len().min(10)],
                core.connections().len()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop_consuming.store(true, Ordering::Relaxed);
    for s in subs {
        tokio::time::timeout(Duration::from_secs(30), s)
            .await
            .expect("consumer stops")
            .expect("consumer ok");
    }
    let l = ledger.lock().unwrap();
    assert!(
        l.confirmed.len() > 100,
        "too little traffic: {}",
        l.confirmed.len()
    );
    let twice: Vec<_> = l.acked.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "acked more than once: {twice:?}");
    let vhost = core.vhost("/").expect("vhost");
    let q = vhost.queue(QUEUE, 0).expect("queue");
    let stats = q.stats(warren::clock::now_ms());
    assert_eq!(
        (stats.ready, stats.unacked, stats.consumers),
        (0, 0, 0),
        "queue left clean"
    );
    assert_eq!(core.connections().len(), 0, "no connection left registered");
    assert_eq!(core.budget.used(), 0, "no message body left resident");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_random_clients_lose_and_duplicate_nothing() {
    let secs: u64 = std::env::var("WARREN_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    let dir = std::env::temp_dir().join(format!("warren-soak-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut config = warren::Config::for_tests(&dir);
    config.admin_enabled = false;
    // A small store cache, so a cache filling up is not mistaken for growth.
    config.store_cache_size = 8 * 1024 * 1024;
    let broker = warren::start(config).await.expect("start");
    let core = Arc::clone(&broker.server.broker);
    let uri = format!("amqp://guest:guest@{}/%2f", broker.amqp_addr());
    {
        let conn = connect(&uri).await;
        let ch = conn.create_channel().await.unwrap();
        ch.queue_declare(
            QUEUE,
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
        conn.close(200, "").await.unwrap();
    }
    // Two rounds on one broker: whatever the first leaves behind would make the
    // second's checks fail. (Memory is checked through what the broker holds — no
    // connection, consumer, ready, unacked or resident message left — not through
    // RSS: the lapin clients share this process, so its RSS says little about the
    // broker.)
    round(&uri, &core, secs, 0).await;
    round(&uri, &core, secs, 1).await;
    let _ = std::fs::remove_dir_all(&dir);
}
