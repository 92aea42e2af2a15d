//! The runs: producers and consumers on one queue for a duration or a message count
//! (printing `START`, one `TICK` a second and `RESULT`), and the idle-connection run.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::Barrier;

use crate::connect::{amqprs_open, parse_uri, UriParts};
use crate::stats::{fail, new_hist, now_nanos, pct, read_rss_kb, Stats};
use crate::{generic, raw, Args, Client, Res};

pub struct Ctx {
    pub a: Args,
    pub uri: UriParts,
    pub queue: String,
    pub routing_key: String,
    pub st: Arc<Stats>,
}

pub async fn idle_mode(a: &Args) -> Res<()> {
    let uri = parse_uri(&a.uri)?;
    let rss0 = a.rss_pid.and_then(read_rss_kb);
    let t0 = Instant::now();
    let conns: Vec<_> = futures::stream::iter(0..a.idle_connections)
        .map(|i| {
            let uri = &uri;
            async move { amqprs_open(uri, &format!("perf-idle-{i}")).await }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let mut ok = Vec::with_capacity(conns.len());
    let mut failed = 0usize;
    for c in conns {
        match c {
            Ok(c) => ok.push(c),
            Err(e) => {
                failed += 1;
                if failed <= 3 {
                    eprintln!("WARN connection failed: {e}");
                }
            }
        }
    }
    let open_s = t0.elapsed().as_secs_f64();
    println!(
        "opened {} connections in {:.2}s ({} failed); holding {}s",
        ok.len(),
        open_s,
        failed,
        a.hold
    );
    tokio::time::sleep(Duration::from_secs(a.hold)).await;
    let rss1 = a.rss_pid.and_then(read_rss_kb);
    let mut line = format!(
        "IDLE connections={} failed={} open_s={:.2}",
        ok.len(),
        failed,
        open_s
    );
    if let (Some(r0), Some(r1)) = (rss0, rss1) {
        let per = (r1 as f64 - r0 as f64) * 1024.0 / ok.len().max(1) as f64;
        line += &format!(" rss_before_kb={r0} rss_after_kb={r1} rss_per_conn_bytes={per:.0}");
    }
    println!("{line}");
    for c in ok {
        let _ = c.close().await;
    }
    Ok(())
}

pub async fn queue_depth(ch: &amqprs::channel::Channel, q: &str) -> i64 {
    use amqprs::channel::QueueDeclareArguments;
    let args = QueueDeclareArguments::new(q).passive(true).finish();
    match tokio::time::timeout(Duration::from_secs(2), ch.queue_declare(args)).await {
        Ok(Ok(Some((_, n, _)))) => n as i64,
        _ => -1,
    }
}

pub async fn run(a: Args) -> Res<()> {
    use amqprs::channel::{ExchangeDeclareArguments, QueueDeclareArguments, QueueDeleteArguments};
    use amqprs::{FieldTable, FieldValue};

    if a.size < 8 {
        eprintln!("WARN --size {} < 8; bodies are 8 bytes (timestamp)", a.size);
    }
    let uri = parse_uri(&a.uri)?;
    let st = Arc::new(Stats::default());

    // management connection: declare / depth / delete
    let mconn = amqprs_open(&uri, "perf-mgmt").await?;
    let mch = mconn.open_channel(None).await?;
    let fresh = a.queue.is_none();
    let queue = a
        .queue
        .clone()
        .unwrap_or_else(|| format!("perf-{}-{}", std::process::id(), now_nanos() / 1_000_000));
    let mut table = FieldTable::new();
    if a.ttl_dlx {
        let dlx = format!("{queue}.dlx");
        mch.exchange_declare(ExchangeDeclareArguments::new(&dlx, "fanout"))
            .await?;
        table.insert(
            "x-message-ttl".try_into().unwrap(),
            FieldValue::l(86_400_000),
        );
        table.insert(
            "x-dead-letter-exchange".try_into().unwrap(),
            FieldValue::from(dlx.as_str()),
        );
    }
    if let Some(kind) = &a.queue_type {
        table.insert(
            "x-queue-type".try_into().unwrap(),
            FieldValue::from(kind.as_str()),
        );
    }
    let qargs = QueueDeclareArguments::new(&queue)
        .durable(a.durable_queue || a.queue_type.is_some())
        .arguments(table)
        .finish();
    mch.queue_declare(qargs).await?;
    let routing_key = queue.clone();

    let rss0 = a.rss_pid.and_then(read_rss_kb);
    let cx = Arc::new(Ctx {
        a: a.clone(),
        uri,
        queue: queue.clone(),
        routing_key,
        st: st.clone(),
    });

    // consumers first, wait until all are consuming
    let ready = Arc::new(Barrier::new(a.consumers + 1));
    let mut ctasks = Vec::new();
    for i in 0..a.consumers {
        let (cx, ready) = (cx.clone(), ready.clone());
        ctasks.push(tokio::spawn(async move {
            let st = cx.st.clone();
            let r = match cx.a.client {
                Client::Raw => raw::consumer(i, cx, ready).await,
                Client::Amqprs => generic::consumer_amqprs(i, cx, ready).await,
                Client::Lapin => generic::consumer_lapin(i, cx, ready).await,
            };
            if let Err(e) = r {
                fail(&format!("consumer {i}"), e, &st);
            }
        }));
    }
    ready.wait().await;

    let start = Arc::new(Barrier::new(a.producers + 1));
    let mut ptasks = Vec::new();
    for i in 0..a.producers {
        let (cx, start) = (cx.clone(), start.clone());
        ptasks.push(tokio::spawn(async move {
            let st = cx.st.clone();
            let r = match cx.a.client {
                Client::Raw => raw::producer(i, cx, start).await,
                Client::Amqprs => generic::producer_amqprs(i, cx, start).await,
                Client::Lapin => generic::producer_lapin(i, cx, start).await,
            };
            if let Err(e) = r {
                fail(&format!("producer {i}"), e, &st);
            }
        }));
    }
    start.wait().await;
    let t0 = Instant::now();
    println!(
        "START client={:?} queue={} producers={} consumers={} size={} confirm={} persistent={} durable_queue={} prefetch={} autoack={} rate={} multi_ack_every={} ttl_dlx={}",
        a.client, queue, a.producers, a.consumers, a.size.max(8), a.confirm, a.persistent,
        a.durable_queue, a.prefetch, a.autoack, a.rate, a.multi_ack_every, a.ttl_dlx
    );

    let mut total = new_hist();
    let mut interval = new_hist();
    let (mut last_p, mut last_c, mut last_k) = (0u64, 0u64, 0u64);
    let mut last_t = Instant::now();
    let mut tick = tokio::time::interval_at(
        tokio::time::Instant::from_std(t0 + Duration::from_secs(1)),
        Duration::from_secs(1),
    );
    let deadline = t0 + Duration::from_secs(a.duration);
    let expected = if a.cmessages > 0 {
        a.cmessages
    } else {
        a.pmessages * a.producers as u64
    };
    let mut sec = 0u64;
    let end: Instant;
    loop {
        // end conditions
        let producers_finished = (a.pmessages > 0 || a.cmessages > 0)
            && st.producers_done.load(Relaxed) == a.producers as u64;
        let all_consumed = a.consumers == 0 || st.consumed.load(Relaxed) >= expected;
        if Instant::now() >= deadline || (producers_finished && all_consumed) {
            end = Instant::now();
            break;
        }
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::time::sleep(Duration::from_millis(20)) => { continue; }
        }
        sec += 1;
        let now = Instant::now();
        let dt = now.duration_since(last_t).as_secs_f64();
        let (p, c, k) = (
            st.published.load(Relaxed),
            st.consumed.load(Relaxed),
            st.confirmed.load(Relaxed),
        );
        interval.reset();
        st.drain_hists(&mut interval);
        let _ = total.add(&interval);
        let depth = queue_depth(&mch, &queue).await;
        println!(
            "TICK t={} publish_rate={:.0} consume_rate={:.0} confirm_rate={:.0} published={} consumed={} queued={} p50_us={} p99_us={} max_us={}",
            sec,
            (p - last_p) as f64 / dt,
            (c - last_c) as f64 / dt,
            (k - last_k) as f64 / dt,
            p,
            c,
            depth,
            pct(&interval, 0.5),
            pct(&interval, 0.99),
            interval.max()
        );
        (last_p, last_c, last_k, last_t) = (p, c, k, now);
    }
    // snapshot at the end of the measurement window (later deliveries are not counted)
    let elapsed = end.duration_since(t0).as_secs_f64().max(1e-9);
    let (p, c) = (st.published.load(Relaxed), st.consumed.load(Relaxed));
    interval.reset();
    st.drain_hists(&mut interval);
    let _ = total.add(&interval);
    st.stop.store(true, Relaxed);
    for t in ptasks {
        let _ = t.await; // producers wait (bounded) for outstanding confirms
    }
    let (k, n) = (st.confirmed.load(Relaxed), st.nacked.load(Relaxed));
    let depth = queue_depth(&mch, &queue).await;
    st.finished.store(true, Relaxed);
    for t in &ctasks {
        t.abort();
    }

    let mut mem = String::new();
    if let (Some(pid), Some(r0)) = (a.rss_pid, rss0) {
        if a.hold > 0 {
            tokio::time::sleep(Duration::from_secs(a.hold)).await;
        }
        if let Some(r1) = read_rss_kb(pid) {
            let q = if depth > 0 {
                depth as f64
            } else {
                p.saturating_sub(c).max(1) as f64
            };
            mem = format!(
                " rss_before_kb={r0} rss_after_kb={r1} rss_per_queued_msg_bytes={:.1}",
                (r1 as f64 - r0 as f64) * 1024.0 / q
            );
        }
    }

    if fresh && !a.keep_queue {
        let _ = mch.queue_delete(QueueDeleteArguments::new(&queue)).await;
        if a.ttl_dlx {
            let _ = mch
                .exchange_delete(amqprs::channel::ExchangeDeleteArguments::new(&format!(
                    "{queue}.dlx"
                )))
                .await;
        }
    }
    println!(
        "RESULT client={:?} producers={} consumers={} size={} duration_s={:.2} published={} consumed={} confirmed={} nacked={} publish_rate={:.0} consume_rate={:.0} backlog={} queued={} p50_us={} p95_us={} p99_us={} p999_us={} max_us={} mean_us={:.1} samples={}{}",
        a.client,
        a.producers,
        a.consumers,
        a.size.max(8),
        elapsed,
        p,
        c,
        k,
        n,
        p as f64 / elapsed,
        c as f64 / elapsed,
        p.saturating_sub(c),
        depth,
        pct(&total, 0.5),
        pct(&total, 0.95),
        pct(&total, 0.99),
        pct(&total, 0.999),
        total.max(),
        total.mean(),
        total.len(),
        mem
    );
    let _ = mch.close().await;
    let _ = mconn.close().await;
    Ok(())
}
