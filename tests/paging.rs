//! Queues larger than the memory limit: persistent messages page out to the store
//! and come back in order as consumers drain the queue.

use futures::StreamExt;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_deeper_than_memory_limit_drains_in_order() {
    let dir = std::env::temp_dir().join(format!("warren-paging-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut config = warren::Config::for_tests(&dir);
    config.admin_enabled = false;
    const LIMIT: u64 = 256 * 1024;
    config.message_memory_limit = LIMIT;
    let broker = warren::start(config).await.expect("start");
    let uri = format!("amqp://guest:guest@{}/%2f", broker.amqp_addr());
    let conn = Connection::connect(&uri, ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        "deep",
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    const N: usize = 3000;
    const SIZE: usize = 1024;
    let mut pending = Vec::new();
    for i in 0..N {
        let mut body = format!("{i:08}").into_bytes();
        body.resize(SIZE, b'x');
        let confirm = ch
            .basic_publish(
                "",
                "deep",
                BasicPublishOptions::default(),
                &body,
                BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .unwrap();
        pending.push(confirm);
    }
    for c in pending {
        assert!(c.await.unwrap().is_ack());
    }
    let core = &broker.server.broker;
    let resident = core.budget.used() as u64;
    assert!(
        resident <= LIMIT + SIZE as u64,
        "{resident} bytes resident with a limit of {LIMIT} ({} bytes queued)",
        N * SIZE
    );
    // Drain with a consumer: everything, in publish order.
    ch.basic_qos(100, BasicQosOptions::default()).await.unwrap();
    let mut consumer = ch
        .basic_consume(
            "deep",
            "c",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    for i in 0..N {
        let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
            .await
            .expect("delivery in time")
            .expect("stream open")
            .expect("delivery");
        assert_eq!(&d.data[..8], format!("{i:08}").as_bytes(), "order");
        assert_eq!(d.data.len(), SIZE);
        d.ack(BasicAckOptions::default()).await.unwrap();
    }
    let q = ch
        .queue_declare(
            "deep",
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(q.message_count(), 0);
    assert_eq!(core.budget.used(), 0, "nothing left resident");
    let _ = std::fs::remove_dir_all(&dir);
}
