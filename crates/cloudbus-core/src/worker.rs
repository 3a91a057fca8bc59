//! The worker loop behind [`Consumer::start_worker`](crate::Consumer::start_worker):
//! bounded concurrency, flow control by outstanding deliveries and bytes (nothing is
//! pulled that cannot be handled at once, so no lease expires in a local buffer),
//! per-key ordering, retries through nack delays with exponential backoff and jitter,
//! dead-lettering after the last attempt, leases kept from receipt to settlement, and
//! graceful shutdown with a deadline.
//!
//! Dispatch is per received batch: the deliveries of a batch that have no ordering key
//! run as one task that drives their handlers concurrently; each ordering key gets a
//! task that handles its deliveries one after another. One lease keeper extends the
//! leases of everything the worker holds.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::consumer::{Consumer, Delivery};
pub use crate::handler::{Handler, HandlerContext, HandlerError, HandlerRunner};
use crate::health::{HealthState, InFlightToken, WorkerHealth};
use crate::lease_keeper::{KeptLeases, LeaseKeeper};
use crate::retry::RetryPolicy;
use cloudbus_driver::event::AttributesReader;

/// Attempts of an ack that fails transiently, the first included (see
/// `WorkerLoop::ack_with_retries`).
const ACK_ATTEMPTS: u32 = 3;

/// Worker settings.
#[derive(Clone, Debug)]
pub struct WorkerOptions {
    /// Handlers running at once; also the most deliveries outstanding.
    pub concurrency: usize,
    /// Most bytes of deliveries outstanding.
    pub max_outstanding_bytes: usize,
    /// Most messages per receive call (capped by `concurrency`).
    pub receive_batch: usize,
    /// How long one receive call waits for messages.
    pub receive_wait: Duration,
    /// Attempts and backoff: failed attempts are nacked with the backoff as delay, and
    /// the last one is dead-lettered with the reason.
    pub retry: RetryPolicy,
    /// Keep the lease of every delivery the worker holds, from receipt until its
    /// settlement begins (when the provider grants leases and can extend them).
    pub extend_leases: bool,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            concurrency: 16,
            max_outstanding_bytes: 64 * 1024 * 1024,
            receive_batch: 8,
            receive_wait: Duration::from_millis(500),
            retry: RetryPolicy::default(),
            extend_leases: true,
        }
    }
}

impl WorkerOptions {
    /// Sets the concurrency, and the receive batch to half of it: the next receive
    /// then overlaps the handling of the last batch instead of waiting for all of it.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self.receive_batch = self.concurrency.div_ceil(2);
        self
    }
    /// Sets the retry policy.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }
    /// Sets the receive wait.
    pub fn receive_wait(mut self, d: Duration) -> Self {
        self.receive_wait = d;
        self
    }
}

/// Counts kept by a running worker ([`Worker::stats`] reads them as a [`WorkerReport`]).
#[derive(Debug, Default)]
pub(crate) struct WorkerCounters {
    /// Handled and acked.
    pub acked: AtomicU64,
    /// Failed and nacked for another attempt.
    pub retried: AtomicU64,
    /// Dead-lettered (rejected or out of attempts).
    pub dead_lettered: AtomicU64,
    /// In flight at the shutdown deadline, nacked for prompt redelivery.
    pub abandoned: AtomicU64,
    /// Settlements that failed (the lease will expire and the event come back).
    pub settle_errors: AtomicU64,
}

/// What a worker has done so far, from [`Worker::stats`] and [`Worker::shutdown`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WorkerReport {
    /// Handled and acked.
    pub acked: u64,
    /// Nacked for another attempt.
    pub retried: u64,
    /// Dead-lettered.
    pub dead_lettered: u64,
    /// Abandoned at the deadline.
    pub abandoned: u64,
    /// Failed settlements.
    pub settle_errors: u64,
}

impl WorkerCounters {
    fn report(&self) -> WorkerReport {
        WorkerReport {
            acked: self.acked.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            abandoned: self.abandoned.load(Ordering::Relaxed),
            settle_errors: self.settle_errors.load(Ordering::Relaxed),
        }
    }
}

