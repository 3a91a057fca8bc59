//! The tower layers cloudbus ships for routes: timeout, concurrency limit, rate
//! limit, circuit breaker, idempotency, schema validation and tracing. Each takes and
//! gives a `Service<Context, Response = (), Error = HandlerError>`; each is a
//! [`Middleware`] made a layer by [`Around`], which an application's own layer can be
//! too.

mod around;
mod circuit_breaker;
mod concurrency;
mod idempotency;
mod rate_limit;
mod timeout;
mod trace;
mod validate;

pub use around::{Around, Middleware, Next};
pub use circuit_breaker::{CircuitBreaker, CircuitBreakerLayer};
pub use concurrency::{ConcurrencyLimit, ConcurrencyLimitLayer};
pub use idempotency::{Idempotency, IdempotencyLayer};
pub use rate_limit::{RateLimit, RateLimitLayer};
pub use timeout::{Timeout, TimeoutLayer};
pub use trace::{Trace, TraceLayer};
pub use validate::{SchemaValidation, SchemaValidationLayer};
