//! Google Cloud Pub/Sub for cloudbus, on the official `google-cloud-pubsub` crate.
//!
//! [`PubSubBus`] opens topics (publishers), subscriptions (streaming-pull consumers),
//! their dead-letter places and the topology (`ensure`), and adds Pub/Sub's replay:
//! seek to a time or a snapshot. CloudEvents travel in binary mode as `ce-` prefixed
//! attributes with the data as the message body (the convention of Google's own
//! eventing), or structured on request ([`PubSubConfig::structured`]).
//!
//! Connect with `pubsub://PROJECT`; `PUBSUB_EMULATOR_HOST` (or `?emulator=`) points it
//! at the emulator with anonymous credentials, otherwise Application Default
//! Credentials are used.
//!
//! ```no_run
//! # async fn run() -> cloudbus_core::Result<()> {
//! use cloudbus_core::{EventBuilder, SubscriptionSpec};
//! let bus = cloudbus_gcp::connect("pubsub://my-project").await?;
//! bus.ensure_topic("orders").await?;
//! bus.ensure_subscription(&SubscriptionSpec::new("orders", "billing")).await?;
//! let publisher = bus.publisher("orders").await?;
//! publisher.publish(EventBuilder::new("com.example.order.created", "/shop").build()?).await?;
//! # Ok(()) }
//! ```

pub mod filter;
mod subscription;
mod topic;
mod topology;

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use cloudbus_core::driver::StreamDriver;
use cloudbus_core::{
    BinaryCodec, Bus, BusDriver, Capabilities, DeadLetterDriver, Error, ErrorKind, FilterSupport,
    Result, SubscriptionDriver, SubscriptionSpec, TopicDriver, TopologyDriver,
};
use google_cloud_gax::error::rpc::Code;
use google_cloud_pubsub::client::{BasePublisher, Subscriber, SubscriptionAdmin, TopicAdmin};
use tokio::sync::OnceCell;

pub use subscription::{PubSubDeadLetters, PubSubSubscription};
pub use topic::PubSubTopic;
pub use topology::SubscriptionOptions;

/// The environment variable naming the emulator (`host:port`), as Google's tools use it.
pub const EMULATOR_HOST_ENV: &str = "PUBSUB_EMULATOR_HOST";
/// The attribute prefix of binary-mode CloudEvents (`ce-id`, `ce-type`, ...).
pub const ATTRIBUTE_PREFIX: &str = "ce-";
/// The attribute that carries `datacontenttype` in binary mode, named as the
/// CloudEvents Pub/Sub binding and sdk-go write it (names are read
/// case-insensitively, so `content-type` from older writers still works).
pub const CONTENT_TYPE_ATTRIBUTE: &str = "Content-Type";
/// Pub/Sub allows 100 attributes per message.
pub const MAX_ATTRIBUTES: usize = 100;
/// Attributes cloudbus may add itself (dead-letter reason, source, redrive target).
const RESERVED_ATTRIBUTES: usize = 8;
/// Largest message cloudbus sends: Pub/Sub's 10 MB request limit less room for framing.
pub const MAX_MESSAGE_BYTES: usize = 9_900_000;
/// Most messages in one Publish request.
pub const MAX_BATCH_COUNT: usize = 1000;

/// How to reach Pub/Sub.
///
/// ```
/// let c = cloudbus_gcp::PubSubConfig::new("my-project").emulator("127.0.0.1:8085");
/// assert_eq!(c.endpoint.as_deref(), Some("http://127.0.0.1:8085"));
/// ```
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct PubSubConfig {
    /// The Google Cloud project of the topics and subscriptions.
    pub project: String,
    /// An endpoint other than `https://pubsub.googleapis.com` (the emulator).
    pub endpoint: Option<String>,
    /// Anonymous credentials (the emulator); otherwise Application Default Credentials.
    pub anonymous: bool,
    /// Send CloudEvents in structured mode (the whole event as a JSON body).
    pub structured: bool,
    /// Flow control of each streaming pull: most messages held unsettled.
    pub max_outstanding_messages: i64,
    /// Flow control of each streaming pull: most bytes held unsettled.
    pub max_outstanding_bytes: i64,
}

