//! `/metrics` (Prometheus text) and the message rates behind the API's `*_details`.

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_parse_and_move() {
    let b = start().await;
    let before = parse_metrics(&b.text("/metrics").await);
    assert_eq!(
        metric(&before, "rabbitmq_global_messages_received_total", ""),
        0.0
    );
    assert!(metric(&before, "rabbitmq_process_resident_memory_bytes", "") > 0.0);

    let conn = b.amqp("guest", "guest", "/").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare("mq", QueueDeclareOptions::default(), FieldTable::default())
        .await
        .unwrap();
    for _ in 0..3 {
        ch.basic_publish(
            "",
            "mq",
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default(),
        )
        .await
        .unwrap();
    }
    let got = ch
        .basic_get("mq", BasicGetOptions::default())
        .await
        .unwrap()
        .expect("a message");
    let _held = ch
        .basic_get("mq", BasicGetOptions::default())
        .await
        .unwrap()
        .expect("a message");
    got.ack(BasicAckOptions::default()).await.unwrap();
    // Let the ack arrive.
    for _ in 0..50 {
        let m = parse_metrics(&b.text("/metrics").await);
        if metric(&m, "rabbitmq_global_messages_acknowledged_total", "") >= 1.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let m = parse_metrics(&b.text("/metrics").await);
    assert_eq!(
        metric(&m, "rabbitmq_global_messages_received_total", ""),
        3.0
    );
    assert_eq!(
        metric(&m, "rabbitmq_global_messages_delivered_total", ""),
        2.0
    );
    assert_eq!(
        metric(&m, "rabbitmq_global_messages_acknowledged_total", ""),
        1.0
    );
    assert_eq!(metric(&m, "rabbitmq_connections", ""), 1.0);
    assert_eq!(metric(&m, "rabbitmq_channels", ""), 1.0);
    assert_eq!(metric(&m, "rabbitmq_queues", ""), 1.0);
    assert_eq!(metric(&m, "rabbitmq_consumers", ""), 0.0);
    let labels = "vhost=\"/\",queue=\"mq\"";
    assert_eq!(metric(&m, "rabbitmq_queue_messages_ready", labels), 1.0);
    assert_eq!(metric(&m, "rabbitmq_queue_messages_unacked", labels), 1.0);
    assert_eq!(metric(&m, "rabbitmq_queue_messages", labels), 2.0);
    assert_eq!(
        metric(&m, "rabbitmq_queue_messages_ready_bytes", labels),
        1.0
    );
    assert_eq!(
        metric(&m, "rabbitmq_queue_messages_unacked_bytes", labels),
        1.0
    );
    assert_eq!(metric(&m, "rabbitmq_queue_messages_bytes", labels), 2.0);
    // The queue's message_stats in the API count the same flow.
    let q = b.get("/api/queues/%2F/mq").await;
    // Bytes: one ready, one unacked (held), as RabbitMQ counts them.
    assert_eq!(q["message_bytes_ready"], 1);
    assert_eq!(q["message_bytes_unacknowledged"], 1);
    assert_eq!(q["message_bytes"], 2);
    assert_eq!(q["message_bytes_ram"], 2);
    assert_eq!(q["message_stats"]["publish"], 3);
    assert_eq!(q["message_stats"]["deliver_get"], 2);
    assert_eq!(q["message_stats"]["ack"], 1);
    assert!(q["message_stats"]["ack_details"]["rate"].is_number());
}

#[test]
fn rates_are_computed_from_samples() {
    let broker = warren::broker::Broker::new(&warren::Config::default());
    let rates = warren::admin::metrics::Rates::new();
    rates.sample(&broker);
    warren::broker::Counters::add(&broker.counters.published, 100);
    std::thread::sleep(std::time::Duration::from_millis(200));
    rates.sample(&broker);
    let r = rates.global();
    assert!(r.publish > 100.0 && r.publish <= 500.0, "{r:?}");
    assert_eq!(r.ack, 0.0);
}
