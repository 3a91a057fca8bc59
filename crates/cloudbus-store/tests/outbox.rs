//! The transactional outbox on PostgreSQL (DATABASE_URL; scripts/postgres.sh starts
//! one) and SQLite (a temp file), relayed to the memory broker: commit and rollback,
//! order per key, parallel relays without double claims, a relay that dies between
//! the broker's confirmation and its mark, the database and the broker being away,
//! notifications, retention and the metrics; and the failure modes of issue 28: a
//! delay over the publisher's maximum, a busy relay's notifications, rounds that
//! outlive their lease or come back after it, a cancelled round, a claim waiting for
//! SQLite's write lock, an unreadable row. A missing PostgreSQL makes its tests print
//! SKIPPED, or fail under CI=true.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU32, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cloudbus_conformance::emulator::required_env;
use cloudbus_core::driver::{BatchResults, OutgoingMessage, TopicDriver};
use cloudbus_core::{
    AttributesReader, Bus, Capabilities, Consumer, Error, ErrorKind, Event, EventBuilder, EventExt,
    PublishOptions, Publisher, Result, SubscriptionSpec,
};
use cloudbus_memory::MemoryBroker;
use cloudbus_store::outbox::{
    OutboxBacklog, OutboxRelay, OutboxStorage, RelayOptions, StagedEvent,
};
use cloudbus_store::{postgres, sqlite};

/// A database with an outbox, as the tests use it.
#[async_trait]
trait Db: Send + Sync {
    /// The outbox of `topic`.
    fn outbox(&self, topic: &str) -> Arc<dyn OutboxStorage>;
    /// Stages `events` in one transaction with a business row each, committing it
    /// when `commit`, rolling it back otherwise.
    async fn stage(&self, topic: &str, events: &[Event], commit: bool) -> Result<()>;
    /// Stages `staged` (each with its options) in one committed transaction.
    async fn stage_with(&self, topic: &str, staged: Vec<(Event, PublishOptions)>) -> Result<()>;
    /// Business rows committed for `topic`.
    async fn business_rows(&self, topic: &str) -> Result<i64>;
    /// Rows of `topic` sent, as the outbox table says.
    async fn sent_rows(&self, topic: &str) -> Result<i64>;
    /// Ages every sent row of `topic` by `by`.
    async fn age_sent_rows(&self, topic: &str, by: Duration) -> Result<()>;
}

fn db_error(e: sqlx::Error) -> Error {
    Error::new(ErrorKind::Unavailable, e.to_string())
}

struct Postgres {
    pool: sqlx::PgPool,
}

impl Postgres {
    async fn open() -> Option<Self> {
        let url = required_env(
            "DATABASE_URL",
            "this PostgreSQL outbox test",
            "scripts/test.sh starts PostgreSQL with scripts/postgres.sh",
        )?;
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(16)
            .connect(&url)
            .await
            .expect("PostgreSQL at DATABASE_URL");
        postgres::migrate(&pool).await.expect("migrate");
        // The tests start at once: `CREATE TABLE IF NOT EXISTS` from several sessions
        // on a new database can collide in the catalog (a unique violation on
        // pg_type), so they take turns.
        let mut tx = pool.begin().await.expect("begin");
        sqlx::query("SELECT pg_advisory_xact_lock(hashtext('outbox_test_orders'))")
            .execute(&mut *tx)
            .await
            .expect("lock");
        sqlx::query("CREATE TABLE IF NOT EXISTS outbox_test_orders (topic TEXT, n BIGINT)")
            .execute(&mut *tx)
            .await
            .expect("business table");
        tx.commit().await.expect("commit");
        Some(Postgres { pool })
    }
}

#[async_trait]
impl Db for Postgres {
    fn outbox(&self, topic: &str) -> Arc<dyn OutboxStorage> {
        Arc::new(postgres::PostgresOutbox::new(self.pool.clone(), topic))
    }
    async fn stage(&self, topic: &str, events: &[Event], commit: bool) -> Result<()> {
        let outbox = postgres::PostgresOutbox::new(self.pool.clone(), topic);
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        for (n, event) in events.iter().enumerate() {
            sqlx::query("INSERT INTO outbox_test_orders (topic, n) VALUES ($1, $2)")
                .bind(topic)
                .bind(n as i64)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
            outbox
                .stage(&mut tx, event, PublishOptions::default())
                .await?;
        }
        if commit {
            tx.commit().await.map_err(db_error)
        } else {
            tx.rollback().await.map_err(db_error)
        }
    }
    async fn stage_with(&self, topic: &str, staged: Vec<(Event, PublishOptions)>) -> Result<()> {
        let outbox = postgres::PostgresOutbox::new(self.pool.clone(), topic);
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        for (event, options) in staged {
            outbox.stage(&mut tx, &event, options).await?;
        }
        tx.commit().await.map_err(db_error)
    }
    async fn business_rows(&self, topic: &str) -> Result<i64> {
        sqlx::query_scalar("SELECT count(*) FROM outbox_test_orders WHERE topic = $1")
            .bind(topic)
            .fetch_one(&self.pool)
            .await
            .map_err(db_error)
    }
    async fn sent_rows(&self, topic: &str) -> Result<i64> {
        sqlx::query_scalar(
            "SELECT count(*) FROM cloudbus_outbox WHERE topic = $1 AND sent_at IS NOT NULL",
        )
        .bind(topic)
        .fetch_one(&self.pool)
        .await
        .map_err(db_error)
    }
    async fn age_sent_rows(&self, topic: &str, by: Duration) -> Result<()> {
        sqlx::query(
            "UPDATE cloudbus_outbox SET sent_at = sent_at - $2 * interval '1 millisecond'
             WHERE topic = $1 AND sent_at IS NOT NULL",
        )
        .bind(topic)
        .bind(by.as_millis() as i64)
        .execute(&self.pool)
        .await
        .map_err(db_error)?;
        Ok(())
    }
}

struct Sqlite {
    pool: sqlx::SqlitePool,
    path: std::path::PathBuf,
}

impl Sqlite {
    async fn open() -> Self {
        let path = std::env::temp_dir().join(format!(
            "cloudbus-outbox-test-{}.db",
            uuid::Uuid::new_v4().simple()
        ));
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(30));
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await
            .expect("SQLite");
        sqlite::migrate(&pool).await.expect("migrate");
        sqlx::query("CREATE TABLE IF NOT EXISTS outbox_test_orders (topic TEXT, n INTEGER)")
            .execute(&pool)
            .await
            .expect("business table");
        Sqlite { pool, path }
    }
}

impl Drop for Sqlite {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let mut path = self.path.clone().into_os_string();
            path.push(suffix);
            let _ = std::fs::remove_file(path);
        }
    }
}

