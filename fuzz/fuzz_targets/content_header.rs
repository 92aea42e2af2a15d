//! `BasicProperties::decode` on arbitrary property lists; what decodes must
//! re-encode to bytes that decode to the same encoding.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use warren::wire::BasicProperties;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = BasicProperties::decode(data) {
        let mut a = BytesMut::new();
        p.encode(&mut a);
        let back = BasicProperties::decode(&a).expect("re-encoded properties decode");
        let mut b = BytesMut::new();
        back.encode(&mut b);
        assert_eq!(a, b);
    }
});
