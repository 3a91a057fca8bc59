//! Azure for cloudbus.
//!
//! Today: Azure Event Grid (feature `eventgrid`): publishing CloudEvents to a topic
//! endpoint with a key or a SAS token, and a push consumer, an HTTP endpoint (axum)
//! that answers Event Grid's validation handshakes and runs the same handlers as every
//! other consumer. Service Bus (feature `servicebus` of the facade) is not built yet.
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

/// Opens an Azure URL as a [`Bus`]: `eventgrid://` (endpoint and key from
/// `EVENTGRID_ENDPOINT` / `EVENTGRID_KEY`, or `EVENTGRID_SAS_TOKEN`;
/// `?endpoint=URL` overrides the endpoint).
pub async fn connect(url: &str) -> Result<Bus> {
    let parsed = url::Url::parse(url).map_err(|e| {
        Error::with_source(
            ErrorKind::InvalidArgument,
            format!("{url:?} is not a URL"),
            e,
        )
    })?;
    match parsed.scheme() {
        #[cfg(feature = "eventgrid")]
        "eventgrid" => {
            let mut config = eventgrid::EventGridConfig::from_env()?;
            for (k, v) in parsed.query_pairs() {
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
        other => Err(Error::unsupported(format!(
            "{other}:// is not an Azure provider built into this cloudbus-azure"
        ))),
    }
}
