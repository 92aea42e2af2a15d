//! The headers exchange: a message matches a binding by comparing its headers with the binding's arguments.
//!
//! Owns [`HeadersRouter`] and the `x-match` rules, following RabbitMQ's
//! `rabbit_exchange_type_headers`:
//! - `x-match` is `all` (the default when absent), `any`, `all-with-x` or
//!   `any-with-x`. [`validate`] refuses other values and non-long-string types;
//!   an unvalidated odd value counts as `all`, as RabbitMQ's legacy fallback does.
//! - The `x-match` argument itself never takes part in matching. Other arguments
//!   whose name starts with `x-` take part only under the `-with-x` variants.
//! - An argument of type void matches when the header is present, whatever its value.
//!   Otherwise the header must be present and equal (see [`values_equal`]).
//! - `all` with no arguments left matches every message; `any` matches none.
//!   A message without headers is an empty table.
//!
//! Like RabbitMQ, matching walks the binding arguments and the message headers
//! both sorted by name (stable), once per binding. So for duplicate names the
//! n-th argument named `k` is compared with the n-th header named `k`.
//! The routing key plays no part.

use super::{canonical, Binding, BindingIndex, Collector, Destination, Router};
use crate::wire::types::{FieldTable, FieldValue};

/// Routing table of a headers exchange.
#[derive(Debug, Default)]
pub struct HeadersRouter {
    entries: Vec<Entry>,
    index: BindingIndex,
}

/// One binding with its arguments turned into a match rule.
#[derive(Debug)]
struct Entry {
    binding: Binding,
    rule: Rule,
}

#[derive(Debug, PartialEq)]
struct Rule {
    /// `all` / `all-with-x` rather than `any` / `any-with-x`.
    all: bool,
    /// The arguments that take part, sorted by name.
    pattern: Vec<(String, FieldValue)>,
}

impl Rule {
    /// The rule for these binding arguments, which must be sorted by name.
    fn new(arguments: &FieldTable) -> Rule {
        let (all, with_x) = match arguments.get("x-match").and_then(FieldValue::as_str) {
            Some("any") => (false, false),
            Some("all-with-x") => (true, true),
            Some("any-with-x") => (false, true),
            _ => (true, false),
        };
        let pattern = arguments
            .iter()
            .filter(|(name, _)| *name != "x-match" && (with_x || !name.starts_with("x-")))
            .map(|(name, value)| (name.to_owned(), value.clone()))
            .collect();
        Rule { all, pattern }
    }

    /// Whether headers `data` (sorted by name) satisfy this rule.
    fn matches(&self, data: &[(&str, &FieldValue)]) -> bool {
        let mut pattern = self.pattern.iter().peekable();
        let mut data = data.iter().peekable();
        let mut any_matched = false;
        while let Some((name, want)) = pattern.peek() {
            let Some((header, got)) = data.peek() else {
                // Arguments left and no headers: `all` fails, `any` stands.
                return !self.all && any_matched;
            };
            match name.as_str().cmp(header) {
                std::cmp::Ordering::Greater => {
                    data.next();
                    continue;
                }
                std::cmp::Ordering::Less => {
                    if self.all {
                        return false;
                    }
                    pattern.next();
                    continue;
                }
                std::cmp::Ordering::Equal => {}
            }
            if matches!(want, FieldValue::Void) || values_equal(want, got) {
                if !self.all {
                    return true;
                }
                any_matched = true;
            } else if self.all {
                return false;
            }
            pattern.next();
            data.next();
        }
        if self.all {
            true
        } else {
            any_matched
        }
    }
}

/// Whether a header value equals a binding argument, as Erlang's `==` on the
/// decoded values that RabbitMQ compares (the type tags themselves are not
/// compared):
/// - numbers compare by numeric value across all integer types, timestamps and
///   floats (`I32(1)`, `I64(1)`, `Timestamp(1)`, `F64(1.0)` are all equal);
/// - long strings and byte arrays compare by their bytes;
/// - booleans with booleans, decimals by (scale, value);
/// - arrays and tables compare exactly, nested type tags included (RabbitMQ
///   keeps them inside the decoded value), tables in their wire order.
fn values_equal(a: &FieldValue, b: &FieldValue) -> bool {
    use FieldValue as V;
    match (number(a), number(b)) {
        (Some(x), Some(y)) => return x.equals(y),
        (Some(_), None) | (None, Some(_)) => return false,
        (None, None) => {}
    }
    match (a, b) {
        (V::LongString(x) | V::ByteArray(x), V::LongString(y) | V::ByteArray(y)) => x == y,
        (V::Bool(x), V::Bool(y)) => x == y,
        (V::Decimal(s1, v1), V::Decimal(s2, v2)) => s1 == s2 && v1 == v2,
        (V::Array(x), V::Array(y)) => x == y,
        (V::Table(x), V::Table(y)) => x == y,
        (V::Void, V::Void) => true,
        _ => false,
    }
}

