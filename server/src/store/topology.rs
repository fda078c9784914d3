//! Nodes and the topology: registration (with the endpoint and quarantine
//! rules), heartbeats, deletion, and the revisioned event history watchers
//! resume from. Every change takes the revision row's lock, so changes
//! commit in revision order.

use std::{collections::HashSet, net::IpAddr};

use ipnet::IpNet;
use sqlx::{Postgres, Transaction};
use weft_core::domain::{MacAddr, NodeName, UnderlayIp};

use super::{
    MAX_REPLAY, Store, TOPOLOGY_CHANNEL,
    error::{Result, StoreError},
    ipam::release_where_node,
    records::{AllocationRecord, PeerRecord, Registration, TopologyEvent},
    rows::{EventRow, event_from_row, rev_i64, rev_u64, to_block, to_v4},
};

// === impl Store ===

impl Store {
    /// Registers `name` or updates its tunnel endpoint; the block is kept.
    pub async fn register_node(
        &self,
        name: &NodeName,
        underlay: UnderlayIp,
        mac: MacAddr,
        actor: &str,
    ) -> Result<Registration> {
        let layout = self.layout;
        let history = self.history_limit;
        in_transaction!(self, "register_node", tx, async {
            let revision = lock_topology(tx).await?;
            // Under the topology lock no other registration commits in
            // between; the unique constraints catch anything that would.
            let holder: Option<(String, IpAddr, String)> = sqlx::query_as(
                "SELECT name, underlay_ip, vtep_mac::text FROM nodes
                 WHERE (underlay_ip = $2 OR vtep_mac = $3::macaddr) AND name <> $1
                 LIMIT 1",
            )
            .bind(name.as_str())
            .bind(IpAddr::V4(underlay.addr()))
            .bind(mac.to_string())
            .fetch_optional(&mut **tx)
            .await?;
            if let Some((holder, ip, stored_mac)) = holder {
                let (field, value) = if ip == IpAddr::V4(underlay.addr()) {
                    ("underlay_ip", underlay.addr().to_string())
                } else {
                    ("vtep_mac", stored_mac)
                };
                return Err(StoreError::EndpointTaken {
                    field,
                    value,
                    holder,
                });
            }
            let existing: Option<(IpAddr, String, IpNet, i64)> = sqlx::query_as(
                "SELECT underlay_ip, vtep_mac::text, block, epoch FROM nodes WHERE name = $1",
            )
            .bind(name.as_str())
            .fetch_optional(&mut **tx)
            .await?;

            let (block, action, epoch) = match existing {
                Some((ip, stored_mac, block, epoch)) => {
                    let epoch = rev_u64(epoch);
                    let block = to_block(block)?;
                    if ip == IpAddr::V4(underlay.addr()) && stored_mac == mac.to_string() {
                        sqlx::query("UPDATE nodes SET last_seen = now() WHERE name = $1")
                            .bind(name.as_str())
                            .execute(&mut **tx)
                            .await?;
                        return Ok(Registration {
                            block,
                            revision,
                            changed: false,
                            epoch,
                        });
                    }
                    sqlx::query(
                        "UPDATE nodes SET underlay_ip = $2, vtep_mac = $3::macaddr, last_seen = now()
                         WHERE name = $1",
                    )
                    .bind(name.as_str())
                    .bind(IpAddr::V4(underlay.addr()))
                    .bind(mac.to_string())
                    .execute(&mut **tx)
                    .await?;
                    (block, "node_update", epoch)
                }
                None => {
                    // A node registering again gets its quarantined block
                    // back: its pods may still hold addresses of it.
                    let own_retired: Option<i32> = sqlx::query_scalar(
                        "DELETE FROM retired_blocks WHERE node_name = $1
                         RETURNING block_index",
                    )
                    .bind(name.as_str())
                    .fetch_optional(&mut **tx)
                    .await?;
                    let used: Vec<i32> = sqlx::query_scalar(
                        "SELECT block_index FROM nodes
                         UNION ALL
                         SELECT block_index FROM retired_blocks WHERE until > now()",
                    )
                    .fetch_all(&mut **tx)
                    .await?;
                    let used: HashSet<u32> = used
                        .into_iter()
                        .filter_map(|i| u32::try_from(i).ok())
                        .collect();
                    let own_retired = own_retired.and_then(|i| u32::try_from(i).ok());
                    let index = layout
                        .block_for_new_node(&used, own_retired)
                        .ok_or_else(|| StoreError::NoFreeBlock {
                            node: name.clone(),
                            cidr: layout.cidr(),
                            prefix: layout.node_prefix(),
                            count: layout.block_count(),
                        })?;
                    // A quarantine that ran out is over: the block is free.
                    sqlx::query("DELETE FROM retired_blocks WHERE block_index = $1")
                        .bind(
                            i32::try_from(index)
                                .map_err(|_| StoreError::Corrupt("block index".into()))?,
                        )
                        .execute(&mut **tx)
                        .await?;
                    let block = layout
                        .block(index)
                        .ok_or_else(|| StoreError::Corrupt(format!("block index {index}")))?;
                    let epoch: i64 = sqlx::query_scalar(
                        "INSERT INTO nodes (name, underlay_ip, vtep_mac, block_index, block)
                         VALUES ($1, $2, $3::macaddr, $4, $5) RETURNING epoch",
                    )
                    .bind(name.as_str())
                    .bind(IpAddr::V4(underlay.addr()))
                    .bind(mac.to_string())
                    .bind(
                        i32::try_from(index)
                            .map_err(|_| StoreError::Corrupt("block index".into()))?,
                    )
                    .bind(IpNet::V4(block.net()))
                    .fetch_one(&mut **tx)
                    .await?;
                    (block, "node_register", rev_u64(epoch))
                }
            };

            let revision = bump_topology(tx, revision, history).await?;
            sqlx::query(
                "INSERT INTO topology_events (revision, node_name, kind, underlay_ip, vtep_mac, block)
                 VALUES ($1, $2, 'upsert', $3, $4::macaddr, $5)",
            )
            .bind(rev_i64(revision)?)
            .bind(name.as_str())
            .bind(IpAddr::V4(underlay.addr()))
            .bind(mac.to_string())
            .bind(IpNet::V4(block.net()))
            .execute(&mut **tx)
            .await?;
            audit_node(tx, action, actor, name.as_str()).await?;
            Ok(Registration {
                block,
                revision,
                changed: true,
                epoch,
            })
        })
    }