impl PubSubConfig {
    /// The real service for `project`, with Application Default Credentials.
    pub fn new(project: impl Into<String>) -> Self {
        PubSubConfig {
            project: project.into(),
            endpoint: None,
            anonymous: false,
            structured: false,
            max_outstanding_messages: 1000,
            max_outstanding_bytes: 100 * 1024 * 1024,
        }
    }

    /// The emulator at `host:port`, with anonymous credentials.
    pub fn emulator(mut self, host: &str) -> Self {
        let host = host.trim();
        self.endpoint = Some(
            if host.starts_with("http://") || host.starts_with("https://") {
                host.to_owned()
            } else {
                format!("http://{host}")
            },
        );
        self.anonymous = true;
        self
    }

    /// A Pub/Sub endpoint other than Google's (a regional or private endpoint), used
    /// with the real credentials: it must be `https://`. This never switches to the
    /// emulator's anonymous mode; use [`emulator`](Self::emulator) for that.
    pub fn endpoint(mut self, url: &str) -> Result<Self> {
        let url = url.trim();
        if !url.starts_with("https://") {
            return Err(Error::invalid(format!(
                "a Pub/Sub endpoint used with real credentials must be https:// (got {url:?}); an emulator is selected with PUBSUB_EMULATOR_HOST or ?emulator=HOST:PORT"
            )));
        }
        self.endpoint = Some(url.to_owned());
        self.anonymous = false;
        Ok(self)
    }

    /// Structured-mode CloudEvents.
    pub fn structured(mut self) -> Self {
        self.structured = true;
        self
    }

    /// Flow control of each consumer's streaming pull.
    pub fn flow_control(mut self, max_messages: i64, max_bytes: i64) -> Self {
        self.max_outstanding_messages = max_messages.max(1);
        self.max_outstanding_bytes = max_bytes.max(1);
        self
    }

    /// Reads `pubsub://PROJECT[?emulator=HOST:PORT | ?endpoint=https://...][&mode=structured]`.
    /// `emulator=` (or, without either parameter, `PUBSUB_EMULATOR_HOST`) selects the
    /// emulator with anonymous credentials; `endpoint=` is another `https://` endpoint
    /// used with Application Default Credentials, never anonymously.
    ///
    /// ```
    /// let c = cloudbus_gcp::PubSubConfig::from_url("pubsub://demo?emulator=127.0.0.1:9999").unwrap();
    /// assert_eq!(c.project, "demo");
    /// assert!(c.anonymous);
    /// let c = cloudbus_gcp::PubSubConfig::from_url("pubsub://demo?endpoint=https://europe-west1-pubsub.googleapis.com").unwrap();
    /// assert!(!c.anonymous);
    /// assert!(cloudbus_gcp::PubSubConfig::from_url("pubsub://demo?endpoint=http://10.0.0.7:8085").is_err());
    /// ```
    pub fn from_url(url: &str) -> Result<Self> {
        let parsed = url::Url::parse(url)
            .map_err(|e| Error::invalid(format!("not a pubsub:// URL: {e}")))?;
        if parsed.scheme() != "pubsub" {
            return Err(Error::invalid(format!(
                "expected a pubsub:// URL, got scheme {:?}",
                parsed.scheme()
            )));
        }
        let project = parsed.host_str().unwrap_or_default();
        if project.is_empty() {
            return Err(Error::invalid(
                "pubsub:// URL needs a project: pubsub://PROJECT",
            ));
        }
        let mut config = PubSubConfig::new(project);
        let (mut emulator, mut endpoint) = (None, None);
        for (k, v) in parsed.query_pairs() {
            match k.as_ref() {
                "emulator" => emulator = Some(v.into_owned()),
                "endpoint" => endpoint = Some(v.into_owned()),
                "mode" if v == "structured" => config = config.structured(),
                "mode" if v == "binary" => {}
                other => {
                    return Err(Error::invalid(format!(
                        "unknown pubsub:// URL parameter {other:?} (known: emulator, endpoint, mode)"
                    )));
                }
            }
        }
        match (emulator, endpoint) {
            (Some(_), Some(_)) => {
                return Err(Error::invalid(
                    "pubsub:// takes emulator= or endpoint=, not both",
                ));
            }
            (Some(host), None) => config = config.emulator(&host),
            (None, Some(url)) => config = config.endpoint(&url)?,
            (None, None) => {
                if let Some(host) = std::env::var(EMULATOR_HOST_ENV)
                    .ok()
                    .filter(|h| !h.trim().is_empty())
                {
                    config = config.emulator(&host);
                }
            }
        }
        Ok(config)
    }

