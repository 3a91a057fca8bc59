//! Credentials and clients: the four gRPC clients one bus shares, built on first use
//! against the configured endpoint, with anonymous credentials for the emulator and
//! Application Default Credentials otherwise. The rule that real credentials never go
//! over plain HTTP is [`PubSubConfig`]'s: only `emulator` (anonymous) takes an
//! `http://` endpoint, and `endpoint` (real credentials) must be `https://`.

use cloudbus_driver::{Error, ErrorKind, Result};
use google_cloud_pubsub::client::{BasePublisher, Subscriber, SubscriptionAdmin, TopicAdmin};

use crate::config::PubSubConfig;

/// The clients one bus shares: one gRPC channel for publishing, one for pulling.
pub(crate) struct Clients {
    pub(crate) topics: TopicAdmin,
    pub(crate) subscriptions: SubscriptionAdmin,
    pub(crate) publisher: BasePublisher,
    pub(crate) subscriber: Subscriber,
}

impl std::fmt::Debug for Clients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Clients { .. }")
    }
}

/// Builds the clients of `config`: its endpoint, and anonymous credentials when it
/// says so (the emulator), else Application Default Credentials.
pub(crate) async fn build_clients(config: &PubSubConfig) -> Result<Clients> {
    let credentials = config
        .anonymous
        .then(|| google_cloud_auth::credentials::anonymous::Builder::new().build());
    macro_rules! build {
        ($builder:expr) => {{
            let mut b = $builder;
            if let Some(e) = &config.endpoint {
                b = b.with_endpoint(e.clone());
            }
            if let Some(c) = &credentials {
                b = b.with_credentials(c.clone());
            }
            b.build().await.map_err(|e| {
                Error::with_source(
                    ErrorKind::Unavailable,
                    "could not build the Pub/Sub client",
                    e,
                )
            })?
        }};
    }
    Ok(Clients {
        topics: build!(TopicAdmin::builder()),
        subscriptions: build!(SubscriptionAdmin::builder()),
        publisher: build!(BasePublisher::builder()),
        subscriber: build!(Subscriber::builder()),
    })
}
