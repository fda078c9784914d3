//! Address arithmetic, free of storage: how a cluster prefix splits into
//! node blocks, which addresses of a block pods may get, and the round-robin
//! choice of the next one. The store feeds it what is in use; the database's
//! unique constraints stay the final word on conflicts. The same code serves
//! both address families ([`Family`]); a dual-stack cluster is one layout per
//! family sharing block indexes ([`ClusterPrefixes`]).

use std::{collections::HashSet, fmt, hash::Hash, net::Ipv4Addr, net::Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use thiserror::Error;

/// The most node blocks a cluster may have; keeps block indexes in `i32`
/// and the free-block search cheap.
pub const MAX_BLOCKS: u32 = 1 << 16;

/// The most pod addresses one block hands out. An IPv6 node block is a /64
/// (2^64 addresses); the node uses its first offsets only, which keeps the
/// round-robin cursor and every offset in `u32` and is far above any
/// node's pod limit (kubelet's default max-pods is 110).
pub const MAX_POD_OFFSET: u32 = 65_535;

/// An address family's prefix type: what the block arithmetic needs of it.
pub trait Family: Copy + Eq + Hash + fmt::Debug + fmt::Display + Into<IpNet> {
    type Addr: Copy + Eq + Hash + Ord + fmt::Debug + fmt::Display;
    /// Address length in bits.
    const BITS: u8;
    /// The longest node prefix that still leaves room for pods.
    const LONGEST_NODE_PREFIX: u8;
    fn network_bits(&self) -> u128;
    fn prefix(&self) -> u8;
    fn truncated(&self) -> Self;
    fn has(&self, ip: &Self::Addr) -> bool;
    fn with(network: u128, prefix: u8) -> Option<Self>;
    fn addr(bits: u128) -> Self::Addr;
    fn bits(ip: Self::Addr) -> u128;
}

impl Family for Ipv4Net {
    type Addr = Ipv4Addr;
    const BITS: u8 = 32;
    const LONGEST_NODE_PREFIX: u8 = 29;
    fn network_bits(&self) -> u128 {
        u128::from(u32::from(self.network()))
    }
    fn prefix(&self) -> u8 {
        self.prefix_len()
    }
    fn truncated(&self) -> Self {
        self.trunc()
    }
    fn has(&self, ip: &Ipv4Addr) -> bool {
        self.contains(ip)
    }
    fn with(network: u128, prefix: u8) -> Option<Self> {
        let bits = u32::try_from(network).ok()?;
        Ipv4Net::new(Ipv4Addr::from(bits), prefix).ok()
    }
    fn addr(bits: u128) -> Ipv4Addr {
        // Callers pass offsets inside a block of this family, so the
        // truncation never drops set bits.
        Ipv4Addr::from(bits as u32)
    }
    fn bits(ip: Ipv4Addr) -> u128 {
        u128::from(u32::from(ip))
    }
}

impl Family for Ipv6Net {
    type Addr = Ipv6Addr;
    const BITS: u8 = 128;
    const LONGEST_NODE_PREFIX: u8 = 125;
    fn network_bits(&self) -> u128 {
        u128::from(self.network())
    }
    fn prefix(&self) -> u8 {
        self.prefix_len()
    }
    fn truncated(&self) -> Self {
        self.trunc()
    }
    fn has(&self, ip: &Ipv6Addr) -> bool {
        self.contains(ip)
    }
    fn with(network: u128, prefix: u8) -> Option<Self> {
        Ipv6Net::new(Ipv6Addr::from(network), prefix).ok()
    }
    fn addr(bits: u128) -> Ipv6Addr {
        Ipv6Addr::from(bits)
    }
    fn bits(ip: Ipv6Addr) -> u128 {
        u128::from(ip)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LayoutError {
    #[error("node prefix length /{node} is shorter than the cluster CIDR's /{cluster}")]
    PrefixShorterThanCluster { node: u8, cluster: u8 },
    #[error("node prefix length /{node} leaves no room for pods; use /{longest} or shorter")]
    PrefixTooLong { node: u8, longest: u8 },
    #[error(
        "2^{bits} node blocks of /{node} in the cluster prefix; at most {MAX_BLOCKS} are supported"
    )]
    TooManyBlocks { bits: u8, node: u8 },
}

/// How one family's cluster prefix is cut into per-node blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterLayout<N = Ipv4Net> {
    cidr: N,
    node_prefix: u8,
}

