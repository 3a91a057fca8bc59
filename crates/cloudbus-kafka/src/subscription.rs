//! A subscription (the queue-style API) on Kafka: a consumer group per subscription,
//! reading the topic and the subscription's retry topic, with settlement per record
//! on top of offsets.
//!
//! - An ack marks a record done; the committed offset of each partition only ever
//!   advances over the contiguous done prefix of what was read, so a crash redelivers
//!   from the first record not settled, never skips one.
//! - A nack without delay and an expired lease deliver the record again from memory
//!   (attempt + 1; its offset stays uncommitted, so a crash redelivers it too).
//! - A nack with a delay writes the record to `<topic>.<subscription>.retry` with the
//!   attempt count, the time it is due and its origin in headers, then marks it done;
//!   a retried record is held until due (its offset uncommitted meanwhile).
//! - A dead-letter, or a nack past the delivery limit, writes it to
//!   `<topic>.<subscription>.dlq` with the reason, then marks it done.
//! - A revoked partition (a rebalance) commits its done prefix and forgets what was in
//!   flight there: the new owner delivers it again from the committed offset.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::Utc;
use cloudbus_driver::{
    AckToken, BatchResults, Capabilities, Error, ErrorKind, ReceivedMessage, Result, Settlement,
    SubscriptionDriver, SubscriptionSpec,
};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use rustc_hash::FxHashMap;

use crate::binding::{self, KafkaRecord};
use crate::config::{FETCH_WAIT, RETRY_HOLD_BYTES};
use crate::connection::{
    Shared, client_config, dead_letter_topic, drop_in_background, retry_topic,
};
use crate::error::kafka_error;
use crate::headers::{self, Origin};
use crate::producer::{capabilities, send_records};
use crate::received::Received;

/// A topic and partition (the name shared with the records read from it).
type Partition = (Arc<str>, i32);

/// How long one wait on the consumer lasts before leases and due retries are checked.
const POLL_SLICE: Duration = Duration::from_millis(100);

/// How long the first receives of a new member wait for its group's assignment.
const JOIN_PATIENCE: Duration = Duration::from_secs(10);

/// How long a close waits for the group to take its partitions back.
const CLOSE_PATIENCE: Duration = Duration::from_secs(10);

/// The subscription's librdkafka consumer. Dropping a consumer of a group blocks
/// (librdkafka leaves the group and waits for outstanding commits and its
/// coordinator): the drop runs on a thread of its own.
struct OwnedConsumer(Option<Arc<StreamConsumer<Context>>>);

impl OwnedConsumer {
    /// A handle for a blocking call that outlives the borrow.
    fn shared(&self) -> Arc<StreamConsumer<Context>> {
        Arc::clone(
            self.0
                .as_ref()
                .expect("the consumer is present until dropped"),
        )
    }
}

impl std::ops::Deref for OwnedConsumer {
    type Target = StreamConsumer<Context>;
    fn deref(&self) -> &Self::Target {
        self.0
            .as_ref()
            .expect("the consumer is present until dropped")
    }
}

impl Drop for OwnedConsumer {
    fn drop(&mut self) {
        if let Some(consumer) = self.0.take() {
            release(consumer);
        }
    }
}

/// Drops a handle of the consumer off the async threads (the last handle's drop
/// closes the consumer, which blocks): see [`drop_in_background`].
fn release(consumer: Arc<StreamConsumer<Context>>) {
    let _ = drop_in_background(consumer);
}

/// How long a close waits for its commit (brokers down: librdkafka would wait up to
/// the session timeout, or retry a silent coordinator for minutes); the revocation
/// that follows commits the same positions again.
const CLOSE_COMMIT_PATIENCE: Duration = Duration::from_secs(10);

/// A close's work, in a task of its own so that a caller who stops waiting does not
/// leave it half done: commit what was settled (a synchronous commit on a blocking
/// thread, at most [`CLOSE_COMMIT_PATIENCE`]; its error is the answer), unsubscribe
/// (the member leaves the group once its partitions are unassigned), serve the
/// revocation (at least one slice, at most [`CLOSE_PATIENCE`]) and wait out a fetch
/// already sent.
async fn close_consumer(
    consumer: Arc<StreamConsumer<Context>>,
    state: Arc<Mutex<State>>,
    receiving: Arc<tokio::sync::Mutex<()>>,
    what: String,
) -> Result<()> {
    // No receive reads the consumer meanwhile (a waiting receive ends within a slice
    // once `closed` is set).
    let _reader = receiving.lock_owned().await;
    let commits = lock(&state).positions();
    let committed = if commits.count() > 0 {
        let handle = Arc::clone(&consumer);
        let commit = crate::connection::blocking(move || {
            handle
                .commit(&commits, CommitMode::Sync)
                .map_err(|e| kafka_error(e, "commit at close"))
        });
        match tokio::time::timeout(CLOSE_COMMIT_PATIENCE, commit).await {
            Ok(result) => result,
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "the commit at the close of {what} took over {CLOSE_COMMIT_PATIENCE:?}; the revocation commits again, else the next owner delivers those records again"
                ),
            )),
        }
    } else {
        Ok(())
    };
    let fetching = consumer.assignment().is_ok_and(|a| a.count() > 0);
    consumer.unsubscribe();
    let until = Instant::now() + CLOSE_PATIENCE;
    loop {
        // Serves the revocation (and drops what was fetched but not delivered: its
        // offsets are not committed, the next owner reads it).
        let _ = tokio::time::timeout(POLL_SLICE, consumer.recv()).await;
        if consumer.assignment().is_ok_and(|a| a.count() == 0) || Instant::now() >= until {
            break;
        }
    }
    // A fetch sent before the revocation still comes back (and is parsed) within the
    // fetch wait: a topic deleted meanwhile would be in its answer.
    if fetching {
        tokio::time::sleep(FETCH_WAIT + POLL_SLICE).await;
    }
    release(consumer);
    committed
}

