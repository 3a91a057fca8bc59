//! The conformance cases. Each takes a [`Harness`] and checks one behaviour.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::{Harness, Outcome};
use cloudbus_core::Bus;
use cloudbus_core::capabilities::FilterSupport;
use cloudbus_core::codec::RawMessage;
use cloudbus_core::consumer::{Consumer, Delivery};
use cloudbus_core::driver::{Payload, PublishOptions, SubscriptionSpec};
use cloudbus_core::error::{Error, ErrorKind, Result};
use cloudbus_core::event::{AttributesReader, Event, EventBuilder, EventExt};
use cloudbus_core::filter::Filter;
use cloudbus_core::idempotency::{Idempotent, MemoryDedupStore};
use cloudbus_core::publisher::Publisher;
use cloudbus_core::retry::RetryPolicy;
use cloudbus_core::trace_context::TraceContext;
use cloudbus_core::worker::{HandlerContext, HandlerError, WorkerOptions};

/// A topic and one subscription with unique names.
struct Fixture {
    bus: Bus,
    topic: String,
    sub: String,
    publisher: Publisher,
    consumer: Consumer,
}

async fn fixture(
    h: &dyn Harness,
    tune: impl FnOnce(SubscriptionSpec) -> SubscriptionSpec,
) -> Result<Fixture> {
    let bus = h.bus().await?;
    let topic = h.unique("t");
    let sub = h.unique("s");
    bus.ensure_topic(&topic).await?;
    bus.ensure_subscription(&tune(SubscriptionSpec::new(&topic, &sub)))
        .await?;
    let publisher = bus.publisher(&topic).await?;
    let consumer = bus.consumer(&topic, &sub).await?;
    Ok(Fixture {
        bus,
        topic,
        sub,
        publisher,
        consumer,
    })
}

/// What the drivers under test declare they can do, read from a new topic and
/// subscription of the harness (see [`declared_capabilities`](crate::harness::declared_capabilities)).
async fn declared(h: &dyn Harness) -> Result<cloudbus_core::Capabilities> {
    let f = fixture(h, |spec| spec).await?;
    Ok(crate::harness::declared_capabilities(
        &f.publisher,
        &f.consumer,
    ))
}

fn event(ty: &str, n: usize) -> Result<Event> {
    EventBuilder::new(ty, "/conformance")
        .subject(format!("n-{n}"))
        .json(&serde_json::json!({ "n": n }))?
        .build()
}

fn events(ty: &str, count: usize) -> Result<Vec<Event>> {
    (0..count).map(|n| event(ty, n)).collect()
}

/// Receives until `count` deliveries arrived or patience ran out.
async fn drain(consumer: &Consumer, count: usize, patience: Duration) -> Result<Vec<Delivery>> {
    let until = Instant::now() + patience;
    let mut out = Vec::new();
    while out.len() < count && Instant::now() < until {
        let left = until.saturating_duration_since(Instant::now());
        let wait = left.min(Duration::from_secs(1));
        out.extend(consumer.receive_batch(count - out.len(), wait).await?);
    }
    Ok(out)
}

/// Receives for `window`; returns whatever arrived (to prove that nothing does).
async fn quiet(consumer: &Consumer, window: Duration) -> Result<Vec<Delivery>> {
    let until = Instant::now() + window;
    let mut out = Vec::new();
    while Instant::now() < until {
        let left = until.saturating_duration_since(Instant::now());
        out.extend(
            consumer
                .receive_batch(10, left.min(Duration::from_millis(500)))
                .await?,
        );
    }
    Ok(out)
}

async fn ack_all(consumer: &Consumer, ds: &[Delivery]) -> Result<()> {
    for r in consumer.ack_all(ds).await {
        r?;
    }
    Ok(())
}

async fn publish_all(p: &Publisher, evs: Vec<Event>) -> Result<()> {
    for r in p.publish_batch(evs).await {
        r?;
    }
    Ok(())
}

fn ids(ds: &[Delivery]) -> HashSet<String> {
    ds.iter().map(|d| d.event().id().to_owned()).collect()
}

/// Go CDK: send and receive one event; the same event comes back.
async fn send_receive_one(h: &dyn Harness) -> Result<Outcome> {
    let f = fixture(h, |s| s).await?;
    let e = event("conformance.one", 1)?;
    f.publisher.publish(e.clone()).await?;
    let got = drain(&f.consumer, 1, h.patience()).await?;
    check!(got.len() == 1, "expected one delivery, got {}", got.len());
    check!(got[0].event().id() == e.id(), "id changed");
    check!(got[0].event().data() == e.data(), "data changed");
    check!(
        got[0].attempt() == 1,
        "first attempt is {}",
        got[0].attempt()
    );
    got[0].ack().await?;
    Ok(Outcome::Passed)
}

/// Watermill: publish 100, receive exactly those 100, then nothing more.
async fn publish_subscribe_100(h: &dyn Harness) -> Result<Outcome> {
    let f = fixture(h, |s| s).await?;
    let evs = events("conformance.hundred", 100)?;
    let want: HashSet<String> = evs.iter().map(|e| e.id().to_owned()).collect();
    publish_all(&f.publisher, evs).await?;
    let got = drain(&f.consumer, 100, h.patience()).await?;
    check!(
        ids(&got) == want,
        "received {} distinct of 100",
        ids(&got).len()
    );
    check!(got.len() == 100, "{} deliveries for 100 events", got.len());
    ack_all(&f.consumer, &got).await?;
    let extra = quiet(&f.consumer, Duration::from_millis(500)).await?;
    check!(
        extra.is_empty(),
        "{} unexpected redeliveries after ack",
        extra.len()
    );
    Ok(Outcome::Passed)
}

/// Go CDK: JSON, text and binary (non-UTF-8) data survive the trip.
async fn json_text_and_binary_bodies(h: &dyn Harness) -> Result<Outcome> {
    let f = fixture(h, |s| s).await?;
    let sent = vec![
        EventBuilder::new("conformance.body", "/c")
            .json(&serde_json::json!({"nested": {"list": [1, 2.5, "x", null, true]}}))?
            .build()?,
        EventBuilder::new("conformance.body", "/c")
            .data("text/plain", "héllo, wörld")
            .build()?,
        EventBuilder::new("conformance.body", "/c")
            .data(
                "application/octet-stream",
                vec![0u8, 0xff, 0xfe, 0x80, 10, 13],
            )
            .build()?,
    ];
    for e in &sent {
        f.publisher.publish(e.clone()).await?;
    }
    let got = drain(&f.consumer, 3, h.patience()).await?;
    check!(got.len() == 3, "got {}", got.len());
    for e in &sent {
        let Some(d) = got.iter().find(|d| d.event().id() == e.id()) else {
            return Err(Error::new(
                ErrorKind::Internal,
                format!("event {} missing", e.id()),
            ));
        };
        check!(
            d.event().data() == e.data(),
            "data of {} changed: {:?}",
            e.id(),
            d.event().data()
        );
        check!(
            d.event().datacontenttype() == e.datacontenttype(),
            "content type changed"
        );
    }
    ack_all(&f.consumer, &got).await?;
    Ok(Outcome::Passed)
}

