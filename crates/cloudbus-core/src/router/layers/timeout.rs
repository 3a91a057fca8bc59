//! [`TimeoutLayer`]: a handling that takes longer than the limit is dropped and
//! retried later (the worker's backoff), so one stuck call does not hold a delivery
//! until its lease runs out.

use std::task::Poll;
use std::time::Duration;

use crate::handler::HandlerError;
use crate::router::context::Context;
use crate::router::handler_fn::HandlerFuture;

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

impl<S> tower::Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;
    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout {
            inner,
            limit: self.limit,
        }
    }
}

/// The service of [`TimeoutLayer`].
#[derive(Debug, Clone)]
pub struct Timeout<S> {
    inner: S,
    limit: Duration,
}

impl<S> tower::Service<Context> for Timeout<S>
where
    S: tower::Service<Context, Response = (), Error = HandlerError>,
    S::Future: Send + 'static,
{
    type Response = ();
    type Error = HandlerError;
    type Future = HandlerFuture;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, ctx: Context) -> HandlerFuture {
        let limit = self.limit;
        let handling = self.inner.call(ctx);
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
