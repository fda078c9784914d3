//! Benchmark 5: programming N peers (route, permanent neighbour, FDB entry
//! each) on a VXLAN device, by the agent's own reconcile, against
//! `ip -batch` and `bridge -batch` with the same entries; and one peer's
//! change among N, as the agent applies a peer event (time and requests). Each side runs in
//! a fresh namespace of its own (`weft-bench kernel-apply` inside it).

use std::{
    collections::BTreeSet,
    io::Write,
    net::Ipv4Addr,
    process::Command,
    sync::atomic::{AtomicUsize, Ordering},
    time::Instant,
};

use anyhow::Context as _;
use ipnet::Ipv4Net;
use weft_agent::{
    datapath::netlink::NetlinkDatapath,
    datapath::{Datapath, VtepSpec},
    peers::{Entry, MacAddr, Peer, PeerSet},
    reconcile::{apply_change, reconcile},
};

use crate::{
    harness::{Latency, Netns, in_ns, run, sh},
    report::{Figure, Report, Target},
};

fn peers(n: usize) -> Vec<Peer> {
    (0..n)
        .map(|i| {
            let i32_ = u32::try_from(i).unwrap_or(0) + 1;
            // /29 blocks inside 10.244.0.0/16: room for 8191 peers.
            let base = u32::from(Ipv4Addr::new(10, 244, 0, 0)) + i32_ * 8;
            Peer {
                node_name: format!("peer{i}"),
                // One underlay address per peer (the peer set refuses a
                // second claim); only data, from the benchmarking range.
                underlay_ip: Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + i32_),
                vtep_mac: MacAddr::local_unicast([
                    0x00,
                    0x00,
                    (i32_ >> 16) as u8,
                    (i32_ >> 8) as u8,
                    i32_ as u8,
                ]),
                block: Ipv4Net::new(Ipv4Addr::from(base), 29).unwrap_or_default(),
            }
        })
        .collect()
}

fn underlay() -> anyhow::Result<()> {
    sh(&[
        "ip", "link", "add", "u0", "type", "veth", "peer", "name", "u1",
    ])?;
    sh(&["ip", "addr", "add", "198.51.100.1/24", "dev", "u0"])?;
    sh(&["ip", "link", "set", "u0", "up"])?;
    sh(&["ip", "link", "set", "u1", "up"])?;
    Ok(())
}

/// `weft-bench kernel-apply`: runs inside a fresh namespace; prints ms.
pub async fn apply(mode: &str, count: usize) -> anyhow::Result<()> {
    underlay()?;
    let peers = peers(count);
    let ms = match mode {
        "change" => return change(peers).await,
        "weft" => {
            let dp = NetlinkDatapath::connect()?;
            vtep(&dp).await?;
            let mut set = PeerSet::default();
            let refused = set.reset(1, peers, "self");
            anyhow::ensure!(refused.is_empty(), "peers refused: {refused:?}");
            let t = Instant::now();
            let applied = reconcile(&dp, &set)
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            anyhow::ensure!(
                applied.added == count * 3,
                "applied {} of {}",
                applied.added,
                count * 3
            );
            t.elapsed().as_secs_f64() * 1e3
        }
        _ => {
            sh(&[
                "ip",
                "link",
                "add",
                "weft.vxlan",
                "type",
                "vxlan",
                "id",
                "1",
                "local",
                "198.51.100.1",
                "dstport",
                "4789",
                "nolearning",
                "dev",
                "u0",
            ])?;
            sh(&["ip", "link", "set", "weft.vxlan", "up"])?;
            sh(&["ip", "addr", "add", "10.244.0.0/32", "dev", "weft.vxlan"])?;
            let dir = std::env::temp_dir();
            let (ipf, brf) = (
                dir.join(format!("wb-ip-{}", std::process::id())),
                dir.join(format!("wb-br-{}", std::process::id())),
            );
            let mut ip = std::fs::File::create(&ipf)?;
            let mut br = std::fs::File::create(&brf)?;
            for p in &peers {
                writeln!(
                    br,
                    "fdb add {} dev weft.vxlan dst {} self permanent",
                    p.vtep_mac, p.underlay_ip
                )?;
                writeln!(
                    ip,
                    "neigh add {} lladdr {} dev weft.vxlan nud permanent",
                    p.via(),
                    p.vtep_mac
                )?;
            }
            for p in &peers {
                writeln!(
                    ip,
                    "route add {} via {} dev weft.vxlan onlink",
                    p.block,
                    p.via()
                )?;
            }
            drop((ip, br));
            let t = Instant::now();
            run(Command::new("bridge").arg("-batch").arg(&brf))?;
            run(Command::new("ip").arg("-batch").arg(&ipf))?;
            let ms = t.elapsed().as_secs_f64() * 1e3;
            let _ = std::fs::remove_file(ipf);
            let _ = std::fs::remove_file(brf);
            ms
        }
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{ms}")?;
    Ok(())
}

/// Counts the requests a change makes (each entry added or removed is one
/// netlink request; a read of the entries is a dump).
struct Counting<'a> {
    inner: &'a NetlinkDatapath,
    requests: AtomicUsize,
    dumps: AtomicUsize,
}

