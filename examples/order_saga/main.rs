//! The order saga, choreographed over one topic with filtered subscriptions, on typed
//! events and routers.
//!
//! Order publishes OrderCreated; Payment charges (some cards are declined:
//! PaymentFailed, and Order compensates with OrderCancelled); Inventory reserves
//! stock (StockReserved); Order confirms (OrderConfirmed). Email and Analytics read
//! the same events through their own filtered subscriptions (fan-out). Each service is
//! a [`Router`] of plain async functions of the typed events.
//!
//! What goes wrong, on purpose: one duplicate OrderCreated (Payment's idempotency layer
//! skips it); one poison order in a currency Payment does not handle, dead-lettered,
//! shown, and redriven once Payment learns it; and an old checkout service that still
//! sends OrderCreated version 1: its events are upcast to version 2 on the way into
//! Payment, and the one whose data breaks the version 2 schema is dead-lettered with
//! the validation message (redriving it does not help: it comes back).
//!
//! The Order service writes each order row and its OrderCreated event in one database
//! transaction through the transactional outbox (a SQLite file; PostgreSQL when
//! `DATABASE_URL` is set and the example is built with the `postgres` feature); relays
//! publish what the commits staged, checking each event against its schema. Payment
//! deduplicates through a durable store in the same database.
//!
//! On a bus without fan-out (SQS queues), each service reads its own queue
//! (`saga-payment`, ...) and the services send each event to every queue whose filter it
//! matches: the same choreography, routed on the publishing side.
//!
//! Run: `cargo run --features sqlite --example order_saga` (memory broker), or point
//! `CLOUDBUS_URL` at a cloud once its provider is enabled (`sqs://`, `sns://`,
//! `pubsub://PROJECT`, ...).

mod events;
mod order_db;
mod report;
mod routes;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cloudbus::router::layers::{IdempotencyLayer, SchemaValidationLayer, TraceLayer};
use cloudbus::router::{RawEvent, State};
use cloudbus::schema::{DirectorySchemaRegistry, SchemaValidator};
use cloudbus::store::outbox::OutboxRelay;
use cloudbus::{
    AttributesReader, CloudEvent, Context, HandlerError, RetryPolicy, Router, WorkerOptions,
};

use events::{
    OrderCancelled, OrderConfirmed, OrderCreated, OrderCreatedV1, PaymentFailed, PaymentSucceeded,
    StockReserved, order_created_v1_to_v2,
};
use order_db::OrderDb;
use report::{Outcomes, Timeline, show_letters, wait_for, wait_for_letters};
use routes::{Destinations, Routes};

const ORDERS: u32 = 8;

/// What every handler of the saga shares (its router's state).
#[derive(Clone)]
struct Saga {
    out: Destinations,
    timeline: Timeline,
    outcomes: Arc<Outcomes>,
    xts_supported: Arc<AtomicBool>,
}

impl Saga {
    fn log(&self, service: &str, line: impl std::fmt::Display) {
        self.timeline.log(service, line);
    }
}

/// Payment: charges each order (once: the idempotency layer), declines big amounts.
async fn charge(
    order: OrderCreated,
    ctx: Context,
    State(saga): State<Saga>,
) -> Result<(), HandlerError> {
    let id = order.order_id.clone();
    if order.currency != "EUR" && !saga.xts_supported.load(Ordering::SeqCst) {
        saga.log(
            "payment",
            format!("{id} REJECTED: currency {} unsupported", order.currency),
        );
        return Err(HandlerError::reject(format!(
            "unsupported currency {}",
            order.currency
        )));
    }
    if order.amount_cents > 50_000 {
        saga.log(
            "payment",
            format!("{id} {} cents -> PaymentFailed", order.amount_cents),
        );
        let failed = PaymentFailed {
            order_id: id,
            customer: order.customer,
            reason: "card declined".into(),
        };
        saga.out.send(&ctx, &failed).await?;
    } else {
        saga.log(
            "payment",
            format!("{id} {} cents -> PaymentSucceeded", order.amount_cents),
        );
        let paid = PaymentSucceeded {
            order_id: id,
            customer: order.customer,
            amount_cents: order.amount_cents,
        };
        saga.out.send(&ctx, &paid).await?;
    }
    Ok(())
}

/// Inventory: reserves stock for paid orders.
async fn reserve(
    paid: PaymentSucceeded,
    ctx: Context,
    State(saga): State<Saga>,
) -> Result<(), HandlerError> {
    saga.log("inventory", format!("{} stock reserved", paid.order_id));
    let reserved = StockReserved {
        order_id: paid.order_id,
        customer: paid.customer,
    };
    Ok(saga.out.send(&ctx, &reserved).await?)
}

