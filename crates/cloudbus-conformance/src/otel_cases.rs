//! The OpenTelemetry case (features `conformance` and `otel`): a two-hop saga's spans,
//! recorded by `opentelemetry_sdk`'s in-memory exporter, form one trace, with each
//! consumer's `process` span a child of the `create` span of the event it handles and
//! the spans named and attributed after the messaging semantic conventions.
//!
//! A provider's tests call [`saga_is_one_trace`] with their [`Harness`]. The case
//! installs the process-wide `tracing` subscriber ([`span_recorder`]), so it belongs
//! in a test binary of its own.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use opentelemetry::trace::{SpanKind, TraceId, TracerProvider as _};
use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing_subscriber::layer::SubscriberExt;

use crate::harness::{Harness, Outcome};
use cloudbus_core::driver::SubscriptionSpec;
use cloudbus_core::error::{Error, ErrorKind, Result};
use cloudbus_core::event::{AttributesReader, Event, EventBuilder};
use cloudbus_core::worker::{HandlerContext, HandlerError, WorkerOptions};

/// The exporter behind the process-wide subscriber, and its provider (kept alive).
struct Recorder {
    exporter: InMemorySpanExporter,
    _provider: SdkTracerProvider,
}

static RECORDER: OnceLock<std::result::Result<Recorder, String>> = OnceLock::new();

/// The in-memory exporter every span of this process is exported to, installing on
/// first use a global `tracing` subscriber with the `tracing-opentelemetry` layer
/// (a simple span processor: each span is exported when it ends). Fails when another
/// global subscriber was installed first.
pub fn span_recorder() -> Result<&'static InMemorySpanExporter> {
    let recorder = RECORDER.get_or_init(|| {
        let exporter = InMemorySpanExporter::default();
        let provider = SdkTracerProvider::builder()
            .with_simple_exporter(exporter.clone())
            .build();
        let subscriber = tracing_subscriber::registry().with(
            tracing_opentelemetry::layer().with_tracer(provider.tracer("cloudbus-conformance")),
        );
        tracing::subscriber::set_global_default(subscriber)
            .map_err(|e| format!("a global tracing subscriber was installed already: {e}"))?;
        Ok(Recorder {
            exporter,
            _provider: provider,
        })
    });
    match recorder {
        Ok(r) => Ok(&r.exporter),
        Err(e) => Err(Error::new(ErrorKind::Internal, e.clone())),
    }
}

/// A string attribute of a span.
fn attribute<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv: &&KeyValue| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

fn has(span: &SpanData, key: &str, want: &str) -> bool {
    attribute(span, key).is_some_and(|v| v.as_str() == want)
}

/// The finished spans of `trace`.
fn spans_of(exporter: &InMemorySpanExporter, trace: TraceId) -> Result<Vec<SpanData>> {
    let all = exporter
        .get_finished_spans()
        .map_err(|e| Error::new(ErrorKind::Internal, format!("in-memory exporter: {e}")))?;
    Ok(all
        .into_iter()
        .filter(|s| s.span_context.trace_id() == trace)
        .collect())
}

