//! The one tower plumbing under every layer of [`layers`](crate::router::layers): a
//! layer is a [`Middleware`], something that gets the handling's [`Context`] and the
//! rest of the route ([`Next`]) and decides when (and whether) to run it; [`Around`]
//! makes a middleware and the service it wraps a `tower::Service` again.

use std::task::Poll;

use crate::handler::HandlerError;
use crate::router::context::Context;
use crate::router::handler_fn::HandlerFuture;

/// The rest of a route, ready to take one handling.
pub struct Next<S> {
    inner: S,
}

impl<S> Next<S>
where
    S: tower::Service<Context, Response = (), Error = HandlerError>,
    S::Future: Send + 'static,
{
    /// The rest of a route made of `inner` (the layers' own tests build one).
    #[cfg(test)]
    pub(crate) fn new(inner: S) -> Self {
        Next { inner }
    }

    /// Runs the rest of the route on `ctx`.
    pub fn run(mut self, ctx: Context) -> S::Future {
        self.inner.call(ctx)
    }
}

/// What a layer does around the rest of a route. An application's own is a layer with
/// `tower::layer::layer_fn(|inner| Around::new(inner, mine.clone()))`.
///
/// ```
/// # #[tokio::main(flavor = "current_thread")] async fn main() {
/// use std::sync::Arc;
/// use std::sync::atomic::{AtomicU64, Ordering};
/// use cloudbus_core::router::layers::{Around, Middleware, Next};
/// use cloudbus_core::router::{Context, HandlerFuture, RouteService};
/// use cloudbus_core::{EventBuilder, Handler, HandlerContext, HandlerError, Router};
///
/// /// Counts the handlings that failed.
/// #[derive(Clone, Default)]
/// struct CountFailures(Arc<AtomicU64>);
///
/// impl Middleware for CountFailures {
///     fn call<S>(&self, ctx: Context, next: Next<S>) -> HandlerFuture
///     where
///         S: tower::Service<Context, Response = (), Error = HandlerError> + Send + 'static,
///         S::Future: Send + 'static,
///     {
///         let failures = self.0.clone();
///         let handling = next.run(ctx);
///         Box::pin(async move {
///             let outcome = handling.await;
///             if outcome.is_err() {
///                 failures.fetch_add(1, Ordering::Relaxed);
///             }
///             outcome
///         })
///     }
/// }
///
/// let count = CountFailures::default();
/// let mine = count.clone();
/// let router = Router::new()
///     .route_type("com.example.ping", |_: Context| async { Err::<(), _>(HandlerError::retry("down")) })
///     .layer(tower::layer::layer_fn(move |inner: RouteService| Around::new(inner, mine.clone())));
/// let event = Arc::new(EventBuilder::new("com.example.ping", "/doc").build().unwrap());
/// assert!(router.handle(event, HandlerContext::new(1, "doc")).await.is_err());
/// assert_eq!(count.0.load(Ordering::Relaxed), 1);
/// # }
/// ```
pub trait Middleware: Clone + Send + Sync + 'static {
    /// Handles `ctx`, running `next` (or not: a refusal, a duplicate).
    fn call<S>(&self, ctx: Context, next: Next<S>) -> HandlerFuture
    where
        S: tower::Service<Context, Response = (), Error = HandlerError> + Send + 'static,
        S::Future: Send + 'static;
}

/// A middleware around the service `S`.
#[derive(Debug, Clone)]
pub struct Around<S, M> {
    inner: S,
    middleware: M,
}

impl<S, M> Around<S, M> {
    /// `middleware` around `inner`.
    pub fn new(inner: S, middleware: M) -> Self {
        Around { inner, middleware }
    }
}

impl<S, M> tower::Service<Context> for Around<S, M>
where
    S: tower::Service<Context, Response = (), Error = HandlerError> + Clone + Send + 'static,
    S::Future: Send + 'static,
    M: Middleware,
{
    type Response = ();
    type Error = HandlerError;
    type Future = HandlerFuture;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, ctx: Context) -> HandlerFuture {
        // The service that was made ready takes this call (tower's contract); a clone
        // stays behind for the next one.
        let clone = self.inner.clone();
        let ready = std::mem::replace(&mut self.inner, clone);
        self.middleware.call(ctx, Next { inner: ready })
    }
}

/// Makes a middleware type a `tower::Layer` whose service is [`Around`].
macro_rules! middleware_layer {
    ($layer:ty, $service:ident) => {
        impl<S> tower::Layer<S> for $layer {
            type Service = $crate::router::layers::around::Around<S, $layer>;
            fn layer(&self, inner: S) -> Self::Service {
                $crate::router::layers::around::Around::new(inner, self.clone())
            }
        }

        #[doc = concat!("The service of [`", stringify!($layer), "`].")]
        pub type $service<S> = $crate::router::layers::around::Around<S, $layer>;
    };
}

pub(crate) use middleware_layer;
