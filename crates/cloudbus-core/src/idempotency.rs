//! Idempotent consumption: a handler wrapper that processes each (source, id) once,
//! with a pluggable [`DedupStore`] and an in-memory store with TTL.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::worker::{Handler, HandlerContext, HandlerError};
use cloudbus_driver::error::{Error, ErrorKind, Result};
use cloudbus_driver::event::{AttributesReader, Event};

/// The state of a key in a [`DedupStore`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Claim {
    /// First sighting: the caller now owns the key and must complete or release it.
    Claimed,
    /// Another delivery of the same event is being processed.
    InProgress,
    /// Processed already.
    Done,
}

/// Remembers which events were processed.
///
/// A claim belongs to an owner (a token unique to one delivery's handling): only its
/// owner renews or releases it, and a claim whose lease passed (its owner crashed or
/// hangs) is taken over by the next claimant, so a stale owner's late `release`
/// never frees a claim another delivery holds now.
#[async_trait]
pub trait DedupStore: Send + Sync + 'static {
    /// Claims `key` for `owner` for at most `lease`. A key `owner` holds already is
    /// claimed again (its lease starts anew: a renewal); a key another owner holds
    /// with a lease still running is [`Claim::InProgress`]; a claim whose lease
    /// passed is taken over.
    async fn claim(&self, key: &str, owner: &str, lease: Duration) -> Result<Claim>;
    /// Marks `key` processed, remembered for `ttl`, whoever holds its claim.
    async fn complete(&self, key: &str, ttl: Duration) -> Result<()>;
    /// Releases `owner`'s claim after a failure, so a redelivery can try again. A key
    /// already completed stays completed, and a claim held by another owner stays.
    async fn release(&self, key: &str, owner: &str) -> Result<()>;
}

#[derive(Clone)]
enum Entry {
    Claimed { until: Instant, owner: String },
    Done(Instant),
}

impl Entry {
    fn until(&self) -> Instant {
        match self {
            Entry::Claimed { until, .. } | Entry::Done(until) => *until,
        }
    }
}

/// The map and the order in which keys were written, for eviction.
#[derive(Default)]
struct DedupTable {
    /// key -> (state, write generation)
    entries: HashMap<String, (Entry, u64)>,
    /// (key, generation) in write order; an item whose generation no longer matches
    /// the map was rewritten later and is skipped.
    order: VecDeque<(String, u64)>,
    generation: u64,
}

impl DedupTable {
    fn put(&mut self, key: &str, entry: Entry) {
        self.generation += 1;
        self.entries
            .insert(key.to_owned(), (entry, self.generation));
        self.order.push_back((key.to_owned(), self.generation));
    }

    /// Removes the entry written longest ago (all TTLs and leases of one store being
    /// alike, that is the one closest to expiry); expired entries go first anyway.
    fn evict_oldest(&mut self) {
        while let Some((key, generation)) = self.order.pop_front() {
            if self
                .entries
                .get(&key)
                .is_some_and(|(_, g)| *g == generation)
            {
                self.entries.remove(&key);
                return;
            }
        }
    }

    /// Drops stale order items once they outnumber the live keys.
    fn compact(&mut self) {
        if self.order.len() > 2 * self.entries.len() + 64 {
            let entries = &self.entries;
            self.order
                .retain(|(k, g)| entries.get(k).is_some_and(|(_, live)| live == g));
        }
    }
}

/// An in-process [`DedupStore`] with TTLs and a size bound. At the bound the oldest
/// key is forgotten (expired keys first): a new event is never refused, at the cost
/// of possibly handling a very old event a second time if it is redelivered after
/// its key was evicted.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use std::time::Duration;
/// use cloudbus_core::{Claim, DedupStore, MemoryDedupStore};
/// let store = MemoryDedupStore::new(10_000);
/// assert_eq!(store.claim("k", "owner-1", Duration::from_secs(30)).await.unwrap(), Claim::Claimed);
/// store.complete("k", Duration::from_secs(3600)).await.unwrap();
/// assert_eq!(store.claim("k", "owner-2", Duration::from_secs(30)).await.unwrap(), Claim::Done);
/// # });
/// ```
pub struct MemoryDedupStore {
    table: Mutex<DedupTable>,
    max_entries: usize,
}

