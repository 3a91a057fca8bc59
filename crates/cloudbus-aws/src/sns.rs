//! Amazon SNS with SQS subscriptions: fan-out with filter policies.
//!
//! A topic is an SNS topic (FIFO when its name ends in `.fifo`). A subscription is an
//! SQS queue named after it, subscribed to the topic by `ensure_subscription` with raw
//! message delivery and the portable Filter compiled to a FilterPolicy. The queue gets
//! the SQS configuration (lease, dead-letter queue, redrive policy). Consumers read the
//! queue and unwrap the SNS notification envelope of subscriptions made without raw
//! delivery.
//!
//! Two modes (`sns://?mode=binary|structured`):
//! - binary (the default): CloudEvent attributes travel as `ce-` message attributes and
//!   filter policies use the MessageAttributes scope ([`filter_policy`]);
//! - structured: the body is the whole CloudEvent in JSON and filter policies use the
//!   MessageBody scope ([`body_filter_policy`]), which also compares numbers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use aws_sdk_sns::types::{MessageAttributeValue, PublishBatchRequestEntry};
use cloudbus_core::Bus;
use cloudbus_driver::{
    BatchResults, BinaryCodec, BusDriver, Capabilities, DeadLetterDriver, Error, ErrorKind, Filter,
    FilterSupport, Missing, OutgoingMessage, Payload, Result, SubscriptionDriver, SubscriptionSpec,
    SubscriptionState, TopicDriver, TopologyDriver, TopologyPlanning,
};
use serde_json::Value;

use crate::sqs::{self};

/// What an SNS topic with SQS subscriptions supports.
///
/// ```
/// let c = cloudbus_aws::sns::capabilities("orders");
/// assert!(c.fan_out && c.max_delay.is_none());
/// ```
pub fn capabilities(topic: &str) -> Capabilities {
    let mut c = sqs::capabilities(topic);
    c.fan_out = true;
    c.filtering = FilterSupport::Native;
    c.max_delay = None;
    c
}

pub(crate) fn kind_of_code(code: &str) -> ErrorKind {
    if let Some(kind) = crate::error::common_kind(code) {
        return kind;
    }
    match code {
        "NotFound" | "NotFoundException" => ErrorKind::NotFound,
        c if c.contains("Throttl") => ErrorKind::Throttled,
        c if c.contains("AuthorizationError") || c.contains("AccessDenied") => {
            ErrorKind::PermissionDenied
        }
        c if c.contains("TooLong") || c.contains("TooLarge") => ErrorKind::TooLarge,
        c if c.contains("Invalid") => ErrorKind::InvalidArgument,
        c if c.contains("Internal") || c.contains("Unavailable") => ErrorKind::Unavailable,
        _ => ErrorKind::Internal,
    }
}

/// Compiles a portable filter to an SNS FilterPolicy over message attributes, where a
/// CloudEvent attribute `a` travels as `ce-a`. A numeric range (cloudbus sends String
/// attributes, which SNS does not compare numerically) and two conditions on one
/// attribute inside an AND have no FilterPolicy form: typed `Unsupported` errors.
///
/// ```
/// use cloudbus_driver::Filter;
/// let p = cloudbus_aws::sns::filter_policy(&Filter::and([
///     Filter::prefix("type", "order."),
///     Filter::one_of("tier", ["gold", "vip"]),
/// ])).unwrap();
/// assert_eq!(p, serde_json::json!({
///     "ce-type": [{"prefix": "order."}],
///     "ce-tier": ["gold", "vip"],
/// }));
/// ```
pub fn filter_policy(filter: &Filter) -> Result<Value> {
    crate::filter::content_pattern(
        filter,
        &crate::filter::PatternRules {
            what: "an SNS filter policy",
            key_prefix: sqs::ATTRIBUTE_PREFIX,
            numeric: false,
        },
    )
}

