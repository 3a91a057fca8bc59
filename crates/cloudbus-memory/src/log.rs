//! The memory broker's partitioned log: records appended per partition (by ordering
//! key), read by cursor, with replay from an offset or a time. Bounded: a full
//! partition refuses appends with a typed error.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use cloudbus_driver::{
    BinaryCodec, Error, ErrorKind, OutgoingMessage, PartitionInfo, Payload, ReadBatch, Result,
    StartPosition, StreamDriver, StreamRecord,
};

struct Record {
    timestamp: DateTime<Utc>,
    payload: Payload,
}

pub(crate) struct Log {
    partitions: Vec<Mutex<Vec<Record>>>,
    max_records_per_partition: usize,
}

impl Log {
    pub fn new(partitions: usize, max_records_per_partition: usize) -> Self {
        Log {
            partitions: (0..partitions.max(1))
                .map(|_| Mutex::new(Vec::new()))
                .collect(),
            max_records_per_partition,
        }
    }

    fn partition_for(&self, msg: &OutgoingMessage) -> usize {
        let key = msg.ordering_key.as_deref().unwrap_or(msg.id());
        cloudbus_driver::hashing::key_slot(key, self.partitions.len())
    }

    pub fn append(&self, batch: &[OutgoingMessage]) -> Vec<Result<()>> {
        batch
            .iter()
            .map(|msg| {
                let p = self.partition_for(msg);
                let mut records = self.partitions[p]
                    .lock()
                    .map_err(|_| Error::new(ErrorKind::Internal, "log lock poisoned"))?;
                if records.len() >= self.max_records_per_partition {
                    return Err(Error::new(
                        ErrorKind::ResourceExhausted,
                        format!(
                            "partition {p} holds its maximum of {} records",
                            self.max_records_per_partition
                        ),
                    ));
                }
                // Timestamps never go backwards within a partition, so time lookups can bisect.
                let now = Utc::now();
                let timestamp = records.last().map_or(now, |r| r.timestamp.max(now));
                records.push(Record {
                    timestamp,
                    payload: msg.payload.clone(),
                });
                Ok(())
            })
            .collect()
    }
}

/// [`StreamDriver`] over a memory log. Cursors are `partition:offset`.
pub(crate) struct LogReader {
    pub log: Arc<Log>,
    pub codec: BinaryCodec,
}

fn parse_cursor(cursor: &str) -> Result<(usize, usize)> {
    let bad = || Error::invalid(format!("invalid cursor {cursor:?}"));
    let (p, o) = cursor.split_once(':').ok_or_else(bad)?;
    Ok((p.parse().map_err(|_| bad())?, o.parse().map_err(|_| bad())?))
}

fn parse_sequence(seq: &str) -> Result<usize> {
    seq.parse()
        .map_err(|_| Error::invalid(format!("invalid sequence number {seq:?}")))
}

#[async_trait]
impl StreamDriver for LogReader {
    async fn partitions(&self) -> Result<Vec<PartitionInfo>> {
        Ok((0..self.log.partitions.len())
            .map(|i| PartitionInfo {
                id: i.to_string(),
                parents: Vec::new(),
                closed: false,
            })
            .collect())
    }

    async fn cursor(&self, partition: &str, at: &StartPosition) -> Result<String> {
        let p: usize = partition
            .parse()
            .ok()
            .filter(|p| *p < self.log.partitions.len())
            .ok_or_else(|| Error::not_found(format!("no partition {partition:?}")))?;
        let records = self.log.partitions[p]
            .lock()
            .map_err(|_| Error::new(ErrorKind::Internal, "log lock poisoned"))?;
        let offset = match at {
            StartPosition::Earliest => 0,
            StartPosition::Latest => records.len(),
            StartPosition::AtSequence(s) => parse_sequence(s)?,
            StartPosition::AfterSequence(s) => parse_sequence(s)? + 1,
            StartPosition::AtTime(t) => records.partition_point(|r| r.timestamp < *t),
        };
        Ok(format!("{p}:{}", offset.min(records.len())))
    }

    async fn read(&self, cursor: &str, max: usize) -> Result<ReadBatch> {
        let (p, offset) = parse_cursor(cursor)?;
        let slots = self
            .log
            .partitions
            .get(p)
            .ok_or_else(|| Error::not_found(format!("no partition {p}")))?;
        let (taken, behind): (Vec<(usize, DateTime<Utc>, Payload)>, std::time::Duration) = {
            let records = slots
                .lock()
                .map_err(|_| Error::new(ErrorKind::Internal, "log lock poisoned"))?;
            let end = records.len().min(offset.saturating_add(max));
            // As Kinesis's MillisBehindLatest: from the last record read (or the read
            // position) to the newest one; zero when this read reaches the end.
            let behind = match (records.last(), end < records.len()) {
                (Some(newest), true) => (newest.timestamp - records[end.max(1) - 1].timestamp)
                    .to_std()
                    .unwrap_or_default(),
                _ => std::time::Duration::ZERO,
            };
            let taken = (offset.min(end)..end)
                .map(|i| (i, records[i].timestamp, records[i].payload.clone()))
                .collect();
            (taken, behind)
        };
        let next = offset + taken.len();
        let records = taken
            .into_iter()
            .map(|(i, timestamp, payload)| StreamRecord {
                partition: p.to_string(),
                sequence: i.to_string(),
                offset: None,
                timestamp,
                event: match payload {
                    Payload::Event(e) => Ok(e),
                    Payload::Raw(raw) => match self.codec.decode(&raw) {
                        Ok(e) => Ok(Arc::new(e)),
                        Err(err) => Err((raw, err)),
                    },
                },
            })
            .collect();
        Ok(ReadBatch {
            records,
            next: Some(format!("{p}:{next}")),
            behind: Some(behind),
        })
    }
}
