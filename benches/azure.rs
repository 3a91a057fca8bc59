//! cloudbus on Service Bus against the raw `azservicebus` client, on one emulator in
//! one run: publish N events to a queue, then receive and complete all N, through
//! each.
//!
//! Both sides do the same work: the raw side sends messages already encoded the way
//! cloudbus encodes them (the same `cloudEvents:` application properties, content
//! type, MessageId and ~1 KiB JSON body), in batches filled with `try_add_message`
//! until full, and receives up to 1,000 at a time in peek-lock mode and completes each
//! message. So cloudbus's CloudEvent encode and decode, batching and settlement
//! bookkeeping count against it.
//!
//! Run: `cargo bench --bench azure` (BENCH_EVENTS=N, default 5,000; BENCH_ROUNDS=R,
//! default 3, medians printed). It uses SERVICEBUS_CONNECTION_STRING (and
//! SERVICEBUS_MANAGEMENT_ENDPOINT), or starts the project's emulator with
//! scripts/servicebus-emulator.sh and stops it at the end.

use std::time::{Duration, Instant};

use azservicebus::{ServiceBusClient, ServiceBusMessage};
use cloudbus::azure::servicebus::{EntityKind, ServiceBusBus, ServiceBusConfig};
use cloudbus::{AttributesReader, BinaryCodec, Event, EventBuilder, SubscriptionSpec};
use fe2o3_amqp_types::messaging::ApplicationProperties;

/// The emulator this bench started, stopped on drop.
struct Started(Option<String>);

impl Drop for Started {
    fn drop(&mut self) {
        if let Some(pid) = &self.0 {
            let _ = std::process::Command::new("kill")
                .arg("--")
                .arg(format!("-{pid}"))
                .status();
        }
    }
}

