//! [`ConcurrencyLimitLayer`]: at most N handlings at once through the routes it is
//! applied to (a database with few connections behind a worker of many), the others
//! waiting their turn.

use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::handler::HandlerError;
use crate::router::context::Context;
use crate::router::handler_fn::HandlerFuture;
use crate::router::layers::around::{Middleware, Next, middleware_layer};

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

impl Middleware for ConcurrencyLimitLayer {
    fn call<S>(&self, ctx: Context, next: Next<S>) -> HandlerFuture
    where
        S: tower::Service<Context, Response = (), Error = HandlerError> + Send + 'static,
        S::Future: Send + 'static,
    {
        let permits = self.permits.clone();
        Box::pin(async move {
            let _permit = permits
                .acquire_owned()
                .await
                .map_err(|_| HandlerError::retry("concurrency limit closed"))?;
            next.run(ctx).await
        })
    }
}

middleware_layer!(ConcurrencyLimitLayer, ConcurrencyLimit);