/// A record read but not finished, with its delivery count.
#[derive(Clone, Debug)]
struct Held {
    received: Received,
    /// Deliveries so far (the next one is `attempt + 1`).
    delivered: u32,
}

struct InFlight {
    held: Held,
    lease_until: Instant,
}

/// One partition's records read and not yet committed, by offset: `true` once done.
#[derive(Default)]
struct Track {
    pending: BTreeMap<i64, bool>,
    /// The offset after the contiguous done prefix: what the group's committed offset
    /// is to be (kept after the prefix leaves `pending`).
    done_up_to: Option<i64>,
}

#[derive(Default)]
struct State {
    next_token: u64,
    /// By token (a counter: the fast hash is enough, and it is per record).
    in_flight: FxHashMap<u64, InFlight>,
    tracks: FxHashMap<Partition, Track>,
    /// Records to deliver again (nacked without delay, lease expired).
    ready: VecDeque<Held>,
    /// Retried records not due yet (at most the URL's `retry_hold` and
    /// [`RETRY_HOLD_BYTES`]: past either the retry topic is paused).
    delayed: Vec<(chrono::DateTime<Utc>, Held)>,
    /// The bytes in `delayed` (values, keys, headers).
    delayed_bytes: usize,
    /// Whether this member paused its retry topic's partitions (too many held).
    retry_paused: bool,
    /// Assignments this member was given (one per rebalance it took part in, even
    /// an empty one).
    assignments: u64,
}

impl State {
    fn partition_of(received: &Received) -> Partition {
        (received.topic.clone(), received.partition)
    }

    fn mark_done(&mut self, received: &Received) {
        if let Some(track) = self.tracks.get_mut(&Self::partition_of(received))
            && let Some(done) = track.pending.get_mut(&received.offset)
        {
            *done = true;
        }
    }

    /// The offsets to commit now: past each partition's contiguous done prefix,
    /// where it moved since the last call.
    fn advance(&mut self) -> TopicPartitionList {
        let mut commits = TopicPartitionList::new();
        for ((topic, partition), track) in &mut self.tracks {
            let mut last = None;
            while let Some((&offset, &done)) = track.pending.first_key_value() {
                if !done {
                    break;
                }
                track.pending.remove(&offset);
                last = Some(offset);
            }
            if let Some(offset) = last {
                let next = offset.saturating_add(1);
                track.done_up_to = Some(next);
                // Adding to a list cannot fail for a valid offset.
                let _ = commits.add_partition_offset(topic, *partition, Offset::Offset(next));
            }
        }
        commits
    }

    /// Every partition's position past its done prefix, moved or not: what a close or
    /// a rebalance commits synchronously, so that an earlier asynchronous commit that
    /// failed (one refused during a rebalance) is made good rather than forgotten.
    fn positions(&mut self) -> TopicPartitionList {
        self.advance();
        let mut commits = TopicPartitionList::new();
        for ((topic, partition), track) in &self.tracks {
            if let Some(next) = track.done_up_to {
                let _ = commits.add_partition_offset(topic, *partition, Offset::Offset(next));
            }
        }
        commits
    }

    /// Forgets the partitions in `revoked`; returns their done prefixes to commit.
    fn revoke(&mut self, revoked: &TopicPartitionList) -> TopicPartitionList {
        let commits = self.positions();
        let gone: Vec<Partition> = revoked
            .elements()
            .iter()
            .map(|e| (Arc::from(e.topic()), e.partition()))
            .collect();
        let mine = |r: &Received| gone.contains(&Self::partition_of(r));
        self.in_flight.retain(|_, f| !mine(&f.held.received));
        self.ready.retain(|h| !mine(&h.received));
        self.delayed.retain(|(_, h)| !mine(&h.received));
        self.delayed_bytes = self.delayed.iter().map(|(_, h)| held_size(h)).sum();
        // The held retries are gone: the partitions given back are resumed (see
        // `Context::post_rebalance`), and the next full hold pauses again.
        self.retry_paused = false;
        for p in &gone {
            self.tracks.remove(p);
        }
        let mut out = TopicPartitionList::new();
        for e in commits.elements() {
            if gone
                .iter()
                .any(|(t, p)| **t == *e.topic() && *p == e.partition())
            {
                let _ = out.add_partition_offset(e.topic(), e.partition(), e.offset());
            }
        }
        out
    }
}

/// The bytes a held record keeps: its value, key and headers.
fn held_size(held: &Held) -> usize {
    let record = &held.received.record;
    record.payload.as_ref().map_or(0, Vec::len)
        + record.key.as_ref().map_or(0, Vec::len)
        + record
            .headers
            .iter()
            .map(|(name, value)| name.len() + value.as_ref().map_or(0, Vec::len))
            .sum::<usize>()
}

/// Commits what a rebalance takes away, and forgets it.
struct Context {
    state: Arc<Mutex<State>>,
    /// Set when an asynchronous commit failed.
    recommit: Arc<AtomicBool>,
    /// The subscription's retry topic, whose partitions a hold may have paused.
    retry_topic: String,
}

impl ClientContext for Context {}

