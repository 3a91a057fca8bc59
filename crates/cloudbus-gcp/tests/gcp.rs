//! Google Cloud Pub/Sub against the official emulator: the conformance suite and
//! the Pub/Sub cases (ordering under concurrency, the dead-letter policy, exactly-once,
//! seek replay, a foreign message dead-lettered with its reason, flow control,
//! resuming an ordering key), and interoperability with Google's Python client and
//! the CloudEvents Python SDK (`tests/interop/pubsub_clients.py`, run with the python
//! of CLOUDBUS_GCP_PYTHON).
//!
//! The emulator is found through PUBSUB_EMULATOR_HOST (scripts/test.sh starts one).
//! Without it the tests say so loudly and pass, except under CI=true, where a missing
//! emulator fails them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cloudbus_conformance::emulator::required_env;
use cloudbus_core::{
    AttributesReader, Bus, ErrorKind, Event, EventBuilder, EventExt, HandlerContext, HandlerError,
    PublishOptions, SubscriptionSpec, WorkerOptions,
};
use cloudbus_gcp::{PubSubBus, PubSubConfig, SubscriptionOptions};

mod common;
use common::{PROJECT, emulator, pubsub};

fn unique(prefix: &str) -> String {
    format!("{prefix}-{:08x}", fastrand::u32(..))
}

fn ev(ty: &str, n: usize) -> Event {
    EventBuilder::new(ty, "/tests/gcp")
        .subject(n.to_string())
        .json(&serde_json::json!({ "n": n }))
        .and_then(|b| b.build())
        .expect("valid event")
}

/// A bus with a topic and a subscription made by `ensure` (with `tune` applied).
async fn fixture(
    host: &str,
    tune: impl FnOnce(SubscriptionSpec) -> SubscriptionSpec,
    options: SubscriptionOptions,
) -> (PubSubBus, Bus, String, String) {
    let driver = pubsub(host);
    let bus = driver.clone().into_bus();
    let topic = unique("topic");
    let sub = unique("sub");
    bus.ensure_topic(&topic).await.unwrap();
    driver
        .ensure_subscription_with(&tune(SubscriptionSpec::new(&topic, &sub)), &options)
        .await
        .unwrap();
    (driver, bus, topic, sub)
}

/// Receives until `count` deliveries arrived or `patience` ran out.
async fn drain(
    consumer: &cloudbus_core::Consumer,
    count: usize,
    patience: Duration,
) -> Vec<cloudbus_core::Delivery> {
    let until = Instant::now() + patience;
    let mut out = Vec::new();
    while out.len() < count && Instant::now() < until {
        out.extend(
            consumer
                .receive_batch(count - out.len(), Duration::from_millis(500))
                .await
                .unwrap(),
        );
    }
    out
}

async fn publish_one(bus: &Bus, topic: &str, event: Event) {
    let publisher = bus.publisher(topic).await.unwrap();
    publisher.publish(event).await.unwrap();
}

fn subject(d: &cloudbus_core::Delivery) -> String {
    d.event().subject().unwrap_or_default().to_owned()
}