#[derive(Clone, Copy)]
enum Number {
    Int(i128),
    Float(f64),
}

impl Number {
    fn equals(self, other: Number) -> bool {
        match (self, other) {
            (Number::Int(x), Number::Int(y)) => x == y,
            (Number::Float(x), Number::Float(y)) => x == y,
            (Number::Int(i), Number::Float(f)) | (Number::Float(f), Number::Int(i)) => {
                // Exact comparison, as Erlang does between integers and floats.
                f.is_finite() && f.fract() == 0.0 && f.abs() < 1e38 && f as i128 == i
            }
        }
    }
}

fn number(v: &FieldValue) -> Option<Number> {
    use FieldValue as V;
    Some(match *v {
        V::I8(x) => Number::Int(x.into()),
        V::U8(x) => Number::Int(x.into()),
        V::I16(x) => Number::Int(x.into()),
        V::U16(x) => Number::Int(x.into()),
        V::I32(x) => Number::Int(x.into()),
        V::U32(x) => Number::Int(x.into()),
        V::I64(x) => Number::Int(x.into()),
        V::Timestamp(x) => Number::Int(x.into()),
        V::F32(x) => Number::Float(x.into()),
        V::F64(x) => Number::Float(x),
        _ => return None,
    })
}

/// Check `x-match` as RabbitMQ's `validate_binding` does.
pub(super) fn validate(arguments: &FieldTable) -> Result<(), String> {
    match arguments.get("x-match") {
        None => Ok(()),
        Some(FieldValue::LongString(value)) => match &value[..] {
            b"all" | b"any" | b"all-with-x" | b"any-with-x" => Ok(()),
            other => Err(format!(
                "Invalid x-match field value <<\"{}\">>; expected all, any, all-with-x, or any-with-x",
                String::from_utf8_lossy(other).escape_debug()
            )),
        },
        Some(other) => Err(format!(
            "Invalid x-match field type {} (value {}); expected longstr",
            other.rabbit_type_name(),
            erlang_value(other)
        )),
    }
}

/// A short rendering of a value in the style of Erlang's `~tp`, for error messages.
fn erlang_value(v: &FieldValue) -> String {
    use FieldValue as V;
    match v {
        V::Bool(b) => b.to_string(),
        V::F32(f) => format!("{f:?}"),
        V::F64(f) => format!("{f:?}"),
        V::Decimal(scale, value) => format!("{{{scale},{value}}}"),
        V::LongString(b) | V::ByteArray(b) => {
            format!("<<\"{}\">>", String::from_utf8_lossy(b).escape_debug())
        }
        V::Void => "undefined".to_owned(),
        V::Array(_) | V::Table(_) => format!("{v:?}"),
        _ => match number(v) {
            Some(Number::Int(i)) => i.to_string(),
            _ => format!("{v:?}"),
        },
    }
}

/// A message's headers sorted by name (stable), as [`Rule::matches`] takes them;
/// no headers is an empty table.
fn sorted(headers: Option<&FieldTable>) -> Vec<(&str, &FieldValue)> {
    let mut data: Vec<(&str, &FieldValue)> = headers.map_or_else(Vec::new, |h| h.iter().collect());
    data.sort_by(|a, b| a.0.cmp(b.0));
    data
}

impl Router for HeadersRouter {
    fn bind(&mut self, binding: Binding) -> bool {
        let binding = canonical(binding);
        if self.index.insert(&binding).is_none() {
            return false;
        }
        let rule = Rule::new(&binding.arguments);
        self.entries.push(Entry { binding, rule });
        true
    }

    fn unbind(&mut self, binding: &Binding) -> bool {
        let binding = canonical(binding.clone());
        if self.index.remove(&binding).is_none() {
            return false;
        }
        if let Some(pos) = self.entries.iter().position(|e| e.binding == binding) {
            self.entries.swap_remove(pos);
        }
        true
    }

