//! cloudbus-core: the portable layer over the driver contract of `cloudbus-driver`.
//!
//! - [`event`], [`codec`], [`driver`], [`error`], [`filter`], [`capabilities`],
//!   [`scheme`]: the contract, re-exported from `cloudbus-driver` (the CloudEvents
//!   envelope, its codecs, the batch-first traits a provider implements).
//! - [`Publisher`], [`Consumer`], [`Delivery`], [`Worker`], [`DeadLetters`],
//!   [`StreamConsumer`], [`Bus`]: the portable types users work with, which add
//!   batching, concurrency, flow control, retries, dead-lettering, metrics and
//!   tracing once for all providers.
//! - [`CloudEvent`] (typed events), [`Router`] (handlers by event type, with tower
//!   layers), `schema` (feature: JSON Schema registry, validation, compatibility).
//! - [`Filter`], [`Capabilities`], [`Error`].
//!
//! The router and the schemas stay here rather than in crates of their own: they are
//! what a service writes against, next to the publisher and worker they drive, and
//! no provider needs them; a crate each would add two names to learn and save the
//! first build nothing (`schema` is a feature already).
#![warn(missing_docs)]

mod batcher;
pub mod bus;
pub mod checkpoint;
pub mod consumer;
pub mod dead_letters;
mod driver_call;
pub mod handler;
pub mod health;
pub mod idempotency;
mod lease_keeper;
pub mod publisher;
pub mod retry;
pub mod router;
#[cfg(feature = "schema")]
pub mod schema;
pub mod spans;
pub mod stream;
pub mod telemetry;
pub mod topology;
pub mod typed;
pub mod validation;
pub mod worker;

// The driver contract lives in `cloudbus-driver`; its modules are this crate's too, so
// the portable layer and its users name them as before (`cloudbus_core::event`).
#[cfg(feature = "otel")]
pub use cloudbus_driver::otel;
pub use cloudbus_driver::{
    capabilities, codec, config, driver, error, event, filter, hashing, scheme, trace_context,
    transport,
};

pub use bus::Bus;
pub use capabilities::{Capabilities, FilterSupport};
pub use checkpoint::{CheckpointStore, MemoryCheckpointStore};
pub use codec::{BinaryCodec, DecodeError, DecodeErrorKind, RawMessage};
pub use consumer::{Consumer, ConsumerOptions, Delivery, describe_payload};
pub use dead_letters::{DeadLetters, TopicDeadLetters};
pub use driver::{
    AckToken, AsAny, BatchResults, BusDriver, DeadLetter, DeadLetterDriver, DeadLetterSink,
    OutgoingMessage, PartitionInfo, Payload, PublishOptions, ReadBatch, ReceivedMessage,
    Settlement, StartPosition, StreamDriver, StreamRecord, SubscriptionDriver, SubscriptionSpec,
    SubscriptionState, TopicDriver, TopicState, TopologyDriver, TopologyPlanning,
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
