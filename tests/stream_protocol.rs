//! The RabbitMQ Stream protocol with the stock Rust client
//! (`rabbitmq-stream-client`) over real TCP against an in-process broker:
//! create/delete, publish with confirms, deduplication, consuming from each
//! offset specification, server-side offsets, super streams, and raw frames
//! with bad input getting the protocol's codes.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use futures::StreamExt;
use rabbitmq_stream_client::error::{ClientError, StreamCreateError};
use rabbitmq_stream_client::types::{ByteCapacity, Message, OffsetSpecification, ResponseCode};
use rabbitmq_stream_client::{Client, ClientOptions, Environment};
use tokio::io::AsyncWriteExt;

use common::stream::{self, declare_stream, frame, raw_open, read_frame, s16, t};

/// One broker for the whole file (stream listener on a free port).
fn broker() -> (SocketAddr, SocketAddr) {
    stream::shared_broker("stream-protocol")
}

async fn env() -> Environment {
    let (_, addr) = broker();
    Environment::builder()
        .host("127.0.0.1")
        .port(addr.port())
        .build()
        .await
        .expect("environment")
}

fn uniq(p: &str) -> String {
    common::uniq(p)
}

fn body(m: &Message) -> String {
    String::from_utf8(m.data().map(<[u8]>::to_vec).unwrap_or_default()).unwrap_or_default()
}

