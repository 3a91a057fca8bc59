//! [`DedupStore`] on SQLite: one row per key in `cloudbus_dedup`, claimed
//! atomically with `INSERT ... ON CONFLICT DO UPDATE ... WHERE expired OR ours`,
//! expiring by the process's clock (Unix milliseconds), and swept of expired rows as
//! it is used. A claim row names its owner: only the owner renews or releases it.

use std::time::Duration;

use async_trait::async_trait;
use cloudbus_core::{Claim, DedupStore};
use cloudbus_driver::Result;
use sqlx::SqlitePool;

use crate::clock::{millis, unix_millis_now};
use crate::error::from_sqlx;
use crate::sweep::{SweepSchedule, delete_in_chunks};

/// How often a store deletes the rows that expired.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Idempotent consumers' memory on SQLite, shared by every instance of a
/// service: a key claimed by one is in progress for all, and done for all once
/// completed, until its TTL ends. Bounded by expiry: expired rows are deleted every
/// minute by the store in use (or by [`purge_expired`](Self::purge_expired)).
///
/// ```no_run
/// # async fn demo() -> cloudbus_driver::Result<()> {
/// use std::sync::Arc;
/// use cloudbus_core::{HandlerContext, HandlerError, Idempotent};
/// use cloudbus_driver::Event;
/// use cloudbus_store::sqlite::{SqliteDedupStore, migrate};
/// let pool = sqlx::SqlitePool::connect("sqlite://app.db?mode=rwc").await.unwrap();
/// migrate(&pool).await?;
/// let handler = Idempotent::new(
///     |_e: Arc<Event>, _c: HandlerContext| async { Ok::<(), HandlerError>(()) },
///     Arc::new(SqliteDedupStore::new(pool)),
/// );
/// # let _ = handler; Ok(()) }
/// ```
pub struct SqliteDedupStore {
    pool: SqlitePool,
    sweeps: SweepSchedule,
}

impl SqliteDedupStore {
    /// A store on `pool` (whose database [`migrate`](super::migrate) has prepared).
    pub fn new(pool: SqlitePool) -> Self {
        SqliteDedupStore {
            pool,
            sweeps: SweepSchedule::every(SWEEP_EVERY),
        }
    }

    /// Deletes every expired key; returns how many.
    pub async fn purge_expired(&self) -> Result<u64> {
        delete_in_chunks(|rows| async move {
            Ok(sqlx::query(
                "DELETE FROM cloudbus_dedup WHERE key IN (
                         SELECT key FROM cloudbus_dedup WHERE expires_at <= ?1 LIMIT ?2)",
            )
            .bind(unix_millis_now())
            .bind(rows)
            .execute(&self.pool)
            .await
            .map_err(|e| from_sqlx("dedup store: purge expired", e))?
            .rows_affected())
        })
        .await
    }

    /// Sweeps expired rows when the last sweep is a minute old (in the background).
    fn sweep_if_due(&self) {
        if self.sweeps.due() {
            let store = SqliteDedupStore::new(self.pool.clone());
            tokio::spawn(async move {
                if let Err(e) = store.purge_expired().await {
                    tracing::warn!(error = %e, "dedup store: sweeping expired keys failed; the next sweep tries again");
                }
            });
        }
    }
}

#[async_trait]
impl DedupStore for SqliteDedupStore {
    async fn claim(&self, key: &str, owner: &str, lease: Duration) -> Result<Claim> {
        self.sweep_if_due();
        loop {
            let now = unix_millis_now();
            // A new key, an expired one (done or claimed: taken over), or our own
            // running claim (renewed); a row claimed before migration 3 has no owner
            // and is nobody's to renew.
            let claimed = sqlx::query(
                "INSERT INTO cloudbus_dedup (key, done, expires_at, owner)
                 VALUES (?1, 0, ?2 + ?3, ?4)
                 ON CONFLICT (key) DO UPDATE
                     SET done = 0, expires_at = excluded.expires_at, owner = excluded.owner
                     WHERE cloudbus_dedup.expires_at <= ?2
                        OR (cloudbus_dedup.done = 0 AND cloudbus_dedup.owner = excluded.owner)
                 RETURNING key",
            )
            .bind(key)
            .bind(now)
            .bind(millis(lease))
            .bind(owner)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| from_sqlx("dedup store: claim", e))?;
            if claimed.is_some() {
                return Ok(Claim::Claimed);
            }
            let done: Option<bool> =
                sqlx::query_scalar("SELECT done FROM cloudbus_dedup WHERE key = ?1")
                    .bind(key)
                    .fetch_optional(&self.pool)
                    .await
                    .map_err(|e| from_sqlx("dedup store: claim", e))?;
            match done {
                Some(true) => return Ok(Claim::Done),
                Some(false) => return Ok(Claim::InProgress),
                // Released between the two statements: claim again.
                None => continue,
            }
        }
    }

    async fn complete(&self, key: &str, ttl: Duration) -> Result<()> {
        sqlx::query(
            "INSERT INTO cloudbus_dedup (key, done, expires_at)
             VALUES (?1, 1, ?2 + ?3)
             ON CONFLICT (key) DO UPDATE SET done = 1, expires_at = excluded.expires_at",
        )
        .bind(key)
        .bind(unix_millis_now())
        .bind(millis(ttl))
        .execute(&self.pool)
        .await
        .map_err(|e| from_sqlx("dedup store: complete", e))?;
        Ok(())
    }

    async fn release(&self, key: &str, owner: &str) -> Result<()> {
        sqlx::query("DELETE FROM cloudbus_dedup WHERE key = ?1 AND done = 0 AND owner = ?2")
            .bind(key)
            .bind(owner)
            .execute(&self.pool)
            .await
            .map_err(|e| from_sqlx("dedup store: release", e))?;
        Ok(())
    }
}
