//! Partitioned logs (Kinesis shards, the memory broker's log): partitions, cursor
//! positions, checkpoints through a pluggable [`CheckpointStore`], replay from a
//! position or a time. Consumption is checkpoint-based, not ack-based: a
//! [`StreamConsumer`] hands records to a handler in order per partition, retries
//! failures with backoff, dead-letters what still fails (never skipping silently),
//! and checkpoints after each batch. Parents are read to their end before children.
//! Readers of one group share the partitions: each reads only those it holds a lease
//! on in its [`CheckpointStore`], so no two readers own a partition at once.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

pub use crate::checkpoint::{CheckpointStore, MemoryCheckpointStore};
use crate::driver_call::panic_safe;
use crate::handler::{Handler, HandlerError, HandlerRunner};
use crate::retry::RetryPolicy;
use cloudbus_driver::codec::RawMessage;
use cloudbus_driver::driver::DeadLetterSink;
pub use cloudbus_driver::driver::{
    PartitionInfo, ReadBatch, StartPosition, StreamDriver, StreamRecord,
};
use cloudbus_driver::error::{Error, ErrorKind, Result};
use cloudbus_driver::event::EXT_DEAD_LETTER_REASON;

/// Counts of one [`StreamConsumer::poll`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PollReport {
    /// Records handled successfully.
    pub handled: usize,
    /// Records dead-lettered after their last attempt (or malformed).
    pub dead_lettered: usize,
    /// Partitions read to their end during this poll.
    pub partitions_finished: usize,
    /// Partitions whose read failed during this poll while others made progress
    /// (logged; the next poll reads them again from where they were). A poll in
    /// which reads failed and nothing was handled returns the first error instead.
    pub partitions_failed: usize,
}

/// Reads every partition of a stream with checkpoints.
///
/// ```
/// # async fn demo(driver: std::sync::Arc<dyn cloudbus_core::StreamDriver>) -> cloudbus_core::Result<()> {
/// use std::sync::Arc;
/// use cloudbus_core::{Event, HandlerContext, HandlerError, StartPosition, StreamConsumer};
/// let mut reader = StreamConsumer::new(driver, "analytics").start_at(StartPosition::Earliest);
/// let handler = |e: Arc<Event>, _c: HandlerContext| async move { Ok::<(), HandlerError>(()) };
/// let report = reader.poll(&handler).await?;
/// println!("handled {}", report.handled);
/// # Ok(()) }
/// ```
pub struct StreamConsumer {
    driver: Arc<dyn StreamDriver>,
    group: String,
    store: Arc<dyn CheckpointStore>,
    /// This reader's name in the store's leases.
    owner: String,
    /// How long a partition stays this reader's without a renewal.
    lease: Duration,
    /// The partitions this reader holds a lease on.
    owned: HashSet<String>,
    start: StartPosition,
    retry: RetryPolicy,
    batch: usize,
    dead_letter: Option<Arc<dyn DeadLetterSink>>,
    cursors: HashMap<String, String>,
    /// The last record handled per partition in this process, to reopen a partition
    /// exactly there when its cursor expired.
    handled_up_to: HashMap<String, String>,
    finished: HashSet<String>,
    replaying: Option<StartPosition>,
    runner: HandlerRunner,
    /// Set when a record failed for good with no dead-letter place: `run` stops there
    /// instead of pausing and trying again.
    halted: bool,
}

