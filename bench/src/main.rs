//! weft-bench: each of Weft's performance figures beside its anchor,
//! measured in one run on this machine (docs/performance.md).
//!
//! `weft-bench run [--quick]` needs root (namespaces) and DATABASE_URL;
//! `scripts/bench` sets everything up. The `cni-driver` and `kernel-apply`
//! subcommands are its helpers, run inside namespaces.

mod cluster;
mod cni;
mod control;
mod datapath;
mod harness;
mod kernel;
mod report;
mod rr;
mod scale;

use std::{io::Write, path::PathBuf, time::Instant};

use anyhow::Context as _;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "weft-bench",
    version,
    about = "Weft's benchmarks beside their anchors"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run every benchmark and print the table (and JSON).
    Run {
        /// Small N: checks that every benchmark still runs (CI).
        #[arg(long)]
        quick: bool,
        /// Where to write the JSON report.
        #[arg(long, default_value = "target/bench.json")]
        json: PathBuf,
        /// The `weft` plugin binary to measure (default: beside this one).
        #[arg(long)]
        shim: Option<PathBuf>,
        /// PostgreSQL for the benchmarks' databases.
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
        /// Run only these sections (comma-separated: cni, ipam, propagation,
        /// kernel, datapath, footprint, scale, plugin); all when absent.
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
    },
    /// Helper: drive a CNI plugin over pods (runs inside a node namespace).
    #[command(hide = true)]
    CniDriver {
        #[arg(long)]
        plugin: String,
        #[arg(long)]
        cni_path: String,
        #[arg(long)]
        conf: String,
        #[arg(long)]
        pods: String,
        #[arg(long)]
        concurrency: usize,
    },
    /// Helper: one end of a TCP request/response run (`--listen` serves
    /// one connection, `--connect` runs transactions and prints latencies).
    #[command(hide = true)]
    TcpRr {
        #[arg(long, conflicts_with = "connect", required_unless_present = "connect")]
        listen: Option<String>,
        #[arg(long)]
        connect: Option<String>,
        #[arg(long, default_value = "5")]
        secs: f64,
    },
    /// Helper: program peers in the current namespace and print the time.
    #[command(hide = true)]
    KernelApply {
        #[arg(long)]
        mode: String,
        #[arg(long)]
        peers: usize,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::CniDriver {
            plugin,
            cni_path,
            conf,
            pods,
            concurrency,
        } => cni::driver(&plugin, &cni_path, &conf, &pods, concurrency),
        Cmd::KernelApply { mode, peers } => kernel::apply(&mode, peers).await,
        Cmd::TcpRr {
            listen,
            connect,
            secs,
        } => match (listen, connect) {
            (Some(listen), _) => rr::serve(&listen),
            (None, Some(connect)) => rr::client(&connect, secs),
            (None, None) => anyhow::bail!("tcp-rr needs --listen or --connect"),
        },
        Cmd::Run {
            quick,
            json,
            shim,
            database_url,
            only,
        } => run(quick, json, shim, database_url, &only).await,
    }
}

async fn run(
    quick: bool,
    json: PathBuf,
    shim: Option<PathBuf>,
    admin_url: String,
    only: &[String],
) -> anyhow::Result<()> {
    let wanted = |section: &str| only.is_empty() || only.iter().any(|s| s == section);
    // The scale section holds a connection per simulated agent.
    weft_plumbing::raise_fd_limit().context("raising the open file limit")?;
    let bin = std::env::current_exe()?
        .parent()
        .context("binary directory")?
        .to_path_buf();
    let dir = std::env::temp_dir().join(format!("weft-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let env = cluster::Env {
        shim: shim.unwrap_or_else(|| bin.join("weft")),
        bin,
        admin_url,
        dir: dir.clone(),
    };
    // (pods, burst, IPAM seconds, watchers, snapshot peers, kernel peers,
    // iperf seconds, footprint peers, footprint allocations, scale nodes,
    // scale allocations)
    let n = if quick {
        (10, 20, 1, 100, 200, 500, 1, 500, 5_000, 200, 6_000)
    } else {
        (
            50, 100, 10, 1_000, 5_000, 5_000, 5, 5_000, 100_000, 5_000, 150_000,
        )
    };
    let mut report = report::Report::default();
    let start = Instant::now();
    let log = |what: &str| eprintln!("[{:>6.1}s] {what}", start.elapsed().as_secs_f64());

    if wanted("cni") {
        log("CNI ADD/DEL latency and burst");
        cni::bench(&env, &mut report, n.0, n.1)?;
    }
    if wanted("ipam") {
        log("IPAM throughput against pgbench");
        control::ipam(&env, &mut report, n.2).await?;
    }
    if wanted("propagation") {
        log("peer propagation and snapshot");
        control::propagation(&env, &mut report, n.3, n.4).await?;
    }
    if wanted("kernel") {
        log("agent kernel programming against ip -batch");
        kernel::bench(&mut report, n.5)?;
    }
    if wanted("datapath") {
        log("datapath throughput");
        datapath::bench(&env, &mut report, n.6)?;
    }
    if wanted("footprint") {
        log("footprint");
        control::server_footprint(&env, &mut report, n.7, n.8).await?;
        datapath::agent_footprint(&env, &mut report, n.7)?;
    }
    if wanted("scale") {
        log("5,000 nodes against two replicas");
        scale::bench(&env, &mut report, n.9, n.10).await?;
    }
    if wanted("plugin") {
        plugin(&env, &mut report)?;
    }

    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", report.table())?;
    let text = serde_json::to_string_pretty(&report.json(quick))?;
    if let Some(parent) = json.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&json, format!("{text}\n"))?;
    writeln!(out, "JSON written to {}", json.display())?;
    // WEFT_BENCH_KEEP=1 keeps the logs of every process for a look after.
    if std::env::var_os("WEFT_BENCH_KEEP").is_none() {
        let _ = std::fs::remove_dir_all(dir);
    }
    Ok(())
}

/// The plugin binary's size and what one exec of it costs with no agent.
fn plugin(env: &cluster::Env, report: &mut report::Report) -> anyhow::Result<()> {
    let shim_size = std::fs::metadata(&env.shim)?.len() as f64 / 1024.0;
    let t = Instant::now();
    let runs = 200;
    for _ in 0..runs {
        harness::run(std::process::Command::new(&env.shim).env("CNI_COMMAND", "VERSION"))?;
    }
    let exec_ms = t.elapsed().as_secs_f64() * 1e3 / f64::from(runs);
    report.push(report::Figure {
        name: format!("weft plugin binary size ({})", env.shim.display()),
        unit: "KiB",
        weft: shim_size,
        anchor: None,
        target: None,
    });
    report.push(report::Figure {
        name: "weft plugin exec + VERSION, mean of 200".into(),
        unit: "ms",
        weft: exec_ms,
        anchor: None,
        target: None,
    });
    Ok(())
}
