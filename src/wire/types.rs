//! AMQP field values and field tables, with RabbitMQ's type tags.
//!
//! Owns the in-memory representation of `table` / `array` values and their
//! encoding and `nom` parsing. Type tags follow RabbitMQ (and every common
//! client), not the 0-9-1 spec table: t b B s u I i l f d D S A T F V x.
//! Also owns the primitive string parsers and encoders every method uses, and
//! the parser error type ([`ParseError`], [`PResult`]).

use bytes::{BufMut, Bytes, BytesMut};
use nom::bytes::complete::take;
use nom::error::{ContextError, ErrorKind};
use nom::number::complete::{
    be_f32, be_f64, be_i16, be_i32, be_i64, be_i8, be_u16, be_u32, be_u64, be_u8,
};
use nom::IResult;

/// One value in a field table or field array.
#[derive(Debug, Clone, PartialEq)]
pub enum FieldValue {
    /// `t`
    Bool(bool),
    /// `b`
    I8(i8),
    /// `B`
    U8(u8),
    /// `s`
    I16(i16),
    /// `u`
    U16(u16),
    /// `I`
    I32(i32),
    /// `i`
    U32(u32),
    /// `l`
    I64(i64),
    /// `f`
    F32(f32),
    /// `d`
    F64(f64),
    /// `D`: scale, unscaled value
    Decimal(u8, u32),
    /// `S`: long string (may be binary)
    LongString(Bytes),
    /// `A`
    Array(Vec<FieldValue>),
    /// `T`: seconds since the epoch
    Timestamp(u64),
    /// `F`
    Table(FieldTable),
    /// `V`
    Void,
    /// `x`
    ByteArray(Bytes),
}

/// A field table: ordered (name, value) pairs, as they arrived on the wire.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FieldTable(pub Vec<(String, FieldValue)>);

impl FieldTable {
    pub fn new() -> Self {
        FieldTable(Vec::new())
    }

    /// The value of the first entry named `key`.
    pub fn get(&self, key: &str) -> Option<&FieldValue> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Set `key` to `value`, replacing an existing entry in place.
    pub fn insert(&mut self, key: impl Into<String>, value: FieldValue) {
        let key = key.into();
        if let Some(slot) = self.0.iter_mut().find(|(k, _)| *k == key) {
            slot.1 = value;
        } else {
            self.0.push((key, value));
        }
    }

    /// Remove `key`, returning its value.
    pub fn remove(&mut self, key: &str) -> Option<FieldValue> {
        let idx = self.0.iter().position(|(k, _)| k == key)?;
        Some(self.0.remove(idx).1)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &FieldValue)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v))
    }
}

impl FieldValue {
    /// The value's type as RabbitMQ (Erlang) names it in error texts, e.g.
    /// `{unacceptable_type,longstr}`.
    pub fn rabbit_type_name(&self) -> &'static str {
        match self {
            FieldValue::Bool(_) => "bool",
            FieldValue::I8(_) => "byte",
            FieldValue::U8(_) => "unsignedbyte",
            FieldValue::I16(_) => "short",
            FieldValue::U16(_) => "unsignedshort",
            FieldValue::I32(_) => "signedint",
            FieldValue::U32(_) => "unsignedint",
            FieldValue::I64(_) => "long",
            FieldValue::F32(_) => "float",
            FieldValue::F64(_) => "double",
            FieldValue::Decimal(..) => "decimal",
            FieldValue::LongString(_) => "longstr",
            FieldValue::Array(_) => "array",
            FieldValue::Timestamp(_) => "timestamp",
            FieldValue::Table(_) => "table",
            FieldValue::ByteArray(_) => "binary",
            FieldValue::Void => "void",
        }
    }

    /// The value as a signed integer, for any integer type.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            FieldValue::I8(v) => Some(v.into()),
            FieldValue::U8(v) => Some(v.into()),
            FieldValue::I16(v) => Some(v.into()),
            FieldValue::U16(v) => Some(v.into()),
            FieldValue::I32(v) => Some(v.into()),
            FieldValue::U32(v) => Some(v.into()),
            FieldValue::I64(v) => Some(v),
            FieldValue::Timestamp(v) => i64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as text, for long strings that are valid UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            FieldValue::LongString(b) => std::str::from_utf8(b).ok(),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            FieldValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// A long-string value from text.
    pub fn string(s: impl Into<String>) -> FieldValue {
        FieldValue::LongString(Bytes::from(s.into()))
    }
}

/// How deeply tables and arrays may nest inside one field table before the
/// input is refused: hostile input must not be able to exhaust the stack.
pub const MAX_NESTING: usize = 128;

