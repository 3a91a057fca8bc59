//! Where stream consumers keep their place: the last handled sequence number per
//! (consumer group, partition), and which reader of the group owns a partition now.
//!
//! Ownership is a lease: a reader takes a partition with [`CheckpointStore::acquire`],
//! renews it by acquiring again before the lease runs out, and gives it up with
//! [`CheckpointStore::release`]. While one reader's lease runs, no other reader of the
//! group can acquire the partition or move its checkpoint, so two readers never both
//! own a shard; a reader that died loses its partitions when its leases lapse. The
//! in-memory [`MemoryCheckpointStore`] lives here; durable ones (PostgreSQL, SQLite,
//! Redis) are in `cloudbus-store`, and all of them pass one conformance suite
//! (`conformance::store_cases`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_trait::async_trait;

use cloudbus_driver::error::{Error, ErrorKind, Result};

pub use cloudbus_driver::driver::CheckpointStore;

#[derive(Default)]
struct PartitionState {
    sequence: Option<String>,
    /// The owner and the end of its lease.
    lease: Option<(String, Instant)>,
}

impl PartitionState {
    /// Whether a reader other than `owner` holds a lease that runs now.
    fn held_by_another(&self, owner: &str, now: Instant) -> bool {
        self.lease
            .as_ref()
            .is_some_and(|(holder, until)| holder != owner && *until > now)
    }
}

/// Checkpoints and leases in memory (lost with the process; shared by the readers of
/// one process).
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use std::time::Duration;
/// use cloudbus_core::{CheckpointStore, MemoryCheckpointStore};
/// let store = MemoryCheckpointStore::new();
/// let lease = Duration::from_secs(30);
/// assert!(store.acquire("billing", "shard-0", "reader-a", lease).await.unwrap());
/// assert!(!store.acquire("billing", "shard-0", "reader-b", lease).await.unwrap());
/// assert!(store.save("billing", "shard-0", "reader-a", "42").await.unwrap());
/// store.release("billing", "shard-0", "reader-a").await.unwrap();
/// assert!(store.acquire("billing", "shard-0", "reader-b", lease).await.unwrap());
/// assert_eq!(store.load("billing", "shard-0").await.unwrap().as_deref(), Some("42"));
/// # });
/// ```
#[derive(Default)]
pub struct MemoryCheckpointStore {
    map: Mutex<HashMap<(String, String), PartitionState>>,
}

impl MemoryCheckpointStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, HashMap<(String, String), PartitionState>>> {
        self.map
            .lock()
            .map_err(|_| Error::new(ErrorKind::Internal, "checkpoint lock poisoned"))
    }
}

fn key(group: &str, partition: &str) -> (String, String) {
    (group.to_owned(), partition.to_owned())
}

#[async_trait]
impl CheckpointStore for MemoryCheckpointStore {
    async fn load(&self, group: &str, partition: &str) -> Result<Option<String>> {
        Ok(self
            .lock()?
            .get(&key(group, partition))
            .and_then(|p| p.sequence.clone()))
    }

    async fn save(
        &self,
        group: &str,
        partition: &str,
        owner: &str,
        sequence: &str,
    ) -> Result<bool> {
        let mut map = self.lock()?;
        let state = map.entry(key(group, partition)).or_default();
        if state.held_by_another(owner, Instant::now()) {
            return Ok(false);
        }
        state.sequence = Some(sequence.to_owned());
        Ok(true)
    }

    async fn acquire(
        &self,
        group: &str,
        partition: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<bool> {
        let now = Instant::now();
        let mut map = self.lock()?;
        let state = map.entry(key(group, partition)).or_default();
        if state.held_by_another(owner, now) {
            return Ok(false);
        }
        state.lease = Some((owner.to_owned(), now + lease));
        Ok(true)
    }

    async fn release(&self, group: &str, partition: &str, owner: &str) -> Result<()> {
        let mut map = self.lock()?;
        if let Some(state) = map.get_mut(&key(group, partition))
            && state
                .lease
                .as_ref()
                .is_some_and(|(holder, _)| holder == owner)
        {
            state.lease = None;
        }
        Ok(())
    }
}
