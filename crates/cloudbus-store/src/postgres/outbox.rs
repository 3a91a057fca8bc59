//! The transactional outbox on PostgreSQL: [`PostgresOutbox::stage`] inserts an event
//! into `cloudbus_outbox` inside the caller's transaction and notifies the relays
//! (`NOTIFY cloudbus_outbox`, delivered only if the transaction commits); claims take
//! rows `FOR UPDATE SKIP LOCKED` under a lease, one claimer of a topic at a time (a
//! transaction-scoped advisory lock), so that the per-key order check sees every
//! earlier claim.

use std::time::Duration;

use async_trait::async_trait;
use cloudbus_core::codec::to_structured_json;
use cloudbus_core::{Event, EventExt, PublishOptions, Result};
use sqlx::postgres::{PgListener, PgRow};
use sqlx::{PgPool, Postgres, Row, Transaction};
use tokio::sync::Mutex;

use crate::clock::millis;
use crate::error::from_sqlx;
use crate::outbox::{OutboxBacklog, OutboxStorage, StagedEvent};
use crate::sweep::delete_in_chunks;

/// The channel relays listen on; the payload is the topic.
const CHANNEL: &str = "cloudbus_outbox";

/// The outbox of one topic in a PostgreSQL database (prepared by
/// [`migrate`](super::migrate)). Cheap to clone.
///
/// ```no_run
/// # async fn demo(publisher: cloudbus_core::Publisher) -> cloudbus_core::Result<()> {
/// use cloudbus_core::{EventBuilder, PublishOptions};
/// use cloudbus_store::outbox::OutboxRelay;
/// use cloudbus_store::postgres::{PostgresOutbox, migrate};
/// let pool = sqlx::PgPool::connect("postgres://app@127.0.0.1/app").await.unwrap();
/// migrate(&pool).await?;
/// let outbox = PostgresOutbox::new(pool.clone(), "orders");
/// let mut tx = pool.begin().await.unwrap();
/// sqlx::query("UPDATE orders SET state = 'placed' WHERE id = 42")
///     .execute(&mut *tx).await.unwrap();
/// let event = EventBuilder::new("com.example.order.placed", "/orders")
///     .partition_key("order-42")
///     .build()?;
/// outbox.stage(&mut tx, &event, PublishOptions::default()).await?;
/// tx.commit().await.unwrap();
/// // Elsewhere (one or more per topic):
/// OutboxRelay::new(outbox, publisher).run(std::future::pending()).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PostgresOutbox {
    pool: PgPool,
    topic: String,
    listener: std::sync::Arc<Mutex<Option<PgListener>>>,
}

impl PostgresOutbox {
    /// The outbox of `topic` in the database of `pool`.
    pub fn new(pool: PgPool, topic: impl Into<String>) -> Self {
        PostgresOutbox {
            pool,
            topic: topic.into(),
            listener: Default::default(),
        }
    }

    /// Stages `event` in the caller's transaction: it is published after the
    /// transaction commits, and never if it rolls back. The ordering key is
    /// `options.ordering_key`, else the event's `partitionkey`; a delay counts from
    /// the staging.
    pub async fn stage(
        &self,
        tx: &mut Transaction<'_, Postgres>,
        event: &Event,
        options: PublishOptions,
    ) -> Result<()> {
        let body = to_structured_json(event)?;
        let key = options
            .ordering_key
            .or_else(|| event.partition_key().map(str::to_owned));
        sqlx::query(
            "WITH staged AS (
                 INSERT INTO cloudbus_outbox (topic, ordering_key, dedup_id, deliver_at, event)
                 VALUES ($1, $2, $3, now() + $4 * interval '1 millisecond', $5)
                 RETURNING id)
             SELECT pg_notify($6, $1) FROM staged",
        )
        .bind(&self.topic)
        .bind(key)
        .bind(options.dedup_id)
        .bind(options.delay.map(millis))
        .bind(body)
        .bind(CHANNEL)
        .execute(&mut **tx)
        .await
        .map_err(|e| from_sqlx("outbox: stage", e))?;
        Ok(())
    }
}

fn staged(row: &PgRow) -> std::result::Result<StagedEvent, sqlx::Error> {
    let delay_ms: Option<i64> = row.try_get("delay_ms")?;
    let attempts: i32 = row.try_get("attempts")?;
    Ok(StagedEvent {
        id: row.try_get("id")?,
        event: row.try_get("event")?,
        ordering_key: row.try_get("ordering_key")?,
        dedup_id: row.try_get("dedup_id")?,
        delay: delay_ms
            .filter(|ms| *ms > 0)
            .map(|ms| Duration::from_millis(ms.unsigned_abs())),
        attempts: attempts.max(0).unsigned_abs(),
    })
}

#[async_trait]
impl OutboxStorage for PostgresOutbox {
    fn topic(&self) -> &str {
        &self.topic
    }