/// Detail length past which no more context is prefixed (see `ParseError::within`).
const MAX_CONTEXT_LEN: usize = 120;

/// Why a wire parser failed, in words fit for a `connection.close` reply text,
/// outermost context first (`"arguments: field 'x-ttl': unexpected end of data"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError {
    pub detail: String,
}

impl ParseError {
    pub fn new(detail: impl Into<String>) -> Self {
        ParseError {
            detail: detail.into(),
        }
    }

    /// Prefix the context `what`, unless the path is already long: reply texts
    /// are short strings (255 bytes), so deep nesting must not push the reason
    /// itself off the end.
    fn within(mut self, what: &str) -> Self {
        if self.detail.len() < MAX_CONTEXT_LEN {
            self.detail = format!("{what}: {}", self.detail);
        }
        self
    }
}

impl<'a> nom::error::ParseError<&'a [u8]> for ParseError {
    fn from_error_kind(_input: &'a [u8], kind: ErrorKind) -> Self {
        match kind {
            ErrorKind::Eof => ParseError::new("unexpected end of data"),
            other => ParseError::new(format!("malformed data ({})", other.description())),
        }
    }

    fn append(_input: &'a [u8], _kind: ErrorKind, other: Self) -> Self {
        other
    }
}

impl<'a> ContextError<&'a [u8]> for ParseError {
    fn add_context(_input: &'a [u8], ctx: &'static str, other: Self) -> Self {
        other.within(ctx)
    }
}

/// Result of the wire parsers: complete (never `Incomplete`) byte parsers.
pub type PResult<'a, T> = IResult<&'a [u8], T, ParseError>;

fn fail<T>(detail: impl Into<String>) -> Result<T, nom::Err<ParseError>> {
    Err(nom::Err::Failure(ParseError::new(detail)))
}

/// Run `parser` over all of `input`; leftover bytes are an error. The error is
/// the detail text (for `WireError::Syntax` / `BadContentHeader`).
pub fn parse_all<'a, T>(
    input: &'a [u8],
    mut parser: impl FnMut(&'a [u8]) -> PResult<'a, T>,
) -> Result<T, String> {
    match parser(input) {
        Ok(([], value)) => Ok(value),
        Ok((rest, _)) => Err(format!("{} unexpected trailing bytes", rest.len())),
        Err(nom::Err::Error(e) | nom::Err::Failure(e)) => Err(e.detail),
        Err(nom::Err::Incomplete(_)) => Err("unexpected end of data".to_string()),
    }
}

/// `shortstr`: length octet, then that many bytes of UTF-8.
pub fn parse_short_string(i: &[u8]) -> PResult<'_, String> {
    let (i, len) = be_u8(i)?;
    let (i, bytes) = take(len)(i)?;
    match std::str::from_utf8(bytes) {
        Ok(s) => Ok((i, s.to_owned())),
        Err(_) => fail("short string is not valid UTF-8"),
    }
}

/// `longstr`: u32 length, then that many bytes (any content).
pub fn parse_long_string(i: &[u8]) -> PResult<'_, Bytes> {
    let (i, len) = be_u32(i)?;
    let (i, bytes) = take(len)(i)?;
    Ok((i, Bytes::copy_from_slice(bytes)))
}

/// `table`: u32 byte length, then (short-string name, tagged value) pairs.
pub fn parse_field_table(i: &[u8]) -> PResult<'_, FieldTable> {
    table_at(i, 0)
}

/// A field array: u32 byte length, then tagged values.
pub fn parse_field_array(i: &[u8]) -> PResult<'_, Vec<FieldValue>> {
    array_at(i, 0)
}

/// One tagged field value (type octet, then the value).
pub fn parse_field_value(i: &[u8]) -> PResult<'_, FieldValue> {
    value_at(i, 0)
}

/// The entries of a field table given without its length prefix, as in an
/// AMQPLAIN SASL response. `None` if they do not parse or bytes are left over.
pub fn parse_table_entries(input: &[u8]) -> Option<FieldTable> {
    entries_at(input, 0).ok()
}

/// `depth` counts the tables and arrays around this one.
fn table_at(i: &[u8], depth: usize) -> PResult<'_, FieldTable> {
    let (rest, len) = be_u32(i)?;
    let (rest, body) = take(len)(rest)?;
    let table = entries_at(body, depth)?;
    Ok((rest, table))
}

