//! Declaring queues: `ensure_topic` and `ensure_subscription` (visibility timeout,
//! dead-letter queue and RedrivePolicy, the subscription tag), and the queue policy
//! that lets SNS and EventBridge send to a subscription queue.

use std::sync::Arc;

use async_trait::async_trait;
use aws_sdk_sqs::types::QueueAttributeName;
use cloudbus_core::{Error, ErrorKind, Result, SubscriptionSpec, TopologyDriver};

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
            return Err(Error::unsupported(
                "SQS queues have no filters; filter in the consumer (ConsumerOptions::filter) \
                 or subscribe the queue to SNS",
            ));
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
}

/// Configures the queue `spec.topic` for `spec`: visibility timeout, dead-letter
/// queue and RedrivePolicy, and a tag admitting `spec.name` when it differs.
pub(crate) async fn configure_queue(shared: &SqsContext, spec: &SubscriptionSpec) -> Result<()> {
    let url = shared.url(&spec.topic).await?;
    let dlq = dead_letter_queue(&spec.topic);
    let dlq_url = shared.create(&dlq).await?;
    let dlq_arn = shared.queue_arn(&dlq_url, &dlq).await?;
    let max = spec
        .max_delivery_attempts
        .unwrap_or(DEFAULT_MAX_RECEIVES)
        .clamp(1, DEFAULT_MAX_RECEIVES);
    let visibility = spec.lease.as_secs_f64().ceil().clamp(0.0, 43_200.0) as u64;
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
