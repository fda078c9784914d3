//! Reaching the database at start: connect (waiting out a database that is
//! away, starting or failing over) and make sure the schema is current,
//! without needing the serving role to own it.

use std::time::Duration;

use anyhow::Context as _;
use sqlx::PgPool;
use tracing::{info, warn};

use crate::store::{MIGRATOR, Store};

/// Connects, retrying while the database is unreachable, starting up or
/// shutting down (it may start after us, or be failing over); a wrong URL
/// or password fails at once.
pub async fn connect_with_retry(url: &str) -> anyhow::Result<PgPool> {
    let mut delay = Duration::from_millis(250);
    loop {
        match Store::connect(url).await {
            Ok(pool) => return Ok(pool),
            Err(e) if e.is_unavailable() => {
                warn!(error = %e, retry_in = ?delay, "database unreachable; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            Err(e) => return Err(e).context("connecting to PostgreSQL"),
        }
    }
}

/// Serving needs the schema at the binary's version. In the two-role set-up
/// (docs/security.md) `weft-server migrate` runs as the owning role and the
/// serving role could not migrate anyway; a single-role database is
/// migrated here, with a warning that its audit log is not protected.
pub async fn ensure_migrated(pool: &PgPool) -> anyhow::Result<()> {
    let applied: Vec<i64> =
        match sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
            .fetch_all(pool)
            .await
        {
            Ok(v) => v,
            // No migrations table yet: a new database.
            Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => Vec::new(),
            Err(e) => return Err(e).context("reading the applied migrations"),
        };
    let pending: Vec<i64> = MIGRATOR
        .iter()
        .map(|m| m.version)
        .filter(|v| !applied.contains(v))
        .collect();
    if !pending.is_empty() {
        info!(?pending, "applying database migrations");
        MIGRATOR.run(pool).await.context(
            "applying database migrations; if this role may not change the schema, \
             run `weft-server migrate` as the schema owner first (docs/security.md)",
        )?;
    }
    let owns_audit: bool = sqlx::query_scalar(
        "SELECT pg_has_role(current_user, tableowner, 'USAGE') FROM pg_tables WHERE tablename = 'audit_log'",
    )
    .fetch_one(pool)
    .await
    .context("checking who owns audit_log")?;
    if owns_audit {
        warn!(
            "the serving database role owns audit_log and could rewrite it; serve as a role that only reads and appends (docs/security.md)"
        );
    }
    Ok(())
}