/// (connection string, management endpoint, the emulator to stop).
fn namespace() -> (String, Option<String>, Started) {
    if let Ok(cs) = std::env::var("SERVICEBUS_CONNECTION_STRING") {
        let management = std::env::var("SERVICEBUS_MANAGEMENT_ENDPOINT").ok();
        return (cs, management, Started(None));
    }
    let out = std::process::Command::new("bash")
        .arg("scripts/servicebus-emulator.sh")
        .output()
        .expect("run scripts/servicebus-emulator.sh");
    let text = String::from_utf8_lossy(&out.stdout);
    // The script prints shell-quoted values (the connection string holds ';').
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .map(|v| v.replace("\\;", ";"))
    };
    match (
        get("SERVICEBUS_CONNECTION_STRING"),
        get("SERVICEBUS_EMULATOR_PID"),
    ) {
        (Some(cs), Some(pid)) => (
            cs,
            get("SERVICEBUS_MANAGEMENT_ENDPOINT"),
            Started(Some(pid)),
        ),
        _ => panic!(
            "scripts/servicebus-emulator.sh did not start the emulator: {}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

fn events(n: usize) -> Vec<Event> {
    let filler = "x".repeat(900);
    (0..n)
        .map(|i| {
            EventBuilder::new("com.example.bench", "/bench/azure")
                .subject(i.to_string())
                .json(&serde_json::json!({ "n": i, "filler": filler }))
                .and_then(|b| b.build())
                .expect("valid event")
        })
        .collect()
}

/// A queue made the way cloudbus makes it (duplicate detection, 30 s locks).
async fn queue(config: &ServiceBusConfig, tag: &str) -> String {
    let bus = ServiceBusBus::connect(config.clone())
        .await
        .expect("connect")
        .into_bus();
    let queue = format!("bench-{tag}-{:08x}", fastrand::u32(..));
    bus.ensure_topic(&queue).await.expect("queue");
    bus.ensure_subscription(&SubscriptionSpec::new(&queue, &queue))
        .await
        .expect("subscription");
    queue
}

async fn cloudbus_round(config: &ServiceBusConfig, evs: Vec<Event>) -> (Duration, Duration) {
    let n = evs.len();
    let queue = queue(config, "cb").await;
    let bus = ServiceBusBus::connect(config.clone())
        .await
        .expect("connect")
        .into_bus();
    let publisher = bus.publisher(&queue).await.expect("publisher");
    let consumer = bus.consumer(&queue, &queue).await.expect("consumer");
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
    publisher.close().await.expect("close publisher");
    consumer.close().await.expect("close consumer");
    (published, consumed)
}

async fn raw_round(
    config: &ServiceBusConfig,
    connection_string: &str,
    messages: Vec<ServiceBusMessage>,
) -> (Duration, Duration) {
    let n = messages.len();
    let queue = queue(config, "raw").await;
    let part = |name: &str| {
        connection_string
            .split(';')
            .find_map(|p| p.trim().strip_prefix(&format!("{name}=")))
            .unwrap_or_default()
            .to_owned()
    };
    let mut client = ServiceBusClient::unsecured()
        .new_from_named_key_credential(
            config.amqp_host(),
            azservicebus::authorization::AzureNamedKeyCredential::new(
                part("SharedAccessKeyName"),
                part("SharedAccessKey"),
            ),
            Default::default(),
        )
        .await
        .expect("raw client");
    let mut sender = client
        .create_sender(&queue, Default::default())
        .await
        .expect("raw sender");
    let mut receiver = client
        .create_receiver_for_queue(&queue, Default::default())
        .await
        .expect("raw receiver");
    let start = Instant::now();
    let mut batch = sender
        .create_message_batch(Default::default())
        .expect("batch");
    for m in messages {
        if let Err(azservicebus::amqp::error::TryAddMessageError::BatchFull(m)) =
            batch.try_add_message(m)
        {
            let full = std::mem::replace(
                &mut batch,
                sender
                    .create_message_batch(Default::default())
                    .expect("batch"),
            );
            sender.send_message_batch(full).await.expect("sent");
            batch.try_add_message(m).expect("fits an empty batch");
        }
    }
    if !batch.is_empty() {
        sender.send_message_batch(batch).await.expect("sent");
    }
    let published = start.elapsed();
    let start = Instant::now();
    let mut got = 0;
    while got < n {
        let received = receiver
            .receive_messages_with_max_wait_time(1000, Some(Duration::from_millis(200)))
            .await
            .expect("received");
        for m in &received {
            receiver.complete_message(m).await.expect("completed");
        }
        got += received.len();
    }
    let consumed = start.elapsed();
    receiver.dispose().await.expect("dispose receiver");
    sender.dispose().await.expect("dispose sender");
    client.dispose().await.expect("dispose client");
    (published, consumed)
}

/// What cloudbus would send for `event`, built by hand for the raw side.
fn encoded(codec: &BinaryCodec, event: &Event) -> ServiceBusMessage {
    let (mut raw, _) = codec.encode(event).expect("encode");
    let content_type = raw.attributes.remove("content-type");
    let mut m = ServiceBusMessage::new(raw.body);
    m.set_content_type(content_type);
    m.set_message_id(event.id().to_owned()).expect("message id");
    let mut props = ApplicationProperties::builder();
    for (k, v) in raw.attributes {
        props = props.insert(k, v);
    }
    *m.application_properties_mut() = Some(props.build());
    m
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let n: usize = std::env::var("BENCH_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5_000);
    let rounds: usize = std::env::var("BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let (connection_string, management, _started) = namespace();
    let mut config = ServiceBusConfig::from_connection_string(&connection_string)
        .expect("connection string")
        .entities(EntityKind::Queues);
    if let Some(url) = management {
        config = config.management_endpoint(url);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let codec = BinaryCodec::new(cloudbus::azure::servicebus::ATTRIBUTE_PREFIX);
    println!(
        "Service Bus at {}: {n} events of ~1 KiB JSON to a queue, {rounds} rounds, medians",
        config.amqp_host()
    );
    let mut cb = (Vec::new(), Vec::new(), Vec::new());
    let mut raw = (Vec::new(), Vec::new(), Vec::new());
    rt.block_on(async {
        for round in 0..rounds {
            // Alternate who goes first, so that neither always meets a warmer emulator.
            for side in if round % 2 == 0 { [0, 1] } else { [1, 0] } {
                let evs = events(n);
                let (p, c) = if side == 0 {
                    cloudbus_round(&config, evs).await
                } else {
                    let messages = evs.iter().map(|e| encoded(&codec, e)).collect();
                    raw_round(&config, &connection_string, messages).await
                };
                let target = if side == 0 { &mut cb } else { &mut raw };
                target.0.push(n as f64 / p.as_secs_f64());
                target.1.push(n as f64 / c.as_secs_f64());
                target.2.push(n as f64 / (p + c).as_secs_f64());
            }
        }
    });
    println!(
        "{:<34} {:>12} {:>12} {:>12}",
        "", "publish/s", "consume/s", "end-to-end/s"
    );
    for (name, (p, c, e)) in [("raw azservicebus (baseline)", &raw), ("cloudbus", &cb)] {
        println!(
            "{name:<34} {:>12.0} {:>12.0} {:>12.0}",
            median(p.clone()),
            median(c.clone()),
            median(e.clone())
        );
    }
    let ratio = |a: &Vec<f64>, b: &Vec<f64>| median(a.clone()) / median(b.clone());
    println!(
        "cloudbus / raw: publish {:.3}, consume {:.3}, end-to-end {:.3} (goal: end-to-end >= 0.95)",
        ratio(&cb.0, &raw.0),
        ratio(&cb.1, &raw.1),
        ratio(&cb.2, &raw.2)
    );
}
