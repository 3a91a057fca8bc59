//! Retries with exponential backoff and jitter: one policy used by the publisher
//! (retrying sends), the worker (nack delays between delivery attempts) and the
//! stream consumer.

use std::future::Future;
use std::time::Duration;

use cloudbus_driver::error::Result;

/// Exponential backoff with jitter and an attempt limit.
///
/// ```
/// use std::time::Duration;
/// use cloudbus_core::RetryPolicy;
/// let p = RetryPolicy::default().jitter(0.0);
/// assert_eq!(p.backoff(1), Duration::from_millis(100));
/// assert_eq!(p.backoff(3), Duration::from_millis(400));
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Delay after the first failure.
    pub initial_backoff: Duration,
    /// Upper bound of a delay.
    pub max_backoff: Duration,
    /// Growth factor per attempt.
    pub multiplier: f64,
    /// Fraction of the delay randomized (0.2: +-20%).
    pub jitter: f64,
}

impl Default for RetryPolicy {
    /// 5 attempts, 100 ms doubling up to 60 s, 20% jitter.
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(60),
            multiplier: 2.0,
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// Never retry.
    pub fn none() -> Self {
        RetryPolicy {
            max_attempts: 1,
            ..Default::default()
        }
    }
    /// Sets the attempt limit.
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self
    }
    /// Sets the first delay.
    pub fn initial_backoff(mut self, d: Duration) -> Self {
        self.initial_backoff = d;
        self
    }
    /// Sets the largest delay.
    pub fn max_backoff(mut self, d: Duration) -> Self {
        self.max_backoff = d;
        self
    }
    /// Sets the jitter fraction (0 to 1).
    pub fn jitter(mut self, j: f64) -> Self {
        self.jitter = j.clamp(0.0, 1.0);
        self
    }

    /// The delay after failed attempt number `attempt` (1-based).
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self
            .multiplier
            .powi(attempt.saturating_sub(1).min(63) as i32);
        let base = self.initial_backoff.as_secs_f64() * exp;
        let capped = base.min(self.max_backoff.as_secs_f64());
        let factor = if self.jitter > 0.0 {
            1.0 + self.jitter * (fastrand::f64() * 2.0 - 1.0)
        } else {
            1.0
        };
        Duration::from_secs_f64((capped * factor).clamp(0.0, self.max_backoff.as_secs_f64()))
    }

    /// Whether another attempt follows failed attempt `attempt`.
    pub fn should_retry(&self, attempt: u32) -> bool {
        attempt < self.max_attempts
    }

    /// Runs `op` until it succeeds, fails with a non-retryable error, or the attempts
    /// run out, sleeping the backoff between tries.
    pub async fn run<T, F, Fut>(&self, mut op: F) -> Result<T>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let mut attempt = 1;
        loop {
            match op(attempt).await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_retryable() && self.should_retry(attempt) => {
                    tracing::debug!(attempt, error = %e, "retrying after a transient error");
                    tokio::time::sleep(self.backoff(attempt)).await;
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudbus_driver::error::{Error, ErrorKind};

    #[test]
    fn backoff_grows_and_caps_with_bounded_jitter() {
        let p = RetryPolicy::default().max_backoff(Duration::from_secs(1));
        for attempt in 1..20 {
            let d = p.backoff(attempt);
            assert!(d <= Duration::from_secs(1));
            let nominal = (0.1 * 2f64.powi(attempt as i32 - 1)).min(1.0);
            assert!(d.as_secs_f64() >= nominal * 0.8 - 1e-9, "{attempt} {d:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn run_retries_only_retryable() {
        let p = RetryPolicy::default().max_attempts(3);
        let mut calls = 0;
        let r: Result<()> = p
            .run(|_| {
                calls += 1;
                async { Err(Error::new(ErrorKind::Throttled, "x")) }
            })
            .await;
        assert!(r.is_err());
        assert_eq!(calls, 3);
        let mut calls = 0;
        let r: Result<()> = p
            .run(|_| {
                calls += 1;
                async { Err(Error::not_found("x")) }
            })
            .await;
        assert_eq!(r.unwrap_err().kind(), ErrorKind::NotFound);
        assert_eq!(calls, 1);
    }
}
