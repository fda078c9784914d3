//! End to end across nodes: real server, PostgreSQL, agents and the `weft`
//! plugin binary in namespaces (needs root; CI runs as root).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::json;
use weft_testbed::cluster::*;

/// A pod wired through the plugin; its address.
fn add_pod(c: &mut Cluster, node: usize, name: &str) -> String {
    c.add_pod(node, name).0
}

/// Two nodes, pod "a" on the first and "b" on the second, reaching each
/// other; b's address.
fn pods_on_two_nodes() -> (Cluster, String) {
    let mut c = Cluster::new(2);
    c.start_agent(0);
    c.start_agent(1);
    add_pod(&mut c, 0, "a");
    let b = add_pod(&mut c, 1, "b");
    wait_until("a -> b", Duration::from_secs(10), || c.pod_ping("a", &b));
    (c, b)
}

/// Starts a TCP listener in `pod` that prints the peer address and the
/// number of bytes it received.
fn listen(c: &Cluster, pod: &str, port: u16) -> KillOnDrop {
    let script = format!(
        "import socket\ns=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
         s.bind(('0.0.0.0', {port})); s.listen()\nc, a = s.accept(); n = 0\n\
         while True:\n    b = c.recv(1 << 20)\n    if not b: break\n    n += len(b)\nprint(a[0], n)"
    );
    KillOnDrop(Some(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &c.pod_ns_name(pod),
                "python3",
                "-c",
                &script,
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    ))
}

/// Sends `bytes` from `pod` to ip:port, retrying until the listener is up.
fn send(c: &Cluster, pod: &str, ip: &str, port: u16, bytes: u64) {
    let script = format!(
        "import socket, time\nfor _ in range(100):\n    try:\n        s = socket.create_connection(('{ip}', {port})); break\n    \
         except OSError: time.sleep(0.05)\nb = b'x' * 65536\nn = {bytes}\nwhile n > 0:\n    s.sendall(b[:min(n, len(b))]); n -= min(n, len(b))\ns.close()"
    );
    run(Command::new("ip").args([
        "netns",
        "exec",
        &c.pod_ns_name(pod),
        "python3",
        "-c",
        &script,
    ]));
}

#[test]
fn every_pod_reaches_every_other_pod_and_sees_the_senders_address() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new(3);
    for n in 0..3 {
        c.start_agent(n);
    }
    let mut pods = Vec::new();
    for n in 0..3 {
        for p in 0..2 {
            let name = format!("p{n}{p}");
            let ip = add_pod(&mut c, n, &name);
            pods.push((name, ip));
        }
    }
    for (from, _) in &pods {
        for (to, ip) in &pods {
            wait_until(
                &format!("{from} -> {to} ({ip})"),
                Duration::from_secs(10),
                || c.pod_ping(from, ip),
            );
        }
    }
    // Across nodes and on one node, the receiver sees the sender's address.
    for (from, to) in [(0, 5), (0, 1)] {
        let listener = listen(&c, &pods[to].0, 9000);
        send(&c, &pods[from].0, &pods[to].1, 9000, 1000);
        let out = String::from_utf8(listener.wait_output().stdout).unwrap();
        assert_eq!(
            out.split_whitespace().next(),
            Some(pods[from].1.as_str()),
            "{} -> {}",
            pods[from].0,
            pods[to].0
        );
    }
}

#[test]
fn a_recreated_pod_gets_a_new_address_not_the_one_just_released() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new(1);
    c.start_agent(0);
    let first = add_pod(&mut c, 0, "web");
    add_pod(&mut c, 0, "db");
    let ns = format!("/var/run/netns/{}", c.pod_ns_name("web"));
    assert_eq!(
        c.cni(0, "DEL", "ctr-web", &ns, "web", &c.net_conf(0, "1.0.0"))
            .code,
        0
    );
    c.delete_pod_netns("web");
    let again = add_pod(&mut c, 0, "web2");
    assert_eq!(first, "10.244.0.2");
    assert_eq!(
        again, "10.244.0.4",
        "round-robin continues after the last address given"
    );
    c.sql_settles(
        "SELECT action || ' ' || coalesce(container_id, '-') FROM audit_log WHERE address = '10.244.0.2' ORDER BY id",
        &["reserve -", "bind ctr-web", "release ctr-web"],
    );
}

#[test]
fn restarting_an_agent_loses_no_ping_between_pods_on_different_nodes() {
    if !require_root() {
        return;
    }
    let (mut c, b) = pods_on_two_nodes();

    // 500 pings, one every 10 ms, while both agents restart.
    let pinger = KillOnDrop(Some(
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &c.pod_ns_name("a"),
                "ping",
                "-i",
                "0.01",
                "-c",
                "500",
                "-W",
                "1",
                &b,
            ])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    std::thread::sleep(Duration::from_millis(500));
    c.stop_agent(0);
    c.start_agent(0);
    c.stop_agent(1);
    c.start_agent(1);
    let out = String::from_utf8(pinger.wait_output().stdout).unwrap();
    assert!(
        out.contains("500 packets transmitted, 500 received"),
        "{out}"
    );
}

