//! The adapter: the one place the model test calls into the broker. It plays the
//! part of an AMQP channel (delivery tags, unacked list, prefetch credit, settle
//! grouping, consumer kicks) the way `src/server` does, with no sockets: deliveries land
//! in an in-memory [`DeliverySink`]. When the broker's entry points change, only this
//! file follows.

use super::ops::*;
use super::reference::Settle;
use bytes::Bytes;
use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use warren::broker::exchange::Destination;
use warren::broker::message::{Entry, Message};
use warren::broker::queue::{Consumer, Credit, Delivery, DeliverySink, Queue};
use warren::broker::vhost::{ExchangeDeclare, PublishFrom, QueueDeclare};
use warren::broker::{Broker, VHost};
use warren::wire::{BasicProperties, FieldTable, FieldValue};
use warren::Config;

/// Whether the broker takes the time from its caller (it does: every call below passes
/// the adapter's virtual `now`), so sequences include TTLs that fire and `Advance`
/// steps. False would keep to TTLs no sequence outlives (for a wall-clock broker).
pub const TIMED: bool = true;

/// The connection and channel every call is made from.
const CONN: u64 = 1;
const CHANNEL: u16 = 1;

/// Deliveries pushed by queues, collected until the step ends.
#[derive(Debug, Default)]
struct Sink {
    got: Mutex<Vec<Delivery>>,
}

impl DeliverySink for Sink {
    fn deliver(&self, delivery: Delivery) -> Result<(), Delivery> {
        self.got
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(delivery);
        Ok(())
    }

    fn cancelled(&self, _channel: u16, _consumer_tag: Arc<str>) {}
}

/// An unacked delivery as the channel holds it.
struct Held {
    queue: Arc<Queue>,
    entry: Entry,
    /// The consumer's prefetch window (None: basic.get).
    credit: Option<Arc<Credit>>,
}

/// A broker with one vhost, driven like one AMQP channel.
pub struct Sut {
    broker: Arc<Broker>,
    vhost: Arc<VHost>,
    sink: Arc<Sink>,
    /// Queue name -> its consumer.
    consumers: HashMap<String, (Arc<Queue>, Arc<Consumer>)>,
    next_consumer: u64,
    /// Unacked deliveries in delivery-tag order.
    outstanding: Vec<Held>,
    now: u64,
}

fn error_code(e: warren::error::AmqpError) -> Reply {
    Reply::Error(e.code)
}

fn table(args: &QArgs) -> FieldTable {
    let mut t = FieldTable::new();
    if let Some(v) = args.message_ttl {
        t.insert("x-message-ttl", FieldValue::I64(v as i64));
    }
    if let Some(v) = args.max_length {
        t.insert("x-max-length", FieldValue::I64(v as i64));
    }
    if let Some(v) = args.max_length_bytes {
        t.insert("x-max-length-bytes", FieldValue::I64(v as i64));
    }
    if let Some(o) = args.overflow {
        let name = match o {
            Overflow::DropHead => "drop-head",
            Overflow::RejectPublish => "reject-publish",
            Overflow::RejectPublishDlx => "reject-publish-dlx",
        };
        t.insert("x-overflow", FieldValue::string(name));
    }
    if let Some(rk) = &args.dlx {
        t.insert("x-dead-letter-exchange", FieldValue::string(DLX));
        if let Some(rk) = rk {
            t.insert("x-dead-letter-routing-key", FieldValue::string(rk.clone()));
        }
    }
    if let Some(p) = args.max_priority {
        t.insert("x-max-priority", FieldValue::I64(i64::from(p)));
    }
    t
}

/// The message as a client would see it.
fn seen(entry: &Entry) -> Msg {
    let m = &entry.message;
    let mut deaths = Vec::new();
    if let Some(FieldValue::Array(a)) = m.properties.headers.as_ref().and_then(|h| h.get("x-death"))
    {
        for d in a {
            if let FieldValue::Table(t) = d {
                let s = |k: &str| t.get(k).and_then(|v| v.as_str()).unwrap_or("?").to_string();
                let count = t.get("count").and_then(|v| v.as_i64()).unwrap_or(-1);
                deaths.push((s("queue"), s("reason"), count));
            }
        }
    }
    Msg {
        body: String::from_utf8_lossy(&m.body).into_owned(),
        exchange: m.exchange.to_string(),
        routing_key: m.routing_key.to_string(),
        redelivered: entry.redelivered,
        expiration: m.properties.expiration.clone(),
        deaths,
    }
}

