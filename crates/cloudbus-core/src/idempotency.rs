//! Idempotent consumption: a handler wrapper that processes each (source, id) once,
//! with a pluggable [`DedupStore`] and an in-memory store with TTL.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::error::{Error, ErrorKind, Result};
use crate::event::{AttributesReader, Event};
use crate::worker::{Handler, HandlerContext, HandlerError};

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
#[async_trait]
pub trait DedupStore: Send + Sync + 'static {
    /// Claims `key` for processing for at most `lease`.
    async fn claim(&self, key: &str, lease: Duration) -> Result<Claim>;
    /// Marks `key` processed, remembered for `ttl`.
    async fn complete(&self, key: &str, ttl: Duration) -> Result<()>;
    /// Releases a claim after a failure, so a redelivery can try again. A key already
    /// completed stays completed.
    async fn release(&self, key: &str) -> Result<()>;
}

#[derive(Clone, Copy)]
enum Entry {
    Claimed(Instant),
    Done(Instant),
}

impl Entry {
    fn until(self) -> Instant {
        match self {
            Entry::Claimed(t) | Entry::Done(t) => t,
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
/// assert_eq!(store.claim("k", Duration::from_secs(30)).await.unwrap(), Claim::Claimed);
/// store.complete("k", Duration::from_secs(3600)).await.unwrap();
/// assert_eq!(store.claim("k", Duration::from_secs(30)).await.unwrap(), Claim::Done);
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
    async fn claim(&self, key: &str, lease: Duration) -> Result<Claim> {
        let now = Instant::now();
        let mut table = self.lock()?;
        match table.entries.get(key).map(|(e, _)| *e) {
            Some(Entry::Done(until)) if until > now => return Ok(Claim::Done),
            Some(Entry::Claimed(until)) if until > now => return Ok(Claim::InProgress),
            _ => {}
        }
        if !table.entries.contains_key(key) && table.entries.len() >= self.max_entries {
            table.entries.retain(|_, (e, _)| e.until() > now);
            while table.entries.len() >= self.max_entries {
                table.evict_oldest();
            }
        }
        table.put(key, Entry::Claimed(now + lease));
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

    async fn release(&self, key: &str) -> Result<()> {
        let mut table = self.lock()?;
        if matches!(table.entries.get(key), Some((Entry::Claimed(_), _))) {
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
    /// A counter of duplicates skipped, readable while the worker runs.
    pub fn duplicates(&self) -> Arc<AtomicU64> {
        self.once.duplicates.clone()
    }
    /// The dedup key of an event: source and id.
    pub fn key(event: &Event) -> String {
        OncePerEvent::key(event)
    }
}

/// The one implementation of "each (source, id) once" on a [`DedupStore`], shared by
/// [`Idempotent`] and the router's idempotency layer: claim the key, run the
/// handling, then mark the key done (success) or free it (failure, panic,
/// cancellation).
#[derive(Clone)]
pub(crate) struct OncePerEvent {
    store: Arc<dyn DedupStore>,
    pub(crate) ttl: Duration,
    lease: Duration,
    pub(crate) duplicates: Arc<AtomicU64>,
}

impl OncePerEvent {
    pub(crate) fn new(store: Arc<dyn DedupStore>) -> Self {
        OncePerEvent {
            store,
            ttl: Duration::from_secs(24 * 3600),
            lease: Duration::from_secs(300),
            duplicates: Arc::new(AtomicU64::new(0)),
        }
    }

    pub(crate) fn key(event: &Event) -> String {
        format!("{}\u{1f}{}", event.source(), event.id())
    }

    /// Runs `handling` unless `event` was handled already (then `Ok` at once) or is
    /// being handled by another delivery (then a retry in a moment).
    pub(crate) async fn run<F>(&self, event: &Event, handling: F) -> Result<(), HandlerError>
    where
        F: std::future::Future<Output = Result<(), HandlerError>>,
    {
        let key = Self::key(event);
        let claim = self.store.claim(&key, self.lease).await.map_err(|e| {
            // The store being away says nothing about the event: try again later.
            HandlerError::retry(format!("dedup store: {e}"))
        })?;
        match claim {
            Claim::Done => {
                self.duplicates.fetch_add(1, Ordering::Relaxed);
                tracing::info!(event_id = %event.id(), source = %event.source(), "duplicate event skipped");
                Ok(())
            }
            Claim::InProgress => Err(HandlerError::retry_after(
                "the same event is being processed by another delivery",
                Duration::from_millis(500),
            )),
            Claim::Claimed => {
                let guard = ClaimGuard {
                    store: self.store.clone(),
                    key: Some(key),
                };
                let outcome = handling.await;
                let key = guard.keep();
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
                        if let Err(e) = self.store.release(&key).await {
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
/// "in progress" until the lease runs out, or every redelivery would be refused.
struct ClaimGuard {
    store: Arc<dyn DedupStore>,
    key: Option<String>,
}

impl ClaimGuard {
    /// The claim is settled by the caller (completed or released); do nothing on drop.
    fn keep(mut self) -> String {
        self.key.take().unwrap_or_default()
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        let Some(key) = self.key.take() else { return };
        let store = self.store.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    if let Err(e) = store.release(&key).await {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn claims_expire_and_in_progress_is_reported() {
        let s = MemoryDedupStore::new(2);
        assert_eq!(
            s.claim("a", Duration::from_millis(1)).await.unwrap(),
            Claim::Claimed
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert_eq!(
            s.claim("a", Duration::from_secs(9)).await.unwrap(),
            Claim::Claimed
        );
        assert_eq!(
            s.claim("a", Duration::from_secs(9)).await.unwrap(),
            Claim::InProgress
        );
        s.release("a").await.unwrap();
        assert_eq!(
            s.claim("a", Duration::from_secs(9)).await.unwrap(),
            Claim::Claimed
        );
    }

    /// Issue 12 item 7: at capacity the store refused every new key (ResourceExhausted),
    /// so every new event was dead-lettered. It evicts the oldest key instead.
    #[tokio::test]
    async fn full_store_evicts_the_oldest_and_never_refuses() {
        let s = MemoryDedupStore::new(3);
        for k in ["a", "b", "c"] {
            assert_eq!(
                s.claim(k, Duration::from_secs(9)).await.unwrap(),
                Claim::Claimed
            );
            s.complete(k, Duration::from_secs(3600)).await.unwrap();
        }
        for n in 0..100 {
            let key = format!("new-{n}");
            assert_eq!(
                s.claim(&key, Duration::from_secs(9)).await.unwrap(),
                Claim::Claimed,
                "key {key} refused"
            );
            s.complete(&key, Duration::from_secs(3600)).await.unwrap();
            assert!(s.len() <= 3, "{} keys kept", s.len());
        }
        // The newest are remembered, the oldest forgotten.
        assert_eq!(
            s.claim("new-99", Duration::from_secs(9)).await.unwrap(),
            Claim::Done
        );
        assert_eq!(
            s.claim("a", Duration::from_secs(9)).await.unwrap(),
            Claim::Claimed
        );
        let order_len = s.lock().unwrap().order.len();
        assert!(order_len < 100, "the eviction order grew to {order_len}");
    }

    fn test_event() -> Arc<Event> {
        Arc::new(
            crate::EventBuilder::new("com.example.test", "/test")
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
        async fn claim(&self, key: &str, lease: Duration) -> Result<Claim> {
            self.0.claim(key, lease).await
        }
        async fn complete(&self, _key: &str, _ttl: Duration) -> Result<()> {
            Err(Error::new(ErrorKind::Unavailable, "store is down"))
        }
        async fn release(&self, key: &str) -> Result<()> {
            self.0.release(key).await
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
}
