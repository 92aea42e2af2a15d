//! A Jepsen-style check of Stream protocol publishing across nodes while
//! partitions come and go: three warren processes on 127.0.0.1-3 with Stream
//! listeners, each reaching the others only through a test-owned TCP proxy
//! per directed pair (as tests/cluster_jepsen.rs).
//!
//! A stream is homed on A. A publisher on B and one on C (each with its own
//! publisher reference, so the home node deduplicates their resends) publish
//! batches of numbered messages; their publishes go to A over the data link.
//! A batch is sent, then awaited: all confirmed, the next one is sent; any
//! `publish_error` (the link to A is down), the same batch, with the same
//! publishing ids, is sent again after a pause; the connection lost, the
//! client connects again, declares its publisher again and resends it.
//! Meanwhile a seeded nemesis (`WARREN_JEPSEN_SEED`, printed) runs the
//! scenarios in a seeded order, each followed by a heal: A cut from B, A cut
//! from C, A isolated, random halves (one node against two).
//!
//! After the final heal every publisher's last batch is confirmed; then the
//! stream is read on A from the first offset up to a marker published last.
//! Checked:
//! - each publisher's messages are in the stream once each, in its order,
//!   exactly the ids it had confirmed: none lost (a batch whose answer was
//!   lost with the link, but stored, is not stored again when resent), none
//!   duplicated, none that was never confirmed;
//! - no batch waits longer than `CONFIRM_WITHIN` for its answer (no hang);
//! - the nemesis made publishes fail (some `publish_error`s were seen), so
//!   the resend path was exercised.
//!
//! A summary line per scenario is printed (batches confirmed, errors).

mod common;

use common::jepsen::{Net, LINK_FAULTS};
use common::stream::Heard;
use parking_lot::Mutex;
use rabbitmq_stream_client::types::{Message, OffsetSpecification, ResponseCode};
use rabbitmq_stream_client::{Client, ClientOptions, Environment};
use rand::seq::SliceRandom;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const STREAM: &str = "jepsen-stream";
/// How long a fault lasts, and the heal after it.
const FAULT: Duration = Duration::from_millis(2000);
const HEAL: Duration = Duration::from_millis(1200);
/// A batch not answered within this is a hang (a failure).
const CONFIRM_WITHIN: Duration = Duration::from_secs(20);
/// Messages per publish frame.
const BATCH: u64 = 20;

/// Per phase: (batches confirmed, publish errors seen).
type Phases = Mutex<BTreeMap<usize, (u64, u64)>>;

struct Shared {
    phase: AtomicUsize,
    stop: AtomicBool,
    phases: Phases,
}

impl Shared {
    fn count(&self, confirmed: u64, errors: u64) {
        let phase = self.phase.load(Ordering::Acquire);
        let mut p = self.phases.lock();
        let e = p.entry(phase).or_default();
        e.0 += confirmed;
        e.1 += errors;
    }
}

/// A client on `node` with a publisher (id 1, `reference`) on the stream,
/// and where its confirms and errors come; None while that cannot be had.
async fn publisher_client(node: &(String, u16), reference: &str) -> Option<(Client, Heard)> {
    let opts = ClientOptions::builder().host(&node.0).port(node.1).build();
    let client = tokio::time::timeout(Duration::from_secs(5), Client::connect(opts))
        .await
        .ok()?
        .ok()?;
    let heard = common::stream::hear_publishes(&client).await;
    let declared = tokio::time::timeout(
        Duration::from_secs(5),
        client.declare_publisher(1, Some(reference.to_string()), STREAM),
    )
    .await;
    match declared {
        Ok(Ok(r)) if r.code() == &ResponseCode::Ok => Some((client, heard)),
        _ => {
            let _ = client.close().await;
            None
        }
    }
}

/// Publish numbered batches through `node` until told to stop; returns the
/// next id it would have sent (every id below it was confirmed).
async fn publisher(s: Arc<Shared>, node: (String, u16), reference: String) -> u64 {
    let mut next = 1u64;
    'connect: loop {
        if s.stop.load(Ordering::Acquire) && next > 1 {
            // Stopping: nothing in flight (a batch is sent and awaited).
            return next;
        }
        let Some((client, mut heard)) = publisher_client(&node, &reference).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        loop {
            if s.stop.load(Ordering::Acquire) {
                let _ = client.close().await;
                return next;
            }
            let ids: Vec<u64> = (next..next + BATCH).collect();
            let batch: Vec<Message> = ids
                .iter()
                .map(|i| {
                    Message::builder()
                        .publishing_id(*i)
                        .body(format!("{reference}-{i}"))
                        .build()
                })
                .collect();
            let sent = tokio::time::timeout(Duration::from_secs(5), client.publish(1, batch, 1));
            if !matches!(sent.await, Ok(Ok(_))) {
                let _ = client.close().await;
                continue 'connect;
            }
            let mut confirmed = 0;
            let deadline = tokio::time::Instant::now() + CONFIRM_WITHIN;
            let failed = loop {
                match tokio::time::timeout_at(deadline, heard.recv()).await {
                    Ok(Some((c, e))) if e.is_empty() => {
                        confirmed += c.iter().filter(|i| ids.contains(i)).count();
                        if confirmed == ids.len() {
                            break false;
                        }
                    }
                    Ok(Some((_, e))) => {
                        assert!(
                            e.iter().all(|(_, c)| *c == 6),
                            "{reference}: unexpected publish errors {e:?}"
                        );
                        break true;
                    }
                    // The connection is gone: connect again and resend.
                    Ok(None) => continue 'connect,
                    Err(_) => panic!(
                        "{reference}: batch {next}..{} not answered within {CONFIRM_WITHIN:?}",
                        next + BATCH
                    ),
                }
            };
            if failed {
                s.count(0, 1);
                // Confirms of this batch that came before the error are
                // not waited for again: the whole batch is resent.
                while heard.try_recv().is_ok() {}
                tokio::time::sleep(Duration::from_millis(50)).await;
            } else {
                s.count(1, 0);
                next += BATCH;
            }
        }
    }
}

