//! Azure Event Grid: CloudEvents published to a topic endpoint, and pushed to an HTTP
//! endpoint of the service ([`push::PushEndpoint`]).
//!
//! Publishing is one HTTPS POST per batch to `{endpoint}?api-version=2018-01-01` with
//! `content-type: application/cloudevents-batch+json; charset=utf-8`, the events in
//! structured JSON, batches cut by core at 1 MB, and either the topic key
//! (`aeg-sas-key`) or a SAS token (`aeg-sas-token`, made from the key by
//! [`sas_token`] or given ready-made), to an `https://` endpoint or a loopback
//! `http://` one (an emulator) only. Event Grid accepts or refuses a batch as a whole:
//! 401 and 403 are `PermissionDenied`, 404 `NotFound`, 413 `TooLarge`, 400
//! `InvalidArgument`, 429 `Throttled`, 5xx and network failures `Unavailable`, with the
//! service's message (never the key). Event Grid has no pull: subscriptions are made in
//! Azure (ARM) and push to a webhook; `Bus::consumer` is `Unsupported` and points at
//! [`push::PushEndpoint`].

mod config;
pub mod push;
mod topic;

use config::EventGridContext;
pub use config::{
    API_VERSION, Credential, ENDPOINT_ENV, EventGridConfig, KEY_ENV, SAS_TOKEN_ENV, sas_token,
};
pub use topic::{EventGridTopic, MAX_BATCH_COUNT, MAX_REQUEST_BYTES, capabilities};

use std::any::Any;
use std::sync::Arc;

use async_trait::async_trait;
use cloudbus_core::driver::StreamDriver;
use cloudbus_core::{
    Bus, BusDriver, DeadLetterDriver, Error, ErrorKind, Result, SubscriptionDriver,
    SubscriptionSpec, TopicDriver, TopologyDriver,
};

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
        let endpoint = config::check_endpoint(&config.endpoint)?;
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

    fn as_any(&self) -> &dyn Any {
        self
    }
}

pub(crate) struct EventGridTopology;

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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{Secret, kind_of_status};

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