/// Go CDK: every attribute and extension round-trips.
async fn metadata_round_trip(h: &dyn Harness) -> Result<Outcome> {
    let f = fixture(h, |s| s).await?;
    let e = EventBuilder::new("com.example.conformance.meta", "https://example.com/src")
        .id("meta-1")
        .subject("subject/with spaces")
        .time_rfc3339("2026-11-27T10:11:12.345678Z")
        .dataschema("https://example.com/schema/v1.json")
        .partition_key("key-1")
        .correlation_id("corr-1")
        .causation_id("cause-1")
        .traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
        .extension("tracestate", "vendor=value")
        .extension("tenant", "acme")
        .json(&serde_json::json!({"k": "v"}))?
        .build()?;
    f.publisher.publish(e.clone()).await?;
    let got = drain(&f.consumer, 1, h.patience()).await?;
    check!(got.len() == 1, "got {}", got.len());
    let r = got[0].event();
    check!(*r == e, "event changed in transit:\nsent {e:?}\ngot  {r:?}");
    check!(
        r.extensions_text() == e.extensions_text(),
        "extensions changed"
    );
    got[0].ack().await?;
    Ok(Outcome::Passed)
}

/// Go CDK / Watermill: two subscriptions each receive every event.
async fn fan_out_two_subscriptions(h: &dyn Harness) -> Result<Outcome> {
    let caps = declared(h).await?;
    need!(caps.fan_out, "fan-out");
    let f = fixture(h, |s| s).await?;
    let second = h.unique("s2");
    f.bus
        .ensure_subscription(&SubscriptionSpec::new(&f.topic, &second))
        .await?;
    let other = f.bus.consumer(&f.topic, &second).await?;
    let evs = events("conformance.fanout", 10)?;
    let want: HashSet<String> = evs.iter().map(|e| e.id().to_owned()).collect();
    publish_all(&f.publisher, evs).await?;
    for c in [&f.consumer, &other] {
        let got = drain(c, 10, h.patience()).await?;
        check!(
            ids(&got) == want,
            "{} got {} of 10",
            c.name(),
            ids(&got).len()
        );
        ack_all(c, &got).await?;
    }
    Ok(Outcome::Passed)
}

/// Watermill consumer groups / Dapr: consumers of one subscription share the work.
async fn competing_consumers_share_work(h: &dyn Harness) -> Result<Outcome> {
    let f = fixture(h, |s| s).await?;
    let second = f.bus.consumer(&f.topic, &f.sub).await?;
    let evs = events("conformance.compete", 50)?;
    publish_all(&f.publisher, evs).await?;
    let patience = h.patience();
    let taken = AtomicU32::new(0);
    let (a, b) = tokio::join!(
        take_acking(&f.consumer, &taken, 50, patience),
        take_acking(&second, &taken, 50, patience)
    );
    let (a, b) = (a?, b?);
    let all: HashSet<&String> = a.iter().chain(b.iter()).collect();
    check!(
        a.len() + b.len() == 50,
        "{} + {} deliveries for 50 events",
        a.len(),
        b.len()
    );
    check!(all.len() == 50, "{} distinct of 50", all.len());
    Ok(Outcome::Passed)
}

/// Receives and acks in small batches until the consumers together took `total`
/// (delivery into the subscription may lag behind the publish, so an empty receive
/// does not mean the subscription is dry) or patience ran out; returns the ids.
async fn take_acking(
    consumer: &Consumer,
    taken: &AtomicU32,
    total: u32,
    patience: Duration,
) -> Result<Vec<String>> {
    let mut got = Vec::new();
    let until = Instant::now() + patience;
    while Instant::now() < until && taken.load(Ordering::SeqCst) < total {
        let batch = consumer
            .receive_batch(5, Duration::from_millis(300))
            .await?;
        ack_all(consumer, &batch).await?;
        taken.fetch_add(batch.len() as u32, Ordering::SeqCst);
        got.extend(batch.iter().map(|d| d.event().id().to_owned()));
        tokio::task::yield_now().await;
    }
    Ok(got)
}

/// Go CDK: a nacked event comes back with the next attempt number.
async fn nack_redelivers_with_next_attempt(h: &dyn Harness) -> Result<Outcome> {
    let f = fixture(h, |s| s).await?;
    f.publisher.publish(event("conformance.nack", 0)?).await?;
    let first = drain(&f.consumer, 1, h.patience()).await?;
    check!(first.len() == 1, "got {}", first.len());
    first[0].nack(Duration::ZERO).await?;
    let again = drain(&f.consumer, 1, h.patience()).await?;
    check!(again.len() == 1, "not redelivered after nack");
    check!(
        again[0].event().id() == first[0].event().id(),
        "a different event came back"
    );
    check!(
        again[0].attempt() == 2,
        "attempt after one nack is {}",
        again[0].attempt()
    );
    again[0].ack().await?;
    Ok(Outcome::Passed)
}

/// Dapr retry semantics: nack(delay) holds the event back for the delay.
async fn nack_delay_is_honoured(h: &dyn Harness) -> Result<Outcome> {
    let caps = declared(h).await?;
    need!(caps.nack_delay, "nack delays");
    let f = fixture(h, |s| s).await?;
    f.publisher
        .publish(event("conformance.nackdelay", 0)?)
        .await?;
    let first = drain(&f.consumer, 1, h.patience()).await?;
    check!(first.len() == 1, "got {}", first.len());
    let delay = Duration::from_secs(2);
    let nacked_at = Instant::now();
    first[0].nack(delay).await?;
    let early = quiet(&f.consumer, Duration::from_millis(1000)).await?;
    check!(
        early.is_empty(),
        "redelivered {:?} after nack({delay:?})",
        nacked_at.elapsed()
    );
    let again = drain(&f.consumer, 1, h.patience()).await?;
    check!(again.len() == 1, "never redelivered");
    check!(
        nacked_at.elapsed() >= delay - Duration::from_millis(100),
        "redelivered after {:?}",
        nacked_at.elapsed()
    );
    again[0].ack().await?;
    Ok(Outcome::Passed)
}

/// Go CDK: settling twice is a typed error, not a panic.
async fn double_ack_is_an_error(h: &dyn Harness) -> Result<Outcome> {
    let f = fixture(h, |s| s).await?;
    f.publisher.publish(event("conformance.double", 0)?).await?;
    let got = drain(&f.consumer, 1, h.patience()).await?;
    check!(got.len() == 1, "got {}", got.len());
    got[0].ack().await?;
    let twice = got[0].ack().await;
    check!(
        matches!(&twice, Err(e) if e.kind() == ErrorKind::AlreadySettled),
        "second ack: {twice:?}"
    );
    let nack = got[0].nack(Duration::ZERO).await;
    check!(
        matches!(&nack, Err(e) if e.kind() == ErrorKind::AlreadySettled),
        "nack after ack: {nack:?}"
    );
    let dl = got[0].dead_letter("late").await;
    check!(
        matches!(&dl, Err(e) if e.kind() == ErrorKind::AlreadySettled),
        "dead-letter after ack: {dl:?}"
    );
    Ok(Outcome::Passed)
}

