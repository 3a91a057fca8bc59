//! A service's operations endpoints: `/metrics` for Prometheus (through
//! `metrics-exporter-prometheus`, with histogram buckets so that the lag and handler
//! time quantiles of `deploy/` work) and `/health/live` and `/health/ready` for the
//! probes of an orchestrator, from `Worker::health` and `Publisher::health`.
//!
//! An order consumer runs on the embedded broker (or `CLOUDBUS_URL`) while a producer
//! publishes an order every 100 ms; one order in ten is malformed and dead-lettered, so
//! `dlq_messages_total` and `event_processing_errors_total` move.
//!
//! Run: `cargo run -p cloudbus-telemetry-examples --example metrics_server` and open http://127.0.0.1:9898/metrics.
//! `METRICS_ADDR` sets the address (port 0: any free one; the first line printed
//! names it), `--serve-for SECONDS` stops it after that long.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use cloudbus::{
    Event, EventBuilder, EventExt, HandlerContext, HandlerError, Publisher, SubscriptionSpec,
    Worker, WorkerOptions,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// What the endpoints read.
#[derive(Clone)]
struct Ops {
    prometheus: PrometheusHandle,
    worker: Arc<Worker>,
    publisher: Publisher,
}

/// Buckets in seconds for both histograms: from a millisecond (handler time) to an
/// hour (lag of a consumer that was down).
const BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let serve_for = std::env::args()
        .skip_while(|a| a != "--serve-for")
        .nth(1)
        .map(|s| s.parse::<u64>().map(Duration::from_secs))
        .transpose()?;
    let addr: SocketAddr = std::env::var("METRICS_ADDR")
        .unwrap_or_else(|_| "127.0.0.1:9898".into())
        .parse()?;

    // The recorder first: metric handles bind to the recorder installed when they are
    // made.
    let mut exporter = PrometheusBuilder::new();
    for histogram in cloudbus::telemetry::names::HISTOGRAMS {
        exporter = exporter.set_buckets_for_metric(Matcher::Full((*histogram).into()), BUCKETS)?;
    }
    let prometheus = exporter.install_recorder()?;
    // Event types beyond this many count as "other" (an id in a type cannot explode
    // the number of series).
    cloudbus::telemetry::set_max_label_values(100);

    let url = std::env::var("CLOUDBUS_URL").unwrap_or_else(|_| "mem://ops".into());
    let bus = cloudbus::connect(&url).await?;
    bus.ensure_topic("orders").await?;
    bus.ensure_subscription(&SubscriptionSpec::new("orders", "billing"))
        .await?;
    let publisher = bus.publisher("orders").await?;
    let consumer = bus.consumer("orders", "billing").await?;
    let worker = consumer.start_worker(
        |event: Arc<Event>, _ctx: HandlerContext| async move {
            let order: serde_json::Value = event
                .data_json()
                .map_err(|e| HandlerError::reject(format!("malformed order: {e}")))?;
            if order["total_cents"].as_u64().is_none() {
                return Err(HandlerError::reject("malformed order: no total_cents"));
            }
            Ok(())
        },
        WorkerOptions::default(),
    )?;
    let ops = Ops {
        prometheus,
        worker: Arc::new(worker),
        publisher: publisher.clone(),
    };

    let producer = tokio::spawn(async move {
        for n in 0u64.. {
            let data = if n % 10 == 9 {
                serde_json::json!({ "order": n })
            } else {
                serde_json::json!({ "order": n, "total_cents": 100 + n })
            };
            let event = EventBuilder::new("com.example.order.created", "/shop")
                .json(&data)
                .and_then(|b| b.build());
            match event {
                Ok(event) => {
                    if let Err(e) = publisher.publish(event).await {
                        eprintln!("publish failed: {e}");
                    }
                }
                Err(e) => eprintln!("could not build the event: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });

    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .with_state(ops.clone());
    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("listening on http://{}", listener.local_addr()?);
    let server = axum::serve(listener, app);
    match serve_for {
        Some(limit) => {
            let _ = tokio::time::timeout(limit, server).await;
        }
        None => server.await?,
    }
    producer.abort();
    ops.publisher.close().await?;
    if let Ok(worker) = Arc::try_unwrap(ops.worker) {
        let report = worker.shutdown(Duration::from_secs(5)).await;
        println!(
            "handled: {} acked, {} dead-lettered",
            report.acked, report.dead_lettered
        );
    }
    Ok(())
}

/// The Prometheus text format.
async fn metrics(State(ops): State<Ops>) -> impl IntoResponse {
    ops.prometheus.render()
}

/// 200 while the worker and the publisher have not stopped; 503 with what stopped.
async fn live(State(ops): State<Ops>) -> impl IntoResponse {
    let (worker, publisher) = (ops.worker.health(), ops.publisher.health());
    let status = if worker.is_live() && publisher.is_live() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(serde_json::json!({
            "worker": { "running": worker.running },
            "publisher": { "open": publisher.open },
        })),
    )
}

/// 200 when both reach the broker; 503 with the last error otherwise.
async fn ready(State(ops): State<Ops>) -> impl IntoResponse {
    let (worker, publisher) = (ops.worker.health(), ops.publisher.health());
    let status = if worker.is_ready() && publisher.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let error = |e: &Option<cloudbus::LastError>| {
        e.as_ref().map(
            |e| serde_json::json!({ "kind": e.kind.to_string(), "message": e.message, "at": e.at }),
        )
    };
    (
        status,
        Json(serde_json::json!({
            "worker": {
                "ready": worker.is_ready(),
                "receiving": worker.receiving,
                "connected": worker.connected,
                "in_flight": worker.in_flight,
                "last_receive": worker.last_receive,
                "last_error": error(&worker.last_error),
            },
            "publisher": {
                "ready": publisher.is_ready(),
                "connected": publisher.connected,
                "pending": publisher.pending,
                "last_send": publisher.last_send,
                "last_error": error(&publisher.last_error),
            },
        })),
    )
}