impl Sut {
    /// The broker after setup: exchanges `ex` and `dlx`, the dead-letter queues bound.
    pub fn new() -> Sut {
        let broker = Broker::new(&Config::default());
        let vhost = broker.vhost("/").expect("the default vhost");
        for name in [EXCHANGE, DLX] {
            vhost
                .declare_exchange(&ExchangeDeclare {
                    name: name.into(),
                    kind: "direct".into(),
                    ..Default::default()
                })
                .expect("declare exchange");
        }
        for (src, dlq) in SOURCES.iter().zip(DLQS) {
            let d = QueueDeclare {
                name: dlq.into(),
                ..Default::default()
            };
            vhost.declare_queue(&d, CONN, T0).expect("declare dlq");
            vhost
                .bind(
                    DLX,
                    Destination::Queue(dlq.into()),
                    src,
                    &FieldTable::new(),
                    CONN,
                )
                .expect("bind dlq");
        }
        Sut {
            broker,
            vhost,
            sink: Arc::new(Sink::default()),
            consumers: HashMap::new(),
            next_consumer: 0,
            outstanding: Vec::new(),
            now: T0,
        }
    }

    pub fn declare(&mut self, name: &str, args: &QArgs) -> Reply {
        let d = QueueDeclare {
            name: name.into(),
            arguments: table(args),
            ..Default::default()
        };
        match self.vhost.declare_queue(&d, CONN, self.now) {
            Ok((_, stats)) => Reply::Declared {
                messages: stats.ready,
                consumers: stats.consumers,
            },
            Err(e) => error_code(e),
        }
    }

    pub fn bind(&mut self, queue: &str, key: &str, bind: bool) -> Reply {
        let dest = Destination::Queue(queue.into());
        let none = FieldTable::new();
        let r = if bind {
            self.vhost.bind(EXCHANGE, dest, key, &none, CONN)
        } else {
            self.vhost.unbind(EXCHANGE, dest, key, &none, CONN)
        };
        r.map_or_else(error_code, |_| Reply::Done)
    }

    pub fn publish(
        &mut self,
        exchange: &str,
        key: &str,
        body: &str,
        priority: Option<u8>,
        expiration: Option<u64>,
    ) -> Reply {
        let props = BasicProperties {
            priority,
            expiration: expiration.map(|e| e.to_string()),
            ..Default::default()
        };
        let m = Message::new(exchange, key, props, Bytes::from(body.to_string()));
        match self
            .vhost
            .publish(exchange, &m, PublishFrom::Client, self.now)
        {
            Ok(p) => Reply::Published {
                routed: p.routed,
                rejected: p.rejected,
            },
            Err(e) => error_code(e),
        }
    }

    pub fn get(&mut self, name: &str, no_ack: bool) -> Reply {
        let q = match self.vhost.queue(name, CONN) {
            Ok(q) => q,
            Err(e) => return error_code(e),
        };
        match q.get(no_ack, self.now) {
            None => Reply::GetEmpty,
            Some((entry, remaining)) => {
                let msg = seen(&entry);
                if !no_ack {
                    self.outstanding.push(Held {
                        queue: q,
                        entry,
                        credit: None,
                    });
                }
                Reply::GetOk {
                    msg,
                    message_count: remaining,
                }
            }
        }
    }

    pub fn consume(&mut self, name: &str, prefetch: u32, no_ack: bool) -> Reply {
        let q = match self.vhost.queue(name, CONN) {
            Ok(q) => q,
            Err(e) => return error_code(e),
        };
        self.next_consumer += 1;
        let consumer = Arc::new(Consumer {
            tag: format!("c{}", self.next_consumer).into(),
            connection: CONN,
            channel: CHANNEL,
            no_ack,
            exclusive: false,
            priority: 0,
            arguments: FieldTable::new(),
            credit: Credit::new(prefetch),
            channel_credit: Credit::new(0),
            flow: Arc::new(AtomicBool::new(true)),
            sink: Arc::clone(&self.sink) as Arc<dyn DeliverySink>,
        });
        self.consumers
            .insert(name.to_string(), (Arc::clone(&q), Arc::clone(&consumer)));
        match q.add_consumer(consumer, self.now) {
            Ok(()) => Reply::Done,
            Err(e) => {
                self.consumers.remove(name);
                error_code(e)
            }
        }
    }

