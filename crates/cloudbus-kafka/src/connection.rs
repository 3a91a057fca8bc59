//! What every entity of one Kafka connection shares, below the roles that use it:
//! the settings, the idempotent producer, a metadata client, the subscriptions this
//! process declared, the names of a subscription's topics and group, and the way a
//! blocking librdkafka call leaves the async threads.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use cloudbus_driver::{Error, Result, SubscriptionSpec};
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::FutureProducer;

use crate::config::KafkaConfig;
use crate::error::kafka_error;

/// How long a metadata request may take before the call fails as unavailable.
pub(crate) const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// The topic that holds what subscription `name` of `topic` retries later (Spring
/// Kafka's and Confluent's `<topic>.<group>.retry` convention).
pub fn retry_topic(topic: &str, name: &str) -> String {
    format!("{topic}.{name}.retry")
}

/// The topic that holds subscription `name`'s dead letters (`<topic>.<group>.dlq`).
pub fn dead_letter_topic(topic: &str, name: &str) -> String {
    format!("{topic}.{name}.dlq")
}

/// The Kafka consumer group of stream reader group `group` on `topic`, whose committed
/// offsets are the group's checkpoints. Named per topic, so that readers of other
/// topics under the same group name neither share its offsets nor set off its
/// rebalances.
pub fn stream_group(topic: &str, group: &str) -> String {
    format!("{topic}.{group}")
}

/// The consumer group whose committed offsets mark how far the dead letters of a
/// subscription were redriven or purged.
pub(crate) fn dead_letter_group(topic: &str, name: &str) -> String {
    format!("{topic}.{name}.dlq-reader")
}

/// Builds a librdkafka configuration from settings.
pub(crate) fn client_config(settings: Vec<(String, String)>) -> ClientConfig {
    let mut config = ClientConfig::new();
    for (key, value) in settings {
        config.set(key, value);
    }
    config
}

/// A topic's partitions and replication factor (the fewest replicas of a partition).
pub(crate) struct TopicLayout {
    pub(crate) partitions: usize,
    pub(crate) replication: usize,
}

/// What every entity of one connection shares.
pub(crate) struct Shared {
    pub(crate) config: KafkaConfig,
    pub(crate) producer: FutureProducer,
    /// A client for metadata and watermarks (no group).
    pub(crate) metadata: BaseConsumer,
}

/// A subscription's key in [`DECLARED`]: the cluster, the topic, the name.
type SpecKey = (String, String, String);

/// Subscriptions declared in this process: Kafka keeps no subscription settings on
/// the broker, so a subscription's filter, lease and delivery limit are the ones its
/// process declared (as Spring Kafka keeps its retry settings in the application),
/// else the URL's defaults.
static DECLARED: LazyLock<Mutex<HashMap<SpecKey, SubscriptionSpec>>> =
    LazyLock::new(Default::default);

impl Shared {
    /// The clients of a connection with `config`. Nothing is contacted until the
    /// first call.
    pub(crate) fn new(config: KafkaConfig) -> Result<Self> {
        let producer: FutureProducer = client_config(config.producer_settings()?)
            .create()
            .map_err(|e| kafka_error(e, "create the Kafka producer"))?;
        let metadata: BaseConsumer = client_config(config.client_settings())
            .create()
            .map_err(|e| kafka_error(e, "create the Kafka metadata client"))?;
        Ok(Shared {
            config,
            producer,
            metadata,
        })
    }

    /// The spec of subscription `name` of `topic`: as declared here, else the URL's
    /// defaults.
    pub(crate) fn spec(&self, topic: &str, name: &str) -> SubscriptionSpec {
        self.declared(topic, name).unwrap_or_else(|| {
            let mut spec = SubscriptionSpec::new(topic, name).lease(self.config.lease());
            spec.max_delivery_attempts = self.config.max_delivery_attempts();
            spec
        })
    }

