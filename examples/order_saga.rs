//! The order saga, choreographed over one topic with filtered subscriptions.
//!
//! Order publishes OrderCreated; Payment charges (some cards are declined:
//! PaymentFailed, and Order compensates with OrderCancelled); Inventory reserves
//! stock (StockReserved); Order confirms (OrderConfirmed). Email and Analytics read
//! the same events through their own filtered subscriptions (fan-out). One duplicate
//! OrderCreated shows the idempotent consumer; one poison order ends in Payment's
//! dead-letter queue, is shown, and is redriven once Payment learns to handle it.
//!
//! The Order service writes each order row and its OrderCreated event in one database
//! transaction through the transactional outbox (a SQLite file; PostgreSQL when
//! `DATABASE_URL` is set and the example is built with the `postgres` feature); relays
//! publish what the commits staged. Payment deduplicates through a durable store in the
//! same database, so a redelivery after a restart would still be skipped.
//!
//! On a bus without fan-out (SQS queues), each service reads its own queue
//! (`saga-payment`, ...) and the services send each event to every queue whose filter it
//! matches: the same choreography, routed on the publishing side (the Order service
//! stages one outbox row per destination queue).
//!
//! Run: `cargo run --features sqlite --example order_saga` (memory broker), or point
//! `CLOUDBUS_URL` at a cloud once its provider is enabled (`sqs://`, `sns://`,
//! `pubsub://PROJECT`, ...).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cloudbus::store::outbox::{OutboxRelay, OutboxStorage};
use cloudbus::store::sqlite::{SqliteDedupStore, SqliteOutbox};
use cloudbus::store::sqlx;
use cloudbus::{
    AttributesReader, Bus, DedupStore, Event, EventBuilder, EventExt, Filter, HandlerContext,
    HandlerError, Idempotent, PublishOptions, Publisher, RetryPolicy, SubscriptionSpec,
    WorkerOptions,
};
use futures::future::try_join_all;
use serde::{Deserialize, Serialize};

const TOPIC: &str = "saga";
const SOURCE_ORDERS: &str = "/services/order";
const SOURCE_PAYMENT: &str = "/services/payment";
const SOURCE_INVENTORY: &str = "/services/inventory";
const ORDERS: u32 = 8;

fn ty(name: &str) -> String {
    format!("com.example.saga.{name}")
}

#[derive(Serialize, Deserialize, Clone, Debug)]
struct Order {
    order_id: String,
    customer: String,
    amount_cents: u64,
    currency: String,
}

/// Prints one line of the timeline.
#[derive(Clone)]
struct Timeline {
    start: Instant,
}

impl Timeline {
    fn log(&self, service: &str, line: impl std::fmt::Display) {
        println!(
            "[{:>6.1} ms] {service:<9} {line}",
            self.start.elapsed().as_secs_f64() * 1e3
        );
    }
}

fn order_of(e: &Event) -> Result<Order, HandlerError> {
    e.data_json::<Order>()
        .map_err(|err| HandlerError::reject(format!("unreadable order: {err}")))
}

fn follow_up(
    parent: &Event,
    name: &str,
    source: &str,
    order: &Order,
) -> Result<Event, HandlerError> {
    EventBuilder::new(ty(name), source)
        .subject(order.order_id.clone())
        .partition_key(order.order_id.clone())
        .caused_by(parent)
        .json(order)?
        .build()
        .map_err(HandlerError::from)
}

#[derive(Default)]
struct Outcomes {
    confirmed: AtomicU64,
    cancelled: AtomicU64,
    per_type: Mutex<BTreeMap<String, u64>>,
    emails: AtomicU64,
}

