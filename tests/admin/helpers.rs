//! Helpers shared by the admin suite: an in-process broker with the admin API on
//! (`start`), HTTP calls as guest or another user (`Broker::call` / `get` / `ok`),
//! AMQP connections to it, and a parser for the Prometheus text of `/metrics`.

pub(crate) use crate::common;
pub(crate) use crate::common::{assert_code, code, t, watch_connection};
pub(crate) use lapin::options::*;
pub(crate) use lapin::types::FieldTable;
pub(crate) use lapin::{BasicProperties, Connection};
pub(crate) use serde_json::{json, Value};
pub(crate) use std::net::SocketAddr;

pub(crate) struct Broker {
    /// The in-process broker (None when the broker under test is a child process).
    pub(crate) _warren: Option<warren::Warren>,
    pub(crate) amqp: SocketAddr,
    pub(crate) base: String,
}

pub(crate) async fn start() -> Broker {
    start_with(|_| {}).await
}

/// [`start`] with `f`'s changes to the configuration.
pub(crate) async fn start_with(f: impl FnOnce(&mut warren::Config)) -> Broker {
    let dir = std::env::temp_dir().join(format!(
        "warren-admin-test-{}-{}",
        std::process::id(),
        common::uniq("d")
    ));
    let mut config = warren::Config::for_tests(dir);
    config.admin_enabled = true;
    f(&mut config);
    let w = warren::start(config).await.expect("broker starts");
    let admin = w.admin_addr().expect("admin enabled");
    Broker {
        amqp: w.amqp_addr(),
        base: format!("http://{admin}"),
        _warren: Some(w),
    }
}

pub(crate) const GUEST: Option<(&str, &str)> = Some(("guest", "guest"));

impl Broker {
    /// One HTTP call: (status, JSON body or Null, raw text).
    pub(crate) async fn call(
        &self,
        method: &str,
        path: &str,
        auth: Option<(&str, &str)>,
        body: Option<Value>,
    ) -> (u16, Value) {
        super::common::http(method, &format!("{}{}", self.base, path), auth, body).await
    }

    pub(crate) async fn get(&self, path: &str) -> Value {
        let (status, v) = self.call("GET", path, GUEST, None).await;
        assert_eq!(status, 200, "GET {path}: {v}");
        v
    }

    pub(crate) async fn text(&self, path: &str) -> String {
        let url = format!("{}{}", self.base, path);
        tokio::task::spawn_blocking(move || {
            ureq::get(&url)
                .call()
                .expect("metrics")
                .into_string()
                .expect("text")
        })
        .await
        .expect("task")
    }

    pub(crate) async fn ok(&self, method: &str, path: &str, body: Value) -> u16 {
        let (status, v) = self.call(method, path, GUEST, Some(body)).await;
        assert!(
            (200..300).contains(&status),
            "{method} {path}: {status} {v}"
        );
        status
    }

    pub(crate) async fn amqp(
        &self,
        user: &str,
        pass: &str,
        vhost: &str,
    ) -> lapin::Result<Connection> {
        let vhost = vhost.replace('/', "%2f");
        let uri = format!("amqp://{user}:{pass}@{}/{vhost}", self.amqp);
        t(Connection::connect(&uri, common::props())).await
    }
}

/// Parse Prometheus text format: every non-comment line is `name{labels} value`.
pub(crate) fn parse_metrics(text: &str) -> Vec<(String, String, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('#') {
            let mut parts = rest.split_whitespace();
            let kind = parts.next().unwrap();
            assert!(kind == "HELP" || kind == "TYPE", "bad comment: {line}");
            if kind == "TYPE" {
                let t = parts.nth(1).unwrap();
                assert!(
                    ["counter", "gauge", "untyped", "histogram", "summary"].contains(&t),
                    "{line}"
                );
            }
            continue;
        }
        let (series, value) = line.rsplit_once(' ').expect("name value");
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => {
                assert!(l.ends_with('}'), "labels: {line}");
                (n, l.trim_end_matches('}'))
            }
            None => (series, ""),
        };
        assert!(
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "bad metric name: {line}"
        );
        let v: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        out.push((name.to_string(), labels.to_string(), v));
    }
    out
}

pub(crate) fn metric(m: &[(String, String, f64)], name: &str, labels: &str) -> f64 {
    m.iter()
        .find(|(n, l, _)| n == name && l == labels)
        .map(|x| x.2)
        .unwrap_or_else(|| panic!("no {name}{{{labels}}}"))
}
