//! [`CircuitBreakerLayer`]: after a run of failed handlings (retries: the downstream
//! is failing, not the event) the circuit opens and handlings fail fast with a retry
//! after the cool-down, instead of hammering what is down; then one probe goes
//! through, and its success closes the circuit. Rejections (the event's own fault)
//! neither open nor close it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::handler::HandlerError;
use crate::router::context::Context;
use crate::router::handler_fn::HandlerFuture;
use crate::router::layers::around::{Middleware, Next, middleware_layer};

/// Opens after `failures` consecutive retryable failures, for `cooldown`.
///
/// ```
/// use std::time::Duration;
/// use cloudbus_core::Router;
/// use cloudbus_core::router::layers::CircuitBreakerLayer;
/// let router = Router::new().layer(CircuitBreakerLayer::new(5, Duration::from_secs(30)));
/// # let _ = router;
/// ```
#[derive(Debug, Clone)]
pub struct CircuitBreakerLayer {
    state: Arc<Mutex<Breaker>>,
}

#[derive(Debug)]
struct Breaker {
    threshold: u32,
    cooldown: Duration,
    consecutive_failures: u32,
    open_until: Option<Instant>,
    probing: bool,
}

/// Whether a handling may go through now.
enum Admission {
    Pass { probe: bool },
    Refuse(Duration),
}

impl Breaker {
    fn admit(&mut self, now: Instant) -> Admission {
        match self.open_until {
            Some(until) if now < until => Admission::Refuse(until - now),
            Some(_) if self.probing => Admission::Refuse(self.cooldown),
            Some(_) => {
                self.probing = true;
                Admission::Pass { probe: true }
            }
            None => Admission::Pass { probe: false },
        }
    }

    fn record(&mut self, outcome: &Result<(), HandlerError>, probe: bool, now: Instant) {
        if probe {
            self.probing = false;
        }
        match outcome {
            Ok(()) => {
                self.consecutive_failures = 0;
                self.open_until = None;
            }
            Err(HandlerError::Retry { .. }) => {
                self.consecutive_failures += 1;
                if probe || self.consecutive_failures >= self.threshold {
                    if self.open_until.is_none() || probe {
                        tracing::warn!(failures = self.consecutive_failures, cooldown = ?self.cooldown, "circuit opened");
                    }
                    self.open_until = Some(now + self.cooldown);
                }
            }
            Err(HandlerError::Reject { .. }) => {}
        }
    }
}

impl CircuitBreakerLayer {
    /// A breaker that opens after `failures` (at least 1) consecutive retryable
    /// failures and stays open for `cooldown`.
    pub fn new(failures: u32, cooldown: Duration) -> Self {
        CircuitBreakerLayer {
            state: Arc::new(Mutex::new(Breaker {
                threshold: failures.max(1),
                cooldown,
                consecutive_failures: 0,
                open_until: None,
                probing: false,
            })),
        }
    }

    /// Whether the circuit is open now.
    pub fn is_open(&self) -> bool {
        self.state
            .lock()
            .map(|b| b.open_until.is_some())
            .unwrap_or(false)
    }
}

impl Middleware for CircuitBreakerLayer {
    fn call<S>(&self, ctx: Context, next: Next<S>) -> HandlerFuture
    where
        S: tower::Service<Context, Response = (), Error = HandlerError> + Send + 'static,
        S::Future: Send + 'static,
    {
        let admission = match self.state.lock() {
            Ok(mut b) => b.admit(Instant::now()),
            Err(_) => Admission::Pass { probe: false },
        };
        let probe = match admission {
            Admission::Refuse(wait) => {
                return Box::pin(std::future::ready(Err(HandlerError::retry_after(
                    "circuit open: the handler's last calls failed; not calling it until the cool-down ends",
                    wait,
                ))));
            }
            Admission::Pass { probe } => probe,
        };
        let handling = next.run(ctx);
        let state = self.state.clone();
        Box::pin(async move {
            let outcome = handling.await;
            if let Ok(mut b) = state.lock() {
                b.record(&outcome, probe, Instant::now());
            }
            outcome
        })
    }
}

middleware_layer!(CircuitBreakerLayer, CircuitBreaker);
