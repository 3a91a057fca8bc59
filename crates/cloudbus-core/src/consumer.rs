//! The portable consumer: pull deliveries, settle them (`ack`, `nack(delay)`,
//! `dead_letter(reason)`, `extend(lease)`), with settlements of concurrent callers
//! coalesced into batches, malformed messages dead-lettered with their reason, an
//! optional in-process filter, the dead-letter polyfill for providers without a
//! dead-letter place, and the consumption metrics.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tracing::Instrument;

use crate::batcher::{BatchHandler, BatchLimits, Batcher};
use crate::spans::{self, Destination};
use crate::telemetry;
use cloudbus_driver::capabilities::Capabilities;
use cloudbus_driver::codec::RawMessage;
use cloudbus_driver::driver::{
    AckToken, DeadLetterSink, Payload, ReceivedMessage, Settlement, SubscriptionDriver,
};
use cloudbus_driver::error::{Error, ErrorKind, Result};
use cloudbus_driver::event::{AttributesReader, EXT_DEAD_LETTER_REASON, Event};
use cloudbus_driver::filter::Filter;

/// Consumer settings.
#[derive(Clone, Debug, Default)]
pub struct ConsumerOptions {
    /// Name used in metrics (`consumer` label) and logs; defaults to the subscription.
    pub name: Option<String>,
    /// Evaluate this filter after receipt and ack what does not match (for providers
    /// whose native filters are missing or not trusted, such as the Pub/Sub emulator).
    pub filter: Option<Filter>,
}

/// Pulls deliveries from one subscription or queue. Cheap to clone.
///
/// ```
/// # async fn demo(consumer: cloudbus_core::Consumer) -> cloudbus_core::Result<()> {
/// let delivery = consumer.receive().await?;
/// println!("{} (attempt {})", delivery.event().ty(), delivery.attempt());
/// delivery.ack().await?;
/// # Ok(()) }
/// # use cloudbus_core::AttributesReader;
/// ```
#[derive(Clone)]
pub struct Consumer {
    pub(crate) inner: Arc<ConsumerInner>,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("name", &self.inner.name)
            .finish_non_exhaustive()
    }
}

pub(crate) struct ConsumerInner {
    driver: Arc<dyn SubscriptionDriver>,
    pub(crate) caps: Capabilities,
    pub(crate) name: Arc<str>,
    pub(crate) metrics: Arc<telemetry::ConsumerMetrics>,
    /// What its spans say about where events come from.
    pub(crate) destination: Destination,
    closed: AtomicBool,
    filter: Option<Filter>,
    dead_letter_sink: Mutex<Option<Arc<dyn DeadLetterSink>>>,
    /// Coalesces the settlements of concurrent callers into `settle_batch` calls.
    settler: Batcher<(AckToken, Settlement), Result<()>>,
}

impl Consumer {
    /// A consumer over `driver`, named `name` in metrics and logs.
    pub fn new(driver: Arc<dyn SubscriptionDriver>, name: impl Into<String>) -> Self {
        Self::with_options(
            driver,
            ConsumerOptions {
                name: Some(name.into()),
                filter: None,
            },
        )
    }

    /// A consumer over `driver` with options.
    pub fn with_options(driver: Arc<dyn SubscriptionDriver>, options: ConsumerOptions) -> Self {
        Self::for_destination(driver, options, Destination::default())
    }

    /// A consumer over `driver`, whose spans name `destination` (what
    /// [`Bus::consumer`](crate::Bus::consumer) makes). Without a subscription in
    /// `destination`, the consumer's name stands for it.
    pub fn for_destination(
        driver: Arc<dyn SubscriptionDriver>,
        options: ConsumerOptions,
        destination: Destination,
    ) -> Self {
        let caps = driver.capabilities();
        let name: Arc<str> = options.name.unwrap_or_else(|| "consumer".into()).into();
        let destination = match destination.subscription_name() {
            Some(_) => destination,
            None => destination.subscription(&name),
        };
        Consumer {
            inner: Arc::new(ConsumerInner {
                settler: settler(driver.clone(), caps.max_batch_count),
                driver,
                caps,
                metrics: Arc::new(telemetry::ConsumerMetrics::new(name.clone())),
                destination,
                name,
                closed: AtomicBool::new(false),
                filter: options.filter,
                dead_letter_sink: Mutex::new(None),
            }),
        }
    }

