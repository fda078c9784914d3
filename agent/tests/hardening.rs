//! Issue 12's node-side defects, tried the way a kubelet and a crashing
//! machine would: an agent restarted during a server outage, a SIGKILL
//! with a release still owed to the server, a node deleted while its agent
//! runs, a netns that did not propagate, and the agent aborting (as a
//! SIGKILL would) at each step of ADD and DEL through debug-build
//! failpoints (needs root; CI runs as root).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{fs, time::Duration};

use serde_json::Value;
use weft_testbed::cluster::*;

fn add(c: &mut Cluster, node: usize, name: &str) -> (String, Value) {
    c.add_pod(node, name)
}

fn kill_agent(c: &mut Cluster, node: usize) {
    let mut agent = c.agents[node].take().unwrap();
    agent.child.kill().unwrap();
    agent.child.wait().unwrap();
}

#[test]
fn an_agent_restarted_during_a_server_outage_serves_add_del_and_check_and_reports_later() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new(1);
    c.start_agent(0);
    let (ip, result) = add(&mut c, 0, "p");
    let ns = format!("/var/run/netns/{}", c.pod_ns_name("p"));
    c.sql_settles(
        "SELECT container_id FROM allocations WHERE state = 'bound'",
        &["ctr-p"],
    );

    // The server goes away, then the agent restarts (an upgrade, a crash).
    c.stop_server();
    c.stop_agent(0);
    c.spawn_agent(0);
    wait_until("the CNI socket", Duration::from_secs(10), || {
        c.agent_log(0).contains("serving CNI requests")
    });
    assert!(!c.agent_log(0).contains("registered"), "the server is down");

    // CHECK is answered from the kernel, the saved MTU and the book.
    let mut conf = c.net_conf(0, "1.0.0");
    conf["prevResult"] = result;
    let check = c.cni(0, "CHECK", "ctr-p", &ns, "p", &conf);
    assert_eq!(check.code, 0, "{check:?}");
    // A new pod starts from the reserve the last run kept.
    let new_ns = c.pod_netns("new");
    let new = c.cni(0, "ADD", "ctr-new", &new_ns, "new", &c.net_conf(0, "1.0.0"));
    assert_eq!(new.code, 0, "{new:?}");
    let new_ip = new.stdout["ips"][0]["address"].as_str().unwrap().to_owned();
    assert!(!new_ip.starts_with(&format!("{ip}/")), "{new_ip} is live");
    // DEL succeeds at once, and the release is journalled.
    let del = c.cni(0, "DEL", "ctr-p", &ns, "p", &c.net_conf(0, "1.0.0"));
    assert_eq!(del.code, 0, "{del:?}");
    let journal = fs::read_to_string(c.state_dir(0).join("events.log")).unwrap();
    assert!(
        journal.contains("\"release\"") && journal.contains("ctr-p"),
        "{journal}"
    );
    // A CHECK of the deleted attachment is drift, not a pass.
    let gone = c.cni(0, "CHECK", "ctr-p", &ns, "p", &conf);
    assert_eq!(gone.code, 1, "{gone:?}");

    // The machine crashes before the server is back.
    kill_agent(&mut c, 0);
    assert_eq!(
        c.sql("SELECT container_id FROM allocations WHERE state = 'bound'"),
        ["ctr-p"],
        "PostgreSQL still holds the old view"
    );

    c.start_server();
    c.start_agent(0);
    c.sql_settles(
        "SELECT container_id || ' ' || host(address) || ' ' || offline FROM allocations WHERE state = 'bound'",
        &[&format!("ctr-new {} true", new_ip.split('/').next().unwrap())],
    );
    c.sql_settles(
        &format!("SELECT action || ' ' || actor FROM audit_log WHERE address = '{ip}' ORDER BY id"),
        &[
            "reserve node/node1",
            "bind node/node1",
            "release node/node1",
        ],
    );
    // The release happened during the outage; its audit row says when.
    let late = c.sql(&format!(
        "SELECT offline AND recorded_at > at FROM audit_log WHERE address = '{ip}' AND action = 'release'"
    ));
    assert_eq!(late, ["t"]);
}

