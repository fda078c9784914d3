//! The real `weft` plugin binary, exec'd with the environment and stdin a
//! container runtime passes for a Kubernetes pod, against the real agent,
//! server and PostgreSQL (needs root; CI runs as root).
//! (Over 400 lines: one suite, a test per behaviour.)

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use weft_testbed::cluster::*;

fn one_node() -> Cluster {
    let mut c = Cluster::new(1);
    c.start_agent(0);
    c
}

fn address_of(result: &Value) -> String {
    result["ips"][0]["address"].as_str().unwrap().to_owned()
}

#[test]
fn add_wires_the_pod_and_two_pods_on_a_node_reach_each_other() {
    if !require_root() {
        return;
    }
    let mut c = one_node();
    let conf = c.net_conf(0, "1.1.0");
    let ns_a = c.pod_netns("a");
    let ns_b = c.pod_netns("b");
    let a = c.cni(0, "ADD", "ctr-a", &ns_a, "web-a", &conf);
    assert_eq!(a.code, 0, "{a:?}");
    let b = c.cni(0, "ADD", "ctr-b", &ns_b, "web-b", &conf);
    assert_eq!(b.code, 0, "{b:?}");

    let r = &a.stdout;
    assert_eq!(r["cniVersion"], "1.1.0");
    assert_eq!(r["ips"][0]["gateway"], "10.244.0.1");
    assert_eq!(r["ips"][0]["interface"], 1);
    assert_eq!(r["interfaces"][1]["name"], "eth0");
    assert_eq!(r["interfaces"][1]["sandbox"], ns_a.as_str());
    assert_eq!(r["interfaces"][1]["mtu"], 1450);
    assert_eq!(
        r["routes"],
        json!([{"dst": "0.0.0.0/0", "gw": "10.244.0.1"}])
    );
    let host_if = r["interfaces"][0]["name"].as_str().unwrap();

    // The pod side, as the kernel has it.
    let pod = c.pod_ns_name("a");
    let eth0 = &in_ns_json(&pod, &["ip", "-j", "-4", "addr", "show", "dev", "eth0"])[0];
    assert_eq!(eth0["mtu"], 1450);
    assert_eq!(
        format!(
            "{}/{}",
            eth0["addr_info"][0]["local"].as_str().unwrap(),
            eth0["addr_info"][0]["prefixlen"]
        ),
        address_of(r)
    );
    assert!(
        eth0["flags"]
            .as_array()
            .unwrap()
            .contains(&Value::from("UP"))
    );
    let routes = in_ns_json(&pod, &["ip", "-j", "-4", "route", "show", "default"]);
    assert_eq!(routes[0]["gateway"], "10.244.0.1");
    assert_eq!(routes[0]["dev"], "eth0");
    // The host side: on weft0, up, hairpin on.
    let host = &in_ns_json(
        &c.nodes[0],
        &["ip", "-j", "-d", "link", "show", "dev", host_if],
    )[0];
    assert_eq!(host["master"], "weft0");
    assert_eq!(host["linkinfo"]["info_slave_data"]["hairpin"], true);
    assert_eq!(host["mtu"], 1450);
    assert!(
        host["flags"]
            .as_array()
            .unwrap()
            .contains(&Value::from("UP"))
    );
    // The result names the MACs the kernel has (the host one is chosen by
    // the agent, the pod one by the kernel).
    assert_eq!(r["interfaces"][0]["mac"], host["address"]);
    let pod_link = &in_ns_json(&pod, &["ip", "-j", "link", "show", "dev", "eth0"])[0];
    assert_eq!(r["interfaces"][1]["mac"], pod_link["address"]);
    let lo = &in_ns_json(&pod, &["ip", "-j", "link", "show", "dev", "lo"])[0];
    assert!(lo["flags"].as_array().unwrap().contains(&Value::from("UP")));

    let b_ip = address_of(&b.stdout).split('/').next().unwrap().to_owned();
    assert!(c.pod_ping("a", &b_ip), "pod a cannot reach pod b at {b_ip}");

    // The audit log names the pod.
    let want = format!(
        "bind default/web-a {}",
        address_of(r).split('/').next().unwrap()
    );
    c.sql_settles(
        "SELECT action || ' ' || pod_namespace || '/' || pod_name || ' ' || host(address) FROM audit_log WHERE container_id = 'ctr-a'",
        &[&want],
    );
}