    pub(crate) fn topic_path(&self, topic: &str) -> String {
        format!("projects/{}/topics/{topic}", self.project)
    }
    pub(crate) fn subscription_path(&self, subscription: &str) -> String {
        format!("projects/{}/subscriptions/{subscription}", self.project)
    }
    pub(crate) fn snapshot_path(&self, snapshot: &str) -> String {
        format!("projects/{}/snapshots/{snapshot}", self.project)
    }
    pub(crate) fn codec(&self) -> BinaryCodec {
        let c = codec();
        if self.structured { c.structured() } else { c }
    }
}

/// The binary-mode codec of Pub/Sub messages.
pub(crate) fn codec() -> BinaryCodec {
    BinaryCodec::new(ATTRIBUTE_PREFIX)
        .content_type_attribute(CONTENT_TYPE_ATTRIBUTE)
        .max_attributes(MAX_ATTRIBUTES, RESERVED_ATTRIBUTES)
}

/// The scheme this crate opens: `pubsub://PROJECT`.
pub fn schemes() -> Vec<cloudbus_core::scheme::Scheme> {
    vec![cloudbus_core::scheme::Scheme {
        name: "pubsub",
        open: |url| {
            Box::pin(
                async move { Ok(PubSubBus::new(PubSubConfig::from_url(url.as_str())?).into_bus()) },
            )
        },
    }]
}

/// Opens `pubsub://PROJECT` as a [`Bus`].
pub async fn connect(url: &str) -> Result<Bus> {
    cloudbus_core::scheme::open(&schemes(), url).await
}

/// The clients one bus shares: one gRPC channel for publishing, one for pulling.
pub(crate) struct Clients {
    pub(crate) topics: TopicAdmin,
    pub(crate) subscriptions: SubscriptionAdmin,
    pub(crate) publisher: BasePublisher,
    pub(crate) subscriber: Subscriber,
}

impl std::fmt::Debug for Clients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Clients { .. }")
    }
}

/// What every Pub/Sub driver of one bus shares: the configuration, the clients, the
/// publishers per topic, the dead-letter readers and the live streaming pulls.
pub(crate) struct PubSubContext {
    pub(crate) config: PubSubConfig,
    clients: OnceCell<Clients>,
    /// Publishers by topic path, shared by the topic drivers and the dead-letter paths.
    publishers: Mutex<HashMap<String, google_cloud_pubsub::client::Publisher>>,
    /// One reader per dead-letter subscription, so that peek, redrive and purge share
    /// one stream (a stream dropped at the emulator keeps its messages leased).
    dead_letter_readers: Mutex<HashMap<String, Arc<PubSubSubscription>>>,
    /// The streaming pull of each subscription, while a handle on it is alive.
    streams: Mutex<HashMap<String, std::sync::Weak<subscription::Inner>>>,
}

impl PubSubContext {
    pub(crate) async fn clients(&self) -> Result<&Clients> {
        self.clients
            .get_or_try_init(|| build_clients(&self.config))
            .await
    }

