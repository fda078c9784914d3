//! The peer set and what it means for the kernel, as pure code: the peers
//! a node knows (built from WatchPeers snapshots and changes), the tunnel
//! entries they imply, and the plan that turns what the kernel has into
//! what it should have. Nothing here touches the kernel.
//! (Over 400 lines because the second half is its table-driven tests.)

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::Ipv4Addr,
};

use ipnet::Ipv4Net;
use thiserror::Error;

pub use weft_core::domain::MacAddr;

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
            vtep_mac: vtep_mac
                .parse()
                .map_err(|e: String| bad(format!("vtep_mac: {e}")))?,
            block: block
                .parse::<Ipv4Net>()
                .map(|b| b.trunc())
                .map_err(|_| bad(format!("block {block:?} is not an IPv4 CIDR")))?,
        })
    }

    /// The address the route to this peer's block goes via: the block's
    /// network address, which the peer holds as /32 on its VXLAN device.
    pub fn via(&self) -> Ipv4Addr {
        weft_core::ipam::vtep_address(self.block)
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
/// current at. A peer that claims another peer's VTEP MAC or underlay
/// address, or a block overlapping another's or this node's own, is refused:
/// programming it would point the other node's FDB entry (or this node's
/// own `weft0` route) at the claimant. The peer that held the claim first
/// keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerSet {
    peers: BTreeMap<String, Peer>,
    by_mac: BTreeMap<MacAddr, String>,
    by_underlay: BTreeMap<Ipv4Addr, String>,
    /// Block network address → (block, node).
    by_block: BTreeMap<Ipv4Addr, (Ipv4Net, String)>,
    own_block: Option<Ipv4Net>,
    revision: u64,
}

