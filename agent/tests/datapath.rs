//! The real agent against the real server and PostgreSQL, in namespaces
//! (needs root; CI runs as root). Kernel state is read back with `ip -j`
//! and `bridge -j`, as an operator would.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{process::Command, time::Duration};

use serde_json::Value;
use weft_testbed::cluster::*;

fn wait_for_peers(c: &Cluster, node: usize, count: usize) {
    wait_until(
        &format!("node {node} to have {count} peer routes"),
        Duration::from_secs(15),
        || c.routes_on_tunnel(node).len() == count && c.fdb_on_tunnel(node).len() == count,
    );
}

#[test]
fn the_datapath_is_built_as_specified_and_gateways_ping_across_the_tunnel() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new(3);
    for n in 0..3 {
        c.start_agent(n);
    }
    for n in 0..3 {
        wait_for_peers(&c, n, 2);
    }
    let node = &c.nodes[0];

    let link = &in_ns_json(
        node,
        &["ip", "-j", "-d", "link", "show", "dev", "weft.vxlan"],
    )[0];
    let vx = &link["linkinfo"]["info_data"];
    assert_eq!(link["linkinfo"]["info_kind"], "vxlan");
    assert_eq!(vx["id"], 1);
    assert_eq!(vx["local"], "198.51.100.1");
    assert_eq!(vx["port"], 4789);
    assert_eq!(vx["learning"], false);
    assert_eq!(vx["link"], "eth0");
    assert_eq!(link["mtu"], 1450, "underlay 1500 - 50");
    assert!(
        link["flags"]
            .as_array()
            .unwrap()
            .contains(&Value::from("UP"))
    );
    let vx_addr = &in_ns_json(
        node,
        &["ip", "-j", "-4", "addr", "show", "dev", "weft.vxlan"],
    )[0]["addr_info"];
    assert_eq!(vx_addr.as_array().unwrap().len(), 1);
    assert_eq!(vx_addr[0]["local"], "10.244.0.0");
    assert_eq!(vx_addr[0]["prefixlen"], 32);

    let br = &in_ns_json(node, &["ip", "-j", "-d", "addr", "show", "dev", "weft0"])[0];
    assert_eq!(br["linkinfo"]["info_kind"], "bridge");
    assert_eq!(br["mtu"], 1450);
    assert_eq!(br["addr_info"][0]["local"], "10.244.0.1");
    assert_eq!(br["addr_info"][0]["prefixlen"], 24);

    // Exactly one route, neighbour and FDB entry per other node.
    let mut routes: Vec<(String, String, bool)> = c
        .routes_on_tunnel(0)
        .iter()
        .map(|r| {
            let onlink = r["flags"]
                .as_array()
                .is_some_and(|f| f.contains(&Value::from("onlink")));
            (
                r["dst"].as_str().unwrap().to_owned(),
                r["gateway"].as_str().unwrap().to_owned(),
                onlink,
            )
        })
        .collect();
    routes.sort();
    assert_eq!(
        routes,
        [
            ("10.244.1.0/24".to_owned(), "10.244.1.0".to_owned(), true),
            ("10.244.2.0/24".to_owned(), "10.244.2.0".to_owned(), true),
        ]
    );
    let mut neigh: Vec<(String, String, String)> = c
        .neighbours_on_tunnel(0)
        .iter()
        .map(|n| {
            (
                n["dst"].as_str().unwrap().to_owned(),
                n["lladdr"].as_str().unwrap().to_owned(),
                n["state"][0].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    neigh.sort();
    assert_eq!(
        neigh,
        [
            (
                "10.244.1.0".to_owned(),
                c.vtep_mac(1),
                "PERMANENT".to_owned()
            ),
            (
                "10.244.2.0".to_owned(),
                c.vtep_mac(2),
                "PERMANENT".to_owned()
            ),
        ]
    );
    let mut fdb: Vec<(String, String)> = c
        .fdb_on_tunnel(0)
        .iter()
        .map(|f| {
            (
                f["mac"].as_str().unwrap().to_owned(),
                f["dst"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    fdb.sort();
    let mut expected = vec![
        (c.vtep_mac(1), "198.51.100.2".to_owned()),
        (c.vtep_mac(2), "198.51.100.3".to_owned()),
    ];
    expected.sort();
    assert_eq!(fdb, expected);

    assert_eq!(
        String::from_utf8(in_ns(node, &["cat", "/proc/sys/net/ipv4/ip_forward"]).stdout)
            .unwrap()
            .trim(),
        "1"
    );
    let nft =
        String::from_utf8(in_ns(node, &["nft", "list", "table", "ip", "weft"]).stdout).unwrap();
    let rules: Vec<&str> = nft
        .lines()
        .map(str::trim)
        .filter(|l| l.contains("masquerade"))
        .collect();
    assert_eq!(
        rules,
        ["ip saddr 10.244.0.0/24 ip daddr != 10.244.0.0/16 masquerade"]
    );

    let conf: Value = serde_json::from_str(
        &std::fs::read_to_string(c.cni_dir(0).join("10-weft.conflist")).unwrap(),
    )
    .unwrap();
    assert_eq!(conf["plugins"][0]["type"], "weft");

    // Gateway to gateway across the VXLAN tunnel, every pair.
    for a in 0..3 {
        for b in 0..3 {
            let (from, to) = (c.gateway(a), c.gateway(b));
            assert!(
                c.ping(a, &from, &to),
                "node{a} {from} cannot reach node{b} {to}"
            );
        }
    }
}

#[test]
fn a_node_re_registering_with_a_new_mac_is_updated_on_the_others() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new(2);
    c.start_agent(0);
    c.start_agent(1);
    wait_for_peers(&c, 0, 1);
    let old_mac = c.vtep_mac(1);

    // The agent adopts the device's MAC; changing it and restarting makes
    // the node re-register with the new one.
    c.stop_agent(1);
    let new_mac = "02:42:de:ad:be:ef";
    in_ns(
        &c.nodes[1],
        &["ip", "link", "set", "weft.vxlan", "address", new_mac],
    );
    c.start_agent(1);
    wait_until(
        "node0 to learn node1's new MAC",
        Duration::from_secs(15),
        || {
            c.neighbours_on_tunnel(0)
                .iter()
                .any(|n| n["lladdr"] == new_mac)
                && c.fdb_on_tunnel(0).iter().any(|f| f["mac"] == new_mac)
        },
    );
    assert!(
        c.neighbours_on_tunnel(0)
            .iter()
            .all(|n| n["lladdr"] != old_mac.as_str())
    );
    assert!(
        c.fdb_on_tunnel(0)
            .iter()
            .all(|f| f["mac"] != old_mac.as_str()),
        "old FDB entry removed"
    );
    assert_eq!(c.routes_on_tunnel(0).len(), 1);
    let (from, to) = (c.gateway(0), c.gateway(1));
    assert!(c.ping(0, &from, &to), "tunnel works with the new MAC");
}

#[test]
fn admin_delete_node_removes_its_entries_everywhere() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new(3);
    for n in 0..3 {
        c.start_agent(n);
    }
    for n in 0..3 {
        wait_for_peers(&c, n, 2);
    }
    c.stop_agent(2);
    c.grpc("weft.v1.Admin/DeleteNode", r#"{"name":"node3"}"#);
    for n in 0..2 {
        wait_for_peers(&c, n, 1);
        assert!(
            c.routes_on_tunnel(n)
                .iter()
                .all(|r| r["dst"] != "10.244.2.0/24")
        );
        assert!(
            c.neighbours_on_tunnel(n)
                .iter()
                .all(|r| r["dst"] != "10.244.2.0")
        );
        assert!(
            c.fdb_on_tunnel(n)
                .iter()
                .all(|f| f["dst"] != "198.51.100.3")
        );
    }
}

#[test]
fn an_agent_restart_leaves_the_kernel_state_byte_for_byte_the_same() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new(2);
    c.start_agent(0);
    c.start_agent(1);
    wait_for_peers(&c, 0, 1);
    let before = c.kernel_state(0);

    c.stop_agent(0);
    // SIGTERM leaves the datapath in place: the tunnel still works.
    let (from, to) = (c.gateway(0), c.gateway(1));
    assert!(c.ping(0, &from, &to), "datapath gone after SIGTERM");
    assert_same_state(&before, &c.kernel_state(0), "stopping changed the kernel");

    c.start_agent(0);
    // Let it pass a full reconcile after the snapshot.
    wait_until("a reconcile after restart", Duration::from_secs(10), || {
        c.agent_log(0).contains("peer entries in sync")
    });
    let log = c.agent_log(0);
    assert!(
        !log.contains("added entry") && !log.contains("removed entry"),
        "restart touched entries:\n{log}"
    );
    assert_same_state(&before, &c.kernel_state(0), "restart changed the kernel");
}

#[test]
fn a_stray_route_on_the_tunnel_is_removed_and_unrelated_routes_are_kept() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new(2);
    c.start_agent(0);
    c.start_agent(1);
    wait_for_peers(&c, 0, 1);
    c.stop_agent(0);
    let ns = c.nodes[0].clone();
    in_ns(
        &ns,
        &["ip", "route", "add", "10.244.200.0/24", "dev", "weft.vxlan"],
    );
    in_ns(
        &ns,
        &[
            "ip",
            "neigh",
            "add",
            "10.244.201.0",
            "lladdr",
            "02:00:00:00:0a:0a",
            "dev",
            "weft.vxlan",
            "nud",
            "permanent",
        ],
    );
    in_ns(
        &ns,
        &[
            "ip",
            "route",
            "add",
            "203.0.113.0/24",
            "via",
            "198.51.100.254",
            "dev",
            "eth0",
        ],
    );

    // The restart's snapshot resync removes what the peer set does not imply.
    c.start_agent(0);
    wait_until("the stray route to go", Duration::from_secs(10), || {
        c.routes_on_tunnel(0)
            .iter()
            .all(|r| r["dst"] != "10.244.200.0/24")
    });
    assert!(
        c.neighbours_on_tunnel(0)
            .iter()
            .all(|n| n["dst"] != "10.244.201.0"),
        "stray neighbour removed"
    );
    assert_eq!(c.routes_on_tunnel(0).len(), 1, "the peer route stays");
    let unrelated = in_ns_json(&ns, &["ip", "-j", "route", "show", "203.0.113.0/24"]);
    assert_eq!(
        unrelated.as_array().unwrap().len(),
        1,
        "a route elsewhere is untouched"
    );
}

#[test]
fn an_unreachable_server_is_retried_until_it_answers() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new(1);
    c.stop_server();
    c.spawn_agent(0);
    wait_until("a retry to be logged", Duration::from_secs(10), || {
        c.agent_log(0)
            .contains("server unreachable; retrying registration")
    });
    let agent = c.agents[0].as_mut().unwrap();
    assert!(
        agent.child.try_wait().unwrap().is_none(),
        "the agent exited instead of retrying"
    );
    assert!(
        !c.cni_dir(0).join("10-weft.conflist").exists(),
        "not ready without the server"
    );

    c.start_server();
    wait_until("the agent to become ready", Duration::from_secs(30), || {
        c.agent_log(0).contains("node ready")
    });
    assert!(c.cni_dir(0).join("10-weft.conflist").exists());
    let status = Command::new("ip")
        .args([
            "netns",
            "exec",
            &c.nodes[0],
            "curl",
            "-sf",
            "http://198.51.100.1:7402/healthz",
        ])
        .status()
        .unwrap();
    assert!(status.success(), "/healthz reports ready");
}