impl<N: Family> ClusterLayout<N> {
    pub fn new(cidr: N, node_prefix: u8) -> Result<Self, LayoutError> {
        let cidr = cidr.truncated();
        if node_prefix < cidr.prefix() {
            return Err(LayoutError::PrefixShorterThanCluster {
                node: node_prefix,
                cluster: cidr.prefix(),
            });
        }
        if node_prefix > N::LONGEST_NODE_PREFIX {
            return Err(LayoutError::PrefixTooLong {
                node: node_prefix,
                longest: N::LONGEST_NODE_PREFIX,
            });
        }
        let bits = node_prefix - cidr.prefix();
        if bits > MAX_BLOCKS.trailing_zeros() as u8 {
            return Err(LayoutError::TooManyBlocks {
                bits,
                node: node_prefix,
            });
        }
        Ok(Self { cidr, node_prefix })
    }

    pub fn cidr(&self) -> N {
        self.cidr
    }

    pub fn node_prefix(&self) -> u8 {
        self.node_prefix
    }

    pub fn block_count(&self) -> u32 {
        1 << (self.node_prefix - self.cidr.prefix())
    }

    /// The block with `index`, if the cluster prefix holds it.
    pub fn block(&self, index: u32) -> Option<NodeBlock<N>> {
        if index >= self.block_count() {
            return None;
        }
        let shift = N::BITS - self.node_prefix;
        let base = self.cidr.network_bits() + (u128::from(index) << shift);
        N::with(base, self.node_prefix).map(NodeBlock)
    }

    /// The lowest block index nobody holds, so blocks of deleted nodes are
    /// reused before the prefix runs out.
    pub fn first_free_block(&self, used: &HashSet<u32>) -> Option<u32> {
        (0..self.block_count()).find(|i| !used.contains(i))
    }

    /// The block a newly registering node gets: the one it held before,
    /// if that is still quarantined for it and nobody else holds it (its
    /// pods may still use those addresses), else the lowest free one.
    /// `used` holds every assigned and every quarantined block.
    pub fn block_for_new_node(&self, used: &HashSet<u32>, own_retired: Option<u32>) -> Option<u32> {
        own_retired
            .filter(|i| !used.contains(i) && self.block(*i).is_some())
            .or_else(|| self.first_free_block(used))
    }
}

/// Offset 0 of a node block: the node's VXLAN address, and the next hop
/// every other node routes the block via.
pub fn vtep_address<N: Family>(block: N) -> N::Addr {
    N::addr(block.truncated().network_bits())
}

/// One node's pod block. Offset 0 is the network address (the VXLAN
/// device's host address), offset 1 the gateway on the bridge, the last
/// offset of an IPv4 block the broadcast address; pods get everything in
/// between, at most [`MAX_POD_OFFSET`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NodeBlock<N = Ipv4Net>(N);

impl<N: Family> NodeBlock<N> {
    pub fn new(net: N) -> Self {
        Self(net.truncated())
    }

    pub fn net(&self) -> N {
        self.0
    }

    /// The node's VXLAN device holds this as a host address, and peers
    /// route the block via it.
    pub fn vtep_address(&self) -> N::Addr {
        vtep_address(self.0)
    }

    pub fn gateway(&self) -> N::Addr {
        self.address(1)
    }

    fn first_pod_offset(&self) -> u32 {
        2
    }

    fn last_pod_offset(&self) -> u32 {
        // One below the last address: IPv4's broadcast; kept out of IPv6
        // blocks too, so a /125 and a /29 hold the same five pods.
        let size_bits = N::BITS - self.0.prefix();
        let last = (1u128 << size_bits) - 2;
        u32::try_from(last).map_or(MAX_POD_OFFSET, |l| l.min(MAX_POD_OFFSET))
    }

    /// How many pod addresses the block holds.
    pub fn capacity(&self) -> u32 {
        self.last_pod_offset() + 1 - self.first_pod_offset()
    }

