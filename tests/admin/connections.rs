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
    // A trailing slash routes the same (RabbitMQ's router ignores it).
    assert_eq!(
        b.get("/api/connections/").await[0]["name"],
        conns[0]["name"]
    );
    let c = &conns[0];
    assert_eq!(c["user"], "guest");
    assert_eq!(c["vhost"], "/");
    assert_eq!(c["channels"], 1);
    assert_eq!(c["protocol"], "AMQP 0-9-1");
    // No connection_name client property: no user_provided_name.
    assert!(c.get("user_provided_name").is_none(), "{c}");
    let name = c["name"].as_str().unwrap().to_string();
    // One that names itself is shown with that name, as RabbitMQ shows it.
    let named = Connection::connect(
        &format!("amqp://guest:guest@{}/%2f", b.amqp),
        common::props().with_connection_name("billing-worker".into()),
    )
    .await
    .unwrap();
    let all = b.get("/api/connections").await;
    let provided: Vec<&Value> = all
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|c| c.get("user_provided_name"))
        .collect();
    assert_eq!(provided, [&json!("billing-worker")]);
    named.close(200, "bye").await.unwrap();
    let chans = b.get("/api/channels").await;
    assert_eq!(chans[0]["number"], 1);
    assert_eq!(chans[0]["consumer_count"], 1);
    let cons = b.get("/api/consumers").await;
    assert_eq!(cons[0]["consumer_tag"], "ctag");
    assert_eq!(cons[0]["queue"]["name"], "cq");
    assert_eq!(cons[0]["prefetch_count"], 7);
    assert_eq!(cons[0]["channel_details"]["connection_name"], name);
    assert_eq!(
        cons[0]["channel_details"]["node"],
        b.get("/api/overview").await["node"]
    );
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