/// (name, value) pairs filling all of `body`.
fn entries_at(mut body: &[u8], depth: usize) -> Result<FieldTable, nom::Err<ParseError>> {
    let mut entries = Vec::new();
    while !body.is_empty() {
        let (b, name) = parse_short_string(body).map_err(|e| e.map(|e| e.within("field name")))?;
        let (b, value) = match value_at(b, depth) {
            Ok(ok) => ok,
            Err(e) => return Err(e.map(|e| e.within(&format!("field '{name}'")))),
        };
        entries.push((name, value));
        body = b;
    }
    Ok(FieldTable(entries))
}

fn array_at(i: &[u8], depth: usize) -> PResult<'_, Vec<FieldValue>> {
    let (rest, len) = be_u32(i)?;
    let (rest, mut body) = take(len)(rest)?;
    let mut values = Vec::new();
    while !body.is_empty() {
        let (b, value) = match value_at(body, depth) {
            Ok(ok) => ok,
            Err(e) => return Err(e.map(|e| e.within(&format!("array element {}", values.len())))),
        };
        values.push(value);
        body = b;
    }
    Ok((rest, values))
}

fn value_at(i: &[u8], depth: usize) -> PResult<'_, FieldValue> {
    let (i, tag) = be_u8(i)?;
    match tag {
        b't' => {
            let (i, v) = be_u8(i)?;
            Ok((i, FieldValue::Bool(v != 0)))
        }
        b'b' => be_i8(i).map(|(i, v)| (i, FieldValue::I8(v))),
        b'B' => be_u8(i).map(|(i, v)| (i, FieldValue::U8(v))),
        b's' => be_i16(i).map(|(i, v)| (i, FieldValue::I16(v))),
        b'u' => be_u16(i).map(|(i, v)| (i, FieldValue::U16(v))),
        b'I' => be_i32(i).map(|(i, v)| (i, FieldValue::I32(v))),
        b'i' => be_u32(i).map(|(i, v)| (i, FieldValue::U32(v))),
        b'l' => be_i64(i).map(|(i, v)| (i, FieldValue::I64(v))),
        b'f' => be_f32(i).map(|(i, v)| (i, FieldValue::F32(v))),
        b'd' => be_f64(i).map(|(i, v)| (i, FieldValue::F64(v))),
        b'D' => {
            let (i, scale) = be_u8(i)?;
            let (i, value) = be_u32(i)?;
            Ok((i, FieldValue::Decimal(scale, value)))
        }
        b'S' => parse_long_string(i).map(|(i, v)| (i, FieldValue::LongString(v))),
        b'x' => parse_long_string(i).map(|(i, v)| (i, FieldValue::ByteArray(v))),
        b'T' => be_u64(i).map(|(i, v)| (i, FieldValue::Timestamp(v))),
        b'V' => Ok((i, FieldValue::Void)),
        b'A' | b'F' if depth >= MAX_NESTING => fail(format!(
            "field tables and arrays nested deeper than {MAX_NESTING} levels"
        )),
        b'A' => array_at(i, depth + 1).map(|(i, v)| (i, FieldValue::Array(v))),
        b'F' => table_at(i, depth + 1).map(|(i, v)| (i, FieldValue::Table(v))),
        other => fail(format!(
            "unknown field value type {:?} ({other:#04x})",
            char::from(other)
        )),
    }
}

/// Write a `shortstr`. Text longer than 255 bytes cannot be sent as a short
/// string; it is cut at the last character boundary within 255 bytes.
pub fn encode_short_string(s: &str, buf: &mut BytesMut) {
    let mut end = s.len().min(255);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    buf.put_u8(end as u8);
    buf.put_slice(&s.as_bytes()[..end]);
}

/// Write a `longstr` (u32 length, bytes).
pub fn encode_long_string(b: &[u8], buf: &mut BytesMut) {
    buf.put_u32(b.len() as u32);
    buf.put_slice(b);
}

