//! [`IdempotencyLayer`]: each event (source, id) handled once, on any
//! [`DedupStore`] (memory, PostgreSQL, SQLite, Redis): duplicates are acknowledged
//! without reaching the handler. The same logic as [`Idempotent`](crate::Idempotent).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use crate::handler::HandlerError;
use crate::idempotency::{DedupStore, OncePerEvent};
use crate::router::context::Context;
use crate::router::handler_fn::HandlerFuture;
use crate::router::layers::around::{Middleware, Next, middleware_layer};

/// Handles each (source, id) once, remembering handled keys in `store`.
///
/// ```
/// use std::sync::Arc;
/// use cloudbus_core::{MemoryDedupStore, Router};
/// use cloudbus_core::router::layers::IdempotencyLayer;
/// let router = Router::new().layer(IdempotencyLayer::new(Arc::new(MemoryDedupStore::new(100_000))));
/// # let _ = router;
/// ```
#[derive(Clone)]
pub struct IdempotencyLayer {
    once: OncePerEvent,
}

impl std::fmt::Debug for IdempotencyLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdempotencyLayer").finish_non_exhaustive()
    }
}

impl IdempotencyLayer {
    /// Remembers handled keys in `store` for 24 h.
    pub fn new(store: Arc<dyn DedupStore>) -> Self {
        IdempotencyLayer {
            once: OncePerEvent::new(store),
        }
    }
    /// How long handled keys are remembered.
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.once.ttl = ttl;
        self
    }
    /// How long a claim outlives a process that crashed while handling (default
    /// 30 s); see [`Idempotent::claim_lease`](crate::Idempotent::claim_lease). Apply
    /// a `TimeoutLayer` before this layer, so that a redelivery's wait for a claim
    /// does not count against the handler's timeout.
    pub fn claim_lease(mut self, lease: Duration) -> Self {
        self.once.set_lease(lease);
        self
    }
    /// A counter of duplicates skipped.
    pub fn duplicates(&self) -> Arc<AtomicU64> {
        self.once.duplicates.clone()
    }
}

impl Middleware for IdempotencyLayer {
    fn call<S>(&self, ctx: Context, next: Next<S>) -> HandlerFuture
    where
        S: tower::Service<Context, Response = (), Error = HandlerError> + Send + 'static,
        S::Future: Send + 'static,
    {
        let once = self.once.clone();
        Box::pin(async move {
            let event = ctx.event().clone();
            once.run(&event, next.run(ctx)).await
        })
    }
}

middleware_layer!(IdempotencyLayer, Idempotency);
