//! weft.v1.Ipam against a real PostgreSQL: allocation, idempotency,
//! round-robin, exhaustion, release, GC and concurrency, checked by SQL.
//! (Over 400 lines: one suite, a test per behaviour.)

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::collections::HashSet;

use common::*;
use sqlx::PgPool;
use tonic::Code;
use weft_proto::v1 as pb;
use weft_server::store::MIGRATOR;

fn release_req(node: &str, cid: &str) -> pb::ReleaseRequest {
    pb::ReleaseRequest {
        node_name: node.into(),
        container_id: cid.into(),
        ifname: "eth0".into(),
    }
}

fn attachment(cid: &str) -> pb::Attachment {
    pb::Attachment {
        container_id: cid.into(),
        ifname: "eth0".into(),
    }
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn allocate_hands_out_an_address_of_the_node_block(pool: PgPool) {
    let ts = start(pool).await;
    ts.register("node-a", 1).await;
    ts.register("node-b", 2).await;
    let a = ts.allocate("node-b", "c1").await.unwrap();
    assert_eq!(a.address, "10.244.1.2/24");
    assert_eq!(a.gateway, "10.244.1.1");

    let row: (String, String, String, String, String, String) = sqlx::query_as(
        "SELECT host(address), node_name, container_id, ifname, pod_namespace, pod_name FROM allocations",
    )
    .fetch_one(&ts.pool)
    .await
    .unwrap();
    assert_eq!(
        row,
        (
            "10.244.1.2".into(),
            "node-b".into(),
            "c1".into(),
            "eth0".into(),
            "default".into(),
            "pod-c1".into()
        )
    );
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn allocate_is_idempotent_on_container_and_ifname(pool: PgPool) {
    let ts = start(pool).await;
    ts.register("node-a", 1).await;
    let first = ts.allocate("node-a", "c1").await.unwrap();
    let again = ts.allocate("node-a", "c1").await.unwrap();
    assert_eq!(first, again);
    // A second interface of the same container is a different attachment.
    let net1 = ts
        .ipam()
        .allocate(allocate_req("node-a", "c1", "net1"))
        .await
        .unwrap()
        .into_inner();
    assert_ne!(net1.address, first.address);
    assert_eq!(ts.audit_count("allocate").await, 2);
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM allocations")
        .fetch_one(&ts.pool)
        .await
        .unwrap();
    assert_eq!(count, 2);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn allocate_rejects_bad_input_naming_the_field(pool: PgPool) {
    let ts = start(pool).await;
    ts.register("node-a", 1).await;
    let ok = allocate_req("node-a", "c1", "eth0");
    let cases = [
        (
            "node_name",
            pb::AllocateRequest {
                node_name: "".into(),
                ..ok.clone()
            },
        ),
        (
            "container_id",
            pb::AllocateRequest {
                container_id: "".into(),
                ..ok.clone()
            },
        ),
        (
            "container_id",
            pb::AllocateRequest {
                container_id: "a b".into(),
                ..ok.clone()
            },
        ),
        (
            "ifname",
            pb::AllocateRequest {
                ifname: "".into(),
                ..ok.clone()
            },
        ),
        (
            "ifname",
            pb::AllocateRequest {
                ifname: "a234567890123456".into(),
                ..ok.clone()
            },
        ),
        (
            "ifname",
            pb::AllocateRequest {
                ifname: "eth/0".into(),
                ..ok.clone()
            },
        ),
        (
            "pod_name",
            pb::AllocateRequest {
                pod_name: "x".repeat(300),
                ..ok.clone()
            },
        ),
        (
            "pod_namespace",
            pb::AllocateRequest {
                pod_namespace: "a\nb".into(),
                ..ok.clone()
            },
        ),
    ];
    for (field, req) in cases {
        let err = ts.ipam().allocate(req.clone()).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{req:?}");
        assert!(
            err.message().contains(field),
            "{field} not in {:?}",
            err.message()
        );
    }
    let err = ts.allocate("node-x", "c1").await.unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(err.message().contains("node-x"));
    assert_eq!(
        ts.audit_count("allocate").await,
        0,
        "rejected calls write nothing"
    );
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn addresses_are_handed_out_round_robin(pool: PgPool) {
    let ts = start(pool).await;
    ts.register("node-a", 1).await;
    let mut addrs = Vec::new();
    for cid in ["c1", "c2", "c3"] {
        addrs.push(ts.allocate("node-a", cid).await.unwrap().address);
    }
    assert_eq!(addrs, ["10.244.0.2/24", "10.244.0.3/24", "10.244.0.4/24"]);
    ts.ipam()
        .release(release_req("node-a", "c2"))
        .await
        .unwrap();
    // .3 was just freed; the next pod gets .5, not .3.
    assert_eq!(
        ts.allocate("node-a", "c4").await.unwrap().address,
        "10.244.0.5/24"
    );
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn round_robin_wraps_and_an_exhausted_block_is_resource_exhausted(pool: PgPool) {
    let mut s = settings();
    s.layout = layout("10.244.0.0/16", 29); // 5 pod addresses: .2 .. .6
    let ts = start_with(pool, s).await;
    ts.register("node-a", 1).await;
    for i in 0..5 {
        ts.allocate("node-a", &format!("c{i}")).await.unwrap();
    }
    let err = ts.allocate("node-a", "c5").await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message().contains("node-a") && err.message().contains("all 5"),
        "{}",
        err.message()
    );
    assert_eq!(
        ts.audit_count("allocate").await,
        5,
        "the failed call left nothing"
    );

    // Free .4 then .2: the cursor is at .6, so .2 comes back first (wrap),
    // then .4.
    ts.ipam()
        .release(release_req("node-a", "c2"))
        .await
        .unwrap();
    ts.ipam()
        .release(release_req("node-a", "c0"))
        .await
        .unwrap();
    assert_eq!(
        ts.allocate("node-a", "c6").await.unwrap().address,
        "10.244.0.2/29"
    );
    assert_eq!(
        ts.allocate("node-a", "c7").await.unwrap().address,
        "10.244.0.4/29"
    );
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn release_is_idempotent_and_unknown_is_success(pool: PgPool) {
    let ts = start(pool).await;
    ts.register("node-a", 1).await;
    ts.allocate("node-a", "c1").await.unwrap();
    let first = ts
        .ipam()
        .release(release_req("node-a", "c1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(first.address, "10.244.0.2");
    let second = ts
        .ipam()
        .release(release_req("node-a", "c1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(second.address, "");
    ts.ipam()
        .release(release_req("node-a", "never"))
        .await
        .unwrap();
    ts.ipam()
        .release(release_req("gone-node", "c1"))
        .await
        .unwrap();
    assert_eq!(ts.audit_count("release").await, 1);
    let err = ts
        .ipam()
        .release(release_req("node-a", ""))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn an_attachment_lives_on_one_node_only(pool: PgPool) {
    let ts = start(pool).await;
    ts.register("node-a", 1).await;
    ts.register("node-b", 2).await;
    ts.allocate("node-a", "c1").await.unwrap();
    let err = ts.allocate("node-b", "c1").await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(err.message().contains("node-a"), "{}", err.message());
    // node-b cannot release node-a's address either.
    let r = ts
        .ipam()
        .release(release_req("node-b", "c1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.address, "");
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM allocations")
        .fetch_one(&ts.pool)
        .await
        .unwrap();
    assert_eq!(count, 1);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn gc_releases_everything_of_the_node_not_listed(pool: PgPool) {
    let ts = start(pool).await;
    ts.register("node-a", 1).await;
    ts.register("node-b", 2).await;
    for cid in ["keep1", "drop1", "keep2", "drop2"] {
        ts.allocate("node-a", cid).await.unwrap();
    }
    ts.allocate("node-b", "other").await.unwrap();
    let res = ts
        .ipam()
        .gc(pb::GcRequest {
            node_name: "node-a".into(),
            valid: vec![
                attachment("keep1"),
                attachment("keep2"),
                attachment("not-allocated"),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    let released: HashSet<String> = res
        .released
        .iter()
        .map(|a| a.container_id.clone())
        .collect();
    assert_eq!(released, HashSet::from(["drop1".into(), "drop2".into()]));
    assert!(
        res.released
            .iter()
            .all(|a| a.node_name == "node-a" && a.address.ends_with("/24"))
    );
    let left: Vec<String> =
        sqlx::query_scalar("SELECT container_id FROM allocations ORDER BY container_id")
            .fetch_all(&ts.pool)
            .await
            .unwrap();
    assert_eq!(left, ["keep1", "keep2", "other"]);
    assert_eq!(ts.audit_count("gc").await, 2);

    // GC with an empty list releases all of the node's addresses.
    let res = ts
        .ipam()
        .gc(pb::GcRequest {
            node_name: "node-a".into(),
            valid: vec![],
        })
        .await
        .unwrap();
    assert_eq!(res.into_inner().released.len(), 2);

    let err = ts
        .ipam()
        .gc(pb::GcRequest {
            node_name: "node-x".into(),
            valid: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = ts
        .ipam()
        .gc(pb::GcRequest {
            node_name: "node-a".into(),
            valid: vec![attachment("bad id")],
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let too_many = (0..=weft_server::api::MAX_GC_ATTACHMENTS)
        .map(|i| attachment(&format!("c{i}")))
        .collect();
    let err = ts
        .ipam()
        .gc(pb::GcRequest {
            node_name: "node-a".into(),
            valid: too_many,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

/// Checks by SQL that no address is doubled and every allocation is audited.
async fn assert_allocations_consistent(ts: &TestServer, expected: i64) {
    let (count, distinct_addr, distinct_att, outside): (i64, i64, i64, i64) = sqlx::query_as(
        "SELECT count(*), count(DISTINCT a.address), count(DISTINCT (a.container_id, a.ifname)),
                count(*) FILTER (WHERE NOT (a.address << n.block))
         FROM allocations a JOIN nodes n ON n.name = a.node_name",
    )
    .fetch_one(&ts.pool)
    .await
    .unwrap();
    assert_eq!(
        (count, distinct_addr, distinct_att, outside),
        (expected, expected, expected, 0)
    );
    assert_eq!(ts.audit_count("allocate").await, expected);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn sixty_four_concurrent_allocations_across_eight_nodes(pool: PgPool) {
    let ts = start(pool).await;
    for n in 0..8u8 {
        ts.register(&format!("node-{n}"), n + 1).await;
    }
    let calls = (0..64).map(|i| {
        let mut ipam = ts.ipam();
        async move {
            ipam.allocate(allocate_req(
                &format!("node-{}", i % 8),
                &format!("c{i}"),
                "eth0",
            ))
            .await
            .map(|r| r.into_inner().address)
        }
    });
    let addrs: Vec<String> = futures::future::join_all(calls)
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(addrs.iter().collect::<HashSet<_>>().len(), 64);
    assert_allocations_consistent(&ts, 64).await;
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn sixty_four_concurrent_allocations_within_one_node(pool: PgPool) {
    let ts = start(pool).await;
    ts.register("node-a", 1).await;
    let calls = (0..64).map(|i| {
        let mut ipam = ts.ipam();
        async move {
            ipam.allocate(allocate_req("node-a", &format!("c{i}"), "eth0"))
                .await
                .map(|r| r.into_inner().address)
        }
    });
    let addrs: Vec<String> = futures::future::join_all(calls)
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap();
    let distinct: HashSet<_> = addrs.iter().collect();
    assert_eq!(distinct.len(), 64);
    assert_allocations_consistent(&ts, 64).await;
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn concurrent_retries_of_one_attachment_allocate_once(pool: PgPool) {
    let ts = start(pool).await;
    ts.register("node-a", 1).await;
    let calls = (0..16).map(|_| {
        let mut ipam = ts.ipam();
        async move {
            ipam.allocate(allocate_req("node-a", "c1", "eth0"))
                .await
                .map(|r| r.into_inner())
        }
    });
    let results: Vec<pb::AllocateResponse> = futures::future::join_all(calls)
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .unwrap();
    assert!(results.iter().all(|r| r == &results[0]));
    assert_allocations_consistent(&ts, 1).await;
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn the_database_refuses_a_doubled_address_even_without_the_server(pool: PgPool) {
    let ts = start(pool).await;
    ts.register("node-a", 1).await;
    ts.allocate("node-a", "c1").await.unwrap();
    let err = sqlx::query(
        "INSERT INTO allocations (address, node_name, container_id, ifname) VALUES ('10.244.0.2', 'node-a', 'c2', 'eth0')",
    )
    .execute(&ts.pool)
    .await
    .unwrap_err();
    assert!(err.to_string().contains("allocations_pkey"), "{err}");
    let err = sqlx::query(
        "INSERT INTO allocations (address, node_name, container_id, ifname) VALUES ('10.244.0.9', 'node-a', 'c1', 'eth0')",
    )
    .execute(&ts.pool)
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("allocations_attachment_key"),
        "{err}"
    );
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn lookup_finds_only_the_nodes_own_allocation(pool: PgPool) {
    let ts = start(pool).await;
    ts.register("node-a", 1).await;
    ts.register("node-b", 2).await;
    ts.allocate("node-a", "c1").await.unwrap();
    let req = |node: &str, cid: &str| pb::LookupRequest {
        node_name: node.into(),
        container_id: cid.into(),
        ifname: "eth0".into(),
    };
    let found = ts
        .ipam()
        .lookup(req("node-a", "c1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (found.address.as_str(), found.pod_name.as_str()),
        ("10.244.0.2/24", "pod-c1")
    );
    assert_eq!(
        ts.ipam()
            .lookup(req("node-b", "c1"))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        ts.ipam()
            .lookup(req("node-a", "c2"))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound
    );
    assert_eq!(
        ts.ipam()
            .lookup(req("node-a", ""))
            .await
            .unwrap_err()
            .code(),
        Code::InvalidArgument
    );
}
