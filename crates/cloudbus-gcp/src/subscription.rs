//! Consuming: a streaming pull per subscription, with cloudbus leases over it, and the
//! dead-letter place of a subscription.
//!
//! The crate keeps the server lease of every message it handed out extended for as
//! long as its handler is held. On top of that the driver keeps the portable lease:
//! each received message has a deadline (the subscription's lease, moved by
//! `extend`); a reaper nacks what passes its deadline, which is how an unsettled
//! message comes back, and how `nack(delay)` waits before its redelivery. Acks on
//! exactly-once subscriptions are confirmed by the service.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use cloudbus_driver::codec::RawMessage;
use cloudbus_driver::{
    AckToken, BatchResults, BinaryCodec, Capabilities, DeadLetter, DeadLetterDriver, DecodeError,
    Error, ErrorKind, Event, Payload, ReceivedMessage, Result, Settlement, SubscriptionDriver,
};
use google_cloud_pubsub::model::Message;
use google_cloud_pubsub::subscriber::handler::Handler;
use google_cloud_pubsub::subscriber::{ShutdownBehavior, ShutdownToken};
use tokio::sync::{OnceCell, mpsc};

use crate::capabilities::capabilities;
use crate::context::{PubSubContext, lock};
use crate::error::{ack_error, map_error, publish_error};
use crate::topic::to_message;
use crate::topology::{REDRIVE_ATTRIBUTE, SubscriptionSettings, dead_letter_name, read_settings};

/// Attributes of a dead letter. The first four are the ones Pub/Sub's own
/// dead-letter policy writes; cloudbus writes them too for an explicit dead-letter.
const DL_SOURCE_SUBSCRIPTION: &str = "CloudPubSubDeadLetterSourceSubscription";
const DL_SOURCE_PROJECT: &str = "CloudPubSubDeadLetterSourceSubscriptionProject";
const DL_DELIVERY_COUNT: &str = "CloudPubSubDeadLetterSourceDeliveryCount";
const DL_PUBLISH_TIME: &str = "CloudPubSubDeadLetterSourceTopicPublishTime";
const DL_REASON: &str = "cloudbus-dead-letter-reason";
const DL_DESCRIPTION: &str = "cloudbus-dead-letter-description";
const DL_TIME: &str = "cloudbus-dead-lettered-at";

/// The stream's ack deadline, renewed while a message is held.
const STREAM_ACK_DEADLINE: Duration = Duration::from_secs(10);
/// How often the reaper looks for passed deadlines.
const REAPER_TICK: Duration = Duration::from_millis(50);

struct InFlight {
    /// Bytes of data and attributes, for flow control.
    size: usize,
    /// The consumer handle that received it (closing a handle releases its messages).
    owner: u64,
    handler: Handler,
    message: Message,
    attempt: u32,
    deadline: Instant,
    /// Nacked with a delay: waiting for the reaper to release it.
    nacked: bool,
}

type Pulled = google_cloud_pubsub::Result<(Message, Handler)>;

/// The streaming pull of one subscription, shared by every handle on it in one bus:
/// the emulator keeps streams that went away alive for a while and may deliver to
/// them, so cloudbus opens one stream per subscription and keeps it while any handle
/// is alive.
pub(crate) struct Inner {
    shared: Arc<PubSubContext>,
    name: String,
    path: String,
    codec: BinaryCodec,
    settings: OnceCell<SubscriptionSettings>,
    rx: tokio::sync::Mutex<Option<mpsc::Receiver<Pulled>>>,
    pump: Mutex<Option<(tokio::task::JoinHandle<()>, ShutdownToken)>>,
    inflight: Mutex<HashMap<u64, InFlight>>,
    next_token: AtomicU64,
    reaping: AtomicBool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        let pump = lock(&self.pump).take();
        if let Some((pump, shutdown)) = pump {
            match tokio::runtime::Handle::try_current() {
                Ok(rt) => {
                    rt.spawn(async move {
                        shutdown.shutdown().await;
                        pump.abort();
                    });
                }
                Err(_) => pump.abort(),
            }
        }
    }
}

/// One message pulled and held under a cloudbus lease.
struct Held {
    token: u64,
    message: Message,
    attempt: u32,
}

impl Inner {
    async fn settings(&self) -> Result<&SubscriptionSettings> {
        self.settings
            .get_or_try_init(|| read_settings(&self.shared, &self.name))
            .await
    }

