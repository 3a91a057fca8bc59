//! Azure Service Bus (feature `servicebus`): queues, and topics with subscriptions,
//! over AMQP 1.0 directly on fe2o3-amqp (CBS authorization, `$management` requests);
//! entities are declared through the Service Bus management API (ATOM entries over
//! HTTPS).
//!
//! | cloudbus | Service Bus |
//! |---|---|
//! | topic | a topic (`servicebus://`) or a queue (`servicebus://?entity=queue`) |
//! | subscription | a subscription of the topic, or a competing reader of the queue |
//! | CloudEvent attributes | application properties `cloudEvents_<name>` (AMQP binding, binary mode; `cloudEvents:` when chosen with [`ServiceBusConfig::attribute_prefix`], both read); integer extensions as AMQP `long`, boolean ones as `boolean` |
//! | `datacontenttype` | the AMQP `content-type` property |
//! | data | the body (one data section) |
//! | structured mode (`?mode=structured`) | the JSON event as the body, `application/cloudevents+json` (a message is read as structured when its content type starts with `application/cloudevents`) |
//! | a batch of events | one transfer in the batched message format, up to the link's max-message-size |
//! | dedup id (default: the CloudEvent id) | `MessageId`; entities are made with duplicate detection (10 minutes) |
//! | ordering key | `SessionId` on session-enabled entities (`?sessions=true`) |
//! | delay | `ScheduledEnqueueTime` |
//! | ack / nack / dead-letter / extend | complete / abandon / dead-letter with reason and description / renew lock (sessions: renew the session lock, also renewed while the session is held) |
//! | attempt | `DeliveryCount` |
//! | max delivery attempts, lease | `MaxDeliveryCount`, `LockDuration` (5 s to 5 min) |
//! | filter | the subscription's one rule: a correlation filter for exact matches, else a SQL filter |
//! | dead letters | `<entity>/$DeadLetterQueue`, with `DeadLetterReason` and `DeadLetterErrorDescription` |
//!
//! Connection: `SERVICEBUS_CONNECTION_STRING` (`Endpoint=sb://…;SharedAccessKeyName=…;
//! SharedAccessKey=…`, or `SharedAccessSignature=…`; `UseDevelopmentEmulator=true` with
//! an optional port for the emulators), [`ServiceBusConfig::namespace`] with a key, or
//! [`ServiceBusConfig::namespace_with_credential`] with a Microsoft Entra ID identity
//! (any `azure_core` token credential).
//!
//! ```no_run
//! # async fn run() -> cloudbus_core::Result<()> {
//! use cloudbus_core::EventBuilder;
//! // SERVICEBUS_CONNECTION_STRING names the namespace and its key.
//! let bus = cloudbus_azure::connect("servicebus://").await?;
//! bus.ensure_topic("orders").await?;
//! bus.publisher("orders").await?
//!     .publish(EventBuilder::new("com.example.order.created", "/shop").build()?)
//!     .await?;
//! # Ok(()) }
//! ```

mod admin;
mod bus;
mod config;
mod connection;
mod context;
mod dead_letters;
mod error;
mod link;
mod management;
mod message;
mod receiver;
mod rules;
mod sessions;
mod topic;
mod topology;

pub use crate::auth::service_bus_sas_token;
/// The `azure_core` release whose `credentials::TokenCredential` gives Microsoft Entra
/// ID tokens: implement it, or pass an `azure_identity` credential of the same release,
/// to [`ServiceBusConfig::namespace_with_credential`].
pub use azure_core;
pub use bus::ServiceBusBus;
pub use config::{
    ATTRIBUTE_PREFIX, COLON_ATTRIBUTE_PREFIX, CONNECTION_STRING_ENV, DEFAULT_MAX_DELIVERY_COUNT,
    EntityKind, MANAGEMENT_ENDPOINT_ENV, MAX_BATCH_BYTES, MAX_BATCH_COUNT, MAX_LOCK,
    MAX_MESSAGE_BYTES, MAX_TRANSFER_BYTES, MIN_LOCK, REDRIVE_PROPERTY, ServiceBusConfig,
    TOKEN_SCOPE, UNDERSCORE_ATTRIBUTE_PREFIX, UNKEYED_SESSIONS,
};
pub use message::decode_amqp_message;
pub use receiver::ServiceBusSubscription;
pub use rules::{MAX_SQL_LENGTH, RuleFilter, compile_rule};
pub use topic::ServiceBusTopic;
