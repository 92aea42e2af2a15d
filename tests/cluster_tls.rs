//! TLS between cluster nodes (`[cluster.tls]`): three nodes with certificates
//! from one CA form a cluster (through proxies: the dialer checks the peer's
//! node name, not the address it dialed) and replicate a declare; a node whose
//! certificate comes from another CA, and a node without TLS, never join, and
//! both sides of each say why in their logs; a plain dial at a TLS node and a
//! TLS dial at a plain node fail with the reason.

mod common;

use common::cluster::{declare, eventually, wait_all_present, Node, NodeTls, COOKIE};
use common::proxy::Proxy;
use common::tls::Ca;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// A directory of node certificates, removed at the end.
struct Certs {
    dir: PathBuf,
}

impl Certs {
    fn new(tag: &str) -> Certs {
        let dir = std::env::temp_dir().join(common::uniq(&format!("warren-ctls-{tag}")));
        std::fs::create_dir_all(&dir).expect("cert dir");
        Certs { dir }
    }

    /// Files for the node on `ip`, issued by `ca` (whose certificate is also
    /// the node's trust anchor, `ca_name`.pem).
    fn node(&self, ca: &Ca, ca_name: &str, ip: &str) -> NodeTls {
        let leaf = ca.issue_node(ip);
        let path = |f: &str| -> PathBuf { self.dir.join(f) };
        let write = |p: &Path, text: &str| std::fs::write(p, text).expect("write pem");
        let tls = NodeTls {
            certfile: path(&format!("{ip}-{ca_name}.pem")),
            keyfile: path(&format!("{ip}-{ca_name}.key")),
            cacertfile: path(&format!("{ca_name}.pem")),
        };
        write(&tls.certfile, &leaf.cert_pem);
        write(&tls.keyfile, &leaf.key_pem);
        write(&tls.cacertfile, &ca.pem());
        tls
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_with_tls_form_a_cluster_and_replicate_a_declare() {
    let certs = Certs::new("three");
    let ca = Ca::new("warren cluster CA");
    let mut nodes: Vec<Node> = (1..=3).map(|n| Node::new(n, "tls")).collect();
    for n in nodes.iter_mut() {
        n.tls = Some(certs.node(&ca, "ca", &n.ip));
    }
    // Every node reaches the others through a proxy on another address: the
    // certificates name 127.0.0.n only, so this passes only if the dialer
    // checks the peer's node name, not the address it dialed.
    let mut proxies = Vec::new();
    for i in 0..3 {
        for j in 0..3 {
            if i != j {
                let p = Proxy::start(&nodes[j].cluster_addr());
                let to = (nodes[j].name(), p.addr.to_string());
                nodes[i].dial.push(to);
                proxies.push(p);
            }
        }
    }
    let seed = nodes[0].seed();
    nodes[1].seeds = vec![seed.clone()];
    nodes[2].seeds = vec![seed];
    for n in nodes.iter_mut() {
        n.start().await;
    }
    common::cluster::wait_all_running(&nodes.iter().collect::<Vec<_>>()).await;
    let x = common::uniq("tlsx");
    declare(&nodes[1], &x, Duration::from_secs(10))
        .await
        .expect("declare on B answered -ok");
    for n in &nodes {
        wait_all_present(n, std::slice::from_ref(&x), Duration::from_secs(10)).await;
    }

    // A plain dial at a TLS node: refused with a reason, on both sides.
    let me = warren::cluster::NodeInfo {
        name: "warren@127.0.0.9".into(),
        addr: "127.0.0.9:1".into(),
        ..Default::default()
    };
    let plain = warren::cluster::Identity::new(me, 9, COOKIE.into());
    let addr = nodes[0].cluster_addr();
    let r = warren::cluster::network::dial(&plain, None, &addr).await;
    let err = r.err().expect("a plain dial at a TLS node was accepted");
    assert!(
        err.to_string().contains("requires TLS"),
        "unclear error: {err}"
    );
    eventually(
        "the TLS node logs the plain peer",
        Duration::from_secs(5),
        || {
            nodes[0]
                .log()
                .contains("closed before the TLS handshake: a node without [cluster.tls]?")
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_from_another_ca_or_without_tls_cannot_join() {
    let certs = Certs::new("foreign");
    let ca = Ca::new("warren cluster CA");
    let other = Ca::new("someone else's CA");
    let mut a = Node::new(1, "tlsca");
    a.tls = Some(certs.node(&ca, "ca", &a.ip));
    a.start().await;
    eventually("A leads a cluster of one", Duration::from_secs(10), || {
        a.leader() == Some(a.name())
    })
    .await;

    // B: the right cookie, a certificate and CA of another authority.
    let mut b = Node::new(2, "tlsca");
    b.tls = Some(certs.node(&other, "other", &b.ip));
    b.seeds = vec![a.seed()];
    b.start().await;
    // C: the right cookie, no TLS at all.
    let mut c = Node::new(3, "tlsca");
    c.seeds = vec![a.seed()];
    c.start().await;

    eventually(
        "B and C say why they cannot join",
        Duration::from_secs(10),
        || {
            let (lb, lc) = (b.log(), c.log());
            lb.contains("TLS with")
                && lb.contains("invalid peer certificate")
                && lc.contains(
                    "the peer requires TLS between nodes and this node has no [cluster.tls]",
                )
        },
    )
    .await;
    eventually(
        "A says why it refused them",
        Duration::from_secs(10),
        || {
            let la = a.log();
            la.contains("inter-node connection refused")
                && la.contains("a node without [cluster.tls]?")
        },
    )
    .await;
    // The reverse: a TLS node dialing a plain one says so too.
    let mut tls_ident = warren::cluster::Identity::new(
        warren::cluster::NodeInfo {
            name: "warren@127.0.0.1".into(),
            addr: "127.0.0.1:1".into(),
            ..Default::default()
        },
        9,
        COOKIE.into(),
    );
    let files = a.tls.clone().expect("A's files");
    let options = warren::config::ClusterTls {
        certfile: Some(files.certfile),
        keyfile: Some(files.keyfile),
        cacertfile: Some(files.cacertfile),
    };
    tls_ident.tls = Some(std::sync::Arc::new(
        warren::tls::MutualTls::new(&options).expect("A's TLS loads"),
    ));
    let r = warren::cluster::network::dial(&tls_ident, Some(&c.name()), &c.cluster_addr()).await;
    let err = r.err().expect("a TLS dial at a plain node succeeded");
    assert!(
        err.to_string()
            .contains("the peer does not use TLS between nodes"),
        "unclear error: {err}"
    );

    // Neither got in, however long they keep trying.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(a.members(), 1, "a foreign node joined A's cluster");
    assert_eq!(a.running(), vec![a.name()]);
    assert!(!a.log().contains("panicked"), "{}", a.log());
}

/// Rotating the CA of the inter-node connections without a restart: B's
/// certificate comes from a new CA, so it cannot join A; A's files are
/// replaced by ones from the new CA and reloaded (`POST
/// /api/warren/reload-tls`, what SIGHUP does): B joins, which takes both ends
/// of A's connections (B dials A to join, A dials B to replicate). A reload
/// whose files do not load is refused and changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reloads_its_inter_node_certificates() {
    let certs = Certs::new("reload");
    let (old, new) = (
        Ca::new("warren cluster CA 1"),
        Ca::new("warren cluster CA 2"),
    );
    let mut a = Node::new(1, "tlsre");
    let files = certs.node(&old, "ca", &a.ip);
    a.tls = Some(files.clone());
    a.start().await;
    eventually("A leads a cluster of one", Duration::from_secs(10), || {
        a.leader() == Some(a.name())
    })
    .await;
    let (_, checks) = a.get("/api/health/checks/certificate-expiration/1/months");
    assert_eq!(checks["status"], "ok", "{checks}");

    let mut b = Node::new(2, "tlsre");
    b.tls = Some(certs.node(&new, "new", &b.ip));
    b.seeds = vec![a.seed()];
    b.start().await;
    eventually(
        "B cannot join A, whose certificate it does not trust",
        Duration::from_secs(10),
        || b.log().contains("invalid peer certificate"),
    )
    .await;

    // Files that do not load: refused, the old configuration stays.
    std::fs::write(&files.keyfile, "not a key").expect("write");
    assert_eq!(a.send("POST", "/api/warren/reload-tls", None), 500);
    assert!(
        a.log().contains("inter-node certificate not reloaded"),
        "{}",
        a.log()
    );
    // The new CA's files in place of the old ones, then a reload.
    let leaf = new.issue_node(&a.ip);
    std::fs::write(&files.certfile, &leaf.cert_pem).expect("write");
    std::fs::write(&files.keyfile, &leaf.key_pem).expect("write");
    std::fs::write(&files.cacertfile, new.pem()).expect("write");
    assert_eq!(a.send("POST", "/api/warren/reload-tls", None), 204);
    eventually("B joined A", Duration::from_secs(20), || {
        a.members() == 2 && b.running().len() == 2
    })
    .await;
    let x = common::uniq("tlsre");
    declare(&b, &x, Duration::from_secs(10))
        .await
        .expect("declare on B answered -ok");
    wait_all_present(&a, std::slice::from_ref(&x), Duration::from_secs(10)).await;
    assert!(!a.log().contains("panicked"), "{}", a.log());
}
