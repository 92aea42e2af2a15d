//! `--client raw`: producers and consumers that speak AMQP 0-9-1 through warren's own
//! codec (`warren::wire`), for the data path only.
//!
//! Generic clients spend several µs of CPU per message (task hops, one write syscall per
//! publish, per-delivery channel sends). On a small box the load generator shares the CPU
//! with the broker, so here a producer encodes a batch of publishes into one reused buffer
//! and writes it at once, a consumer decodes every frame one read brought (`FrameCodec`)
//! and answers with all its acks in one write. Methods are the generated structs.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{Barrier, Semaphore};
use tokio_util::codec::Decoder;
use warren::wire::{
    self, BasicAck, BasicConsume, BasicProperties, BasicPublish, BasicQos, ChannelOpen,
    ConfirmSelect, ConnectionClose, ConnectionOpen, ConnectionStartOk, ConnectionTuneOk,
    FieldTable, FieldValue, Frame, FrameCodec, Method, DEFAULT_FRAME_MAX, FRAME_OVERHEAD,
    PROTOCOL_HEADER,
};

use crate::confirm::ConfirmTracker;
use crate::connect::UriParts;
use crate::scenarios::Ctx;
use crate::stats::{ack_every, backlog_gate, fail, now_nanos, HIST_MAX_US};
use crate::Res;

/// Free space a read asks for: one read takes in many deliveries.
const READ_CHUNK: usize = 256 * 1024;

/// The channel every raw client works on.
const CHANNEL: u16 = 1;

/// The receiving half: socket reads into one buffer, frames decoded from it by
/// warren's `FrameCodec` (which also checks frame ends and frame_max).
struct Reader {
    socket: OwnedReadHalf,
    codec: FrameCodec,
    buf: BytesMut,
}

impl Reader {
    fn new(socket: OwnedReadHalf) -> Self {
        Reader {
            socket,
            codec: FrameCodec::new(DEFAULT_FRAME_MAX),
            buf: BytesMut::with_capacity(READ_CHUNK),
        }
    }

    /// The next frame already read, if a whole one is buffered.
    fn buffered(&mut self) -> Res<Option<Frame>> {
        Ok(self.codec.decode(&mut self.buf)?)
    }

    /// One more read from the socket.
    async fn fill(&mut self) -> Res<()> {
        if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
            self.buf.reserve(READ_CHUNK);
        }
        if self.socket.read_buf(&mut self.buf).await? == 0 {
            return Err("connection closed by broker".into());
        }
        Ok(())
    }

    /// The next method, skipping heartbeats and content frames.
    async fn next_method(&mut self) -> Res<Method> {
        loop {
            match self.buffered()? {
                Some(Frame::Method { method, .. }) => return Ok(method),
                Some(_) => {}
                None => self.fill().await?,
            }
        }
    }
}

/// Wait for the method `$variant` on `$reader`, skipping others; a close from the
/// broker is an error.
macro_rules! expect {
    ($reader:expr, $variant:ident) => {
        loop {
            match $reader.next_method().await? {
                Method::$variant(m) => break m,
                other => refuse_close(&other)?,
            }
        }
    };
}

/// `Err` with the broker's reply code and text if `method` closes the connection or
/// the channel.
fn refuse_close(method: &Method) -> Res<()> {
    match method {
        Method::ConnectionClose(c) => Err(format!(
            "broker closed connection: {} {}",
            c.reply_code, c.reply_text
        )
        .into()),
        Method::ChannelClose(c) => {
            Err(format!("broker closed channel: {} {}", c.reply_code, c.reply_text).into())
        }
        _ => Ok(()),
    }
}

/// The sending half: frames are encoded into one reused buffer and written together.
struct Writer {
    socket: OwnedWriteHalf,
    buf: BytesMut,
}

impl Writer {
    /// Append a method frame to the pending output.
    fn method(&mut self, channel: u16, method: impl Into<Method>) {
        wire::write_method(&mut self.buf, channel, &method.into());
    }

    /// Write everything pending.
    async fn flush(&mut self) -> Res<()> {
        if !self.buf.is_empty() {
            self.socket.write_all(&self.buf).await?;
            self.buf.clear();
        }
        Ok(())
    }

    async fn send(&mut self, channel: u16, method: impl Into<Method>) -> Res<()> {
        self.method(channel, method);
        self.flush().await
    }

    async fn close(&mut self) {
        let close = ConnectionClose {
            reply_code: 200,
            reply_text: "bye".into(),
            class_id: 0,
            method_id: 0,
        };
        let _ = self.send(0, close).await;
    }
}

