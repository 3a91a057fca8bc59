//! OpenTelemetry on the memory broker (feature `otel`): a two-hop saga's spans,
//! exported by `opentelemetry_sdk`'s in-memory exporter, form one trace (the case is
//! `cloudbus_conformance::otel_cases::saga_is_one_trace`; the Pub/Sub emulator runs
//! it too, in cloudbus-gcp's tests/otel.rs). Its own test binary: the case installs
//! the process-wide tracing subscriber.

mod common;

use cloudbus_conformance::{Outcome, otel_cases};
use cloudbus_core::{EventBuilder, EventExt};
use common::MemoryHarness;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saga_is_one_trace_on_the_memory_broker() {
    let harness = MemoryHarness::new();
    let outcome = otel_cases::saga_is_one_trace(&harness).await;
    assert_eq!(outcome.map_err(|e| e.to_string()), Ok(Outcome::Passed));
}

/// The propagator writes the event's `traceparent` from the OpenTelemetry span it is
/// built in, and `tracestate` with it, which the hand-written context could not.
#[tokio::test]
async fn an_event_carries_the_context_and_state_of_its_create_span() {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    otel_cases::span_recorder().expect("the recorder installs");
    let span = tracing::info_span!("request");
    let parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let remote = cloudbus_core::otel::extract(Some(parent), Some("vendor=abc"))
        .expect("a valid traceparent");
    let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
    let event = {
        let _entered = span.enter();
        EventBuilder::new("com.example.ping", "/tests")
            .build()
            .expect("valid")
    };
    let traceparent = event.traceparent().expect("a traceparent");
    assert!(
        traceparent.starts_with("00-0af7651916cd43dd8448eb211c80319c-"),
        "{traceparent}"
    );
    assert_ne!(traceparent, parent, "the event names its own create span");
    assert_eq!(event.tracestate(), Some("vendor=abc"));
    let own = span.context().span().span_context().span_id().to_string();
    assert!(
        !traceparent.contains(&own),
        "the create span is a child of the request span, not it"
    );
}
