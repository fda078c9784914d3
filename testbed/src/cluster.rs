//! A throwaway Weft cluster made of network namespaces, for privileged
//! tests: a fabric bridge, a control namespace running the real
//! weft-server on 198.51.100.254, and node namespaces running the real
//! weft-agent. Everything it made (namespaces, processes, database) is
//! removed on drop, which also runs when a test panics. Helpers here fail
//! the test on error, on top of [`crate::process`]. (One type whose
//! methods are the verbs the tests speak in, hence one long file.)

#![allow(clippy::unwrap_used, clippy::expect_used)] // a test harness fails loudly by design

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use serde_json::Value;

use crate::process::{self, CniCall};

pub const SERVER_IP: &str = "198.51.100.254";
pub const REPLICA_IP: &str = "198.51.100.253";

/// Root is needed for namespaces. Outside CI a test may skip; in CI the
/// datapath must never go untested.
pub fn require_root() -> bool {
    if process::is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").is_err(),
        "privileged test needs root in CI"
    );
    eprintln!("skipping: needs root (network namespaces)");
    false
}

/// Runs `cmd`, failing the test with its output if it fails.
pub fn run(cmd: &mut Command) -> Output {
    process::run(cmd).unwrap_or_else(|e| panic!("{e:#}"))
}

fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

pub fn in_ns(ns: &str, args: &[&str]) -> Output {
    process::in_ns(ns, args).unwrap_or_else(|e| panic!("{e:#}"))
}

/// Runs `args` in `ns` with `input` on its stdin; panics unless it succeeds.
pub fn in_ns_with_stdin(ns: &str, args: &[&str], input: &str) -> Output {
    use std::io::Write as _;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(input.as_bytes())
            .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    }
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("{args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} in {ns}: {}\ninput:\n{input}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn in_ns_json(ns: &str, args: &[&str]) -> Value {
    let out = in_ns(ns, args);
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Value::Array(vec![]);
    }
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: {e}: {text}"))
}

fn bin_dir() -> PathBuf {
    process::bin_dir()
}

