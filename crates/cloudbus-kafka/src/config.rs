//! How to reach a Kafka broker, read from a URL and the environment: Apache Kafka
//! (`kafka://`, Amazon MSK with SASL/SCRAM included) and the Kafka endpoint of Azure
//! Event Hubs (`eventhubs://`); the librdkafka properties of the admin client, the
//! producer and the consumers that follow from it; and the rule that credentials
//! never travel unencrypted nor to a broker whose certificate is not verified.
//!
//! Secrets (a SASL password, an Event Hubs connection string, an OAuth client secret)
//! come from the environment only, never from the URL, and never appear in Debug or
//! Display output or in error messages. OAUTHBEARER tokens (Microsoft Entra ID on
//! Event Hubs, any OpenID Connect provider on Kafka) are fetched by librdkafka itself
//! (`sasl.oauthbearer.method=oidc`, the OAuth 2.0 client-credentials grant) from an
//! https token endpoint only.

use std::fmt;
use std::ops::RangeInclusive;
use std::str::FromStr;
use std::time::Duration;

use cloudbus_driver::config::{UrlParams, env_var};
use cloudbus_driver::{Error, ErrorKind, Result};

use crate::binding::ContentMode;

/// The bootstrap servers (`host:port,host:port`) of a `kafka://` URL without hosts.
pub const BOOTSTRAP_SERVERS_ENV: &str = "KAFKA_BOOTSTRAP_SERVERS";
/// The SASL user name (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512).
pub const SASL_USERNAME_ENV: &str = "KAFKA_SASL_USERNAME";
/// The SASL password (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512).
pub const SASL_PASSWORD_ENV: &str = "KAFKA_SASL_PASSWORD";
/// The Event Hubs namespace's connection string
/// (`Endpoint=sb://NAMESPACE.servicebus.windows.net/;SharedAccessKeyName=…;SharedAccessKey=…`).
pub const EVENTHUBS_CONNECTION_STRING_ENV: &str = "EVENTHUBS_CONNECTION_STRING";
/// The OAuth 2.0 token endpoint of `kafka://…?sasl_mechanism=OAUTHBEARER` (https only).
pub const KAFKA_OAUTH_TOKEN_ENDPOINT_ENV: &str = "KAFKA_OAUTH_TOKEN_ENDPOINT";
/// The OAuth client ID of `kafka://…?sasl_mechanism=OAUTHBEARER`.
pub const KAFKA_OAUTH_CLIENT_ID_ENV: &str = "KAFKA_OAUTH_CLIENT_ID";
/// The OAuth client secret of `kafka://…?sasl_mechanism=OAUTHBEARER`.
pub const KAFKA_OAUTH_CLIENT_SECRET_ENV: &str = "KAFKA_OAUTH_CLIENT_SECRET";
/// The Microsoft Entra ID tenant (directory) of `eventhubs://…?auth=entra`: a GUID or
/// a domain, as azure-identity's EnvironmentCredential reads it.
pub const AZURE_TENANT_ID_ENV: &str = "AZURE_TENANT_ID";
/// The client (application) ID of the service principal of `?auth=entra`.
pub const AZURE_CLIENT_ID_ENV: &str = "AZURE_CLIENT_ID";
/// The client secret of the service principal of `?auth=entra`.
pub const AZURE_CLIENT_SECRET_ENV: &str = "AZURE_CLIENT_SECRET";
/// The Microsoft Entra ID authority of `?auth=entra` (https only), for sovereign
/// clouds; [`DEFAULT_AZURE_AUTHORITY_HOST`] when unset.
pub const AZURE_AUTHORITY_HOST_ENV: &str = "AZURE_AUTHORITY_HOST";
/// The authority of the Azure public cloud.
pub const DEFAULT_AZURE_AUTHORITY_HOST: &str = "https://login.microsoftonline.com";
/// How long a consumer's fetch waits at the broker for records (`fetch.wait.max.ms`,
/// librdkafka's default made explicit): a fetch sent before a consumer stopped comes
/// back within this.
pub const FETCH_WAIT: std::time::Duration = std::time::Duration::from_millis(500);
/// The port of the Event Hubs Kafka endpoint.
pub const EVENTHUBS_KAFKA_PORT: u16 = 9093;
/// Event Hubs closes the connection of a request larger than this (Microsoft's
/// "Apache Kafka client configurations for Azure Event Hubs": `max.request.size`
/// must be below 1,046,528 bytes).
pub const EVENTHUBS_MAX_REQUEST_BYTES: usize = 1_046_528;
/// The default largest encoded record, for Kafka and Event Hubs alike: librdkafka's
/// `message.max.bytes` default, below Kafka's broker default (1,048,588 bytes) with
/// room for framing, and the value Microsoft recommends for Event Hubs.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 1_000_000;
/// The `client.id` unless `?client_id=` says otherwise.
pub const DEFAULT_CLIENT_ID: &str = "cloudbus";
/// The topic configs (Kafka's `DescribeConfigs` names) the URL can declare:
/// `?retention_ms=` and `?cleanup_policy=`.
pub const TOPIC_CONFIG_NAMES: [&str; 2] = ["retention.ms", "cleanup.policy"];

/// Partitions of the topics topology creates, unless `?partitions=` says otherwise.
pub const DEFAULT_TOPIC_PARTITIONS: i32 = 3;
/// Retried records not due yet that a subscription's consumer holds in memory before
/// it pauses its retry topic, unless `?retry_hold=` says otherwise.
pub const DEFAULT_RETRY_HOLD: usize = 10_000;
/// The most payload bytes of retried records not due yet a subscription's consumer
/// holds in memory before it pauses its retry topic.
pub const RETRY_HOLD_BYTES: usize = 64 * 1024 * 1024;
/// The in-process lease of a delivery, unless `?lease_ms=` says otherwise.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(30);

/// `linger.ms` unless `?linger_ms=` says otherwise.
const DEFAULT_LINGER_MS: u32 = 5;
/// `session.timeout.ms` on Kafka: librdkafka's default.
const KAFKA_SESSION_TIMEOUT_MS: u32 = 45_000;
/// `session.timeout.ms` on Event Hubs, as Microsoft recommends (allowed 6000–300000).
const EVENTHUBS_SESSION_TIMEOUT_MS: u32 = 30_000;
/// The session timeouts Event Hubs allows.
const EVENTHUBS_SESSION_TIMEOUT_RANGE: RangeInclusive<u32> = 6_000..=300_000;
/// `metadata.max.age.ms` and `connections.max.idle.ms` on Event Hubs: below the 240 s
/// after which Azure drops idle connections.
const EVENTHUBS_IDLE_MS: &str = "180000";
/// `request.timeout.ms` of the producer on Event Hubs (must be above 20000).
const EVENTHUBS_REQUEST_TIMEOUT_MS: &str = "60000";
/// The SASL user name that makes Event Hubs read the password as a connection string.
const EVENTHUBS_SASL_USERNAME: &str = "$ConnectionString";
/// The most in-flight requests idempotence allows (librdkafka: at most 5).
const IDEMPOTENT_MAX_IN_FLIGHT: &str = "5";

/// The parameters of a `kafka://` URL.
const KAFKA_PARAMS: &[&str] = &[
    "mode",
    "retry_hold",
    "partitions",
    "replication",
    "retention_ms",
    "cleanup_policy",
    "max_delivery_attempts",
    "lease_ms",
    "linger_ms",
    "compression",
    "max_message_bytes",
    "client_id",
    "security_protocol",
    "sasl_mechanism",
    "tls_ca",
    "session_timeout_ms",
    "oauth_scope",
    "oauth_ca",
];
/// The parameters of an `eventhubs://` URL: no topic settings (Event Hubs has no
/// admin API for them) and no security choices (always SASL_SSL).
const EVENTHUBS_PARAMS: &[&str] = &[
    "mode",
    "retry_hold",
    "max_delivery_attempts",
    "lease_ms",
    "linger_ms",
    "compression",
    "max_message_bytes",
    "client_id",
    "tls_ca",
    "session_timeout_ms",
    "auth",
    "oauth_ca",
];

/// Which service a configuration talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    /// Apache Kafka or a compatible broker (Amazon MSK, Redpanda, …), from `kafka://`.
    Kafka,
    /// The Kafka endpoint of an Azure Event Hubs namespace, from `eventhubs://`: no
    /// admin API for topics, compression `none` or `gzip` only, smaller requests.
    EventHubs,
}

impl Flavor {
    /// The URL scheme of the flavour.
    fn scheme(self) -> &'static str {
        match self {
            Flavor::Kafka => "kafka",
            Flavor::EventHubs => "eventhubs",
        }
    }
}

/// A secret value: kept out of Debug output, logs and errors.
#[derive(Clone, PartialEq, Eq)]
struct Secret(String);

impl Secret {
    /// The value, for the one place that hands it to librdkafka.
    fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// librdkafka's `security.protocol`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SecurityProtocol {
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl SecurityProtocol {
    fn from_param(value: &str) -> Option<Self> {
        match value {
            "plaintext" => Some(SecurityProtocol::Plaintext),
            "ssl" => Some(SecurityProtocol::Ssl),
            "sasl_plaintext" => Some(SecurityProtocol::SaslPlaintext),
            "sasl_ssl" => Some(SecurityProtocol::SaslSsl),
            _ => None,
        }
    }
    fn as_setting(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "PLAINTEXT",
            SecurityProtocol::Ssl => "SSL",
            SecurityProtocol::SaslPlaintext => "SASL_PLAINTEXT",
            SecurityProtocol::SaslSsl => "SASL_SSL",
        }
    }
    /// Whether the connection is TLS (with the broker's certificate verified:
    /// nothing here turns verification off).
    fn encrypted(self) -> bool {
        matches!(self, SecurityProtocol::Ssl | SecurityProtocol::SaslSsl)
    }
    fn sasl(self) -> bool {
        matches!(
            self,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        )
    }
}

/// librdkafka's `sasl.mechanism`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SaslMechanism {
    Plain,
    ScramSha256,
    ScramSha512,
    OAuthBearer,
}

impl SaslMechanism {
    const NAMES: &'static [&'static str] =
        &["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"];

    fn from_param(value: &str) -> Option<Self> {
        match value {
            "PLAIN" => Some(SaslMechanism::Plain),
            "SCRAM-SHA-256" => Some(SaslMechanism::ScramSha256),
            "SCRAM-SHA-512" => Some(SaslMechanism::ScramSha512),
            "OAUTHBEARER" => Some(SaslMechanism::OAuthBearer),
            _ => None,
        }
    }
    fn as_setting(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
            SaslMechanism::OAuthBearer => "OAUTHBEARER",
        }
    }
}

/// How the client authenticates over SASL.
#[derive(Clone, Debug)]
enum Sasl {
    /// A user name and password (PLAIN or SCRAM); on Event Hubs the user name
    /// `$ConnectionString` and the connection string as the password.
    Password {
        mechanism: SaslMechanism,
        username: String,
        password: Secret,
    },
    /// OAUTHBEARER with tokens librdkafka fetches and renews itself
    /// (`sasl.oauthbearer.method=oidc`): the OAuth 2.0 client-credentials grant of
    /// `client_id` and `client_secret` at `token_endpoint` (https), for `scope`.
    Oidc {
        client_id: String,
        client_secret: Secret,
        token_endpoint: String,
        scope: Option<String>,
    },
}

/// Connection settings from a URL, for Kafka, Azure Event Hubs and Amazon MSK.
///
/// Its Debug output shows `<redacted>` in place of a SASL password, connection
/// string or OAuth client secret; Display shows the flavour, the servers and the
/// security in one line.
/// [`client_settings`](Self::client_settings) and the settings built on it do hold
/// the secret (librdkafka needs it): never log them as they are (see
/// [`is_secret_setting`]).
#[derive(Clone, Debug)]
pub struct KafkaConfig {
    flavor: Flavor,
    bootstrap_servers: String,
    security_protocol: SecurityProtocol,
    sasl: Option<Sasl>,
    tls_ca: Option<String>,
    /// A CA file for the OAuth token endpoint (`https.ca.location`).
    oauth_ca: Option<String>,
    client_id: String,
    content_mode: ContentMode,
    topic_partitions: i32,
    /// Whether the URL set `partitions` (a plan compares it only then).
    topic_partitions_given: bool,
    topic_replication: i32,
    retention_ms: Option<i64>,
    cleanup_policy: Option<&'static str>,
    max_delivery_attempts: Option<u32>,
    lease: Duration,
    linger_ms: u32,
    compression: &'static str,
    max_message_bytes: usize,
    session_timeout_ms: u32,
    retry_hold: usize,
}

