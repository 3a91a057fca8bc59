//! Fault injection for the "nothing lost" promise: a wrapper around any provider's
//! drivers that injects, by seed, the faults a real network and a buggy driver
//! produce: transient errors, replies lost after the work was done, per-entry
//! failures, panics, slow calls, deliveries beyond what was asked for, and duplicate
//! sends and deliveries. [`ChaosHarness`] wraps a provider's [`Harness`] so that
//! [`nothing_lost_under_faults`] runs through it; [`Suite::chaos`](crate::Suite::chaos)
//! generates one test per [`FaultKind`].
//!
//! [`nothing_lost_in_a_stream_under_faults`] does the same for a provider's streams
//! (the reads of a [`StreamConsumer::run`](cloudbus_core::StreamConsumer::run) and the
//! stream's publisher), and [`Suite::stream_chaos`](crate::Suite::stream_chaos)
//! generates its tests.
//!
//! The promise checked: every event whose `publish` resolved `Ok` is handled at least
//! once (duplicates are allowed and counted), none is dead-lettered, and the run ends.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::harness::{Harness, StreamHarness};
use cloudbus_core::bus::Bus;
use cloudbus_core::capabilities::Capabilities;
use cloudbus_core::driver::{
    AckToken, BatchResults, BusDriver, DeadLetterDriver, OutgoingMessage, ReceivedMessage,
    Settlement, SubscriptionDriver, SubscriptionSpec, TopicDriver, TopologyDriver,
};
use cloudbus_core::driver::{
    CheckpointStore, PartitionInfo, ReadBatch, StartPosition, StreamDriver,
};
use cloudbus_core::error::{Error, ErrorKind, Result};
use cloudbus_core::event::{AttributesReader, Event, EventBuilder};
use cloudbus_core::worker::{HandlerContext, HandlerError, WorkerOptions};

/// The kinds of fault the chaos driver injects; each has a preset [`Faults`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultKind {
    /// Calls fail with `Unavailable` before doing anything.
    TransientErrors,
    /// Calls do their work, then fail with `Unavailable` (the reply was lost).
    LostReplies,
    /// Some entries of a batch fail (`Unavailable`) and are not done.
    EntryFailures,
    /// The driver panics (before doing anything).
    Panics,
    /// Calls are delayed.
    SlowCalls,
    /// `receive_batch` returns more messages than asked for.
    OverFetch,
    /// Batches are sent twice and received messages handed out twice.
    Duplicates,
    /// All of the above at once, at lower rates.
    Mixed,
}

impl FaultKind {
    /// Every kind, for tables.
    pub const ALL: [FaultKind; 8] = [
        FaultKind::TransientErrors,
        FaultKind::LostReplies,
        FaultKind::EntryFailures,
        FaultKind::Panics,
        FaultKind::SlowCalls,
        FaultKind::OverFetch,
        FaultKind::Duplicates,
        FaultKind::Mixed,
    ];

    /// A short name, as used in test names and the README table.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::TransientErrors => "transient_errors",
            FaultKind::LostReplies => "lost_replies",
            FaultKind::EntryFailures => "entry_failures",
            FaultKind::Panics => "panics",
            FaultKind::SlowCalls => "slow_calls",
            FaultKind::OverFetch => "over_fetch",
            FaultKind::Duplicates => "duplicates",
            FaultKind::Mixed => "mixed",
        }
    }
}

/// Fault rates (each a probability per call, or per entry for `entry_failures`).
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Seed of the random choices; the same seed injects the same faults in the same
    /// order of calls.
    pub seed: u64,
    /// A call fails with `Unavailable` before doing anything.
    pub transient: f64,
    /// A call does its work, then fails with `Unavailable`.
    pub lost_reply: f64,
    /// An entry of a send or settle batch fails with `Unavailable` and is not done.
    pub entry_failure: f64,
    /// A call panics before doing anything.
    pub panic: f64,
    /// A call is delayed by up to `slow_by`.
    pub slow: f64,
    /// The longest delay of a slow call.
    pub slow_by: Duration,
    /// A receive asks the provider for up to twice as many messages as requested.
    pub over_fetch: f64,
    /// A successful send batch is sent a second time; a received message is handed
    /// out twice.
    pub duplicate: f64,
}

