//! Queue unit tests with a real message store: what reaches the store and in what
//! order, and paged-out messages loaded with the queue lock released.

use super::*;
use crate::broker::vhost::QueueDeclare;
use crate::wire::{BasicProperties, FieldValue};
use bytes::Bytes;
use std::sync::atomic::AtomicBool;

const T0: u64 = 1_700_000_000_000;

/// A unique directory under the system temp dir, removed on drop.
struct TempDir(std::path::PathBuf);

impl TempDir {
    fn new() -> TempDir {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!(
            "warren-queue-test-{}-{n}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[derive(Debug, Default)]
struct Sink(Mutex<Vec<Delivery>>);

impl DeliverySink for Sink {
    fn deliver(&self, delivery: Delivery) -> Result<(), Delivery> {
        self.0.lock().push(delivery);
        Ok(())
    }
    fn cancelled(&self, _channel: u16, _consumer_tag: Arc<str>) {}
}

fn consumer(sink: &Arc<Sink>, no_ack: bool) -> Arc<Consumer> {
    Arc::new(Consumer {
        tag: "c".into(),
        connection: 1,
        channel: 1,
        no_ack,
        exclusive: false,
        priority: 0,
        arguments: FieldTable::new(),
        credit: Credit::new(0),
        channel_credit: Credit::new(0),
        flow: Arc::new(AtomicBool::new(true)),
        sink: Arc::clone(sink) as Arc<dyn DeliverySink>,
    })
}

fn persistent(body: &str) -> Arc<Message> {
    let props = BasicProperties {
        delivery_mode: Some(2),
        ..Default::default()
    };
    Message::new("", "q", props, Bytes::from(body.to_string()))
}

/// A vhost on a fresh store with `budget` resident bytes, and a durable queue
/// `q` with `arguments`.
fn setup(
    dir: &TempDir,
    budget: usize,
    arguments: &[(&str, FieldValue)],
) -> (Store, Arc<VHost>, Arc<Queue>) {
    let store = Store::open(&dir.0).expect("store");
    let v = VHost::new(
        "/",
        Some(store.clone()),
        MemoryBudget::new(budget),
        Default::default(),
    );
    let mut args = FieldTable::new();
    for (k, val) in arguments {
        args.insert(*k, val.clone());
    }
    let (q, _) = v
        .declare_queue(
            &QueueDeclare {
                name: "q".into(),
                durable: true,
                arguments: args,
                ..Default::default()
            },
            1,
            T0,
        )
        .expect("declare");
    (store, v, q)
}

fn stored(store: &Store) -> Vec<(u64, bool)> {
    store.flush_blocking().expect("flush");
    load(store, "q")
        .into_iter()
        .map(|r| (r.pos, r.message.redelivered))
        .collect()
}

/// Everything level 0 of durable queue `name` has in the store.
fn load(store: &Store, name: &str) -> Vec<crate::storage::ReadMessage> {
    store
        .read(
            &store.queue(&store_key("/", name), true),
            0,
            0,
            usize::MAX,
            usize::MAX,
        )
        .expect("load")
}

fn body(e: &Entry) -> String {
    String::from_utf8_lossy(&e.message.body).into_owned()
}

#[test]
fn the_store_follows_the_queue() {
    let dir = TempDir::new();
    let (store, _v, q) = setup(&dir, 0, &[]);
    for b in ["a", "b", "c", "d"] {
        assert_eq!(
            q.enqueue(persistent(b), T0),
            Enqueued::Accepted { durable: true }
        );
    }
    // Transient messages are not written.
    let transient = Message::new("", "q", BasicProperties::default(), Bytes::from("t"));
    assert_eq!(
        q.enqueue(transient, T0),
        Enqueued::Accepted { durable: false }
    );
    assert_eq!(
        stored(&store),
        [(0, false), (1, false), (2, false), (3, false)]
    );
    // Handed out with ack: marked redelivered; acked: removed.
    let (a, _) = q.get(false, T0).expect("a");
    assert_eq!(
        stored(&store),
        [(0, true), (1, false), (2, false), (3, false)]
    );
    q.ack(&[a]);
    // Without ack: gone at once.
    let (b, _) = q.get(true, T0).expect("b");
    assert_eq!(body(&b), "b");
    assert_eq!(stored(&store), [(2, false), (3, false)]);
    // Rejected (no dead-letter exchange): removed.
    let (c, _) = q.get(false, T0).expect("c");
    q.reject(vec![c], T0);
    assert_eq!(stored(&store), [(3, false)]);
    // Purge, then delete.
    q.enqueue(persistent("e"), T0);
    assert_eq!(q.purge(), 3);
    assert_eq!(stored(&store), []);
    q.enqueue(persistent("f"), T0);
    assert_eq!(stored(&store), [(5, false)]);
    q.delete();
    assert_eq!(stored(&store), []);
}

#[test]
fn an_expired_message_is_removed_after_its_dead_letter_is_written() {
    let dir = TempDir::new();
    let (store, v, q) = setup(
        &dir,
        0,
        &[
            ("x-message-ttl", FieldValue::I64(10)),
            ("x-dead-letter-exchange", FieldValue::string("")),
            ("x-dead-letter-routing-key", FieldValue::string("dlq")),
        ],
    );
    let (dlq, _) = v
        .declare_queue(
            &QueueDeclare {
                name: "dlq".into(),
                durable: true,
                ..Default::default()
            },
            1,
            T0,
        )
        .expect("declare");
    q.enqueue(persistent("x"), T0);
    assert!(!q.tick(T0 + 10));
    assert_eq!(stored(&store), []);
    let dl = load(&store, "dlq");
    assert_eq!(dl.len(), 1);
    assert_eq!(&dl[0].message.body[..], b"x");
    assert_eq!(dlq.stats(T0 + 10).ready, 1);
}

#[test]
fn paged_out_messages_are_loaded_for_consumers_get_and_dead_letters() {
    let dir = TempDir::new();
    // A 1-byte budget: every persistent message is paged out as it arrives.
    let (store, v, q) = setup(
        &dir,
        1,
        &[
            ("x-dead-letter-exchange", FieldValue::string("")),
            ("x-dead-letter-routing-key", FieldValue::string("dlq")),
        ],
    );
    let n = PAGE_IN_BATCH + 8;
    for i in 0..n {
        q.enqueue(persistent(&format!("m{i}")), T0);
    }
    assert_eq!(
        q.state.lock().ready.iter().count(),
        0,
        "nothing held in memory"
    );
    assert_eq!(q.state.lock().ready.tail(0).count, n);
    // basic.get loads the head.
    let (e, left) = q.get(false, T0).expect("m0");
    assert_eq!((body(&e), left), ("m0".to_string(), n - 1));
    // A consumer gets the rest, in order, loaded in batches.
    let sink = Arc::new(Sink::default());
    q.add_consumer(consumer(&sink, false), T0).expect("consume");
    let got: Vec<String> = sink.0.lock().iter().map(|d| body(&d.entry)).collect();
    let want: Vec<String> = (1..n).map(|i| format!("m{i}")).collect();
    assert_eq!(got, want);
    // A paged-out message dropped by a length limit is dead-lettered with its body.
    let (dlq, _) = v
        .declare_queue(
            &QueueDeclare {
                name: "dlq".into(),
                ..Default::default()
            },
            1,
            T0,
        )
        .expect("declare");
    let (q2, _) = v
        .declare_queue(
            &QueueDeclare {
                name: "q2".into(),
                durable: true,
                arguments: {
                    let mut t = FieldTable::new();
                    t.insert("x-max-length", FieldValue::I64(1));
                    t.insert("x-dead-letter-exchange", FieldValue::string(""));
                    t.insert("x-dead-letter-routing-key", FieldValue::string("dlq"));
                    t
                },
                ..Default::default()
            },
            1,
            T0,
        )
        .expect("declare");
    q2.enqueue(persistent("first"), T0);
    q2.enqueue(persistent("second"), T0);
    let (d, _) = dlq.get(true, T0).expect("dead letter");
    assert_eq!(body(&d), "first");
    let (s, _) = q2.get(true, T0).expect("second");
    assert_eq!(body(&s), "second");
    drop(store);
}
