//! Alternate exchanges: unroutable messages go to the exchange's `alternate-exchange`.

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alternate_exchange_gets_unroutable_messages() {
    let (_c, ch) = connect_channel().await;
    let ae = uniq("ae");
    let main = uniq("ae.main");
    t(ch.exchange_declare(
        &ae,
        lapin::ExchangeKind::Fanout,
        ExchangeDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        FieldTable::default(),
    ))
    .await
    .unwrap();
    t(ch.exchange_declare(
        &main,
        lapin::ExchangeKind::Direct,
        ExchangeDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        table(&[("alternate-exchange", s(&ae))]),
    ))
    .await
    .unwrap();
    let routed = xqueue(&ch, "ae.routed", &[]).await;
    let unrouted = xqueue(&ch, "ae.unrouted", &[]).await;
    t(ch.queue_bind(
        &routed,
        &main,
        "known",
        QueueBindOptions::default(),
        FieldTable::default(),
    ))
    .await
    .unwrap();
    t(ch.queue_bind(
        &unrouted,
        &ae,
        "",
        QueueBindOptions::default(),
        FieldTable::default(),
    ))
    .await
    .unwrap();
    confirm_mode(&ch).await;
    for key in ["known", "unknown"] {
        let c = publish_with(
            &ch,
            &main,
            key,
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            BasicProperties::default(),
            key.as_bytes(),
        )
        .await
        .unwrap();
        assert!(c.is_ack());
        // Routed through the AE: not returned.
        assert!(c.take_message().is_none(), "{key} was returned");
    }
    assert_eq!(drain(&ch, &routed).await, ["known"]);
    let d = wait_get(&ch, &unrouted).await;
    assert_eq!(body(&d), "unknown");
    // The message keeps the exchange and key it was published with.
    assert_eq!(d.exchange.as_str(), main);
    assert_eq!(d.routing_key.as_str(), "unknown");
}
