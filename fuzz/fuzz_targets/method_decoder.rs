//! `Method::decode` on arbitrary payloads, and the field-table, field-array and
//! field-value parsers (nested tables included). The first byte selects which.
//! Whatever decodes must re-encode and decode to the same bytes.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use warren::wire::{self, Method};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    match sel % 4 {
        0 | 1 => {
            if let Ok(m) = Method::decode(rest) {
                let mut a = BytesMut::new();
                m.encode(&mut a);
                let back = Method::decode(&a).expect("re-encoded method decodes");
                let mut b = BytesMut::new();
                back.encode(&mut b);
                assert_eq!(a, b);
            }
        }
        2 => {
            if let Ok(t) = wire::parse_all(rest, wire::parse_field_table) {
                let mut a = BytesMut::new();
                wire::encode_field_table(&t, &mut a);
                let back = wire::parse_all(&a, wire::parse_field_table).expect("round trip");
                let mut b = BytesMut::new();
                wire::encode_field_table(&back, &mut b);
                assert_eq!(a, b);
            }
            let _ = wire::parse_table_entries(rest);
        }
        _ => {
            if let Ok(v) = wire::parse_all(rest, wire::parse_field_array) {
                let mut a = BytesMut::new();
                wire::encode_field_array(&v, &mut a);
                wire::parse_all(&a, wire::parse_field_array).expect("round trip");
            }
            let _ = wire::parse_field_value(rest);
        }
    }
});
