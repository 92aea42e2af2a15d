//! Connection-level behaviour: auth, vhosts, server properties, heartbeat
//! negotiation, and wire-level framing errors (hand-encoded raw frames).

mod common;

use common::raw::{self, RawConn, Value};
use common::*;
use tokio::io::AsyncWriteExt;
use warren::wire::{ChannelOpen, ConnectionCloseOk};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_and_close() {
    let conn = connect().await;
    assert!(conn.status().connected());
    let ch = t(conn.create_channel()).await.unwrap();
    assert!(ch.status().connected());
    t(conn.close(200, "bye")).await.unwrap();
    assert!(!conn.status().connected());
    // Channels of a closed connection are unusable.
    assert!(
        t(ch.queue_declare("", Default::default(), Default::default()))
            .await
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_password_is_access_refused() {
    let p = parse_uri(&broker_uri().await);
    let uri = uri_with(&p.user, "definitely-not-the-password", &p.vhost, "").await;
    let err = connect_with(&uri).await.expect_err("connect must fail");
    // RabbitMQ sends connection.close 403 ACCESS_REFUSED because lapin announces the
    // authentication_failure_close capability.
    assert_eq!(code(&err), Some(403), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_user_is_access_refused() {
    let p = parse_uri(&broker_uri().await);
    let uri = uri_with("no-such-user-xyz", "x", &p.vhost, "").await;
    let err = connect_with(&uri).await.expect_err("connect must fail");
    assert_eq!(code(&err), Some(403), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_vhost_is_not_allowed() {
    let p = parse_uri(&broker_uri().await);
    let uri = uri_with(&p.user, &p.pass, &uniq("no-such-vhost"), "").await;
    let err = connect_with(&uri).await.expect_err("connect must fail");
    assert_eq!(code(&err), Some(530), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_properties_capabilities_and_product() {
    let c = RawConn::start().await;
    let props = &c.server_properties;
    let text = |k: &str| raw::lookup(props, k).and_then(|v| v.as_str());
    // RabbitMQ's identity, as stock clients' suites check it (amqplib's
    // asserts the product), at the feature level implemented; warren's own
    // name in `platform`.
    assert_eq!(text("product").as_deref(), Some("RabbitMQ"), "{props:?}");
    assert_eq!(text("version").as_deref(), Some("3.13.0"));
    assert!(text("platform").is_some_and(|p| p.starts_with("warren ")));
    assert!(text("cluster_name").is_some_and(|c| !c.is_empty()));
    let caps = raw::lookup(props, "capabilities")
        .and_then(|v| v.as_table())
        .expect("capabilities table");
    for cap in [
        "publisher_confirms",
        "exchange_exchange_bindings",
        "basic.nack",
        "consumer_cancel_notify",
        "connection.blocked",
        "authentication_failure_close",
        "per_consumer_qos",
        "direct_reply_to",
        "consumer_priorities",
    ] {
        assert_eq!(
            raw::lookup(caps, cap),
            Some(&Value::Bool(true)),
            "capability {cap}"
        );
    }
    assert!(
        c.mechanisms.split(' ').any(|m| m == "PLAIN"),
        "mechanisms: {}",
        c.mechanisms
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tune_values() {
    let c = RawConn::open().await;
    let tune = c.tune.clone().unwrap();
    // RabbitMQ defaults: frame_max 131072, channel_max 2047, heartbeat 60.
    assert_eq!(tune.frame_max, 131072);
    assert_eq!(tune.channel_max, 2047);
    assert_eq!(tune.heartbeat, 60);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_negotiation() {
    let p = parse_uri(&broker_uri().await);
    // Client asks for less than the server proposes: the lower value wins.
    let uri = uri_with(&p.user, &p.pass, &p.vhost, "heartbeat=5").await;
    let conn = connect_with(&uri).await.unwrap();
    assert_eq!(conn.configuration().heartbeat(), 5);
    t(conn.close(200, "")).await.unwrap();
    // Client states no preference: lapin follows the server's proposal (60 on RabbitMQ).
    let conn = connect().await;
    assert_eq!(conn.configuration().heartbeat(), 60);
    assert_eq!(conn.configuration().frame_max(), 131072);
    t(conn.close(200, "")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_sends_heartbeats() {
    let mut c = RawConn::open_with_heartbeat(1).await;
    let start = tokio::time::Instant::now();
    loop {
        let f = c.read_any_frame().await.expect("connection closed");
        if f.typ == raw::FRAME_HEARTBEAT {
            assert_eq!(f.channel, 0);
            assert!(f.payload.is_empty());
            break;
        }
    }
    assert!(start.elapsed() < std::time::Duration::from_secs(3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_client_is_disconnected_after_missed_heartbeats() {
    // Negotiate a 1s heartbeat, then never send anything: RabbitMQ drops the
    // connection after ~2 missed intervals (it just closes the socket).
    let mut c = RawConn::open_with_heartbeat(1).await;
    let start = tokio::time::Instant::now();
    loop {
        match c.read_any_frame().await {
            Err(_) => break,
            Ok(f) if f.typ == raw::FRAME_HEARTBEAT => continue,
            Ok(f) if f.method_id() == Some(id!(ConnectionClose)) => continue, // a close is acceptable too
            Ok(f) => panic!("unexpected frame {f:?}"),
        }
    }
    let el = start.elapsed();
    assert!(
        el >= std::time::Duration::from_millis(1000),
        "closed too early: {el:?}"
    );
    assert!(
        el < std::time::Duration::from_secs(5),
        "closed too late: {el:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_protocol_header_gets_server_header_then_close() {
    for bad in [&b"AMQP\x00\x00\x0a\x00"[..], &b"GET / HTTP/1.1\r\n\r\n"[..]] {
        let mut s = raw::tcp().await;
        s.write_all(bad).await.unwrap();
        let got = raw::read_to_eof(&mut s).await;
        assert_eq!(&got[..], &raw::PROTOCOL_HEADER[..], "reply to {bad:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frame_end_is_frame_error() {
    let mut c = RawConn::open().await;
    let mut a = vec![];
    raw::put_shortstr(&mut a, "");
    let f = raw::frame_with_end(
        raw::FRAME_METHOD,
        1,
        &raw::method(ChannelOpen::CLASS_ID, ChannelOpen::METHOD_ID, &a),
        0x00,
    );
    c.send_raw(&f).await;
    // RabbitMQ treats framing errors as fatal: it sends connection.close 501 and
    // closes the socket even if close-ok never comes (after ~3 s on RabbitMQ 3.10;
    // the helper allows 5 s).
    c.expect_connection_close_then_eof(501).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_on_unopened_channel_is_channel_error() {
    let mut c = RawConn::open().await;
    let a = raw::queue_declare_args("", false, false, true, true);
    c.send_method(3, 50, 10, &a).await;
    c.expect_connection_close(504).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_without_header_is_unexpected_frame() {
    let mut c = RawConn::open().await;
    c.open_channel(1).await;
    c.send_frame(raw::FRAME_BODY, 1, b"hello").await;
    // Not a fatal framing error: RabbitMQ waits for our close-ok before closing.
    c.expect_connection_close(505).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_without_publish_is_unexpected_frame() {
    let mut c = RawConn::open().await;
    c.open_channel(1).await;
    c.send_frame(raw::FRAME_HEADER, 1, &raw::content_header(5))
        .await;
    c.expect_connection_close(505).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn method_instead_of_content_is_unexpected_frame() {
    let mut c = RawConn::open().await;
    c.open_channel(1).await;
    c.send_method(1, 60, 40, &raw::basic_publish_args("", "x", false, false))
        .await;
    // A method where a content header is expected.
    c.send_method(1, 60, 40, &raw::basic_publish_args("", "x", false, false))
        .await;
    c.expect_connection_close(505).await;
}

/// Unknown class or method id.
///
/// RabbitMQ 3.10 surprise: it does NOT answer with a connection.close: its reader
/// process crashes on `{unknown_method_id, {C, M}}` and the TCP socket is simply
/// closed/reset. We assert what every sane implementation shares with that: the
/// connection is terminated (no further replies), and if a close method is sent at
/// all it is a connection-level (hard) error.
async fn unknown_method_terminates_connection(class: u16, meth: u16) {
    let mut c = RawConn::open().await;
    c.open_channel(1).await;
    c.send_method(1, class, meth, &[]).await;
    match c.read_frame().await {
        Err(_) => {} // socket closed / reset: RabbitMQ's behaviour
        Ok(f) => {
            let (code, text, _, _) = f
                .close_info()
                .unwrap_or_else(|| panic!("unexpected frame {f:?}"));
            assert_eq!(
                f.method_id(),
                Some(id!(ConnectionClose)),
                "must be connection.close: {f:?}"
            );
            assert!([501, 503, 540].contains(&code), "code {code} {text}");
            let _ = c
                .stream
                .write_all(&raw::frame(
                    raw::FRAME_METHOD,
                    0,
                    &raw::method(
                        ConnectionCloseOk::CLASS_ID,
                        ConnectionCloseOk::METHOD_ID,
                        &[],
                    ),
                ))
                .await;
        }
    }
    raw::read_to_eof(&mut c.stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_class_terminates_connection() {
    unknown_method_terminates_connection(99, 99).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_method_of_known_class_terminates_connection() {
    unknown_method_terminates_connection(50, 99).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversize_frame_is_frame_error() {
    let mut c = RawConn::open().await;
    c.open_channel(1).await;
    let frame_max = c.tune.as_ref().unwrap().frame_max as usize;
    c.send_method(1, 60, 40, &raw::basic_publish_args("", "x", false, false))
        .await;
    let body = vec![b'x'; frame_max * 2];
    c.send_frame(
        raw::FRAME_HEADER,
        1,
        &raw::content_header(body.len() as u64),
    )
    .await;
    c.send_frame(raw::FRAME_BODY, 1, &body).await;
    c.expect_connection_close_then_eof(501).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_publish_and_get_roundtrip() {
    // Sanity check that the raw helper speaks correctly: an exclusive queue is
    // declared, and the declare-ok comes back on the same channel.
    let mut c = RawConn::open().await;
    c.open_channel(1).await;
    c.send_method(
        1,
        50,
        10,
        &raw::queue_declare_args("", false, false, true, true),
    )
    .await;
    let f = c.read_frame().await.unwrap();
    assert_eq!(f.method_id(), Some(id!(QueueDeclareOk)));
    assert_eq!(f.channel, 1);
    let mut r = raw::Reader::new(&f.payload[4..]);
    assert!(r.shortstr().starts_with("amq.gen-"));
    assert_eq!(r.u32(), 0);
    assert_eq!(r.u32(), 0);
}
