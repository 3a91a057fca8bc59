//! The memory broker's own cases: bounds, log replay, dead letters, metrics names,
//! escape hatches, the chaos seeds that once failed and the layer sweep (its
//! conformance suites run from tests/conformance.rs).

use std::sync::Arc;
use std::time::Duration;

mod common;

use async_trait::async_trait;
use cloudbus_core::{
    Bus, Capabilities, ErrorKind, Event, EventBuilder, HandlerContext, HandlerError,
    MemoryCheckpointStore, RetryPolicy, StartPosition, SubscriptionSpec,
};
use cloudbus_memory::{BrokerConfig, MemoryBroker};
use common::MemoryHarness;

/// The "nothing lost" promise under each injected fault kind (issue 12).
mod chaos {
    use super::*;
    /// Issue 28 item 8: the seed of the memory chaos run that once counted 304 events
    /// lost (see `worker_stall_window`), kept as regression cases of the kinds that
    /// fail receives.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn chaos_seed_4104343704268071995_transient_errors() {
        use cloudbus_conformance::chaos::{FaultKind, run_chaos_case_with_seed};
        let seed = 4_104_343_704_268_071_995;
        run_chaos_case_with_seed(
            MemoryHarness::new(),
            FaultKind::TransientErrors,
            seed,
            2_000,
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn chaos_seed_4104343704268071995_mixed() {
        use cloudbus_conformance::chaos::{FaultKind, run_chaos_case_with_seed};
        let seed = 4_104_343_704_268_071_995;
        run_chaos_case_with_seed(MemoryHarness::new(), FaultKind::Mixed, seed, 2_000).await;
    }

    /// Issue 28: every router layer around a handler that panics, is cancelled by
    /// the timeout or fails, at random; nothing lost, no layer left refusing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn router_layers_keep_the_promise_under_cancellation_and_panics() {
        cloudbus_conformance::chaos::run_layer_sweep_case(MemoryHarness::new(), 500).await;
    }
}

/// Publisher options that surface a refusal at once instead of retrying it.
fn no_retry() -> cloudbus_core::PublisherOptions {
    cloudbus_core::PublisherOptions {
        retry: RetryPolicy::none(),
        ..Default::default()
    }
}

fn ev(n: usize) -> Event {
    EventBuilder::new("test.event", "/tests")
        .subject(n.to_string())
        .build()
        .expect("valid event")
}

/// A fresh broker with `topic` and its subscription `subscription`.
async fn bus_with(topic: &str, subscription: &str) -> Bus {
    let bus = MemoryBroker::new().bus();
    bus.ensure_topic(topic).await.unwrap();
    bus.ensure_subscription(&SubscriptionSpec::new(topic, subscription))
        .await
        .unwrap();
    bus
}

/// Publishes event 1, a raw message that is not a CloudEvent, then event 2.
async fn publish_event_raw_event(p: &cloudbus_core::Publisher, raw: &str) {
    p.publish(ev(1)).await.unwrap();
    p.publish_raw(cloudbus_core::RawMessage::new(raw))
        .await
        .unwrap();
    p.publish(ev(2)).await.unwrap();
}

/// A handler that fails the event whose subject is `subject` (retry or reject) and
/// accepts all others.
fn failing_on(
    subject: &'static str,
    failure: fn(&str) -> HandlerError,
) -> impl Fn(Arc<Event>, HandlerContext) -> std::future::Ready<Result<(), HandlerError>>
+ Send
+ Sync
+ 'static {
    move |e: Arc<Event>, _c: HandlerContext| {
        use cloudbus_core::AttributesReader;
        std::future::ready(if e.subject() == Some(subject) {
            Err(failure("planned failure"))
        } else {
            Ok(())
        })
    }
}

#[tokio::test]
async fn full_subscription_refuses_with_resource_exhausted() {
    let broker = MemoryBroker::with_config(BrokerConfig {
        max_messages_per_subscription: 3,
        ..BrokerConfig::default()
    });
    let bus = broker.bus();
    bus.ensure_topic("t").await.unwrap();
    bus.ensure_subscription(&SubscriptionSpec::new("t", "s"))
        .await
        .unwrap();
    let p = bus.publisher_with("t", no_retry()).await.unwrap();
    for r in p.publish_batch((0..3).map(ev).collect()).await {
        r.unwrap();
    }
    let err = p.publish(ev(4)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ResourceExhausted);
    assert!(err.is_retryable());
    // Acking makes room again.
    let c = bus.consumer("t", "s").await.unwrap();
    let d = c.receive().await.unwrap();
    d.ack().await.unwrap();
    p.publish(ev(5)).await.unwrap();
}

#[tokio::test]
async fn full_log_partition_refuses() {
    let broker = MemoryBroker::with_config(BrokerConfig {
        max_log_records_per_partition: 2,
        ..BrokerConfig::default()
    });
    broker.ensure_log("clicks", 1).unwrap();
    let p = broker
        .bus()
        .publisher_with("clicks", no_retry())
        .await
        .unwrap();
    p.publish(ev(1)).await.unwrap();
    p.publish(ev(2)).await.unwrap();
    assert_eq!(
        p.publish(ev(3)).await.unwrap_err().kind(),
        ErrorKind::ResourceExhausted
    );
}

#[tokio::test]
async fn log_checkpoints_and_replay_by_position_and_time() {
    let broker = MemoryBroker::new();
    broker.ensure_log("clicks", 3).unwrap();
    let bus = broker.bus();
    let p = bus.publisher("clicks").await.unwrap();
    for i in 0..30 {
        let e = EventBuilder::new("click", "/web")
            .subject(i.to_string())
            .partition_key(format!("user-{}", i % 5))
            .build()
            .unwrap();
        p.publish(e).await.unwrap();
    }
    let middle = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(5)).await;
    for i in 30..40 {
        p.publish(ev(i)).await.unwrap();
    }
    let store = Arc::new(MemoryCheckpointStore::new());
    let seen = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let s2 = seen.clone();
    let handler = move |e: Arc<Event>, _c: HandlerContext| {
        let s = s2.clone();
        async move {
            s.lock().unwrap().push(e.subject().unwrap_or("").to_owned());
            Ok::<(), HandlerError>(())
        }
    };
    use cloudbus_core::AttributesReader;
    let mut reader = bus
        .stream_consumer("clicks", "analytics")
        .await
        .unwrap()
        .checkpoints(store.clone())
        .start_at(StartPosition::Earliest);
    reader.catch_up(&handler).await.unwrap();
    assert_eq!(seen.lock().unwrap().len(), 40);
    // Per key order holds within a partition.
    let order_for = |key: usize| -> Vec<usize> {
        seen.lock()
            .unwrap()
            .iter()
            .filter_map(|s| s.parse::<usize>().ok())
            .filter(|n| *n < 30 && n % 5 == key)
            .collect()
    };
    for k in 0..5 {
        let o = order_for(k);
        assert!(o.windows(2).all(|w| w[0] < w[1]), "key {k}: {o:?}");
    }
    // A new reader of the same group resumes after the checkpoints: nothing new. (The
    // first one hands its partitions over; while it held them, the new one would get
    // none.)
    reader.release().await.unwrap();
    let mut again = bus
        .stream_consumer("clicks", "analytics")
        .await
        .unwrap()
        .checkpoints(store.clone())
        .start_at(StartPosition::Earliest);
    assert_eq!(again.poll(&handler).await.unwrap().handled, 0);
    // Replay from a time gives exactly the 10 later events.
    seen.lock().unwrap().clear();
    again.replay(StartPosition::AtTime(middle));
    again.catch_up(&handler).await.unwrap();
    let mut got: Vec<usize> = seen
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    got.sort();
    assert_eq!(got, (30..40).collect::<Vec<_>>());
    // Replay from the start gives all 40 again.
    seen.lock().unwrap().clear();
    again.replay(StartPosition::Earliest);
    again.catch_up(&handler).await.unwrap();
    assert_eq!(seen.lock().unwrap().len(), 40);
}

