//! The provider-facing driver traits: small and batch-first (send a batch, receive a
//! batch, settle a batch). Providers implement these; users work with the portable
//! `Publisher` (cloudbus-core), `Consumer` (cloudbus-core),
//! `DeadLetters` (cloudbus-core) and `StreamConsumer` (cloudbus-core),
//! which add batching, concurrency, retries, dead-lettering, metrics and tracing once.

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use crate::capabilities::Capabilities;
use crate::codec::{DecodeError, RawMessage};
use crate::error::Result;
use crate::event::{
    AttributesReader, EXT_PARTITION_KEY, EXT_TRACEPARENT, Event, EventExt, ExtensionValue,
};
use crate::filter::Filter;

/// The concrete driver behind a `dyn` one, for escape hatches: every driver trait has
/// it as a supertrait and every `'static` type has it, so no driver writes it.
///
/// ```
/// use cloudbus_driver::AsAny;
/// struct Client(u8);
/// let driver: &dyn AsAny = &Client(7);
/// assert_eq!(driver.as_any().downcast_ref::<Client>().map(|c| c.0), Some(7));
/// ```
pub trait AsAny: Any + Send + Sync {
    /// `self` as [`Any`], to downcast to the driver's own type.
    fn as_any(&self) -> &dyn Any;
}

impl<T: Any + Send + Sync> AsAny for T {
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Per-event publish options.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PublishOptions {
    /// Ordering key; defaults to the event's `partitionkey` extension.
    pub ordering_key: Option<String>,
    /// Deduplication id; defaults to the CloudEvent id.
    pub dedup_id: Option<String>,
    /// Deliver no earlier than this long after publishing.
    pub delay: Option<Duration>,
}

impl PublishOptions {
    /// Options with an ordering key.
    pub fn ordered(key: impl Into<String>) -> Self {
        PublishOptions {
            ordering_key: Some(key.into()),
            ..Default::default()
        }
    }
    /// Options with a delay.
    pub fn delayed(delay: Duration) -> Self {
        PublishOptions {
            delay: Some(delay),
            ..Default::default()
        }
    }
}

/// What travels through a driver: a CloudEvent, or a raw message (a foreign message
/// injected by tests or bridges, or one that failed to decode).
#[derive(Clone, Debug)]
pub enum Payload {
    /// A CloudEvent.
    Event(Arc<Event>),
    /// Bytes and attributes that are not (or not yet) a CloudEvent.
    Raw(RawMessage),
}

impl Payload {
    /// The event, if this is one.
    pub fn event(&self) -> Option<&Arc<Event>> {
        match self {
            Payload::Event(e) => Some(e),
            Payload::Raw(_) => None,
        }
    }
    /// Estimated size in bytes.
    pub fn size(&self) -> usize {
        match self {
            Payload::Event(e) => crate::event::estimated_size(e),
            Payload::Raw(r) => r.size(),
        }
    }
}

/// One event handed to [`TopicDriver::send_batch`], with its options resolved.
#[derive(Clone, Debug)]
pub struct OutgoingMessage {
    /// What to send.
    pub payload: Payload,
    /// Resolved ordering key (explicit option, else the `partitionkey` extension).
    pub ordering_key: Option<String>,
    /// The explicit dedup id, if one was given; [`dedup_id`](Self::dedup_id) resolves
    /// the default (the CloudEvent id) without allocating.
    pub explicit_dedup_id: Option<String>,
    /// Delivery delay.
    pub delay: Option<Duration>,
    /// Estimated size in bytes (computed once).
    pub size: usize,
}

impl OutgoingMessage {
    /// Resolves options against the event.
    pub fn new(event: Arc<Event>, options: PublishOptions) -> Self {
        let ordering_key = options
            .ordering_key
            .or_else(|| event.partition_key().map(str::to_owned));
        let size = crate::event::estimated_size(&event);
        OutgoingMessage {
            payload: Payload::Event(event),
            ordering_key,
            explicit_dedup_id: options.dedup_id,
            delay: options.delay,
            size,
        }
    }
    /// Resolves options against an owned event in one pass over its extensions (this
    /// runs for every published event): the ordering key (the option, else the
    /// `partitionkey` extension) and the size. An event without a valid `traceparent`
    /// is first handed to `stamp`, which gives it one (the portable publisher opens the
    /// event's `create` span there).
    pub fn prepare_with(
        mut event: Event,
        options: PublishOptions,
        stamp: impl FnOnce(&mut Event),
    ) -> Self {
        let mut traced = false;
        let mut partition_key = None;
        for (name, value) in event.iter_extensions() {
            match (name, value) {
                (EXT_TRACEPARENT, ExtensionValue::String(s)) => {
                    traced = crate::trace_context::TraceContext::parse(s).is_some();
                }
                (EXT_PARTITION_KEY, ExtensionValue::String(s))
                    if options.ordering_key.is_none() =>
                {
                    partition_key = Some(s.clone());
                }
                _ => {}
            }
        }
        if !traced {
            stamp(&mut event);
        }
        let size = crate::event::estimated_size(&event);
        OutgoingMessage {
            payload: Payload::Event(Arc::new(event)),
            ordering_key: options.ordering_key.or(partition_key),
            explicit_dedup_id: options.dedup_id,
            delay: options.delay,
            size,
        }
    }

