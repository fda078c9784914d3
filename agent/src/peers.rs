//! The peer set and what it means for the kernel, as pure code: the peers
//! a node knows (built from WatchPeers snapshots and changes), the tunnel
//! entries they imply, and the plan that turns what the kernel has into
//! what it should have. Nothing here touches the kernel.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
    str::FromStr,
};

use ipnet::Ipv4Net;
use thiserror::Error;

/// An Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl FromStr for MacAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || format!("{s:?} is not a MAC address");
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let part = parts.next().filter(|p| p.len() == 2).ok_or_else(bad)?;
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Self(out))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// Another node's tunnel endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub node_name: String,
    pub underlay_ip: Ipv4Addr,
    pub vtep_mac: MacAddr,
    pub block: Ipv4Net,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("peer {node:?}: {reason}")]
pub struct BadPeer {
    pub node: String,
    pub reason: String,
}

impl Peer {
    /// Parses the wire form; a peer the agent cannot program is an error,
    /// not a silently wrong route.
    pub fn parse(
        node_name: &str,
        underlay_ip: &str,
        vtep_mac: &str,
        block: &str,
    ) -> Result<Self, BadPeer> {
        let bad = |reason: String| BadPeer {
            node: node_name.to_owned(),
            reason,
        };
        Ok(Self {
            node_name: node_name.to_owned(),
            underlay_ip: underlay_ip
                .parse()
                .map_err(|_| bad(format!("underlay_ip {underlay_ip:?} is not IPv4")))?,
            vtep_mac: vtep_mac.parse().map_err(bad)?,
            block: block
                .parse::<Ipv4Net>()
                .map(|b| b.trunc())
                .map_err(|_| bad(format!("block {block:?} is not an IPv4 CIDR")))?,
        })
    }

    /// The address the route to this peer's block goes via: the block's
    /// network address, which the peer holds as /32 on its VXLAN device.
    pub fn via(&self) -> Ipv4Addr {
        self.block.network()
    }
}

/// One kernel object on the VXLAN device that Weft owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Entry {
    /// `ip route add BLOCK via VIA dev weft.vxlan onlink`
    Route { block: Ipv4Net, via: Ipv4Addr },
    /// `ip neigh add VIA lladdr MAC dev weft.vxlan nud permanent`
    Neighbour { ip: Ipv4Addr, mac: MacAddr },
    /// `bridge fdb add MAC dev weft.vxlan dst UNDERLAY self permanent`
    Fdb { mac: MacAddr, dst: Ipv4Addr },
}

impl Entry {
    /// Order for adding: FDB before neighbour before route, so a route never
    /// points at an unresolved next hop. Removal goes the other way.
    fn layer(&self) -> u8 {
        match self {
            Entry::Fdb { .. } => 0,
            Entry::Neighbour { .. } => 1,
            Entry::Route { .. } => 2,
        }
    }

    /// Routes (by destination) and neighbours (by IP) that the kernel
    /// replaces in place; FDB entries are keyed by MAC and destination
    /// together and are always removed and added.
    fn replace_key(&self) -> Option<(Ipv4Addr, u8)> {
        match *self {
            Entry::Route { block, .. } => Some((block.network(), block.prefix_len())),
            Entry::Neighbour { ip, .. } => Some((ip, 33)),
            Entry::Fdb { .. } => None,
        }
    }
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Entry::Route { block, via } if via.is_unspecified() => {
                write!(f, "route {block} direct")
            }
            Entry::Route { block, via } => write!(f, "route {block} via {via} onlink"),
            Entry::Neighbour { ip, mac } => write!(f, "neighbour {ip} lladdr {mac}"),
            Entry::Fdb { mac, dst } => write!(f, "fdb {mac} dst {dst}"),
        }
    }
}

/// Everything the peer set implies for the kernel.
pub fn desired_entries<'a>(peers: impl IntoIterator<Item = &'a Peer>) -> BTreeSet<Entry> {
    let mut out = BTreeSet::new();
    for p in peers {
        out.insert(Entry::Route {
            block: p.block,
            via: p.via(),
        });
        out.insert(Entry::Neighbour {
            ip: p.via(),
            mac: p.vtep_mac,
        });
        out.insert(Entry::Fdb {
            mac: p.vtep_mac,
            dst: p.underlay_ip,
        });
    }
    out
}

