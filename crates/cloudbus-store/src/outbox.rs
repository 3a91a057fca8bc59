//! The transactional outbox: a service writes its own rows and the events that
//! announce them in one database transaction ("stage"), and a relay publishes the
//! staged events afterwards. An event exists exactly when its transaction committed:
//! none is lost (a broker that is away only delays it) and none is invented (a rolled
//! back transaction staged nothing).
//!
//! The relay ([`OutboxRelay`]) is the same for every database; a database provides an
//! [`OutboxStorage`] (PostgreSQL: `postgres::PostgresOutbox`, SQLite:
//! `sqlite::SqliteOutbox`). A relay claims a batch of staged rows under a lease,
//! publishes them through any cloudbus [`Publisher`], and marks sent only what the
//! broker confirmed. Delivery is at least once: a relay that dies after the broker's
//! confirmation and before its mark leaves the rows to be published again when the
//! lease lapses, so consumers deduplicate (`Idempotent` over a durable dedup store;
//! brokers with duplicate detection see the same message id, the event id).
//!
//! Order: rows of one ordering key are published in the order they were staged (their
//! ids); a row that failed holds back the later rows of its key until it is sent.
//! Several relays share one outbox without claiming a row twice.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cloudbus_core::codec::from_structured_json;
use cloudbus_core::telemetry::OutboxMetrics;
use cloudbus_core::{ErrorKind, PublishOptions, Publisher, Result, RetryPolicy};

/// A staged event as a relay claimed it.
#[derive(Debug, Clone)]
pub struct StagedEvent {
    /// The row's id: the staging order.
    pub id: i64,
    /// The event, in the CloudEvents JSON format.
    pub event: Vec<u8>,
    /// The ordering key it was staged with.
    pub ordering_key: Option<String>,
    /// The deduplication id it was staged with (`None`: the event id).
    pub dedup_id: Option<String>,
    /// How long from now the broker should hold it back (a delay given at staging).
    pub delay: Option<Duration>,
    /// Earlier attempts to publish it.
    pub attempts: u32,
}

/// What waits in an outbox.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct OutboxBacklog {
    /// Events staged and not yet published (dead-lettered ones not counted).
    pub pending: u64,
    /// The age of the oldest of them (zero when none).
    pub oldest_age: Duration,
    /// Events given up on (they could not be decoded, or the broker refuses them for
    /// good), kept with their reason.
    pub dead_lettered: u64,
}

/// An outbox table of one topic, as the relay uses it. Implemented by the PostgreSQL
/// and SQLite outboxes; a claim must never hand one row to two relays while its lease
/// runs, and must keep the order of each ordering key (see the module docs).
#[async_trait]
pub trait OutboxStorage: Send + Sync + 'static {
    /// The topic whose staged events this outbox holds.
    fn topic(&self) -> &str;
    /// Claims up to `max` publishable rows for `relay` for `lease`, in id order: rows
    /// not sent, not claimed by a running lease, not waiting for a retry, and with no
    /// earlier row of their ordering key that is claimed by another relay or waiting
    /// for a retry.
    async fn claim(&self, relay: &str, max: usize, lease: Duration) -> Result<Vec<StagedEvent>>;
    /// Marks rows sent (the broker confirmed them).
    async fn mark_sent(&self, ids: &[i64]) -> Result<()>;
    /// Gives a row back after a failed publish, to be tried again after `after`.
    async fn retry_later(&self, id: i64, error: &str, after: Duration) -> Result<()>;
    /// Gives up on a row for good, keeping it with `reason`.
    async fn dead_letter(&self, id: i64, reason: &str) -> Result<()>;
    /// What waits.
    async fn backlog(&self) -> Result<OutboxBacklog>;
    /// Deletes rows sent more than `older_than` ago; returns how many.
    async fn purge_sent(&self, older_than: Duration) -> Result<u64>;
    /// Resolves when events may have been staged (a notification), or after `timeout`.
    async fn wait_for_staged(&self, timeout: Duration);
}

/// A shared outbox is an outbox (so that one storage value can serve several relays,
/// or be chosen at run time as `Arc<dyn OutboxStorage>`).
#[async_trait]
impl<S: OutboxStorage + ?Sized> OutboxStorage for Arc<S> {
    fn topic(&self) -> &str {
        (**self).topic()
    }
    async fn claim(&self, relay: &str, max: usize, lease: Duration) -> Result<Vec<StagedEvent>> {
        (**self).claim(relay, max, lease).await
    }
    async fn mark_sent(&self, ids: &[i64]) -> Result<()> {
        (**self).mark_sent(ids).await
    }
    async fn retry_later(&self, id: i64, error: &str, after: Duration) -> Result<()> {
        (**self).retry_later(id, error, after).await
    }
    async fn dead_letter(&self, id: i64, reason: &str) -> Result<()> {
        (**self).dead_letter(id, reason).await
    }
    async fn backlog(&self) -> Result<OutboxBacklog> {
        (**self).backlog().await
    }
    async fn purge_sent(&self, older_than: Duration) -> Result<u64> {
        (**self).purge_sent(older_than).await
    }
    async fn wait_for_staged(&self, timeout: Duration) {
        (**self).wait_for_staged(timeout).await
    }
}

