//! The subscriptions of the AWS topics that deliver into SQS queues (SNS topics,
//! EventBridge buses): each subscription is a queue of its own, made with an access
//! policy that lets the feeding service send to it, and receiving, settling and its
//! dead letters are the SQS driver's. One place for both services.

use std::sync::Arc;

use aws_sdk_sqs::types::QueueAttributeName;
use cloudbus_driver::{DeadLetterDriver, Result, SubscriptionDriver, SubscriptionSpec};

use crate::sqs::{SqsContext, SqsDeadLetters, SqsQueue};

/// The queue of `subscription`, as its [`SubscriptionDriver`].
pub(crate) fn subscription(
    sqs: &Arc<SqsContext>,
    subscription: &str,
) -> Arc<dyn SubscriptionDriver> {
    Arc::new(SqsQueue::new(sqs.clone(), subscription, None))
}

/// The dead-letter queue of `subscription`'s queue.
pub(crate) fn dead_letters(sqs: &Arc<SqsContext>, subscription: &str) -> Arc<dyn DeadLetterDriver> {
    Arc::new(SqsDeadLetters {
        shared: sqs.clone(),
        source: subscription.to_owned(),
        queue: crate::sqs::dead_letter_queue(subscription),
    })
}

/// Makes the queue of a subscription that another service feeds (SNS, EventBridge):
/// the queue `spec.name`, an access policy that lets `service` send to it on behalf
/// of `source_arn` only, and the SQS configuration of `spec` (lease, dead-letter
/// queue, redrive policy). Returns the queue's ARN.
pub(crate) async fn create_queue(
    shared: &SqsContext,
    spec: &SubscriptionSpec,
    service: &str,
    source_arn: &str,
) -> Result<String> {
    let queue = &spec.name;
    let url = shared.create(queue).await?;
    let queue_arn = allow_sender(shared, queue, &url, service, source_arn).await?;
    let mut queue_spec = spec.clone();
    queue_spec.topic = queue.clone();
    queue_spec.filter = None;
    crate::sqs::configure_queue(shared, &queue_spec).await?;
    Ok(queue_arn)
}

/// Sets the access policy of `queue` (at `url`) so that `service` may send to it on
/// behalf of `source_arn` only. Returns the queue's ARN.
pub(crate) async fn allow_sender(
    shared: &SqsContext,
    queue: &str,
    url: &str,
    service: &str,
    source_arn: &str,
) -> Result<String> {
    let queue_arn = shared.queue_arn(url, queue).await?;
    let access = serde_json::json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            "Principal": { "Service": service },
            "Action": "sqs:SendMessage",
            "Resource": queue_arn,
            "Condition": { "ArnEquals": { "aws:SourceArn": source_arn } }
        }]
    });
    shared
        .client
        .set_queue_attributes()
        .queue_url(url)
        .attributes(QueueAttributeName::Policy, access.to_string())
        .send()
        .await
        .map_err(|e| {
            crate::error::sdk_error(
                e,
                crate::sqs::kind_of_code,
                &format!("queue policy of {queue}"),
            )
        })?;
    Ok(queue_arn)
}
