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
        let bin = c.dir.join("cni-bin");
        std::fs::create_dir_all(&bin).unwrap();
        let exe = std::env::current_exe().unwrap();
        let weft = exe.parent().and_then(Path::parent).unwrap().join("weft");
        std::os::unix::fs::symlink(weft, bin.join("weft")).unwrap();
        std::os::unix::fs::symlink("/usr/lib/cni/loopback", bin.join("loopback")).unwrap();
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
        let body = json!({"config": {
            "metadata": {"name": name, "uid": format!("uid-{name}"), "namespace": "default", "attempt": 0},
            "hostname": name,
            "log_directory": self.dir.join("logs"),
        }});
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

fn have(binary: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {binary}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn containerd_starts_a_pod_sandbox_through_cri_with_a_weft_address() {
    if !require_root() {
        return;
    }
    let tools = ["containerd", "runc", "ctr", "grpcurl", "nsenter"];
    if let Some(missing) = tools.iter().find(|t| !have(t)) {
        assert!(
            std::env::var("CI").is_err(),
            "{missing} missing in CI: scripts/test installs it"
        );
        eprintln!("skipping: {missing} not installed");
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
    let status = ctr
        .cri("PodSandboxStatus", &json!({"pod_sandbox_id": id}))
        .unwrap();
    let ip = status["status"]["network"]["ip"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(ip.starts_with("10.244.0."), "sandbox got {ip}");

    // The sandbox's namespace is the one containerd made under /var/run/netns.
    let sandbox_ns = std::fs::read_dir("/var/run/netns")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("cni-"))
        .find(|n| {
            Command::new("ip")
                .args([
                    "netns", "exec", n, "ip", "-4", "-o", "addr", "show", "dev", "eth0",
                ])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&format!("{ip}/")))
        })
        .expect("the sandbox's netns");
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
