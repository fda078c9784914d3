//! Benchmarks 1 and 2: CNI ADD/DEL latency and a burst of ADDs, through
//! the real `weft` binary, against Debian's `bridge` + `host-local` driven
//! the same way. The driver runs inside the node namespace and execs the
//! plugin directly, as a container runtime does.

use std::{
    io::Write,
    path::Path,
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Instant,
};

use anyhow::bail;
use serde_json::{Value, json};

use crate::{
    cluster::{Cluster, Env},
    harness::{Latency, Netns},
    report::{Figure, Report, Target},
};

/// Runs `cmd` as a CNI plugin invocation (weft-testbed's, as a runtime
/// does it); its stdout, or an error naming the failure.
fn invoke(
    cmd: Command,
    cni_path: &Path,
    conf: &str,
    command: &str,
    id: &str,
    netns: &str,
) -> anyhow::Result<Vec<u8>> {
    let call = weft_testbed::process::CniCall {
        command,
        container_id: id,
        netns,
        ifname: "eth0",
        args: format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={id}"),
        path: cni_path,
    };
    let out = weft_testbed::process::invoke_plugin(cmd, &call, conf.as_bytes())?;
    if out.code != 0 {
        bail!(
            "{command} {id}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            out.stderr
        );
    }
    Ok(out.stdout)
}

/// `weft-bench cni-driver`: runs inside the node namespace. ADDs every pod
/// with `concurrency` workers, then DELs them; prints per-op latencies.
pub fn driver(
    plugin: &str,
    cni_path: &str,
    conf_file: &str,
    pods: &str,
    concurrency: usize,
) -> anyhow::Result<()> {
    let conf = std::fs::read_to_string(conf_file)?;
    let pods: Vec<String> = pods.split(',').map(str::to_owned).collect();
    let mut result = json!({});
    for command in ["ADD", "DEL"] {
        let next = Arc::new(AtomicUsize::new(0));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let start = Instant::now();
        std::thread::scope(|scope| {
            for _ in 0..concurrency {
                let (next, samples, errors, pods, conf) =
                    (next.clone(), samples.clone(), errors.clone(), &pods, &conf);
                scope.spawn(move || {
                    loop {
                        let i = next.fetch_add(1, Ordering::SeqCst);
                        let Some(pod) = pods.get(i) else { break };
                        let t = Instant::now();
                        let out = run_plugin(plugin, cni_path, conf, command, pod);
                        let ms = t.elapsed().as_secs_f64() * 1e3;
                        match out {
                            Ok(()) => samples.lock().map(|mut s| s.push(ms)).unwrap_or(()),
                            Err(e) => errors
                                .lock()
                                .map(|mut v| v.push(e.to_string()))
                                .unwrap_or(()),
                        }
                    }
                });
            }
        });
        let wall = start.elapsed().as_secs_f64() * 1e3;
        let samples = samples.lock().map(|s| s.clone()).unwrap_or_default();
        let errors = errors.lock().map(|e| e.clone()).unwrap_or_default();
        result[command] = json!({ "samples": samples, "wall_ms": wall, "errors": errors });
    }
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{result}")?;
    Ok(())
}

fn run_plugin(
    plugin: &str,
    cni_path: &str,
    conf: &str,
    command: &str,
    pod: &str,
) -> anyhow::Result<()> {
    invoke(
        Command::new(plugin),
        Path::new(cni_path),
        conf,
        command,
        pod,
        &format!("/var/run/netns/{pod}"),
    )
    .map(drop)
}

struct Run {
    add: Vec<f64>,
    del: Vec<f64>,
    add_wall: f64,
}

/// Runs the driver in `node_ns` over `count` fresh pod namespaces.
#[allow(clippy::too_many_arguments)] // one call site per plugin, all explicit
fn drive(
    env: &Env,
    node_ns: &str,
    plugin: &Path,
    cni_path: &Path,
    conf: &str,
    tag: &str,
    count: usize,
    concurrency: usize,
) -> anyhow::Result<Run> {
    let pods: Vec<Netns> = (0..count)
        .map(|i| Netns::new(&format!("{tag}-{i}")))
        .collect::<Result<_, _>>()?;
    let names: Vec<&str> = pods.iter().map(|p| p.0.as_str()).collect();
    let conf_file = env.dir.join(format!("{tag}.conf"));
    std::fs::write(&conf_file, conf)?;
    let out = crate::harness::run(
        Command::new("ip")
            .args(["netns", "exec", node_ns])
            .arg(std::env::current_exe()?)
            .arg("cni-driver")
            .arg("--plugin")
            .arg(plugin)
            .arg("--cni-path")
            .arg(cni_path)
            .arg("--conf")
            .arg(&conf_file)
            .args([
                "--pods",
                &names.join(","),
                "--concurrency",
                &concurrency.to_string(),
            ]),
    )?;
    let v: Value = serde_json::from_slice(&out.stdout)?;
    for command in ["ADD", "DEL"] {
        if let Some(first) = v[command]["errors"].as_array().and_then(|e| e.first()) {
            bail!("{tag}: {command} failed: {first}");
        }
    }
    let samples = |k: &str| {
        v[k]["samples"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_f64).collect())
            .unwrap_or_default()
    };
    Ok(Run {
        add: samples("ADD"),
        del: samples("DEL"),
        add_wall: v["ADD"]["wall_ms"].as_f64().unwrap_or(f64::NAN),
    })
}

