//! The AMQP 1.0 message format, as stream clients write and read stream
//! entries, and RabbitMQ's mapping between it and AMQP 0-9-1 content.
//!
//! Owns the AMQP 1.0 type system a message needs ([`Value`]: described
//! types, the fixed-width and variable-width primitives in their small and
//! large encodings, lists, maps and arrays), the bare message's sections
//! ([`Message`]: header, delivery-annotations, message-annotations,
//! properties, application-properties, data / amqp-sequence / amqp-value
//! body, footer) and [`encode_from_091`] / [`decode_to_091`], which follow
//! RabbitMQ's `rabbit_msg_record`: 0-9-1 properties map to the properties
//! section, headers to application-properties, `type` and `app-id` to the
//! `x-basic-type` / `x-basic-app-id` application properties, priority,
//! delivery-mode and expiration to `x-basic-*` message annotations, the
//! publish's exchange and routing key to the `x-exchange` / `x-routing-key`
//! message annotations (and back to the 0-9-1 delivery's exchange and
//! routing key, [`decode_to_091_routed`]), and the body to one data section.
//!
//! Pure code: decoding never panics and refuses nesting deeper than
//! [`MAX_DEPTH`], so hostile input cannot exhaust the stack.

use bytes::{BufMut, Bytes, BytesMut};

use super::methods::BasicProperties;
use super::types::{FieldTable, FieldValue};

/// How deeply lists, maps, arrays and described values may nest.
pub const MAX_DEPTH: usize = 32;

/// The longest symbol accepted as the shared descriptor of an array's
/// elements (each element carries a copy).
const MAX_ARRAY_DESCRIPTOR: usize = 64;

/// Why AMQP 1.0 bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Amqp10Error {
    #[error("unexpected end of AMQP 1.0 data")]
    Incomplete,
    #[error("unknown AMQP 1.0 format code {0:#04x}")]
    UnknownConstructor(u8),
    #[error("invalid AMQP 1.0 data: {0}")]
    Invalid(&'static str),
    #[error("AMQP 1.0 values nested too deeply")]
    TooDeep,
}

type Result<T> = std::result::Result<T, Amqp10Error>;

/// One AMQP 1.0 value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Bool(bool),
    Ubyte(u8),
    Ushort(u16),
    Uint(u32),
    Ulong(u64),
    Byte(i8),
    Short(i16),
    Int(i32),
    Long(i64),
    Float(f32),
    Double(f64),
    Decimal32([u8; 4]),
    Decimal64([u8; 8]),
    Decimal128([u8; 16]),
    /// A UTF-32 code point (kept raw: not every u32 is a `char`).
    Char(u32),
    /// Milliseconds since the Unix epoch.
    Timestamp(i64),
    Uuid([u8; 16]),
    Binary(Bytes),
    String(String),
    Symbol(String),
    List(Vec<Value>),
    /// Key/value pairs in wire order.
    Map(Vec<(Value, Value)>),
    /// Elements all of one type.
    Array(Vec<Value>),
    /// Descriptor, value.
    Described(Box<Value>, Box<Value>),
}

impl Value {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) | Value::Symbol(s) => Some(s),
            _ => None,
        }
    }

    fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::Ubyte(v) => Some(v.into()),
            Value::Ushort(v) => Some(v.into()),
            Value::Uint(v) => Some(v.into()),
            Value::Ulong(v) => Some(v),
            Value::Byte(v) => u64::try_from(v).ok(),
            Value::Short(v) => u64::try_from(v).ok(),
            Value::Int(v) => u64::try_from(v).ok(),
            Value::Long(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => None,
        }
    }

    fn as_timestamp(&self) -> Option<i64> {
        match *self {
            Value::Timestamp(t) => Some(t),
            _ => None,
        }
    }

    /// Encode with the smallest encoding that fits.
    pub fn encode(&self, buf: &mut BytesMut) {
        match self {
            Value::Null => buf.put_u8(0x40),
            Value::Bool(true) => buf.put_u8(0x41),
            Value::Bool(false) => buf.put_u8(0x42),
            Value::Ubyte(v) => {
                buf.put_u8(0x50);
                buf.put_u8(*v);
            }
            Value::Ushort(v) => {
                buf.put_u8(0x60);
                buf.put_u16(*v);
            }
            Value::Uint(0) => buf.put_u8(0x43),
            Value::Uint(v) if *v <= 0xff => {
                buf.put_u8(0x52);
                buf.put_u8(*v as u8);
            }
            Value::Uint(v) => {
                buf.put_u8(0x70);
                buf.put_u32(*v);
            }
            Value::Ulong(0) => buf.put_u8(0x44),
            Value::Ulong(v) if *v <= 0xff => {
                buf.put_u8(0x53);
                buf.put_u8(*v as u8);
            }
            Value::Ulong(v) => {
                buf.put_u8(0x80);
                buf.put_u64(*v);
            }
            Value::Byte(v) => {
                buf.put_u8(0x51);
                buf.put_i8(*v);
            }
            Value::Short(v) => {
                buf.put_u8(0x61);
                buf.put_i16(*v);
            }
            Value::Int(v) if i8::try_from(*v).is_ok() => {
                buf.put_u8(0x54);
                buf.put_i8(*v as i8);
            }
            Value::Int(v) => {
                buf.put_u8(0x71);
                buf.put_i32(*v);
            }
            Value::Long(v) if i8::try_from(*v).is_ok() => {
                buf.put_u8(0x55);
                buf.put_i8(*v as i8);
            }
            Value::Long(v) => {
                buf.put_u8(0x81);
                buf.put_i64(*v);
            }
            Value::Float(v) => {
                buf.put_u8(0x72);
                buf.put_f32(*v);
            }
            Value::Double(v) => {
                buf.put_u8(0x82);
                buf.put_f64(*v);
            }
            Value::Decimal32(v) => {
                buf.put_u8(0x74);
                buf.put_slice(v);
            }
            Value::Decimal64(v) => {
                buf.put_u8(0x84);
                buf.put_slice(v);
            }
            Value::Decimal128(v) => {
                buf.put_u8(0x94);
                buf.put_slice(v);
            }
            Value::Char(v) => {
                buf.put_u8(0x73);
                buf.put_u32(*v);
            }
            Value::Timestamp(v) => {
                buf.put_u8(0x83);
                buf.put_i64(*v);
            }
            Value::Uuid(v) => {
                buf.put_u8(0x98);
                buf.put_slice(v);
            }
            Value::Binary(b) => put_variable(buf, 0xa0, 0xb0, b),
            Value::String(s) => put_variable(buf, 0xa1, 0xb1, s.as_bytes()),
            Value::Symbol(s) => put_variable(buf, 0xa3, 0xb3, s.as_bytes()),
            Value::List(items) if items.is_empty() => buf.put_u8(0x45),
            Value::List(items) => {
                let mut body = BytesMut::new();
                for item in items {
                    item.encode(&mut body);
                }
                put_compound(buf, 0xc0, 0xd0, items.len(), &body);
            }
            Value::Map(pairs) => {
                let mut body = BytesMut::new();
                for (k, v) in pairs {
                    k.encode(&mut body);
                    v.encode(&mut body);
                }
                put_compound(buf, 0xc1, 0xd1, pairs.len() * 2, &body);
            }
            Value::Array(items) => encode_array(buf, items),
            Value::Described(descriptor, value) => {
                buf.put_u8(0x00);
                descriptor.encode(buf);
                value.encode(buf);
            }
        }
    }
}

fn put_variable(buf: &mut BytesMut, small: u8, large: u8, data: &[u8]) {
    if data.len() <= 0xff {
        buf.put_u8(small);
        buf.put_u8(data.len() as u8);
    } else {
        buf.put_u8(large);
        buf.put_u32(data.len() as u32);
    }
    buf.put_slice(data);
}

/// A list or map: size counts the count field and the body.
fn put_compound(buf: &mut BytesMut, small: u8, large: u8, count: usize, body: &[u8]) {
    if body.len() < 0xff && count <= 0xff {
        buf.put_u8(small);
        buf.put_u8(body.len() as u8 + 1);
        buf.put_u8(count as u8);
    } else {
        buf.put_u8(large);
        buf.put_u32(body.len() as u32 + 4);
        buf.put_u32(count as u32);
    }
    buf.put_slice(body);
}