impl Faults {
    /// The preset of one fault kind.
    pub fn preset(kind: FaultKind, seed: u64) -> Self {
        let base = Faults {
            seed,
            slow_by: Duration::from_millis(200),
            ..Faults::default()
        };
        match kind {
            FaultKind::TransientErrors => Faults {
                transient: 0.2,
                ..base
            },
            FaultKind::LostReplies => Faults {
                lost_reply: 0.1,
                ..base
            },
            FaultKind::EntryFailures => Faults {
                entry_failure: 0.1,
                ..base
            },
            FaultKind::Panics => Faults { panic: 0.1, ..base },
            FaultKind::SlowCalls => Faults { slow: 0.3, ..base },
            FaultKind::OverFetch => Faults {
                over_fetch: 0.5,
                ..base
            },
            FaultKind::Duplicates => Faults {
                duplicate: 0.1,
                ..base
            },
            FaultKind::Mixed => Faults {
                transient: 0.05,
                lost_reply: 0.03,
                entry_failure: 0.03,
                panic: 0.02,
                slow: 0.1,
                over_fetch: 0.2,
                duplicate: 0.03,
                ..base
            },
        }
    }
}

/// Counts of injected faults.
#[derive(Debug, Default)]
pub struct Injected {
    /// Calls failed before doing anything.
    pub transient: AtomicU64,
    /// Calls whose reply was replaced by an error.
    pub lost_replies: AtomicU64,
    /// Entries failed.
    pub entry_failures: AtomicU64,
    /// Panics.
    pub panics: AtomicU64,
    /// Delayed calls.
    pub slow: AtomicU64,
    /// Receives that asked for more.
    pub over_fetches: AtomicU64,
    /// Batches sent twice and messages handed out twice.
    pub duplicates: AtomicU64,
}

impl Injected {
    /// A one-line summary.
    pub fn summary(&self) -> String {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        format!(
            "transient={} lost_replies={} entry_failures={} panics={} slow={} over_fetches={} duplicates={}",
            l(&self.transient),
            l(&self.lost_replies),
            l(&self.entry_failures),
            l(&self.panics),
            l(&self.slow),
            l(&self.over_fetches),
            l(&self.duplicates)
        )
    }
}

/// The shared dice and counters of one chaos bus.
struct Dice {
    faults: Faults,
    rng: Mutex<fastrand::Rng>,
    injected: Arc<Injected>,
}

impl Dice {
    fn roll(&self, p: f64) -> bool {
        p > 0.0 && self.rng.lock().map(|mut r| r.f64() < p).unwrap_or(false)
    }

    fn unavailable(what: &str) -> Error {
        Error::new(ErrorKind::Unavailable, format!("chaos: injected {what}"))
    }

    /// The faults that strike before a call: delay, panic, transient error.
    async fn before(&self, call: &str) -> Result<()> {
        if self.roll(self.faults.slow) {
            self.injected.slow.fetch_add(1, Ordering::Relaxed);
            let ms = self.faults.slow_by.as_millis().max(1) as u64;
            let by = self.rng.lock().map(|mut r| r.u64(..ms)).unwrap_or(ms);
            tokio::time::sleep(Duration::from_millis(by)).await;
        }
        if self.roll(self.faults.panic) {
            self.injected.panics.fetch_add(1, Ordering::Relaxed);
            panic!("chaos: injected panic in {call}");
        }
        if self.roll(self.faults.transient) {
            self.injected.transient.fetch_add(1, Ordering::Relaxed);
            return Err(Self::unavailable(&format!("transient error in {call}")));
        }
        Ok(())
    }

    /// After a call that did its work: maybe lose the reply.
    fn after<T>(&self, call: &str, result: Result<T>) -> Result<T> {
        if result.is_ok() && self.roll(self.faults.lost_reply) {
            self.injected.lost_replies.fetch_add(1, Ordering::Relaxed);
            return Err(Self::unavailable(&format!("lost reply of {call}")));
        }
        result
    }

    /// Which entries of a batch of `n` fail without being done.
    fn failing_entries(&self, n: usize) -> Vec<bool> {
        (0..n)
            .map(|_| {
                let fail = self.roll(self.faults.entry_failure);
                if fail {
                    self.injected.entry_failures.fetch_add(1, Ordering::Relaxed);
                }
                fail
            })
            .collect()
    }
}

/// Runs `call` on the entries not marked failing and fills the failing ones with an
/// injected error, keeping the order.
async fn with_entry_failures<T: Clone, F, Fut>(
    dice: &Dice,
    items: &[T],
    call: F,
) -> Result<BatchResults>
where
    F: FnOnce(Vec<T>) -> Fut,
    Fut: std::future::Future<Output = Result<BatchResults>>,
{
    let failing = dice.failing_entries(items.len());
    if !failing.iter().any(|f| *f) {
        return call(items.to_vec()).await;
    }
    let kept: Vec<T> = items
        .iter()
        .zip(&failing)
        .filter(|(_, f)| !**f)
        .map(|(i, _)| i.clone())
        .collect();
    let mut done = if kept.is_empty() {
        Vec::new()
    } else {
        call(kept).await?
    }
    .into_iter();
    Ok(failing
        .iter()
        .map(|f| {
            if *f {
                Err(Dice::unavailable("entry failure"))
            } else {
                done.next()
                    .unwrap_or_else(|| Err(Error::new(ErrorKind::Internal, "no result")))
            }
        })
        .collect())
}