#[test]
fn a_pod_re_added_under_its_id_during_an_outage_is_recorded_with_the_address_it_has() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new(1);
    c.start_agent(0);
    let (ip, _) = add(&mut c, 0, "p");
    let ns = format!("/var/run/netns/{}", c.pod_ns_name("p"));
    c.stop_server();
    let del = c.cni(0, "DEL", "ctr-p", &ns, "p", &c.net_conf(0, "1.0.0"));
    assert_eq!(del.code, 0, "{del:?}");
    // The runtime retries the sandbox under the same id before the
    // server is back: it gets the next reserved address.
    let again = c.cni(0, "ADD", "ctr-p", &ns, "p", &c.net_conf(0, "1.0.0"));
    assert_eq!(again.code, 0, "{again:?}");
    let got = again.stdout["ips"][0]["address"].as_str().unwrap();
    let got = got.split('/').next().unwrap().to_owned();
    assert_ne!(got, ip, "a released address is the last to come back");
    c.start_server();
    c.sql_settles(
        "SELECT host(address) || ' ' || container_id FROM allocations WHERE state = 'bound'",
        &[&format!("{got} ctr-p")],
    );
}

#[test]
fn a_node_deleted_while_its_agent_runs_is_fenced_and_its_block_kept_from_others() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new(2);
    c.start_agent(0);
    c.start_agent(1);
    let (_, _) = add(&mut c, 0, "p");
    let ns = format!("/var/run/netns/{}", c.pod_ns_name("p"));
    let block = c.sql("SELECT block::text FROM nodes WHERE name = 'node1'");
    c.grpc("weft.v1.Admin/DeleteNode", r#"{"name":"node1"}"#);
    wait_until("the agent to learn it", Duration::from_secs(30), || {
        c.agent_log(0).contains("deleted from weft-server")
    });
    let new_ns = c.pod_netns("new");
    let new = c.cni(0, "ADD", "ctr-new", &new_ns, "new", &c.net_conf(0, "1.0.0"));
    assert_eq!(new.stdout["code"], 100, "{new:?}");
    assert!(
        new.stdout["msg"].as_str().unwrap().contains("deleted"),
        "{new:?}"
    );
    // STATUS and /healthz say why.
    let status = c.cni(0, "STATUS", "", "", "", &c.net_conf(0, "1.1.0"));
    assert_eq!(status.stdout["code"], 50, "{status:?}");
    assert!(
        status.stdout["msg"].as_str().unwrap().contains("deleted"),
        "{status:?}"
    );
    wait_until("/healthz to turn 503", Duration::from_secs(5), || {
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &c.nodes[0],
                "curl",
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
            ])
            .arg("http://198.51.100.1:7402/healthz")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout) == "503"
    });
    // The node drains: DEL still works.
    let del = c.cni(0, "DEL", "ctr-p", &ns, "p", &c.net_conf(0, "1.0.0"));
    assert_eq!(del.code, 0, "{del:?}");
    // A new node does not get the deleted node's block while it is
    // quarantined.
    c.register_agentless("ghost", "203.0.113.9", "02:00:00:00:09:09");
    let ghost = c.sql("SELECT block::text FROM nodes WHERE name = 'ghost'");
    assert_ne!(ghost, block, "the quarantined block went to another node");
}

#[test]
fn an_add_into_a_netns_the_agent_cannot_see_names_mount_propagation() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new(1);
    c.start_agent(0);
    // What an unpropagated bind mount looks like from the agent's side.
    let fake = c.dir.join("not-a-netns");
    fs::write(&fake, b"").unwrap();
    let out = c.cni(
        0,
        "ADD",
        "ctr-x",
        fake.to_str().unwrap(),
        "x",
        &c.net_conf(0, "1.0.0"),
    );
    assert_eq!(out.stdout["code"], 102, "{out:?}");
    let msg = out.stdout["msg"].as_str().unwrap();
    assert!(
        msg.contains("empty file") && msg.contains("propagat"),
        "{msg}"
    );
    c.sql_settles(
        "SELECT count(*) FROM allocations WHERE state = 'bound'",
        &["0"],
    );
}