#[test]
fn results_are_shaped_for_the_requested_version() {
    if !require_root() {
        return;
    }
    let mut c = one_node();
    for (i, version) in ["0.3.0", "0.3.1", "0.4.0", "1.0.0"].iter().enumerate() {
        let ns = c.pod_netns(&format!("v{i}"));
        let out = c.cni(
            0,
            "ADD",
            &format!("ctr-v{i}"),
            &ns,
            "v",
            &c.net_conf(0, version),
        );
        assert_eq!(out.code, 0, "{version}: {out:?}");
        assert_eq!(out.stdout["cniVersion"], *version);
        assert_eq!(
            out.stdout["ips"][0].get("version").is_some(),
            version.starts_with('0'),
            "{version}"
        );
        assert!(
            out.stdout["interfaces"][1].get("mtu").is_none(),
            "{version}"
        );
    }
}

#[test]
fn a_retried_add_returns_the_same_result() {
    if !require_root() {
        return;
    }
    let mut c = one_node();
    let ns = c.pod_netns("p");
    let conf = c.net_conf(0, "1.0.0");
    let first = c.cni(0, "ADD", "ctr-p", &ns, "p", &conf);
    let again = c.cni(0, "ADD", "ctr-p", &ns, "p", &conf);
    assert_eq!(first.code, 0);
    assert_eq!(first.stdout, again.stdout);
    c.sql_settles(
        "SELECT count(*) FROM allocations WHERE state = 'bound'",
        &["1"],
    );
    c.sql_settles(
        "SELECT count(*) FROM audit_log WHERE action = 'bind'",
        &["1"],
    );
}

#[test]
fn an_add_over_a_half_made_attachment_replaces_it() {
    if !require_root() {
        return;
    }
    let mut c = one_node();
    let ns = c.pod_netns("h");
    // What a crash between making the veth and moving on can leave: the
    // host end under the attachment's name, off the bridge, no pod side.
    let host_if = weft_core::names::host_ifname("ctr-h", "eth0");
    in_ns(
        &c.nodes[0],
        &[
            "ip", "link", "add", &host_if, "type", "veth", "peer", "name", "stale0",
        ],
    );
    let out = c.cni(0, "ADD", "ctr-h", &ns, "h", &c.net_conf(0, "1.0.0"));
    assert_eq!(out.code, 0, "{out:?}");
    let host = &in_ns_json(&c.nodes[0], &["ip", "-j", "link", "show", "dev", &host_if])[0];
    assert_eq!(host["master"], "weft0");
    assert_eq!(out.stdout["interfaces"][0]["mac"], host["address"]);
    let links = in_ns_json(&c.nodes[0], &["ip", "-j", "link", "show"]);
    assert!(
        !links
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["ifname"] == "stale0"),
        "the stale peer is still there"
    );
    let pod = c.pod_ns_name("h");
    let eth0 = &in_ns_json(&pod, &["ip", "-j", "-4", "addr", "show", "dev", "eth0"])[0];
    assert_eq!(
        format!(
            "{}/{}",
            eth0["addr_info"][0]["local"].as_str().unwrap(),
            eth0["addr_info"][0]["prefixlen"]
        ),
        address_of(&out.stdout)
    );
}

