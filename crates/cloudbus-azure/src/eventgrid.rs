//! Azure Event Grid: CloudEvents published to a topic endpoint, and pushed to an HTTP
//! endpoint of the service ([`push::PushEndpoint`]).
//!
//! Publishing is one HTTPS POST per batch to `{endpoint}?api-version=2018-01-01` with
//! `content-type: application/cloudevents-batch+json; charset=utf-8`, the events in
//! structured JSON, batches cut by core at 1 MB, and either the topic key
//! (`aeg-sas-key`) or a SAS token (`aeg-sas-token`, made from the key by
//! [`sas_token`] or given ready-made). Event Grid accepts or refuses a batch as a whole:
//! 401 and 403 are `PermissionDenied`, 404 `NotFound`, 413 `TooLarge`, 400
//! `InvalidArgument`, 429 `Throttled`, 5xx and network failures `Unavailable`, with the
//! service's message (never the key). Event Grid has no pull: subscriptions are made in
//! Azure (ARM) and push to a webhook; `Bus::consumer` is `Unsupported` and points at
//! [`push::PushEndpoint`].

pub mod push;

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use cloudbus_core::codec::to_structured_json;
use cloudbus_core::driver::StreamDriver;
use cloudbus_core::{
    BatchResults, Bus, BusDriver, Capabilities, DeadLetterDriver, Error, ErrorKind, FilterSupport,
    OutgoingMessage, Payload, Result, SubscriptionDriver, SubscriptionSpec, TopicDriver,
    TopologyDriver,
};

use crate::{Secret, hmac_sha256_base64, kind_of_status, sas_encode};

/// The environment variable with the topic endpoint.
pub const ENDPOINT_ENV: &str = "EVENTGRID_ENDPOINT";
/// The environment variable with the topic key.
pub const KEY_ENV: &str = "EVENTGRID_KEY";
/// The environment variable with a ready-made SAS token (instead of the key).
pub const SAS_TOKEN_ENV: &str = "EVENTGRID_SAS_TOKEN";
/// The API version of the publish call.
pub const API_VERSION: &str = "2018-01-01";
/// Most bytes in one publish request (and so in one event).
pub const MAX_REQUEST_BYTES: usize = 1024 * 1024;
/// Events per request cloudbus sends (Event Grid limits bytes, not events).
pub const MAX_BATCH_COUNT: usize = 1000;

/// What an Event Grid topic supports, as seen by a publisher.
///
/// ```
/// let c = cloudbus_azure::eventgrid::capabilities();
/// assert!(c.fan_out && c.max_message_bytes < 1024 * 1024);
/// ```
pub fn capabilities() -> Capabilities {
    let mut c = Capabilities::default();
    c.fan_out = true;
    c.filtering = FilterSupport::Native;
    // Room for the JSON array around the events: `[`, `]` and one comma per event.
    c.max_batch_bytes = MAX_REQUEST_BYTES - MAX_BATCH_COUNT - 2;
    c.max_message_bytes = c.max_batch_bytes;
    c.max_batch_count = MAX_BATCH_COUNT;
    c
}

/// How requests are authenticated.
#[derive(Clone, Debug)]
pub enum Credential {
    /// The topic key, sent as `aeg-sas-key`.
    Key(Secret),
    /// A SAS token made from the key for each request, valid for `ttl`
    /// (`aeg-sas-token`); the key itself never leaves the process.
    SasFromKey {
        /// The topic key (base64).
        key: Secret,
        /// How long each token is valid.
        ttl: Duration,
    },
    /// A ready-made SAS token (`aeg-sas-token`).
    SasToken(Secret),
}

/// Where and how to publish.
///
/// ```
/// use cloudbus_azure::{Secret, eventgrid::{Credential, EventGridConfig}};
/// let c = EventGridConfig::new(
///     "https://orders.westeurope-1.eventgrid.azure.net/api/events",
///     Credential::Key(Secret::new("a2V5")),
/// );
/// assert!(!format!("{c:?}").contains("a2V5"));
/// ```
#[derive(Clone, Debug)]
pub struct EventGridConfig {
    endpoint: String,
    credential: Credential,
    timeout: Duration,
}

impl EventGridConfig {
    /// Publishes to `endpoint` (the topic's `.../api/events` URL) with `credential`.
    pub fn new(endpoint: impl Into<String>, credential: Credential) -> Self {
        EventGridConfig {
            endpoint: endpoint.into(),
            credential,
            timeout: Duration::from_secs(30),
        }
    }

    /// From `EVENTGRID_ENDPOINT` and `EVENTGRID_KEY` (or `EVENTGRID_SAS_TOKEN`).
    pub fn from_env() -> Result<Self> {
        let endpoint = std::env::var(ENDPOINT_ENV)
            .map_err(|_| Error::invalid(format!("{ENDPOINT_ENV} is not set")))?;
        let credential = match (std::env::var(KEY_ENV), std::env::var(SAS_TOKEN_ENV)) {
            (Ok(key), _) if !key.is_empty() => Credential::Key(Secret::new(key)),
            (_, Ok(token)) if !token.is_empty() => Credential::SasToken(Secret::new(token)),
            _ => {
                return Err(Error::invalid(format!(
                    "neither {KEY_ENV} nor {SAS_TOKEN_ENV} is set"
                )));
            }
        };
        Ok(EventGridConfig::new(endpoint, credential))
    }

