//! The portable publisher: validation and size checks before any network call, trace
//! context injection, batching by count and bytes, per-key lanes that keep ordering
//! keys in order while unrelated events go in parallel, retries of just the failed
//! part of a batch, metrics, and a close that flushes everything accepted.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use crate::batcher::{BatchHandler, BatchLimits, Batcher};
use crate::health::{HealthState, PublisherHealth};
use crate::retry::RetryPolicy;
use crate::spans::{self, Destination};
use crate::telemetry;
use crate::validation::{Checked, EventValidator};
use cloudbus_driver::capabilities::Capabilities;
use cloudbus_driver::codec::RawMessage;
use cloudbus_driver::driver::{OutgoingMessage, Payload, PublishOptions, TopicDriver};
use cloudbus_driver::error::{Error, ErrorKind, Result};
use cloudbus_driver::event::{AttributesReader, Event, EventExt};

/// Publisher settings.
#[derive(Clone, Debug)]
pub struct PublisherOptions {
    /// Parallel send lanes; events with one ordering key always share a lane. No more
    /// are used than the provider carries at once
    /// ([`Capabilities::concurrent_sends`](cloudbus_driver::Capabilities::concurrent_sends)).
    pub lanes: usize,
    /// How long a lane waits to fill a batch before sending (zero: send what is there).
    pub linger: Duration,
    /// Retries of failed sends.
    pub retry: RetryPolicy,
    /// Most events accepted but not yet sent; beyond it `publish` fails with
    /// [`ErrorKind::ResourceExhausted`].
    pub max_pending: usize,
}

impl Default for PublisherOptions {
    fn default() -> Self {
        PublisherOptions {
            lanes: 4,
            linger: Duration::ZERO,
            retry: RetryPolicy::default().max_attempts(4),
            max_pending: 100_000,
        }
    }
}

/// Most batches of events without an ordering key that one
/// [`Publisher::publish_batch`] call has in flight at once (within
/// [`Capabilities::concurrent_sends`]).
const MAX_UNKEYED_BATCHES_AT_ONCE: usize = 16;

/// The lanes events are sent on: one batcher each (made on first use), so a lane
/// sends one batch at a time, in order, while lanes go in parallel.
struct Lanes {
    batchers: Vec<Batcher<OutgoingMessage, Result<()>>>,
    closed: bool,
}

struct Inner {
    driver: Arc<dyn TopicDriver>,
    caps: Capabilities,
    options: PublisherOptions,
    lanes: Mutex<Lanes>,
    pending: Arc<AtomicUsize>,
    next_lane: AtomicUsize,
    paused: Arc<PausedKeys>,
    /// What `health` reports.
    health: Arc<HealthState>,
    /// What its spans say about where events go.
    destination: Destination,
}

/// Ordering keys whose last publish failed. As in the Pub/Sub client libraries, later
/// events with such a key are refused until the application resumes it, so that a
/// key's events are never accepted out of order.
#[derive(Default)]
struct PausedKeys {
    any: std::sync::atomic::AtomicBool,
    keys: Mutex<std::collections::HashSet<String>>,
}

impl PausedKeys {
    fn is_paused(&self, key: Option<&str>) -> bool {
        match key {
            Some(k) if self.any.load(Ordering::Acquire) => {
                self.keys.lock().map(|s| s.contains(k)).unwrap_or(false)
            }
            _ => false,
        }
    }
    fn pause(&self, key: &str) {
        if let Ok(mut s) = self.keys.lock() {
            s.insert(key.to_owned());
            self.any.store(true, Ordering::Release);
        }
    }
    fn resume(&self, key: &str) {
        if let Ok(mut s) = self.keys.lock() {
            s.remove(key);
            self.any.store(!s.is_empty(), Ordering::Release);
        }
    }
    fn list(&self) -> Vec<String> {
        self.keys
            .lock()
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }
}

fn paused_error(key: &str) -> Error {
    Error::new(
        ErrorKind::OrderingKeyPaused,
        format!(
            "ordering key {key:?} is paused after a failed publish; call resume_ordering_key to go on"
        ),
    )
}

/// Publishes CloudEvents to one topic, queue or stream. Cheap to clone.
///
/// ```
/// # async fn demo(publisher: cloudbus_core::Publisher) -> cloudbus_core::Result<()> {
/// use cloudbus_core::EventBuilder;
/// let event = EventBuilder::new("com.example.order.created", "/orders").build()?;
/// publisher.publish(event).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Publisher {
    inner: Arc<Inner>,
    /// Checks event data against its schema before it is accepted.
    validator: Option<Arc<Validation>>,
}

/// A publisher's validator, and the events that wait for their schema to be fetched
/// before they are checked and queued. While any waits, later events wait behind
/// it, so that events keep their publish order (an ordering key's above all).
struct Validation {
    validator: Arc<dyn EventValidator>,
    /// The queue of waiting events, served by one task made at the first of them.
    waiting: Mutex<Option<mpsc::UnboundedSender<Waiting>>>,
    /// How many events are in that queue.
    queued: Arc<AtomicUsize>,
}

/// An event waiting for its schema.
struct Waiting {
    event: Event,
    options: PublishOptions,
    reply: oneshot::Sender<Result<()>>,
    /// Its place in [`Validation::queued`], given up when it is queued for sending,
    /// refused, or dropped with the queue (its handle then says the publisher
    /// stopped).
    _place: QueuedPlace,
}

/// One event counted in [`Validation::queued`]; dropping it uncounts the event.
struct QueuedPlace(Arc<AtomicUsize>);