/// Compiles a portable filter to an SNS FilterPolicy of MessageBody scope over a
/// structured CloudEvent body, where attribute `a` is the top-level key `a`. Unlike the
/// attribute scope, numeric ranges compile (to `numeric`). Two conditions on one
/// attribute inside an AND are a typed `Unsupported` error.
///
/// ```
/// use cloudbus_driver::Filter;
/// let p = cloudbus_aws::sns::body_filter_policy(&Filter::and([
///     Filter::prefix("type", "order."),
///     Filter::range("amount", Some(10.0), None),
/// ])).unwrap();
/// assert_eq!(p, serde_json::json!({
///     "type": [{"prefix": "order."}],
///     "amount": [{"numeric": [">=", 10.0]}],
/// }));
/// ```
pub fn body_filter_policy(filter: &Filter) -> Result<Value> {
    crate::filter::content_pattern(
        filter,
        &crate::filter::PatternRules {
            what: "an SNS filter policy",
            key_prefix: "",
            numeric: true,
        },
    )
}

/// What every SNS driver of one bus shares: the SNS client, the SQS context of its
/// subscription queues and the topic ARNs looked up so far.
struct SnsContext {
    /// Bodies are structured CloudEvents and filter policies use the MessageBody scope.
    structured: bool,
    sns: aws_sdk_sns::Client,
    sqs: Arc<sqs::SqsContext>,
    arns: Mutex<HashMap<String, String>>,
}

impl SnsContext {
    /// The ARN of topic `name` (ListTopics, cached): NotFound when it does not exist.
    async fn arn(&self, name: &str) -> Result<String> {
        if let Some(a) = self
            .arns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
        {
            return Ok(a.clone());
        }
        let suffix = format!(":{name}");
        let mut pages = self.sns.list_topics().into_paginator().send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| crate::error::sdk_error(e, kind_of_code, "list topics"))?;
            for t in page.topics() {
                if let Some(arn) = t.topic_arn()
                    && arn.ends_with(&suffix)
                {
                    self.arns
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(name.to_owned(), arn.to_owned());
                    return Ok(arn.to_owned());
                }
            }
        }
        Err(Error::not_found(format!("SNS topic {name} does not exist")))
    }
}

/// SNS with SQS subscriptions as a cloudbus provider
/// (`sns://[?region=R][&endpoint=URL][&mode=structured]`).
#[derive(Clone)]
pub struct SnsBus {
    shared: Arc<SnsContext>,
}

impl std::fmt::Debug for SnsBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SnsBus { .. }")
    }
}

