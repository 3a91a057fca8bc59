//! Declaring what a service needs on Kafka: topics (partitions, replication,
//! retention and cleanup policy from the URL), and per subscription its retry and
//! dead-letter topics and its group's starting offsets (the end of the topic when the
//! subscription is new, as a new subscription of any other provider sees only what
//! is published after it). Event Hubs has no admin API for topics: there the hubs
//! must exist and `ensure` only checks them.
//!
//! A topology plan (`cloudbus topology plan`, [`TopologyPlanning`]) reads a topic as
//! existing when the metadata lists it, and a subscription as existing when its
//! retry and dead-letter topics both exist (what `ensure_subscription` makes; its
//! consumer group is the subscription's name). Kafka keeps none of a subscription's
//! settings on the broker: its filter, lease and delivery limit are the consumer's,
//! as the process declared them with `ensure_subscription`. So a plan compares
//! them only with what this process declared; a subscription declared by another
//! process (the CLI's plan of a service's topology) has settings the plan cannot
//! know, and they are not compared (not drift): it shows as `=` when it exists.
//! `ordered` is never compared: a Kafka subscription always keeps a key's records in
//! partition order.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use cloudbus_driver::{
    Error, ErrorKind, Result, SubscriptionSpec, SubscriptionState, TopicState, TopologyDriver,
    TopologyPlanning,
};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::TOPIC_CONFIG_NAMES;
use crate::connection::{
    METADATA_TIMEOUT, Shared, blocking, client_config, dead_letter_group, dead_letter_topic,
    drop_in_background, retry_topic,
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
        self.exists(topic).await
    }

    /// The subscription exists when its retry and dead-letter topics both do (a
    /// half-made one is missing: `ensure_subscription` makes the rest). Its settings
    /// are those this process declared: Kafka keeps none on the broker, so those of
    /// a subscription declared elsewhere are unknown, `None`.
    async fn describe_subscription(
        &self,
        topic: &str,
        name: &str,
    ) -> Result<Option<SubscriptionState>> {
        for part in [retry_topic(topic, name), dead_letter_topic(topic, name)] {
            if !self.exists(&part).await? {
                return Ok(None);
            }
        }
        Ok(Some(held_state(self.shared.declared(topic, name).as_ref())))
    }

    /// The spec's settings where this process declared the subscription, else
    /// nothing to compare (see `describe_subscription`).
    fn desired_state(&self, spec: &SubscriptionSpec) -> Result<SubscriptionState> {
        let declared_here = self.shared.declared(&spec.topic, &spec.name).is_some();
        Ok(wanted_state(spec, declared_here))
    }

    /// Kafka holds none of these settings: the subscription is declared again in
    /// this process (and its topics made if missing). Consumers opened from now on
    /// use the new settings; one already open keeps those it opened with.
    async fn update_subscription(&self, spec: &SubscriptionSpec) -> Result<()> {
        self.ensure_subscription(spec).await
    }

    /// The topic's `partitions` and `replication` from the metadata, and, where the
    /// URL declares them and the broker has the admin API (not Event Hubs), its
    /// `retention.ms` and `cleanup.policy` from `DescribeConfigs` (a config the
    /// broker does not report is left out: the plan shows it as `default`).
    async fn describe_topic(&self, topic: &str) -> Result<Option<TopicState>> {
        let layout = match self.shared.layout(topic).await {
            Ok(layout) => layout,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut state = TopicState::default();
        state
            .settings
            .insert("partitions", layout.partitions.to_string());
        state
            .settings
            .insert("replication", layout.replication.to_string());
        let declared = self.shared.config.declared_topic_settings();
        let configs_declared = declared
            .iter()
            .any(|(name, _)| TOPIC_CONFIG_NAMES.contains(name));
        if configs_declared && self.shared.config.admin_api() {
            let admin = self.admin()?;
            let options = AdminOptions::new().request_timeout(Some(METADATA_TIMEOUT));
            let described = admin
                .describe_configs([&ResourceSpecifier::Topic(topic)], &options)
                .await;
            // Dropping a client joins its threads: not on an async thread.
            let _ = drop_in_background(admin);
            // A broker without DescribeConfigs cannot tell what the URL declares: the
            // plan fails naming it (an `Unsupported` here would have the plan call
            // the topic unchanged).
            let cannot_tell = |e: Error| {
                if e.kind() == ErrorKind::Unsupported {
                    Error::invalid(format!(
                        "the URL declares {:?} for topic {topic:?}, but the broker cannot describe topic configs: {}",
                        TOPIC_CONFIG_NAMES,
                        e.message()
                    ))
                } else {
                    e
                }
            };
            let described = described
                .map_err(|e| kafka_error(e, &format!("describe the configs of topic {topic:?}")))
                .map_err(cannot_tell)?;
            for resource in described {
                let resource = resource
                    .map_err(|code| {
                        Error::new(
                            crate::error::kind_of_code(code),
                            format!("describe the configs of topic {topic:?}: {code}"),
                        )
                    })
                    .map_err(cannot_tell)?;
                for name in TOPIC_CONFIG_NAMES {
                    if let Some(value) = resource.get(name).and_then(|e| e.value.clone()) {
                        state.settings.insert(name, value);
                    }
                }
            }
        }
        Ok(Some(state))
    }

    /// What the URL declares ([`crate::KafkaConfig::declared_topic_settings`]).
    fn desired_topic_state(&self, _topic: &str) -> Result<TopicState> {
        Ok(TopicState {
            settings: self
                .shared
                .config
                .declared_topic_settings()
                .into_iter()
                .collect(),
        })
    }

    /// Sets the declared `retention.ms` and `cleanup.policy` that differ
    /// (`IncrementalAlterConfigs`: the topic's other configs stay). Partitions and
    /// replication are not changed: when they differ, the configs are set and then
    /// the answer is `Unsupported`, saying what to do. Kafka cannot take partitions away, and adding some moves
    /// keys to other partitions (a key's order breaks across the change, and its
    /// consumers see it), which is for an operator to decide with the consumers
    /// drained; replication is changed by reassigning partitions.
    async fn update_topic(&self, topic: &str) -> Result<()> {
        let current = self
            .describe_topic(topic)
            .await?
            .ok_or_else(|| Error::not_found(format!("Kafka topic {topic:?} does not exist")))?;
        let wanted = self.desired_topic_state(topic)?;
        let differing: Vec<(&str, &str)> = wanted.differing_from(&current).collect();
        let differ = |name: &str| differing.iter().any(|(n, _)| *n == name);
        let configs: Vec<(&str, String)> = differing
            .iter()
            .filter(|(name, _)| TOPIC_CONFIG_NAMES.contains(name))
            .map(|(name, value)| (*name, (*value).to_owned()))
            .collect();
        if !configs.is_empty() {
            if !self.shared.config.admin_api() {
                return Err(Error::unsupported(format!(
                    "Event Hubs has no Kafka admin API: change the retention of event hub {topic:?} in the portal, the CLI or a template"
                )));
            }
            let admin = self.admin()?;
            let name = topic.to_owned();
            blocking(move || {
                let pairs: Vec<(&str, &str)> =
                    configs.iter().map(|(n, v)| (*n, v.as_str())).collect();
                crate::incremental_configs::set_topic_configs(
                    &admin,
                    &name,
                    &pairs,
                    METADATA_TIMEOUT,
                )
            })
            .await?;
        }
        // Then what apply does not change (the configs above are set all the same).
        if differ("partitions") {
            return Err(Error::unsupported(format!(
                "Kafka topic {topic:?} has {} partitions, the URL declares {}: cloudbus does not change a topic's partitions (Kafka cannot take partitions away, and adding some moves keys to other partitions, breaking their order across the change); with its consumers drained, run `kafka-topics.sh --alter --topic {topic} --partitions N`, or declare the count the topic has",
                shown(&current, "partitions"),
                shown(&wanted, "partitions"),
            )));
        }
        if differ("replication") {
            return Err(Error::unsupported(format!(
                "Kafka topic {topic:?} has replication {}, the URL declares {}: cloudbus does not reassign partitions (use `kafka-reassign-partitions.sh`), or declare the factor the topic has",
                shown(&current, "replication"),
                shown(&wanted, "replication"),
            )));
        }
        Ok(())
    }
}