impl ConsumerContext for Context {
    /// An asynchronous commit that failed (one refused during a rebalance) is made
    /// good by the next: it commits every partition's position, not only those that
    /// moved.
    fn commit_callback(&self, result: rdkafka::error::KafkaResult<()>, _: &TopicPartitionList) {
        if let Err(e) = result {
            tracing::debug!(error = %e, "Kafka commit failed; the next commit repeats it");
            self.recommit.store(true, Ordering::Release);
        }
    }
    /// Runs inside a receive (on an async thread): the commit of what a revocation
    /// takes away is asynchronous. librdkafka still finishes it before the member
    /// rejoins or leaves (an assignment change waits for outstanding commits), so the
    /// partition's next owner starts from it.
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(revoked) = rebalance {
            let commits = lock(&self.state).revoke(revoked);
            if commits.count() > 0
                && let Err(e) = consumer.commit(&commits, CommitMode::Async)
            {
                tracing::warn!(error = %e, "commit before a rebalance failed; the new owner reads those records again");
            }
        }
    }
    /// A partition the application paused stays paused through a rebalance that
    /// gives it back (librdkafka clears only its own pauses), while the revocation
    /// dropped the held retries that would have resumed it: the retry partitions
    /// assigned are resumed (resuming one not paused does nothing).
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(assigned) = rebalance {
            {
                let mut state = lock(&self.state);
                state.assignments = state.assignments.saturating_add(1);
            }
            let retries = partitions_of(assigned, &self.retry_topic);
            if retries.count() > 0
                && let Err(e) = consumer.resume(&retries)
            {
                tracing::warn!(error = %e, topic = %self.retry_topic, "resuming the retry topic after a rebalance failed");
            }
        }
    }
}

