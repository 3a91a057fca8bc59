//! The order saga, choreographed over one topic with filtered subscriptions.
//!
//! Order publishes OrderCreated; Payment charges (some cards are declined:
//! PaymentFailed, and Order compensates with OrderCancelled); Inventory reserves
//! stock (StockReserved); Order confirms (OrderConfirmed). Email and Analytics read
//! the same events through their own filtered subscriptions (fan-out). One duplicate
//! OrderCreated shows the idempotent consumer; one poison order ends in Payment's
//! dead-letter queue, is shown, and is redriven once Payment learns to handle it.
//!
//! On a bus without fan-out (SQS queues), each service reads its own queue
//! (`saga-payment`, ...) and the services' outbox sends each event to every queue whose
//! filter it matches: the same choreography, routed on the publishing side.
//!
//! Run: `cargo run --example order_saga` (memory broker), or point `CLOUDBUS_URL` at a
//! cloud once its provider is enabled (`sqs://`, `sns://`, `pubsub://PROJECT`, ...).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cloudbus::{
    AttributesReader, Bus, Event, EventBuilder, EventExt, Filter, HandlerContext, HandlerError,
    Idempotent, MemoryDedupStore, Publisher, RetryPolicy, SubscriptionSpec, WorkerOptions,
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
    let publisher = routes.outbox(&bus).await?;
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
            Arc::new(MemoryDedupStore::new(10_000)),
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

    // The Order service takes orders.
    let mut first_order = None;
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
        publish(&publisher, event.clone()).await?;
        first_order.get_or_insert(event);
    }
    // At-least-once delivery means duplicates happen: send one on purpose.
    if let Some(dup) = first_order {
        timeline.log(
            "order",
            format!(
                "{} published AGAIN (same id: a duplicate)",
                dup.subject().unwrap_or("?")
            ),
        );
        publish(&publisher, dup).await?;
    }

    // Wait for every order but the poison one to finish.
    wait_for(&outcomes, ORDERS - 1, Duration::from_secs(10)).await;
    let dlq = routes.dead_letters(&bus, "payment").await?;
    let letters = dlq.peek(10).await?;
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
    publisher.close().await?;

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

    /// The services' outbox: the topic, or every queue whose filter an event matches.
    async fn outbox(&self, bus: &Bus) -> cloudbus::Result<Outbox> {
        if self.fan_out {
            return Ok(Outbox::Topic(bus.publisher(TOPIC).await?));
        }
        let mut queues = Vec::new();
        for (name, filter) in subscriptions() {
            queues.push((filter, bus.publisher(&self.topic_of(name)).await?));
        }
        Ok(Outbox::Queues(Arc::new(queues)))
    }
}

/// Sends the saga's events where the services read them.
#[derive(Clone)]
enum Outbox {
    Topic(Publisher),
    Queues(Arc<Vec<(Filter, Publisher)>>),
}

impl Outbox {
    async fn publish(&self, e: Event) -> cloudbus::Result<()> {
        match self {
            Outbox::Topic(p) => p.publish(e).await,
            Outbox::Queues(queues) => {
                try_join_all(
                    queues
                        .iter()
                        .filter(|(f, _)| f.matches(&e))
                        .map(|(_, p)| p.publish(e.clone())),
                )
                .await?;
                Ok(())
            }
        }
    }

    async fn close(&self) -> cloudbus::Result<()> {
        match self {
            Outbox::Topic(p) => p.close().await,
            Outbox::Queues(queues) => {
                try_join_all(queues.iter().map(|(_, p)| p.close())).await?;
                Ok(())
            }
        }
    }
}

async fn publish(p: &Outbox, e: Event) -> cloudbus::Result<()> {
    p.publish(e).await
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
