//! Azure for cloudbus.
//!
//! - Azure Service Bus (feature `servicebus`): queues, and topics with subscriptions,
//!   over AMQP 1.0 (fe2o3-amqp, CBS and `$management`): batched sends, scheduled delivery,
//!   sessions for ordering keys, duplicate detection, peek-lock consumers, the
//!   dead-letter sub-queue, and subscription rules compiled from the portable filter.
//! - Azure Event Grid (feature `eventgrid`): publishing CloudEvents to a topic
//!   endpoint with a key or a SAS token, and a push consumer, an HTTP endpoint (axum)
//!   that answers Event Grid's validation handshakes and runs the same handlers as
//!   every other consumer.
//!
//! ```no_run
//! # async fn run() -> cloudbus_core::Result<()> {
//! use cloudbus_core::EventBuilder;
//! // EVENTGRID_ENDPOINT and EVENTGRID_KEY name the topic and its key.
//! let bus = cloudbus_azure::connect("eventgrid://").await?;
//! bus.publisher("orders").await?
//!     .publish(EventBuilder::new("com.example.order.created", "/shop").build()?)
//!     .await?;
//! # Ok(()) }
//! ```

mod auth;
#[cfg(any(feature = "eventgrid", feature = "servicebus"))]
mod error;
#[cfg(feature = "eventgrid")]
pub mod eventgrid;
#[cfg(feature = "servicebus")]
pub mod servicebus;

pub use auth::Secret;
use cloudbus_core::Bus;
use cloudbus_driver::Result;
use cloudbus_driver::scheme::{self, Scheme};

/// The schemes this crate opens, those of its enabled features:
/// - `servicebus://` (see [`servicebus::ServiceBusConfig::from_url`]: connection string
///   from `SERVICEBUS_CONNECTION_STRING`; `?entity=queue`, `?sessions=true`,
///   `?mode=structured`, `?prefix=cloudEvents:`, `?management=URL`);
/// - `eventgrid://` (see [`eventgrid::EventGridConfig::from_url`]: endpoint and key
///   from `EVENTGRID_ENDPOINT` / `EVENTGRID_KEY`, or `EVENTGRID_SAS_TOKEN`;
///   `?endpoint=URL` overrides the endpoint).
pub fn schemes() -> Vec<Scheme> {
    #[allow(unused_mut)]
    let mut schemes = Vec::new();
    #[cfg(feature = "servicebus")]
    schemes.push(Scheme {
        name: "servicebus",
        open: |url| {
            Box::pin(async move {
                let config = servicebus::ServiceBusConfig::from_url(&url)?;
                let driver = servicebus::ServiceBusBus::connect(config).await?;
                Ok(std::sync::Arc::new(driver) as std::sync::Arc<dyn cloudbus_driver::BusDriver>)
            })
        },
    });
    #[cfg(feature = "eventgrid")]
    schemes.push(Scheme {
        name: "eventgrid",
        open: |url| {
            Box::pin(async move {
                let config = eventgrid::EventGridConfig::from_url(&url)?;
                let driver = eventgrid::EventGridBus::new(config)?;
                Ok(std::sync::Arc::new(driver) as std::sync::Arc<dyn cloudbus_driver::BusDriver>)
            })
        },
    });
    schemes
}

/// Opens an Azure URL (one of [`schemes`]) as a [`Bus`].
pub async fn connect(url: &str) -> Result<Bus> {
    Ok(Bus::new(scheme::open(&schemes(), url).await?))
}