/// Order: confirms reserved orders...
async fn confirm(
    reserved: StockReserved,
    ctx: Context,
    State(saga): State<Saga>,
) -> Result<(), HandlerError> {
    let confirmed = OrderConfirmed {
        order_id: reserved.order_id,
        customer: reserved.customer,
    };
    saga.out.send(&ctx, &confirmed).await?;
    saga.outcomes.confirmed.fetch_add(1, Ordering::SeqCst);
    saga.log("order", format!("{} -> OrderConfirmed", confirmed.order_id));
    Ok(())
}

/// ...and compensates failed payments.
async fn compensate(
    failed: PaymentFailed,
    ctx: Context,
    State(saga): State<Saga>,
) -> Result<(), HandlerError> {
    let cancelled = OrderCancelled {
        order_id: failed.order_id,
        customer: failed.customer,
        reason: failed.reason,
    };
    saga.out.send(&ctx, &cancelled).await?;
    saga.outcomes.cancelled.fetch_add(1, Ordering::SeqCst);
    saga.log("order", format!("{} -> OrderCancelled", cancelled.order_id));
    Ok(())
}

/// Email: told about final outcomes only.
async fn email_confirmed(e: OrderConfirmed, State(saga): State<Saga>) -> Result<(), HandlerError> {
    saga.outcomes.emails.fetch_add(1, Ordering::SeqCst);
    saga.log(
        "email",
        format!("to {}: your order {} is confirmed", e.customer, e.order_id),
    );
    Ok(())
}

async fn email_cancelled(e: OrderCancelled, State(saga): State<Saga>) -> Result<(), HandlerError> {
    saga.outcomes.emails.fetch_add(1, Ordering::SeqCst);
    saga.log(
        "email",
        format!(
            "to {}: your order {} is cancelled ({})",
            e.customer, e.order_id, e.reason
        ),
    );
    Ok(())
}

