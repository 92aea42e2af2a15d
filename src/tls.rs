//! TLS for the AMQP listener, the admin API and the connections between cluster
//! nodes (rustls, ring provider, TLS 1.2 and 1.3 only): server configurations
//! built from RabbitMQ-style `ssl_options`, swapped on reload (new handshakes get the new certificate,
//! established sessions keep theirs), the handshake with its timeout and a
//! plaintext check, and what a finished handshake tells: protocol, cipher suite,
//! the verified client certificate's subject and the SASL EXTERNAL user name
//! taken from it (rabbitmq_auth_mechanism_ssl's `ssl_cert_login_from`); and
//! [`MutualTls`], both ends of the inter-node connections (`[cluster.tls]`).

use crate::broker::TlsInfo;
use crate::config::{CertLoginFrom, ClusterTls, Config, SanType, SslOptions, Verify};
use parking_lot::RwLock;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::rustls::{
    self,
    crypto::ring,
    pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer, ServerName},
    server::WebPkiClientVerifier,
    ClientConfig, RootCertStore, ServerConfig, ServerConnection,
};
use tokio_rustls::server::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use x509_parser::prelude::*;

/// A TLS configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} not set: TLS needs ssl_options.certfile and ssl_options.keyfile")]
    Missing { what: &'static str },
    #[error("ssl_options.verify = verify_peer needs ssl_options.cacertfile")]
    NoCa,
    #[error("cannot read {path}: {error}")]
    Pem { path: String, error: String },
    #[error("{path} holds no certificate")]
    NoCertificate { path: String },
    #[error("TLS configuration: {0}")]
    Rustls(String),
}

/// One listener's TLS server configuration, replaceable while it runs.
#[derive(Debug)]
pub struct ServerTls {
    options: SslOptions,
    alpn: Vec<Vec<u8>>,
    current: RwLock<Arc<ServerConfig>>,
}

impl ServerTls {
    /// Read the certificate, key and CA named by `options`; `alpn` is offered as
    /// is (empty for AMQP, `http/1.1` for the admin API).
    pub fn new(options: &SslOptions, alpn: &[&[u8]]) -> Result<Arc<ServerTls>, TlsError> {
        let alpn: Vec<Vec<u8>> = alpn.iter().map(|p| p.to_vec()).collect();
        let config = build(options, &alpn)?;
        Ok(Arc::new(ServerTls {
            options: options.clone(),
            alpn,
            current: RwLock::new(config),
        }))
    }

    /// Read the files again. On success new handshakes use them; on failure the
    /// configuration in use stays and the error is returned.
    pub fn reload(&self) -> Result<(), TlsError> {
        let config = build(&self.options, &self.alpn)?;
        *self.current.write() = config;
        Ok(())
    }

    /// An acceptor with the configuration in force now.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(Arc::clone(&self.current.read()))
    }

    /// The configured certificate file, for reports.
    pub fn certfile_name(&self) -> String {
        self.options
            .certfile
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    }

    /// Every certificate of the configured certificate file (the chain, as
    /// read now) with its subject and `notAfter` (Unix seconds). A file
    /// that no longer reads counts as expired now (`notAfter` 0), so a
    /// health check that looks at it fails rather than passing blind.
    pub fn certificate_expiries(&self) -> Vec<(String, i64)> {
        let Some(path) = self.options.certfile.as_deref() else {
            return Vec::new();
        };
        match read_certs(path) {
            Ok(chain) => chain
                .iter()
                .map(|der| match X509Certificate::from_der(der.as_ref()) {
                    Ok((_, c)) => (c.subject().to_string(), c.validity().not_after.timestamp()),
                    Err(e) => (format!("unparsable certificate: {e}"), 0),
                })
                .collect(),
            Err(e) => vec![(e.to_string(), 0)],
        }
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_error = |e: rustls::pki_types::pem::Error| TlsError::Pem {
        path: path.display().to_string(),
        error: e.to_string(),
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.display().to_string(),
        });
    }
    Ok(certs)
}

