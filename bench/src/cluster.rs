//! A Weft cluster for benchmarks: fabric, weft-server in a control
//! namespace on a database of its own, and node namespaces with agents.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::Context as _;

use crate::harness::{Fabric, Netns, Proc, wait_until};

pub const SERVER_IP: &str = "198.51.100.254";

#[derive(Debug)]
pub struct Env {
    pub bin: PathBuf,
    pub shim: PathBuf,
    pub admin_url: String,
    pub dir: PathBuf,
}

impl Env {
    /// A fresh database on the benchmark's PostgreSQL.
    pub fn database(&self, name: &str) -> anyhow::Result<String> {
        crate::harness::run(Command::new("psql").args([
            &self.admin_url,
            "-q",
            "-c",
            &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"),
            "-c",
            &format!("CREATE DATABASE {name}"),
        ]))?;
        let (head, query) = self
            .admin_url
            .split_once('?')
            .unwrap_or((&self.admin_url, ""));
        let (server, _) = head
            .rsplit_once('/')
            .context("DATABASE_URL has no database")?;
        Ok(if query.is_empty() {
            format!("{server}/{name}")
        } else {
            format!("{server}/{name}?{query}")
        })
    }
}

/// Fields drop in order: processes first, then their namespaces.
pub struct Cluster {
    pub agents: Vec<Proc>,
    server: Option<Proc>,
    pub id: String,
    pub database_url: String,
    pub dir: PathBuf,
    pub nodes: Vec<Netns>,
    _control: Netns,
    _fabric: Fabric,
}

impl Cluster {
    pub fn start(env: &Env, id: &str, nodes: usize, node_prefix: u8) -> anyhow::Result<Self> {
        let dir = env.dir.join(id);
        std::fs::create_dir_all(&dir)?;
        let mut fabric = Fabric::new(&format!("{id}-fabric"))?;
        let control = fabric.attach(&format!("{id}-control"), SERVER_IP)?;
        let database_url = env.database(&id.replace('-', "_"))?;
        let server = Proc::spawn(
            Command::new("ip")
                .args(["netns", "exec", &control.0])
                .arg(env.bin.join("weft-server"))
                .args([
                    "--listen",
                    &format!("{SERVER_IP}:7400"),
                    "--metrics-listen",
                    &format!("{SERVER_IP}:7401"),
                ])
                .args([
                    "--cluster-cidr",
                    "10.244.0.0/16",
                    "--node-prefix-len",
                    &node_prefix.to_string(),
                ])
                // The figures measured here do not depend on TLS: the agent
                // keeps one connection to the server either way.
                .arg("--insecure-plaintext")
                .env("DATABASE_URL", &database_url),
            &dir.join("server.log"),
        )?;
        wait_until("weft-server", Duration::from_secs(30), || {
            Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &control.0,
                    "bash",
                    "-c",
                    &format!("exec 3<>/dev/tcp/{SERVER_IP}/7400"),
                ])
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })?;
        let mut c = Self {
            id: id.to_owned(),
            nodes: Vec::new(),
            agents: Vec::new(),
            server: Some(server),
            database_url,
            dir,
            _control: control,
            _fabric: fabric,
        };
        for n in 0..nodes {
            let ns = c
                ._fabric
                .attach(&format!("{id}-node{n}"), &format!("198.51.100.{}", n + 1))?;
            c.nodes.push(ns);
        }
        for n in 0..nodes {
            c.start_agent(env, n)?;
        }
        Ok(c)
    }

    /// Stops weft-server (an outage); agents keep their reserves.
    pub fn stop_server(&mut self) {
        drop(self.server.take());
    }

    pub fn socket(&self, node: usize) -> PathBuf {
        self.dir.join(format!("node{node}.sock"))
    }

    /// Starts node `n`'s agent (again) and waits until it is ready.
    pub fn restart_agent(&mut self, env: &Env, n: usize) -> anyhow::Result<()> {
        self.start_agent(env, n)
    }

    fn start_agent(&mut self, env: &Env, n: usize) -> anyhow::Result<()> {
        let log = self.dir.join(format!("agent{n}-{}.log", self.agents.len()));
        let agent = Proc::spawn(
            Command::new("ip")
                .args(["netns", "exec", &self.nodes[n].0])
                .arg(env.bin.join("weft-agent"))
                .args([
                    "--server",
                    &format!("http://{SERVER_IP}:7400"),
                    "--node-name",
                    &format!("node{n}"),
                ])
                .arg("--socket")
                .arg(self.socket(n))
                .arg("--cni-conf-dir")
                .arg(self.dir.join(format!("net.d-{n}")))
                .arg("--state-dir")
                .arg(self.dir.join(format!("state-{n}")))
                .args([
                    "--metrics-listen",
                    &format!("198.51.100.{}:7402", n + 1),
                    "--log",
                    // WEFT_BENCH_AGENT_LOG=debug shows where an ADD's time goes.
                    &std::env::var("WEFT_BENCH_AGENT_LOG")
                        .unwrap_or_else(|_| "warn,weft_agent=info".to_owned()),
                ]),
            &log,
        )?;
        wait_until("agent ready", Duration::from_secs(30), || {
            agent.log_text().contains("node ready")
        })?;
        self.agents.push(agent);
        Ok(())
    }

    pub fn conf(&self, node: usize) -> String {
        serde_json::json!({
            "cniVersion": "1.0.0", "name": "weft", "type": "weft",
            "agentSocket": self.socket(node),
        })
        .to_string()
    }

    /// Wires one pod through the plugin; its netns and address.
    pub fn pod(&self, env: &Env, node: usize, name: &str) -> anyhow::Result<(Netns, String)> {
        let ns = Netns::new(&format!("{}-{name}", self.id))?;
        let netns = ns.path();
        let call = weft_testbed::process::CniCall {
            command: "ADD",
            container_id: name,
            netns: &netns,
            ifname: "eth0",
            args: format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={name}"),
            path: Path::new("/opt/cni/bin"),
        };
        let out = weft_testbed::process::exec_plugin_in(
            &self.nodes[node].0,
            &env.shim,
            &call,
            self.conf(node).as_bytes(),
        )?;
        anyhow::ensure!(
            out.code == 0,
            "ADD {name}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            out.stderr
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let ip = v["ips"][0]["address"]
            .as_str()
            .context("no address")?
            .split('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        Ok((ns, ip))
    }

    /// Runs each statement as its own `-c` (its own transaction), in order.
    pub fn sql_steps(&self, steps: &[&str]) -> anyhow::Result<String> {
        let mut cmd = Command::new("psql");
        cmd.args([&self.database_url, "-At"]);
        for step in steps {
            cmd.args(["-c", step]);
        }
        let out = crate::harness::run(&mut cmd)?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    pub fn sql(&self, query: &str) -> anyhow::Result<String> {
        let out = crate::harness::run(Command::new("psql").args([
            &self.database_url,
            "-At",
            "-c",
            query,
        ]))?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}