    async fn start_pump(self: &Arc<Self>) -> Result<()> {
        let mut rx = self.rx.lock().await;
        if rx.is_some() {
            return Ok(());
        }
        let subscriber = self.shared.clients().await?.subscriber.clone();
        let config = &self.shared.config;
        let mut stream = subscriber
            .subscribe(self.path.clone())
            .set_max_outstanding_messages(config.max_outstanding_messages)
            .set_max_outstanding_bytes(config.max_outstanding_bytes)
            .set_shutdown_behavior(ShutdownBehavior::NackImmediately)
            // The server-side deadline of each extension: what is left leased to a
            // stream that went away comes back after this long (10 s is the floor).
            .set_max_lease_extension(STREAM_ACK_DEADLINE)
            .build();
        let shutdown = stream.shutdown_token();
        let (tx, new_rx) = mpsc::channel::<Pulled>(16);
        let pump = tokio::spawn(async move {
            while let Some(item) = stream.next().await {
                if tx.send(item).await.is_err() {
                    break;
                }
            }
        });
        *lock(&self.pump) = Some((pump, shutdown));
        *rx = Some(new_rx);
        if !self.reaping.swap(true, Ordering::AcqRel) {
            tokio::spawn(reap(Arc::downgrade(self)));
        }
        Ok(())
    }

