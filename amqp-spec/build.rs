//! Code generator for warren's AMQP wire layer.
//!
//! Reads `amqp-spec/amqp-0-9-1.json` (our own format), normalises it into a
//! model where every decision is already made (Rust names, field types, how
//! bit arguments pack into octets and with which masks, property flag bits),
//! and prints plain Rust into `$OUT_DIR/amqp_generated.rs`. The printing code
//! only formats; it makes no protocol decisions. `src/wire/methods.rs`
//! includes the result.

use serde::Deserialize;
use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::PathBuf;

const SPEC: &str = "amqp-spec/amqp-0-9-1.json";

// ---------------------------------------------------------------------------
// The JSON as written.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    #[allow(dead_code)]
    #[serde(default)]
    comment: String,
    protocol: RawProtocol,
    constants: Vec<RawConstant>,
    reply_codes: Vec<RawReplyCode>,
    classes: Vec<RawClass>,
    basic_properties: Vec<RawArg>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProtocol {
    major: u8,
    minor: u8,
    revision: u8,
    port: u16,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConstant {
    name: String,
    value: u64,
    #[serde(rename = "type")]
    ty: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReplyCode {
    name: String,
    code: u16,
    kind: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClass {
    name: String,
    id: u16,
    methods: Vec<RawMethod>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMethod {
    name: String,
    id: u16,
    #[serde(default)]
    content: bool,
    #[serde(default)]
    sync: bool,
    #[serde(default)]
    responses: Vec<String>,
    args: Vec<RawArg>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawArg {
    name: String,
    #[serde(rename = "type")]
    ty: String,
}

// ---------------------------------------------------------------------------
// The normalised model the printer works from.

#[derive(Clone, Copy, PartialEq)]
enum Ty {
    Octet,
    Short,
    Long,
    LongLong,
    Bit,
    ShortStr,
    LongStr,
    Timestamp,
    Table,
}

impl Ty {
    fn parse(s: &str, what: &str) -> Ty {
        match s {
            "octet" => Ty::Octet,
            "short" => Ty::Short,
            "long" => Ty::Long,
            "longlong" => Ty::LongLong,
            "bit" => Ty::Bit,
            "shortstr" => Ty::ShortStr,
            "longstr" => Ty::LongStr,
            "timestamp" => Ty::Timestamp,
            "table" => Ty::Table,
            other => panic!("{SPEC}: {what}: unknown type '{other}'"),
        }
    }

    fn rust(self) -> &'static str {
        match self {
            Ty::Octet => "u8",
            Ty::Short => "u16",
            Ty::Long => "u32",
            Ty::LongLong | Ty::Timestamp => "u64",
            Ty::Bit => "bool",
            Ty::ShortStr => "String",
            Ty::LongStr => "Bytes",
            Ty::Table => "FieldTable",
        }
    }

    /// Expression parsing one value from `i`.
    fn parser(self) -> &'static str {
        match self {
            Ty::Octet => "be_u8",
            Ty::Short => "be_u16",
            Ty::Long => "be_u32",
            Ty::LongLong | Ty::Timestamp => "be_u64",
            Ty::Bit => unreachable!("bits are parsed as packed octets"),
            Ty::ShortStr => "parse_short_string",
            Ty::LongStr => "parse_long_string",
            Ty::Table => "parse_field_table",
        }
    }

    /// Statement writing `value` (an expression of the field's type) to `buf`.
    fn encoder(self, value: &str) -> String {
        match self {
            Ty::Octet => format!("buf.put_u8({value});"),
            Ty::Short => format!("buf.put_u16({value});"),
            Ty::Long => format!("buf.put_u32({value});"),
            Ty::LongLong | Ty::Timestamp => format!("buf.put_u64({value});"),
            Ty::Bit => unreachable!("bits are encoded as packed octets"),
            Ty::ShortStr => format!("encode_short_string(&{value}, buf);"),
            Ty::LongStr => format!("encode_long_string(&{value}, buf);"),
            Ty::Table => format!("encode_field_table(&{value}, buf);"),
        }
    }

    /// Test-sample expression (`s` is a `Sample`).
    fn sample(self) -> &'static str {
        match self {
            Ty::Octet => "s.octet()",
            Ty::Short => "s.short()",
            Ty::Long => "s.long()",
            Ty::LongLong | Ty::Timestamp => "s.longlong()",
            Ty::Bit => "s.bit()",
            Ty::ShortStr => "s.shortstr()",
            Ty::LongStr => "s.longstr()",
            Ty::Table => "s.table()",
        }
    }
}

struct Field {
    wire_name: String,
    rust_name: String,
    ty: Ty,
}

/// How the arguments sit on the wire: one value, or up to eight bits in one octet.
enum Slot {
    Value(usize),
    /// (field index, mask) pairs, low bit first.
    Bits(Vec<(usize, u8)>),
}

struct Method {
    full_name: String,
    ident: String,
    class_id: u16,
    method_id: u16,
    content: bool,
    sync: bool,
    responses: Vec<(u16, u16, String)>,
    fields: Vec<Field>,
    slots: Vec<Slot>,
}

struct Constant {
    ident: String,
    rust_ty: &'static str,
    value: u64,
}

struct ReplyCode {
    ident: String,
    text: String,
    code: u16,
    hard: bool,
}

struct Property {
    field: Field,
    /// Bit in the 16-bit property flags word (bit 15 is the first property).
    flag: u16,
}

struct Spec {
    protocol: RawProtocol,
    constants: Vec<Constant>,
    reply_codes: Vec<ReplyCode>,
    methods: Vec<Method>,
    properties: Vec<Property>,
}

fn camel(s: &str) -> String {
    s.split('-')
        .map(|part| {
            let mut c = part.chars();
            match c.next() {
                Some(f) => f.to_ascii_uppercase().to_string() + c.as_str(),
                None => String::new(),
            }
        })
        .collect()
}

fn snake(s: &str) -> String {
    match s {
        "type" => "kind".to_string(),
        other => other.replace('-', "_"),
    }
}

fn shouting(s: &str) -> String {
    s.replace('-', "_").to_ascii_uppercase()
}

fn field(arg: &RawArg, what: &str) -> Field {
    Field {
        wire_name: arg.name.clone(),
        rust_name: snake(&arg.name),
        ty: Ty::parse(&arg.ty, &format!("{what} {}", arg.name)),
    }
}

fn pack(fields: &[Field]) -> Vec<Slot> {
    let mut slots = Vec::new();
    for (idx, f) in fields.iter().enumerate() {
        if f.ty != Ty::Bit {
            slots.push(Slot::Value(idx));
            continue;
        }
        match slots.last_mut() {
            Some(Slot::Bits(bits)) if bits.len() < 8 => {
                let mask = 1u8 << bits.len();
                bits.push((idx, mask));
            }
            _ => slots.push(Slot::Bits(vec![(idx, 1)])),
        }
    }
    slots
}

fn normalise(raw: RawSpec) -> Spec {
    let constants = raw
        .constants
        .iter()
        .map(|c| {
            let (rust_ty, max) = match c.ty.as_str() {
                "octet" => ("u8", u64::from(u8::MAX)),
                "short" => ("u16", u64::from(u16::MAX)),
                "long" => ("u32", u64::from(u32::MAX)),
                other => panic!("{SPEC}: constant {}: unsupported type '{other}'", c.name),
            };
            assert!(
                c.value <= max,
                "{SPEC}: constant {} overflows {rust_ty}",
                c.name
            );
            Constant {
                ident: shouting(&c.name),
                rust_ty,
                value: c.value,
            }
        })
        .collect();

    let mut seen_codes = HashSet::new();
    let reply_codes = raw
        .reply_codes
        .iter()
        .map(|r| {
            assert!(
                seen_codes.insert(r.code),
                "{SPEC}: reply code {} twice",
                r.code
            );
            let hard = match r.kind.as_str() {
                "hard" => true,
                "soft" | "success" => false,
                other => panic!("{SPEC}: reply code {}: unknown kind '{other}'", r.name),
            };
            ReplyCode {
                ident: shouting(&r.name),
                text: shouting(&r.name),
                code: r.code,
                hard,
            }
        })
        .collect();

    let mut methods = Vec::new();
    let mut seen_ids = HashSet::new();
    for class in &raw.classes {
        for m in &class.methods {
            assert!(
                seen_ids.insert((class.id, m.id)),
                "{SPEC}: method id {}.{} twice",
                class.id,
                m.id
            );
            let full_name = format!("{}.{}", class.name, m.name);
            let fields: Vec<Field> = m.args.iter().map(|a| field(a, &full_name)).collect();
            let mut names = HashSet::new();
            for f in &fields {
                assert!(
                    names.insert(f.rust_name.clone()),
                    "{SPEC}: {full_name}: field {} twice",
                    f.rust_name
                );
            }
            assert_eq!(
                m.sync,
                !m.responses.is_empty(),
                "{SPEC}: {full_name}: sync iff it has responses"
            );
            let responses = m
                .responses
                .iter()
                .map(|r| {
                    let target = class
                        .methods
                        .iter()
                        .find(|x| &x.name == r)
                        .unwrap_or_else(|| panic!("{SPEC}: {full_name}: unknown response '{r}'"));
                    (class.id, target.id, format!("{}.{}", class.name, r))
                })
                .collect();
            methods.push(Method {
                ident: camel(&class.name) + &camel(&m.name),
                full_name,
                class_id: class.id,
                method_id: m.id,
                content: m.content,
                sync: m.sync,
                responses,
                slots: pack(&fields),
                fields,
            });
        }
    }

    assert!(
        raw.basic_properties.len() <= 15,
        "{SPEC}: more than 15 properties need flag continuation"
    );
    let properties = raw
        .basic_properties
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let f = field(p, "basic property");
            assert!(f.ty != Ty::Bit, "{SPEC}: bit properties are not supported");
            Property {
                field: f,
                flag: 1u16 << (15 - i),
            }
        })
        .collect();

    Spec {
        protocol: raw.protocol,
        constants,
        reply_codes,
        methods,
        properties,
    }
}