impl QueuedPlace {
    fn take(queued: &Arc<AtomicUsize>) -> Self {
        queued.fetch_add(1, Ordering::SeqCst);
        QueuedPlace(queued.clone())
    }
}

impl Drop for QueuedPlace {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("capabilities", &self.inner.caps)
            .finish_non_exhaustive()
    }
}

impl Publisher {
    /// A publisher over `driver` with default options.
    pub fn new(driver: Arc<dyn TopicDriver>) -> Self {
        Self::with_options(driver, PublisherOptions::default())
    }

    /// A publisher over `driver`.
    pub fn with_options(driver: Arc<dyn TopicDriver>, options: PublisherOptions) -> Self {
        Self::for_destination(driver, options, Destination::default())
    }

    /// A publisher over `driver`, whose spans name `destination` (what
    /// [`Bus::publisher`](crate::Bus::publisher) makes).
    pub fn for_destination(
        driver: Arc<dyn TopicDriver>,
        options: PublisherOptions,
        destination: Destination,
    ) -> Self {
        let caps = driver.capabilities();
        Publisher {
            inner: Arc::new(Inner {
                driver,
                caps,
                options,
                lanes: Mutex::new(Lanes {
                    batchers: Vec::new(),
                    closed: false,
                }),
                pending: Arc::new(AtomicUsize::new(0)),
                next_lane: AtomicUsize::new(0),
                paused: Arc::default(),
                health: Arc::default(),
                destination,
            }),
            validator: None,
        }
    }

    /// This publisher (sharing its lanes), with every event checked by `validator`
    /// before it is accepted: an event whose data does not match its schema is
    /// refused with [`InvalidArgument`](ErrorKind::InvalidArgument) and never sent.
    /// An event whose schema is not loaded yet is accepted at once too: its handle
    /// resolves once the schema was fetched, the event checked and sent (or
    /// refused), and the events published after it stay behind it.
    pub fn validate_with(&self, validator: Arc<dyn EventValidator>) -> Publisher {
        Publisher {
            inner: self.inner.clone(),
            validator: Some(Arc::new(Validation {
                validator,
                waiting: Mutex::new(None),
                queued: Arc::new(AtomicUsize::new(0)),
            })),
        }
    }

    /// Checks `event` with the validator, fetching its schema when needed.
    pub(crate) async fn validated(&self, event: &Event) -> Result<()> {
        match &self.validator {
            Some(v) => v.validator.validate(event).await.map(|_| ()),
            None => Ok(()),
        }
    }

