//! The CloudEvents Kafka binding against another implementation of it, on tansu
//! (KAFKA_BOOTSTRAP_SERVERS): Confluent's Python client (confluent-kafka) with the
//! official CloudEvents Python SDK's Kafka binding (tests/interop/kafka_interop.py, on
//! the python of CLOUDBUS_KAFKA_PYTHON).
//!
//! - What the Python SDK produces, in binary and in structured mode, cloudbus receives
//!   with every attribute, its JSON data, its `partitionkey` and the record key as the
//!   ordering key.
//! - What cloudbus publishes, in binary and in structured mode, the Python SDK reads in
//!   that mode, with the ordering key as the record key and an extension kept.
//! - A record that is not a CloudEvent (no headers, a text value) never reaches the
//!   caller: it goes to the subscription's dead-letter topic as it was, with the reason.
//!
//! Each test skips loudly without the broker or the python, and fails under CI=true.

mod common;

use std::process::ExitStatus;
use std::time::{Duration, Instant};

use cloudbus_core::{
    AttributesReader, Consumer, Data, Delivery, EventBuilder, EventExt, Payload, SubscriptionSpec,
    describe_payload,
};
use serde_json::json;

/// How many events each direction sends.
const COUNT: usize = 5;
/// How long the tests wait for deliveries and dead letters.
const PATIENCE: Duration = Duration::from_secs(30);

/// The python of Confluent's Kafka client and the CloudEvents SDK
/// (`scripts/kafka-venv.sh`, which scripts/test.sh runs), or `None` after a loud message.
fn python() -> Option<String> {
    cloudbus_conformance::emulator::required_env(
        "CLOUDBUS_KAFKA_PYTHON",
        "the Kafka interoperability tests",
        "CLOUDBUS_KAFKA_PYTHON=$(bash scripts/kafka-venv.sh); scripts/test.sh sets it",
    )
}

/// Runs tests/interop/kafka_interop.py with `args` on `python`: its exit status and
/// its stdout. Its stderr goes to the test's output.
async fn run_script(python: &str, args: &[&str]) -> (ExitStatus, String) {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/interop/kafka_interop.py"
    );
    let mut command = std::process::Command::new(python);
    command.arg(script).args(args);
    let output = tokio::task::spawn_blocking(move || command.output())
        .await
        .expect("the task running the Python script")
        .unwrap_or_else(|e| panic!("could not run {python} {script}: {e}"));
    let stderr = String::from_utf8_lossy(&output.stderr);
    if !stderr.trim().is_empty() {
        eprintln!("kafka_interop.py {args:?} said:\n{stderr}");
    }
    (
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

/// Up to `count` deliveries of `consumer`, received within [`PATIENCE`].
async fn receive(consumer: &Consumer, count: usize) -> Vec<Delivery> {
    let until = Instant::now() + PATIENCE;
    let mut got = Vec::new();
    while got.len() < count && Instant::now() < until {
        got.extend(
            consumer
                .receive_batch(count - got.len(), Duration::from_secs(1))
                .await
                .expect("receive"),
        );
    }
    got
}

/// The Python SDK produces 5 events in each content mode (id `py-<i>`, partitionkey
/// `key-<i % 3>`, which its binding also makes the record key, data `{"n": i}`);
/// cloudbus receives each once with its attributes, data and extension, the record
/// key as the ordering key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_events_reach_cloudbus_in_both_modes() {
    let Some(bootstrap) = common::bootstrap() else {
        return;
    };
    let Some(python) = python() else {
        return;
    };
    let bus = common::bus(&bootstrap, "partitions=3")
        .await
        .expect("a bus");
    for mode in ["binary", "structured"] {
        let topic = common::unique(&format!("from-python-{mode}"));
        // The subscription's name is its consumer group: one of its own, so that the
        // tests running at the same time do not rebalance each other.
        let subscription = common::unique("rust");
        bus.ensure_topic(&topic).await.expect("the topic");
        bus.ensure_subscription(&SubscriptionSpec::new(&topic, &subscription))
            .await
            .expect("the subscription");
        let count = COUNT.to_string();
        let (status, _) = run_script(&python, &["produce", &bootstrap, &topic, mode, &count]).await;
        assert!(
            status.success(),
            "{mode}: the Python producer failed ({status}; its stderr is above)"
        );

        let consumer = bus
            .consumer(&topic, &subscription)
            .await
            .expect("a consumer");
        let deliveries = receive(&consumer, COUNT).await;
        assert_eq!(
            deliveries.len(),
            COUNT,
            "{mode}: cloudbus received {} of {COUNT}: {deliveries:?}",
            deliveries.len()
        );
        for i in 0..COUNT {
            let id = format!("py-{i}");
            let key = format!("key-{}", i % 3);
            let delivery = deliveries
                .iter()
                .find(|d| d.event().id() == id)
                .unwrap_or_else(|| panic!("{mode}: {id} not received; got {deliveries:?}"));
            let event = delivery.event();
            assert_eq!(event.ty(), "com.example.interop", "{mode} {id}");
            assert_eq!(event.source(), "/python", "{mode} {id}");
            assert_eq!(
                event.datacontenttype(),
                Some("application/json"),
                "{mode} {id}"
            );
            assert_eq!(
                event.data(),
                Some(&Data::Json(json!({ "n": i }))),
                "{mode} {id}: not the JSON data the SDK sent"
            );
            // The SDK keeps partitionkey in the event (the ce_partitionkey header, the
            // JSON) and makes it the record key too.
            assert_eq!(event.partition_key(), Some(key.as_str()), "{mode} {id}");
            assert_eq!(
                delivery.ordering_key(),
                Some(key.as_str()),
                "{mode} {id}: the record key is not the ordering key"
            );
            assert_eq!(delivery.attempt(), 1, "{mode} {id}");
        }
        for result in consumer.ack_all(&deliveries).await {
            result.expect("acked");
        }
    }
}

