//! cloudbus's own record headers on the retry and dead-letter topics: the attempt
//! count, when a retried record is due, where the record first came from (topic,
//! partition, offset) and why it was dead-lettered. Values are UTF-8 text (decimal
//! numbers, RFC 3339 times), readable by any Kafka tool; the names start with
//! `cloudbus-`, so the CloudEvents binding never takes them for attributes.

use chrono::{DateTime, Utc};

use crate::binding::{INTERNAL_HEADER_PREFIX, KafkaRecord};

/// Deliveries the record had before it was retried or dead-lettered.
pub const ATTEMPT: &str = "cloudbus-attempt";
/// A retried record is not delivered before this time (milliseconds since the epoch).
pub const NOT_BEFORE: &str = "cloudbus-not-before";
/// The topic the record was first published to.
pub const ORIGINAL_TOPIC: &str = "cloudbus-original-topic";
/// Its partition there.
pub const ORIGINAL_PARTITION: &str = "cloudbus-original-partition";
/// Its offset there.
pub const ORIGINAL_OFFSET: &str = "cloudbus-original-offset";
/// Why it was dead-lettered (the short reason).
pub const DEAD_LETTER_REASON: &str = "cloudbus-dead-letter-reason";
/// The longer description of why.
pub const DEAD_LETTER_DESCRIPTION: &str = "cloudbus-dead-letter-description";
/// When it was dead-lettered (RFC 3339).
pub const DEAD_LETTERED_AT: &str = "cloudbus-dead-lettered-at";

/// The last value of header `name` as text.
pub fn text<'a>(record: &'a KafkaRecord, name: &str) -> Option<&'a str> {
    record
        .headers
        .iter()
        .rev()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| v.as_deref())
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// The last value of header `name` as a number.
pub fn number<T: std::str::FromStr>(record: &KafkaRecord, name: &str) -> Option<T> {
    text(record, name).and_then(|v| v.trim().parse().ok())
}

/// When a retried record is due, if it says.
pub fn not_before(record: &KafkaRecord) -> Option<DateTime<Utc>> {
    number::<i64>(record, NOT_BEFORE).and_then(DateTime::from_timestamp_millis)
}

/// Where a record came from: the origin it carries, else `(topic, partition, offset)`.
pub struct Origin<'a> {
    /// The topic.
    pub topic: &'a str,
    /// The partition.
    pub partition: i32,
    /// The offset.
    pub offset: i64,
}

/// `record` with cloudbus's own headers replaced by `set` (the others kept in order),
/// and the origin kept from the first time it was moved.
pub fn with_headers(
    record: &KafkaRecord,
    origin: &Origin<'_>,
    set: &[(&str, String)],
) -> KafkaRecord {
    let first_origin = text(record, ORIGINAL_TOPIC).is_some();
    let mut headers: Vec<(String, Option<Vec<u8>>)> = record
        .headers
        .iter()
        .filter(|(k, _)| {
            !k.starts_with(INTERNAL_HEADER_PREFIX)
                || (first_origin
                    && [ORIGINAL_TOPIC, ORIGINAL_PARTITION, ORIGINAL_OFFSET].contains(&k.as_str()))
        })
        .cloned()
        .collect();
    if !first_origin {
        headers.push((
            ORIGINAL_TOPIC.into(),
            Some(origin.topic.as_bytes().to_vec()),
        ));
        headers.push((
            ORIGINAL_PARTITION.into(),
            Some(origin.partition.to_string().into_bytes()),
        ));
        headers.push((
            ORIGINAL_OFFSET.into(),
            Some(origin.offset.to_string().into_bytes()),
        ));
    }
    for (name, value) in set {
        headers.push(((*name).to_owned(), Some(value.clone().into_bytes())));
    }
    KafkaRecord {
        key: record.key.clone(),
        headers,
        payload: record.payload.clone(),
    }
}

/// `record` without cloudbus's own headers (a redriven dead letter starts afresh).
pub fn without_internal(record: &KafkaRecord) -> KafkaRecord {
    KafkaRecord {
        key: record.key.clone(),
        headers: record
            .headers
            .iter()
            .filter(|(k, _)| !k.starts_with(INTERNAL_HEADER_PREFIX))
            .cloned()
            .collect(),
        payload: record.payload.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(headers: &[(&str, &str)]) -> KafkaRecord {
        KafkaRecord {
            key: Some(b"k".to_vec()),
            headers: headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), Some(v.as_bytes().to_vec())))
                .collect(),
            payload: Some(b"{}".to_vec()),
        }
    }

    #[test]
    fn the_first_origin_is_kept_and_internal_headers_replaced() {
        let first = record(&[("ce_id", "1"), (ATTEMPT, "1")]);
        let origin = Origin {
            topic: "orders",
            partition: 2,
            offset: 7,
        };
        let retried = with_headers(&first, &origin, &[(ATTEMPT, "1".into())]);
        assert_eq!(text(&retried, ORIGINAL_TOPIC), Some("orders"));
        assert_eq!(number::<i64>(&retried, ORIGINAL_OFFSET), Some(7));
        let later = Origin {
            topic: "orders.s.retry",
            partition: 0,
            offset: 3,
        };
        let again = with_headers(&retried, &later, &[(ATTEMPT, "2".into())]);
        assert_eq!(text(&again, ORIGINAL_TOPIC), Some("orders"));
        assert_eq!(number::<u32>(&again, ATTEMPT), Some(2));
        assert_eq!(
            again.headers.iter().filter(|(k, _)| k == ATTEMPT).count(),
            1
        );
        assert_eq!(text(&again, "ce_id"), Some("1"));
        assert_eq!(again.key.as_deref(), Some(&b"k"[..]));
        let clean = without_internal(&again);
        assert_eq!(clean.headers.len(), 1);
    }

    #[test]
    fn a_malformed_number_is_no_number() {
        let r = record(&[(ATTEMPT, "two"), (NOT_BEFORE, "")]);
        assert_eq!(number::<u32>(&r, ATTEMPT), None);
        assert_eq!(not_before(&r), None);
    }
}