    /// Where `dead_letter` sends events when the provider has no dead-letter place of
    /// its own: the event is published there with a `deadletterreason` extension,
    /// then acked.
    pub fn dead_letter_to(self, sink: impl DeadLetterSink) -> Self {
        if let Ok(mut s) = self.inner.dead_letter_sink.lock() {
            *s = Some(Arc::new(sink));
        }
        self
    }

    /// The consumer's name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// What the provider supports.
    pub fn capabilities(&self) -> &Capabilities {
        &self.inner.caps
    }

    /// Where its events come from, as its spans name it.
    pub fn destination(&self) -> &Destination {
        &self.inner.destination
    }

    /// The driver, for escape hatches.
    pub fn driver(&self) -> &Arc<dyn SubscriptionDriver> {
        &self.inner.driver
    }

    /// The subscription driver as its own type `D`, when it is one (an escape hatch to the
    /// provider's client); `None` for another driver.
    pub fn downcast<D: std::any::Any>(&self) -> Option<&D> {
        self.inner.driver.as_ref().as_any().downcast_ref::<D>()
    }

    /// Waits for the next delivery.
    pub async fn receive(&self) -> Result<Delivery> {
        loop {
            let mut batch = self.receive_batch(1, Duration::from_secs(5)).await?;
            if let Some(d) = batch.pop() {
                return Ok(d);
            }
        }
    }

    /// Receives up to `max` deliveries, waiting up to `wait` for the first.
    /// Malformed messages never reach the caller: they are dead-lettered with the
    /// decode error as the reason.
    pub async fn receive_batch(&self, max: usize, wait: Duration) -> Result<Vec<Delivery>> {
        if self.inner.closed.load(Ordering::Acquire) {
            return Err(Error::closed("consumer is closed"));
        }
        let span = spans::receive(&self.inner.destination, &self.inner.name, max);
        let max = max.max(1);
        let mut received = crate::driver_call::panic_safe(
            "receive_batch",
            self.inner.driver.receive_batch(max, wait),
        )
        .instrument(span.clone())
        .await?;
        span.record("messaging.batch.message_count", received.len());
        spans::link_events(
            &span,
            received
                .iter()
                .filter_map(|m| m.event.as_ref().ok().map(|e| &**e)),
        );
        tracing::trace!(parent: &span, received = received.len(), "received");
        if received.len() > max {
            // A driver that hands out more than was asked for (a prefetch, a session's
            // backlog) must not strand the surplus: the caller has room for `max` only,
            // and whatever it cannot take would stay locked until the lease ran out.
            // Give the surplus back for prompt redelivery.
            let surplus = received.split_off(max);
            self.inner.release(surplus).await;
        }
        let mut out = Vec::with_capacity(received.len());
        let mut filtered_out = Vec::new();
        let received_at = Instant::now();
        for msg in received {
            let ReceivedMessage {
                event,
                token,
                attempt,
                lease,
                ordering_key,
                size,
                partition,
                offset,
                ..
            } = msg;
            match event {
                Ok(event) => {
                    if self
                        .inner
                        .filter
                        .as_ref()
                        .is_some_and(|f| !f.matches(&event))
                    {
                        filtered_out.push((token, Settlement::Ack));
                        continue;
                    }
                    out.push(Delivery {
                        event,
                        token,
                        attempt,
                        lease,
                        ordering_key,
                        size,
                        partition,
                        offset,
                        settled: AtomicBool::new(false),
                        consumer: self.inner.clone(),
                        received_at,
                    });
                }
                Err((raw, decode_error)) => {
                    let reason = format!("malformed: {decode_error}");
                    tracing::warn!(consumer = %self.inner.name, %reason, "dead-lettering a message that is not a valid CloudEvent");
                    // A failure here leaves the message unsettled: it comes back (or goes to
                    // the provider's own dead-letter place by policy); never dropped, and the
                    // good messages of this batch are still handed out.
                    if let Err(e) = self.inner.dead_letter_raw(token, raw, reason).await {
                        tracing::error!(consumer = %self.inner.name, error = %e, "could not dead-letter a malformed message");
                    }
                }
            }
        }
        if !filtered_out.is_empty() {
            // A failed ack of a filtered-out message only means it comes back and is
            // filtered again; it must not cost the matching deliveries of this batch.
            self.inner
                .settle_or_log(
                    &filtered_out,
                    "could not ack filtered-out messages; they will come back and be filtered again",
                )
                .await;
        }
        let now = chrono::Utc::now();
        for delivery in &out {
            self.inner.metrics.lag(&delivery.event, now);
        }
        Ok(out)
    }