    fn route(&self, _routing_key: &str, headers: Option<&FieldTable>, out: &mut Vec<Destination>) {
        if self.entries.is_empty() {
            return;
        }
        let data = sorted(headers);
        let mut collector = Collector::new(out);
        for entry in &self.entries {
            if entry.rule.matches(&data) {
                collector.push(&entry.binding.destination);
            }
        }
    }

    fn matching(&self, _routing_key: &str, headers: Option<&FieldTable>) -> Vec<Binding> {
        let data = sorted(headers);
        let mut out: Vec<Binding> = self
            .entries
            .iter()
            .filter(|e| e.rule.matches(&data))
            .map(|e| e.binding.clone())
            .collect();
        out.sort_by(|a, b| a.destination.cmp(&b.destination));
        out
    }

    fn bindings(&self) -> Vec<Binding> {
        self.index.bindings()
    }

    fn remove_destination(&mut self, destination: &Destination) -> usize {
        let removed = self.index.remove_destination(destination).len();
        if removed > 0 {
            self.entries
                .retain(|e| e.binding.destination != *destination);
        }
        removed
    }

    fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    fn has_destination(&self, destination: &Destination) -> bool {
        self.index.contains_destination(destination)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn q(name: &str) -> Destination {
        Destination::Queue(name.into())
    }

    fn s(v: &str) -> FieldValue {
        FieldValue::string(v)
    }

    fn table(entries: &[(&str, FieldValue)]) -> FieldTable {
        FieldTable(
            entries
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
        )
    }

    fn b(dest: &str, args: &[(&str, FieldValue)]) -> Binding {
        Binding {
            destination: q(dest),
            routing_key: String::new(),
            arguments: table(args),
        }
    }

    /// Whether a single binding with `args` matches a message with `headers`.
    fn matches(args: &[(&str, FieldValue)], headers: Option<&[(&str, FieldValue)]>) -> bool {
        let mut r = HeadersRouter::default();
        assert!(r.bind(b("q", args)));
        let headers = headers.map(table);
        let mut out = Vec::new();
        r.route("ignored", headers.as_ref(), &mut out);
        !out.is_empty()
    }

    #[test]
    fn x_match_all() {
        let args = [
            ("x-match", s("all")),
            ("a", s("1")),
            ("b", FieldValue::I32(2)),
        ];
        assert!(matches(
            &args,
            Some(&[("a", s("1")), ("b", FieldValue::I32(2))])
        ));
        assert!(matches(
            &args,
            Some(&[("z", s("extra")), ("b", FieldValue::I32(2)), ("a", s("1"))])
        ));
        assert!(!matches(&args, Some(&[("a", s("1"))])));
        assert!(!matches(&args, Some(&[("b", FieldValue::I32(2))])));
        assert!(!matches(
            &args,
            Some(&[("a", s("1")), ("b", FieldValue::I32(3))])
        ));
        assert!(!matches(&args, Some(&[])));
        assert!(!matches(&args, None));
        // Default is all.
        let default = [("a", s("1")), ("b", FieldValue::I32(2))];
        assert!(matches(
            &default,
            Some(&[("a", s("1")), ("b", FieldValue::I32(2))])
        ));
        assert!(!matches(&default, Some(&[("a", s("1"))])));
    }

    #[test]
    fn x_match_any() {
        let args = [("x-match", s("any")), ("a", s("1")), ("b", s("2"))];
        assert!(matches(&args, Some(&[("a", s("1"))])));
        assert!(matches(&args, Some(&[("b", s("2")), ("c", s("3"))])));
        assert!(matches(&args, Some(&[("a", s("x")), ("b", s("2"))])));
        assert!(!matches(&args, Some(&[("a", s("2")), ("b", s("1"))])));
        assert!(!matches(&args, Some(&[("c", s("1"))])));
        assert!(!matches(&args, None));
    }

    #[test]
    fn no_arguments_left() {
        // all with nothing to compare matches everything, any matches nothing.
        assert!(matches(&[], None));
        assert!(matches(&[], Some(&[("a", s("1"))])));
        assert!(matches(&[("x-match", s("all"))], None));
        assert!(matches(&[("x-match", s("all")), ("x-foo", s("1"))], None));
        assert!(!matches(&[("x-match", s("any"))], Some(&[("a", s("1"))])));
        assert!(!matches(
            &[("x-match", s("any")), ("x-foo", s("1"))],
            Some(&[("x-foo", s("1"))])
        ));
        assert!(matches(&[("x-match", s("all-with-x"))], None));
        assert!(!matches(
            &[("x-match", s("any-with-x"))],
            Some(&[("x-match", s("any-with-x"))])
        ));
    }

    #[test]
    fn x_arguments_only_count_with_x() {
        let all = [("x-match", s("all")), ("x-tenant", s("t1")), ("a", s("1"))];
        assert!(matches(&all, Some(&[("a", s("1"))])));
        assert!(matches(
            &all,
            Some(&[("a", s("1")), ("x-tenant", s("other"))])
        ));

        let all_x = [
            ("x-match", s("all-with-x")),
            ("x-tenant", s("t1")),
            ("a", s("1")),
        ];
        assert!(!matches(&all_x, Some(&[("a", s("1"))])));
        assert!(!matches(
            &all_x,
            Some(&[("a", s("1")), ("x-tenant", s("other"))])
        ));
        assert!(matches(
            &all_x,
            Some(&[("a", s("1")), ("x-tenant", s("t1"))])
        ));
        // x-match itself never takes part, even under -with-x.
        assert!(matches(
            &all_x,
            Some(&[("a", s("1")), ("x-tenant", s("t1")), ("x-match", s("no"))])
        ));

        let any = [("x-match", s("any")), ("x-tenant", s("t1"))];
        assert!(!matches(&any, Some(&[("x-tenant", s("t1"))])));
        let any_x = [
            ("x-match", s("any-with-x")),
            ("x-tenant", s("t1")),
            ("a", s("1")),
        ];
        assert!(matches(&any_x, Some(&[("x-tenant", s("t1"))])));
        assert!(matches(&any_x, Some(&[("a", s("1"))])));
        assert!(!matches(&any_x, Some(&[("x-tenant", s("t2"))])));
        assert!(!matches(&any_x, Some(&[("x-match", s("any-with-x"))])));
    }

    #[test]
    fn void_means_present() {
        let args = [("a", FieldValue::Void)];
        assert!(matches(&args, Some(&[("a", s("anything"))])));
        assert!(matches(&args, Some(&[("a", FieldValue::Void)])));
        assert!(matches(&args, Some(&[("a", FieldValue::I64(7))])));
        assert!(!matches(&args, Some(&[("b", s("1"))])));
        assert!(!matches(&args, None));
        let any = [
            ("x-match", s("any")),
            ("a", FieldValue::Void),
            ("b", s("1")),
        ];
        assert!(matches(&any, Some(&[("a", FieldValue::Bool(false))])));
        assert!(!matches(&any, Some(&[("c", FieldValue::Void)])));
        // A void header is only equal to a void argument.
        assert!(!matches(&[("a", s(""))], Some(&[("a", FieldValue::Void)])));
    }

    #[test]
    fn value_comparison_follows_erlang_equality() {
        use FieldValue as V;
        let eq = |a: V, h: V| matches(&[("k", a)], Some(&[("k", h)]));
        // Different types that are not numbers of each other never match.
        assert!(!eq(s("1"), V::I32(1)));
        assert!(!eq(V::I32(1), s("1")));
        assert!(!eq(V::Bool(true), V::I8(1)));
        assert!(!eq(V::Bool(false), s("false")));
        assert!(!eq(V::Decimal(0, 1), V::I32(1)));
        assert!(!eq(V::Table(FieldTable::new()), V::Array(vec![])));
        // Numbers compare by value across integer types, timestamps and floats.
        assert!(eq(V::I32(1), V::I64(1)));
        assert!(eq(V::U8(200), V::I16(200)));
        assert!(eq(V::Timestamp(5), V::U32(5)));
        assert!(eq(V::I32(1), V::F64(1.0)));
        assert!(eq(V::F32(0.5), V::F64(0.5)));
        assert!(!eq(V::F32(0.1), V::F64(0.1)));
        assert!(!eq(V::I32(1), V::F64(1.5)));
        assert!(!eq(V::I8(-1), V::U8(255)));
        assert!(eq(V::I64(i64::MAX), V::I64(i64::MAX)));
        assert!(!eq(V::I64(i64::MAX), V::F64(i64::MAX as f64)));
        // Strings and byte arrays are both binaries.
        assert!(eq(s("abc"), V::ByteArray(Bytes::from_static(b"abc"))));
        assert!(!eq(s("abc"), s("ABC")));
        assert!(eq(V::Bool(true), V::Bool(true)));
        assert!(eq(V::Decimal(2, 150), V::Decimal(2, 150)));
        assert!(!eq(V::Decimal(1, 15), V::Decimal(2, 150)));
        // Nested values keep their type tags.
        assert!(eq(V::Array(vec![V::I32(1)]), V::Array(vec![V::I32(1)])));
        assert!(!eq(V::Array(vec![V::I32(1)]), V::Array(vec![V::I64(1)])));
        let t = |v: V| V::Table(table(&[("x", v)]));
        assert!(eq(t(s("a")), t(s("a"))));
        assert!(!eq(t(V::U8(1)), t(V::I8(1))));
    }

    #[test]
    fn duplicate_names_pair_up_in_order() {
        let args = [("a", s("1")), ("a", s("2"))];
        assert!(matches(&args, Some(&[("a", s("1")), ("a", s("2"))])));
        assert!(!matches(&args, Some(&[("a", s("1"))])));
        assert!(!matches(&args, Some(&[("a", s("2")), ("a", s("1"))])));
        assert!(!matches(
            &[("a", s("2"))],
            Some(&[("a", s("1")), ("a", s("2"))])
        ));
    }

    #[test]
    fn route_dedupes_and_ignores_the_routing_key() {
        let mut r = HeadersRouter::default();
        assert!(r.bind(b("q1", &[("a", s("1"))])));
        assert!(r.bind(b(
            "q1",
            &[("x-match", s("any")), ("a", s("1")), ("b", s("2"))]
        )));
        assert!(r.bind(Binding {
            routing_key: "other".into(),
            ..b("q1", &[("a", s("1"))])
        }));
        assert!(r.bind(b("q2", &[("b", s("2"))])));
        assert!(!r.bind(b("q2", &[("b", s("2"))])));
        let headers = table(&[("a", s("1")), ("b", s("2"))]);
        let mut out = Vec::new();
        r.route("whatever", Some(&headers), &mut out);
        out.sort();
        assert_eq!(out, vec![q("q1"), q("q2")]);
        let mut out = Vec::new();
        r.route("", None, &mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn bind_unbind_remove_destination() {
        let mut r = HeadersRouter::default();
        let b1 = b("q1", &[("a", s("1"))]);
        let b2 = b("q1", &[("x-match", s("any")), ("a", s("1"))]);
        let b3 = b("q2", &[("a", s("1"))]);
        assert!(r.bind(b1.clone()));
        assert!(r.bind(b2.clone()));
        assert!(r.bind(b3.clone()));
        assert!(r.unbind(&b2));
        assert!(!r.unbind(&b2));
        assert_eq!(r.entries.len(), 2);
        assert_eq!(r.remove_destination(&q("q1")), 1);
        assert_eq!(r.entries.len(), 1);
        assert!(!r.has_destination(&q("q1")));
        assert_eq!(r.bindings(), vec![b3.clone()]);
        assert!(!r.unbind(&b1));
        assert!(r.unbind(&b3));
        assert!(r.is_empty());
        assert!(r.entries.is_empty());
    }

    #[test]
    fn validation() {
        let v = |args: &[(&str, FieldValue)]| validate(&table(args));
        assert!(v(&[]).is_ok());
        assert!(v(&[("a", s("b"))]).is_ok());
        for ok in ["all", "any", "all-with-x", "any-with-x"] {
            assert!(v(&[("x-match", s(ok))]).is_ok(), "{ok}");
        }
        for bad in ["ALL", "", "none", "all "] {
            let err = v(&[("x-match", s(bad))]).unwrap_err();
            assert!(err.contains("x-match"), "{err}");
            assert!(err.contains("Invalid x-match field value"), "{err}");
        }
        let err = v(&[("x-match", FieldValue::I32(1))]).unwrap_err();
        assert_eq!(
            err,
            "Invalid x-match field type signedint (value 1); expected longstr"
        );
        let err = v(&[("x-match", FieldValue::ByteArray(Bytes::from_static(b"all")))]).unwrap_err();
        assert!(err.contains("type binary"), "{err}");
    }

    #[test]
    fn unvalidated_odd_x_match_counts_as_all() {
        let args = [
            ("x-match", FieldValue::I32(1)),
            ("a", s("1")),
            ("b", s("2")),
        ];
        assert!(!matches(&args, Some(&[("a", s("1"))])));
        assert!(matches(&args, Some(&[("a", s("1")), ("b", s("2"))])));
    }
}
