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
        // Before the handling is made: a handler that panics while making its future
        // (a closure's synchronous part) must give its probe back too.
        let mut verdict = Verdict {
            state: self.state.clone(),
            probe,
            recorded: false,
        };
        let handling = next.run(ctx);
        Box::pin(async move {
            let outcome = handling.await;
            verdict.record(&outcome);
            outcome
        })
    }
}

/// Records a handling's outcome in the breaker, also when it has none: a handling
/// dropped before it ended (cancelled by an outer timeout or a shutdown) gives its
/// probe back, and one that panicked counts as a failure. Without this a dropped or
/// panicking probe left `probing` set, and the breaker refused every later event.
struct Verdict {
    state: Arc<Mutex<Breaker>>,
    probe: bool,
    recorded: bool,
}

impl Verdict {
    fn record(&mut self, outcome: &Result<(), HandlerError>) {
        self.recorded = true;
        if let Ok(mut b) = self.state.lock() {
            b.record(outcome, self.probe, Instant::now());
        }
    }
}

impl Drop for Verdict {
    fn drop(&mut self) {
        if self.recorded {
            return;
        }
        if std::thread::panicking() {
            self.record(&Err(HandlerError::retry("the handler panicked")));
        } else if self.probe {
            // Cancelled: no verdict on the downstream; let the next event probe.
            if let Ok(mut b) = self.state.lock() {
                b.probing = false;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use futures::FutureExt;

    use crate::handler::HandlerContext;
    use cloudbus_driver::event::EventBuilder;

    fn ctx() -> Context {
        let event = EventBuilder::new("com.example.test", "/test")
            .build()
            .expect("event");
        Context::new(std::sync::Arc::new(event), HandlerContext::new(1, "test"))
    }

    /// Opens the breaker (one failure, cool-down 10 ms) and waits out the cool-down,
    /// so the next handling is the probe.
    async fn opened_and_cooled(breaker: &CircuitBreakerLayer) {
        let failing =
            tower::service_fn(|_ctx: Context| async { Err::<(), _>(HandlerError::retry("down")) });
        let _ = breaker.call(ctx(), Next::new(failing)).await;
        assert!(breaker.is_open());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    async fn succeeds(breaker: &CircuitBreakerLayer) -> Result<(), HandlerError> {
        let ok = tower::service_fn(|_ctx: Context| async { Ok::<(), HandlerError>(()) });
        breaker.call(ctx(), Next::new(ok)).await
    }

    /// Issue 28 item 1: a probe cancelled by an outer timeout left the breaker
    /// refusing every later event ("circuit open") for ever.
    #[tokio::test]
    async fn a_cancelled_probe_lets_the_next_event_probe() {
        let breaker = CircuitBreakerLayer::new(1, Duration::from_millis(10));
        opened_and_cooled(&breaker).await;
        let hanging = tower::service_fn(|_ctx: Context| async {
            std::future::pending::<()>().await;
            Ok::<(), HandlerError>(())
        });
        let probe = breaker.call(ctx(), Next::new(hanging));
        assert!(
            tokio::time::timeout(Duration::from_millis(10), probe)
                .await
                .is_err()
        );
        assert!(
            succeeds(&breaker).await.is_ok(),
            "the next event was refused"
        );
        assert!(!breaker.is_open());
    }

    /// Issue 28 item 1: a probe that panicked left the breaker refusing for ever; it
    /// counts as a failure (the circuit opens again for a cool-down), then probes.
    #[tokio::test]
    async fn a_panicking_probe_counts_as_a_failure() {
        let breaker = CircuitBreakerLayer::new(1, Duration::from_millis(10));
        opened_and_cooled(&breaker).await;
        let panicking = tower::service_fn(|_ctx: Context| async {
            if true {
                panic!("handler bug");
            }
            Ok::<(), HandlerError>(())
        });
        let probe = std::panic::AssertUnwindSafe(breaker.call(ctx(), Next::new(panicking)))
            .catch_unwind()
            .await;
        assert!(probe.is_err(), "the panic unwinds to the worker");
        assert!(breaker.is_open(), "a panic is a failure");
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            succeeds(&breaker).await.is_ok(),
            "the next probe was refused"
        );
        assert!(!breaker.is_open());
    }
}

middleware_layer!(CircuitBreakerLayer, CircuitBreaker);
