//! cloudbus on Service Bus against raw fe2o3-amqp (the AMQP stack under it), on one
//! emulator in one run: publish N events to a queue, then receive and complete all N,
//! through each.
//!
//! Both sides do the same work: the raw side sends messages already encoded the way
//! cloudbus encodes them (the same `cloudEvents_` application properties, content
//! type, MessageId and ~1 KiB JSON body), in batched-format transfers filled up to the
//! link's max-message-size (256 KiB when the peer sets none), authorizes the queue
//! with a CBS put-token, and receives with up to 1,000 credits at a time in peek-lock
//! mode (receiver settle mode second), draining after 200 ms without a message, and
//! completes each received batch with one `accept_all`, as cloudbus settles a batch of
//! acks. So cloudbus's CloudEvent encode and decode, batching and settlement
//! bookkeeping count against it. Both sides are warmed up first (connection, token,
//! both links, one event through), so the timers see throughput, not set-up.
//!
//! Besides the rates it prints the CPU each side cost per 1,000 events, in this
//! process and (when its PID is known) in the emulator, which is what bounds both on
//! one machine: the emulator is a single Python process at ~0.5 ms of CPU per event.
//! Rounds vary by ±20% on their own (the same side, back to back: the emulator's pace
//! drifts), so each round runs both sides back to back, alternating who goes first,
//! and the figure to compare with the goal is the median of the rounds' own
//! cloudbus/raw ratios, which cancels the drift between rounds; the medians of each
//! side's rates are printed too.
//!
//! Run: `cargo bench -p cloudbus-azure --features emulators --bench azure` (BENCH_EVENTS=N, default 5,000; BENCH_ROUNDS=R,
//! default 9; BENCH_ONLY=cloudbus or raw for one side alone; BENCH_VERBOSE=1 prints
//! every round). It
//! uses SERVICEBUS_CONNECTION_STRING (and SERVICEBUS_MANAGEMENT_ENDPOINT, and
//! SERVICEBUS_EMULATOR_PID), or starts the project's emulator with
//! scripts/servicebus-emulator.sh and stops it at the end.

use std::time::{Duration, Instant};

