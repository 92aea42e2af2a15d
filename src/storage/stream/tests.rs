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

/// Rewrite the indexes in `dir` in version 1's layout (32-byte records
/// without the chunk's header), as brokers before version 2 wrote them.
fn index_to_v1(dir: &Path) {
    for e in std::fs::read_dir(dir).expect("dir") {
        let path = e.expect("entry").path();
        if path.extension().is_none_or(|x| x != "index") {
            continue;
        }
        let idx = segment::Index::open(&path).expect("index");
        let mut out = b"WSTI\0\0\0\x01".to_vec();
        for i in 0..idx.count().expect("count") {
            let r = idx.read(i).expect("record");
            out.extend_from_slice(&r.chunk_id.to_be_bytes());
            out.extend_from_slice(&r.timestamp.to_be_bytes());
            out.extend_from_slice(&r.pos.to_be_bytes());
            out.extend_from_slice(&r.num_records.to_be_bytes());
            out.extend_from_slice(&[r.chunk_type, 0, 0, 0]);
        }
        std::fs::write(&path, out).expect("write");
    }
}

/// The directory of the one stream in a store's directory.
fn only_stream(dir: &Path) -> PathBuf {
    std::fs::read_dir(dir)
        .expect("dir")
        .next()
        .expect("a stream")
        .expect("entry")
        .path()
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
    assert_eq!(*log.durable().borrow(), 3, "fsynced too");
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
fn indexes_of_version_1_are_read_and_the_last_one_is_rewritten() {
    let dir = tmp("index-v1");
    let wrote;
    {
        let store = StreamStore::open(&dir).expect("open");
        let log = store.open_log("k", retention(200)).expect("log");
        for i in 0..10 {
            log.append(vec![msg(&format!("m{i}"))], 1_000 + i as i64)
                .expect("append");
            log.wait_committed_blocking();
        }
        assert!(log.stats().segments > 2, "{:?}", log.stats());
        wrote = read_all(&log, OffsetSpec::First);
        store.shutdown();
    }
    let sdir = only_stream(&dir);
    index_to_v1(&sdir);
    // And the first one no index at all: rebuilt by a scan.
    let firsts = segment::list(&sdir).expect("list");
    std::fs::write(segment::index_path(&sdir, firsts[0]), b"spoiled!").expect("spoil");
    let store = StreamStore::open(&dir).expect("reopen");
    let log = store.open_log("k", retention(200)).expect("log");
    let holds = |first: u64| {
        segment::Index::open(&segment::index_path(&sdir, first))
            .expect("index")
            .holds_headers()
    };
    // The closed segments' indexes as they were; the spoiled one and the
    // last one's rebuilt by the recovery scan, in the current version.
    assert!(holds(firsts[0]));
    assert!(firsts[1..firsts.len() - 1].iter().all(|&f| !holds(f)));
    assert!(holds(firsts[firsts.len() - 1]));
    assert_eq!(read_all(&log, OffsetSpec::First), wrote);
    assert_eq!(read_all(&log, OffsetSpec::Timestamp(1_004)), wrote[4..]);
    assert_eq!(read_all(&log, OffsetSpec::Offset(7)), wrote[7..]);
    // Located through either kind of index: every chunk, in order.
    let limits = ten_chunks(false);
    let mut r = log.reader(OffsetSpec::First);
    let (mut files, mut ids) = (Vec::new(), Vec::new());
    while r.has_more() {
        assert_eq!(
            r.locate_batch(&mut files, limits, None),
            Ok(BatchRead::Read)
        );
        ids.extend(files.iter().map(|f| f.header.first_offset));
    }
    assert_eq!(ids, (0..10).collect::<Vec<u64>>());
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
    let sdir = only_stream(&dir);
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

type Msg<'a> = (&'a str, i64, Option<&'a str>, Option<(&'a str, u64)>);

/// The write buffer after one append per message (no deduplication).
fn pending(msgs: &[Msg]) -> (Bytes, Vec<AppendMeta>) {
    let mut p = Pending::default();
    for &m in msgs {
        push(&mut p, &[m]);
    }
    (p.data.freeze(), p.appends)
}

