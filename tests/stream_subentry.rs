//! Sub-entry batching of the Stream protocol over real TCP with raw frames
//! (the Rust client does not publish sub-entries; the `rstream` suite in
//! `tests/python` does): a batch is stored as one entry of its chunk,
//! confirmed and deduplicated by its one publishing id, delivered as stored
//! to Stream protocol consumers, and split into its records (one offset
//! each) for AMQP 0-9-1 consumers; malformed batches get the protocol's
//! answers and the broker carries on.

mod common;

use std::io::Write;
use std::net::SocketAddr;

use futures::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use tokio::io::AsyncWriteExt;

use common::stream::{self, expect, frame, raw_open, read_frame, request, s16, t};

/// One broker for the whole file: (AMQP, stream) addresses. Stored chunks
/// are delivered as stored (not merged with the ones written right after
/// them): the test reads the layout they were written in.
fn broker() -> (SocketAddr, SocketAddr) {
    stream::shared_broker_with("stream-subentry", |c| c.stream.deliver_merge_ms = 0)
}

/// An AMQP 1.0 message of one data section.
fn amqp10(body: &str) -> Vec<u8> {
    let mut m = vec![0x00, 0x53, 0x75, 0xa0, body.len() as u8];
    m.extend_from_slice(body.as_bytes());
    m
}

/// Records as a sub-entry batch holds them: `size:32, bytes` each.
fn records(bodies: &[&str]) -> Vec<u8> {
    let mut out = Vec::new();
    for b in bodies {
        let m = amqp10(b);
        out.extend_from_slice(&(m.len() as u32).to_be_bytes());
        out.extend_from_slice(&m);
    }
    out
}

fn gzip(b: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(b).expect("gzip");
    e.finish().expect("gzip")
}

/// A simple publish entry.
fn simple(id: u64, body: &str) -> Vec<u8> {
    let m = amqp10(body);
    let mut e = id.to_be_bytes().to_vec();
    e.extend_from_slice(&(m.len() as u32).to_be_bytes());
    e.extend_from_slice(&m);
    e
}

/// A sub-entry publish entry: the entry header as RabbitMQ stores it, and
/// the whole publish entry.
fn sub(id: u64, compression: u8, n: u16, uncompressed: usize, data: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut h = vec![0x80 | compression << 4];
    h.extend_from_slice(&n.to_be_bytes());
    h.extend_from_slice(&(uncompressed as u32).to_be_bytes());
    h.extend_from_slice(&(data.len() as u32).to_be_bytes());
    h.extend_from_slice(data);
    let mut e = id.to_be_bytes().to_vec();
    e.extend_from_slice(&h);
    (h, e)
}

fn publish(publisher: u8, entries: &[&[u8]]) -> Vec<u8> {
    let mut p = vec![publisher];
    p.extend_from_slice(&(entries.len() as u32).to_be_bytes());
    for e in entries {
        p.extend_from_slice(e);
    }
    frame(2, 1, &p)
}

