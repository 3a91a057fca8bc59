//! cloudbus on SQS against raw aws-sdk-sqs and the omniqueue crate, on one AWS
//! emulator in one run: publish N events to a fresh queue, then receive and delete
//! all N.
//!
//! - `cloudbus`: `Publisher::publish_batch` (core batching: 10 per SendMessageBatch,
//!   4 lanes), then `Consumer::receive_batch(10)` + `ack_all` (DeleteMessageBatch).
//! - `raw_batched` (baseline): the same work by hand with the same batching: the same
//!   encoded messages (CloudEvent attributes and body) in SendMessageBatch calls of 10,
//!   4 at a time, then ReceiveMessage(10) + DeleteMessageBatch.
//! - `raw_one_by_one`: one SendMessage per event, then ReceiveMessage(10) and one
//!   DeleteMessage per message (what code without batching does).
//! - `omniqueue`: its SQS backend, `send_serde_json_batch` and `receive_all(10)` +
//!   `ack` (each a DeleteMessage), with the same JSON body as cloudbus's structured
//!   mode (omniqueue has no message attributes).
//!
//! Run: `cargo bench -p cloudbus-aws --features emulators --bench aws` (BENCH_EVENTS=N, default 5,000). It
//! uses AWS_ENDPOINT_URL, or starts LocalStack with scripts/localstack.sh.

use cloudbus_conformance::emulator::Emulator;
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, SendMessageBatchRequestEntry};
use cloudbus_aws::sqs::SqsBus;
use cloudbus_core::{BinaryCodec, Event, EventBuilder, SubscriptionSpec};
use futures::StreamExt;
use omniqueue::QueueProducer;

fn events(n: usize) -> Vec<Event> {
    let filler = "x".repeat(900);
    (0..n)
        .map(|i| {
            EventBuilder::new("com.example.bench", "/bench/aws")
                .subject(i.to_string())
                .json(&serde_json::json!({ "n": i, "filler": filler }))
                .and_then(|b| b.build())
                .expect("valid event")
        })
        .collect()
}

async fn config(endpoint: &str) -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_sqs::config::Credentials::new(
            "test", "test", None, None, "bench",
        ))
        .load()
        .await
}

/// A fresh queue made by cloudbus; returns its name and URL.
async fn fresh_queue(
    bus: &cloudbus_core::Bus,
    client: &aws_sdk_sqs::Client,
    tag: &str,
) -> (String, String) {
    let name = format!("bench-{tag}-{:08x}", fastrand::u32(..));
    bus.ensure_topic(&name).await.expect("queue");
    bus.ensure_subscription(&SubscriptionSpec::new(&name, &name))
        .await
        .expect("queue settings");
    let url = client
        .get_queue_url()
        .queue_name(&name)
        .send()
        .await
        .expect("url")
        .queue_url()
        .unwrap_or_default()
        .to_owned();
    (name, url)
}

async fn drain_raw(client: &aws_sdk_sqs::Client, url: &str, n: usize, batch_delete: bool) {
    let mut got = 0;
    while got < n {
        let out = client
            .receive_message()
            .queue_url(url)
            .max_number_of_messages(10)
            .wait_time_seconds(1)
            .message_attribute_names("All")
            .send()
            .await
            .expect("receive");
        let msgs = out.messages();
        got += msgs.len();
        if batch_delete && !msgs.is_empty() {
            let entries: Vec<_> = msgs
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    DeleteMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .receipt_handle(m.receipt_handle().unwrap_or_default())
                        .build()
                        .expect("entry")
                })
                .collect();
            client
                .delete_message_batch()
                .queue_url(url)
                .set_entries(Some(entries))
                .send()
                .await
                .expect("delete");
        } else {
            for m in msgs {
                client
                    .delete_message()
                    .queue_url(url)
                    .receipt_handle(m.receipt_handle().unwrap_or_default())
                    .send()
                    .await
                    .expect("delete");
            }
        }
    }
}