/// Make ring the process's default rustls provider, for the TLS clients warren runs
/// itself (shovels to `amqps://` URIs, through lapin). rustls picks a default on its
/// own only when exactly one provider is compiled in; a program embedding warren next
/// to a crate that enables aws-lc-rs would otherwise have none, and those clients would
/// fail. Does nothing when the process already has a default.
pub fn install_default_provider() {
    let _ = ring::default_provider().install_default();
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Pem {
        path: path.display().to_string(),
        error: e.to_string(),
    })
}

/// The certificates of the CA file `ca`, as trust anchors.
fn roots(ca: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certs(ca)? {
        roots
            .add(cert)
            .map_err(|e| TlsError::Rustls(format!("{}: {e}", ca.display())))?;
    }
    Ok(roots)
}

/// A rustls server configuration from `options`.
fn build(options: &SslOptions, alpn: &[Vec<u8>]) -> Result<Arc<ServerConfig>, TlsError> {
    let certfile = options
        .certfile
        .as_deref()
        .ok_or(TlsError::Missing { what: "certfile" })?;
    let keyfile = options
        .keyfile
        .as_deref()
        .ok_or(TlsError::Missing { what: "keyfile" })?;
    let chain = read_certs(certfile)?;
    let key = read_key(keyfile)?;
    let provider = Arc::new(ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    let builder = match options.verify {
        Verify::VerifyNone => builder.with_no_client_auth(),
        Verify::VerifyPeer => {
            let ca = options.cacertfile.as_deref().ok_or(TlsError::NoCa)?;
            let mut verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider);
            if !options.fail_if_no_peer_cert {
                verifier = verifier.allow_unauthenticated();
            }
            let verifier = verifier
                .build()
                .map_err(|e| TlsError::Rustls(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| TlsError::Rustls(e.to_string()))?;
    config.alpn_protocols = alpn.to_vec();
    Ok(Arc::new(config))
}

/// Mutual TLS between cluster nodes (`[cluster.tls]`): every node is a server
/// to the nodes that dial it and a client to the nodes it dials, presents its
/// own certificate both ways and requires the peer's, chained to the CA. The
/// dialer also checks that the listener's certificate names the host of the
/// node it means to reach.
pub struct MutualTls {
    options: ClusterTls,
    server: Arc<ServerTls>,
    client: RwLock<TlsConnector>,
}

impl std::fmt::Debug for MutualTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MutualTls")
            .field("server", &self.server)
            .finish_non_exhaustive()
    }
}

impl MutualTls {
    pub fn new(options: &ClusterTls) -> Result<MutualTls, TlsError> {
        let (certfile, keyfile, ca) = Self::files(options)?;
        let server = ServerTls::new(
            &SslOptions {
                cacertfile: Some(ca.to_path_buf()),
                certfile: Some(certfile.to_path_buf()),
                keyfile: Some(keyfile.to_path_buf()),
                verify: Verify::VerifyPeer,
                fail_if_no_peer_cert: true,
            },
            &[],
        )?;
        Ok(MutualTls {
            options: options.clone(),
            server,
            client: RwLock::new(Self::client(options)?),
        })
    }

    /// The certificate, key and CA files `options` names.
    fn files(options: &ClusterTls) -> Result<(&Path, &Path, &Path), TlsError> {
        let missing = |what| TlsError::Rustls(format!("[cluster.tls] needs {what}"));
        Ok((
            options.certfile.as_deref().ok_or(missing("certfile"))?,
            options.keyfile.as_deref().ok_or(missing("keyfile"))?,
            options.cacertfile.as_deref().ok_or(missing("cacertfile"))?,
        ))
    }

    /// The dialing end, read from the files.
    fn client(options: &ClusterTls) -> Result<TlsConnector, TlsError> {
        let (certfile, keyfile, ca) = Self::files(options)?;
        let client = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| TlsError::Rustls(e.to_string()))?
            .with_root_certificates(roots(ca)?)
            .with_client_auth_cert(read_certs(certfile)?, read_key(keyfile)?)
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
        Ok(TlsConnector::from(Arc::new(client)))
    }

    /// Read the files again, both ends: new connections (accepted and
    /// dialed) use them, open ones keep theirs. On failure both ends keep
    /// the configuration in use and the error is returned (the dialing end
    /// is read first and put in place last).
    pub fn reload(&self) -> Result<(), TlsError> {
        let client = Self::client(&self.options)?;
        self.server.reload()?;
        *self.client.write() = client;
        Ok(())
    }

    /// The listener's side: [`accept`] with a client certificate required.
    pub async fn accept(
        &self,
        stream: TcpStream,
        timeout: Duration,
    ) -> Result<TlsStream<TcpStream>, HandshakeError> {
        accept(&self.server, stream, timeout).await
    }

    /// The dialer's side: the listener's certificate must chain to the CA and
    /// be valid for `host` (a DNS name or an IP address).
    pub async fn connect(
        &self,
        stream: TcpStream,
        host: &str,
        timeout: Duration,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, HandshakeError> {
        let name = ServerName::try_from(host.to_string()).map_err(|e| {
            HandshakeError::Failed(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("'{host}' is not a host name: {e}"),
            ))
        })?;
        let client = self.client.read().clone();
        tokio::time::timeout(timeout, client.connect(name, stream))
            .await
            .map_err(|_| HandshakeError::Timeout(timeout))?
            .map_err(HandshakeError::Failed)
    }
}

