//! Vhost metadata (description, tags, default queue type) through the API,
//! definitions and AMQP declares, and the firehose tracer (`tracing` on a
//! vhost, `amq.rabbitmq.trace`) with lapin, checked against what RabbitMQ
//! 3.10 answers for the same calls.

use crate::helpers::*;
use futures::StreamExt;
use lapin::types::{AMQPValue, FieldArray, LongString, ShortString};
use lapin::Channel;

/// The `type` and `arguments` the API shows for queue `q` in `vhost`.
async fn queue_type(b: &Broker, vhost: &str, q: &str) -> (String, Value) {
    let v = b.get(&format!("/api/queues/{vhost}/{q}")).await;
    (
        v["type"].as_str().unwrap_or_default().to_string(),
        v["arguments"].clone(),
    )
}

async fn declare(ch: &Channel, q: &str, durable: bool, args: FieldTable) -> String {
    let options = QueueDeclareOptions {
        durable,
        exclusive: q.is_empty(),
        ..Default::default()
    };
    t(ch.queue_declare(q, options, args))
        .await
        .expect("declare")
        .name()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vhost_metadata_is_kept_exported_imported_and_its_default_queue_type_applies() {
    let b = start().await;
    let root = b.get("/api/vhosts/%2F").await;
    assert_eq!(root["description"], "Default virtual host", "{root}");
    assert_eq!(root["default_queue_type"], "undefined");
    assert_eq!(root["tracing"], false);

    let created = b
        .ok(
            "PUT",
            "/api/vhosts/dq",
            json!({"description": "defaults to quorum", "tags": "x, y", "default_queue_type": "quorum"}),
        )
        .await;
    assert_eq!(created, 201);
    let dq = b.get("/api/vhosts/dq").await;
    assert_eq!(dq["description"], "defaults to quorum", "{dq}");
    assert_eq!(dq["tags"], json!(["x", "y"]));
    assert_eq!(dq["default_queue_type"], "quorum");
    assert_eq!(dq["metadata"]["default_queue_type"], "quorum");
    let (status, _) = b
        .call(
            "PUT",
            "/api/vhosts/bad",
            GUEST,
            Some(json!({"default_queue_type": "lazy"})),
        )
        .await;
    assert_eq!(status, 400, "an unknown default queue type is refused");
    assert_eq!(b.call("GET", "/api/vhosts/bad", GUEST, None).await.0, 404);

    // As RabbitMQ's augment_declare_args: durable, non-exclusive,
    // non-auto-delete declares without a type get the vhost's.
    let conn = b.amqp("guest", "guest", "dq").await.expect("connect to dq");
    let ch = t(conn.create_channel()).await.expect("channel");
    declare(&ch, "d1", true, FieldTable::default()).await;
    declare(&ch, "d2", false, FieldTable::default()).await;
    let mut classic = FieldTable::default();
    classic.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("classic")),
    );
    declare(&ch, "d3", true, classic).await;
    let exclusive = declare(&ch, "", true, FieldTable::default()).await;
    let (kind, args) = queue_type(&b, "dq", "d1").await;
    assert_eq!(
        (kind.as_str(), &args["x-queue-type"]),
        ("quorum", &json!("quorum"))
    );
    assert_eq!(queue_type(&b, "dq", "d2").await.0, "classic");
    assert_eq!(queue_type(&b, "dq", "d3").await.0, "classic");
    assert_eq!(queue_type(&b, "dq", &exclusive).await.0, "classic");
    // The same code declaring again is equivalent.
    declare(&ch, "d1", true, FieldTable::default()).await;
    // The API's queue PUT gets the default too.
    b.ok("PUT", "/api/queues/dq/d4", json!({"durable": true}))
        .await;
    assert_eq!(queue_type(&b, "dq", "d4").await.0, "quorum");

    // Tracing alone leaves the default queue type; description and tags
    // are replaced (missing: empty), as RabbitMQ's PUT does.
    b.ok("PUT", "/api/vhosts/dq", json!({"tracing": true}))
        .await;
    let dq = b.get("/api/vhosts/dq").await;
    assert_eq!(dq["tracing"], true);
    assert_eq!(dq["description"], "");
    assert_eq!(dq["default_queue_type"], "quorum");

    let defs = b.get("/api/definitions").await;
    let exported = defs["vhosts"]
        .as_array()
        .and_then(|a| a.iter().find(|v| v["name"] == "dq"))
        .cloned()
        .expect("dq exported");
    assert_eq!(
        exported["metadata"]["default_queue_type"], "quorum",
        "{exported}"
    );

    b.ok(
        "POST",
        "/api/definitions",
        json!({"vhosts": [{"name": "imported", "metadata": {"description": "from a file", "tags": ["t"], "default_queue_type": "stream"}}]}),
    )
    .await;
    let imported = b.get("/api/vhosts/imported").await;
    assert_eq!(imported["description"], "from a file", "{imported}");
    assert_eq!(imported["tags"], json!(["t"]));
    assert_eq!(imported["default_queue_type"], "stream");
    // An entry without metadata (as RabbitMQ 3.10 exports vhosts) keeps it.
    b.ok(
        "POST",
        "/api/definitions",
        json!({"vhosts": [{"name": "imported"}]}),
    )
    .await;
    let again = b.get("/api/vhosts/imported").await;
    assert_eq!(again["description"], "from a file", "{again}");
    assert_eq!(again["default_queue_type"], "stream");
}

/// A header of a trace message, as JSON-ish text for comparison.
fn header<'a>(d: &'a lapin::message::BasicGetMessage, name: &str) -> &'a AMQPValue {
    d.delivery
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(name))
        .unwrap_or_else(|| panic!("no header {name}"))
}

