//! Per-node reserves (docs/design.md): reserving addresses of a node's
//! block for it, recording the binds and releases the node reports, and
//! making the node's rows equal to what the node holds (sync). Every call
//! locks the node row and checks the caller's epoch first, so an agent of
//! a deleted node cannot write into the node's next life.

use std::{
    collections::{BTreeMap, HashSet},
    net::{IpAddr, Ipv4Addr},
};

use sqlx::{Postgres, Transaction};
use tracing::warn;
use weft_core::{domain::NodeName, ipam::NodeBlock, reserve::plan_sync};

use super::{
    Store,
    error::{Result, StoreError},
    records::{AllocationRecord, Binding, NodeEvent, NodeEventKind, ReportOutcome, SyncCounts},
    rows::{AllocationRow, allocation_from_row, rev_i64, rev_u64, to_block, to_v4},
};

/// Most addresses one Reserve grants.
pub const MAX_RESERVE: u32 = 256;

struct LockedNode {
    block: NodeBlock,
    last_offset: u32,
    report_seq: u64,
}

/// Locks the node row; fails for an unknown node or a stale epoch.
async fn lock_node(
    tx: &mut Transaction<'static, Postgres>,
    node: &NodeName,
    epoch: u64,
) -> Result<LockedNode> {
    let row: Option<(ipnet::IpNet, i32, i64, i64)> = sqlx::query_as(
        "SELECT block, last_offset, epoch, report_seq FROM nodes WHERE name = $1 FOR UPDATE",
    )
    .bind(node.as_str())
    .fetch_optional(&mut **tx)
    .await?;
    let Some((block, last_offset, current, report_seq)) = row else {
        return Err(StoreError::UnknownNode(node.clone()));
    };
    let current = rev_u64(current);
    if current != epoch {
        return Err(StoreError::StaleEpoch {
            node: node.clone(),
            epoch,
            current,
        });
    }
    Ok(LockedNode {
        block: to_block(block)?,
        last_offset: u32::try_from(last_offset).unwrap_or(0),
        report_seq: rev_u64(report_seq),
    })
}

// === impl Store ===