/// Four ordering keys published concurrently, consumed by a worker with 16 slots:
/// each key arrives complete and in publish order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_ordering_per_key_under_concurrency() {
    let Some(host) = emulator() else { return };
    let (_, bus, topic, sub) = fixture(&host, |s| s.ordered(true), Default::default()).await;
    let publisher = bus.publisher(&topic).await.unwrap();
    const KEYS: usize = 4;
    const PER_KEY: usize = 50;
    let mut sends = Vec::new();
    for k in 0..KEYS {
        let p = publisher.clone();
        sends.push(tokio::spawn(async move {
            let handles: Vec<_> = (0..PER_KEY)
                .map(|n| {
                    let e = EventBuilder::new("gcp.ordered", "/tests/gcp")
                        .subject(format!("key-{k}:{n}"))
                        .build()
                        .expect("valid event");
                    p.publish_with(e, PublishOptions::ordered(format!("key-{k}")))
                })
                .collect();
            for h in handles {
                h.await.unwrap();
            }
        }));
    }
    for s in sends {
        s.await.unwrap();
    }
    let seen: Arc<Mutex<HashMap<String, Vec<usize>>>> = Arc::default();
    let record = seen.clone();
    let consumer = bus.consumer(&topic, &sub).await.unwrap();
    let worker = consumer
        .start_worker(
            move |e: Arc<Event>, _ctx: HandlerContext| {
                let record = record.clone();
                async move {
                    let (key, n) = e
                        .subject()
                        .unwrap_or_default()
                        .split_once(':')
                        .unwrap_or_default();
                    let (key, n) = (key.to_owned(), n.parse().unwrap_or(usize::MAX));
                    tokio::time::sleep(Duration::from_millis(fastrand::u64(0..3))).await;
                    record.lock().unwrap().entry(key).or_default().push(n);
                    Ok::<(), HandlerError>(())
                }
            },
            WorkerOptions::default().concurrency(16),
        )
        .expect("the router's wiring");
    let until = Instant::now() + Duration::from_secs(60);
    while Instant::now() < until {
        let total: usize = seen.lock().unwrap().values().map(Vec::len).sum();
        if total >= KEYS * PER_KEY {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    worker.shutdown(Duration::from_secs(5)).await;
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), KEYS, "keys seen: {:?}", seen.keys());
    for (key, order) in seen.iter() {
        let want: Vec<usize> = (0..PER_KEY).collect();
        assert_eq!(order, &want, "order of {key}");
    }
}

/// The subscription's own dead-letter policy (5 attempts, Pub/Sub's floor): the
/// service moves the event after the fifth nack, and DeadLetters shows where from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_dead_letter_policy_after_five_attempts() {
    let Some(host) = emulator() else { return };
    // Unordered: the emulator fails every pull of an ordered subscription once its
    // dead-letter policy fires (500 "Application error processing RPC"); the service
    // does not.
    let (_, bus, topic, sub) = fixture(
        &host,
        |s| s.max_delivery_attempts(5).ordered(false),
        Default::default(),
    )
    .await;
    let e = ev("gcp.poison", 0);
    publish_one(&bus, &topic, e.clone()).await;
    let consumer = bus.consumer(&topic, &sub).await.unwrap();
    for attempt in 1..=5 {
        let got = drain(&consumer, 1, Duration::from_secs(30)).await;
        assert_eq!(got.len(), 1, "attempt {attempt} not delivered");
        assert_eq!(got[0].attempt(), attempt);
        got[0].nack(Duration::ZERO).await.unwrap();
    }
    let sixth = consumer
        .receive_batch(1, Duration::from_secs(2))
        .await
        .unwrap();
    assert!(sixth.is_empty(), "delivered a sixth time");
    let dlq = bus.dead_letters(&topic, &sub).await.unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    let letters = loop {
        let l = dlq.peek(10).await.unwrap();
        if !l.is_empty() || Instant::now() > until {
            break l;
        }
    };
    assert_eq!(letters.len(), 1, "dead letters of {sub}");
    let letter = &letters[0];
    match &letter.payload {
        cloudbus_core::Payload::Event(x) => assert_eq!(x.id(), e.id()),
        other => panic!("dead letter is not the event: {other:?}"),
    }
    assert_eq!(letter.attempts, 5);
    assert_eq!(
        letter.reason.as_deref(),
        Some("max delivery attempts (5) exceeded")
    );
    assert!(
        letter
            .source_entity
            .as_deref()
            .is_some_and(|s| s.ends_with(&sub)),
        "source {:?}",
        letter.source_entity
    );
}