    /// Queues `event` behind the events waiting for their schema; a task fetches
    /// the schema, checks the event and queues it for sending, in publish order.
    fn publish_after_loading(
        &self,
        validation: &Validation,
        event: Event,
        options: PublishOptions,
    ) -> PublishHandle {
        if validation.queued.load(Ordering::SeqCst) >= self.inner.options.max_pending {
            return PublishHandle::ready(Err(Error::new(
                ErrorKind::ResourceExhausted,
                format!(
                    "{} events are waiting for their schema (max_pending)",
                    self.inner.options.max_pending
                ),
            )));
        }
        let Ok(mut waiting) = validation.waiting.lock() else {
            return PublishHandle::ready(Err(Error::new(
                ErrorKind::Internal,
                "the publisher's schema queue lock is poisoned",
            )));
        };
        if waiting.as_ref().is_none_or(|tx| tx.is_closed()) {
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                return PublishHandle::ready(Err(Error::new(
                    ErrorKind::Internal,
                    "fetching a schema to validate a published event needs a Tokio runtime",
                )));
            };
            let (tx, rx) = mpsc::unbounded_channel();
            // The task holds no sender: it ends when the last publisher handle goes.
            let unvalidated = Publisher {
                inner: self.inner.clone(),
                validator: None,
            };
            runtime.spawn(load_check_and_queue(
                unvalidated,
                validation.validator.clone(),
                rx,
            ));
            *waiting = Some(tx);
        }
        let (reply, answer) = oneshot::channel();
        let sent = waiting.as_ref().is_some_and(|tx| {
            tx.send(Waiting {
                event,
                options,
                reply,
                _place: QueuedPlace::take(&validation.queued),
            })
            .is_ok()
        });
        if !sent {
            return PublishHandle::ready(Err(Error::closed(
                "the publisher's schema queue stopped",
            )));
        }
        PublishHandle {
            state: HandleState::Waiting(answer),
        }
    }

    /// What the underlying provider supports.
    pub fn capabilities(&self) -> &Capabilities {
        &self.inner.caps
    }

    /// Where its events go, as its spans name it.
    pub fn destination(&self) -> &Destination {
        &self.inner.destination
    }

    /// The driver (to reach the provider's own type, use [`downcast`](Self::downcast)).
    pub fn driver(&self) -> &Arc<dyn TopicDriver> {
        &self.inner.driver
    }

    /// The topic driver as its own type `D`, when it is one (an escape hatch to the
    /// provider's client); `None` for another driver.
    pub fn downcast<D: std::any::Any>(&self) -> Option<&D> {
        self.inner.driver.as_ref().as_any().downcast_ref::<D>()
    }

    /// Publishes one event. The event is accepted at once (validated, given a
    /// `traceparent`, queued); the returned handle resolves when the provider has it.
    pub fn publish(&self, event: Event) -> PublishHandle {
        self.publish_with(event, PublishOptions::default())
    }

    /// Publishes one event with options (ordering key, dedup id, delay).
    pub fn publish_with(&self, event: Event, options: PublishOptions) -> PublishHandle {
        if let Some(validation) = &self.validator {
            // Behind events that wait for their schema, or waiting for its own.
            if validation.queued.load(Ordering::SeqCst) > 0 {
                return self.publish_after_loading(validation, event, options);
            }
            match validation.validator.validate_loaded(&event) {
                Err(e) => return PublishHandle::ready(Err(e)),
                Ok(Checked::NotLoaded) => {
                    return self.publish_after_loading(validation, event, options);
                }
                Ok(Checked::Valid | Checked::NoSchema) => {}
            }
        }
        let destination = &self.inner.destination;
        self.enqueue(OutgoingMessage::prepare_with(event, options, |event| {
            crate::spans::stamp_created(event, destination)
        }))
    }

    /// Publishes bytes that are not a CloudEvent (bridges, and tests of malformed input).
    pub fn publish_raw(&self, raw: RawMessage) -> PublishHandle {
        if !self.inner.caps.raw_messages {
            return PublishHandle::ready(Err(Error::unsupported(
                "this provider does not accept raw messages",
            )));
        }
        self.enqueue(OutgoingMessage::raw(raw))
    }

    fn enqueue(&self, msg: OutgoingMessage) -> PublishHandle {
        if let Err(e) = check(&self.inner.caps, &msg) {
            return PublishHandle::ready(Err(e));
        }
        if let Some(key) = msg.ordering_key.as_deref()
            && self.inner.paused.is_paused(Some(key))
        {
            return PublishHandle::ready(Err(paused_error(key)));
        }
        let pending = self.inner.pending.fetch_add(1, Ordering::Relaxed);
        if pending >= self.inner.options.max_pending {
            self.inner.pending.fetch_sub(1, Ordering::Relaxed);
            return PublishHandle::ready(Err(Error::new(
                ErrorKind::ResourceExhausted,
                format!(
                    "{} events are waiting to be sent (max_pending)",
                    self.inner.options.max_pending
                ),
            )));
        }
        match self.submit_to_lane(msg) {
            Ok(rx) => PublishHandle {
                state: HandleState::Waiting(rx),
            },
            Err(e) => {
                self.inner.pending.fetch_sub(1, Ordering::Relaxed);
                PublishHandle::ready(Err(e))
            }
        }
    }

    /// The lanes this publisher sends on: its option, within what the provider
    /// carries at once.
    fn lane_count(&self) -> usize {
        self.inner
            .options
            .lanes
            .min(self.inner.caps.concurrent_sends)
            .max(1)
    }

    fn lane_index(&self, key: Option<&str>) -> usize {
        let n = self.lane_count();
        match key {
            Some(k) => cloudbus_driver::hashing::key_slot(k, n),
            None => self.inner.next_lane.fetch_add(1, Ordering::Relaxed) % n,
        }
    }

    /// Queues `msg` on its lane. Under the lanes' lock, so that [`close`](Self::close)
    /// either sees it queued or refuses it.
    fn submit_to_lane(&self, msg: OutgoingMessage) -> Result<oneshot::Receiver<Result<()>>> {
        let index = self.lane_index(msg.ordering_key.as_deref());
        let mut lanes = self.lock_lanes()?;
        if lanes.closed {
            return Err(Error::closed("publisher is closed"));
        }
        if lanes.batchers.is_empty() {
            lanes.batchers = (0..self.lane_count()).map(|_| self.new_lane()).collect();
        }
        lanes.batchers[index].submit(msg)
    }

    /// A lane: batches within the provider's limits (waiting up to the linger for one
    /// to fill), sent in order with retries, counted and answered.
    fn new_lane(&self) -> Batcher<OutgoingMessage, Result<()>> {
        // What the lane needs, not the publisher's Inner (which holds the lanes).
        let driver = self.inner.driver.clone();
        let retry = self.inner.options.retry.clone();
        let paused = self.inner.paused.clone();
        let pending = self.inner.pending.clone();
        let health = self.inner.health.clone();
        let destination = self.inner.destination.clone();
        let ordering = self.inner.caps.ordering;
        let handler: BatchHandler<OutgoingMessage, Result<()>> =
            Arc::new(move |msgs: Vec<OutgoingMessage>| {
                let (driver, retry) = (driver.clone(), retry.clone());
                let (paused, pending) = (paused.clone(), pending.clone());
                let health = health.clone();
                let span = send_span(&destination, &msgs);
                Box::pin(async move {
                    let results = send_in_order(driver.as_ref(), &msgs, &retry, &paused, ordering)
                        .instrument(span)
                        .await;
                    record_published(&msgs, &results, &health);
                    pending.fetch_sub(msgs.len(), Ordering::Relaxed);
                    results
                })
            });
        Batcher::new(
            BatchLimits::of(&self.inner.caps),
            self.inner.options.linger,
            |m| m.size,
            handler,
        )
    }

    /// Publishes many events: chunked by the provider's count and byte limits, failed
    /// events retried alone. Events with an ordering key go on their key's lane (a
    /// lane sends one batch after another; lanes go in parallel); events without one
    /// are batched together and up to 16 of their batches are in flight at once
    /// (fewer where the provider carries fewer, see
    /// [`Capabilities::concurrent_sends`](cloudbus_driver::Capabilities::concurrent_sends)).
    /// One result per event, in order.
    pub async fn publish_batch(&self, events: Vec<Event>) -> Vec<Result<()>> {
        let msgs = events
            .into_iter()
            .map(|e| {
                OutgoingMessage::prepare_with(e, PublishOptions::default(), |event| {
                    crate::spans::stamp_created(event, self.destination())
                })
            })
            .collect();
        self.publish_messages(msgs).await
    }

    /// [`publish_batch`](Self::publish_batch) with options per event.
    pub async fn publish_batch_with(
        &self,
        events: Vec<(Event, PublishOptions)>,
    ) -> Vec<Result<()>> {
        let msgs = events
            .into_iter()
            .map(|(e, o)| {
                OutgoingMessage::prepare_with(e, o, |event| {
                    crate::spans::stamp_created(event, self.destination())
                })
            })
            .collect();
        self.publish_messages(msgs).await
    }

    async fn publish_messages(&self, msgs: Vec<OutgoingMessage>) -> Vec<Result<()>> {
        let total = msgs.len();
        let mut results: Vec<Option<Result<()>>> = (0..total).map(|_| None).collect();
        if self.is_closed() {
            return (0..total)
                .map(|_| Err(Error::closed("publisher is closed")))
                .collect();
        }
        let lanes = self.lane_count();
        let mut per_lane: Vec<Vec<(usize, OutgoingMessage)>> =
            (0..lanes).map(|_| Vec::new()).collect();
        // Events without an ordering key have no order to keep: they are batched
        // together (full batches) and the batches go out at once, a few at a time,
        // rather than one batch after another on a lane.
        let mut unkeyed: Vec<(usize, OutgoingMessage)> = Vec::new();
        for (i, msg) in msgs.into_iter().enumerate() {
            let valid = match (&self.validator, &msg.payload) {
                (Some(v), cloudbus_driver::driver::Payload::Event(event)) => {
                    v.validator.validate(event).await
                }
                _ => Ok(Checked::Valid),
            };
            match valid.and_then(|_| check(&self.inner.caps, &msg)) {
                Err(e) => results[i] = Some(Err(e)),
                Ok(()) if msg.ordering_key.is_none() => unkeyed.push((i, msg)),
                Ok(()) => {
                    let lane = self.lane_index(msg.ordering_key.as_deref());
                    per_lane[lane].push((i, msg));
                }
            }
        }
        let span = tracing::debug_span!("cloudbus.publish_batch", events = total);
        let caps = &self.inner.caps;
        let send_chunk = |chunk: Vec<(usize, OutgoingMessage)>| {
            let driver = self.inner.driver.clone();
            let retry = &self.inner.options.retry;
            let paused = &self.inner.paused;
            let health = &self.inner.health;
            let destination = &self.inner.destination;
            async move {
                let (indices, msgs): (Vec<usize>, Vec<OutgoingMessage>) = chunk.into_iter().unzip();
                let span = send_span(destination, &msgs);
                let res = send_in_order(driver.as_ref(), &msgs, retry, paused, caps.ordering)
                    .instrument(span)
                    .await;
                record_published(&msgs, &res, health);
                indices.into_iter().zip(res).collect::<Vec<_>>()
            }
        };
        let keyed = per_lane.into_iter().filter(|l| !l.is_empty()).map(|lane| {
            let send_chunk = &send_chunk;
            async move {
                let mut out = Vec::with_capacity(lane.len());
                for chunk in BatchLimits::of(caps).chunks(lane, |(_, m)| m.size) {
                    out.extend(send_chunk(chunk).await);
                }
                out
            }
        });
        let at_once = MAX_UNKEYED_BATCHES_AT_ONCE
            .min(caps.concurrent_sends)
            .max(1);
        let unkeyed = futures::stream::iter(BatchLimits::of(caps).chunks(unkeyed, |(_, m)| m.size))
            .map(&send_chunk)
            .buffer_unordered(at_once)
            .collect::<Vec<_>>();
        let (keyed, unkeyed) = futures::future::join(futures::future::join_all(keyed), unkeyed)
            .instrument(span)
            .await;
        for (i, r) in keyed.into_iter().chain(unkeyed).flatten() {
            results[i] = Some(r);
        }
        results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| Err(Error::new(ErrorKind::Internal, "event was not sent")))
            })
            .collect()
    }

    fn lock_lanes(&self) -> Result<std::sync::MutexGuard<'_, Lanes>> {
        self.inner
            .lanes
            .lock()
            .map_err(|_| Error::new(ErrorKind::Internal, "publisher lock poisoned"))
    }

    /// Lets events with `key` be published again after a failure paused the key.
    pub fn resume_ordering_key(&self, key: &str) {
        self.inner.paused.resume(key);
    }

    /// The ordering keys paused by a failed publish.
    pub fn paused_ordering_keys(&self) -> Vec<String> {
        self.inner.paused.list()
    }

    /// Whether it is open and reaches the provider, for liveness and readiness probes
    /// (see [`PublisherHealth`]).
    pub fn health(&self) -> PublisherHealth {
        PublisherHealth {
            open: !self.is_closed(),
            connected: self.inner.health.connected(),
            last_error: self.inner.health.last_error(),
            last_send: self.inner.health.last_success(),
            pending: self.inner.pending.load(Ordering::Relaxed),
        }
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.inner.lanes.lock().map(|l| l.closed).unwrap_or(true)
    }

    /// Stops accepting events, sends everything already accepted, then closes the
    /// driver. Later publishes fail with [`ErrorKind::Closed`].
    pub async fn close(&self) -> Result<()> {
        // Events accepted while their schema was not loaded are checked and queued
        // first: close sends everything already accepted.
        if let Some(validation) = &self.validator {
            while validation.queued.load(Ordering::SeqCst) > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let lanes = {
            let mut lanes = self.lock_lanes()?;
            if lanes.closed {
                return Ok(());
            }
            lanes.closed = true;
            std::mem::take(&mut lanes.batchers)
        };
        for lane in lanes {
            lane.drained().await;
        }
        self.inner.driver.close().await
    }
}

