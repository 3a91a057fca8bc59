//! A Kafka topic read as a partitioned log (the stream API): partitions are the
//! topic's, a sequence number is an offset, a cursor is `partition:offset`, and a
//! start at a time is found with `offsets_for_times`. Which reader holds which
//! partition and where it checkpoints is the consumer group's
//! ([`GroupCheckpoints`]: the group coordinator's assignment and the committed
//! offsets) unless the `StreamConsumer` is given a checkpoint store of its own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::Utc;
use cloudbus_driver::{
    CheckpointStore, Error, PartitionInfo, ReadBatch, Result, StartPosition, StreamDriver,
    StreamRecord,
};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::binding;
use crate::checkpoints::GroupCheckpoints;
use crate::connection::{METADATA_TIMEOUT, Shared, blocking, client_config};
use crate::error::kafka_error;
use crate::received::Received;

/// How long a read waits for its first record.
const READ_WAIT: Duration = Duration::from_millis(200);

/// How long a partition's reader is kept unused before it is closed: a reader is a
/// librdkafka client (its threads, its connections), and a partition this process
/// stopped reading (another member of the group holds it now) needs none.
const READER_IDLE: Duration = Duration::from_secs(120);

/// One partition's reader, the offset it reads next, and when it last read.
struct PartitionReader {
    consumer: BaseConsumer,
    next: i64,
    used: Instant,
}

/// Takes the readers unused since `idle` before `now` out of `readers`.
fn idle_readers(
    readers: &mut HashMap<i32, PartitionReader>,
    now: Instant,
    idle: Duration,
) -> Vec<PartitionReader> {
    let stale: Vec<i32> = readers
        .iter()
        .filter(|(_, r)| now.saturating_duration_since(r.used) >= idle)
        .map(|(p, _)| *p)
        .collect();
    stale
        .into_iter()
        .filter_map(|p| readers.remove(&p))
        .collect()
}

/// Reads one topic's partitions.
pub struct KafkaStream {
    shared: Arc<Shared>,
    topic: String,
    readers: Arc<Mutex<HashMap<i32, PartitionReader>>>,
    checkpoints: Arc<GroupCheckpoints>,
}

/// A reader of assigned partitions: it joins no group and commits nothing (librdkafka
/// wants a group id all the same).
fn reader_settings(shared: &Shared) -> Vec<(String, String)> {
    let mut settings = shared.config.client_settings();
    settings.push(("group.id".into(), "cloudbus-stream-reader".into()));
    settings.push(("enable.auto.commit".into(), "false".into()));
    settings.push(("auto.offset.reset".into(), "earliest".into()));
    settings
}

/// `partition:offset`, or `partition:offset@millis` for a start at a time: records
/// stamped before `millis` are passed over until the first one at or after it (a
/// broker may answer a time with the first offset of the record batch holding it:
/// tansu does).
fn cursor_of(partition: i32, offset: i64, not_before: Option<i64>) -> String {
    match not_before {
        Some(ms) => format!("{partition}:{offset}@{ms}"),
        None => format!("{partition}:{offset}"),
    }
}

fn parse_cursor(cursor: &str) -> Result<(i32, i64, Option<i64>)> {
    let (position, not_before) = match cursor.split_once('@') {
        Some((position, ms)) => (position, Some(ms)),
        None => (cursor, None),
    };
    let bad = || Error::invalid(format!("{cursor:?} is not a Kafka stream cursor"));
    let (p, o) = position.split_once(':').ok_or_else(bad)?;
    let not_before = match not_before {
        Some(ms) => Some(ms.parse().map_err(|_| bad())?),
        None => None,
    };
    Ok((
        p.parse().map_err(|_| bad())?,
        o.parse().map_err(|_| bad())?,
        not_before,
    ))
}

fn offset_of(sequence: &str) -> Result<i64> {
    sequence
        .parse()
        .map_err(|_| Error::invalid(format!("{sequence:?} is not a Kafka offset")))
}