/// Exactly-once: an ack is confirmed by the service; the event does not come back;
/// an ack after the lease ran out is a typed LeaseExpired, and that event does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_exactly_once_acks_are_confirmed() {
    let Some(host) = emulator() else { return };
    let (_, bus, topic, sub) = fixture(
        &host,
        |s| s.lease(Duration::from_secs(1)),
        SubscriptionOptions::default().exactly_once(),
    )
    .await;
    let publisher = bus.publisher(&topic).await.unwrap();
    for r in publisher
        .publish_batch(vec![ev("gcp.eo", 0), ev("gcp.eo", 1)])
        .await
    {
        r.unwrap();
    }
    let consumer = bus.consumer(&topic, &sub).await.unwrap();
    let got = drain(&consumer, 2, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 2);
    let (acked, late) = if subject(&got[0]) == "0" {
        (&got[0], &got[1])
    } else {
        (&got[1], &got[0])
    };
    acked.ack().await.expect("confirmed ack");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = late.ack().await;
    assert!(
        matches!(&r, Err(e) if e.kind() == ErrorKind::LeaseExpired),
        "ack after the lease: {r:?}"
    );
    let again = drain(&consumer, 1, Duration::from_secs(30)).await;
    assert_eq!(again.len(), 1, "the unacked event did not come back");
    assert_eq!(subject(&again[0]), "1", "an acked event came back");
    assert_eq!(again[0].attempt(), 2);
    again[0].ack().await.unwrap();
    let quiet = consumer
        .receive_batch(10, Duration::from_secs(2))
        .await
        .unwrap();
    assert!(
        quiet.is_empty(),
        "redelivered after confirmed acks: {}",
        quiet.len()
    );
}

/// Replay: the portable `Bus::replay` (a seek to a time) brings acked events back; a
/// snapshot restores what was unacked when it was taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_seek_to_time_and_snapshot_replay() {
    let Some(host) = emulator() else { return };
    // The emulator does not implement seek on ordered subscriptions (Unimplemented).
    let (driver, bus, topic, sub) = fixture(
        &host,
        |s| s.ordered(false),
        SubscriptionOptions::default().exactly_once().retain_acked(),
    )
    .await;
    let publisher = bus.publisher(&topic).await.unwrap();
    let consumer = bus.consumer(&topic, &sub).await.unwrap();
    let before = chrono::Utc::now() - chrono::Duration::seconds(1);
    for r in publisher
        .publish_batch((0..3).map(|n| ev("gcp.seek", n)).collect())
        .await
    {
        r.unwrap();
    }
    let first = drain(&consumer, 3, Duration::from_secs(30)).await;
    assert_eq!(first.len(), 3);
    for d in &first {
        d.ack().await.unwrap(); // confirmed: settled at the service before the seek
    }
    bus.replay(&topic, &sub, before).await.unwrap();
    let replayed = drain(&consumer, 3, Duration::from_secs(30)).await;
    let mut subjects: Vec<String> = replayed.iter().map(subject).collect();
    subjects.sort();
    assert_eq!(subjects, ["0", "1", "2"], "seek to time");
    for d in &replayed {
        d.ack().await.unwrap();
    }

    for r in publisher
        .publish_batch((3..5).map(|n| ev("gcp.seek", n)).collect())
        .await
    {
        r.unwrap();
    }
    let snapshot = unique("snap");
    driver.create_snapshot(&sub, &snapshot).await.unwrap();
    let later = drain(&consumer, 2, Duration::from_secs(30)).await;
    assert_eq!(later.len(), 2);
    for d in &later {
        d.ack().await.unwrap();
    }
    driver.seek_to_snapshot(&sub, &snapshot).await.unwrap();
    let restored = drain(&consumer, 5, Duration::from_secs(5)).await;
    let mut subjects: Vec<String> = restored.iter().map(subject).collect();
    subjects.sort();
    assert_eq!(subjects, ["3", "4"], "seek to snapshot");
    for d in &restored {
        d.ack().await.unwrap();
    }
    driver.delete_snapshot(&snapshot).await.unwrap();
}

