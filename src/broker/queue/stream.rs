//! Stream queues (`x-queue-type: stream`) as a [`Queue`] runs them: publishes
//! append to the queue's [`StreamLog`]; each AMQP 0-9-1 consumer is a task
//! reading the log from its `x-stream-offset`, delivering while it has credit
//! (prefetch) and waiting on the log's committed offset for more. Acks return
//! credit and delete nothing; several consumers read independently.
//!
//! Messages are stored in AMQP 1.0 format (so the Stream protocol reads what
//! AMQP 0-9-1 publishes, and the other way round); each delivery carries the
//! `x-stream-offset` header.

use super::{Consumer, Delivery, Enqueued, Queue, QueueArgs};
use crate::broker::message::{Entry, Message, ShortStr};
use crate::error::{AmqpError, AmqpResult};
use crate::storage::stream::{
    chunk, BatchLimits, BatchRead, OffsetSpec, Retention, StreamError, StreamLog, StreamMessage,
    StreamReader, StreamStore, DEFAULT_MAX_SEGMENT_SIZE,
};
use crate::wire::amqp10;
use crate::wire::{BasicProperties, FieldValue};
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The stream side of a stream queue.
#[derive(Debug)]
pub struct StreamQueue {
    pub log: Arc<StreamLog>,
    store: StreamStore,
    key: String,
    readers: Mutex<Vec<Arc<Reader>>>,
}

/// One consumer's reading task, as the queue sees it.
#[derive(Debug)]
struct Reader {
    consumer: Arc<Consumer>,
    wake: tokio::sync::Notify,
    stop: AtomicBool,
}

/// The retention settings a stream runs with, from its effective arguments.
pub fn retention(args: &QueueArgs) -> Retention {
    Retention {
        max_bytes: args.max_length_bytes,
        max_age_ms: args.max_age,
        max_segment_size: args
            .stream_max_segment_size
            .unwrap_or(DEFAULT_MAX_SEGMENT_SIZE),
        filter_size: args
            .stream_filter_size
            .unwrap_or(crate::storage::stream::retention::DEFAULT_FILTER_SIZE),
    }
}

impl StreamQueue {
    /// Open (create or recover) the stream stored under `key`.
    pub fn open(store: &StreamStore, key: String, args: &QueueArgs) -> AmqpResult<StreamQueue> {
        let log = store
            .open_log(&key, retention(args))
            .map_err(|e| AmqpError::internal_error(format!("cannot open the stream: {e}")))?;
        Ok(StreamQueue {
            log,
            store: store.clone(),
            key,
            readers: Mutex::new(Vec::new()),
        })
    }

    /// Wake every consumer task (credit came back, flow resumed).
    pub(super) fn wake(&self) {
        for r in self.readers.lock().iter() {
            r.wake.notify_one();
        }
    }

    /// Stop a consumer's task.
    pub(super) fn stop(&self, consumer: &Arc<Consumer>) {
        self.readers.lock().retain(|r| {
            if Arc::ptr_eq(&r.consumer, consumer) {
                r.stop.store(true, Ordering::Release);
                r.wake.notify_one();
                false
            } else {
                true
            }
        });
    }

    /// The stream is deleted: stop every reader and remove the files.
    pub(super) fn delete(&self) {
        for r in self.readers.lock().drain(..) {
            r.stop.store(true, Ordering::Release);
            r.wake.notify_one();
        }
        self.log.mark_deleted();
        self.store.remove_log(&self.key);
    }
}

