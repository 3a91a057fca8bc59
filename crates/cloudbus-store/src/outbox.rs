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
//! A round keeps its claim while it runs: it renews the lease every third of it, and
//! publishes only rows it surely still holds, so a slow round (a busy database, a slow
//! broker) does not let another relay publish the same rows meanwhile. A publish that
//! does not finish within [`RelayOptions::publish_timeout`] gives its rows back.
//!
//! Delays: a row staged with a delay the publisher cannot give (over its
//! [`max_delay`](cloudbus_driver::Capabilities::max_delay), or none at all) is held in
//! the outbox until it is due and then published without a delay; it does not hold
//! back the later rows of its ordering key (a delayed event is delivered after them
//! anyway).
//!
//! Order: rows of one ordering key are published in the order they were staged (their
//! ids); a row that failed, or that a relay's unfinished round still holds, holds back
//! the later rows of its key until it is sent. Several relays share one outbox without
//! claiming a row twice; give each its own name (the default is random).

use std::collections::HashSet;
use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cloudbus_core::telemetry::OutboxMetrics;
use cloudbus_core::{Publisher, RetryPolicy};
use cloudbus_driver::codec::from_structured_json;
use cloudbus_driver::{Error, ErrorKind, Event, PublishOptions, Result};

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
    /// not sent, not claimed by a running lease, not waiting for a retry or their
    /// delivery time, and with no earlier row of their ordering key that is claimed
    /// (by any relay, `relay` too: an unfinished round of its own) or waiting for a
    /// retry (a row held until its delivery time does not hold back the later ones).
    /// The lease starts when the database takes the rows. A row that cannot be read
    /// is dead-lettered with the reason, not returned.
    async fn claim(&self, relay: &str, max: usize, lease: Duration) -> Result<Vec<StagedEvent>>;
    /// Renews for `lease` from now the claim of those of `ids` that `relay` still
    /// holds (claimed by it, neither sent nor dead-lettered), even when its lease ran
    /// out meanwhile (nobody else took them); answers their ids.
    async fn extend_claim(&self, relay: &str, ids: &[i64], lease: Duration) -> Result<Vec<i64>>;
    /// Gives a claimed row back until its delivery time (`delay` from now when the row
    /// has none recorded), without counting an attempt: the relay publishes it without
    /// a delay once it is due. It does not hold back the later rows of its key.
    async fn hold_until_due(&self, id: i64, delay: Duration) -> Result<()>;
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
    /// The relay stopped (shut down, or its future dropped): let go of what only its
    /// waiting needs (PostgreSQL's LISTEN connection, whose unread notifications would
    /// fill the cluster's queue while the application goes on staging).
    fn relay_stopped(&self) {}
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
    async fn extend_claim(&self, relay: &str, ids: &[i64], lease: Duration) -> Result<Vec<i64>> {
        (**self).extend_claim(relay, ids, lease).await
    }
    async fn hold_until_due(&self, id: i64, delay: Duration) -> Result<()> {
        (**self).hold_until_due(id, delay).await
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
    fn relay_stopped(&self) {
        (**self).relay_stopped()
    }
}

/// How a relay works.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// Rows per claim and per publish (default 100).
    pub batch_size: usize,
    /// How long a claim is the relay's (default 30 s, at least 100 ms): a relay that
    /// dies holds its rows this long, then another relay publishes them. A running
    /// round renews it every third of it.
    pub lease: Duration,
    /// How long one publish of a batch may take (default 2 min) before its rows are
    /// given back to be published again (at least once): a broker call that never
    /// returns must not hold its rows, or the relay's shutdown, for ever.
    pub publish_timeout: Duration,
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
            publish_timeout: Duration::from_secs(120),
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
    /// Events held back until their delivery time: the publisher cannot delay them
    /// that long, so they are published without a delay once due.
    pub held: usize,
}

impl RelayReport {
    /// Whether the round settled any row (sent, dead-lettered or held until due):
    /// the outbox moved on.
    fn progressed(&self) -> bool {
        self.published + self.dead_lettered + self.held > 0
    }
}