/// A message from a producer that does not speak CloudEvents (the raw Google
/// client) never reaches the caller: it is dead-lettered with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_foreign_message_dead_lettered_with_reason() {
    let Some(host) = emulator() else { return };
    let (_, bus, topic, sub) = fixture(&host, |s| s, Default::default()).await;
    let raw = google_cloud_pubsub::client::Publisher::builder(format!(
        "projects/{PROJECT}/topics/{topic}"
    ))
    .with_endpoint(format!("http://{host}"))
    .with_credentials(google_cloud_auth::credentials::anonymous::Builder::new().build())
    .build()
    .await
    .unwrap();
    raw.publish(
        google_cloud_pubsub::model::Message::new()
            .set_data("hello from elsewhere")
            .set_attributes([("origin", "legacy")]),
    )
    .await
    .unwrap();
    let consumer = bus.consumer(&topic, &sub).await.unwrap();
    let got = consumer
        .receive_batch(10, Duration::from_secs(3))
        .await
        .unwrap();
    assert!(got.is_empty(), "a foreign message reached the caller");
    let dlq = bus.dead_letters(&topic, &sub).await.unwrap();
    let letters = dlq.peek(10).await.unwrap();
    assert_eq!(letters.len(), 1);
    let reason = letters[0].reason.clone().unwrap_or_default();
    assert!(
        reason.contains("malformed") && reason.contains("CloudEvent"),
        "reason {reason:?}"
    );
    match &letters[0].payload {
        cloudbus_core::Payload::Raw(m) => {
            assert_eq!(m.body, b"hello from elsewhere");
            assert_eq!(
                m.attributes.get("origin").map(String::as_str),
                Some("legacy")
            );
        }
        other => panic!("expected the raw message, got {other:?}"),
    }
}

/// Flow control: a consumer never holds more unsettled messages than allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_flow_control_bounds_outstanding_messages() {
    let Some(host) = emulator() else { return };
    let driver = PubSubBus::new(
        PubSubConfig::new(PROJECT)
            .emulator(&host)
            .flow_control(5, 1 << 20),
    );
    let bus = driver.clone().into_bus();
    let topic = unique("topic");
    let sub = unique("sub");
    bus.ensure_topic(&topic).await.unwrap();
    bus.ensure_subscription(&SubscriptionSpec::new(&topic, &sub))
        .await
        .unwrap();
    let publisher = bus.publisher(&topic).await.unwrap();
    for r in publisher
        .publish_batch((0..20).map(|n| ev("gcp.flow", n)).collect())
        .await
    {
        r.unwrap();
    }
    let consumer = bus.consumer(&topic, &sub).await.unwrap();
    let mut held = drain(&consumer, 20, Duration::from_secs(4)).await;
    assert_eq!(
        held.len(),
        5,
        "held unsettled beyond the flow-control limit"
    );
    let mut total = held.len();
    while total < 20 {
        for d in held.drain(..) {
            d.ack().await.unwrap();
        }
        held = drain(&consumer, 20, Duration::from_secs(10)).await;
        assert!(!held.is_empty() && held.len() <= 5, "held {}", held.len());
        total += held.len();
    }
    assert_eq!(total, 20);
    for d in &held {
        d.ack().await.unwrap();
    }
}

