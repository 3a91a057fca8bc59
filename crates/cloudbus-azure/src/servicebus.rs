//! Azure Service Bus (feature `servicebus`): queues, and topics with subscriptions,
//! over AMQP 1.0 with the `azservicebus` crate; entities are declared through the
//! Service Bus management API (ATOM entries over HTTPS).
//!
//! | cloudbus | Service Bus |
//! |---|---|
//! | topic | a topic (`servicebus://`) or a queue (`servicebus://?entity=queue`) |
//! | subscription | a subscription of the topic, or a competing reader of the queue |
//! | CloudEvent attributes | application properties `cloudEvents:<name>` (AMQP binding, binary mode); integer and boolean extensions as typed AMQP values |
//! | `datacontenttype` | the AMQP `content-type` property |
//! | data | the body (one data section) |
//! | structured mode (`?mode=structured`) | the JSON event as the body, `application/cloudevents+json` |
//! | dedup id (default: the CloudEvent id) | `MessageId`; entities are made with duplicate detection (10 minutes) |
//! | ordering key | `SessionId` on session-enabled entities (`?sessions=true`) |
//! | delay | `ScheduledEnqueueTime` |
//! | ack / nack / dead-letter / extend | complete / abandon / dead-letter with reason and description / renew lock (sessions: renew the session lock, also renewed while the session is held) |
//! | attempt | `DeliveryCount` |
//! | max delivery attempts, lease | `MaxDeliveryCount`, `LockDuration` (5 s to 5 min) |
//! | filter | the subscription's one rule: a correlation filter for exact matches, else a SQL filter |
//! | dead letters | `<entity>/$DeadLetterQueue`, with `DeadLetterReason` and `DeadLetterErrorDescription` |
//!
//! Connection: `SERVICEBUS_CONNECTION_STRING` (`Endpoint=sb://…;SharedAccessKeyName=…;
//! SharedAccessKey=…`, or `SharedAccessSignature=…`; `UseDevelopmentEmulator=true` with
//! an optional port for the emulators), [`ServiceBusConfig::namespace`] with a key, or
//! [`ServiceBusConfig::namespace_with_credential`] with a Microsoft Entra ID identity
//! (any `azure_core` token credential).
//!
//! ```no_run
//! # async fn run() -> cloudbus_core::Result<()> {
//! use cloudbus_core::EventBuilder;
//! // SERVICEBUS_CONNECTION_STRING names the namespace and its key.
//! let bus = cloudbus_azure::connect("servicebus://").await?;
//! bus.ensure_topic("orders").await?;
//! bus.publisher("orders").await?
//!     .publish(EventBuilder::new("com.example.order.created", "/shop").build()?)
//!     .await?;
//! # Ok(()) }
//! ```

mod admin;
mod receiver;
mod rules;

use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use azservicebus::core::BasicRetryPolicy;
use azservicebus::primitives::service_bus_retry_options::ServiceBusRetryOptions;
use azservicebus::{
    ServiceBusClient, ServiceBusClientOptions, ServiceBusMessage, ServiceBusSender,
};
use cloudbus_core::codec::{BinaryCodec, RawMessage};
use cloudbus_core::driver::{
    BatchResults, BusDriver, DeadLetterDriver, OutgoingMessage, Payload, SubscriptionDriver,
    SubscriptionSpec, TopicDriver, TopologyDriver, key_slot,
};
use cloudbus_core::event::ExtensionValue;
use cloudbus_core::stream::StreamDriver;
use cloudbus_core::{Bus, Capabilities, Error, ErrorKind, FilterSupport, Result};
use fe2o3_amqp_types::messaging::ApplicationProperties;
use fe2o3_amqp_types::primitives::SimpleValue;
use tokio::sync::Mutex;

pub use admin::service_bus_sas_token;
/// The `azure_core` release that azservicebus uses: implement its
/// `credentials::TokenCredential`, or pass an `azure_identity` credential of the same
/// release, to [`ServiceBusConfig::namespace_with_credential`].
pub use azure_core;
use azure_core::credentials::TokenCredential;
pub use rules::{MAX_SQL_LENGTH, RuleFilter, compile_rule};

use crate::Secret;
use admin::{Admin, EntityProperties};
use receiver::ServiceBusDeadLetters;
pub use receiver::ServiceBusSubscription;

