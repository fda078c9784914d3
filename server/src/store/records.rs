//! What the store hands out: nodes, peers, topology events, allocations
//! and audit entries as plain values, plus the filters callers pass in.

use std::net::Ipv4Addr;

use chrono::{DateTime, Utc};
use weft_core::{
    domain::{ContainerId, PodRef},
    ipam::NodeBlock,
};

/// A node as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    pub name: String,
    pub underlay_ip: Ipv4Addr,
    pub vtep_mac: String,
    pub block: NodeBlock,
    pub registered_at: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    /// Bound addresses.
    pub allocated: u32,
    /// Reserved for the node, not bound.
    pub reserved: u32,
}

/// The tunnel view of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerRecord {
    pub node_name: String,
    pub underlay_ip: Ipv4Addr,
    pub vtep_mac: String,
    pub block: NodeBlock,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopologyChange {
    Upsert(PeerRecord),
    Delete(String),
}

impl TopologyChange {
    pub fn node_name(&self) -> &str {
        match self {
            TopologyChange::Upsert(p) => &p.node_name,
            TopologyChange::Delete(n) => n,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopologyEvent {
    pub revision: u64,
    pub change: TopologyChange,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllocationRecord {
    pub node_name: String,
    pub address: Ipv4Addr,
    pub block: NodeBlock,
    pub container_id: String,
    pub ifname: String,
    pub pod: PodRef,
    pub allocated_at: DateTime<Utc>,
    /// "reserved" or "bound".
    pub state: String,
    pub offline: bool,
    /// When the node bound it (node clock).
    pub at: DateTime<Utc>,
    pub recorded_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub action: String,
    pub actor: String,
    pub node_name: String,
    pub address: Option<Ipv4Addr>,
    pub container_id: Option<String>,
    pub ifname: Option<String>,
    pub pod: PodRef,
    pub recorded_at: DateTime<Utc>,
    pub offline: bool,
    pub detail: Option<String>,
}

/// What a registration did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub block: NodeBlock,
    pub revision: u64,
    pub changed: bool,
    pub epoch: u64,
}

/// Filters for listing allocations; `None` does not filter.
#[derive(Debug, Clone, Default)]
pub struct AllocationFilter {
    pub node_name: Option<String>,
    pub pod_namespace: Option<String>,
    pub pod_name: Option<String>,
    pub address: Option<Ipv4Addr>,
    /// Only addresses after this one (paging).
    pub after: Option<Ipv4Addr>,
    /// At most this many rows.
    pub limit: u32,
}

/// Whose audit trail to read.
#[derive(Debug, Clone)]
pub enum HistoryKey {
    Address(Ipv4Addr),
    Container(ContainerId),
    Pod { namespace: String, name: String },
    Node(String),
}

/// A bind or a release as the node did it (issue 14's reports).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeEvent {
    pub seq: u64,
    pub kind: NodeEventKind,
    pub address: Ipv4Addr,
    pub binding: Binding,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeEventKind {
    Bind,
    Release,
}

/// An address bound to an attachment on a node, with when the node did it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binding {
    pub container_id: String,
    pub ifname: String,
    pub pod: PodRef,
    pub at: DateTime<Utc>,
    pub offline: bool,
}

/// What a report did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportOutcome {
    /// Recorded up to this seq.
    Applied(u64),
    /// The events do not follow the recorded seq: a commit was lost.
    Gap { recorded: u64 },
}

/// What a sync changed; `stale` when the database holds later events than
/// the node's view (nothing was changed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncCounts {
    pub created: u32,
    pub changed: u32,
    pub removed: u32,
    pub stale: bool,
}