/// Arrays use one element constructor for all elements: the wide encoding of
/// the first element's type (elements of another type are skipped, since an
/// array cannot hold them).
fn encode_array(buf: &mut BytesMut, items: &[Value]) {
    let mut body = BytesMut::new();
    let mut count = 0usize;
    if let Some(first) = items.first() {
        let code = array_constructor(first);
        match first {
            Value::Described(descriptor, v) => {
                body.put_u8(0x00);
                descriptor.encode(&mut body);
                body.put_u8(array_constructor(v));
            }
            _ => body.put_u8(code),
        }
        for item in items {
            let inner = match (first, item) {
                (Value::Described(d0, v0), Value::Described(d, v))
                    if d0 == d && array_constructor(v0) == array_constructor(v) =>
                {
                    v
                }
                (Value::Described(..), _) => continue,
                (_, v) if array_constructor(v) == code => v,
                _ => continue,
            };
            encode_array_element(&mut body, inner);
            count += 1;
        }
    } else {
        body.put_u8(0x40);
    }
    let body = body.freeze();
    if body.len() < 0xff && count <= 0xff {
        buf.put_u8(0xe0);
        buf.put_u8(body.len() as u8 + 1);
        buf.put_u8(count as u8);
    } else {
        buf.put_u8(0xf0);
        buf.put_u32(body.len() as u32 + 4);
        buf.put_u32(count as u32);
    }
    buf.put_slice(&body);
}

fn array_constructor(v: &Value) -> u8 {
    match v {
        Value::Null => 0x40,
        Value::Bool(_) => 0x56,
        Value::Ubyte(_) => 0x50,
        Value::Ushort(_) => 0x60,
        Value::Uint(_) => 0x70,
        Value::Ulong(_) => 0x80,
        Value::Byte(_) => 0x51,
        Value::Short(_) => 0x61,
        Value::Int(_) => 0x71,
        Value::Long(_) => 0x81,
        Value::Float(_) => 0x72,
        Value::Double(_) => 0x82,
        Value::Decimal32(_) => 0x74,
        Value::Decimal64(_) => 0x84,
        Value::Decimal128(_) => 0x94,
        Value::Char(_) => 0x73,
        Value::Timestamp(_) => 0x83,
        Value::Uuid(_) => 0x98,
        Value::Binary(_) => 0xb0,
        Value::String(_) => 0xb1,
        Value::Symbol(_) => 0xb3,
        Value::List(_) => 0xd0,
        Value::Map(_) => 0xd1,
        Value::Array(_) => 0xf0,
        Value::Described(..) => 0x00,
    }
}

/// An element's bytes after the shared constructor (the wide encoding).
fn encode_array_element(buf: &mut BytesMut, v: &Value) {
    let mut tmp = BytesMut::new();
    match v {
        Value::Null => {}
        Value::Bool(b) => buf.put_u8(u8::from(*b)),
        Value::Uint(x) => buf.put_u32(*x),
        Value::Ulong(x) => buf.put_u64(*x),
        Value::Int(x) => buf.put_i32(*x),
        Value::Long(x) => buf.put_i64(*x),
        Value::Binary(b) => {
            buf.put_u32(b.len() as u32);
            buf.put_slice(b);
        }
        Value::String(s) | Value::Symbol(s) => {
            buf.put_u32(s.len() as u32);
            buf.put_slice(s.as_bytes());
        }
        Value::List(items) => {
            for item in items {
                item.encode(&mut tmp);
            }
            buf.put_u32(tmp.len() as u32 + 4);
            buf.put_u32(items.len() as u32);
            buf.put_slice(&tmp);
        }
        Value::Map(pairs) => {
            for (k, x) in pairs {
                k.encode(&mut tmp);
                x.encode(&mut tmp);
            }
            buf.put_u32(tmp.len() as u32 + 4);
            buf.put_u32(pairs.len() as u32 * 2);
            buf.put_slice(&tmp);
        }
        Value::Array(items) => encode_array_wide(buf, items),
        other => {
            // Fixed-width types: their normal encoding minus the constructor.
            other.encode(&mut tmp);
            buf.put_slice(tmp.get(1..).unwrap_or_default());
        }
    }
}

fn encode_array_wide(buf: &mut BytesMut, items: &[Value]) {
    let mut tmp = BytesMut::new();
    encode_array(&mut tmp, items);
    // Re-frame as the 32-bit form: size and count are 32-bit.
    match tmp.first() {
        Some(0xe0) if tmp.len() >= 3 => {
            let count = tmp[2] as u32;
            let body = &tmp[3..];
            buf.put_u32(body.len() as u32 + 4);
            buf.put_u32(count);
            buf.put_slice(body);
        }
        Some(0xf0) => buf.put_slice(&tmp[1..]),
        _ => {}
    }
}

/// A cursor over AMQP 1.0 bytes; binaries are sliced from `src` when the
/// input is shared [`Bytes`] (no copy), copied otherwise.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    src: Option<&'a Bytes>,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8], src: Option<&'a Bytes>) -> Self {
        Reader { buf, pos: 0, src }
    }

    fn at_end(&self) -> bool {
        self.pos >= self.buf.len()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).ok_or(Amqp10Error::Incomplete)?;
        let s = self.buf.get(self.pos..end).ok_or(Amqp10Error::Incomplete)?;
        self.pos = end;
        Ok(s)
    }

    fn peek(&self) -> Option<u8> {
        self.buf.get(self.pos).copied()
    }

    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn bytes(&self, s: &[u8]) -> Bytes {
        match self.src {
            Some(src) => src.slice_ref(s),
            None => Bytes::copy_from_slice(s),
        }
    }

    fn value(&mut self, depth: usize) -> Result<Value> {
        let code = self.u8()?;
        self.value_with(code, depth)
    }

    fn value_with(&mut self, code: u8, depth: usize) -> Result<Value> {
        if depth > MAX_DEPTH {
            return Err(Amqp10Error::TooDeep);
        }
        Ok(match code {
            0x00 => {
                let descriptor = self.value(depth + 1)?;
                let value = self.value(depth + 1)?;
                Value::Described(Box::new(descriptor), Box::new(value))
            }
            0x40 => Value::Null,
            0x41 => Value::Bool(true),
            0x42 => Value::Bool(false),
            0x56 => match self.u8()? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                _ => return Err(Amqp10Error::Invalid("boolean")),
            },
            0x50 => Value::Ubyte(self.u8()?),
            0x60 => Value::Ushort(self.u16()?),
            0x70 => Value::Uint(self.u32()?),
            0x52 => Value::Uint(self.u8()?.into()),
            0x43 => Value::Uint(0),
            0x80 => Value::Ulong(self.u64()?),
            0x53 => Value::Ulong(self.u8()?.into()),
            0x44 => Value::Ulong(0),
            0x51 => Value::Byte(self.u8()? as i8),
            0x61 => Value::Short(self.u16()? as i16),
            0x71 => Value::Int(self.u32()? as i32),
            0x54 => Value::Int(self.u8()? as i8 as i32),
            0x81 => Value::Long(self.u64()? as i64),
            0x55 => Value::Long(self.u8()? as i8 as i64),
            0x72 => Value::Float(f32::from_bits(self.u32()?)),
            0x82 => Value::Double(f64::from_bits(self.u64()?)),
            0x74 => Value::Decimal32(self.array()?),
            0x84 => Value::Decimal64(self.array()?),
            0x94 => Value::Decimal128(self.array()?),
            0x73 => Value::Char(self.u32()?),
            0x83 => Value::Timestamp(self.u64()? as i64),
            0x98 => Value::Uuid(self.array()?),
            0xa0 | 0xb0 => {
                let len = self.len(code == 0xa0)?;
                let s = self.take(len)?;
                Value::Binary(self.bytes(s))
            }
            0xa1 | 0xb1 | 0xa3 | 0xb3 => {
                let len = self.len(code & 0xf0 == 0xa0)?;
                let s = std::str::from_utf8(self.take(len)?)
                    .map_err(|_| Amqp10Error::Invalid("string is not UTF-8"))?;
                if code & 0x0f == 0x01 {
                    Value::String(s.to_owned())
                } else {
                    Value::Symbol(s.to_owned())
                }
            }
            0x45 => Value::List(Vec::new()),
            0xc0 | 0xd0 | 0xc1 | 0xd1 => {
                let small = code & 0xf0 == 0xc0;
                let (mut inner, count) = self.compound(small)?;
                let mut items = Vec::with_capacity(count);
                for _ in 0..count {
                    items.push(inner.value(depth + 1)?);
                }
                if code & 0x0f == 0x00 {
                    Value::List(items)
                } else {
                    if items.len() % 2 != 0 {
                        return Err(Amqp10Error::Invalid("map with an odd element count"));
                    }
                    let mut pairs = Vec::with_capacity(items.len() / 2);
                    let mut it = items.into_iter();
                    while let (Some(k), Some(v)) = (it.next(), it.next()) {
                        pairs.push((k, v));
                    }
                    Value::Map(pairs)
                }
            }
            0xe0 | 0xf0 => {
                let (mut inner, count) = self.compound(code == 0xe0)?;
                let ctor = inner.u8()?;
                let mut items = Vec::with_capacity(count);
                if ctor == 0x00 {
                    // Every element gets a copy of the descriptor, so it must
                    // be what the spec allows (a ulong or a symbol) and short.
                    let descriptor = inner.value(depth + 1)?;
                    match &descriptor {
                        Value::Ulong(_) => {}
                        Value::Symbol(s) if s.len() <= MAX_ARRAY_DESCRIPTOR => {}
                        _ => return Err(Amqp10Error::Invalid("array descriptor")),
                    }
                    let elem = inner.u8()?;
                    for _ in 0..count {
                        let v = inner.value_with(elem, depth + 1)?;
                        items.push(Value::Described(Box::new(descriptor.clone()), Box::new(v)));
                    }
                } else {
                    for _ in 0..count {
                        items.push(inner.value_with(ctor, depth + 1)?);
                    }
                }
                Value::Array(items)
            }
            other => return Err(Amqp10Error::UnknownConstructor(other)),
        })
    }

    fn len(&mut self, small: bool) -> Result<usize> {
        Ok(if small {
            self.u8()? as usize
        } else {
            self.u32()? as usize
        })
    }

    /// A list/map/array body: its own reader over `size` bytes, and the count
    /// (at most those bytes, so callers may reserve it).
    fn compound(&mut self, small: bool) -> Result<(Reader<'a>, usize)> {
        let size = self.len(small)?;
        let body = self.take(size)?;
        let width = if small { 1 } else { 4 };
        let count_bytes = body.get(..width).ok_or(Amqp10Error::Incomplete)?;
        let count = if small {
            count_bytes[0] as usize
        } else {
            u32::from_be_bytes([
                count_bytes[0],
                count_bytes[1],
                count_bytes[2],
                count_bytes[3],
            ]) as usize
        };
        let rest = &body[width..];
        // No honest encoding holds more items than bytes (a list item is at
        // least its constructor); zero-width array elements (nulls, `true`,
        // empty lists) could otherwise claim billions from a few bytes.
        if count > rest.len() {
            return Err(Amqp10Error::Invalid("item count larger than its size"));
        }
        Ok((
            Reader {
                buf: rest,
                pos: 0,
                src: self.src,
            },
            count,
        ))
    }
}

