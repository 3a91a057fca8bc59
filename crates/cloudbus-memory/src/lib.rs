//! cloudbus-memory: the embedded, in-process broker that cloudbus uses by default.
//!
//! Topics fan out to subscriptions (each with an optional [`Filter`]); consumers of
//! one subscription compete for its messages; leases (ack deadlines) expire into
//! redelivery; delivery attempts are counted; a dead-letter list per subscription
//! supports peek, redrive and purge; ordering keys are delivered in order per key and
//! in parallel across keys; publishing can delay delivery; topics keep their last
//! events (`BrokerConfig::retained_per_topic`) so that `Bus::replay` can deliver them
//! again to one subscription; partitioned logs support replay by offset or time. Everything is bounded: a full subscription, dead-letter
//! list or log partition refuses work with [`ErrorKind::ResourceExhausted`].
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use cloudbus_driver::{EventBuilder, SubscriptionSpec};
//! use cloudbus_memory::MemoryBroker;
//! let bus = MemoryBroker::new().bus();
//! bus.ensure_topic("orders").await.unwrap();
//! bus.ensure_subscription(&SubscriptionSpec::new("orders", "billing")).await.unwrap();
//! let publisher = bus.publisher("orders").await.unwrap();
//! publisher.publish(EventBuilder::new("order.created", "/shop").build().unwrap()).await.unwrap();
//! let delivery = bus.consumer("orders", "billing").await.unwrap().receive().await.unwrap();
//! delivery.ack().await.unwrap();
//! # });
//! ```

mod log;
mod queue;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::Utc;
use cloudbus_core::Bus;
use cloudbus_driver::config::UrlParams;
use cloudbus_driver::scheme::Scheme;
use cloudbus_driver::{
    AckToken, BatchResults, BinaryCodec, BusDriver, Capabilities, DeadLetter, DeadLetterDriver,
    Error, ErrorKind, Missing, OutgoingMessage, Payload, ReceivedMessage, Result, Settlement,
    StreamDriver, SubscriptionDriver, SubscriptionSpec, SubscriptionState, TopicDriver,
    TopologyDriver, TopologyPlanning,
};
use tokio::sync::Notify;

pub use cloudbus_driver::Filter;

use crate::log::{Log, LogReader};
use crate::queue::{Limits, Msg, SubState};

/// Limits and sizes of a [`MemoryBroker`].
#[derive(Clone, Debug)]
pub struct BrokerConfig {
    /// Messages a subscription holds (ready, delayed, in flight) before publishing fails.
    pub max_messages_per_subscription: usize,
    /// Bytes a subscription holds before publishing fails.
    pub max_bytes_per_subscription: usize,
    /// Dead letters a subscription keeps before dead-lettering fails.
    pub max_dead_letters: usize,
    /// Largest event accepted.
    pub max_message_bytes: usize,
    /// Most events per send.
    pub max_batch_count: usize,
    /// Most bytes per send.
    pub max_batch_bytes: usize,
    /// Records a log partition holds before appends fail.
    pub max_log_records_per_partition: usize,
    /// Published events a topic keeps for `Bus::replay` (the oldest go first); 0
    /// turns replay off.
    pub retained_per_topic: usize,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            max_messages_per_subscription: 1_000_000,
            max_bytes_per_subscription: 1024 * 1024 * 1024,
            max_dead_letters: 100_000,
            max_message_bytes: 1024 * 1024,
            max_batch_count: 1000,
            max_batch_bytes: 16 * 1024 * 1024,
            max_log_records_per_partition: 1_000_000,
            retained_per_topic: 10_000,
        }
    }
}

struct Subscription {
    name: String,
    state: Mutex<SubState>,
    notify: Notify,
}

impl Subscription {
    fn lock(&self) -> Result<MutexGuard<'_, SubState>> {
        self.state
            .lock()
            .map_err(|_| Error::new(ErrorKind::Internal, "subscription lock poisoned"))
    }
}

struct Topic {
    subscriptions: RwLock<Vec<Arc<Subscription>>>,
    /// The last published events, for replay.
    retained: Mutex<std::collections::VecDeque<Retained>>,
}