    pub(crate) fn stream_of(
        &self,
        name: &str,
        open: impl FnOnce() -> Arc<subscription::Inner>,
    ) -> Arc<subscription::Inner> {
        let mut map = lock(&self.streams);
        if let Some(inner) = map.get(name).and_then(|w| w.upgrade()) {
            return inner;
        }
        let inner = open();
        map.insert(name.to_owned(), Arc::downgrade(&inner));
        inner
    }

    pub(crate) fn dead_letter_reader(self: &Arc<Self>, name: &str) -> Arc<PubSubSubscription> {
        lock(&self.dead_letter_readers)
            .entry(name.to_owned())
            .or_insert_with(|| Arc::new(PubSubSubscription::new(self.clone(), name)))
            .clone()
    }

    /// The batching publisher of one topic (the batches themselves are made by core).
    pub(crate) async fn publisher(
        &self,
        topic_path: &str,
    ) -> Result<google_cloud_pubsub::client::Publisher> {
        if let Some(p) = lock(&self.publishers).get(topic_path) {
            return Ok(p.clone());
        }
        let base = self.clients().await?.publisher.clone();
        let mut map = lock(&self.publishers);
        Ok(map
            .entry(topic_path.to_owned())
            .or_insert_with(|| {
                base.publisher(topic_path.to_owned())
                    // cloudbus core forms the batches; the crate sends each on flush.
                    .set_message_count_threshold(MAX_BATCH_COUNT as u32)
                    .set_byte_threshold(10_000_000)
                    .set_delay_threshold(Duration::from_millis(10))
                    .build()
            })
            .clone())
    }
}

