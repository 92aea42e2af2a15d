//! Length limits (`x-max-length`, `x-max-length-bytes`) with each `x-overflow` mode,
//! plus which removals dead-letter (requeued expired messages) and which do not
//! (purge, delete).

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_length_drop_head_default() {
    let (_c, ch) = connect_channel().await;
    let q = xqueue(&ch, "len.drop", &[("x-max-length", int(2))]).await;
    for b in ["1", "2", "3"] {
        publish(&ch, "", &q, b.as_bytes()).await;
    }
    let qb = xqueue(&ch, "len.bytes", &[("x-max-length-bytes", int(10))]).await;
    for b in ["aaaa", "bbbb", "cccc"] {
        publish(&ch, "", &qb, b.as_bytes()).await;
    }
    wait_message_count(&ch, &q, 2).await;
    assert_eq!(drain(&ch, &q).await, ["2", "3"]);
    // 12 bytes > 10: the oldest goes.
    wait_message_count(&ch, &qb, 2).await;
    assert_eq!(drain(&ch, &qb).await, ["bbbb", "cccc"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_length_counts_ready_messages_only() {
    let (_c, ch) = connect_channel().await;
    let q = xqueue(&ch, "len.ready", &[("x-max-length", int(1))]).await;
    publish(&ch, "", &q, b"1").await;
    let first = wait_get_acked(&ch, &q).await;
    // "1" is unacked, not ready: "2" fits.
    publish(&ch, "", &q, b"2").await;
    wait_message_count(&ch, &q, 1).await;
    publish(&ch, "", &q, b"3").await;
    wait_message_count(&ch, &q, 1).await;
    t(first.acker.nack(BasicNackOptions {
        requeue: true,
        multiple: false,
    }))
    .await
    .unwrap();
    // RabbitMQ surprise: the requeue applies the limit: "1" goes back to the head and
    // drop-head drops it at once.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(drain(&ch, &q).await, ["3"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_length_reject_publish_nacks_under_confirms() {
    let (_c, ch) = connect_channel().await;
    let dlq = xqueue(&ch, "rp.dlq", &[]).await;
    let q = xqueue(
        &ch,
        "rp",
        &[
            ("x-max-length", int(2)),
            ("x-overflow", s("reject-publish")),
            ("x-dead-letter-exchange", s("")),
            ("x-dead-letter-routing-key", s(&dlq)),
        ],
    )
    .await;
    confirm_mode(&ch).await;
    let mut acks = vec![];
    for b in ["1", "2", "3"] {
        let c = publish_with(
            &ch,
            "",
            &q,
            BasicPublishOptions::default(),
            BasicProperties::default(),
            b.as_bytes(),
        )
        .await
        .unwrap();
        acks.push(c.is_ack());
    }
    assert_eq!(acks, [true, true, false]);
    // reject-publish does not dead-letter the refused message.
    assert_eq!(message_count(&ch, &dlq).await, 0);
    assert_eq!(drain(&ch, &q).await, ["1", "2"]);
    // Room again: accepted.
    let c = publish_with(
        &ch,
        "",
        &q,
        BasicPublishOptions::default(),
        BasicProperties::default(),
        b"4",
    )
    .await
    .unwrap();
    assert!(c.is_ack());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_length_reject_publish_dlx_dead_letters_refused() {
    let (_c, ch) = connect_channel().await;
    let dlq = xqueue(&ch, "rpd.dlq", &[]).await;
    let q = xqueue(
        &ch,
        "rpd",
        &[
            ("x-max-length", int(1)),
            ("x-overflow", s("reject-publish-dlx")),
            ("x-dead-letter-exchange", s("")),
            ("x-dead-letter-routing-key", s(&dlq)),
        ],
    )
    .await;
    confirm_mode(&ch).await;
    let mut acks = vec![];
    for b in ["1", "2"] {
        let c = publish_with(
            &ch,
            "",
            &q,
            BasicPublishOptions::default(),
            BasicProperties::default(),
            b.as_bytes(),
        )
        .await
        .unwrap();
        acks.push(c.is_ack());
    }
    assert_eq!(acks, [true, false]);
    let d = wait_get(&ch, &dlq).await;
    assert_eq!(body(&d), "2");
    assert_death(&x_death(&d)[0], 1, "maxlen", &q, "", &[&q], None);
    assert_eq!(drain(&ch, &q).await, ["1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_length_drop_head_dead_letters_head_and_confirms() {
    let (_c, ch) = connect_channel().await;
    let dlq = xqueue(&ch, "dh.dlq", &[]).await;
    let q = xqueue(
        &ch,
        "dh",
        &[
            ("x-max-length", int(1)),
            ("x-overflow", s("drop-head")),
            ("x-dead-letter-exchange", s("")),
            ("x-dead-letter-routing-key", s(&dlq)),
        ],
    )
    .await;
    confirm_mode(&ch).await;
    for b in ["old", "new"] {
        let c = publish_with(
            &ch,
            "",
            &q,
            BasicPublishOptions::default(),
            BasicProperties::default(),
            b.as_bytes(),
        )
        .await
        .unwrap();
        // drop-head always accepts the new message.
        assert!(c.is_ack());
    }
    let d = wait_get(&ch, &dlq).await;
    assert_eq!(body(&d), "old");
    assert_death(&x_death(&d)[0], 1, "maxlen", &q, "", &[&q], None);
    assert_eq!(drain(&ch, &q).await, ["new"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_length_drop_head_in_priority_queue() {
    let (_c, ch) = connect_channel().await;
    let q = xqueue(
        &ch,
        "len.prio",
        &[("x-max-length", int(2)), ("x-max-priority", int(5))],
    )
    .await;
    pub_prio(&ch, &q, "low", Some(1)).await;
    pub_prio(&ch, &q, "high", Some(5)).await;
    pub_prio(&ch, &q, "mid", Some(3)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    // RabbitMQ surprise: "head" is the next message to deliver, so a priority queue
    // drops its highest-priority message, not the oldest or the lowest.
    assert_eq!(drain(&ch, &q).await, ["mid", "low"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requeued_expired_message_is_dead_lettered_as_expired() {
    let (_c, ch) = connect_channel().await;
    let dlq = xqueue(&ch, "reexp.dlq", &[]).await;
    let q = xqueue(
        &ch,
        "reexp",
        &[
            ("x-message-ttl", int(60)),
            ("x-dead-letter-exchange", s("")),
            ("x-dead-letter-routing-key", s(&dlq)),
        ],
    )
    .await;
    publish(&ch, "", &q, b"late").await;
    // Unacked messages do not expire...
    let m = wait_get_acked(&ch, &q).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(message_count(&ch, &dlq).await, 0);
    // ...but once requeued past their TTL they expire at once.
    t(m.acker.nack(BasicNackOptions {
        requeue: true,
        multiple: false,
    }))
    .await
    .unwrap();
    let d = wait_get(&ch, &dlq).await;
    assert_eq!(body(&d), "late");
    assert_death(&x_death(&d)[0], 1, "expired", &q, "", &[&q], None);
    assert_eq!(message_count(&ch, &q).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_and_delete_do_not_dead_letter() {
    let (_c, ch) = connect_channel().await;
    let dlq = xqueue(&ch, "nodl.dlq", &[]).await;
    let dl = [
        ("x-dead-letter-exchange", s("")),
        ("x-dead-letter-routing-key", s(&dlq)),
    ];
    let q = xqueue(&ch, "nodl", &dl).await;
    for b in ["1", "2"] {
        publish(&ch, "", &q, b.as_bytes()).await;
    }
    wait_message_count(&ch, &q, 2).await;
    let purged = t(ch.queue_purge(&q, QueuePurgeOptions::default()))
        .await
        .unwrap();
    assert_eq!(purged, 2);
    publish(&ch, "", &q, b"3").await;
    wait_message_count(&ch, &q, 1).await;
    let deleted = t(ch.queue_delete(&q, QueueDeleteOptions::default()))
        .await
        .unwrap();
    assert_eq!(deleted, 1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(message_count(&ch, &dlq).await, 0);
}