impl MemoryDedupStore {
    /// A store remembering at most `max_entries` keys.
    pub fn new(max_entries: usize) -> Self {
        MemoryDedupStore {
            table: Mutex::new(DedupTable::default()),
            max_entries: max_entries.max(1),
        }
    }

    /// How many keys are remembered now.
    pub fn len(&self) -> usize {
        self.table.lock().map(|t| t.entries.len()).unwrap_or(0)
    }

    /// Whether no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, DedupTable>> {
        self.table
            .lock()
            .map_err(|_| Error::new(ErrorKind::Internal, "dedup store lock poisoned"))
    }
}

#[async_trait]
impl DedupStore for MemoryDedupStore {
    async fn claim(&self, key: &str, owner: &str, lease: Duration) -> Result<Claim> {
        let now = Instant::now();
        let mut table = self.lock()?;
        match table.entries.get(key).map(|(e, _)| e) {
            Some(Entry::Done(until)) if *until > now => return Ok(Claim::Done),
            Some(Entry::Claimed { until, owner: held }) if *until > now && held != owner => {
                return Ok(Claim::InProgress);
            }
            _ => {}
        }
        if !table.entries.contains_key(key) && table.entries.len() >= self.max_entries {
            table.entries.retain(|_, (e, _)| e.until() > now);
            while table.entries.len() >= self.max_entries {
                table.evict_oldest();
            }
        }
        table.put(
            key,
            Entry::Claimed {
                until: now + lease,
                owner: owner.to_owned(),
            },
        );
        table.compact();
        Ok(Claim::Claimed)
    }

    async fn complete(&self, key: &str, ttl: Duration) -> Result<()> {
        let mut table = self.lock()?;
        if !table.entries.contains_key(key) && table.entries.len() >= self.max_entries {
            table.evict_oldest();
        }
        table.put(key, Entry::Done(Instant::now() + ttl));
        table.compact();
        Ok(())
    }

    async fn release(&self, key: &str, owner: &str) -> Result<()> {
        let mut table = self.lock()?;
        if matches!(table.entries.get(key), Some((Entry::Claimed { owner: held, .. }, _)) if held == owner)
        {
            table.entries.remove(key);
        }
        Ok(())
    }
}

/// Wraps a handler so that each (source, id) is processed once: duplicates are acked
/// without calling the inner handler.
///
/// ```
/// use std::sync::Arc;
/// use cloudbus_core::{Event, HandlerContext, HandlerError, Idempotent, MemoryDedupStore};
/// let handler = Idempotent::new(
///     |_e: Arc<Event>, _c: HandlerContext| async { Ok::<(), HandlerError>(()) },
///     Arc::new(MemoryDedupStore::new(100_000)),
/// );
/// let duplicates = handler.duplicates();
/// # let _ = duplicates;
/// ```
pub struct Idempotent<H> {
    inner: H,
    once: OncePerEvent,
}

impl<H: Handler> Idempotent<H> {
    /// Wraps `inner`; processed keys are remembered for 24 h by default.
    pub fn new(inner: H, store: Arc<dyn DedupStore>) -> Self {
        Idempotent {
            inner,
            once: OncePerEvent::new(store),
        }
    }
    /// How long processed keys are remembered.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.once.ttl = ttl;
        self
    }
    /// How long a claim outlives a process that crashed while handling (default
    /// 30 s): a live handler renews its claim every third of it, and a redelivery of
    /// the same event waits up to one lease for the claim to be completed, released
    /// or taken over, without spending a delivery attempt. In a router, apply
    /// [`TimeoutLayer`](crate::router::layers::TimeoutLayer) before the idempotency
    /// layer (so that this one wraps it), or the wait counts against the timeout.
    pub fn claim_lease(mut self, lease: Duration) -> Self {
        self.once.set_lease(lease);
        self
    }
    /// A counter of duplicates skipped, readable while the worker runs.
    pub fn duplicates(&self) -> Arc<AtomicU64> {
        self.once.duplicates.clone()
    }
    /// The dedup key of an event: source and id.
    pub fn key(event: &Event) -> String {
        OncePerEvent::key(event)
    }
}

