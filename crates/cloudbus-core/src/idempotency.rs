//! Idempotent consumption: a handler wrapper that processes each (source, id) once,
//! with a pluggable [`DedupStore`] and an in-memory store with TTL.

use std::collections::HashMap;
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
    /// Releases a claim after a failure, so a redelivery can try again.
    async fn release(&self, key: &str) -> Result<()>;
}

#[derive(Clone, Copy)]
enum Entry {
    Claimed(Instant),
    Done(Instant),
}

/// An in-process [`DedupStore`] with TTLs and a size bound (oldest expiries go first).
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
    entries: Mutex<HashMap<String, Entry>>,
    max_entries: usize,
}

impl MemoryDedupStore {
    /// A store remembering at most `max_entries` keys.
    pub fn new(max_entries: usize) -> Self {
        MemoryDedupStore {
            entries: Mutex::new(HashMap::new()),
            max_entries: max_entries.max(1),
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, HashMap<String, Entry>>> {
        self.entries
            .lock()
            .map_err(|_| Error::new(ErrorKind::Internal, "dedup store lock poisoned"))
    }
}

#[async_trait]
impl DedupStore for MemoryDedupStore {
    async fn claim(&self, key: &str, lease: Duration) -> Result<Claim> {
        let now = Instant::now();
        let mut map = self.lock()?;
        match map.get(key).copied() {
            Some(Entry::Done(until)) if until > now => return Ok(Claim::Done),
            Some(Entry::Claimed(until)) if until > now => return Ok(Claim::InProgress),
            _ => {}
        }
        if map.len() >= self.max_entries {
            map.retain(|_, e| match e {
                Entry::Claimed(t) | Entry::Done(t) => *t > now,
            });
            if map.len() >= self.max_entries {
                return Err(Error::new(
                    ErrorKind::ResourceExhausted,
                    format!("dedup store holds {} unexpired keys", map.len()),
                ));
            }
        }
        map.insert(key.to_owned(), Entry::Claimed(now + lease));
        Ok(Claim::Claimed)
    }

    async fn complete(&self, key: &str, ttl: Duration) -> Result<()> {
        self.lock()?
            .insert(key.to_owned(), Entry::Done(Instant::now() + ttl));
        Ok(())
    }

    async fn release(&self, key: &str) -> Result<()> {
        self.lock()?.remove(key);
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
    store: Arc<dyn DedupStore>,
    ttl: Duration,
    lease: Duration,
    duplicates: Arc<AtomicU64>,
}

impl<H: Handler> Idempotent<H> {
    /// Wraps `inner`; processed keys are remembered for 24 h by default.
    pub fn new(inner: H, store: Arc<dyn DedupStore>) -> Self {
        Idempotent {
            inner,
            store,
            ttl: Duration::from_secs(24 * 3600),
            lease: Duration::from_secs(300),
            duplicates: Arc::new(AtomicU64::new(0)),
        }
    }
    /// How long processed keys are remembered.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }
    /// A counter of duplicates skipped, readable while the worker runs.
    pub fn duplicates(&self) -> Arc<AtomicU64> {
        self.duplicates.clone()
    }
    /// The dedup key of an event: source and id.
    pub fn key(event: &Event) -> String {
        format!("{}\u{1f}{}", event.source(), event.id())
    }
}

#[async_trait]
impl<H: Handler> Handler for Idempotent<H> {
    async fn handle(&self, event: Arc<Event>, ctx: HandlerContext) -> Result<(), HandlerError> {
        let key = Self::key(&event);
        match self.store.claim(&key, self.lease).await? {
            Claim::Done => {
                self.duplicates.fetch_add(1, Ordering::Relaxed);
                tracing::info!(event_id = %event.id(), source = %event.source(), "duplicate event skipped");
                Ok(())
            }
            Claim::InProgress => Err(HandlerError::retry_after(
                "the same event is being processed by another delivery",
                Duration::from_millis(500),
            )),
            Claim::Claimed => match self.inner.handle(event, ctx).await {
                Ok(()) => {
                    self.store.complete(&key, self.ttl).await?;
                    Ok(())
                }
                Err(e) => {
                    self.store.release(&key).await?;
                    Err(e)
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn claims_expire_and_bound_holds() {
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
        assert_eq!(
            s.claim("b", Duration::from_secs(9)).await.unwrap(),
            Claim::Claimed
        );
        let err = s.claim("c", Duration::from_secs(9)).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ResourceExhausted);
        s.release("a").await.unwrap();
        assert_eq!(
            s.claim("c", Duration::from_secs(9)).await.unwrap(),
            Claim::Claimed
        );
    }
}
