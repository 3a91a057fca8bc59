//! cloudbus on Kafka against raw rdkafka, on one broker in one run: events per second
//! of publishing and of consuming, each measured separately, through cloudbus and
//! through rdkafka by hand, with the ratio cloudbus / raw (goal: >= 0.95 for both).
//!
//! Both sides use the same librdkafka settings: the raw clients are built from
//! `KafkaConfig::producer_settings()` and `consumer_settings(group)` of the same URL
//! (`kafka://ADDR?session_timeout_ms=6000&mode=structured&partitions=4`), so linger,
//! acks, idempotence and the session timeout match. Events are ~1 KiB JSON CloudEvents
//! with 16 partition keys, in structured mode; each measure has its own fresh topic
//! of 4 partitions.
//!
//! - Publish, cloudbus: `Publisher::publish_batch` in chunks of 1,000, every result
//!   checked. Raw: a `FutureProducer` sending the same records (key, the structured
//!   `content-type` header, the event encoded with `codec::to_structured_json` inside
//!   the timed loop), all delivery reports of a chunk of 1,000 awaited together, as
//!   cloudbus does. Timed from the first send to the last delivery report.
//! - Consume, from a topic filled with N events beforehand (untimed): cloudbus
//!   `Consumer::receive_batch(500, 1 s)` + `ack_all` (a commit of the done prefix
//!   after each, asynchronous). Raw: a `StreamConsumer` of a new group, each record
//!   decoded with `codec::from_structured_json`, offsets committed every 500 records
//!   with `CommitMode::Async`. The group join is left out (tansu holds a new group's
//!   first join for half the session timeout): the clock starts once the first record
//!   is in hand and stops at the last ack / commit, and the rate counts the N - 1
//!   records after the first.
//!
//! Beside the rates it prints the CPU each side cost per event while its clock
//! ran: this process (every thread, librdkafka's too) and the broker (tansu started
//! here, or KAFKA_PID), from /proc in 10 ms ticks (use enough events for them).
//! CPU varies less than rates on a shared 2-core machine.
//!
//! Run: `cargo bench -p cloudbus-kafka --features emulators --bench kafka`
//! (KAFKA_BENCH_EVENTS=N, default 20,000 per measure; KAFKA_BENCH_ROUNDS=R, default 5;
//! KAFKA_BENCH_BATCH=B records per receive and per raw commit, default 500;
//! KAFKA_BENCH_MEASURES=publish or consume for one of them, e.g. under a profiler;
//! medians and min–max spreads printed). It uses KAFKA_BOOTSTRAP_SERVERS, or, when
//! that is unset, starts tansu with scripts/kafka.sh and stops it at the end.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use cloudbus_conformance::emulator::{Emulator, cpu_seconds};
use cloudbus_core::{Bus, Event, EventBuilder, SubscriptionSpec};
use cloudbus_driver::codec::{from_structured_json, to_structured_json};
use cloudbus_kafka::KafkaConfig;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

/// Events per `publish_batch` call, and per group of delivery reports on the raw side.
const CHUNK: usize = 1000;
/// Records per receive (cloudbus) and per commit (raw), unless KAFKA_BENCH_BATCH says.
const RECEIVE_MAX: usize = 500;
/// How long a receive waits for its first record.
const RECEIVE_WAIT: Duration = Duration::from_secs(1);
/// The partition keys events are spread over.
const KEYS: usize = 16;
/// The `content-type` header of a structured-mode record (the binding's).
const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json; charset=UTF-8";
/// How long a raw send may wait for room in librdkafka's queue (as cloudbus's).
const QUEUE_TIMEOUT: Duration = Duration::from_secs(30);
/// A consumer that gets nothing for this long is stuck: the bench fails.
const STALL: Duration = Duration::from_secs(60);

fn env_number(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|e| panic!("{name}={v:?} is not a number: {e}")),
        Err(_) => default,
    }
}

fn key(i: usize) -> String {
    format!("k{}", i % KEYS)
}

