//! Dead-lettering: the `x-death` header exactly as RabbitMQ writes it, dead-letter
//! routing keys, nack / reject / requeue, expiry and max-length as reasons, folding
//! per queue and reason, retry with back-off, and cycle detection.

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_rejected_x_death_exact() {
    let (_c, ch) = connect_channel().await;
    let dlx = uniq("dlx.rej");
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
    .unwrap();
    let dlq = xqueue(&ch, "rej.dlq", &[]).await;
    t(ch.queue_bind(
        &dlq,
        &dlx,
        "",
        QueueBindOptions::default(),
        FieldTable::default(),
    ))
    .await
    .unwrap();
    let q = xqueue(&ch, "rej", &[("x-dead-letter-exchange", s(&dlx))]).await;
    // Published to amq.direct with a CC header: routing-keys lists key + CC.
    t(ch.queue_bind(
        &q,
        "amq.direct",
        "k1",
        QueueBindOptions::default(),
        FieldTable::default(),
    ))
    .await
    .unwrap();
    let mut cc = FieldArray::default();
    cc.push(s("k2"));
    let mut h = FieldTable::default();
    h.insert("CC".into(), AMQPValue::FieldArray(cc));
    h.insert("app".into(), s("kept"));
    let props = BasicProperties::default()
        .with_headers(h)
        .with_expiration("60000".into())
        .with_correlation_id("c1".into());
    pub_props(&ch, "amq.direct", "k1", "r", props).await;
    let m = wait_get_acked(&ch, &q).await;
    reject(&m).await;
    let d = wait_get(&ch, &dlq).await;
    assert_eq!(body(&d), "r");
    // Delivered as published to the DLX, with the original routing key (no DL routing
    // key set); x-death keeps the exchange it was first published to.
    assert_eq!(d.exchange.as_str(), dlx);
    assert_eq!(d.routing_key.as_str(), "k1");
    // The per-message expiration is removed (kept as original-expiration); other
    // properties and headers are kept.
    assert_eq!(d.properties.expiration(), &None);
    assert_eq!(
        d.properties.correlation_id().as_ref().map(|c| c.as_str()),
        Some("c1")
    );
    assert_eq!(text(headers(&d).get("app")).as_deref(), Some("kept"));
    let deaths = x_death(&d);
    assert_eq!(deaths.len(), 1);
    assert_death(
        &deaths[0],
        1,
        "rejected",
        &q,
        "amq.direct",
        &["k1", "k2"],
        Some("60000"),
    );
    assert_first_last(
        &d,
        (&q, "rejected", "amq.direct"),
        (&q, "rejected", "amq.direct"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_routing_key_drops_cc_header() {
    let (_c, ch) = connect_channel().await;
    let dlq = xqueue(&ch, "dlcc.dlq", &[]).await;
    let q = xqueue(
        &ch,
        "dlcc",
        &[
            ("x-dead-letter-exchange", s("")),
            ("x-dead-letter-routing-key", s(&dlq)),
        ],
    )
    .await;
    let mut cc = FieldArray::default();
    cc.push(s("elsewhere"));
    let props =
        BasicProperties::default().with_headers(table(&[("CC", AMQPValue::FieldArray(cc))]));
    pub_props(&ch, "", &q, "cc", props).await;
    let m = wait_get_acked(&ch, &q).await;
    reject(&m).await;
    let d = wait_get(&ch, &dlq).await;
    // With x-dead-letter-routing-key the CC header is removed from the message, but
    // x-death still records the keys it was published with.
    assert!(!headers(&d).contains_key("CC"), "{:?}", headers(&d));
    assert_death(
        &x_death(&d)[0],
        1,
        "rejected",
        &q,
        "",
        &[&q, "elsewhere"],
        None,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_nack_and_requeue_semantics() {
    let (_c, ch) = connect_channel().await;
    let dlq = xqueue(&ch, "nack.dlq", &[]).await;
    let q = xqueue(
        &ch,
        "nack",
        &[
            ("x-dead-letter-exchange", s("")),
            ("x-dead-letter-routing-key", s(&dlq)),
        ],
    )
    .await;
    publish(&ch, "", &q, b"a").await;
    publish(&ch, "", &q, b"b").await;
    // requeue=true is not a dead-lettering.
    let a = wait_get_acked(&ch, &q).await;
    t(a.acker.nack(BasicNackOptions {
        requeue: true,
        multiple: false,
    }))
    .await
    .unwrap();
    wait_message_count(&ch, &q, 2).await;
    assert_eq!(message_count(&ch, &dlq).await, 0);
    // nack multiple without requeue dead-letters both, in order.
    let _a = wait_get_acked(&ch, &q).await;
    let b = wait_get_acked(&ch, &q).await;
    t(b.acker.nack(BasicNackOptions {
        requeue: false,
        multiple: true,
    }))
    .await
    .unwrap();
    wait_message_count(&ch, &dlq, 2).await;
    let d1 = wait_get(&ch, &dlq).await;
    let d2 = wait_get(&ch, &dlq).await;
    assert_eq!((body(&d1).as_str(), body(&d2).as_str()), ("a", "b"));
    assert_death(&x_death(&d1)[0], 1, "rejected", &q, "", &[&q], None);
    assert_eq!(d1.routing_key.as_str(), dlq);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_expired_x_death_exact() {
    let (_c, ch) = connect_channel().await;
    let dlq = xqueue(&ch, "expx.dlq", &[]).await;
    let q = xqueue(
        &ch,
        "expx",
        &[
            ("x-message-ttl", int(40)),
            ("x-dead-letter-exchange", s("")),
            ("x-dead-letter-routing-key", s(&dlq)),
        ],
    )
    .await;
    // One with a per-message expiration (shorter than the queue's), one without.
    pub_exp(&ch, &q, "m", "20").await;
    publish(&ch, "", &q, b"q").await;
    let d = wait_get(&ch, &dlq).await;
    assert_eq!(body(&d), "m");
    assert_eq!(d.properties.expiration(), &None);
    assert_eq!(d.routing_key.as_str(), dlq);
    let deaths = x_death(&d);
    assert_eq!(deaths.len(), 1);
    assert_death(&deaths[0], 1, "expired", &q, "", &[&q], Some("20"));
    assert_first_last(&d, (&q, "expired", ""), (&q, "expired", ""));
    let d = wait_get(&ch, &dlq).await;
    assert_eq!(body(&d), "q");
    // The queue's TTL is not an original-expiration.
    assert_death(&x_death(&d)[0], 1, "expired", &q, "", &[&q], None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_maxlen_x_death_exact() {
    let (_c, ch) = connect_channel().await;
    let dlq = xqueue(&ch, "maxx.dlq", &[]).await;
    let q = xqueue(
        &ch,
        "maxx",
        &[
            ("x-max-length", int(2)),
            ("x-dead-letter-exchange", s("")),
            ("x-dead-letter-routing-key", s(&dlq)),
        ],
    )
    .await;
    for b in ["1", "2", "3", "4"] {
        publish(&ch, "", &q, b.as_bytes()).await;
    }
    wait_message_count(&ch, &dlq, 2).await;
    assert_eq!(drain(&ch, &q).await, ["3", "4"]);
    let d = wait_get(&ch, &dlq).await;
    assert_eq!(body(&d), "1");
    assert_death(&x_death(&d)[0], 1, "maxlen", &q, "", &[&q], None);
    assert_first_last(&d, (&q, "maxlen", ""), (&q, "maxlen", ""));
    assert_eq!(body(&wait_get(&ch, &dlq).await), "2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_death_folds_per_queue_and_reason() {
    // rejected from q, expired from wait, rejected from q again: two entries, the most
    // recent first, q/rejected counted twice. x-first-death-* stays, x-last-death-*
    // follows the latest.
    let (_c, ch) = connect_channel().await;
    let q = uniq("fold.work");
    let wait = xqueue(
        &ch,
        "fold.wait",
        &[
            ("x-message-ttl", int(30)),
            ("x-dead-letter-exchange", s("")),
            ("x-dead-letter-routing-key", s(&q)),
        ],
    )
    .await;
    t(ch.queue_declare(
        &q,
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        table(&[
            ("x-dead-letter-exchange", s("")),
            ("x-dead-letter-routing-key", s(&wait)),
        ]),
    ))
    .await
    .unwrap();
    publish(&ch, "", &q, b"f").await;
    let m = wait_get_acked(&ch, &q).await;
    assert!(!headers(&m).contains_key("x-death"));
    reject(&m).await;
    let m = wait_get_acked(&ch, &q).await;
    let deaths = x_death(&m);
    assert_eq!(deaths.len(), 2, "{deaths:?}");
    assert_death(&deaths[0], 1, "expired", &wait, "", &[&wait], None);
    assert_death(&deaths[1], 1, "rejected", &q, "", &[&q], None);
    assert_first_last(&m, (&q, "rejected", ""), (&wait, "expired", ""));
    reject(&m).await;
    let m = wait_get_acked(&ch, &q).await;
    let deaths = x_death(&m);
    assert_eq!(deaths.len(), 2, "{deaths:?}");
    assert_death(&deaths[0], 2, "expired", &wait, "", &[&wait], None);
    assert_death(&deaths[1], 2, "rejected", &q, "", &[&q], None);
    assert_first_last(&m, (&q, "rejected", ""), (&wait, "expired", ""));
    ack(&m).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_with_backoff_round_trip() {
    // work --reject--> DLX (default exchange, key = retry) --> retry (TTL) --expired-->
    // DLX (default exchange, key = work) --> work; give up after 3 attempts.
    const TTL: u64 = 60;
    let (_c, ch) = connect_channel().await;
    let work = uniq("retry.work");
    let retry = xqueue(
        &ch,
        "retry.wait",
        &[
            ("x-message-ttl", int(TTL as i32)),
            ("x-dead-letter-exchange", s("")),
            ("x-dead-letter-routing-key", s(&work)),
        ],
    )
    .await;
    t(ch.queue_declare(
        &work,
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        table(&[
            ("x-dead-letter-exchange", s("")),
            ("x-dead-letter-routing-key", s(&retry)),
        ]),
    ))
    .await
    .unwrap();
    let mut c = consume(&ch, &work, false, FieldTable::default()).await;
    let start = Instant::now();
    publish(&ch, "", &work, b"job").await;
    let mut attempts = 0;
    let last = loop {
        let d = next_delivery(&mut c).await;
        attempts += 1;
        let rejected_before = match headers(&d).get("x-death") {
            None => 0,
            Some(_) => x_death(&d)
                .iter()
                .find(|e| text(e.get("reason")).as_deref() == Some("rejected"))
                .and_then(|e| match e.get("count") {
                    Some(AMQPValue::LongLongInt(n)) => Some(*n),
                    _ => None,
                })
                .expect("rejected count"),
        };
        assert_eq!(rejected_before, attempts - 1);
        if attempts < 4 {
            reject(&d).await;
        } else {
            ack(&d).await;
            break d;
        }
    };
    assert_eq!(attempts, 4);
    assert!(
        start.elapsed() >= Duration::from_millis(3 * TTL),
        "three waits of {TTL} ms took {:?}",
        start.elapsed()
    );
    let deaths = x_death(&last);
    assert_eq!(deaths.len(), 2);
    assert_death(&deaths[0], 3, "expired", &retry, "", &[&retry], None);
    assert_death(&deaths[1], 3, "rejected", &work, "", &[&work], None);
    assert_first_last(&last, (&work, "rejected", ""), (&retry, "expired", ""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_cycles_without_rejection_are_dropped() {
    let (_c, ch) = connect_channel().await;
    // A queue dead-lettering to itself on expiry: the message is dropped, not looped.
    let q = uniq("cycle.self");
    t(ch.queue_declare(
        &q,
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        table(&[
            ("x-message-ttl", int(30)),
            ("x-dead-letter-exchange", s("")),
        ]),
    ))
    .await
    .unwrap();
    publish(&ch, "", &q, b"loop").await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(message_count(&ch, &q).await, 0);

    // The same queue on rejection: a cycle with a rejection in it is allowed.
    let r = uniq("cycle.rej");
    t(ch.queue_declare(
        &r,
        QueueDeclareOptions {
            exclusive: true,
            ..Default::default()
        },
        table(&[("x-dead-letter-exchange", s(""))]),
    ))
    .await
    .unwrap();
    publish(&ch, "", &r, b"again").await;
    let m = wait_get_acked(&ch, &r).await;
    reject(&m).await;
    let m = wait_get_acked(&ch, &r).await;
    assert_eq!(body(&m), "again");
    assert_death(&x_death(&m)[0], 1, "rejected", &r, "", &[&r], None);
    ack(&m).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_cycle_with_an_earlier_rejection_is_not_dropped() {
    // RabbitMQ surprise: one rejection anywhere in the x-death history (here in
    // `entry`) makes every later cycle "not fully automatic": the expiry loop between a
    // and b is never broken (RabbitMQ 3.10 loops forever; so does warren).
    let (_c, ch) = connect_channel().await;
    let a = uniq("cyc2.a");
    let b = uniq("cyc2.b");
    let seen = xqueue(&ch, "cyc2.seen", &[]).await;
    let fan = uniq("cyc2.fan");
    // a expires into fanout `fan` (bound to b and `seen`), b expires back into a.
    t(ch.exchange_declare(
        &fan,
        lapin::ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .unwrap();
    for (name, args) in [
        (
            &a,
            table(&[
                ("x-message-ttl", int(30)),
                ("x-dead-letter-exchange", s(&fan)),
            ]),
        ),
        (
            &b,
            table(&[
                ("x-message-ttl", int(30)),
                ("x-dead-letter-exchange", s("")),
                ("x-dead-letter-routing-key", s(&a)),
            ]),
        ),
    ] {
        t(ch.queue_declare(
            name,
            QueueDeclareOptions {
                exclusive: true,
                ..Default::default()
            },
            args,
        ))
        .await
        .unwrap();
    }
    for q in [&b, &seen] {
        t(ch.queue_bind(
            q,
            &fan,
            "",
            QueueBindOptions::default(),
            FieldTable::default(),
        ))
        .await
        .unwrap();
    }
    let entry = xqueue(
        &ch,
        "cyc2.entry",
        &[
            ("x-dead-letter-exchange", s("")),
            ("x-dead-letter-routing-key", s(&a)),
        ],
    )
    .await;
    publish(&ch, "", &entry, b"m").await;
    let m = wait_get_acked(&ch, &entry).await;
    reject(&m).await;
    // entry -rejected-> a -expired-> fan -> {b, seen}; b -expired-> a -> ... again.
    for _ in 0..3 {
        let d = wait_get(&ch, &seen).await;
        assert_eq!(body(&d), "m");
    }
    let d = wait_get(&ch, &seen).await;
    let deaths = x_death(&d);
    // The latest death is first; the others are found by (queue, reason). RabbitMQ
    // surprise: 3.10 reverses the order of the older entries on every dead-lettering
    // once there are three or more (here it ends up [a, entry, b]); warren keeps them
    // most-recent-first ([a, b, entry]). Position 0 is the same in both.
    assert_eq!(deaths.len(), 3, "{deaths:?}");
    let find = |q: &str| {
        deaths
            .iter()
            .find(|e| text(e.get("queue")).as_deref() == Some(q))
            .unwrap_or_else(|| panic!("no x-death for {q}: {deaths:?}"))
    };
    assert_eq!(text(deaths[0].get("queue")).as_deref(), Some(a.as_str()));
    assert_death(find(&entry), 1, "rejected", &entry, "", &[&entry], None);
    let (na, nb) = match (find(&a).get("count"), find(&b).get("count")) {
        (Some(AMQPValue::LongLongInt(x)), Some(AMQPValue::LongLongInt(y))) => (*x, *y),
        other => panic!("counts {other:?}"),
    };
    // Each round: a expires, then b; `seen` got a copy per expiry of a.
    assert!(na >= 4 && nb == na - 1, "a {na}, b {nb}");
    // Break the loop.
    t(ch.queue_delete(&b, QueueDeleteOptions::default()))
        .await
        .unwrap();
}
