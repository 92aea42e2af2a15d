//! Channel lifecycle, channel.flow and channel-level errors.

mod common;

use common::*;
use lapin::options::*;
use lapin::types::FieldTable;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_and_close_channels() {
    let conn = connect().await;
    let a = t(conn.create_channel()).await.unwrap();
    let b = t(conn.create_channel()).await.unwrap();
    assert_ne!(a.id(), b.id());
    assert!(a.status().connected() && b.status().connected());
    t(a.close(200, "done")).await.unwrap();
    assert!(!a.status().connected());
    // The closed channel is unusable; the other one and the connection are fine.
    assert!(t(a.queue_declare(
        "",
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default()
    ))
    .await
    .is_err());
    let q = t(b.queue_declare(
        "",
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .unwrap();
    assert!(q.name().as_str().starts_with("amq.gen-"));
    assert!(conn.status().connected());
    t(conn.close(200, "")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_channels() {
    let conn = connect().await;
    let mut chans = vec![];
    for _ in 0..20 {
        chans.push(t(conn.create_channel()).await.unwrap());
    }
    for ch in &chans {
        temp_queue(ch, "many").await;
    }
    for ch in &chans {
        t(ch.close(200, "")).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_flow_active_true() {
    let (_conn, ch) = connect_channel().await;
    let active = t(ch.channel_flow(ChannelFlowOptions { active: true }))
        .await
        .unwrap();
    assert!(active, "flow-ok must echo active=true");
    // Channel still usable.
    temp_queue(&ch, "flow").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_flow_active_false() {
    let (conn, ch) = connect_channel().await;
    let r = t(ch.channel_flow(ChannelFlowOptions { active: false })).await;
    // RabbitMQ (3.x) does not implement client-initiated flow stop: it answers
    // 540 NOT_IMPLEMENTED ("active=false"), which is a hard error, so the whole
    // *connection* is closed, not just the channel.
    assert_code(r, 540);
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while conn.status().connected() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert!(!conn.status().connected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_error_closes_only_that_channel() {
    let conn = connect().await;
    let ch1 = t(conn.create_channel()).await.unwrap();
    let ch2 = t(conn.create_channel()).await.unwrap();
    let q = temp_queue(&ch2, "survivor").await;
    let r = t(ch1.queue_declare(
        &uniq("missing"),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await;
    assert_code(r, 404);
    assert!(!ch1.status().connected(), "the failing channel is closed");
    // Further use of the failed channel errors.
    assert!(
        t(ch1.queue_declare("", QueueDeclareOptions::default(), FieldTable::default()))
            .await
            .is_err()
    );
    // Other channel and the connection are unaffected.
    assert!(conn.status().connected());
    assert!(ch2.status().connected());
    publish(&ch2, "", &q, b"still-alive").await;
    wait_message_count(&ch2, &q, 1).await;
    assert_eq!(
        get_body(&ch2, &q).await.as_deref(),
        Some(&b"still-alive"[..])
    );
    // And new channels can be opened.
    let ch3 = t(conn.create_channel()).await.unwrap();
    temp_queue(&ch3, "after").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_error_reported_via_on_error() {
    let (conn, ch) = connect_channel().await;
    let rx = watch_channel(&ch);
    let _ = t(ch.exchange_declare(
        &uniq("missing-x"),
        lapin::ExchangeKind::Direct,
        ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await;
    expect_closed_with(rx, 404).await;
    assert!(conn.status().connected());
}