    /// A raw message (no CloudEvent), for bridges and tests of malformed input.
    pub fn raw(raw: RawMessage) -> Self {
        let size = raw.size();
        OutgoingMessage {
            payload: Payload::Raw(raw),
            ordering_key: None,
            explicit_dedup_id: None,
            delay: None,
            size,
        }
    }
    /// The deduplication id: the explicit one, else [`dedup_digest`](crate::hashing::dedup_digest) of the event's
    /// `source` and `id` (`None` for raw messages without an explicit id). A
    /// CloudEvent id is unique only within its source, so the bare id would make a
    /// broker drop a distinct event of another source as a duplicate.
    pub fn dedup_id(&self) -> Option<std::borrow::Cow<'_, str>> {
        match (&self.explicit_dedup_id, &self.payload) {
            (Some(id), _) => Some(std::borrow::Cow::Borrowed(id)),
            (None, Payload::Event(e)) => Some(std::borrow::Cow::Owned(
                crate::hashing::dedup_digest(e.source(), e.id()),
            )),
            (None, Payload::Raw(_)) => None,
        }
    }

    /// The event's id, or `"<raw>"`.
    pub fn id(&self) -> &str {
        match &self.payload {
            Payload::Event(e) => e.id(),
            Payload::Raw(_) => "<raw>",
        }
    }
}

/// Result of a batch send: one entry per message, in order. An `Err` for the whole
/// call means nothing is known to have been sent.
pub type BatchResults = Vec<Result<()>>;

/// Sends batches of events to one topic, queue or stream.
#[async_trait]
pub trait TopicDriver: AsAny {
    /// Sends `batch` (already within the capability limits) and reports each message.
    async fn send_batch(&self, batch: &[OutgoingMessage]) -> Result<BatchResults>;
    /// What this entity supports, including its batch limits.
    fn capabilities(&self) -> Capabilities;
    /// Releases resources; later sends may fail with [`ErrorKind::Closed`](crate::ErrorKind::Closed).
    async fn close(&self) -> Result<()> {
        Ok(())
    }
}

/// An opaque handle that settles one received message (a receipt handle, an ack id,
/// a lock token, a sequence number).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum AckToken {
    /// A numeric token.
    Number(u64),
    /// A textual token.
    Text(String),
}

impl AckToken {
    /// The numeric token, if it is one.
    pub fn as_number(&self) -> Option<u64> {
        match self {
            AckToken::Number(n) => Some(*n),
            AckToken::Text(_) => None,
        }
    }
    /// The textual token, if it is one.
    pub fn as_text(&self) -> Option<&str> {
        match self {
            AckToken::Text(s) => Some(s),
            AckToken::Number(_) => None,
        }
    }
}

/// How a received message is settled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Settlement {
    /// Processed: remove it.
    Ack,
    /// Not processed: deliver again after `delay`.
    Nack {
        /// How long to wait before redelivery (zero: at once).
        delay: Duration,
    },
    /// Move to the dead-letter place, keeping the reason.
    DeadLetter {
        /// A short reason (Service Bus `DeadLetterReason`).
        reason: String,
        /// A longer description.
        description: String,
    },
    /// Keep the lease for `lease` from now (not final).
    Extend {
        /// New lease length.
        lease: Duration,
    },
}

