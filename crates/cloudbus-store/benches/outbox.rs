//! The transactional outbox's cost, on SQLite (a temp file, WAL) and PostgreSQL
//! (DATABASE_URL; scripts/postgres.sh starts one), against the baselines measured in
//! the same run:
//!
//! - `*_bare_insert`: the business write alone, one transaction per order (what a
//!   service does without an outbox), against `*_stage`: the same write plus staging
//!   its event in the same transaction.
//! - `direct_publish`: publishing the events straight to the memory broker in batches
//!   of 100 (what a service does without an outbox, losing events when it crashes
//!   between its commit and its publish), against `*_relay`: one relay draining the
//!   staged events to the same broker (claim, publish, mark sent).
//! - `*_stage_and_relay`: one writer staging while a relay runs, until the last event
//!   is published: the end-to-end rate of a service with an outbox.
//!
//! Prints `scenario=NAME events=N secs=S events_per_sec=R peak_rss_mb=M` per scenario
//! (the median of 3 rounds) and the ratios. Run: `cargo bench -p cloudbus-store
//! --features postgres,sqlite --bench outbox`
//! (BENCH_EVENTS=N, default 10,000).

// The bench report helpers the facade's throughput bench uses too.
#[path = "../../../benches/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use cloudbus_core::{Event, EventBuilder, PublishOptions, Publisher, SubscriptionSpec};
use cloudbus_memory::MemoryBroker;
use cloudbus_store::outbox::{OutboxRelay, OutboxStorage, RelayOptions};
use cloudbus_store::sqlx;
use cloudbus_store::{postgres, sqlite};
use support::{print_medians, report};

fn make_events(n: usize, tag: &str) -> Vec<Event> {
    (0..n)
        .map(|i| {
            EventBuilder::new("com.example.order.created", "/bench/orders")
                .id(format!("{tag}-{i}"))
                .subject(format!("order-{i}"))
                .partition_key(format!("customer-{}", i % 64))
                .json(&serde_json::json!({"order_id": i, "customer": format!("customer-{}", i % 64), "amount_cents": 1999}))
                .expect("JSON")
                .build()
                .expect("event")
        })
        .collect()
}

/// A broker with topic `orders` and a subscription that nobody reads (the broker keeps
/// the events; the bench measures the publishing side).
async fn broker() -> Publisher {
    let bus = MemoryBroker::new().bus();
    bus.ensure_topic("orders").await.expect("topic");
    bus.ensure_subscription(&SubscriptionSpec::new("orders", "sink"))
        .await
        .expect("subscription");
    bus.publisher("orders").await.expect("publisher")
}

/// One database under test.
enum Db {
    Sqlite(sqlx::SqlitePool, std::path::PathBuf),
    Postgres(sqlx::PgPool),
}

impl Db {
    fn name(&self) -> &'static str {
        match self {
            Db::Sqlite(..) => "sqlite",
            Db::Postgres(_) => "postgres",
        }
    }

    async fn sqlite() -> Db {
        let path =
            std::env::temp_dir().join(format!("cloudbus-outbox-bench-{}.db", std::process::id()));
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
            .synchronous(sqlx::sqlite::SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(30));
        let pool = sqlx::sqlite::SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await
            .expect("SQLite");
        sqlite::migrate(&pool).await.expect("migrate");
        sqlx::query("CREATE TABLE IF NOT EXISTS bench_orders (id TEXT, customer TEXT, amount_cents INTEGER)")
            .execute(&pool)
            .await
            .expect("table");
        Db::Sqlite(pool, path)
    }

    async fn postgres() -> Option<Db> {
        let url = std::env::var("DATABASE_URL")
            .ok()
            .filter(|u| !u.is_empty())?;
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(8)
            .connect(&url)
            .await
            .expect("PostgreSQL at DATABASE_URL");
        postgres::migrate(&pool).await.expect("migrate");
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS bench_orders (id TEXT, customer TEXT, amount_cents BIGINT)",
        )
        .execute(&pool)
        .await
        .expect("table");
        Some(Db::Postgres(pool))
    }

    fn outbox(&self, topic: &str) -> Arc<dyn OutboxStorage> {
        match self {
            Db::Sqlite(pool, _) => Arc::new(sqlite::SqliteOutbox::new(pool.clone(), topic)),
            Db::Postgres(pool) => Arc::new(postgres::PostgresOutbox::new(pool.clone(), topic)),
        }
    }

    /// One order: its row, and its event staged when `stage` names the outbox topic;
    /// one transaction.
    async fn write(&self, event: &Event, stage: Option<&str>) {
        match self {
            Db::Sqlite(pool, _) => {
                let mut tx = pool.begin().await.expect("begin");
                sqlx::query("INSERT INTO bench_orders VALUES (?1, ?2, ?3)")
                    .bind(event.subject_or_id())
                    .bind("customer")
                    .bind(1999i64)
                    .execute(&mut *tx)
                    .await
                    .expect("insert");
                if let Some(topic) = stage {
                    sqlite::SqliteOutbox::new(pool.clone(), topic)
                        .stage(&mut tx, event, PublishOptions::default())
                        .await
                        .expect("stage");
                }
                tx.commit().await.expect("commit");
            }
            Db::Postgres(pool) => {
                let mut tx = pool.begin().await.expect("begin");
                sqlx::query("INSERT INTO bench_orders VALUES ($1, $2, $3)")
                    .bind(event.subject_or_id())
                    .bind("customer")
                    .bind(1999i64)
                    .execute(&mut *tx)
                    .await
                    .expect("insert");
                if let Some(topic) = stage {
                    postgres::PostgresOutbox::new(pool.clone(), topic)
                        .stage(&mut tx, event, PublishOptions::default())
                        .await
                        .expect("stage");
                }
                tx.commit().await.expect("commit");
            }
        }
    }

    async fn close(self) {
        match self {
            Db::Sqlite(pool, path) => {
                pool.close().await;
                for suffix in ["", "-wal", "-shm"] {
                    let mut file = path.clone().into_os_string();
                    file.push(suffix);
                    let _ = std::fs::remove_file(file);
                }
            }
            Db::Postgres(pool) => pool.close().await,
        }
    }
}