/// The partitions of `topic` in `list`.
fn partitions_of(list: &TopicPartitionList, topic: &str) -> TopicPartitionList {
    let mut out = TopicPartitionList::new();
    for e in list.elements() {
        if e.topic() == topic {
            out.add_partition(e.topic(), e.partition());
        }
    }
    out
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// Receives and settles the records of one subscription.
pub struct KafkaSubscription {
    shared: Arc<Shared>,
    topic: String,
    retry_topic: String,
    /// The topic and the retry topic, the names its records share.
    topic_names: [Arc<str>; 2],
    mover: Arc<Mover>,
    spec: SubscriptionSpec,
    consumer: OwnedConsumer,
    state: Arc<Mutex<State>>,
    /// Set when an asynchronous commit failed: the next commits every position.
    recommit: Arc<AtomicBool>,
    /// One receive at a time reads the consumer (and a close waits for it).
    receiving: Arc<tokio::sync::Mutex<()>>,
    /// The close, once started: every call awaits the same run.
    closing:
        Mutex<Option<futures::future::Shared<futures::future::BoxFuture<'static, Result<()>>>>>,
    /// Set once the group was joined.
    joined: tokio::sync::OnceCell<()>,
    /// Set once the group assigned this member a partition.
    assigned: AtomicBool,
    /// Until when a first receive waits for the group's assignment.
    joined_by: Instant,
    closed: AtomicBool,
    /// The URL's `retry_hold`.
    retry_hold: usize,
}

impl KafkaSubscription {
    /// The subscription's consumer. Opening is lazy, as on every provider: the first
    /// receive checks that the topic and the subscription (its retry topic) exist
    /// (NotFound otherwise) and joins the group.
    pub(crate) async fn open(shared: Arc<Shared>, topic: &str, name: &str) -> Result<Self> {
        let state = Arc::new(Mutex::new(State::default()));
        let recommit = Arc::new(AtomicBool::new(false));
        let consumer: StreamConsumer<Context> =
            client_config(shared.config.consumer_settings(name))
                .create_with_context(Context {
                    state: Arc::clone(&state),
                    recommit: Arc::clone(&recommit),
                    retry_topic: retry_topic(topic, name),
                })
                .map_err(|e| kafka_error(e, &format!("create the consumer of group {name:?}")))?;
        let spec = shared.spec(topic, name);
        let retry_hold = shared.config.retry_hold();
        let mover = Arc::new(Mover {
            shared: Arc::clone(&shared),
            state: Arc::clone(&state),
            retry_topic: retry_topic(topic, name),
            dead_letter_topic: dead_letter_topic(topic, name),
            lease: spec.lease,
        });
        Ok(KafkaSubscription {
            spec,
            mover,
            retry_topic: retry_topic(topic, name),
            topic_names: [Arc::from(topic), Arc::from(retry_topic(topic, name))],
            topic: topic.to_owned(),
            shared,
            consumer: OwnedConsumer(Some(Arc::new(consumer))),
            state,
            recommit,
            receiving: Arc::new(tokio::sync::Mutex::new(())),
            closing: Mutex::new(None),
            joined: tokio::sync::OnceCell::new(),
            assigned: AtomicBool::new(false),
            joined_by: Instant::now() + JOIN_PATIENCE,
            closed: AtomicBool::new(false),
            retry_hold,
        })
    }

    /// Checks that the topic and the subscription exist, and joins the group (once).
    async fn join(&self) -> Result<()> {
        self.joined
            .get_or_try_init(|| async {
                let (topic, name, retry) = (&self.topic, &self.spec.name, &self.retry_topic);
                self.shared.partition_count(topic).await?;
                self.shared.partition_count(retry).await.map_err(|e| {
                    if e.kind() == ErrorKind::NotFound {
                        Error::not_found(format!(
                            "subscription {name:?} of Kafka topic {topic:?} does not exist (its retry topic {retry:?} is missing; ensure the subscription first)"
                        ))
                    } else {
                        e
                    }
                })?;
                self.consumer
                    .subscribe(&[topic.as_str(), retry.as_str()])
                    .map_err(|e| kafka_error(e, &format!("subscribe group {name:?} to {topic:?}")))
            })
            .await
            .map(|_| ())
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::closed(format!(
                "the consumer of subscription {:?} of {:?} is closed",
                self.spec.name, self.topic
            )));
        }
        Ok(())
    }

    /// The error of settling delivery `n`, no longer in flight: after a close, its
    /// partition went back to the group (`Closed`), else its lease ran out or its
    /// partition was revoked.
    fn missing(&self, n: u64) -> Error {
        if self.closed.load(Ordering::Acquire) {
            Error::closed(format!(
                "the consumer of subscription {:?} of {:?} is closed: its partitions went back to the group, which delivers delivery {n} again",
                self.spec.name, self.topic
            ))
        } else {
            gone(n)
        }
    }

    fn exhausted(&self, delivered: u32) -> bool {
        self.spec
            .max_delivery_attempts
            .is_some_and(|max| max > 0 && delivered >= max)
    }

    /// Takes a record the consumer returned into the books; `Some` when it is to be
    /// delivered now.
    fn admit(&self, state: &mut State, received: Received) -> Option<Held> {
        state
            .tracks
            .entry(State::partition_of(&received))
            .or_default()
            .pending
            .insert(received.offset, false);
        if *received.topic == *self.retry_topic {
            // A redriven dead letter carries no count: it starts afresh.
            let delivered = headers::number::<u32>(&received.record, headers::ATTEMPT).unwrap_or(0);
            let held = Held {
                received,
                delivered,
            };
            // A due time past the longest nack delay is not one cloudbus wrote: the
            // record is delivered now rather than held (and its partition's commits
            // with it) for ever.
            let now = Utc::now();
            let latest = now
                + chrono::Duration::from_std(MAX_NACK_DELAY).unwrap_or(chrono::Duration::zero());
            if let Some(due) = headers::not_before(&held.received.record)
                && due > now
                && due <= latest
            {
                state.delayed_bytes = state.delayed_bytes.saturating_add(held_size(&held));
                state.delayed.push((due, held));
                if !state.retry_paused
                    && (state.delayed.len() >= self.retry_hold
                        || state.delayed_bytes >= RETRY_HOLD_BYTES)
                {
                    self.pause_retries(state, true);
                }
                return None;
            }
            return Some(held);
        }
        Some(Held {
            received,
            delivered: 0,
        })
    }

    /// Pauses (or resumes) fetching this member's partitions of the retry topic: too
    /// many retried records not due yet are held (or half of them came due). While
    /// paused, librdkafka drops what it fetched of them ahead and reads on from the
    /// first record not taken once resumed, so nothing is skipped; the topic's other
    /// partitions are read as before. A retry due soon can wait behind held ones
    /// due later (the records of a partition are read in order).
    fn pause_retries(&self, state: &mut State, pause: bool) {
        let Ok(assignment) = self.consumer.assignment() else {
            return;
        };
        let retries = partitions_of(&assignment, &self.retry_topic);
        if retries.count() == 0 {
            return;
        }
        let done = if pause {
            self.consumer.pause(&retries)
        } else {
            self.consumer.resume(&retries)
        };
        // librdkafka answers each partition in the list (the call itself does not
        // fail for one): all of them, or the next receive tries again.
        let refused = retries
            .elements()
            .iter()
            .find_map(|e| e.error().err().map(|err| (e.partition(), err)));
        match (done, refused) {
            (Ok(()), None) => state.retry_paused = pause,
            (Err(e), _) => {
                tracing::warn!(error = %e, pause, topic = %self.retry_topic, "pausing or resuming the retry topic failed; the next receive tries again")
            }
            (Ok(()), Some((partition, e))) => {
                tracing::warn!(error = %e, partition, pause, topic = %self.retry_topic, "pausing or resuming a retry partition failed; the next receive tries again")
            }
        }
    }

    /// Retried records read and not due yet, held in memory (at most the URL's
    /// `retry_hold`, then the retry topic is paused until half are due).
    pub fn held_retries(&self) -> usize {
        lock(&self.state).delayed.len()
    }

    /// How many assignments the group gave this member since it was opened: one per
    /// rebalance it took part in (its join included), even one that gave it nothing.
    pub fn assignments(&self) -> u64 {
        lock(&self.state).assignments
    }

    /// Moves due retries and expired leases to `ready`; returns the records whose
    /// lease expired at their last allowed delivery (to dead-letter).
    fn sweep(&self, state: &mut State) -> Vec<Held> {
        let now = Utc::now();
        let mut i = 0;
        while i < state.delayed.len() {
            if state.delayed[i].0 <= now {
                let (_, held) = state.delayed.swap_remove(i);
                state.delayed_bytes = state.delayed_bytes.saturating_sub(held_size(&held));
                state.ready.push_back(held);
            } else {
                i += 1;
            }
        }
        if state.retry_paused
            && state.delayed.len() <= self.retry_hold / 2
            && state.delayed_bytes <= RETRY_HOLD_BYTES / 2
        {
            self.pause_retries(state, false);
        }
        let instant = Instant::now();
        let expired: Vec<u64> = state
            .in_flight
            .iter()
            .filter(|(_, f)| f.lease_until <= instant)
            .map(|(t, _)| *t)
            .collect();
        let mut exhausted = Vec::new();
        for token in expired {
            if let Some(f) = state.in_flight.remove(&token) {
                if self.exhausted(f.held.delivered) {
                    exhausted.push(f.held);
                } else {
                    state.ready.push_back(f.held);
                }
            }
        }
        exhausted
    }

    /// Turns a held record into a delivery, or `None` when the subscription's filter
    /// drops it (it is done at once).
    fn deliver(&self, state: &mut State, mut held: Held) -> Option<ReceivedMessage> {
        let event = binding::decode(&held.received.record).map(Arc::new);
        if let (Ok(e), Some(filter)) = (&event, &self.spec.filter)
            && !filter.matches(e)
        {
            state.mark_done(&held.received);
            return None;
        }
        held.delivered = held.delivered.saturating_add(1);
        let token = state.next_token;
        state.next_token += 1;
        let size = held.received.record.payload.as_ref().map_or(0, Vec::len);
        let message = ReceivedMessage {
            event,
            token: AckToken::Number(token),
            attempt: held.delivered,
            lease: Some(self.spec.lease),
            published_at: held.received.timestamp,
            ordering_key: held
                .received
                .record
                .key
                .as_deref()
                .and_then(|k| std::str::from_utf8(k).ok())
                .map(str::to_owned),
            size,
            partition: Some(held.received.partition.to_string()),
            offset: Some(held.received.offset),
        };
        state.in_flight.insert(
            token,
            InFlight {
                held,
                lease_until: lease_end(self.spec.lease),
            },
        );
        Some(message)
    }

    /// Commits past the done prefixes (asynchronously: a lost commit only redelivers).
    fn commit(&self) {
        let commits = if self.recommit.swap(false, Ordering::AcqRel) {
            lock(&self.state).positions()
        } else {
            lock(&self.state).advance()
        };
        if commits.count() > 0
            && let Err(e) = self.consumer.commit(&commits, CommitMode::Async)
        {
            tracing::debug!(error = %e, "Kafka commit failed; the next commit repeats it");
            self.recommit.store(true, Ordering::Release);
        }
    }
}

