//! Azure for cloudbus.
//!
//! - Azure Service Bus (feature `servicebus`): queues, and topics with subscriptions,
//!   over AMQP 1.0 (fe2o3-amqp, CBS and `$management`): batched sends, scheduled delivery,
//!   sessions for ordering keys, duplicate detection, peek-lock consumers, the
//!   dead-letter sub-queue, and subscription rules compiled from the portable filter.
//! - Azure Event Grid (feature `eventgrid`): publishing CloudEvents to a topic
//!   endpoint with a key or a SAS token, and a push consumer, an HTTP endpoint (axum)
//!   that answers Event Grid's validation handshakes and runs the same handlers as
//!   every other consumer.
//!
//! ```no_run
//! # async fn run() -> cloudbus_core::Result<()> {
//! use cloudbus_core::EventBuilder;
//! // EVENTGRID_ENDPOINT and EVENTGRID_KEY name the topic and its key.
//! let bus = cloudbus_azure::connect("eventgrid://").await?;
//! bus.publisher("orders").await?
//!     .publish(EventBuilder::new("com.example.order.created", "/shop").build()?)
//!     .await?;
//! # Ok(()) }
//! ```

#[cfg(feature = "eventgrid")]
pub mod eventgrid;
#[cfg(feature = "servicebus")]
pub mod servicebus;

use cloudbus_core::{Bus, Error, ErrorKind, Result};

/// A secret (key, SAS token, connection string): kept out of Debug output, logs and
/// errors.
///
/// ```
/// let s = cloudbus_azure::Secret::new("hunter2");
/// assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
/// assert_eq!(s.expose(), "hunter2");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    /// The value, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// What the Azure SDKs leave unencoded in SAS tokens (`generate_sas`, `quote_plus`):
/// letters, digits and `-_.~()*!'`.
#[cfg(any(feature = "eventgrid", feature = "servicebus"))]
const SAS_ENCODE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~')
    .remove(b'(')
    .remove(b')')
    .remove(b'*')
    .remove(b'!')
    .remove(b'\'');

/// Percent-encodes a part of a SAS token.
#[cfg(any(feature = "eventgrid", feature = "servicebus"))]
pub(crate) fn sas_encode(text: &str) -> String {
    percent_encoding::utf8_percent_encode(text, SAS_ENCODE).to_string()
}

/// The base64 HMAC-SHA256 of `text` under `key`: the signature of a SAS token.
#[cfg(any(feature = "eventgrid", feature = "servicebus"))]
pub(crate) fn hmac_sha256_base64(key: &[u8], text: &str) -> Result<String> {
    use base64::Engine as _;
    use hmac::{KeyInit, Mac};
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(key)
        .map_err(|_| Error::invalid("the key cannot key an HMAC"))?;
    mac.update(text.as_bytes());
    Ok(base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
}

/// The error kind of an HTTP status of an Azure data-plane or management API.
#[cfg(any(feature = "eventgrid", feature = "servicebus"))]
pub(crate) fn kind_of_status(status: u16) -> ErrorKind {
    match status {
        400 => ErrorKind::InvalidArgument,
        401 | 403 => ErrorKind::PermissionDenied,
        404 | 410 => ErrorKind::NotFound,
        409 => ErrorKind::AlreadyExists,
        413 => ErrorKind::TooLarge,
        429 => ErrorKind::Throttled,
        408 | 504 => ErrorKind::Timeout,
        s if s >= 500 => ErrorKind::Unavailable,
        _ => ErrorKind::Internal,
    }
}

/// The schemes this crate opens, those of its enabled features:
/// - `servicebus://` (see [`servicebus::ServiceBusConfig`]: connection string from
///   `SERVICEBUS_CONNECTION_STRING`; `?entity=queue`, `?sessions=true`,
///   `?mode=structured`, `?management=URL`);
/// - `eventgrid://` (endpoint and key from `EVENTGRID_ENDPOINT` / `EVENTGRID_KEY`, or
///   `EVENTGRID_SAS_TOKEN`; `?endpoint=URL` overrides the endpoint).
pub fn schemes() -> Vec<cloudbus_core::scheme::Scheme> {
    use cloudbus_core::scheme::Scheme;
    let mut schemes = Vec::new();
    #[cfg(feature = "servicebus")]
    schemes.push(Scheme {
        name: "servicebus",
        open: |url| {
            Box::pin(async move {
                let config = servicebus::ServiceBusConfig::from_url(&url)?;
                Ok(servicebus::ServiceBusBus::connect(config).await?.into_bus())
            })
        },
    });
    #[cfg(feature = "eventgrid")]
    schemes.push(Scheme {
        name: "eventgrid",
        open: |url| Box::pin(async move { open_eventgrid(&url) }),
    });
    schemes
}

/// Opens an Azure URL (one of [`schemes`]) as a [`Bus`].
pub async fn connect(url: &str) -> Result<Bus> {
    cloudbus_core::scheme::open(&schemes(), url).await
}

#[cfg(feature = "eventgrid")]
fn open_eventgrid(url: &url::Url) -> Result<Bus> {
    let mut config = eventgrid::EventGridConfig::from_env()?;
    for (k, v) in url.query_pairs() {
        match k.as_ref() {
            "endpoint" => config = config.endpoint(v.into_owned()),
            other => {
                return Err(Error::invalid(format!(
                    "unknown eventgrid:// URL parameter {other:?} (known: endpoint)"
                )));
            }
        }
    }
    Ok(eventgrid::EventGridBus::new(config)?.into_bus())
}
