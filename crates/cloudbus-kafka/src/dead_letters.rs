//! The dead letters of a subscription: the records of `<topic>.<subscription>.dlq`
//! from the committed offsets of the group `<topic>.<subscription>.dlq-reader` on.
//! A Kafka topic cannot delete one record, so redrive and purge move that group's
//! offsets past what they handled (a peek afterwards does not show it; the records
//! stay until the topic's retention removes them). Redrive writes each letter to the
//! subscription's retry topic, without its attempt count, so that only the
//! subscription it came from sees it again (the source topic would deliver it to
//! every subscription).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use cloudbus_driver::{DeadLetter, DeadLetterDriver, Payload, Result};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use crate::binding;
use crate::connection::{
    METADATA_TIMEOUT, Shared, blocking, client_config, dead_letter_group, dead_letter_topic,
    retry_topic,
};
use crate::error::kafka_error;
use crate::headers;
use crate::producer::send_records;
use crate::received::Received;

/// How long a read waits for the first dead letter, and then for each next one.
const FIRST_WAIT: Duration = Duration::from_millis(1500);
const IDLE_WAIT: Duration = Duration::from_millis(700);
/// Letters handled per round of an unbounded redrive or purge.
const CHUNK: usize = 500;

/// Reads and manages the dead letters of one subscription.
pub struct KafkaDeadLetters {
    shared: Arc<Shared>,
    topic: String,
    name: String,
}

/// Letters read, and the reader that read them (to commit past them).
struct Read {
    reader: BaseConsumer,
    letters: Vec<Received>,
}

impl KafkaDeadLetters {
    pub(crate) fn new(shared: Arc<Shared>, topic: &str, name: &str) -> Self {
        KafkaDeadLetters {
            shared,
            topic: topic.to_owned(),
            name: name.to_owned(),
        }
    }

    /// Up to `max` letters from the reader group's committed offsets, written before
    /// `before` (a redrive or purge does not go round after letters that came back).
    async fn read(&self, max: usize, before: Option<DateTime<Utc>>) -> Result<Read> {
        let dlq = dead_letter_topic(&self.topic, &self.name);
        let partitions = self.shared.partition_count(&dlq).await?;
        let mut settings = self
            .shared
            .config
            .consumer_settings(&dead_letter_group(&self.topic, &self.name));
        // A fetch with nothing to return comes back at once, so that the idle wait
        // below means "nothing more", not "the broker held the fetch".
        settings.push(("fetch.wait.max.ms".into(), "50".into()));
        blocking(move || {
            let reader: BaseConsumer = client_config(settings)
                .create()
                .map_err(|e| kafka_error(e, "create the dead-letter reader"))?;
            let mut wanted = TopicPartitionList::new();
            for p in 0..partitions {
                let _ = wanted.add_partition_offset(&dlq, p as i32, Offset::Invalid);
            }
            let committed = reader
                .committed_offsets(wanted, METADATA_TIMEOUT)
                .map_err(|e| kafka_error(e, &format!("read the offsets of {dlq:?}")))?;
            let mut start = TopicPartitionList::new();
            for e in committed.elements() {
                let offset = match e.offset() {
                    Offset::Offset(o) => Offset::Offset(o),
                    _ => Offset::Beginning,
                };
                let _ = start.add_partition_offset(e.topic(), e.partition(), offset);
            }
            reader
                .assign(&start)
                .map_err(|e| kafka_error(e, &format!("read {dlq:?}")))?;
            let mut letters = Vec::new();
            let mut stopped = std::collections::HashSet::new();
            let mut wait = FIRST_WAIT;
            let mut until = Instant::now() + wait;
            while letters.len() < max {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match reader.poll(left) {
                    None => break,
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, "reading dead letters");
                    }
                    Some(Ok(m)) => {
                        let r = Received::of(&m, &[]);
                        if stopped.contains(&r.partition) {
                            continue;
                        }
                        if let (Some(limit), Some(at)) = (before, r.timestamp)
                            && at > limit
                        {
                            // Written after the redrive began (a letter that came
                            // back): this round ends in its partition there, so that
                            // nothing after it is committed past unseen.
                            stopped.insert(r.partition);
                            continue;
                        }
                        letters.push(r);
                        wait = IDLE_WAIT;
                        until = Instant::now() + wait;
                    }
                }
            }
            // Oldest first across partitions.
            letters.sort_by_key(|r| (r.timestamp, r.partition, r.offset));
            letters.truncate(max);
            Ok(Read { reader, letters })
        })
        .await
    }

    /// Commits the reader group past `letters` (per partition, past the highest).
    async fn commit_past(&self, read: Read, letters: &[Received]) -> Result<()> {
        let mut next: std::collections::BTreeMap<(String, i32), i64> = Default::default();
        for r in letters {
            let e = next.entry((r.topic.to_string(), r.partition)).or_insert(0);
            *e = (*e).max(r.offset + 1);
        }
        if next.is_empty() {
            return Ok(());
        }
        blocking(move || {
            let mut tpl = TopicPartitionList::new();
            for ((topic, partition), offset) in next {
                let _ = tpl.add_partition_offset(&topic, partition, Offset::Offset(offset));
            }
            read.reader
                .commit(&tpl, CommitMode::Sync)
                .map_err(|e| kafka_error(e, "commit past the dead letters handled"))
        })
        .await
    }

    /// Handles up to `max` letters (all written before now when `None`) in rounds:
    /// `each` is given a round's letters and answers how many of them (a prefix) it
    /// handled; the reader group is committed past those.
    async fn rounds<F, Fut>(&self, max: Option<usize>, mut each: F) -> Result<usize>
    where
        F: FnMut(Vec<Received>) -> Fut,
        Fut: std::future::Future<Output = (usize, Option<cloudbus_driver::Error>)>,
    {
        let began = Utc::now();
        let mut done = 0;
        loop {
            let want = match max {
                Some(m) => (m - done).min(CHUNK),
                None => CHUNK,
            };
            if want == 0 {
                return Ok(done);
            }
            let read = self.read(want, Some(began)).await?;
            if read.letters.is_empty() {
                return Ok(done);
            }
            let letters = read.letters.clone();
            let count = letters.len();
            let (handled, failure) = each(letters.clone()).await;
            // Commit only the handled prefix of each partition (letters are in order).
            let mut handled_letters = letters[..handled].to_vec();
            if failure.is_some() {
                let failed: Vec<(i32, i64)> = letters[handled..]
                    .iter()
                    .map(|r| (r.partition, r.offset))
                    .collect();
                handled_letters.retain(|r| {
                    !failed
                        .iter()
                        .any(|(p, o)| *p == r.partition && *o < r.offset)
                });
            }
            let handled = handled_letters.len();
            self.commit_past(read, &handled_letters).await?;
            done += handled;
            if let Some(e) = failure {
                return if done == 0 { Err(e) } else { Ok(done) };
            }
            if count < want {
                return Ok(done);
            }
        }
    }
}

