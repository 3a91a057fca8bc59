//! Amazon Kinesis Data Streams: a stream is a topic for publishers (PutRecords) and a
//! partitioned log for [`StreamConsumer`](cloudbus_core::StreamConsumer)s (shards,
//! shard iterators, GetRecords). Records have no attributes, so each carries the whole
//! CloudEvent in structured JSON; the partition key is the event's ordering key (or its
//! `partitionkey` extension, or its id). Core's stream consumer does the rest: one
//! reader per shard, checkpoints, replay by position or time, parents read to their
//! end before their children after a reshard, retries and dead-lettering (into an SQS
//! queue with `dead_letter_to`).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_kinesis::primitives::{Blob, DateTime as AwsDateTime};
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, ShardIteratorType, StreamStatus};
use chrono::{DateTime, Utc};
use cloudbus_core::Bus;
use cloudbus_driver::codec::{RawMessage, from_unlabelled_body, to_structured_json};
use cloudbus_driver::driver::{
    PartitionInfo, ReadBatch, StartPosition, StreamDriver, StreamRecord,
};
use cloudbus_driver::{
    BatchResults, BusDriver, Capabilities, DeadLetterDriver, Error, ErrorKind, EventExt,
    FilterSupport, Missing, OutgoingMessage, Payload, Result, SubscriptionDriver, SubscriptionSpec,
    SubscriptionState, TopicDriver, TopologyDriver, TopologyPlanning,
};

/// Most records in one PutRecords call.
pub const MAX_BATCH_COUNT: usize = 500;
/// Most bytes in one PutRecords call.
pub const MAX_BATCH_BYTES: usize = 5 * 1024 * 1024;
/// Largest record (data and partition key).
pub const MAX_RECORD_BYTES: usize = 1024 * 1024;

/// What a Kinesis stream supports as a topic.
///
/// ```
/// let c = cloudbus_aws::kinesis::capabilities();
/// assert!(c.ordering && c.replay && c.max_batch_count == 500);
/// ```
pub fn capabilities() -> Capabilities {
    let mut c = Capabilities::broker(MAX_RECORD_BYTES, MAX_BATCH_COUNT, MAX_BATCH_BYTES);
    c.max_delay = None;
    c.fan_out = true;
    c.replay = true;
    c.filtering = FilterSupport::None;
    c.native_dead_letter = false;
    c.dead_letter_reason = false;
    c.max_delivery_attempts = false;
    c.nack_delay = false;
    c.lease_extension = false;
    c
}

pub(crate) fn kind_of_code(code: &str) -> ErrorKind {
    if let Some(kind) = crate::error::common_kind(code) {
        return kind;
    }
    match code {
        c if c.contains("ResourceNotFound") => ErrorKind::NotFound,
        c if c.contains("ResourceInUse") => ErrorKind::AlreadyExists,
        c if c.contains("ProvisionedThroughputExceeded")
            || c.contains("Throttl")
            || c.contains("LimitExceeded") =>
        {
            ErrorKind::Throttled
        }
        c if c.contains("ExpiredIterator") => ErrorKind::LeaseExpired,
        c if c.contains("AccessDenied") => ErrorKind::PermissionDenied,
        c if c.contains("InvalidArgument") || c.contains("Validation") => {
            ErrorKind::InvalidArgument
        }
        c if c.contains("InternalFailure") || c.contains("Unavailable") => ErrorKind::Unavailable,
        _ => ErrorKind::Internal,
    }
}

/// What every Kinesis driver of one bus shares: the client and the shard count of
/// streams it makes.
struct KinesisContext {
    client: aws_sdk_kinesis::Client,
    /// Shards of a stream made by `ensure_topic`.
    shards: i32,
}

/// Kinesis Data Streams as a cloudbus provider (`kinesis://[?region=R][&endpoint=URL]`).
#[derive(Clone)]
pub struct KinesisBus {
    shared: Arc<KinesisContext>,
}

impl std::fmt::Debug for KinesisBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KinesisBus { .. }")
    }
}

impl KinesisBus {
    /// A bus over the Kinesis client made from `config`; streams it creates get 2 shards.
    pub fn new(config: &aws_config::SdkConfig) -> Self {
        Self::with_shards(config, 2)
    }

    /// A bus whose `ensure_topic` creates streams with `shards` shards.
    pub fn with_shards(config: &aws_config::SdkConfig, shards: i32) -> Self {
        KinesisBus {
            shared: Arc::new(KinesisContext {
                client: aws_sdk_kinesis::Client::new(config),
                shards: shards.max(1),
            }),
        }
    }

    /// The Kinesis client (escape hatch, e.g. for resharding).
    pub fn client(&self) -> &aws_sdk_kinesis::Client {
        &self.shared.client
    }

    /// Wraps this driver in the portable [`Bus`].
    pub fn into_bus(self) -> Bus {
        Bus::new(Arc::new(self))
    }

    /// Waits until `stream` is ACTIVE (after creation or a reshard).
    pub async fn wait_active(&self, stream: &str, patience: Duration) -> Result<()> {
        wait_active(&self.shared.client, stream, patience).await
    }
}

