//! cloudbus-core: the parts every cloudbus provider plugs into.
//!
//! - [`event`]: the CloudEvents 1.0 envelope ([`Event`], [`EventBuilder`], [`EventExt`]).
//! - [`codec`]: structured JSON and binary (attribute) modes with an attribute budget.
//! - [`driver`]: the small, batch-first traits a provider implements.
//! - [`Publisher`], [`Consumer`], [`Delivery`], [`Worker`], [`DeadLetters`],
//!   [`StreamConsumer`], [`Bus`]: the portable types users work with, which add
//!   batching, concurrency, flow control, retries, dead-lettering, metrics and
//!   tracing once for all providers.
//! - [`CloudEvent`] (typed events), [`Router`] (handlers by event type, with tower
//!   layers), `schema` (feature: JSON Schema registry, validation, compatibility).
//! - [`Filter`], [`Capabilities`], [`Error`].
//! - `conformance` (feature): the suite every provider runs from its tests.
#![warn(missing_docs)]

mod batcher;
pub mod bus;
pub mod capabilities;
pub mod checkpoint;
pub mod codec;
pub mod consumer;
pub mod dead_letters;
pub mod driver;
pub mod error;
pub mod event;
pub mod filter;
pub mod handler;
pub mod health;
pub mod idempotency;
mod json_format;
mod lease_keeper;
#[cfg(feature = "otel")]
pub mod otel;
pub mod publisher;
pub mod retry;
pub mod router;
#[cfg(feature = "schema")]
pub mod schema;
pub mod scheme;
pub mod spans;
pub mod stream;
pub mod telemetry;
pub mod topology;
pub mod trace_context;
pub mod transport;
pub mod typed;
pub mod validation;
pub mod worker;

#[cfg(feature = "conformance")]
pub mod conformance;

pub use bus::Bus;
pub use capabilities::{Capabilities, FilterSupport};
pub use checkpoint::{CheckpointStore, MemoryCheckpointStore};
pub use codec::{BinaryCodec, DecodeError, DecodeErrorKind, RawMessage};
pub use consumer::{Consumer, ConsumerOptions, Delivery, describe_payload};
pub use dead_letters::{DeadLetters, TopicDeadLetters};
pub use driver::{
    AckToken, BatchResults, BusDriver, DeadLetter, DeadLetterDriver, DeadLetterSink,
    OutgoingMessage, PartitionInfo, Payload, PublishOptions, ReadBatch, ReceivedMessage,
    Settlement, StartPosition, StreamDriver, StreamRecord, SubscriptionDriver, SubscriptionSpec,
    SubscriptionState, TopicDriver, TopologyDriver,
};
pub use error::{Error, ErrorKind, Missing, Result};
pub use event::{
    AttributesReader, AttributesWriter, Data, Event, EventBuilder, EventExt, ExtensionValue,
};
pub use filter::Filter;
pub use handler::{Handler, HandlerContext, HandlerError, HandlerRunner, Permanent};
pub use health::{LastError, PublisherHealth, WorkerHealth};
pub use idempotency::{Claim, DedupStore, Idempotent, MemoryDedupStore};
pub use publisher::{PublishHandle, Publisher, PublisherOptions};
pub use retry::RetryPolicy;
pub use router::{Context, Router, UnknownTypes};
pub use stream::{PollReport, StreamConsumer};
pub use trace_context::TraceContext;
pub use typed::{CloudEvent, DecodeEventError, DecodeExt, SendEvent};
pub use validation::{Checked, EventValidator};
pub use worker::{Worker, WorkerOptions, WorkerReport};