#[async_trait]
impl Db for Sqlite {
    fn outbox(&self, topic: &str) -> Arc<dyn OutboxStorage> {
        Arc::new(sqlite::SqliteOutbox::new(self.pool.clone(), topic))
    }
    async fn stage(&self, topic: &str, events: &[Event], commit: bool) -> Result<()> {
        let outbox = sqlite::SqliteOutbox::new(self.pool.clone(), topic);
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        for (n, event) in events.iter().enumerate() {
            sqlx::query("INSERT INTO outbox_test_orders (topic, n) VALUES (?1, ?2)")
                .bind(topic)
                .bind(n as i64)
                .execute(&mut *tx)
                .await
                .map_err(db_error)?;
            outbox
                .stage(&mut tx, event, PublishOptions::default())
                .await?;
        }
        if commit {
            tx.commit().await.map_err(db_error)
        } else {
            tx.rollback().await.map_err(db_error)
        }
    }
    async fn stage_with(&self, topic: &str, staged: Vec<(Event, PublishOptions)>) -> Result<()> {
        let outbox = sqlite::SqliteOutbox::new(self.pool.clone(), topic);
        let mut tx = self.pool.begin().await.map_err(db_error)?;
        for (event, options) in staged {
            outbox.stage(&mut tx, &event, options).await?;
        }
        tx.commit().await.map_err(db_error)
    }
    async fn business_rows(&self, topic: &str) -> Result<i64> {
        sqlx::query_scalar("SELECT count(*) FROM outbox_test_orders WHERE topic = ?1")
            .bind(topic)
            .fetch_one(&self.pool)
            .await
            .map_err(db_error)
    }
    async fn sent_rows(&self, topic: &str) -> Result<i64> {
        sqlx::query_scalar(
            "SELECT count(*) FROM cloudbus_outbox WHERE topic = ?1 AND sent_at IS NOT NULL",
        )
        .bind(topic)
        .fetch_one(&self.pool)
        .await
        .map_err(db_error)
    }
    async fn age_sent_rows(&self, topic: &str, by: Duration) -> Result<()> {
        sqlx::query("UPDATE cloudbus_outbox SET sent_at = sent_at - ?2 WHERE topic = ?1 AND sent_at IS NOT NULL")
            .bind(topic)
            .bind(by.as_millis() as i64)
            .execute(&self.pool)
            .await
            .map_err(db_error)?;
        Ok(())
    }
}

/// An outbox whose storage is passed through, with failures injected: the first
/// `fail_marks` marks of sent rows fail (the relay "dies" after the broker confirmed),
/// the first `fail_claims` claims fail (the database is away).
struct Faulty {
    inner: Arc<dyn OutboxStorage>,
    fail_marks: AtomicU32,
    fail_claims: AtomicU32,
    claims: AtomicU32,
}

impl Faulty {
    fn new(inner: Arc<dyn OutboxStorage>, fail_claims: u32, fail_marks: u32) -> Self {
        Faulty {
            inner,
            fail_marks: AtomicU32::new(fail_marks),
            fail_claims: AtomicU32::new(fail_claims),
            claims: AtomicU32::new(0),
        }
    }
}

fn take_one(counter: &AtomicU32) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

#[async_trait]
impl OutboxStorage for Faulty {
    fn topic(&self) -> &str {
        self.inner.topic()
    }
    async fn claim(&self, relay: &str, max: usize, lease: Duration) -> Result<Vec<StagedEvent>> {
        self.claims.fetch_add(1, Ordering::SeqCst);
        if take_one(&self.fail_claims) {
            return Err(Error::new(
                ErrorKind::Unavailable,
                "injected: the database is away",
            ));
        }
        self.inner.claim(relay, max, lease).await
    }
    async fn extend_claim(&self, relay: &str, ids: &[i64], lease: Duration) -> Result<Vec<i64>> {
        self.inner.extend_claim(relay, ids, lease).await
    }
    async fn hold_until_due(&self, id: i64, delay: Duration) -> Result<()> {
        self.inner.hold_until_due(id, delay).await
    }
    async fn mark_sent(&self, ids: &[i64]) -> Result<()> {
        if take_one(&self.fail_marks) {
            return Err(Error::new(
                ErrorKind::Unavailable,
                "injected: the relay died before its mark",
            ));
        }
        self.inner.mark_sent(ids).await
    }
    async fn retry_later(&self, id: i64, error: &str, after: Duration) -> Result<()> {
        self.inner.retry_later(id, error, after).await
    }
    async fn dead_letter(&self, id: i64, reason: &str) -> Result<()> {
        self.inner.dead_letter(id, reason).await
    }
    async fn backlog(&self) -> Result<OutboxBacklog> {
        self.inner.backlog().await
    }
    async fn purge_sent(&self, older_than: Duration) -> Result<u64> {
        self.inner.purge_sent(older_than).await
    }
    async fn wait_for_staged(&self, timeout: Duration) {
        self.inner.wait_for_staged(timeout).await
    }
}

/// An outbox whose storage is passed through, slowed or broken where a test says:
/// the first `delayed_claims` claims come back `claim_delay` after the database took
/// the rows (a slow network, a stalled process), every mark of sent rows waits
/// `mark_delay` first (a database busy with writers), and `retry_later` fails while
/// `fail_retries` (the database gone mid-round).
struct Tampered {
    inner: Arc<dyn OutboxStorage>,
    delayed_claims: AtomicU32,
    claim_delay: Duration,
    mark_delay: Duration,
    fail_retries: bool,
    /// Claims the database answered (before any delay).
    claims_done: AtomicU32,
}

impl Tampered {
    fn new(inner: Arc<dyn OutboxStorage>) -> Self {
        Tampered {
            inner,
            delayed_claims: AtomicU32::new(0),
            claim_delay: Duration::ZERO,
            mark_delay: Duration::ZERO,
            fail_retries: false,
            claims_done: AtomicU32::new(0),
        }
    }

    /// The first `claims` claims come back `delay` late.
    fn late_claims(mut self, claims: u32, delay: Duration) -> Self {
        self.delayed_claims = AtomicU32::new(claims);
        self.claim_delay = delay;
        self
    }

    fn slow_marks(mut self, delay: Duration) -> Self {
        self.mark_delay = delay;
        self
    }

    fn failing_retries(mut self) -> Self {
        self.fail_retries = true;
        self
    }

    /// Waits (up to 10 s) until the database answered `n` claims.
    async fn claimed(&self, n: u32) {
        let until = Instant::now() + Duration::from_secs(10);
        while self.claims_done.load(Ordering::SeqCst) < n && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            self.claims_done.load(Ordering::SeqCst) >= n,
            "the database did not answer {n} claims within 10 s"
        );
    }
}

#[async_trait]
impl OutboxStorage for Tampered {
    fn topic(&self) -> &str {
        self.inner.topic()
    }
    async fn claim(&self, relay: &str, max: usize, lease: Duration) -> Result<Vec<StagedEvent>> {
        let rows = self.inner.claim(relay, max, lease).await?;
        self.claims_done.fetch_add(1, Ordering::SeqCst);
        if take_one(&self.delayed_claims) {
            tokio::time::sleep(self.claim_delay).await;
        }
        Ok(rows)
    }
    async fn extend_claim(&self, relay: &str, ids: &[i64], lease: Duration) -> Result<Vec<i64>> {
        self.inner.extend_claim(relay, ids, lease).await
    }
    async fn hold_until_due(&self, id: i64, delay: Duration) -> Result<()> {
        self.inner.hold_until_due(id, delay).await
    }
    async fn mark_sent(&self, ids: &[i64]) -> Result<()> {
        if !self.mark_delay.is_zero() {
            tokio::time::sleep(self.mark_delay).await;
        }
        self.inner.mark_sent(ids).await
    }
    async fn retry_later(&self, id: i64, error: &str, after: Duration) -> Result<()> {
        if self.fail_retries {
            return Err(Error::new(
                ErrorKind::Unavailable,
                "injected: the database went away mid-round",
            ));
        }
        self.inner.retry_later(id, error, after).await
    }
    async fn dead_letter(&self, id: i64, reason: &str) -> Result<()> {
        self.inner.dead_letter(id, reason).await
    }
    async fn backlog(&self) -> Result<OutboxBacklog> {
        self.inner.backlog().await
    }
    async fn purge_sent(&self, older_than: Duration) -> Result<u64> {
        self.inner.purge_sent(older_than).await
    }
    async fn wait_for_staged(&self, timeout: Duration) {
        self.inner.wait_for_staged(timeout).await
    }
}

/// A provider that delays delivery at most `max_delay` (`None`: not at all), over the
/// memory broker's driver.
struct MaxDelay {
    inner: Arc<dyn TopicDriver>,
    max_delay: Option<Duration>,
}