impl Settlement {
    /// Ack, nack and dead-letter end a delivery; extend does not.
    pub fn is_final(&self) -> bool {
        !matches!(self, Settlement::Extend { .. })
    }
    /// The status label used in metrics.
    pub fn status(&self) -> &'static str {
        match self {
            Settlement::Ack => "ack",
            Settlement::Nack { .. } => "nack",
            Settlement::DeadLetter { .. } => "dead_letter",
            Settlement::Extend { .. } => "extend",
        }
    }
}

/// One message as a driver received it.
#[derive(Debug)]
pub struct ReceivedMessage {
    /// The decoded event, or the raw message and why it could not be decoded.
    pub event: std::result::Result<Arc<Event>, (RawMessage, DecodeError)>,
    /// Settles this message.
    pub token: AckToken,
    /// Delivery attempt, starting at 1.
    pub attempt: u32,
    /// Lease length granted with this receipt, if the provider has leases.
    pub lease: Option<Duration>,
    /// When the provider accepted the message, if known.
    pub published_at: Option<DateTime<Utc>>,
    /// The ordering key the provider reports, if any.
    pub ordering_key: Option<String>,
    /// Estimated size in bytes, for flow control.
    pub size: usize,
    /// The partition the message was read from, where the provider's entities have
    /// partitions (Kafka); `None` elsewhere. Reported on the consumer's `process`
    /// span as `messaging.destination.partition.id`.
    pub partition: Option<String>,
    /// The message's offset (sequence) within [`partition`](Self::partition), where
    /// the provider numbers them (Kafka); `None` elsewhere. Reported on the
    /// consumer's `process` span as `messaging.kafka.offset`.
    pub offset: Option<i64>,
}

/// Receives and settles messages of one subscription or queue.
#[async_trait]
pub trait SubscriptionDriver: AsAny {
    /// Receives up to `max` messages, waiting up to `wait` for the first.
    async fn receive_batch(&self, max: usize, wait: Duration) -> Result<Vec<ReceivedMessage>>;
    /// Settles messages; one result per item, in order.
    async fn settle_batch(&self, items: &[(AckToken, Settlement)]) -> Result<BatchResults>;
    /// What this entity supports.
    fn capabilities(&self) -> Capabilities;
    /// Messages waiting, if the provider can tell (for `event_queue_depth`).
    async fn queue_depth(&self) -> Option<u64> {
        None
    }
    /// Releases resources.
    async fn close(&self) -> Result<()> {
        Ok(())
    }
}

/// One message kept in a dead-letter place.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    /// The event, or the raw message when it was malformed.
    pub payload: Payload,
    /// Why it was dead-lettered.
    pub reason: Option<String>,
    /// The longer description.
    pub description: Option<String>,
    /// Where it came from (queue or subscription).
    pub source_entity: Option<String>,
    /// How many deliveries it had.
    pub attempts: u32,
    /// When it was dead-lettered, if known.
    pub dead_lettered_at: Option<DateTime<Utc>>,
}

/// Reads and manages a dead-letter place.
#[async_trait]
pub trait DeadLetterDriver: AsAny {
    /// Up to `max` dead letters, without removing them.
    async fn peek(&self, max: usize) -> Result<Vec<DeadLetter>>;
    /// Moves up to `max` (all when `None`) back to their source; returns how many.
    async fn redrive(&self, max: Option<usize>) -> Result<usize>;
    /// Deletes up to `max` dead letters (all when `None`), oldest first; returns how
    /// many.
    async fn purge(&self, max: Option<usize>) -> Result<usize>;
}

/// Declares the entities a service needs, idempotently.
#[async_trait]
pub trait TopologyDriver: Send + Sync + 'static {
    /// Makes sure a topic (or queue, or stream) exists.
    async fn ensure_topic(&self, topic: &str) -> Result<()>;
    /// Makes sure a subscription exists with this configuration.
    async fn ensure_subscription(&self, spec: &SubscriptionSpec) -> Result<()>;
    /// Deletes a subscription if it exists.
    async fn delete_subscription(&self, topic: &str, name: &str) -> Result<()>;
    /// Delivers again to subscription `name` of `topic` the events published from
    /// `since` on (Pub/Sub: seek to a time; EventBridge: a replay from the bus's
    /// archive to the subscription's rule). Replayed events arrive asynchronously, as
    /// new deliveries of the same CloudEvents. Providers without it answer
    /// `Unsupported` (streams replay through `StreamConsumer::replay` (cloudbus-core)).
    async fn replay(&self, topic: &str, name: &str, since: DateTime<Utc>) -> Result<()> {
        Err(crate::error::Error::unsupported(format!(
            "this provider cannot replay subscription {name:?} of {topic:?} (since {since})"
        )))
    }
    /// The plan's reading of the topology ([`TopologyPlanning`]), where the provider
    /// can describe what it holds; `None` (the default) when it cannot, and a plan
    /// says so.
    fn planning(&self) -> Option<&dyn TopologyPlanning> {
        None
    }
}