// ---------------------------------------------------------------------------
// Printing.

fn print(spec: &Spec) -> String {
    let mut o = String::new();
    let p = &spec.protocol;
    let _ = writeln!(
        o,
        "// @generated by amqp-spec/build.rs from {SPEC}. Do not edit.\n"
    );
    let _ = writeln!(o, "use crate::wire::error::WireError;");
    let _ = writeln!(o, "use crate::wire::types::*;");
    let _ = writeln!(o, "use bytes::{{BufMut, Bytes, BytesMut}};");
    let _ = writeln!(o, "use nom::combinator::cond;");
    let _ = writeln!(o, "use nom::error::context;");
    let _ = writeln!(
        o,
        "use nom::number::complete::{{be_u16, be_u32, be_u64, be_u8}};\n"
    );
    let _ = writeln!(
        o,
        "/// Protocol version and default port: AMQP {}-{}-{}, port {}.",
        p.major, p.minor, p.revision, p.port
    );
    let _ = writeln!(
        o,
        "pub const PROTOCOL_VERSION: (u8, u8, u8) = ({}, {}, {});",
        p.major, p.minor, p.revision
    );
    let _ = writeln!(o, "/// The IANA port for AMQP.");
    let _ = writeln!(o, "pub const DEFAULT_PORT: u16 = {};\n", p.port);

    print_constants(spec, &mut o);
    print_reply_codes(spec, &mut o);
    for m in &spec.methods {
        print_method_struct(m, &mut o);
    }
    print_method_enum(spec, &mut o);
    print_properties(spec, &mut o);
    print_samples(spec, &mut o);
    o
}

