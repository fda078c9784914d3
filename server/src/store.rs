//! PostgreSQL persistence: nodes, allocations, the audit log and the
//! topology event history. Each mutation is one transaction that also writes
//! its audit row, so a failed call leaves nothing half-written. The unique
//! constraints of the schema, not locks in this process, keep an address or
//! a block from being handed out twice; the row locks taken here only make
//! concurrent callers queue instead of failing and retrying.

use std::{
    collections::HashSet,
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use chrono::{DateTime, Utc};
use ipnet::{IpNet, Ipv4Net};
use sqlx::{PgPool, Postgres, Transaction, postgres::PgPoolOptions};
use thiserror::Error;
use tracing::{debug, warn};

use crate::{
    domain::{Attachment, ContainerId, IfName, MacAddr, NodeName, PodRef, UnderlayIp},
    ipam::{ClusterLayout, NodeBlock},
};

/// Channel the server NOTIFYs on after each topology change, so every
/// replica's feed wakes up.
pub const TOPOLOGY_CHANNEL: &str = "weft_topology";

/// How often a transaction that lost a race (unique violation, serialization
/// failure, deadlock) is retried before the caller sees `Conflict`.
const MAX_ATTEMPTS: u64 = 5;

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

#[derive(Debug, Error)]
pub enum StoreError {
    #[error("node {0} is not registered")]
    UnknownNode(NodeName),
    #[error("node {node}'s block {block} is exhausted: all {capacity} pod addresses are in use")]
    BlockExhausted {
        node: NodeName,
        block: NodeBlock,
        capacity: u32,
    },
    #[error(
        "cluster CIDR {cidr} has no free /{prefix} block left for node {node}: all {count} are assigned"
    )]
    NoFreeBlock {
        node: NodeName,
        cidr: Ipv4Net,
        prefix: u8,
        count: u32,
    },
    #[error("attachment {container_id}/{ifname} is allocated on node {owner}, not on {node}")]
    AttachmentOnOtherNode {
        container_id: ContainerId,
        ifname: IfName,
        owner: String,
        node: NodeName,
    },
    #[error(
        "node {node} holds block {block}, which does not fit cluster CIDR {cidr} with /{prefix} blocks; \
         the server was started with a different --cluster-cidr or --node-prefix-len than the database was built with"
    )]
    LayoutMismatch {
        node: String,
        block: IpNet,
        cidr: Ipv4Net,
        prefix: u8,
    },
    #[error(
        "{field} {value} is already registered by node {holder}; delete that node first if it is gone"
    )]
    EndpointTaken {
        field: &'static str,
        value: String,
        holder: String,
    },
    #[error(
        "the database was built for cluster CIDR {stored_cidr} with /{stored_prefix} node blocks, \
         but this server was started with {cidr} and /{prefix}; start it with the database's layout"
    )]
    LayoutChanged {
        stored_cidr: IpNet,
        stored_prefix: u8,
        cidr: Ipv4Net,
        prefix: u8,
    },
    #[error("concurrent updates kept conflicting after {MAX_ATTEMPTS} attempts; retry")]
    Conflict,
    #[error("unexpected data in the database: {0}")]
    Corrupt(String),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

impl StoreError {
    /// Races that a fresh transaction resolves: the loser of a unique
    /// constraint, a serialization failure, a deadlock victim.
    fn is_retryable(&self) -> bool {
        let StoreError::Database(sqlx::Error::Database(e)) = self else {
            return false;
        };
        e.is_unique_violation() || matches!(e.code().as_deref(), Some("40001" | "40P01"))
    }

    /// The database is away or restarting: the caller should retry later,
    /// not report a failure of its request.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Database(e) => sqlx_unavailable(e),
            _ => false,
        }
    }
}

/// Errors that a database restart, failover or network loss produce.
pub fn sqlx_unavailable(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::WorkerCrashed => true,
        // The connection died mid-message (server killed or restarted).
        sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => db.code().as_deref().is_some_and(sqlstate_unavailable),
        _ => false,
    }
}

/// SQLSTATEs of a server that is shutting down, starting up, in recovery
/// or out of connections (class 08: connection exceptions; 57P0x: operator
/// intervention; 53300: too many connections; 25006: read-only standby).
pub fn sqlstate_unavailable(code: &str) -> bool {
    code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03" | "53300" | "25006")
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// A node as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    pub name: String,
    pub underlay_ip: Ipv4Addr,
    pub vtep_mac: String,
    pub block: NodeBlock,
    pub registered_at: DateTime<Utc>,
    pub last_seen: DateTime<Utc>,
    pub allocated: u32,
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
}

/// What a registration did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub block: NodeBlock,
    pub revision: u64,
    pub changed: bool,
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
}