pub fn wait_until(what: &str, timeout: Duration, check: impl FnMut() -> bool) {
    process::wait_until(what, timeout, check).unwrap_or_else(|e| panic!("{e:#}"));
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A helper process that dies with the test, also when it panics.
#[derive(Debug)]
pub struct KillOnDrop(pub Option<Child>);

impl KillOnDrop {
    pub fn wait_output(mut self) -> Output {
        self.0.take().unwrap().wait_with_output().unwrap()
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A TCP server in the namespace `netns` (a name under /var/run/netns)
/// that writes `reply` and a newline to every connection on `port`, until
/// dropped.
pub fn answer_on(netns: &str, port: u16, reply: &str) -> KillOnDrop {
    let script = format!(
        "import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('0.0.0.0', {port}))
s.listen(16)
while True:
    c, _ = s.accept()
    c.sendall(b'{reply}\\n')
    c.close()
"
    );
    KillOnDrop(Some(
        Command::new("ip")
            .args(["netns", "exec", netns, "python3", "-c", &script])
            .stdin(Stdio::null())
            .spawn()
            .unwrap(),
    ))
}

#[derive(Debug)]
pub struct Agent {
    pub child: Child,
    pub log: PathBuf,
}

#[derive(Debug)]
pub struct Cluster {
    pub id: String,
    pub fabric: String,
    pub control: String,
    pub nodes: Vec<String>,
    pub dir: PathBuf,
    server: Option<Child>,
    /// A second server replica on 198.51.100.253, when started.
    replica: Option<Child>,
    pub agents: Vec<Option<Agent>>,
    database: String,
    admin_url: String,
    namespaces: Vec<String>,
    pods: Vec<String>,
    starts: u32,
}

/// The first IP of a CNI result, without its prefix length.
pub fn address_of(result: &Value) -> String {
    result["ips"][0]["address"]
        .as_str()
        .and_then(|a| a.split('/').next())
        .unwrap_or_else(|| panic!("no address in {result}"))
        .to_owned()
}

/// What the `weft` plugin printed and returned.
#[derive(Debug)]
pub struct CniOutput {
    pub code: i32,
    pub stdout: Value,
    pub stderr: String,
}

impl Cluster {
    /// Fabric + control namespaces and `nodes` node namespaces; the server
    /// is started, the agents are not.
    pub fn new(nodes: usize) -> Self {
        let admin_url = std::env::var("DATABASE_URL").expect("DATABASE_URL (scripts/test sets it)");
        Self::on_database(nodes, admin_url)
    }

    /// As [`Cluster::new`], on the PostgreSQL cluster at `admin_url` (a
    /// test that stops PostgreSQL brings its own, [`PrivatePostgres`]).
    pub fn on_database(nodes: usize, admin_url: String) -> Self {
        let id = format!(
            "wt{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let dir = std::env::temp_dir().join(&id);
        fs::create_dir_all(&dir).unwrap();
        let mut c = Cluster {
            fabric: format!("{id}-fabric"),
            control: format!("{id}-control"),
            nodes: (1..=nodes).map(|n| format!("{id}-node{n}")).collect(),
            dir,
            server: None,
            replica: None,
            agents: (0..nodes).map(|_| None).collect(),
            database: id.clone(),
            admin_url,
            namespaces: Vec::new(),
            pods: Vec::new(),
            starts: 0,
            id,
        };
        c.add_ns(&c.fabric.clone());
        in_ns(&c.fabric, &["ip", "link", "add", "br0", "type", "bridge"]);
        in_ns(&c.fabric, &["ip", "link", "set", "br0", "up"]);
        let control = c.control.clone();
        c.attach(&control, "ctl", SERVER_IP);
        for (i, node) in c.nodes.clone().iter().enumerate() {
            c.attach(
                node,
                &format!("n{}", i + 1),
                &format!("198.51.100.{}", i + 1),
            );
        }
        c.make_cni_bin();
        c.create_database();
        c.issue_certs(nodes);
        c.start_server();
        c
    }

    /// The CNI plugin directory of every node (`--cni-bin-dir`, and a
    /// runtime's `bin_dir`): weft, and the reference plugins it chains and
    /// that runtimes run themselves, where the machine has them.
    pub fn cni_bin(&self) -> PathBuf {
        self.dir.join("cni-bin")
    }

    fn make_cni_bin(&self) {
        let bin = self.cni_bin();
        fs::create_dir_all(&bin).unwrap();
        std::os::unix::fs::symlink(bin_dir().join("weft"), bin.join("weft")).unwrap();
        for plugin in ["portmap", "bandwidth", "loopback"] {
            let reference = Path::new("/usr/lib/cni").join(plugin);
            if reference.exists() {
                std::os::unix::fs::symlink(reference, bin.join(plugin)).unwrap();
            }
        }
    }

    pub fn pki(&self) -> PathBuf {
        self.dir.join("pki")
    }

    /// A CA, server certificate (both replica addresses), node certificates
    /// for the agents and for agent-less "ghost" nodes, and an admin.
    fn issue_certs(&self, nodes: usize) {
        let mut names: Vec<String> = (1..=nodes).map(|n| format!("node{n}")).collect();
        names.push("ghost".into());
        names.extend((0..=20).map(|i| format!("ghost{i}")));
        run(Command::new(bin_dir().join("weft-server"))
            .arg("certs")
            .arg("--out")
            .arg(self.pki())
            .args(["--server-san", &format!("{SERVER_IP},{REPLICA_IP}")])
            .args(["--nodes", &names.join(","), "--admins", "admin"]));
    }

    fn tls_server_args(&self) -> Vec<String> {
        let pki = self.pki();
        vec![
            "--tls-cert".into(),
            pki.join("server.pem").display().to_string(),
            "--tls-key".into(),
            pki.join("server-key.pem").display().to_string(),
            "--tls-client-ca".into(),
            pki.join("ca.pem").display().to_string(),
        ]
    }

    /// grpcurl flags authenticating as `who` ("admin" or a node name).
    pub fn grpcurl_auth(&self, who: &str) -> Vec<String> {
        let pki = self.pki();
        let base = if who == "admin" {
            "admin-admin".to_owned()
        } else {
            format!("node-{who}")
        };
        vec![
            "-cacert".into(),
            pki.join("ca.pem").display().to_string(),
            "-cert".into(),
            pki.join(format!("{base}.pem")).display().to_string(),
            "-key".into(),
            pki.join(format!("{base}-key.pem")).display().to_string(),
        ]
    }

    fn add_ns(&mut self, ns: &str) {
        ip(&["netns", "add", ns]);
        self.namespaces.push(ns.to_owned());
        in_ns(ns, &["ip", "link", "set", "lo", "up"]);
    }

    fn attach(&mut self, ns: &str, port: &str, addr: &str) {
        self.add_ns(ns);
        in_ns(
            ns,
            &[
                "ip",
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                port,
                "netns",
                &self.fabric,
            ],
        );
        in_ns(
            &self.fabric,
            &["ip", "link", "set", port, "master", "br0", "up"],
        );
        in_ns(
            ns,
            &["ip", "addr", "add", &format!("{addr}/24"), "dev", "eth0"],
        );
        in_ns(ns, &["ip", "link", "set", "eth0", "up"]);
    }

    fn psql(&self, sql: &str) {
        run(Command::new("psql").args([&self.admin_url, "-q", "-v", "ON_ERROR_STOP=1", "-c", sql]));
    }

    /// The two-role set-up (docs/security.md): the owner creates the
    /// database and migrates it; servers run as the serving role `weft`.
    fn create_database(&self) {
        self.psql(&format!("CREATE DATABASE {}", self.database));
        run(Command::new(bin_dir().join("weft-server"))
            .arg("migrate")
            .env("DATABASE_URL", self.database_url())
            .env("WEFT_LOG", "warn"));
    }

    /// The serving role's URL of the cluster's database.
    pub fn serving_url(&self) -> String {
        let url = self.database_url();
        let (scheme, rest) = url.split_once("://").unwrap();
        let host = rest.split_once('@').map_or(rest, |(_, h)| h);
        format!("{scheme}://weft@{host}")
    }

    pub fn database_url(&self) -> String {
        let (head, query) = self
            .admin_url
            .split_once('?')
            .unwrap_or((&self.admin_url, ""));
        let (server, _) = head.rsplit_once('/').unwrap();
        if query.is_empty() {
            format!("{server}/{}", self.database)
        } else {
            format!("{server}/{}?{query}", self.database)
        }
    }

    /// Runs weft-server in namespace `ns` on `ip` and waits until it listens.
    fn spawn_server(&self, ns: &str, ip: &str, log: &str) -> Child {
        let log = fs::File::create(self.dir.join(log)).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(bin_dir().join("weft-server"))
            .args([
                "--listen",
                &format!("{ip}:7400"),
                "--metrics-listen",
                &format!("{ip}:7401"),
            ])
            .args(self.tls_server_args())
            .env("DATABASE_URL", self.serving_url())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        wait_until(
            &format!("weft-server on {ip} to listen"),
            Duration::from_secs(20),
            || {
                Command::new("ip")
                    .args([
                        "netns",
                        "exec",
                        ns,
                        "bash",
                        "-c",
                        &format!("exec 3<>/dev/tcp/{ip}/7400"),
                    ])
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success())
            },
        );
        child
    }

    pub fn start_server(&mut self) {
        self.server = Some(self.spawn_server(&self.control, SERVER_IP, "server.log"));
    }

    /// Starts a second replica on the same database, in a namespace of its
    /// own on the fabric; agents started afterwards are given both.
    pub fn start_replica(&mut self) {
        let ns = format!("{}-control2", self.id);
        self.attach(&ns, "ctl2", REPLICA_IP);
        self.replica = Some(self.spawn_server(&ns, REPLICA_IP, "replica.log"));
    }

    /// SIGKILL, as a crashed node would do it.
    pub fn kill_replica(&mut self) {
        if let Some(mut child) = self.replica.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn server_urls(&self) -> String {
        let mut urls = format!("https://{SERVER_IP}:7400");
        if self.namespaces.iter().any(|n| n.ends_with("-control2")) {
            urls.push_str(&format!(",https://{REPLICA_IP}:7400"));
        }
        urls
    }

    pub fn stop_server(&mut self) {
        if let Some(mut child) = self.server.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn state_dir(&self, node: usize) -> PathBuf {
        self.dir.join(format!("node{node}-state"))
    }

    pub fn cni_dir(&self, node: usize) -> PathBuf {
        self.dir.join(format!("node{node}-net.d"))
    }

    /// Starts the agent of node `node` (0-based) without waiting.
    pub fn spawn_agent(&mut self, node: usize) {
        self.spawn_agent_with_env(node, &[]);
    }

    /// Starts the agent with extra environment (e.g. `WEFT_FAILPOINTS`).
    pub fn spawn_agent_with_env(&mut self, node: usize, env: &[(&str, &str)]) {
        assert!(self.agents[node].is_none(), "agent {node} already running");
        self.starts += 1;
        let log = self.dir.join(format!("agent{node}-{}.log", self.starts));
        let child = Command::new("ip")
            .args(["netns", "exec", &self.nodes[node]])
            .arg(bin_dir().join("weft-agent"))
            .args(["--server", &self.server_urls()])
            .arg("--tls-ca")
            .arg(self.pki().join("ca.pem"))
            .arg("--tls-cert")
            .arg(self.pki().join(format!("node-node{}.pem", node + 1)))
            .arg("--tls-key")
            .arg(self.pki().join(format!("node-node{}-key.pem", node + 1)))
            .args(["--node-name", &format!("node{}", node + 1)])
            .arg("--socket")
            .arg(self.dir.join(format!("node{node}.sock")))
            .arg("--cni-conf-dir")
            .arg(self.cni_dir(node))
            .arg("--cni-bin-dir")
            .arg(self.cni_bin())
            .arg("--state-dir")
            .arg(self.state_dir(node))
            .args(["--metrics-listen", &format!("198.51.100.{}:7402", node + 1)])
            .env("WEFT_LOG", "info,weft_agent=debug")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        self.agents[node] = Some(Agent { child, log });
    }

    pub fn agent_log(&self, node: usize) -> String {
        self.agents[node]
            .as_ref()
            .map(|a| fs::read_to_string(&a.log).unwrap_or_default())
            .unwrap_or_default()
    }

    /// Starts the agent and waits until it says the node is ready.
    pub fn start_agent(&mut self, node: usize) {
        self.spawn_agent(node);
        wait_until(
            &format!("agent {node} ready"),
            Duration::from_secs(20),
            || self.agent_log(node).contains("node ready"),
        );
    }

    /// SIGTERM, as the kubelet sends it, and wait for a clean exit.
    pub fn stop_agent(&mut self, node: usize) {
        let mut agent = self.agents[node].take().expect("agent not running");
        // The child is `ip netns exec`, which execs the agent: same PID.
        run(Command::new("kill").args(["-TERM", &agent.child.id().to_string()]));
        let status = agent.child.wait().unwrap();
        assert!(
            status.success(),
            "agent exited with {status:?} after SIGTERM"
        );
    }

    pub fn grpc(&self, method: &str, body: &str) -> Value {
        let out = in_ns(
            &self.control,
            &[
                &["grpcurl".to_owned()][..],
                &self.grpcurl_auth("admin"),
                &[
                    "-d".to_owned(),
                    body.to_owned(),
                    format!("{SERVER_IP}:7400"),
                    method.to_owned(),
                ],
            ]
            .concat()
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        );
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    }

    /// The node's gateway (from the bridge) and its VTEP MAC.
    pub fn gateway(&self, node: usize) -> String {
        let addrs = in_ns_json(
            &self.nodes[node],
            &["ip", "-j", "-4", "addr", "show", "dev", "weft0"],
        );
        addrs[0]["addr_info"][0]["local"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    pub fn vtep_mac(&self, node: usize) -> String {
        let link = in_ns_json(
            &self.nodes[node],
            &["ip", "-j", "link", "show", "dev", "weft.vxlan"],
        );
        link[0]["address"].as_str().unwrap().to_owned()
    }

    pub fn routes_on_tunnel(&self, node: usize) -> Vec<Value> {
        in_ns_json(
            &self.nodes[node],
            &["ip", "-j", "-4", "route", "show", "dev", "weft.vxlan"],
        )
        .as_array()
        .cloned()
        .unwrap_or_default()
    }

    pub fn neighbours_on_tunnel(&self, node: usize) -> Vec<Value> {
        in_ns_json(
            &self.nodes[node],
            &["ip", "-j", "-4", "neigh", "show", "dev", "weft.vxlan"],
        )
        .as_array()
        .cloned()
        .unwrap_or_default()
    }

    pub fn fdb_on_tunnel(&self, node: usize) -> Vec<Value> {
        in_ns_json(
            &self.nodes[node],
            &["bridge", "-j", "fdb", "show", "dev", "weft.vxlan"],
        )
        .as_array()
        .cloned()
        .unwrap_or_default()
    }

    /// Everything Weft may touch in a node, with kernel timers removed.
    pub fn kernel_state(&self, node: usize) -> String {
        let ns = &self.nodes[node];
        let mut parts = Vec::new();
        for args in [
            &["ip", "-j", "-d", "link", "show"][..],
            &["ip", "-j", "addr", "show"],
            &["ip", "-j", "route", "show", "table", "all"],
            // Dynamic ARP entries come and go with traffic; Weft's are permanent.
            &["ip", "-j", "neigh", "show", "nud", "permanent"],
            &["bridge", "-j", "fdb", "show"],
            &["nft", "-j", "list", "ruleset"],
            &["cat", "/proc/sys/net/ipv4/ip_forward"],
        ] {
            let mut v: Value =
                serde_json::from_slice(&in_ns(ns, args).stdout).unwrap_or(Value::Null);
            strip_timers(&mut v);
            parts.push(v.to_string());
        }
        parts.join("\n")
    }

    /// One ping from inside pod `pod`'s namespace.
    pub fn pod_ping(&self, pod: &str, to: &str) -> bool {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.pod_ns_name(pod),
                "ping",
                "-c",
                "1",
                "-W",
                "2",
                to,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    pub fn ping(&self, node: usize, from: &str, to: &str) -> bool {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.nodes[node],
                "ping",
                "-c",
                "1",
                "-W",
                "2",
                "-I",
                from,
                to,
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }
}

/// Asserts two `kernel_state` snapshots are equal, showing only what differs.
pub fn assert_same_state(before: &str, after: &str, what: &str) {
    if before == after {
        return;
    }
    let mut diffs = Vec::new();
    for (b, a) in before.lines().zip(after.lines()) {
        let (vb, va): (Value, Value) = (
            serde_json::from_str(b).unwrap_or(Value::Null),
            serde_json::from_str(a).unwrap_or(Value::Null),
        );
        let items = |v: &Value| -> Vec<String> {
            match v {
                Value::Array(items) => items.iter().map(Value::to_string).collect(),
                Value::Object(m) => m
                    .get("nftables")
                    .and_then(Value::as_array)
                    .map(|i| i.iter().map(Value::to_string).collect())
                    .unwrap_or_else(|| vec![v.to_string()]),
                other => vec![other.to_string()],
            }
        };
        let (ib, ia) = (items(&vb), items(&va));
        diffs.extend(
            ib.iter()
                .filter(|x| !ia.contains(x))
                .map(|x| format!("- {x}")),
        );
        diffs.extend(
            ia.iter()
                .filter(|x| !ib.contains(x))
                .map(|x| format!("+ {x}")),
        );
    }
    panic!("{what}:\n{}", diffs.join("\n"));
}

/// Kernel timers tick on their own, and carrier (operstate, NO-CARRIER,
/// LOWER_UP, linkdown) follows whether a port-less bridge has settled; none
/// of it is configuration. The admin state (UP) is kept.
fn strip_timers(v: &mut Value) {
    match v {
        Value::Object(map) => {
            map.retain(|k, _| !k.ends_with("_timer") && k != "tentative" && k != "operstate");
            if let Some(Value::Array(flags)) = map.get_mut("flags") {
                flags.retain(|f| {
                    !matches!(f.as_str(), Some("NO-CARRIER" | "LOWER_UP" | "linkdown"))
                });
            }
            map.values_mut().for_each(strip_timers);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_timers),
        _ => {}
    }
}

impl Cluster {
    /// A pod network namespace under /var/run/netns, as containerd's CRI
    /// makes them.
    pub fn pod_netns(&mut self, name: &str) -> String {
        let ns = format!("{}-{name}", self.id);
        ip(&["netns", "add", &ns]);
        self.pods.push(ns.clone());
        format!("/var/run/netns/{ns}")
    }

    pub fn delete_pod_netns(&mut self, name: &str) {
        let ns = format!("{}-{name}", self.id);
        ip(&["netns", "del", &ns]);
        self.pods.retain(|p| *p != ns);
    }

    pub fn pod_ns_name(&self, name: &str) -> String {
        format!("{}-{name}", self.id)
    }

    /// The plugin config as a runtime would pass it to `weft`.
    pub fn net_conf(&self, node: usize, version: &str) -> Value {
        serde_json::json!({
            "cniVersion": version,
            "name": "weft",
            "type": "weft",
            "agentSocket": self.dir.join(format!("node{node}.sock")),
        })
    }

    /// Execs the real `weft` binary in node `node`'s namespace with the
    /// environment containerd sets for a Kubernetes pod.
    pub fn cni(
        &self,
        node: usize,
        command: &str,
        container_id: &str,
        netns: &str,
        pod: &str,
        conf: &Value,
    ) -> CniOutput {
        let call = CniCall {
            command,
            container_id,
            netns,
            ifname: "eth0",
            args: format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={pod};K8S_POD_INFRA_CONTAINER_ID={container_id};K8S_POD_UID=uid-{pod}"
            ),
            path: Path::new("/opt/cni/bin"),
        };
        let out = process::exec_plugin_in(
            &self.nodes[node],
            &bin_dir().join("weft"),
            &call,
            conf.to_string().as_bytes(),
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
        let text = String::from_utf8_lossy(&out.stdout);
        CniOutput {
            code: out.code,
            stdout: if text.trim().is_empty() {
                Value::Null
            } else {
                serde_json::from_str(&text)
                    .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {text}"))
            },
            stderr: out.stderr,
        }
    }

    /// Wires pod `name` (container id `ctr-<name>`) on `node` through the
    /// plugin, as a runtime would, in a fresh netns with loopback up; its
    /// address (without prefix) and the whole result.
    pub fn add_pod(&mut self, node: usize, name: &str) -> (String, Value) {
        let ns = self.pod_netns(name);
        in_ns(&self.pod_ns_name(name), &["ip", "link", "set", "lo", "up"]);
        let out = self.cni(
            node,
            "ADD",
            &format!("ctr-{name}"),
            &ns,
            name,
            &self.net_conf(node, "1.0.0"),
        );
        assert_eq!(out.code, 0, "ADD {name}: {out:?}");
        (address_of(&out.stdout), out.stdout)
    }

    /// Registers a node that runs no agent, with its own certificate, from
    /// the control namespace.
    pub fn register_agentless(&self, name: &str, underlay_ip: &str, vtep_mac: &str) {
        let body = format!(
            r#"{{"node_name":"{name}","underlay_ip":"{underlay_ip}","vtep_mac":"{vtep_mac}"}}"#
        );
        let mut args = vec!["grpcurl".to_owned()];
        args.extend(self.grpcurl_auth(name));
        args.extend([
            "-d".to_owned(),
            body,
            format!("{SERVER_IP}:7400"),
            "weft.v1.Topology/RegisterNode".to_owned(),
        ]);
        in_ns(
            &self.control,
            &args.iter().map(String::as_str).collect::<Vec<_>>(),
        );
    }

    /// SQL against the cluster's database, one value per row.
    pub fn sql(&self, query: &str) -> Vec<String> {
        let out = run(Command::new("psql").args([&self.database_url(), "-At", "-c", query]));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// Waits until `query` answers `want` (agents report binds and
    /// releases in the background, within 100 ms online); panics with the
    /// last answer after 10 s.
    pub fn sql_settles(&self, query: &str, want: &[&str]) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let got = self.sql(query);
            if got.iter().map(String::as_str).eq(want.iter().copied()) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{query}: got {got:?}, want {want:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for agent in self.agents.iter_mut().filter_map(Option::take) {
            let mut child = agent.child;
            let _ = child.kill();
            let _ = child.wait();
        }
        self.stop_server();
        self.kill_replica();
        for ns in self.pods.iter().chain(self.namespaces.iter().rev()) {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = Command::new("psql")
            .args([
                &self.admin_url,
                "-q",
                "-c",
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.database),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if std::thread::panicking() {
            eprintln!("test failed; logs of {} follow", self.id);
            for entry in fs::read_dir(&self.dir).into_iter().flatten().flatten() {
                eprintln!(
                    "--- {}\n{}",
                    entry.path().display(),
                    fs::read_to_string(entry.path()).unwrap_or_default()
                );
            }
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A PostgreSQL cluster of one test's own (scripts/pg.sh), so the test can
/// stop and start it without touching the others'. Removed on drop.
#[derive(Debug)]
pub struct PrivatePostgres {
    dir: PathBuf,
    pub url: String,
}

fn pg_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/pg.sh")
}

impl PrivatePostgres {
    pub fn start(port: u16) -> Self {
        let dir = std::env::temp_dir().join(format!("weft-pg-{}-{port}", std::process::id()));
        let out = run(Command::new(pg_script())
            .args(["start"])
            .arg(&dir)
            .arg(port.to_string()));
        let url = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        Self { dir, url }
    }

    /// Stops it, keeping its data (an outage).
    pub fn halt(&self) {
        run(Command::new(pg_script()).arg("halt").arg(&self.dir));
    }

    pub fn resume(&self) {
        run(Command::new(pg_script()).arg("resume").arg(&self.dir));
    }
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let _ = Command::new(pg_script())
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

/// A PostgreSQL primary and streaming standby of one test's own
/// (scripts/pg-ha.sh). Removed on drop.
#[derive(Debug)]
pub struct PostgresPair {
    dir: PathBuf,
    pub primary_port: u16,
    pub standby_port: u16,
}

fn pg_ha_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/pg-ha.sh")
}

impl PostgresPair {
    /// `mode`: "sync" (commits wait for the standby) or "async".
    pub fn start(primary_port: u16, standby_port: u16, mode: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("weft-pgha-{}-{primary_port}", std::process::id()));
        let _ = Command::new(pg_ha_script()).arg("stop").arg(&dir).status();
        run(Command::new(pg_ha_script())
            .arg("start")
            .arg(&dir)
            .args([primary_port.to_string(), standby_port.to_string()])
            .arg(mode));
        Self {
            dir,
            primary_port,
            standby_port,
        }
    }

    pub fn primary_socket(&self) -> PathBuf {
        self.dir
            .join("primary/sock")
            .join(format!(".s.PGSQL.{}", self.primary_port))
    }

    pub fn standby_socket(&self) -> PathBuf {
        self.dir
            .join("standby/sock")
            .join(format!(".s.PGSQL.{}", self.standby_port))
    }

    fn ctl(&self, what: &str) {
        run(Command::new(pg_ha_script()).arg(what).arg(&self.dir));
    }

    /// An immediate stop: the primary crashes.
    pub fn kill_primary(&self) {
        self.ctl("kill-primary");
    }

    pub fn stop_standby(&self) {
        self.ctl("stop-standby");
    }

    pub fn start_standby(&self) {
        self.ctl("start-standby");
    }

    pub fn promote(&self) {
        self.ctl("promote");
    }
}

impl Drop for PostgresPair {
    fn drop(&mut self) {
        let _ = Command::new(pg_ha_script())
            .arg("stop")
            .arg(&self.dir)
            .status();
    }
}

/// One stable database address in front of whichever PostgreSQL is the
/// primary, as a Kubernetes Service or a VIP gives: a unix-socket TCP-style
/// forwarder. [`Forwarder::switch`] points it elsewhere and cuts every
/// open connection, as a moved VIP does.
#[derive(Debug)]
pub struct Forwarder {
    path: PathBuf,
    target: std::sync::Arc<std::sync::Mutex<PathBuf>>,
    open: std::sync::Arc<std::sync::Mutex<Vec<std::os::unix::net::UnixStream>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Forwarder {
    /// Listens on `dir/.s.PGSQL.port` (so `?host=dir` with `port` reaches
    /// it) and forwards to `target`.
    pub fn start(dir: &Path, port: u16, target: &Path) -> Self {
        use std::{
            os::unix::net::{UnixListener, UnixStream},
            sync::{Arc, Mutex, atomic::AtomicBool},
        };
        fs::create_dir_all(dir).unwrap();
        let path = dir.join(format!(".s.PGSQL.{port}"));
        let _ = fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let target = Arc::new(Mutex::new(target.to_owned()));
        let open: Arc<Mutex<Vec<UnixStream>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (t, o, s) = (target.clone(), open.clone(), stop.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if s.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let to = t.lock().unwrap().clone();
                let Ok(upstream) = UnixStream::connect(&to) else {
                    continue;
                };
                let pipe = |mut from: UnixStream, mut to: UnixStream| {
                    std::thread::spawn(move || {
                        let _ = std::io::copy(&mut from, &mut to);
                        let _ = to.shutdown(std::net::Shutdown::Both);
                        let _ = from.shutdown(std::net::Shutdown::Both);
                    });
                };
                {
                    let mut open = o.lock().unwrap();
                    open.retain(|c| c.peer_addr().is_ok());
                    open.push(client.try_clone().unwrap());
                    open.push(upstream.try_clone().unwrap());
                }
                pipe(client.try_clone().unwrap(), upstream.try_clone().unwrap());
                pipe(upstream, client);
            }
        });
        Self {
            path,
            target,
            open,
            stop,
        }
    }

    /// New connections go to `target`; open ones are cut.
    pub fn switch(&self, target: &Path) {
        *self.target.lock().unwrap() = target.to_owned();
        for c in self.open.lock().unwrap().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = std::os::unix::net::UnixStream::connect(&self.path);
        self.switch(Path::new("/nonexistent"));
        let _ = fs::remove_file(&self.path);
    }
}

/// The pods a test wired, with the checks every churn test makes: no
/// address on two live pods, DEL succeeding.
#[derive(Debug, Default)]
pub struct LivePods {
    /// container id → (node, pod name, address)
    pub live: std::collections::BTreeMap<String, (usize, String, String)>,
}

impl LivePods {
    pub fn add(&mut self, c: &mut Cluster, node: usize, name: &str) {
        let (ip, _) = c.add_pod(node, name);
        let cid = format!("ctr-{name}");
        assert!(
            self.live.values().all(|(_, _, other)| *other != ip),
            "{ip} is wired twice ({cid})"
        );
        self.live.insert(cid, (node, name.to_owned(), ip));
    }

    pub fn del(&mut self, c: &mut Cluster, cid: &str) {
        let (node, name, _) = self.live.remove(cid).unwrap();
        let ns = format!("/var/run/netns/{}", c.pod_ns_name(&name));
        let out = c.cni(node, "DEL", cid, &ns, &name, &c.net_conf(node, "1.0.0"));
        assert_eq!(out.code, 0, "{out:?}");
        c.delete_pod_netns(&name);
    }

    /// (container id, "name address") of the pods on `node`.
    pub fn on(&self, node: usize) -> Vec<(String, String)> {
        self.live
            .iter()
            .filter(|(_, (n, _, _))| *n == node)
            .map(|(cid, (_, name, ip))| (cid.clone(), format!("{name} {ip}")))
            .collect()
    }

    /// "node{n} ctr-x address" lines, sorted: what PostgreSQL must hold.
    pub fn expected_rows(&self) -> Vec<String> {
        let mut want: Vec<String> = self
            .live
            .iter()
            .map(|(cid, (n, _, ip))| format!("node{} {cid} {ip}", n + 1))
            .collect();
        want.sort();
        want
    }

    /// Waits until PostgreSQL's bound rows are exactly the live pods.
    pub fn wait_recorded(&self, c: &Cluster, timeout: Duration) {
        let want = self.expected_rows();
        let query = "SELECT node_name || ' ' || container_id || ' ' || host(address)
                     FROM allocations WHERE state = 'bound' ORDER BY 1";
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let got = c.sql(query);
            if got == want {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "PostgreSQL holds {got:?}, the nodes wire {want:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Cluster {
    /// grpc.health.v1 status of the server at `ip` ("SERVING", ...).
    pub fn health(&self, ip: &str) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.control, "grpcurl"])
            .args(self.grpcurl_auth("admin"))
            .args([
                "-d",
                "{}",
                &format!("{ip}:7400"),
                "grpc.health.v1.Health/Check",
            ])
            .output()
            .unwrap();
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        v["status"].as_str().unwrap_or("UNREACHABLE").to_owned()
    }
}