/// A published event kept for replay.
struct Retained {
    message: OutgoingMessage,
    published_at: chrono::DateTime<Utc>,
}

struct BrokerInner {
    config: BrokerConfig,
    topics: RwLock<HashMap<String, Arc<Topic>>>,
    logs: RwLock<HashMap<String, Arc<Log>>>,
    codec: BinaryCodec,
}

/// The scheme this crate opens: `mem://NAME` is the broker called NAME (`mem://` the
/// one called `default`), shared by every bus of the process opened with that name.
/// It takes no parameters.
pub fn schemes() -> Vec<Scheme> {
    vec![Scheme {
        name: "mem",
        open: |url| {
            Box::pin(async move {
                UrlParams::parse(&url, &[])?;
                let name = url
                    .host_str()
                    .filter(|h| !h.is_empty())
                    .unwrap_or("default");
                Ok(Arc::new(MemoryBroker::named(name)) as Arc<dyn BusDriver>)
            })
        },
    }]
}

/// An in-process broker. Cheap to clone; clones share state.
///
/// It is the bus driver of the buses over it, so a [`Bus`] reaches it with
/// `(**bus.driver()).as_any().downcast_ref::<MemoryBroker>()` (with
/// `cloudbus_driver::AsAny` in scope).
#[derive(Clone)]
pub struct MemoryBroker {
    inner: Arc<BrokerInner>,
}

impl std::fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBroker")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl Default for MemoryBroker {
    fn default() -> Self {
        Self::new()
    }
}

fn poisoned() -> Error {
    Error::new(ErrorKind::Internal, "memory broker lock poisoned")
}

impl MemoryBroker {
    /// A broker with default limits.
    pub fn new() -> Self {
        Self::with_config(BrokerConfig::default())
    }

    /// A broker with these limits.
    pub fn with_config(config: BrokerConfig) -> Self {
        MemoryBroker {
            inner: Arc::new(BrokerInner {
                config,
                topics: RwLock::new(HashMap::new()),
                logs: RwLock::new(HashMap::new()),
                codec: BinaryCodec::default(),
            }),
        }
    }

    /// The process-wide broker called `name` (what `mem://name` opens), created on
    /// first use.
    pub fn named(name: &str) -> MemoryBroker {
        static REGISTRY: OnceLock<Mutex<HashMap<String, MemoryBroker>>> = OnceLock::new();
        let registry = REGISTRY.get_or_init(|| Mutex::new(HashMap::new()));
        let mut map = match registry.lock() {
            Ok(m) => m,
            Err(p) => p.into_inner(),
        };
        map.entry(name.to_owned()).or_default().clone()
    }

    /// The limits.
    pub fn config(&self) -> &BrokerConfig {
        &self.inner.config
    }

    /// A [`Bus`] over this broker.
    pub fn bus(&self) -> Bus {
        Bus::new(Arc::new(self.clone()))
    }

    /// What the broker supports.
    pub fn capabilities(&self) -> Capabilities {
        let c = &self.inner.config;
        let mut caps =
            Capabilities::broker(c.max_message_bytes, c.max_batch_count, c.max_batch_bytes);
        caps.replay = c.retained_per_topic > 0;
        caps
    }

    /// Creates the partitioned log `name` with `partitions` partitions, if missing.
    /// Publishers opened on `name` then append to it.
    pub fn ensure_log(&self, name: &str, partitions: usize) -> Result<()> {
        let mut logs = self.inner.logs.write().map_err(|_| poisoned())?;
        logs.entry(name.to_owned()).or_insert_with(|| {
            Arc::new(Log::new(
                partitions,
                self.inner.config.max_log_records_per_partition,
            ))
        });
        Ok(())
    }

    fn find_topic(&self, name: &str) -> Result<Arc<Topic>> {
        self.inner
            .topics
            .read()
            .map_err(|_| poisoned())?
            .get(name)
            .cloned()
            .ok_or_else(|| Error::not_found(format!("topic {name:?} does not exist")))
    }

    fn log(&self, name: &str) -> Result<Option<Arc<Log>>> {
        Ok(self
            .inner
            .logs
            .read()
            .map_err(|_| poisoned())?
            .get(name)
            .cloned())
    }

