//! Quorum queues on one node, with lapin: the declaration rules and error texts
//! of RabbitMQ 4.0 (`rabbit_quorum_queue`, `rabbit_amqqueue:check_arguments_key`,
//! `rabbit_queue_type_util`), the delivery limit (default 20, `-1` for none),
//! `x-delivery-count` on redelivery, dead-lettering with reason `delivery_limit`,
//! `x-delivery-limit` on classic queues and through a `delivery-limit` policy, the
//! admin API's view (`type`, one replica), global QoS refused, and transient
//! messages kept across a restart (a quorum queue stores every message).

mod common;
#[allow(dead_code)]
#[path = "semantics/helpers.rs"]
mod helpers;

use helpers::*;

/// Declares a durable queue `name` with `args`.
async fn declare(ch: &Channel, name: &str, args: &[(&str, AMQPValue)]) -> lapin::Result<()> {
    t(ch.queue_declare(
        name,
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        table(args),
    ))
    .await
    .map(|_| ())
}

fn quorum() -> (&'static str, AMQPValue) {
    ("x-queue-type", s("quorum"))
}

async fn delete(ch: &Channel, name: &str) {
    t(ch.queue_delete(name, QueueDeleteOptions::default()))
        .await
        .expect("queue.delete");
}

/// The text of a 406 (channel closed), asserting the code.
#[track_caller]
fn text_406<T: std::fmt::Debug>(r: lapin::Result<T>) -> String {
    match r {
        Err(lapin::Error::ProtocolError(e)) => {
            assert_eq!(e.get_id(), 406, "{e:?}");
            e.get_message().as_str().to_string()
        }
        other => panic!("expected 406, got {other:?}"),
    }
}

