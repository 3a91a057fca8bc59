//! What a Service Bus bus is opened with: the namespace and its credential (connection
//! string, SAS token or Microsoft Entra ID identity), whether entities are topics or
//! queues, sessions, the binding's attribute prefix; the service's limits; and the rule
//! that a credential (a SAS token or an identity's token) never travels over an
//! unverified connection to another machine.

use std::sync::Arc;
use std::time::Duration;

use azure_core::credentials::TokenCredential;
use cloudbus_driver::config::{UrlParams, env_var};
use cloudbus_driver::{Capabilities, Error, ErrorKind, FilterSupport, Result};

use crate::auth::Secret;

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
    /// emulator), whose self-signed certificate is accepted. Plain AMQP and unchecked
    /// certificates carry credentials, so both endpoints must then be on this machine
    /// (loopback); [`ServiceBusBus::connect`](super::ServiceBusBus::connect) refuses
    /// any other with PermissionDenied before sending anything.
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
            let management = env_var(MANAGEMENT_ENDPOINT_ENV)
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

    /// From `SERVICEBUS_CONNECTION_STRING` (when set and not blank).
    pub fn from_env() -> Result<Self> {
        match env_var(CONNECTION_STRING_ENV) {
            Some(text) => Self::from_connection_string(&text),
            None => Err(Error::invalid(format!(
                "{CONNECTION_STRING_ENV} is not set; it names the Service Bus namespace and its key"
            ))),
        }
    }

    /// From a `servicebus://` URL: the connection string from the environment, then
    /// `entity=queue|topic`, `sessions=true|false`, `mode=structured|binary`,
    /// `prefix=cloudEvents_|cloudEvents:` (the attribute prefix written),
    /// `management=URL`. Any other parameter, or another value, is InvalidArgument.
    pub fn from_url(url: &url::Url) -> Result<Self> {
        let mut config = Self::from_env()?;
        let params =
            UrlParams::parse(url, &["entity", "sessions", "mode", "prefix", "management"])?;
        match params.choice("entity", &["queue", "topic"])? {
            Some("queue") => config = config.entities(EntityKind::Queues),
            Some(_) => config = config.entities(EntityKind::Topics),
            None => {}
        }
        if let Some(sessions) = params.flag("sessions")? {
            config = config.sessions(sessions);
        }
        if let Some(mode) = params.choice("mode", &["structured", "binary"])? {
            config.structured = mode == "structured";
        }
        if let Some(management) = params.get("management") {
            config = config.management_endpoint(management);
        }
        if let Some(prefix) = params.get("prefix") {
            config = config.attribute_prefix(prefix)?;
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
    /// The management API's base URL. It gets the credential with every request, so
    /// it must be `https://` (with a verified certificate: not in the emulator mode)
    /// or on this machine; `connect` refuses any other.
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
        // One sender link per publisher, one transfer in flight on it.
        c.concurrent_sends = 1;
        c
    }
}

