//! OpenTelemetry traces of a two-hop saga (feature `otel`): an order is placed,
//! billing handles it and requests a payment, shipping handles that. Every span
//! (create, send, receive, process, settle) follows the messaging semantic
//! conventions, and the whole saga is one trace.
//!
//! With `OTEL_EXPORTER_OTLP_ENDPOINT` set (say `http://127.0.0.1:4318`), the spans go
//! to that OTLP/HTTP collector (protobuf, `/v1/traces`); otherwise they are printed
//! as a tree.
//!
//! ```text
//! cargo run -p cloudbus-telemetry-examples --example otel_export
//! OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318 cargo run -p cloudbus-telemetry-examples --example otel_export
//! ```

use std::sync::Arc;
use std::time::Duration;

use cloudbus::{
    Event, EventBuilder, HandlerContext, HandlerError, SubscriptionSpec, WorkerOptions,
};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

/// Where the spans go.
enum Export {
    Otlp(String),
    Print(InMemorySpanExporter),
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let resource = Resource::builder()
        .with_service_name("cloudbus-otel-example")
        .build();
    // The OTLP exporter's HTTP client is a blocking one, made before the runtime.
    let (provider, export) = match std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
        Ok(endpoint) if !endpoint.trim().is_empty() => {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .build()?;
            let provider = SdkTracerProvider::builder()
                .with_resource(resource)
                .with_batch_exporter(exporter)
                .build();
            (provider, Export::Otlp(endpoint))
        }
        _ => {
            let exporter = InMemorySpanExporter::default();
            let provider = SdkTracerProvider::builder()
                .with_resource(resource)
                .with_simple_exporter(exporter.clone())
                .build();
            (provider, Export::Print(exporter))
        }
    };
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("otel_export")));
    tracing::subscriber::set_global_default(subscriber)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let trace_id = runtime.block_on(saga())?;
    drop(runtime);

    provider.force_flush()?;
    match export {
        Export::Otlp(endpoint) => println!("exported the spans of trace {trace_id} to {endpoint}"),
        Export::Print(exporter) => print_tree(&exporter.get_finished_spans()?, &trace_id),
    }
    provider.shutdown()?;
    Ok(())
}

/// Runs the saga on the memory broker; returns its trace id.
async fn saga() -> Result<String, Box<dyn std::error::Error>> {
    let bus = cloudbus::connect("mem://").await?;
    for (topic, sub) in [("orders", "billing"), ("payments", "shipping")] {
        bus.ensure_topic(topic).await?;
        bus.ensure_subscription(&SubscriptionSpec::new(topic, sub))
            .await?;
    }
    let orders = bus.publisher("orders").await?;
    let payments = bus.publisher("payments").await?;
    let billing = bus.consumer("orders", "billing").await?.start_worker(
        move |order: Arc<Event>, _ctx: HandlerContext| {
            let payments = payments.clone();
            async move {
                let payment = EventBuilder::new("com.example.payment.requested", "/billing")
                    .caused_by(&order)
                    .build()?;
                payments.publish(payment).await?;
                Ok::<(), HandlerError>(())
            }
        },
        WorkerOptions::default(),
    )?;
    let (shipped_tx, mut shipped) = tokio::sync::mpsc::unbounded_channel();
    let shipping = bus.consumer("payments", "shipping").await?.start_worker(
        move |payment: Arc<Event>, _ctx: HandlerContext| {
            let shipped_tx = shipped_tx.clone();
            async move {
                let _ = shipped_tx.send(payment);
                Ok::<(), HandlerError>(())
            }
        },
        WorkerOptions::default(),
    )?;

    // The application's span: the root of the saga's trace.
    let root = tracing::info_span!("place order");
    let trace_id = root.context().span().span_context().trace_id().to_string();
    let order = {
        let _entered = root.enter();
        EventBuilder::new("com.example.order.placed", "/shop").build()?
    };
    orders.publish(order).await?;
    drop(root);
    tokio::time::timeout(Duration::from_secs(10), shipped.recv())
        .await?
        .ok_or("shipping stopped")?;
    billing.shutdown(Duration::from_secs(5)).await;
    shipping.shutdown(Duration::from_secs(5)).await;
    Ok(trace_id)
}

/// Prints the spans of `trace_id` as a tree (children under their parents) and the
/// others (send, receive: roots of their own, linked to the events) after it.
fn print_tree(spans: &[SpanData], trace_id: &str) {
    let in_trace: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.span_context.trace_id().to_string() == trace_id)
        .collect();
    println!("trace {trace_id}: {} spans", in_trace.len());
    fn print_children(all: &[&SpanData], parent: opentelemetry::trace::SpanId, depth: usize) {
        let mut children: Vec<&&SpanData> =
            all.iter().filter(|s| s.parent_span_id == parent).collect();
        children.sort_by_key(|s| s.start_time);
        for span in children {
            println!(
                "{}{} [{:?}] span {}",
                "  ".repeat(depth + 1),
                span.name,
                span.span_kind,
                span.span_context.span_id()
            );
            print_children(all, span.span_context.span_id(), depth + 1);
        }
    }
    print_children(&in_trace, opentelemetry::trace::SpanId::INVALID, 0);
    let linked = spans.iter().filter(|s| !s.links.is_empty()).filter(|s| {
        s.links
            .iter()
            .any(|l| l.span_context.trace_id().to_string() == trace_id)
    });
    for span in linked {
        println!(
            "  {} [{:?}] linked to {} span(s) of the trace",
            span.name,
            span.span_kind,
            span.links.len()
        );
    }
}