/// How long a claim is held before another delivery may take it over, unless its
/// owner renews it (it does, while its handler runs).
const DEFAULT_CLAIM_LEASE: Duration = Duration::from_secs(30);

/// The one implementation of "each (source, id) once" on a [`DedupStore`], shared by
/// [`Idempotent`] and the router's idempotency layer: claim the key, run the
/// handling while renewing the claim, then mark the key done (success) or free it
/// (failure, panic, cancellation). A key another delivery holds is waited out (up to
/// the claim lease: a live holder finishes, a dead one's claim lapses and is taken
/// over) instead of answered with a retry, which would spend the delivery's attempts
/// and dead-letter an event nobody handled.
#[derive(Clone)]
pub(crate) struct OncePerEvent {
    store: Arc<dyn DedupStore>,
    pub(crate) ttl: Duration,
    pub(crate) lease: Duration,
    pub(crate) duplicates: Arc<AtomicU64>,
}

impl OncePerEvent {
    pub(crate) fn new(store: Arc<dyn DedupStore>) -> Self {
        OncePerEvent {
            store,
            ttl: Duration::from_secs(24 * 3600),
            lease: DEFAULT_CLAIM_LEASE,
            duplicates: Arc::new(AtomicU64::new(0)),
        }
    }

    pub(crate) fn key(event: &Event) -> String {
        format!("{}\u{1f}{}", event.source(), event.id())
    }

    /// Sets the claim lease; a zero lease would make every claim lapse at once.
    pub(crate) fn set_lease(&mut self, lease: Duration) {
        self.lease = lease.max(Duration::from_millis(10));
    }

    /// How often a waiting delivery asks again, and a holder renews its claim.
    fn poll_period(&self) -> Duration {
        (self.lease / 10).clamp(Duration::from_millis(20), Duration::from_secs(1))
    }

    /// Claims `key` for `owner`, waiting while another delivery holds it (its
    /// delivery's lease is kept by the worker meanwhile). After a whole lease of
    /// waiting the holder is alive and renewing: a retry, later, is all that is left.
    async fn claim_or_wait(&self, key: &str, owner: &str) -> Result<Claim, HandlerError> {
        let deadline = tokio::time::Instant::now() + self.lease + self.poll_period();
        loop {
            let claim = self
                .store
                .claim(key, owner, self.lease)
                .await
                .map_err(|e| {
                    // The store being away says nothing about the event: try again later.
                    HandlerError::retry(format!("dedup store: {e}"))
                })?;
            if claim != Claim::InProgress {
                return Ok(claim);
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(HandlerError::retry_after(
                    "the same event is being processed by another delivery",
                    self.poll_period(),
                ));
            }
            tokio::time::sleep(self.poll_period()).await;
        }
    }

    /// Renews `owner`'s claim on `key` every third of the lease, for as long as the
    /// handling runs (the caller drops this future when it ends).
    async fn renew_claim(&self, key: &str, owner: &str) {
        let period = (self.lease / 3).max(Duration::from_millis(5));
        loop {
            tokio::time::sleep(period).await;
            match self.store.claim(key, owner, self.lease).await {
                Ok(Claim::Claimed) => {}
                Ok(other) => {
                    tracing::warn!(state = ?other, "a dedup claim was lost while its handler ran; another delivery may run the event too");
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not renew a dedup claim; it lapses with its lease unless a later renewal succeeds")
                }
            }
        }
    }

