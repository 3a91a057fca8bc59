//! What the publishers, consumers and topology of one Service Bus bus share: the
//! AMQP connection, the management clients per entity, the admin (ATOM) client and
//! the codec; and the checks and paths they all use.

use std::sync::Arc;
use std::time::Duration;

use cloudbus_driver::codec::BinaryCodec;
use cloudbus_driver::{Error, ErrorKind, Result};
use fe2o3_amqp::Sender;

use super::admin::{Admin, admitted_of, entity_state};
use super::config::{EntityKind, ServiceBusConfig};
use super::connection::{self, Amqp, Live};
use super::management::Management;

/// What every Service Bus driver of one bus shares (see the module comment).
pub(crate) struct ServiceBusContext {
    pub(crate) config: ServiceBusConfig,
    pub(crate) amqp: Arc<Amqp>,
    pub(crate) admin: Admin,
    pub(crate) codec: BinaryCodec,
    /// The `$management` clients of the entities used, by entity path.
    pub(crate) managements: std::sync::Mutex<std::collections::HashMap<String, Arc<Management>>>,
}

impl ServiceBusContext {
    /// The `$management` client of an entity (one per entity and bus).
    pub(crate) fn management(&self, path: &str) -> Arc<Management> {
        let mut all = connection::lock(&self.managements);
        all.entry(path.to_owned())
            .or_insert_with(|| Arc::new(Management::new(self.amqp.clone(), path)))
            .clone()
    }

    /// A sender for a queue or topic.
    pub(crate) async fn sender(&self, entity: &str) -> Result<(Arc<Live>, Sender)> {
        self.check(entity, None).await?;
        self.amqp.sender(entity).await.map_err(|f| f.error)
    }

    /// Fails with NotFound when the management API says the entity (or, on a queue,
    /// the admitted subscription name) does not exist. A key without the Manage right
    /// cannot ask; then the link's own answer decides.
    pub(crate) async fn check(&self, topic: &str, subscription: Option<&str>) -> Result<()> {
        let missing = match (self.config.entities, subscription) {
            (EntityKind::Queues, Some(sub)) => match self.admin.admitted(topic).await {
                Ok(Some(admitted)) => sub != topic && !admitted.iter().any(|n| n == sub),
                Ok(None) => true,
                Err(e) if e.kind() == ErrorKind::PermissionDenied => false,
                Err(e) => return Err(e),
            },
            (_, sub) => {
                let path = match sub {
                    Some(sub) => self.path(topic, sub),
                    None => topic.to_owned(),
                };
                match self.admin.exists(&path).await {
                    Ok(exists) => !exists,
                    Err(e) if e.kind() == ErrorKind::PermissionDenied => false,
                    Err(e) => return Err(e),
                }
            }
        };
        if missing {
            return Err(Error::not_found(match subscription {
                Some(sub) => format!("Service Bus has no subscription {sub:?} of {topic:?}"),
                None => format!("Service Bus has no queue or topic {topic:?}"),
            }));
        }
        Ok(())
    }

    /// [`check`](Self::check) for a subscription (or a queue read as one), which also
    /// answers the lock duration of the entity, read from the same description: the
    /// lease of its messages (`None` when it cannot be read, as with a key without the
    /// Manage right).
    pub(crate) async fn check_subscription(
        &self,
        topic: &str,
        subscription: &str,
    ) -> Result<Option<Duration>> {
        let path = self.path(topic, subscription);
        let description = match self.admin.description(&path).await {
            Ok(d) => d,
            Err(e) if e.kind() == ErrorKind::PermissionDenied => return Ok(None),
            Err(e) => return Err(e),
        };
        let missing = match (&description, self.config.entities) {
            (None, _) => true,
            (Some(d), EntityKind::Queues) => {
                subscription != topic && !admitted_of(d).iter().any(|n| n == subscription)
            }
            (Some(_), EntityKind::Topics) => false,
        };
        if missing {
            return Err(Error::not_found(format!(
                "Service Bus has no subscription {subscription:?} of {topic:?}"
            )));
        }
        Ok(description.and_then(|d| entity_state(&d).lease))
    }

    /// The entity path of `subscription` of `topic`: the subscription, or the queue.
    pub(crate) fn path(&self, topic: &str, subscription: &str) -> String {
        match self.config.entities {
            EntityKind::Topics => format!("{topic}/Subscriptions/{subscription}"),
            EntityKind::Queues => topic.to_owned(),
        }
    }
}
