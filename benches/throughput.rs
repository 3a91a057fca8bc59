//! Throughput of the memory broker end to end (publish, receive, ack) with 1 and 4
//! consumers and through the worker, against the baselines measured in the same run:
//! a tokio mpsc channel moving the same Event values, and CloudEvents structured JSON
//! encode and decode. Prints one line per scenario:
//! `scenario=NAME events=N secs=S events_per_sec=R peak_rss_mb=M`.
//!
//! Every scenario runs 3 rounds; the printed line is the median round. Two more
//! scenarios split the end-to-end path into its halves (publish only; receive and ack
//! only) to show where time goes.
//!
//! Run: `cargo bench --bench throughput` (BENCH_EVENTS=N to change the event count;
//! BENCH_PROFILE=e2e or BENCH_PROFILE=worker builds all events first and then runs
//! only that path (the worker: draining a filled subscription), for `perf record -D <ms>`;
//! BENCH_PROFILE=json runs only the structured JSON codec scenarios;
//! BENCH_PROFILE=router only the worker drains with a decoding closure and with a
//! router).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

mod support;

use cloudbus::memory::MemoryBroker;
use cloudbus::{
    Bus, CloudEvent, Context, DecodeExt, Event, EventBuilder, EventExt, Handler, HandlerContext,
    HandlerError, Publisher, Router, SubscriptionSpec, WorkerOptions, codec,
};
use serde::{Deserialize, Serialize};
use support::{print_medians, report, reset_peak_rss};

/// An order event carrying about 1 KiB of JSON (`application/json`), held as the
/// serialized bytes, the way events arrive from a wire in binary mode. (Held as a
/// parsed `serde_json::Value` tree instead, allocating and freeing the tree costs more
/// than any broker work and every scenario measures the allocator.)
fn make_events(n: usize) -> Vec<Event> {
    let items: Vec<_> = (0..8)
        .map(|k| serde_json::json!({"sku": format!("SKU-{k:04}-ABCDEFGH"), "qty": k + 1, "price_cents": 1999 + k, "note": "standard shipping, gift wrap"}))
        .collect();
    let body = serde_json::to_vec(
        &serde_json::json!({"order_id": 0, "customer": "customer-42", "items": items}),
    )
    .expect("JSON");
    (0..n)
        .map(|i| {
            EventBuilder::new("com.example.order.created", "/bench/orders")
                .id(format!("evt-{i}"))
                .subject(format!("order-{i}"))
                .data("application/json", body.clone())
                .build()
                .expect("valid event")
        })
        .collect()
}

/// A fresh broker with the topic `bench` and one subscription.
async fn bench_bus(subscription: &str) -> (Bus, Publisher) {
    let bus = MemoryBroker::new().bus();
    bus.ensure_topic("bench").await.expect("topic");
    bus.ensure_subscription(&SubscriptionSpec::new("bench", subscription))
        .await
        .expect("subscription");
    let publisher = bus.publisher("bench").await.expect("publisher");
    (bus, publisher)
}

/// Publishes in batches of 4,000 (the publisher splits them by the broker's limits).
async fn publish_in_chunks(publisher: &Publisher, events: Vec<Event>) {
    let mut events = events.into_iter();
    loop {
        let chunk: Vec<Event> = events.by_ref().take(4000).collect();
        if chunk.is_empty() {
            break;
        }
        for r in publisher.publish_batch(chunk).await {
            r.expect("publish");
        }
    }
}

async fn mpsc_baseline(events: Vec<Event>) -> f64 {
    let n = events.len();
    reset_peak_rss();
    let start = Instant::now();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Event>(1024);
    let producer = tokio::spawn(async move {
        for e in events {
            if tx.send(e).await.is_err() {
                break;
            }
        }
    });
    let mut got = 0;
    while let Some(e) = rx.recv().await {
        drop(e);
        got += 1;
    }
    let _ = producer.await;
    assert_eq!(got, n);
    report("mpsc_baseline", n, start.elapsed().as_secs_f64())
}

async fn memory_end_to_end(name: &str, events: Vec<Event>, consumers: usize) -> f64 {
    let n = events.len();
    let (bus, publisher) = bench_bus("s").await;
    reset_peak_rss();
    let start = Instant::now();
    let acked = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..consumers {
        let consumer = bus.consumer("bench", "s").await.expect("consumer");
        let acked = acked.clone();
        tasks.push(tokio::spawn(async move {
            while acked.load(Ordering::Relaxed) < n as u64 {
                let batch = consumer
                    .receive_batch(1000, Duration::from_millis(50))
                    .await
                    .expect("receive");
                let ok = consumer
                    .ack_all(&batch)
                    .await
                    .into_iter()
                    .filter(Result::is_ok)
                    .count();
                acked.fetch_add(ok as u64, Ordering::Relaxed);
            }
        }));
    }
    let producer = tokio::spawn(async move {
        publish_in_chunks(&publisher, events).await;
    });
    let _ = producer.await;
    for t in tasks {
        let _ = t.await;
    }
    assert_eq!(acked.load(Ordering::Relaxed), n as u64);
    report(name, n, start.elapsed().as_secs_f64())
}