    pub fn address(&self, offset: u32) -> N::Addr {
        N::addr(self.0.network_bits() + u128::from(offset))
    }

    /// The offset of `ip` in the block, if it is a pod address of it.
    pub fn pod_offset(&self, ip: N::Addr) -> Option<u32> {
        if !self.0.has(&ip) {
            return None;
        }
        let offset = u32::try_from(N::bits(ip) - self.0.network_bits()).ok()?;
        (self.first_pod_offset()..=self.last_pod_offset())
            .contains(&offset)
            .then_some(offset)
    }

    /// The offset ranges to search, in order, for the next address after
    /// `last` in round-robin order, as host-local does: a just-released
    /// address is the last to come back. Inclusive bounds; empty ranges are
    /// left out.
    pub fn search_ranges(&self, last: u32) -> Vec<(u32, u32)> {
        let (first, end) = (self.first_pod_offset(), self.last_pod_offset());
        let start = if (first..end).contains(&last) {
            last + 1
        } else {
            first
        };
        let mut ranges = vec![(start, end)];
        if start > first {
            ranges.push((first, start - 1));
        }
        ranges
    }

    /// The next free offset after `last`, in round-robin order over
    /// [`Self::search_ranges`], given the offsets in use. This is the
    /// choice the store makes for every allocation.
    pub fn next_free(&self, last: u32, used: &HashSet<u32>) -> Option<u32> {
        self.search_ranges(last)
            .into_iter()
            .flat_map(|(from, to)| from..=to)
            .find(|o| !used.contains(o))
    }

    /// Up to `n` free offsets after `last`, round-robin as
    /// [`Self::next_free`]: the addresses a reserve refill grants.
    pub fn next_free_n(&self, last: u32, used: &HashSet<u32>, n: usize) -> Vec<u32> {
        self.search_ranges(last)
            .into_iter()
            .flat_map(|(from, to)| from..=to)
            .filter(|o| !used.contains(o))
            .take(n)
            .collect()
    }
}

impl<N: Family> fmt::Display for NodeBlock<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PrefixListError {
    #[error("no cluster prefix given")]
    Empty,
    #[error("{0:?} is not an IPv4 or IPv6 prefix (address/length)")]
    NotAPrefix(String),
    #[error("two IPv{0} cluster prefixes; give at most one per family")]
    SameFamilyTwice(u8),
}

/// A cluster's prefixes as `--cluster-cidr` gives them: one IPv4 and/or
/// one IPv6 prefix, comma-separated, as kube-controller-manager takes them
/// (`10.244.0.0/16,fd00:10:244::/48`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterPrefixes {
    pub v4: Option<Ipv4Net>,
    pub v6: Option<Ipv6Net>,
}

impl std::str::FromStr for ClusterPrefixes {
    type Err = PrefixListError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = Self { v4: None, v6: None };
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.parse::<IpNet>() {
                Ok(IpNet::V4(n)) if out.v4.is_none() => out.v4 = Some(n),
                Ok(IpNet::V6(n)) if out.v6.is_none() => out.v6 = Some(n),
                Ok(IpNet::V4(_)) => return Err(PrefixListError::SameFamilyTwice(4)),
                Ok(IpNet::V6(_)) => return Err(PrefixListError::SameFamilyTwice(6)),
                Err(_) => return Err(PrefixListError::NotAPrefix(part.to_owned())),
            }
        }
        if out.v4.is_none() && out.v6.is_none() {
            return Err(PrefixListError::Empty);
        }
        Ok(out)
    }
}

/// One layout per family a cluster serves. A node holds the block of the
/// same index in each, so one index is its identity in both families and
/// the cluster holds as many nodes as its smaller layout has blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DualLayout {
    pub v4: Option<ClusterLayout<Ipv4Net>>,
    pub v6: Option<ClusterLayout<Ipv6Net>>,
}

/// The blocks of one node index, one per family the cluster serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeBlocks {
    pub v4: Option<NodeBlock<Ipv4Net>>,
    pub v6: Option<NodeBlock<Ipv6Net>>,
}