/// Section descriptors (the `amqp:*:*` codes).
pub mod section {
    pub const HEADER: u64 = 0x70;
    pub const DELIVERY_ANNOTATIONS: u64 = 0x71;
    pub const MESSAGE_ANNOTATIONS: u64 = 0x72;
    pub const PROPERTIES: u64 = 0x73;
    pub const APPLICATION_PROPERTIES: u64 = 0x74;
    pub const DATA: u64 = 0x75;
    pub const AMQP_SEQUENCE: u64 = 0x76;
    pub const AMQP_VALUE: u64 = 0x77;
    pub const FOOTER: u64 = 0x78;

    /// The numeric code of a symbolic descriptor.
    pub(super) fn from_symbol(s: &str) -> Option<u64> {
        Some(match s {
            "amqp:header:list" => HEADER,
            "amqp:delivery-annotations:map" => DELIVERY_ANNOTATIONS,
            "amqp:message-annotations:map" => MESSAGE_ANNOTATIONS,
            "amqp:properties:list" => PROPERTIES,
            "amqp:application-properties:map" => APPLICATION_PROPERTIES,
            "amqp:data:binary" => DATA,
            "amqp:amqp-sequence:list" => AMQP_SEQUENCE,
            "amqp:amqp-value:*" => AMQP_VALUE,
            "amqp:footer:map" => FOOTER,
            _ => return None,
        })
    }
}

/// The header section.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Header {
    pub durable: Option<bool>,
    pub priority: Option<u8>,
    /// Milliseconds.
    pub ttl: Option<u32>,
    pub first_acquirer: Option<bool>,
    pub delivery_count: Option<u32>,
}

/// The properties section.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Properties {
    /// ulong, uuid, binary or string.
    pub message_id: Option<Value>,
    pub user_id: Option<Bytes>,
    pub to: Option<String>,
    pub subject: Option<String>,
    pub reply_to: Option<String>,
    pub correlation_id: Option<Value>,
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    pub absolute_expiry_time: Option<i64>,
    pub creation_time: Option<i64>,
    pub group_id: Option<String>,
    pub group_sequence: Option<u32>,
    pub reply_to_group_id: Option<String>,
}

/// A message's body sections.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum Body {
    #[default]
    Empty,
    /// One or more data sections.
    Data(Vec<Bytes>),
    /// One or more amqp-sequence sections.
    Sequence(Vec<Vec<Value>>),
    /// The amqp-value section.
    Value(Value),
}

/// An AMQP 1.0 message: the sections a stream entry carries.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Message {
    pub header: Option<Header>,
    pub delivery_annotations: Option<Vec<(Value, Value)>>,
    pub message_annotations: Option<Vec<(Value, Value)>>,
    pub properties: Option<Properties>,
    pub application_properties: Option<Vec<(String, Value)>>,
    pub body: Body,
    pub footer: Option<Vec<(Value, Value)>>,
}

fn described(code: u64, value: Value) -> Value {
    Value::Described(Box::new(Value::Ulong(code)), Box::new(value))
}

/// A list of optional fields with trailing absent ones dropped.
fn field_list(fields: Vec<Option<Value>>) -> Value {
    let last = fields
        .iter()
        .rposition(Option::is_some)
        .map_or(0, |i| i + 1);
    Value::List(
        fields
            .into_iter()
            .take(last)
            .map(|f| f.unwrap_or(Value::Null))
            .collect(),
    )
}

fn some_str(v: &Option<String>, wrap: fn(String) -> Value) -> Option<Value> {
    v.clone().map(wrap)
}

impl Message {
    /// A message with one data section.
    pub fn with_data(data: impl Into<Bytes>) -> Self {
        Message {
            body: Body::Data(vec![data.into()]),
            ..Default::default()
        }
    }

    /// Encode all sections in the order the spec requires.
    pub fn encode(&self, buf: &mut BytesMut) {
        if let Some(h) = &self.header {
            described(
                section::HEADER,
                field_list(vec![
                    h.durable.map(Value::Bool),
                    h.priority.map(Value::Ubyte),
                    h.ttl.map(Value::Uint),
                    h.first_acquirer.map(Value::Bool),
                    h.delivery_count.map(Value::Uint),
                ]),
            )
            .encode(buf);
        }
        if let Some(m) = &self.delivery_annotations {
            described(section::DELIVERY_ANNOTATIONS, Value::Map(m.clone())).encode(buf);
        }
        if let Some(m) = &self.message_annotations {
            described(section::MESSAGE_ANNOTATIONS, Value::Map(m.clone())).encode(buf);
        }
        if let Some(p) = &self.properties {
            described(
                section::PROPERTIES,
                field_list(vec![
                    p.message_id.clone(),
                    p.user_id.clone().map(Value::Binary),
                    some_str(&p.to, Value::String),
                    some_str(&p.subject, Value::String),
                    some_str(&p.reply_to, Value::String),
                    p.correlation_id.clone(),
                    some_str(&p.content_type, Value::Symbol),
                    some_str(&p.content_encoding, Value::Symbol),
                    p.absolute_expiry_time.map(Value::Timestamp),
                    p.creation_time.map(Value::Timestamp),
                    some_str(&p.group_id, Value::String),
                    p.group_sequence.map(Value::Uint),
                    some_str(&p.reply_to_group_id, Value::String),
                ]),
            )
            .encode(buf);
        }
        if let Some(a) = &self.application_properties {
            let pairs = a
                .iter()
                .map(|(k, v)| (Value::String(k.clone()), v.clone()))
                .collect();
            described(section::APPLICATION_PROPERTIES, Value::Map(pairs)).encode(buf);
        }
        match &self.body {
            Body::Empty => {}
            Body::Data(parts) => {
                for part in parts {
                    // Written directly: no copy of the payload into a Value.
                    buf.put_slice(&[0x00, 0x53, section::DATA as u8]);
                    put_variable(buf, 0xa0, 0xb0, part);
                }
            }
            Body::Sequence(seqs) => {
                for s in seqs {
                    described(section::AMQP_SEQUENCE, Value::List(s.clone())).encode(buf);
                }
            }
            Body::Value(v) => described(section::AMQP_VALUE, v.clone()).encode(buf),
        }
        if let Some(m) = &self.footer {
            described(section::FOOTER, Value::Map(m.clone())).encode(buf);
        }
    }

