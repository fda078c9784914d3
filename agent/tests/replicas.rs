//! Two weft-server replicas on one PostgreSQL with agents that know both
//! (needs root; CI runs as root).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{collections::BTreeSet, time::Duration};

use weft_testbed::cluster::*;

/// Blocks on node `n`'s tunnel must be exactly the database's other nodes.
fn converged(c: &Cluster, n: usize) -> bool {
    let own = format!("node{}", n + 1);
    let db: BTreeSet<String> = c
        .sql(&format!(
            "SELECT block::text FROM nodes WHERE name <> '{own}'"
        ))
        .into_iter()
        .collect();
    let kernel: BTreeSet<String> = c
        .routes_on_tunnel(n)
        .iter()
        .map(|r| r["dst"].as_str().unwrap_or_default().to_owned())
        .collect();
    let fdb = c.fdb_on_tunnel(n).len();
    kernel == db && fdb == db.len()
}

/// Registers a node that has no agent, through the replica at `server`.
fn register_via(c: &Cluster, server: &str, name: &str, n: u8) {
    let ns = if server == SERVER_IP {
        c.control.clone()
    } else {
        format!("{}-control2", c.id)
    };
    let body = format!(
        r#"{{"node_name":"{name}","underlay_ip":"203.0.113.{n}","vtep_mac":"02:00:00:00:01:{n:02x}"}}"#
    );
    let mut args = vec!["grpcurl".to_owned()];
    args.extend(c.grpcurl_auth(name));
    args.extend([
        "-d".to_owned(),
        body,
        format!("{server}:7400"),
        "weft.v1.Topology/RegisterNode".to_owned(),
    ]);
    in_ns(&ns, &args.iter().map(String::as_str).collect::<Vec<_>>());
}

fn control_ns(c: &Cluster, server: &str) -> String {
    if server == SERVER_IP {
        c.control.clone()
    } else {
        format!("{}-control2", c.id)
    }
}

fn delete_via(c: &Cluster, server: &str, name: &str) {
    let body = format!(r#"{{"name":"{name}"}}"#);
    let mut args = vec!["grpcurl".to_owned()];
    args.extend(c.grpcurl_auth("admin"));
    args.extend([
        "-d".to_owned(),
        body,
        format!("{server}:7400"),
        "weft.v1.Admin/DeleteNode".to_owned(),
    ]);
    in_ns(
        &control_ns(c, server),
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
}

/// Open watch streams on a replica, from its metrics.
fn watchers(c: &Cluster, server: &str) -> u32 {
    let out = in_ns(
        &control_ns(c, server),
        &["curl", "-sf", &format!("http://{server}:7401/metrics")],
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("weft_watchers ")?.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn agents_follow_changes_made_through_either_replica_and_survive_one_dying() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new(3);
    c.start_replica();
    for n in 0..3 {
        c.start_agent(n);
    }
    for n in 0..3 {
        wait_until(
            &format!("node{n} to converge"),
            Duration::from_secs(15),
            || converged(&c, n),
        );
    }

    // Changes through replica 1 reach agents whichever replica they watch.
    for i in 1..=5u8 {
        register_via(&c, SERVER_IP, &format!("ghost{i}"), i);
    }
    c.grpc("weft.v1.Admin/DeleteNode", r#"{"name":"ghost1"}"#);
    for n in 0..3 {
        wait_until(
            &format!("node{n} to see changes via replica 1"),
            Duration::from_secs(15),
            || converged(&c, n),
        );
    }

    // The replica holding the most watch streams is SIGKILLed in the
    // middle of a stream of changes sent through the other one.
    let (w1, w2) = (watchers(&c, SERVER_IP), watchers(&c, REPLICA_IP));
    assert_eq!(w1 + w2, 3, "every agent watches one replica");
    let (victim_is_primary, survivor) = if w1 >= w2 {
        (true, REPLICA_IP)
    } else {
        (false, SERVER_IP)
    };
    for i in 6..=15u8 {
        register_via(&c, survivor, &format!("ghost{i}"), i);
        if i == 8 {
            if victim_is_primary {
                c.stop_server();
            } else {
                c.kill_replica();
            }
        }
    }
    delete_via(&c, survivor, "ghost2");
    for n in 0..3 {
        wait_until(
            &format!("node{n} to converge after the replica died"),
            Duration::from_secs(30),
            || converged(&c, n),
        );
    }
    // Every change was applied once and right: each agent's routes,
    // neighbours and FDB entries are exactly the database's other nodes.
    for n in 0..3 {
        let (want, have) = tunnel_entries(&c, n);
        assert_eq!(have, want, "node{n}'s tunnel entries");
    }
}

/// Node `n`'s tunnel entries as the database implies them, and as the
/// kernel holds them: "route BLOCK via VIA", "neigh VIA MAC", "fdb MAC DST".
fn tunnel_entries(c: &Cluster, n: usize) -> (BTreeSet<String>, BTreeSet<String>) {
    let own = format!("node{}", n + 1);
    let mut want = BTreeSet::new();
    for row in c.sql(&format!(
        "SELECT block::text || ' ' || host(network(block)) || ' ' || vtep_mac::text || ' ' || host(underlay_ip)
         FROM nodes WHERE name <> '{own}'"
    )) {
        let f: Vec<&str> = row.split(' ').collect();
        want.insert(format!("route {} via {}", f[0], f[1]));
        want.insert(format!("neigh {} {}", f[1], f[2]));
        want.insert(format!("fdb {} {}", f[2], f[3]));
    }
    let text = |v: &serde_json::Value, k: &str| v[k].as_str().unwrap_or_default().to_owned();
    let mut have = BTreeSet::new();
    for r in c.routes_on_tunnel(n) {
        have.insert(format!(
            "route {} via {}",
            text(&r, "dst"),
            text(&r, "gateway")
        ));
    }
    for nb in c.neighbours_on_tunnel(n) {
        have.insert(format!(
            "neigh {} {}",
            text(&nb, "dst"),
            text(&nb, "lladdr")
        ));
    }
    for f in c.fdb_on_tunnel(n) {
        // The kernel's own all-zero default entry is not Weft's.
        if f.get("dst").is_some() && text(&f, "mac") != "00:00:00:00:00:00" {
            have.insert(format!("fdb {} {}", text(&f, "mac"), text(&f, "dst")));
        }
    }
    (want, have)
}

#[test]
fn changes_through_the_second_replica_reach_agents_too() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new(2);
    c.start_replica();
    c.start_agent(0);
    c.start_agent(1);
    register_via(&c, REPLICA_IP, "ghost", 9);
    for n in 0..2 {
        wait_until(
            &format!("node{n} to see the ghost"),
            Duration::from_secs(15),
            || converged(&c, n) && c.routes_on_tunnel(n).len() == 2,
        );
    }
}
