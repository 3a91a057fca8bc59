//! Google Cloud Pub/Sub for cloudbus, on the official `google-cloud-pubsub` crate.
//!
//! [`PubSubBus`] opens topics (publishers), subscriptions (streaming-pull consumers),
//! their dead-letter places and the topology (`ensure`), and adds Pub/Sub's replay:
//! seek to a time or a snapshot. CloudEvents travel in binary mode as `ce-` prefixed
//! attributes with the data as the message body (the convention of Google's own
//! eventing), or structured on request ([`PubSubConfig::structured`]).
//!
//! Connect with `pubsub://PROJECT`; `PUBSUB_EMULATOR_HOST` (or `?emulator=`) points it
//! at the emulator with anonymous credentials, otherwise Application Default
//! Credentials are used.
//!
//! ```no_run
//! # async fn run() -> cloudbus_driver::Result<()> {
//! use cloudbus_driver::{EventBuilder, SubscriptionSpec};
//! let bus = cloudbus_gcp::connect("pubsub://my-project").await?;
//! bus.ensure_topic("orders").await?;
//! bus.ensure_subscription(&SubscriptionSpec::new("orders", "billing")).await?;
//! let publisher = bus.publisher("orders").await?;
//! publisher.publish(EventBuilder::new("com.example.order.created", "/shop").build()?).await?;
//! # Ok(()) }
//! ```

mod auth;
mod bus;
mod capabilities;
mod config;
mod context;
mod error;
pub mod filter;
mod replay;
mod subscription;
mod topic;
mod topology;

use std::sync::Arc;

use cloudbus_core::Bus;
use cloudbus_driver::scheme::{self, Scheme};
use cloudbus_driver::{BusDriver, Result};

pub use bus::PubSubBus;
pub use capabilities::{MAX_BATCH_COUNT, MAX_MESSAGE_BYTES, capabilities};
pub use config::{
    ATTRIBUTE_PREFIX, CONTENT_TYPE_ATTRIBUTE, EMULATOR_HOST_ENV, MAX_ATTRIBUTES, PubSubConfig,
};
pub use subscription::{PubSubDeadLetters, PubSubSubscription};
pub use topic::PubSubTopic;
pub use topology::SubscriptionOptions;

/// The scheme this crate opens: `pubsub://PROJECT`.
pub fn schemes() -> Vec<Scheme> {
    vec![Scheme {
        name: "pubsub",
        open: |url| {
            Box::pin(async move {
                let bus = PubSubBus::new(PubSubConfig::from_url(url.as_str())?);
                Ok(Arc::new(bus) as Arc<dyn BusDriver>)
            })
        },
    }]
}

/// Opens `pubsub://PROJECT` as a [`Bus`].
pub async fn connect(url: &str) -> Result<Bus> {
    Ok(Bus::new(scheme::open(&schemes(), url).await?))
}