fn events(n: usize) -> Vec<Event> {
    let pad = "x".repeat(1000);
    (0..n)
        .map(|i| {
            EventBuilder::new("com.example.bench", "/bench")
                .partition_key(key(i))
                .json(&serde_json::json!({ "n": i, "pad": pad }))
                .and_then(|b| b.build())
                .expect("a valid bench event")
        })
        .collect()
}

fn client_config(settings: Vec<(String, String)>) -> ClientConfig {
    let mut config = ClientConfig::new();
    for (name, value) in settings {
        config.set(name, value);
    }
    config
}

/// What every measure shares: the cloudbus bus, the configuration both sides are built
/// from, the raw producer (one per run, as cloudbus has one per bus) and an admin
/// client to drop the topics of a measure once it is done.
struct Bench {
    bus: Bus,
    /// The broker's process, when known: its CPU is reported too.
    broker_pid: Option<String>,
    config: KafkaConfig,
    /// Records per receive (cloudbus) and per commit (raw).
    batch: usize,
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
}

impl Bench {
    /// A fresh topic made by cloudbus (partitions from the URL).
    async fn fresh_topic(&self, tag: &str) -> String {
        let topic = format!("bench-{tag}-{:08x}", fastrand::u32(..));
        self.bus
            .ensure_topic(&topic)
            .await
            .unwrap_or_else(|e| panic!("create topic {topic}: {e}"));
        topic
    }

    /// Fills `topic` with `n` events through cloudbus (untimed).
    async fn fill(&self, topic: &str, n: usize) {
        let publisher = self.bus.publisher(topic).await.expect("filling publisher");
        for chunk in chunks(events(n)) {
            for r in publisher.publish_batch(chunk).await {
                r.expect("filling publish");
            }
        }
        publisher
            .close()
            .await
            .expect("close the filling publisher");
    }

    /// Drops the topics of a measure (best effort: they only take the broker's memory).
    async fn drop_topics(&self, topics: &[&str]) {
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        match self.admin.delete_topics(topics, &options).await {
            Ok(results) => {
                for r in results {
                    if let Err((topic, code)) = r {
                        eprintln!("note: topic {topic} not deleted: {code}");
                    }
                }
            }
            Err(e) => eprintln!("note: topics {topics:?} not deleted: {e}"),
        }
    }

    async fn publish_cloudbus(&self, n: usize) -> (f64, Option<CpuCost>) {
        let topic = self.fresh_topic("pub-cb").await;
        let publisher = self
            .bus
            .publisher(&topic)
            .await
            .expect("cloudbus publisher");
        let batches = chunks(events(n));
        let cpu = Cpu::start(self.broker_pid.as_deref());
        let start = Instant::now();
        for chunk in batches {
            for r in publisher.publish_batch(chunk).await {
                r.expect("cloudbus publish");
            }
        }
        let elapsed = start.elapsed();
        let cpu = cpu.stop(n);
        publisher
            .close()
            .await
            .expect("close the cloudbus publisher");
        self.drop_topics(&[&topic]).await;
        (n as f64 / elapsed.as_secs_f64(), cpu)
    }

    async fn publish_raw(&self, n: usize) -> (f64, Option<CpuCost>) {
        let topic = self.fresh_topic("pub-raw").await;
        let evs = events(n);
        let cpu = Cpu::start(self.broker_pid.as_deref());
        let start = Instant::now();
        for (c, chunk) in evs.chunks(CHUNK).enumerate() {
            // Encoded inside the timed loop, as cloudbus encodes inside publish_batch.
            let records: Vec<(String, Vec<u8>)> = chunk
                .iter()
                .enumerate()
                .map(|(j, e)| {
                    (
                        key(c * CHUNK + j),
                        to_structured_json(e).expect("raw structured encode"),
                    )
                })
                .collect();
            let sends = records.iter().map(|(k, payload)| {
                let record = FutureRecord::<str, [u8]>::to(&topic)
                    .key(k.as_str())
                    .payload(payload.as_slice())
                    .headers(OwnedHeaders::new_with_capacity(1).insert(Header {
                        key: "content-type",
                        value: Some(STRUCTURED_CONTENT_TYPE),
                    }));
                self.producer.send(record, QUEUE_TIMEOUT)
            });
            for r in futures::future::join_all(sends).await {
                r.map_err(|(e, _)| e).expect("raw publish");
            }
        }
        let elapsed = start.elapsed();
        let cpu = cpu.stop(n);
        self.drop_topics(&[&topic]).await;
        (n as f64 / elapsed.as_secs_f64(), cpu)
    }