/// The connection string: `Endpoint=sb://…;SharedAccessKeyName=…;SharedAccessKey=…`.
pub const CONNECTION_STRING_ENV: &str = "SERVICEBUS_CONNECTION_STRING";
/// Where the management API is, when not at the namespace (the emulators).
pub const MANAGEMENT_ENDPOINT_ENV: &str = "SERVICEBUS_MANAGEMENT_ENDPOINT";
/// The prefix of CloudEvent attributes among application properties (AMQP binding).
pub const ATTRIBUTE_PREFIX: &str = "cloudEvents:";
/// The application property that sends a redriven message back to one subscription.
pub const REDRIVE_PROPERTY: &str = "cloudbus-redrive";
/// Largest message (Standard tier; Premium allows up to 100 MB).
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// Largest batch in bytes (Standard tier).
pub const MAX_BATCH_BYTES: usize = 256 * 1024;
/// Most messages in one batch; the byte limit binds first for all but tiny events.
pub const MAX_BATCH_COUNT: usize = 4500;
/// Deliveries before the service dead-letters, when the spec does not say.
pub const DEFAULT_MAX_DELIVERY_COUNT: u32 = 10;
/// The lock duration bounds of Service Bus.
pub const MIN_LOCK: Duration = Duration::from_secs(5);
/// The longest lock duration.
pub const MAX_LOCK: Duration = Duration::from_secs(300);
/// Session-enabled entities need a session for every message: events without an
/// ordering key are spread over this many sessions, so that readers can share them.
pub const UNKEYED_SESSIONS: usize = 16;
/// The longest opening a link may take (a refused attach can otherwise be retried
/// for long).
pub(crate) const LINK_TIMEOUT: Duration = Duration::from_secs(30);
/// The scope of Microsoft Entra ID tokens for Service Bus.
pub const TOKEN_SCOPE: &str = "https://servicebus.azure.net/.default";
/// The port of the emulators' AMQP endpoint when the connection string has none.
const EMULATOR_AMQP_PORT: u16 = 5672;
/// The management port of Microsoft's emulator.
const EMULATOR_MANAGEMENT_PORT: u16 = 5300;

/// How cloudbus topics map onto Service Bus entities.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntityKind {
    /// A cloudbus topic is a Service Bus topic; subscriptions are its subscriptions
    /// (fan-out, rules).
    Topics,
    /// A cloudbus topic is a queue; every subscription name reads the same queue
    /// (competing consumers, no filters).
    Queues,
}

/// How the client authenticates.
#[derive(Clone, Debug)]
pub(crate) enum Access {
    /// A shared access key and its name; tokens are signed here.
    Key { name: String, key: Secret },
    /// A SAS token made elsewhere.
    SasToken(Secret),
    /// A Microsoft Entra ID identity: bearer tokens for [`TOKEN_SCOPE`] from a token
    /// credential (its Debug output is the credential's own, which shows no tokens in
    /// azure_identity).
    Identity(Arc<dyn TokenCredential>),
}

/// Where and how to connect. Keys stay out of its Debug output.
///
/// ```
/// use cloudbus_azure::servicebus::{EntityKind, ServiceBusConfig};
/// let c = ServiceBusConfig::from_connection_string(
///     "Endpoint=sb://localhost:5673;SharedAccessKeyName=RootManageSharedAccessKey;\
///      SharedAccessKey=SAS_KEY_VALUE;UseDevelopmentEmulator=true;").unwrap();
/// assert_eq!(c.amqp_host(), "localhost:5673");
/// assert!(!format!("{c:?}").contains("SAS_KEY_VALUE"));
/// let c = c.entities(EntityKind::Queues).sessions(true);
/// assert!(c.capabilities().ordering && !c.capabilities().fan_out);
/// ```
#[derive(Clone, Debug)]
pub struct ServiceBusConfig {
    pub(crate) namespace: String,
    pub(crate) access: Access,
    pub(crate) emulator: bool,
    pub(crate) management_endpoint: String,
    pub(crate) entities: EntityKind,
    pub(crate) sessions: bool,
    pub(crate) structured: bool,
}

impl ServiceBusConfig {
    /// A namespace (`contoso.servicebus.windows.net`) with a shared access key.
    pub fn namespace(
        fully_qualified_namespace: impl Into<String>,
        key_name: impl Into<String>,
        key: Secret,
    ) -> Self {
        let namespace = fully_qualified_namespace.into();
        ServiceBusConfig {
            management_endpoint: format!("https://{namespace}"),
            namespace,
            access: Access::Key {
                name: key_name.into(),
                key,
            },
            emulator: false,
            entities: EntityKind::Topics,
            sessions: false,
            structured: false,
        }
    }

    /// A namespace (`contoso.servicebus.windows.net`) with a Microsoft Entra ID
    /// identity: any [`TokenCredential`] of `azure_core` 0.25 (re-exported here as
    /// [`azure_core`]), such as `azure_identity`'s `DefaultAzureCredential` or
    /// `ManagedIdentityCredential` of the same release. AMQP (CBS) and the management
    /// API get bearer tokens for [`TOKEN_SCOPE`]; the identity needs the "Azure Service
    /// Bus Data Owner" role to declare entities, or Sender/Receiver to only use them.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use cloudbus_azure::servicebus::azure_core::credentials::{
    ///     AccessToken, TokenCredential, TokenRequestOptions,
    /// };
    /// use cloudbus_azure::servicebus::ServiceBusConfig;
    ///
    /// /// A credential that has its token from elsewhere (a real one would fetch and
    /// /// refresh it, as azure_identity's do).
    /// #[derive(Debug)]
    /// struct Fixed(AccessToken);
    /// #[async_trait::async_trait]
    /// impl TokenCredential for Fixed {
    ///     async fn get_token(
    ///         &self,
    ///         _scopes: &[&str],
    ///         _options: Option<TokenRequestOptions>,
    ///     ) -> cloudbus_azure::servicebus::azure_core::Result<AccessToken> {
    ///         Ok(self.0.clone())
    ///     }
    /// }
    /// let expires = cloudbus_azure::servicebus::azure_core::date::OffsetDateTime::now_utc();
    /// let credential = Arc::new(Fixed(AccessToken::new("eyJ0eXAi…", expires)));
    /// let c = ServiceBusConfig::namespace_with_credential("contoso.servicebus.windows.net", credential);
    /// assert_eq!(c.amqp_host(), "contoso.servicebus.windows.net");
    /// ```
    pub fn namespace_with_credential(
        fully_qualified_namespace: impl Into<String>,
        credential: Arc<dyn TokenCredential>,
    ) -> Self {
        Self::namespace(fully_qualified_namespace, "", Secret::new("")).token_credential(credential)
    }

