//! Producers and consumers on the generic clients (`--client amqprs` / `--client lapin`),
//! kept to cross-check the raw client.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use tokio::sync::{Barrier, Semaphore};

use crate::confirm::{ConfirmCb, ConfirmTracker};
use crate::connect::{amqprs_open, lapin_open};
use crate::scenarios::Ctx;
use crate::stats::{ack_every, backlog_gate, make_body, record_latency, Pacer};
use crate::Res;

pub async fn producer_amqprs(id: usize, cx: Arc<Ctx>, start: Arc<Barrier>) -> Res<()> {
    use amqprs::channel::{BasicPublishArguments, ConfirmSelectArguments};
    let (a, st) = (&cx.a, &cx.st);
    let conn = amqprs_open(&cx.uri, &format!("perf-producer-{id}")).await?;
    let ch = conn.open_channel(None).await?;
    let tracker = if a.confirm > 0 {
        let t = Arc::new(ConfirmTracker {
            sem: Semaphore::new(a.confirm),
            outstanding: Mutex::new(BTreeSet::new()),
            stats: st.clone(),
        });
        ch.register_callback(ConfirmCb(t.clone())).await?;
        ch.confirm_select(ConfirmSelectArguments::new(false))
            .await?;
        Some(t)
    } else {
        None
    };
    let mut props = amqprs::BasicProperties::default();
    if a.persistent {
        props.with_delivery_mode(amqprs::DELIVERY_MODE_PERSISTENT);
    }
    let props = props.finish();
    let pargs = BasicPublishArguments::new(&a.exchange, &cx.routing_key);
    start.wait().await;
    let mut pacer = Pacer::new(a.rate);
    let mut seq = 0u64;
    while !st.stop.load(Relaxed) && (a.pmessages == 0 || seq < a.pmessages) {
        if let Some(due) = pacer.next_due() {
            tokio::time::sleep_until(due.into()).await;
        }
        backlog_gate(a, st).await;
        if let Some(t) = &tracker {
            loop {
                match tokio::time::timeout(Duration::from_millis(100), t.sem.acquire()).await {
                    Ok(p) => {
                        p?.forget();
                        break;
                    }
                    Err(_) if st.stop.load(Relaxed) => break,
                    Err(_) => {}
                }
            }
            if st.stop.load(Relaxed) {
                break;
            }
            t.outstanding.lock().unwrap().insert(seq + 1);
        }
        seq += 1;
        ch.basic_publish(props.clone(), make_body(a.size), pargs.clone())
            .await?;
        st.published.fetch_add(1, Relaxed);
    }
    st.producers_done.fetch_add(1, Relaxed);
    if let Some(t) = &tracker {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !t.outstanding.lock().unwrap().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let _ = ch.close().await;
    let _ = conn.close().await;
    Ok(())
}

pub async fn producer_lapin(id: usize, cx: Arc<Ctx>, start: Arc<Barrier>) -> Res<()> {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    use lapin::publisher_confirm::Confirmation;
    let (a, st) = (&cx.a, &cx.st);
    let conn = lapin_open(&a.uri, &format!("perf-producer-{id}")).await?;
    let ch = conn.create_channel().await?;
    let confirm = a.confirm > 0;
    if confirm {
        ch.confirm_select(ConfirmSelectOptions::default()).await?;
    }
    let mut props = lapin::BasicProperties::default();
    if a.persistent {
        props = props.with_delivery_mode(2);
    }
    // With confirms, a publish future lives until its confirm arrives, so the window
    // bounds outstanding confirms exactly; otherwise it bounds frames queued in lapin.
    let window = if confirm {
        a.confirm
    } else {
        a.pipeline.max(1)
    };
    let exchange: Arc<str> = a.exchange.as_str().into();
    let rk: Arc<str> = cx.routing_key.as_str().into();
    let mut inflight: FuturesUnordered<BoxFuture<'static, Res<()>>> = FuturesUnordered::new();
    start.wait().await;
    let mut pacer = Pacer::new(a.rate);
    let mut seq = 0u64;
    while !st.stop.load(Relaxed) && (a.pmessages == 0 || seq < a.pmessages) {
        if let Some(due) = pacer.next_due() {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(due.into()) => break,
                    r = inflight.next(), if !inflight.is_empty() => { if let Some(r) = r { r?; } }
                }
            }
        }
        backlog_gate(a, st).await;
        while inflight.len() >= window && !st.stop.load(Relaxed) {
            if let Ok(Some(r)) =
                tokio::time::timeout(Duration::from_millis(100), inflight.next()).await
            {
                r?
            }
        }
        if st.stop.load(Relaxed) {
            break;
        }
        seq += 1;
        let (ch2, st2, props2, ex, rk) = (
            ch.clone(),
            st.clone(),
            props.clone(),
            exchange.clone(),
            rk.clone(),
        );
        let body = make_body(a.size);
        inflight.push(Box::pin(async move {
            let pc = ch2
                .basic_publish(&ex, &rk, BasicPublishOptions::default(), &body, props2)
                .await?;
            st2.published.fetch_add(1, Relaxed);
            if confirm {
                match pc.await? {
                    Confirmation::Nack(_) => st2.nacked.fetch_add(1, Relaxed),
                    _ => st2.confirmed.fetch_add(1, Relaxed),
                };
            }
            Ok(())
        }));
        // First poll hands the frames to lapin's IO loop in publish order.
        while let Some(Some(r)) = inflight.next().now_or_never() {
            r?;
        }
    }
    st.producers_done.fetch_add(1, Relaxed);
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(r) = inflight.next().await {
            let _ = r;
        }
    })
    .await;
    let _ = ch.close(200, "bye").await;
    let _ = conn.close(200, "bye").await;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// consumers

