//! Issue 12's server defects, each tried the way it would be broken: a
//! second connection holding the lock Allocate relies on, a node claiming
//! another's tunnel endpoint, connections that die without a FIN, a burst
//! from one node, a serving role trying to rewrite the audit log, replicas
//! with different layouts.
//! (Over 400 lines: one suite, a test per behaviour.)

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use common::*;
use sqlx::PgPool;
use tokio::net::{TcpListener, TcpStream};
use tonic::{Code, transport::Channel};
use weft_proto::v1::{self as pb, topology_client::TopologyClient};
use weft_server::{
    Keepalive, RunningServer,
    api::{MAX_CALLS_PER_NODE, MAX_STREAMS_PER_NODE},
    store::MIGRATOR,
};

/// Waits until some other backend waits on a lock.
async fn wait_for_lock_waiter(pool: &PgPool) {
    for _ in 0..500 {
        let waiting: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE wait_event_type = 'Lock' AND datname = current_database()",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        if waiting > 0 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no call queued on the lock within 5 s");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn allocate_queued_behind_a_release_answers_from_the_table(pool: PgPool) {
    let ts = start(pool.clone()).await;
    ts.register("node-a", 1).await;
    let first = ts.allocate("node-a", "c1").await.unwrap().address;

    // A second connection does what Release/Gc do: holds the node row and
    // deletes the attachment's allocation, then commits while Allocate for
    // the same attachment waits on the row.
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM nodes WHERE name = 'node-a' FOR UPDATE")
        .execute(&mut *holder)
        .await
        .unwrap();
    sqlx::query("DELETE FROM allocations WHERE container_id = 'c1'")
        .execute(&mut *holder)
        .await
        .unwrap();
    let mut ipam = ts.ipam();
    let call =
        tokio::spawn(async move { ipam.allocate(allocate_req("node-a", "c1", "eth0")).await });
    wait_for_lock_waiter(&pool).await;
    holder.commit().await.unwrap();
    let answer = call.await.unwrap().unwrap().into_inner().address;

    let held: Vec<String> = sqlx::query_scalar(
        "SELECT host(address) || '/24' FROM allocations WHERE container_id = 'c1'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        held,
        std::slice::from_ref(&answer),
        "Allocate answered {answer} (first {first}); the table holds {held:?}"
    );
    assert_ne!(
        answer, first,
        "round-robin: the released address is not reused at once"
    );
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_reserve_queued_behind_a_writer_of_the_node_never_grants_what_it_wrote(pool: PgPool) {
    let ts = start(pool.clone()).await;
    let reg = ts.register("node-a", 1).await;
    // A second connection does what Report/Sync/Allocate do: holds the node
    // row and records addresses, then commits while a Reserve for the same
    // node waits on the row.
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM nodes WHERE name = 'node-a' FOR UPDATE")
        .execute(&mut *holder)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO allocations (address, node_name, container_id, ifname)
         VALUES ('10.244.0.2', 'node-a', 'c1', 'eth0'), ('10.244.0.3', 'node-a', 'c2', 'eth0')",
    )
    .execute(&mut *holder)
    .await
    .unwrap();
    let mut ipam = ts.ipam();
    let call = tokio::spawn(async move {
        ipam.reserve(pb::ReserveRequest {
            node_name: "node-a".into(),
            epoch: reg.epoch,
            count: 4,
            adopt: false,
        })
        .await
    });
    wait_for_lock_waiter(&pool).await;
    holder.commit().await.unwrap();
    let granted = call.await.unwrap().unwrap().into_inner().addresses;
    assert_eq!(
        granted,
        ["10.244.0.4", "10.244.0.5", "10.244.0.6", "10.244.0.7"],
        "the reserve saw the rows committed while it waited"
    );
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_node_cannot_claim_another_nodes_vtep_mac_or_underlay(pool: PgPool) {
    let ts = start(pool.clone()).await;
    ts.register("node-a", 1).await;
    ts.register("node-b", 2).await;
    for (req, field) in [
        // node-b asks for node-a's MAC, then node-a's underlay address.
        (register_req("node-b", 2, 1), "vtep_mac"),
        (register_req("node-b", 1, 2), "underlay_ip"),
        // A new node with node-a's endpoint.
        (register_req("node-c", 3, 1), "vtep_mac"),
        (register_req("node-c", 1, 3), "underlay_ip"),
    ] {
        let err = ts.topology().register_node(req.clone()).await.unwrap_err();
        assert_eq!(err.code(), Code::AlreadyExists, "{req:?}: {err:?}");
        assert!(
            err.message().contains(field) && err.message().contains("node-a"),
            "{}",
            err.message()
        );
    }
    let nodes: Vec<(String, String, String)> =
        sqlx::query_as("SELECT name, host(underlay_ip), vtep_mac::text FROM nodes ORDER BY name")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        nodes,
        [
            (
                "node-a".into(),
                "198.51.100.1".into(),
                "02:00:00:00:00:01".into()
            ),
            (
                "node-b".into(),
                "198.51.100.2".into(),
                "02:00:00:00:00:02".into()
            ),
        ]
    );
    let denied: Vec<(String, String)> = sqlx::query_as(
        "SELECT node_name, detail FROM audit_log WHERE action = 'denied' ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(denied.len(), 4, "{denied:?}");
    assert!(denied.iter().all(|(_, d)| d.starts_with("RegisterNode")));

    // The schema refuses it too, whatever the server does.
    let err = sqlx::query("UPDATE nodes SET vtep_mac = '02:00:00:00:00:01' WHERE name = 'node-b'")
        .execute(&pool)
        .await
        .unwrap_err();
    assert_eq!(
        err.as_database_error().unwrap().code().as_deref(),
        Some("23505")
    );
}

/// Copies `r` to `w` until `blackhole` is set; from then on it swallows
/// everything and never closes: a peer gone without a FIN.
async fn pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    blackhole: Arc<AtomicBool>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if !blackhole.load(Ordering::SeqCst) && w.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    std::future::pending::<()>().await;
}

/// A TCP forwarder to `target` that can be turned into a black hole.
async fn blackhole_proxy(target: std::net::SocketAddr, blackhole: Arc<AtomicBool>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (client, _) = listener.accept().await.unwrap();
            let server = TcpStream::connect(target).await.unwrap();
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::spawn(pump(cr, sw, blackhole.clone()));
            tokio::spawn(pump(sr, cw, blackhole.clone()));
        }
    });
    format!("http://{addr}")
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn watch_slots_of_connections_dropped_without_fin_come_back(pool: PgPool) {
    let mut settings = settings();
    settings.keepalive = Keepalive {
        interval: Duration::from_secs(1),
        timeout: Duration::from_secs(1),
    };
    let ts = start_with(pool, settings).await;
    ts.register("node-a", 1).await;

    let blackhole = Arc::new(AtomicBool::new(false));
    let via = blackhole_proxy(ts.server.grpc_addr, blackhole.clone()).await;
    // A client without keepalive of its own, as a crashed agent would be.
    let mut streams = Vec::new();
    for _ in 0..MAX_STREAMS_PER_NODE {
        let channel = Channel::from_shared(via.clone())
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut stream = TopologyClient::new(channel)
            .watch_peers(pb::WatchPeersRequest {
                node_name: "node-a".into(),
                since_revision: 0,
                snapshot_page_size: 0,
            })
            .await
            .unwrap()
            .into_inner();
        next_event(&mut stream).await;
        streams.push(stream);
    }
    let watch = || async {
        ts.topology()
            .watch_peers(pb::WatchPeersRequest {
                node_name: "node-a".into(),
                since_revision: 0,
                snapshot_page_size: 0,
            })
            .await
    };
    assert_eq!(
        watch().await.unwrap_err().code(),
        Code::ResourceExhausted,
        "all slots are held"
    );
    blackhole.store(true, Ordering::SeqCst);

    // The server's PINGs go unanswered; it drops those connections and
    // their slots. Nothing else would: the watchers have nothing to send.
    let mut last = None;
    for _ in 0..150 {
        match watch().await {
            Ok(_) => return,
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("slots not given back within 15 s: {last:?}");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_deleted_nodes_block_is_quarantined_then_freed(pool: PgPool) {
    let mut settings = settings();
    settings.block_quarantine = Duration::from_secs(2);
    let ts = start_with(pool, settings).await;
    ts.register("node-a", 1).await;
    ts.register("node-b", 2).await;
    ts.admin()
        .delete_node(pb::DeleteNodeRequest {
            name: "node-a".into(),
        })
        .await
        .unwrap();
    // node-a's agent may still wire pods in 10.244.0.0/24.
    assert_eq!(ts.register("node-c", 3).await.block, "10.244.2.0/24");
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(ts.register("node-d", 4).await.block, "10.244.0.0/24");
    // node-a comes back later: the block is gone, it gets a fresh one.
    assert_eq!(ts.register("node-a", 1).await.block, "10.244.3.0/24");
}

/// SQLSTATE of a statement run as `pool`'s role.
async fn sqlstate(pool: &PgPool, sql: &'static str) -> Option<String> {
    match sqlx::query(sql).execute(pool).await {
        Ok(_) => None,
        Err(e) => Some(
            e.as_database_error()
                .and_then(|d| d.code().map(|c| c.into_owned()))
                .unwrap_or_else(|| e.to_string()),
        ),
    }
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn the_serving_role_may_only_read_and_append_the_audit_log(pool: PgPool) {
    let ts = start(pool.clone()).await;
    ts.register("node-a", 1).await;
    let serving = serving_pool(&pool).await;
    let role: String = sqlx::query_scalar("SELECT current_user::text")
        .fetch_one(&serving)
        .await
        .unwrap();
    assert_eq!(role, SERVING_ROLE);
    assert_eq!(
        sqlstate(
            &serving,
            "INSERT INTO audit_log (action, actor, node_name) VALUES ('denied', 't', 'n')"
        )
        .await,
        None
    );
    assert_eq!(
        sqlstate(&serving, "SELECT count(*) FROM audit_log").await,
        None
    );
    for sql in [
        "DELETE FROM audit_log",
        "UPDATE audit_log SET actor = 'someone else'",
        "TRUNCATE audit_log",
        "DROP TRIGGER audit_log_append_only ON audit_log",
        "ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only",
        "DROP TABLE audit_log",
        "ALTER TABLE nodes DROP CONSTRAINT nodes_vtep_mac_key",
    ] {
        assert_eq!(
            sqlstate(&serving, sql).await.as_deref(),
            Some("42501"),
            "{sql} must be refused for the serving role"
        );
    }
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_log")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 2, "node_register and the appended row");

    // The owner archives old rows as docs/operations.md says.
    let mut tx = pool.begin().await.unwrap();
    for sql in [
        "ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only",
        "DELETE FROM audit_log WHERE action = 'denied'",
        "ALTER TABLE audit_log ENABLE TRIGGER audit_log_append_only",
    ] {
        sqlx::query(sql).execute(&mut *tx).await.unwrap();
    }
    tx.commit().await.unwrap();
    assert_eq!(ts.audit_count("denied").await, 0);
    assert_eq!(ts.audit_count("node_register").await, 1);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_replica_with_another_layout_refuses_to_serve(pool: PgPool) {
    let ts = start(pool.clone()).await;
    ts.register("node-a", 1).await;
    for (cidr, prefix) in [
        ("10.244.0.0/16", 25),
        ("10.245.0.0/16", 24),
        ("10.244.0.0/15", 24),
    ] {
        let mut other = settings();
        other.layout = layout(cidr, prefix);
        let err = RunningServer::start(
            other,
            serving_pool(&pool).await,
            TcpListener::bind("127.0.0.1:0").await.unwrap(),
            TcpListener::bind("127.0.0.1:0").await.unwrap(),
        )
        .await
        .unwrap_err();
        assert!(
            err.to_string().contains("10.244.0.0/16 with /24"),
            "{cidr} /{prefix}: {err}"
        );
    }
    // Without any node yet the layout is still the first server's.
    let stored: (String, i32) =
        sqlx::query_as("SELECT cluster_cidr::text, node_prefix_len FROM cluster_layout")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(stored, ("10.244.0.0/16".into(), 24));
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn the_schema_refuses_overlapping_blocks_and_prefix_allocations(pool: PgPool) {
    let ts = start(pool.clone()).await;
    ts.register("node-a", 1).await;
    let code = |sql: &'static str| {
        let pool = pool.clone();
        async move { sqlstate(&pool, sql).await }
    };
    assert_eq!(
        code(
            "INSERT INTO nodes (name, underlay_ip, vtep_mac, block_index, block)
             VALUES ('x', '198.51.100.9', '02:00:00:00:00:09', 99, '10.244.0.128/25')"
        )
        .await
        .as_deref(),
        Some("23P01"),
        "overlapping block"
    );
    assert_eq!(
        code(
            "INSERT INTO allocations (address, node_name, container_id, ifname)
             VALUES ('10.244.0.9/24', 'node-a', 'c', 'eth0')"
        )
        .await
        .as_deref(),
        Some("23514"),
        "a prefix, not a host address"
    );
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn history_is_paged(pool: PgPool) {
    let ts = start(pool).await;
    ts.register("node-a", 1).await;
    // 13 entries for one container id: allocate/release pairs and more.
    for _ in 0..6 {
        ts.allocate("node-a", "c1").await.unwrap();
        ts.release("node-a", "c1").await.unwrap();
    }
    ts.allocate("node-a", "c1").await.unwrap();
    let mut token = String::new();
    let mut pages = Vec::new();
    loop {
        let page = ts
            .admin()
            .history(pb::HistoryRequest {
                container_id: "c1".into(),
                page_size: 5,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        pages.push(page.entries.len());
        let ids: Vec<u64> = page.entries.iter().map(|e| e.id).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(pages, [5, 5, 3]);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_watcher_far_behind_gets_a_snapshot_not_the_whole_replay(pool: PgPool) {
    let ts = start(pool).await;
    ts.register("node-a", 1).await;
    let behind = ts.register("node-b", 2).await.revision;
    // More changes than one replay carries (store::MAX_REPLAY).
    for i in 0..(weft_server::store::MAX_REPLAY + 10) {
        let mac = if i % 2 == 0 { 0x22 } else { 2 };
        ts.topology()
            .register_node(register_req("node-b", 2, mac))
            .await
            .unwrap();
    }
    let mut stream = watch(&ts, "node-a", behind).await;
    let first = next_event(&mut stream).await;
    assert!(
        matches!(first.event, Some(pb::peer_event::Event::Snapshot(_))),
        "{first:?}"
    );
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn one_nodes_burst_leaves_connections_for_the_others(pool: PgPool) {
    let ts = start(pool.clone()).await;
    ts.register("node-a", 1).await;
    ts.register("node-b", 2).await;
    // node-a's calls all queue on its row, as if its transactions were slow.
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("SELECT 1 FROM nodes WHERE name = 'node-a' FOR UPDATE")
        .execute(&mut *holder)
        .await
        .unwrap();
    let burst: Vec<_> = (0..32)
        .map(|i| {
            let mut ipam = ts.ipam();
            tokio::spawn(async move {
                ipam.allocate(allocate_req("node-a", &format!("burst-{i}"), "eth0"))
                    .await
            })
        })
        .collect();
    wait_for_lock_waiter(&pool).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let waiting: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
         WHERE wait_event_type = 'Lock' AND datname = current_database()",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(
        waiting as usize <= MAX_CALLS_PER_NODE,
        "{waiting} connections wait for node-a's row"
    );
    // node-b is served while node-a's burst is stuck.
    let b = tokio::time::timeout(Duration::from_secs(10), ts.allocate("node-b", "b1"))
        .await
        .expect("node-b's Allocate hung");
    assert!(b.is_ok(), "{b:?}");
    holder.commit().await.unwrap();
    for call in burst {
        call.await.unwrap().unwrap();
    }
    let n: i64 = sqlx::query_scalar("SELECT count(DISTINCT address) FROM allocations")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 33);
}

/// The stale-node policy: a node silent past `--stale-node-after` is
/// fenced and deleted, its addresses released and its block quarantined,
/// then reclaimed; a node that keeps heartbeating is never touched.
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_silent_node_is_fenced_and_its_block_reclaimed_after_quarantine_a_live_one_kept(
    pool: PgPool,
) {
    let mut settings = settings();
    settings.stale_node_after = Some(Duration::from_secs(2));
    settings.block_quarantine = Duration::from_secs(4);
    let ts = start_with(pool.clone(), settings).await;
    assert_eq!(ts.register("node-a", 1).await.block, "10.244.0.0/24");
    assert_eq!(ts.register("node-b", 2).await.block, "10.244.1.0/24");
    let address = ts.allocate("node-b", "ctr-b").await.unwrap().address;
    let beating = Arc::new(AtomicBool::new(true));
    let heartbeats = tokio::spawn({
        let (mut topology, beating) = (ts.topology(), beating.clone());
        async move {
            while beating.load(Ordering::SeqCst) {
                topology
                    .heartbeat(pb::HeartbeatRequest {
                        node_name: "node-a".into(),
                    })
                    .await
                    .expect("a live node's heartbeat");
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        }
    });

    let gone = async {
        loop {
            let got = ts
                .admin()
                .get_node(pb::GetNodeRequest {
                    name: "node-b".into(),
                })
                .await;
            if got.is_err_and(|s| s.code() == Code::NotFound) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), gone)
        .await
        .expect("node-b fenced within 10 s");
    // node-b's block is quarantined: a node joining now gets another one.
    assert_eq!(ts.register("node-c", 3).await.block, "10.244.2.0/24");

    // Audited: the node and its address, by the policy.
    let rows: Vec<(String, String, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT action, actor, host(address), detail FROM audit_log
         WHERE node_name = 'node-b' AND action IN ('release', 'node_stale') ORDER BY id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(rows[0].0, "release");
    assert_eq!(rows[0].2.as_deref(), address.split('/').next());
    assert_eq!(rows[1].0, "node_stale");
    assert!(
        rows.iter().all(|r| r.1.contains("stale-node policy")),
        "{rows:?}"
    );
    assert!(
        rows[1]
            .3
            .as_deref()
            .is_some_and(|d| d.contains("no heartbeat")),
        "{rows:?}"
    );
    // Visible in Utilization and metrics.
    let u = ts
        .admin()
        .utilization(pb::UtilizationRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(u.blocks_quarantined, 1);
    let a = u.nodes.iter().find(|n| n.node_name == "node-a").unwrap();
    assert!(a.silent_seconds < 2, "node-a heartbeats: {a:?}");
    let (_, metrics) = http_get(ts.server.metrics_addr, "/metrics").await;
    assert!(
        metrics.contains("weft_stale_nodes_fenced_total 1"),
        "{metrics}"
    );
    assert!(metrics.contains("weft_blocks_quarantined 1"), "{metrics}");
    // Fenced: its agent cannot carry on as if nothing happened.
    let hb = ts
        .topology()
        .heartbeat(pb::HeartbeatRequest {
            node_name: "node-b".into(),
        })
        .await;
    assert_eq!(hb.unwrap_err().code(), Code::NotFound);

    // After the quarantine the block goes to the next node that joins.
    tokio::time::sleep(Duration::from_millis(4100)).await;
    assert_eq!(ts.register("node-d", 4).await.block, "10.244.1.0/24");
    // node-a heartbeated all along: still there, with its block.
    let a = ts
        .admin()
        .get_node(pb::GetNodeRequest {
            name: "node-a".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.block, "10.244.0.0/24");
    beating.store(false, Ordering::SeqCst);
    heartbeats.await.unwrap();
}

/// The policy's deletion decides under the node's row lock: a heartbeat
/// another connection holds uncommitted when the sweep reaches the node
/// keeps it once it commits; without one, the same call deletes it.
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_heartbeat_committing_under_the_stale_sweep_keeps_the_node(pool: PgPool) {
    let ts = start(pool.clone()).await;
    ts.register("node-b", 2).await;
    let store = weft_server::store::Store::new(pool.clone(), layout("10.244.0.0/16", 24), 10_000);
    let after = Duration::from_secs(600);
    let age = || {
        sqlx::query("UPDATE nodes SET last_seen = now() - interval '1 hour' WHERE name = 'node-b'")
            .execute(&pool)
    };
    age().await.unwrap();
    assert_eq!(store.stale_nodes(after).await.unwrap().len(), 1);

    let mut heartbeat = pool.begin().await.unwrap();
    sqlx::query("UPDATE nodes SET last_seen = now() WHERE name = 'node-b'")
        .execute(&mut *heartbeat)
        .await
        .unwrap();
    let sweep = tokio::spawn({
        let store = store.clone();
        async move { store.fence_stale_node("node-b", after, "test").await }
    });
    wait_for_lock_waiter(&pool).await;
    heartbeat.commit().await.unwrap();
    assert!(
        sweep.await.unwrap().unwrap().is_none(),
        "a node that heartbeated was fenced"
    );
    assert_eq!(ts.audit_count("node_stale").await, 0);

    // The same call with no heartbeat in its way fences it.
    age().await.unwrap();
    let (_, released) = store
        .fence_stale_node("node-b", after, "test")
        .await
        .unwrap()
        .expect("a silent node is fenced");
    assert!(released.is_empty());
    assert_eq!(ts.audit_count("node_stale").await, 1);
}

/// Two replicas sweep for stale nodes at once: the node is deleted once,
/// audited once, and counted by one replica only.
#[sqlx::test(migrator = "MIGRATOR")]
async fn two_replicas_sweeping_fence_a_stale_node_once(pool: PgPool) {
    let mut settings = settings();
    settings.stale_node_after = Some(Duration::from_secs(1));
    let a = start_with(pool.clone(), settings.clone()).await;
    let b = start_with(pool.clone(), settings).await;
    a.register("node-b", 2).await;
    for _ in 0..100 {
        if a.audit_count("node_stale").await > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Both have swept again since.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(a.audit_count("node_stale").await, 1);
    assert_eq!(a.audit_count("node_delete").await, 0);
    let mut fenced = 0;
    for ts in [&a, &b] {
        let (_, metrics) = http_get(ts.server.metrics_addr, "/metrics").await;
        let n: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix("weft_stale_nodes_fenced_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        fenced += n;
    }
    assert_eq!(fenced, 1, "one replica fenced it");
}

/// Backends of this database waiting on a lock now.
async fn lock_waiters(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity
         WHERE wait_event_type = 'Lock' AND datname = current_database()",
    )
    .fetch_one(pool)
    .await
    .unwrap()
}

/// Fresh watchers while the database does not answer (a second connection
/// holds the table a snapshot reads): one read for all of them, and when it
/// gives up every one of them hears UNAVAILABLE at once, instead of each
/// starting a read of its own after the last one failed.
#[sqlx::test(migrator = "MIGRATOR")]
async fn watchers_sharing_a_snapshot_read_that_fails_all_hear_of_it_at_once(pool: PgPool) {
    let ts = start(pool.clone()).await;
    let names = ["node-a", "node-b", "node-c", "node-d"];
    for (n, name) in (1u8..).zip(names) {
        ts.register(name, n).await;
    }
    let mut blocker = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE nodes IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    let mut streams = Vec::new();
    for name in names {
        streams.push(watch(&ts, name, 0).await);
    }
    wait_for_lock_waiter(&pool).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        lock_waiters(&pool).await,
        1,
        "one snapshot read for four watchers"
    );

    let wait = weft_server::watch::SNAPSHOT_READ_TIMEOUT + Duration::from_secs(5);
    let first = tokio::time::timeout(wait, streams[0].message())
        .await
        .expect("the read gives up");
    assert_eq!(first.unwrap_err().code(), Code::Unavailable);
    for s in &mut streams[1..] {
        let got = tokio::time::timeout(Duration::from_secs(2), s.message())
            .await
            .expect("a waiter started a read of its own instead of sharing the failed one");
        assert_eq!(got.unwrap_err().code(), Code::Unavailable);
    }
    blocker.rollback().await.unwrap();
    // The database answers again: a new watcher gets its snapshot.
    let mut again = watch(&ts, "node-a", 0).await;
    assert!(
        matches!(
            next_event(&mut again).await.event,
            Some(pb::peer_event::Event::Snapshot(_))
        ),
        "a snapshot after the database is back"
    );
}