impl Drop for KafkaStream {
    /// The readers are closed off the async threads (closing a librdkafka client
    /// waits for its threads and, with the brokers gone, for its requests).
    fn drop(&mut self) {
        let readers = std::mem::take(&mut *self.readers.lock().unwrap_or_else(|p| p.into_inner()));
        if !readers.is_empty() {
            let _ = crate::connection::drop_in_background(readers);
        }
    }
}

impl KafkaStream {
    /// Opens `topic` as a stream; NotFound when it does not exist.
    pub(crate) async fn open(shared: Arc<Shared>, topic: &str) -> Result<Self> {
        shared.partition_count(topic).await?;
        Ok(KafkaStream {
            checkpoints: Arc::new(GroupCheckpoints::new(Arc::clone(&shared), topic)),
            shared,
            topic: topic.to_owned(),
            readers: Arc::new(Mutex::new(HashMap::new())),
        })
    }
}

#[async_trait]
impl StreamDriver for KafkaStream {
    /// The committed offsets of the consumer group named like the reader group.
    fn checkpoints(&self) -> Option<Arc<dyn CheckpointStore>> {
        Some(self.checkpoints.clone())
    }

    async fn partitions(&self) -> Result<Vec<PartitionInfo>> {
        let count = self.shared.partition_count(&self.topic).await?;
        Ok((0..count)
            .map(|p| PartitionInfo {
                id: p.to_string(),
                parents: Vec::new(),
                closed: false,
            })
            .collect())
    }

    async fn cursor(&self, partition: &str, at: &StartPosition) -> Result<String> {
        let p: i32 = partition.parse().map_err(|_| {
            Error::not_found(format!("partition {partition:?} of {:?}", self.topic))
        })?;
        let shared = Arc::clone(&self.shared);
        let topic = self.topic.clone();
        let at = at.clone();
        let not_before = match at {
            StartPosition::AtTime(time) => Some(time.timestamp_millis()),
            _ => None,
        };
        let offset = blocking(move || {
            let watermarks = || {
                shared
                    .metadata
                    .fetch_watermarks(&topic, p, METADATA_TIMEOUT)
                    .map_err(|e| kafka_error(e, &format!("read the watermarks of {topic:?}/{p}")))
            };
            Ok(match at {
                StartPosition::Earliest => watermarks()?.0,
                StartPosition::Latest => watermarks()?.1,
                StartPosition::AtSequence(s) => offset_of(&s)?,
                StartPosition::AfterSequence(s) => offset_of(&s)? + 1,
                StartPosition::AtTime(time) => {
                    let mut wanted = TopicPartitionList::new();
                    let _ = wanted.add_partition_offset(
                        &topic,
                        p,
                        Offset::Offset(time.timestamp_millis()),
                    );
                    let found = shared
                        .metadata
                        .offsets_for_times(wanted, METADATA_TIMEOUT)
                        .map_err(|e| {
                            kafka_error(e, &format!("find the offset of {topic:?}/{p} at {time}"))
                        })?;
                    match found.elements().first().map(|e| e.offset()) {
                        Some(Offset::Offset(o)) => o,
                        // No record at or after that time: from the end.
                        _ => watermarks()?.1,
                    }
                }
            })
        })
        .await?;
        Ok(cursor_of(p, offset, not_before))
    }

