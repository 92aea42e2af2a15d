//! The RabbitMQ Stream protocol in a cluster (issue 14): two warren
//! processes (127.0.0.1 and .2, the harness of tests/common/cluster.rs) with
//! Stream listeners.
//!
//! - On a node that is not a stream's home (B, for a stream declared on A),
//!   which has no member of it, `subscribe` and `query_offset` answer
//!   STREAM_NOT_AVAILABLE (0x06), as RabbitMQ's do without a local member;
//!   publishing (with confirms and deduplication), `query_publisher_sequence`
//!   and `store_offset` go to A, as RabbitMQ's go to the leader; with A
//!   down, `declare_publisher` on B is STREAM_NOT_AVAILABLE.
//! - Stream protocol `create` / `delete` and `create_super_stream` /
//!   `delete_super_stream` are committed by the metadata group before they
//!   are answered: what A creates B has (AMQP passive declares, `metadata`
//!   naming A as leader, `partitions` and `route`), clients on B follow
//!   metadata to A to publish and consume, and a delete on B removes it on A.
//! - Without a majority a create is answered INTERNAL_ERROR, never OK; a
//!   stream whose home node is down has no leader in `metadata` (OK with
//!   leader reference 0xffff, as RabbitMQ answers when no member runs).

mod common;

use common::cluster::{two_stream_nodes, Node};
use common::stream::{self, Heard};
use futures::StreamExt;
use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::ExchangeKind;
use rabbitmq_stream_client::error::ClientError;
use rabbitmq_stream_client::types::{Message, OffsetSpecification, ResponseCode};
use rabbitmq_stream_client::{Client, ClientOptions, Environment};
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;

async fn client(n: &Node) -> Client {
    common::t(Client::connect(
        ClientOptions::builder()
            .host(&n.ip)
            .port(n.stream.expect("stream port"))
            .build(),
    ))
    .await
    .expect("stream client")
}

/// A client on `n` whose publish confirms and errors come to a channel.
async fn publishing_client(n: &Node) -> (Client, Heard) {
    let c = client(n).await;
    let heard = stream::hear_publishes(&c).await;
    (c, heard)
}