/// The `x-stream-offset` consume argument at `now` (ms), as RabbitMQ reads it.
pub fn offset_spec(arg: Option<&FieldValue>, now: u64) -> AmqpResult<OffsetSpec> {
    let bad = |v: &FieldValue| {
        AmqpError::precondition_failed(format!("invalid x-stream-offset argument: {v:?}"))
    };
    let Some(v) = arg else {
        return Ok(OffsetSpec::Next);
    };
    Ok(match v {
        FieldValue::Timestamp(secs) => OffsetSpec::Timestamp(
            i64::try_from(*secs)
                .unwrap_or(i64::MAX)
                .saturating_mul(1000),
        ),
        FieldValue::LongString(_) => match v.as_str().ok_or_else(|| bad(v))? {
            "first" => OffsetSpec::First,
            "last" => OffsetSpec::Last,
            "next" => OffsetSpec::Next,
            s => {
                let age = crate::storage::stream::parse_age(s).ok_or_else(|| bad(v))?;
                OffsetSpec::Timestamp(now.saturating_sub(age) as i64)
            }
        },
        other => match other.as_i64() {
            // RabbitMQ: a negative offset is the first one.
            Some(n) if n < 0 => OffsetSpec::First,
            Some(n) => OffsetSpec::Offset(n as u64),
            None => return Err(bad(v)),
        },
    })
}

impl Queue {
    /// A publish to a stream: append it (stored whatever its delivery mode).
    pub(super) fn stream_enqueue(&self, sq: &StreamQueue, message: &Message, now: u64) -> Enqueued {
        let data = amqp10::encode_from_091(
            &message.exchange,
            &message.routing_key,
            &message.properties,
            &message.body,
        );
        let filter = message
            .properties
            .headers
            .as_ref()
            .and_then(|h| h.get("x-stream-filter-value"))
            .and_then(FieldValue::as_str)
            .map(str::to_string);
        let m = StreamMessage {
            data,
            filter,
            publisher: None,
            batch: None,
        };
        match sq.log.append(vec![m], now as i64) {
            Ok(_) => {
                crate::broker::Counters::add(&self.counters.published, 1);
                Enqueued::Accepted { durable: true }
            }
            Err(e) => {
                tracing::error!(queue = %self.spec.name, error = %e, "cannot append to a stream");
                Enqueued::Rejected
            }
        }
    }

    /// basic.consume on a stream at `now`: check RabbitMQ's conditions and
    /// start the consumer's reading task.
    pub(super) fn stream_consume(
        self: &Arc<Self>,
        sq: &StreamQueue,
        consumer: Arc<Consumer>,
        now: u64,
    ) -> AmqpResult<()> {
        let spec = offset_spec(consumer.arguments.get("x-stream-offset"), now)?;
        let reader = sq.log.reader(spec);
        let r = Arc::new(Reader {
            consumer: Arc::clone(&consumer),
            wake: tokio::sync::Notify::new(),
            stop: AtomicBool::new(false),
        });
        {
            let mut s = self.state.lock();
            if s.deleted {
                return Err(AmqpError::not_found(format!(
                    "no queue '{}' in vhost '{}'",
                    self.spec.name, self.spec.vhost
                )));
            }
            s.consumers.push(consumer);
            s.had_consumer = true;
            s.last_used = now;
        }
        sq.readers.lock().push(Arc::clone(&r));
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return Err(AmqpError::internal_error(
                "no runtime to read the stream on",
            ));
        };
        rt.spawn(read_loop(Arc::clone(self), r, reader));
        Ok(())
    }

    /// A stream delivery left the consumer's window (acked, nacked, or its
    /// channel closed): nothing is removed, only the unacked count changes.
    pub(super) fn stream_settled(&self, n: usize) {
        let mut s = self.state.lock();
        s.unacked = s.unacked.saturating_sub(n);
    }
}

/// Bytes a consumer reads ahead at once (a larger chunk is read whole).
const READ_AHEAD: usize = 256 << 10;

