//! The kubelet's path: Debian's containerd (with runc), configured with Weft
//! as its CNI plugin, starts a pod sandbox through its CRI API, so the
//! runtime itself execs `weft`. Needs root and the packages scripts/test
//! installs (containerd, runc, busybox-static, containernetworking-plugins
//! for the loopback plugin containerd always runs).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use serde_json::{Value, json};
use weft_testbed::cluster::*;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// containerd in a node namespace; stopped, with its sandboxes, on drop.
struct Containerd {
    dir: PathBuf,
    pid: u32,
    sandboxes: Vec<String>,
}

impl Containerd {
    fn start(c: &Cluster, node: usize) -> Self {
        let dir = c.dir.join("containerd");
        // The agents' --cni-bin-dir: the plugins their conflist chains.
        let bin = c.cni_bin();
        let out = run(Command::new(repo().join("deploy/local/containerd/start"))
            .arg(&c.nodes[node])
            .arg(&dir)
            .arg(&bin)
            .arg(c.cni_dir(node)));
        let pid = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
        Self {
            dir,
            pid,
            sandboxes: Vec::new(),
        }
    }

    fn cri(&self, method: &str, body: &Value) -> Result<Value, String> {
        let out = Command::new("grpcurl")
            .args(["-plaintext", "-unix", "-import-path"])
            .arg(repo().join("deploy/local/containerd"))
            .args(["-proto", "cri.proto", "-d", &body.to_string()])
            .arg(self.dir.join("containerd.sock"))
            .arg(format!("runtime.v1.RuntimeService/{method}"))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(serde_json::from_slice(&out.stdout).unwrap_or(Value::Null))
    }

    fn run_pod(&mut self, name: &str) -> Result<String, String> {
        self.run_pod_with(name, json!({}))
    }

    /// RunPodSandbox with `extra` merged into the sandbox config (port
    /// mappings, annotations: what the kubelet puts there).
    fn run_pod_with(&mut self, name: &str, extra: Value) -> Result<String, String> {
        let mut config = json!({
            "metadata": {"name": name, "uid": format!("uid-{name}"), "namespace": "default", "attempt": 0},
            "hostname": name,
            "log_directory": self.dir.join("logs"),
        });
        if let (Some(c), Some(e)) = (config.as_object_mut(), extra.as_object()) {
            c.extend(e.clone());
        }
        let body = json!({ "config": config });
        let id = self.cri("RunPodSandbox", &body)?["podSandboxId"]
            .as_str()
            .unwrap()
            .to_owned();
        self.sandboxes.push(id.clone());
        Ok(id)
    }

    fn remove_pod(&mut self, id: &str) {
        self.cri("StopPodSandbox", &json!({"pod_sandbox_id": id}))
            .unwrap();
        self.cri("RemovePodSandbox", &json!({"pod_sandbox_id": id}))
            .unwrap();
        self.sandboxes.retain(|s| s != id);
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        for id in self.sandboxes.clone() {
            let _ = self.cri("StopPodSandbox", &json!({"pod_sandbox_id": id}));
            let _ = self.cri("RemovePodSandbox", &json!({"pod_sandbox_id": id}));
        }
        let _ = Command::new("kill").arg(self.pid.to_string()).status();
        std::thread::sleep(Duration::from_millis(300));
        // Shims outlive containerd; ours name our socket on their command line.
        let ours = self.dir.join("containerd.sock").display().to_string();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(&ours) {
                let _ = Command::new("kill")
                    .args(["-KILL", &entry.file_name().to_string_lossy()])
                    .status();
            }
        }
        let _ = Command::new("umount")
            .args(["-R", "-l"])
            .arg(&self.dir)
            .stderr(Stdio::null())
            .status();
    }
}

