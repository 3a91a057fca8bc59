//! What a provider gives the suite (its harness: a bus and the timings), how a case
//! ends, the cases' registry entries, and what the drivers under test declare.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use cloudbus_core::bus::Bus;
use cloudbus_core::checkpoint::CheckpointStore;
use cloudbus_core::error::Result;
use cloudbus_core::idempotency::DedupStore;

/// What a provider gives the suite.
#[async_trait]
pub trait Harness: Send + Sync + 'static {
    /// A bus on which the suite creates uniquely named topics and subscriptions. What
    /// the provider can do is read from the publishers and consumers of this bus (the
    /// drivers under test), never from the harness.
    async fn bus(&self) -> Result<Bus>;
    /// How long to wait for asynchronous delivery (emulators can be slow).
    fn patience(&self) -> Duration {
        Duration::from_secs(10)
    }
    /// The shortest lease (ack deadline, visibility timeout) the provider honours.
    fn short_lease(&self) -> Duration {
        Duration::from_secs(1)
    }
    /// How subscriptions get their names made unique (some clouds limit length).
    fn unique(&self, prefix: &str) -> String {
        format!("{prefix}-{:08x}", fastrand::u32(..))
    }
}

/// What a partitioned-log provider gives the stream suite.
#[async_trait]
pub trait StreamHarness: Send + Sync + 'static {
    /// The bus whose streams the suite reads and writes.
    async fn bus(&self) -> Result<Bus>;
    /// Creates a new, uniquely named stream with at least two partitions.
    async fn new_stream(&self) -> Result<String>;
    /// The bus that holds the dead-letter places (the same bus, or another provider's:
    /// Kinesis dead-letters into SQS).
    async fn dead_letter_bus(&self) -> Result<Bus>;
    /// Creates a new dead-letter place on [`dead_letter_bus`](Self::dead_letter_bus):
    /// a topic with a subscription of the same name. Returns its name.
    async fn dead_letter_place(&self) -> Result<String>;
    /// How long to wait for records to become readable.
    fn patience(&self) -> Duration {
        Duration::from_secs(30)
    }
}

/// What a store gives the store suite. Each call opens a new handle (a new
/// connection pool, client or reference) on the same data, as two processes would
/// have; a store kind it does not offer answers `None` and its cases skip.
#[async_trait]
pub trait StoreHarness: Send + Sync + 'static {
    /// A handle on the dedup store.
    async fn dedup_store(&self) -> Result<Option<Arc<dyn DedupStore>>>;
    /// A handle on the checkpoint store.
    async fn checkpoint_store(&self) -> Result<Option<Arc<dyn CheckpointStore>>>;
}

/// How a case ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// All checks held.
    Passed,
    /// The provider lacks a capability the case needs.
    Skipped(String),
}

/// A boxed case future.
pub type CaseFuture<'a> = Pin<Box<dyn Future<Output = Result<Outcome>> + Send + 'a>>;

/// One case of a registry: its name and its function.
pub struct Case<H: ?Sized + 'static> {
    /// The case's name (its function's), which names its test.
    pub name: &'static str,
    /// Runs the case on a harness.
    pub run: for<'a> fn(&'a H) -> CaseFuture<'a>,
}

impl<H: ?Sized> std::fmt::Debug for Case<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Case").field("name", &self.name).finish()
    }
}

/// Prints a skipped case; an error for a failed one.
pub(crate) fn verdict(
    kind: &str,
    name: &str,
    outcome: Result<Outcome>,
) -> std::result::Result<(), String> {
    match outcome {
        Ok(Outcome::Passed) => Ok(()),
        Ok(Outcome::Skipped(why)) => {
            eprintln!("SKIPPED {kind} {name}: the provider lacks {why}");
            Ok(())
        }
        Err(e) => Err(format!("{kind} {name} failed: {e}")),
    }
}

/// What the drivers under test declare they can do: the topic's driver (the
/// publisher) for what happens on the way in (fan-out, filters, delays, size, raw
/// bodies), the subscription's (the consumer) for settlement (nack delays, leases,
/// dead letters, attempts), and both for order.
pub fn declared_capabilities(
    publisher: &cloudbus_core::Publisher,
    consumer: &cloudbus_core::Consumer,
) -> cloudbus_core::Capabilities {
    let sending = publisher.capabilities();
    let mut caps = consumer.capabilities().clone();
    caps.fan_out = sending.fan_out;
    caps.filtering = sending.filtering;
    caps.max_delay = sending.max_delay;
    caps.max_message_bytes = sending.max_message_bytes;
    caps.raw_messages = sending.raw_messages;
    caps.ordering = sending.ordering && caps.ordering;
    caps
}
