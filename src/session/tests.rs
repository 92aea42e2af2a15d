//! The session on raw bytes and virtual time: every `now` is a fixed start plus
//! a chosen offset, and every assertion is on exact frames and exact moments.

use super::*;
use crate::error::AmqpError;
use crate::wire::*;
use bytes::{Bytes, BytesMut};
use std::time::{Duration, Instant};
use tokio_util::codec::Decoder;

type S = Session<u32>;

fn config() -> Config {
    Config {
        frame_max: 131_072,
        channel_max: 16,
        heartbeat: 10,
        handshake_timeout: Duration::from_secs(10),
        max_message_size: 1000,
        cluster_name: "c1".into(),
    }
}

fn ms(t0: Instant, ms: u64) -> Instant {
    t0 + Duration::from_millis(ms)
}

fn method(channel: u16, m: impl Into<Method>) -> Vec<u8> {
    let mut b = BytesMut::new();
    write_method(&mut b, channel, &m.into());
    b.to_vec()
}

fn frame(f: Frame) -> Vec<u8> {
    let mut b = BytesMut::new();
    f.encode(&mut b);
    b.to_vec()
}

fn header(channel: u16, body_size: u64) -> Vec<u8> {
    frame(Frame::Header {
        channel,
        class_id: 60,
        body_size,
        properties: BasicProperties::default(),
    })
}

fn body(channel: u16, payload: &'static [u8]) -> Vec<u8> {
    frame(Frame::Body {
        channel,
        payload: Bytes::from_static(payload),
    })
}

fn publish(channel: u16) -> Vec<u8> {
    method(
        channel,
        BasicPublish {
            routing_key: "q".into(),
            ..Default::default()
        },
    )
}

/// Everything the session wants to send, as bytes.
fn sent(s: &mut S, now: Instant) -> Vec<u8> {
    let mut all = Vec::new();
    while let Some(b) = s.poll_transmit(now) {
        all.extend_from_slice(&b);
    }
    all
}

/// Everything the session wants to send, as frames.
fn sent_frames(s: &mut S, now: Instant) -> Vec<Frame> {
    let mut buf = BytesMut::from(&sent(s, now)[..]);
    let mut codec = FrameCodec::new(0);
    let mut frames = Vec::new();
    while let Some(f) = codec
        .decode(&mut buf)
        .expect("the session sends valid frames")
    {
        frames.push(f);
    }
    assert!(buf.is_empty(), "trailing bytes: {buf:?}");
    frames
}

fn events(s: &mut S, now: Instant) -> Vec<Event<u32>> {
    std::iter::from_fn(|| s.poll_event(now)).collect()
}

fn start_ok(caps: &[&str], mechanism: &str, response: &[u8]) -> Vec<u8> {
    let mut c = FieldTable::new();
    for cap in caps {
        c.insert(*cap, FieldValue::Bool(true));
    }
    let mut props = FieldTable::new();
    props.insert("capabilities", FieldValue::Table(c));
    method(
        0,
        ConnectionStartOk {
            client_properties: props,
            mechanism: mechanism.into(),
            response: Bytes::copy_from_slice(response),
            locale: "en_US".into(),
        },
    )
}

fn tune_ok(channel_max: u16, frame_max: u32, heartbeat: u16) -> Vec<u8> {
    method(
        0,
        ConnectionTuneOk {
            channel_max,
            frame_max,
            heartbeat,
        },
    )
}

/// The connection.close the session sent last: (code, class, method).
fn close_of(frames: &[Frame]) -> (u16, u16, u16) {
    match frames.last() {
        Some(Frame::Method {
            channel: 0,
            method: Method::ConnectionClose(c),
        }) => (c.reply_code, c.class_id, c.method_id),
        other => panic!("expected connection.close, got {other:?}"),
    }
}

fn channel_close_of(frames: &[Frame], channel: u16) -> (u16, u16, u16) {
    match frames.last() {
        Some(Frame::Method {
            channel: c,
            method: Method::ChannelClose(m),
        }) if *c == channel => (m.reply_code, m.class_id, m.method_id),
        other => panic!("expected channel.close, got {other:?}"),
    }
}

/// A session through the handshake at t0 with `caps` and tune-ok `heartbeat`.
fn running(t0: Instant, caps: &[&str], heartbeat: u16) -> S {
    let mut s = S::new(config(), t0);
    s.handle_input(PROTOCOL_HEADER, t0);
    s.handle_input(&start_ok(caps, "PLAIN", b"\0guest\0guest"), t0);
    assert!(matches!(events(&mut s, t0)[..], [Event::Login { .. }]));
    s.accept_login();
    s.handle_input(&tune_ok(16, 131_072, heartbeat), t0);
    s.handle_input(
        &method(
            0,
            ConnectionOpen {
                virtual_host: "/".into(),
                ..Default::default()
            },
        ),
        t0,
    );
    assert!(matches!(events(&mut s, t0)[..], [Event::Open { .. }]));
    s.accept_open(t0);
    sent(&mut s, t0);
    assert!(s.is_running());
    s
}