/// A [`BusDriver`] that injects [`Faults`] into the topics, subscriptions and stream
/// reads of the bus it wraps (topology and dead letters pass through untouched).
///
/// ```
/// # async fn demo(inner: cloudbus_core::Bus) {
/// use cloudbus_conformance::chaos::{ChaosBus, FaultKind, Faults};
/// let chaos = ChaosBus::wrap(&inner, Faults::preset(FaultKind::Mixed, 7));
/// let publisher = chaos.publisher("orders").await;
/// # let _ = publisher;
/// # }
/// ```
pub struct ChaosBus {
    inner: Arc<dyn BusDriver>,
    dice: Arc<Dice>,
}

impl ChaosBus {
    /// A portable [`Bus`] over `inner` with `faults` injected.
    pub fn wrap(inner: &Bus, faults: Faults) -> Bus {
        Bus::new(Arc::new(Self::new(inner.driver().clone(), faults)))
    }

    /// The driver itself, for its [`injected`](Self::injected) counts.
    pub fn new(inner: Arc<dyn BusDriver>, faults: Faults) -> Self {
        ChaosBus {
            dice: Arc::new(Dice {
                rng: Mutex::new(fastrand::Rng::with_seed(faults.seed)),
                faults,
                injected: Arc::default(),
            }),
            inner,
        }
    }

    /// What was injected so far.
    pub fn injected(&self) -> Arc<Injected> {
        self.dice.injected.clone()
    }
}

#[async_trait]
impl BusDriver for ChaosBus {
    fn scheme(&self) -> &str {
        self.inner.scheme()
    }
    async fn topic(&self, topic: &str) -> Result<Arc<dyn TopicDriver>> {
        Ok(Arc::new(ChaosTopic {
            inner: self.inner.topic(topic).await?,
            dice: self.dice.clone(),
        }))
    }
    async fn subscription(
        &self,
        topic: &str,
        subscription: &str,
    ) -> Result<Arc<dyn SubscriptionDriver>> {
        Ok(Arc::new(ChaosSubscription {
            inner: self.inner.subscription(topic, subscription).await?,
            dice: self.dice.clone(),
        }))
    }
    async fn dead_letters(
        &self,
        topic: &str,
        subscription: &str,
    ) -> Result<Arc<dyn DeadLetterDriver>> {
        self.inner.dead_letters(topic, subscription).await
    }
    fn topology(&self) -> Arc<dyn TopologyDriver> {
        self.inner.topology()
    }
    async fn stream(&self, stream: &str) -> Result<Arc<dyn StreamDriver>> {
        Ok(Arc::new(ChaosStream {
            inner: self.inner.stream(stream).await?,
            dice: self.dice.clone(),
        }))
    }
}

struct ChaosTopic {
    inner: Arc<dyn TopicDriver>,
    dice: Arc<Dice>,
}

