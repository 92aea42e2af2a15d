//! Direct reply-to (`amq.rabbitmq.reply-to`): the RPC round trip and its no-ack rule.

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_reply_to_rpc_round_trip() {
    let server_conn = connect().await;
    let server = t(server_conn.create_channel()).await.unwrap();
    let rpc = uniq("rpc");
    t(server.queue_declare(
        &rpc,
        QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .unwrap();
    let mut requests = consume(&server, &rpc, false, FieldTable::default()).await;

    let (_client_conn, client) = connect_channel().await;
    // Publishing with reply_to before consuming the pseudo-queue is refused.
    let early = t(connect().await.create_channel()).await.unwrap();
    let rx = watch_channel(&early);
    let _ = early
        .basic_publish(
            "",
            &rpc,
            BasicPublishOptions::default(),
            b"too early",
            BasicProperties::default().with_reply_to("amq.rabbitmq.reply-to".into()),
        )
        .await;
    expect_closed_with(rx, 406).await;

    let mut replies = consume(
        &client,
        "amq.rabbitmq.reply-to",
        true,
        FieldTable::default(),
    )
    .await;
    let props = BasicProperties::default()
        .with_reply_to("amq.rabbitmq.reply-to".into())
        .with_correlation_id("42".into());
    pub_props(&client, "", &rpc, "ping", props).await;

    let req = next_delivery(&mut requests).await;
    assert_eq!(body(&req), "ping");
    let reply_to = req
        .properties
        .reply_to()
        .as_ref()
        .map(|r| r.as_str().to_string())
        .expect("reply_to");
    // The broker rewrites the pseudo-queue into a routable per-channel name.
    assert!(
        reply_to.starts_with("amq.rabbitmq.reply-to."),
        "reply_to = {reply_to}"
    );
    let reply = BasicProperties::default().with_correlation_id("42".into());
    pub_props(&server, "", &reply_to, "pong", reply).await;
    ack(&req).await;

    let d = next_delivery(&mut replies).await;
    assert_eq!(body(&d), "pong");
    assert_eq!(
        d.properties.correlation_id().as_ref().map(|c| c.as_str()),
        Some("42")
    );
    assert_eq!(d.routing_key.as_str(), reply_to);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_reply_to_requires_no_ack() {
    let (_c, ch) = connect_channel().await;
    let r = t(ch.basic_consume(
        "amq.rabbitmq.reply-to",
        "",
        BasicConsumeOptions {
            no_ack: false,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await;
    let msg = err_406(r);
    assert!(msg.contains("reply consumer cannot acknowledge"), "{msg}");
}
