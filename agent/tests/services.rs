//! Kubernetes Services over Weft: the rules kube-proxy installs in its
//! nftables mode (a `services` verdict map, per-service and per-endpoint
//! chains, DNAT, the hairpin mark and masquerade) and in its iptables mode
//! (KUBE-SERVICES, KUBE-SVC-*, KUBE-SEP-*), written into a node namespace
//! by hand, with real pods wired by the real plugin and agent. Needs root.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use weft_testbed::cluster::*;

/// Answers every connection on port 8080 with the pod's name.
fn serve_name(c: &Cluster, pod: &str) -> KillOnDrop {
    answer_on(&c.pod_ns_name(pod), 8080, pod)
}

/// The first line a TCP connection from pod `from` to `ip:port` reads.
fn fetch(c: &Cluster, from: &str, ip: &str, port: u16) -> String {
    let out = Command::new("timeout")
        .args([
            "3",
            "ip",
            "netns",
            "exec",
            &c.pod_ns_name(from),
            "bash",
            "-c",
        ])
        .arg(format!("exec 3<>/dev/tcp/{ip}/{port} && head -n1 <&3"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// kube-proxy's nftables-mode rules (pkg/proxy/nftables, reduced to what a
/// ClusterIP with one endpoint needs), one service per `(vip, endpoint)`.
fn kube_proxy_rules(services: &[(&str, &str)]) -> String {
    let mut chains = String::new();
    let mut elements = Vec::new();
    for (i, (vip, endpoint)) in services.iter().enumerate() {
        elements.push(format!("{vip} . tcp . 80 : goto service-{i}"));
        chains.push_str(&format!(
            "chain service-{i} {{
  ip daddr {vip} tcp dport 80 ip saddr != 10.244.0.0/16 jump mark-for-masquerade
  numgen random mod 1 vmap {{ 0 : goto endpoint-{i} }}
}}
chain endpoint-{i} {{
  ip saddr {endpoint} jump mark-for-masquerade
  meta l4proto tcp dnat to {endpoint}:8080
}}
"
        ));
    }
    format!(
        "table ip kube-proxy {{
map service-ips {{
  type ipv4_addr . inet_proto . inet_service : verdict
  elements = {{ {} }}
}}
chain mark-for-masquerade {{
  meta mark set meta mark | 0x4000
}}
chain masquerading {{
  meta mark & 0x4000 == 0 return
  meta mark set meta mark ^ 0x4000
  masquerade fully-random
}}
chain services {{
  ip daddr . meta l4proto . th dport vmap @service-ips
}}
chain nat-prerouting {{
  type nat hook prerouting priority dstnat; policy accept;
  jump services
}}
chain nat-output {{
  type nat hook output priority -100; policy accept;
  jump services
}}
chain nat-postrouting {{
  type nat hook postrouting priority srcnat; policy accept;
  jump masquerading
}}
{chains}}}
",
        elements.join(", ")
    )
}

