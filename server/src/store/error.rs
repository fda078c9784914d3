//! The store's errors: domain outcomes a caller acts on (unknown node,
//! exhausted block, a claimed endpoint), and database failures kept opaque
//! so no SQL text reaches a client; `is_unavailable` tells a database that
//! is away (retry) from one that refused.

use ipnet::{IpNet, Ipv4Net};
use thiserror::Error;
use weft_core::{
    domain::{ContainerId, IfName, NodeName},
    ipam::NodeBlock,
};

/// How often a transaction that lost a race (unique violation, serialization
/// failure, deadlock) is retried before the caller sees `Conflict`.
pub const MAX_ATTEMPTS: u64 = 5;

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
    #[error(
        "node {node} is at epoch {current}, the caller at {epoch}: the node was deleted and registered again; \
         the caller's reserve is void (restart weft-agent)"
    )]
    StaleEpoch {
        node: NodeName,
        epoch: u64,
        current: u64,
    },
    #[error(
        "node {node} heartbeated {seconds} s ago: its agent still wires {address} if its pod runs, \
         and releases it by itself once the pod is gone; delete the node if it is dead"
    )]
    NodeAlive {
        node: String,
        address: std::net::Ipv4Addr,
        seconds: i64,
    },
    #[error("{0} is not allocated")]
    NotAllocated(std::net::Ipv4Addr),
    #[error("concurrent updates kept conflicting after {MAX_ATTEMPTS} attempts; retry")]
    Conflict,
    #[error("unexpected data in the database: {0}")]
    Corrupt(String),
    /// The database failed; the cause is for the server log, never for a
    /// client, and callers branch on `is_unavailable`, not on its insides.
    #[error("database error: {0}")]
    Database(DatabaseError),
    /// The database did not answer in time (it may be gone without a RST).
    #[error("the database did not answer in time {0}")]
    TimedOut(&'static str),
    /// One failure handed to several callers (a read they shared).
    #[error("{0}")]
    Shared(std::sync::Arc<StoreError>),
}

/// A database failure, opaque outside the store.
#[derive(Debug, Error)]
#[error(transparent)]
pub struct DatabaseError(sqlx::Error);

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        StoreError::Database(DatabaseError(e))
    }
}

impl StoreError {
    /// Races that a fresh transaction resolves: the loser of a unique
    /// constraint, a serialization failure, a deadlock victim.
    pub(crate) fn is_retryable(&self) -> bool {
        let StoreError::Database(DatabaseError(sqlx::Error::Database(e))) = self else {
            return false;
        };
        e.is_unique_violation() || matches!(e.code().as_deref(), Some("40001" | "40P01"))
    }

    /// The database is away or restarting: the caller should retry later,
    /// not report a failure of its request.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::Database(DatabaseError(e)) => sqlx_unavailable(e),
            StoreError::TimedOut(_) => true,
            StoreError::Shared(e) => e.is_unavailable(),
            _ => false,
        }
    }
}

/// Errors that a database restart, failover or network loss produce.
fn sqlx_unavailable(e: &sqlx::Error) -> bool {
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
        assert!(StoreError::from(sqlx::Error::PoolTimedOut).is_unavailable());
        assert!(
            StoreError::from(sqlx::Error::Io(std::io::Error::from(
                std::io::ErrorKind::ConnectionRefused
            )))
            .is_unavailable()
        );
        assert!(!StoreError::Conflict.is_unavailable());
    }
}
