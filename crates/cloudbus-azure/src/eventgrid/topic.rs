//! Publishing to the topic endpoint: each batch one HTTPS POST of the events in
//! structured JSON (`application/cloudevents-batch+json`), accepted or refused as a
//! whole, its HTTP status mapped onto the portable error kinds. The credential goes to
//! an `https://` endpoint, or to a loopback `http://` one (an emulator), never elsewhere.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::Utc;
use cloudbus_driver::codec::to_structured_json;
use cloudbus_driver::{
    BatchResults, Capabilities, Error, ErrorKind, FilterSupport, OutgoingMessage, Payload, Result,
    TopicDriver,
};

use super::config::{API_VERSION, Credential, EventGridContext, check_endpoint, sas_token};
use crate::error::kind_of_status;

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

/// The topic endpoint as a [`TopicDriver`].
pub struct EventGridTopic {
    pub(crate) shared: Arc<EventGridContext>,
}

impl EventGridTopic {
    async fn post(&self, body: Vec<u8>) -> Result<()> {
        let config = &self.shared.config;
        // `EventGridBus::new` checked it already; this is where the key goes out, so
        // the rule is kept here too (HTTPS, or loopback HTTP), whoever built the topic.
        check_endpoint(&config.endpoint)?;
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
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use cloudbus_driver::{EventBuilder, PublishOptions};

    use super::super::config::EventGridConfig;
    use super::*;
    use crate::auth::Secret;

    const KEY: &str = "dG9wLXNlY3JldC10b3BpYy1rZXk=";

    fn credentials() -> Vec<Credential> {
        vec![
            Credential::Key(Secret::new(KEY)),
            Credential::SasToken(Secret::new(KEY)),
            Credential::SasFromKey {
                key: Secret::new(KEY),
                ttl: Duration::from_secs(60),
            },
        ]
    }

    /// Issue 28 item 16, at the place the key goes out: a topic whose context was
    /// made without `EventGridBus::new` still refuses a remote `http://` endpoint
    /// with InvalidArgument before any request. Before the fix the request was
    /// attempted and failed on the name lookup (Unavailable).
    #[tokio::test]
    async fn publishing_refuses_a_remote_plain_http_endpoint_before_sending() {
        for credential in credentials() {
            let topic = EventGridTopic {
                shared: Arc::new(EventGridContext {
                    config: EventGridConfig::new("http://eventgrid.invalid/api/events", credential),
                    http: reqwest::Client::new(),
                }),
            };
            let event = EventBuilder::new("com.example.refused", "/tests/eventgrid")
                .build()
                .unwrap();
            let results = topic
                .send_batch(&[OutgoingMessage::new(
                    Arc::new(event),
                    PublishOptions::default(),
                )])
                .await
                .unwrap();
            let err = results[0].as_ref().unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{err}");
            assert!(!format!("{err} {err:?}").contains(KEY), "the key leaked");
        }
    }
}