/// A key whose publish failed stays paused until it is resumed, then publishes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_ordering_key_resumes_after_failed_publish() {
    let Some(host) = emulator() else { return };
    let bus = pubsub(&host).into_bus();
    let topic = unique("late-topic");
    let publisher = bus
        .publisher_with(
            &topic,
            cloudbus_core::PublisherOptions {
                retry: cloudbus_core::RetryPolicy::none(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let key = PublishOptions::ordered("account-7");
    let r = publisher.publish_with(ev("gcp.key", 0), key.clone()).await;
    assert!(
        matches!(&r, Err(e) if e.kind() == ErrorKind::NotFound),
        "{r:?}"
    );
    let r = publisher.publish_with(ev("gcp.key", 1), key.clone()).await;
    assert!(
        matches!(&r, Err(e) if e.kind() == ErrorKind::OrderingKeyPaused),
        "{r:?}"
    );
    bus.ensure_topic(&topic).await.unwrap();
    let sub = unique("sub");
    bus.ensure_subscription(&SubscriptionSpec::new(&topic, &sub))
        .await
        .unwrap();
    publisher.resume_ordering_key("account-7");
    publisher
        .publish_with(ev("gcp.key", 2), key)
        .await
        .expect("resumed key publishes");
    let consumer = bus.consumer(&topic, &sub).await.unwrap();
    let got = drain(&consumer, 1, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 1);
    assert_eq!(subject(&got[0]), "2");
    assert_eq!(got[0].ordering_key(), Some("account-7"));
    got[0].ack().await.unwrap();
}

/// A worker's handler that runs three leases long keeps its event: the lease is
/// extended while it runs, and the event is delivered once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_lease_extended_while_handler_runs_long() {
    let Some(host) = emulator() else { return };
    let (_, bus, topic, sub) = fixture(
        &host,
        |s| s.lease(Duration::from_secs(1)),
        Default::default(),
    )
    .await;
    publish_one(&bus, &topic, ev("gcp.slow", 0)).await;
    let attempts: Arc<Mutex<Vec<u32>>> = Arc::default();
    let record = attempts.clone();
    let consumer = bus.consumer(&topic, &sub).await.unwrap();
    let worker = consumer
        .start_worker(
            move |_e: Arc<Event>, ctx: HandlerContext| {
                let record = record.clone();
                async move {
                    record.lock().unwrap().push(ctx.attempt);
                    tokio::time::sleep(Duration::from_secs(3)).await;
                    Ok::<(), HandlerError>(())
                }
            },
            WorkerOptions::default(),
        )
        .expect("the router's wiring");
    tokio::time::sleep(Duration::from_secs(6)).await;
    let report = worker.shutdown(Duration::from_secs(5)).await;
    assert_eq!(*attempts.lock().unwrap(), vec![1], "report {report:?}");
}

/// Structured mode carries the same CloudEvent, and `pubsub://` opens the emulator
/// through PUBSUB_EMULATOR_HOST.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_url_and_structured_mode_round_trip() {
    let Some(_host) = emulator() else { return };
    let bus = cloudbus_gcp::connect(&format!("pubsub://{PROJECT}?mode=structured"))
        .await
        .unwrap();
    assert_eq!(bus.scheme(), "pubsub");
    let topic = unique("topic");
    let sub = unique("sub");
    bus.ensure_topic(&topic).await.unwrap();
    bus.ensure_subscription(&SubscriptionSpec::new(&topic, &sub))
        .await
        .unwrap();
    let e = EventBuilder::new("gcp.structured", "/tests/gcp")
        .subject("s-1")
        .extension("tenant", "acme")
        .json(&serde_json::json!({"ok": true}))
        .and_then(|b| b.build())
        .unwrap();
    publish_one(&bus, &topic, e.clone()).await;
    let consumer = bus.consumer(&topic, &sub).await.unwrap();
    let got = drain(&consumer, 1, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 1);
    let back = got[0].event();
    assert_eq!(back.id(), e.id());
    assert_eq!(back.ty(), e.ty());
    assert_eq!(back.extension("tenant"), e.extension("tenant"));
    assert_eq!(back.data(), e.data());
    got[0].ack().await.unwrap();
}

/// The python of Google's Pub/Sub client and the CloudEvents SDK
/// (`scripts/gcp-venv.sh`, which scripts/test.sh runs), or `None` after a loud message.
fn interop_python() -> Option<String> {
    required_env(
        "CLOUDBUS_GCP_PYTHON",
        "the Python client interoperability test",
        "CLOUDBUS_GCP_PYTHON=$(bash scripts/gcp-venv.sh); scripts/test.sh sets it",
    )
}

