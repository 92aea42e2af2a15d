//! One shovel's task: an AMQP 0-9-1 client (lapin) connected to the source and
//! the destination. It declares what RabbitMQ's shovel declares (a `src-queue` /
//! `dest-queue` that does not exist, durable; for an exchange source, an
//! exclusive queue of its own bound to it), consumes with the prefetch, publishes
//! each message with its properties, and acknowledges at the source per the ack
//! mode: `on-confirm` only after the destination's publisher confirm, so a
//! failure anywhere leaves the message at the source to be delivered again
//! (at-least-once). After a failure it reconnects after `reconnect-delay`,
//! doubling the wait while failures repeat (up to 16 times the delay, at most a
//! minute more than it); `reconnect-delay` 0 stops for good, as in RabbitMQ.

use super::{AckMode, Definition, DeleteAfter, Destination, Shovels, Source, State, Status};
use futures::stream::FuturesOrdered;
use futures::{FutureExt, StreamExt};
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, QueueBindOptions,
    QueueDeclareOptions,
};
use lapin::publisher_confirm::Confirmation;
use lapin::types::{AMQPValue, FieldArray, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

/// What a task needs.
pub(super) struct Job {
    pub shovels: Weak<Shovels>,
    pub vhost: String,
    pub name: String,
    pub generation: u64,
    pub def: Arc<Definition>,
    pub status: Arc<Status>,
    pub local: String,
}

/// How long connecting (TCP, TLS, AMQP handshake) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Run the shovel until it is aborted, finishes its `src-delete-after` work, or
/// fails with `reconnect-delay` 0.
pub(super) async fn run(job: Job) {
    let mut failures = 0u32;
    let mut attempt = 0usize;
    loop {
        job.status.set(State::Starting, None);
        let mut ran = false;
        match session(&job, attempt, &mut ran).await {
            Ok(()) => {
                tracing::info!(vhost = %job.vhost, name = %job.name, "shovel finished (src-delete-after)");
                job.status.set(State::Terminated, None);
                if let Some(s) = job.shovels.upgrade() {
                    s.completed(&job.vhost, &job.name, job.generation);
                }
                return;
            }
            Err(reason) => {
                tracing::warn!(vhost = %job.vhost, name = %job.name, %reason, "shovel terminated");
                job.status.set(State::Terminated, Some(reason));
                job.status.unconfirmed.store(0, Ordering::Relaxed);
            }
        }
        let base = job.def.reconnect_delay;
        if base.is_zero() {
            return;
        }
        failures = if ran { 0 } else { failures.saturating_add(1) };
        attempt = attempt.wrapping_add(1);
        tokio::time::sleep(backoff(base, failures)).await;
    }
}

/// The wait before reconnecting after `failures` consecutive failed attempts
/// (0: the last session had been running).
pub(super) fn backoff(base: Duration, failures: u32) -> Duration {
    let factor = 1u32 << failures.min(4);
    let cap = base + Duration::from_secs(60);
    (base * factor).min(cap)
}

/// `uri` with an empty authority (`amqp://`, `amqp:///vhost`) pointing at this
/// broker, and without the TLS query keys lapin does not know; plus the TLS
/// settings those keys gave (`cacertfile`).
fn resolve(uri: &str, local: &str) -> Result<(String, lapin::tcp::OwnedTLSConfig), String> {
    let (scheme, rest) = uri.split_once("://").ok_or("not a URI")?;
    let rest = if rest.is_empty() || rest.starts_with('/') || rest.starts_with('?') {
        format!("{local}{rest}")
    } else {
        rest.to_string()
    };
    let mut tls = lapin::tcp::OwnedTLSConfig::default();
    let (base, query) = match rest.split_once('?') {
        Some((b, q)) => (b.to_string(), q),
        None => (rest, ""),
    };
    let mut kept = Vec::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "cacertfile" => {
                let path = percent_decode(v);
                let pem = std::fs::read_to_string(&path)
                    .map_err(|e| format!("cannot read cacertfile {path}: {e}"))?;
                tls.cert_chain = Some(pem);
            }
            "certfile" | "keyfile" => {
                return Err(format!(
                    "{k}: client certificates in shovel URIs are not supported"
                ))
            }
            "verify" | "server_name_indication" | "fail_if_no_peer_cert" => {}
            _ => kept.push(pair),
        }
    }
    let base = if kept.is_empty() {
        base
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    Ok((format!("{scheme}://{base}"), tls))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
            if let Some(n) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(n);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

async fn connect(job: &Job, uri: &str, side: &str) -> Result<Connection, String> {
    let shown = super::redact(uri);
    let (uri, tls) = resolve(uri, &job.local).map_err(|e| format!("{side} {shown}: {e}"))?;
    let props = ConnectionProperties::default()
        .with_connection_name(LongString::from(format!("Shovel {}", job.name)))
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio);
    match tokio::time::timeout(
        CONNECT_TIMEOUT,
        Connection::connect_with_config(&uri, props, tls),
    )
    .await
    {
        Ok(Ok(c)) => Ok(c),
        Ok(Err(e)) => Err(format!("{side} {shown}: {e}")),
        Err(_) => Err(format!("{side} {shown}: connection timed out")),
    }
}