impl KafkaTopology {
    /// Whether `topic` is in the metadata (NotFound is `false`).
    async fn exists(&self, topic: &str) -> Result<bool> {
        match self.shared.partition_count(topic).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Setting `name` of `state` for a message, `?` when it has none.
fn shown<'a>(state: &'a TopicState, name: &str) -> &'a str {
    state.settings.get(name).map_or("?", String::as_str)
}

/// What a plan reads of an existing subscription: the settings of `declared`, the
/// spec this process declared for it; `None` (not declared here) is nothing known,
/// as Kafka keeps no subscription settings on the broker. The filter is the
/// portable filter's JSON (it runs in the consumer), a delivery limit of `None` is
/// `0` (unlimited, as the consumer reads it), the lease is exact (in-process, no
/// rounding), and ordering is not a setting (always in partition order).
fn held_state(declared: Option<&SubscriptionSpec>) -> SubscriptionState {
    match declared {
        Some(spec) => SubscriptionState {
            filter: spec
                .filter
                .as_ref()
                .map(|f| serde_json::to_string(f).unwrap_or_else(|_| format!("{f:?}"))),
            max_delivery_attempts: Some(spec.max_delivery_attempts.unwrap_or(0)),
            lease: Some(spec.lease),
            ordered: None,
        },
        None => SubscriptionState::default(),
    }
}