    /// Authenticates with a Microsoft Entra ID identity instead of what the
    /// configuration had (for example, a connection string's endpoint and emulator
    /// settings with an identity's tokens). See
    /// [`namespace_with_credential`](Self::namespace_with_credential).
    pub fn token_credential(mut self, credential: Arc<dyn TokenCredential>) -> Self {
        self.access = Access::Identity(credential);
        self
    }

    /// Parses a connection string. `UseDevelopmentEmulator=true` means plain AMQP to
    /// the endpoint's host and port (5672 when none) and a management API at
    /// `SERVICEBUS_MANAGEMENT_ENDPOINT`, else `http://host:5300` (Microsoft's
    /// emulator), whose self-signed certificate is accepted.
    pub fn from_connection_string(text: &str) -> Result<Self> {
        let mut endpoint = None;
        let mut key_name = None;
        let mut key = None;
        let mut token = None;
        let mut emulator = false;
        for part in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((name, value)) = part.split_once('=') else {
                return Err(Error::invalid(
                    "the Service Bus connection string has a part without '='",
                ));
            };
            match name.trim().to_ascii_lowercase().as_str() {
                "endpoint" => endpoint = Some(value.trim().to_owned()),
                "sharedaccesskeyname" => key_name = Some(value.trim().to_owned()),
                "sharedaccesskey" => key = Some(Secret::new(value.trim())),
                "sharedaccesssignature" => token = Some(Secret::new(value.trim())),
                "usedevelopmentemulator" => emulator = value.trim().eq_ignore_ascii_case("true"),
                "entitypath" => {
                    return Err(Error::invalid(
                        "the Service Bus connection string names an entity (EntityPath); \
                         cloudbus needs a namespace-level connection string",
                    ));
                }
                _ => {}
            }
        }
        let endpoint =
            endpoint.ok_or_else(|| Error::invalid("the connection string has no Endpoint"))?;
        let url = url::Url::parse(&endpoint).map_err(|e| {
            Error::with_source(
                ErrorKind::InvalidArgument,
                format!("the connection string's Endpoint {endpoint:?} is not a URL"),
                e,
            )
        })?;
        let host = url
            .host_str()
            .ok_or_else(|| Error::invalid("the connection string's Endpoint has no host"))?
            .to_owned();
        let access = match (key_name, key, token) {
            (_, _, Some(token)) => Access::SasToken(token),
            (Some(name), Some(key), None) => Access::Key { name, key },
            _ => {
                return Err(Error::invalid(
                    "the connection string needs SharedAccessKeyName and SharedAccessKey, \
                     or SharedAccessSignature",
                ));
            }
        };
        let (namespace, management_endpoint) = if emulator {
            let port = url.port().unwrap_or(EMULATOR_AMQP_PORT);
            let management = std::env::var(MANAGEMENT_ENDPOINT_ENV)
                .ok()
                .filter(|v| !v.is_empty())
                .unwrap_or_else(|| format!("http://{host}:{EMULATOR_MANAGEMENT_PORT}"));
            (format!("{host}:{port}"), management)
        } else {
            (host.clone(), format!("https://{host}"))
        };
        Ok(ServiceBusConfig {
            namespace,
            access,
            emulator,
            management_endpoint,
            entities: EntityKind::Topics,
            sessions: false,
            structured: false,
        })
    }

    /// From `SERVICEBUS_CONNECTION_STRING`.
    pub fn from_env() -> Result<Self> {
        match std::env::var(CONNECTION_STRING_ENV) {
            Ok(text) if !text.is_empty() => Self::from_connection_string(&text),
            _ => Err(Error::invalid(format!(
                "{CONNECTION_STRING_ENV} is not set; it names the Service Bus namespace and its key"
            ))),
        }
    }

    /// From a `servicebus://` URL: the connection string from the environment, then
    /// `entity=queue|topic`, `sessions=true|false`, `mode=structured|binary`,
    /// `management=URL`.
    pub fn from_url(url: &url::Url) -> Result<Self> {
        let mut config = Self::from_env()?;
        for (k, v) in url.query_pairs() {
            match (k.as_ref(), v.as_ref()) {
                ("entity", "queue") => config = config.entities(EntityKind::Queues),
                ("entity", "topic") => config = config.entities(EntityKind::Topics),
                ("sessions", v) => config = config.sessions(v == "true"),
                ("mode", "structured") => config.structured = true,
                ("mode", "binary") => config.structured = false,
                ("management", v) => config = config.management_endpoint(v),
                (k, v) => {
                    return Err(Error::invalid(format!(
                        "unknown servicebus:// URL parameter {k}={v:?} (known: \
                         entity=queue|topic, sessions=true|false, mode=structured|binary, \
                         management=URL)"
                    )));
                }
            }
        }
        Ok(config)
    }

    /// Topics or queues.
    pub fn entities(mut self, kind: EntityKind) -> Self {
        self.entities = kind;
        self
    }
    /// Session-enabled entities: ordering keys become session ids.
    pub fn sessions(mut self, sessions: bool) -> Self {
        self.sessions = sessions;
        self
    }
    /// Structured CloudEvents in the body instead of binary mode.
    pub fn structured(mut self) -> Self {
        self.structured = true;
        self
    }
    /// The management API's base URL.
    pub fn management_endpoint(mut self, url: impl Into<String>) -> Self {
        self.management_endpoint = url.into();
        self
    }
    /// The AMQP host (and port, for the emulators).
    pub fn amqp_host(&self) -> &str {
        &self.namespace
    }
    /// What entities opened with this configuration support.
    pub fn capabilities(&self) -> Capabilities {
        let mut c = Capabilities::all(MAX_MESSAGE_BYTES, MAX_BATCH_COUNT, MAX_BATCH_BYTES);
        c.ordering = self.sessions;
        c.deduplication = true;
        c.filtering = match self.entities {
            EntityKind::Topics => FilterSupport::Native,
            EntityKind::Queues => FilterSupport::None,
        };
        c.fan_out = self.entities == EntityKind::Topics;
        c.replay = false;
        c.nack_delay = false;
        c.lease_extension = true;
        c
    }
}