impl DualLayout {
    pub fn new(
        prefixes: ClusterPrefixes,
        node_prefix_v4: u8,
        node_prefix_v6: u8,
    ) -> Result<Self, LayoutError> {
        Ok(Self {
            v4: prefixes
                .v4
                .map(|c| ClusterLayout::new(c, node_prefix_v4))
                .transpose()?,
            v6: prefixes
                .v6
                .map(|c| ClusterLayout::new(c, node_prefix_v6))
                .transpose()?,
        })
    }

    /// Blocks every family can give: the smaller layout's count.
    pub fn block_count(&self) -> u32 {
        let v4 = self.v4.map(|l| l.block_count());
        let v6 = self.v6.map(|l| l.block_count());
        match (v4, v6) {
            (Some(a), Some(b)) => a.min(b),
            (a, b) => a.or(b).unwrap_or(0),
        }
    }

    pub fn blocks(&self, index: u32) -> Option<NodeBlocks> {
        if index >= self.block_count() {
            return None;
        }
        Some(NodeBlocks {
            v4: self.v4.and_then(|l| l.block(index)),
            v6: self.v6.and_then(|l| l.block(index)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn next_free(b: &NodeBlock, last: u32, used: &HashSet<u32>) -> Option<u32> {
        b.next_free(last, used)
    }

    fn layout(cidr: &str, prefix: u8) -> ClusterLayout {
        ClusterLayout::new(cidr.parse().unwrap(), prefix).unwrap()
    }

    #[test]
    fn a_refill_grants_free_offsets_round_robin_and_wraps() {
        let b: NodeBlock = NodeBlock::new("10.244.3.0/28".parse().unwrap());
        let used: HashSet<u32> = [3, 5].into();
        // Offsets after the cursor first, then from the start of the block.
        let got = b.next_free_n(9, &used, 6);
        assert_eq!(got[..4], [10, 11, 12, 13]);
        assert!(got.iter().all(|o| !used.contains(o)));
        assert_eq!(got.len(), 6);
        // Never more than the block has free.
        let all = b.next_free_n(0, &used, 100);
        assert_eq!(all.len() as u32, b.capacity() - 2);
    }

    #[test]
    fn default_layout_has_256_blocks_of_253_pods() {
        let l = layout("10.244.0.0/16", 24);
        assert_eq!(l.block_count(), 256);
        let b = l.block(3).unwrap();
        assert_eq!(b.to_string(), "10.244.3.0/24");
        assert_eq!(b.gateway(), Ipv4Addr::new(10, 244, 3, 1));
        assert_eq!(b.capacity(), 253);
        assert_eq!(l.block(255).unwrap().to_string(), "10.244.255.0/24");
        assert_eq!(l.block(256), None);
    }

    #[test]
    fn layouts_that_cannot_work_are_rejected() {
        let cidr: Ipv4Net = "10.244.0.0/16".parse().unwrap();
        assert!(matches!(
            ClusterLayout::new(cidr, 15),
            Err(LayoutError::PrefixShorterThanCluster { .. })
        ));
        assert_eq!(
            ClusterLayout::new(cidr, 30),
            Err(LayoutError::PrefixTooLong {
                node: 30,
                longest: 29
            })
        );
        assert!(matches!(
            ClusterLayout::new("10.0.0.0/8".parse::<Ipv4Net>().unwrap(), 26),
            Err(LayoutError::TooManyBlocks { .. })
        ));
        assert!(ClusterLayout::new("10.0.0.0/8".parse::<Ipv4Net>().unwrap(), 24).is_ok());
    }

    #[test]
    fn cidr_with_host_bits_is_truncated() {
        assert_eq!(
            layout("10.244.7.9/16", 24).cidr().to_string(),
            "10.244.0.0/16"
        );
    }

    #[test]
    fn free_blocks_fill_the_lowest_hole() {
        let l = layout("10.244.0.0/16", 24);
        assert_eq!(l.first_free_block(&HashSet::new()), Some(0));
        assert_eq!(l.first_free_block(&HashSet::from([0, 1, 3])), Some(2));
        let all: HashSet<u32> = (0..256).collect();
        assert_eq!(l.first_free_block(&all), None);
    }

    #[test]
    fn a_returning_node_gets_its_quarantined_block_back_others_the_lowest_free() {
        let l = layout("10.244.0.0/16", 24);
        let used = HashSet::from([0, 1, 3]);
        assert_eq!(l.block_for_new_node(&used, None), Some(2));
        assert_eq!(l.block_for_new_node(&used, Some(7)), Some(7));
        // Taken meanwhile, or outside the layout: the lowest free instead.
        assert_eq!(l.block_for_new_node(&used, Some(3)), Some(2));
        assert_eq!(l.block_for_new_node(&used, Some(999)), Some(2));
        let all: HashSet<u32> = (0..256).collect();
        assert_eq!(l.block_for_new_node(&all, None), None);
    }

    #[test]
    fn pod_offsets_exclude_network_gateway_and_broadcast() {
        let b = layout("10.244.0.0/16", 24).block(1).unwrap();
        assert_eq!(b.pod_offset(Ipv4Addr::new(10, 244, 1, 0)), None);
        assert_eq!(b.pod_offset(Ipv4Addr::new(10, 244, 1, 1)), None);
        assert_eq!(b.pod_offset(Ipv4Addr::new(10, 244, 1, 2)), Some(2));
        assert_eq!(b.pod_offset(Ipv4Addr::new(10, 244, 1, 254)), Some(254));
        assert_eq!(b.pod_offset(Ipv4Addr::new(10, 244, 1, 255)), None);
        assert_eq!(b.pod_offset(Ipv4Addr::new(10, 244, 2, 5)), None);
    }

    #[test]
    fn round_robin_continues_after_the_last_address_and_wraps() {
        let b: NodeBlock = NodeBlock::new("10.244.0.0/29".parse().unwrap()); // pods: offsets 2..=6
        let none = HashSet::new();
        assert_eq!(next_free(&b, 0, &none), Some(2));
        assert_eq!(next_free(&b, 2, &none), Some(3));
        assert_eq!(next_free(&b, 6, &none), Some(2), "wraps after the last");
        assert_eq!(next_free(&b, 3, &HashSet::from([4, 5])), Some(6));
        assert_eq!(next_free(&b, 5, &HashSet::from([6, 2])), Some(3));
        // Released offset 3 is the last one tried again.
        assert_eq!(next_free(&b, 3, &HashSet::from([2, 4, 5, 6])), Some(3));
        assert_eq!(next_free(&b, 3, &HashSet::from([2, 3, 4, 5, 6])), None);
    }

    #[test]
    fn search_ranges_continue_after_the_cursor_then_wrap() {
        let b: NodeBlock = NodeBlock::new("10.244.0.0/29".parse().unwrap()); // offsets 2..=6
        assert_eq!(b.search_ranges(0), [(2, 6)]);
        assert_eq!(b.search_ranges(3), [(4, 6), (2, 3)]);
        assert_eq!(b.search_ranges(6), [(2, 6)], "after the last, start over");
        assert_eq!(b.search_ranges(2), [(3, 6), (2, 2)]);
    }

    #[test]
    fn a_cursor_outside_the_pod_range_starts_at_the_first_pod_address() {
        let b: NodeBlock = NodeBlock::new("10.244.0.0/29".parse().unwrap());
        assert_eq!(next_free(&b, 99, &HashSet::new()), Some(2));
        assert_eq!(b.capacity(), 5);
    }

    #[test]
    fn an_ipv6_48_splits_into_65536_node_64s_whose_pods_start_at_offset_2() {
        let l: ClusterLayout<Ipv6Net> =
            ClusterLayout::new("fd00:10:244::/48".parse().unwrap(), 64).unwrap();
        assert_eq!(l.block_count(), 65_536);
        let b = l.block(3).unwrap();
        assert_eq!(b.to_string(), "fd00:10:244:3::/64");
        assert_eq!(
            b.vtep_address(),
            "fd00:10:244:3::".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(b.gateway(), "fd00:10:244:3::1".parse::<Ipv6Addr>().unwrap());
        assert_eq!(
            b.address(2),
            "fd00:10:244:3::2".parse::<Ipv6Addr>().unwrap()
        );
        assert_eq!(
            l.block(65_535).unwrap().to_string(),
            "fd00:10:244:ffff::/64"
        );
        assert_eq!(l.block(65_536), None);
        // A /64 hands out its first offsets only: every offset fits u32.
        assert_eq!(b.capacity(), MAX_POD_OFFSET - 1);
        let last = b.address(MAX_POD_OFFSET);
        assert_eq!(b.pod_offset(last), Some(MAX_POD_OFFSET));
        assert_eq!(b.pod_offset(b.address(MAX_POD_OFFSET + 1)), None);
        assert_eq!(b.pod_offset(b.gateway()), None);
        assert_eq!(b.pod_offset("fd00:10:244:4::2".parse().unwrap()), None);
        let far: Ipv6Addr = "fd00:10:244:3:1::2".parse().unwrap();
        assert_eq!(b.pod_offset(far), None, "beyond u32 offsets, not a pod");
        // Round robin wraps at the last pod offset, as for IPv4.
        assert_eq!(b.next_free(MAX_POD_OFFSET, &HashSet::new()), Some(2));
    }

    #[test]
    fn ipv6_layouts_that_cannot_work_are_rejected() {
        let cidr: Ipv6Net = "fd00:10:244::/48".parse().unwrap();
        assert_eq!(
            ClusterLayout::new(cidr, 126),
            Err(LayoutError::PrefixTooLong {
                node: 126,
                longest: 125
            })
        );
        assert_eq!(
            ClusterLayout::new(cidr, 80),
            Err(LayoutError::TooManyBlocks { bits: 32, node: 80 })
        );
        assert!(matches!(
            ClusterLayout::new(cidr, 40),
            Err(LayoutError::PrefixShorterThanCluster { .. })
        ));
        let tiny = ClusterLayout::new("fd00::/120".parse::<Ipv6Net>().unwrap(), 125).unwrap();
        assert_eq!(tiny.block(0).unwrap().capacity(), 5, "same as an IPv4 /29");
    }

    #[test]
    fn cluster_prefixes_take_one_per_family_in_either_order() {
        let both: ClusterPrefixes = "10.244.0.0/16,fd00:10:244::/48".parse().unwrap();
        assert_eq!(both.v4, Some("10.244.0.0/16".parse().unwrap()));
        assert_eq!(both.v6, Some("fd00:10:244::/48".parse().unwrap()));
        let swapped: ClusterPrefixes = " fd00:10:244::/48 , 10.244.0.0/16".parse().unwrap();
        assert_eq!(swapped, both);
        let v6: ClusterPrefixes = "fd00:10:244::/48".parse().unwrap();
        assert_eq!((v6.v4, v6.v6.is_some()), (None, true));
        assert_eq!(
            "10.244.0.0/16,10.245.0.0/16".parse::<ClusterPrefixes>(),
            Err(PrefixListError::SameFamilyTwice(4))
        );
        assert_eq!(
            "fd00::/48,fd01::/48".parse::<ClusterPrefixes>(),
            Err(PrefixListError::SameFamilyTwice(6))
        );
        assert_eq!(
            " , ".parse::<ClusterPrefixes>(),
            Err(PrefixListError::Empty)
        );
        assert_eq!(
            "10.244.0.0".parse::<ClusterPrefixes>(),
            Err(PrefixListError::NotAPrefix("10.244.0.0".into()))
        );
    }

    #[test]
    fn a_dual_layout_gives_one_index_a_block_in_each_family_and_counts_the_smaller() {
        let l = DualLayout::new("10.244.0.0/16,fd00:10:244::/48".parse().unwrap(), 24, 64).unwrap();
        assert_eq!(l.block_count(), 256, "IPv4 /16 in /24s is the limit");
        let b = l.blocks(7).unwrap();
        assert_eq!(b.v4.unwrap().to_string(), "10.244.7.0/24");
        assert_eq!(b.v6.unwrap().to_string(), "fd00:10:244:7::/64");
        assert_eq!(l.blocks(256), None);
        let v6_only = DualLayout::new("fd00:10:244::/48".parse().unwrap(), 24, 64).unwrap();
        assert_eq!(v6_only.block_count(), 65_536);
        assert_eq!(v6_only.blocks(9).unwrap().v4, None);
        assert!(matches!(
            DualLayout::new("10.244.0.0/16,fd00::/48".parse().unwrap(), 24, 127),
            Err(LayoutError::PrefixTooLong { .. })
        ));
    }
}
