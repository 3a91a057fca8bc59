//! Amazon EventBridge: event buses as topics, rules with SQS targets as subscriptions.
//!
//! Publishing is PutEvents: Source = the CloudEvent `source`, DetailType = `type`,
//! Time = `time`, Resources = the `subject` when it is an ARN, and Detail = the whole
//! CloudEvent in structured JSON (always a JSON object: non-JSON data is carried as
//! `data` text or `data_base64`), so that every attribute and extension comes back.
//! `ensure_subscription` makes a rule on the bus whose event pattern is the portable
//! Filter compiled over `detail` and whose target is an SQS queue named after the
//! subscription (with the SQS lease, dead-letter queue and redrive policy). The
//! consumer reads the queue and unwraps the EventBridge envelope.
//!
//! Replay: a bus made with an archive ([`EventBridgeBus::with_archive`],
//! `eventbridge://?archive_days=N`) gets an archive of all its events from
//! `ensure_topic`, and `Bus::replay(bus, subscription, since)` starts an EventBridge
//! replay (StartReplay) from that archive to the bus, limited to the subscription's rule.

use std::sync::Arc;

use async_trait::async_trait;
use aws_sdk_eventbridge::types::{PutEventsRequestEntry, Target};
use chrono::{DateTime, Utc};
use cloudbus_core::Bus;
use cloudbus_driver::codec::to_structured_json;
use cloudbus_driver::{
    AttributesReader, BatchResults, BusDriver, Capabilities, DeadLetterDriver, Error, ErrorKind,
    Filter, FilterSupport, Missing, OutgoingMessage, Payload, Result, SubscriptionDriver,
    SubscriptionSpec, SubscriptionState, TopicDriver, TopologyDriver, TopologyPlanning,
};
use serde_json::{Value, json};

use crate::sqs::{self};

/// Retries EventBridge makes to deliver to a rule's queue before the dead-letter
/// queue (the service's maximum).
pub const TARGET_MAX_RETRIES: i32 = 185;
/// How long EventBridge keeps trying (the service's maximum, 24 hours).
pub const TARGET_MAX_EVENT_AGE_SECONDS: i32 = 86_400;
/// Most entries in one PutEvents call.
pub const MAX_BATCH_COUNT: usize = 10;
/// Most bytes in one PutEvents call (and so in one event).
pub const MAX_BATCH_BYTES: usize = 256 * 1024;
/// The event bus every account has.
pub const DEFAULT_BUS: &str = "default";

/// What an event bus with SQS-targeted rules supports.
///
/// ```
/// let c = cloudbus_aws::eventbridge::capabilities();
/// assert!(c.fan_out && !c.ordering);
/// ```
pub fn capabilities() -> Capabilities {
    let mut c = sqs::capabilities("bus");
    // With an archive (EventBridgeBus::with_archive).
    c.replay = true;
    c.fan_out = true;
    c.filtering = FilterSupport::Native;
    c.max_delay = None;
    c.ordering = false;
    c.raw_messages = false;
    c.max_message_bytes = MAX_BATCH_BYTES;
    c.max_batch_count = MAX_BATCH_COUNT;
    c.max_batch_bytes = MAX_BATCH_BYTES;
    c
}

pub(crate) fn kind_of_code(code: &str) -> ErrorKind {
    if let Some(kind) = crate::error::common_kind(code) {
        return kind;
    }
    match code {
        c if c.contains("ResourceNotFound") => ErrorKind::NotFound,
        c if c.contains("ResourceAlreadyExists") => ErrorKind::AlreadyExists,
        c if c.contains("Throttl") || c.contains("LimitExceeded") => ErrorKind::Throttled,
        c if c.contains("AccessDenied") || c.contains("NotAuthorized") => {
            ErrorKind::PermissionDenied
        }
        c if c.contains("TooLarge") || c.contains("TooLong") => ErrorKind::TooLarge,
        c if c.contains("Invalid") || c.contains("Validation") => ErrorKind::InvalidArgument,
        c if c.contains("Internal") || c.contains("Unavailable") => ErrorKind::Unavailable,
        _ => ErrorKind::Internal,
    }
}

