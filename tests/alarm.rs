//! The memory and disk alarms: past the memory high watermark, or with less free
//! disk space than the limit, publishers get connection.blocked and are not read
//! from; once under it they get connection.unblocked and carry on.

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

/// A publishing connection (one message published to `q`) and an observer
/// that declared `q` and counts its messages.
struct Clients {
    publisher: Connection,
    pch: lapin::Channel,
    observer: Connection,
    och: lapin::Channel,
    q: &'static str,
}

impl Clients {
    async fn new(uri: &str, q: &'static str) -> Clients {
        let publisher = Connection::connect(uri, ConnectionProperties::default())
            .await
            .unwrap();
        let pch = publisher.create_channel().await.unwrap();
        let observer = Connection::connect(uri, ConnectionProperties::default())
            .await
            .unwrap();
        let och = observer.create_channel().await.unwrap();
        och.queue_declare(q, QueueDeclareOptions::default(), FieldTable::default())
            .await
            .unwrap();
        let c = Clients {
            publisher,
            pch,
            observer,
            och,
            q,
        };
        c.pch
            .basic_publish(
                "",
                q,
                BasicPublishOptions::default(),
                b"1",
                BasicProperties::default(),
            )
            .await
            .unwrap();
        c.count_reaches(1).await;
        c
    }

    async fn count(&self) -> u32 {
        self.och
            .queue_declare(
                self.q,
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap()
            .message_count()
    }

    /// Wait (up to 2.5 s) until the queue holds `n`, then check it does.
    async fn count_reaches(&self, n: u32) {
        for _ in 0..50 {
            if self.count().await == n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(self.count().await, n);
    }

    /// Publish `body` from a task (lapin itself holds publishes while
    /// blocked).
    fn publish_held(&self, body: &'static [u8]) -> tokio::task::JoinHandle<lapin::Result<()>> {
        let (pch, q) = (self.pch.clone(), self.q);
        tokio::spawn(async move {
            pch.basic_publish(
                "",
                q,
                BasicPublishOptions::default(),
                body,
                BasicProperties::default(),
            )
            .await
            .map(|_| ())
        })
    }

    /// While blocked: the publisher is not read from, the observer is not
    /// blocked.
    async fn held_while_blocked(&self) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(
            self.count().await,
            1,
            "a blocked publisher is not read from"
        );
        assert!(
            !self.observer.status().blocked(),
            "non-publishers are not blocked"
        );
    }
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
    let c = Clients::new(&uri, "alarmq").await;

    // Any process is above a 1-byte watermark.
    core.set_memory_watermark(1);
    wait_for("the alarm", || core.memory_alarm()).await;
    wait_for("connection.blocked", || c.publisher.status().blocked()).await;
    let held = c.publish_held(b"2");
    c.held_while_blocked().await;

    core.set_memory_watermark(u64::MAX);
    wait_for("the alarm to clear", || !core.memory_alarm()).await;
    wait_for("connection.unblocked", || !c.publisher.status().blocked()).await;
    c.count_reaches(2).await;
    held.await.unwrap().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// GET `path` on the admin API at `admin` as guest: (status, JSON body).
fn api(admin: std::net::SocketAddr, path: &str) -> (u16, serde_json::Value) {
    let r = match ureq::get(&format!("http://{admin}{path}"))
        .set("authorization", "Basic Z3Vlc3Q6Z3Vlc3Q=")
        .call()
    {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{path}: {e}"),
    };
    let status = r.status();
    let text = r.into_string().unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or_default())
}

/// RabbitMQ's disk alarm: with less free space on the data directory's file
/// system than `disk_free_limit`, publishing connections (AMQP 0-9-1 and
/// Stream) get blocked and are not read from, the alarm health check fails
/// naming `disk`, and `/api/nodes` and `/metrics` show it; a limit under the
/// free space clears it and what was held goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disk_alarm_blocks_publishers_while_free_space_is_below_the_limit() {
    let dir = std::env::temp_dir().join(format!("warren-disk-alarm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let broker = warren::start(warren::Config::for_tests(&dir))
        .await
        .expect("start");
    let core = std::sync::Arc::clone(&broker.server.broker);
    let admin = broker.admin_addr().expect("admin listener");
    let uri = format!("amqp://guest:guest@{}/%2f", broker.amqp_addr());
    let c = Clients::new(&uri, "diskq").await;
    let env = rabbitmq_stream_client::Environment::builder()
        .host("127.0.0.1")
        .port(broker.stream_addr().expect("stream listener").port())
        .build()
        .await
        .expect("stream environment");
    env.stream_creator()
        .create("disk-s")
        .await
        .expect("create stream");
    let producer = env.producer().build("disk-s").await.expect("producer");
    let message = |body: &str| {
        rabbitmq_stream_client::types::Message::builder()
            .body(body.to_string())
            .build()
    };
    producer
        .send_with_confirm(message("s1"))
        .await
        .expect("confirmed before the alarm");
    wait_for("the node's free space measured", || {
        core.disk_free().is_some()
    })
    .await;
    assert_eq!(
        api(admin, "/api/health/checks/alarms").0,
        200,
        "no alarm yet"
    );
    assert_eq!(api(admin, "/api/nodes").1[0]["disk_free_alarm"], false);

    // More than any disk has free.
    core.set_disk_free_limit(u64::MAX);
    assert!(
        core.disk_alarm(),
        "set at once against the last free space measured"
    );
    wait_for("connection.blocked", || c.publisher.status().blocked()).await;
    let (status, body) = api(admin, "/api/health/checks/alarms");
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["alarms"][0]["resource"], "disk", "{body}");
    assert_eq!(api(admin, "/api/health/checks/local-alarms").0, 503);
    let node = &api(admin, "/api/nodes").1[0];
    assert_eq!(node["disk_free_alarm"], true, "{node}");
    assert_eq!(node["mem_alarm"], false, "{node}");
    assert_eq!(node["disk_free_limit"], u64::MAX, "{node}");
    let metrics = ureq::get(&format!("http://{admin}/metrics"))
        .call()
        .expect("metrics")
        .into_string()
        .unwrap_or_default();
    assert!(
        metrics.contains("\nrabbitmq_alarms_free_disk_space_watermark 1\n"),
        "{metrics}"
    );
    let held = c.publish_held(b"2");
    // A clone sends (the last handle's drop closes the producer, which the
    // task should not wait for).
    let sender = producer.clone();
    let stream_held = tokio::spawn(async move {
        sender
            .send_with_confirm(message("s2"))
            .await
            .map(|c| c.confirmed())
    });
    c.held_while_blocked().await;
    assert!(
        !stream_held.is_finished(),
        "a blocked stream publisher is not read from"
    );

    core.set_disk_free_limit(0);
    assert!(!core.disk_alarm());
    wait_for("connection.unblocked", || !c.publisher.status().blocked()).await;
    assert_eq!(api(admin, "/api/health/checks/alarms").0, 200);
    c.count_reaches(2).await;
    held.await.unwrap().unwrap();
    let confirmed = tokio::time::timeout(Duration::from_secs(10), stream_held)
        .await
        .expect("the held stream publish is answered")
        .unwrap();
    assert!(
        confirmed.expect("confirm"),
        "the held stream publish is confirmed"
    );
    producer.close().await.expect("producer closed");
    let _ = std::fs::remove_dir_all(&dir);
}