/// What to remove and add, each in the order it must be applied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub remove: Vec<Entry>,
    pub add: Vec<Entry>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.add.is_empty()
    }
}

/// The changes that turn `current` into `desired`. Removals run first (a
/// changed neighbour is removed under its old MAC before the new one is
/// added), routes before neighbours before FDB entries; additions run in
/// the opposite order. Entries already right are left alone, so a
/// reconcile of a converged node changes nothing.
pub fn plan(current: &BTreeSet<Entry>, desired: &BTreeSet<Entry>) -> Plan {
    let mut remove: Vec<Entry> = current.difference(desired).copied().collect();
    let mut add: Vec<Entry> = desired.difference(current).copied().collect();
    remove.sort_by_key(|e| (std::cmp::Reverse(e.layer()), *e));
    add.sort_by_key(|e| (e.layer(), *e));
    // A route whose next hop changed is replaced, not removed: removing it
    // would blackhole the block for a moment. The same holds for a
    // neighbour whose MAC changed. Drop such removals; the add replaces.
    let replaced: BTreeSet<(Ipv4Addr, u8)> = add.iter().filter_map(Entry::replace_key).collect();
    remove.retain(|e| e.replace_key().is_none_or(|k| !replaced.contains(&k)));
    Plan { remove, add }
}

/// The peers a node knows, keyed by node name, with the revision they are
/// current at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerSet {
    peers: BTreeMap<String, Peer>,
    revision: u64,
}

impl PeerSet {
    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn len(&self) -> usize {
        self.peers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.peers.is_empty()
    }

    pub fn peers(&self) -> impl Iterator<Item = &Peer> {
        self.peers.values()
    }

    /// Replaces everything with a snapshot; `own` is never kept.
    pub fn reset(&mut self, revision: u64, peers: Vec<Peer>, own: &str) {
        self.peers = peers
            .into_iter()
            .filter(|p| p.node_name != own)
            .map(|p| (p.node_name.clone(), p))
            .collect();
        self.revision = revision;
    }

    pub fn upsert(&mut self, revision: u64, peer: Peer, own: &str) {
        if peer.node_name != own {
            self.peers.insert(peer.node_name.clone(), peer);
        }
        self.revision = revision;
    }