fn overlaps(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

impl PeerSet {
    /// A set for a node whose own pod block is `block`.
    pub fn with_own_block(block: Ipv4Net) -> Self {
        Self {
            own_block: Some(block.trunc()),
            ..Self::default()
        }
    }

    /// Why `peer` may not join the set as it is, if it may not.
    fn conflict(&self, peer: &Peer) -> Option<String> {
        if let Some(own) = self.own_block
            && overlaps(&own, &peer.block)
        {
            return Some(format!(
                "its block {} overlaps this node's own block {own}",
                peer.block
            ));
        }
        if let Some(holder) = self.by_mac.get(&peer.vtep_mac) {
            return Some(format!(
                "VTEP MAC {} belongs to node {holder}",
                peer.vtep_mac
            ));
        }
        if let Some(holder) = self.by_underlay.get(&peer.underlay_ip) {
            return Some(format!(
                "underlay address {} belongs to node {holder}",
                peer.underlay_ip
            ));
        }
        let below = self.by_block.range(..=peer.block.network()).next_back();
        let inside = self
            .by_block
            .range(peer.block.network()..=peer.block.broadcast())
            .next();
        for (_, (block, holder)) in below.into_iter().chain(inside) {
            if overlaps(block, &peer.block) {
                return Some(format!(
                    "its block {} overlaps node {holder}'s block {block}",
                    peer.block
                ));
            }
        }
        None
    }

    fn insert(&mut self, peer: Peer) -> Result<(), BadPeer> {
        if let Some(reason) = self.conflict(&peer) {
            return Err(BadPeer {
                node: peer.node_name,
                reason: format!("refused: {reason}"),
            });
        }
        self.by_mac.insert(peer.vtep_mac, peer.node_name.clone());
        self.by_underlay
            .insert(peer.underlay_ip, peer.node_name.clone());
        self.by_block
            .insert(peer.block.network(), (peer.block, peer.node_name.clone()));
        self.peers.insert(peer.node_name.clone(), peer);
        Ok(())
    }

    fn take(&mut self, node_name: &str) -> Option<Peer> {
        let peer = self.peers.remove(node_name)?;
        self.by_mac.remove(&peer.vtep_mac);
        self.by_underlay.remove(&peer.underlay_ip);
        self.by_block.remove(&peer.block.network());
        Some(peer)
    }

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

    pub fn get(&self, node_name: &str) -> Option<&Peer> {
        self.peers.get(node_name)
    }

    /// Replaces everything with a snapshot; `own` is never kept. Peers
    /// known before with the same endpoint go first, so an incumbent keeps
    /// its claim against a newcomer; the refused are returned.
    pub fn reset(&mut self, revision: u64, peers: Vec<Peer>, own: &str) -> Vec<BadPeer> {
        let old = std::mem::take(&mut self.peers);
        *self = Self {
            own_block: self.own_block,
            ..Self::default()
        };
        let (incumbents, newcomers): (Vec<Peer>, Vec<Peer>) = peers
            .into_iter()
            .filter(|p| p.node_name != own)
            .partition(|p| old.get(&p.node_name) == Some(p));
        let refused = incumbents
            .into_iter()
            .chain(newcomers)
            .filter_map(|p| self.insert(p).err())
            .collect();
        self.revision = revision;
        refused
    }

    /// Adds or changes a peer. A refused change withdraws the peer
    /// altogether: better no tunnel to it than a wrong one.
    pub fn upsert(&mut self, revision: u64, peer: Peer, own: &str) -> Result<(), BadPeer> {
        self.revision = revision;
        if peer.node_name == own {
            return Ok(());
        }
        self.take(&peer.node_name);
        self.insert(peer)
    }

    pub fn remove(&mut self, revision: u64, node_name: &str) {
        self.take(node_name);
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
        assert!(
            set.reset(5, vec![peer("a", 1, 1), peer("b", 2, 2)], "a")
                .is_empty()
        );
        assert_eq!(set.len(), 1);
        set.upsert(6, peer("c", 3, 3), "a").unwrap();
        set.upsert(7, peer("a", 1, 0x11), "a").unwrap();
        set.upsert(8, peer("b", 2, 0x22), "a").unwrap();
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
    fn a_second_claim_on_a_mac_underlay_or_block_is_refused_and_the_first_kept() {
        let mut set = PeerSet::with_own_block("10.244.9.0/24".parse().unwrap());
        set.upsert(1, peer("b", 2, 2), "me").unwrap();
        // c claims b's MAC, then b's underlay address, then b's block.
        let mut mac_thief = peer("c", 3, 2);
        let err = set.upsert(2, mac_thief.clone(), "me").unwrap_err();
        assert!(
            err.reason
                .contains("VTEP MAC 02:00:00:00:00:02 belongs to node b"),
            "{err}"
        );
        mac_thief.vtep_mac = "02:00:00:00:00:03".parse().unwrap();
        mac_thief.underlay_ip = "198.51.100.2".parse().unwrap();
        assert!(
            set.upsert(3, mac_thief, "me")
                .unwrap_err()
                .reason
                .contains("underlay")
        );
        let mut block_thief = peer("c", 3, 3);
        block_thief.block = "10.244.2.128/25".parse().unwrap();
        assert!(
            set.upsert(4, block_thief, "me")
                .unwrap_err()
                .reason
                .contains("overlaps node b")
        );
        // A peer with this node's own block would replace the weft0 route.
        let own = Peer::parse("d", "198.51.100.4", "02:00:00:00:00:04", "10.244.9.0/24").unwrap();
        assert!(
            set.upsert(5, own, "me")
                .unwrap_err()
                .reason
                .contains("own block")
        );
        let names: Vec<&str> = set.peers().map(|p| p.node_name.as_str()).collect();
        assert_eq!(names, ["b"]);
        let e: Vec<String> = desired_entries(set.peers())
            .iter()
            .map(ToString::to_string)
            .collect();
        assert!(
            e.iter()
                .all(|e| !e.contains("198.51.100.3") && !e.contains("10.244.9."))
        );
        // A legitimate peer still joins, and b may move its own endpoint.
        set.upsert(6, peer("c", 3, 3), "me").unwrap();
        set.upsert(7, peer("b", 2, 0x22), "me").unwrap();
        assert_eq!(set.len(), 2);
        assert_eq!(set.revision(), 7);
    }

    #[test]
    fn a_snapshot_keeps_the_incumbent_against_a_newcomer_with_its_mac() {
        let mut set = PeerSet::default();
        set.upsert(1, peer("z", 2, 2), "me").unwrap();
        // "a" sorts first, but "z" held the MAC before the snapshot.
        let refused = set.reset(5, vec![peer("a", 3, 2), peer("z", 2, 2)], "me");
        assert_eq!(refused.len(), 1);
        assert_eq!(refused[0].node, "a");
        let names: Vec<&str> = set.peers().map(|p| p.node_name.as_str()).collect();
        assert_eq!(names, ["z"]);
    }

    #[test]
    fn malformed_peers_are_rejected() {
        assert!(Peer::parse("x", "198.51.100.1", "02:00:00:00:00:01", "10.244.1.0/24").is_ok());
        assert!(Peer::parse("x", "nope", "02:00:00:00:00:01", "10.244.1.0/24").is_err());
        assert!(Peer::parse("x", "198.51.100.1", "02:00:00:00:00", "10.244.1.0/24").is_err());
        assert!(Peer::parse("x", "198.51.100.1", "02:00:00:00:00:01", "10.244.1.0").is_err());
    }
}