/// Dapr visibility timeout / Watermill no-ack: an unsettled event comes back after its lease.
async fn unacked_is_redelivered_after_lease(h: &dyn Harness) -> Result<Outcome> {
    let lease = h.short_lease();
    let f = fixture(h, |s| s.lease(lease)).await?;
    f.publisher.publish(event("conformance.lease", 0)?).await?;
    let first = drain(&f.consumer, 1, h.patience()).await?;
    check!(first.len() == 1, "got {}", first.len());
    let took = Instant::now();
    drop(first);
    let again = drain(&f.consumer, 1, h.patience() + lease).await?;
    check!(again.len() == 1, "not redelivered after the lease expired");
    check!(
        took.elapsed() >= lease - Duration::from_millis(100),
        "redelivered after only {:?}",
        took.elapsed()
    );
    check!(again[0].attempt() == 2, "attempt is {}", again[0].attempt());
    again[0].ack().await?;
    Ok(Outcome::Passed)
}

/// Extending the lease keeps the event from being redelivered.
async fn extend_keeps_the_lease(h: &dyn Harness) -> Result<Outcome> {
    let caps = declared(h).await?;
    need!(caps.lease_extension, "lease extension");
    let lease = h.short_lease();
    let f = fixture(h, |s| s.lease(lease)).await?;
    f.publisher.publish(event("conformance.extend", 0)?).await?;
    let got = drain(&f.consumer, 1, h.patience()).await?;
    check!(got.len() == 1, "got {}", got.len());
    let until = Instant::now() + lease * 3;
    while Instant::now() < until {
        got[0].extend(lease).await?;
        let stolen = f.consumer.receive_batch(1, lease / 3).await?;
        check!(
            stolen.is_empty(),
            "redelivered while its lease was being extended"
        );
    }
    got[0].ack().await?;
    Ok(Outcome::Passed)
}

/// Go CDK: a closed publisher refuses with Closed.
async fn closed_publisher_fails(h: &dyn Harness) -> Result<Outcome> {
    let f = fixture(h, |s| s).await?;
    f.publisher.close().await?;
    let r = f.publisher.publish(event("conformance.closed", 0)?).await;
    check!(
        matches!(&r, Err(e) if e.kind() == ErrorKind::Closed),
        "publish after close: {r:?}"
    );
    let b = f
        .publisher
        .publish_batch(events("conformance.closed", 2)?)
        .await;
    check!(
        b.iter()
            .all(|r| matches!(r, Err(e) if e.kind() == ErrorKind::Closed)),
        "batch after close: {b:?}"
    );
    Ok(Outcome::Passed)
}

/// Go CDK: a closed consumer refuses with Closed.
async fn closed_consumer_fails(h: &dyn Harness) -> Result<Outcome> {
    let f = fixture(h, |s| s).await?;
    f.consumer.close().await?;
    let r = f
        .consumer
        .receive_batch(1, Duration::from_millis(100))
        .await;
    check!(
        matches!(&r, Err(e) if e.kind() == ErrorKind::Closed),
        "receive after close: {r:?}"
    );
    Ok(Outcome::Passed)
}

/// Go CDK cancel: a receive given up by the caller leaves the consumer usable.
async fn receive_can_be_cancelled(h: &dyn Harness) -> Result<Outcome> {
    let f = fixture(h, |s| s).await?;
    let r = tokio::time::timeout(Duration::from_millis(200), f.consumer.receive()).await;
    check!(
        r.is_err(),
        "receive on an empty subscription returned {r:?}"
    );
    f.publisher.publish(event("conformance.cancel", 0)?).await?;
    let got = drain(&f.consumer, 1, h.patience()).await?;
    check!(
        got.len() == 1,
        "consumer unusable after a cancelled receive"
    );
    got[0].ack().await?;
    Ok(Outcome::Passed)
}

/// Go CDK lazy open: opening a missing topic works; sending to it is NotFound.
async fn send_to_missing_topic_is_not_found(h: &dyn Harness) -> Result<Outcome> {
    let bus = h.bus().await?;
    let p = bus.publisher(&h.unique("missing")).await?;
    let r = p.publish(event("conformance.missing", 0)?).await;
    check!(
        matches!(&r, Err(e) if e.kind() == ErrorKind::NotFound),
        "send to a missing topic: {r:?}"
    );
    Ok(Outcome::Passed)
}

/// Go CDK / Dapr non-existing entities: receiving from a missing subscription is NotFound.
async fn receive_from_missing_subscription_is_not_found(h: &dyn Harness) -> Result<Outcome> {
    let f = fixture(h, |s| s).await?;
    let c = f.bus.consumer(&f.topic, &h.unique("nosub")).await?;
    let r = c.receive_batch(1, Duration::from_millis(200)).await;
    check!(
        matches!(&r, Err(e) if e.kind() == ErrorKind::NotFound),
        "receive from a missing subscription: {r:?}"
    );
    Ok(Outcome::Passed)
}