impl Consumer {
    /// Starts a worker that runs `handler` over this consumer's deliveries
    /// (concurrency, flow control, retries, dead-lettering, lease extension, graceful
    /// shutdown). The broker's subscription itself is made by
    /// [`Bus::ensure_subscription`](crate::Bus::ensure_subscription).
    ///
    /// The handler's wiring is checked first ([`Handler::check_wiring`]; for a
    /// [`Router`](crate::Router), [`Router::check`](crate::Router::check)): a route
    /// that takes a state or a publisher the router was not given, or two routes for
    /// one event type, are an [`InvalidArgument`](cloudbus_driver::ErrorKind::InvalidArgument)
    /// error naming each route and what it misses, and nothing is received.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use cloudbus_core::{
    ///     AttributesReader, Consumer, Event, HandlerContext, HandlerError, Worker, WorkerOptions,
    /// };
    ///
    /// fn start(consumer: &Consumer) -> cloudbus_core::Result<Worker> {
    ///     consumer.start_worker(
    ///         |event: Arc<Event>, _ctx: HandlerContext| async move {
    ///             println!("{}", event.id());
    ///             Ok::<(), HandlerError>(())
    ///         },
    ///         WorkerOptions::default().concurrency(8),
    ///     )
    /// }
    /// ```
    pub fn start_worker<H: Handler>(
        &self,
        handler: H,
        options: WorkerOptions,
    ) -> cloudbus_driver::Result<Worker> {
        handler.check_wiring()?;
        Ok(Worker::start(self.clone(), Arc::new(handler), options))
    }

    /// The name [`start_worker`](Consumer::start_worker) had (the README showed it);
    /// "subscription" means the broker's entity everywhere else. Checks the handler's
    /// wiring as `start_worker` does.
    #[deprecated(since = "0.1.0", note = "renamed to `start_worker`")]
    pub fn subscribe<H: Handler>(
        &self,
        handler: H,
        options: WorkerOptions,
    ) -> cloudbus_driver::Result<Worker> {
        self.start_worker(handler, options)
    }
}

/// A running worker. Stop it with [`shutdown`](Worker::shutdown); dropping it
/// stops pulling too, and lets the handlers in flight finish.
#[must_use = "dropping a Worker stops it"]
pub struct Worker {
    stop_pulling: watch::Sender<bool>,
    hard_stop: watch::Sender<bool>,
    main: tokio::task::JoinHandle<()>,
    stats: Arc<WorkerCounters>,
    health: Arc<HealthState>,
}

/// The deliveries waiting behind the one being handled, per ordering key.
type KeyQueues = Arc<Mutex<HashMap<String, VecDeque<Held>>>>;
/// A concurrency slot held from receipt until settlement.
type Slot = OwnedSemaphorePermit;

/// A delivery the worker holds, with what it holds for it until settlement: its
/// concurrency slot and its lease kept alive.
struct Held {
    delivery: Arc<Delivery>,
    _in_flight: InFlightToken,
    _slot: Slot,
    _leases: Option<Arc<KeptLeases>>,
    /// Its share of `max_outstanding_bytes`, once taken.
    _bytes: Option<OwnedSemaphorePermit>,
}

/// A handler's run on a delivery: its outcome (`Err` when it panicked) and its span,
/// for the settlement.
struct Ran {
    outcome: std::thread::Result<Result<(), HandlerError>>,
    span: tracing::Span,
}

impl Worker {
    pub(crate) fn start(
        consumer: Consumer,
        handler: Arc<dyn Handler>,
        options: WorkerOptions,
    ) -> Worker {
        let (stop_pulling, stop_rx) = watch::channel(false);
        let (hard_stop, hard_rx) = watch::channel(false);
        let stats = Arc::new(WorkerCounters::default());
        let health = Arc::new(HealthState::default());
        let kib = (options.max_outstanding_bytes / 1024).clamp(1, Semaphore::MAX_PERMITS);
        let leases = (options.extend_leases && consumer.capabilities().lease_extension)
            .then(|| Arc::new(LeaseKeeper::default()));
        let run = WorkerLoop {
            runner: HandlerRunner::for_consumer(&consumer.inner),
            consumer,
            handler,
            bytes: Arc::new(Semaphore::new(kib)),
            bytes_kib: kib,
            options,
            stats: stats.clone(),
            health: health.clone(),
            hard_stop: hard_rx,
            lanes: Arc::new(Mutex::new(HashMap::new())),
            leases,
        };
        let main = tokio::spawn(run.run(stop_rx));
        Worker {
            stop_pulling,
            hard_stop,
            main,
            stats,
            health,
        }
    }

    /// The live counters.
    pub fn stats(&self) -> WorkerReport {
        self.stats.report()
    }

    /// Whether it runs, reaches the provider and what it holds, for liveness and
    /// readiness probes (see [`WorkerHealth`]).
    pub fn health(&self) -> WorkerHealth {
        let running = !self.main.is_finished() && !*self.stop_pulling.borrow();
        let failures = self.health.consecutive_failures();
        WorkerHealth {
            running,
            receiving: running && failures == 0,
            connected: self.health.connected(),
            consecutive_failures: failures,
            last_error: self.health.last_error(),
            last_receive: self.health.last_success(),
            in_flight: self.health.in_flight(),
        }
    }

    /// Stops pulling, lets handlers in flight finish and settle until `deadline`, then
    /// nacks whatever still runs (so it is redelivered promptly) and returns the counts.
    pub async fn shutdown(self, deadline: Duration) -> WorkerReport {
        let _ = self.stop_pulling.send(true);
        let mut main = self.main;
        if tokio::time::timeout(deadline, &mut main).await.is_err() {
            let _ = self.hard_stop.send(true);
            let _ = main.await;
        }
        self.stats.report()
    }
}