#[tokio::main]
async fn main() -> cloudbus::Result<()> {
    let bus = cloudbus::connect_from_env("mem://order-saga").await?;
    let timeline = Timeline {
        start: Instant::now(),
    };
    let routes = Routes::declare(&bus).await?;
    println!(
        "cloudbus order saga on {}:// ({})",
        bus.scheme(),
        if routes.fan_out {
            "one topic, filtered subscriptions"
        } else {
            "one queue per service, routed by the outbox"
        }
    );
    let publisher = routes.destinations(&bus).await?;
    let orders_db = OrderDb::open().await?;
    println!("order database: {}", orders_db.describe());
    let outcomes = Arc::new(Outcomes::default());
    let legacy_currency_supported = Arc::new(AtomicBool::new(false));
    let fast_retry = WorkerOptions::default().concurrency(8).retry(
        RetryPolicy::default()
            .max_attempts(3)
            .initial_backoff(Duration::from_millis(20)),
    );

    // Payment: charges each order once (idempotent), declines some cards.
    let payment = {
        let (p, t, legacy) = (
            publisher.clone(),
            timeline.clone(),
            legacy_currency_supported.clone(),
        );
        Idempotent::new(
            move |e: Arc<Event>, _c: HandlerContext| {
                let (p, t, legacy) = (p.clone(), t.clone(), legacy.clone());
                async move {
                    let order = order_of(&e)?;
                    if order.currency != "EUR" && !legacy.load(Ordering::SeqCst) {
                        t.log(
                            "payment",
                            format!(
                                "{} REJECTED: currency {} unsupported",
                                order.order_id, order.currency
                            ),
                        );
                        return Err(HandlerError::reject(format!(
                            "unsupported currency {}",
                            order.currency
                        )));
                    }
                    let declined = order.amount_cents > 50_000;
                    let next = if declined {
                        "PaymentFailed"
                    } else {
                        "PaymentSucceeded"
                    };
                    t.log(
                        "payment",
                        format!("{} {} cents -> {next}", order.order_id, order.amount_cents),
                    );
                    p.publish(follow_up(&e, next, SOURCE_PAYMENT, &order)?)
                        .await?;
                    Ok(())
                }
            },
            orders_db.dedup_store(),
        )
    };
    let duplicates = payment.duplicates();
    let payment_worker = routes
        .consumer(&bus, "payment")
        .await?
        .start_worker(payment, fast_retry.clone());

    // Inventory: reserves stock for paid orders.
    let inventory_worker = {
        let (p, t) = (publisher.clone(), timeline.clone());
        routes.consumer(&bus, "inventory").await?.start_worker(
            move |e: Arc<Event>, _c: HandlerContext| {
                let (p, t) = (p.clone(), t.clone());
                async move {
                    let order = order_of(&e)?;
                    t.log("inventory", format!("{} stock reserved", order.order_id));
                    p.publish(follow_up(&e, "StockReserved", SOURCE_INVENTORY, &order)?)
                        .await?;
                    Ok(())
                }
            },
            fast_retry.clone(),
        )
    };

    // Order: confirms reserved orders, compensates failed payments.
    let order_worker = {
        let (p, t, o) = (publisher.clone(), timeline.clone(), outcomes.clone());
        routes.consumer(&bus, "order").await?.start_worker(
            move |e: Arc<Event>, _c: HandlerContext| {
                let (p, t, o) = (p.clone(), t.clone(), o.clone());
                async move {
                    let order = order_of(&e)?;
                    let (next, counter) = if e.ty() == ty("StockReserved") {
                        ("OrderConfirmed", &o.confirmed)
                    } else {
                        ("OrderCancelled", &o.cancelled)
                    };
                    p.publish(follow_up(&e, next, SOURCE_ORDERS, &order)?)
                        .await?;
                    counter.fetch_add(1, Ordering::SeqCst);
                    t.log("order", format!("{} -> {next}", order.order_id));
                    Ok(())
                }
            },
            fast_retry.clone(),
        )
    };

    // Email: told about final outcomes only.
    let email_worker = {
        let (t, o) = (timeline.clone(), outcomes.clone());
        routes.consumer(&bus, "email").await?.start_worker(
            move |e: Arc<Event>, _c: HandlerContext| {
                let (t, o) = (t.clone(), o.clone());
                async move {
                    let order = order_of(&e)?;
                    o.emails.fetch_add(1, Ordering::SeqCst);
                    let what = if e.ty() == ty("OrderConfirmed") {
                        "confirmed"
                    } else {
                        "cancelled"
                    };
                    t.log(
                        "email",
                        format!(
                            "to {}: your order {} is {what}",
                            order.customer, order.order_id
                        ),
                    );
                    Ok(())
                }
            },
            fast_retry.clone(),
        )
    };

    // Analytics: counts every event of the saga.
    let analytics_worker = {
        let o = outcomes.clone();
        routes.consumer(&bus, "analytics").await?.start_worker(
            move |e: Arc<Event>, _c: HandlerContext| {
                let o = o.clone();
                async move {
                    if let Ok(mut m) = o.per_type.lock() {
                        *m.entry(e.ty().trim_start_matches("com.example.saga.").to_owned())
                            .or_default() += 1;
                    }
                    Ok::<(), HandlerError>(())
                }
            },
            fast_retry.clone(),
        )
    };

    // The outbox relays: one per destination of OrderCreated (the topic, or each
    // queue whose filter it matches).
    let probe = EventBuilder::new(ty("OrderCreated"), SOURCE_ORDERS).build()?;
    let stop_relays = Arc::new(tokio::sync::Notify::new());
    let mut relays = Vec::new();
    for (topic, p) in publisher.targets(&probe) {
        let relay = Arc::new(OutboxRelay::new(orders_db.outbox(&topic), p));
        let task = {
            let (relay, stop) = (relay.clone(), stop_relays.clone());
            tokio::spawn(async move { relay.run(stop.notified()).await })
        };
        relays.push((topic, relay, task));
    }

    // The Order service takes orders: the order row and its event in one transaction.
    let mut first_order = None;
    let mut staged = 0;
    for i in 1..=ORDERS {
        let order = Order {
            order_id: format!("order-{i}"),
            customer: format!("customer-{}", i % 3),
            amount_cents: if i % 4 == 0 {
                90_000
            } else {
                1_000 * u64::from(i)
            },
            // The poison order: a currency Payment does not handle yet.
            currency: if i == 5 { "XTS".into() } else { "EUR".into() },
        };
        let event = EventBuilder::new(ty("OrderCreated"), SOURCE_ORDERS)
            .subject(order.order_id.clone())
            .partition_key(order.order_id.clone())
            .json(&order)?
            .build()?;
        timeline.log(
            "order",
            format!(
                "{} created ({} cents {})",
                order.order_id, order.amount_cents, order.currency
            ),
        );
        staged += orders_db
            .place_order(&order, &event, &publisher.targets(&event))
            .await?;
        first_order.get_or_insert(event);
    }
    // At-least-once delivery means duplicates happen: send one on purpose.
    if let Some(dup) = first_order {
        timeline.log(
            "order",
            format!(
                "{} staged AGAIN (same id: a duplicate)",
                dup.subject().unwrap_or("?")
            ),
        );
        staged += orders_db
            .stage_again(&dup, &publisher.targets(&dup))
            .await?;
    }

    // Wait for every order but the poison one to finish.
    wait_for(&outcomes, ORDERS - 1, Duration::from_secs(10)).await;
    let dlq = routes.dead_letters(&bus, "payment").await?;
    // The poison order's dead letter lands when Payment's worker settles it, which may
    // be after the other orders finished: wait for it (peeking first could find none,
    // redrive nothing and leave that order unfinished).
    let until = Instant::now() + Duration::from_secs(10);
    let mut letters = dlq.peek(10).await?;
    while letters.is_empty() && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
        letters = dlq.peek(10).await?;
    }
    println!(
        "\n--- payment dead-letter queue: {} message(s)",
        letters.len()
    );
    for l in &letters {
        println!(
            "    {} | reason: {} | attempts: {}",
            cloudbus::describe_payload(&l.payload),
            l.reason.as_deref().unwrap_or("-"),
            l.attempts
        );
    }
    println!("--- deploying Payment with XTS support, then redriving\n");
    legacy_currency_supported.store(true, Ordering::SeqCst);
    let redriven = dlq.redrive_all().await?;
    wait_for(&outcomes, ORDERS, Duration::from_secs(10)).await;
    // Let email and analytics see the last events.
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Every worker finishes its in-flight work; their dead-letter counts add up.
    let mut dead_lettered = 0;
    for w in [
        payment_worker,
        inventory_worker,
        order_worker,
        email_worker,
        analytics_worker,
    ] {
        let report = w.shutdown(Duration::from_secs(5)).await;
        dead_lettered += report.dead_lettered;
    }
    stop_relays.notify_waiters();
    let mut outbox_lines = Vec::new();
    let mut relayed = 0;
    for (topic, relay, task) in relays {
        match task.await {
            Ok(result) => result?,
            Err(e) => {
                return Err(cloudbus::Error::new(
                    cloudbus::ErrorKind::Internal,
                    format!("outbox relay of {topic}: {e}"),
                ));
            }
        }
        let published = relay.published().load(Ordering::SeqCst);
        relayed += published;
        let backlog = relay.backlog().await?;
        outbox_lines.push(format!(
            "  {topic:<18} published {published}, pending {}, dead-lettered {}",
            backlog.pending, backlog.dead_lettered
        ));
    }
    publisher.close().await?;
    let order_rows = orders_db.order_rows().await?;
    orders_db.close().await;

    println!("\n=== summary");
    println!("orders:          {ORDERS}");
    println!(
        "confirmed:       {}",
        outcomes.confirmed.load(Ordering::SeqCst)
    );
    println!(
        "cancelled:       {}",
        outcomes.cancelled.load(Ordering::SeqCst)
    );
    println!(
        "emails sent:     {}",
        outcomes.emails.load(Ordering::SeqCst)
    );
    println!(
        "duplicates skipped by payment: {}",
        duplicates.load(Ordering::SeqCst)
    );
    println!("outbox staged:   {staged} (order rows committed with them: {order_rows})");
    println!("outbox relayed:  {relayed}");
    for line in &outbox_lines {
        println!("{line}");
    }
    println!("dead-lettered:   {dead_lettered}");
    println!("redriven:        {redriven}");
    println!("events per type:");
    if let Ok(m) = outcomes.per_type.lock() {
        for (t, n) in m.iter() {
            println!("  {t:<18} {n}");
        }
    }
    let done =
        outcomes.confirmed.load(Ordering::SeqCst) + outcomes.cancelled.load(Ordering::SeqCst);
    if done != u64::from(ORDERS) {
        return Err(cloudbus::Error::new(
            cloudbus::ErrorKind::Timeout,
            format!("only {done} of {ORDERS} orders finished"),
        ));
    }
    Ok(())
}

