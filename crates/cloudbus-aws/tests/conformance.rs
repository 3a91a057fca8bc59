//! AWS against LocalStack (or any endpoint in AWS_ENDPOINT_URL): the conformance
//! suite on SQS standard and FIFO queues, SNS (binary, structured, FIFO) and
//! EventBridge with SQS subscriptions, the "nothing lost" promise under injected
//! faults on each (issue 12), and the stream suite on Kinesis. A test target with
//! `harness = false`: the cases come from the suite's registries
//! (`cloudbus_conformance::Suite`). Without an endpoint the tests say so loudly and
//! pass, except under CI=true.

mod common;

use common::{KinesisHarness, SqsHarness, endpoint};

fn main() -> std::process::ExitCode {
    cloudbus_conformance::Suite::new()
        .bus("sqs_standard", || async {
            endpoint().map(|endpoint| SqsHarness {
                endpoint,
                fifo: false,
                sns: false,
                eventbridge: false,
                structured: false,
            })
        })
        .chaos(
            "sqs_chaos",
            || async {
                endpoint().map(|endpoint| SqsHarness {
                    endpoint,
                    fifo: false,
                    sns: false,
                    eventbridge: false,
                    structured: false,
                })
            },
            200,
        )
        .chaos(
            "sqs_fifo_chaos",
            || async {
                endpoint().map(|endpoint| SqsHarness {
                    endpoint,
                    fifo: true,
                    sns: false,
                    eventbridge: false,
                    structured: false,
                })
            },
            200,
        )
        .chaos(
            "sns_chaos",
            || async {
                endpoint().map(|endpoint| SqsHarness {
                    endpoint,
                    fifo: false,
                    sns: true,
                    eventbridge: false,
                    structured: false,
                })
            },
            200,
        )
        .chaos(
            "eventbridge_chaos",
            || async {
                endpoint().map(|endpoint| SqsHarness {
                    endpoint,
                    fifo: false,
                    sns: false,
                    eventbridge: true,
                    structured: false,
                })
            },
            200,
        )
        .bus("sqs_fifo", || async {
            endpoint().map(|endpoint| SqsHarness {
                endpoint,
                fifo: true,
                sns: false,
                eventbridge: false,
                structured: false,
            })
        })
        .bus("sns_with_sqs", || async {
            endpoint().map(|endpoint| SqsHarness {
                endpoint,
                fifo: false,
                sns: true,
                eventbridge: false,
                structured: false,
            })
        })
        .bus("sns_fifo_with_sqs_fifo", || async {
            endpoint().map(|endpoint| SqsHarness {
                endpoint,
                fifo: true,
                sns: true,
                eventbridge: false,
                structured: false,
            })
        })
        .bus("sns_structured_with_sqs", || async {
            endpoint().map(|endpoint| SqsHarness {
                endpoint,
                fifo: false,
                sns: true,
                eventbridge: false,
                structured: true,
            })
        })
        .bus("eventbridge_with_sqs", || async {
            endpoint().map(|endpoint| SqsHarness {
                endpoint,
                fifo: false,
                sns: false,
                eventbridge: true,
                structured: false,
            })
        })
        .stream("kinesis_streams", || async {
            endpoint().map(|endpoint| KinesisHarness { endpoint })
        })
        .stream_chaos(
            "kinesis_chaos",
            || async { endpoint().map(|endpoint| KinesisHarness { endpoint }) },
            300,
        )
        .run()
}