/// The portable kind of an azservicebus error, from the AMQP condition it carries.
pub(crate) fn sb_error(e: azure_core::Error, what: &str) -> Error {
    let text = format!("{e} {e:?}");
    let has = |s: &str| text.contains(s);
    let kind =
        if has("not-found") || has("NotFound") || has("could not be found") || has(" not found") {
            ErrorKind::NotFound
        } else if has("unauthorized")
            || has("Unauthorized")
            || has("StatusCode(401)")
            || has("Credential")
            || has("SaslError")
        {
            ErrorKind::PermissionDenied
        } else if has("lock-lost") || has("LockLost") || has("session-lock") {
            ErrorKind::LeaseExpired
        } else if has("message-size-exceeded") || has("too large") {
            ErrorKind::TooLarge
        } else if has("server-busy") || has("ServerBusy") {
            ErrorKind::Throttled
        } else if has("Disposed") || has("disposed") {
            ErrorKind::Closed
        } else if has("Elapsed") || has("timeout") || has("Timeout") {
            ErrorKind::Timeout
        } else {
            ErrorKind::Unavailable
        };
    Error::with_source(kind, format!("{what}: {e}"), e)
}

/// Whether an azservicebus error says that the AMQP connection (or the session on
/// it) under the client is gone, closed by the service or dropped by the network: the
/// client has to be made anew (azservicebus's own links recover; a client's new links
/// do not).
pub(crate) fn connection_lost(e: &azure_core::Error) -> bool {
    let text = format!("{e} {e:?}");
    [
        "IllegalSessionState",
        "IllegalConnectionState",
        "ConnectionScopeDisposed",
        "connection:forced",
    ]
    .iter()
    .any(|s| text.contains(s))
}

/// A client of the namespace: one AMQP connection. `max_retries` is azservicebus's
/// own retry of a failed operation (0 for the session acceptor, which loops itself).
pub(crate) async fn new_client(
    config: &ServiceBusConfig,
    max_retries: u32,
) -> Result<ServiceBusClient<BasicRetryPolicy>> {
    let options = ServiceBusClientOptions {
        retry_options: ServiceBusRetryOptions {
            try_timeout: Duration::from_secs(30),
            max_retries,
            ..Default::default()
        },
        ..Default::default()
    };
    let host = config.namespace.clone();
    // The secured and the unsecured (emulator) builders are different types with the
    // same constructors.
    macro_rules! connect {
        ($builder:expr) => {
            match &config.access {
                Access::Key { name, key } => {
                    $builder
                        .new_from_named_key_credential(
                            host.clone(),
                            azservicebus::authorization::AzureNamedKeyCredential::new(
                                name,
                                key.expose(),
                            ),
                            options,
                        )
                        .await
                }
                Access::SasToken(token) => {
                    $builder
                        .new_from_sas_credential(
                            host.clone(),
                            azservicebus::authorization::AzureSasCredential::new(token.expose()),
                            options,
                        )
                        .await
                }
                Access::Identity(credential) => {
                    $builder
                        .new_from_token_credential(host.clone(), credential.clone(), options)
                        .await
                }
            }
        };
    }
    if config.emulator {
        connect!(ServiceBusClient::unsecured())
    } else {
        connect!(ServiceBusClient::with_custom_retry_policy::<BasicRetryPolicy>())
    }
    .map_err(|e| sb_error(e, &format!("connect to Service Bus at {host}")))
}