/// How a relay works.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// Rows per claim and per publish (default 100).
    pub batch_size: usize,
    /// How long a claim is the relay's (default 30 s): a relay that dies holds its rows
    /// this long, then another relay publishes them.
    pub lease: Duration,
    /// The longest wait between two looks at an idle outbox (default 250 ms; on
    /// PostgreSQL a notification wakes the relay at once).
    pub poll_interval: Duration,
    /// How long sent rows are kept before they are deleted (default 24 h).
    pub retention: Duration,
    /// Backoff between attempts at a row, and of the relay when the database or the
    /// broker is away (attempts are not limited: a staged event is never dropped).
    pub retry: RetryPolicy,
    /// How often the backlog metrics are updated and sent rows purged (default 5 s).
    pub housekeeping_interval: Duration,
}

impl Default for RelayOptions {
    fn default() -> Self {
        RelayOptions {
            batch_size: 100,
            lease: Duration::from_secs(30),
            poll_interval: Duration::from_millis(250),
            retention: Duration::from_secs(24 * 3600),
            retry: RetryPolicy::default()
                .initial_backoff(Duration::from_millis(200))
                .max_backoff(Duration::from_secs(30)),
            housekeeping_interval: Duration::from_secs(5),
        }
    }
}

/// What one relay round did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RelayReport {
    /// Rows claimed.
    pub claimed: usize,
    /// Events the broker confirmed (and marked sent).
    pub published: usize,
    /// Events that failed and wait for another attempt.
    pub retried: usize,
    /// Events given up on for good (kept in the outbox with the reason).
    pub dead_lettered: usize,
}

/// Publishes what an outbox holds. Run one or several per topic (in one process or
/// many); each claims its own rows.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// # #[cfg(feature = "sqlite")] {
/// use cloudbus_core::{EventBuilder, PublishOptions, SubscriptionSpec};
/// use cloudbus_store::outbox::OutboxRelay;
/// use cloudbus_store::sqlite::{SqliteOutbox, migrate};
/// let pool = sqlx::SqlitePool::connect("sqlite::memory:").await.unwrap();
/// migrate(&pool).await.unwrap();
/// sqlx::query("CREATE TABLE orders (id TEXT)").execute(&pool).await.unwrap();
/// let outbox = SqliteOutbox::new(pool.clone(), "orders");
///
/// // The business row and its event, in one transaction.
/// let mut tx = pool.begin().await.unwrap();
/// sqlx::query("INSERT INTO orders VALUES ('42')").execute(&mut *tx).await.unwrap();
/// let event = EventBuilder::new("com.example.order.created", "/orders").build().unwrap();
/// outbox.stage(&mut tx, &event, PublishOptions::default()).await.unwrap();
/// tx.commit().await.unwrap();
///
/// // A relay publishes it.
/// let bus = cloudbus_memory::MemoryBroker::new().bus();
/// bus.ensure_topic("orders").await.unwrap();
/// bus.ensure_subscription(&SubscriptionSpec::new("orders", "billing")).await.unwrap();
/// let relay = OutboxRelay::new(outbox, bus.publisher("orders").await.unwrap());
/// assert_eq!(relay.drain().await.unwrap().published, 1);
/// assert_eq!(relay.backlog().await.unwrap().pending, 0);
/// # }
/// # });
/// ```
pub struct OutboxRelay {
    storage: Arc<dyn OutboxStorage>,
    publisher: Publisher,
    options: RelayOptions,
    name: String,
    metrics: OutboxMetrics,
    published: Arc<AtomicU64>,
}

