//! What the Service Bus emulator tests share: the connection string (a loud skip
//! outside CI, a failure under CI=true) and the conformance harness, one per way of
//! mapping cloudbus onto Service Bus.

use std::time::Duration;

use async_trait::async_trait;
use cloudbus_azure::servicebus::{EntityKind, ServiceBusBus, ServiceBusConfig};
use cloudbus_conformance::Harness;
use cloudbus_conformance::emulator::required_env;
use cloudbus_core::Bus;

/// The Service Bus connection string, or `None` after a loud message.
pub fn servicebus() -> Option<String> {
    required_env(
        "SERVICEBUS_CONNECTION_STRING",
        "the Service Bus tests",
        "bash scripts/test.sh starts the emulator",
    )
}

/// One way of mapping cloudbus onto Service Bus.
#[derive(Clone, Copy)]
pub struct ServiceBusHarness {
    pub entities: EntityKind,
    pub sessions: bool,
}

impl ServiceBusHarness {
    pub fn config(&self) -> ServiceBusConfig {
        let text = std::env::var("SERVICEBUS_CONNECTION_STRING").unwrap_or_default();
        ServiceBusConfig::from_connection_string(&text)
            .expect("connection string")
            .entities(self.entities)
            .sessions(self.sessions)
    }
    /// A bus of this mapping (the otel test binary opens its own through `bus`).
    #[allow(dead_code)]
    pub async fn connect(&self) -> Bus {
        ServiceBusBus::connect(self.config())
            .await
            .expect("connect to Service Bus")
            .into_bus()
    }
}

#[async_trait]
impl Harness for ServiceBusHarness {
    async fn bus(&self) -> cloudbus_core::Result<Bus> {
        Ok(ServiceBusBus::connect(self.config()).await?.into_bus())
    }
    fn patience(&self) -> Duration {
        Duration::from_secs(20)
    }
    /// Service Bus locks last at least 5 s.
    fn short_lease(&self) -> Duration {
        Duration::from_secs(5)
    }
}