    /// Replaces the endpoint.
    pub fn endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = endpoint.into();
        self
    }

    /// The timeout of one publish request (30 s by default).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }
}

/// A SAS token for `endpoint` signed with `key` (base64), valid until `expiry`: the
/// format Event Grid checks in `aeg-sas-token` (and azure-eventgrid's `generate_sas`
/// makes): `r=<resource>&e=<expiry>&s=<HMAC-SHA256>`, each part URL-encoded.
///
/// ```
/// use cloudbus_azure::{Secret, eventgrid::sas_token};
/// let expiry = chrono::DateTime::parse_from_rfc3339("2030-01-01T00:00:00Z").unwrap().to_utc();
/// let t = sas_token("https://t.westeurope-1.eventgrid.azure.net/api/events",
///     &Secret::new("a2V5a2V5a2V5"), expiry).unwrap();
/// assert!(t.expose().starts_with("r=https%3A%2F%2Ft.westeurope-1.eventgrid.azure.net%2Fapi%2Fevents%3FapiVersion%3D2018-01-01&e=01%2F01%2F2030%2012%3A00%3A00%20AM&s="));
/// ```
pub fn sas_token(endpoint: &str, key: &Secret, expiry: DateTime<Utc>) -> Result<Secret> {
    use base64::Engine as _;
    let resource = sas_encode(&format!("{endpoint}?apiVersion={API_VERSION}"));
    let expiry = sas_encode(&expiry.format("%m/%d/%Y %I:%M:%S %p").to_string());
    let unsigned = format!("r={resource}&e={expiry}");
    let key_bytes = base64::engine::general_purpose::STANDARD
        .decode(key.expose())
        .map_err(|_| Error::invalid("the Event Grid key is not base64"))?;
    let signature = hmac_sha256_base64(&key_bytes, &unsigned)?;
    Ok(Secret::new(format!(
        "{unsigned}&s={}",
        sas_encode(&signature)
    )))
}

/// What every Event Grid driver of one bus shares: the configuration and the HTTP
/// client.
struct EventGridContext {
    config: EventGridConfig,
    http: reqwest::Client,
}

/// Azure Event Grid as a cloudbus provider (`eventgrid://[?endpoint=URL]`): one topic
/// endpoint; every topic name publishes to it.
#[derive(Clone)]
pub struct EventGridBus {
    shared: Arc<EventGridContext>,
}

impl std::fmt::Debug for EventGridBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventGridBus")
            .field("endpoint", &self.shared.config.endpoint)
            .finish()
    }
}

impl EventGridBus {
    /// A bus publishing with `config`.
    pub fn new(config: EventGridConfig) -> Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .build()
            .map_err(|e| Error::with_source(ErrorKind::Internal, "HTTP client", e))?;
        Ok(EventGridBus {
            shared: Arc::new(EventGridContext { config, http }),
        })
    }

    /// Wraps this driver in the portable [`Bus`].
    pub fn into_bus(self) -> Bus {
        Bus::new(Arc::new(self))
    }
}

fn no_pull(what: &str) -> Error {
    Error::unsupported(format!(
        "Event Grid pushes events: {what} has no pull consumer; serve a \
         cloudbus_azure::eventgrid::push::PushEndpoint and subscribe its URL in Azure"
    ))
}

#[async_trait]
impl BusDriver for EventGridBus {
    fn scheme(&self) -> &str {
        "eventgrid"
    }

    async fn topic(&self, _topic: &str) -> Result<Arc<dyn TopicDriver>> {
        Ok(Arc::new(EventGridTopic {
            shared: self.shared.clone(),
        }))
    }

    async fn subscription(
        &self,
        topic: &str,
        _subscription: &str,
    ) -> Result<Arc<dyn SubscriptionDriver>> {
        Err(no_pull(topic))
    }

    async fn dead_letters(
        &self,
        topic: &str,
        _subscription: &str,
    ) -> Result<Arc<dyn DeadLetterDriver>> {
        Err(Error::unsupported(format!(
            "Event Grid dead-letters {topic}'s undeliverable events into the storage \
             container of the event subscription; read them there"
        )))
    }

    fn topology(&self) -> Arc<dyn TopologyDriver> {
        Arc::new(EventGridTopology)
    }

