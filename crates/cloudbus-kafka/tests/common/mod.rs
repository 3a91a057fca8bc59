//! What the Kafka tests share: the broker's address (a loud skip outside CI, a
//! failure under CI=true), buses on it, and the conformance harnesses. Each test
//! binary uses part of it.
#![allow(dead_code)]

use std::time::Duration;

use async_trait::async_trait;
use cloudbus_conformance::emulator::required_env;
use cloudbus_conformance::{Harness, StreamHarness};
use cloudbus_core::{Bus, SubscriptionSpec};

/// The bootstrap servers of the broker scripts/kafka.sh starts (tansu), or `None`
/// (after a loud message) when the tests may skip.
pub fn bootstrap() -> Option<String> {
    required_env(
        "KAFKA_BOOTSTRAP_SERVERS",
        "the Kafka broker tests",
        "bash scripts/test.sh starts tansu with scripts/kafka.sh",
    )
}

/// A bus on `bootstrap` with `params` (`mode=structured`, ...). Its groups' session
/// timeout is 6 s: tansu holds a group's first join for half of it (23 s with
/// librdkafka's 45 s default).
pub async fn bus(bootstrap: &str, params: &str) -> cloudbus_core::Result<Bus> {
    let url = if params.is_empty() {
        format!("kafka://{bootstrap}?session_timeout_ms=6000")
    } else {
        format!("kafka://{bootstrap}?session_timeout_ms=6000&{params}")
    };
    cloudbus_kafka::connect(&url).await
}

/// A unique name.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{:08x}", fastrand::u32(..))
}

/// Kafka under the subscription suite, in one content mode.
#[derive(Clone)]
pub struct KafkaHarness {
    pub bootstrap: String,
    /// URL parameters (`mode=structured`).
    pub params: &'static str,
}

#[async_trait]
impl Harness for KafkaHarness {
    async fn bus(&self) -> cloudbus_core::Result<Bus> {
        bus(&self.bootstrap, self.params).await
    }
    fn patience(&self) -> Duration {
        Duration::from_secs(20)
    }
}

/// Kafka topics (three partitions each) under the stream suite; dead letters go to
/// a topic of the same broker. Structured mode: the suite's round trip keeps an
/// integer extension an integer, which binary mode's string headers cannot (the
/// binding's section 3.2.3; the subscription suite runs binary mode).
pub struct KafkaStreamHarness {
    pub bootstrap: String,
    /// On librdkafka's mock cluster, which has no CreateTopics: the harness makes its
    /// topics through the cluster's handle ([`mock_topic`]) and `ensure` finds them.
    pub mock: bool,
}

/// The mock cluster's handle is not `Send`: it stays on its own thread, which makes
/// topics on request.
struct Mock {
    bootstrap: String,
    create: std::sync::mpsc::Sender<(String, i32, std::sync::mpsc::Sender<()>)>,
}

fn mock() -> &'static Mock {
    static MOCK: std::sync::OnceLock<Mock> = std::sync::OnceLock::new();
    MOCK.get_or_init(|| {
        let (create, requests) =
            std::sync::mpsc::channel::<(String, i32, std::sync::mpsc::Sender<()>)>();
        let (started, bootstrap) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let cluster = rdkafka::mocking::MockCluster::new(1).expect("librdkafka's mock cluster");
            let _ = started.send(cluster.bootstrap_servers());
            for (topic, partitions, done) in requests {
                cluster
                    .create_topic(&topic, partitions, 1)
                    .expect("a topic of the mock cluster");
                let _ = done.send(());
            }
        });
        Mock {
            bootstrap: bootstrap.recv().expect("the mock cluster's address"),
            create,
        }
    })
}

/// The bootstrap servers of this process's mock cluster (one broker, started once).
pub fn mock_bootstrap() -> String {
    mock().bootstrap.clone()
}

/// Makes `topic` with `partitions` on the mock cluster.
pub fn mock_topic(topic: &str, partitions: i32) {
    let (done, wait) = std::sync::mpsc::channel();
    mock()
        .create
        .send((topic.to_owned(), partitions, done))
        .expect("the mock cluster's thread");
    wait.recv().expect("the topic made");
}

#[async_trait]
impl StreamHarness for KafkaStreamHarness {
    async fn bus(&self) -> cloudbus_core::Result<Bus> {
        bus(&self.bootstrap, "partitions=3&mode=structured").await
    }
    async fn new_stream(&self) -> cloudbus_core::Result<String> {
        let name = unique("stream");
        if self.mock {
            mock_topic(&name, 3);
        }
        self.bus().await?.ensure_topic(&name).await?;
        Ok(name)
    }
    async fn dead_letter_bus(&self) -> cloudbus_core::Result<Bus> {
        self.bus().await
    }
    async fn dead_letter_place(&self) -> cloudbus_core::Result<String> {
        let name = unique("stream-dl");
        if self.mock {
            for topic in [
                name.clone(),
                cloudbus_kafka::retry_topic(&name, &name),
                cloudbus_kafka::dead_letter_topic(&name, &name),
            ] {
                mock_topic(&topic, 3);
            }
        }
        let bus = self.dead_letter_bus().await?;
        bus.ensure_topic(&name).await?;
        bus.ensure_subscription(&SubscriptionSpec::new(&name, &name))
            .await?;
        Ok(name)
    }
    fn patience(&self) -> Duration {
        Duration::from_secs(20)
    }
}
