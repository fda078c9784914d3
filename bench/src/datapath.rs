//! Benchmark 6 and the agent half of 7: TCP pod to pod across nodes
//! (throughput, and request/response latency) against the same
//! pod/bridge/VXLAN shape built by hand, a hand-built kernel VXLAN and the
//! bare underlay between the same kind of namespaces;
//! agent memory idle and with thousands of peers.

use std::{process::Command, time::Duration};

use anyhow::Context as _;
use serde_json::Value;

use crate::{
    cluster::{Cluster, Env},
    harness::{Fabric, Latency, Netns, Proc, in_ns, wait_until},
    report::{Figure, Report, Target},
    rr,
};

/// iperf3 from namespace `from` to `to_ip` (server in `to`); Gbit/s.
fn iperf(env: &Env, from: &str, to: &str, to_ip: &str, secs: u64) -> anyhow::Result<f64> {
    let server = Proc::spawn(
        Command::new("ip").args(["netns", "exec", to, "iperf3", "-s", "-1", "-B", to_ip]),
        &env.dir.join(format!("iperf-{to}.log")),
    )?;
    // The server may not listen yet; iperf3 -J reports that in its JSON.
    let mut last = Value::Null;
    for _ in 0..50 {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                from,
                "iperf3",
                "-c",
                to_ip,
                "-t",
                &secs.to_string(),
                "-J",
            ])
            .output()?;
        last = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        if out.status.success() && last.get("error").is_none() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(server);
    let bps = last["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .with_context(|| {
            format!(
                "no iperf3 result: {}",
                last.get("error").unwrap_or(&last["end"])
            )
        })?;
    Ok(bps / 1e9)
}

pub fn bench(env: &Env, report: &mut Report, secs: u64) -> anyhow::Result<()> {
    let weft = {
        let c = Cluster::start(env, "wbd", 2, 24)?;
        let (a, _) = c.pod(env, 0, "a")?;
        let (b, b_ip) = c.pod(env, 1, "b")?;
        wait_until("a -> b", Duration::from_secs(10), || {
            in_ns(&a.0, &["ping", "-c1", "-W1", &b_ip]).is_ok()
        })?;
        (
            iperf(env, &a.0, &b.0, &b_ip, secs)?,
            rr::measure(env, &a.0, &b.0, &b_ip, secs)?,
        )
    };
    let (weft, weft_rr) = weft;
    let (vxlan, bare, vxlan_rr) = {
        let mut fabric = Fabric::new("wbh-fabric")?;
        let h0 = fabric.attach("wbh-0", "198.51.100.1")?;
        let h1 = fabric.attach("wbh-1", "198.51.100.2")?;
        for (ns, local, remote, addr) in [
            (&h0, "198.51.100.1", "198.51.100.2", "10.244.250.1"),
            (&h1, "198.51.100.2", "198.51.100.1", "10.244.250.2"),
        ] {
            in_ns(
                &ns.0,
                &[
                    "ip", "link", "add", "vx0", "type", "vxlan", "id", "42", "local", local,
                    "remote", remote, "dstport", "4789", "dev", "eth0",
                ],
            )?;
            in_ns(&ns.0, &["ip", "link", "set", "vx0", "mtu", "1450", "up"])?;
            in_ns(
                &ns.0,
                &["ip", "addr", "add", &format!("{addr}/24"), "dev", "vx0"],
            )?;
        }
        wait_until("hand-built vxlan", Duration::from_secs(10), || {
            in_ns(&h0.0, &["ping", "-c1", "-W1", "10.244.250.2"]).is_ok()
        })?;
        (
            iperf(env, &h0.0, &h1.0, "10.244.250.2", secs)?,
            iperf(env, &h0.0, &h1.0, "198.51.100.2", secs)?,
            rr::measure(env, &h0.0, &h1.0, "10.244.250.2", secs)?,
        )
    };
    let (shaped, shaped_rr) = pod_shaped(env, secs)?;
    report.push(Figure {
        name: "TCP pod to pod across nodes, against the same shape built by hand".into(),
        unit: "Gbit/s",
        weft,
        anchor: Some(("pod netns+veth+bridge+VXLAN by hand".into(), shaped)),
        target: Some(Target::RatioAtLeast(1.0)),
    });
    report.push(Figure {
        name: "TCP pod to pod across nodes".into(),
        unit: "Gbit/s",
        weft,
        anchor: Some(("hand-built kernel VXLAN".into(), vxlan)),
        target: Some(Target::RatioAtLeast(0.95)),
    });
    report.push(Figure {
        name: "TCP pod to pod across nodes, against the bare underlay".into(),
        unit: "Gbit/s",
        weft,
        anchor: Some(("bare underlay veth".into(), bare)),
        target: None,
    });
    // One byte each way per transaction (netperf TCP_RR's shape): what a
    // request costs in latency, where the throughput figures hide it.
    for (anchor, a) in [
        ("pod netns+veth+bridge+VXLAN by hand", shaped_rr),
        ("hand-built kernel VXLAN", vxlan_rr),
    ] {
        for (q, w, a) in [("p50", weft_rr.p50, a.p50), ("p99", weft_rr.p99, a.p99)] {
            report.push(Figure {
                name: format!("TCP_RR pod to pod across nodes, one transaction {q}"),
                unit: "µs",
                weft: w * 1e3,
                anchor: Some((anchor.into(), a * 1e3)),
                target: None,
            });
        }
    }
    Ok(())
}

