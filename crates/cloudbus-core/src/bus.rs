//! [`Bus`]: one connection to a provider, from which topics, subscriptions,
//! dead-letter places, streams and the topology are opened by name. This is what
//! `cloudbus::connect(url)` returns, so service code does not change with the cloud.

use std::sync::Arc;

use crate::consumer::{Consumer, ConsumerOptions};
use crate::dead_letters::DeadLetters;
use crate::publisher::{Publisher, PublisherOptions};
use crate::spans::Destination;
use crate::stream::StreamConsumer;
use cloudbus_driver::driver::{BusDriver, SubscriptionSpec};
use cloudbus_driver::error::Result;

/// A connection to one provider.
///
/// ```
/// # async fn demo(bus: cloudbus_core::Bus) -> cloudbus_core::Result<()> {
/// use cloudbus_core::{EventBuilder, SubscriptionSpec};
/// bus.ensure_topic("orders").await?;
/// bus.ensure_subscription(&SubscriptionSpec::new("orders", "billing")).await?;
/// let publisher = bus.publisher("orders").await?;
/// let consumer = bus.consumer("orders", "billing").await?;
/// publisher.publish(EventBuilder::new("order.created", "/shop").build()?).await?;
/// consumer.receive().await?.ack().await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Bus {
    driver: Arc<dyn BusDriver>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus")
            .field("scheme", &self.driver.scheme())
            .finish_non_exhaustive()
    }
}

impl Bus {
    /// Wraps a provider's bus driver.
    pub fn new(driver: Arc<dyn BusDriver>) -> Self {
        Bus { driver }
    }
    /// The URL scheme of the provider.
    pub fn scheme(&self) -> &str {
        self.driver.scheme()
    }
    /// A publisher for `topic` with default options.
    pub async fn publisher(&self, topic: &str) -> Result<Publisher> {
        self.publisher_with(topic, PublisherOptions::default())
            .await
    }
    /// A publisher for `topic`.
    pub async fn publisher_with(
        &self,
        topic: &str,
        options: PublisherOptions,
    ) -> Result<Publisher> {
        Ok(Publisher::for_destination(
            self.driver.topic(topic).await?,
            options,
            Destination::new(self.scheme(), topic),
        ))
    }
    /// A consumer of `subscription` on `topic`, named after the subscription.
    pub async fn consumer(&self, topic: &str, subscription: &str) -> Result<Consumer> {
        self.consumer_with(topic, subscription, ConsumerOptions::default())
            .await
    }
    /// A consumer with options.
    pub async fn consumer_with(
        &self,
        topic: &str,
        subscription: &str,
        mut options: ConsumerOptions,
    ) -> Result<Consumer> {
        options.name.get_or_insert_with(|| subscription.to_owned());
        Ok(Consumer::for_destination(
            self.driver.subscription(topic, subscription).await?,
            options,
            Destination::new(self.scheme(), topic).subscription(subscription),
        ))
    }
    /// The dead-letter place of `subscription` on `topic`.
    pub async fn dead_letters(&self, topic: &str, subscription: &str) -> Result<DeadLetters> {
        Ok(DeadLetters::new(
            self.driver.dead_letters(topic, subscription).await?,
        ))
    }
    /// A stream consumer group over the partitioned log `stream`.
    pub async fn stream_consumer(&self, stream: &str, group: &str) -> Result<StreamConsumer> {
        Ok(StreamConsumer::new(
            self.driver.stream(stream).await?,
            group,
        ))
    }
    /// Makes sure `topic` exists.
    pub async fn ensure_topic(&self, topic: &str) -> Result<()> {
        self.driver.topology().ensure_topic(topic).await
    }
    /// Makes sure the subscription exists as specified.
    pub async fn ensure_subscription(&self, spec: &SubscriptionSpec) -> Result<()> {
        self.driver.topology().ensure_subscription(spec).await
    }
    /// Deletes a subscription if it exists.
    pub async fn delete_subscription(&self, topic: &str, name: &str) -> Result<()> {
        self.driver
            .topology()
            .delete_subscription(topic, name)
            .await
    }
    /// Delivers again to `subscription` of `topic` the events published since `since`
    /// (Pub/Sub seek, EventBridge archive replay); they arrive asynchronously as new
    /// deliveries. `Unsupported` where the provider has no such thing: see
    /// [`Capabilities::replay`](cloudbus_driver::Capabilities::replay).
    ///
    /// ```no_run
    /// # async fn run(bus: cloudbus_core::Bus) -> cloudbus_core::Result<()> {
    /// // Re-process the last hour after fixing a bug in the handler.
    /// bus.replay("orders", "billing", chrono::Utc::now() - chrono::Duration::hours(1)).await?;
    /// # Ok(()) }
    /// ```
    pub async fn replay(
        &self,
        topic: &str,
        subscription: &str,
        since: chrono::DateTime<chrono::Utc>,
    ) -> Result<()> {
        self.driver
            .topology()
            .replay(topic, subscription, since)
            .await
    }
    /// The provider's bus driver, for escape hatches.
    pub fn driver(&self) -> &Arc<dyn BusDriver> {
        &self.driver
    }

    /// The bus driver as its own type `D`, when it is one (an escape hatch to the
    /// provider's client); `None` for another driver.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # struct Client;
    /// # #[async_trait::async_trait]
    /// # impl cloudbus_core::driver::TopologyDriver for Client {
    /// #     async fn ensure_topic(&self, _: &str) -> cloudbus_core::Result<()> { Ok(()) }
    /// #     async fn ensure_subscription(&self, _: &cloudbus_core::SubscriptionSpec) -> cloudbus_core::Result<()> { Ok(()) }
    /// #     async fn delete_subscription(&self, _: &str, _: &str) -> cloudbus_core::Result<()> { Ok(()) }
    /// # }
    /// # #[async_trait::async_trait]
    /// # impl cloudbus_core::BusDriver for Client {
    /// #     fn scheme(&self) -> &str { "doc" }
    /// #     async fn topic(&self, t: &str) -> cloudbus_core::Result<Arc<dyn cloudbus_core::TopicDriver>> { Err(cloudbus_core::Error::not_found(t)) }
    /// #     fn topology(&self) -> Arc<dyn cloudbus_core::TopologyDriver> { Arc::new(Client) }
    /// # }
    /// let bus = cloudbus_core::Bus::new(Arc::new(Client));
    /// assert!(bus.downcast::<Client>().is_some());
    /// assert!(bus.downcast::<String>().is_none());
    /// ```
    pub fn downcast<D: std::any::Any>(&self) -> Option<&D> {
        self.driver.as_ref().as_any().downcast_ref::<D>()
    }
}
