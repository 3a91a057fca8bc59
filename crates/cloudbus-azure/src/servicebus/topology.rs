//! Declaring Service Bus entities through the management API: topics (or queues),
//! subscriptions with their rules, dead-lettering and lock settings; replay is not a
//! Service Bus feature.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cloudbus_core::driver::{SubscriptionSpec, TopologyDriver};
use cloudbus_core::{Error, Result};

use super::admin::EntityProperties;
use super::config::{DEFAULT_MAX_DELIVERY_COUNT, EntityKind, MAX_LOCK, MIN_LOCK, ServiceBusConfig};
use super::context::ServiceBusContext;
use super::rules::compile_rule;

pub(crate) struct ServiceBusTopology {
    shared: Arc<ServiceBusContext>,
}

impl ServiceBusTopology {
    pub(crate) fn new(shared: Arc<ServiceBusContext>) -> Self {
        ServiceBusTopology { shared }
    }
}

fn entity_properties(
    config: &ServiceBusConfig,
    spec: Option<&SubscriptionSpec>,
) -> EntityProperties {
    EntityProperties {
        lock: spec
            .map(|s| s.lease)
            .unwrap_or(Duration::from_secs(30))
            .clamp(MIN_LOCK, MAX_LOCK),
        max_delivery_count: spec
            .and_then(|s| s.max_delivery_attempts)
            .unwrap_or(DEFAULT_MAX_DELIVERY_COUNT)
            .max(1),
        requires_session: config.sessions,
    }
}

#[async_trait]
impl TopologyDriver for ServiceBusTopology {
    async fn ensure_topic(&self, topic: &str) -> Result<()> {
        let admin = &self.shared.admin;
        match self.shared.config.entities {
            EntityKind::Topics => admin.ensure_topic(topic).await,
            EntityKind::Queues => {
                admin
                    .ensure_queue(topic, &entity_properties(&self.shared.config, None))
                    .await
            }
        }
    }

    async fn ensure_subscription(&self, spec: &SubscriptionSpec) -> Result<()> {
        let admin = &self.shared.admin;
        let props = entity_properties(&self.shared.config, Some(spec));
        match self.shared.config.entities {
            EntityKind::Topics => {
                let rule =
                    compile_rule(spec.filter.as_ref(), &spec.name, self.shared.config.prefix)?;
                admin
                    .put_subscription(&spec.topic, &spec.name, &props, &rule)
                    .await
            }
            EntityKind::Queues => {
                if spec.filter.is_some() {
                    return Err(Error::unsupported(
                        "Service Bus queues have no filters; use servicebus:// topics \
                         (subscription rules) or filter in the consumer (ConsumerOptions::filter)",
                    ));
                }
                let Some(mut admitted) = admin.admitted(&spec.topic).await? else {
                    return Err(Error::not_found(format!(
                        "Service Bus queue {:?} does not exist",
                        spec.topic
                    )));
                };
                if !admitted.contains(&spec.name) {
                    admitted.push(spec.name.clone());
                }
                admin.put_queue(&spec.topic, &props, &admitted).await
            }
        }
    }

    async fn delete_subscription(&self, topic: &str, name: &str) -> Result<()> {
        match self.shared.config.entities {
            EntityKind::Topics => {
                self.shared
                    .admin
                    .delete(&format!("{topic}/Subscriptions/{name}"))
                    .await
            }
            // Every subscription of a queue reads the queue itself; it is only no
            // longer admitted.
            EntityKind::Queues => {
                let admin = &self.shared.admin;
                let Some(mut admitted) = admin.admitted(topic).await? else {
                    return Ok(());
                };
                if !admitted.iter().any(|n| n == name) {
                    return Ok(());
                }
                admitted.retain(|n| n != name);
                let props = entity_properties(&self.shared.config, None);
                admin.put_queue(topic, &props, &admitted).await
            }
        }
    }
}
