//! Routing semantics of direct, fanout, topic and headers exchanges.

mod common;

use common::*;
use lapin::options::*;
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, ExchangeKind};

async fn setup(ch: &Channel, kind: ExchangeKind) -> String {
    let ex = uniq("rx");
    t(ch.exchange_declare(
        &ex,
        kind,
        ExchangeDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .unwrap();
    ex
}

async fn bind(ch: &Channel, q: &str, ex: &str, key: &str, args: FieldTable) {
    t(ch.queue_bind(q, ex, key, QueueBindOptions::default(), args))
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_routing() {
    let (_c, ch) = connect_channel().await;
    confirm_mode(&ch).await;
    let ex = setup(&ch, ExchangeKind::Direct).await;
    let qa = temp_queue(&ch, "a").await;
    let qb = temp_queue(&ch, "b").await;
    bind(&ch, &qa, &ex, "red", FieldTable::default()).await;
    bind(&ch, &qb, &ex, "green", FieldTable::default()).await;
    bind(&ch, &qb, &ex, "red", FieldTable::default()).await;
    publish_confirmed(&ch, &ex, "red", b"r").await;
    publish_confirmed(&ch, &ex, "green", b"g").await;
    publish_confirmed(&ch, &ex, "blue", b"b").await;
    publish_confirmed(&ch, &ex, "RED", b"R").await; // keys are case-sensitive
    assert_eq!(drain(&ch, &qa).await, vec!["r"]);
    assert_eq!(drain(&ch, &qb).await, vec!["r", "g"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_binding_delivers_once() {
    let (_c, ch) = connect_channel().await;
    confirm_mode(&ch).await;
    let ex = setup(&ch, ExchangeKind::Topic).await;
    let q = temp_queue(&ch, "dup").await;
    bind(&ch, &q, &ex, "a.*", FieldTable::default()).await;
    bind(&ch, &q, &ex, "a.*", FieldTable::default()).await;
    bind(&ch, &q, &ex, "#", FieldTable::default()).await;
    publish_confirmed(&ch, &ex, "a.b", b"once").await;
    assert_eq!(drain(&ch, &q).await, vec!["once"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fanout_routing_ignores_key() {
    let (_c, ch) = connect_channel().await;
    confirm_mode(&ch).await;
    let ex = setup(&ch, ExchangeKind::Fanout).await;
    let qs = [
        temp_queue(&ch, "f1").await,
        temp_queue(&ch, "f2").await,
        temp_queue(&ch, "f3").await,
    ];
    for q in &qs {
        bind(&ch, q, &ex, "whatever", FieldTable::default()).await;
    }
    publish_confirmed(&ch, &ex, "some.key", b"all").await;
    for q in &qs {
        assert_eq!(drain(&ch, q).await, vec!["all"]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_routing_wildcards() {
    let (_c, ch) = connect_channel().await;
    confirm_mode(&ch).await;
    let ex = setup(&ch, ExchangeKind::Topic).await;
    let star = temp_queue(&ch, "star").await;
    let hash = temp_queue(&ch, "hash").await;
    let mid = temp_queue(&ch, "mid").await;
    let exact = temp_queue(&ch, "exact").await;
    let all = temp_queue(&ch, "all").await;
    bind(&ch, &star, &ex, "stock.*.nyse", FieldTable::default()).await;
    bind(&ch, &hash, &ex, "stock.#", FieldTable::default()).await;
    bind(&ch, &mid, &ex, "*.#.end", FieldTable::default()).await;
    bind(&ch, &exact, &ex, "stock.usd.nyse", FieldTable::default()).await;
    bind(&ch, &all, &ex, "#", FieldTable::default()).await;
    for key in [
        "stock.usd.nyse",
        "stock.eur",
        "stock",
        "stock.a.b.nyse",
        "x.end",
        "x.y.z.end",
        "end",
        "",
    ] {
        publish_confirmed(&ch, &ex, key, key.as_bytes()).await;
    }
    assert_eq!(drain(&ch, &star).await, vec!["stock.usd.nyse"]);
    // `#` matches zero or more words: "stock" itself matches "stock.#".
    assert_eq!(
        drain(&ch, &hash).await,
        vec!["stock.usd.nyse", "stock.eur", "stock", "stock.a.b.nyse"]
    );
    assert_eq!(drain(&ch, &mid).await, vec!["x.end", "x.y.z.end"]);
    assert_eq!(drain(&ch, &exact).await, vec!["stock.usd.nyse"]);
    assert_eq!(
        drain(&ch, &all).await.len(),
        8,
        "# matches everything, even the empty key"
    );
}

fn headers(pairs: &[(&str, AMQPValue)]) -> FieldTable {
    let mut t = FieldTable::default();
    for (k, v) in pairs {
        t.insert((*k).into(), v.clone());
    }
    t
}

fn s(v: &str) -> AMQPValue {
    AMQPValue::LongString(v.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_routing_all_and_any() {
    let (_c, ch) = connect_channel().await;
    confirm_mode(&ch).await;
    let ex = setup(&ch, ExchangeKind::Headers).await;
    let q_all = temp_queue(&ch, "all").await;
    let q_any = temp_queue(&ch, "any").await;
    let q_default = temp_queue(&ch, "dflt").await;
    bind(
        &ch,
        &q_all,
        &ex,
        "",
        headers(&[
            ("x-match", s("all")),
            ("format", s("pdf")),
            ("type", s("report")),
        ]),
    )
    .await;
    bind(
        &ch,
        &q_any,
        &ex,
        "",
        headers(&[
            ("x-match", s("any")),
            ("format", s("pdf")),
            ("type", s("report")),
        ]),
    )
    .await;
    // No x-match: defaults to all.
    bind(
        &ch,
        &q_default,
        &ex,
        "",
        headers(&[("format", s("pdf")), ("type", s("report"))]),
    )
    .await;

    let cases: [(&str, FieldTable); 4] = [
        (
            "both",
            headers(&[
                ("format", s("pdf")),
                ("type", s("report")),
                ("extra", s("x")),
            ]),
        ),
        ("format-only", headers(&[("format", s("pdf"))])),
        (
            "wrong-value",
            headers(&[("format", s("zip")), ("type", s("log"))]),
        ),
        ("none", FieldTable::default()),
    ];
    for (body, h) in cases {
        publish_with(
            &ch,
            &ex,
            "ignored",
            BasicPublishOptions::default(),
            BasicProperties::default().with_headers(h),
            body.as_bytes(),
        )
        .await
        .unwrap();
    }
    assert_eq!(drain(&ch, &q_all).await, vec!["both"]);
    assert_eq!(drain(&ch, &q_default).await, vec!["both"]);
    assert_eq!(drain(&ch, &q_any).await, vec!["both", "format-only"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_routing_typed_values_and_amq_match() {
    let (_c, ch) = connect_channel().await;
    confirm_mode(&ch).await;
    let q = temp_queue(&ch, "typed").await;
    let tag = uniq("tag");
    bind(
        &ch,
        &q,
        "amq.match",
        "",
        headers(&[
            ("x-match", s("all")),
            ("n", AMQPValue::LongInt(42)),
            ("tag", s(&tag)),
        ]),
    )
    .await;
    // Same number with the same type matches.
    publish_with(
        &ch,
        "amq.match",
        "",
        BasicPublishOptions::default(),
        BasicProperties::default()
            .with_headers(headers(&[("n", AMQPValue::LongInt(42)), ("tag", s(&tag))])),
        b"int-42",
    )
    .await
    .unwrap();
    publish_with(
        &ch,
        "amq.match",
        "",
        BasicPublishOptions::default(),
        BasicProperties::default()
            .with_headers(headers(&[("n", AMQPValue::LongInt(43)), ("tag", s(&tag))])),
        b"int-43",
    )
    .await
    .unwrap();
    assert_eq!(drain(&ch, &q).await, vec!["int-42"]);
}
