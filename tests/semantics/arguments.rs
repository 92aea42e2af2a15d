//! Queue argument validation: a bad `x-` argument is a 406 naming it.

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_queue_arguments_are_406_naming_the_argument() {
    let conn = connect().await;
    // (argument, value, a fragment of RabbitMQ's reason)
    let cases: Vec<(&str, AMQPValue, &str)> = vec![
        ("x-message-ttl", int(-1), "{value_negative,-1}"),
        ("x-message-ttl", s("100"), "expected integer, got longstr"),
        ("x-expires", int(0), "{value_zero,0}"),
        ("x-expires", s("soon"), "expected integer, got longstr"),
        ("x-max-length", int(-5), "{value_negative,-5}"),
        (
            "x-max-length-bytes",
            AMQPValue::Boolean(true),
            "expected integer, got bool",
        ),
        ("x-max-priority", int(-1), "{value_negative,-1}"),
        ("x-max-priority", int(300), "{max_value_exceeded,300}"),
        ("x-overflow", s("drop-tail"), "invalid_overflow"),
        ("x-overflow", int(1), "{unacceptable_type,signedint}"),
        (
            "x-single-active-consumer",
            s("yes"),
            "{unacceptable_type,longstr}",
        ),
        ("x-queue-mode", s("nope"), "unsupported queue mode 'nope'"),
        (
            "x-dead-letter-exchange",
            int(1),
            "invalid type 'signedint' for arg 'x-dead-letter-exchange'",
        ),
        (
            "x-queue-type",
            s("stream-ish"),
            "unsupported queue type 'stream-ish'",
        ),
    ];
    for (arg, v, why) in cases {
        let ch = t(conn.create_channel()).await.unwrap();
        let r = t(ch.queue_declare(
            &uniq("badarg"),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            table(&[(arg, v.clone())]),
        ))
        .await;
        let msg = err_406(r);
        assert!(msg.contains(&format!("'{arg}'")), "{arg}={v:?}: {msg}");
        assert!(msg.contains(why), "{arg}={v:?}: {msg}");
    }
    // Unknown x- arguments and a zero max-length / max-priority are accepted.
    for (arg, v) in [
        ("x-unknown", s("whatever")),
        ("x-max-length", int(0)),
        ("x-max-priority", int(0)),
    ] {
        let ch = t(conn.create_channel()).await.unwrap();
        t(ch.queue_declare(
            &uniq("okarg"),
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            table(&[(arg, v)]),
        ))
        .await
        .unwrap_or_else(|e| panic!("{arg}: {e}"));
    }
    // A dead-letter routing key needs a dead-letter exchange.
    let ch = t(conn.create_channel()).await.unwrap();
    let r = t(ch.queue_declare(
        &uniq("badarg"),
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        table(&[("x-dead-letter-routing-key", s("k"))]),
    ))
    .await;
    let msg = err_406(r);
    assert!(msg.contains("x-dead-letter-routing-key"), "{msg}");
    // Expiration property: not a non-negative integer -> 406 closing the channel.
    let ch = t(conn.create_channel()).await.unwrap();
    let rx = watch_channel(&ch);
    let _ = ch
        .basic_publish(
            "",
            "nowhere",
            BasicPublishOptions::default(),
            b"x",
            BasicProperties::default().with_expiration("-5".into()),
        )
        .await;
    expect_closed_with(rx, 406).await;
}