#[test]
fn del_flushes_the_pods_flows_from_conntrack_and_only_those() {
    if !require_root() {
        return;
    }
    let mut c = one_node();
    let ns = c.pod_netns("f");
    let out = c.cni(0, "ADD", "ctr-f", &ns, "f", &c.net_conf(0, "1.0.0"));
    assert_eq!(out.code, 0, "{out:?}");
    let ip = address_of(&out.stdout)
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let node = c.nodes[0].clone();
    let insert = |args: &[&str]| {
        let mut all = vec![
            "conntrack",
            "-I",
            "-p",
            "tcp",
            "--state",
            "ESTABLISHED",
            "-t",
            "300",
        ];
        all.extend_from_slice(args);
        in_ns(&node, &all);
    };
    // The pod's own flow, a Service flow DNATed to it (the pod is only in
    // the reply tuple), and a flow of someone else.
    insert(&[
        "-s",
        &ip,
        "-d",
        "198.51.100.1",
        "--sport",
        "1000",
        "--dport",
        "80",
    ]);
    insert(&[
        "-s",
        "10.244.1.9",
        "-d",
        "10.96.0.10",
        "-r",
        &ip,
        "-q",
        "10.244.1.9",
        "--sport",
        "1001",
        "--dport",
        "80",
        "--reply-port-src",
        "8080",
        "--reply-port-dst",
        "1001",
    ]);
    insert(&[
        "-s",
        "10.244.1.9",
        "-d",
        "198.51.100.1",
        "--sport",
        "1002",
        "--dport",
        "80",
    ]);
    let flows = || String::from_utf8_lossy(&in_ns(&node, &["conntrack", "-L"]).stdout).into_owned();
    assert_eq!(
        flows().matches(&format!("={ip} ")).count(),
        3,
        "{}",
        flows()
    );

    let out = c.cni(0, "DEL", "ctr-f", &ns, "f", &c.net_conf(0, "1.0.0"));
    assert_eq!(out.code, 0, "{out:?}");
    // The flush runs just after the answer (the address is held from binds
    // until it is done).
    let deadline = Instant::now() + Duration::from_secs(10);
    while flows().contains(&format!("={ip} ")) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let left = flows();
    assert!(!left.contains(&format!("={ip} ")), "{left}");
    assert!(
        left.contains("sport=1002"),
        "someone else's flow was flushed: {left}"
    );
}

/// The link group of veths DEL cut off ("weft" in ASCII, 0x77656674).
const CUT_OFF_GROUP: &str = "2003134068";

/// The host veth's `ip -j -d link` entry, if it exists.
fn host_link(c: &Cluster, name: &str) -> Option<Value> {
    let links = in_ns_json(&c.nodes[0], &["ip", "-j", "-d", "link", "show"]);
    links
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["ifname"] == name)
        .cloned()
}

#[test]
fn del_cuts_the_pod_off_before_it_answers_and_its_veth_dies_after() {
    if !require_root() {
        return;
    }
    let mut c = one_node();
    let conf = c.net_conf(0, "1.0.0");
    let (ns_a, ns_b) = (c.pod_netns("a"), c.pod_netns("b"));
    assert_eq!(c.cni(0, "ADD", "ctr-a", &ns_a, "a", &conf).code, 0);
    let b = c.cni(0, "ADD", "ctr-b", &ns_b, "b", &conf);
    let b_ip = address_of(&b.stdout).split('/').next().unwrap().to_owned();
    assert!(c.pod_ping("a", &b_ip));

    let host_b = weft_core::names::host_ifname("ctr-b", "eth0");
    assert_eq!(c.cni(0, "DEL", "ctr-b", &ns_b, "b", &conf).code, 0);
    // At the answer: gone, or down and off the bridge, waiting to be deleted.
    if let Some(l) = host_link(&c, &host_b) {
        assert!(l["master"].is_null(), "{l}");
        assert!(
            !l["flags"].as_array().unwrap().contains(&Value::from("UP")),
            "{l}"
        );
        assert_eq!(l["group"], CUT_OFF_GROUP, "{l}");
    }
    assert!(
        !c.pod_ping("a", &b_ip),
        "pod b is still reachable after its DEL"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while host_link(&c, &host_b).is_some() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        host_link(&c, &host_b).is_none(),
        "the cut-off veth never died"
    );

    // A veth a stopped agent left cut off is deleted when it starts again;
    // a live pod's veth is not touched.
    c.stop_agent(0);
    let left = weft_core::names::host_ifname("ctr-z", "eth0");
    in_ns(
        &c.nodes[0],
        &[
            "ip", "link", "add", &left, "type", "veth", "peer", "name", "z0",
        ],
    );
    in_ns(
        &c.nodes[0],
        &["ip", "link", "set", &left, "group", CUT_OFF_GROUP],
    );
    c.start_agent(0);
    assert!(
        host_link(&c, &left).is_none(),
        "a cut-off veth outlived a restart: {}",
        c.agent_log(0)
    );
    let host_a = weft_core::names::host_ifname("ctr-a", "eth0");
    assert_eq!(host_link(&c, &host_a).unwrap()["master"], "weft0");
}