#[derive(Debug, Clone)]
pub struct Store {
    pool: PgPool,
    layout: ClusterLayout,
    history_limit: i64,
    /// How long a deleted node's block is held back from other nodes.
    quarantine: Duration,
}

/// Most topology events one read returns; a watcher further behind gets a
/// snapshot, which is smaller than the replay.
pub const MAX_REPLAY: i64 = 1024;
/// Default quarantine of a deleted node's block.
pub const DEFAULT_QUARANTINE: Duration = Duration::from_secs(600);

#[derive(sqlx::FromRow)]
struct NodeRow {
    name: String,
    underlay_ip: IpAddr,
    vtep_mac: String,
    block: IpNet,
    registered_at: DateTime<Utc>,
    last_seen: DateTime<Utc>,
    allocated: i64,
}

#[derive(sqlx::FromRow)]
struct AllocationRow {
    node_name: String,
    address: IpAddr,
    block: IpNet,
    container_id: String,
    ifname: String,
    pod_namespace: String,
    pod_name: String,
    pod_uid: String,
    allocated_at: DateTime<Utc>,
}

#[derive(sqlx::FromRow)]
struct EventRow {
    revision: i64,
    node_name: String,
    kind: String,
    underlay_ip: Option<IpAddr>,
    vtep_mac: Option<String>,
    block: Option<IpNet>,
}

#[derive(sqlx::FromRow)]
struct AuditRow {
    id: i64,
    at: DateTime<Utc>,
    action: String,
    actor: String,
    node_name: String,
    address: Option<IpAddr>,
    container_id: Option<String>,
    ifname: Option<String>,
    pod_namespace: Option<String>,
    pod_name: Option<String>,
    pod_uid: Option<String>,
}

/// Runs `$body` (an async block using `$tx: &mut Transaction`) in a fresh
/// transaction until it commits or fails with something a retry cannot fix.
macro_rules! in_transaction {
    ($store:expr, $what:literal, $tx:ident, $body:expr) => {{
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut txn = $store.pool.begin().await?;
            let result = {
                let $tx = &mut txn;
                $body.await
            };
            let result = match result {
                Ok(value) => txn.commit().await.map(|()| value).map_err(StoreError::from),
                Err(e) => Err(e),
            };
            match result {
                Err(e) if e.is_retryable() && attempt < MAX_ATTEMPTS => {
                    debug!(what = $what, attempt, error = %e, "transaction lost a race; retrying");
                    tokio::time::sleep(Duration::from_millis(2 * attempt)).await;
                }
                Err(e) if e.is_retryable() => {
                    warn!(what = $what, error = %e, "giving up after repeated conflicts");
                    break Err(StoreError::Conflict);
                }
                other => break other,
            }
        }
    }};
}

// === impl Store ===

impl Store {
    /// Connects with a bounded pool; a database that is down at start-up is
    /// reported by the caller, which decides whether to retry.
    pub async fn connect(url: &str) -> Result<PgPool> {
        Ok(PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await?)
    }

    pub fn new(pool: PgPool, layout: ClusterLayout, history_limit: u32) -> Self {
        Self {
            pool,
            layout,
            history_limit: i64::from(history_limit.max(1)),
            quarantine: DEFAULT_QUARANTINE,
        }
    }

