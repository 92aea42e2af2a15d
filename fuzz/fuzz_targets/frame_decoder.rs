//! `FrameCodec::decode` over arbitrary bytes: the first byte picks a small
//! frame_max (or the default / none), the rest is the stream. Every frame that
//! decodes is re-encoded and must decode to the same frame.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;
use warren::wire::{Frame, FrameCodec};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, stream)) = data.split_first() else {
        return;
    };
    let frame_max = match sel % 4 {
        0 => 0,
        1 => warren::wire::DEFAULT_FRAME_MAX,
        2 => 4096,
        _ => 8 + u32::from(sel),
    };
    let mut codec = FrameCodec::new(frame_max);
    // Feed in two pieces to exercise partial reads.
    let split = stream.len() / 2;
    let mut src = BytesMut::from(&stream[..split]);
    let mut frames: Vec<Frame> = Vec::new();
    loop {
        match codec.decode(&mut src) {
            Ok(Some(f)) => frames.push(f),
            Ok(None) => break,
            Err(_) => return,
        }
    }
    src.extend_from_slice(&stream[split..]);
    loop {
        match codec.decode(&mut src) {
            Ok(Some(f)) => frames.push(f),
            Ok(None) => break,
            Err(_) => break,
        }
    }
    for f in frames {
        let mut buf = BytesMut::new();
        f.encode(&mut buf);
        let mut again = FrameCodec::new(0);
        match again.decode(&mut buf) {
            Ok(Some(g)) => {
                // NaN floats in tables do not compare equal; compare encodings instead.
                let mut a = BytesMut::new();
                let mut b = BytesMut::new();
                f.encode(&mut a);
                g.encode(&mut b);
                assert_eq!(a, b, "re-encoded frame differs");
            }
            other => panic!("re-encoded frame does not decode: {other:?}"),
        }
    }
});