    /// Encode to a fresh buffer.
    pub fn to_bytes(&self) -> Bytes {
        let mut buf = BytesMut::new();
        self.encode(&mut buf);
        buf.freeze()
    }

    /// Decode a message; binaries are copied out of `input`.
    pub fn decode(input: &[u8]) -> Result<Message> {
        decode_message(Reader::new(input, None))
    }

    /// Decode a message; binaries (data sections included) share `input`.
    pub fn decode_shared(input: &Bytes) -> Result<Message> {
        decode_message(Reader::new(input, Some(input)))
    }
}

fn map_pairs(v: Value) -> Result<Vec<(Value, Value)>> {
    match v {
        Value::Map(p) => Ok(p),
        Value::Null => Ok(Vec::new()),
        _ => Err(Amqp10Error::Invalid("section is not a map")),
    }
}

fn list_fields(v: Value) -> Result<Vec<Value>> {
    match v {
        Value::List(l) => Ok(l),
        _ => Err(Amqp10Error::Invalid("section is not a list")),
    }
}

fn opt(fields: &[Value], i: usize) -> Option<&Value> {
    fields.get(i).filter(|v| !matches!(v, Value::Null))
}

fn opt_string(fields: &[Value], i: usize) -> Option<String> {
    opt(fields, i).and_then(Value::as_str).map(str::to_owned)
}

fn decode_message(mut r: Reader<'_>) -> Result<Message> {
    let mut m = Message::default();
    let mut last_section = 0u64;
    while !r.at_end() {
        if r.peek() != Some(0x00) {
            return Err(Amqp10Error::Invalid("expected a described section"));
        }
        r.pos += 1;
        let code = match r.value(1)? {
            Value::Ulong(c) => c,
            Value::Symbol(s) => {
                section::from_symbol(&s).ok_or(Amqp10Error::Invalid("unknown section"))?
            }
            _ => return Err(Amqp10Error::Invalid("unknown section descriptor")),
        };
        if !(section::HEADER..=section::FOOTER).contains(&code) {
            return Err(Amqp10Error::Invalid("unknown section"));
        }
        // Sections come in order; body sections may repeat.
        let repeatable = code == section::DATA || code == section::AMQP_SEQUENCE;
        if code < last_section || (code == last_section && !repeatable) {
            return Err(Amqp10Error::Invalid("sections out of order"));
        }
        last_section = code;
        if code == section::DATA {
            // Fast path: keep the payload as a slice of the input.
            let ctor = r.u8()?;
            let data = match ctor {
                0xa0 | 0xb0 => {
                    let len = r.len(ctor == 0xa0)?;
                    let s = r.take(len)?;
                    r.bytes(s)
                }
                _ => return Err(Amqp10Error::Invalid("data section is not binary")),
            };
            match &mut m.body {
                Body::Data(parts) => parts.push(data),
                Body::Empty => m.body = Body::Data(vec![data]),
                _ => return Err(Amqp10Error::Invalid("mixed body sections")),
            }
            continue;
        }
        let value = r.value(1)?;
        match code {
            section::HEADER => {
                let f = list_fields(value)?;
                m.header = Some(Header {
                    durable: opt(&f, 0).and_then(Value::as_bool),
                    priority: opt(&f, 1).and_then(Value::as_u64).map(|p| p.min(255) as u8),
                    ttl: opt(&f, 2)
                        .and_then(Value::as_u64)
                        .map(|t| t.min(u32::MAX.into()) as u32),
                    first_acquirer: opt(&f, 3).and_then(Value::as_bool),
                    delivery_count: opt(&f, 4)
                        .and_then(Value::as_u64)
                        .map(|t| t.min(u32::MAX.into()) as u32),
                });
            }
            section::DELIVERY_ANNOTATIONS => m.delivery_annotations = Some(map_pairs(value)?),
            section::MESSAGE_ANNOTATIONS => m.message_annotations = Some(map_pairs(value)?),
            section::PROPERTIES => {
                let f = list_fields(value)?;
                m.properties = Some(Properties {
                    message_id: opt(&f, 0).cloned(),
                    user_id: opt(&f, 1).and_then(|v| match v {
                        Value::Binary(b) => Some(b.clone()),
                        Value::String(s) => Some(Bytes::from(s.clone())),
                        _ => None,
                    }),
                    to: opt_string(&f, 2),
                    subject: opt_string(&f, 3),
                    reply_to: opt_string(&f, 4),
                    correlation_id: opt(&f, 5).cloned(),
                    content_type: opt_string(&f, 6),
                    content_encoding: opt_string(&f, 7),
                    absolute_expiry_time: opt(&f, 8).and_then(Value::as_timestamp),
                    creation_time: opt(&f, 9).and_then(Value::as_timestamp),
                    group_id: opt_string(&f, 10),
                    group_sequence: opt(&f, 11)
                        .and_then(Value::as_u64)
                        .map(|t| t.min(u32::MAX.into()) as u32),
                    reply_to_group_id: opt_string(&f, 12),
                });
            }
            section::APPLICATION_PROPERTIES => {
                let pairs = map_pairs(value)?;
                let mut out = Vec::with_capacity(pairs.len());
                for (k, v) in pairs {
                    match k {
                        Value::String(s) | Value::Symbol(s) => out.push((s, v)),
                        _ => return Err(Amqp10Error::Invalid("application property key")),
                    }
                }
                m.application_properties = Some(out);
            }
            section::AMQP_SEQUENCE => {
                let items = list_fields(value)?;
                match &mut m.body {
                    Body::Sequence(seqs) => seqs.push(items),
                    Body::Empty => m.body = Body::Sequence(vec![items]),
                    _ => return Err(Amqp10Error::Invalid("mixed body sections")),
                }
            }
            section::AMQP_VALUE => {
                if !matches!(m.body, Body::Empty) {
                    return Err(Amqp10Error::Invalid("mixed body sections"));
                }
                m.body = Body::Value(value);
            }
            _ => m.footer = Some(map_pairs(value)?),
        }
    }
    Ok(m)
}

// ---- RabbitMQ's mapping to and from AMQP 0-9-1 ----

const X_BASIC_TYPE: &str = "x-basic-type";
const X_BASIC_APP_ID: &str = "x-basic-app-id";
const X_BASIC_PRIORITY: &str = "x-basic-priority";
const X_BASIC_DELIVERY_MODE: &str = "x-basic-delivery-mode";
const X_BASIC_EXPIRATION: &str = "x-basic-expiration";
/// Where an AMQP 0-9-1 publish went (message annotations, as RabbitMQ's
/// `rabbit_msg_record` writes them).
const X_EXCHANGE: &str = "x-exchange";
const X_ROUTING_KEY: &str = "x-routing-key";