/// Wait until `heard` has confirmed every id of `ids` (in any frames); the
/// ids confirmed meanwhile, in order, and any errors.
async fn confirmed(heard: &mut Heard, ids: &[u64]) -> (Vec<u64>, Vec<(u64, u16)>) {
    let (mut got, mut errors) = (Vec::new(), Vec::new());
    while !ids.iter().all(|i| got.contains(i)) && errors.is_empty() {
        let (c, e) = common::t(heard.recv()).await.expect("a confirm");
        got.extend(c);
        errors.extend(e);
    }
    (got, errors)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_on_a_non_home_node_goes_to_the_home_node() {
    let (a, b) = two_stream_nodes("strm-home").await;

    // Declared over AMQP on A (replicated; A is its home).
    let conn = a.connect().await;
    let ch = common::t(conn.create_channel()).await.expect("channel");
    stream::declare_stream(&ch, "ss").await;
    let _ = conn.close(200, "bye").await;

    // B learns of it and names A as leader.
    let (on_b, mut heard) = publishing_client(&b).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = common::t(on_b.metadata(vec!["ss".to_string()]))
            .await
            .expect("metadata");
        if let Some(md) = m.get("ss").filter(|md| md.leader.host == a.ip) {
            assert_eq!(md.leader.port, u32::from(a.stream.expect("stream port")));
            break;
        }
        assert!(Instant::now() < deadline, "ss not led by A on B: {m:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // B has no member of the stream: reading it there is not available
    // (RabbitMQ's subscribe and query_offset need a local member).
    let s = common::t(on_b.subscribe(1, "ss", OffsetSpecification::First, 10, HashMap::new()))
        .await
        .expect("subscribe");
    assert_eq!(s.code(), &ResponseCode::StreamNotAvailable);
    let q = common::t(on_b.query_offset("ref".into(), "ss")).await;
    assert!(
        matches!(
            q,
            Err(ClientError::RequestError(ResponseCode::StreamNotAvailable))
        ),
        "query_offset on B: {q:?}"
    );

    // Writing goes to the leader from any node, as RabbitMQ's does: a
    // publisher on B, with deduplication by its reference.
    let p = common::t(on_b.declare_publisher(1, Some("ref".into()), "ss"))
        .await
        .expect("declare_publisher");
    assert_eq!(p.code(), &ResponseCode::Ok);
    // A's management API lists B's Stream connection and its publisher (as
    // RabbitMQ's lists the whole cluster's), each row naming node B.
    let (_, conns) = a.get("/api/stream/connections");
    let rows = conns.as_array().cloned().unwrap_or_default();
    assert_eq!(rows.len(), 1, "{conns}");
    assert_eq!(rows[0]["node"], b.name().as_str(), "{conns}");
    for path in ["/api/stream/publishers", "/api/stream/publishers/%2F/ss"] {
        let (status, pubs) = a.get(path);
        assert_eq!(status, 200, "{path}: {pubs}");
        let rows = pubs.as_array().cloned().unwrap_or_default();
        assert_eq!(rows.len(), 1, "{path}: {pubs}");
        assert_eq!(rows[0]["reference"], "ref", "{pubs}");
        assert_eq!(rows[0]["connection_details"]["node"], b.name().as_str());
    }
    let name = rows[0]["name"]
        .as_str()
        .unwrap_or_default()
        .replace(' ', "%20")
        .replace('>', "%3E")
        .replace(':', "%3A");
    let (status, one) = a.get(&format!("/api/stream/connections/%2F/{name}"));
    assert_eq!(
        (status, &one["node"]),
        (200, &serde_json::json!(b.name())),
        "{one}"
    );
    let batch = |ids: std::ops::Range<u64>| -> Vec<Message> {
        ids.map(|i| {
            Message::builder()
                .publishing_id(i)
                .body(format!("m{i}"))
                .build()
        })
        .collect()
    };
    common::t(on_b.publish(1, batch(1..4), 1))
        .await
        .expect("publish");
    common::t(on_b.publish(1, batch(4..6), 1))
        .await
        .expect("publish");
    let (ids, errors) = confirmed(&mut heard, &[1, 2, 3, 4, 5]).await;
    assert_eq!((ids, errors), (vec![1, 2, 3, 4, 5], vec![]));
    // Resent with one more (as after a reconnect): 4 and 5 are known.
    common::t(on_b.publish(1, batch(4..7), 1))
        .await
        .expect("publish");
    let (ids, errors) = confirmed(&mut heard, &[4, 5, 6]).await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(ids.len(), 3, "each confirmed once: {ids:?}");
    // The home node's sequence for the reference, asked from B (key 5
    // over a raw connection: the client library drops its response code).
    let seq = common::t(on_b.query_publisher_sequence("ref", "ss"))
        .await
        .expect("sequence");
    assert_eq!(seq, 6);
    let mut raw = stream::raw_open(stream_addr(&b)).await;
    let mut body = stream::s16("ref");
    body.extend_from_slice(&stream::s16("ss"));
    assert_eq!(stream::request(&mut raw, 5, &body).await, 1, "OK");
    // An offset stored on B is stored on the home node.
    common::t(on_b.store_offset("reader", "ss", 3))
        .await
        .expect("store_offset");
    // A stream that does not exist still says so.
    let none = common::t(on_b.declare_publisher(2, None, "nope"))
        .await
        .expect("declare_publisher");
    assert_eq!(none.code(), &ResponseCode::StreamDoesNotExist);

    // On A (the home): what B published, once each, and the offset.
    let on_a = &client(&a).await;
    until("the offset stored from B", || async move {
        common::t(on_a.query_offset("reader".into(), "ss"))
            .await
            .ok()
            == Some(3)
    })
    .await;
    let _ = on_a.close().await;
    let bodies = consume_from(&a.ip, a.stream.expect("stream port"), "ss", 6).await;
    assert_eq!(bodies, ["m1", "m2", "m3", "m4", "m5", "m6"]);
    let seq = common::t(client(&a).await.query_publisher_sequence("ref", "ss"))
        .await
        .expect("sequence on A");
    assert_eq!(seq, 6);
    let _ = on_b.close().await;
}

/// Where `n`'s Stream listener is.
fn stream_addr(n: &Node) -> std::net::SocketAddr {
    format!("{}:{}", n.ip, n.stream.expect("stream port"))
        .parse()
        .expect("addr")
}

/// The leader `c`'s node names for `stream` (None: not in the answer, or
/// no leader).
async fn leader_of(c: &Client, stream: &str) -> Option<(String, u32)> {
    let m = common::t(c.metadata(vec![stream.to_string()]))
        .await
        .expect("metadata");
    m.get(stream)
        .filter(|md| md.response_code == ResponseCode::Ok)
        .map(|md| (md.leader.host.clone(), md.leader.port))
}

/// Wait until `c`'s node names `n` as the leader of every one of `streams`.
async fn wait_led_by(c: &Client, streams: &[String], n: &Node) {
    let want = Some((n.ip.clone(), u32::from(n.stream.expect("stream port"))));
    let deadline = Instant::now() + Duration::from_secs(10);
    for s in streams {
        loop {
            let got = leader_of(c, s).await;
            if got == want {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{s} led by {got:?}, not {want:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Whether a passive declare of queue `q` succeeds on `n`.
async fn queue_exists(n: &Node, q: &str) -> bool {
    let conn = n.connect().await;
    let ch = common::t(conn.create_channel()).await.expect("channel");
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let ok = common::t(ch.queue_declare(q, passive, FieldTable::default()))
        .await
        .is_ok();
    let _ = conn.close(200, "bye").await;
    ok
}

/// Whether a passive declare of exchange `x` succeeds on `n`.
async fn exchange_exists(n: &Node, x: &str) -> bool {
    let conn = n.connect().await;
    let ch = common::t(conn.create_channel()).await.expect("channel");
    let passive = ExchangeDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let ok =
        common::t(ch.exchange_declare(x, ExchangeKind::Direct, passive, FieldTable::default()))
            .await
            .is_ok();
    let _ = conn.close(200, "bye").await;
    ok
}

/// Poll `check` (async) until it holds, within 10 s.
async fn until<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Read `n` bodies from `stream` on the node at `host:port`, from the first.
async fn consume_from(host: &str, port: u16, stream: &str, n: usize) -> Vec<String> {
    let env = common::t(Environment::builder().host(host).port(port).build())
        .await
        .expect("environment");
    let mut consumer = common::t(
        env.consumer()
            .offset(OffsetSpecification::First)
            .build(stream),
    )
    .await
    .expect("consumer");
    let mut bodies = Vec::new();
    while bodies.len() < n {
        let d = common::t(consumer.next())
            .await
            .expect("delivery")
            .expect("ok");
        let body = d.message().data().expect("body").to_vec();
        bodies.push(String::from_utf8_lossy(&body).to_string());
    }
    let _ = consumer.handle().close().await;
    bodies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_protocol_create_and_delete_are_replicated() {
    let (a, b) = two_stream_nodes("strm-create").await;
    let on_a = client(&a).await;
    let on_b = client(&b).await;

    // Created on A over the Stream protocol: A is its home, B has its record.
    let started = Instant::now();
    let r = common::t(on_a.create_stream("cs", HashMap::new()))
        .await
        .expect("create");
    assert_eq!(r.code(), &ResponseCode::Ok);
    println!(
        "create answered after its commit in {:?}",
        started.elapsed()
    );
    wait_led_by(&on_b, &["cs".to_string()], &a).await;
    assert!(queue_exists(&b, "cs").await, "passive declare of cs on B");
    let again = common::t(on_b.create_stream("cs", HashMap::new()))
        .await
        .expect("create");
    assert_eq!(again.code(), &ResponseCode::StreamAlreadyExists);
    let s = common::t(on_b.subscribe(1, "cs", OffsetSpecification::First, 10, HashMap::new()))
        .await
        .expect("subscribe");
    assert_eq!(
        s.code(),
        &ResponseCode::StreamNotAvailable,
        "B has no member"
    );

    // A producer whose client connected to B follows metadata to A.
    let env_b = common::t(
        Environment::builder()
            .host(&b.ip)
            .port(b.stream.expect("stream port"))
            .build(),
    )
    .await
    .expect("environment on B");
    let producer = common::t(env_b.producer().build("cs"))
        .await
        .expect("producer through B");
    for i in 0..3 {
        let m = Message::builder().body(format!("c{i}")).build();
        let st = common::t(producer.send_with_confirm(m))
            .await
            .expect("confirmed");
        assert!(st.confirmed(), "message {i} not confirmed");
    }
    let _ = producer.close().await;
    // A consumer follows B's metadata to the leader, A, and reads them there.
    let (host, port) = leader_of(&on_b, "cs").await.expect("a leader");
    assert_eq!(host, a.ip);
    let port = u16::try_from(port).expect("port");
    assert_eq!(consume_from(&host, port, "cs", 3).await, ["c0", "c1", "c2"]);

    // Deleted on B (not its home): gone on both, once answered.
    let d = common::t(on_b.delete_stream("cs")).await.expect("delete");
    assert_eq!(d.code(), &ResponseCode::Ok);
    assert!(!queue_exists(&b, "cs").await, "cs still on B");
    until("cs gone on A", || async { !queue_exists(&a, "cs").await }).await;
    assert_eq!(leader_of(&on_a, "cs").await, None);
    // A fresh create on A makes an empty stream: the old log went with it.
    let r = common::t(on_a.create_stream("cs", HashMap::new()))
        .await
        .expect("create");
    assert_eq!(r.code(), &ResponseCode::Ok);
    let m = Message::builder().body("fresh").build();
    let env_a = common::t(
        Environment::builder()
            .host(&a.ip)
            .port(a.stream.expect("stream port"))
            .build(),
    )
    .await
    .expect("environment on A");
    let producer = common::t(env_a.producer().build("cs"))
        .await
        .expect("producer on A");
    let st = common::t(producer.send_with_confirm(m))
        .await
        .expect("confirmed");
    assert!(st.confirmed());
    let _ = producer.close().await;
    let port = a.stream.expect("stream port");
    assert_eq!(consume_from(&a.ip, port, "cs", 1).await, ["fresh"]);
    let _ = on_a.close().await;
    let _ = on_b.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn super_stream_created_on_a_routes_on_b() {
    let (a, b) = two_stream_nodes("strm-super").await;
    let on_a = client(&a).await;
    let on_b = client(&b).await;
    let parts: Vec<String> = (0..3).map(|i| format!("sup-{i}")).collect();
    let keys: Vec<String> = ["x", "y", "z"].iter().map(|k| k.to_string()).collect();
    let started = Instant::now();
    let r = common::t(on_a.create_super_stream("sup", parts.clone(), keys, HashMap::new()))
        .await
        .expect("create super stream");
    assert_eq!(r.code(), &ResponseCode::Ok);
    println!(
        "super stream of 3 answered after its 4 commits in {:?}",
        started.elapsed()
    );

    // B: the partitions in order, routing by binding key, A leading each.
    until("sup's partitions on B", || async {
        common::t(on_b.partitions("sup".into()))
            .await
            .is_ok_and(|p| p.streams == parts)
    })
    .await;
    let r = common::t(on_b.route("y".into(), "sup".into()))
        .await
        .expect("route");
    assert_eq!(r.streams, vec!["sup-1".to_string()]);
    let r = common::t(on_b.route("w".into(), "sup".into()))
        .await
        .expect("route");
    assert!(r.streams.is_empty());
    wait_led_by(&on_b, &parts, &a).await;
    assert!(exchange_exists(&b, "sup").await, "exchange sup on B");
    for p in &parts {
        assert!(queue_exists(&b, p).await, "{p} on B");
    }

    // Deleted on B: the exchange and the partitions go on A too.
    let d = common::t(on_b.delete_super_stream("sup"))
        .await
        .expect("delete super stream");
    assert_eq!(d.code(), &ResponseCode::Ok);
    until("sup gone on A", || async {
        !exchange_exists(&a, "sup").await && !queue_exists(&a, "sup-2").await
    })
    .await;
    for p in &parts {
        assert!(!queue_exists(&a, p).await, "{p} still on A");
        assert!(!queue_exists(&b, p).await, "{p} still on B");
    }
    let p = common::t(on_a.partitions("sup".into())).await;
    assert!(
        !p.as_ref().is_ok_and(|p| p.is_ok()),
        "partitions of a deleted super stream on A: {p:?}"
    );
    let _ = on_a.close().await;
    let _ = on_b.close().await;
}

/// A raw metadata request for `streams`: (brokers as (reference, host, port),
/// streams as (name, code, leader reference, replica count)).
async fn raw_metadata(
    sock: &mut tokio::net::TcpStream,
    streams: &[&str],
) -> (Vec<(u16, String, u32)>, Vec<(String, u16, u16, i32)>) {
    let mut body = 9u32.to_be_bytes().to_vec();
    body.extend_from_slice(&(streams.len() as i32).to_be_bytes());
    for s in streams {
        body.extend(stream::s16(s));
    }
    sock.write_all(&stream::frame(15, 1, &body))
        .await
        .expect("write");
    let f = stream::expect(sock, 0x800f).await;
    let mut at = 8;
    let u16_at = |at: &mut usize| {
        let v = u16::from_be_bytes([f[*at], f[*at + 1]]);
        *at += 2;
        v
    };
    let u32_at = |at: &mut usize| {
        let v = u32::from_be_bytes([f[*at], f[*at + 1], f[*at + 2], f[*at + 3]]);
        *at += 4;
        v
    };
    let str_at = |at: &mut usize| {
        let len = u16::from_be_bytes([f[*at], f[*at + 1]]) as usize;
        let v = String::from_utf8_lossy(&f[*at + 2..*at + 2 + len]).into_owned();
        *at += 2 + len;
        v
    };
    let mut brokers = Vec::new();
    for _ in 0..u32_at(&mut at) {
        let r = u16_at(&mut at);
        let h = str_at(&mut at);
        brokers.push((r, h, u32_at(&mut at)));
    }
    let mut out = Vec::new();
    for _ in 0..u32_at(&mut at) {
        let name = str_at(&mut at);
        let code = u16_at(&mut at);
        let leader = u16_at(&mut at);
        let n = u32_at(&mut at) as i32;
        at += 2 * n.max(0) as usize;
        out.push((name, code, leader, n));
    }
    (brokers, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_majority_creates_fail_and_a_down_home_leads_nothing() {
    let (mut a, b) = two_stream_nodes("strm-quorum").await;
    let on_a = client(&a).await;
    let r = common::t(on_a.create_stream("hd", HashMap::new()))
        .await
        .expect("create");
    assert_eq!(r.code(), &ResponseCode::Ok);
    let _ = on_a.close().await;
    let on_b = client(&b).await;
    wait_led_by(&on_b, &["hd".to_string()], &a).await;
    let mut raw = stream::raw_open(stream_addr(&b)).await;
    let (brokers, meta) = raw_metadata(&mut raw, &["hd", "nope"]).await;
    assert_eq!(
        brokers,
        vec![(0, a.ip.clone(), u32::from(a.stream.expect("port")))]
    );
    assert_eq!(
        meta,
        vec![("hd".into(), 1, 0, 0), ("nope".into(), 2, 0xffff, 0)]
    );

    // A (the home node, and half of the two-node group) goes down.
    a.stop();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (brokers, meta) = raw_metadata(&mut raw, &["hd"]).await;
        if meta == vec![("hd".to_string(), 1, 0xffff, 0)] {
            assert!(brokers.is_empty(), "no leader to name: {brokers:?}");
            break;
        }
        assert!(Instant::now() < deadline, "hd still led on B: {meta:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let s = common::t(on_b.subscribe(1, "hd", OffsetSpecification::First, 10, HashMap::new()))
        .await
        .expect("subscribe");
    assert_eq!(s.code(), &ResponseCode::StreamNotAvailable);
    // Nor can B write to it: its home node is down.
    let p = common::t(on_b.declare_publisher(1, None, "hd"))
        .await
        .expect("declare_publisher");
    assert_eq!(p.code(), &ResponseCode::StreamNotAvailable);

    // B alone is no majority: creates are not committed and say so.
    let started = Instant::now();
    let r = common::t(on_b.create_stream("nq", HashMap::new()))
        .await
        .expect("create");
    assert_eq!(r.code(), &ResponseCode::InternalError);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(2500) && took < Duration::from_secs(8),
        "answered after {took:?} (commit timeout 3 s)"
    );
    let parts = vec!["nqs-0".to_string()];
    let r = common::t(on_b.create_super_stream("nqs", parts, vec!["k".into()], HashMap::new()))
        .await
        .expect("create super stream");
    assert_eq!(r.code(), &ResponseCode::InternalError);
    // The connection goes on after a failed commit.
    let (_, meta) = raw_metadata(&mut raw, &["hd"]).await;
    assert_eq!(meta, vec![("hd".to_string(), 1, 0xffff, 0)]);

    // A is back: it leads hd again in B's answers.
    a.start().await;
    wait_led_by(&on_b, &["hd".to_string()], &a).await;
    let _ = on_b.close().await;
}
