//! Processes and namespaces that clean themselves up, command helpers,
//! and CNI plugin invocation as a container runtime does it. Everything
//! returns errors (the benchmarks report them); [`crate::cluster`] wraps
//! them for tests, which fail loudly instead.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use std::io::Write as _;

use anyhow::{Context as _, bail};

pub fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

pub fn sh(args: &[&str]) -> anyhow::Result<Output> {
    run(Command::new(args[0]).args(&args[1..]))
}

pub fn in_ns(ns: &str, args: &[&str]) -> anyhow::Result<Output> {
    run(Command::new("ip").args(["netns", "exec", ns]).args(args))
}

/// A network namespace removed on drop.
#[derive(Debug)]
pub struct Netns(pub String);

impl Netns {
    /// `name` plus this process's id, so a run never trips over what a
    /// killed earlier run left behind.
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let name = format!("{name}-{}", std::process::id());
        sh(&["ip", "netns", "add", &name])?;
        let ns = Self(name);
        in_ns(&ns.0, &["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> String {
        format!("/var/run/netns/{}", self.0)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.0])
            .stderr(Stdio::null())
            .status();
    }
}

/// A fabric bridge that node namespaces hang off, as an underlay switch.
#[derive(Debug)]
pub struct Fabric {
    pub ns: Netns,
    ports: u32,
}

impl Fabric {
    pub fn new(name: &str) -> anyhow::Result<Self> {
        let ns = Netns::new(name)?;
        in_ns(&ns.0, &["ip", "link", "add", "br0", "type", "bridge"])?;
        in_ns(&ns.0, &["ip", "link", "set", "br0", "up"])?;
        Ok(Self { ns, ports: 0 })
    }

    /// A namespace with eth0 on the fabric holding `addr`/24.
    pub fn attach(&mut self, name: &str, addr: &str) -> anyhow::Result<Netns> {
        let ns = Netns::new(name)?;
        self.ports += 1;
        let port = format!("p{}", self.ports);
        in_ns(
            &ns.0,
            &[
                "ip", "link", "add", "eth0", "type", "veth", "peer", "name", &port, "netns",
                &self.ns.0,
            ],
        )?;
        in_ns(
            &self.ns.0,
            &["ip", "link", "set", &port, "master", "br0", "up"],
        )?;
        in_ns(
            &ns.0,
            &["ip", "addr", "add", &format!("{addr}/24"), "dev", "eth0"],
        )?;
        in_ns(&ns.0, &["ip", "link", "set", "eth0", "up"])?;
        Ok(ns)
    }
}

/// A child process killed on drop.
#[derive(Debug)]
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(cmd: &mut Command, log: &Path) -> anyhow::Result<Self> {
        let file = std::fs::File::create(log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .with_context(|| format!("{cmd:?}"))?;
        Ok(Self {
            child,
            log: log.to_owned(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Resident set size and its peak, in MiB.
    pub fn rss_mib(&self) -> (f64, f64) {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| {
                    l.strip_prefix(name)?
                        .trim()
                        .strip_suffix("kB")?
                        .trim()
                        .parse::<f64>()
                        .ok()
                })
                .unwrap_or(0.0)
                / 1024.0
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let start = Instant::now();
    while !check() {
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The directory of the workspace's built binaries, from the running
/// test or bench executable (target/<profile>/deps/<name> or
/// target/<profile>/<name>).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.parent().map(Path::to_path_buf).unwrap_or(dir)
    } else {
        dir
    }
}

/// Whether this process may make namespaces.
pub fn is_root() -> bool {
    nix::unistd::Uid::effective().is_root()
}

/// The CNI variables of one plugin call.
#[derive(Debug, Clone)]
pub struct CniCall<'a> {
    pub command: &'a str,
    pub container_id: &'a str,
    pub netns: &'a str,
    pub ifname: &'a str,
    pub args: String,
    pub path: &'a Path,
}

/// What a plugin printed and returned.
#[derive(Debug, Clone)]
pub struct PluginOutput {
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: String,
}

/// Runs `cmd` as a container runtime runs a CNI plugin: a clean
/// environment holding only PATH and the CNI variables, `conf` on stdin.
pub fn invoke_plugin(
    mut cmd: Command,
    call: &CniCall<'_>,
    conf: &[u8],
) -> anyhow::Result<PluginOutput> {
    let mut child = cmd
        .env_clear()
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .env("CNI_COMMAND", call.command)
        .env("CNI_CONTAINERID", call.container_id)
        .env("CNI_NETNS", call.netns)
        .env("CNI_IFNAME", call.ifname)
        .env("CNI_ARGS", &call.args)
        .env("CNI_PATH", call.path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("{cmd:?}"))?;
    child
        .stdin
        .take()
        .context("plugin stdin")?
        .write_all(conf)?;
    let out = child.wait_with_output()?;
    Ok(PluginOutput {
        code: out.status.code().unwrap_or(-1),
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// Execs `plugin` inside `node_ns` (the node's network namespace).
pub fn exec_plugin_in(
    node_ns: &str,
    plugin: &Path,
    call: &CniCall<'_>,
    conf: &[u8],
) -> anyhow::Result<PluginOutput> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", node_ns]).arg(plugin);
    invoke_plugin(cmd, call, conf)
}
