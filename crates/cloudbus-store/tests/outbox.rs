//! The transactional outbox on PostgreSQL (DATABASE_URL; scripts/postgres.sh starts
//! one) and SQLite (a temp file), relayed to the memory broker: commit and rollback,
//! order per key, parallel relays without double claims, a relay that dies between
//! the broker's confirmation and its mark, the database and the broker being away,
//! notifications, retention and the metrics. A missing PostgreSQL makes its tests
//! print SKIPPED, or fail under CI=true.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cloudbus_core::conformance::emulator::required_env;
use cloudbus_core::{
    AttributesReader, Bus, Consumer, Error, ErrorKind, Event, EventBuilder, EventExt,
    PublishOptions, Result, SubscriptionSpec,
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
    for e in &got {
        match dedup.claim(e.id(), Duration::from_secs(60)).await.unwrap() {
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
