//! Pub/Sub as a cloudbus provider: the bus driver that hands out topics,
//! subscriptions, their dead-letter places and the topology, and Pub/Sub's own
//! replay (seek to a time or a snapshot) and subscription options.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use cloudbus_core::Bus;
use cloudbus_driver::{
    BusDriver, DeadLetterDriver, Error, Result, StreamDriver, SubscriptionDriver, SubscriptionSpec,
    TopicDriver, TopologyDriver,
};

use crate::config::PubSubConfig;
use crate::context::PubSubContext;
use crate::replay;
use crate::subscription::{PubSubDeadLetters, PubSubSubscription, Pulls};
use crate::topic::PubSubTopic;
use crate::topology::{self, PubSubTopology, SubscriptionOptions};

/// Google Cloud Pub/Sub as a cloudbus provider.
///
/// Beyond the portable surface it offers Pub/Sub's replay (seek to a time, snapshots)
/// and subscription options such as exactly-once delivery; reach it from a [`Bus`]
/// with `(**bus.driver()).as_any().downcast_ref::<PubSubBus>()` (with
/// `cloudbus_driver::AsAny` in scope).
///
/// ```no_run
/// # async fn run() -> cloudbus_driver::Result<()> {
/// use cloudbus_driver::SubscriptionSpec;
/// use cloudbus_gcp::{PubSubBus, PubSubConfig, SubscriptionOptions};
/// let pubsub = PubSubBus::new(PubSubConfig::new("my-project").emulator("127.0.0.1:8085"));
/// let bus = pubsub.clone().into_bus();
/// bus.ensure_topic("orders").await?;
/// let spec = SubscriptionSpec::new("orders", "audit").ordered(false);
/// pubsub
///     .ensure_subscription_with(&spec, &SubscriptionOptions::default().retain_acked())
///     .await?;
/// // Later: read the last hour again.
/// pubsub.seek_to_time("audit", chrono::Utc::now() - chrono::Duration::hours(1)).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PubSubBus {
    shared: Arc<PubSubContext>,
    /// The streaming pulls of this bus (and of its clones).
    pulls: Arc<Pulls>,
}

impl std::fmt::Debug for PubSubBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PubSubBus")
            .field("project", &self.shared.config.project)
            .field("endpoint", &self.shared.config.endpoint)
            .finish()
    }
}

impl PubSubBus {
    /// A bus over `config`; clients are built on first use.
    pub fn new(config: PubSubConfig) -> Self {
        let shared = Arc::new(PubSubContext::new(config));
        PubSubBus {
            pulls: Arc::new(Pulls::new(shared.clone())),
            shared,
        }
    }

    /// Wraps this driver in the portable [`Bus`].
    pub fn into_bus(self) -> Bus {
        Bus::new(Arc::new(self))
    }

    /// The configuration.
    pub fn config(&self) -> &PubSubConfig {
        &self.shared.config
    }

    /// Makes sure a subscription exists, with Pub/Sub options beyond the portable spec
    /// (exactly-once delivery, keeping acked messages for seek).
    pub async fn ensure_subscription_with(
        &self,
        spec: &SubscriptionSpec,
        options: &SubscriptionOptions,
    ) -> Result<()> {
        topology::ensure_subscription(&self.shared, spec, options).await
    }

    /// Replays (or skips) by time: messages published after `time` become unacked,
    /// those before it acked. Replaying acked messages needs a subscription that keeps
    /// them ([`SubscriptionOptions::retain_acked`]). Acks are sent in the background:
    /// settle with confirmed acks (exactly-once) or give them time before seeking.
    pub async fn seek_to_time(&self, subscription: &str, time: DateTime<Utc>) -> Result<()> {
        replay::seek_to_time(&self.shared, subscription, time).await
    }

    /// Records the subscription's acknowledgement state as `snapshot`.
    pub async fn create_snapshot(&self, subscription: &str, snapshot: &str) -> Result<()> {
        replay::create_snapshot(&self.shared, subscription, snapshot).await
    }

    /// Restores the acknowledgement state recorded in `snapshot`: what was unacked
    /// then is delivered again.
    pub async fn seek_to_snapshot(&self, subscription: &str, snapshot: &str) -> Result<()> {
        replay::seek_to_snapshot(&self.shared, subscription, snapshot).await
    }

    /// Deletes a snapshot.
    pub async fn delete_snapshot(&self, snapshot: &str) -> Result<()> {
        replay::delete_snapshot(&self.shared, snapshot).await
    }
}

#[async_trait]
impl BusDriver for PubSubBus {
    fn scheme(&self) -> &str {
        "pubsub"
    }

    async fn topic(&self, topic: &str) -> Result<Arc<dyn TopicDriver>> {
        Ok(Arc::new(PubSubTopic::new(self.shared.clone(), topic)))
    }

    async fn subscription(
        &self,
        _topic: &str,
        subscription: &str,
    ) -> Result<Arc<dyn SubscriptionDriver>> {
        Ok(Arc::new(PubSubSubscription::new(&self.pulls, subscription)))
    }

    async fn dead_letters(
        &self,
        _topic: &str,
        subscription: &str,
    ) -> Result<Arc<dyn DeadLetterDriver>> {
        Ok(Arc::new(PubSubDeadLetters::new(&self.pulls, subscription)))
    }

    fn topology(&self) -> Arc<dyn TopologyDriver> {
        Arc::new(PubSubTopology {
            shared: self.shared.clone(),
        })
    }

    async fn stream(&self, stream: &str) -> Result<Arc<dyn StreamDriver>> {
        Err(Error::unsupported(format!(
            "Pub/Sub has no partitioned logs to read {stream:?} as a stream; replay a \
             subscription with PubSubBus::seek_to_time or seek_to_snapshot"
        )))
    }
}