/// cloudbus publishes 5 events in each content mode (ordering key `key-<i>`, an
/// extension `tenant`, data `{"n": i}`); the Python SDK reads each in that mode with
/// its attributes, data and extensions, the ordering key as the record key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cloudbus_events_reach_python_in_both_modes() {
    let Some(bootstrap) = common::bootstrap() else {
        return;
    };
    let Some(python) = python() else {
        return;
    };
    for (mode, params, content_type) in [
        ("binary", "partitions=3", "application/json"),
        (
            "structured",
            "partitions=3&mode=structured",
            "application/cloudevents+json; charset=UTF-8",
        ),
    ] {
        let bus = common::bus(&bootstrap, params).await.expect("a bus");
        let topic = common::unique(&format!("to-python-{mode}"));
        bus.ensure_topic(&topic).await.expect("the topic");
        let events: Vec<_> = (0..COUNT)
            .map(|i| {
                EventBuilder::new("com.example.interop", "/rust")
                    .partition_key(format!("key-{i}"))
                    .extension("tenant", "acme")
                    .json(&json!({ "n": i }))
                    .expect("JSON data")
                    .build()
                    .expect("an event")
            })
            .collect();
        let publisher = bus.publisher(&topic).await.expect("a publisher");
        for result in publisher.publish_batch(events.clone()).await {
            result.expect("published");
        }

        let group = common::unique("python");
        let count = COUNT.to_string();
        let timeout = PATIENCE.as_secs().to_string();
        let (status, stdout) = run_script(
            &python,
            &["consume", &bootstrap, &topic, &group, &count, &timeout],
        )
        .await;
        assert!(
            status.success(),
            "{mode}: the Python consumer failed ({status}; its stderr is above); it printed:\n{stdout}"
        );
        let read: Vec<serde_json::Value> = stdout
            .lines()
            .map(|line| {
                serde_json::from_str(line).unwrap_or_else(|e| {
                    panic!(
                        "{mode}: the Python consumer printed a line that is not JSON ({e}): {line}"
                    )
                })
            })
            .collect();
        assert_eq!(
            read.len(),
            COUNT,
            "{mode}: Python read {} of {COUNT}:\n{stdout}",
            read.len()
        );
        for (i, event) in events.iter().enumerate() {
            let id = event.id();
            let r = read
                .iter()
                .find(|r| r["id"] == id)
                .unwrap_or_else(|| panic!("{mode}: Python did not read {id}:\n{stdout}"));
            assert_eq!(r["mode"], mode, "{r}");
            assert_eq!(r["type"], "com.example.interop", "{r}");
            assert_eq!(r["source"], "/rust", "{r}");
            assert_eq!(r["specversion"], "1.0", "{r}");
            assert_eq!(r["datacontenttype"], "application/json", "{r}");
            assert_eq!(
                r["data"],
                json!({ "n": i }),
                "{mode}: the SDK did not read the data as the JSON sent: {r}"
            );
            assert_eq!(
                r["key"],
                format!("key-{i}"),
                "{mode}: the ordering key is not the record key: {r}"
            );
            assert_eq!(r["headers"]["content-type"], content_type, "{r}");
            assert_eq!(
                r["extensions"]["tenant"], "acme",
                "{mode}: the extension was lost: {r}"
            );
            assert_eq!(r["extensions"]["partitionkey"], format!("key-{i}"), "{r}");
            if mode == "binary" {
                // Section 3.2.3: extensions as ce_ headers.
                assert_eq!(r["headers"]["ce_tenant"], "acme", "{r}");
                assert_eq!(r["headers"]["ce_partitionkey"], format!("key-{i}"), "{r}");
            }
        }
    }
}

