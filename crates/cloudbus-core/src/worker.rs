//! The worker loop behind [`Consumer::start_worker`](crate::Consumer::start_worker):
//! bounded concurrency, flow control by outstanding deliveries and bytes (nothing is
//! pulled that cannot be handled at once, so no lease expires in a local buffer),
//! per-key ordering, retries through nack delays with exponential backoff and jitter,
//! dead-lettering after the last attempt, lease extension while a handler runs, and
//! graceful shutdown with a deadline.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tracing::Instrument;

use crate::consumer::{Consumer, Delivery};
pub use crate::handler::{Handler, HandlerContext, HandlerError, HandlerRunner};
use crate::retry::RetryPolicy;

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
    /// Extend the lease while a handler runs (when the provider grants leases).
    pub extend_leases: bool,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            concurrency: 16,
            max_outstanding_bytes: 64 * 1024 * 1024,
            receive_batch: 16,
            receive_wait: Duration::from_millis(500),
            retry: RetryPolicy::default(),
            extend_leases: true,
        }
    }
}

impl WorkerOptions {
    /// Sets the concurrency (and the receive batch to match).
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n.max(1);
        self.receive_batch = self.concurrency;
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
    /// ```
    /// use std::sync::Arc;
    /// use cloudbus_core::{
    ///     AttributesReader, Consumer, Event, HandlerContext, HandlerError, Worker, WorkerOptions,
    /// };
    ///
    /// fn start(consumer: &Consumer) -> Worker {
    ///     consumer.start_worker(
    ///         |event: Arc<Event>, _ctx: HandlerContext| async move {
    ///             println!("{}", event.id());
    ///             Ok::<(), HandlerError>(())
    ///         },
    ///         WorkerOptions::default().concurrency(8),
    ///     )
    /// }
    /// ```
    pub fn start_worker<H: Handler>(&self, handler: H, options: WorkerOptions) -> Worker {
        Worker::start(self.clone(), Arc::new(handler), options)
    }

    /// The name [`start_worker`](Consumer::start_worker) had (the README showed it);
    /// "subscription" means the broker's entity everywhere else.
    #[deprecated(since = "0.1.0", note = "renamed to `start_worker`")]
    pub fn subscribe<H: Handler>(&self, handler: H, options: WorkerOptions) -> Worker {
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
}

/// The deliveries waiting behind the one being handled, per ordering key.
type KeyQueues = Arc<Mutex<HashMap<String, VecDeque<(Delivery, Slot)>>>>;
/// A concurrency slot held from receipt until settlement.
type Slot = OwnedSemaphorePermit;

impl Worker {
    pub(crate) fn start(
        consumer: Consumer,
        handler: Arc<dyn Handler>,
        options: WorkerOptions,
    ) -> Worker {
        let (stop_pulling, stop_rx) = watch::channel(false);
        let (hard_stop, hard_rx) = watch::channel(false);
        let stats = Arc::new(WorkerCounters::default());
        let kib = (options.max_outstanding_bytes / 1024).clamp(1, Semaphore::MAX_PERMITS);
        let run = WorkerLoop {
            runner: HandlerRunner::with_metrics(
                consumer.inner.name.clone(),
                consumer.inner.metrics.clone(),
            ),
            consumer,
            handler,
            bytes: Arc::new(Semaphore::new(kib)),
            bytes_kib: kib,
            options,
            stats: stats.clone(),
            hard_stop: hard_rx,
            lanes: Arc::new(Mutex::new(HashMap::new())),
        };
        let main = tokio::spawn(run.run(stop_rx));
        Worker {
            stop_pulling,
            hard_stop,
            main,
            stats,
        }
    }

