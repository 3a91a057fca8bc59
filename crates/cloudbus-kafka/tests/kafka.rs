//! Kafka-specific tests: librdkafka's mock cluster under faults (brokers down and up,
//! request errors injected per API: nothing lost), and against tansu
//! (KAFKA_BOOTSTRAP_SERVERS): a rebalance between two members losing nothing, retry
//! and dead-letter topics with their headers, and the CloudEvents Kafka binding both
//! ways with Python's confluent-kafka and the CloudEvents Python SDK
//! (CLOUDBUS_KAFKA_PYTHON).

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cloudbus_core::worker::{HandlerContext, HandlerError, WorkerOptions};
use cloudbus_core::{AttributesReader, Event, EventBuilder, SubscriptionSpec};

fn events(ty: &str, count: usize) -> Vec<Event> {
    (0..count)
        .map(|n| {
            EventBuilder::new(ty, "/kafka-tests")
                .partition_key(format!("key-{}", n % 7))
                .json(&serde_json::json!({ "n": n }))
                .expect("json data")
                .build()
                .expect("an event")
        })
        .collect()
}

/// Ids handled, with how often each was.
type Seen = Arc<Mutex<HashMap<String, usize>>>;

fn handler(
    seen: Seen,
) -> impl Fn(Arc<Event>, HandlerContext) -> std::future::Ready<std::result::Result<(), HandlerError>>
+ Send
+ Sync
+ 'static {
    move |e: Arc<Event>, _c: HandlerContext| {
        *seen
            .lock()
            .expect("seen")
            .entry(e.id().to_owned())
            .or_default() += 1;
        std::future::ready(Ok(()))
    }
}

