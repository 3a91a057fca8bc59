//! The `process` span of a delivery carries the partition and offset its driver
//! reported (`messaging.destination.partition.id`, `messaging.kafka.offset`), and the
//! handler is told them. A test binary of its own: `tracing` caches per call site
//! whether any subscriber wants a span, and a test beside it in the same process
//! that hits the call site first, with no subscriber, would hide the span.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cloudbus_core::Consumer;
use cloudbus_core::worker::{HandlerContext, HandlerError, WorkerOptions};
use cloudbus_driver::{
    AckToken, BatchResults, Capabilities, EventBuilder, ReceivedMessage, Settlement,
    SubscriptionDriver,
};

/// Hands out, once, one event read at offset 42 of partition "3" (as a Kafka driver
/// does), and acks every settlement.
#[derive(Default)]
struct PartitionedOnce {
    handed_out: AtomicBool,
}

#[async_trait]
impl SubscriptionDriver for PartitionedOnce {
    async fn receive_batch(
        &self,
        _max: usize,
        wait: Duration,
    ) -> cloudbus_driver::Result<Vec<ReceivedMessage>> {
        if self.handed_out.swap(true, Ordering::AcqRel) {
            tokio::time::sleep(wait).await;
            return Ok(Vec::new());
        }
        Ok(vec![ReceivedMessage {
            event: Ok(Arc::new(
                EventBuilder::new("com.example.step", "/test").build()?,
            )),
            token: AckToken::Number(1),
            attempt: 1,
            lease: None,
            published_at: None,
            ordering_key: None,
            size: 100,
            partition: Some("3".into()),
            offset: Some(42),
        }])
    }
    async fn settle_batch(
        &self,
        items: &[(AckToken, Settlement)],
    ) -> cloudbus_driver::Result<BatchResults> {
        Ok(items.iter().map(|_| Ok(())).collect())
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
}

/// A span field's value, as a `tracing` subscriber is handed it.
#[derive(Clone, Debug, PartialEq)]
enum FieldValue {
    Str(String),
    I64(i64),
    Other(String),
}

/// Keeps the values a visitor is shown, by field name.
struct FieldValues<'a>(&'a mut BTreeMap<String, FieldValue>);

impl tracing::field::Visit for FieldValues<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.0
            .insert(field.name().to_owned(), FieldValue::Str(value.to_owned()));
    }
    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.0
            .insert(field.name().to_owned(), FieldValue::I64(value));
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.0.insert(
            field.name().to_owned(),
            FieldValue::Other(format!("{value:?}")),
        );
    }
}

/// A `tracing` subscriber that keeps the fields of every `cloudbus.handle` span (the
/// `process` span), those given at creation and those recorded later.
#[derive(Default)]
struct HandleSpans {
    next_id: AtomicU64,
    spans: Arc<Mutex<HashMap<u64, BTreeMap<String, FieldValue>>>>,
}

impl tracing::Subscriber for HandleSpans {
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, span: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        if span.metadata().name() == "cloudbus.handle" {
            let mut fields = BTreeMap::new();
            span.record(&mut FieldValues(&mut fields));
            self.spans.lock().expect("lock").insert(id, fields);
        }
        tracing::span::Id::from_u64(id)
    }
    fn record(&self, span: &tracing::span::Id, values: &tracing::span::Record<'_>) {
        if let Some(fields) = self.spans.lock().expect("lock").get_mut(&span.into_u64()) {
            values.record(&mut FieldValues(fields));
        }
    }
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, _: &tracing::Event<'_>) {}
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// A delivery that the driver reports with its partition and offset (Kafka) is
/// processed in a span that carries them as the OpenTelemetry messaging conventions
/// name them (`messaging.destination.partition.id`, a string;
/// `messaging.kafka.offset`, an int), and its handler is told them.
#[tokio::test]
async fn the_process_span_reports_the_partition_and_offset_of_a_delivery() {
    let subscriber = HandleSpans::default();
    let spans = subscriber.spans.clone();
    // The worker's tasks run on this thread (a current-thread runtime), so the
    // thread's default subscriber sees their spans.
    let _guard = tracing::subscriber::set_default(subscriber);
    let seen = Arc::new(Mutex::new(Vec::new()));
    let consumer = Consumer::new(Arc::new(PartitionedOnce::default()), "partitioned");
    let worker = consumer
        .start_worker(
            {
                let seen = seen.clone();
                move |_event: Arc<cloudbus_driver::Event>, ctx: HandlerContext| {
                    let seen = seen.clone();
                    async move {
                        seen.lock()
                            .expect("lock")
                            .push((ctx.partition().map(str::to_owned), ctx.offset()));
                        Ok::<(), HandlerError>(())
                    }
                }
            },
            WorkerOptions::default().receive_wait(Duration::from_millis(10)),
        )
        .expect("the handler's wiring");
    let deadline = Instant::now() + Duration::from_secs(5);
    while worker.stats().acked < 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let report = worker.shutdown(Duration::from_secs(1)).await;
    assert_eq!(report.acked, 1, "{report:?}");
    assert_eq!(
        *seen.lock().expect("lock"),
        [(Some("3".to_owned()), Some(42))]
    );
    let spans = spans.lock().expect("lock");
    let handled: Vec<_> = spans.values().collect();
    assert_eq!(handled.len(), 1, "{handled:?}");
    let fields = handled[0];
    assert_eq!(
        fields.get("messaging.destination.partition.id"),
        Some(&FieldValue::Str("3".into())),
        "{fields:?}"
    );
    assert_eq!(
        fields.get("messaging.kafka.offset"),
        Some(&FieldValue::I64(42)),
        "{fields:?}"
    );
}