/// What a topology plan reads and changes in place, for providers that can describe
/// their entities (optional: see [`TopologyDriver::planning`]).
#[async_trait]
pub trait TopologyPlanning: Send + Sync {
    /// Whether `topic` exists (for `topology::plan` (cloudbus-core)).
    async fn topic_exists(&self, topic: &str) -> Result<bool> {
        Err(crate::error::Error::unsupported(format!(
            "this provider cannot tell whether topic {topic:?} exists"
        )))
    }
    /// Subscription `name` of `topic` as the provider holds it, in the provider's own
    /// terms (its native filter, its lease and delivery limit); `None` when there is
    /// none (for `topology::plan` (cloudbus-core)).
    async fn describe_subscription(
        &self,
        topic: &str,
        name: &str,
    ) -> Result<Option<SubscriptionState>> {
        Err(crate::error::Error::unsupported(format!(
            "this provider cannot describe subscription {name:?} of {topic:?}"
        )))
    }
    /// What [`describe_subscription`](Self::describe_subscription) reads from a
    /// subscription made by `ensure_subscription(spec)`: the plan's wanted state.
    fn desired_state(&self, spec: &SubscriptionSpec) -> Result<SubscriptionState> {
        Err(crate::error::Error::unsupported(format!(
            "this provider cannot describe subscription {:?} of {:?}",
            spec.name, spec.topic
        )))
    }
    /// Changes an existing subscription to `spec` in place. A setting the provider
    /// cannot change on an existing subscription is `Unsupported`, naming it.
    async fn update_subscription(&self, spec: &SubscriptionSpec) -> Result<()> {
        Err(crate::error::Error::unsupported(format!(
            "this provider cannot change subscription {:?} of {:?} in place",
            spec.name, spec.topic
        )))
    }
    /// `topic`'s settings as the provider holds them (those
    /// [`desired_topic_state`](Self::desired_topic_state) can name); `None` when
    /// there is no such topic. `Unsupported` (the default) where topics have no
    /// settings a plan compares: the plan then asks
    /// [`topic_exists`](Self::topic_exists).
    async fn describe_topic(&self, topic: &str) -> Result<Option<TopicState>> {
        Err(crate::error::Error::unsupported(format!(
            "this provider cannot describe topic {topic:?}"
        )))
    }
    /// The settings this connection declares for `topic` (what `ensure_topic` would
    /// create it with), those a plan compares with
    /// [`describe_topic`](Self::describe_topic)'s; a setting it does not declare is
    /// not compared.
    fn desired_topic_state(&self, topic: &str) -> Result<TopicState> {
        Err(crate::error::Error::unsupported(format!(
            "this provider cannot describe topic {topic:?}"
        )))
    }
    /// Changes an existing topic to [`desired_topic_state`](Self::desired_topic_state)
    /// in place. A setting the provider cannot (or will not) change on an existing
    /// topic is `Unsupported`, naming it and what to do instead.
    async fn update_topic(&self, topic: &str) -> Result<()> {
        Err(crate::error::Error::unsupported(format!(
            "this provider cannot change topic {topic:?} in place"
        )))
    }
}

/// A topic's settings as its provider holds them, by the provider's names for them
/// (Kafka: `partitions`, `replication`, `retention.ms`, `cleanup.policy`), each as
/// text, so that a plan shows and compares them like with like.
///
/// ```
/// use cloudbus_driver::TopicState;
/// let mut state = TopicState::default();
/// state.settings.insert("partitions", "4".to_owned());
/// assert_eq!(state.settings.get("partitions").map(String::as_str), Some("4"));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TopicState {
    /// Each setting by name.
    pub settings: std::collections::BTreeMap<&'static str, String>,
}