    /// Receives up to `max` messages for this subscription, waiting up to `wait` for
    /// the first; drops (acks) what the subscription's filter rejects and
    /// dead-letters what exceeded the attempts cloudbus enforces. Flow control is
    /// applied here too: the handles of this subscription never hold more unsettled
    /// messages or bytes than configured (the service may send more than asked).
    async fn pull(self: &Arc<Self>, owner: u64, max: usize, wait: Duration) -> Result<Vec<Held>> {
        let settings = self.settings().await?.clone();
        let until = tokio::time::Instant::now() + wait;
        let mut got = Vec::new();
        loop {
            self.start_pump().await?;
            let mut guard = self.rx.lock().await;
            let Some(rx) = guard.as_mut() else {
                continue;
            };
            let ended = match self.fill(rx, owner, &settings, max, until, &mut got).await {
                Ok(()) => return Ok(got),
                Err(e) => e,
            };
            // The stream ended: drop it, so that the next round opens a new one.
            *guard = None;
            if let Some((pump, _)) = lock(&self.pump).take() {
                pump.abort();
            }
            drop(guard);
            let permanent = matches!(
                ended.kind(),
                ErrorKind::NotFound | ErrorKind::PermissionDenied | ErrorKind::InvalidArgument
            );
            if permanent || tokio::time::Instant::now() >= until {
                return if got.is_empty() { Err(ended) } else { Ok(got) };
            }
            tracing::warn!(subscription = %self.name, error = %ended, "streaming pull ended; reopening");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Room left under flow control: (messages, bytes).
    fn room(&self) -> (usize, usize) {
        let config = &self.shared.config;
        let map = lock(&self.inflight);
        let bytes: usize = map.values().map(|i| i.size).sum();
        (
            (config.max_outstanding_messages as usize).saturating_sub(map.len()),
            (config.max_outstanding_bytes as usize).saturating_sub(bytes),
        )
    }

    async fn fill(
        &self,
        rx: &mut mpsc::Receiver<Pulled>,
        owner: u64,
        settings: &SubscriptionSettings,
        max: usize,
        until: tokio::time::Instant,
        got: &mut Vec<Held>,
    ) -> Result<()> {
        while got.len() < max.max(1) {
            let (messages, bytes) = self.room();
            if messages == 0 || bytes == 0 {
                if !got.is_empty() || tokio::time::Instant::now() >= until {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
            let item = if got.is_empty() {
                match tokio::time::timeout_at(until, rx.recv()).await {
                    Ok(Some(item)) => item,
                    Ok(None) => {
                        return Err(Error::new(
                            ErrorKind::Unavailable,
                            format!("the stream of subscription {} ended", self.name),
                        ));
                    }
                    Err(_) => return Ok(()),
                }
            } else {
                match rx.try_recv() {
                    Ok(item) => item,
                    Err(_) => return Ok(()),
                }
            };
            let (message, handler) =
                item.map_err(|e| map_error(e, &format!("pull {}", self.name)))?;
            if let Some(held) = self.admit(owner, settings, message, handler).await {
                got.push(held);
            }
        }
        Ok(())
    }

    async fn admit(
        &self,
        owner: u64,
        settings: &SubscriptionSettings,
        message: Message,
        handler: Handler,
    ) -> Option<Held> {
        if let Some(filter) = &settings.filter
            && !filter.matches(&message.attributes)
        {
            // Not for this subscription (the emulator ignores filters; redrives to
            // another subscription are also kept out this way): settled, not lost.
            handler.ack();
            return None;
        }
        let attempt = handler.delivery_attempt().unwrap_or(1).max(1) as u32;
        if let Some(max) = settings.max_attempts
            && attempt > max
        {
            let reason = format!("max delivery attempts ({max}) exceeded");
            match self
                .send_to_dead_letter(settings, &message, attempt - 1, &reason, "")
                .await
            {
                Ok(()) => handler.ack(),
                Err(e) => {
                    tracing::warn!(subscription = %self.name, error = %e, "could not dead-letter; left for redelivery");
                    handler.nack();
                }
            }
            return None;
        }
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        lock(&self.inflight).insert(
            token,
            InFlight {
                size: message_size(&message),
                owner,
                handler,
                message: message.clone(),
                attempt,
                deadline: Instant::now() + settings.lease,
                nacked: false,
            },
        );
        Some(Held {
            token,
            message,
            attempt,
        })
    }

    /// Publishes `message` to the dead-letter topic with the reason (the caller acks).
    async fn send_to_dead_letter(
        &self,
        settings: &SubscriptionSettings,
        message: &Message,
        deliveries: u32,
        reason: &str,
        description: &str,
    ) -> Result<()> {
        let Some(topic) = &settings.dead_letter_topic else {
            return Err(Error::unsupported(format!(
                "subscription {} has no dead-letter policy (make it with ensure_subscription)",
                self.name
            )));
        };
        let mut attributes: BTreeMap<String, String> = message
            .attributes
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        attributes.insert(DL_SOURCE_SUBSCRIPTION.into(), self.name.clone());
        attributes.insert(DL_SOURCE_PROJECT.into(), self.shared.config.project.clone());
        attributes.insert(DL_DELIVERY_COUNT.into(), deliveries.to_string());
        if let Some(t) = &message.publish_time {
            attributes.insert(DL_PUBLISH_TIME.into(), timestamp(t).to_rfc3339());
        }
        attributes.insert(DL_REASON.into(), reason.to_owned());
        if !description.is_empty() {
            attributes.insert(DL_DESCRIPTION.into(), description.to_owned());
        }
        attributes.insert(DL_TIME.into(), Utc::now().to_rfc3339());
        let raw = RawMessage {
            body: message.data.to_vec(),
            attributes,
        };
        let publisher = self.shared.publisher(topic).await?;
        let ordering_key = Some(message.ordering_key.as_str()).filter(|k| !k.is_empty());
        let fut = publisher.publish(to_message(raw, ordering_key));
        publisher.flush().await;
        fut.await
            .map(|_| ())
            .map_err(|e| publish_error(e, &format!("dead-letter to {topic}")))
    }

    fn decode(&self, message: &Message) -> std::result::Result<Event, (RawMessage, DecodeError)> {
        let raw = RawMessage {
            body: message.data.to_vec(),
            attributes: message
                .attributes
                .iter()
                .filter(|(k, _)| k.as_str() != REDRIVE_ATTRIBUTE)
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        };
        self.codec.decode(&raw).map_err(|e| (raw, e))
    }

    fn take(&self, token: u64) -> Result<InFlight> {
        let mut map = lock(&self.inflight);
        match map.get(&token) {
            None => Err(Error::new(
                ErrorKind::LeaseExpired,
                format!(
                    "message {token} of {} is no longer held: its lease expired or it was settled",
                    self.name
                ),
            )),
            Some(i) if i.nacked => Err(Error::new(
                ErrorKind::AlreadySettled,
                format!("message {token} of {} was nacked", self.name),
            )),
            Some(_) => map
                .remove(&token)
                .ok_or_else(|| Error::new(ErrorKind::Internal, "inflight entry vanished")),
        }
    }

    async fn settle_one(&self, token: &AckToken, settlement: &Settlement) -> Result<()> {
        let Some(token) = token.as_number() else {
            return Err(Error::invalid(format!(
                "{token:?} is not a Pub/Sub delivery token"
            )));
        };
        match settlement {
            Settlement::Ack => {
                let held = self.take(token)?;
                ack(held.handler).await
            }
            Settlement::Nack { delay } if delay.is_zero() => {
                self.take(token)?.handler.nack();
                Ok(())
            }
            Settlement::Nack { delay } | Settlement::Extend { lease: delay } => {
                let nack = matches!(settlement, Settlement::Nack { .. });
                let mut map = lock(&self.inflight);
                match map.get_mut(&token) {
                    Some(i) if !i.nacked => {
                        i.deadline = Instant::now() + *delay;
                        i.nacked = nack;
                        Ok(())
                    }
                    Some(_) => Err(Error::new(
                        ErrorKind::AlreadySettled,
                        format!("message {token} of {} was nacked", self.name),
                    )),
                    None => Err(Error::new(
                        ErrorKind::LeaseExpired,
                        format!("message {token} of {} is no longer held", self.name),
                    )),
                }
            }
            Settlement::DeadLetter {
                reason,
                description,
            } => {
                let settings = self.settings().await?.clone();
                let held = self.take(token)?;
                match self
                    .send_to_dead_letter(
                        &settings,
                        &held.message,
                        held.attempt,
                        reason,
                        description,
                    )
                    .await
                {
                    Ok(()) => ack(held.handler).await,
                    Err(e) => {
                        // Keep it held, so that nothing is lost and it can be settled again.
                        lock(&self.inflight).insert(token, held);
                        Err(e)
                    }
                }
            }
        }
    }

    /// Releases (nacks) what the handle `owner` still holds.
    fn release_owner(&self, owner: u64) {
        let released: Vec<InFlight> = {
            let mut map = lock(&self.inflight);
            let keys: Vec<u64> = map
                .iter()
                .filter(|(_, i)| i.owner == owner)
                .map(|(k, _)| *k)
                .collect();
            keys.iter().filter_map(|k| map.remove(k)).collect()
        };
        for i in released {
            i.handler.nack();
        }
    }
}

async fn ack(handler: Handler) -> Result<()> {
    match handler {
        Handler::ExactlyOnce(h) => h.confirmed_ack().await.map_err(ack_error),
        other => {
            other.ack();
            Ok(())
        }
    }
}

fn message_size(m: &Message) -> usize {
    m.data.len()
        + m.attributes
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
}

fn timestamp(t: &google_cloud_wkt::Timestamp) -> DateTime<Utc> {
    DateTime::from_timestamp(t.seconds(), t.nanos().max(0) as u32).unwrap_or_default()
}

/// Releases messages whose cloudbus lease (or nack delay) has passed.
async fn reap(inner: Weak<Inner>) {
    loop {
        tokio::time::sleep(REAPER_TICK).await;
        let Some(inner) = inner.upgrade() else { return };
        let now = Instant::now();
        let expired: Vec<InFlight> = {
            let mut map = lock(&inner.inflight);
            let keys: Vec<u64> = map
                .iter()
                .filter(|(_, i)| i.deadline <= now)
                .map(|(k, _)| *k)
                .collect();
            keys.iter().filter_map(|k| map.remove(k)).collect()
        };
        for i in expired {
            i.handler.nack();
        }
    }
}

/// The streaming pulls of one bus: the emulator keeps streams that went away alive
/// for a while and may deliver to them, so a bus opens one stream per subscription
/// and keeps it while any handle on it is alive, and one reader per dead-letter
/// subscription.
pub(crate) struct Pulls {
    shared: Arc<PubSubContext>,
    /// One reader per dead-letter subscription, so that peek, redrive and purge share
    /// one stream (a stream dropped at the emulator keeps its messages leased).
    dead_letter_readers: Mutex<HashMap<String, Arc<PubSubSubscription>>>,
    /// The streaming pull of each subscription, while a handle on it is alive.
    streams: Mutex<HashMap<String, Weak<Inner>>>,
}

impl Pulls {
    pub(crate) fn new(shared: Arc<PubSubContext>) -> Self {
        Pulls {
            shared,
            dead_letter_readers: Mutex::new(HashMap::new()),
            streams: Mutex::new(HashMap::new()),
        }
    }

    fn stream_of(&self, name: &str, open: impl FnOnce() -> Arc<Inner>) -> Arc<Inner> {
        let mut map = lock(&self.streams);
        if let Some(inner) = map.get(name).and_then(|w| w.upgrade()) {
            return inner;
        }
        let inner = open();
        map.insert(name.to_owned(), Arc::downgrade(&inner));
        inner
    }

    fn dead_letter_reader(&self, name: &str) -> Arc<PubSubSubscription> {
        lock(&self.dead_letter_readers)
            .entry(name.to_owned())
            .or_insert_with(|| Arc::new(PubSubSubscription::new(self, name)))
            .clone()
    }
}

/// A Pub/Sub subscription as a cloudbus [`SubscriptionDriver`]: one handle on the
/// subscription's shared streaming pull.
pub struct PubSubSubscription {
    inner: Arc<Inner>,
    id: u64,
    closed: AtomicBool,
}

static NEXT_HANDLE: AtomicU64 = AtomicU64::new(1);

impl PubSubSubscription {
    pub(crate) fn new(pulls: &Pulls, name: &str) -> Self {
        let shared = &pulls.shared;
        let inner = pulls.stream_of(name, || {
            Arc::new(Inner {
                path: shared.config.subscription_path(name),
                codec: shared.config.codec(),
                shared: shared.clone(),
                name: name.to_owned(),
                settings: OnceCell::new(),
                rx: tokio::sync::Mutex::new(None),
                pump: Mutex::new(None),
                inflight: Mutex::new(HashMap::new()),
                next_token: AtomicU64::new(1),
                reaping: AtomicBool::new(false),
            })
        });
        PubSubSubscription {
            inner,
            id: NEXT_HANDLE.fetch_add(1, Ordering::Relaxed),
            closed: AtomicBool::new(false),
        }
    }

    /// The subscription's resource name (`projects/P/subscriptions/S`).
    pub fn path(&self) -> &str {
        &self.inner.path
    }

    async fn pull(&self, max: usize, wait: Duration) -> Result<Vec<Held>> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::closed(format!(
                "subscription {} is closed",
                self.inner.name
            )));
        }
        self.inner.pull(self.id, max, wait).await
    }
}

impl Drop for PubSubSubscription {
    fn drop(&mut self) {
        self.inner.release_owner(self.id);
    }
}

#[async_trait]
impl SubscriptionDriver for PubSubSubscription {
    async fn receive_batch(&self, max: usize, wait: Duration) -> Result<Vec<ReceivedMessage>> {
        let held = self.pull(max, wait).await?;
        let lease = self.inner.settings().await?.lease;
        Ok(held
            .into_iter()
            .map(|h| {
                let size = message_size(&h.message);
                ReceivedMessage {
                    event: self.inner.decode(&h.message).map(Arc::new),
                    token: AckToken::Number(h.token),
                    attempt: h.attempt,
                    lease: Some(lease),
                    published_at: h.message.publish_time.as_ref().map(timestamp),
                    ordering_key: Some(h.message.ordering_key.clone()).filter(|k| !k.is_empty()),
                    size,
                    partition: None,
                    offset: None,
                }
            })
            .collect())
    }