impl KafkaConfig {
    /// From `kafka://host:port[,host:port...][?params]`, `kafka://` (bootstrap servers from KAFKA_BOOTSTRAP_SERVERS), or
    /// `eventhubs://NAMESPACE.servicebus.windows.net[?params]` / `eventhubs://` (namespace from EVENTHUBS_CONNECTION_STRING's Endpoint).
    ///
    /// Parameters of both: `mode=binary|structured`, `max_delivery_attempts`,
    /// `lease_ms`, `retry_hold` (retries held in memory before the retry topic is
    /// paused), `linger_ms`, `compression`, `max_message_bytes`, `client_id`,
    /// `tls_ca` (a CA file for `ssl.ca.location`), `session_timeout_ms`, `oauth_ca` (a CA
    /// file for the OAuth token endpoint, `https.ca.location`; with OAUTHBEARER or
    /// `auth=entra` only, else the system's CAs). Of
    /// `kafka://` only: `partitions`, `replication`, `retention_ms`,
    /// `cleanup_policy=delete|compact`, `security_protocol=plaintext|ssl|sasl_plaintext|sasl_ssl`,
    /// `sasl_mechanism=PLAIN|SCRAM-SHA-256|SCRAM-SHA-512|OAUTHBEARER`, `oauth_scope`
    /// (with OAUTHBEARER only). Of `eventhubs://` only: `auth=connection_string|entra`.
    /// Any other parameter is `InvalidArgument`.
    ///
    /// **Kafka security.** `security_protocol` defaults to `sasl_ssl` when a
    /// `sasl_mechanism` is given (Amazon MSK with SCRAM:
    /// `kafka://b-1.x.kafka.us-east-1.amazonaws.com:9096?sasl_mechanism=SCRAM-SHA-512`),
    /// else to `ssl` with a `tls_ca`, else `plaintext`. PLAIN and SCRAM take
    /// `KAFKA_SASL_USERNAME` and `KAFKA_SASL_PASSWORD` (PermissionDenied when one is
    /// missing). OAUTHBEARER takes neither: librdkafka fetches its tokens itself
    /// (`sasl.oauthbearer.method=oidc`, the OAuth 2.0 client-credentials grant) from
    /// the token endpoint of `KAFKA_OAUTH_TOKEN_ENDPOINT` (https only, else
    /// `InvalidArgument`) with `KAFKA_OAUTH_CLIENT_ID` and `KAFKA_OAUTH_CLIENT_SECRET`
    /// (PermissionDenied naming the ones missing), for the scopes of `?oauth_scope=`
    /// if given (space-separated: `?oauth_scope=kafka+profile`). Credentials in the
    /// URL (`user:pass@`, or any `@`: write `%40` in a parameter value) are refused,
    /// and so are credentials or a SASL mechanism
    /// over `plaintext`/`sasl_plaintext`: credentials never travel unencrypted. No
    /// parameter turns certificate verification off.
    ///
    /// **Event Hubs** (Microsoft's "Apache Kafka client configurations for Azure Event
    /// Hubs"): bootstrap `NAMESPACE:9093`, SASL_SSL, PLAIN with user name
    /// `$ConnectionString` and the connection string of `EVENTHUBS_CONNECTION_STRING`
    /// as the password (PermissionDenied when it is not set); its Endpoint must name
    /// the URL's namespace.
    ///
    /// **Event Hubs with Microsoft Entra ID** (`?auth=entra`): OAUTHBEARER with
    /// tokens librdkafka fetches itself (`sasl.oauthbearer.method=oidc`) with the
    /// client-credentials grant of a service principal, read from the variables
    /// azure-identity's EnvironmentCredential reads: `AZURE_TENANT_ID` (a GUID or a
    /// domain), `AZURE_CLIENT_ID`, `AZURE_CLIENT_SECRET` (PermissionDenied naming the
    /// ones missing), and `AZURE_AUTHORITY_HOST` (default
    /// `https://login.microsoftonline.com`; https only, else `InvalidArgument`). The
    /// token endpoint is `{AZURE_AUTHORITY_HOST}/{AZURE_TENANT_ID}/oauth2/v2.0/token`
    /// and the scope `https://NAMESPACE.servicebus.windows.net/.default` (for Kafka
    /// clients the token's resource is the namespace, not `https://eventhubs.azure.net/`).
    /// The principal needs an Event Hubs data role (Azure Event Hubs Data Sender /
    /// Receiver / Owner). No connection string is needed, but the namespace must be in
    /// the URL or the Endpoint of `EVENTHUBS_CONNECTION_STRING` (whose key is then not
    /// used). Client certificates and managed identities are not read.
    pub fn from_url(url: &str) -> Result<Self> {
        Self::from_url_with_env(url, &env_var)
    }