    /// Settles many deliveries the same way in as few provider calls as possible.
    /// One result per delivery; a delivery settled before gets [`ErrorKind::AlreadySettled`].
    pub async fn settle_all(
        &self,
        deliveries: &[Delivery],
        settlement: Settlement,
    ) -> Vec<Result<()>> {
        let deliveries: Vec<&Delivery> = deliveries.iter().collect();
        self.settle_refs(&deliveries, settlement).await
    }

    /// [`settle_all`](Self::settle_all) for deliveries held elsewhere (the worker's).
    pub(crate) async fn settle_refs(
        &self,
        deliveries: &[&Delivery],
        settlement: Settlement,
    ) -> Vec<Result<()>> {
        let mut results: Vec<Option<Result<()>>> = (0..deliveries.len()).map(|_| None).collect();
        let mut items = Vec::with_capacity(deliveries.len());
        let mut idx = Vec::with_capacity(deliveries.len());
        for (i, d) in deliveries.iter().enumerate() {
            match d.mark(&settlement) {
                Err(e) => results[i] = Some(Err(e)),
                Ok(()) => {
                    items.push((d.token.clone(), settlement.clone()));
                    idx.push(i);
                }
            }
        }
        let count_by_type = |ok: &[bool]| {
            let mut groups: Vec<(&str, u64)> = Vec::new();
            for (pos, &i) in idx.iter().enumerate() {
                if !ok[pos] {
                    continue;
                }
                let ty = deliveries[i].event.ty();
                match groups.iter_mut().find(|(t, _)| *t == ty) {
                    Some(g) => g.1 += 1,
                    None => groups.push((ty, 1)),
                }
            }
            groups
        };
        let span = self.inner.settle_span(settlement.status(), items.len());
        spans::link_events(&span, idx.iter().map(|&i| &*deliveries[i].event));
        let settled =
            crate::driver_call::panic_safe("settle_batch", self.inner.driver.settle_batch(&items))
                .instrument(span)
                .await;
        match settled {
            Ok(per) if per.len() == idx.len() => {
                let ok: Vec<bool> = per.iter().map(Result::is_ok).collect();
                for (ty, n) in count_by_type(&ok) {
                    self.inner.metrics.consumed(ty, settlement.status(), n);
                }
                for (&i, r) in idx.iter().zip(per) {
                    if r.as_ref().is_err_and(|e| e.is_retryable()) {
                        deliveries[i].settled.store(false, Ordering::Release);
                    }
                    results[i] = Some(r);
                }
            }
            Ok(per) => {
                let e = Error::new(
                    ErrorKind::Internal,
                    format!(
                        "driver returned {} settlement results for {} deliveries",
                        per.len(),
                        idx.len()
                    ),
                );
                for &i in &idx {
                    results[i] = Some(Err(e.clone()));
                }
            }
            Err(e) => {
                for &i in &idx {
                    if e.is_retryable() {
                        deliveries[i].settled.store(false, Ordering::Release);
                    }
                    results[i] = Some(Err(e.clone()));
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::new(ErrorKind::Internal, "no result"))))
            .collect()
    }