    fn find_subscription(&self, topic: &str, name: &str) -> Result<Arc<Subscription>> {
        let t = self.find_topic(topic)?;
        let subs = t.subscriptions.read().map_err(|_| poisoned())?;
        subs.iter()
            .find(|s| s.name == name)
            .cloned()
            .ok_or_else(|| {
                Error::not_found(format!(
                    "subscription {name:?} of topic {topic:?} does not exist"
                ))
            })
    }

    fn limits(&self) -> Limits {
        let c = &self.inner.config;
        Limits {
            max_messages: c.max_messages_per_subscription,
            max_bytes: c.max_bytes_per_subscription,
            max_dead_letters: c.max_dead_letters,
        }
    }

    /// Fans a batch out to every subscription whose filter matches, all or nothing:
    /// when any subscription lacks room, nothing is added and every event fails with
    /// a retryable [`ErrorKind::ResourceExhausted`].
    fn publish(&self, topic: &str, batch: &[OutgoingMessage]) -> Result<BatchResults> {
        if let Some(log) = self.log(topic)? {
            return Ok(log.append(batch));
        }
        let topic = self.find_topic(topic)?;
        let max = self.inner.config.max_message_bytes;
        let results: Vec<Result<()>> = batch
            .iter()
            .map(|m| {
                if m.size > max {
                    Err(Error::new(
                        ErrorKind::TooLarge,
                        format!("event {} is {} bytes, over {max}", m.id(), m.size),
                    ))
                } else {
                    Ok(())
                }
            })
            .collect();
        let subs = topic.subscriptions.read().map_err(|_| poisoned())?.clone();
        // Lock every subscription (always in the same order) so the check and the
        // insert are one step.
        let mut guards = Vec::with_capacity(subs.len());
        for s in &subs {
            guards.push(s.lock()?);
        }
        let accepted = || {
            batch
                .iter()
                .zip(&results)
                .filter(|(_, r)| r.is_ok())
                .map(|(m, _)| m)
        };
        for (s, g) in subs.iter().zip(&guards) {
            let (n, bytes) = accepted()
                .filter(|m| matches_filter(&g.spec, m))
                .fold((0, 0), |(n, b), m| (n + 1, b + m.size));
            if !g.has_room(n, bytes) {
                return Ok(batch
                    .iter()
                    .map(|_| {
                        Err(Error::new(
                            ErrorKind::ResourceExhausted,
                            format!("subscription {:?} is full", s.name),
                        ))
                    })
                    .collect());
            }
        }
        let now = Instant::now();
        let published_at = Utc::now();
        let mut woke = vec![false; subs.len()];
        for (i, g) in guards.iter_mut().enumerate() {
            for m in accepted() {
                if !matches_filter(&g.spec, m) {
                    continue;
                }
                let msg = Msg {
                    payload: m.payload.clone(),
                    size: m.size,
                    key: m.ordering_key.as_deref().map(Arc::from),
                    attempts: 0,
                    not_before: m.delay.filter(|d| !d.is_zero()).map(|d| now + d),
                    is_head: false,
                    seq: 0, // assigned by the subscription
                    published_at,
                };
                woke[i] |= g.publish(msg, now);
            }
        }
        drop(guards);
        for (s, w) in subs.iter().zip(woke) {
            if w {
                s.notify.notify_waiters();
            }
        }
        let keep = self.inner.config.retained_per_topic;
        if keep > 0 {
            let mut retained = topic.retained.lock().map_err(|_| poisoned())?;
            for m in accepted() {
                if retained.len() == keep {
                    retained.pop_front();
                }
                retained.push_back(Retained {
                    message: m.clone(),
                    published_at,
                });
            }
        }
        Ok(results)
    }

