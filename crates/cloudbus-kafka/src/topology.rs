//! Declaring what a service needs on Kafka: topics (partitions, replication,
//! retention and cleanup policy from the URL), and per subscription its retry and
//! dead-letter topics and its group's starting offsets (the end of the topic when the
//! subscription is new, as a new subscription of any other provider sees only what
//! is published after it). Event Hubs has no admin API for topics: there the hubs
//! must exist and `ensure` only checks them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use cloudbus_driver::{
    Error, ErrorKind, Result, SubscriptionSpec, TopologyDriver, TopologyPlanning,
};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use crate::connection::{
    METADATA_TIMEOUT, Shared, blocking, client_config, dead_letter_group, dead_letter_topic,
    retry_topic,
};
use crate::error::kafka_error;

/// How long `ensure_topic` waits for a new topic to show in the metadata.
const VISIBLE_WITHIN: Duration = Duration::from_secs(15);

/// Declares topics and subscriptions on one cluster.
pub struct KafkaTopology {
    shared: Arc<Shared>,
}

impl KafkaTopology {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        KafkaTopology { shared }
    }

    fn admin(&self) -> Result<AdminClient<DefaultClientContext>> {
        client_config(self.shared.config.client_settings())
            .create()
            .map_err(|e| kafka_error(e, "create the Kafka admin client"))
    }

    /// Creates `topics` with `partitions` each (the URL's count when `None`) unless
    /// they exist, then waits until the metadata shows them.
    async fn create(&self, topics: &[String], partitions: Option<usize>) -> Result<()> {
        if !self.shared.config.admin_api() {
            for topic in topics {
                self.shared.partition_count(topic).await.map_err(|e| {
                    if e.kind() == ErrorKind::NotFound {
                        Error::not_found(format!(
                            "event hub {topic:?} does not exist: Event Hubs has no Kafka admin API, so create it (and its consumer group) in the portal, the CLI or a template"
                        ))
                    } else {
                        e
                    }
                })?;
            }
            return Ok(());
        }
        // Topics that exist already need no admin call (nor the permission for one).
        let mut missing = Vec::new();
        for topic in topics {
            match self.shared.partition_count(topic).await {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => missing.push(topic.clone()),
                Err(e) => return Err(e),
            }
        }
        if missing.is_empty() {
            return Ok(());
        }
        let topics = &missing;
        let admin = self.admin()?;
        let count = partitions
            .map(|p| p as i32)
            .unwrap_or(self.shared.config.topic_partitions());
        let replication = self.shared.config.topic_replication();
        let configs = self.shared.config.topic_configs();
        let new: Vec<NewTopic<'_>> = topics
            .iter()
            .map(|t| {
                let mut n = NewTopic::new(t, count, TopicReplication::Fixed(replication));
                for (k, v) in &configs {
                    n = n.set(k, v);
                }
                n
            })
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let results = admin
            .create_topics(new.iter(), &options)
            .await
            .map_err(|e| kafka_error(e, "create Kafka topics"))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    return Err(Error::new(
                        crate::error::kind_of_code(code),
                        format!("create Kafka topic {topic:?}: {code}"),
                    ));
                }
            }
        }
        for topic in topics {
            let until = Instant::now() + VISIBLE_WITHIN;
            loop {
                match self.shared.partition_count(topic).await {
                    Ok(_) => break,
                    Err(e) if Instant::now() < until && e.kind() == ErrorKind::NotFound => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(())
    }

    /// Commits `offsets` for `group` (a group with no live member: Kafka refuses
    /// to move the offsets of a group whose consumers are running).
    async fn commit_for(&self, group: &str, offsets: TopicPartitionList) -> Result<()> {
        let settings = self.shared.config.consumer_settings(group);
        let group = group.to_owned();
        blocking(move || {
            let client: BaseConsumer = client_config(settings)
                .create()
                .map_err(|e| kafka_error(e, "create a Kafka client"))?;
            client.commit(&offsets, CommitMode::Sync).map_err(|e| {
                let mut err = kafka_error(e, &format!("move the offsets of group {group:?}"));
                if matches!(
                    err.source_as::<rdkafka::error::KafkaError>()
                        .and_then(|k| k.rdkafka_error_code()),
                    Some(RDKafkaErrorCode::UnknownMemberId | RDKafkaErrorCode::IllegalGeneration | RDKafkaErrorCode::RebalanceInProgress)
                ) {
                    err = Error::new(
                        ErrorKind::InvalidArgument,
                        format!("group {group:?} has running consumers; Kafka moves a group's offsets only while none are (stop them first, as kafka-consumer-groups --reset-offsets asks)"),
                    );
                }
                err
            })
        })
        .await
    }

    /// Offsets of every partition of `topic`: at `at` (the first record at or after
    /// it), or at the end when `None`.
    async fn offsets(&self, topic: &str, at: Option<DateTime<Utc>>) -> Result<TopicPartitionList> {
        let partitions = self.shared.partition_count(topic).await?;
        let shared = Arc::clone(&self.shared);
        let topic = topic.to_owned();
        blocking(move || {
            let mut out = TopicPartitionList::new();
            match at {
                Some(time) => {
                    let mut wanted = TopicPartitionList::new();
                    for p in 0..partitions {
                        let _ = wanted.add_partition_offset(
                            &topic,
                            p as i32,
                            Offset::Offset(time.timestamp_millis()),
                        );
                    }
                    let found = shared
                        .metadata
                        .offsets_for_times(wanted, METADATA_TIMEOUT)
                        .map_err(|e| {
                            kafka_error(e, &format!("find the offsets of {topic:?} at {time}"))
                        })?;
                    for e in found.elements() {
                        let offset = match e.offset() {
                            Offset::Offset(o) => Offset::Offset(o),
                            // No record at or after the time: the end.
                            _ => {
                                let (_, high) = shared
                                    .metadata
                                    .fetch_watermarks(&topic, e.partition(), METADATA_TIMEOUT)
                                    .map_err(|e| kafka_error(e, "read watermarks"))?;
                                Offset::Offset(high)
                            }
                        };
                        let _ = out.add_partition_offset(&topic, e.partition(), offset);
                    }
                }
                None => {
                    for p in 0..partitions {
                        let (_, high) = shared
                            .metadata
                            .fetch_watermarks(&topic, p as i32, METADATA_TIMEOUT)
                            .map_err(|e| {
                                kafka_error(e, &format!("read the watermarks of {topic:?}"))
                            })?;
                        let _ = out.add_partition_offset(&topic, p as i32, Offset::Offset(high));
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    /// Whether `group` has committed offsets on `topic`.
    async fn has_offsets(&self, group: &str, topic: &str) -> Result<bool> {
        let partitions = self.shared.partition_count(topic).await?;
        let settings = self.shared.config.consumer_settings(group);
        let topic = topic.to_owned();
        blocking(move || {
            let client: BaseConsumer = client_config(settings)
                .create()
                .map_err(|e| kafka_error(e, "create a Kafka client"))?;
            let mut wanted = TopicPartitionList::new();
            for p in 0..partitions {
                let _ = wanted.add_partition_offset(&topic, p as i32, Offset::Invalid);
            }
            let committed = client
                .committed_offsets(wanted, METADATA_TIMEOUT)
                .map_err(|e| kafka_error(e, "read committed offsets"))?;
            Ok(committed
                .elements()
                .iter()
                .any(|e| matches!(e.offset(), Offset::Offset(_))))
        })
        .await
    }
}

#[async_trait]
impl TopologyDriver for KafkaTopology {
    async fn ensure_topic(&self, topic: &str) -> Result<()> {
        self.create(&[topic.to_owned()], None).await
    }

    async fn ensure_subscription(&self, spec: &SubscriptionSpec) -> Result<()> {
        let partitions = self.shared.partition_count(&spec.topic).await?;
        self.create(
            &[
                retry_topic(&spec.topic, &spec.name),
                dead_letter_topic(&spec.topic, &spec.name),
            ],
            Some(partitions),
        )
        .await?;
        self.shared.declare(spec);
        // A new subscription starts at the end of its topic.
        if !self.has_offsets(&spec.name, &spec.topic).await? {
            let end = self.offsets(&spec.topic, None).await?;
            self.commit_for(&spec.name, end).await?;
        }
        Ok(())
    }

    async fn delete_subscription(&self, topic: &str, name: &str) -> Result<()> {
        self.shared.forget(topic, name);
        if !self.shared.config.admin_api() {
            return Ok(());
        }
        let admin = self.admin()?;
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        let retry = retry_topic(topic, name);
        let dlq = dead_letter_topic(topic, name);
        let results = admin
            .delete_topics(&[&retry, &dlq], &options)
            .await
            .map_err(|e| kafka_error(e, "delete the subscription's topics"))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
                Err((t, code)) => {
                    return Err(Error::new(
                        crate::error::kind_of_code(code),
                        format!("delete Kafka topic {t:?}: {code}"),
                    ));
                }
            }
        }
        let groups = [name.to_owned(), dead_letter_group(topic, name)];
        let groups: Vec<&str> = groups.iter().map(String::as_str).collect();
        // A group that never committed does not exist: nothing to delete.
        let _ = admin.delete_groups(&groups, &options).await;
        Ok(())
    }

    /// Moves the subscription's group to the first record published at or after
    /// `since` (`offsets_for_times`); its consumers must be stopped (Kafka's rule).
    async fn replay(&self, topic: &str, name: &str, since: DateTime<Utc>) -> Result<()> {
        let offsets = self.offsets(topic, Some(since)).await?;
        self.commit_for(name, offsets).await
    }

    fn planning(&self) -> Option<&dyn TopologyPlanning> {
        Some(self)
    }
}

#[async_trait]
impl TopologyPlanning for KafkaTopology {
    async fn topic_exists(&self, topic: &str) -> Result<bool> {
        match self.shared.partition_count(topic).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Kafka holds no subscription settings (a filter, a lease and a delivery limit
    /// are the consumer's, see the README): Unsupported, so a plan says so.
    async fn describe_subscription(
        &self,
        topic: &str,
        name: &str,
    ) -> Result<Option<cloudbus_driver::SubscriptionState>> {
        Err(Error::unsupported(format!(
            "Kafka keeps no settings of subscription {name:?} of {topic:?} on the broker (its filter, lease and delivery limit are the consumer's), so a plan cannot compare them"
        )))
    }
}
