//! Connections, channels and consumers as the API lists them, and closing a
//! connection from the API.

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_channels_consumers_and_force_close() {
    let b = start().await;
    let conn = b.amqp("guest", "guest", "/").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare("cq", QueueDeclareOptions::default(), FieldTable::default())
        .await
        .unwrap();
    ch.basic_qos(7, BasicQosOptions::default()).await.unwrap();
    let _consumer = ch
        .basic_consume(
            "cq",
            "ctag",
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let conns = b.get("/api/connections").await;
    assert_eq!(conns.as_array().unwrap().len(), 1);
    let c = &conns[0];
    assert_eq!(c["user"], "guest");
    assert_eq!(c["vhost"], "/");
    assert_eq!(c["channels"], 1);
    assert_eq!(c["protocol"], "AMQP 0-9-1");
    let name = c["name"].as_str().unwrap().to_string();
    let chans = b.get("/api/channels").await;
    assert_eq!(chans[0]["number"], 1);
    assert_eq!(chans[0]["consumer_count"], 1);
    let cons = b.get("/api/consumers").await;
    assert_eq!(cons[0]["consumer_tag"], "ctag");
    assert_eq!(cons[0]["queue"]["name"], "cq");
    assert_eq!(cons[0]["prefetch_count"], 7);
    assert_eq!(cons[0]["channel_details"]["connection_name"], name);
    assert_eq!(
        b.get("/api/consumers/%2F").await.as_array().unwrap().len(),
        1
    );
    assert_eq!(b.get("/api/queues/%2F/cq").await["consumers"], 1);

    let encoded: String = name
        .bytes()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                (c as char).to_string()
            } else {
                format!("%{c:02X}")
            }
        })
        .collect();
    assert_eq!(
        b.get(&format!("/api/connections/{encoded}")).await["name"],
        name
    );
    let errors = watch_connection(&conn);
    assert_eq!(
        b.call(
            "DELETE",
            &format!("/api/connections/{encoded}"),
            GUEST,
            None
        )
        .await
        .0,
        204
    );
    let e = t(errors).await.expect("connection closed");
    assert_eq!(code(&e), Some(320), "{e:?}");
    for _ in 0..50 {
        if b.get("/api/connections")
            .await
            .as_array()
            .unwrap()
            .is_empty()
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(b.get("/api/connections").await, json!([]));
    assert_eq!(
        b.call("DELETE", "/api/connections/nope", GUEST, None)
            .await
            .0,
        404
    );
}