    async fn stream(&self, stream: &str) -> Result<Arc<dyn StreamDriver>> {
        Err(no_pull(stream))
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

struct EventGridTopology;

#[async_trait]
impl TopologyDriver for EventGridTopology {
    /// Topics are Azure resources (ARM), made outside the data plane: nothing to do.
    async fn ensure_topic(&self, _topic: &str) -> Result<()> {
        Ok(())
    }
    async fn ensure_subscription(&self, spec: &SubscriptionSpec) -> Result<()> {
        Err(Error::unsupported(format!(
            "Event Grid subscriptions ({}) are Azure resources made with ARM; point one at \
             a PushEndpoint",
            spec.name
        )))
    }
    async fn delete_subscription(&self, _topic: &str, name: &str) -> Result<()> {
        Err(Error::unsupported(format!(
            "Event Grid subscription {name} is an Azure resource; delete it with ARM"
        )))
    }
}

/// The topic endpoint as a [`TopicDriver`].
pub struct EventGridTopic {
    shared: Arc<EventGridContext>,
}

impl EventGridTopic {
    async fn post(&self, body: Vec<u8>) -> Result<()> {
        let config = &self.shared.config;
        let url = format!("{}?api-version={API_VERSION}", config.endpoint);
        let mut request = self
            .shared
            .http
            .post(&url)
            .header(
                "content-type",
                "application/cloudevents-batch+json; charset=utf-8",
            )
            .body(body);
        request = match &config.credential {
            Credential::Key(key) => request.header("aeg-sas-key", key.expose()),
            Credential::SasToken(token) => request.header("aeg-sas-token", token.expose()),
            Credential::SasFromKey { key, ttl } => {
                let ttl = chrono::Duration::from_std(*ttl).unwrap_or(chrono::Duration::hours(1));
                let token = sas_token(&config.endpoint, key, Utc::now() + ttl)?;
                request.header("aeg-sas-token", token.expose())
            }
        };
        let response = request.send().await.map_err(|e| {
            let kind = if e.is_timeout() {
                ErrorKind::Timeout
            } else {
                ErrorKind::Unavailable
            };
            // reqwest's error names the URL, never the headers.
            Error::with_source(kind, format!("publish to {}", config.endpoint), e)
        })?;
        let status = response.status().as_u16();
        if (200..300).contains(&status) {
            return Ok(());
        }
        let text = response.text().await.unwrap_or_default();
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
            .unwrap_or_else(|| text.chars().take(512).collect());
        Err(Error::new(
            kind_of_status(status),
            format!("publish to {}: HTTP {status}: {message}", config.endpoint),
        ))
    }
}

#[async_trait]
impl TopicDriver for EventGridTopic {
    async fn send_batch(&self, batch: &[OutgoingMessage]) -> Result<BatchResults> {
        let mut results: Vec<Option<Result<()>>> = (0..batch.len()).map(|_| None).collect();
        let mut body = Vec::with_capacity(batch.iter().map(|m| m.size + 1).sum::<usize>() + 2);
        body.push(b'[');
        let mut sent = Vec::new();
        for (i, m) in batch.iter().enumerate() {
            let encoded = match &m.payload {
                Payload::Event(e) => to_structured_json(e),
                Payload::Raw(_) => Err(Error::unsupported(
                    "Event Grid topics take CloudEvents; raw messages cannot be published",
                )),
            };
            match encoded {
                Ok(json) => {
                    if !sent.is_empty() {
                        body.push(b',');
                    }
                    body.extend_from_slice(&json);
                    sent.push(i);
                }
                Err(e) => results[i] = Some(Err(e)),
            }
        }
        body.push(b']');
        if !sent.is_empty() {
            // Event Grid takes or refuses the request as a whole.
            let outcome = if body.len() > MAX_REQUEST_BYTES {
                Err(Error::new(
                    ErrorKind::TooLarge,
                    format!(
                        "{} bytes of events are over Event Grid's {MAX_REQUEST_BYTES} per request",
                        body.len()
                    ),
                ))
            } else {
                self.post(body).await
            };
            let copy = |e: &Error| Error::new(e.kind(), e.message().to_owned());
            let mut rest = sent.iter().skip(1);
            for &i in rest.by_ref() {
                results[i] = Some(outcome.as_ref().map(|_| ()).map_err(copy));
            }
            results[sent[0]] = Some(outcome);
        }
        Ok(results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(Error::new(ErrorKind::Internal, "no result"))))
            .collect())
    }

    fn capabilities(&self) -> Capabilities {
        capabilities()
    }

    fn as_any(&self) -> &dyn Any {
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_kinds() {
        assert_eq!(kind_of_status(401), ErrorKind::PermissionDenied);
        assert_eq!(kind_of_status(403), ErrorKind::PermissionDenied);
        assert_eq!(kind_of_status(404), ErrorKind::NotFound);
        assert_eq!(kind_of_status(413), ErrorKind::TooLarge);
        assert_eq!(kind_of_status(429), ErrorKind::Throttled);
        assert_eq!(kind_of_status(503), ErrorKind::Unavailable);
        assert_eq!(kind_of_status(400), ErrorKind::InvalidArgument);
    }

    #[test]
    fn secrets_stay_out_of_debug() {
        let c = EventGridConfig::new(
            "http://x/api/events",
            Credential::SasFromKey {
                key: Secret::new("c2VjcmV0"),
                ttl: Duration::from_secs(60),
            },
        );
        assert!(!format!("{c:?}").contains("c2VjcmV0"));
    }
}