/// Compiles a portable filter to an EventBridge event pattern over `detail` (the
/// structured CloudEvent), where attribute `a` is `detail.a`.
///
/// ```
/// use cloudbus_driver::Filter;
/// let p = cloudbus_aws::eventbridge::event_pattern(Some(&Filter::prefix("type", "order."))).unwrap();
/// assert_eq!(p, serde_json::json!({"detail": {"type": [{"prefix": "order."}]}}));
/// ```
pub fn event_pattern(filter: Option<&Filter>) -> Result<Value> {
    match filter {
        // Every cloudbus event: Detail is a CloudEvent, which has a specversion.
        None => Ok(json!({ "detail": { "specversion": [{ "exists": true }] } })),
        Some(f) => Ok(
            json!({ "detail": crate::filter::content_pattern(f, &crate::filter::PatternRules {
            what: "an EventBridge pattern",
            key_prefix: "",
            numeric: true,
        })? }),
        ),
    }
}

/// What every EventBridge driver of one bus shares: the EventBridge client, the SQS
/// context of its target queues and the archive setting.
struct EventBridgeContext {
    /// Days `ensure_topic` archives events for (0 = for ever); `None`: no archive.
    archive_days: Option<i32>,
    events: aws_sdk_eventbridge::Client,
    sqs: Arc<sqs::SqsContext>,
}

/// EventBridge with SQS-targeted rules
/// (`eventbridge://[?region=R][&endpoint=URL][&archive_days=N]`).
#[derive(Clone)]
pub struct EventBridgeBus {
    shared: Arc<EventBridgeContext>,
}

impl std::fmt::Debug for EventBridgeBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventBridgeBus { .. }")
    }
}

impl EventBridgeBus {
    /// A bus over the EventBridge and SQS clients made from `config`.
    pub fn new(config: &aws_config::SdkConfig) -> Self {
        EventBridgeBus {
            shared: Arc::new(EventBridgeContext {
                archive_days: None,
                events: aws_sdk_eventbridge::Client::new(config),
                sqs: Arc::new(sqs::SqsContext::new(aws_sdk_sqs::Client::new(config))),
            }),
        }
    }

    /// Archives every event of the buses this bus's `ensure_topic` declares, for
    /// `retention_days` (0: for ever), so that subscriptions can be replayed
    /// ([`Bus::replay`]). The archive of bus `b` is named [`archive_name`]`(b)`.
    ///
    /// ```no_run
    /// # async fn run() -> cloudbus_driver::Result<()> {
    /// let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
    /// let bus = cloudbus_aws::eventbridge::EventBridgeBus::new(&config).with_archive(30).into_bus();
    /// bus.ensure_topic("orders").await?;
    /// bus.replay("orders", "billing", chrono::Utc::now() - chrono::Duration::hours(2)).await?;
    /// # Ok(()) }
    /// ```
    pub fn with_archive(self, retention_days: u32) -> Self {
        let s = &self.shared;
        EventBridgeBus {
            shared: Arc::new(EventBridgeContext {
                archive_days: Some(retention_days.min(i32::MAX as u32) as i32),
                events: s.events.clone(),
                sqs: s.sqs.clone(),
            }),
        }
    }

    /// The EventBridge client (escape hatch).
    pub fn events_client(&self) -> &aws_sdk_eventbridge::Client {
        &self.shared.events
    }

    /// Wraps this driver in the portable [`Bus`].
    pub fn into_bus(self) -> Bus {
        Bus::new(Arc::new(self))
    }
}

#[async_trait]
impl BusDriver for EventBridgeBus {
    fn scheme(&self) -> &str {
        "eventbridge"
    }