/// Where node `i`'s Stream listener is.
fn stream_addr(net: &Net, i: usize) -> (String, u16) {
    let n = &net.nodes[i];
    (n.ip.clone(), n.stream.expect("stream port"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_publishes_forwarded_under_partitions_are_stored_once_each() {
    let (mut rng, _) = common::jepsen::seeded("WARREN_JEPSEN_SEED", "stream jepsen");

    let net = Net::start("sjepsen", true).await;
    let (a, b, c) = (0, 1, 2);

    // The stream, created on A (its home), known on B and C.
    let (ah, ap) = stream_addr(&net, a);
    let on_a = common::t(Client::connect(
        ClientOptions::builder().host(&ah).port(ap).build(),
    ))
    .await
    .expect("client on A");
    let r = common::t(on_a.create_stream(STREAM, Default::default()))
        .await
        .expect("create");
    assert_eq!(r.code(), &ResponseCode::Ok);
    for i in [b, c] {
        let deadline = Instant::now() + Duration::from_secs(15);
        while publisher_client(&stream_addr(&net, i), "probe")
            .await
            .is_none()
        {
            assert!(Instant::now() < deadline, "no publisher on node {i}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let shared = Arc::new(Shared {
        phase: AtomicUsize::new(0),
        stop: AtomicBool::new(false),
        phases: Mutex::new(BTreeMap::new()),
    });
    let mut scenarios = LINK_FAULTS;
    scenarios.shuffle(&mut rng);
    let mut phases: Vec<String> = vec!["start (healed)".into()];
    let publishers = [
        tokio::spawn(publisher(
            Arc::clone(&shared),
            stream_addr(&net, b),
            "b".into(),
        )),
        tokio::spawn(publisher(
            Arc::clone(&shared),
            stream_addr(&net, c),
            "c".into(),
        )),
    ];
    tokio::time::sleep(HEAL).await;
    net.run_link_faults(
        &scenarios,
        &mut rng,
        (FAULT, HEAL),
        &mut phases,
        &shared.phase,
        || {},
    )
    .await;
    net.heal();
    phases.push("final".into());
    shared.phase.store(phases.len() - 1, Ordering::Release);
    shared.stop.store(true, Ordering::Release);
    let mut next = Vec::new();
    for p in publishers {
        next.push(common::t(p).await.expect("publisher"));
    }
    for (i, name) in phases.iter().enumerate() {
        let (ok, errors) = shared.phases.lock().get(&i).copied().unwrap_or_default();
        println!("stream jepsen: {name}: {ok} batches confirmed, {errors} publish errors");
    }
    let errors: u64 = shared.phases.lock().values().map(|(_, e)| e).sum();
    assert!(errors > 0, "the nemesis never made a publish fail");

    // A marker, published on A last: everything before it is the stream.
    let env = common::t(Environment::builder().host(&ah).port(ap).build())
        .await
        .expect("environment on A");
    let marker = common::t(env.producer().build(STREAM))
        .await
        .expect("producer on A");
    let st = common::t(marker.send_with_confirm(Message::builder().body("end").build()))
        .await
        .expect("marker confirmed");
    assert!(st.confirmed());
    let _ = marker.close().await;
    let mut consumer = common::t(
        env.consumer()
            .offset(OffsetSpecification::First)
            .build(STREAM),
    )
    .await
    .expect("consumer on A");
    let mut bodies: Vec<String> = Vec::new();
    loop {
        use futures::StreamExt;
        let d = common::t(consumer.next())
            .await
            .expect("delivery")
            .expect("ok");
        let body = String::from_utf8_lossy(d.message().data().expect("body")).to_string();
        if body == "end" {
            break;
        }
        bodies.push(body);
    }
    let _ = consumer.handle().close().await;
    for (reference, next) in ["b", "c"].iter().zip(next) {
        let got: Vec<&str> = bodies
            .iter()
            .filter(|b| b.starts_with(&format!("{reference}-")))
            .map(String::as_str)
            .collect();
        let want: Vec<String> = (1..next).map(|i| format!("{reference}-{i}")).collect();
        assert_eq!(
            got.len(),
            want.len(),
            "publisher {reference}: {} stored, {} confirmed",
            got.len(),
            want.len()
        );
        assert!(
            got == want,
            "publisher {reference}: stored out of order or wrong"
        );
        println!(
            "stream jepsen: publisher {reference}: {} stored once each",
            got.len()
        );
    }
    assert_eq!(
        bodies.len(),
        bodies
            .iter()
            .filter(|b| b.starts_with("b-") || b.starts_with("c-"))
            .count(),
        "nothing else in the stream"
    );
    let _ = on_a.close().await;
}
