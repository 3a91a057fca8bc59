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
//! URLs: `mem://` (or `mem://NAME` for a separate in-process broker). The cloud
//! schemes (`sqs://`, `sns://`, `eventbridge://`, `kinesis://`, `servicebus://`,
//! `eventgrid://`, `pubsub://`) need their cargo feature; [`connect`] says which.

pub use cloudbus_core::*;

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

#[doc(hidden)]
pub mod fuzzing;

/// The environment variable [`connect_from_env`] reads.
pub const URL_ENV: &str = "CLOUDBUS_URL";

/// Which cargo feature serves each URL scheme.
const SCHEMES: &[(&str, &str)] = &[
    ("mem", "memory"),
    ("sqs", "sqs"),
    ("sns", "sns"),
    ("eventbridge", "eventbridge"),
    ("kinesis", "kinesis"),
    ("servicebus", "servicebus"),
    ("eventgrid", "eventgrid"),
    ("pubsub", "pubsub"),
];

/// Opens a [`Bus`] from a URL such as `mem://` or `mem://tests`.
///
/// A scheme whose cargo feature is off gives [`ErrorKind::Unsupported`] naming the
/// feature to enable; an unknown scheme gives [`ErrorKind::InvalidArgument`].
pub async fn connect(url: &str) -> Result<Bus> {
    let parsed = url::Url::parse(url).map_err(|e| {
        Error::with_source(
            ErrorKind::InvalidArgument,
            format!("{url:?} is not a URL (try mem://)"),
            e,
        )
    })?;
    let scheme = parsed.scheme();
    let Some((_, feature)) = SCHEMES.iter().find(|(s, _)| *s == scheme) else {
        let known: Vec<&str> = SCHEMES.iter().map(|(s, _)| *s).collect();
        return Err(Error::invalid(format!(
            "unknown URL scheme {scheme:?}; cloudbus knows {}",
            known.join(", ")
        )));
    };
    match scheme {
        #[cfg(feature = "memory")]
        "mem" => {
            let name = parsed
                .host_str()
                .filter(|h| !h.is_empty())
                .unwrap_or("default");
            Ok(memory::MemoryBroker::named(name).bus())
        }
        #[cfg(feature = "pubsub")]
        "pubsub" => gcp::connect(url).await,
        #[cfg(feature = "sqs")]
        "sqs" => aws::connect(url).await,
        #[cfg(feature = "sns")]
        "sns" => aws::connect(url).await,
        #[cfg(feature = "eventbridge")]
        "eventbridge" => aws::connect(url).await,
        #[cfg(feature = "kinesis")]
        "kinesis" => aws::connect(url).await,
        #[cfg(feature = "eventgrid")]
        "eventgrid" => azure::connect(url).await,
        #[cfg(feature = "servicebus")]
        "servicebus" => azure::connect(url).await,
        _ if !feature_enabled(feature) => Err(Error::unsupported(format!(
            "the {scheme}:// provider needs the cargo feature `{feature}` of cloudbus; enable it in Cargo.toml"
        ))),
        _ => Err(Error::unsupported(format!(
            "the {scheme}:// provider is declared (feature `{feature}`) but not part of this release yet"
        ))),
    }
}

/// Opens the [`Bus`] named by `CLOUDBUS_URL`, or `default` when it is unset.
pub async fn connect_from_env(default: &str) -> Result<Bus> {
    let url = std::env::var(URL_ENV).unwrap_or_else(|_| default.to_owned());
    connect(&url).await
}

// With every feature on, each arm is `true`; the match keeps one arm per feature.
#[allow(clippy::match_like_matches_macro)]
fn feature_enabled(feature: &str) -> bool {
    match feature {
        "memory" => cfg!(feature = "memory"),
        "sqs" => cfg!(feature = "sqs"),
        "sns" => cfg!(feature = "sns"),
        "eventbridge" => cfg!(feature = "eventbridge"),
        "kinesis" => cfg!(feature = "kinesis"),
        "servicebus" => cfg!(feature = "servicebus"),
        "eventgrid" => cfg!(feature = "eventgrid"),
        "pubsub" => cfg!(feature = "pubsub"),
        _ => false,
    }
}

/// The README's code, compiled and run as a doc test so that it stays true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
