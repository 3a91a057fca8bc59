//! The Event Grid bus: one topic endpoint, its HTTP client and credential, shared by
//! every topic driver it opens; the `BusDriver` that publishes to it and answers
//! `Unsupported` for everything Event Grid does not pull (subscriptions, dead letters,
//! streams).

use std::sync::Arc;

use async_trait::async_trait;
use cloudbus_core::Bus;
use cloudbus_driver::{
    BusDriver, DeadLetterDriver, Error, ErrorKind, Result, StreamDriver, SubscriptionDriver,
    TopicDriver, TopologyDriver,
};

use super::config::{EventGridConfig, EventGridContext, check_endpoint};
use super::topic::EventGridTopic;
use super::topology::EventGridTopology;

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
    /// A bus publishing with `config`. Refused (InvalidArgument) when the endpoint is
    /// neither `https://` nor `http://` on this machine's loopback: the key would
    /// travel in clear text.
    pub fn new(config: EventGridConfig) -> Result<Self> {
        let endpoint = check_endpoint(&config.endpoint)?;
        // No redirects: reqwest re-sends custom headers such as `aeg-sas-key` to
        // wherever a redirect points (it strips only Authorization and cookies), and
        // Event Grid's publish API never redirects.
        let mut http = reqwest::Client::builder()
            .timeout(config.timeout)
            .redirect(reqwest::redirect::Policy::none());
        if endpoint.scheme() == "http" {
            // A loopback emulator: an HTTP_PROXY from the environment would carry the
            // key off the machine in clear text.
            http = http.no_proxy();
        }
        let http = http
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

pub(crate) fn no_pull(what: &str) -> Error {
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
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::super::config::Credential;
    use super::*;
    use crate::auth::Secret;

    const KEY: &str = "dG9wLXNlY3JldC10b3BpYy1rZXk=";

    /// Issue 28 item 16: the topic key went to any endpoint, `http://` included, in
    /// clear text. Now a bus on a remote plain-HTTP endpoint (or one that is not a
    /// URL) is refused as InvalidArgument when it is made; HTTPS anywhere and plain
    /// HTTP on loopback (emulators) are accepted. Nothing is sent: `.invalid` never
    /// resolves, and making a bus connects nowhere. Before the fix every one of these
    /// buses was made.
    #[tokio::test]
    async fn the_key_goes_only_to_https_or_loopback_endpoints() {
        let credentials = [
            Credential::Key(Secret::new(KEY)),
            Credential::SasToken(Secret::new(KEY)),
            Credential::SasFromKey {
                key: Secret::new(KEY),
                ttl: Duration::from_secs(60),
            },
        ];
        for credential in credentials {
            for refused in [
                "http://eventgrid.invalid/api/events",
                "HTTP://EVENTGRID.INVALID/api/events",
                "http://0.0.0.0:8080/api/events",
                "http://localhost.invalid/api/events",
                "ftp://eventgrid.invalid/api/events",
                "eventgrid.invalid/api/events",
                "",
            ] {
                let err = EventGridBus::new(EventGridConfig::new(refused, credential.clone()))
                    .expect_err(refused);
                assert_eq!(err.kind(), ErrorKind::InvalidArgument, "{refused}: {err}");
                assert!(
                    !format!("{err} {err:?}").contains(KEY),
                    "the key leaked into the error"
                );
            }
            for accepted in [
                "https://eventgrid.invalid/api/events",
                "http://127.0.0.1:9/topics/t/api/events",
                "http://127.8.9.10:9/api/events",
                "http://localhost:9/api/events",
                "http://LOCALHOST:9/api/events",
                "http://[::1]:9/api/events",
            ] {
                EventGridBus::new(EventGridConfig::new(accepted, credential.clone()))
                    .expect(accepted);
            }
        }
    }
}
