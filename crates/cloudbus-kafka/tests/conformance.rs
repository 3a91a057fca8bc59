//! Kafka against a real Kafka-protocol broker (tansu, started by scripts/test.sh, or
//! any broker in KAFKA_BOOTSTRAP_SERVERS): the subscription suite in binary and
//! structured content mode, the "nothing lost" promise under injected faults, and the
//! stream suite. A test target with `harness = false`: the cases come from the
//! suite's registries (`cloudbus_conformance::Suite`). Without a broker the tests say
//! so loudly and pass, except under CI=true.

mod common;

use common::{KafkaHarness, KafkaStreamHarness, bootstrap};

fn binary() -> std::future::Ready<Option<KafkaHarness>> {
    std::future::ready(bootstrap().map(|bootstrap| KafkaHarness {
        bootstrap,
        params: "",
    }))
}

fn structured() -> std::future::Ready<Option<KafkaHarness>> {
    std::future::ready(bootstrap().map(|bootstrap| KafkaHarness {
        bootstrap,
        params: "mode=structured",
    }))
}

fn stream() -> std::future::Ready<Option<KafkaStreamHarness>> {
    std::future::ready(bootstrap().map(|bootstrap| KafkaStreamHarness {
        bootstrap,
        mock: false,
    }))
}

/// librdkafka's in-process mock cluster (one broker), for what tansu gets wrong.
fn mock_stream() -> std::future::Ready<Option<KafkaStreamHarness>> {
    std::future::ready(Some(KafkaStreamHarness {
        bootstrap: common::mock_bootstrap(),
        mock: true,
    }))
}

/// tansu's high watermark counts record batches, not records (5 records produced in
/// one batch: watermarks (0, 1)), so a start at `Latest` lands inside what was
/// written before.
const TANSU_WATERMARKS: &str = "tansu's high watermark counts record batches, not records: runs on the mock cluster (kafka_mock_streams)";

/// The mock cluster answers `ListOffsets` by time with -1 ("FIXME: by timestamp" in
/// librdkafka's rdkafka_mock_handlers.c).
const MOCK_TIMES: &str =
    "librdkafka's mock cluster cannot list offsets by time: runs on tansu (kafka_streams)";

fn main() -> std::process::ExitCode {
    cloudbus_conformance::Suite::new()
        .bus("kafka_binary", binary)
        .bus("kafka_structured", structured)
        .chaos("kafka_chaos", binary, 300)
        .stream("kafka_streams", stream)
        .stream_chaos("kafka_stream_chaos", stream, 300)
        .stream("kafka_mock_streams", mock_stream)
        .elsewhere(
            "kafka_streams::stream_latest_skips_earlier_records",
            TANSU_WATERMARKS,
        )
        .elsewhere("kafka_mock_streams::stream_replay_from_time", MOCK_TIMES)
        .run()
}
