//! cloudbus on Pub/Sub against the raw `google-cloud-pubsub` client, on one emulator
//! in one run: publish N events, then consume and ack all N, through each.
//!
//! Both sides use the same settings: batches of up to 1,000 messages (10 MB, 10 ms
//! delay threshold in the crate), unordered subscriptions made the same way, flow
//! control of 1,000 outstanding messages. The raw side sends messages already
//! encoded (the same CloudEvent attributes and 1 KiB JSON body cloudbus produces), so
//! cloudbus's CloudEvent encode and decode count against it.
//!
//! Run: `cargo bench -p cloudbus-gcp --features emulators --bench gcp` (BENCH_EVENTS=N, default 10,000; BENCH_ROUNDS=R,
//! default 6, so that each side goes first as often; medians printed, with each
//! figure's min–max spread). An untimed warm-up round of each side goes first:
//! cloudbus builds its clients on first use, the raw side before its clock starts. It uses PUBSUB_EMULATOR_HOST, or starts the emulator
//! with scripts/pubsub-emulator.sh and stops it at the end.

use cloudbus_conformance::emulator::Emulator;
use std::time::{Duration, Instant};

use cloudbus_core::{BinaryCodec, Event, EventBuilder, SubscriptionSpec};
use cloudbus_gcp::{PubSubBus, PubSubConfig};
use google_cloud_pubsub::client::{Publisher, Subscriber};
use google_cloud_pubsub::model::Message;

const PROJECT: &str = "cloudbus-bench";
/// Events of the untimed first round of each side.
const WARM_UP: usize = 1000;

fn events(n: usize) -> Vec<Event> {
    let filler = "x".repeat(900);
    (0..n)
        .map(|i| {
            EventBuilder::new("com.example.bench", "/bench/gcp")
                .subject(i.to_string())
                .json(&serde_json::json!({ "n": i, "filler": filler }))
                .and_then(|b| b.build())
                .expect("valid event")
        })
        .collect()
}

/// Drops a round's subscription: the emulator keeps every message of a subscription
/// in its heap (256 MB), and five rounds of both sides would exhaust it.
async fn drop_subscription(driver: &PubSubBus, topic: &str, sub: &str) {
    let bus = driver.clone().into_bus();
    if let Err(e) = bus.delete_subscription(topic, sub).await {
        eprintln!("note: subscription {sub} not deleted: {e}");
    }
}

/// Makes a topic and an unordered subscription the way cloudbus does.
async fn entities(driver: &PubSubBus, tag: &str) -> (String, String) {
    let bus = driver.clone().into_bus();
    let topic = format!("bench-{tag}-{:08x}", fastrand::u32(..));
    let sub = format!("{topic}-sub");
    bus.ensure_topic(&topic).await.expect("topic");
    bus.ensure_subscription(&SubscriptionSpec::new(&topic, &sub).ordered(false))
        .await
        .expect("subscription");
    (topic, sub)
}

async fn cloudbus_round(driver: &PubSubBus, evs: Vec<Event>) -> (Duration, Duration) {
    let n = evs.len();
    let (topic, sub) = entities(driver, "cb").await;
    let bus = driver.clone().into_bus();
    let publisher = bus.publisher(&topic).await.expect("publisher");
    let consumer = bus.consumer(&topic, &sub).await.expect("consumer");
    let start = Instant::now();
    for r in publisher.publish_batch(evs).await {
        r.expect("published");
    }
    let published = start.elapsed();
    let start = Instant::now();
    let mut got = 0;
    while got < n {
        let batch = consumer
            .receive_batch(1000, Duration::from_secs(5))
            .await
            .expect("received");
        got += batch.len();
        for r in consumer.ack_all(&batch).await {
            r.expect("acked");
        }
    }
    let consumed = start.elapsed();
    drop_subscription(driver, &topic, &sub).await;
    (published, consumed)
}