    async fn read(&self, cursor: &str, max: usize) -> Result<ReadBatch> {
        let (partition, offset, mut not_before) = parse_cursor(cursor)?;
        let shared = Arc::clone(&self.shared);
        let topic = self.topic.clone();
        let readers = Arc::clone(&self.readers);
        let max = max.max(1);
        let (received, high) = blocking(move || {
            let taken = readers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&partition);
            let mut reader = match taken {
                Some(r) => r,
                None => PartitionReader {
                    consumer: client_config(reader_settings(&shared))
                        .create()
                        .map_err(|e| kafka_error(e, "create a Kafka stream reader"))?,
                    next: -1,
                    used: Instant::now(),
                },
            };
            if reader.next != offset {
                let mut at = TopicPartitionList::new();
                let _ = at.add_partition_offset(&topic, partition, Offset::Offset(offset));
                reader
                    .consumer
                    .assign(&at)
                    .map_err(|e| kafka_error(e, &format!("read {topic:?}/{partition}")))?;
                reader.next = offset;
            }
            let mut out = Vec::new();
            let names = [Arc::<str>::from(topic.as_str())];
            let until = Instant::now() + READ_WAIT;
            while out.len() < max {
                let wait = if out.is_empty() {
                    until.saturating_duration_since(Instant::now())
                } else {
                    Duration::ZERO
                };
                match reader.consumer.poll(wait) {
                    None => break,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "Kafka stream read");
                        if out.is_empty() && Instant::now() < until {
                            continue;
                        }
                        break;
                    }
                    Some(Ok(m)) => {
                        let r = Received::of(&m, &names);
                        reader.next = r.offset + 1;
                        out.push(r);
                    }
                }
            }
            let high = reader
                .consumer
                .fetch_watermarks(&topic, partition, METADATA_TIMEOUT)
                .map(|(_, h)| h)
                .ok();
            reader.used = Instant::now();
            let mut idle = {
                let mut readers = readers.lock().unwrap_or_else(|p| p.into_inner());
                let displaced = readers.insert(partition, reader);
                let mut idle = idle_readers(&mut readers, Instant::now(), READER_IDLE);
                idle.extend(displaced);
                idle
            };
            // Closing a client waits for its threads: off this read, on a thread of
            // its own.
            if !idle.is_empty() {
                let _ = crate::connection::drop_in_background(std::mem::take(&mut idle));
            }
            Ok((out, high))
        })
        .await?;
        let next = received.last().map_or(offset, |r| r.offset + 1);
        let received: Vec<Received> = received
            .into_iter()
            .filter(|r| match (not_before, r.timestamp) {
                (Some(ms), Some(t)) if t.timestamp_millis() < ms => false,
                _ => {
                    not_before = None;
                    true
                }
            })
            .collect();
        let behind = match (high, received.last()) {
            (Some(h), _) if next >= h => Some(Duration::ZERO),
            (Some(_), Some(last)) => last
                .timestamp
                .map(|t| (Utc::now() - t).to_std().unwrap_or_default()),
            _ => None,
        };
        let records = received
            .into_iter()
            .map(|r| StreamRecord {
                partition: partition.to_string(),
                sequence: r.offset.to_string(),
                offset: Some(r.offset),
                timestamp: r.timestamp.unwrap_or_else(Utc::now),
                event: binding::decode(&r.record).map(Arc::new),
            })
            .collect();
        Ok(ReadBatch {
            records,
            next: Some(cursor_of(partition, next, not_before)),
            behind,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(used: Instant) -> PartitionReader {
        PartitionReader {
            consumer: rdkafka::ClientConfig::new()
                .set("bootstrap.servers", "127.0.0.1:1")
                .set("group.id", "cloudbus-stream-reader")
                .create()
                .expect("a reader"),
            next: 0,
            used,
        }
    }

    /// Readers of partitions not read for `READER_IDLE` are closed (they were kept
    /// for the stream's life before: a librdkafka client each, its threads too);
    /// those in use stay.
    #[test]
    fn idle_readers_are_taken_out_and_busy_ones_stay() {
        let then = Instant::now();
        let now = then + READER_IDLE + Duration::from_secs(1);
        let mut readers = HashMap::new();
        readers.insert(0, reader(then));
        readers.insert(1, reader(now));
        let idle = idle_readers(&mut readers, now, READER_IDLE);
        assert_eq!(idle.len(), 1);
        assert_eq!(readers.keys().copied().collect::<Vec<_>>(), [1]);
        assert!(idle_readers(&mut readers, now, READER_IDLE).is_empty());
    }
}