impl Containerd {
    /// The sandbox's address and the name of the network namespace
    /// containerd made for it (from its runtime spec: several clusters' sandboxes may hold the
    /// same address under /var/run/netns at once).
    fn sandbox_network(&self, id: &str) -> (String, String) {
        let status = self
            .cri(
                "PodSandboxStatus",
                &json!({"pod_sandbox_id": id, "verbose": true}),
            )
            .unwrap();
        let ip = status["status"]["network"]["ip"]
            .as_str()
            .unwrap()
            .to_owned();
        let info: Value = serde_json::from_str(status["info"]["info"].as_str().unwrap()).unwrap();
        let netns = info["runtimeSpec"]["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["type"] == "network")
            .and_then(|n| n["path"].as_str())
            .unwrap_or_else(|| panic!("no network namespace in {info:#}"));
        // Its name under /var/run/netns, as `ip netns` takes it.
        let name = Path::new(netns)
            .strip_prefix("/var/run/netns")
            .unwrap_or_else(|_| panic!("{netns} is not under /var/run/netns"))
            .to_string_lossy()
            .into_owned();
        (ip, name)
    }
}

fn have(binary: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {binary}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Root and the tools scripts/test installs; in CI their absence fails.
fn can_run(tools: &[&str]) -> bool {
    if !require_root() {
        return false;
    }
    if let Some(missing) = tools.iter().find(|t| !have(t)) {
        assert!(
            std::env::var("CI").is_err(),
            "{missing} missing in CI: scripts/test installs it"
        );
        eprintln!("skipping: {missing} not installed");
        return false;
    }
    true
}

const CONTAINERD_TOOLS: [&str; 5] = ["containerd", "runc", "ctr", "grpcurl", "nsenter"];

#[test]
fn containerd_starts_a_pod_sandbox_through_cri_with_a_weft_address() {
    if !can_run(&CONTAINERD_TOOLS) {
        return;
    }
    let mut c = Cluster::new(2);
    c.start_agent(0);
    c.start_agent(1);
    let peer_ns = c.pod_netns("peer");
    let peer = c.cni(
        1,
        "ADD",
        "ctr-peer",
        &peer_ns,
        "peer",
        &c.net_conf(1, "1.0.0"),
    );
    let peer_ip = address_of(&peer.stdout);

    let mut ctr = Containerd::start(&c, 0);
    let id = ctr
        .run_pod("web")
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}"));
    let (ip, sandbox_ns) = ctr.sandbox_network(&id);
    assert!(ip.starts_with("10.244.0."), "sandbox got {ip}");

    let reached = Command::new("ip")
        .args([
            "netns",
            "exec",
            &sandbox_ns,
            "ping",
            "-c",
            "1",
            "-W",
            "2",
            &peer_ip,
        ])
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(reached, "the sandbox reaches a pod on the other node");
    c.sql_settles("SELECT pod_namespace || '/' || pod_name || ' ' || pod_uid FROM allocations WHERE state = 'bound' AND node_name = 'node1'", &["default/web uid-web"]);

    ctr.remove_pod(&id);
    // StopPodSandbox released it.
    c.sql_settles(
        "SELECT count(*) FROM allocations WHERE state = 'bound' AND node_name = 'node1'",
        &["0"],
    );
    assert!(!Path::new("/var/run/netns").join(&sandbox_ns).exists());
}

/// Whatever `bash -c SCRIPT` prints within five seconds inside the
/// namespace `ns` (a name under /var/run/netns or a path; bash for its
/// /dev/tcp).
fn sh_in(ns: &str, script: &str) -> String {
    let path = if ns.starts_with('/') {
        ns.to_owned()
    } else {
        format!("/var/run/netns/{ns}")
    };
    let out = Command::new("timeout")
        .args([
            "5",
            "nsenter",
            &format!("--net={path}"),
            "bash",
            "-c",
            script,
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One line from a TCP connection to `addr:port` made inside `ns`, or "".
fn read_line_from(ns: &str, addr: &str, port: u16) -> String {
    sh_in(
        ns,
        &format!("exec 3<>/dev/tcp/{addr}/{port} && head -n1 <&3"),
    )
    .trim()
    .to_owned()
}

/// The kubelet's hostPort and bandwidth annotations through containerd's
/// CRI: containerd runs the agent-written conflist (weft, then the
/// reference portmap and bandwidth plugins) with the runtimeConfig it
/// builds from the sandbox config, as on a real node.
#[test]
fn a_host_port_reaches_the_pod_and_a_bandwidth_limit_lands_on_its_veth_through_cri() {
    let mut tools = CONTAINERD_TOOLS.to_vec();
    tools.extend(["iptables-save", "tc", "python3", "bash"]);
    if !can_run(&tools) {
        return;
    }
    for plugin in ["portmap", "bandwidth"] {
        let path = Path::new("/usr/lib/cni").join(plugin);
        assert!(
            path.exists(),
            "{} missing: scripts/test installs containernetworking-plugins",
            path.display()
        );
    }
    let mut c = Cluster::new(2);
    c.start_agent(0);
    c.start_agent(1);

    // The list chains both, and names only versions all three speak
    // (Debian's plugins stop at 1.0.0; weft speaks 1.1.0 too).
    let conf: Value = serde_json::from_str(
        &std::fs::read_to_string(c.cni_dir(0).join("10-weft.conflist")).unwrap(),
    )
    .unwrap();
    let types: Vec<&str> = conf["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["type"].as_str())
        .collect();
    assert_eq!(types, ["weft", "portmap", "bandwidth"], "{conf:#}");
    assert!(
        !conf["cniVersions"]
            .as_array()
            .unwrap()
            .contains(&json!("1.1.0")),
        "{conf:#}"
    );

    let peer_ns = c.pod_netns("peer");
    c.cni(
        1,
        "ADD",
        "ctr-peer",
        &peer_ns,
        "peer",
        &c.net_conf(1, "1.0.0"),
    );

    let mut ctr = Containerd::start(&c, 0);
    let id = ctr
        .run_pod_with(
            "web",
            json!({
                "port_mappings": [{"protocol": "TCP", "container_port": 8080, "host_port": 30080}],
                "annotations": {
                    "kubernetes.io/ingress-bandwidth": "10M",
                    "kubernetes.io/egress-bandwidth": "20M",
                },
            }),
        )
        .unwrap_or_else(|e| panic!("RunPodSandbox: {e}"));
    let (ip, sandbox_ns) = ctr.sandbox_network(&id);

    // Something in the pod answers on its container port.
    let _server = answer_on(&sandbox_ns, 8080, "web");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while read_line_from(&peer_ns, &ip, 8080) != "web" {
        assert!(
            std::time::Instant::now() < deadline,
            "the pod's server does not answer from the peer pod; in the pod: {}; from the peer: {}",
            sh_in(&sandbox_ns, "ip -o addr; ss -ltnp"),
            sh_in(
                &peer_ns,
                &format!("ping -c1 -W1 {ip}; exec 3<>/dev/tcp/{ip}/8080; echo $?")
            ),
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    // The node's host port, from a pod on the other node (its packets
    // leave that node masqueraded to its underlay address) ...
    let node_ip = "198.51.100.1";
    assert_eq!(
        read_line_from(&peer_ns, node_ip, 30080),
        "web",
        "hostPort from another node"
    );
    // ... and from the pod itself: DNAT back to where it came from, which
    // needs hairpin on its veth and portmap's SNAT.
    assert_eq!(
        read_line_from(&sandbox_ns, node_ip, 30080),
        "web",
        "hostPort hairpin"
    );

    // The limits are on the pod's host veth: ingress as a tbf on it,
    // egress on the ifb the plugin made for it.
    let node = &c.nodes[0];
    let qdiscs = sh_in(node, "tc qdisc show");
    let veth_tbf = qdiscs
        .lines()
        .find(|l| l.contains("tbf") && l.contains("dev weft") && !l.contains("weft0"))
        .unwrap_or_else(|| panic!("no tbf on a pod veth:\n{qdiscs}"));
    assert!(veth_tbf.contains("rate 10Mbit"), "{veth_tbf}");
    let ifb = sh_in(node, "ip -o link show type ifb");
    assert!(!ifb.trim().is_empty(), "no ifb device for the egress limit");
    assert!(
        qdiscs
            .lines()
            .any(|l| l.contains("tbf") && l.contains("rate 20Mbit")),
        "no egress tbf:\n{qdiscs}"
    );
    let rules = sh_in(node, "iptables-save -t nat");
    assert!(rules.contains("--dport 30080"), "{rules}");

    // StopPodSandbox: DEL runs the list backwards; the rules and the
    // limits go with the pod.
    ctr.remove_pod(&id);
    let rules = sh_in(node, "iptables-save -t nat");
    assert!(
        !rules.contains("30080"),
        "portmap rules left after StopPodSandbox:\n{rules}"
    );
    assert!(
        read_line_from(&peer_ns, node_ip, 30080).is_empty(),
        "the host port still answers"
    );
    wait_until("the pod's limits gone", Duration::from_secs(5), || {
        !sh_in(node, "tc qdisc show").contains("tbf")
            && sh_in(node, "ip -o link show type ifb").trim().is_empty()
    });
    c.sql_settles(
        "SELECT count(*) FROM allocations WHERE state = 'bound' AND node_name = 'node1'",
        &["0"],
    );
}
