//! The Stream protocol frame parser over arbitrary bytes: `check_frame` cuts
//! frames (the first byte picks a frame max), `request::parse` reads each;
//! every request that parses is re-encoded and must parse to the same
//! request. Published entries also go through the AMQP 1.0 decoder.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use warren::wire::amqp10;
use warren::wire::stream::{check_frame, request, Request};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, mut stream)) = data.split_first() else {
        return;
    };
    let max = match sel % 3 {
        0 => 0,
        1 => 64,
        _ => 8192,
    };
    while let Ok(Some(len)) = check_frame(stream, max) {
        let frame = Bytes::copy_from_slice(&stream[..len]);
        stream = &stream[len..];
        let Ok(req) = request::parse(&frame) else {
            continue;
        };
        if let Request::Publish { messages, .. } = &req {
            for m in messages {
                let _ = amqp10::decode_to_091_shared(&m.data);
            }
        }
        let again = request::parse(&req.to_frame());
        assert_eq!(again.as_ref(), Ok(&req), "re-encoded request differs");
    }
});