impl TopicState {
    /// The settings of this (wanted) state that `current` holds otherwise or not at
    /// all, by name, with the wanted value, in name order: what a plan shows and an
    /// update changes. A setting this state does not name is not compared.
    ///
    /// ```
    /// use cloudbus_driver::TopicState;
    /// let state = |pairs: &[(&'static str, &str)]| TopicState {
    ///     settings: pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect(),
    /// };
    /// let wanted = state(&[("partitions", "4"), ("retention.ms", "60000")]);
    /// let current = state(&[("partitions", "4"), ("replication", "3")]);
    /// let differing: Vec<_> = wanted.differing_from(&current).collect();
    /// assert_eq!(differing, [("retention.ms", "60000")]);
    /// ```
    pub fn differing_from<'a>(
        &'a self,
        current: &'a TopicState,
    ) -> impl Iterator<Item = (&'static str, &'a str)> + 'a {
        self.settings
            .iter()
            .filter(|(name, value)| current.settings.get(*name) != Some(*value))
            .map(|(name, value)| (*name, value.as_str()))
    }
}

/// A subscription as its provider holds it, in the provider's own terms, so that a
/// plan compares like with like: the filter as the provider's native text (Pub/Sub
/// filter, SNS filter policy, Service Bus SQL, ...), the lease and the delivery limit
/// as the provider rounds them. `None` is a setting the provider does not have.
///
/// ```
/// use std::time::Duration;
/// use cloudbus_driver::SubscriptionState;
/// let state = SubscriptionState {
///     lease: Some(Duration::from_secs(30)),
///     ..SubscriptionState::default()
/// };
/// assert_eq!(state.filter, None);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SubscriptionState {
    /// The filter in the provider's native form.
    pub filter: Option<String>,
    /// Dead-letter after this many deliveries (`Some(0)`: never).
    pub max_delivery_attempts: Option<u32>,
    /// The lease (ack deadline, visibility timeout, lock duration).
    pub lease: Option<Duration>,
    /// Whether ordering keys are kept in order.
    pub ordered: Option<bool>,
}

/// A subscription as a service declares it.
///
/// ```
/// use cloudbus_driver::{Filter, SubscriptionSpec};
/// let spec = SubscriptionSpec::new("orders", "email")
///     .filter(Filter::prefix("type", "com.example.order."))
///     .max_delivery_attempts(5);
/// assert_eq!(spec.max_delivery_attempts, Some(5));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct SubscriptionSpec {
    /// The topic it reads.
    pub topic: String,
    /// Its name.
    pub name: String,
    /// Only events that match.
    pub filter: Option<Filter>,
    /// Dead-letter after this many deliveries (the provider's policy).
    pub max_delivery_attempts: Option<u32>,
    /// How long a delivery is leased to its consumer before the broker offers it
    /// again (Pub/Sub's ack deadline, SQS's visibility timeout, Service Bus's lock
    /// duration).
    pub lease: Duration,
    /// Deliver events with the same ordering key in order.
    pub ordered: bool,
}

impl SubscriptionSpec {
    /// A subscription `name` on `topic`, 30 s leases, ordered, no filter.
    pub fn new(topic: impl Into<String>, name: impl Into<String>) -> Self {
        SubscriptionSpec {
            topic: topic.into(),
            name: name.into(),
            filter: None,
            max_delivery_attempts: None,
            lease: Duration::from_secs(30),
            ordered: true,
        }
    }
    /// Sets the filter.
    pub fn filter(mut self, filter: Filter) -> Self {
        self.filter = Some(filter);
        self
    }
    /// Sets the provider's dead-letter threshold.
    pub fn max_delivery_attempts(mut self, n: u32) -> Self {
        self.max_delivery_attempts = Some(n);
        self
    }
    /// Sets the lease length.
    pub fn lease(mut self, d: Duration) -> Self {
        self.lease = d;
        self
    }
    /// Sets ordered delivery.
    pub fn ordered(mut self, ordered: bool) -> Self {
        self.ordered = ordered;
        self
    }
}