fn print_constants(spec: &Spec, o: &mut String) {
    let _ = writeln!(o, "/// Frame types, frame end and the minimum frame size.");
    let _ = writeln!(o, "pub mod constants {{");
    for c in &spec.constants {
        let _ = writeln!(o, "    pub const {}: {} = {};", c.ident, c.rust_ty, c.value);
    }
    let _ = writeln!(o, "}}\n");
}

fn print_reply_codes(spec: &Spec, o: &mut String) {
    let _ = writeln!(
        o,
        "/// AMQP reply codes (for `connection.close`, `channel.close`, `basic.return`)."
    );
    let _ = writeln!(o, "pub mod reply_code {{");
    for r in &spec.reply_codes {
        let _ = writeln!(o, "    pub const {}: u16 = {};", r.ident, r.code);
    }
    let _ = writeln!(o);
    let _ = writeln!(
        o,
        "    /// RabbitMQ's name for a reply code (`404` -> `\"NOT_FOUND\"`), or `\"UNKNOWN\"`."
    );
    let _ = writeln!(o, "    pub fn reply_text(code: u16) -> &'static str {{");
    let _ = writeln!(o, "        match code {{");
    for r in &spec.reply_codes {
        let _ = writeln!(o, "            {} => \"{}\",", r.code, r.text);
    }
    let _ = writeln!(o, "            _ => \"UNKNOWN\",");
    let _ = writeln!(o, "        }}");
    let _ = writeln!(o, "    }}\n");
    let _ = writeln!(
        o,
        "    /// True for codes that close the connection (hard errors)."
    );
    let _ = writeln!(o, "    pub fn is_hard_error(code: u16) -> bool {{");
    let hard: Vec<String> = spec
        .reply_codes
        .iter()
        .filter(|r| r.hard)
        .map(|r| r.code.to_string())
        .collect();
    let _ = writeln!(o, "        matches!(code, {})", hard.join(" | "));
    let _ = writeln!(o, "    }}");
    let _ = writeln!(o, "}}\n");
}