/// A saga of two hops (order placed → billing handles it and requests a payment →
/// shipping handles that) is one trace: the `create` span of the order is a child of
/// the application's span, billing's `process` span a child of the order's `create`,
/// the payment's `create` a child of billing's `process`, and shipping's `process` a
/// child of the payment's `create`. The spans carry `messaging.system`,
/// `messaging.destination.name`, `messaging.operation.type` and the message id, the
/// send and receive spans are linked to the events they carried, and the settle span
/// (`ack`) follows each process span.
pub async fn saga_is_one_trace(h: &dyn Harness) -> Result<Outcome> {
    let exporter = span_recorder()?;
    let bus = h.bus().await?;
    let system = cloudbus_core::spans::messaging_system(bus.scheme());
    check!(
        system != "cloudbus",
        "the scheme {:?} has no messaging.system",
        bus.scheme()
    );
    let (orders, payments) = (h.unique("otel-orders"), h.unique("otel-payments"));
    let (billing, shipping) = (h.unique("otel-billing"), h.unique("otel-shipping"));
    for (topic, sub) in [(&orders, &billing), (&payments, &shipping)] {
        bus.ensure_topic(topic).await?;
        bus.ensure_subscription(&SubscriptionSpec::new(topic.as_str(), sub.as_str()))
            .await?;
    }
    let order_publisher = bus.publisher(&orders).await?;
    let payment_publisher = bus.publisher(&payments).await?;

    // Billing: handles the order, requests the payment (inside the handling).
    let billing_worker = bus.consumer(&orders, &billing).await?.start_worker(
        move |order: Arc<Event>, _ctx: HandlerContext| {
            let publisher = payment_publisher.clone();
            async move {
                let payment = EventBuilder::new("com.example.payment.requested", "/billing")
                    .caused_by(&order)
                    .build()
                    .map_err(HandlerError::reject)?;
                publisher
                    .publish(payment)
                    .await
                    .map_err(HandlerError::retry)
            }
        },
        WorkerOptions::default(),
    )?;
    let (shipped_tx, mut shipped) = tokio::sync::mpsc::unbounded_channel::<Arc<Event>>();
    let shipping_worker = bus.consumer(&payments, &shipping).await?.start_worker(
        move |payment: Arc<Event>, _ctx: HandlerContext| {
            let shipped_tx = shipped_tx.clone();
            async move {
                let _ = shipped_tx.send(payment);
                Ok::<(), HandlerError>(())
            }
        },
        WorkerOptions::default(),
    )?;

    // The application's own span, the root of the saga's trace.
    let root = tracing::info_span!("place order");
    let root_trace = {
        use opentelemetry::trace::TraceContextExt;
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        root.context().span().span_context().trace_id()
    };
    check!(
        root_trace != TraceId::INVALID,
        "the root span has no OpenTelemetry context"
    );
    let order = {
        let _entered = root.enter();
        EventBuilder::new("com.example.order.placed", "/shop").build()?
    };
    let order_id = order.id().to_owned();
    order_publisher.publish(order).await?;
    drop(root);

    let payment = tokio::time::timeout(h.patience() * 2, shipped.recv())
        .await
        .map_err(|_| Error::new(ErrorKind::Timeout, "the payment never reached shipping"))?
        .ok_or_else(|| Error::new(ErrorKind::Internal, "shipping stopped"))?;
    billing_worker.shutdown(Duration::from_secs(5)).await;
    shipping_worker.shutdown(Duration::from_secs(5)).await;

    // The simple processor exports each span as it ends; the workers have shut down,
    // so every handling and its settlement is over.
    let mut spans = spans_of(exporter, root_trace)?;
    let until = Instant::now() + h.patience();
    while spans
        .iter()
        .filter(|s| has(s, "messaging.operation.type", "process"))
        .count()
        < 2
        && Instant::now() < until
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
        spans = spans_of(exporter, root_trace)?;
    }
    let names: Vec<String> = spans.iter().map(|s| s.name.to_string()).collect();
    let find = |op: &str, id: &str| {
        spans
            .iter()
            .find(|s| has(s, "messaging.operation.type", op) && has(s, "messaging.message.id", id))
    };
    let order_created = find("create", &order_id);
    let billed = find("process", &order_id);
    let payment_created = find("create", payment.id());
    let shipped = find("process", payment.id());
    let (Some(order_created), Some(billed), Some(payment_created), Some(shipped)) =
        (order_created, billed, payment_created, shipped)
    else {
        check!(false, "the trace lacks a create or process span: {names:?}");
        return Ok(Outcome::Passed);
    };
    check!(
        order_created.span_kind == SpanKind::Producer
            && billed.span_kind == SpanKind::Consumer
            && shipped.span_kind == SpanKind::Consumer,
        "span kinds: create {:?}, process {:?}",
        order_created.span_kind,
        billed.span_kind
    );
    check!(
        billed.parent_span_id == order_created.span_context.span_id(),
        "billing's process span is not a child of the order's create span"
    );
    check!(
        payment_created.parent_span_id == billed.span_context.span_id(),
        "the payment's create span is not a child of billing's process span"
    );
    check!(
        shipped.parent_span_id == payment_created.span_context.span_id(),
        "shipping's process span is not a child of the payment's create span"
    );
    check!(
        payment.extension("traceparent").is_some_and(|tp| tp
            .to_string()
            .contains(&payment_created.span_context.span_id().to_string())),
        "the payment's traceparent does not name its create span"
    );
    check!(
        billed.name == format!("process {billing}")
            && shipped.name == format!("process {shipping}"),
        "process span names: {:?}, {:?}",
        billed.name,
        shipped.name
    );
    for (span, topic) in [(billed, &orders), (shipped, &payments)] {
        check!(
            has(span, "messaging.system", system)
                && has(span, "messaging.destination.name", topic)
                && has(span, "messaging.operation.name", "process"),
            "process span attributes: {:?}",
            span.attributes
        );
    }
    let sends: Vec<&SpanData> = spans
        .iter()
        .filter(|s| has(s, "messaging.operation.type", "send"))
        .collect();
    let linked_to = |span: &SpanData, created: &SpanData| {
        span.links
            .iter()
            .any(|l| l.span_context.span_id() == created.span_context.span_id())
    };
    // The send spans are roots of their own (a lane's batch), linked to the events.
    let all = exporter
        .get_finished_spans()
        .map_err(|e| Error::new(ErrorKind::Internal, format!("in-memory exporter: {e}")))?;
    check!(
        all.iter()
            .any(|s| has(s, "messaging.operation.type", "send")
                && has(s, "messaging.destination.name", &orders)
                && has(s, "messaging.system", system)
                && linked_to(s, order_created)),
        "no send span on {orders} linked to the order's create span ({} sends in the trace)",
        sends.len()
    );
    check!(
        all.iter()
            .any(|s| has(s, "messaging.operation.type", "settle")
                && has(s, "messaging.operation.name", "ack")
                && has(s, "messaging.destination.subscription.name", &billing)),
        "no ack span for {billing}"
    );
    Ok(Outcome::Passed)
}