/// Publishes what an outbox holds. Run one or several per topic (in one process or
/// many); each claims its own rows.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// # #[cfg(feature = "sqlite")] {
/// use cloudbus_driver::{EventBuilder, PublishOptions, SubscriptionSpec};
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
    /// The claim is renewed while the round runs; a round that is dropped (cancelled)
    /// stops renewing it, and its rows go to another round when the lease lapses.
    pub async fn relay_once(&self) -> Result<RelayReport> {
        let lease = self.lease();
        // The database starts the lease once it takes the rows, after this instant.
        let asked_at = Instant::now();
        let rows = self
            .storage
            .claim(&self.name, self.options.batch_size.max(1), lease)
            .await?;
        if rows.is_empty() {
            return Ok(RelayReport::default());
        }
        let ids: Vec<i64> = rows.iter().map(|row| row.id).collect();
        let held = HeldRows::new(later(asked_at, lease));
        // Issue 28 item 14: a round that outlived its lease let another relay claim
        // and publish the same rows. The renewals run beside the round and end with it.
        tokio::select! {
            biased;
            report = self.settle(rows, &held) => report,
            never = self.keep_claimed(&ids, &held) => match never {},
        }
    }

    /// Renews the claim of `ids` every third of the lease, for as long as it is polled.
    async fn keep_claimed(&self, ids: &[i64], held: &HeldRows) -> Infallible {
        let lease = self.lease();
        let every = (lease / 3).max(MIN_RENEWAL_INTERVAL);
        loop {
            tokio::time::sleep(every).await;
            let asked_at = Instant::now();
            match self.storage.extend_claim(&self.name, ids, lease).await {
                Ok(kept) => held.renewed(asked_at, lease, ids, &kept),
                Err(e) => {
                    tracing::warn!(topic = self.storage.topic(), error = %e, "could not renew the outbox claim; rows are published only while it surely runs")
                }
            }
        }
    }

    /// The lease of a claim: the option, at least [`MIN_LEASE`].
    fn lease(&self) -> Duration {
        self.options.lease.max(MIN_LEASE)
    }

    /// Publishes the claimed `rows` and records each outcome.
    async fn settle(&self, rows: Vec<StagedEvent>, held: &HeldRows) -> Result<RelayReport> {
        let mut report = RelayReport {
            claimed: rows.len(),
            ..RelayReport::default()
        };
        let max_delay = self.publisher.capabilities().max_delay;
        let mut batch: Vec<(Event, PublishOptions)> = Vec::with_capacity(rows.len());
        let mut batch_rows = Vec::with_capacity(rows.len());
        for row in rows {
            let event = match from_structured_json(&row.event) {
                Ok(event) => event,
                Err(e) => {
                    let reason = format!("the staged event is not a CloudEvent: {e}");
                    tracing::error!(topic = self.storage.topic(), row = row.id, %reason, "outbox row dead-lettered");
                    self.storage.dead_letter(row.id, &reason).await?;
                    report.dead_lettered += 1;
                    continue;
                }
            };
            // Issue 28 item 7: a delay over the publisher's maximum was refused as
            // InvalidArgument and the row dead-lettered. Decided from the
            // capabilities (what the publisher checks against), not from its error.
            if let Some(delay) = row.delay
                && max_delay.is_none_or(|max| delay > max)
            {
                tracing::debug!(
                    topic = self.storage.topic(),
                    row = row.id,
                    ?delay,
                    ?max_delay,
                    "outbox row held until it is due: the publisher cannot delay it that long"
                );
                self.storage.hold_until_due(row.id, delay).await?;
                report.held += 1;
                continue;
            }
            batch.push((
                event,
                PublishOptions {
                    ordering_key: row.ordering_key.clone(),
                    dedup_id: row.dedup_id.clone(),
                    delay: row.delay,
                },
            ));
            batch_rows.push(row);
        }
        // A claim that came back, or a round that got here, after the lease as the
        // last claim or renewal surely gave it (the database slower than the lease)
        // may have lost rows to another relay: make sure of them first, and publish
        // only those still held.
        if batch_rows.iter().any(|row| !held.holds(row.id)) {
            let ids: Vec<i64> = batch_rows.iter().map(|row| row.id).collect();
            let asked_at = Instant::now();
            let kept = self
                .storage
                .extend_claim(&self.name, &ids, self.lease())
                .await?;
            held.renewed(asked_at, self.lease(), &ids, &kept);
            let (keep, lost): (Vec<_>, Vec<_>) = batch
                .into_iter()
                .zip(batch_rows)
                .partition(|(_, row)| held.holds(row.id));
            if !lost.is_empty() {
                tracing::warn!(topic = self.storage.topic(), rows = lost.len(), lease = ?self.options.lease, "outbox rows not published: their claim lapsed before the publish (the database is slower than the lease); another round publishes them");
            }
            (batch, batch_rows) = keep.into_iter().unzip();
        }
        if batch.is_empty() {
            return Ok(report);
        }
        let timeout = self.options.publish_timeout;
        let results =
            match tokio::time::timeout(timeout, self.publisher.publish_batch_with(batch)).await {
                Ok(results) => results,
                // Whether the broker has them is unknown: they go back, to be
                // published again (at least once).
                Err(_) => batch_rows
                    .iter()
                    .map(|_| {
                        Err(Error::new(
                            ErrorKind::Timeout,
                            format!("the publish did not finish within {timeout:?}"),
                        ))
                    })
                    .collect(),
            };
        let mut sent = Vec::new();
        let mut refused = Vec::new();
        let mut failed = Vec::new();
        for (row, result) in batch_rows.iter().zip(results) {
            match result {
                Ok(()) => sent.push(row.id),
                Err(e) if is_permanent(e.kind()) => refused.push((row, e)),
                Err(e) => failed.push((row, e)),
            }
        }
        if !sent.is_empty() {
            // Published, and marked before anything else is written: if this mark
            // fails, the rows are published again after their lease (at least once,
            // never lost); if a later statement fails, they stay sent.
            self.storage.mark_sent(&sent).await?;
            report.published = sent.len();
            self.metrics.published(sent.len() as u64);
            self.published
                .fetch_add(sent.len() as u64, Ordering::Relaxed);
        }
        // The publisher paused the keys that failed; the outbox holds their later rows
        // back itself (a failed row is held while claimed, then waits for its retry),
        // so the next round may send them again.
        for (row, _) in &failed {
            if let Some(key) = &row.ordering_key {
                self.publisher.resume_ordering_key(key);
            }
        }
        for (row, e) in refused {
            let reason = format!("the broker refuses it: {e}");
            tracing::error!(topic = self.storage.topic(), row = row.id, %reason, "outbox row dead-lettered");
            self.storage.dead_letter(row.id, &reason).await?;
            report.dead_lettered += 1;
        }
        for (row, e) in failed {
            let after = self.options.retry.backoff(row.attempts.saturating_add(1));
            tracing::warn!(topic = self.storage.topic(), row = row.id, error = %e, ?after, "outbox publish failed; trying again later");
            self.storage
                .retry_later(row.id, &e.to_string(), after)
                .await?;
            report.retried += 1;
        }
        Ok(report)
    }

    /// Relays until a round finds nothing to claim; returns the totals. A round that
    /// settled nothing although it claimed rows (the broker away) ends it too, so
    /// that the caller decides when to try again.
    pub async fn drain(&self) -> Result<RelayReport> {
        let mut total = RelayReport::default();
        loop {
            let round = self.relay_once().await?;
            total.claimed += round.claimed;
            total.published += round.published;
            total.retried += round.retried;
            total.dead_lettered += round.dead_lettered;
            total.held += round.held;
            if round.claimed == 0 || !round.progressed() {
                return Ok(total);
            }
        }
    }

    /// Relays until `shutdown` resolves: woken by new staged events (PostgreSQL's
    /// notifications) or every poll interval, backing off while the database or the
    /// broker is away (no busy loop), and resuming when they are back. Updates the
    /// backlog metrics and deletes sent rows past their retention as it goes. A round
    /// in progress at shutdown finishes first (bounded by the publish timeout). A
    /// round that panics (a storage or publisher bug) is logged and counted as a
    /// failure: its rows go to another round when their lease lapses, and the relay
    /// goes on.
    pub async fn run(&self, shutdown: impl Future<Output = ()>) -> Result<()> {
        let _stopped = RelayStopped(&*self.storage);
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
            let wait = match CatchPanic::new(self.relay_once()).await {
                Ok(Ok(round)) if round.claimed == 0 => {
                    failures = 0;
                    None
                }
                // Progress: the next round at once, unless the shutdown came.
                Ok(Ok(round)) if round.progressed() => {
                    failures = 0;
                    Some(Duration::ZERO)
                }
                Ok(Ok(_)) => {
                    failures = failures.saturating_add(1);
                    Some(self.options.retry.backoff(failures.min(16)))
                }
                Ok(Err(e)) => {
                    failures = failures.saturating_add(1);
                    let pause = self.options.retry.backoff(failures.min(16));
                    tracing::warn!(topic = self.storage.topic(), error = %e, ?pause, "outbox relay round failed; pausing");
                    Some(pause)
                }
                Err(panic) => {
                    failures = failures.saturating_add(1);
                    let pause = self.options.retry.backoff(failures.min(16));
                    tracing::error!(topic = self.storage.topic(), panic = %panic_message(&*panic), ?pause, "outbox relay round panicked; its rows are relayed again after their lease");
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

/// The shortest lease a relay takes, whatever its options say: a round publishes only
/// rows whose lease surely runs, and with no lease at all it would publish none.
const MIN_LEASE: Duration = Duration::from_millis(100);

/// The shortest interval between two renewals of a round's claim.
const MIN_RENEWAL_INTERVAL: Duration = Duration::from_millis(10);

/// `at + by`, or far in the future when that overflows.
fn later(at: Instant, by: Duration) -> Instant {
    at.checked_add(by)
        .or_else(|| at.checked_add(Duration::from_secs(100 * 365 * 24 * 3600)))
        .unwrap_or(at)
}

/// The rows of a round, and until when they are surely still this relay's by the
/// local clock: a lease the database started after a claim or renewal was asked for
/// ends no sooner than that instant plus the lease (whatever the clocks of the
/// database and of other relays say). Rows a renewal did not find held are lost.
struct HeldRows {
    state: Mutex<HeldState>,
}

struct HeldState {
    until: Instant,
    lost: HashSet<i64>,
}

impl HeldRows {
    fn new(until: Instant) -> Self {
        HeldRows {
            state: Mutex::new(HeldState {
                until,
                lost: HashSet::new(),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, HeldState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A renewal of `asked`, asked for at `asked_at`, found `kept` still held.
    fn renewed(&self, asked_at: Instant, lease: Duration, asked: &[i64], kept: &[i64]) {
        let kept: HashSet<i64> = kept.iter().copied().collect();
        let mut state = self.state();
        state.until = state.until.max(later(asked_at, lease));
        state
            .lost
            .extend(asked.iter().copied().filter(|id| !kept.contains(id)));
    }

    /// Whether row `id` is surely still held.
    fn holds(&self, id: i64) -> bool {
        let state = self.state();
        Instant::now() < state.until && !state.lost.contains(&id)
    }
}

/// A future whose panic becomes an `Err` with the payload (boxed, so that it needs no
/// pinning of its own).
struct CatchPanic<F> {
    inner: Pin<Box<F>>,
}

impl<F: Future> CatchPanic<F> {
    fn new(inner: F) -> Self {
        CatchPanic {
            inner: Box::pin(inner),
        }
    }
}

impl<F: Future> Future for CatchPanic<F> {
    type Output = std::thread::Result<F::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.inner.as_mut();
        match std::panic::catch_unwind(AssertUnwindSafe(move || inner.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

/// The claimed rows a storage can read, in the order given. A row that cannot be read
/// (a column holding what a hand-written INSERT put there) must not fail every claim
/// of its topic: it is dead-lettered with the reason, and the others go on.
pub(crate) async fn readable_claims<R, E: std::fmt::Display>(
    storage: &dyn OutboxStorage,
    rows: &[R],
    staged: impl Fn(&R) -> std::result::Result<StagedEvent, E>,
    id_of: impl Fn(&R) -> Result<i64>,
) -> Result<Vec<StagedEvent>> {
    let mut claimed = Vec::with_capacity(rows.len());
    for row in rows {
        match staged(row) {
            Ok(event) => claimed.push(event),
            Err(e) => {
                let id = id_of(row)?;
                let reason = format!("the staged row cannot be read: {e}");
                tracing::error!(topic = storage.topic(), row = id, %reason, "outbox row dead-lettered");
                storage.dead_letter(id, &reason).await?;
            }
        }
    }
    Ok(claimed)
}

/// The message of a panic payload.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    if let Some(message) = panic.downcast_ref::<&str>() {
        message
    } else if let Some(message) = panic.downcast_ref::<String>() {
        message
    } else {
        "a non-text payload"
    }
}

/// Tells the storage its relay stopped, however `run` ends (returned, or dropped).
struct RelayStopped<'a>(&'a dyn OutboxStorage);

impl Drop for RelayStopped<'_> {
    fn drop(&mut self) {
        self.0.relay_stopped();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
    use std::time::Duration;

    use async_trait::async_trait;
    use cloudbus_core::Publisher;
    use cloudbus_driver::codec::to_structured_json;
    use cloudbus_driver::driver::{BatchResults, OutgoingMessage, TopicDriver};
    use cloudbus_driver::{Capabilities, EventBuilder, Result, SubscriptionSpec};

    use super::{OutboxBacklog, OutboxRelay, OutboxStorage, RelayOptions, StagedEvent};

    /// An outbox that always has one more event to relay (a backlog that never ends);
    /// its first `panics` claims panic.
    struct Endless {
        next_id: AtomicI64,
        panics: AtomicU32,
        retried: AtomicU32,
    }

    impl Endless {
        fn new(panics: u32) -> Self {
            Endless {
                next_id: AtomicI64::new(1),
                panics: AtomicU32::new(panics),
                retried: AtomicU32::new(0),
            }
        }
    }

    #[async_trait]
    impl OutboxStorage for Endless {
        fn topic(&self) -> &str {
            "endless"
        }
        async fn claim(&self, _: &str, _: usize, _: Duration) -> Result<Vec<StagedEvent>> {
            if self
                .panics
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                panic!("injected: the storage panics in a claim");
            }
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
        async fn extend_claim(&self, _: &str, ids: &[i64], _: Duration) -> Result<Vec<i64>> {
            Ok(ids.to_vec())
        }
        async fn hold_until_due(&self, _: i64, _: Duration) -> Result<()> {
            Ok(())
        }
        async fn mark_sent(&self, _: &[i64]) -> Result<()> {
            Ok(())
        }
        async fn retry_later(&self, _: i64, _: &str, _: Duration) -> Result<()> {
            self.retried.fetch_add(1, Ordering::SeqCst);
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
        let relay = OutboxRelay::new(Endless::new(0), bus.publisher("endless").await.unwrap());
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

    /// Failure modes (issue 28): a round that panics (a storage or publisher bug) ended
    /// `run` with the panic, and the relay published nothing more. Now the panic is
    /// logged, the round's rows lapse with their lease, and the relay goes on.
    #[tokio::test]
    async fn a_panicking_round_does_not_stop_the_relay() {
        let bus = cloudbus_memory::MemoryBroker::new().bus();
        bus.ensure_topic("endless").await.unwrap();
        let relay = OutboxRelay::new(Endless::new(1), bus.publisher("endless").await.unwrap())
            .options(RelayOptions {
                retry: cloudbus_core::RetryPolicy::default()
                    .initial_backoff(Duration::from_millis(10))
                    .max_backoff(Duration::from_millis(20)),
                ..RelayOptions::default()
            });
        let stopped = tokio::time::timeout(
            Duration::from_secs(5),
            relay.run(tokio::time::sleep(Duration::from_millis(300))),
        )
        .await;
        assert!(
            matches!(stopped, Ok(Ok(()))),
            "the relay did not stop within 5 s of its shutdown: {stopped:?}"
        );
        assert!(
            relay.published().load(Ordering::Relaxed) > 0,
            "nothing was published after the panicking round"
        );
    }

    /// A provider call that never returns.
    struct Hung;

    #[async_trait]
    impl TopicDriver for Hung {
        async fn send_batch(&self, _: &[OutgoingMessage]) -> Result<BatchResults> {
            std::future::pending().await
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities::broker(256 * 1024, 10, 256 * 1024)
        }
    }

    /// Failure modes (issue 28): a publish that never returns held its round (and the
    /// relay's shutdown, which lets a round finish) for ever; with claims renewed while
    /// a round runs, it would also hold its rows for ever. Now it gives them back
    /// after the publish timeout, to be tried again.
    #[tokio::test]
    async fn a_hung_publish_gives_its_rows_back() {
        let storage = Arc::new(Endless::new(0));
        let relay = OutboxRelay::new(storage.clone(), Publisher::new(Arc::new(Hung))).options(
            RelayOptions {
                publish_timeout: Duration::from_millis(200),
                ..RelayOptions::default()
            },
        );
        let round = tokio::time::timeout(Duration::from_secs(5), relay.relay_once()).await;
        let report = match round {
            Ok(Ok(report)) => report,
            other => panic!("the round did not end within 5 s: {other:?}"),
        };
        assert_eq!(
            (report.claimed, report.published, report.retried),
            (1, 0, 1)
        );
        assert_eq!(storage.retried.load(Ordering::SeqCst), 1);
    }
}
