//! OpenTelemetry on the Service Bus emulator (feature `otel` of the facade): a
//! two-hop saga's spans, exported by `opentelemetry_sdk`'s in-memory exporter, form
//! one trace across publish and process (`cloudbus_conformance::otel_cases`), with
//! the context carried in the AMQP message's `cloudEvents_traceparent` application
//! property. Its own test binary: the case installs the process-wide tracing
//! subscriber.

mod common;

use cloudbus_azure::servicebus::EntityKind;
use cloudbus_conformance::{Outcome, otel_cases};
use common::{ServiceBusHarness, servicebus};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saga_is_one_trace_on_service_bus() {
    if servicebus().is_none() {
        return;
    }
    let harness = ServiceBusHarness {
        entities: EntityKind::Queues,
        sessions: false,
    };
    let outcome = otel_cases::saga_is_one_trace(&harness).await;
    assert_eq!(outcome.map_err(|e| e.to_string()), Ok(Outcome::Passed));
}