#[tokio::test]
async fn stream_failures_are_dead_lettered_not_skipped() {
    let broker = MemoryBroker::new();
    broker.ensure_log("s", 1).unwrap();
    let bus = broker.bus();
    bus.ensure_topic("s-dlq").await.unwrap();
    bus.ensure_subscription(&SubscriptionSpec::new("s-dlq", "inspect"))
        .await
        .unwrap();
    let p = bus.publisher("s").await.unwrap();
    publish_event_raw_event(&p, "not an event").await;
    let failing = failing_on("1", |m| HandlerError::retry(m));
    // Two quick attempts per record, from the start of the log.
    let reader_of = |group: &'static str| {
        let bus = bus.clone();
        async move {
            bus.stream_consumer("s", group)
                .await
                .unwrap()
                .start_at(StartPosition::Earliest)
                .retry(
                    RetryPolicy::default()
                        .max_attempts(2)
                        .initial_backoff(Duration::from_millis(1)),
                )
        }
    };
    // Without a dead-letter place the reader stops at the failing record.
    let mut strict = reader_of("g1").await;
    assert!(strict.poll(&failing).await.is_err());
    // With one, both bad records go there with their reasons and the rest is handled.
    let mut reader = reader_of("g2")
        .await
        .dead_letter_to(bus.publisher("s-dlq").await.unwrap());
    let report = reader.poll(&failing).await.unwrap();
    assert_eq!((report.handled, report.dead_lettered), (1, 2));
    let dlq = bus.consumer("s-dlq", "inspect").await.unwrap();
    // The raw record is not a CloudEvent, so the DLQ consumer dead-letters it in turn;
    // the failed event arrives with its reason.
    let d = dlq.receive().await.unwrap();
    use cloudbus_core::EventExt;
    let reason = d
        .event()
        .extension_str("deadletterreason")
        .unwrap()
        .to_owned();
    assert!(
        reason.contains("max delivery attempts (2) exceeded"),
        "{reason}"
    );
    d.ack().await.unwrap();
    let rest = dlq
        .receive_batch(10, Duration::from_millis(200))
        .await
        .unwrap();
    assert!(rest.is_empty(), "the raw record must not reach the caller");
    let raw_letters = bus
        .dead_letters("s-dlq", "inspect")
        .await
        .unwrap()
        .peek(10)
        .await
        .unwrap();
    assert_eq!(raw_letters.len(), 1);
    match &raw_letters[0].payload {
        cloudbus_core::Payload::Raw(r) => {
            assert!(r.attributes["deadletterreason"].contains("not a CloudEvent"))
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn worker_records_the_seed_metrics() {
    use metrics_util::debugging::DebuggingRecorder;
    let recorder = DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let _ = metrics::set_global_recorder(recorder);
    let bus = bus_with("m", "metered").await;
    let p = bus.publisher("m").await.unwrap();
    p.publish(ev(1)).await.unwrap();
    p.publish(ev(2)).await.unwrap();
    let c = bus.consumer("m", "metered").await.unwrap();
    c.report_queue_depth().await;
    let worker = c
        .start_worker(
            |e: Arc<Event>, _c: HandlerContext| async move {
                use cloudbus_core::AttributesReader;
                if e.subject() == Some("2") {
                    Err(HandlerError::reject("bad"))
                } else {
                    Ok(())
                }
            },
            cloudbus_core::WorkerOptions::default(),
        )
        .expect("the router's wiring");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while worker.stats().acked + worker.stats().dead_lettered < 2
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    worker.shutdown(Duration::from_secs(1)).await;
    let snapshot = snapshotter.snapshot().into_vec();
    let names: std::collections::HashSet<String> = snapshot
        .iter()
        .map(|(key, _, _, _)| key.key().name().to_owned())
        .collect();
    for want in [
        "events_published_total",
        "events_consumed_total",
        "event_processing_duration_seconds",
        "event_queue_depth",
        "dlq_messages_total",
        "event_lag_seconds",
        "event_processing_errors_total",
    ] {
        assert!(names.contains(want), "metric {want} missing from {names:?}");
    }
    // The values of this consumer: one event acked, one dead-lettered.
    let counter = |name: &str, labels: &[(&str, &str)]| -> u64 {
        snapshot
            .iter()
            .filter(|(key, _, _, _)| {
                key.key().name() == name
                    && labels
                        .iter()
                        .all(|(k, v)| key.key().labels().any(|l| l.key() == *k && l.value() == *v))
            })
            .map(|(_, _, _, value)| match value {
                metrics_util::debugging::DebugValue::Counter(n) => *n,
                _ => 0,
            })
            .sum()
    };
    let consumed = "events_consumed_total";
    assert_eq!(
        counter(consumed, &[("consumer", "metered"), ("status", "ack")]),
        1
    );
    assert_eq!(
        counter(
            consumed,
            &[("consumer", "metered"), ("status", "dead_letter")]
        ),
        1
    );
    assert_eq!(counter("dlq_messages_total", &[("consumer", "metered")]), 1);
    // The rejection is a processing error; the success is not.
    let errors = "event_processing_errors_total";
    assert_eq!(
        counter(errors, &[("consumer", "metered"), ("error", "reject")]),
        1
    );
    assert_eq!(counter(errors, &[("consumer", "metered")]), 1);
    // The lag of every delivery, not of the first of each batch.
    let lag_samples: usize = snapshot
        .iter()
        .filter(|(key, _, _, _)| {
            key.key().name() == "event_lag_seconds"
                && key
                    .key()
                    .labels()
                    .any(|l| l.key() == "consumer" && l.value() == "metered")
        })
        .map(|(_, _, _, value)| match value {
            metrics_util::debugging::DebugValue::Histogram(samples) => samples.len(),
            _ => 0,
        })
        .sum();
    assert_eq!(lag_samples, 2, "one lag sample per delivery");

    // A stream consumer group's lag behind the newest record of each partition (the
    // memory log reports it as Kinesis reports MillisBehindLatest): behind after a
    // partial read, zero once caught up.
    let broker = MemoryBroker::new();
    broker.ensure_log("metered-log", 1).unwrap();
    let log = broker.bus();
    let writer = log.publisher("metered-log").await.unwrap();
    for n in 0..5 {
        writer.publish(ev(n)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut reader = log
        .stream_consumer("metered-log", "metered-group")
        .await
        .unwrap()
        .start_at(cloudbus_core::StartPosition::Earliest)
        .batch_size(2);
    let ok = |_e: Arc<Event>, _c: HandlerContext| async { Ok::<(), HandlerError>(()) };
    let stream_lag = || -> Vec<f64> {
        snapshotter
            .snapshot()
            .into_vec()
            .into_iter()
            .filter(|(key, _, _, _)| {
                key.key().name() == "event_stream_lag_seconds"
                    && key
                        .key()
                        .labels()
                        .any(|l| l.key() == "consumer" && l.value() == "metered-group")
            })
            .filter_map(|(_, _, _, value)| match value {
                metrics_util::debugging::DebugValue::Gauge(v) => Some(v.into_inner()),
                _ => None,
            })
            .collect()
    };
    reader.poll(&ok).await.unwrap();
    let behind = stream_lag();
    assert_eq!(behind.len(), 1, "one partition: {behind:?}");
    assert!(
        behind[0] >= 0.01,
        "3 records behind, 5 ms apart: {behind:?}"
    );
    reader.catch_up(&ok).await.unwrap();
    assert_eq!(stream_lag(), vec![0.0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_extends_leases_while_a_handler_runs_long() {
    let bus = MemoryBroker::new().bus();
    bus.ensure_topic("slow").await.unwrap();
    bus.ensure_subscription(&SubscriptionSpec::new("slow", "s").lease(Duration::from_millis(500)))
        .await
        .unwrap();
    bus.publisher("slow")
        .await
        .unwrap()
        .publish(ev(1))
        .await
        .unwrap();
    let attempts = Arc::new(std::sync::Mutex::new(Vec::new()));
    let a2 = attempts.clone();
    let worker = bus
        .consumer("slow", "s")
        .await
        .unwrap()
        .start_worker(
            move |_e: Arc<Event>, c: HandlerContext| {
                let a = a2.clone();
                async move {
                    a.lock().unwrap().push(c.attempt);
                    // Three times the lease: without extension another delivery would start.
                    tokio::time::sleep(Duration::from_millis(1500)).await;
                    Ok::<(), HandlerError>(())
                }
            },
            cloudbus_core::WorkerOptions::default().concurrency(4),
        )
        .expect("the router's wiring");
    tokio::time::sleep(Duration::from_millis(1900)).await;
    let report = worker.shutdown(Duration::from_secs(5)).await;
    assert_eq!(
        *attempts.lock().unwrap(),
        vec![1],
        "redelivered while the handler ran"
    );
    assert_eq!(report.acked, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_never_holds_more_than_its_concurrency() {
    let bus = bus_with("fc", "s").await;
    let p = bus.publisher("fc").await.unwrap();
    for r in p.publish_batch((0..40).map(ev).collect()).await {
        r.unwrap();
    }
    let running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let peak = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (r2, p2) = (running.clone(), peak.clone());
    let consumer = bus.consumer("fc", "s").await.unwrap();
    let worker = consumer
        .start_worker(
            move |_e: Arc<Event>, _c: HandlerContext| {
                let (r, p) = (r2.clone(), p2.clone());
                async move {
                    use std::sync::atomic::Ordering::SeqCst;
                    let now = r.fetch_add(1, SeqCst) + 1;
                    p.fetch_max(now, SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    r.fetch_sub(1, SeqCst);
                    Ok::<(), HandlerError>(())
                }
            },
            cloudbus_core::WorkerOptions::default().concurrency(3),
        )
        .expect("the router's wiring");
    // Early on, most events are still unacked at the broker (depth counts in-flight too).
    tokio::time::sleep(Duration::from_millis(30)).await;
    let depth = consumer.report_queue_depth().await.unwrap();
    assert!(depth >= 30, "depth {depth}");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while worker.stats().acked < 40 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let report = worker.shutdown(Duration::from_secs(5)).await;
    assert_eq!(report.acked, 40);
    assert!(
        peak.load(std::sync::atomic::Ordering::SeqCst) <= 3,
        "peak {}",
        peak.load(std::sync::atomic::Ordering::SeqCst)
    );
}

/// The memory subscription presented as a provider without a dead-letter place; it
/// refuses dead-letter settlements, so the test proves the polyfill never sends one.
struct WithoutNativeDeadLetters(Arc<dyn cloudbus_core::SubscriptionDriver>);

#[async_trait]
impl cloudbus_core::SubscriptionDriver for WithoutNativeDeadLetters {
    async fn receive_batch(
        &self,
        max: usize,
        wait: Duration,
    ) -> cloudbus_core::Result<Vec<cloudbus_core::ReceivedMessage>> {
        self.0.receive_batch(max, wait).await
    }
    async fn settle_batch(
        &self,
        items: &[(cloudbus_core::AckToken, cloudbus_core::Settlement)],
    ) -> cloudbus_core::Result<cloudbus_core::BatchResults> {
        if items
            .iter()
            .any(|(_, s)| matches!(s, cloudbus_core::Settlement::DeadLetter { .. }))
        {
            return Err(cloudbus_core::Error::unsupported(
                "no dead-letter place here",
            ));
        }
        self.0.settle_batch(items).await
    }
    fn capabilities(&self) -> Capabilities {
        let mut caps = self.0.capabilities();
        caps.native_dead_letter = false;
        caps.max_delivery_attempts = false;
        caps
    }
}

/// A broker with `orders`/`billing` and the dead-letter topic `orders-dlq`/`inspect`
/// the polyfill keeps for it.
async fn polyfill_bus() -> Bus {
    let bus = MemoryBroker::new().bus();
    for (topic, sub) in [("orders", "billing"), ("orders-dlq", "inspect")] {
        bus.ensure_topic(topic).await.unwrap();
        bus.ensure_subscription(&SubscriptionSpec::new(topic, sub))
            .await
            .unwrap();
    }
    bus
}

/// The consumer of `orders`/`billing` as on a provider without a native dead-letter
/// place: it dead-letters to `orders-dlq`.
async fn polyfill_consumer(bus: &Bus) -> cloudbus_core::Consumer {
    cloudbus_core::Consumer::new(
        Arc::new(WithoutNativeDeadLetters(
            bus.driver()
                .subscription("orders", "billing")
                .await
                .unwrap(),
        )),
        "billing",
    )
    .dead_letter_to(bus.publisher("orders-dlq").await.unwrap())
}

/// The polyfill's dead-letter place of `orders`: read through `orders-dlq`/`inspect`,
/// redriven to `orders`.
async fn polyfill_dead_letters(bus: &Bus) -> cloudbus_core::DeadLetters {
    cloudbus_core::DeadLetters::new(Arc::new(
        cloudbus_core::TopicDeadLetters::new(
            bus.driver()
                .subscription("orders-dlq", "inspect")
                .await
                .unwrap(),
            bus.publisher("orders").await.unwrap(),
        )
        .wait(Duration::from_millis(200)),
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_polyfill_keeps_reasons_and_redrives() {
    use cloudbus_core::Payload;
    let bus = polyfill_bus().await;
    let consumer = || polyfill_consumer(&bus);
    let p = bus.publisher("orders").await.unwrap();
    publish_event_raw_event(&p, "junk").await;
    let rejecting = failing_on("2", |m| HandlerError::reject(m));
    let worker = consumer()
        .await
        .start_worker(rejecting, cloudbus_core::WorkerOptions::default())
        .expect("the router's wiring");
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while worker.stats().acked + worker.stats().dead_lettered < 2
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let report = worker.shutdown(Duration::from_secs(2)).await;
    assert_eq!(
        (report.acked, report.dead_lettered, report.settle_errors),
        (1, 1, 0)
    );

    let dlq = polyfill_dead_letters(&bus).await;
    let letters = dlq.peek(10).await.unwrap();
    assert_eq!(letters.len(), 2, "{letters:?}");
    let reasons: Vec<String> = letters
        .iter()
        .map(|l| l.reason.clone().unwrap_or_default())
        .collect();
    assert!(
        reasons.iter().any(|r| r == "rejected: planned failure"),
        "{reasons:?}"
    );
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("malformed: not a CloudEvent")),
        "{reasons:?}"
    );
    assert!(
        letters
            .iter()
            .any(|l| matches!(&l.payload, Payload::Raw(r) if r.body == b"junk"))
    );
    // Peeking does not consume.
    assert_eq!(dlq.peek(10).await.unwrap().len(), 2);
    // Redrive both to the source; the event comes back without its reason.
    assert_eq!(dlq.redrive_all().await.unwrap(), 2);
    let again = consumer().await;
    let back = again
        .receive_batch(10, Duration::from_millis(500))
        .await
        .unwrap();
    assert_eq!(
        back.len(),
        1,
        "the raw message is dead-lettered again, the event returns"
    );
    use cloudbus_core::{AttributesReader, EventExt};
    assert_eq!(back[0].event().subject(), Some("2"));
    assert!(back[0].event().extension_str("deadletterreason").is_none());
    back[0].ack().await.unwrap();
    // The raw message went back to the dead-letter topic; purge removes it.
    assert_eq!(dlq.purge().await.unwrap(), 1);
    assert!(dlq.peek(10).await.unwrap().is_empty());
}

/// Counts driver calls, to show that batching happens in core.
struct Counting<D> {
    inner: D,
    calls: Arc<std::sync::atomic::AtomicUsize>,
}

#[async_trait]
impl cloudbus_core::SubscriptionDriver for Counting<Arc<dyn cloudbus_core::SubscriptionDriver>> {
    async fn receive_batch(
        &self,
        max: usize,
        wait: Duration,
    ) -> cloudbus_core::Result<Vec<cloudbus_core::ReceivedMessage>> {
        self.inner.receive_batch(max, wait).await
    }
    async fn settle_batch(
        &self,
        items: &[(cloudbus_core::AckToken, cloudbus_core::Settlement)],
    ) -> cloudbus_core::Result<cloudbus_core::BatchResults> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(5)).await;
        self.inner.settle_batch(items).await
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
    async fn queue_depth(&self) -> Option<u64> {
        self.inner.queue_depth().await
    }
}

#[async_trait]
impl cloudbus_core::TopicDriver for Counting<Arc<dyn cloudbus_core::TopicDriver>> {
    async fn send_batch(
        &self,
        batch: &[cloudbus_core::OutgoingMessage],
    ) -> cloudbus_core::Result<cloudbus_core::BatchResults> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        // A network round trip: while one batch is out, the next one fills.
        tokio::time::sleep(Duration::from_millis(5)).await;
        self.inner.send_batch(batch).await
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_publishes_and_acks_are_batched_in_core() {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    let bus = bus_with("b", "s").await;
    let sends = Arc::new(AtomicUsize::new(0));
    let publisher = cloudbus_core::Publisher::new(Arc::new(Counting {
        inner: bus.driver().topic("b").await.unwrap(),
        calls: sends.clone(),
    }));
    // 1,000 single publishes in flight at once travel in far fewer provider calls
    // (each lane sends what accumulated while its previous batch was out).
    let handles: Vec<_> = (0..1000).map(|i| publisher.publish(ev(i))).collect();
    for h in handles {
        h.await.unwrap();
    }
    let send_calls = sends.load(SeqCst);
    assert!(
        send_calls < 100,
        "{send_calls} send calls for 1,000 publishes"
    );

    let settles = Arc::new(AtomicUsize::new(0));
    let consumer = cloudbus_core::Consumer::new(
        Arc::new(Counting {
            inner: bus.driver().subscription("b", "s").await.unwrap(),
            calls: settles.clone(),
        }),
        "s",
    );
    let mut deliveries = Vec::new();
    while deliveries.len() < 1000 {
        deliveries.extend(
            consumer
                .receive_batch(1000, Duration::from_millis(200))
                .await
                .unwrap(),
        );
    }
    // 1,000 individual acks at once are coalesced into batches by the settler (what
    // arrives while one settle call is out goes in the next).
    let acks: Vec<_> = deliveries.iter().map(|d| d.ack()).collect();
    for r in futures::future::join_all(acks).await {
        r.unwrap();
    }
    let settle_calls = settles.load(SeqCst);
    assert!(
        settle_calls <= 40,
        "{settle_calls} settle calls for 1,000 acks"
    );
    assert_eq!(consumer.report_queue_depth().await, Some(0));
    eprintln!("batching: {send_calls} send calls and {settle_calls} settle calls for 1,000 events");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_flow_control_by_bytes() {
    let bus = bus_with("bytes", "s").await;
    let p = bus.publisher("bytes").await.unwrap();
    let big = |i: usize| {
        EventBuilder::new("big", "/tests")
            .subject(i.to_string())
            .data("application/octet-stream", vec![7u8; 10 * 1024])
            .build()
            .unwrap()
    };
    for r in p.publish_batch((0..12).map(big).collect()).await {
        r.unwrap();
    }
    let running = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let peak = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (r2, p2) = (running.clone(), peak.clone());
    let worker = bus
        .consumer("bytes", "s")
        .await
        .unwrap()
        .start_worker(
            move |_e: Arc<Event>, _c: HandlerContext| {
                let (r, p) = (r2.clone(), p2.clone());
                async move {
                    use std::sync::atomic::Ordering::SeqCst;
                    p.fetch_max(r.fetch_add(1, SeqCst) + 1, SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    r.fetch_sub(1, SeqCst);
                    Ok::<(), HandlerError>(())
                }
            },
            // Room for 16 by count but only about 2.5 events by bytes.
            cloudbus_core::WorkerOptions {
                max_outstanding_bytes: 25 * 1024,
                ..cloudbus_core::WorkerOptions::default().concurrency(16)
            },
        )
        .expect("the router's wiring");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while worker.stats().acked < 12 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let report = worker.shutdown(Duration::from_secs(5)).await;
    assert_eq!(report.acked, 12);
    let peak = peak.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        peak <= 2,
        "{peak} handlers ran at once with room for 2 by bytes"
    );
}

#[tokio::test]
async fn drivers_expose_the_memory_broker_as_escape_hatch() {
    let bus = MemoryBroker::new().bus();
    bus.ensure_topic("x").await.unwrap();
    let p = bus.publisher("x").await.unwrap();
    assert!(p.downcast::<cloudbus_memory::MemoryTopic>().is_some());
    assert!(bus.downcast::<MemoryBroker>().is_some());
    // What `downcast` saves a caller from: `as_any` on the `Arc` reaches the `Arc`.
    use cloudbus_core::AsAny as _;
    assert!(
        bus.driver()
            .as_any()
            .downcast_ref::<MemoryBroker>()
            .is_none()
    );
    assert!(
        (**bus.driver())
            .as_any()
            .downcast_ref::<MemoryBroker>()
            .is_some()
    );
}

/// A topic driver that fails chosen events (by subject) a number of times.
struct Flaky {
    inner: Arc<dyn cloudbus_core::TopicDriver>,
    fail: std::sync::Mutex<std::collections::HashMap<String, (ErrorKind, u32)>>,
}

#[async_trait]
impl cloudbus_core::TopicDriver for Flaky {
    async fn send_batch(
        &self,
        batch: &[cloudbus_core::OutgoingMessage],
    ) -> cloudbus_core::Result<cloudbus_core::BatchResults> {
        use cloudbus_core::AttributesReader;
        let mut planned = Vec::with_capacity(batch.len());
        {
            let mut fail = self.fail.lock().unwrap();
            for m in batch {
                let subject = m.payload.event().and_then(|e| e.subject()).unwrap_or("");
                planned.push(match fail.get_mut(subject) {
                    Some((kind, times)) if *times > 0 => {
                        *times -= 1;
                        Some(cloudbus_core::Error::new(
                            *kind,
                            format!("planned failure of {subject}"),
                        ))
                    }
                    _ => None,
                });
            }
        }
        let passing: Vec<_> = batch
            .iter()
            .zip(&planned)
            .filter(|(_, p)| p.is_none())
            .map(|(m, _)| m.clone())
            .collect();
        let mut sent = self.inner.send_batch(&passing).await?.into_iter();
        Ok(planned
            .into_iter()
            .map(|p| match p {
                Some(e) => Err(e),
                None => sent.next().unwrap(),
            })
            .collect())
    }
    fn capabilities(&self) -> Capabilities {
        self.inner.capabilities()
    }
}

fn keyed(key: &str, n: usize) -> Event {
    EventBuilder::new("keyed", "/tests")
        .subject(format!("{key}-{n}"))
        .partition_key(key)
        .build()
        .unwrap()
}

async fn flaky_publisher(
    bus: &Bus,
    topic: &str,
    fail: &[(&str, ErrorKind, u32)],
) -> cloudbus_core::Publisher {
    cloudbus_core::Publisher::with_options(
        Arc::new(Flaky {
            inner: bus.driver().topic(topic).await.unwrap(),
            fail: std::sync::Mutex::new(
                fail.iter()
                    .map(|(s, k, n)| ((*s).to_owned(), (*k, *n)))
                    .collect(),
            ),
        }),
        cloudbus_core::PublisherOptions {
            retry: RetryPolicy::default().initial_backoff(Duration::from_millis(5)),
            ..Default::default()
        },
    )
}

#[tokio::test]
async fn ordering_key_pauses_after_a_failed_publish_until_resumed() {
    use cloudbus_core::AttributesReader;
    let bus = bus_with("o", "s").await;
    let p = flaky_publisher(&bus, "o", &[("k-2", ErrorKind::InvalidArgument, 1)]).await;
    p.publish(keyed("k", 0)).await.unwrap();
    p.publish(keyed("k", 1)).await.unwrap();
    assert_eq!(
        p.publish(keyed("k", 2)).await.unwrap_err().kind(),
        ErrorKind::InvalidArgument
    );
    // The key is paused: later events of it are refused, other keys go on.
    assert_eq!(
        p.publish(keyed("k", 3)).await.unwrap_err().kind(),
        ErrorKind::OrderingKeyPaused
    );
    let batch = p.publish_batch(vec![keyed("k", 3), keyed("j", 0)]).await;
    assert_eq!(
        batch[0].as_ref().unwrap_err().kind(),
        ErrorKind::OrderingKeyPaused
    );
    assert!(batch[1].is_ok());
    assert_eq!(p.paused_ordering_keys(), vec!["k".to_owned()]);
    p.resume_ordering_key("k");
    p.publish(keyed("k", 4)).await.unwrap();
    let c = bus.consumer("o", "s").await.unwrap();
    let mut got = Vec::new();
    while got.len() < 4 {
        let batch = c
            .receive_batch(10, Duration::from_millis(200))
            .await
            .unwrap();
        for d in &batch {
            got.push(d.event().subject().unwrap_or("").to_owned());
            d.ack().await.unwrap();
        }
    }
    let k: Vec<&String> = got.iter().filter(|s| s.starts_with("k-")).collect();
    assert_eq!(k, ["k-0", "k-1", "k-4"]);
}

#[tokio::test]
async fn a_failed_event_is_not_retried_behind_its_own_key() {
    let bus = MemoryBroker::new().bus();
    bus.ensure_topic("r").await.unwrap();
    let p = flaky_publisher(
        &bus,
        "r",
        &[
            ("k-1", ErrorKind::Unavailable, 1),
            ("y-0", ErrorKind::Unavailable, 1),
        ],
    )
    .await;
    let results = p
        .publish_batch(vec![
            keyed("k", 0),
            keyed("k", 1),
            keyed("k", 2),
            keyed("y", 0),
        ])
        .await;
    // k-2 got through in the same call, so retrying k-1 would reorder the key: it fails
    // and the key pauses. y-0 has nothing behind it and is retried.
    assert!(results[0].is_ok() && results[2].is_ok());
    assert_eq!(
        results[1].as_ref().unwrap_err().kind(),
        ErrorKind::Unavailable
    );
    assert!(results[3].is_ok(), "{:?}", results[3]);
    assert_eq!(p.paused_ordering_keys(), vec!["k".to_owned()]);
}

/// `Bus::replay` delivers again, to that subscription only, the retained events
/// published since a time that its filter matches; a missing subscription is NotFound.
#[tokio::test]
async fn replay_redelivers_retained_events_since_a_time() {
    use cloudbus_core::AttributesReader;
    let bus = MemoryBroker::new().bus();
    bus.ensure_topic("audit").await.unwrap();
    bus.ensure_subscription(&SubscriptionSpec::new("audit", "all"))
        .await
        .unwrap();
    bus.ensure_subscription(
        &SubscriptionSpec::new("audit", "odd")
            .filter(cloudbus_core::Filter::prefix("subject", "odd")),
    )
    .await
    .unwrap();
    let publisher = bus.publisher("audit").await.unwrap();
    publisher.publish(ev(0)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let since = chrono::Utc::now();
    let later: Vec<Event> = (1..=3)
        .map(|n| {
            EventBuilder::new("test.event", "/tests")
                .subject(if n % 2 == 1 {
                    format!("odd-{n}")
                } else {
                    format!("even-{n}")
                })
                .build()
                .unwrap()
        })
        .collect();
    for e in &later {
        publisher.publish(e.clone()).await.unwrap();
    }
    for sub in ["all", "odd"] {
        let c = bus.consumer("audit", sub).await.unwrap();
        for d in c
            .receive_batch(10, Duration::from_millis(200))
            .await
            .unwrap()
        {
            d.ack().await.unwrap();
        }
    }
    bus.replay("audit", "odd", since).await.unwrap();
    let odd = bus.consumer("audit", "odd").await.unwrap();
    let again = odd
        .receive_batch(10, Duration::from_millis(300))
        .await
        .unwrap();
    let ids: Vec<&str> = again.iter().map(|d| d.event().id()).collect();
    assert_eq!(
        ids,
        [later[0].id(), later[2].id()],
        "odd events since the mark, in order"
    );
    let all = bus.consumer("audit", "all").await.unwrap();
    assert!(
        all.receive_batch(10, Duration::from_millis(200))
            .await
            .unwrap()
            .is_empty(),
        "another subscription got the replay"
    );
    let err = bus.replay("audit", "missing", since).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
}

/// A subscription that cannot delay a nack (as Service Bus's abandon): every nack
/// redelivers at once, and its capabilities say so.
struct NoNackDelay(Arc<dyn cloudbus_core::SubscriptionDriver>);

#[async_trait]
impl cloudbus_core::SubscriptionDriver for NoNackDelay {
    async fn receive_batch(
        &self,
        max: usize,
        wait: Duration,
    ) -> cloudbus_core::Result<Vec<cloudbus_core::ReceivedMessage>> {
        self.0.receive_batch(max, wait).await
    }
    async fn settle_batch(
        &self,
        items: &[(cloudbus_core::AckToken, cloudbus_core::Settlement)],
    ) -> cloudbus_core::Result<cloudbus_core::BatchResults> {
        let undelayed: Vec<_> = items
            .iter()
            .map(|(t, s)| match s {
                cloudbus_core::Settlement::Nack { .. } => (
                    t.clone(),
                    cloudbus_core::Settlement::Nack {
                        delay: Duration::ZERO,
                    },
                ),
                other => (t.clone(), other.clone()),
            })
            .collect();
        self.0.settle_batch(&undelayed).await
    }
    fn capabilities(&self) -> Capabilities {
        let mut caps = self.0.capabilities();
        caps.nack_delay = false;
        caps
    }
}

/// Issue 12 item 10: where the broker cannot delay a nack, the worker's backoff was
/// lost and all attempts burnt at once (a one-second outage dead-lettered events).
/// The worker now holds the delivery for the backoff before releasing it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backoff_is_held_where_the_broker_cannot_delay_a_nack() {
    let bus = bus_with("held", "s").await;
    let consumer = cloudbus_core::Consumer::new(
        Arc::new(NoNackDelay(
            bus.driver().subscription("held", "s").await.unwrap(),
        )),
        "s",
    );
    bus.publisher("held")
        .await
        .unwrap()
        .publish(ev(1))
        .await
        .unwrap();
    let attempts: Arc<std::sync::Mutex<Vec<std::time::Instant>>> = Arc::default();
    let a2 = attempts.clone();
    let worker = consumer
        .start_worker(
            move |_e: Arc<Event>, c: HandlerContext| {
                let a = a2.clone();
                async move {
                    a.lock().unwrap().push(std::time::Instant::now());
                    if c.attempt < 3 {
                        return Err(HandlerError::retry("downstream is away"));
                    }
                    Ok(())
                }
            },
            cloudbus_core::WorkerOptions::default().retry(
                RetryPolicy::default()
                    .max_attempts(5)
                    .initial_backoff(Duration::from_millis(300)),
            ),
        )
        .expect("the router's wiring");
    let until = std::time::Instant::now() + Duration::from_secs(10);
    while worker.stats().acked < 1 && std::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let report = worker.shutdown(Duration::from_secs(2)).await;
    assert_eq!(report.acked, 1, "{report:?}");
    let at = attempts.lock().unwrap().clone();
    assert_eq!(at.len(), 3);
    for pair in at.windows(2) {
        let gap = pair[1] - pair[0];
        // The policy's jitter may shorten a backoff by at most half.
        assert!(
            gap >= Duration::from_millis(150),
            "attempts only {gap:?} apart"
        );
    }
}

/// A memory subscription or topic with faults switched on by the test.
struct Scripted<D> {
    inner: Option<D>,
    /// receive_batch asks the broker for this many more than requested.
    over_fetch: usize,
    /// The next settle_batch (or send_batch) panics.
    panic_next: std::sync::atomic::AtomicBool,
    /// settle_batch fails with Unavailable.
    fail_settle: std::sync::atomic::AtomicBool,
    /// The next this many settle_batch calls fail with Unavailable.
    fail_settles: std::sync::atomic::AtomicUsize,
}

impl<D> Scripted<D> {
    fn over(inner: D, over_fetch: usize) -> Self {
        Scripted {
            inner: Some(inner),
            over_fetch,
            panic_next: Default::default(),
            fail_settle: Default::default(),
            fail_settles: Default::default(),
        }
    }
    fn d(&self) -> &D {
        self.inner.as_ref().expect("inner driver")
    }
}

#[async_trait]
impl cloudbus_core::SubscriptionDriver for Scripted<Arc<dyn cloudbus_core::SubscriptionDriver>> {
    async fn receive_batch(
        &self,
        max: usize,
        wait: Duration,
    ) -> cloudbus_core::Result<Vec<cloudbus_core::ReceivedMessage>> {
        self.d().receive_batch(max + self.over_fetch, wait).await
    }
    async fn settle_batch(
        &self,
        items: &[(cloudbus_core::AckToken, cloudbus_core::Settlement)],
    ) -> cloudbus_core::Result<cloudbus_core::BatchResults> {
        use std::sync::atomic::Ordering::SeqCst;
        if self.panic_next.swap(false, SeqCst) {
            panic!("scripted panic in settle_batch");
        }
        let failing_one = self
            .fail_settles
            .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if self.fail_settle.load(SeqCst) || failing_one {
            return Err(cloudbus_core::Error::new(
                ErrorKind::Unavailable,
                "scripted outage",
            ));
        }
        self.d().settle_batch(items).await
    }
    fn capabilities(&self) -> Capabilities {
        self.d().capabilities()
    }
}

#[async_trait]
impl cloudbus_core::TopicDriver for Scripted<Arc<dyn cloudbus_core::TopicDriver>> {
    async fn send_batch(
        &self,
        batch: &[cloudbus_core::OutgoingMessage],
    ) -> cloudbus_core::Result<cloudbus_core::BatchResults> {
        if self
            .panic_next
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            panic!("scripted panic in send_batch");
        }
        self.d().send_batch(batch).await
    }
    fn capabilities(&self) -> Capabilities {
        self.d().capabilities()
    }
}

/// A broker with topic `t`, subscription `s` (30 s leases) and `n` events published.
async fn with_events(n: usize) -> Bus {
    let bus = MemoryBroker::new().bus();
    bus.ensure_topic("t").await.unwrap();
    bus.ensure_subscription(&SubscriptionSpec::new("t", "s").lease(Duration::from_secs(30)))
        .await
        .unwrap();
    let p = bus.publisher("t").await.unwrap();
    for i in 0..n {
        p.publish(ev(i)).await.unwrap();
    }
    bus
}

/// Issue 12 item 8: deliveries beyond what was asked for were dropped unsettled and
/// stayed locked for their whole lease. The consumer gives them back at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_beyond_the_maximum_are_given_back_at_once() {
    use cloudbus_core::AttributesReader;
    let bus = with_events(3).await;
    let sub = bus.driver().subscription("t", "s").await.unwrap();
    let consumer = cloudbus_core::Consumer::new(Arc::new(Scripted::over(sub, 5)), "s");
    let mut ids = std::collections::HashSet::new();
    for _ in 0..3 {
        let batch = consumer
            .receive_batch(1, Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!(batch.len(), 1, "asked for one");
        ids.insert(batch[0].event().id().to_owned());
        batch[0].ack().await.unwrap();
    }
    assert_eq!(
        ids.len(),
        3,
        "the surplus came back without waiting out its lease"
    );
}

/// Issue 12 item 9: when acking filtered-out messages failed, the whole receive
/// failed and the matching deliveries already received were dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_ack_of_filtered_out_messages_keeps_the_matching_ones() {
    use cloudbus_core::AttributesReader;
    let bus = with_events(4).await;
    let scripted = Arc::new(Scripted::over(
        bus.driver().subscription("t", "s").await.unwrap(),
        0,
    ));
    scripted
        .fail_settle
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let consumer = cloudbus_core::Consumer::with_options(
        scripted.clone(),
        cloudbus_core::ConsumerOptions {
            name: Some("s".into()),
            filter: Some(cloudbus_core::Filter::eq("subject", "1")),
        },
    );
    let batch = consumer
        .receive_batch(10, Duration::from_secs(2))
        .await
        .expect("the matching delivery is handed out");
    assert_eq!(batch.len(), 1);
    assert_eq!(batch[0].event().subject(), Some("1"));
}

/// A transient ack failure is tried again by the worker (it used to leave the event to
/// come back after its lease, handled twice): with the first two settle calls failing,
/// the event is handled once and acked, and no settle error is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_tries_a_transiently_failed_ack_again() {
    let bus = with_events(1).await;
    let scripted = Arc::new(Scripted::over(
        bus.driver().subscription("t", "s").await.unwrap(),
        0,
    ));
    scripted
        .fail_settles
        .store(2, std::sync::atomic::Ordering::SeqCst);
    let consumer = cloudbus_core::Consumer::new(scripted.clone(), "s");
    let handled = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let h = handled.clone();
    let worker = consumer
        .start_worker(
            move |_e: Arc<Event>, _c: HandlerContext| {
                let h = h.clone();
                async move {
                    h.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    Ok::<(), HandlerError>(())
                }
            },
            cloudbus_core::WorkerOptions::default().receive_wait(Duration::from_millis(100)),
        )
        .expect("the router's wiring");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let report = worker.shutdown(Duration::from_secs(5)).await;
    assert_eq!(handled.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(report.acked, 1, "{report:?}");
    assert_eq!(report.settle_errors, 0, "{report:?}");
}

/// Issue 12 item 13: a driver panic in settle_batch left the settler "flushing" for
/// ever, so every later settlement of that consumer hung.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_panic_in_settle_fails_that_call_only() {
    let bus = with_events(2).await;
    let scripted = Arc::new(Scripted::over(
        bus.driver().subscription("t", "s").await.unwrap(),
        0,
    ));
    let consumer = cloudbus_core::Consumer::new(scripted.clone(), "s");
    let batch = consumer
        .receive_batch(2, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(batch.len(), 2);
    scripted
        .panic_next
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let first = tokio::time::timeout(Duration::from_secs(5), batch[0].ack())
        .await
        .expect("the panicking settlement returns");
    assert_eq!(first.unwrap_err().kind(), ErrorKind::Internal);
    tokio::time::timeout(Duration::from_secs(5), batch[1].ack())
        .await
        .expect("later settlements do not hang")
        .unwrap();
}

/// Issue 12 item 13: a driver panic in send_batch ended a publisher lane for good
/// ("publisher is closed" while is_closed() said false).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_driver_panic_in_send_fails_that_batch_only() {
    let bus = with_events(0).await;
    let scripted = Arc::new(Scripted::over(bus.driver().topic("t").await.unwrap(), 0));
    let publisher = cloudbus_core::Publisher::with_options(
        scripted.clone(),
        cloudbus_core::PublisherOptions {
            lanes: 1,
            ..no_retry()
        },
    );
    scripted
        .panic_next
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let err = publisher.publish(ev(1)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Internal);
    assert!(!publisher.is_closed());
    publisher.publish(ev(2)).await.expect("the lane lives on");
}

/// A topic that refuses any call of more than `max` events as too large (a provider
/// that counts bytes differently from the estimate).
struct SmallBatches(Arc<dyn cloudbus_core::TopicDriver>, usize);

#[async_trait]
impl cloudbus_core::TopicDriver for SmallBatches {
    async fn send_batch(
        &self,
        batch: &[cloudbus_core::OutgoingMessage],
    ) -> cloudbus_core::Result<cloudbus_core::BatchResults> {
        if batch.len() > self.1 {
            return Err(cloudbus_core::Error::new(
                ErrorKind::TooLarge,
                "batch too large",
            ));
        }
        self.0.send_batch(batch).await
    }
    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }
}

/// Issue 12 item 14: a batch the provider refused as too large failed every event in
/// it, also those that fit. The publisher splits it and sends the parts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_refused_as_too_large_is_split() {
    let bus = with_events(0).await;
    let publisher = cloudbus_core::Publisher::new(Arc::new(SmallBatches(
        bus.driver().topic("t").await.unwrap(),
        3,
    )));
    let results = publisher.publish_batch((0..10).map(ev).collect()).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    let consumer = bus.consumer("t", "s").await.unwrap();
    let got = consumer
        .receive_batch(20, Duration::from_secs(2))
        .await
        .unwrap();
    assert_eq!(got.len(), 10);
}

/// A log whose cursors expire: every cursor can be read `reads_per_cursor` times,
/// then reads fail with LeaseExpired (a Kinesis shard iterator is valid 5 minutes).
struct ExpiringCursors {
    inner: Arc<dyn cloudbus_core::StreamDriver>,
    reads: std::sync::Mutex<std::collections::HashMap<String, usize>>,
    reads_per_cursor: usize,
}

#[async_trait]
impl cloudbus_core::StreamDriver for ExpiringCursors {
    async fn partitions(&self) -> cloudbus_core::Result<Vec<cloudbus_core::PartitionInfo>> {
        self.inner.partitions().await
    }
    async fn cursor(&self, partition: &str, at: &StartPosition) -> cloudbus_core::Result<String> {
        // Every cursor handed out is new, as a shard iterator is.
        let inner = self.inner.cursor(partition, at).await?;
        Ok(format!("{inner}#{}", fastrand::u64(..)))
    }
    async fn read(
        &self,
        cursor: &str,
        max: usize,
    ) -> cloudbus_core::Result<cloudbus_core::ReadBatch> {
        let inner_cursor = cursor.split('#').next().unwrap_or(cursor);
        let used = {
            let mut reads = self.reads.lock().unwrap();
            let n = reads.entry(cursor.to_owned()).or_default();
            *n += 1;
            *n
        };
        if used > self.reads_per_cursor {
            return Err(cloudbus_core::Error::new(
                ErrorKind::LeaseExpired,
                "Iterator expired",
            ));
        }
        self.inner.read(inner_cursor, max).await
    }
}

/// A one-partition log `name` with `n` events, read through expiring cursors.
async fn log_with(n: usize, name: &str) -> (Bus, Arc<dyn cloudbus_core::StreamDriver>) {
    let broker = MemoryBroker::new();
    broker.ensure_log(name, 1).unwrap();
    let bus = broker.bus();
    let p = bus.publisher(name).await.unwrap();
    for i in 0..n {
        p.publish(ev(i)).await.unwrap();
    }
    let driver = bus.driver().stream(name).await.unwrap();
    (bus, driver)
}

fn subjects_into(
    seen: Arc<std::sync::Mutex<Vec<String>>>,
) -> impl Fn(Arc<Event>, HandlerContext) -> std::future::Ready<Result<(), HandlerError>> {
    move |e: Arc<Event>, _c: HandlerContext| {
        use cloudbus_core::AttributesReader;
        seen.lock()
            .unwrap()
            .push(e.subject().unwrap_or("").to_owned());
        std::future::ready(Ok(()))
    }
}

/// Issue 12 item 5: an expired cursor stalled the stream consumer for good (the dead
/// cursor was reused on every poll). It reopens the partition where it got to.
#[tokio::test]
async fn an_expired_stream_cursor_is_reopened_where_the_consumer_got_to() {
    let (_bus, log) = log_with(10, "expiring").await;
    let driver = Arc::new(ExpiringCursors {
        inner: log,
        reads: Default::default(),
        reads_per_cursor: 1,
    });
    let seen: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let handler = subjects_into(seen.clone());
    let mut reader = cloudbus_core::StreamConsumer::new(driver, "g")
        .start_at(StartPosition::Earliest)
        .batch_size(3);
    for _ in 0..6 {
        reader
            .poll(&handler)
            .await
            .expect("no stall on an expired cursor");
    }
    let got = seen.lock().unwrap().clone();
    let want: Vec<String> = (0..10).map(|i| i.to_string()).collect();
    assert_eq!(got, want, "each record once, in order");
}

/// Issue 12 item 18: a shutdown cancelled `poll` in the middle of a batch, so the
/// records handled before it lost their checkpoint and were handled again. Now the
/// record in hand finishes, is checkpointed, and the next reader starts after it.
#[tokio::test]
async fn stream_shutdown_checkpoints_what_was_handled() {
    let (_bus, log) = log_with(10, "stopping").await;
    let store = Arc::new(MemoryCheckpointStore::new());
    let seen: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let stop_tx = std::sync::Mutex::new(Some(stop_tx));
    let s2 = seen.clone();
    // The handler asks for shutdown while it handles record 3, then takes its time.
    let handler = move |e: Arc<Event>, _c: HandlerContext| {
        use cloudbus_core::AttributesReader;
        let subject = e.subject().unwrap_or("").to_owned();
        s2.lock().unwrap().push(subject.clone());
        if subject == "3"
            && let Some(tx) = stop_tx.lock().unwrap().take()
        {
            let _ = tx.send(());
        }
        async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            Ok::<(), HandlerError>(())
        }
    };
    let mut reader = cloudbus_core::StreamConsumer::new(log.clone(), "g")
        .checkpoints(store.clone())
        .start_at(StartPosition::Earliest);
    reader
        .run(&handler, Duration::from_millis(10), async {
            let _ = stop_rx.await;
        })
        .await
        .unwrap();
    assert_eq!(seen.lock().unwrap().clone(), ["0", "1", "2", "3"]);
    let rest: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let mut next = cloudbus_core::StreamConsumer::new(log, "g")
        .checkpoints(store)
        .start_at(StartPosition::Earliest);
    next.catch_up(&subjects_into(rest.clone())).await.unwrap();
    let want: Vec<String> = (4..10).map(|i| i.to_string()).collect();
    assert_eq!(
        rest.lock().unwrap().clone(),
        want,
        "nothing handled twice, nothing skipped"
    );
}

/// A subscription whose receives fail while `down` is set, as a broker away.
struct Outage(
    Arc<dyn cloudbus_core::SubscriptionDriver>,
    Arc<std::sync::atomic::AtomicBool>,
);

#[async_trait]
impl cloudbus_core::SubscriptionDriver for Outage {
    async fn receive_batch(
        &self,
        max: usize,
        wait: Duration,
    ) -> cloudbus_core::Result<Vec<cloudbus_core::ReceivedMessage>> {
        if self.1.load(std::sync::atomic::Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(5)).await;
            return Err(cloudbus_core::Error::new(
                ErrorKind::Unavailable,
                "broker unreachable (test outage)",
            ));
        }
        self.0.receive_batch(max, wait).await
    }
    async fn settle_batch(
        &self,
        items: &[(cloudbus_core::AckToken, cloudbus_core::Settlement)],
    ) -> cloudbus_core::Result<cloudbus_core::BatchResults> {
        self.0.settle_batch(items).await
    }
    fn capabilities(&self) -> Capabilities {
        self.0.capabilities()
    }
}

/// Issue 17: `Worker::health` and `Publisher::health` for probes. A worker is ready
/// while it receives, not ready with the last error while the broker is away, ready
/// again when it comes back, and not live once shut down; it counts what it holds. A
/// publisher is live until closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_and_publisher_health_follow_the_broker() {
    let bus = bus_with("health", "s").await;
    let down = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let consumer = cloudbus_core::Consumer::new(
        Arc::new(Outage(
            bus.driver().subscription("health", "s").await.unwrap(),
            down.clone(),
        )),
        "s",
    );
    let release = Arc::new(tokio::sync::Notify::new());
    let gate = release.clone();
    let worker = consumer
        .start_worker(
            move |_e: Arc<Event>, _c: HandlerContext| {
                let gate = gate.clone();
                async move {
                    gate.notified().await;
                    Ok::<(), HandlerError>(())
                }
            },
            cloudbus_core::WorkerOptions {
                retry: cloudbus_core::RetryPolicy::default()
                    .initial_backoff(Duration::from_millis(20))
                    .max_backoff(Duration::from_millis(50)),
                ..Default::default()
            },
        )
        .expect("the router's wiring");
    let ready = wait_for(&worker, "ready", |h| {
        h.is_ready() && h.last_receive.is_some()
    })
    .await;
    assert!(ready.is_live() && ready.last_error.is_none(), "{ready:?}");

    // Two events held by the handler: in flight.
    let publisher = bus.publisher("health").await.unwrap();
    publisher.publish(ev(1)).await.unwrap();
    publisher.publish(ev(2)).await.unwrap();
    assert!(publisher.health().is_ready());
    assert!(publisher.health().last_send.is_some());
    wait_for(&worker, "two in flight", |h| h.in_flight == 2).await;

    // The broker goes away: live, not ready, the error kept.
    down.store(true, std::sync::atomic::Ordering::SeqCst);
    let away = wait_for(&worker, "not ready", |h| {
        !h.is_ready() && h.consecutive_failures >= 2
    })
    .await;
    assert!(
        away.is_live() && !away.receiving && !away.connected,
        "{away:?}"
    );
    let error = away.last_error.clone().expect("the last error");
    assert_eq!(error.kind, ErrorKind::Unavailable);
    assert!(error.message.contains("test outage"), "{error:?}");

    // Back: ready again; the handlers finish and nothing is held.
    down.store(false, std::sync::atomic::Ordering::SeqCst);
    wait_for(&worker, "ready again", |h| {
        h.is_ready() && h.consecutive_failures == 0
    })
    .await;
    release.notify_waiters();
    release.notify_one();
    release.notify_one();
    wait_for(&worker, "nothing held", |h| h.in_flight == 0).await;
    let report = worker.shutdown(Duration::from_secs(5)).await;
    assert_eq!(report.acked, 2);

    publisher.close().await.unwrap();
    let closed = publisher.health();
    assert!(!closed.is_live() && !closed.is_ready(), "{closed:?}");
}

/// Polls `worker.health()` until `ok`, for up to 10 s.
async fn wait_for(
    worker: &cloudbus_core::Worker,
    what: &str,
    ok: impl Fn(&cloudbus_core::WorkerHealth) -> bool,
) -> cloudbus_core::WorkerHealth {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let health = worker.health();
        if ok(&health) {
            return health;
        }
        assert!(std::time::Instant::now() < deadline, "{what}: {health:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The dead-letter polyfill's redrive of everything ends when a letter it sent back
/// is dead-lettered again at once (a consumer that refuses it every time), and the
/// letter stays dead-lettered: it read the dead-letter topic until it was empty, so it
/// went round for ever, as Service Bus's redrive did.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn polyfill_redrive_ends_when_a_letter_comes_back() {
    let bus = polyfill_bus().await;
    let consumer = polyfill_consumer(&bus).await;
    let worker = consumer
        .start_worker(
            |_e: Arc<Event>, _c: HandlerContext| async {
                Err::<(), _>(HandlerError::reject("still poison"))
            },
            cloudbus_core::WorkerOptions::default(),
        )
        .expect("the router's wiring");
    let p = bus.publisher("orders").await.unwrap();
    p.publish(
        EventBuilder::new("com.example.poison", "/t")
            .build()
            .unwrap(),
    )
    .await
    .unwrap();
    let dlq = polyfill_dead_letters(&bus).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while worker.stats().dead_lettered < 1 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let moved = tokio::time::timeout(Duration::from_secs(20), dlq.redrive_all())
        .await
        .expect("redrive_all went round for ever")
        .unwrap();
    assert!(moved >= 1, "redrove {moved}");
    // The redrive may end before the worker refuses the letter again: wait for it.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut letters = dlq.peek(10).await.unwrap();
    while letters.is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        letters = dlq.peek(10).await.unwrap();
    }
    let _ = worker.shutdown(Duration::from_secs(2)).await;
    assert_eq!(
        letters.len(),
        1,
        "the refused letter stays dead-lettered: {letters:?}"
    );
}
