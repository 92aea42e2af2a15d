//! Queue declare/bind/purge/delete semantics.

mod common;

use common::*;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::Channel;

fn opts() -> QueueDeclareOptions {
    QueueDeclareOptions::default()
}

async fn passive(ch: &Channel, q: &str) -> lapin::Result<lapin::Queue> {
    t(ch.queue_declare(
        q,
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
}

async fn delete(ch: &Channel, q: &str) -> u32 {
    t(ch.queue_delete(q, QueueDeleteOptions::default()))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_named_queue() {
    let (_c, ch) = connect_channel().await;
    let q1 = t(ch.queue_declare(
        "",
        QueueDeclareOptions {
            exclusive: true,
            ..opts()
        },
        FieldTable::default(),
    ))
    .await
    .unwrap();
    let q2 = t(ch.queue_declare(
        "",
        QueueDeclareOptions {
            exclusive: true,
            ..opts()
        },
        FieldTable::default(),
    ))
    .await
    .unwrap();
    assert!(q1.name().as_str().starts_with("amq.gen-"), "{}", q1.name());
    assert_ne!(q1.name().as_str(), q2.name().as_str());
    assert_eq!((q1.message_count(), q1.consumer_count()), (0, 0));
    passive(&ch, q1.name().as_str()).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amq_prefixed_queue_name_is_access_refused() {
    let (_c, ch) = connect_channel().await;
    let r = t(ch.queue_declare(&format!("amq.{}", uniq("q")), opts(), FieldTable::default())).await;
    assert_code(r, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redeclare_server_named_queue_is_access_refused() {
    // RabbitMQ surprise: a server-named queue (amq.gen-...) cannot be re-declared
    // non-passively, even by its owner: the reserved `amq.` prefix check comes first (403).
    let conn = connect().await;
    let ch = t(conn.create_channel()).await.unwrap();
    let q = t(ch.queue_declare(
        "",
        QueueDeclareOptions {
            exclusive: true,
            ..opts()
        },
        FieldTable::default(),
    ))
    .await
    .unwrap();
    let name = q.name().as_str().to_string();
    assert_code(
        t(ch.queue_declare(
            &name,
            QueueDeclareOptions {
                exclusive: true,
                ..opts()
            },
            FieldTable::default(),
        ))
        .await,
        403,
    );
    // Passive declare works.
    let ch = t(conn.create_channel()).await.unwrap();
    passive(&ch, &name).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_declare() {
    let conn = connect().await;
    let ch = t(conn.create_channel()).await.unwrap();
    assert_code(passive(&ch, &uniq("missing")).await, 404);
    let ch = t(conn.create_channel()).await.unwrap();
    confirm_mode(&ch).await;
    let q = temp_queue(&ch, "p").await;
    publish_confirmed(&ch, "", &q, b"1").await;
    publish_confirmed(&ch, "", &q, b"2").await;
    let info = passive(&ch, &q).await.unwrap();
    assert_eq!(info.name().as_str(), q);
    assert_eq!(info.message_count(), 2);
    assert_eq!(info.consumer_count(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn durable_queue_and_redeclare_mismatch() {
    let conn = connect().await;
    let ch = t(conn.create_channel()).await.unwrap();
    let q = uniq("durable");
    t(ch.queue_declare(
        &q,
        QueueDeclareOptions {
            durable: true,
            ..opts()
        },
        FieldTable::default(),
    ))
    .await
    .unwrap();
    // Same attributes: fine.
    t(ch.queue_declare(
        &q,
        QueueDeclareOptions {
            durable: true,
            ..opts()
        },
        FieldTable::default(),
    ))
    .await
    .unwrap();
    // Different durable flag: 406.
    assert_code(
        t(ch.queue_declare(&q, opts(), FieldTable::default())).await,
        406,
    );
    // Different auto-delete: 406.
    let ch = t(conn.create_channel()).await.unwrap();
    assert_code(
        t(ch.queue_declare(
            &q,
            QueueDeclareOptions {
                durable: true,
                auto_delete: true,
                ..opts()
            },
            FieldTable::default(),
        ))
        .await,
        406,
    );
    // Different arguments: 406.
    let ch = t(conn.create_channel()).await.unwrap();
    let mut args = FieldTable::default();
    args.insert("x-message-ttl".into(), AMQPValue::LongInt(1000));
    assert_code(
        t(ch.queue_declare(
            &q,
            QueueDeclareOptions {
                durable: true,
                ..opts()
            },
            args,
        ))
        .await,
        406,
    );
    // Passive ignores the flags.
    let ch = t(conn.create_channel()).await.unwrap();
    passive(&ch, &q).await.unwrap();
    delete(&ch, &q).await;
    assert_code(passive(&ch, &q).await, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusive_queue_locked_for_others_and_deleted_on_close() {
    let owner = connect().await;
    let och = t(owner.create_channel()).await.unwrap();
    let q = temp_queue(&och, "excl").await;
    let other = connect().await;
    // Declaring it from another connection: 405 RESOURCE_LOCKED.
    let ch = t(other.create_channel()).await.unwrap();
    assert_code(
        t(ch.queue_declare(
            &q,
            QueueDeclareOptions {
                exclusive: true,
                ..opts()
            },
            FieldTable::default(),
        ))
        .await,
        405,
    );
    let ch = t(other.create_channel()).await.unwrap();
    assert_code(
        t(ch.queue_declare(&q, opts(), FieldTable::default())).await,
        405,
    );
    // Passive declare from another connection is also 405 on RabbitMQ.
    let ch = t(other.create_channel()).await.unwrap();
    assert_code(passive(&ch, &q).await, 405);
    // Consuming from another connection: 405.
    let ch = t(other.create_channel()).await.unwrap();
    assert_code(
        t(ch.basic_consume(
            &q,
            "",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ))
        .await,
        405,
    );
    // The owner redeclaring it without `exclusive`: 405 too, as RabbitMQ's
    // strict exclusive check answers (aiormq's suite expects it), not 406.
    let och1 = t(owner.create_channel()).await.unwrap();
    assert_code(
        t(och1.queue_declare(&q, opts(), FieldTable::default())).await,
        405,
    );
    // And a non-exclusive queue redeclared `exclusive`: 405.
    let shared = uniq("shared");
    let och1 = t(owner.create_channel()).await.unwrap();
    let auto = QueueDeclareOptions {
        auto_delete: true,
        ..opts()
    };
    t(och1.queue_declare(&shared, auto, FieldTable::default()))
        .await
        .unwrap();
    assert_code(
        t(och1.queue_declare(
            &shared,
            QueueDeclareOptions {
                exclusive: true,
                ..opts()
            },
            FieldTable::default(),
        ))
        .await,
        405,
    );
    // The owner can use it from another channel of the same connection.
    let och2 = t(owner.create_channel()).await.unwrap();
    passive(&och2, &q).await.unwrap();
    t(och2.basic_consume(
        &q,
        "",
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await
    .unwrap();
    // When the owner closes, the queue vanishes.
    t(owner.close(200, "")).await.unwrap();
    wait_queue_gone(&other, &q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_delete_after_last_consumer_cancels() {
    let conn = connect().await;
    let ch = t(conn.create_channel()).await.unwrap();
    let q = uniq("autodel");
    t(ch.queue_declare(
        &q,
        QueueDeclareOptions {
            auto_delete: true,
            ..opts()
        },
        FieldTable::default(),
    ))
    .await
    .unwrap();
    let c1 = t(ch.basic_consume(
        &q,
        "c1",
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await
    .unwrap();
    let c2 = t(ch.basic_consume(
        &q,
        "c2",
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await
    .unwrap();
    assert_eq!(passive(&ch, &q).await.unwrap().consumer_count(), 2);
    t(ch.basic_cancel(c1.tag().as_str(), BasicCancelOptions::default()))
        .await
        .unwrap();
    // One consumer left: still there.
    assert_eq!(passive(&ch, &q).await.unwrap().consumer_count(), 1);
    t(ch.basic_cancel(c2.tag().as_str(), BasicCancelOptions::default()))
        .await
        .unwrap();
    wait_queue_gone(&conn, &q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_delete_queue_without_consumers_survives() {
    // An auto-delete queue that never had a consumer is not deleted.
    let (_conn, ch) = connect_channel().await;
    let q = uniq("autodel-never");
    t(ch.queue_declare(
        &q,
        QueueDeclareOptions {
            auto_delete: true,
            ..opts()
        },
        FieldTable::default(),
    ))
    .await
    .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    passive(&ch, &q).await.unwrap();
    delete(&ch, &q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declare_ok_counts_exclude_unacked() {
    let (_conn, ch) = connect_channel().await;
    confirm_mode(&ch).await;
    let q = temp_queue(&ch, "counts").await;
    for i in 0..3 {
        publish_confirmed(&ch, "", &q, format!("m{i}").as_bytes()).await;
    }
    let d = t(ch.queue_declare(
        &q,
        QueueDeclareOptions {
            exclusive: true,
            ..opts()
        },
        FieldTable::default(),
    ))
    .await
    .unwrap();
    assert_eq!((d.message_count(), d.consumer_count()), (3, 0));
    let cch = t(_conn.create_channel()).await.unwrap();
    t(cch.basic_qos(1, BasicQosOptions::default()))
        .await
        .unwrap();
    let mut consumer = t(cch.basic_consume(
        &q,
        "",
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await
    .unwrap();
    let first = next_delivery(&mut consumer).await;
    assert_eq!(first.data, b"m0");
    // One unacked message is not counted as ready.
    let d = passive(&ch, &q).await.unwrap();
    assert_eq!((d.message_count(), d.consumer_count()), (2, 1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bind_and_unbind() {
    let conn = connect().await;
    let ch = t(conn.create_channel()).await.unwrap();
    confirm_mode(&ch).await;
    let q = temp_queue(&ch, "bind").await;
    let key = uniq("key");
    t(ch.queue_bind(
        &q,
        "amq.direct",
        &key,
        QueueBindOptions::default(),
        FieldTable::default(),
    ))
    .await
    .unwrap();
    publish_confirmed(&ch, "amq.direct", &key, b"bound").await;
    assert_eq!(drain(&ch, &q).await, vec!["bound"]);
    t(ch.queue_unbind(&q, "amq.direct", &key, FieldTable::default()))
        .await
        .unwrap();
    publish_confirmed(&ch, "amq.direct", &key, b"unbound").await;
    assert_eq!(message_count(&ch, &q).await, 0);
    // Unbinding a binding that does not exist is OK on RabbitMQ, and so is
    // unbinding a missing queue or from a missing exchange
    // (`rabbit_binding:remove` ignores missing ends).
    t(ch.queue_unbind(&q, "amq.direct", &key, FieldTable::default()))
        .await
        .unwrap();
    t(ch.queue_unbind(&uniq("noq"), "amq.direct", &key, FieldTable::default()))
        .await
        .expect("unbind of a missing queue");
    t(ch.queue_unbind(&q, &uniq("nox"), &key, FieldTable::default()))
        .await
        .expect("unbind from a missing exchange");
    // The default exchange stays refused (403), as a bind.
    let ch4 = t(conn.create_channel()).await.unwrap();
    assert_code(
        t(ch4.queue_unbind(&q, "", &q, FieldTable::default())).await,
        403,
    );
    // Binding to a missing exchange: 404.
    let ch2 = t(conn.create_channel()).await.unwrap();
    assert_code(
        t(ch2.queue_bind(
            &q,
            &uniq("nox"),
            "k",
            QueueBindOptions::default(),
            FieldTable::default(),
        ))
        .await,
        404,
    );
    // Binding a missing queue: 404.
    let ch3 = t(conn.create_channel()).await.unwrap();
    assert_code(
        t(ch3.queue_bind(
            &uniq("noq"),
            "amq.direct",
            "k",
            QueueBindOptions::default(),
            FieldTable::default(),
        ))
        .await,
        404,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_returns_count() {
    let (_conn, ch) = connect_channel().await;
    confirm_mode(&ch).await;
    let q = temp_queue(&ch, "purge").await;
    for _ in 0..4 {
        publish_confirmed(&ch, "", &q, b"x").await;
    }
    assert_eq!(
        t(ch.queue_purge(&q, QueuePurgeOptions::default()))
            .await
            .unwrap(),
        4
    );
    assert_eq!(message_count(&ch, &q).await, 0);
    assert_eq!(
        t(ch.queue_purge(&q, QueuePurgeOptions::default()))
            .await
            .unwrap(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_does_not_touch_unacked() {
    let (_conn, ch) = connect_channel().await;
    confirm_mode(&ch).await;
    let q = temp_queue(&ch, "purge-unacked").await;
    for _ in 0..3 {
        publish_confirmed(&ch, "", &q, b"x").await;
    }
    let m = t(ch.basic_get(&q, BasicGetOptions { no_ack: false }))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        t(ch.queue_purge(&q, QueuePurgeOptions::default()))
            .await
            .unwrap(),
        2
    );
    // The unacked one comes back when rejected.
    t(ch.basic_reject(
        m.delivery.delivery_tag,
        BasicRejectOptions { requeue: true },
    ))
    .await
    .unwrap();
    wait_message_count(&ch, &q, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_returns_message_count() {
    let (_conn, ch) = connect_channel().await;
    confirm_mode(&ch).await;
    let q = uniq("del");
    declare_queue(&ch, &q).await;
    for _ in 0..3 {
        publish_confirmed(&ch, "", &q, b"x").await;
    }
    assert_eq!(delete(&ch, &q).await, 3);
    assert_code(passive(&ch, &q).await, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_missing_queue_is_ok() {
    // RabbitMQ (3.x): queue.delete of a missing queue succeeds with message-count 0.
    let (_conn, ch) = connect_channel().await;
    assert_eq!(delete(&ch, &uniq("never")).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_if_empty_refuses_non_empty() {
    let conn = connect().await;
    let ch = t(conn.create_channel()).await.unwrap();
    confirm_mode(&ch).await;
    let q = uniq("ifempty");
    declare_queue(&ch, &q).await;
    publish_confirmed(&ch, "", &q, b"x").await;
    let r = t(ch.queue_delete(
        &q,
        QueueDeleteOptions {
            if_empty: true,
            ..Default::default()
        },
    ))
    .await;
    assert_code(r, 406);
    let ch = t(conn.create_channel()).await.unwrap();
    assert_eq!(message_count(&ch, &q).await, 1);
    t(ch.queue_purge(&q, QueuePurgeOptions::default()))
        .await
        .unwrap();
    assert_eq!(
        t(ch.queue_delete(
            &q,
            QueueDeleteOptions {
                if_empty: true,
                ..Default::default()
            }
        ))
        .await
        .unwrap(),
        0
    );
    assert_code(passive(&ch, &q).await, 404);
    // A message delivered and not yet acked does not count: RabbitMQ's
    // if-empty looks at ready messages (aio-pika deletes a queue it just
    // read with basic.get so).
    let q = uniq("ifempty.unacked");
    let ch = t(conn.create_channel()).await.unwrap();
    declare_queue(&ch, &q).await;
    confirm_mode(&ch).await;
    publish_confirmed(&ch, "", &q, b"y").await;
    let got = t(ch.basic_get(&q, BasicGetOptions::default()))
        .await
        .expect("get");
    assert!(got.is_some(), "the message is delivered");
    let del = t(ch.queue_delete(
        &q,
        QueueDeleteOptions {
            if_empty: true,
            ..Default::default()
        },
    ))
    .await;
    assert_eq!(del.expect("if-empty with an unacked delivery"), 0);
    let ch = t(conn.create_channel()).await.unwrap();
    assert_code(passive(&ch, &q).await, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_if_unused_refuses_with_consumer() {
    let conn = connect().await;
    let ch = t(conn.create_channel()).await.unwrap();
    let q = uniq("ifunused");
    declare_queue(&ch, &q).await;
    let cch = t(conn.create_channel()).await.unwrap();
    let consumer = t(cch.basic_consume(
        &q,
        "",
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await
    .unwrap();
    let r = t(ch.queue_delete(
        &q,
        QueueDeleteOptions {
            if_unused: true,
            ..Default::default()
        },
    ))
    .await;
    assert_code(r, 406);
    t(cch.basic_cancel(consumer.tag().as_str(), BasicCancelOptions::default()))
        .await
        .unwrap();
    let ch = t(conn.create_channel()).await.unwrap();
    t(ch.queue_delete(
        &q,
        QueueDeleteOptions {
            if_unused: true,
            ..Default::default()
        },
    ))
    .await
    .unwrap();
    assert_code(passive(&ch, &q).await, 404);
}