/// Publishing one event per call (`publish`, each with its own handle), as a service
/// does per request: the lanes gather the calls into batches.
async fn memory_publish_each(events: Vec<Event>) {
    let n = events.len();
    let (_bus, publisher) = bench_bus("p").await;
    reset_peak_rss();
    let start = Instant::now();
    let handles: Vec<_> = events.into_iter().map(|e| publisher.publish(e)).collect();
    for r in futures::future::join_all(handles).await {
        r.expect("publish");
    }
    report("memory_publish_each", n, start.elapsed().as_secs_f64());
}

/// The two halves of the end-to-end path, measured apart: publishing into a
/// subscription, then draining it with receive and ack.
async fn memory_halves(events: Vec<Event>) {
    let n = events.len();
    let (bus, publisher) = bench_bus("h").await;
    let consumer = bus.consumer("bench", "h").await.expect("consumer");
    reset_peak_rss();
    let start = Instant::now();
    publish_in_chunks(&publisher, events).await;
    report("memory_publish_only", n, start.elapsed().as_secs_f64());
    reset_peak_rss();
    let start = Instant::now();
    let mut acked = 0;
    while acked < n {
        let batch = consumer
            .receive_batch(1000, Duration::from_millis(50))
            .await
            .expect("receive");
        acked += consumer
            .ack_all(&batch)
            .await
            .into_iter()
            .filter(Result::is_ok)
            .count();
    }
    report("memory_receive_ack_only", n, start.elapsed().as_secs_f64());
}

async fn memory_worker(events: Vec<Event>) -> f64 {
    let n = events.len();
    let (bus, publisher) = bench_bus("w").await;
    reset_peak_rss();
    let start = Instant::now();
    let handled = Arc::new(AtomicU64::new(0));
    let h = handled.clone();
    let worker = bus
        .consumer("bench", "w")
        .await
        .expect("consumer")
        .start_worker(
            move |_e: Arc<Event>, _c: HandlerContext| {
                h.fetch_add(1, Ordering::Relaxed);
                async { Ok::<(), HandlerError>(()) }
            },
            WorkerOptions::default().concurrency(256),
        )
        .expect("the router's wiring");
    for r in publisher.publish_batch(events).await {
        r.expect("publish");
    }
    while worker.stats().acked < n as u64 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    worker.shutdown(Duration::from_secs(5)).await;
    report("memory_worker_e2e_concurrency_256", n, secs)
}

/// The bench events as a typed event, for the router scenarios.
#[derive(Serialize, Deserialize, CloudEvent)]
#[cloudevent(type = "com.example.order.created", source = "/bench/orders")]
struct BenchOrder {
    order_id: u64,
    customer: String,
    items: Vec<BenchItem>,
}

#[derive(Serialize, Deserialize)]
struct BenchItem {
    sku: String,
    qty: u32,
    price_cents: u64,
    note: String,
}

/// The worker draining a filled subscription into `handler`.
async fn drain_into<H: Handler>(name: &str, events: Vec<Event>, handler: H) -> f64 {
    let n = events.len();
    let (bus, publisher) = bench_bus("r").await;
    publish_in_chunks(&publisher, events).await;
    let consumer = bus.consumer("bench", "r").await.expect("consumer");
    reset_peak_rss();
    let start = Instant::now();
    let worker = consumer
        .start_worker(handler, WorkerOptions::default().concurrency(256))
        .expect("the router's wiring");
    while worker.stats().acked < n as u64 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    let report_ = worker.shutdown(Duration::from_secs(5)).await;
    assert_eq!(
        report_.dead_lettered, 0,
        "{name}: events were dead-lettered"
    );
    report(name, n, secs)
}

