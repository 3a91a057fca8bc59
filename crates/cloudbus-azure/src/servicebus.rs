//! Azure Service Bus (feature `servicebus`): queues, and topics with subscriptions,
//! over AMQP 1.0 directly on fe2o3-amqp (CBS authorization, `$management` requests);
//! entities are declared through the Service Bus management API (ATOM entries over
//! HTTPS).
//!
//! | cloudbus | Service Bus |
//! |---|---|
//! | topic | a topic (`servicebus://`) or a queue (`servicebus://?entity=queue`) |
//! | subscription | a subscription of the topic, or a competing reader of the queue |
//! | CloudEvent attributes | application properties `cloudEvents_<name>` (AMQP binding, binary mode; `cloudEvents:` when chosen with [`ServiceBusConfig::attribute_prefix`], both read); integer extensions as AMQP `long`, boolean ones as `boolean` |
//! | `datacontenttype` | the AMQP `content-type` property |
//! | data | the body (one data section) |
//! | structured mode (`?mode=structured`) | the JSON event as the body, `application/cloudevents+json` (a message is read as structured when its content type starts with `application/cloudevents`) |
//! | a batch of events | one transfer in the batched message format, up to the link's max-message-size |
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
mod connection;
mod error;
mod management;
mod message;
mod receiver;
mod rules;

use std::any::Any;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use cloudbus_core::codec::BinaryCodec;
use cloudbus_core::driver::{
    BatchResults, BusDriver, DeadLetterDriver, OutgoingMessage, Payload, SubscriptionDriver,
    SubscriptionSpec, TopicDriver, TopologyDriver,
};
use cloudbus_core::{Bus, Capabilities, Error, ErrorKind, FilterSupport, Result};
use fe2o3_amqp::Sender;
use fe2o3_amqp::types::messaging::{Data, Message, Outcome};
use fe2o3_amqp::types::primitives::SimpleValue;
use tokio::sync::Mutex;

pub use admin::service_bus_sas_token;
/// The `azure_core` release whose `credentials::TokenCredential` gives Microsoft Entra
/// ID tokens: implement it, or pass an `azure_identity` credential of the same release,
/// to [`ServiceBusConfig::namespace_with_credential`].
pub use azure_core;
use azure_core::credentials::TokenCredential;
pub use rules::{MAX_SQL_LENGTH, RuleFilter, compile_rule};

use crate::Secret;
use admin::{Admin, EntityProperties};
use connection::{Amqp, Live};
use management::Management;
use message::{CONTENT_TYPE, TransferMessage};
use receiver::ServiceBusDeadLetters;
pub use receiver::ServiceBusSubscription;