/// The agent dies (abort, no cleanup) at `failpoint` during the next CNI
/// call that reaches it; waits for it to be gone.
fn crashed_agent(c: &mut Cluster, failpoint: &str) {
    c.spawn_agent_with_env(0, &[("WEFT_FAILPOINTS", failpoint)]);
    wait_until("agent ready", Duration::from_secs(20), || {
        c.agent_log(0).contains("node ready")
    });
}

fn wait_crashed(c: &mut Cluster, failpoint: &str) {
    wait_until("the agent to abort", Duration::from_secs(10), || {
        let log = c.agent_log(0);
        log.contains("failpoint reached") && log.contains(failpoint)
    });
    let mut agent = c.agents[0].take().unwrap();
    let status = agent.child.wait().unwrap();
    assert!(!status.success(), "the agent aborted at {failpoint}");
}

/// No allocation and no host veth left for `cid`; the database and the
/// kernel agree.
fn nothing_left(c: &Cluster, cid: &str) {
    c.sql_settles(
        &format!(
            "SELECT count(*) FROM allocations WHERE state = 'bound' AND container_id = '{cid}'"
        ),
        &["0"],
    );
    let veth = weft_core::names::host_ifname(cid, "eth0");
    let links = in_ns_json(
        &c.nodes[0],
        &["ip", "-j", "link", "show", "master", "weft0"],
    );
    assert!(
        links
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["ifname"] != veth.as_str()),
        "leaked host veth {veth}: {links}"
    );
}

/// The wired pods are exactly the database's allocations, address for address.
fn wired_matches_database(c: &Cluster, pods: &[(&str, &str)]) {
    let mut want: Vec<String> = pods.iter().map(|(cid, ip)| format!("{cid} {ip}")).collect();
    want.sort();
    let want: Vec<&str> = want.iter().map(String::as_str).collect();
    c.sql_settles(
        "SELECT container_id || ' ' || host(address) FROM allocations WHERE state = 'bound' ORDER BY 1",
        &want,
    );
}

fn add_crash_then_runtime_cleans_up(failpoint: &str) {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new(1);
    crashed_agent(&mut c, failpoint);
    let ns = c.pod_netns("p");
    let crashed = c.cni(0, "ADD", "ctr-p", &ns, "p", &c.net_conf(0, "1.0.0"));
    assert_ne!(crashed.code, 0, "{crashed:?}");
    wait_crashed(&mut c, failpoint);
    c.start_agent(0);
    // A runtime DELs a sandbox whose ADD failed.
    let del = c.cni(0, "DEL", "ctr-p", &ns, "p", &c.net_conf(0, "1.0.0"));
    assert_eq!(del.code, 0, "{del:?}");
    nothing_left(&c, "ctr-p");
    // And the retried sandbox gets an address the database agrees with.
    let (ip, _) = add(&mut c, 0, "q");
    wired_matches_database(&c, &[("ctr-q", &ip)]);
}

#[test]
fn sigkill_after_binding_before_wiring_leaks_nothing() {
    add_crash_then_runtime_cleans_up("add-after-bind");
}

#[test]
fn sigkill_after_wiring_before_the_answer_leaks_nothing() {
    add_crash_then_runtime_cleans_up("add-after-wire");
}