#[test]
fn check_passes_then_names_what_drifted() {
    if !require_root() {
        return;
    }
    let mut c = one_node();
    let ns = c.pod_netns("p");
    let add = c.cni(0, "ADD", "ctr-p", &ns, "p", &c.net_conf(0, "1.0.0"));
    let mut conf = c.net_conf(0, "1.0.0");
    conf["prevResult"] = add.stdout.clone();
    let ok = c.cni(0, "CHECK", "ctr-p", &ns, "p", &conf);
    assert_eq!((ok.code, &ok.stdout), (0, &Value::Null), "{ok:?}");

    in_ns(
        &c.pod_ns_name("p"),
        &["ip", "link", "set", "eth0", "mtu", "1400"],
    );
    let drift = c.cni(0, "CHECK", "ctr-p", &ns, "p", &conf);
    assert_eq!(drift.code, 1);
    assert_eq!(drift.stdout["code"], 103);
    assert!(
        drift.stdout["msg"].as_str().unwrap().contains("MTU 1400"),
        "{drift:?}"
    );

    in_ns(
        &c.pod_ns_name("p"),
        &["ip", "link", "set", "eth0", "mtu", "1450"],
    );
    in_ns(&c.pod_ns_name("p"), &["ip", "route", "del", "default"]);
    let drift = c.cni(0, "CHECK", "ctr-p", &ns, "p", &conf);
    assert_eq!(drift.stdout["code"], 103);
    assert!(
        drift.stdout["msg"]
            .as_str()
            .unwrap()
            .contains("default route"),
        "{drift:?}"
    );
}

#[test]
fn del_is_idempotent_and_succeeds_when_the_netns_is_gone() {
    if !require_root() {
        return;
    }
    let mut c = one_node();
    let conf = c.net_conf(0, "1.0.0");
    let ns = c.pod_netns("p");
    c.cni(0, "ADD", "ctr-p", &ns, "p", &conf);
    for _ in 0..2 {
        let del = c.cni(0, "DEL", "ctr-p", &ns, "p", &conf);
        assert_eq!((del.code, &del.stdout), (0, &Value::Null), "{del:?}");
    }
    c.sql_settles(
        "SELECT count(*) FROM allocations WHERE state = 'bound'",
        &["0"],
    );
    c.sql_settles(
        "SELECT count(*) FROM audit_log WHERE action = 'release'",
        &["1"],
    );

    let ns = c.pod_netns("q");
    c.cni(0, "ADD", "ctr-q", &ns, "q", &conf);
    c.delete_pod_netns("q");
    let del = c.cni(0, "DEL", "ctr-q", &ns, "q", &conf);
    assert_eq!(del.code, 0, "{del:?}");
    c.sql_settles(
        "SELECT count(*) FROM allocations WHERE state = 'bound'",
        &["0"],
    );
    let veths = in_ns_json(
        &c.nodes[0],
        &["ip", "-j", "link", "show", "master", "weft0"],
    );
    assert_eq!(veths.as_array().unwrap().len(), 0, "no host veth left");
    // Unknown container: success too.
    assert_eq!(c.cni(0, "DEL", "never-added", &ns, "x", &conf).code, 0);
}

