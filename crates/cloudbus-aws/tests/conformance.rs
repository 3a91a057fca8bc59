//! AWS against LocalStack (or any endpoint in AWS_ENDPOINT_URL): the conformance
//! suite on SQS standard and FIFO queues, SNS (binary, structured, FIFO) and
//! EventBridge with SQS subscriptions, the "nothing lost" promise under injected
//! faults on each (issue 12), and the stream suite on Kinesis. A test target with
//! `harness = false`: the cases come from the suite's registries
//! (`cloudbus_conformance::Suite`). Without an endpoint the tests say so loudly and
//! pass, except under CI=true.

mod common;

use common::{KinesisHarness, SqsHarness, endpoint};

/// One way of mapping cloudbus onto AWS (see [`SqsHarness`]).
#[derive(Clone, Copy)]
struct Mapping {
    fifo: bool,
    sns: bool,
    eventbridge: bool,
    structured: bool,
}

const SQS: Mapping = Mapping {
    fifo: false,
    sns: false,
    eventbridge: false,
    structured: false,
};
const SQS_FIFO: Mapping = Mapping { fifo: true, ..SQS };
const SNS: Mapping = Mapping { sns: true, ..SQS };
const SNS_FIFO: Mapping = Mapping {
    fifo: true,
    sns: true,
    ..SQS
};
const SNS_STRUCTURED: Mapping = Mapping {
    sns: true,
    structured: true,
    ..SQS
};
const EVENTBRIDGE: Mapping = Mapping {
    eventbridge: true,
    ..SQS
};

/// The harness maker of `mapping` on the emulator's endpoint.
fn on(mapping: Mapping) -> impl Fn() -> std::future::Ready<Option<SqsHarness>> + Send + Sync {
    move || {
        std::future::ready(endpoint().map(|endpoint| SqsHarness {
            endpoint,
            fifo: mapping.fifo,
            sns: mapping.sns,
            eventbridge: mapping.eventbridge,
            structured: mapping.structured,
        }))
    }
}

fn kinesis() -> std::future::Ready<Option<KinesisHarness>> {
    std::future::ready(endpoint().map(|endpoint| KinesisHarness { endpoint }))
}

fn main() -> std::process::ExitCode {
    cloudbus_conformance::Suite::new()
        .bus("sqs_standard", on(SQS))
        .chaos("sqs_chaos", on(SQS), 200)
        .chaos("sqs_fifo_chaos", on(SQS_FIFO), 200)
        .chaos("sns_chaos", on(SNS), 200)
        .chaos("eventbridge_chaos", on(EVENTBRIDGE), 200)
        .bus("sqs_fifo", on(SQS_FIFO))
        .bus("sns_with_sqs", on(SNS))
        .bus("sns_fifo_with_sqs_fifo", on(SNS_FIFO))
        .bus("sns_structured_with_sqs", on(SNS_STRUCTURED))
        .bus("eventbridge_with_sqs", on(EVENTBRIDGE))
        .stream("kinesis_streams", kinesis)
        .stream_chaos("kinesis_chaos", kinesis, 300)
        .run()
}
