//! Publisher confirms (confirm.select) and transactions (tx.*).

mod common;

use common::*;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::BasicProperties;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirms_ack_every_publish() {
    let (_c, ch) = connect_channel().await;
    confirm_mode(&ch).await;
    let q = temp_queue(&ch, "confirm").await;
    let mut pending = vec![];
    for i in 0..50 {
        pending.push(
            t(ch.basic_publish(
                "",
                &q,
                BasicPublishOptions::default(),
                format!("{i}").as_bytes(),
                BasicProperties::default(),
            ))
            .await
            .unwrap(),
        );
    }
    // Acks may fold several publishes (multiple=true); lapin resolves each one.
    for p in pending {
        let c = t(p).await.unwrap();
        assert!(c.is_ack(), "{c:?}");
    }
    assert!(t(ch.wait_for_confirms()).await.unwrap().is_empty());
    assert_eq!(message_count(&ch, &q).await, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirms_for_unroutable_and_persistent() {
    let (_c, ch) = connect_channel().await;
    confirm_mode(&ch).await;
    // Unroutable: acked (nothing to store).
    publish_confirmed(&ch, "amq.topic", &uniq("nobody"), b"x").await;
    // Persistent message to a durable queue: acked once stored.
    let q = uniq("durable-confirm");
    t(ch.queue_declare(
        &q,
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .unwrap();
    let c = publish_with(
        &ch,
        "",
        &q,
        BasicPublishOptions::default(),
        BasicProperties::default().with_delivery_mode(2),
        b"p",
    )
    .await
    .unwrap();
    assert!(c.is_ack());
    assert_eq!(
        t(ch.queue_delete(&q, QueueDeleteOptions::default()))
            .await
            .unwrap(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirm_select_is_idempotent() {
    let (_c, ch) = connect_channel().await;
    confirm_mode(&ch).await;
    confirm_mode(&ch).await;
    let q = temp_queue(&ch, "c2").await;
    publish_confirmed(&ch, "", &q, b"x").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn confirm_select_on_tx_channel_is_precondition_failed() {
    let (conn, ch) = connect_channel().await;
    t(ch.tx_select()).await.unwrap();
    assert_code(
        t(ch.confirm_select(ConfirmSelectOptions::default())).await,
        406,
    );
    let ch2 = t(conn.create_channel()).await.unwrap();
    confirm_mode(&ch2).await;
    assert_code(t(ch2.tx_select()).await, 406);
    assert!(conn.status().connected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_commit_and_rollback_publishes() {
    let conn = connect().await;
    let ch = t(conn.create_channel()).await.unwrap();
    let q = temp_queue(&ch, "tx").await;
    let tx = t(conn.create_channel()).await.unwrap();
    t(tx.tx_select()).await.unwrap();
    for i in 0..3 {
        publish(&tx, "", &q, format!("rolled-back-{i}").as_bytes()).await;
    }
    // Nothing is visible before commit.
    assert_eq!(message_count(&ch, &q).await, 0);
    t(tx.tx_rollback()).await.unwrap();
    assert_eq!(message_count(&ch, &q).await, 0);
    publish(&tx, "", &q, b"c1").await;
    publish(&tx, "", &q, b"c2").await;
    assert_eq!(message_count(&ch, &q).await, 0);
    t(tx.tx_commit()).await.unwrap();
    // After commit-ok, the messages are in the queue.
    assert_eq!(message_count(&ch, &q).await, 2);
    assert_eq!(drain(&ch, &q).await, vec!["c1", "c2"]);
    // The channel stays transactional after commit: next publish needs another commit.
    publish(&tx, "", &q, b"c3").await;
    assert_eq!(message_count(&ch, &q).await, 0);
    t(tx.tx_commit()).await.unwrap();
    assert_eq!(drain(&ch, &q).await, vec!["c3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_uncommitted_publishes_dropped_on_close() {
    let conn = connect().await;
    let ch = t(conn.create_channel()).await.unwrap();
    let q = temp_queue(&ch, "txclose").await;
    let tx = t(conn.create_channel()).await.unwrap();
    t(tx.tx_select()).await.unwrap();
    publish(&tx, "", &q, b"never").await;
    t(tx.close(200, "")).await.unwrap();
    assert_eq!(message_count(&ch, &q).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_acks() {
    let conn = connect().await;
    let ch = t(conn.create_channel()).await.unwrap();
    let q = temp_queue(&ch, "txack").await;
    for i in 0..2 {
        publish(&ch, "", &q, format!("m{i}").as_bytes()).await;
    }
    wait_message_count(&ch, &q, 2).await;

    // Ack inside a rolled-back transaction: the ack is discarded, the messages stay
    // unacked and come back when the channel closes.
    let tx = t(conn.create_channel()).await.unwrap();
    t(tx.tx_select()).await.unwrap();
    let mut last = 0;
    for _ in 0..2 {
        last = t(tx.basic_get(&q, BasicGetOptions::default()))
            .await
            .unwrap()
            .unwrap()
            .delivery
            .delivery_tag;
    }
    t(tx.basic_ack(last, BasicAckOptions { multiple: true }))
        .await
        .unwrap();
    t(tx.tx_rollback()).await.unwrap();
    t(tx.close(200, "")).await.unwrap();
    wait_message_count(&ch, &q, 2).await;

    // Ack inside a committed transaction: the messages are gone for good.
    let tx = t(conn.create_channel()).await.unwrap();
    t(tx.tx_select()).await.unwrap();
    for _ in 0..2 {
        let m = t(tx.basic_get(&q, BasicGetOptions::default()))
            .await
            .unwrap()
            .unwrap();
        assert!(m.delivery.redelivered);
        last = m.delivery.delivery_tag;
    }
    t(tx.basic_ack(last, BasicAckOptions { multiple: true }))
        .await
        .unwrap();
    t(tx.tx_commit()).await.unwrap();
    t(tx.close(200, "")).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    assert_eq!(message_count(&ch, &q).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tx_commit_without_select_is_precondition_failed() {
    let (conn, ch) = connect_channel().await;
    assert_code(t(ch.tx_commit()).await, 406);
    let ch2 = t(conn.create_channel()).await.unwrap();
    assert_code(t(ch2.tx_rollback()).await, 406);
    assert!(conn.status().connected());
}