/// Runs tests/interop/pubsub_clients.py with `args`; its JSON lines.
async fn python_clients(python: &str, args: &[&str]) -> Vec<serde_json::Value> {
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/interop/pubsub_clients.py"
    );
    let mut command = std::process::Command::new(python);
    command.arg(script).args(args);
    let out = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .expect("run the Python client");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// What another language sends reads correctly, and the other way round (issue 12):
/// Google's official Python client publishes events made with the official
/// CloudEvents Python SDK in binary mode (attribute names as the SDK writes them, and
/// `Content-Type` as the binding and sdk-go write it) and in structured mode; cloudbus
/// reads each with every attribute, its JSON content type and its data. Then cloudbus
/// publishes in binary and structured mode, and the Python client and SDK read the same
/// events back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_and_cloudevents_sdk_interoperate() {
    let Some(host) = emulator() else { return };
    let Some(python) = interop_python() else {
        return;
    };
    // Python -> cloudbus.
    let (_, bus, topic, sub) = fixture(&host, |s| s, SubscriptionOptions::default()).await;
    let sent = python_clients(&python, &["publish", PROJECT, &topic]).await;
    assert_eq!(sent.len(), 3);
    let consumer = bus.consumer(&topic, &sub).await.unwrap();
    let got = drain(&consumer, 3, Duration::from_secs(30)).await;
    assert_eq!(got.len(), 3, "cloudbus read {} of 3", got.len());
    for want in &sent {
        let d = got
            .iter()
            .find(|d| d.event().id() == want["id"].as_str().unwrap())
            .unwrap_or_else(|| panic!("{} not read", want["mode"]));
        let e = d.event();
        let mode = &want["mode"];
        assert_eq!(e.ty(), want["type"].as_str().unwrap(), "{mode}");
        assert_eq!(e.source(), want["source"].as_str().unwrap(), "{mode}");
        assert_eq!(e.subject(), want["subject"].as_str(), "{mode}");
        assert_eq!(e.extension_str("tenant"), Some("acme"), "{mode}");
        assert_eq!(e.datacontenttype(), Some("application/json"), "{mode}");
        assert_eq!(
            e.data_json::<serde_json::Value>().unwrap(),
            want["data"],
            "{mode}: the data is not the JSON that was sent"
        );
        assert!(e.time().is_some(), "{mode}: time lost");
        d.ack().await.unwrap();
    }

    // cloudbus -> Python, in both modes.
    for (url, mode) in [
        (format!("pubsub://{PROJECT}"), "binary"),
        (format!("pubsub://{PROJECT}?mode=structured"), "structured"),
    ] {
        let bus = cloudbus_gcp::connect(&url).await.unwrap();
        let topic = unique("topic");
        let sub = unique("sub");
        bus.ensure_topic(&topic).await.unwrap();
        bus.ensure_subscription(&SubscriptionSpec::new(&topic, &sub))
            .await
            .unwrap();
        let e = EventBuilder::new("com.example.rust.created", "/rust/publisher")
            .subject("orders/7")
            .extension("tenant", "acme")
            .json(&serde_json::json!({"n": 7, "from": "rust"}))
            .and_then(|b| b.build())
            .unwrap();
        publish_one(&bus, &topic, e.clone()).await;
        let read = python_clients(&python, &["pull", PROJECT, &sub, "1"]).await;
        assert_eq!(read.len(), 1, "{mode}: Python read {} of 1", read.len());
        let r = &read[0];
        assert_eq!(r["mode"], mode, "{r}");
        assert_eq!(r["id"], e.id(), "{mode}");
        assert_eq!(r["type"], e.ty(), "{mode}");
        assert_eq!(r["source"].as_str(), Some(e.source().as_str()), "{mode}");
        assert_eq!(r["subject"], "orders/7", "{mode}");
        assert_eq!(r["tenant"], "acme", "{mode}");
        assert_eq!(r["datacontenttype"], "application/json", "{mode}");
        assert_eq!(
            r["data"],
            serde_json::json!({"n": 7, "from": "rust"}),
            "{mode}: the SDK did not read the data as JSON: {r}"
        );
    }
}

