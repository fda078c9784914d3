//! Rows as sqlx reads them, and their conversion into records: the one
//! place that knows column types (inet, cidr, bigint revisions).

use std::net::{IpAddr, Ipv4Addr};

use chrono::{DateTime, Utc};
use ipnet::IpNet;
use weft_core::{domain::PodRef, ipam::NodeBlock};

use super::{
    error::{Result, StoreError},
    records::{
        AllocationRecord, AuditRecord, NodeRecord, PeerRecord, TopologyChange, TopologyEvent,
    },
};

#[derive(sqlx::FromRow)]
pub(super) struct NodeRow {
    pub(super) name: String,
    pub(super) underlay_ip: IpAddr,
    pub(super) vtep_mac: String,
    pub(super) block: IpNet,
    pub(super) registered_at: DateTime<Utc>,
    pub(super) last_seen: DateTime<Utc>,
    pub(super) allocated: i64,
    pub(super) reserved: i64,
}

#[derive(sqlx::FromRow)]
pub(super) struct AllocationRow {
    pub(super) node_name: String,
    pub(super) address: IpAddr,
    pub(super) block: IpNet,
    pub(super) container_id: Option<String>,
    pub(super) ifname: Option<String>,
    pub(super) pod_namespace: String,
    pub(super) pod_name: String,
    pub(super) pod_uid: String,
    pub(super) allocated_at: DateTime<Utc>,
    pub(super) state: String,
    pub(super) offline: bool,
    pub(super) at: DateTime<Utc>,
    pub(super) recorded_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
pub(super) struct EventRow {
    pub(super) revision: i64,
    pub(super) node_name: String,
    pub(super) kind: String,
    pub(super) underlay_ip: Option<IpAddr>,
    pub(super) vtep_mac: Option<String>,
    pub(super) block: Option<IpNet>,
}

#[derive(sqlx::FromRow)]
pub(super) struct AuditRow {
    pub(super) id: i64,
    pub(super) at: DateTime<Utc>,
    pub(super) action: String,
    pub(super) actor: String,
    pub(super) node_name: String,
    pub(super) address: Option<IpAddr>,
    pub(super) container_id: Option<String>,
    pub(super) ifname: Option<String>,
    pub(super) pod_namespace: Option<String>,
    pub(super) pod_name: Option<String>,
    pub(super) pod_uid: Option<String>,
    pub(super) recorded_at: Option<DateTime<Utc>>,
    pub(super) offline: bool,
    pub(super) detail: Option<String>,
}

// === row conversions ===

pub(super) fn to_v4(ip: IpAddr) -> Result<Ipv4Addr> {
    match ip {
        IpAddr::V4(v4) => Ok(v4),
        IpAddr::V6(v6) => Err(StoreError::Corrupt(format!(
            "IPv6 address {v6} in an IPv4 column"
        ))),
    }
}

pub(super) fn to_block(net: IpNet) -> Result<NodeBlock> {
    match net {
        IpNet::V4(v4) => Ok(NodeBlock::new(v4)),
        IpNet::V6(v6) => Err(StoreError::Corrupt(format!("IPv6 block {v6}"))),
    }
}

pub(super) fn rev_u64(revision: i64) -> u64 {
    u64::try_from(revision).unwrap_or(0)
}

pub(super) fn rev_i64(revision: u64) -> Result<i64> {
    i64::try_from(revision).map_err(|_| StoreError::Corrupt(format!("revision {revision}")))
}

pub(super) fn count_u32(count: i64) -> u32 {
    u32::try_from(count).unwrap_or(u32::MAX)
}

pub(super) fn node_from_row(row: NodeRow) -> Result<NodeRecord> {
    Ok(NodeRecord {
        name: row.name,
        underlay_ip: to_v4(row.underlay_ip)?,
        vtep_mac: row.vtep_mac,
        block: to_block(row.block)?,
        registered_at: row.registered_at,
        last_seen: row.last_seen,
        allocated: count_u32(row.allocated),
        reserved: count_u32(row.reserved),
    })
}

pub(super) fn allocation_from_row(row: AllocationRow) -> Result<AllocationRecord> {
    Ok(AllocationRecord {
        node_name: row.node_name,
        address: to_v4(row.address)?,
        block: to_block(row.block)?,
        container_id: row.container_id.unwrap_or_default(),
        ifname: row.ifname.unwrap_or_default(),
        pod: PodRef {
            namespace: row.pod_namespace,
            name: row.pod_name,
            uid: row.pod_uid,
        },
        allocated_at: row.allocated_at,
        state: row.state,
        offline: row.offline,
        at: row.at,
        recorded_at: row.recorded_at,
    })
}

pub(super) fn event_from_row(row: EventRow) -> Result<TopologyEvent> {
    let change = match row.kind.as_str() {
        "delete" => TopologyChange::Delete(row.node_name),
        "upsert" => {
            let missing =
                || StoreError::Corrupt(format!("upsert event {} lacks a field", row.revision));
            TopologyChange::Upsert(PeerRecord {
                underlay_ip: to_v4(row.underlay_ip.ok_or_else(missing)?)?,
                vtep_mac: row.vtep_mac.clone().ok_or_else(missing)?,
                block: to_block(row.block.ok_or_else(missing)?)?,
                node_name: row.node_name,
            })
        }
        other => return Err(StoreError::Corrupt(format!("event kind {other:?}"))),
    };
    Ok(TopologyEvent {
        revision: rev_u64(row.revision),
        change,
    })
}

pub(super) fn audit_from_row(row: AuditRow) -> Result<AuditRecord> {
    Ok(AuditRecord {
        id: row.id,
        at: row.at,
        action: row.action,
        actor: row.actor,
        node_name: row.node_name,
        address: row.address.map(to_v4).transpose()?,
        container_id: row.container_id,
        ifname: row.ifname,
        pod: PodRef {
            namespace: row.pod_namespace.unwrap_or_default(),
            name: row.pod_name.unwrap_or_default(),
            uid: row.pod_uid.unwrap_or_default(),
        },
        recorded_at: row.recorded_at.unwrap_or(row.at),
        offline: row.offline,
        detail: row.detail,
    })
}