/// What a plan wants of subscription `spec`: its settings when this process declared
/// the subscription (`declared_here`), so that a change of them is planned; else
/// nothing, as [`held_state`] knows nothing to compare them with (a plan compares
/// the filter even when one side has none, so an unknown filter must be `None` on
/// both sides, not drift).
fn wanted_state(spec: &SubscriptionSpec, declared_here: bool) -> SubscriptionState {
    held_state(declared_here.then_some(spec))
}

#[cfg(test)]
mod tests {
    use cloudbus_core::topology::differences;
    use cloudbus_driver::Filter;

    use super::*;

    fn spec() -> SubscriptionSpec {
        SubscriptionSpec::new("orders", "billing")
            .filter(Filter::prefix("type", "com.example.order."))
            .max_delivery_attempts(5)
            .lease(Duration::from_secs(45))
    }

    fn settings(current: &SubscriptionState, wanted: &SubscriptionState) -> Vec<&'static str> {
        differences(current, wanted)
            .iter()
            .map(|d| d.setting)
            .collect()
    }

    #[test]
    fn a_declared_subscription_reads_as_its_spec() {
        let state = held_state(Some(&spec()));
        assert_eq!(
            state,
            SubscriptionState {
                filter: Some(
                    r#"{"prefix":{"attribute":"type","prefix":"com.example.order."}}"#.to_owned()
                ),
                max_delivery_attempts: Some(5),
                lease: Some(Duration::from_secs(45)),
                ordered: None,
            }
        );
        assert_eq!(state, wanted_state(&spec(), true));
        assert!(differences(&state, &wanted_state(&spec(), true)).is_empty());
    }

    #[test]
    fn settings_declared_here_are_compared() {
        let current = held_state(Some(&spec()));
        let changed = SubscriptionSpec::new("orders", "billing")
            .filter(Filter::prefix("type", "com.example.payment."))
            .max_delivery_attempts(7)
            .lease(Duration::from_secs(60));
        assert_eq!(
            settings(&current, &wanted_state(&changed, true)),
            ["filter", "max_delivery_attempts", "lease"]
        );
        let unfiltered = SubscriptionSpec {
            filter: None,
            ..spec()
        };
        let d = differences(&current, &wanted_state(&unfiltered, true));
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].wanted, "none");
    }

    #[test]
    fn settings_of_a_subscription_declared_elsewhere_are_unknown_not_drift() {
        let current = held_state(None);
        assert_eq!(current, SubscriptionState::default());
        assert_eq!(wanted_state(&spec(), false), SubscriptionState::default());
        assert!(differences(&current, &wanted_state(&spec(), false)).is_empty());
    }

    #[test]
    fn no_delivery_limit_is_unlimited_and_ordering_is_not_a_setting() {
        let unlimited = SubscriptionSpec::new("orders", "billing");
        let zero = SubscriptionSpec::new("orders", "billing")
            .max_delivery_attempts(0)
            .ordered(false);
        assert_eq!(held_state(Some(&unlimited)).max_delivery_attempts, Some(0));
        assert!(differences(&held_state(Some(&unlimited)), &wanted_state(&zero, true)).is_empty());
        assert_eq!(held_state(Some(&zero)).ordered, None);
    }
}