#[test]
fn with_the_server_down_pods_start_talk_and_stop_and_gc_reclaims_afterwards() {
    if !require_root() {
        return;
    }
    let (mut c, b) = pods_on_two_nodes();
    add_pod(&mut c, 0, "gone");

    c.stop_server();
    assert!(c.pod_ping("a", &b), "existing pods keep talking");
    let ns = c.pod_netns("new");
    let add = c.cni(0, "ADD", "ctr-new", &ns, "new", &c.net_conf(0, "1.0.0"));
    assert_eq!(add.code, 0, "ADD binds from the reserve: {add:?}");
    assert!(
        c.pod_ping("new", &b),
        "a pod started in the outage reaches node 1"
    );
    let gone_ns = format!("/var/run/netns/{}", c.pod_ns_name("gone"));
    let del = c.cni(
        0,
        "DEL",
        "ctr-gone",
        &gone_ns,
        "gone",
        &c.net_conf(0, "1.0.0"),
    );
    assert_eq!(del.code, 0, "DEL succeeds without the server: {del:?}");
    c.delete_pod_netns("gone");

    c.start_server();
    wait_until("the server to answer", Duration::from_secs(20), || {
        c.cni(0, "STATUS", "", "", "", &c.net_conf(0, "1.1.0")).code == 0
    });
    // The runtime's next GC lists what it still runs on node 0.
    let mut gc = c.net_conf(0, "1.1.0");
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "ctr-a", "ifname": "eth0"}]);
    assert_eq!(c.cni(0, "GC", "", "", "", &gc).code, 0);
    c.sql_settles(
        "SELECT container_id FROM allocations WHERE state = 'bound' ORDER BY container_id",
        &["ctr-a", "ctr-b"],
    );
}

#[test]
fn deleting_a_node_withdraws_its_routes_and_releases_its_pods() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new(3);
    for n in 0..3 {
        c.start_agent(n);
    }
    let doomed = add_pod(&mut c, 2, "doomed");
    c.sql_settles(
        "SELECT count(*) FROM allocations WHERE state = 'bound'",
        &["1"],
    );
    wait_until("routes to node3", Duration::from_secs(10), || {
        c.routes_on_tunnel(0).len() == 2
    });
    c.stop_agent(2);
    c.grpc("weft.v1.Admin/DeleteNode", r#"{"name":"node3"}"#);
    for n in 0..2 {
        wait_until(
            &format!("node{n} to drop node3"),
            Duration::from_secs(10),
            || {
                c.routes_on_tunnel(n)
                    .iter()
                    .all(|r| r["dst"] != "10.244.2.0/24")
            },
        );
    }
    c.sql_settles(
        "SELECT count(*) FROM allocations WHERE state = 'bound'",
        &["0"],
    );
    let audit = c.sql(&format!(
        "SELECT action || ' ' || actor FROM audit_log WHERE address = '{doomed}' OR action = 'node_delete' ORDER BY id"
    ));
    assert_eq!(
        audit,
        [
            "reserve node/node3",
            "bind node/node3",
            "release admin/admin",
            "node_delete admin/admin"
        ]
    );
}

#[test]
fn tcp_across_nodes_runs_at_the_tunnel_mtu_without_fragmentation() {
    if !require_root() {
        return;
    }
    let (c, b) = pods_on_two_nodes();

    // A DF ping of exactly the pod MTU crosses the tunnel whole: the
    // sending node creates no IP fragment and the receiving one reassembles
    // none. Were the pod MTU not the underlay's minus the VXLAN overhead,
    // the encapsulated packet would be fragmented on the underlay.
    let mtu: u64 = in_ns_json(
        &c.pod_ns_name("a"),
        &["ip", "-j", "link", "show", "dev", "eth0"],
    )[0]["mtu"]
        .as_u64()
        .unwrap();
    assert_eq!(mtu, 1450, "underlay 1500 - 50");
    let ip_counter = |node: usize, name: &str| -> u64 {
        let out = in_ns(&c.nodes[node], &["cat", "/proc/net/snmp"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let mut ip = text.lines().filter(|l| l.starts_with("Ip:"));
        let (names, values) = (ip.next().unwrap(), ip.next().unwrap());
        let i = names.split_whitespace().position(|n| n == name).unwrap();
        values.split_whitespace().nth(i).unwrap().parse().unwrap()
    };
    let df = |size: &str| {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &c.pod_ns_name("a"),
                "ping",
                "-c",
                "1",
                "-W",
                "2",
                "-M",
                "do",
                "-s",
                size,
                &b,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    };
    let (frags, reasm) = (ip_counter(0, "FragCreates"), ip_counter(1, "ReasmReqds"));
    for _ in 0..5 {
        assert!(
            df(&(mtu - 28).to_string()),
            "a full-MTU packet ({} + 28 = {mtu}) crosses the tunnel",
            mtu - 28
        );
    }
    assert_eq!(ip_counter(0, "FragCreates"), frags, "the sender fragmented");
    assert_eq!(
        ip_counter(1, "ReasmReqds"),
        reasm,
        "the receiver reassembled"
    );

    let bytes: u64 = 300 << 20;
    let listener = listen(&c, "b", 9001);
    send(&c, "a", &b, 9001, bytes);
    let out = String::from_utf8(listener.wait_output().stdout).unwrap();
    let received: u64 = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert_eq!(received, bytes);
}
