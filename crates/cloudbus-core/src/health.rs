//! Liveness and readiness of the parts that talk to the broker, for the probes of an
//! orchestrator: [`Worker::health`](crate::Worker::health) and
//! [`Publisher::health`](crate::Publisher::health) say whether each runs, whether its
//! last call to the provider went through, what failed last and what it holds.
//!
//! Live means "restarting would not help less than waiting": the part has not stopped.
//! Ready means it can do its work now: live, and its last call to the provider
//! succeeded (a failed one is retried with backoff; readiness comes back with the next
//! success).

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

use chrono::{DateTime, Utc};

use cloudbus_driver::error::{Error, ErrorKind};

/// The last failure of a call to the provider.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LastError {
    /// Its kind.
    pub kind: ErrorKind,
    /// What went wrong (no secrets: errors never carry them).
    pub message: String,
    /// When.
    pub at: DateTime<Utc>,
}

/// The health of a [`Worker`](crate::Worker).
///
/// ```
/// # async fn demo(bus: cloudbus_core::Bus) -> cloudbus_core::Result<()> {
/// let consumer = bus.consumer("orders", "billing").await?;
/// let worker = consumer.start_worker(
///     |_e: std::sync::Arc<cloudbus_core::Event>, _c: cloudbus_core::HandlerContext| async {
///         Ok::<(), cloudbus_core::HandlerError>(())
///     },
///     cloudbus_core::WorkerOptions::default(),
/// )?;
/// let health = worker.health();
/// assert!(health.is_live());
/// if !health.is_ready() {
///     eprintln!("not ready: {:?}", health.last_error);
/// }
/// # worker.shutdown(std::time::Duration::from_secs(1)).await;
/// # Ok(())
/// # }
/// ```
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkerHealth {
    /// Its loop runs: not shut down, not ended by a closed consumer.
    pub running: bool,
    /// It pulls: running, and its last receive succeeded (false while it backs off).
    pub receiving: bool,
    /// The last call to the provider (receive or settlement) succeeded.
    pub connected: bool,
    /// Receives that failed in a row.
    pub consecutive_failures: u32,
    /// The last failure, if any.
    pub last_error: Option<LastError>,
    /// When a receive last succeeded.
    pub last_receive: Option<DateTime<Utc>>,
    /// Deliveries held: being handled or settled.
    pub in_flight: usize,
}

impl WorkerHealth {
    /// For a liveness probe: the worker has not stopped.
    pub fn is_live(&self) -> bool {
        self.running
    }

    /// For a readiness probe: it runs and reaches the provider.
    pub fn is_ready(&self) -> bool {
        self.running && self.receiving && self.connected
    }
}

/// The health of a [`Publisher`](crate::Publisher).
///
/// ```
/// # async fn demo(bus: cloudbus_core::Bus) -> cloudbus_core::Result<()> {
/// let publisher = bus.publisher("orders").await?;
/// assert!(publisher.health().is_ready());
/// publisher.close().await?;
/// assert!(!publisher.health().is_live());
/// # Ok(())
/// # }
/// ```
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublisherHealth {
    /// Not closed.
    pub open: bool,
    /// The last send reached the provider (true before the first). A send refused for
    /// the event itself (too large, invalid) does not count against it.
    pub connected: bool,
    /// The last failed send, if any.
    pub last_error: Option<LastError>,
    /// When a send last succeeded.
    pub last_send: Option<DateTime<Utc>>,
    /// Events accepted by `publish` and not yet answered.
    pub pending: usize,
}

impl PublisherHealth {
    /// For a liveness probe: not closed.
    pub fn is_live(&self) -> bool {
        self.open
    }

    /// For a readiness probe: open and reaching the provider.
    pub fn is_ready(&self) -> bool {
        self.open && self.connected
    }
}

/// What a worker or publisher records of its calls to the provider.
#[derive(Debug)]
pub(crate) struct HealthState {
    connected: AtomicBool,
    consecutive_failures: AtomicU32,
    last_error: Mutex<Option<LastError>>,
    last_success: Mutex<Option<DateTime<Utc>>>,
    in_flight: AtomicUsize,
}

impl Default for HealthState {
    fn default() -> Self {
        HealthState {
            connected: AtomicBool::new(true),
            consecutive_failures: AtomicU32::new(0),
            last_error: Mutex::new(None),
            last_success: Mutex::new(None),
            in_flight: AtomicUsize::new(0),
        }
    }
}

/// Whether an error says the provider could not be reached or refused the caller,
/// rather than refusing one event.
pub(crate) fn is_connection_error(e: &Error) -> bool {
    e.is_retryable()
        || matches!(
            e.kind(),
            ErrorKind::PermissionDenied | ErrorKind::NotFound | ErrorKind::Internal
        )
}

impl HealthState {
    /// A call to the provider went through.
    pub(crate) fn succeeded(&self) {
        self.connected.store(true, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        if let Ok(mut at) = self.last_success.lock() {
            *at = Some(Utc::now());
        }
    }

    /// A call to the provider failed with `error`.
    pub(crate) fn failed(&self, error: &Error) {
        self.consecutive_failures.fetch_add(1, Ordering::Relaxed);
        self.side_call_failed(error);
    }

    /// A settlement (or another call beside the main one) failed: not connected, but
    /// the receive streak is not broken.
    pub(crate) fn side_call_failed(&self, error: &Error) {
        self.connected.store(false, Ordering::Relaxed);
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(LastError {
                kind: error.kind(),
                message: error.to_string(),
                at: Utc::now(),
            });
        }
    }

    /// One more delivery held; the token gives it back when dropped.
    pub(crate) fn hold(self: &std::sync::Arc<Self>) -> InFlightToken {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlightToken(self.clone())
    }

    pub(crate) fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }

    pub(crate) fn consecutive_failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    pub(crate) fn last_error(&self) -> Option<LastError> {
        self.last_error.lock().ok().and_then(|l| l.clone())
    }

    pub(crate) fn last_success(&self) -> Option<DateTime<Utc>> {
        self.last_success.lock().ok().and_then(|l| *l)
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// A held delivery, counted in [`WorkerHealth::in_flight`] until dropped.
#[derive(Debug)]
pub(crate) struct InFlightToken(std::sync::Arc<HealthState>);

impl Drop for InFlightToken {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_and_recovery() {
        let state = std::sync::Arc::new(HealthState::default());
        assert!(state.connected());
        state.failed(&Error::new(ErrorKind::Unavailable, "broker away"));
        state.failed(&Error::new(ErrorKind::Unavailable, "broker away"));
        assert!(!state.connected());
        assert_eq!(state.consecutive_failures(), 2);
        let last = state.last_error().unwrap();
        assert_eq!(last.kind, ErrorKind::Unavailable);
        assert!(last.message.contains("broker away"));
        state.succeeded();
        assert!(state.connected());
        assert_eq!(state.consecutive_failures(), 0);
        assert!(state.last_success().is_some());
        assert!(state.last_error().is_some(), "the last error is kept");
        let a = state.hold();
        let b = state.hold();
        assert_eq!(state.in_flight(), 2);
        drop(a);
        drop(b);
        assert_eq!(state.in_flight(), 0);
    }

    #[test]
    fn an_events_own_refusal_is_not_a_connection_error() {
        assert!(is_connection_error(&Error::new(
            ErrorKind::Unavailable,
            "x"
        )));
        assert!(is_connection_error(&Error::new(
            ErrorKind::PermissionDenied,
            "x"
        )));
        assert!(!is_connection_error(&Error::new(ErrorKind::TooLarge, "x")));
        assert!(!is_connection_error(&Error::invalid("x")));
    }
}
