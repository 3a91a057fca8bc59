//! [`CheckpointStore`] on PostgreSQL: one row per (group, partition) in
//! `cloudbus_checkpoints` holding the checkpoint and the owner's lease; taking,
//! renewing and saving are single conditional upserts, so two readers never both own
//! a partition.

use std::time::Duration;

use async_trait::async_trait;
use cloudbus_core::CheckpointStore;
use cloudbus_driver::Result;
use sqlx::PgPool;

use crate::clock::millis;
use crate::error::from_sqlx;

/// Stream readers' checkpoints and partition leases on PostgreSQL: a restarted reader
/// resumes where the group's last one saved, and the readers of a group share the
/// partitions without both owning one.
///
/// ```no_run
/// # async fn demo(driver: std::sync::Arc<dyn cloudbus_driver::StreamDriver>) -> cloudbus_driver::Result<()> {
/// use std::sync::Arc;
/// use cloudbus_core::StreamConsumer;
/// use cloudbus_store::postgres::{PostgresCheckpointStore, migrate};
/// let pool = sqlx::PgPool::connect("postgres://app@127.0.0.1/app").await.unwrap();
/// migrate(&pool).await?;
/// let reader = StreamConsumer::new(driver, "analytics")
///     .checkpoints(Arc::new(PostgresCheckpointStore::new(pool)));
/// # let _ = reader; Ok(()) }
/// ```
pub struct PostgresCheckpointStore {
    pool: PgPool,
}

impl PostgresCheckpointStore {
    /// A store on `pool` (whose database [`migrate`](super::migrate) has prepared).
    pub fn new(pool: PgPool) -> Self {
        PostgresCheckpointStore { pool }
    }
}

#[async_trait]
impl CheckpointStore for PostgresCheckpointStore {
    async fn load(&self, group: &str, partition: &str) -> Result<Option<String>> {
        let sequence: Option<Option<String>> = sqlx::query_scalar(
            "SELECT sequence FROM cloudbus_checkpoints
             WHERE consumer_group = $1 AND partition_id = $2",
        )
        .bind(group)
        .bind(partition)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| from_sqlx("checkpoint store: load", e))?;
        Ok(sequence.flatten())
    }

    async fn save(
        &self,
        group: &str,
        partition: &str,
        owner: &str,
        sequence: &str,
    ) -> Result<bool> {
        let saved = sqlx::query(
            "INSERT INTO cloudbus_checkpoints (consumer_group, partition_id, sequence)
             VALUES ($1, $2, $4)
             ON CONFLICT (consumer_group, partition_id) DO UPDATE
                 SET sequence = EXCLUDED.sequence
                 WHERE cloudbus_checkpoints.owner IS NULL
                    OR cloudbus_checkpoints.owner = $3
                    OR cloudbus_checkpoints.lease_until <= now()
             RETURNING 1",
        )
        .bind(group)
        .bind(partition)
        .bind(owner)
        .bind(sequence)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| from_sqlx("checkpoint store: save", e))?;
        Ok(saved.is_some())
    }

    async fn acquire(
        &self,
        group: &str,
        partition: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<bool> {
        let taken = sqlx::query(
            "INSERT INTO cloudbus_checkpoints (consumer_group, partition_id, owner, lease_until)
             VALUES ($1, $2, $3, now() + $4 * interval '1 millisecond')
             ON CONFLICT (consumer_group, partition_id) DO UPDATE
                 SET owner = EXCLUDED.owner, lease_until = EXCLUDED.lease_until
                 WHERE cloudbus_checkpoints.owner IS NULL
                    OR cloudbus_checkpoints.owner = EXCLUDED.owner
                    OR cloudbus_checkpoints.lease_until <= now()
             RETURNING 1",
        )
        .bind(group)
        .bind(partition)
        .bind(owner)
        .bind(millis(lease))
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| from_sqlx("checkpoint store: acquire", e))?;
        Ok(taken.is_some())
    }

    async fn release(&self, group: &str, partition: &str, owner: &str) -> Result<()> {
        sqlx::query(
            "UPDATE cloudbus_checkpoints SET owner = NULL, lease_until = NULL
             WHERE consumer_group = $1 AND partition_id = $2 AND owner = $3",
        )
        .bind(group)
        .bind(partition)
        .bind(owner)
        .execute(&self.pool)
        .await
        .map_err(|e| from_sqlx("checkpoint store: release", e))?;
        Ok(())
    }
}
