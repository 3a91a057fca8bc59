//! OpenTelemetry on LocalStack (feature `otel` of the facade): a two-hop saga's
//! spans, exported by `opentelemetry_sdk`'s in-memory exporter, form one trace across
//! publish and process (`cloudbus_conformance::otel_cases`), on SQS alone and on SNS
//! into SQS, with the context carried in the messages' attributes. Its own test
//! binary: the case installs the process-wide tracing subscriber.

mod common;

use cloudbus_conformance::{Outcome, otel_cases};
use common::{SqsHarness, endpoint};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saga_is_one_trace_on_sqs_and_on_sns() {
    let Some(endpoint) = endpoint() else { return };
    for sns in [false, true] {
        let harness = SqsHarness {
            endpoint: endpoint.clone(),
            fifo: false,
            sns,
            eventbridge: false,
            structured: false,
        };
        let outcome = otel_cases::saga_is_one_trace(&harness).await;
        assert_eq!(
            outcome.map_err(|e| e.to_string()),
            Ok(Outcome::Passed),
            "sns: {sns}"
        );
    }
}
