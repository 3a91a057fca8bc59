//! The transactional outbox on SQLite: [`SqliteOutbox::stage`] inserts an event into
//! `cloudbus_outbox` inside the caller's transaction; relays claim leased rows with one
//! `UPDATE ... RETURNING` statement each (SQLite runs one writer at a time, so a claim
//! sees every earlier one) and find new rows by polling. Claims read the clock in the
//! statement, once it holds the write lock: a claim that waited for the writers still
//! gets its whole lease (it lost the wait before, and a round under contention outlived
//! its lease).

use std::sync::LazyLock;
use std::time::Duration;

use async_trait::async_trait;
use cloudbus_driver::codec::to_structured_json;
use cloudbus_driver::{Event, EventExt, PublishOptions, Result};
use sqlx::sqlite::SqliteRow;
use sqlx::{Row, Sqlite, SqlitePool, Transaction};

use crate::clock::{millis, unix_millis_now};
use crate::error::from_sqlx;
use crate::outbox::{OutboxBacklog, OutboxStorage, StagedEvent, readable_claims};
use crate::sweep::delete_in_chunks;

/// Now in Unix milliseconds, as a statement reads it when it runs (holding its locks,
/// and the same value throughout the statement): the system clock, which `stage` and
/// the other statements read through the process.
const NOW: &str = "CAST(round((julianday('now') - 2440587.5) * 86400000.0) AS INTEGER)";

/// `sql` with `{now}` replaced by [`NOW`].
fn with_now(sql: &str) -> String {
    sql.replace("{now}", NOW)
}

/// Claims rows (`?1` topic, `?2` relay, `?3` lease in ms, `?4` at most): unsent rows
/// due and not leased, with no earlier unsent row of their key that is leased (by any
/// relay, this one too: its unfinished earlier round) or waiting for a retry (a row
/// held until its delivery time does not wait for a retry: a delayed event comes after
/// the later ones anyway).
static CLAIM: LazyLock<String> = LazyLock::new(|| {
    with_now(
        "UPDATE cloudbus_outbox SET claimed_by = ?2, claimed_until = {now} + ?3
         WHERE id IN (
             SELECT o.id FROM cloudbus_outbox o
             WHERE o.topic = ?1 AND o.sent_at IS NULL AND o.dead_reason IS NULL
               AND o.available_at <= {now}
               AND (o.claimed_until IS NULL OR o.claimed_until <= {now})
               AND (o.ordering_key IS NULL OR NOT EXISTS (
                   SELECT 1 FROM cloudbus_outbox e
                   WHERE e.topic = o.topic AND e.ordering_key = o.ordering_key
                     AND e.id < o.id AND e.sent_at IS NULL AND e.dead_reason IS NULL
                     AND (e.claimed_until > {now}
                          OR (e.available_at > {now}
                              AND e.available_at IS NOT e.deliver_at))))
             ORDER BY o.id
             LIMIT ?4)
         RETURNING id, event, ordering_key, dedup_id, attempts,
             deliver_at - {now} AS delay_ms",
    )
});

/// Renews the lease (`?3` ms) of the rows of `?1` (a JSON array of ids) that relay
/// `?2` still holds; answers their ids.
static EXTEND_CLAIM: LazyLock<String> = LazyLock::new(|| {
    with_now(
        "UPDATE cloudbus_outbox SET claimed_until = {now} + ?3
         WHERE id IN (SELECT value FROM json_each(?1)) AND claimed_by = ?2
           AND sent_at IS NULL AND dead_reason IS NULL
         RETURNING id",
    )
});

/// Gives row `?1` back until its delivery time (or `?2` ms from now), no attempt
/// counted.
static HOLD_UNTIL_DUE: LazyLock<String> = LazyLock::new(|| {
    with_now(
        "UPDATE cloudbus_outbox
         SET available_at = COALESCE(deliver_at, {now} + ?2),
             claimed_by = NULL, claimed_until = NULL
         WHERE id = ?1",
    )
});

/// The outbox of one topic in a SQLite database (prepared by
/// [`migrate`](super::migrate)). Cheap to clone. See
/// [`OutboxRelay`](crate::outbox::OutboxRelay) for an example.
#[derive(Clone)]
pub struct SqliteOutbox {
    pool: SqlitePool,
    topic: String,
}

impl SqliteOutbox {
    /// The outbox of `topic` in the database of `pool`.
    pub fn new(pool: SqlitePool, topic: impl Into<String>) -> Self {
        SqliteOutbox {
            pool,
            topic: topic.into(),
        }
    }

    /// Stages `event` in the caller's transaction: it is published after the
    /// transaction commits, and never if it rolls back. The ordering key is
    /// `options.ordering_key`, else the event's `partitionkey`; a delay counts from
    /// the staging.
    pub async fn stage(
        &self,
        tx: &mut Transaction<'_, Sqlite>,
        event: &Event,
        options: PublishOptions,
    ) -> Result<()> {
        let body = to_structured_json(event)?;
        let key = options
            .ordering_key
            .or_else(|| event.partition_key().map(str::to_owned));
        let now = unix_millis_now();
        sqlx::query(
            "INSERT INTO cloudbus_outbox
                 (topic, ordering_key, dedup_id, deliver_at, event, created_at, available_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6)",
        )
        .bind(&self.topic)
        .bind(key)
        .bind(options.dedup_id)
        .bind(options.delay.map(|d| now.saturating_add(millis(d))))
        .bind(body)
        .bind(now)
        .execute(&mut **tx)
        .await
        .map_err(|e| from_sqlx("outbox: stage", e))?;
        Ok(())
    }
}