impl OutboxRelay {
    /// A relay of `storage` through `publisher` (opened on the outbox's topic), with
    /// default options and a random name.
    pub fn new(storage: impl OutboxStorage, publisher: Publisher) -> Self {
        let metrics = OutboxMetrics::new(storage.topic());
        OutboxRelay {
            storage: Arc::new(storage),
            publisher,
            options: RelayOptions::default(),
            name: format!("relay-{}", uuid::Uuid::new_v4().simple()),
            metrics,
            published: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Replaces the options.
    pub fn options(mut self, options: RelayOptions) -> Self {
        self.options = options;
        self
    }

    /// Names the relay in its claims (default: a random name).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// A counter of the events this relay published, readable while it runs.
    pub fn published(&self) -> Arc<AtomicU64> {
        self.published.clone()
    }

    /// What waits in the outbox now.
    pub async fn backlog(&self) -> Result<OutboxBacklog> {
        self.storage.backlog().await
    }

    /// One round: claims a batch, publishes it, marks what the broker confirmed.
    /// An error means the database failed (the claimed rows go to another round when
    /// their lease lapses); failed publishes are counted in the report, not errors.
    pub async fn relay_once(&self) -> Result<RelayReport> {
        let rows = self
            .storage
            .claim(
                &self.name,
                self.options.batch_size.max(1),
                self.options.lease,
            )
            .await?;
        let mut report = RelayReport {
            claimed: rows.len(),
            ..RelayReport::default()
        };
        if rows.is_empty() {
            return Ok(report);
        }
        let mut batch = Vec::with_capacity(rows.len());
        let mut batch_rows = Vec::with_capacity(rows.len());
        for row in rows {
            match from_structured_json(&row.event) {
                Ok(event) => {
                    let options = PublishOptions {
                        ordering_key: row.ordering_key.clone(),
                        dedup_id: row.dedup_id.clone(),
                        delay: row.delay,
                    };
                    batch.push((event, options));
                    batch_rows.push(row);
                }
                Err(e) => {
                    let reason = format!("the staged event is not a CloudEvent: {e}");
                    tracing::error!(topic = self.storage.topic(), row = row.id, %reason, "outbox row dead-lettered");
                    self.storage.dead_letter(row.id, &reason).await?;
                    report.dead_lettered += 1;
                }
            }
        }
        let results = self.publisher.publish_batch_with(batch).await;
        let mut sent = Vec::new();
        let mut failed_keys = Vec::new();
        for (row, result) in batch_rows.iter().zip(results) {
            match result {
                Ok(()) => sent.push(row.id),
                Err(e) if is_permanent(e.kind()) => {
                    let reason = format!("the broker refuses it: {e}");
                    tracing::error!(topic = self.storage.topic(), row = row.id, %reason, "outbox row dead-lettered");
                    self.storage.dead_letter(row.id, &reason).await?;
                    report.dead_lettered += 1;
                }
                Err(e) => {
                    let after = self.options.retry.backoff(row.attempts.saturating_add(1));
                    tracing::warn!(topic = self.storage.topic(), row = row.id, error = %e, ?after, "outbox publish failed; trying again later");
                    self.storage
                        .retry_later(row.id, &e.to_string(), after)
                        .await?;
                    if let Some(key) = &row.ordering_key {
                        failed_keys.push(key.clone());
                    }
                    report.retried += 1;
                }
            }
        }
        // The publisher paused the keys that failed; the outbox holds their later rows
        // back itself, so the next round may send them again.
        for key in failed_keys {
            self.publisher.resume_ordering_key(&key);
        }
        if !sent.is_empty() {
            // Published: if this mark fails, the rows are published again after their
            // lease (at least once, never lost).
            self.storage.mark_sent(&sent).await?;
            report.published = sent.len();
            self.metrics.published(sent.len() as u64);
            self.published
                .fetch_add(sent.len() as u64, Ordering::Relaxed);
        }
        Ok(report)
    }

    /// Relays until a round finds nothing to claim; returns the totals. A round that
    /// published nothing although it claimed rows (the broker away) ends it too, so
    /// that the caller decides when to try again.
    pub async fn drain(&self) -> Result<RelayReport> {
        let mut total = RelayReport::default();
        loop {
            let round = self.relay_once().await?;
            total.claimed += round.claimed;
            total.published += round.published;
            total.retried += round.retried;
            total.dead_lettered += round.dead_lettered;
            if round.claimed == 0 || round.published + round.dead_lettered == 0 {
                return Ok(total);
            }
        }
    }

    /// Relays until `shutdown` resolves: woken by new staged events (PostgreSQL's
    /// notifications) or every poll interval, backing off while the database or the
    /// broker is away (no busy loop), and resuming when they are back. Updates the
    /// backlog metrics and deletes sent rows past their retention as it goes. A round
    /// in progress at shutdown finishes first.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut failures = 0u32;
        let mut last_housekeeping: Option<Instant> = None;
        let mut last_purge: Option<Instant> = None;
        loop {
            if last_housekeeping.is_none_or(|t| t.elapsed() >= self.options.housekeeping_interval) {
                last_housekeeping = Some(Instant::now());
                let purge_due = last_purge.is_none_or(|t| t.elapsed() >= PURGE_EVERY);
                if purge_due {
                    last_purge = Some(Instant::now());
                }
                self.housekeeping(purge_due).await;
            }
            let wait = match self.relay_once().await {
                Ok(round) if round.claimed == 0 => {
                    failures = 0;
                    None
                }
                // Progress: the next round at once, unless the shutdown came.
                Ok(round) if round.published + round.dead_lettered > 0 => {
                    failures = 0;
                    Some(Duration::ZERO)
                }
                Ok(_) => {
                    failures = failures.saturating_add(1);
                    Some(self.options.retry.backoff(failures.min(16)))
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let pause = self.options.retry.backoff(failures.min(16));
                    tracing::warn!(topic = self.storage.topic(), error = %e, ?pause, "outbox relay round failed; pausing");
                    Some(pause)
                }
            };
            let idle = async {
                match wait {
                    Some(pause) => tokio::time::sleep(pause).await,
                    None => {
                        self.storage
                            .wait_for_staged(self.options.poll_interval)
                            .await
                    }
                }
            };
            tokio::select! {
                // The shutdown first: a relay that always has work must still stop.
                biased;
                _ = &mut shutdown => {
                    self.housekeeping(false).await;
                    return Ok(());
                }
                _ = idle => {}
            }
        }
    }

    /// Updates the backlog metrics; deletes sent rows past retention when `purge`.
    async fn housekeeping(&self, purge: bool) {
        match self.storage.backlog().await {
            Ok(backlog) => self
                .metrics
                .backlog(backlog.pending, backlog.oldest_age.as_secs_f64()),
            Err(e) => {
                tracing::warn!(topic = self.storage.topic(), error = %e, "outbox backlog unknown")
            }
        }
        if purge && let Err(e) = self.storage.purge_sent(self.options.retention).await {
            tracing::warn!(topic = self.storage.topic(), error = %e, "could not delete sent outbox rows; the next purge tries again");
        }
    }
}

/// How often sent rows past retention are deleted.
const PURGE_EVERY: Duration = Duration::from_secs(60);

/// Publish errors that no later attempt can fix: the event is refused as it is.
fn is_permanent(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::TooLarge | ErrorKind::InvalidArgument | ErrorKind::Malformed
    )
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::time::Duration;