/// How long the worker waits, once a slot is free, for more slots to free up before
/// it receives (see [`gather_slots`]).
const RECEIVE_COALESCE: Duration = Duration::from_millis(2);

/// Waits for a free slot, then takes up to `want`. While handlers are finishing, it
/// waits up to [`RECEIVE_COALESCE`] for half of `want` to be free: receiving for every
/// slot as it frees up would make batches of one or two, and each receive call costs
/// a round trip. `None` when the worker is told to stop.
async fn gather_slots(
    slots: &Arc<Semaphore>,
    want: usize,
    stop: &mut watch::Receiver<bool>,
) -> Option<Vec<Slot>> {
    let first = tokio::select! {
        p = slots.clone().acquire_owned() => p.ok()?,
        _ = stop.changed() => return None,
    };
    let mut permits = vec![first];
    let take_free = |permits: &mut Vec<Slot>| {
        while permits.len() < want {
            match slots.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
    };
    take_free(&mut permits);
    let enough = want.div_ceil(2);
    if permits.len() < enough {
        let deadline = tokio::time::sleep(RECEIVE_COALESCE);
        tokio::pin!(deadline);
        while permits.len() < enough {
            tokio::select! {
                p = slots.clone().acquire_owned() => permits.push(p.ok()?),
                _ = &mut deadline => break,
                _ = stop.changed() => return None,
            }
        }
        take_free(&mut permits);
    }
    Some(permits)
}

struct WorkerLoop {
    consumer: Consumer,
    handler: Arc<dyn Handler>,
    /// Runs the handler as every consumer does (trace, span, panic, timing).
    runner: HandlerRunner,
    options: WorkerOptions,
    stats: Arc<WorkerCounters>,
    /// What `Worker::health` reports.
    health: Arc<HealthState>,
    hard_stop: watch::Receiver<bool>,
    lanes: KeyQueues,
    /// Keeps the leases of held deliveries (`None` when they are not extended).
    leases: Option<Arc<LeaseKeeper>>,
    /// Outstanding bytes, in KiB permits (`max_outstanding_bytes`).
    bytes: Arc<Semaphore>,
    bytes_kib: usize,
}

/// How often the `event_queue_depth` gauge is read while reads succeed.
const DEPTH_PERIOD: Duration = Duration::from_secs(1);
/// How long one read of the depth may take.
const DEPTH_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest pause between reads after failures (they double up to it).
const DEPTH_MOST_PAUSE: Duration = Duration::from_secs(60);

/// Reads the queue depth for the `event_queue_depth` gauge once a second, in its own
/// task, each read bounded by [`DEPTH_TIMEOUT`]; a read that fails or times out
/// doubles the pause before the next (up to [`DEPTH_MOST_PAUSE`]), so an endpoint
/// that is away costs a request a minute, not one per receive.
async fn report_queue_depth(consumer: Consumer) {
    let mut pause = DEPTH_PERIOD;
    loop {
        match tokio::time::timeout(DEPTH_TIMEOUT, consumer.report_queue_depth()).await {
            Ok(Some(_)) => pause = DEPTH_PERIOD,
            // No depth (the provider cannot tell, or the read failed), or too slow.
            Ok(None) | Err(_) => pause = (pause * 2).min(DEPTH_MOST_PAUSE),
        }
        tokio::time::sleep(pause).await;
    }
}

/// A task that ends with its owner, however the owner ends (returned, panicked or
/// dropped).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl WorkerLoop {
    async fn run(self, mut stop: watch::Receiver<bool>) {
        let concurrency = self.options.concurrency.max(1);
        let slots = Arc::new(Semaphore::new(concurrency));
        let this = Arc::new(self);
        let lease_timer = this.leases.clone().map(|keeper| tokio::spawn(keeper.run()));
        // Off the receive path: a depth that is slow to read (an HTTPS call, a
        // management endpoint that is away) must never slow receiving or shutdown.
        let depth_reporter = AbortOnDrop(tokio::spawn(report_queue_depth(this.consumer.clone())));
        let mut tasks = JoinSet::new();
        let mut failures = 0u32;
        loop {
            if *stop.borrow() {
                break;
            }
            let want = this.options.receive_batch.clamp(1, concurrency);
            let Some(mut permits) = gather_slots(&slots, want, &mut stop).await else {
                break;
            };
            // Reap finished tasks so the JoinSet does not grow.
            while tasks.try_join_next().is_some() {}
            let received = this
                .consumer
                .receive_batch(permits.len(), this.options.receive_wait)
                .await;
            let deliveries = match received {
                Ok(d) => {
                    failures = 0;
                    this.health.succeeded();
                    d
                }
                Err(e) if e.kind() == cloudbus_driver::ErrorKind::Closed => break,
                Err(e) => {
                    failures += 1;
                    this.health.failed(&e);
                    let pause = this.options.retry.backoff(failures.min(8));
                    tracing::warn!(consumer = %this.consumer.name(), error = %e, ?pause, "receive failed; pausing");
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {},
                        _ = stop.changed() => break,
                    }
                    continue;
                }
            };
            // The consumer hands out at most as many deliveries as asked for (it gives
            // a driver's surplus back), so every delivery has its slot.
            let deliveries: Vec<Arc<Delivery>> = deliveries.into_iter().map(Arc::new).collect();
            let kept = this.leases.as_ref().and_then(|k| k.keep(&deliveries));
            let mut unordered = Vec::with_capacity(deliveries.len());
            for (delivery, slot) in deliveries.into_iter().zip(permits.drain(..)) {
                let held = Held {
                    delivery,
                    _in_flight: this.health.hold(),
                    _slot: slot,
                    _leases: kept.clone(),
                    _bytes: None,
                };
                let key = if this.consumer.capabilities().ordering {
                    held.delivery.ordering_key().map(str::to_owned)
                } else {
                    None
                };
                let Some(key) = key else {
                    unordered.push(held);
                    continue;
                };
                let first_of_key = {
                    let Ok(mut lanes) = this.lanes.lock() else {
                        break;
                    };
                    match lanes.get_mut(&key) {
                        Some(queue) => {
                            queue.push_back(held);
                            None
                        }
                        None => {
                            lanes.insert(key.clone(), VecDeque::new());
                            Some(held)
                        }
                    }
                };
                if let Some(held) = first_of_key {
                    let w = this.clone();
                    tasks.spawn(async move { w.run_lane(key, held).await });
                }
            }
            if !unordered.is_empty() {
                let w = this.clone();
                tasks.spawn(async move { w.run_batch(unordered).await });
            }
        }
        drop(depth_reporter);
        while tasks.join_next().await.is_some() {}
        if let Some(timer) = lease_timer {
            timer.abort();
        }
    }

    /// Handles the deliveries of one batch concurrently, in this one task. Those
    /// handled successfully are acked together (while one group's ack is under way,
    /// the next group gathers); every other outcome is settled one by one. At the
    /// shutdown deadline the handlers still running are dropped and their deliveries
    /// nacked for prompt redelivery.
    async fn run_batch(self: Arc<Self>, batch: Vec<Held>) {
        let deliveries: Vec<Arc<Delivery>> = batch.iter().map(|h| h.delivery.clone()).collect();
        let mut handled = vec![false; batch.len()];
        let mut handling: FuturesUnordered<_> = batch
            .into_iter()
            .enumerate()
            .map(|(i, held)| {
                let handle = self.handle(held);
                async move { (i, handle.await) }
            })
            .collect();
        let mut settling = FuturesUnordered::new();
        let mut to_ack = Vec::new();
        let mut acking = FuturesUnordered::new();
        let mut abandoning = FuturesUnordered::new();
        let hard_stopped = self.hard_stopped();
        tokio::pin!(hard_stopped);
        let mut stopped = false;
        loop {
            tokio::select! {
                Some((i, (held, ran))) = handling.next() => {
                    handled[i] = true;
                    match ran {
                        Ran { outcome: Ok(Ok(())), .. } => to_ack.push(held),
                        ran => settling.push(self.settle(held, ran)),
                    }
                }
                Some(()) = settling.next() => {}
                Some(()) = acking.next() => {}
                Some(()) = abandoning.next() => {}
                () = &mut hard_stopped, if !stopped => {
                    stopped = true;
                    handling.clear();
                    let unhandled = deliveries.iter().zip(&handled).filter(|(_, done)| !**done);
                    for (delivery, _) in unhandled {
                        abandoning.push(self.abandon(delivery.clone()));
                    }
                }
                else => break,
            }
            if acking.is_empty() && !to_ack.is_empty() {
                acking.push(self.ack_together(std::mem::take(&mut to_ack)));
            }
            // All handled and settled: the batch is done. (The shutdown branch stays
            // pending, so `else` alone would keep this task, and its events, until the
            // shutdown deadline.)
            if handling.is_empty()
                && settling.is_empty()
                && acking.is_empty()
                && abandoning.is_empty()
                && to_ack.is_empty()
            {
                break;
            }
        }
    }

    /// Handles the deliveries of one ordering key one after another.
    async fn run_lane(self: Arc<Self>, key: String, first: Held) {
        let mut next = Some(first);
        while let Some(held) = next.take() {
            self.process(held).await;
            let Ok(mut lanes) = self.lanes.lock() else {
                return;
            };
            match lanes.get_mut(&key).and_then(VecDeque::pop_front) {
                Some(item) => next = Some(item),
                None => {
                    lanes.remove(&key);
                }
            }
        }
    }

    /// Resolves when the shutdown deadline has passed (never, if the worker is gone).
    async fn hard_stopped(&self) {
        let mut hard_stop = self.hard_stop.clone();
        if hard_stop.wait_for(|stop| *stop).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Takes the delivery's share of `max_outstanding_bytes` (its lease is kept while
    /// it waits); `None` only if the semaphore is gone.
    async fn take_bytes(&self, delivery: &Delivery) -> Option<OwnedSemaphorePermit> {
        let need = (delivery.size() / 1024).clamp(1, self.bytes_kib) as u32;
        if let Ok(permit) = self.bytes.clone().try_acquire_many_owned(need) {
            return Some(permit);
        }
        self.bytes.clone().acquire_many_owned(need).await.ok()
    }

    /// Handles and settles one delivery; what it holds is let go when this returns.
    async fn process(&self, held: Held) {
        let delivery = held.delivery.clone();
        tokio::select! {
            (held, ran) = self.handle(held) => self.settle(held, ran).await,
            _ = self.hard_stopped() => self.abandon(delivery).await,
        }
    }

    /// Nacks a delivery whose handling the shutdown deadline cut short, for prompt
    /// redelivery.
    async fn abandon(&self, delivery: Arc<Delivery>) {
        tracing::warn!(event_id = %delivery.event().id(), "shutdown deadline reached; nacking for redelivery");
        match delivery.nack(Duration::ZERO).await {
            Ok(()) => self.stats.abandoned.fetch_add(1, Ordering::Relaxed),
            Err(_) => self.stats.settle_errors.fetch_add(1, Ordering::Relaxed),
        };
    }

    /// Runs the handler on one delivery, after taking its share of the outstanding
    /// bytes. The caller bounds it by the shutdown deadline.
    async fn handle(&self, mut held: Held) -> (Held, Ran) {
        let delivery = held.delivery.clone();
        held._bytes = self.take_bytes(&delivery).await;
        let event = delivery.event_arc();
        let started = Instant::now();
        let (span, handling) = self.runner.handle(
            self.handler.as_ref(),
            event.clone(),
            delivery.attempt(),
            Some(delivery.clone()),
            delivery.partition(),
            delivery.offset(),
        );
        let outcome = handling.await;
        self.runner.processed(&event, started, &outcome);
        (held, Ran { outcome, span })
    }

    /// Settles one handled delivery as its outcome says, and counts it.
    async fn settle(&self, held: Held, ran: Ran) {
        let delivery = &*held.delivery;
        let Ran { outcome, span } = ran;
        let settle = async {
            let (counter, settled) = match outcome {
                Ok(Ok(())) => (&self.stats.acked, self.ack_with_retries(delivery, 1).await),
                Ok(Err(HandlerError::Reject { reason })) => {
                    tracing::warn!(%reason, "handler rejected the event; dead-lettering");
                    (
                        &self.stats.dead_lettered,
                        delivery.dead_letter(format!("rejected: {reason}")).await,
                    )
                }
                Ok(Err(HandlerError::Retry { message, delay })) => {
                    self.retry_or_dead_letter(delivery, message, delay).await
                }
                Err(_panic) => {
                    self.retry_or_dead_letter(delivery, "handler panicked".into(), None)
                        .await
                }
            };
            self.count_settled(counter, settled);
        };
        settle.instrument(span).await;
    }

    /// Counts a settlement once the provider has it (or its failure).
    fn count_settled(&self, counter: &AtomicU64, settled: cloudbus_driver::Result<()>) {
        match settled {
            Ok(()) => {
                counter.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                self.stats.settle_errors.fetch_add(1, Ordering::Relaxed);
                if crate::health::is_connection_error(&e) {
                    self.health.side_call_failed(&e);
                }
                tracing::warn!(error = %e, "settlement failed; the event will come back when its lease expires");
            }
        }
    }

    /// Acks handled deliveries together, in as few provider calls as the driver
    /// allows; those whose ack failed transiently go on alone through
    /// [`ack_with_retries`](Self::ack_with_retries) from the second attempt on.
    async fn ack_together(&self, group: Vec<Held>) {
        let deliveries: Vec<&Delivery> = group.iter().map(|held| &*held.delivery).collect();
        let results = self
            .consumer
            .settle_refs(&deliveries, cloudbus_driver::driver::Settlement::Ack)
            .await;
        let mut again = Vec::new();
        for (delivery, result) in deliveries.iter().zip(results) {
            match result {
                Err(e) if e.is_retryable() => {
                    tracing::debug!(error = %e, "ack failed; trying again");
                    again.push(*delivery);
                }
                settled => self.count_settled(&self.stats.acked, settled),
            }
        }
        futures::future::join_all(again.into_iter().map(|delivery| async move {
            let settled = self.ack_with_retries(delivery, 2).await;
            self.count_settled(&self.stats.acked, settled);
        }))
        .await;
    }

    /// Acks, trying again (up to `ACK_ATTEMPTS` in all, backing off) while the
    /// failure is transient: an ack that fails brings the event back as a duplicate
    /// once its lease runs out. An ack whose reply was lost may answer the retry with a
    /// permanent error (already settled); that is counted as a settle error, and the
    /// event is not handled again.
    async fn ack_with_retries(
        &self,
        delivery: &Delivery,
        first: u32,
    ) -> cloudbus_driver::Result<()> {
        let backoff = RetryPolicy::default();
        let mut attempt = first;
        if attempt > 1 {
            let pause = backoff.backoff(attempt - 1);
            tokio::select! {
                _ = tokio::time::sleep(pause) => {},
                _ = self.hard_stopped() => {},
            }
        }
        loop {
            match delivery.ack().await {
                Err(e) if e.is_retryable() && attempt < ACK_ATTEMPTS => {
                    let pause = backoff.backoff(attempt);
                    tracing::debug!(error = %e, attempt, ?pause, "ack failed; trying again");
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {},
                        _ = self.hard_stopped() => return Err(e),
                    }
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Nacks for another attempt with backoff, or dead-letters after the last one.
    /// Returns the counter to bump when the settlement succeeds.
    async fn retry_or_dead_letter(
        &self,
        delivery: &Delivery,
        message: String,
        delay: Option<Duration>,
    ) -> (&AtomicU64, cloudbus_driver::Result<()>) {
        let attempt = delivery.attempt();
        let max = self.options.retry.max_attempts;
        if attempt >= max {
            tracing::warn!(attempt, %message, "last attempt failed; dead-lettering");
            let r = delivery
                .dead_letter_with(format!("max delivery attempts ({max}) exceeded"), message)
                .await;
            (&self.stats.dead_lettered, r)
        } else {
            let delay = delay.unwrap_or_else(|| self.options.retry.backoff(attempt));
            tracing::debug!(attempt, %message, ?delay, "handler failed; nacking for a retry");
            if self.consumer.capabilities().nack_delay || delay.is_zero() {
                return (&self.stats.retried, delivery.nack(delay).await);
            }
            // The broker redelivers at once (Service Bus abandon): the backoff would be
            // lost and every attempt burnt within a second. Hold the delivery (the lease
            // keeper keeps its lease) for the backoff, then release it.
            self.hold(delay).await;
            (&self.stats.retried, delivery.nack(Duration::ZERO).await)
        }
    }

    /// Waits `delay`, or until the shutdown deadline.
    async fn hold(&self, delay: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(delay) => {},
            _ = self.hard_stopped() => {},
        }
    }
}

#[cfg(test)]
mod tests {

    use async_trait::async_trait;

    use super::*;
    use cloudbus_driver::capabilities::Capabilities;
    use cloudbus_driver::driver::{
        AckToken, BatchResults, ReceivedMessage, Settlement, SubscriptionDriver,
    };
    use cloudbus_driver::event::{AttributesReader, EventBuilder};

    /// Hands out two events of one ordering key in one receive, with a short lease,
    /// and records every settlement with its time.
    struct OneKeyTwice {
        lease: Duration,
        handed_out: std::sync::atomic::AtomicBool,
        settled: Mutex<Vec<(u64, Settlement, Instant)>>,
    }

    #[async_trait]
    impl SubscriptionDriver for OneKeyTwice {
        async fn receive_batch(
            &self,
            max: usize,
            wait: Duration,
        ) -> cloudbus_driver::Result<Vec<ReceivedMessage>> {
            if max < 2 || self.handed_out.swap(true, Ordering::AcqRel) {
                tokio::time::sleep(wait).await;
                return Ok(Vec::new());
            }
            let message = |n: u64| ReceivedMessage {
                event: Ok(Arc::new(
                    EventBuilder::new("com.example.step", "/test")
                        .id(format!("e{n}"))
                        .build()
                        .expect("event"),
                )),
                token: AckToken::Number(n),
                attempt: 1,
                lease: Some(self.lease),
                published_at: None,
                ordering_key: Some("k".into()),
                size: 100,
                partition: None,
                offset: None,
            };
            Ok(vec![message(1), message(2)])
        }
        async fn settle_batch(
            &self,
            items: &[(AckToken, Settlement)],
        ) -> cloudbus_driver::Result<BatchResults> {
            let mut settled = self.settled.lock().expect("lock");
            for (token, settlement) in items {
                let AckToken::Number(n) = token else {
                    unreachable!("numeric tokens only")
                };
                settled.push((*n, settlement.clone(), Instant::now()));
            }
            Ok(items.iter().map(|_| Ok(())).collect())
        }
        fn capabilities(&self) -> Capabilities {
            {
                let mut caps = Capabilities::default();
                caps.ordering = true;
                caps.lease_extension = true;
                caps
            }
        }
    }

    /// Hands out two events without an ordering key once (one batch), keeping only
    /// weak references to them, and acks every settlement.
    #[derive(Default)]
    struct UnorderedOnce {
        handed_out: std::sync::atomic::AtomicBool,
        events: Mutex<Vec<std::sync::Weak<cloudbus_driver::Event>>>,
    }

    #[async_trait]
    impl SubscriptionDriver for UnorderedOnce {
        async fn receive_batch(
            &self,
            _max: usize,
            wait: Duration,
        ) -> cloudbus_driver::Result<Vec<ReceivedMessage>> {
            if self.handed_out.swap(true, Ordering::AcqRel) {
                tokio::time::sleep(wait).await;
                return Ok(Vec::new());
            }
            let mut out = Vec::new();
            for n in 0..2u64 {
                let event = Arc::new(EventBuilder::new("com.example.step", "/test").build()?);
                self.events
                    .lock()
                    .expect("lock")
                    .push(Arc::downgrade(&event));
                out.push(ReceivedMessage {
                    event: Ok(event),
                    token: AckToken::Number(n),
                    attempt: 1,
                    lease: None,
                    published_at: None,
                    ordering_key: None,
                    size: 100,
                    partition: None,
                    offset: None,
                });
            }
            Ok(out)
        }
        async fn settle_batch(
            &self,
            items: &[(AckToken, Settlement)],
        ) -> cloudbus_driver::Result<BatchResults> {
            Ok(items.iter().map(|_| Ok(())).collect())
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities::default()
        }
    }

    /// A batch's task ends once its deliveries are handled and settled, and lets the
    /// events go. It used to wait for the shutdown deadline, so a running worker kept
    /// every event it had handled, and every shutdown took the whole deadline.
    #[tokio::test]
    async fn a_handled_batch_lets_its_events_go() {
        let driver = Arc::new(UnorderedOnce::default());
        let consumer = Consumer::new(driver.clone(), "lets-go");
        let worker = consumer
            .start_worker(
                |_event: Arc<cloudbus_driver::Event>, _ctx: HandlerContext| async move {
                    Ok::<(), HandlerError>(())
                },
                WorkerOptions::default().concurrency(4),
            )
            .expect("the router's wiring");
        let deadline = Instant::now() + Duration::from_secs(5);
        while worker.stats().acked < 2 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(worker.stats().acked, 2);
        let alive = || {
            driver
                .events
                .lock()
                .expect("lock")
                .iter()
                .filter(|e| e.strong_count() > 0)
                .count()
        };
        let deadline = Instant::now() + Duration::from_secs(2);
        while alive() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(alive(), 0, "the running worker still holds handled events");
        let report = worker.shutdown(Duration::from_secs(30)).await;
        assert_eq!(report.acked, 2, "{report:?}");
    }

    /// A delivery queued behind a slow one of its ordering key keeps its lease while
    /// it waits (it used to be extended only once its own handler ran, so it lapsed
    /// and came back as a duplicate).
    #[tokio::test]
    async fn a_delivery_queued_behind_its_key_keeps_its_lease() {
        let driver = Arc::new(OneKeyTwice {
            lease: Duration::from_millis(200),
            handed_out: Default::default(),
            settled: Mutex::new(Vec::new()),
        });
        let consumer = Consumer::new(driver.clone(), "queued-lease");
        let worker = consumer
            .start_worker(
                |event: Arc<cloudbus_driver::Event>, _ctx: HandlerContext| async move {
                    if event.id() == "e1" {
                        tokio::time::sleep(Duration::from_millis(700)).await;
                    }
                    Ok::<(), HandlerError>(())
                },
                WorkerOptions::default().concurrency(4),
            )
            .expect("the router's wiring");
        let deadline = Instant::now() + Duration::from_secs(5);
        while worker.stats().acked < 2 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let report = worker.shutdown(Duration::from_secs(1)).await;
        assert_eq!(report.acked, 2, "{report:?}");
        let settled = driver.settled.lock().expect("lock").clone();
        let first_acked = settled
            .iter()
            .find(|(n, s, _)| *n == 1 && matches!(s, Settlement::Ack))
            .map(|(_, _, at)| *at)
            .expect("e1 acked");
        let queued_extensions = settled
            .iter()
            .filter(|(n, s, at)| {
                *n == 2 && matches!(s, Settlement::Extend { .. }) && *at < first_acked
            })
            .count();
        // 700 ms of waiting with a 200 ms lease: an extension every 100 ms or so.
        assert!(
            queued_extensions >= 3,
            "the queued delivery was extended {queued_extensions} times while it waited: {settled:?}"
        );
    }

    /// Hands out one event per receive, for ever, and takes 30 s to tell its depth
    /// (a management endpoint that does not answer).
    #[derive(Default)]
    struct SlowDepth {
        received: AtomicU64,
        depth_reads: AtomicU64,
    }

    #[async_trait]
    impl SubscriptionDriver for SlowDepth {
        async fn receive_batch(
            &self,
            _max: usize,
            _wait: Duration,
        ) -> cloudbus_driver::Result<Vec<ReceivedMessage>> {
            let n = self.received.fetch_add(1, Ordering::SeqCst);
            Ok(vec![ReceivedMessage {
                event: Ok(Arc::new(
                    EventBuilder::new("com.example.step", "/test").build()?,
                )),
                token: AckToken::Number(n),
                attempt: 1,
                lease: None,
                published_at: None,
                ordering_key: None,
                size: 100,
                partition: None,
                offset: None,
            }])
        }
        async fn settle_batch(
            &self,
            items: &[(AckToken, Settlement)],
        ) -> cloudbus_driver::Result<BatchResults> {
            Ok(items.iter().map(|_| Ok(())).collect())
        }
        async fn queue_depth(&self) -> Option<u64> {
            self.depth_reads.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_secs(30)).await;
            Some(0)
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities::default()
        }
    }

    /// Issue 28 item 9: the worker read the queue depth inline on its receive loop,
    /// so a depth that took 30 s to answer let it receive one batch per 30 s and shut
    /// down 30 s late.
    #[tokio::test]
    async fn a_slow_queue_depth_never_slows_receiving_or_shutdown() {
        let driver = Arc::new(SlowDepth::default());
        let consumer = Consumer::new(driver.clone(), "slow-depth");
        let worker = consumer
            .start_worker(
                |_event: Arc<cloudbus_driver::Event>, _ctx: HandlerContext| async move {
                    Ok::<(), HandlerError>(())
                },
                WorkerOptions::default().concurrency(2),
            )
            .expect("the router's wiring");
        tokio::time::sleep(Duration::from_millis(500)).await;
        let started = Instant::now();
        let report = worker.shutdown(Duration::from_secs(5)).await;
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "shutdown took {:?}",
            started.elapsed()
        );
        assert!(report.acked >= 20, "{report:?}");
        assert!(driver.depth_reads.load(Ordering::SeqCst) >= 1);
    }

    /// Counts receive calls and hands out nothing.
    #[derive(Default)]
    struct CountsReceives {
        receives: AtomicU64,
    }

    #[async_trait]
    impl SubscriptionDriver for CountsReceives {
        async fn receive_batch(
            &self,
            _max: usize,
            wait: Duration,
        ) -> cloudbus_driver::Result<Vec<ReceivedMessage>> {
            self.receives.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(wait).await;
            Ok(Vec::new())
        }
        async fn settle_batch(
            &self,
            items: &[(AckToken, Settlement)],
        ) -> cloudbus_driver::Result<BatchResults> {
            Ok(items.iter().map(|_| Ok(())).collect())
        }
        fn capabilities(&self) -> Capabilities {
            Capabilities::default()
        }
    }

    /// Issue 30: a router that lacks what a route takes does not start and receives
    /// nothing, wrapped (in an `Idempotent`, in an `Arc`) or not; wired, it starts.
    #[tokio::test]
    async fn a_miswired_router_neither_starts_nor_receives() {
        use crate::router::State;
        #[derive(Clone)]
        struct Db;
        let driver = Arc::new(CountsReceives::default());
        let consumer = Consumer::new(driver.clone(), "miswired");
        let route = |State(_db): State<Db>| async { Ok::<(), HandlerError>(()) };
        let router = crate::Router::new().route_type("com.example.step", route);
        let wrapped = Arc::new(crate::Idempotent::new(
            router.clone(),
            Arc::new(crate::MemoryDedupStore::new(10)),
        ));
        for started in [
            consumer.start_worker(router, WorkerOptions::default()),
            consumer.start_worker(wrapped, WorkerOptions::default()),
        ] {
            let Err(e) = started else {
                panic!("a miswired router started")
            };
            assert_eq!(e.kind(), cloudbus_driver::ErrorKind::InvalidArgument);
            assert!(
                e.message()
                    .contains("route \"com.example.step\" takes State<"),
                "{e}"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(driver.receives.load(Ordering::SeqCst), 0);

        let wired = crate::Router::new()
            .state(Db)
            .route_type("com.example.step", route);
        let worker = consumer
            .start_worker(
                wired,
                WorkerOptions::default().receive_wait(Duration::from_millis(10)),
            )
            .expect("the router's wiring");
        let deadline = Instant::now() + Duration::from_secs(5);
        while driver.receives.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(driver.receives.load(Ordering::SeqCst) > 0);
        worker.shutdown(Duration::from_secs(1)).await;
    }
}