fn open_channel(s: &mut S, channel: u16, now: Instant) {
    s.handle_input(&method(channel, ChannelOpen::default()), now);
    assert!(matches!(
        events(s, now)[..],
        [Event::ChannelOpened { channel: c }] if c == channel
    ));
    assert_eq!(
        sent_frames(s, now),
        vec![Frame::Method {
            channel,
            method: ChannelOpenOk::default().into()
        }]
    );
}

fn is_closed_event(e: &Event<u32>) -> bool {
    matches!(e, Event::Closed { .. })
}

#[test]
fn handshake_on_raw_bytes() {
    let t0 = Instant::now();
    let mut s = S::new(config(), t0);
    // Nothing before the whole header.
    s.handle_input(&PROTOCOL_HEADER[..5], t0);
    assert!(events(&mut s, t0).is_empty());
    assert!(sent(&mut s, t0).is_empty());
    s.handle_input(&PROTOCOL_HEADER[5..], t0);
    assert!(events(&mut s, t0).is_empty());
    assert_eq!(sent(&mut s, t0), method(0, handshake::start("c1")));

    s.handle_input(&start_ok(&[], "PLAIN", b"\0guest\0secret"), t0);
    match &events(&mut s, t0)[..] {
        [Event::Login {
            mechanism,
            user,
            password,
        }] => assert_eq!(
            (&mechanism[..], &user[..], &password[..]),
            ("PLAIN", "guest", "secret")
        ),
        other => panic!("{other:?}"),
    }
    // Nothing more until the caller answers.
    assert!(sent(&mut s, t0).is_empty());
    s.accept_login();
    assert_eq!(
        sent(&mut s, t0),
        method(
            0,
            ConnectionTune {
                channel_max: 16,
                frame_max: 131_072,
                heartbeat: 10
            }
        )
    );
    s.handle_input(&tune_ok(0, 0, 0), t0);
    assert!(events(&mut s, t0).is_empty());
    // channel_max 0 and frame_max 0 take the server's.
    assert_eq!((s.channel_max(), s.frame_max()), (16, 131_072));
    s.handle_input(
        &method(
            0,
            ConnectionOpen {
                virtual_host: "/v".into(),
                ..Default::default()
            },
        ),
        t0,
    );
    match &events(&mut s, t0)[..] {
        [Event::Open { vhost }] => assert_eq!(vhost, "/v"),
        other => panic!("{other:?}"),
    }
    s.accept_open(ms(t0, 1));
    assert_eq!(sent(&mut s, t0), method(0, ConnectionOpenOk::default()));
    assert!(s.is_running());
    // Heartbeats off: no timer once open.
    assert_eq!(s.poll_timeout(), None);
}

#[test]
fn amqplain_credentials() {
    let mut t = FieldTable::new();
    t.insert("LOGIN", FieldValue::string("bob"));
    t.insert("PASSWORD", FieldValue::string("pw"));
    let mut b = BytesMut::new();
    encode_field_table(&t, &mut b);
    // The response is the table's entries, without its length.
    assert_eq!(
        handshake::credentials("AMQPLAIN", &b[4..]),
        Some(("bob".to_string(), "pw".to_string()))
    );
    assert_eq!(handshake::credentials("PLAIN", b"nonul"), None);
    assert_eq!(handshake::credentials("EXTERNAL", b"\0a\0b"), None);
}

#[test]
fn wrong_protocol_header_gets_ours_and_close() {
    let t0 = Instant::now();
    let mut s = S::new(config(), t0);
    s.handle_input(b"AMQP\x00\x00\x08\x00", t0);
    let ev = events(&mut s, t0);
    assert!(matches!(&ev[..], [Event::Closed { drain: false, .. }]));
    assert_eq!(sent(&mut s, t0), PROTOCOL_HEADER.to_vec());
    assert!(s.is_closed());
    assert_eq!(s.poll_timeout(), None);
}

#[test]
fn handshake_timeout_at_the_exact_moment() {
    let t0 = Instant::now();
    let mut s = S::new(config(), t0);
    s.handle_input(PROTOCOL_HEADER, ms(t0, 100));
    events(&mut s, t0);
    sent(&mut s, t0);
    assert_eq!(s.poll_timeout(), Some(ms(t0, 10_000)));
    s.handle_timeout(ms(t0, 9_999));
    assert!(events(&mut s, ms(t0, 9_999)).is_empty());
    s.handle_timeout(ms(t0, 10_000));
    let ev = events(&mut s, ms(t0, 10_000));
    assert!(matches!(&ev[..], [Event::Closed { reason: Some(r), .. }] if r == "handshake timeout"));
    // Nothing is sent on a handshake timeout.
    assert!(sent(&mut s, t0).is_empty());
}