/// Read the next committed chunks (up to [`READ_AHEAD`] bytes) the filter may
/// want: from the page cache on this task (`RWF_NOWAIT`, never blocking),
/// else on a blocking thread so a cold read does not stall the runtime's
/// worker. Their messages at or past `start` go to `pending`.
async fn read_ahead(
    reader: &mut Option<StreamReader>,
    start: u64,
    filter: &Filter,
    pending: &mut VecDeque<(u64, Bytes)>,
) -> Result<(), StreamError> {
    let Some(mut rd) = reader.take() else {
        return Ok(());
    };
    let mut buf = Vec::new();
    let mut spans = Vec::new();
    let mut limits = BatchLimits {
        chunks: usize::MAX,
        bytes: READ_AHEAD,
        cached_only: true,
        merge: None,
    };
    let r = match rd.read_batch(&mut buf, &mut spans, limits, &|_| true) {
        Ok(BatchRead::WouldBlock) => {
            limits.cached_only = false;
            let joined = tokio::task::spawn_blocking(move || {
                let r = rd.read_batch(&mut buf, &mut spans, limits, &|_| true);
                (rd, buf, spans, r)
            })
            .await;
            let Ok((back, b, sp, r)) = joined else {
                return Err(StreamError::Io("the read thread failed".into()));
            };
            (rd, buf, spans) = (back, b, sp);
            r
        }
        r => r,
    };
    *reader = Some(rd);
    r?;
    let bytes = Bytes::from(buf);
    for span in &spans {
        if filter.skips_bloom(&bytes[span.bloom_range()]) {
            continue;
        }
        // Each simple entry and each record of a readable sub-batch.
        let records = chunk::Records::new(bytes.slice(span.data_range()), span.header.first_offset);
        pending.extend(records.filter(|(at, _)| *at >= start));
    }
    Ok(())
}

/// A consumer's task: read chunks ahead, deliver their messages while credit
/// lasts, wait for credit or for newly committed chunks.
async fn read_loop(queue: Arc<Queue>, r: Arc<Reader>, reader: StreamReader) {
    let start = reader.start();
    let mut committed = reader.committed();
    let mut reader = Some(reader);
    let mut pending: VecDeque<(u64, Bytes)> = VecDeque::new();
    let filter = Filter::new(&r.consumer.arguments);
    let c = &r.consumer;
    let exchange = ShortStr::intern("");
    let routing_key = ShortStr::intern(&queue.spec.name);
    // The last exchange / routing key annotations seen, reused while equal.
    let mut last_exchange: Option<ShortStr> = None;
    let mut last_key: Option<ShortStr> = None;
    loop {
        if r.stop.load(Ordering::Acquire) {
            return;
        }
        if pending.is_empty() {
            let caught_up = reader.as_ref().is_none_or(|rd| !rd.has_more());
            if caught_up {
                let woken = r.wake.notified();
                tokio::pin!(woken);
                woken.as_mut().enable();
                if reader.as_ref().is_some_and(|rd| rd.has_more()) || r.stop.load(Ordering::Acquire)
                {
                    continue;
                }
                tokio::select! {
                    res = committed.changed() => if res.is_err() { return },
                    _ = &mut woken => {}
                }
                continue;
            }
            if let Err(e) = read_ahead(&mut reader, start, &filter, &mut pending).await {
                tracing::error!(queue = %queue.spec.name, error = %e, "cannot read a stream; consumer stops");
                return;
            }
            continue;
        }
        // Take the credit there is (up to what is read), count the deliveries
        // unacked before any can be acked, then deliver.
        let mut credits = 0usize;
        while credits < pending.len() && c.try_take_credit() {
            credits += 1;
        }
        if credits == 0 {
            let woken = r.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            // Credit may have come back before the wait was registered.
            if c.try_take_credit() {
                c.give_back_credit();
                continue;
            }
            if r.stop.load(Ordering::Acquire) {
                return;
            }
            woken.await;
            continue;
        }
        queue.state.lock().unacked += credits;
        let mut delivered = 0u64;
        let mut unused = 0usize;
        for (offset, data) in pending.drain(..credits) {
            let amqp10::Routed091 {
                properties: mut props,
                body,
                exchange: published_exchange,
                routing_key: published_key,
            } = match amqp10::decode_to_091_routed(&data) {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(queue = %queue.spec.name, offset, error = %e, "unreadable stream message skipped");
                    unused += 1;
                    continue;
                }
            };
            if !filter.accepts(&props) {
                unused += 1;
                continue;
            }
            props
                .headers
                .get_or_insert_with(Default::default)
                .insert("x-stream-offset", FieldValue::I64(offset as i64));
            let message = Arc::new(Message {
                exchange: annotated(&mut last_exchange, published_exchange, &exchange),
                routing_key: annotated(&mut last_key, published_key, &routing_key),
                properties: props.into(),
                body,
            });
            let delivery = Delivery {
                channel: c.channel,
                consumer_tag: Arc::clone(&c.tag),
                queue: Arc::clone(&queue),
                entry: Entry::new(offset, message, None),
                no_ack: false,
            };
            if c.sink.deliver(delivery).is_err() {
                // The consumer is gone: what was counted unacked and not
                // delivered is settled here.
                crate::broker::Counters::add(&queue.counters.delivered, delivered);
                queue.stream_settled(credits - delivered as usize);
                return;
            }
            delivered += 1;
        }
        crate::broker::Counters::add(&queue.counters.delivered, delivered);
        if unused > 0 {
            for _ in 0..unused {
                c.give_back_credit();
            }
            queue.stream_settled(unused);
        }
    }
}

