//! Typed events, the router, its layers and schemas (issue 16), on the memory broker
//! and by calling the router as the worker does.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::time::Duration;

use cloudbus::memory::MemoryBroker;
use cloudbus::router::layers::{
    CircuitBreakerLayer, ConcurrencyLimitLayer, IdempotencyLayer, RateLimitLayer,
    SchemaValidationLayer, TimeoutLayer, TraceLayer,
};
use cloudbus::router::{FromContext, RawEvent, Sender, State};
use cloudbus::schema::{
    DirectorySchemaRegistry, HttpSchemaRegistry, SchemaId, SchemaRegistry, SchemaValidator,
    check_compatibility,
};
use cloudbus::{
    AttributesReader, Bus, CloudEvent, Context, DecodeEventError, DecodeExt, ErrorKind, Event,
    EventBuilder, EventExt, Handler, HandlerContext, HandlerError, MemoryDedupStore, Permanent,
    Router, SubscriptionSpec, UnknownTypes, WorkerOptions,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Serialize, Deserialize, CloudEvent, Debug, Clone, PartialEq)]
#[cloudevent(type = "com.example.order.created", version = 2, source = "/orders")]
struct OrderCreated {
    #[cloudevent(subject)]
    order_id: String,
    #[cloudevent(key)]
    customer: String,
    total_cents: u64,
}

#[derive(Serialize, Deserialize, CloudEvent, Debug, Clone, PartialEq)]
#[cloudevent(type = "com.example.payment.requested")]
struct PaymentRequested {
    order_id: String,
}

/// What the typed handler saw: the order, its ordering key, the attempt.
type Seen = Arc<std::sync::Mutex<Vec<(OrderCreated, Option<String>, u32)>>>;

/// A change to a schema, for the compatibility cases.
type SchemaChange = Box<dyn Fn(&mut serde_json::Value)>;

fn order(n: u32) -> OrderCreated {
    OrderCreated {
        order_id: format!("order-{n}"),
        customer: format!("customer-{}", n % 3),
        total_cents: 100 * u64::from(n),
    }
}

fn ctx() -> HandlerContext {
    HandlerContext::new(1, "test")
}

fn arc(e: Event) -> Arc<Event> {
    Arc::new(e)
}

/// A fresh broker with `topic` and its subscription `subscription`.
async fn bus_with(topic: &str, subscription: &str) -> Bus {
    let bus = MemoryBroker::new().bus();
    bus.ensure_topic(topic).await.unwrap();
    bus.ensure_subscription(&SubscriptionSpec::new(topic, subscription).max_delivery_attempts(3))
        .await
        .unwrap();
    bus
}

