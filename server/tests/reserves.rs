//! Issue 14 on the server: Reserve, Report and Sync against real
//! PostgreSQL, tried the way they would be broken: a resent batch, a gap
//! left by a lost commit, an agent of a deleted node (stale epoch), a
//! reserved address that Allocate must not hand out, a Sync that races
//! later events, a node claiming an address outside its block.
//! (Over 300 lines: one suite, a test per behaviour.)

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use common::*;
use sqlx::PgPool;
use tonic::Code;
use weft_proto::v1::{self as pb, binding_event::Kind};
use weft_server::store::MIGRATOR;

fn at(seconds: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp { seconds, nanos: 0 })
}

fn bind(seq: u64, cid: &str, address: &str) -> pb::BindingEvent {
    pb::BindingEvent {
        seq,
        kind: Kind::Bind as i32,
        address: address.into(),
        container_id: cid.into(),
        ifname: "eth0".into(),
        pod_namespace: "default".into(),
        pod_name: cid.into(),
        pod_uid: format!("uid-{cid}"),
        // 2026-01-01T00:00:00Z plus seq seconds: the node's clock.
        at: at(1_767_225_600 + i64::try_from(seq).unwrap()),
        offline: true,
    }
}

fn release(seq: u64, cid: &str, address: &str) -> pb::BindingEvent {
    pb::BindingEvent {
        kind: Kind::Release as i32,
        ..bind(seq, cid, address)
    }
}

async fn reserve(
    ts: &TestServer,
    node: &str,
    epoch: u64,
    count: u32,
) -> Result<Vec<String>, tonic::Status> {
    ts.ipam()
        .reserve(pb::ReserveRequest {
            node_name: node.into(),
            epoch,
            count,
            adopt: false,
        })
        .await
        .map(|r| r.into_inner().addresses)
}

async fn report(
    ts: &TestServer,
    node: &str,
    epoch: u64,
    events: Vec<pb::BindingEvent>,
) -> Result<pb::ReportResponse, tonic::Status> {
    ts.ipam()
        .report(pb::ReportRequest {
            node_name: node.into(),
            epoch,
            events,
        })
        .await
        .map(|r| r.into_inner())
}

async fn rows(ts: &TestServer) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT host(address) || ' ' || state || ' ' || coalesce(container_id, '-')
         FROM allocations ORDER BY address",
    )
    .fetch_all(&ts.pool)
    .await
    .unwrap()
}