/// The routed handler beside the plain one doing the same work (decoding each event
/// into `BenchOrder`): what the router itself costs. Each call runs both twice, in both
/// orders (closure, router, router, closure), so that neither always runs on the heap
/// the other left behind; the medians are compared.
fn router_vs_closure(runtime: &tokio::runtime::Runtime, n: usize) {
    for router_first in [false, true] {
        let closure = || {
            runtime.block_on(drain_into(
                "memory_worker_drain_decoding_closure",
                make_events(n),
                |e: Arc<Event>, _c: HandlerContext| async move {
                    let order = e.decode::<BenchOrder>()?;
                    std::hint::black_box(order);
                    Ok::<(), HandlerError>(())
                },
            ))
        };
        let router = || {
            runtime.block_on(drain_into(
                "memory_worker_drain_router",
                make_events(n),
                Router::new().route(|order: BenchOrder, _ctx: Context| async move {
                    std::hint::black_box(order);
                    Ok::<(), HandlerError>(())
                }),
            ))
        };
        if router_first {
            router();
            closure();
        } else {
            closure();
            router();
        }
    }
}

fn print_router_cost(r: &dyn Fn(&str) -> f64) {
    let (closure, router) = (
        r("memory_worker_drain_decoding_closure"),
        r("memory_worker_drain_router"),
    );
    println!(
        "# router: {:.3} M events/s, the decoding closure {:.3} M events/s: the router costs \
         {:.1}% (goal < 10%); the plain worker without decoding: {:.3} M events/s",
        router / 1e6,
        closure / 1e6,
        (1.0 - router / closure) * 100.0,
        r("memory_worker_drain_concurrency_256") / 1e6,
    );
}

/// The worker alone: the subscription is filled first, then a worker drains it
/// (receive, dispatch to the handler, ack), comparable with `memory_receive_ack_only`.
async fn memory_worker_drain(events: Vec<Event>) -> f64 {
    let n = events.len();
    let (bus, publisher) = bench_bus("d").await;
    publish_in_chunks(&publisher, events).await;
    let consumer = bus.consumer("bench", "d").await.expect("consumer");
    reset_peak_rss();
    let start = Instant::now();
    let worker = consumer
        .start_worker(
            |_e: Arc<Event>, _c: HandlerContext| async { Ok::<(), HandlerError>(()) },
            WorkerOptions::default().concurrency(256),
        )
        .expect("the router's wiring");
    while worker.stats().acked < n as u64 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let secs = start.elapsed().as_secs_f64();
    worker.shutdown(Duration::from_secs(5)).await;
    report("memory_worker_drain_concurrency_256", n, secs)
}

/// The structured JSON decoder before issue 14 (the baseline of the decode
/// scenarios): a `serde_json::Value` of the whole event, then the cloudevents crate's
/// deserializer over it (which copies the tree twice more).
fn decode_through_value_tree(body: &[u8]) -> Event {
    let value: serde_json::Value = serde_json::from_slice(body).expect("JSON");
    serde_json::from_value(value).expect("a CloudEvent")
}

fn json_codec(events: &[Event]) {
    reset_peak_rss();
    let start = Instant::now();
    let encoded: Vec<Vec<u8>> = events
        .iter()
        .map(|e| codec::to_structured_json(e).expect("encode"))
        .collect();
    report(
        "cloudevents_json_encode",
        events.len(),
        start.elapsed().as_secs_f64(),
    );
    let bytes: usize = encoded.iter().map(Vec::len).sum();
    let decode = |b: &[u8]| codec::from_structured_json(b).expect("decode");
    time_each("cloudevents_json_decode", &encoded, decode);
    time_each(
        "baseline_json_decode_through_value_tree",
        &encoded,
        decode_through_value_tree,
    );
    println!(
        "# average structured JSON size: {} bytes",
        bytes / events.len().max(1)
    );
    // The same events with their data held as JSON (what `EventBuilder::json` makes):
    // structured mode carries it as a `data` member, not `data_base64`.
    let as_json: Vec<Vec<u8>> = events
        .iter()
        .map(|e| {
            let mut e = e.clone();
            let value: serde_json::Value = e.data_json().expect("JSON data");
            e.set_data("application/json", value);
            codec::to_structured_json(&e).expect("encode")
        })
        .collect();
    time_each("cloudevents_json_decode_json_data", &as_json, decode);
    time_each(
        "baseline_json_decode_json_data_through_value_tree",
        &as_json,
        decode_through_value_tree,
    );
    // The floor of both: building (and dropping) the `serde_json::Value` tree of the
    // data alone, which a decoded event must hold (`Data::Json`).
    let data: Vec<Vec<u8>> = events
        .iter()
        .map(|e| codec::data_bytes(e).expect("data"))
        .collect();
    time_each("json_value_tree_of_data_only", &data, |d| {
        serde_json::from_slice::<serde_json::Value>(d).expect("JSON")
    });
}

