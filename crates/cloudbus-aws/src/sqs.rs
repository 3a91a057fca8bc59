//! Amazon SQS: standard and FIFO queues as cloudbus topics and subscriptions.
//!
//! A queue is both the topic (publishers send to it) and the subscription (consumers
//! compete on it; SQS has no fan-out). `ensure_subscription(spec)` configures the
//! queue named by `spec.topic`: its visibility timeout (the lease), a dead-letter
//! queue `<queue>-dlq` (`<queue>-dlq.fifo`) with a RedrivePolicy (`maxReceiveCount` =
//! the spec's max delivery attempts, 1000 when unset), and a tag that admits the
//! subscription name. CloudEvents travel in binary mode as `ce-` message attributes
//! within SQS's 10 (two are kept for the dead-letter reason), else structured.

mod bus;
mod context;
mod dead_letters;
mod error;
mod limits;
mod queue;
mod topology;
mod wire;

pub use bus::SqsBus;
#[cfg(any(feature = "sns", feature = "eventbridge"))]
pub(crate) use context::SqsContext;
pub use dead_letters::SqsDeadLetters;
#[cfg(any(feature = "sns", feature = "eventbridge"))]
pub(crate) use error::kind_of_code;
pub use limits::{MAX_BATCH_COUNT, MAX_DELAY, MAX_MESSAGE_BYTES, capabilities, dead_letter_queue};
pub use queue::SqsQueue;
#[cfg(any(feature = "sns", feature = "eventbridge"))]
pub(crate) use topology::{configure_queue, queue_desired, queue_state};
pub use wire::{ATTRIBUTE_PREFIX, CONTENT_TYPE_ATTRIBUTE, MAX_ATTRIBUTES, decode_message};
#[cfg(feature = "sns")]
pub(crate) use wire::{codec, dedup_id_of, group_id, text_body};
