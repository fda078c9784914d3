//! Several server replicas on one PostgreSQL: topology changes cross
//! replicas through LISTEN/NOTIFY, allocations stay unique, and a replica
//! rides out a database outage without a restart of its own.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::{collections::HashSet, path::PathBuf, process::Command, time::Duration};

use common::*;
use sqlx::PgPool;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use weft_proto::v1::{self as pb, peer_event::Event};
use weft_server::store::MIGRATOR;

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_change_through_one_replica_reaches_watchers_of_another(pool: PgPool) {
    let a = start(pool.clone()).await;
    let b = start(pool).await;
    a.register("node-a", 1).await;
    let mut watcher = watch(&b, "node-x", 0).await;
    let snap = next_event(&mut watcher).await;
    let reg = a.register("node-b", 2).await;
    let ev = next_event(&mut watcher).await;
    assert_eq!(ev.revision, snap.revision + 1);
    assert_eq!(ev.revision, reg.revision);
    assert!(matches!(ev.event, Some(Event::Upsert(ref p)) if p.node_name == "node-b"));
    a.admin()
        .delete_node(pb::DeleteNodeRequest {
            name: "node-a".into(),
        })
        .await
        .unwrap();
    let ev = next_event(&mut watcher).await;
    assert_eq!(ev.event, Some(Event::Delete("node-a".into())));
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn concurrent_allocations_split_across_replicas_are_unique(pool: PgPool) {
    let replicas = [start(pool.clone()).await, start(pool.clone()).await];
    for n in 0..8u8 {
        replicas[0].register(&format!("node-{n}"), n + 1).await;
    }
    // 64 over eight nodes and 64 into one node, alternating replicas.
    let calls = (0..128).map(|i| {
        let mut ipam = replicas[i % 2].ipam();
        let node = if i < 64 {
            format!("node-{}", i % 8)
        } else {
            "node-0".to_owned()
        };
        async move {
            ipam.allocate(allocate_req(&node, &format!("c{i}"), "eth0"))
                .await
                .map(|r| r.into_inner().address)
        }
    });
    let addrs: Vec<String> = futures::future::join_all(calls)
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(addrs.iter().collect::<HashSet<_>>().len(), 128);
    let (count, distinct): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT address) FROM allocations")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!((count, distinct), (128, 128));
}

/// A PostgreSQL of the test's own, to take down and bring back.
struct OwnPostgres {
    dir: PathBuf,
}

impl OwnPostgres {
    fn script() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/pg.sh")
    }

    fn start() -> (Self, String) {
        let dir = std::env::temp_dir().join(format!("weft-pg-outage-{}", std::process::id()));
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let out = Command::new(Self::script())
            .arg("start")
            .arg(&dir)
            .arg(port.to_string())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (
            Self { dir },
            String::from_utf8(out.stdout).unwrap().trim().to_owned(),
        )
    }

    fn run(&self, verb: &str) {
        let out = Command::new(Self::script())
            .arg(verb)
            .arg(&self.dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg.sh {verb}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let _ = Command::new(Self::script())
            .arg("stop")
            .arg(&self.dir)
            .output();
    }
}

async fn health(ts: &TestServer) -> i32 {
    HealthClient::new(ts.channel.clone())
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .map(|r| r.into_inner().status)
        .unwrap_or(-1)
}

async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..300 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_ride_out_a_postgres_restart_under_load() {
    if !nix_is_root() {
        assert!(
            std::env::var("CI").is_err(),
            "this test needs root (runuser) in CI"
        );
        eprintln!("skipping: needs root to run a PostgreSQL of its own");
        return;
    }
    let (pg, url) = OwnPostgres::start();
    let pool = || async {
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(2))
            .connect(&url)
            .await
            .unwrap()
    };
    let first = pool().await;
    MIGRATOR.run(&first).await.unwrap();
    let a = start(first).await;
    let b = start(pool().await).await;
    a.register("node-a", 1).await;
    b.register("node-b", 2).await;
    let mut watcher = watch(&b, "node-x", 0).await;
    next_event(&mut watcher).await;

    // Allocation load on both replicas across the outage.
    let load = {
        let (ia, ib) = (a.ipam(), b.ipam());
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0, 0);
            for i in 0..300 {
                let mut ipam = if i % 2 == 0 { ia.clone() } else { ib.clone() };
                let node = if i % 2 == 0 { "node-a" } else { "node-b" };
                let mut req = tonic::Request::new(allocate_req(node, &format!("load{i}"), "eth0"));
                req.set_timeout(Duration::from_secs(5));
                match ipam.allocate(req).await {
                    Ok(_) => ok += 1,
                    Err(_) => failed += 1,
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (ok, failed)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    pg.run("halt");
    eventually("replica a to report NOT_SERVING", async || {
        health(&a).await == ServingStatus::NotServing as i32
    })
    .await;
    // UNAVAILABLE, never INTERNAL: the plugin must answer 11 (retry),
    // not 100, while the database restarts.
    let err = a.allocate("node-a", "during-outage").await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");

    pg.run("resume");
    for ts in [&a, &b] {
        eventually("SERVING again", async || {
            health(ts).await == ServingStatus::Serving as i32
        })
        .await;
    }
    let (ok, failed) = load.await.unwrap();
    assert!(
        ok > 0 && failed > 0,
        "the load ran across the outage ({ok} ok, {failed} failed)"
    );

    // Both replicas serve again, and topology changes still cross them.
    a.allocate("node-a", "after").await.unwrap();
    b.allocate("node-b", "after-b").await.unwrap();
    a.register("node-c", 3).await;
    eventually("the watcher on b to hear about node-c", async || {
        match tokio::time::timeout(Duration::from_millis(200), watcher.message()).await {
            Ok(Ok(Some(ev))) => matches!(ev.event, Some(Event::Upsert(ref p)) if p.node_name == "node-c")
                || matches!(ev.event, Some(Event::Snapshot(ref s)) if s.peers.iter().any(|p| p.node_name == "node-c")),
            _ => false,
        }
    })
    .await;
    let (count, distinct): (i64, i64) =
        sqlx::query_as("SELECT count(*), count(DISTINCT address) FROM allocations")
            .fetch_one(&pool().await)
            .await
            .unwrap();
    assert_eq!(count, distinct, "no doubled address across the outage");
}

fn nix_is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}