/// Writes records to the retry and dead-letter topics. Each settlement's writes run
/// in a task of their own, so that a caller who stops waiting (a cancelled settle or
/// receive) does not leave a record neither in flight nor done: the task finishes
/// the move and books it.
struct Mover {
    shared: Arc<Shared>,
    state: Arc<Mutex<State>>,
    retry_topic: String,
    dead_letter_topic: String,
    lease: Duration,
}

/// Longest reason and description kept on a dead letter, in bytes.
const MAX_REASON_BYTES: usize = 1024;

/// `text` cut to at most `max` bytes, on a character boundary.
fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &text[..end])
}

impl Mover {
    /// `held`'s record with its attempt count, origin and `set`.
    fn moved(&self, held: &Held, set: &[(&str, String)]) -> KafkaRecord {
        let origin = Origin {
            topic: &held.received.topic,
            partition: held.received.partition,
            offset: held.received.offset,
        };
        let mut all = vec![(headers::ATTEMPT, held.delivered.to_string())];
        all.extend(set.iter().map(|(k, v)| (*k, v.clone())));
        headers::with_headers(&held.received.record, &origin, &all)
    }

    async fn send(&self, topic: &str, record: KafkaRecord) -> Result<()> {
        let mut sent = send_records(&self.shared, topic, &[record]).await;
        sent.pop().unwrap_or(Ok(()))
    }

    /// Writes `held` to the dead-letter topic with `reason`; Ok once it is there. A
    /// record the broker refuses as too large (a foreign record near the limit, now
    /// with cloudbus's headers) is written without its value, the reason saying so,
    /// rather than coming back forever.
    async fn dead_letter(&self, held: &Held, reason: &str, description: &str) -> Result<()> {
        let reason = clip(reason, MAX_REASON_BYTES);
        let description = clip(description, MAX_REASON_BYTES);
        let headers_of = |reason: &str| {
            vec![
                (headers::DEAD_LETTER_REASON, reason.to_owned()),
                (headers::DEAD_LETTER_DESCRIPTION, description.clone()),
                (headers::DEAD_LETTERED_AT, Utc::now().to_rfc3339()),
            ]
        };
        let record = self.moved(held, &headers_of(&reason));
        match self.send(&self.dead_letter_topic, record).await {
            Err(e) if e.kind() == ErrorKind::TooLarge => {
                let size = held.received.record.payload.as_ref().map_or(0, Vec::len);
                let mut stub = self.moved(
                    held,
                    &headers_of(&format!(
                        "{reason} (its value of {size} bytes was dropped: over the broker's limit with the dead-letter headers)"
                    )),
                );
                stub.payload = None;
                self.send(&self.dead_letter_topic, stub).await
            }
            other => other,
        }
    }

    /// Writes `held` to the retry topic, due `delay` from now (capped at
    /// [`MAX_NACK_DELAY`]); a record too large for it is dead-lettered instead.
    async fn retry(&self, held: &Held, delay: Duration) -> Result<()> {
        let delay = chrono::Duration::from_std(delay.min(MAX_NACK_DELAY))
            .unwrap_or(chrono::Duration::zero());
        let due = Utc::now()
            .checked_add_signed(delay)
            .unwrap_or_else(Utc::now);
        let record = self.moved(
            held,
            &[(headers::NOT_BEFORE, due.timestamp_millis().to_string())],
        );
        match self.send(&self.retry_topic, record).await {
            Err(e) if e.kind() == ErrorKind::TooLarge => {
                self.dead_letter(held, "too large to retry", &e.to_string())
                    .await
            }
            other => other,
        }
    }

    /// Carries out `moves` and books each: done when written; when not, the delivery
    /// is held again under its token (a retried settlement finds it) until its lease
    /// runs out. Answers each move's result, by slot.
    async fn run(
        self: Arc<Self>,
        moves: Vec<(usize, u64, Held, Move)>,
    ) -> Vec<(usize, Result<()>)> {
        let writes = moves.into_iter().map(|(slot, token, held, target)| {
            let mover = Arc::clone(&self);
            async move {
                let written = match &target {
                    Move::DeadLetter(reason, description) => {
                        mover.dead_letter(&held, reason, description).await
                    }
                    Move::Retry(delay) => mover.retry(&held, *delay).await,
                    Move::Exhausted => {
                        let description = format!(
                            "not settled within its lease at delivery {} (the limit)",
                            held.delivered
                        );
                        mover
                            .dead_letter(&held, "max delivery attempts", &description)
                            .await
                    }
                };
                let mut state = lock(&mover.state);
                let result = match written {
                    Ok(()) => {
                        state.mark_done(&held.received);
                        Ok(())
                    }
                    Err(e) if matches!(target, Move::Exhausted) => {
                        tracing::warn!(error = %e, "dead-lettering a record failed; it is delivered again");
                        state.ready.push_back(held);
                        Ok(())
                    }
                    Err(e) => {
                        // Only if its partition is still this member's.
                        if state.tracks.contains_key(&State::partition_of(&held.received)) {
                            state.in_flight.insert(
                                token,
                                InFlight {
                                    held,
                                    lease_until: lease_end(mover.lease),
                                },
                            );
                        }
                        Err(e)
                    }
                };
                (slot, result)
            }
        });
        futures::future::join_all(writes).await
    }