pub async fn consumer_amqprs(id: usize, cx: Arc<Ctx>, ready: Arc<Barrier>) -> Res<()> {
    use amqprs::channel::{BasicAckArguments, BasicConsumeArguments, BasicQosArguments};
    let (a, st) = (&cx.a, &cx.st);
    let hist = st.register_hist();
    let conn = amqprs_open(&cx.uri, &format!("perf-consumer-{id}")).await?;
    let ch = conn.open_channel(None).await?;
    if a.prefetch > 0 {
        ch.basic_qos(BasicQosArguments::new(0, a.prefetch, false))
            .await?;
    }
    let mut cargs = BasicConsumeArguments::new(&cx.queue, &format!("perf-consumer-{id}"));
    cargs.no_ack = a.autoack;
    let (_tag, mut rx) = ch.basic_consume_rx(cargs).await?;
    ready.wait().await;
    let every = ack_every(a);
    let mut since = 0usize;
    while let Some(m) = rx.recv().await {
        if let Some(c) = &m.content {
            record_latency(c, &hist);
        }
        st.consumed.fetch_add(1, Relaxed);
        if !a.autoack {
            let tag = m.deliver.as_ref().map(|d| d.delivery_tag()).unwrap_or(0);
            since += 1;
            if since >= every {
                ch.basic_ack(BasicAckArguments::new(tag, every > 1)).await?;
                since = 0;
            }
        }
    }
    let _ = conn; // keep the connection alive for the whole loop
    Ok(())
}

pub async fn consumer_lapin(id: usize, cx: Arc<Ctx>, ready: Arc<Barrier>) -> Res<()> {
    use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
    let (a, st) = (&cx.a, &cx.st);
    let hist = st.register_hist();
    let conn = lapin_open(&a.uri, &format!("perf-consumer-{id}")).await?;
    let ch = conn.create_channel().await?;
    if a.prefetch > 0 {
        ch.basic_qos(a.prefetch, BasicQosOptions::default()).await?;
    }
    let opts = BasicConsumeOptions {
        no_ack: a.autoack,
        ..Default::default()
    };
    let mut consumer = ch
        .basic_consume(
            &cx.queue,
            &format!("perf-consumer-{id}"),
            opts,
            Default::default(),
        )
        .await?;
    ready.wait().await;
    let every = ack_every(a);
    let mut since = 0usize;
    let mut acks: FuturesUnordered<BoxFuture<'static, lapin::Result<()>>> = FuturesUnordered::new();
    loop {
        tokio::select! {
            biased;
            r = acks.next(), if !acks.is_empty() => { if let Some(r) = r { r?; } }
            d = consumer.next() => {
                let Some(d) = d else { break };
                let d = d?;
                record_latency(&d.data, &hist);
                st.consumed.fetch_add(1, Relaxed);
                if !a.autoack {
                    since += 1;
                    if since >= every {
                        let (ch2, tag, multiple) = (ch.clone(), d.delivery_tag, every > 1);
                        acks.push(Box::pin(async move {
                            ch2.basic_ack(tag, BasicAckOptions { multiple }).await
                        }));
                        since = 0;
                    }
                }
            }
        }
    }
    let _ = conn;
    Ok(())
}
