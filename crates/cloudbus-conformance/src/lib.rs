//! cloudbus-conformance: the suite every provider runs from its tests, as a
//! dev-dependency (the `cloudbus` facade does not ship it).
//!
//! A provider implements [`Harness`] (a [`Bus`] on which the suite may create
//! uniquely named topics and subscriptions, and its timings) and runs the cases from a
//! test target of its own with `harness = false`, through [`Suite`]: one test per
//! case, named `PREFIX::case`, filtered and listed like any other test (`cargo test`,
//! `cargo nextest`). What the provider can do is read from the drivers under test
//! (the publisher's and consumer's capabilities), so a driver that misreports them
//! fails. Cases that need a capability the provider lacks print a SKIPPED line naming
//! it and pass; every other failure fails the test.
//!
//! ```no_run
//! // tests/conformance.rs of a provider, with `[[test]] name = "conformance"
//! // harness = false` in its Cargo.toml.
//! use cloudbus_conformance::{Harness, Suite};
//! struct MyHarness;
//! #[async_trait::async_trait]
//! impl Harness for MyHarness {
//!     async fn bus(&self) -> cloudbus_core::Result<cloudbus_core::Bus> {
//!         todo!("open the provider's bus")
//!     }
//! }
//! fn main() -> std::process::ExitCode {
//!     Suite::new()
//!         .bus("my_provider", || async { Some(MyHarness) })
//!         .chaos("my_provider_chaos", || async { Some(MyHarness) }, 500)
//!         .run()
//! }
//! ```
//!
//! The case lists are registries ([`BUS_CASES`], [`STREAM_CASES`], [`STORE_CASES`]):
//! each case module ends with the list of its cases, and its case functions are
//! private, so a case missing from the list is a `dead_code` error and a listed case
//! that does not exist does not compile.
//!
//! The cases cover Go CDK's drivertest, Watermill's pubsub tests and Dapr's
//! conformance suite (see `cases.rs`), plus dead-lettering, redrive, ordering, filters,
//! delays, malformed input, publisher close and graceful shutdown.
//!
//! Partitioned logs (Kinesis, the memory broker's logs) have no subscriptions to ack;
//! they implement [`StreamHarness`] and run [`Suite::stream`] instead (see
//! `stream_cases.rs`): round trip, order per key, checkpoints, consumer
//! groups, `Latest`, replay from the start and from a time, retries, dead letters,
//! malformed records, publisher close, trace context and a missing stream.
//!
//! Stores (dedup stores for idempotent consumers, checkpoint stores for stream
//! readers) implement [`StoreHarness`] and run [`Suite::store`] (see
//! `store_cases.rs`): the memory stores in `cloudbus-memory`, the durable ones in
//! `cloudbus-store`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use cloudbus_core::bus::Bus;
use cloudbus_core::checkpoint::CheckpointStore;
use cloudbus_core::error::Result;
use cloudbus_core::idempotency::DedupStore;

/// Fails the case with the condition and a message when the condition is false.
macro_rules! check {
    ($cond:expr, $($msg:tt)+) => {
        if !$cond {
            return Err(Error::new(ErrorKind::Internal, format!("check failed: {}: {}", stringify!($cond), format!($($msg)+))));
        }
    };
}

/// Skips the case, naming the capability, when the provider lacks it.
macro_rules! need {
    ($cond:expr, $what:expr) => {
        if !$cond {
            return Ok(Outcome::Skipped($what.to_string()));
        }
    };
}

#[deny(dead_code)]
mod cases;
pub mod chaos;
pub mod emulator;
pub mod network;
#[cfg(feature = "otel")]
pub mod otel_cases;
mod runner;
#[deny(dead_code)]
mod store_cases;
#[deny(dead_code)]
mod stream_cases;

pub use cases::CASES as BUS_CASES;
pub use runner::Suite;
pub use store_cases::CASES as STORE_CASES;
pub use stream_cases::CASES as STREAM_CASES;

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
    /// Whether raw (non-CloudEvent) records can be written, for the malformed case.
    fn raw_records(&self) -> bool {
        true
    }
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

/// A case list: `registry![case_fn, ...]` makes `Case`s of the functions, named after
/// them.
macro_rules! registry {
    ($($case:ident),+ $(,)?) => {
        &[$(crate::Case { name: stringify!($case), run: |h| Box::pin($case(h)) }),+]
    };
}
pub(crate) use registry;

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