    /// Acks many deliveries in as few calls as possible.
    pub async fn ack_all(&self, deliveries: &[Delivery]) -> Vec<Result<()>> {
        self.settle_all(deliveries, Settlement::Ack).await
    }

    /// Publishes the current queue depth to the `event_queue_depth` gauge, when the
    /// provider can tell.
    pub async fn report_queue_depth(&self) -> Option<u64> {
        let depth = self.inner.driver.queue_depth().await?;
        self.inner.metrics.queue_depth(depth);
        Some(depth)
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }

    /// Stops receiving; later receives fail with [`ErrorKind::Closed`]. Deliveries
    /// already received can still be settled, except where the provider hands them
    /// back at close (Kafka: the partitions go back to the group, so a later
    /// settlement is `Closed` and the group delivers them again).
    ///
    /// Every call reaches the provider (its close is idempotent): a close cancelled
    /// half way is finished, or awaited, by the next call rather than reported done.
    pub async fn close(&self) -> Result<()> {
        self.inner.closed.store(true, Ordering::Release);
        self.inner.driver.close().await
    }
}

impl ConsumerInner {
    fn sink(&self) -> Option<Arc<dyn DeadLetterSink>> {
        self.dead_letter_sink.lock().ok().and_then(|s| s.clone())
    }

    /// Settles one delivery, with the dead-letter polyfill and metrics.
    async fn settle(&self, token: &AckToken, settlement: Settlement, event: &Event) -> Result<()> {
        // Metrics follow what was asked for, also when the polyfill carries it out.
        let status = settlement.status();
        let reason = match &settlement {
            Settlement::DeadLetter { reason, .. } => Some(reason.clone()),
            _ => None,
        };
        let settlement = match settlement {
            Settlement::DeadLetter {
                reason,
                description,
            } if !self.caps.native_dead_letter => {
                let Some(sink) = self.sink() else {
                    return Err(Error::unsupported(
                        "this provider has no dead-letter place: give the consumer one with dead_letter_to",
                    ));
                };
                let mut copy = event.clone();
                copy.set_extension(EXT_DEAD_LETTER_REASON, reason.clone());
                sink.put_event(copy).await?;
                tracing::debug!(%reason, %description, "dead-lettered through the polyfill");
                Settlement::Ack
            }
            other => other,
        };
        let span = self.settle_span(status, 1);
        spans::link_events(&span, [event]);
        settle_through(&self.settler, token.clone(), settlement)
            .instrument(span)
            .await?;
        if status != "extend" {
            self.metrics.consumed(event.ty(), status, 1);
        }
        if let Some(reason) = reason {
            self.metrics.dead_lettered(&reason);
        }
        Ok(())
    }

    /// The span of settling `count` deliveries as `status` says.
    fn settle_span(&self, status: &str, count: usize) -> tracing::Span {
        spans::settle(
            &self.destination,
            &self.name,
            spans::settle_operation(status),
            count,
        )
    }

    /// Gives messages back unprocessed (nack, no delay), for deliveries the caller did
    /// not ask for. A failure is logged: their leases run out and they come back.
    async fn release(&self, surplus: Vec<ReceivedMessage>) {
        let items: Vec<(AckToken, Settlement)> = surplus
            .into_iter()
            .map(|m| {
                (
                    m.token,
                    Settlement::Nack {
                        delay: Duration::ZERO,
                    },
                )
            })
            .collect();
        tracing::debug!(consumer = %self.name, count = items.len(), "releasing deliveries beyond the requested maximum");
        self.settle_or_log(
            &items,
            "could not release surplus deliveries; they come back when their leases expire",
        )
        .await;
    }

