//! Sender-selected distribution (RabbitMQ's `CC` and `BCC` headers): a publisher
//! lists extra routing keys in the `CC` and `BCC` headers (arrays of long
//! strings) and the message is routed with each of them as well as its routing
//! key, reaching every matched queue once. `CC` stays in the delivered headers;
//! `BCC` is removed before the message is stored or delivered.
//!
//! Only publishes by clients (basic.publish, the admin API's publish) read the
//! headers; routing itself takes the extra keys as an argument
//! ([`VHost::publish_cc`](crate::broker::VHost::publish_cc)).

use crate::broker::message::ShortStr;
use crate::error::{AmqpError, AmqpResult};
use crate::wire::{BasicProperties, FieldValue};

/// The routing keys of the `CC` and `BCC` headers of `properties` (CC first),
/// with `BCC` removed from the headers. No headers, or neither header: an empty
/// list and no allocation. A `CC` or `BCC` that is not an array is refused with
/// 406, as RabbitMQ refuses it; non-string array elements are skipped.
pub fn take_cc_keys(properties: &mut BasicProperties) -> AmqpResult<Vec<ShortStr>> {
    let Some(headers) = properties.headers.as_mut() else {
        return Ok(Vec::new());
    };
    let has = |k: &str| headers.0.iter().any(|(name, _)| name == k);
    if !has("CC") && !has("BCC") {
        return Ok(Vec::new());
    }
    let mut keys = Vec::new();
    for name in ["CC", "BCC"] {
        match headers.get(name) {
            None => {}
            Some(FieldValue::Array(values)) => push_keys(values, &mut keys),
            Some(other) => {
                return Err(AmqpError::precondition_failed(format!(
                    "invalid message: {{unacceptable_type_in_header,\"{name}\",{}}}",
                    other.rabbit_type_name()
                )))
            }
        }
    }
    headers.remove("BCC");
    Ok(keys)
}

/// The routing keys of the `CC` header of a stored message's `properties`
/// (its `BCC` is gone by then): what a delivery's trace names besides the
/// routing key.
pub fn cc_keys(properties: &BasicProperties) -> Vec<ShortStr> {
    let mut keys = Vec::new();
    if let Some(FieldValue::Array(values)) = properties.headers.as_ref().and_then(|h| h.get("CC")) {
        push_keys(values, &mut keys);
    }
    keys
}

/// The string elements of a `CC` / `BCC` array, as routing keys.
fn push_keys(values: &[FieldValue], keys: &mut Vec<ShortStr>) {
    for v in values {
        if let FieldValue::LongString(b) = v {
            if let Ok(s) = std::str::from_utf8(b) {
                keys.push(ShortStr::intern(s));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::FieldTable;

    fn props(headers: Vec<(&str, FieldValue)>) -> BasicProperties {
        BasicProperties {
            headers: Some(FieldTable(
                headers
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
            )),
            ..Default::default()
        }
    }

    fn strings(items: &[&str]) -> FieldValue {
        FieldValue::Array(items.iter().map(|s| FieldValue::string(*s)).collect())
    }

    #[test]
    fn cc_and_bcc_keys_bcc_removed_cc_kept() {
        let mut p = props(vec![
            ("x", FieldValue::I32(1)),
            ("CC", strings(&["a", "b"])),
            ("BCC", strings(&["c"])),
        ]);
        let keys = take_cc_keys(&mut p).expect("valid");
        let keys: Vec<&str> = keys.iter().map(|k| k.as_str()).collect();
        assert_eq!(keys, ["a", "b", "c"]);
        let h = p.headers.expect("headers stay");
        assert!(h.get("BCC").is_none());
        assert!(h.get("CC").is_some());
        assert!(h.get("x").is_some());
    }

    #[test]
    fn no_headers_no_keys() {
        let mut p = BasicProperties::default();
        assert!(take_cc_keys(&mut p).expect("ok").is_empty());
        let mut p = props(vec![("other", strings(&["a"]))]);
        assert!(take_cc_keys(&mut p).expect("ok").is_empty());
    }

    #[test]
    fn non_array_is_406_and_non_strings_skipped() {
        let mut p = props(vec![("CC", FieldValue::string("a"))]);
        let e = take_cc_keys(&mut p).expect_err("not an array");
        assert_eq!(e.code, crate::wire::reply_code::PRECONDITION_FAILED);
        assert!(e.text.contains("unacceptable_type_in_header"), "{}", e.text);
        let mut p = props(vec![(
            "BCC",
            FieldValue::Array(vec![FieldValue::I32(1), FieldValue::string("k")]),
        )]);
        let keys = take_cc_keys(&mut p).expect("ok");
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].as_str(), "k");
    }
}