    async fn consume_cloudbus(&self, n: usize) -> (f64, Option<CpuCost>) {
        let topic = self.fresh_topic("con-cb").await;
        let sub = format!("{topic}-sub");
        // Before the fill: a new subscription starts at the topic's end.
        self.bus
            .ensure_subscription(&SubscriptionSpec::new(&topic, &sub))
            .await
            .expect("cloudbus subscription");
        self.fill(&topic, n).await;
        let consumer = self
            .bus
            .consumer(&topic, &sub)
            .await
            .expect("cloudbus consumer");
        // The first record (the group join before it is not timed).
        let mut last_progress = Instant::now();
        let first = loop {
            let batch = consumer
                .receive_batch(1, RECEIVE_WAIT)
                .await
                .expect("cloudbus first receive");
            if !batch.is_empty() {
                break batch;
            }
            assert!(
                last_progress.elapsed() < STALL,
                "cloudbus consumer got nothing in {STALL:?}"
            );
        };
        let cpu = Cpu::start(self.broker_pid.as_deref());
        let start = Instant::now();
        let mut got = first.len();
        for r in consumer.ack_all(&first).await {
            r.expect("cloudbus ack");
        }
        last_progress = Instant::now();
        while got < n {
            let batch = consumer
                .receive_batch(self.batch, RECEIVE_WAIT)
                .await
                .expect("cloudbus receive");
            if batch.is_empty() {
                assert!(
                    last_progress.elapsed() < STALL,
                    "cloudbus consumer stalled at {got} of {n}"
                );
                continue;
            }
            got += batch.len();
            for r in consumer.ack_all(&batch).await {
                r.expect("cloudbus ack");
            }
            last_progress = Instant::now();
        }
        let elapsed = start.elapsed();
        let cpu = cpu.stop(n - 1);
        consumer.close().await.expect("close the cloudbus consumer");
        if let Err(e) = self.bus.delete_subscription(&topic, &sub).await {
            eprintln!("note: subscription {sub} not deleted: {e}");
        }
        self.drop_topics(&[&topic]).await;
        ((n - 1) as f64 / elapsed.as_secs_f64(), cpu)
    }

    async fn consume_raw(&self, n: usize) -> (f64, Option<CpuCost>) {
        let topic = self.fresh_topic("con-raw").await;
        self.fill(&topic, n).await;
        let group = format!("{topic}-raw");
        let consumer: StreamConsumer = client_config(self.config.consumer_settings(&group))
            .create()
            .expect("raw consumer");
        consumer
            .subscribe(&[topic.as_str()])
            .expect("raw subscribe");
        // Per partition, the offset of the last record read since the last commit.
        let mut read: HashMap<i32, i64> = HashMap::new();
        let mut since_commit = 0;
        let mut got = 0;
        let mut start = None;
        let mut cpu = None;
        while got < n {
            let message = tokio::time::timeout(STALL, consumer.recv())
                .await
                .unwrap_or_else(|_| panic!("raw consumer stalled at {got} of {n}"))
                .expect("raw receive");
            let event = from_structured_json(message.payload().unwrap_or_default())
                .expect("a structured CloudEvent");
            std::hint::black_box(&event);
            read.insert(message.partition(), message.offset());
            drop(message);
            got += 1;
            since_commit += 1;
            // The clock starts once the first record is in hand, as for cloudbus.
            if start.is_none() {
                cpu = Some(Cpu::start(self.broker_pid.as_deref()));
                start = Some(Instant::now());
            }
            if since_commit == self.batch || got == n {
                let mut commits = TopicPartitionList::new();
                for (partition, offset) in read.drain() {
                    commits
                        .add_partition_offset(&topic, partition, Offset::Offset(offset + 1))
                        .expect("raw commit offset");
                }
                consumer
                    .commit(&commits, CommitMode::Async)
                    .expect("raw commit");
                since_commit = 0;
            }
        }
        let elapsed = start.expect("at least one record").elapsed();
        let cpu = cpu.and_then(|c| c.stop(n - 1));
        consumer.unsubscribe();
        // Closing a consumer blocks (it leaves the group): off the runtime's workers.
        tokio::task::spawn_blocking(move || drop(consumer))
            .await
            .expect("close the raw consumer");
        self.drop_topics(&[&topic]).await;
        ((n - 1) as f64 / elapsed.as_secs_f64(), cpu)
    }
}

