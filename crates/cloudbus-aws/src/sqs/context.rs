//! What the SQS drivers of one bus share (and SNS and EventBridge, whose
//! subscriptions are SQS queues): the client, the queue URLs looked up so far, and the
//! single-message calls dead-lettering and redrive make.

use std::collections::HashMap;
use std::sync::Mutex;

use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::QueueAttributeName;
use cloudbus_driver::{Error, ErrorKind, Result};

use super::error::kind_of_code;
use super::limits::is_fifo;
use super::wire::{Stored, string_attribute};

/// What every SQS driver of one bus shares (and SNS and EventBridge, whose
/// subscriptions are SQS queues): the client and the queue URLs looked up so far.
pub(crate) struct SqsContext {
    pub(crate) client: Client,
    urls: Mutex<HashMap<String, String>>,
}

impl SqsContext {
    pub(crate) fn new(client: Client) -> Self {
        SqsContext {
            client,
            urls: Mutex::new(HashMap::new()),
        }
    }

    /// The queue URL of `name` (GetQueueUrl, cached; never built by hand).
    pub(crate) async fn url(&self, name: &str) -> Result<String> {
        if let Some(u) = self
            .urls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
        {
            return Ok(u.clone());
        }
        let out = self
            .client
            .get_queue_url()
            .queue_name(name)
            .send()
            .await
            .map_err(|e| crate::error::sdk_error(e, kind_of_code, &format!("queue {name}")))?;
        let url = out
            .queue_url()
            .ok_or_else(|| Error::not_found(format!("queue {name} has no URL")))?
            .to_owned();
        self.urls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned(), url.clone());
        Ok(url)
    }

    pub(crate) async fn attribute(
        &self,
        url: &str,
        name: QueueAttributeName,
    ) -> Result<Option<String>> {
        let out = self
            .client
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(name.clone())
            .send()
            .await
            .map_err(|e| {
                crate::error::sdk_error(e, kind_of_code, &format!("attributes of {url}"))
            })?;
        Ok(out.attributes().and_then(|a| a.get(&name)).cloned())
    }

    /// The ARN of queue `name` at `url`: NotFound when the queue has none.
    pub(crate) async fn queue_arn(&self, url: &str, name: &str) -> Result<String> {
        self.attribute(url, QueueAttributeName::QueueArn)
            .await?
            .ok_or_else(|| Error::not_found(format!("queue {name} has no ARN")))
    }

    pub(crate) async fn create(&self, name: &str) -> Result<String> {
        let mut req = self.client.create_queue().queue_name(name);
        if is_fifo(name) {
            req = req.attributes(QueueAttributeName::FifoQueue, "true");
        }
        match req.send().await {
            Ok(out) => {
                let url = out.queue_url().unwrap_or_default().to_owned();
                if url.is_empty() {
                    return self.url(name).await;
                }
                self.urls
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(name.to_owned(), url.clone());
                Ok(url)
            }
            Err(e) => {
                let e = crate::error::sdk_error(e, kind_of_code, &format!("create queue {name}"));
                if e.kind() == ErrorKind::AlreadyExists {
                    self.url(name).await
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Sends one message (the dead-letter and redrive paths).
    pub(crate) async fn send_one(
        &self,
        queue: &str,
        m: &Stored,
        extra: &[(&str, &str)],
    ) -> Result<()> {
        let url = self.url(queue).await?;
        let mut req = self
            .client
            .send_message()
            .queue_url(&url)
            .message_body(&m.body);
        for (k, v) in m.attributes.iter() {
            req = req.message_attributes(k, string_attribute(v)?);
        }
        for (k, v) in extra {
            if !v.is_empty() {
                req = req.message_attributes(*k, string_attribute(v)?);
            }
        }
        if is_fifo(queue) {
            req = req
                .message_group_id(m.group.clone().unwrap_or_else(|| "default".to_owned()))
                .message_deduplication_id(format!("{}-{}", m.message_id, fastrand_suffix()));
        }
        req.send()
            .await
            .map_err(|e| crate::error::sdk_error(e, kind_of_code, &format!("send to {queue}")))?;
        Ok(())
    }

    pub(crate) async fn delete(&self, url: &str, receipt: &str) -> Result<()> {
        self.client
            .delete_message()
            .queue_url(url)
            .receipt_handle(receipt)
            .send()
            .await
            .map_err(|e| crate::error::sdk_error(e, kind_of_code, "delete message"))?;
        Ok(())
    }
}

pub(crate) fn fastrand_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{nanos:x}")
}