fn print_method_struct(m: &Method, o: &mut String) {
    let mut doc = format!("`{}` ({}.{})", m.full_name, m.class_id, m.method_id);
    if m.content {
        doc.push_str("; carries content");
    }
    if m.sync {
        let names: Vec<String> = m.responses.iter().map(|r| format!("`{}`", r.2)).collect();
        let _ = write!(doc, "; synchronous, answered by {}", names.join(" or "));
    }
    let _ = writeln!(o, "/// {doc}.");
    let _ = writeln!(o, "#[derive(Debug, Clone, PartialEq, Default)]");
    if m.fields.is_empty() {
        let _ = writeln!(o, "pub struct {} {{}}\n", m.ident);
    } else {
        let _ = writeln!(o, "pub struct {} {{", m.ident);
        for f in &m.fields {
            let _ = writeln!(o, "    /// `{}`", f.wire_name);
            let _ = writeln!(o, "    pub {}: {},", f.rust_name, f.ty.rust());
        }
        let _ = writeln!(o, "}}\n");
    }

    let _ = writeln!(o, "impl {} {{", m.ident);
    let _ = writeln!(o, "    pub const CLASS_ID: u16 = {};", m.class_id);
    let _ = writeln!(o, "    pub const METHOD_ID: u16 = {};", m.method_id);
    let _ = writeln!(
        o,
        "    pub const NAME: &'static str = \"{}\";\n",
        m.full_name
    );

    // Encoder.
    let _ = writeln!(
        o,
        "    /// Append the arguments (without class and method id) to `buf`."
    );
    let buf = if m.slots.is_empty() { "_buf" } else { "buf" };
    let _ = writeln!(o, "    pub fn encode_args(&self, {buf}: &mut BytesMut) {{");
    for slot in &m.slots {
        match slot {
            Slot::Value(idx) => {
                let f = &m.fields[*idx];
                let _ = writeln!(
                    o,
                    "        {}",
                    f.ty.encoder(&format!("self.{}", f.rust_name))
                );
            }
            Slot::Bits(bits) => {
                let _ = writeln!(o, "        let mut bits = 0u8;");
                for (idx, mask) in bits {
                    let _ = writeln!(
                        o,
                        "        if self.{} {{\n            bits |= {mask:#04x};\n        }}",
                        m.fields[*idx].rust_name
                    );
                }
                let _ = writeln!(o, "        buf.put_u8(bits);");
            }
        }
    }
    let _ = writeln!(o, "    }}\n");

    // Parser.
    let _ = writeln!(
        o,
        "    /// Parse the arguments (without class and method id); trailing bytes are left over."
    );
    let _ = writeln!(o, "    pub fn parse_args(i: &[u8]) -> PResult<'_, Self> {{");
    for (n, slot) in m.slots.iter().enumerate() {
        match slot {
            Slot::Value(idx) => {
                let f = &m.fields[*idx];
                let _ = writeln!(
                    o,
                    "        let (i, {}) = context(\"{}\", {})(i)?;",
                    f.rust_name,
                    f.wire_name,
                    f.ty.parser()
                );
            }
            Slot::Bits(bits) => {
                let names: Vec<&str> = bits
                    .iter()
                    .map(|(idx, _)| m.fields[*idx].wire_name.as_str())
                    .collect();
                let _ = writeln!(
                    o,
                    "        let (i, bits{n}) = context(\"{}\", be_u8)(i)?;",
                    names.join(", ")
                );
                for (idx, mask) in bits {
                    let _ = writeln!(
                        o,
                        "        let {} = bits{n} & {mask:#04x} != 0;",
                        m.fields[*idx].rust_name
                    );
                }
            }
        }
    }
    let names: Vec<&str> = m.fields.iter().map(|f| f.rust_name.as_str()).collect();
    if names.is_empty() {
        let _ = writeln!(o, "        Ok((i, Self {{}}))");
    } else {
        let _ = writeln!(o, "        Ok((i, Self {{ {} }}))", names.join(", "));
    }
    let _ = writeln!(o, "    }}");
    let _ = writeln!(o, "}}\n");

    let _ = writeln!(o, "impl From<{0}> for Method {{\n    fn from(m: {0}) -> Method {{\n        Method::{0}(m)\n    }}\n}}\n", m.ident);
}