/// The connection string: `Endpoint=sb://…;SharedAccessKeyName=…;SharedAccessKey=…`.
pub const CONNECTION_STRING_ENV: &str = "SERVICEBUS_CONNECTION_STRING";
/// Where the management API is, when not at the namespace (the emulators).
pub const MANAGEMENT_ENDPOINT_ENV: &str = "SERVICEBUS_MANAGEMENT_ENDPOINT";
/// The prefix of CloudEvent attributes among application properties that the
/// CloudEvents AMQP binding prefers, and the one written unless another is chosen.
pub const ATTRIBUTE_PREFIX: &str = UNDERSCORE_ATTRIBUTE_PREFIX;
/// The binding's preferred prefix (`cloudEvents_`, usable in every AMQP and JMS
/// selector syntax).
pub const UNDERSCORE_ATTRIBUTE_PREFIX: &str = "cloudEvents_";
/// The binding's other prefix (`cloudEvents:`), read always, written when chosen.
pub const COLON_ATTRIBUTE_PREFIX: &str = "cloudEvents:";
/// The application property that sends a redriven message back to one subscription.
pub const REDRIVE_PROPERTY: &str = "cloudbus-redrive";
/// Largest message (Standard tier; Premium allows up to 100 MB).
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// Largest transfer (one message, or a batch of them in the batched message format)
/// when the link does not say (its max-message-size; Standard tier: 256 KiB).
pub const MAX_TRANSFER_BYTES: usize = 256 * 1024;
/// Most bytes of events handed to one send: it goes out as as few full transfers as
/// fit, filled as they go (each send ends with a part-filled transfer, so sends much
/// larger than a transfer keep those few; a core batch of one transfer's size would
/// often need a second, small one, as the AMQP encoding is larger than the events').
pub const MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;
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
    pub(crate) prefix: &'static str,
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
            prefix: ATTRIBUTE_PREFIX,
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
            prefix: ATTRIBUTE_PREFIX,
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
    /// `prefix=cloudEvents_|cloudEvents:` (the attribute prefix written),
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
                ("prefix", v) => config = config.attribute_prefix(v)?,
                (k, v) => {
                    return Err(Error::invalid(format!(
                        "unknown servicebus:// URL parameter {k}={v:?} (known: \
                         entity=queue|topic, sessions=true|false, mode=structured|binary, \
                         prefix=cloudEvents_|cloudEvents:, management=URL)"
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
    /// The prefix of the CloudEvent attributes written as application properties:
    /// [`UNDERSCORE_ATTRIBUTE_PREFIX`] (the default, which the CloudEvents AMQP binding
    /// prefers) or [`COLON_ATTRIBUTE_PREFIX`]. Both are read whatever is chosen;
    /// subscription rules match the one written.
    ///
    /// ```
    /// use cloudbus_azure::servicebus::{COLON_ATTRIBUTE_PREFIX, ServiceBusConfig};
    /// let c = ServiceBusConfig::from_connection_string(
    ///     "Endpoint=sb://localhost;SharedAccessKeyName=k;SharedAccessKey=v;UseDevelopmentEmulator=true")
    ///     .unwrap();
    /// assert!(c.clone().attribute_prefix(COLON_ATTRIBUTE_PREFIX).is_ok());
    /// assert!(c.attribute_prefix("ce-").is_err());
    /// ```
    pub fn attribute_prefix(mut self, prefix: &str) -> Result<Self> {
        self.prefix = match prefix {
            UNDERSCORE_ATTRIBUTE_PREFIX => UNDERSCORE_ATTRIBUTE_PREFIX,
            COLON_ATTRIBUTE_PREFIX => COLON_ATTRIBUTE_PREFIX,
            other => {
                return Err(Error::invalid(format!(
                    "the CloudEvents AMQP binding allows the attribute prefixes \
                     {UNDERSCORE_ATTRIBUTE_PREFIX:?} and {COLON_ATTRIBUTE_PREFIX:?}, not {other:?}"
                )));
            }
        };
        Ok(self)
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
        let mut c = Capabilities::broker(MAX_MESSAGE_BYTES, MAX_BATCH_COUNT, MAX_BATCH_BYTES);
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

/// Decodes an AMQP message, as Service Bus delivers it (its encoded sections), into
/// a CloudEvent the way a Service Bus consumer reads it: binary mode under either
/// binding prefix (typed extensions keep their type), or structured mode by content
/// type. Bytes that are not an AMQP message, or a message that is not a CloudEvent,
/// are a typed error. This is what `cloudbus::fuzzing` feeds arbitrary bytes.
///
/// ```
/// let e = cloudbus_azure::servicebus::decode_amqp_message(b"not AMQP").unwrap_err();
/// assert_eq!(e.kind(), cloudbus_core::ErrorKind::Malformed);
/// ```
pub fn decode_amqp_message(bytes: &[u8]) -> Result<cloudbus_core::Event> {
    use fe2o3_amqp::types::messaging::Body;
    use fe2o3_amqp::types::messaging::message::__private::Deserializable;
    use fe2o3_amqp::types::primitives::Value;
    let message = serde_amqp::from_slice::<Deserializable<Message<Body<Value>>>>(bytes)
        .map_err(|e| Error::with_source(ErrorKind::Malformed, "not an AMQP message", e))?
        .0;
    let (raw, typed) = message::raw_of(&message, ATTRIBUTE_PREFIX);
    let codec = BinaryCodec::new(ATTRIBUTE_PREFIX).content_type_attribute(CONTENT_TYPE);
    let mut event = codec
        .decode(&raw)
        .map_err(|e| Error::new(ErrorKind::Malformed, format!("not a CloudEvent: {e}")))?;
    message::restore(&mut event, typed);
    Ok(event)
}

/// Refuses a Microsoft Entra ID identity on a connection that is not verified: the
/// emulator mode speaks plain AMQP and accepts the management API's self-signed
/// certificate, so a bearer token (a real credential) may go there only on this
/// machine.
fn check_credential_transport(config: &ServiceBusConfig) -> Result<()> {
    if config.emulator
        && matches!(config.access, Access::Identity(_))
        && !connection::is_loopback(&config.namespace)
    {
        return Err(Error::new(
            ErrorKind::PermissionDenied,
            format!(
                "refusing to send a Microsoft Entra ID token to {} over an unverified \
                 connection (UseDevelopmentEmulator=true: plain AMQP, any certificate); \
                 an emulator with a token credential must run on this machine",
                config.namespace
            ),
        ));
    }
    Ok(())
}

pub(crate) struct Shared {
    pub(crate) config: ServiceBusConfig,
    pub(crate) amqp: Arc<Amqp>,
    pub(crate) admin: Admin,
    pub(crate) codec: BinaryCodec,
    /// The `$management` clients of the entities used, by entity path.
    managements: std::sync::Mutex<std::collections::HashMap<String, Arc<Management>>>,
}

impl Shared {
    /// The `$management` client of an entity (one per entity and bus).
    pub(crate) fn management(&self, path: &str) -> Arc<Management> {
        let mut all = connection::lock(&self.managements);
        all.entry(path.to_owned())
            .or_insert_with(|| Arc::new(Management::new(self.amqp.clone(), path)))
            .clone()
    }

    /// A sender for a queue or topic.
    pub(crate) async fn sender(&self, entity: &str) -> Result<(Arc<Live>, Sender)> {
        self.check(entity, None).await?;
        self.amqp.sender(entity).await.map_err(|f| f.error)
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
        check_credential_transport(&config)?;
        let amqp = Arc::new(Amqp::new(config.clone()));
        // Connect now, so that a wrong address or key shows here.
        amqp.live().await.map_err(|f| f.error)?;
        let mut codec = BinaryCodec::new(config.prefix).content_type_attribute(CONTENT_TYPE);
        if config.structured {
            codec = codec.structured();
        }
        let admin = Admin::new(&config)?;
        Ok(ServiceBusBus {
            shared: Arc::new(Shared {
                config,
                amqp,
                admin,
                codec,
                managements: Default::default(),
            }),
        })
    }

    /// Wraps this driver in a [`Bus`].
    pub fn into_bus(self) -> Bus {
        Bus::new(Arc::new(self))
    }
}

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
                let rule =
                    compile_rule(spec.filter.as_ref(), &spec.name, self.shared.config.prefix)?;
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
    sender: Mutex<Option<(Arc<Live>, Sender)>>,
    closed: AtomicBool,
}

/// The longest one transfer may wait for the service's outcome.
const SEND_TIMEOUT: Duration = Duration::from_secs(30);

impl ServiceBusTopic {
    /// The AMQP message of one outgoing event.
    fn message(&self, m: &OutgoingMessage) -> Result<Message<Data>> {
        let shared = &self.shared;
        let (raw, typed) = match &m.payload {
            Payload::Event(event) => {
                let (raw, mode) = shared.codec.encode(event)?;
                let typed: Vec<(String, SimpleValue)> =
                    if mode == cloudbus_core::codec::Mode::Binary {
                        message::typed_extensions(event, shared.config.prefix)
                    } else {
                        Vec::new()
                    };
                (raw, typed)
            }
            Payload::Raw(raw) => (raw.clone(), Vec::new()),
        };
        message::outgoing(raw, &typed, m, shared.config.sessions)
    }

    /// Sends one filled transfer (nothing when it is empty) and records its messages'
    /// results; after a lost link, fails them without trying.
    async fn send_transfer(
        &self,
        live: &Live,
        sender: &mut Sender,
        messages: Vec<(usize, Message<Data>, Vec<u8>)>,
        results: &mut BatchResults,
        outcome: &mut SendOutcome,
    ) {
        if messages.is_empty() {
            return;
        }
        let members: Vec<usize> = messages.iter().map(|(i, _, _)| *i).collect();
        let failure = match &outcome.link_lost {
            Some(e) => e.clone(),
            None => {
                let transfer =
                    message::transfer(messages.into_iter().map(|(_, m, b)| (m, b)).collect());
                let Some(transfer) = transfer else {
                    return;
                };
                match self.transfer(live, sender, transfer).await {
                    Ok(()) => {
                        outcome.sent_any = true;
                        return;
                    }
                    Err(f) => {
                        if f.scope != error::Scope::Operation {
                            outcome.link_lost = Some(f.error.clone());
                        }
                        f.error
                    }
                }
            }
        };
        outcome.failed += members.len();
        for i in members {
            results[i] = Err(failure.clone());
        }
    }

    /// Sends one transfer and waits for the service's outcome.
    async fn transfer(
        &self,
        live: &Live,
        sender: &mut Sender,
        transfer: TransferMessage,
    ) -> std::result::Result<(), error::Failure> {
        let what = format!("send to {}", self.entity);
        let sent = match transfer {
            TransferMessage::Single(m) => tokio::time::timeout(SEND_TIMEOUT, sender.send(m)).await,
            TransferMessage::Batch(b) => tokio::time::timeout(SEND_TIMEOUT, sender.send(b)).await,
        };
        let failure = match sent {
            Ok(Ok(Outcome::Accepted(_))) => return Ok(()),
            Ok(Ok(Outcome::Rejected(rejected))) => match rejected.error {
                Some(e) => {
                    let symbol = error::condition_symbol(&e.condition);
                    error::Failure {
                        error: Error::new(
                            error::kind_of_condition(&symbol),
                            format!(
                                "{what}: rejected: {symbol}: {}",
                                e.description.unwrap_or_default()
                            ),
                        ),
                        scope: error::Scope::Operation,
                    }
                }
                None => error::Failure {
                    error: Error::new(ErrorKind::Internal, format!("{what}: rejected")),
                    scope: error::Scope::Operation,
                },
            },
            Ok(Ok(other)) => error::Failure {
                error: Error::new(
                    ErrorKind::Unavailable,
                    format!("{what}: the service did not take it ({other:?})"),
                ),
                scope: error::Scope::Operation,
            },
            Ok(Err(e)) => error::from_send(e, &what),
            Err(_) => error::timed_out(&what, SEND_TIMEOUT),
        };
        self.shared.amqp.failed(live, &failure);
        Err(failure)
    }
}

/// How many messages are encoded between yields to the runtime (about a millisecond).
const ENCODE_SLICE: usize = 16;

/// Encodes the messages of one `send_batch` into transfers, one transfer at a time.
struct TransferEncoder {
    fill: message::TransferFill,
    max_bytes: usize,
    /// The index of the next message to encode.
    next: usize,
    /// An encoded message that starts the next transfer.
    carried: Option<(usize, Message<Data>, Vec<u8>)>,
    /// Messages that could not be encoded, or are too large, with why.
    failed: Vec<(usize, Error)>,
}

impl TransferEncoder {
    fn new(max_bytes: usize) -> Self {
        TransferEncoder {
            fill: message::TransferFill::new(max_bytes),
            max_bytes,
            next: 0,
            carried: None,
            failed: Vec::new(),
        }
    }

    /// The messages of the next transfer (none when the batch is done).
    ///
    /// It yields every [`ENCODE_SLICE`] messages: the transfer in flight was handed to
    /// fe2o3's session task, which the runtime queued on this thread (tokio's LIFO
    /// slot, which no other worker steals), so without yielding the transfer would
    /// only reach the wire when the whole next one was encoded.
    async fn next_transfer(
        &mut self,
        topic: &ServiceBusTopic,
        batch: &[OutgoingMessage],
    ) -> Vec<(usize, Message<Data>, Vec<u8>)> {
        let mut transfer: Vec<_> = self.carried.take().into_iter().collect();
        while let Some(m) = batch.get(self.next) {
            let i = self.next;
            self.next += 1;
            if i % ENCODE_SLICE == ENCODE_SLICE - 1 {
                tokio::task::yield_now().await;
            }
            let encoded = topic.message(m).and_then(|msg| {
                let bytes = message::encoded(&msg)?;
                Ok((msg, bytes))
            });
            let (msg, bytes) = match encoded {
                Ok(encoded) => encoded,
                Err(e) => {
                    self.failed.push((i, e));
                    continue;
                }
            };
            match self.fill.place(bytes.len()) {
                message::Placement::TooLarge => {
                    let error = Error::new(
                        ErrorKind::TooLarge,
                        format!(
                            "event {} is {} bytes as AMQP, more than the {} a Service Bus \
                             message may have",
                            m.id(),
                            bytes.len(),
                            self.max_bytes
                        ),
                    );
                    self.failed.push((i, error));
                }
                message::Placement::StartNew if !transfer.is_empty() => {
                    self.carried = Some((i, msg, bytes));
                    return transfer;
                }
                message::Placement::StartNew | message::Placement::Append => {
                    transfer.push((i, msg, bytes));
                }
            }
        }
        transfer
    }
}

/// How the transfers of one `send_batch` went.
#[derive(Default)]
struct SendOutcome {
    /// The link was lost: later transfers of the batch are not tried.
    link_lost: Option<Error>,
    sent_any: bool,
    /// Messages whose transfer failed (or was not tried after a lost link).
    failed: usize,
}

impl Drop for ServiceBusTopic {
    /// A publisher dropped without `close` still closes its link.
    fn drop(&mut self) {
        let Some((_, sender)) = self.sender.get_mut().take() else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                if let Err(e) = sender.close().await {
                    tracing::debug!(error = %e, "closing a dropped Service Bus sender");
                }
            });
        }
    }
}

#[async_trait]
impl TopicDriver for ServiceBusTopic {
    async fn send_batch(&self, batch: &[OutgoingMessage]) -> Result<BatchResults> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::closed(format!(
                "the publisher of {} is closed",
                self.entity
            )));
        }
        let mut results: BatchResults = (0..batch.len()).map(|_| Ok(())).collect();
        let mut guard = self.sender.lock().await;
        let (live, sender) = match guard.as_mut() {
            Some(s) => s,
            None => guard.insert(self.shared.sender(&self.entity).await?),
        };
        let max_bytes = sender
            .max_message_size()
            .filter(|m| *m > 0)
            .and_then(|m| usize::try_from(m).ok())
            .unwrap_or(MAX_TRANSFER_BYTES);
        // Each message is encoded as its transfer fills (a malformed event fails
        // alone); the next transfer is filled while the one before is in flight, so
        // that the encoding overlaps the service's work rather than adding to it. One
        // transfer at a time is in flight, so the order of the batch is kept.
        let mut encoder = TransferEncoder::new(max_bytes);
        let mut outcome = SendOutcome::default();
        let mut current = encoder.next_transfer(self, batch).await;
        while !current.is_empty() {
            let send = self.send_transfer(live, sender, current, &mut results, &mut outcome);
            let fill = encoder.next_transfer(self, batch);
            let ((), following) = futures::join!(send, fill);
            current = following;
        }
        for (i, e) in encoder.failed {
            results[i] = Err(e);
        }
        let SendOutcome {
            link_lost,
            sent_any,
            failed,
        } = outcome;
        if link_lost.is_some() {
            // The next batch opens a new link (and a new connection when it was lost).
            if let Some((_, sender)) = guard.take() {
                tokio::spawn(async move {
                    let _ = sender.close().await;
                });
            }
        }
        if !sent_any
            && failed == batch.len()
            && let Some(Err(e)) = results.iter().find(|r| r.is_err())
        {
            return Err(e.clone());
        }
        Ok(results)
    }

    fn capabilities(&self) -> Capabilities {
        self.shared.config.capabilities()
    }

    async fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        if let Some((_, sender)) = self.sender.lock().await.take() {
            sender.close().await.map_err(|e| {
                Error::with_source(
                    ErrorKind::Unavailable,
                    format!("close the sender of {}", self.entity),
                    e,
                )
            })?;
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

    /// An Entra ID token goes over plain AMQP only to this machine.
    #[test]
    fn identities_are_refused_over_unverified_remote_connections() {
        #[derive(Debug)]
        struct NoToken;
        #[async_trait::async_trait]
        impl azure_core::credentials::TokenCredential for NoToken {
            async fn get_token(
                &self,
                _scopes: &[&str],
                _options: Option<azure_core::credentials::TokenRequestOptions>,
            ) -> azure_core::Result<azure_core::credentials::AccessToken> {
                Err(azure_core::Error::message(
                    azure_core::error::ErrorKind::Credential,
                    "not in a test",
                ))
            }
        }
        let remote = ServiceBusConfig::from_connection_string(
            "Endpoint=sb://10.1.2.3;SharedAccessKeyName=k;SharedAccessKey=v;UseDevelopmentEmulator=true",
        )
        .unwrap();
        assert!(
            check_credential_transport(&remote).is_ok(),
            "a SAS key is not refused"
        );
        let e = check_credential_transport(&remote.clone().token_credential(Arc::new(NoToken)))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PermissionDenied);
        let local = ServiceBusConfig::from_connection_string(
            "Endpoint=sb://127.0.0.1:5673;SharedAccessKeyName=k;SharedAccessKey=v;UseDevelopmentEmulator=true",
        )
        .unwrap()
        .token_credential(Arc::new(NoToken));
        assert!(check_credential_transport(&local).is_ok());
        let real = ServiceBusConfig::namespace_with_credential(
            "contoso.servicebus.windows.net",
            Arc::new(NoToken),
        );
        assert!(check_credential_transport(&real).is_ok(), "TLS, verified");
    }

    /// AMQP messages written by another stack (python-qpid-proton, the committed fuzz
    /// seeds) read as Service Bus consumers read them: both binding prefixes, typed
    /// extensions, an AMQP timestamp as the time, structured mode by content type; a
    /// foreign message is Malformed.
    #[test]
    fn amqp_messages_of_another_stack_decode() {
        use cloudbus_core::AttributesReader;
        let seed = |name: &str| {
            std::fs::read(format!(
                "{}/../../fuzz/corpus/decode_all/servicebus-{name}",
                env!("CARGO_MANIFEST_DIR")
            ))
            .expect("seed")
        };
        for name in ["binary-underscore", "binary-colon"] {
            let e = decode_amqp_message(&seed(name)).expect(name);
            assert_eq!(e.ty(), "com.example.t");
            assert_eq!(
                e.extension("priority"),
                Some(&cloudbus_core::ExtensionValue::Integer(7))
            );
            assert_eq!(
                e.extension("urgent"),
                Some(&cloudbus_core::ExtensionValue::Boolean(true))
            );
            assert_eq!(
                e.time().map(|t| t.timestamp_millis()),
                Some(1_764_500_000_000)
            );
            assert_eq!(e.datacontenttype(), Some("application/json"));
        }
        let e = decode_amqp_message(&seed("structured")).expect("structured");
        assert_eq!(e.id(), "2");
        let e = decode_amqp_message(&seed("foreign")).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Malformed);
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
}