/// Analytics: counts every event of the saga, whatever its type.
async fn count(RawEvent(e): RawEvent, State(saga): State<Saga>) -> Result<(), HandlerError> {
    if let Ok(mut m) = saga.outcomes.per_type.lock() {
        *m.entry(e.ty().trim_start_matches("com.example.saga.").to_owned())
            .or_default() += 1;
    }
    Ok(())
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
            "one queue per service, routed by the publisher"
        }
    );
    let out = routes.destinations(&bus).await?;
    let orders_db = OrderDb::open().await?;
    println!("order database: {}", orders_db.describe());
    let schemas = DirectorySchemaRegistry::open(schema_dir())?;
    let validator = Arc::new(SchemaValidator::preloaded(Arc::new(schemas)).await?);
    let saga = Saga {
        out: out.clone(),
        timeline: timeline.clone(),
        outcomes: Arc::default(),
        xts_supported: Arc::default(),
    };
    let workers = WorkerOptions::default().concurrency(8).retry(
        RetryPolicy::default()
            .max_attempts(3)
            .initial_backoff(Duration::from_millis(20)),
    );

    let idempotency = IdempotencyLayer::new(orders_db.dedup_store());
    let duplicates = idempotency.duplicates();
    let services = [
        (
            "payment",
            Router::new()
                .route(charge)
                .upcast(OrderCreated::TYPE, 1, order_created_v1_to_v2)
                .layer(SchemaValidationLayer::new(validator.clone()))
                .layer(idempotency)
                .layer(TraceLayer::new()),
        ),
        ("inventory", Router::new().route(reserve)),
        ("order", Router::new().route(confirm).route(compensate)),
        (
            "email",
            Router::new().route(email_confirmed).route(email_cancelled),
        ),
        (
            "analytics",
            Router::new().route_prefix("com.example.saga.", count),
        ),
    ];
    // Payment's dead-letter queue starts empty: an earlier run on the same emulator
    // (same queue names) may have left its invalid order there.
    let dlq = routes.dead_letters(&bus, "payment").await?;
    let leftover = dlq.purge().await?;
    if leftover > 0 {
        println!("payment dead-letter queue: {leftover} letter(s) of an earlier run purged");
    }
    let mut running = Vec::new();
    for (service, router) in services {
        let consumer = routes.consumer(&bus, service).await?;
        running.push(consumer.start_worker(router.state(saga.clone()), workers.clone())?);
    }

    // The outbox relays: one per destination of OrderCreated (the topic, or each
    // queue whose filter it matches), each event checked against its schema.
    let probe = OrderCreated {
        order_id: "order-0".into(),
        customer: String::new(),
        amount_cents: 1,
        currency: "EUR".into(),
    }
    .to_event()?;
    let stop_relays = Arc::new(tokio::sync::Notify::new());
    let mut relays = Vec::new();
    for (topic, p) in out.targets(&probe) {
        let relay = Arc::new(OutboxRelay::new(
            orders_db.outbox(&topic),
            p.validate_with(validator.clone()),
        ));
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
        let order = OrderCreated {
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
        let event = order.to_event()?;
        timeline.log(
            "order",
            format!(
                "{} created ({} cents {})",
                order.order_id, order.amount_cents, order.currency
            ),
        );
        staged += orders_db
            .place_order(&order, &event, &out.targets(&event))
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
        staged += orders_db.stage_again(&dup, &out.targets(&dup)).await?;
    }
    // The old checkout service sends version 1, straight to the bus: one good order,
    // one that breaks the version 2 schema once upcast (an amount of zero).
    for (n, euros) in [(9, 12.5), (10, 0.0)] {
        let old = OrderCreatedV1 {
            order_id: format!("order-{n}"),
            customer: "customer-legacy".into(),
            amount: euros,
        };
        timeline.log(
            "checkout",
            format!("order-{n} created by the v1 checkout ({euros} EUR)"),
        );
        out.publish(old.to_event()?).await?;
    }
    let expected = u64::from(ORDERS) + 1;

    // Wait for every order but the poison one (and the invalid one) to finish. The
    // waits end as soon as the saga is there; their length is for brokers whose new
    // consumers take a while to get their first events (a new Kafka consumer group's
    // first join: over 20 s on tansu when five groups join at once).
    wait_for(&saga.outcomes, expected - 1, Duration::from_secs(60)).await;
    // The dead letters land when Payment's worker settles them, which may be after
    // the other orders finished: wait for both.
    let letters = wait_for_letters(&dlq, 2).await?;
    println!(
        "\n--- payment dead-letter queue: {} message(s)",
        letters.len()
    );
    show_letters(&letters);
    println!("--- deploying Payment with XTS support, then redriving\n");
    saga.xts_supported.store(true, Ordering::SeqCst);
    let redriven = dlq.redrive_all().await?;
    wait_for(&saga.outcomes, expected, Duration::from_secs(60)).await;
    // The invalid order is dead-lettered again: redriving does not fix data.
    let letters = wait_for_letters(&dlq, 1).await?;
    println!(
        "\n--- still in the dead-letter queue after the redrive: {}",
        letters.len()
    );
    show_letters(&letters);
    // Bad data is fixed where it is produced, not by redriving: the operator drops it.
    let purged = dlq.purge().await?;
    println!("--- purged: {purged}");
    // Let email and analytics see the last events.
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Every worker finishes its in-flight work; their dead-letter counts add up.
    let mut dead_lettered = 0;
    for w in running {
        dead_lettered += w.shutdown(Duration::from_secs(5)).await.dead_lettered;
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
    out.close().await?;
    let order_rows = orders_db.order_rows().await?;
    orders_db.close().await;

    let outcomes = &saga.outcomes;
    report::summary(&[
        ("orders", format!("{ORDERS} (and 2 from the v1 checkout)")),
        (
            "confirmed",
            outcomes.confirmed.load(Ordering::SeqCst).to_string(),
        ),
        (
            "cancelled",
            outcomes.cancelled.load(Ordering::SeqCst).to_string(),
        ),
        (
            "emails sent",
            outcomes.emails.load(Ordering::SeqCst).to_string(),
        ),
        (
            "duplicates skipped by payment",
            duplicates.load(Ordering::SeqCst).to_string(),
        ),
        (
            "outbox staged",
            format!("{staged} (order rows committed with them: {order_rows})"),
        ),
        (
            "outbox relayed",
            format!("{relayed}\n{}", outbox_lines.join("\n")),
        ),
        ("dead-lettered", dead_lettered.to_string()),
        ("redriven", redriven.to_string()),
        ("purged", purged.to_string()),
        ("events per type", outcomes.per_type_lines()),
    ]);
    let done = outcomes.finished();
    if done != expected {
        return Err(cloudbus::Error::new(
            cloudbus::ErrorKind::Timeout,
            format!("only {done} of {expected} orders finished"),
        ));
    }
    Ok(())
}

/// `examples/schemas`, beside this example's directory, whichever package builds it
/// (the workspace, or tests/app, whose `file!()` starts with `../../`).
fn schema_dir() -> std::path::PathBuf {
    let source = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(file!());
    source
        .parent()
        .and_then(|saga| saga.parent())
        .map(|examples| examples.join("schemas"))
        .unwrap_or_else(|| std::path::PathBuf::from("examples/schemas"))
}