fn chunks(events: Vec<Event>) -> Vec<Vec<Event>> {
    let mut out = Vec::with_capacity(events.len().div_ceil(CHUNK));
    let mut it = events.into_iter().peekable();
    while it.peek().is_some() {
        out.push(it.by_ref().take(CHUNK).collect());
    }
    out
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

/// `41,200`: a rate rounded to an integer, with thousands separators.
fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn spread(values: &[f64]) -> String {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{}-{}", thousands(min), thousands(max))
}

fn report(measure: &str, cloudbus: &[f64], raw: &[f64]) {
    let (cb, rw) = (median(cloudbus), median(raw));
    println!(
        "{measure:<8} cloudbus {} ev/s  raw {} ev/s  ratio {:.2}  (median of {}, spread cloudbus {}, raw {})",
        thousands(cb),
        thousands(rw),
        cb / rw,
        cloudbus.len(),
        spread(cloudbus),
        spread(raw)
    );
}

/// CPU microseconds per event of one measure: (this process, the broker).
type CpuCost = (f64, Option<f64>);

/// The CPU counters at the start of a measure's clock (read again when it stops:
/// the CPU of the timed work, of every thread of this process, librdkafka's too).
struct Cpu {
    own: Option<f64>,
    broker: Option<(String, f64)>,
}

impl Cpu {
    fn start(broker_pid: Option<&str>) -> Cpu {
        Cpu {
            own: cpu_seconds("self"),
            broker: broker_pid.and_then(|p| cpu_seconds(p).map(|s| (p.to_owned(), s))),
        }
    }

    fn stop(self, events: usize) -> Option<CpuCost> {
        let per_event = |before: f64, after: f64| (after - before) * 1e6 / events as f64;
        let own = self.own.zip(cpu_seconds("self"))?;
        let broker = self
            .broker
            .and_then(|(pid, before)| cpu_seconds(&pid).map(|after| per_event(before, after)));
        Some((per_event(own.0, own.1), broker))
    }
}

fn report_cpu(measure: &str, cloudbus: &[CpuCost], raw: &[CpuCost]) {
    let own = |v: &[CpuCost]| median(&v.iter().map(|c| c.0).collect::<Vec<_>>());
    let broker = |v: &[CpuCost]| {
        let b: Vec<f64> = v.iter().filter_map(|c| c.1).collect();
        if b.is_empty() {
            "-".to_owned()
        } else {
            format!("{:.1}", median(&b))
        }
    };
    if cloudbus.is_empty() || raw.is_empty() {
        return;
    }
    println!(
        "{measure:<8} CPU µs per event while timed (median): bench process cloudbus {:.1} raw {:.1}, broker cloudbus {} raw {}",
        own(cloudbus),
        own(raw),
        broker(cloudbus),
        broker(raw),
    );
}

fn main() {
    let n = env_number("KAFKA_BENCH_EVENTS", 20_000).max(2);
    let rounds = env_number("KAFKA_BENCH_ROUNDS", 5).max(1);
    let batch = env_number("KAFKA_BENCH_BATCH", RECEIVE_MAX).max(1);
    let measures = std::env::var("KAFKA_BENCH_MEASURES").unwrap_or_default();
    let (do_publish, do_consume) = match measures.as_str() {
        "" | "publish,consume" | "consume,publish" => (true, true),
        "publish" => (true, false),
        "consume" => (false, true),
        other => panic!("KAFKA_BENCH_MEASURES={other:?}: publish, consume or both"),
    };
    let given = std::env::var("KAFKA_BOOTSTRAP_SERVERS").is_ok();
    // Kept to the end: dropping it stops the broker the script started.
    let broker = Emulator::find_or_start(
        "KAFKA_BOOTSTRAP_SERVERS",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/kafka.sh"),
        "KAFKA_PID",
    );
    let url = format!(
        "kafka://{}?session_timeout_ms=6000&mode=structured&partitions=4",
        broker.address
    );
    let cores = std::thread::available_parallelism().map_or(0, |c| c.get());
    println!("machine: {cores} cores (available_parallelism)");
    println!(
        "broker: {} at {} ({})",
        if given { "Kafka" } else { "tansu" },
        broker.address,
        if given {
            "KAFKA_BOOTSTRAP_SERVERS"
        } else {
            "started by scripts/kafka.sh"
        }
    );
    println!(
        "{n} events of ~1 KiB JSON per measure ({KEYS} keys, 4 partitions, structured mode), {rounds} rounds"
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    // CPU of each measure (this process; the broker when its PID is known).
    let broker_pid = std::env::var("KAFKA_PID")
        .ok()
        .or_else(|| broker.pid().map(str::to_owned));
    let (publish, consume, publish_cpu, consume_cpu) = rt.block_on(async {
        let config = KafkaConfig::from_url(&url).expect("bench URL");
        let producer: FutureProducer =
            client_config(config.producer_settings().expect("producer settings"))
                .create()
                .expect("raw producer");
        let admin: AdminClient<DefaultClientContext> = client_config(config.client_settings())
            .create()
            .expect("admin client");
        let bus = cloudbus_kafka::connect(&url).await.expect("cloudbus bus");
        let bench = Bench {
            bus,
            broker_pid,
            config,
            batch,
            producer,
            admin,
        };
        // Warm-up (untimed): connections and metadata of both producers.
        bench.publish_cloudbus(CHUNK).await;
        bench.publish_raw(CHUNK).await;

        let mut publish = (Vec::new(), Vec::new());
        let mut consume = (Vec::new(), Vec::new());
        let mut publish_cpu = (Vec::new(), Vec::new());
        let mut consume_cpu = (Vec::new(), Vec::new());
        for round in 0..rounds {
            // Alternate who goes first, so that neither always meets a warmer broker.
            let cloudbus_first = round % 2 == 0;
            for cloudbus in [cloudbus_first, !cloudbus_first] {
                if !do_publish {
                    break;
                }
                if cloudbus {
                    let (rate, cpu) = bench.publish_cloudbus(n).await;
                    publish.0.push(rate);
                    publish_cpu.0.extend(cpu);
                } else {
                    let (rate, cpu) = bench.publish_raw(n).await;
                    publish.1.push(rate);
                    publish_cpu.1.extend(cpu);
                }
            }
            for cloudbus in [cloudbus_first, !cloudbus_first] {
                if !do_consume {
                    break;
                }
                if cloudbus {
                    let (rate, cpu) = bench.consume_cloudbus(n).await;
                    consume.0.push(rate);
                    consume_cpu.0.extend(cpu);
                } else {
                    let (rate, cpu) = bench.consume_raw(n).await;
                    consume.1.push(rate);
                    consume_cpu.1.extend(cpu);
                }
            }
            let last = |v: &Vec<f64>| v.last().map_or_else(|| "-".to_owned(), |x| thousands(*x));
            eprintln!(
                "round {}/{rounds}: publish cloudbus {} raw {}, consume cloudbus {} raw {} ev/s",
                round + 1,
                last(&publish.0),
                last(&publish.1),
                last(&consume.0),
                last(&consume.1),
            );
        }
        (publish, consume, publish_cpu, consume_cpu)
    });
    if do_publish {
        report("publish", &publish.0, &publish.1);
        report_cpu("publish", &publish_cpu.0, &publish_cpu.1);
    }
    if do_consume {
        report("consume", &consume.0, &consume.1);
        report_cpu("consume", &consume_cpu.0, &consume_cpu.1);
    }
    println!("goal: ratio >= 0.95 for publish and for consume");
    drop(rt);
    drop(broker);
}