    /// The same, with the environment given as a lookup (for tests): `env("KAFKA_BOOTSTRAP_SERVERS")` etc.
    /// A blank value counts as unset.
    pub fn from_url_with_env(url: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Self> {
        let env = |name: &str| env(name).filter(|value| !value.trim().is_empty());
        let parts = split_url(url)?;
        let flavor = parts.flavor;
        let scheme = flavor.scheme();
        let known = match flavor {
            Flavor::Kafka => KAFKA_PARAMS,
            Flavor::EventHubs => EVENTHUBS_PARAMS,
        };
        let params = UrlParams::parse(&query_url(scheme, parts.query)?, known)?;

        let mut config = KafkaConfig {
            flavor,
            bootstrap_servers: String::new(),
            security_protocol: SecurityProtocol::Plaintext,
            sasl: None,
            tls_ca: None,
            oauth_ca: None,
            client_id: DEFAULT_CLIENT_ID.to_owned(),
            content_mode: ContentMode::Binary,
            topic_partitions: DEFAULT_TOPIC_PARTITIONS,
            topic_partitions_given: false,
            topic_replication: -1,
            retention_ms: None,
            cleanup_policy: None,
            max_delivery_attempts: None,
            lease: DEFAULT_LEASE,
            linger_ms: DEFAULT_LINGER_MS,
            compression: "none",
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            session_timeout_ms: match flavor {
                Flavor::Kafka => KAFKA_SESSION_TIMEOUT_MS,
                Flavor::EventHubs => EVENTHUBS_SESSION_TIMEOUT_MS,
            },
            retry_hold: DEFAULT_RETRY_HOLD,
        };
        config.tls_ca = ca_file(&params, "tls_ca", scheme)?;
        config.oauth_ca = ca_file(&params, "oauth_ca", scheme)?;
        match flavor {
            Flavor::Kafka => config.read_kafka(parts.authority, &params, &env)?,
            Flavor::EventHubs => config.read_eventhubs(parts.authority, &params, &env)?,
        }
        if config.oauth_ca.is_some() && !matches!(config.sasl, Some(Sasl::Oidc { .. })) {
            return Err(Error::invalid(format!(
                "{scheme}:// URL parameter oauth_ca is the CA of an OAuth token endpoint: it needs {}",
                match flavor {
                    Flavor::Kafka => "sasl_mechanism=OAUTHBEARER",
                    Flavor::EventHubs => "auth=entra",
                }
            )));
        }
        config.read_common(&params)?;
        Ok(config)
    }

    /// The servers and security of a `kafka://` URL.
    fn read_kafka(
        &mut self,
        authority: &str,
        params: &UrlParams,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<()> {
        self.bootstrap_servers = if authority.is_empty() {
            let Some(servers) = env(BOOTSTRAP_SERVERS_ENV) else {
                return Err(Error::invalid(format!(
                    "kafka:// names no bootstrap servers and {BOOTSTRAP_SERVERS_ENV} is not set: use kafka://HOST:PORT[,HOST:PORT...] or set {BOOTSTRAP_SERVERS_ENV}"
                )));
            };
            bootstrap_list(&servers, BOOTSTRAP_SERVERS_ENV)?
        } else {
            bootstrap_list(authority, "the kafka:// URL")?
        };

        let protocol = params
            .choice(
                "security_protocol",
                &["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"],
            )?
            .and_then(SecurityProtocol::from_param);
        let mechanism = params
            .choice("sasl_mechanism", SaslMechanism::NAMES)?
            .and_then(SaslMechanism::from_param);
        let username = env(SASL_USERNAME_ENV);
        let password = env(SASL_PASSWORD_ENV).map(Secret);
        let protocol = match (protocol, mechanism) {
            (Some(protocol), _) => protocol,
            (None, Some(_)) => SecurityProtocol::SaslSsl,
            (None, None) if self.tls_ca.is_some() => SecurityProtocol::Ssl,
            (None, None) => SecurityProtocol::Plaintext,
        };
        // Credentials (a password, or the token of any SASL mechanism) only over TLS.
        if (password.is_some() || mechanism.is_some()) && !protocol.encrypted() {
            return Err(Error::invalid(format!(
                "credentials would travel unencrypted: kafka:// with security_protocol={} carries {}; use security_protocol=sasl_ssl",
                protocol.as_setting().to_ascii_lowercase(),
                if password.is_some() {
                    format!("the password of {SASL_PASSWORD_ENV}")
                } else {
                    "SASL credentials".to_owned()
                }
            )));
        }
        if self.tls_ca.is_some() && !protocol.encrypted() {
            return Err(Error::invalid(format!(
                "kafka:// URL parameter tls_ca needs security_protocol ssl or sasl_ssl, not {}",
                protocol.as_setting().to_ascii_lowercase()
            )));
        }
        self.security_protocol = protocol;
        let scope = params.get("oauth_scope");
        if scope.is_some() && mechanism != Some(SaslMechanism::OAuthBearer) {
            return Err(Error::invalid(
                "kafka:// URL parameter oauth_scope needs sasl_mechanism=OAUTHBEARER",
            ));
        }
        self.sasl = match (protocol.sasl(), mechanism) {
            (false, None) => {
                if username.is_some() || password.is_some() {
                    return Err(Error::invalid(format!(
                        "{SASL_USERNAME_ENV}/{SASL_PASSWORD_ENV} are set but the kafka:// URL names no ?sasl_mechanism= to use them with (PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512)"
                    )));
                }
                None
            }
            (false, Some(mechanism)) => {
                return Err(Error::invalid(format!(
                    "kafka:// URL parameter sasl_mechanism={} needs security_protocol=sasl_ssl, not {}",
                    mechanism.as_setting(),
                    protocol.as_setting().to_ascii_lowercase()
                )));
            }
            (true, None) => {
                return Err(Error::invalid(format!(
                    "kafka:// URL parameter security_protocol={} needs ?sasl_mechanism= (one of {})",
                    protocol.as_setting().to_ascii_lowercase(),
                    SaslMechanism::NAMES.join(", ")
                )));
            }
            (true, Some(SaslMechanism::OAuthBearer)) => {
                if username.is_some() || password.is_some() {
                    return Err(Error::invalid(format!(
                        "sasl_mechanism=OAUTHBEARER authenticates with tokens, not {SASL_USERNAME_ENV}/{SASL_PASSWORD_ENV}: unset them"
                    )));
                }
                Some(kafka_oidc(scope, env)?)
            }
            (true, Some(mechanism)) => match (username, password) {
                (Some(username), Some(password)) => Some(Sasl::Password {
                    mechanism,
                    username,
                    password,
                }),
                (None, _) => {
                    return Err(Error::new(
                        ErrorKind::PermissionDenied,
                        format!(
                            "sasl_mechanism={} needs a user name: set {SASL_USERNAME_ENV}",
                            mechanism.as_setting()
                        ),
                    ));
                }
                (Some(_), None) => {
                    return Err(Error::new(
                        ErrorKind::PermissionDenied,
                        format!(
                            "sasl_mechanism={} needs a password: set {SASL_PASSWORD_ENV}",
                            mechanism.as_setting()
                        ),
                    ));
                }
            },
        };

        if let Some(partitions) = ranged(params, "kafka", "partitions", 1..=i32::MAX)? {
            self.topic_partitions = partitions;
            self.topic_partitions_given = true;
        }
        if let Some(replication) = params.parsed::<i32>("replication")? {
            if replication != -1 && replication < 1 {
                return Err(Error::invalid(format!(
                    "kafka:// URL parameter replication={replication} must be -1 (the broker's default) or at least 1"
                )));
            }
            self.topic_replication = replication;
        }
        self.retention_ms = ranged(params, "kafka", "retention_ms", -1..=i64::MAX)?;
        self.cleanup_policy = params.choice("cleanup_policy", &["delete", "compact"])?;
        Ok(())
    }

    /// The namespace and credential of an `eventhubs://` URL.
    fn read_eventhubs(
        &mut self,
        authority: &str,
        params: &UrlParams,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<()> {
        let url_namespace = if authority.is_empty() {
            None
        } else {
            Some(eventhubs_namespace(authority)?)
        };
        let connection_string = env(EVENTHUBS_CONNECTION_STRING_ENV);
        let entra = params.choice("auth", &["connection_string", "entra"])? == Some("entra");
        let namespace = if entra {
            // Microsoft Entra ID: OAUTHBEARER with tokens librdkafka fetches (OIDC).
            let namespace = match (url_namespace, connection_string) {
                (Some(namespace), _) => namespace,
                (None, Some(text)) => parse_connection_string(&text)?,
                (None, None) => {
                    return Err(Error::invalid(format!(
                        "eventhubs://?auth=entra needs the namespace: use eventhubs://NAMESPACE.servicebus.windows.net?auth=entra (or set {EVENTHUBS_CONNECTION_STRING_ENV})"
                    )));
                }
            };
            self.sasl = Some(entra_oidc(&namespace, env)?);
            namespace
        } else {
            let Some(text) = connection_string else {
                return Err(Error::new(
                    ErrorKind::PermissionDenied,
                    format!(
                        "Event Hubs needs the namespace's connection string: set {EVENTHUBS_CONNECTION_STRING_ENV} (or use ?auth=entra for Microsoft Entra ID)"
                    ),
                ));
            };
            let namespace = parse_connection_string(&text)?;
            if let Some(url_namespace) = url_namespace
                && url_namespace != namespace
            {
                return Err(Error::invalid(format!(
                    "the eventhubs:// URL names namespace {url_namespace} but the Endpoint of {EVENTHUBS_CONNECTION_STRING_ENV} is namespace {namespace}"
                )));
            }
            self.sasl = Some(Sasl::Password {
                mechanism: SaslMechanism::Plain,
                username: EVENTHUBS_SASL_USERNAME.to_owned(),
                password: Secret(text),
            });
            namespace
        };
        self.bootstrap_servers = format!("{namespace}:{EVENTHUBS_KAFKA_PORT}");
        self.security_protocol = SecurityProtocol::SaslSsl;
        Ok(())
    }

    /// The parameters both flavours take.
    fn read_common(&mut self, params: &UrlParams) -> Result<()> {
        let scheme = self.flavor.scheme();
        if let Some(mode) = params.choice("mode", &["binary", "structured"])? {
            self.content_mode = match mode {
                "structured" => ContentMode::Structured,
                _ => ContentMode::Binary,
            };
        }
        self.max_delivery_attempts = ranged(params, scheme, "max_delivery_attempts", 1..=u32::MAX)?;
        if let Some(ms) = ranged(params, scheme, "lease_ms", 1..=u64::MAX)? {
            self.lease = Duration::from_millis(ms);
        }
        if let Some(n) = ranged(params, scheme, "retry_hold", 1..=1_000_000)? {
            self.retry_hold = n;
        }
        if let Some(ms) = ranged(params, scheme, "linger_ms", 0..=900_000)? {
            self.linger_ms = ms;
        }
        if let Some(compression) =
            params.choice("compression", &["none", "gzip", "snappy", "lz4", "zstd"])?
        {
            if self.flavor == Flavor::EventHubs && !matches!(compression, "none" | "gzip") {
                return Err(Error::invalid(format!(
                    "Event Hubs supports compression none or gzip only, not {compression}"
                )));
            }
            self.compression = compression;
        }
        let max_bytes = match self.flavor {
            Flavor::Kafka => 1_000..=1_000_000_000,
            Flavor::EventHubs => 1_000..=EVENTHUBS_MAX_REQUEST_BYTES - 1,
        };
        if let Some(bytes) = ranged(params, scheme, "max_message_bytes", max_bytes)? {
            self.max_message_bytes = bytes;
        }
        if let Some(id) = params.get("client_id") {
            if id.is_empty() || id.chars().any(char::is_control) {
                return Err(Error::invalid(format!(
                    "{scheme}:// URL parameter client_id must be non-empty printable text"
                )));
            }
            self.client_id = id.to_owned();
        }
        let session_range = match self.flavor {
            Flavor::Kafka => 1..=3_600_000,
            Flavor::EventHubs => EVENTHUBS_SESSION_TIMEOUT_RANGE,
        };
        if let Some(ms) = ranged(params, scheme, "session_timeout_ms", session_range)? {
            self.session_timeout_ms = ms;
        }
        Ok(())
    }

    /// Which service this configuration talks to.
    pub fn flavor(&self) -> Flavor {
        self.flavor
    }

    /// The URL scheme this configuration was read from: `kafka` or `eventhubs`.
    pub fn scheme(&self) -> &'static str {
        self.flavor.scheme()
    }

    /// The bootstrap servers, `host:port[,host:port...]`.
    pub fn bootstrap_servers(&self) -> &str {
        &self.bootstrap_servers
    }

    /// The content mode events are published in (`?mode=binary|structured`, default
    /// binary); consumers read both.
    pub fn content_mode(&self) -> ContentMode {
        self.content_mode
    }

    /// Partitions of the topics topology creates (`?partitions=N`, default 3).
    pub fn topic_partitions(&self) -> i32 {
        self.topic_partitions
    }

    /// Replication factor of the topics topology creates (`?replication=N`, default
    /// -1: the broker's `default.replication.factor`).
    pub fn topic_replication(&self) -> i32 {
        self.topic_replication
    }

    /// Topic configuration of the topics topology creates: `retention.ms` from
    /// `?retention_ms=` (-1: forever) and `cleanup.policy` from
    /// `?cleanup_policy=delete|compact`, only those given.
    ///
    /// With `compact`, mind that a binary-mode event without data is a record
    /// without value, a tombstone (CloudEvents Kafka binding, 3.2.2), and that
    /// compacted topics refuse records without a key.
    pub fn topic_configs(&self) -> Vec<(String, String)> {
        self.declared_topic_settings()
            .into_iter()
            .filter(|(name, _)| TOPIC_CONFIG_NAMES.contains(name))
            .map(|(name, value)| (name.to_owned(), value))
            .collect()
    }

    /// The topic settings the URL declares, as a topology plan compares them with a
    /// topic's (Kafka's names): `partitions` when `?partitions=` is given,
    /// `replication` when `?replication=` is at least 1, and the topic configs of
    /// [`topic_configs`](Self::topic_configs). What the URL leaves to the broker is
    /// not compared.
    ///
    /// ```
    /// use cloudbus_kafka::KafkaConfig;
    /// let c = KafkaConfig::from_url("kafka://127.0.0.1:9092?partitions=6&retention_ms=3600000").unwrap();
    /// assert_eq!(
    ///     c.declared_topic_settings(),
    ///     [("partitions", "6".to_owned()), ("retention.ms", "3600000".to_owned())]
    /// );
    /// assert!(KafkaConfig::from_url("kafka://127.0.0.1:9092").unwrap().declared_topic_settings().is_empty());
    /// ```
    pub fn declared_topic_settings(&self) -> Vec<(&'static str, String)> {
        let mut settings = Vec::new();
        if self.topic_partitions_given {
            settings.push(("partitions", self.topic_partitions.to_string()));
        }
        if self.topic_replication >= 1 {
            settings.push(("replication", self.topic_replication.to_string()));
        }
        if let Some(ms) = self.retention_ms {
            settings.push(("retention.ms", ms.to_string()));
        }
        if let Some(policy) = self.cleanup_policy {
            settings.push(("cleanup.policy", policy.to_owned()));
        }
        settings
    }

    /// `?max_delivery_attempts=N`: the default for subscriptions this process did not
    /// ensure itself; `None` = unlimited.
    pub fn max_delivery_attempts(&self) -> Option<u32> {
        self.max_delivery_attempts
    }

    /// The in-process lease of a delivery (`?lease_ms=N`, default 30000).
    pub fn lease(&self) -> Duration {
        self.lease
    }

    /// How many retried records not due yet a subscription's consumer holds in
    /// memory (and at most 64 MiB of them) before it pauses its retry
    /// topic until half are due (`?retry_hold=N`, default 10,000).
    pub fn retry_hold(&self) -> usize {
        self.retry_hold
    }

    /// How long a consumer group member may go without a heartbeat before the
    /// coordinator gives its partitions to the others (`?session_timeout_ms=`).
    pub fn session_timeout(&self) -> Duration {
        Duration::from_millis(u64::from(self.session_timeout_ms))
    }

    /// Whether topics can be created and configured with Kafka's admin API: not on
    /// Event Hubs, where topology only checks that an event hub exists.
    pub fn admin_api(&self) -> bool {
        self.flavor == Flavor::Kafka
    }

    /// The largest encoded record: `message.max.bytes` of the producer, which must
    /// agree with it (`?max_message_bytes=N`, default 1,000,000; on Event Hubs below
    /// its 1,046,528-byte request limit).
    pub fn max_message_bytes(&self) -> usize {
        self.max_message_bytes
    }

    /// librdkafka properties common to every client: bootstrap.servers, client.id, security, and the flavour's settings.
    ///
    /// They hold the SASL password, connection string or OAuth client secret: do not
    /// log them as they are ([`is_secret_setting`]). With OAUTHBEARER they are
    /// `sasl.oauthbearer.method=oidc` and its client ID, client secret, token
    /// endpoint and scope: librdkafka (built with libcurl) fetches and renews the
    /// tokens on its background thread.
    pub fn client_settings(&self) -> Vec<(String, String)> {
        let mut settings = vec![
            setting("bootstrap.servers", &self.bootstrap_servers),
            setting("client.id", &self.client_id),
            setting("security.protocol", self.security_protocol.as_setting()),
            // Topics are made by the topology, never by a send or a subscribe
            // (librdkafka's producer would ask the broker to create them).
            setting("allow.auto.create.topics", "false"),
        ];
        match &self.sasl {
            None => {}
            Some(Sasl::Oidc {
                client_id,
                client_secret,
                token_endpoint,
                scope,
            }) => {
                settings.push(setting(
                    "sasl.mechanism",
                    SaslMechanism::OAuthBearer.as_setting(),
                ));
                settings.push(setting("sasl.oauthbearer.method", "oidc"));
                settings.push(setting("sasl.oauthbearer.client.id", client_id));
                settings.push(setting(
                    "sasl.oauthbearer.client.secret",
                    client_secret.expose(),
                ));
                settings.push(setting(
                    "sasl.oauthbearer.token.endpoint.url",
                    token_endpoint,
                ));
                if let Some(scope) = scope {
                    settings.push(setting("sasl.oauthbearer.scope", scope));
                }
                // The token endpoint is verified against the system's CAs unless
                // `?oauth_ca=` names one (a private identity provider); the broker's
                // `tls_ca` is not used for it.
                if let Some(path) = &self.oauth_ca {
                    settings.push(setting("https.ca.location", path));
                }
            }
            Some(Sasl::Password {
                mechanism,
                username,
                password,
            }) => {
                settings.push(setting("sasl.mechanism", mechanism.as_setting()));
                settings.push(setting("sasl.username", username));
                settings.push(setting("sasl.password", password.expose()));
            }
        }
        if let Some(path) = &self.tls_ca {
            settings.push(setting("ssl.ca.location", path));
        }
        if self.flavor == Flavor::EventHubs {
            // Azure drops connections idle for 240 s: keep-alives, and metadata
            // refreshes and idle closes before that.
            settings.push(setting("socket.keepalive.enable", "true"));
            settings.push(setting("metadata.max.age.ms", EVENTHUBS_IDLE_MS));
            settings.push(setting("connections.max.idle.ms", EVENTHUBS_IDLE_MS));
        }
        settings
    }

    /// For the producer: client_settings + enable.idempotence=true, acks=all, linger.ms (?linger_ms, default 5), compression.type (?compression=none|gzip|snappy|lz4|zstd, default none; Event Hubs allows only none|gzip → InvalidArgument otherwise), message.max.bytes, max.in.flight.requests.per.connection as idempotence requires.
    ///
    /// On Event Hubs also `request.timeout.ms=60000`, which Microsoft recommends and
    /// which its advice to keep idempotence enabled requires. [`from_url`](Self::from_url)
    /// already refuses a compression Event Hubs does not take; this checks it again.
    pub fn producer_settings(&self) -> Result<Vec<(String, String)>> {
        if self.flavor == Flavor::EventHubs && !matches!(self.compression, "none" | "gzip") {
            return Err(Error::invalid(format!(
                "Event Hubs supports compression none or gzip only, not {}",
                self.compression
            )));
        }
        let mut settings = self.client_settings();
        settings.extend([
            setting("enable.idempotence", "true"),
            setting("acks", "all"),
            setting(
                "max.in.flight.requests.per.connection",
                IDEMPOTENT_MAX_IN_FLIGHT,
            ),
            setting("linger.ms", &self.linger_ms.to_string()),
            setting("compression.type", self.compression),
            setting("message.max.bytes", &self.max_message_bytes.to_string()),
        ]);
        if self.flavor == Flavor::EventHubs {
            settings.push(setting("request.timeout.ms", EVENTHUBS_REQUEST_TIMEOUT_MS));
        }
        Ok(settings)
    }

    /// For a consumer of `group`: client_settings + group.id, enable.auto.commit=false, enable.auto.offset.store=false, auto.offset.reset=earliest, session.timeout.ms, isolation.level=read_committed, enable.partition.eof=false, fetch.wait.max.ms (500 ms, librdkafka's default made explicit).
    ///
    /// `session.timeout.ms` is `?session_timeout_ms=`, else 45000 on Kafka
    /// (librdkafka's default) and 30000 on Event Hubs (Microsoft's recommendation).
    pub fn consumer_settings(&self, group: &str) -> Vec<(String, String)> {
        let mut settings = self.client_settings();
        settings.extend([
            setting("group.id", group),
            setting("enable.auto.commit", "false"),
            setting("enable.auto.offset.store", "false"),
            setting("auto.offset.reset", "earliest"),
            setting("session.timeout.ms", &self.session_timeout_ms.to_string()),
            setting("isolation.level", "read_committed"),
            setting("enable.partition.eof", "false"),
            setting("fetch.wait.max.ms", &FETCH_WAIT.as_millis().to_string()),
        ]);
        settings
    }
}

impl fmt::Display for KafkaConfig {
    /// `kafka://HOSTS (SECURITY[ MECHANISM])`, without secrets.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}://{} ({}",
            self.flavor.scheme(),
            self.bootstrap_servers,
            self.security_protocol.as_setting()
        )?;
        match &self.sasl {
            None => {}
            Some(Sasl::Oidc { .. }) => write!(f, " {}", SaslMechanism::OAuthBearer.as_setting())?,
            Some(Sasl::Password { mechanism, .. }) => write!(f, " {}", mechanism.as_setting())?,
        }
        f.write_str(")")
    }
}

