//! The stream log on a temporary directory: append/read, offsets specs,
//! recovery with a torn tail, retention (time passed in), dedup, tracking.

use super::*;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "warren-stream-{name}-{}-{}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn msg(s: &str) -> StreamMessage {
    StreamMessage {
        data: Bytes::copy_from_slice(s.as_bytes()),
        filter: None,
        publisher: None,
        batch: None,
    }
}

fn pubmsg(s: &str, r: &str, id: u64) -> StreamMessage {
    StreamMessage {
        publisher: Some((Arc::from(r), id)),
        ..msg(s)
    }
}

fn read_all(log: &StreamLog, spec: OffsetSpec) -> Vec<(u64, String)> {
    let mut r = log.reader(spec);
    let start = r.start();
    let mut out = Vec::new();
    while let Some(c) = r.next_chunk().expect("read") {
        for (o, b) in c.entries() {
            if o >= start {
                out.push((o, String::from_utf8_lossy(&b).into_owned()));
            }
        }
    }
    out
}

fn retention(seg: u64) -> Retention {
    Retention {
        max_segment_size: seg,
        ..Retention::default()
    }
}

#[test]
fn append_commit_read_and_offset_specs() {
    let dir = tmp("basic");
    let store = StreamStore::open(&dir).expect("open");
    let log = store.open_log("/\0s", Retention::default()).expect("log");
    assert!(log
        .reader(OffsetSpec::First)
        .next_chunk()
        .expect("r")
        .is_none());
    let a = log.append(vec![msg("a"), msg("b")], 1_000).expect("append");
    assert_eq!((a.first_offset, a.next_offset), (0, 2));
    log.wait_committed_blocking();
    let a = log.append(vec![msg("c")], 2_000).expect("append");
    assert_eq!((a.first_offset, a.next_offset), (2, 3));
    log.wait_committed_blocking();
    assert_eq!(*log.committed().borrow(), 3);
    let all: Vec<String> = read_all(&log, OffsetSpec::First)
        .into_iter()
        .map(|(_, s)| s)
        .collect();
    assert_eq!(all, ["a", "b", "c"]);
    assert_eq!(read_all(&log, OffsetSpec::Last), vec![(2, "c".into())]);
    assert_eq!(read_all(&log, OffsetSpec::Next), vec![]);
    assert_eq!(
        read_all(&log, OffsetSpec::Offset(1)),
        vec![(1, "b".into()), (2, "c".into())]
    );
    assert_eq!(
        read_all(&log, OffsetSpec::Timestamp(1_500)),
        vec![(2, "c".into())]
    );
    assert_eq!(read_all(&log, OffsetSpec::Timestamp(500)).len(), 3);
    assert_eq!(read_all(&log, OffsetSpec::Timestamp(5_000)), vec![]);
    // A reader at `next` sees what comes later, once committed.
    let mut r = log.reader(OffsetSpec::Next);
    assert!(r.next_chunk().expect("r").is_none());
    log.append(vec![msg("d")], 3_000).expect("append");
    log.wait_committed_blocking();
    let c = r.next_chunk().expect("r").expect("chunk");
    assert_eq!(c.entries().map(|(o, _)| o).collect::<Vec<_>>(), vec![3]);
    assert_eq!(c.raw[0], 0x50);
    let st = log.stats();
    assert_eq!(
        (st.first_offset, st.committed_offset, st.messages),
        (0, 4, 4)
    );
    assert_eq!(st.first_timestamp, 1_000);
    store.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn recovery_truncates_a_torn_tail_and_keeps_the_rest() {
    let dir = tmp("torn");
    {
        let store = StreamStore::open(&dir).expect("open");
        let log = store.open_log("k", retention(200)).expect("log");
        for i in 0..10 {
            log.append(vec![pubmsg(&format!("m{i}"), "p", i + 1)], 1_000 + i as i64)
                .expect("append");
            log.wait_committed_blocking();
        }
        log.store_offset("c1", 4).expect("store");
        log.append(vec![msg("last")], 5_000).expect("append");
        log.wait_committed_blocking();
        assert!(log.stats().segments > 2, "{:?}", log.stats());
        store.shutdown();
    }
    let sdir = std::fs::read_dir(&dir)
        .expect("dir")
        .next()
        .expect("a stream")
        .expect("entry")
        .path();
    let last = *segment::list(&sdir).expect("list").last().expect("segment");
    // A torn chunk: a valid header promising more bytes than written.
    let path = segment::segment_path(&sdir, last);
    let len = std::fs::metadata(&path).expect("meta").len();
    let torn = chunk::build(
        chunk::TYPE_USER,
        11,
        6_000,
        (1, 1),
        &[],
        b"\0\0\0\x05xxxxx",
        &[],
    );
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open");
    f.write_all_at(&torn[..30], len).expect("write");
    drop(f);
    let store = StreamStore::open(&dir).expect("reopen");
    let log = store.open_log("k", retention(200)).expect("log");
    assert_eq!(std::fs::metadata(&path).expect("meta").len(), len);
    assert_eq!(log.next_offset(), 11);
    assert_eq!(log.publisher_sequence("p"), 10);
    assert_eq!(log.publisher_sequence("nobody"), 0);
    assert_eq!(log.query_offset("c1"), Some(4));
    let all = read_all(&log, OffsetSpec::First);
    assert_eq!(all.len(), 11);
    assert_eq!(all[10], (10, "last".into()));
    // Dedup survives: id 10 again is a duplicate, 11 is new.
    let a = log
        .append(vec![pubmsg("dup", "p", 10), pubmsg("new", "p", 11)], 7_000)
        .expect("append");
    assert_eq!(a.duplicates, vec![0]);
    assert_eq!((a.first_offset, a.next_offset), (11, 12));
    log.wait_committed_blocking();
    assert_eq!(read_all(&log, OffsetSpec::Last), vec![(11, "new".into())]);
    store.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn retention_drops_whole_closed_segments_by_size_and_age() {
    let dir = tmp("ret");
    let store = StreamStore::open(&dir).expect("open");
    let log = store.open_log("k", retention(250)).expect("log");
    for i in 0..6u64 {
        log.append(vec![msg(&"x".repeat(60))], (i * 1_000) as i64)
            .expect("append");
        log.wait_committed_blocking();
    }
    let before = log.stats();
    assert_eq!(before.segments, 3, "{before:?}");
    // Age: segments whose newest chunk is older than now - 10s go; never the active one.
    log.set_retention(Retention {
        max_age_ms: Some(10_000),
        ..retention(250)
    });
    assert_eq!(log.apply_retention(11_500), 1);
    assert_eq!(log.first_offset(), 2);
    assert_eq!(log.apply_retention(1_000_000), 1);
    assert_eq!(log.apply_retention(1_000_000), 0);
    assert_eq!(log.stats().segments, 1);
    assert_eq!(read_all(&log, OffsetSpec::First).len(), 2);
    // An offset below the first is clamped to it.
    assert_eq!(read_all(&log, OffsetSpec::Offset(0))[0].0, 4);
    // Size: keep dropping while the rest is over the limit.
    for i in 0..6u64 {
        log.append(vec![msg(&"y".repeat(60))], 2_000_000 + i as i64)
            .expect("append");
        log.wait_committed_blocking();
    }
    log.set_retention(Retention {
        max_bytes: Some(300),
        ..retention(250)
    });
    let n = log.apply_retention(2_000_000);
    assert!(n >= 1);
    assert!(log.stats().bytes > 0);
    assert!(log.stats().segments >= 1);
    store.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn dedup_reports_duplicates_and_tracking_round_trips() {
    let dir = tmp("dedup");
    let store = StreamStore::open(&dir).expect("open");
    let log = store.open_log("k", Retention::default()).expect("log");
    let a = log
        .append(
            vec![
                pubmsg("a", "p", 1),
                pubmsg("b", "p", 2),
                pubmsg("a again", "p", 1),
            ],
            0,
        )
        .expect("append");
    assert_eq!(a.duplicates, vec![2]);
    assert_eq!(a.next_offset, 2);
    assert_eq!(log.publisher_sequence("p"), 2);
    let a = log.append(vec![pubmsg("b", "p", 2)], 0).expect("append");
    assert_eq!(
        (a.first_offset, a.next_offset, a.duplicates),
        (2, 2, vec![0])
    );
    assert_eq!(log.query_offset("c"), None);
    log.store_offset("c", 1).expect("store");
    log.store_offset("c", 2).expect("store");
    assert_eq!(log.query_offset("c"), Some(2));
    log.wait_committed_blocking();
    let (tx, rx) = std::sync::mpsc::channel();
    store.on_durable(Box::new(move |r| tx.send(r).expect("send")));
    rx.recv_timeout(std::time::Duration::from_secs(5))
        .expect("durable")
        .expect("ok");
    store.shutdown();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let store = StreamStore::open(&dir).expect("reopen");
    let log = store.open_log("k", Retention::default()).expect("log");
    assert_eq!(log.query_offset("c"), Some(2));
    assert_eq!(log.publisher_sequence("p"), 2);
    // Tracking chunks hold no offsets: user offsets stay contiguous.
    log.append(vec![msg("c")], 0).expect("append");
    log.wait_committed_blocking();
    let all = read_all(&log, OffsetSpec::First);
    assert_eq!(
        all.iter().map(|(o, _)| *o).collect::<Vec<_>>(),
        vec![0, 1, 2]
    );
    store.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bloom_filters_chunks_and_raw_leaves_it_out() {
    let dir = tmp("bloom");
    let store = StreamStore::open(&dir).expect("open");
    let log = store.open_log("k", Retention::default()).expect("log");
    let with = |s: &str, f: Option<&str>| StreamMessage {
        filter: f.map(str::to_string),
        ..msg(s)
    };
    log.append(vec![with("x", Some("emea")), with("y", Some("amer"))], 0)
        .expect("append");
    log.wait_committed_blocking();
    log.append(vec![with("z", None)], 0).expect("append");
    log.wait_committed_blocking();
    let mut r = log.reader(OffsetSpec::First);
    let c = r.next_chunk().expect("read").expect("chunk");
    assert_eq!(c.bloom.len(), 16);
    assert_eq!(
        c.raw.len(),
        chunk::HEADER_LEN + c.header.data_len as usize + c.header.trailer_len as usize
    );
    assert_eq!(c.entries().count(), 2);
    assert!(c.may_match(&["emea"], false));
    assert!(c.may_match(&["apac", "amer"], false));
    assert!(!c.may_match(&["apac"], false));
    assert!(!c.may_match(&["apac"], true), "no unfiltered message in it");
    // A chunk without filter values: only for consumers taking unfiltered ones.
    let c = r.next_chunk().expect("read").expect("chunk");
    assert!(c.bloom.is_empty());
    assert!(!c.may_match(&["emea"], false));
    assert!(c.may_match(&["emea"], true));
    store.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A sub-entry batch of `bodies` (records `size:32, bytes`), compressed with
/// `compression` (0 none, 1 gzip; others: the bytes are left as they are).
fn batch(bodies: &[&str], compression: u8, reference: Option<(&str, u64)>) -> StreamMessage {
    use std::io::Write;
    let mut raw = Vec::new();
    for b in bodies {
        raw.extend_from_slice(&(b.len() as u32).to_be_bytes());
        raw.extend_from_slice(b.as_bytes());
    }
    let data = if compression == 1 {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&raw).expect("gzip");
        e.finish().expect("gzip")
    } else {
        raw.clone()
    };
    StreamMessage {
        data: Bytes::from(data),
        filter: None,
        publisher: reference.map(|(r, id)| (Arc::from(r), id)),
        batch: Some(SubBatch {
            compression,
            records: bodies.len() as u16,
            uncompressed_len: raw.len() as u32,
        }),
    }
}

#[test]
fn sub_batches_are_one_entry_with_an_offset_per_record() {
    let dir = tmp("subbatch");
    {
        let store = StreamStore::open(&dir).expect("open");
        let log = store.open_log("k", retention(400)).expect("log");
        let a = log
            .append(
                vec![
                    msg("a"),
                    batch(&["b", "c", "d"], 0, Some(("p", 1))),
                    batch(&["e", "f"], 1, Some(("p", 2))),
                    // Snappy: stored and counted, not readable here.
                    batch(&["g", "h"], 2, None),
                    msg("i"),
                ],
                1_000,
            )
            .expect("append");
        assert_eq!((a.first_offset, a.next_offset), (0, 9));
        // The batch's one publishing id deduplicates it whole.
        let d = log
            .append(vec![batch(&["x", "y"], 0, Some(("p", 2)))], 1_000)
            .expect("append");
        assert_eq!((d.duplicates, d.next_offset), (vec![0], 9));
        log.wait_committed_blocking();
        assert_eq!(log.publisher_sequence("p"), 2);
        let mut r = log.reader(OffsetSpec::First);
        let c = r.next_chunk().expect("read").expect("chunk");
        assert_eq!((c.num_entries, c.num_records), (5, 9));
        assert_eq!(
            read_all(&log, OffsetSpec::First),
            vec![
                (0, "a".into()),
                (1, "b".into()),
                (2, "c".into()),
                (3, "d".into()),
                (4, "e".into()),
                (5, "f".into()),
                (8, "i".into()),
            ]
        );
        // An offset inside a batch: the chunk whole, the reader skips before.
        assert_eq!(read_all(&log, OffsetSpec::Offset(5))[0], (5, "f".into()));
        log.append(vec![batch(&["j", "k"], 1, None)], 2_000)
            .expect("append");
        log.wait_committed_blocking();
        assert_eq!(
            read_all(&log, OffsetSpec::Last),
            vec![(9, "j".into()), (10, "k".into())]
        );
        assert_eq!(read_all(&log, OffsetSpec::Timestamp(1_500))[0].0, 9);
        let st = log.stats();
        assert_eq!(
            (
                st.first_offset,
                st.last_offset,
                st.committed_offset,
                st.messages
            ),
            (0, 9, 11, 11)
        );
        store.shutdown();
    }
    // Recovery counts records, not entries: offsets and sequences continue.
    let store = StreamStore::open(&dir).expect("open");
    let log = store.open_log("k", retention(400)).expect("log");
    assert_eq!(*log.committed().borrow(), 11);
    assert_eq!(log.publisher_sequence("p"), 2);
    let a = log.append(vec![msg("l")], 3_000).expect("append");
    assert_eq!(a.first_offset, 11);
    log.wait_committed_blocking();
    assert_eq!(read_all(&log, OffsetSpec::Last), vec![(11, "l".into())]);
    // Retention drops whole segments; offsets of what stays are unchanged.
    for i in 0..20 {
        log.append(vec![batch(&["m", "n"], 0, None)], 4_000 + i)
            .expect("append");
        log.wait_committed_blocking();
    }
    log.set_retention(Retention {
        max_bytes: Some(600),
        ..retention(400)
    });
    assert!(log.apply_retention(10_000) > 0);
    let st = log.stats();
    assert!(st.first_offset > 0);
    let first = read_all(&log, OffsetSpec::First);
    assert_eq!(first[0].0, st.first_offset);
    assert_eq!(first.last().map(|x| x.0), Some(st.committed_offset - 1));
    store.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}
