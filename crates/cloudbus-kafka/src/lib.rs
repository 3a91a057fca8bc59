//! Kafka for cloudbus, on rdkafka (librdkafka, built from source): Apache Kafka,
//! Redpanda, Amazon MSK (SASL/SCRAM), Confluent Cloud, and Azure Event Hubs' Kafka
//! endpoint, with the CloudEvents Kafka protocol binding (binary mode with `ce_`
//! headers by default, structured with `?mode=structured`).
//!
//! - `kafka://host:port[,host:port...]` (or `kafka://` with
//!   `KAFKA_BOOTSTRAP_SERVERS`), `eventhubs://NAMESPACE.servicebus.windows.net` (or
//!   `eventhubs://` with `EVENTHUBS_CONNECTION_STRING`).
//! - Topics are Kafka topics, the ordering key is the record key, a subscription is a
//!   consumer group with per-record settlement, a retry topic and a dead-letter topic
//!   ([`retry_topic`], [`dead_letter_topic`]); a stream reads a topic's partitions,
//!   and a stream reader group is a consumer group whose committed offsets are its
//!   checkpoints ([`GroupCheckpoints`]).
//!
//! ```no_run
//! # async fn run() -> cloudbus_driver::Result<()> {
//! use cloudbus_driver::{EventBuilder, SubscriptionSpec};
//! let bus = cloudbus_kafka::connect("kafka://127.0.0.1:9092").await?;
//! bus.ensure_topic("orders").await?;
//! bus.ensure_subscription(&SubscriptionSpec::new("orders", "billing").max_delivery_attempts(5)).await?;
//! bus.publisher("orders").await?
//!     .publish(EventBuilder::new("com.example.order.created", "/shop").build()?)
//!     .await?;
//! # Ok(()) }
//! ```

mod binding;
mod bus;
mod checkpoints;
mod config;
mod connection;
mod dead_letters;
mod error;
mod headers;
mod incremental_configs;
mod producer;
mod received;
mod stream;
mod subscription;
mod topology;

use std::sync::Arc;

use cloudbus_core::Bus;
use cloudbus_driver::scheme::Scheme;
use cloudbus_driver::{BusDriver, Result};

pub use binding::{ContentMode, KafkaRecord};
pub use bus::KafkaBus;
pub use checkpoints::GroupCheckpoints;
pub use config::{Flavor, KafkaConfig, is_secret_setting};
pub use connection::{dead_letter_topic, retry_topic, stream_group};
pub use dead_letters::KafkaDeadLetters;
pub use producer::{KafkaTopic, MAX_BATCH_COUNT, capabilities};
pub use stream::KafkaStream;
pub use subscription::KafkaSubscription;
pub use topology::KafkaTopology;

/// The schemes this crate opens: `kafka://` and `eventhubs://`.
pub fn schemes() -> Vec<Scheme> {
    vec![
        Scheme {
            name: "kafka",
            open: |url| Box::pin(open(url)),
        },
        Scheme {
            name: "eventhubs",
            open: |url| Box::pin(open(url)),
        },
    ]
}

/// Opens a `kafka://` or `eventhubs://` URL as a [`Bus`].
pub async fn connect(url: &str) -> Result<Bus> {
    Ok(Bus::new(
        cloudbus_driver::scheme::open(&schemes(), url).await?,
    ))
}

/// Opens the bus driver of a parsed URL (the server list as
/// [`scheme::parse`](cloudbus_driver::scheme::parse) encodes it).
async fn open(url: url::Url) -> Result<Arc<dyn BusDriver>> {
    if !url.username().is_empty() || url.password().is_some() {
        // Not naming the URL: it holds a credential.
        return Err(cloudbus_driver::Error::invalid(format!(
            "a {}:// URL takes no user or password (credentials come from the environment: see the README)",
            url.scheme()
        )));
    }
    if !matches!(url.path(), "" | "/") {
        return Err(cloudbus_driver::Error::invalid(format!(
            "a {}:// URL has no path (got {:?}): name topics when opening them",
            url.scheme(),
            url.path()
        )));
    }
    let hosts = cloudbus_driver::scheme::host_list(&url).join(",");
    let text = match url.query() {
        Some(q) => format!("{}://{hosts}?{q}", url.scheme()),
        None => format!("{}://{hosts}", url.scheme()),
    };
    let config = KafkaConfig::from_url(&text)?;
    Ok(Arc::new(KafkaBus::new(config)?))
}