/// Where a consumer sends what it dead-letters when its provider has no dead-letter
/// place of its own (and where a stream consumer always does): the event with a
/// `deadletterreason` extension, or an undecodable message as it came with a
/// `deadletterreason` attribute. A `Publisher` (cloudbus-core) to a topic of
/// dead letters is one; a store or a log of your own can be another.
///
/// ```
/// use cloudbus_driver::{AttributesReader, DeadLetterSink, Event, RawMessage, Result};
/// struct Discarded;
/// #[async_trait::async_trait]
/// impl DeadLetterSink for Discarded {
///     async fn put_event(&self, event: Event) -> Result<()> {
///         eprintln!("dead letter {}", event.id());
///         Ok(())
///     }
///     async fn put_raw(&self, raw: RawMessage) -> Result<()> {
///         eprintln!("dead letter of {} bytes", raw.body.len());
///         Ok(())
///     }
/// }
/// ```
#[async_trait]
pub trait DeadLetterSink: Send + Sync + 'static {
    /// Keeps a dead-lettered event (its reason is in `deadletterreason`).
    async fn put_event(&self, event: Event) -> Result<()>;
    /// Keeps a message that is not a CloudEvent (its reason is in the
    /// `deadletterreason` attribute).
    async fn put_raw(&self, raw: RawMessage) -> Result<()>;
}

/// Where reading a partition starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StartPosition {
    /// The oldest record kept.
    Earliest,
    /// Only records written from now on.
    Latest,
    /// The record with this sequence number.
    AtSequence(String),
    /// The record after this sequence number (how checkpoints resume).
    AfterSequence(String),
    /// The first record written at or after this time.
    AtTime(DateTime<Utc>),
}

/// One partition (shard) of a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PartitionInfo {
    /// Its id.
    pub id: String,
    /// Partitions it was split or merged from; they are read to their end first.
    pub parents: Vec<String>,
    /// Closed partitions take no new records.
    pub closed: bool,
}

/// One record read from a partition.
#[derive(Clone, Debug)]
pub struct StreamRecord {
    /// The partition it came from.
    pub partition: String,
    /// Its sequence number (ordered within the partition).
    pub sequence: String,
    /// Its offset, where the provider numbers a partition's records by offset
    /// (Kafka); traces report it as `messaging.kafka.offset`.
    pub offset: Option<i64>,
    /// When the stream accepted it.
    pub timestamp: DateTime<Utc>,
    /// The event, or the raw record and why it is not a CloudEvent.
    pub event: std::result::Result<Arc<Event>, (RawMessage, DecodeError)>,
}

/// What one read returned.
#[derive(Clone, Debug)]
pub struct ReadBatch {
    /// Records, in order.
    pub records: Vec<StreamRecord>,
    /// The cursor to read next; `None` when the partition is closed and fully read.
    pub next: Option<String>,
    /// How far this read is behind the partition's newest record (Kinesis
    /// `MillisBehindLatest`; zero when caught up), when the provider tells.
    pub behind: Option<std::time::Duration>,
}

/// Stores the last processed sequence number per (group, partition) and the lease of
/// the reader that owns the partition.
#[async_trait]
pub trait CheckpointStore: Send + Sync + 'static {
    /// The checkpoint, if any.
    async fn load(&self, group: &str, partition: &str) -> Result<Option<String>>;
    /// Saves `sequence` as the checkpoint for `owner`. Answers `false` (and saves
    /// nothing) when another reader holds an unexpired lease on the partition.
    async fn save(&self, group: &str, partition: &str, owner: &str, sequence: &str)
    -> Result<bool>;
    /// Takes the partition for `owner` for `lease`, or renews `owner`'s lease.
    /// Answers `false` when another reader holds an unexpired lease.
    async fn acquire(
        &self,
        group: &str,
        partition: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<bool>;
    /// Ends `owner`'s lease (the checkpoint stays), so that another reader can take
    /// the partition at once. Does nothing when `owner` does not hold it.
    async fn release(&self, group: &str, partition: &str, owner: &str) -> Result<()>;
    /// Called when `owner` stops reading `group` (after releasing each partition it
    /// held), for a store that keeps something per reader besides its leases (Kafka: a
    /// group member, which leaves the group even when it held no partition). By
    /// default nothing.
    async fn release_owner(&self, _group: &str, _owner: &str) -> Result<()> {
        Ok(())
    }
}

