//! Stream checkpoints kept where Kafka keeps them: a consumer group's committed
//! offsets. A stream reader group `G` of topic `T` is the Kafka consumer group `T.G`
//! ([`stream_group`](crate::stream_group)), and each reader (an `owner` of the [`CheckpointStore`] calls) is a member of it, so the
//! group coordinator, not a lease table, decides which reader holds which partition:
//!
//! - `acquire` answers whether the partition is in the member's current assignment
//!   (the first call joins the group and waits for the first assignment);
//! - `save` commits the offset after the handled record through the member, so a
//!   member that lost the partition in a rebalance is refused (the coordinator's
//!   generation check) and the new holder reads on from the last commit;
//! - `release` of the last partition an owner holds leaves the group, so the others
//!   take over at once; a reader that stops polling is dropped from the group after
//!   its lease (`max.poll.interval.ms`), one that dies after the session timeout;
//! - `load` reads the committed offset, which any Kafka tool also shows as the group's
//!   position.
//!
//! A member reads no records (its partitions are paused as soon as they are
//! assigned): the stream's partition readers do.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use cloudbus_driver::{CheckpointStore, Error, Result};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use crate::connection::{
    METADATA_TIMEOUT, Shared, blocking, client_config, drop_in_background, stream_group,
};
use crate::error::kafka_error;

/// How long the first `acquire` of a reader waits for the group's first assignment.
const JOIN_PATIENCE: Duration = Duration::from_secs(15);

/// A member's context: pauses what it is assigned (the member only holds partitions;
/// the stream's readers read them) and notes that the group has answered.
#[derive(Default)]
struct MemberContext {
    joined: AtomicBool,
}

impl ClientContext for MemberContext {}

impl ConsumerContext for MemberContext {
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(assigned) = rebalance {
            if assigned.count() > 0
                && let Err(e) = consumer.pause(assigned)
            {
                tracing::warn!(error = %e, "could not pause a stream group member's partitions; it fetches records it does not use");
            }
            self.joined.store(true, Ordering::Release);
        }
    }
}

/// How often a member's events (rebalances) are served between its reader's calls.
const SERVE_EVERY: Duration = Duration::from_millis(100);

/// One reader of a group: a member of the Kafka consumer group.
struct Member {
    consumer: BaseConsumer<MemberContext>,
    /// The partitions this reader acquired and has not released or lost.
    held: Mutex<HashSet<i32>>,
    /// When the reader last acquired or saved, and how long it may go without.
    touched: Mutex<Instant>,
    lease: Duration,
    /// One thread serves the member's events at a time.
    serving: Mutex<()>,
    /// The last error the member's client reported.
    last_error: Mutex<Option<String>>,
}

impl Member {
    fn held(&self) -> MutexGuard<'_, HashSet<i32>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn touch(&self) {
        *self.touched.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    /// Whether the reader called within its lease: while it does, the member's events
    /// are served between its calls; once it stops, they are not, and the group drops
    /// the member after `max.poll.interval.ms`.
    fn reader_alive(&self) -> bool {
        self.touched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
            <= self.lease
    }

    /// Serves the group's events (rebalances, commit results). A paused member gets
    /// no records; one that slipped through before the pause is dropped here (the
    /// stream's readers read it).
    fn serve(&self) {
        let _one = self.serving.lock().unwrap_or_else(|p| p.into_inner());
        // Bounded: a zero-timeout poll returns after each event it served.
        for _ in 0..64 {
            match self.consumer.poll(Duration::ZERO) {
                None => break,
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "Kafka stream group member");
                    *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(e.to_string());
                }
            }
        }
    }

    /// Serves the group's events and answers whether `partition` of `topic` is
    /// assigned to this member now.
    fn holds(&self, topic: &str, partition: i32) -> Result<bool> {
        self.serve();
        let assignment = self
            .consumer
            .assignment()
            .map_err(|e| kafka_error(e, "read a stream group member's assignment"))?;
        Ok(assignment.find_partition(topic, partition).is_some())
    }
}

