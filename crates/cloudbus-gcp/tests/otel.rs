//! OpenTelemetry on the Pub/Sub emulator (feature `otel` of the facade): a two-hop
//! saga's spans, exported by `opentelemetry_sdk`'s in-memory exporter, form one
//! trace across publish and process (`cloudbus_conformance::otel_cases`). Its own
//! test binary: the case installs the process-wide tracing subscriber.

mod common;

use cloudbus_conformance::{Outcome, otel_cases};
use common::{PubSubHarness, emulator};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saga_is_one_trace_on_pubsub() {
    let Some(host) = emulator() else { return };
    let outcome = otel_cases::saga_is_one_trace(&PubSubHarness { host }).await;
    assert_eq!(outcome.map_err(|e| e.to_string()), Ok(Outcome::Passed));
}
