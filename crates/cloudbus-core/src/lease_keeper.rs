//! Keeps the leases of the deliveries a worker holds (queued behind their ordering
//! key, waiting for flow-control bytes, being handled, or held through a retry
//! backoff) until their settlement begins. One timer serves the whole worker: it
//! extends every lease that is due, and those due soon after, in one go (the
//! consumer's settler coalesces the extensions into batch calls), instead of one
//! timer per delivery. Deliveries are kept by received batch (one registration per
//! batch, not per delivery) and referred to weakly, so a handled delivery is freed
//! at once even while others of its batch still run.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::consumer::Delivery;
use cloudbus_driver::error::ErrorKind;
use cloudbus_driver::event::AttributesReader;

/// Extensions come at half the lease, and never more often than this.
const SHORTEST_PERIOD: Duration = Duration::from_millis(50);

/// The leases a worker keeps alive; [`run`](LeaseKeeper::run) is its timer.
#[derive(Default)]
pub(crate) struct LeaseKeeper {
    state: Mutex<Kept>,
    /// Wakes the timer when a lease is due before the time it sleeps to.
    wake: Notify,
}

#[derive(Default)]
struct Kept {
    next_id: u64,
    entries: HashMap<u64, Entry>,
    /// When the timer looks next; `None` while it waits for a first lease.
    next_look: Option<Instant>,
}

/// One received batch.
struct Entry {
    deliveries: Vec<Weak<Delivery>>,
    /// The shortest lease of the batch, which sets when it is due.
    lease: Duration,
    due: Instant,
}

/// A batch's place in the keeper, shared by its deliveries: dropping the last one
/// ends the extensions.
pub(crate) struct KeptLeases {
    keeper: Arc<LeaseKeeper>,
    id: u64,
}

impl Drop for KeptLeases {
    fn drop(&mut self) {
        if let Ok(mut kept) = self.keeper.state.lock() {
            kept.entries.remove(&self.id);
        }
    }
}

fn period(lease: Duration) -> Duration {
    (lease / 2).max(SHORTEST_PERIOD)
}

impl LeaseKeeper {
    /// Keeps the leases of `deliveries` (those that have one) until the returned
    /// hold is dropped; `None` when none has a lease.
    pub(crate) fn keep(self: &Arc<Self>, deliveries: &[Arc<Delivery>]) -> Option<Arc<KeptLeases>> {
        let lease = deliveries.iter().filter_map(|d| d.lease()).min()?;
        let due = Instant::now() + period(lease);
        let entry = Entry {
            deliveries: deliveries.iter().map(Arc::downgrade).collect(),
            lease,
            due,
        };
        let (id, wake) = {
            let mut kept = self.state.lock().ok()?;
            let id = kept.next_id;
            kept.next_id += 1;
            kept.entries.insert(id, entry);
            let wake = kept.next_look.is_none_or(|at| due < at);
            if wake {
                kept.next_look = Some(due);
            }
            (id, wake)
        };
        if wake {
            self.wake.notify_one();
        }
        Some(Arc::new(KeptLeases {
            keeper: self.clone(),
            id,
        }))
    }

    /// The timer: extends what is due (and what falls due within an eighth of its
    /// lease, to extend in fewer calls), then sleeps until the next one is due.
    /// Runs until aborted.
    pub(crate) async fn run(self: Arc<Self>) {
        loop {
            let (due, next_look) = {
                let Ok(mut kept) = self.state.lock() else {
                    return;
                };
                let now = Instant::now();
                let mut due = Vec::new();
                let mut next_look: Option<Instant> = None;
                for entry in kept.entries.values_mut() {
                    if entry.due <= now + entry.lease / 8 {
                        entry.due = now + period(entry.lease);
                        due.extend(
                            entry
                                .deliveries
                                .iter()
                                .filter_map(Weak::upgrade)
                                .filter(|d| !d.is_settled()),
                        );
                    }
                    next_look = Some(next_look.map_or(entry.due, |at| at.min(entry.due)));
                }
                kept.next_look = next_look;
                (due, next_look)
            };
            futures::future::join_all(due.iter().map(|delivery| extend(delivery))).await;
            drop(due);
            match next_look {
                Some(at) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at.into()) => {},
                        _ = self.wake.notified() => {},
                    }
                }
                None => self.wake.notified().await,
            }
        }
    }
}

async fn extend(delivery: &Delivery) {
    let Some(lease) = delivery.lease() else {
        return;
    };
    match delivery.extend(lease).await {
        Ok(()) => {}
        // Its settlement began meanwhile: nothing left to keep.
        Err(e) if e.kind() == ErrorKind::AlreadySettled => {}
        Err(e) => {
            tracing::warn!(event_id = %delivery.event().id(), error = %e, "lease extension failed")
        }
    }
}