/// A reader group's checkpoints as the committed offsets of its Kafka consumer group
/// (`<topic>.<group>`: see the module's documentation). The stream of a Kafka topic
/// gives one ([`StreamDriver::checkpoints`](cloudbus_driver::StreamDriver::checkpoints)),
/// so a `StreamConsumer` uses it unless it is given another store.
///
/// ```no_run
/// # async fn run() -> cloudbus_driver::Result<()> {
/// use cloudbus_core::{Event, HandlerContext, HandlerError, StartPosition};
/// let bus = cloudbus_kafka::connect("kafka://127.0.0.1:9092").await?;
/// // Checkpoints are the committed offsets of consumer group "orders.analytics".
/// let mut reader = bus.stream_consumer("orders", "analytics").await?.start_at(StartPosition::Earliest);
/// let handler = |_e: std::sync::Arc<Event>, _c: HandlerContext| async { Ok::<(), HandlerError>(()) };
/// reader.catch_up(&handler).await?;
/// reader.release().await?; // leaves the group: the other readers take its partitions
/// # Ok(()) }
/// ```
pub struct GroupCheckpoints {
    shared: Arc<Shared>,
    topic: String,
    /// The members of this process, by (group, owner).
    members: Mutex<HashMap<(String, String), Arc<Member>>>,
}

impl GroupCheckpoints {
    pub(crate) fn new(shared: Arc<Shared>, topic: &str) -> Self {
        GroupCheckpoints {
            shared,
            topic: topic.to_owned(),
            members: Mutex::new(HashMap::new()),
        }
    }

    fn members(&self) -> MutexGuard<'_, HashMap<(String, String), Arc<Member>>> {
        self.members.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn member(&self, group: &str, owner: &str) -> Option<Arc<Member>> {
        self.members()
            .get(&(group.to_owned(), owner.to_owned()))
            .cloned()
    }

    /// The settings of a member of `group` that is dropped from the group when it
    /// goes `lease` without serving its events.
    fn member_settings(&self, group: &str, lease: Duration) -> Vec<(String, String)> {
        let mut settings = self
            .shared
            .config
            .consumer_settings(&stream_group(&self.topic, group));
        // librdkafka wants session.timeout.ms <= max.poll.interval.ms <= 86400000.
        let interval = lease
            .max(self.shared.config.session_timeout())
            .as_millis()
            .min(86_400_000);
        settings.push(("max.poll.interval.ms".into(), interval.to_string()));
        settings
    }
}

/// Serves `member`'s events every [`SERVE_EVERY`] while its reader is alive, so that a
/// rebalance does not wait for the reader's next call; ends with the member.
fn serve_in_background(member: &Arc<Member>) {
    let member = Arc::downgrade(member);
    let spawned = std::thread::Builder::new()
        .name("cloudbus-kafka-member".into())
        .spawn(move || {
            loop {
                std::thread::sleep(SERVE_EVERY);
                let Some(member) = member.upgrade() else {
                    return;
                };
                if member.reader_alive() {
                    member.serve();
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "could not start a thread to serve a Kafka group member; its rebalances wait for its reader's calls");
    }
}

impl Drop for GroupCheckpoints {
    /// Members leave their groups off the async threads (a consumer's close waits for
    /// the coordinator).
    fn drop(&mut self) {
        let members: Vec<Arc<Member>> = self.members().drain().map(|(_, m)| m).collect();
        if !members.is_empty() {
            let _ = drop_in_background(members);
        }
    }
}

/// How long a release waits for its member to leave the group (with the broker down,
/// librdkafka's close waits for the coordinator): after that the member leaves on its
/// own thread.
const LEAVE_PATIENCE: Duration = Duration::from_secs(10);

/// Drops `member` (it leaves its group) off the async threads, waiting up to
/// [`LEAVE_PATIENCE`] so that the next reader finds the partitions free.
async fn leave(member: Arc<Member>) {
    if let Some(leaving) = drop_in_background(member)
        && tokio::time::timeout(LEAVE_PATIENCE, leaving).await.is_err()
    {
        tracing::warn!(
            "a Kafka stream group member is still leaving its group after {LEAVE_PATIENCE:?}; it goes on in the background"
        );
    }
}

fn partition_of(partition: &str) -> Result<i32> {
    partition
        .parse()
        .map_err(|_| Error::invalid(format!("{partition:?} is not a Kafka partition")))
}

/// The offset a group commits after handling the record at `sequence`.
fn offset_after(sequence: &str) -> Result<i64> {
    let offset: i64 = sequence
        .parse()
        .map_err(|_| Error::invalid(format!("{sequence:?} is not a Kafka offset")))?;
    offset
        .checked_add(1)
        .ok_or_else(|| Error::invalid(format!("offset {offset} has no successor")))
}

/// The checkpoint (the last handled offset) of a committed offset: `None` when the
/// group committed nothing for the partition.
fn checkpoint_of(committed: Offset) -> Option<String> {
    match committed {
        Offset::Offset(next) if next >= 0 => Some((next - 1).to_string()),
        _ => None,
    }
}

/// Whether a refused commit means the member no longer holds the partition (a
/// rebalance took it), rather than a broker or network failure.
fn lost_the_partition(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::IllegalGeneration
                | RDKafkaErrorCode::UnknownMemberId
                | RDKafkaErrorCode::RebalanceInProgress
                | RDKafkaErrorCode::FencedInstanceId
                | RDKafkaErrorCode::AssignmentLost
                | RDKafkaErrorCode::State
        )
    )
}

