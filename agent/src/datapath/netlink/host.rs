//! Host settings outside the links: IPv4 forwarding and bridged traffic
//! through netfilter (procfs), and the masquerade rule (the `nft` binary,
//! one atomic transaction: there is no nftables netlink support in the
//! dependency set).

use std::process::Stdio;

use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

use crate::datapath::{DatapathError, MasqueradeSpec, Result};

use super::*;

pub(super) fn masquerade_rule(spec: &MasqueradeSpec) -> String {
    format!(
        "ip saddr {} ip daddr != {} masquerade",
        spec.block, spec.cluster
    )
}

/// Writes 1 to the procfs switch `path` unless it is on already; `what`
/// is logged when it was off.
async fn switch_on(path: &str, what: &str) -> Result<()> {
    let now = tokio::fs::read_to_string(path)
        .await
        .map_err(DatapathError::io(format!("reading {path}")))?;
    if now.trim() != "1" {
        info!("{what}");
        tokio::fs::write(path, "1\n")
            .await
            .map_err(DatapathError::io(format!("writing {path}")))?;
    }
    Ok(())
}

impl NetlinkDatapath {
    pub(super) async fn set_forwarding(&self) -> Result<()> {
        switch_on("/proc/sys/net/ipv4/ip_forward", "enabling IPv4 forwarding").await?;
        self.set_bridge_netfilter().await
    }

    /// Bridged IPv4 traffic through the netfilter hooks (br_netfilter), so
    /// conntrack sees both directions of a Service connection between two
    /// pods on `weft0`: without it, the DNAT'd request is routed but the
    /// reply is bridged straight back with the endpoint's address, and the
    /// client drops it. The switch is per network namespace; the module
    /// is loaded first where it is one.
    async fn set_bridge_netfilter(&self) -> Result<()> {
        const PATH: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";
        if !std::path::Path::new(PATH).exists() {
            info!("loading br_netfilter");
            let loaded = tokio::process::Command::new("modprobe")
                .arg("br_netfilter")
                .stdin(Stdio::null())
                .status()
                .await;
            if !std::path::Path::new(PATH).exists() {
                warn!(
                    ?loaded,
                    "br_netfilter is not available: Services between pods on the same node will not answer (kube-proxy needs it too)"
                );
                return Ok(());
            }
        }
        switch_on(
            PATH,
            "passing bridged traffic through netfilter (bridge-nf-call-iptables)",
        )
        .await
    }

    pub(super) async fn set_masquerade(&self, spec: &MasqueradeSpec) -> Result<()> {
        let rule = masquerade_rule(spec);
        let listed = tokio::process::Command::new("nft")
            .args(["list", "table", "ip", NFT_TABLE])
            .stdin(Stdio::null())
            .output()
            .await
            .map_err(DatapathError::io(
                "running nft (is the nftables package installed?)",
            ))?;
        let text = String::from_utf8_lossy(&listed.stdout);
        let rules: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| l.contains("masquerade"))
            .collect();
        if listed.status.success() && rules == [rule.as_str()] {
            return Ok(());
        }
        info!(%rule, "installing masquerade rule");
        // One nft transaction: create-if-missing, flush by deleting, then
        // define, so the rule is replaced atomically.
        let script = format!(
            "table ip {NFT_TABLE}\ndelete table ip {NFT_TABLE}\n\
             table ip {NFT_TABLE} {{\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n    {rule}\n  }}\n}}\n"
        );
        let mut child = tokio::process::Command::new("nft")
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(DatapathError::io("running nft"))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(script.as_bytes())
                .await
                .map_err(DatapathError::io("writing to nft"))?;
        }
        let out = child
            .wait_with_output()
            .await
            .map_err(DatapathError::io("waiting for nft"))?;
        if !out.status.success() {
            return Err(DatapathError::Other(format!(
                "nft rejected the masquerade table: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_masquerade_rule_excludes_the_cluster() {
        let spec = MasqueradeSpec {
            block: "10.244.3.0/24".parse().unwrap(),
            cluster: "10.244.0.0/16".parse().unwrap(),
        };
        assert_eq!(
            masquerade_rule(&spec),
            "ip saddr 10.244.3.0/24 ip daddr != 10.244.0.0/16 masquerade"
        );
    }
}