/// A dead letter as cloudbus reports it.
fn letter_of(r: &Received, source: &str) -> DeadLetter {
    let payload = match binding::decode(&r.record) {
        Ok(event) => Payload::Event(Arc::new(event)),
        Err((raw, _)) => Payload::Raw(raw),
    };
    DeadLetter {
        payload,
        reason: headers::text(&r.record, headers::DEAD_LETTER_REASON).map(str::to_owned),
        description: headers::text(&r.record, headers::DEAD_LETTER_DESCRIPTION).map(str::to_owned),
        source_entity: Some(source.to_owned()),
        attempts: headers::number(&r.record, headers::ATTEMPT).unwrap_or(0),
        dead_lettered_at: headers::text(&r.record, headers::DEAD_LETTERED_AT)
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc))
            .or(r.timestamp),
    }
}

#[async_trait]
impl DeadLetterDriver for KafkaDeadLetters {
    async fn peek(&self, max: usize) -> Result<Vec<DeadLetter>> {
        let source = format!("{}/{}", self.topic, self.name);
        let read = self.read(max, None).await?;
        Ok(read.letters.iter().map(|r| letter_of(r, &source)).collect())
    }

    async fn redrive(&self, max: Option<usize>) -> Result<usize> {
        let retry = retry_topic(&self.topic, &self.name);
        let shared = Arc::clone(&self.shared);
        self.rounds(max, |letters| {
            let shared = Arc::clone(&shared);
            let retry = retry.clone();
            async move {
                let records: Vec<_> = letters
                    .iter()
                    .map(|r| headers::without_internal(&r.record))
                    .collect();
                let sent = send_records(&shared, &retry, &records).await;
                let handled = sent.iter().take_while(|r| r.is_ok()).count();
                let failure = sent.into_iter().find_map(|r| r.err());
                (handled, failure)
            }
        })
        .await
    }

    async fn purge(&self, max: Option<usize>) -> Result<usize> {
        self.rounds(max, |letters| async move { (letters.len(), None) })
            .await
    }
}