/// The shape Weft builds, by hand and without Weft: per node a pod
/// namespace on a veth, a bridge holding the gateway, a VXLAN device with a
/// static route, permanent neighbour and FDB entry for the other node, MTU
/// 1450, forwarding on. What Weft adds over the kernel is the difference
/// between this and Weft's figure.
fn pod_shaped(env: &Env, secs: u64) -> anyhow::Result<(f64, Latency)> {
    let mut fabric = Fabric::new("wbs-fabric")?;
    let nodes = [
        (
            fabric.attach("wbs-0", "198.51.100.1")?,
            Netns::new("wbs-pod0")?,
        ),
        (
            fabric.attach("wbs-1", "198.51.100.2")?,
            Netns::new("wbs-pod1")?,
        ),
    ];
    for (i, (node, pod)) in nodes.iter().enumerate() {
        let (me, other) = (201 + i, 202 - i);
        let (local, remote) = (
            format!("198.51.100.{}", i + 1),
            format!("198.51.100.{}", 2 - i),
        );
        let (mac, other_mac) = (
            format!("02:00:00:00:{me:02x}:01"),
            format!("02:00:00:00:{other:02x}:01"),
        );
        let n = |args: &[&str]| in_ns(&node.0, args).map(drop);
        n(&["sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        n(&[
            "ip",
            "link",
            "add",
            "vx0",
            "type",
            "vxlan",
            "id",
            "1",
            "local",
            &local,
            "dstport",
            "4789",
            "nolearning",
            "dev",
            "eth0",
        ])?;
        n(&[
            "ip", "link", "set", "vx0", "address", &mac, "mtu", "1450", "up",
        ])?;
        n(&[
            "ip",
            "addr",
            "add",
            &format!("10.244.{me}.0/32"),
            "dev",
            "vx0",
        ])?;
        n(&["ip", "link", "add", "br0", "type", "bridge"])?;
        n(&["ip", "link", "set", "br0", "mtu", "1450", "up"])?;
        n(&[
            "ip",
            "addr",
            "add",
            &format!("10.244.{me}.1/24"),
            "dev",
            "br0",
        ])?;
        n(&[
            "ip", "link", "add", "h0", "mtu", "1450", "type", "veth", "peer", "name", "eth0",
            "mtu", "1450", "netns", &pod.0,
        ])?;
        n(&["ip", "link", "set", "h0", "master", "br0", "up"])?;
        n(&[
            "bridge",
            "fdb",
            "add",
            &other_mac,
            "dev",
            "vx0",
            "dst",
            &remote,
            "self",
            "permanent",
        ])?;
        n(&[
            "ip",
            "neigh",
            "add",
            &format!("10.244.{other}.0"),
            "lladdr",
            &other_mac,
            "dev",
            "vx0",
            "nud",
            "permanent",
        ])?;
        n(&[
            "ip",
            "route",
            "add",
            &format!("10.244.{other}.0/24"),
            "via",
            &format!("10.244.{other}.0"),
            "dev",
            "vx0",
            "onlink",
        ])?;
        let p = |args: &[&str]| in_ns(&pod.0, args).map(drop);
        p(&[
            "ip",
            "addr",
            "add",
            &format!("10.244.{me}.2/24"),
            "dev",
            "eth0",
        ])?;
        p(&["ip", "link", "set", "eth0", "up"])?;
        p(&[
            "ip",
            "route",
            "add",
            "default",
            "via",
            &format!("10.244.{me}.1"),
        ])?;
    }
    let (a, b) = (&nodes[0].1, &nodes[1].1);
    wait_until("hand-built pod shape", Duration::from_secs(10), || {
        in_ns(&a.0, &["ping", "-c1", "-W1", "10.244.202.2"]).is_ok()
    })?;
    Ok((
        iperf(env, &a.0, &b.0, "10.244.202.2", secs)?,
        rr::measure(env, &a.0, &b.0, "10.244.202.2", secs)?,
    ))
}