/// Connect, authenticate (PLAIN), tune (heartbeats off), open the vhost and channel 1.
/// Returns the two halves and the agreed frame_max.
async fn connect(u: &UriParts, name: &str) -> Res<(Reader, Writer, u32)> {
    let socket = TcpStream::connect((u.host.as_str(), u.port)).await?;
    socket.set_nodelay(true)?;
    let (r, w) = socket.into_split();
    let mut rd = Reader::new(r);
    let mut wr = Writer {
        socket: w,
        buf: BytesMut::with_capacity(64 * 1024),
    };
    wr.socket.write_all(PROTOCOL_HEADER).await?;
    expect!(rd, ConnectionStart);
    let mut client_properties = FieldTable::new();
    client_properties.insert("product", FieldValue::string("warren-perf"));
    client_properties.insert("connection_name", FieldValue::string(name));
    let start_ok = ConnectionStartOk {
        client_properties,
        mechanism: "PLAIN".into(),
        response: Bytes::from(format!("\0{}\0{}", u.user, u.pass)),
        locale: "en_US".into(),
    };
    wr.send(0, start_ok).await?;
    let tune = expect!(rd, ConnectionTune);
    let frame_max = match tune.frame_max {
        0 => DEFAULT_FRAME_MAX,
        max => max.min(DEFAULT_FRAME_MAX),
    };
    let tune_ok = ConnectionTuneOk {
        channel_max: if tune.channel_max == 0 {
            2047
        } else {
            tune.channel_max
        },
        frame_max,
        heartbeat: 0,
    };
    wr.send(0, tune_ok).await?;
    rd.codec.set_frame_max(frame_max);
    let open = ConnectionOpen {
        virtual_host: u.vhost.clone(),
        ..Default::default()
    };
    wr.send(0, open).await?;
    expect!(rd, ConnectionOpenOk);
    wr.send(CHANNEL, ChannelOpen::default()).await?;
    expect!(rd, ChannelOpenOk);
    Ok((rd, wr, frame_max))
}

/// A producer: publishes to `cx.routing_key` in batches (one write per batch), with
/// publisher confirms bounding what is outstanding when `--confirm` is set.
pub async fn producer(id: usize, cx: Arc<Ctx>, start: Arc<Barrier>) -> Res<()> {
    let (a, st) = (&cx.a, &cx.st);
    let (mut rd, mut wr, frame_max) = connect(&cx.uri, &format!("perf-producer-{id}")).await?;
    let tracker = Arc::new(ConfirmTracker {
        sem: Semaphore::new(a.confirm),
        outstanding: Mutex::new(BTreeSet::new()),
        stats: st.clone(),
    });
    let confirm = a.confirm > 0;
    if confirm {
        wr.send(CHANNEL, ConfirmSelect { nowait: false }).await?;
        expect!(rd, ConfirmSelectOk);
    }
    // reader: publisher confirms and broker-initiated closes
    let (t2, st2) = (tracker.clone(), st.clone());
    let reader = tokio::spawn(async move {
        let r: Res<()> = async {
            loop {
                match rd.next_method().await? {
                    Method::BasicAck(m) => t2.settle(m.delivery_tag, m.multiple, false),
                    Method::BasicNack(m) => t2.settle(m.delivery_tag, m.multiple, true),
                    Method::ConnectionCloseOk(_) => return Ok(()),
                    other => refuse_close(&other)?,
                }
            }
        }
        .await;
        if let Err(e) = r {
            fail(&format!("producer {id} reader"), e, &st2);
        }
    });

    // The publish method frame is the same for every message: encoded once. The
    // content (header and body frames) is encoded per message, into the same buffer.
    let body_len = a.size.max(8);
    let mut publish = BytesMut::new();
    let method = BasicPublish {
        exchange: a.exchange.clone(),
        routing_key: cx.routing_key.clone(),
        ..Default::default()
    };
    wire::write_method(&mut publish, CHANNEL, &method.into());
    let properties = BasicProperties {
        delivery_mode: a.persistent.then_some(2),
        ..Default::default()
    };
    let mut body = vec![0u8; body_len];
    let chunk = (frame_max - FRAME_OVERHEAD) as usize;
    let per_msg = publish.len() + 64 + body_len + FRAME_OVERHEAD as usize * (1 + body_len / chunk);
    let batch_max = (32 * 1024 / per_msg).clamp(1, 1000) as u64;
    wr.buf.reserve(64 * 1024 + per_msg);

    start.wait().await;
    let t_start = Instant::now();
    let mut seq = 0u64;
    loop {
        if st.stop.load(Relaxed) || (a.pmessages > 0 && seq >= a.pmessages) {
            break;
        }
        let mut k = batch_max;
        if a.pmessages > 0 {
            k = k.min(a.pmessages - seq);
        }
        if a.rate > 0.0 {
            let due = (t_start.elapsed().as_secs_f64() * a.rate) as u64 + 1;
            if due <= seq {
                let at = t_start + Duration::from_secs_f64(seq as f64 / a.rate);
                tokio::time::sleep_until(at.into()).await;
                continue;
            }
            k = k.min(due - seq);
        }
        backlog_gate(a, st).await;
        if confirm {
            let avail = tracker.sem.available_permits() as u64;
            if avail == 0 {
                match tokio::time::timeout(Duration::from_millis(100), tracker.sem.acquire()).await
                {
                    Ok(p) => p?.forget(),
                    Err(_) => continue, // re-check stop
                }
                let extra = (k - 1).min(tracker.sem.available_permits() as u64) as u32;
                let got = match tracker.sem.try_acquire_many(extra) {
                    Ok(p) => {
                        p.forget();
                        extra as u64
                    }
                    Err(_) => 0,
                };
                k = 1 + got;
            } else {
                k = k.min(avail);
                tracker.sem.try_acquire_many(k as u32)?.forget();
            }
            let mut o = tracker.outstanding.lock().unwrap();
            o.extend(seq + 1..=seq + k);
        }
        for _ in 0..k {
            wr.buf.extend_from_slice(&publish);
            body[..8].copy_from_slice(&now_nanos().to_le_bytes());
            wire::write_content(
                &mut wr.buf,
                CHANNEL,
                BasicPublish::CLASS_ID,
                &properties,
                &body,
                frame_max,
            );
        }
        wr.flush().await?;
        seq += k;
        st.published.fetch_add(k, Relaxed);
    }
    st.producers_done.fetch_add(1, Relaxed);
    if confirm {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !tracker.outstanding.lock().unwrap().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    wr.close().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), reader).await;
    Ok(())
}