    /// [`run`](Self::run) in a task of its own, awaited: the moves finish even when
    /// the caller stops waiting.
    async fn run_detached(
        self: &Arc<Self>,
        moves: Vec<(usize, u64, Held, Move)>,
    ) -> Vec<(usize, Result<()>)> {
        if moves.is_empty() {
            return Vec::new();
        }
        let count: Vec<usize> = moves.iter().map(|(slot, ..)| *slot).collect();
        match tokio::spawn(Arc::clone(self).run(moves)).await {
            Ok(results) => results,
            Err(e) => count
                .into_iter()
                .map(|slot| {
                    (
                        slot,
                        Err(Error::new(
                            ErrorKind::Internal,
                            format!("moving a Kafka record failed: {e}"),
                        )),
                    )
                })
                .collect(),
        }
    }
}

/// Longest delay a nack writes on a retry record (Kafka's default retention is 7 days:
/// a retry due later could be deleted before it is delivered).
pub const MAX_NACK_DELAY: Duration = Duration::from_secs(7 * 24 * 3600);

/// Now plus `lease`, saturating far in the future instead of overflowing.
fn lease_end(lease: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(lease)
        .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 24 * 3600)))
        .unwrap_or(now)
}

#[async_trait]
impl SubscriptionDriver for KafkaSubscription {
    async fn receive_batch(&self, max: usize, wait: Duration) -> Result<Vec<ReceivedMessage>> {
        self.check_open()?;
        let max = max.max(1);
        let _reader = self.receiving.lock().await;
        // A close that came first has unsubscribed: do not join again.
        self.check_open()?;
        self.join().await?;
        let mut until = Instant::now() + wait;
        let mut out = Vec::new();
        // A consumer error (brokers down, a topic gone) ends the wait; a receive that
        // got nothing else reports it rather than an empty batch, so that the worker
        // backs off and the error is seen.
        let mut failure = None;
        loop {
            // A close ends a waiting receive (the close waits for it).
            if self.closed.load(Ordering::Acquire) {
                if out.is_empty() {
                    self.check_open()?;
                }
                break;
            }
            let exhausted = {
                let mut state = lock(&self.state);
                let exhausted = self.sweep(&mut state);
                while out.len() < max {
                    let Some(held) = state.ready.pop_front() else {
                        break;
                    };
                    out.extend(self.deliver(&mut state, held));
                }
                exhausted
            };
            if !exhausted.is_empty() {
                let moves = exhausted
                    .into_iter()
                    .map(|held| (0, 0, held, Move::Exhausted))
                    .collect();
                self.mover.run_detached(moves).await;
            }
            // Read what the consumer has: wait for the first record only while
            // nothing is to be returned yet.
            while out.len() < max {
                let slice = if !out.is_empty() {
                    Duration::ZERO
                } else if Instant::now() < until {
                    until
                        .saturating_duration_since(Instant::now())
                        .min(POLL_SLICE)
                } else if !self.assigned.load(Ordering::Acquire) && Instant::now() < self.joined_by
                {
                    // Still waiting for the group's assignment: wait, do not spin.
                    POLL_SLICE
                } else {
                    Duration::ZERO
                };
                let next = if slice.is_zero() {
                    futures::FutureExt::now_or_never(self.consumer.recv())
                } else {
                    tokio::time::timeout(slice, self.consumer.recv()).await.ok()
                };
                let message = match next {
                    None => break,
                    Some(Ok(m)) => Received::of(&m, &self.topic_names),
                    Some(Err(e)) => {
                        tracing::debug!(error = %e, topic = %self.topic, "Kafka consumer error");
                        if reportable(&e) {
                            failure = Some(e);
                        }
                        break;
                    }
                };
                let mut state = lock(&self.state);
                if let Some(held) = self.admit(&mut state, message) {
                    out.extend(self.deliver(&mut state, held));
                }
            }
            if !out.is_empty() || failure.is_some() {
                break;
            }
            if Instant::now() >= until {
                // A new member's first receive waits for its group's assignment
                // (seconds: Kafka delays a new group's first rebalance), so that a
                // receive with a short wait does not end before the member could
                // have been given a partition.
                let joining =
                    !self.assigned.load(Ordering::Acquire) && Instant::now() < self.joined_by;
                if !joining {
                    break;
                }
            }
            if !self.assigned.load(Ordering::Acquire)
                && self.consumer.assignment().is_ok_and(|a| a.count() > 0)
            {
                self.assigned.store(true, Ordering::Release);
                // Assigned just now: the first fetch gets its time too.
                until = until.max(Instant::now() + wait.max(Duration::from_millis(500)));
            }
        }
        self.commit();
        match failure {
            Some(e) if out.is_empty() => Err(kafka_error(
                e,
                &format!(
                    "receive from subscription {:?} of {:?}",
                    self.spec.name, self.topic
                ),
            )),
            _ => Ok(out),
        }
    }

