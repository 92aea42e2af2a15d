//! Test certificates made with rcgen for the TLS test files: a CA, leaf
//! certificates it issues (server or client, optionally expired), and a
//! directory holding `ca.pem`, `server.pem` and `server.key` for the broker.
#![allow(dead_code)]

use lapin::tcp::OwnedIdentity;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use std::path::PathBuf;
use warren::config::{SslOptions, Verify};

pub struct Ca {
    pub cert: rcgen::Certificate,
    pub key: KeyPair,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let mut p = CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, name);
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("ca key");
        let cert = p.self_signed(&key).expect("ca cert");
        Ca { cert, key }
    }

    pub fn pem(&self) -> String {
        self.cert.pem()
    }

    /// A leaf certificate: a server one for localhost / 127.0.0.1, or a client
    /// one with `cn`; `expired` puts its validity in the past.
    pub fn issue(&self, cn: &str, server: bool, expired: bool) -> Leaf {
        let sans = if server {
            vec!["localhost".to_string(), "127.0.0.1".to_string()]
        } else {
            vec![]
        };
        let mut p = CertificateParams::new(sans).expect("params");
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(DnType::OrganizationName, "warren tests");
        p.distinguished_name.push(DnType::CommonName, cn);
        p.extended_key_usages = vec![if server {
            ExtendedKeyUsagePurpose::ServerAuth
        } else {
            ExtendedKeyUsagePurpose::ClientAuth
        }];
        if expired {
            p.not_before = rcgen::date_time_ymd(2000, 1, 1);
            p.not_after = rcgen::date_time_ymd(2001, 1, 1);
        }
        let key = KeyPair::generate().expect("leaf key");
        let cert = p.signed_by(&key, &self.cert, &self.key).expect("leaf cert");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
            ca_der: self.cert.der().to_vec(),
        }
    }

    /// A cluster node's certificate: for `host` (an IP or a DNS name, the
    /// host part of its node name), usable as server and as client.
    pub fn issue_node(&self, host: &str) -> Leaf {
        let mut p = CertificateParams::new(vec![host.to_string()]).expect("params");
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name
            .push(DnType::OrganizationName, "warren tests");
        p.distinguished_name
            .push(DnType::CommonName, format!("warren@{host}"));
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate().expect("node key");
        let cert = p.signed_by(&key, &self.cert, &self.key).expect("node cert");
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
            ca_der: self.cert.der().to_vec(),
        }
    }
}

pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_der: Vec<u8>,
    pub key_der: Vec<u8>,
    pub ca_der: Vec<u8>,
}

impl Leaf {
    /// The PKCS#12 identity lapin takes for a client certificate.
    pub fn identity(&self) -> OwnedIdentity {
        let chain = [&self.cert_der, &self.ca_der]
            .into_iter()
            .map(|der| p12_keystore::Certificate::from_der(der).expect("p12 cert"));
        let key_chain = p12_keystore::PrivateKeyChain::new(&self.key_der, [1u8; 20], chain);
        let mut store = p12_keystore::KeyStore::new();
        store.add_entry(
            "client",
            p12_keystore::KeyStoreEntry::PrivateKeyChain(key_chain),
        );
        OwnedIdentity {
            // Few key-derivation rounds: this is a test identity, and the client
            // decodes it during its handshake (slow in a debug build).
            der: store
                .writer("pw")
                .encryption_iterations(16)
                .mac_iterations(16)
                .write()
                .expect("pkcs12"),
            password: "pw".into(),
        }
    }
}

/// A directory with `ca.pem`, `server.pem` and `server.key`.
pub struct Pki {
    pub dir: PathBuf,
    pub ca: Ca,
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let dir = std::env::temp_dir().join(super::uniq(&format!("warren-tls-{name}")));
        std::fs::create_dir_all(&dir).expect("pki dir");
        let ca = Ca::new("warren test CA");
        let pki = Pki { dir, ca };
        pki.write_server(&pki.ca);
        std::fs::write(pki.path("ca.pem"), pki.ca.pem()).expect("ca.pem");
        pki
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// (Re)write the server certificate and key, issued by `ca`.
    pub fn write_server(&self, ca: &Ca) -> Leaf {
        let leaf = ca.issue("localhost", true, false);
        std::fs::write(self.path("server.pem"), &leaf.cert_pem).expect("server.pem");
        std::fs::write(self.path("server.key"), &leaf.key_pem).expect("server.key");
        leaf
    }

    /// Rewrite the server certificate (and key) with one that expires on
    /// January 1st of `year`.
    pub fn write_server_until(&self, year: i32) {
        let mut p = CertificateParams::new(vec!["localhost".to_string()]).expect("params");
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.distinguished_name.push(DnType::CommonName, "expiring");
        p.not_after = rcgen::date_time_ymd(year, 1, 1);
        let key = KeyPair::generate().expect("leaf key");
        let cert = p
            .signed_by(&key, &self.ca.cert, &self.ca.key)
            .expect("leaf cert");
        std::fs::write(self.path("server.pem"), cert.pem()).expect("server.pem");
        std::fs::write(self.path("server.key"), key.serialize_pem()).expect("server.key");
    }

    pub fn options(&self, verify: Verify, fail_if_no_peer_cert: bool) -> SslOptions {
        SslOptions {
            cacertfile: Some(self.path("ca.pem")),
            certfile: Some(self.path("server.pem")),
            keyfile: Some(self.path("server.key")),
            verify,
            fail_if_no_peer_cert,
        }
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