    /// Delivers again to subscription `name` the retained events of `topic` published
    /// from `since` on that its filter matches.
    fn replay(&self, topic: &str, name: &str, since: chrono::DateTime<Utc>) -> Result<()> {
        let topic_ref = self.find_topic(topic)?;
        let sub = topic_ref
            .subscriptions
            .read()
            .map_err(|_| poisoned())?
            .iter()
            .find(|s| s.name == name)
            .cloned()
            .ok_or_else(|| {
                Error::not_found(format!("subscription {name:?} of {topic:?} does not exist"))
            })?;
        let again: Vec<(OutgoingMessage, chrono::DateTime<Utc>)> = topic_ref
            .retained
            .lock()
            .map_err(|_| poisoned())?
            .iter()
            .filter(|r| r.published_at >= since)
            .map(|r| (r.message.clone(), r.published_at))
            .collect();
        let mut state = sub.lock()?;
        let again: Vec<_> = again
            .into_iter()
            .filter(|(m, _)| matches_filter(&state.spec, m))
            .collect();
        let bytes = again.iter().map(|(m, _)| m.size).sum();
        if !state.has_room(again.len(), bytes) {
            return Err(Error::new(
                ErrorKind::ResourceExhausted,
                format!(
                    "subscription {name:?} has no room for {} replayed events",
                    again.len()
                ),
            ));
        }
        let now = Instant::now();
        let mut woke = false;
        for (m, published_at) in again {
            let msg = Msg {
                payload: m.payload.clone(),
                size: m.size,
                key: m.ordering_key.as_deref().map(Arc::from),
                attempts: 0,
                not_before: None,
                is_head: false,
                seq: 0,
                published_at,
            };
            woke |= state.publish(msg, now);
        }
        drop(state);
        if woke {
            sub.notify.notify_waiters();
        }
        Ok(())
    }
}

fn matches_filter(spec: &SubscriptionSpec, m: &OutgoingMessage) -> bool {
    match (&spec.filter, &m.payload) {
        (Some(f), Payload::Event(e)) => f.matches(e),
        // Raw messages cannot be filtered; they reach the consumer, which dead-letters them.
        _ => true,
    }
}

#[async_trait]
impl BusDriver for MemoryBroker {
    fn scheme(&self) -> &str {
        "mem"
    }
    async fn topic(&self, topic: &str) -> Result<Arc<dyn TopicDriver>> {
        Ok(Arc::new(MemoryTopic {
            broker: self.clone(),
            name: topic.to_owned(),
            closed: std::sync::atomic::AtomicBool::new(false),
        }))
    }
    async fn subscription(
        &self,
        topic: &str,
        subscription: &str,
    ) -> Result<Arc<dyn SubscriptionDriver>> {
        Ok(Arc::new(MemorySubscription {
            broker: self.clone(),
            topic: topic.to_owned(),
            name: subscription.to_owned(),
            resolved: OnceLock::new(),
            closed: std::sync::atomic::AtomicBool::new(false),
        }))
    }
    async fn dead_letters(
        &self,
        topic: &str,
        subscription: &str,
    ) -> Result<Arc<dyn DeadLetterDriver>> {
        Ok(Arc::new(MemoryDeadLetters {
            sub: self.find_subscription(topic, subscription)?,
            source: format!("{topic}/{subscription}"),
        }))
    }
    fn topology(&self) -> Arc<dyn TopologyDriver> {
        Arc::new(MemoryTopology {
            broker: self.clone(),
        })
    }
    async fn stream(&self, stream: &str) -> Result<Arc<dyn StreamDriver>> {
        let log = self
            .log(stream)?
            .ok_or_else(|| Error::not_found(format!("log {stream:?} does not exist")))?;
        Ok(Arc::new(LogReader {
            log,
            codec: self.inner.codec.clone(),
        }))
    }
}

/// The topic driver: sends to a topic (or a log of the same name).
pub struct MemoryTopic {
    broker: MemoryBroker,
    name: String,
    closed: std::sync::atomic::AtomicBool,
}

#[async_trait]
impl TopicDriver for MemoryTopic {
    async fn send_batch(&self, batch: &[OutgoingMessage]) -> Result<BatchResults> {
        if self.closed.load(std::sync::atomic::Ordering::Acquire) {
            return Err(Error::closed("topic is closed"));
        }
        self.broker.publish(&self.name, batch)
    }
    fn capabilities(&self) -> Capabilities {
        self.broker.capabilities()
    }
    async fn close(&self) -> Result<()> {
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        Ok(())
    }
}