trait SubjectOrId {
    fn subject_or_id(&self) -> String;
}

impl SubjectOrId for Event {
    fn subject_or_id(&self) -> String {
        use cloudbus_core::AttributesReader;
        self.subject().unwrap_or(self.id()).to_owned()
    }
}

async fn round(db: &Db, n: usize, round: usize) {
    let name = db.name();
    // The business write alone.
    let events = make_events(n, &format!("bare-{round}"));
    let start = Instant::now();
    for e in &events {
        db.write(e, None).await;
    }
    report(
        &format!("{name}_bare_insert"),
        n,
        start.elapsed().as_secs_f64(),
    );

    // The write with its event staged.
    let topic = format!(
        "orders-{}-{round}-{}",
        std::process::id(),
        fastrand::u32(..)
    );
    let events = make_events(n, &format!("staged-{round}"));
    let start = Instant::now();
    for e in &events {
        db.write(e, Some(&topic)).await;
    }
    report(&format!("{name}_stage"), n, start.elapsed().as_secs_f64());

    // One relay drains them.
    let relay = OutboxRelay::new(db.outbox(&topic), broker().await);
    let start = Instant::now();
    let drained = relay.drain().await.expect("drain");
    assert_eq!(drained.published, n, "{drained:?}");
    report(&format!("{name}_relay"), n, start.elapsed().as_secs_f64());

    // A writer staging while a relay runs, to the last event published.
    let topic = format!("{topic}-live");
    let relay = Arc::new(OutboxRelay::new(db.outbox(&topic), broker().await).options(
        RelayOptions {
            poll_interval: Duration::from_millis(5),
            ..RelayOptions::default()
        },
    ));
    let stop = Arc::new(tokio::sync::Notify::new());
    let task = {
        let (relay, stop) = (relay.clone(), stop.clone());
        tokio::spawn(async move { relay.run(stop.notified()).await })
    };
    let events = make_events(n, &format!("live-{round}"));
    let start = Instant::now();
    for e in &events {
        db.write(e, Some(&topic)).await;
    }
    let published = relay.published();
    while published.load(std::sync::atomic::Ordering::Relaxed) < n as u64 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    report(
        &format!("{name}_stage_and_relay"),
        n,
        start.elapsed().as_secs_f64(),
    );
    stop.notify_waiters();
    let _ = task.await;
}

/// Publishing the same events straight to the broker, in batches of 100.
async fn direct_publish(n: usize, round: usize) {
    let publisher = broker().await;
    let events = make_events(n, &format!("direct-{round}"));
    let start = Instant::now();
    for chunk in events.chunks(100) {
        for r in publisher.publish_batch(chunk.to_vec()).await {
            r.expect("publish");
        }
    }
    report("direct_publish", n, start.elapsed().as_secs_f64());
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let benchmarking = std::env::args().any(|a| a == "--bench");
    let n: usize = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if benchmarking { 10_000 } else { 200 });
    let rounds = if benchmarking { 3 } else { 1 };
    println!("# {n} events per scenario, {rounds} rounds; each line is the median round");
    let mut dbs = vec![Db::sqlite().await];
    match Db::postgres().await {
        Some(db) => dbs.push(db),
        None => println!(
            "# SKIPPED PostgreSQL: DATABASE_URL is not set (eval \"$(bash scripts/postgres.sh)\")"
        ),
    }
    for r in 0..rounds {
        direct_publish(n, r).await;
        for db in &dbs {
            round(db, n, r).await;
        }
    }
    let rates = print_medians();
    let rate = |name: &str| rates.get(name).copied().unwrap_or(f64::NAN);
    for db in &dbs {
        let name = db.name();
        println!(
            "# {name}: stage {:.0}/s = {:.2} x the bare INSERT loop ({:.0}/s); relay {:.0}/s = {:.2} x publishing directly ({:.0}/s); stage and relay together {:.0}/s = {:.2} x the bare INSERT loop",
            rate(&format!("{name}_stage")),
            rate(&format!("{name}_stage")) / rate(&format!("{name}_bare_insert")),
            rate(&format!("{name}_bare_insert")),
            rate(&format!("{name}_relay")),
            rate(&format!("{name}_relay")) / rate("direct_publish"),
            rate("direct_publish"),
            rate(&format!("{name}_stage_and_relay")),
            rate(&format!("{name}_stage_and_relay")) / rate(&format!("{name}_bare_insert")),
        );
    }
    for db in dbs {
        db.close().await;
    }
}
