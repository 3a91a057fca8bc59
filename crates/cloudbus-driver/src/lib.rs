//! cloudbus-driver: the contract between cloudbus and a provider.
//!
//! A provider (a broker, a cloud service, a test double) depends on this crate alone:
//! it implements the batch-first traits of [`driver`] ([`BusDriver`], [`TopicDriver`],
//! [`SubscriptionDriver`], [`DeadLetterDriver`], [`StreamDriver`],
//! [`TopologyDriver`]) over the CloudEvents envelope of [`event`], encodes and
//! decodes with [`codec`], reports what it can do in [`Capabilities`], applies
//! [`Filter`]s, answers with [`Error`]s, and registers its URL schemes in
//! [`scheme`], reading their parameters with [`config`]. The portable layer
//! (`cloudbus-core`: publisher, consumer, worker, router, schemas) is built on top of
//! it; the conformance suite (`cloudbus-conformance`) checks a provider against it.
//!
//! Nothing here spawns a task, runs a handler or reads a schema. An event carries its
//! trace context (`traceparent`, `tracestate`) from its creation; with feature `otel`
//! that context comes through OpenTelemetry's W3C propagator ([`otel`]).
//!
//! ```
//! use cloudbus_driver::{Event, EventBuilder, EventExt, codec};
//! let event = EventBuilder::new("com.example.order.created", "/orders")
//!     .partition_key("customer-7")
//!     .build()?;
//! let body = codec::to_structured_json(&event)?;
//! let back: Event = codec::from_structured_json(&body).expect("a CloudEvent");
//! assert_eq!(back.partition_key(), Some("customer-7"));
//! # Ok::<(), cloudbus_driver::Error>(())
//! ```
#![warn(missing_docs)]

pub mod capabilities;
pub mod codec;
pub mod config;
pub mod driver;
pub mod error;
pub mod event;
pub mod filter;
pub mod hashing;
mod json_format;
#[cfg(feature = "otel")]
pub mod otel;
pub mod scheme;
pub mod trace_context;
pub mod transport;

pub use capabilities::{Capabilities, FilterSupport};
pub use codec::{BinaryCodec, DecodeError, DecodeErrorKind, RawMessage};
pub use driver::{
    AckToken, AsAny, BatchResults, BusDriver, CheckpointStore, DeadLetter, DeadLetterDriver,
    DeadLetterSink, OutgoingMessage, PartitionInfo, Payload, PublishOptions, ReadBatch,
    ReceivedMessage, Settlement, StartPosition, StreamDriver, StreamRecord, SubscriptionDriver,
    SubscriptionSpec, SubscriptionState, TopicDriver, TopicState, TopologyDriver, TopologyPlanning,
};
pub use error::{Error, ErrorKind, Missing, Result};
pub use event::{
    AttributesReader, AttributesWriter, Data, Event, EventBuilder, EventExt, ExtensionValue,
};
pub use filter::Filter;
pub use trace_context::TraceContext;