impl MemoryTopic {
    /// The broker behind this topic (escape hatch).
    pub fn broker(&self) -> &MemoryBroker {
        &self.broker
    }
}

/// The subscription driver.
pub struct MemorySubscription {
    broker: MemoryBroker,
    topic: String,
    name: String,
    resolved: OnceLock<Arc<Subscription>>,
    closed: std::sync::atomic::AtomicBool,
}

impl MemorySubscription {
    fn sub(&self) -> Result<&Arc<Subscription>> {
        if let Some(s) = self.resolved.get() {
            return Ok(s);
        }
        let s = self.broker.find_subscription(&self.topic, &self.name)?;
        Ok(self.resolved.get_or_init(|| s))
    }

    fn lock_live(&self) -> Result<MutexGuard<'_, SubState>> {
        let state = self.sub()?.lock()?;
        if state.deleted {
            return Err(Error::not_found(format!(
                "subscription {:?} was deleted",
                self.name
            )));
        }
        Ok(state)
    }

    /// The broker behind this subscription (escape hatch).
    pub fn broker(&self) -> &MemoryBroker {
        &self.broker
    }
}

#[async_trait]
impl SubscriptionDriver for MemorySubscription {
    async fn receive_batch(&self, max: usize, wait: Duration) -> Result<Vec<ReceivedMessage>> {
        let deadline = Instant::now() + wait;
        let sub = self.sub()?.clone();
        loop {
            if self.closed.load(std::sync::atomic::Ordering::Acquire) {
                return Err(Error::closed("subscription is closed"));
            }
            let notified = sub.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = Instant::now();
            let (taken, lease, next_wake) = {
                let mut state = self.lock_live()?;
                let taken = state.take(max, now);
                (taken, state.spec.lease, state.next_wake())
            };
            if !taken.is_empty() {
                let codec = &self.broker.inner.codec;
                return Ok(taken
                    .into_iter()
                    .map(|t| ReceivedMessage {
                        event: match t.payload {
                            Payload::Event(e) => Ok(e),
                            Payload::Raw(raw) => match codec.decode(&raw) {
                                Ok(e) => Ok(Arc::new(e)),
                                Err(err) => Err((raw, err)),
                            },
                        },
                        token: AckToken::Number(t.token),
                        attempt: t.attempt,
                        lease: Some(lease),
                        published_at: Some(t.published_at),
                        ordering_key: t.key.map(|k| k.to_string()),
                        size: t.size,
                        partition: None,
                        offset: None,
                    })
                    .collect());
            }
            if now >= deadline {
                return Ok(Vec::new());
            }
            let wake = next_wake.map_or(deadline, |w| w.min(deadline));
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
        }
    }

    async fn settle_batch(&self, items: &[(AckToken, Settlement)]) -> Result<BatchResults> {
        let sub = self.sub()?;
        let now = Instant::now();
        let mut woke = false;
        let results = {
            let mut state = self.lock_live()?;
            items
                .iter()
                .map(|(token, s)| {
                    let t = token
                        .as_number()
                        .ok_or_else(|| Error::invalid("not a memory broker token"))?;
                    let w = state.settle(t, s, now)?;
                    woke |= w;
                    Ok(())
                })
                .collect()
        };
        if woke {
            sub.notify.notify_waiters();
        }
        Ok(results)
    }

    fn capabilities(&self) -> Capabilities {
        self.broker.capabilities()
    }

    async fn queue_depth(&self) -> Option<u64> {
        self.lock_live().ok().map(|s| s.depth() as u64)
    }

    async fn close(&self) -> Result<()> {
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        if let Some(s) = self.resolved.get() {
            s.notify.notify_waiters();
        }
        Ok(())
    }
}

struct MemoryDeadLetters {
    sub: Arc<Subscription>,
    source: String,
}

#[async_trait]
impl DeadLetterDriver for MemoryDeadLetters {
    async fn peek(&self, max: usize) -> Result<Vec<DeadLetter>> {
        Ok(self.sub.lock()?.peek_dead(max, &self.source))
    }
    async fn redrive(&self, max: Option<usize>) -> Result<usize> {
        let (n, woke) = self.sub.lock()?.redrive(max, Instant::now())?;
        if woke {
            self.sub.notify.notify_waiters();
        }
        Ok(n)
    }
    async fn purge(&self, max: Option<usize>) -> Result<usize> {
        Ok(self.sub.lock()?.purge_dead(max))
    }
}