use cloudbus_conformance::network as fault_proxy;

/// The diagnosis of the network-fault test below: a consumer takes 50 messages
/// through the proxy and then loses its connection for good (the proxy goes away,
/// so no nack, ack or lease extension gets through). Pub/Sub gives the 50 to a new
/// consumer once their 10 s ack deadline has passed.
///
/// Ignored: the emulator (google-cloud-cli-pubsub-emulator 528.0.0, fake 0.8.20) does
/// not forget a streaming pull whose client went away. Closing the call throws
/// `NoSuchMethodError: io.grpc.InternalStatus.asRuntimeException` inside the grpc it
/// bundles (in its log for every cancelled or cut stream), so the stream's pusher
/// thread (`FakePubsubServer$StreamingPullPusher`) never learns the call ended. It goes
/// on pulling the subscription every 50 ms and writes what it pulls to the dead
/// connection, racing the new consumer for every redelivery. Measured on 2026-12-01:
/// on a fresh emulator the 50 came back in 10 s and 30 s; after one run of this file,
/// in 80 s twice; in the fresh-clone CI run, 0 of 50 in 90 s twice. `jstack` of an
/// emulator with no client connected showed 72 pushers still running. Real Pub/Sub
/// ends a stream with its connection; the proof needs it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the emulator keeps pulling for streams whose connection was cut (see the doc comment)"]
async fn pubsub_messages_of_a_cut_connection_come_back_after_the_deadline() {
    let Some(host) = emulator() else {
        return;
    };
    let (held, back, total) = cut_connection_scenario(&host).await;
    assert_eq!(
        back, total,
        "messages of a cut connection stayed leased: held {held}, back {back} of {total}"
    );
}

/// One run of the cut-connection scenario: (held through the proxy, back after the
/// cut, published).
async fn cut_connection_scenario(host: &str) -> (usize, usize, usize) {
    use std::net::ToSocketAddrs;
    let target = host.to_socket_addrs().unwrap().next().unwrap();
    let proxy = fault_proxy::FaultProxy::start(target).await;
    let direct = pubsub(host).into_bus();
    let topic = unique("cut");
    let sub = unique("cut-s");
    direct.ensure_topic(&topic).await.unwrap();
    direct
        .ensure_subscription(
            &SubscriptionSpec::new(&topic, &sub)
                .lease(Duration::from_secs(10))
                .ordered(false),
        )
        .await
        .unwrap();
    let publisher = direct.publisher(&topic).await.unwrap();
    let mut ids = std::collections::HashSet::new();
    for n in 0..50 {
        let e = ev("gcp.cut", n);
        ids.insert(e.id().to_owned());
        publisher.publish(e).await.unwrap();
    }
    let cut = pubsub(&proxy.addr().to_string()).into_bus();
    let cut_consumer = cut.consumer(&topic, &sub).await.unwrap();
    let held = drain(&cut_consumer, 50, Duration::from_secs(20)).await;
    assert!(!held.is_empty(), "nothing came through the proxy");
    drop(proxy);
    let cut_at = Instant::now();
    let consumer = direct.consumer(&topic, &sub).await.unwrap();
    let mut back = std::collections::HashSet::new();
    while back.len() < ids.len() && cut_at.elapsed() < Duration::from_secs(90) {
        for d in consumer
            .receive_batch(50, Duration::from_millis(500))
            .await
            .unwrap()
        {
            back.insert(d.event().id().to_owned());
            d.ack().await.unwrap();
        }
    }
    eprintln!(
        "held through the proxy: {}; back after the cut: {} of {} in {:?}",
        held.len(),
        back.len(),
        ids.len(),
        cut_at.elapsed()
    );
    let outcome = (held.len(), back.len(), ids.len());
    drop(held);
    outcome
}

