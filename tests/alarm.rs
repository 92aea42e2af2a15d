//! The memory alarm: past the high watermark publishers get connection.blocked and
//! are not read from; below it they get connection.unblocked and carry on.

use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties};
use std::time::Duration;

async fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..100 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_are_blocked_above_the_watermark() {
    let dir = std::env::temp_dir().join(format!("warren-alarm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let mut config = warren::Config::for_tests(&dir);
    config.admin_enabled = false;
    let broker = warren::start(config).await.expect("start");
    let core = std::sync::Arc::clone(&broker.server.broker);
    let uri = format!("amqp://guest:guest@{}/%2f", broker.amqp_addr());
    let publisher = Connection::connect(&uri, ConnectionProperties::default())
        .await
        .unwrap();
    let pch = publisher.create_channel().await.unwrap();
    let observer = Connection::connect(&uri, ConnectionProperties::default())
        .await
        .unwrap();
    let och = observer.create_channel().await.unwrap();
    och.queue_declare(
        "alarmq",
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let count = |ch: lapin::Channel| async move {
        ch.queue_declare(
            "alarmq",
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap()
        .message_count()
    };
    pch.basic_publish(
        "",
        "alarmq",
        BasicPublishOptions::default(),
        b"1",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    wait_for("first message", || true).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(count(och.clone()).await, 1);

    // Any process is above a 1-byte watermark.
    core.set_memory_watermark(1);
    wait_for("the alarm", || core.memory_alarm()).await;
    wait_for("connection.blocked", || publisher.status().blocked()).await;
    // lapin itself holds publishes while blocked, so send this one from a task.
    let held = tokio::spawn(async move {
        pch.basic_publish(
            "",
            "alarmq",
            BasicPublishOptions::default(),
            b"2",
            BasicProperties::default(),
        )
        .await
        .map(|_| ())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        count(och.clone()).await,
        1,
        "a blocked publisher is not read from"
    );
    assert!(
        !observer.status().blocked(),
        "non-publishers are not blocked"
    );

    core.set_memory_watermark(u64::MAX);
    wait_for("the alarm to clear", || !core.memory_alarm()).await;
    wait_for("connection.unblocked", || !publisher.status().blocked()).await;
    for _ in 0..50 {
        if count(och.clone()).await == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(count(och.clone()).await, 2, "the held publish goes through");
    held.await.unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