    pub fn with_quarantine(mut self, quarantine: Duration) -> Self {
        self.quarantine = quarantine;
        self
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    pub fn layout(&self) -> ClusterLayout {
        self.layout
    }

    /// Fails if a stored node's block does not match the configured layout,
    /// so a changed --cluster-cidr cannot silently hand out overlapping blocks.
    pub async fn check_layout(&self) -> Result<()> {
        // The first server records its layout; every later one must match.
        sqlx::query(
            "INSERT INTO cluster_layout (cluster_cidr, node_prefix_len) VALUES ($1, $2)
             ON CONFLICT (singleton) DO NOTHING",
        )
        .bind(IpNet::V4(self.layout.cidr()))
        .bind(i32::from(self.layout.node_prefix()))
        .execute(&self.pool)
        .await?;
        let (stored_cidr, stored_prefix): (IpNet, i32) =
            sqlx::query_as("SELECT cluster_cidr, node_prefix_len FROM cluster_layout")
                .fetch_one(&self.pool)
                .await?;
        if stored_cidr != IpNet::V4(self.layout.cidr())
            || stored_prefix != i32::from(self.layout.node_prefix())
        {
            return Err(StoreError::LayoutChanged {
                stored_cidr,
                stored_prefix: u8::try_from(stored_prefix).unwrap_or(0),
                cidr: self.layout.cidr(),
                prefix: self.layout.node_prefix(),
            });
        }
        let rows: Vec<(String, i32, IpNet)> =
            sqlx::query_as("SELECT name, block_index, block FROM nodes ORDER BY name")
                .fetch_all(&self.pool)
                .await?;
        for (node, index, block) in rows {
            let expected = u32::try_from(index)
                .ok()
                .and_then(|i| self.layout.block(i))
                .map(|b| IpNet::V4(b.net()));
            if expected != Some(block) {
                return Err(StoreError::LayoutMismatch {
                    node,
                    block,
                    cidr: self.layout.cidr(),
                    prefix: self.layout.node_prefix(),
                });
            }
        }
        Ok(())
    }

    pub async fn ping(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    // --- topology ---

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
            let existing: Option<(IpAddr, String, IpNet)> = sqlx::query_as(
                "SELECT underlay_ip, vtep_mac::text, block FROM nodes WHERE name = $1",
            )
            .bind(name.as_str())
            .fetch_optional(&mut **tx)
            .await?;

            let (block, action) = match existing {
                Some((ip, stored_mac, block)) => {
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
                    (block, "node_update")
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
                    let own_retired = own_retired
                        .and_then(|i| u32::try_from(i).ok())
                        .filter(|i| !used.contains(i) && layout.block(*i).is_some());
                    let index = own_retired
                        .or_else(|| layout.first_free_block(&used))
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
                    sqlx::query(
                        "INSERT INTO nodes (name, underlay_ip, vtep_mac, block_index, block)
                         VALUES ($1, $2, $3::macaddr, $4, $5)",
                    )
                    .bind(name.as_str())
                    .bind(IpAddr::V4(underlay.addr()))
                    .bind(mac.to_string())
                    .bind(
                        i32::try_from(index)
                            .map_err(|_| StoreError::Corrupt("block index".into()))?,
                    )
                    .bind(IpNet::V4(block.net()))
                    .execute(&mut **tx)
                    .await?;
                    (block, "node_register")
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
        let history = self.history_limit;
        let quarantine = self.quarantine;
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
            let released = release_where_node(tx, name.as_str(), &[], "release", actor).await?;
            // Its agent may still run pods in the block: hold it back.
            sqlx::query(
                "INSERT INTO retired_blocks (block_index, block, node_name, until)
                 SELECT block_index, block, name, now() + make_interval(secs => $2)
                 FROM nodes WHERE name = $1
                 ON CONFLICT (block_index) DO UPDATE
                 SET block = EXCLUDED.block, node_name = EXCLUDED.node_name,
                     retired_at = now(), until = EXCLUDED.until",
            )
            .bind(name.as_str())
            .bind(quarantine.as_secs_f64())
            .execute(&mut **tx)
            .await?;
            sqlx::query("DELETE FROM nodes WHERE name = $1")
                .bind(name.as_str())
                .execute(&mut **tx)
                .await?;
            let revision = bump_topology(tx, revision, history).await?;
            sqlx::query(
                "INSERT INTO topology_events (revision, node_name, kind) VALUES ($1, $2, 'delete')",
            )
            .bind(rev_i64(revision)?)
            .bind(name.as_str())
            .execute(&mut **tx)
            .await?;
            audit_node(tx, "node_delete", actor, name.as_str()).await?;
            Ok((revision, released))
        })
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
        if current - since_i > MAX_REPLAY {
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

    // --- ipam ---

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
            let existing: Option<AllocationRow> = sqlx::query_as(
                "SELECT a.*, n.block FROM allocations a JOIN nodes n ON n.name = a.node_name
                 WHERE a.container_id = $1 AND a.ifname = $2",
            )
            .bind(attachment.container_id.as_str())
            .bind(attachment.ifname.as_str())
            .fetch_optional(&mut **tx)
            .await?;
            if let Some(row) = existing {
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

            // The block's used offsets, then the pure round-robin choice
            // (NodeBlock::next_free): one indexed read of at most a block's
            // worth of rows, and the decision is the unit-tested code.
            let used: Vec<i64> = sqlx::query_scalar(
                "SELECT address - $2::inet FROM allocations WHERE node_name = $1",
            )
            .bind(node.as_str())
            .bind(IpAddr::V4(block.net().network()))
            .fetch_all(&mut **tx)
            .await?;
            let used: HashSet<u32> = used
                .into_iter()
                .filter_map(|o| u32::try_from(o).ok())
                .collect();
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
            release_where_node(tx, node.as_str(), valid, "gc", actor).await
        })
    }

    // --- admin ---

    pub async fn list_nodes(&self) -> Result<Vec<NodeRecord>> {
        let rows: Vec<NodeRow> = sqlx::query_as(
            "SELECT n.name, n.underlay_ip, n.vtep_mac::text AS vtep_mac, n.block,
                    n.registered_at, n.last_seen,
                    (SELECT count(*) FROM allocations a WHERE a.node_name = n.name) AS allocated
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
                    (SELECT count(*) FROM allocations a WHERE a.node_name = n.name) AS allocated
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
        let (address, container) = match key {
            HistoryKey::Address(ip) => (Some(IpAddr::V4(*ip)), None),
            HistoryKey::Container(id) => (None, Some(id.as_str())),
        };
        // Two indexed arms rather than one OR, so each walks its index.
        let rows: Vec<AuditRow> = sqlx::query_as(
            "SELECT * FROM audit_log
             WHERE $1::inet IS NOT NULL AND address = $1 AND id > $3
             UNION ALL
             SELECT * FROM audit_log
             WHERE $2::text IS NOT NULL AND container_id = $2 AND id > $3
             ORDER BY id LIMIT $4",
        )
        .bind(address)
        .bind(container)
        .bind(after_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(audit_from_row).collect()
    }

    /// Used addresses per node, for utilization and metrics.
    pub async fn utilization(&self) -> Result<Vec<(String, NodeBlock, u32)>> {
        let rows: Vec<(String, IpNet, i64)> = sqlx::query_as(
            "SELECT n.name, n.block, count(a.address)
             FROM nodes n LEFT JOIN allocations a ON a.node_name = n.name
             GROUP BY n.name, n.block ORDER BY n.name",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter()
            .map(|(name, block, used)| Ok((name, to_block(block)?, count_u32(used))))
            .collect()
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

/// Deletes the node's allocations except `keep`, auditing each with `action`.
async fn release_where_node(
    tx: &mut Transaction<'static, Postgres>,
    node: &str,
    keep: &[Attachment],
    action: &str,
    actor: &str,
) -> Result<Vec<AllocationRecord>> {
    let keep_ids: Vec<&str> = keep.iter().map(|a| a.container_id.as_str()).collect();
    let keep_ifs: Vec<&str> = keep.iter().map(|a| a.ifname.as_str()).collect();
    let rows: Vec<AllocationRow> = sqlx::query_as(
        "WITH released AS (
            DELETE FROM allocations a USING nodes n
            WHERE a.node_name = $1 AND n.name = a.node_name
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
    .fetch_all(&mut **tx)
    .await?;
    rows.into_iter().map(allocation_from_row).collect()
}

// === row conversions ===

fn to_v4(ip: IpAddr) -> Result<Ipv4Addr> {
    match ip {
        IpAddr::V4(v4) => Ok(v4),
        IpAddr::V6(v6) => Err(StoreError::Corrupt(format!(
            "IPv6 address {v6} in an IPv4 column"
        ))),
    }
}

fn to_block(net: IpNet) -> Result<NodeBlock> {
    match net {
        IpNet::V4(v4) => Ok(NodeBlock::new(v4)),
        IpNet::V6(v6) => Err(StoreError::Corrupt(format!("IPv6 block {v6}"))),
    }
}

fn rev_u64(revision: i64) -> u64 {
    u64::try_from(revision).unwrap_or(0)
}

fn rev_i64(revision: u64) -> Result<i64> {
    i64::try_from(revision).map_err(|_| StoreError::Corrupt(format!("revision {revision}")))
}

fn count_u32(count: i64) -> u32 {
    u32::try_from(count).unwrap_or(u32::MAX)
}

fn node_from_row(row: NodeRow) -> Result<NodeRecord> {
    Ok(NodeRecord {
        name: row.name,
        underlay_ip: to_v4(row.underlay_ip)?,
        vtep_mac: row.vtep_mac,
        block: to_block(row.block)?,
        registered_at: row.registered_at,
        last_seen: row.last_seen,
        allocated: count_u32(row.allocated),
    })
}

fn allocation_from_row(row: AllocationRow) -> Result<AllocationRecord> {
    Ok(AllocationRecord {
        node_name: row.node_name,
        address: to_v4(row.address)?,
        block: to_block(row.block)?,
        container_id: row.container_id,
        ifname: row.ifname,
        pod: PodRef {
            namespace: row.pod_namespace,
            name: row.pod_name,
            uid: row.pod_uid,
        },
        allocated_at: row.allocated_at,
    })
}

fn event_from_row(row: EventRow) -> Result<TopologyEvent> {
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

fn audit_from_row(row: AuditRow) -> Result<AuditRecord> {
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
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restarting_or_failing_over_database_is_unavailable_not_internal() {
        for code in [
            "57P01", "57P02", "57P03", "08006", "08001", "53300", "25006",
        ] {
            assert!(sqlstate_unavailable(code), "{code}");
        }
        // A bug or a constraint is not something a retry fixes.
        for code in ["23505", "42P01", "42501", "22P02"] {
            assert!(!sqlstate_unavailable(code), "{code}");
        }
        assert!(StoreError::Database(sqlx::Error::PoolTimedOut).is_unavailable());
        assert!(
            StoreError::Database(sqlx::Error::Io(std::io::Error::from(
                std::io::ErrorKind::ConnectionRefused
            )))
            .is_unavailable()
        );
        assert!(!StoreError::Conflict.is_unavailable());
    }
}
