//! Deleting what is no longer needed (expired dedup keys, sent outbox rows) without
//! one huge statement: a bounded chunk per statement, until a chunk comes back short;
//! and how often a store does it by itself.

use std::future::Future;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use cloudbus_driver::Result;

/// Rows one delete statement removes at most.
pub(crate) const CHUNK_ROWS: i64 = 5_000;

/// Runs `delete_chunk(CHUNK_ROWS)` (a statement deleting at most that many rows,
/// answering how many it deleted) until a chunk is short; returns the total.
pub(crate) async fn delete_in_chunks<F, Fut>(mut delete_chunk: F) -> Result<u64>
where
    F: FnMut(i64) -> Fut,
    Fut: Future<Output = Result<u64>>,
{
    let mut total = 0;
    loop {
        let deleted = delete_chunk(CHUNK_ROWS).await?;
        total += deleted;
        if deleted < CHUNK_ROWS.unsigned_abs() {
            return Ok(total);
        }
    }
}

/// Says when a periodic sweep is due: once per period, to one caller.
pub(crate) struct SweepSchedule {
    period: Duration,
    last: Mutex<Instant>,
}

impl SweepSchedule {
    /// The first sweep is due one `period` from now.
    pub(crate) fn every(period: Duration) -> Self {
        SweepSchedule {
            period,
            last: Mutex::new(Instant::now()),
        }
    }

    /// Whether a sweep is due now; the caller that gets `true` sweeps.
    pub(crate) fn due(&self) -> bool {
        self.last.lock().is_ok_and(|mut last| {
            let due = last.elapsed() >= self.period;
            if due {
                *last = Instant::now();
            }
            due
        })
    }
}
