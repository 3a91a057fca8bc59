//! Publishing to a Kafka topic: each event becomes one record through the CloudEvents
//! Kafka binding (the ordering key is the record key), sent by the connection's
//! idempotent producer (`enable.idempotence=true`, `acks=all`); `send_batch` returns
//! once every record has its delivery report, one result per record.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use cloudbus_driver::{
    BatchResults, Capabilities, Error, ErrorKind, FilterSupport, OutgoingMessage, Result,
    TopicDriver,
};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;
use tokio::sync::OnceCell;

use crate::binding::{self, KafkaRecord};
use crate::connection::Shared;
use crate::error::kafka_error;

/// Most records cloudbus hands the producer in one `send_batch`.
pub const MAX_BATCH_COUNT: usize = 1000;

/// How long a send may wait for room in librdkafka's local queue.
const QUEUE_TIMEOUT: Duration = Duration::from_secs(30);

/// What a Kafka topic (and a subscription of it) can do, as cloudbus reports it
/// (see the README's provider table).
pub fn capabilities(max_message_bytes: usize) -> Capabilities {
    let mut c = Capabilities::broker(
        max_message_bytes,
        MAX_BATCH_COUNT,
        MAX_BATCH_COUNT * max_message_bytes.min(64 * 1024),
    );
    // Per key, through the record key's partition. A nack with a delay moves the
    // record to the retry topic, behind later records of its key.
    c.ordering = true;
    // The idempotent producer drops its own retried duplicates, not an application's
    // second publish of the same event.
    c.deduplication = false;
    // Kafka has no delayed delivery of a new record.
    c.max_delay = None;
    c.native_dead_letter = true;
    c.dead_letter_reason = true;
    c.max_delivery_attempts = true;
    // Every subscription's group reads every record; cloudbus applies the filter the
    // subscription declared in this process (Kafka has no broker-side filter).
    c.filtering = FilterSupport::InProcess;
    c.fan_out = true;
    c.nack_delay = true;
    c.lease_extension = true;
    c.replay = true;
    c.raw_messages = true;
    c
}

/// Sends to one Kafka topic.
pub struct KafkaTopic {
    shared: Arc<Shared>,
    topic: String,
    /// Set once the topic was seen in the cluster's metadata.
    exists: OnceCell<()>,
    closed: AtomicBool,
}

impl KafkaTopic {
    pub(crate) fn new(shared: Arc<Shared>, topic: &str) -> Self {
        KafkaTopic {
            shared,
            topic: topic.to_owned(),
            exists: OnceCell::new(),
            closed: AtomicBool::new(false),
        }
    }
}

/// librdkafka headers from the binding's.
pub(crate) fn owned_headers(headers: &[(String, Option<Vec<u8>>)]) -> OwnedHeaders {
    let mut out = OwnedHeaders::new_with_capacity(headers.len());
    for (key, value) in headers {
        out = out.insert(Header {
            key,
            value: value.as_deref(),
        });
    }
    out
}

/// Sends `records` to `topic` at once and waits for every delivery report; one
/// result per record, in order.
pub(crate) async fn send_records(
    shared: &Shared,
    topic: &str,
    records: &[KafkaRecord],
) -> Vec<Result<()>> {
    let sends = records.iter().map(|record| async move {
        let mut future = FutureRecord::<[u8], [u8]>::to(topic);
        if let Some(key) = record.key.as_deref() {
            future = future.key(key);
        }
        if let Some(payload) = record.payload.as_deref() {
            future = future.payload(payload);
        }
        if !record.headers.is_empty() {
            future = future.headers(owned_headers(&record.headers));
        }
        shared
            .producer
            .send(future, QUEUE_TIMEOUT)
            .await
            .map(|_| ())
            .map_err(|(e, _)| kafka_error(e, &format!("send to Kafka topic {topic:?}")))
    });
    futures::future::join_all(sends).await
}

#[async_trait]
impl TopicDriver for KafkaTopic {
    async fn send_batch(&self, batch: &[OutgoingMessage]) -> Result<BatchResults> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::closed(format!(
                "the publisher of Kafka topic {:?} is closed",
                self.topic
            )));
        }
        // A missing topic is NotFound at once, not after librdkafka's metadata
        // propagation wait (topics are not auto-created: see the topology).
        self.exists
            .get_or_try_init(|| async {
                self.shared.partition_count(&self.topic).await.map(|_| ())
            })
            .await?;
        let max = self.shared.config.max_message_bytes();
        let mode = self.shared.config.content_mode();
        let mut results: Vec<Option<Result<()>>> = Vec::with_capacity(batch.len());
        let mut records = Vec::with_capacity(batch.len());
        let mut slots = Vec::with_capacity(batch.len());
        for (i, message) in batch.iter().enumerate() {
            match binding::encode(message, mode) {
                Ok(record) => {
                    let size = record.payload.as_ref().map_or(0, Vec::len)
                        + record.key.as_ref().map_or(0, Vec::len)
                        + record
                            .headers
                            .iter()
                            .map(|(k, v)| k.len() + v.as_ref().map_or(0, Vec::len))
                            .sum::<usize>();
                    if size > max {
                        results.push(Some(Err(Error::new(
                            ErrorKind::TooLarge,
                            format!(
                                "event {} is {size} bytes as a Kafka record; {:?} takes at most {max}",
                                message.id(),
                                self.topic
                            ),
                        ))));
                    } else {
                        results.push(None);
                        records.push(record);
                        slots.push(i);
                    }
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        let sent = send_records(&self.shared, &self.topic, &records).await;
        for (slot, result) in slots.into_iter().zip(sent) {
            results[slot] = Some(result);
        }
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::new(ErrorKind::Internal, "not sent"))))
            .collect())
    }

    fn capabilities(&self) -> Capabilities {
        capabilities(self.shared.config.max_message_bytes())
    }

    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        Ok(())
    }
}
