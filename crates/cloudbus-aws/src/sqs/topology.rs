//! Declaring queues: `ensure_topic` and `ensure_subscription` (visibility timeout,
//! dead-letter queue and RedrivePolicy, the subscription tag), and the queue policy
//! that lets SNS and EventBridge send to a subscription queue.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_sqs::types::QueueAttributeName;
use cloudbus_driver::{
    Error, ErrorKind, Missing, Result, SubscriptionSpec, SubscriptionState, TopologyDriver,
    TopologyPlanning,
};

use super::context::SqsContext;
use super::error::kind_of_code;
use super::limits::dead_letter_queue;

/// maxReceiveCount when the spec sets no max delivery attempts (SQS's ceiling).
pub(crate) const DEFAULT_MAX_RECEIVES: u32 = 1000;
/// The tag that admits a subscription name to a queue.
pub(crate) const SUBSCRIPTION_TAG: &str = "cloudbus-subscription:";

pub(crate) struct SqsTopology {
    pub(crate) shared: Arc<SqsContext>,
}

#[async_trait]
impl TopologyDriver for SqsTopology {
    async fn ensure_topic(&self, topic: &str) -> Result<()> {
        self.shared.create(topic).await.map(|_| ())
    }

    async fn ensure_subscription(&self, spec: &SubscriptionSpec) -> Result<()> {
        if spec.filter.is_some() {
            return Err(no_filters());
        }
        configure_queue(&self.shared, spec).await
    }

    async fn delete_subscription(&self, topic: &str, name: &str) -> Result<()> {
        let url = match self.shared.url(topic).await {
            Ok(u) => u,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        self.shared
            .client
            .untag_queue()
            .queue_url(url)
            .tag_keys(format!("{SUBSCRIPTION_TAG}{name}"))
            .send()
            .await
            .map_err(|e| {
                crate::error::sdk_error(e, kind_of_code, &format!("untag queue {topic}"))
            })?;
        Ok(())
    }

    fn planning(&self) -> Option<&dyn TopologyPlanning> {
        Some(self)
    }
}

#[async_trait]
impl TopologyPlanning for SqsTopology {
    async fn topic_exists(&self, topic: &str) -> Result<bool> {
        Ok(self.shared.url(topic).await.missing_as_none()?.is_some())
    }

    /// The queue's settings, when it carries the subscription's tag (or is named as
    /// the subscription).
    async fn describe_subscription(
        &self,
        topic: &str,
        name: &str,
    ) -> Result<Option<SubscriptionState>> {
        let Some(url) = self.shared.url(topic).await.missing_as_none()? else {
            return Ok(None);
        };
        if !admits(&self.shared, topic, &url, name).await? {
            return Ok(None);
        }
        queue_state(&self.shared, topic).await
    }

    fn desired_state(&self, spec: &SubscriptionSpec) -> Result<SubscriptionState> {
        if spec.filter.is_some() {
            return Err(no_filters());
        }
        Ok(queue_desired(spec))
    }