use cloudbus_azure::Secret;
use cloudbus_azure::servicebus::{
    EntityKind, ServiceBusBus, ServiceBusConfig, service_bus_sas_token,
};
use cloudbus_conformance::emulator::cpu_seconds;
use cloudbus_core::{AttributesReader, BinaryCodec, Event, EventBuilder, SubscriptionSpec};
use fe2o3_amqp::link::CreditMode;
use fe2o3_amqp::link::delivery::Sendable;
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::types::definitions::{ReceiverSettleMode, SenderSettleMode};
use fe2o3_amqp::types::messaging::message::__private::Serializable;
use fe2o3_amqp::types::messaging::{
    ApplicationProperties, Batch, Body, Data, Message, MessageId, Properties,
};
use fe2o3_amqp::types::primitives::{Binary, SimpleValue, Symbol, Value};
use fe2o3_amqp::{Connection, Receiver, Sender, Session};
use fe2o3_amqp_cbs::client::CbsClient;
use fe2o3_amqp_cbs::token::CbsToken;

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
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../scripts/servicebus-emulator.sh"
        ))
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
    // Warmed up as the raw side is: connection, authorization and both links open
    // (one event through), so that the timers see throughput, not set-up.
    publisher
        .publish(events(1).remove(0))
        .await
        .expect("warm-up publish");
    let mut warm = Vec::new();
    while warm.is_empty() {
        warm = consumer
            .receive_batch(1, Duration::from_secs(5))
            .await
            .expect("warm-up receive");
    }
    for r in consumer.ack_all(&warm).await {
        r.expect("warm-up ack");
    }
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
    messages: Vec<Message<Data>>,
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
    let host = config.amqp_host();
    let mut connection = Connection::builder()
        .container_id(format!("raw-{:08x}", fastrand::u32(..)))
        .sasl_profile(SaslProfile::Anonymous)
        .open(format!("amqp://{host}").as_str())
        .await
        .expect("raw connection");
    let mut session = Session::begin(&mut connection).await.expect("raw session");
    let mut cbs = CbsClient::attach(&mut session).await.expect("$cbs");
    let audience = format!("sb://{host}/{queue}");
    let expiry = chrono::Utc::now().timestamp() + 3600;
    let token = service_bus_sas_token(
        &audience,
        &part("SharedAccessKeyName"),
        &Secret::new(part("SharedAccessKey")),
        expiry,
    )
    .expect("token");
    cbs.put_token(
        audience.clone(),
        CbsToken::new(
            token.expose().to_owned(),
            "servicebus.windows.net:sastoken",
            None,
        ),
    )
    .await
    .expect("put-token");
    let mut sender = Sender::builder()
        .name(format!("raw-sender-{queue}"))
        .source("raw")
        .target(audience.clone())
        .sender_settle_mode(SenderSettleMode::Unsettled)
        .attach(&mut session)
        .await
        .expect("raw sender");
    let max = sender
        .max_message_size()
        .filter(|m| *m > 0)
        .map_or(256 * 1024, |m| m as usize)
        - 512;
    let mut receiver = Receiver::builder()
        .name(format!("raw-receiver-{queue}"))
        .source(audience.clone())
        .target("raw")
        .credit_mode(CreditMode::Manual)
        .sender_settle_mode(SenderSettleMode::Unsettled)
        .receiver_settle_mode(ReceiverSettleMode::Second)
        .attach(&mut session)
        .await
        .expect("raw receiver");
    // Warm-up: one message through, as on the cloudbus side.
    // (Its own MessageId: duplicate detection would drop a second one.)
    let mut warm = messages.first().cloned().expect("a message");
    if let Some(p) = warm.properties.as_mut() {
        p.message_id = Some(MessageId::String(format!("warm-up-{queue}")));
    }
    assert!(sender.send(warm).await.expect("warm-up send").is_accepted());
    receiver.set_credit(1).await.expect("credit");
    let warm = receiver
        .recv::<Body<Value>>()
        .await
        .expect("warm-up receive");
    receiver.accept(&warm).await.expect("warm-up complete");
    let start = Instant::now();
    let mut pending: Vec<Data> = Vec::new();
    let mut used = 0;
    let mut send = async |batch: Vec<Data>| {
        let sendable = Sendable::builder()
            .message(Message::builder().body(Batch::from(batch)).build())
            .message_format(0x8001_3700)
            .build();
        let outcome = sender.send(sendable).await.expect("sent");
        assert!(outcome.is_accepted(), "{outcome:?}");
    };
    for m in messages {
        let bytes = serde_amqp::to_vec(&Serializable(m)).expect("encode");
        if used + bytes.len() + 8 > max && !pending.is_empty() {
            send(std::mem::take(&mut pending)).await;
            used = 0;
        }
        used += bytes.len() + 8;
        pending.push(Data::from(bytes));
    }
    if !pending.is_empty() {
        send(pending).await;
    }
    let published = start.elapsed();
    let start = Instant::now();
    let mut got = 0;
    while got < n {
        receiver.set_credit(1000).await.expect("credit");
        let mut received = Vec::new();
        match tokio::time::timeout(Duration::from_millis(200), receiver.recv::<Body<Value>>()).await
        {
            Ok(d) => received.push(d.expect("received")),
            Err(_) => {
                receiver.drain().await.expect("drain");
                continue;
            }
        }
        while received.len() < 1000 {
            match tokio::time::timeout(Duration::ZERO, receiver.recv::<Body<Value>>()).await {
                Ok(d) => received.push(d.expect("received")),
                Err(_) => break,
            }
        }
        // Completed together, as cloudbus completes a batch of acks (one disposition
        // per run of consecutive deliveries).
        receiver.accept_all(&received).await.expect("completed");
        got += received.len();
    }
    let consumed = start.elapsed();
    receiver.close().await.expect("close receiver");
    sender.close().await.expect("close sender");
    let _ = cbs.close().await;
    let _ = session.end().await;
    let _ = connection.close().await;
    (published, consumed)
}