impl Store {
    /// Reserves up to `count` free addresses of the node's block for it,
    /// round-robin after the node's cursor, each audited as `reserve`.
    pub async fn reserve(
        &self,
        node: &NodeName,
        epoch: u64,
        count: u32,
        actor: &str,
    ) -> Result<Vec<Ipv4Addr>> {
        let count = count.min(MAX_RESERVE) as usize;
        in_transaction!(self, "reserve", tx, async {
            let locked = lock_node(tx, node, epoch).await?;
            let held: Vec<IpAddr> =
                sqlx::query_scalar("SELECT address FROM allocations WHERE node_name = $1")
                    .bind(node.as_str())
                    .fetch_all(&mut **tx)
                    .await?;
            let used: HashSet<u32> = held
                .into_iter()
                .filter_map(|ip| match ip {
                    IpAddr::V4(v4) => locked.block.pod_offset(v4),
                    IpAddr::V6(_) => None,
                })
                .collect();
            let offsets = locked.block.next_free_n(locked.last_offset, &used, count);
            let Some(&last) = offsets.last() else {
                return Ok(Vec::new());
            };
            let addresses: Vec<Ipv4Addr> =
                offsets.iter().map(|o| locked.block.address(*o)).collect();
            let inet: Vec<IpAddr> = addresses.iter().copied().map(IpAddr::V4).collect();
            sqlx::query(
                "WITH ins AS (
                    INSERT INTO allocations (address, node_name, state)
                    SELECT a, $2, 'reserved' FROM unnest($1::inet[]) AS a
                    RETURNING address
                 ), cursor AS (
                    UPDATE nodes SET last_offset = $4 WHERE name = $2
                 )
                 INSERT INTO audit_log (action, actor, node_name, address)
                 SELECT 'reserve', $3, $2, address FROM ins ORDER BY address",
            )
            .bind(&inet)
            .bind(node.as_str())
            .bind(actor)
            .bind(i32::try_from(last).map_err(|_| StoreError::Corrupt("offset".into()))?)
            .execute(&mut **tx)
            .await?;
            Ok(addresses)
        })
    }

    /// The node's bound allocations (an agent without state adopts them).
    pub async fn bound_allocations(&self, node: &NodeName) -> Result<Vec<AllocationRecord>> {
        let rows: Vec<AllocationRow> = sqlx::query_as(
            "SELECT a.*, n.block FROM allocations a JOIN nodes n ON n.name = a.node_name
             WHERE a.node_name = $1 AND a.state = 'bound' ORDER BY a.address",
        )
        .bind(node.as_str())
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(allocation_from_row).collect()
    }

    /// Records the node's events in order, skipping those already
    /// recorded; a batch that does not follow the recorded seq is a gap (a
    /// commit lost in a failover) and nothing of it is applied.
    pub async fn report(
        &self,
        node: &NodeName,
        epoch: u64,
        events: &[NodeEvent],
        actor: &str,
    ) -> Result<ReportOutcome> {
        in_transaction!(self, "report", tx, async {
            let locked = lock_node(tx, node, epoch).await?;
            let recorded = locked.report_seq;
            let fresh: Vec<&NodeEvent> = events.iter().filter(|e| e.seq > recorded).collect();
            // The whole batch is checked before anything is written: an
            // early answer commits, so a gap found half-way would leave the
            // first half applied with report_seq unmoved (and applied again
            // when resent).
            let follows = fresh
                .iter()
                .zip(recorded + 1..)
                .all(|(e, want)| e.seq == want);
            if !follows {
                return Ok(ReportOutcome::Gap { recorded });
            }
            let mut seq = recorded;
            for event in fresh {
                seq = event.seq;
                if locked.block.pod_offset(event.address).is_none() {
                    warn!(%node, address = %event.address, block = %locked.block, "reported address is outside the node's block; skipped");
                    continue;
                }
                match event.kind {
                    NodeEventKind::Bind => {
                        bind_row(tx, node, event.address, &event.binding, actor, None).await?;
                    }
                    NodeEventKind::Release => {
                        release_row(tx, node, event.address, &event.binding, actor).await?;
                    }
                }
            }
            sqlx::query("UPDATE nodes SET report_seq = $2 WHERE name = $1")
                .bind(node.as_str())
                .bind(rev_i64(seq)?)
                .execute(&mut **tx)
                .await?;
            Ok(ReportOutcome::Applied(seq))
        })
    }

    /// Makes the node's rows equal to what it holds (`bound` and
    /// `reserved`, as of its event `seq`); every difference is audited
    /// (`repair` for what the database lacked, `reconcile` for what it
    /// held by mistake). Refused as stale when the database recorded
    /// events after `seq`.
    pub async fn sync(
        &self,
        node: &NodeName,
        epoch: u64,
        seq: u64,
        bound: &[(Ipv4Addr, Binding)],
        reserved: &[Ipv4Addr],
        actor: &str,
    ) -> Result<SyncCounts> {
        in_transaction!(self, "sync", tx, async {
            let locked = lock_node(tx, node, epoch).await?;
            if locked.report_seq > seq {
                return Ok(SyncCounts {
                    stale: true,
                    ..SyncCounts::default()
                });
            }
            let rows: Vec<(IpAddr, Option<String>, Option<String>)> = sqlx::query_as(
                "SELECT address, container_id, ifname FROM allocations WHERE node_name = $1",
            )
            .bind(node.as_str())
            .fetch_all(&mut **tx)
            .await?;
            let mut stored = BTreeMap::new();
            for (ip, cid, ifname) in rows {
                stored.insert(to_v4(ip)?, cid.zip(ifname));
            }
            let in_block = |ip: &Ipv4Addr| {
                let ok = locked.block.pod_offset(*ip).is_some();
                if !ok {
                    warn!(%node, address = %ip, "the node holds an address outside its block; not recorded");
                }
                ok
            };
            let mut truth = BTreeMap::new();
            let mut bindings = BTreeMap::new();
            for (ip, b) in bound.iter().filter(|(ip, _)| in_block(ip)) {
                truth.insert(*ip, Some((b.container_id.clone(), b.ifname.clone())));
                bindings.insert(*ip, b);
            }
            for ip in reserved.iter().filter(|ip| in_block(ip)) {
                truth.entry(*ip).or_insert(None);
            }
            let plan = plan_sync(&stored, &truth);
            let mut counts = SyncCounts::default();
            for (ip, held) in plan.create.iter().chain(&plan.change) {
                match (held, bindings.get(ip)) {
                    (Some(_), Some(b)) => {
                        bind_row(tx, node, *ip, b, actor, Some("repair")).await?;
                    }
                    _ => {
                        let was_bound = stored.get(ip).is_some_and(Option::is_some);
                        reserve_row(tx, node, *ip, actor, was_bound).await?;
                    }
                }
            }
            counts.created = count(plan.create.len());
            counts.changed = count(plan.change.len());
            for ip in &plan.remove {
                sqlx::query(
                    "WITH gone AS (
                        DELETE FROM allocations WHERE node_name = $1 AND address = $2
                        RETURNING *
                     )
                     INSERT INTO audit_log
                        (action, actor, node_name, address, container_id, ifname,
                         pod_namespace, pod_name, pod_uid, detail)
                     SELECT CASE WHEN state = 'bound' THEN 'release' ELSE 'unreserve' END,
                            $3, node_name, address, container_id, ifname,
                            pod_namespace, pod_name, pod_uid, 'reconcile'
                     FROM gone",
                )
                .bind(node.as_str())
                .bind(IpAddr::V4(*ip))
                .bind(actor)
                .execute(&mut **tx)
                .await?;
            }
            counts.removed = count(plan.remove.len());
            sqlx::query("UPDATE nodes SET report_seq = $2 WHERE name = $1")
                .bind(node.as_str())
                .bind(rev_i64(seq)?)
                .execute(&mut **tx)
                .await?;
            Ok(counts)
        })
    }
}