    async fn topic(&self, topic: &str) -> Result<Arc<dyn TopicDriver>> {
        Ok(Arc::new(EventBus {
            shared: self.shared.clone(),
            name: topic.to_owned(),
            exists: tokio::sync::OnceCell::new(),
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
        Arc::new(EventBridgeTopology {
            shared: self.shared.clone(),
        })
    }
}

/// The archive cloudbus keeps for `bus`: `cloudbus-` and the bus name, with characters
/// an archive name cannot have replaced by `-`, cut to the 48 characters allowed.
///
/// ```
/// assert_eq!(cloudbus_aws::eventbridge::archive_name("orders"), "cloudbus-orders");
/// assert_eq!(cloudbus_aws::eventbridge::archive_name("aws.partner/x"), "cloudbus-aws.partner-x");
/// ```
pub fn archive_name(bus: &str) -> String {
    format!("cloudbus-{}", resource_name_chars(bus).collect::<String>())
        .chars()
        .take(48)
        .collect()
}

/// `name` in the alphabet of archive and replay names (`[.\-_A-Za-z0-9]`): any other
/// character becomes `-`.
fn resource_name_chars(name: &str) -> impl Iterator<Item = char> + '_ {
    name.chars().map(|c| {
        if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
            c
        } else {
            '-'
        }
    })
}

/// A replay name: the subscription and the start in milliseconds, within the 64
/// characters and the alphabet EventBridge allows.
fn replay_name(subscription: &str, now: DateTime<Utc>) -> String {
    let stamp = format!("-{}", now.timestamp_millis());
    let clean: String = resource_name_chars(subscription)
        .take(64 - stamp.len())
        .collect();
    format!("{clean}{stamp}")
}

/// An event bus as a [`TopicDriver`] (PutEvents).
pub struct EventBus {
    shared: Arc<EventBridgeContext>,
    name: String,
    /// Whether the bus exists, asked once (PutEvents does not say it everywhere).
    exists: tokio::sync::OnceCell<()>,
}

fn entry(bus: &str, m: &OutgoingMessage) -> Result<PutEventsRequestEntry> {
    let Payload::Event(e) = &m.payload else {
        return Err(Error::unsupported(
            "EventBridge carries CloudEvents only; raw messages cannot be published",
        ));
    };
    let detail = String::from_utf8(to_structured_json(e)?)
        .map_err(|_| Error::invalid("the structured CloudEvent is not UTF-8"))?;
    let mut b = PutEventsRequestEntry::builder()
        .event_bus_name(bus)
        .source(e.source().to_string())
        .detail_type(e.ty())
        .detail(detail);
    if let Some(t) = e.time() {
        b = b.time(aws_sdk_eventbridge::primitives::DateTime::from_millis(
            t.timestamp_millis(),
        ));
    }
    if let Some(s) = e.subject()
        && s.starts_with("arn:")
    {
        b = b.resources(s);
    }
    Ok(b.build())
}

#[async_trait]
impl TopicDriver for EventBus {
    async fn send_batch(&self, batch: &[OutgoingMessage]) -> Result<BatchResults> {
        self.exists
            .get_or_try_init(|| async {
                self.shared
                    .events
                    .describe_event_bus()
                    .name(&self.name)
                    .send()
                    .await
                    .map(|_| ())
                    .map_err(|e| {
                        crate::error::sdk_error(
                            e,
                            kind_of_code,
                            &format!("event bus {}", self.name),
                        )
                    })
            })
            .await?;
        let (mut results, index, entries) =
            crate::batch::build_entries(batch, |_, m| entry(&self.name, m));
        if !entries.is_empty() {
            let out = self
                .shared
                .events
                .put_events()
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(|e| {
                    crate::error::sdk_error(
                        e,
                        kind_of_code,
                        &format!("put events on {}", self.name),
                    )
                })?;
            // One result per entry, in order: an event id, or an error code.
            for (slot, r) in index.iter().zip(out.entries()) {
                results[*slot] = Some(match (r.event_id(), r.error_code()) {
                    (_, Some(code)) => Err(Error::new(
                        kind_of_code(code),
                        format!(
                            "put event on {}: {code}: {}",
                            self.name,
                            r.error_message().unwrap_or_default()
                        ),
                    )),
                    (Some(_), None) => Ok(()),
                    (None, None) => Err(Error::new(
                        ErrorKind::Internal,
                        "EventBridge returned neither an id nor an error",
                    )),
                });
            }
        }
        Ok(crate::batch::finish(results, "EventBridge"))
    }

    fn capabilities(&self) -> Capabilities {
        capabilities()
    }
}

struct EventBridgeTopology {
    shared: Arc<EventBridgeContext>,
}

impl EventBridgeTopology {
    async fn bus_arn(&self, bus: &str) -> Result<String> {
        let out = self
            .shared
            .events
            .describe_event_bus()
            .name(bus)
            .send()
            .await
            .map_err(|e| crate::error::sdk_error(e, kind_of_code, &format!("event bus {bus}")))?;
        out.arn()
            .map(str::to_owned)
            .ok_or_else(|| Error::not_found(format!("event bus {bus} has no ARN")))
    }