#[test]
fn gc_releases_leaked_allocations_and_orphaned_veths() {
    if !require_root() {
        return;
    }
    let mut c = one_node();
    let conf = c.net_conf(0, "1.1.0");
    let (ns1, ns2) = (c.pod_netns("p1"), c.pod_netns("p2"));
    c.cni(0, "ADD", "ctr-1", &ns1, "p1", &conf);
    c.cni(0, "ADD", "ctr-2", &ns2, "p2", &conf);
    let mut gc_conf = conf.clone();
    gc_conf["cni.dev/valid-attachments"] = json!([{"containerID": "ctr-1", "ifname": "eth0"}]);
    let gc = c.cni(0, "GC", "", "", "", &gc_conf);
    assert_eq!(gc.code, 0, "{gc:?}");
    c.sql_settles(
        "SELECT container_id FROM allocations WHERE state = 'bound'",
        &["ctr-1"],
    );
    // GC's releases are the node's: audited as the release of ctr-2.
    c.sql_settles(
        "SELECT container_id FROM audit_log WHERE action = 'release'",
        &["ctr-2"],
    );
    let veths = in_ns_json(
        &c.nodes[0],
        &["ip", "-j", "link", "show", "master", "weft0"],
    );
    assert_eq!(
        veths.as_array().unwrap().len(),
        1,
        "the orphaned veth is gone"
    );
}

#[test]
fn with_the_server_down_adds_bind_from_the_reserve_until_it_is_empty_then_answer_11() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new(1);
    // A reserve of one address, so the outage exhausts it.
    c.spawn_agent_with_env(0, &[("WEFT_RESERVE_LOW", "1"), ("WEFT_RESERVE_HIGH", "1")]);
    wait_until("agent ready", Duration::from_secs(20), || {
        c.agent_log(0).contains("node ready")
    });
    c.sql_settles(
        "SELECT count(*) FROM allocations WHERE state = 'reserved'",
        &["1"],
    );
    let conf = c.net_conf(0, "1.1.0");
    let up = c.cni(0, "STATUS", "", "", "", &conf);
    assert_eq!((up.code, &up.stdout), (0, &Value::Null), "{up:?}");

    c.stop_server();
    // The reserve is at hand: STATUS is fine and ADD needs no server.
    let status = c.cni(0, "STATUS", "", "", "", &conf);
    assert_eq!(status.code, 0, "{status:?}");
    let ns = c.pod_netns("p");
    let add = c.cni(0, "ADD", "ctr-p", &ns, "p", &conf);
    assert_eq!(add.code, 0, "{add:?}");
    // Now it is empty: STATUS says so, and ADD fails at once with 11.
    let down = c.cni(0, "STATUS", "", "", "", &conf);
    assert_eq!(down.stdout["code"], 50, "{down:?}");
    let ns = c.pod_netns("q");
    let start = Instant::now();
    let add = c.cni(0, "ADD", "ctr-q", &ns, "q", &conf);
    assert_eq!(add.stdout["code"], 11, "{add:?}");
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "ADD took {:?}",
        start.elapsed()
    );
    let links = in_ns_json(&c.pod_ns_name("q"), &["ip", "-j", "link", "show"]);
    assert_eq!(
        links.as_array().unwrap().len(),
        1,
        "nothing but lo in the pod after a failed ADD"
    );

    c.start_server();
    wait_until("STATUS to recover", Duration::from_secs(20), || {
        c.cni(0, "STATUS", "", "", "", &conf).code == 0
    });
    c.sql_settles(
        "SELECT container_id || ' ' || offline FROM allocations WHERE state = 'bound'",
        &["ctr-p true"],
    );
}