pub(crate) struct Shared {
    pub(crate) config: ServiceBusConfig,
    pub(crate) client: Mutex<ServiceBusClient<BasicRetryPolicy>>,
    pub(crate) admin: Admin,
    pub(crate) codec: BinaryCodec,
}

impl Shared {
    /// A sender for a queue or topic.
    pub(crate) async fn sender(&self, entity: &str) -> Result<ServiceBusSender> {
        self.check(entity, None).await?;
        let mut client = self.client.lock().await;
        let open = client.create_sender(entity, Default::default());
        match tokio::time::timeout(LINK_TIMEOUT, open).await {
            Ok(result) => result.map_err(|e| sb_error(e, &format!("open a sender for {entity}"))),
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!("opening a sender for {entity} took longer than {LINK_TIMEOUT:?}"),
            )),
        }
    }

    /// Fails with NotFound when the management API says the entity (or, on a queue,
    /// the admitted subscription name) does not exist. A key without the Manage right
    /// cannot ask; then the link's own answer decides.
    pub(crate) async fn check(&self, topic: &str, subscription: Option<&str>) -> Result<()> {
        let missing = match (self.config.entities, subscription) {
            (EntityKind::Queues, Some(sub)) => match self.admin.admitted(topic).await {
                Ok(Some(admitted)) => sub != topic && !admitted.iter().any(|n| n == sub),
                Ok(None) => true,
                Err(e) if e.kind() == ErrorKind::PermissionDenied => false,
                Err(e) => return Err(e),
            },
            (_, sub) => {
                let path = match sub {
                    Some(sub) => self.path(topic, sub),
                    None => topic.to_owned(),
                };
                match self.admin.exists(&path).await {
                    Ok(exists) => !exists,
                    Err(e) if e.kind() == ErrorKind::PermissionDenied => false,
                    Err(e) => return Err(e),
                }
            }
        };
        if missing {
            return Err(Error::not_found(match subscription {
                Some(sub) => format!("Service Bus has no subscription {sub:?} of {topic:?}"),
                None => format!("Service Bus has no queue or topic {topic:?}"),
            }));
        }
        Ok(())
    }

    /// The entity path of `subscription` of `topic`: the subscription, or the queue.
    pub(crate) fn path(&self, topic: &str, subscription: &str) -> String {
        match self.config.entities {
            EntityKind::Topics => format!("{topic}/Subscriptions/{subscription}"),
            EntityKind::Queues => topic.to_owned(),
        }
    }
}

/// A Service Bus namespace as a cloudbus bus.
pub struct ServiceBusBus {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for ServiceBusBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceBusBus")
            .field("config", &self.shared.config)
            .finish()
    }
}

impl ServiceBusBus {
    /// Connects to the namespace (AMQP, with CBS authorization).
    pub async fn connect(config: ServiceBusConfig) -> Result<Self> {
        let client = new_client(&config, 3).await?;
        let mut codec = BinaryCodec::new(ATTRIBUTE_PREFIX).content_type_attribute(CONTENT_TYPE);
        if config.structured {
            codec = codec.structured();
        }
        let admin = Admin::new(&config)?;
        Ok(ServiceBusBus {
            shared: Arc::new(Shared {
                config,
                client: Mutex::new(client),
                admin,
                codec,
            }),
        })
    }

    /// Wraps this driver in a [`Bus`].
    pub fn into_bus(self) -> Bus {
        Bus::new(Arc::new(self))
    }
}

/// Where the codec keeps `datacontenttype` before it moves to the AMQP property.
const CONTENT_TYPE: &str = "content-type";

#[async_trait]
impl BusDriver for ServiceBusBus {
    fn scheme(&self) -> &str {
        "servicebus"
    }

    async fn topic(&self, topic: &str) -> Result<Arc<dyn TopicDriver>> {
        Ok(Arc::new(ServiceBusTopic {
            shared: self.shared.clone(),
            entity: topic.to_owned(),
            sender: Mutex::new(None),
            closed: AtomicBool::new(false),
        }))
    }

    async fn subscription(
        &self,
        topic: &str,
        subscription: &str,
    ) -> Result<Arc<dyn SubscriptionDriver>> {
        Ok(Arc::new(ServiceBusSubscription::new(
            self.shared.clone(),
            topic,
            subscription,
        )))
    }

    async fn dead_letters(
        &self,
        topic: &str,
        subscription: &str,
    ) -> Result<Arc<dyn DeadLetterDriver>> {
        Ok(Arc::new(ServiceBusDeadLetters::new(
            self.shared.clone(),
            topic,
            subscription,
        )))
    }