/// Waits until the server has reserved at least `want` addresses for the
/// cluster's nodes.
fn wait_for_reserve(c: &Cluster, want: usize) -> anyhow::Result<()> {
    crate::harness::wait_until("a full reserve", std::time::Duration::from_secs(20), || {
        c.sql("SELECT count(*) FROM allocations WHERE state = 'reserved'")
            .ok()
            .and_then(|n| n.trim().parse::<usize>().ok())
            .is_some_and(|n| n >= want)
    })
}

fn reference_conf(dir: &Path, tag: &str) -> String {
    json!({
        "cniVersion": "1.0.0",
        "name": format!("ref-{tag}"),
        "type": "bridge",
        "bridge": "cni0",
        "isGateway": true,
        "ipMasq": true,
        "ipam": {
            "type": "host-local",
            "subnet": "10.244.200.0/24",
            "dataDir": dir.join(format!("host-local-{tag}")),
        },
    })
    .to_string()
}

pub fn bench(env: &Env, report: &mut Report, pods: usize, burst: usize) -> anyhow::Result<()> {
    let reference = Path::new("/usr/lib/cni/bridge");
    if !reference.exists() {
        bail!(
            "{} missing: apt-get install containernetworking-plugins",
            reference.display()
        );
    }
    let mut sequential_anchor = None;
    for (concurrency, label) in [(1, "sequential"), (8, "concurrency 8")] {
        let tag = format!("wb{concurrency}");
        let weft = {
            let c = Cluster::start(env, &format!("{tag}w"), 1, 24)?;
            // A node in service, as in the run with the server down below:
            // a node that just registered starts with an empty reserve
            // (the burst at the end measures that case).
            wait_for_reserve(&c, pods)?;
            let run = drive(
                env,
                &c.nodes[0].0,
                &env.shim,
                Path::new("/opt/cni/bin"),
                &c.conf(0),
                &format!("{tag}wp"),
                pods,
                concurrency,
            )?;
            if concurrency == 1 {
                // How long after the node bound it each address reached
                // PostgreSQL (same clock: one machine).
                std::thread::sleep(std::time::Duration::from_millis(500));
                let lags = c.sql(
                    "SELECT 1000 * extract(epoch FROM recorded_at - at) FROM audit_log
                     WHERE action = 'bind'",
                )?;
                let lags: Vec<f64> = lags.lines().filter_map(|l| l.trim().parse().ok()).collect();
                let lag = Latency::of(&lags);
                for (q, v) in [("p50", lag.p50), ("max", lag.max)] {
                    report.push(Figure {
                        name: format!("bind reaches PostgreSQL after, online, {q}"),
                        unit: "ms",
                        weft: v,
                        anchor: None,
                        target: Some(Target::AtMost(100.0)),
                    });
                }
            }
            run
        };
        let anchor = {
            let node = Netns::new(&format!("{tag}r-node"))?;
            drive(
                env,
                &node.0,
                reference,
                Path::new("/usr/lib/cni"),
                &reference_conf(&env.dir, &tag),
                &format!("{tag}rp"),
                pods,
                concurrency,
            )?
        };
        let (wa, ra) = (Latency::of(&weft.add), Latency::of(&anchor.add));
        let (wd, rd) = (Latency::of(&weft.del), Latency::of(&anchor.del));
        if concurrency == 1 {
            sequential_anchor = Some(ra);
        }
        // No server round trip on the path (issue 14's targets).
        let add_target = if concurrency == 1 { 0.12 } else { 0.15 };
        report.latency(
            &format!("CNI ADD, {pods} pods {label}"),
            wa,
            "bridge+host-local",
            ra,
            Some(Target::RatioAtMost(add_target)),
        );
        // The pod unreachable and its address free before the answer; the
        // veth may finish dying after (issue 15's targets).
        let del_target = if concurrency == 1 { 0.3 } else { 0.5 };
        report.latency(
            &format!("CNI DEL, {pods} pods {label}"),
            wd,
            "bridge+host-local",
            rd,
            Some(Target::RatioAtMost(del_target)),
        );
    }

    // The same ADDs with weft-server down: bound from the reserve.
    {
        let mut c = Cluster::start(env, "wbo", 1, 24)?;
        let want = pods.min(64);
        wait_for_reserve(&c, want)?;
        c.stop_server();
        let down = drive(
            env,
            &c.nodes[0].0,
            &env.shim,
            Path::new("/opt/cni/bin"),
            &c.conf(0),
            "wbop",
            want,
            1,
        )?;
        if let Some(ra) = sequential_anchor {
            report.latency(
                &format!("CNI ADD, {want} pods sequential, weft-server down"),
                Latency::of(&down.add),
                "bridge+host-local",
                ra,
                Some(Target::RatioAtMost(0.12)),
            );
        }
    }

    let c = Cluster::start(env, "wbb", 1, 24)?;
    let run = drive(
        env,
        &c.nodes[0].0,
        &env.shim,
        Path::new("/opt/cni/bin"),
        &c.conf(0),
        "wbbp",
        burst,
        burst,
    )?;
    report.push(Figure {
        name: format!("burst: {burst} concurrent ADDs on one node, all wired"),
        unit: "ms",
        weft: run.add_wall,
        anchor: None,
        target: Some(Target::AtMost(2000.0)),
    });
    Ok(())
}
