//! The transactional outbox on PostgreSQL: [`PostgresOutbox::stage`] inserts an event
//! into `cloudbus_outbox` inside the caller's transaction and notifies the relays
//! (`NOTIFY cloudbus_outbox`, delivered only if the transaction commits); claims take
//! rows `FOR UPDATE SKIP LOCKED` under a lease, one claimer of a topic at a time (a
//! transaction-scoped advisory lock), so that the per-key order check sees every
//! earlier claim. Every time is the database's (`now()`), so relays whose clocks
//! disagree still agree on leases.
//!
//! The LISTEN connection is read while a relay waits, and drained at every claim: a
//! relay that never waits (a backlog that never ends) would otherwise leave its
//! notifications unread, and PostgreSQL keeps every notification in its cluster-wide
//! queue (8 GB) until every listener has read it; once full, every `NOTIFY`, and so
//! every `stage`, fails.

use std::future::Future;
use std::task::Poll;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cloudbus_driver::codec::to_structured_json;
use cloudbus_driver::{Event, EventExt, PublishOptions, Result};
use sqlx::postgres::{PgListener, PgRow};
use sqlx::{PgPool, Postgres, Row, Transaction};
use tokio::sync::Mutex;

use crate::clock::millis;
use crate::error::from_sqlx;
use crate::outbox::{OutboxBacklog, OutboxStorage, StagedEvent, readable_claims};
use crate::sweep::delete_in_chunks;

/// The channel relays listen on; the payload is the topic.
const CHANNEL: &str = "cloudbus_outbox";

/// The longest a claim spends draining notifications: they come faster than they are
/// read only under a storm, and the next claim drains again.
const DRAIN_AT_MOST: Duration = Duration::from_millis(50);

/// The outbox of one topic in a PostgreSQL database (prepared by
/// [`migrate`](super::migrate)). Cheap to clone.
///
/// ```no_run
/// # async fn demo(publisher: cloudbus_core::Publisher) -> cloudbus_driver::Result<()> {
/// use cloudbus_driver::{EventBuilder, PublishOptions};
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

impl PostgresOutbox {
    /// Reads and drops the notifications the LISTEN connection holds, without
    /// waiting for more: the claim that follows sees every row they announce. Skipped
    /// while another relay on this outbox waits on the connection (it reads them).
    async fn drain_notifications(&self) {
        let Ok(mut guard) = self.listener.try_lock() else {
            return;
        };
        let started = Instant::now();
        let mut drained = 0u64;
        let mut yielded = false;
        while started.elapsed() < DRAIN_AT_MOST {
            let Some(listener) = guard.as_mut() else {
                return;
            };
            // One poll: a notification already on the socket is read, and an empty
            // socket answers Pending at once. Cancel-safe (sqlx keeps a partly read
            // message in its buffer).
            let next = {
                let mut receiving = std::pin::pin!(listener.try_recv());
                std::future::poll_fn(|cx| Poll::Ready(receiving.as_mut().poll(cx))).await
            };
            match next {
                Poll::Ready(Ok(Some(_))) => {
                    drained += 1;
                    yielded = false;
                }
                // Nothing more on the socket, or Tokio's budget for this task ran out
                // (its I/O answers Pending then, to make it yield): yielding once
                // tells which.
                Poll::Pending if !yielded => {
                    yielded = true;
                    tokio::task::yield_now().await;
                }
                // Nothing more now, or the connection was lost (`None`: sqlx listens
                // again on a new one).
                Poll::Pending | Poll::Ready(Ok(None)) => break,
                // A new listener is made at the next wait.
                Poll::Ready(Err(e)) => {
                    tracing::warn!(error = %e, "outbox: the LISTEN connection failed; reconnecting");
                    *guard = None;
                    break;
                }
            }
        }
        if drained > 0 {
            tracing::trace!(topic = %self.topic, drained, "outbox: notifications drained");
        }
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
        // Before the claim: a notification read now announced a commit this claim sees.
        self.drain_notifications().await;
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
                         AND (e.claimed_until > now()
                            OR (e.available_at > now()
                                AND e.available_at IS DISTINCT FROM e.deliver_at))))
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
        let mut claimed = readable_claims(self, &rows, staged, |row| {
            row.try_get("id").map_err(|e| from_sqlx("outbox: claim", e))
        })
        .await?;
        claimed.sort_by_key(|row| row.id);
        Ok(claimed)
    }

    async fn extend_claim(&self, relay: &str, ids: &[i64], lease: Duration) -> Result<Vec<i64>> {
        sqlx::query_scalar::<_, i64>(
            "UPDATE cloudbus_outbox
             SET claimed_until = now() + $3 * interval '1 millisecond'
             WHERE id = ANY($1) AND claimed_by = $2
               AND sent_at IS NULL AND dead_reason IS NULL
             RETURNING id",
        )
        .bind(ids)
        .bind(relay)
        .bind(millis(lease))
        .fetch_all(&self.pool)
        .await
        .map_err(|e| from_sqlx("outbox: extend claim", e))
    }

    async fn hold_until_due(&self, id: i64, delay: Duration) -> Result<()> {
        sqlx::query(
            "UPDATE cloudbus_outbox
             SET available_at = COALESCE(deliver_at, now() + $2 * interval '1 millisecond'),
                 claimed_by = NULL, claimed_until = NULL
             WHERE id = $1",
        )
        .bind(id)
        .bind(millis(delay))
        .execute(&self.pool)
        .await
        .map_err(|e| from_sqlx("outbox: hold until due", e))?;
        Ok(())
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

    fn relay_stopped(&self) {
        // Nobody reads the notifications any more: close the LISTEN connection (a
        // wait being cancelled has let go of the lock by now; if not, the next
        // relay's wait reuses it).
        if let Ok(mut listener) = self.listener.try_lock() {
            *listener = None;
        }
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