struct MemoryTopology {
    broker: MemoryBroker,
}

/// The broker evaluates the portable filter itself, so its native form is the
/// filter's JSON.
fn state_of(spec: &SubscriptionSpec) -> SubscriptionState {
    SubscriptionState {
        filter: spec
            .filter
            .as_ref()
            .map(|f| serde_json::to_string(f).unwrap_or_else(|_| format!("{f:?}"))),
        max_delivery_attempts: Some(spec.max_delivery_attempts.unwrap_or(0)),
        lease: Some(spec.lease),
        ordered: Some(spec.ordered),
    }
}

#[async_trait]
impl TopologyDriver for MemoryTopology {
    async fn ensure_topic(&self, topic: &str) -> Result<()> {
        let mut topics = self.broker.inner.topics.write().map_err(|_| poisoned())?;
        topics.entry(topic.to_owned()).or_insert_with(|| {
            Arc::new(Topic {
                subscriptions: RwLock::new(Vec::new()),
                retained: Mutex::new(std::collections::VecDeque::new()),
            })
        });
        Ok(())
    }

    async fn ensure_subscription(&self, spec: &SubscriptionSpec) -> Result<()> {
        if spec.lease.is_zero() {
            return Err(Error::invalid("the subscription's lease must be positive"));
        }
        if spec.max_delivery_attempts == Some(0) {
            return Err(Error::invalid("max_delivery_attempts must be at least 1"));
        }
        let topic = self.broker.find_topic(&spec.topic)?;
        let mut subs = topic.subscriptions.write().map_err(|_| poisoned())?;
        if let Some(existing) = subs.iter().find(|s| s.name == spec.name) {
            existing.lock()?.spec = spec.clone();
            return Ok(());
        }
        subs.push(Arc::new(Subscription {
            name: spec.name.clone(),
            state: Mutex::new(SubState::new(spec.clone(), self.broker.limits())),
            notify: Notify::new(),
        }));
        Ok(())
    }

    async fn replay(&self, topic: &str, name: &str, since: chrono::DateTime<Utc>) -> Result<()> {
        self.broker.replay(topic, name, since)
    }

    async fn delete_subscription(&self, topic: &str, name: &str) -> Result<()> {
        let topic = self.broker.find_topic(topic)?;
        let mut subs = topic.subscriptions.write().map_err(|_| poisoned())?;
        if let Some(pos) = subs.iter().position(|s| s.name == name) {
            let sub = subs.remove(pos);
            sub.lock()?.deleted = true;
            sub.notify.notify_waiters();
        }
        Ok(())
    }

    /// The broker describes its subscriptions and changes them in place.
    fn planning(&self) -> Option<&dyn TopologyPlanning> {
        Some(self)
    }
}

#[async_trait]
impl TopologyPlanning for MemoryTopology {
    async fn topic_exists(&self, topic: &str) -> Result<bool> {
        let topics = self.broker.inner.topics.read().map_err(|_| poisoned())?;
        Ok(topics.contains_key(topic))
    }

    async fn describe_subscription(
        &self,
        topic: &str,
        name: &str,
    ) -> Result<Option<SubscriptionState>> {
        let Some(topic) = self.broker.find_topic(topic).missing_as_none()? else {
            return Ok(None);
        };
        let subs = topic.subscriptions.read().map_err(|_| poisoned())?;
        match subs.iter().find(|s| s.name == name) {
            Some(sub) => Ok(Some(state_of(&sub.lock()?.spec))),
            None => Ok(None),
        }
    }

    fn desired_state(&self, spec: &SubscriptionSpec) -> Result<SubscriptionState> {
        Ok(state_of(spec))
    }

    /// The broker keeps the spec as given: ensuring it again changes it in place.
    async fn update_subscription(&self, spec: &SubscriptionSpec) -> Result<()> {
        self.ensure_subscription(spec).await
    }
}