    fn topology(&self) -> Arc<dyn TopologyDriver> {
        Arc::new(ServiceBusTopology {
            shared: self.shared.clone(),
        })
    }

    async fn stream(&self, stream: &str) -> Result<Arc<dyn StreamDriver>> {
        Err(Error::unsupported(format!(
            "Service Bus has no partitioned logs; {stream:?} cannot be read as a stream \
             (Event Hubs is the Azure service for that)"
        )))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

struct ServiceBusTopology {
    shared: Arc<Shared>,
}

fn entity_properties(
    config: &ServiceBusConfig,
    spec: Option<&SubscriptionSpec>,
) -> EntityProperties {
    EntityProperties {
        lock: spec
            .map(|s| s.ack_deadline)
            .unwrap_or(Duration::from_secs(30))
            .clamp(MIN_LOCK, MAX_LOCK),
        max_delivery_count: spec
            .and_then(|s| s.max_delivery_attempts)
            .unwrap_or(DEFAULT_MAX_DELIVERY_COUNT)
            .max(1),
        requires_session: config.sessions,
    }
}

#[async_trait]
impl TopologyDriver for ServiceBusTopology {
    async fn ensure_topic(&self, topic: &str) -> Result<()> {
        let admin = &self.shared.admin;
        match self.shared.config.entities {
            EntityKind::Topics => admin.ensure_topic(topic).await,
            EntityKind::Queues => {
                admin
                    .ensure_queue(topic, &entity_properties(&self.shared.config, None))
                    .await
            }
        }
    }

    async fn ensure_subscription(&self, spec: &SubscriptionSpec) -> Result<()> {
        let admin = &self.shared.admin;
        let props = entity_properties(&self.shared.config, Some(spec));
        match self.shared.config.entities {
            EntityKind::Topics => {
                let rule = compile_rule(spec.filter.as_ref(), &spec.name)?;
                admin
                    .put_subscription(&spec.topic, &spec.name, &props, &rule)
                    .await
            }
            EntityKind::Queues => {
                if spec.filter.is_some() {
                    return Err(Error::unsupported(
                        "Service Bus queues have no filters; use servicebus:// topics \
                         (subscription rules) or filter in the consumer (ConsumerOptions::filter)",
                    ));
                }
                let Some(mut admitted) = admin.admitted(&spec.topic).await? else {
                    return Err(Error::not_found(format!(
                        "Service Bus queue {:?} does not exist",
                        spec.topic
                    )));
                };
                if !admitted.contains(&spec.name) {
                    admitted.push(spec.name.clone());
                }
                admin.put_queue(&spec.topic, &props, &admitted).await
            }
        }
    }

    async fn delete_subscription(&self, topic: &str, name: &str) -> Result<()> {
        match self.shared.config.entities {
            EntityKind::Topics => {
                self.shared
                    .admin
                    .delete(&format!("{topic}/Subscriptions/{name}"))
                    .await
            }
            // Every subscription of a queue reads the queue itself; it is only no
            // longer admitted.
            EntityKind::Queues => {
                let admin = &self.shared.admin;
                let Some(mut admitted) = admin.admitted(topic).await? else {
                    return Ok(());
                };
                if !admitted.iter().any(|n| n == name) {
                    return Ok(());
                }
                admitted.retain(|n| n != name);
                let props = entity_properties(&self.shared.config, None);
                admin.put_queue(topic, &props, &admitted).await
            }
        }
    }
}

/// Sends to one queue or topic.
pub struct ServiceBusTopic {
    shared: Arc<Shared>,
    entity: String,
    sender: Mutex<Option<ServiceBusSender>>,
    closed: AtomicBool,
}

/// Copies application properties into text attributes, typed values as their text.
pub(crate) fn text_of(value: &SimpleValue) -> Option<String> {
    Some(match value {
        SimpleValue::Null => return None,
        SimpleValue::Bool(b) => b.to_string(),
        SimpleValue::Ubyte(n) => n.to_string(),
        SimpleValue::Ushort(n) => n.to_string(),
        SimpleValue::Uint(n) => n.to_string(),
        SimpleValue::Ulong(n) => n.to_string(),
        SimpleValue::Byte(n) => n.to_string(),
        SimpleValue::Short(n) => n.to_string(),
        SimpleValue::Int(n) => n.to_string(),
        SimpleValue::Long(n) => n.to_string(),
        SimpleValue::Float(n) => n.to_string(),
        SimpleValue::Double(n) => n.to_string(),
        SimpleValue::Char(c) => c.to_string(),
        SimpleValue::Timestamp(t) => chrono::DateTime::from_timestamp_millis(t.milliseconds())?
            .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        SimpleValue::Uuid(u) => format!("{u:?}"),
        SimpleValue::String(s) => s.clone(),
        SimpleValue::Symbol(s) => s.0.clone(),
        SimpleValue::Binary(_)
        | SimpleValue::Decimal32(_)
        | SimpleValue::Decimal64(_)
        | SimpleValue::Decimal128(_)
        | SimpleValue::Described(_) => return None,
    })
}

impl ServiceBusTopic {
    /// The Service Bus message of one outgoing event.
    fn message(&self, m: &OutgoingMessage) -> Result<ServiceBusMessage> {
        let shared = &self.shared;
        let (raw, typed) = match &m.payload {
            Payload::Event(event) => {
                let (raw, mode) = shared.codec.encode(event)?;
                let typed: Vec<(String, SimpleValue)> =
                    if mode == cloudbus_core::codec::Mode::Binary {
                        event
                            .iter_extensions()
                            .filter_map(|(name, value)| {
                                let v = match value {
                                    ExtensionValue::Integer(n) => match i32::try_from(*n) {
                                        Ok(n) => SimpleValue::Int(n),
                                        Err(_) => SimpleValue::Long(*n),
                                    },
                                    ExtensionValue::Boolean(b) => SimpleValue::Bool(*b),
                                    ExtensionValue::String(_) => return None,
                                };
                                Some((format!("{ATTRIBUTE_PREFIX}{name}"), v))
                            })
                            .collect()
                    } else {
                        Vec::new()
                    };
                (raw, typed)
            }
            Payload::Raw(raw) => (raw.clone(), Vec::new()),
        };
        outgoing(raw, typed, m, shared.config.sessions)
    }

    async fn send(
        sender: &mut ServiceBusSender,
        batch: azservicebus::sender::service_bus_message_batch::ServiceBusMessageBatch,
        entity: &str,
    ) -> Result<()> {
        sender
            .send_message_batch(batch)
            .await
            .map_err(|e| sb_error(e, &format!("send to {entity}")))
    }
}

/// A Service Bus message from a raw message: `content-type` to the AMQP property, the
/// rest to application properties (typed ones replacing their text), MessageId from
/// the dedup id, SessionId from the ordering key (or one of [`UNKEYED_SESSIONS`] on a
/// session-enabled entity), ScheduledEnqueueTime from the delay.
pub(crate) fn outgoing(
    mut raw: RawMessage,
    typed: Vec<(String, SimpleValue)>,
    m: &OutgoingMessage,
    sessions: bool,
) -> Result<ServiceBusMessage> {
    let content_type = raw.attributes.remove(CONTENT_TYPE);
    let mut message = ServiceBusMessage::new(std::mem::take(&mut raw.body));
    message.set_content_type(content_type);
    let mut props = ApplicationProperties::builder();
    for (k, v) in raw.attributes {
        if let Some((_, typed)) = typed.iter().find(|(name, _)| *name == k) {
            props = props.insert(k, typed.clone());
        } else {
            props = props.insert(k, SimpleValue::String(v));
        }
    }
    *message.application_properties_mut() = Some(props.build());
    if let Some(id) = m.dedup_id() {
        message.set_message_id(id.to_string()).map_err(|e| {
            Error::invalid(format!(
                "{id:?} cannot be a Service Bus MessageId (at most 128 characters): {e}"
            ))
        })?;
    }
    if sessions {
        let session = match &m.ordering_key {
            Some(key) => key.clone(),
            None => format!("cloudbus-unkeyed-{}", key_slot(m.id(), UNKEYED_SESSIONS)),
        };
        message.set_session_id(session).map_err(|e| {
            Error::invalid(format!(
                "the ordering key cannot be a Service Bus SessionId (at most 128 characters): {e}"
            ))
        })?;
    }
    if let Some(delay) = m.delay.filter(|d| !d.is_zero()) {
        message.set_scheduled_enqueue_time(time::OffsetDateTime::now_utc() + delay);
    }
    Ok(message)
}

impl Drop for ServiceBusTopic {
    /// A publisher dropped without `close` still detaches its link (an abandoned
    /// azservicebus link leaves the shared AMQP session unusable for the next one).
    fn drop(&mut self) {
        let Some(sender) = self.sender.get_mut().take() else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = sender.dispose().await {
                    tracing::debug!(error = %e, "closing a dropped Service Bus sender");
                }
            });
        }
    }
}

