//! Pod addresses: allocate (lock the node, look, choose round-robin with
//! weft-core, insert with the audit row in one statement), release, lookup
//! and GC.

use std::{collections::HashSet, net::IpAddr};

use chrono::{DateTime, Utc};
use ipnet::IpNet;
use sqlx::{Postgres, Transaction};
use weft_core::domain::{Attachment, NodeName, PodRef};

use super::{
    Store,
    error::{Result, StoreError},
    records::AllocationRecord,
    rows::{AllocationRow, allocation_from_row, to_block},
};

// === impl Store ===

impl Store {
    /// Allocates an address for the attachment, or returns the one it has.
    pub async fn allocate(
        &self,
        node: &NodeName,
        attachment: &Attachment,
        pod: &PodRef,
        actor: &str,
    ) -> Result<(AllocationRecord, bool)> {
        in_transaction!(self, "allocate", tx, async {
            // Lock the node row first (it queues allocations of one node;
            // the unique constraints are what rule out duplicates), then
            // look for the attachment in a statement of its own: under READ
            // COMMITTED each statement reads a fresh snapshot, so a release
            // that committed while this call waited for the lock is seen.
            // Joined into the locking statement, the lookup would answer
            // from the snapshot taken before the wait.
            let locked: Option<(IpNet, i32)> =
                sqlx::query_as("SELECT block, last_offset FROM nodes WHERE name = $1 FOR UPDATE")
                    .bind(node.as_str())
                    .fetch_optional(&mut **tx)
                    .await?;
            let Some((block, last_offset)) = locked else {
                return Err(StoreError::UnknownNode(node.clone()));
            };
            let block = to_block(block)?;
            // One statement after the lock reads both what this call must
            // know: the attachment's allocation, wherever it is, and the
            // node's used addresses for the round-robin choice
            // (NodeBlock::next_free, the unit-tested code). At most a
            // block's worth of rows, by the node index.
            let rows: Vec<AllocationRow> = sqlx::query_as(
                "SELECT a.*, n.block FROM allocations a JOIN nodes n ON n.name = a.node_name
                 WHERE a.node_name = $1 OR (a.container_id = $2 AND a.ifname = $3)",
            )
            .bind(node.as_str())
            .bind(attachment.container_id.as_str())
            .bind(attachment.ifname.as_str())
            .fetch_all(&mut **tx)
            .await?;
            let mut used = HashSet::with_capacity(rows.len());
            for row in rows {
                if row.container_id.as_deref() == Some(attachment.container_id.as_str())
                    && row.ifname.as_deref() == Some(attachment.ifname.as_str())
                {
                    if row.node_name != node.as_str() {
                        return Err(StoreError::AttachmentOnOtherNode {
                            container_id: attachment.container_id.clone(),
                            ifname: attachment.ifname.clone(),
                            owner: row.node_name,
                            node: node.clone(),
                        });
                    }
                    return Ok((allocation_from_row(row)?, false));
                }
                if let IpAddr::V4(ip) = row.address
                    && let Some(offset) = block.pod_offset(ip)
                {
                    used.insert(offset);
                }
            }
            let offset = block.next_free(u32::try_from(last_offset).unwrap_or(0), &used);
            let offset = offset.ok_or_else(|| StoreError::BlockExhausted {
                node: node.clone(),
                block,
                capacity: block.capacity(),
            })?;
            let address = block.address(offset);

            // The allocation, the cursor and the audit row in one statement.
            let allocated_at: DateTime<Utc> = sqlx::query_scalar(
                "WITH ins AS (
                    INSERT INTO allocations
                        (address, node_name, container_id, ifname, pod_namespace, pod_name, pod_uid)
                    VALUES ($1, $2, $3, $4, $5, $6, $7)
                    RETURNING allocated_at
                 ), cursor AS (
                    UPDATE nodes SET last_offset = $8 WHERE name = $2
                 ), audited AS (
                    INSERT INTO audit_log
                        (action, actor, node_name, address, container_id, ifname, pod_namespace, pod_name, pod_uid)
                    VALUES ('allocate', $9, $2, $1, $3, $4, $5, $6, $7)
                 )
                 SELECT allocated_at FROM ins",
            )
            .bind(IpAddr::V4(address))
            .bind(node.as_str())
            .bind(attachment.container_id.as_str())
            .bind(attachment.ifname.as_str())
            .bind(&pod.namespace)
            .bind(&pod.name)
            .bind(&pod.uid)
            .bind(i32::try_from(offset).map_err(|_| StoreError::Corrupt("offset".into()))?)
            .bind(actor)
            .fetch_one(&mut **tx)
            .await?;
            Ok((
                AllocationRecord {
                    node_name: node.to_string(),
                    address,
                    block,
                    container_id: attachment.container_id.to_string(),
                    ifname: attachment.ifname.to_string(),
                    pod: pod.clone(),
                    allocated_at,
                    state: "bound".into(),
                    offline: false,
                    at: allocated_at,
                    recorded_at: allocated_at,
                },
                true,
            ))
        })
    }

    /// Releases the attachment's address on `node`; nothing to release is
    /// not an error, and another node's allocation is never touched.
    pub async fn release(
        &self,
        node: &NodeName,
        attachment: &Attachment,
        actor: &str,
    ) -> Result<Option<AllocationRecord>> {
        in_transaction!(self, "release", tx, async {
            let rows: Vec<AllocationRow> = sqlx::query_as(
                "WITH released AS (
                    DELETE FROM allocations a USING nodes n
                    WHERE a.node_name = $1 AND a.container_id = $2 AND a.ifname = $3
                      AND n.name = a.node_name
                    RETURNING a.*, n.block
                 ), audited AS (
                    INSERT INTO audit_log
                        (action, actor, node_name, address, container_id, ifname, pod_namespace, pod_name, pod_uid)
                    SELECT 'release', $4, node_name, address, container_id, ifname, pod_namespace, pod_name, pod_uid
                    FROM released
                 )
                 SELECT * FROM released",
            )
            .bind(node.as_str())
            .bind(attachment.container_id.as_str())
            .bind(attachment.ifname.as_str())
            .bind(actor)
            .fetch_all(&mut **tx)
            .await?;
            rows.into_iter().next().map(allocation_from_row).transpose()
        })
    }

    /// The node's allocation of `attachment`, if any.
    pub async fn lookup(
        &self,
        node: &NodeName,
        attachment: &Attachment,
    ) -> Result<Option<AllocationRecord>> {
        let row: Option<AllocationRow> = sqlx::query_as(
            "SELECT a.*, n.block FROM allocations a JOIN nodes n ON n.name = a.node_name
             WHERE a.node_name = $1 AND a.container_id = $2 AND a.ifname = $3",
        )
        .bind(node.as_str())
        .bind(attachment.container_id.as_str())
        .bind(attachment.ifname.as_str())
        .fetch_optional(&self.pool)
        .await?;
        row.map(allocation_from_row).transpose()
    }

    /// Releases every allocation of `node` that is not in `valid`.
    pub async fn gc(
        &self,
        node: &NodeName,
        valid: &[Attachment],
        actor: &str,
    ) -> Result<Vec<AllocationRecord>> {
        in_transaction!(self, "gc", tx, async {
            let exists: Option<String> =
                sqlx::query_scalar("SELECT name FROM nodes WHERE name = $1 FOR UPDATE")
                    .bind(node.as_str())
                    .fetch_optional(&mut **tx)
                    .await?;
            if exists.is_none() {
                return Err(StoreError::UnknownNode(node.clone()));
            }
            release_where_node(tx, node.as_str(), valid, "gc", actor, true).await
        })
    }
}