#[test]
fn the_shim_reports_11_when_the_agent_is_down() {
    if !require_root() {
        return;
    }
    let mut c = one_node();
    c.stop_agent(0);
    let ns = c.pod_netns("p");
    let out = c.cni(0, "ADD", "ctr-p", &ns, "p", &c.net_conf(0, "1.0.0"));
    assert_eq!(out.code, 1);
    assert_eq!(out.stdout["code"], 11);
    let msg = out.stdout["msg"].as_str().unwrap();
    assert!(
        msg.contains("node0.sock") && msg.contains("weft-agent"),
        "{msg}"
    );
    // VERSION needs no agent.
    let v = c.cni(0, "VERSION", "", "", "", &c.net_conf(0, "0.4.0"));
    assert_eq!(v.code, 0);
    assert_eq!(v.stdout["supportedVersions"].as_array().unwrap().len(), 5);
}

#[test]
fn pods_on_different_nodes_reach_each_other_without_nat() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new(2);
    c.start_agent(0);
    c.start_agent(1);
    let (na, nb) = (c.pod_netns("a"), c.pod_netns("b"));
    let a = c.cni(0, "ADD", "ctr-a", &na, "a", &c.net_conf(0, "1.0.0"));
    let b = c.cni(1, "ADD", "ctr-b", &nb, "b", &c.net_conf(1, "1.0.0"));
    let a_ip = address_of(&a.stdout).split('/').next().unwrap().to_owned();
    let b_ip = address_of(&b.stdout).split('/').next().unwrap().to_owned();
    assert!(
        a_ip.starts_with("10.244.0.") && b_ip.starts_with("10.244.1."),
        "{a_ip} {b_ip}"
    );
    wait_until(
        "the tunnel between the nodes",
        Duration::from_secs(10),
        || c.pod_ping("a", &b_ip),
    );
    assert!(c.pod_ping("b", &a_ip));

    // The receiver sees the sender's pod address: no NAT inside the cluster.
    let listener = KillOnDrop(Some(std::process::Command::new("ip")
        .args(["netns", "exec", &c.pod_ns_name("b"), "python3", "-c"])
        .arg("import socket; s=socket.socket(); s.bind(('0.0.0.0', 9000)); s.listen(); c, a = s.accept(); print(a[0])")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap()));
    wait_until("the listener in pod b", Duration::from_secs(10), || {
        std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                &c.pod_ns_name("a"),
                "bash",
                "-c",
                &format!("exec 3<>/dev/tcp/{b_ip}/9000"),
            ])
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    let out = listener.wait_output();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), a_ip);
}

#[test]
fn a_caller_that_is_not_root_is_refused() {
    if !require_root() {
        return;
    }
    let c = one_node();
    let sock = c.dir.join("node0.sock");
    let mode = |p: &std::path::Path| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(p).unwrap().permissions().mode() & 0o777
    };
    assert_eq!(mode(&sock), 0o600, "the socket is root-only");
    let as_nobody = |c: &Cluster| {
        let exe = std::env::current_exe().unwrap();
        let weft = exe
            .parent()
            .and_then(std::path::Path::parent)
            .unwrap()
            .join("weft");
        let mut child = std::process::Command::new("runuser")
            .args(["-u", "nobody", "--"])
            .arg(weft)
            .env("CNI_COMMAND", "ADD")
            .env("CNI_CONTAINERID", "sneaky")
            .env("CNI_NETNS", "/var/run/netns/none")
            .env("CNI_IFNAME", "eth0")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(c.net_conf(0, "1.0.0").to_string().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    // The file mode stops it first, and the plugin says so (104, not
    // "agent not running")...
    let denied = as_nobody(&c);
    assert_eq!(denied["code"], 104, "{denied}");
    assert!(
        denied["msg"]
            .as_str()
            .unwrap()
            .contains("permission denied"),
        "{denied}"
    );
    // ...and with the mode loosened, the agent checks the caller itself.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = as_nobody(&c);
    assert_eq!(out["code"], 104, "{out}");
    c.sql_settles(
        "SELECT count(*) FROM allocations WHERE state = 'bound'",
        &["0"],
    );
}
