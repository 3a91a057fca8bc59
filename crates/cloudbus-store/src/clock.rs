//! Durations and instants as the stores write them: whole milliseconds.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `d` in whole milliseconds (saturating).
pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Now, in milliseconds since the Unix epoch (the SQLite stores' clock: SQLite is in
/// the process, so the process's clock is the database's).
#[cfg_attr(not(feature = "sqlite"), allow(dead_code))]
pub(crate) fn unix_millis_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, millis)
}