fn count(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

// === transaction steps ===

/// Records `address` as bound on `node` (whatever the row held before)
/// with its audit row at the node's time.
async fn bind_row(
    tx: &mut Transaction<'static, Postgres>,
    node: &NodeName,
    address: Ipv4Addr,
    b: &Binding,
    actor: &str,
    detail: Option<&str>,
) -> Result<()> {
    // The attachment's row at another address is stale (a lost release,
    // or an allocation an older agent made): the node's bind replaces it.
    sqlx::query(
        "WITH gone AS (
            DELETE FROM allocations
            WHERE node_name = $1 AND container_id = $2 AND ifname = $3 AND address <> $4
            RETURNING *
         )
         INSERT INTO audit_log
            (action, actor, node_name, address, container_id, ifname,
             pod_namespace, pod_name, pod_uid, detail)
         SELECT 'release', $5, node_name, address, container_id, ifname,
                pod_namespace, pod_name, pod_uid, 'reconcile'
         FROM gone",
    )
    .bind(node.as_str())
    .bind(&b.container_id)
    .bind(&b.ifname)
    .bind(IpAddr::V4(address))
    .bind(actor)
    .execute(&mut **tx)
    .await?;
    let offline = b.offline || detail.is_some();
    let bound: i64 = sqlx::query_scalar(
        "WITH up AS (
            INSERT INTO allocations
                (address, node_name, container_id, ifname, pod_namespace, pod_name, pod_uid,
                 state, at, offline, allocated_at)
            VALUES ($1, $2, $3, $4, $5, $6, $7, 'bound', $8, $9, $8)
            ON CONFLICT (address) DO UPDATE SET
                container_id = EXCLUDED.container_id, ifname = EXCLUDED.ifname,
                pod_namespace = EXCLUDED.pod_namespace, pod_name = EXCLUDED.pod_name,
                pod_uid = EXCLUDED.pod_uid, state = 'bound', at = EXCLUDED.at,
                allocated_at = EXCLUDED.at, offline = EXCLUDED.offline, recorded_at = now()
            WHERE allocations.node_name = EXCLUDED.node_name
            RETURNING address
         ), audited AS (
            INSERT INTO audit_log
                (at, action, actor, node_name, address, container_id, ifname,
                 pod_namespace, pod_name, pod_uid, offline, detail)
            SELECT $8, 'bind', $10, $2, address, $3, $4, $5, $6, $7, $9, $11 FROM up
         )
         SELECT count(*) FROM up",
    )
    .bind(IpAddr::V4(address))
    .bind(node.as_str())
    .bind(&b.container_id)
    .bind(&b.ifname)
    .bind(&b.pod.namespace)
    .bind(&b.pod.name)
    .bind(&b.pod.uid)
    .bind(b.at)
    .bind(offline)
    .bind(actor)
    .bind(detail)
    .fetch_one(&mut **tx)
    .await?;
    if bound == 0 {
        warn!(%node, %address, "a bind reported for an address another node holds; skipped");
    }
    Ok(())
}

