//! Store records to wire messages, in one place.

use std::net::Ipv4Addr;

use chrono::{DateTime, Utc};
use weft_core::ipam::NodeBlock;
use weft_proto::v1 as pb;

use crate::{
    store::{AllocationRecord, AuditRecord, NodeRecord, PeerRecord, TopologyChange},
    watch::WatchMessage,
};

// === conversions to the wire ===

pub(super) fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

pub(super) fn peer_pb(p: PeerRecord) -> pb::Peer {
    pb::Peer {
        node_name: p.node_name,
        underlay_ip: p.underlay_ip.to_string(),
        vtep_mac: p.vtep_mac,
        block: p.block.to_string(),
    }
}

pub(super) fn node_pb(n: NodeRecord) -> pb::Node {
    pb::Node {
        name: n.name,
        underlay_ip: n.underlay_ip.to_string(),
        vtep_mac: n.vtep_mac,
        block: n.block.to_string(),
        gateway: n.block.gateway().to_string(),
        registered_at: Some(timestamp(n.registered_at)),
        last_seen: Some(timestamp(n.last_seen)),
        used: n.allocated,
        capacity: n.block.capacity(),
        reserved: n.reserved,
    }
}

pub(super) fn address_with_prefix(address: Ipv4Addr, block: NodeBlock) -> String {
    format!("{address}/{}", block.net().prefix_len())
}

pub(super) fn allocation_pb(a: AllocationRecord) -> pb::Allocation {
    pb::Allocation {
        node_name: a.node_name,
        address: address_with_prefix(a.address, a.block),
        gateway: a.block.gateway().to_string(),
        container_id: a.container_id,
        ifname: a.ifname,
        pod_namespace: a.pod.namespace,
        pod_name: a.pod.name,
        pod_uid: a.pod.uid,
        allocated_at: Some(timestamp(a.allocated_at)),
        state: a.state,
        offline: a.offline,
        bound_at: Some(timestamp(a.at)),
        recorded_at: Some(timestamp(a.recorded_at)),
    }
}

pub(super) fn audit_pb(a: AuditRecord) -> pb::AuditEntry {
    pb::AuditEntry {
        id: u64::try_from(a.id).unwrap_or(0),
        at: Some(timestamp(a.at)),
        action: a.action,
        actor: a.actor,
        node_name: a.node_name,
        address: a.address.map(|ip| ip.to_string()).unwrap_or_default(),
        container_id: a.container_id.unwrap_or_default(),
        ifname: a.ifname.unwrap_or_default(),
        pod_namespace: a.pod.namespace,
        pod_name: a.pod.name,
        pod_uid: a.pod.uid,
        recorded_at: Some(timestamp(a.recorded_at)),
        offline: a.offline,
        detail: a.detail.unwrap_or_default(),
    }
}

/// One watch message as the events the client asked for: a snapshot in
/// pages of at most `page` peers (0: one message), built page by page as
/// the stream is read, so no stream holds the whole snapshot encoded.
pub(super) fn watch_events(
    m: WatchMessage,
    page: usize,
) -> Box<dyn Iterator<Item = pb::PeerEvent> + Send> {
    use pb::peer_event::Event;
    let (revision, peers) = match m {
        WatchMessage::Change(e) => {
            return Box::new(std::iter::once(pb::PeerEvent {
                revision: e.revision,
                event: Some(match e.change {
                    TopologyChange::Upsert(p) => Event::Upsert(peer_pb(p)),
                    TopologyChange::Delete(name) => Event::Delete(name),
                }),
            }));
        }
        WatchMessage::Snapshot { revision, peers } => (revision, peers),
    };
    let page = if page == 0 { usize::MAX } else { page };
    let mut rest = peers.into_owned().peekable();
    let mut first = true;
    Box::new(std::iter::from_fn(move || {
        // An empty snapshot is still one message.
        if !std::mem::take(&mut first) && rest.peek().is_none() {
            return None;
        }
        let peers = rest.by_ref().take(page).map(peer_pb).collect();
        Some(pb::PeerEvent {
            revision,
            event: Some(Event::Snapshot(pb::PeerSnapshot {
                peers,
                more: rest.peek().is_some(),
            })),
        })
    }))
}