/// Refuses to send a credential where it could be read on the way or go to a host that
/// proves nothing (issue 28 item 15). A credential goes to two endpoints: the AMQP host
/// (CBS put-token: a SAS token, or a Microsoft Entra ID bearer token) and the
/// management API (a SAS token or the bearer token on every request). Each must be
/// reached over TLS with a verified certificate, or be this machine: the emulator mode
/// (`UseDevelopmentEmulator=true`) speaks plain AMQP and accepts any certificate on
/// the management API, so there both must be loopback; elsewhere a management
/// endpoint that is not `https://` must be loopback. Checked before anything is sent.
pub(crate) fn check_credential_transport(config: &ServiceBusConfig) -> Result<()> {
    use cloudbus_driver::transport::is_loopback_host as is_loopback;
    let credential = match config.access {
        Access::Identity(_) => "a Microsoft Entra ID token",
        Access::Key { .. } => "a SAS token signed with the shared access key",
        Access::SasToken(_) => "the SAS token",
    };
    if config.emulator && !is_loopback(&config.namespace) {
        return Err(Error::new(
            ErrorKind::PermissionDenied,
            format!(
                "refusing to send {credential} to {} over plain AMQP \
                 (UseDevelopmentEmulator=true); an emulator must run on this machine",
                config.namespace
            ),
        ));
    }
    let endpoint = &config.management_endpoint;
    let url = url::Url::parse(endpoint).map_err(|e| {
        Error::with_source(
            ErrorKind::InvalidArgument,
            format!("the Service Bus management endpoint {endpoint:?} is not a URL"),
            e,
        )
    })?;
    let host = url.host_str().unwrap_or_default();
    let verified = url.scheme() == "https" && !config.emulator;
    if !verified && !is_loopback(host) {
        let why = if url.scheme() != "https" {
            format!("over {}://, which is not encrypted", url.scheme())
        } else {
            "with certificate checks off (UseDevelopmentEmulator=true)".to_owned()
        };
        return Err(Error::new(
            ErrorKind::PermissionDenied,
            format!(
                "refusing to send {credential} to the management endpoint {host} {why}; \
                 use https:// with a verified certificate, or an endpoint on this machine"
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A credential that proves nothing: its tokens are never asked for.
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

    /// An emulator connection string for `host`, with a key.
    fn emulator(host: &str) -> ServiceBusConfig {
        ServiceBusConfig::from_connection_string(&format!(
            "Endpoint=sb://{host};SharedAccessKeyName=k;SharedAccessKey=v;UseDevelopmentEmulator=true"
        ))
        .unwrap()
    }

    /// Any credential goes over plain AMQP only to this machine (the emulator mode).
    #[test]
    fn identities_are_refused_over_unverified_remote_connections() {
        let remote = emulator("bus.invalid").management_endpoint("http://127.0.0.1:5300");
        let e = check_credential_transport(&remote).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
        let e = check_credential_transport(&remote.clone().token_credential(Arc::new(NoToken)))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PermissionDenied);
        let local = emulator("127.0.0.1:5673")
            .management_endpoint("https://127.0.0.1:5674")
            .token_credential(Arc::new(NoToken));
        assert!(check_credential_transport(&local).is_ok());
        let real = ServiceBusConfig::namespace_with_credential(
            "contoso.servicebus.windows.net",
            Arc::new(NoToken),
        );
        assert!(check_credential_transport(&real).is_ok(), "TLS, verified");
    }

    /// Issue 28 item 15: the check looked only at the AMQP host, so a management
    /// endpoint override got the bearer token (or a SAS token) over plain HTTP, or over
    /// HTTPS with certificate checks off (the emulator mode). Every endpoint a credential
    /// goes to is checked now: HTTPS with verified certificates, or loopback.
    #[test]
    fn every_endpoint_a_credential_goes_to_is_checked() {
        let identity = || -> Arc<dyn TokenCredential> { Arc::new(NoToken) };
        let verified_amqp = |management: &str| {
            ServiceBusConfig::namespace_with_credential("bus.invalid", identity())
                .management_endpoint(management)
        };
        for refused in [
            // A bearer token over plain HTTP.
            verified_amqp("http://management.invalid"),
            // A key's SAS token over plain HTTP.
            ServiceBusConfig::namespace("bus.invalid", "k", Secret::new("v"))
                .management_endpoint("http://management.invalid:8080/"),
            // HTTPS, but any certificate is accepted in the emulator mode.
            emulator("127.0.0.1:5672")
                .management_endpoint("https://management.invalid")
                .token_credential(identity()),
            emulator("localhost").management_endpoint("https://management.invalid:5300"),
        ] {
            let e = check_credential_transport(&refused).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
            assert!(e.message().contains("management.invalid"), "{e}");
            assert!(!e.message().contains("=v"), "{e}");
        }
        for allowed in [
            verified_amqp("https://management.invalid"),
            verified_amqp("http://127.0.0.1:5300"),
            emulator("127.0.0.1:5672").management_endpoint("http://localhost:5300"),
            emulator("[::1]:5672")
                .management_endpoint("https://[::1]:5673")
                .token_credential(identity()),
        ] {
            check_credential_transport(&allowed).unwrap();
        }
        let e = check_credential_transport(&verified_amqp("not a url")).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    }

    /// The refusal comes before anything is sent: connecting with a refused
    /// management endpoint is PermissionDenied, not the Unavailable that trying to
    /// reach a `.invalid` host would give.
    #[tokio::test]
    async fn a_refused_endpoint_is_refused_before_connecting() {
        let config = ServiceBusConfig::namespace_with_credential("bus.invalid", Arc::new(NoToken))
            .management_endpoint("http://management.invalid");
        let e = super::super::bus::ServiceBusBus::connect(config)
            .await
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
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