/// The agent's memory idle (no peers) and after programming `peers` peers.
pub fn agent_footprint(env: &Env, report: &mut Report, peers: u32) -> anyhow::Result<()> {
    let mut c = Cluster::start(env, "wbf", 1, 29)?;
    std::thread::sleep(Duration::from_millis(500));
    let (idle, _) = c.agents[0].rss_mib();
    // Written as the server writes a node's registration (row, revision,
    // topology event) so the server's feed and its snapshot cache see them.
    c.sql(&format!(
        "BEGIN;
         INSERT INTO nodes (name, underlay_ip, vtep_mac, block_index, block)
         SELECT 'ghost' || i, '198.18.0.0'::inet + i,
                ('02:00:' || lpad(to_hex(i / 65536 % 256), 2, '0') || ':' || lpad(to_hex(i / 256 % 256), 2, '0')
                   || ':' || lpad(to_hex(i % 256), 2, '0') || ':01')::macaddr,
                i, set_masklen('10.244.0.0'::inet + i * 8, 29)::cidr
         FROM generate_series(1, {peers}) i;
         INSERT INTO topology_events (revision, node_name, kind, underlay_ip, vtep_mac, block)
         SELECT r.revision + n.i, n.name, 'upsert', n.underlay_ip, n.vtep_mac, n.block
         FROM topology_revision r,
              (SELECT row_number() OVER (ORDER BY block_index) AS i, * FROM nodes
               WHERE name LIKE 'ghost%') n;
         UPDATE topology_revision SET revision = revision + {peers};
         COMMIT;
         NOTIFY {};",
        weft_server::store::TOPOLOGY_CHANNEL
    ))?;
    // The feed reads them in pages of 1,024 once notified; give it that
    // before the restarted agent asks for its snapshot.
    std::thread::sleep(Duration::from_secs(1));
    // A restarted agent gets them all in one snapshot.
    c.agents.clear();
    c.restart_agent(env, 0)?;
    let agent = &c.agents[0];
    wait_until(
        "the agent to program every peer",
        Duration::from_secs(120),
        || agent.log_text().contains(&format!("peers={peers}")),
    )?;
    let (loaded, peak) = agent.rss_mib();
    end_to_end(&c, report, peers)?;
    for (name, v, target) in [
        ("weft-agent RSS idle".to_owned(), idle, None),
        (
            format!("weft-agent RSS with {peers} peers programmed"),
            loaded,
            None,
        ),
        (
            format!("weft-agent peak RSS (VmHWM) with {peers} peers"),
            peak,
            Some(Target::AtMost(20.0)),
        ),
    ] {
        report.push(Figure {
            name,
            unit: "MiB",
            weft: v,
            anchor: None,
            target,
        });
    }
    Ok(())
}

/// Changes timed from the server's side to the agent's kernel.
const CHANGES: u32 = 50;