    /// Runs `handling` unless `event` was handled already (then `Ok` at once); waits
    /// while another delivery handles it.
    pub(crate) async fn run<F>(&self, event: &Event, handling: F) -> Result<(), HandlerError>
    where
        F: std::future::Future<Output = Result<(), HandlerError>>,
    {
        let key = Self::key(event);
        let owner = uuid::Uuid::new_v4().simple().to_string();
        match self.claim_or_wait(&key, &owner).await? {
            // claim_or_wait answers a retry rather than this.
            Claim::InProgress => Err(HandlerError::retry_after(
                "the same event is being processed by another delivery",
                self.poll_period(),
            )),
            Claim::Done => {
                self.duplicates.fetch_add(1, Ordering::Relaxed);
                tracing::info!(event_id = %event.id(), source = %event.source(), "duplicate event skipped");
                Ok(())
            }
            Claim::Claimed => {
                let guard = ClaimGuard {
                    store: self.store.clone(),
                    claim: Some((key.clone(), owner.clone())),
                };
                let outcome = {
                    let renewal = self.renew_claim(&key, &owner);
                    tokio::pin!(renewal, handling);
                    tokio::select! {
                        outcome = &mut handling => outcome,
                        () = &mut renewal => handling.await,
                    }
                };
                guard.keep();
                match outcome {
                    Ok(()) => {
                        // The event was handled: ack it whatever the store says. If the
                        // mark is lost, the claim lapses with its lease, and only a
                        // redelivery after that would run the handler again.
                        if let Err(e) = self.store.complete(&key, self.ttl).await {
                            tracing::warn!(error = %e, "handled, but the dedup store did not record it");
                        }
                        Ok(())
                    }
                    Err(handler_error) => {
                        if let Err(e) = self.store.release(&key, &owner).await {
                            tracing::warn!(error = %e, "could not release a dedup claim; it lapses with its lease");
                        }
                        Err(handler_error)
                    }
                }
            }
        }
    }
}

/// Releases a claim when dropped before [`ClaimGuard::keep`]: a handler that panicked
/// or was cancelled (a shutdown deadline, a lost lease) must not leave its event
/// "in progress" until the lease runs out, or every redelivery would wait for it.
struct ClaimGuard {
    store: Arc<dyn DedupStore>,
    /// (key, owner)
    claim: Option<(String, String)>,
}

impl ClaimGuard {
    /// The claim is settled by the caller (completed or released); do nothing on drop.
    fn keep(mut self) {
        self.claim = None;
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        let Some((key, owner)) = self.claim.take() else {
            return;
        };
        let store = self.store.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    if let Err(e) = store.release(&key, &owner).await {
                        tracing::warn!(error = %e, "could not release a dedup claim; it lapses with its lease");
                    }
                });
            }
            Err(_) => {
                tracing::warn!("no runtime to release a dedup claim; it lapses with its lease")
            }
        }
    }
}

#[async_trait]
impl<H: Handler> Handler for Idempotent<H> {
    async fn handle(&self, event: Arc<Event>, ctx: HandlerContext) -> Result<(), HandlerError> {
        let handling = self.inner.handle(event.clone(), ctx);
        self.once.run(&event, handling).await
    }

