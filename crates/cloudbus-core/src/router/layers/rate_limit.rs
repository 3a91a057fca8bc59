//! [`RateLimitLayer`]: a token bucket that paces handlings to a rate, for event
//! storms that would otherwise overrun what the handlers call. Handlings over the
//! rate wait for a token (their leases are kept by the worker meanwhile).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::handler::HandlerError;
use crate::router::context::Context;
use crate::router::handler_fn::HandlerFuture;
use crate::router::layers::around::{Middleware, Next, middleware_layer};

/// At most `rate` handlings per `per`, with bursts up to `rate`, shared by every
/// route the layer is applied to.
///
/// ```
/// use std::time::Duration;
/// use cloudbus_core::Router;
/// use cloudbus_core::router::layers::RateLimitLayer;
/// let router = Router::new().layer(RateLimitLayer::new(100, Duration::from_secs(1)));
/// # let _ = router;
/// ```
#[derive(Debug, Clone)]
pub struct RateLimitLayer {
    bucket: Arc<Mutex<Bucket>>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    capacity: f64,
    per_second: f64,
    refilled: Instant,
}

impl Bucket {
    /// Takes a token, or says how long until one is there.
    fn take(&mut self, now: Instant) -> Option<Duration> {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.capacity);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            None
        } else {
            Some(Duration::from_secs_f64(
                (1.0 - self.tokens) / self.per_second,
            ))
        }
    }
}

impl RateLimitLayer {
    /// `rate` handlings (at least 1) per `per` (a zero `per` counts as 1 ms).
    pub fn new(rate: u32, per: Duration) -> Self {
        let rate = f64::from(rate.max(1));
        let per = per.max(Duration::from_millis(1)).as_secs_f64();
        RateLimitLayer {
            bucket: Arc::new(Mutex::new(Bucket {
                tokens: rate,
                capacity: rate,
                per_second: rate / per,
                refilled: Instant::now(),
            })),
        }
    }
}

impl Middleware for RateLimitLayer {
    fn call<S>(&self, ctx: Context, next: Next<S>) -> HandlerFuture
    where
        S: tower::Service<Context, Response = (), Error = HandlerError> + Send + 'static,
        S::Future: Send + 'static,
    {
        let bucket = self.bucket.clone();
        Box::pin(async move {
            loop {
                let wait = match bucket.lock() {
                    Ok(mut b) => b.take(Instant::now()),
                    Err(_) => return Err(HandlerError::retry("rate limiter poisoned")),
                };
                match wait {
                    None => break,
                    Some(wait) => tokio::time::sleep(wait).await,
                }
            }
            next.run(ctx).await
        })
    }
}

middleware_layer!(RateLimitLayer, RateLimit);