    pub fn remove(&mut self, revision: u64, node_name: &str) {
        self.peers.remove(node_name);
        self.revision = revision;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(name: &str, n: u8, mac: u8) -> Peer {
        Peer::parse(
            name,
            &format!("198.51.100.{n}"),
            &format!("02:00:00:00:00:{mac:02x}"),
            &format!("10.244.{n}.0/24"),
        )
        .unwrap()
    }

    fn entries(peers: &[Peer]) -> BTreeSet<Entry> {
        desired_entries(peers)
    }

    #[test]
    fn each_peer_implies_a_route_a_neighbour_and_an_fdb_entry() {
        let p = peer("b", 2, 0xb);
        let e: Vec<String> = entries(&[p]).iter().map(ToString::to_string).collect();
        assert_eq!(
            e,
            [
                "route 10.244.2.0/24 via 10.244.2.0 onlink",
                "neighbour 10.244.2.0 lladdr 02:00:00:00:00:0b",
                "fdb 02:00:00:00:00:0b dst 198.51.100.2",
            ]
        );
    }

    #[test]
    fn adding_a_peer_adds_fdb_then_neighbour_then_route() {
        let current = entries(&[peer("b", 2, 2)]);
        let desired = entries(&[peer("b", 2, 2), peer("c", 3, 3)]);
        let p = plan(&current, &desired);
        assert!(p.remove.is_empty());
        let kinds: Vec<u8> = p.add.iter().map(Entry::layer).collect();
        assert_eq!(kinds, [0, 1, 2]);
        assert!(p.add.iter().all(
            |e| e.to_string().contains("10.244.3.0") || e.to_string().contains("198.51.100.3")
        ));
    }

    #[test]
    fn removing_a_peer_removes_route_then_neighbour_then_fdb() {
        let current = entries(&[peer("b", 2, 2), peer("c", 3, 3)]);
        let desired = entries(&[peer("b", 2, 2)]);
        let p = plan(&current, &desired);
        assert!(p.add.is_empty());
        let kinds: Vec<u8> = p.remove.iter().map(Entry::layer).collect();
        assert_eq!(kinds, [2, 1, 0]);
    }

    #[test]
    fn a_changed_mac_replaces_neighbour_and_fdb_but_keeps_the_route() {
        let current = entries(&[peer("b", 2, 2)]);
        let desired = entries(&[peer("b", 2, 0x22)]);
        let p = plan(&current, &desired);
        assert_eq!(
            p.remove,
            [Entry::Fdb {
                mac: "02:00:00:00:00:02".parse().unwrap(),
                dst: "198.51.100.2".parse().unwrap()
            }],
            "the old neighbour is replaced in place, the old FDB entry removed"
        );
        assert_eq!(p.add.len(), 2);
        assert!(matches!(p.add[0], Entry::Fdb { .. }));
        assert!(matches!(p.add[1], Entry::Neighbour { .. }));
    }

    #[test]
    fn a_changed_underlay_replaces_only_the_fdb_entry() {
        let current = entries(&[peer("b", 2, 2)]);
        let mut moved = peer("b", 2, 2);
        moved.underlay_ip = "198.51.100.99".parse().unwrap();
        let p = plan(&current, &entries(&[moved]));
        assert_eq!(p.remove.len(), 1);
        assert_eq!(p.add.len(), 1);
        assert!(p.remove[0].to_string().ends_with("198.51.100.2"));
        assert!(p.add[0].to_string().ends_with("198.51.100.99"));
    }

    #[test]
    fn a_snapshot_resync_removes_strays_and_keeps_the_rest() {
        let mut current = entries(&[peer("b", 2, 2), peer("gone", 9, 9)]);
        current.insert(Entry::Route {
            block: "10.244.77.0/24".parse().unwrap(),
            via: "10.244.77.0".parse().unwrap(),
        });
        let desired = entries(&[peer("b", 2, 2)]);
        let p = plan(&current, &desired);
        assert!(p.add.is_empty());
        assert_eq!(p.remove.len(), 4, "{:?}", p.remove);
        assert!(p.remove.iter().all(|e| !desired.contains(e)));
    }

    #[test]
    fn a_converged_node_has_an_empty_plan() {
        let e = entries(&[peer("b", 2, 2), peer("c", 3, 3)]);
        assert!(plan(&e, &e).is_empty());
    }

    #[test]
    fn the_peer_set_follows_snapshots_and_changes_and_skips_itself() {
        let mut set = PeerSet::default();
        set.reset(5, vec![peer("a", 1, 1), peer("b", 2, 2)], "a");
        assert_eq!(set.len(), 1);
        set.upsert(6, peer("c", 3, 3), "a");
        set.upsert(7, peer("a", 1, 0x11), "a");
        set.upsert(8, peer("b", 2, 0x22), "a");
        set.remove(9, "c");
        assert_eq!(set.revision(), 9);
        let names: Vec<&str> = set.peers().map(|p| p.node_name.as_str()).collect();
        assert_eq!(names, ["b"]);
        assert_eq!(
            set.peers().next().unwrap().vtep_mac.to_string(),
            "02:00:00:00:00:22"
        );
    }

    #[test]
    fn malformed_peers_are_rejected() {
        assert!(Peer::parse("x", "198.51.100.1", "02:00:00:00:00:01", "10.244.1.0/24").is_ok());
        assert!(Peer::parse("x", "nope", "02:00:00:00:00:01", "10.244.1.0/24").is_err());
        assert!(Peer::parse("x", "198.51.100.1", "02:00:00:00:00", "10.244.1.0/24").is_err());
        assert!(Peer::parse("x", "198.51.100.1", "02:00:00:00:00:01", "10.244.1.0").is_err());
    }
}
