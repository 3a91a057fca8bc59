//! The portable view of a dead-letter place: peek, redrive to the source, purge.

use std::sync::Arc;

use crate::driver::{DeadLetter, DeadLetterDriver};
use crate::error::Result;

/// A dead-letter place (a DLQ, a `$DeadLetterQueue`, a dead-letter topic, or the one
/// cloudbus keeps where the cloud has none).
///
/// ```
/// # async fn demo(dlq: cloudbus_core::DeadLetters) -> cloudbus_core::Result<()> {
/// for letter in dlq.peek(10).await? {
///     println!("{:?}: {}", letter.reason, cloudbus_core::describe_payload(&letter.payload));
/// }
/// let moved = dlq.redrive_all().await?;
/// # let _ = moved; Ok(()) }
/// ```
#[derive(Clone)]
pub struct DeadLetters {
    driver: Arc<dyn DeadLetterDriver>,
}

impl std::fmt::Debug for DeadLetters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeadLetters").finish_non_exhaustive()
    }
}

impl DeadLetters {
    /// Wraps a driver.
    pub fn new(driver: Arc<dyn DeadLetterDriver>) -> Self {
        DeadLetters { driver }
    }
    /// Up to `max` dead letters, oldest first, without removing them.
    pub async fn peek(&self, max: usize) -> Result<Vec<DeadLetter>> {
        self.driver.peek(max).await
    }
    /// Moves up to `max` dead letters back to their source.
    pub async fn redrive(&self, max: usize) -> Result<usize> {
        let n = self.driver.redrive(Some(max)).await?;
        tracing::info!(redriven = n, "dead letters redriven");
        Ok(n)
    }
    /// Moves all dead letters back to their source.
    pub async fn redrive_all(&self) -> Result<usize> {
        let n = self.driver.redrive(None).await?;
        tracing::info!(redriven = n, "dead letters redriven");
        Ok(n)
    }
    /// Deletes all dead letters.
    pub async fn purge(&self) -> Result<usize> {
        self.driver.purge().await
    }
    /// The driver, for escape hatches.
    pub fn driver(&self) -> &Arc<dyn DeadLetterDriver> {
        &self.driver
    }
}
