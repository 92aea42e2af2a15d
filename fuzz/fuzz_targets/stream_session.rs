//! The Stream protocol session under arbitrary input, in-process: a
//! `warren::session::stream::StreamSession` on a real broker (one per fuzzing
//! process, its data directory under the temp dir), fed bytes and virtual
//! time, its chunk reads run as the driver runs them. No sockets, no clock.
//!
//! Input: byte 0 bit 0 logs in as guest and opens `/` first (so most inputs
//! reach the running state); bit 1 makes the session a clustered node's,
//! whose creates and deletes hold their response until the change is
//! committed: after each op a held change is reported committed, or not
//! (the op byte's top bit), and the rest of the input fed again. Then ops,
//! each picked by `byte % 4`:
//! 0 raw bytes (`len` then bytes), 1 a frame (`len` then that many bytes, the
//! size prefix added: key, version and fields), 2 advance time by
//! `byte * 50` ms and fire the timer, 3 wake the subscriptions and run the
//! reads the session asks for. At the end the connection's end is handled
//! and every stream and exchange the input made is deleted, so the data
//! directory stays small.
//!
//! Checks: no panic anywhere; everything the session sends is whole
//! size-prefixed frames of at least a key and a version.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, OnceLock};
use warren::broker::Broker;
use warren::session::stream::{StreamSession, StreamSettings};
use warren::wire::stream::Request;

fn broker() -> Arc<Broker> {
    static BROKER: OnceLock<Arc<Broker>> = OnceLock::new();
    Arc::clone(BROKER.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("warren-fuzz-stream-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Broker::open(&warren::Config::for_tests(dir), 0).expect("broker")
    }))
}

fn login() -> BytesMut {
    let mut b = BytesMut::new();
    for r in [
        Request::PeerProperties {
            correlation_id: 1,
            properties: vec![],
        },
        Request::SaslHandshake { correlation_id: 2 },
        Request::SaslAuthenticate {
            correlation_id: 3,
            mechanism: "PLAIN".into(),
            data: Some(Bytes::from_static(b"\0guest\0guest")),
        },
        Request::Tune {
            frame_max: 65536,
            heartbeat: 5,
        },
        Request::Open {
            correlation_id: 4,
            vhost: "/".into(),
        },
    ] {
        r.encode(&mut b);
    }
    b
}

/// Everything the session has to send, checked to be whole frames.
fn drain(s: &mut StreamSession, now: u64, sent: &mut Vec<u8>) {
    while let Some(out) = s.poll_output(now) {
        sent.extend_from_slice(&out.into_bytes().expect("a committed file range reads"));
    }
    let mut rest = &sent[..];
    while rest.len() >= 4 {
        let size = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if rest.len() < 4 + size {
            break;
        }
        assert!(size >= 4, "a frame without key and version: {size} bytes");
        rest = &rest[4 + size..];
    }
    let used = sent.len() - rest.len();
    sent.drain(..used);
}

/// Remove what the input made: streams (their directories), and exchanges
/// (super streams).
fn clean(broker: &Broker, now: u64) {
    let Some(vhost) = broker.vhost("/") else {
        return;
    };
    for q in vhost.queues() {
        let _ = vhost.delete_queue(q.name(), false, false, 0, now);
    }
    for x in vhost.exchanges() {
        if !x.name.is_empty() && !x.name.starts_with("amq.") {
            let _ = vhost.delete_exchange(&x.name, false);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, mut ops)) = data.split_first() else {
        return;
    };
    let broker = broker();
    let mut now = 1_000u64;
    let (sac_tx, _sac_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut s = StreamSession::new(
        Arc::clone(&broker),
        StreamSettings {
            frame_max: 65536,
            heartbeat: 5,
            advertised_host: "localhost".into(),
            advertised_port: 5552,
            handshake_timeout_ms: 10_000,
            sac: Arc::default(),
            anonymous: None,
            clustered: first & 2 == 2,
            // Deliveries merged from stored chunks, or each as stored.
            deliver_merge_ms: if first & 4 == 4 { 10 } else { 0 },
        },
        1,
        true,
        sac_tx,
        now,
    );
    let mut sent = Vec::new();
    let mut input = BytesMut::new();
    if first & 1 == 1 {
        input = login();
        s.handle_input(&mut input, now);
        drain(&mut s, now, &mut sent);
    }
    while let Some((&op, rest)) = ops.split_first() {
        ops = rest;
        match op % 4 {
            0 | 1 => {
                let Some((&len, rest)) = ops.split_first() else {
                    break;
                };
                let n = usize::from(len).min(rest.len());
                if op % 4 == 1 {
                    input.extend_from_slice(&(n as u32).to_be_bytes());
                }
                input.extend_from_slice(&rest[..n]);
                ops = &rest[n..];
                s.handle_input(&mut input, now);
            }
            2 => {
                let Some((&t, rest)) = ops.split_first() else {
                    break;
                };
                ops = rest;
                now += u64::from(t) * 50;
                if s.poll_timeout().is_some_and(|at| at <= now) {
                    s.handle_timeout(now);
                }
            }
            _ => {
                s.handle_committed(now);
                for _ in 0..16 {
                    let Some(job) = s.poll_read() else {
                        break;
                    };
                    s.handle_read(job.run());
                }
            }
        }
        // Clustered: the metadata group's answer to a held change.
        for _ in 0..64 {
            if s.held_change().is_none() {
                break;
            }
            s.change_committed(op & 0x80 == 0);
            s.handle_input(&mut input, now);
        }
        drain(&mut s, now, &mut sent);
        if s.is_closed() {
            break;
        }
    }
    s.handle_eof();
    drain(&mut s, now, &mut sent);
    drop(s);
    clean(&broker, now);
});
