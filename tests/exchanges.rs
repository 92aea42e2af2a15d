//! Exchange declare/delete/bind semantics.

mod common;

use common::*;
use lapin::options::*;
use lapin::types::FieldTable;
use lapin::{BasicProperties, ExchangeKind};

async fn declare_ex(ch: &lapin::Channel, name: &str, kind: ExchangeKind) -> lapin::Result<()> {
    t(ch.exchange_declare(
        name,
        kind,
        ExchangeDeclareOptions {
            auto_delete: false,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
}

async fn delete_ex(ch: &lapin::Channel, name: &str) {
    t(ch.exchange_delete(name, ExchangeDeleteOptions::default()))
        .await
        .unwrap();
}

async fn passive_ex(ch: &lapin::Channel, name: &str) -> lapin::Result<()> {
    t(ch.exchange_declare(
        name,
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn declare_each_type_and_delete() {
    let (_conn, ch) = connect_channel().await;
    for kind in [
        ExchangeKind::Direct,
        ExchangeKind::Fanout,
        ExchangeKind::Topic,
        ExchangeKind::Headers,
    ] {
        let name = uniq("ex");
        declare_ex(&ch, &name, kind.clone()).await.unwrap();
        // Redeclare with identical attributes is fine.
        declare_ex(&ch, &name, kind).await.unwrap();
        passive_ex(&ch, &name).await.unwrap();
        delete_ex(&ch, &name).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_exchange_is_gone() {
    let conn = connect().await;
    let ch = t(conn.create_channel()).await.unwrap();
    let name = uniq("ex");
    declare_ex(&ch, &name, ExchangeKind::Fanout).await.unwrap();
    delete_ex(&ch, &name).await;
    assert_code(passive_ex(&ch, &name).await, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_missing_exchange_is_ok() {
    // RabbitMQ (3.x) treats exchange.delete of a missing exchange as success (idempotent).
    let (_conn, ch) = connect_channel().await;
    t(ch.exchange_delete(&uniq("never"), ExchangeDeleteOptions::default()))
        .await
        .unwrap();
    assert!(ch.status().connected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_missing_is_not_found() {
    let (conn, ch) = connect_channel().await;
    assert_code(passive_ex(&ch, &uniq("missing")).await, 404);
    assert!(conn.status().connected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redeclare_with_other_type_is_precondition_failed() {
    let conn = connect().await;
    let ch = t(conn.create_channel()).await.unwrap();
    let name = uniq("ex");
    declare_ex(&ch, &name, ExchangeKind::Direct).await.unwrap();
    assert_code(declare_ex(&ch, &name, ExchangeKind::Fanout).await, 406);
    let ch2 = t(conn.create_channel()).await.unwrap();
    // Other flags differing are also 406 (durable here).
    let r = t(ch2.exchange_declare(
        &name,
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await;
    assert_code(r, 406);
    let ch3 = t(conn.create_channel()).await.unwrap();
    delete_ex(&ch3, &name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_exchange_type_is_precondition_failed() {
    let (conn, ch) = connect_channel().await;
    let r = declare_ex(
        &ch,
        &uniq("ex"),
        ExchangeKind::Custom("x-no-such-type".into()),
    )
    .await;
    // RabbitMQ 4.0 (rabbit_exchange:check_type): "unknown exchange type
    // 'x-no-such-type'" -> 406 PRECONDITION_FAILED, a channel error (3.13 closed
    // the connection with 503 COMMAND_INVALID).
    match &r {
        Err(lapin::Error::ProtocolError(e)) => {
            assert_eq!(e.get_id(), 406);
            assert!(
                e.get_message()
                    .as_str()
                    .contains("unknown exchange type 'x-no-such-type'"),
                "{e:?}"
            );
        }
        other => panic!("expected 406, got {other:?}"),
    }
    // Only the channel closed: the connection still works.
    assert!(conn.status().connected());
    let ch2 = t(conn.create_channel()).await.expect("new channel");
    let name = uniq("ex");
    declare_ex(&ch2, &name, ExchangeKind::Direct)
        .await
        .expect("declare");
    delete_ex(&ch2, &name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amq_prefix_is_access_refused() {
    let conn = connect().await;
    let ch = t(conn.create_channel()).await.unwrap();
    assert_code(
        declare_ex(&ch, &format!("amq.foo{}", uniq("")), ExchangeKind::Direct).await,
        403,
    );
    // Deleting a built-in exchange is refused too.
    let ch = t(conn.create_channel()).await.unwrap();
    assert_code(
        t(ch.exchange_delete("amq.direct", ExchangeDeleteOptions::default())).await,
        403,
    );
    // Passive declare of amq.* names is allowed.
    let ch = t(conn.create_channel()).await.unwrap();
    passive_ex(&ch, "amq.direct").await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builtin_exchanges_exist() {
    let (_conn, ch) = connect_channel().await;
    for name in [
        "amq.direct",
        "amq.fanout",
        "amq.topic",
        "amq.headers",
        "amq.match",
    ] {
        passive_ex(&ch, name)
            .await
            .unwrap_or_else(|e| panic!("{name}: {e:?}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_exchange_declare_is_access_refused() {
    // RabbitMQ surprise: even a *passive* declare of the default exchange ("")
    // is refused with 403 "operation not permitted on the default exchange".
    let (conn, ch) = connect_channel().await;
    assert_code(passive_ex(&ch, "").await, 403);
    assert!(conn.status().connected());
    // Deleting it, or a predeclared amq.* one: 403 with RabbitMQ's texts.
    for (name, text) in [
        (
            "",
            "ACCESS_REFUSED - operation not permitted on the default exchange",
        ),
        (
            "amq.direct",
            "ACCESS_REFUSED - deletion of system exchange 'amq.direct' in vhost '/' not allowed",
        ),
    ] {
        let ch = t(conn.create_channel()).await.unwrap();
        let e = t(ch.exchange_delete(name, ExchangeDeleteOptions::default()))
            .await
            .expect_err(name);
        assert_eq!(code(&e), Some(403), "{name}");
        assert!(format!("{e:?}").contains(text), "{name}: {e:?}");
    }
    let ch = t(conn.create_channel()).await.unwrap();
    passive_ex(&ch, "amq.direct").await.expect("still there");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_if_unused_with_bindings_is_precondition_failed() {
    let conn = connect().await;
    let ch = t(conn.create_channel()).await.unwrap();
    let ex = uniq("ex");
    declare_ex(&ch, &ex, ExchangeKind::Fanout).await.unwrap();
    let q = temp_queue(&ch, "q").await;
    t(ch.queue_bind(
        &q,
        &ex,
        "",
        QueueBindOptions::default(),
        FieldTable::default(),
    ))
    .await
    .unwrap();
    let r = t(ch.exchange_delete(
        &ex,
        ExchangeDeleteOptions {
            if_unused: true,
            ..Default::default()
        },
    ))
    .await;
    assert_code(r, 406);
    let ch2 = t(conn.create_channel()).await.unwrap();
    passive_ex(&ch2, &ex).await.expect("exchange still exists");
    // Without bindings, if-unused delete succeeds.
    t(ch2.queue_unbind(&q, &ex, "", FieldTable::default()))
        .await
        .unwrap();
    t(ch2.exchange_delete(
        &ex,
        ExchangeDeleteOptions {
            if_unused: true,
            ..Default::default()
        },
    ))
    .await
    .unwrap();
    assert_code(passive_ex(&ch2, &ex).await, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_exchange_removes_its_bindings() {
    let (_conn, ch) = connect_channel().await;
    confirm_mode(&ch).await;
    let ex = uniq("ex");
    declare_ex(&ch, &ex, ExchangeKind::Fanout).await.unwrap();
    let q = temp_queue(&ch, "q").await;
    t(ch.queue_bind(
        &q,
        &ex,
        "",
        QueueBindOptions::default(),
        FieldTable::default(),
    ))
    .await
    .unwrap();
    delete_ex(&ch, &ex).await;
    declare_ex(&ch, &ex, ExchangeKind::Fanout).await.unwrap();
    publish_confirmed(&ch, &ex, "", b"x").await;
    assert_eq!(
        message_count(&ch, &q).await,
        0,
        "old binding must not survive the delete"
    );
    delete_ex(&ch, &ex).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_to_internal_exchange_is_access_refused() {
    let conn = connect().await;
    let ch = t(conn.create_channel()).await.unwrap();
    let ex = uniq("internal");
    t(ch.exchange_declare(
        &ex,
        ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            internal: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .unwrap();
    let rx = watch_channel(&ch);
    let _ = t(ch.basic_publish(
        &ex,
        "",
        BasicPublishOptions::default(),
        b"x",
        BasicProperties::default(),
    ))
    .await;
    expect_closed_with(rx, 403).await;
    assert!(conn.status().connected());
    let ch2 = t(conn.create_channel()).await.unwrap();
    delete_ex(&ch2, &ex).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_to_missing_exchange_is_not_found() {
    let (conn, ch) = connect_channel().await;
    let rx = watch_channel(&ch);
    let _ = t(ch.basic_publish(
        &uniq("nope"),
        "",
        BasicPublishOptions::default(),
        b"x",
        BasicProperties::default(),
    ))
    .await;
    expect_closed_with(rx, 404).await;
    assert!(conn.status().connected());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_to_exchange_binding_routes_and_unbind_stops() {
    let (_conn, ch) = connect_channel().await;
    confirm_mode(&ch).await;
    let src = uniq("src");
    let dst = uniq("dst");
    declare_ex(&ch, &src, ExchangeKind::Topic).await.unwrap();
    declare_ex(&ch, &dst, ExchangeKind::Direct).await.unwrap();
    let q = temp_queue(&ch, "e2e").await;
    t(ch.queue_bind(
        &q,
        &dst,
        "a.b",
        QueueBindOptions::default(),
        FieldTable::default(),
    ))
    .await
    .unwrap();
    t(ch.exchange_bind(
        &dst,
        &src,
        "a.*",
        ExchangeBindOptions::default(),
        FieldTable::default(),
    ))
    .await
    .unwrap();

    publish_confirmed(&ch, &src, "a.b", b"via-e2e").await;
    publish_confirmed(&ch, &src, "a.c", b"dst-drops").await; // passes src, no queue on dst for a.c
    publish_confirmed(&ch, &src, "b.b", b"src-drops").await;
    assert_eq!(drain(&ch, &q).await, vec!["via-e2e"]);

    t(ch.exchange_unbind(
        &dst,
        &src,
        "a.*",
        ExchangeUnbindOptions::default(),
        FieldTable::default(),
    ))
    .await
    .unwrap();
    publish_confirmed(&ch, &src, "a.b", b"after-unbind").await;
    assert_eq!(message_count(&ch, &q).await, 0);
    // Still reachable directly through dst.
    publish_confirmed(&ch, &dst, "a.b", b"direct").await;
    assert_eq!(drain(&ch, &q).await, vec!["direct"]);
    delete_ex(&ch, &src).await;
    delete_ex(&ch, &dst).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exchange_bind_missing_source_is_not_found() {
    let (_conn, ch) = connect_channel().await;
    let dst = uniq("dst");
    declare_ex(&ch, &dst, ExchangeKind::Fanout).await.unwrap();
    let r = t(ch.exchange_bind(
        &dst,
        &uniq("nosrc"),
        "",
        ExchangeBindOptions::default(),
        FieldTable::default(),
    ))
    .await;
    assert_code(r, 404);
    let (_c2, ch2) = connect_channel().await;
    delete_ex(&ch2, &dst).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbinding_an_auto_deleted_exchange_is_ok() {
    // aio-pika's bound-exchange test: an auto-delete destination exchange
    // goes with its last (queue) binding as a source; the clean-up unbind
    // of the exchange-to-exchange binding that named it succeeds, as on
    // RabbitMQ, and only on the channel that did it.
    let (_conn, ch) = connect_channel().await;
    let (src, dst) = (uniq("ad.src"), uniq("ad.dst"));
    for x in [&src, &dst] {
        t(ch.exchange_declare(
            x,
            ExchangeKind::Direct,
            ExchangeDeclareOptions {
                auto_delete: true,
                ..Default::default()
            },
            FieldTable::default(),
        ))
        .await
        .expect("declare");
    }
    let q = temp_queue(&ch, "ad").await;
    t(ch.queue_bind(
        &q,
        &dst,
        "k",
        QueueBindOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("bind queue");
    t(ch.exchange_bind(
        &dst,
        &src,
        "k",
        ExchangeBindOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("bind exchange");
    t(ch.queue_unbind(&q, &dst, "k", FieldTable::default()))
        .await
        .expect("unbind queue");
    let passive = ExchangeDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let (_c2, ch2) = connect_channel().await;
    let gone =
        t(ch2.exchange_declare(&dst, ExchangeKind::Direct, passive, FieldTable::default())).await;
    assert_code(gone, 404);
    t(ch.exchange_unbind(
        &dst,
        &src,
        "k",
        ExchangeUnbindOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("unbind from an exchange that went");
    assert!(ch.status().connected(), "the channel stays open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_exchange_routes_by_queue_name() {
    let (_conn, ch) = connect_channel().await;
    confirm_mode(&ch).await;
    let q1 = temp_queue(&ch, "d1").await;
    let q2 = temp_queue(&ch, "d2").await;
    publish_confirmed(&ch, "", &q1, b"one").await;
    publish_confirmed(&ch, "", &q2, b"two").await;
    publish_confirmed(&ch, "", &uniq("nobody"), b"dropped").await;
    assert_eq!(drain(&ch, &q1).await, vec!["one"]);
    assert_eq!(drain(&ch, &q2).await, vec!["two"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_exchange_cannot_be_bound() {
    let (_conn, ch) = connect_channel().await;
    let q = temp_queue(&ch, "d").await;
    let r = t(ch.queue_bind(
        &q,
        "",
        "other",
        QueueBindOptions::default(),
        FieldTable::default(),
    ))
    .await;
    // RabbitMQ: binding to the default exchange is ACCESS_REFUSED (403).
    assert_code(r, 403);
}