/// One peer change among `peers`, end to end: a node row, its topology
/// event and the NOTIFY the server's feed listens for, committed in one
/// transaction as a registration commits them; the clock starts when the
/// commit has returned (read by the next statement: it starts up to that
/// round trip late) and stops at the route in the agent's kernel (`ip -ts
/// monitor route` in its namespace), through the feed, the agent's stream
/// and its incremental apply. Each join is followed by its leave.
fn end_to_end(c: &Cluster, report: &mut Report, peers: u32) -> anyhow::Result<()> {
    use std::io::BufRead as _;
    let mut monitor = Command::new("ip")
        .args([
            "netns",
            "exec",
            &c.nodes[0].0,
            "ip",
            "-ts",
            "monitor",
            "route",
        ])
        // ip prints local time; the clock it is compared with is UTC.
        .env("TZ", "UTC")
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let stdout = monitor.stdout.take().context("monitor stdout")?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    let notify = format!("NOTIFY {}", weft_server::store::TOPOLOGY_CHANNEL);
    let clock = "SELECT extract(epoch FROM clock_timestamp())";
    let mut samples = Vec::new();
    let result = (|| -> anyhow::Result<()> {
        for k in 1..=CHANGES {
            let i = peers + k;
            let block = format!("10.244.{}.{}/29", ((i * 8) >> 8) & 0xff, (i * 8) & 0xff);
            let change = format!(
                "BEGIN;
                 INSERT INTO nodes (name, underlay_ip, vtep_mac, block_index, block)
                 VALUES ('join{k}', '198.18.0.0'::inet + {i},
                         ('02:01:' || lpad(to_hex({i} / 65536 % 256), 2, '0') || ':' || lpad(to_hex({i} / 256 % 256), 2, '0')
                            || ':' || lpad(to_hex({i} % 256), 2, '0') || ':01')::macaddr,
                         {i}, '{block}');
                 UPDATE topology_revision SET revision = revision + 1;
                 INSERT INTO topology_events (revision, node_name, kind, underlay_ip, vtep_mac, block)
                 SELECT r.revision, n.name, 'upsert', n.underlay_ip, n.vtep_mac, n.block
                 FROM topology_revision r, nodes n WHERE n.name = 'join{k}';
                 {notify};
                 COMMIT;"
            );
            let leave = format!(
                "BEGIN;
                 DELETE FROM nodes WHERE name = 'join{k}';
                 UPDATE topology_revision SET revision = revision + 1;
                 INSERT INTO topology_events (revision, node_name, kind)
                 SELECT revision, 'join{k}', 'delete' FROM topology_revision;
                 {notify};
                 COMMIT;"
            );
            // A join's route is its last entry (FDB, neighbour, route):
            // its appearance is the whole change applied.
            let t0: f64 = c
                .sql_steps(&[&change, clock])?
                .lines()
                .filter_map(|l| l.trim().parse().ok())
                .next_back()
                .context("no clock from PostgreSQL")?;
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            let t1 = loop {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                let line = rx
                    .recv_timeout(left)
                    .with_context(|| format!("no route event for {block}"))?;
                if line.contains(&format!("] {block} "))
                    && let Some(t) = monitor_time(&line)
                {
                    break t;
                }
            };
            samples.push((t1 - t0) * 1e3);
            // The leave keeps the set at `peers` (not timed: a leave's
            // last entry is an FDB entry, which `ip monitor route` does
            // not show).
            c.sql(&leave)?;
        }
        Ok(())
    })();
    let _ = monitor.kill();
    let _ = monitor.wait();
    result?;
    report.tail_latency(
        &format!("one peer change among {peers}, event committed -> agent's kernel,"),
        Latency::of(&samples),
        Some(Target::AtMost(5.0)),
    );
    Ok(())
}

/// Seconds since the epoch of an `ip -ts` line's `[YYYY-MM-DDTHH:MM:SS.ffffff]`
/// (UTC).
fn monitor_time(line: &str) -> Option<f64> {
    let stamp = line.strip_prefix('[')?.split(']').next()?;
    let (date, time) = stamp.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (h, min) = (
        t.next()?.parse::<f64>().ok()?,
        t.next()?.parse::<f64>().ok()?,
    );
    let sec = t.next()?.parse::<f64>().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days as f64 * 86_400.0 + h * 3_600.0 + min * 60.0 + sec)
}