/// Read `n` messages from `stream` starting at `offset`: (offset, body).
async fn consume(
    env: &Environment,
    stream: &str,
    offset: OffsetSpecification,
    n: usize,
) -> Vec<(u64, String)> {
    let mut c = env
        .consumer()
        .offset(offset)
        .build(stream)
        .await
        .expect("consumer");
    let mut out = Vec::new();
    while out.len() < n {
        let d = t(c.next()).await.expect("delivery").expect("ok delivery");
        out.push((d.offset(), body(d.message())));
    }
    let _ = c.handle().close().await;
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn create_publish_confirm_consume_delete() {
    let env = env().await;
    let s = uniq("s");
    t(env
        .stream_creator()
        .max_length(ByteCapacity::MB(10))
        .create(&s))
    .await
    .expect("create");
    // Creating it again: stream already exists.
    match t(env.stream_creator().create(&s)).await {
        Err(StreamCreateError::Create { status, .. }) => {
            assert_eq!(status, ResponseCode::StreamAlreadyExists)
        }
        other => panic!("expected already exists, got {other:?}"),
    }
    let producer = t(env.producer().build(&s)).await.expect("producer");
    for i in 0..10 {
        let st = t(producer.send_with_confirm(Message::builder().body(format!("m{i}")).build()))
            .await
            .expect("send");
        assert!(st.confirmed());
    }
    let batch: Vec<Message> = (10..100)
        .map(|i| Message::builder().body(format!("m{i}")).build())
        .collect();
    let sts = t(producer.batch_send_with_confirm(batch))
        .await
        .expect("batch");
    assert_eq!(sts.len(), 90);
    assert!(sts.iter().all(|s| s.confirmed()));
    producer.close().await.expect("close producer");

    let got = consume(&env, &s, OffsetSpecification::First, 100).await;
    for (i, (o, b)) in got.iter().enumerate() {
        assert_eq!(*o, i as u64);
        assert_eq!(b, &format!("m{i}"));
    }
    // From an offset.
    let got = consume(&env, &s, OffsetSpecification::Offset(42), 3).await;
    let from: Vec<u64> = got.iter().map(|(o, _)| *o).filter(|o| *o >= 42).collect();
    assert!(!from.is_empty() && from[0] == 42, "{got:?}");
    // Last: the last chunk's messages include the last message. Chunks are
    // cut as RabbitMQ's writer cuts its batches (32 entries after a quiet
    // spell, then growing), so the batch of 90 is not one chunk.
    let got = consume(&env, &s, OffsetSpecification::Last, 1).await;
    assert!(got[0].0 > 10 && got[0].0 <= 99, "{got:?}");

    t(env.delete_stream(&s)).await.expect("delete");
    match t(env.delete_stream(&s)).await {
        Err(e) => assert!(format!("{e:?}").contains("StreamDoesNotExist"), "{e:?}"),
        Ok(()) => panic!("deleting twice succeeded"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn next_only_sees_new_messages_and_timestamp() {
    let env = env().await;
    let s = uniq("next");
    t(env.stream_creator().create(&s)).await.expect("create");
    let producer = t(env.producer().build(&s)).await.expect("producer");
    for i in 0..5 {
        t(producer.send_with_confirm(Message::builder().body(format!("old{i}")).build()))
            .await
            .expect("send");
    }
    let mut c = t(env.consumer().offset(OffsetSpecification::Next).build(&s))
        .await
        .expect("consumer");
    t(producer.send_with_confirm(Message::builder().body("new").build()))
        .await
        .expect("send");
    let d = t(c.next()).await.expect("delivery").expect("ok");
    assert_eq!(body(d.message()), "new");
    assert_eq!(d.offset(), 5);
    let _ = c.handle().close().await;

    // A timestamp in the future: nothing old; a timestamp in the past: all.
    let got = consume(&env, &s, OffsetSpecification::Timestamp(0), 6).await;
    assert_eq!(got[0], (0, "old0".to_string()));
    producer.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread")]
async fn dedup_across_publisher_reconnect() {
    let env = env().await;
    let s = uniq("dedup");
    t(env.stream_creator().create(&s)).await.expect("create");
    let mut p = t(env.producer().name("app-1").build(&s))
        .await
        .expect("producer");
    for i in 0..10 {
        t(p.send_with_confirm(Message::builder().body(format!("m{i}")).build()))
            .await
            .expect("send");
    }
    p.close().await.expect("close");

    // The client numbers from the stored sequence + 1 on reconnect, so resend
    // by hand with explicit publishing ids through the raw client.
    let (_, addr) = broker();
    let client = Client::connect(
        ClientOptions::builder()
            .host("127.0.0.1")
            .port(addr.port())
            .build(),
    )
    .await
    .expect("client");
    let seq = t(client.query_publisher_sequence("app-1", &s))
        .await
        .expect("sequence");
    assert_eq!(seq, 9);
    let resp = t(client.declare_publisher(1, Some("app-1".into()), &s))
        .await
        .expect("declare");
    assert_eq!(resp.code(), &ResponseCode::Ok);
    // Ids 5..15: 5..9 are duplicates (confirmed, not stored), 10..14 new.
    let msgs: Vec<Message> = (5..15)
        .map(|i| {
            Message::builder()
                .body(format!("m{i}"))
                .publishing_id(i)
                .build()
        })
        .collect();
    t(client.publish(1, msgs, 1)).await.expect("publish");
    let _ = client.close().await;

    let got = consume(&env, &s, OffsetSpecification::First, 15).await;
    let bodies: Vec<String> = got.into_iter().map(|(_, b)| b).collect();
    let want: Vec<String> = (0..15).map(|i| format!("m{i}")).collect();
    assert_eq!(bodies, want);
    let p = t(env.producer().name("app-1").build(&s))
        .await
        .expect("producer");
    drop(p);
}

#[tokio::test(flavor = "multi_thread")]
async fn store_and_query_offset() {
    let env = env().await;
    let s = uniq("off");
    t(env.stream_creator().create(&s)).await.expect("create");
    let producer = t(env.producer().build(&s)).await.expect("producer");
    for i in 0..5 {
        t(producer.send_with_confirm(Message::builder().body(format!("m{i}")).build()))
            .await
            .expect("send");
    }
    let mut c = t(env
        .consumer()
        .name("reader")
        .offset(OffsetSpecification::First)
        .build(&s))
    .await
    .expect("consumer");
    assert!(c.query_offset().await.is_err(), "no offset stored yet");
    let d = t(c.next()).await.expect("delivery").expect("ok");
    t(c.store_offset(d.offset() + 2)).await.expect("store");
    // store_offset has no response: poll until the query sees it.
    let mut seen = None;
    for _ in 0..100 {
        if let Ok(o) = c.query_offset().await {
            seen = Some(o);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(seen, Some(2));
    let _ = c.handle().close().await;
    producer.close().await.expect("close");
}

#[tokio::test(flavor = "multi_thread")]
async fn metadata_and_missing_streams() {
    let (_, addr) = broker();
    let client = Client::connect(
        ClientOptions::builder()
            .host("127.0.0.1")
            .port(addr.port())
            .build(),
    )
    .await
    .expect("client");
    let s = uniq("meta");
    let r = t(client.create_stream(&s, HashMap::new()))
        .await
        .expect("create");
    assert_eq!(r.code(), &ResponseCode::Ok);
    let m = t(client.metadata(vec![s.clone(), "no-such-stream".into()]))
        .await
        .expect("metadata");
    let md = m.get(&s).expect("stream metadata");
    assert_eq!(md.leader.port, u32::from(addr.port()));
    assert!(!m.contains_key("no-such-stream") || m["no-such-stream"].leader.port == 0);
    // A key RabbitMQ does not know is ignored; a bad value of one it knows
    // is its precondition failed.
    let ignored = uniq("ignored");
    let r = t(client.create_stream(
        &ignored,
        HashMap::from([("bogus".to_string(), "1".to_string())]),
    ))
    .await
    .expect("create");
    assert_eq!(r.code(), &ResponseCode::Ok);
    let r = t(client.delete_stream(&ignored)).await.expect("delete");
    assert_eq!(r.code(), &ResponseCode::Ok);
    let r = t(client.create_stream(
        &uniq("bad"),
        HashMap::from([("max-age".to_string(), "10X".to_string())]),
    ))
    .await
    .expect("create");
    assert_eq!(r.code(), &ResponseCode::PreconditionFailed);
    let r = t(client.declare_publisher(1, None, "no-such-stream"))
        .await
        .expect("declare");
    assert_eq!(r.code(), &ResponseCode::StreamDoesNotExist);
    match t(client.query_offset("x".into(), "no-such-stream")).await {
        Err(ClientError::RequestError(c)) => assert_eq!(c, ResponseCode::StreamDoesNotExist),
        other => panic!("{other:?}"),
    }
    let r = t(client.delete_stream(&s)).await.expect("delete");
    assert_eq!(r.code(), &ResponseCode::Ok);
    let _ = client.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn super_streams_route_and_partitions() {
    let (_, addr) = broker();
    let client = Client::connect(
        ClientOptions::builder()
            .host("127.0.0.1")
            .port(addr.port())
            .build(),
    )
    .await
    .expect("client");
    let ss = uniq("ss");
    let parts: Vec<String> = (0..3).map(|i| format!("{ss}-{i}")).collect();
    let keys: Vec<String> = (0..3).map(|i| i.to_string()).collect();
    let r = t(client.create_super_stream(&ss, parts.clone(), keys, HashMap::new()))
        .await
        .expect("create");
    assert_eq!(r.code(), &ResponseCode::Ok);
    let p = t(client.partitions(ss.clone())).await.expect("partitions");
    assert_eq!(p.streams, parts);
    let r = t(client.route("1".into(), ss.clone()))
        .await
        .expect("route");
    assert_eq!(r.streams, vec![parts[1].clone()]);
    let r = t(client.route("9".into(), ss.clone()))
        .await
        .expect("route");
    assert!(r.streams.is_empty());
    let r = t(client.delete_super_stream(&ss)).await.expect("delete");
    assert_eq!(r.code(), &ResponseCode::Ok);
    let m = t(client.metadata(parts.clone())).await.expect("metadata");
    assert!(parts
        .iter()
        .all(|p| !m.contains_key(p) || m[p].leader.port == 0));
    let _ = client.close().await;
}

// ---- raw frames ----

/// The close the server sends: its code.
async fn close_code(sock: &mut tokio::net::TcpStream) -> u16 {
    let f = read_frame(sock).await.expect("close frame");
    assert_eq!(&f[..2], &[0, 22], "a close, got {f:?}");
    u16::from_be_bytes([f[8], f[9]])
}

#[tokio::test(flavor = "multi_thread")]
async fn raw_unknown_command_and_bad_version() {
    let mut sock = raw_open(broker().1).await;
    sock.write_all(&frame(0x77, 1, &[])).await.expect("write");
    assert_eq!(close_code(&mut sock).await, 13);

    let mut sock = raw_open(broker().1).await;
    sock.write_all(&frame(9, 9, &[1, 0, 1]))
        .await
        .expect("write");
    assert_eq!(close_code(&mut sock).await, 13);
}

#[tokio::test(flavor = "multi_thread")]
async fn raw_oversized_frame_and_bad_credit() {
    let mut sock = raw_open(broker().1).await;
    // Credit for a subscription that does not exist: a credit response.
    sock.write_all(&frame(9, 1, &[7, 0, 1]))
        .await
        .expect("write");
    let f = read_frame(&mut sock).await.expect("credit response");
    assert_eq!(&f[..2], &[0x80, 9]);
    assert_eq!(&f[4..7], &[0, 4, 7]);
    // A frame over the negotiated maximum (1 MiB) that does not come whole
    // is let through as RabbitMQ lets it (the session's unit tests cover one
    // that does), up to 64 MiB: past that, frame too large at once.
    let mut big = ((64u32 << 20) + 1).to_be_bytes().to_vec();
    big.extend_from_slice(&[0, 2, 0, 1]);
    sock.write_all(&big).await.expect("write");
    assert_eq!(close_code(&mut sock).await, 14);
    // The broker is still fine.
    let _ = raw_open(broker().1).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn raw_publish_without_publisher_gets_publish_error() {
    let mut sock = raw_open(broker().1).await;
    let mut p = vec![9u8];
    p.extend_from_slice(&1i32.to_be_bytes());
    p.extend_from_slice(&5u64.to_be_bytes());
    p.extend_from_slice(&3i32.to_be_bytes());
    p.extend_from_slice(b"abc");
    sock.write_all(&frame(2, 1, &p)).await.expect("write");
    let f = read_frame(&mut sock).await.expect("publish error");
    assert_eq!(&f[..2], &[0, 4]);
    assert_eq!(f[4], 9);
    assert_eq!(&f[9..17], &5u64.to_be_bytes());
    assert_eq!(&f[17..19], &18u16.to_be_bytes());
}

#[tokio::test(flavor = "multi_thread")]
async fn single_active_consumer_fails_over() {
    let env = env().await;
    let s = uniq("sac");
    t(env.stream_creator().create(&s)).await.expect("create");
    let producer = t(env.producer().build(&s)).await.expect("producer");
    let mut c1 = t(env
        .consumer()
        .name("group")
        .enable_single_active_consumer(true)
        .offset(OffsetSpecification::First)
        .build(&s))
    .await
    .expect("consumer 1");
    let mut c2 = t(env
        .consumer()
        .name("group")
        .enable_single_active_consumer(true)
        .offset(OffsetSpecification::First)
        .consumer_update(|_active, _ctx| async { OffsetSpecification::First })
        .build(&s))
    .await
    .expect("consumer 2");
    for i in 0..3 {
        t(producer.send_with_confirm(Message::builder().body(format!("a{i}")).build()))
            .await
            .expect("send");
    }
    for i in 0..3 {
        let d = t(c1.next()).await.expect("delivery").expect("ok");
        assert_eq!(body(d.message()), format!("a{i}"));
    }
    // The inactive one gets nothing.
    assert!(tokio::time::timeout(Duration::from_millis(300), c2.next())
        .await
        .is_err());
    c1.handle().close().await.expect("close 1");
    // The second takes over, from the offset its consumer update answered.
    let d = t(c2.next()).await.expect("delivery").expect("ok");
    assert_eq!((d.offset(), body(d.message())), (0, "a0".to_string()));
    let _ = c2.handle().close().await;
    producer.close().await.expect("close");
}

// ---- across a broker restart (process broker, kill -9) ----

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

async fn process_client(port: u16) -> Client {
    for _ in 0..100 {
        if let Ok(c) = Client::connect(
            ClientOptions::builder()
                .host("127.0.0.1")
                .port(port)
                .build(),
        )
        .await
        {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("stream listener on {port} not reachable");
}

#[tokio::test(flavor = "multi_thread")]
async fn dedup_and_offsets_survive_kill9() {
    let dir = common::process::data_dir("stream-dedup");
    let port = free_port();
    let env_port = port.to_string();
    let settings = [("WARREN_STREAM__LISTENERS__TCP__DEFAULT", env_port.as_str())];
    let broker = common::process::BrokerProcess::start_with(&dir, &settings).await;
    let client = process_client(port).await;
    let s = "durable-stream";
    let r = t(client.create_stream(s, HashMap::new()))
        .await
        .expect("create");
    assert_eq!(r.code(), &ResponseCode::Ok);
    let env = Environment::builder()
        .host("127.0.0.1")
        .port(port)
        .build()
        .await
        .expect("environment");
    let mut p = t(env.producer().name("p1").build(s))
        .await
        .expect("producer");
    let msgs: Vec<Message> = (0..50)
        .map(|i| Message::builder().body(format!("m{i}")).build())
        .collect();
    let sts = t(p.batch_send_with_confirm(msgs)).await.expect("confirmed");
    assert!(sts.iter().all(|s| s.confirmed()));
    t(client.store_offset("reader", s, 17))
        .await
        .expect("store offset");
    // store_offset has no answer: wait until a query sees it.
    for _ in 0..100 {
        if client.query_offset("reader".into(), s).await.ok() == Some(17) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(p);
    broker.kill9();

    let broker = common::process::BrokerProcess::start_with(&dir, &settings).await;
    let client = process_client(port).await;
    // Every confirmed message is there, and the sequence and offset too.
    assert_eq!(
        t(client.query_publisher_sequence("p1", s))
            .await
            .expect("sequence"),
        49
    );
    assert_eq!(
        t(client.query_offset("reader".into(), s))
            .await
            .expect("offset"),
        17
    );
    // Resending 40..60 under the same reference stores only 50..60.
    let r = t(client.declare_publisher(1, Some("p1".into()), s))
        .await
        .expect("declare");
    assert_eq!(r.code(), &ResponseCode::Ok);
    let msgs: Vec<Message> = (40..60)
        .map(|i| {
            Message::builder()
                .body(format!("m{i}"))
                .publishing_id(i)
                .build()
        })
        .collect();
    t(client.publish(1, msgs, 1)).await.expect("publish");
    for _ in 0..100 {
        if client.query_publisher_sequence("p1", s).await.ok() == Some(59) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let env = Environment::builder()
        .host("127.0.0.1")
        .port(port)
        .build()
        .await
        .expect("environment");
    let got = consume(&env, s, OffsetSpecification::First, 60).await;
    let bodies: Vec<String> = got.into_iter().map(|(_, b)| b).collect();
    assert_eq!(bodies, (0..60).map(|i| format!("m{i}")).collect::<Vec<_>>());
    let mut c = env
        .consumer()
        .offset(OffsetSpecification::Offset(60))
        .build(s)
        .await
        .expect("consumer");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), c.next())
            .await
            .is_err(),
        "no duplicate after offset 59"
    );
    broker.stop();
}

/// A stream whose create was answered OK is there after a SIGKILL sent the
/// moment the answer came (the answer waited for the store's flush).
#[tokio::test(flavor = "multi_thread")]
async fn an_answered_create_survives_an_immediate_kill9() {
    for round in 0..3 {
        let dir = common::process::data_dir(&format!("stream-create-kill9-{round}"));
        let port = free_port();
        let env_port = port.to_string();
        let settings = [("WARREN_STREAM__LISTENERS__TCP__DEFAULT", env_port.as_str())];
        let broker = common::process::BrokerProcess::start_with(&dir, &settings).await;
        let client = process_client(port).await;
        let r = t(client.create_stream("kept", HashMap::new()))
            .await
            .expect("create");
        assert_eq!(r.code(), &ResponseCode::Ok);
        broker.kill9();
        let broker = common::process::BrokerProcess::start_with(&dir, &settings).await;
        let client = process_client(port).await;
        let r = t(client.create_stream("kept", HashMap::new()))
            .await
            .expect("create again");
        assert_eq!(
            r.code(),
            &ResponseCode::StreamAlreadyExists,
            "round {round}: the stream is gone"
        );
        broker.kill9();
    }
}

// ---- across protocols ----

/// An AMQP 0-9-1 connection to the file's broker and a channel on it.
async fn amqp_channel() -> (lapin::Connection, lapin::Channel) {
    let (amqp, _) = broker();
    let conn = lapin::Connection::connect(
        &format!("amqp://guest:guest@{amqp}/%2f"),
        lapin::ConnectionProperties::default(),
    )
    .await
    .expect("amqp connect");
    let ch = conn.create_channel().await.expect("channel");
    (conn, ch)
}

#[tokio::test(flavor = "multi_thread")]
async fn amqp_091_publish_reads_over_stream_and_back() {
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    };
    use lapin::types::{AMQPValue, FieldTable as LTable};
    use lapin::BasicProperties as LProps;
    let (conn, ch) = amqp_channel().await;
    let s = uniq("x");
    declare_stream(&ch, &s).await;
    ch.confirm_select(Default::default())
        .await
        .expect("confirms");
    let mut headers = LTable::default();
    headers.insert("h".into(), AMQPValue::LongString("v".into()));
    let props = LProps::default()
        .with_message_id("mid".into())
        .with_content_type("text/plain".into())
        .with_headers(headers);
    t(
        t(ch.basic_publish("", &s, BasicPublishOptions::default(), b"from-091", props))
            .await
            .expect("publish"),
    )
    .await
    .expect("confirm");

    // Read over the stream protocol.
    let env = env().await;
    let got = consume(&env, &s, OffsetSpecification::First, 1).await;
    assert_eq!(got[0], (0, "from-091".to_string()));
    let mut c = env
        .consumer()
        .offset(OffsetSpecification::First)
        .build(&s)
        .await
        .expect("consumer");
    let d = t(c.next()).await.expect("delivery").expect("ok");
    let m = d.message();
    let p = m.properties().expect("properties");
    assert_eq!(
        format!("{:?}", p.message_id),
        format!(
            "{:?}",
            Some(rabbitmq_stream_client::types::SimpleValue::String(
                "mid".into()
            ))
        )
    );
    let ap = m.application_properties().expect("application properties");
    assert!(format!("{ap:?}").contains("\"h\""), "{ap:?}");
    let _ = c.handle().close().await;

    // Publish over the stream protocol, read over AMQP 0-9-1.
    let producer = t(env.producer().build(&s)).await.expect("producer");
    let m = Message::builder()
        .body("from-stream")
        .application_properties()
        .insert("k", "v2")
        .message_builder()
        .build();
    t(producer.send_with_confirm(m)).await.expect("send");
    producer.close().await.expect("close");
    t(ch.basic_qos(10, BasicQosOptions::default()))
        .await
        .expect("qos");
    let mut cargs = LTable::default();
    cargs.insert("x-stream-offset".into(), AMQPValue::LongLongInt(1));
    let mut consumer = t(ch.basic_consume(&s, "c", BasicConsumeOptions::default(), cargs))
        .await
        .expect("consume");
    let d = t(consumer.next()).await.expect("delivery").expect("ok");
    assert_eq!(d.data, b"from-stream");
    let h = d.properties.headers().clone().expect("headers");
    assert_eq!(
        h.inner().get("k"),
        Some(&AMQPValue::LongString("v2".into()))
    );
    d.ack(BasicAckOptions::default()).await.expect("ack");
    let _ = conn.close(200, "bye").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn filtering_skips_chunks_the_bloom_filter_rules_out() {
    use rabbitmq_stream_client::FilterConfiguration;
    let env = env().await;
    let s = uniq("filter");
    t(env.stream_creator().create(&s)).await.expect("create");
    let producer = t(env
        .producer()
        .filter_value_extractor(|m: &Message| {
            String::from_utf8_lossy(m.data().unwrap_or_default())
                .split('-')
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .build(&s))
    .await
    .expect("producer");
    // Each confirmed send is its own chunk.
    for b in ["eu-1", "us-1", "us-2", "eu-2"] {
        t(producer.send_with_confirm(Message::builder().body(b).build()))
            .await
            .expect("send");
    }
    producer.close().await.expect("close");
    let mut c = t(env
        .consumer()
        .offset(OffsetSpecification::First)
        .filter_input(Some(FilterConfiguration::new(vec!["eu".into()], false)))
        .build(&s))
    .await
    .expect("consumer");
    let mut got = Vec::new();
    for _ in 0..2 {
        let d = t(c.next()).await.expect("delivery").expect("ok");
        got.push(body(d.message()));
    }
    // No client-side predicate: only the server skipped the "us" chunks.
    assert_eq!(got, vec!["eu-1".to_string(), "eu-2".to_string()]);
    let _ = c.handle().close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn raw_stats_and_metadata_update_on_delete() {
    let mut sock = raw_open(broker().1).await;
    let s = uniq("upd");
    let mut create = 5u32.to_be_bytes().to_vec();
    create.extend(s16(&s));
    create.extend_from_slice(&0i32.to_be_bytes());
    sock.write_all(&frame(13, 1, &create)).await.expect("write");
    let f = read_frame(&mut sock).await.expect("create response");
    assert_eq!((&f[..2], &f[8..10]), (&[0x80u8, 13][..], &[0u8, 1][..]));
    // Stream stats of the empty stream.
    let mut stats = 6u32.to_be_bytes().to_vec();
    stats.extend(s16(&s));
    sock.write_all(&frame(28, 1, &stats)).await.expect("write");
    let f = read_frame(&mut sock).await.expect("stats response");
    assert_eq!(&f[..2], &[0x80, 28]);
    assert_eq!(&f[8..10], &[0, 1]);
    assert_eq!(&f[10..14], &5i32.to_be_bytes());
    // A publisher on it, then the stream deleted from another connection.
    let mut decl = 7u32.to_be_bytes().to_vec();
    decl.push(0);
    decl.extend_from_slice(&(-1i16).to_be_bytes());
    decl.extend(s16(&s));
    sock.write_all(&frame(1, 1, &decl)).await.expect("write");
    let f = read_frame(&mut sock).await.expect("declare response");
    assert_eq!(&f[8..10], &[0, 1]);
    let env = env().await;
    t(env.delete_stream(&s)).await.expect("delete");
    let f = read_frame(&mut sock).await.expect("metadata update");
    assert_eq!(&f[..2], &[0, 16]);
    assert_eq!(&f[4..6], &6u16.to_be_bytes());
    assert_eq!(&f[6..], &s16(&s)[..]);
}

/// A stream deleted elsewhere (here over AMQP 0-9-1, as the management API
/// does) is announced to its publishers' and consumers' connections at once
/// (RabbitMQ's monitors), not at the next periodic check a second later.
#[tokio::test(flavor = "multi_thread")]
async fn a_stream_deleted_elsewhere_is_announced_at_once() {
    let mut sock = raw_open(broker().1).await;
    let s = uniq("delnow");
    raw_create_and_declare(&mut sock, &s, None).await;
    let (_conn, ch) = amqp_channel().await;
    ch.queue_delete(&s, lapin::options::QueueDeleteOptions::default())
        .await
        .expect("delete");
    let f = tokio::time::timeout(Duration::from_millis(400), read_frame(&mut sock))
        .await
        .expect("the update within 400 ms (the periodic check is every second)")
        .expect("metadata update");
    assert_eq!(&f[..2], &[0, 16]);
    assert_eq!(&f[4..6], &6u16.to_be_bytes());
    assert_eq!(&f[6..], &s16(&s)[..]);
}

/// Single active consumer on a super stream: a group's consumers spread
/// over the partitions (`partition index % consumers`) and rebalance when
/// one joins or leaves, the stepping-down consumer told first.
#[tokio::test(flavor = "multi_thread")]
async fn super_stream_single_active_consumers_rebalance() {
    use rabbitmq_stream_client::types::SuperStreamConsumer;
    let env = env().await;
    let ss = uniq("sacss");
    t(env.stream_creator().create_super_stream(&ss, 3, None))
        .await
        .expect("create super stream");
    let parts: Vec<String> = (0..3).map(|i| format!("{ss}-{i}")).collect();
    let mut producers = Vec::new();
    for p in &parts {
        producers.push(t(env.producer().build(p)).await.expect("producer"));
    }
    let send = |round: usize| {
        let producers = &producers;
        async move {
            for (i, p) in producers.iter().enumerate() {
                t(p.send_with_confirm(Message::builder().body(format!("{round}:{i}")).build()))
                    .await
                    .expect("send");
            }
        }
    };
    // Each consumer's state changes, as its client saw them: (partition, active).
    let updates: std::sync::Arc<parking_lot::Mutex<Vec<(String, String, u8)>>> =
        std::sync::Arc::default();
    let build = |who: &'static str| {
        let env = &env;
        let ss = ss.clone();
        let updates = std::sync::Arc::clone(&updates);
        async move {
            t(env
                .super_stream_consumer()
                .name("group")
                .enable_single_active_consumer(true)
                .offset(OffsetSpecification::First)
                .consumer_update(move |active, ctx| {
                    updates.lock().push((who.to_string(), ctx.stream(), active));
                    async { OffsetSpecification::First }
                })
                .build(&ss))
            .await
            .expect("super stream consumer")
        }
    };
    /// The next `n` deliveries: (partition, body).
    async fn take(c: &mut SuperStreamConsumer, n: usize) -> Vec<(String, String)> {
        let mut out = Vec::new();
        while out.len() < n {
            let d = t(c.next()).await.expect("delivery").expect("ok delivery");
            out.push((d.stream().clone(), body(d.message())));
        }
        out.sort();
        out
    }
    async fn quiet(c: &mut SuperStreamConsumer) -> bool {
        tokio::time::timeout(Duration::from_millis(300), c.next())
            .await
            .is_err()
    }
    let mut a = build("a").await;
    send(0).await;
    // Alone in the group, `a` reads every partition.
    let got = take(&mut a, 3).await;
    assert_eq!(
        got.iter().map(|x| x.1.as_str()).collect::<Vec<_>>(),
        ["0:0", "0:1", "0:2"]
    );
    // `b` joins: partition 1 (1 % 2) moves to it; `a` keeps 0 and 2 (0 % 2,
    // 2 % 2). `b` starts partition 1 from the offset it answered (first).
    let mut b = build("b").await;
    let got = take(&mut b, 1).await;
    assert_eq!(got, vec![(parts[1].clone(), "0:1".to_string())]);
    {
        let u = updates.lock();
        let a_down: Vec<_> = u.iter().filter(|x| x.0 == "a" && x.2 == 0).collect();
        assert_eq!(a_down.len(), 1, "a stepped down once: {u:?}");
        assert_eq!(a_down[0].1, parts[1]);
        let pos_down = u.iter().position(|x| x.0 == "a" && x.2 == 0);
        let pos_up = u.iter().position(|x| x.0 == "b" && x.2 == 1);
        assert!(
            pos_down < pos_up,
            "the stepping-down one is told first: {u:?}"
        );
        assert_eq!(u.iter().filter(|x| x.0 == "b").count(), 1, "{u:?}");
    }
    send(1).await;
    assert_eq!(
        take(&mut a, 2).await,
        vec![
            (parts[0].clone(), "1:0".to_string()),
            (parts[2].clone(), "1:2".to_string())
        ]
    );
    assert_eq!(
        take(&mut b, 1).await,
        vec![(parts[1].clone(), "1:1".to_string())]
    );
    assert!(quiet(&mut a).await && quiet(&mut b).await);
    // `a` leaves: `b` gets partitions 0 and 2 (from first, as it answers).
    a.handle().close().await.expect("close a");
    let got = take(&mut b, 4).await;
    assert_eq!(
        got,
        vec![
            (parts[0].clone(), "0:0".to_string()),
            (parts[0].clone(), "1:0".to_string()),
            (parts[2].clone(), "0:2".to_string()),
            (parts[2].clone(), "1:2".to_string()),
        ]
    );
    send(2).await;
    assert_eq!(take(&mut b, 3).await.len(), 3);
    let _ = b.handle().close().await;
    for p in producers {
        let _ = p.close().await;
    }
}

/// The exchange and routing key of an AMQP 0-9-1 publish are kept as the
/// `x-exchange` / `x-routing-key` message annotations (RabbitMQ 3.10.8 does
/// the same): a stream client sees them, an AMQP 0-9-1 consumer gets them
/// back as the delivery's exchange and routing key; a stream client's
/// message with those annotations reads over 0-9-1 with them, one without
/// with `""` and the stream's name.
#[tokio::test(flavor = "multi_thread")]
async fn exchange_and_routing_key_cross_protocols() {
    use lapin::options::{
        BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
        ExchangeDeclareOptions, QueueBindOptions,
    };
    use lapin::types::{AMQPValue, FieldTable as LTable};
    use rabbitmq_stream_client::types::Value as V;
    let (conn, ch) = amqp_channel().await;
    let s = uniq("routed");
    let x = uniq("routed-x");
    declare_stream(&ch, &s).await;
    t(ch.exchange_declare(
        &x,
        lapin::ExchangeKind::Topic,
        ExchangeDeclareOptions::default(),
        LTable::default(),
    ))
    .await
    .expect("exchange");
    t(ch.queue_bind(
        &s,
        &x,
        "a.#",
        QueueBindOptions::default(),
        LTable::default(),
    ))
    .await
    .expect("bind");
    ch.confirm_select(Default::default())
        .await
        .expect("confirms");
    for (exchange, key, body) in [(x.as_str(), "a.b.c", "via-x"), ("", s.as_str(), "direct")] {
        t(t(ch.basic_publish(
            exchange,
            key,
            BasicPublishOptions::default(),
            body.as_bytes(),
            Default::default(),
        ))
        .await
        .expect("publish"))
        .await
        .expect("confirm");
    }

    // The stream protocol side: annotations.
    let env = env().await;
    let mut c = env
        .consumer()
        .offset(OffsetSpecification::First)
        .build(&s)
        .await
        .expect("consumer");
    for (exchange, key) in [(x.as_str(), "a.b.c"), ("", s.as_str())] {
        let d = t(c.next()).await.expect("delivery").expect("ok");
        let a = d.message().message_annotations().expect("annotations");
        assert_eq!(a.get("x-exchange"), Some(&V::from(exchange.to_string())));
        assert_eq!(a.get("x-routing-key"), Some(&V::from(key.to_string())));
    }
    let _ = c.handle().close().await;

    // Stream publishes: one with the annotations, one without.
    let producer = t(env.producer().build(&s)).await.expect("producer");
    let annotated = Message::builder()
        .body("annotated")
        .message_annotations()
        .insert("x-exchange", "ex1")
        .insert("x-routing-key", "rk1")
        .message_builder()
        .build();
    t(producer.send_with_confirm(annotated))
        .await
        .expect("send");
    let plain = Message::builder().body("plain").build();
    t(producer.send_with_confirm(plain)).await.expect("send");
    producer.close().await.expect("close");

    // The AMQP 0-9-1 side: exchange and routing key, no such headers.
    t(ch.basic_qos(10, BasicQosOptions::default()))
        .await
        .expect("qos");
    let mut cargs = LTable::default();
    cargs.insert(
        "x-stream-offset".into(),
        AMQPValue::LongString("first".into()),
    );
    let mut consumer = t(ch.basic_consume(&s, "c", BasicConsumeOptions::default(), cargs))
        .await
        .expect("consume");
    let expected = [
        (x.as_str(), "a.b.c", "via-x"),
        ("", s.as_str(), "direct"),
        ("ex1", "rk1", "annotated"),
        ("", s.as_str(), "plain"),
    ];
    for (exchange, key, body) in expected {
        let d = t(consumer.next()).await.expect("delivery").expect("ok");
        assert_eq!(d.data, body.as_bytes());
        assert_eq!(d.exchange.as_str(), exchange, "{body}");
        assert_eq!(d.routing_key.as_str(), key, "{body}");
        let h = d.properties.headers().clone().unwrap_or_default();
        assert!(h.inner().get("x-exchange").is_none(), "{h:?}");
        assert!(h.inner().get("x-routing-key").is_none(), "{h:?}");
        d.ack(BasicAckOptions::default()).await.expect("ack");
    }
    let _ = conn.close(200, "bye").await;
}

/// Create `stream` (correlation 1) and declare publisher 0 on it
/// (correlation 2), under `reference` if given; both must answer OK.
async fn raw_create_and_declare(
    sock: &mut tokio::net::TcpStream,
    stream: &str,
    reference: Option<&str>,
) {
    let mut create = 1u32.to_be_bytes().to_vec();
    create.extend(s16(stream));
    create.extend_from_slice(&0i32.to_be_bytes());
    sock.write_all(&frame(13, 1, &create)).await.expect("write");
    assert_eq!(&read_frame(sock).await.expect("created")[8..10], &[0, 1]);
    let mut decl = 2u32.to_be_bytes().to_vec();
    decl.push(0);
    match reference {
        Some(r) => decl.extend(s16(r)),
        None => decl.extend_from_slice(&(-1i16).to_be_bytes()),
    }
    decl.extend(s16(stream));
    sock.write_all(&frame(1, 1, &decl)).await.expect("write");
    assert_eq!(&read_frame(sock).await.expect("declared")[8..10], &[0, 1]);
}

/// Publish `bodies` as one publish frame of publisher `pid` (ids from `first_id`).
async fn raw_publish(sock: &mut tokio::net::TcpStream, pid: u8, first_id: u64, bodies: &[String]) {
    let mut p = vec![pid];
    p.extend_from_slice(&(bodies.len() as i32).to_be_bytes());
    for (i, b) in bodies.iter().enumerate() {
        p.extend_from_slice(&(first_id + i as u64).to_be_bytes());
        p.extend_from_slice(&(b.len() as i32).to_be_bytes());
        p.extend_from_slice(b.as_bytes());
    }
    sock.write_all(&frame(2, 1, &p)).await.expect("write");
}

/// Read publish confirms until publishing id `last` is confirmed.
async fn raw_confirmed(sock: &mut tokio::net::TcpStream, last: u64) {
    while !raw_confirm_ids(sock).await.contains(&last) {}
}

/// One message of a publish frame: id, then `body` as an AMQP 1.0 data section.
fn put_message(out: &mut Vec<u8>, id: u64, body: &str) {
    let mut m = vec![0x00, 0x53, 0x75, 0xa0, body.len() as u8];
    m.extend_from_slice(body.as_bytes());
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&(m.len() as i32).to_be_bytes());
    out.extend_from_slice(&m);
}

/// The ids of the next publish confirm frame.
async fn raw_confirm_ids(sock: &mut tokio::net::TcpStream) -> Vec<u64> {
    let f = read_frame(sock).await.expect("confirm");
    assert_eq!(&f[..2], &[0, 3], "a publish confirm, got {f:?}");
    let n = i32::from_be_bytes([f[5], f[6], f[7], f[8]]) as usize;
    (0..n)
        .map(|i| u64::from_be_bytes(f[9 + 8 * i..17 + 8 * i].try_into().expect("id")))
        .collect()
}

/// A publish frame repeating ids of a named publisher: the repeats are
/// dropped and confirmed in a frame of their own before the written ids (as
/// RabbitMQ's writer does), so a client keying waiters by id (the Rust
/// client's `batch_send_with_confirm`) sees each id it waits on once first.
#[tokio::test(flavor = "multi_thread")]
async fn duplicates_in_one_frame_are_confirmed_before_the_written_ids() {
    let mut p = raw_open(broker().1).await;
    let s = uniq("dupframe");
    raw_create_and_declare(&mut p, &s, Some("dup-writer")).await;
    // Ids 0, 0, 1, 1 in one frame.
    let mut pl = vec![0u8];
    pl.extend_from_slice(&4i32.to_be_bytes());
    for (id, b) in [(0u64, "a"), (0, "a2"), (1, "b"), (1, "b2")] {
        put_message(&mut pl, id, b);
    }
    p.write_all(&frame(2, 1, &pl)).await.expect("write");
    assert_eq!(raw_confirm_ids(&mut p).await, vec![0, 1], "the repeats");
    assert_eq!(raw_confirm_ids(&mut p).await, vec![0, 1], "the written");
    // A later frame resending 1 with a new 2: 1 alone first, then 2.
    let mut pl = vec![0u8];
    pl.extend_from_slice(&2i32.to_be_bytes());
    for (id, b) in [(1u64, "b3"), (2, "c")] {
        put_message(&mut pl, id, b);
    }
    p.write_all(&frame(2, 1, &pl)).await.expect("write");
    assert_eq!(raw_confirm_ids(&mut p).await, vec![1]);
    assert_eq!(raw_confirm_ids(&mut p).await, vec![2]);

    let env = env().await;
    let got = consume(&env, &s, OffsetSpecification::First, 3).await;
    let bodies: Vec<String> = got.into_iter().map(|(_, b)| b).collect();
    assert_eq!(bodies, ["a", "b", "c"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn every_message_once_in_order_with_small_credit() {
    let mut p = raw_open(broker().1).await;
    let s = uniq("credit");
    raw_create_and_declare(&mut p, &s, None).await;
    let body = |i: u64| format!("m{i}");
    // Three publish frames without waiting (the flusher may merge them into
    // one chunk), then five waited for one by one (a chunk each).
    let mut id = 1u64;
    for _ in 0..3 {
        let b: Vec<String> = (id..id + 10).map(body).collect();
        raw_publish(&mut p, 0, id, &b).await;
        id += 10;
    }
    raw_confirmed(&mut p, id - 1).await;
    for _ in 0..5 {
        let b: Vec<String> = (id..id + 7).map(body).collect();
        raw_publish(&mut p, 0, id, &b).await;
        id += 7;
        raw_confirmed(&mut p, id - 1).await;
    }
    let total = id - 1;

    // A consumer from first with credit 1, then growing credit: never more
    // chunks than credit, every message once, in order.
    let mut c = raw_open(broker().1).await;
    let mut sub = 3u32.to_be_bytes().to_vec();
    sub.push(1);
    sub.extend(s16(&s));
    sub.extend_from_slice(&1u16.to_be_bytes()); // first
    sub.extend_from_slice(&1u16.to_be_bytes()); // credit
    sub.extend_from_slice(&0i32.to_be_bytes());
    c.write_all(&frame(7, 1, &sub)).await.expect("write");
    let f = read_frame(&mut c).await.expect("subscribed");
    assert_eq!((&f[..2], &f[8..10]), (&[0x80u8, 7][..], &[0u8, 1][..]));
    let (mut granted, mut chunks, mut next_grant) = (1u64, 0u64, 2u16);
    let mut seen: Vec<String> = Vec::new();
    while (seen.len() as u64) < total {
        let f = read_frame(&mut c).await.expect("deliver");
        assert_eq!(&f[..2], &[0, 8], "a deliver, got {f:?}");
        assert_eq!(f[4], 1, "subscription id");
        chunks += 1;
        assert!(chunks <= granted, "{chunks} chunks for {granted} credits");
        let chunk = &f[5..];
        let entries = u16::from_be_bytes([chunk[2], chunk[3]]) as usize;
        let first = u64::from_be_bytes(chunk[24..32].try_into().expect("offset"));
        let data_len = u32::from_be_bytes(chunk[36..40].try_into().expect("len")) as usize;
        // The stored trailer length: the publisher has no reference.
        assert_eq!(&chunk[40..44], &[0u8; 4], "no trailer");
        assert_eq!(first, seen.len() as u64, "chunks follow each other");
        let mut data = &chunk[48..48 + data_len];
        assert_eq!(chunk.len(), 48 + data_len, "one chunk per frame");
        for _ in 0..entries {
            let n = u32::from_be_bytes(data[..4].try_into().expect("size")) as usize;
            seen.push(String::from_utf8_lossy(&data[4..4 + n]).into_owned());
            data = &data[4 + n..];
        }
        if chunks == granted {
            let mut cr = vec![1u8];
            cr.extend_from_slice(&next_grant.to_be_bytes());
            c.write_all(&frame(9, 1, &cr)).await.expect("credit");
            granted += u64::from(next_grant);
            next_grant += 1;
        }
    }
    let want: Vec<String> = (1..=total).map(body).collect();
    assert_eq!(seen, want);
    assert!(chunks < total, "messages arrive in chunks");
}

/// The deliver frames a subscription (id 1, version 1) gets for the user
/// chunks stored in the segment files of `dir` (one stream): each chunk's
/// header as stored (as RabbitMQ sends it), then its data section.
fn stored_deliveries(dir: &std::path::Path) -> Vec<Vec<u8>> {
    let mut segments: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .expect("stream dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "segment"))
        .collect();
    segments.sort();
    assert!(segments.len() >= 3, "several segments: {segments:?}");
    let mut out = Vec::new();
    for seg in segments {
        let bytes = std::fs::read(&seg).expect("segment");
        let mut at = 8;
        while at + 48 <= bytes.len() {
            let h = &bytes[at..at + 48];
            let u32_at = |i: usize| u32::from_be_bytes(h[i..i + 4].try_into().expect("4")) as usize;
            let (data_len, trailer_len, bloom_len) = (u32_at(36), u32_at(40), h[44] as usize);
            if h[1] == 0 {
                let data = at + 48 + bloom_len;
                let mut f = vec![0, 8, 0, 1, 1];
                f.extend_from_slice(h);
                f.extend_from_slice(&bytes[data..data + data_len]);
                out.push(f);
            }
            at += 48 + bloom_len + data_len + trailer_len;
        }
    }
    out
}

/// Deliveries are the stored chunks byte for byte (`merge_ms` 0), or
/// (`merge_ms` > 0) stored chunks written close together merged into fewer
/// delivered ones that hold the same entries, each with its records'
/// count, first offset and data CRC; across segment files and to many
/// consumers at once, with chunk data sent by `sendfile(2)` (`on`) or read
/// then written.
async fn deliveries_are_the_stored_chunks(sendfile: bool, merge_ms: u32) {
    let dir = std::env::temp_dir().join(uniq(&format!("warren-sendfile-{sendfile}")));
    let mut config = warren::Config::for_tests(&dir);
    config.admin_enabled = false;
    config.stream.sendfile = sendfile;
    config.stream.deliver_merge_ms = merge_ms;
    let w = warren::start(config).await.expect("broker starts");
    let addr = w.stream_addr().expect("stream");
    let mut p = raw_open(addr).await;
    let s = uniq("sendfile");
    let mut create = 1u32.to_be_bytes().to_vec();
    create.extend(s16(&s));
    create.extend_from_slice(&1i32.to_be_bytes());
    create.extend(s16("stream-max-segment-size-bytes"));
    create.extend(s16("16000"));
    p.write_all(&frame(13, 1, &create)).await.expect("write");
    assert_eq!(&read_frame(&mut p).await.expect("created")[8..10], &[0, 1]);
    let mut decl = 2u32.to_be_bytes().to_vec();
    decl.push(0);
    decl.extend_from_slice(&(-1i16).to_be_bytes());
    decl.extend(s16(&s));
    p.write_all(&frame(1, 1, &decl)).await.expect("write");
    assert_eq!(&read_frame(&mut p).await.expect("declared")[8..10], &[0, 1]);
    // 60 chunks of 50 messages of different sizes: a dozen segments.
    let body = |i: u64| format!("m{i}-{}", "x".repeat((i % 97) as usize));
    let mut id = 1u64;
    for _ in 0..60 {
        let b: Vec<String> = (id..id + 50).map(body).collect();
        raw_publish(&mut p, 0, id, &b).await;
        id += 50;
        raw_confirmed(&mut p, id - 1).await;
    }
    let total = id - 1;
    let streams = dir.join("streams");
    let log_dir = std::fs::read_dir(&streams)
        .expect("streams dir")
        .map(|e| e.expect("entry").path())
        .find(|p| p.is_dir())
        .expect("the stream's directory");
    let want = stored_deliveries(&log_dir);

    // Six consumers at once, from first, as the stock client grants credit:
    // ten, then one per chunk.
    let mut tasks = Vec::new();
    for _ in 0..6 {
        tasks.push(tokio::spawn({
            let s = s.clone();
            async move {
                let mut c = raw_open(addr).await;
                let mut sub = 3u32.to_be_bytes().to_vec();
                sub.push(1);
                sub.extend(s16(&s));
                sub.extend_from_slice(&1u16.to_be_bytes()); // first
                sub.extend_from_slice(&10u16.to_be_bytes());
                sub.extend_from_slice(&0i32.to_be_bytes());
                c.write_all(&frame(7, 1, &sub)).await.expect("write");
                let f = read_frame(&mut c).await.expect("subscribed");
                assert_eq!(&f[8..10], &[0u8, 1][..]);
                let (mut frames, mut seen) = (Vec::new(), 0u64);
                while seen < total {
                    let f = read_frame(&mut c).await.expect("deliver");
                    assert_eq!(&f[..2], &[0, 8], "a deliver");
                    seen += u64::from(u32::from_be_bytes(f[9..13].try_into().expect("4")));
                    frames.push(f);
                    c.write_all(&frame(9, 1, &[1, 0, 1])).await.expect("credit");
                }
                frames
            }
        }));
    }
    // A Deliver frame's first offset, records and data (after its header).
    let parts = |f: &[u8]| {
        let u64_at = |i: usize| u64::from_be_bytes(f[i..i + 8].try_into().expect("8"));
        let u32_at = |i: usize| u32::from_be_bytes(f[i..i + 4].try_into().expect("4"));
        let data = f[53..].to_vec();
        assert_eq!(u32_at(5 + 36) as usize, data.len(), "data length");
        assert_eq!(u32_at(5 + 32), crc32fast::hash(&data), "data CRC");
        (u64_at(5 + 24), u64::from(u32_at(5 + 4)), data)
    };
    for task in tasks {
        let got = t(task).await.expect("consumer");
        if merge_ms == 0 {
            assert_eq!(got.len(), want.len(), "one deliver per stored chunk");
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!(
                    g == w,
                    "chunk {i} differs ({} vs {} bytes)",
                    g.len(),
                    w.len()
                );
            }
            continue;
        }
        assert!(
            got.len() < want.len(),
            "{} delivers for {} stored chunks",
            got.len(),
            want.len()
        );
        let (mut next, mut data) = (0u64, Vec::new());
        for f in &got {
            let (first, records, d) = parts(f);
            assert_eq!(first, next, "delivered chunks follow each other");
            next += records;
            data.extend_from_slice(&d);
        }
        let stored: Vec<u8> = want.iter().flat_map(|f| parts(f).2).collect();
        assert_eq!(next, total);
        assert!(data == stored, "the same entries");
    }
    drop(w);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn sendfile_deliveries_are_the_stored_chunks() {
    deliveries_are_the_stored_chunks(true, 0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sendfile_deliveries_merge_stored_chunks_written_close_together() {
    deliveries_are_the_stored_chunks(true, 60_000).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn read_deliveries_merge_stored_chunks_written_close_together() {
    deliveries_are_the_stored_chunks(false, 60_000).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn read_deliveries_are_the_stored_chunks() {
    deliveries_are_the_stored_chunks(false, 0).await;
}