/// Why a TLS handshake did not finish.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The first byte is not a TLS handshake record: a plaintext client.
    #[error("not a TLS client (plaintext on the TLS port?)")]
    Plaintext,
    #[error("TLS handshake timed out after {0:?}")]
    Timeout(Duration),
    /// Refused by rustls: bad certificate, no common protocol, ...
    #[error("TLS handshake failed: {0}")]
    Failed(std::io::Error),
}

/// The TLS record type of a handshake message: every TLS client starts with it.
const HANDSHAKE_RECORD: u8 = 0x16;

/// Run the server side of a handshake on `stream` within `timeout`. A client
/// whose first byte is not a TLS handshake record (say `AMQP\0\0\9\1`) is
/// refused at once, before rustls answers it with an alert.
pub async fn accept(
    tls: &ServerTls,
    stream: TcpStream,
    timeout: Duration,
) -> Result<TlsStream<TcpStream>, HandshakeError> {
    let acceptor = tls.acceptor();
    let handshake = async {
        let mut first = [0u8; 1];
        match stream.peek(&mut first).await {
            Ok(1) if first[0] == HANDSHAKE_RECORD => {}
            Ok(0) => {
                return Err(HandshakeError::Failed(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "closed before the handshake",
                )))
            }
            Ok(_) => return Err(HandshakeError::Plaintext),
            Err(e) => return Err(HandshakeError::Failed(e)),
        }
        acceptor
            .accept(stream)
            .await
            .map_err(HandshakeError::Failed)
    };
    tokio::time::timeout(timeout, handshake)
        .await
        .map_err(|_| HandshakeError::Timeout(timeout))?
}

/// The handshake timeout of the configuration (at least 100 ms).
pub fn handshake_timeout(config: &Config) -> Duration {
    Duration::from_millis(config.ssl_handshake_timeout.max(100))
}

/// How an EXTERNAL login finds the user name in a certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CertLogin {
    pub from: CertLoginFrom,
    pub san_type: SanType,
    pub san_index: usize,
}

impl CertLogin {
    pub fn from_config(config: &Config) -> CertLogin {
        CertLogin {
            from: config.ssl_cert_login_from,
            san_type: config.ssl_cert_login_san_type,
            san_index: config.ssl_cert_login_san_index,
        }
    }
}

/// What an established TLS connection knows about itself.
#[derive(Debug, Clone)]
pub struct Established {
    pub info: TlsInfo,
    /// The EXTERNAL user name of a verified client certificate, or why there is
    /// none usable (None: no client certificate).
    pub login: Option<Result<String, String>>,
}