/// Runs `decode` over every input (dropping each result, as a consumer would) and
/// records the time as scenario `name`.
fn time_each<T>(name: &str, inputs: &[Vec<u8>], decode: impl Fn(&[u8]) -> T) {
    reset_peak_rss();
    let start = Instant::now();
    for input in inputs {
        std::hint::black_box(decode(input));
    }
    report(name, inputs.len(), start.elapsed().as_secs_f64());
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this as a quick
    // smoke test with few events.
    let benchmarking = std::env::args().any(|a| a == "--bench");
    let n: usize = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if benchmarking { 300_000 } else { 2_000 });
    let threads: usize = std::env::var("BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "# {} events per scenario, {threads} worker threads, {} CPUs",
        n,
        std::thread::available_parallelism().map_or(0, |p| p.get())
    );
    if let Ok(which) = std::env::var("BENCH_PROFILE") {
        // Profiling aid: build every event first, then run only one path.
        if which == "json" {
            // Only the structured JSON codec scenarios (no runtime work at all).
            for _ in 0..3 {
                json_codec(&make_events(n.min(100_000)));
            }
            print_medians();
            return;
        }
        if which == "router" {
            for _ in 0..5 {
                runtime.block_on(memory_worker_drain(make_events(n)));
                router_vs_closure(&runtime, n);
            }
            let rate = print_medians();
            print_router_cost(&|name: &str| rate.get(name).copied().unwrap_or(f64::NAN));
            return;
        }
        let sets: Vec<Vec<Event>> = (0..5).map(|_| make_events(n)).collect();
        eprintln!("# events built; profiling window starts");
        for events in sets {
            if which == "worker" {
                runtime.block_on(memory_worker_drain(events));
            } else {
                runtime.block_on(memory_end_to_end("memory_e2e_1_consumer", events, 1));
            }
        }
        print_medians();
        return;
    }
    let rounds = if benchmarking { 3 } else { 1 };
    println!("# {rounds} rounds; each line is the median round of its scenario");
    for _ in 0..rounds {
        runtime.block_on(mpsc_baseline(make_events(n)));
        runtime.block_on(memory_end_to_end(
            "memory_e2e_1_consumer",
            make_events(n),
            1,
        ));
        runtime.block_on(memory_end_to_end(
            "memory_e2e_4_consumers",
            make_events(n),
            4,
        ));
        runtime.block_on(memory_halves(make_events(n)));
        runtime.block_on(memory_publish_each(make_events(n)));
        runtime.block_on(memory_worker(make_events(n)));
        runtime.block_on(memory_worker_drain(make_events(n)));
        router_vs_closure(&runtime, n);
        json_codec(&make_events(n.min(100_000)));
    }
    let rate = print_medians();
    let r = |name: &str| rate.get(name).copied().unwrap_or(f64::NAN);
    let mpsc = r("mpsc_baseline");
    for name in [
        "memory_e2e_1_consumer",
        "memory_e2e_4_consumers",
        "memory_worker_e2e_concurrency_256",
    ] {
        println!(
            "# {name}: {:.2} M events/s (goal >= 1.0), {:.2} x mpsc_baseline (goal >= 0.25)",
            r(name) / 1e6,
            r(name) / mpsc
        );
    }
    println!(
        "# memory_worker_drain_concurrency_256 (the worker's own path): {:.2} M events/s, \
         {:.2} x mpsc_baseline (goal >= 0.5); receive+ack without a worker: {:.2} x",
        r("memory_worker_drain_concurrency_256") / 1e6,
        r("memory_worker_drain_concurrency_256") / mpsc,
        r("memory_receive_ack_only") / mpsc,
    );
    print_router_cost(&r);
    println!(
        "# halves: publish {:.2} M/s (one call per event: {:.2} M/s), receive+ack {:.2} M/s; \
         json encode {:.2} M/s",
        r("memory_publish_only") / 1e6,
        r("memory_publish_each") / 1e6,
        r("memory_receive_ack_only") / 1e6,
        r("cloudevents_json_encode") / 1e6,
    );
    println!(
        "# json decode, data_base64: {:.3} M/s, {:.2} x the Value-tree baseline; data as JSON: \
         {:.3} M/s, {:.2} x its baseline (goal >= 4); the data's Value tree alone: {:.3} M/s",
        r("cloudevents_json_decode") / 1e6,
        r("cloudevents_json_decode") / r("baseline_json_decode_through_value_tree"),
        r("cloudevents_json_decode_json_data") / 1e6,
        r("cloudevents_json_decode_json_data")
            / r("baseline_json_decode_json_data_through_value_tree"),
        r("json_value_tree_of_data_only") / 1e6
    );
}
