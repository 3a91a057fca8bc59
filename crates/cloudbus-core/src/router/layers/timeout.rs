//! [`TimeoutLayer`]: a handling that takes longer than the limit is dropped and
//! retried later (the worker's backoff), so one stuck call does not hold a delivery
//! until its lease runs out.

use std::time::Duration;

use crate::handler::HandlerError;
use crate::router::context::Context;
use crate::router::handler_fn::HandlerFuture;
use crate::router::layers::around::{Middleware, Next, middleware_layer};

/// Limits each handling to `limit`; past it the event is retried.
///
/// ```
/// use std::time::Duration;
/// use cloudbus_core::Router;
/// use cloudbus_core::router::layers::TimeoutLayer;
/// let router = Router::new().layer(TimeoutLayer::new(Duration::from_secs(30)));
/// # let _ = router;
/// ```
#[derive(Debug, Clone, Copy)]
pub struct TimeoutLayer {
    limit: Duration,
}

impl TimeoutLayer {
    /// A layer that gives each handling at most `limit`.
    pub fn new(limit: Duration) -> Self {
        TimeoutLayer { limit }
    }
}

impl Middleware for TimeoutLayer {
    fn call<S>(&self, ctx: Context, next: Next<S>) -> HandlerFuture
    where
        S: tower::Service<Context, Response = (), Error = HandlerError> + Send + 'static,
        S::Future: Send + 'static,
    {
        let limit = self.limit;
        let handling = next.run(ctx);
        Box::pin(async move {
            match tokio::time::timeout(limit, handling).await {
                Ok(outcome) => outcome,
                Err(_) => Err(HandlerError::retry(format!(
                    "handler timed out after {limit:?}"
                ))),
            }
        })
    }
}

middleware_layer!(TimeoutLayer, Timeout);
