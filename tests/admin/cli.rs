//! The `warren` CLI subcommands (a small `rabbitmqctl`) against the API.

use crate::helpers::*;

/// Run `warren <args>` (the CLI) against `base`; (success, stdout, stderr).
async fn cli(base: &str, args: &[&str]) -> (bool, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_warren"));
    cmd.arg("--url").arg(base).args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output().expect("run warren"))
        .await
        .expect("task");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_subcommands_talk_to_the_api() {
    let b = start().await;
    let base = b.base.clone();
    let (ok, out, err) = cli(&base, &["add-user", "dave", "pw", "--tags", "management"]).await;
    assert!(ok, "{err}");
    assert_eq!(out, "Added user 'dave'\n");
    assert!(
        cli(
            &base,
            &["set-permissions", "-p", "/", "dave", "^d", ".*", ".*"]
        )
        .await
        .0
    );
    assert_eq!(b.get("/api/permissions/%2F/dave").await["configure"], "^d");
    let (_, users, _) = cli(&base, &["list-users"]).await;
    assert!(users.starts_with("user   tags\n"), "{users}");
    assert!(users.contains("dave   management\n"), "{users}");

    b.ok("PUT", "/api/queues/%2F/cli.q", json!({})).await;
    b.ok(
        "POST",
        "/api/exchanges/%2F/amq.default/publish",
        json!({"properties": {}, "routing_key": "cli.q", "payload": "x", "payload_encoding": "string"}),
    )
    .await;
    let (_, queues, _) = cli(&base, &["list-queues"]).await;
    let lines: Vec<&str> = queues.lines().collect();
    assert_eq!(
        lines[0],
        "name   messages  messages_ready  messages_unacknowledged  consumers"
    );
    assert_eq!(
        lines[1],
        "cli.q  1         1               0                        0"
    );
    let (_, ex, _) = cli(&base, &["list-exchanges"]).await;
    assert!(
        ex.lines()
            .any(|l| l.split_whitespace().take(2).eq(["amq.topic", "topic"])),
        "{ex}"
    );
    let (_, bindings, _) = cli(&base, &["list-bindings"]).await;
    assert!(bindings.contains("cli.q"), "{bindings}");
    let (ok, conns, _) = cli(&base, &["list-connections"]).await;
    assert!(ok && conns.starts_with("name"), "{conns}");
    assert!(cli(&base, &["purge-queue", "cli.q"]).await.0);
    assert_eq!(b.get("/api/queues/%2F/cli.q").await["messages_ready"], 0);
    assert!(cli(&base, &["delete-queue", "cli.q"]).await.0);
    assert_eq!(
        b.call("GET", "/api/queues/%2F/cli.q", GUEST, None).await.0,
        404
    );
    assert!(cli(&base, &["delete-user", "dave"]).await.0);
    let (ok, _, err) = cli(&base, &["delete-user", "dave"]).await;
    assert!(!ok);
    assert!(err.contains("404"), "{err}");
    let (ok, _, err) = cli(&base, &["-u", "guest", "--password", "bad", "list-users"]).await;
    assert!(!ok);
    assert!(err.contains("401"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clear_password_leaves_a_user_that_password_logins_refuse() {
    let b = start().await;
    let base = b.base.clone();
    assert!(
        cli(&base, &["add-user", "erin", "pw", "--tags", "management"])
            .await
            .0
    );
    let (ok, out, err) = cli(&base, &["clear-password", "erin"]).await;
    assert!(ok, "{err}");
    assert_eq!(out, "Cleared password for user 'erin'\n");
    let user = b.get("/api/users/erin").await;
    assert_eq!(user["password_hash"], "", "{user}");
    assert_eq!(user["tags"], json!(["management"]), "tags kept: {user}");
    let (status, _) = b
        .call("GET", "/api/whoami", Some(("erin", "pw")), None)
        .await;
    assert_eq!(status, 401, "the old password no longer works");
    let (status, _) = b.call("GET", "/api/whoami", Some(("erin", "")), None).await;
    assert_eq!(status, 401, "nor does an empty one");
}
