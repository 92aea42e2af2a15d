//! The broker URI (`amqp://user:pass@host:port/vhost`) and connection set-up for the
//! generic clients (amqprs, lapin).

use crate::Res;

pub struct UriParts {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub pass: String,
    pub vhost: String,
}

pub fn pct_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn parse_uri(uri: &str) -> Res<UriParts> {
    let rest = uri
        .strip_prefix("amqp://")
        .ok_or("only amqp:// URIs are supported")?;
    let rest = rest.split('?').next().unwrap_or("");
    let (authority, vhost) = match rest.find('/') {
        Some(i) => (&rest[..i], pct_decode(&rest[i + 1..])),
        None => (rest, "/".to_string()),
    };
    let vhost = if vhost.is_empty() {
        "/".to_string()
    } else {
        vhost
    };
    let (auth, hostport) = match authority.rfind('@') {
        Some(i) => (Some(&authority[..i]), &authority[i + 1..]),
        None => (None, authority),
    };
    let (user, pass) = match auth {
        Some(a) => match a.find(':') {
            Some(i) => (pct_decode(&a[..i]), pct_decode(&a[i + 1..])),
            None => (pct_decode(a), String::new()),
        },
        None => ("guest".into(), "guest".into()),
    };
    let (host, port) = match hostport.rfind(':') {
        Some(i) => (hostport[..i].to_string(), hostport[i + 1..].parse::<u16>()?),
        None => (hostport.to_string(), 5672),
    };
    let host = if host.is_empty() {
        "127.0.0.1".into()
    } else {
        host
    };
    Ok(UriParts {
        host,
        port,
        user,
        pass,
        vhost,
    })
}

pub async fn amqprs_open(u: &UriParts, name: &str) -> Res<amqprs::connection::Connection> {
    let args = amqprs::connection::OpenConnectionArguments::new(&u.host, u.port, &u.user, &u.pass)
        .virtual_host(&u.vhost)
        .connection_name(name)
        .finish();
    Ok(amqprs::connection::Connection::open(&args).await?)
}

pub async fn lapin_open(uri: &str, name: &str) -> Res<lapin::Connection> {
    let props = lapin::ConnectionProperties::default()
        .with_executor(tokio_executor_trait::Tokio::current())
        .with_reactor(tokio_reactor_trait::Tokio)
        .with_connection_name(name.to_string().into());
    Ok(lapin::Connection::connect(uri, props).await?)
}

// ---------------------------------------------------------------------------------------