    /// The spec of subscription `name` of `topic` as this process declared it
    /// (`ensure_subscription`), or `None` when it did not.
    pub(crate) fn declared(&self, topic: &str, name: &str) -> Option<SubscriptionSpec> {
        DECLARED
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&self.spec_key(topic, name))
            .cloned()
    }

    fn spec_key(&self, topic: &str, name: &str) -> SpecKey {
        (
            self.config.bootstrap_servers().to_owned(),
            topic.to_owned(),
            name.to_owned(),
        )
    }

    /// Keeps `spec` as declared in this process.
    pub(crate) fn declare(&self, spec: &SubscriptionSpec) {
        DECLARED
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(self.spec_key(&spec.topic, &spec.name), spec.clone());
    }

    /// Forgets what was declared of subscription `name` of `topic`.
    pub(crate) fn forget(&self, topic: &str, name: &str) {
        DECLARED
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.spec_key(topic, name));
    }

    /// The partition count of `topic`, or NotFound.
    pub(crate) async fn partition_count(self: &Arc<Self>, topic: &str) -> Result<usize> {
        Ok(self.layout(topic).await?.partitions)
    }

    /// `topic`'s partitions and replication factor as the metadata has them, or
    /// NotFound.
    pub(crate) async fn layout(self: &Arc<Self>, topic: &str) -> Result<TopicLayout> {
        let shared = Arc::clone(self);
        let name = topic.to_owned();
        blocking(move || shared.read_layout(&name, METADATA_TIMEOUT)).await
    }

    /// [`layout`](Self::layout), blocking up to `timeout`: a topic the metadata does
    /// not list, or lists with no partitions, is NotFound; one it lists with an
    /// error (rights refused, a leader missing) is that error.
    pub(crate) fn read_layout(&self, name: &str, timeout: Duration) -> Result<TopicLayout> {
        let metadata = self
            .metadata
            .fetch_metadata(Some(name), timeout)
            .map_err(|e| kafka_error(e, &format!("read the metadata of topic {name:?}")))?;
        let Some(t) = metadata.topics().iter().find(|t| t.name() == name) else {
            return Err(Error::not_found(format!(
                "Kafka topic {name:?} does not exist"
            )));
        };
        if let Some(e) = t.error() {
            let code = rdkafka::error::RDKafkaErrorCode::from(e);
            return Err(Error::new(
                crate::error::kind_of_code(code),
                format!("Kafka topic {name:?}: {code}"),
            ));
        }
        if t.partitions().is_empty() {
            return Err(Error::not_found(format!(
                "Kafka topic {name:?} does not exist"
            )));
        }
        Ok(TopicLayout {
            partitions: t.partitions().len(),
            // The fewest replicas of a partition: a partition being reassigned lists
            // its old and new replicas together for a while.
            replication: t
                .partitions()
                .iter()
                .map(|p| p.replicas().len())
                .min()
                .unwrap_or(0),
        })
    }
}

/// Runs a blocking librdkafka call off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    call: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(call).await.map_err(|e| {
        Error::new(
            cloudbus_driver::ErrorKind::Internal,
            format!("a Kafka client call panicked or was cancelled: {e}"),
        )
    })?
}

/// Drops `value` (a librdkafka consumer of a group, whose drop leaves the group and
/// waits for its coordinator, for ever when the brokers are gone) on a thread of its
/// own: not an async thread, and not the runtime's blocking pool, whose shutdown would
/// wait for it. The answer fires once it is dropped; `None` when no thread could be
/// started (then it was dropped here).
pub(crate) fn drop_in_background<T: Send + 'static>(
    value: T,
) -> Option<tokio::sync::oneshot::Receiver<()>> {
    let (dropped, dropping) = tokio::sync::oneshot::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("cloudbus-kafka-close".into())
        .spawn(move || {
            drop(value);
            let _ = dropped.send(());
        });
    match spawned {
        Ok(_) => Some(dropping),
        Err(e) => {
            tracing::warn!(error = %e, "could not start a thread to close a Kafka consumer; it was closed on the caller's thread");
            None
        }
    }
}