async fn wait_active(
    client: &aws_sdk_kinesis::Client,
    stream: &str,
    patience: Duration,
) -> Result<()> {
    let until = tokio::time::Instant::now() + patience;
    loop {
        let d = client
            .describe_stream_summary()
            .stream_name(stream)
            .send()
            .await
            .map_err(|e| crate::error::sdk_error(e, kind_of_code, &format!("stream {stream}")))?;
        if d.stream_description_summary()
            .is_some_and(|s| s.stream_status() == &StreamStatus::Active)
        {
            return Ok(());
        }
        if tokio::time::Instant::now() >= until {
            return Err(Error::new(
                ErrorKind::Timeout,
                format!("stream {stream} did not become ACTIVE within {patience:?}"),
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn not_a_queue(what: &str) -> Error {
    Error::unsupported(format!(
        "Kinesis streams have no {what}: read them with bus.stream_consumer(stream, group), \
         which checkpoints, replays and dead-letters (StreamConsumer::dead_letter_to)"
    ))
}

#[async_trait]
impl BusDriver for KinesisBus {
    fn scheme(&self) -> &str {
        "kinesis"
    }

    async fn topic(&self, topic: &str) -> Result<Arc<dyn TopicDriver>> {
        Ok(Arc::new(KinesisStream {
            shared: self.shared.clone(),
            name: topic.to_owned(),
        }))
    }

    async fn subscription(&self, _topic: &str, _sub: &str) -> Result<Arc<dyn SubscriptionDriver>> {
        Err(not_a_queue("subscriptions"))
    }

    async fn dead_letters(&self, _topic: &str, _sub: &str) -> Result<Arc<dyn DeadLetterDriver>> {
        Err(not_a_queue("dead-letter place"))
    }

    fn topology(&self) -> Arc<dyn TopologyDriver> {
        Arc::new(KinesisTopology {
            shared: self.shared.clone(),
        })
    }

    async fn stream(&self, stream: &str) -> Result<Arc<dyn StreamDriver>> {
        Ok(Arc::new(KinesisStream {
            shared: self.shared.clone(),
            name: stream.to_owned(),
        }))
    }
}

struct KinesisTopology {
    shared: Arc<KinesisContext>,
}

#[async_trait]
impl TopologyDriver for KinesisTopology {
    async fn ensure_topic(&self, topic: &str) -> Result<()> {
        let created = self
            .shared
            .client
            .create_stream()
            .stream_name(topic)
            .shard_count(self.shared.shards)
            .send()
            .await;
        if let Err(e) = created {
            let e = crate::error::sdk_error(e, kind_of_code, &format!("create stream {topic}"));
            if e.kind() != ErrorKind::AlreadyExists {
                return Err(e);
            }
        }
        wait_active(&self.shared.client, topic, Duration::from_secs(60)).await
    }

    async fn ensure_subscription(&self, _spec: &SubscriptionSpec) -> Result<()> {
        Err(not_a_queue("subscriptions"))
    }

    async fn delete_subscription(&self, _topic: &str, _name: &str) -> Result<()> {
        Ok(())
    }

    fn planning(&self) -> Option<&dyn TopologyPlanning> {
        Some(self)
    }
}

#[async_trait]
impl TopologyPlanning for KinesisTopology {
    async fn topic_exists(&self, topic: &str) -> Result<bool> {
        let stream = self
            .shared
            .client
            .describe_stream_summary()
            .stream_name(topic)
            .send()
            .await;
        Ok(stream
            .map_err(|e| crate::error::sdk_error(e, kind_of_code, &format!("stream {topic}")))
            .missing_as_none()?
            .is_some())
    }

    async fn describe_subscription(
        &self,
        _topic: &str,
        _name: &str,
    ) -> Result<Option<SubscriptionState>> {
        Err(not_a_queue("subscriptions"))
    }
}

/// One stream: a [`TopicDriver`] (PutRecords) and a [`StreamDriver`] (shards).
pub struct KinesisStream {
    shared: Arc<KinesisContext>,
    name: String,
}

/// The partition key of `m`: its ordering key, the `partitionkey` extension, or its id.
fn partition_key(m: &OutgoingMessage) -> String {
    let key = m
        .ordering_key
        .clone()
        .or_else(|| {
            m.payload
                .event()
                .and_then(|e| e.partition_key().map(str::to_owned))
        })
        .unwrap_or_else(|| m.id().to_owned());
    // Kinesis partition keys are 1 to 256 Unicode characters.
    let key: String = key.chars().take(256).collect();
    if key.is_empty() { "-".to_owned() } else { key }
}

#[async_trait]
impl TopicDriver for KinesisStream {
    async fn send_batch(&self, batch: &[OutgoingMessage]) -> Result<BatchResults> {
        let (mut results, index, entries) = crate::batch::build_entries(batch, |_, m| {
            let data = match &m.payload {
                Payload::Event(e) => to_structured_json(e),
                Payload::Raw(raw) => Ok(raw.body.clone()),
            }?;
            PutRecordsRequestEntry::builder()
                .data(Blob::new(data))
                .partition_key(partition_key(m))
                .build()
                .map_err(|e| Error::with_source(ErrorKind::InvalidArgument, "record", e))
        });
        if !entries.is_empty() {
            let out = self
                .shared
                .client
                .put_records()
                .stream_name(&self.name)
                .set_records(Some(entries))
                .send()
                .await
                .map_err(|e| {
                    crate::error::sdk_error(
                        e,
                        kind_of_code,
                        &format!("put records on {}", self.name),
                    )
                })?;
            // One result per record, in order; core retries just the failed ones.
            for (slot, r) in index.iter().zip(out.records()) {
                results[*slot] = Some(match r.error_code() {
                    Some(code) => Err(Error::new(
                        kind_of_code(code),
                        format!(
                            "put record on {}: {code}: {}",
                            self.name,
                            r.error_message().unwrap_or_default()
                        ),
                    )),
                    None => Ok(()),
                });
            }
        }
        Ok(crate::batch::finish(results, "Kinesis"))
    }

    fn capabilities(&self) -> Capabilities {
        capabilities()
    }
}

#[async_trait]
impl StreamDriver for KinesisStream {
    async fn partitions(&self) -> Result<Vec<PartitionInfo>> {
        let mut out = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let mut req = self.shared.client.list_shards();
            req = match &next {
                Some(token) => req.next_token(token),
                None => req.stream_name(&self.name),
            };
            let page = req.send().await.map_err(|e| {
                crate::error::sdk_error(e, kind_of_code, &format!("shards of {}", self.name))
            })?;
            for s in page.shards() {
                out.push(PartitionInfo {
                    id: s.shard_id().to_owned(),
                    parents: s
                        .parent_shard_id()
                        .into_iter()
                        .chain(s.adjacent_parent_shard_id())
                        .map(str::to_owned)
                        .collect(),
                    closed: s
                        .sequence_number_range()
                        .and_then(|r| r.ending_sequence_number())
                        .is_some(),
                });
            }
            next = page.next_token().map(str::to_owned);
            if next.is_none() {
                return Ok(out);
            }
        }
    }

    async fn cursor(&self, partition: &str, at: &StartPosition) -> Result<String> {
        let mut req = self
            .shared
            .client
            .get_shard_iterator()
            .stream_name(&self.name)
            .shard_id(partition);
        req = match at {
            StartPosition::Earliest => req.shard_iterator_type(ShardIteratorType::TrimHorizon),
            StartPosition::Latest => req.shard_iterator_type(ShardIteratorType::Latest),
            StartPosition::AtSequence(s) => req
                .shard_iterator_type(ShardIteratorType::AtSequenceNumber)
                .starting_sequence_number(s),
            StartPosition::AfterSequence(s) => req
                .shard_iterator_type(ShardIteratorType::AfterSequenceNumber)
                .starting_sequence_number(s),
            StartPosition::AtTime(t) => req
                .shard_iterator_type(ShardIteratorType::AtTimestamp)
                .timestamp(AwsDateTime::from_millis(t.timestamp_millis())),
        };
        let out = req.send().await.map_err(|e| {
            crate::error::sdk_error(
                e,
                kind_of_code,
                &format!("iterator of {}/{partition}", self.name),
            )
        })?;
        out.shard_iterator()
            .map(|it| format!("{partition}{CURSOR_SEPARATOR}{it}"))
            .ok_or_else(|| Error::not_found(format!("no iterator for {}/{partition}", self.name)))
    }

    async fn read(&self, cursor: &str, max: usize) -> Result<ReadBatch> {
        let (shard, iterator) = cursor
            .split_once(CURSOR_SEPARATOR)
            .ok_or_else(|| Error::invalid("not a Kinesis cursor from this driver"))?;
        let shard = shard.to_owned();
        let out = self
            .shared
            .client
            .get_records()
            .shard_iterator(iterator)
            .limit(max.clamp(1, 10_000) as i32)
            .send()
            .await
            .map_err(|e| {
                crate::error::sdk_error(e, kind_of_code, &format!("read {}", self.name))
            })?;
        let records = out
            .records()
            .iter()
            .map(|r| {
                let body = r.data().as_ref().to_vec();
                let event = from_unlabelled_body(&body)
                    .map(Arc::new)
                    .map_err(|e| (RawMessage::new(body), e));
                StreamRecord {
                    partition: shard.clone(),
                    sequence: r.sequence_number().to_owned(),
                    offset: None,
                    timestamp: r
                        .approximate_arrival_timestamp()
                        .and_then(|t| DateTime::<Utc>::from_timestamp_millis(t.to_millis().ok()?))
                        .unwrap_or_else(Utc::now),
                    event,
                }
            })
            .collect();
        Ok(ReadBatch {
            records,
            next: out
                .next_shard_iterator()
                .map(|it| format!("{shard}{CURSOR_SEPARATOR}{it}")),
            behind: out
                .millis_behind_latest()
                .and_then(|ms| u64::try_from(ms).ok())
                .map(std::time::Duration::from_millis),
        })
    }
}

/// A cursor is `SHARD|ITERATOR`, so that records know their shard (iterators are
/// opaque; shard ids never contain `|`).
const CURSOR_SEPARATOR: char = '|';