/// Whether a librdkafka property holds a secret, so that settings can be logged with
/// its value replaced.
pub fn is_secret_setting(name: &str) -> bool {
    matches!(
        name,
        "sasl.password"
            | "ssl.key.password"
            | "ssl.key.pem"
            | "ssl.keystore.password"
            | "sasl.oauthbearer.client.secret"
            | "sasl.oauthbearer.client.credentials.client.secret"
            | "sasl.oauthbearer.assertion.private.key.passphrase"
            | "sasl.oauthbearer.assertion.private.key.pem"
    )
}

/// The CA certificate file URL parameter `name` names, if given; an empty one is
/// `InvalidArgument`.
fn ca_file(params: &UrlParams, name: &str, scheme: &str) -> Result<Option<String>> {
    match params.get(name) {
        Some(path) if path.trim().is_empty() => Err(Error::invalid(format!(
            "{scheme}:// URL parameter {name} must name a CA certificate file"
        ))),
        other => Ok(other.map(str::to_owned)),
    }
}

fn setting(name: &str, value: &str) -> (String, String) {
    (name.to_owned(), value.to_owned())
}

/// A parameter parsed as `T` and within `range`.
fn ranged<T>(
    params: &UrlParams,
    scheme: &str,
    name: &str,
    range: RangeInclusive<T>,
) -> Result<Option<T>>
where
    T: FromStr + PartialOrd + fmt::Display,
{
    match params.parsed::<T>(name)? {
        Some(value) if !range.contains(&value) => Err(Error::invalid(format!(
            "{scheme}:// URL parameter {name}={value} is out of range {}..={}",
            range.start(),
            range.end()
        ))),
        value => Ok(value),
    }
}

/// A URL cut into its parts by hand: `url::Url` cannot parse a comma-separated list
/// of hosts.
struct UrlParts<'a> {
    flavor: Flavor,
    /// Everything between `://` and the first `/`, `?` or `#`.
    authority: &'a str,
    /// The query without `?`, if any.
    query: Option<&'a str>,
}

/// Splits `scheme://authority[/][?query]`. Nothing of the URL but its scheme goes into
/// an error message before the authority is known to hold no credentials.
fn split_url(url: &str) -> Result<UrlParts<'_>> {
    let url = url.trim();
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(Error::invalid(
            "expected kafka://HOST:PORT[,HOST:PORT...][?params] or eventhubs://NAMESPACE.servicebus.windows.net[?params]",
        ));
    };
    let flavor = if scheme.eq_ignore_ascii_case("kafka") {
        Flavor::Kafka
    } else if scheme.eq_ignore_ascii_case("eventhubs") {
        Flavor::EventHubs
    } else {
        // The scheme is not echoed: whatever precedes "://" could be anything.
        return Err(Error::invalid(
            "unsupported URL scheme: expected kafka:// or eventhubs://",
        ));
    };
    let scheme = flavor.scheme();
    if rest.contains('@') {
        return Err(Error::invalid(format!(
            "a {scheme}:// URL must not contain '@': credentials never go in a URL (set {SASL_USERNAME_ENV} and {SASL_PASSWORD_ENV}, or {EVENTHUBS_CONNECTION_STRING_ENV}; write %40 in a parameter value)"
        )));
    }
    if rest.contains('#') {
        return Err(Error::invalid(format!(
            "a {scheme}:// URL takes no fragment ('#')"
        )));
    }
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, after) = rest.split_at(authority_end);
    let (path, query) = match after.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (after, None),
    };
    if !path.is_empty() && path != "/" {
        return Err(Error::invalid(format!(
            "a {scheme}:// URL takes no path (got {path:?}): topics are named when publishing and subscribing"
        )));
    }
    Ok(UrlParts {
        flavor,
        authority,
        query,
    })
}

/// A URL that carries only the query, for [`UrlParams::parse`].
fn query_url(scheme: &str, query: Option<&str>) -> Result<url::Url> {
    let text = match query {
        Some(query) => format!("{scheme}://placeholder?{query}"),
        None => format!("{scheme}://placeholder"),
    };
    url::Url::parse(&text).map_err(|e| {
        Error::with_source(
            ErrorKind::InvalidArgument,
            format!("the parameters of the {scheme}:// URL cannot be parsed"),
            e,
        )
    })
}

/// A comma-separated `host:port` list from `origin` (the URL or an environment
/// variable), normalized (no blanks).
fn bootstrap_list(list: &str, origin: &str) -> Result<String> {
    let mut servers = Vec::new();
    for entry in list.split(',').map(str::trim) {
        if entry.is_empty() {
            return Err(Error::invalid(format!(
                "the bootstrap server list of {origin} has an empty entry"
            )));
        }
        let (host, port) = host_and_port(entry, origin)?;
        let Some(port) = port else {
            return Err(Error::invalid(format!(
                "bootstrap server {entry:?} of {origin} has no port (expected HOST:PORT)"
            )));
        };
        servers.push(format!("{host}:{port}"));
    }
    Ok(servers.join(","))
}

/// `host[:port]` or `[ipv6][:port]`: the host as written (IPv6 in brackets) and the
/// port, if any; anything else is InvalidArgument naming the entry.
fn host_and_port<'a>(entry: &'a str, origin: &str) -> Result<(&'a str, Option<u16>)> {
    let bad = |why: &str| {
        Error::invalid(format!(
            "bootstrap server {entry:?} of {origin} is not HOST:PORT: {why}"
        ))
    };
    let (host, port) = if let Some(bracketed) = entry.strip_prefix('[') {
        let Some((address, rest)) = bracketed.split_once(']') else {
            return Err(bad("an IPv6 address without ']'"));
        };
        if address.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(bad("not an IPv6 address in brackets"));
        }
        let port = match rest {
            "" => None,
            _ => match rest.strip_prefix(':') {
                Some(port) => Some(port),
                None => return Err(bad("unexpected text after ']'")),
            },
        };
        // `[address]`, brackets included.
        (&entry[..address.len() + 2], port)
    } else {
        match entry.rsplit_once(':') {
            Some((host, _)) if host.contains(':') => {
                return Err(bad("an IPv6 address must be in brackets, as [::1]:9092"));
            }
            Some((host, port)) => (host, Some(port)),
            None => (entry, None),
        }
    };
    if !host.starts_with('[') {
        let valid = !host.is_empty()
            && host.len() <= 253
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
        if !valid {
            return Err(bad("the host is not a host name or an IPv4 address"));
        }
    }
    let port = match port {
        None => None,
        Some(text) => match text.parse::<u16>() {
            Ok(port) if port != 0 => Some(port),
            _ => return Err(bad("the port is not a number from 1 to 65535")),
        },
    };
    Ok((host, port))
}

/// The namespace of an `eventhubs://` URL (its host, lowercase); a port, if given,
/// must be the Kafka endpoint's.
fn eventhubs_namespace(authority: &str) -> Result<String> {
    if authority.contains(',') {
        return Err(Error::invalid(
            "an eventhubs:// URL names one namespace, not a list",
        ));
    }
    let (host, port) = host_and_port(authority, "the eventhubs:// URL")?;
    if let Some(port) = port
        && port != EVENTHUBS_KAFKA_PORT
    {
        return Err(Error::invalid(format!(
            "the Event Hubs Kafka endpoint is on port {EVENTHUBS_KAFKA_PORT}, not {port}"
        )));
    }
    if host.starts_with('[') || !host.contains('.') {
        return Err(Error::invalid(format!(
            "eventhubs:// needs the namespace's host name, as NAMESPACE.servicebus.windows.net (got {host:?})"
        )));
    }
    Ok(host.to_ascii_lowercase())
}

