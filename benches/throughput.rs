//! Throughput of the memory broker end to end (publish, receive, ack) with 1 and 4
//! consumers and through the worker, against the baselines measured in the same run:
//! a tokio mpsc channel moving the same Event values, and CloudEvents structured JSON
//! encode and decode. Prints one line per scenario:
//! `scenario=NAME events=N secs=S events_per_sec=R peak_rss_mb=M`.
//!
//! Run: `cargo bench --bench throughput` (BENCH_EVENTS=N to change the event count).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cloudbus::memory::MemoryBroker;
use cloudbus::{
    Event, EventBuilder, HandlerContext, HandlerError, SubscriptionSpec, WorkerOptions, codec,
};

/// An order event carrying about 1 KiB of JSON (`application/json`), held as the
/// serialized bytes, the way events arrive from a wire in binary mode. (Held as a
/// parsed `serde_json::Value` tree instead, allocating and freeing the tree costs more
/// than any broker work and every scenario measures the allocator.)
fn make_events(n: usize) -> Vec<Event> {
    (0..n)
        .map(|i| {
            let items: Vec<_> = (0..8)
                .map(|k| serde_json::json!({"sku": format!("SKU-{k:04}-ABCDEFGH"), "qty": k + 1, "price_cents": 1999 + k, "note": "standard shipping, gift wrap"}))
                .collect();
            let body = serde_json::to_vec(&serde_json::json!({"order_id": i, "customer": "customer-42", "items": items}))
                .expect("JSON");
            EventBuilder::new("com.example.order.created", "/bench/orders")
                .subject(format!("order-{i}"))
                .data("application/json", body)
                .build()
                .expect("valid event")
        })
        .collect()
}

fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn report(name: &str, events: usize, secs: f64) -> f64 {
    let rate = events as f64 / secs;
    println!(
        "scenario={name} events={events} secs={secs:.3} events_per_sec={rate:.0} peak_rss_mb={:.1}",
        peak_rss_mb()
    );
    rate
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
    let bus = MemoryBroker::new().bus();
    bus.ensure_topic("bench").await.expect("topic");
    bus.ensure_subscription(&SubscriptionSpec::new("bench", "s"))
        .await
        .expect("subscription");
    let publisher = bus.publisher("bench").await.expect("publisher");
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
    });
    let _ = producer.await;
    for t in tasks {
        let _ = t.await;
    }
    assert_eq!(acked.load(Ordering::Relaxed), n as u64);
    report(name, n, start.elapsed().as_secs_f64())
}

async fn memory_worker(events: Vec<Event>) -> f64 {
    let n = events.len();
    let bus = MemoryBroker::new().bus();
    bus.ensure_topic("bench").await.expect("topic");
    bus.ensure_subscription(&SubscriptionSpec::new("bench", "w"))
        .await
        .expect("subscription");
    let publisher = bus.publisher("bench").await.expect("publisher");
    reset_peak_rss();
    let start = Instant::now();
    let handled = Arc::new(AtomicU64::new(0));
    let h = handled.clone();
    let worker = bus
        .consumer("bench", "w")
        .await
        .expect("consumer")
        .subscribe(
            move |_e: Arc<Event>, _c: HandlerContext| {
                h.fetch_add(1, Ordering::Relaxed);
                async { Ok::<(), HandlerError>(()) }
            },
            WorkerOptions::default().concurrency(256),
        );
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

fn json_codec(events: &[Event]) -> (f64, f64) {
    reset_peak_rss();
    let start = Instant::now();
    let encoded: Vec<Vec<u8>> = events
        .iter()
        .map(|e| codec::to_structured_json(e).expect("encode"))
        .collect();
    let enc = report(
        "cloudevents_json_encode",
        events.len(),
        start.elapsed().as_secs_f64(),
    );
    let bytes: usize = encoded.iter().map(Vec::len).sum();
    reset_peak_rss();
    let start = Instant::now();
    for b in &encoded {
        let e = codec::from_structured_json(b).expect("decode");
        std::hint::black_box(e);
    }
    let dec = report(
        "cloudevents_json_decode",
        events.len(),
        start.elapsed().as_secs_f64(),
    );
    println!(
        "# average structured JSON size: {} bytes",
        bytes / events.len().max(1)
    );
    (enc, dec)
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this as a quick
    // smoke test with few events.
    let benchmarking = std::env::args().any(|a| a == "--bench");
    let n: usize = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if benchmarking { 300_000 } else { 2_000 });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "# {} events per scenario, 2 worker threads, {} CPUs",
        n,
        std::thread::available_parallelism().map_or(0, |p| p.get())
    );
    let mpsc = runtime.block_on(mpsc_baseline(make_events(n)));
    let one = runtime.block_on(memory_end_to_end(
        "memory_e2e_1_consumer",
        make_events(n),
        1,
    ));
    let four = runtime.block_on(memory_end_to_end(
        "memory_e2e_4_consumers",
        make_events(n),
        4,
    ));
    let worker = runtime.block_on(memory_worker(make_events(n)));
    let (enc, dec) = json_codec(&make_events(n.min(100_000)));
    println!(
        "# memory_e2e_1_consumer / mpsc_baseline = {:.2} (goal >= 0.25); {:.2} M events/s (goal >= 1.0)",
        one / mpsc,
        one / 1e6
    );
    println!(
        "# memory_e2e_4_consumers / mpsc_baseline = {:.2}; {:.2} M events/s",
        four / mpsc,
        four / 1e6
    );
    println!("# memory_worker_e2e / mpsc_baseline = {:.2}", worker / mpsc);
    println!(
        "# memory_e2e_1_consumer / json_encode = {:.2}, / json_decode = {:.2}",
        one / enc,
        one / dec
    );
}
