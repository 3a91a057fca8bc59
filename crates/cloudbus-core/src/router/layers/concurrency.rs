//! [`ConcurrencyLimitLayer`]: at most N handlings at once through the routes it is
//! applied to (a database with few connections behind a worker of many), the others
//! waiting their turn.

use std::sync::Arc;
use std::task::Poll;

use tokio::sync::Semaphore;

use crate::handler::HandlerError;
use crate::router::context::Context;
use crate::router::handler_fn::HandlerFuture;

/// At most `max` handlings at once, shared by every route the layer is applied to.
///
/// ```
/// use cloudbus_core::Router;
/// use cloudbus_core::router::layers::ConcurrencyLimitLayer;
/// let router = Router::new().layer(ConcurrencyLimitLayer::new(4));
/// # let _ = router;
/// ```
#[derive(Debug, Clone)]
pub struct ConcurrencyLimitLayer {
    permits: Arc<Semaphore>,
}

impl ConcurrencyLimitLayer {
    /// A layer that lets `max` (at least 1) handlings run at once.
    pub fn new(max: usize) -> Self {
        ConcurrencyLimitLayer {
            permits: Arc::new(Semaphore::new(max.max(1))),
        }
    }
}

impl<S> tower::Layer<S> for ConcurrencyLimitLayer {
    type Service = ConcurrencyLimit<S>;
    fn layer(&self, inner: S) -> ConcurrencyLimit<S> {
        ConcurrencyLimit {
            inner,
            permits: self.permits.clone(),
        }
    }
}

/// The service of [`ConcurrencyLimitLayer`].
#[derive(Debug, Clone)]
pub struct ConcurrencyLimit<S> {
    inner: S,
    permits: Arc<Semaphore>,
}

impl<S> tower::Service<Context> for ConcurrencyLimit<S>
where
    S: tower::Service<Context, Response = (), Error = HandlerError> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = ();
    type Error = HandlerError;
    type Future = HandlerFuture;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, ctx: Context) -> HandlerFuture {
        // The service that was made ready handles this call (tower's contract); a clone
        // stays behind for the next one.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let permits = self.permits.clone();
        Box::pin(async move {
            let _permit = permits
                .acquire_owned()
                .await
                .map_err(|_| HandlerError::retry("concurrency limit closed"))?;
            inner.call(ctx).await
        })
    }
}
