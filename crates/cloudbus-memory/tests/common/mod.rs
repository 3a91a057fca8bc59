//! What the memory broker's test binaries share: the conformance harnesses on a
//! fresh in-memory broker (topics and subscriptions, logs, the in-memory stores).
#![allow(dead_code)]

use std::time::Duration;

use async_trait::async_trait;
use cloudbus_conformance::Harness;
use cloudbus_memory::MemoryBroker;
use std::sync::Arc;

use cloudbus_core::{Bus, MemoryCheckpointStore, MemoryDedupStore, SubscriptionSpec};

/// The conformance harness on one in-memory broker (every `bus()` shares it).
pub struct MemoryHarness {
    pub broker: MemoryBroker,
}

impl MemoryHarness {
    pub fn new() -> Self {
        MemoryHarness {
            broker: MemoryBroker::new(),
        }
    }
}

#[async_trait]
impl Harness for MemoryHarness {
    async fn bus(&self) -> cloudbus_core::Result<Bus> {
        Ok(self.broker.bus())
    }
    fn patience(&self) -> Duration {
        Duration::from_secs(5)
    }
    fn short_lease(&self) -> Duration {
        Duration::from_millis(400)
    }
}

/// The in-memory stores, against the store conformance suite: one process, so every
/// handle is the same store.
pub struct MemoryStores {
    pub dedup: Arc<cloudbus_core::MemoryDedupStore>,
    pub checkpoints: Arc<MemoryCheckpointStore>,
}

#[async_trait]
impl cloudbus_conformance::StoreHarness for MemoryStores {
    async fn dedup_store(
        &self,
    ) -> cloudbus_core::Result<Option<Arc<dyn cloudbus_core::DedupStore>>> {
        Ok(Some(self.dedup.clone()))
    }
    async fn checkpoint_store(
        &self,
    ) -> cloudbus_core::Result<Option<Arc<dyn cloudbus_core::CheckpointStore>>> {
        Ok(Some(self.checkpoints.clone()))
    }
}

impl MemoryStores {
    pub fn new() -> Self {
        MemoryStores {
            dedup: Arc::new(MemoryDedupStore::new(10_000)),
            checkpoints: Arc::new(MemoryCheckpointStore::new()),
        }
    }
}

/// The memory broker's partitioned logs under the stream suite; dead letters go to a
/// topic of the same broker.
#[async_trait]
impl cloudbus_conformance::StreamHarness for MemoryHarness {
    async fn bus(&self) -> cloudbus_core::Result<Bus> {
        Ok(self.broker.bus())
    }
    async fn new_stream(&self) -> cloudbus_core::Result<String> {
        let name = format!("log-{:08x}", fastrand::u32(..));
        self.broker.ensure_log(&name, 3)?;
        Ok(name)
    }
    async fn dead_letter_bus(&self) -> cloudbus_core::Result<Bus> {
        Ok(self.broker.bus())
    }
    async fn dead_letter_place(&self) -> cloudbus_core::Result<String> {
        let name = format!("dl-{:08x}", fastrand::u32(..));
        let bus = self.broker.bus();
        bus.ensure_topic(&name).await?;
        bus.ensure_subscription(&SubscriptionSpec::new(&name, &name))
            .await?;
        Ok(name)
    }
    fn patience(&self) -> Duration {
        Duration::from_secs(5)
    }
}