#[test]
fn sigkill_during_del_then_a_retried_del_leaks_nothing() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new(1);
    crashed_agent(&mut c, "del-after-teardown");
    let (ip, _) = add(&mut c, 0, "p");
    let (other, _) = add(&mut c, 0, "o");
    let ns = format!("/var/run/netns/{}", c.pod_ns_name("p"));
    let del = c.cni(0, "DEL", "ctr-p", &ns, "p", &c.net_conf(0, "1.0.0"));
    assert_ne!(del.code, 0, "{del:?}");
    wait_crashed(&mut c, "del-after-teardown");
    c.start_agent(0);
    let del = c.cni(0, "DEL", "ctr-p", &ns, "p", &c.net_conf(0, "1.0.0"));
    assert_eq!(del.code, 0, "{del:?}");
    nothing_left(&c, "ctr-p");
    wired_matches_database(&c, &[("ctr-o", &other)]);
    // The freed address is not handed out again at once (round-robin).
    let (next, _) = add(&mut c, 0, "n");
    assert_ne!(next, ip);
}

#[test]
fn sigkill_after_journalling_a_release_during_an_outage_leaks_nothing() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new(1);
    crashed_agent(&mut c, "del-after-release");
    add(&mut c, 0, "p");
    let ns = format!("/var/run/netns/{}", c.pod_ns_name("p"));
    c.stop_server();
    let del = c.cni(0, "DEL", "ctr-p", &ns, "p", &c.net_conf(0, "1.0.0"));
    assert_ne!(del.code, 0, "{del:?}");
    wait_crashed(&mut c, "del-after-release");
    // Restarted during the outage, the runtime retries the DEL.
    c.spawn_agent(0);
    wait_until("the CNI socket", Duration::from_secs(10), || {
        c.agent_log(0).contains("serving CNI requests")
    });
    let del = c.cni(0, "DEL", "ctr-p", &ns, "p", &c.net_conf(0, "1.0.0"));
    assert_eq!(del.code, 0, "{del:?}");
    c.start_server();
    wait_until(
        "the release to reach PostgreSQL",
        Duration::from_secs(15),
        || {
            c.sql("SELECT count(*) FROM allocations WHERE state = 'bound'")
                .first()
                .map(String::as_str)
                == Some("0")
        },
    );
    nothing_left(&c, "ctr-p");
}

#[test]
fn an_agent_notices_a_server_gone_without_a_fin_and_watches_again() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new(1);
    c.start_agent(0);
    // Everything between the node and the server vanishes silently: no
    // RST, no FIN, as in a partition or a crashed host.
    let node = c.nodes[0].clone();
    let rules = format!(
        "table inet weft-test-blackhole {{\n  chain out {{ type filter hook output priority 0; ip daddr {SERVER_IP} drop; }}\n  chain in {{ type filter hook input priority 0; ip saddr {SERVER_IP} drop; }}\n}}\n"
    );
    let path = c.dir.join("blackhole.nft");
    fs::write(&path, rules).unwrap();
    in_ns(&node, &["nft", "-f", path.to_str().unwrap()]);
    // The agent's HTTP/2 PINGs (10 s, 5 s to answer) find the dead stream;
    // nothing else would, as the watch carries no traffic of its own.
    wait_until(
        "the agent to notice the dead connection",
        Duration::from_secs(40),
        || c.agent_log(0).contains("peer stream broke"),
    );
    in_ns(
        &node,
        &["nft", "delete", "table", "inet", "weft-test-blackhole"],
    );
    // A change made meanwhile reaches it once it watches again.
    c.register_agentless("ghost", "203.0.113.9", "02:00:00:00:09:09");
    wait_until("the ghost's route", Duration::from_secs(40), || {
        c.routes_on_tunnel(0).len() == 1
    });
}