    async fn claim(&self, relay: &str, max: usize, lease: Duration) -> Result<Vec<StagedEvent>> {
        let mut tx = self
            .pool
            .begin()
            .await
            .map_err(|e| from_sqlx("outbox: claim", e))?;
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('cloudbus_outbox:' || $1))")
            .bind(&self.topic)
            .execute(&mut *tx)
            .await
            .map_err(|e| from_sqlx("outbox: claim", e))?;
        let rows = sqlx::query(
            "WITH claimable AS (
                 SELECT o.id FROM cloudbus_outbox o
                 WHERE o.topic = $1 AND o.sent_at IS NULL AND o.dead_reason IS NULL
                   AND o.available_at <= now()
                   AND (o.claimed_until IS NULL OR o.claimed_until <= now())
                   AND (o.ordering_key IS NULL OR NOT EXISTS (
                       SELECT 1 FROM cloudbus_outbox e
                       WHERE e.topic = o.topic AND e.ordering_key = o.ordering_key
                         AND e.id < o.id AND e.sent_at IS NULL AND e.dead_reason IS NULL
                         AND ((e.claimed_until > now() AND e.claimed_by <> $2)
                              OR e.available_at > now())))
                 ORDER BY o.id
                 LIMIT $3
                 FOR UPDATE SKIP LOCKED)
             UPDATE cloudbus_outbox t
             SET claimed_by = $2, claimed_until = now() + $4 * interval '1 millisecond'
             FROM claimable WHERE t.id = claimable.id
             RETURNING t.id, t.event, t.ordering_key, t.dedup_id, t.attempts,
                 (EXTRACT(EPOCH FROM (t.deliver_at - now())) * 1000)::BIGINT AS delay_ms",
        )
        .bind(&self.topic)
        .bind(relay)
        .bind(i64::try_from(max).unwrap_or(i64::MAX))
        .bind(millis(lease))
        .fetch_all(&mut *tx)
        .await
        .map_err(|e| from_sqlx("outbox: claim", e))?;
        tx.commit()
            .await
            .map_err(|e| from_sqlx("outbox: claim", e))?;
        let mut claimed = rows
            .iter()
            .map(staged)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| from_sqlx("outbox: claim", e))?;
        claimed.sort_by_key(|row| row.id);
        Ok(claimed)
    }

    async fn mark_sent(&self, ids: &[i64]) -> Result<()> {
        sqlx::query(
            "UPDATE cloudbus_outbox
             SET sent_at = now(), claimed_by = NULL, claimed_until = NULL
             WHERE id = ANY($1)",
        )
        .bind(ids)
        .execute(&self.pool)
        .await
        .map_err(|e| from_sqlx("outbox: mark sent", e))?;
        Ok(())
    }

    async fn retry_later(&self, id: i64, error: &str, after: Duration) -> Result<()> {
        sqlx::query(
            "UPDATE cloudbus_outbox
             SET attempts = attempts + 1, last_error = $2,
                 available_at = now() + $3 * interval '1 millisecond',
                 claimed_by = NULL, claimed_until = NULL
             WHERE id = $1",
        )
        .bind(id)
        .bind(error)
        .bind(millis(after))
        .execute(&self.pool)
        .await
        .map_err(|e| from_sqlx("outbox: retry later", e))?;
        Ok(())
    }

    async fn dead_letter(&self, id: i64, reason: &str) -> Result<()> {
        sqlx::query(
            "UPDATE cloudbus_outbox
             SET dead_reason = $2, claimed_by = NULL, claimed_until = NULL
             WHERE id = $1",
        )
        .bind(id)
        .bind(reason)
        .execute(&self.pool)
        .await
        .map_err(|e| from_sqlx("outbox: dead-letter", e))?;
        Ok(())
    }

    async fn backlog(&self) -> Result<OutboxBacklog> {
        let row = sqlx::query(
            "SELECT
                 count(*) FILTER (WHERE dead_reason IS NULL) AS pending,
                 count(*) FILTER (WHERE dead_reason IS NOT NULL) AS dead,
                 COALESCE((EXTRACT(EPOCH FROM (now() - min(created_at)
                     FILTER (WHERE dead_reason IS NULL))) * 1000)::BIGINT, 0) AS oldest_ms
             FROM cloudbus_outbox WHERE topic = $1 AND sent_at IS NULL",
        )
        .bind(&self.topic)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| from_sqlx("outbox: backlog", e))?;
        let read = |name: &str| -> Result<u64> {
            let n: i64 = row
                .try_get(name)
                .map_err(|e| from_sqlx("outbox: backlog", e))?;
            Ok(n.max(0).unsigned_abs())
        };
        Ok(OutboxBacklog {
            pending: read("pending")?,
            dead_lettered: read("dead")?,
            oldest_age: Duration::from_millis(read("oldest_ms")?),
        })
    }

    async fn purge_sent(&self, older_than: Duration) -> Result<u64> {
        delete_in_chunks(|rows| async move {
            Ok(sqlx::query(
                "DELETE FROM cloudbus_outbox WHERE id IN (
                         SELECT id FROM cloudbus_outbox
                         WHERE sent_at IS NOT NULL
                           AND sent_at < now() - $1 * interval '1 millisecond'
                         LIMIT $2)",
            )
            .bind(millis(older_than))
            .bind(rows)
            .execute(&self.pool)
            .await
            .map_err(|e| from_sqlx("outbox: purge sent", e))?
            .rows_affected())
        })
        .await
    }

    async fn wait_for_staged(&self, timeout: Duration) {
        let mut guard = self.listener.lock().await;
        if guard.is_none() {
            let listening = async {
                let mut listener = PgListener::connect_with(&self.pool).await?;
                listener.listen(CHANNEL).await?;
                Ok::<_, sqlx::Error>(listener)
            };
            match listening.await {
                Ok(listener) => *guard = Some(listener),
                Err(e) => {
                    tracing::warn!(error = %e, "outbox: LISTEN failed; polling until it works");
                    drop(guard);
                    tokio::time::sleep(timeout).await;
                    return;
                }
            }
        }
        let Some(listener) = guard.as_mut() else {
            return;
        };
        let until = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(until, listener.recv()).await {
                Ok(Ok(notification)) if notification.payload() == self.topic => return,
                // Another topic's outbox: keep waiting for ours.
                Ok(Ok(_)) => continue,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "outbox: the LISTEN connection failed; reconnecting");
                    *guard = None;
                    return;
                }
                Err(_) => return,
            }
        }
    }
}