    async fn settle_batch(&self, items: &[(AckToken, Settlement)]) -> Result<BatchResults> {
        let futures = items
            .iter()
            .map(|(token, settlement)| self.inner.settle_one(token, settlement));
        Ok(futures::future::join_all(futures).await)
    }

    fn capabilities(&self) -> Capabilities {
        capabilities(self.inner.shared.config.anonymous)
    }

    /// Releases what this handle holds; the stream stays open for other handles and
    /// closes when the last one is dropped.
    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        self.inner.release_owner(self.id);
        Ok(())
    }
}

/// The dead-letter place of a subscription: its dead-letter topic, read through the
/// subscription `ensure` made on it. Redrive publishes each letter back to the
/// source topic addressed to the source subscription only, then acks it (a crash
/// in between gives a duplicate, never a loss).
pub struct PubSubDeadLetters {
    source: String,
    reader: Arc<PubSubSubscription>,
    shared: Arc<PubSubContext>,
}

/// How long a dead-letter read waits for the first letter, then for each next one.
const FIRST_LETTER_WAIT: Duration = Duration::from_millis(1500);
const NEXT_LETTER_WAIT: Duration = Duration::from_millis(300);

impl PubSubDeadLetters {
    pub(crate) fn new(pulls: &Pulls, subscription: &str) -> Self {
        PubSubDeadLetters {
            source: subscription.to_owned(),
            reader: pulls.dead_letter_reader(&dead_letter_name(subscription)),
            shared: pulls.shared.clone(),
        }
    }