impl Datapath for Counting<'_> {
    async fn vtep_mac(&self) -> weft_agent::datapath::Result<Option<MacAddr>> {
        self.inner.vtep_mac().await
    }
    async fn ensure_vtep(&self, spec: &VtepSpec) -> weft_agent::datapath::Result<()> {
        self.inner.ensure_vtep(spec).await
    }
    async fn ensure_bridge(
        &self,
        spec: &weft_agent::datapath::BridgeSpec,
    ) -> weft_agent::datapath::Result<()> {
        self.inner.ensure_bridge(spec).await
    }
    async fn ensure_forwarding(&self) -> weft_agent::datapath::Result<()> {
        self.inner.ensure_forwarding().await
    }
    async fn ensure_masquerade(
        &self,
        spec: &weft_agent::datapath::MasqueradeSpec,
    ) -> weft_agent::datapath::Result<()> {
        self.inner.ensure_masquerade(spec).await
    }
    async fn peer_entries(&self) -> weft_agent::datapath::Result<BTreeSet<Entry>> {
        self.dumps.fetch_add(1, Ordering::Relaxed);
        self.inner.peer_entries().await
    }
    async fn add_entry(&self, entry: &Entry) -> weft_agent::datapath::Result<()> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.inner.add_entry(entry).await
    }
    async fn remove_entry(&self, entry: &Entry) -> weft_agent::datapath::Result<()> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.inner.remove_entry(entry).await
    }
}

async fn vtep(dp: &NetlinkDatapath) -> anyhow::Result<()> {
    let idx = dp.underlay_named("u0", None).await?.ifindex;
    dp.ensure_vtep(&VtepSpec {
        vni: 1,
        local: Ipv4Addr::new(198, 51, 100, 1),
        underlay_ifindex: idx,
        mtu: 1450,
        mac: MacAddr::local_unicast([0xaa, 0, 0, 0, 1]),
        address: Ipv4Addr::new(10, 244, 0, 0),
    })
    .await?;
    Ok(())
}

/// `kernel-apply --mode change`: programs `peers` minus 100, then joins
/// and removes 50 nodes one at a time as the agent applies a peer event;
/// prints p50 and p99 ms per change, requests per change and dumps.
async fn change(mut peers: Vec<Peer>) -> anyhow::Result<()> {
    let dp = NetlinkDatapath::connect()?;
    vtep(&dp).await?;
    let extra: Vec<Peer> = peers.split_off(peers.len().saturating_sub(50));
    let mut set = PeerSet::default();
    let refused = set.reset(1, peers, "self");
    anyhow::ensure!(refused.is_empty(), "peers refused: {refused:?}");
    reconcile(&dp, &set)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let counting = Counting {
        inner: &dp,
        requests: AtomicUsize::new(0),
        dumps: AtomicUsize::new(0),
    };
    let mut samples = Vec::new();
    let mut revision = 1;
    for p in &extra {
        revision += 1;
        let t = Instant::now();
        set.upsert(revision, p.clone(), "self")
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        apply_change(&counting, None, set.get(&p.node_name))
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        samples.push(t.elapsed().as_secs_f64() * 1e3);
    }
    for p in &extra {
        revision += 1;
        let t = Instant::now();
        let before = set.get(&p.node_name).cloned();
        set.remove(revision, &p.node_name);
        apply_change(&counting, before.as_ref(), None)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        samples.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let l = Latency::of(&samples);
    let per_change = counting.requests.load(Ordering::Relaxed) as f64 / samples.len() as f64;
    let dumps = counting.dumps.load(Ordering::Relaxed);
    // The anchor: the same joins applied by a whole reconcile (dump, diff,
    // apply), as the agent did for every event before.
    let mut full = Vec::new();
    for p in extra.iter().take(10) {
        revision += 1;
        let t = Instant::now();
        set.upsert(revision, p.clone(), "self")
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        reconcile(&dp, &set)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        full.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{} {} {} {} {}",
        l.p50,
        l.p99,
        per_change,
        dumps,
        Latency::of(&full).p50
    )?;
    Ok(())
}

fn measure(mode: &str, count: usize) -> anyhow::Result<f64> {
    let ns = Netns::new(&format!("wbk-{mode}"))?;
    let out = in_ns(
        &ns.0,
        &[
            &std::env::current_exe()?.to_string_lossy(),
            "kernel-apply",
            "--mode",
            mode,
            "--peers",
            &count.to_string(),
        ],
    )?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse::<f64>()
        .context("kernel-apply printed no figure")
}

pub fn bench(report: &mut Report, count: usize) -> anyhow::Result<()> {
    // One node joining or leaving among `count`, as the agent applies it.
    let ns = Netns::new("wbk-change")?;
    let out = in_ns(
        &ns.0,
        &[
            &std::env::current_exe()?.to_string_lossy(),
            "kernel-apply",
            "--mode",
            "change",
            "--peers",
            &count.to_string(),
        ],
    )?;
    let text = String::from_utf8_lossy(&out.stdout);
    let figures: Vec<f64> = text
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    let [p50, p99, requests, dumps, full] = figures[..] else {
        anyhow::bail!("kernel-apply --mode change printed {text:?}");
    };
    report.push(Figure {
        name: format!("one peer joining or leaving among {count}, applied to the kernel, p50"),
        unit: "ms",
        weft: p50,
        anchor: Some(("whole reconcile (dump + diff)".into(), full)),
        target: None,
    });
    report.push(Figure {
        name: format!("one peer joining or leaving among {count}, applied to the kernel, p99"),
        unit: "ms",
        weft: p99,
        anchor: None,
        target: Some(Target::AtMost(5.0)),
    });
    report.push(Figure {
        name: format!("netlink requests per peer change among {count} (dumps: {dumps})"),
        unit: "",
        weft: requests,
        anchor: None,
        target: Some(Target::AtMost(3.0)),
    });
    let weft = measure("weft", count)?;
    let batch = measure("batch", count)?;
    report.push(Figure {
        name: format!("program {count} peers (route+neigh+fdb each)"),
        unit: "ms",
        weft,
        anchor: Some(("ip -batch + bridge -batch".into(), batch)),
        target: Some(Target::RatioAtMost(1.0)),
    });
    Ok(())
}
