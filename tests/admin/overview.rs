//! `/api/overview`, `/api/nodes`, `/api/whoami`, the health checks, and the memory
//! alarm as they show it.

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overview_nodes_whoami_health() {
    let b = start().await;
    let conn = b.amqp("guest", "guest", "/").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare("ov", QueueDeclareOptions::default(), FieldTable::default())
        .await
        .unwrap();
    ch.basic_publish(
        "",
        "ov",
        BasicPublishOptions::default(),
        b"x",
        BasicProperties::default(),
    )
    .await
    .unwrap();
    // basic.publish has no reply: wait until the broker has taken the message.
    let mut o = b.get("/api/overview").await;
    for _ in 0..100 {
        if o["queue_totals"]["messages_ready"] == 1 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        o = b.get("/api/overview").await;
    }
    assert_eq!(o["object_totals"]["connections"], 1);
    assert_eq!(o["object_totals"]["channels"], 1);
    assert_eq!(o["object_totals"]["queues"], 1);
    assert!(o["object_totals"]["exchanges"].as_u64().unwrap() >= 6);
    let types: Vec<&str> = o["exchange_types"]
        .as_array()
        .expect("exchange_types")
        .iter()
        .filter_map(|t| t["name"].as_str())
        .collect();
    assert_eq!(
        types,
        ["direct", "fanout", "headers", "topic", "x-delayed-message"]
    );
    assert_eq!(o["queue_totals"]["messages_ready"], 1);
    assert_eq!(o["queue_totals"]["messages"], 1);
    assert_eq!(o["message_stats"]["publish"], 1);
    assert!(o["message_stats"]["publish_details"]["rate"].is_number());
    assert!(o["rabbitmq_version"].is_string());
    assert!(o["node"].as_str().unwrap().starts_with("warren@"));
    let nodes = b.get("/api/nodes").await;
    assert_eq!(nodes[0]["running"], true);
    assert_eq!(nodes[0]["os_pid"], std::process::id().to_string());
    assert!(
        nodes[0]["fd_total"].as_u64().unwrap_or(0) >= nodes[0]["fd_used"].as_u64().unwrap_or(1)
    );
    let mechanisms = &nodes[0]["auth_mechanisms"];
    assert_eq!(mechanisms[0]["name"], "PLAIN", "{mechanisms}");
    assert_eq!(
        mechanisms[2]["enabled"], false,
        "EXTERNAL needs a TLS listener"
    );
    let node = nodes[0]["name"].as_str().unwrap().to_string();
    assert_eq!(b.get(&format!("/api/nodes/{node}")).await["name"], node);
    // RabbitMQ's other node figures: alone, no partitions; the data
    // directory; the management listener; the rates of the gauges.
    let n = &nodes[0];
    assert_eq!(n["partitions"], json!([]), "{n:#}");
    assert!(
        n.get("unreachable").is_none(),
        "internal field shown: {n:#}"
    );
    assert!(n["net_ticktime"].as_u64() >= Some(1), "{n:#}");
    assert!(n["context_switches"].as_u64() > Some(0), "{n:#}");
    assert!(n["run_queue"].is_u64(), "{n:#}");
    assert_eq!(n["rates_mode"], "basic");
    // Started without a configuration file; the log on standard output.
    assert_eq!(n["config_files"], json!([]), "{n:#}");
    assert_eq!(n["log_files"], json!(["<stdout>"]), "{n:#}");
    assert_eq!(n["mem_calculation_strategy"], "rss");
    assert_eq!(n["cluster_links"], json!([]), "alone: no links");
    assert!(
        n["db_dir"]
            .as_str()
            .is_some_and(|d| d.contains("warren-admin-test")),
        "{n:#}"
    );
    let port = b.base.rsplit(':').next().expect("port").to_string();
    assert_eq!(n["contexts"][0]["port"], port.as_str(), "{n:#}");
    assert!(n["disk_free_details"]["rate"].is_number(), "{n:#}");
    assert!(n["connection_created_details"]["rate"].is_number(), "{n:#}");
    let o = b.get("/api/overview").await;
    assert_eq!(o["contexts"][0]["node"], node.as_str(), "{o:#}");
    assert_eq!(o["sample_retention_policies"]["basic"], json!([600, 3600]));
    assert!(
        o["churn_rates"]["queue_declared_details"]["rate"].is_number(),
        "{o:#}"
    );
    assert_eq!(o["churn_rates"]["queue_declared"], 1);
    let me = b.get("/api/whoami").await;
    assert_eq!(me["name"], "guest");
    assert_eq!(me["tags"], json!(["administrator"]));
    assert_eq!(b.get("/api/health/checks/alarms").await["status"], "ok");
    assert_eq!(b.get("/api/nodes").await[0]["mem_alarm"], false);
    // RabbitMQ's other node checks, on a node alone.
    for check in ["node-is-quorum-critical", "node-is-mirror-sync-critical"] {
        let v = b.get(&format!("/api/health/checks/{check}")).await;
        assert_eq!(v, json!({"status": "ok", "reason": "single node cluster"}));
    }
    assert_eq!(
        b.get("/api/health/checks/virtual-hosts").await,
        json!({"status": "ok"})
    );
    assert_eq!(
        b.get("/api/healthchecks/node").await,
        json!({"status": "ok"})
    );
    assert_eq!(
        b.get(&format!("/api/healthchecks/node/{node}")).await["status"],
        "ok"
    );
    assert_eq!(
        b.call("GET", "/api/healthchecks/node/warren@nowhere", GUEST, None)
            .await
            .0,
        404
    );
    // The UI's SSO settings, asked before any login.
    assert_eq!(
        b.call("GET", "/api/auth", None, None).await,
        (
            200,
            json!({"enable_uaa": false, "uaa_client_id": "", "uaa_location": ""})
        )
    );
    // The memory breakdown: queued bodies are `queue_procs`, within the total.
    let conn = b.amqp("guest", "guest", "/").await.expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    let q = common::uniq("mem");
    ch.queue_declare(&q, Default::default(), Default::default())
        .await
        .expect("declare");
    let body = vec![7u8; 100_000];
    for _ in 0..10 {
        ch.basic_publish("", &q, Default::default(), &body, Default::default())
            .await
            .expect("publish");
    }
    let mut queued = 0;
    for _ in 0..100 {
        let m = b.get(&format!("/api/nodes/{node}/memory")).await;
        queued = m["memory"]["queue_procs"].as_u64().unwrap_or(0);
        if queued >= 1_000_000 {
            let rss = m["memory"]["total"]["rss"].as_u64().unwrap_or(0);
            assert!(queued <= rss, "{m}");
            assert_eq!(m["memory"]["strategy"], "rss");
            assert_eq!(m["memory"]["code"], 0, "no Erlang code: {m}");
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(queued >= 1_000_000, "queued bodies not counted: {queued}");
    let r = b.get(&format!("/api/nodes/{node}/memory/relative")).await;
    assert_eq!(r["memory"]["total"], 100, "{r}");
    assert!(r["memory"]["queue_procs"].as_u64().is_some(), "{r}");
    let n = b.get(&format!("/api/nodes/{node}?memory=true")).await;
    assert!(n["memory"]["total"]["rss"].as_u64().is_some(), "{n}");
    assert!(b
        .get(&format!("/api/nodes/{node}"))
        .await
        .get("memory")
        .is_none());
    let _ = conn.close(200, "bye").await;
    // The older name of the definitions export.
    let all = b.get("/api/all-configuration").await;
    assert!(all["queues"]
        .as_array()
        .is_some_and(|qs| qs.iter().any(|x| x["name"] == q.as_str())));
    assert_eq!(b.get("/api/aliveness-test/%2F").await["status"], "ok");
    assert_eq!(
        b.call("GET", "/api/aliveness-test/nope", GUEST, None)
            .await
            .0,
        404
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_alarm_shows_in_health_check_nodes_and_metrics() {
    let dir = std::env::temp_dir().join(format!(
        "warren-admin-alarm-{}-{}",
        std::process::id(),
        common::uniq("d")
    ));
    let mut config = warren::Config::for_tests(dir);
    config.admin_enabled = true;
    config.memory_high_watermark_bytes = 1;
    let w = warren::start(config).await.expect("broker starts");
    let b = Broker {
        amqp: w.amqp_addr(),
        base: format!("http://{}", w.admin_addr().expect("admin")),
        _warren: Some(w),
    };
    let mut status = 0;
    for _ in 0..100 {
        status = b
            .call("GET", "/api/health/checks/alarms", GUEST, None)
            .await
            .0;
        if status == 503 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(status, 503);
    let (_, v) = b
        .call("GET", "/api/health/checks/alarms", GUEST, None)
        .await;
    assert_eq!(v["status"], "failed");
    assert_eq!(v["alarms"][0]["resource"], "memory");
    assert_eq!(b.get("/api/nodes").await[0]["mem_alarm"], true);
    let (status, v) = b.call("GET", "/api/healthchecks/node", GUEST, None).await;
    assert_eq!((status, &v["status"]), (503, &json!("failed")), "{v}");
    let m = parse_metrics(&b.text("/metrics").await);
    assert_eq!(metric(&m, "rabbitmq_alarms_memory_used_watermark", ""), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_name_and_global_parameters() {
    let b = start().await;
    let node = b.get("/api/overview").await["node"].clone();
    assert_eq!(b.get("/api/cluster-name").await["name"], node);
    let (status, _) = b
        .call(
            "PUT",
            "/api/cluster-name",
            GUEST,
            Some(json!({"name": "rusty"})),
        )
        .await;
    assert_eq!(status, 204);
    assert_eq!(b.get("/api/cluster-name").await["name"], "rusty");
    assert_eq!(b.get("/api/overview").await["cluster_name"], "rusty");
    // What a new AMQP connection is told (`connection.start`).
    let c = common::raw::RawConn::start_at(b.amqp).await;
    let told = common::raw::lookup(&c.server_properties, "cluster_name").and_then(|v| v.as_str());
    assert_eq!(told.as_deref(), Some("rusty"));
    let all = b.get("/api/global-parameters").await;
    assert_eq!(all, json!([{"name": "cluster_name", "value": "rusty"}]));

    let created = b
        .ok(
            "PUT",
            "/api/global-parameters/knob",
            json!({"name": "knob", "value": {"a": 1}}),
        )
        .await;
    assert_eq!(created, 201);
    assert_eq!(
        b.get("/api/global-parameters/knob").await["value"],
        json!({"a": 1})
    );
    let (status, _) = b
        .call("PUT", "/api/global-parameters/knob", GUEST, Some(json!({})))
        .await;
    assert_eq!(status, 400, "no value");
    let (status, _) = b
        .call("DELETE", "/api/global-parameters/knob", GUEST, None)
        .await;
    assert_eq!(status, 204);
    let (status, _) = b
        .call("GET", "/api/global-parameters/knob", GUEST, None)
        .await;
    assert_eq!(status, 404);

    // In definitions, exported and imported.
    let defs = b.get("/api/definitions").await;
    assert_eq!(
        defs["global_parameters"],
        json!([{"name": "cluster_name", "value": "rusty"}])
    );
    b.ok(
        "POST",
        "/api/definitions",
        json!({"global_parameters": [{"name": "cluster_name", "value": "restored"}]}),
    )
    .await;
    assert_eq!(b.get("/api/cluster-name").await["name"], "restored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_churn_outlives_its_vhost() {
    let b = start().await;
    b.ok("PUT", "/api/vhosts/brief", json!({})).await;
    b.ok("PUT", "/api/queues/brief/q", json!({"durable": true}))
        .await;
    let before = b.get("/api/overview").await["churn_rates"].clone();
    assert_eq!(before["queue_created"], 1, "{before}");
    assert_eq!(
        b.call("DELETE", "/api/vhosts/brief", GUEST, None).await.0,
        204
    );
    // Counters never go down: the deleted vhost's declares stay counted.
    let after = b.get("/api/overview").await["churn_rates"].clone();
    assert_eq!(after["queue_created"], 1, "{after}");
    assert_eq!(after["queue_declared"], before["queue_declared"]);
}

/// `/api/feature-flags` lists RabbitMQ's flags for features warren has, all
/// enabled; enabling one is a no-op, an unknown one is refused.
/// `/api/deprecated-features` lists RabbitMQ's deprecated features and
/// `/used` the ones in use now (a global qos, a transient non-exclusive
/// queue). Administrators only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn feature_flags_and_deprecated_features() {
    let b = start().await;
    let flags = b.get("/api/feature-flags").await;
    let names: Vec<&str> = flags
        .as_array()
        .expect("a list")
        .iter()
        .map(|f| {
            assert_eq!(f["state"], "enabled", "{f}");
            assert_eq!(f["stability"], "stable", "{f}");
            assert!(f["desc"].is_string() && f["provided_by"].is_string(), "{f}");
            f["name"].as_str().expect("name")
        })
        .collect();
    for n in [
        "quorum_queue",
        "stream_queue",
        "stream_filtering",
        "detailed_queues_endpoint",
    ] {
        assert!(names.contains(&n), "{n} in {names:?}");
    }
    assert!(!names.contains(&"classic_mirrored_queue_version"));
    let enable = |name: &str| format!("/api/feature-flags/{name}/enable");
    assert_eq!(
        b.call("PUT", &enable("quorum_queue"), GUEST, Some(json!({})))
            .await
            .0,
        204
    );
    assert_eq!(
        b.call("PUT", &enable("khepri_db"), GUEST, Some(json!({})))
            .await
            .0,
        400
    );

    let all = b.get("/api/deprecated-features").await;
    let phase = |name: &str| {
        all.as_array()
            .expect("a list")
            .iter()
            .find(|d| d["name"] == name)
            .map(|d| d["deprecation_phase"].clone())
    };
    assert_eq!(phase("ram_node_type"), Some(json!("removed")));
    assert_eq!(phase("global_qos"), Some(json!("permitted_by_default")));
    let used = |v: &Value| -> Vec<String> {
        v.as_array()
            .expect("a list")
            .iter()
            .map(|d| d["name"].as_str().expect("name").to_string())
            .collect()
    };
    assert!(used(&b.get("/api/deprecated-features/used").await).is_empty());
    let conn = b.amqp("guest", "guest", "/").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(5, BasicQosOptions { global: true })
        .await
        .unwrap();
    ch.queue_declare(
        "transient",
        QueueDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .unwrap();
    assert_eq!(
        used(&b.get("/api/deprecated-features/used").await),
        ["global_qos", "transient_nonexcl_queues"]
    );
    ch.queue_delete("transient", QueueDeleteOptions::default())
        .await
        .unwrap();
    let _ = conn.close(200, "bye").await;

    assert_eq!(b.get("/api/extensions").await, json!([]));
    // The detailed queue listing is the listing.
    assert!(b.get("/api/queues/detailed").await.is_array());
    // Administrators only.
    b.ok(
        "PUT",
        "/api/users/mon",
        json!({"password": "p", "tags": "monitoring"}),
    )
    .await;
    assert_eq!(
        b.call("GET", "/api/feature-flags", Some(("mon", "p")), None)
            .await
            .0,
        401
    );
}
