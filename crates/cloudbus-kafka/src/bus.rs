//! The connection to one Kafka cluster (or Event Hubs namespace) as cloudbus's
//! [`BusDriver`]: it opens topics, subscriptions, dead-letter places and streams by
//! name, each on the connection's shared clients.

use std::sync::Arc;

use async_trait::async_trait;
use cloudbus_driver::{
    BusDriver, DeadLetterDriver, Result, StreamDriver, SubscriptionDriver, TopicDriver,
    TopologyDriver,
};

use crate::config::KafkaConfig;
use crate::connection::Shared;
use crate::dead_letters::KafkaDeadLetters;
use crate::producer::KafkaTopic;
use crate::stream::KafkaStream;
use crate::subscription::KafkaSubscription;
use crate::topology::KafkaTopology;

/// One Kafka cluster, as cloudbus's [`BusDriver`].
pub struct KafkaBus {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for KafkaBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaBus")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

impl KafkaBus {
    /// A connection with `config`. Nothing is contacted until the first call.
    pub fn new(config: KafkaConfig) -> Result<Self> {
        Ok(KafkaBus {
            shared: Arc::new(Shared::new(config)?),
        })
    }

    /// The settings this connection was made with.
    pub fn config(&self) -> &KafkaConfig {
        &self.shared.config
    }
}

#[async_trait]
impl BusDriver for KafkaBus {
    fn scheme(&self) -> &str {
        self.shared.config.scheme()
    }

    async fn topic(&self, topic: &str) -> Result<Arc<dyn TopicDriver>> {
        Ok(Arc::new(KafkaTopic::new(Arc::clone(&self.shared), topic)))
    }

    async fn subscription(
        &self,
        topic: &str,
        subscription: &str,
    ) -> Result<Arc<dyn SubscriptionDriver>> {
        Ok(Arc::new(
            KafkaSubscription::open(Arc::clone(&self.shared), topic, subscription).await?,
        ))
    }

    async fn dead_letters(
        &self,
        topic: &str,
        subscription: &str,
    ) -> Result<Arc<dyn DeadLetterDriver>> {
        Ok(Arc::new(KafkaDeadLetters::new(
            Arc::clone(&self.shared),
            topic,
            subscription,
        )))
    }

    fn topology(&self) -> Arc<dyn TopologyDriver> {
        Arc::new(KafkaTopology::new(Arc::clone(&self.shared)))
    }

    async fn stream(&self, stream: &str) -> Result<Arc<dyn StreamDriver>> {
        Ok(Arc::new(
            KafkaStream::open(Arc::clone(&self.shared), stream).await?,
        ))
    }
}