/// Checks an event against the provider's limits before any network call.
fn check(caps: &Capabilities, msg: &OutgoingMessage) -> Result<()> {
    if msg.size > caps.max_message_bytes {
        return Err(Error::new(
            ErrorKind::TooLarge,
            format!(
                "event {} is about {} bytes; the provider accepts at most {}",
                msg.id(),
                msg.size,
                caps.max_message_bytes
            ),
        ));
    }
    if let Some(delay) = msg.delay.filter(|d| !d.is_zero()) {
        match caps.max_delay {
            None => {
                return Err(Error::unsupported("this provider cannot delay delivery"));
            }
            Some(max) if delay > max => {
                return Err(Error::invalid(format!(
                    "delay {delay:?} is over the provider's maximum of {max:?}"
                )));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Sends one chunk, retrying the whole call on a retryable failure and then only the
/// events that failed retryably, with backoff. One result per message.
pub(crate) async fn send_with_retry(
    driver: &dyn TopicDriver,
    msgs: &[OutgoingMessage],
    retry: &RetryPolicy,
    ordered: bool,
) -> Vec<Result<()>> {
    let mut results: Vec<Option<Result<()>>> = (0..msgs.len()).map(|_| None).collect();
    let mut todo: Vec<usize> = (0..msgs.len()).collect();
    let mut attempt = 1;
    loop {
        let batch: Vec<OutgoingMessage> = if todo.len() == msgs.len() {
            Vec::new()
        } else {
            todo.iter().map(|&i| msgs[i].clone()).collect()
        };
        let slice: &[OutgoingMessage] = if batch.is_empty() { msgs } else { &batch };
        let outcome = crate::driver_call::panic_safe("send_batch", driver.send_batch(slice)).await;
        let mut again = Vec::new();
        match outcome {
            Ok(per) if per.len() == todo.len() => {
                // A failed event is retried alone only when no later event with its
                // ordering key got through in this call: retrying it then would put it
                // behind them.
                let overtaken = |pos: usize, per: &[Result<()>]| {
                    let key = msgs[todo[pos]].ordering_key.as_deref();
                    ordered
                        && key.is_some()
                        && todo[pos + 1..]
                            .iter()
                            .zip(&per[pos + 1..])
                            .any(|(&j, r)| r.is_ok() && msgs[j].ordering_key.as_deref() == key)
                };
                let retry_now: Vec<bool> = (0..todo.len())
                    .map(|pos| {
                        per[pos]
                            .as_ref()
                            .is_err_and(|e| e.is_retryable() && retry.should_retry(attempt))
                            && !overtaken(pos, &per)
                    })
                    .collect();
                // Results are moved, not cloned, so provider errors keep their source.
                for ((&i, r), again_now) in todo.iter().zip(per).zip(retry_now) {
                    if again_now {
                        again.push(i);
                    } else {
                        results[i] = Some(r);
                    }
                }
            }
            Ok(per) => {
                let e = Error::new(
                    ErrorKind::Internal,
                    format!(
                        "driver returned {} results for {} events",
                        per.len(),
                        todo.len()
                    ),
                );
                for &i in &todo {
                    results[i] = Some(Err(e.clone()));
                }
            }
            Err(e) if e.kind() == ErrorKind::TooLarge && todo.len() > 1 => {
                // The provider counted the batch larger than the estimate did: split it,
                // so that the events that fit are not refused with the one that does not.
                // Halves go one after the other, which keeps ordering keys in order.
                let part: Vec<OutgoingMessage> = todo.iter().map(|&i| msgs[i].clone()).collect();
                let (front, back) = part.split_at(part.len() / 2);
                tracing::debug!(
                    events = part.len(),
                    "batch refused as too large; splitting it"
                );
                let mut sent = Box::pin(send_with_retry(driver, front, retry, ordered)).await;
                sent.extend(Box::pin(send_with_retry(driver, back, retry, ordered)).await);
                for (&i, r) in todo.iter().zip(sent) {
                    results[i] = Some(r);
                }
            }
            // A send whose driver panicked was not confirmed: sent again (as a transient
            // failure is), so that one panic does not refuse the whole batch. At worst a
            // duplicate, which consumers tolerate; a refusal would be the caller's loss.
            Err(e)
                if (e.is_retryable() || crate::driver_call::panicked(&e))
                    && retry.should_retry(attempt) =>
            {
                again = todo.clone()
            }
            Err(e) => {
                for &i in &todo {
                    results[i] = Some(Err(e.clone()));
                }
            }
        }
        if again.is_empty() {
            break;
        }
        tracing::debug!(attempt, retrying = again.len(), "retrying failed publishes");
        tokio::time::sleep(retry.backoff(attempt)).await;
        attempt += 1;
        todo = again;
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(Error::new(ErrorKind::Internal, "no result"))))
        .collect()
}

/// [`send_with_retry`] for providers that keep ordering keys in order: events of a
/// paused key are refused without a send, and a key whose event fails is paused.
async fn send_in_order(
    driver: &dyn TopicDriver,
    msgs: &[OutgoingMessage],
    retry: &RetryPolicy,
    paused: &PausedKeys,
    ordered: bool,
) -> Vec<Result<()>> {
    if !ordered {
        return if msgs.is_empty() {
            Vec::new()
        } else {
            send_with_retry(driver, msgs, retry, false).await
        };
    }
    let blocked: Vec<bool> = msgs
        .iter()
        .map(|m| paused.is_paused(m.ordering_key.as_deref()))
        .collect();
    let results = if blocked.iter().any(|b| *b) {
        let sendable: Vec<OutgoingMessage> = msgs
            .iter()
            .zip(&blocked)
            .filter(|(_, b)| !**b)
            .map(|(m, _)| m.clone())
            .collect();
        let mut sent = send_with_retry(driver, &sendable, retry, true)
            .await
            .into_iter();
        msgs.iter()
            .zip(&blocked)
            .map(|(m, b)| match (b, m.ordering_key.as_deref()) {
                (true, Some(key)) => Err(paused_error(key)),
                _ => sent
                    .next()
                    .unwrap_or_else(|| Err(Error::new(ErrorKind::Internal, "no result"))),
            })
            .collect()
    } else if msgs.is_empty() {
        Vec::new()
    } else {
        send_with_retry(driver, msgs, retry, true).await
    };
    for (m, r) in msgs.iter().zip(&results) {
        if let (Some(key), Err(e)) = (m.ordering_key.as_deref(), r)
            && e.kind() != ErrorKind::OrderingKeyPaused
        {
            tracing::warn!(ordering_key = key, error = %e, "publish failed; pausing the ordering key");
            paused.pause(key);
        }
    }
    results
}

/// The `send` span of one provider call, linked to the creation context each event
/// carries.
fn send_span(destination: &Destination, msgs: &[OutgoingMessage]) -> tracing::Span {
    let span = spans::send(destination, msgs.len());
    spans::link_events(
        &span,
        msgs.iter().filter_map(|m| m.payload.event().map(|e| &**e)),
    );
    span
}

/// Counts published events per (source, type), once per group, not once per event,
/// and records whether the send reached the provider.
fn record_published(msgs: &[OutgoingMessage], results: &[Result<()>], health: &HealthState) {
    if results.iter().any(Result::is_ok) {
        health.succeeded();
    } else if let Some(Err(e)) = results
        .iter()
        .find(|r| r.as_ref().is_err_and(crate::health::is_connection_error))
    {
        health.failed(e);
    }
    let mut groups: Vec<(&Event, u64)> = Vec::new();
    for (m, r) in msgs.iter().zip(results) {
        if let (Payload::Event(e), Ok(())) = (&m.payload, r) {
            match groups
                .iter_mut()
                .find(|(g, _)| g.ty() == e.ty() && g.source() == e.source())
            {
                Some(g) => g.1 += 1,
                None => groups.push((e, 1)),
            }
        }
    }
    for (e, n) in groups {
        telemetry::record_published_n(e, n);
    }
}

/// Resolves when the provider has accepted (or refused) one published event.
#[must_use = "a publish is only known to have succeeded when its handle resolves Ok"]
pub struct PublishHandle {
    state: HandleState,
}

enum HandleState {
    Ready(Option<Result<()>>),
    Waiting(oneshot::Receiver<Result<()>>),
}

impl PublishHandle {
    fn ready(r: Result<()>) -> Self {
        PublishHandle {
            state: HandleState::Ready(Some(r)),
        }
    }
}

impl Future for PublishHandle {
    type Output = Result<()>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        match &mut self.state {
            HandleState::Ready(r) => Poll::Ready(r.take().unwrap_or_else(|| {
                Err(Error::new(
                    ErrorKind::Internal,
                    "handle polled after completion",
                ))
            })),
            HandleState::Waiting(rx) => Pin::new(rx).poll(cx).map(|r| {
                r.unwrap_or_else(|_| Err(Error::closed("publisher stopped before sending")))
            }),
        }
    }
}

/// How long a schema fetch that failed answers for the events of the same type and
/// schema behind it, instead of each of them waiting for its own fetch to fail.
const FAILED_FETCH_HOLDS: Duration = Duration::from_secs(2);

/// Serves a publisher's events that wait for their schema, one after another: fetch
/// the schema, check the event, queue it for sending (so it keeps its place), and
/// answer its handle when the send is answered. A fetch that failed (the registry is
/// away) answers for the events of the same type behind it for a moment, and pauses
/// the event's ordering key, as a failed send does, so that a later event of the key
/// cannot overtake it.
async fn load_check_and_queue(
    publisher: Publisher,
    validator: Arc<dyn EventValidator>,
    mut waiting: mpsc::UnboundedReceiver<Waiting>,
) {
    let mut failed_fetch: Option<((String, Option<String>), tokio::time::Instant, Error)> = None;
    while let Some(Waiting {
        event,
        options,
        reply,
        _place,
    }) = waiting.recv().await
    {
        let schema_of = (
            event.ty().to_owned(),
            event.dataschema().map(|u| u.to_string()),
        );
        let recent_failure = failed_fetch
            .as_ref()
            .filter(|(of, at, _)| *of == schema_of && at.elapsed() < FAILED_FETCH_HOLDS)
            .map(|(_, _, e)| e.clone());
        let checked = match recent_failure {
            Some(e) => Err(e),
            None => validator.validate(&event).await,
        };
        let handle = match checked {
            Err(e) => {
                if e.is_retryable() {
                    failed_fetch = Some((schema_of, tokio::time::Instant::now(), e.clone()));
                    let key = options
                        .ordering_key
                        .as_deref()
                        .or_else(|| event.partition_key());
                    if let Some(key) = key {
                        publisher.inner.paused.pause(key);
                    }
                }
                PublishHandle::ready(Err(e))
            }
            Ok(_) => publisher.publish_with(event, options),
        };
        drop(_place);
        tokio::spawn(async move {
            let _ = reply.send(handle.await);
        });
    }
}

/// A publisher to a topic of dead letters is a consumer's dead-letter place.
#[async_trait::async_trait]
impl cloudbus_driver::driver::DeadLetterSink for Publisher {
    async fn put_event(&self, event: Event) -> Result<()> {
        self.publish(event).await
    }
    async fn put_raw(&self, raw: RawMessage) -> Result<()> {
        self.publish_raw(raw).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudbus_driver::event::EventBuilder;

    /// publish_batch cuts each lane by the provider's count and byte limits.
    #[test]
    fn chunks_respect_count_and_bytes() {
        let caps = {
            let mut caps = Capabilities::default();
            caps.max_batch_count = 3;
            caps.max_batch_bytes = 1000;
            caps
        };
        let items: Vec<(usize, OutgoingMessage)> = (0..7)
            .map(|i| {
                let e = EventBuilder::new("t", "/s")
                    .data("text/plain", "x".repeat(300))
                    .build()
                    .unwrap();
                (
                    i,
                    OutgoingMessage::new(Arc::new(e), PublishOptions::default()),
                )
            })
            .collect();
        let chunks = BatchLimits::of(&caps).chunks(items, |(_, m)| m.size);
        assert!(chunks.iter().all(|c| c.len() <= 3));
        assert!(
            chunks
                .iter()
                .all(|c| c.iter().map(|x| x.1.size).sum::<usize>() <= 1000)
        );
        assert_eq!(chunks.iter().map(Vec::len).sum::<usize>(), 7);
    }

    /// Records the size of every send.
    struct RecordingDriver {
        caps: Capabilities,
        sends: std::sync::Mutex<Vec<usize>>,
        in_flight: AtomicUsize,
        most_in_flight: AtomicUsize,
    }

    #[async_trait::async_trait]
    impl TopicDriver for RecordingDriver {
        async fn send_batch(&self, batch: &[OutgoingMessage]) -> Result<crate::BatchResults> {
            self.sends.lock().unwrap().push(batch.len());
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.most_in_flight.fetch_max(now, Ordering::SeqCst);
            // A network call: the other sends of the batch start meanwhile.
            tokio::time::sleep(Duration::from_millis(20)).await;
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            Ok(batch.iter().map(|_| Ok(())).collect())
        }
        fn capabilities(&self) -> Capabilities {
            self.caps.clone()
        }
    }

    /// Panics in its first send, then accepts everything.
    #[derive(Default)]
    struct PanicsOnce {
        sends: std::sync::atomic::AtomicUsize,
    }

    #[async_trait::async_trait]
    impl TopicDriver for PanicsOnce {
        async fn send_batch(&self, batch: &[OutgoingMessage]) -> Result<crate::BatchResults> {
            if self.sends.fetch_add(1, Ordering::SeqCst) == 0 {
                panic!("injected");
            }
            Ok(batch.iter().map(|_| Ok(())).collect())
        }
        fn capabilities(&self) -> Capabilities {
            {
                let mut caps = Capabilities::default();
                caps.concurrent_sends = 1;
                caps
            }
        }
    }

    /// A driver that panics once costs a retry, not the batch: every event of the
    /// batch it panicked on was refused (the Service Bus chaos case saw 200 of 200
    /// refused after one injected panic, with the one lane Service Bus gets).
    #[tokio::test]
    async fn a_send_whose_driver_panicked_is_retried() {
        let driver = Arc::new(PanicsOnce::default());
        let publisher = Publisher::new(driver.clone());
        let events = (0..5)
            .map(|n| {
                EventBuilder::new("t", "/s")
                    .id(format!("e{n}"))
                    .build()
                    .unwrap()
            })
            .collect();
        let results = publisher.publish_batch(events).await;
        assert!(results.iter().all(Result::is_ok), "{results:?}");
        assert_eq!(driver.sends.load(Ordering::SeqCst), 2);
        let one = publisher
            .publish(EventBuilder::new("t", "/s").build().unwrap())
            .await;
        assert!(one.is_ok(), "{one:?}");
    }

    /// The sizes of the sends of one `publish_batch` of 100 events (with 100
    /// ordering keys when `keyed`), and the most sends in flight at once.
    async fn sends_of_a_batch(
        concurrent_sends: usize,
        max_batch_count: usize,
        keyed: bool,
    ) -> (Vec<usize>, usize) {
        let driver = Arc::new(RecordingDriver {
            caps: {
                let mut caps = Capabilities::default();
                caps.max_batch_count = max_batch_count;
                caps.max_batch_bytes = 10 * 1024 * 1024;
                caps.concurrent_sends = concurrent_sends;
                caps
            },
            sends: Default::default(),
            in_flight: Default::default(),
            most_in_flight: Default::default(),
        });
        let publisher = Publisher::new(driver.clone());
        let events = (0..100)
            .map(|n| {
                let e = EventBuilder::new("t", "/s").id(format!("e{n}"));
                if keyed {
                    e.partition_key(format!("k{n}"))
                } else {
                    e
                }
                .build()
                .unwrap()
            })
            .collect();
        let results = publisher.publish_batch(events).await;
        assert!(results.iter().all(Result::is_ok));
        let mut sends = driver.sends.lock().unwrap().clone();
        sends.sort_unstable();
        (sends, driver.most_in_flight.load(Ordering::SeqCst))
    }

    /// Keyed events go on their keys' lanes, no more lanes than the provider carries
    /// at once: four lanes over one Service Bus link made four small transfers that
    /// waited for each other.
    #[tokio::test]
    async fn lanes_are_capped_by_the_providers_concurrent_sends() {
        for (concurrent, lanes) in [(1, 1), (2, 2), (usize::MAX, 4)] {
            let (sends, most) = sends_of_a_batch(concurrent, 1000, true).await;
            assert_eq!(sends.len(), lanes, "{sends:?}");
            assert_eq!(sends.iter().sum::<usize>(), 100);
            assert!(most <= lanes, "{most} sends at once over {lanes} lanes");
        }
    }

    /// Events without an ordering key go in full batches, not split over the lanes,
    /// and their batches are in flight together: 16 at most, and no more than the
    /// provider carries at once (Pub/Sub's publish ran at 0.6x of its raw client when
    /// four lanes sent one batch after another).
    #[tokio::test]
    async fn unkeyed_events_go_in_full_batches_in_flight_together() {
        assert_eq!(
            sends_of_a_batch(usize::MAX, 1000, false).await,
            (vec![100], 1)
        );
        assert_eq!(sends_of_a_batch(1, 1000, false).await, (vec![100], 1));
        let (sends, most) = sends_of_a_batch(usize::MAX, 10, false).await;
        assert_eq!(sends, vec![10; 10]);
        assert_eq!(most, 10, "the ten batches should be in flight together");
        let (sends, most) = sends_of_a_batch(usize::MAX, 5, false).await;
        assert_eq!(sends, vec![5; 20]);
        assert_eq!(most, MAX_UNKEYED_BATCHES_AT_ONCE);
        let (sends, most) = sends_of_a_batch(3, 10, false).await;
        assert_eq!(sends, vec![10; 10]);
        assert_eq!(most, 3);
    }

    /// Records the ids of the events it is sent, in order.
    #[derive(Default)]
    struct IdRecorder {
        ids: std::sync::Mutex<Vec<String>>,
    }

    #[async_trait::async_trait]
    impl TopicDriver for IdRecorder {
        async fn send_batch(&self, batch: &[OutgoingMessage]) -> Result<crate::BatchResults> {
            let mut ids = self.ids.lock().unwrap();
            for m in batch {
                if let Payload::Event(e) = &m.payload {
                    ids.push(e.id().to_owned());
                }
            }
            Ok(batch.iter().map(|_| Ok(())).collect())
        }
        fn capabilities(&self) -> Capabilities {
            {
                let mut caps = Capabilities::default();
                caps.ordering = true;
                caps
            }
        }
    }

    /// A validator whose schemas of type "lazy" are not loaded until asked for (20 ms
    /// of fetching); the data `"bad"` breaks every schema.
    struct LazySchemas;

    #[async_trait::async_trait]
    impl EventValidator for LazySchemas {
        fn validate_loaded(&self, event: &Event) -> Result<Checked> {
            if event.ty() == "lazy" {
                return Ok(Checked::NotLoaded);
            }
            Self::check(event)
        }
        async fn validate(&self, event: &Event) -> Result<Checked> {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Self::check(event)
        }
    }

    impl LazySchemas {
        fn check(event: &Event) -> Result<Checked> {
            match event.data() {
                Some(cloudbus_driver::event::Data::String(s)) if s == "bad" => {
                    Err(Error::invalid("does not match the schema"))
                }
                _ => Ok(Checked::Valid),
            }
        }
    }

    fn keyed(ty: &str, id: &str, data: &str) -> (Event, PublishOptions) {
        let event = EventBuilder::new(ty, "/s")
            .id(id)
            .data("text/plain", data.to_owned())
            .build()
            .unwrap();
        let options = PublishOptions {
            ordering_key: Some("k".into()),
            ..PublishOptions::default()
        };
        (event, options)
    }

    /// Issue 28 item 17: `publish` sent an event unvalidated while its schema was not
    /// loaded yet (a validator made with `SchemaValidator::new`, not `preloaded`). It
    /// loads the schema first; the events published after it keep their order.
    #[tokio::test]
    async fn publish_validates_an_event_whose_schema_is_not_loaded_yet() {
        let driver = Arc::new(IdRecorder::default());
        let publisher = Publisher::new(driver.clone()).validate_with(Arc::new(LazySchemas));
        let (bad, o) = keyed("lazy", "bad-1", "bad");
        let refused = publisher.publish_with(bad, o).await;
        assert_eq!(
            refused.map_err(|e| e.kind()),
            Err(ErrorKind::InvalidArgument),
            "an event that breaks its schema was sent"
        );
        let handles: Vec<_> = [
            keyed("lazy", "1", "ok"),
            keyed("loaded", "2", "ok"),
            keyed("lazy", "3", "ok"),
            keyed("loaded", "4", "ok"),
        ]
        .into_iter()
        .map(|(e, o)| publisher.publish_with(e, o))
        .collect();
        for h in handles {
            h.await.unwrap();
        }
        assert_eq!(*driver.ids.lock().unwrap(), ["1", "2", "3", "4"]);
        // Once nothing waits, a loaded type is checked at once again.
        let (bad, o) = keyed("loaded", "bad-2", "bad");
        assert!(publisher.publish_with(bad, o).await.is_err());
        assert_eq!(driver.ids.lock().unwrap().len(), 4);
    }
}
