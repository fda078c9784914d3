//! Issue 18: a PostgreSQL failover, tested for real. A primary and a
//! streaming standby (pg_basebackup -R) on this machine; two weft-server
//! replicas reach the database through one stable address (a forwarder
//! switched as a Service or VIP would be); real agents churn ADD and DEL;
//! the primary is killed mid-churn, the standby promoted, the address
//! switched. The servers recover on their own (NOT_SERVING during the gap,
//! SERVING after), pods keep starting from the reserves, and afterwards no
//! address is held twice and PostgreSQL holds exactly the wired pods.
//! Synchronous replication loses nothing acknowledged; asynchronous loses
//! the last commits, and the agents' sync repairs them (docs/ha.md).
//! Needs root; CI runs as root.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use weft_testbed::cluster::*;

fn both_report(c: &Cluster, want: &str) {
    wait_until(
        &format!("both replicas {want}"),
        Duration::from_secs(30),
        || c.health(SERVER_IP) == want && c.health(REPLICA_IP) == want,
    );
}

fn churn(c: &mut Cluster, pods: &mut LivePods, tag: &str, adds: usize) {
    for i in 0..adds {
        for n in 0..2 {
            pods.add(c, n, &format!("{tag}{n}x{i}"));
        }
    }
    // One DEL per node.
    for n in 0..2 {
        let (cid, _) = pods.on(n)[0].clone();
        pods.del(c, &cid);
    }
}

fn failover(mode: &str, ports: (u16, u16, u16)) {
    if !require_root() {
        return;
    }
    let (primary, standby, vip_port) = ports;
    let pair = PostgresPair::start(primary, standby, mode);
    let vip_dir = std::env::temp_dir().join(format!("weft-vip-{}-{vip_port}", std::process::id()));
    let vip = Forwarder::start(&vip_dir, vip_port, &pair.primary_socket());
    let url = format!(
        "postgres://postgres@localhost:{vip_port}/postgres?host={}",
        vip_dir.display()
    );
    let mut c = Cluster::on_database(2, url);
    c.start_replica();
    c.start_agent(0);
    c.start_agent(1);
    let mut pods = LivePods::default();

    // Acknowledged before anything fails.
    churn(&mut c, &mut pods, "a", 4);
    pods.wait_recorded(&c, Duration::from_secs(10));
    let acknowledged = c.sql("SELECT count(*) || ' ' || max(id) FROM audit_log");
    if mode == "async" {
        // The standby falls behind (stopped): what follows is committed on
        // the primary alone and is lost with it.
        pair.stop_standby();
        churn(&mut c, &mut pods, "b", 3);
        pods.wait_recorded(&c, Duration::from_secs(10));
    }

    // The primary dies mid-churn.
    pods.add(&mut c, 0, "gap-first");
    pair.kill_primary();
    both_report(&c, "NOT_SERVING");
    // Pods keep starting and stopping from the reserves.
    churn(&mut c, &mut pods, "g", 2);

    if mode == "async" {
        pair.start_standby();
    }
    pair.promote();
    vip.switch(&pair.standby_socket());
    both_report(&c, "SERVING");
    if mode == "sync" {
        // Nothing acknowledged was lost: every audit row committed before
        // the kill is on the promoted standby.
        let max_id = acknowledged[0].split(' ').nth(1).unwrap();
        let kept = c.sql(&format!(
            "SELECT count(*) || ' ' || max(id) FROM audit_log WHERE id <= {max_id}"
        ));
        assert_eq!(kept, acknowledged, "acknowledged commits lost");
    }
    churn(&mut c, &mut pods, "c", 2);

    // The agents' reports and syncs bring PostgreSQL to exactly the pods
    // that are wired, with the addresses they have.
    pods.wait_recorded(&c, Duration::from_secs(60));
    // Every row lies in its own node's block, and every node's reserve
    // is back in PostgreSQL (the agents' books were synced in full).
    assert_eq!(
        c.sql("SELECT count(*) FROM allocations a JOIN nodes n ON n.name = a.node_name WHERE NOT a.address << n.block"),
        ["0"]
    );
    assert_eq!(
        c.sql("SELECT bool_and(n > 0)::text FROM (SELECT count(*) n FROM allocations WHERE state = 'reserved' GROUP BY node_name) r"),
        ["true"]
    );
    let repaired =
        c.sql("SELECT count(*) FROM audit_log WHERE detail = 'repair' AND action = 'bind'");
    if mode == "async" {
        // The lost binds came back from the nodes' books.
        assert_ne!(repaired, ["0"], "nothing was lost, so nothing was tested");
    }
    // A pod started after everything settled gets an address no live pod has.
    pods.add(&mut c, 1, "last");
    eprintln!(
        "{mode}: {} pods wired, {} binds repaired",
        pods.live.len(),
        repaired[0]
    );
}

#[test]
fn a_failover_with_synchronous_replication_loses_nothing_acknowledged() {
    failover("sync", (56011, 56012, 56013));
}

#[test]
fn a_failover_with_asynchronous_replication_is_repaired_from_the_nodes() {
    failover("async", (56021, 56022, 56023));
}