/// Checks an Event Hubs connection string and returns the namespace of its Endpoint
/// (lowercase). No part of the string other than that host goes into an error.
fn parse_connection_string(text: &str) -> Result<String> {
    let env = EVENTHUBS_CONNECTION_STRING_ENV;
    let mut endpoint = None;
    let mut key_name = false;
    let mut key = false;
    let mut signature = false;
    for part in text.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((name, value)) = part.split_once('=') else {
            return Err(Error::invalid(format!(
                "{env} has a part without '=' (expected Endpoint=sb://NAMESPACE.servicebus.windows.net/;SharedAccessKeyName=…;SharedAccessKey=…)"
            )));
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "endpoint" => endpoint = Some(value),
            "sharedaccesskeyname" => key_name = !value.is_empty(),
            "sharedaccesskey" => key = !value.is_empty(),
            "sharedaccesssignature" => signature = !value.is_empty(),
            "usedevelopmentemulator" if value.eq_ignore_ascii_case("true") => {
                return Err(Error::unsupported(format!(
                    "{env} is the Event Hubs emulator's, which eventhubs:// does not support: use kafka://HOST:PORT"
                )));
            }
            // EntityPath and whatever else the service adds are the service's business.
            _ => {}
        }
    }
    let Some(endpoint) = endpoint else {
        return Err(Error::invalid(format!(
            "{env} has no Endpoint=sb://NAMESPACE.servicebus.windows.net/"
        )));
    };
    if !(signature || key_name && key) {
        return Err(Error::invalid(format!(
            "{env} has neither SharedAccessKeyName and SharedAccessKey nor SharedAccessSignature"
        )));
    }
    let host = match (endpoint.get(..5), endpoint.get(5..)) {
        (Some(scheme), Some(rest)) if scheme.eq_ignore_ascii_case("sb://") => rest,
        _ => {
            return Err(Error::invalid(format!(
                "the Endpoint of {env} must start with sb:// (sb://NAMESPACE.servicebus.windows.net/)"
            )));
        }
    };
    let host = host.split('/').next().unwrap_or_default();
    let host = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    let valid = host.contains('.')
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.'));
    if !valid {
        return Err(Error::invalid(format!(
            "the Endpoint of {env} does not name a namespace (sb://NAMESPACE.servicebus.windows.net/)"
        )));
    }
    Ok(host.to_ascii_lowercase())
}

/// The OIDC client credentials of `kafka://…?sasl_mechanism=OAUTHBEARER`: the
/// token endpoint, client ID and secret of `KAFKA_OAUTH_*`, and the scope of
/// `?oauth_scope=`, if given.
fn kafka_oidc(scope: Option<&str>, env: &dyn Fn(&str) -> Option<String>) -> Result<Sasl> {
    let endpoint = env(KAFKA_OAUTH_TOKEN_ENDPOINT_ENV);
    let client_id = env(KAFKA_OAUTH_CLIENT_ID_ENV);
    let client_secret = env(KAFKA_OAUTH_CLIENT_SECRET_ENV);
    let (Some(endpoint), Some(client_id), Some(client_secret)) =
        (&endpoint, &client_id, &client_secret)
    else {
        return Err(missing_credentials(
            "sasl_mechanism=OAUTHBEARER (tokens from an OAuth 2.0 client-credentials grant)",
            &[
                (KAFKA_OAUTH_TOKEN_ENDPOINT_ENV, endpoint.is_none()),
                (KAFKA_OAUTH_CLIENT_ID_ENV, client_id.is_none()),
                (KAFKA_OAUTH_CLIENT_SECRET_ENV, client_secret.is_none()),
            ],
        ));
    };
    let token_endpoint = https_url(endpoint, KAFKA_OAUTH_TOKEN_ENDPOINT_ENV)?;
    let scope = match scope {
        Some(scope) if valid_scope(scope) => Some(scope.to_owned()),
        Some(_) => {
            return Err(Error::invalid(
                "kafka:// URL parameter oauth_scope must be OAuth scopes separated by single spaces (written + in the URL), of printable ASCII other than '\"', '\\', '&', '+' and '%'",
            ));
        }
        None => None,
    };
    Ok(Sasl::Oidc {
        client_id: oauth_client_id(client_id, KAFKA_OAUTH_CLIENT_ID_ENV)?,
        client_secret: Secret(client_secret.clone()),
        token_endpoint: token_endpoint.into(),
        scope,
    })
}

