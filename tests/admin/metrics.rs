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

/// The Prometheus listener (RabbitMQ's port 15692, here a free one):
/// `/metrics` sums the queue figures over the node, `/metrics/per-object`
/// has one line per queue; both without credentials, with the node's
/// identity, and listed among the node's listeners.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_listener_aggregates_and_lists_per_object() {
    let b = start_with(|c| {
        c.prometheus_enabled = true;
        c.prometheus_port = 0;
    })
    .await;
    let addr = b
        ._warren
        .as_ref()
        .and_then(|w| w.prometheus_addr())
        .expect("prometheus listener");
    let conn = b.amqp("guest", "guest", "/").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    for (q, n) in [("pq1", 2), ("pq2", 3)] {
        ch.queue_declare(q, QueueDeclareOptions::default(), FieldTable::default())
            .await
            .unwrap();
        for _ in 0..n {
            ch.basic_publish(
                "",
                q,
                BasicPublishOptions::default(),
                b"xy",
                BasicProperties::default(),
            )
            .await
            .unwrap();
        }
    }
    let got = ch
        .basic_get("pq2", BasicGetOptions::default())
        .await
        .unwrap()
        .expect("a message");
    // (status, content type, body) of a GET on the Prometheus listener.
    let fetch = |path: &'static str| async move {
        let url = format!("http://{addr}{path}");
        tokio::task::spawn_blocking(move || match ureq::get(&url).call() {
            Ok(r) => (
                r.status(),
                r.content_type().to_string(),
                r.into_string().expect("body"),
            ),
            Err(ureq::Error::Status(code, _)) => (code, String::new(), String::new()),
            Err(e) => panic!("{url}: {e}"),
        })
        .await
        .expect("task")
    };
    let (status, kind, body) = fetch("/metrics").await;
    assert_eq!(status, 200);
    assert!(kind.starts_with("text/plain"), "{kind}");
    let m = parse_metrics(&body);
    assert_eq!(metric(&m, "rabbitmq_queues", ""), 2.0);
    assert_eq!(metric(&m, "rabbitmq_queue_messages_ready", ""), 4.0);
    assert_eq!(metric(&m, "rabbitmq_queue_messages_unacked", ""), 1.0);
    assert_eq!(metric(&m, "rabbitmq_queue_messages", ""), 5.0);
    assert_eq!(metric(&m, "rabbitmq_queue_messages_bytes", ""), 10.0);
    assert_eq!(
        metric(
            &m,
            "rabbitmq_global_messages_delivered_get_manual_ack_total",
            ""
        ),
        1.0
    );
    assert_eq!(metric(&m, "rabbitmq_global_messages_routed_total", ""), 5.0);
    assert!(metric(&m, "rabbitmq_process_open_fds", "") > 0.0);
    assert!(metric(&m, "rabbitmq_process_max_fds", "") > 0.0);
    assert!(metric(&m, "rabbitmq_disk_space_available_bytes", "") > 0.0);
    assert!(metric(&m, "rabbitmq_resident_memory_limit_bytes", "") > 0.0);
    let identity = m
        .iter()
        .find(|(name, _, _)| name == "rabbitmq_identity_info")
        .expect("identity");
    assert!(
        identity.1.contains("rabbitmq_node=\"warren@"),
        "{identity:?}"
    );
    assert!(
        !m.iter()
            .any(|(name, labels, _)| name == "rabbitmq_queue_messages_ready" && !labels.is_empty()),
        "aggregated: no per-queue lines"
    );

    let m = parse_metrics(&fetch("/metrics/per-object").await.2);
    assert_eq!(
        metric(
            &m,
            "rabbitmq_queue_messages_ready",
            "vhost=\"/\",queue=\"pq1\""
        ),
        2.0
    );
    assert_eq!(
        metric(
            &m,
            "rabbitmq_queue_messages_ready",
            "vhost=\"/\",queue=\"pq2\""
        ),
        2.0
    );
    assert_eq!(
        metric(
            &m,
            "rabbitmq_queue_messages_unacked",
            "vhost=\"/\",queue=\"pq2\""
        ),
        1.0
    );

    // Detailed: the families asked for, per object, in the vhosts asked for.
    let detailed =
        "/metrics/detailed?family=queue_coarse_metrics&family=exchange_bindings&vhost=%2F";
    let m = parse_metrics(&fetch(detailed).await.2);
    let pq1 = "vhost=\"/\",queue=\"pq1\"";
    assert_eq!(
        metric(&m, "rabbitmq_detailed_queue_messages_ready", pq1),
        2.0
    );
    assert_eq!(metric(&m, "rabbitmq_detailed_queue_messages", pq1), 2.0);
    let direct = "vhost=\"/\",exchange=\"amq.direct\",type=\"direct\"";
    assert_eq!(
        metric(&m, "rabbitmq_cluster_exchange_bindings", direct),
        0.0
    );
    let not_asked = m
        .iter()
        .any(|(n, _, _)| n == "rabbitmq_detailed_queue_consumers");
    assert!(!not_asked, "a family not asked for");
    let other = "/metrics/detailed?family=queue_coarse_metrics&vhost=other";
    let m = parse_metrics(&fetch(other).await.2);
    let queue_lines = m
        .iter()
        .filter(|(n, _, _)| n.starts_with("rabbitmq_detailed_queue"));
    assert_eq!(queue_lines.count(), 0, "no queue of vhost 'other'");
    assert!(m.iter().any(|(n, _, _)| n == "rabbitmq_identity_info"));

    assert_eq!(
        fetch("/api/overview").await.0,
        404,
        "only the metrics there"
    );
    let overview = b.get("/api/overview").await;
    let listed = overview["listeners"]
        .as_array()
        .expect("listeners")
        .iter()
        .any(|l| l["protocol"] == "http/prometheus" && l["port"] == addr.port());
    assert!(listed, "{}", overview["listeners"]);
    let context = overview["contexts"]
        .as_array()
        .expect("contexts")
        .iter()
        .find(|c| c["port"].as_str().and_then(|p| p.parse().ok()) == Some(addr.port()))
        .expect("a context of the Prometheus listener");
    assert_eq!(context["description"], "RabbitMQ Prometheus");
    let check = b
        .get("/api/health/checks/protocol-listener/prometheus")
        .await;
    assert_eq!(check["status"], "ok", "{check}");
    got.ack(BasicAckOptions::default()).await.unwrap();
}
