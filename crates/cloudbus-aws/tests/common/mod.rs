//! What the LocalStack tests share: the endpoint (a loud skip outside CI, a failure
//! under CI=true), buses on it with dummy credentials, and the conformance harness.
//! Each test binary uses part of it.
#![allow(dead_code)]

use std::time::Duration;

use async_trait::async_trait;
use cloudbus_aws::eventbridge::EventBridgeBus;
use cloudbus_aws::sns::SnsBus;
use cloudbus_aws::sqs::SqsBus;
use cloudbus_conformance::Harness;
use cloudbus_conformance::emulator::required_env;
use cloudbus_core::{Bus, SubscriptionSpec};

/// The AWS endpoint, or `None` (after a loud message) when the tests may skip.
pub fn endpoint() -> Option<String> {
    required_env(
        cloudbus_aws::ENDPOINT_ENV,
        "the AWS emulator tests",
        "bash scripts/test.sh starts LocalStack",
    )
}

/// An SQS bus on the emulator with dummy credentials (real ones are never needed).
pub async fn sqs(endpoint: &str) -> SqsBus {
    SqsBus::new(&config(endpoint).await)
}

pub async fn sns(endpoint: &str) -> SnsBus {
    SnsBus::new(&config(endpoint).await)
}

pub async fn eventbridge(endpoint: &str) -> EventBridgeBus {
    EventBridgeBus::new(&config(endpoint).await)
}

pub async fn config(endpoint: &str) -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .endpoint_url(endpoint)
        .region(aws_config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_sqs::config::Credentials::new(
            "test",
            "test",
            None,
            None,
            "cloudbus-tests",
        ))
        .load()
        .await
}

/// One way of mapping cloudbus onto AWS: SQS (standard or FIFO) alone, or SNS or
/// EventBridge into SQS.
pub struct SqsHarness {
    pub endpoint: String,
    pub fifo: bool,
    pub sns: bool,
    pub eventbridge: bool,
    /// SNS in structured mode (MessageBody-scope filter policies).
    pub structured: bool,
}

#[async_trait]
impl Harness for SqsHarness {
    async fn bus(&self) -> cloudbus_core::Result<Bus> {
        Ok(if self.eventbridge {
            eventbridge(&self.endpoint).await.into_bus()
        } else if self.sns && self.structured {
            sns(&self.endpoint).await.structured().into_bus()
        } else if self.sns {
            sns(&self.endpoint).await.into_bus()
        } else {
            sqs(&self.endpoint).await.into_bus()
        })
    }
    fn patience(&self) -> Duration {
        Duration::from_secs(30)
    }
    /// 2 s: with 1 s (SQS visibility timeouts are whole seconds), an extend that
    /// LocalStack answered late on a loaded machine let the message go
    /// (`eventbridge_with_sqs::extend_keeps_the_lease` failed once in CI).
    fn short_lease(&self) -> Duration {
        Duration::from_secs(2)
    }
    fn unique(&self, prefix: &str) -> String {
        let name = format!("{prefix}-{:08x}", fastrand::u32(..));
        if self.fifo {
            format!("{name}.fifo")
        } else {
            name
        }
    }
}

/// A Kinesis bus on the emulator whose new streams get `shards` shards.
pub async fn kinesis(endpoint: &str, shards: i32) -> cloudbus_aws::kinesis::KinesisBus {
    cloudbus_aws::kinesis::KinesisBus::with_shards(&config(endpoint).await, shards)
}

/// Kinesis streams (two shards each) under the stream suite; dead letters go to SQS.
pub struct KinesisHarness {
    pub endpoint: String,
}

#[async_trait]
impl cloudbus_conformance::StreamHarness for KinesisHarness {
    async fn bus(&self) -> cloudbus_core::Result<Bus> {
        Ok(kinesis(&self.endpoint, 2).await.into_bus())
    }
    async fn new_stream(&self) -> cloudbus_core::Result<String> {
        let name = format!("stream-{:08x}", fastrand::u32(..));
        self.bus().await?.ensure_topic(&name).await?;
        Ok(name)
    }
    async fn dead_letter_bus(&self) -> cloudbus_core::Result<Bus> {
        Ok(sqs(&self.endpoint).await.into_bus())
    }
    async fn dead_letter_place(&self) -> cloudbus_core::Result<String> {
        let name = format!("stream-dl-{:08x}", fastrand::u32(..));
        let bus = self.dead_letter_bus().await?;
        bus.ensure_topic(&name).await?;
        bus.ensure_subscription(&SubscriptionSpec::new(&name, &name))
            .await?;
        Ok(name)
    }
}