/// An AMQP 0-9-1 header value as AMQP 1.0.
fn from_091(v: &FieldValue) -> Value {
    match v {
        FieldValue::Bool(b) => Value::Bool(*b),
        FieldValue::I8(x) => Value::Byte(*x),
        FieldValue::U8(x) => Value::Ubyte(*x),
        FieldValue::I16(x) => Value::Short(*x),
        FieldValue::U16(x) => Value::Ushort(*x),
        FieldValue::I32(x) => Value::Int(*x),
        FieldValue::U32(x) => Value::Uint(*x),
        FieldValue::I64(x) => Value::Long(*x),
        FieldValue::F32(x) => Value::Float(*x),
        FieldValue::F64(x) => Value::Double(*x),
        FieldValue::Decimal(scale, value) => {
            // No AMQP 1.0 equivalent kept exact: carried as its text.
            let v = *value as f64 / 10f64.powi(i32::from(*scale));
            Value::String(v.to_string())
        }
        FieldValue::LongString(b) => match std::str::from_utf8(b) {
            Ok(s) => Value::String(s.to_owned()),
            Err(_) => Value::Binary(b.clone()),
        },
        FieldValue::Array(items) => Value::List(items.iter().map(from_091).collect()),
        FieldValue::Timestamp(secs) => Value::Timestamp((*secs as i64).saturating_mul(1000)),
        FieldValue::Table(t) => Value::Map(
            t.iter()
                .map(|(k, v)| (Value::String(k.to_owned()), from_091(v)))
                .collect(),
        ),
        FieldValue::Void => Value::Null,
        FieldValue::ByteArray(b) => Value::Binary(b.clone()),
    }
}

/// An AMQP 1.0 value as an AMQP 0-9-1 header value.
fn to_091(v: &Value) -> FieldValue {
    match v {
        Value::Null => FieldValue::Void,
        Value::Bool(b) => FieldValue::Bool(*b),
        Value::Ubyte(x) => FieldValue::U8(*x),
        Value::Ushort(x) => FieldValue::U16(*x),
        Value::Uint(x) => FieldValue::U32(*x),
        Value::Ulong(x) => FieldValue::I64(i64::try_from(*x).unwrap_or(i64::MAX)),
        Value::Byte(x) => FieldValue::I8(*x),
        Value::Short(x) => FieldValue::I16(*x),
        Value::Int(x) => FieldValue::I32(*x),
        Value::Long(x) => FieldValue::I64(*x),
        Value::Float(x) => FieldValue::F32(*x),
        Value::Double(x) => FieldValue::F64(*x),
        Value::Timestamp(ms) => FieldValue::Timestamp((*ms / 1000).max(0) as u64),
        Value::String(s) | Value::Symbol(s) => FieldValue::LongString(Bytes::from(s.clone())),
        Value::Binary(b) => FieldValue::ByteArray(b.clone()),
        Value::Uuid(u) => FieldValue::string(uuid_string(u)),
        Value::Char(c) => {
            FieldValue::string(char::from_u32(*c).map(String::from).unwrap_or_default())
        }
        Value::Decimal32(b) => FieldValue::ByteArray(Bytes::copy_from_slice(b)),
        Value::Decimal64(b) => FieldValue::ByteArray(Bytes::copy_from_slice(b)),
        Value::Decimal128(b) => FieldValue::ByteArray(Bytes::copy_from_slice(b)),
        Value::List(items) | Value::Array(items) => {
            FieldValue::Array(items.iter().map(to_091).collect())
        }
        Value::Map(pairs) => FieldValue::Table(FieldTable(
            pairs
                .iter()
                .map(|(k, v)| (key_text(k), to_091(v)))
                .collect(),
        )),
        Value::Described(_, inner) => to_091(inner),
    }
}

fn key_text(k: &Value) -> String {
    match k {
        Value::String(s) | Value::Symbol(s) => s.clone(),
        Value::Ulong(x) => x.to_string(),
        other => format!("{other:?}"),
    }
}

fn uuid_string(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// A message id / correlation id as 0-9-1 text, with the type header
/// RabbitMQ adds for the non-string kinds.
fn id_to_091(v: &Value) -> (Option<String>, Option<&'static str>) {
    match v {
        Value::String(s) | Value::Symbol(s) => (Some(s.clone()), None),
        Value::Ulong(x) => (Some(x.to_string()), Some("ulong")),
        Value::Uuid(u) => (Some(uuid_string(u)), Some("uuid")),
        Value::Binary(b) => (
            Some(String::from_utf8_lossy(b).into_owned()),
            Some("binary"),
        ),
        _ => (None, None),
    }
}

/// A message annotation value [`encode_from_091_into`] writes.
enum Annotation<'a> {
    None,
    Str(&'a str),
    Ubyte(u8),
}

impl Annotation<'_> {
    /// Its encoded size.
    fn size(&self) -> usize {
        match self {
            Annotation::None => 0,
            Annotation::Str(s) => variable_size(s.len()),
            Annotation::Ubyte(_) => 2,
        }
    }
}

/// The encoded size of a string, symbol or binary of `len` bytes.
fn variable_size(len: usize) -> usize {
    if len <= 0xff {
        2 + len
    } else {
        5 + len
    }
}

/// The AMQP 1.0 encoding of AMQP 0-9-1 content published to `exchange` with
/// `routing_key`, as RabbitMQ writes an AMQP 0-9-1 publish into a stream.
pub fn encode_from_091(
    exchange: &str,
    routing_key: &str,
    props: &BasicProperties,
    body: &[u8],
) -> Bytes {
    let mut buf = BytesMut::with_capacity(body.len() + 96 + exchange.len() + routing_key.len());
    encode_from_091_into(exchange, routing_key, props, body, &mut buf);
    buf.freeze()
}