fn staged(row: &SqliteRow) -> std::result::Result<StagedEvent, sqlx::Error> {
    let delay_ms: Option<i64> = row.try_get("delay_ms")?;
    let attempts: i64 = row.try_get("attempts")?;
    Ok(StagedEvent {
        id: row.try_get("id")?,
        event: row.try_get("event")?,
        ordering_key: row.try_get("ordering_key")?,
        dedup_id: row.try_get("dedup_id")?,
        delay: delay_ms
            .filter(|ms| *ms > 0)
            .map(|ms| Duration::from_millis(ms.unsigned_abs())),
        attempts: u32::try_from(attempts.max(0)).unwrap_or(u32::MAX),
    })
}

/// Row ids as a JSON array, for `json_each`.
fn id_list(ids: &[i64]) -> String {
    format!(
        "[{}]",
        ids.iter().map(i64::to_string).collect::<Vec<_>>().join(",")
    )
}

#[async_trait]
impl OutboxStorage for SqliteOutbox {
    fn topic(&self) -> &str {
        &self.topic
    }

    async fn claim(&self, relay: &str, max: usize, lease: Duration) -> Result<Vec<StagedEvent>> {
        let rows = sqlx::query(CLAIM.as_str())
            .bind(&self.topic)
            .bind(relay)
            .bind(millis(lease))
            .bind(i64::try_from(max).unwrap_or(i64::MAX))
            .fetch_all(&self.pool)
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
        sqlx::query_scalar::<_, i64>(EXTEND_CLAIM.as_str())
            .bind(id_list(ids))
            .bind(relay)
            .bind(millis(lease))
            .fetch_all(&self.pool)
            .await
            .map_err(|e| from_sqlx("outbox: extend claim", e))
    }

    async fn hold_until_due(&self, id: i64, delay: Duration) -> Result<()> {
        sqlx::query(HOLD_UNTIL_DUE.as_str())
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
             SET sent_at = ?2, claimed_by = NULL, claimed_until = NULL
             WHERE id IN (SELECT value FROM json_each(?1))",
        )
        .bind(id_list(ids))
        .bind(unix_millis_now())
        .execute(&self.pool)
        .await
        .map_err(|e| from_sqlx("outbox: mark sent", e))?;
        Ok(())
    }

    async fn retry_later(&self, id: i64, error: &str, after: Duration) -> Result<()> {
        sqlx::query(
            "UPDATE cloudbus_outbox
             SET attempts = attempts + 1, last_error = ?2, available_at = ?3,
                 claimed_by = NULL, claimed_until = NULL
             WHERE id = ?1",
        )
        .bind(id)
        .bind(error)
        .bind(unix_millis_now().saturating_add(millis(after)))
        .execute(&self.pool)
        .await
        .map_err(|e| from_sqlx("outbox: retry later", e))?;
        Ok(())
    }

    async fn dead_letter(&self, id: i64, reason: &str) -> Result<()> {
        sqlx::query(
            "UPDATE cloudbus_outbox
             SET dead_reason = ?2, claimed_by = NULL, claimed_until = NULL
             WHERE id = ?1",
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
                 min(created_at) FILTER (WHERE dead_reason IS NULL) AS oldest
             FROM cloudbus_outbox WHERE topic = ?1 AND sent_at IS NULL",
        )
        .bind(&self.topic)
        .fetch_one(&self.pool)
        .await
        .map_err(|e| from_sqlx("outbox: backlog", e))?;
        let get = |name: &str| -> Result<Option<i64>> {
            row.try_get(name)
                .map_err(|e| from_sqlx("outbox: backlog", e))
        };
        let count = |n: Option<i64>| n.unwrap_or(0).max(0).unsigned_abs();
        let oldest_ms = get("oldest")?.map_or(0, |created| {
            unix_millis_now().saturating_sub(created).max(0)
        });
        Ok(OutboxBacklog {
            pending: count(get("pending")?),
            dead_lettered: count(get("dead")?),
            oldest_age: Duration::from_millis(oldest_ms.unsigned_abs()),
        })
    }

    async fn purge_sent(&self, older_than: Duration) -> Result<u64> {
        delete_in_chunks(|rows| async move {
            Ok(sqlx::query(
                "DELETE FROM cloudbus_outbox WHERE id IN (
                         SELECT id FROM cloudbus_outbox
                         WHERE sent_at IS NOT NULL AND sent_at < ?1
                         LIMIT ?2)",
            )
            .bind(unix_millis_now().saturating_sub(millis(older_than)))
            .bind(rows)
            .execute(&self.pool)
            .await
            .map_err(|e| from_sqlx("outbox: purge sent", e))?
            .rows_affected())
        })
        .await
    }

    async fn wait_for_staged(&self, timeout: Duration) {
        tokio::time::sleep(timeout).await;
    }
}