    /// Records a refused call: who tried, for which node, which method.
    pub async fn audit_denied(&self, actor: &str, node: &str, method: &str) -> Result<()> {
        sqlx::query("INSERT INTO audit_log (action, actor, node_name, detail) VALUES ('denied', $1, $2, $3)")
            .bind(actor)
            .bind(node)
            .bind(method)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn heartbeat(&self, name: &NodeName) -> Result<()> {
        let updated = sqlx::query("UPDATE nodes SET last_seen = now() WHERE name = $1")
            .bind(name.as_str())
            .execute(&self.pool)
            .await?
            .rows_affected();
        if updated == 0 {
            return Err(StoreError::UnknownNode(name.clone()));
        }
        Ok(())
    }

    /// Deletes a node: releases its addresses (audited one by one), removes
    /// it and records the topology change, all in one transaction.
    pub async fn delete_node(
        &self,
        name: &NodeName,
        actor: &str,
    ) -> Result<(u64, Vec<AllocationRecord>)> {
        let (history, quarantine) = (self.history_limit, self.quarantine);
        in_transaction!(self, "delete_node", tx, async {
            let revision = lock_topology(tx).await?;
            let exists: Option<String> =
                sqlx::query_scalar("SELECT name FROM nodes WHERE name = $1 FOR UPDATE")
                    .bind(name.as_str())
                    .fetch_optional(&mut **tx)
                    .await?;
            if exists.is_none() {
                return Err(StoreError::UnknownNode(name.clone()));
            }
            let audit = ("node_delete", None);
            remove_node(
                tx,
                name.as_str(),
                actor,
                audit,
                revision,
                history,
                quarantine,
            )
            .await
        })
    }

    /// Nodes that have not heartbeated for `after`: their names and how
    /// long each has been silent. Only candidates: [`Self::fence_stale_node`]
    /// decides under the node's lock.
    pub async fn stale_nodes(&self, after: std::time::Duration) -> Result<Vec<(String, f64)>> {
        Ok(sqlx::query_as(
            "SELECT name, extract(epoch FROM now() - last_seen)::float8 FROM nodes
             WHERE last_seen < now() - make_interval(secs => $1) ORDER BY name",
        )
        .bind(after.as_secs_f64())
        .fetch_all(&self.pool)
        .await?)
    }

    /// The stale-node policy's deletion of `name`: as [`Self::delete_node`]
    /// (addresses released, the block quarantined, then reclaimed, the
    /// node fenced: its agent must register anew), audited as
    /// `node_stale`, and only if the node is still silent for `after` under
    /// its row lock, so a heartbeat that commits first keeps it. `None`
    /// when it was kept (or is gone).
    pub async fn fence_stale_node(
        &self,
        name: &str,
        after: std::time::Duration,
        actor: &str,
    ) -> Result<Option<(u64, Vec<AllocationRecord>)>> {
        let (history, quarantine) = (self.history_limit, self.quarantine);
        in_transaction!(self, "fence_stale_node", tx, async {
            let revision = lock_topology(tx).await?;
            // FOR UPDATE re-reads a row a heartbeat changed meanwhile and
            // applies the condition to that version.
            let silent: Option<f64> = sqlx::query_scalar(
                "SELECT extract(epoch FROM now() - last_seen)::float8 FROM nodes
                 WHERE name = $1 AND last_seen < now() - make_interval(secs => $2)
                 FOR UPDATE",
            )
            .bind(name)
            .bind(after.as_secs_f64())
            .fetch_optional(&mut **tx)
            .await?;
            let Some(silent) = silent else {
                return Ok(None);
            };
            let why = format!(
                "no heartbeat for {silent:.0} s (stale after {} s); block quarantined",
                after.as_secs()
            );
            let audit = ("node_stale", Some(why.as_str()));
            Ok(Some(
                remove_node(tx, name, actor, audit, revision, history, quarantine).await?,
            ))
        })
    }

    /// Blocks held back from other nodes now (a deleted or stale node's).
    pub async fn quarantined_blocks(&self) -> Result<u32> {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM retired_blocks WHERE until > now()")
            .fetch_one(&self.pool)
            .await?;
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }

    /// The whole peer set and the revision it is current at, read from one
    /// snapshot of the database.
    pub async fn peer_snapshot(&self) -> Result<(u64, Vec<PeerRecord>)> {
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *tx)
            .await?;
        let revision: i64 = sqlx::query_scalar("SELECT revision FROM topology_revision")
            .fetch_one(&mut *tx)
            .await?;
        let rows: Vec<(String, IpAddr, String, IpNet)> = sqlx::query_as(
            "SELECT name, underlay_ip, vtep_mac::text, block FROM nodes ORDER BY name",
        )
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        let peers = rows
            .into_iter()
            .map(|(node_name, ip, vtep_mac, block)| {
                Ok(PeerRecord {
                    node_name,
                    underlay_ip: to_v4(ip)?,
                    vtep_mac,
                    block: to_block(block)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok((rev_u64(revision), peers))
    }

    pub async fn current_revision(&self) -> Result<u64> {
        let revision: i64 = sqlx::query_scalar("SELECT revision FROM topology_revision")
            .fetch_one(&self.pool)
            .await?;
        Ok(rev_u64(revision))
    }

    /// Every change after `since`, oldest first, or `None` when the history
    /// no longer reaches back that far (or `since` is from a newer database)
    /// and the caller needs a snapshot.
    pub async fn events_since(&self, since: u64) -> Result<Option<Vec<TopologyEvent>>> {
        self.events_after(since, true).await
    }

    /// The next page (at most [`MAX_REPLAY`]) of changes after `since`, for
    /// the feed, which follows every change however far behind a burst left
    /// it; `None` only when the history no longer reaches back that far.
    pub async fn events_page(&self, since: u64) -> Result<Option<Vec<TopologyEvent>>> {
        self.events_after(since, false).await
    }

    /// `bounded`: a caller further behind than [`MAX_REPLAY`] gets `None`
    /// (a snapshot is cheaper than the replay).
    async fn events_after(&self, since: u64, bounded: bool) -> Result<Option<Vec<TopologyEvent>>> {
        let since_i = i64::try_from(since).unwrap_or(i64::MAX);
        let mut tx = self.pool.begin().await?;
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .execute(&mut *tx)
            .await?;
        let (current, oldest): (i64, Option<i64>) = sqlx::query_as(
            "SELECT r.revision, (SELECT min(revision) FROM topology_events)
             FROM topology_revision r",
        )
        .fetch_one(&mut *tx)
        .await?;
        if since_i > current {
            return Ok(None);
        }
        if since_i == current {
            return Ok(Some(Vec::new()));
        }
        match oldest {
            Some(oldest) if oldest <= since_i + 1 => {}
            _ => return Ok(None),
        }
        // A watcher this far behind costs less as a snapshot than a replay.
        if bounded && current - since_i > MAX_REPLAY {
            return Ok(None);
        }
        let rows: Vec<EventRow> = sqlx::query_as(
            "SELECT revision, node_name, kind, underlay_ip, vtep_mac::text AS vtep_mac, block
             FROM topology_events WHERE revision > $1 ORDER BY revision LIMIT $2",
        )
        .bind(since_i)
        .bind(MAX_REPLAY)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
        rows.into_iter()
            .map(event_from_row)
            .collect::<Result<_>>()
            .map(Some)
    }
}

// === transaction steps ===

/// Takes the topology row lock: topology changes commit one at a time and
/// in revision order, so a reader that sees revision N has seen all below.
async fn lock_topology(tx: &mut Transaction<'static, Postgres>) -> Result<u64> {
    let revision: i64 = sqlx::query_scalar("SELECT revision FROM topology_revision FOR UPDATE")
        .fetch_one(&mut **tx)
        .await?;
    Ok(rev_u64(revision))
}

async fn bump_topology(
    tx: &mut Transaction<'static, Postgres>,
    revision: u64,
    history_limit: i64,
) -> Result<u64> {
    let next = revision + 1;
    sqlx::query("UPDATE topology_revision SET revision = $1")
        .bind(rev_i64(next)?)
        .execute(&mut **tx)
        .await?;
    sqlx::query("DELETE FROM topology_events WHERE revision <= $1")
        .bind(rev_i64(next)? - history_limit)
        .execute(&mut **tx)
        .await?;
    // Delivered at commit, to this replica's feed and every other one's.
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(TOPOLOGY_CHANNEL)
        .bind(next.to_string())
        .execute(&mut **tx)
        .await?;
    Ok(next)
}

/// The body of a node's deletion (audited as `action` with `detail`), the
/// node row locked by the caller:
/// its addresses released (audited), its block quarantined (its agent may
/// still run pods in it), the row gone and the topology change recorded.
async fn remove_node(
    tx: &mut Transaction<'static, Postgres>,
    name: &str,
    actor: &str,
    (action, detail): (&str, Option<&str>),
    revision: u64,
    history: i64,
    quarantine: std::time::Duration,
) -> Result<(u64, Vec<AllocationRecord>)> {
    let released = release_where_node(tx, name, &[], "release", actor, false).await?;
    sqlx::query(
        "INSERT INTO retired_blocks (block_index, block, node_name, until)
         SELECT block_index, block, name, now() + make_interval(secs => $2)
         FROM nodes WHERE name = $1
         ON CONFLICT (block_index) DO UPDATE
         SET block = EXCLUDED.block, node_name = EXCLUDED.node_name,
             retired_at = now(), until = EXCLUDED.until",
    )
    .bind(name)
    .bind(quarantine.as_secs_f64())
    .execute(&mut **tx)
    .await?;
    sqlx::query("DELETE FROM nodes WHERE name = $1")
        .bind(name)
        .execute(&mut **tx)
        .await?;
    let revision = bump_topology(tx, revision, history).await?;
    sqlx::query(
        "INSERT INTO topology_events (revision, node_name, kind) VALUES ($1, $2, 'delete')",
    )
    .bind(rev_i64(revision)?)
    .bind(name)
    .execute(&mut **tx)
    .await?;
    sqlx::query("INSERT INTO audit_log (action, actor, node_name, detail) VALUES ($1, $2, $3, $4)")
        .bind(action)
        .bind(actor)
        .bind(name)
        .bind(detail)
        .execute(&mut **tx)
        .await?;
    Ok((revision, released))
}

async fn audit_node(
    tx: &mut Transaction<'static, Postgres>,
    action: &str,
    actor: &str,
    node: &str,
) -> Result<()> {
    sqlx::query("INSERT INTO audit_log (action, actor, node_name) VALUES ($1, $2, $3)")
        .bind(action)
        .bind(actor)
        .bind(node)
        .execute(&mut **tx)
        .await?;
    Ok(())
}
