//! Amazon SQS: standard and FIFO queues as cloudbus topics and subscriptions.
//!
//! A queue is both the topic (publishers send to it) and the subscription (consumers
//! compete on it; SQS has no fan-out). `ensure_subscription(spec)` configures the
//! queue named by `spec.topic`: its visibility timeout (the lease), a dead-letter
//! queue `<queue>-dlq` (`<queue>-dlq.fifo`) with a RedrivePolicy (`maxReceiveCount` =
//! the spec's max delivery attempts, 1000 when unset), and a tag that admits the
//! subscription name. CloudEvents travel in binary mode as `ce-` message attributes
//! within SQS's 10 (two are kept for the dead-letter reason), else structured.

use std::any::Any;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
    MessageAttributeValue, MessageSystemAttributeName, QueueAttributeName,
    SendMessageBatchRequestEntry,
};
use chrono::{DateTime, Utc};
use cloudbus_core::AttributesReader as _;
use cloudbus_core::codec::RawMessage;
use cloudbus_core::{
    AckToken, BatchResults, BinaryCodec, Bus, BusDriver, Capabilities, DeadLetter,
    DeadLetterDriver, Error, ErrorKind, FilterSupport, OutgoingMessage, Payload, ReceivedMessage,
    Result, Settlement, SubscriptionDriver, SubscriptionSpec, TopicDriver, TopologyDriver,
};

/// The attribute prefix of binary-mode CloudEvents.
pub const ATTRIBUTE_PREFIX: &str = "ce-";
/// The attribute that carries `datacontenttype` in binary mode.
pub const CONTENT_TYPE_ATTRIBUTE: &str = "content-type";
/// SQS allows 10 message attributes.
pub const MAX_ATTRIBUTES: usize = 10;
/// Attribute slots kept free for the dead-letter reason and description.
const RESERVED_ATTRIBUTES: usize = 2;
/// Largest message (body and attributes) SQS accepts.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// Most messages in one SendMessageBatch, and most bytes.
pub const MAX_BATCH_COUNT: usize = 10;
/// The longest per-message delay SQS allows.
pub const MAX_DELAY: Duration = Duration::from_secs(900);
/// maxReceiveCount when the spec sets no max delivery attempts (SQS's ceiling).
const DEFAULT_MAX_RECEIVES: u32 = 1000;

const DL_REASON: &str = "cloudbus-dl-reason";
const DL_DESCRIPTION: &str = "cloudbus-dl-description";
const SUBSCRIPTION_TAG: &str = "cloudbus-subscription:";

pub(crate) fn codec() -> BinaryCodec {
    BinaryCodec::new(ATTRIBUTE_PREFIX)
        .content_type_attribute(CONTENT_TYPE_ATTRIBUTE)
        .max_attributes(MAX_ATTRIBUTES, RESERVED_ATTRIBUTES)
}

fn is_fifo(queue: &str) -> bool {
    queue.ends_with(".fifo")
}

/// The dead-letter queue of `queue`.
pub fn dead_letter_queue(queue: &str) -> String {
    match queue.strip_suffix(".fifo") {
        Some(base) => format!("{base}-dlq.fifo"),
        None => format!("{queue}-dlq"),
    }
}

/// What a queue supports: FIFO queues keep order per group and drop duplicates, but
/// have no per-message delay.
///
/// ```
/// let fifo = cloudbus_aws::sqs::capabilities("orders.fifo");
/// assert!(fifo.ordering && fifo.deduplication && fifo.max_delay.is_none());
/// ```
pub fn capabilities(queue: &str) -> Capabilities {
    let mut c = Capabilities::broker(MAX_MESSAGE_BYTES, MAX_BATCH_COUNT, MAX_MESSAGE_BYTES);
    c.filtering = FilterSupport::None;
    c.fan_out = false;
    c.replay = false;
    if is_fifo(queue) {
        c.ordering = true;
        c.deduplication = true;
        c.max_delay = None;
    } else {
        c.ordering = false;
        c.max_delay = Some(MAX_DELAY);
    }
    c
}

/// The portable kind of an SQS error code.
pub(crate) fn kind_of_code(code: &str) -> ErrorKind {
    if let Some(kind) = crate::common_kind(code) {
        return kind;
    }
    match code {
        c if c.contains("NonExistentQueue") || c.contains("QueueDoesNotExist") => {
            ErrorKind::NotFound
        }
        c if c.contains("QueueAlreadyExists") || c.contains("QueueNameExists") => {
            ErrorKind::AlreadyExists
        }
        c if c.contains("Throttl") || c.contains("OverLimit") || c.contains("RequestLimit") => {
            ErrorKind::Throttled
        }
        c if c.contains("PurgeQueueInProgress") => ErrorKind::Throttled,
        c if c.contains("AccessDenied")
            || c.contains("InvalidClientTokenId")
            || c.contains("UnrecognizedClient")
            || c.contains("InvalidSecurity")
            || c.contains("SignatureDoesNotMatch") =>
        {
            ErrorKind::PermissionDenied
        }
        c if c.contains("TooLong") => ErrorKind::TooLarge,
        c if c.contains("ReceiptHandleIsInvalid") || c.contains("MessageNotInflight") => {
            ErrorKind::LeaseExpired
        }
        c if c.contains("UnsupportedOperation") => ErrorKind::Unsupported,
        c if c.contains("ServiceUnavailable") || c.contains("InternalError") => {
            ErrorKind::Unavailable
        }
        c if c.contains("Invalid") || c.contains("Missing") || c.contains("Empty") => {
            ErrorKind::InvalidArgument
        }
        _ => ErrorKind::Internal,
    }
}

/// Reports the entries of one SQS batch call: the ids it accepted, and the failed
/// ones with their error codes.
fn report_batch<'a>(
    slots: &mut crate::Slots,
    successful: impl Iterator<Item = &'a str>,
    failed: &[aws_sdk_sqs::types::BatchResultErrorEntry],
    what: &str,
) {
    for id in successful {
        crate::report(slots, id, Ok(()));
    }
    for f in failed {
        let error = Error::new(
            entry_kind(f.code(), f.sender_fault()),
            format!("{what}: {}: {}", f.code(), f.message().unwrap_or_default()),
        );
        crate::report(slots, f.id(), Err(error));
    }
}

/// The kind of a failed batch entry: SQS marks entries that failed through no fault of
/// the request with `SenderFault = false`; those are worth another try whatever their
/// code.
fn entry_kind(code: &str, sender_fault: bool) -> ErrorKind {
    let kind = kind_of_code(code);
    if !sender_fault && !kind.is_retryable() {
        ErrorKind::Unavailable
    } else {
        kind
    }
}

