//! AWS for cloudbus, on the official `aws-sdk-*` crates and `aws-config`: the standard
//! credential chain and region, and `AWS_ENDPOINT_URL` honoured (LocalStack).
//!
//! Today: Amazon SQS, standard and FIFO queues (feature `sqs`), and SNS with SQS
//! subscriptions (feature `sns`), EventBridge with SQS-targeted rules (feature
//! `eventbridge`), and Kinesis Data Streams (feature `kinesis`).
//!
//! ```no_run
//! # async fn run() -> cloudbus_driver::Result<()> {
//! use cloudbus_driver::{EventBuilder, SubscriptionSpec};
//! let bus = cloudbus_aws::connect("sqs://").await?;
//! bus.ensure_topic("orders").await?;
//! bus.ensure_subscription(&SubscriptionSpec::new("orders", "orders").max_delivery_attempts(5)).await?;
//! bus.publisher("orders").await?
//!     .publish(EventBuilder::new("com.example.order.created", "/shop").build()?)
//!     .await?;
//! # Ok(()) }
//! ```

#[cfg(feature = "eventbridge")]
pub mod eventbridge;
#[cfg(feature = "kinesis")]
pub mod kinesis;
#[cfg(feature = "sns")]
pub mod sns;
#[cfg(feature = "sqs")]
pub mod sqs;

mod batch;
mod config;
mod error;
#[cfg(any(feature = "sns", feature = "eventbridge"))]
mod filter;
#[cfg(any(feature = "sns", feature = "eventbridge"))]
mod sqs_subscriptions;

#[cfg(any(feature = "sqs", feature = "kinesis"))]
use std::sync::Arc;

use cloudbus_core::Bus;
#[cfg(any(feature = "sqs", feature = "kinesis"))]
use cloudbus_driver::BusDriver;
use cloudbus_driver::Result;
#[cfg(any(feature = "sqs", feature = "kinesis"))]
use cloudbus_driver::config::UrlParams;
use cloudbus_driver::scheme::Scheme;
pub use config::ENDPOINT_ENV;
#[cfg(any(feature = "sqs", feature = "kinesis"))]
use config::load_config;

/// The schemes this crate opens, those of its enabled features: `sqs://`, `sns://`
/// (`?mode=structured`), `eventbridge://` (`?archive_days=N`) and `kinesis://`.
// One push per enabled feature: a `vec![]` cannot leave out the disabled ones.
#[allow(clippy::vec_init_then_push)]
pub fn schemes() -> Vec<Scheme> {
    let mut schemes = Vec::new();
    #[cfg(feature = "sqs")]
    schemes.push(Scheme {
        name: "sqs",
        open: |url| Box::pin(open_sqs(url)),
    });
    #[cfg(feature = "sns")]
    schemes.push(Scheme {
        name: "sns",
        open: |url| Box::pin(open_sns(url)),
    });
    #[cfg(feature = "kinesis")]
    schemes.push(Scheme {
        name: "kinesis",
        open: |url| Box::pin(open_kinesis(url)),
    });
    #[cfg(feature = "eventbridge")]
    schemes.push(Scheme {
        name: "eventbridge",
        open: |url| Box::pin(open_eventbridge(url)),
    });
    schemes
}

/// Opens an AWS URL (one of [`schemes`]) as a [`Bus`].
pub async fn connect(url: &str) -> Result<Bus> {
    Ok(Bus::new(
        cloudbus_driver::scheme::open(&schemes(), url).await?,
    ))
}

#[cfg(feature = "sqs")]
async fn open_sqs(url: url::Url) -> Result<Arc<dyn BusDriver>> {
    let params = UrlParams::parse(&url, &["region", "endpoint"])?;
    Ok(Arc::new(sqs::SqsBus::new(&load_config(&params).await)))
}

#[cfg(feature = "sns")]
async fn open_sns(url: url::Url) -> Result<Arc<dyn BusDriver>> {
    let params = UrlParams::parse(&url, &["region", "endpoint", "mode"])?;
    let structured = params.choice("mode", &["binary", "structured"])? == Some("structured");
    let bus = sns::SnsBus::new(&load_config(&params).await);
    Ok(Arc::new(if structured { bus.structured() } else { bus }))
}

#[cfg(feature = "kinesis")]
async fn open_kinesis(url: url::Url) -> Result<Arc<dyn BusDriver>> {
    let params = UrlParams::parse(&url, &["region", "endpoint"])?;
    Ok(Arc::new(kinesis::KinesisBus::new(
        &load_config(&params).await,
    )))
}

#[cfg(feature = "eventbridge")]
async fn open_eventbridge(url: url::Url) -> Result<Arc<dyn BusDriver>> {
    let params = UrlParams::parse(&url, &["region", "endpoint", "archive_days"])?;
    let archive_days = params.parsed::<u32>("archive_days")?;
    let bus = eventbridge::EventBridgeBus::new(&load_config(&params).await);
    Ok(Arc::new(match archive_days {
        Some(days) => bus.with_archive(days),
        None => bus,
    }))
}