/// The subscriptions of the saga's services: each reads the events its filter matches.
fn subscriptions() -> [(&'static str, Filter); 5] {
    [
        ("payment", Filter::eq("type", ty("OrderCreated"))),
        ("inventory", Filter::eq("type", ty("PaymentSucceeded"))),
        (
            "order",
            Filter::one_of("type", [ty("StockReserved"), ty("PaymentFailed")]),
        ),
        (
            "email",
            Filter::one_of("type", [ty("OrderConfirmed"), ty("OrderCancelled")]),
        ),
        ("analytics", Filter::prefix("type", "com.example.saga.")),
    ]
}

/// Where each service reads: one topic with filtered subscriptions when the bus fans
/// out, else one queue per service.
struct Routes {
    fan_out: bool,
}

impl Routes {
    /// Asks the bus whether it fans out, then declares the topics and subscriptions.
    async fn declare(bus: &Bus) -> cloudbus::Result<Routes> {
        let fan_out = bus.publisher(TOPIC).await?.capabilities().fan_out;
        let routes = Routes { fan_out };
        if fan_out {
            bus.ensure_topic(TOPIC).await?;
        }
        for (name, filter) in subscriptions() {
            let topic = routes.topic_of(name);
            let mut spec = SubscriptionSpec::new(&topic, routes.subscription_of(name))
                .max_delivery_attempts(5);
            if fan_out {
                spec = spec.filter(filter);
            } else {
                bus.ensure_topic(&topic).await?;
            }
            bus.ensure_subscription(&spec).await?;
        }
        Ok(routes)
    }

    fn topic_of(&self, service: &str) -> String {
        if self.fan_out {
            TOPIC.to_owned()
        } else {
            format!("{TOPIC}-{service}")
        }
    }

    fn subscription_of(&self, service: &str) -> String {
        if self.fan_out {
            service.to_owned()
        } else {
            self.topic_of(service)
        }
    }

    async fn consumer(&self, bus: &Bus, service: &str) -> cloudbus::Result<cloudbus::Consumer> {
        bus.consumer(&self.topic_of(service), &self.subscription_of(service))
            .await
    }

    async fn dead_letters(
        &self,
        bus: &Bus,
        service: &str,
    ) -> cloudbus::Result<cloudbus::DeadLetters> {
        bus.dead_letters(&self.topic_of(service), &self.subscription_of(service))
            .await
    }

    /// Where the services' events go: the topic, or every queue whose filter an event
    /// matches.
    async fn destinations(&self, bus: &Bus) -> cloudbus::Result<Destinations> {
        if self.fan_out {
            return Ok(Destinations::Topic(bus.publisher(TOPIC).await?));
        }
        let mut queues = Vec::new();
        for (name, filter) in subscriptions() {
            let topic = self.topic_of(name);
            let publisher = bus.publisher(&topic).await?;
            queues.push((topic, filter, publisher));
        }
        Ok(Destinations::Queues(Arc::new(queues)))
    }
}

/// Sends the saga's events where the services read them: client-side routing for
/// buses without fan-out (not an outbox: that is [`OrderDb`]).
#[derive(Clone)]
enum Destinations {
    Topic(Publisher),
    /// Each queue's name, its service's filter and a publisher to it.
    Queues(Arc<Vec<(String, Filter, Publisher)>>),
}

impl Destinations {
    /// The topics (and their publishers) `e` goes to.
    fn targets(&self, e: &Event) -> Vec<(String, Publisher)> {
        match self {
            Destinations::Topic(p) => vec![(TOPIC.to_owned(), p.clone())],
            Destinations::Queues(queues) => queues
                .iter()
                .filter(|(_, filter, _)| filter.matches(e))
                .map(|(topic, _, p)| (topic.clone(), p.clone()))
                .collect(),
        }
    }

    async fn publish(&self, e: Event) -> cloudbus::Result<()> {
        try_join_all(self.targets(&e).into_iter().map(|(_, p)| {
            let e = e.clone();
            async move { p.publish(e).await }
        }))
        .await?;
        Ok(())
    }

    async fn close(&self) -> cloudbus::Result<()> {
        match self {
            Destinations::Topic(p) => p.close().await,
            Destinations::Queues(queues) => {
                try_join_all(queues.iter().map(|(_, _, p)| p.close())).await?;
                Ok(())
            }
        }
    }
}

/// The Order service's own database: its orders table, its transactional outbox and
/// Payment's dedup store. A SQLite file in the temp dir by default; PostgreSQL when
/// `DATABASE_URL` is set and the example is built with `--features postgres`.
struct OrderDb {
    /// This run's mark on its order rows (a PostgreSQL database outlives runs).
    run: String,
    storage: Storage,
}

enum Storage {
    Sqlite {
        pool: sqlx::SqlitePool,
        path: std::path::PathBuf,
    },
    #[cfg(feature = "postgres")]
    Postgres(sqlx::PgPool),
}

fn db_error(what: &str, e: sqlx::Error) -> cloudbus::Error {
    cloudbus::Error::new(cloudbus::ErrorKind::Unavailable, format!("{what}: {e}"))
}

impl OrderDb {
    async fn open() -> cloudbus::Result<OrderDb> {
        let run = format!(
            "{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        Ok(OrderDb {
            run,
            storage: Self::open_storage().await?,
        })
    }

    async fn open_storage() -> cloudbus::Result<Storage> {
        #[cfg(feature = "postgres")]
        if let Ok(url) = std::env::var("DATABASE_URL") {
            let pool = sqlx::PgPool::connect(&url)
                .await
                .map_err(|e| db_error("connect to DATABASE_URL", e))?;
            cloudbus::store::postgres::migrate(&pool).await?;
            sqlx::query(
                "CREATE TABLE IF NOT EXISTS saga_orders (
                     run TEXT, order_id TEXT, customer TEXT, amount_cents BIGINT, currency TEXT)",
            )
            .execute(&pool)
            .await
            .map_err(|e| db_error("create saga_orders", e))?;
            return Ok(Storage::Postgres(pool));
        }
        let path =
            std::env::temp_dir().join(format!("cloudbus-order-saga-{}.db", std::process::id()));
        let options = sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&path)
            .create_if_missing(true)
            .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
            .busy_timeout(Duration::from_secs(10));
        let pool = sqlx::SqlitePool::connect_with(options)
            .await
            .map_err(|e| db_error("open the SQLite file", e))?;
        cloudbus::store::sqlite::migrate(&pool).await?;
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS saga_orders (
                 run TEXT, order_id TEXT, customer TEXT, amount_cents INTEGER, currency TEXT)",
        )
        .execute(&pool)
        .await
        .map_err(|e| db_error("create saga_orders", e))?;
        Ok(Storage::Sqlite { pool, path })
    }

    fn describe(&self) -> String {
        match &self.storage {
            Storage::Sqlite { path, .. } => format!("SQLite {}", path.display()),
            #[cfg(feature = "postgres")]
            Storage::Postgres(_) => "PostgreSQL at DATABASE_URL".into(),
        }
    }

    /// The outbox of `topic`.
    fn outbox(&self, topic: &str) -> Arc<dyn OutboxStorage> {
        match &self.storage {
            Storage::Sqlite { pool, .. } => Arc::new(SqliteOutbox::new(pool.clone(), topic)),
            #[cfg(feature = "postgres")]
            Storage::Postgres(pool) => Arc::new(cloudbus::store::postgres::PostgresOutbox::new(
                pool.clone(),
                topic,
            )),
        }
    }

    fn dedup_store(&self) -> Arc<dyn DedupStore> {
        match &self.storage {
            Storage::Sqlite { pool, .. } => Arc::new(SqliteDedupStore::new(pool.clone())),
            #[cfg(feature = "postgres")]
            Storage::Postgres(pool) => Arc::new(
                cloudbus::store::postgres::PostgresDedupStore::new(pool.clone()),
            ),
        }
    }

    /// Writes the order row and stages its event for every target topic, in one
    /// transaction. Returns the rows staged.
    async fn place_order(
        &self,
        order: &Order,
        event: &Event,
        targets: &[(String, Publisher)],
    ) -> cloudbus::Result<usize> {
        self.write(Some(order), event, targets).await
    }

    /// Stages `event` once more (a duplicate, as at-least-once delivery makes them).
    async fn stage_again(
        &self,
        event: &Event,
        targets: &[(String, Publisher)],
    ) -> cloudbus::Result<usize> {
        self.write(None, event, targets).await
    }

    async fn write(
        &self,
        order: Option<&Order>,
        event: &Event,
        targets: &[(String, Publisher)],
    ) -> cloudbus::Result<usize> {
        match &self.storage {
            Storage::Sqlite { pool, .. } => {
                let mut tx = pool.begin().await.map_err(|e| db_error("begin", e))?;
                if let Some(o) = order {
                    sqlx::query("INSERT INTO saga_orders VALUES (?1, ?2, ?3, ?4, ?5)")
                        .bind(&self.run)
                        .bind(&o.order_id)
                        .bind(&o.customer)
                        .bind(o.amount_cents as i64)
                        .bind(&o.currency)
                        .execute(&mut *tx)
                        .await
                        .map_err(|e| db_error("insert the order", e))?;
                }
                for (topic, _) in targets {
                    SqliteOutbox::new(pool.clone(), topic)
                        .stage(&mut tx, event, PublishOptions::default())
                        .await?;
                }
                tx.commit().await.map_err(|e| db_error("commit", e))?;
            }
            #[cfg(feature = "postgres")]
            Storage::Postgres(pool) => {
                let mut tx = pool.begin().await.map_err(|e| db_error("begin", e))?;
                if let Some(o) = order {
                    sqlx::query("INSERT INTO saga_orders VALUES ($1, $2, $3, $4, $5)")
                        .bind(&self.run)
                        .bind(&o.order_id)
                        .bind(&o.customer)
                        .bind(o.amount_cents as i64)
                        .bind(&o.currency)
                        .execute(&mut *tx)
                        .await
                        .map_err(|e| db_error("insert the order", e))?;
                }
                for (topic, _) in targets {
                    cloudbus::store::postgres::PostgresOutbox::new(pool.clone(), topic)
                        .stage(&mut tx, event, PublishOptions::default())
                        .await?;
                }
                tx.commit().await.map_err(|e| db_error("commit", e))?;
            }
        }
        Ok(targets.len())
    }

    async fn order_rows(&self) -> cloudbus::Result<i64> {
        match &self.storage {
            Storage::Sqlite { pool, .. } => {
                sqlx::query_scalar("SELECT count(*) FROM saga_orders WHERE run = ?1")
                    .bind(&self.run)
                    .fetch_one(pool)
                    .await
                    .map_err(|e| db_error("count orders", e))
            }
            #[cfg(feature = "postgres")]
            Storage::Postgres(pool) => {
                sqlx::query_scalar("SELECT count(*) FROM saga_orders WHERE run = $1")
                    .bind(&self.run)
                    .fetch_one(pool)
                    .await
                    .map_err(|e| db_error("count orders", e))
            }
        }
    }

    async fn close(&self) {
        match &self.storage {
            Storage::Sqlite { pool, path } => {
                pool.close().await;
                for suffix in ["", "-wal", "-shm"] {
                    let mut file = path.clone().into_os_string();
                    file.push(suffix);
                    let _ = std::fs::remove_file(file);
                }
            }
            #[cfg(feature = "postgres")]
            Storage::Postgres(pool) => pool.close().await,
        }
    }
}

async fn wait_for(outcomes: &Outcomes, finished: u32, patience: Duration) {
    let until = Instant::now() + patience;
    while outcomes.confirmed.load(Ordering::SeqCst) + outcomes.cancelled.load(Ordering::SeqCst)
        < u64::from(finished)
        && Instant::now() < until
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