fn build_error(e: aws_sdk_sqs::error::BuildError) -> Error {
    Error::with_source(ErrorKind::InvalidArgument, "invalid SQS request", e)
}

/// What every SQS driver of one bus shares (and SNS and EventBridge, whose
/// subscriptions are SQS queues): the client and the queue URLs looked up so far.
pub(crate) struct SqsContext {
    pub(crate) client: Client,
    urls: Mutex<HashMap<String, String>>,
}

impl SqsContext {
    pub(crate) fn new(client: Client) -> Self {
        SqsContext {
            client,
            urls: Mutex::new(HashMap::new()),
        }
    }

    /// The queue URL of `name` (GetQueueUrl, cached; never built by hand).
    pub(crate) async fn url(&self, name: &str) -> Result<String> {
        if let Some(u) = self
            .urls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
        {
            return Ok(u.clone());
        }
        let out = self
            .client
            .get_queue_url()
            .queue_name(name)
            .send()
            .await
            .map_err(|e| crate::sdk_error(e, kind_of_code, &format!("queue {name}")))?;
        let url = out
            .queue_url()
            .ok_or_else(|| Error::not_found(format!("queue {name} has no URL")))?
            .to_owned();
        self.urls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned(), url.clone());
        Ok(url)
    }

    pub(crate) async fn attribute(
        &self,
        url: &str,
        name: QueueAttributeName,
    ) -> Result<Option<String>> {
        let out = self
            .client
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(name.clone())
            .send()
            .await
            .map_err(|e| crate::sdk_error(e, kind_of_code, &format!("attributes of {url}")))?;
        Ok(out.attributes().and_then(|a| a.get(&name)).cloned())
    }

    /// The ARN of queue `name` at `url`: NotFound when the queue has none.
    pub(crate) async fn queue_arn(&self, url: &str, name: &str) -> Result<String> {
        self.attribute(url, QueueAttributeName::QueueArn)
            .await?
            .ok_or_else(|| Error::not_found(format!("queue {name} has no ARN")))
    }

    pub(crate) async fn create(&self, name: &str) -> Result<String> {
        let mut req = self.client.create_queue().queue_name(name);
        if is_fifo(name) {
            req = req.attributes(QueueAttributeName::FifoQueue, "true");
        }
        match req.send().await {
            Ok(out) => {
                let url = out.queue_url().unwrap_or_default().to_owned();
                if url.is_empty() {
                    return self.url(name).await;
                }
                self.urls
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(name.to_owned(), url.clone());
                Ok(url)
            }
            Err(e) => {
                let e = crate::sdk_error(e, kind_of_code, &format!("create queue {name}"));
                if e.kind() == ErrorKind::AlreadyExists {
                    self.url(name).await
                } else {
                    Err(e)
                }
            }
        }
    }

    /// Sends one message (the dead-letter and redrive paths).
    async fn send_one(&self, queue: &str, m: &Stored, extra: &[(&str, &str)]) -> Result<()> {
        let url = self.url(queue).await?;
        let mut req = self
            .client
            .send_message()
            .queue_url(&url)
            .message_body(&m.body);
        for (k, v) in m.attributes.iter() {
            req = req.message_attributes(k, string_attribute(v)?);
        }
        for (k, v) in extra {
            if !v.is_empty() {
                req = req.message_attributes(*k, string_attribute(v)?);
            }
        }
        if is_fifo(queue) {
            req = req
                .message_group_id(m.group.clone().unwrap_or_else(|| "default".to_owned()))
                .message_deduplication_id(format!("{}-{}", m.message_id, fastrand_suffix()));
        }
        req.send()
            .await
            .map_err(|e| crate::sdk_error(e, kind_of_code, &format!("send to {queue}")))?;
        Ok(())
    }

    async fn delete(&self, url: &str, receipt: &str) -> Result<()> {
        self.client
            .delete_message()
            .queue_url(url)
            .receipt_handle(receipt)
            .send()
            .await
            .map_err(|e| crate::sdk_error(e, kind_of_code, "delete message"))?;
        Ok(())
    }
}

fn fastrand_suffix() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    format!("{nanos:x}")
}

fn string_attribute(v: &str) -> Result<MessageAttributeValue> {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(v)
        .build()
        .map_err(build_error)
}

/// A received message kept for dead-lettering and redrive.
#[derive(Clone, Debug)]
struct Stored {
    body: String,
    attributes: BTreeMap<String, String>,
    group: Option<String>,
    message_id: String,
    attempts: u32,
}

fn stored(m: &aws_sdk_sqs::types::Message) -> Stored {
    let system = m.attributes();
    let get = |n: MessageSystemAttributeName| system.and_then(|a| a.get(&n)).cloned();
    Stored {
        body: m.body().unwrap_or_default().to_owned(),
        attributes: m
            .message_attributes()
            .map(|a| {
                a.iter()
                    .filter_map(|(k, v)| v.string_value().map(|s| (k.clone(), s.to_owned())))
                    .collect()
            })
            .unwrap_or_default(),
        group: get(MessageSystemAttributeName::MessageGroupId),
        message_id: m.message_id().unwrap_or_default().to_owned(),
        attempts: get(MessageSystemAttributeName::ApproximateReceiveCount)
            .and_then(|v| v.parse().ok())
            .unwrap_or(1),
    }
}

fn sent_at(m: &aws_sdk_sqs::types::Message) -> Option<DateTime<Utc>> {
    m.attributes()
        .and_then(|a| a.get(&MessageSystemAttributeName::SentTimestamp))
        .and_then(|v| v.parse::<i64>().ok())
        .and_then(DateTime::from_timestamp_millis)
}

/// SQS as a cloudbus provider (`sqs://[?region=R][&endpoint=URL]`).
#[derive(Clone)]
pub struct SqsBus {
    shared: Arc<SqsContext>,
}

impl std::fmt::Debug for SqsBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SqsBus { .. }")
    }
}

impl SqsBus {
    /// A bus over the SQS client made from `config`.
    pub fn new(config: &aws_config::SdkConfig) -> Self {
        Self::from_client(Client::new(config))
    }

    /// A bus over an existing client.
    pub fn from_client(client: Client) -> Self {
        SqsBus {
            shared: Arc::new(SqsContext::new(client)),
        }
    }

    /// The SQS client (escape hatch).
    pub fn client(&self) -> &Client {
        &self.shared.client
    }

    /// Wraps this driver in the portable [`Bus`].
    pub fn into_bus(self) -> Bus {
        Bus::new(Arc::new(self))
    }
}

