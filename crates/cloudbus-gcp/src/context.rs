//! What every Pub/Sub driver of one bus shares: the configuration, the clients
//! (built on first use) and the batching publisher of each topic.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use cloudbus_driver::Result;
use google_cloud_pubsub::client::Publisher;
use tokio::sync::OnceCell;

use crate::auth::{Clients, build_clients};
use crate::capabilities::MAX_BATCH_COUNT;
use crate::config::PubSubConfig;

/// What every Pub/Sub driver of one bus shares: the configuration, the clients and
/// the publishers per topic.
pub(crate) struct PubSubContext {
    pub(crate) config: PubSubConfig,
    clients: OnceCell<Clients>,
    /// Publishers by topic path, shared by the topic drivers and the dead-letter paths.
    publishers: Mutex<HashMap<String, Publisher>>,
}

impl PubSubContext {
    /// The context of `config`; the clients are built on first use.
    pub(crate) fn new(config: PubSubConfig) -> Self {
        PubSubContext {
            config,
            clients: OnceCell::new(),
            publishers: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) async fn clients(&self) -> Result<&Clients> {
        self.clients
            .get_or_try_init(|| build_clients(&self.config))
            .await
    }

    /// The batching publisher of one topic (the batches themselves are made by core).
    pub(crate) async fn publisher(&self, topic_path: &str) -> Result<Publisher> {
        if let Some(p) = lock(&self.publishers).get(topic_path) {
            return Ok(p.clone());
        }
        let base = self.clients().await?.publisher.clone();
        let mut map = lock(&self.publishers);
        Ok(map
            .entry(topic_path.to_owned())
            .or_insert_with(|| {
                base.publisher(topic_path.to_owned())
                    // cloudbus core forms the batches; the crate sends each on flush.
                    .set_message_count_threshold(MAX_BATCH_COUNT as u32)
                    .set_byte_threshold(10_000_000)
                    .set_delay_threshold(Duration::from_millis(10))
                    .build()
            })
            .clone())
    }
}

/// Locks `m`, going on with the data of a poisoned lock.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