/// Records a release: the address goes back to the node's reserve, and
/// the audit row is written even if the database had lost the bind.
async fn release_row(
    tx: &mut Transaction<'static, Postgres>,
    node: &NodeName,
    address: Ipv4Addr,
    b: &Binding,
    actor: &str,
) -> Result<()> {
    sqlx::query(
        "WITH rel AS (
            UPDATE allocations SET state = 'reserved', container_id = NULL, ifname = NULL,
                pod_namespace = '', pod_name = '', pod_uid = '', at = $5, recorded_at = now(),
                offline = $6
            WHERE node_name = $1 AND address = $2 AND container_id = $3 AND ifname = $4
         )
         INSERT INTO audit_log
            (at, action, actor, node_name, address, container_id, ifname,
             pod_namespace, pod_name, pod_uid, offline)
         VALUES ($5, 'release', $7, $1, $2, $3, $4, $8, $9, $10, $6)",
    )
    .bind(node.as_str())
    .bind(IpAddr::V4(address))
    .bind(&b.container_id)
    .bind(&b.ifname)
    .bind(b.at)
    .bind(b.offline)
    .bind(actor)
    .bind(&b.pod.namespace)
    .bind(&b.pod.name)
    .bind(&b.pod.uid)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Makes `address` a reserved row of `node` (sync): created, or changed
/// from a binding the node no longer has.
async fn reserve_row(
    tx: &mut Transaction<'static, Postgres>,
    node: &NodeName,
    address: Ipv4Addr,
    actor: &str,
    was_bound: bool,
) -> Result<()> {
    sqlx::query(
        "WITH prev AS (
            SELECT * FROM allocations WHERE address = $1 AND node_name = $2
         ), up AS (
            INSERT INTO allocations (address, node_name, state)
            VALUES ($1, $2, 'reserved')
            ON CONFLICT (address) DO UPDATE SET
                state = 'reserved', container_id = NULL, ifname = NULL,
                pod_namespace = '', pod_name = '', pod_uid = '', recorded_at = now()
            WHERE allocations.node_name = EXCLUDED.node_name
            RETURNING address
         )
         INSERT INTO audit_log
            (action, actor, node_name, address, container_id, ifname,
             pod_namespace, pod_name, pod_uid, detail)
         SELECT CASE WHEN $4 THEN 'release' ELSE 'reserve' END, $3, $2, up.address,
                prev.container_id, prev.ifname, prev.pod_namespace, prev.pod_name, prev.pod_uid,
                CASE WHEN $4 THEN 'reconcile' ELSE 'repair' END
         FROM up LEFT JOIN prev ON true",
    )
    .bind(IpAddr::V4(address))
    .bind(node.as_str())
    .bind(actor)
    .bind(was_bound)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
