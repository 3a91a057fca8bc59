//! [`DedupStore`] on PostgreSQL: one row per key in `cloudbus_dedup`, claimed
//! atomically with `INSERT ... ON CONFLICT DO UPDATE ... WHERE expired`, expiring by
//! the database's clock, and swept of expired rows as it is used.

use std::time::Duration;

use async_trait::async_trait;
use cloudbus_core::{Claim, DedupStore, Result};
use sqlx::PgPool;

use crate::clock::millis;
use crate::error::from_sqlx;
use crate::sweep::{SweepSchedule, delete_in_chunks};

/// How often a store deletes the rows that expired.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// Idempotent consumers' memory on PostgreSQL, shared by every instance of a
/// service: a key claimed by one is in progress for all, and done for all once
/// completed, until its TTL ends. Bounded by expiry: expired rows are deleted every
/// minute by the store in use (or by [`purge_expired`](Self::purge_expired)).
///
/// ```no_run
/// # async fn demo() -> cloudbus_core::Result<()> {
/// use std::sync::Arc;
/// use cloudbus_core::{Event, HandlerContext, HandlerError, Idempotent};
/// use cloudbus_store::postgres::{PostgresDedupStore, migrate};
/// let pool = sqlx::PgPool::connect("postgres://app@127.0.0.1/app").await.unwrap();
/// migrate(&pool).await?;
/// let handler = Idempotent::new(
///     |_e: Arc<Event>, _c: HandlerContext| async { Ok::<(), HandlerError>(()) },
///     Arc::new(PostgresDedupStore::new(pool)),
/// );
/// # let _ = handler; Ok(()) }
/// ```
pub struct PostgresDedupStore {
    pool: PgPool,
    sweeps: SweepSchedule,
}

impl PostgresDedupStore {
    /// A store on `pool` (whose database [`migrate`](super::migrate) has prepared).
    pub fn new(pool: PgPool) -> Self {
        PostgresDedupStore {
            pool,
            sweeps: SweepSchedule::every(SWEEP_EVERY),
        }
    }

    /// Deletes every expired key; returns how many.
    pub async fn purge_expired(&self) -> Result<u64> {
        delete_in_chunks(|rows| async move {
            Ok(sqlx::query(
                "DELETE FROM cloudbus_dedup WHERE key IN (
                         SELECT key FROM cloudbus_dedup WHERE expires_at <= now() LIMIT $1)",
            )
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
            let store = PostgresDedupStore::new(self.pool.clone());
            tokio::spawn(async move {
                if let Err(e) = store.purge_expired().await {
                    tracing::warn!(error = %e, "dedup store: sweeping expired keys failed; the next sweep tries again");
                }
            });
        }
    }
}

#[async_trait]
impl DedupStore for PostgresDedupStore {
    async fn claim(&self, key: &str, lease: Duration) -> Result<Claim> {
        self.sweep_if_due();
        loop {
            let claimed = sqlx::query(
                "INSERT INTO cloudbus_dedup (key, done, expires_at)
                 VALUES ($1, false, now() + $2 * interval '1 millisecond')
                 ON CONFLICT (key) DO UPDATE
                     SET done = false, expires_at = EXCLUDED.expires_at
                     WHERE cloudbus_dedup.expires_at <= now()
                 RETURNING key",
            )
            .bind(key)
            .bind(millis(lease))
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| from_sqlx("dedup store: claim", e))?;
            if claimed.is_some() {
                return Ok(Claim::Claimed);
            }
            let done: Option<bool> =
                sqlx::query_scalar("SELECT done FROM cloudbus_dedup WHERE key = $1")
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
             VALUES ($1, true, now() + $2 * interval '1 millisecond')
             ON CONFLICT (key) DO UPDATE SET done = true, expires_at = EXCLUDED.expires_at",
        )
        .bind(key)
        .bind(millis(ttl))
        .execute(&self.pool)
        .await
        .map_err(|e| from_sqlx("dedup store: complete", e))?;
        Ok(())
    }

    async fn release(&self, key: &str) -> Result<()> {
        sqlx::query("DELETE FROM cloudbus_dedup WHERE key = $1 AND NOT done")
            .bind(key)
            .execute(&self.pool)
            .await
            .map_err(|e| from_sqlx("dedup store: release", e))?;
        Ok(())
    }
}
