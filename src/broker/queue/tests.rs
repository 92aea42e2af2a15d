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
    let q = declare_q(&v, args);
    (store, v, q)
}

/// The durable queue `q` in `v`, with `arguments`.
fn declare_q(v: &VHost, arguments: FieldTable) -> Arc<Queue> {
    let (q, _) = v
        .declare_queue(
            &QueueDeclare {
                name: "q".into(),
                durable: true,
                arguments,
                ..Default::default()
            },
            1,
            T0,
        )
        .expect("declare");
    q
}

/// `q` as recovery rebuilds it over `store` (a fresh vhost, nothing loaded
/// yet), and how many messages it restored.
fn recovered(store: &Store) -> (Arc<VHost>, Arc<Queue>, usize) {
    let v = VHost::new(
        "/",
        Some(store.clone()),
        MemoryBudget::new(0),
        Default::default(),
    );
    let q = declare_q(&v, FieldTable::new());
    let levels = store
        .recover_queue(&store.queue(&store_key("/", "q"), true))
        .expect("recover");
    let n = q.restore(&levels);
    (v, q, n)
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

/// What a replicated quorum queue `q` paged out ([`QueueStore::pages`]).
fn paged(store: &Store) -> Vec<(u64, bool)> {
    store.flush_blocking().expect("flush");
    store
        .read(
            &store.queue(&pages_key("/", "q"), false),
            0,
            0,
            usize::MAX,
            usize::MAX,
        )
        .expect("load")
        .into_iter()
        .map(|r| (r.pos, r.message.redelivered))
        .collect()
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
    q.ack(&[a], T0);
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

fn with_priority(body: &str, priority: u8) -> Arc<Message> {
    let props = BasicProperties {
        delivery_mode: Some(2),
        priority: Some(priority),
        ..Default::default()
    };
    Message::new("", "q", props, Bytes::from(body.to_string()))
}

fn transient(body: &str) -> Arc<Message> {
    Message::new(
        "",
        "q",
        BasicProperties::default(),
        Bytes::from(body.to_string()),
    )
}

fn get_all(q: &Queue, now: u64) -> Vec<String> {
    std::iter::from_fn(|| q.get(true, now).map(|(e, _)| body(&e))).collect()
}

#[test]
fn a_long_queue_keeps_a_bounded_window_in_memory() {
    let dir = TempDir::new();
    let (store, _v, q) = setup(&dir, 0, &[]);
    let n = PERSISTENT_WINDOW + 1000;
    for i in 0..n {
        q.enqueue(persistent(&format!("m{i}")), T0);
    }
    let st = q.stats(T0);
    assert_eq!((st.ready, st.ready_ram), (n, PERSISTENT_WINDOW));
    assert_eq!(
        st.ready_bytes,
        (0..n).map(|i| format!("m{i}").len()).sum::<usize>()
    );
    // A transient message joins the tail behind them (order), in the store too.
    q.enqueue(transient("t"), T0);
    assert_eq!(q.stats(T0).ready_ram, PERSISTENT_WINDOW);
    let mut want: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
    want.push("t".into());
    assert_eq!(get_all(&q, T0), want);
    assert_eq!(q.stats(T0).ready, 0);
    assert_eq!(stored(&store), []);
}

#[test]
fn paged_priorities_deliver_highest_first_fifo_within() {
    let dir = TempDir::new();
    let (_store, _v, q) = setup(&dir, 1, &[("x-max-priority", FieldValue::I64(5))]);
    let order = [(1, 0), (2, 5), (3, 2), (4, 5), (5, 9), (6, 0), (7, 2)];
    for (i, p) in order {
        q.enqueue(with_priority(&format!("m{i}"), p), T0);
    }
    assert_eq!(
        q.stats(T0).ready_ram,
        0,
        "a 1-byte budget pages everything out"
    );
    // Priority 9 counts as the maximum, 5.
    assert_eq!(
        get_all(&q, T0),
        ["m2", "m4", "m5", "m3", "m7", "m1", "m6"].map(String::from)
    );
}

#[test]
fn paged_messages_expire_and_are_dead_lettered_with_x_death() {
    let dir = TempDir::new();
    let (_store, v, q) = setup(
        &dir,
        1,
        &[
            ("x-message-ttl", FieldValue::I64(1000)),
            ("x-dead-letter-exchange", FieldValue::string("")),
            ("x-dead-letter-routing-key", FieldValue::string("dlq")),
        ],
    );
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
    let n = PAGE_IN_BATCH * 2 + 3;
    for i in 0..n {
        q.enqueue(persistent(&format!("m{i}")), T0);
    }
    // At most one batch is read ahead to watch the head's expiry.
    assert!(q.stats(T0).ready_ram <= PAGE_IN_BATCH);
    assert!(!q.tick(T0 + 999));
    assert_eq!(q.stats(T0 + 999).ready, n, "nothing due yet");
    assert!(!q.tick(T0 + 1000));
    assert_eq!(q.stats(T0 + 1000).ready, 0);
    assert_eq!(dlq.stats(T0 + 1000).ready, n);
    let (first, _) = dlq.get(true, T0 + 1000).expect("dead letter");
    assert_eq!(body(&first), "m0");
    let death = first
        .message
        .properties
        .headers
        .as_ref()
        .and_then(|h| h.get("x-death"))
        .expect("x-death");
    assert!(format!("{death:?}").contains("expired"), "{death:?}");
}

#[test]
fn drop_head_and_reject_publish_count_paged_messages() {
    let dir = TempDir::new();
    let (_store, _v, q) = setup(&dir, 1, &[("x-max-length", FieldValue::I64(5))]);
    for i in 0..12 {
        q.enqueue(persistent(&format!("m{i}")), T0);
    }
    assert_eq!(q.stats(T0).ready, 5);
    assert_eq!(
        get_all(&q, T0),
        ["m7", "m8", "m9", "m10", "m11"].map(String::from)
    );

    let dir2 = TempDir::new();
    let (_store2, _v2, r) = setup(
        &dir2,
        1,
        &[
            ("x-max-length", FieldValue::I64(3)),
            ("x-overflow", FieldValue::string("reject-publish")),
        ],
    );
    for i in 0..3 {
        assert!(matches!(
            r.enqueue(persistent(&format!("m{i}")), T0),
            Enqueued::Accepted { .. }
        ));
    }
    assert_eq!(r.enqueue(persistent("m3"), T0), Enqueued::Rejected);
    assert_eq!(get_all(&r, T0), ["m0", "m1", "m2"].map(String::from));
}

#[test]
fn requeued_paged_messages_go_back_in_order_redelivered() {
    let dir = TempDir::new();
    let (store, _v, q) = setup(&dir, 1, &[]);
    for i in 0..6 {
        q.enqueue(persistent(&format!("m{i}")), T0);
    }
    let taken: Vec<Entry> = (0..3).map(|_| q.get(false, T0).expect("get").0).collect();
    q.requeue(taken, true, true, T0);
    let (e, left) = q.get(false, T0).expect("m0");
    assert_eq!((body(&e), e.redelivered, left), ("m0".to_string(), true, 5));
    q.ack(&[e], T0);
    let rest: Vec<(String, bool)> = std::iter::from_fn(|| q.get(true, T0))
        .map(|(e, _)| (body(&e), e.redelivered))
        .collect();
    let want: Vec<(String, bool)> = (1..6).map(|i| (format!("m{i}"), i < 3)).collect();
    assert_eq!(rest, want);
    assert_eq!(stored(&store), []);
}

#[test]
fn purge_drops_the_tail_but_keeps_unacked_messages_stored() {
    let dir = TempDir::new();
    let (store, _v, q) = setup(&dir, 1, &[]);
    for i in 0..50 {
        q.enqueue(persistent(&format!("m{i}")), T0);
    }
    let (held, _) = q.get(false, T0).expect("m0");
    assert_eq!(q.purge(), 49);
    assert_eq!(q.stats(T0).ready, 0);
    // Only the unacked one is left in the store, marked delivered.
    assert_eq!(stored(&store), [(0, true)]);
    q.enqueue(persistent("after"), T0);
    assert_eq!(get_all(&q, T0), ["after".to_string()]);
    q.ack(&[held], T0);
    assert_eq!(stored(&store), []);
}

#[test]
fn recovery_counts_stored_messages_without_loading_them() {
    let dir = TempDir::new();
    let (store, v, q) = setup(&dir, 0, &[]);
    for i in 0..100 {
        q.enqueue(persistent(&format!("m{i}")), T0);
    }
    let (e, _) = q.get(false, T0).expect("m0");
    drop(e); // delivered, never acked: back redelivered after the restart
    store.flush_blocking().expect("flush");
    drop((q, v));
    // A fresh queue over the same store, as recovery builds it.
    let (_v, q, n) = recovered(&store);
    assert_eq!(n, 100);
    let st = q.stats(T0);
    assert_eq!((st.ready, st.ready_ram), (100, 0), "nothing loaded yet");
    let (first, _) = q.get(true, T0).expect("m0");
    assert_eq!((body(&first), first.redelivered), ("m0".to_string(), true));
    assert!(q.stats(T0).ready_ram > 0, "read ahead");
    // New messages go behind the recovered ones.
    q.enqueue(persistent("new"), T0);
    let rest = get_all(&q, T0);
    assert_eq!(rest.len(), 100);
    assert_eq!(rest.first().map(String::as_str), Some("m1"));
    assert_eq!(rest.last().map(String::as_str), Some("new"));
}

#[test]
fn transient_messages_page_out_when_memory_is_short() {
    let dir = TempDir::new();
    let (store, v, _q) = setup(&dir, 64, &[]);
    let (t, _) = v
        .declare_queue(
            &QueueDeclare {
                name: "t".into(),
                ..Default::default()
            },
            1,
            T0,
        )
        .expect("declare");
    for i in 0..100 {
        t.enqueue(transient(&format!("m{i:03}")), T0);
    }
    let st = t.stats(T0);
    assert_eq!(st.ready, 100);
    assert!(st.ready_ram < 20, "{} in memory", st.ready_ram);
    // Not durable: nothing in the durable tree.
    assert!(store.queue_keys_with_messages().expect("keys").is_empty());
    let want: Vec<String> = (0..100).map(|i| format!("m{i:03}")).collect();
    assert_eq!(get_all(&t, T0), want);
}

/// A [`crate::broker::remote::Replica`] that records what the queue reports.
#[derive(Debug, Default)]
struct Recorder {
    settled: Mutex<Vec<u64>>,
    returned: Mutex<Vec<u64>>,
    /// (out, back) as reported.
    checked_out: Mutex<(Vec<u64>, Vec<u64>)>,
    /// Delivery horizons asked for.
    horizons: Mutex<Vec<u64>>,
    /// Ranges of ids settled (a purge of paged-out messages).
    ranges: Mutex<Vec<(u64, u64)>>,
}

impl crate::broker::remote::Replica for Recorder {
    fn serving(&self) -> bool {
        true
    }
    fn enqueue(&self, _m: &Arc<Message>, t: &Arc<crate::broker::remote::Ticket>) {
        t.expect();
        t.settle(false);
    }
    fn settled(&self, ids: Vec<u64>) {
        self.settled.lock().extend(ids);
    }
    fn settled_range(&self, from: u64, to: u64) {
        self.ranges.lock().push((from, to));
    }
    fn returned(&self, ids: Vec<u64>) {
        self.returned.lock().extend(ids);
    }
    fn checked_out(&self, out: Vec<u64>, back: Vec<u64>) {
        let mut c = self.checked_out.lock();
        c.0.extend(out);
        c.1.extend(back);
    }
    fn ask_horizon(&self, h: u64) {
        self.horizons.lock().push(h);
    }
    fn as_any(self: Arc<Self>) -> Arc<dyn std::any::Any + Send + Sync> {
        self
    }
}

#[test]
fn a_purge_stops_a_load_and_counts_what_the_group_had_left_to_load() {
    let dir = TempDir::new();
    let (_store, _v, q) = quorum_queue(&dir, &[]);
    let _rec = replicate(&q);
    let purges = q.expect_loads(8);
    for (id, b) in [(1, "a"), (2, "b")] {
        let taken = q.load_replicated(persistent(b), id, (false, 0), T0, T0, Some(purges));
        assert_eq!(taken, Some(Enqueued::Accepted { durable: false }));
    }
    // One of the eight was settled meanwhile.
    q.loads_gone(1);
    // The two loaded and the five the group had yet to load.
    assert_eq!(q.purge(), 7);
    // The load's next message is refused (the purge covers it), a
    // message committed later is taken.
    assert_eq!(
        q.load_replicated(persistent("c"), 3, (false, 0), T0, T0, Some(purges)),
        None
    );
    assert_eq!(q.stats(T0).ready, 0);
    q.enqueue_replicated(persistent("d"), 4, (false, 0), T0, T0);
    let (d, _) = q.get(true, T0).expect("d");
    assert_eq!(d.seq, 4);
    assert_eq!(q.purge(), 0, "nothing left to load is counted once");
    // Two purges since.
    assert_eq!(q.expect_loads(0), purges + 2);
}

#[test]
fn a_replicated_queue_reports_every_message_that_leaves_it_and_stores_none() {
    let dir = TempDir::new();
    let (store, _v, q) = quorum_queue(&dir, &[("x-max-length", FieldValue::I64(4))]);
    let rec = replicate(&q);
    let taken = |ids: &[u64]| {
        let mut v = std::mem::take(&mut *rec.settled.lock());
        v.sort_unstable();
        assert_eq!(v, ids);
    };
    // Ids are the group's; nothing goes to the message store.
    for (id, b) in [(10, "a"), (12, "b"), (13, "c"), (20, "d"), (21, "e")] {
        assert_eq!(
            q.enqueue_replicated(persistent(b), id, (false, 0), T0, T0),
            Enqueued::Accepted { durable: false }
        );
    }
    assert!(stored(&store).is_empty(), "the group's log is the storage");
    // max-length 4, drop-head: the oldest went.
    taken(&[10]);
    let out = || std::mem::take(&mut *rec.checked_out.lock());
    // Acked, got without ack, rejected: each reported; a get that must be
    // acked is checked out first, one without ack is settled at once.
    let (b, _) = q.get(false, T0).expect("b");
    assert_eq!(b.seq, 12);
    assert_eq!(out(), (vec![12], vec![]));
    q.ack(&[b], T0);
    taken(&[12]);
    let (c, _) = q.get(true, T0).expect("c");
    assert_eq!(body(&c), "c");
    taken(&[13]);
    assert_eq!(out(), (vec![], vec![]));
    let (d, _) = q.get(false, T0).expect("d");
    // A requeue is not a settlement; it comes back redelivered, and the
    // group is told of the return.
    q.requeue(vec![d], true, true, T0);
    taken(&[]);
    assert_eq!(std::mem::take(&mut *rec.returned.lock()), vec![20]);
    let (d, _) = q.get(false, T0).expect("d again");
    assert!(d.redelivered);
    assert_eq!(d.delivery_count, 1);
    assert_eq!(out(), (vec![20, 20], vec![]));
    // Back unsent (it never reached the client): not a return.
    q.requeue(vec![d], true, false, T0);
    assert_eq!(out(), (vec![], vec![20]));
    assert!(rec.returned.lock().is_empty());
    let (d, _) = q.get(false, T0).expect("d once more");
    assert_eq!(d.delivery_count, 1);
    q.reject(vec![d], T0);
    taken(&[20]);
    // Purged.
    assert_eq!(q.purge(), 1);
    taken(&[21]);
    // A message loaded by a new leader comes redelivered, with the returns
    // the group counted.
    q.enqueue_replicated(persistent("f"), 30, (true, 2), T0, T0);
    let (f, _) = q.get(false, T0).expect("f");
    assert!(f.redelivered);
    assert_eq!(f.delivery_count, 2);
    // One loaded past the delivery limit (a quorum queue's is 20) is
    // dropped, and reported settled.
    assert_eq!(
        q.enqueue_replicated(persistent("x"), 29, (true, 21), T0, T0),
        Enqueued::Accepted { durable: false }
    );
    taken(&[29]);
    // Losing the leadership forgets without reporting.
    q.enqueue_replicated(persistent("g"), 31, (false, 0), T0, T0);
    assert!(q.reset_replicated().is_empty());
    assert_eq!(q.stats(T0).ready, 0);
    taken(&[]);
}

#[test]
fn a_replicated_queue_pages_out_past_its_window_and_reads_back_in_the_groups_order() {
    let dir = TempDir::new();
    let (store, _v, q) = quorum_queue(&dir, &[]);
    let rec = replicate(&q);
    // Ids as the group gives them (entry index << 16 | place in the batch).
    let id = |n: usize| ((n as u64 / 3 + 1) << 16) | (n as u64 % 3);
    let n = PERSISTENT_WINDOW + 700;
    for i in 0..n {
        // Some come back from an earlier leader: redelivered, with returns.
        let earlier = i % 97 == 5;
        let state = (earlier, if earlier { 3 } else { 0 });
        q.enqueue_replicated(persistent(&format!("m{i}")), id(i), state, T0, T0);
    }
    let st = q.stats(T0);
    assert_eq!((st.ready, st.ready_ram), (n, PERSISTENT_WINDOW));
    // The rest is in the store's ephemeral space, at their ids; nothing in
    // the queue's own.
    assert!(stored(&store).is_empty());
    let pages = paged(&store);
    assert_eq!(pages.len(), 700);
    assert_eq!(pages.first().map(|p| p.0), Some(id(PERSISTENT_WINDOW)));
    // Read back in order, as the group knows them.
    let mut got = Vec::new();
    for _ in 0..PERSISTENT_WINDOW {
        got.extend(q.get(false, T0).map(|(e, _)| e));
    }
    // A get waits for a horizon past the paged-out head's id: read first.
    assert_eq!(q.stats(T0).ready_ram, 0);
    assert_eq!(q.get_waits_for(), Some(id(PERSISTENT_WINDOW)));
    assert!(q.stats(T0).ready_ram > 0);
    while let Some((e, _)) = q.get(false, T0) {
        got.push(e);
    }
    assert_eq!(got.len(), n);
    for (i, e) in got.iter().enumerate() {
        assert_eq!((e.seq, body(e)), (id(i), format!("m{i}")));
        let earlier = i % 97 == 5;
        assert_eq!(
            (e.redelivered, e.delivery_count),
            (earlier, if earlier { 3 } else { 0 })
        );
        assert!(e.pos.is_none(), "a replicated entry has no position");
    }
    // Each reported by its id when acked; the paged-out copies are gone.
    assert_eq!(rec.checked_out.lock().0.len(), n);
    q.ack(&got, T0);
    let mut settled = std::mem::take(&mut *rec.settled.lock());
    settled.sort_unstable();
    assert_eq!(settled, (0..n).map(id).collect::<Vec<_>>());
    assert!(paged(&store).is_empty());

    // A purge reports the window by ids and the paged-out rest by range.
    for i in n..2 * n {
        q.enqueue_replicated(persistent("p"), id(i), (false, 0), T0, T0);
    }
    assert_eq!(q.purge(), n);
    let settled = std::mem::take(&mut *rec.settled.lock());
    assert_eq!(settled.len(), PERSISTENT_WINDOW);
    assert_eq!(
        *rec.ranges.lock(),
        vec![(id(n + PERSISTENT_WINDOW), id(2 * n - 1) + 1)]
    );
    assert!(paged(&store).is_empty());

    // Losing the leadership drops the paged-out copies too.
    for i in 2 * n..3 * n {
        q.enqueue_replicated(persistent("r"), id(i), (false, 0), T0, T0);
    }
    assert_eq!(paged(&store).len(), 700);
    q.reset_replicated();
    assert!(paged(&store).is_empty());
    assert_eq!(q.stats(T0).ready, 0);
}

/// A quorum queue with `more` arguments (a replica is set by the test,
/// [`replicate`]) in `dir`'s store.
fn quorum_queue(dir: &TempDir, more: &[(&str, FieldValue)]) -> (Store, Arc<VHost>, Arc<Queue>) {
    let kind = (
        "x-queue-type",
        FieldValue::LongString(Bytes::from("quorum")),
    );
    let arguments: Vec<(&str, FieldValue)> =
        std::iter::once(kind).chain(more.iter().cloned()).collect();
    setup(dir, 1 << 20, &arguments)
}

/// Make `q` replicated, with a [`Recorder`] for its group.
fn replicate(q: &Queue) -> Arc<Recorder> {
    let rec = Arc::new(Recorder::default());
    q.set_replica(Some(rec.clone() as Arc<dyn crate::broker::remote::Replica>));
    rec
}

#[test]
fn a_replicated_queue_gets_only_within_the_committed_horizon() {
    let dir = TempDir::new();
    let (_store, _v, q) = quorum_queue(&dir, &[]);
    // Not replicated: a get never waits.
    q.enqueue_replicated(persistent("m9"), 9, (false, 0), T0, T0);
    assert_eq!(q.get_waits_for(), None);
    assert_eq!(q.get(true, T0).map(|(e, _)| e.seq), Some(9));
    let rec = replicate(&q);
    for id in 10..=12 {
        q.enqueue_replicated(persistent(&format!("m{id}")), id, (false, 0), T0, T0);
    }
    let horizons = || std::mem::take(&mut *rec.horizons.lock());
    let mut committed = q.follow_horizon();
    // Past the horizon (none yet): the get waits, one horizon is asked that
    // covers the ready messages, and not again while it is on its way.
    assert_eq!(q.get_waits_for(), Some(10));
    assert_eq!(horizons(), vec![12]);
    assert_eq!(q.get_waits_for(), Some(10));
    assert_eq!(horizons(), Vec::<u64>::new(), "one ask in flight");
    // Not committed: the next look asks again.
    q.horizon_answered(12, false, T0);
    assert_eq!(q.get_waits_for(), Some(10));
    assert_eq!(horizons(), vec![12]);
    assert!(!committed.has_changed().unwrap_or(true));
    // Committed: followers hear of it, and the gets are answered.
    q.horizon_answered(12, true, T0);
    assert!(committed.has_changed().unwrap_or(false));
    assert_eq!(*committed.borrow_and_update(), 12);
    assert_eq!(q.get_waits_for(), None);
    let (e, remaining) = q.get(false, T0).expect("within the horizon");
    assert_eq!((e.seq, remaining), (10, 2));
    // The leadership lost: back to none.
    q.reset_replicated();
    assert_eq!(*committed.borrow_and_update(), 0);
}

#[test]
fn a_replicated_queue_delivers_past_its_horizon_only_once_a_new_one_commits() {
    let dir = TempDir::new();
    let (_store, _v, q) = quorum_queue(&dir, &[]);
    let rec = replicate(&q);
    let sink = Arc::new(Sink::default());
    for id in 10..=12 {
        q.enqueue_replicated(persistent(&format!("m{id}")), id, (false, 0), T0, T0);
    }
    q.add_consumer(consumer(&sink, false), T0).expect("consume");
    q.dispatch(T0);
    let out = || std::mem::take(&mut *rec.checked_out.lock());
    let horizons = || std::mem::take(&mut *rec.horizons.lock());
    let sent = || {
        std::mem::take(&mut *sink.0.lock())
            .into_iter()
            .map(|d| (d.entry.seq, d.entry.redelivered))
            .collect::<Vec<_>>()
    };
    // Past the horizon (none yet): handed out (reported, counted unacked)
    // but held, and one horizon asked that covers the ready messages
    // behind the first.
    assert_eq!(out(), (vec![10, 11, 12], vec![]));
    assert_eq!(sent(), vec![], "nothing sent before the horizon commits");
    assert_eq!(q.stats(T0).unacked, 3);
    assert_eq!(horizons(), vec![12]);
    // Not committed: asked again, nothing sent.
    q.horizon_answered(12, false, T0);
    assert_eq!(horizons(), vec![12]);
    assert_eq!(sent(), vec![]);
    // Committed: sent in order, unflagged (they never reached a client).
    q.horizon_answered(12, true, T0);
    assert_eq!(sent(), vec![(10, false), (11, false), (12, false)]);
    // Past it again: held; a delivery within it (a loaded redelivery at
    // the tail) waits behind the held ones, so the consumer's order holds.
    q.enqueue_replicated(persistent("m13"), 13, (false, 0), T0, T0);
    q.enqueue_replicated(persistent("m9"), 9, (true, 1), T0, T0);
    assert_eq!(out(), (vec![13, 9], vec![]));
    assert_eq!(horizons(), vec![13]);
    assert_eq!(sent(), vec![]);
    q.horizon_answered(13, true, T0);
    assert_eq!(sent(), vec![(13, false), (9, true)]);
    // Within the horizon a leader starts with, at once.
    q.horizon_start(20);
    q.enqueue_replicated(persistent("m14"), 14, (false, 0), T0, T0);
    assert_eq!(sent(), vec![(14, false)]);
    // Losing the leadership drops what waits.
    q.enqueue_replicated(persistent("m21"), 21, (false, 0), T0, T0);
    assert_eq!(q.reset_replicated().len(), 1);
    q.horizon_answered(21, true, T0);
    assert_eq!(sent(), vec![]);
    // Without acks: settled once it reaches the client, not when held.
    let taken = || std::mem::take(&mut *rec.settled.lock());
    taken();
    horizons();
    q.add_consumer(consumer(&sink, true), T0).expect("consume");
    q.enqueue_replicated(persistent("m30"), 30, (false, 0), T0, T0);
    assert_eq!(taken(), Vec::<u64>::new());
    let h = *horizons().last().expect("a horizon asked");
    q.horizon_answered(h, true, T0);
    assert_eq!(sent(), vec![(30, false)]);
    assert_eq!(taken(), vec![30]);
}

#[test]
fn unacked_bytes_follow_gets_acks_rejects_and_requeues() {
    let dir = TempDir::new();
    let (_store, _v, q) = setup(&dir, 0, &[]);
    for b in ["a", "bb", "ccc", "dddd"] {
        q.enqueue(transient(b), T0);
    }
    let mut held: Vec<Entry> = (0..4)
        .filter_map(|_| q.get(false, T0))
        .map(|(e, _)| e)
        .collect();
    let bytes = |q: &Queue| {
        let st = q.stats(T0);
        (st.unacked, st.unacked_bytes, st.ready_bytes)
    };
    assert_eq!(bytes(&q), (4, 10, 0));
    let d = held.pop().expect("dddd");
    let c = held.pop().expect("ccc");
    let b = held.pop().expect("bb");
    q.ack(&[d], T0);
    assert_eq!(bytes(&q), (3, 6, 0));
    q.reject(vec![c], T0);
    assert_eq!(bytes(&q), (2, 3, 0));
    q.requeue(vec![b], true, true, T0);
    assert_eq!(bytes(&q), (1, 1, 2));
    // A get without ack is not counted.
    assert!(q.get(true, T0).is_some());
    assert_eq!(bytes(&q), (1, 1, 0));
}

fn stamped(body: &str, mode: u8, timestamp: Option<u64>) -> Arc<Message> {
    let props = BasicProperties {
        delivery_mode: Some(mode),
        timestamp,
        ..Default::default()
    };
    Message::new("", "q", props, Bytes::from(body.to_string()))
}

fn persistent_counts(q: &Queue) -> (usize, usize) {
    let st = q.stats(T0);
    (st.persistent, st.persistent_bytes)
}

#[test]
fn persistent_counts_follow_publish_delivery_settlement_and_purge() {
    let dir = TempDir::new();
    let (_store, v, q) = setup(&dir, 0, &[]);
    q.enqueue(persistent("aa"), T0);
    q.enqueue(persistent("bbb"), T0);
    q.enqueue(transient("t"), T0);
    assert_eq!(persistent_counts(&q), (2, 5), "transient ones do not count");
    // Unacked ones still count; acked, rejected ones do not.
    let (a, _) = q.get(false, T0).expect("aa");
    let (b, _) = q.get(false, T0).expect("bbb");
    assert_eq!(persistent_counts(&q), (2, 5));
    q.ack(&[a], T0);
    assert_eq!(persistent_counts(&q), (1, 3));
    q.requeue(vec![b], true, true, T0);
    assert_eq!(persistent_counts(&q), (1, 3));
    let (b, _) = q.get(false, T0).expect("bbb again");
    q.reject(vec![b], T0);
    assert_eq!(persistent_counts(&q), (0, 0));
    // A get without ack takes it out at once.
    q.enqueue(persistent("c"), T0);
    assert_eq!(persistent_counts(&q), (1, 1));
    let (t, _) = q.get(true, T0).expect("t");
    assert_eq!(body(&t), "t");
    assert_eq!(persistent_counts(&q), (1, 1));
    assert!(q.get(true, T0).is_some());
    assert_eq!(persistent_counts(&q), (0, 0));
    q.enqueue(persistent("dd"), T0);
    q.enqueue(transient("e"), T0);
    assert_eq!(persistent_counts(&q), (1, 2));
    assert_eq!(q.purge(), 2);
    assert_eq!(persistent_counts(&q), (0, 0));
    // A transient queue holds no persistent message (as RabbitMQ's).
    let (t, _) = v
        .declare_queue(
            &QueueDeclare {
                name: "t".into(),
                ..Default::default()
            },
            1,
            T0,
        )
        .expect("declare");
    t.enqueue(persistent("p"), T0);
    assert_eq!(persistent_counts(&t), (0, 0));
}

#[test]
fn persistent_counts_cover_paged_out_and_recovered_messages() {
    let dir = TempDir::new();
    // A 1-byte budget: every message is paged out as it arrives.
    let (store, v, q) = setup(&dir, 1, &[]);
    for i in 0..10 {
        q.enqueue(persistent(&format!("m{i}")), T0);
        q.enqueue(transient(&format!("t{i}")), T0);
    }
    assert_eq!(q.stats(T0).ready_ram, 0, "all paged out");
    assert_eq!(persistent_counts(&q), (10, 20));
    // Loaded back for a get: counts unchanged, then one leaves.
    let (m0, _) = q.get(true, T0).expect("m0");
    assert_eq!(body(&m0), "m0");
    assert_eq!(persistent_counts(&q), (9, 18));
    let (t0, _) = q.get(false, T0).expect("t0");
    assert_eq!(body(&t0), "t0");
    assert_eq!(persistent_counts(&q), (9, 18));
    store.flush_blocking().expect("flush");
    drop((q, v, store));
    // After a restart only the persistent ones are back, all counted.
    let store = Store::open(&dir.0).expect("reopen");
    let (_v, q, n) = recovered(&store);
    assert_eq!(n, 9);
    assert_eq!(persistent_counts(&q), (9, 18));
    let (m1, _) = q.get(false, T0).expect("m1");
    assert_eq!(body(&m1), "m1");
    assert_eq!(persistent_counts(&q), (9, 18), "unacked still counted");
    q.ack(&[m1], T0);
    assert_eq!(persistent_counts(&q), (8, 16));
}

#[test]
fn head_timestamp_is_the_oldest_of_the_ready_head_and_the_unacked() {
    let dir = TempDir::new();
    let (_store, _v, q) = setup(&dir, 0, &[]);
    assert_eq!(q.stats(T0).head_timestamp, None, "empty");
    q.enqueue(stamped("a", 2, Some(42)), T0);
    q.enqueue(stamped("b", 2, Some(43)), T0);
    q.enqueue(stamped("c", 1, None), T0);
    assert_eq!(q.stats(T0).head_timestamp, Some(42));
    // Handed out, the oldest unacked still counts (RabbitMQ's pending acks).
    let (a, _) = q.get(false, T0).expect("a");
    assert_eq!(q.stats(T0).head_timestamp, Some(42));
    q.ack(&[a], T0);
    assert_eq!(q.stats(T0).head_timestamp, Some(43));
    assert!(q.get(true, T0).is_some());
    assert_eq!(q.stats(T0).head_timestamp, None, "the head has none");
}

#[test]
fn idle_since_follows_the_last_activity() {
    let dir = TempDir::new();
    let (_store, _v, q) = setup(&dir, 0, &[]);
    assert_eq!(q.stats(T0).idle_since, None, "just declared");
    assert_eq!(
        q.stats(T0 + IDLE_AFTER_MS).idle_since,
        Some(T0 + IDLE_AFTER_MS)
    );
    q.enqueue(transient("a"), T0 + 5_000);
    assert_eq!(q.stats(T0 + 5_500).idle_since, None, "active");
    let at = T0 + 5_000 + IDLE_AFTER_MS;
    assert_eq!(q.stats(at + 60_000).idle_since, Some(at));
    // Reading the stats is no activity; a get is.
    let (e, _) = q.get(false, T0 + 100_000).expect("a");
    assert_eq!(q.stats(T0 + 100_500).idle_since, None);
    q.ack(&[e], T0 + 200_000);
    assert_eq!(
        q.stats(T0 + 300_000).idle_since,
        Some(T0 + 200_000 + IDLE_AFTER_MS)
    );
}

#[test]
fn consumer_utilisation_falls_while_every_consumer_is_full() {
    let dir = TempDir::new();
    let (_store, _v, q) = setup(&dir, 0, &[]);
    assert_eq!(q.stats(T0).consumer_utilisation, None, "no consumer");
    let sink = Arc::new(Sink::default());
    let c = consumer(&sink, false);
    c.credit.set_limit(1);
    q.add_consumer(Arc::clone(&c), T0).expect("consume");
    assert_eq!(q.stats(T0 + 10_000).consumer_utilisation, Some(1.0));
    // Two messages, prefetch 1: the second waits, the queue is inactive.
    q.enqueue(transient("a"), T0 + 10_000);
    q.enqueue(transient("b"), T0 + 10_000);
    assert_eq!(sink.0.lock().len(), 1);
    let u = |t| q.stats(t).consumer_utilisation.unwrap_or(-1.0);
    assert!((u(T0 + 10_000) - 1.0).abs() < 1e-9);
    // RabbitMQ's figure: the cycle's active share (10 s of 11, then of 20),
    // the earlier average (1.0) weighing 2^-11 and 2^-20 by then.
    let after_1s = u(T0 + 11_000);
    let after_10s = u(T0 + 20_000);
    assert!((after_1s - 10.0 / 11.0).abs() < 0.001, "{after_1s}");
    assert!((after_10s - 0.5).abs() < 0.001, "{after_10s}");
    // The ack frees the prefetch: active again, the average climbs back.
    let first = sink.0.lock().remove(0);
    c.credit.release(1);
    q.ack(&[first.entry], T0 + 20_000);
    q.dispatch(T0 + 20_000);
    assert_eq!(sink.0.lock().len(), 1, "b delivered");
    // A second fully active folds in with half weight: 0.5 + 0.5 * 0.5.
    let back = u(T0 + 21_000);
    assert!((back - 0.75).abs() < 0.001, "{back}");
    assert!(u(T0 + 30_000) > back);
    // Messages waiting with no consumer count as inactive time too: 10 s
    // active, then 10 s of that, is 0.5 when the next consumer comes.
    let (_, _) = q.remove_consumer(1, 1, "c", T0 + 30_000);
    q.enqueue(transient("c"), T0 + 30_000);
    q.add_consumer(consumer(&sink, true), T0 + 40_000)
        .expect("consume");
    let fresh = u(T0 + 40_000);
    assert!((fresh - 0.5).abs() < 0.001, "{fresh}");
}

#[test]
fn memory_counts_bodies_held_and_a_per_message_overhead() {
    let dir = TempDir::new();
    let (_store, _v, q) = setup(&dir, 0, &[]);
    let empty = q.stats(T0).memory;
    q.enqueue(transient(&"x".repeat(1000)), T0);
    assert_eq!(q.stats(T0).memory, empty + 1000 + MESSAGE_OVERHEAD);
    let (e, _) = q.get(false, T0).expect("x");
    assert_eq!(q.stats(T0).memory, empty + 1000 + MESSAGE_OVERHEAD);
    q.ack(&[e], T0);
    assert_eq!(q.stats(T0).memory, empty);
}

#[test]
fn a_replicated_message_keeps_the_ttl_clock_its_group_started() {
    let dir = TempDir::new();
    let (_store, _v, q) = quorum_queue(&dir, &[("x-message-ttl", FieldValue::I64(5000))]);
    replicate(&q);
    // Loaded 3 s after its group took it (a new leader): 2 s left, not 5.
    q.enqueue_replicated(persistent("old"), 1, (false, 0), T0, T0 + 3000);
    // Taken by an older entry that does not say when: from now.
    q.enqueue_replicated(persistent("unknown"), 2, (false, 0), 0, T0 + 3000);
    // A clock ahead of this node's is taken as now.
    q.enqueue_replicated(persistent("ahead"), 3, (false, 0), T0 + 9000, T0 + 3000);
    q.tick(T0 + 4999);
    assert_eq!(q.stats(T0 + 4999).ready, 3);
    q.tick(T0 + 5000);
    assert_eq!(q.stats(T0 + 5000).ready, 2, "the first expired at T0 + 5 s");
    q.tick(T0 + 8000);
    assert_eq!(q.stats(T0 + 8000).ready, 0);
}