/// Issue 12: 10,000 events through a TCP proxy that severs every connection, stalls
/// them or adds latency every 300-700 ms, between cloudbus and the Pub/Sub emulator
/// (gRPC publish and streaming pull, REST admin): every event is handled (duplicates
/// allowed and counted), none dead-lettered, and the run ends (no hang).
///
/// Ignored: it fails here, and what is known points at the emulator's leases, not at
/// a cloudbus buffer (`CLOUDBUS_NETFAULT_EVENTS=3000` runs it smaller):
/// - Runs of 10,000 handled 7,300, 6,600 and 4,800; runs of 3,000 handled 2,000 to
///   2,459 (one of five passed). Instrumented (2026-11-30): cloudbus's pump got every
///   message the stream yielded and held none (no flow-control stop, nothing in flight,
///   no stream error, no reopen); after the cuts the stream yielded the rest in bursts
///   10 s apart (the ack deadline), then nothing.
/// - Reopening the stream after 30 s without deliveries, even with a new Subscriber
///   client (a new client id), brought nothing within 60 s; a new bus straight to the
///   emulator after the run drained 1,000 of 1,000 once, 100 of 541 once, and 0 of
///   1,000 twice within 40 s.
/// - The cause (found 2026-12-01, see
///   `pubsub_messages_of_a_cut_connection_come_back_after_the_deadline`): the emulator
///   never ends a streaming pull whose connection went away (an exception in the grpc
///   it bundles), and the dead stream's pusher goes on taking the subscription's
///   messages every 50 ms; each cut adds one such thief.
///
/// - Without cloudbus, Google's official Python client through a proxy that severs
///   the same way (`tests/interop/pubsub_network_faults.py`) received 1,400, 1,900
///   and 1,800 of 3,000 and then nothing; through the same proxy without severing, 3,000
///   in 2 s.
///   So the emulator loses these under repeated cuts, whoever the client is; the
///   proof needs real Pub/Sub.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "fails on the emulator: messages stay leased after repeated connection cuts (see the doc comment)"]
async fn pubsub_network_faults_lose_nothing_of_10000() {
    use std::net::ToSocketAddrs;
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_default())
        .with_test_writer()
        .try_init();
    let Some(host) = emulator() else {
        return;
    };
    let target = host
        .to_socket_addrs()
        .expect("emulator address")
        .next()
        .expect("an address");
    let proxy = Arc::new(fault_proxy::FaultProxy::start(target).await);
    let bus = pubsub(&proxy.addr().to_string()).into_bus();
    let topic = unique("netfault");
    let sub = unique("netfault-s");
    bus.ensure_topic(&topic).await.unwrap();
    bus.ensure_subscription(
        &SubscriptionSpec::new(&topic, &sub)
            .lease(Duration::from_secs(10))
            .ordered(false),
    )
    .await
    .unwrap();
    let report = fault_proxy::nothing_lost_through(
        proxy,
        bus,
        &topic,
        &sub,
        std::env::var("CLOUDBUS_NETFAULT_EVENTS")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(10_000),
        Duration::from_secs(15 * 60),
    )
    .await;
    if report.lost > 0 {
        // Where are they: a new bus straight to the emulator drains the subscription.
        let direct = pubsub(&host).into_bus();
        let consumer = direct.consumer(&topic, &sub).await.unwrap();
        let mut ids = std::collections::HashSet::new();
        let until = Instant::now() + Duration::from_secs(40);
        while Instant::now() < until {
            let batch = consumer
                .receive_batch(500, Duration::from_secs(1))
                .await
                .unwrap_or_default();
            for d in &batch {
                ids.insert(d.event().id().to_owned());
                let _ = d.ack().await;
            }
        }
        eprintln!(
            "DIAG a direct consumer drained {} distinct events afterwards",
            ids.len()
        );
    }
    assert_eq!((report.lost, report.dead_lettered), (0, 0), "{report:?}");
}
