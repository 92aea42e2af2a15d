//! Queue expiry (`x-expires`): only an unused queue is deleted.

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_expires_deletes_unused_queue_only() {
    let conn = connect().await;
    let ch = t(conn.create_channel()).await.unwrap();
    let unused = uniq("expires");
    let used = uniq("expires.used");
    for q in [&unused, &used] {
        t(ch.queue_declare(
            q,
            QueueDeclareOptions::default(),
            table(&[("x-expires", int(150))]),
        ))
        .await
        .unwrap();
    }
    // A consumer keeps a queue in use.
    let _consumer = consume(&ch, &used, false, FieldTable::default()).await;
    // RabbitMQ surprise: a passive declare counts as a use and restarts the x-expires
    // timer, so polling for the deletion would keep the queue alive. Look once.
    tokio::time::sleep(Duration::from_millis(600)).await;
    wait_queue_gone(&conn, &unused).await;
    assert_eq!(message_count(&ch, &used).await, 0, "used queue still there");
    t(ch.queue_delete(&used, QueueDeleteOptions::default()))
        .await
        .unwrap();
}