#[async_trait]
impl TopicDriver for MaxDelay {
    async fn send_batch(&self, batch: &[OutgoingMessage]) -> Result<BatchResults> {
        self.inner.send_batch(batch).await
    }
    fn capabilities(&self) -> Capabilities {
        let mut caps = self.inner.capabilities();
        caps.max_delay = self.max_delay;
        caps
    }
}

/// A provider that refuses (retryably) every event whose id ends with `suffix`, over
/// the memory broker's driver.
struct FailSome {
    inner: Arc<dyn TopicDriver>,
    suffix: &'static str,
}

#[async_trait]
impl TopicDriver for FailSome {
    async fn send_batch(&self, batch: &[OutgoingMessage]) -> Result<BatchResults> {
        let passing: Vec<OutgoingMessage> = batch
            .iter()
            .filter(|m| !m.id().ends_with(self.suffix))
            .cloned()
            .collect();
        let mut sent = self.inner.send_batch(&passing).await?.into_iter();
        Ok(batch
            .iter()
            .map(|m| {
                if m.id().ends_with(self.suffix) {
                    Err(Error::new(ErrorKind::Unavailable, "injected: refused"))
                } else {
                    sent.next().unwrap_or_else(|| {
                        Err(Error::new(ErrorKind::Internal, "no result from the broker"))
                    })
                }
            })
            .collect())
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
}

/// Now, in milliseconds since the Unix epoch (the SQLite outbox's clock).
fn unix_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn unique_topic(what: &str) -> String {
    format!("{what}-{}", uuid::Uuid::new_v4().simple())
}

/// `n` events; event `i` has ordering key `key-{i % keys}` and subject `i`.
fn events(n: usize, keys: usize, tag: &str) -> Vec<Event> {
    events_from(0, n, keys, tag)
}

/// Events `start..start + n`, numbered (and keyed) as [`events`] does.
fn events_from(start: usize, n: usize, keys: usize, tag: &str) -> Vec<Event> {
    (start..start + n)
        .map(|i| {
            EventBuilder::new("com.example.outbox.test", "/outbox-test")
                .id(format!("{tag}-{i}"))
                .subject(i.to_string())
                .partition_key(format!("key-{}", i % keys.max(1)))
                .build()
                .expect("event")
        })
        .collect()
}

/// A memory broker with `topic` and one subscription on it.
async fn broker(topic: &str) -> (Bus, Consumer) {
    let bus = MemoryBroker::new().bus();
    bus.ensure_topic(topic).await.expect("topic");
    bus.ensure_subscription(&SubscriptionSpec::new(topic, "sink"))
        .await
        .expect("subscription");
    let consumer = bus.consumer(topic, "sink").await.expect("consumer");
    (bus, consumer)
}

/// Receives (and acks) until `want` events came or a second passes without one.
async fn receive_all(consumer: &Consumer, want: usize) -> Vec<Event> {
    let mut got = Vec::new();
    let mut quiet_since = Instant::now();
    while got.len() < want || quiet_since.elapsed() < Duration::from_millis(300) {
        let batch = consumer
            .receive_batch(500, Duration::from_millis(100))
            .await
            .expect("receive");
        if batch.is_empty() {
            if quiet_since.elapsed() > Duration::from_secs(20) {
                break;
            }
            continue;
        }
        quiet_since = Instant::now();
        for r in consumer.ack_all(&batch).await {
            r.expect("ack");
        }
        got.extend(batch.iter().map(|d| d.event().clone()));
    }
    got
}

/// Per ordering key, the subjects in the order they first arrived (a redelivered
/// duplicate does not count again).
fn arrival_order(events: &[Event]) -> HashMap<String, Vec<usize>> {
    let mut order: HashMap<String, Vec<usize>> = HashMap::new();
    let mut seen = HashSet::new();
    for e in events {
        if !seen.insert(e.id()) {
            continue;
        }
        let key = e.partition_key().unwrap_or("").to_owned();
        let n = e
            .subject()
            .and_then(|s| s.parse().ok())
            .unwrap_or(usize::MAX);
        order.entry(key).or_default().push(n);
    }
    order
}

fn fast_options() -> RelayOptions {
    RelayOptions {
        lease: Duration::from_millis(500),
        poll_interval: Duration::from_millis(20),
        ..RelayOptions::default()
    }
    .clone()
}

// ---- the cases, each run on PostgreSQL and SQLite ----

/// A committed transaction's events are published once, in order per key, and marked
/// sent; a rolled-back one publishes nothing (and wrote no business row).
async fn commit_publishes_rollback_does_not(db: &dyn Db) {
    let topic = unique_topic("commit");
    let (bus, consumer) = broker(&topic).await;
    db.stage(&topic, &events(5, 1, "rolled-back"), false)
        .await
        .expect("stage");
    db.stage(&topic, &events(50, 3, "committed"), true)
        .await
        .expect("stage");
    assert_eq!(db.business_rows(&topic).await.unwrap(), 50);
    let relay = OutboxRelay::new(db.outbox(&topic), bus.publisher(&topic).await.unwrap())
        .options(fast_options());
    let report = relay.drain().await.expect("drain");
    assert_eq!(report.published, 50, "{report:?}");
    let got = receive_all(&consumer, 50).await;
    assert_eq!(got.len(), 50, "published events received");
    assert!(
        got.iter().all(|e| e.id().starts_with("committed-")),
        "a rolled-back event was published"
    );
    for (key, order) in arrival_order(&got) {
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{key}: {order:?}");
    }
    assert_eq!(db.sent_rows(&topic).await.unwrap(), 50);
    let backlog = relay.backlog().await.unwrap();
    assert_eq!((backlog.pending, backlog.dead_lettered), (0, 0));
    assert_eq!(
        relay.drain().await.unwrap().claimed,
        0,
        "sent rows were claimed again"
    );
}

/// The relay dies between the broker's confirmation and its mark: a new relay
/// publishes those events again after the lease, so every event arrives at least
/// once, and a consumer deduplicating through a durable store handles each once.
async fn relay_death_after_confirmation_redelivers(db: &dyn Db) {
    use cloudbus_core::{Claim, DedupStore};
    let topic = unique_topic("crash");
    let (bus, consumer) = broker(&topic).await;
    db.stage(&topic, &events(40, 4, "crash"), true)
        .await
        .unwrap();
    let publisher = bus.publisher(&topic).await.unwrap();
    let dying = OutboxRelay::new(Faulty::new(db.outbox(&topic), 0, 1), publisher.clone()).options(
        RelayOptions {
            batch_size: 25,
            ..fast_options()
        },
    );
    let died = dying.relay_once().await;
    assert!(
        died.is_err(),
        "the injected failure did not happen: {died:?}"
    );
    // A new relay: it waits out the dead one's lease, then publishes the rest and the
    // unmarked ones again.
    let next = OutboxRelay::new(db.outbox(&topic), publisher).options(fast_options());
    let until = Instant::now() + Duration::from_secs(20);
    while next.backlog().await.unwrap().pending > 0 && Instant::now() < until {
        next.drain().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = receive_all(&consumer, 65).await;
    let distinct: HashSet<&str> = got.iter().map(|e| e.id()).collect();
    assert_eq!(
        distinct.len(),
        40,
        "lost events: {} of 40 arrived",
        distinct.len()
    );
    assert_eq!(got.len(), 65, "the 25 unmarked events should arrive twice");
    // The consumer's side: a durable dedup store (SQLite here) handles each once.
    let dedup_pool = sqlx::SqlitePool::connect("sqlite::memory:").await.unwrap();
    sqlite::migrate(&dedup_pool).await.unwrap();
    let dedup = sqlite::SqliteDedupStore::new(dedup_pool);
    let mut handled = 0;
    let mut duplicates = 0;
    for (delivery, e) in got.iter().enumerate() {
        let owner = format!("delivery-{delivery}");
        match dedup
            .claim(e.id(), &owner, Duration::from_secs(60))
            .await
            .unwrap()
        {
            Claim::Claimed => {
                handled += 1;
                dedup
                    .complete(e.id(), Duration::from_secs(3600))
                    .await
                    .unwrap();
            }
            _ => duplicates += 1,
        }
    }
    println!(
        "relay crash: 40 staged, {} delivered, {handled} handled, {duplicates} duplicates skipped",
        got.len()
    );
    assert_eq!((handled, duplicates), (40, 25));
}

/// 10,000 events staged by 4 concurrent writers, drained by 2 relays at once: none
/// lost, none claimed twice, order per key kept.
async fn four_writers_two_relays_lose_nothing(db: Arc<dyn Db>) {
    let topic = unique_topic("load");
    let (bus, consumer) = broker(&topic).await;
    let publisher = bus.publisher(&topic).await.unwrap();
    let stop = Arc::new(tokio::sync::Notify::new());
    let relays: Vec<_> = (0..2)
        .map(|i| {
            let relay = Arc::new(
                OutboxRelay::new(db.outbox(&topic), publisher.clone())
                    .name(format!("relay-{i}"))
                    // A lease no round comes near (SQLite makes a round wait for the
                    // writers' locks): a duplicate here would be a double claim.
                    .options(RelayOptions {
                        lease: Duration::from_secs(10),
                        ..fast_options()
                    }),
            );
            let stop = stop.clone();
            let task_relay = relay.clone();
            let task = tokio::spawn(async move { task_relay.run(stop.notified()).await });
            (relay, task)
        })
        .collect();
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let db = db.clone();
            let topic = topic.clone();
            tokio::spawn(async move {
                // Writer w owns keys w*5 .. w*5+4 (writers of one key serialize, as
                // they do on the same aggregate).
                for chunk in 0..25 {
                    let batch: Vec<Event> = (0..100)
                        .map(|i| {
                            let n = chunk * 100 + i;
                            EventBuilder::new("com.example.outbox.load", "/outbox-test")
                                .id(format!("w{w}-{n}"))
                                .subject(n.to_string())
                                .partition_key(format!("key-{}", w * 5 + n % 5))
                                .build()
                                .expect("event")
                        })
                        .collect();
                    db.stage(&topic, &batch, true).await.expect("stage");
                }
            })
        })
        .collect();
    for w in writers {
        w.await.unwrap();
    }
    let got = receive_all(&consumer, 10_000).await;
    stop.notify_waiters();
    let mut per_relay = Vec::new();
    for (relay, task) in relays {
        let _ = tokio::time::timeout(Duration::from_secs(10), task).await;
        per_relay.push(relay.published().load(Ordering::Relaxed));
    }
    let distinct: HashSet<&str> = got.iter().map(|e| e.id()).collect();
    let duplicates = got.len() - distinct.len();
    println!(
        "4 writers, 2 relays: 10000 staged, {} delivered, {} distinct, {duplicates} duplicates; published per relay {per_relay:?}",
        got.len(),
        distinct.len()
    );
    assert_eq!(distinct.len(), 10_000, "lost events");
    assert_eq!(
        duplicates, 0,
        "a row was published twice without any failure"
    );
    for (key, order) in arrival_order(&got) {
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{key} out of order");
    }
    assert_eq!(db.sent_rows(&topic).await.unwrap(), 10_000);
}