async fn wait_for(seen: &Seen, count: usize, patience: Duration) {
    let until = Instant::now() + patience;
    while seen.lock().expect("seen").len() < count && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Publishes `sent` to `topic`, receives every one on `consumer` (within
/// `patience`) and nacks each with `delay`, so that each goes to the subscription's
/// retry topic; returns `sent`.
async fn publish_receive_and_nack(
    bus: &cloudbus_core::Bus,
    topic: &str,
    consumer: &cloudbus_core::Consumer,
    sent: Vec<Event>,
    patience: Duration,
    delay: Duration,
) -> Vec<Event> {
    for r in bus
        .publisher(topic)
        .await
        .expect("a publisher")
        .publish_batch(sent.clone())
        .await
    {
        r.expect("published");
    }
    let mut delivered = Vec::new();
    let until = Instant::now() + patience;
    while delivered.len() < sent.len() && Instant::now() < until {
        delivered.extend(
            consumer
                .receive_batch(sent.len(), Duration::from_secs(1))
                .await
                .expect("a receive"),
        );
    }
    assert_eq!(
        delivered.len(),
        sent.len(),
        "every event delivered once first"
    );
    for d in &delivered {
        d.nack(delay).await.expect("nacked with a delay");
    }
    sent
}

/// Two members of one subscription on `bootstrap`: the second joins while the first
/// works and the first leaves half way; every event is handled, none lost
/// (duplicates are at-least-once's and printed).
async fn rebalance_loses_nothing(bootstrap: &str, make_topic: impl Fn(&str)) {
    let topic = &common::unique("rebalance");
    let group = common::unique("members");
    for t in [
        topic.clone(),
        cloudbus_kafka::retry_topic(topic, &group),
        cloudbus_kafka::dead_letter_topic(topic, &group),
    ] {
        make_topic(&t);
    }
    let bus = common::bus(bootstrap, "partitions=4").await.expect("a bus");
    bus.ensure_topic(topic).await.expect("the topic");
    bus.ensure_subscription(&SubscriptionSpec::new(topic, &group))
        .await
        .expect("the subscription");
    let seen: Seen = Arc::default();
    let first = bus
        .consumer(topic, &group)
        .await
        .expect("a consumer")
        .start_worker(handler(Arc::clone(&seen)), WorkerOptions::default())
        .expect("a worker");
    let publisher = bus.publisher(topic).await.expect("a publisher");
    let all = events("com.example.rebalance", 400);
    for r in publisher.publish_batch(all[..200].to_vec()).await {
        r.expect("published");
    }
    wait_for(&seen, 100, Duration::from_secs(30)).await;
    let other = common::bus(bootstrap, "").await.expect("a second bus");
    let by_second: Seen = Arc::default();
    let both = {
        let (all, second) = (handler(Arc::clone(&seen)), handler(Arc::clone(&by_second)));
        move |e: Arc<Event>, c: HandlerContext| {
            // Records the id at once (a ready future).
            drop(second(Arc::clone(&e), c.clone()));
            all(e, c)
        }
    };
    let second = other
        .consumer(topic, &group)
        .await
        .expect("a second consumer")
        .start_worker(both, WorkerOptions::default())
        .expect("a second worker");
    // The group gives the new member some partitions once it joined (seconds).
    let until = Instant::now() + Duration::from_secs(30);
    let mut sent = 200;
    while by_second.lock().expect("seen").is_empty() && Instant::now() < until && sent < 298 {
        for r in publisher.publish_batch(all[sent..sent + 2].to_vec()).await {
            r.expect("published");
        }
        sent += 2;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for r in publisher.publish_batch(all[sent..300].to_vec()).await {
        r.expect("published");
    }
    wait_for(&seen, 300, Duration::from_secs(30)).await;
    let shared = by_second.lock().expect("seen").len();
    let joining_duplicates: usize = seen.lock().expect("seen").values().map(|n| n - 1).sum();
    first.shutdown(Duration::from_secs(10)).await;
    for r in publisher.publish_batch(all[300..].to_vec()).await {
        r.expect("published");
    }
    wait_for(&seen, 400, Duration::from_secs(60)).await;
    second.shutdown(Duration::from_secs(10)).await;
    let seen = seen.lock().expect("seen").clone();
    let lost = all.iter().filter(|e| !seen.contains_key(e.id())).count();
    let duplicates: usize = seen.values().map(|n| n - 1).sum();
    println!(
        "rebalance: 400 published, {} received, {shared} by the second member while both ran, {lost} lost, {duplicates} duplicates ({joining_duplicates} when the second joined)",
        seen.len()
    );
    assert_eq!(lost, 0, "events lost in the rebalance");
    assert!(
        shared > 0,
        "the member that joined a busy group was given no partition"
    );
}

/// The committed offsets of consumer `group` on `topic`'s partitions `0..partitions`
/// (`None` where it committed nothing), read with a plain librdkafka consumer.
fn committed(bootstrap: &str, group: &str, topic: &str, partitions: i32) -> Vec<Option<i64>> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let reader: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .create()
        .expect("an offsets reader");
    let mut wanted = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        wanted.add_partition(topic, p);
    }
    let got = reader
        .committed_offsets(wanted, Duration::from_secs(10))
        .expect("the committed offsets");
    (0..partitions)
        .map(|p| match got.find_partition(topic, p).map(|e| e.offset()) {
            Some(rdkafka::Offset::Offset(o)) => Some(o),
            _ => None,
        })
        .collect()
}

/// Polls `reader` until `seen` holds `count` ids or `patience` runs out.
async fn stream_until(
    reader: &mut cloudbus_core::StreamConsumer,
    seen: &Seen,
    count: usize,
    patience: Duration,
) {
    let handle = handler(Arc::clone(seen));
    let until = Instant::now() + patience;
    while seen.lock().expect("seen").len() < count && Instant::now() < until {
        if reader.poll(&handle).await.expect("a poll").handled == 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A stream reader group's checkpoints are the Kafka consumer group's committed
/// offsets: after a reader handled 20 records the group has committed 20 offsets
/// (any Kafka tool shows them), a reader of another process resumes there and handles
/// only the 10 new ones, and a reader given a checkpoint store of its own commits
/// nothing to Kafka (the given store wins).
async fn stream_checkpoints_are_committed_offsets(bootstrap: &str, make_topic: impl Fn(&str)) {
    use cloudbus_core::{MemoryCheckpointStore, StartPosition};
    let topic = &common::unique("checkpoints");
    make_topic(topic);
    let group = common::unique("readers");
    let bus = common::bus(bootstrap, "partitions=2").await.expect("a bus");
    bus.ensure_topic(topic).await.expect("the topic");
    let publisher = bus.publisher(topic).await.expect("a publisher");
    let all = events("com.example.checkpoint", 30);
    for r in publisher.publish_batch(all[..20].to_vec()).await {
        r.expect("published");
    }
    assert_eq!(
        committed(
            bootstrap,
            &cloudbus_kafka::stream_group(topic, &group),
            topic,
            2
        ),
        vec![None, None],
        "a new group has no offsets"
    );
    let first_seen: Seen = Arc::default();
    let mut first = bus
        .stream_consumer(topic, &group)
        .await
        .expect("a reader")
        .start_at(StartPosition::Earliest);
    stream_until(&mut first, &first_seen, 20, Duration::from_secs(30)).await;
    assert_eq!(first_seen.lock().expect("seen").len(), 20, "first reader");
    let offsets = committed(
        bootstrap,
        &cloudbus_kafka::stream_group(topic, &group),
        topic,
        2,
    );
    assert_eq!(
        offsets.iter().map(|o| o.unwrap_or(0)).sum::<i64>(),
        20,
        "the group's committed offsets after 20 records: {offsets:?}"
    );
    first.release().await.expect("released");
    drop(first);

    for r in publisher.publish_batch(all[20..].to_vec()).await {
        r.expect("published");
    }
    let other = common::bus(bootstrap, "").await.expect("a second bus");
    let second_seen: Seen = Arc::default();
    let mut second = other
        .stream_consumer(topic, &group)
        .await
        .expect("a second reader")
        .start_at(StartPosition::Earliest);
    stream_until(&mut second, &second_seen, 10, Duration::from_secs(30)).await;
    // Anything beyond the 10 new ones would show within another poll.
    second
        .poll(&handler(Arc::clone(&second_seen)))
        .await
        .expect("a poll");
    let mut got: Vec<String> = second_seen.lock().expect("seen").keys().cloned().collect();
    got.sort();
    let mut want: Vec<String> = all[20..].iter().map(|e| e.id().to_owned()).collect();
    want.sort();
    assert_eq!(
        got, want,
        "the resumed reader handled other than the 10 new records"
    );
    second.release().await.expect("released");
    assert_eq!(
        committed(
            bootstrap,
            &cloudbus_kafka::stream_group(topic, &group),
            topic,
            2
        )
        .iter()
        .map(|o| o.unwrap_or(0))
        .sum::<i64>(),
        30
    );

    let own_store = common::unique("own-store");
    let third_seen: Seen = Arc::default();
    let mut third = bus
        .stream_consumer(topic, &own_store)
        .await
        .expect("a reader with its own store")
        .checkpoints(Arc::new(MemoryCheckpointStore::new()))
        .start_at(StartPosition::Earliest);
    stream_until(&mut third, &third_seen, 30, Duration::from_secs(30)).await;
    assert_eq!(third_seen.lock().expect("seen").len(), 30);
    assert_eq!(
        committed(
            bootstrap,
            &cloudbus_kafka::stream_group(topic, &own_store),
            topic,
            2
        ),
        vec![None, None],
        "a reader given a checkpoint store committed offsets to Kafka"
    );
}

mod mock_cluster {
    use super::*;
    use rdkafka::mocking::MockCluster;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

    /// A rebalance between two members loses nothing (on the mock cluster: tansu
    /// holds a second member's JoinGroup while the first member, never told to
    /// rejoin, keeps every partition, and after the first leaves the second is not
    /// given them within a minute).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_rebalance_between_two_members_loses_nothing() {
        let cluster = MockCluster::new(1).expect("a mock cluster");
        let bootstrap = cluster.bootstrap_servers();
        rebalance_loses_nothing(&bootstrap, |topic| {
            cluster.create_topic(topic, 4, 1).expect("a mock topic");
        })
        .await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stream_checkpoints_are_the_groups_committed_offsets() {
        let cluster = MockCluster::new(1).expect("a mock cluster");
        let bootstrap = cluster.bootstrap_servers();
        stream_checkpoints_are_committed_offsets(&bootstrap, |topic| {
            cluster.create_topic(topic, 2, 1).expect("a mock topic");
        })
        .await;
    }

    /// Two stream readers of one group share the partitions as the group coordinator
    /// assigns them: a reader that joins a busy group is given some, and when the
    /// first stops the second takes them all; nothing is lost. On the mock cluster:
    /// tansu does not tell a working member to rejoin (see above).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stream_readers_of_a_group_share_its_partitions() {
        use cloudbus_core::StartPosition;
        let cluster = MockCluster::new(1).expect("a mock cluster");
        let bootstrap = cluster.bootstrap_servers();
        let topic = common::unique("shared-stream");
        cluster.create_topic(&topic, 4, 1).expect("a mock topic");
        let bus = common::bus(&bootstrap, "").await.expect("a bus");
        let publisher = bus.publisher(&topic).await.expect("a publisher");
        let all = events("com.example.share", 300);
        let reader = |seen: Seen| {
            let bus = bus.clone();
            let topic = topic.clone();
            async move {
                let mut reader = bus
                    .stream_consumer(&topic, "sharing")
                    .await
                    .expect("a reader")
                    .start_at(StartPosition::Earliest);
                let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
                let task = tokio::spawn(async move {
                    let handle = handler(seen);
                    reader
                        .run(&handle, Duration::from_millis(50), async {
                            let _ = stopped.await;
                        })
                        .await
                });
                (stop, task)
            }
        };
        let (first_seen, second_seen): (Seen, Seen) = (Arc::default(), Arc::default());
        let total = |a: &Seen, b: &Seen| {
            let a = a.lock().expect("seen");
            let b = b.lock().expect("seen");
            all.iter()
                .filter(|e| a.contains_key(e.id()) || b.contains_key(e.id()))
                .count()
        };
        for r in publisher.publish_batch(all[..100].to_vec()).await {
            r.expect("published");
        }
        let (stop_first, first) = reader(Arc::clone(&first_seen)).await;
        wait_for(&first_seen, 100, Duration::from_secs(30)).await;
        let (stop_second, second) = reader(Arc::clone(&second_seen)).await;
        // The second reader joins; the group hands it some partitions.
        let until = Instant::now() + Duration::from_secs(30);
        let mut sent = 100;
        while second_seen.lock().expect("seen").is_empty() && Instant::now() < until && sent < 200 {
            for r in publisher.publish_batch(all[sent..sent + 10].to_vec()).await {
                r.expect("published");
            }
            sent += 10;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        for r in publisher.publish_batch(all[sent..200].to_vec()).await {
            r.expect("published");
        }
        let until = Instant::now() + Duration::from_secs(30);
        while total(&first_seen, &second_seen) < 200 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let shared = second_seen.lock().expect("seen").len();
        let _ = stop_first.send(());
        first
            .await
            .expect("the first reader's task")
            .expect("the first reader");
        for r in publisher.publish_batch(all[200..].to_vec()).await {
            r.expect("published");
        }
        let until = Instant::now() + Duration::from_secs(30);
        while total(&first_seen, &second_seen) < 300 && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = stop_second.send(());
        second
            .await
            .expect("the second reader's task")
            .expect("the second reader");
        let handled = total(&first_seen, &second_seen);
        let duplicates: usize = [&first_seen, &second_seen]
            .iter()
            .flat_map(|s| {
                s.lock()
                    .expect("seen")
                    .values()
                    .copied()
                    .collect::<Vec<_>>()
            })
            .sum::<usize>()
            - handled;
        println!(
            "stream group: 300 published, {handled} handled, {shared} by the second reader while both ran, {duplicates} duplicates"
        );
        assert_eq!(handled, 300, "records lost");
        assert!(
            shared > 0,
            "the reader that joined a busy group was given no partition"
        );
        let after: usize = all[200..]
            .iter()
            .filter(|e| second_seen.lock().expect("seen").contains_key(e.id()))
            .count();
        assert_eq!(
            after, 100,
            "the second reader did not take over every partition"
        );
    }

    /// A stream reader that held no partition (more readers than partitions) leaves
    /// the group when it releases, even while its value lives on: the partition goes
    /// to the next reader at once, not to the stopped reader's member.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_released_reader_that_held_nothing_leaves_the_group() {
        use cloudbus_core::StartPosition;
        let cluster = MockCluster::new(1).expect("a mock cluster");
        let bootstrap = cluster.bootstrap_servers();
        let topic = common::unique("one-partition");
        cluster.create_topic(&topic, 1, 1).expect("a mock topic");
        let bus = common::bus(&bootstrap, "").await.expect("a bus");
        let publisher = bus.publisher(&topic).await.expect("a publisher");
        let all = events("com.example.idle", 2);
        let reader = || async {
            bus.stream_consumer(&topic, "idle")
                .await
                .expect("a reader")
                .start_at(StartPosition::Earliest)
        };
        let (first_seen, idle_seen, next_seen): (Seen, Seen, Seen) =
            (Arc::default(), Arc::default(), Arc::default());
        let mut first = reader().await;
        publisher.publish(all[0].clone()).await.expect("published");
        stream_until(&mut first, &first_seen, 1, Duration::from_secs(30)).await;
        assert_eq!(first_seen.lock().expect("seen").len(), 1);
        // The second reader joins and is given nothing: the one partition stays the
        // first's (range assignment to the first member).
        let mut idle = reader().await;
        let idle_handler = handler(Arc::clone(&idle_seen));
        let first_handler = handler(Arc::clone(&first_seen));
        for _ in 0..20 {
            let _ = idle.poll(&idle_handler).await;
            let _ = first.poll(&first_handler).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        idle.release().await.expect("released");
        first.release().await.expect("released");
        // `idle` lives on (not dropped) but stopped reading.
        publisher.publish(all[1].clone()).await.expect("published");
        let mut next = reader().await;
        let started = Instant::now();
        stream_until(&mut next, &next_seen, 1, Duration::from_secs(30)).await;
        let took = started.elapsed();
        println!("the next reader handled the new record after {took:?}");
        assert!(
            next_seen.lock().expect("seen").contains_key(all[1].id()),
            "the next reader did not get the partition"
        );
        assert!(
            took < Duration::from_secs(20),
            "the partition waited {took:?} for a stopped reader's member"
        );
        drop(idle);
    }

    /// A new topic of `partitions` on `cluster` (named from `prefix`) with its
    /// subscription "s" (the mock cluster has no CreateTopics: its retry and dlq
    /// topics are made here), a bus and a consumer of it.
    async fn subscribed(
        cluster: &MockCluster<'_, rdkafka::producer::DefaultProducerContext>,
        prefix: &str,
        partitions: i32,
    ) -> (String, cloudbus_core::Bus, cloudbus_core::Consumer) {
        let topic = common::unique(prefix);
        cluster
            .create_topic(&topic, partitions, 1)
            .expect("a mock topic");
        for t in [
            cloudbus_kafka::retry_topic(&topic, "s"),
            cloudbus_kafka::dead_letter_topic(&topic, "s"),
        ] {
            cluster.create_topic(&t, 1, 1).expect("a mock topic");
        }
        let bus = common::bus(&cluster.bootstrap_servers(), "")
            .await
            .expect("a bus");
        bus.ensure_subscription(&SubscriptionSpec::new(&topic, "s"))
            .await
            .expect("the subscription");
        let consumer = bus.consumer(&topic, "s").await.expect("a consumer");
        (topic, bus, consumer)
    }

    /// A subscription's queue depth (`event_queue_depth`) is its group's lag: what
    /// was published and not yet acked and committed, deliveries in flight included;
    /// with the broker down it is unknown (`None`), not a hang or a stale number; a
    /// closed consumer reports none. On the mock cluster: tansu's high watermark
    /// counts record batches, not records.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn queue_depth_is_the_groups_lag() {
        let cluster = MockCluster::new(1).expect("a mock cluster");
        let (topic, bus, consumer) = subscribed(&cluster, "depth", 2).await;
        assert_eq!(
            consumer.report_queue_depth().await,
            Some(0),
            "nothing published"
        );
        let publisher = bus.publisher(&topic).await.expect("a publisher");
        for r in publisher
            .publish_batch(events("com.example.depth", 10))
            .await
        {
            r.expect("published");
        }
        assert_eq!(consumer.report_queue_depth().await, Some(10));
        // Four in hand: in flight, not committed, so still waiting in the group's eyes.
        let mut held = Vec::new();
        let until = Instant::now() + Duration::from_secs(30);
        while held.len() < 4 && Instant::now() < until {
            held.extend(
                consumer
                    .receive_batch(4 - held.len(), Duration::from_secs(1))
                    .await
                    .expect("a receive"),
            );
        }
        assert_eq!(held.len(), 4, "four deliveries within 30 s");
        assert_eq!(
            consumer.report_queue_depth().await,
            Some(10),
            "in flight counts"
        );
        for r in consumer.ack_all(&held).await {
            r.expect("acked");
        }
        // The commit after the acks is asynchronous.
        let until = Instant::now() + Duration::from_secs(15);
        let mut depth = consumer.report_queue_depth().await;
        while depth != Some(6) && Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(100)).await;
            depth = consumer.report_queue_depth().await;
        }
        assert_eq!(depth, Some(6), "four acked and committed of ten");
        consumer.close().await.expect("closed");
        assert_eq!(consumer.report_queue_depth().await, None, "closed");
        // Another member of the subscription, with the broker gone.
        let consumer = bus.consumer(&topic, "s").await.expect("a consumer");
        assert_eq!(
            consumer.report_queue_depth().await,
            Some(6),
            "the group's, not the member's"
        );
        cluster.broker_down(1).expect("broker down");
        let started = Instant::now();
        let down = tokio::time::timeout(Duration::from_secs(60), consumer.report_queue_depth())
            .await
            .expect("the depth read ends with the broker down");
        assert_eq!(down, None, "the depth is unknown with the broker down");
        eprintln!(
            "depth read with the broker down ended in {:?}",
            started.elapsed()
        );
        cluster.broker_up(1).expect("broker up");
    }

    /// A retry partition paused by a full hold is resumed when a rebalance gives it
    /// back: librdkafka keeps an application's pause through a rebalance, and the
    /// revocation dropped the held retries whose coming due would have resumed it.
    /// A member holding retries past its hold of 2 sees a second member join and
    /// leave; every retry comes back to it. On the mock cluster: tansu does not tell
    /// a working member to rejoin.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_paused_retry_partition_is_resumed_after_a_rebalance() {
        let cluster = MockCluster::new(1).expect("a mock cluster");
        let bootstrap = cluster.bootstrap_servers();
        let topic = common::unique("paused");
        let group = "paused";
        for t in [
            topic.clone(),
            cloudbus_kafka::retry_topic(&topic, group),
            cloudbus_kafka::dead_letter_topic(&topic, group),
        ] {
            cluster.create_topic(&t, 1, 1).expect("a mock topic");
        }
        let bus = common::bus(&bootstrap, "retry_hold=2")
            .await
            .expect("a bus");
        bus.ensure_subscription(&SubscriptionSpec::new(&topic, group))
            .await
            .expect("the subscription");
        let first = bus.consumer(&topic, group).await.expect("a consumer");
        let sent = publish_receive_and_nack(
            &bus,
            &topic,
            &first,
            events("com.example.paused", 6),
            Duration::from_secs(30),
            Duration::from_secs(45),
        )
        .await;
        let held = |c: &cloudbus_core::Consumer| {
            c.downcast::<cloudbus_kafka::KafkaSubscription>()
                .expect("a Kafka subscription")
                .held_retries()
        };
        let assignments = |c: &cloudbus_core::Consumer| {
            c.downcast::<cloudbus_kafka::KafkaSubscription>()
                .expect("a Kafka subscription")
                .assignments()
        };
        // The first member reads the retry topic until its hold is full: paused.
        let until = Instant::now() + Duration::from_secs(10);
        while held(&first) < 2 && Instant::now() < until {
            let got = first
                .receive_batch(6, Duration::from_millis(500))
                .await
                .expect("a receive");
            assert!(got.is_empty(), "nothing is due yet");
        }
        assert_eq!(held(&first), 2, "the hold is full");
        // A second member joins (the first serves the rebalance inside its
        // receives: the revocation drops what it held), then leaves: the first is
        // given everything back, its retry partition still paused by librdkafka.
        let other = common::bus(&bootstrap, "retry_hold=2")
            .await
            .expect("a second bus");
        let second = other
            .consumer(&topic, group)
            .await
            .expect("a second consumer");
        let alone = assignments(&first);
        let until = Instant::now() + Duration::from_secs(20);
        while assignments(&first) == alone && Instant::now() < until {
            let (a, b) = tokio::join!(
                first.receive_batch(6, Duration::from_millis(300)),
                second.receive_batch(6, Duration::from_millis(300)),
            );
            assert!(
                a.expect("a receive").is_empty() && b.expect("a receive").is_empty(),
                "nothing is due yet"
            );
        }
        let joined = assignments(&first);
        assert!(joined > alone, "the second member's join was served");
        second.close().await.expect("the second member leaves");
        let until = Instant::now() + Duration::from_secs(20);
        while assignments(&first) == joined && Instant::now() < until {
            let got = first
                .receive_batch(6, Duration::from_millis(300))
                .await
                .expect("a receive");
            assert!(got.is_empty(), "nothing is due yet");
        }
        assert!(
            assignments(&first) > joined,
            "the second member's leaving was served"
        );
        // Every retry comes back (due 45 s after its nack), to the first member.
        let mut again: HashMap<String, usize> = HashMap::new();
        let until = Instant::now() + Duration::from_secs(60);
        while again.len() < sent.len() && Instant::now() < until {
            let batch = first
                .receive_batch(6, Duration::from_secs(1))
                .await
                .expect("a receive");
            for d in &batch {
                *again.entry(d.event().id().to_owned()).or_default() += 1;
            }
            for r in first.ack_all(&batch).await {
                r.expect("acked");
            }
        }
        assert_eq!(
            again.len(),
            sent.len(),
            "every retry delivered again after the rebalance: {again:?}"
        );
    }

    /// A plan that cannot read a declared topic config (the mock cluster has no
    /// DescribeConfigs) fails naming it, rather than calling the topic unchanged; a
    /// URL that declares only partitions is planned from the metadata alone, which
    /// every broker has.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_plan_that_cannot_read_a_declared_config_fails() {
        use cloudbus_core::topology::{self, Change, Topology};
        let cluster = MockCluster::new(1).expect("a mock cluster");
        let bootstrap = cluster.bootstrap_servers();
        let topic = common::unique("no-configs");
        cluster.create_topic(&topic, 2, 1).expect("a mock topic");
        let declared: Topology =
            serde_json::from_value(serde_json::json!({"topics": [{"name": topic}]}))
                .expect("a topology");
        let bus = common::bus(&bootstrap, "partitions=2")
            .await
            .expect("a bus");
        let plan = topology::plan(&bus, &declared).await.expect("a plan");
        assert_eq!(
            plan.changes,
            [Change::TopicUnchanged(topic.clone())],
            "{plan}"
        );
        let bus = common::bus(&bootstrap, "partitions=2&retention_ms=60000")
            .await
            .expect("a bus");
        let failed = topology::plan(&bus, &declared)
            .await
            .expect_err("the retention cannot be read");
        assert!(
            failed.message().contains("describe the configs"),
            "{failed}"
        );
        assert_ne!(
            failed.kind(),
            cloudbus_core::ErrorKind::Unsupported,
            "{failed}"
        );
    }

    /// With every broker down a receive fails (Unavailable) rather than returning
    /// empty batches as if nothing were published; once the broker is back the
    /// consumer reads again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_receive_reports_all_brokers_down() {
        let cluster = MockCluster::new(1).expect("a mock cluster");
        let (topic, bus, consumer) = subscribed(&cluster, "down", 1).await;
        let publisher = bus.publisher(&topic).await.expect("a publisher");
        let sent = events("com.example.down", 2);
        publisher.publish(sent[0].clone()).await.expect("published");
        let first = consumer
            .receive_batch(1, Duration::from_secs(20))
            .await
            .expect("a receive");
        assert_eq!(first.len(), 1);
        for r in consumer.ack_all(&first).await {
            r.expect("acked");
        }
        cluster.broker_down(1).expect("broker down");
        let until = Instant::now() + Duration::from_secs(60);
        let mut reported = None;
        while reported.is_none() && Instant::now() < until {
            match consumer.receive_batch(1, Duration::from_secs(1)).await {
                Err(e) => reported = Some(e),
                Ok(got) => assert!(got.is_empty(), "a record with every broker down"),
            }
        }
        let e = reported.expect("no receive reported the brokers down within 60 s");
        assert_eq!(e.kind(), cloudbus_core::ErrorKind::Unavailable, "{e}");
        cluster.broker_up(1).expect("broker up");
        publisher
            .publish(sent[1].clone())
            .await
            .expect("published after");
        let until = Instant::now() + Duration::from_secs(60);
        let mut got = Vec::new();
        while got.is_empty() && Instant::now() < until {
            if let Ok(batch) = consumer.receive_batch(1, Duration::from_secs(1)).await {
                got = batch;
            }
        }
        assert_eq!(
            got.first().map(|d| d.event().id().to_owned()),
            Some(sent[1].id().to_owned())
        );
    }

    /// A stream reader whose group's commits fail and whose broker goes down and comes
    /// back: its polls fail (they do not hang or panic), and once the broker is back it
    /// reads on from the last commit: nothing lost, duplicates counted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stream_checkpoints_survive_failing_commits_and_a_broker_down() {
        use cloudbus_core::StartPosition;
        let cluster = MockCluster::new(1).expect("a mock cluster");
        let bootstrap = cluster.bootstrap_servers();
        let topic = common::unique("stream-faults");
        cluster.create_topic(&topic, 2, 1).expect("a mock topic");
        let bus = common::bus(&bootstrap, "").await.expect("a bus");
        let publisher = bus.publisher(&topic).await.expect("a publisher");
        let all = events("com.example.stream-faults", 30);
        for r in publisher.publish_batch(all[..20].to_vec()).await {
            r.expect("published");
        }
        let seen: Seen = Arc::default();
        let mut reader = bus
            .stream_consumer(&topic, "faults")
            .await
            .expect("a reader")
            .start_at(StartPosition::Earliest);
        stream_until(&mut reader, &seen, 20, Duration::from_secs(30)).await;
        assert_eq!(seen.lock().expect("seen").len(), 20);
        for r in publisher.publish_batch(all[20..25].to_vec()).await {
            r.expect("published");
        }
        cluster.request_errors(
            RDKafkaApiKey::OffsetCommit,
            &[
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
                RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_COORDINATOR,
            ],
        );
        let handle = handler(Arc::clone(&seen));
        let mut failed = 0;
        for _ in 0..3 {
            let started = Instant::now();
            if reader.poll(&handle).await.is_err() {
                failed += 1;
            }
            assert!(started.elapsed() < Duration::from_secs(60), "a poll hung");
        }
        cluster.broker_down(1).expect("broker down");
        for _ in 0..2 {
            let started = Instant::now();
            if reader.poll(&handle).await.is_err() {
                failed += 1;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "a poll with the broker down hung"
            );
        }
        cluster.broker_up(1).expect("broker up");
        for r in publisher.publish_batch(all[25..].to_vec()).await {
            r.expect("published");
        }
        stream_until(&mut reader, &seen, 30, Duration::from_secs(60)).await;
        let seen = seen.lock().expect("seen").clone();
        let lost = all.iter().filter(|e| !seen.contains_key(e.id())).count();
        let duplicates: usize = seen.values().map(|n| n - 1).sum();
        println!(
            "stream faults: 30 published, {lost} lost, {duplicates} duplicates, {failed} polls failed"
        );
        assert!(failed > 0, "no poll saw the broker down");
        assert_eq!(lost, 0, "records lost");
    }

    /// 10,000 events published while brokers go down and up and produce, fetch and
    /// commit requests fail: every id is received, none is dead-lettered, and the
    /// run ends (librdkafka's in-process mock cluster: tansu cannot inject faults).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nothing_lost_while_brokers_go_down_and_requests_fail() {
        let cluster = MockCluster::new(3).expect("a mock cluster");
        let bootstrap = cluster.bootstrap_servers();
        for topic in ["orders", "orders.work.retry", "orders.work.dlq"] {
            cluster.create_topic(topic, 4, 3).expect("a mock topic");
        }
        let bus = common::bus(&bootstrap, "partitions=4&replication=3")
            .await
            .expect("a bus");
        bus.ensure_subscription(&SubscriptionSpec::new("orders", "work").max_delivery_attempts(50))
            .await
            .expect("the subscription");
        let seen: Seen = Arc::default();
        let worker = bus
            .consumer("orders", "work")
            .await
            .expect("a consumer")
            .start_worker(handler(Arc::clone(&seen)), WorkerOptions::default())
            .expect("a worker");
        let publisher = bus.publisher("orders").await.expect("a publisher");

        let count = std::env::var("KAFKA_MOCK_EVENTS")
            .ok()
            .and_then(|n| n.parse().ok())
            .unwrap_or(10_000);
        let all = events("com.example.mock", count);
        let ids: Vec<String> = all.iter().map(|e| e.id().to_owned()).collect();
        // Publishing runs in its own task; the faults are injected here (the mock
        // cluster's handle stays on the test's thread) until it is done.
        let publishing = tokio::spawn(async move {
            let mut refused = 0;
            for chunk in all.chunks(500) {
                for result in publisher.publish_batch(chunk.to_vec()).await {
                    if let Err(e) = result {
                        refused += 1;
                        eprintln!("publish refused: {e}");
                    }
                }
            }
            refused
        });
        let mut rounds = 0u32;
        let mut injected = 0u32;
        let faults: Vec<String> = std::env::var("KAFKA_MOCK_FAULTS")
            .unwrap_or_else(|_| "down,produce,commit,fetch,rtt".into())
            .split(',')
            .map(str::to_owned)
            .collect();
        let on = |f: &str| faults.iter().any(|x| x == f);
        // Faults for the first 30 rounds (about 12 s, while the events are being
        // published), then calm until the publishing ends: a fault schedule that never
        // stops starves the idempotent producer (every produce request of a partition
        // fails) and proves nothing more.
        while !publishing.is_finished() {
            if rounds >= 30 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
            let broker = (rounds % 3) as i32 + 1;
            if on("down") {
                let _ = cluster.broker_down(broker);
                tokio::time::sleep(Duration::from_millis(150)).await;
                let _ = cluster.broker_up(broker);
            }
            if on("produce") {
                cluster.request_errors(
                    RDKafkaApiKey::Produce,
                    &[
                        RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
                        RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT,
                    ],
                );
            }
            if on("commit") {
                cluster.request_errors(
                    RDKafkaApiKey::OffsetCommit,
                    &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT],
                );
            }
            if on("fetch") {
                cluster.request_errors(
                    RDKafkaApiKey::Fetch,
                    &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION],
                );
            }
            if on("rtt") {
                let rtt = if rounds.is_multiple_of(2) { 50 } else { 0 };
                let _ = cluster.broker_round_trip_time(broker, Duration::from_millis(rtt));
            }
            injected += 5;
            rounds += 1;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        for broker in 1..=3 {
            let _ = cluster.broker_up(broker);
            let _ = cluster.broker_round_trip_time(broker, Duration::ZERO);
        }
        let refused = publishing.await.expect("the publishing task");
        wait_for(&seen, ids.len(), Duration::from_secs(120)).await;
        let report = worker.shutdown(Duration::from_secs(10)).await;
        let seen = seen.lock().expect("seen").clone();
        let lost: Vec<&String> = ids.iter().filter(|id| !seen.contains_key(*id)).collect();
        let duplicates: usize = seen.values().map(|n| n - 1).sum();
        let letters = bus
            .dead_letters("orders", "work")
            .await
            .expect("dead letters")
            .peek(10)
            .await
            .expect("peek");
        println!(
            "mock cluster: {} published ({refused} refused), {} received, {} lost, {duplicates} duplicates, {} dead-lettered; {rounds} rounds of faults ({injected} injected); {report:?}",
            ids.len(),
            seen.len(),
            lost.len(),
            letters.len()
        );
        assert_eq!(refused, 0, "the publisher gave up on events under faults");
        assert!(
            lost.is_empty(),
            "{} events lost, e.g. {:?}",
            lost.len(),
            lost.first()
        );
        assert!(
            letters.is_empty(),
            "{} events dead-lettered wrongly",
            letters.len()
        );
    }
}