fn main() {
    let n: usize = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000);
    let endpoint = Emulator::find_or_start(
        "AWS_ENDPOINT_URL",
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/localstack.sh"),
        "LOCALSTACK_PID",
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "AWS endpoint {}: {n} events of ~1 KiB JSON per scenario",
        endpoint.address
    );
    let results: Vec<(&str, Duration, Duration)> = rt.block_on(async {
        let config = config(&endpoint.address).await;
        let client = aws_sdk_sqs::Client::new(&config);
        let bus = SqsBus::new(&config).into_bus();
        let codec = BinaryCodec::new(cloudbus_aws::sqs::ATTRIBUTE_PREFIX)
            .content_type_attribute(cloudbus_aws::sqs::CONTENT_TYPE_ATTRIBUTE)
            .max_attributes(10, 2);
        let mut results = Vec::new();

        // cloudbus
        let (name, _) = fresh_queue(&bus, &client, "cloudbus").await;
        let publisher = bus.publisher(&name).await.expect("publisher");
        let consumer = bus.consumer(&name, &name).await.expect("consumer");
        let evs = events(n);
        let t = Instant::now();
        for r in publisher.publish_batch(evs).await {
            r.expect("published");
        }
        let published = t.elapsed();
        let t = Instant::now();
        let mut got = 0;
        while got < n {
            let batch = consumer
                .receive_batch(10, Duration::from_secs(1))
                .await
                .expect("received");
            got += batch.len();
            for r in consumer.ack_all(&batch).await {
                r.expect("acked");
            }
        }
        results.push(("cloudbus", published, t.elapsed()));

        // raw, same batching
        let (_, url) = fresh_queue(&bus, &client, "raw").await;
        let encoded: Vec<cloudbus_core::RawMessage> = events(n)
            .iter()
            .map(|e| codec.encode(e).expect("encode").0)
            .collect();
        let t = Instant::now();
        let sends = encoded.chunks(10).map(|chunk| {
            let entries: Vec<_> = chunk
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    let mut b = SendMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .message_body(String::from_utf8_lossy(&m.body).into_owned());
                    for (k, v) in &m.attributes {
                        b = b.message_attributes(
                            k,
                            aws_sdk_sqs::types::MessageAttributeValue::builder()
                                .data_type("String")
                                .string_value(v)
                                .build()
                                .expect("attribute"),
                        );
                    }
                    b.build().expect("entry")
                })
                .collect();
            client
                .send_message_batch()
                .queue_url(&url)
                .set_entries(Some(entries))
                .send()
        });
        let mut sends = futures::stream::iter(sends).buffer_unordered(4);
        while let Some(r) = sends.next().await {
            assert!(r.expect("sent").failed().is_empty());
        }
        let published = t.elapsed();
        let t = Instant::now();
        drain_raw(&client, &url, n, true).await;
        results.push(("raw_batched", published, t.elapsed()));

        // raw, one call per event
        let (_, url) = fresh_queue(&bus, &client, "single").await;
        let t = Instant::now();
        for m in &encoded {
            let mut req = client
                .send_message()
                .queue_url(&url)
                .message_body(String::from_utf8_lossy(&m.body).into_owned());
            for (k, v) in &m.attributes {
                req = req.message_attributes(
                    k,
                    aws_sdk_sqs::types::MessageAttributeValue::builder()
                        .data_type("String")
                        .string_value(v)
                        .build()
                        .expect("attribute"),
                );
            }
            req.send().await.expect("sent");
        }
        let published = t.elapsed();
        let t = Instant::now();
        drain_raw(&client, &url, n, false).await;
        results.push(("raw_one_by_one", published, t.elapsed()));

        // omniqueue
        let (_, url) = fresh_queue(&bus, &client, "omniqueue").await;
        let (producer, oq_consumer) =
            omniqueue::backends::SqsBackend::builder(omniqueue::backends::SqsConfig {
                queue_dsn: url.clone(),
                override_endpoint: false,
            })
            .sqs_config(aws_sdk_sqs::Config::from(&config))
            .build_pair()
            .await
            .expect("omniqueue");
        let bodies: Vec<serde_json::Value> = events(n)
            .iter()
            .map(|e| serde_json::to_value(e).expect("json"))
            .collect();
        let t = Instant::now();
        producer
            .send_serde_json_batch(bodies)
            .await
            .expect("omniqueue send");
        let published = t.elapsed();
        let t = Instant::now();
        let mut got = 0;
        while got < n {
            let batch = oq_consumer
                .receive_all(10, Duration::from_secs(1))
                .await
                .expect("omniqueue receive");
            got += batch.len();
            for d in batch {
                d.ack().await.map_err(|(e, _)| e).expect("omniqueue ack");
            }
        }
        results.push(("omniqueue", published, t.elapsed()));
        results
    });
    println!(
        "{:<16} {:>12} {:>12} {:>14}",
        "", "publish/s", "consume/s", "end-to-end/s"
    );
    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    for (name, p, c) in &results {
        println!(
            "{name:<16} {:>12.0} {:>12.0} {:>14.0}",
            rate(*p),
            rate(*c),
            rate(*p + *c)
        );
    }
    let e2e = |name: &str| {
        results
            .iter()
            .find(|(n, _, _)| *n == name)
            .map(|(_, p, c)| rate(*p + *c))
            .unwrap_or(f64::NAN)
    };
    let cb = e2e("cloudbus");
    println!(
        "cloudbus / raw_batched {:.3} (goal >= 0.95), cloudbus / raw_one_by_one {:.2} (goal >= 5), cloudbus / omniqueue {:.2} (goal >= 1.5)",
        cb / e2e("raw_batched"),
        cb / e2e("raw_one_by_one"),
        cb / e2e("omniqueue")
    );
}