/// The broker away (its topic missing) and the database away (claims failing): the
/// relay backs off without a busy loop and publishes everything once both are back.
async fn relay_survives_broker_and_database_outages(db: &dyn Db) {
    let topic = unique_topic("outage");
    let broker = MemoryBroker::new();
    let bus = broker.bus();
    db.stage(&topic, &events(30, 3, "outage"), true)
        .await
        .unwrap();
    // No topic yet: every publish fails (NotFound), which the relay retries.
    let storage = Arc::new(Faulty::new(db.outbox(&topic), 5, 0));
    let publisher = bus.publisher(&topic).await.unwrap();
    let relay = Arc::new(
        OutboxRelay::new(storage.clone(), publisher).options(RelayOptions {
            retry: cloudbus_core::RetryPolicy::default()
                .initial_backoff(Duration::from_millis(20))
                .max_backoff(Duration::from_millis(200)),
            ..fast_options()
        }),
    );
    let stop = Arc::new(tokio::sync::Notify::new());
    let task = {
        let relay = relay.clone();
        let stop = stop.clone();
        tokio::spawn(async move { relay.run(stop.notified()).await })
    };
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let claims_while_away = storage.claims.load(Ordering::SeqCst);
    assert!(
        claims_while_away < 60,
        "{claims_while_away} claims in 1.5 s while the broker was away: a busy loop"
    );
    assert_eq!(
        relay.backlog().await.unwrap().pending,
        30,
        "events lost while the broker was away"
    );
    bus.ensure_topic(&topic).await.unwrap();
    bus.ensure_subscription(&SubscriptionSpec::new(&topic, "sink"))
        .await
        .unwrap();
    let consumer = bus.consumer(&topic, "sink").await.unwrap();
    let got = receive_all(&consumer, 30).await;
    stop.notify_waiters();
    let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    let distinct: HashSet<&str> = got.iter().map(|e| e.id()).collect();
    assert_eq!(
        distinct.len(),
        30,
        "after the outage {} of 30 arrived",
        distinct.len()
    );
    for (key, order) in arrival_order(&got) {
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{key}: {order:?}");
    }
}

/// Sent rows are kept for the retention, then deleted; unsent rows never are.
async fn retention_deletes_only_old_sent_rows(db: &dyn Db) {
    let topic = unique_topic("retention");
    let (bus, _consumer) = broker(&topic).await;
    db.stage(&topic, &events(10, 1, "old"), true).await.unwrap();
    let storage = db.outbox(&topic);
    let relay = OutboxRelay::new(storage.clone(), bus.publisher(&topic).await.unwrap());
    relay.drain().await.unwrap();
    db.stage(&topic, &events(5, 1, "unsent"), true)
        .await
        .unwrap();
    assert_eq!(
        storage.purge_sent(Duration::from_secs(3600)).await.unwrap(),
        0
    );
    db.age_sent_rows(&topic, Duration::from_secs(7200))
        .await
        .unwrap();
    assert_eq!(
        storage.purge_sent(Duration::from_secs(3600)).await.unwrap(),
        10
    );
    assert_eq!(db.sent_rows(&topic).await.unwrap(), 0);
    assert_eq!(storage.backlog().await.unwrap().pending, 5);
}

