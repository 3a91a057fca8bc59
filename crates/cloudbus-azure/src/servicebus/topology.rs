//! Declaring Service Bus entities through the management API: topics (or queues),
//! subscriptions with their rules, dead-lettering and lock settings; and a plan's
//! reading of them (`TopologyPlanning`: what exists, as the service holds it, and what
//! `ensure_subscription` would make). Replay is not a Service Bus feature.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use cloudbus_driver::driver::{
    SubscriptionSpec, SubscriptionState, TopologyDriver, TopologyPlanning,
};
use cloudbus_driver::{Error, Result};

use super::admin::{EntityProperties, entity_state, rule_text};
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

fn queues_have_no_filters() -> Error {
    Error::unsupported(
        "Service Bus queues have no filters; use servicebus:// topics (subscription rules) \
         or filter in the consumer (ConsumerOptions::filter)",
    )
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
                    return Err(queues_have_no_filters());
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

    fn planning(&self) -> Option<&dyn TopologyPlanning> {
        Some(self)
    }
}

#[async_trait]
impl TopologyPlanning for ServiceBusTopology {
    async fn topic_exists(&self, topic: &str) -> Result<bool> {
        self.shared.admin.exists(topic).await
    }

    /// A topic subscription's lock, delivery limit and the filter of cloudbus's rule;
    /// a queue's lock and delivery limit, when it admits the subscription.
    async fn describe_subscription(
        &self,
        topic: &str,
        name: &str,
    ) -> Result<Option<SubscriptionState>> {
        let admin = &self.shared.admin;
        match self.shared.config.entities {
            EntityKind::Topics => admin.subscription_state(topic, name).await,
            EntityKind::Queues => {
                let admitted = admin.admitted(topic).await?;
                if !admitted.is_some_and(|names| names.iter().any(|n| n == name)) {
                    return Ok(None);
                }
                Ok(admin.description(topic).await?.map(|d| entity_state(&d)))
            }
        }
    }

    fn desired_state(&self, spec: &SubscriptionSpec) -> Result<SubscriptionState> {
        let props = entity_properties(&self.shared.config, Some(spec));
        let filter = match self.shared.config.entities {
            EntityKind::Topics => Some(rule_text(&compile_rule(
                spec.filter.as_ref(),
                &spec.name,
                self.shared.config.prefix,
            )?)),
            EntityKind::Queues if spec.filter.is_some() => return Err(queues_have_no_filters()),
            EntityKind::Queues => None,
        };
        Ok(SubscriptionState {
            filter,
            max_delivery_attempts: Some(props.max_delivery_count),
            lease: Some(props.lock),
            ordered: None,
        })
    }

    /// The management API's PUT updates an entity that exists (If-Match: *), and the
    /// rule is put again: ensuring the subscription changes it in place.
    async fn update_subscription(&self, spec: &SubscriptionSpec) -> Result<()> {
        TopologyDriver::ensure_subscription(self, spec).await
    }
}
