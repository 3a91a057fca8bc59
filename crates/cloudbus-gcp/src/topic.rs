//! Publishing: one batch from cloudbus core becomes one Publish request of the crate's
//! publisher (a full batch by the crate's count threshold, a smaller one by a
//! flush), with per-event results and ordering keys that resume when core does.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use cloudbus_driver::codec::RawMessage;
use cloudbus_driver::{
    BatchResults, BinaryCodec, Capabilities, Error, OutgoingMessage, Payload, Result, TopicDriver,
};
use google_cloud_pubsub::model::Message;

use crate::capabilities::{MAX_BATCH_COUNT, capabilities};
use crate::context::{PubSubContext, lock};
use crate::error::publish_error;

/// A Pub/Sub topic as a cloudbus [`TopicDriver`].
pub struct PubSubTopic {
    shared: Arc<PubSubContext>,
    name: String,
    path: String,
    codec: BinaryCodec,
    /// Keys the crate paused after a failed publish. Core pauses them too and sends
    /// again only after `resume_ordering_key`, so the next send resumes them here.
    paused_keys: Mutex<HashSet<String>>,
    closed: AtomicBool,
}

impl PubSubTopic {
    pub(crate) fn new(shared: Arc<PubSubContext>, topic: &str) -> Self {
        PubSubTopic {
            path: shared.config.topic_path(topic),
            codec: shared.config.codec(),
            shared,
            name: topic.to_owned(),
            paused_keys: Mutex::new(HashSet::new()),
            closed: AtomicBool::new(false),
        }
    }

    /// The topic's resource name (`projects/P/topics/T`).
    pub fn path(&self) -> &str {
        &self.path
    }
}

/// A Pub/Sub message carrying `raw` (attributes and body) under `ordering_key`.
pub(crate) fn to_message(raw: RawMessage, ordering_key: Option<&str>) -> Message {
    let mut m = Message::new()
        .set_data(bytes::Bytes::from(raw.body))
        .set_attributes(raw.attributes);
    if let Some(k) = ordering_key {
        m = m.set_ordering_key(k.to_owned());
    }
    m
}

#[async_trait]
impl TopicDriver for PubSubTopic {
    async fn send_batch(&self, batch: &[OutgoingMessage]) -> Result<BatchResults> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::closed(format!("topic {} is closed", self.name)));
        }
        let publisher = self.shared.publisher(&self.path).await?;
        let mut pending = Vec::with_capacity(batch.len());
        for m in batch {
            let raw = match &m.payload {
                Payload::Event(e) => match self.codec.encode(e) {
                    Ok((raw, _mode)) => raw,
                    Err(e) => {
                        pending.push(Err(e));
                        continue;
                    }
                },
                Payload::Raw(raw) => raw.clone(),
            };
            if let Some(k) = m.ordering_key.as_deref()
                && lock(&self.paused_keys).remove(k)
            {
                publisher.resume_publish(k);
            }
            pending.push(Ok(
                publisher.publish(to_message(raw, m.ordering_key.as_deref()))
            ));
        }
        // A full batch without ordering keys went out when its last message reached
        // the crate's count threshold. A flush would also wait for every other batch
        // in flight, and the crate's actor takes no message meanwhile: the lanes of
        // core (and other publishers of the topic) would send one batch at a time.
        // Anything else (a smaller batch; keyed messages, batched per key) is flushed
        // so that it goes now rather than after the crate's delay.
        let published = pending.iter().filter(|p| p.is_ok()).count();
        let keyed = batch.iter().any(|m| m.ordering_key.is_some());
        if keyed || published < MAX_BATCH_COUNT {
            publisher.flush().await;
        }
        let mut results = Vec::with_capacity(batch.len());
        for (m, p) in batch.iter().zip(pending) {
            results.push(match p {
                Err(e) => Err(e),
                Ok(fut) => match fut.await {
                    Ok(_message_id) => Ok(()),
                    Err(e) => {
                        if let Some(k) = &m.ordering_key {
                            lock(&self.paused_keys).insert(k.clone());
                        }
                        Err(publish_error(e, &format!("publish to {}", self.name)))
                    }
                },
            });
        }
        Ok(results)
    }

    fn capabilities(&self) -> Capabilities {
        capabilities(self.shared.config.anonymous)
    }

    async fn close(&self) -> Result<()> {
        if !self.closed.swap(true, Ordering::AcqRel)
            && let Ok(p) = self.shared.publisher(&self.path).await
        {
            p.flush().await;
        }
        Ok(())
    }
}