/// A partitioned log, as a provider exposes it.
#[async_trait]
pub trait StreamDriver: AsAny {
    /// The partitions, including closed ones still holding records.
    async fn partitions(&self) -> Result<Vec<PartitionInfo>>;
    /// A cursor (shard iterator) for `partition` at `at`.
    async fn cursor(&self, partition: &str, at: &StartPosition) -> Result<String>;
    /// Up to `max` records from `cursor`.
    async fn read(&self, cursor: &str, max: usize) -> Result<ReadBatch>;
    /// The checkpoints this log keeps itself for its reader groups (Kafka: a consumer
    /// group's committed offsets, with the group coordinator deciding which reader
    /// holds which partition), if it keeps any. A stream consumer given no
    /// [`CheckpointStore`] uses these, else checkpoints in memory; a store it is given
    /// wins over these. By default a log keeps none.
    fn checkpoints(&self) -> Option<Arc<dyn CheckpointStore>> {
        None
    }
}

/// A connection to one provider: opens its entities by name.
///
/// The facade's `cloudbus::connect(url)` returns one of these wrapped in a `Bus`.
#[async_trait]
pub trait BusDriver: AsAny {
    /// The URL scheme (`mem`, `sqs`, ...).
    fn scheme(&self) -> &str;
    /// A sender for `topic`. Opening is lazy: a missing topic fails on first send.
    async fn topic(&self, topic: &str) -> Result<Arc<dyn TopicDriver>>;
    /// A receiver for `subscription` of `topic`. By default there is none (a
    /// push-only provider): Unsupported.
    async fn subscription(
        &self,
        topic: &str,
        subscription: &str,
    ) -> Result<Arc<dyn SubscriptionDriver>> {
        Err(crate::error::Error::unsupported(format!(
            "{}:// has no pull consumers: {topic}/{subscription} cannot be received from",
            self.scheme()
        )))
    }
    /// The dead-letter place of `subscription` of `topic`. By default there is none
    /// to read: Unsupported.
    async fn dead_letters(
        &self,
        topic: &str,
        subscription: &str,
    ) -> Result<Arc<dyn DeadLetterDriver>> {
        Err(crate::error::Error::unsupported(format!(
            "{}:// keeps no dead letters cloudbus can read for {topic}/{subscription}",
            self.scheme()
        )))
    }
    /// Declares entities.
    fn topology(&self) -> Arc<dyn TopologyDriver>;
    /// A partitioned log reader for `stream`, where the provider has logs. By
    /// default there are none: Unsupported, naming the providers that have them.
    async fn stream(&self, stream: &str) -> Result<Arc<dyn StreamDriver>> {
        Err(crate::error::Error::unsupported(format!(
            "{}:// has no partitioned logs, so {stream:?} cannot be read as a stream; \
             Kinesis (kinesis://) and the memory broker (mem://) have them",
            self.scheme()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A provider with topics only: what it lacks comes from the trait's defaults.
    struct PushOnly;

    #[async_trait]
    impl TopologyDriver for PushOnly {
        async fn ensure_topic(&self, _topic: &str) -> Result<()> {
            Ok(())
        }
        async fn ensure_subscription(&self, _spec: &SubscriptionSpec) -> Result<()> {
            Ok(())
        }
        async fn delete_subscription(&self, _topic: &str, _name: &str) -> Result<()> {
            Ok(())
        }
    }

    #[async_trait]
    impl BusDriver for PushOnly {
        fn scheme(&self) -> &str {
            "push"
        }
        async fn topic(&self, topic: &str) -> Result<Arc<dyn TopicDriver>> {
            Err(crate::Error::not_found(topic))
        }
        fn topology(&self) -> Arc<dyn TopologyDriver> {
            Arc::new(PushOnly)
        }
    }

    /// Issue 14: capabilities a backend lacks are Unsupported by default, saying which
    /// provider and what, instead of a stub in every provider.
    #[tokio::test]
    async fn missing_capabilities_are_unsupported_by_default() {
        let bus = PushOnly;
        let errors = [
            bus.subscription("t", "s").await.err(),
            bus.dead_letters("t", "s").await.err(),
            bus.stream("log").await.err(),
        ];
        for e in errors {
            let e = e.expect("an error");
            assert_eq!(e.kind(), crate::ErrorKind::Unsupported, "{e}");
            assert!(e.message().starts_with("push://"), "{e}");
        }
        assert!(bus.topology().planning().is_none());
    }

    /// The blanket `AsAny` reaches the concrete driver through a `dyn` one.
    #[test]
    fn a_dyn_driver_downcasts_to_its_own_type() {
        let bus: Arc<dyn BusDriver> = Arc::new(PushOnly);
        assert!((*bus).as_any().downcast_ref::<PushOnly>().is_some());
    }
}