impl StreamConsumer {
    /// A consumer group `group` over `driver`, starting at `Latest` where it has no
    /// checkpoint. Its checkpoints are the ones the log keeps itself
    /// ([`StreamDriver::checkpoints`]: a Kafka consumer group's committed offsets),
    /// else in memory, until [`checkpoints`](Self::checkpoints) gives a store.
    pub fn new(driver: Arc<dyn StreamDriver>, group: impl Into<String>) -> Self {
        let group = group.into();
        let runner = HandlerRunner::new(group.clone());
        let store = driver
            .checkpoints()
            .unwrap_or_else(|| Arc::new(MemoryCheckpointStore::new()));
        StreamConsumer {
            driver,
            runner,
            group,
            store,
            owner: uuid::Uuid::new_v4().to_string(),
            lease: Duration::from_secs(30),
            owned: HashSet::new(),
            start: StartPosition::Latest,
            retry: RetryPolicy::default().max_attempts(3),
            batch: 500,
            dead_letter: None,
            cursors: HashMap::new(),
            handled_up_to: HashMap::new(),
            finished: HashSet::new(),
            replaying: None,
            halted: false,
        }
    }
    /// Where partitions without a checkpoint start.
    pub fn start_at(mut self, start: StartPosition) -> Self {
        self.start = start;
        self
    }
    /// The checkpoint store, shared by every reader of the group (durable ones are in
    /// `cloudbus-store`). It wins over the checkpoints the log keeps itself: on Kafka,
    /// a reader given a store joins no consumer group and commits no offsets.
    pub fn checkpoints(mut self, store: Arc<dyn CheckpointStore>) -> Self {
        self.store = store;
        self
    }
    /// This reader's name in the partition leases (default: a random UUID). With a
    /// lease-based store (memory, the durable stores) a reader restarted under the
    /// same name takes its partitions back at once. On Kafka's own checkpoints the
    /// name only tells this process's group members apart: a restarted reader joins
    /// the group as a new member and is given partitions at the group's next
    /// rebalance (once the old member left, or its session timed out).
    pub fn owner(mut self, owner: impl Into<String>) -> Self {
        self.owner = owner.into();
        self
    }
    /// How long a partition stays this reader's without a renewal (default 30 s). It is
    /// renewed on every poll, so it must outlast the handling of one batch; it is also
    /// how long the partitions of a reader that died wait for another reader.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// Gives up every partition this reader holds (their checkpoints stay), so that
    /// the other readers of the group take them over at once. [`run`](Self::run) does
    /// it when it stops; a reader driven by [`poll`](Self::poll) calls it itself.
    pub async fn release(&mut self) -> Result<()> {
        let mut first_error = None;
        let owned: Vec<String> = self.owned.iter().cloned().collect();
        for partition in owned {
            self.cursors.remove(&partition);
            self.handled_up_to.remove(&partition);
            // Forgotten only once given up: a release cancelled half way gives up the
            // rest when called again.
            if let Err(e) = self
                .store
                .release(&self.group, &partition, &self.owner)
                .await
            {
                first_error.get_or_insert(e);
            }
            self.owned.remove(&partition);
        }
        if let Err(e) = self.store.release_owner(&self.group, &self.owner).await {
            first_error.get_or_insert(e);
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Forgets where this reader was in `partition`, which another reader owns now: if
    /// it gets the partition back, it starts at the store's checkpoint.
    fn lose(&mut self, partition: &str) {
        if self.owned.remove(partition) {
            tracing::info!(group = %self.group, partition, "partition owned by another reader now");
        }
        self.cursors.remove(partition);
        self.handled_up_to.remove(partition);
    }
    /// Attempts per record before it is dead-lettered.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }
    /// Records per read.
    pub fn batch_size(mut self, n: usize) -> Self {
        self.batch = n.max(1);
        self
    }
    /// Where records go that fail every attempt or are malformed. Without it, such a
    /// record stops the partition with an error (nothing is skipped silently).
    pub fn dead_letter_to(mut self, sink: impl DeadLetterSink) -> Self {
        self.dead_letter = Some(Arc::new(sink));
        self
    }

    /// Forgets the positions and reads every partition again from `from`, ignoring
    /// checkpoints (they are updated as the replay proceeds).
    pub fn replay(&mut self, from: StartPosition) {
        self.start = from.clone();
        self.cursors.clear();
        self.handled_up_to.clear();
        self.finished.clear();
        self.replaying = Some(from);
    }

    /// One pass: reads one batch from every readable partition and handles it. The
    /// handler's wiring is checked first ([`Handler::check_wiring`]): a miswired
    /// [`Router`](crate::Router) is an error before anything is read.
    pub async fn poll<H: Handler + ?Sized>(&mut self, handler: &H) -> Result<PollReport> {
        handler.check_wiring()?;
        let mut never = std::pin::pin!(std::future::pending::<()>());
        Ok(self.poll_until(handler, &mut never).await?.0)
    }

    /// [`poll`](Self::poll) that stops between records once `stop` has resolved,
    /// checkpointing what was handled; `true` when it stopped early.
    async fn poll_until<H: Handler + ?Sized, S: std::future::Future<Output = ()>>(
        &mut self,
        handler: &H,
        stop: &mut std::pin::Pin<&mut S>,
    ) -> Result<(PollReport, bool)> {
        use futures::FutureExt;
        self.halted = false;
        let partitions = panic_safe("partitions", self.driver.partitions()).await?;
        let known: HashSet<&str> = partitions.iter().map(|p| p.id.as_str()).collect();
        let mut report = PollReport::default();
        // A partition whose read fails is passed over for this pass (its cursor and
        // checkpoint stay where they were), so that one failing read does not hold
        // back the others.
        let mut first_failure = None;
        for p in &partitions {
            if self.finished.contains(&p.id) {
                continue;
            }
            // A child waits until its parents (those still in the stream) are read out.
            let parents_done = p
                .parents
                .iter()
                .all(|parent| !known.contains(parent.as_str()) || self.finished.contains(parent));
            if !parents_done {
                continue;
            }
            // Take the partition, or renew this reader's lease on it.
            if !self
                .store
                .acquire(&self.group, &p.id, &self.owner, self.lease)
                .await?
            {
                self.lose(&p.id);
                continue;
            }
            self.owned.insert(p.id.clone());
            let read = match self.read_partition(&p.id).await {
                Err(e) if e.kind() == ErrorKind::LeaseExpired => {
                    // A cursor (Kinesis shard iterator) lives for minutes only; reusing
                    // the dead one would stall the partition for good. Reopen it where
                    // this consumer got to.
                    tracing::info!(partition = %p.id, error = %e, "cursor expired; reopening the partition from its checkpoint");
                    self.cursors.remove(&p.id);
                    self.read_partition(&p.id).await
                }
                other => other,
            };
            let batch = match read {
                Ok(batch) => {
                    if let Some(behind) = batch.behind {
                        crate::telemetry::record_stream_lag(&self.group, &p.id, behind);
                    }
                    batch
                }
                Err(e) => {
                    tracing::warn!(group = %self.group, partition = %p.id, error = %e, "stream read failed; the next poll reads this partition again");
                    report.partitions_failed += 1;
                    first_failure.get_or_insert(e);
                    continue;
                }
            };
            let mut last = None;
            let mut stopped = false;
            for record in &batch.records {
                match self.handle_record(handler, record).await {
                    Ok(true) => report.handled += 1,
                    Ok(false) => report.dead_lettered += 1,
                    Err(RecordError::Halt(e)) => {
                        self.halted = true;
                        return Err(e);
                    }
                    Err(RecordError::Failed(e)) => return Err(e),
                }
                last = Some(record.sequence.clone());
                if stop.as_mut().now_or_never().is_some() {
                    stopped = true;
                    break;
                }
            }
            if let Some(seq) = last {
                if !self
                    .store
                    .save(&self.group, &p.id, &self.owner, &seq)
                    .await?
                {
                    // The lease lapsed while the batch was handled and another reader
                    // took the partition: it reads on from the last checkpoint, so
                    // these records may be handled twice, never lost.
                    self.lose(&p.id);
                    if stopped {
                        return Ok((report, true));
                    }
                    continue;
                }
                self.handled_up_to.insert(p.id.clone(), seq);
            }
            if stopped {
                // The rest of this batch was not handled: the next read starts after
                // the checkpoint, not at the batch's end.
                self.cursors.remove(&p.id);
                return Ok((report, true));
            }
            match batch.next {
                Some(next) => {
                    self.cursors.insert(p.id.clone(), next);
                }
                None => {
                    self.cursors.remove(&p.id);
                    self.finished.insert(p.id.clone());
                    report.partitions_finished += 1;
                }
            }
        }
        match first_failure {
            Some(e) if report.handled + report.dead_lettered == 0 => Err(e),
            _ => Ok((report, false)),
        }
    }

    /// Reads the next batch of `partition`, opening a cursor where it has none: after
    /// the last record handled here, else at the checkpoint or the start position.
    async fn read_partition(&mut self, partition: &str) -> Result<ReadBatch> {
        let cursor = match self.cursors.get(partition) {
            Some(c) => c.clone(),
            None => {
                let at = match self.handled_up_to.get(partition) {
                    Some(seq) => StartPosition::AfterSequence(seq.clone()),
                    None => self.initial_position(partition).await?,
                };
                let cursor = panic_safe("cursor", self.driver.cursor(partition, &at)).await?;
                self.cursors.insert(partition.to_owned(), cursor.clone());
                cursor
            }
        };
        panic_safe("read", self.driver.read(&cursor, self.batch)).await
    }

    /// Polls until a pass reads nothing new: everything written so far is handled
    /// (or dead-lettered). Returns the totals.
    pub async fn catch_up<H: Handler + ?Sized>(&mut self, handler: &H) -> Result<PollReport> {
        let mut total = PollReport::default();
        loop {
            let r = self.poll(handler).await?;
            if r.handled + r.dead_lettered == 0 {
                return Ok(total);
            }
            total.handled += r.handled;
            total.dead_lettered += r.dead_lettered;
            total.partitions_finished += r.partitions_finished;
        }
    }

    /// Polls until `shutdown` resolves, pausing `idle` when nothing came. A shutdown
    /// lets the record being handled finish and checkpoints it: nothing handled is
    /// read again by the next consumer of the group. When it stops, the reader gives
    /// up its partitions ([`release`](Self::release)) for the other readers.
    ///
    /// A failed poll (the stream, the checkpoint store or the dead-letter place away,
    /// a driver panic) is logged and tried again after a backoff that grows with
    /// consecutive failures, as the worker does with receives; records handled before
    /// it are read again (at least once, never lost). `run` returns an error only when
    /// a record failed for good and no dead-letter place is configured, so that it is
    /// not skipped, or at once when the handler's wiring is wrong
    /// ([`Handler::check_wiring`], [`Router::check`](crate::Router::check)), before
    /// anything is read.
    pub async fn run<H: Handler + ?Sized>(
        &mut self,
        handler: &H,
        idle: Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<()> {
        handler.check_wiring()?;
        let ended = self.run_until(handler, idle, shutdown).await;
        if let Err(e) = self.release().await {
            tracing::warn!(group = %self.group, error = %e, "could not release the partitions; they pass to another reader when their leases lapse");
        }
        ended
    }

    async fn run_until<H: Handler + ?Sized>(
        &mut self,
        handler: &H,
        idle: Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) -> Result<()> {
        let mut shutdown = std::pin::pin!(shutdown);
        let mut failures = 0u32;
        loop {
            let pause = match self.poll_until(handler, &mut shutdown).await {
                Ok((_, true)) => return Ok(()),
                Ok((report, false)) => {
                    failures = 0;
                    if report.handled + report.dead_lettered > 0 {
                        continue;
                    }
                    idle
                }
                Err(e) if self.halted => return Err(e),
                Err(e) => {
                    failures += 1;
                    let pause = self.retry.backoff(failures.min(8));
                    tracing::warn!(group = %self.group, error = %e, ?pause, "stream poll failed; pausing");
                    pause
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {},
                _ = &mut shutdown => return Ok(()),
            }
        }
    }

    async fn initial_position(&self, partition: &str) -> Result<StartPosition> {
        if let Some(from) = &self.replaying {
            return Ok(from.clone());
        }
        Ok(match self.store.load(&self.group, partition).await? {
            Some(seq) => StartPosition::AfterSequence(seq),
            None => self.start.clone(),
        })
    }

    /// Handles one record with retries; `Ok(false)` when it was dead-lettered.
    async fn handle_record<H: Handler + ?Sized>(
        &self,
        handler: &H,
        record: &StreamRecord,
    ) -> std::result::Result<bool, RecordError> {
        let event = match &record.event {
            Ok(e) => e.clone(),
            Err((raw, err)) => {
                self.dead_letter_raw(record, raw, format!("malformed: {err}"))
                    .await?;
                return Ok(false);
            }
        };
        let mut attempt = 1;
        loop {
            let reason = match self
                .runner
                .run_at(
                    handler,
                    event.clone(),
                    attempt,
                    Some(&record.partition),
                    record.offset,
                )
                .await
            {
                Ok(()) => return Ok(true),
                Err(HandlerError::Reject { reason }) => format!("rejected: {reason}"),
                Err(HandlerError::Retry { message, delay }) => {
                    if self.retry.should_retry(attempt) {
                        let d = delay.unwrap_or_else(|| self.retry.backoff(attempt));
                        tokio::time::sleep(d).await;
                        attempt += 1;
                        continue;
                    }
                    format!(
                        "max delivery attempts ({}) exceeded: {message}",
                        self.retry.max_attempts
                    )
                }
            };
            let Some(sink) = &self.dead_letter else {
                return Err(RecordError::Halt(Error::new(
                    ErrorKind::Internal,
                    format!(
                        "record {} of partition {} failed ({reason}) and no dead-letter place is configured; stopping here",
                        record.sequence, record.partition
                    ),
                )));
            };
            let mut copy = (*event).clone();
            copy.set_extension(EXT_DEAD_LETTER_REASON, reason.clone());
            sink.put_event(copy).await.map_err(RecordError::Failed)?;
            self.runner.dead_lettered(&reason);
            return Ok(false);
        }
    }

    async fn dead_letter_raw(
        &self,
        record: &StreamRecord,
        raw: &RawMessage,
        reason: String,
    ) -> std::result::Result<(), RecordError> {
        let Some(sink) = &self.dead_letter else {
            return Err(RecordError::Halt(Error::new(
                ErrorKind::Malformed,
                format!(
                    "record {} of partition {}: {reason}; no dead-letter place is configured",
                    record.sequence, record.partition
                ),
            )));
        };
        sink.put_raw(
            raw.clone()
                .with_attribute(EXT_DEAD_LETTER_REASON, reason.clone()),
        )
        .await
        .map_err(RecordError::Failed)?;
        self.runner.dead_lettered(&reason);
        Ok(())
    }
}

/// Why a record was not handled: [`RecordError::Halt`] stops [`StreamConsumer::run`]
/// (a record failed for good with nowhere to dead-letter it); anything else is tried
/// again.
enum RecordError {
    Halt(Error),
    Failed(Error),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handler::HandlerContext;
    use cloudbus_driver::driver::{PartitionInfo, ReadBatch, StreamRecord};
    use cloudbus_driver::event::{AttributesReader, Event, EventBuilder};

    /// Two partitions: reads of "broken" always fail, "healthy" holds three records.
    struct OneBrokenPartition;

    #[async_trait::async_trait]
    impl StreamDriver for OneBrokenPartition {
        async fn partitions(&self) -> Result<Vec<PartitionInfo>> {
            Ok(["broken", "healthy"]
                .into_iter()
                .map(|id| PartitionInfo {
                    id: id.into(),
                    parents: Vec::new(),
                    closed: false,
                })
                .collect())
        }
        async fn cursor(&self, partition: &str, _at: &StartPosition) -> Result<String> {
            Ok(format!("{partition}:0"))
        }
        async fn read(&self, cursor: &str, max: usize) -> Result<ReadBatch> {
            let (partition, from) = cursor.split_once(':').expect("cursor");
            if partition == "broken" {
                return Err(Error::new(ErrorKind::Unavailable, "shard unavailable"));
            }
            let from: usize = from.parse().expect("position");
            let records = (from..3.min(from + max))
                .map(|i| StreamRecord {
                    partition: partition.into(),
                    sequence: i.to_string(),
                    offset: None,
                    timestamp: chrono::Utc::now(),
                    event: Ok(Arc::new(
                        EventBuilder::new("t", "/s")
                            .id(format!("e-{i}"))
                            .build()
                            .expect("event"),
                    )),
                })
                .collect::<Vec<_>>();
            Ok(ReadBatch {
                next: Some(format!("{partition}:{}", from + records.len())),
                records,
                behind: None,
            })
        }
    }

    /// One partition whose reads fail must not hold back the others (before, the
    /// first failing read ended the pass: the partitions after it were never read).
    #[tokio::test]
    async fn a_failing_partition_does_not_stop_the_others() {
        let mut consumer = StreamConsumer::new(Arc::new(OneBrokenPartition), "g")
            .start_at(StartPosition::Earliest);
        let handled = Arc::new(std::sync::Mutex::new(Vec::new()));
        let seen = handled.clone();
        let handler = move |e: Arc<Event>, _c: HandlerContext| {
            seen.lock().expect("lock").push(e.id().to_owned());
            async { Ok::<(), HandlerError>(()) }
        };
        let report = consumer
            .poll(&handler)
            .await
            .expect("progress despite one failing read");
        assert_eq!(report.handled, 3);
        assert_eq!(report.partitions_failed, 1);
        assert_eq!(*handled.lock().expect("lock"), ["e-0", "e-1", "e-2"]);
        // Nothing left to handle: the failing read is the poll's error now.
        let e = consumer
            .poll(&handler)
            .await
            .expect_err("only the failure is left");
        assert_eq!(e.kind(), ErrorKind::Unavailable);
    }
}
