//! The batched netlink path, against a real kernel: hundreds of peers'
//! routes, neighbours and FDB entries programmed, replaced and removed in
//! batches inside a fresh network namespace, and the kernel, read back with
//! `ip` as well as with the agent's own dump, holding exactly the entries
//! the peer set implies. Needs root.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    process::{Command, Stdio},
};

use ipnet::Ipv4Net;
use weft_agent::{
    datapath::{Datapath, VtepSpec, netlink::NetlinkDatapath},
    peers::{Entry, MacAddr, Peer, PeerSet, desired_entries},
    reconcile::reconcile,
};
use weft_testbed::{cluster::require_root, process::Netns};

/// `n` peers (n ≤ 250) with underlays in 203.0.113.0/24 (data only: no
/// packet is sent) and /29 blocks.
fn peers(n: u32) -> Vec<Peer> {
    (1..=n)
        .map(|i| Peer {
            node_name: format!("peer{i}"),
            underlay_ip: Ipv4Addr::new(203, 0, 113, u8::try_from(i).unwrap()),
            vtep_mac: MacAddr::local_unicast([0, 0, 0, 0, u8::try_from(i).unwrap()]),
            block: Ipv4Net::new(
                Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 244, 0, 0)) + i * 8),
                29,
            )
            .unwrap(),
        })
        .collect()
}

fn sh(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(out.status.success(), "{args:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// What `ip` and `bridge` say is on the tunnel, as counts.
fn kernel_counts() -> (usize, usize, usize) {
    let routes = sh(&["ip", "-4", "route", "show", "dev", "weft.vxlan"]);
    let neigh = sh(&[
        "ip",
        "-4",
        "neigh",
        "show",
        "dev",
        "weft.vxlan",
        "nud",
        "permanent",
    ]);
    let fdb = sh(&["bridge", "fdb", "show", "dev", "weft.vxlan"]);
    (
        routes.lines().filter(|l| l.contains(" via ")).count(),
        neigh.lines().count(),
        fdb.lines().filter(|l| l.contains("dst 203.0.113.")).count(),
    )
}

fn vtep(underlay_ifindex: u32) -> VtepSpec {
    VtepSpec {
        vni: 1,
        local: Ipv4Addr::new(198, 51, 100, 1),
        underlay_ifindex,
        mtu: 1450,
        mac: MacAddr::local_unicast([0xaa, 0, 0, 0, 1]),
        address: Ipv4Addr::new(10, 244, 0, 0),
    }
}

async fn set_of(dp: &NetlinkDatapath, peers: Vec<Peer>) -> BTreeSet<Entry> {
    let mut set = PeerSet::default();
    assert!(set.reset(1, peers, "self").is_empty());
    reconcile(dp, &set).await.unwrap();
    desired_entries(set.peers())
}

#[test]
fn hundreds_of_entries_go_in_batches_and_the_kernel_holds_exactly_the_set() {
    if !require_root() {
        return;
    }
    let ns = Netns::new("wt-batch").unwrap();
    let path = ns.path();
    // The namespace is entered by one thread, whose runtime (and the
    // blocking threads it starts) lives there; commands it runs inherit it.
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap();
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            sh(&[
                "ip", "link", "add", "u0", "type", "veth", "peer", "name", "u1",
            ]);
            sh(&["ip", "addr", "add", "198.51.100.1/24", "dev", "u0"]);
            sh(&["ip", "link", "set", "u0", "up"]);
            sh(&["ip", "link", "set", "u1", "up"]);
            let dp = NetlinkDatapath::connect().unwrap();
            let underlay = dp.underlay_named("u0", None).await.unwrap();
            dp.ensure_vtep(&vtep(underlay.ifindex)).await.unwrap();

            // 250 peers: 750 entries, in groups of 250.
            let want = set_of(&dp, peers(250)).await;
            assert_eq!(dp.peer_entries().await.unwrap(), want);
            assert_eq!(kernel_counts(), (250, 250, 250));

            // A stray on the tunnel and a changed MAC for 100 peers: the
            // stray goes, the neighbours and FDB entries are replaced.
            sh(&["ip", "route", "add", "10.99.0.0/24", "dev", "weft.vxlan"]);
            let mut moved = peers(250);
            for p in moved.iter_mut().take(100) {
                let o = p.vtep_mac.octets();
                p.vtep_mac = MacAddr::local_unicast([0, 0, 0, 1, o[5]]);
            }
            let want = set_of(&dp, moved).await;
            assert_eq!(dp.peer_entries().await.unwrap(), want);
            assert_eq!(kernel_counts(), (250, 250, 250));
            assert!(!sh(&["ip", "route", "show", "dev", "weft.vxlan"]).contains("10.99.0.0"));

            // Down to 40 peers: 630 entries removed in batches.
            let want = set_of(&dp, peers(40)).await;
            assert_eq!(dp.peer_entries().await.unwrap(), want);
            assert_eq!(kernel_counts(), (40, 40, 40));

            // A second pass over a kernel already in step changes nothing.
            let mut set = PeerSet::default();
            assert!(set.reset(2, peers(40), "self").is_empty());
            let again = reconcile(&dp, &set).await.unwrap();
            assert_eq!((again.added, again.removed), (0, 0));

            // Removing entries that are already gone is no error, in a batch
            // as one by one.
            let gone: Vec<Entry> = desired_entries(&peers(250)[200..])
                .into_iter()
                .filter(|e| matches!(e, Entry::Route { .. }))
                .collect();
            assert_eq!(gone.len(), 50);
            let out = dp.apply_entries(&gone, false).await;
            assert!(out.iter().all(|(_, r)| r.is_ok()), "{out:?}");

            // The device vanishing under a batch fails every entry of it
            // (and nothing else is touched); once it is back, the next
            // batch finds it again instead of using the old index.
            let fdb: Vec<Entry> = desired_entries(&peers(100)[40..])
                .into_iter()
                .filter(|e| matches!(e, Entry::Fdb { .. }))
                .collect();
            sh(&["ip", "link", "del", "weft.vxlan"]);
            let out = dp.apply_entries(&fdb, true).await;
            assert_eq!(out.len(), 60);
            assert!(out.iter().all(|(_, r)| r.is_err()), "{out:?}");
            dp.ensure_vtep(&vtep(underlay.ifindex)).await.unwrap();
            let out = dp.apply_entries(&fdb, true).await;
            assert!(out.iter().all(|(_, r)| r.is_ok()), "{out:?}");
            assert_eq!(kernel_counts().2, 60);
        });
    })
    .join()
    .expect("the test thread");
    drop(ns);
}
