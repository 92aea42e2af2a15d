//! The connection state machine under arbitrary input, in-process: a
//! `warren::session::Session` is fed bytes, virtual time, alarms, back-pressure
//! and store results, with a broker-less handler answering its events (login
//! and vhost accepted for guest and `/`, publishes confirmed, flushes succeed or
//! fail as the input says). No sockets, no broker, no clock.
//!
//! Input: byte 0 bit 0 runs a valid handshake and opens channel 1 first (so most
//! inputs reach the running state). Then ops, each picked by `byte % 5`:
//! 0 raw bytes (`len` then bytes), 1 a well-framed frame (`kind % 4`,
//! `channel % 4`, `len`, payload), 2 advance time by `byte * 50` ms and fire
//! timers, 3 toggle the memory alarm / back-pressure, 4 answer the store waits.
//!
//! Checks: no panic anywhere; everything the session transmits decodes as valid
//! frames (after our protocol header when the client's was wrong); once closed,
//! the session asks for no timer.
#![no_main]

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use std::time::{Duration, Instant};
use tokio_util::codec::Decoder;
use warren::session::{Config, Event, Outcome, Session, StoreWait};
use warren::wire::{self, FieldTable, FieldValue, FrameCodec, Method, PROTOCOL_HEADER};

type S = Session<u8>;

fn config() -> Config {
    Config {
        frame_max: 8192,
        channel_max: 4,
        heartbeat: 5,
        handshake_timeout: Duration::from_secs(10),
        max_message_size: 4096,
        cluster_name: "fuzz".into(),
    }
}

fn method(buf: &mut Vec<u8>, channel: u16, m: impl Into<Method>) {
    let mut b = BytesMut::new();
    wire::write_method(&mut b, channel, &m.into());
    buf.extend_from_slice(&b);
}

fn handshake() -> Vec<u8> {
    let mut caps = FieldTable::new();
    caps.insert("connection.blocked", FieldValue::Bool(true));
    caps.insert("authentication_failure_close", FieldValue::Bool(true));
    let mut props = FieldTable::new();
    props.insert("capabilities", FieldValue::Table(caps));
    let mut b = PROTOCOL_HEADER.to_vec();
    method(
        &mut b,
        0,
        wire::ConnectionStartOk {
            client_properties: props,
            mechanism: "PLAIN".into(),
            response: Bytes::from_static(b"\0guest\0guest"),
            locale: "en_US".into(),
        },
    );
    method(
        &mut b,
        0,
        wire::ConnectionTuneOk {
            channel_max: 4,
            frame_max: 8192,
            heartbeat: 5,
        },
    );
    method(
        &mut b,
        0,
        wire::ConnectionOpen {
            virtual_host: "/".into(),
            ..Default::default()
        },
    );
    method(&mut b, 1, wire::ChannelOpen::default());
    b
}

/// A broker-less stand-in for the server's event handling.
fn answer(s: &mut S, now: Instant) {
    while let Some(event) = s.poll_event(now) {
        match event {
            Event::Login { user, .. } => {
                if user == "guest" {
                    s.accept_login();
                } else {
                    let e = s.login_refused();
                    s.refuse_login(e, now);
                }
            }
            Event::Open { vhost } => {
                if vhost == "/" {
                    s.accept_open(now);
                } else {
                    s.refuse_open(warren::error::AmqpError::not_allowed("no vhost"), now);
                }
            }
            Event::Method { channel, method } => {
                let Some((data, mut io)) = s.channel(channel) else {
                    continue;
                };
                *data = data.wrapping_add(1);
                match method {
                    Method::ConfirmSelect(_) => {
                        io.confirms.enable();
                        io.method(&wire::ConfirmSelectOk::default().into());
                    }
                    Method::TxCommit(_) => io.await_tx_flush(),
                    Method::QueueDelete(_) => s.channel_error(
                        channel,
                        warren::error::AmqpError::not_found("no queue").at(50, 40),
                        now,
                    ),
                    _ => {}
                }
            }
            Event::Publish { channel, message } => {
                if let Some((_, mut io)) = s.channel(channel) {
                    let outcome = match message.body.first().map(|b| b % 3) {
                        Some(0) => Outcome::Rejected,
                        Some(1) => Outcome::Accepted { durable: true },
                        _ => Outcome::Accepted { durable: false },
                    };
                    io.published(outcome);
                }
            }
            _ => {}
        }
    }
}