async fn dead_letters_of(
    f: &Fixture,
    want: usize,
    patience: Duration,
) -> Result<Vec<cloudbus_core::DeadLetter>> {
    let dlq = f.bus.dead_letters(&f.topic, &f.sub).await?;
    let until = Instant::now() + patience;
    loop {
        let letters = dlq.peek(100).await?;
        if letters.len() >= want || Instant::now() >= until {
            return Ok(letters);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Publishes one event of type `ty`, receives it and dead-letters it as "poison";
/// returns it once it is in the dead-letter place.
async fn poison_one(h: &dyn Harness, f: &Fixture, ty: &str) -> Result<Event> {
    let e = event(ty, 0)?;
    f.publisher.publish(e.clone()).await?;
    let got = drain(&f.consumer, 1, h.patience()).await?;
    check!(got.len() == 1, "got {}", got.len());
    got[0].dead_letter("poison").await?;
    check!(
        dead_letters_of(f, 1, h.patience()).await?.len() == 1,
        "the letter was not dead-lettered"
    );
    Ok(e)
}

/// Dapr dead letter: an explicit dead-letter keeps the event and the reason.
async fn explicit_dead_letter_keeps_reason(h: &dyn Harness) -> Result<Outcome> {
    let caps = declared(h).await?;
    need!(caps.native_dead_letter, "a native dead-letter place");
    let f = fixture(h, |s| s).await?;
    let e = event("conformance.dlq", 0)?;
    f.publisher.publish(e.clone()).await?;
    let got = drain(&f.consumer, 1, h.patience()).await?;
    check!(got.len() == 1, "got {}", got.len());
    got[0]
        .dead_letter_with("bad-data", "field x is missing")
        .await?;
    let letters = dead_letters_of(&f, 1, h.patience()).await?;
    check!(letters.len() == 1, "{} dead letters", letters.len());
    check!(
        matches!(&letters[0].payload, Payload::Event(x) if x.id() == e.id()),
        "wrong dead letter"
    );
    if caps.dead_letter_reason {
        check!(
            letters[0].reason.as_deref() == Some("bad-data"),
            "reason {:?}",
            letters[0].reason
        );
    }
    let after = quiet(&f.consumer, Duration::from_millis(300)).await?;
    check!(after.is_empty(), "dead-lettered event was delivered again");
    Ok(Outcome::Passed)
}

/// Dapr dead letter: after N failed deliveries the provider dead-letters the event.
async fn dead_letter_after_max_attempts(h: &dyn Harness) -> Result<Outcome> {
    let caps = declared(h).await?;
    need!(caps.max_delivery_attempts, "a max delivery attempts policy");
    let f = fixture(h, |s| s.max_delivery_attempts(3)).await?;
    f.publisher
        .publish(event("conformance.maxattempts", 0)?)
        .await?;
    for attempt in 1..=3 {
        let got = drain(&f.consumer, 1, h.patience()).await?;
        check!(got.len() == 1, "attempt {attempt} not delivered");
        check!(
            got[0].attempt() == attempt,
            "attempt {} reported as {}",
            attempt,
            got[0].attempt()
        );
        got[0].nack(Duration::ZERO).await?;
    }
    let fourth = quiet(&f.consumer, Duration::from_millis(500)).await?;
    check!(fourth.is_empty(), "delivered a 4th time with max 3");
    let letters = dead_letters_of(&f, 1, h.patience()).await?;
    check!(letters.len() == 1, "{} dead letters", letters.len());
    Ok(Outcome::Passed)
}

/// Redrive moves dead letters back to the source subscription.
async fn redrive_returns_to_source(h: &dyn Harness) -> Result<Outcome> {
    let caps = declared(h).await?;
    need!(caps.native_dead_letter, "a native dead-letter place");
    let f = fixture(h, |s| s).await?;
    let e = poison_one(h, &f, "conformance.redrive").await?;
    let dlq = f.bus.dead_letters(&f.topic, &f.sub).await?;
    let moved = dlq.redrive_all().await?;
    check!(moved == 1, "redrove {moved}");
    let back = drain(&f.consumer, 1, h.patience()).await?;
    check!(
        back.len() == 1 && back[0].event().id() == e.id(),
        "redriven event not delivered"
    );
    back[0].ack().await?;
    check!(
        dlq.peek(10).await?.is_empty(),
        "dead letter still there after redrive"
    );
    Ok(Outcome::Passed)
}

/// A redrive of everything ends when a letter it sent back is dead-lettered again at
/// once by a consumer that refuses it every time, and the letter stays dead-lettered.
/// (Service Bus's redrive went round for ever on such a letter, which hung the order
/// saga; this holds every provider to it.)
async fn redrive_ends_when_a_letter_comes_back(h: &dyn Harness) -> Result<Outcome> {
    let caps = declared(h).await?;
    need!(caps.native_dead_letter, "a native dead-letter place");
    let f = fixture(h, |s| s).await?;
    let e = poison_one(h, &f, "conformance.poison").await?;
    let worker = f.consumer.clone().start_worker(
        |_e: Arc<Event>, _c: HandlerContext| async {
            Err::<(), _>(HandlerError::reject("still poison"))
        },
        WorkerOptions::default(),
    )?;
    let dlq = f.bus.dead_letters(&f.topic, &f.sub).await?;
    let limit = (h.patience() * 3).max(Duration::from_secs(60));
    let moved = tokio::time::timeout(limit, dlq.redrive_all()).await;
    // The redrive may end before the consumer refuses the letter again: wait for
    // it to come back before stopping the consumer.
    let letters = dead_letters_of(&f, 1, h.patience()).await;
    let _ = worker.shutdown(Duration::from_secs(5)).await;
    let Ok(moved) = moved else {
        check!(
            false,
            "redrive_all went round for {limit:?} and did not end"
        );
        return Ok(Outcome::Passed);
    };
    let moved = moved?;
    check!(moved >= 1, "redrove {moved}");
    let letters = letters?;
    check!(
        letters.len() == 1 && letters[0].payload.event().is_some_and(|d| d.id() == e.id()),
        "the refused letter is not dead-lettered once: {} letters",
        letters.len()
    );
    Ok(Outcome::Passed)
}

/// Purge deletes every dead letter; a bounded purge deletes no more than it is given.
async fn purge_empties_dead_letters(h: &dyn Harness) -> Result<Outcome> {
    let caps = declared(h).await?;
    need!(caps.native_dead_letter, "a native dead-letter place");
    let f = fixture(h, |s| s).await?;
    publish_all(&f.publisher, events("conformance.purge", 3)?).await?;
    let got = drain(&f.consumer, 3, h.patience()).await?;
    check!(got.len() == 3, "got {}", got.len());
    for d in &got {
        d.dead_letter("purge me").await?;
    }
    dead_letters_of(&f, 3, h.patience()).await?;
    let dlq = f.bus.dead_letters(&f.topic, &f.sub).await?;
    let purged = dlq.purge_up_to(1).await?;
    check!(purged == 1, "a purge of up to 1 purged {purged}");
    // What the bounded purge looked at and left is there again (not hidden, not lost).
    let left = dead_letters_of(&f, 2, h.patience()).await?;
    check!(left.len() == 2, "{} dead letters left, not 2", left.len());
    let purged = dlq.purge().await?;
    check!(purged == 2, "purged {purged}");
    check!(
        dlq.peek(10).await?.is_empty(),
        "dead letters left after purge"
    );
    Ok(Outcome::Passed)
}

/// Watermill in-order / Dapr FIFO: per ordering key in order, under a concurrent worker.
async fn ordering_per_key_under_concurrency(h: &dyn Harness) -> Result<Outcome> {
    let caps = declared(h).await?;
    need!(caps.ordering, "ordering keys");
    let f = fixture(h, |s| s.ordered(true)).await?;
    let keys = ["a", "b", "c", "d"];
    let per_key = 25;
    let mut batch = Vec::new();
    for n in 0..per_key {
        for k in keys {
            let e = EventBuilder::new("conformance.order", "/c")
                .subject(n.to_string())
                .partition_key(k)
                .build()?;
            batch.push((e, PublishOptions::ordered(k)));
        }
    }
    for r in f.publisher.publish_batch_with(batch).await {
        r?;
    }
    let seen: Arc<Mutex<HashMap<String, Vec<usize>>>> = Arc::default();
    let seen2 = seen.clone();
    let worker = f.consumer.start_worker(
        move |e: Arc<Event>, _ctx: HandlerContext| {
            let seen = seen2.clone();
            async move {
                // Jitter so that a broken implementation would interleave.
                tokio::time::sleep(Duration::from_micros(fastrand::u64(0..2000))).await;
                let n: usize = e.subject().unwrap_or("0").parse().unwrap_or(usize::MAX);
                if let Ok(mut s) = seen.lock() {
                    s.entry(e.partition_key().unwrap_or("").to_owned())
                        .or_default()
                        .push(n);
                }
                Ok::<(), HandlerError>(())
            }
        },
        WorkerOptions::default().concurrency(8),
    )?;
    let until = Instant::now() + h.patience();
    loop {
        let total: usize = seen
            .lock()
            .map(|s| s.values().map(Vec::len).sum())
            .unwrap_or(0);
        if total >= keys.len() * per_key || Instant::now() > until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    worker.shutdown(Duration::from_secs(5)).await;
    let seen = seen
        .lock()
        .map_err(|_| Error::new(ErrorKind::Internal, "poisoned"))?
        .clone();
    for k in keys {
        let got = seen.get(k).cloned().unwrap_or_default();
        let want: Vec<usize> = (0..per_key).collect();
        check!(
            got == want,
            "key {k} handled out of order or incompletely: {got:?}"
        );
    }
    Ok(Outcome::Passed)
}

/// Filters route each event to the subscriptions whose filter it matches.
async fn filter_routing(h: &dyn Harness) -> Result<Outcome> {
    let caps = declared(h).await?;
    need!(
        caps.filtering != FilterSupport::None,
        "subscription filters"
    );
    let bus = h.bus().await?;
    let topic = h.unique("t");
    bus.ensure_topic(&topic).await?;
    let orders = h.unique("orders");
    let vip = h.unique("vip");
    bus.ensure_subscription(
        &SubscriptionSpec::new(&topic, &orders)
            .filter(Filter::prefix("type", "com.example.order.")),
    )
    .await?;
    bus.ensure_subscription(&SubscriptionSpec::new(&topic, &vip).filter(Filter::and([
        Filter::eq("tier", "vip"),
        Filter::anything_but("type", ["com.example.order.cancelled"]),
    ])))
    .await?;
    let publisher = bus.publisher(&topic).await?;
    let mk = |ty: &str, tier: &str| {
        EventBuilder::new(ty, "/c")
            .extension("tier", tier.to_owned())
            .build()
    };
    let sent = vec![
        mk("com.example.order.created", "vip")?,
        mk("com.example.order.cancelled", "vip")?,
        mk("com.example.payment.done", "vip")?,
        mk("com.example.order.created", "basic")?,
        mk("com.example.payment.done", "basic")?,
    ];
    let expect = |f: &Filter| -> HashSet<String> {
        sent.iter()
            .filter(|e| f.matches(e))
            .map(|e| e.id().to_owned())
            .collect()
    };
    let want_orders = expect(&Filter::prefix("type", "com.example.order."));
    let want_vip = expect(&Filter::and([
        Filter::eq("tier", "vip"),
        Filter::anything_but("type", ["com.example.order.cancelled"]),
    ]));
    publish_all(&publisher, sent.clone()).await?;
    for (sub, want) in [(&orders, want_orders), (&vip, want_vip)] {
        let c = bus.consumer(&topic, sub).await?;
        let mut got = drain(&c, want.len(), h.patience()).await?;
        got.extend(quiet(&c, Duration::from_millis(500)).await?);
        check!(
            ids(&got) == want,
            "subscription {sub} got {:?}, wanted {:?}",
            ids(&got),
            want
        );
        ack_all(&c, &got).await?;
    }
    Ok(Outcome::Passed)
}

/// Delayed delivery: nothing before the delay, the event after it.
async fn delayed_delivery(h: &dyn Harness) -> Result<Outcome> {
    let caps = declared(h).await?;
    need!(caps.max_delay.is_some(), "delayed delivery");
    let f = fixture(h, |s| s).await?;
    let delay = Duration::from_secs(2);
    let sent_at = Instant::now();
    f.publisher
        .publish_with(
            event("conformance.delay", 0)?,
            PublishOptions::delayed(delay),
        )
        .await?;
    let early = quiet(&f.consumer, Duration::from_millis(1000)).await?;
    check!(
        early.is_empty(),
        "delivered after {:?} with a {delay:?} delay",
        sent_at.elapsed()
    );
    let got = drain(&f.consumer, 1, h.patience() + delay).await?;
    check!(got.len() == 1, "never delivered");
    check!(
        sent_at.elapsed() >= delay - Duration::from_millis(100),
        "delivered after {:?}",
        sent_at.elapsed()
    );
    got[0].ack().await?;
    Ok(Outcome::Passed)
}

async fn malformed_case(h: &dyn Harness, raw: RawMessage, want_reason: &str) -> Result<Outcome> {
    let caps = declared(h).await?;
    need!(caps.raw_messages, "raw (non-CloudEvent) publishing");
    need!(caps.native_dead_letter, "a native dead-letter place");
    let f = fixture(h, |s| s).await?;
    f.publisher.publish_raw(raw.clone()).await?;
    let good = event("conformance.afterbad", 0)?;
    f.publisher.publish(good.clone()).await?;
    // The consumer never hands the malformed message to the caller...
    let got = drain(&f.consumer, 1, h.patience()).await?;
    check!(
        got.len() == 1 && got[0].event().id() == good.id(),
        "expected only the good event, got {got:?}"
    );
    ack_all(&f.consumer, &got).await?;
    // ...it lands in the dead-letter place with the reason. Where delivery is not in
    // publish order (SNS, EventBridge), the bad message may come after the good one:
    // keep receiving (nothing may reach the caller) until it has been dead-lettered.
    let dlq = f.bus.dead_letters(&f.topic, &f.sub).await?;
    let until = Instant::now() + h.patience();
    let letters = loop {
        let more = quiet(&f.consumer, Duration::from_millis(500)).await?;
        check!(
            more.is_empty(),
            "a malformed message reached the caller: {more:?}"
        );
        let letters = dlq.peek(100).await?;
        if !letters.is_empty() || Instant::now() >= until {
            break letters;
        }
    };
    check!(letters.len() == 1, "{} dead letters", letters.len());
    let reason = letters[0].reason.clone().unwrap_or_default();
    check!(
        reason.contains(want_reason),
        "reason {reason:?} does not say {want_reason:?}"
    );
    match &letters[0].payload {
        Payload::Raw(r) => check!(r.body == raw.body, "body changed"),
        Payload::Event(e) => {
            return Err(Error::new(
                ErrorKind::Internal,
                format!("dead letter decoded as {e:?}"),
            ));
        }
    }
    Ok(Outcome::Passed)
}

/// A foreign message (not a CloudEvent at all) is dead-lettered with its reason.
async fn foreign_message_dead_lettered(h: &dyn Harness) -> Result<Outcome> {
    malformed_case(
        h,
        RawMessage::new("just some bytes").with_attribute("origin", "legacy"),
        "not a CloudEvent",
    )
    .await
}

/// Broken structured JSON is dead-lettered with its reason.
async fn broken_json_dead_lettered(h: &dyn Harness) -> Result<Outcome> {
    malformed_case(
        h,
        RawMessage::new(r#"{"specversion":"1.0","id":"#).with_attribute(
            "content-type",
            cloudbus_core::codec::STRUCTURED_CONTENT_TYPE,
        ),
        "invalid JSON",
    )
    .await
}

/// A CloudEvent missing a required attribute is dead-lettered with its reason.
async fn missing_required_attributes_dead_lettered(h: &dyn Harness) -> Result<Outcome> {
    malformed_case(
        h,
        RawMessage::new(r#"{"specversion":"1.0","id":"x-1","type":"t"}"#).with_attribute(
            "content-type",
            cloudbus_core::codec::STRUCTURED_CONTENT_TYPE,
        ),
        "source",
    )
    .await
}

/// Watermill: closing a publisher with 10,000 events accepted loses none.
async fn publisher_close_loses_none_of_10000(h: &dyn Harness) -> Result<Outcome> {
    let f = fixture(h, |s| s).await?;
    let n = 10_000;
    let mut handles = Vec::with_capacity(n);
    let mut want = HashSet::with_capacity(n);
    for i in 0..n {
        let e = EventBuilder::new("conformance.close", "/c")
            .subject(i.to_string())
            .build()?;
        want.insert(e.id().to_owned());
        handles.push(f.publisher.publish(e));
    }
    f.publisher.close().await?;
    for h in handles {
        h.await?;
    }
    let mut got = HashSet::with_capacity(n);
    let until = Instant::now() + h.patience() * 6;
    while got.len() < n && Instant::now() < until {
        let batch = f
            .consumer
            .receive_batch(1000, Duration::from_millis(500))
            .await?;
        ack_all(&f.consumer, &batch).await?;
        got.extend(batch.iter().map(|d| d.event().id().to_owned()));
    }
    check!(got == want, "received {} of {n}", got.len());
    Ok(Outcome::Passed)
}

/// Dapr stop-one-subscriber / graceful shutdown: in-flight work finishes and is settled.
async fn graceful_shutdown_finishes_in_flight(h: &dyn Harness) -> Result<Outcome> {
    let f = fixture(h, |s| s).await?;
    publish_all(&f.publisher, events("conformance.shutdown", 4)?).await?;
    let started = Arc::new(AtomicU32::new(0));
    let finished = Arc::new(AtomicU32::new(0));
    let (s2, f2) = (started.clone(), finished.clone());
    let worker = f.consumer.start_worker(
        move |_e: Arc<Event>, _c: HandlerContext| {
            let (s, f) = (s2.clone(), f2.clone());
            async move {
                s.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(500)).await;
                f.fetch_add(1, Ordering::SeqCst);
                Ok::<(), HandlerError>(())
            }
        },
        WorkerOptions::default().concurrency(4),
    )?;
    let until = Instant::now() + h.patience();
    while started.load(Ordering::SeqCst) < 4 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    check!(
        started.load(Ordering::SeqCst) == 4,
        "only {} handlers started",
        started.load(Ordering::SeqCst)
    );
    let report = worker.shutdown(Duration::from_secs(10)).await;
    check!(
        finished.load(Ordering::SeqCst) == 4,
        "{} of 4 finished",
        finished.load(Ordering::SeqCst)
    );
    check!(
        report.acked == 4 && report.abandoned == 0,
        "report {report:?}"
    );
    let again = quiet(&f.consumer, Duration::from_millis(500)).await?;
    check!(
        again.is_empty(),
        "{} events redelivered after a graceful shutdown",
        again.len()
    );
    Ok(Outcome::Passed)
}

/// Watermill resend-on-error / Dapr failing handler: failures are retried with backoff.
async fn failing_handler_is_retried_then_succeeds(h: &dyn Harness) -> Result<Outcome> {
    let f = fixture(h, |s| s).await?;
    publish_all(&f.publisher, events("conformance.flaky", 6)?).await?;
    let attempts: Arc<Mutex<BTreeMap<String, u32>>> = Arc::default();
    let a2 = attempts.clone();
    let worker = f.consumer.start_worker(
        move |e: Arc<Event>, ctx: HandlerContext| {
            let a = a2.clone();
            async move {
                if let Ok(mut m) = a.lock() {
                    m.insert(e.id().to_owned(), ctx.attempt);
                }
                // Even-numbered events fail twice.
                let n: usize = e
                    .data_json::<serde_json::Value>()
                    .ok()
                    .and_then(|v| v["n"].as_u64())
                    .unwrap_or(0) as usize;
                if n.is_multiple_of(2) && ctx.attempt < 3 {
                    return Err(HandlerError::retry("flaky dependency"));
                }
                Ok(())
            }
        },
        WorkerOptions::default().concurrency(4).retry(
            RetryPolicy::default()
                .max_attempts(5)
                .initial_backoff(Duration::from_millis(50)),
        ),
    )?;
    let until = Instant::now() + h.patience() * 2;
    loop {
        let done = worker.stats().acked;
        if done >= 6 || Instant::now() > until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let report = worker.shutdown(Duration::from_secs(5)).await;
    check!(report.acked == 6, "report {report:?}");
    check!(
        report.retried == 6,
        "3 events x 2 retries expected, report {report:?}"
    );
    let attempts = attempts
        .lock()
        .map_err(|_| Error::new(ErrorKind::Internal, "poisoned"))?
        .clone();
    check!(
        attempts.values().filter(|a| **a == 3).count() == 3,
        "attempts {attempts:?}"
    );
    Ok(Outcome::Passed)
}

/// The worker dead-letters an event whose last attempt failed, with the reason.
async fn worker_dead_letters_after_max_attempts(h: &dyn Harness) -> Result<Outcome> {
    let caps = declared(h).await?;
    need!(caps.native_dead_letter, "a native dead-letter place");
    let f = fixture(h, |s| s).await?;
    f.publisher.publish(event("conformance.poison", 0)?).await?;
    let worker = f.consumer.start_worker(
        |_e: Arc<Event>, _c: HandlerContext| async {
            Err::<(), _>(HandlerError::retry("always fails"))
        },
        WorkerOptions::default().retry(
            RetryPolicy::default()
                .max_attempts(3)
                .initial_backoff(Duration::from_millis(20)),
        ),
    )?;
    let letters = dead_letters_of(&f, 1, h.patience() * 2).await?;
    let report = worker.shutdown(Duration::from_secs(5)).await;
    check!(
        letters.len() == 1,
        "{} dead letters, report {report:?}",
        letters.len()
    );
    check!(
        report.retried == 2 && report.dead_lettered == 1,
        "report {report:?}"
    );
    if caps.dead_letter_reason {
        let reason = letters[0].reason.clone().unwrap_or_default();
        check!(
            reason.contains("max delivery attempts (3) exceeded"),
            "reason {reason:?}"
        );
    }
    Ok(Outcome::Passed)
}

/// Watermill concurrent publish/subscribe: four publishers at once, a concurrent worker,
/// every event handled (at-least-once: at most 1% duplicates tolerated).
async fn concurrent_publishers_and_worker(h: &dyn Harness) -> Result<Outcome> {
    let f = fixture(h, |s| s).await?;
    let per_publisher = 250;
    let mut want = HashSet::new();
    let mut sends = Vec::new();
    for p in 0..4 {
        let publisher = f.bus.publisher(&f.topic).await?;
        let evs = events(&format!("conformance.concurrent.{p}"), per_publisher)?;
        want.extend(evs.iter().map(|e| e.id().to_owned()));
        sends.push(tokio::spawn(async move {
            let handles: Vec<_> = evs.into_iter().map(|e| publisher.publish(e)).collect();
            for handle in handles {
                handle.await?;
            }
            publisher.close().await
        }));
    }
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let s2 = seen.clone();
    let worker = f.consumer.start_worker(
        move |e: Arc<Event>, _c: HandlerContext| {
            let s = s2.clone();
            async move {
                if let Ok(mut v) = s.lock() {
                    v.push(e.id().to_owned());
                }
                Ok::<(), HandlerError>(())
            }
        },
        WorkerOptions::default().concurrency(8),
    )?;
    for send in sends {
        send.await
            .map_err(|e| Error::with_source(ErrorKind::Internal, "publisher task failed", e))??;
    }
    let total = want.len();
    let until = Instant::now() + h.patience() * 2;
    while worker.stats().acked < total as u64 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let report = worker.shutdown(Duration::from_secs(5)).await;
    let seen = seen
        .lock()
        .map_err(|_| Error::new(ErrorKind::Internal, "poisoned"))?
        .clone();
    let distinct: HashSet<String> = seen.iter().cloned().collect();
    check!(
        distinct == want,
        "handled {} distinct of {total}, report {report:?}",
        distinct.len()
    );
    check!(
        seen.len() <= total + total / 100,
        "{} deliveries for {total} events",
        seen.len()
    );
    Ok(Outcome::Passed)
}

/// Watermill topic isolation: events of one topic never reach another's subscription.
async fn topic_isolation(h: &dyn Harness) -> Result<Outcome> {
    let a = fixture(h, |s| s).await?;
    let b = fixture(h, |s| s).await?;
    publish_all(&a.publisher, events("conformance.isolation", 5)?).await?;
    let got_a = drain(&a.consumer, 5, h.patience()).await?;
    check!(got_a.len() == 5, "topic A got {}", got_a.len());
    ack_all(&a.consumer, &got_a).await?;
    let got_b = quiet(&b.consumer, Duration::from_millis(500)).await?;
    check!(
        got_b.is_empty(),
        "topic B got {} events of topic A",
        got_b.len()
    );
    Ok(Outcome::Passed)
}

/// Watermill continue-after-close: a new consumer gets what the closed one left.
async fn continue_after_consumer_close(h: &dyn Harness) -> Result<Outcome> {
    let f = fixture(h, |s| s).await?;
    let evs = events("conformance.continue", 10)?;
    let want: HashSet<String> = evs.iter().map(|e| e.id().to_owned()).collect();
    publish_all(&f.publisher, evs).await?;
    let first = drain(&f.consumer, 5, h.patience()).await?;
    check!(first.len() == 5, "first consumer got {}", first.len());
    ack_all(&f.consumer, &first).await?;
    f.consumer.close().await?;
    let next = f.bus.consumer(&f.topic, &f.sub).await?;
    let rest = drain(&next, 5, h.patience()).await?;
    ack_all(&next, &rest).await?;
    let all: HashSet<String> = ids(&first).union(&ids(&rest)).cloned().collect();
    check!(all == want, "{} of 10 across both consumers", all.len());
    Ok(Outcome::Passed)
}

/// A batch reports failures per event: an oversize event fails alone, before any send.
async fn batch_reports_per_event_failures(h: &dyn Harness) -> Result<Outcome> {
    let caps = declared(h).await?;
    let f = fixture(h, |s| s).await?;
    let max = caps.max_message_bytes;
    let big = EventBuilder::new("conformance.big", "/c")
        .data("text/plain", "x".repeat(max + 1))
        .max_bytes(usize::MAX)
        .build()?;
    let (a, c) = (
        event("conformance.small", 1)?,
        event("conformance.small", 2)?,
    );
    let results = f
        .publisher
        .publish_batch(vec![a.clone(), big, c.clone()])
        .await;
    check!(
        results[0].is_ok() && results[2].is_ok(),
        "small events failed: {results:?}"
    );
    check!(
        matches!(&results[1], Err(e) if e.kind() == ErrorKind::TooLarge),
        "oversize: {:?}",
        results[1]
    );
    let got = drain(&f.consumer, 2, h.patience()).await?;
    let want: HashSet<String> = [a.id().to_owned(), c.id().to_owned()].into();
    check!(ids(&got) == want, "got {:?}", ids(&got));
    ack_all(&f.consumer, &got).await?;
    Ok(Outcome::Passed)
}

/// An idempotent consumer processes a duplicate (same source and id) once.
async fn idempotent_consumer_skips_duplicates(h: &dyn Harness) -> Result<Outcome> {
    let f = fixture(h, |s| s).await?;
    let e = event("conformance.dup", 0)?;
    f.publisher.publish(e.clone()).await?;
    f.publisher
        .publish_with(
            e.clone(),
            PublishOptions {
                dedup_id: Some(format!("{}-again", e.id())),
                ..Default::default()
            },
        )
        .await?;
    let handled = Arc::new(AtomicU64::new(0));
    let h2 = handled.clone();
    let handler = Idempotent::new(
        move |_e: Arc<Event>, _c: HandlerContext| {
            let h = h2.clone();
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                Ok::<(), HandlerError>(())
            }
        },
        Arc::new(MemoryDedupStore::new(1000)),
    );
    let dups = handler.duplicates();
    let worker = f.consumer.start_worker(handler, WorkerOptions::default())?;
    let until = Instant::now() + h.patience();
    while worker.stats().acked < 2 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let report = worker.shutdown(Duration::from_secs(5)).await;
    check!(report.acked == 2, "report {report:?}");
    check!(
        handled.load(Ordering::SeqCst) == 1,
        "handled {} times",
        handled.load(Ordering::SeqCst)
    );
    check!(
        dups.load(Ordering::SeqCst) == 1,
        "duplicates {}",
        dups.load(Ordering::SeqCst)
    );
    Ok(Outcome::Passed)
}

/// The publisher's trace context travels inside the event, and handlers continue it.
async fn trace_context_propagates(h: &dyn Harness) -> Result<Outcome> {
    let f = fixture(h, |s| s).await?;
    let root = TraceContext::new_root();
    // An event made inside a traced scope (a handler, say) continues that trace...
    let built = root
        .scope(async { EventBuilder::new("conformance.trace", "/c").build() })
        .await?;
    // ...and one made elsewhere without a traceparent gets one when it is published.
    let mut bare = EventBuilder::new("conformance.trace", "/c").build()?;
    bare.remove_extension(cloudbus_core::event::EXT_TRACEPARENT);
    let other = TraceContext::new_root();
    let bare_id = bare.id().to_owned();
    other
        .scope(async { f.publisher.publish(bare).await })
        .await?;
    f.publisher.publish(built.clone()).await?;
    let got = drain(&f.consumer, 2, h.patience()).await?;
    check!(got.len() == 2, "got {}", got.len());
    for d in &got {
        let want = if d.event().id() == bare_id {
            &other
        } else {
            &root
        };
        let ctx = TraceContext::from_event(d.event());
        check!(
            ctx.is_some_and(|c| c.trace_id() == want.trace_id()),
            "traceparent {:?}",
            d.event().traceparent()
        );
    }
    ack_all(&f.consumer, &got).await?;
    Ok(Outcome::Passed)
}

/// Topology as code: a plan of a new topology creates everything; once applied, the
/// plan is empty (apply is idempotent); a changed lease and delivery limit are planned
/// as an update of exactly those settings and applied in place; a changed filter is
/// planned, and applied in place or refused as `Unsupported` naming the filter (Pub/Sub
/// filters cannot change). Providers that cannot describe a subscription skip.
async fn topology_plan_and_apply(h: &dyn Harness) -> Result<Outcome> {
    let caps = declared(h).await?;
    use cloudbus_core::topology::{self, Change, Topology};
    let bus = h.bus().await?;
    let topic = h.unique("t");
    let (steady, changing) = (h.unique("s"), h.unique("s"));
    let topology_driver = bus.driver().topology();
    let Some(planning) = topology_driver.planning() else {
        return Ok(Outcome::Skipped(
            "describing subscriptions (cloudbus topology plan)".into(),
        ));
    };
    let described = planning.describe_subscription(&topic, &steady).await;
    need!(
        !matches!(&described, Err(e) if e.kind() == ErrorKind::Unsupported),
        "describing subscriptions (cloudbus topology plan)"
    );
    check!(
        matches!(described, Ok(None)),
        "a missing subscription is described as {described:?}"
    );
    let filtered = caps.filtering != FilterSupport::None;
    // Without fan-out the subscriptions of a topic share its queue and its settings:
    // one subscription then, and declaring two that differ is refused.
    let fan_out = caps.fan_out;
    let declare = |lease: &str, attempts: u32, prefix: &str| -> Result<Topology> {
        let mut changing_sub = serde_json::json!({
            "name": changing, "lease": lease, "max_delivery_attempts": attempts,
        });
        if filtered {
            changing_sub["filter"] =
                serde_json::json!({"prefix": {"attribute": "type", "prefix": prefix}});
        }
        let mut subscriptions = vec![changing_sub];
        if fan_out {
            subscriptions.push(
                serde_json::json!({"name": steady, "lease": "30s", "max_delivery_attempts": 5}),
            );
        }
        Ok(serde_json::from_value(serde_json::json!({"topics": [{
            "name": topic,
            "subscriptions": subscriptions,
        }]}))?)
    };
    let subs = if fan_out { 2 } else { 1 };
    if !fan_out {
        let conflicting: Topology = serde_json::from_value(serde_json::json!({"topics": [{
            "name": topic,
            "subscriptions": [
                {"name": steady, "lease": "30s"},
                {"name": changing, "lease": "60s"},
            ],
        }]}))?;
        let refused = topology::plan(&bus, &conflicting).await;
        check!(
            matches!(&refused, Err(e) if e.kind() == ErrorKind::InvalidArgument),
            "two subscriptions of one queue declared differently: {refused:?}"
        );
    }
    let first = declare("30s", 5, "com.example.a.")?;
    let plan = topology::plan(&bus, &first).await?;
    check!(
        plan.change_count() == 1 + subs
            && plan
                .changes
                .iter()
                .filter(|c| matches!(c, Change::CreateSubscription(_)))
                .count()
                == subs,
        "the first plan:\n{plan}"
    );
    let applied = topology::apply(&bus, &plan).await?;
    check!(applied == 1 + subs, "applied {applied} of\n{plan}");
    let again = topology::plan(&bus, &first).await?;
    check!(again.is_empty(), "the plan after apply:\n{again}");
    check!(
        topology::apply(&bus, &again).await? == 0,
        "applying an empty plan changed something"
    );

    let longer = declare("60s", 7, "com.example.a.")?;
    let plan = topology::plan(&bus, &longer).await?;
    let updated: Vec<Vec<&str>> = plan
        .changes
        .iter()
        .filter_map(|c| match c {
            Change::UpdateSubscription { spec, differences } if spec.name == changing => {
                Some(differences.iter().map(|d| d.setting).collect())
            }
            _ => None,
        })
        .collect();
    check!(
        plan.change_count() == 1 && updated == [vec!["max_delivery_attempts", "lease"]],
        "the plan of a longer lease and more attempts:\n{plan}"
    );
    topology::apply(&bus, &plan).await?;
    let again = topology::plan(&bus, &longer).await?;
    check!(again.is_empty(), "the plan after the update:\n{again}");

    if filtered {
        let refiltered = declare("60s", 7, "com.example.b.")?;
        let plan = topology::plan(&bus, &refiltered).await?;
        check!(
            plan.change_count() == 1
                && plan.changes.iter().any(|c| matches!(c,
                    Change::UpdateSubscription { differences, .. }
                        if differences.len() == 1 && differences[0].setting == "filter")),
            "the plan of a new filter:\n{plan}"
        );
        match topology::apply(&bus, &plan).await {
            Ok(_) => {
                let again = topology::plan(&bus, &refiltered).await?;
                check!(again.is_empty(), "the plan after the new filter:\n{again}");
            }
            Err(e) => check!(
                e.kind() == ErrorKind::Unsupported && e.message().contains("filter"),
                "a filter the provider cannot change: {e}"
            ),
        }
    }
    bus.delete_subscription(&topic, &changing).await?;
    if fan_out {
        bus.delete_subscription(&topic, &steady).await?;
    }
    Ok(Outcome::Passed)
}

/// The cases of this module, in order: the only list (a case function missing here
/// is dead code, an error).
pub const CASES: &[crate::harness::Case<dyn Harness>] = registry![
    send_receive_one,
    publish_subscribe_100,
    json_text_and_binary_bodies,
    metadata_round_trip,
    fan_out_two_subscriptions,
    competing_consumers_share_work,
    nack_redelivers_with_next_attempt,
    nack_delay_is_honoured,
    double_ack_is_an_error,
    unacked_is_redelivered_after_lease,
    extend_keeps_the_lease,
    closed_publisher_fails,
    closed_consumer_fails,
    receive_can_be_cancelled,
    send_to_missing_topic_is_not_found,
    receive_from_missing_subscription_is_not_found,
    explicit_dead_letter_keeps_reason,
    dead_letter_after_max_attempts,
    redrive_returns_to_source,
    redrive_ends_when_a_letter_comes_back,
    purge_empties_dead_letters,
    ordering_per_key_under_concurrency,
    filter_routing,
    delayed_delivery,
    foreign_message_dead_lettered,
    broken_json_dead_lettered,
    missing_required_attributes_dead_lettered,
    publisher_close_loses_none_of_10000,
    graceful_shutdown_finishes_in_flight,
    failing_handler_is_retried_then_succeeds,
    worker_dead_letters_after_max_attempts,
    concurrent_publishers_and_worker,
    topic_isolation,
    continue_after_consumer_close,
    batch_reports_per_event_failures,
    idempotent_consumer_skips_duplicates,
    trace_context_propagates,
    topology_plan_and_apply,
];