/// One append of `msgs` (stamped with the first one's time, under the
/// first one's reference).
fn push(p: &mut Pending, msgs: &[Msg]) {
    let r = msgs[0].3.map(|(r, _)| Arc::<str>::from(r));
    let it = msgs.iter().map(|&(s, _, f, publ)| NewMessage {
        data: s.as_bytes(),
        filter: f,
        publishing_id: publ.map_or(0, |x| x.1),
        batch: None,
    });
    p.push(
        r.as_ref(),
        it,
        msgs[0].1,
        &mut HashMap::new(),
        (&mut Vec::new(), 0),
    );
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

#[test]
fn appends_with_and_without_filter_values_are_not_merged() {
    let msgs = pending(&[
        ("a", 1_000, None, None),
        ("b", 1_000, None, None),
        ("c", 1_000, Some("eu"), None),
        ("d", 1_000, Some("us"), None),
        ("e", 1_000, None, None),
    ]);
    let built = build_user_chunks(
        msgs,
        0,
        0,
        16,
        CHUNK_LIMITS,
        &mut Batch::fixed(CHUNK_MAX_ENTRIES),
    );
    let heads: Vec<(u64, u16, u8)> = built
        .iter()
        .map(|c| Header::parse(&c.head).expect("header"))
        .map(|h| (h.first_offset, h.num_entries, h.bloom_len))
        .collect();
    assert_eq!(heads, vec![(0, 2, 0), (2, 2, 16), (4, 1, 0)]);
    let bloom = &built[1].head[chunk::HEADER_LEN..chunk::HEADER_LEN + 16];
    assert!(chunk::bloom_contains(bloom, "eu") && chunk::bloom_contains(bloom, "us"));
    assert!(
        !chunk::bloom_contains(bloom, ""),
        "no unfiltered message in it"
    );
    // One append mixing them stays one chunk (as a publish frame).
    let mut p = Pending::default();
    push(
        &mut p,
        &[
            ("a", 0, None, None),
            ("c", 0, Some("eu"), None),
            ("e", 0, None, None),
        ],
    );
    let one = build_user_chunks(
        (p.data.freeze(), p.appends),
        0,
        0,
        16,
        CHUNK_LIMITS,
        &mut Batch::fixed(CHUNK_MAX_ENTRIES),
    );
    assert_eq!(one.len(), 1);
}

#[test]
fn appends_since_the_last_flush_merge_into_one_chunk() {
    // Three appends' messages (as the flusher takes them), the first mixing
    // an unfiltered message with a filtered one, the others filtered: one chunk.
    let mut p = Pending::default();
    push(
        &mut p,
        &[
            ("a", 1_000, None, Some(("p", 7))),
            ("b", 1_000, Some("eu"), Some(("p", 8))),
        ],
    );
    push(&mut p, &[("c", 3_000, Some("eu"), Some(("q", 2)))]);
    push(&mut p, &[("d", 2_000, Some("eu"), Some(("p", 5)))]);
    let built = build_user_chunks(
        (p.data.freeze(), p.appends),
        10,
        2_500,
        16,
        CHUNK_LIMITS,
        &mut Batch::fixed(CHUNK_MAX_ENTRIES),
    );
    assert_eq!(built.len(), 1);
    let raw = &built[0].bytes();
    let h = Header::parse(raw).expect("header");
    assert_eq!(h.chunk_type, chunk::TYPE_USER);
    assert_eq!((h.first_offset, h.num_entries, h.num_records), (10, 4, 4));
    // The newest message's time, never below the stream's last one.
    assert_eq!(h.timestamp, 3_000);
    assert_eq!(h.bloom_len, 16);
    let bloom = &raw[chunk::HEADER_LEN..chunk::HEADER_LEN + 16];
    assert!(chunk::bloom_contains(bloom, "eu"));
    assert!(chunk::bloom_contains(bloom, ""));
    let data_at = chunk::HEADER_LEN + 16;
    let data = raw.slice(data_at..data_at + h.data_len as usize);
    assert_eq!(h.crc, crc32fast::hash(&data));
    let bodies: Vec<Bytes> = chunk::entries(data)
        .filter_map(|e| match e {
            chunk::Entry::Simple(b) => Some(b),
            chunk::Entry::SubBatch { .. } => None,
        })
        .collect();
    assert_eq!(
        bodies,
        ["a", "b", "c", "d"].map(|s| Bytes::from_static(s.as_bytes()))
    );
    // The trailer: each reference's highest publishing id, at this chunk.
    let trailer = &raw[data_at + h.data_len as usize..];
    assert_eq!(trailer.len(), h.trailer_len as usize);
    let mut t = chunk::trailer(trailer, h.first_offset);
    t.sort_by(|a, b| format!("{a:?}").cmp(&format!("{b:?}")));
    assert_eq!(
        t,
        vec![
            chunk::Tracking::Sequence {
                reference: "p".into(),
                chunk: 10,
                sequence: 8
            },
            chunk::Tracking::Sequence {
                reference: "q".into(),
                chunk: 10,
                sequence: 2
            },
        ]
    );
    assert_eq!(built[0].refs.len(), 2);
}

#[test]
fn merged_chunks_are_bounded() {
    let names: Vec<String> = (0..5).map(|i| format!("m{i}")).collect();
    let one: Vec<Msg> = (0..5)
        .map(|i| {
            (
                names[i].as_str(),
                100 + i as i64,
                None,
                Some(("p", 10 + i as u64)),
            )
        })
        .collect();
    let msgs = pending(&one);
    let limits = ChunkLimits {
        entries: 2,
        bytes: 1 << 20,
    };
    let built = build_user_chunks(msgs, 0, 0, 16, limits, &mut Batch::fixed(CHUNK_MAX_ENTRIES));
    let heads: Vec<(u64, u16, i64)> = built
        .iter()
        .map(|c| Header::parse(&c.head).expect("header"))
        .map(|h| (h.first_offset, h.num_entries, h.timestamp))
        .collect();
    assert_eq!(heads, vec![(0, 2, 101), (2, 2, 103), (4, 1, 104)]);
    // The same five in one append: cut inside it, entry by entry, each
    // chunk's trailer still with its own highest id.
    let mut p = Pending::default();
    push(&mut p, &one);
    let split = build_user_chunks(
        (p.data.freeze(), p.appends),
        0,
        0,
        16,
        limits,
        &mut Batch::fixed(CHUNK_MAX_ENTRIES),
    );
    let heads: Vec<(u64, u16, i64)> = split
        .iter()
        .map(|c| Header::parse(&c.head).expect("header"))
        .map(|h| (h.first_offset, h.num_entries, h.timestamp))
        .collect();
    assert_eq!(heads, vec![(0, 2, 100), (2, 2, 100), (4, 1, 100)]);
    assert_eq!(
        split.iter().map(|c| c.refs.clone()).collect::<Vec<_>>(),
        vec![
            vec![(Arc::from("p"), 11)],
            vec![(Arc::from("p"), 13)],
            vec![(Arc::from("p"), 14)]
        ]
    );
    for (a, b) in built.iter().zip(&split) {
        assert_eq!(a.data, b.data);
        let (ha, hb) = (Header::parse(&a.head), Header::parse(&b.head));
        assert_eq!(ha.map(|h| h.crc), hb.map(|h| h.crc));
    }
    // Each chunk's trailer names its own id and its own highest sequence.
    assert_eq!(built[1].refs, vec![(Arc::from("p"), 13)]);
    let h = Header::parse(&built[1].head).expect("header");
    let at = chunk::HEADER_LEN + h.data_len as usize;
    assert_eq!(
        chunk::trailer(&built[1].bytes()[at..], h.first_offset),
        vec![chunk::Tracking::Sequence {
            reference: "p".into(),
            chunk: 2,
            sequence: 13
        }]
    );
    // A byte bound: a chunk stops taking messages once its data reaches it
    // (each entry here is 4 + 2 bytes).
    let five: Vec<Msg> = names.iter().map(|n| (n.as_str(), 0, None, None)).collect();
    let limits = ChunkLimits {
        entries: 100,
        bytes: 12,
    };
    let sizes: Vec<u16> =
        entries_per_chunk(pending(&five), limits, &mut Batch::fixed(CHUNK_MAX_ENTRIES));
    assert_eq!(sizes, vec![2, 2, 1]);
    let mut p = Pending::default();
    push(&mut p, &five);
    let sizes: Vec<u16> = entries_per_chunk(
        (p.data.freeze(), p.appends),
        limits,
        &mut Batch::fixed(CHUNK_MAX_ENTRIES),
    );
    assert_eq!(sizes, vec![2, 2, 1]);
}

#[test]
fn the_flusher_lingers_only_under_sustained_load() {
    let l = Linger {
        max_wait_us: 1_000,
        min_bytes: 4_096,
        quiet_us: 300,
    };
    // Not busy (e.g. a producer waiting for each confirm): at once.
    assert_eq!(l.wait_us(false, 10, None, 0), 0);
    // Busy: in steps of at most quiet_us, up to max_wait after waking...
    assert_eq!(l.wait_us(true, 10, None, 0), 300);
    assert_eq!(l.wait_us(true, 20, Some(10), 300), 300);
    assert_eq!(l.wait_us(true, 30, Some(20), 800), 200);
    assert_eq!(l.wait_us(true, 40, Some(30), 1_000), 0);
    assert_eq!(l.wait_us(true, 40, None, 5_000), 0);
    // ...or until enough is buffered...
    assert_eq!(l.wait_us(true, 4_096, None, 0), 0);
    // ...or until a step passes without an append (producers wait for confirms).
    assert_eq!(l.wait_us(true, 20, Some(20), 300), 0);
}

#[test]
fn batch_reads_take_contiguous_chunks_up_to_credit_and_bytes() {
    let dir = tmp("batch");
    let store = StreamStore::open(&dir).expect("open");
    let log = store.open_log("/\0s", Retention::default()).expect("log");
    // Five chunks of 3 messages (each append committed before the next).
    for c in 0..5u64 {
        let m: Vec<StreamMessage> = (0..3).map(|i| msg(&format!("{}", c * 3 + i))).collect();
        log.append(m, 1_000).expect("append");
        log.wait_committed_blocking();
        if c == 1 {
            // A tracking chunk between user chunks.
            log.store_offset("reader", 4).expect("store");
            log.wait_committed_blocking();
            while log.stats().chunks < 3 {
                std::thread::yield_now();
            }
        }
    }
    let mut r = log.reader(OffsetSpec::First);
    let (mut buf, mut spans) = (Vec::new(), Vec::new());
    let mut got = Vec::new();
    let mut reads = Vec::new();
    for (chunks, bytes) in [
        (2, 1 << 20),
        (1, 1 << 20),
        (10, 60),
        (10, 1 << 20),
        (10, 1 << 20),
    ] {
        let limits = BatchLimits {
            chunks,
            bytes,
            cached_only: false,
            merge: None,
        };
        assert_eq!(
            r.read_batch(&mut buf, &mut spans, limits, &|_| true),
            Ok(BatchRead::Read)
        );
        reads.push(spans.len());
        for s in &spans {
            let data = Bytes::copy_from_slice(&buf[s.data_range()]);
            for (o, e) in (s.header.first_offset..).zip(chunk::entries(data)) {
                if let chunk::Entry::Simple(b) = e {
                    got.push((o, String::from_utf8_lossy(&b).into_owned()));
                }
            }
        }
    }
    // Up to the credit; a range smaller than a chunk still reads it whole;
    // the tracking chunk is skipped; then caught up (nothing).
    assert_eq!(reads, vec![2, 1, 1, 1, 0]);
    let want: Vec<(u64, String)> = (0..15).map(|i| (i, i.to_string())).collect();
    assert_eq!(got, want);
    assert!(!r.has_more());
    // A filter that wants nothing: skipped, the reader still catches up.
    let mut r = log.reader(OffsetSpec::First);
    let limits = BatchLimits {
        chunks: 10,
        bytes: 1 << 20,
        cached_only: false,
        merge: None,
    };
    assert_eq!(
        r.read_batch(&mut buf, &mut spans, limits, &|_| false),
        Ok(BatchRead::Read)
    );
    assert!(spans.is_empty() && !r.has_more());
    store.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

/// Ten chunks at most, 1 MiB, no merging.
fn ten_chunks(cached_only: bool) -> BatchLimits {
    BatchLimits {
        chunks: 10,
        bytes: 1 << 20,
        cached_only,
        merge: None,
    }
}

/// Each located chunk's stored header and where its data is.
fn places(files: &[FileSpan]) -> Vec<([u8; chunk::HEADER_LEN], u64)> {
    files.iter().map(|f| (f.raw_header, f.data_pos)).collect()
}

/// Chunks of 3 messages of `size` bytes, written and fsynced, and where
/// each one's data is (located, not from the page cache only).
fn located_log(name: &str, size: usize) -> (PathBuf, StreamStore, Arc<StreamLog>, Vec<FileSpan>) {
    let dir = tmp(name);
    let store = StreamStore::open(&dir).expect("open");
    let log = store.open_log("/\0s", Retention::default()).expect("log");
    for c in 0..4u8 {
        let body = vec![b'a' + c; size];
        let m: Vec<StreamMessage> = (0..3)
            .map(|_| StreamMessage {
                data: Bytes::from(body.clone()),
                ..msg("")
            })
            .collect();
        log.append(m, 1_000).expect("append");
        log.wait_committed_blocking();
    }
    let files = locate_from_first(&log);
    assert_eq!(files.len(), 4);
    (dir, store, log, files)
}

/// Up to ten chunks from the first, located (not from the page cache only).
fn locate_from_first(log: &StreamLog) -> Vec<FileSpan> {
    let mut files = Vec::new();
    let mut r = log.reader(OffsetSpec::First);
    assert_eq!(
        r.locate_batch(&mut files, ten_chunks(false), None),
        Ok(BatchRead::Read)
    );
    files
}

#[test]
fn located_chunks_take_their_headers_from_the_index() {
    let (dir, store, log, files) = located_log("locate-index", 100);
    // Every stored header in the segment spoiled: the reader that sends data
    // sections from the file still finds the chunks (the index holds their
    // headers), the one that reads them whole does not.
    let seg = std::fs::OpenOptions::new()
        .write(true)
        .open(segment::segment_path(&log.inner.dir, 0))
        .expect("segment");
    for f in &files {
        let at = f.data_pos - chunk::HEADER_LEN as u64 - u64::from(f.header.bloom_len);
        seg.write_all_at(&[0xff], at).expect("spoil");
    }
    assert_eq!(places(&locate_from_first(&log)), places(&files));
    let limits = ten_chunks(false);
    let (mut buf, mut spans) = (Vec::new(), Vec::new());
    let mut whole = log.reader(OffsetSpec::First);
    assert!(whole
        .read_batch(&mut buf, &mut spans, limits, &|_| true)
        .is_err());
    store.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn located_chunks_the_page_cache_dropped_are_left_for_a_read_that_may_wait() {
    // Chunks of 48 KiB: several pages each.
    let (dir, store, log, files) = located_log("locate-evicted", 16 << 10);
    let seg = File::open(segment::segment_path(&log.inner.dir, 0)).expect("segment");
    // The last two chunks dropped from the page cache (written and fsynced:
    // clean pages the kernel lets go).
    use std::os::fd::AsRawFd;
    let from = files[2].data_pos;
    let len = seg.metadata().expect("len").len() - from;
    // SAFETY: the fd is open for the call.
    let r = unsafe {
        libc::posix_fadvise(
            seg.as_raw_fd(),
            from as libc::off_t,
            len as libc::off_t,
            libc::POSIX_FADV_DONTNEED,
        )
    };
    assert_eq!(r, 0);
    let mut probe = [0u8; 1];
    if read_into(&seg, &mut probe, from + len - 1, true)
        .ok()
        .flatten()
        == Some(1)
    {
        // A file system whose pages cannot be dropped (tmpfs): nothing to see.
        eprintln!("the page cache kept the segment's pages; not checked");
        store.shutdown();
        let _ = std::fs::remove_dir_all(&dir);
        return;
    }
    let limits = ten_chunks(true);
    let mut r = log.reader(OffsetSpec::First);
    // The segment is opened where the disk may be waited for.
    let mut got = Vec::new();
    let opening = BatchLimits {
        chunks: 1,
        cached_only: false,
        ..limits
    };
    assert_eq!(r.locate_batch(&mut got, opening, None), Ok(BatchRead::Read));
    assert_eq!(got.len(), 1);
    // From the page cache: the chunk it holds, then nothing (not a chunk
    // whose data would make `sendfile(2)` wait for the disk).
    let mut cached = Vec::new();
    assert_eq!(
        r.locate_batch(&mut cached, limits, None),
        Ok(BatchRead::Read)
    );
    assert_eq!(cached.len(), 1);
    got.append(&mut cached);
    assert_eq!(
        r.locate_batch(&mut cached, limits, None),
        Ok(BatchRead::WouldBlock)
    );
    assert!(cached.is_empty());
    // A read that may wait takes the rest, from where the cached one stopped.
    let waiting = ten_chunks(false);
    assert_eq!(
        r.locate_batch(&mut cached, waiting, None),
        Ok(BatchRead::Read)
    );
    got.append(&mut cached);
    assert!(!r.has_more());
    assert_eq!(places(&got), places(&files));
    store.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn located_chunks_point_at_the_data_read_batch_reads() {
    let dir = tmp("locate");
    let store = StreamStore::open(&dir).expect("open");
    let log = store.open_log("/\0s", Retention::default()).expect("log");
    for c in 0..4u64 {
        let m: Vec<StreamMessage> = (0..3).map(|i| msg(&format!("{}", c * 3 + i))).collect();
        log.append(m, 1_000).expect("append");
        log.wait_committed_blocking();
        if c == 1 {
            log.store_offset("reader", 4).expect("store");
            log.wait_committed_blocking();
        }
    }
    let limits = ten_chunks(false);
    let mut r = log.reader(OffsetSpec::First);
    let (mut buf, mut spans) = (Vec::new(), Vec::new());
    assert_eq!(
        r.read_batch(&mut buf, &mut spans, limits, &|_| true),
        Ok(BatchRead::Read)
    );
    let mut files = Vec::new();
    let mut located = log.reader(OffsetSpec::First);
    // Two chunks at most, then the rest; the tracking chunk skipped.
    let mut got = Vec::new();
    for chunks in [2, 10] {
        let limits = BatchLimits { chunks, ..limits };
        assert_eq!(
            located.locate_batch(&mut files, limits, None),
            Ok(BatchRead::Read)
        );
        assert!(files.len() <= chunks);
        got.append(&mut files);
    }
    assert_eq!(got.len(), spans.len());
    assert_eq!(got.len(), 4);
    for (f, s) in got.iter().zip(&spans) {
        assert_eq!(f.header, s.header);
        assert_eq!(&f.raw_header[..], &buf[s.header_range()]);
        let mut data = vec![0u8; f.header.data_len as usize];
        f.file.read_exact_at(&mut data, f.data_pos).expect("read");
        assert_eq!(&data[..], &buf[s.data_range()]);
    }
    assert!(!located.has_more());
    // What the page cache holds (just written): found without waiting.
    let mut cached = log.reader(OffsetSpec::First);
    let limits = BatchLimits {
        cached_only: true,
        ..limits
    };
    match cached.locate_batch(&mut files, limits, None) {
        Ok(BatchRead::Read) => assert_eq!(files.len(), 4),
        // The reader's segment is opened on a thread that may block.
        Ok(BatchRead::WouldBlock) => assert!(files.is_empty()),
        Err(e) => panic!("{e}"),
    }
    // One chunk per call (a consumer giving one credit at a time), from the
    // page cache once the segment is open: the same chunks. Their headers
    // come from the index; from an index of version 1, which holds none,
    // each next one's header is read ahead with the last bytes of the one
    // before (the tracking chunk's too).
    let one_at_a_time = |files: &mut Vec<FileSpan>| {
        let mut one = log.reader(OffsetSpec::First);
        let opening = BatchLimits {
            chunks: 1,
            cached_only: false,
            ..limits
        };
        let cached1 = BatchLimits {
            cached_only: true,
            ..opening
        };
        assert_eq!(one.locate_batch(files, opening, None), Ok(BatchRead::Read));
        let mut one_by_one = std::mem::take(files);
        let mut peeked = 0;
        while one.has_more() {
            peeked += usize::from(one.peek.is_some());
            match one.locate_batch(files, cached1, None) {
                Ok(BatchRead::Read) => one_by_one.append(files),
                Ok(BatchRead::WouldBlock) => {
                    assert_eq!(one.locate_batch(files, opening, None), Ok(BatchRead::Read));
                    one_by_one.append(files);
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(
            one_by_one
                .iter()
                .map(|f| (f.header, f.data_pos))
                .collect::<Vec<_>>(),
            got.iter()
                .map(|f| (f.header, f.data_pos))
                .collect::<Vec<_>>()
        );
        for (f, s) in one_by_one.iter().zip(&spans) {
            assert_eq!(&f.raw_header[..], &buf[s.header_range()]);
        }
        peeked
    };
    assert_eq!(one_at_a_time(&mut files), 0);
    index_to_v1(&log.inner.dir);
    // The page cache holds what was just written: the calls after the
    // second started from a header read ahead by the call before (the
    // first, not page-cache only, reads no last byte and so none ahead).
    assert_eq!(one_at_a_time(&mut files), 2);
    // A filter that wants nothing: none, and caught up.
    let mut r = log.reader(OffsetSpec::First);
    assert_eq!(
        r.locate_batch(
            &mut files,
            BatchLimits {
                cached_only: false,
                ..limits
            },
            Some(&|_| false)
        ),
        Ok(BatchRead::Read)
    );
    assert!(files.is_empty() && !r.has_more());
    store.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The entries of each chunk `build_user_chunks` cuts `msgs` into.
fn entries_per_chunk(
    msgs: (Bytes, Vec<AppendMeta>),
    limits: ChunkLimits,
    batch: &mut Batch,
) -> Vec<u16> {
    build_user_chunks(msgs, 0, 0, 16, limits, batch)
        .iter()
        .map(|c| Header::parse(&c.head).expect("header").num_entries)
        .collect()
}

#[test]
fn chunks_grow_from_32_and_shrink_when_the_writer_runs_dry() {
    let sizes = |msgs, batch: &mut Batch| entries_per_chunk(msgs, CHUNK_LIMITS, batch);
    let names: Vec<String> = (0..20_000).map(|i| format!("{i}")).collect();
    let frame = |n: usize| {
        let mut p = Pending::default();
        let msgs: Vec<Msg> = names[..n]
            .iter()
            .map(|s| (s.as_str(), 0, None, None))
            .collect();
        push(&mut p, &msgs);
        (p.data.freeze(), p.appends)
    };
    let mut batch = Batch::ADAPTIVE;
    // A publish frame of 100 after a quiet spell: 32, 64, then the 4 left
    // (the last chunk a consumer from `last` is sent).
    assert_eq!(sizes(frame(100), &mut batch), vec![32, 64, 4]);
    assert_eq!(batch.size, 128);
    // Nothing came meanwhile: the writer ran dry; it starts again from
    // twice what the round carried.
    batch.quiet();
    assert_eq!(batch.size, 200);
    // Steady rounds of about that size: a chunk each.
    assert_eq!(sizes(frame(100), &mut batch), vec![100]);
    batch.quiet();
    assert_eq!(sizes(frame(150), &mut batch), vec![150]);
    batch.quiet();
    assert_eq!(batch.size, 300, "the round that ran dry sets it");
    // Single-message appends count as one each, as casts to the writer.
    let singles: Vec<Msg> = names[..10]
        .iter()
        .map(|s| (s.as_str(), 0, None, None))
        .collect();
    assert_eq!(sizes(pending(&singles), &mut batch), vec![10]);
    batch.quiet();
    assert_eq!(batch.size, 32, "never below 32");
    // Sustained load (more appends came while each round was written: no
    // quiet): chunks grow to 8192 entries and stay there.
    let got = sizes(frame(20_000), &mut batch);
    assert_eq!(
        got,
        vec![
            32,
            64,
            128,
            256,
            512,
            1024,
            2048,
            4096,
            8192,
            20_000 - 16_352
        ]
    );
    assert_eq!(batch.size, 8192);
    assert_eq!(sizes(frame(3_000), &mut batch), vec![3_000]);
    assert_eq!(sizes(frame(20_000), &mut batch), vec![8192, 8192, 3616]);
    // Quiet again: the first dry round counts the busy spell, the next
    // one brings it back to 32.
    assert_eq!(sizes(frame(1), &mut batch), vec![1]);
    batch.quiet();
    assert_eq!(batch.size, 8192);
    assert_eq!(sizes(frame(1), &mut batch), vec![1]);
    batch.quiet();
    assert_eq!(batch, Batch::ADAPTIVE);
}

/// The segment files of one stream under `dir`, sorted.
fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).expect("read dir").flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else if p.extension().is_some_and(|x| x == "segment") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn segments_of_the_previous_trailer_format_are_read_and_never_appended_to() {
    let dir = tmp("v1");
    let store = StreamStore::open(&dir).expect("open");
    let log = store.open_log("k", Retention::default()).expect("log");
    log.append(vec![pubmsg("a", "pub", 1), pubmsg("b", "pub", 2)], 0)
        .expect("append");
    log.wait_committed_blocking();
    store.shutdown();
    std::thread::sleep(std::time::Duration::from_millis(20));
    // Rewrite the one chunk as version 1 wrote it: the trailer in the
    // tracking layout (u16 length, chunk id), the segment's version 1.
    let files = segment_files(&dir);
    assert_eq!(files.len(), 1);
    let bytes = std::fs::read(&files[0]).expect("read");
    assert_eq!(&bytes[..8], segment::SEGMENT_MAGIC);
    let at = segment::FILE_HEADER as usize;
    let mut h = Header::parse(&bytes[at..]).expect("header");
    let data_end = at + chunk::HEADER_LEN + usize::from(h.bloom_len) + h.data_len as usize;
    assert_eq!(h.trailer_len, 1 + 1 + 3 + 8);
    let mut old = BytesMut::new();
    chunk::put_tracking(
        &mut old,
        &chunk::Tracking::Sequence {
            reference: "pub".into(),
            chunk: h.first_offset,
            sequence: 2,
        },
    );
    h.trailer_len = old.len() as u32;
    let mut v1 = BytesMut::from(&b"WSTL\0\0\0\x01"[..]);
    h.write(&mut v1);
    v1.extend_from_slice(&bytes[at + chunk::HEADER_LEN..data_end]);
    v1.extend_from_slice(&old);
    std::fs::write(&files[0], &v1).expect("write");

    let store = StreamStore::open(&dir).expect("reopen");
    let log = store.open_log("k", Retention::default()).expect("log");
    // Its trailer read in its own layout: the publisher's sequence is back.
    assert_eq!(log.publisher_sequence("pub"), 2);
    let dup = log.append(vec![pubmsg("b", "pub", 2)], 0).expect("append");
    assert_eq!(dup.duplicates, vec![0]);
    // A new chunk starts a new segment (of this version) rather than mixing
    // layouts in the old one.
    log.append(vec![pubmsg("c", "pub", 3)], 0).expect("append");
    log.wait_committed_blocking();
    let files = segment_files(&dir);
    assert_eq!(files.len(), 2);
    assert_eq!(std::fs::read(&files[0]).expect("read"), v1.to_vec());
    let new = std::fs::read(&files[1]).expect("read");
    assert_eq!(&new[..8], segment::SEGMENT_MAGIC);
    let want = vec![(0, "a".to_string()), (1, "b".into()), (2, "c".into())];
    assert_eq!(read_all(&log, OffsetSpec::First), want);
    store.shutdown();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let store = StreamStore::open(&dir).expect("reopen");
    let log = store.open_log("k", Retention::default()).expect("log");
    assert_eq!(log.publisher_sequence("pub"), 3);
    assert_eq!(read_all(&log, OffsetSpec::First), want);
    store.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn next_and_last_count_messages_appended_and_not_yet_written() {
    let dir = tmp("pending-spec");
    let store = StreamStore::open(&dir).expect("open");
    let log = store.open_log("/\0s", Retention::default()).expect("log");
    log.append(vec![msg("old")], 1_000).expect("append");
    log.wait_committed_blocking();
    // The flusher cannot write while the writer is held: these stay pending.
    let held = log.inner.writer.lock();
    log.append(vec![msg("a"), msg("b"), msg("c")], 2_000)
        .expect("append");
    let mut next = log.reader(OffsetSpec::Next);
    let mut last = log.reader(OffsetSpec::Last);
    assert_eq!(*log.committed().borrow(), 1, "not written yet");
    assert!(!last.has_more());
    assert!(last.next_chunk().expect("read").is_none());
    drop(held);
    log.wait_committed_blocking();
    // `last`: the chunk of the pending messages, not the one before them.
    assert!(last.has_more());
    let c = last.next_chunk().expect("read").expect("a chunk");
    let got: Vec<_> = c.entries().map(|(o, _)| o).collect();
    assert_eq!(got, vec![1, 2, 3]);
    // `next`: after them.
    assert!(!next.has_more());
    log.append(vec![msg("d")], 3_000).expect("append");
    log.wait_committed_blocking();
    let c = next.next_chunk().expect("read").expect("a chunk");
    assert_eq!(c.first_offset, 4);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn durable_callbacks_run_in_the_order_of_their_calls() {
    let dir = tmp("order");
    let store = StreamStore::open(&dir).expect("open");
    let order = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let note = |n: u32| -> Callback {
        let order = Arc::clone(&order);
        Box::new(move |r| {
            assert!(r.is_ok());
            order.lock().push(n);
        })
    };
    // Nothing waits: at once.
    store.on_durable(note(0));
    assert_eq!(*order.lock(), [0]);
    // 1 waits for a write not synced yet ...
    let shared = &store.shared;
    shared.appended.fetch_add(1, Ordering::SeqCst);
    store.on_durable(note(1));
    // ... which the flusher has synced but not answered 1 for: 2 finds its
    // data synced and must still come after 1.
    shared
        .synced
        .fetch_max(shared.appended.load(Ordering::SeqCst), Ordering::SeqCst);
    store.on_durable(note(2));
    assert_eq!(*order.lock(), [0], "waits behind 1");
    answer_waiters(shared, None);
    assert_eq!(*order.lock(), [0, 1, 2]);
    store.on_durable(note(3));
    assert_eq!(*order.lock(), [0, 1, 2, 3], "none waits: at once again");
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn merged_reads_count_delivered_chunks_and_stop_before_the_next_one() {
    let dir = tmp("merge");
    let store = StreamStore::open(&dir).expect("open");
    let log = store.open_log("/\0s", Retention::default()).expect("log");
    // Six chunks of 3 messages: three written 1 ms apart (a tracking chunk
    // between the second and the third), then three a second later.
    for (c, ts) in [1_000, 1_001, 1_002, 2_000, 2_000, 2_001]
        .into_iter()
        .enumerate()
    {
        let m: Vec<StreamMessage> = (0..3).map(|i| msg(&format!("{}", c * 3 + i))).collect();
        log.append(m, ts).expect("append");
        log.wait_committed_blocking();
        if c == 1 {
            // Written on its own, before the next append (not after it, in
            // the same round).
            let chunks = log.stats().chunks;
            log.store_offset("reader", 4).expect("store");
            while log.stats().chunks == chunks {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
    }
    let merge = MergeLimits {
        data_len: 1 << 20,
        span_ms: 10,
    };
    let limits = BatchLimits {
        chunks: 1,
        bytes: 1 << 20,
        cached_only: false,
        merge: Some(merge),
    };
    // One delivered chunk a read: the first three stored ones, then the last three.
    let (mut buf, mut spans, mut files) = (Vec::new(), Vec::new(), Vec::new());
    let mut r = log.reader(OffsetSpec::First);
    let mut located = log.reader(OffsetSpec::First);
    for first in [0u64, 9] {
        assert_eq!(
            r.read_batch(&mut buf, &mut spans, limits, &|_| true),
            Ok(BatchRead::Read)
        );
        assert_eq!(
            located.locate_batch(&mut files, limits, None),
            Ok(BatchRead::Read)
        );
        let ids: Vec<(u64, bool)> = spans
            .iter()
            .map(|s| (s.header.first_offset, s.joins))
            .collect();
        let want = vec![(first, false), (first + 3, true), (first + 6, true)];
        assert_eq!(ids, want);
        let located_ids: Vec<(u64, bool)> = files
            .iter()
            .map(|s| (s.header.first_offset, s.joins))
            .collect();
        assert_eq!(located_ids, want);
        // The last span of the run holds the delivered chunk's header.
        let d = spans[2].delivered;
        assert_eq!(
            (d.first_offset, d.num_entries, d.num_records),
            (first, 9, 9)
        );
        assert_eq!(files[2].delivered, d);
        assert_eq!(spans[0].delivered, spans[0].header);
    }
    assert!(!r.has_more() && !located.has_more());
    // Two delivered chunks in one read.
    let mut r = log.reader(OffsetSpec::First);
    let two = BatchLimits {
        chunks: 2,
        ..limits
    };
    r.read_batch(&mut buf, &mut spans, two, &|_| true)
        .expect("read");
    let joins: Vec<bool> = spans.iter().map(|s| s.joins).collect();
    assert_eq!(joins, [false, true, true, false, true, true]);
    // Data limits past which nothing joins: one stored chunk a delivered one.
    let mut r = log.reader(OffsetSpec::First);
    let alone = BatchLimits {
        chunks: 3,
        merge: Some(MergeLimits {
            data_len: spans[0].header.data_len * 2 - 1,
            ..merge
        }),
        ..limits
    };
    r.read_batch(&mut buf, &mut spans, alone, &|_| true)
        .expect("read");
    let ids: Vec<(u64, bool)> = spans
        .iter()
        .map(|s| (s.header.first_offset, s.joins))
        .collect();
    assert_eq!(ids, [(0, false), (3, false), (6, false)]);
    // A chunk a filter passes over ends the run before it.
    let mut r = log.reader(OffsetSpec::First);
    let seen = std::cell::Cell::new(0);
    let keep = |_: &[u8]| {
        seen.set(seen.get() + 1);
        seen.get() != 2
    };
    r.read_batch(&mut buf, &mut spans, two, &keep)
        .expect("read");
    let ids: Vec<(u64, bool)> = spans
        .iter()
        .map(|s| (s.header.first_offset, s.joins))
        .collect();
    assert_eq!(ids, [(0, false), (6, false)]);
    let _ = std::fs::remove_dir_all(&dir);
}
