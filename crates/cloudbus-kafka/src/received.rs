//! A record as a consumer read it: where it sits (topic, partition, offset), when the
//! broker or its producer stamped it, and its key, headers and value in the binding's
//! terms, copied out of librdkafka's buffer.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use rdkafka::Message;
use rdkafka::message::{Headers, Timestamp};

use crate::binding::KafkaRecord;

/// The header a record gets in place of headers that could not be read.
pub(crate) const UNREADABLE_HEADERS: &str = "cloudbus-unreadable-headers";

/// One record read from a partition.
#[derive(Clone, Debug)]
pub(crate) struct Received {
    /// Shared with the reader's other records of the topic (see [`Received::of`]).
    pub(crate) topic: Arc<str>,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) timestamp: Option<DateTime<Utc>>,
    pub(crate) record: KafkaRecord,
}

impl Received {
    /// Copies `message` out of the client's buffer. Its topic name is taken from
    /// `topics` when it is one of them (a reader reads a few topics: no allocation per
    /// record for the name).
    pub(crate) fn of<M: Message>(message: &M, topics: &[Arc<str>]) -> Self {
        // rdkafka's header iterator panics on a header name that is not UTF-8 (Kafka
        // names are bytes; other clients write such names): the record is then kept
        // with one header saying so, and is dead-lettered as malformed rather than
        // lost or failing every read of its partition.
        let headers = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            message
                .headers()
                .map(|hs| {
                    hs.iter()
                        .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        }))
        .unwrap_or_else(|_| {
            vec![(
                UNREADABLE_HEADERS.to_owned(),
                Some(b"a header name is not UTF-8; the headers were dropped".to_vec()),
            )]
        });
        let timestamp = match message.timestamp() {
            Timestamp::CreateTime(ms) | Timestamp::LogAppendTime(ms) => {
                DateTime::from_timestamp_millis(ms)
            }
            Timestamp::NotAvailable => None,
        };
        let topic = message.topic();
        let topic = topics
            .iter()
            .find(|t| ***t == *topic)
            .map_or_else(|| Arc::from(topic), Arc::clone);
        Received {
            topic,
            partition: message.partition(),
            offset: message.offset(),
            timestamp,
            record: KafkaRecord {
                key: message.key().map(<[u8]>::to_vec),
                headers,
                payload: message.payload().map(<[u8]>::to_vec),
            },
        }
    }
}