/// Waits until `done` holds, at most 10 s.
async fn until(what: &str, done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn fast_retries() -> WorkerOptions {
    WorkerOptions::default().retry(
        cloudbus::RetryPolicy::default()
            .max_attempts(3)
            .initial_backoff(Duration::from_millis(5))
            .max_backoff(Duration::from_millis(20)),
    )
}

/// A directory of schemas for the tests: OrderCreated v1 and v2.
fn schema_dir() -> tempdir::TempDir {
    let dir = tempdir::TempDir::new();
    std::fs::write(
        dir.path().join("com.example.order.created.v2.json"),
        json!({
            "type": "object",
            "required": ["order_id", "customer", "total_cents"],
            "properties": {
                "order_id": {"type": "string", "pattern": "^order-"},
                "customer": {"type": "string"},
                "total_cents": {"type": "integer", "minimum": 0}
            }
        })
        .to_string(),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("com.example.order.created.v1.json"),
        json!({
            "type": "object",
            "required": ["order_id", "customer", "total"],
            "properties": {
                "order_id": {"type": "string"},
                "customer": {"type": "string"},
                "total": {"type": "number"}
            }
        })
        .to_string(),
    )
    .unwrap();
    dir
}

/// A temporary directory removed on drop (no extra crate for it).
mod tempdir {
    pub struct TempDir(std::path::PathBuf);
    impl TempDir {
        pub fn new() -> Self {
            let path = std::env::temp_dir().join(format!(
                "cloudbus-router-test-{}-{}",
                std::process::id(),
                fastrand::u64(..)
            ));
            std::fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }
        pub fn path(&self) -> &std::path::Path {
            &self.0
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            std::fs::remove_dir_all(&self.0).ok();
        }
    }
}

#[test]
fn the_derive_sets_type_version_source_schema_key_and_subject() {
    let event = order(4).to_event().unwrap();
    assert_eq!(event.ty(), "com.example.order.created");
    assert_eq!(event.source().as_str(), "/orders");
    assert_eq!(
        event.dataschema().map(|u| u.as_str()),
        Some("urn:cloudbus:schema:com.example.order.created:v2")
    );
    assert_eq!(event.subject(), Some("order-4"));
    assert_eq!(event.partition_key(), Some("customer-1"));
    assert_eq!(cloudbus::typed::event_version(&event), 2);
    // Defaults: version 1, the crate's name as source.
    let payment = PaymentRequested {
        order_id: "o".into(),
    }
    .to_event()
    .unwrap();
    assert_eq!(payment.source().as_str(), "/cloudbus");
    assert_eq!(cloudbus::typed::event_version(&payment), 1);
    assert_eq!(event.decode::<OrderCreated>().unwrap(), order(4));
}

#[test]
fn decode_says_what_did_not_match() {
    let payment = PaymentRequested {
        order_id: "o".into(),
    }
    .to_event()
    .unwrap();
    let e = payment.decode::<OrderCreated>().unwrap_err();
    assert!(matches!(e, DecodeEventError::WrongType { .. }), "{e}");
    assert!(
        e.to_string().contains("com.example.payment.requested"),
        "{e}"
    );

    let v1 = EventBuilder::new("com.example.order.created", "/orders")
        .dataschema("urn:cloudbus:schema:com.example.order.created:v1")
        .json(&json!({"order_id": "order-1", "customer": "c", "total": 1.5}))
        .unwrap()
        .build()
        .unwrap();
    let e = v1.decode::<OrderCreated>().unwrap_err();
    assert!(
        matches!(
            e,
            DecodeEventError::WrongVersion {
                expected: 2,
                found: 1,
                ..
            }
        ),
        "{e}"
    );

    let missing = EventBuilder::new("com.example.order.created", "/orders")
        .dataschema(OrderCreated::data_schema())
        .json(&json!({"order_id": "order-1", "customer": "c"}))
        .unwrap()
        .build()
        .unwrap();
    let e = missing.decode::<OrderCreated>().unwrap_err();
    assert!(e.to_string().contains("missing field `total_cents`"), "{e}");
    // Decode errors dead-letter: the event will never decode.
    assert!(matches!(HandlerError::from(e), HandlerError::Reject { .. }));

    let no_data = EventBuilder::new("com.example.order.created.v2", "/orders")
        .build()
        .unwrap();
    assert!(matches!(
        no_data.decode::<OrderCreated>(),
        Err(DecodeEventError::NoData { .. })
    ));
}

#[tokio::test]
async fn typed_events_go_from_send_through_the_router_to_async_fn_handlers() {
    let bus = bus_with("orders", "billing").await;
    let publisher = bus.publisher("orders").await.unwrap();
    let seen: Seen = Arc::default();

    async fn on_created(
        order: OrderCreated,
        ctx: Context,
        State(seen): State<Seen>,
    ) -> Result<(), HandlerError> {
        assert!(ctx.published_time().is_some());
        ctx.extend(Duration::from_secs(30)).await?;
        let key = ctx.ordering_key().map(str::to_owned);
        seen.lock().unwrap().push((order, key, ctx.attempt()));
        Ok(())
    }

    let router = Router::new().route(on_created).state(seen.clone());
    let worker = bus
        .consumer("orders", "billing")
        .await
        .unwrap()
        .start_worker(router, WorkerOptions::default())
        .expect("the router's wiring");
    for n in 0..5 {
        publisher.send(&order(n)).await.unwrap();
    }
    publisher
        .send(&order(9))
        .key("explicit-key")
        .subject("explicit-subject")
        .await
        .unwrap();
    until("six orders", || seen.lock().unwrap().len() == 6).await;
    let report = worker.shutdown(Duration::from_secs(5)).await;
    assert_eq!(report.acked, 6, "{report:?}");
    let seen = seen.lock().unwrap();
    for n in 0..5 {
        let expected = (order(n), Some(format!("customer-{}", n % 3)), 1);
        assert!(seen.contains(&expected), "{expected:?} not in {seen:?}");
    }
    assert!(
        seen.iter()
            .any(|(o, key, _)| o.order_id == "order-9" && key.as_deref() == Some("explicit-key"))
    );
}

#[tokio::test]
async fn unknown_types_are_dead_lettered_by_default_or_acked_or_ignored() {
    let stray = arc(EventBuilder::new("com.example.stray", "/x")
        .build()
        .unwrap());
    let on_payment = |_: PaymentRequested, _: Context| async { Ok::<(), HandlerError>(()) };
    let router = Router::new().route(on_payment);
    match router.handle(stray.clone(), ctx()).await {
        Err(HandlerError::Reject { reason }) => {
            assert!(
                reason.contains("no route for event type \"com.example.stray\""),
                "{reason}"
            )
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    for policy in [UnknownTypes::Ack, UnknownTypes::Ignore] {
        let router = Router::new().route(on_payment).unknown_types(policy);
        assert!(
            router.handle(stray.clone(), ctx()).await.is_ok(),
            "{policy:?}"
        );
    }

    // Through a worker: the stray event lands in the dead-letter place with the reason.
    let bus = bus_with("mixed", "svc").await;
    let publisher = bus.publisher("mixed").await.unwrap();
    let handled = Arc::new(AtomicU32::new(0));
    let h = handled.clone();
    let router = Router::new().route(move |_: PaymentRequested, _: Context| {
        let h = h.clone();
        async move {
            h.fetch_add(1, Ordering::SeqCst);
            Ok::<(), HandlerError>(())
        }
    });
    let worker = bus
        .consumer("mixed", "svc")
        .await
        .unwrap()
        .start_worker(router, fast_retries())
        .expect("the router's wiring");
    publisher.publish((*stray).clone()).await.unwrap();
    publisher
        .send(&PaymentRequested {
            order_id: "1".into(),
        })
        .await
        .unwrap();
    let dead_letters = bus.dead_letters("mixed", "svc").await.unwrap();
    let mut letters = Vec::new();
    for _ in 0..500 {
        letters = dead_letters.peek(10).await.unwrap();
        if !letters.is_empty() && handled.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    worker.shutdown(Duration::from_secs(5)).await;
    assert_eq!(handled.load(Ordering::SeqCst), 1);
    assert_eq!(letters.len(), 1, "{letters:?}");
    let reason = letters[0].reason.clone().unwrap_or_default();
    assert!(reason.contains("no route for event type"), "{reason}");
}

#[tokio::test]
async fn prefix_routes_take_what_no_exact_route_takes_longest_prefix_first() {
    let hits: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let record = |label: &'static str, hits: Arc<std::sync::Mutex<Vec<String>>>| {
        move |RawEvent(e): RawEvent| {
            let hits = hits.clone();
            async move {
                hits.lock().unwrap().push(format!("{label}:{}", e.ty()));
                Ok::<(), HandlerError>(())
            }
        }
    };
    let router = Router::new()
        .route_prefix("com.example.", record("short", hits.clone()))
        .route_prefix("com.example.order.", record("long", hits.clone()))
        .route_type("com.example.order.cancelled", record("exact", hits.clone()));
    for ty in [
        "com.example.order.cancelled",
        "com.example.order.shipped",
        "com.example.user.joined",
    ] {
        router
            .handle(arc(EventBuilder::new(ty, "/x").build().unwrap()), ctx())
            .await
            .unwrap();
    }
    assert_eq!(
        *hits.lock().unwrap(),
        [
            "exact:com.example.order.cancelled",
            "long:com.example.order.shipped",
            "short:com.example.user.joined"
        ]
    );
}

#[derive(Debug, thiserror::Error)]
#[error("ledger unavailable")]
struct LedgerDown;

impl From<LedgerDown> for HandlerError {
    fn from(e: LedgerDown) -> Self {
        HandlerError::retry_after(e, Duration::from_secs(1))
    }
}

#[tokio::test]
async fn handler_errors_of_any_kind_convert() {
    let event = arc(PaymentRequested {
        order_id: "1".into(),
    }
    .to_event()
    .unwrap());
    async fn anyhow_fails(_: PaymentRequested, _: Context) -> anyhow::Result<()> {
        anyhow::bail!("database connection reset")
    }
    async fn boxed_fails(
        _: PaymentRequested,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        Err("socket closed".into())
    }
    async fn permanent_fails(_: PaymentRequested) -> Result<(), HandlerError> {
        let n: u32 = "not a number".parse().map_err(Permanent)?;
        let _ = n;
        Ok(())
    }
    async fn own_error(_: PaymentRequested) -> Result<(), LedgerDown> {
        Err(LedgerDown)
    }
    let outcome = |router: Router| {
        let event = event.clone();
        async move { router.handle(event, ctx()).await }
    };
    match outcome(Router::new().route(anyhow_fails)).await {
        Err(HandlerError::Retry { message, .. }) => assert!(message.contains("connection reset")),
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        outcome(Router::new().route(boxed_fails)).await,
        Err(HandlerError::Retry { .. })
    ));
    match outcome(Router::new().route(permanent_fails)).await {
        Err(HandlerError::Reject { reason }) => {
            assert!(reason.contains("invalid digit"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        outcome(Router::new().route(own_error)).await,
        Err(HandlerError::Retry { delay: Some(_), .. })
    ));
    // HandlerError is a std error, so it boxes and comes back as it was.
    let boxed: Box<dyn std::error::Error + Send + Sync> = Box::new(HandlerError::reject("bad"));
    assert!(matches!(
        HandlerError::from(boxed),
        HandlerError::Reject { .. }
    ));
}

fn v1_order(id: &str) -> Event {
    EventBuilder::new("com.example.order.created", "/orders")
        .id(id)
        .dataschema("urn:cloudbus:schema:com.example.order.created:v1")
        .json(&json!({"order_id": "order-1", "customer": "c", "total": 12.5}))
        .unwrap()
        .build()
        .unwrap()
}

fn v1_to_v2(mut v: serde_json::Value) -> Result<serde_json::Value, String> {
    let total = v["total"].as_f64().ok_or("total is not a number")?;
    v["total_cents"] = json!((total * 100.0).round() as u64);
    v.as_object_mut().map(|o| o.remove("total"));
    Ok(v)
}

#[tokio::test]
async fn older_versions_are_upcast_and_newer_ones_dead_lettered() {
    let received: Arc<std::sync::Mutex<Vec<(OrderCreated, u32)>>> = Arc::default();
    let r = received.clone();
    let handler = move |order: OrderCreated, ctx: Context| {
        let r = r.clone();
        async move {
            r.lock().unwrap().push((order, ctx.version()));
            Ok::<(), HandlerError>(())
        }
    };
    let router = Router::new()
        .route(handler.clone())
        .upcast(OrderCreated::TYPE, 1, v1_to_v2);
    router.handle(arc(v1_order("a")), ctx()).await.unwrap();
    // A type suffix names the version too.
    let suffixed = EventBuilder::new("com.example.order.created.v1", "/orders")
        .json(&json!({"order_id": "order-1", "customer": "c", "total": 0.07}))
        .unwrap()
        .build()
        .unwrap();
    router.handle(arc(suffixed), ctx()).await.unwrap();
    {
        let received = received.lock().unwrap();
        assert_eq!(received.len(), 2);
        assert_eq!(received[0].0.total_cents, 1250);
        assert_eq!(received[0].1, 2, "the handler sees the upgraded version");
        assert_eq!(received[1].0.total_cents, 7);
    }

    let v3 = EventBuilder::new("com.example.order.created", "/orders")
        .dataschema("https://schemas.example.com/order-created/v3.json")
        .json(&json!({}))
        .unwrap()
        .build()
        .unwrap();
    match router.handle(arc(v3), ctx()).await {
        Err(HandlerError::Reject { reason }) => {
            assert!(
                reason.contains("version 3") && reason.contains("newer"),
                "{reason}"
            )
        }
        other => panic!("{other:?}"),
    }
    // Without the upcaster, the gap is named.
    let no_upcaster = Router::new().route(handler);
    match no_upcaster.handle(arc(v1_order("b")), ctx()).await {
        Err(HandlerError::Reject { reason }) => {
            assert!(
                reason.contains("no upcaster from version 1 to 2"),
                "{reason}"
            )
        }
        other => panic!("{other:?}"),
    }
    // A failing upcaster dead-letters with its reason.
    let failing = Router::new()
        .route(|_: OrderCreated| async { Ok::<(), HandlerError>(()) })
        .upcast(OrderCreated::TYPE, 1, |_| Err("cannot convert".into()));
    match failing.handle(arc(v1_order("c")), ctx()).await {
        Err(HandlerError::Reject { reason }) => {
            assert!(reason.contains("cannot convert"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn follow_ups_carry_causation_and_correlation() {
    let bus = bus_with("payments", "audit").await;
    let payments = bus.publisher("payments").await.unwrap();
    async fn on_created(order: OrderCreated, ctx: Context) -> Result<(), HandlerError> {
        ctx.send(&PaymentRequested {
            order_id: order.order_id,
        })?
        .await?;
        Ok(())
    }
    let router = Router::new().route(on_created).publisher(payments);
    let created = cloudbus::CloudEvent::to_event(&order(1)).unwrap();
    router.handle(arc(created.clone()), ctx()).await.unwrap();
    let delivery = bus
        .consumer("payments", "audit")
        .await
        .unwrap()
        .receive()
        .await
        .unwrap();
    let follow_up = delivery.event();
    assert_eq!(follow_up.ty(), PaymentRequested::TYPE);
    assert_eq!(follow_up.causation_id(), Some(created.id()));
    assert_eq!(follow_up.correlation_id(), Some(created.id()));
    assert_eq!(
        follow_up.decode::<PaymentRequested>().unwrap().order_id,
        "order-1"
    );
    delivery.ack().await.unwrap();

    // Without a publisher, a clear error.
    let no_publisher = Router::new().route(on_created);
    match no_publisher.handle(arc(created), ctx()).await {
        Err(HandlerError::Reject { reason }) => {
            assert!(reason.contains("Router::publisher"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
}

/// An application's own extractor.
struct Tenant(String);

impl FromContext for Tenant {
    fn from_context(ctx: &Context) -> Result<Self, HandlerError> {
        ctx.event()
            .subject()
            .map(|s| Tenant(s.to_owned()))
            .ok_or_else(|| HandlerError::reject("no subject, so no tenant"))
    }
}

#[tokio::test]
async fn extractors_give_state_raw_event_and_the_applications_own() {
    #[derive(Clone)]
    struct Db(&'static str);
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    let router = Router::new().state(Db("orders-db")).route(
        move |order: OrderCreated,
              State(db): State<Db>,
              RawEvent(raw): RawEvent,
              Tenant(t): Tenant| {
            let s = s.clone();
            async move {
                s.lock()
                    .unwrap()
                    .push(format!("{} {} {} {}", order.order_id, db.0, raw.id(), t));
                Ok::<(), HandlerError>(())
            }
        },
    );
    let event = EventBuilder::new(OrderCreated::TYPE, "/orders")
        .id("e-1")
        .subject("tenant-a")
        .dataschema(OrderCreated::data_schema())
        .json(&order(2))
        .unwrap()
        .build()
        .unwrap();
    router.handle(arc(event), ctx()).await.unwrap();
    assert_eq!(*seen.lock().unwrap(), ["order-2 orders-db e-1 tenant-a"]);

    // A missing state is a deployment mistake: retried, with the type named.
    let no_state = Router::new()
        .route(|_: OrderCreated, State(_): State<Db>| async { Ok::<(), HandlerError>(()) });
    match no_state
        .handle(arc(order(1).to_event().unwrap()), ctx())
        .await
    {
        Err(HandlerError::Retry { message, .. }) => assert!(message.contains("Db"), "{message}"),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn the_timeout_layer_retries_a_slow_handling_and_stock_tower_layers_apply() {
    let slow = |_: PaymentRequested| async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        Ok::<(), HandlerError>(())
    };
    let event = arc(PaymentRequested {
        order_id: "1".into(),
    }
    .to_event()
    .unwrap());
    let router = Router::new()
        .route(slow)
        .layer(TimeoutLayer::new(Duration::from_millis(20)));
    match router.handle(event.clone(), ctx()).await {
        Err(HandlerError::Retry { message, .. }) => {
            assert!(message.contains("timed out"), "{message}")
        }
        other => panic!("{other:?}"),
    }
    // tower's own timeout: its error is boxed, and comes back as a retry.
    let router = Router::new()
        .route(slow)
        .layer(tower::timeout::TimeoutLayer::new(Duration::from_millis(20)));
    assert!(matches!(
        router.handle(event.clone(), ctx()).await,
        Err(HandlerError::Retry { .. })
    ));
    // A layer of the application's own, made with tower::layer::layer_fn.
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let counting = tower::layer::layer_fn(move |inner: cloudbus::router::RouteService| {
        let c = c.clone();
        tower::util::MapRequest::new(inner, move |ctx: Context| {
            c.fetch_add(1, Ordering::SeqCst);
            ctx
        })
    });
    let router = Router::new()
        .route(|_: PaymentRequested| async { Ok::<(), HandlerError>(()) })
        .layer(counting);
    router.handle(event.clone(), ctx()).await.unwrap();
    router.handle(event, ctx()).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn the_concurrency_limit_holds_across_concurrent_handlings() {
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let (r, m) = (running.clone(), most.clone());
    let router = Router::new()
        .route(move |_: PaymentRequested| {
            let (r, m) = (r.clone(), m.clone());
            async move {
                let now = r.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                r.fetch_sub(1, Ordering::SeqCst);
                Ok::<(), HandlerError>(())
            }
        })
        .layer(ConcurrencyLimitLayer::new(2));
    let event = arc(PaymentRequested {
        order_id: "1".into(),
    }
    .to_event()
    .unwrap());
    let all = (0..10).map(|_| router.handle(event.clone(), ctx()));
    for outcome in futures::future::join_all(all).await {
        outcome.unwrap();
    }
    assert_eq!(most.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn the_rate_limit_paces_an_event_storm() {
    let router = Router::new()
        .route(|_: PaymentRequested| async { Ok::<(), HandlerError>(()) })
        .layer(RateLimitLayer::new(10, Duration::from_secs(1)));
    let event = arc(PaymentRequested {
        order_id: "1".into(),
    }
    .to_event()
    .unwrap());
    let started = tokio::time::Instant::now();
    let all = (0..30).map(|_| router.handle(event.clone(), ctx()));
    for outcome in futures::future::join_all(all).await {
        outcome.unwrap();
    }
    // A burst of 10, then 10 per second: 20 more take 2 s.
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_millis(2500),
        "{took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn the_circuit_breaker_opens_fails_fast_and_closes_after_a_good_probe() {
    let calls = Arc::new(AtomicU32::new(0));
    let healthy = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (c, h) = (calls.clone(), healthy.clone());
    let breaker = CircuitBreakerLayer::new(3, Duration::from_secs(10));
    let router = Router::new()
        .route(move |_: PaymentRequested| {
            let (c, h) = (c.clone(), h.clone());
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                if h.load(Ordering::SeqCst) {
                    Ok(())
                } else {
                    Err(HandlerError::retry("payment API down"))
                }
            }
        })
        .layer(breaker.clone());
    let event = arc(PaymentRequested {
        order_id: "1".into(),
    }
    .to_event()
    .unwrap());
    for _ in 0..3 {
        assert!(router.handle(event.clone(), ctx()).await.is_err());
    }
    assert!(breaker.is_open());
    match router.handle(event.clone(), ctx()).await {
        Err(HandlerError::Retry { message, delay }) => {
            assert!(message.contains("circuit open"), "{message}");
            assert!(delay.is_some_and(|d| d <= Duration::from_secs(10)));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        calls.load(Ordering::SeqCst),
        3,
        "an open circuit does not call the handler"
    );
    // After the cool-down a failed probe opens it again...
    tokio::time::advance(Duration::from_secs(11)).await;
    assert!(router.handle(event.clone(), ctx()).await.is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    assert!(router.handle(event.clone(), ctx()).await.is_err());
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    // ...and a good one closes it.
    tokio::time::advance(Duration::from_secs(11)).await;
    healthy.store(true, Ordering::SeqCst);
    router.handle(event.clone(), ctx()).await.unwrap();
    assert!(!breaker.is_open());
    router.handle(event, ctx()).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 6);
}

#[tokio::test]
async fn the_idempotency_layer_handles_each_event_once() {
    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let idempotency = IdempotencyLayer::new(Arc::new(MemoryDedupStore::new(1000)));
    let duplicates = idempotency.duplicates();
    let router = Router::new()
        .route(move |_: PaymentRequested| {
            let c = c.clone();
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                Ok::<(), HandlerError>(())
            }
        })
        .layer(idempotency);
    let event = arc(PaymentRequested {
        order_id: "1".into(),
    }
    .to_event()
    .unwrap());
    for _ in 0..3 {
        router.handle(event.clone(), ctx()).await.unwrap();
    }
    let other = arc(PaymentRequested {
        order_id: "2".into(),
    }
    .to_event()
    .unwrap());
    router.handle(other, ctx()).await.unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    assert_eq!(duplicates.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn the_trace_layer_runs_the_handler_in_a_route_span() {
    let spans = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = spans.clone();
    let router = Router::new()
        .route(move |_: PaymentRequested| {
            let s = s.clone();
            async move {
                let name = tracing::Span::current().metadata().map(|m| m.name());
                s.lock().unwrap().push(name);
                Ok::<(), HandlerError>(())
            }
        })
        .layer(TraceLayer::new());
    let subscriber = tracing_subscriber::registry();
    let _guard = tracing::subscriber::set_default(subscriber);
    let event = arc(PaymentRequested {
        order_id: "1".into(),
    }
    .to_event()
    .unwrap());
    router.handle(event, ctx()).await.unwrap();
    assert_eq!(*spans.lock().unwrap(), [Some("cloudbus.route")]);
}

#[tokio::test]
async fn schemas_are_checked_on_publish_and_on_consume() {
    let dir = schema_dir();
    let registry = Arc::new(DirectorySchemaRegistry::open(dir.path()).unwrap());
    let validator = Arc::new(SchemaValidator::preloaded(registry).await.unwrap());
    assert_eq!(validator.loaded(), 2);
    let bus = bus_with("orders", "billing").await;
    let raw_publisher = bus.publisher("orders").await.unwrap();
    let publisher = raw_publisher.validate_with(validator.clone());

    // On publish: refused before sending, with what did not match.
    let bad = OrderCreated {
        order_id: "ORDER-1".into(),
        customer: "c".into(),
        total_cents: 1,
    };
    let e = publisher.send(&bad).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    assert!(
        e.to_string().contains("/order_id") && e.to_string().contains("^order-"),
        "{e}"
    );
    let e = publisher
        .publish(bad.to_event().unwrap())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    let results = publisher
        .publish_batch(vec![bad.to_event().unwrap(), order(1).to_event().unwrap()])
        .await;
    assert!(results[0].is_err() && results[1].is_ok(), "{results:?}");
    publisher.send(&order(2)).await.unwrap();

    // On consume: a bad event (sent by a publisher that does not validate) is
    // dead-lettered with the validation error.
    raw_publisher
        .publish(bad.to_event().unwrap())
        .await
        .unwrap();
    let handled = Arc::new(AtomicU32::new(0));
    let h = handled.clone();
    let router = Router::new()
        .route(move |_: OrderCreated| {
            let h = h.clone();
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                Ok::<(), HandlerError>(())
            }
        })
        .layer(SchemaValidationLayer::new(validator));
    let worker = bus
        .consumer("orders", "billing")
        .await
        .unwrap()
        .start_worker(router, fast_retries())
        .expect("the router's wiring");
    let dead_letters = bus.dead_letters("orders", "billing").await.unwrap();
    let mut letters = Vec::new();
    for _ in 0..500 {
        letters = dead_letters.peek(10).await.unwrap();
        if !letters.is_empty() && handled.load(Ordering::SeqCst) == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    worker.shutdown(Duration::from_secs(5)).await;
    assert_eq!(
        handled.load(Ordering::SeqCst),
        2,
        "orders 1 and 2 were valid"
    );
    assert_eq!(letters.len(), 1, "{letters:?}");
    let reason = letters[0].reason.clone().unwrap_or_default();
    assert!(
        reason.contains("does not match the schema of com.example.order.created v2"),
        "{reason}"
    );
    assert!(reason.contains("/order_id"), "{reason}");
}

#[tokio::test]
async fn a_schema_registry_directory_with_a_misnamed_file_is_an_error() {
    let dir = tempdir::TempDir::new();
    std::fs::write(dir.path().join("com.example.order.created.json"), "{}").unwrap();
    let e = DirectorySchemaRegistry::open(dir.path()).unwrap_err();
    assert!(e.to_string().contains("TYPE.vVERSION.json"), "{e}");
    std::fs::remove_file(dir.path().join("com.example.order.created.json")).unwrap();
    std::fs::write(
        dir.path().join("com.example.order.created.v1.json"),
        "{not json",
    )
    .unwrap();
    let e = DirectorySchemaRegistry::open(dir.path()).unwrap_err();
    assert!(e.to_string().contains("not JSON"), "{e}");
}

/// A registry speaking the Confluent REST paths, on a local port.
async fn serve_registry() -> (String, tokio::task::JoinHandle<()>) {
    serve_guarded_registry(None).await
}

/// [`serve_registry`] answering 401 to a request without `Authorization: {required}`.
async fn serve_guarded_registry(
    required: Option<&'static str>,
) -> (String, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/registry", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut socket, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = socket.read(&mut buf).await.unwrap_or(0);
                let request = String::from_utf8_lossy(&buf[..n]).to_string();
                let path = request.split_whitespace().nth(1).unwrap_or("").to_owned();
                let authorized = required.is_none_or(|want| {
                    request.lines().any(|line| {
                        line.split_once(':').is_some_and(|(name, value)| {
                            name.eq_ignore_ascii_case("authorization") && value.trim() == want
                        })
                    })
                });
                let (status, body) = match path.as_str() {
                    _ if !authorized => {
                        ("401 Unauthorized", json!({"error_code": 401}).to_string())
                    }
                    "/registry/subjects" => {
                        ("200 OK", json!(["com.example.order.created"]).to_string())
                    }
                    "/registry/subjects/com.example.order.created/versions" => {
                        ("200 OK", json!([2]).to_string())
                    }
                    "/registry/subjects/com.example.order.created/versions/2/schema" => (
                        "200 OK",
                        json!({"type": "object", "required": ["total_cents"],
                               "properties": {"total_cents": {"type": "integer", "maximum": 1000}}})
                        .to_string(),
                    ),
                    _ => ("404 Not Found", json!({"error_code": 40401}).to_string()),
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                socket.write_all(response.as_bytes()).await.ok();
            });
        }
    });
    (url, task)
}

/// A registry that answers every request with `status`, `content_type` and `body`.
async fn serve_canned(
    status: &'static str,
    content_type: &'static str,
    body: &'static str,
) -> (String, tokio::task::JoinHandle<()>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/registry", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = socket.read(&mut buf).await;
                let response = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                socket.write_all(response.as_bytes()).await.ok();
            });
        }
    });
    (url, task)
}

/// Issue 28 item 5: a registry's 408, 400 or 409, or a proxy's HTML page with 200,
/// was InvalidArgument, the event's fault, so the schema layer dead-lettered every
/// good event (and an outbox relay its rows). Only "no such schema" or a schema the
/// data breaks is the event's fault; the rest is Unavailable, and retried.
#[tokio::test]
async fn registry_faults_are_never_blamed_on_the_event() {
    let answers = [
        (
            "408 Request Timeout",
            "application/json",
            r#"{"error_code": 408}"#,
        ),
        (
            "400 Bad Request",
            "application/json",
            r#"{"error_code": 400}"#,
        ),
        ("409 Conflict", "application/json", r#"{"error_code": 409}"#),
        (
            "200 OK",
            "text/html",
            "<html><body>proxy login</body></html>",
        ),
    ];
    for (status, content_type, body) in answers {
        let (url, server) = serve_canned(status, content_type, body).await;
        let validator = SchemaValidator::new(Arc::new(HttpSchemaRegistry::new(&url).unwrap()));
        use cloudbus::EventValidator;
        let e = validator
            .validate(&order(3).to_event().unwrap())
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{status}: {e}");
        assert!(e.is_retryable(), "{status}: {e}");
        server.abort();
    }
}

#[tokio::test]
async fn the_http_registry_reads_confluent_paths() {
    let (url, server) = serve_registry().await;
    let registry = HttpSchemaRegistry::new(&url).unwrap();
    assert_eq!(
        registry.list().await.unwrap(),
        [SchemaId::new("com.example.order.created", 2)]
    );
    assert!(
        registry
            .schema(&SchemaId::new("com.example.order.created", 1))
            .await
            .unwrap()
            .is_none()
    );
    let validator = SchemaValidator::new(Arc::new(registry));
    use cloudbus::EventValidator;
    assert_eq!(
        validator
            .validate(&order(3).to_event().unwrap())
            .await
            .unwrap(),
        cloudbus::Checked::Valid
    );
    let e = validator
        .validate(&order(30).to_event().unwrap())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("/total_cents"), "{e}");
    server.abort();
    // A registry that is away is Unavailable (retried), not a verdict on the event.
    let gone = SchemaValidator::new(Arc::new(HttpSchemaRegistry::new(&url).unwrap()));
    let e = gone
        .validate(&order(3).to_event().unwrap())
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    assert!(HttpSchemaRegistry::new("ftp://x").is_err());
}

/// Credentials go with every request (Basic, from the builder or the URL, and
/// bearer tokens), only over HTTPS or loopback, and never into `Debug` or errors.
#[tokio::test]
async fn the_http_registry_sends_credentials_and_never_shows_them() {
    let subject = [SchemaId::new("com.example.order.created", 2)];
    // alice:p@ss
    let (url, server) = serve_guarded_registry(Some("Basic YWxpY2U6cEBzcw==")).await;
    let e = HttpSchemaRegistry::new(&url)
        .unwrap()
        .list()
        .await
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
    let registry = HttpSchemaRegistry::new(&url)
        .unwrap()
        .basic_auth("alice", "p@ss")
        .unwrap();
    assert_eq!(registry.list().await.unwrap(), subject);
    // In the URL, percent-encoded, as Confluent's clients take it.
    let in_url = url.replacen("http://", "http://alice:p%40ss@", 1);
    let registry = HttpSchemaRegistry::new(&in_url).unwrap();
    assert_eq!(registry.list().await.unwrap(), subject);
    let shown = format!("{registry:?}");
    assert!(
        shown.contains("alice") && !shown.contains("p%40ss") && !shown.contains("p@ss"),
        "{shown}"
    );
    server.abort();
    let e = registry.list().await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
    let told = format!("{e} {e:?}");
    assert!(
        !told.contains("p%40ss") && !told.contains("p@ss") && !told.contains("YWxp"),
        "{told}"
    );

    let (url, server) = serve_guarded_registry(Some("Bearer t0ken")).await;
    let registry = HttpSchemaRegistry::new(&url)
        .unwrap()
        .bearer_token("t0ken")
        .unwrap();
    assert_eq!(registry.list().await.unwrap(), subject);
    assert!(!format!("{registry:?}").contains("t0ken"));
    server.abort();

    // Never over plain HTTP to another machine; over HTTPS, yes.
    for refused in [
        HttpSchemaRegistry::new("http://registry.example.com")
            .unwrap()
            .basic_auth("alice", "p@ss"),
        HttpSchemaRegistry::new("http://registry.example.com")
            .unwrap()
            .bearer_token("t0ken"),
        HttpSchemaRegistry::new("http://alice:secret@10.0.0.8:8081"),
    ] {
        let e = refused.unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
        assert!(e.to_string().contains("https://"), "{e}");
        assert!(!format!("{e} {e:?}").contains("secret"), "{e:?}");
    }
    HttpSchemaRegistry::new("https://registry.example.com")
        .unwrap()
        .bearer_token("t0ken")
        .unwrap();
}

#[test]
fn compatibility_follows_the_evolution_rules() {
    let v1 = json!({
        "type": "object",
        "required": ["id", "total"],
        "properties": {
            "id": {"type": "string"},
            "total": {"type": "integer"},
            "note": {"type": "string"},
            "status": {"enum": ["new", "paid"]},
            "lines": {"type": "array", "items": {"type": "object", "properties": {"sku": {"type": "string"}}}}
        }
    });
    let compatible = |new: serde_json::Value| check_compatibility(&v1, &new);
    let mut added_optional = v1.clone();
    added_optional["properties"]["coupon"] = json!({"type": "string"});
    added_optional["properties"]["total"] = json!({"type": "number"});
    added_optional["properties"]["status"] = json!({"enum": ["new", "paid", "refunded"]});
    assert!(compatible(added_optional).is_compatible());
    let mut optional_now = v1.clone();
    optional_now["required"] = json!(["id"]);
    assert!(compatible(optional_now).is_compatible());

    let cases: Vec<(&str, SchemaChange)> = vec![
        (
            "/total: required property removed",
            Box::new(|v| {
                v["properties"].as_object_mut().unwrap().remove("total");
                v["required"] = json!(["id"]);
            }),
        ),
        (
            "/id: type changed from string to integer",
            Box::new(|v| v["properties"]["id"] = json!({"type": "integer"})),
        ),
        (
            "/coupon: required property added",
            Box::new(|v| {
                v["properties"]["coupon"] = json!({"type": "string"});
                v["required"] = json!(["id", "total", "coupon"]);
            }),
        ),
        (
            "/note: optional property made required",
            Box::new(|v| v["required"] = json!(["id", "total", "note"])),
        ),
        (
            "/status: enum value \"paid\" removed",
            Box::new(|v| v["properties"]["status"] = json!({"enum": ["new"]})),
        ),
        (
            "/lines/items/sku: type changed",
            Box::new(|v| {
                v["properties"]["lines"]["items"]["properties"]["sku"] = json!({"type": "number"})
            }),
        ),
        (
            "/note: property removed while additionalProperties is false",
            Box::new(|v| {
                v["properties"].as_object_mut().unwrap().remove("note");
                v["additionalProperties"] = json!(false);
            }),
        ),
    ];
    for (expected, change) in cases {
        let mut new = v1.clone();
        change(&mut new);
        let verdict = check_compatibility(&v1, &new);
        assert!(
            verdict.problems.iter().any(|p| p.starts_with(expected)),
            "expected {expected:?}, got {verdict}"
        );
    }
}

#[tokio::test]
async fn the_plain_subscribe_closure_keeps_working_beside_the_router() {
    let bus = bus_with("pings", "svc").await;
    let publisher = bus.publisher("pings").await.unwrap();
    let seen = Arc::new(AtomicU32::new(0));
    let s = seen.clone();
    let worker = bus
        .consumer("pings", "svc")
        .await
        .unwrap()
        .start_worker(
            move |e: Arc<Event>, _c: HandlerContext| {
                let s = s.clone();
                async move {
                    let p = e.decode::<PaymentRequested>()?;
                    assert_eq!(p.order_id, "7");
                    s.fetch_add(1, Ordering::SeqCst);
                    Ok::<(), HandlerError>(())
                }
            },
            WorkerOptions::default(),
        )
        .expect("the router's wiring");
    publisher
        .send(&PaymentRequested {
            order_id: "7".into(),
        })
        .await
        .unwrap();
    until("the closure", || seen.load(Ordering::SeqCst) == 1).await;
    worker.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
#[allow(deprecated)]
async fn subscribe_with_a_closure_still_works() {
    let bus = bus_with("legacy", "svc").await;
    let publisher = bus.publisher("legacy").await.unwrap();
    let seen = Arc::new(AtomicU32::new(0));
    let s = seen.clone();
    let worker = bus
        .consumer("legacy", "svc")
        .await
        .unwrap()
        .subscribe(
            move |_e: Arc<Event>, _c: HandlerContext| {
                let s = s.clone();
                async move {
                    s.fetch_add(1, Ordering::SeqCst);
                    Ok::<(), HandlerError>(())
                }
            },
            WorkerOptions::default(),
        )
        .expect("the router's wiring");
    publisher
        .send(&PaymentRequested {
            order_id: "1".into(),
        })
        .await
        .unwrap();
    until("the subscribed closure", || {
        seen.load(Ordering::SeqCst) == 1
    })
    .await;
    worker.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_nested_router_keeps_its_own_state() {
    #[derive(Clone)]
    struct Name(&'static str);
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    let inner = Router::new().state(Name("inner")).route(
        move |_: PaymentRequested, State(Name(n)): State<Name>| {
            let s = s.clone();
            async move {
                s.lock().unwrap().push(n);
                Ok::<(), HandlerError>(())
            }
        },
    );
    let outer = Router::new()
        .state(Name("outer"))
        .route_service(PaymentRequested::TYPE, inner);
    let event = arc(PaymentRequested {
        order_id: "1".into(),
    }
    .to_event()
    .unwrap());
    outer.handle(event, ctx()).await.unwrap();
    assert_eq!(*seen.lock().unwrap(), ["inner"]);
}

/// A registry whose schemas can be added while it is used.
#[derive(Default)]
struct GrowingRegistry(std::sync::Mutex<std::collections::HashMap<SchemaId, serde_json::Value>>);

#[async_trait::async_trait]
impl SchemaRegistry for GrowingRegistry {
    async fn schema(&self, id: &SchemaId) -> cloudbus::Result<Option<serde_json::Value>> {
        Ok(self.0.lock().unwrap().get(id).cloned())
    }
    async fn list(&self) -> cloudbus::Result<Vec<SchemaId>> {
        Ok(self.0.lock().unwrap().keys().cloned().collect())
    }
}

#[tokio::test]
async fn a_schema_registered_later_is_found_after_the_recheck_interval() {
    use cloudbus::{Checked, EventValidator};
    let registry = Arc::new(GrowingRegistry::default());
    let validator =
        SchemaValidator::new(registry.clone()).recheck_missing(Duration::from_millis(50));
    let bad = OrderCreated {
        order_id: "x".into(),
        customer: "c".into(),
        total_cents: 1,
    }
    .to_event()
    .unwrap();
    assert_eq!(validator.validate(&bad).await.unwrap(), Checked::NoSchema);
    registry.0.lock().unwrap().insert(
        SchemaId::new(OrderCreated::TYPE, 2),
        json!({"properties": {"order_id": {"pattern": "^order-"}}}),
    );
    // Still believed missing within the interval...
    assert_eq!(validator.validate(&bad).await.unwrap(), Checked::NoSchema);
    tokio::time::sleep(Duration::from_millis(60)).await;
    // ...and asked again after it.
    let e = validator.validate(&bad).await.unwrap_err();
    assert!(e.to_string().contains("/order_id"), "{e}");
}

// Issue 30: the router's wiring is checked when its worker starts, not per event.

/// The application's database: a state of the router.
#[derive(Clone)]
struct Db;

/// The start error of a worker that must not start.
fn start_error(started: cloudbus::Result<cloudbus::Worker>) -> cloudbus::Error {
    match started {
        Ok(_) => panic!("a miswired router started"),
        Err(e) => e,
    }
}

#[tokio::test]
async fn a_missing_state_fails_the_start_and_leaves_the_event_for_a_wired_worker() {
    let bus = bus_with("orders", "billing").await;
    bus.publisher("orders")
        .await
        .unwrap()
        .send(&order(1))
        .await
        .unwrap();
    let attempts = Arc::new(std::sync::Mutex::new(Vec::new()));
    let a = attempts.clone();
    let on_created = move |_: OrderCreated, ctx: Context, State(_db): State<Db>| {
        let a = a.clone();
        async move {
            a.lock().unwrap().push(ctx.attempt());
            Ok::<(), HandlerError>(())
        }
    };
    let consumer = bus.consumer("orders", "billing").await.unwrap();

    let e =
        start_error(consumer.start_worker(Router::new().route(on_created.clone()), fast_retries()));
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    let expected = format!(
        r#"route "com.example.order.created" takes State<{db}> but the router has no .state({db})"#,
        db = std::any::type_name::<Db>()
    );
    assert!(e.to_string().contains(&expected), "{e}");

    // Nothing was received: the event waits, at its first attempt, for a wired worker.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let worker = consumer
        .start_worker(Router::new().route(on_created).state(Db), fast_retries())
        .expect("the router's wiring");
    until("the order", || !attempts.lock().unwrap().is_empty()).await;
    let report = worker.shutdown(Duration::from_secs(5)).await;
    assert_eq!(*attempts.lock().unwrap(), [1]);
    assert_eq!(report.acked, 1, "{report:?}");
}

#[tokio::test]
async fn a_sender_without_a_publisher_fails_the_start() {
    let bus = bus_with("orders", "billing").await;
    bus.ensure_topic("payments").await.unwrap();
    bus.ensure_subscription(&SubscriptionSpec::new("payments", "audit"))
        .await
        .unwrap();
    let created = order(1).to_event().unwrap();
    bus.publisher("orders")
        .await
        .unwrap()
        .publish(created.clone())
        .await
        .unwrap();
    let attempts = Arc::new(std::sync::Mutex::new(Vec::new()));
    let a = attempts.clone();
    let on_created = move |order: OrderCreated, ctx: Context, sender: Sender| {
        let a = a.clone();
        async move {
            a.lock().unwrap().push(ctx.attempt());
            sender
                .send(&PaymentRequested {
                    order_id: order.order_id,
                })
                .await?;
            Ok::<(), HandlerError>(())
        }
    };
    let consumer = bus.consumer("orders", "billing").await.unwrap();

    let e =
        start_error(consumer.start_worker(Router::new().route(on_created.clone()), fast_retries()));
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert!(
        e.to_string().contains(
            r#"route "com.example.order.created" takes Sender but the router has no .publisher(..)"#
        ),
        "{e}"
    );

    // Nothing was received; with a publisher the same route starts and sends.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let payments = bus.publisher("payments").await.unwrap();
    let worker = consumer
        .start_worker(
            Router::new().route(on_created).publisher(payments),
            fast_retries(),
        )
        .expect("the router's wiring");
    until("the order", || worker.stats().acked == 1).await;
    worker.shutdown(Duration::from_secs(5)).await;
    assert_eq!(*attempts.lock().unwrap(), [1]);
    let delivery = bus
        .consumer("payments", "audit")
        .await
        .unwrap()
        .receive()
        .await
        .unwrap();
    let follow_up = delivery.event();
    assert_eq!(follow_up.ty(), PaymentRequested::TYPE);
    assert_eq!(follow_up.causation_id(), Some(created.id()));
    assert_eq!(follow_up.correlation_id(), Some(created.id()));
    delivery.ack().await.unwrap();
}

#[tokio::test]
async fn two_routes_for_one_type_fail_the_start_with_every_problem_named() {
    let bus = bus_with("payments", "svc").await;
    bus.publisher("payments")
        .await
        .unwrap()
        .send(&PaymentRequested {
            order_id: "1".into(),
        })
        .await
        .unwrap();
    let typed = |_: PaymentRequested| async { Ok::<(), HandlerError>(()) };
    let by_name = |RawEvent(_): RawEvent| async { Ok::<(), HandlerError>(()) };
    let router = Router::new()
        .route(typed)
        // The same type by name: it used to replace the typed route silently.
        .route_type(PaymentRequested::TYPE, by_name)
        .route_prefix("com.example.", by_name)
        .route_prefix("com.example.", by_name)
        .route(|_: OrderCreated, State(_db): State<Db>| async { Ok::<(), HandlerError>(()) });
    let checked = router.check().unwrap_err();
    let consumer = bus.consumer("payments", "svc").await.unwrap();

    let e = start_error(consumer.start_worker(router, fast_retries()));
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert_eq!(e.to_string(), checked.to_string());
    let message = e.to_string();
    for problem in [
        r#"two routes for "com.example.payment.requested""#,
        r#"two routes for prefix "com.example.""#,
        r#"route "com.example.order.created" takes State<"#,
    ] {
        assert!(message.contains(problem), "{problem:?} not in {message}");
    }

    // Nothing was received: one route for the type, and the event comes at attempt 1.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let attempts = Arc::new(std::sync::Mutex::new(Vec::new()));
    let a = attempts.clone();
    let worker = consumer
        .start_worker(
            Router::new().route(move |_: PaymentRequested, ctx: Context| {
                let a = a.clone();
                async move {
                    a.lock().unwrap().push(ctx.attempt());
                    Ok::<(), HandlerError>(())
                }
            }),
            fast_retries(),
        )
        .expect("the router's wiring");
    until("the payment", || !attempts.lock().unwrap().is_empty()).await;
    worker.shutdown(Duration::from_secs(5)).await;
    assert_eq!(*attempts.lock().unwrap(), [1]);
}

#[tokio::test]
async fn a_wired_router_with_state_publisher_layers_and_wrappers_starts() {
    #[derive(Clone)]
    struct Name(&'static str);
    let bus = bus_with("orders", "billing").await;
    bus.ensure_topic("payments").await.unwrap();
    bus.ensure_subscription(&SubscriptionSpec::new("payments", "audit"))
        .await
        .unwrap();
    let payments = bus.publisher("payments").await.unwrap();
    let nested = || {
        Router::new().route(
            |_: PaymentRequested, State(Name(name)): State<Name>| async move {
                assert_eq!(name, "inner");
                Ok::<(), HandlerError>(())
            },
        )
    };
    let router = Router::new()
        .route_with(
            |order: OrderCreated, State(_db): State<Db>, sender: Sender| async move {
                sender
                    .send(&PaymentRequested {
                        order_id: order.order_id,
                    })
                    .await?;
                Ok::<(), HandlerError>(())
            },
            ConcurrencyLimitLayer::new(4),
        )
        // A router routed to keeps (and is checked with) its own state.
        .route_service(PaymentRequested::TYPE, nested().state(Name("inner")))
        .layer(TimeoutLayer::new(Duration::from_secs(5)))
        .layer(IdempotencyLayer::new(Arc::new(MemoryDedupStore::new(100))))
        .state(Db)
        .publisher(payments);
    router.check().expect("the router's wiring");

    // Wrappers forward the check: an Arc of an Idempotent of the router starts.
    let wrapped = Arc::new(cloudbus::Idempotent::new(
        router,
        Arc::new(MemoryDedupStore::new(100)),
    ));
    let consumer = bus.consumer("orders", "billing").await.unwrap();
    let worker = consumer
        .start_worker(wrapped, fast_retries())
        .expect("the router's wiring");
    bus.publisher("orders")
        .await
        .unwrap()
        .send(&order(3))
        .await
        .unwrap();
    until("the order", || worker.stats().acked == 1).await;
    worker.shutdown(Duration::from_secs(5)).await;
    let delivery = bus
        .consumer("payments", "audit")
        .await
        .unwrap()
        .receive()
        .await
        .unwrap();
    assert_eq!(
        delivery
            .event()
            .decode::<PaymentRequested>()
            .unwrap()
            .order_id,
        "order-3"
    );
    delivery.ack().await.unwrap();

    // ...and so does a miswired one, nested router included, through the wrappers.
    let miswired = Router::new().route_service(PaymentRequested::TYPE, nested());
    let wrapped = Arc::new(cloudbus::Idempotent::new(
        miswired,
        Arc::new(MemoryDedupStore::new(100)),
    ));
    let e = start_error(consumer.start_worker(wrapped, fast_retries()));
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert!(
        e.to_string().contains(
            r#"route "com.example.payment.requested" is a router of its own, whose route "com.example.payment.requested" takes State<"#
        ),
        "{e}"
    );
}

#[tokio::test]
async fn a_stream_reader_checks_the_router_before_it_reads() {
    let broker = MemoryBroker::new();
    broker.ensure_log("orders-log", 1).unwrap();
    let bus = broker.bus();
    bus.publisher("orders-log")
        .await
        .unwrap()
        .send(&order(1))
        .await
        .unwrap();
    let seen = Arc::new(AtomicU32::new(0));
    let s = seen.clone();
    let on_created = move |_: OrderCreated, State(_db): State<Db>| {
        let s = s.clone();
        async move {
            s.fetch_add(1, Ordering::SeqCst);
            Ok::<(), HandlerError>(())
        }
    };
    let mut reader = bus
        .stream_consumer("orders-log", "analytics")
        .await
        .unwrap()
        .start_at(cloudbus::StartPosition::Earliest);
    let miswired = Router::new().route(on_created.clone());
    let ran = tokio::time::timeout(
        Duration::from_secs(5),
        reader.run(&miswired, Duration::from_millis(10), std::future::pending()),
    )
    .await
    .expect("run returns at once");
    let e = ran.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert!(
        e.to_string()
            .contains(r#"route "com.example.order.created" takes State<"#),
        "{e}"
    );
    let e = reader.poll(&miswired).await.unwrap_err();
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    assert_eq!(seen.load(Ordering::SeqCst), 0);

    let report = reader
        .catch_up(&Router::new().route(on_created).state(Db))
        .await
        .unwrap();
    assert_eq!(report.handled, 1);
    assert_eq!(seen.load(Ordering::SeqCst), 1);
}