/// The Microsoft Entra ID client credentials of `eventhubs://NAMESPACE?auth=entra`,
/// from the variables of azure-identity's EnvironmentCredential: the token endpoint
/// of the tenant at the authority, and the scope of the namespace's Kafka endpoint.
fn entra_oidc(namespace: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<Sasl> {
    let tenant = env(AZURE_TENANT_ID_ENV);
    let client_id = env(AZURE_CLIENT_ID_ENV);
    let client_secret = env(AZURE_CLIENT_SECRET_ENV);
    let (Some(tenant), Some(client_id), Some(client_secret)) =
        (&tenant, &client_id, &client_secret)
    else {
        return Err(missing_credentials(
            "eventhubs://?auth=entra (a Microsoft Entra ID service principal's client credentials, as azure-identity's EnvironmentCredential reads them)",
            &[
                (AZURE_TENANT_ID_ENV, tenant.is_none()),
                (AZURE_CLIENT_ID_ENV, client_id.is_none()),
                (AZURE_CLIENT_SECRET_ENV, client_secret.is_none()),
            ],
        ));
    };
    // A GUID or a domain (contoso.onmicrosoft.com): it goes into the token
    // endpoint's path, so nothing that could leave its segment ('/', '?', '%', "..").
    let tenant = tenant.trim();
    let valid_tenant = tenant.len() <= 253
        && tenant.starts_with(|c: char| c.is_ascii_alphanumeric())
        && tenant.ends_with(|c: char| c.is_ascii_alphanumeric())
        && !tenant.contains("..")
        && tenant
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.'));
    if !valid_tenant {
        return Err(Error::invalid(format!(
            "{AZURE_TENANT_ID_ENV} is not a Microsoft Entra ID tenant: expected a directory ID (a GUID) or a domain such as contoso.onmicrosoft.com"
        )));
    }
    let authority = env(AZURE_AUTHORITY_HOST_ENV);
    let authority = https_url(
        authority.as_deref().unwrap_or(DEFAULT_AZURE_AUTHORITY_HOST),
        AZURE_AUTHORITY_HOST_ENV,
    )?;
    if authority.query().is_some() {
        return Err(Error::invalid(format!(
            "{AZURE_AUTHORITY_HOST_ENV} takes no query: expected https://HOST, as {DEFAULT_AZURE_AUTHORITY_HOST}"
        )));
    }
    Ok(Sasl::Oidc {
        client_id: oauth_client_id(client_id, AZURE_CLIENT_ID_ENV)?,
        client_secret: Secret(client_secret.clone()),
        token_endpoint: format!(
            "{}/{tenant}/oauth2/v2.0/token",
            authority.as_str().trim_end_matches('/')
        ),
        // For Kafka clients the token's resource is the namespace (Microsoft's
        // "Authenticate an application with Microsoft Entra ID to access Event Hubs
        // resources"); `.default` asks for the roles the principal was given.
        scope: Some(format!("https://{namespace}/.default")),
    })
}

/// PermissionDenied for client credentials `what` needs: names the variables whose
/// flag is set (the missing ones), never a value.
fn missing_credentials(what: &str, vars: &[(&str, bool)]) -> Error {
    let missing: Vec<&str> = vars
        .iter()
        .filter(|(_, missing)| *missing)
        .map(|(name, _)| *name)
        .collect();
    Error::new(
        ErrorKind::PermissionDenied,
        format!(
            "{what} needs {}: set {}",
            missing.join(", "),
            if missing.len() == 1 { "it" } else { "them" }
        ),
    )
}

/// An OAuth client ID from `origin`, trimmed: non-empty, without ':' (it goes into
/// an HTTP Basic `client_id:client_secret`) nor control characters. Not echoed.
fn oauth_client_id(text: &str, origin: &str) -> Result<String> {
    let id = text.trim();
    if id.is_empty() || id.contains(':') || id.chars().any(char::is_control) {
        return Err(Error::invalid(format!(
            "{origin} is not an OAuth client ID (no ':' nor control characters)"
        )));
    }
    Ok(id.to_owned())
}

/// The https URL of `origin` (a token endpoint or an authority): client credentials
/// never travel over a connection that is not TLS (libcurl verifies the
/// certificate). No user information and no fragment; the value is not echoed.
fn https_url(text: &str, origin: &str) -> Result<url::Url> {
    let url = url::Url::parse(text.trim()).map_err(|_| {
        Error::invalid(format!(
            "{origin} is not a URL: expected https://HOST[/PATH]"
        ))
    })?;
    if url.scheme() != "https" {
        return Err(Error::invalid(format!(
            "{origin} must be an https:// URL, not {}://: client credentials never travel over a connection without TLS",
            url.scheme()
        )));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(Error::invalid(format!(
            "{origin} names no host: expected https://HOST[/PATH]"
        )));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(Error::invalid(format!(
            "{origin} must not contain credentials ('@'): the client secret has its own variable"
        )));
    }
    if url.fragment().is_some() {
        return Err(Error::invalid(format!("{origin} takes no fragment ('#')")));
    }
    Ok(url)
}

/// Whether `scope` is OAuth scopes (RFC 6749, 3.3: `%x21 / %x23-5B / %x5D-7E`)
/// separated by single spaces, without '&', '+' and '%': librdkafka puts the scope
/// into the token request's form body as it is, where they would change its meaning.
fn valid_scope(scope: &str) -> bool {
    scope.split(' ').all(|token| {
        !token.is_empty()
            && token.bytes().all(|b| {
                matches!(b, 0x21 | 0x23..=0x5B | 0x5D..=0x7E) && !matches!(b, b'&' | b'+' | b'%')
            })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "c2VjcmV0LWtleS1kby1ub3QtcHJpbnQ=";
    const PASSWORD: &str = "hunter2-scram-password";
    const CLIENT_SECRET: &str = "oidc-client-secret-do-not-print";
    const TENANT: &str = "8c3f0b4e-6d2a-4f1e-9b7c-2a5d1e0f3c4b";
    const APP_ID: &str = "0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0";
    const IDP_TOKEN_URL: &str =
        "https://idp.example.com/realms/kafka/protocol/openid-connect/token";

    /// A service principal in the variables of azure-identity's EnvironmentCredential.
    fn entra_vars() -> Vec<(&'static str, &'static str)> {
        vec![
            (AZURE_TENANT_ID_ENV, TENANT),
            (AZURE_CLIENT_ID_ENV, APP_ID),
            (AZURE_CLIENT_SECRET_ENV, CLIENT_SECRET),
        ]
    }

    /// An OIDC client of a plain Kafka cluster.
    fn kafka_oauth_vars() -> Vec<(&'static str, &'static str)> {
        vec![
            (KAFKA_OAUTH_TOKEN_ENDPOINT_ENV, IDP_TOKEN_URL),
            (KAFKA_OAUTH_CLIENT_ID_ENV, "orders-svc"),
            (KAFKA_OAUTH_CLIENT_SECRET_ENV, CLIENT_SECRET),
        ]
    }

    /// `vars` with `name` set to `value` (replaced or added).
    fn with<'a>(
        vars: &[(&'a str, &'a str)],
        name: &'a str,
        value: &'a str,
    ) -> Vec<(&'a str, &'a str)> {
        let mut vars: Vec<_> = vars.iter().copied().filter(|(n, _)| *n != name).collect();
        vars.push((name, value));
        vars
    }

    /// `vars` without `name`.
    fn without<'a>(vars: &[(&'a str, &'a str)], name: &str) -> Vec<(&'a str, &'a str)> {
        vars.iter().copied().filter(|(n, _)| *n != name).collect()
    }

    fn connection_string(namespace: &str) -> String {
        format!(
            "Endpoint=sb://{namespace}/;SharedAccessKeyName=RootManageSharedAccessKey;SharedAccessKey={KEY}"
        )
    }

    fn config(url: &str, vars: &[(&str, &str)]) -> Result<KafkaConfig> {
        let env = |name: &str| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| (*v).to_owned())
        };
        KafkaConfig::from_url_with_env(url, &env)
    }

    fn pairs(settings: &[(String, String)]) -> Vec<(&str, &str)> {
        settings
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect()
    }

    fn value<'a>(settings: &'a [(String, String)], name: &str) -> Option<&'a str> {
        settings
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn invalid(url: &str, vars: &[(&str, &str)]) -> Error {
        let e = config(url, vars).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{url}: {e}");
        e
    }

    /// Everything a user may see of a configuration or an error.
    fn assert_no_secret(text: &str) {
        assert!(!text.contains(KEY), "{text}");
        assert!(!text.contains(PASSWORD), "{text}");
        assert!(!text.contains(CLIENT_SECRET), "{text}");
        assert!(!text.contains("SharedAccessKey="), "{text}");
    }

    #[test]
    fn kafka_host_list_and_defaults() {
        let c = config("kafka://a.example:9092,b.example:9093, [::1]:9094", &[]).unwrap();
        assert_eq!(c.flavor(), Flavor::Kafka);
        assert_eq!(c.scheme(), "kafka");
        assert_eq!(
            c.bootstrap_servers(),
            "a.example:9092,b.example:9093,[::1]:9094"
        );
        assert_eq!(
            pairs(&c.client_settings()),
            vec![
                (
                    "bootstrap.servers",
                    "a.example:9092,b.example:9093,[::1]:9094"
                ),
                ("client.id", "cloudbus"),
                ("security.protocol", "PLAINTEXT"),
                ("allow.auto.create.topics", "false"),
            ]
        );
        assert_eq!(c.content_mode(), ContentMode::Binary);
        assert_eq!(c.topic_partitions(), 3);
        assert_eq!(c.topic_replication(), -1);
        assert!(c.topic_configs().is_empty());
        assert_eq!(c.max_delivery_attempts(), None);
        assert_eq!(c.lease(), Duration::from_millis(30_000));
        assert_eq!(c.retry_hold(), DEFAULT_RETRY_HOLD);
        assert_eq!(
            KafkaConfig::from_url("kafka://a:9092?retry_hold=5")
                .expect("a config")
                .retry_hold(),
            5
        );
        assert!(c.admin_api());
        assert_eq!(c.max_message_bytes(), 1_000_000);
        assert_eq!(
            pairs(&c.producer_settings().unwrap())[4..],
            [
                ("enable.idempotence", "true"),
                ("acks", "all"),
                ("max.in.flight.requests.per.connection", "5"),
                ("linger.ms", "5"),
                ("compression.type", "none"),
                ("message.max.bytes", "1000000"),
            ]
        );
        assert_eq!(
            pairs(&c.consumer_settings("orders-billing"))[4..],
            [
                ("group.id", "orders-billing"),
                ("enable.auto.commit", "false"),
                ("enable.auto.offset.store", "false"),
                ("auto.offset.reset", "earliest"),
                ("session.timeout.ms", "45000"),
                ("isolation.level", "read_committed"),
                ("enable.partition.eof", "false"),
                ("fetch.wait.max.ms", "500"),
            ]
        );
        assert_eq!(
            c.to_string(),
            "kafka://a.example:9092,b.example:9093,[::1]:9094 (PLAINTEXT)"
        );
        // A trailing slash and an upper-case scheme are fine.
        let c = config("KAFKA://localhost:9092/", &[]).unwrap();
        assert_eq!(c.bootstrap_servers(), "localhost:9092");
    }

    #[test]
    fn kafka_servers_from_the_environment() {
        let vars = [(BOOTSTRAP_SERVERS_ENV, " k1:9092 , k2:9092 ")];
        let c = config("kafka://", &vars).unwrap();
        assert_eq!(c.bootstrap_servers(), "k1:9092,k2:9092");
        let c = config("kafka://?mode=structured", &vars).unwrap();
        assert_eq!(c.bootstrap_servers(), "k1:9092,k2:9092");
        assert_eq!(c.content_mode(), ContentMode::Structured);
        // The URL wins over the environment.
        let c = config("kafka://url-host:9092", &vars).unwrap();
        assert_eq!(c.bootstrap_servers(), "url-host:9092");

        for vars in [&[][..], &[(BOOTSTRAP_SERVERS_ENV, "  ")][..]] {
            let e = invalid("kafka://", vars);
            assert!(e.message().contains(BOOTSTRAP_SERVERS_ENV), "{e}");
        }
        let e = invalid("kafka://", &[(BOOTSTRAP_SERVERS_ENV, "k1")]);
        assert!(e.message().contains(BOOTSTRAP_SERVERS_ENV), "{e}");
    }

    #[test]
    fn bad_servers_are_named() {
        for (url, entry) in [
            ("kafka://a:notaport", "a:notaport"),
            ("kafka://a:0", "a:0"),
            ("kafka://a:70000", "a:70000"),
            ("kafka://a", "\"a\""),
            ("kafka://::1:9092", "::1:9092"),
            ("kafka://[nothex]:9092", "[nothex]:9092"),
            ("kafka://[::1]9092", "[::1]9092"),
            ("kafka://a:9092,b b:9092", "b b:9092"),
            ("kafka://:9092", ":9092"),
        ] {
            let e = invalid(url, &[]);
            assert!(e.message().contains(entry), "{url}: {e}");
        }
        let e = invalid("kafka://a:9092,,b:9092", &[]);
        assert!(e.message().contains("empty entry"), "{e}");
        let e = invalid("kafka://a:9092/orders", &[]);
        assert!(e.message().contains("no path"), "{e}");
        invalid("kafka://a:9092#x", &[]);
        invalid("amqp://a:9092", &[]);
        invalid("a:9092", &[]);
    }

    #[test]
    fn credentials_in_the_url_are_refused_without_echo() {
        for url in [
            "kafka://alice:hunter2-scram-password@broker:9092",
            "kafka://alice:hunter2-scram-password/x@broker:9092",
            "kafka://alice:hunter2-scram-password?x@broker:9092",
            "eventhubs://alice:hunter2-scram-password@ns.servicebus.windows.net",
        ] {
            let e = invalid(url, &[]);
            assert!(e.message().contains("credentials"), "{e}");
            assert_no_secret(&e.to_string());
            assert_no_secret(&format!("{e:?}"));
        }
    }

    #[test]
    fn unknown_parameters_are_refused() {
        let e = invalid("kafka://a:9092?colour=red", &[]);
        assert!(e.message().contains("colour"), "{e}");
        // Topic settings and security choices are not Event Hubs parameters.
        let cs = connection_string("ns.servicebus.windows.net");
        let vars = [(EVENTHUBS_CONNECTION_STRING_ENV, cs.as_str())];
        for param in [
            "partitions=6",
            "security_protocol=plaintext",
            "sasl_mechanism=PLAIN",
            "oauth_scope=x",
        ] {
            let e = invalid(&format!("eventhubs://?{param}"), &vars);
            assert!(e.message().contains("unknown"), "{e}");
        }
        invalid("kafka://a:9092?auth=entra", &[]);
        invalid("kafka://a:9092?mode=fancy", &[]);
    }

    #[test]
    fn parameters_are_read_and_checked() {
        let c = config(
            "kafka://a:9092?mode=structured&partitions=6&replication=3&retention_ms=86400000\
             &cleanup_policy=compact&max_delivery_attempts=5&lease_ms=10000&linger_ms=0\
             &compression=zstd&max_message_bytes=2000000&client_id=orders-svc\
             &session_timeout_ms=10000&security_protocol=ssl&tls_ca=/etc/kafka/ca.pem",
            &[],
        )
        .unwrap();
        assert_eq!(c.content_mode(), ContentMode::Structured);
        assert_eq!(c.topic_partitions(), 6);
        assert_eq!(c.topic_replication(), 3);
        assert_eq!(
            c.topic_configs(),
            vec![
                ("retention.ms".to_owned(), "86400000".to_owned()),
                ("cleanup.policy".to_owned(), "compact".to_owned()),
            ]
        );
        assert_eq!(c.max_delivery_attempts(), Some(5));
        assert_eq!(c.lease(), Duration::from_secs(10));
        assert_eq!(c.max_message_bytes(), 2_000_000);
        assert_eq!(
            pairs(&c.client_settings()),
            vec![
                ("bootstrap.servers", "a:9092"),
                ("client.id", "orders-svc"),
                ("security.protocol", "SSL"),
                ("allow.auto.create.topics", "false"),
                ("ssl.ca.location", "/etc/kafka/ca.pem"),
            ]
        );
        let producer = c.producer_settings().unwrap();
        assert_eq!(value(&producer, "linger.ms"), Some("0"));
        assert_eq!(value(&producer, "compression.type"), Some("zstd"));
        assert_eq!(value(&producer, "message.max.bytes"), Some("2000000"));
        let consumer = c.consumer_settings("g");
        assert_eq!(value(&consumer, "session.timeout.ms"), Some("10000"));
        // A tls_ca alone selects SSL.
        let c = config("kafka://a:9093?tls_ca=/ca.pem", &[]).unwrap();
        assert_eq!(
            value(&c.client_settings(), "security.protocol"),
            Some("SSL")
        );
        assert_eq!(
            config("kafka://a:1?retention_ms=-1", &[])
                .unwrap()
                .topic_configs()[0]
                .1,
            "-1"
        );

        for bad in [
            "partitions=0",
            "partitions=x",
            "replication=0",
            "replication=-2",
            "retention_ms=-5",
            "cleanup_policy=compact,delete",
            "max_delivery_attempts=0",
            "lease_ms=0",
            "retry_hold=0",
            "retry_hold=1000001",
            "linger_ms=900001",
            "compression=brotli",
            "max_message_bytes=10",
            "client_id=",
            "session_timeout_ms=0",
            "tls_ca=",
            "tls_ca=/ca.pem&security_protocol=plaintext",
            "mode=binary&mode=structured",
        ] {
            let e = invalid(&format!("kafka://a:9092?{bad}"), &[]);
            assert!(!e.message().is_empty(), "{bad}");
        }
    }

    #[test]
    fn event_hubs_from_url_and_connection_string() {
        let cs = connection_string("contoso.servicebus.windows.net");
        let vars = [(EVENTHUBS_CONNECTION_STRING_ENV, cs.as_str())];
        let c = config("eventhubs://Contoso.servicebus.windows.net", &vars).unwrap();
        assert_eq!(c.flavor(), Flavor::EventHubs);
        assert_eq!(c.scheme(), "eventhubs");
        assert!(!c.admin_api());
        assert_eq!(c.bootstrap_servers(), "contoso.servicebus.windows.net:9093");
        assert_eq!(
            pairs(&c.client_settings()),
            vec![
                ("bootstrap.servers", "contoso.servicebus.windows.net:9093"),
                ("client.id", "cloudbus"),
                ("security.protocol", "SASL_SSL"),
                ("allow.auto.create.topics", "false"),
                ("sasl.mechanism", "PLAIN"),
                ("sasl.username", "$ConnectionString"),
                ("sasl.password", cs.as_str()),
                ("socket.keepalive.enable", "true"),
                ("metadata.max.age.ms", "180000"),
                ("connections.max.idle.ms", "180000"),
            ]
        );
        assert_eq!(
            pairs(&c.producer_settings().unwrap())[10..],
            [
                ("enable.idempotence", "true"),
                ("acks", "all"),
                ("max.in.flight.requests.per.connection", "5"),
                ("linger.ms", "5"),
                ("compression.type", "none"),
                ("message.max.bytes", "1000000"),
                ("request.timeout.ms", "60000"),
            ]
        );
        assert_eq!(
            value(&c.consumer_settings("g"), "session.timeout.ms"),
            Some("30000")
        );
        assert_eq!(value(&c.consumer_settings("g"), "request.timeout.ms"), None);
        assert_eq!(c.max_message_bytes(), 1_000_000);
        assert_eq!(
            c.to_string(),
            "eventhubs://contoso.servicebus.windows.net:9093 (SASL_SSL PLAIN)"
        );
        // The Kafka port may be written; another may not.
        assert!(config("eventhubs://contoso.servicebus.windows.net:9093", &vars).is_ok());
        invalid("eventhubs://contoso.servicebus.windows.net:5671", &vars);
        invalid("eventhubs://contoso", &vars);
        invalid(
            "eventhubs://a.servicebus.windows.net,b.servicebus.windows.net",
            &vars,
        );
        // gzip is allowed, the other codecs are not; nor requests at the limit.
        let c = config(
            "eventhubs://?compression=gzip&max_message_bytes=1046527",
            &vars,
        )
        .unwrap();
        assert_eq!(
            value(&c.producer_settings().unwrap(), "compression.type"),
            Some("gzip")
        );
        assert_eq!(c.max_message_bytes(), 1_046_527);
        for codec in ["snappy", "lz4", "zstd"] {
            let e = invalid(&format!("eventhubs://?compression={codec}"), &vars);
            assert!(e.message().contains("gzip"), "{e}");
        }
        invalid("eventhubs://?max_message_bytes=1046528", &vars);
        invalid("eventhubs://?session_timeout_ms=5000", &vars);
    }

    #[test]
    fn event_hubs_namespace_from_the_connection_string_only() {
        let cs = format!(
            "Endpoint=sb://fabrikam.servicebus.windows.net/;SharedAccessKeyName=send;SharedAccessKey={KEY};EntityPath=orders"
        );
        let c = config(
            "eventhubs://",
            &[(EVENTHUBS_CONNECTION_STRING_ENV, cs.as_str())],
        )
        .unwrap();
        assert_eq!(
            c.bootstrap_servers(),
            "fabrikam.servicebus.windows.net:9093"
        );
        assert_eq!(
            value(&c.client_settings(), "sasl.password"),
            Some(cs.as_str())
        );
    }

    #[test]
    fn event_hubs_namespace_mismatch_and_bad_connection_strings() {
        let cs = connection_string("contoso.servicebus.windows.net");
        let e = invalid(
            "eventhubs://fabrikam.servicebus.windows.net",
            &[(EVENTHUBS_CONNECTION_STRING_ENV, cs.as_str())],
        );
        assert!(
            e.message().contains("fabrikam.servicebus.windows.net"),
            "{e}"
        );
        assert!(
            e.message().contains("contoso.servicebus.windows.net"),
            "{e}"
        );
        assert_no_secret(&e.to_string());
        assert_no_secret(&format!("{e:?}"));
        for bad in [
            format!("SharedAccessKeyName=n;SharedAccessKey={KEY}"),
            format!("Endpoint=sb://contoso.servicebus.windows.net/;{KEY}"),
            "Endpoint=sb://contoso.servicebus.windows.net/;SharedAccessKeyName=n".to_owned(),
            format!(
                "Endpoint=https://contoso.servicebus.windows.net/;SharedAccessKeyName=n;SharedAccessKey={KEY}"
            ),
            format!("Endpoint=sb://;SharedAccessKeyName=n;SharedAccessKey={KEY}"),
        ] {
            let e = invalid(
                "eventhubs://",
                &[(EVENTHUBS_CONNECTION_STRING_ENV, bad.as_str())],
            );
            assert_no_secret(&e.to_string());
            assert_no_secret(&format!("{e:?}"));
        }
        let emulator = format!(
            "Endpoint=sb://localhost;SharedAccessKeyName=n;SharedAccessKey={KEY};UseDevelopmentEmulator=true"
        );
        let e = config(
            "eventhubs://",
            &[(EVENTHUBS_CONNECTION_STRING_ENV, emulator.as_str())],
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        // A SAS-token connection string is a credential too.
        let sas = "Endpoint=sb://contoso.servicebus.windows.net/;SharedAccessSignature=SharedAccessSignature sr=x&sig=y&se=1&skn=n";
        assert!(config("eventhubs://", &[(EVENTHUBS_CONNECTION_STRING_ENV, sas)]).is_ok());
    }

    #[test]
    fn event_hubs_without_connection_string_is_permission_denied() {
        for url in ["eventhubs://contoso.servicebus.windows.net", "eventhubs://"] {
            let e = config(url, &[]).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
            assert!(e.message().contains(EVENTHUBS_CONNECTION_STRING_ENV), "{e}");
        }
    }

    #[test]
    fn event_hubs_with_entra_id() {
        let vars = entra_vars();
        let c = config(
            "eventhubs://contoso.servicebus.windows.net?auth=entra",
            &vars,
        )
        .unwrap();
        let endpoint = format!("https://login.microsoftonline.com/{TENANT}/oauth2/v2.0/token");
        assert_eq!(
            pairs(&c.client_settings()),
            vec![
                ("bootstrap.servers", "contoso.servicebus.windows.net:9093"),
                ("client.id", "cloudbus"),
                ("security.protocol", "SASL_SSL"),
                ("allow.auto.create.topics", "false"),
                ("sasl.mechanism", "OAUTHBEARER"),
                ("sasl.oauthbearer.method", "oidc"),
                ("sasl.oauthbearer.client.id", APP_ID),
                ("sasl.oauthbearer.client.secret", CLIENT_SECRET),
                ("sasl.oauthbearer.token.endpoint.url", endpoint.as_str()),
                (
                    "sasl.oauthbearer.scope",
                    "https://contoso.servicebus.windows.net/.default"
                ),
                ("socket.keepalive.enable", "true"),
                ("metadata.max.age.ms", "180000"),
                ("connections.max.idle.ms", "180000"),
            ]
        );
        assert_eq!(
            c.to_string(),
            "eventhubs://contoso.servicebus.windows.net:9093 (SASL_SSL OAUTHBEARER)"
        );
        let debug = format!("{c:?}");
        assert!(debug.contains("<redacted>"), "{debug}");
        assert_no_secret(&debug);
        assert_no_secret(&format!("{c:#?}"));
        assert_no_secret(&c.to_string());

        // The namespace may come from a connection string, whose key is not used.
        let cs = connection_string("contoso.servicebus.windows.net");
        let c = config(
            "eventhubs://?auth=entra",
            &with(&vars, EVENTHUBS_CONNECTION_STRING_ENV, &cs),
        )
        .unwrap();
        assert_eq!(c.bootstrap_servers(), "contoso.servicebus.windows.net:9093");
        assert_eq!(value(&c.client_settings(), "sasl.password"), None);
        assert_eq!(
            value(&c.client_settings(), "sasl.oauthbearer.scope"),
            Some("https://contoso.servicebus.windows.net/.default")
        );
        invalid("eventhubs://?auth=entra", &vars);
        invalid("eventhubs://contoso.servicebus.windows.net?auth=sas", &vars);
        // A private authority's CA, for the token endpoint only; not without Entra ID.
        let c = config(
            "eventhubs://contoso.servicebus.windows.net?auth=entra&oauth_ca=/idp-ca.pem",
            &vars,
        )
        .unwrap();
        assert_eq!(
            value(&c.client_settings(), "https.ca.location"),
            Some("/idp-ca.pem")
        );
        let e = invalid(
            "eventhubs://contoso.servicebus.windows.net?oauth_ca=/idp-ca.pem",
            &with(
                &vars,
                EVENTHUBS_CONNECTION_STRING_ENV,
                &connection_string("contoso.servicebus.windows.net"),
            ),
        );
        assert!(e.message().contains("auth=entra"), "{e}");

        // A sovereign cloud: its authority host and its namespaces' domain; a domain
        // tenant and a trailing slash are fine.
        let vars = with(
            &with(
                &vars,
                AZURE_AUTHORITY_HOST_ENV,
                "https://login.chinacloudapi.cn/",
            ),
            AZURE_TENANT_ID_ENV,
            "contoso.partner.onmschina.cn",
        );
        let c = config(
            "eventhubs://Contoso.servicebus.chinacloudapi.cn?auth=entra",
            &vars,
        )
        .unwrap();
        let settings = c.client_settings();
        assert_eq!(
            value(&settings, "sasl.oauthbearer.token.endpoint.url"),
            Some("https://login.chinacloudapi.cn/contoso.partner.onmschina.cn/oauth2/v2.0/token")
        );
        assert_eq!(
            value(&settings, "sasl.oauthbearer.scope"),
            Some("https://contoso.servicebus.chinacloudapi.cn/.default")
        );
    }

    #[test]
    fn entra_missing_variables_are_named() {
        let url = "eventhubs://contoso.servicebus.windows.net?auth=entra";
        let all = [
            AZURE_TENANT_ID_ENV,
            AZURE_CLIENT_ID_ENV,
            AZURE_CLIENT_SECRET_ENV,
        ];
        for name in all {
            for vars in [
                without(&entra_vars(), name),
                with(&entra_vars(), name, "  "),
            ] {
                let e = config(url, &vars).unwrap_err();
                assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{name}: {e}");
                assert!(e.message().contains(name), "{name}: {e}");
                for other in all.iter().filter(|other| **other != name) {
                    assert!(!e.message().contains(*other), "{name}: {e}");
                }
                assert_no_secret(&e.to_string());
                assert_no_secret(&format!("{e:?}"));
            }
        }
        let e = config(url, &[]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
        for name in all {
            assert!(e.message().contains(name), "{e}");
        }
        // A connection string does not stand in for them.
        let cs = connection_string("contoso.servicebus.windows.net");
        let e = config(url, &[(EVENTHUBS_CONNECTION_STRING_ENV, cs.as_str())]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
        assert_no_secret(&e.to_string());
    }

    #[test]
    fn entra_authority_must_be_https() {
        let url = "eventhubs://contoso.servicebus.windows.net?auth=entra";
        for authority in [
            "http://login.microsoftonline.com",
            "http://127.0.0.1:9",
            "HTTP://login.microsoftonline.com",
            "ftp://login.microsoftonline.com",
            "login.microsoftonline.com",
            "https://alice:hunter2-scram-password@login.microsoftonline.com",
            "https://login.microsoftonline.com/?x=1",
            "https://login.microsoftonline.com/#x",
        ] {
            let e = invalid(
                url,
                &with(&entra_vars(), AZURE_AUTHORITY_HOST_ENV, authority),
            );
            assert!(
                e.message().contains(AZURE_AUTHORITY_HOST_ENV),
                "{authority}: {e}"
            );
            assert_no_secret(&e.to_string());
            assert_no_secret(&format!("{e:?}"));
        }
        let e = invalid(
            url,
            &with(
                &entra_vars(),
                AZURE_AUTHORITY_HOST_ENV,
                "http://login.microsoftonline.com",
            ),
        );
        assert!(e.message().contains("https://"), "{e}");
    }

    #[test]
    fn entra_tenant_cannot_leave_its_path_segment() {
        let url = "eventhubs://contoso.servicebus.windows.net?auth=entra";
        for tenant in [
            "x/../y",
            "..",
            "../common",
            "a..b",
            "contoso.onmicrosoft.com/x",
            "a?b",
            "a#b",
            "a b",
            "%2e%2e",
            "-x",
            "x.",
            "t@x",
        ] {
            let e = invalid(url, &with(&entra_vars(), AZURE_TENANT_ID_ENV, tenant));
            assert!(e.message().contains(AZURE_TENANT_ID_ENV), "{tenant}: {e}");
            assert_no_secret(&e.to_string());
        }
        for tenant in ["contoso.onmicrosoft.com", "organizations", TENANT] {
            let c = config(url, &with(&entra_vars(), AZURE_TENANT_ID_ENV, tenant)).unwrap();
            let expected = format!("https://login.microsoftonline.com/{tenant}/oauth2/v2.0/token");
            assert_eq!(
                value(&c.client_settings(), "sasl.oauthbearer.token.endpoint.url"),
                Some(expected.as_str())
            );
        }
        // A client ID goes into HTTP Basic authentication: no ':'.
        let e = invalid(url, &with(&entra_vars(), AZURE_CLIENT_ID_ENV, "a:b"));
        assert!(e.message().contains(AZURE_CLIENT_ID_ENV), "{e}");
    }

    #[test]
    fn kafka_oauthbearer_with_oidc() {
        let vars = kafka_oauth_vars();
        let c = config(
            "kafka://a:9093?sasl_mechanism=OAUTHBEARER&oauth_scope=kafka",
            &vars,
        )
        .unwrap();
        assert_eq!(
            pairs(&c.client_settings()),
            vec![
                ("bootstrap.servers", "a:9093"),
                ("client.id", "cloudbus"),
                ("security.protocol", "SASL_SSL"),
                ("allow.auto.create.topics", "false"),
                ("sasl.mechanism", "OAUTHBEARER"),
                ("sasl.oauthbearer.method", "oidc"),
                ("sasl.oauthbearer.client.id", "orders-svc"),
                ("sasl.oauthbearer.client.secret", CLIENT_SECRET),
                ("sasl.oauthbearer.token.endpoint.url", IDP_TOKEN_URL),
                ("sasl.oauthbearer.scope", "kafka"),
            ]
        );
        assert_eq!(c.to_string(), "kafka://a:9093 (SASL_SSL OAUTHBEARER)");
        assert_no_secret(&format!("{c:?}"));
        // Without a scope there is none; several are space-separated (`+`).
        let c = config(
            "kafka://a:9093?security_protocol=sasl_ssl&sasl_mechanism=OAUTHBEARER",
            &vars,
        )
        .unwrap();
        assert_eq!(value(&c.client_settings(), "sasl.oauthbearer.scope"), None);
        assert_eq!(
            value(&c.client_settings(), "sasl.oauthbearer.method"),
            Some("oidc")
        );
        let c = config(
            "kafka://a:9093?sasl_mechanism=OAUTHBEARER&oauth_scope=kafka+api%3A%2F%2Forders%2F.default",
            &vars,
        )
        .unwrap();
        assert_eq!(
            value(&c.client_settings(), "sasl.oauthbearer.scope"),
            Some("kafka api://orders/.default")
        );
        for scope in ["", "a%26b%3Dc", "a%2Bb", "a%25", "a++b", "a%0Ab", "%22a%22"] {
            invalid(
                &format!("kafka://a:9093?sasl_mechanism=OAUTHBEARER&oauth_scope={scope}"),
                &vars,
            );
        }
        // A scope without OAUTHBEARER has nothing to go with.
        let e = invalid(
            "kafka://a:9093?security_protocol=ssl&oauth_scope=kafka",
            &vars,
        );
        assert!(e.message().contains("OAUTHBEARER"), "{e}");
        // The token endpoint's CA is its own (the broker's tls_ca is not used for it);
        // it goes with OAUTHBEARER only, and must name a file.
        let c = config(
            "kafka://a:9093?sasl_mechanism=OAUTHBEARER&tls_ca=/broker-ca.pem",
            &vars,
        )
        .unwrap();
        assert_eq!(value(&c.client_settings(), "https.ca.location"), None);
        let c = config(
            "kafka://a:9093?sasl_mechanism=OAUTHBEARER&oauth_ca=/idp-ca.pem",
            &vars,
        )
        .unwrap();
        assert_eq!(
            value(&c.client_settings(), "https.ca.location"),
            Some("/idp-ca.pem")
        );
        let e = invalid(
            "kafka://a:9093?security_protocol=ssl&oauth_ca=/idp-ca.pem",
            &vars,
        );
        assert!(e.message().contains("OAUTHBEARER"), "{e}");
        invalid("kafka://a:9093?sasl_mechanism=OAUTHBEARER&oauth_ca=", &vars);
        // The KAFKA_OAUTH_* variables are used by OAUTHBEARER only.
        let c = config("kafka://a:9092", &vars).unwrap();
        assert_eq!(
            value(&c.client_settings(), "sasl.oauthbearer.client.secret"),
            None
        );

        // Each missing variable is named.
        let all = [
            KAFKA_OAUTH_TOKEN_ENDPOINT_ENV,
            KAFKA_OAUTH_CLIENT_ID_ENV,
            KAFKA_OAUTH_CLIENT_SECRET_ENV,
        ];
        for name in all {
            let e = config(
                "kafka://a:9093?sasl_mechanism=OAUTHBEARER",
                &without(&vars, name),
            )
            .unwrap_err();
            assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{name}: {e}");
            assert!(e.message().contains(name), "{name}: {e}");
            assert_no_secret(&e.to_string());
            assert_no_secret(&format!("{e:?}"));
        }
        let e = config("kafka://a:9093?sasl_mechanism=OAUTHBEARER", &[]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PermissionDenied, "{e}");
        for name in all {
            assert!(e.message().contains(name), "{e}");
        }
    }

    #[test]
    fn kafka_oidc_token_endpoint_must_be_https() {
        for endpoint in [
            "http://idp.example.com/token",
            "http://127.0.0.1:8080/token",
            "idp.example.com/token",
            "file:///etc/token",
            "https://alice:hunter2-scram-password@idp.example.com/token",
            "https://oidc-client-secret-do-not-print@idp.example.com/token",
            "https://idp.example.com/token#x",
        ] {
            let e = invalid(
                "kafka://a:9093?sasl_mechanism=OAUTHBEARER",
                &with(
                    &kafka_oauth_vars(),
                    KAFKA_OAUTH_TOKEN_ENDPOINT_ENV,
                    endpoint,
                ),
            );
            assert!(
                e.message().contains(KAFKA_OAUTH_TOKEN_ENDPOINT_ENV),
                "{endpoint}: {e}"
            );
            assert_no_secret(&e.to_string());
            assert_no_secret(&format!("{e:?}"));
        }
        let e = invalid(
            "kafka://a:9093?sasl_mechanism=OAUTHBEARER",
            &with(
                &kafka_oauth_vars(),
                KAFKA_OAUTH_TOKEN_ENDPOINT_ENV,
                "http://idp.example.com/token",
            ),
        );
        assert!(e.message().contains("https://"), "{e}");
    }

    /// librdkafka takes the OIDC settings: built without libcurl it refuses
    /// `sasl.oauthbearer.method=oidc` ("OIDC not supported") when the client is
    /// created. The authority and the broker are 127.0.0.1:9, so nothing leaves the
    /// machine: the token fetch fails locally, on librdkafka's background thread.
    #[test]
    fn oidc_settings_are_accepted_by_librdkafka() {
        use rdkafka::ClientConfig;
        use rdkafka::consumer::BaseConsumer;

        let vars = with(
            &entra_vars(),
            AZURE_AUTHORITY_HOST_ENV,
            "https://127.0.0.1:9",
        );
        let c = config(
            "eventhubs://contoso.servicebus.windows.net?auth=entra",
            &vars,
        )
        .unwrap();
        let mut client = ClientConfig::new();
        for (name, value) in c.client_settings() {
            if name == "bootstrap.servers" {
                client.set(name, "127.0.0.1:9");
            } else {
                client.set(name, value);
            }
        }
        client.set("group.id", "cloudbus-oidc-settings");
        assert_eq!(
            client.get("sasl.oauthbearer.token.endpoint.url"),
            Some(format!("https://127.0.0.1:9/{TENANT}/oauth2/v2.0/token").as_str())
        );
        let consumer: rdkafka::error::KafkaResult<BaseConsumer> = client.create();
        if let Err(e) = consumer {
            panic!("librdkafka refused the OIDC settings: {e}");
        }
    }

    #[test]
    fn msk_with_scram() {
        let vars = [(SASL_USERNAME_ENV, "alice"), (SASL_PASSWORD_ENV, PASSWORD)];
        let c = config(
            "kafka://b-1.x.kafka.us-east-1.amazonaws.com:9096,b-2.x.kafka.us-east-1.amazonaws.com:9096?sasl_mechanism=SCRAM-SHA-512",
            &vars,
        )
        .unwrap();
        assert_eq!(
            pairs(&c.client_settings()),
            vec![
                (
                    "bootstrap.servers",
                    "b-1.x.kafka.us-east-1.amazonaws.com:9096,b-2.x.kafka.us-east-1.amazonaws.com:9096"
                ),
                ("client.id", "cloudbus"),
                ("security.protocol", "SASL_SSL"),
                ("allow.auto.create.topics", "false"),
                ("sasl.mechanism", "SCRAM-SHA-512"),
                ("sasl.username", "alice"),
                ("sasl.password", PASSWORD),
            ]
        );
        assert!(c.to_string().ends_with("(SASL_SSL SCRAM-SHA-512)"));
        // Explicit sasl_ssl and PLAIN work the same way.
        let c = config(
            "kafka://a:9093?security_protocol=sasl_ssl&sasl_mechanism=PLAIN",
            &vars,
        )
        .unwrap();
        assert_eq!(value(&c.client_settings(), "sasl.mechanism"), Some("PLAIN"));
        // OAUTHBEARER takes no password, but OIDC client credentials.
        let c = config(
            "kafka://a:9093?sasl_mechanism=OAUTHBEARER",
            &kafka_oauth_vars(),
        )
        .unwrap();
        assert_eq!(
            value(&c.client_settings(), "sasl.mechanism"),
            Some("OAUTHBEARER")
        );
        assert_eq!(value(&c.client_settings(), "sasl.username"), None);
        invalid("kafka://a:9093?sasl_mechanism=OAUTHBEARER", &vars);
        let mut both = kafka_oauth_vars();
        both.extend(vars);
        invalid("kafka://a:9093?sasl_mechanism=OAUTHBEARER", &both);
    }

    #[test]
    fn missing_or_stray_sasl_credentials() {
        let e = config("kafka://a:9096?sasl_mechanism=SCRAM-SHA-256", &[]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PermissionDenied);
        assert!(e.message().contains(SASL_USERNAME_ENV), "{e}");
        let e = config(
            "kafka://a:9096?sasl_mechanism=SCRAM-SHA-256",
            &[(SASL_USERNAME_ENV, "alice")],
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PermissionDenied);
        assert!(e.message().contains(SASL_PASSWORD_ENV), "{e}");
        // Credentials with nothing to use them with.
        let vars = [(SASL_USERNAME_ENV, "alice"), (SASL_PASSWORD_ENV, PASSWORD)];
        let e = invalid("kafka://a:9093?security_protocol=ssl", &vars);
        assert!(e.message().contains("sasl_mechanism"), "{e}");
        assert_no_secret(&e.to_string());
        invalid("kafka://a:9093?security_protocol=sasl_ssl", &vars);
        invalid(
            "kafka://a:9093?security_protocol=ssl&sasl_mechanism=PLAIN",
            &vars,
        );
    }

    #[test]
    fn credentials_never_travel_unencrypted() {
        let vars = [(SASL_USERNAME_ENV, "alice"), (SASL_PASSWORD_ENV, PASSWORD)];
        for url in [
            "kafka://a:9092?security_protocol=sasl_plaintext&sasl_mechanism=PLAIN",
            "kafka://a:9092?security_protocol=sasl_plaintext&sasl_mechanism=SCRAM-SHA-512",
            "kafka://a:9092?security_protocol=plaintext",
            "kafka://a:9092?security_protocol=plaintext&sasl_mechanism=PLAIN",
        ] {
            let e = invalid(url, &vars);
            assert!(
                e.message().contains("credentials would travel unencrypted"),
                "{url}: {e}"
            );
            assert_no_secret(&e.to_string());
            assert_no_secret(&format!("{e:?}"));
        }
        // A token mechanism over plaintext is refused too, password or not.
        let e = invalid(
            "kafka://a:9092?security_protocol=sasl_plaintext&sasl_mechanism=OAUTHBEARER",
            &[],
        );
        assert!(e.message().contains("unencrypted"), "{e}");
    }

    #[test]
    fn debug_and_display_never_show_secrets() {
        let cs = connection_string("contoso.servicebus.windows.net");
        let eventhubs = config(
            "eventhubs://contoso.servicebus.windows.net",
            &[(EVENTHUBS_CONNECTION_STRING_ENV, cs.as_str())],
        )
        .unwrap();
        let kafka = config(
            "kafka://a:9096?sasl_mechanism=SCRAM-SHA-512",
            &[(SASL_USERNAME_ENV, "alice"), (SASL_PASSWORD_ENV, PASSWORD)],
        )
        .unwrap();
        let entra = config(
            "eventhubs://contoso.servicebus.windows.net?auth=entra",
            &entra_vars(),
        )
        .unwrap();
        let oidc = config(
            "kafka://a:9093?sasl_mechanism=OAUTHBEARER",
            &kafka_oauth_vars(),
        )
        .unwrap();
        for c in [&eventhubs, &kafka, &entra, &oidc] {
            let debug = format!("{c:?}");
            assert!(debug.contains("<redacted>"), "{debug}");
            assert_no_secret(&debug);
            assert_no_secret(&format!("{c:#?}"));
            assert_no_secret(&c.to_string());
            assert_no_secret(&format!("{:?}", c.clone()));
            // The settings do hold it, under a name is_secret_setting knows.
            let settings = c.client_settings();
            let redacted: Vec<_> = settings
                .iter()
                .map(|(n, v)| {
                    if is_secret_setting(n) {
                        (n.as_str(), "<redacted>")
                    } else {
                        (n.as_str(), v.as_str())
                    }
                })
                .collect();
            assert_no_secret(&format!("{redacted:?}"));
            assert!(settings.iter().any(|(n, _)| is_secret_setting(n)));
        }
    }
}
