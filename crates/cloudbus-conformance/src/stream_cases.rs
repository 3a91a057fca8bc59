//! The stream conformance cases: what every partitioned log (Kinesis, the memory
//! broker's logs) must do under a [`StreamConsumer`]. Each takes a [`StreamHarness`].

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::{Outcome, StreamHarness};
use cloudbus_core::codec::RawMessage;
use cloudbus_core::consumer::Delivery;
use cloudbus_core::driver::{Payload, PublishOptions};
use cloudbus_core::error::{Error, ErrorKind, Result};
use cloudbus_core::event::{
    AttributesReader, EXT_DEAD_LETTER_REASON, Event, EventBuilder, EventExt,
};
use cloudbus_core::publisher::Publisher;
use cloudbus_core::retry::RetryPolicy;
use cloudbus_core::stream::{MemoryCheckpointStore, StartPosition, StreamConsumer};
use cloudbus_core::trace_context::TraceContext;
use cloudbus_core::worker::{HandlerContext, HandlerError};

/// Decides whether a handler fails an event at an attempt.
type FailRule = Arc<dyn Fn(&Event, u32) -> Option<HandlerError> + Send + Sync>;

/// What a [`Recorder`] saw: the event, its attempt, the handler's trace id.
type Handled = Vec<(Arc<Event>, u32, String)>;

/// A handler that records what it handled (event, attempt, trace id) and fails where
/// its rule says so.
#[derive(Clone)]
struct Recorder {
    handled: Arc<Mutex<Handled>>,
    fail: FailRule,
}

impl Recorder {
    fn new() -> Self {
        Recorder::failing(|_, _| None)
    }

    fn failing(rule: impl Fn(&Event, u32) -> Option<HandlerError> + Send + Sync + 'static) -> Self {
        Recorder {
            handled: Arc::default(),
            fail: Arc::new(rule),
        }
    }

    fn handled(&self) -> Handled {
        self.handled.lock().map(|h| h.clone()).unwrap_or_default()
    }

    fn ids(&self) -> Vec<String> {
        self.handled()
            .iter()
            .map(|(e, _, _)| e.id().to_owned())
            .collect()
    }

    fn count(&self) -> usize {
        self.handled.lock().map(|h| h.len()).unwrap_or_default()
    }

    fn clear(&self) {
        if let Ok(mut h) = self.handled.lock() {
            h.clear();
        }
    }

    /// The handler function for a [`StreamConsumer`].
    fn handler(
        &self,
    ) -> impl Fn(
        Arc<Event>,
        HandlerContext,
    ) -> std::future::Ready<std::result::Result<(), HandlerError>>
    + Send
    + Sync
    + 'static {
        let me = self.clone();
        move |e: Arc<Event>, ctx: HandlerContext| {
            if let Some(err) = (me.fail)(&e, ctx.attempt) {
                return std::future::ready(Err(err));
            }
            if let Ok(mut h) = me.handled.lock() {
                h.push((e, ctx.attempt, ctx.trace.trace_id()));
            }
            std::future::ready(Ok(()))
        }
    }
}