mod tansu {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn stream_checkpoints_are_the_groups_committed_offsets() {
        let Some(bootstrap) = common::bootstrap() else {
            return;
        };
        stream_checkpoints_are_committed_offsets(&bootstrap, |_| {}).await;
    }

    /// Once a consumer's close returns it fetches nothing more, so the subscription
    /// can be deleted right after it while the consumer object lives on, also when
    /// the first close was cancelled half way; a delivery not settled by the close
    /// cannot be settled after it (`Closed`: the group delivers it again). Before, close
    /// only unsubscribed: the member kept its partitions (the revocation waits for a
    /// receive to serve it) and went on fetching the deleted retry topic; tansu answers
    /// such a fetch with a null topic id and a current leader, and librdkafka 2.12.1
    /// crashed the process on it (a NULL topic name in `rd_kafka_metadata_update_op`).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_closed_consumer_fetches_nothing_after_its_subscription_is_deleted() {
        let Some(bootstrap) = common::bootstrap() else {
            return;
        };
        let topic = common::unique("closed");
        let bus = common::bus(&bootstrap, "").await.expect("a bus");
        bus.ensure_topic(&topic).await.expect("the topic");
        bus.ensure_subscription(&SubscriptionSpec::new(&topic, "s"))
            .await
            .expect("the subscription");
        let consumer = bus.consumer(&topic, "s").await.expect("a consumer");
        let publisher = bus.publisher(&topic).await.expect("a publisher");
        for r in publisher
            .publish_batch(events("com.example.closed", 21))
            .await
        {
            r.expect("published");
        }
        let mut received = Vec::new();
        let until = Instant::now() + Duration::from_secs(60);
        while received.len() < 21 && Instant::now() < until {
            received.extend(
                consumer
                    .receive_batch(21, Duration::from_secs(1))
                    .await
                    .expect("a receive"),
            );
        }
        assert_eq!(received.len(), 21);
        // All but one acked; that one is still in flight at the close.
        let unsettled = received.pop().expect("21 deliveries");
        for r in consumer.ack_all(&received).await {
            r.expect("acked");
        }
        // A close given up by its caller half way is finished by the next call (which
        // before returned Ok at once, with the consumer still fetching).
        let cancelled = tokio::time::timeout(Duration::from_millis(5), consumer.close()).await;
        assert!(cancelled.is_err(), "the first close was to be cancelled");
        consumer.close().await.expect("closed");
        // Its partitions went back to the group: the delivery still in flight cannot
        // be settled any more (the group delivers it again).
        let late = unsettled.ack().await.expect_err("an ack after close");
        assert_eq!(late.kind(), cloudbus_core::ErrorKind::Closed, "{late}");
        bus.delete_subscription(&topic, "s")
            .await
            .expect("the subscription deleted");
        let admin: rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext> =
            rdkafka::ClientConfig::new()
                .set("bootstrap.servers", &bootstrap)
                .create()
                .expect("an admin client");
        let options =
            rdkafka::admin::AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        for r in admin
            .delete_topics(&[topic.as_str()], &options)
            .await
            .expect("delete the topic")
        {
            r.expect("the topic deleted");
        }
        // The consumer is still alive: were it fetching, its fetches of the deleted
        // topics would come back within librdkafka's fetch wait (500 ms).
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert!(
            consumer.receive_batch(1, Duration::ZERO).await.is_err(),
            "a closed consumer receives nothing"
        );
        // Dropped: the member leaves the group (on a blocking thread).
        drop(consumer);
        tokio::time::sleep(Duration::from_secs(3)).await;
    }

    /// A nack with a delay goes through the retry topic, a dead-letter through the
    /// dead-letter topic: both with the attempt count, the origin and (for the dead
    /// letter) the reason in headers; redrive brings the letter back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retry_and_dead_letter_topics_carry_their_headers() {
        let Some(bootstrap) = common::bootstrap() else {
            return;
        };
        let topic = common::unique("headers");
        // Its own group name: Kafka groups are by name alone, and another test's
        // live member of a group "s" would make moving this one's offsets fail.
        let bus = common::bus(&bootstrap, "").await.expect("a bus");
        bus.ensure_topic(&topic).await.expect("the topic");
        bus.ensure_subscription(&SubscriptionSpec::new(&topic, "retry-headers"))
            .await
            .expect("the subscription");
        let consumer = bus
            .consumer(&topic, "retry-headers")
            .await
            .expect("a consumer");
        let e = events("com.example.retry", 1).remove(0);
        bus.publisher(&topic)
            .await
            .expect("a publisher")
            .publish(e.clone())
            .await
            .expect("published");
        let first = consumer.receive().await.expect("a delivery");
        let nacked_at = Instant::now();
        first.nack(Duration::from_secs(2)).await.expect("nacked");
        let second = consumer.receive().await.expect("the retry");
        assert!(
            nacked_at.elapsed() >= Duration::from_millis(1900),
            "retried after {:?}",
            nacked_at.elapsed()
        );
        assert_eq!(second.event().id(), e.id());
        assert_eq!(second.attempt(), 2);
        second
            .dead_letter_with("bad-data", "field x is missing")
            .await
            .expect("dead-lettered");
        let dlq = bus
            .dead_letters(&topic, "retry-headers")
            .await
            .expect("dead letters");
        let mut letters = Vec::new();
        let until = Instant::now() + Duration::from_secs(20);
        while letters.is_empty() && Instant::now() < until {
            letters = dlq.peek(10).await.expect("peek");
        }
        assert_eq!(letters.len(), 1);
        assert_eq!(letters[0].reason.as_deref(), Some("bad-data"));
        assert_eq!(
            letters[0].description.as_deref(),
            Some("field x is missing")
        );
        assert_eq!(letters[0].attempts, 2);
        assert_eq!(
            letters[0].source_entity.as_deref(),
            Some(format!("{topic}/retry-headers").as_str())
        );
        // The raw record on the dead-letter topic names where it came from.
        let raw = raw_records(
            &bootstrap,
            &cloudbus_kafka::dead_letter_topic(&topic, "retry-headers"),
            1,
        )
        .await;
        let header = |name: &str| {
            raw[0]
                .headers
                .iter()
                .rev()
                .find(|(k, _)| k == name)
                .and_then(|(_, v)| v.clone())
                .map(|v| String::from_utf8_lossy(&v).into_owned())
        };
        assert_eq!(header("cloudbus-original-topic"), Some(topic.clone()));
        assert_eq!(header("cloudbus-original-offset").as_deref(), Some("0"));
        assert_eq!(
            header("cloudbus-dead-letter-reason").as_deref(),
            Some("bad-data")
        );
        assert_eq!(header("ce_id").as_deref(), Some(e.id()));
        assert_eq!(dlq.redrive_all().await.expect("redrive"), 1);
        let back = consumer.receive().await.expect("redriven");
        assert_eq!(back.event().id(), e.id());
        assert_eq!(
            back.attempt(),
            1,
            "a redriven letter starts its attempts afresh"
        );
        back.ack().await.expect("acked");
        assert!(dlq.peek(10).await.expect("peek").is_empty());
    }

    /// Retried records not due yet are held in memory up to the URL's `retry_hold`;
    /// then the retry topic is paused until half of them are due, and read on from
    /// where it stopped: 20 events nacked with a delay, a hold of 5, never more than
    /// 5 held, every one delivered again, none twice.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn retries_held_in_memory_are_bounded() {
        let Some(bootstrap) = common::bootstrap() else {
            return;
        };
        let topic = common::unique("hold");
        let bus = common::bus(&bootstrap, "retry_hold=5&partitions=1")
            .await
            .expect("a bus");
        bus.ensure_topic(&topic).await.expect("the topic");
        bus.ensure_subscription(&SubscriptionSpec::new(&topic, "hold"))
            .await
            .expect("the subscription");
        let consumer = bus.consumer(&topic, "hold").await.expect("a consumer");
        let sent = publish_receive_and_nack(
            &bus,
            &topic,
            &consumer,
            events("com.example.hold", 20),
            Duration::from_secs(60),
            Duration::from_secs(3),
        )
        .await;
        let held = || {
            consumer
                .downcast::<cloudbus_kafka::KafkaSubscription>()
                .expect("a Kafka subscription")
                .held_retries()
        };
        let mut again: HashMap<String, usize> = HashMap::new();
        let mut most_held = 0;
        let until = Instant::now() + Duration::from_secs(90);
        while again.len() < sent.len() && Instant::now() < until {
            let batch = consumer
                .receive_batch(20, Duration::from_secs(1))
                .await
                .expect("a receive");
            most_held = most_held.max(held());
            for d in &batch {
                assert_eq!(d.attempt(), 2, "a retry is the second delivery");
                *again.entry(d.event().id().to_owned()).or_default() += 1;
            }
            for r in consumer.ack_all(&batch).await {
                r.expect("acked");
            }
        }
        assert_eq!(again.len(), sent.len(), "every retry delivered within 90 s");
        assert!(again.values().all(|n| *n == 1), "none twice: {again:?}");
        assert!(most_held >= 1, "retries were held before they were due");
        assert!(most_held <= 5, "held {most_held} retries, the hold is 5");
        consumer.close().await.expect("closed");
    }

    /// A plan describes a Kafka topic's settings the URL declares: partitions,
    /// replication, `retention.ms`, `cleanup.policy`. The same URL plans no change;
    /// another retention plans `~ topic` with the old and new values, which apply
    /// sets (IncrementalAlterConfigs, so the topic's cleanup policy stays) and the
    /// next plan finds; other partitions plan a change that apply refuses
    /// (`Unsupported`, naming the setting) after setting the retention declared
    /// with them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn topology_plan_compares_the_topic_settings_the_url_declares() {
        use cloudbus_core::topology::{self, Change, Difference, Topology};
        let Some(bootstrap) = common::bootstrap() else {
            return;
        };
        let topic = common::unique("topic-settings");
        let declared: Topology =
            serde_json::from_value(serde_json::json!({"topics": [{"name": topic}]}))
                .expect("a topology");
        let made = common::bus(
            &bootstrap,
            "partitions=2&replication=1&retention_ms=3600000&cleanup_policy=compact",
        )
        .await
        .expect("a bus");
        let plan = topology::plan(&made, &declared).await.expect("a plan");
        assert_eq!(plan.changes, [Change::CreateTopic(topic.clone())], "{plan}");
        topology::apply(&made, &plan).await.expect("applied");
        let plan = topology::plan(&made, &declared).await.expect("a plan");
        assert_eq!(
            plan.changes,
            [Change::TopicUnchanged(topic.clone())],
            "{plan}"
        );

        // Another retention: planned, applied, then found.
        let longer = common::bus(&bootstrap, "partitions=2&retention_ms=7200000")
            .await
            .expect("a bus");
        let plan = topology::plan(&longer, &declared).await.expect("a plan");
        assert_eq!(
            plan.changes,
            [Change::UpdateTopic {
                name: topic.clone(),
                differences: vec![Difference {
                    setting: "retention.ms",
                    current: "3600000".into(),
                    wanted: "7200000".into(),
                }],
            }],
            "{plan}"
        );
        assert!(
            plan.to_string()
                .contains("retention.ms: 3600000 -> 7200000"),
            "{plan}"
        );
        assert_eq!(topology::apply(&longer, &plan).await.expect("applied"), 1);
        let plan = topology::plan(&longer, &declared).await.expect("a plan");
        assert_eq!(
            plan.changes,
            [Change::TopicUnchanged(topic.clone())],
            "{plan}"
        );
        // The cleanup policy set at creation is still there.
        let plan = topology::plan(&made, &declared).await.expect("a plan");
        let Change::UpdateTopic { differences, .. } = &plan.changes[0] else {
            panic!("the first URL's retention differs now: {plan}");
        };
        let settings: Vec<&str> = differences.iter().map(|d| d.setting).collect();
        assert_eq!(settings, ["retention.ms"], "{plan}");

        // Other partitions: planned; apply sets the retention, then refuses them.
        let wider = common::bus(&bootstrap, "partitions=4&retention_ms=60000")
            .await
            .expect("a bus");
        let plan = topology::plan(&wider, &declared).await.expect("a plan");
        let Change::UpdateTopic { differences, .. } = &plan.changes[0] else {
            panic!("partitions and retention differ: {plan}");
        };
        let settings: Vec<&str> = differences.iter().map(|d| d.setting).collect();
        assert_eq!(settings, ["partitions", "retention.ms"], "{plan}");
        let refused = topology::apply(&wider, &plan)
            .await
            .expect_err("partitions are not changed");
        assert_eq!(
            refused.kind(),
            cloudbus_core::ErrorKind::Unsupported,
            "{refused}"
        );
        assert!(refused.message().contains("partitions"), "{refused}");
        let plan = topology::plan(&wider, &declared).await.expect("a plan");
        let Change::UpdateTopic { differences, .. } = &plan.changes[0] else {
            panic!("the partitions still differ: {plan}");
        };
        let settings: Vec<&str> = differences.iter().map(|d| d.setting).collect();
        assert_eq!(settings, ["partitions"], "the retention was set: {plan}");
        assert_eq!(
            (
                differences[0].current.as_str(),
                differences[0].wanted.as_str()
            ),
            ("2", "4")
        );
    }

    /// `cloudbus topology plan` on Kafka (`cloudbus_core::topology::plan`, what the
    /// CLI calls): a topic and a subscription not made yet are to create; once
    /// ensured, the same declaration plans no change; a subscription missing beside
    /// them (or with only its retry topic) is to create; a lease changed against what
    /// this process declared is an update of the lease, applied in place; and a
    /// subscription whose topics another process made has settings Kafka does not
    /// keep, so they are not compared (no drift).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn topology_plan_reads_topics_and_subscriptions() {
        use cloudbus_core::topology::{self, Change, Topology};
        let Some(bootstrap) = common::bootstrap() else {
            return;
        };
        let topic = common::unique("plan");
        let bus = common::bus(&bootstrap, "").await.expect("a bus");
        let declare = |subscriptions: serde_json::Value| -> Topology {
            serde_json::from_value(serde_json::json!({"topics": [{
                "name": topic,
                "subscriptions": subscriptions,
            }]}))
            .expect("a topology")
        };
        let billing = serde_json::json!({
            "name": "billing",
            "lease": "45s",
            "max_delivery_attempts": 4,
            "filter": {"prefix": {"attribute": "type", "prefix": "com.example.order."}},
        });
        let declared = declare(serde_json::json!([billing.clone()]));
        let spec = declared.subscriptions().expect("specs").remove(0);

        let plan = topology::plan(&bus, &declared)
            .await
            .expect("the first plan");
        assert_eq!(
            plan.changes,
            [
                Change::CreateTopic(topic.clone()),
                Change::CreateSubscription(spec.clone()),
            ],
            "the first plan:\n{plan}"
        );

        bus.ensure_topic(&topic).await.expect("the topic");
        bus.ensure_subscription(&spec)
            .await
            .expect("the subscription");
        let plan = topology::plan(&bus, &declared)
            .await
            .expect("the plan once ensured");
        assert_eq!(
            plan.changes,
            [
                Change::TopicUnchanged(topic.clone()),
                Change::SubscriptionUnchanged(spec.clone()),
            ],
            "the plan once ensured:\n{plan}"
        );
        assert!(plan.is_empty(), "{plan}");
        assert_eq!(topology::apply(&bus, &plan).await.expect("apply"), 0);

        // A subscription not ensured beside it, and one with only its retry topic.
        bus.ensure_topic(&cloudbus_kafka::retry_topic(&topic, "half"))
            .await
            .expect("a retry topic alone");
        let wider =
            declare(serde_json::json!([billing.clone(), {"name": "audit"}, {"name": "half"}]));
        let specs = wider.subscriptions().expect("specs");
        let plan = topology::plan(&bus, &wider).await.expect("the wider plan");
        assert_eq!(
            plan.changes,
            [
                Change::TopicUnchanged(topic.clone()),
                Change::SubscriptionUnchanged(spec.clone()),
                Change::CreateSubscription(specs[1].clone()),
                Change::CreateSubscription(specs[2].clone()),
            ],
            "the plan with subscriptions to add:\n{plan}"
        );
        assert_eq!(plan.change_count(), 2, "{plan}");

        // What this process declared is compared: a longer lease is an update of it.
        let mut longer = billing.clone();
        longer["lease"] = serde_json::json!("60s");
        let longer = declare(serde_json::json!([longer]));
        let plan = topology::plan(&bus, &longer)
            .await
            .expect("the longer plan");
        let differences = plan.changes.iter().find_map(|c| match c {
            Change::UpdateSubscription { spec, differences } if spec.name == "billing" => {
                Some(differences.clone())
            }
            _ => None,
        });
        let differences = differences.unwrap_or_else(|| panic!("no update in\n{plan}"));
        assert_eq!(differences.len(), 1, "{plan}");
        assert_eq!(
            (
                differences[0].setting,
                differences[0].current.as_str(),
                differences[0].wanted.as_str()
            ),
            ("lease", "45s", "60s"),
            "{plan}"
        );
        assert_eq!(plan.change_count(), 1, "{plan}");
        assert_eq!(topology::apply(&bus, &plan).await.expect("apply"), 1);
        let again = topology::plan(&bus, &longer)
            .await
            .expect("the plan after the update");
        assert!(again.is_empty(), "the plan after the update:\n{again}");

        // Made by another process (its topics exist, nothing declared here): its
        // settings are unknown to Kafka, so the subscription is as declared.
        for t in [
            cloudbus_kafka::retry_topic(&topic, "elsewhere"),
            cloudbus_kafka::dead_letter_topic(&topic, "elsewhere"),
        ] {
            bus.ensure_topic(&t)
                .await
                .expect("a topic of the subscription");
        }
        let elsewhere = declare(serde_json::json!([{
            "name": "elsewhere",
            "lease": "90s",
            "max_delivery_attempts": 3,
            "filter": {"prefix": {"attribute": "type", "prefix": "com.example.other."}},
        }]));
        let plan = topology::plan(&bus, &elsewhere)
            .await
            .expect("the plan of a subscription made elsewhere");
        assert_eq!(
            plan.changes,
            [
                Change::TopicUnchanged(topic.clone()),
                Change::SubscriptionUnchanged(elsewhere.subscriptions().expect("specs").remove(0)),
            ],
            "the plan of a subscription made elsewhere:\n{plan}"
        );
    }

    /// The first `count` records of `topic`, as a plain Kafka consumer sees them.
    async fn raw_records(
        bootstrap: &str,
        topic: &str,
        count: usize,
    ) -> Vec<cloudbus_kafka::KafkaRecord> {
        use rdkafka::Message;
        use rdkafka::consumer::{Consumer, StreamConsumer};
        use rdkafka::message::Headers;
        let consumer: StreamConsumer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", common::unique("raw"))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            // tansu holds a new group's first join for half the session timeout.
            .set("session.timeout.ms", "6000")
            .create()
            .expect("a consumer");
        consumer.subscribe(&[topic]).expect("subscribed");
        let mut out = Vec::new();
        while out.len() < count {
            let m = tokio::time::timeout(Duration::from_secs(20), consumer.recv())
                .await
                .expect("a record in time")
                .expect("a record");
            out.push(cloudbus_kafka::KafkaRecord {
                key: m.key().map(<[u8]>::to_vec),
                headers: m
                    .headers()
                    .map(|hs| {
                        hs.iter()
                            .map(|h| (h.key.to_owned(), h.value.map(<[u8]>::to_vec)))
                            .collect()
                    })
                    .unwrap_or_default(),
                payload: m.payload().map(<[u8]>::to_vec),
            });
        }
        out
    }
}
