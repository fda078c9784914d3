//! weft.v1.Topology against a real PostgreSQL: registration, heartbeats and
//! the peer stream with resume, history loss and slow watchers.
//! (Over 400 lines: one suite, a test per behaviour.)

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::time::Duration;

use common::*;
use sqlx::PgPool;
use tonic::Code;
use weft_proto::v1::{self as pb, peer_event::Event};
use weft_server::store::MIGRATOR;

fn snapshot_peers(ev: &pb::PeerEvent) -> Vec<pb::Peer> {
    match &ev.event {
        Some(Event::Snapshot(s)) => s.peers.clone(),
        other => panic!("expected a snapshot, got {other:?}"),
    }
}

fn upsert(ev: &pb::PeerEvent) -> pb::Peer {
    match &ev.event {
        Some(Event::Upsert(p)) => p.clone(),
        other => panic!("expected an upsert, got {other:?}"),
    }
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn registration_assigns_distinct_blocks_that_survive_re_registration(pool: PgPool) {
    let ts = start(pool).await;
    let a = ts.register("node-a", 1).await;
    let b = ts.register("node-b", 2).await;
    assert_eq!(a.block, "10.244.0.0/24");
    assert_eq!(a.gateway, "10.244.0.1");
    assert_eq!(a.vni, 1);
    assert_eq!(a.cluster_cidr, "10.244.0.0/16");
    assert_eq!(b.block, "10.244.1.0/24");
    assert_eq!(b.gateway, "10.244.1.1");

    // An agent restart re-registers unchanged: same block, no new revision,
    // no audit row (nothing changed).
    let again = ts.register("node-a", 1).await;
    assert_eq!(again.block, a.block);
    assert_eq!(again.revision, b.revision);
    assert_eq!(ts.audit_count("node_register").await, 2);
    assert_eq!(ts.audit_count("node_update").await, 0);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn registration_rejects_bad_input_naming_the_field(pool: PgPool) {
    let ts = start(pool).await;
    let ok = register_req("node-a", 1, 1);
    let cases = [
        (
            "node_name",
            pb::RegisterNodeRequest {
                node_name: "".into(),
                ..ok.clone()
            },
        ),
        (
            "node_name",
            pb::RegisterNodeRequest {
                node_name: "Node_A".into(),
                ..ok.clone()
            },
        ),
        (
            "underlay_ip",
            pb::RegisterNodeRequest {
                underlay_ip: "".into(),
                ..ok.clone()
            },
        ),
        (
            "underlay_ip",
            pb::RegisterNodeRequest {
                underlay_ip: "2001:db8::1".into(),
                ..ok.clone()
            },
        ),
        (
            "underlay_ip",
            pb::RegisterNodeRequest {
                underlay_ip: "0.0.0.0".into(),
                ..ok.clone()
            },
        ),
        (
            "vtep_mac",
            pb::RegisterNodeRequest {
                vtep_mac: "02:00:00:00:00".into(),
                ..ok.clone()
            },
        ),
        (
            "vtep_mac",
            pb::RegisterNodeRequest {
                vtep_mac: "01:00:5e:00:00:01".into(),
                ..ok.clone()
            },
        ),
    ];
    for (field, req) in cases {
        let err = ts.topology().register_node(req.clone()).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{req:?}");
        assert!(
            err.message().contains(field),
            "{field} not in {:?}",
            err.message()
        );
    }
    let nodes: i64 = sqlx::query_scalar("SELECT count(*) FROM nodes")
        .fetch_one(&ts.pool)
        .await
        .unwrap();
    assert_eq!(nodes, 0, "a rejected call writes nothing");
    assert_eq!(ts.audit_count("node_register").await, 0);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn no_free_block_is_resource_exhausted(pool: PgPool) {
    let mut s = settings();
    s.layout = layout("10.244.0.0/23", 24); // two blocks
    let ts = start_with(pool, s).await;
    ts.register("node-a", 1).await;
    ts.register("node-b", 2).await;
    let err = ts
        .topology()
        .register_node(register_req("node-c", 3, 3))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert!(
        err.message().contains("node-c") && err.message().contains("10.244.0.0/23"),
        "{}",
        err.message()
    );
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn watch_starts_with_a_snapshot_of_the_other_nodes(pool: PgPool) {
    let ts = start(pool).await;
    ts.register("node-a", 1).await;
    let b = ts.register("node-b", 2).await;
    let mut stream = watch(&ts, "node-b", 0).await;
    let first = next_event(&mut stream).await;
    assert_eq!(first.revision, b.revision);
    let peers = snapshot_peers(&first);
    assert_eq!(
        peers,
        vec![pb::Peer {
            node_name: "node-a".into(),
            underlay_ip: "198.51.100.1".into(),
            vtep_mac: "02:00:00:00:00:01".into(),
            block: "10.244.0.0/24".into(),
        }],
        "the watcher's own node is left out"
    );
    assert_quiet(&mut stream, Duration::from_millis(300)).await;
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_changed_mac_or_underlay_reaches_every_watcher(pool: PgPool) {
    let ts = start(pool).await;
    ts.register("node-a", 1).await;
    ts.register("node-b", 2).await;
    ts.register("node-c", 3).await;
    let mut wb = watch(&ts, "node-b", 0).await;
    let mut wc = watch(&ts, "node-c", 0).await;
    let snap_rev = next_event(&mut wb).await.revision;
    next_event(&mut wc).await;

    let moved = ts
        .topology()
        .register_node(register_req("node-a", 11, 0x2a))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        moved.block, "10.244.0.0/24",
        "the block stays with the name"
    );
    assert_eq!(moved.revision, snap_rev + 1);
    for w in [&mut wb, &mut wc] {
        let ev = next_event(w).await;
        assert_eq!(ev.revision, snap_rev + 1);
        let peer = upsert(&ev);
        assert_eq!(peer.vtep_mac, "02:00:00:00:00:2a");
        assert_eq!(peer.underlay_ip, "198.51.100.11");
        assert_eq!(peer.block, "10.244.0.0/24");
    }
    let node = ts
        .admin()
        .get_node(pb::GetNodeRequest {
            name: "node-a".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(node.vtep_mac, "02:00:00:00:00:2a");
    assert_eq!(ts.audit_count("node_update").await, 1);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_resuming_watcher_gets_exactly_the_missed_events(pool: PgPool) {
    let ts = start(pool).await;
    ts.register("node-a", 1).await;
    ts.register("node-b", 2).await;
    let mut stream = watch(&ts, "node-b", 0).await;
    let seen = next_event(&mut stream).await.revision;
    drop(stream);

    // Missed while disconnected: a new node, a MAC change, a deletion, and a
    // change of the watcher's own node (which it must not be sent).
    ts.register("node-c", 3).await;
    ts.topology()
        .register_node(register_req("node-a", 1, 0x10))
        .await
        .unwrap();
    ts.register("node-d", 4).await;
    ts.admin()
        .delete_node(pb::DeleteNodeRequest {
            name: "node-d".into(),
        })
        .await
        .unwrap();
    ts.topology()
        .register_node(register_req("node-b", 2, 0x20))
        .await
        .unwrap();

    let mut stream = watch(&ts, "node-b", seen).await;
    let mut got = Vec::new();
    for _ in 0..4 {
        got.push(next_event(&mut stream).await);
    }
    let revisions: Vec<u64> = got.iter().map(|e| e.revision).collect();
    assert_eq!(revisions, vec![seen + 1, seen + 2, seen + 3, seen + 4]);
    assert_eq!(upsert(&got[0]).node_name, "node-c");
    assert_eq!(upsert(&got[1]).vtep_mac, "02:00:00:00:00:10");
    assert_eq!(upsert(&got[2]).node_name, "node-d");
    assert_eq!(got[3].event, Some(Event::Delete("node-d".into())));
    assert_quiet(&mut stream, Duration::from_millis(300)).await;

    // And it stays live after catching up.
    ts.register("node-e", 5).await;
    let live = next_event(&mut stream).await;
    assert_eq!(live.revision, seen + 6, "seen + 5 was node-b's own change");
    assert_eq!(upsert(&live).node_name, "node-e");
}

/// The feed answers a resume at its own revision without a query and reads
/// one snapshot for many watchers: neither shortcut may lose a change.
#[sqlx::test(migrator = "MIGRATOR")]
async fn watchers_resuming_or_starting_together_miss_no_change(pool: PgPool) {
    let ts = start(pool).await;
    ts.register("node-a", 1).await;
    let mut first = watch(&ts, "node-x", 0).await;
    let now = next_event(&mut first).await.revision;

    // Twenty resume at once where the feed stands, twenty start fresh.
    let mut resumed = Vec::new();
    let mut fresh = Vec::new();
    for i in 0..20 {
        resumed.push(watch(&ts, &format!("r{i}"), now).await);
        fresh.push(watch(&ts, &format!("f{i}"), 0).await);
    }
    for s in &mut fresh {
        let names: Vec<String> = snapshot_peers(&next_event(s).await)
            .into_iter()
            .map(|p| p.node_name)
            .collect();
        assert_eq!(names, ["node-a"]);
    }
    for s in &mut resumed {
        assert_quiet(s, Duration::from_millis(50)).await;
    }

    // A change after that reaches all of them, once, as a change.
    ts.register("node-b", 2).await;
    for s in resumed.iter_mut().chain(fresh.iter_mut()) {
        let ev = next_event(s).await;
        assert_eq!(ev.revision, now + 1);
        assert_eq!(upsert(&ev).node_name, "node-b");
    }
    // The feed has fanned the change out, so a snapshot read now is not
    // the one cached before it.
    let mut late = watch(&ts, "node-y", 0).await;
    let ev = next_event(&mut late).await;
    assert_eq!(ev.revision, now + 1);
    let names: Vec<String> = snapshot_peers(&ev)
        .into_iter()
        .map(|p| p.node_name)
        .collect();
    assert_eq!(names, ["node-a", "node-b"]);
}

/// A failover that lost the newest commits takes the history backwards; the
/// feed resyncs its watchers, and the snapshot it cached before must not be
/// what they are sent.
#[sqlx::test(migrator = "MIGRATOR")]
async fn after_the_history_went_backwards_no_watcher_gets_the_cached_snapshot(pool: PgPool) {
    let ts = start(pool.clone()).await;
    ts.register("node-a", 1).await;
    ts.register("node-b", 2).await;
    let mut watcher = watch(&ts, "node-x", 0).await;
    let ev = next_event(&mut watcher).await;
    let names: Vec<String> = snapshot_peers(&ev)
        .into_iter()
        .map(|p| p.node_name)
        .collect();
    assert_eq!(names, ["node-a", "node-b"]);
    let lost = ev.revision;

    // As the promoted standby has it: node-b's registration never happened.
    let lost_i = i64::try_from(lost).unwrap();
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("DELETE FROM nodes WHERE name = 'node-b'")
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("DELETE FROM topology_events WHERE revision = $1")
        .bind(lost_i)
        .execute(&mut *tx)
        .await
        .unwrap();
    sqlx::query("UPDATE topology_revision SET revision = $1 - 1")
        .bind(lost_i)
        .execute(&mut *tx)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(weft_server::store::TOPOLOGY_CHANNEL)
        .execute(&pool)
        .await
        .unwrap();

    let ev = next_event(&mut watcher).await;
    assert_eq!(ev.revision, lost - 1, "the watcher was resynced");
    let names: Vec<String> = snapshot_peers(&ev)
        .into_iter()
        .map(|p| p.node_name)
        .collect();
    assert_eq!(names, ["node-a"]);
    let mut fresh = watch(&ts, "node-y", 0).await;
    let ev = next_event(&mut fresh).await;
    let names: Vec<String> = snapshot_peers(&ev)
        .into_iter()
        .map(|p| p.node_name)
        .collect();
    assert_eq!((ev.revision, names), (lost - 1, vec!["node-a".to_owned()]));
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_snapshot_comes_in_the_pages_asked_for(pool: PgPool) {
    let ts = start(pool).await;
    for i in 1..=5u8 {
        ts.register(&format!("node-{i}"), i).await;
    }
    let paged = |size: u32| {
        let mut topology = ts.topology();
        async move {
            topology
                .watch_peers(pb::WatchPeersRequest {
                    node_name: "node-3".into(),
                    since_revision: 0,
                    snapshot_page_size: size,
                })
                .await
                .unwrap()
                .into_inner()
        }
    };
    // Four peers (the watcher's own node left out) in pages of three.
    let mut stream = paged(3).await;
    let mut pages = Vec::new();
    loop {
        let ev = next_event(&mut stream).await;
        let Some(Event::Snapshot(s)) = ev.event else {
            panic!("expected snapshot pages, got {ev:?}");
        };
        let names: Vec<String> = s.peers.into_iter().map(|p| p.node_name).collect();
        pages.push((ev.revision, names, s.more));
        if !s.more {
            break;
        }
    }
    let rev = pages[0].0;
    assert_eq!(
        pages,
        [
            (
                rev,
                vec!["node-1".into(), "node-2".into(), "node-4".into()],
                true
            ),
            (rev, vec!["node-5".to_string()], false),
        ]
    );
    // Live changes follow the last page.
    ts.register("node-6", 6).await;
    assert_eq!(upsert(&next_event(&mut stream).await).node_name, "node-6");

    // A page size the snapshot fits in is one message, as is 0.
    for size in [0, 5] {
        let mut stream = paged(size).await;
        let ev = next_event(&mut stream).await;
        let Some(Event::Snapshot(s)) = ev.event else {
            panic!("expected a snapshot, got {ev:?}");
        };
        assert_eq!(s.peers.len(), 5, "size {size}");
        assert!(!s.more, "size {size}");
    }
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn a_watcher_older_than_the_history_gets_a_fresh_snapshot(pool: PgPool) {
    let mut s = settings();
    s.topology_history = 2;
    let ts = start_with(pool, s).await;
    ts.register("node-a", 1).await;
    let since = ts.register("node-b", 2).await.revision;
    for n in 3..=6u8 {
        ts.register(&format!("node-{n}"), n).await;
    }
    let mut stream = watch(&ts, "node-b", since).await;
    let ev = next_event(&mut stream).await;
    assert_eq!(ev.revision, since + 4);
    let names: Vec<String> = snapshot_peers(&ev)
        .into_iter()
        .map(|p| p.node_name)
        .collect();
    assert_eq!(names, ["node-3", "node-4", "node-5", "node-6", "node-a"]);

    // A revision from a newer database (e.g. after a restore) also resyncs.
    let mut stream = watch(&ts, "node-b", since + 1000).await;
    assert_eq!(snapshot_peers(&next_event(&mut stream).await).len(), 5);
}

/// Drives a feed of its own (woken only by PostgreSQL NOTIFY, as another
/// replica's would be) with one watcher that reads nothing and one that
/// keeps up. The transport's buffers are left out on purpose: HTTP/2 flow
/// control bounds them; this checks the server's own queueing.
#[sqlx::test(migrator = "MIGRATOR")]
async fn a_slow_watcher_neither_blocks_others_nor_queues_without_bound(pool: PgPool) {
    use weft_server::{
        store::Store,
        watch::{PeerFeed, STREAM_BUFFER, WatchMessage},
    };
    let ts = start(pool.clone()).await;
    ts.register("node-a", 1).await;
    ts.register("node-b", 2).await;
    let store = Store::new(pool, settings().layout, 10_000);
    let feed = PeerFeed::start(store.clone(), 32).await.unwrap();

    let (slow_tx, mut slow_rx) = tokio::sync::mpsc::channel(STREAM_BUFFER);
    let (fast_tx, mut fast_rx) = tokio::sync::mpsc::channel(STREAM_BUFFER);
    tokio::spawn({
        let (feed, store) = (feed.clone(), store.clone());
        async move { feed.serve_watcher(store, "node-b".into(), 0, slow_tx).await }
    });
    tokio::spawn({
        let (feed, store) = (feed.clone(), store.clone());
        async move { feed.serve_watcher(store, "node-c".into(), 0, fast_tx).await }
    });
    type Rx = tokio::sync::mpsc::Receiver<Result<WatchMessage, weft_server::store::StoreError>>;
    async fn recv(rx: &mut Rx) -> WatchMessage {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("no message within 10 s")
            .expect("watcher ended")
            .expect("watcher failed")
    }
    let WatchMessage::Snapshot {
        revision: mut last, ..
    } = recv(&mut fast_rx).await
    else {
        panic!("fast watcher did not start with a snapshot");
    };

    let changes = 500u64;
    let reader = tokio::spawn(async move {
        for _ in 0..changes {
            match recv(&mut fast_rx).await {
                WatchMessage::Change(ev) => {
                    assert_eq!(
                        ev.revision,
                        last + 1,
                        "fast watcher saw every change in order"
                    );
                    last = ev.revision;
                }
                other => panic!("fast watcher was resynced: {other:?}"),
            }
        }
        last
    });
    for i in 0..changes {
        let mac = 0x10 + (i % 2) as u8;
        ts.topology()
            .register_node(register_req("node-a", 1, mac))
            .await
            .unwrap();
    }
    let fast_last = tokio::time::timeout(Duration::from_secs(60), reader)
        .await
        .unwrap()
        .unwrap();

    // The slow watcher holds at most its stream buffer, then gets a
    // snapshot in place of everything it could not keep up with.
    let final_mac = format!("02:00:00:00:00:{:02x}", 0x10 + ((changes - 1) % 2) as u8);
    let mut drained = 0u64;
    let mut got_snapshot = false;
    loop {
        let msg = recv(&mut slow_rx).await;
        drained += 1;
        match msg {
            WatchMessage::Snapshot { revision, peers } => {
                if drained > 1 {
                    got_snapshot = true;
                }
                if revision == fast_last {
                    assert_eq!(
                        peers.iter().next().map(|p| p.vtep_mac.as_str()),
                        Some(final_mac.as_str())
                    );
                    break;
                }
            }
            WatchMessage::Change(ev) if ev.revision == fast_last => break,
            WatchMessage::Change(_) => {}
        }
    }
    assert!(
        got_snapshot,
        "the slow watcher was resynced with a snapshot"
    );
    assert!(
        drained < 100,
        "the slow watcher's backlog was bounded ({drained} messages for {changes} changes)"
    );
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn heartbeat_updates_last_seen_and_unknown_nodes_are_not_found(pool: PgPool) {
    let ts = start(pool).await;
    ts.register("node-a", 1).await;
    sqlx::query("UPDATE nodes SET last_seen = now() - interval '1 hour'")
        .execute(&ts.pool)
        .await
        .unwrap();
    ts.topology()
        .heartbeat(pb::HeartbeatRequest {
            node_name: "node-a".into(),
        })
        .await
        .unwrap();
    let age: f64 =
        sqlx::query_scalar("SELECT extract(epoch FROM now() - last_seen)::float8 FROM nodes")
            .fetch_one(&ts.pool)
            .await
            .unwrap();
    assert!(age < 60.0, "last_seen refreshed (age {age} s)");
    let err = ts
        .topology()
        .heartbeat(pb::HeartbeatRequest {
            node_name: "node-x".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = ts
        .topology()
        .heartbeat(pb::HeartbeatRequest {
            node_name: "".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[sqlx::test(migrator = "MIGRATOR")]
async fn watch_rejects_a_bad_node_name(pool: PgPool) {
    let ts = start(pool).await;
    let err = ts
        .topology()
        .watch_peers(pb::WatchPeersRequest {
            node_name: "a/b".into(),
            since_revision: 0,
            snapshot_page_size: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("node_name"));
}