/// What cloudbus would send for `event`, built by hand for the raw side.
fn encoded(codec: &BinaryCodec, event: &Event) -> Message<Data> {
    let (mut raw, _) = codec.encode(event).expect("encode");
    let properties = Properties {
        content_type: raw.attributes.remove("content-type").map(Symbol::from),
        // cloudbus's MessageId: the digest of source and id, for duplicate detection.
        message_id: Some(MessageId::String(cloudbus_core::hashing::dedup_digest(
            event.source(),
            event.id(),
        ))),
        ..Default::default()
    };
    let mut props = ApplicationProperties::builder();
    for (k, v) in raw.attributes {
        props = props.insert(k, SimpleValue::String(v));
    }
    Message::builder()
        .properties(properties)
        .application_properties(props.build())
        .data(Binary::from(raw.body))
        .build()
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
        .unwrap_or(9)
        .max(1);
    // BENCH_ONLY=cloudbus or raw: one side alone (to profile it).
    let only = std::env::var("BENCH_ONLY").ok();
    let (connection_string, management, started) = namespace();
    let emulator = started
        .0
        .clone()
        .or_else(|| std::env::var("SERVICEBUS_EMULATOR_PID").ok());
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
    let codec = BinaryCodec::new(cloudbus_azure::servicebus::ATTRIBUTE_PREFIX);
    println!(
        "(the azservicebus-based driver this one replaces: 2,395 events/s end to end on \
         this emulator, measured before issue 13)"
    );
    println!(
        "Service Bus at {}: {n} events of ~1 KiB JSON to a queue, {rounds} rounds, medians",
        config.amqp_host()
    );
    let mut cb = (Vec::new(), Vec::new(), Vec::new());
    let mut raw = (Vec::new(), Vec::new(), Vec::new());
    // CPU milliseconds per 1,000 events: (this process, the emulator), per side.
    let mut cpu: [(Vec<f64>, Vec<f64>); 2] = [(Vec::new(), Vec::new()), (Vec::new(), Vec::new())];
    let per_thousand = |before: Option<f64>, after: Option<f64>| {
        before
            .zip(after)
            .map(|(b, a)| (a - b) * 1000.0 * 1000.0 / n as f64)
    };
    rt.block_on(async {
        for round in 0..rounds {
            // Alternate who goes first, so that neither always meets a warmer emulator.
            for side in if round % 2 == 0 { [0, 1] } else { [1, 0] } {
                if only
                    .as_deref()
                    .is_some_and(|o| o != ["cloudbus", "raw"][side])
                {
                    continue;
                }
                let evs = events(n);
                let own_before = cpu_seconds("self");
                let emulator_before = emulator.as_deref().and_then(cpu_seconds);
                let (p, c) = if side == 0 {
                    cloudbus_round(&config, evs).await
                } else {
                    let messages = evs.iter().map(|e| encoded(&codec, e)).collect();
                    raw_round(&config, &connection_string, messages).await
                };
                if let Some(ms) = per_thousand(own_before, cpu_seconds("self")) {
                    cpu[side].0.push(ms);
                }
                if let Some(ms) =
                    per_thousand(emulator_before, emulator.as_deref().and_then(cpu_seconds))
                {
                    cpu[side].1.push(ms);
                }
                let target = if side == 0 { &mut cb } else { &mut raw };
                target.0.push(n as f64 / p.as_secs_f64());
                target.1.push(n as f64 / c.as_secs_f64());
                target.2.push(n as f64 / (p + c).as_secs_f64());
                if std::env::var_os("BENCH_VERBOSE").is_some() {
                    eprintln!(
                        "round {round} {}: publish {:.0}/s, consume {:.0}/s",
                        ["cloudbus", "raw"][side],
                        n as f64 / p.as_secs_f64(),
                        n as f64 / c.as_secs_f64()
                    );
                }
            }
        }
    });
    println!(
        "{:<34} {:>12} {:>12} {:>12}",
        "", "publish/s", "consume/s", "end-to-end/s"
    );
    for (name, (p, c, e)) in [("raw fe2o3-amqp (baseline)", &raw), ("cloudbus", &cb)] {
        if p.is_empty() {
            continue;
        }
        println!(
            "{name:<34} {:>12.0} {:>12.0} {:>12.0}",
            median(p.clone()),
            median(c.clone()),
            median(e.clone())
        );
    }
    for (name, (own, emulator)) in [("raw fe2o3-amqp", &cpu[1]), ("cloudbus", &cpu[0])] {
        if !own.is_empty() {
            print!(
                "{name}: CPU ms per 1,000 events: bench process {:.0}",
                median(own.clone())
            );
            if !emulator.is_empty() {
                print!(", emulator {:.0}", median(emulator.clone()));
            }
            println!();
        }
    }
    if cb.0.is_empty() || raw.0.is_empty() {
        return;
    }
    // Each round ran both sides back to back on the same emulator state, so the ratio
    // within a round cancels the emulator's drift between rounds; their median is the
    // figure to compare with the goal.
    let paired = |a: &Vec<f64>, b: &Vec<f64>| median(a.iter().zip(b).map(|(a, b)| a / b).collect());
    let rounds: Vec<String> =
        cb.2.iter()
            .zip(&raw.2)
            .map(|(c, r)| format!("{:.2}", c / r))
            .collect();
    println!(
        "cloudbus / raw end to end, round by round: {}",
        rounds.join(" ")
    );
    println!(
        "cloudbus / raw, median of the rounds' ratios: publish {:.3}, consume {:.3}, \
         end-to-end {:.3} (goal: end-to-end >= 0.95)",
        paired(&cb.0, &raw.0),
        paired(&cb.1, &raw.1),
        paired(&cb.2, &raw.2)
    );
}