    /// Settles `items` where a failure costs nothing but a redelivery: the first
    /// failure is logged with `failed`, nothing is returned.
    async fn settle_or_log(&self, items: &[(AckToken, Settlement)], failed: &str) {
        let settled =
            crate::driver_call::panic_safe("settle_batch", self.driver.settle_batch(items)).await;
        let error = match settled {
            Ok(per) => per.into_iter().find_map(Result::err),
            Err(e) => Some(e),
        };
        if let Some(e) = error {
            tracing::warn!(consumer = %self.name, count = items.len(), error = %e, "{failed}");
        }
    }

    /// Dead-letters a message that could not be decoded.
    async fn dead_letter_raw(
        &self,
        token: AckToken,
        raw: RawMessage,
        reason: String,
    ) -> Result<()> {
        if !self.caps.native_dead_letter {
            let Some(sink) = self.sink() else {
                // Nothing may be lost: leave it unsettled so the provider redelivers it
                // (or moves it to its own dead-letter place by policy).
                return Err(Error::new(
                    ErrorKind::Malformed,
                    format!("{reason}; no dead-letter place configured, message left unsettled"),
                ));
            };
            let raw = raw.with_attribute(EXT_DEAD_LETTER_REASON, reason.clone());
            sink.put_raw(raw).await?;
            settle_through(&self.settler, token, Settlement::Ack).await?;
        } else {
            settle_through(
                &self.settler,
                token,
                Settlement::DeadLetter {
                    reason: reason.clone(),
                    description: String::new(),
                },
            )
            .await?;
        }
        self.metrics.dead_lettered(&reason);
        Ok(())
    }
}

/// One received event and its settlement. Settling a second time returns
/// [`ErrorKind::AlreadySettled`]; an unsettled delivery that is dropped comes back
/// when its lease expires.
pub struct Delivery {
    event: Arc<Event>,
    token: AckToken,
    attempt: u32,
    lease: Option<Duration>,
    ordering_key: Option<String>,
    size: usize,
    partition: Option<String>,
    offset: Option<i64>,
    settled: AtomicBool,
    consumer: Arc<ConsumerInner>,
    received_at: Instant,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("id", &self.event.id())
            .field("type", &self.event.ty())
            .field("attempt", &self.attempt)
            .field("settled", &self.is_settled())
            .finish()
    }
}

impl Delivery {
    /// The event.
    pub fn event(&self) -> &Event {
        &self.event
    }
    /// The event, shared.
    pub fn event_arc(&self) -> Arc<Event> {
        self.event.clone()
    }
    /// Delivery attempt, starting at 1.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
    /// The lease granted with this delivery, if the provider has leases.
    pub fn lease(&self) -> Option<Duration> {
        self.lease
    }
    /// The ordering key, if any.
    pub fn ordering_key(&self) -> Option<&str> {
        self.ordering_key.as_deref()
    }
    /// Estimated size in bytes.
    pub fn size(&self) -> usize {
        self.size
    }
    /// The partition it was read from, where the provider has partitions (Kafka).
    pub fn partition(&self) -> Option<&str> {
        self.partition.as_deref()
    }
    /// Its offset within [`partition`](Self::partition), where the provider numbers
    /// messages (Kafka).
    pub fn offset(&self) -> Option<i64> {
        self.offset
    }
    /// How long ago it was received.
    pub fn age(&self) -> Duration {
        self.received_at.elapsed()
    }
    /// Whether it has been acked, nacked or dead-lettered.
    pub fn is_settled(&self) -> bool {
        self.settled.load(Ordering::Acquire)
    }
    /// The provider token, for escape hatches.
    pub fn token(&self) -> &AckToken {
        &self.token
    }

