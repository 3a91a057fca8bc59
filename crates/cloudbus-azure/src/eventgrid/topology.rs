//! Event Grid's topology: topics and event subscriptions are Azure resources, made
//! with ARM outside the data plane, so ensuring a topic does nothing and a
//! subscription is `Unsupported`.

use async_trait::async_trait;
use cloudbus_driver::{Error, Result, SubscriptionSpec, TopologyDriver};

pub(crate) struct EventGridTopology;

#[async_trait]
impl TopologyDriver for EventGridTopology {
    /// Topics are Azure resources (ARM), made outside the data plane: nothing to do.
    async fn ensure_topic(&self, _topic: &str) -> Result<()> {
        Ok(())
    }
    async fn ensure_subscription(&self, spec: &SubscriptionSpec) -> Result<()> {
        Err(Error::unsupported(format!(
            "Event Grid subscriptions ({}) are Azure resources made with ARM; point one at \
             a PushEndpoint",
            spec.name
        )))
    }
    async fn delete_subscription(&self, _topic: &str, name: &str) -> Result<()> {
        Err(Error::unsupported(format!(
            "Event Grid subscription {name} is an Azure resource; delete it with ARM"
        )))
    }
}