#[async_trait]
impl TopicDriver for ServiceBusTopic {
    async fn send_batch(&self, batch: &[OutgoingMessage]) -> Result<BatchResults> {
        use azservicebus::amqp::error::TryAddMessageError;
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::closed(format!(
                "the publisher of {} is closed",
                self.entity
            )));
        }
        let mut guard = self.sender.lock().await;
        let sender = match guard.as_mut() {
            Some(s) => s,
            None => guard.insert(self.shared.sender(&self.entity).await?),
        };
        let mut results: BatchResults = (0..batch.len()).map(|_| Ok(())).collect();
        let new_batch = |sender: &ServiceBusSender| {
            sender
                .create_message_batch(Default::default())
                .map_err(|e| Error::invalid(format!("cannot make a Service Bus batch: {e}")))
        };
        let mut pending = new_batch(sender)?;
        let mut in_pending: Vec<usize> = Vec::new();
        for (i, m) in batch.iter().enumerate() {
            let message = match self.message(m) {
                Ok(message) => message,
                Err(e) => {
                    results[i] = Err(e);
                    continue;
                }
            };
            let message = match pending.try_add_message(message) {
                Ok(()) => {
                    in_pending.push(i);
                    continue;
                }
                Err(TryAddMessageError::BatchFull(message)) => message,
                Err(TryAddMessageError::Codec { source, .. }) => {
                    results[i] = Err(Error::invalid(format!(
                        "cannot encode {} as AMQP: {source}",
                        m.id()
                    )));
                    continue;
                }
            };
            // The batch is full: send it, then start the next one with this message.
            if !in_pending.is_empty() {
                let full = std::mem::replace(&mut pending, new_batch(sender)?);
                if let Err(e) = Self::send(sender, full, &self.entity).await {
                    for j in in_pending.drain(..) {
                        results[j] = Err(Error::new(e.kind(), e.message()));
                    }
                }
                in_pending.clear();
            }
            match pending.try_add_message(message) {
                Ok(()) => in_pending.push(i),
                Err(_) => {
                    results[i] = Err(Error::new(
                        ErrorKind::TooLarge,
                        format!(
                            "event {} does not fit in a Service Bus message of at most {} bytes",
                            m.id(),
                            pending.max_size_in_bytes()
                        ),
                    ));
                }
            }
        }
        if !in_pending.is_empty()
            && let Err(e) = Self::send(sender, pending, &self.entity).await
        {
            if in_pending.len() == batch.len() {
                return Err(e);
            }
            for j in in_pending {
                results[j] = Err(Error::new(e.kind(), e.message()));
            }
        }
        Ok(results)
    }

    fn capabilities(&self) -> Capabilities {
        self.shared.config.capabilities()
    }

    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        if let Some(sender) = self.sender.lock().await.take() {
            sender
                .dispose()
                .await
                .map_err(|e| sb_error(e, &format!("close the sender of {}", self.entity)))?;
        }
        Ok(())
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn azure_error(text: &str) -> azure_core::Error {
        azure_core::Error::message(azure_core::error::ErrorKind::Other, text.to_owned())
    }

    /// The texts azservicebus 0.25.1 gives (seen against the emulator) map to the
    /// portable kinds and to "connection lost"; a new azservicebus wording fails here.
    #[test]
    fn azservicebus_errors_are_classified() {
        for (text, kind) in [
            (
                "The messaging entity 'q' could not be found.",
                ErrorKind::NotFound,
            ),
            ("message 7 not found", ErrorKind::NotFound),
            (
                "StatusCode(401) Unauthorized: the signature does not match",
                ErrorKind::PermissionDenied,
            ),
            ("com.microsoft:session-lock-lost", ErrorKind::LeaseExpired),
            ("amqp:link:message-size-exceeded", ErrorKind::TooLarge),
            ("com.microsoft:server-busy", ErrorKind::Throttled),
            ("Local error: ExpectImmediateDetach", ErrorKind::Unavailable),
        ] {
            let e = sb_error(azure_error(text), "test");
            assert_eq!(e.kind(), kind, "{text}");
        }
        for text in [
            "Local error: IllegalSessionState",
            "IllegalConnectionState",
            "ConnectionScopeDisposed",
            "amqp:connection:forced: the service closed the connection",
        ] {
            assert!(connection_lost(&azure_error(text)), "{text}");
        }
        for text in [
            "Local error: ExpectImmediateDetach",
            "com.microsoft:timeout",
        ] {
            assert!(!connection_lost(&azure_error(text)), "{text}");
        }
    }

    #[test]
    fn connection_strings_parse_and_refuse() {
        let c = ServiceBusConfig::from_connection_string(
            "Endpoint=sb://contoso.servicebus.windows.net/;SharedAccessKeyName=send;SharedAccessKey=abc=",
        )
        .unwrap();
        assert_eq!(c.amqp_host(), "contoso.servicebus.windows.net");
        assert_eq!(
            c.management_endpoint,
            "https://contoso.servicebus.windows.net"
        );
        assert!(!c.emulator);
        match &c.access {
            Access::Key { name, key } => {
                assert_eq!(name, "send");
                assert_eq!(key.expose(), "abc=");
            }
            _ => panic!("a key was given"),
        }
        let e = ServiceBusConfig::from_connection_string("Endpoint=sb://x/;SharedAccessKey=k")
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(!e.message().contains("=k"));
        let e = ServiceBusConfig::from_connection_string(
            "Endpoint=sb://x/;SharedAccessKeyName=n;SharedAccessKey=k;EntityPath=q",
        )
        .unwrap_err();
        assert!(e.message().contains("EntityPath"));
    }

    #[test]
    fn typed_values_read_as_text() {
        assert_eq!(text_of(&SimpleValue::Int(12)).as_deref(), Some("12"));
        assert_eq!(text_of(&SimpleValue::Bool(true)).as_deref(), Some("true"));
        assert_eq!(text_of(&SimpleValue::Null), None);
    }
}