    /// Creates the bus's archive if it is missing.
    async fn ensure_archive(&self, bus: &str, retention_days: i32) -> Result<()> {
        let name = archive_name(bus);
        let source = self.bus_arn(bus).await?;
        match self
            .shared
            .events
            .create_archive()
            .archive_name(&name)
            .event_source_arn(source)
            .retention_days(retention_days)
            .description("cloudbus: every event of the bus, for Bus::replay")
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => {
                let e = crate::error::sdk_error(e, kind_of_code, &format!("create archive {name}"));
                if e.kind() == ErrorKind::AlreadyExists {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }

    /// The rule of subscription `name` on bus `topic` (NotFound when there is none).
    async fn describe_rule(
        &self,
        topic: &str,
        name: &str,
    ) -> Result<aws_sdk_eventbridge::operation::describe_rule::DescribeRuleOutput> {
        self.shared
            .events
            .describe_rule()
            .name(name)
            .event_bus_name(topic)
            .send()
            .await
            .map_err(|e| {
                crate::error::sdk_error(e, kind_of_code, &format!("rule {name} on {topic}"))
            })
    }

    async fn ensure_bus(&self, topic: &str) -> Result<()> {
        if topic == DEFAULT_BUS {
            return Ok(());
        }
        match self
            .shared
            .events
            .create_event_bus()
            .name(topic)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => {
                let e =
                    crate::error::sdk_error(e, kind_of_code, &format!("create event bus {topic}"));
                if e.kind() == ErrorKind::AlreadyExists {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }
}

#[async_trait]
impl TopologyDriver for EventBridgeTopology {
    async fn ensure_topic(&self, topic: &str) -> Result<()> {
        self.ensure_bus(topic).await?;
        if let Some(days) = self.shared.archive_days {
            self.ensure_archive(topic, days).await?;
        }
        Ok(())
    }

    /// StartReplay from the bus's archive to the bus, limited to the subscription's
    /// rule, for the events from `since` to now.
    async fn replay(&self, topic: &str, name: &str, since: DateTime<Utc>) -> Result<()> {
        let archive = archive_name(topic);
        let archive_arn = match self
            .shared
            .events
            .describe_archive()
            .archive_name(&archive)
            .send()
            .await
        {
            Ok(a) => a.archive_arn().unwrap_or_default().to_owned(),
            Err(e) => {
                let e = crate::error::sdk_error(e, kind_of_code, &format!("archive {archive}"));
                return Err(if e.kind() == ErrorKind::NotFound {
                    Error::not_found(format!(
                        "event bus {topic} has no archive {archive} to replay from: declare it \
                         with EventBridgeBus::with_archive (eventbridge://?archive_days=N)"
                    ))
                } else {
                    e
                });
            }
        };
        let rule_arn = self
            .describe_rule(topic, name)
            .await?
            .arn()
            .unwrap_or_default()
            .to_owned();
        let destination = aws_sdk_eventbridge::types::ReplayDestination::builder()
            .arn(self.bus_arn(topic).await?)
            .filter_arns(rule_arn)
            .build()
            .map_err(|e| Error::with_source(ErrorKind::InvalidArgument, "replay destination", e))?;
        let now = Utc::now();
        let to_time =
            |t: DateTime<Utc>| aws_smithy_types::DateTime::from_millis(t.timestamp_millis());
        let out = self
            .shared
            .events
            .start_replay()
            .replay_name(replay_name(name, now))
            .event_source_arn(archive_arn)
            .event_start_time(to_time(since))
            .event_end_time(to_time(now))
            .destination(destination)
            .send()
            .await
            .map_err(|e| crate::error::sdk_error(e, kind_of_code, &format!("replay of {name}")))?;
        if let Some(aws_sdk_eventbridge::types::ReplayState::Failed) = out.state() {
            return Err(Error::new(
                ErrorKind::Unavailable,
                format!(
                    "the replay of {name} failed: {}",
                    out.state_reason().unwrap_or("no reason given")
                ),
            ));
        }
        Ok(())
    }

    async fn ensure_subscription(&self, spec: &SubscriptionSpec) -> Result<()> {
        let pattern = event_pattern(spec.filter.as_ref())?;
        let queue = &spec.name;
        let rule = self
            .shared
            .events
            .put_rule()
            .name(queue)
            .event_bus_name(&spec.topic)
            .event_pattern(pattern.to_string())
            .send()
            .await
            .map_err(|e| {
                crate::error::sdk_error(e, kind_of_code, &format!("rule {queue} on {}", spec.topic))
            })?;
        // The rule, and only it, may send to the queue.
        let rule_arn = rule.rule_arn().unwrap_or_default();
        let queue_arn = crate::sqs_subscriptions::create_queue(
            &self.shared.sqs,
            spec,
            "events.amazonaws.com",
            rule_arn,
        )
        .await?;
        // What EventBridge cannot deliver to the queue within its retry window goes to
        // the subscription's dead-letter queue instead of being dropped; the rule may
        // send there too.
        let dlq = sqs::dead_letter_queue(queue);
        let dlq_url = self.shared.sqs.create(&dlq).await?;
        let dlq_arn = crate::sqs_subscriptions::allow_sender(
            &self.shared.sqs,
            &dlq,
            &dlq_url,
            "events.amazonaws.com",
            rule_arn,
        )
        .await?;
        let target = Target::builder()
            .id("cloudbus")
            .arn(queue_arn)
            .dead_letter_config(
                aws_sdk_eventbridge::types::DeadLetterConfig::builder()
                    .arn(dlq_arn)
                    .build(),
            )
            .retry_policy(
                aws_sdk_eventbridge::types::RetryPolicy::builder()
                    .maximum_retry_attempts(TARGET_MAX_RETRIES)
                    .maximum_event_age_in_seconds(TARGET_MAX_EVENT_AGE_SECONDS)
                    .build(),
            )
            .build()
            .map_err(|e| Error::with_source(ErrorKind::InvalidArgument, "target", e))?;
        let out = self
            .shared
            .events
            .put_targets()
            .rule(queue)
            .event_bus_name(&spec.topic)
            .targets(target)
            .send()
            .await
            .map_err(|e| {
                crate::error::sdk_error(e, kind_of_code, &format!("target of rule {queue}"))
            })?;
        if out.failed_entry_count() > 0 {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!("the SQS target of rule {queue} was refused"),
            ));
        }
        Ok(())
    }

    async fn delete_subscription(&self, topic: &str, name: &str) -> Result<()> {
        let _ = self
            .shared
            .events
            .remove_targets()
            .rule(name)
            .event_bus_name(topic)
            .ids("cloudbus")
            .send()
            .await;
        match self
            .shared
            .events
            .delete_rule()
            .name(name)
            .event_bus_name(topic)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) => {
                let e = crate::error::sdk_error(e, kind_of_code, &format!("delete rule {name}"));
                if e.kind() == ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }

    fn planning(&self) -> Option<&dyn TopologyPlanning> {
        Some(self)
    }
}

#[async_trait]
impl TopologyPlanning for EventBridgeTopology {
    async fn topic_exists(&self, topic: &str) -> Result<bool> {
        if topic == DEFAULT_BUS {
            return Ok(true);
        }
        let bus = self
            .shared
            .events
            .describe_event_bus()
            .name(topic)
            .send()
            .await;
        Ok(bus
            .map_err(|e| crate::error::sdk_error(e, kind_of_code, &format!("event bus {topic}")))
            .missing_as_none()?
            .is_some())
    }

    /// The rule's event pattern and its queue's settings.
    async fn describe_subscription(
        &self,
        topic: &str,
        name: &str,
    ) -> Result<Option<SubscriptionState>> {
        let Some(rule) = self.describe_rule(topic, name).await.missing_as_none()? else {
            return Ok(None);
        };
        let mut state = sqs::queue_state(&self.shared.sqs, name)
            .await?
            .unwrap_or_default();
        state.filter = rule.event_pattern().map(crate::filter::canonical_json);
        Ok(Some(state))
    }

    fn desired_state(&self, spec: &SubscriptionSpec) -> Result<SubscriptionState> {
        let mut state = sqs::queue_desired(spec);
        state.filter = Some(crate::filter::canonical_json(
            &event_pattern(spec.filter.as_ref())?.to_string(),
        ));
        Ok(state)
    }

    /// PutRule, PutTargets and the queue's attributes are upserts: ensuring the
    /// subscription again changes it in place.
    async fn update_subscription(&self, spec: &SubscriptionSpec) -> Result<()> {
        self.ensure_subscription(spec).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_filter_form_compiles_to_an_event_pattern() {
        let cases = [
            (Filter::eq("type", "a"), json!({"type": ["a"]})),
            (Filter::exists("tier"), json!({"tier": [{"exists": true}]})),
            (
                Filter::anything_but("tier", ["x"]),
                json!({"tier": [{"anything-but": ["x"]}]}),
            ),
            (
                Filter::range("amount", Some(10.0), Some(20.0)),
                json!({"amount": [{"numeric": [">=", 10.0, "<=", 20.0]}]}),
            ),
            (
                Filter::and([Filter::eq("tier", "vip"), Filter::prefix("type", "o.")]),
                json!({"tier": ["vip"], "type": [{"prefix": "o."}]}),
            ),
            (
                Filter::or([Filter::eq("a", "1"), Filter::eq("b", "2")]),
                json!({"$or": [{"a": ["1"]}, {"b": ["2"]}]}),
            ),
        ];
        for (f, want) in cases {
            assert_eq!(event_pattern(Some(&f)).unwrap(), json!({ "detail": want }));
        }
        let conflict = Filter::and([Filter::prefix("type", "a"), Filter::eq("type", "ab")]);
        assert_eq!(
            event_pattern(Some(&conflict)).unwrap_err().kind(),
            ErrorKind::Unsupported
        );
    }
}