    use async_trait::async_trait;
    use cloudbus_core::codec::to_structured_json;
    use cloudbus_core::{EventBuilder, Result, SubscriptionSpec};

    use super::{OutboxBacklog, OutboxRelay, OutboxStorage, StagedEvent};

    /// An outbox that always has one more event to relay (a backlog that never ends).
    struct Endless {
        next_id: AtomicI64,
    }

    #[async_trait]
    impl OutboxStorage for Endless {
        fn topic(&self) -> &str {
            "endless"
        }
        async fn claim(&self, _: &str, _: usize, _: Duration) -> Result<Vec<StagedEvent>> {
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let event = EventBuilder::new("com.example.endless", "/test")
                .id(id.to_string())
                .build()?;
            Ok(vec![StagedEvent {
                id,
                event: to_structured_json(&event)?,
                ordering_key: None,
                dedup_id: None,
                delay: None,
                attempts: 0,
            }])
        }
        async fn mark_sent(&self, _: &[i64]) -> Result<()> {
            Ok(())
        }
        async fn retry_later(&self, _: i64, _: &str, _: Duration) -> Result<()> {
            Ok(())
        }
        async fn dead_letter(&self, _: i64, _: &str) -> Result<()> {
            Ok(())
        }
        async fn backlog(&self) -> Result<OutboxBacklog> {
            Ok(OutboxBacklog::default())
        }
        async fn purge_sent(&self, _: Duration) -> Result<u64> {
            Ok(0)
        }
        async fn wait_for_staged(&self, timeout: Duration) {
            tokio::time::sleep(timeout).await;
        }
    }

    /// A relay that always has work still stops when asked: a busy round must not skip
    /// the shutdown check. (Before, `run` looked at the shutdown only while idle, so a
    /// steady backlog kept it running forever.)
    #[tokio::test]
    async fn a_busy_relay_stops_at_shutdown() {
        let bus = cloudbus_memory::MemoryBroker::new().bus();
        bus.ensure_topic("endless").await.unwrap();
        bus.ensure_subscription(&SubscriptionSpec::new("endless", "sink"))
            .await
            .unwrap();
        let relay = OutboxRelay::new(
            Endless {
                next_id: AtomicI64::new(1),
            },
            bus.publisher("endless").await.unwrap(),
        );
        let stopped = tokio::time::timeout(
            Duration::from_secs(5),
            relay.run(tokio::time::sleep(Duration::from_millis(100))),
        )
        .await;
        assert!(
            matches!(stopped, Ok(Ok(()))),
            "the relay did not stop within 5 s of its shutdown: {stopped:?}"
        );
        assert!(relay.published().load(Ordering::Relaxed) > 0);
    }
}