#[async_trait]
impl CheckpointStore for GroupCheckpoints {
    async fn load(&self, group: &str, partition: &str) -> Result<Option<String>> {
        let p = partition_of(partition)?;
        let member = self
            .members()
            .iter()
            .find(|(k, _)| k.0 == group)
            .map(|(_, m)| m.clone());
        let topic = self.topic.clone();
        let group = stream_group(&self.topic, group);
        let settings = self.shared.config.consumer_settings(&group);
        blocking(move || {
            let mut wanted = TopicPartitionList::new();
            wanted.add_partition(&topic, p);
            let what = format!("read consumer group {group:?}'s committed offset of {topic:?}/{p}");
            let committed = match member {
                Some(m) => m.consumer.committed_offsets(wanted, METADATA_TIMEOUT),
                None => {
                    // Reading a group's offsets needs no membership.
                    let reader: BaseConsumer = client_config(settings)
                        .create()
                        .map_err(|e| kafka_error(e, "create a Kafka offsets reader"))?;
                    reader.committed_offsets(wanted, METADATA_TIMEOUT)
                }
            }
            .map_err(|e| kafka_error(e, &what))?;
            Ok(committed
                .find_partition(&topic, p)
                .and_then(|e| checkpoint_of(e.offset())))
        })
        .await
    }

    async fn save(
        &self,
        group: &str,
        partition: &str,
        owner: &str,
        sequence: &str,
    ) -> Result<bool> {
        let p = partition_of(partition)?;
        let offset = offset_after(sequence)?;
        let Some(member) = self.member(group, owner) else {
            return Ok(false);
        };
        let topic = self.topic.clone();
        let group = stream_group(&self.topic, group);
        blocking(move || {
            member.touch();
            if !member.holds(&topic, p)? {
                member.held().remove(&p);
                return Ok(false);
            }
            let mut commit = TopicPartitionList::new();
            commit
                .add_partition_offset(&topic, p, Offset::Offset(offset))
                .map_err(|e| kafka_error(e, "build a commit"))?;
            match member.consumer.commit(&commit, CommitMode::Sync) {
                Ok(()) => Ok(true),
                Err(e) if lost_the_partition(&e) => {
                    tracing::info!(group = %group, topic = %topic, partition = p, error = %e, "commit refused: a rebalance gave the partition to another reader");
                    member.held().remove(&p);
                    Ok(false)
                }
                Err(e) => Err(kafka_error(
                    e,
                    &format!("commit consumer group {group:?}'s offset {offset} of {topic:?}/{p}"),
                )),
            }
        })
        .await
    }

