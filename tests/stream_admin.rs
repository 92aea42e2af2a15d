//! Stream protocol connections in the admin API, as RabbitMQ's stream
//! management plugin shows them (field names checked against RabbitMQ 3.10.8):
//! `/api/stream/connections[/{vhost}[/{name}[/publishers|/consumers]]]`,
//! `/api/stream/publishers[/{vhost}[/{stream}]]`, `/api/stream/consumers[/{vhost}]`
//! with their counters, `/api/connections` listing them with `protocol:
//! "stream"`, and closing one with `DELETE` on either path.

mod common;

use common::http;
use common::stream::t;
use futures::StreamExt;
use rabbitmq_stream_client::types::{Message, OffsetSpecification};
use rabbitmq_stream_client::Environment;
use serde_json::Value;
use std::time::Duration;

async fn broker(name: &str) -> (warren::Warren, common::TempDir) {
    let dir = common::TempDir::new(&format!("warren-sadmin-{name}"));
    let w = warren::start(warren::Config::for_tests(dir.path()))
        .await
        .expect("broker starts");
    (w, dir)
}

fn api(w: &warren::Warren, path: &str) -> String {
    format!("http://{}/api{path}", w.admin_addr().expect("admin"))
}

async fn get(w: &warren::Warren, path: &str) -> Value {
    let (status, body) = http("GET", &api(w, path), Some(("guest", "guest")), None).await;
    assert_eq!(status, 200, "GET {path}: {body}");
    body
}