    async fn settle_batch(&self, items: &[(AckToken, Settlement)]) -> Result<BatchResults> {
        let mut results: Vec<Result<()>> = Vec::with_capacity(items.len());
        // Settlements that write a record first: (slot, token, held, target).
        let mut moves: Vec<(usize, u64, Held, Move)> = Vec::new();
        {
            let mut state = lock(&self.state);
            for (slot, (token, settlement)) in items.iter().enumerate() {
                let Some(n) = token.as_number() else {
                    results.push(Err(Error::invalid(format!(
                        "{token:?} is not a Kafka delivery"
                    ))));
                    continue;
                };
                if let Settlement::Extend { lease } = settlement {
                    results.push(match state.in_flight.get_mut(&n) {
                        Some(f) => {
                            f.lease_until = lease_end(*lease);
                            Ok(())
                        }
                        None => Err(self.missing(n)),
                    });
                    continue;
                }
                let Some(f) = state.in_flight.remove(&n) else {
                    results.push(Err(self.missing(n)));
                    continue;
                };
                results.push(Ok(()));
                match settlement {
                    Settlement::Ack => state.mark_done(&f.held.received),
                    Settlement::Nack { .. } if self.exhausted(f.held.delivered) => {
                        let description = format!(
                            "nacked at delivery {} of at most {}",
                            f.held.delivered,
                            self.spec.max_delivery_attempts.unwrap_or(0)
                        );
                        moves.push((
                            slot,
                            n,
                            f.held,
                            Move::DeadLetter("max delivery attempts".into(), description),
                        ));
                    }
                    Settlement::Nack { delay } if delay.is_zero() => state.ready.push_back(f.held),
                    Settlement::Nack { delay } => {
                        moves.push((slot, n, f.held, Move::Retry(*delay)))
                    }
                    Settlement::DeadLetter {
                        reason,
                        description,
                    } => moves.push((
                        slot,
                        n,
                        f.held,
                        Move::DeadLetter(reason.clone(), description.clone()),
                    )),
                    Settlement::Extend { .. } => {}
                }
            }
        }
        for (slot, result) in self.mover.run_detached(moves).await {
            if let Err(e) = result {
                results[slot] = Err(e);
            }
        }
        self.commit();
        Ok(results)
    }

    fn capabilities(&self) -> Capabilities {
        capabilities(self.shared.config.max_message_bytes())
    }

    /// The group's lag: over every partition of the topic and of the subscription's
    /// retry topic, the high watermark minus the group's committed offset (minus the
    /// low watermark where the group committed nothing, or committed below it). A
    /// record counts until it is acked and its offset committed: deliveries in
    /// flight count, and so does a record acked while an earlier one of its partition
    /// is not (the committed offset waits for that one). `None` when the broker could
    /// not tell within 1.5 s (a request failed or was slow, a topic is gone or
    /// refused) or the consumer is closed. On tansu the watermarks count record batches,
    /// not records, so its depth there is not a record count.
    async fn queue_depth(&self) -> Option<u64> {
        if self.closed.load(Ordering::Acquire) {
            return None;
        }
        let shared = Arc::clone(&self.shared);
        let consumer = self.consumer.shared();
        let topics = [self.topic.clone(), self.retry_topic.clone()];
        let depth = crate::connection::blocking(move || {
            let depth = group_lag(&shared, &consumer, &topics);
            // The subscription closed meanwhile: this was the last handle, and its
            // drop leaves the group, which blocks.
            if let Some(last) = Arc::into_inner(consumer) {
                let _ = drop_in_background(last);
            }
            depth
        })
        .await;
        match depth {
            Ok(depth) => Some(depth),
            Err(e) => {
                tracing::debug!(error = %e, topic = %self.topic, "the depth of a Kafka subscription could not be read");
                None
            }
        }
    }

    /// Commits what was settled, leaves the subscription and serves the revocation,
    /// then waits out a fetch already sent: once `close` returns, the consumer fetches
    /// nothing more, so deleting the subscription's topics next is safe. The work runs
    /// in a task of its own: a close cancelled half way still finishes, and a second
    /// close awaits the same result. Deliveries not settled by then go back to the
    /// group (a later settlement is `Closed`).
    async fn close(&self) -> Result<()> {
        use futures::FutureExt;
        let run = {
            let mut closing = self.closing.lock().unwrap_or_else(|p| p.into_inner());
            match &*closing {
                Some(run) => run.clone(),
                None => {
                    self.closed.store(true, Ordering::Release);
                    let task = tokio::spawn(close_consumer(
                        self.consumer.shared(),
                        Arc::clone(&self.state),
                        Arc::clone(&self.receiving),
                        format!("subscription {:?} of {:?}", self.spec.name, self.topic),
                    ));
                    let run = async move {
                        task.await.unwrap_or_else(|e| {
                            Err(Error::new(
                                ErrorKind::Internal,
                                format!("closing a Kafka consumer failed: {e}"),
                            ))
                        })
                    }
                    .boxed()
                    .shared();
                    *closing = Some(run.clone());
                    run
                }
            }
        };
        run.await
    }
}

impl Drop for KafkaSubscription {
    /// A consumer dropped without [`close`](SubscriptionDriver::close) (a worker that
    /// shut down) still commits what was settled: asynchronously, and librdkafka's
    /// close of the consumer, which follows, waits for that commit before it leaves
    /// the group. Otherwise the partitions' next owner would deliver those records
    /// again.
    fn drop(&mut self) {
        if self.closed.load(Ordering::Acquire) {
            return;
        }
        let commits = lock(&self.state).positions();
        if commits.count() > 0
            && let Err(e) = self.consumer.commit(&commits, CommitMode::Async)
        {
            tracing::warn!(error = %e, topic = %self.topic, "commit when the consumer was dropped failed; the partitions' next owner delivers those records again");
        }
    }
}

/// How long reading a subscription's depth may take in all (its requests share it):
/// under the worker's 2 s wait for it, and a read the worker stopped waiting for
/// still runs on its blocking thread, at most this long.
const DEPTH_PATIENCE: Duration = Duration::from_millis(1500);