async fn raw_round(driver: &PubSubBus, host: &str, messages: Vec<Message>) -> (Duration, Duration) {
    let n = messages.len();
    let (topic, sub) = entities(driver, "raw").await;
    let anonymous = || google_cloud_auth::credentials::anonymous::Builder::new().build();
    let publisher = Publisher::builder(format!("projects/{PROJECT}/topics/{topic}"))
        .with_endpoint(format!("http://{host}"))
        .with_credentials(anonymous())
        .set_message_count_threshold(1000)
        .set_byte_threshold(10_000_000)
        .set_delay_threshold(Duration::from_millis(10))
        .build()
        .await
        .expect("raw publisher");
    let subscriber = Subscriber::builder()
        .with_endpoint(format!("http://{host}"))
        .with_credentials(anonymous())
        .build()
        .await
        .expect("raw subscriber");
    let start = Instant::now();
    let futures: Vec<_> = messages.into_iter().map(|m| publisher.publish(m)).collect();
    publisher.flush().await;
    for f in futures {
        f.await.expect("published");
    }
    let published = start.elapsed();
    let start = Instant::now();
    let mut stream = subscriber
        .subscribe(format!("projects/{PROJECT}/subscriptions/{sub}"))
        .set_max_outstanding_messages(1000)
        .set_max_outstanding_bytes(100 * 1024 * 1024)
        .build();
    let mut got = 0;
    while got < n {
        match stream.next().await {
            Some(Ok((_message, handler))) => {
                handler.ack();
                got += 1;
            }
            Some(Err(e)) => panic!("raw stream failed: {e}"),
            None => panic!("raw stream ended after {got}"),
        }
    }
    let consumed = start.elapsed();
    stream.shutdown_token().shutdown().await;
    drop_subscription(driver, &topic, &sub).await;
    (published, consumed)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// `min-max` of a measure's rounds.
fn spread(v: &[f64]) -> String {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{min:.0}-{max:.0}")
}

fn main() {
    let n: usize = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6)
        .max(1);
    let emulator = Emulator::find_or_start(
        "PUBSUB_EMULATOR_HOST",
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../scripts/pubsub-emulator.sh"
        ),
        "PUBSUB_EMULATOR_PID",
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let codec = BinaryCodec::new(cloudbus_gcp::ATTRIBUTE_PREFIX)
        .content_type_attribute(cloudbus_gcp::CONTENT_TYPE_ATTRIBUTE);
    let driver = PubSubBus::new(PubSubConfig::new(PROJECT).emulator(&emulator.address));
    println!(
        "Pub/Sub emulator at {}: {n} events of ~1 KiB JSON, {rounds} rounds, medians",
        emulator.address
    );
    let mut cb = (Vec::new(), Vec::new(), Vec::new());
    let mut raw = (Vec::new(), Vec::new(), Vec::new());
    let encoded = |evs: &[Event]| -> Vec<Message> {
        evs.iter()
            .map(|e| {
                let (raw, _) = codec.encode(e).expect("encode");
                Message::new()
                    .set_data(bytes::Bytes::from(raw.body))
                    .set_attributes(raw.attributes)
            })
            .collect()
    };
    rt.block_on(async {
        // Warm-up (untimed): cloudbus builds its clients on first use, and the raw side
        // builds its client before its clock starts; the emulator warms up too.
        cloudbus_round(&driver, events(WARM_UP)).await;
        raw_round(&driver, &emulator.address, encoded(&events(WARM_UP))).await;
        for round in 0..rounds {
            // Alternate who goes first, so that neither always meets a warmer emulator.
            for side in if round % 2 == 0 { [0, 1] } else { [1, 0] } {
                let evs = events(n);
                if side == 0 {
                    let (p, c) = cloudbus_round(&driver, evs).await;
                    eprintln!(
                        "round {}: cloudbus publish {:.0}/s, consume {:.0}/s",
                        round + 1,
                        n as f64 / p.as_secs_f64(),
                        n as f64 / c.as_secs_f64()
                    );
                    cb.0.push(n as f64 / p.as_secs_f64());
                    cb.1.push(n as f64 / c.as_secs_f64());
                    cb.2.push(n as f64 / (p + c).as_secs_f64());
                } else {
                    let (p, c) = raw_round(&driver, &emulator.address, encoded(&evs)).await;
                    eprintln!(
                        "round {}: raw publish {:.0}/s, consume {:.0}/s",
                        round + 1,
                        n as f64 / p.as_secs_f64(),
                        n as f64 / c.as_secs_f64()
                    );
                    raw.0.push(n as f64 / p.as_secs_f64());
                    raw.1.push(n as f64 / c.as_secs_f64());
                    raw.2.push(n as f64 / (p + c).as_secs_f64());
                }
            }
        }
    });
    println!(
        "{:<34} {:>12} {:>12} {:>12}",
        "", "publish/s", "consume/s", "end-to-end/s"
    );
    let rows = [
        ("raw google-cloud-pubsub (baseline)", &raw),
        ("cloudbus", &cb),
    ];
    for (name, (p, c, e)) in rows {
        println!(
            "{name:<34} {:>12.0} {:>12.0} {:>12.0}   spread: publish {}, consume {}, end-to-end {}",
            median(p.clone()),
            median(c.clone()),
            median(e.clone()),
            spread(p),
            spread(c),
            spread(e)
        );
    }
    let ratio = |a: &Vec<f64>, b: &Vec<f64>| median(a.clone()) / median(b.clone());
    println!(
        "cloudbus / raw: publish {:.3}, consume {:.3}, end-to-end {:.3} (goals: end-to-end >= 0.95, publish >= 0.9)",
        ratio(&cb.0, &raw.0),
        ratio(&cb.1, &raw.1),
        ratio(&cb.2, &raw.2)
    );
}