impl SnsBus {
    /// A bus over the SNS and SQS clients made from `config`.
    pub fn new(config: &aws_config::SdkConfig) -> Self {
        SnsBus {
            shared: Arc::new(SnsContext {
                structured: false,
                sns: aws_sdk_sns::Client::new(config),
                sqs: Arc::new(sqs::SqsContext::new(aws_sdk_sqs::Client::new(config))),
                arns: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// Structured mode: every event is published as a structured CloudEvent body (with
    /// routing hints as attributes), and `ensure_subscription` compiles filters to
    /// MessageBody-scope policies, so numeric ranges and every attribute can be
    /// filtered on, however many attributes an event has. Publishers and the
    /// subscriptions they feed should agree on the mode.
    ///
    /// ```no_run
    /// # async fn run() -> cloudbus_driver::Result<()> {
    /// let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    /// let bus = cloudbus_aws::sns::SnsBus::new(&config).structured().into_bus();
    /// # Ok(()) }
    /// ```
    pub fn structured(self) -> Self {
        let s = &self.shared;
        SnsBus {
            shared: Arc::new(SnsContext {
                structured: true,
                sns: s.sns.clone(),
                sqs: s.sqs.clone(),
                arns: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The SNS client (escape hatch).
    pub fn sns_client(&self) -> &aws_sdk_sns::Client {
        &self.shared.sns
    }

    /// The SQS client of the subscriptions (escape hatch).
    pub fn sqs_client(&self) -> &aws_sdk_sqs::Client {
        &self.shared.sqs.client
    }

    /// Wraps this driver in the portable [`Bus`].
    pub fn into_bus(self) -> Bus {
        Bus::new(Arc::new(self))
    }
}

#[async_trait]
impl BusDriver for SnsBus {
    fn scheme(&self) -> &str {
        "sns"
    }

    async fn topic(&self, topic: &str) -> Result<Arc<dyn TopicDriver>> {
        Ok(Arc::new(SnsTopic {
            shared: self.shared.clone(),
            name: topic.to_owned(),
            codec: if self.shared.structured {
                sqs::codec().structured()
            } else {
                sqs::codec()
            },
            filter_keys: tokio::sync::Mutex::new(None),
        }))
    }

    async fn subscription(
        &self,
        _topic: &str,
        subscription: &str,
    ) -> Result<Arc<dyn SubscriptionDriver>> {
        Ok(crate::sqs_subscriptions::subscription(
            &self.shared.sqs,
            subscription,
        ))
    }

    async fn dead_letters(
        &self,
        _topic: &str,
        subscription: &str,
    ) -> Result<Arc<dyn DeadLetterDriver>> {
        Ok(crate::sqs_subscriptions::dead_letters(
            &self.shared.sqs,
            subscription,
        ))
    }

    fn topology(&self) -> Arc<dyn TopologyDriver> {
        Arc::new(SnsTopology {
            shared: self.shared.clone(),
        })
    }
}

/// An SNS topic as a [`TopicDriver`] (PublishBatch).
pub struct SnsTopic {
    shared: Arc<SnsContext>,
    name: String,
    codec: BinaryCodec,
    /// The message attributes the topic's subscriptions filter on, and when they were
    /// read (see [`FILTER_KEYS_TTL`]).
    filter_keys: tokio::sync::Mutex<Option<(std::time::Instant, Arc<Vec<String>>)>>,
}

/// How long the attributes a topic's subscriptions filter on are cached before the
/// subscriptions are read again (a new subscription's filter is honoured after this).
pub const FILTER_KEYS_TTL: std::time::Duration = std::time::Duration::from_secs(30);

/// The message attributes a MessageAttributes-scope FilterPolicy looks at: its
/// top-level keys, and those inside `$or`.
pub fn filter_policy_keys(policy: &Value) -> Vec<String> {
    let mut keys = Vec::new();
    if let Value::Object(map) = policy {
        for (k, v) in map {
            if k == "$or" {
                for alternative in v.as_array().into_iter().flatten() {
                    keys.extend(filter_policy_keys(alternative));
                }
            } else {
                keys.push(k.clone());
            }
        }
    }
    keys.sort();
    keys.dedup();
    keys
}

impl SnsTopic {
    /// The attributes the topic's subscriptions filter on (MessageAttributes scope),
    /// read at most every [`FILTER_KEYS_TTL`]. In binary mode an event with more
    /// attributes than SNS carries falls back to structured mode with a few routing
    /// attributes; these must be among them, or the publish fails.
    async fn filter_keys(&self) -> Result<Arc<Vec<String>>> {
        let mut cached = self.filter_keys.lock().await;
        if let Some((at, keys)) = cached.as_ref()
            && at.elapsed() < FILTER_KEYS_TTL
        {
            return Ok(keys.clone());
        }
        let arn = self.shared.arn(&self.name).await?;
        let what = format!("subscriptions of {}", self.name);
        let mut keys = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let page = self
                .shared
                .sns
                .list_subscriptions_by_topic()
                .topic_arn(&arn)
                .set_next_token(next.take())
                .send()
                .await
                .map_err(|e| crate::error::sdk_error(e, kind_of_code, &what))?;
            for sub in page.subscriptions() {
                let Some(sub_arn) = sub.subscription_arn().filter(|a| a.starts_with("arn:")) else {
                    continue; // "PendingConfirmation"
                };
                let attrs = self
                    .shared
                    .sns
                    .get_subscription_attributes()
                    .subscription_arn(sub_arn)
                    .send()
                    .await
                    .map_err(|e| crate::error::sdk_error(e, kind_of_code, &what))?;
                let attrs = attrs.attributes();
                let body_scope = attrs
                    .and_then(|a| a.get("FilterPolicyScope"))
                    .is_some_and(|s| s == "MessageBody");
                if let (false, Some(policy)) =
                    (body_scope, attrs.and_then(|a| a.get("FilterPolicy")))
                    && let Ok(policy) = serde_json::from_str::<Value>(policy)
                {
                    keys.extend(filter_policy_keys(&policy));
                }
            }
            match page.next_token() {
                Some(t) if !t.is_empty() => next = Some(t.to_owned()),
                _ => break,
            }
        }
        keys.sort();
        keys.dedup();
        let keys = Arc::new(keys);
        *cached = Some((std::time::Instant::now(), keys.clone()));
        Ok(keys)
    }

    fn entry(
        &self,
        id: usize,
        m: &OutgoingMessage,
        filter_keys: &[String],
    ) -> Result<PublishBatchRequestEntry> {
        let raw = match &m.payload {
            Payload::Event(e) if self.shared.structured => self.codec.encode(e)?.0,
            Payload::Event(e) => sqs::text_body(&self.codec, e, filter_keys)?,
            Payload::Raw(raw) => raw.clone(),
        };
        let body = String::from_utf8(raw.body)
            .map_err(|_| Error::invalid("an SNS message must be UTF-8 text"))?;
        let mut e = PublishBatchRequestEntry::builder()
            .id(id.to_string())
            .message(body);
        for (k, v) in &raw.attributes {
            e = e.message_attributes(
                k,
                MessageAttributeValue::builder()
                    .data_type("String")
                    .string_value(v)
                    .build()
                    .map_err(|e| Error::with_source(ErrorKind::InvalidArgument, "attribute", e))?,
            );
        }
        if self.name.ends_with(".fifo") {
            e = e
                .message_group_id(sqs::group_id(m))
                .message_deduplication_id(sqs::dedup_id_of(m));
        }
        e.build()
            .map_err(|e| Error::with_source(ErrorKind::InvalidArgument, "invalid SNS entry", e))
    }
}

#[async_trait]
impl TopicDriver for SnsTopic {
    async fn send_batch(&self, batch: &[OutgoingMessage]) -> Result<BatchResults> {
        let arn = self.shared.arn(&self.name).await?;
        let filter_keys = if self.shared.structured {
            Arc::default()
        } else {
            self.filter_keys().await?
        };
        let (mut results, _, entries) =
            crate::batch::build_entries(batch, |i, m| self.entry(i, m, &filter_keys));
        if !entries.is_empty() {
            let out = self
                .shared
                .sns
                .publish_batch()
                .topic_arn(&arn)
                .set_publish_batch_request_entries(Some(entries))
                .send()
                .await
                .map_err(|e| {
                    crate::error::sdk_error(e, kind_of_code, &format!("publish to {}", self.name))
                })?;
            let what = format!("publish to {}", self.name);
            for ok in out.successful() {
                crate::batch::report(&mut results, ok.id().unwrap_or_default(), Ok(()));
            }
            for f in out.failed() {
                let error = Error::new(
                    kind_of_code(f.code()),
                    format!("{what}: {}: {}", f.code(), f.message().unwrap_or_default()),
                );
                crate::batch::report(&mut results, f.id(), Err(error));
            }
        }
        Ok(crate::batch::finish(results, "SNS"))
    }

    fn capabilities(&self) -> Capabilities {
        capabilities(&self.name)
    }
}

struct SnsTopology {
    shared: Arc<SnsContext>,
}

impl SnsTopology {
    /// The filter policy of `spec` and where it applies (the body in structured mode,
    /// the message attributes otherwise).
    fn policy_of(&self, spec: &SubscriptionSpec) -> Result<(&'static str, Option<Value>)> {
        let (scope, policy) = if self.shared.structured {
            ("MessageBody", spec.filter.as_ref().map(body_filter_policy))
        } else {
            ("MessageAttributes", spec.filter.as_ref().map(filter_policy))
        };
        Ok((scope, policy.transpose()?))
    }

    /// The SNS subscriptions of `topic` that deliver to queue `name` (none when the
    /// topic or the queue is missing).
    async fn subscription_arns(&self, topic: &str, name: &str) -> Result<Vec<String>> {
        let (Some(topic_arn), Some(url)) = (
            self.shared.arn(topic).await.missing_as_none()?,
            self.shared.sqs.url(name).await.missing_as_none()?,
        ) else {
            return Ok(Vec::new());
        };
        let queue_arn = self
            .shared
            .sqs
            .attribute(&url, aws_sdk_sqs::types::QueueAttributeName::QueueArn)
            .await?
            .unwrap_or_default();
        let mut arns = Vec::new();
        let mut pages = self
            .shared
            .sns
            .list_subscriptions_by_topic()
            .topic_arn(&topic_arn)
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page =
                page.map_err(|e| crate::error::sdk_error(e, kind_of_code, "list subscriptions"))?;
            for s in page.subscriptions() {
                if s.endpoint() == Some(queue_arn.as_str())
                    && let Some(arn) = s.subscription_arn()
                {
                    arns.push(arn.to_owned());
                }
            }
        }
        Ok(arns)
    }
}

#[async_trait]
impl TopologyDriver for SnsTopology {
    async fn ensure_topic(&self, topic: &str) -> Result<()> {
        let mut req = self.shared.sns.create_topic().name(topic);
        if topic.ends_with(".fifo") {
            req = req.attributes("FifoTopic", "true");
        }
        let out = req.send().await.map_err(|e| {
            crate::error::sdk_error(e, kind_of_code, &format!("create topic {topic}"))
        })?;
        if let Some(arn) = out.topic_arn() {
            self.shared
                .arns
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(topic.to_owned(), arn.to_owned());
        }
        Ok(())
    }

    async fn ensure_subscription(&self, spec: &SubscriptionSpec) -> Result<()> {
        let (scope, policy) = self.policy_of(spec)?;
        let topic_arn = self.shared.arn(&spec.topic).await?;
        let queue = &spec.name;
        // The topic, and only it, may send to the queue.
        let queue_arn = crate::sqs_subscriptions::create_queue(
            &self.shared.sqs,
            spec,
            "sns.amazonaws.com",
            &topic_arn,
        )
        .await?;
        let mut req = self
            .shared
            .sns
            .subscribe()
            .topic_arn(&topic_arn)
            .protocol("sqs")
            .endpoint(&queue_arn)
            .return_subscription_arn(true)
            .attributes("RawMessageDelivery", "true");
        if let Some(policy) = policy {
            req = req
                .attributes("FilterPolicy", policy.to_string())
                .attributes("FilterPolicyScope", scope);
        }
        req.send().await.map_err(|e| {
            crate::error::sdk_error(
                e,
                kind_of_code,
                &format!("subscribe {queue} to {}", spec.topic),
            )
        })?;
        Ok(())
    }

    async fn delete_subscription(&self, topic: &str, name: &str) -> Result<()> {
        for arn in self.subscription_arns(topic, name).await? {
            self.shared
                .sns
                .unsubscribe()
                .subscription_arn(arn)
                .send()
                .await
                .map_err(|e| crate::error::sdk_error(e, kind_of_code, "unsubscribe"))?;
        }
        Ok(())
    }

    fn planning(&self) -> Option<&dyn TopologyPlanning> {
        Some(self)
    }
}

#[async_trait]
impl TopologyPlanning for SnsTopology {
    async fn topic_exists(&self, topic: &str) -> Result<bool> {
        Ok(self.shared.arn(topic).await.missing_as_none()?.is_some())
    }

    /// The subscription's filter policy and its queue's settings.
    async fn describe_subscription(
        &self,
        topic: &str,
        name: &str,
    ) -> Result<Option<SubscriptionState>> {
        let Some(arn) = self
            .subscription_arns(topic, name)
            .await?
            .into_iter()
            .next()
        else {
            return Ok(None);
        };
        let Some(mut state) = sqs::queue_state(&self.shared.sqs, name).await? else {
            return Ok(None);
        };
        let attributes = self
            .shared
            .sns
            .get_subscription_attributes()
            .subscription_arn(&arn)
            .send()
            .await
            .map_err(|e| {
                crate::error::sdk_error(e, kind_of_code, &format!("subscription {name}"))
            })?;
        state.filter = attributes
            .attributes()
            .and_then(|a| a.get("FilterPolicy"))
            .map(|p| crate::filter::canonical_json(p))
            .filter(|p| p != "{}" && !p.is_empty());
        Ok(Some(state))
    }

    fn desired_state(&self, spec: &SubscriptionSpec) -> Result<SubscriptionState> {
        let (_, policy) = self.policy_of(spec)?;
        let mut state = sqs::queue_desired(spec);
        state.filter = policy.map(|p| crate::filter::canonical_json(&p.to_string()));
        Ok(state)
    }

    /// Sets the filter policy of the existing subscription (`{}` removes it) and the
    /// queue's settings again.
    async fn update_subscription(&self, spec: &SubscriptionSpec) -> Result<()> {
        let (scope, policy) = self.policy_of(spec)?;
        let Some(arn) = self
            .subscription_arns(&spec.topic, &spec.name)
            .await?
            .into_iter()
            .next()
        else {
            return Err(Error::not_found(format!(
                "queue {} is not subscribed to SNS topic {}",
                spec.name, spec.topic
            )));
        };
        let set = |name: &'static str, value: String| {
            self.shared
                .sns
                .set_subscription_attributes()
                .subscription_arn(&arn)
                .attribute_name(name)
                .attribute_value(value)
                .send()
        };
        let what = format!("filter policy of subscription {}", spec.name);
        if policy.is_some() {
            set("FilterPolicyScope", scope.to_owned())
                .await
                .map_err(|e| crate::error::sdk_error(e, kind_of_code, &what))?;
        }
        set(
            "FilterPolicy",
            policy.map_or_else(|| "{}".to_owned(), |p| p.to_string()),
        )
        .await
        .map_err(|e| crate::error::sdk_error(e, kind_of_code, &what))?;
        let topic_arn = self.shared.arn(&spec.topic).await?;
        crate::sqs_subscriptions::create_queue(
            &self.shared.sqs,
            spec,
            "sns.amazonaws.com",
            &topic_arn,
        )
        .await
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Each Filter form compiles to the FilterPolicy syntax AWS documents.
    #[test]
    fn each_filter_form_compiles_to_a_filter_policy() {
        let cases = [
            (Filter::eq("type", "a"), json!({"ce-type": ["a"]})),
            (
                Filter::prefix("type", "o."),
                json!({"ce-type": [{"prefix": "o."}]}),
            ),
            (
                Filter::exists("tier"),
                json!({"ce-tier": [{"exists": true}]}),
            ),
            (
                Filter::not_exists("tier"),
                json!({"ce-tier": [{"exists": false}]}),
            ),
            (
                Filter::anything_but("tier", ["test"]),
                json!({"ce-tier": [{"anything-but": ["test"]}]}),
            ),
            (
                Filter::or([Filter::eq("a", "1"), Filter::eq("b", "2")]),
                json!({"$or": [{"ce-a": ["1"]}, {"ce-b": ["2"]}]}),
            ),
        ];
        for (f, want) in cases {
            assert_eq!(filter_policy(&f).unwrap(), want, "{f:?}");
        }
        for bad in [
            Filter::range("amount", Some(1.0), None),
            Filter::and([Filter::prefix("type", "a"), Filter::eq("type", "ab")]),
        ] {
            assert_eq!(
                filter_policy(&bad).unwrap_err().kind(),
                ErrorKind::Unsupported
            );
        }
    }
}