/// Records of `topics` that the group of `consumer` has not committed past: see
/// [`KafkaSubscription::queue_depth`]. Blocking, within [`DEPTH_PATIENCE`]: a metadata
/// request per topic, an offset fetch from the group's coordinator, and the
/// partitions' first and next offsets (two ListOffsets per partition leader).
fn group_lag(
    shared: &Shared,
    consumer: &StreamConsumer<Context>,
    topics: &[String],
) -> Result<u64> {
    let until = Instant::now() + DEPTH_PATIENCE;
    let left = || {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            Err(Error::new(
                ErrorKind::Timeout,
                format!("reading the group's lag took over {DEPTH_PATIENCE:?}"),
            ))
        } else {
            Ok(left)
        }
    };
    let mut wanted = TopicPartitionList::new();
    for topic in topics {
        // A topic gone or refused is an error, not a depth of 0.
        let layout = shared.read_layout(topic, left()?)?;
        for p in 0..i32::try_from(layout.partitions).unwrap_or(i32::MAX) {
            wanted.add_partition(topic, p);
        }
    }
    // Kafka's ListOffsets reads a partition's end at time -1 and its start at -2.
    let at = |time: Offset| -> Result<TopicPartitionList> {
        let mut asked = TopicPartitionList::new();
        for e in wanted.elements() {
            let _ = asked.add_partition_offset(e.topic(), e.partition(), time);
        }
        shared
            .metadata
            .offsets_for_times(asked, left()?)
            .map_err(|e| kafka_error(e, "read the partitions' offsets"))
    };
    let (ends, starts) = (at(Offset::End)?, at(Offset::Beginning)?);
    let committed = consumer
        .committed_offsets(wanted.clone(), left()?)
        .map_err(|e| kafka_error(e, "read the committed offsets of the group"))?;
    let offset_in = |list: &TopicPartitionList, topic: &str, partition: i32| match list
        .find_partition(topic, partition)
        .map(|e| e.offset())
    {
        Some(Offset::Offset(o)) => Ok(o),
        other => Err(Error::new(
            ErrorKind::Unavailable,
            format!("no offset of {topic:?}/{partition} in the broker's answer ({other:?})"),
        )),
    };
    let mut depth = 0u64;
    for e in wanted.elements() {
        let (topic, partition) = (e.topic(), e.partition());
        let (start, end) = (
            offset_in(&starts, topic, partition)?,
            offset_in(&ends, topic, partition)?,
        );
        let from = match committed
            .find_partition(topic, partition)
            .map(|c| c.offset())
        {
            Some(Offset::Offset(o)) => o.max(start),
            _ => start,
        };
        depth = depth.saturating_add(u64::try_from(end.saturating_sub(from)).unwrap_or(0));
    }
    Ok(depth)
}

/// Where a settlement moves a record.
enum Move {
    /// To the retry topic, due after the delay.
    Retry(Duration),
    /// To the dead-letter topic, with the reason and the description.
    DeadLetter(String, String),
    /// To the dead-letter topic: its lease ran out at its last allowed delivery.
    Exhausted,
}

/// Whether a consumer error is one a receive reports (brokers all down, the topic
/// gone, credentials or rights refused, a fatal client error), rather than one
/// librdkafka recovers from by itself (a dropped connection, a name to resolve again).
fn reportable(e: &rdkafka::error::KafkaError) -> bool {
    use rdkafka::error::RDKafkaErrorCode as C;
    matches!(e, rdkafka::error::KafkaError::MessageConsumptionFatal(_))
        || matches!(
            e.rdkafka_error_code(),
            Some(
                C::AllBrokersDown
                    | C::UnknownTopicOrPartition
                    | C::UnknownTopic
                    | C::TopicAuthorizationFailed
                    | C::GroupAuthorizationFailed
                    | C::SaslAuthenticationFailed
                    | C::Authentication
                    | C::Fatal
            )
        )
}

fn gone(token: u64) -> Error {
    Error::new(
        ErrorKind::LeaseExpired,
        format!(
            "Kafka delivery {token} is not held any more: settled already, its lease ran out, or its partition moved to another consumer"
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn received(topic: &str, partition: i32, offset: i64) -> Received {
        Received {
            topic: topic.into(),
            partition,
            offset,
            timestamp: None,
            record: KafkaRecord::default(),
        }
    }

    /// The committed offset only advances over the contiguous done prefix.
    #[test]
    fn commits_advance_over_the_done_prefix_only() {
        let mut state = State::default();
        for offset in [5, 6, 9] {
            state
                .tracks
                .entry(("t".into(), 0))
                .or_default()
                .pending
                .insert(offset, false);
        }
        state.mark_done(&received("t", 0, 6));
        state.mark_done(&received("t", 0, 9));
        assert_eq!(
            state.advance().count(),
            0,
            "5 is not done: nothing to commit"
        );
        state.mark_done(&received("t", 0, 5));
        let commits = state.advance();
        let elements = commits.elements();
        assert_eq!(elements.len(), 1);
        // Past 9: the gap at 7 and 8 holds no record read here.
        assert_eq!(elements[0].offset(), Offset::Offset(10));
        assert!(state.tracks[&(Arc::from("t"), 0)].pending.is_empty());
        assert_eq!(state.advance().count(), 0, "committed once");
    }

    /// Leases and delays from users never overflow (Duration::MAX panicked before).
    #[test]
    fn huge_leases_saturate() {
        assert!(lease_end(Duration::MAX) > Instant::now());
        assert!(lease_end(Duration::from_secs(1)) > Instant::now());
    }

    #[test]
    fn reasons_are_clipped_on_a_character_boundary() {
        assert_eq!(clip("short", 10), "short");
        let clipped = clip(&"é".repeat(10), 5);
        assert!(clipped.len() <= 5 + "…".len(), "{clipped}");
        assert!(clipped.ends_with('…'));
    }
}
