//! Building blocks for the benchmarks: network namespaces and processes
//! that clean themselves up, command helpers, latency statistics.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

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

/// p50/p90/p99/max of a sample, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Latency {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Latency {
    pub fn of(samples: &[f64]) -> Self {
        let mut s = samples.to_vec();
        s.sort_by(f64::total_cmp);
        let at = |q: f64| {
            if s.is_empty() {
                return f64::NAN;
            }
            let i = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1;
            s[i]
        };
        Self {
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: s.last().copied().unwrap_or(f64::NAN),
        }
    }
}