    /// Processed: remove it.
    pub async fn ack(&self) -> Result<()> {
        self.settle(Settlement::Ack).await
    }
    /// Not processed: deliver again after `delay` (zero: at once).
    pub async fn nack(&self, delay: Duration) -> Result<()> {
        self.settle(Settlement::Nack { delay }).await
    }
    /// Move to the dead-letter place with `reason`.
    pub async fn dead_letter(&self, reason: impl Into<String>) -> Result<()> {
        self.dead_letter_with(reason, "").await
    }
    /// Move to the dead-letter place with a reason and a longer description.
    pub async fn dead_letter_with(
        &self,
        reason: impl Into<String>,
        description: impl Into<String>,
    ) -> Result<()> {
        self.settle(Settlement::DeadLetter {
            reason: reason.into(),
            description: description.into(),
        })
        .await
    }
    /// Keep the lease for `lease` from now.
    pub async fn extend(&self, lease: Duration) -> Result<()> {
        self.settle(Settlement::Extend { lease }).await
    }

    fn mark(&self, settlement: &Settlement) -> Result<()> {
        let already = if settlement.is_final() {
            self.settled.swap(true, Ordering::AcqRel)
        } else {
            self.settled.load(Ordering::Acquire)
        };
        if already {
            return Err(Error::new(
                ErrorKind::AlreadySettled,
                format!("delivery of event {} was settled already", self.event.id()),
            ));
        }
        Ok(())
    }

    async fn settle(&self, settlement: Settlement) -> Result<()> {
        self.mark(&settlement)?;
        let is_final = settlement.is_final();
        let result = self
            .consumer
            .settle(&self.token, settlement, &self.event)
            .await;
        if let Err(e) = &result
            && is_final
            && (e.is_retryable() || e.kind() == ErrorKind::Unsupported)
        {
            // A transient failure leaves the delivery settleable again.
            self.settled.store(false, Ordering::Release);
        }
        result
    }
}

/// The batcher that coalesces settlements from concurrent callers into
/// `settle_batch` calls of at most `max_batch`.
fn settler(
    driver: Arc<dyn SubscriptionDriver>,
    max_batch: usize,
) -> Batcher<(AckToken, Settlement), Result<()>> {
    let handler: BatchHandler<(AckToken, Settlement), Result<()>> =
        Arc::new(move |items: Vec<(AckToken, Settlement)>| {
            let driver = driver.clone();
            Box::pin(async move {
                let n = items.len();
                match crate::driver_call::panic_safe("settle_batch", driver.settle_batch(&items))
                    .await
                {
                    Ok(per) if per.len() == n => per,
                    Ok(_) => (0..n)
                        .map(|_| {
                            Err(Error::new(
                                ErrorKind::Internal,
                                "driver returned the wrong number of settlement results",
                            ))
                        })
                        .collect(),
                    Err(e) => (0..n).map(|_| Err(e.clone())).collect(),
                }
            })
        });
    Batcher::new(
        BatchLimits::count(max_batch),
        Duration::ZERO,
        |_| 1,
        handler,
    )
}

/// Settles one item through the settler and waits for its result.
async fn settle_through(
    settler: &Batcher<(AckToken, Settlement), Result<()>>,
    token: AckToken,
    settlement: Settlement,
) -> Result<()> {
    settler
        .submit((token, settlement))?
        .await
        .unwrap_or_else(|_| Err(Error::new(ErrorKind::Internal, "settlement task ended")))
}

/// Payload of a dead letter as text, for logs and examples.
pub fn describe_payload(payload: &Payload) -> String {
    match payload {
        Payload::Event(e) => format!("{} {} from {}", e.ty(), e.id(), e.source()),
        Payload::Raw(r) => format!(
            "raw message ({} bytes): {}",
            r.body.len(),
            String::from_utf8_lossy(&r.body[..r.body.len().min(60)])
        ),
    }
}