    /// `lease` is how long the reader may go between polls before the group drops it
    /// (`max.poll.interval.ms`, at least the session timeout), set when it joins.
    async fn acquire(
        &self,
        group: &str,
        partition: &str,
        owner: &str,
        lease: Duration,
    ) -> Result<bool> {
        let p = partition_of(partition)?;
        let topic = self.topic.clone();
        let (member, joined_now) = match self.member(group, owner) {
            Some(m) => (m, false),
            None => {
                let settings = self.member_settings(group, lease);
                let topic = topic.clone();
                let member = blocking(move || {
                    let consumer: BaseConsumer<MemberContext> = client_config(settings)
                        .create_with_context(MemberContext::default())
                        .map_err(|e| kafka_error(e, "create a Kafka stream group member"))?;
                    consumer
                        .subscribe(&[&topic])
                        .map_err(|e| kafka_error(e, &format!("subscribe to {topic:?}")))?;
                    Ok(Arc::new(Member {
                        consumer,
                        held: Mutex::new(HashSet::new()),
                        touched: Mutex::new(Instant::now()),
                        lease,
                        serving: Mutex::new(()),
                        last_error: Mutex::new(None),
                    }))
                })
                .await?;
                // Two acquires of one owner racing: keep the first member.
                let mut members = self.members();
                let key = (group.to_owned(), owner.to_owned());
                match members.get(&key) {
                    Some(first) => {
                        let first = first.clone();
                        drop(members);
                        let _ = drop_in_background(member);
                        (first, false)
                    }
                    None => {
                        members.insert(key, member.clone());
                        serve_in_background(&member);
                        (member, true)
                    }
                }
            }
        };
        let group = stream_group(&self.topic, group);
        blocking(move || {
            member.touch();
            if joined_now {
                let until = Instant::now() + JOIN_PATIENCE;
                while !member.consumer.context().joined.load(Ordering::Acquire)
                    && Instant::now() < until
                {
                    member.serve();
                    std::thread::sleep(SERVE_EVERY);
                }
                if !member.consumer.context().joined.load(Ordering::Acquire) {
                    // Not "held by another reader": the group did not answer (brokers
                    // down, rights or credentials refused). The member stays and
                    // keeps trying; the next acquire asks again without waiting.
                    let last = member
                        .last_error
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .clone()
                        .unwrap_or_else(|| "no answer".into());
                    return Err(Error::new(
                        cloudbus_driver::ErrorKind::Unavailable,
                        format!(
                            "consumer group {group:?} gave no assignment within {JOIN_PATIENCE:?} ({last})"
                        ),
                    ));
                }
            }
            let holds = member.holds(&topic, p)?;
            let mut held = member.held();
            if holds {
                held.insert(p);
            } else {
                held.remove(&p);
            }
            Ok(holds)
        })
        .await
    }

    /// When the owner holds no partition any more, its member leaves the group, so
    /// the other readers are given its partitions at once.
    async fn release(&self, group: &str, partition: &str, owner: &str) -> Result<()> {
        let p = partition_of(partition)?;
        let key = (group.to_owned(), owner.to_owned());
        let leaving = {
            let mut members = self.members();
            let Some(member) = members.get(&key) else {
                return Ok(());
            };
            let mut held = member.held();
            held.remove(&p);
            let now_empty = held.is_empty();
            drop(held);
            if now_empty {
                members.remove(&key)
            } else {
                None
            }
        };
        if let Some(member) = leaving {
            leave(member).await;
        }
        Ok(())
    }

    /// The reader stops: its member leaves the group even when it held nothing (more
    /// readers than partitions), so that it does not hold up the group's rebalances.
    async fn release_owner(&self, group: &str, owner: &str) -> Result<()> {
        let member = self.members().remove(&(group.to_owned(), owner.to_owned()));
        if let Some(member) = member {
            leave(member).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_checkpoint_is_the_offset_before_the_committed_one() {
        assert_eq!(checkpoint_of(Offset::Offset(10)).as_deref(), Some("9"));
        assert_eq!(checkpoint_of(Offset::Offset(0)).as_deref(), Some("-1"));
        assert_eq!(checkpoint_of(Offset::Invalid), None);
        assert_eq!(checkpoint_of(Offset::Beginning), None);
        assert_eq!(offset_after("9").ok(), Some(10));
        assert_eq!(offset_after("-1").ok(), Some(0));
    }

    #[test]
    fn malformed_positions_are_typed_errors() {
        for bad in ["", "x", "1.5", "9223372036854775807"] {
            let e = offset_after(bad).err();
            assert_eq!(
                e.map(|e| e.kind()),
                Some(cloudbus_driver::ErrorKind::InvalidArgument),
                "{bad:?}"
            );
        }
        assert!(partition_of("shard-0").is_err());
        assert_eq!(partition_of("3").ok(), Some(3));
    }

    #[test]
    fn only_a_lost_membership_refuses_a_save_quietly() {
        let lost = KafkaError::ConsumerCommit(RDKafkaErrorCode::IllegalGeneration);
        assert!(lost_the_partition(&lost));
        let down = KafkaError::ConsumerCommit(RDKafkaErrorCode::BrokerTransportFailure);
        assert!(!lost_the_partition(&down));
    }
}