#[async_trait]
impl BusDriver for SqsBus {
    fn scheme(&self) -> &str {
        "sqs"
    }

    async fn topic(&self, topic: &str) -> Result<Arc<dyn TopicDriver>> {
        Ok(Arc::new(SqsQueue::new(self.shared.clone(), topic, None)))
    }

    async fn subscription(
        &self,
        topic: &str,
        subscription: &str,
    ) -> Result<Arc<dyn SubscriptionDriver>> {
        Ok(Arc::new(SqsQueue::new(
            self.shared.clone(),
            topic,
            Some(subscription),
        )))
    }

    async fn dead_letters(
        &self,
        topic: &str,
        _subscription: &str,
    ) -> Result<Arc<dyn DeadLetterDriver>> {
        Ok(Arc::new(SqsDeadLetters {
            shared: self.shared.clone(),
            source: topic.to_owned(),
            queue: dead_letter_queue(topic),
        }))
    }

    fn topology(&self) -> Arc<dyn TopologyDriver> {
        Arc::new(SqsTopology {
            shared: self.shared.clone(),
        })
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

struct SqsTopology {
    shared: Arc<SqsContext>,
}

#[async_trait]
impl TopologyDriver for SqsTopology {
    async fn ensure_topic(&self, topic: &str) -> Result<()> {
        self.shared.create(topic).await.map(|_| ())
    }

    async fn ensure_subscription(&self, spec: &SubscriptionSpec) -> Result<()> {
        if spec.filter.is_some() {
            return Err(Error::unsupported(
                "SQS queues have no filters; filter in the consumer (ConsumerOptions::filter) \
                 or subscribe the queue to SNS",
            ));
        }
        configure_queue(&self.shared, spec).await
    }

    async fn delete_subscription(&self, topic: &str, name: &str) -> Result<()> {
        let url = match self.shared.url(topic).await {
            Ok(u) => u,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        self.shared
            .client
            .untag_queue()
            .queue_url(url)
            .tag_keys(format!("{SUBSCRIPTION_TAG}{name}"))
            .send()
            .await
            .map_err(|e| crate::sdk_error(e, kind_of_code, &format!("untag queue {topic}")))?;
        Ok(())
    }
}

/// Configures the queue `spec.topic` for `spec`: visibility timeout, dead-letter
/// queue and RedrivePolicy, and a tag admitting `spec.name` when it differs.
pub(crate) async fn configure_queue(shared: &SqsContext, spec: &SubscriptionSpec) -> Result<()> {
    let url = shared.url(&spec.topic).await?;
    let dlq = dead_letter_queue(&spec.topic);
    let dlq_url = shared.create(&dlq).await?;
    let dlq_arn = shared.queue_arn(&dlq_url, &dlq).await?;
    let max = spec
        .max_delivery_attempts
        .unwrap_or(DEFAULT_MAX_RECEIVES)
        .clamp(1, DEFAULT_MAX_RECEIVES);
    let visibility = spec.lease.as_secs_f64().ceil().clamp(0.0, 43_200.0) as u64;
    shared
        .client
        .set_queue_attributes()
        .queue_url(&url)
        .attributes(
            QueueAttributeName::VisibilityTimeout,
            visibility.to_string(),
        )
        .attributes(
            QueueAttributeName::RedrivePolicy,
            format!(r#"{{"deadLetterTargetArn":"{dlq_arn}","maxReceiveCount":"{max}"}}"#),
        )
        .send()
        .await
        .map_err(|e| {
            crate::sdk_error(e, kind_of_code, &format!("configure queue {}", spec.topic))
        })?;
    if spec.name != spec.topic {
        shared
            .client
            .tag_queue()
            .queue_url(&url)
            .tags(format!("{SUBSCRIPTION_TAG}{}", spec.name), "true")
            .send()
            .await
            .map_err(|e| crate::sdk_error(e, kind_of_code, &format!("tag queue {}", spec.topic)))?;
    }
    Ok(())
}

/// Makes the queue of a subscription that another service feeds (SNS, EventBridge):
/// the queue `spec.name`, an access policy that lets `service` send to it on behalf
/// of `source_arn` only, and the SQS configuration of `spec` (lease, dead-letter
/// queue, redrive policy). Returns the queue's ARN.
pub(crate) async fn subscription_queue(
    shared: &SqsContext,
    spec: &SubscriptionSpec,
    service: &str,
    source_arn: &str,
) -> Result<String> {
    let queue = &spec.name;
    let url = shared.create(queue).await?;
    let queue_arn = allow_sender(shared, queue, &url, service, source_arn).await?;
    let mut queue_spec = spec.clone();
    queue_spec.topic = queue.clone();
    queue_spec.filter = None;
    configure_queue(shared, &queue_spec).await?;
    Ok(queue_arn)
}

/// Sets the access policy of `queue` (at `url`) so that `service` may send to it on
/// behalf of `source_arn` only. Returns the queue's ARN.
pub(crate) async fn allow_sender(
    shared: &SqsContext,
    queue: &str,
    url: &str,
    service: &str,
    source_arn: &str,
) -> Result<String> {
    let queue_arn = shared.queue_arn(url, queue).await?;
    let access = serde_json::json!({
        "Version": "2012-10-17",
        "Statement": [{
            "Effect": "Allow",
            "Principal": { "Service": service },
            "Action": "sqs:SendMessage",
            "Resource": queue_arn,
            "Condition": { "ArnEquals": { "aws:SourceArn": source_arn } }
        }]
    });
    shared
        .client
        .set_queue_attributes()
        .queue_url(url)
        .attributes(QueueAttributeName::Policy, access.to_string())
        .send()
        .await
        .map_err(|e| crate::sdk_error(e, kind_of_code, &format!("queue policy of {queue}")))?;
    Ok(queue_arn)
}

/// How a queue was opened: its URL, lease, and whether the subscription is admitted.
#[derive(Clone, Debug)]
struct Opened {
    url: String,
    lease: Duration,
}

/// Most received messages one queue driver holds for dead-lettering.
const MAX_HELD: usize = 20_000;
/// How long past its lease a receipt is still held (a settle racing the expiry).
const HELD_GRACE: Duration = Duration::from_secs(60);

/// One SQS queue as a [`TopicDriver`] and a [`SubscriptionDriver`].
pub struct SqsQueue {
    shared: Arc<SqsContext>,
    queue: String,
    subscription: Option<String>,
    codec: BinaryCodec,
    opened: tokio::sync::OnceCell<Opened>,
    /// Received messages by receipt handle, for dead-lettering (body and attributes),
    /// with the end of their lease; bounded by [`MAX_HELD`].
    held: Mutex<HashMap<String, (Instant, Stored)>>,
    /// A receive whose caller gave up, and what it brought.
    pending: tokio::sync::Mutex<Option<ReceiveTask>>,
    buffer: Mutex<std::collections::VecDeque<aws_sdk_sqs::types::Message>>,
    closed: std::sync::atomic::AtomicBool,
}

type ReceiveTask = tokio::task::JoinHandle<Result<Vec<aws_sdk_sqs::types::Message>>>;

impl SqsQueue {
    pub(crate) fn new(shared: Arc<SqsContext>, queue: &str, subscription: Option<&str>) -> Self {
        SqsQueue {
            shared,
            queue: queue.to_owned(),
            subscription: subscription.map(str::to_owned),
            codec: codec(),
            opened: tokio::sync::OnceCell::new(),
            held: Mutex::new(HashMap::new()),
            pending: tokio::sync::Mutex::new(None),
            buffer: Mutex::new(std::collections::VecDeque::new()),
            closed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The queue's name.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    async fn opened(&self) -> Result<&Opened> {
        self.opened
            .get_or_try_init(|| async {
                let url = self.shared.url(&self.queue).await?;
                if let Some(sub) = &self.subscription
                    && sub != &self.queue
                {
                    let tags = self
                        .shared
                        .client
                        .list_queue_tags()
                        .queue_url(&url)
                        .send()
                        .await
                        .map_err(|e| {
                            crate::sdk_error(e, kind_of_code, &format!("tags of {}", self.queue))
                        })?;
                    let key = format!("{SUBSCRIPTION_TAG}{sub}");
                    if !tags.tags().is_some_and(|t| t.contains_key(&key)) {
                        return Err(Error::not_found(format!(
                            "queue {} has no subscription {sub} (make it with \
                             ensure_subscription, or use the queue name)",
                            self.queue
                        )));
                    }
                }
                let lease = self
                    .shared
                    .attribute(&url, QueueAttributeName::VisibilityTimeout)
                    .await?
                    .and_then(|v| v.parse::<u64>().ok())
                    .map(Duration::from_secs)
                    .unwrap_or(Duration::from_secs(30));
                Ok(Opened { url, lease })
            })
            .await
    }

    /// Up to `max` messages within `wait`. Cancellation-safe: the ReceiveMessage call
    /// runs in its own task, and what it brings after its caller gave up is kept for
    /// the next call instead of staying invisible for a whole visibility timeout.
    async fn pull(
        &self,
        url: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<aws_sdk_sqs::types::Message>> {
        let mut pending = self.pending.lock().await;
        if !self.buffer_is_empty() {
            return Ok(self.take_buffered(max));
        }
        let handle = pending.get_or_insert_with(|| {
            tokio::spawn(receive_messages(
                self.shared.client.clone(),
                url.to_owned(),
                self.queue.clone(),
                max,
                wait,
            ))
        });
        match tokio::time::timeout(wait + Duration::from_secs(1), handle).await {
            Err(_) => Ok(Vec::new()),
            Ok(joined) => {
                *pending = None;
                let got = joined.map_err(|e| {
                    Error::with_source(ErrorKind::Internal, "the SQS receive task failed", e)
                })??;
                self.buffer
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .extend(got);
                Ok(self.take_buffered(max))
            }
        }
    }

    fn buffer_is_empty(&self) -> bool {
        self.buffer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    fn take_buffered(&self, max: usize) -> Vec<aws_sdk_sqs::types::Message> {
        let mut buffer = self.buffer.lock().unwrap_or_else(|p| p.into_inner());
        let n = max.max(1).min(buffer.len());
        buffer.drain(..n).collect()
    }

    fn encode(&self, m: &OutgoingMessage) -> Result<RawMessage> {
        match &m.payload {
            Payload::Event(e) => text_body(&self.codec, e, &[]),
            Payload::Raw(raw) => Ok(raw.clone()),
        }
    }

    fn entry(&self, id: usize, m: &OutgoingMessage) -> Result<SendMessageBatchRequestEntry> {
        let raw = self.encode(m)?;
        let body = String::from_utf8(raw.body)
            .map_err(|_| Error::invalid("an SQS message body must be UTF-8 text"))?;
        let mut e = SendMessageBatchRequestEntry::builder()
            .id(id.to_string())
            .message_body(body);
        for (k, v) in &raw.attributes {
            e = e.message_attributes(k, string_attribute(v)?);
        }
        if let Some(delay) = m.delay {
            e = e.delay_seconds(delay.as_secs().min(MAX_DELAY.as_secs()) as i32);
        }
        if is_fifo(&self.queue) {
            e = e
                .message_group_id(group_id(m))
                .message_deduplication_id(dedup_id_of(m));
        }
        e.build().map_err(build_error)
    }

    /// Holds a received message until it is settled or its lease (`lease` from now)
    /// has long run out: a receipt past its lease cannot be dead-lettered from here
    /// (another reader may have the message). Never more than [`MAX_HELD`]: the
    /// receipts closest to expiry go first (their dead-letter then fails with
    /// LeaseExpired and the message comes back; nothing is lost).
    fn keep(&self, receipt: &str, m: Stored, lease: Duration) {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.len() >= MAX_HELD {
            let now = Instant::now();
            held.retain(|_, (until, _)| *until > now);
        }
        if held.len() >= MAX_HELD * 3 / 4 {
            let mut ends: Vec<Instant> = held.values().map(|(until, _)| *until).collect();
            ends.sort_unstable();
            let cut = ends[held.len() - MAX_HELD / 2];
            held.retain(|_, (until, _)| *until > cut);
        }
        held.insert(receipt.to_owned(), (Instant::now() + lease + HELD_GRACE, m));
    }

    /// Moves the end of a held receipt's lease (an extension).
    fn extend_held(&self, receipt: &str, lease: Duration) {
        if let Some((until, _)) = self
            .held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(receipt)
        {
            *until = Instant::now() + lease + HELD_GRACE;
        }
    }

    fn take(&self, receipt: &str) -> Option<Stored> {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(receipt)
            .map(|(_, m)| m)
    }
}

/// `event` as SQS and SNS carry it: binary mode when its body is non-empty UTF-8 text
/// and its attributes fit, otherwise structured (an event without data, or with
/// binary data as `data_base64`).
pub(crate) fn text_body(
    codec: &BinaryCodec,
    event: &cloudbus_core::Event,
    filter_keys: &[String],
) -> Result<RawMessage> {
    let (raw, _) = codec.encode_keeping(event, filter_keys)?;
    if !raw.body.is_empty() && std::str::from_utf8(&raw.body).is_ok() {
        Ok(raw)
    } else {
        Ok(self::codec()
            .structured()
            .encode_keeping(event, filter_keys)?
            .0)
    }
}

/// The prefix of the message group of an event without an ordering key: each such
/// event is its own group, so unordered events do not wait for one another.
const UNORDERED_GROUP: &str = "cloudbus-unordered-";

/// The MessageGroupId of `m` on a FIFO queue: its ordering key, or a group of its own.
pub(crate) fn group_id(m: &OutgoingMessage) -> String {
    match &m.ordering_key {
        Some(k) => k.clone(),
        None => match &m.payload {
            Payload::Event(e) => format!(
                "{UNORDERED_GROUP}{}",
                cloudbus_core::driver::dedup_digest(e.source(), e.id())
            ),
            Payload::Raw(_) => format!("{UNORDERED_GROUP}{}", dedup_id_of(m)),
        },
    }
}

/// One ReceiveMessage (two when `wait` is under a second). Long polls wait whole
/// seconds, never more than `wait` (a caller extending a lease between receives
/// relies on that); under a second: poll, wait, poll.
async fn receive_messages(
    client: Client,
    url: String,
    queue: String,
    max: usize,
    wait: Duration,
) -> Result<Vec<aws_sdk_sqs::types::Message>> {
    let once = |secs: i32| {
        client
            .receive_message()
            .queue_url(&url)
            .max_number_of_messages(max.clamp(1, MAX_BATCH_COUNT) as i32)
            .wait_time_seconds(secs)
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .message_attribute_names("All")
            .send()
    };
    let whole = wait.as_secs().min(20) as i32;
    let mut out = once(whole)
        .await
        .map_err(|e| crate::sdk_error(e, kind_of_code, &format!("receive from {queue}")))?;
    if whole == 0 && out.messages().is_empty() && !wait.is_zero() {
        tokio::time::sleep(wait).await;
        out = once(0)
            .await
            .map_err(|e| crate::sdk_error(e, kind_of_code, &format!("receive from {queue}")))?;
    }
    Ok(out.messages.unwrap_or_default())
}

/// A deduplication or group id SQS accepts (1 to 128 characters of `[!-~]`): `id`
/// itself when it is one, else its SHA-256 in hex. Never a lossy clean-up: two
/// distinct ids never become the same id (which would make SQS drop the second event
/// while answering success).
pub(crate) fn dedup_id(id: &str) -> String {
    if (1..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic()) {
        id.to_owned()
    } else {
        cloudbus_core::driver::hex_sha256(&[id.as_bytes()])
    }
}

/// The deduplication id of `m` in SQS's alphabet.
pub(crate) fn dedup_id_of(m: &OutgoingMessage) -> String {
    dedup_id(&m.dedup_id().unwrap_or(std::borrow::Cow::Borrowed(m.id())))
}

#[async_trait]
impl TopicDriver for SqsQueue {
    async fn send_batch(&self, batch: &[OutgoingMessage]) -> Result<BatchResults> {
        let url = self.shared.url(&self.queue).await?;
        let mut results = crate::slots(batch.len());
        let mut entries = Vec::new();
        for (i, m) in batch.iter().enumerate() {
            match self.entry(i, m) {
                Ok(e) => entries.push(e),
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        if !entries.is_empty() {
            let out = self
                .shared
                .client
                .send_message_batch()
                .queue_url(&url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| {
                    crate::sdk_error(e, kind_of_code, &format!("send to {}", self.queue))
                })?;
            report_batch(
                &mut results,
                out.successful().iter().map(|ok| ok.id()),
                out.failed(),
                &format!("send to {}", self.queue),
            );
        }
        Ok(crate::finish(results, "SQS"))
    }

    fn capabilities(&self) -> Capabilities {
        capabilities(&self.queue)
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[async_trait]
impl SubscriptionDriver for SqsQueue {
    async fn receive_batch(&self, max: usize, wait: Duration) -> Result<Vec<ReceivedMessage>> {
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(Error::closed(format!("queue {} is closed", self.queue)));
        }
        let opened = self.opened().await?.clone();
        let messages = self.pull(&opened.url, max, wait).await?;
        let mut received = Vec::new();
        for m in &messages {
            let Some(receipt) = m.receipt_handle() else {
                continue;
            };
            let s = stored(m);
            let raw = unwrap_envelope(RawMessage {
                body: s.body.clone().into_bytes(),
                attributes: s.attributes.clone(),
            });
            let size = raw.size();
            let event = self.codec.decode(&raw).map(Arc::new).map_err(|e| (raw, e));
            received.push(ReceivedMessage {
                event,
                token: AckToken::Text(receipt.to_owned()),
                attempt: s.attempts.max(1),
                lease: Some(opened.lease),
                published_at: sent_at(m),
                ordering_key: s
                    .group
                    .clone()
                    .filter(|g| is_fifo(&self.queue) && !g.starts_with(UNORDERED_GROUP)),
                size,
            });
            self.keep(receipt, s, opened.lease);
        }
        Ok(received)
    }

    async fn settle_batch(&self, items: &[(AckToken, Settlement)]) -> Result<BatchResults> {
        let url = self.opened().await?.url.clone();
        let mut results = crate::slots(items.len());
        let mut deletes = Vec::new();
        let mut visibility = Vec::new();
        for (i, (token, settlement)) in items.iter().enumerate() {
            let Some(receipt) = token.as_text() else {
                results[i] = Some(Err(Error::invalid("not an SQS receipt handle")));
                continue;
            };
            match settlement {
                Settlement::Ack => {
                    self.take(receipt);
                    deletes.push((i, receipt.to_owned()));
                }
                Settlement::Nack { delay } => {
                    self.take(receipt);
                    visibility.push((i, receipt.to_owned(), delay.as_secs_f64().ceil()));
                }
                Settlement::Extend { lease } => {
                    self.extend_held(receipt, *lease);
                    visibility.push((i, receipt.to_owned(), lease.as_secs_f64().ceil()));
                }
                Settlement::DeadLetter {
                    reason,
                    description,
                } => {
                    let Some(m) = self.take(receipt) else {
                        results[i] = Some(Err(Error::new(
                            ErrorKind::LeaseExpired,
                            "this receipt is not held here any more",
                        )));
                        continue;
                    };
                    let dlq = dead_letter_queue(&self.queue);
                    let sent = self
                        .shared
                        .send_one(
                            &dlq,
                            &m,
                            &[(DL_REASON, reason), (DL_DESCRIPTION, description)],
                        )
                        .await;
                    results[i] = Some(match sent {
                        Ok(()) => self.shared.delete(&url, receipt).await,
                        Err(e) => {
                            self.keep(receipt, m, HELD_GRACE);
                            Err(e)
                        }
                    });
                }
            }
        }
        for chunk in deletes.chunks(MAX_BATCH_COUNT) {
            let entries = chunk
                .iter()
                .map(|(i, r)| {
                    DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(r)
                        .build()
                        .map_err(build_error)
                })
                .collect::<Result<Vec<_>>>()?;
            let out = self
                .shared
                .client
                .delete_message_batch()
                .queue_url(&url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| {
                    crate::sdk_error(e, kind_of_code, &format!("delete from {}", self.queue))
                })?;
            report_batch(
                &mut results,
                out.successful().iter().map(|ok| ok.id()),
                out.failed(),
                &format!("settle on {}", self.queue),
            );
        }
        for chunk in visibility.chunks(MAX_BATCH_COUNT) {
            let entries = chunk
                .iter()
                .map(|(i, r, secs)| {
                    ChangeMessageVisibilityBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(r)
                        .visibility_timeout(secs.clamp(0.0, 43_200.0) as i32)
                        .build()
                        .map_err(build_error)
                })
                .collect::<Result<Vec<_>>>()?;
            let out = self
                .shared
                .client
                .change_message_visibility_batch()
                .queue_url(&url)
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| {
                    crate::sdk_error(
                        e,
                        kind_of_code,
                        &format!("change visibility on {}", self.queue),
                    )
                })?;
            report_batch(
                &mut results,
                out.successful().iter().map(|ok| ok.id()),
                out.failed(),
                &format!("settle on {}", self.queue),
            );
        }
        Ok(crate::finish(results, "SQS"))
    }

    fn capabilities(&self) -> Capabilities {
        capabilities(&self.queue)
    }

    async fn queue_depth(&self) -> Option<u64> {
        let url = self.opened().await.ok()?.url.clone();
        self.shared
            .attribute(&url, QueueAttributeName::ApproximateNumberOfMessages)
            .await
            .ok()
            .flatten()
            .and_then(|v| v.parse().ok())
    }

    /// Stops receiving; messages received but not handed out become visible again.
    async fn close(&self) -> Result<()> {
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        if let Some(task) = self.pending.lock().await.take() {
            task.abort();
        }
        let buffered: Vec<_> = self
            .buffer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect();
        if !buffered.is_empty() {
            let items: Vec<(AckToken, Settlement)> = buffered
                .iter()
                .filter_map(|m| m.receipt_handle())
                .map(|r| {
                    (
                        AckToken::Text(r.to_owned()),
                        Settlement::Nack {
                            delay: Duration::ZERO,
                        },
                    )
                })
                .collect();
            self.settle_batch(&items).await?;
        }
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// The dead-letter queue of a queue.
///
/// Redriving everything starts an SQS message move task (StartMessageMoveTask from
/// the dead-letter queue to its source, followed with ListMessageMoveTasks until it
/// ends). Where the endpoint has no move tasks, or the task fails, and for a partial
/// redrive (`redrive(Some(n))`), each letter is sent back to the source queue and then
/// deleted: a crash in between gives a duplicate, never a loss.
pub struct SqsDeadLetters {
    pub(crate) shared: Arc<SqsContext>,
    pub(crate) source: String,
    pub(crate) queue: String,
}

/// How a message move task ended.
enum MoveTask {
    /// The endpoint could not start one (no such operation, not a dead-letter queue).
    NotStarted(Error),
    Completed(usize),
    Failed {
        moved: usize,
        reason: String,
    },
}

/// How long a redrive follows a running move task before giving up on it.
const MOVE_TASK_PATIENCE: Duration = Duration::from_secs(15 * 60);

impl SqsDeadLetters {
    /// Moves every letter back to the source with an SQS message move task and
    /// waits for it to end.
    async fn move_task(&self, dlq_url: &str) -> Result<MoveTask> {
        let source_url = self.shared.url(&self.source).await?;
        let dlq_arn = self.shared.queue_arn(dlq_url, &self.queue).await?;
        let source_arn = self.shared.queue_arn(&source_url, &self.source).await?;
        let started = match self
            .shared
            .client
            .start_message_move_task()
            .source_arn(&dlq_arn)
            .destination_arn(&source_arn)
            .send()
            .await
        {
            Ok(s) => s,
            Err(e) => {
                return Ok(MoveTask::NotStarted(crate::sdk_error(
                    e,
                    kind_of_code,
                    &format!("move task on {}", self.queue),
                )));
            }
        };
        let handle = started.task_handle().unwrap_or_default().to_owned();
        let until = tokio::time::Instant::now() + MOVE_TASK_PATIENCE;
        let mut pause = Duration::from_millis(100);
        loop {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(5));
            let out = self
                .shared
                .client
                .list_message_move_tasks()
                .source_arn(&dlq_arn)
                .max_results(1)
                .send()
                .await
                .map_err(|e| {
                    crate::sdk_error(e, kind_of_code, &format!("move tasks of {}", self.queue))
                })?;
            // The newest task comes first; a running one names its handle. An empty
            // list (the service has not listed the new task yet) is waited out within
            // the same deadline as a running task: it must not loop for ever.
            let Some(task) = out.results().first() else {
                if tokio::time::Instant::now() > until {
                    return Err(Error::new(
                        ErrorKind::Timeout,
                        format!(
                            "the move task {handle} from {} was never listed within {:?}",
                            self.queue, MOVE_TASK_PATIENCE
                        ),
                    ));
                }
                continue;
            };
            let moved = task.approximate_number_of_messages_moved().max(0) as usize;
            match task.status() {
                Some("COMPLETED") => return Ok(MoveTask::Completed(moved)),
                Some("FAILED") | Some("CANCELLED") => {
                    return Ok(MoveTask::Failed {
                        moved,
                        reason: task.failure_reason().unwrap_or("cancelled").to_owned(),
                    });
                }
                _ if tokio::time::Instant::now() > until => {
                    return Err(Error::new(
                        ErrorKind::Timeout,
                        format!(
                            "the move task {handle} from {} was still running after {:?}",
                            self.queue, MOVE_TASK_PATIENCE
                        ),
                    ));
                }
                _ => {}
            }
        }
    }

    /// One receive of up to `want` (at most 10) letters, hidden for `hide`.
    async fn receive_page(
        &self,
        url: &str,
        want: usize,
        hide: Duration,
        wait_seconds: i32,
    ) -> Result<Vec<Letter>> {
        let r = self
            .shared
            .client
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(want.clamp(1, MAX_BATCH_COUNT) as i32)
            .wait_time_seconds(wait_seconds)
            .visibility_timeout(hide.as_secs() as i32)
            .message_system_attribute_names(MessageSystemAttributeName::All)
            .message_attribute_names("All")
            .send()
            .await
            .map_err(|e| {
                crate::sdk_error(e, kind_of_code, &format!("receive from {}", self.queue))
            })?;
        Ok(r.messages()
            .iter()
            .filter_map(|m| {
                Some(Letter {
                    receipt: m.receipt_handle()?.to_owned(),
                    stored: stored(m),
                    at: sent_at(m),
                })
            })
            .collect())
    }

    /// Receives letters without hiding them until `max` or until a receive brings
    /// nothing new (peek: the caller's `max` bounds what is held).
    async fn collect(&self, max: usize) -> Result<Vec<Letter>> {
        let url = self.shared.url(&self.queue).await?;
        let mut out = Vec::new();
        let mut seen = HashSet::new();
        let mut idle_rounds = 0;
        while out.len() < max && idle_rounds < 2 {
            let wait = if out.is_empty() { 1 } else { 0 };
            let page = self
                .receive_page(&url, max - out.len(), Duration::ZERO, wait)
                .await?;
            let before = out.len();
            out.extend(
                page.into_iter()
                    .filter(|l| seen.insert(l.stored.message_id.clone())),
            );
            idle_rounds = if out.len() == before {
                idle_rounds + 1
            } else {
                0
            };
        }
        Ok(out)
    }

    /// Takes letters one page (at most 10) at a time, hidden for a minute, and hands
    /// each to `take`, which removes it from the queue, until `max` or until two
    /// receives in a row bring nothing: purge and redrive hold one page, never the
    /// whole dead-letter queue.
    async fn drain<F, Fut>(&self, max: usize, mut take: F) -> Result<usize>
    where
        F: FnMut(Letter) -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        let url = self.shared.url(&self.queue).await?;
        let mut taken = 0;
        let mut idle_rounds = 0;
        while taken < max && idle_rounds < 2 {
            let wait = if taken == 0 { 1 } else { 0 };
            let page = self
                .receive_page(&url, max - taken, DRAIN_HIDE, wait)
                .await?;
            idle_rounds = if page.is_empty() { idle_rounds + 1 } else { 0 };
            for letter in page {
                take(letter).await?;
                taken += 1;
            }
        }
        Ok(taken)
    }
}

/// A received dead letter: its receipt, the message, and when it was sent.
struct Letter {
    receipt: String,
    stored: Stored,
    at: Option<DateTime<Utc>>,
}

/// How long purge and redrive hide a page of letters while they remove it.
const DRAIN_HIDE: Duration = Duration::from_secs(60);

#[async_trait]
impl DeadLetterDriver for SqsDeadLetters {
    async fn peek(&self, max: usize) -> Result<Vec<DeadLetter>> {
        let codec = codec();
        let source_max = match self.shared.url(&self.source).await {
            Ok(u) => self
                .shared
                .attribute(&u, QueueAttributeName::RedrivePolicy)
                .await
                .ok()
                .flatten()
                .and_then(|p| serde_json_max(&p)),
            Err(_) => None,
        };
        Ok(self
            .collect(max)
            .await?
            .into_iter()
            .map(|Letter { stored: s, at, .. }| {
                let raw = unwrap_envelope(RawMessage {
                    body: s.body.clone().into_bytes(),
                    attributes: s
                        .attributes
                        .iter()
                        .filter(|(k, _)| !k.starts_with("cloudbus-dl-"))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                });
                let reason = s.attributes.get(DL_REASON).cloned().or_else(|| {
                    source_max.map(|n| format!("max delivery attempts ({n}) exceeded"))
                });
                DeadLetter {
                    payload: match codec.decode(&raw) {
                        Ok(e) => Payload::Event(Arc::new(e)),
                        Err(_) => Payload::Raw(raw),
                    },
                    reason,
                    description: s.attributes.get(DL_DESCRIPTION).cloned(),
                    source_entity: Some(self.source.clone()),
                    attempts: s.attempts,
                    dead_lettered_at: at,
                }
            })
            .collect())
    }

    async fn redrive(&self, max: Option<usize>) -> Result<usize> {
        let url = self.shared.url(&self.queue).await?;
        let mut moved_by_task = 0;
        if max.is_none() {
            match self.move_task(&url).await {
                Ok(MoveTask::Completed(n)) => return Ok(n),
                Ok(MoveTask::Failed { moved, reason }) => {
                    tracing::warn!(queue = %self.queue, moved, %reason,
                        "SQS message move task failed; moving the rest one by one");
                    moved_by_task = moved;
                }
                Ok(MoveTask::NotStarted(e)) => {
                    tracing::debug!(queue = %self.queue, error = %e,
                        "no SQS message move task; moving letters one by one");
                }
                Err(e) => return Err(e),
            }
        }
        let moved = self
            .drain(max.unwrap_or(usize::MAX), |mut letter| {
                let url = &url;
                async move {
                    letter
                        .stored
                        .attributes
                        .retain(|k, _| !k.starts_with("cloudbus-dl-"));
                    self.shared
                        .send_one(&self.source, &letter.stored, &[])
                        .await?;
                    self.shared.delete(url, &letter.receipt).await
                }
            })
            .await?;
        Ok(moved_by_task + moved)
    }

    async fn purge(&self) -> Result<usize> {
        let url = self.shared.url(&self.queue).await?;
        self.drain(usize::MAX, |letter| {
            let url = &url;
            async move { self.shared.delete(url, &letter.receipt).await }
        })
        .await
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// Decodes a message as an SQS consumer reads it: inside an SNS notification or
/// EventBridge envelope when it is one, in binary mode (`ce-` message attributes) or
/// structured mode. Never panics: anything else is a [`cloudbus_core::DecodeError`].
///
/// ```
/// use cloudbus_core::codec::RawMessage;
/// let foreign = RawMessage::new("hello");
/// assert!(cloudbus_aws::sqs::decode_message(foreign).is_err());
/// ```
pub fn decode_message(
    raw: RawMessage,
) -> std::result::Result<cloudbus_core::Event, cloudbus_core::DecodeError> {
    codec().decode(&unwrap_envelope(raw))
}

/// The message inside an SNS notification envelope (an SNS subscription without raw
/// delivery, with its message attributes) or an EventBridge event (its `detail`, the
/// structured CloudEvent); any other message unchanged.
pub(crate) fn unwrap_envelope(raw: RawMessage) -> RawMessage {
    if raw.body.first() != Some(&b'{') {
        return raw;
    }
    let Ok(serde_json::Value::Object(v)) = serde_json::from_slice::<serde_json::Value>(&raw.body)
    else {
        return raw;
    };
    if let (Some(_), Some(detail @ serde_json::Value::Object(_))) =
        (v.get("detail-type"), v.get("detail"))
    {
        return RawMessage {
            body: detail.to_string().into_bytes(),
            attributes: raw.attributes.clone(),
        };
    }
    let (Some("Notification"), Some(_), Some(message)) = (
        v.get("Type").and_then(|t| t.as_str()),
        v.get("TopicArn").and_then(|t| t.as_str()),
        v.get("Message").and_then(|m| m.as_str()),
    ) else {
        return raw;
    };
    let mut attributes = raw.attributes.clone();
    if let Some(serde_json::Value::Object(attrs)) = v.get("MessageAttributes") {
        for (k, a) in attrs {
            if let Some(value) = a.get("Value").and_then(|x| x.as_str()) {
                attributes.insert(k.clone(), value.to_owned());
            }
        }
    }
    RawMessage {
        body: message.as_bytes().to_vec(),
        attributes,
    }
}

/// `maxReceiveCount` of a RedrivePolicy document.
fn serde_json_max(policy: &str) -> Option<u32> {
    let v: serde_json::Value = serde_json::from_str(policy).ok()?;
    match &v["maxReceiveCount"] {
        serde_json::Value::String(s) => s.parse().ok(),
        serde_json::Value::Number(n) => n.as_u64().map(|n| n as u32),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 12 item 15: the receipts held for dead-lettering had no hard bound (only
    /// entries older than 12 h were dropped, so a consumer that dropped deliveries
    /// faster than that grew without limit).
    #[test]
    fn held_receipts_are_bounded() {
        let config = aws_sdk_sqs::Config::builder()
            .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
            .region(aws_sdk_sqs::config::Region::new("us-east-1"))
            .build();
        let queue = SqsQueue::new(
            Arc::new(SqsContext::new(Client::from_conf(config))),
            "q",
            None,
        );
        let stored = || Stored {
            body: "b".into(),
            attributes: BTreeMap::new(),
            group: None,
            message_id: "m".into(),
            attempts: 1,
        };
        for n in 0..(MAX_HELD * 3) {
            queue.keep(&format!("r-{n}"), stored(), Duration::from_secs(3600));
        }
        let held = queue.held.lock().unwrap().len();
        assert!(held <= MAX_HELD, "{held} receipts held");
        assert!(
            queue.take(&format!("r-{}", MAX_HELD * 3 - 1)).is_some(),
            "the newest is kept"
        );
    }

    #[test]
    fn names_codes_and_capabilities() {
        assert_eq!(dead_letter_queue("orders"), "orders-dlq");
        assert_eq!(dead_letter_queue("orders.fifo"), "orders-dlq.fifo");
        assert_eq!(
            kind_of_code("AWS.SimpleQueueService.NonExistentQueue"),
            ErrorKind::NotFound
        );
        assert_eq!(kind_of_code("QueueDoesNotExist"), ErrorKind::NotFound);
        assert_eq!(kind_of_code("BatchEntryTooLong"), ErrorKind::TooLarge);
        assert_eq!(kind_of_code("ThrottlingException"), ErrorKind::Throttled);
        // Issue 12 item 16: server faults and expired tokens were permanent.
        for code in [
            "InternalFailure",
            "RequestExpired",
            "ExpiredToken",
            "ServiceUnavailable",
        ] {
            assert!(kind_of_code(code).is_retryable(), "{code}");
        }
        assert_eq!(entry_kind("SomethingNew", false), ErrorKind::Unavailable);
        assert_eq!(
            entry_kind("InvalidParameterValue", true),
            ErrorKind::InvalidArgument
        );

        assert_eq!(
            kind_of_code("ReceiptHandleIsInvalid"),
            ErrorKind::LeaseExpired
        );
        assert_eq!(serde_json_max(r#"{"maxReceiveCount":"3"}"#), Some(3));
        assert_eq!(serde_json_max(r#"{"maxReceiveCount":7}"#), Some(7));
        let std = capabilities("q");
        assert_eq!(std.max_delay, Some(MAX_DELAY));
        assert!(!std.ordering && !std.fan_out);
        // Issue 12 item 1: ids were cleaned lossily (non-ASCII dropped, cut at 128),
        // so distinct events got one deduplication id and SQS dropped the later one.
        assert_eq!(dedup_id("order-7"), "order-7");
        assert_ne!(dedup_id("\u{e9}\u{e8}"), dedup_id("\u{e0}\u{f9}"));
        assert_ne!(dedup_id("a b"), dedup_id("ab"));
        let long = "x".repeat(128);
        assert_ne!(dedup_id(&format!("{long}1")), dedup_id(&format!("{long}2")));
        assert!(dedup_id(&"\u{e9}".repeat(200)).len() <= 128);
        let from = |source: &str| {
            OutgoingMessage::new(
                std::sync::Arc::new(
                    cloudbus_core::EventBuilder::new("t", source)
                        .id("same-id")
                        .build()
                        .unwrap(),
                ),
                Default::default(),
            )
        };
        assert_ne!(dedup_id_of(&from("/a")), dedup_id_of(&from("/b")));
        let envelope = RawMessage::new(
            r#"{"Type":"Notification","MessageId":"m","TopicArn":"arn:aws:sns:us-east-1:0:t","Message":"{\"a\":1}","MessageAttributes":{"ce-id":{"Type":"String","Value":"e-1"}}}"#,
        );
        let inner = unwrap_envelope(envelope);
        assert_eq!(inner.body, br#"{"a":1}"#);
        assert_eq!(
            inner.attributes.get("ce-id").map(String::as_str),
            Some("e-1")
        );
        let eb = RawMessage::new(
            r#"{"version":"0","id":"x","detail-type":"t","source":"/s","detail":{"specversion":"1.0","id":"e-2"}}"#,
        );
        let inner = unwrap_envelope(eb);
        let detail: serde_json::Value = serde_json::from_slice(&inner.body).unwrap();
        assert_eq!(detail["id"], "e-2");
        let plain = RawMessage::new("{\"Type\":\"other\"}");
        assert_eq!(unwrap_envelope(plain.clone()).body, plain.body);
    }
}