async fn build_clients(config: &PubSubConfig) -> Result<Clients> {
    let credentials = config
        .anonymous
        .then(|| google_cloud_auth::credentials::anonymous::Builder::new().build());
    macro_rules! build {
        ($builder:expr) => {{
            let mut b = $builder;
            if let Some(e) = &config.endpoint {
                b = b.with_endpoint(e.clone());
            }
            if let Some(c) = &credentials {
                b = b.with_credentials(c.clone());
            }
            b.build().await.map_err(|e| {
                Error::with_source(
                    ErrorKind::Unavailable,
                    "could not build the Pub/Sub client",
                    e,
                )
            })?
        }};
    }
    Ok(Clients {
        topics: build!(TopicAdmin::builder()),
        subscriptions: build!(SubscriptionAdmin::builder()),
        publisher: build!(BasePublisher::builder()),
        subscriber: build!(Subscriber::builder()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_read_or_refused_with_a_reason() {
        let c =
            PubSubConfig::from_url("pubsub://p1?emulator=localhost:9000&mode=structured").unwrap();
        assert_eq!(c.project, "p1");
        assert_eq!(c.endpoint.as_deref(), Some("http://localhost:9000"));
        assert!(c.anonymous && c.structured);
        for bad in ["pubsub://", "sqs://q", "pubsub://p?colour=red", "not a url"] {
            let e = PubSubConfig::from_url(bad).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{bad}");
        }
        assert_eq!(c.topic_path("t"), "projects/p1/topics/t");
        assert_eq!(c.subscription_path("s"), "projects/p1/subscriptions/s");
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The portable kind of a Google API error.
pub(crate) fn error_kind(err: &google_cloud_pubsub::Error) -> ErrorKind {
    if let Some(status) = err.status() {
        match status.code {
            Code::NotFound => ErrorKind::NotFound,
            Code::AlreadyExists => ErrorKind::AlreadyExists,
            Code::PermissionDenied | Code::Unauthenticated => ErrorKind::PermissionDenied,
            Code::InvalidArgument | Code::OutOfRange | Code::FailedPrecondition => {
                ErrorKind::InvalidArgument
            }
            Code::ResourceExhausted => ErrorKind::Throttled,
            // Google's client libraries retry these (with DEADLINE_EXCEEDED and
            // RESOURCE_EXHAUSTED): INTERNAL and UNKNOWN are transient server faults.
            Code::Unavailable
            | Code::Aborted
            | Code::Cancelled
            | Code::Internal
            | Code::Unknown => ErrorKind::Unavailable,
            Code::DeadlineExceeded => ErrorKind::Timeout,
            Code::Unimplemented => ErrorKind::Unsupported,
            _ => ErrorKind::Internal,
        }
    } else if err.is_timeout() {
        ErrorKind::Timeout
    } else if err.is_authentication() {
        ErrorKind::PermissionDenied
    } else if err.is_connect() || err.is_io() || err.is_transport() || err.is_exhausted() {
        ErrorKind::Unavailable
    } else {
        ErrorKind::Internal
    }
}

/// The message of a Google API error: the service's status message when there is one.
pub(crate) fn error_detail(err: &google_cloud_pubsub::Error) -> String {
    err.status()
        .map(|s| s.message.clone())
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| err.to_string())
}

/// Maps a Google API error onto the portable kinds, keeping it as the source.
pub(crate) fn map_error(err: google_cloud_pubsub::Error, what: &str) -> Error {
    Error::with_source(
        error_kind(&err),
        format!("{what}: {}", error_detail(&err)),
        err,
    )
}

/// Capabilities of Pub/Sub subscriptions made by `ensure` (see the README table).
pub fn capabilities(emulator: bool) -> Capabilities {
    let mut c = Capabilities::broker(MAX_MESSAGE_BYTES, MAX_BATCH_COUNT, MAX_MESSAGE_BYTES);
    c.max_delay = None;
    c.deduplication = false;
    c.replay = true;
    c.filtering = if emulator {
        FilterSupport::InProcess
    } else {
        FilterSupport::Native
    };
    c
}

/// Google Cloud Pub/Sub as a cloudbus provider.
///
/// Beyond the portable surface it offers Pub/Sub's replay (seek to a time, snapshots)
/// and subscription options such as exactly-once delivery; reach it from a [`Bus`]
/// with `bus.driver().as_any().downcast_ref::<PubSubBus>()`.
///
/// ```no_run
/// # async fn run() -> cloudbus_core::Result<()> {
/// use cloudbus_core::SubscriptionSpec;
/// use cloudbus_gcp::{PubSubBus, PubSubConfig, SubscriptionOptions};
/// let pubsub = PubSubBus::new(PubSubConfig::new("my-project").emulator("127.0.0.1:8085"));
/// let bus = pubsub.clone().into_bus();
/// bus.ensure_topic("orders").await?;
/// let spec = SubscriptionSpec::new("orders", "audit").ordered(false);
/// pubsub
///     .ensure_subscription_with(&spec, &SubscriptionOptions::default().retain_acked())
///     .await?;
/// // Later: read the last hour again.
/// pubsub.seek_to_time("audit", chrono::Utc::now() - chrono::Duration::hours(1)).await?;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct PubSubBus {
    shared: Arc<PubSubContext>,
}

impl std::fmt::Debug for PubSubBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PubSubBus")
            .field("project", &self.shared.config.project)
            .field("endpoint", &self.shared.config.endpoint)
            .finish()
    }
}

impl PubSubBus {
    /// A bus over `config`; clients are built on first use.
    pub fn new(config: PubSubConfig) -> Self {
        PubSubBus {
            shared: Arc::new(PubSubContext {
                config,
                clients: OnceCell::new(),
                publishers: Mutex::new(HashMap::new()),
                dead_letter_readers: Mutex::new(HashMap::new()),
                streams: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Wraps this driver in the portable [`Bus`].
    pub fn into_bus(self) -> Bus {
        Bus::new(Arc::new(self))
    }

    /// The configuration.
    pub fn config(&self) -> &PubSubConfig {
        &self.shared.config
    }

    /// Makes sure a subscription exists, with Pub/Sub options beyond the portable spec
    /// (exactly-once delivery, keeping acked messages for seek).
    pub async fn ensure_subscription_with(
        &self,
        spec: &SubscriptionSpec,
        options: &SubscriptionOptions,
    ) -> Result<()> {
        topology::ensure_subscription(&self.shared, spec, options).await
    }

    /// Replays (or skips) by time: messages published after `time` become unacked,
    /// those before it acked. Replaying acked messages needs a subscription that keeps
    /// them ([`SubscriptionOptions::retain_acked`]). Acks are sent in the background:
    /// settle with confirmed acks (exactly-once) or give them time before seeking.
    pub async fn seek_to_time(&self, subscription: &str, time: DateTime<Utc>) -> Result<()> {
        let c = self.shared.clients().await?;
        let ts = google_cloud_wkt::Timestamp::clamp(
            time.timestamp(),
            time.timestamp_subsec_nanos() as i32,
        );
        c.subscriptions
            .seek()
            .set_subscription(self.shared.config.subscription_path(subscription))
            .set_time(ts)
            .send()
            .await
            .map_err(|e| map_error(e, &format!("seek {subscription} to {time}")))?;
        Ok(())
    }

    /// Records the subscription's acknowledgement state as `snapshot`.
    pub async fn create_snapshot(&self, subscription: &str, snapshot: &str) -> Result<()> {
        let c = self.shared.clients().await?;
        c.subscriptions
            .create_snapshot()
            .set_name(self.shared.config.snapshot_path(snapshot))
            .set_subscription(self.shared.config.subscription_path(subscription))
            .send()
            .await
            .map_err(|e| map_error(e, &format!("create snapshot {snapshot}")))?;
        Ok(())
    }

    /// Restores the acknowledgement state recorded in `snapshot`: what was unacked
    /// then is delivered again.
    pub async fn seek_to_snapshot(&self, subscription: &str, snapshot: &str) -> Result<()> {
        let c = self.shared.clients().await?;
        c.subscriptions
            .seek()
            .set_subscription(self.shared.config.subscription_path(subscription))
            .set_snapshot(self.shared.config.snapshot_path(snapshot))
            .send()
            .await
            .map_err(|e| map_error(e, &format!("seek {subscription} to snapshot {snapshot}")))?;
        Ok(())
    }

    /// Deletes a snapshot.
    pub async fn delete_snapshot(&self, snapshot: &str) -> Result<()> {
        let c = self.shared.clients().await?;
        c.subscriptions
            .delete_snapshot()
            .set_snapshot(self.shared.config.snapshot_path(snapshot))
            .send()
            .await
            .map_err(|e| map_error(e, &format!("delete snapshot {snapshot}")))?;
        Ok(())
    }
}

#[async_trait]
impl BusDriver for PubSubBus {
    fn scheme(&self) -> &str {
        "pubsub"
    }

    async fn topic(&self, topic: &str) -> Result<Arc<dyn TopicDriver>> {
        Ok(Arc::new(PubSubTopic::new(self.shared.clone(), topic)))
    }

    async fn subscription(
        &self,
        _topic: &str,
        subscription: &str,
    ) -> Result<Arc<dyn SubscriptionDriver>> {
        Ok(Arc::new(PubSubSubscription::new(
            self.shared.clone(),
            subscription,
        )))
    }

    async fn dead_letters(
        &self,
        _topic: &str,
        subscription: &str,
    ) -> Result<Arc<dyn DeadLetterDriver>> {
        Ok(Arc::new(PubSubDeadLetters::new(
            self.shared.clone(),
            subscription,
        )))
    }

    fn topology(&self) -> Arc<dyn TopologyDriver> {
        Arc::new(topology::PubSubTopology {
            shared: self.shared.clone(),
        })
    }

    async fn stream(&self, stream: &str) -> Result<Arc<dyn StreamDriver>> {
        Err(Error::unsupported(format!(
            "Pub/Sub has no partitioned logs to read {stream:?} as a stream; replay a \
             subscription with PubSubBus::seek_to_time or seek_to_snapshot"
        )))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}
