//! The Service Bus bus: what its publishers, consumers and topology share (the AMQP
//! connection, the management client, the codec), and the `BusDriver` that opens them.

use std::sync::Arc;

use async_trait::async_trait;
use cloudbus_core::Bus;
use cloudbus_driver::Result;
use cloudbus_driver::codec::BinaryCodec;
use cloudbus_driver::driver::{
    BusDriver, DeadLetterDriver, SubscriptionDriver, TopicDriver, TopologyDriver,
};

use super::admin::Admin;
use super::config::{ServiceBusConfig, check_credential_transport};
use super::connection::Amqp;
use super::context::ServiceBusContext;
use super::dead_letters::ServiceBusDeadLetters;
use super::message::CONTENT_TYPE;
use super::receiver::ServiceBusSubscription;
use super::topic::ServiceBusTopic;
use super::topology::ServiceBusTopology;

/// A Service Bus namespace as a cloudbus bus.
pub struct ServiceBusBus {
    shared: Arc<ServiceBusContext>,
}

impl std::fmt::Debug for ServiceBusBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceBusBus")
            .field("config", &self.shared.config)
            .finish()
    }
}

impl ServiceBusBus {
    /// Connects to the namespace (AMQP, with CBS authorization).
    pub async fn connect(config: ServiceBusConfig) -> Result<Self> {
        check_credential_transport(&config)?;
        let amqp = Arc::new(Amqp::new(config.clone()));
        // Connect now, so that a wrong address or key shows here.
        amqp.live().await.map_err(|f| f.error)?;
        let mut codec = BinaryCodec::new(config.prefix).content_type_attribute(CONTENT_TYPE);
        if config.structured {
            codec = codec.structured();
        }
        let admin = Admin::new(&config)?;
        Ok(ServiceBusBus {
            shared: Arc::new(ServiceBusContext {
                config,
                amqp,
                admin,
                codec,
                managements: Default::default(),
            }),
        })
    }

    /// Wraps this driver in a [`Bus`].
    pub fn into_bus(self) -> Bus {
        Bus::new(Arc::new(self))
    }
}

#[async_trait]
impl BusDriver for ServiceBusBus {
    fn scheme(&self) -> &str {
        "servicebus"
    }

    async fn topic(&self, topic: &str) -> Result<Arc<dyn TopicDriver>> {
        Ok(Arc::new(ServiceBusTopic::new(self.shared.clone(), topic)))
    }

    async fn subscription(
        &self,
        topic: &str,
        subscription: &str,
    ) -> Result<Arc<dyn SubscriptionDriver>> {
        Ok(Arc::new(ServiceBusSubscription::new(
            self.shared.clone(),
            topic,
            subscription,
        )))
    }

    async fn dead_letters(
        &self,
        topic: &str,
        subscription: &str,
    ) -> Result<Arc<dyn DeadLetterDriver>> {
        Ok(Arc::new(ServiceBusDeadLetters::new(
            self.shared.clone(),
            topic,
            subscription,
        )))
    }

    fn topology(&self) -> Arc<dyn TopologyDriver> {
        Arc::new(ServiceBusTopology::new(self.shared.clone()))
    }
}