/// The exchange or routing key a message was published with (its
/// `x-exchange` / `x-routing-key` annotation), or `default` without one; the
/// previous message's name is reused while it is the same, so a stream
/// written through one exchange and key interns nothing per message.
fn annotated(last: &mut Option<ShortStr>, name: Option<String>, default: &ShortStr) -> ShortStr {
    let Some(name) = name else {
        return default.clone();
    };
    match last {
        Some(l) if l.as_str() == name => l.clone(),
        _ => {
            let s = ShortStr::intern(&name);
            *last = Some(s.clone());
            s
        }
    }
}

/// `x-stream-filter` / `x-stream-match-unfiltered` of a consumer (RabbitMQ
/// 3.13): a message passes if its `x-stream-filter-value` is one of the
/// filter's values, or if it has none and unfiltered messages match.
struct Filter {
    values: Option<Vec<String>>,
    match_unfiltered: bool,
}

impl Filter {
    fn new(args: &crate::wire::FieldTable) -> Filter {
        let values = args.get("x-stream-filter").map(|v| match v {
            FieldValue::Array(a) => a
                .iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect(),
            other => other.as_str().map(str::to_string).into_iter().collect(),
        });
        Filter {
            values,
            match_unfiltered: args
                .get("x-stream-match-unfiltered")
                .and_then(FieldValue::as_bool)
                .unwrap_or(false),
        }
    }

    /// A chunk's bloom filter says no message in it is wanted.
    fn skips_bloom(&self, bloom: &[u8]) -> bool {
        self.values
            .as_ref()
            .is_some_and(|v| !crate::storage::stream::may_match(bloom, v, self.match_unfiltered))
    }

    fn accepts(&self, props: &BasicProperties) -> bool {
        let Some(values) = &self.values else {
            return true;
        };
        match props
            .headers
            .as_ref()
            .and_then(|h| h.get("x-stream-filter-value"))
            .and_then(FieldValue::as_str)
        {
            Some(v) => values.iter().any(|x| x == v),
            None => self.match_unfiltered,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn x_stream_offset_as_rabbitmq_reads_it() {
        let now = 10_000_000;
        let spec = |v: FieldValue| offset_spec(Some(&v), now);
        assert_eq!(offset_spec(None, now), Ok(OffsetSpec::Next));
        assert_eq!(spec(FieldValue::string("first")), Ok(OffsetSpec::First));
        assert_eq!(spec(FieldValue::string("last")), Ok(OffsetSpec::Last));
        assert_eq!(spec(FieldValue::string("next")), Ok(OffsetSpec::Next));
        assert_eq!(spec(FieldValue::I64(42)), Ok(OffsetSpec::Offset(42)));
        assert_eq!(spec(FieldValue::I16(-3)), Ok(OffsetSpec::First));
        assert_eq!(
            spec(FieldValue::Timestamp(1_600_000_000)),
            Ok(OffsetSpec::Timestamp(1_600_000_000_000))
        );
        assert_eq!(
            spec(FieldValue::string("10s")),
            Ok(OffsetSpec::Timestamp(now as i64 - 10_000))
        );
        for bad in [FieldValue::string("soon"), FieldValue::Bool(true)] {
            assert_eq!(spec(bad).map_err(|e| e.code), Err(406));
        }
    }
}
