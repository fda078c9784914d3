//! Benchmark 5: programming N peers (route, permanent neighbour, FDB entry
//! each) on a VXLAN device, by the agent's own reconcile, against
//! `ip -batch` and `bridge -batch` with the same entries. Each side runs in
//! a fresh namespace of its own (`weft-bench kernel-apply` inside it).

use std::{io::Write, net::Ipv4Addr, process::Command, time::Instant};

use anyhow::Context as _;
use ipnet::Ipv4Net;
use weft_agent::{
    datapath::netlink::NetlinkDatapath,
    datapath::{Datapath, VtepSpec},
    peers::{MacAddr, Peer, PeerSet},
    reconcile::reconcile,
};

use crate::{
    harness::{Netns, in_ns, run, sh},
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
        "weft" => {
            let dp = NetlinkDatapath::connect()?;
            let idx: u32 = std::fs::read_to_string("/sys/class/net/u0/ifindex")
                .ok()
                .and_then(|s| s.trim().parse().ok())
                // /sys belongs to the host under `ip netns exec` without a
                // remount; ask netlink instead.
                .unwrap_or_default();
            let idx = if idx == 0 {
                dp.underlay_named("u0", None).await?.ifindex
            } else {
                idx
            };
            dp.ensure_vtep(&VtepSpec {
                vni: 1,
                local: Ipv4Addr::new(198, 51, 100, 1),
                underlay_ifindex: idx,
                mtu: 1450,
                mac: MacAddr::local_unicast([0xaa, 0, 0, 0, 1]),
                address: Ipv4Addr::new(10, 244, 0, 0),
            })
            .await?;
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
    let weft = measure("weft", count)?;
    let batch = measure("batch", count)?;
    report.push(Figure {
        name: format!("program {count} peers (route+neigh+fdb each)"),
        unit: "ms",
        weft,
        anchor: Some(("ip -batch + bridge -batch".into(), batch)),
        target: Some(Target::RatioAtMost(1.2)),
    });
    Ok(())
}