/// A consumer: records the end-to-end latency of each message (from the timestamp in
/// its first body frame) and acks every `ack_every` messages, one write per read.
pub async fn consumer(id: usize, cx: Arc<Ctx>, ready: Arc<Barrier>) -> Res<()> {
    let (a, st) = (&cx.a, &cx.st);
    let hist = st.register_hist();
    let (mut rd, mut wr, _) = connect(&cx.uri, &format!("perf-consumer-{id}")).await?;
    if a.prefetch > 0 {
        let qos = BasicQos {
            prefetch_count: a.prefetch,
            ..Default::default()
        };
        wr.send(CHANNEL, qos).await?;
        expect!(rd, BasicQosOk);
    }
    let consume = BasicConsume {
        queue: cx.queue.clone(),
        consumer_tag: format!("perf-consumer-{id}"),
        no_ack: a.autoack,
        ..Default::default()
    };
    wr.send(CHANNEL, consume).await?;
    expect!(rd, BasicConsumeOk);
    ready.wait().await;

    let every = ack_every(a) as u64;
    let mut since = 0u64;
    let mut tag = 0u64;
    let mut remaining = 0u64; // body bytes still expected for the current message
    let mut first_body = false;
    let mut now = now_nanos();
    loop {
        let mut n = 0u64;
        {
            let mut h = hist.lock().unwrap();
            loop {
                // Matched in place: a decoded frame is large (the content header's
                // properties), so it is not moved into a binding first.
                let done = match rd.codec.decode(&mut rd.buf) {
                    Ok(None) => break,
                    Err(e) => return Err(e.into()),
                    Ok(Some(Frame::Method {
                        method: Method::BasicDeliver(d),
                        ..
                    })) => {
                        tag = d.delivery_tag;
                        false
                    }
                    Ok(Some(Frame::Method {
                        method: Method::BasicCancel(_),
                        ..
                    })) => return Ok(()), // queue deleted
                    Ok(Some(Frame::Method { method, .. })) => {
                        refuse_close(&method)?;
                        false
                    }
                    Ok(Some(Frame::Header { body_size, .. })) => {
                        remaining = body_size;
                        first_body = true;
                        remaining == 0
                    }
                    Ok(Some(Frame::Body { payload, .. })) => {
                        if first_body && payload.len() >= 8 {
                            let mut ts = [0u8; 8];
                            ts.copy_from_slice(&payload[..8]);
                            let us = now.saturating_sub(u64::from_le_bytes(ts)) / 1000;
                            h.saturating_record(us.clamp(1, HIST_MAX_US));
                        }
                        first_body = false;
                        remaining = remaining.saturating_sub(payload.len() as u64);
                        remaining == 0
                    }
                    Ok(Some(Frame::Heartbeat { .. })) => false,
                };
                if done {
                    n += 1;
                    if !a.autoack {
                        since += 1;
                        if since >= every {
                            let ack = BasicAck {
                                delivery_tag: tag,
                                multiple: every > 1,
                            };
                            wr.method(CHANNEL, ack);
                            since = 0;
                        }
                    }
                }
            }
        }
        if n > 0 {
            st.consumed.fetch_add(n, Relaxed);
        }
        wr.flush().await?;
        rd.fill().await?;
        now = now_nanos(); // all frames of this read arrived together
    }
}
