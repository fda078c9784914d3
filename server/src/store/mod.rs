//! PostgreSQL persistence: nodes, allocations, the audit log and the
//! topology event history. Each mutation is one transaction that also writes
//! its audit row, so a failed call leaves nothing half-written. The unique
//! constraints of the schema, not locks in this process, keep an address or
//! a block from being handed out twice; the row locks taken here only make
//! concurrent callers queue instead of failing and retrying.

//!
//! By concern: [`topology`] (nodes, registration, the event history),
//! [`ipam`] (allocate, release, GC), [`reserves`] (per-node reserves:
//! reserve, report, sync), [`admin`] (read-only queries),
//! [`error`] (domain outcomes and opaque database failures), [`records`]
//! (what callers get), [`rows`] (what sqlx reads). Decisions that need no
//! database (block layout, round-robin, address arithmetic) live in
//! weft-core.

use std::time::Duration;

use ipnet::IpNet;
use sqlx::{PgPool, postgres::PgPoolOptions};

use weft_core::ipam::ClusterLayout;

/// Channel the server NOTIFYs on after each topology change, so every
/// replica's feed wakes up.
pub const TOPOLOGY_CHANNEL: &str = "weft_topology";

pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

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
                Ok(value) => txn
                    .commit()
                    .await
                    .map(|()| value)
                    .map_err($crate::store::StoreError::from),
                Err(e) => Err(e),
            };
            match result {
                Err(e) if e.is_retryable() && attempt < $crate::store::MAX_ATTEMPTS => {
                    ::tracing::debug!(what = $what, attempt, error = %e, "transaction lost a race; retrying");
                    ::tokio::time::sleep(::std::time::Duration::from_millis(2 * attempt)).await;
                }
                Err(e) if e.is_retryable() => {
                    ::tracing::warn!(what = $what, error = %e, "giving up after repeated conflicts");
                    break Err($crate::store::StoreError::Conflict);
                }
                other => break other,
            }
        }
    }};
}

mod admin;
mod error;
mod ipam;
mod records;
mod reserves;
mod rows;
mod topology;

pub use admin::NodeUse;
pub use error::{DatabaseError, MAX_ATTEMPTS, Result, StoreError, sqlstate_unavailable};
pub use records::*;
pub use reserves::MAX_RESERVE;

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
pub const DEFAULT_QUARANTINE: Duration = Duration::from_secs(3600);

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

    /// How long an agent may bind from its reserve without hearing from
    /// a server: half the quarantine, so an agent cut off from a deleted
    /// node's server stops binding well before its block can move.
    pub fn reserve_lease(&self) -> Duration {
        self.quarantine / 2
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
}