/// A fanout dead-letter exchange with one (exclusive) queue bound to it.
async fn dead_letter_target(ch: &Channel) -> (String, String) {
    let dlx = uniq("qq.dlx");
    t(ch.exchange_declare(
        &dlx,
        lapin::ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .expect("exchange.declare");
    let dlq = xqueue(ch, "qq.dlq", &[]).await;
    t(ch.queue_bind(
        &dlq,
        &dlx,
        "",
        QueueBindOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("queue.bind");
    (dlx, dlq)
}

fn delivery_count(d: &Delivery) -> Option<i64> {
    match headers(d).get("x-delivery-count") {
        None => None,
        Some(AMQPValue::LongLongInt(n)) => Some(*n),
        Some(other) => panic!("x-delivery-count is not a long: {other:?}"),
    }
}

async fn nack_requeue(d: &Delivery) {
    t(d.acker.nack(BasicNackOptions {
        requeue: true,
        multiple: false,
    }))
    .await
    .expect("basic.nack");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declare_rules_and_error_texts() {
    let conn = connect().await;
    let ch = t(conn.create_channel()).await.unwrap();
    let q = uniq("qq.decl");
    declare(
        &ch,
        &q,
        &[quorum(), ("x-quorum-initial-group-size", int(3))],
    )
    .await
    .expect("durable quorum queue");
    // Redeclared alike: fine; passive: fine.
    declare(
        &ch,
        &q,
        &[quorum(), ("x-quorum-initial-group-size", int(3))],
    )
    .await
    .expect("redeclare");
    // Redeclared as classic (no type): inequivalent, in RabbitMQ's words.
    let msg = text_406(declare(&ch, &q, &[]).await);
    assert_eq!(
        msg,
        format!(
            "PRECONDITION_FAILED - inequivalent arg 'x-queue-type' for queue '{q}' in vhost '/': \
             received none but current is the value 'quorum' of type 'longstr'"
        )
    );
    let ch = t(conn.create_channel()).await.unwrap();
    delete(&ch, &q).await;

    // What a quorum queue cannot be, each with RabbitMQ's text.
    let cases: &[(&str, QueueDeclareOptions)] = &[
        (
            "non-durable",
            QueueDeclareOptions {
                durable: false,
                ..Default::default()
            },
        ),
        (
            "exclusive-owner",
            QueueDeclareOptions {
                durable: true,
                exclusive: true,
                ..Default::default()
            },
        ),
        (
            "auto-delete",
            QueueDeclareOptions {
                durable: true,
                auto_delete: true,
                ..Default::default()
            },
        ),
    ];
    for (property, opts) in cases {
        let ch = t(conn.create_channel()).await.unwrap();
        let name = uniq("qq.bad");
        let msg = text_406(t(ch.queue_declare(&name, *opts, table(&[quorum()]))).await);
        assert_eq!(
            msg,
            format!(
                "PRECONDITION_FAILED - invalid property '{property}' for queue '{name}' in vhost '/'"
            )
        );
    }
    // No server-named quorum queues.
    let ch = t(conn.create_channel()).await.unwrap();
    let msg = text_406(declare(&ch, "", &[quorum()]).await);
    assert_eq!(
        msg,
        "PRECONDITION_FAILED - Cannot declare a server-named queue for type rabbit_quorum_queue"
    );
    // Classic-only arguments are refused, naming the type.
    for (arg, v) in [("x-max-priority", int(5)), ("x-queue-mode", s("lazy"))] {
        let ch = t(conn.create_channel()).await.unwrap();
        let name = uniq("qq.arg");
        let msg = text_406(declare(&ch, &name, &[quorum(), (arg, v)]).await);
        assert_eq!(
            msg,
            format!(
                "PRECONDITION_FAILED - invalid arg '{arg}' for queue '{name}' in vhost '/' of queue type rabbit_quorum_queue"
            )
        );
    }
    // ... and quorum-only ones on a classic queue.
    let ch = t(conn.create_channel()).await.unwrap();
    let name = uniq("cq.arg");
    let msg = text_406(declare(&ch, &name, &[("x-quorum-initial-group-size", int(3))]).await);
    assert!(msg.ends_with("of queue type rabbit_classic_queue"), "{msg}");
    // Bad values.
    for (arg, v, why) in [
        ("x-quorum-initial-group-size", int(0), "{value_zero,0}"),
        (
            "x-dead-letter-strategy",
            s("sometimes"),
            "invalid_dlx_strategy",
        ),
        ("x-delivery-limit", s("ten"), "expected integer"),
    ] {
        let ch = t(conn.create_channel()).await.unwrap();
        let name = uniq("qq.val");
        let msg = text_406(declare(&ch, &name, &[quorum(), (arg, v)]).await);
        assert!(msg.contains(&format!("invalid arg '{arg}'")), "{msg}");
        assert!(msg.contains(why), "{msg}");
    }
    // An unknown type.
    let ch = t(conn.create_channel()).await.unwrap();
    let name = uniq("qq.type");
    let msg = text_406(declare(&ch, &name, &[("x-queue-type", s("fancy"))]).await);
    assert!(
        msg.contains("invalid arg 'x-queue-type'")
            && msg.contains("unsupported queue type 'fancy'"),
        "{msg}"
    );
    // Accepted as RabbitMQ accepts them: reject-publish-dlx (falls back to
    // drop-head), at-least-once with reject-publish, a negative delivery limit.
    for args in [
        vec![quorum(), ("x-overflow", s("reject-publish-dlx"))],
        vec![
            quorum(),
            ("x-dead-letter-strategy", s("at-least-once")),
            ("x-overflow", s("reject-publish")),
            ("x-dead-letter-exchange", s("some.dlx")),
        ],
        vec![quorum(), ("x-delivery-limit", int(-1))],
    ] {
        let ch = t(conn.create_channel()).await.unwrap();
        let name = uniq("qq.ok");
        declare(&ch, &name, &args).await.expect("accepted");
        delete(&ch, &name).await;
    }
    // A classic queue declared without a type is the same as one declared
    // `x-queue-type: classic`; redeclaring it as quorum is not.
    let ch = t(conn.create_channel()).await.unwrap();
    let name = uniq("cq.same");
    declare(&ch, &name, &[]).await.expect("classic");
    declare(&ch, &name, &[("x-queue-type", s("classic"))])
        .await
        .expect("classic == no type");
    let msg = text_406(declare(&ch, &name, &[quorum()]).await);
    assert!(
        msg.ends_with("received the value 'quorum' of type 'longstr' but current is none"),
        "{msg}"
    );
    let ch = t(conn.create_channel()).await.unwrap();
    delete(&ch, &name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_limit_is_20_then_dead_lettered_with_delivery_limit() {
    let (_c, ch) = connect_channel().await;
    let (dlx, dlq) = dead_letter_target(&ch).await;
    let q = uniq("qq.limit");
    declare(&ch, &q, &[quorum(), ("x-dead-letter-exchange", s(&dlx))])
        .await
        .expect("declare");
    pub_props(&ch, "", &q, "poison", BasicProperties::default()).await;
    // 21 deliveries: the first plain, then x-delivery-count 1..=20; the 21st
    // return goes past the limit of 20.
    for n in 0..=20 {
        let d = wait_get_acked(&ch, &q).await;
        assert_eq!(body(&d), "poison");
        assert_eq!(d.redelivered, n > 0, "delivery {n}");
        assert_eq!(delivery_count(&d), (n > 0).then_some(n), "delivery {n}");
        nack_requeue(&d).await;
    }
    let d = wait_get(&ch, &dlq).await;
    assert_eq!(body(&d), "poison");
    let deaths = x_death(&d);
    assert_eq!(deaths.len(), 1);
    assert_death(&deaths[0], 1, "delivery_limit", &q, "", &[&q], None);
    assert_first_last(&d, (&q, "delivery_limit", ""), (&q, "delivery_limit", ""));
    assert!(get(&ch, &q).await.is_none(), "gone from the source queue");
    delete(&ch, &q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn returns_by_consumer_and_channel_close_count_and_limit_drops_without_dlx() {
    let conn = connect().await;
    let ch = t(conn.create_channel()).await.unwrap();
    let q = uniq("qq.close");
    declare(&ch, &q, &[quorum(), ("x-delivery-limit", int(2))])
        .await
        .expect("declare");
    pub_props(&ch, "", &q, "m", BasicProperties::default()).await;
    // 1st delivery to a consumer, returned by closing its channel.
    let ch1 = t(conn.create_channel()).await.unwrap();
    t(ch1.basic_qos(1, BasicQosOptions::default()))
        .await
        .unwrap();
    let mut c1 = consume(&ch1, &q, false, FieldTable::default()).await;
    let d = next(&mut c1).await;
    assert_eq!(delivery_count(&d), None);
    t(ch1.close(200, "bye")).await.unwrap();
    // 2nd: x-delivery-count 1, nacked back by a consumer.
    let ch2 = t(conn.create_channel()).await.unwrap();
    let mut c2 = consume(&ch2, &q, false, FieldTable::default()).await;
    let d = next(&mut c2).await;
    assert!(d.redelivered);
    assert_eq!(delivery_count(&d), Some(1));
    // Cancelled first, so the return is not delivered straight back to it.
    t(ch2.basic_cancel(c2.tag().as_str(), BasicCancelOptions::default()))
        .await
        .expect("basic.cancel");
    nack_requeue(&d).await;
    // 3rd: count 2; its return goes past the limit of 2 and, with no
    // dead-letter exchange, drops it.
    let d = wait_get_acked(&ch, &q).await;
    assert_eq!(delivery_count(&d), Some(2));
    nack_requeue(&d).await;
    let ch3 = t(conn.create_channel()).await.unwrap();
    let (n, _) = passive(&ch3, &q).await;
    assert_eq!(n, 0, "dropped at the limit");
    assert!(get(&ch3, &q).await.is_none());
    delete(&ch3, &q).await;
}

async fn next(c: &mut Consumer) -> Delivery {
    use futures::StreamExt;
    t(c.next()).await.expect("a delivery").expect("delivery ok")
}

/// (ready messages, consumers) of `q`.
async fn passive(ch: &Channel, q: &str) -> (u32, u32) {
    let d = t(ch.queue_declare(
        q,
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .expect("passive declare");
    (d.message_count(), d.consumer_count())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unlimited_quorum_queue_still_counts() {
    let (_c, ch) = connect_channel().await;
    let q = uniq("qq.unlimited");
    declare(&ch, &q, &[quorum(), ("x-delivery-limit", int(-1))])
        .await
        .expect("declare");
    pub_props(&ch, "", &q, "m", BasicProperties::default()).await;
    for n in 0..25 {
        let d = wait_get_acked(&ch, &q).await;
        assert_eq!(delivery_count(&d), (n > 0).then_some(n));
        nack_requeue(&d).await;
    }
    let d = wait_get_acked(&ch, &q).await;
    assert_eq!(delivery_count(&d), Some(25));
    ack(&d).await;
    delete(&ch, &q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classic_queue_with_delivery_limit() {
    let (_c, ch) = connect_channel().await;
    let (dlx, dlq) = dead_letter_target(&ch).await;
    let q = xqueue(
        &ch,
        "cq.limit",
        &[
            ("x-delivery-limit", int(1)),
            ("x-dead-letter-exchange", s(&dlx)),
        ],
    )
    .await;
    pub_props(&ch, "", &q, "c", BasicProperties::default()).await;
    let d = wait_get_acked(&ch, &q).await;
    assert_eq!(delivery_count(&d), None);
    nack_requeue(&d).await;
    let d = wait_get_acked(&ch, &q).await;
    assert_eq!(delivery_count(&d), Some(1));
    nack_requeue(&d).await;
    let d = wait_get(&ch, &dlq).await;
    assert_death(&x_death(&d)[0], 1, "delivery_limit", &q, "", &[&q], None);
    // A classic queue without a limit adds no header (as RabbitMQ).
    let plain = xqueue(&ch, "cq.plain", &[]).await;
    pub_props(&ch, "", &plain, "p", BasicProperties::default()).await;
    let d = wait_get_acked(&ch, &plain).await;
    nack_requeue(&d).await;
    let d = wait_get_acked(&ch, &plain).await;
    assert!(d.redelivered);
    assert_eq!(delivery_count(&d), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn global_qos_is_refused_on_quorum_queues() {
    let conn = connect().await;
    let ch = t(conn.create_channel()).await.unwrap();
    let q = uniq("qq.qos");
    declare(&ch, &q, &[quorum()]).await.expect("declare");
    let conn2 = connect().await;
    let ch2 = t(conn2.create_channel()).await.unwrap();
    t(ch2.basic_qos(10, BasicQosOptions { global: true }))
        .await
        .unwrap();
    let r = t(ch2.basic_consume(
        &q,
        "",
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await;
    // RabbitMQ: 540 NOT_IMPLEMENTED, a connection error.
    match r {
        Err(lapin::Error::ProtocolError(e)) => {
            assert_eq!(e.get_id(), 540, "{e:?}");
            assert_eq!(
                e.get_message().as_str(),
                format!("NOT_IMPLEMENTED - queue '{q}' in vhost '/' does not support global qos")
            );
        }
        other => panic!("expected 540, got {other:?}"),
    }
    // Per-consumer prefetch is fine.
    let ch3 = t(conn.create_channel()).await.unwrap();
    t(ch3.basic_qos(10, BasicQosOptions::default()))
        .await
        .unwrap();
    consume(&ch3, &q, false, FieldTable::default()).await;
    delete(&ch, &q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_with_if_unused_or_if_empty_is_not_implemented() {
    // RabbitMQ 3.x/4.0: either flag on a quorum queue's queue.delete is 540
    // NOT_IMPLEMENTED (a connection error); the queue stays.
    let conn = connect().await;
    let ch = t(conn.create_channel()).await.unwrap();
    let q = uniq("qq.ifempty");
    declare(&ch, &q, &[quorum()]).await.expect("declare");
    for (opts, flag) in [
        (
            QueueDeleteOptions {
                if_unused: true,
                if_empty: true,
                ..Default::default()
            },
            "if-unused",
        ),
        (
            QueueDeleteOptions {
                if_empty: true,
                ..Default::default()
            },
            "if-empty",
        ),
    ] {
        let conn2 = connect().await;
        let ch2 = t(conn2.create_channel()).await.unwrap();
        match t(ch2.queue_delete(&q, opts)).await {
            Err(lapin::Error::ProtocolError(e)) => {
                assert_eq!(e.get_id(), 540, "{e:?}");
                assert_eq!(
                    e.get_message().as_str(),
                    format!(
                        "NOT_IMPLEMENTED - cannot delete queue '{q}' in vhost '/'. queue.delete \
                         operations with {flag} flag set are not supported by quorum queues"
                    )
                );
            }
            other => panic!("expected 540, got {other:?}"),
        }
    }
    assert_eq!(passive(&ch, &q).await, (0, 0));
    delete(&ch, &q).await;
}

/// An in-process broker with the admin API, for policies and `/api/queues`.
async fn admin_broker() -> (warren::Warren, String, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(uniq("warren-quorum-admin"));
    let mut config = warren::Config::for_tests(dir.clone());
    config.admin_enabled = true;
    let w = warren::start(config).await.expect("broker starts");
    let base = format!("http://{}", w.admin_addr().expect("admin"));
    (w, base, dir)
}

const GUEST: Option<(&str, &str)> = Some(("guest", "guest"));

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_shows_type_and_one_replica_and_policy_sets_the_limit() {
    let (w, base, dir) = admin_broker().await;
    let uri = format!("amqp://guest:guest@{}/%2f", w.amqp_addr());
    let conn = connect_with(&uri).await.expect("connect");
    let ch = t(conn.create_channel()).await.unwrap();
    // Through the admin API, as the management UI declares it.
    let (status, v) = common::http(
        "PUT",
        &format!("{base}/api/queues/%2f/qq.orders"),
        GUEST,
        Some(serde_json::json!({"durable": true, "arguments": {"x-queue-type": "quorum", "x-quorum-initial-group-size": 3}})),
    )
    .await;
    assert!(status == 201 || status == 204, "{status} {v}");
    let (status, v) = common::http(
        "GET",
        &format!("{base}/api/queues/%2f/qq.orders"),
        GUEST,
        None,
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(v["type"], "quorum");
    assert_eq!(v["arguments"]["x-quorum-initial-group-size"], 3);
    let node = v["node"].clone();
    assert_eq!(v["leader"], node);
    assert_eq!(v["members"], serde_json::json!([node.clone()]));
    assert_eq!(v["online"], serde_json::json!([node]));
    assert_eq!(v["replicas"], 1);
    assert_eq!(v["delivery_limit"], 20);
    // A non-durable quorum queue through the API: refused.
    let (status, _) = common::http(
        "PUT",
        &format!("{base}/api/queues/%2f/qq.transient"),
        GUEST,
        Some(serde_json::json!({"durable": false, "arguments": {"x-queue-type": "quorum"}})),
    )
    .await;
    assert_eq!(status, 400);
    // A classic queue says classic and has no replica fields.
    declare(&ch, "cq.orders", &[]).await.expect("classic");
    let (_, v) = common::http(
        "GET",
        &format!("{base}/api/queues/%2f/cq.orders"),
        GUEST,
        None,
    )
    .await;
    assert_eq!(v["type"], "classic");
    assert!(v.get("members").is_none());

    // The documented policy: delivery-limit for quorum queues only.
    let (status, v) = common::http(
        "PUT",
        &format!("{base}/api/policies/%2f/qq-overrides"),
        GUEST,
        Some(serde_json::json!({"pattern": "orders$", "definition": {"delivery-limit": 1}, "priority": 1, "apply-to": "quorum_queues"})),
    )
    .await;
    assert!((200..300).contains(&status), "{status} {v}");
    let (_, v) = common::http(
        "GET",
        &format!("{base}/api/queues/%2f/qq.orders"),
        GUEST,
        None,
    )
    .await;
    assert_eq!(v["delivery_limit"], 1);
    assert_eq!(v["policy"], "qq-overrides");
    let (_, v) = common::http(
        "GET",
        &format!("{base}/api/queues/%2f/cq.orders"),
        GUEST,
        None,
    )
    .await;
    assert!(v["policy"].is_null(), "classic queues are not matched: {v}");
    // It applies: the second return drops the message (no dead-letter exchange).
    pub_props(&ch, "", "qq.orders", "o", BasicProperties::default()).await;
    let d = wait_get_acked(&ch, "qq.orders").await;
    nack_requeue(&d).await;
    let d = wait_get_acked(&ch, "qq.orders").await;
    assert_eq!(delivery_count(&d), Some(1));
    nack_requeue(&d).await;
    assert!(get(&ch, "qq.orders").await.is_none());
    // A policy's -1 lifts a declared limit (RabbitMQ's resolve rule).
    let (status, _) = common::http(
        "PUT",
        &format!("{base}/api/policies/%2f/qq-overrides"),
        GUEST,
        Some(serde_json::json!({"pattern": "orders$", "definition": {"delivery-limit": -1}, "apply-to": "quorum_queues"})),
    )
    .await;
    assert!((200..300).contains(&status));
    let (_, v) = common::http(
        "GET",
        &format!("{base}/api/queues/%2f/qq.orders"),
        GUEST,
        None,
    )
    .await;
    assert_eq!(v["delivery_limit"], "unlimited");
    // The API's get shows the header a client would see.
    pub_props(&ch, "", "qq.orders", "p2", BasicProperties::default()).await;
    let d = wait_get_acked(&ch, "qq.orders").await;
    nack_requeue(&d).await;
    // basic.nack has no reply: a passive declare on the same channel is
    // answered only after the broker has handled the nack before it.
    assert_eq!(
        passive(&ch, "qq.orders").await.0,
        1,
        "the nacked message is back"
    );
    let (status, v) = common::http(
        "POST",
        &format!("{base}/api/queues/%2f/qq.orders/get"),
        GUEST,
        Some(serde_json::json!({"count": 1, "ackmode": "ack_requeue_false", "encoding": "auto"})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v[0]["payload"], "p2");
    assert_eq!(v[0]["redelivered"], true);
    assert_eq!(v[0]["properties"]["headers"]["x-delivery-count"], 1);
    drop(conn);
    drop(w);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_messages_in_a_quorum_queue_survive_a_restart() {
    use common::process::{data_dir, BrokerProcess};
    let dir = data_dir("quorum-restart");
    let b = BrokerProcess::start(&dir).await;
    {
        let conn = b.connect().await;
        let ch = t(conn.create_channel()).await.unwrap();
        t(ch.confirm_select(ConfirmSelectOptions::default()))
            .await
            .unwrap();
        declare(&ch, "qq.keep", &[quorum()]).await.expect("quorum");
        declare(&ch, "cq.keep", &[]).await.expect("classic");
        for q in ["qq.keep", "cq.keep"] {
            // delivery_mode 1: transient.
            let confirm = t(ch.basic_publish(
                "",
                q,
                BasicPublishOptions::default(),
                b"transient",
                BasicProperties::default().with_delivery_mode(1),
            ))
            .await
            .expect("publish");
            t(confirm).await.expect("confirm");
        }
    }
    b.stop();
    let b = BrokerProcess::start(&dir).await;
    let conn = b.connect().await;
    let ch = t(conn.create_channel()).await.unwrap();
    let d = wait_get(&ch, "qq.keep").await;
    assert_eq!(body(&d), "transient");
    assert!(
        get(&ch, "cq.keep").await.is_none(),
        "classic: transient is gone"
    );
    drop(conn);
    b.stop();
}

/// The default `max_message_size` is RabbitMQ 3.x's 128 MiB (4.0 lowered it
/// to 16 MiB): a 20 MiB message, as aio-pika's and aiormq's suites publish,
/// is taken; past the limit, 406 with RabbitMQ's text (`tests/limits.rs`
/// checks the edge on a small configured limit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_max_message_size_is_128_mib() {
    assert_eq!(warren::Config::default().max_message_size, 128 << 20);
    let (conn, ch) = connect_channel().await;
    let q = xqueue(&ch, "max.size", &[]).await;
    t(ch.confirm_select(ConfirmSelectOptions::default()))
        .await
        .unwrap();
    let big = vec![b'x'; 20 << 20];
    let confirm = t(ch.basic_publish(
        "",
        &q,
        BasicPublishOptions::default(),
        &big,
        BasicProperties::default(),
    ))
    .await
    .expect("publish 20 MiB");
    assert!(t(confirm).await.expect("confirm").is_ack());
    drop(big);
    let got = t(ch.basic_get(&q, BasicGetOptions { no_ack: true }))
        .await
        .expect("get")
        .expect("the message");
    assert_eq!(got.delivery.data.len(), 20 << 20);
    assert!(conn.status().connected());
}

/// The delivery count of a stored message survives a restart: it comes back
/// with `x-delivery-count` where it left off, and the limit still applies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_count_survives_a_restart() {
    use common::process::{data_dir, BrokerProcess};
    let dir = data_dir("quorum-count-restart");
    let b = BrokerProcess::start(&dir).await;
    {
        let conn = b.connect().await;
        let ch = t(conn.create_channel()).await.unwrap();
        t(ch.confirm_select(ConfirmSelectOptions::default()))
            .await
            .unwrap();
        declare(&ch, "qq.count", &[quorum(), ("x-delivery-limit", int(3))])
            .await
            .expect("quorum");
        let confirm = t(ch.basic_publish(
            "",
            "qq.count",
            BasicPublishOptions::default(),
            b"again",
            BasicProperties::default(),
        ))
        .await
        .expect("publish");
        t(confirm).await.expect("confirm");
        for n in 0..2 {
            let d = wait_get_acked(&ch, "qq.count").await;
            assert_eq!(delivery_count(&d), (n > 0).then_some(n));
            nack_requeue(&d).await;
        }
    }
    b.stop();
    let b = BrokerProcess::start(&dir).await;
    let conn = b.connect().await;
    let ch = t(conn.create_channel()).await.unwrap();
    let d = wait_get_acked(&ch, "qq.count").await;
    assert!(d.redelivered);
    assert_eq!(delivery_count(&d), Some(2), "the count came back");
    nack_requeue(&d).await;
    let d = wait_get_acked(&ch, "qq.count").await;
    assert_eq!(delivery_count(&d), Some(3));
    nack_requeue(&d).await;
    assert!(get(&ch, "qq.count").await.is_none(), "past the limit of 3");
    drop(conn);
    b.stop();
}