fn print_method_enum(spec: &Spec, o: &mut String) {
    let _ = writeln!(o, "/// Every AMQP method, as carried by a method frame.");
    let _ = writeln!(o, "#[derive(Debug, Clone, PartialEq)]");
    let _ = writeln!(o, "pub enum Method {{");
    for m in &spec.methods {
        let _ = writeln!(o, "    /// `{}`", m.full_name);
        let _ = writeln!(o, "    {0}({0}),", m.ident);
    }
    let _ = writeln!(o, "}}\n");

    let _ = writeln!(o, "impl Method {{");
    for (fname, doc, ty, get) in [
        ("class_id", "The class id (`basic` is 60).", "u16", 0),
        ("method_id", "The method id within the class.", "u16", 1),
        (
            "name",
            "The dotted name, e.g. `\"basic.publish\"`.",
            "&'static str",
            2,
        ),
    ] {
        let _ = writeln!(o, "    /// {doc}");
        let _ = writeln!(o, "    pub fn {fname}(&self) -> {ty} {{");
        let _ = writeln!(o, "        match self {{");
        for m in &spec.methods {
            let v = match get {
                0 => m.class_id.to_string(),
                1 => m.method_id.to_string(),
                _ => format!("\"{}\"", m.full_name),
            };
            let _ = writeln!(o, "            Method::{}(_) => {v},", m.ident);
        }
        let _ = writeln!(o, "        }}");
        let _ = writeln!(o, "    }}\n");
    }

    for (fname, doc, pick) in [
        (
            "has_content",
            "True if a content header and body frames follow this method.",
            0,
        ),
        (
            "is_synchronous",
            "True if the peer must answer this method (see [`Method::responses`]).",
            1,
        ),
    ] {
        let list: Vec<String> = spec
            .methods
            .iter()
            .filter(|m| if pick == 0 { m.content } else { m.sync })
            .map(|m| format!("Method::{}(_)", m.ident))
            .collect();
        let _ = writeln!(o, "    /// {doc}");
        let _ = writeln!(o, "    pub fn {fname}(&self) -> bool {{");
        let _ = writeln!(
            o,
            "        matches!(\n            self,\n            {}\n        )",
            list.join("\n                | ")
        );
        let _ = writeln!(o, "    }}\n");
    }

    let _ = writeln!(
        o,
        "    /// The (class id, method id) of each method that may answer this one."
    );
    let _ = writeln!(o, "    pub fn responses(&self) -> &'static [(u16, u16)] {{");
    let _ = writeln!(o, "        match self {{");
    for m in &spec.methods {
        let ids: Vec<String> = m
            .responses
            .iter()
            .map(|r| format!("({}, {})", r.0, r.1))
            .collect();
        let _ = writeln!(
            o,
            "            Method::{}(_) => &[{}],",
            m.ident,
            ids.join(", ")
        );
    }
    let _ = writeln!(o, "        }}");
    let _ = writeln!(o, "    }}\n");

    let _ = writeln!(
        o,
        "    /// Append class id, method id and arguments (a method frame's payload)."
    );
    let _ = writeln!(o, "    pub fn encode(&self, buf: &mut BytesMut) {{");
    let _ = writeln!(o, "        buf.put_u16(self.class_id());");
    let _ = writeln!(o, "        buf.put_u16(self.method_id());");
    let _ = writeln!(o, "        match self {{");
    for m in &spec.methods {
        let _ = writeln!(
            o,
            "            Method::{}(m) => m.encode_args(buf),",
            m.ident
        );
    }
    let _ = writeln!(o, "        }}");
    let _ = writeln!(o, "    }}\n");

    let _ = writeln!(
        o,
        "    /// Decode a method frame's payload (class id, method id, arguments)."
    );
    let _ = writeln!(o, "    /// All of `payload` must be used.");
    let _ = writeln!(
        o,
        "    pub fn decode(payload: &[u8]) -> Result<Method, WireError> {{"
    );
    let _ = writeln!(
        o,
        "        let (class_id, method_id, args) = match payload {{"
    );
    let _ = writeln!(o, "            [c0, c1, m0, m1, args @ ..] => (u16::from_be_bytes([*c0, *c1]), u16::from_be_bytes([*m0, *m1]), args),");
    let _ = writeln!(o, "            _ => {{");
    let _ = writeln!(o, "                return Err(WireError::Syntax {{");
    let _ = writeln!(o, "                    class_id: 0,");
    let _ = writeln!(o, "                    method_id: 0,");
    let _ = writeln!(o, "                    detail: format!(\"method frame payload of {{}} bytes has no class and method id\", payload.len()),");
    let _ = writeln!(o, "                }})");
    let _ = writeln!(o, "            }}");
    let _ = writeln!(o, "        }};");
    let _ = writeln!(o, "        let parsed = match (class_id, method_id) {{");
    for m in &spec.methods {
        let _ = writeln!(
            o,
            "            ({}, {}) => parse_all(args, {}::parse_args).map(Method::{}),",
            m.class_id, m.method_id, m.ident, m.ident
        );
    }
    let _ = writeln!(
        o,
        "            _ => return Err(WireError::UnknownMethod {{ class_id, method_id }}),"
    );
    let _ = writeln!(o, "        }};");
    let _ = writeln!(
        o,
        "        parsed.map_err(|detail| WireError::Syntax {{ class_id, method_id, detail }})"
    );
    let _ = writeln!(o, "    }}");
    let _ = writeln!(o, "}}\n");

    let _ = writeln!(
        o,
        "/// The dotted name of a method id pair, if it is one we know."
    );
    let _ = writeln!(
        o,
        "pub fn method_name(class_id: u16, method_id: u16) -> Option<&'static str> {{"
    );
    let _ = writeln!(o, "    match (class_id, method_id) {{");
    for m in &spec.methods {
        let _ = writeln!(
            o,
            "        ({}, {}) => Some(\"{}\"),",
            m.class_id, m.method_id, m.full_name
        );
    }
    let _ = writeln!(o, "        _ => None,");
    let _ = writeln!(o, "    }}");
    let _ = writeln!(o, "}}\n");
}