    pub fn cancel(&mut self, name: &str) {
        if let Some((q, c)) = self.consumers.remove(name) {
            self.vhost
                .cancel_consumer(&q, CONN, CHANNEL, &c.tag, self.now);
        }
    }

    /// Settle outstanding deliveries `[..=i]` (multiple) or `[i]`, as a channel does:
    /// credit back first, then each queue's messages in delivery order, then every
    /// consumer's queue gets a chance to deliver.
    pub fn settle(&mut self, i: usize, multiple: bool, how: Settle) {
        let taken: Vec<Held> = if multiple {
            self.outstanding.drain(..=i).collect()
        } else {
            vec![self.outstanding.remove(i)]
        };
        // Per queue: its consumers' credit comes back together with its messages (as
        // the channel does), so another queue's dead letters cannot overtake them.
        type Group = (Arc<Queue>, Vec<Entry>, Vec<Arc<Credit>>);
        let mut by_queue: Vec<Group> = Vec::new();
        for h in taken {
            let i = match by_queue
                .iter()
                .position(|(q, _, _)| Arc::ptr_eq(q, &h.queue))
            {
                Some(i) => i,
                None => {
                    by_queue.push((Arc::clone(&h.queue), Vec::new(), Vec::new()));
                    by_queue.len() - 1
                }
            };
            by_queue[i].1.push(h.entry);
            by_queue[i].2.extend(h.credit);
        }
        for (q, entries, credits) in by_queue {
            for c in credits {
                c.release(1);
            }
            match how {
                Settle::Ack => q.ack(&entries, self.now),
                Settle::Discard => q.reject(entries, self.now),
                Settle::Requeue => q.requeue(entries, true, true, self.now),
            }
        }
        for (q, _) in self.consumers.values() {
            q.dispatch(self.now);
        }
    }

    pub fn purge(&mut self, name: &str) -> Reply {
        self.vhost
            .purge_queue(name, CONN)
            .map_or_else(error_code, Reply::Count)
    }

    /// Delete a queue; the channel forgets its unacked deliveries from it.
    pub fn delete(&mut self, name: &str) -> Reply {
        let q = self.vhost.queue(name, CONN).ok();
        match self.vhost.delete_queue(name, false, false, CONN, self.now) {
            Ok(n) => {
                if let Some(q) = q {
                    self.outstanding.retain(|h| !Arc::ptr_eq(&h.queue, &q));
                    self.consumers.remove(name);
                }
                Reply::Count(n)
            }
            Err(e) => error_code(e),
        }
    }

    /// Let `ms` pass and run the broker's periodic work at the new time.
    pub fn advance(&mut self, ms: u64) {
        self.now += ms;
        self.broker.tick(self.now);
    }

    /// What the step delivered, and the state now.
    pub fn observe(&mut self, reply: Reply) -> Observation {
        // Reading a queue's counters applies due expiry, which may dead-letter into
        // another queue: settle every queue first, then read them all.
        let queues = self.vhost.queues();
        for q in &queues {
            q.stats(self.now);
        }
        let depths = queues
            .iter()
            .map(|q| {
                let s = q.stats(self.now);
                (q.name().to_string(), (s.ready, s.unacked, s.consumers))
            })
            .collect();
        let mut got = std::mem::take(&mut *self.sink.got.lock().unwrap_or_else(|e| e.into_inner()));
        got.sort_by(|a, b| a.queue.name().cmp(b.queue.name()));
        let mut pushed = Vec::new();
        for d in got {
            pushed.push(Pushed {
                queue: d.queue.name().to_string(),
                msg: seen(&d.entry),
                no_ack: d.no_ack,
            });
            if !d.no_ack {
                let credit = self
                    .consumers
                    .values()
                    .find(|(_, c)| c.tag == d.consumer_tag)
                    .map(|(_, c)| Arc::clone(&c.credit));
                self.outstanding.push(Held {
                    queue: d.queue,
                    entry: d.entry,
                    credit,
                });
            }
        }
        Observation {
            reply,
            pushed,
            depths,
            outstanding: self
                .outstanding
                .iter()
                .map(|h| {
                    (
                        h.queue.name().to_string(),
                        String::from_utf8_lossy(&h.entry.message.body).into_owned(),
                    )
                })
                .collect(),
        }
    }
}
