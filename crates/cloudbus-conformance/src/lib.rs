//! cloudbus-conformance: the suite every provider runs from its tests, as a
//! dev-dependency (the `cloudbus` facade does not ship it).
//!
//! A provider implements [`Harness`] (a [`Bus`](cloudbus_core::Bus) on which the suite may create
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

#[macro_use]
mod macros;
#[deny(dead_code)]
mod cases;
pub mod chaos;
pub mod emulator;
mod harness;
pub mod network;
#[cfg(feature = "otel")]
pub mod otel_cases;
mod runner;
#[deny(dead_code)]
mod store_cases;
#[deny(dead_code)]
mod stream_cases;

pub use cases::CASES as BUS_CASES;
pub use harness::{
    Case, CaseFuture, Harness, Outcome, StoreHarness, StreamHarness, declared_capabilities,
};
pub use runner::Suite;
pub use store_cases::CASES as STORE_CASES;
pub use stream_cases::CASES as STREAM_CASES;
