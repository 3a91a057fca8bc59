//! AWS for cloudbus, on the official `aws-sdk-*` crates and `aws-config`: the standard
//! credential chain and region, and `AWS_ENDPOINT_URL` honoured (LocalStack).
//!
//! Today: Amazon SQS, standard and FIFO queues (feature `sqs`), and SNS with SQS
//! subscriptions (feature `sns`), EventBridge with SQS-targeted rules (feature
//! `eventbridge`), and Kinesis Data Streams (feature `kinesis`).
//!
//! ```no_run
//! # async fn run() -> cloudbus_core::Result<()> {
//! use cloudbus_core::{EventBuilder, SubscriptionSpec};
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

#[cfg(any(feature = "sns", feature = "eventbridge"))]
use cloudbus_core::Error;
use cloudbus_core::{Bus, Result};
pub use config::ENDPOINT_ENV;
use config::load_config;
#[cfg(any(feature = "sns", feature = "eventbridge"))]
use config::url_param;

/// The schemes this crate opens, those of its enabled features: `sqs://`, `sns://`
/// (`?mode=structured`), `eventbridge://` (`?archive_days=N`) and `kinesis://`.
pub fn schemes() -> Vec<cloudbus_core::scheme::Scheme> {
    use cloudbus_core::scheme::Scheme;
    let mut schemes = Vec::new();
    #[cfg(feature = "sqs")]
    schemes.push(Scheme {
        name: "sqs",
        open: |url| {
            Box::pin(async move { Ok(sqs::SqsBus::new(&load_config(&url, &[]).await?).into_bus()) })
        },
    });
    #[cfg(feature = "sns")]
    schemes.push(Scheme {
        name: "sns",
        open: |url| Box::pin(open_sns(url)),
    });
    #[cfg(feature = "kinesis")]
    schemes.push(Scheme {
        name: "kinesis",
        open: |url| {
            Box::pin(async move {
                Ok(kinesis::KinesisBus::new(&load_config(&url, &[]).await?).into_bus())
            })
        },
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
    cloudbus_core::scheme::open(&schemes(), url).await
}

#[cfg(feature = "sns")]
async fn open_sns(url: url::Url) -> Result<Bus> {
    let bus = sns::SnsBus::new(&load_config(&url, &["mode"]).await?);
    match url_param(&url, "mode").as_deref() {
        None | Some("binary") => Ok(bus.into_bus()),
        Some("structured") => Ok(bus.structured().into_bus()),
        Some(other) => Err(Error::invalid(format!(
            "sns:// mode must be binary or structured, not {other:?}"
        ))),
    }
}

#[cfg(feature = "eventbridge")]
async fn open_eventbridge(url: url::Url) -> Result<Bus> {
    let bus = eventbridge::EventBridgeBus::new(&load_config(&url, &["archive_days"]).await?);
    match url_param(&url, "archive_days") {
        None => Ok(bus.into_bus()),
        Some(days) => {
            let days = days.parse::<u32>().map_err(|_| {
                Error::invalid(format!(
                    "eventbridge:// archive_days must be a number of days, not {days:?}"
                ))
            })?;
            Ok(bus.with_archive(days).into_bus())
        }
    }
}