    /// The inner handler's ([`Handler::check_wiring`]).
    fn check_wiring(&self) -> Result<()> {
        self.inner.check_wiring()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn claims_expire_and_in_progress_is_reported() {
        let s = MemoryDedupStore::new(2);
        assert_eq!(
            s.claim("a", "o1", Duration::from_millis(1)).await.unwrap(),
            Claim::Claimed
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(
            s.claim("a", "o2", Duration::from_secs(9)).await.unwrap(),
            Claim::Claimed
        );
        assert_eq!(
            s.claim("a", "o3", Duration::from_secs(9)).await.unwrap(),
            Claim::InProgress
        );
        s.release("a", "o2").await.unwrap();
        assert_eq!(
            s.claim("a", "o3", Duration::from_secs(9)).await.unwrap(),
            Claim::Claimed
        );
    }

    /// Issue 28 item 20: a stale owner's release (its lease passed, another delivery
    /// took the claim over) freed the new owner's claim, so a third delivery ran the
    /// event at the same time. Only the owner releases; the owner renews.
    #[tokio::test]
    async fn only_the_owner_releases_or_renews_a_claim() {
        let s = MemoryDedupStore::new(10);
        let short = Duration::from_millis(5);
        assert_eq!(s.claim("k", "a", short).await.unwrap(), Claim::Claimed);
        tokio::time::sleep(Duration::from_millis(15)).await;
        let long = Duration::from_secs(30);
        assert_eq!(s.claim("k", "b", long).await.unwrap(), Claim::Claimed);
        s.release("k", "a").await.unwrap();
        assert_eq!(s.claim("k", "c", long).await.unwrap(), Claim::InProgress);
        // b renews its own claim.
        assert_eq!(s.claim("k", "b", long).await.unwrap(), Claim::Claimed);
        s.release("k", "b").await.unwrap();
        assert_eq!(s.claim("k", "c", long).await.unwrap(), Claim::Claimed);
    }

    /// Issue 12 item 7: at capacity the store refused every new key (ResourceExhausted),
    /// so every new event was dead-lettered. It evicts the oldest key instead.
    #[tokio::test]
    async fn full_store_evicts_the_oldest_and_never_refuses() {
        let s = MemoryDedupStore::new(3);
        for k in ["a", "b", "c"] {
            assert_eq!(
                s.claim(k, "o", Duration::from_secs(9)).await.unwrap(),
                Claim::Claimed
            );
            s.complete(k, Duration::from_secs(3600)).await.unwrap();
        }
        for n in 0..100 {
            let key = format!("new-{n}");
            assert_eq!(
                s.claim(&key, "o", Duration::from_secs(9)).await.unwrap(),
                Claim::Claimed,
                "key {key} refused"
            );
            s.complete(&key, Duration::from_secs(3600)).await.unwrap();
            assert!(s.len() <= 3, "{} keys kept", s.len());
        }
        // The newest are remembered, the oldest forgotten.
        assert_eq!(
            s.claim("new-99", "o", Duration::from_secs(9))
                .await
                .unwrap(),
            Claim::Done
        );
        assert_eq!(
            s.claim("a", "o", Duration::from_secs(9)).await.unwrap(),
            Claim::Claimed
        );
        let order_len = s.lock().unwrap().order.len();
        assert!(order_len < 100, "the eviction order grew to {order_len}");
    }

    fn test_event() -> Arc<Event> {
        Arc::new(
            cloudbus_driver::EventBuilder::new("com.example.test", "/test")
                .build()
                .unwrap(),
        )
    }

    fn test_ctx() -> HandlerContext {
        HandlerContext::new(1, "test")
    }

    /// Issue 12 item 6: a handler that panicked kept its claim, so every redelivery got
    /// InProgress until the attempts ran out and the event was dead-lettered unhandled.
    #[tokio::test]
    async fn a_panicking_handler_releases_its_claim() {
        use futures::FutureExt;
        let store = Arc::new(MemoryDedupStore::new(100));
        let calls = Arc::new(AtomicU64::new(0));
        let c = calls.clone();
        let handler = Idempotent::new(
            move |_e: Arc<Event>, _c: HandlerContext| {
                let c = c.clone();
                async move {
                    if c.fetch_add(1, Ordering::SeqCst) == 0 {
                        panic!("first attempt blows up");
                    }
                    Ok::<(), HandlerError>(())
                }
            },
            store.clone(),
        );
        let event = test_event();
        let first = std::panic::AssertUnwindSafe(handler.handle(event.clone(), test_ctx()))
            .catch_unwind()
            .await;
        assert!(first.is_err(), "the panic unwinds to the worker");
        tokio::time::sleep(Duration::from_millis(20)).await;
        handler.handle(event.clone(), test_ctx()).await.unwrap();
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "the redelivery was handled"
        );
    }

    /// A cancelled handler (shutdown deadline) releases its claim too.
    #[tokio::test]
    async fn a_cancelled_handler_releases_its_claim() {
        let store = Arc::new(MemoryDedupStore::new(100));
        let handler = Arc::new(Idempotent::new(
            |_e: Arc<Event>, c: HandlerContext| async move {
                if c.attempt == 1 {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                }
                Ok::<(), HandlerError>(())
            },
            store.clone(),
        ));
        let event = test_event();
        let cancelled = tokio::time::timeout(
            Duration::from_millis(20),
            handler.handle(event.clone(), test_ctx()),
        )
        .await;
        assert!(cancelled.is_err());
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut ctx = test_ctx();
        ctx.attempt = 2;
        handler.handle(event, ctx).await.unwrap();
    }

    /// A store that fails every `complete`.
    struct ForgetfulStore(MemoryDedupStore);

    #[async_trait]
    impl DedupStore for ForgetfulStore {
        async fn claim(&self, key: &str, owner: &str, lease: Duration) -> Result<Claim> {
            self.0.claim(key, owner, lease).await
        }
        async fn complete(&self, _key: &str, _ttl: Duration) -> Result<()> {
            Err(Error::new(ErrorKind::Unavailable, "store is down"))
        }
        async fn release(&self, key: &str, owner: &str) -> Result<()> {
            self.0.release(key, owner).await
        }
    }

    /// Issue 12 item 6: a store error after a successful handler became a Reject and
    /// dead-lettered an event that had been handled.
    #[tokio::test]
    async fn a_store_error_after_success_still_acks() {
        let handler = Idempotent::new(
            |_e: Arc<Event>, _c: HandlerContext| async { Ok::<(), HandlerError>(()) },
            Arc::new(ForgetfulStore(MemoryDedupStore::new(10))),
        );
        assert!(handler.handle(test_event(), test_ctx()).await.is_ok());
    }

    /// Issue 28 item 2: a claim left by a process that crashed while handling made
    /// every redelivery answer "being processed by another delivery" (a retry after
    /// 500 ms, an attempt spent each time) until the event was dead-lettered with the
    /// handler never run. The redelivery now waits the claim out and takes it over.
    #[tokio::test]
    async fn a_claim_left_by_a_crashed_process_is_taken_over_without_spending_attempts() {
        let store = Arc::new(MemoryDedupStore::new(100));
        let lease = Duration::from_millis(200);
        let event = test_event();
        // The crashed process: claimed, never completed nor released.
        store
            .claim(&OncePerEvent::key(&event), "crashed", lease)
            .await
            .unwrap();
        let calls = Arc::new(AtomicU64::new(0));
        let c = calls.clone();
        let handler = Idempotent::new(
            move |_e: Arc<Event>, _c: HandlerContext| {
                let c = c.clone();
                async move {
                    c.fetch_add(1, Ordering::SeqCst);
                    Ok::<(), HandlerError>(())
                }
            },
            store.clone(),
        )
        .claim_lease(lease);
        handler.handle(event.clone(), test_ctx()).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1, "the handler ran once");
        // Handled: a later duplicate is skipped.
        handler.handle(event, test_ctx()).await.unwrap();
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(handler.duplicates().load(Ordering::SeqCst), 1);
    }

