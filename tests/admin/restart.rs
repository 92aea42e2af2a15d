//! Users, permissions, policies and vhosts made through the API survive a restart of
//! a broker process.

use crate::helpers::*;

/// A broker process with admin enabled on `dir`; (child, amqp port, admin base URL).
pub(crate) async fn spawn_process(dir: &std::path::Path) -> (std::process::Child, u16, String) {
    let free = || crate::common::free_port("127.0.0.1");
    let (amqp, admin) = (free(), free());
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_warren"))
        .env("WARREN_AMQP_PORT", amqp.to_string())
        .env("WARREN_ADMIN_PORT", admin.to_string())
        .env("WARREN_BIND", "127.0.0.1")
        .env("WARREN_PROMETHEUS_ENABLED", "false")
        .env("WARREN_DATA_DIR", dir)
        .env("WARREN_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn warren");
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", admin))
            .await
            .is_ok()
        {
            return (child, amqp, format!("http://127.0.0.1:{admin}"));
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("warren did not start");
}

pub(crate) fn stop_process(mut child: std::process::Child) {
    crate::common::process::stop_cleanly(&mut child);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn users_permissions_policies_vhosts_survive_restart() {
    let dir = std::env::temp_dir().join(format!("warren-admin-restart-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (child, amqp, base) = spawn_process(&dir).await;
    let b = Broker {
        _warren: None,
        amqp: ([127, 0, 0, 1], amqp).into(),
        base,
    };
    b.ok(
        "PUT",
        "/api/vhosts/kept",
        json!({"description": "kept one", "tags": "a,b", "default_queue_type": "quorum", "tracing": true}),
    )
    .await;
    b.ok(
        "PUT",
        "/api/users/carol",
        json!({"password": "c", "tags": "administrator"}),
    )
    .await;
    b.ok(
        "PUT",
        "/api/permissions/kept/carol",
        json!({"configure": "^c", "write": ".*", "read": ".*"}),
    )
    .await;
    b.ok(
        "PUT",
        "/api/policies/kept/lim",
        json!({"pattern": ".*", "definition": {"max-length": 3}}),
    )
    .await;
    b.ok("PUT", "/api/vhosts/gone", json!({})).await;
    assert_eq!(
        b.call("DELETE", "/api/vhosts/gone", GUEST, None).await.0,
        204
    );
    // The default user can be deleted and stays deleted.
    let carol = Some(("carol", "c"));
    assert_eq!(
        b.call("DELETE", "/api/users/guest", carol, None).await.0,
        204
    );
    stop_process(child);

    let (child, amqp, base) = spawn_process(&dir).await;
    let b = Broker {
        _warren: None,
        amqp: ([127, 0, 0, 1], amqp).into(),
        base,
    };
    assert_eq!(b.call("GET", "/api/whoami", GUEST, None).await.0, 401);
    let (s, p) = b
        .call("GET", "/api/permissions/kept/carol", carol, None)
        .await;
    assert_eq!(s, 200, "{p}");
    assert_eq!(p["configure"], "^c");
    let (_, pol) = b.call("GET", "/api/policies/kept/lim", carol, None).await;
    assert_eq!(pol["definition"]["max-length"], 3);
    assert_eq!(b.call("GET", "/api/vhosts/gone", carol, None).await.0, 404);
    // Metadata is stored with the vhost; the firehose is not (off after a
    // restart, as in RabbitMQ).
    let (_, kept) = b.call("GET", "/api/vhosts/kept", carol, None).await;
    assert_eq!(kept["description"], "kept one", "{kept}");
    assert_eq!(kept["tags"], json!(["a", "b"]));
    assert_eq!(kept["default_queue_type"], "quorum");
    assert_eq!(kept["tracing"], false);
    b.amqp("carol", "c", "kept")
        .await
        .expect("carol connects after restart");
    stop_process(child);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A broker process killed if the test fails before it stops it.
struct Reaped(Option<std::process::Child>);

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What the API answered it made is there after a SIGKILL sent the moment
/// the answer came: the answer waited for the store's flush.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_api_changes_survive_an_immediate_kill_9() {
    for round in 0..5 {
        let dir = std::env::temp_dir().join(crate::common::uniq("warren-admin-kill9"));
        let _ = std::fs::remove_dir_all(&dir);
        let (child, amqp, base) = spawn_process(&dir).await;
        let first = Reaped(Some(child));
        let b = Broker {
            _warren: None,
            amqp: ([127, 0, 0, 1], amqp).into(),
            base,
        };
        b.ok("PUT", "/api/queues/%2F/api-kept", json!({"durable": true}))
            .await;
        b.ok(
            "PUT",
            "/api/policies/%2F/api-lim",
            json!({"pattern": "^api-", "definition": {"max-length": 7}}),
        )
        .await;
        drop(first); // SIGKILL
        let (child, amqp, base) = spawn_process(&dir).await;
        let mut second = Reaped(Some(child));
        let b = Broker {
            _warren: None,
            amqp: ([127, 0, 0, 1], amqp).into(),
            base,
        };
        let (s, q) = b.call("GET", "/api/queues/%2F/api-kept", GUEST, None).await;
        assert_eq!(s, 200, "round {round}: the queue is gone: {q}");
        let (s, p) = b
            .call("GET", "/api/policies/%2F/api-lim", GUEST, None)
            .await;
        assert_eq!(s, 200, "round {round}: the policy is gone: {p}");
        if let Some(child) = second.0.take() {
            stop_process(child);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