    /// Setting the queue's attributes again changes them in place.
    async fn update_subscription(&self, spec: &SubscriptionSpec) -> Result<()> {
        self.ensure_subscription(spec).await
    }
}

/// Configures the queue `spec.topic` for `spec`: visibility timeout, dead-letter
/// queue and RedrivePolicy, and a tag admitting `spec.name` when it differs.
/// Whether queue `queue` (at `url`) serves subscription `name`: the queue's own name,
/// or a name it carries the subscription tag of.
pub(crate) async fn admits(
    shared: &SqsContext,
    queue: &str,
    url: &str,
    name: &str,
) -> Result<bool> {
    if name == queue {
        return Ok(true);
    }
    let tags = shared
        .client
        .list_queue_tags()
        .queue_url(url)
        .send()
        .await
        .map_err(|e| crate::error::sdk_error(e, kind_of_code, &format!("tags of {queue}")))?;
    let tag = format!("{SUBSCRIPTION_TAG}{name}");
    Ok(tags.tags().is_some_and(|t| t.contains_key(&tag)))
}

fn no_filters() -> Error {
    Error::unsupported(
        "SQS queues have no filters; filter in the consumer (ConsumerOptions::filter) \
         or subscribe the queue to SNS",
    )
}

/// The queue settings `spec` asks for: the redrive policy's maxReceiveCount and the
/// visibility timeout in whole seconds, as SQS holds them.
fn queue_settings(spec: &SubscriptionSpec) -> (u32, u64) {
    let max = spec
        .max_delivery_attempts
        .unwrap_or(DEFAULT_MAX_RECEIVES)
        .clamp(1, DEFAULT_MAX_RECEIVES);
    let visibility = spec.lease.as_secs_f64().ceil().clamp(0.0, 43_200.0) as u64;
    (max, visibility)
}

/// What [`queue_state`] reads from the queue `configure_queue(spec)` made.
pub(crate) fn queue_desired(spec: &SubscriptionSpec) -> SubscriptionState {
    let (max, visibility) = queue_settings(spec);
    SubscriptionState {
        filter: None,
        max_delivery_attempts: Some(max),
        lease: Some(Duration::from_secs(visibility)),
        ordered: None,
    }
}

/// The subscription settings queue `name` holds: its visibility timeout and its
/// redrive policy's maxReceiveCount (0 without one); `None` when there is no queue.
pub(crate) async fn queue_state(
    shared: &SqsContext,
    name: &str,
) -> Result<Option<SubscriptionState>> {
    let Some(url) = shared.url(name).await.missing_as_none()? else {
        return Ok(None);
    };
    let out = shared
        .client
        .get_queue_attributes()
        .queue_url(&url)
        .attribute_names(QueueAttributeName::VisibilityTimeout)
        .attribute_names(QueueAttributeName::RedrivePolicy)
        .send()
        .await
        .map_err(|e| crate::error::sdk_error(e, kind_of_code, &format!("attributes of {name}")))?;
    let attributes = out.attributes();
    let get = |a: QueueAttributeName| attributes.and_then(|m| m.get(&a)).cloned();
    let lease = get(QueueAttributeName::VisibilityTimeout)
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_secs);
    let max_receives = get(QueueAttributeName::RedrivePolicy)
        .and_then(|p| serde_json::from_str::<serde_json::Value>(&p).ok())
        .and_then(|p| match &p["maxReceiveCount"] {
            serde_json::Value::Number(n) => n.as_u64(),
            serde_json::Value::String(s) => s.parse().ok(),
            _ => None,
        })
        .and_then(|n| u32::try_from(n).ok())
        .unwrap_or(0);
    Ok(Some(SubscriptionState {
        filter: None,
        max_delivery_attempts: Some(max_receives),
        lease,
        ordered: None,
    }))
}

pub(crate) async fn configure_queue(shared: &SqsContext, spec: &SubscriptionSpec) -> Result<()> {
    let url = shared.url(&spec.topic).await?;
    let dlq = dead_letter_queue(&spec.topic);
    let dlq_url = shared.create(&dlq).await?;
    let dlq_arn = shared.queue_arn(&dlq_url, &dlq).await?;
    let (max, visibility) = queue_settings(spec);
    shared
        .client
        .set_queue_attributes()
        .queue_url(&url)
        .attributes(
            QueueAttributeName::VisibilityTimeout,
            visibility.to_string(),
        )
        .attributes(
            QueueAttributeName::RedrivePolicy,
            format!(r#"{{"deadLetterTargetArn":"{dlq_arn}","maxReceiveCount":"{max}"}}"#),
        )
        .send()
        .await
        .map_err(|e| {
            crate::error::sdk_error(e, kind_of_code, &format!("configure queue {}", spec.topic))
        })?;
    if spec.name != spec.topic {
        shared
            .client
            .tag_queue()
            .queue_url(&url)
            .tags(format!("{SUBSCRIPTION_TAG}{}", spec.name), "true")
            .send()
            .await
            .map_err(|e| {
                crate::error::sdk_error(e, kind_of_code, &format!("tag queue {}", spec.topic))
            })?;
    }
    Ok(())
}