    /// The live counters.
    pub fn stats(&self) -> WorkerReport {
        self.stats.report()
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

struct WorkerLoop {
    consumer: Consumer,
    handler: Arc<dyn Handler>,
    /// Runs the handler as every consumer does (trace, span, panic, timing).
    runner: HandlerRunner,
    options: WorkerOptions,
    stats: Arc<WorkerCounters>,
    hard_stop: watch::Receiver<bool>,
    lanes: KeyQueues,
    /// Outstanding bytes, in KiB permits (`max_outstanding_bytes`).
    bytes: Arc<Semaphore>,
    bytes_kib: usize,
}

impl WorkerLoop {
    async fn run(self, mut stop: watch::Receiver<bool>) {
        let concurrency = self.options.concurrency.max(1);
        let slots = Arc::new(Semaphore::new(concurrency));
        let this = Arc::new(self);
        let mut tasks = JoinSet::new();
        let mut failures = 0u32;
        let mut depth_reported = Instant::now() - Duration::from_secs(60);
        loop {
            if *stop.borrow() {
                break;
            }
            let first = tokio::select! {
                p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
                _ = stop.changed() => break,
            };
            let mut permits = vec![first];
            let want = this.options.receive_batch.clamp(1, concurrency);
            while permits.len() < want {
                match slots.clone().try_acquire_owned() {
                    Ok(p) => permits.push(p),
                    Err(_) => break,
                }
            }
            // Reap finished tasks so the JoinSet does not grow.
            while tasks.try_join_next().is_some() {}
            // The event_queue_depth gauge, at most once a second.
            if depth_reported.elapsed() >= Duration::from_secs(1) {
                depth_reported = Instant::now();
                this.consumer.report_queue_depth().await;
            }
            let received = this
                .consumer
                .receive_batch(permits.len(), this.options.receive_wait)
                .await;
            let deliveries = match received {
                Ok(d) => {
                    failures = 0;
                    d
                }
                Err(e) if e.kind() == crate::ErrorKind::Closed => break,
                Err(e) => {
                    failures += 1;
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
            for (delivery, permits) in deliveries.into_iter().zip(permits.drain(..)) {
                let key = if this.consumer.capabilities().ordering {
                    delivery.ordering_key().map(str::to_owned)
                } else {
                    None
                };
                match key {
                    None => {
                        let w = this.clone();
                        tasks.spawn(async move { w.process(delivery, permits).await });
                    }
                    Some(key) => {
                        let busy = {
                            let Ok(mut lanes) = this.lanes.lock() else {
                                break;
                            };
                            match lanes.get_mut(&key) {
                                Some(q) => {
                                    q.push_back((delivery, permits));
                                    None
                                }
                                None => {
                                    lanes.insert(key.clone(), VecDeque::new());
                                    Some((delivery, permits))
                                }
                            }
                        };
                        if let Some((delivery, permits)) = busy {
                            let w = this.clone();
                            tasks.spawn(async move { w.run_lane(key, delivery, permits).await });
                        }
                    }
                }
            }
        }
        while tasks.join_next().await.is_some() {}
    }

    /// Handles the deliveries of one ordering key one after another.
    async fn run_lane(self: Arc<Self>, key: String, first: Delivery, permits: Slot) {
        let mut next = Some((first, permits));
        while let Some((delivery, permits)) = next.take() {
            self.process(delivery, permits).await;
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

    /// Takes the delivery's share of `max_outstanding_bytes`, extending its lease while
    /// it waits, so that a large delivery never sits in the local buffer with a lapsing
    /// lease. `None` when the shutdown deadline came first.
    async fn take_bytes(&self, delivery: &Delivery) -> Option<Option<OwnedSemaphorePermit>> {
        let need = (delivery.size() / 1024).clamp(1, self.bytes_kib) as u32;
        if let Ok(permit) = self.bytes.clone().try_acquire_many_owned(need) {
            return Some(Some(permit));
        }
        tokio::select! {
            p = self.bytes.clone().acquire_many_owned(need) => Some(p.ok()),
            _ = self.extend_while_running(delivery) => None,
            _ = self.hard_stopped() => None,
        }
    }

    async fn process(&self, delivery: Delivery, _slot: Slot) {
        let Some(_bytes) = self.take_bytes(&delivery).await else {
            tracing::warn!("shutdown deadline reached before handling; nacking for redelivery");
            match delivery.nack(Duration::ZERO).await {
                Ok(()) => self.stats.abandoned.fetch_add(1, Ordering::Relaxed),
                Err(_) => self.stats.settle_errors.fetch_add(1, Ordering::Relaxed),
            };
            return;
        };
        let event = delivery.event_arc();
        let started = Instant::now();
        let (span, handling) =
            self.runner
                .handle(self.handler.as_ref(), event.clone(), delivery.attempt());
        let outcome = tokio::select! {
            r = handling => Some(r),
            _ = self.extend_while_running(&delivery) => None,
            _ = self.hard_stopped() => None,
        };
        self.runner.processed(&event, started);
        let settle = async {
            let (counter, settled) = match outcome {
                None => {
                    tracing::warn!("shutdown deadline reached; nacking for redelivery");
                    (&self.stats.abandoned, delivery.nack(Duration::ZERO).await)
                }
                Some(Ok(Ok(()))) => (&self.stats.acked, self.ack_with_retries(&delivery).await),
                Some(Ok(Err(HandlerError::Reject { reason }))) => {
                    tracing::warn!(%reason, "handler rejected the event; dead-lettering");
                    (
                        &self.stats.dead_lettered,
                        delivery.dead_letter(format!("rejected: {reason}")).await,
                    )
                }
                Some(Ok(Err(HandlerError::Retry { message, delay }))) => {
                    self.retry_or_dead_letter(&delivery, message, delay).await
                }
                Some(Err(_panic)) => {
                    self.retry_or_dead_letter(&delivery, "handler panicked".into(), None)
                        .await
                }
            };
            // Counted once the provider has the settlement.
            match settled {
                Ok(()) => {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) => {
                    self.stats.settle_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(error = %e, "settlement failed; the event will come back when its lease expires");
                }
            }
        };
        settle.instrument(span).await;
    }

    /// Acks, trying again (up to `ACK_ATTEMPTS` in all, backing off) while the
    /// failure is transient: an ack that fails brings the event back as a duplicate
    /// once its lease runs out. An ack whose reply was lost may answer the retry with a
    /// permanent error (already settled); that is counted as a settle error, and the
    /// event is not handled again.
    async fn ack_with_retries(&self, delivery: &Delivery) -> crate::Result<()> {
        let backoff = RetryPolicy::default();
        let mut attempt = 1;
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
    ) -> (&AtomicU64, crate::Result<()>) {
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
            // lost and every attempt burnt within a second. Hold the delivery, with its
            // lease extended, for the backoff, then release it.
            self.hold(delivery, delay).await;
            (&self.stats.retried, delivery.nack(Duration::ZERO).await)
        }
    }

    /// Waits `delay` while keeping the delivery's lease, or until the shutdown deadline.
    async fn hold(&self, delivery: &Delivery, delay: Duration) {
        tokio::select! {
            _ = tokio::time::sleep(delay) => {},
            _ = self.extend_while_running(delivery) => {},
            _ = self.hard_stopped() => {},
        }
    }

    /// Extends the lease at half its length for as long as the handler runs; never returns.
    async fn extend_while_running(&self, delivery: &Delivery) {
        let lease = match delivery.lease() {
            Some(l)
                if self.options.extend_leases && self.consumer.capabilities().lease_extension =>
            {
                l
            }
            _ => return std::future::pending().await,
        };
        let every = (lease / 2).max(Duration::from_millis(50));
        loop {
            tokio::time::sleep(every).await;
            if let Err(e) = delivery.extend(lease).await {
                tracing::warn!(error = %e, "lease extension failed");
            }
        }
    }
}