#[test]
fn tune_ok_frame_max_rules() {
    let t0 = Instant::now();
    for (frame_max, ok) in [
        (4095, false),
        (4096, true),
        (131_072, true),
        (131_073, false),
    ] {
        let mut s = S::new(config(), t0);
        s.handle_input(PROTOCOL_HEADER, t0);
        s.handle_input(&start_ok(&[], "PLAIN", b"\0guest\0guest"), t0);
        events(&mut s, t0);
        s.accept_login();
        sent(&mut s, t0);
        s.handle_input(&tune_ok(100, frame_max, 0), t0);
        assert!(events(&mut s, t0).is_empty());
        if ok {
            assert_eq!(s.frame_max(), frame_max);
            // channel_max is capped at the server's.
            assert_eq!(s.channel_max(), 16);
            assert!(sent(&mut s, t0).is_empty());
        } else {
            assert_eq!(close_of(&sent_frames(&mut s, t0)), (530, 10, 31));
        }
    }
}

#[test]
fn wrong_method_in_handshake_is_503_at_the_expected_one() {
    let t0 = Instant::now();
    let mut s = S::new(config(), t0);
    s.handle_input(PROTOCOL_HEADER, t0);
    s.handle_input(&tune_ok(0, 0, 0), t0);
    assert!(events(&mut s, t0).is_empty());
    let frames = sent_frames(&mut s, t0);
    assert_eq!(close_of(&frames), (503, 10, 11));
    // Then it waits for close-ok, for 3 s at most.
    assert_eq!(s.poll_timeout(), Some(ms(t0, 3_000)));
    s.handle_input(&method(0, ConnectionCloseOk::default()), ms(t0, 5));
    assert!(events(&mut s, t0).iter().any(is_closed_event));
}

#[test]
fn heartbeat_sent_when_idle_and_peer_lost_after_two_intervals() {
    let t0 = Instant::now();
    let mut s = running(t0, &[], 10);
    // Half an interval of silence from us: a heartbeat goes out.
    assert_eq!(s.poll_timeout(), Some(ms(t0, 5_000)));
    s.handle_timeout(ms(t0, 4_999));
    assert!(sent(&mut s, ms(t0, 4_999)).is_empty());
    s.handle_timeout(ms(t0, 5_000));
    assert_eq!(sent(&mut s, ms(t0, 5_000)), vec![8, 0, 0, 0, 0, 0, 0, 0xce]);
    // Sending does not keep the peer alive: it is dead 20 s after its last byte.
    for at in [10_000, 15_000] {
        s.handle_timeout(ms(t0, at));
        sent(&mut s, ms(t0, at));
    }
    s.handle_timeout(ms(t0, 19_999));
    assert!(events(&mut s, ms(t0, 19_999)).is_empty());
    s.handle_timeout(ms(t0, 20_000));
    let ev = events(&mut s, ms(t0, 20_000));
    assert!(matches!(
        &ev[..],
        [Event::Closed {
            reason: Some(_),
            ..
        }]
    ));
    assert!(s.is_closed());
}

#[test]
fn input_resets_the_peer_timer_and_time_not_reading_is_not_counted() {
    let t0 = Instant::now();
    let mut s = running(t0, &[], 10);
    s.handle_input(&frame(Frame::Heartbeat { channel: 0 }), ms(t0, 7_000));
    s.handle_timeout(ms(t0, 26_999));
    assert!(events(&mut s, t0).is_empty());
    // Back-pressure from 8 s to 60 s: the peer is not held to account.
    s.set_backpressure(true, ms(t0, 8_000));
    s.handle_timeout(ms(t0, 60_000));
    assert!(events(&mut s, t0).is_empty());
    s.set_backpressure(false, ms(t0, 60_000));
    s.handle_timeout(ms(t0, 79_999));
    assert!(events(&mut s, t0).is_empty());
    s.handle_timeout(ms(t0, 80_000));
    assert!(events(&mut s, t0).iter().any(is_closed_event));
}

