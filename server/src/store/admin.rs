//! Read-only queries for the admin API: nodes, allocations (paged by
//! address), audit history (paged by id) and utilization.

use std::net::IpAddr;

use ipnet::IpNet;
use weft_core::{domain::NodeName, ipam::NodeBlock};

use super::{
    Store,
    error::{Result, StoreError},
    records::{AllocationFilter, AllocationRecord, AuditRecord, HistoryKey, NodeRecord},
    rows::{
        AllocationRow, AuditRow, NodeRow, allocation_from_row, audit_from_row, count_u32,
        node_from_row, to_block,
    },
};

// === impl Store ===

impl Store {
    pub async fn list_nodes(&self) -> Result<Vec<NodeRecord>> {
        let rows: Vec<NodeRow> = sqlx::query_as(
            "SELECT n.name, n.underlay_ip, n.vtep_mac::text AS vtep_mac, n.block,
                    n.registered_at, n.last_seen,
                    (SELECT count(*) FROM allocations a WHERE a.node_name = n.name AND a.state = 'bound') AS allocated,
                    (SELECT count(*) FROM allocations a WHERE a.node_name = n.name AND a.state = 'reserved') AS reserved
             FROM nodes n ORDER BY n.name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(node_from_row).collect()
    }

    pub async fn get_node(&self, name: &NodeName) -> Result<NodeRecord> {
        let row: Option<NodeRow> = sqlx::query_as(
            "SELECT n.name, n.underlay_ip, n.vtep_mac::text AS vtep_mac, n.block,
                    n.registered_at, n.last_seen,
                    (SELECT count(*) FROM allocations a WHERE a.node_name = n.name AND a.state = 'bound') AS allocated,
                    (SELECT count(*) FROM allocations a WHERE a.node_name = n.name AND a.state = 'reserved') AS reserved
             FROM nodes n WHERE n.name = $1",
        )
        .bind(name.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.map(node_from_row)
            .transpose()?
            .ok_or_else(|| StoreError::UnknownNode(name.clone()))
    }

    pub async fn list_allocations(
        &self,
        filter: &AllocationFilter,
    ) -> Result<Vec<AllocationRecord>> {
        let rows: Vec<AllocationRow> = sqlx::query_as(
            "SELECT a.*, n.block FROM allocations a JOIN nodes n ON n.name = a.node_name
             WHERE ($1::text IS NULL OR a.node_name = $1)
               AND ($2::text IS NULL OR a.pod_namespace = $2)
               AND ($3::text IS NULL OR a.pod_name = $3)
               AND ($4::inet IS NULL OR a.address = $4)
               AND ($5::inet IS NULL OR a.address > $5)
             ORDER BY a.address
             LIMIT $6",
        )
        .bind(filter.node_name.as_deref())
        .bind(filter.pod_namespace.as_deref())
        .bind(filter.pod_name.as_deref())
        .bind(filter.address.map(IpAddr::V4))
        .bind(filter.after.map(IpAddr::V4))
        .bind(i64::from(filter.limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(allocation_from_row).collect()
    }

    /// One page of a trail, oldest first: entries after `after_id`, at
    /// most `limit`.
    pub async fn history(
        &self,
        key: &HistoryKey,
        after_id: i64,
        limit: u32,
    ) -> Result<Vec<AuditRecord>> {
        let (mut address, mut container, mut pod, mut node) = (None, None, None, None);
        match key {
            HistoryKey::Address(ip) => address = Some(IpAddr::V4(*ip)),
            HistoryKey::Container(id) => container = Some(id.as_str()),
            HistoryKey::Pod { namespace, name } => pod = Some((namespace.as_str(), name.as_str())),
            HistoryKey::Node(n) => node = Some(n.as_str()),
        }
        // Indexed arms rather than one OR, so each walks its index.
        let rows: Vec<AuditRow> = sqlx::query_as(
            "SELECT * FROM audit_log
             WHERE $1::inet IS NOT NULL AND address = $1 AND id > $3
             UNION ALL
             SELECT * FROM audit_log
             WHERE $2::text IS NOT NULL AND container_id = $2 AND id > $3
             UNION ALL
             SELECT * FROM audit_log
             WHERE $5::text IS NOT NULL AND pod_namespace = $5 AND pod_name = $6 AND id > $3
             UNION ALL
             SELECT * FROM audit_log
             WHERE $7::text IS NOT NULL AND node_name = $7 AND id > $3
             ORDER BY id LIMIT $4",
        )
        .bind(address)
        .bind(container)
        .bind(after_id)
        .bind(i64::from(limit))
        .bind(pod.map(|p| p.0))
        .bind(pod.map(|p| p.1))
        .bind(node)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(audit_from_row).collect()
    }

    /// Whoever holds `address` now, or `None`.
    pub async fn whois(&self, address: std::net::Ipv4Addr) -> Result<Option<AllocationRecord>> {
        let row: Option<AllocationRow> = sqlx::query_as(
            "SELECT a.*, n.block FROM allocations a JOIN nodes n ON n.name = a.node_name
             WHERE a.address = $1",
        )
        .bind(IpAddr::V4(address))
        .fetch_optional(&self.pool)
        .await?;
        row.map(allocation_from_row).transpose()
    }

    /// An operator's release of `address`, refused while its node
    /// heartbeated within `alive_within`.
    pub async fn admin_release(
        &self,
        address: std::net::Ipv4Addr,
        alive_within: std::time::Duration,
        actor: &str,
    ) -> Result<AllocationRecord> {
        in_transaction!(self, "admin_release", tx, async {
            // The node row first (as every node-scoped write), then the
            // allocation in a statement of its own.
            let owner: Option<(String, f64)> = sqlx::query_as(
                "SELECT n.name, extract(epoch FROM now() - n.last_seen)::float8
                 FROM nodes n WHERE n.name = (SELECT node_name FROM allocations WHERE address = $1)
                 FOR UPDATE OF n",
            )
            .bind(IpAddr::V4(address))
            .fetch_optional(&mut **tx)
            .await?;
            let Some((node, silent)) = owner else {
                return Err(StoreError::NotAllocated(address));
            };
            if silent < alive_within.as_secs_f64() {
                return Err(StoreError::NodeAlive {
                    node,
                    address,
                    seconds: silent as i64,
                });
            }
            let rows: Vec<AllocationRow> = sqlx::query_as(
                "WITH released AS (
                    DELETE FROM allocations a USING nodes n
                    WHERE a.address = $1 AND n.name = a.node_name
                    RETURNING a.*, n.block
                 ), audited AS (
                    INSERT INTO audit_log
                        (action, actor, node_name, address, container_id, ifname,
                         pod_namespace, pod_name, pod_uid, detail)
                    SELECT CASE WHEN state = 'bound' THEN 'release' ELSE 'unreserve' END,
                           $2, node_name, address, container_id, ifname,
                           pod_namespace, pod_name, pod_uid, 'admin'
                    FROM released
                 )
                 SELECT * FROM released",
            )
            .bind(IpAddr::V4(address))
            .bind(actor)
            .fetch_all(&mut **tx)
            .await?;
            rows.into_iter()
                .next()
                .map(allocation_from_row)
                .transpose()?
                .ok_or(StoreError::NotAllocated(address))
        })
    }

    /// The newest audit entry of `address`, if any.
    pub async fn last_entry(&self, address: std::net::Ipv4Addr) -> Result<Option<AuditRecord>> {
        let row: Option<AuditRow> =
            sqlx::query_as("SELECT * FROM audit_log WHERE address = $1 ORDER BY id DESC LIMIT 1")
                .bind(IpAddr::V4(address))
                .fetch_optional(&self.pool)
                .await?;
        row.map(audit_from_row).transpose()
    }

    /// Bound and reserved addresses per node, for utilization and metrics.
    pub async fn utilization(&self) -> Result<Vec<NodeUse>> {
        let rows: Vec<(String, IpNet, i64, i64, f64)> = sqlx::query_as(
            "SELECT n.name, n.block,
                    count(a.address) FILTER (WHERE a.state = 'bound'),
                    count(a.address) FILTER (WHERE a.state = 'reserved'),
                    extract(epoch FROM now() - n.last_seen)::float8
             FROM nodes n LEFT JOIN allocations a ON a.node_name = n.name
             GROUP BY n.name, n.block, n.last_seen ORDER BY n.name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(name, block, used, reserved, silent)| {
                Ok(NodeUse {
                    name,
                    block: to_block(block)?,
                    used: count_u32(used),
                    reserved: count_u32(reserved),
                    silent_seconds: silent.max(0.0) as u64,
                })
            })
            .collect()
    }
}

/// One node's share of the cluster (Utilization, metrics).
#[derive(Debug, Clone)]
pub struct NodeUse {
    pub name: String,
    pub block: NodeBlock,
    /// Bound addresses.
    pub used: u32,
    /// Reserved for the node and not bound.
    pub reserved: u32,
    /// Since the last heartbeat (or registration).
    pub silent_seconds: u64,
}