    /// Pulls letters until `max` or until none arrives for a moment.
    async fn collect(&self, max: usize) -> Result<Vec<Held>> {
        let mut out: Vec<Held> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        while out.len() < max {
            let wait = if out.is_empty() {
                FIRST_LETTER_WAIT
            } else {
                NEXT_LETTER_WAIT
            };
            let got = self.reader.pull(max - out.len(), wait).await?;
            if got.is_empty() {
                break;
            }
            for h in got {
                if seen.insert(h.message.message_id.clone()) {
                    out.push(h);
                } else {
                    self.reader
                        .inner
                        .settle_one(
                            &AckToken::Number(h.token),
                            &Settlement::Nack {
                                delay: Duration::ZERO,
                            },
                        )
                        .await?;
                }
            }
        }
        Ok(out)
    }

    fn letter(&self, h: &Held) -> DeadLetter {
        let a = &h.message.attributes;
        let attempts = a
            .get(DL_DELIVERY_COUNT)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let reason = a.get(DL_REASON).cloned().or_else(|| {
            a.contains_key(DL_SOURCE_SUBSCRIPTION)
                .then(|| format!("max delivery attempts ({attempts}) exceeded"))
        });
        let payload = match self.reader.inner.decode(&h.message) {
            Ok(e) => Payload::Event(Arc::new(e)),
            Err((raw, _)) => Payload::Raw(raw),
        };
        DeadLetter {
            payload,
            reason,
            description: a.get(DL_DESCRIPTION).cloned(),
            source_entity: a.get(DL_SOURCE_SUBSCRIPTION).cloned(),
            attempts,
            dead_lettered_at: a
                .get(DL_TIME)
                .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.with_timezone(&Utc))
                .or_else(|| h.message.publish_time.as_ref().map(timestamp)),
        }
    }

    async fn release(&self, held: &[Held], settlement: Settlement) -> Result<()> {
        for h in held {
            self.reader
                .inner
                .settle_one(&AckToken::Number(h.token), &settlement)
                .await?;
        }
        Ok(())
    }
}

