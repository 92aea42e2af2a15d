//! The Stream protocol on a node that is not a stream's home (issue 14): two
//! warren processes (127.0.0.1 and .2, the harness of tests/common/cluster.rs)
//! with Stream listeners, a stream declared on A. On B, which has no member of
//! it, `declare_publisher`, `subscribe`, `query_offset` and
//! `query_publisher_sequence` answer STREAM_NOT_AVAILABLE (0x06), as RabbitMQ
//! does for a node without a local member; publishing and consuming on A work.

mod common;

use common::cluster::{two_stream_nodes, Node};
use common::stream;
use futures::StreamExt;
use rabbitmq_stream_client::error::ClientError;
use rabbitmq_stream_client::types::{Message, OffsetSpecification, ResponseCode};
use rabbitmq_stream_client::{Client, ClientOptions, Environment};
use std::collections::HashMap;
use std::time::{Duration, Instant};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_subscribe_on_a_non_home_node_are_not_available() {
    let (a, b) = two_stream_nodes("strm-home").await;

    // Declared over AMQP on A (replicated; A is its home). The Stream
    // protocol's own `create` is not replicated yet (docs/cluster.md).
    let conn = a.connect().await;
    let ch = common::t(conn.create_channel()).await.expect("channel");
    stream::declare_stream(&ch, "ss").await;
    let _ = conn.close(200, "bye").await;
    let on_a = client(&a).await;

    // B learns of it and names A as leader.
    let on_b = client(&b).await;
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

    // On B: no member of the stream here.
    let p = common::t(on_b.declare_publisher(1, Some("ref".into()), "ss"))
        .await
        .expect("declare_publisher");
    assert_eq!(p.code(), &ResponseCode::StreamNotAvailable);
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
    // query_publisher_sequence (key 5) over a raw connection: the client
    // library drops its response code.
    let addr = format!("{}:{}", b.ip, b.stream.expect("stream port"));
    let mut raw = stream::raw_open(addr.parse().expect("addr")).await;
    let mut body = stream::s16("ref");
    body.extend_from_slice(&stream::s16("ss"));
    assert_eq!(
        stream::request(&mut raw, 5, &body).await,
        6,
        "STREAM_NOT_AVAILABLE"
    );
    // A stream that does not exist still says so.
    let none = common::t(on_b.declare_publisher(2, None, "nope"))
        .await
        .expect("declare_publisher");
    assert_eq!(none.code(), &ResponseCode::StreamDoesNotExist);
    let _ = on_b.close().await;
    let _ = on_a.close().await;

    // On A (the home): publish with confirms, then consume from the start.
    let env = common::t(
        Environment::builder()
            .host(&a.ip)
            .port(a.stream.expect("stream port"))
            .build(),
    )
    .await
    .expect("environment on A");
    let mut producer = common::t(env.producer().name("ref").build("ss"))
        .await
        .expect("producer on A");
    for i in 0..3 {
        let m = Message::builder().body(format!("m{i}")).build();
        let st = common::t(producer.send_with_confirm(m))
            .await
            .expect("confirmed");
        assert!(st.confirmed(), "message {i} not confirmed");
    }
    let mut consumer = common::t(
        env.consumer()
            .offset(OffsetSpecification::First)
            .build("ss"),
    )
    .await
    .expect("consumer on A");
    let mut bodies = Vec::new();
    while bodies.len() < 3 {
        let d = common::t(consumer.next())
            .await
            .expect("delivery")
            .expect("ok");
        let body = d.message().data().expect("body").to_vec();
        bodies.push(String::from_utf8_lossy(&body).to_string());
    }
    assert_eq!(bodies, ["m0", "m1", "m2"]);
    let _ = producer.close().await;
    let _ = consumer.handle().close().await;
}