    /// A handler that runs longer than the claim lease renews its claim: after the
    /// first lease has passed, another delivery still finds it in progress.
    #[tokio::test]
    async fn a_long_handler_renews_its_claim() {
        let store = Arc::new(MemoryDedupStore::new(100));
        let handler = Arc::new(
            Idempotent::new(
                |_e: Arc<Event>, _c: HandlerContext| async move {
                    tokio::time::sleep(Duration::from_millis(400)).await;
                    Ok::<(), HandlerError>(())
                },
                store.clone(),
            )
            .claim_lease(Duration::from_millis(120)),
        );
        let event = test_event();
        let first = tokio::spawn({
            let (h, e) = (handler.clone(), event.clone());
            async move { h.handle(e, test_ctx()).await }
        });
        tokio::time::sleep(Duration::from_millis(250)).await;
        let probe = store
            .claim(&OncePerEvent::key(&event), "probe", Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(
            probe,
            Claim::InProgress,
            "the claim lapsed while its handler ran"
        );
        assert!(first.await.unwrap().is_ok());
    }

    /// A redelivery that arrives while the event is being handled waits for it and
    /// is acknowledged as a duplicate, instead of spending an attempt on a retry.
    #[tokio::test]
    async fn a_redelivery_during_handling_waits_and_is_a_duplicate() {
        let store = Arc::new(MemoryDedupStore::new(100));
        let calls = Arc::new(AtomicU64::new(0));
        let c = calls.clone();
        let handler = Arc::new(
            Idempotent::new(
                move |_e: Arc<Event>, _c: HandlerContext| {
                    let c = c.clone();
                    async move {
                        c.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        Ok::<(), HandlerError>(())
                    }
                },
                store.clone(),
            )
            .claim_lease(Duration::from_secs(2)),
        );
        let event = test_event();
        let first = tokio::spawn({
            let (h, e) = (handler.clone(), event.clone());
            async move { h.handle(e, test_ctx()).await }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let second = handler.handle(event, test_ctx()).await;
        assert!(first.await.unwrap().is_ok());
        assert!(second.is_ok(), "the redelivery waited: {second:?}");
        assert_eq!(calls.load(Ordering::SeqCst), 1, "handled once");
        assert_eq!(handler.duplicates().load(Ordering::SeqCst), 1);
    }
}