/// Protocol, cipher and client certificate facts of a finished handshake.
/// A client certificate is present only when it was verified (verify_peer).
pub fn established(conn: &ServerConnection, login: CertLogin) -> Established {
    let protocol = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "tlsv1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "tlsv1.2",
        _ => "unknown",
    };
    let cipher = conn
        .negotiated_cipher_suite()
        .map(|s| format!("{:?}", s.suite()))
        .unwrap_or_default();
    let leaf = conn.peer_certificates().and_then(|c| c.first());
    let parsed = leaf.map(|der| X509Certificate::from_der(der.as_ref()));
    let (subject, issuer, login) = match parsed {
        None => (None, None, None),
        Some(Err(e)) => (
            None,
            None,
            Some(Err(format!("unreadable certificate: {e}"))),
        ),
        Some(Ok((_, cert))) => (
            Some(rfc4514(cert.subject())),
            Some(rfc4514(cert.issuer())),
            Some(login_name(&cert, login)),
        ),
    };
    Established {
        info: TlsInfo {
            protocol,
            cipher,
            peer_cert_subject: subject,
            peer_cert_issuer: issuer,
        },
        login,
    }
}

/// A name as RFC 4514 writes it (most specific RDN first, `CN=alice,O=Example`),
/// the form RabbitMQ shows and matches user names against.
pub fn rfc4514(name: &X509Name<'_>) -> String {
    let rdns: Vec<String> = name
        .iter()
        .map(|rdn| {
            rdn.iter()
                .map(|attr| {
                    let oid = attr.attr_type().to_id_string();
                    let key = rfc4514_key(&oid).map_or(oid, str::to_string);
                    let value = match attr.as_str() {
                        Ok(v) => escape_dn_value(v),
                        Err(_) => format!("#{}", hex(attr.attr_value().data)),
                    };
                    format!("{key}={value}")
                })
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect();
    rdns.into_iter().rev().collect::<Vec<_>>().join(",")
}

/// The attribute names RFC 4514 (and RabbitMQ) write by name; others are dotted OIDs.
fn rfc4514_key(oid: &str) -> Option<&'static str> {
    Some(match oid {
        "2.5.4.3" => "CN",
        "2.5.4.7" => "L",
        "2.5.4.8" => "ST",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "2.5.4.6" => "C",
        "2.5.4.9" => "STREET",
        "0.9.2342.19200300.100.1.25" => "DC",
        "0.9.2342.19200300.100.1.1" => "UID",
        _ => return None,
    })
}

fn escape_dn_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for (i, c) in v.chars().enumerate() {
        let lead = i == 0 && (c == ' ' || c == '#');
        let trail = i + 1 == v.chars().count() && c == ' ';
        if lead || trail || matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';' | '=') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The EXTERNAL user name of `cert`, or why it has none.
pub fn login_name(cert: &X509Certificate<'_>, how: CertLogin) -> Result<String, String> {
    match how.from {
        CertLoginFrom::CommonName => {
            let cns: Vec<_> = cert.subject().iter_common_name().collect();
            match cns.as_slice() {
                [cn] => cn
                    .as_str()
                    .map(str::to_string)
                    .map_err(|_| "the subject's CN is not a string".to_string()),
                [] => Err("the certificate subject has no CN".into()),
                _ => Err("the certificate subject has more than one CN".into()),
            }
        }
        CertLoginFrom::DistinguishedName => Ok(rfc4514(cert.subject())),
        CertLoginFrom::SubjectAlternativeName => {
            let sans = match cert.subject_alternative_name() {
                Ok(Some(ext)) => ext.value.general_names.clone(),
                Ok(None) => Vec::new(),
                Err(e) => return Err(format!("bad subjectAltName: {e}")),
            };
            sans.iter()
                .filter_map(|n| san_value(n, how.san_type))
                .nth(how.san_index)
                .ok_or_else(|| {
                    format!(
                        "the certificate has no {:?} subject alternative name at index {}",
                        how.san_type, how.san_index
                    )
                })
        }
    }
}

fn san_value(name: &GeneralName<'_>, kind: SanType) -> Option<String> {
    match (name, kind) {
        (GeneralName::DNSName(v), SanType::Dns)
        | (GeneralName::RFC822Name(v), SanType::Email)
        | (GeneralName::URI(v), SanType::Uri) => Some(v.to_string()),
        (GeneralName::IPAddress(ip), SanType::Ip) => match ip.len() {
            4 => <[u8; 4]>::try_from(*ip)
                .ok()
                .map(|b| std::net::Ipv4Addr::from(b).to_string()),
            16 => <[u8; 16]>::try_from(*ip)
                .ok()
                .map(|b| std::net::Ipv6Addr::from(b).to_string()),
            _ => None,
        },
        _ => None,
    }
}

/// What a TLS reload reads again: a listener's files ([`ServerTls`]), or
/// both ends of the inter-node connections ([`MutualTls`]).
pub trait TlsFiles: Send + Sync + std::fmt::Debug {
    /// Read the files again; on failure the configuration in use stays.
    fn reload(&self) -> Result<(), TlsError>;
    /// The certificate file's chain: each certificate's subject and
    /// `notAfter` (Unix seconds).
    fn certificate_expiries(&self) -> Vec<(String, i64)>;
    /// The configured certificate file, for reports.
    fn certfile_name(&self) -> String;
    /// Clients connect with it (AMQPS, the Stream protocol's TLS port,
    /// HTTPS), so it can offer them SASL EXTERNAL; the inter-node
    /// connections cannot.
    fn serves_clients(&self) -> bool;
}

impl TlsFiles for ServerTls {
    fn reload(&self) -> Result<(), TlsError> {
        ServerTls::reload(self)
    }
    fn certificate_expiries(&self) -> Vec<(String, i64)> {
        ServerTls::certificate_expiries(self)
    }
    fn certfile_name(&self) -> String {
        ServerTls::certfile_name(self)
    }
    fn serves_clients(&self) -> bool {
        true
    }
}

impl TlsFiles for MutualTls {
    fn reload(&self) -> Result<(), TlsError> {
        MutualTls::reload(self)
    }
    fn certificate_expiries(&self) -> Vec<(String, i64)> {
        self.server.certificate_expiries()
    }
    fn certfile_name(&self) -> String {
        self.server.certfile_name()
    }
    fn serves_clients(&self) -> bool {
        false
    }
}

/// The TLS configurations of a running broker, by name ("AMQPS", "admin
/// HTTPS", "inter-node"), for reloading their files together (SIGHUP, or
/// `warren reload-tls` via the API).
pub type Listeners = Vec<(&'static str, Arc<dyn TlsFiles>)>;

/// Reloads every listener's files; one whose files do not load keeps its
/// configuration (logged), and the last such error is returned.
pub fn reload_all(listeners: &Listeners) -> Result<(), TlsError> {
    let mut result = Ok(());
    for (what, t) in listeners {
        match t.reload() {
            Ok(()) => tracing::info!("{what} certificate reloaded"),
            Err(e) => {
                tracing::error!(error = %e, "{what} certificate not reloaded; keeping the old one");
                result = Err(e);
            }
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DnType, KeyPair, SanType as RcSan};

    fn cert(params: CertificateParams) -> Vec<u8> {
        let key = KeyPair::generate().expect("key");
        params.self_signed(&key).expect("cert").der().to_vec()
    }

    fn with_subject(attrs: &[(DnType, &str)], sans: Vec<RcSan>) -> Vec<u8> {
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        for (k, v) in attrs {
            p.distinguished_name.push(k.clone(), *v);
        }
        p.subject_alt_names = sans;
        cert(p)
    }

    fn login(
        der: &[u8],
        from: CertLoginFrom,
        san_type: SanType,
        idx: usize,
    ) -> Result<String, String> {
        let (_, c) = X509Certificate::from_der(der).expect("parses");
        login_name(
            &c,
            CertLogin {
                from,
                san_type,
                san_index: idx,
            },
        )
    }

    #[test]
    fn hash_and_key_exchange_are_named_as_erlangs_ssl_names_them() {
        let info = |cipher: &str| TlsInfo {
            protocol: "tlsv1.2",
            cipher: cipher.into(),
            peer_cert_subject: None,
            peer_cert_issuer: None,
        };
        let v13 = info("TLS13_AES_256_GCM_SHA384");
        assert_eq!(
            (v13.key_exchange(), v13.hash()),
            ("any".into(), "aead".into())
        );
        let gcm = info("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256");
        assert_eq!(
            (gcm.key_exchange(), gcm.hash()),
            ("ecdhe_rsa".into(), "aead".into())
        );
        let cbc = info("TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA384");
        assert_eq!(
            (cbc.key_exchange(), cbc.hash()),
            ("ecdhe_ecdsa".into(), "sha384".into())
        );
    }

    #[test]
    fn common_name_is_the_default_login() {
        let der = with_subject(
            &[
                (DnType::OrganizationName, "Example"),
                (DnType::CommonName, "alice"),
            ],
            vec![],
        );
        let name = login(&der, CertLoginFrom::CommonName, SanType::Dns, 0);
        assert_eq!(name, Ok("alice".to_string()));
    }

    #[test]
    fn no_cn_is_an_error() {
        let der = with_subject(&[(DnType::OrganizationName, "Example")], vec![]);
        assert!(login(&der, CertLoginFrom::CommonName, SanType::Dns, 0).is_err());
    }

    #[test]
    fn distinguished_name_is_rfc4514_most_specific_first() {
        let der = with_subject(
            &[
                (DnType::CountryName, "US"),
                (DnType::OrganizationName, "Acme, Inc"),
                (DnType::CommonName, "bob"),
            ],
            vec![],
        );
        assert_eq!(
            login(&der, CertLoginFrom::DistinguishedName, SanType::Dns, 0),
            Ok("CN=bob,O=Acme\\, Inc,C=US".to_string())
        );
    }

    #[test]
    fn subject_alternative_names_by_type_and_index() {
        let der = with_subject(
            &[(DnType::CommonName, "x")],
            vec![
                RcSan::DnsName("one.example".try_into().expect("dns")),
                RcSan::Rfc822Name("carol@example.com".try_into().expect("email")),
                RcSan::DnsName("two.example".try_into().expect("dns")),
                RcSan::IpAddress("10.0.0.7".parse().expect("ip")),
            ],
        );
        let san = CertLoginFrom::SubjectAlternativeName;
        assert_eq!(login(&der, san, SanType::Dns, 0), Ok("one.example".into()));
        assert_eq!(login(&der, san, SanType::Dns, 1), Ok("two.example".into()));
        assert_eq!(
            login(&der, san, SanType::Email, 0),
            Ok("carol@example.com".into())
        );
        assert_eq!(login(&der, san, SanType::Ip, 0), Ok("10.0.0.7".into()));
        assert!(login(&der, san, SanType::Dns, 2).is_err());
        assert!(login(&der, san, SanType::Uri, 0).is_err());
    }

    #[test]
    fn inter_node_tls_needs_all_three_files() {
        let dir = std::env::temp_dir().join(format!("warren-tls-mutual-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(vec!["127.0.0.1".to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        std::fs::write(dir.join("n.pem"), cert.pem()).expect("write");
        std::fs::write(dir.join("n.key"), key.serialize_pem()).expect("write");
        let mut options = ClusterTls {
            certfile: Some(dir.join("n.pem")),
            keyfile: Some(dir.join("n.key")),
            cacertfile: None,
        };
        let err = MutualTls::new(&options).expect_err("no CA");
        assert!(err.to_string().contains("cacertfile"), "{err}");
        options.cacertfile = Some(dir.join("absent.pem"));
        assert!(matches!(
            MutualTls::new(&options),
            Err(TlsError::Pem { .. })
        ));
        options.cacertfile = Some(dir.join("n.pem"));
        assert!(MutualTls::new(&options).is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn missing_or_broken_files_are_errors_not_panics() {
        let none = SslOptions::default();
        assert!(matches!(
            ServerTls::new(&none, &[]),
            Err(TlsError::Missing { .. })
        ));
        let dir = std::env::temp_dir().join(format!("warren-tls-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        std::fs::write(dir.join("junk.pem"), "not pem").expect("write");
        let junk = SslOptions {
            certfile: Some(dir.join("junk.pem")),
            keyfile: Some(dir.join("junk.pem")),
            ..SslOptions::default()
        };
        assert!(ServerTls::new(&junk, &[]).is_err());
        let missing = SslOptions {
            certfile: Some(dir.join("absent.pem")),
            keyfile: Some(dir.join("absent.key")),
            ..SslOptions::default()
        };
        assert!(matches!(
            ServerTls::new(&missing, &[]),
            Err(TlsError::Pem { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