#[async_trait]
impl TopicDriver for ChaosTopic {
    async fn send_batch(&self, batch: &[OutgoingMessage]) -> Result<BatchResults> {
        self.dice.before("send_batch").await?;
        let inner = &self.inner;
        let sent = with_entry_failures(&self.dice, batch, |msgs| async move {
            inner.send_batch(&msgs).await
        })
        .await;
        if sent.is_ok() && self.dice.roll(self.dice.faults.duplicate) {
            self.dice
                .injected
                .duplicates
                .fetch_add(1, Ordering::Relaxed);
            let _ = self.inner.send_batch(batch).await;
        }
        self.dice.after("send_batch", sent)
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

/// A stream whose reads suffer the slow calls, panics, transient errors and lost
/// replies of the dice (a lost read reply is a read whose records never arrive).
struct ChaosStream {
    inner: Arc<dyn StreamDriver>,
    dice: Arc<Dice>,
}

#[async_trait]
impl StreamDriver for ChaosStream {
    async fn partitions(&self) -> Result<Vec<PartitionInfo>> {
        self.dice.before("partitions").await?;
        let listed = self.inner.partitions().await;
        self.dice.after("partitions", listed)
    }
    async fn cursor(&self, partition: &str, at: &StartPosition) -> Result<String> {
        self.dice.before("cursor").await?;
        let opened = self.inner.cursor(partition, at).await;
        self.dice.after("cursor", opened)
    }
    async fn read(&self, cursor: &str, max: usize) -> Result<ReadBatch> {
        self.dice.before("read").await?;
        let read = self.inner.read(cursor, max).await;
        self.dice.after("read", read)
    }
    fn checkpoints(&self) -> Option<Arc<dyn CheckpointStore>> {
        self.inner.checkpoints()
    }
}

struct ChaosSubscription {
    inner: Arc<dyn SubscriptionDriver>,
    dice: Arc<Dice>,
}

fn copy_of(m: &ReceivedMessage) -> ReceivedMessage {
    ReceivedMessage {
        event: m.event.clone(),
        token: m.token.clone(),
        attempt: m.attempt,
        lease: m.lease,
        published_at: m.published_at,
        ordering_key: m.ordering_key.clone(),
        size: m.size,
        partition: m.partition.clone(),
        offset: m.offset,
    }
}

#[async_trait]
impl SubscriptionDriver for ChaosSubscription {
    async fn receive_batch(&self, max: usize, wait: Duration) -> Result<Vec<ReceivedMessage>> {
        self.dice.before("receive_batch").await?;
        let ask = if self.dice.roll(self.dice.faults.over_fetch) {
            self.dice
                .injected
                .over_fetches
                .fetch_add(1, Ordering::Relaxed);
            max * 2 + 1
        } else {
            max
        };
        let mut got = self.inner.receive_batch(ask, wait).await;
        if let Ok(msgs) = &mut got
            && let Some(first) = msgs.first()
            && self.dice.roll(self.dice.faults.duplicate)
        {
            self.dice
                .injected
                .duplicates
                .fetch_add(1, Ordering::Relaxed);
            let copy = copy_of(first);
            msgs.push(copy);
        }
        self.dice.after("receive_batch", got)
    }
    async fn settle_batch(&self, items: &[(AckToken, Settlement)]) -> Result<BatchResults> {
        self.dice.before("settle_batch").await?;
        let inner = &self.inner;
        let settled = with_entry_failures(&self.dice, items, |items| async move {
            inner.settle_batch(&items).await
        })
        .await;
        self.dice.after("settle_batch", settled)
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn queue_depth(&self) -> Option<u64> {
        self.inner.queue_depth().await
    }
    async fn close(&self) -> Result<()> {
        self.inner.close().await
    }
}

/// A [`Harness`] whose buses inject the faults of one [`FaultKind`].
pub struct ChaosHarness<H> {
    inner: H,
    kind: FaultKind,
    seed: u64,
    injected: Mutex<Vec<Arc<Injected>>>,
}

impl<H: Harness> ChaosHarness<H> {
    /// Wraps `inner`; the seed is `CLOUDBUS_CHAOS_SEED` when set, else random (it is
    /// printed with the result, so a failure can be replayed).
    pub fn new(inner: H, kind: FaultKind) -> Self {
        let seed = std::env::var("CLOUDBUS_CHAOS_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| fastrand::u64(..));
        ChaosHarness {
            inner,
            kind,
            seed,
            injected: Mutex::default(),
        }
    }

    /// Wraps `inner` with the faults of `kind` drawn from `seed` (a regression case
    /// of a seed that once failed).
    pub fn with_seed(inner: H, kind: FaultKind, seed: u64) -> Self {
        ChaosHarness {
            inner,
            kind,
            seed,
            injected: Mutex::default(),
        }
    }

    /// The fault kind injected.
    pub fn kind(&self) -> FaultKind {
        self.kind
    }

    /// The seed of the faults.
    pub fn seed(&self) -> u64 {
        self.seed
    }
}

#[async_trait]
impl<H: Harness> Harness for ChaosHarness<H> {
    async fn bus(&self) -> Result<Bus> {
        let inner = self.inner.bus().await?;
        let chaos = ChaosBus::new(inner.driver().clone(), Faults::preset(self.kind, self.seed));
        if let Ok(mut all) = self.injected.lock() {
            all.push(chaos.injected());
        }
        Ok(Bus::new(Arc::new(chaos)))
    }
    fn patience(&self) -> Duration {
        self.inner.patience()
    }
    fn short_lease(&self) -> Duration {
        self.inner.short_lease()
    }
    fn unique(&self, prefix: &str) -> String {
        self.inner.unique(prefix)
    }
}

/// What one chaos run saw.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChaosReport {
    /// Events whose publish resolved `Ok`.
    pub published: usize,
    /// Publishes that resolved `Err` (a signal, not a loss).
    pub refused: usize,
    /// Distinct accepted events handled.
    pub received: usize,
    /// Extra handlings of an event handled before.
    pub duplicates: usize,
    /// Accepted events never handled (must be 0).
    pub lost: usize,
    /// Events dead-lettered although the handler never failed (must be 0).
    pub dead_lettered: usize,
}

/// Publishes `count` numbered events of type `ty` without waiting between them, then
/// awaits each and closes the publisher: the ids accepted and how many were refused.
async fn publish_numbered(
    publisher: &cloudbus_core::publisher::Publisher,
    ty: &str,
    count: usize,
) -> Result<(HashSet<String>, usize)> {
    let mut handles = Vec::with_capacity(count);
    for i in 0..count {
        let event: Event = EventBuilder::new(ty, "/chaos")
            .subject(i.to_string())
            .build()?;
        let id = event.id().to_owned();
        handles.push((id, publisher.publish(event)));
    }
    let mut accepted = HashSet::with_capacity(count);
    let mut refused = 0;
    for (id, handle) in handles {
        match handle.await {
            Ok(()) => {
                accepted.insert(id);
            }
            Err(_) => refused += 1,
        }
    }
    publisher.close().await?;
    Ok((accepted, refused))
}

/// How often each event id was handled.
#[derive(Clone, Default)]
struct Tally(Arc<Mutex<HashMap<String, usize>>>);

impl Tally {
    /// A handler that always succeeds and counts.
    fn handler(
        &self,
    ) -> impl Fn(
        Arc<Event>,
        HandlerContext,
    ) -> std::future::Ready<std::result::Result<(), HandlerError>>
    + Send
    + Sync
    + 'static {
        let seen = self.0.clone();
        move |e: Arc<Event>, _c: HandlerContext| {
            if let Ok(mut m) = seen.lock() {
                *m.entry(e.id().to_owned()).or_default() += 1;
            }
            std::future::ready(Ok(()))
        }
    }

    /// How many of `accepted` were handled at least once.
    fn handled_of(&self, accepted: &HashSet<String>) -> usize {
        self.0
            .lock()
            .map(|m| accepted.iter().filter(|id| m.contains_key(*id)).count())
            .unwrap_or(0)
    }

    /// Handlings beyond the first of each event.
    fn duplicates(&self) -> usize {
        self.0
            .lock()
            .map(|m| m.values().map(|n| n.saturating_sub(1)).sum())
            .unwrap_or(0)
    }

    /// Waits until every accepted event was handled, or nothing new came for
    /// `stall_window`, or `cap` passed. Faults cost time and leases (a lost reply or a
    /// failed ack brings an event back only when its lease runs out), so a run goes on
    /// while events keep arriving.
    async fn until_all_or_stalled(
        &self,
        accepted: &HashSet<String>,
        stall_window: Duration,
        cap: Duration,
    ) {
        let cap = Instant::now() + cap;
        let (mut last_count, mut last_progress) = (0, Instant::now());
        loop {
            let now_count = self.handled_of(accepted);
            if now_count == accepted.len() || Instant::now() > cap {
                return;
            }
            if now_count > last_count {
                (last_count, last_progress) = (now_count, Instant::now());
            } else if last_progress.elapsed() > stall_window {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// How long a chaos run waits without progress before it counts what is missing as
/// lost: the provider's patience and leases, and more than the longest pause the
/// worker itself takes after receives that failed in a row (its retry backoff at the
/// 8th failure: 12.8 s, up to 15.4 s with jitter, by default). Without that last part
/// a run of 7 or 8 injected receive failures stalled the worker longer than the window
/// (11.6 s on the memory broker), and the events it had not received yet were counted
/// as lost: the likeliest cause of the memory case's "lost 304" (seed
/// 4104343704268071995), which never came back in 45 runs of that seed here.
pub fn worker_stall_window<H: Harness + ?Sized>(h: &H) -> Duration {
    let retry = WorkerOptions::default().retry;
    let longest_pause = retry
        .max_backoff
        .min(retry.initial_backoff.mul_f64(retry.multiplier.powi(7)));
    h.patience() * 2 + h.short_lease() * 4 + longest_pause.mul_f64(1.0 + retry.jitter)
}

/// Publishes `count` events through `h`'s faulty bus and handles them with a worker
/// whose handler always succeeds; fails unless every accepted event was handled and
/// none dead-lettered. Prints one `CHAOS ...` line with the [`ChaosReport`].
pub async fn nothing_lost_under_faults<H: Harness>(
    h: &ChaosHarness<H>,
    count: usize,
) -> Result<ChaosReport> {
    let bus = h.bus().await?;
    let topic = h.unique("chaos-t");
    let sub = h.unique("chaos-s");
    bus.ensure_topic(&topic).await?;
    bus.ensure_subscription(&SubscriptionSpec::new(&topic, &sub).lease(h.short_lease()))
        .await?;
    let publisher = bus.publisher(&topic).await?;
    let consumer = bus.consumer(&topic, &sub).await?;
    let (accepted, refused) = publish_numbered(&publisher, "conformance.chaos", count).await?;

    let tally = Tally::default();
    let worker = consumer.start_worker(
        tally.handler(),
        WorkerOptions::default()
            .concurrency(8)
            .receive_wait(Duration::from_millis(300)),
    )?;
    let stall_window = worker_stall_window(h);
    tally
        .until_all_or_stalled(&accepted, stall_window, Duration::from_secs(900))
        .await;
    let worker_report = worker.shutdown(Duration::from_secs(10)).await;
    consumer.close().await.ok();
    let received = tally.handled_of(&accepted);
    let duplicates = tally.duplicates();
    let mut dead_lettered = worker_report.dead_lettered as usize;
    if consumer.capabilities().native_dead_letter
        && let Ok(dlq) = bus.dead_letters(&topic, &sub).await
    {
        dead_lettered = dead_lettered.max(dlq.peek(100).await.map(|d| d.len()).unwrap_or(0));
    }
    let report = ChaosReport {
        published: accepted.len(),
        refused,
        received,
        duplicates,
        lost: accepted.len() - received,
        dead_lettered,
    };
    let injected = h
        .injected
        .lock()
        .map(|all| {
            all.iter()
                .map(|i| i.summary())
                .collect::<Vec<_>>()
                .join("; ")
        })
        .unwrap_or_default();
    eprintln!(
        "CHAOS scheme={} fault={} seed={} published={} refused={} received={} duplicates={} lost={} dead_lettered={} | injected: {injected}",
        bus.scheme(),
        h.kind.name(),
        h.seed,
        report.published,
        report.refused,
        report.received,
        report.duplicates,
        report.lost,
        report.dead_lettered,
    );
    Ok(report)
}

/// Runs [`nothing_lost_under_faults`] and fails with the seed when anything was lost
/// or dead-lettered.
pub async fn run_chaos_case<H: Harness>(harness: H, kind: FaultKind, count: usize) {
    check_chaos_case(ChaosHarness::new(harness, kind), count).await
}

/// [`run_chaos_case`] with the faults of `seed`: a seed that once failed, kept as a
/// regression case.
pub async fn run_chaos_case_with_seed<H: Harness>(
    harness: H,
    kind: FaultKind,
    seed: u64,
    count: usize,
) {
    check_chaos_case(ChaosHarness::with_seed(harness, kind, seed), count).await
}

async fn check_chaos_case<H: Harness>(chaos: ChaosHarness<H>, count: usize) {
    let kind = chaos.kind();
    let seed = chaos.seed();
    match nothing_lost_under_faults(&chaos, count).await {
        Ok(r) if r.lost == 0 && r.dead_lettered == 0 && r.published > 0 => {}
        Ok(r) => panic!("chaos {} (CLOUDBUS_CHAOS_SEED={seed}): {r:?}", kind.name()),
        Err(e) => panic!(
            "chaos {} (CLOUDBUS_CHAOS_SEED={seed}) failed: {e}",
            kind.name()
        ),
    }
}

/// The stream twin of [`nothing_lost_under_faults`]: publishes `count` events
/// through a faulty bus to a new stream of `h` and reads them with
/// [`StreamConsumer::run`](cloudbus_core::StreamConsumer::run) (whose reads are faulty too)
/// and a handler that always succeeds, until every accepted event was handled or
/// nothing new came for a stall window. `run` must not give up on a fault.
pub async fn nothing_lost_in_a_stream_under_faults(
    h: &dyn StreamHarness,
    kind: FaultKind,
    seed: u64,
    count: usize,
) -> Result<ChaosReport> {
    let inner = h.bus().await?;
    let chaos = ChaosBus::new(inner.driver().clone(), Faults::preset(kind, seed));
    let injected = chaos.injected();
    let bus = Bus::new(Arc::new(chaos));
    let stream = h.new_stream().await?;
    let publisher = bus.publisher(&stream).await?;
    let (accepted, refused) =
        publish_numbered(&publisher, "conformance.chaos.stream", count).await?;

    let tally = Tally::default();
    let mut consumer = bus
        .stream_consumer(&stream, "chaos")
        .await?
        .start_at(StartPosition::Earliest)
        // Small reads, so that a run makes enough calls for the faults to strike.
        .batch_size(10)
        .retry(
            cloudbus_core::retry::RetryPolicy::default().initial_backoff(Duration::from_millis(20)),
        );
    let done = tally.until_all_or_stalled(&accepted, h.patience() * 2, Duration::from_secs(600));
    consumer
        .run(&tally.handler(), Duration::from_millis(100), done)
        .await?;
    let received = tally.handled_of(&accepted);
    let report = ChaosReport {
        published: accepted.len(),
        refused,
        received,
        duplicates: tally.duplicates(),
        lost: accepted.len() - received,
        dead_lettered: 0,
    };
    eprintln!(
        "CHAOS scheme={} stream fault={} seed={seed} published={} refused={} received={} duplicates={} lost={} dead_lettered=0 | injected: {}",
        bus.scheme(),
        kind.name(),
        report.published,
        report.refused,
        report.received,
        report.duplicates,
        report.lost,
        injected.summary(),
    );
    Ok(report)
}

/// Runs [`nothing_lost_in_a_stream_under_faults`] with the seed of
/// `CLOUDBUS_CHAOS_SEED` (else a random one) and fails with the seed when anything
/// was lost or the consumer gave up.
pub async fn run_stream_chaos_case<S: StreamHarness>(harness: S, kind: FaultKind, count: usize) {
    let seed = std::env::var("CLOUDBUS_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    match nothing_lost_in_a_stream_under_faults(&harness, kind, seed, count).await {
        Ok(r) if r.lost == 0 && r.published > 0 => {}
        Ok(r) => panic!(
            "stream chaos {} (CLOUDBUS_CHAOS_SEED={seed}): {r:?}",
            kind.name()
        ),
        Err(e) => panic!(
            "stream chaos {} (CLOUDBUS_CHAOS_SEED={seed}) failed: {e}",
            kind.name()
        ),
    }
}

/// Generates one `#[tokio::test]` per [`FaultKind`] that applies to streams (all but
/// over-fetching, which a stream read cannot do) running
/// What one layer sweep saw ([`layers_keep_the_promise_under_faults`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LayerSweepReport {
    /// Events published and accepted (faulty handlings first, then healthy ones).
    pub published: usize,
    /// Distinct accepted events handled to success.
    pub handled: usize,
    /// Accepted events never handled (must be 0).
    pub lost: usize,
    /// Events dead-lettered (must be 0: every fault was on an early attempt).
    pub dead_lettered: usize,
    /// Faults injected: (panics, handlings cancelled by the timeout, failures).
    pub injected: (u64, u64, u64),
}

/// FNV-1a of `text`: a hash that is the same in every run, for seeded choices.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// An always-valid [`EventValidator`](cloudbus_core::validation::EventValidator), so that the
/// schema layer runs (and is cancelled) without a schema feature.
struct EverythingValid;

#[async_trait]
impl cloudbus_core::validation::EventValidator for EverythingValid {
    fn validate_loaded(&self, _event: &Event) -> Result<cloudbus_core::validation::Checked> {
        Ok(cloudbus_core::validation::Checked::Valid)
    }
    async fn validate(&self, _event: &Event) -> Result<cloudbus_core::validation::Checked> {
        tokio::task::yield_now().await;
        Ok(cloudbus_core::validation::Checked::Valid)
    }
}

/// The cancellation and panic sweep of the router's layers (issue 28): a route
/// wrapped in every layer (`Trace`, `Timeout`, `ConcurrencyLimit`, `RateLimit`,
/// `CircuitBreaker`, `Idempotency`, `SchemaValidation`) whose handler, on its first
/// two runs of an event, panics, hangs past the timeout (so the timeout layer cancels
/// everything inside it) or fails, by seed; later runs succeed. Then a second
/// round of `count` events meets a healthy handler. Every accepted event must be
/// handled and none dead-lettered: a layer left refusing (a breaker stuck "probing",
/// a claim never released, a permit never given back) loses the second round.
pub async fn layers_keep_the_promise_under_faults<H: Harness>(
    h: &H,
    count: usize,
    seed: u64,
) -> Result<LayerSweepReport> {
    use cloudbus_core::idempotency::MemoryDedupStore;
    use cloudbus_core::router::layers::{
        CircuitBreakerLayer, ConcurrencyLimitLayer, IdempotencyLayer, RateLimitLayer,
        SchemaValidationLayer, TimeoutLayer, TraceLayer,
    };
    use cloudbus_core::router::{Context, Router};

    let bus = h.bus().await?;
    let topic = h.unique("sweep-t");
    let sub = h.unique("sweep-s");
    bus.ensure_topic(&topic).await?;
    bus.ensure_subscription(&SubscriptionSpec::new(&topic, &sub).lease(h.short_lease()))
        .await?;
    let publisher = bus.publisher(&topic).await?;
    let consumer = bus.consumer(&topic, &sub).await?;

    let tally = Tally::default();
    let healthy = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let injected = Arc::new([AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)]);
    let timeout = Duration::from_millis(50);
    // How many times the handler ran on each event: its first two runs may fail
    // (an open breaker refuses some attempts without running it).
    let runs: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let handler = {
        let (seen, healthy, injected) = (tally.0.clone(), healthy.clone(), injected.clone());
        move |ctx: Context| {
            let (seen, healthy, injected) = (seen.clone(), healthy.clone(), injected.clone());
            let run = runs
                .lock()
                .map(|mut r| {
                    let n = r.entry(ctx.event().id().to_owned()).or_default();
                    *n += 1;
                    *n
                })
                .unwrap_or(u64::MAX);
            async move {
                let faulty = !healthy.load(Ordering::SeqCst) && run <= 2;
                if faulty {
                    let mut rng = fastrand::Rng::with_seed(seed ^ fnv1a(ctx.event().id()) ^ run);
                    match rng.u8(0..10) {
                        0 | 1 => {
                            injected[0].fetch_add(1, Ordering::Relaxed);
                            panic!("layer sweep: an injected panic");
                        }
                        2 | 3 => {
                            injected[1].fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(timeout * 20).await;
                        }
                        4 => {
                            injected[2].fetch_add(1, Ordering::Relaxed);
                            return Err(HandlerError::retry("layer sweep: an injected failure"));
                        }
                        _ => {}
                    }
                }
                if let Ok(mut m) = seen.lock() {
                    *m.entry(ctx.event().id().to_owned()).or_default() += 1;
                }
                Ok::<(), HandlerError>(())
            }
        }
    };
    // Innermost first: the timeout wraps idempotency, the breaker and the limits, so
    // its cancellation reaches each of them.
    let router = Router::new()
        .route_type("conformance.sweep", handler)
        .layer(IdempotencyLayer::new(Arc::new(MemoryDedupStore::new(
            100_000,
        ))))
        .layer(SchemaValidationLayer::new(Arc::new(EverythingValid)))
        .layer(CircuitBreakerLayer::new(5, Duration::from_millis(20)))
        .layer(ConcurrencyLimitLayer::new(4))
        .layer(RateLimitLayer::new(100_000, Duration::from_secs(1)))
        .layer(TimeoutLayer::new(timeout))
        .layer(TraceLayer::new());
    // Refusals of an open breaker spend attempts too; enough of them that only a
    // breaker that never closes again runs them out.
    let retry = cloudbus_core::retry::RetryPolicy {
        max_attempts: 30,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(100),
        ..cloudbus_core::retry::RetryPolicy::default()
    };
    let worker = consumer.start_worker(
        router,
        WorkerOptions::default()
            .concurrency(8)
            .retry(retry)
            .receive_wait(Duration::from_millis(200)),
    )?;
    let (mut accepted, _) = publish_numbered(&publisher, "conformance.sweep", count).await?;
    let stall_window = worker_stall_window(h);
    tally
        .until_all_or_stalled(&accepted, stall_window, Duration::from_secs(300))
        .await;
    healthy.store(true, Ordering::SeqCst);
    let publisher = bus.publisher(&topic).await?;
    let (second, _) = publish_numbered(&publisher, "conformance.sweep", count).await?;
    accepted.extend(second);
    tally
        .until_all_or_stalled(&accepted, stall_window, Duration::from_secs(300))
        .await;
    let worker_report = worker.shutdown(Duration::from_secs(10)).await;
    consumer.close().await.ok();
    let handled = tally.handled_of(&accepted);
    let report = LayerSweepReport {
        published: accepted.len(),
        handled,
        lost: accepted.len() - handled,
        dead_lettered: worker_report.dead_lettered as usize,
        injected: (
            injected[0].load(Ordering::Relaxed),
            injected[1].load(Ordering::Relaxed),
            injected[2].load(Ordering::Relaxed),
        ),
    };
    eprintln!("LAYER SWEEP scheme={} seed={seed} {report:?}", bus.scheme());
    Ok(report)
}

/// Runs [`layers_keep_the_promise_under_faults`] with the seed of
/// `CLOUDBUS_CHAOS_SEED` (or a random one) and fails, naming the seed, when anything
/// was lost or dead-lettered, or no fault was injected.
pub async fn run_layer_sweep_case<H: Harness>(harness: H, count: usize) {
    let seed = std::env::var("CLOUDBUS_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    match layers_keep_the_promise_under_faults(&harness, count, seed).await {
        Ok(r) if r.lost == 0 && r.dead_lettered == 0 && r.injected.0 > 0 && r.injected.1 > 0 => {}
        Ok(r) => panic!("layer sweep (CLOUDBUS_CHAOS_SEED={seed}): {r:?}"),
        Err(e) => panic!("layer sweep (CLOUDBUS_CHAOS_SEED={seed}) failed: {e}"),
    }
}