#[test]
fn hard_error_codes() {
    let t0 = Instant::now();
    type Case = (&'static str, fn(&mut S, Instant), (u16, u16, u16));
    let cases: Vec<Case> = vec![
        (
            "bad frame end",
            |s, t| s.handle_input(&[1, 0, 1, 0, 0, 0, 0, 0], t),
            (501, 0, 0),
        ),
        (
            "heartbeat on a channel",
            |s, t| s.handle_input(&frame(Frame::Heartbeat { channel: 1 }), t),
            (501, 0, 0),
        ),
        (
            "body longer than its header",
            |s, t| {
                open_channel(s, 1, t);
                s.handle_input(&publish(1), t);
                s.handle_input(&header(1, 2), t);
                s.handle_input(&body(1, b"abc"), t);
            },
            (501, 0, 0),
        ),
        (
            "truncated arguments",
            // basic.qos (60.10) with 2 of its 7 argument bytes.
            |s, t| s.handle_input(&[1, 0, 1, 0, 0, 0, 6, 0, 60, 0, 10, 0, 0, 0xce], t),
            (502, 60, 10),
        ),
        (
            "connection class on a channel",
            |s, t| s.handle_input(&method(1, ConnectionOpen::default()), t),
            (503, 10, 40),
        ),
        (
            "channel method on channel 0",
            |s, t| s.handle_input(&method(0, ChannelOpen::default()), t),
            (503, 20, 10),
        ),
        (
            "unknown method",
            |s, t| s.handle_input(&[1, 0, 1, 0, 0, 0, 4, 0, 60, 0, 99, 0xce], t),
            (503, 60, 99),
        ),
        (
            "method on a channel never opened",
            |s, t| s.handle_input(&method(3, BasicQos::default()), t),
            (504, 60, 10),
        ),
        (
            "second channel.open",
            |s, t| {
                open_channel(s, 1, t);
                s.handle_input(&method(1, ChannelOpen::default()), t);
            },
            (504, 20, 10),
        ),
        (
            "content header without publish",
            |s, t| {
                open_channel(s, 1, t);
                s.handle_input(&header(1, 1), t);
            },
            (505, 0, 0),
        ),
        (
            "method while content is expected",
            |s, t| {
                open_channel(s, 1, t);
                s.handle_input(&publish(1), t);
                s.handle_input(&method(1, BasicQos::default()), t);
            },
            (505, 60, 10),
        ),
        (
            "content header of another class",
            |s, t| {
                open_channel(s, 1, t);
                s.handle_input(&publish(1), t);
                s.handle_input(
                    &frame(Frame::Header {
                        channel: 1,
                        class_id: 50,
                        body_size: 1,
                        properties: BasicProperties::default(),
                    }),
                    t,
                );
            },
            (505, 0, 0),
        ),
        (
            "channel.flow active=false",
            |s, t| {
                open_channel(s, 1, t);
                s.handle_input(&method(1, ChannelFlow { active: false }), t);
            },
            (540, 20, 20),
        ),
        (
            "failed confirm flush",
            |s, t| {
                open_channel(s, 1, t);
                s.durable_done(1, 1, 1, false, t);
            },
            (541, 0, 0),
        ),
        (
            "failed commit flush",
            |s, t| {
                open_channel(s, 1, t);
                s.tx_flushed(1, false, t);
            },
            (541, 90, 20),
        ),
    ];
    for (name, input, expected) in cases {
        let mut s = running(t0, &[], 0);
        input(&mut s, t0);
        let ev = events(&mut s, t0);
        let frames = sent_frames(&mut s, t0);
        assert_eq!(close_of(&frames), expected, "{name}");
        // No commit-ok or ack went out before the close.
        assert!(
            !frames.iter().any(|f| matches!(
                f,
                Frame::Method {
                    method: Method::TxCommitOk(_) | Method::BasicAck(_),
                    ..
                }
            )),
            "{name}"
        );
        // A decode error ends at once; the others wait for close-ok.
        let garbled = matches!(
            name,
            "bad frame end" | "truncated arguments" | "unknown method"
        );
        assert_eq!(ev.iter().any(is_closed_event), garbled, "{name}");
    }
}

#[test]
fn channel_max_530() {
    let t0 = Instant::now();
    let mut s = S::new(config(), t0);
    s.handle_input(PROTOCOL_HEADER, t0);
    s.handle_input(&start_ok(&[], "PLAIN", b"\0guest\0guest"), t0);
    events(&mut s, t0);
    s.accept_login();
    s.handle_input(&tune_ok(2, 0, 0), t0);
    s.handle_input(&method(0, ConnectionOpen::default()), t0);
    events(&mut s, t0);
    s.accept_open(t0);
    sent(&mut s, t0);
    open_channel(&mut s, 1, t0);
    open_channel(&mut s, 2, t0);
    s.handle_input(&method(2, ChannelClose::default()), t0);
    events(&mut s, t0);
    sent(&mut s, t0);
    open_channel(&mut s, 2, t0);
    s.handle_input(&method(1, ChannelClose::default()), t0);
    events(&mut s, t0);
    sent(&mut s, t0);
    open_channel(&mut s, 1, t0);
    // Two open: a third is one too many, whatever its number.
    s.handle_input(&method(2, ChannelClose::default()), t0);
    events(&mut s, t0);
    sent(&mut s, t0);
    open_channel(&mut s, 2, t0);
    s.handle_input(&method(1, ChannelOpen::default()), t0);
    events(&mut s, t0);
    assert_eq!(close_of(&sent_frames(&mut s, t0)), (504, 20, 10));
    let mut s = running(t0, &[], 0);
    for ch in 1..=16 {
        open_channel(&mut s, ch, t0);
    }
    s.handle_input(&method(17, ChannelOpen::default()), t0);
    events(&mut s, t0);
    assert_eq!(close_of(&sent_frames(&mut s, t0)), (530, 20, 10));
    // A channel's number is not bounded by channel_max (RabbitMQ counts
    // channels only): 65535 opens under channel_max 16.
    let mut s = running(t0, &[], 0);
    open_channel(&mut s, u16::MAX, t0);
}

#[test]
fn login_refused_403() {
    let t0 = Instant::now();
    // Unreadable credentials: 403 at start-ok.
    let mut s = S::new(config(), t0);
    s.handle_input(PROTOCOL_HEADER, t0);
    sent(&mut s, t0);
    s.handle_input(&start_ok(&[], "PLAIN", b"no-nul"), t0);
    assert!(events(&mut s, t0).is_empty());
    assert_eq!(close_of(&sent_frames(&mut s, t0)), (403, 10, 11));

    for (caps, closes) in [
        (&["authentication_failure_close"][..], true),
        (&[][..], false),
    ] {
        let mut s = S::new(config(), t0);
        s.handle_input(PROTOCOL_HEADER, t0);
        events(&mut s, t0);
        sent(&mut s, t0);
        s.handle_input(&start_ok(caps, "PLAIN", b"\0guest\0bad"), t0);
        events(&mut s, t0);
        let e = s.login_refused();
        s.refuse_login(e, t0);
        let ev = events(&mut s, t0);
        if closes {
            assert_eq!(close_of(&sent_frames(&mut s, t0)), (403, 10, 11));
            assert!(ev.is_empty());
        } else {
            // A client that does not understand it is just dropped.
            assert!(sent(&mut s, t0).is_empty());
            assert!(matches!(&ev[..], [Event::Closed { .. }]));
        }
    }
}

#[test]
fn external_only_when_offered() {
    let t0 = Instant::now();
    // Not offered (no verified client certificate): 403 at start-ok.
    let mut s = S::new(config(), t0);
    s.handle_input(PROTOCOL_HEADER, t0);
    assert!(events(&mut s, t0).is_empty());
    assert_eq!(sent(&mut s, t0), method(0, handshake::start("c1")));
    s.handle_input(&start_ok(&[], "EXTERNAL", b""), t0);
    assert!(events(&mut s, t0).is_empty());
    assert_eq!(close_of(&sent_frames(&mut s, t0)), (403, 10, 11));

    // Offered: listed in connection.start, and a start-ok with EXTERNAL asks the
    // caller for the login with no name or password of its own.
    let mut s = S::new(config(), t0);
    s.offer_external();
    s.handle_input(PROTOCOL_HEADER, t0);
    assert!(events(&mut s, t0).is_empty());
    let start = sent_frames(&mut s, t0);
    match &start[..] {
        [Frame::Method {
            method: Method::ConnectionStart(m),
            ..
        }] => assert_eq!(&m.mechanisms[..], b"PLAIN AMQPLAIN EXTERNAL"),
        other => panic!("{other:?}"),
    }
    s.handle_input(&start_ok(&[], "EXTERNAL", b"ignored-authzid"), t0);
    match &events(&mut s, t0)[..] {
        [Event::Login {
            mechanism,
            user,
            password,
        }] => assert_eq!(
            (&mechanism[..], &user[..], &password[..]),
            ("EXTERNAL", "", "")
        ),
        other => panic!("{other:?}"),
    }
    let e = s.login_refused();
    assert!(e.text.contains("mechanism EXTERNAL"), "{}", e.text);
}

#[test]
fn vhost_refused_530_at_connection_open() {
    let t0 = Instant::now();
    let mut s = S::new(config(), t0);
    s.handle_input(PROTOCOL_HEADER, t0);
    s.handle_input(&start_ok(&[], "PLAIN", b"\0guest\0guest"), t0);
    events(&mut s, t0);
    s.accept_login();
    s.handle_input(&tune_ok(0, 0, 0), t0);
    s.handle_input(&method(0, ConnectionOpen::default()), t0);
    events(&mut s, t0);
    sent(&mut s, t0);
    s.refuse_open(AmqpError::not_allowed("vhost x not found"), t0);
    assert_eq!(close_of(&sent_frames(&mut s, t0)), (530, 10, 40));
}

/// Publish one message with `len` body bytes on `channel`; returns the events.
fn publish_one(s: &mut S, channel: u16, payload: &'static [u8], now: Instant) -> Vec<Event<u32>> {
    s.handle_input(&publish(channel), now);
    s.handle_input(&header(channel, payload.len() as u64), now);
    if !payload.is_empty() {
        s.handle_input(&body(channel, payload), now);
    }
    events(s, now)
}

#[test]
fn content_assembly_across_frames() {
    let t0 = Instant::now();
    let mut s = running(t0, &[], 0);
    open_channel(&mut s, 1, t0);
    s.handle_input(&publish(1), t0);
    s.handle_input(&header(1, 5), t0);
    s.handle_input(&body(1, b"ab"), t0);
    assert!(events(&mut s, t0).is_empty());
    s.handle_input(&body(1, b"cde"), t0);
    match &events(&mut s, t0)[..] {
        [Event::Publish {
            channel: 1,
            message,
        }] => {
            assert_eq!(&message.body[..], b"abcde");
            assert_eq!(message.publish.routing_key, "q");
        }
        other => panic!("{other:?}"),
    }
    // An empty body is complete with its header.
    assert!(matches!(
        &publish_one(&mut s, 1, b"", t0)[..],
        [Event::Publish { channel: 1, message }] if message.body.is_empty()
    ));
    // Over max_message_size: 406 closes the channel only.
    s.handle_input(&publish(1), t0);
    s.handle_input(&header(1, 1001), t0);
    assert!(matches!(
        &events(&mut s, t0)[..],
        [Event::Release { channel: 1 }]
    ));
    assert_eq!(channel_close_of(&sent_frames(&mut s, t0), 1), (406, 60, 40));
    // Frames for the closing channel are dropped until close-ok.
    s.handle_input(&body(1, b"x"), t0);
    assert!(events(&mut s, t0).is_empty());
    assert!(sent(&mut s, t0).is_empty());
    s.handle_input(&method(1, ChannelCloseOk::default()), t0);
    assert!(matches!(
        &events(&mut s, t0)[..],
        [Event::ChannelClosed { channel: 1, .. }]
    ));
}

fn ack(tag: u64, multiple: bool) -> Frame {
    Frame::Method {
        channel: 1,
        method: BasicAck {
            delivery_tag: tag,
            multiple,
        }
        .into(),
    }
}

#[test]
fn confirm_batching() {
    let t0 = Instant::now();
    let mut s = running(t0, &[], 0);
    open_channel(&mut s, 1, t0);
    s.channel(1).expect("open").1.confirms.enable();
    // Three immediate confirms in one batch: one multiple ack.
    for _ in 0..3 {
        assert_eq!(publish_one(&mut s, 1, b"m", t0).len(), 1);
        s.channel(1)
            .expect("open")
            .1
            .published(Outcome::Accepted { durable: false });
    }
    assert_eq!(sent_frames(&mut s, t0), vec![ack(3, true)]);
    assert_eq!(s.poll_store_wait(), None);
    // Durable ones wait for the store; an immediate one behind them waits too.
    for durable in [true, true, false] {
        publish_one(&mut s, 1, b"m", t0);
        s.channel(1)
            .expect("open")
            .1
            .published(Outcome::Accepted { durable });
    }
    assert!(sent(&mut s, t0).is_empty());
    assert_eq!(
        s.poll_store_wait(),
        Some(StoreWait::Confirms {
            channel: 1,
            first: 4,
            last: 6
        })
    );
    // While that batch is out, even immediate confirms queue behind it.
    publish_one(&mut s, 1, b"m", t0);
    s.channel(1)
        .expect("open")
        .1
        .published(Outcome::Accepted { durable: false });
    assert!(sent(&mut s, t0).is_empty());
    assert_eq!(
        s.poll_store_wait(),
        Some(StoreWait::Confirms {
            channel: 1,
            first: 7,
            last: 7
        })
    );
    s.durable_done(1, 4, 6, true, t0);
    s.durable_done(1, 7, 7, true, t0);
    assert_eq!(sent_frames(&mut s, t0), vec![ack(6, true), ack(7, false)]);
    // Nothing out now: immediate again; a reject flushes what came before and nacks.
    publish_one(&mut s, 1, b"m", t0);
    s.channel(1)
        .expect("open")
        .1
        .published(Outcome::Accepted { durable: false });
    publish_one(&mut s, 1, b"m", t0);
    s.channel(1).expect("open").1.published(Outcome::Rejected);
    assert_eq!(
        sent_frames(&mut s, t0),
        vec![
            ack(8, false),
            Frame::Method {
                channel: 1,
                method: BasicNack {
                    delivery_tag: 9,
                    multiple: false,
                    requeue: false
                }
                .into()
            }
        ]
    );
}

#[test]
fn blocked_and_unblocked() {
    let t0 = Instant::now();
    let mut s = running(t0, &["connection.blocked"], 0);
    open_channel(&mut s, 1, t0);
    // Not a publisher yet: not blocked.
    s.set_alarm(Some("low on disk"), t0);
    assert!(sent(&mut s, t0).is_empty());
    assert!(!s.reading_paused());
    publish_one(&mut s, 1, b"m", t0);
    assert_eq!(
        sent_frames(&mut s, t0),
        vec![Frame::Method {
            channel: 0,
            method: ConnectionBlocked {
                reason: "low on disk".into()
            }
            .into()
        }]
    );
    assert!(s.reading_paused());
    // Input waits while blocked.
    s.handle_input(&publish(1), t0);
    assert!(events(&mut s, t0).is_empty());
    s.set_alarm(None, t0);
    assert_eq!(
        sent_frames(&mut s, t0),
        vec![Frame::Method {
            channel: 0,
            method: ConnectionUnblocked::default().into()
        }]
    );
    assert!(!s.reading_paused());
    // A client without the capability is paused but told nothing.
    let mut s = running(t0, &[], 0);
    open_channel(&mut s, 1, t0);
    publish_one(&mut s, 1, b"m", t0);
    s.set_alarm(Some("low on memory"), t0);
    assert!(s.reading_paused());
    assert!(sent(&mut s, t0).is_empty());
}

#[test]
fn close_handshakes() {
    let t0 = Instant::now();
    // Client-initiated: channels are handed back, close-ok, then drain.
    let mut s = running(t0, &[], 0);
    open_channel(&mut s, 1, t0);
    s.channel(1).expect("open").0.clone_from(&7);
    s.handle_input(&method(0, ConnectionClose::default()), t0);
    let ev = events(&mut s, t0);
    assert!(matches!(
        &ev[..],
        [
            Event::ChannelClosed {
                channel: 1,
                data: 7
            },
            Event::Closed { drain: true, .. }
        ]
    ));
    assert_eq!(sent(&mut s, t0), method(0, ConnectionCloseOk::default()));

    // Server-initiated: close, then frames are dropped until close-ok.
    let mut s = running(t0, &[], 0);
    open_channel(&mut s, 1, t0);
    s.close(AmqpError::connection_forced("bye"), ms(t0, 1_000));
    assert_eq!(close_of(&sent_frames(&mut s, t0)), (320, 0, 0));
    s.handle_input(&method(1, BasicQos::default()), t0);
    assert!(events(&mut s, t0).is_empty());
    s.handle_input(&method(0, ConnectionCloseOk::default()), t0);
    assert!(events(&mut s, t0).iter().any(is_closed_event));

    // No close-ok: given up after exactly 3 s.
    let mut s = running(t0, &[], 0);
    s.close(AmqpError::connection_forced("bye"), ms(t0, 1_000));
    assert_eq!(s.poll_timeout(), Some(ms(t0, 4_000)));
    s.handle_timeout(ms(t0, 3_999));
    assert!(events(&mut s, t0).is_empty());
    s.handle_timeout(ms(t0, 4_000));
    assert!(events(&mut s, t0).iter().any(is_closed_event));

    // Both closing at once: their close is answered with close-ok.
    let mut s = running(t0, &[], 0);
    s.close(AmqpError::connection_forced("bye"), t0);
    sent(&mut s, t0);
    s.handle_input(&method(0, ConnectionClose::default()), t0);
    assert!(events(&mut s, t0).iter().any(is_closed_event));
    assert_eq!(sent(&mut s, t0), method(0, ConnectionCloseOk::default()));
}

#[test]
fn channel_close_handshake_and_soft_errors() {
    let t0 = Instant::now();
    let mut s = running(t0, &[], 0);
    open_channel(&mut s, 1, t0);
    // A handler's soft error: channel.close, Release, then close-ok hands it back.
    s.channel_error(1, AmqpError::not_found("no queue 'q'").at(50, 10), t0);
    assert!(matches!(
        &events(&mut s, t0)[..],
        [Event::Release { channel: 1 }]
    ));
    assert_eq!(channel_close_of(&sent_frames(&mut s, t0), 1), (404, 50, 10));
    assert!(s.channel(1).is_some_and(|(_, io)| io.closing));
    s.handle_input(&method(1, ChannelCloseOk::default()), t0);
    assert!(matches!(
        &events(&mut s, t0)[..],
        [Event::ChannelClosed { channel: 1, .. }]
    ));
    assert!(s.channel(1).is_none());
    // The client closes: close-ok.
    open_channel(&mut s, 2, t0);
    s.handle_input(&method(2, ChannelClose::default()), t0);
    assert!(matches!(
        &events(&mut s, t0)[..],
        [Event::ChannelClosed { channel: 2, .. }]
    ));
    assert_eq!(sent(&mut s, t0), method(2, ChannelCloseOk::default()));
    // Broker-class methods go to the caller; flow and access are answered here.
    open_channel(&mut s, 3, t0);
    s.handle_input(&method(3, QueueDeclare::default()), t0);
    assert!(matches!(
        &events(&mut s, t0)[..],
        [Event::Method {
            channel: 3,
            method: Method::QueueDeclare(_)
        }]
    ));
    s.handle_input(&method(3, ChannelFlow { active: true }), t0);
    assert!(matches!(
        &events(&mut s, t0)[..],
        [Event::Resume { channel: 3 }]
    ));
    assert_eq!(sent(&mut s, t0), method(3, ChannelFlowOk { active: true }));
}

#[test]
fn tx_commit_ok_only_after_a_good_flush() {
    let t0 = Instant::now();
    let mut s = running(t0, &[], 0);
    open_channel(&mut s, 1, t0);
    s.channel(1).expect("open").1.await_tx_flush();
    assert_eq!(
        s.poll_store_wait(),
        Some(StoreWait::TxCommit { channel: 1 })
    );
    s.tx_flushed(1, true, t0);
    assert_eq!(sent(&mut s, t0), method(1, TxCommitOk::default()));
}

/// A channel gate refusing the third channel.open: channels 1 and 2 open, the
/// third gets no open-ok but connection.close 530 at channel.open, as RabbitMQ's
/// per-user channel limit closes the connection.
#[test]
fn channel_gate_refusal_closes_the_connection_without_open_ok() {
    let t0 = Instant::now();
    let mut s = running(t0, &[], 0);
    let asked = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = std::sync::Arc::clone(&asked);
    s.set_channel_gate(ChannelGate(Box::new(move |channel| {
        let mut seen = seen
            .lock()
            .map_err(|_| AmqpError::internal_error("poisoned"))?;
        seen.push(channel);
        if seen.len() > 2 {
            return Err(AmqpError::not_allowed("limit (2)"));
        }
        Ok(())
    })));
    open_channel(&mut s, 1, t0);
    open_channel(&mut s, 2, t0);
    s.handle_input(&method(3, ChannelOpen::default()), t0);
    let ev = events(&mut s, t0);
    assert!(
        !ev.iter().any(|e| matches!(e, Event::ChannelOpened { .. })),
        "{ev:?}"
    );
    let frames = sent_frames(&mut s, t0);
    assert_eq!(frames.len(), 1, "close only, no open-ok: {frames:?}");
    assert_eq!(close_of(&frames), (530, 20, 10));
    assert_eq!(*asked.lock().expect("lock"), vec![1, 2, 3]);
}

fn update_secret(secret: &'static [u8]) -> Vec<u8> {
    method(
        0,
        ConnectionUpdateSecret {
            new_secret: Bytes::from_static(secret),
            reason: "refresh".into(),
        },
    )
}

#[test]
fn an_expired_credential_closes_with_320_at_the_exact_moment() {
    let t0 = Instant::now();
    let mut s = running(t0, &[], 0);
    s.set_credential_expiry(Some(ms(t0, 2_000)));
    assert_eq!(s.poll_timeout(), Some(ms(t0, 2_000)));
    s.handle_timeout(ms(t0, 1_999));
    assert!(sent(&mut s, ms(t0, 1_999)).is_empty());
    s.handle_timeout(ms(t0, 2_000));
    let frames = sent_frames(&mut s, ms(t0, 2_000));
    assert_eq!(close_of(&frames), (320, 0, 0));
    match &frames[..] {
        [Frame::Method {
            method: Method::ConnectionClose(c),
            ..
        }] => assert_eq!(c.reply_text, "CONNECTION_FORCED - credential expired"),
        other => panic!("{other:?}"),
    }
    // Only the close-ok wait is left.
    assert_eq!(
        s.poll_timeout(),
        Some(ms(t0, 2_000) + timer::CLOSE_OK_TIMEOUT)
    );
}

#[test]
fn update_secret_is_the_callers_to_accept_and_moves_the_expiry() {
    let t0 = Instant::now();
    let mut s = running(t0, &[], 0);
    s.set_credential_expiry(Some(ms(t0, 1_000)));
    s.handle_input(&update_secret(b"fresh"), ms(t0, 500));
    match &events(&mut s, ms(t0, 500))[..] {
        [Event::UpdateSecret { secret, reason }] => {
            assert_eq!((&secret[..], &reason[..]), (&b"fresh"[..], "refresh"))
        }
        other => panic!("{other:?}"),
    }
    assert!(
        sent(&mut s, ms(t0, 500)).is_empty(),
        "no ok before the answer"
    );
    s.accept_update_secret(Some(ms(t0, 5_000)));
    assert!(matches!(
        sent_frames(&mut s, ms(t0, 500))[..],
        [Frame::Method {
            channel: 0,
            method: Method::ConnectionUpdateSecretOk(_)
        }]
    ));
    s.handle_timeout(ms(t0, 1_000));
    assert!(s.is_running(), "the old expiry is gone");
    assert_eq!(s.poll_timeout(), Some(ms(t0, 5_000)));
    // A refused secret: the caller closes with 530 on update-secret.
    s.handle_input(&update_secret(b"bad"), ms(t0, 600));
    assert_eq!(events(&mut s, ms(t0, 600)).len(), 1);
    s.close(handshake::secret_refused(), ms(t0, 600));
    assert_eq!(close_of(&sent_frames(&mut s, ms(t0, 600))), (530, 10, 70));
}
