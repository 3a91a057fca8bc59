//! [`DedupStore`] on PostgreSQL: one row per key in `cloudbus_dedup`, claimed
//! atomically with `INSERT ... ON CONFLICT DO UPDATE ... WHERE expired OR ours`,
//! expiring by the database's clock (so instances whose clocks disagree still agree
//! on leases), and swept of expired rows as it is used. A claim row names its owner:
//! only the owner renews or releases it. A key PostgreSQL cannot hold as it is (longer
//! than a B-tree entry may be, or with a NUL character, which `text` refuses) is
//! stored as its SHA-256 digest, so that no event is refused for its id.

use std::borrow::Cow;
use std::time::Duration;

use async_trait::async_trait;
use cloudbus_core::{Claim, DedupStore};
use cloudbus_driver::Result;
use sqlx::PgPool;

use crate::clock::millis;
use crate::error::from_sqlx;
use crate::sweep::{SweepSchedule, delete_in_chunks};

/// How often a store deletes the rows that expired.
const SWEEP_EVERY: Duration = Duration::from_secs(60);

/// The longest key stored as it is, in bytes: well within the 2,704 bytes a B-tree
/// index entry may take (a longer key failed every claim with "index row size
/// exceeds maximum", and its event was retried until it was dead-lettered unhandled).
const MAX_PLAIN_KEY_BYTES: usize = 1024;

/// `key` as the table holds it: itself, or for a key too long for the primary key's
/// index or with a NUL character (`text` refuses it), its digest after U+001F and
/// `sha256:`, a prefix no key starts with in practice (`Idempotent`'s keys start with
/// the event's source).
fn stored_key(key: &str) -> Cow<'_, str> {
    if key.len() <= MAX_PLAIN_KEY_BYTES && !key.contains('\0') {
        Cow::Borrowed(key)
    } else {
        Cow::Owned(format!(
            "\u{1f}sha256:{}",
            cloudbus_driver::hashing::hex_sha256(&[key.as_bytes()])
        ))
    }
}

/// Idempotent consumers' memory on PostgreSQL, shared by every instance of a
/// service: a key claimed by one is in progress for all, and done for all once
/// completed, until its TTL ends. Bounded by expiry: expired rows are deleted every
/// minute by the store in use (or by [`purge_expired`](Self::purge_expired)).
///
/// ```no_run
/// # async fn demo() -> cloudbus_driver::Result<()> {
/// use std::sync::Arc;
/// use cloudbus_core::{HandlerContext, HandlerError, Idempotent};
/// use cloudbus_driver::Event;
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
    async fn claim(&self, key: &str, owner: &str, lease: Duration) -> Result<Claim> {
        self.sweep_if_due();
        let key = stored_key(key);
        loop {
            // A new key, an expired one (done or claimed: taken over), or our own
            // running claim (renewed); a row claimed before migration 3 has no owner
            // and is nobody's to renew.
            let claimed = sqlx::query(
                "INSERT INTO cloudbus_dedup (key, done, expires_at, owner)
                 VALUES ($1, false, now() + $2 * interval '1 millisecond', $3)
                 ON CONFLICT (key) DO UPDATE
                     SET done = false, expires_at = EXCLUDED.expires_at, owner = EXCLUDED.owner
                     WHERE cloudbus_dedup.expires_at <= now()
                        OR (NOT cloudbus_dedup.done AND cloudbus_dedup.owner = EXCLUDED.owner)
                 RETURNING key",
            )
            .bind(&*key)
            .bind(millis(lease))
            .bind(owner)
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| from_sqlx("dedup store: claim", e))?;
            if claimed.is_some() {
                return Ok(Claim::Claimed);
            }
            let done: Option<bool> =
                sqlx::query_scalar("SELECT done FROM cloudbus_dedup WHERE key = $1")
                    .bind(&*key)
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
        let key = stored_key(key);
        sqlx::query(
            "INSERT INTO cloudbus_dedup (key, done, expires_at)
             VALUES ($1, true, now() + $2 * interval '1 millisecond')
             ON CONFLICT (key) DO UPDATE SET done = true, expires_at = EXCLUDED.expires_at",
        )
        .bind(&*key)
        .bind(millis(ttl))
        .execute(&self.pool)
        .await
        .map_err(|e| from_sqlx("dedup store: complete", e))?;
        Ok(())
    }

    async fn release(&self, key: &str, owner: &str) -> Result<()> {
        let key = stored_key(key);
        sqlx::query("DELETE FROM cloudbus_dedup WHERE key = $1 AND NOT done AND owner = $2")
            .bind(&*key)
            .bind(owner)
            .execute(&self.pool)
            .await
            .map_err(|e| from_sqlx("dedup store: release", e))?;
        Ok(())
    }
}
