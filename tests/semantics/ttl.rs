//! Message TTL: `x-message-ttl`, per-message `expiration`, the lower of the two
//! winning, expiry only at the head, TTL 0, and what happens to expired messages.

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_ttl_and_message_ttl_lower_wins() {
    let (_c, ch) = connect_channel().await;
    // Queue TTL 80 ms, message asks for 10 s: the queue's wins.
    let q1 = xqueue(&ch, "ttl.q", &[("x-message-ttl", int(80))]).await;
    pub_exp(&ch, &q1, "a", "10000").await;
    // Queue TTL 10 s, message asks for 80 ms: the message's wins.
    let q2 = xqueue(&ch, "ttl.m", &[("x-message-ttl", int(10_000))]).await;
    pub_exp(&ch, &q2, "b", "80").await;
    // Queue TTL 10 s, no per-message TTL: stays.
    let q3 = xqueue(&ch, "ttl.keep", &[("x-message-ttl", int(10_000))]).await;
    publish(&ch, "", &q3, b"c").await;
    wait_message_count(&ch, &q1, 1).await;
    wait_message_count(&ch, &q2, 1).await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    wait_message_count(&ch, &q1, 0).await;
    wait_message_count(&ch, &q2, 0).await;
    assert_eq!(message_count(&ch, &q3).await, 1);
    assert!(get(&ch, &q1).await.is_none());
    assert!(get(&ch, &q2).await.is_none());
    assert_eq!(get(&ch, &q3).await.map(|d| body(&d)).as_deref(), Some("c"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_message_ttl_expires_only_at_head() {
    // RabbitMQ surprise: a per-message TTL is only acted on when the message reaches
    // the head; an expired message behind a live one still counts in message_count.
    let (_c, ch) = connect_channel().await;
    let q = xqueue(&ch, "ttl.head", &[]).await;
    publish(&ch, "", &q, b"live").await;
    pub_exp(&ch, &q, "short", "30").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(message_count(&ch, &q).await, 2);
    assert_eq!(
        get(&ch, &q).await.map(|d| body(&d)).as_deref(),
        Some("live")
    );
    // Now at the head and expired: never delivered.
    assert!(get(&ch, &q).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_zero_delivers_to_waiting_consumer_or_expires() {
    let (_c, ch) = connect_channel().await;
    // Nobody is consuming: expiration 0 (and x-message-ttl 0) expire at once.
    let q = xqueue(&ch, "ttl0", &[]).await;
    pub_exp(&ch, &q, "gone", "0").await;
    let qz = xqueue(&ch, "ttl0.q", &[("x-message-ttl", int(0))]).await;
    publish(&ch, "", &qz, b"gone too").await;
    publish(&ch, "", &q, b"marker").await;
    publish(&ch, "", &qz, b"marker").await;
    assert_eq!(
        get(&ch, &q).await.map(|d| body(&d)).as_deref(),
        Some("marker")
    );
    assert!(get(&ch, &q).await.is_none());
    // x-message-ttl 0 also expires the marker: nothing at all in qz.
    assert!(get(&ch, &qz).await.is_none());

    // A consumer ready to take it: delivered now.
    let mut consumer = consume(&ch, &q, true, FieldTable::default()).await;
    pub_exp(&ch, &q, "now", "0").await;
    let d = next_delivery(&mut consumer).await;
    assert_eq!(body(&d), "now");
    let mut cz = consume(&ch, &qz, true, FieldTable::default()).await;
    publish(&ch, "", &qz, b"now too").await;
    assert_eq!(body(&next_delivery(&mut cz).await), "now too");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_messages_are_dropped_or_dead_lettered() {
    let (_c, ch) = connect_channel().await;
    let dlq = xqueue(&ch, "exp.dlq", &[]).await;
    // Without a DLX: just gone.
    let plain = xqueue(&ch, "exp.plain", &[("x-message-ttl", int(50))]).await;
    publish(&ch, "", &plain, b"x").await;
    // With a DLX (the default exchange, routed to dlq by x-dead-letter-routing-key).
    let q = xqueue(
        &ch,
        "exp.dl",
        &[
            ("x-message-ttl", int(50)),
            ("x-dead-letter-exchange", s("")),
            ("x-dead-letter-routing-key", s(&dlq)),
        ],
    )
    .await;
    publish(&ch, "", &q, b"y").await;
    let d = wait_get(&ch, &dlq).await;
    assert_eq!(body(&d), "y");
    assert_eq!(d.routing_key.as_str(), dlq);
    assert_eq!(d.exchange.as_str(), "");
    wait_message_count(&ch, &plain, 0).await;
    assert_eq!(message_count(&ch, &q).await, 0);
    assert_eq!(message_count(&ch, &dlq).await, 0);
}