/// Everything transmitted must decode as frames.
fn check_output(s: &mut S, now: Instant, out: &mut BytesMut, codec: &mut FrameCodec) {
    while let Some(chunk) = s.poll_transmit(now) {
        out.extend_from_slice(&chunk);
    }
    while let Some(_frame) = codec
        .decode(out)
        .unwrap_or_else(|e| panic!("the session sent an undecodable frame: {e}"))
    {}
}

fuzz_target!(|data: &[u8]| {
    let t0 = Instant::now();
    let mut now = t0;
    let mut s = S::new(config(), now);
    let mut out = BytesMut::new();
    let mut codec = FrameCodec::new(0);
    let mut header_checked = false;
    let mut alarm = false;
    let mut backpressure = false;
    let mut waits: Vec<StoreWait> = Vec::new();
    let (first, mut rest) = match data.split_first() {
        Some((f, r)) => (*f, r),
        None => return,
    };
    if first & 1 == 1 {
        s.handle_input(&handshake(), now);
    }
    let mut step = |s: &mut S, now: Instant, out: &mut BytesMut, waits: &mut Vec<StoreWait>| {
        answer(s, now);
        while let Some(chunk) = s.poll_transmit(now) {
            out.extend_from_slice(&chunk);
        }
        if !header_checked && out.len() >= 8 {
            // A wrong client header is answered with ours.
            if &out[..8] == PROTOCOL_HEADER {
                let _ = out.split_to(8);
            }
            header_checked = true;
        }
        if header_checked {
            check_output(s, now, out, &mut codec);
        }
        while let Some(w) = s.poll_store_wait() {
            waits.push(w);
        }
    };
    while let Some((&op, tail)) = rest.split_first() {
        rest = tail;
        match op % 5 {
            0 => {
                let n = rest
                    .first()
                    .map_or(0, |&n| usize::from(n))
                    .min(rest.len().saturating_sub(1));
                if !rest.is_empty() {
                    s.handle_input(&rest[1..1 + n], now);
                    rest = &rest[1 + n..];
                }
            }
            1 => {
                if rest.len() < 3 {
                    break;
                }
                let (kind, channel, len) =
                    (rest[0] % 4, u16::from(rest[1] % 4), usize::from(rest[2]));
                let payload_end = (3 + len).min(rest.len());
                let payload = &rest[3..payload_end];
                rest = &rest[payload_end..];
                let kind = [1u8, 2, 3, 8][usize::from(kind)];
                let payload: &[u8] = if kind == 8 { &[] } else { payload };
                let mut f = vec![kind];
                f.extend_from_slice(&channel.to_be_bytes());
                f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
                f.extend_from_slice(payload);
                f.push(0xce);
                s.handle_input(&f, now);
            }
            2 => {
                let by = rest.first().copied().unwrap_or(1);
                rest = rest.get(1..).unwrap_or(&[]);
                now += Duration::from_millis(u64::from(by) * 50);
                s.handle_timeout(now);
            }
            3 => {
                let which = rest.first().copied().unwrap_or(0);
                rest = rest.get(1..).unwrap_or(&[]);
                if which & 1 == 0 {
                    alarm = !alarm;
                    s.set_alarm(alarm.then_some("low on memory"), now);
                } else {
                    backpressure = !backpressure;
                    s.set_backpressure(backpressure, now);
                }
            }
            _ => {
                let ok = rest.first().is_none_or(|b| b & 1 == 0);
                rest = rest.get(1..).unwrap_or(&[]);
                for w in waits.drain(..) {
                    match w {
                        StoreWait::Confirms {
                            channel,
                            first,
                            last,
                        } => s.durable_done(channel, first, last, ok, now),
                        StoreWait::TxCommit { channel } => s.tx_flushed(channel, ok, now),
                    }
                }
            }
        }
        step(&mut s, now, &mut out, &mut waits);
        if s.is_closed() {
            assert_eq!(s.poll_timeout(), None);
        }
    }
    step(&mut s, now, &mut out, &mut waits);
    s.handle_eof();
    answer(&mut s, now);
    assert!(s.is_closed());
});
