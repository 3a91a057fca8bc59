//! What the Pub/Sub emulator tests share: the emulator's address (a loud skip
//! outside CI, a failure under CI=true), a bus on it, and the conformance harness.
#![allow(dead_code)]

use std::time::Duration;

use async_trait::async_trait;
use cloudbus_conformance::Harness;
use cloudbus_conformance::emulator::required_env;
use cloudbus_core::Bus;
use cloudbus_gcp::{PubSubBus, PubSubConfig};

pub const PROJECT: &str = "cloudbus-test";

/// The emulator's `host:port`, or `None` (after a loud message) when the tests may skip.
pub fn emulator() -> Option<String> {
    required_env(
        cloudbus_gcp::EMULATOR_HOST_ENV,
        "the Pub/Sub emulator tests",
        "bash scripts/test.sh starts the emulator",
    )
}

pub fn pubsub(host: &str) -> PubSubBus {
    PubSubBus::new(PubSubConfig::new(PROJECT).emulator(host))
}

pub struct PubSubHarness {
    pub host: String,
}

#[async_trait]
impl Harness for PubSubHarness {
    async fn bus(&self) -> cloudbus_core::Result<Bus> {
        Ok(pubsub(&self.host).into_bus())
    }
    /// The emulator can redeliver a released message to a stream that is already
    /// closed; it comes back after that stream's 10 s deadline, so allow for two.
    fn patience(&self) -> Duration {
        Duration::from_secs(30)
    }
    fn short_lease(&self) -> Duration {
        Duration::from_secs(1)
    }
}