/// Reserve a u32 length, run `body`, then back-patch the length it wrote.
fn with_length(buf: &mut BytesMut, body: impl FnOnce(&mut BytesMut)) {
    let at = buf.len();
    buf.put_u32(0);
    body(buf);
    let len = (buf.len() - at - 4) as u32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// Write a `table`.
pub fn encode_field_table(table: &FieldTable, buf: &mut BytesMut) {
    with_length(buf, |buf| {
        for (name, value) in &table.0 {
            encode_short_string(name, buf);
            encode_field_value(value, buf);
        }
    });
}

/// Write a field array (without the `A` tag).
pub fn encode_field_array(values: &[FieldValue], buf: &mut BytesMut) {
    with_length(buf, |buf| {
        for value in values {
            encode_field_value(value, buf);
        }
    });
}

/// Write one tagged field value.
pub fn encode_field_value(value: &FieldValue, buf: &mut BytesMut) {
    match value {
        FieldValue::Bool(v) => {
            buf.put_u8(b't');
            buf.put_u8(u8::from(*v));
        }
        FieldValue::I8(v) => {
            buf.put_u8(b'b');
            buf.put_i8(*v);
        }
        FieldValue::U8(v) => {
            buf.put_u8(b'B');
            buf.put_u8(*v);
        }
        FieldValue::I16(v) => {
            buf.put_u8(b's');
            buf.put_i16(*v);
        }
        FieldValue::U16(v) => {
            buf.put_u8(b'u');
            buf.put_u16(*v);
        }
        FieldValue::I32(v) => {
            buf.put_u8(b'I');
            buf.put_i32(*v);
        }
        FieldValue::U32(v) => {
            buf.put_u8(b'i');
            buf.put_u32(*v);
        }
        FieldValue::I64(v) => {
            buf.put_u8(b'l');
            buf.put_i64(*v);
        }
        FieldValue::F32(v) => {
            buf.put_u8(b'f');
            buf.put_f32(*v);
        }
        FieldValue::F64(v) => {
            buf.put_u8(b'd');
            buf.put_f64(*v);
        }
        FieldValue::Decimal(scale, v) => {
            buf.put_u8(b'D');
            buf.put_u8(*scale);
            buf.put_u32(*v);
        }
        FieldValue::LongString(v) => {
            buf.put_u8(b'S');
            encode_long_string(v, buf);
        }
        FieldValue::Array(v) => {
            buf.put_u8(b'A');
            encode_field_array(v, buf);
        }
        FieldValue::Timestamp(v) => {
            buf.put_u8(b'T');
            buf.put_u64(*v);
        }
        FieldValue::Table(v) => {
            buf.put_u8(b'F');
            encode_field_table(v, buf);
        }
        FieldValue::Void => buf.put_u8(b'V'),
        FieldValue::ByteArray(v) => {
            buf.put_u8(b'x');
            encode_long_string(v, buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn every_type() -> FieldTable {
        FieldTable(vec![
            ("bool".into(), FieldValue::Bool(true)),
            ("i8".into(), FieldValue::I8(-8)),
            ("u8".into(), FieldValue::U8(200)),
            ("i16".into(), FieldValue::I16(-16_000)),
            ("u16".into(), FieldValue::U16(60_000)),
            ("i32".into(), FieldValue::I32(-2_000_000_000)),
            ("u32".into(), FieldValue::U32(4_000_000_000)),
            ("i64".into(), FieldValue::I64(i64::MIN)),
            ("f32".into(), FieldValue::F32(1.5)),
            ("f64".into(), FieldValue::F64(-2.25)),
            ("decimal".into(), FieldValue::Decimal(2, 12345)),
            (
                "string".into(),
                FieldValue::LongString(Bytes::from_static(b"\x00bin\xff")),
            ),
            (
                "array".into(),
                FieldValue::Array(vec![
                    FieldValue::Void,
                    FieldValue::string("a"),
                    FieldValue::Array(vec![]),
                ]),
            ),
            ("timestamp".into(), FieldValue::Timestamp(1_700_000_000)),
            (
                "table".into(),
                FieldValue::Table(FieldTable(vec![("k".into(), FieldValue::I32(1))])),
            ),
            ("void".into(), FieldValue::Void),
            (
                "bytes".into(),
                FieldValue::ByteArray(Bytes::from_static(&[1, 2, 3])),
            ),
            ("ünï".into(), FieldValue::Bool(false)),
        ])
    }

    fn encode(t: &FieldTable) -> BytesMut {
        let mut buf = BytesMut::new();
        encode_field_table(t, &mut buf);
        buf
    }

    #[test]
    fn table_with_every_type_round_trips() {
        let t = every_type();
        let buf = encode(&t);
        assert_eq!(parse_all(&buf, parse_field_table), Ok(t));
        assert_eq!(
            u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize,
            buf.len() - 4
        );
    }

    #[test]
    fn golden_bytes() {
        let t = FieldTable(vec![
            ("a".into(), FieldValue::I32(1)),
            ("b".into(), FieldValue::string("xy")),
        ]);
        let expected: &[u8] = &[
            0, 0, 0, 16, 1, b'a', b'I', 0, 0, 0, 1, 1, b'b', b'S', 0, 0, 0, 2, b'x', b'y',
        ];
        assert_eq!(&encode(&t)[..], expected);
        assert_eq!(parse_all(expected, parse_field_table), Ok(t));
        // A length one byte longer than the data is an error.
        let mut bad = expected.to_vec();
        bad[3] = 17;
        assert!(parse_all(&bad, parse_field_table).is_err());

        let t = FieldTable(vec![(
            "x-death".into(),
            FieldValue::Array(vec![FieldValue::Table(FieldTable(vec![(
                "count".into(),
                FieldValue::I64(2),
            )]))]),
        )]);
        let expected: &[u8] = &[
            0, 0, 0, 33, 7, b'x', b'-', b'd', b'e', b'a', b't', b'h', b'A', 0, 0, 0, 20, b'F', 0,
            0, 0, 15, 5, b'c', b'o', b'u', b'n', b't', b'l', 0, 0, 0, 0, 0, 0, 0, 2,
        ];
        assert_eq!(&encode(&t)[..], expected);
        assert_eq!(parse_all(expected, parse_field_table), Ok(t));
    }

    #[test]
    fn table_entries_without_length() {
        let buf = encode(&every_type());
        assert_eq!(parse_table_entries(&buf[4..]), Some(every_type()));
        assert_eq!(parse_table_entries(&buf[4..buf.len() - 1]), None);
        assert_eq!(parse_table_entries(&[]), Some(FieldTable::new()));
    }

    #[test]
    fn value_and_array_parsers() {
        assert_eq!(
            parse_all(&[b'D', 3, 0, 0, 1, 0], parse_field_value),
            Ok(FieldValue::Decimal(3, 256))
        );
        assert_eq!(
            parse_all(&[b't', 7], parse_field_value),
            Ok(FieldValue::Bool(true))
        );
        assert_eq!(
            parse_all(&[0, 0, 0, 3, b'B', 9, b'V'], parse_field_array),
            Ok(vec![FieldValue::U8(9), FieldValue::Void])
        );
        let mut buf = BytesMut::new();
        encode_field_array(&[FieldValue::I16(-1)], &mut buf);
        assert_eq!(&buf[..], &[0, 0, 0, 3, b's', 0xff, 0xff]);
    }

    #[test]
    fn bad_input_is_an_error() {
        let e = parse_all(&[0, 0, 0, 3, 1, b'k', b'Q'], parse_field_table).expect_err("bad tag");
        assert!(
            e.contains("field 'k'") && e.contains("unknown field value type 'Q'"),
            "{e}"
        );
        let e = parse_all(&[0, 0, 0, 4, 1, b'k', b'I', 0], parse_field_table).expect_err("short");
        assert!(e.contains("unexpected end of data"), "{e}");
        let e = parse_all(&[2, 0xc3, 0x28], parse_short_string).expect_err("utf-8");
        assert!(e.contains("UTF-8"), "{e}");
        assert!(parse_all(&[0, 0, 0, 9, 1], parse_long_string).is_err());
        assert_eq!(
            parse_all(&[0, 0, 0, 1, 0xff], parse_long_string),
            Ok(Bytes::from_static(&[0xff]))
        );
    }

    fn nested(depth: usize) -> Vec<u8> {
        // `depth` tables inside the outer one, built inside out.
        let mut inner = FieldTable::new();
        for _ in 0..depth {
            inner = FieldTable(vec![("n".into(), FieldValue::Table(inner))]);
        }
        encode(&inner).to_vec()
    }

    #[test]
    fn nesting_is_bounded() {
        assert!(parse_all(&nested(MAX_NESTING), parse_field_table).is_ok());
        let e = parse_all(&nested(MAX_NESTING + 1), parse_field_table).expect_err("too deep");
        assert!(
            e.contains("nested deeper than 128"),
            "{}",
            &e[e.len() - 80..]
        );

        // Hostile input far deeper than that, built by hand: F, length, 'n', F ...
        let levels = 100_000;
        let mut bytes = Vec::new();
        for level in 0..levels {
            let remaining = (levels - level) as u32 * 7;
            bytes.extend_from_slice(&remaining.to_be_bytes());
            bytes.extend_from_slice(&[1, b'n', b'F']);
        }
        bytes.extend_from_slice(&[0, 0, 0, 0]);
        assert!(parse_all(&bytes, parse_field_table).is_err());
        let mut arrays = Vec::new();
        for _ in 0..levels {
            arrays.extend_from_slice(&[b'A', 0xff, 0xff, 0xff, 0xff]);
        }
        assert!(parse_all(&arrays, parse_field_value).is_err());
    }

    #[test]
    fn long_short_strings_are_cut_on_a_char_boundary() {
        let s = "é".repeat(200); // 400 bytes
        let mut buf = BytesMut::new();
        encode_short_string(&s, &mut buf);
        assert_eq!(buf[0], 254);
        assert_eq!(
            parse_all(&buf, parse_short_string)
                .expect("valid")
                .chars()
                .count(),
            127
        );
    }
}