/// Make sure `queue` exists, as RabbitMQ's shovel does (declared durable when
/// absent; only checked when `predeclared`); its message count.
///
/// The durable declare goes first: it creates an absent queue and is a no-op on
/// an equal one; a queue that exists with other properties (arguments, a queue
/// type) refuses it, and a passive declare on a fresh channel then checks it is
/// there. Asking passively first would make every absent queue a channel error.
async fn ensure_queue(conn: &Connection, queue: &str, predeclared: bool) -> lapin::Result<u32> {
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    if !predeclared {
        let ch = conn.create_channel().await?;
        let durable = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        if let Ok(q) = ch
            .queue_declare(queue, durable, FieldTable::default())
            .await
        {
            let _ = ch.close(200, "ok").await;
            return Ok(q.message_count());
        }
    }
    let ch = conn.create_channel().await?;
    let q = ch
        .queue_declare(queue, passive, FieldTable::default())
        .await?;
    let _ = ch.close(200, "ok").await;
    Ok(q.message_count())
}

/// One connected run: Ok when `src-delete-after` is done, else why it stopped.
/// `ran` is set once the shovel was running.
async fn session(job: &Job, attempt: usize, ran: &mut bool) -> Result<(), String> {
    let def = &*job.def;
    let pick = |uris: &[String]| uris[attempt % uris.len().max(1)].clone();
    let (src_uri, dest_uri) = (pick(&def.src_uris), pick(&def.dest_uris));
    job.status.set_uris(&src_uri, &dest_uri);
    let src = connect(job, &src_uri, "source").await?;
    let dest = match connect(job, &dest_uri, "destination").await {
        Ok(d) => d,
        Err(e) => {
            let _ = src.close(200, "shovel stopping").await;
            return Err(e);
        }
    };
    let result = transfer(job, &src, &dest, ran).await;
    let _ = src.close(200, "shovel stopping").await;
    let _ = dest.close(200, "shovel stopping").await;
    result
}

fn err(side: &'static str) -> impl Fn(lapin::Error) -> String {
    move |e| format!("{side}: {e}")
}