/// `DELETE path` as guest: the status.
async fn delete(w: &warren::Warren, path: &str) -> u16 {
    http("DELETE", &api(w, path), Some(("guest", "guest")), None)
        .await
        .0
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn array(v: &Value) -> &Vec<Value> {
    v.as_array().expect("an array")
}

/// Poll `path` until `ok` holds for its body (the counters follow the
/// confirms and deliveries the clients already saw, but the API may be asked
/// between a chunk's write and the session's next round).
async fn until(w: &warren::Warren, path: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let body = get(w, path).await;
        if ok(&body) {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} never matched: {body:#}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn stream_connections_publishers_and_consumers() {
    let (w, _dir) = broker("list").await;
    let port = w.stream_addr().expect("stream").port();
    let env = t(Environment::builder()
        .host("127.0.0.1")
        .port(port)
        .client_provided_name("admin-test")
        .build())
    .await
    .expect("environment");
    let stream = common::uniq("sadmin");
    t(env.stream_creator().create(&stream))
        .await
        .expect("create");
    let mut producer = t(env.producer().name("ref-1").build(&stream))
        .await
        .expect("producer");
    for i in 0..5 {
        let m = Message::builder().body(format!("m{i}")).build();
        t(producer.send_with_confirm(m)).await.expect("confirmed");
    }
    let mut consumer = t(env
        .consumer()
        .offset(OffsetSpecification::First)
        .build(&stream))
    .await
    .expect("consumer");
    for _ in 0..5 {
        t(consumer.next()).await.expect("delivery").expect("ok");
    }

    // Every stream connection is in /api/connections as protocol "stream".
    let all = get(&w, "/connections").await;
    let streams: Vec<&Value> = array(&all)
        .iter()
        .filter(|c| c["protocol"] == "stream")
        .collect();
    assert!(streams.len() >= 2, "{all:#}");
    let listed = get(&w, "/stream/connections").await;
    assert_eq!(array(&listed).len(), streams.len(), "{listed:#}");
    let c = &array(&listed)[0];
    for key in [
        "name",
        "vhost",
        "user",
        "node",
        "auth_mechanism",
        "peer_host",
        "peer_port",
        "host",
        "port",
        "connected_at",
        "client_properties",
        "frame_max",
        "timeout",
        "ssl",
        "state",
        "user_provided_name",
    ] {
        assert!(c.get(key).is_some(), "{key} missing: {c:#}");
    }
    assert_eq!(c["auth_mechanism"], "PLAIN");
    assert_eq!(c["port"], port);
    assert_eq!(c["ssl"], false);
    assert_eq!(c["vhost"], "/");
    assert_eq!(c["user"], "guest");
    assert_eq!(
        get(&w, "/stream/connections/%2F").await,
        listed,
        "one vhost, the same list"
    );
    let other = http(
        "GET",
        &api(&w, "/stream/connections/nope"),
        Some(("guest", "guest")),
        None,
    )
    .await;
    assert_eq!(other.0, 404);

    // The publisher with its counters and reference.
    let pubs = until(&w, "/stream/publishers", |b| {
        array(b).len() == 1 && b[0]["confirmed"] == 5
    })
    .await;
    let p = &pubs[0];
    assert_eq!(p["published"], 5);
    assert_eq!(p["errored"], 0);
    assert_eq!(p["reference"], "ref-1");
    assert_eq!(p["queue"]["name"], stream.as_str());
    assert_eq!(p["queue"]["vhost"], "/");
    assert_eq!(p["connection_details"]["user"], "guest");
    let pconn = p["connection_details"]["name"]
        .as_str()
        .expect("name")
        .to_string();
    assert_eq!(
        array(&get(&w, &format!("/stream/publishers/%2F/{}", enc(&stream))).await).len(),
        1
    );
    assert!(array(&get(&w, "/stream/publishers/%2F/other").await).is_empty());
    assert_eq!(array(&get(&w, "/stream/publishers/%2F").await).len(), 1);

    // The consumer: consumed, last offset, lag, credits.
    let cons = until(&w, "/stream/consumers", |b| {
        array(b).len() == 1 && b[0]["consumed"] == 5
    })
    .await;
    let x = &cons[0];
    assert_eq!(x["offset"], 4);
    assert_eq!(x["offset_lag"], 0);
    assert!(x["credits"].as_u64().is_some(), "{x:#}");
    assert_eq!(x["queue"]["name"], stream.as_str());
    assert!(x["properties"].is_object());
    let cconn = x["connection_details"]["name"]
        .as_str()
        .expect("name")
        .to_string();
    assert_eq!(array(&get(&w, "/stream/consumers/%2F").await).len(), 1);

    // One connection's publishers and consumers.
    let one = get(&w, &format!("/stream/connections/%2F/{}", enc(&pconn))).await;
    assert_eq!(one["name"], pconn.as_str());
    assert_eq!(one["protocol"], "stream");
    let ps = get(
        &w,
        &format!("/stream/connections/%2F/{}/publishers", enc(&pconn)),
    )
    .await;
    assert_eq!(array(&ps).len(), 1);
    if pconn != cconn {
        let cs = get(
            &w,
            &format!("/stream/connections/%2F/{}/consumers", enc(&pconn)),
        )
        .await;
        assert!(array(&cs).is_empty(), "{cs:#}");
    }
    let cs = get(
        &w,
        &format!("/stream/connections/%2F/{}/consumers", enc(&cconn)),
    )
    .await;
    assert_eq!(array(&cs).len(), 1);

    // Closing the publisher leaves the list.
    t(producer.close()).await.expect("close");
    until(&w, "/stream/publishers", |b| array(b).is_empty()).await;
    let _ = t(consumer.handle().close()).await;
    until(&w, "/stream/consumers", |b| array(b).is_empty()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn delete_closes_a_stream_connection() {
    let (w, _dir) = broker("close").await;
    let port = w.stream_addr().expect("stream").port();
    let env = t(Environment::builder().host("127.0.0.1").port(port).build())
        .await
        .expect("environment");
    let stream = common::uniq("sclose");
    t(env.stream_creator().create(&stream))
        .await
        .expect("create");
    let _p1 = t(env.producer().build(&stream)).await.expect("producer");
    let _p2 = t(env.producer().build(&stream)).await.expect("producer");
    let pubs = until(&w, "/stream/publishers", |b| array(b).len() == 2).await;
    let names: Vec<String> = array(&pubs)
        .iter()
        .map(|p| {
            p["connection_details"]["name"]
                .as_str()
                .expect("name")
                .to_string()
        })
        .collect();
    // By the stream path, then by /api/connections/{name}: 204 each, and gone.
    assert_eq!(
        delete(&w, &format!("/stream/connections/%2F/{}", enc(&names[0]))).await,
        204
    );
    assert_eq!(
        delete(&w, &format!("/connections/{}", enc(&names[1]))).await,
        204
    );
    until(&w, "/stream/publishers", |b| array(b).is_empty()).await;
    let conns = until(&w, "/stream/connections", |b| {
        !array(b)
            .iter()
            .any(|c| names.contains(&c["name"].as_str().unwrap_or("").to_string()))
    })
    .await;
    assert!(array(&conns).iter().all(|c| c["protocol"] == "stream"));
    assert_eq!(
        delete(&w, &format!("/stream/connections/%2F/{}", enc(&names[0]))).await,
        404,
        "already gone"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn vhost_max_connections_counts_stream_connections() {
    let (w, _dir) = broker("limit").await;
    let port = w.stream_addr().expect("stream").port();
    let (status, body) = http(
        "PUT",
        &api(&w, "/vhost-limits/%2F/max-connections"),
        Some(("guest", "guest")),
        Some(serde_json::json!({"value": 1})),
    )
    .await;
    assert!(status < 300, "{status} {body}");
    let opts = || {
        rabbitmq_stream_client::ClientOptions::builder()
            .host("127.0.0.1")
            .port(port)
            .build()
    };
    let first = t(rabbitmq_stream_client::Client::connect(opts()))
        .await
        .expect("the first connection fits");
    let second = t(rabbitmq_stream_client::Client::connect(opts())).await;
    assert!(second.is_err(), "the second is over the limit");
    assert_eq!(array(&get(&w, "/stream/connections").await).len(), 1);
    let _ = first.close().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn byte_counters_rates_and_subscriptions_as_consumers() {
    let dir = common::TempDir::new("warren-sadmin-bytes");
    let mut config = warren::Config::for_tests(dir.path());
    config.admin_sample_interval_secs = 1;
    let w = warren::start(config).await.expect("broker starts");
    let port = w.stream_addr().expect("stream").port();
    let env = t(Environment::builder().host("127.0.0.1").port(port).build())
        .await
        .expect("environment");
    let stream = common::uniq("sbytes");
    t(env.stream_creator().create(&stream))
        .await
        .expect("create");
    let before = get(&w, "/overview").await;
    assert_eq!(before["object_totals"]["consumers"], 0, "{before:#}");
    let producer = t(env.producer().build(&stream)).await.expect("producer");
    let body = vec![b'x'; 1000];
    for _ in 0..20 {
        let m = Message::builder().body(body.clone()).build();
        t(producer.send_with_confirm(m)).await.expect("confirmed");
    }
    let mut consumer = t(env
        .consumer()
        .offset(OffsetSpecification::First)
        .build(&stream))
    .await
    .expect("consumer");
    for _ in 0..20 {
        t(consumer.next()).await.expect("delivery").expect("ok");
    }

    // The publishing connection read at least the bodies, the consuming one
    // wrote them; each counts its reads and writes.
    let cons = until(&w, "/stream/consumers", |b| array(b).len() == 1).await;
    let cname = cons[0]["connection_details"]["name"]
        .as_str()
        .expect("name")
        .to_string();
    let pubs = until(&w, "/stream/publishers", |b| array(b).len() == 1).await;
    let pname = pubs[0]["connection_details"]["name"]
        .as_str()
        .expect("name")
        .to_string();
    let c = until(
        &w,
        &format!("/stream/connections/%2F/{}", enc(&cname)),
        |c| c["send_oct"].as_u64().is_some_and(|n| n >= 20 * 1000),
    )
    .await;
    assert!(c["send_cnt"].as_u64().is_some_and(|n| n >= 1), "{c:#}");
    assert!(c["recv_oct"].as_u64().is_some_and(|n| n > 0), "{c:#}");
    assert!(c["recv_cnt"].as_u64().is_some_and(|n| n >= 1), "{c:#}");
    assert!(c["send_oct_details"]["rate"].is_number(), "{c:#}");
    assert!(c["recv_oct_details"]["rate"].is_number(), "{c:#}");
    let p = get(&w, &format!("/stream/connections/%2F/{}", enc(&pname))).await;
    assert!(
        p["recv_oct"].as_u64().is_some_and(|n| n >= 20 * 1000),
        "{p:#}"
    );
    // /api/connections shows the same counters.
    let all = get(&w, "/connections").await;
    let listed = array(&all)
        .iter()
        .find(|x| x["name"] == pname.as_str())
        .expect("listed");
    assert!(
        listed["recv_oct"].as_u64() >= p["recv_oct"].as_u64(),
        "{listed:#}"
    );

    // The subscription is a consumer: counted in the overview, listed in
    // /api/consumers as `stream.subid-N` of its connection.
    let o = get(&w, "/overview").await;
    assert_eq!(o["object_totals"]["consumers"], 1, "{o:#}");
    let list = get(&w, "/consumers").await;
    assert_eq!(array(&list).len(), 1, "{list:#}");
    let x = &list[0];
    assert!(
        x["consumer_tag"]
            .as_str()
            .is_some_and(|t| t.starts_with("stream.subid-")),
        "{x:#}"
    );
    assert_eq!(x["queue"]["name"], stream.as_str());
    assert_eq!(x["channel_details"]["connection_name"], cname.as_str());
    assert_eq!(x["ack_required"], false);
    assert_eq!(array(&get(&w, "/consumers/%2F").await).len(), 1);
    // ... and in its stream queue's `consumers`, shown and listed.
    let q = get(&w, &format!("/queues/%2F/{}", enc(&stream))).await;
    assert_eq!(q["consumers"], 1, "{q:#}");
    let queues = get(&w, "/queues").await;
    let listed = array(&queues)
        .iter()
        .find(|q| q["name"] == stream.as_str())
        .expect("listed");
    assert_eq!(listed["consumers"], 1, "{listed:#}");

    // While messages flow, the sampled byte rates of both sides rise above 0.
    // (Stopped by a flag and closed: dropping the client's producer while
    // it runs blocks a runtime thread.)
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flowing = tokio::spawn({
        let stop = std::sync::Arc::clone(&stop);
        async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let m = Message::builder().body(vec![b'y'; 1000]).build();
                if producer.send_with_confirm(m).await.is_err() {
                    break;
                }
            }
            let _ = producer.close().await;
        }
    });
    let handle = consumer.handle();
    let draining = tokio::spawn(async move { while let Some(Ok(_)) = consumer.next().await {} });
    until(
        &w,
        &format!("/stream/connections/%2F/{}", enc(&pname)),
        |c| {
            c["recv_oct_details"]["rate"]
                .as_f64()
                .is_some_and(|r| r > 0.0)
        },
    )
    .await;
    until(
        &w,
        &format!("/stream/connections/%2F/{}", enc(&cname)),
        |c| {
            c["send_oct_details"]["rate"]
                .as_f64()
                .is_some_and(|r| r > 0.0)
        },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = t(flowing).await;
    let _ = t(handle.close()).await;
    let _ = t(draining).await;
    until(&w, "/overview", |o| o["object_totals"]["consumers"] == 0).await;
    until(&w, &format!("/queues/%2F/{}", enc(&stream)), |q| {
        q["consumers"] == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sasl_anonymous_logs_in_as_the_configured_user() {
    let dir = common::TempDir::new("warren-sadmin-anon");
    let mut config = warren::Config::for_tests(dir.path());
    config.anonymous_login_user = Some("anon".into());
    config.anonymous_login_pass = Some("s3cret".into());
    let w = warren::start(config).await.expect("broker starts");
    let addr = w.stream_addr().expect("stream");
    let (status, body) = http(
        "PUT",
        &api(&w, "/users/anon"),
        Some(("guest", "guest")),
        Some(serde_json::json!({"password": "s3cret", "tags": ""})),
    )
    .await;
    assert!(status < 300, "{status} {body}");
    let (status, body) = http(
        "PUT",
        &api(&w, "/permissions/%2F/anon"),
        Some(("guest", "guest")),
        Some(serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"})),
    )
    .await;
    assert!(status < 300, "{status} {body}");

    let mut sock = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mechs = common::stream::hello(&mut sock).await;
    assert!(mechs.iter().any(|m| m == "ANONYMOUS"), "{mechs:?}");
    assert_eq!(
        common::stream::authenticate(&mut sock, "ANONYMOUS", b"").await,
        1
    );
    assert_eq!(common::stream::open(&mut sock).await.0, 1, "opened");
    let conns = until(&w, "/stream/connections", |b| array(b).len() == 1).await;
    assert_eq!(conns[0]["user"], "anon");
    assert_eq!(conns[0]["auth_mechanism"], "ANONYMOUS");

    // A broker without anonymous_login_user neither offers nor takes it.
    let (plain, _plain_dir) = broker("noanon").await;
    let mut sock = tokio::net::TcpStream::connect(plain.stream_addr().expect("stream"))
        .await
        .expect("connect");
    let mechs = common::stream::hello(&mut sock).await;
    assert!(!mechs.iter().any(|m| m == "ANONYMOUS"), "{mechs:?}");
    assert_eq!(
        common::stream::authenticate(&mut sock, "ANONYMOUS", b"").await,
        7,
        "SASL mechanism not supported"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sasl_anonymous_with_a_wrong_password_fails() {
    let dir = common::TempDir::new("warren-sadmin-anonbad");
    let mut config = warren::Config::for_tests(dir.path());
    config.anonymous_login_user = Some("guest".into());
    config.anonymous_login_pass = Some("not-the-password".into());
    let w = warren::start(config).await.expect("broker starts");
    let mut sock = tokio::net::TcpStream::connect(w.stream_addr().expect("stream"))
        .await
        .expect("connect");
    common::stream::hello(&mut sock).await;
    assert_eq!(
        common::stream::authenticate(&mut sock, "ANONYMOUS", b"").await,
        8,
        "authentication failure"
    );
}
