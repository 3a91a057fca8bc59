//! # cloudbus
//!
//! One event-driven API (publish, consume, settle, dead-letter, replay) with
//! CloudEvents 1.0 envelopes over the clouds' brokers, and an embedded in-memory
//! broker as the default. Pick a provider with a cargo feature and a URL; service code
//! stays the same.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> cloudbus::Result<()> {
//! use cloudbus::{EventBuilder, SubscriptionSpec};
//! let bus = cloudbus::connect("mem://doc-example").await?;
//! bus.ensure_topic("orders").await?;
//! bus.ensure_subscription(&SubscriptionSpec::new("orders", "billing")).await?;
//! bus.publisher("orders").await?
//!     .publish(EventBuilder::new("com.example.order.created", "/orders").build()?)
//!     .await?;
//! let delivery = bus.consumer("orders", "billing").await?.receive().await?;
//! delivery.ack().await?;
//! # Ok(()) }
//! ```
//!
//! Typed events, a router of plain async functions, and tower layers:
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> cloudbus::Result<()> {
//! use std::time::Duration;
//! use cloudbus::router::layers::TimeoutLayer;
//! use cloudbus::{CloudEvent, Context, HandlerError, Router, SubscriptionSpec, WorkerOptions};
//!
//! #[derive(serde::Serialize, serde::Deserialize, CloudEvent)]
//! #[cloudevent(type = "com.example.order.created", version = 2, source = "/orders")]
//! struct OrderCreated {
//!     #[cloudevent(subject)]
//!     order_id: String,
//!     #[cloudevent(key)]
//!     customer: String,
//! }
//!
//! async fn on_created(order: OrderCreated, ctx: Context) -> Result<(), HandlerError> {
//!     println!("{} for {} (attempt {})", order.order_id, order.customer, ctx.attempt());
//!     Ok(())
//! }
//!
//! let bus = cloudbus::connect("mem://doc-typed").await?;
//! bus.ensure_topic("orders").await?;
//! bus.ensure_subscription(&SubscriptionSpec::new("orders", "billing")).await?;
//! let router = Router::new()
//!     .route(on_created)
//!     .layer(TimeoutLayer::new(Duration::from_secs(30)));
//! let worker = bus.consumer("orders", "billing").await?
//!     .start_worker(router, WorkerOptions::default())?; // checks the router's wiring first
//! let order = OrderCreated { order_id: "order-1".into(), customer: "c-7".into() };
//! bus.publisher("orders").await?.send(&order).await?;
//! # while worker.stats().acked < 1 { tokio::time::sleep(Duration::from_millis(10)).await; }
//! let report = worker.shutdown(Duration::from_secs(5)).await;
//! # assert_eq!(report.acked, 1);
//! # Ok(()) }
//! ```
//!
//! URLs: `mem://` (or `mem://NAME` for a separate in-process broker). The cloud
//! schemes (`sqs://`, `sns://`, `eventbridge://`, `kinesis://`, `servicebus://`,
//! `eventgrid://`, `pubsub://`) need their cargo feature; [`connect`] says which.

// What a service writes against: the portable layer's types, chosen (the README and
// the examples use these). What a provider implements is under [`driver`].
#[cfg(feature = "otel")]
pub use cloudbus_core::otel;
#[cfg(feature = "schema")]
pub use cloudbus_core::schema;
pub use cloudbus_core::{
    AttributesReader, AttributesWriter, CheckpointStore, Payload, RawMessage, Settlement,
    TopicDeadLetters, describe_payload,
};
pub use cloudbus_core::{
    Bus, Capabilities, Checked, Claim, CloudEvent, Consumer, ConsumerOptions, Context, Data,
    DeadLetter, DeadLetters, DecodeError, DecodeEventError, DecodeExt, DedupStore, Delivery, Error,
    ErrorKind, Event, EventBuilder, EventExt, EventValidator, ExtensionValue, Filter,
    FilterSupport, Handler, HandlerContext, HandlerError, Idempotent, LastError,
    MemoryCheckpointStore, MemoryDedupStore, Permanent, PollReport, PublishHandle, PublishOptions,
    Publisher, PublisherHealth, PublisherOptions, Result, RetryPolicy, Router, SendEvent,
    StartPosition, StreamConsumer, SubscriptionSpec, TraceContext, UnknownTypes, Worker,
    WorkerHealth, WorkerOptions, WorkerReport,
};
pub use cloudbus_core::{codec, router, telemetry, topology, typed};

/// The provider-facing contract (`cloudbus-driver`): the driver traits, the messages
/// they carry, the URL scheme registry and the parameters' parser. For writing or
/// wrapping a provider; a service does not need these.
pub mod driver {
    pub use cloudbus_driver::*;
}

/// `#[derive(CloudEvent)]` for application event types (see [`CloudEvent`]).
pub use cloudbus_macros::CloudEvent;

/// The embedded in-memory broker (feature `memory`, on by default).
#[cfg(feature = "memory")]
pub use cloudbus_memory as memory;

/// AWS: SQS, SNS, EventBridge, Kinesis (features `sqs`, `sns`, `eventbridge`, `kinesis`; `aws` = all).
#[cfg(any(feature = "sqs", feature = "kinesis"))]
pub use cloudbus_aws as aws;

/// Azure: Service Bus and Event Grid (features `servicebus`, `eventgrid`; `azure` = both).
#[cfg(any(feature = "servicebus", feature = "eventgrid"))]
pub use cloudbus_azure as azure;

/// Google Cloud Pub/Sub (feature `pubsub`, or `gcp`).
#[cfg(feature = "pubsub")]
pub use cloudbus_gcp as gcp;

/// Kafka and Azure Event Hubs' Kafka endpoint (feature `kafka`).
#[cfg(feature = "kafka")]
pub use cloudbus_kafka as kafka;

/// Durable dedup and checkpoint stores on PostgreSQL, SQLite and Redis (features
/// `postgres`, `sqlite`, `redis`).
#[cfg(any(feature = "postgres", feature = "sqlite", feature = "redis"))]
pub use cloudbus_store as store;

#[doc(hidden)]
pub mod fuzzing;

/// The environment variable [`connect_from_env`] reads.
pub const URL_ENV: &str = "CLOUDBUS_URL";

/// Every scheme cloudbus has a provider for, and the cargo feature that builds it
/// (for the error that names the feature to enable; the enabled providers register
/// their own openers, see [`schemes`]).
const FEATURE_OF_SCHEME: &[(&str, &str)] = &[
    ("mem", "memory"),
    ("sqs", "sqs"),
    ("sns", "sns"),
    ("eventbridge", "eventbridge"),
    ("kinesis", "kinesis"),
    ("servicebus", "servicebus"),
    ("eventgrid", "eventgrid"),
    ("pubsub", "pubsub"),
    ("kafka", "kafka"),
    ("eventhubs", "kafka"),
];

/// The URL schemes of the providers built in (their cargo features on), each as its
/// provider crate registers it.
pub fn schemes() -> Vec<driver::scheme::Scheme> {
    #[allow(unused_mut)]
    let mut schemes = Vec::new();
    #[cfg(feature = "memory")]
    schemes.extend(memory::schemes());
    #[cfg(any(feature = "sqs", feature = "kinesis"))]
    schemes.extend(aws::schemes());
    #[cfg(any(feature = "servicebus", feature = "eventgrid"))]
    schemes.extend(azure::schemes());
    #[cfg(feature = "pubsub")]
    schemes.extend(gcp::schemes());
    #[cfg(feature = "kafka")]
    schemes.extend(kafka::schemes());
    schemes
}

/// Opens a [`Bus`] from a URL such as `mem://` or `mem://tests`.
///
/// A scheme whose cargo feature is off gives [`ErrorKind::Unsupported`] naming the
/// feature to enable; an unknown scheme gives [`ErrorKind::InvalidArgument`].
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let bus = cloudbus::connect("mem://docs").await.unwrap();
/// assert_eq!(bus.scheme(), "mem");
/// let e = cloudbus::connect("smoke-signals://hill").await.unwrap_err();
/// assert_eq!(e.kind(), cloudbus::ErrorKind::InvalidArgument);
/// # });
/// ```
pub async fn connect(url: &str) -> Result<Bus> {
    let parsed = driver::scheme::parse(url)?;
    let name = parsed.scheme();
    if let Some(scheme) = driver::scheme::find(&schemes(), name) {
        return Ok(Bus::new((scheme.open)(parsed).await?));
    }
    match FEATURE_OF_SCHEME.iter().find(|(s, _)| *s == name) {
        Some((_, feature)) => Err(Error::unsupported(format!(
            "the {name}:// provider needs the cargo feature `{feature}` of cloudbus; enable it in Cargo.toml"
        ))),
        None => {
            let known: Vec<&str> = FEATURE_OF_SCHEME.iter().map(|(s, _)| *s).collect();
            Err(Error::invalid(format!(
                "unknown URL scheme {name:?}; cloudbus knows {}",
                known.join(", ")
            )))
        }
    }
}

/// Opens the [`Bus`] named by `CLOUDBUS_URL`, or `default` when it is unset.
pub async fn connect_from_env(default: &str) -> Result<Bus> {
    let url = std::env::var(URL_ENV).unwrap_or_else(|_| default.to_owned());
    connect(&url).await
}

/// The README's code, compiled and run as a doc test so that it stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