async fn transfer(
    job: &Job,
    src: &Connection,
    dest: &Connection,
    ran: &mut bool,
) -> Result<(), String> {
    let def = &*job.def;
    let status = &job.status;
    let (fail_tx, mut fail_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    for (conn, side) in [(src, "source"), (dest, "destination")] {
        let tx = fail_tx.clone();
        conn.on_error(move |e| {
            let _ = tx.send(format!("{side} connection: {e}"));
        });
    }
    let queue = match &def.source {
        Source::Queue(q) => {
            let count = ensure_queue(src, q, def.src_predeclared)
                .await
                .map_err(err("source"))?;
            if def.delete_after == DeleteAfter::QueueLength {
                // The backlog when the shovel first started: fixed from then on.
                let _ = status.remaining.compare_exchange(
                    -2,
                    i64::from(count),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                );
            }
            q.clone()
        }
        Source::Exchange { exchange, key } => {
            let ch = src.create_channel().await.map_err(err("source"))?;
            let q = ch
                .queue_declare(
                    "",
                    QueueDeclareOptions {
                        exclusive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .map_err(err("source"))?;
            ch.queue_bind(
                q.name().as_str(),
                exchange,
                key,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(err("source"))?;
            q.name().to_string()
        }
    };
    if let Destination::Queue(q) = &def.destination {
        ensure_queue(dest, q, def.dest_predeclared)
            .await
            .map_err(err("destination"))?;
    }
    let remaining = || status.remaining.load(Ordering::Relaxed);
    if remaining() == 0 {
        return Ok(());
    }
    let limited = remaining() >= 0;
    let src_ch = src.create_channel().await.map_err(err("source"))?;
    let mut prefetch = def.prefetch_count;
    if limited {
        let left = u16::try_from(remaining()).unwrap_or(u16::MAX);
        if prefetch == 0 || left < prefetch {
            prefetch = left;
        }
    }
    // A limited no-ack shovel still acks (right away): deliveries past the limit
    // must go back to the queue when it stops.
    let auto_ack = def.ack_mode == AckMode::NoAck && !limited;
    if !auto_ack {
        src_ch
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .map_err(err("source"))?;
    }
    let dest_ch = dest.create_channel().await.map_err(err("destination"))?;
    if def.ack_mode == AckMode::OnConfirm {
        dest_ch
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(err("destination"))?;
    }
    let tag = format!("shovel-{}", job.name);
    let mut consumer = src_ch
        .basic_consume(
            &queue,
            &tag,
            BasicConsumeOptions {
                no_ack: auto_ack,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .map_err(err("source"))?;
    status.set(State::Running, None);
    *ran = true;
    tracing::info!(vhost = %job.vhost, name = %job.name, "shovel running");
    // A closed channel (or connection) says why through these; the failing
    // call that notices it only says the channel is closing.
    for (ch, side) in [(&src_ch, "source"), (&dest_ch, "destination")] {
        let tx = fail_tx.clone();
        ch.on_error(move |e| {
            let _ = tx.send(format!("{side}: {e}"));
        });
    }
    let outcome: Result<(), String> = async {
    let forward = Forward::new(job);
    let mut confirms = FuturesOrdered::new();
    loop {
        let left = remaining();
        if limited && left <= 0 && confirms.is_empty() {
            let _ = src_ch
                .basic_cancel(&tag, BasicCancelOptions::default())
                .await;
            return Ok(());
        }
        // Take no more than the limit still needs (counting those in flight).
        let wanted = !limited || (confirms.len() as i64) < left;
        tokio::select! {
            Some(reason) = fail_rx.recv() => return Err(reason),
            Some((delivery_tag, confirm)) = confirms.next(), if !confirms.is_empty() => {
                let mut last = ack_outcome(confirm)?;
                let mut acked_to = delivery_tag;
                let mut count = u64::from(last);
                if !last {
                    nack(&src_ch, delivery_tag).await?;
                }
                // Ack every confirm already in, with one multiple ack.
                while let Some(Some((t, c))) = confirms.next().now_or_never() {
                    let ok = ack_outcome(c)?;
                    if ok {
                        acked_to = t;
                        count += 1;
                        last = true;
                    } else {
                        if last {
                            ack(&src_ch, acked_to, true).await?;
                            settle(status, limited, count);
                            count = 0;
                            last = false;
                        }
                        nack(&src_ch, t).await?;
                    }
                }
                if last {
                    ack(&src_ch, acked_to, true).await?;
                    settle(status, limited, count);
                }
                status.unconfirmed.store(confirms.len() as u64, Ordering::Relaxed);
            }
            next = consumer.next(), if wanted => {
                let mut delivery = match next {
                    None => return Err("source: the consumer was cancelled".into()),
                    Some(d) => d.map_err(err("source"))?,
                };
                let properties = forward.properties(
                    std::mem::take(&mut delivery.properties),
                    &delivery.exchange,
                    &delivery.routing_key,
                );
                let (exchange, key) = forward.target(&delivery);
                let confirm = dest_ch
                    .basic_publish(exchange, key, BasicPublishOptions::default(), &delivery.data, properties)
                    .await
                    .map_err(err("destination"))?;
                status.forwarded.fetch_add(1, Ordering::Relaxed);
                match def.ack_mode {
                    AckMode::OnConfirm => {
                        confirms.push_back(confirm.map(move |c| (delivery.delivery_tag, c)));
                        status.unconfirmed.store(confirms.len() as u64, Ordering::Relaxed);
                    }
                    AckMode::OnPublish => {
                        ack(&src_ch, delivery.delivery_tag, false).await?;
                        settle(status, limited, 1);
                    }
                    AckMode::NoAck => {
                        if !auto_ack {
                            ack(&src_ch, delivery.delivery_tag, false).await?;
                        }
                        settle(status, limited, 1);
                    }
                }
            }
        }
    }
    }
    .await;
    match outcome {
        Ok(()) => Ok(()),
        // The close's reason reaches the handlers just after the channel is
        // marked closing: wait a moment for it.
        Err(e) => match tokio::time::timeout(Duration::from_millis(250), fail_rx.recv()).await {
            Ok(Some(reason)) => Err(reason),
            _ => Err(e),
        },
    }
}

/// Whether a confirm was an ack (false: a nack); an error ends the session.
fn ack_outcome(c: lapin::Result<Confirmation>) -> Result<bool, String> {
    match c.map_err(err("destination"))? {
        Confirmation::Ack(_) | Confirmation::NotRequested => Ok(true),
        Confirmation::Nack(_) => Ok(false),
    }
}

async fn ack(ch: &Channel, tag: u64, multiple: bool) -> Result<(), String> {
    ch.basic_ack(tag, BasicAckOptions { multiple })
        .await
        .map_err(err("source"))
}

/// The destination refused a message: back to the source queue, to be tried again.
async fn nack(ch: &Channel, tag: u64) -> Result<(), String> {
    tracing::warn!(tag, "destination nacked a message; requeued at the source");
    ch.basic_nack(
        tag,
        BasicNackOptions {
            multiple: false,
            requeue: true,
        },
    )
    .await
    .map_err(err("source"))
}

/// `n` messages are done with at the source.
fn settle(status: &Status, limited: bool, n: u64) {
    status.acknowledged.fetch_add(n, Ordering::Relaxed);
    if limited {
        status
            .remaining
            .fetch_sub(i64::try_from(n).unwrap_or(i64::MAX), Ordering::Relaxed);
    }
}

/// Where and how each message is published.
struct Forward<'a> {
    job: &'a Job,
}

impl<'a> Forward<'a> {
    fn new(job: &'a Job) -> Forward<'a> {
        Forward { job }
    }

    fn target<'d>(&'d self, d: &'d lapin::message::Delivery) -> (&'d str, &'d str) {
        match &self.job.def.destination {
            Destination::Queue(q) => ("", q),
            Destination::Exchange { exchange, key } => {
                (exchange, key.as_deref().unwrap_or(d.routing_key.as_str()))
            }
            Destination::Same => (d.exchange.as_str(), d.routing_key.as_str()),
        }
    }

    /// The message's properties, with `dest-publish-properties` and the
    /// forward / timestamp headers applied.
    fn properties(
        &self,
        mut p: BasicProperties,
        exchange: &ShortString,
        routing_key: &ShortString,
    ) -> BasicProperties {
        let def = &*self.job.def;
        for (k, v) in &def.publish_properties {
            let s = || ShortString::from(v.as_str().unwrap_or_default().to_string());
            let n = v.as_u64().unwrap_or(0);
            p = match k.as_str() {
                "content_type" => p.with_content_type(s()),
                "content_encoding" => p.with_content_encoding(s()),
                "delivery_mode" => p.with_delivery_mode(u8::try_from(n).unwrap_or(2)),
                "priority" => p.with_priority(u8::try_from(n).unwrap_or(0)),
                "correlation_id" => p.with_correlation_id(s()),
                "reply_to" => p.with_reply_to(s()),
                "expiration" => p.with_expiration(s()),
                "message_id" => p.with_message_id(s()),
                "timestamp" => p.with_timestamp(n),
                "type" => p.with_type(s()),
                "user_id" => p.with_user_id(s()),
                "app_id" => p.with_app_id(s()),
                "cluster_id" => p.with_cluster_id(s()),
                _ => p,
            };
        }
        if !def.add_forward_headers && !def.add_timestamp_header {
            return p;
        }
        let mut headers = p.headers().clone().unwrap_or_default();
        if def.add_forward_headers {
            let mut t = FieldTable::default();
            let text = |s: &str| AMQPValue::LongString(LongString::from(s.to_string()));
            t.insert("shovelled-by".into(), text(&crate::admin::node_name()));
            t.insert("shovel-type".into(), text("dynamic"));
            t.insert("shovel-name".into(), text(&self.job.name));
            t.insert("shovel-vhost".into(), text(&self.job.vhost));
            let phase = self.job.status.phase.lock();
            t.insert("src-uri".into(), text(&phase.src_uri));
            t.insert("dest-uri".into(), text(&phase.dest_uri));
            drop(phase);
            t.insert("src-exchange".into(), text(exchange.as_str()));
            t.insert("src-exchange-key".into(), text(routing_key.as_str()));
            let mut list = vec![AMQPValue::FieldTable(t)];
            if let Some(AMQPValue::FieldArray(old)) = headers.inner().get("x-shovelled") {
                list.extend(old.as_slice().iter().cloned());
            }
            headers.insert(
                "x-shovelled".into(),
                AMQPValue::FieldArray(FieldArray::from(list)),
            );
        }
        if def.add_timestamp_header {
            let secs = crate::clock::now_ms() / 1000;
            headers.insert(
                "x-shovelled-timestamp".into(),
                AMQPValue::LongLongInt(i64::try_from(secs).unwrap_or(i64::MAX)),
            );
        }
        p.with_headers(headers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_a_cap() {
        let s = Duration::from_secs(1);
        assert_eq!(backoff(s, 0), s);
        assert_eq!(backoff(s, 1), 2 * s);
        assert_eq!(backoff(s, 4), 16 * s);
        assert_eq!(backoff(s, 40), 16 * s);
        assert_eq!(backoff(Duration::from_secs(5), 4), Duration::from_secs(65));
    }

    #[test]
    fn empty_authority_is_this_broker_and_tls_keys_are_taken_out() {
        let (u, tls) = resolve("amqp://", "g:g@127.0.0.1:5672").expect("ok");
        assert_eq!(u, "amqp://g:g@127.0.0.1:5672");
        assert!(tls.cert_chain.is_none());
        let (u, _) = resolve("amqp:///vh?heartbeat=5&verify=verify_peer", "h:1").expect("ok");
        assert_eq!(u, "amqp://h:1/vh?heartbeat=5");
        assert!(resolve("amqps://h?certfile=/x", "l").is_err());
        assert!(resolve("amqps://h?cacertfile=/nonexistent/ca.pem", "l").is_err());
        assert_eq!(percent_decode("%2Ftmp%2fca.pem"), "/tmp/ca.pem");
    }
}
