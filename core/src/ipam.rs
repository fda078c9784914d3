//! Address arithmetic, free of storage: how the cluster CIDR splits into node
//! blocks, which addresses of a block pods may get, and the round-robin
//! choice of the next one. The store feeds it what is in use; the database's
//! unique constraints stay the final word on conflicts.

use std::{collections::HashSet, fmt, net::Ipv4Addr};

use ipnet::Ipv4Net;
use thiserror::Error;

/// The most node blocks a cluster may have; keeps block indexes in `i32`
/// and the free-block search cheap.
pub const MAX_BLOCKS: u32 = 1 << 16;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LayoutError {
    #[error("node prefix length /{node} is shorter than the cluster CIDR's /{cluster}")]
    PrefixShorterThanCluster { node: u8, cluster: u8 },
    #[error("node prefix length /{0} leaves no room for pods; use /29 or shorter")]
    PrefixTooLong(u8),
    #[error(
        "{blocks} node blocks of /{node} in the cluster CIDR; at most {MAX_BLOCKS} are supported"
    )]
    TooManyBlocks { blocks: u64, node: u8 },
}

/// How the cluster CIDR is cut into per-node blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClusterLayout {
    cidr: Ipv4Net,
    node_prefix: u8,
}

impl ClusterLayout {
    pub fn new(cidr: Ipv4Net, node_prefix: u8) -> Result<Self, LayoutError> {
        let cidr = cidr.trunc();
        if node_prefix < cidr.prefix_len() {
            return Err(LayoutError::PrefixShorterThanCluster {
                node: node_prefix,
                cluster: cidr.prefix_len(),
            });
        }
        if node_prefix > 29 {
            return Err(LayoutError::PrefixTooLong(node_prefix));
        }
        let blocks = 1u64 << (node_prefix - cidr.prefix_len());
        if blocks > u64::from(MAX_BLOCKS) {
            return Err(LayoutError::TooManyBlocks {
                blocks,
                node: node_prefix,
            });
        }
        Ok(Self { cidr, node_prefix })
    }

    pub fn cidr(&self) -> Ipv4Net {
        self.cidr
    }

    pub fn node_prefix(&self) -> u8 {
        self.node_prefix
    }

    pub fn block_count(&self) -> u32 {
        1 << (self.node_prefix - self.cidr.prefix_len())
    }

    /// The block with `index`, if the cluster CIDR holds it.
    pub fn block(&self, index: u32) -> Option<NodeBlock> {
        if index >= self.block_count() {
            return None;
        }
        let size = 1u32 << (32 - self.node_prefix);
        let base = u32::from(self.cidr.network()) + index * size;
        Ipv4Net::new(Ipv4Addr::from(base), self.node_prefix)
            .ok()
            .map(NodeBlock)
    }

    /// The lowest block index nobody holds, so blocks of deleted nodes are
    /// reused before the CIDR runs out.
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
pub fn vtep_address(block: Ipv4Net) -> Ipv4Addr {
    block.network()
}

/// One node's pod block. Offset 0 is the network address (the VXLAN
/// device's /32), offset 1 the gateway on the bridge, the last offset the
/// broadcast address; pods get everything in between.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NodeBlock(Ipv4Net);

impl NodeBlock {
    pub fn new(net: Ipv4Net) -> Self {
        Self(net.trunc())
    }

    pub fn net(&self) -> Ipv4Net {
        self.0
    }

    /// The node's VXLAN device holds this as /32, and peers route the
    /// block via it.
    pub fn vtep_address(&self) -> Ipv4Addr {
        vtep_address(self.0)
    }

    pub fn gateway(&self) -> Ipv4Addr {
        self.address(1)
    }

    fn size(&self) -> u32 {
        1u32 << (32 - self.0.prefix_len())
    }

    fn first_pod_offset(&self) -> u32 {
        2
    }

    fn last_pod_offset(&self) -> u32 {
        self.size() - 2
    }

    /// How many pod addresses the block holds.
    pub fn capacity(&self) -> u32 {
        self.last_pod_offset() + 1 - self.first_pod_offset()
    }

    pub fn address(&self, offset: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.0.network()) + offset)
    }

    /// The offset of `ip` in the block, if it is a pod address of it.
    pub fn pod_offset(&self, ip: Ipv4Addr) -> Option<u32> {
        if !self.0.contains(&ip) {
            return None;
        }
        let offset = u32::from(ip) - u32::from(self.0.network());
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

impl fmt::Display for NodeBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
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
        let b = NodeBlock::new("10.244.3.0/28".parse().unwrap());
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
        let cidr = "10.244.0.0/16".parse().unwrap();
        assert!(matches!(
            ClusterLayout::new(cidr, 15),
            Err(LayoutError::PrefixShorterThanCluster { .. })
        ));
        assert_eq!(
            ClusterLayout::new(cidr, 30),
            Err(LayoutError::PrefixTooLong(30))
        );
        assert!(matches!(
            ClusterLayout::new("10.0.0.0/8".parse().unwrap(), 26),
            Err(LayoutError::TooManyBlocks { .. })
        ));
        assert!(ClusterLayout::new("10.0.0.0/8".parse().unwrap(), 24).is_ok());
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
        let b = NodeBlock::new("10.244.0.0/29".parse().unwrap()); // pods: offsets 2..=6
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
        let b = NodeBlock::new("10.244.0.0/29".parse().unwrap()); // offsets 2..=6
        assert_eq!(b.search_ranges(0), [(2, 6)]);
        assert_eq!(b.search_ranges(3), [(4, 6), (2, 3)]);
        assert_eq!(b.search_ranges(6), [(2, 6)], "after the last, start over");
        assert_eq!(b.search_ranges(2), [(3, 6), (2, 2)]);
    }

    #[test]
    fn a_cursor_outside_the_pod_range_starts_at_the_first_pod_address() {
        let b = NodeBlock::new("10.244.0.0/29".parse().unwrap());
        assert_eq!(next_free(&b, 99, &HashSet::new()), Some(2));
        assert_eq!(b.capacity(), 5);
    }
}