/// Issue 28 item 7: a row staged with a delay over the publisher's maximum was
/// dead-lettered (the publisher's InvalidArgument taken for the row's fault). It is
/// held until it is due and then published without a delay; the later rows of its
/// key are not held back by it, and a delay within the maximum still goes to the
/// broker.
async fn over_maximum_delay_is_held_until_due(db: &dyn Db) {
    let topic = unique_topic("delay");
    let (bus, consumer) = broker(&topic).await;
    let publisher = Publisher::new(Arc::new(MaxDelay {
        inner: bus.publisher(&topic).await.unwrap().driver().clone(),
        max_delay: Some(Duration::from_millis(300)),
    }));
    let delay = Duration::from_millis(1_500);
    let mut staged = events(3, 1, "delay").into_iter();
    let (late, next, short) = (
        staged.next().unwrap(),
        staged.next().unwrap(),
        staged.next().unwrap(),
    );
    let staged_at = Instant::now();
    db.stage_with(
        &topic,
        vec![
            (
                late,
                PublishOptions {
                    delay: Some(delay),
                    ..PublishOptions::default()
                },
            ),
            (next, PublishOptions::default()),
            (
                short,
                PublishOptions {
                    delay: Some(Duration::from_millis(100)),
                    ..PublishOptions::default()
                },
            ),
        ],
    )
    .await
    .unwrap();
    let relay = OutboxRelay::new(db.outbox(&topic), publisher).options(fast_options());
    let first = relay.drain().await.unwrap();
    assert_eq!(
        (first.held, first.dead_lettered, first.published),
        (1, 0, 2),
        "{first:?}"
    );
    let early: HashSet<String> = receive_all(&consumer, 2)
        .await
        .iter()
        .map(|e| e.id().to_owned())
        .collect();
    assert_eq!(
        early,
        HashSet::from(["delay-1".to_owned(), "delay-2".to_owned()]),
        "the rows after the held one, of its key, came at once"
    );
    let backlog = relay.backlog().await.unwrap();
    assert_eq!((backlog.pending, backlog.dead_lettered), (1, 0));
    let until = Instant::now() + Duration::from_secs(10);
    let mut published = 0;
    while published == 0 && Instant::now() < until {
        published = relay.drain().await.unwrap().published;
        if published == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let published_by = staged_at.elapsed();
    assert_eq!(published, 1, "the held row was not published within 10 s");
    assert!(
        published_by >= delay,
        "published {published_by:?} after staging, before its delay of {delay:?}"
    );
    let late: Vec<String> = receive_all(&consumer, 1)
        .await
        .iter()
        .map(|e| e.id().to_owned())
        .collect();
    assert_eq!(late, vec!["delay-0".to_owned()]);
    let backlog = relay.backlog().await.unwrap();
    assert_eq!((backlog.pending, backlog.dead_lettered), (0, 0));
}

/// The options of the lease tests: a 1 s lease, renewed every 333 ms.
fn lease_options() -> RelayOptions {
    RelayOptions {
        lease: Duration::from_secs(1),
        ..fast_options()
    }
}

/// Issue 28 item 14: a round whose mark waited longer than its lease (a database
/// busy with writers) let another relay claim and publish its rows again. The round
/// renews its claim while it runs now: the other relay claims nothing, and nothing
/// arrives twice.
async fn a_slow_round_keeps_its_claim(db: &dyn Db) {
    let topic = unique_topic("slow-round");
    let (bus, consumer) = broker(&topic).await;
    db.stage(&topic, &events(20, 4, "slow"), true)
        .await
        .unwrap();
    let publisher = bus.publisher(&topic).await.unwrap();
    let storage = Arc::new(Tampered::new(db.outbox(&topic)).slow_marks(Duration::from_secs(3)));
    let slow = Arc::new(
        OutboxRelay::new(storage.clone(), publisher.clone())
            .name("slow")
            .options(lease_options()),
    );
    let round = {
        let slow = slow.clone();
        tokio::spawn(async move { slow.relay_once().await })
    };
    storage.claimed(1).await;
    let other = OutboxRelay::new(db.outbox(&topic), publisher)
        .name("other")
        .options(lease_options());
    let mut taken = 0;
    let until = Instant::now() + Duration::from_millis(3_800);
    while Instant::now() < until {
        taken += other.relay_once().await.unwrap().claimed;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let report = round.await.unwrap().unwrap();
    assert_eq!(report.published, 20, "{report:?}");
    assert_eq!(
        taken, 0,
        "another relay claimed rows of a round that was still running"
    );
    let got = receive_all(&consumer, 20).await;
    let distinct: HashSet<&str> = got.iter().map(|e| e.id()).collect();
    assert_eq!((distinct.len(), got.len()), (20, 20), "lost or duplicated");
}

/// Issue 28 item 14, the other way round: a claim that came back after its lease
/// (another relay took the rows meanwhile and published them) published them again.
/// The round now publishes only rows it surely still holds.
async fn a_claim_back_after_its_lease_publishes_nothing(db: &dyn Db) {
    let topic = unique_topic("late-claim");
    let (bus, consumer) = broker(&topic).await;
    db.stage(&topic, &events(20, 4, "late"), true)
        .await
        .unwrap();
    let publisher = bus.publisher(&topic).await.unwrap();
    let storage = Arc::new(Tampered::new(db.outbox(&topic)).late_claims(1, Duration::from_secs(2)));
    let late = Arc::new(
        OutboxRelay::new(storage.clone(), publisher.clone())
            .name("late")
            .options(lease_options()),
    );
    let round = {
        let late = late.clone();
        tokio::spawn(async move { late.relay_once().await })
    };
    storage.claimed(1).await;
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let other = OutboxRelay::new(db.outbox(&topic), publisher)
        .name("other")
        .options(lease_options());
    let taken = other.drain().await.unwrap();
    assert_eq!(
        taken.published, 20,
        "the lapsed claim was not taken: {taken:?}"
    );
    let report = round.await.unwrap().unwrap();
    assert_eq!(
        (report.claimed, report.published),
        (20, 0),
        "the late claim published rows another relay had taken: {report:?}"
    );
    let got = receive_all(&consumer, 20).await;
    let distinct: HashSet<&str> = got.iter().map(|e| e.id()).collect();
    assert_eq!((distinct.len(), got.len()), (20, 20), "lost or duplicated");
}

/// Failure modes (issue 28): a round cancelled after its claim (a shutdown deadline,
/// a timeout around `relay_once`) loses nothing; and its rows, leased to this relay,
/// held back the later rows of their key from every relay but this one, so the same
/// relay's next round published them first, out of order. They wait for the lease
/// now, then all go in order.
async fn a_cancelled_round_loses_nothing_and_keeps_the_order(db: &dyn Db) {
    let topic = unique_topic("cancelled");
    let (bus, consumer) = broker(&topic).await;
    db.stage(&topic, &events(10, 1, "cancelled"), true)
        .await
        .unwrap();
    let storage = Arc::new(Tampered::new(db.outbox(&topic)).late_claims(1, Duration::from_secs(3)));
    let relay = OutboxRelay::new(storage.clone(), bus.publisher(&topic).await.unwrap())
        .name("cancelled")
        .options(RelayOptions {
            batch_size: 3,
            lease: Duration::from_secs(3),
            ..fast_options()
        });
    let cancelled = tokio::time::timeout(Duration::from_millis(500), relay.relay_once()).await;
    assert!(
        cancelled.is_err(),
        "the round was not cancelled: {cancelled:?}"
    );
    assert_eq!(storage.claims_done.load(Ordering::SeqCst), 1);
    let next = relay.relay_once().await.unwrap();
    assert_eq!(
        next.claimed, 0,
        "later rows of the key were claimed while earlier ones were leased: {next:?}"
    );
    let until = Instant::now() + Duration::from_secs(10);
    while relay.backlog().await.unwrap().pending > 0 && Instant::now() < until {
        relay.drain().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = receive_all(&consumer, 10).await;
    let distinct: HashSet<&str> = got.iter().map(|e| e.id()).collect();
    assert_eq!(distinct.len(), 10, "lost: {} of 10 arrived", distinct.len());
    for (key, order) in arrival_order(&got) {
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{key}: {order:?}");
    }
}

/// Failure modes (issue 28): the database failing after the broker confirmed some
/// rows and refused another (its `retry_later` fails) left the confirmed ones
/// unmarked, to be published again. They are marked first now.
async fn confirmed_rows_are_marked_before_a_failure_is_recorded(db: &dyn Db) {
    let topic = unique_topic("mark-first");
    let (bus, consumer) = broker(&topic).await;
    db.stage(&topic, &events(3, 3, "mark-first"), true)
        .await
        .unwrap();
    let publisher = Publisher::new(Arc::new(FailSome {
        inner: bus.publisher(&topic).await.unwrap().driver().clone(),
        suffix: "-0",
    }));
    let relay = OutboxRelay::new(
        Tampered::new(db.outbox(&topic)).failing_retries(),
        publisher,
    )
    .options(fast_options());
    let round = relay.relay_once().await;
    assert!(
        round.is_err(),
        "the injected failure did not happen: {round:?}"
    );
    assert_eq!(
        db.sent_rows(&topic).await.unwrap(),
        2,
        "the confirmed rows were not marked"
    );
    assert_eq!(receive_all(&consumer, 2).await.len(), 2);
}

mod on_postgres {
    use super::*;

    async fn db() -> Option<Arc<Postgres>> {
        Postgres::open().await.map(Arc::new)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn commit_publishes_rollback_does_not() {
        let Some(db) = db().await else { return };
        super::commit_publishes_rollback_does_not(db.as_ref()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn relay_death_after_confirmation_redelivers() {
        let Some(db) = db().await else { return };
        super::relay_death_after_confirmation_redelivers(db.as_ref()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn four_writers_two_relays_lose_nothing() {
        let Some(db) = db().await else { return };
        super::four_writers_two_relays_lose_nothing(db).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn relay_survives_broker_and_database_outages() {
        let Some(db) = db().await else { return };
        super::relay_survives_broker_and_database_outages(db.as_ref()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retention_deletes_only_old_sent_rows() {
        let Some(db) = db().await else { return };
        super::retention_deletes_only_old_sent_rows(db.as_ref()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn over_maximum_delay_is_held_until_due() {
        let Some(db) = db().await else { return };
        super::over_maximum_delay_is_held_until_due(db.as_ref()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_round_keeps_its_claim() {
        let Some(db) = db().await else { return };
        super::a_slow_round_keeps_its_claim(db.as_ref()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_claim_back_after_its_lease_publishes_nothing() {
        let Some(db) = db().await else { return };
        super::a_claim_back_after_its_lease_publishes_nothing(db.as_ref()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_round_loses_nothing_and_keeps_the_order() {
        let Some(db) = db().await else { return };
        super::a_cancelled_round_loses_nothing_and_keeps_the_order(db.as_ref()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn confirmed_rows_are_marked_before_a_failure_is_recorded() {
        let Some(db) = db().await else { return };
        super::confirmed_rows_are_marked_before_a_failure_is_recorded(db.as_ref()).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn undecodable_row_is_dead_lettered() {
        let Some(db) = db().await else { return };
        let topic = unique_topic("garbage");
        let (bus, consumer) = broker(&topic).await;
        db.stage(&topic, &events(1, 1, "before"), true)
            .await
            .unwrap();
        sqlx::query("INSERT INTO cloudbus_outbox (topic, ordering_key, event) VALUES ($1, 'key-0', 'not json')")
            .bind(&topic)
            .execute(&db.pool)
            .await
            .unwrap();
        db.stage(&topic, &events(2, 1, "after"), true)
            .await
            .unwrap();
        super::expect_dead_lettered_garbage(db.outbox(&topic), &bus, &topic, &consumer).await;
    }

    /// A real database fault: every connection of the relay is terminated by the server
    /// (as a failover or a restart does) while it works; it backs off, reconnects and
    /// publishes every event, none lost.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn relay_survives_its_connections_being_killed() {
        let Some(db) = db().await else { return };
        let topic = unique_topic("killed");
        let (bus, consumer) = broker(&topic).await;
        let options: sqlx::postgres::PgConnectOptions =
            std::env::var("DATABASE_URL").unwrap().parse().unwrap();
        let relay_pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect_with(options.application_name("cloudbus-relay-test"))
            .await
            .unwrap();
        let relay = Arc::new(
            OutboxRelay::new(
                postgres::PostgresOutbox::new(relay_pool.clone(), topic.clone()),
                bus.publisher(&topic).await.unwrap(),
            )
            .options(RelayOptions {
                batch_size: 10,
                ..fast_options()
            }),
        );
        let stop = Arc::new(tokio::sync::Notify::new());
        let task = {
            let (relay, stop) = (relay.clone(), stop.clone());
            tokio::spawn(async move { relay.run(stop.notified()).await })
        };
        let mut killed = 0i64;
        for batch in 0..10 {
            db.stage(&topic, &events_from(batch * 20, 20, 4, "killed"), true)
                .await
                .unwrap();
            // Terminate the relay's connections (its LISTEN connection among them).
            let n: i64 = sqlx::query_scalar(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                 WHERE pid <> pg_backend_pid() AND application_name = 'cloudbus-relay-test'",
            )
            .fetch_one(&db.pool)
            .await
            .unwrap();
            killed += n;
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        let got = receive_all(&consumer, 200).await;
        stop.notify_waiters();
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        let distinct: HashSet<&str> = got.iter().map(|e| e.id()).collect();
        println!(
            "connections killed: {killed}; {} of 200 events arrived, {} deliveries",
            distinct.len(),
            got.len()
        );
        assert!(
            killed > 0,
            "no relay connection was terminated: the test tested nothing"
        );
        assert_eq!(
            distinct.len(),
            200,
            "events lost after the connections were killed"
        );
        for (key, order) in arrival_order(&got) {
            assert!(order.windows(2).all(|w| w[0] < w[1]), "{key}: {order:?}");
        }
    }

    /// An outbox whose relay never runs out of work: every claim goes to the real
    /// outbox (which finds nothing, and drains its LISTEN connection), then hands out
    /// one made-up event. Counts the relay's waits for staged events.
    struct Busy {
        inner: postgres::PostgresOutbox,
        next_id: AtomicI64,
        waits: AtomicU32,
    }

    #[async_trait]
    impl OutboxStorage for Busy {
        fn topic(&self) -> &str {
            self.inner.topic()
        }
        async fn claim(
            &self,
            relay: &str,
            max: usize,
            lease: Duration,
        ) -> Result<Vec<StagedEvent>> {
            self.inner.claim(relay, max, lease).await?;
            tokio::time::sleep(Duration::from_millis(2)).await;
            let id = self.next_id.fetch_add(1, Ordering::SeqCst);
            let event = EventBuilder::new("com.example.outbox.busy", "/outbox-test")
                .id(format!("busy-{id}"))
                .build()?;
            Ok(vec![StagedEvent {
                id,
                event: cloudbus_core::codec::to_structured_json(&event)?,
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
            self.waits.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(timeout).await;
        }
    }

    /// Notifications of ~8 KB each (one queue page apiece) a flood sends, in one
    /// transaction: 24 MB, more than the socket buffers of a connection that is not
    /// read can take, so that its backend blocks and the queue keeps the rest.
    const FLOOD: i64 = 3_000;

    /// Sends the flood on the relays' channel (payloads no topic has: every listener
    /// must read past them).
    async fn flood(pool: &sqlx::PgPool) {
        sqlx::query(
            "SELECT pg_notify('cloudbus_outbox', n::text || repeat(md5(n::text), 248))
             FROM generate_series(1, $1) n",
        )
        .bind(FLOOD)
        .execute(pool)
        .await
        .unwrap();
    }

    /// The notification queue's pages in use (of 8 KB), behind its slowest listener.
    async fn queue_pages(pool: &sqlx::PgPool) -> f64 {
        sqlx::query_scalar(
            "SELECT pg_notification_queue_usage()
                 * COALESCE(current_setting('max_notify_queue_pages', true)::float8, 1048576)",
        )
        .fetch_one(pool)
        .await
        .unwrap()
    }

    /// Backends of `application` blocked writing to their client: a LISTEN connection
    /// whose notifications nobody reads.
    async fn blocked_writing(pool: &sqlx::PgPool, application: &str) -> i64 {
        sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE application_name = $1 AND wait_event = 'ClientWrite'",
        )
        .bind(application)
        .fetch_one(pool)
        .await
        .unwrap()
    }

    /// A pool whose connections name `application`.
    async fn named_pool(application: &str) -> sqlx::PgPool {
        let options: sqlx::postgres::PgConnectOptions =
            std::env::var("DATABASE_URL").unwrap().parse().unwrap();
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(2)
            .connect_with(options.application_name(application))
            .await
            .unwrap()
    }

    /// Issue 28 item 13: a busy relay (a backlog that never ends) never read its LISTEN
    /// connection, so PostgreSQL's cluster-wide notification queue kept every
    /// notification from then on (up to 8 GB, then every `NOTIFY`, and so every
    /// `stage`, fails). First a control: a listener nobody reads backs the queue up
    /// with the flood (its backend blocks writing to it), which proves the flood is
    /// big enough to see. Then a relay kept busy through the same flood: its backend
    /// must not stay blocked, and the queue must come back near empty, while the relay
    /// never once waits (its rounds drain the connection).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_busy_relay_keeps_the_notification_queue_empty() {
        let Some(db) = db().await else { return };
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let (relay_app, stuck_app) = (
            format!("busy-{}", &tag[..12]),
            format!("stuck-{}", &tag[..12]),
        );

        let stuck_pool = named_pool(&stuck_app).await;
        let mut stuck = sqlx::postgres::PgListener::connect_with(&stuck_pool)
            .await
            .unwrap();
        stuck.listen("cloudbus_outbox").await.unwrap();
        flood(&db.pool).await;
        let until = Instant::now() + Duration::from_secs(10);
        while blocked_writing(&db.pool, &stuck_app).await == 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let stuck_pages = queue_pages(&db.pool).await;
        let stuck_blocked = blocked_writing(&db.pool, &stuck_app).await;
        sqlx::query(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE application_name = $1",
        )
        .bind(&stuck_app)
        .execute(&db.pool)
        .await
        .unwrap();
        drop(stuck);
        println!(
            "control: a listener nobody reads leaves {stuck_pages:.0} pages of {FLOOD} in the queue"
        );
        assert!(
            stuck_blocked > 0 && stuck_pages >= (FLOOD / 4) as f64,
            "the control listener did not back the queue up ({stuck_blocked} blocked, {stuck_pages:.0} pages): the flood is too small to test anything"
        );

        let topic = unique_topic("busy");
        let bus = MemoryBroker::new().bus();
        bus.ensure_topic(&topic).await.unwrap();
        let outbox = postgres::PostgresOutbox::new(named_pool(&relay_app).await, topic.clone());
        // Listening, as after the relay found the outbox idle once.
        outbox.wait_for_staged(Duration::from_millis(100)).await;
        let listening: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE application_name = $1 AND query LIKE 'LISTEN%'",
        )
        .bind(&relay_app)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert_eq!(
            listening, 1,
            "the relay is not listening: the test tests nothing"
        );
        let storage = Arc::new(Busy {
            inner: outbox,
            next_id: AtomicI64::new(1),
            waits: AtomicU32::new(0),
        });
        let relay = Arc::new(
            OutboxRelay::new(storage.clone(), bus.publisher(&topic).await.unwrap())
                .options(fast_options()),
        );
        let stop = Arc::new(tokio::sync::Notify::new());
        let task = {
            let (relay, stop) = (relay.clone(), stop.clone());
            tokio::spawn(async move { relay.run(stop.notified()).await })
        };
        flood(&db.pool).await;
        let until = Instant::now() + Duration::from_secs(10);
        let (mut blocked, mut pages);
        loop {
            blocked = blocked_writing(&db.pool, &relay_app).await;
            pages = queue_pages(&db.pool).await;
            if (blocked == 0 && pages < 64.0) || Instant::now() > until {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        stop.notify_waiters();
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        println!(
            "busy relay: {} rounds published, {pages:.0} pages left in the queue",
            relay.published().load(Ordering::Relaxed)
        );
        assert_eq!(
            storage.waits.load(Ordering::SeqCst),
            0,
            "the relay waited for staged events: it was not kept busy"
        );
        assert_eq!(
            blocked, 0,
            "the busy relay's LISTEN connection is backed up: its notifications are never read"
        );
        assert!(
            pages < 64.0,
            "the notification queue keeps {pages:.0} pages (of {FLOOD} sent) behind a busy relay"
        );
    }

    /// A relay that stopped left its LISTEN connection listening (the audit of issue 28
    /// item 13): the application goes on staging with the same outbox, every commit
    /// notifies, nobody reads, and the cluster's notification queue fills. The relay
    /// lets go of it when it stops.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stopped_relay_stops_listening() {
        let Some(db) = db().await else { return };
        let app = format!(
            "stopped-{}",
            &uuid::Uuid::new_v4().simple().to_string()[..12]
        );
        let listening = || {
            let (pool, app) = (db.pool.clone(), app.clone());
            async move {
                sqlx::query_scalar::<_, i64>(
                    "SELECT count(*) FROM pg_stat_activity
                     WHERE application_name = $1 AND query LIKE 'LISTEN%'",
                )
                .bind(app)
                .fetch_one(&pool)
                .await
                .unwrap()
            }
        };
        let topic = unique_topic("stopped");
        let bus = MemoryBroker::new().bus();
        bus.ensure_topic(&topic).await.unwrap();
        let outbox = postgres::PostgresOutbox::new(named_pool(&app).await, topic.clone());
        let relay = Arc::new(
            OutboxRelay::new(outbox.clone(), bus.publisher(&topic).await.unwrap())
                .options(fast_options()),
        );
        let stop = Arc::new(tokio::sync::Notify::new());
        let task = {
            let (relay, stop) = (relay.clone(), stop.clone());
            tokio::spawn(async move { relay.run(stop.notified()).await })
        };
        let until = Instant::now() + Duration::from_secs(10);
        while listening().await == 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            listening().await,
            1,
            "the relay never listened: the test tests nothing"
        );
        stop.notify_waiters();
        tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let until = Instant::now() + Duration::from_secs(5);
        while listening().await > 0 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            listening().await,
            0,
            "the stopped relay's connection still listens; the outbox is still in use"
        );
        drop(outbox);
    }

    /// A relay waiting on an idle outbox is woken by the notification of a commit, long
    /// before its poll interval.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_commit_wakes_the_relay() {
        let Some(db) = db().await else { return };
        let topic = unique_topic("notify");
        let (bus, consumer) = broker(&topic).await;
        let relay = Arc::new(
            OutboxRelay::new(db.outbox(&topic), bus.publisher(&topic).await.unwrap()).options(
                RelayOptions {
                    poll_interval: Duration::from_secs(60),
                    ..RelayOptions::default()
                },
            ),
        );
        let stop = Arc::new(tokio::sync::Notify::new());
        let task = {
            let (relay, stop) = (relay.clone(), stop.clone());
            tokio::spawn(async move { relay.run(stop.notified()).await })
        };
        // Let the relay find the outbox empty and start listening.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let staged_at = Instant::now();
        db.stage(&topic, &events(1, 1, "wake"), true).await.unwrap();
        let got = consumer
            .receive_batch(1, Duration::from_secs(10))
            .await
            .unwrap();
        let waited = staged_at.elapsed();
        stop.notify_waiters();
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        assert_eq!(got.len(), 1, "the staged event did not arrive within 10 s");
        assert!(
            waited < Duration::from_secs(5),
            "woken after {waited:?}: the poll, not the notification"
        );
        println!("staged to received through NOTIFY: {waited:?} (poll interval 60 s)");
    }
}

mod on_sqlite {
    use super::*;

    /// The relay records the guide's outbox metrics for its topic: the backlog when it
    /// starts (7 pending), what it published, and the empty backlog at its end.
    #[test]
    fn the_relay_records_the_outbox_metrics() {
        use metrics_util::debugging::{DebugValue, DebuggingRecorder};
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let topic = unique_topic("metrics");
        let mut pending_seen = Vec::new();
        metrics::with_local_recorder(&recorder, || {
            runtime.block_on(async {
                let db = Sqlite::open().await;
                let (bus, consumer) = broker(&topic).await;
                db.stage(&topic, &events(7, 2, "metered"), true)
                    .await
                    .unwrap();
                let relay = Arc::new(
                    OutboxRelay::new(db.outbox(&topic), bus.publisher(&topic).await.unwrap())
                        .options(fast_options()),
                );
                let stop = Arc::new(tokio::sync::Notify::new());
                let task = {
                    let (relay, stop) = (relay.clone(), stop.clone());
                    tokio::spawn(async move { relay.run(stop.notified()).await })
                };
                let got = receive_all(&consumer, 7).await;
                assert_eq!(got.len(), 7);
                stop.notify_waiters();
                task.await.unwrap().unwrap();
            })
        });
        let snapshot = snapshotter.snapshot().into_vec();
        let value = |name: &str| {
            snapshot
                .iter()
                .find(|(key, _, _, _)| {
                    key.key().name() == name
                        && key
                            .key()
                            .labels()
                            .any(|l| l.key() == "topic" && l.value() == topic)
                })
                .map(|(_, _, _, value)| value)
        };
        match value("outbox_published_total") {
            Some(DebugValue::Counter(n)) => assert_eq!(*n, 7),
            other => panic!("outbox_published_total: {other:?}"),
        }
        for gauge in ["outbox_pending", "outbox_oldest_age_seconds"] {
            match value(gauge) {
                Some(DebugValue::Gauge(v)) => pending_seen.push((gauge, v.into_inner())),
                other => panic!("{gauge}: {other:?}"),
            }
        }
        assert_eq!(
            pending_seen,
            vec![("outbox_pending", 0.0), ("outbox_oldest_age_seconds", 0.0)]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn commit_publishes_rollback_does_not() {
        super::commit_publishes_rollback_does_not(&Sqlite::open().await).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn relay_death_after_confirmation_redelivers() {
        super::relay_death_after_confirmation_redelivers(&Sqlite::open().await).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn four_writers_two_relays_lose_nothing() {
        super::four_writers_two_relays_lose_nothing(Arc::new(Sqlite::open().await)).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn relay_survives_broker_and_database_outages() {
        super::relay_survives_broker_and_database_outages(&Sqlite::open().await).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retention_deletes_only_old_sent_rows() {
        super::retention_deletes_only_old_sent_rows(&Sqlite::open().await).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn over_maximum_delay_is_held_until_due() {
        super::over_maximum_delay_is_held_until_due(&Sqlite::open().await).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_round_keeps_its_claim() {
        super::a_slow_round_keeps_its_claim(&Sqlite::open().await).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_claim_back_after_its_lease_publishes_nothing() {
        super::a_claim_back_after_its_lease_publishes_nothing(&Sqlite::open().await).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cancelled_round_loses_nothing_and_keeps_the_order() {
        super::a_cancelled_round_loses_nothing_and_keeps_the_order(&Sqlite::open().await).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn confirmed_rows_are_marked_before_a_failure_is_recorded() {
        super::confirmed_rows_are_marked_before_a_failure_is_recorded(&Sqlite::open().await).await;
    }

    /// Issue 28 item 14: a SQLite claim read the clock before it waited for the write
    /// lock, so the lease it wrote had lost the wait (800 ms of a 1 s lease here), and
    /// a round under writers' contention outlived it. The statement reads the clock
    /// once it holds the lock now.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_claim_that_waited_for_the_write_lock_keeps_its_whole_lease() {
        let db = Sqlite::open().await;
        let topic = unique_topic("locked");
        db.stage(&topic, &events(1, 1, "locked"), true)
            .await
            .unwrap();
        let writer = db.pool.begin_with("BEGIN IMMEDIATE").await.unwrap();
        let outbox = db.outbox(&topic);
        let lease = Duration::from_secs(1);
        let claim = tokio::spawn(async move { outbox.claim("waiting", 10, lease).await });
        tokio::time::sleep(Duration::from_millis(800)).await;
        writer.commit().await.unwrap();
        let rows = claim.await.unwrap().unwrap();
        let returned_at = unix_millis();
        assert_eq!(rows.len(), 1);
        let until: i64 =
            sqlx::query_scalar("SELECT claimed_until FROM cloudbus_outbox WHERE topic = ?1")
                .bind(&topic)
                .fetch_one(&db.pool)
                .await
                .unwrap();
        assert!(
            until - returned_at >= 850,
            "the lease ends {} ms after the claim came back, not about 1000: the wait for the lock was taken out of it",
            until - returned_at
        );
    }

    /// Failure modes (issue 28): a row SQLite holds with a value of the wrong type (a
    /// hand-written INSERT; SQLite keeps what it is given) failed every claim of its
    /// topic, so nothing was published any more. It is dead-lettered with the reason,
    /// and the rows around it are published.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unreadable_row_is_dead_lettered_not_blocking() {
        let db = Sqlite::open().await;
        let topic = unique_topic("unreadable");
        let (bus, consumer) = broker(&topic).await;
        db.stage(&topic, &events(1, 1, "before"), true)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO cloudbus_outbox (topic, event, created_at, available_at, attempts)
             VALUES (?1, '{}', 0, 0, 'many')",
        )
        .bind(&topic)
        .execute(&db.pool)
        .await
        .unwrap();
        db.stage(&topic, &events(2, 1, "after"), true)
            .await
            .unwrap();
        let relay = OutboxRelay::new(db.outbox(&topic), bus.publisher(&topic).await.unwrap());
        let report = relay.drain().await.unwrap();
        assert_eq!(report.published, 3, "{report:?}");
        let backlog = relay.backlog().await.unwrap();
        assert_eq!((backlog.pending, backlog.dead_lettered), (0, 1));
        let reason: String = sqlx::query_scalar(
            "SELECT dead_reason FROM cloudbus_outbox WHERE topic = ?1 AND dead_reason IS NOT NULL",
        )
        .bind(&topic)
        .fetch_one(&db.pool)
        .await
        .unwrap();
        assert!(reason.contains("cannot be read"), "{reason}");
        assert_eq!(receive_all(&consumer, 3).await.len(), 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn undecodable_row_is_dead_lettered() {
        let db = Sqlite::open().await;
        let topic = unique_topic("garbage");
        let (bus, consumer) = broker(&topic).await;
        db.stage(&topic, &events(1, 1, "before"), true)
            .await
            .unwrap();
        sqlx::query("INSERT INTO cloudbus_outbox (topic, ordering_key, event, created_at, available_at) VALUES (?1, 'key-0', 'not json', 0, 0)")
            .bind(&topic)
            .execute(&db.pool)
            .await
            .unwrap();
        db.stage(&topic, &events(2, 1, "after"), true)
            .await
            .unwrap();
        super::expect_dead_lettered_garbage(db.outbox(&topic), &bus, &topic, &consumer).await;
    }
}

/// A staged row that is not a CloudEvent (written by hand): the relay dead-letters it
/// with the reason and publishes the three real events around it.
async fn expect_dead_lettered_garbage(
    storage: Arc<dyn OutboxStorage>,
    bus: &Bus,
    topic: &str,
    consumer: &Consumer,
) {
    let relay = OutboxRelay::new(storage, bus.publisher(topic).await.unwrap());
    let report = relay.drain().await.unwrap();
    assert_eq!(
        (report.published, report.dead_lettered),
        (3, 1),
        "{report:?}"
    );
    let backlog = relay.backlog().await.unwrap();
    assert_eq!((backlog.pending, backlog.dead_lettered), (0, 1));
    assert_eq!(receive_all(consumer, 3).await.len(), 3);
}