/// Polls until `recorder` handled `count` events (or patience ran out), then polls
/// a little longer so that extra (duplicate) handling would show.
async fn read_until(
    consumer: &mut StreamConsumer,
    recorder: &Recorder,
    count: usize,
    patience: Duration,
) -> Result<()> {
    let handler = recorder.handler();
    let until = Instant::now() + patience;
    while recorder.count() < count && Instant::now() < until {
        let r = consumer.poll(&handler).await?;
        if r.handled + r.dead_lettered == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    for _ in 0..3 {
        consumer.poll(&handler).await?;
    }
    Ok(())
}

/// Polls until `dead` records were dead-lettered and `count` handled.
async fn read_counting(
    consumer: &mut StreamConsumer,
    recorder: &Recorder,
    count: usize,
    dead: usize,
    patience: Duration,
) -> Result<usize> {
    let handler = recorder.handler();
    let until = Instant::now() + patience;
    let mut dead_lettered = 0;
    while (recorder.count() < count || dead_lettered < dead) && Instant::now() < until {
        let r = consumer.poll(&handler).await?;
        dead_lettered += r.dead_lettered;
        if r.handled + r.dead_lettered == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(dead_lettered)
}

fn event(ty: &str, n: usize) -> Result<Event> {
    EventBuilder::new(ty, "/conformance/stream")
        .subject(format!("n-{n}"))
        .json(&serde_json::json!({ "n": n }))?
        .build()
}

async fn publish_all(p: &Publisher, events: &[Event]) -> Result<()> {
    for r in p.publish_batch(events.to_vec()).await {
        r?;
    }
    Ok(())
}

/// A new stream, its publisher, and a consumer group reading it from the start.
async fn stream_fixture(h: &dyn StreamHarness) -> Result<(String, Publisher, StreamConsumer)> {
    let bus = h.bus().await?;
    let stream = h.new_stream().await?;
    let publisher = bus.publisher(&stream).await?;
    let consumer = bus
        .stream_consumer(&stream, "g")
        .await?
        .start_at(StartPosition::Earliest)
        .retry(fast_retry(3));
    Ok((stream, publisher, consumer))
}

fn fast_retry(attempts: u32) -> RetryPolicy {
    RetryPolicy::default()
        .max_attempts(attempts)
        .initial_backoff(Duration::from_millis(10))
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// Every attribute, extension and kind of data survives the stream.
async fn stream_round_trip_keeps_every_attribute(h: &dyn StreamHarness) -> Result<Outcome> {
    let (_, publisher, mut consumer) = stream_fixture(h).await?;
    let sent = vec![
        EventBuilder::new("com.example.stream.meta", "https://example.com/src")
            .subject("subject/with spaces")
            .time_rfc3339("2026-11-27T10:11:12.345678Z")
            .dataschema("https://example.com/schema/v1.json")
            .partition_key("key-1")
            .correlation_id("corr-1")
            .causation_id("cause-1")
            .traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
            .extension("tracestate", "vendor=value")
            .extension("tenant", "acme")
            .extension("amount", 42i64)
            .json(&serde_json::json!({"nested": {"list": [1, 2.5, "x", null, true]}}))?
            .build()?,
        EventBuilder::new("com.example.stream.text", "/c")
            .data("text/plain", "héllo, wörld")
            .build()?,
        EventBuilder::new("com.example.stream.binary", "/c")
            .data(
                "application/octet-stream",
                vec![0u8, 0xff, 0xfe, 0x80, 10, 13],
            )
            .build()?,
        EventBuilder::new("com.example.stream.empty", "/c").build()?,
    ];
    publish_all(&publisher, &sent).await?;
    let recorder = Recorder::new();
    read_until(&mut consumer, &recorder, sent.len(), h.patience()).await?;
    let got = recorder.handled();
    check!(
        got.len() == sent.len(),
        "handled {} of {}",
        got.len(),
        sent.len()
    );
    for e in &sent {
        let Some((r, _, _)) = got.iter().find(|(r, _, _)| r.id() == e.id()) else {
            return Err(Error::new(
                ErrorKind::Internal,
                format!("event {} missing", e.id()),
            ));
        };
        check!(
            **r == *e,
            "event changed in the stream:\nsent {e:?}\ngot  {r:?}"
        );
        check!(
            r.extensions_text() == e.extensions_text(),
            "extensions changed"
        );
    }
    Ok(Outcome::Passed)
}

/// Events with the same ordering key are handled in publish order, across partitions.
async fn stream_order_per_key(h: &dyn StreamHarness) -> Result<Outcome> {
    let (_, publisher, mut consumer) = stream_fixture(h).await?;
    let keys = ["alpha", "beta", "gamma", "delta"];
    let per_key = 25;
    let mut handles = Vec::new();
    for n in 0..per_key {
        for k in keys {
            let e = EventBuilder::new("conformance.stream.order", "/c")
                .subject(format!("{k}:{n}"))
                .build()?;
            handles.push(publisher.publish_with(e, PublishOptions::ordered(k)));
        }
    }
    for handle in handles {
        handle.await?;
    }
    let recorder = Recorder::new();
    read_until(&mut consumer, &recorder, keys.len() * per_key, h.patience()).await?;
    let mut seen: HashMap<String, Vec<usize>> = HashMap::new();
    for (e, _, _) in recorder.handled() {
        let subject = e.subject().unwrap_or_default();
        let (k, n) = subject.split_once(':').unwrap_or_default();
        seen.entry(k.to_owned())
            .or_default()
            .push(n.parse().unwrap_or(usize::MAX));
    }
    for k in keys {
        let got = seen.remove(k).unwrap_or_default();
        check!(
            got == (0..per_key).collect::<Vec<_>>(),
            "key {k} handled as {got:?}"
        );
    }
    Ok(Outcome::Passed)
}

/// A new consumer of the same group resumes after the last checkpoint: nothing
/// handled twice, nothing lost.
async fn stream_checkpoint_resume(h: &dyn StreamHarness) -> Result<Outcome> {
    let bus = h.bus().await?;
    let stream = h.new_stream().await?;
    let publisher = bus.publisher(&stream).await?;
    let store = Arc::new(MemoryCheckpointStore::new());
    let first_batch: Vec<Event> = (0..20)
        .map(|n| event("conformance.stream.resume", n))
        .collect::<Result<_>>()?;
    publish_all(&publisher, &first_batch).await?;
    let recorder = Recorder::new();
    let mut first = bus
        .stream_consumer(&stream, "g")
        .await?
        .checkpoints(store.clone())
        .start_at(StartPosition::Earliest);
    read_until(&mut first, &recorder, 20, h.patience()).await?;
    check!(
        recorder.count() == 20,
        "first consumer handled {}",
        recorder.count()
    );
    // A graceful stop hands the partitions over; a crashed reader's pass on when
    // their leases lapse.
    first.release().await?;
    drop(first);
    let second_batch: Vec<Event> = (20..30)
        .map(|n| event("conformance.stream.resume", n))
        .collect::<Result<_>>()?;
    publish_all(&publisher, &second_batch).await?;
    recorder.clear();
    let mut second = bus
        .stream_consumer(&stream, "g")
        .await?
        .checkpoints(store)
        .start_at(StartPosition::Earliest);
    read_until(&mut second, &recorder, 10, h.patience()).await?;
    let want = sorted(second_batch.iter().map(|e| e.id().to_owned()).collect());
    check!(
        sorted(recorder.ids()) == want,
        "the resumed consumer handled {} events, wanted the 10 new ones",
        recorder.count()
    );
    Ok(Outcome::Passed)
}

/// Two readers of one group sharing a checkpoint store never both own a partition:
/// the one that polled first holds them all and the other handles nothing, until the
/// first releases them; then the second takes over after the first's checkpoints.
async fn stream_one_owner_per_partition(h: &dyn StreamHarness) -> Result<Outcome> {
    let bus = h.bus().await?;
    let stream = h.new_stream().await?;
    let publisher = bus.publisher(&stream).await?;
    let store = Arc::new(MemoryCheckpointStore::new());
    let reader = |name: &'static str| {
        let bus = bus.clone();
        let store = store.clone();
        let stream = stream.clone();
        async move {
            Ok::<_, Error>(
                bus.stream_consumer(&stream, "shared")
                    .await?
                    .checkpoints(store)
                    .owner(name)
                    .start_at(StartPosition::Earliest),
            )
        }
    };
    let mut a = reader("reader-a").await?;
    let mut b = reader("reader-b").await?;
    let (seen_a, seen_b) = (Recorder::new(), Recorder::new());
    let (handle_a, handle_b) = (seen_a.handler(), seen_b.handler());
    // a polls first and takes every partition, before anything is readable.
    a.poll(&handle_a).await?;
    let first: Vec<Event> = (0..20)
        .map(|n| event("conformance.stream.owner", n))
        .collect::<Result<_>>()?;
    publish_all(&publisher, &first).await?;
    let until = Instant::now() + h.patience();
    while seen_a.count() + seen_b.count() < 20 && Instant::now() < until {
        let ra = a.poll(&handle_a).await?;
        let rb = b.poll(&handle_b).await?;
        if ra.handled + rb.handled == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    check!(
        seen_a.count() == 20 && seen_b.count() == 0,
        "reader a handled {} and reader b {} of 20: both owned partitions",
        seen_a.count(),
        seen_b.count()
    );
    a.release().await?;
    seen_a.clear();
    let second: Vec<Event> = (20..30)
        .map(|n| event("conformance.stream.owner", n))
        .collect::<Result<_>>()?;
    publish_all(&publisher, &second).await?;
    let until = Instant::now() + h.patience();
    while seen_b.count() < 10 && Instant::now() < until {
        if b.poll(&handle_b).await?.handled == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        a.poll(&handle_a).await?;
    }
    let want = sorted(second.iter().map(|e| e.id().to_owned()).collect());
    check!(
        sorted(seen_b.ids()) == want && seen_a.count() == 0,
        "after the hand-over reader b handled {} (wanted the 10 new ones) and reader a {}",
        seen_b.count(),
        seen_a.count()
    );
    Ok(Outcome::Passed)
}

/// Two consumer groups each read everything.
async fn stream_groups_are_independent(h: &dyn StreamHarness) -> Result<Outcome> {
    let bus = h.bus().await?;
    let stream = h.new_stream().await?;
    let publisher = bus.publisher(&stream).await?;
    let sent: Vec<Event> = (0..15)
        .map(|n| event("conformance.stream.groups", n))
        .collect::<Result<_>>()?;
    publish_all(&publisher, &sent).await?;
    let want = sorted(sent.iter().map(|e| e.id().to_owned()).collect());
    for group in ["billing", "audit"] {
        let recorder = Recorder::new();
        let mut c = bus
            .stream_consumer(&stream, group)
            .await?
            .start_at(StartPosition::Earliest);
        read_until(&mut c, &recorder, sent.len(), h.patience()).await?;
        check!(
            sorted(recorder.ids()) == want,
            "group {group} handled {} of {}",
            recorder.count(),
            sent.len()
        );
    }
    Ok(Outcome::Passed)
}

/// A group starting at `Latest` reads only what is written after it started.
async fn stream_latest_skips_earlier_records(h: &dyn StreamHarness) -> Result<Outcome> {
    let bus = h.bus().await?;
    let stream = h.new_stream().await?;
    let publisher = bus.publisher(&stream).await?;
    let old: Vec<Event> = (0..5)
        .map(|n| event("conformance.stream.old", n))
        .collect::<Result<_>>()?;
    publish_all(&publisher, &old).await?;
    let recorder = Recorder::new();
    let mut c = bus
        .stream_consumer(&stream, "late")
        .await?
        .start_at(StartPosition::Latest);
    // The first poll takes the positions.
    c.poll(&recorder.handler()).await?;
    let new: Vec<Event> = (0..5)
        .map(|n| event("conformance.stream.new", n))
        .collect::<Result<_>>()?;
    publish_all(&publisher, &new).await?;
    read_until(&mut c, &recorder, new.len(), h.patience()).await?;
    let want = sorted(new.iter().map(|e| e.id().to_owned()).collect());
    check!(
        sorted(recorder.ids()) == want,
        "handled {:?}, wanted only the 5 new events",
        recorder.ids()
    );
    Ok(Outcome::Passed)
}

/// After reading everything, a replay from the earliest record reads it all again.
async fn stream_replay_from_earliest(h: &dyn StreamHarness) -> Result<Outcome> {
    let (_, publisher, mut consumer) = stream_fixture(h).await?;
    let sent: Vec<Event> = (0..12)
        .map(|n| event("conformance.stream.replay", n))
        .collect::<Result<_>>()?;
    publish_all(&publisher, &sent).await?;
    let recorder = Recorder::new();
    read_until(&mut consumer, &recorder, sent.len(), h.patience()).await?;
    check!(
        recorder.count() == sent.len(),
        "handled {}",
        recorder.count()
    );
    recorder.clear();
    consumer.replay(StartPosition::Earliest);
    read_until(&mut consumer, &recorder, sent.len(), h.patience()).await?;
    let want = sorted(sent.iter().map(|e| e.id().to_owned()).collect());
    check!(
        sorted(recorder.ids()) == want,
        "the replay handled {} of {}",
        recorder.count(),
        sent.len()
    );
    Ok(Outcome::Passed)
}

/// A replay from a time reads the records written from then on, and not those before.
async fn stream_replay_from_time(h: &dyn StreamHarness) -> Result<Outcome> {
    let (_, publisher, mut consumer) = stream_fixture(h).await?;
    let before: Vec<Event> = (0..5)
        .map(|n| event("conformance.stream.before", n))
        .collect::<Result<_>>()?;
    publish_all(&publisher, &before).await?;
    // A margin on each side of the mark for the stream's clock and its granularity.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let mark = chrono::Utc::now();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after: Vec<Event> = (0..5)
        .map(|n| event("conformance.stream.after", n))
        .collect::<Result<_>>()?;
    publish_all(&publisher, &after).await?;
    let recorder = Recorder::new();
    read_until(&mut consumer, &recorder, 10, h.patience()).await?;
    check!(recorder.count() == 10, "handled {}", recorder.count());
    recorder.clear();
    consumer.replay(StartPosition::AtTime(mark));
    read_until(&mut consumer, &recorder, after.len(), h.patience()).await?;
    let want = sorted(after.iter().map(|e| e.id().to_owned()).collect());
    check!(
        sorted(recorder.ids()) == want,
        "the replay from {mark} handled {:?}",
        recorder.ids()
    );
    Ok(Outcome::Passed)
}

/// A handler failing twice is retried, and its third attempt succeeds.
async fn stream_failing_handler_is_retried(h: &dyn StreamHarness) -> Result<Outcome> {
    let (_, publisher, mut consumer) = stream_fixture(h).await?;
    let flaky = event("conformance.stream.flaky", 0)?;
    let flaky_id = flaky.id().to_owned();
    let sent = vec![flaky, event("conformance.stream.fine", 1)?];
    publish_all(&publisher, &sent).await?;
    let recorder = Recorder::failing(move |e, attempt| {
        (e.id() == flaky_id && attempt < 3).then(|| HandlerError::retry("not yet"))
    });
    read_until(&mut consumer, &recorder, 2, h.patience()).await?;
    let got = recorder.handled();
    check!(got.len() == 2, "handled {}", got.len());
    let attempts: HashMap<&str, u32> = got.iter().map(|(e, a, _)| (e.id(), *a)).collect();
    check!(
        attempts.get(sent[0].id()) == Some(&3),
        "the flaky event succeeded at attempt {:?}",
        attempts.get(sent[0].id())
    );
    Ok(Outcome::Passed)
}

/// Reads the dead-letter place until `count` deliveries arrived.
async fn dead_letters_in(
    h: &dyn StreamHarness,
    place: &str,
    count: usize,
) -> Result<Vec<Delivery>> {
    let (bus, topic) = (h.dead_letter_bus().await?, place);
    let consumer = bus.consumer(topic, topic).await?;
    let until = Instant::now() + h.patience();
    let mut out = Vec::new();
    while out.len() < count && Instant::now() < until {
        out.extend(consumer.receive_batch(10, Duration::from_secs(1)).await?);
    }
    for r in consumer.ack_all(&out).await {
        r?;
    }
    Ok(out)
}

/// A record that fails every attempt goes to the dead-letter place with its reason,
/// and reading goes on past it.
async fn stream_dead_letters_after_retries(h: &dyn StreamHarness) -> Result<Outcome> {
    let (_, publisher, consumer) = stream_fixture(h).await?;
    let place = h.dead_letter_place().await?;
    let sink = h.dead_letter_bus().await?.publisher(&place).await?;
    let mut consumer = consumer.dead_letter_to(sink);
    let poison = event("conformance.stream.poison", 0)?;
    let poison_id = poison.id().to_owned();
    let sent = vec![
        event("conformance.stream.fine", 1)?,
        poison,
        event("conformance.stream.fine", 2)?,
    ];
    publish_all(&publisher, &sent).await?;
    let rule_id = poison_id.clone();
    let recorder = Recorder::failing(move |e, _| {
        (e.id() == rule_id).then(|| HandlerError::retry("always fails"))
    });
    let dead = read_counting(&mut consumer, &recorder, 2, 1, h.patience()).await?;
    check!(dead == 1, "dead-lettered {dead}");
    check!(recorder.count() == 2, "handled {}", recorder.count());
    let letters = dead_letters_in(h, &place, 1).await?;
    check!(
        letters.len() == 1,
        "the dead-letter place holds {}",
        letters.len()
    );
    let letter = letters[0].event();
    check!(letter.id() == poison_id, "dead letter {}", letter.id());
    let reason = letter
        .extension_str(EXT_DEAD_LETTER_REASON)
        .unwrap_or_default();
    check!(
        reason.contains("max delivery attempts (3) exceeded"),
        "reason {reason:?}"
    );
    Ok(Outcome::Passed)
}

/// A record that is not a CloudEvent never reaches the handler: it goes to the
/// dead-letter place with the reason, and reading goes on past it.
async fn stream_malformed_record_dead_lettered(h: &dyn StreamHarness) -> Result<Outcome> {
    let (_, publisher, consumer) = stream_fixture(h).await?;
    need!(
        publisher.capabilities().raw_messages,
        "raw (non-CloudEvent) records"
    );
    let place = h.dead_letter_place().await?;
    let dl_bus = h.dead_letter_bus().await?;
    let mut consumer = consumer.dead_letter_to(dl_bus.publisher(&place).await?);
    publisher
        .publish_raw(RawMessage::new("this is not a cloud event"))
        .await?;
    let fine = event("conformance.stream.fine", 0)?;
    publisher.publish(fine.clone()).await?;
    let recorder = Recorder::new();
    let dead = read_counting(&mut consumer, &recorder, 1, 1, h.patience()).await?;
    check!(dead == 1, "dead-lettered {dead}");
    check!(
        recorder.ids() == vec![fine.id().to_owned()],
        "handled {:?}",
        recorder.ids()
    );
    // The place's own consumer refuses the raw record in turn: it lands among the
    // place's dead letters, still carrying the stream's reason.
    let dlq = dl_bus.dead_letters(&place, &place).await?;
    let until = Instant::now() + h.patience();
    let letters = loop {
        let consumer = dl_bus.consumer(&place, &place).await?;
        let _ = consumer.receive_batch(10, Duration::from_secs(1)).await?;
        let l = dlq.peek(10).await?;
        if !l.is_empty() || Instant::now() > until {
            break l;
        }
    };
    check!(
        letters.len() == 1,
        "the place has {} dead letters",
        letters.len()
    );
    let Payload::Raw(raw) = &letters[0].payload else {
        return Err(Error::new(
            ErrorKind::Internal,
            "the malformed record came back as an event",
        ));
    };
    check!(
        raw.body == b"this is not a cloud event",
        "body {:?}",
        String::from_utf8_lossy(&raw.body)
    );
    check!(
        raw.attributes
            .get(EXT_DEAD_LETTER_REASON)
            .is_some_and(|r| r.starts_with("malformed") && r.contains("not a CloudEvent")),
        "attributes {:?}",
        raw.attributes
    );
    Ok(Outcome::Passed)
}

/// 2,000 events published without waiting, then a publisher close: all are read.
async fn stream_publisher_close_loses_none(h: &dyn StreamHarness) -> Result<Outcome> {
    let (_, publisher, mut consumer) = stream_fixture(h).await?;
    let count = 2_000;
    let mut ids = HashSet::new();
    for n in 0..count {
        let e = event("conformance.stream.bulk", n)?;
        ids.insert(e.id().to_owned());
        // Dropping the handle leaves the event queued in the publisher.
        drop(publisher.publish(e));
    }
    publisher.close().await?;
    let recorder = Recorder::new();
    read_until(&mut consumer, &recorder, count, h.patience() * 2).await?;
    let got: HashSet<String> = recorder.ids().into_iter().collect();
    check!(got == ids, "read {} of {count} distinct events", got.len());
    check!(
        recorder.count() == count,
        "handled {} times",
        recorder.count()
    );
    Ok(Outcome::Passed)
}

/// Handlers continue the trace the event carries.
async fn stream_trace_context_propagates(h: &dyn StreamHarness) -> Result<Outcome> {
    let (_, publisher, mut consumer) = stream_fixture(h).await?;
    let root = TraceContext::new_root();
    let e = root
        .scope(async { EventBuilder::new("conformance.stream.trace", "/c").build() })
        .await?;
    publisher.publish(e).await?;
    let recorder = Recorder::new();
    read_until(&mut consumer, &recorder, 1, h.patience()).await?;
    let got = recorder.handled();
    check!(got.len() == 1, "handled {}", got.len());
    check!(
        got[0].2 == root.trace_id(),
        "the handler ran in trace {}, the event was made in {}",
        got[0].2,
        root.trace_id()
    );
    Ok(Outcome::Passed)
}

/// Reading a stream that does not exist is a typed NotFound.
async fn stream_missing_is_not_found(h: &dyn StreamHarness) -> Result<Outcome> {
    let bus = h.bus().await?;
    let missing = format!("missing-{:08x}", fastrand::u32(..));
    let err = match bus.stream_consumer(&missing, "g").await {
        Err(e) => e,
        Ok(mut c) => match c.poll(&Recorder::new().handler()).await {
            Err(e) => e,
            Ok(r) => {
                return Err(Error::new(
                    ErrorKind::Internal,
                    format!("reading a missing stream gave {r:?}"),
                ));
            }
        },
    };
    check!(err.kind() == ErrorKind::NotFound, "got {err}");
    Ok(Outcome::Passed)
}

/// The cases of this module, in order: the only list (a case function missing here
/// is dead code, an error).
pub const CASES: &[crate::harness::Case<dyn StreamHarness>] = registry![
    stream_round_trip_keeps_every_attribute,
    stream_order_per_key,
    stream_checkpoint_resume,
    stream_one_owner_per_partition,
    stream_groups_are_independent,
    stream_latest_skips_earlier_records,
    stream_replay_from_earliest,
    stream_replay_from_time,
    stream_failing_handler_is_retried,
    stream_dead_letters_after_retries,
    stream_malformed_record_dead_lettered,
    stream_publisher_close_loses_none,
    stream_trace_context_propagates,
    stream_missing_is_not_found,
];