fn text(v: &AMQPValue) -> String {
    match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_string(),
        other => panic!("not a string: {other:?}"),
    }
}

fn strings(v: &AMQPValue) -> Vec<String> {
    match v {
        AMQPValue::FieldArray(a) => a.as_slice().iter().map(text).collect(),
        other => panic!("not an array: {other:?}"),
    }
}

async fn next_trace(ch: &Channel, q: &str) -> Option<lapin::message::BasicGetMessage> {
    t(ch.basic_get(q, BasicGetOptions { no_ack: true }))
        .await
        .expect("get")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_firehose_traces_publishes_and_deliveries_while_tracing_is_on() {
    let b = start().await;
    let x = b.get("/api/exchanges/%2F/amq.rabbitmq.trace").await;
    assert_eq!(
        (x["type"].as_str(), x["internal"].as_bool()),
        (Some("topic"), Some(true))
    );

    let conn = b.amqp("guest", "guest", "/").await.expect("connect");
    let ch = t(conn.create_channel()).await.expect("channel");
    let traces = declare(&ch, "", false, FieldTable::default()).await;
    t(ch.queue_bind(
        &traces,
        "amq.rabbitmq.trace",
        "#",
        QueueBindOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("bind");
    declare(&ch, "work", false, FieldTable::default()).await;
    let publish = |body: &'static [u8]| {
        let mut headers = FieldTable::default();
        headers.insert(
            "CC".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongString(
                LongString::from("elsewhere"),
            )])),
        );
        let props = BasicProperties::default()
            .with_content_type(ShortString::from("text/plain"))
            .with_delivery_mode(2)
            .with_headers(headers);
        let ch = ch.clone();
        async move {
            t(ch.basic_publish("", "work", BasicPublishOptions::default(), body, props))
                .await
                .expect("publish");
        }
    };

    // Off: nothing traced.
    publish(b"untraced").await;
    t(ch.basic_get("work", BasicGetOptions { no_ack: true }))
        .await
        .expect("get")
        .expect("the message");
    assert!(next_trace(&ch, &traces).await.is_none(), "traced while off");

    b.ok("PUT", "/api/vhosts/%2F", json!({"tracing": true}))
        .await;
    assert_eq!(b.get("/api/vhosts/%2F").await["tracing"], true);
    publish(b"traced").await;
    let p = next_trace(&ch, &traces).await.expect("publish traced");
    assert_eq!(p.delivery.routing_key.as_str(), "publish.");
    assert_eq!(p.delivery.exchange.as_str(), "amq.rabbitmq.trace");
    assert_eq!(p.delivery.data, b"traced");
    assert_eq!(text(header(&p, "exchange_name")), "");
    assert_eq!(strings(header(&p, "routing_keys")), ["work", "elsewhere"]);
    assert_eq!(strings(header(&p, "routed_queues")), ["work"]);
    assert_eq!(text(header(&p, "user")), "guest");
    assert_eq!(text(header(&p, "vhost")), "/");
    assert_eq!(header(&p, "channel"), &AMQPValue::LongInt(1));
    let connection = text(header(&p, "connection"));
    assert!(connection.starts_with("127.0.0.1:"), "{connection}");
    assert!(text(header(&p, "node")).starts_with("warren@"));
    let AMQPValue::FieldTable(props) = header(&p, "properties") else {
        panic!("properties is not a table");
    };
    assert_eq!(
        props.inner().get("content_type"),
        Some(&AMQPValue::LongString(LongString::from("text/plain")))
    );
    assert_eq!(
        props.inner().get("delivery_mode"),
        Some(&AMQPValue::LongInt(2))
    );

    // A consumer's delivery is traced as deliver.<queue>.
    let mut consumer = t(ch.basic_consume(
        "work",
        "c",
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await
    .expect("consume");
    let d = t(consumer.next())
        .await
        .expect("a delivery")
        .expect("delivery");
    assert_eq!(d.data, b"traced");
    let dt = next_trace(&ch, &traces).await.expect("delivery traced");
    assert_eq!(dt.delivery.routing_key.as_str(), "deliver.work");
    assert_eq!(header(&dt, "redelivered"), &AMQPValue::LongInt(0));
    assert_eq!(strings(header(&dt, "routing_keys")), ["work", "elsewhere"]);
    // Getting the trace messages traced nothing more (no loop).
    assert!(next_trace(&ch, &traces).await.is_none());

    // The management API's publish is traced, with its own connection name.
    b.ok(
        "POST",
        "/api/exchanges/%2F/amq.direct/publish",
        json!({"properties": {}, "routing_key": "none", "payload": "via http", "payload_encoding": "string"}),
    )
    .await;
    let h = next_trace(&ch, &traces).await.expect("API publish traced");
    assert_eq!(h.delivery.routing_key.as_str(), "publish.amq.direct");
    assert_eq!(text(header(&h, "connection")), "HTTP API");
    assert_eq!(strings(header(&h, "routed_queues")), Vec::<String>::new());

    // Clients may not publish to the trace exchange (internal): 403.
    let side = t(conn.create_channel()).await.expect("channel");
    let rx = crate::common::watch_channel(&side);
    let _ = t(side.basic_publish(
        "amq.rabbitmq.trace",
        "x",
        BasicPublishOptions::default(),
        b"no",
        BasicProperties::default(),
    ))
    .await;
    crate::common::expect_closed_with(rx, 403).await;

    b.ok("PUT", "/api/vhosts/%2F", json!({"tracing": false}))
        .await;
    publish(b"off again").await;
    assert!(next_trace(&ch, &traces).await.is_none(), "traced after off");
}