/// The publishing ids of a confirm (key 3) or error (key 4, with codes).
fn ids(f: &[u8]) -> Vec<(u64, u16)> {
    let n = u32::from_be_bytes([f[5], f[6], f[7], f[8]]) as usize;
    let step = if f[1] == 4 { 10 } else { 8 };
    (0..n)
        .map(|i| {
            let at = 9 + i * step;
            let mut id = [0u8; 8];
            id.copy_from_slice(&f[at..at + 8]);
            let code = if step == 10 {
                u16::from_be_bytes([f[at + 8], f[at + 9]])
            } else {
                0
            };
            (u64::from_be_bytes(id), code)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn sub_entries_stored_confirmed_deduplicated_and_read_both_ways() {
    let stream = common::uniq("subentry");
    let mut sock = raw_open(broker().1).await;
    let mut create = s16(&stream);
    create.extend_from_slice(&0i32.to_be_bytes());
    assert_eq!(request(&mut sock, 13, &create).await, 1);
    let mut decl = vec![1u8];
    decl.extend(s16("pub-ref"));
    decl.extend(s16(&stream));
    assert_eq!(request(&mut sock, 1, &decl).await, 1);

    let none = records(&["n0", "n1", "n2"]);
    let gz_raw = records(&["g0", "g1"]);
    let (none_h, none_e) = sub(2, 0, 3, none.len(), &none);
    let (_, gz_e) = sub(3, 1, 2, gz_raw.len(), &gzip(&gz_raw));
    // zstd: passed through as it is; AMQP 0-9-1 readers skip it (RabbitMQ's
    // skip every compressed batch).
    let (zs_h, zs_e) = sub(4, 4, 2, 40, b"not really zstd");
    let s5 = simple(5, "last");
    sock.write_all(&publish(
        1,
        &[&simple(1, "first"), &none_e, &gz_e, &zs_e, &s5],
    ))
    .await
    .expect("write");
    let mut confirmed = Vec::new();
    while confirmed.len() < 5 {
        confirmed.extend(ids(&expect(&mut sock, 3).await));
    }
    assert_eq!(
        confirmed.iter().map(|x| x.0).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    // The batch's one publishing id deduplicates it whole: confirmed, not
    // stored again.
    sock.write_all(&publish(1, &[&gz_e])).await.expect("write");
    assert_eq!(ids(&expect(&mut sock, 3).await), vec![(3, 0)]);
    // A batch RabbitMQ would not store (compression 5) is refused with the
    // rest of its frame; what came before it in the frame is stored.
    let (_, bad) = sub(7, 5, 1, 40, b"0123456789");
    sock.write_all(&publish(1, &[&simple(6, "six"), &bad, &simple(8, "eight")]))
        .await
        .expect("write");
    let (mut errors, mut confirms) = (Vec::new(), Vec::new());
    while errors.is_empty() || confirms.is_empty() {
        let f = read_frame(&mut sock).await.expect("a frame");
        match f[1] {
            3 => confirms.extend(ids(&f)),
            4 => errors.extend(ids(&f)),
            _ => {}
        }
    }
    assert_eq!((errors, confirms), (vec![(7, 17), (8, 17)], vec![(6, 0)]));
    // Zero records, sizes that cannot hold them: refused the same way.
    for (_, e) in [
        sub(9, 1, 0, 40, b"x"),
        sub(9, 1, 100, 10, b"x"),
        sub(9, 0, 2, none.len(), &none),
    ] {
        sock.write_all(&publish(1, &[&e])).await.expect("write");
        assert_eq!(ids(&expect(&mut sock, 4).await), vec![(9, 17)]);
    }
    let mut q = 5u32.to_be_bytes().to_vec();
    q.extend(s16("pub-ref"));
    q.extend(s16(&stream));
    sock.write_all(&frame(5, 1, &q)).await.expect("write");
    let f = expect(&mut sock, 0x8005).await;
    assert_eq!(&f[10..18], &6u64.to_be_bytes(), "last stored id");

    // A Stream protocol consumer gets the chunks as stored: the first holds
    // 5 entries and 1 + 3 + 2 + 2 + 1 records, the batches verbatim.
    let mut subscribe = vec![3u8];
    subscribe.extend(s16(&stream));
    subscribe.extend_from_slice(&1u16.to_be_bytes());
    subscribe.extend_from_slice(&10u16.to_be_bytes());
    assert_eq!(request(&mut sock, 7, &subscribe).await, 1);
    let d = expect(&mut sock, 8).await;
    assert_eq!(d[4], 3, "subscription id");
    let chunk = &d[5..];
    assert_eq!(chunk[0], 0x50);
    assert_eq!(u16::from_be_bytes([chunk[2], chunk[3]]), 5, "entries");
    assert_eq!(
        u32::from_be_bytes([chunk[4], chunk[5], chunk[6], chunk[7]]),
        9,
        "records"
    );
    let data = &chunk[48..];
    let has = |needle: &[u8]| data.windows(needle.len()).any(|w| w == needle);
    assert!(has(&none_h) && has(&zs_h));
    let d2 = expect(&mut sock, 8).await;
    let c2 = &d2[5..];
    let mut first = [0u8; 8];
    first.copy_from_slice(&c2[24..32]);
    assert_eq!(
        u64::from_be_bytes(first),
        9,
        "the next chunk's first offset"
    );

    // An AMQP 0-9-1 consumer gets each record at its own offset: the zstd
    // batch (offsets 6 and 7) is skipped.
    let (amqp, _) = broker();
    let conn = t(lapin::Connection::connect(
        &format!("amqp://guest:guest@{amqp}/%2f"),
        lapin::ConnectionProperties::default(),
    ))
    .await
    .expect("amqp connection");
    let ch = t(conn.create_channel()).await.expect("channel");
    t(ch.basic_qos(100, BasicQosOptions::default()))
        .await
        .expect("qos");
    let mut args = FieldTable::default();
    args.insert(
        ShortString::from("x-stream-offset"),
        AMQPValue::LongString("first".into()),
    );
    let mut c = t(ch.basic_consume(&stream, "c", BasicConsumeOptions::default(), args))
        .await
        .expect("consume");
    let mut got = Vec::new();
    while got.len() < 8 {
        let d = t(c.next()).await.expect("delivery").expect("ok delivery");
        let headers = d.properties.headers().as_ref().expect("headers");
        let Some(AMQPValue::LongLongInt(o)) = headers.inner().get("x-stream-offset") else {
            panic!("x-stream-offset header");
        };
        got.push((*o, String::from_utf8_lossy(&d.data).into_owned()));
        t(d.ack(BasicAckOptions::default())).await.expect("ack");
    }
    let want: Vec<(i64, String)> = [
        (0, "first"),
        (1, "n0"),
        (2, "n1"),
        (3, "n2"),
        (4, "g0"),
        (5, "g1"),
        (8, "last"),
        (9, "six"),
    ]
    .into_iter()
    .map(|(o, b)| (o, b.to_string()))
    .collect();
    assert_eq!(got, want);
    let _ = conn.close(200, "bye").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_sub_entries_close_with_unknown_frame_and_the_broker_carries_on() {
    // Lengths that run past the frame: the frame is malformed (13).
    let bodies: Vec<Vec<u8>> = vec![
        // data length past the end
        sub(1, 0, 1, 9, b"abc").1[..8 + 11 + 2].to_vec(),
        // the header cut short
        sub(1, 0, 1, 9, b"abc").1[..8 + 5].to_vec(),
        // a length claiming more than the frame holds
        {
            let mut e = 1u64.to_be_bytes().to_vec();
            e.extend_from_slice(&[0x80, 0, 1, 0, 0, 0, 9, 0xff, 0xff, 0xff, 0xff, 1, 2]);
            e
        },
    ];
    for body in bodies {
        let mut sock = raw_open(broker().1).await;
        sock.write_all(&publish(1, &[&body])).await.expect("write");
        let f = expect(&mut sock, 22).await;
        assert_eq!(u16::from_be_bytes([f[8], f[9]]), 13);
    }
    // A sub-entry in publish v2 (filtering) is not one RabbitMQ reads either.
    let mut sock = raw_open(broker().1).await;
    let mut p = vec![1u8];
    p.extend_from_slice(&1u32.to_be_bytes());
    p.extend_from_slice(&1u64.to_be_bytes());
    p.extend_from_slice(&(-1i16).to_be_bytes());
    p.extend_from_slice(&sub(1, 0, 1, 9, b"abc").0);
    sock.write_all(&frame(2, 2, &p)).await.expect("write");
    let f = expect(&mut sock, 22).await;
    assert_eq!(u16::from_be_bytes([f[8], f[9]]), 13);
    // Still serving.
    let mut sock = raw_open(broker().1).await;
    let mut meta = 1u32.to_be_bytes().to_vec();
    meta.extend(s16("nope"));
    let mut m = 9u32.to_be_bytes().to_vec();
    m.extend_from_slice(&meta);
    sock.write_all(&frame(15, 1, &m)).await.expect("write");
    expect(&mut sock, 0x800f).await;
}