fn print_properties(spec: &Spec, o: &mut String) {
    let _ = writeln!(
        o,
        "/// The `basic` class content properties; `None` is an absent property."
    );
    let _ = writeln!(o, "#[derive(Debug, Clone, PartialEq, Default)]");
    let _ = writeln!(o, "pub struct BasicProperties {{");
    for p in &spec.properties {
        let _ = writeln!(o, "    /// `{}` (flag {:#06x})", p.field.wire_name, p.flag);
        let _ = writeln!(
            o,
            "    pub {}: Option<{}>,",
            p.field.rust_name,
            p.field.ty.rust()
        );
    }
    let _ = writeln!(o, "}}\n");

    let _ = writeln!(o, "impl BasicProperties {{");
    let _ = writeln!(
        o,
        "    /// The property flags word: bit 15 is the first property."
    );
    let _ = writeln!(o, "    pub fn flags(&self) -> u16 {{");
    let _ = writeln!(o, "        let mut flags = 0u16;");
    for p in &spec.properties {
        let _ = writeln!(
            o,
            "        if self.{}.is_some() {{\n            flags |= {:#06x};\n        }}",
            p.field.rust_name, p.flag
        );
    }
    let _ = writeln!(o, "        flags");
    let _ = writeln!(o, "    }}\n");

    let _ = writeln!(
        o,
        "    /// Append the property flags and then each present property."
    );
    let _ = writeln!(o, "    pub fn encode(&self, buf: &mut BytesMut) {{");
    let _ = writeln!(o, "        buf.put_u16(self.flags());");
    for p in &spec.properties {
        let _ = writeln!(
            o,
            "        if let Some(v) = &self.{} {{\n            {}\n        }}",
            p.field.rust_name,
            p.field.ty.encoder("*v").replace("&*v", "v")
        );
    }
    let _ = writeln!(o, "    }}\n");

    let _ = writeln!(
        o,
        "    /// Parse property flags and the properties they announce."
    );
    let _ = writeln!(
        o,
        "    /// A set continuation bit (bit 0) is refused: `basic` has only {} properties.",
        spec.properties.len()
    );
    let _ = writeln!(o, "    pub fn parse(i: &[u8]) -> PResult<'_, Self> {{");
    let _ = writeln!(
        o,
        "        let (i, flags) = context(\"property flags\", be_u16)(i)?;"
    );
    let _ = writeln!(o, "        if flags & 0x0001 != 0 {{");
    let _ = writeln!(o, "            return Err(nom::Err::Failure(ParseError::new(\"property flags continuation bit set, but basic has only {} properties\")));", spec.properties.len());
    let _ = writeln!(o, "        }}");
    for p in &spec.properties {
        let _ = writeln!(
            o,
            "        let (i, {}) = cond(flags & {:#06x} != 0, context(\"{}\", {}))(i)?;",
            p.field.rust_name,
            p.flag,
            p.field.wire_name,
            p.field.ty.parser()
        );
    }
    let names: Vec<&str> = spec
        .properties
        .iter()
        .map(|p| p.field.rust_name.as_str())
        .collect();
    let _ = writeln!(o, "        Ok((i, Self {{ {} }}))", names.join(", "));
    let _ = writeln!(o, "    }}\n");

    let _ = writeln!(
        o,
        "    /// Decode flags and properties; all of `input` must be used."
    );
    let _ = writeln!(
        o,
        "    pub fn decode(input: &[u8]) -> Result<BasicProperties, WireError> {{"
    );
    let _ = writeln!(
        o,
        "        parse_all(input, Self::parse).map_err(WireError::BadContentHeader)"
    );
    let _ = writeln!(o, "    }}");
    let _ = writeln!(o, "}}\n");
}

