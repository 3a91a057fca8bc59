//! [`TraceLayer`]: each routed handling in a `cloudbus.route` span (event type, id,
//! version, attempt, route outcome), inside the worker's `cloudbus.handle` span and
//! the event's trace.

use tracing::Instrument;

use crate::handler::HandlerError;
use crate::router::context::Context;
use crate::router::handler_fn::HandlerFuture;
use crate::router::layers::around::{Middleware, Next, middleware_layer};
use cloudbus_driver::event::AttributesReader;

/// Wraps each handling in a `cloudbus.route` span and logs failures.
///
/// ```
/// use cloudbus_core::Router;
/// use cloudbus_core::router::layers::TraceLayer;
/// let router = Router::new().layer(TraceLayer::new());
/// # let _ = router;
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceLayer;

impl TraceLayer {
    /// The layer.
    pub fn new() -> Self {
        TraceLayer
    }
}

impl Middleware for TraceLayer {
    fn call<S>(&self, ctx: Context, next: Next<S>) -> HandlerFuture
    where
        S: tower::Service<Context, Response = (), Error = HandlerError> + Send + 'static,
        S::Future: Send + 'static,
    {
        let span = tracing::info_span!(
            "cloudbus.route",
            event_type = %ctx.event().ty(),
            event_id = %ctx.event().id(),
            version = ctx.version(),
            attempt = ctx.attempt(),
            outcome = tracing::field::Empty,
        );
        let handling = {
            let _entered = span.enter();
            next.run(ctx)
        };
        Box::pin(
            async move {
                let outcome = handling.await;
                let current = tracing::Span::current();
                match &outcome {
                    Ok(()) => current.record("outcome", "ok"),
                    Err(HandlerError::Retry { message, .. }) => {
                        tracing::warn!(%message, "handling failed; to be retried");
                        current.record("outcome", "retry")
                    }
                    Err(HandlerError::Reject { reason }) => {
                        tracing::warn!(%reason, "event rejected");
                        current.record("outcome", "reject")
                    }
                };
                outcome
            }
            .instrument(span),
        )
    }
}

middleware_layer!(TraceLayer, Trace);