/// A record with no headers and the value `not a cloudevent` (confluent-kafka): the
/// cloudbus consumer hands out nothing for it and dead-letters it as it was, with a
/// reason that says it is not a CloudEvent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_record_is_dead_lettered_with_its_reason() {
    let Some(bootstrap) = common::bootstrap() else {
        return;
    };
    let Some(python) = python() else {
        return;
    };
    let bus = common::bus(&bootstrap, "").await.expect("a bus");
    let topic = common::unique("foreign");
    let subscription = common::unique("rust");
    bus.ensure_topic(&topic).await.expect("the topic");
    bus.ensure_subscription(&SubscriptionSpec::new(&topic, &subscription))
        .await
        .expect("the subscription");
    let (status, _) = run_script(&python, &["produce-foreign", &bootstrap, &topic]).await;
    assert!(
        status.success(),
        "the Python producer failed ({status}; its stderr is above)"
    );

    let consumer = bus
        .consumer(&topic, &subscription)
        .await
        .expect("a consumer");
    let dead_letters = bus
        .dead_letters(&topic, &subscription)
        .await
        .expect("the dead letters");
    // Receiving is what dead-letters it; the letter shows once it is written.
    let until = Instant::now() + PATIENCE;
    let mut letters = Vec::new();
    while letters.is_empty() && Instant::now() < until {
        let got = consumer
            .receive_batch(10, Duration::from_secs(1))
            .await
            .expect("receive");
        assert!(got.is_empty(), "a foreign record was delivered: {got:?}");
        letters = dead_letters.peek(10).await.expect("peek");
    }
    assert_eq!(letters.len(), 1, "dead letters after {PATIENCE:?}");
    let letter = &letters[0];
    match &letter.payload {
        Payload::Raw(raw) => assert_eq!(
            String::from_utf8_lossy(&raw.body),
            "not a cloudevent",
            "the dead letter is not the record as it was"
        ),
        other => panic!(
            "the foreign record was dead-lettered as {}",
            describe_payload(other)
        ),
    }
    let reason = letter.reason.as_deref().unwrap_or_default();
    assert!(
        reason.contains("not a CloudEvent"),
        "the reason does not say it is not a CloudEvent: {reason:?}"
    );
    assert_eq!(letter.attempts, 1);
    assert_eq!(
        letter.source_entity.as_deref(),
        Some(format!("{topic}/{subscription}").as_str())
    );
}
