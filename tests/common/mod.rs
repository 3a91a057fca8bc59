//! What the facade's memory-broker test binaries share: the conformance harness on
//! a fresh in-memory broker.

use std::time::Duration;

use async_trait::async_trait;
use cloudbus::conformance::Harness;
use cloudbus::memory::MemoryBroker;
use cloudbus::{Bus, Capabilities};

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
    async fn bus(&self) -> cloudbus::Result<Bus> {
        Ok(self.broker.bus())
    }
    fn capabilities(&self) -> Capabilities {
        self.broker.capabilities()
    }
    fn patience(&self) -> Duration {
        Duration::from_secs(5)
    }
    fn short_lease(&self) -> Duration {
        Duration::from_millis(400)
    }
}