/// `path` of `b` polled (with a deadline) until `ok` holds for its body.
async fn until(b: &Broker, path: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let body = b.get(path).await;
        if ok(&body) {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{path} never matched: {body:#}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

fn counter(c: &Value, field: &str) -> u64 {
    c[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} missing: {c:#}"))
}

/// An AMQP 0-9-1 connection's socket counters: `recv_oct` grows by at least
/// the bytes published, `send_oct` by at least the bytes delivered, the
/// read/write counts with them, and the byte rates are there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_connection_byte_counters() {
    let b = start().await;
    let conn = b.amqp("guest", "guest", "/").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch.queue_declare(
        "octets",
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    let conns = b.get("/api/connections").await;
    let c = &conns[0];
    assert_eq!(c["protocol"], "AMQP 0-9-1");
    let name = c["name"].as_str().unwrap().to_string();
    let path = format!(
        "/api/connections/{}",
        name.replace(' ', "%20")
            .replace('>', "%3E")
            .replace(':', "%3A")
    );
    let before = b.get(&path).await;
    let (recv0, send0) = (counter(&before, "recv_oct"), counter(&before, "send_oct"));
    // The handshake and the declare went both ways already.
    assert!(recv0 > 0 && send0 > 0, "{before:#}");
    assert!(counter(&before, "recv_cnt") >= 1, "{before:#}");
    assert!(counter(&before, "send_cnt") >= 1, "{before:#}");
    assert!(before["recv_oct_details"]["rate"].is_number(), "{before:#}");
    assert!(before["send_oct_details"]["rate"].is_number(), "{before:#}");

    const N: usize = 20;
    const SIZE: usize = 1000;
    for _ in 0..N {
        ch.basic_publish(
            "",
            "octets",
            BasicPublishOptions::default(),
            &[b'p'; SIZE],
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    let published = until(&b, &path, |c| {
        c["recv_oct"]
            .as_u64()
            .is_some_and(|n| n >= recv0 + (N * SIZE) as u64)
    })
    .await;
    assert!(
        counter(&published, "recv_cnt") > counter(&before, "recv_cnt"),
        "{published:#}"
    );
    let send1 = counter(&published, "send_oct");

    for _ in 0..N {
        let got = ch
            .basic_get("octets", BasicGetOptions { no_ack: true })
            .await
            .unwrap()
            .expect("a message");
        assert_eq!(got.delivery.data.len(), SIZE);
    }
    let consumed = until(&b, &path, |c| {
        c["send_oct"]
            .as_u64()
            .is_some_and(|n| n >= send1 + (N * SIZE) as u64)
    })
    .await;
    assert!(
        counter(&consumed, "send_cnt") > counter(&published, "send_cnt"),
        "{consumed:#}"
    );
    // The list shows the same counters.
    let listed = b.get("/api/connections").await;
    assert!(counter(&listed[0], "send_oct") >= counter(&consumed, "send_oct"));
    assert!(counter(&listed[0], "recv_oct") >= counter(&consumed, "recv_oct"));
}

/// The channel listed with `number` on the (only) connection.
async fn channel(b: &Broker, number: u16, ok: impl Fn(&Value) -> bool) -> Value {
    until(b, "/api/channels", |v| {
        v.as_array()
            .and_then(|a| a.iter().find(|c| c["number"] == number))
            .is_some_and(&ok)
    })
    .await
    .as_array()
    .and_then(|a| a.iter().find(|c| c["number"] == number).cloned())
    .expect("channel listed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_show_prefetch_modes_unacked_uncommitted_and_message_stats() {
    use futures::StreamExt;
    let b = start().await;
    let conn = b.amqp("guest", "guest", "/").await.unwrap();
    let ch = t(conn.create_channel()).await.unwrap();
    t(ch.queue_declare("chq", QueueDeclareOptions::default(), FieldTable::default()))
        .await
        .unwrap();
    t(ch.basic_qos(5, BasicQosOptions::default()))
        .await
        .unwrap();
    t(ch.basic_qos(20, BasicQosOptions { global: true }))
        .await
        .unwrap();
    t(ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .unwrap();
    for _ in 0..3 {
        publish_confirmed(&ch, "chq").await;
    }
    t(ch.basic_publish(
        "",
        "nowhere",
        BasicPublishOptions::default(),
        b"lost",
        BasicProperties::default(),
    ))
    .await
    .unwrap()
    .await
    .unwrap();
    let mut consumer = t(ch.basic_consume(
        "chq",
        "c",
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await
    .unwrap();
    let mut last = None;
    for _ in 0..3 {
        last = Some(t(consumer.next()).await.unwrap().unwrap());
    }
    let c = channel(&b, 1, |c| c["messages_unacknowledged"] == 3).await;
    assert_eq!(c["prefetch_count"], 5, "{c}");
    assert_eq!(c["global_prefetch_count"], 20);
    assert_eq!(c["confirm"], true);
    assert_eq!(c["transactional"], false);
    assert_eq!(c["messages_unconfirmed"], 0, "every publish was confirmed");
    assert_eq!(c["message_stats"]["publish"], 4);
    assert_eq!(c["message_stats"]["drop_unroutable"], 1);
    assert_eq!(c["message_stats"]["deliver"], 3);
    let d = last.expect("a delivery");
    t(d.acker.ack(BasicAckOptions { multiple: true }))
        .await
        .unwrap();
    let c = channel(&b, 1, |c| c["messages_unacknowledged"] == 0).await;
    assert_eq!(c["message_stats"]["ack"], 3, "{c}");

    // A transaction holds its publishes and acks until commit.
    let tx = t(conn.create_channel()).await.unwrap();
    t(tx.tx_select()).await.unwrap();
    t(tx.basic_publish(
        "",
        "chq",
        BasicPublishOptions::default(),
        b"held",
        BasicProperties::default(),
    ))
    .await
    .unwrap();
    let n = tx.id();
    let c = channel(&b, n, |c| c["messages_uncommitted"] == 1).await;
    assert_eq!(c["transactional"], true, "{c}");
    assert_eq!(c["confirm"], false);
    t(tx.tx_commit()).await.unwrap();
    let c = channel(&b, n, |c| c["messages_uncommitted"] == 0).await;
    assert_eq!(c["message_stats"]["publish"], 1, "{c}");

    // One channel by name, a connection's channels, a vhost's channels.
    let enc = enc_path;
    let name = c["name"].as_str().expect("name").to_string();
    let one = b.get(&format!("/api/channels/{}", enc(&name))).await;
    assert_eq!(one["number"], n, "{one}");
    let conn_name = c["connection_details"]["name"]
        .as_str()
        .expect("connection");
    let of_conn = b
        .get(&format!("/api/connections/{}/channels", enc(conn_name)))
        .await;
    assert_eq!(of_conn.as_array().map(Vec::len), Some(2), "{of_conn}");
    let of_vhost = b.get("/api/vhosts/%2F/channels").await;
    assert_eq!(of_vhost.as_array().map(Vec::len), Some(2), "{of_vhost}");
    let (status, _) = b
        .call("GET", "/api/channels/nobody%20(1)", GUEST, None)
        .await;
    assert_eq!(status, 404);
    // The node's totals: 4 confirms (the unroutable publish is confirmed
    // too), 1 dropped, 4 deliveries to the consumer (the committed publish
    // too, so the get finds the queue empty), 5 publishes.
    let _ = t(ch.basic_get("chq", BasicGetOptions { no_ack: true })).await;
    let stats = until(&b, "/api/overview", |o| {
        o["message_stats"]["get_empty"] == 1
    })
    .await["message_stats"]
        .clone();
    assert_eq!(stats["confirm"], 4, "{stats}");
    assert_eq!(stats["drop_unroutable"], 1);
    assert_eq!(stats["return_unroutable"], 0);
    assert_eq!(stats["deliver"], 4);
    assert_eq!(stats["publish"], 5);
    let q = b.get("/api/queues/%2F/chq").await;
    let qs = &q["message_stats"];
    assert_eq!(
        (&qs["deliver"], &qs["get_empty"]),
        (&json!(4), &json!(1)),
        "{qs}"
    );
    assert_eq!((&qs["get"], &qs["deliver_no_ack"]), (&json!(0), &json!(0)));
    for k in [
        "deliver",
        "deliver_no_ack",
        "get",
        "get_no_ack",
        "get_empty",
    ] {
        assert!(qs[format!("{k}_details")]["rate"].is_number(), "{k}: {qs}");
    }
    // The vhost's channels counted the same (the only vhost here), with
    // rates, and its connections' bytes.
    let v = b.get("/api/vhosts/%2F").await;
    let vs = &v["message_stats"];
    for k in [
        "publish",
        "deliver_get",
        "ack",
        "redeliver",
        "deliver",
        "deliver_no_ack",
        "get",
        "get_no_ack",
        "get_empty",
        "confirm",
        "return_unroutable",
        "drop_unroutable",
    ] {
        assert_eq!(vs[k], stats[k], "{k}: {vs}");
        assert!(vs[format!("{k}_details")]["rate"].is_number(), "{k}: {vs}");
        assert!(stats[format!("{k}_details")]["rate"].is_number(), "{k}");
    }
    assert!(v["recv_oct"].as_u64().is_some_and(|n| n > 0), "{v}");
    assert!(v["send_oct"].as_u64().is_some_and(|n| n > 0), "{v}");
    assert!(v["recv_oct_details"]["rate"].is_number(), "{v}");

    // Churn: one connection, two channels, one queue declared and created;
    // closing a channel counts.
    t(tx.close(200, "done")).await.unwrap();
    let o = until(&b, "/api/overview", |o| {
        o["churn_rates"]["channel_closed"] == 1
    })
    .await;
    let churn = &o["churn_rates"];
    assert_eq!(churn["connection_created"], 1, "{churn}");
    assert_eq!(churn["channel_created"], 2);
    assert_eq!(churn["queue_declared"], 1);
    assert_eq!(churn["queue_created"], 1);
    assert_eq!(churn["queue_deleted"], 0);
    let node = &b.get("/api/nodes").await[0];
    assert_eq!(node["channel_created"], 2, "{node}");
    let m = parse_metrics(&b.text("/metrics").await);
    assert_eq!(metric(&m, "rabbitmq_channels_opened_total", ""), 2.0);
    assert_eq!(metric(&m, "rabbitmq_queues_created_total", ""), 1.0);

    // A redelivery counts on the node, its vhost and the queue.
    let before = b.get("/api/overview").await["message_stats"]["redeliver"].clone();
    assert_eq!(before, 0, "nothing redelivered yet");
    t(ch.basic_cancel(consumer.tag().as_str(), BasicCancelOptions::default()))
        .await
        .unwrap();
    t(ch.basic_publish(
        "",
        "chq",
        BasicPublishOptions::default(),
        b"again",
        BasicProperties::default(),
    ))
    .await
    .unwrap();
    let got = |ch: lapin::Channel| async move {
        loop {
            if let Some(m) = t(ch.basic_get("chq", BasicGetOptions::default()))
                .await
                .unwrap()
            {
                return m;
            }
        }
    };
    let first = got(ch.clone()).await;
    assert!(!first.delivery.redelivered);
    t(first
        .delivery
        .acker
        .reject(BasicRejectOptions { requeue: true }))
    .await
    .unwrap();
    let second = got(ch.clone()).await;
    assert!(second.delivery.redelivered);
    t(second.delivery.acker.ack(BasicAckOptions::default()))
        .await
        .unwrap();
    let o = until(&b, "/api/overview", |o| {
        o["message_stats"]["redeliver"] == 1
    })
    .await;
    assert_eq!(o["message_stats"]["redeliver"], 1);
    let v = b.get("/api/vhosts/%2F").await;
    assert_eq!(v["message_stats"]["redeliver"], 1, "{v}");
    let q = b.get("/api/queues/%2F/chq").await;
    assert_eq!(q["message_stats"]["redeliver"], 1, "{q}");
    let m = parse_metrics(&b.text("/metrics").await);
    assert_eq!(
        metric(&m, "rabbitmq_global_messages_redelivered_total", ""),
        1.0
    );

    // A vhost's bytes keep what its closed connections moved.
    let open = b.get("/api/vhosts/%2F").await;
    let (recv, send) = (open["recv_oct"].as_u64(), open["send_oct"].as_u64());
    t(conn.close(200, "bye")).await.unwrap();
    let closed = until(&b, "/api/vhosts/%2F", |v| v["connections"] == 0).await;
    assert!(closed["recv_oct"].as_u64() >= recv, "{closed}");
    assert!(closed["send_oct"].as_u64() >= send, "{closed}");
    assert!(recv.is_some_and(|n| n > 0), "{open}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queues_name_their_exclusive_and_single_active_consumers() {
    let b = start().await;
    let conn = b.amqp("guest", "guest", "/").await.unwrap();
    let ch = t(conn.create_channel()).await.unwrap();
    let mut sac = FieldTable::default();
    sac.insert(
        "x-single-active-consumer".into(),
        lapin::types::AMQPValue::Boolean(true),
    );
    t(ch.queue_declare("sacq", QueueDeclareOptions::default(), sac))
        .await
        .unwrap();
    t(ch.queue_declare("exq", QueueDeclareOptions::default(), FieldTable::default()))
        .await
        .unwrap();
    let mut keep = Vec::new();
    for tag in ["first", "second"] {
        keep.push(
            t(ch.basic_consume(
                "sacq",
                tag,
                BasicConsumeOptions::default(),
                FieldTable::default(),
            ))
            .await
            .unwrap(),
        );
    }
    keep.push(
        t(ch.basic_consume(
            "exq",
            "only",
            BasicConsumeOptions {
                exclusive: true,
                ..Default::default()
            },
            FieldTable::default(),
        ))
        .await
        .unwrap(),
    );
    let q = b.get("/api/queues/%2F/sacq").await;
    assert_eq!(q["single_active_consumer_tag"], "first", "{q}");
    assert_eq!(q["exclusive_consumer_tag"], Value::Null);
    let q = b.get("/api/queues/%2F/exq").await;
    assert_eq!(q["exclusive_consumer_tag"], "only", "{q}");
    let details = q["consumer_details"].as_array().expect("consumer_details");
    assert_eq!(details.len(), 1, "{q}");
    assert_eq!(details[0]["consumer_tag"], "only");
    assert_eq!(details[0]["exclusive"], true);
    assert_eq!(q["single_active_consumer_tag"], Value::Null);
    t(ch.basic_cancel("first", BasicCancelOptions::default()))
        .await
        .unwrap();
    let q = b.get("/api/queues/%2F/sacq").await;
    assert_eq!(q["single_active_consumer_tag"], "second", "{q}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_connections_are_listed_and_closed_together() {
    let b = start().await;
    let _one = b.amqp("guest", "guest", "/").await.unwrap();
    let _two = b.amqp("guest", "guest", "/").await.unwrap();
    let mine = b.get("/api/connections/username/guest").await;
    assert_eq!(mine.as_array().map(Vec::len), Some(2), "{mine}");
    assert_eq!(b.get("/api/connections/username/nobody").await, json!([]));
    let (status, _) = b
        .call("DELETE", "/api/connections/username/guest", GUEST, None)
        .await;
    assert_eq!(status, 204);
    until(&b, "/api/connections", |v| {
        v.as_array().is_some_and(Vec::is_empty)
    })
    .await;
}

/// Publish `m` to `queue` on a confirming channel and wait for its confirm.
async fn publish_confirmed(ch: &lapin::Channel, queue: &str) {
    t(ch.basic_publish(
        "",
        queue,
        BasicPublishOptions::default(),
        b"m",
        BasicProperties::default(),
    ))
    .await
    .unwrap()
    .await
    .unwrap();
}

/// `%`-encode a name for a path.
fn enc_path(name: &str) -> String {
    name.bytes()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                (c as char).to_string()
            } else {
                format!("%{c:02X}")
            }
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_rates_confirms_idle_since_and_consumers_as_rabbitmq_shows_them() {
    use futures::StreamExt;
    let b = start_with(|c| c.admin_sample_interval_secs = 1).await;
    let conn = b.amqp("guest", "guest", "/").await.unwrap();
    let ch = t(conn.create_channel()).await.unwrap();
    t(ch.queue_declare("rq", QueueDeclareOptions::default(), FieldTable::default()))
        .await
        .unwrap();
    t(ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .unwrap();
    // Publish until a sample has seen the channel's counts move.
    let mut published = 0;
    let busy = loop {
        for _ in 0..50 {
            publish_confirmed(&ch, "rq").await;
            published += 1;
        }
        let c = channel(&b, 1, |_| true).await;
        if c["message_stats"]["publish_details"]["rate"].as_f64() > Some(0.0) {
            break c;
        }
        assert!(published < 100_000, "no publish rate: {c:#}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    let ms = &busy["message_stats"];
    assert!(
        ms["confirm"].as_u64() >= Some(50),
        "confirms counted: {busy:#}"
    );
    assert!(
        ms["confirm_details"]["rate"].as_f64() > Some(0.0),
        "{busy:#}"
    );
    assert!(busy.get("idle_since").is_none(), "busy: {busy:#}");
    assert_eq!(busy["user_who_performed_action"], "guest");
    // Stopped: a later sample sees nothing move, and the channel is idle
    // since then; every confirm was counted.
    let idle = channel(&b, 1, |c| c.get("idle_since").is_some()).await;
    assert_eq!(idle["message_stats"]["publish"], published);
    assert_eq!(idle["message_stats"]["confirm"], published);
    assert_eq!(idle["message_stats"]["publish_details"]["rate"], 0.0);
    let since = idle["idle_since"].as_str().expect("a time");
    assert!(since.ends_with("+00:00") && since.contains('T'), "{since}");

    // One channel's page lists its consumers.
    let consuming = t(conn.create_channel()).await.unwrap();
    let mut consumer = t(consuming.basic_consume(
        "rq",
        "rc",
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await
    .unwrap();
    t(consumer.next()).await.unwrap().unwrap();
    let name = channel(&b, consuming.id(), |c| c["consumer_count"] == 1).await["name"]
        .as_str()
        .expect("name")
        .to_string();
    let one = b.get(&format!("/api/channels/{}", enc_path(&name))).await;
    let consumers = one["consumer_details"].as_array().expect("consumers");
    assert_eq!(consumers.len(), 1, "{one:#}");
    assert_eq!(consumers[0]["consumer_tag"], "rc");
    assert_eq!(consumers[0]["queue"]["name"], "rq");
    // Per exchange / per queue figures: RabbitMQ's `basic` rates mode
    // keeps none.
    assert_eq!(one["publishes"], json!([]));
    assert_eq!(one["deliveries"], json!([]));
    let publisher = b
        .get(&format!(
            "/api/channels/{}",
            enc_path(idle["name"].as_str().expect("name"))
        ))
        .await;
    assert_eq!(publisher["consumer_details"], json!([]), "{publisher:#}");
}
