//! Names and addresses derived from identities, so every part derives
//! them the same way and no state is needed to find them again.

use crate::domain::MacAddr;

/// FNV-1a over `parts`, each followed by a NUL: stable across builds and
/// platforms, unlike std's hasher, and the NUL keeps ("ab","c") apart from
/// ("a","bc").
pub fn fnv(parts: &[&str]) -> u64 {
    parts
        .iter()
        .flat_map(|p| p.bytes().chain([0]))
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        })
}

/// A stable, locally administered unicast MAC for the node's VTEP, derived
/// from its name so a recreated device keeps the MAC peers know.
pub fn vtep_mac_for(node: &str) -> MacAddr {
    // Bytes only, no separator: the MACs of existing nodes must not change.
    let hash = node.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    let b = hash.to_be_bytes();
    MacAddr::local_unicast([b[0], b[1], b[2], b[3], b[4]])
}

/// The bridge's MAC: the VTEP's with the second octet flipped, so both are
/// stable and never equal.
pub fn bridge_mac_for(vtep: MacAddr) -> MacAddr {
    let mut o = vtep.octets();
    o[1] ^= 0xff;
    // The first octet is unchanged, so the result is unicast; only
    // 00:ff:00:00:00:00 would turn into the zero address.
    MacAddr::try_from(o).unwrap_or(MacAddr::local_unicast([0xff, 0, 0, 0, 0]))
}

/// The host end's name: deterministic from the attachment, so DEL, CHECK
/// and GC find it without state. "weft" + 11 hex digits = 15 bytes.
pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    format!(
        "weft{:011x}",
        fnv(&[container_id, ifname]) & 0xfff_ffff_ffff
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vtep_macs_are_stable_unicast_and_local() {
        let a = vtep_mac_for("node-a");
        assert_eq!(a, vtep_mac_for("node-a"));
        assert_ne!(a, vtep_mac_for("node-b"));
        assert_eq!(a.octets()[0], 0x02);
        let bridge = bridge_mac_for(a);
        assert_ne!(bridge, a);
        assert_eq!(bridge.octets()[0], 0x02);
    }

    #[test]
    fn derived_names_never_change_under_running_nodes_and_pods() {
        // Pinned: a changed derivation would orphan every host veth and
        // give every node a new VTEP MAC on upgrade.
        assert_eq!(host_ifname("abc123", "eth0"), "weftfe06905ceb2");
        assert_eq!(vtep_mac_for("node-a").to_string(), "02:e6:97:1c:c2:20");
    }

    #[test]
    fn host_ifnames_fit_ifnamsiz_and_separate_attachments() {
        let a = host_ifname("abc", "eth0");
        assert_eq!(a.len(), 15);
        assert!(a.starts_with("weft"));
        assert_eq!(a, host_ifname("abc", "eth0"));
        assert_ne!(a, host_ifname("abc", "eth1"));
        assert_ne!(host_ifname("ab", "ceth0"), host_ifname("abc", "eth0"));
    }
}
