//! One SQS queue as a topic (SendMessageBatch) and as a subscription (receive with
//! long polls, settle with DeleteMessageBatch and ChangeMessageVisibilityBatch,
//! dead-letter to `<queue>-dlq` with the reason as message attributes).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use aws_sdk_sqs::Client;
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
    MessageSystemAttributeName, QueueAttributeName, SendMessageBatchRequestEntry,
};
use cloudbus_driver::codec::RawMessage;
use cloudbus_driver::{
    AckToken, BatchResults, BinaryCodec, Capabilities, Error, ErrorKind, OutgoingMessage, Payload,
    ReceivedMessage, Result, Settlement, SubscriptionDriver, TopicDriver,
};

use super::context::SqsContext;
use super::error::{build_error, kind_of_code, report_batch};
use super::limits::{MAX_BATCH_COUNT, MAX_DELAY, capabilities, dead_letter_queue, is_fifo};
use super::topology::admits;
use super::wire::{
    DL_DESCRIPTION, DL_REASON, Stored, UNORDERED_GROUP, codec, dedup_id_of, group_id, sent_at,
    stored, string_attribute, text_body, unwrap_envelope,
};

/// How a queue was opened: its URL, lease, and whether the subscription is admitted.
#[derive(Clone, Debug)]
pub(crate) struct Opened {
    url: String,
    lease: Duration,
}

/// Most received messages one queue driver holds for dead-lettering.
pub(crate) const MAX_HELD: usize = 20_000;
/// How long past its lease a receipt is still held (a settle racing the expiry).
pub(crate) const HELD_GRACE: Duration = Duration::from_secs(60);

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

pub(crate) type ReceiveTask = tokio::task::JoinHandle<Result<Vec<aws_sdk_sqs::types::Message>>>;

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
                    && !admits(&self.shared, &self.queue, &url, sub).await?
                {
                    return Err(Error::not_found(format!(
                        "queue {} has no subscription {sub} (make it with \
                         ensure_subscription, or use the queue name)",
                        self.queue
                    )));
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

/// One ReceiveMessage (two when `wait` is under a second). Long polls wait whole
/// seconds, never more than `wait` (a caller extending a lease between receives
/// relies on that); under a second: poll, wait, poll.
pub(crate) async fn receive_messages(
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
        .map_err(|e| crate::error::sdk_error(e, kind_of_code, &format!("receive from {queue}")))?;
    if whole == 0 && out.messages().is_empty() && !wait.is_zero() {
        tokio::time::sleep(wait).await;
        out = once(0).await.map_err(|e| {
            crate::error::sdk_error(e, kind_of_code, &format!("receive from {queue}"))
        })?;
    }
    Ok(out.messages.unwrap_or_default())
}

#[async_trait]
impl TopicDriver for SqsQueue {
    async fn send_batch(&self, batch: &[OutgoingMessage]) -> Result<BatchResults> {
        let url = self.shared.url(&self.queue).await?;
        let (mut results, _, entries) = crate::batch::build_entries(batch, |i, m| self.entry(i, m));
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
                    crate::error::sdk_error(e, kind_of_code, &format!("send to {}", self.queue))
                })?;
            report_batch(
                &mut results,
                out.successful().iter().map(|ok| ok.id()),
                out.failed(),
                &format!("send to {}", self.queue),
            );
        }
        Ok(crate::batch::finish(results, "SQS"))
    }

    fn capabilities(&self) -> Capabilities {
        capabilities(&self.queue)
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
                partition: None,
                offset: None,
            });
            self.keep(receipt, s, opened.lease);
        }
        Ok(received)
    }

    async fn settle_batch(&self, items: &[(AckToken, Settlement)]) -> Result<BatchResults> {
        let url = self.opened().await?.url.clone();
        let mut results = crate::batch::slots(items.len());
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
                    crate::error::sdk_error(e, kind_of_code, &format!("delete from {}", self.queue))
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
                    crate::error::sdk_error(
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
        Ok(crate::batch::finish(results, "SQS"))
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
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

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
}
