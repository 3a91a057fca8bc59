//! What Pub/Sub takes and does, as cloudbus reports it: its message and batch
//! limits, and the capabilities of the subscriptions `ensure` makes (filters are
//! native in the cloud, applied in-process on the emulator, which ignores them).

use cloudbus_driver::{Capabilities, FilterSupport};

/// Largest message cloudbus sends: Pub/Sub's 10 MB request limit less room for framing.
pub const MAX_MESSAGE_BYTES: usize = 9_900_000;
/// Most messages in one Publish request.
pub const MAX_BATCH_COUNT: usize = 1000;

/// Capabilities of Pub/Sub subscriptions made by `ensure` (see the README table).
pub fn capabilities(emulator: bool) -> Capabilities {
    let mut c = Capabilities::broker(MAX_MESSAGE_BYTES, MAX_BATCH_COUNT, MAX_MESSAGE_BYTES);
    c.max_delay = None;
    c.deduplication = false;
    c.replay = true;
    c.filtering = if emulator {
        FilterSupport::InProcess
    } else {
        FilterSupport::Native
    };
    c
}
