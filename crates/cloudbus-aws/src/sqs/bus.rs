//! SQS as a cloudbus provider: the bus that hands out queues as topics and
//! subscriptions, their dead-letter queues, and the topology.

use std::sync::Arc;

use async_trait::async_trait;
use aws_sdk_sqs::Client;
use cloudbus_core::Bus;
use cloudbus_driver::{
    BusDriver, DeadLetterDriver, Result, SubscriptionDriver, TopicDriver, TopologyDriver,
};

use super::context::SqsContext;
use super::dead_letters::SqsDeadLetters;
use super::limits::dead_letter_queue;
use super::queue::SqsQueue;
use super::topology::SqsTopology;

/// SQS as a cloudbus provider (`sqs://[?region=R][&endpoint=URL]`).
#[derive(Clone)]
pub struct SqsBus {
    shared: Arc<SqsContext>,
}

impl std::fmt::Debug for SqsBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SqsBus { .. }")
    }
}

impl SqsBus {
    /// A bus over the SQS client made from `config`.
    pub fn new(config: &aws_config::SdkConfig) -> Self {
        Self::from_client(Client::new(config))
    }

    /// A bus over an existing client.
    pub fn from_client(client: Client) -> Self {
        SqsBus {
            shared: Arc::new(SqsContext::new(client)),
        }
    }

    /// The SQS client (escape hatch).
    pub fn client(&self) -> &Client {
        &self.shared.client
    }

    /// Wraps this driver in the portable [`Bus`].
    pub fn into_bus(self) -> Bus {
        Bus::new(Arc::new(self))
    }
}

#[async_trait]
impl BusDriver for SqsBus {
    fn scheme(&self) -> &str {
        "sqs"
    }

    async fn topic(&self, topic: &str) -> Result<Arc<dyn TopicDriver>> {
        Ok(Arc::new(SqsQueue::new(self.shared.clone(), topic, None)))
    }

    async fn subscription(
        &self,
        topic: &str,
        subscription: &str,
    ) -> Result<Arc<dyn SubscriptionDriver>> {
        Ok(Arc::new(SqsQueue::new(
            self.shared.clone(),
            topic,
            Some(subscription),
        )))
    }

    async fn dead_letters(
        &self,
        topic: &str,
        _subscription: &str,
    ) -> Result<Arc<dyn DeadLetterDriver>> {
        Ok(Arc::new(SqsDeadLetters {
            shared: self.shared.clone(),
            source: topic.to_owned(),
            queue: dead_letter_queue(topic),
        }))
    }

    fn topology(&self) -> Arc<dyn TopologyDriver> {
        Arc::new(SqsTopology {
            shared: self.shared.clone(),
        })
    }
}