// === transaction steps ===

/// Deletes the node's allocations except `keep`, auditing each with `action`.
pub(super) async fn release_where_node(
    tx: &mut Transaction<'static, Postgres>,
    node: &str,
    keep: &[Attachment],
    action: &str,
    actor: &str,
    bound_only: bool,
) -> Result<Vec<AllocationRecord>> {
    let keep_ids: Vec<&str> = keep.iter().map(|a| a.container_id.as_str()).collect();
    let keep_ifs: Vec<&str> = keep.iter().map(|a| a.ifname.as_str()).collect();
    let rows: Vec<AllocationRow> = sqlx::query_as(
        "WITH released AS (
            DELETE FROM allocations a USING nodes n
            WHERE a.node_name = $1 AND n.name = a.node_name
              AND (NOT $6 OR a.state = 'bound')
              AND (a.container_id, a.ifname) NOT IN
                  (SELECT * FROM unnest($2::text[], $3::text[]))
            RETURNING a.*, n.block
         ), audited AS (
            INSERT INTO audit_log
                (action, actor, node_name, address, container_id, ifname, pod_namespace, pod_name, pod_uid)
            SELECT $4, $5, node_name, address, container_id, ifname, pod_namespace, pod_name, pod_uid
            FROM released ORDER BY address
         )
         SELECT * FROM released ORDER BY address",
    )
    .bind(node)
    .bind(keep_ids)
    .bind(keep_ifs)
    .bind(action)
    .bind(actor)
    .bind(bound_only)
    .fetch_all(&mut **tx)
    .await?;
    rows.into_iter().map(allocation_from_row).collect()
}