fn bridge_nf(c: &Cluster, node: usize) -> String {
    let out = in_ns(
        &c.nodes[node],
        &["cat", "/proc/sys/net/bridge/bridge-nf-call-iptables"],
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn set_bridge_nf(c: &Cluster, node: usize, value: &str) {
    in_ns(
        &c.nodes[node],
        &[
            "sysctl",
            "-qw",
            &format!("net.bridge.bridge-nf-call-iptables={value}"),
        ],
    );
}

fn eventually(what: &str, mut ok: impl FnMut() -> String, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = ok();
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: got {got:?}, want {want:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// kube-proxy's iptables-mode rules (pkg/proxy/iptables: KUBE-SERVICES,
/// KUBE-SVC-*, KUBE-SEP-*, KUBE-MARK-MASQ, KUBE-POSTROUTING), for the same
/// services, as `iptables-restore` input.
fn kube_proxy_iptables_rules(services: &[(&str, &str)]) -> String {
    let mut chains = String::new();
    let mut rules = String::new();
    for (i, (vip, endpoint)) in services.iter().enumerate() {
        chains.push_str(&format!(":KUBE-SVC-{i} - [0:0]\n:KUBE-SEP-{i} - [0:0]\n"));
        rules.push_str(&format!(
            "-A KUBE-SERVICES -d {vip}/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-{i}
-A KUBE-SVC-{i} ! -s 10.244.0.0/16 -d {vip}/32 -p tcp -m tcp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SVC-{i} -j KUBE-SEP-{i}
-A KUBE-SEP-{i} -s {endpoint}/32 -j KUBE-MARK-MASQ
-A KUBE-SEP-{i} -p tcp -m tcp -j DNAT --to-destination {endpoint}:8080
"
        ));
    }
    format!(
        "*nat
:KUBE-SERVICES - [0:0]
:KUBE-MARK-MASQ - [0:0]
:KUBE-POSTROUTING - [0:0]
{chains}-A PREROUTING -j KUBE-SERVICES
-A OUTPUT -j KUBE-SERVICES
-A POSTROUTING -j KUBE-POSTROUTING
-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0
-A KUBE-POSTROUTING -j MASQUERADE --random-fully
{rules}COMMIT
"
    )
}

/// The rules of one kube-proxy mode for `(vip, endpoint)` services,
/// installed into node namespace `ns`.
type Install = fn(&str, &[(&str, &str)]);

#[test]
fn cluster_ips_of_kube_proxys_nftables_mode_reach_the_same_node_another_node_and_the_client() {
    services_over_weft(|ns, services| {
        in_ns_with_stdin(ns, &["nft", "-f", "-"], &kube_proxy_rules(services));
    });
}

#[test]
fn cluster_ips_of_kube_proxys_iptables_mode_reach_the_same_node_another_node_and_the_client() {
    services_over_weft(|ns, services| {
        in_ns_with_stdin(
            ns,
            &["iptables-restore", "--noflush"],
            &kube_proxy_iptables_rules(services),
        );
    });
}

fn services_over_weft(install: Install) {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new(2);
    // A node whose bridged traffic bypasses netfilter, as a fresh machine
    // without br_netfilter loaded has it: the agent must turn it on.
    set_bridge_nf(&c, 0, "0");
    c.start_agent(0);
    c.start_agent(1);
    assert_eq!(
        bridge_nf(&c, 0),
        "1",
        "the agent turns bridge-nf-call-iptables on"
    );

    let client = c.add_pod(0, "client").0;
    let same = c.add_pod(0, "same").0;
    let other = c.add_pod(1, "other").0;
    let _servers = [
        serve_name(&c, "client"),
        serve_name(&c, "same"),
        serve_name(&c, "other"),
    ];
    for (pod, ip) in [("client", &client), ("same", &same), ("other", &other)] {
        eventually(
            &format!("{pod} serving"),
            || fetch(&c, "client", ip, 8080),
            pod,
        );
    }
    install(
        &c.nodes[0],
        &[
            ("10.96.0.10", &same),
            ("10.96.0.11", &other),
            ("10.96.0.12", &client),
        ],
    );

    // Same node: the reply is bridged straight back, so only conntrack on
    // the bridge (br_netfilter) turns its source back into the VIP.
    assert_eq!(
        fetch(&c, "client", "10.96.0.10", 80),
        "same",
        "ClusterIP → pod on the same node"
    );
    assert_eq!(
        fetch(&c, "client", "10.96.0.11", 80),
        "other",
        "ClusterIP → pod on another node"
    );
    // Hairpin: DNAT back to the client itself, out of the port it came in
    // by (hairpin on its veth), masqueraded by kube-proxy's mark.
    assert_eq!(
        fetch(&c, "client", "10.96.0.12", 80),
        "client",
        "a pod through its own Service"
    );

    // What makes the same-node case work is the switch the agent set: off,
    // it fails; an agent restart puts it back.
    set_bridge_nf(&c, 0, "0");
    assert_eq!(
        fetch(&c, "client", "10.96.0.10", 80),
        "",
        "with bridged traffic past netfilter"
    );
    c.stop_agent(0);
    c.start_agent(0);
    assert_eq!(bridge_nf(&c, 0), "1");
    eventually(
        "ClusterIP → same node after the restart",
        || fetch(&c, "client", "10.96.0.10", 80),
        "same",
    );
}
