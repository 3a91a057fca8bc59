//! What a queue is and allows: standard or FIFO, SQS's size, batch and delay limits,
//! the name of its dead-letter queue, and the capabilities that follow.

use std::time::Duration;

use cloudbus_driver::{Capabilities, FilterSupport};

/// Largest message (body and attributes) SQS accepts.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// Most messages in one SendMessageBatch, and most bytes.
pub const MAX_BATCH_COUNT: usize = 10;
/// The longest per-message delay SQS allows.
pub const MAX_DELAY: Duration = Duration::from_secs(900);

pub(crate) fn is_fifo(queue: &str) -> bool {
    queue.ends_with(".fifo")
}

/// The dead-letter queue of `queue`.
pub fn dead_letter_queue(queue: &str) -> String {
    match queue.strip_suffix(".fifo") {
        Some(base) => format!("{base}-dlq.fifo"),
        None => format!("{queue}-dlq"),
    }
}

/// What a queue supports: FIFO queues keep order per group and drop duplicates, but
/// have no per-message delay.
///
/// ```
/// let fifo = cloudbus_aws::sqs::capabilities("orders.fifo");
/// assert!(fifo.ordering && fifo.deduplication && fifo.max_delay.is_none());
/// ```
pub fn capabilities(queue: &str) -> Capabilities {
    let mut c = Capabilities::broker(MAX_MESSAGE_BYTES, MAX_BATCH_COUNT, MAX_MESSAGE_BYTES);
    c.filtering = FilterSupport::None;
    c.fan_out = false;
    c.replay = false;
    if is_fifo(queue) {
        c.ordering = true;
        c.deduplication = true;
        c.max_delay = None;
    } else {
        c.ordering = false;
        c.max_delay = Some(MAX_DELAY);
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_capabilities() {
        assert_eq!(dead_letter_queue("orders"), "orders-dlq");
        assert_eq!(dead_letter_queue("orders.fifo"), "orders-dlq.fifo");
        let std = capabilities("q");
        assert_eq!(std.max_delay, Some(MAX_DELAY));
        assert!(!std.ordering && !std.fan_out);
    }
}