async fn audit(ts: &TestServer) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT action || ' ' || host(address) || ' ' || coalesce(container_id, '-')
                || coalesce(' ' || detail, '')
         FROM audit_log WHERE address IS NOT NULL ORDER BY id",
    )
    .fetch_all(&ts.pool)
    .await
    .unwrap()
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn reserved_addresses_are_audited_and_never_handed_to_anything_else(pool: PgPool) {
    let ts = start(pool).await;
    let reg = ts.register("node-a", 1).await;
    assert!(reg.epoch > 0);
    assert_eq!(reg.reserve_lease_seconds, 1800, "half the 1 h quarantine");
    let got = reserve(&ts, "node-a", reg.epoch, 3).await.unwrap();
    assert_eq!(got, ["10.244.0.2", "10.244.0.3", "10.244.0.4"]);
    // Allocate (another client) skips them.
    let a = ts.allocate("node-a", "other").await.unwrap();
    assert_eq!(a.address, "10.244.0.5/24");
    // The next reserve continues round-robin after them.
    let more = reserve(&ts, "node-a", reg.epoch, 2).await.unwrap();
    assert_eq!(more, ["10.244.0.6", "10.244.0.7"]);
    assert_eq!(ts.audit_count("reserve").await, 5);
    let util = ts
        .admin()
        .utilization(pb::UtilizationRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((util.used, util.reserved), (1, 5));
    assert_eq!((util.nodes[0].used, util.nodes[0].reserved), (1, 5));
    let node = ts
        .admin()
        .get_node(pb::GetNodeRequest {
            name: "node-a".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((node.used, node.reserved), (1, 5));
    let err = reserve(&ts, "node-a", reg.epoch, 10_000).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn reports_are_recorded_in_order_at_the_nodes_time_and_a_resent_batch_changes_nothing(
    pool: PgPool,
) {
    let ts = start(pool).await;
    let reg = ts.register("node-a", 1).await;
    reserve(&ts, "node-a", reg.epoch, 2).await.unwrap();
    let batch = vec![
        bind(1, "c1", "10.244.0.2"),
        bind(2, "c2", "10.244.0.3"),
        release(3, "c1", "10.244.0.2"),
    ];
    let r = report(&ts, "node-a", reg.epoch, batch.clone())
        .await
        .unwrap();
    assert_eq!((r.applied_seq, r.resync), (3, false));
    let before = audit(&ts).await;
    // The agent did not hear the answer and sends it all again.
    let again = report(&ts, "node-a", reg.epoch, batch).await.unwrap();
    assert_eq!((again.applied_seq, again.resync), (3, false));
    assert_eq!(audit(&ts).await, before, "nothing recorded twice");
    assert_eq!(
        rows(&ts).await,
        ["10.244.0.2 reserved -", "10.244.0.3 bound c2"]
    );
    assert_eq!(
        before,
        [
            "reserve 10.244.0.2 -",
            "reserve 10.244.0.3 -",
            "bind 10.244.0.2 c1",
            "bind 10.244.0.3 c2",
            "release 10.244.0.2 c1",
        ]
    );
    // `at` is the node's time, `recorded_at` the database's; both shown
    // through the admin API with the state and the offline flag.
    let (node_at, offline): (chrono::DateTime<chrono::Utc>, bool) =
        sqlx::query_as("SELECT at, offline FROM allocations WHERE container_id = 'c2'")
            .fetch_one(&ts.pool)
            .await
            .unwrap();
    assert_eq!(node_at.timestamp(), 1_767_225_602);
    assert!(offline);
    let list = ts
        .admin()
        .list_allocations(pb::ListAllocationsRequest {
            node_name: "node-a".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .allocations;
    let shown: Vec<(String, String, bool)> = list
        .iter()
        .map(|a| (a.address.clone(), a.state.clone(), a.offline))
        .collect();
    assert_eq!(
        shown,
        [
            ("10.244.0.2/24".into(), "reserved".into(), true),
            ("10.244.0.3/24".into(), "bound".into(), true),
        ]
    );
    assert_eq!(list[1].bound_at.as_ref().unwrap().seconds, 1_767_225_602);
    let history = ts
        .admin()
        .history(pb::HistoryRequest {
            address: "10.244.0.2".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let release = history.iter().find(|e| e.action == "release").unwrap();
    assert!(release.offline);
    assert_eq!(release.at.as_ref().unwrap().seconds, 1_767_225_603);
    assert!(release.recorded_at.as_ref().unwrap().seconds > 1_767_225_603);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_gap_in_the_sequence_applies_nothing_and_asks_for_a_sync(pool: PgPool) {
    let ts = start(pool).await;
    let reg = ts.register("node-a", 1).await;
    reserve(&ts, "node-a", reg.epoch, 4).await.unwrap();
    report(&ts, "node-a", reg.epoch, vec![bind(1, "c1", "10.244.0.2")])
        .await
        .unwrap();
    // Events 2 and 3 were recorded, then lost with the commit (an
    // asynchronous failover); the agent goes on with 4.
    let r = report(&ts, "node-a", reg.epoch, vec![bind(4, "c4", "10.244.0.5")])
        .await
        .unwrap();
    assert_eq!((r.applied_seq, r.resync), (1, true));
    assert_eq!(ts.audit_count("bind").await, 1, "nothing applied");
    // A gap in the middle of a batch applies nothing of it either.
    let r = report(
        &ts,
        "node-a",
        reg.epoch,
        vec![bind(2, "c2", "10.244.0.3"), bind(4, "c4", "10.244.0.5")],
    )
    .await
    .unwrap();
    assert_eq!((r.applied_seq, r.resync), (1, true));
    assert_eq!(ts.audit_count("bind").await, 1, "not even the first half");
    // The agent syncs its whole book: c1 was released, c3 and c4 bound.
    let sync = ts
        .ipam()
        .sync(pb::SyncRequest {
            node_name: "node-a".into(),
            epoch: reg.epoch,
            seq: 4,
            bound: vec![bind(0, "c3", "10.244.0.4"), bind(0, "c4", "10.244.0.5")],
            reserved: vec!["10.244.0.2".into(), "10.244.0.3".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((sync.created, sync.changed, sync.removed), (0, 3, 0));
    assert_eq!(
        rows(&ts).await,
        [
            "10.244.0.2 reserved -",
            "10.244.0.3 reserved -",
            "10.244.0.4 bound c3",
            "10.244.0.5 bound c4",
        ]
    );
    let repaired: Vec<String> = audit(&ts).await.into_iter().skip(5).collect();
    assert_eq!(
        repaired,
        [
            "release 10.244.0.2 c1 reconcile",
            "bind 10.244.0.4 c3 repair",
            "bind 10.244.0.5 c4 repair",
        ]
    );
    // Reports continue after the synced seq.
    let r = report(
        &ts,
        "node-a",
        reg.epoch,
        vec![release(5, "c3", "10.244.0.4")],
    )
    .await
    .unwrap();
    assert_eq!((r.applied_seq, r.resync), (5, false));
    // A Sync older than what is recorded is refused (events raced it).
    let stale = ts
        .ipam()
        .sync(pb::SyncRequest {
            node_name: "node-a".into(),
            epoch: reg.epoch,
            seq: 4,
            bound: vec![],
            reserved: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(stale.code(), Code::Aborted);
    assert_eq!(rows(&ts).await.len(), 4, "nothing changed");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn an_agent_of_a_deleted_node_is_fenced_by_its_epoch(pool: PgPool) {
    let ts = start(pool).await;
    let old = ts.register("node-a", 1).await;
    reserve(&ts, "node-a", old.epoch, 2).await.unwrap();
    ts.admin()
        .delete_node(pb::DeleteNodeRequest {
            name: "node-a".into(),
        })
        .await
        .unwrap();
    // Deleted: every reserve call is NOT_FOUND.
    let gone = reserve(&ts, "node-a", old.epoch, 1).await.unwrap_err();
    assert_eq!(gone.code(), Code::NotFound);
    // Registered again (by a new agent): the old agent's epoch is stale.
    let new = ts.register("node-a", 1).await;
    assert_ne!(new.epoch, old.epoch);
    assert_eq!(
        new.block, old.block,
        "its block came back within the quarantine"
    );
    for err in [
        reserve(&ts, "node-a", old.epoch, 1).await.unwrap_err(),
        report(&ts, "node-a", old.epoch, vec![bind(1, "c1", "10.244.0.2")])
            .await
            .unwrap_err(),
    ] {
        assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");
        assert!(err.message().contains("epoch"), "{err:?}");
    }
    assert_eq!(ts.audit_count("bind").await, 0);
    // A re-registration without deletion keeps the epoch.
    assert_eq!(ts.register("node-a", 1).await.epoch, new.epoch);
    assert_eq!(
        reserve(&ts, "node-a", new.epoch, 1).await.unwrap(),
        ["10.244.0.2"]
    );
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_node_cannot_record_addresses_outside_its_block(pool: PgPool) {
    let ts = start(pool).await;
    let a = ts.register("node-a", 1).await;
    let b = ts.register("node-b", 2).await;
    reserve(&ts, "node-b", b.epoch, 1).await.unwrap();
    // node-a reports binding node-b's address.
    let r = report(&ts, "node-a", a.epoch, vec![bind(1, "evil", "10.244.1.2")])
        .await
        .unwrap();
    assert_eq!((r.applied_seq, r.resync), (1, false));
    let sync = ts
        .ipam()
        .sync(pb::SyncRequest {
            node_name: "node-a".into(),
            epoch: a.epoch,
            seq: 1,
            bound: vec![bind(0, "evil", "10.244.1.2")],
            reserved: vec!["10.244.1.3".into()],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((sync.created, sync.changed, sync.removed), (0, 0, 0));
    assert_eq!(rows(&ts).await, ["10.244.1.2 reserved -"]);
    let bad = report(&ts, "node-a", a.epoch, vec![bind(2, "c", "not-an-ip")])
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
}
