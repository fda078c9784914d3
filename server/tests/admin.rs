//! weft.v1.Admin and the audit trail against a real PostgreSQL.
//! (Over 400 lines: one suite, a test per behaviour.)

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use common::*;
use sqlx::PgPool;
use tonic::Code;
use weft_proto::v1::{self as pb, peer_event::Event};
use weft_server::store::MIGRATOR;

#[sqlx::test(migrator = "MIGRATOR")]
async fn list_and_get_nodes_show_blocks_and_usage(pool: PgPool) {
    let ts = start(pool).await;
    ts.register("node-b", 2).await;
    ts.register("node-a", 1).await;
    ts.allocate("node-b", "c1").await.unwrap();
    let nodes = ts
        .admin()
        .list_nodes(pb::ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes;
    let summary: Vec<(&str, &str, &str, u32, u32)> = nodes
        .iter()
        .map(|n| {
            (
                n.name.as_str(),
                n.block.as_str(),
                n.underlay_ip.as_str(),
                n.used,
                n.capacity,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("node-a", "10.244.1.0/24", "198.51.100.1", 0, 253),
            ("node-b", "10.244.0.0/24", "198.51.100.2", 1, 253),
        ]
    );
    let b = ts
        .admin()
        .get_node(pb::GetNodeRequest {
            name: "node-b".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.gateway, "10.244.0.1");
    assert!(b.registered_at.is_some() && b.last_seen.is_some());
    let err = ts
        .admin()
        .get_node(pb::GetNodeRequest {
            name: "node-x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = ts
        .admin()
        .get_node(pb::GetNodeRequest { name: "".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn delete_node_releases_its_addresses_and_withdraws_the_peer(pool: PgPool) {
    let ts = start(pool).await;
    ts.register("node-a", 1).await;
    ts.register("node-b", 2).await;
    ts.allocate("node-a", "c1").await.unwrap();
    ts.allocate("node-a", "c2").await.unwrap();
    ts.allocate("node-b", "c3").await.unwrap();
    let mut watcher = watch(&ts, "node-b", 0).await;
    let snap = next_event(&mut watcher).await;

    let res = ts
        .admin()
        .delete_node(pb::DeleteNodeRequest {
            name: "node-a".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut released: Vec<String> = res.released.iter().map(|a| a.address.clone()).collect();
    released.sort();
    assert_eq!(released, ["10.244.0.2/24", "10.244.0.3/24"]);

    let ev = next_event(&mut watcher).await;
    assert_eq!(ev.revision, snap.revision + 1);
    assert_eq!(ev.event, Some(Event::Delete("node-a".into())));

    let left: Vec<String> = sqlx::query_scalar("SELECT container_id FROM allocations")
        .fetch_all(&ts.pool)
        .await
        .unwrap();
    assert_eq!(left, ["c3"]);
    let nodes: Vec<String> = sqlx::query_scalar("SELECT name FROM nodes")
        .fetch_all(&ts.pool)
        .await
        .unwrap();
    assert_eq!(nodes, ["node-b"]);
    assert_eq!(ts.audit_count("release").await, 2);
    assert_eq!(ts.audit_count("node_delete").await, 1);
    let actor: String =
        sqlx::query_scalar("SELECT actor FROM audit_log WHERE action = 'node_delete'")
            .fetch_one(&ts.pool)
            .await
            .unwrap();
    assert_eq!(actor, "admin");

    let err = ts
        .admin()
        .delete_node(pb::DeleteNodeRequest {
            name: "node-a".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    // The freed block is quarantined (its agent may still run pods): a new
    // node gets another one, node-b keeps its own, node-a gets its back.
    assert_eq!(ts.register("node-c", 3).await.block, "10.244.2.0/24");
    assert_eq!(ts.register("node-b", 2).await.block, "10.244.1.0/24");
    assert_eq!(ts.register("node-a", 1).await.block, "10.244.0.0/24");
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn list_allocations_filters_by_node_pod_and_address(pool: PgPool) {
    let ts = start(pool).await;
    ts.register("node-a", 1).await;
    ts.register("node-b", 2).await;
    ts.allocate("node-a", "c1").await.unwrap();
    ts.allocate("node-b", "c2").await.unwrap();
    let mut other_ns = allocate_req("node-b", "c3", "eth0");
    other_ns.pod_namespace = "kube-system".into();
    ts.ipam().allocate(other_ns).await.unwrap();

    let list = |req: pb::ListAllocationsRequest| {
        let mut admin = ts.admin();
        async move {
            let mut ids: Vec<String> = admin
                .list_allocations(req)
                .await
                .unwrap()
                .into_inner()
                .allocations
                .into_iter()
                .map(|a| a.container_id)
                .collect();
            ids.sort();
            ids
        }
    };
    assert_eq!(
        list(pb::ListAllocationsRequest::default()).await,
        ["c1", "c2", "c3"]
    );
    assert_eq!(
        list(pb::ListAllocationsRequest {
            node_name: "node-b".into(),
            ..Default::default()
        })
        .await,
        ["c2", "c3"]
    );
    assert_eq!(
        list(pb::ListAllocationsRequest {
            pod_namespace: "kube-system".into(),
            ..Default::default()
        })
        .await,
        ["c3"]
    );
    assert_eq!(
        list(pb::ListAllocationsRequest {
            pod_name: "pod-c2".into(),
            ..Default::default()
        })
        .await,
        ["c2"]
    );
    assert_eq!(
        list(pb::ListAllocationsRequest {
            address: "10.244.0.2".into(),
            ..Default::default()
        })
        .await,
        ["c1"]
    );
    assert!(
        list(pb::ListAllocationsRequest {
            address: "10.244.9.9".into(),
            ..Default::default()
        })
        .await
        .is_empty()
    );

    // The filter takes what the output prints (address with prefix).
    assert_eq!(
        list(pb::ListAllocationsRequest {
            address: "10.244.0.2/24".into(),
            ..Default::default()
        })
        .await,
        ["c1"]
    );
    for bad in ["10.244.0.2/99", "node-a"] {
        let err = ts
            .admin()
            .list_allocations(pb::ListAllocationsRequest {
                address: bad.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad}");
        assert!(err.message().contains("address"));
    }
    // An unknown node is NOT_FOUND, as in GetNode, not an empty list.
    let err = ts
        .admin()
        .list_allocations(pb::ListAllocationsRequest {
            node_name: "node-x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn whois_names_the_pod_node_and_since_or_the_last_release(pool: PgPool) {
    let ts = start(pool).await;
    ts.register("node-a", 1).await;
    let a = ts.allocate("node-a", "c1").await.unwrap();
    let whois = |address: &str| {
        let mut admin = ts.admin();
        let address = address.to_owned();
        async move { admin.whois(pb::WhoisRequest { address }).await }
    };
    // By what ListAllocations prints, or bare.
    for key in [a.address.as_str(), "10.244.0.2"] {
        let got = whois(key).await.unwrap().into_inner();
        assert_eq!(
            (
                got.node_name.as_str(),
                got.pod_namespace.as_str(),
                got.pod_name.as_str(),
                got.container_id.as_str(),
                got.state.as_str()
            ),
            ("node-a", "default", "pod-c1", "c1", "bound")
        );
        assert!(got.bound_at.is_some());
    }
    ts.release("node-a", "c1").await.unwrap();
    let free = whois("10.244.0.2").await.unwrap_err();
    assert_eq!(free.code(), Code::NotFound);
    assert!(
        free.message().contains("free")
            && free.message().contains("release")
            && free.message().contains("c1"),
        "{free:?}"
    );
    let never = whois("10.244.0.77").await.unwrap_err();
    assert_eq!(never.code(), Code::NotFound);
    assert!(never.message().contains("never"), "{never:?}");
    assert_eq!(
        whois("nope").await.unwrap_err().code(),
        Code::InvalidArgument
    );
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn history_by_pod_and_by_node_shows_every_entry_including_refusals(pool: PgPool) {
    let ts = start(pool).await;
    ts.register("node-a", 1).await;
    ts.allocate("node-a", "c1").await.unwrap();
    ts.release("node-a", "c1").await.unwrap();
    // The same pod again, under a new sandbox.
    let mut again = allocate_req("node-a", "c2", "eth0");
    again.pod_name = "pod-c1".into();
    ts.ipam().allocate(again).await.unwrap();
    sqlx::query("INSERT INTO audit_log (action, actor, node_name, detail) VALUES ('denied', 'node/node-b', 'node-a', 'Allocate')")
        .execute(&ts.pool)
        .await
        .unwrap();
    let history = |req: pb::HistoryRequest| {
        let mut admin = ts.admin();
        async move {
            admin.history(req).await.map(|r| {
                r.into_inner()
                    .entries
                    .into_iter()
                    .map(|e| format!("{} {}{}", e.action, e.container_id, e.detail))
                    .collect::<Vec<_>>()
            })
        }
    };
    assert_eq!(
        history(pb::HistoryRequest {
            pod_namespace: "default".into(),
            pod_name: "pod-c1".into(),
            ..Default::default()
        })
        .await
        .unwrap(),
        ["allocate c1", "release c1", "allocate c2"]
    );
    assert_eq!(
        history(pb::HistoryRequest {
            node_name: "node-a".into(),
            ..Default::default()
        })
        .await
        .unwrap(),
        [
            "node_register ",
            "allocate c1",
            "release c1",
            "allocate c2",
            "denied Allocate"
        ]
    );
    for bad in [
        pb::HistoryRequest {
            pod_name: "pod-c1".into(),
            ..Default::default()
        },
        pb::HistoryRequest {
            node_name: "node-a".into(),
            address: "10.244.0.2".into(),
            ..Default::default()
        },
        pb::HistoryRequest::default(),
    ] {
        assert_eq!(
            history(bad).await.unwrap_err().code(),
            Code::InvalidArgument
        );
    }
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn history_of_an_address_and_of_a_container_is_time_ordered(pool: PgPool) {
    let mut s = settings();
    s.layout = layout("10.244.0.0/16", 29); // /29: .2 .. .6, wraps quickly
    let ts = start_with(pool, s).await;
    ts.register("node-a", 1).await;
    // c0 gets .2, is released; c1..c4 take .3 .. .6; c5 wraps to .2.
    ts.allocate("node-a", "c0").await.unwrap();
    ts.release("node-a", "c0").await.unwrap();
    for i in 1..=5 {
        ts.allocate("node-a", &format!("c{i}")).await.unwrap();
    }
    let h = ts
        .admin()
        .history(pb::HistoryRequest {
            address: "10.244.0.2".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let trail: Vec<(&str, &str)> = h
        .iter()
        .map(|e| (e.action.as_str(), e.container_id.as_str()))
        .collect();
    assert_eq!(
        trail,
        [("allocate", "c0"), ("release", "c0"), ("allocate", "c5")]
    );
    assert!(h.windows(2).all(|w| w[0].id < w[1].id));
    assert!(
        h.iter()
            .all(|e| e.actor == "node/node-a" && e.pod_namespace == "default")
    );

    let h = ts
        .admin()
        .history(pb::HistoryRequest {
            container_id: "c0".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let trail: Vec<(&str, &str)> = h
        .iter()
        .map(|e| (e.action.as_str(), e.address.as_str()))
        .collect();
    assert_eq!(
        trail,
        [("allocate", "10.244.0.2"), ("release", "10.244.0.2")]
    );

    for req in [
        pb::HistoryRequest::default(),
        pb::HistoryRequest {
            address: "10.244.0.2".into(),
            container_id: "c0".into(),
            ..Default::default()
        },
        pb::HistoryRequest {
            address: "10.244.0.2".into(),
            page_token: "garbage".into(),
            ..Default::default()
        },
        pb::HistoryRequest {
            address: "10.244.0.2".into(),
            page_size: 10_001,
            ..Default::default()
        },
        pb::HistoryRequest {
            address: "nope".into(),
            ..Default::default()
        },
    ] {
        let err = ts.admin().history(req).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
    }
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn utilization_reports_per_node_and_cluster_figures(pool: PgPool) {
    let ts = start(pool).await;
    ts.register("node-a", 1).await;
    ts.register("node-b", 2).await;
    for i in 0..3 {
        ts.allocate("node-a", &format!("c{i}")).await.unwrap();
    }
    let u = ts
        .admin()
        .utilization(pb::UtilizationRequest {})
        .await
        .unwrap()
        .into_inner();
    let per_node: Vec<(&str, u32, u32)> = u
        .nodes
        .iter()
        .map(|n| (n.node_name.as_str(), n.used, n.capacity))
        .collect();
    assert_eq!(per_node, [("node-a", 3, 253), ("node-b", 0, 253)]);
    assert_eq!(u.used, 3);
    assert_eq!(u.capacity, 256 * 253);
    assert_eq!((u.blocks_used, u.blocks_capacity), (2, 256));
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn every_mutation_writes_exactly_one_audit_row(pool: PgPool) {
    let ts = start(pool).await;
    ts.register("node-a", 1).await; // node_register
    ts.register("node-b", 2).await; // node_register
    ts.topology()
        .register_node(register_req("node-a", 1, 9))
        .await
        .unwrap(); // node_update
    ts.register("node-a", 1).await; // node_update (MAC back)
    ts.allocate("node-a", "c1").await.unwrap(); // allocate
    ts.allocate("node-a", "c1").await.unwrap(); // idempotent: nothing
    ts.allocate("node-a", "c2").await.unwrap(); // allocate
    ts.allocate("node-b", "c3").await.unwrap(); // allocate
    ts.release("node-a", "c1").await.unwrap(); // release
    ts.ipam()
        .gc(pb::GcRequest {
            node_name: "node-a".into(),
            valid: vec![],
        })
        .await
        .unwrap(); // gc (c2)
    ts.admin()
        .delete_node(pb::DeleteNodeRequest {
            name: "node-b".into(),
        })
        .await
        .unwrap(); // release c3 + node_delete
    let _ = ts.allocate("node-a", "bad id").await.unwrap_err(); // nothing

    let rows: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT action, container_id FROM audit_log ORDER BY id")
            .fetch_all(&ts.pool)
            .await
            .unwrap();
    let rows: Vec<(&str, &str)> = rows
        .iter()
        .map(|(a, c)| (a.as_str(), c.as_deref().unwrap_or("-")))
        .collect();
    assert_eq!(
        rows,
        [
            ("node_register", "-"),
            ("node_register", "-"),
            ("node_update", "-"),
            ("node_update", "-"),
            ("allocate", "c1"),
            ("allocate", "c2"),
            ("allocate", "c3"),
            ("release", "c1"),
            ("gc", "c2"),
            ("release", "c3"),
            ("node_delete", "-"),
        ]
    );
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn the_audit_log_is_append_only(pool: PgPool) {
    let ts = start(pool).await;
    ts.register("node-a", 1).await;
    for sql in [
        "UPDATE audit_log SET actor = 'mallory'",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
    ] {
        let err = sqlx::query(sql).execute(&ts.pool).await.unwrap_err();
        assert!(err.to_string().contains("append-only"), "{sql}: {err}");
    }
    assert_eq!(ts.audit_count("node_register").await, 1);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn list_allocations_pages_through_everything_once(pool: PgPool) {
    let ts = start(pool).await;
    ts.register("node-a", 1).await;
    for i in 0..7 {
        ts.allocate("node-a", &format!("c{i}")).await.unwrap();
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = ts
            .admin()
            .list_allocations(pb::ListAllocationsRequest {
                page_size: 3,
                page_token: token.clone(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.allocations.len() <= 3);
        seen.extend(page.allocations.into_iter().map(|a| a.address));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let mut sorted = seen.clone();
    sorted.dedup();
    assert_eq!(seen.len(), 7);
    assert_eq!(sorted.len(), 7, "no address twice");
    let err = ts
        .admin()
        .list_allocations(pb::ListAllocationsRequest {
            page_size: 10_001,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn an_admin_release_frees_a_leaked_address_only_when_its_node_is_silent(pool: PgPool) {
    let ts = start(pool).await;
    ts.register("node-a", 1).await;
    ts.allocate("node-a", "c1").await.unwrap();
    let release = |address: &str| {
        let mut admin = ts.admin();
        let address = address.to_owned();
        async move { admin.release(pb::AdminReleaseRequest { address }).await }
    };
    // The node heartbeats: its agent is the authority on what it wires.
    let alive = release("10.244.0.2/24").await.unwrap_err();
    assert_eq!(alive.code(), Code::FailedPrecondition);
    assert!(alive.message().contains("heartbeated"), "{alive:?}");
    assert_eq!(ts.audit_count("release").await, 0);
    // The machine is gone (no heartbeat for 10 minutes).
    sqlx::query("UPDATE nodes SET last_seen = now() - interval '10 minutes'")
        .execute(&ts.pool)
        .await
        .unwrap();
    let freed = release("10.244.0.2").await.unwrap().into_inner();
    assert_eq!(
        (freed.container_id.as_str(), freed.node_name.as_str()),
        ("c1", "node-a")
    );
    let audit: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT action, detail FROM audit_log WHERE address = '10.244.0.2' ORDER BY id",
    )
    .fetch_all(&ts.pool)
    .await
    .unwrap();
    assert_eq!(
        audit,
        [
            ("allocate".to_owned(), None),
            ("release".to_owned(), Some("admin".to_owned()))
        ]
    );
    assert_eq!(
        release("10.244.0.2").await.unwrap_err().code(),
        Code::NotFound
    );
}
