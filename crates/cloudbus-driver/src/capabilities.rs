//! What a provider really does, so that code and tests can ask instead of guess.

use std::time::Duration;

/// How a provider applies a subscription [`Filter`](crate::Filter).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterSupport {
    /// The cloud evaluates the compiled filter; non-matching events never arrive.
    Native,
    /// cloudbus evaluates the filter after receipt and acks what does not match.
    InProcess,
    /// Filters are not available.
    None,
}

/// The capabilities of one provider (or one entity of it, such as a FIFO queue).
///
/// ```
/// use cloudbus_driver::Capabilities;
/// let caps = Capabilities::default();
/// assert!(caps.max_message_bytes > 0);
/// ```
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Capabilities {
    /// Events with the same ordering key are delivered in publish order.
    pub ordering: bool,
    /// The provider drops duplicates by deduplication id.
    pub deduplication: bool,
    /// Publishing with a delay is supported, up to this long.
    pub max_delay: Option<Duration>,
    /// The provider has a dead-letter place of its own (otherwise cloudbus keeps one).
    pub native_dead_letter: bool,
    /// `dead_letter(reason)` keeps the reason with the message.
    pub dead_letter_reason: bool,
    /// Redelivery after too many attempts is done by the provider.
    pub max_delivery_attempts: bool,
    /// How filters are applied.
    pub filtering: FilterSupport,
    /// Subscriptions can be replayed from a time (`Bus::replay` (cloudbus-core)).
    /// Streams always can (`StreamConsumer::replay` (cloudbus-core)).
    pub replay: bool,
    /// Several subscriptions each get every event (fan-out).
    pub fan_out: bool,
    /// `nack(delay)` honours the delay.
    pub nack_delay: bool,
    /// Leases can be extended.
    pub lease_extension: bool,
    /// Largest event accepted, in bytes.
    pub max_message_bytes: usize,
    /// Most events in one send.
    pub max_batch_count: usize,
    /// Most bytes in one send.
    pub max_batch_bytes: usize,
    /// Raw (non-CloudEvent) messages can be injected, for the malformed-message tests.
    pub raw_messages: bool,
    /// How many sends of one publisher the provider carries at once; a
    /// `Publisher` (cloudbus-core) uses no more lanes than this. Service Bus
    /// sends over one link, one transfer at a time, so lanes beyond one would only
    /// split a batch into smaller transfers that wait for each other.
    pub concurrent_sends: usize,
}

impl Default for Capabilities {
    /// A conservative baseline: nothing optional, 256 KiB messages, batches of 10.
    fn default() -> Self {
        Capabilities {
            ordering: false,
            deduplication: false,
            max_delay: None,
            native_dead_letter: false,
            dead_letter_reason: false,
            max_delivery_attempts: false,
            filtering: FilterSupport::None,
            replay: false,
            fan_out: false,
            nack_delay: false,
            lease_extension: false,
            max_message_bytes: 256 * 1024,
            max_batch_count: 10,
            max_batch_bytes: 256 * 1024,
            raw_messages: false,
            concurrent_sends: usize::MAX,
        }
    }
}

impl Capabilities {
    /// A broker that orders, filters, fans out, dead-letters with reasons, counts
    /// attempts, delays and extends leases (the embedded memory broker), with these
    /// limits; it neither deduplicates nor replays. Providers start here and turn
    /// off what they lack.
    ///
    /// ```
    /// let caps = cloudbus_driver::Capabilities::broker(256 * 1024, 100, 1024 * 1024);
    /// assert!(caps.ordering && caps.native_dead_letter);
    /// assert!(!caps.deduplication && !caps.replay);
    /// ```
    pub fn broker(
        max_message_bytes: usize,
        max_batch_count: usize,
        max_batch_bytes: usize,
    ) -> Self {
        Capabilities {
            ordering: true,
            deduplication: false,
            max_delay: Some(Duration::from_secs(365 * 24 * 3600)),
            native_dead_letter: true,
            dead_letter_reason: true,
            max_delivery_attempts: true,
            filtering: FilterSupport::Native,
            replay: false,
            fan_out: true,
            nack_delay: true,
            lease_extension: true,
            max_message_bytes,
            max_batch_count,
            max_batch_bytes,
            raw_messages: true,
            concurrent_sends: usize::MAX,
        }
    }
}