fn print_samples(spec: &Spec, o: &mut String) {
    let _ = writeln!(
        o,
        "/// One value of every method, filled from `s` (for round-trip tests)."
    );
    let _ = writeln!(o, "#[cfg(test)]");
    let _ = writeln!(
        o,
        "pub(crate) fn sample_methods(s: &mut Sample) -> Vec<Method> {{"
    );
    let _ = writeln!(o, "    vec![");
    for m in &spec.methods {
        if m.fields.is_empty() {
            let _ = writeln!(o, "        Method::{}({0} {{}}),", m.ident);
            continue;
        }
        let _ = writeln!(o, "        Method::{}({0} {{", m.ident);
        for f in &m.fields {
            let _ = writeln!(o, "            {}: {},", f.rust_name, f.ty.sample());
        }
        let _ = writeln!(o, "        }}),");
    }
    let _ = writeln!(o, "    ]");
    let _ = writeln!(o, "}}\n");

    let _ = writeln!(
        o,
        "/// Properties with every field set, filled from `s` (for round-trip tests)."
    );
    let _ = writeln!(o, "#[cfg(test)]");
    let _ = writeln!(
        o,
        "pub(crate) fn sample_properties(s: &mut Sample) -> BasicProperties {{"
    );
    let _ = writeln!(o, "    BasicProperties {{");
    for p in &spec.properties {
        let _ = writeln!(
            o,
            "        {}: Some({}),",
            p.field.rust_name,
            p.field.ty.sample()
        );
    }
    let _ = writeln!(o, "    }}");
    let _ = writeln!(o, "}}");
}

fn main() {
    println!("cargo:rerun-if-changed={SPEC}");
    println!("cargo:rerun-if-changed=amqp-spec/build.rs");
    let text = std::fs::read_to_string(SPEC).unwrap_or_else(|e| panic!("reading {SPEC}: {e}"));
    let raw: RawSpec =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("parsing {SPEC}: {e}"));
    let spec = normalise(raw);
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR is set by cargo"))
        .join("amqp_generated.rs");
    std::fs::write(&out, print(&spec)).unwrap_or_else(|e| panic!("writing {}: {e}", out.display()));
}