/// [`encode_from_091`] appending to `buf`.
pub fn encode_from_091_into(
    exchange: &str,
    routing_key: &str,
    props: &BasicProperties,
    body: &[u8],
    buf: &mut BytesMut,
) {
    // The message annotations, written straight into `buf` (no values, no
    // temporary buffer): where it was published, then the `x-basic-*`
    // properties, as (symbol key, value) pairs of one map.
    let expiration = props.expiration.as_deref();
    let mut pairs: [(&str, Annotation<'_>); 5] = [
        (X_EXCHANGE, Annotation::Str(exchange)),
        (X_ROUTING_KEY, Annotation::Str(routing_key)),
        (X_BASIC_PRIORITY, Annotation::None),
        (X_BASIC_DELIVERY_MODE, Annotation::None),
        (X_BASIC_EXPIRATION, Annotation::None),
    ];
    if let Some(p) = props.priority {
        pairs[2].1 = Annotation::Ubyte(p);
    }
    if let Some(d) = props.delivery_mode {
        pairs[3].1 = Annotation::Ubyte(d);
    }
    if let Some(e) = expiration {
        pairs[4].1 = Annotation::Str(e);
    }
    // The header section first (the spec's order), when it says anything:
    // durable (delivery mode 2), priority, ttl (a numeric expiration), as
    // RabbitMQ 3.13+ converts an AMQP 0-9-1 message (AMQP 1.0 readers see
    // them there; the `x-basic-*` annotations keep the 0-9-1 values exact).
    let durable = props.delivery_mode == Some(2);
    let ttl = expiration.and_then(|e| e.parse::<u32>().ok());
    let fields = if ttl.is_some() {
        3
    } else if props.priority.is_some() {
        2
    } else {
        usize::from(durable)
    };
    if fields > 0 {
        let mut h = [0u8; 10];
        let mut n = 0;
        h[n] = if durable { 0x41 } else { 0x42 };
        n += 1;
        if fields >= 2 {
            match props.priority {
                Some(p) => {
                    h[n..n + 2].copy_from_slice(&[0x50, p]);
                    n += 2;
                }
                None => {
                    h[n] = 0x40;
                    n += 1;
                }
            }
        }
        if let Some(t) = ttl {
            h[n] = 0x70;
            h[n + 1..n + 5].copy_from_slice(&t.to_be_bytes());
            n += 5;
        }
        buf.put_slice(&[
            0x00,
            0x53,
            section::HEADER as u8,
            0xc0,
            n as u8 + 1,
            fields as u8,
        ]);
        buf.put_slice(&h[..n]);
    }
    let present = || pairs.iter().filter(|(_, v)| !matches!(v, Annotation::None));
    let count = present().count() * 2;
    let size: usize = present()
        .map(|(k, v)| variable_size(k.len()) + v.size())
        .sum();
    buf.put_slice(&[0x00, 0x53, section::MESSAGE_ANNOTATIONS as u8]);
    if size < 0xff && count <= 0xff {
        buf.put_u8(0xc1);
        buf.put_u8(size as u8 + 1);
        buf.put_u8(count as u8);
    } else {
        buf.put_u8(0xd1);
        buf.put_u32(size as u32 + 4);
        buf.put_u32(count as u32);
    }
    for (k, v) in present() {
        put_variable(buf, 0xa3, 0xb3, k.as_bytes());
        match v {
            Annotation::Str(s) => put_variable(buf, 0xa1, 0xb1, s.as_bytes()),
            Annotation::Ubyte(b) => buf.put_slice(&[0x50, *b]),
            Annotation::None => {}
        }
    }
    let has_properties = props.message_id.is_some()
        || props.user_id.is_some()
        || props.reply_to.is_some()
        || props.correlation_id.is_some()
        || props.content_type.is_some()
        || props.content_encoding.is_some()
        || props.timestamp.is_some();
    let mut app = Vec::new();
    if let Some(headers) = &props.headers {
        for (k, v) in headers.iter() {
            app.push((k.to_owned(), from_091(v)));
        }
    }
    if let Some(t) = &props.kind {
        app.push((X_BASIC_TYPE.to_owned(), Value::String(t.clone())));
    }
    if let Some(a) = &props.app_id {
        app.push((X_BASIC_APP_ID.to_owned(), Value::String(a.clone())));
    }
    let m = Message {
        properties: has_properties.then(|| Properties {
            message_id: props.message_id.clone().map(Value::String),
            user_id: props.user_id.clone().map(Bytes::from),
            reply_to: props.reply_to.clone(),
            correlation_id: props.correlation_id.clone().map(Value::String),
            content_type: props.content_type.clone(),
            content_encoding: props.content_encoding.clone(),
            creation_time: props.timestamp.map(|s| {
                i64::try_from(s)
                    .unwrap_or(i64::MAX / 1000)
                    .saturating_mul(1000)
            }),
            ..Default::default()
        }),
        application_properties: (!app.is_empty()).then_some(app),
        ..Default::default()
    };
    m.encode(buf);
    // The body: one data section, written without an intermediate copy.
    buf.put_slice(&[0x00, 0x53, section::DATA as u8]);
    put_variable(buf, 0xa0, 0xb0, body);
}

/// AMQP 0-9-1 properties and body for an AMQP 1.0 stream entry, as RabbitMQ
/// delivers one to an AMQP 0-9-1 consumer. The body is the data sections
/// joined; an amqp-value holding a binary or string is that value's bytes;
/// any other body is its AMQP 1.0 encoding.
pub fn decode_to_091(bytes: &[u8]) -> std::result::Result<(BasicProperties, Bytes), Amqp10Error> {
    message_to_091(Message::decode(bytes)?)
}

/// [`decode_to_091`] over shared bytes: a single data section is returned
/// as a slice of `bytes`, without a copy.
pub fn decode_to_091_shared(
    bytes: &Bytes,
) -> std::result::Result<(BasicProperties, Bytes), Amqp10Error> {
    message_to_091(Message::decode_shared(bytes)?)
}

/// A stream entry as an AMQP 0-9-1 delivery: its content and, when it was
/// published over AMQP 0-9-1 (or carries the annotations), the exchange and
/// routing key it was published with.
#[derive(Debug, Clone, PartialEq)]
pub struct Routed091 {
    pub properties: BasicProperties,
    pub body: Bytes,
    /// The `x-exchange` message annotation.
    pub exchange: Option<String>,
    /// The `x-routing-key` message annotation.
    pub routing_key: Option<String>,
}

/// [`decode_to_091_shared`] with the publish's exchange and routing key, as
/// RabbitMQ delivers a stream entry to an AMQP 0-9-1 consumer (without them
/// it uses `""` and the stream's name).
pub fn decode_to_091_routed(bytes: &Bytes) -> std::result::Result<Routed091, Amqp10Error> {
    message_to_091_routed(Message::decode_shared(bytes)?)
}

/// RabbitMQ's AMQP 1.0 → 0-9-1 mapping of a decoded message.
pub fn message_to_091(m: Message) -> std::result::Result<(BasicProperties, Bytes), Amqp10Error> {
    message_to_091_routed(m).map(|r| (r.properties, r.body))
}

/// [`message_to_091`] with the exchange and routing key annotations.
pub fn message_to_091_routed(mut m: Message) -> std::result::Result<Routed091, Amqp10Error> {
    let mut exchange = None;
    let mut routing_key = None;
    let mut props = BasicProperties::default();
    let mut headers = FieldTable::new();
    if let Some(h) = &m.header {
        if let Some(true) = h.durable {
            props.delivery_mode = Some(2);
        }
        props.priority = h.priority;
        props.expiration = h.ttl.map(|t| t.to_string());
    }
    for (k, v) in m.message_annotations.iter_mut().flatten() {
        let Some(key) = k.as_str() else { continue };
        let text = |v: &mut Value| match std::mem::replace(v, Value::Null) {
            Value::String(s) | Value::Symbol(s) => Some(s),
            _ => None,
        };
        match key {
            X_EXCHANGE => exchange = text(v),
            X_ROUTING_KEY => routing_key = text(v),
            X_BASIC_PRIORITY => props.priority = v.as_u64().map(|p| p.min(255) as u8),
            X_BASIC_DELIVERY_MODE => props.delivery_mode = v.as_u64().map(|p| p.min(255) as u8),
            X_BASIC_EXPIRATION => props.expiration = v.as_str().map(str::to_owned),
            // Other `x-` annotations (e.g. x-stream-filter-value) reach the
            // 0-9-1 side as headers, as RabbitMQ 3.13 does.
            k if k.starts_with("x-") => headers.insert(k, to_091(v)),
            _ => {}
        }
    }
    if let Some(p) = m.properties {
        if let Some(id) = &p.message_id {
            let (text, kind) = id_to_091(id);
            props.message_id = text;
            if let Some(kind) = kind {
                headers.insert("x-message-id-type", FieldValue::string(kind));
            }
        }
        if let Some(id) = &p.correlation_id {
            let (text, kind) = id_to_091(id);
            props.correlation_id = text;
            if let Some(kind) = kind {
                headers.insert("x-correlation-id-type", FieldValue::string(kind));
            }
        }
        props.user_id = p.user_id.map(|b| String::from_utf8_lossy(&b).into_owned());
        props.reply_to = p.reply_to;
        props.content_type = p.content_type;
        props.content_encoding = p.content_encoding;
        props.timestamp = p.creation_time.map(|ms| (ms / 1000).max(0) as u64);
    }
    for (k, v) in m.application_properties.into_iter().flatten() {
        match k.as_str() {
            X_BASIC_TYPE => props.kind = v.as_str().map(str::to_owned),
            X_BASIC_APP_ID => props.app_id = v.as_str().map(str::to_owned),
            _ => headers.insert(k, to_091(&v)),
        }
    }
    if !headers.is_empty() {
        props.headers = Some(headers);
    }
    let body = match m.body {
        Body::Empty => Bytes::new(),
        Body::Data(mut parts) if parts.len() == 1 => parts.pop().unwrap_or_default(),
        Body::Data(parts) => {
            let mut b = BytesMut::with_capacity(parts.iter().map(Bytes::len).sum());
            for p in parts {
                b.put_slice(&p);
            }
            b.freeze()
        }
        Body::Value(Value::Binary(b)) => b,
        Body::Value(Value::String(s)) => Bytes::from(s),
        Body::Value(v) => {
            let mut b = BytesMut::new();
            described(section::AMQP_VALUE, v).encode(&mut b);
            b.freeze()
        }
        Body::Sequence(seqs) => {
            let mut b = BytesMut::new();
            for s in seqs {
                described(section::AMQP_SEQUENCE, Value::List(s)).encode(&mut b);
            }
            b.freeze()
        }
    };
    Ok(Routed091 {
        properties: props,
        body,
        exchange,
        routing_key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(v: Value) {
        let mut buf = BytesMut::new();
        v.encode(&mut buf);
        let mut r = Reader::new(&buf, None);
        assert_eq!(r.value(0).expect("decodes"), v, "bytes {:02x?}", &buf[..]);
        assert!(r.at_end());
    }

    #[test]
    fn primitives_round_trip() {
        for v in [
            Value::Null,
            Value::Bool(true),
            Value::Bool(false),
            Value::Ubyte(200),
            Value::Ushort(60000),
            Value::Uint(0),
            Value::Uint(7),
            Value::Uint(70000),
            Value::Ulong(0),
            Value::Ulong(9),
            Value::Ulong(u64::MAX),
            Value::Byte(-3),
            Value::Short(-300),
            Value::Int(-5),
            Value::Int(-500_000),
            Value::Long(100),
            Value::Long(-5_000_000_000),
            Value::Float(1.5),
            Value::Double(-2.25),
            Value::Decimal32([1, 2, 3, 4]),
            Value::Decimal64([1; 8]),
            Value::Decimal128([2; 16]),
            Value::Char('é' as u32),
            Value::Timestamp(1_700_000_000_000),
            Value::Uuid([7; 16]),
            Value::Binary(Bytes::from_static(b"\x00\x01")),
            Value::Binary(Bytes::from(vec![9u8; 300])),
            Value::String("héllo".into()),
            Value::String("x".repeat(300)),
            Value::Symbol("sym".into()),
            Value::List(vec![]),
            Value::List(vec![Value::Int(1), Value::String("a".into())]),
            Value::List(vec![Value::Binary(Bytes::from(vec![1u8; 300]))]),
            Value::Map(vec![(Value::Symbol("k".into()), Value::Long(1))]),
            Value::Array(vec![Value::Int(1), Value::Int(1000)]),
            Value::Array(vec![Value::String("a".into()), Value::String("b".into())]),
            Value::Array(vec![]),
            Value::Array(vec![Value::List(vec![Value::Null])]),
            Value::Array(vec![Value::Array(vec![Value::Bool(true)])]),
            Value::Described(Box::new(Value::Ulong(0x77)), Box::new(Value::Int(3))),
        ] {
            round_trip(v);
        }
    }

    #[test]
    fn small_and_large_encodings_on_bytes() {
        let mut b = BytesMut::new();
        Value::Uint(5).encode(&mut b);
        assert_eq!(&b[..], &[0x52, 5]);
        b.clear();
        Value::String("ab".into()).encode(&mut b);
        assert_eq!(&b[..], &[0xa1, 2, b'a', b'b']);
        b.clear();
        Value::List(vec![Value::Bool(true)]).encode(&mut b);
        assert_eq!(&b[..], &[0xc0, 2, 1, 0x41]);
        // Large forms decode too.
        let mut r = Reader::new(&[0xb1, 0, 0, 0, 1, b'z'], None);
        assert_eq!(r.value(0), Ok(Value::String("z".into())));
        let mut r = Reader::new(&[0xd0, 0, 0, 0, 5, 0, 0, 0, 1, 0x40], None);
        assert_eq!(r.value(0), Ok(Value::List(vec![Value::Null])));
        let mut r = Reader::new(&[0xe0, 4, 2, 0x50, 1, 2], None);
        assert_eq!(
            r.value(0),
            Ok(Value::Array(vec![Value::Ubyte(1), Value::Ubyte(2)]))
        );
        // Counts are bounded by the bytes that carry them: an array of
        // four billion nulls in a few bytes is refused, not allocated.
        let mut r = Reader::new(&[0xf0, 0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff, 0x40], None);
        assert_eq!(
            r.value(0),
            Err(Amqp10Error::Invalid("item count larger than its size"))
        );
        let mut r = Reader::new(&[0xe0, 2, 3, 0x40], None);
        assert_eq!(
            r.value(0),
            Err(Amqp10Error::Invalid("item count larger than its size"))
        );
        // A described array's descriptor is a ulong or a short symbol.
        let mut r = Reader::new(&[0xe0, 5, 1, 0x00, 0x45, 0x50, 7], None);
        assert_eq!(r.value(0), Err(Amqp10Error::Invalid("array descriptor")));
        let mut r = Reader::new(&[0xe0, 6, 1, 0x00, 0x53, 9, 0x50, 7], None);
        assert_eq!(
            r.value(0),
            Ok(Value::Array(vec![Value::Described(
                Box::new(Value::Ulong(9)),
                Box::new(Value::Ubyte(7))
            )]))
        );
        // A symbolic section descriptor.
        let mut b = BytesMut::new();
        described(section::DATA, Value::Null).encode(&mut b);
        let mut sym = BytesMut::new();
        Value::Described(
            Box::new(Value::Symbol("amqp:data:binary".into())),
            Box::new(Value::Binary(Bytes::from_static(b"hi"))),
        )
        .encode(&mut sym);
        assert_eq!(
            Message::decode(&sym).expect("decodes").body,
            Body::Data(vec![Bytes::from_static(b"hi")])
        );
    }

    /// Bytes the rabbitmq-stream-client (0.x) encoder writes for
    /// `Message::builder().body(b"message").build()`: one data section.
    #[test]
    fn stream_client_plain_body() {
        let bytes = [
            0x00, 0x53, 0x75, 0xa0, 0x07, b'm', b'e', b's', b's', b'a', b'g', b'e',
        ];
        let (props, body) = decode_to_091(&bytes).expect("decodes");
        assert_eq!(props, BasicProperties::default());
        assert_eq!(&body[..], b"message");
        let shared = Bytes::copy_from_slice(&bytes);
        let (_, body) = decode_to_091_shared(&shared).expect("decodes");
        assert_eq!(body.as_ptr(), shared[5..].as_ptr(), "no copy");
    }

    /// Properties, application properties and message annotations as the
    /// stream clients write them (symbol keys, str8 values, list8 properties).
    #[test]
    fn stream_client_sections() {
        let mut b = BytesMut::new();
        // message-annotations: {x-basic-priority: ubyte 5, x-foo: "bar"}
        b.put_slice(&[0x00, 0x53, 0x72, 0xc1]);
        let ma: &[u8] = &[
            4, 0xa3, 16, b'x', b'-', b'b', b'a', b's', b'i', b'c', b'-', b'p', b'r', b'i', b'o',
            b'r', b'i', b't', b'y', 0x50, 5, 0xa3, 5, b'x', b'-', b'f', b'o', b'o', 0xa1, 3, b'b',
            b'a', b'r',
        ];
        b.put_u8(ma.len() as u8);
        b.put_slice(ma);
        // properties: [message-id "id1", null, null, null, reply-to "r", null, content-type "ct"]
        let props: &[u8] = &[
            7, 0xa1, 3, b'i', b'd', b'1', 0x40, 0x40, 0x40, 0xa1, 1, b'r', 0x40, 0xa3, 2, b'c',
            b't',
        ];
        b.put_slice(&[0x00, 0x53, 0x73, 0xc0, props.len() as u8]);
        b.put_slice(props);
        // application-properties: {"h": int 42}
        b.put_slice(&[0x00, 0x53, 0x74, 0xc1, 6, 2, 0xa1, 1, b'h', 0x54, 42]);
        b.put_slice(&[0x00, 0x53, 0x75, 0xa0, 2, b'h', b'i']);
        let (p, body) = decode_to_091(&b).expect("decodes");
        assert_eq!(&body[..], b"hi");
        assert_eq!(p.priority, Some(5));
        assert_eq!(p.message_id.as_deref(), Some("id1"));
        assert_eq!(p.reply_to.as_deref(), Some("r"));
        assert_eq!(p.content_type.as_deref(), Some("ct"));
        let h = p.headers.expect("headers");
        assert_eq!(h.get("h"), Some(&FieldValue::I32(42)));
        assert_eq!(h.get("x-foo"), Some(&FieldValue::string("bar")));
    }

    #[test]
    fn amqp_091_round_trip() {
        let mut headers = FieldTable::new();
        headers.insert("s", FieldValue::string("v"));
        headers.insert("n", FieldValue::I64(-7));
        headers.insert("b", FieldValue::Bool(true));
        headers.insert("t", FieldValue::Timestamp(1000));
        headers.insert("x", FieldValue::ByteArray(Bytes::from_static(&[0xff])));
        headers.insert("a", FieldValue::Array(vec![FieldValue::I32(1)]));
        headers.insert(
            "tab",
            FieldValue::Table(FieldTable(vec![("k".into(), FieldValue::U8(1))])),
        );
        let props = BasicProperties {
            content_type: Some("text/plain".into()),
            content_encoding: Some("gzip".into()),
            headers: Some(headers),
            delivery_mode: Some(2),
            priority: Some(3),
            correlation_id: Some("c".into()),
            reply_to: Some("r".into()),
            expiration: Some("60000".into()),
            message_id: Some("m".into()),
            timestamp: Some(1_700_000_000),
            kind: Some("ty".into()),
            user_id: Some("guest".into()),
            app_id: Some("app".into()),
            cluster_id: None,
        };
        let bytes = encode_from_091("amq.topic", "a.b", &props, b"body");
        let back = decode_to_091_routed(&bytes).expect("decodes");
        assert_eq!(&back.body[..], b"body");
        assert_eq!(back.properties, props, "x-exchange is no header");
        assert_eq!(back.exchange.as_deref(), Some("amq.topic"));
        assert_eq!(back.routing_key.as_deref(), Some("a.b"));
        let (plain, _) = decode_to_091(&bytes).expect("decodes");
        assert_eq!(plain, props);
        // AMQP 1.0 readers see durable, priority and ttl in the header.
        let m = Message::decode(&bytes).expect("decodes");
        let header = |durable, priority, ttl| Header {
            durable: Some(durable),
            priority,
            ttl,
            ..Default::default()
        };
        assert_eq!(m.header, Some(header(true, Some(3), Some(60000))));
        for (p, want) in [(Some(7), Some(header(false, Some(7), None))), (None, None)] {
            let props = BasicProperties {
                priority: p,
                expiration: Some("soon".into()),
                ..Default::default()
            };
            let bytes = encode_from_091("", "q", &props, b"x");
            let m = Message::decode(&bytes).expect("decodes");
            assert_eq!(m.header, want);
            assert_eq!(decode_to_091(&bytes).expect("decodes").0, props);
        }
        let props = BasicProperties {
            expiration: Some("5".into()),
            ..Default::default()
        };
        let m = Message::decode(&encode_from_091("", "q", &props, b"x")).expect("decodes");
        assert_eq!(m.header, Some(header(false, None, Some(5))));
        // No properties at all: where it was published, then the data section.
        let bytes = encode_from_091("", "q", &BasicProperties::default(), b"");
        let mut expected = vec![0x00, 0x53, 0x72, 0xc1, 33, 4];
        expected.extend_from_slice(b"\xa3\x0ax-exchange\xa1\x00");
        expected.extend_from_slice(b"\xa3\x0dx-routing-key\xa1\x01q");
        expected.extend_from_slice(&[0x00, 0x53, 0x75, 0xa0, 0]);
        assert_eq!(&bytes[..], &expected[..]);
        let back = decode_to_091_routed(&bytes).expect("decodes");
        assert_eq!(
            (back.properties, back.body),
            (BasicProperties::default(), Bytes::new())
        );
        assert_eq!(
            (back.exchange.as_deref(), back.routing_key.as_deref()),
            (Some(""), Some("q"))
        );
        // As a stream client reads it: symbol keys, string values.
        let m = Message::decode(&bytes).expect("decodes");
        assert_eq!(
            m.message_annotations,
            Some(vec![
                (Value::Symbol("x-exchange".into()), Value::String("".into())),
                (
                    Value::Symbol("x-routing-key".into()),
                    Value::String("q".into())
                ),
            ])
        );
        // A message without the annotations (a stream client's): no route.
        let r = decode_to_091_routed(&Message::with_data("x").to_bytes()).expect("decodes");
        assert_eq!((r.exchange, r.routing_key), (None, None));
        // A large body uses vbin32; long names use str32.
        let big = vec![1u8; 1000];
        let long = "k".repeat(300);
        let bytes = encode_from_091("x", &long, &BasicProperties::default(), &big);
        assert_eq!(
            &bytes[bytes.len() - 1008..bytes.len() - 1000],
            &[0x00, 0x53, 0x75, 0xb0, 0, 0, 0x03, 0xe8]
        );
        let back = decode_to_091_routed(&bytes).expect("decodes");
        assert_eq!(&back.body[..], &big[..]);
        assert_eq!(back.routing_key.as_deref(), Some(long.as_str()));
    }

    #[test]
    fn message_round_trip_all_sections() {
        let m = Message {
            header: Some(Header {
                durable: Some(true),
                priority: Some(4),
                ttl: Some(1000),
                first_acquirer: None,
                delivery_count: Some(2),
            }),
            delivery_annotations: Some(vec![(Value::Symbol("d".into()), Value::Null)]),
            message_annotations: Some(vec![(Value::Symbol("x-a".into()), Value::Int(1))]),
            properties: Some(Properties {
                message_id: Some(Value::Ulong(42)),
                user_id: Some(Bytes::from_static(b"u")),
                to: Some("to".into()),
                subject: Some("s".into()),
                correlation_id: Some(Value::Uuid([1; 16])),
                group_sequence: Some(3),
                reply_to_group_id: Some("g".into()),
                absolute_expiry_time: Some(5),
                ..Default::default()
            }),
            application_properties: Some(vec![("k".into(), Value::Double(1.0))]),
            body: Body::Sequence(vec![vec![Value::Int(1)], vec![Value::Null]]),
            footer: Some(vec![(Value::Symbol("f".into()), Value::Bool(false))]),
        };
        let bytes = m.to_bytes();
        assert_eq!(Message::decode(&bytes).expect("decodes"), m);
        let (p, _) = decode_to_091(&bytes).expect("maps");
        assert_eq!(p.message_id.as_deref(), Some("42"));
        assert_eq!(p.delivery_mode, Some(2));
        assert_eq!(p.priority, Some(4));
        let h = p.headers.expect("headers");
        assert_eq!(
            h.get("x-message-id-type"),
            Some(&FieldValue::string("ulong"))
        );
        assert_eq!(
            h.get("x-correlation-id-type"),
            Some(&FieldValue::string("uuid"))
        );
        assert_eq!(h.get("x-a"), Some(&FieldValue::I32(1)));

        let v = Message {
            body: Body::Value(Value::String("text".into())),
            ..Default::default()
        };
        assert_eq!(&decode_to_091(&v.to_bytes()).expect("maps").1[..], b"text");
    }

    #[test]
    fn refuses_bad_input_without_panicking() {
        assert_eq!(Message::decode(&[]), Ok(Message::default()));
        for bad in [
            &[0x00][..],
            &[0x00, 0x53],
            &[0x00, 0x53, 0x75],
            &[0x00, 0x53, 0x75, 0xa0, 5, 1],
            &[0x00, 0x53, 0x99, 0x40],
            &[0x40],
            &[0x00, 0x53, 0x75, 0x41],
            &[0x00, 0x53, 0x77, 0xff],
            &[0x00, 0x53, 0x74, 0xc1, 2, 1, 0x40],
            &[0x00, 0x53, 0x75, 0xa0, 0, 0x00, 0x53, 0x73, 0x45],
            &[0x00, 0x53, 0x77, 0xa1, 1, 0xff],
            &[
                0x00, 0x53, 0x77, 0xd0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            ],
            &[
                0x00, 0x53, 0x77, 0xf0, 0, 0, 0, 5, 0xff, 0xff, 0xff, 0xff, 0x56,
            ],
        ] {
            assert!(Message::decode(bad).is_err(), "{bad:02x?}");
        }
        // Deep nesting is refused, not a stack overflow.
        let mut nested = Value::Null;
        for _ in 0..100 {
            nested = Value::List(vec![nested]);
        }
        let deep = Message {
            body: Body::Value(nested),
            ..Default::default()
        }
        .to_bytes();
        assert_eq!(Message::decode(&deep), Err(Amqp10Error::TooDeep));
        let mut deep = vec![0x00, 0x53, 0x77];
        deep.extend(std::iter::repeat_n(0x00, 10_000));
        assert!(Message::decode(&deep).is_err());
        // Every prefix of a valid message fails or decodes, never panics.
        let good = encode_from_091(
            "ex",
            "rk",
            &BasicProperties {
                message_id: Some("m".into()),
                priority: Some(1),
                ..Default::default()
            },
            b"xyz",
        );
        for i in 0..good.len() {
            let _ = decode_to_091(&good[..i]);
            let _ = decode_to_091_routed(&good.slice(..i));
        }
    }
}