#[async_trait]
impl DeadLetterDriver for PubSubDeadLetters {
    async fn peek(&self, max: usize) -> Result<Vec<DeadLetter>> {
        let held = self.collect(max).await?;
        let letters = held.iter().map(|h| self.letter(h)).collect();
        self.release(
            &held,
            Settlement::Nack {
                delay: Duration::ZERO,
            },
        )
        .await?;
        Ok(letters)
    }

    async fn redrive(&self, max: Option<usize>) -> Result<usize> {
        let source = read_settings(&self.shared, &self.source).await?;
        let publisher = self.shared.publisher(&source.topic_path).await?;
        let held = self.collect(max.unwrap_or(usize::MAX)).await?;
        let mut moved = 0;
        let mut first_error = None;
        for h in &held {
            let attributes: BTreeMap<String, String> = h
                .message
                .attributes
                .iter()
                .filter(|(k, _)| {
                    !k.starts_with("CloudPubSubDeadLetter")
                        && !k.starts_with("cloudbus-dead-letter")
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .chain([(REDRIVE_ATTRIBUTE.to_owned(), self.source.clone())])
                .collect();
            let raw = RawMessage {
                body: h.message.data.to_vec(),
                attributes,
            };
            let key = Some(h.message.ordering_key.as_str()).filter(|k| !k.is_empty());
            if let Some(k) = key {
                publisher.resume_publish(k);
            }
            let fut = publisher.publish(to_message(raw, key));
            publisher.flush().await;
            let token = AckToken::Number(h.token);
            match fut.await {
                Ok(_) => {
                    self.reader
                        .inner
                        .settle_one(&token, &Settlement::Ack)
                        .await?;
                    moved += 1;
                }
                Err(e) => {
                    self.reader
                        .inner
                        .settle_one(
                            &token,
                            &Settlement::Nack {
                                delay: Duration::ZERO,
                            },
                        )
                        .await?;
                    first_error.get_or_insert(publish_error(e, "redrive"));
                }
            }
        }
        match first_error {
            Some(e) if moved == 0 => Err(e),
            _ => Ok(moved),
        }
    }

    async fn purge(&self, max: Option<usize>) -> Result<usize> {
        let held = self.collect(max.unwrap_or(usize::MAX)).await?;
        self.release(&held, Settlement::Ack).await?;
        Ok(held.len())
    }
}
