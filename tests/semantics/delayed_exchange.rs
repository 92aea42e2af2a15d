//! The `x-delayed-message` exchange: messages held for `x-delay`, and the required
//! `x-delayed-type` argument.

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_message_exchange_holds_messages_for_x_delay() {
    // rabbitmq_delayed_message_exchange is a plugin the reference RabbitMQ on 5673
    // does not have; this is warren-only.
    if against_reference_rabbitmq() {
        eprintln!("skipped: delayed-message plugin not installed on the reference RabbitMQ");
        return;
    }
    let (_c, ch) = connect_channel().await;
    let ex = uniq("delayed");
    t(ch.exchange_declare(
        &ex,
        lapin::ExchangeKind::Custom("x-delayed-message".into()),
        ExchangeDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        table(&[("x-delayed-type", s("direct"))]),
    ))
    .await
    .unwrap();
    let q = xqueue(&ch, "delayed.q", &[]).await;
    t(ch.queue_bind(
        &q,
        &ex,
        "k",
        QueueBindOptions::default(),
        FieldTable::default(),
    ))
    .await
    .unwrap();
    let delayed = |ms: i32| BasicProperties::default().with_headers(table(&[("x-delay", int(ms))]));
    let start = Instant::now();
    pub_props(&ch, &ex, "k", "late", delayed(250)).await;
    pub_props(&ch, &ex, "k", "soon", delayed(100)).await;
    pub_props(&ch, &ex, "k", "now", BasicProperties::default()).await;
    pub_props(&ch, &ex, "other", "unbound", delayed(50)).await;
    assert_eq!(body(&wait_get(&ch, &q).await), "now");
    let soon = wait_get(&ch, &q).await;
    assert_eq!(body(&soon), "soon");
    assert!(start.elapsed() >= Duration::from_millis(100));
    let late = wait_get(&ch, &q).await;
    assert_eq!(body(&late), "late");
    assert!(start.elapsed() >= Duration::from_millis(250));
    // The x-delay header is still on the message; the key is routed by the delayed type.
    assert_eq!(headers(&late).get("x-delay"), Some(&int(250)));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(get(&ch, &q).await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delayed_message_exchange_needs_x_delayed_type() {
    if against_reference_rabbitmq() {
        eprintln!("skipped: delayed-message plugin not installed on the reference RabbitMQ");
        return;
    }
    let (_c, ch) = connect_channel().await;
    let r = t(ch.exchange_declare(
        &uniq("delayed.bad"),
        lapin::ExchangeKind::Custom("x-delayed-message".into()),
        ExchangeDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await;
    let msg = err_406(r);
    assert!(msg.contains("x-delayed-type"), "{msg}");
}