#[test]
fn an_agent_that_lost_its_state_directory_adopts_the_pods_that_are_wired() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new(1);
    c.start_agent(0);
    let (ip, _) = add(&mut c, 0, "p");
    c.sql_settles(
        "SELECT container_id FROM allocations WHERE state = 'bound'",
        &["ctr-p"],
    );
    // An upgrade from an agent without the reserve journal, or a wiped
    // state directory: the pod is wired, the book knows nothing of it.
    kill_agent(&mut c, 0);
    for f in ["events.log", "reserve.json"] {
        let _ = fs::remove_file(c.state_dir(0).join(f));
    }
    c.start_agent(0);
    wait_until("the adoption", Duration::from_secs(10), || {
        c.agent_log(0).contains("adopted pods")
    });
    // Many ADDs later the adopted address has never been handed out again,
    // and the first syncs kept its row.
    let mut seen = Vec::new();
    for i in 0..20 {
        let (other, _) = add(&mut c, 0, &format!("n{i}"));
        seen.push(other);
    }
    assert!(!seen.contains(&ip), "{ip} handed out twice: {seen:?}");
    c.sql_settles(
        &format!("SELECT container_id FROM allocations WHERE address = '{ip}'"),
        &["ctr-p"],
    );
}

#[test]
fn an_agent_cut_off_from_every_server_stops_binding_when_its_lease_runs_out() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new(1);
    // A 3 s lease (the server caps it at half its block quarantine), so
    // a node deleted while its agent is cut off stops binding long before
    // its block can reach another node.
    c.spawn_agent_with_env(0, &[("WEFT_RESERVE_LEASE", "3")]);
    wait_until("agent ready", Duration::from_secs(20), || {
        c.agent_log(0).contains("node ready")
    });
    c.sql_settles(
        "SELECT count(*) > 0 FROM allocations WHERE state = 'reserved'",
        &["t"],
    );
    c.stop_server();
    let (ip, _) = add(&mut c, 0, "p");
    std::thread::sleep(Duration::from_secs(4));
    let ns = c.pod_netns("late");
    let late = c.cni(0, "ADD", "ctr-late", &ns, "late", &c.net_conf(0, "1.0.0"));
    assert_eq!(late.stdout["code"], 11, "{late:?}");
    assert!(
        late.stdout["msg"].as_str().unwrap().contains("lease"),
        "{late:?}"
    );
    // What is wired keeps its address: a retried ADD still answers, DEL works.
    let p_ns = format!("/var/run/netns/{}", c.pod_ns_name("p"));
    let again = c.cni(0, "ADD", "ctr-p", &p_ns, "p", &c.net_conf(0, "1.0.0"));
    assert_eq!(again.code, 0, "{again:?}");
    assert!(
        again.stdout["ips"][0]["address"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{ip}/"))
    );
    // The server back, the lease runs again.
    c.start_server();
    wait_until("ADD to work again", Duration::from_secs(30), || {
        c.cni(0, "ADD", "ctr-late", &ns, "late", &c.net_conf(0, "1.0.0"))
            .code
            == 0
    });
}

#[test]
fn after_a_reboot_during_an_outage_the_datapath_comes_back_and_pods_start() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new(1);
    c.start_agent(0);
    let (old, _) = add(&mut c, 0, "p");
    c.sql_settles(
        "SELECT container_id FROM allocations WHERE state = 'bound'",
        &["ctr-p"],
    );
    c.stop_server();
    // The machine reboots: the agent dies, the kernel forgets the bridge,
    // the tunnel and the pods; the state directory is on disk.
    kill_agent(&mut c, 0);
    for link in ["weft0", "weft.vxlan"] {
        in_ns(&c.nodes[0], &["ip", "link", "del", link]);
    }
    c.delete_pod_netns("p");
    c.spawn_agent(0);
    wait_until("the CNI socket", Duration::from_secs(10), || {
        c.agent_log(0).contains("serving CNI requests")
    });
    assert!(
        c.agent_log(0)
            .contains("datapath built from the saved assignment"),
        "{}",
        c.agent_log(0)
    );
    // A new pod starts with the server still down and reaches its gateway.
    let (new, _) = add(&mut c, 0, "q");
    assert_ne!(new, old);
    assert!(c.pod_ping("q", "10.244.0.1"), "the rebuilt bridge answers");
    // The server returns: PostgreSQL holds the new pod, not the dead one.
    c.start_server();
    c.sql_settles(
        "SELECT container_id FROM allocations WHERE state = 'bound'",
        &["ctr-q"],
    );
}
