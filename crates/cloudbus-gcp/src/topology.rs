//! Topics and subscriptions made by `ensure`: every subscription gets a dead-letter
//! topic and a subscription to read it, its Filter compiled to a Pub/Sub filter, and
//! the portable settings Pub/Sub cannot hold natively kept in labels.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use cloudbus_driver::{
    Error, ErrorKind, Missing, Result, SubscriptionSpec, SubscriptionState, TopologyDriver,
    TopologyPlanning,
};
use google_cloud_pubsub::model::{DeadLetterPolicy, Subscription, Topic};

use crate::config::ATTRIBUTE_PREFIX;
use crate::context::PubSubContext;
use crate::error::map_error;
use crate::filter::{self, Expr, MAX_FILTER_BYTES};
use crate::replay;

/// The attribute that sends a redriven message back to one subscription only.
pub(crate) const REDRIVE_ATTRIBUTE: &str = "cloudbus_redrive";
/// Label: the lease the spec asked for, in milliseconds (Pub/Sub's floor is 10 s).
pub(crate) const LEASE_LABEL: &str = "cloudbus-lease-ms";
/// Label: the delivery attempts the spec asked for when below Pub/Sub's floor of 5.
pub(crate) const MAX_ATTEMPTS_LABEL: &str = "cloudbus-max-attempts";
/// Pub/Sub's dead-letter policy bounds.
const MIN_POLICY_ATTEMPTS: u32 = 5;
const MAX_POLICY_ATTEMPTS: u32 = 100;

/// The dead-letter topic and subscription of `subscription`.
pub(crate) fn dead_letter_name(subscription: &str) -> String {
    format!("{subscription}-dead-letter")
}

/// Pub/Sub options beyond the portable [`SubscriptionSpec`].
///
/// ```
/// let o = cloudbus_gcp::SubscriptionOptions::default().exactly_once().retain_acked();
/// assert!(o.exactly_once && o.retain_acked);
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SubscriptionOptions {
    /// Exactly-once delivery: acks are confirmed by the service.
    pub exactly_once: bool,
    /// Keep acked messages (for seek to a time in the past).
    pub retain_acked: bool,
}

impl SubscriptionOptions {
    /// Turns on exactly-once delivery.
    pub fn exactly_once(mut self) -> Self {
        self.exactly_once = true;
        self
    }
    /// Keeps acked messages for replay.
    pub fn retain_acked(mut self) -> Self {
        self.retain_acked = true;
        self
    }
}

pub(crate) struct PubSubTopology {
    pub(crate) shared: Arc<PubSubContext>,
}

#[async_trait]
impl TopologyDriver for PubSubTopology {
    async fn ensure_topic(&self, topic: &str) -> Result<()> {
        ensure_topic(&self.shared, topic).await
    }

    async fn ensure_subscription(&self, spec: &SubscriptionSpec) -> Result<()> {
        ensure_subscription(&self.shared, spec, &SubscriptionOptions::default()).await
    }

    /// A seek of the subscription to `since`: acked messages come back only on
    /// subscriptions that keep them ([`SubscriptionOptions::retain_acked`]).
    async fn replay(&self, _topic: &str, name: &str, since: DateTime<Utc>) -> Result<()> {
        replay::seek_to_time(&self.shared, name, since).await
    }

    async fn delete_subscription(&self, _topic: &str, name: &str) -> Result<()> {
        let c = self.shared.clients().await?;
        let dl = dead_letter_name(name);
        for sub in [name, dl.as_str()] {
            let r = c
                .subscriptions
                .delete_subscription()
                .set_subscription(self.shared.config.subscription_path(sub))
                .send()
                .await;
            ignore_kind(r.map(|_| ()), ErrorKind::NotFound, "delete subscription")?;
        }
        let r = c
            .topics
            .delete_topic()
            .set_topic(self.shared.config.topic_path(&dl))
            .send()
            .await;
        ignore_kind(
            r.map(|_| ()),
            ErrorKind::NotFound,
            "delete dead-letter topic",
        )
    }

    /// Pub/Sub describes its subscriptions and changes some settings in place.
    fn planning(&self) -> Option<&dyn TopologyPlanning> {
        Some(self)
    }
}

#[async_trait]
impl TopologyPlanning for PubSubTopology {
    async fn topic_exists(&self, topic: &str) -> Result<bool> {
        topic_exists(&self.shared, topic).await
    }

    async fn describe_subscription(
        &self,
        _topic: &str,
        name: &str,
    ) -> Result<Option<SubscriptionState>> {
        Ok(get_subscription(&self.shared, name)
            .await?
            .map(|s| state_of(&s)))
    }

    fn desired_state(&self, spec: &SubscriptionSpec) -> Result<SubscriptionState> {
        let mut state = state_of(&subscription_resource(&self.shared, spec));
        state.filter = Some(subscription_filter(spec)?);
        Ok(state)
    }

    async fn update_subscription(&self, spec: &SubscriptionSpec) -> Result<()> {
        update_subscription(&self.shared, spec).await
    }
}

fn ignore_kind(
    r: std::result::Result<(), google_cloud_pubsub::Error>,
    kind: ErrorKind,
    what: &str,
) -> Result<()> {
    match r {
        Ok(()) => Ok(()),
        Err(e) => {
            let e = map_error(e, what);
            if e.kind() == kind { Ok(()) } else { Err(e) }
        }
    }
}

pub(crate) async fn ensure_topic(shared: &PubSubContext, topic: &str) -> Result<()> {
    let c = shared.clients().await?;
    let r = c
        .topics
        .create_topic()
        .with_request(Topic::new().set_name(shared.config.topic_path(topic)))
        .send()
        .await;
    ignore_kind(
        r.map(|_| ()),
        ErrorKind::AlreadyExists,
        &format!("create topic {topic}"),
    )
}

/// The filter text of a subscription: the spec's filter (compiled) and the clause that
/// keeps messages redriven to another subscription of the same topic away.
pub(crate) fn subscription_filter(spec: &SubscriptionSpec) -> Result<String> {
    let redrive = Expr::Or(vec![
        Expr::Not(Box::new(Expr::Has(REDRIVE_ATTRIBUTE.to_owned()))),
        Expr::Equals(REDRIVE_ATTRIBUTE.to_owned(), spec.name.clone()),
    ]);
    let expr = match &spec.filter {
        Some(f) => Expr::And(vec![filter::compile(f, ATTRIBUTE_PREFIX)?, redrive]),
        None => redrive,
    };
    let text = expr.to_text();
    if text.len() > MAX_FILTER_BYTES {
        return Err(Error::invalid(format!(
            "the Pub/Sub filter of subscription {} would be {} bytes, more than the \
             {MAX_FILTER_BYTES} Pub/Sub allows: {text}",
            spec.name,
            text.len()
        )));
    }
    Ok(text)
}

pub(crate) async fn ensure_subscription(
    shared: &PubSubContext,
    spec: &SubscriptionSpec,
    options: &SubscriptionOptions,
) -> Result<()> {
    let filter = subscription_filter(spec)?;
    let c = shared.clients().await?;
    let config = &shared.config;
    // The dead-letter place first, so that the policy can name it.
    let dl = dead_letter_name(&spec.name);
    ensure_topic(shared, &dl).await?;
    let r = c
        .subscriptions
        .create_subscription()
        .with_request(
            Subscription::new()
                .set_name(config.subscription_path(&dl))
                .set_topic(config.topic_path(&dl))
                .set_ack_deadline_seconds(10),
        )
        .send()
        .await;
    ignore_kind(
        r.map(|_| ()),
        ErrorKind::AlreadyExists,
        &format!("create dead-letter subscription {dl}"),
    )?;

    let subscription = subscription_resource(shared, spec)
        .set_filter(filter)
        .set_enable_exactly_once_delivery(options.exactly_once)
        .set_retain_acked_messages(options.retain_acked);
    let r = c
        .subscriptions
        .create_subscription()
        .with_request(subscription)
        .send()
        .await;
    ignore_kind(
        r.map(|_| ()),
        ErrorKind::AlreadyExists,
        &format!("create subscription {}", spec.name),
    )
}

/// The portable settings of a subscription, read back from Pub/Sub.
/// The subscription `spec` declares, without its filter and options: the settings
/// that can change in place (ack deadline, labels, dead-letter policy) and the rest.
fn subscription_resource(shared: &PubSubContext, spec: &SubscriptionSpec) -> Subscription {
    let config = &shared.config;
    let wanted = spec.max_delivery_attempts.unwrap_or(MAX_POLICY_ATTEMPTS);
    let policy_attempts = wanted.clamp(MIN_POLICY_ATTEMPTS, MAX_POLICY_ATTEMPTS);
    let lease_secs = spec.lease.as_secs().clamp(10, 600) as i32;
    let mut labels = vec![(
        LEASE_LABEL.to_owned(),
        spec.lease.as_millis().max(1).to_string(),
    )];
    if wanted < MIN_POLICY_ATTEMPTS {
        labels.push((MAX_ATTEMPTS_LABEL.to_owned(), wanted.max(1).to_string()));
    }
    Subscription::new()
        .set_name(config.subscription_path(&spec.name))
        .set_topic(config.topic_path(&spec.topic))
        .set_ack_deadline_seconds(lease_secs)
        .set_enable_message_ordering(spec.ordered)
        .set_labels(labels)
        .set_dead_letter_policy(
            DeadLetterPolicy::new()
                .set_dead_letter_topic(config.topic_path(&dead_letter_name(&spec.name)))
                .set_max_delivery_attempts(policy_attempts as i32),
        )
}

/// What `describe_subscription` reads from a subscription: its filter text, its
/// lease and delivery limit as cloudbus's labels keep them (else the ack deadline and
/// the dead-letter policy), its ordering.
fn state_of(s: &Subscription) -> SubscriptionState {
    SubscriptionState {
        filter: Some(s.filter.clone()).filter(|f| !f.is_empty()),
        max_delivery_attempts: Some(attempts_label(s).or(policy_attempts(s)).unwrap_or(0)),
        lease: Some(lease_of(s)),
        ordered: Some(s.enable_message_ordering),
    }
}

/// The lease: cloudbus's label (which keeps leases below Pub/Sub's 10 s minimum),
/// else the ack deadline. A label that no longer agrees with the ack deadline (the
/// deadline was changed without it) gives way to the deadline.
fn lease_of(s: &Subscription) -> Duration {
    let deadline = Duration::from_secs(s.ack_deadline_seconds.max(10) as u64);
    s.labels
        .get(LEASE_LABEL)
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_millis)
        .filter(|l| l.as_secs().clamp(10, 600) == deadline.as_secs())
        .unwrap_or(deadline)
}

/// The dead-letter policy's delivery limit, if it has one.
fn policy_attempts(s: &Subscription) -> Option<u32> {
    s.dead_letter_policy
        .as_ref()
        .and_then(|p| u32::try_from(p.max_delivery_attempts).ok())
        .filter(|n| *n > 0)
}

/// A delivery limit below Pub/Sub's minimum of 5, which cloudbus keeps in a label
/// and enforces itself; only while the policy holds that minimum (a label left
/// behind by a change of the policy gives way to it).
fn attempts_label(s: &Subscription) -> Option<u32> {
    s.labels
        .get(MAX_ATTEMPTS_LABEL)
        .and_then(|v| v.parse::<u32>().ok())
        .filter(|_| policy_attempts(s) == Some(MIN_POLICY_ATTEMPTS))
}

/// Whether `topic` exists.
async fn topic_exists(shared: &PubSubContext, topic: &str) -> Result<bool> {
    let c = shared.clients().await?;
    let r = c
        .topics
        .get_topic()
        .set_topic(shared.config.topic_path(topic))
        .send()
        .await;
    Ok(r.map_err(|e| map_error(e, &format!("topic {topic}")))
        .missing_as_none()?
        .is_some())
}

/// The subscription `name` as Pub/Sub holds it; `None` when there is none.
async fn get_subscription(shared: &PubSubContext, name: &str) -> Result<Option<Subscription>> {
    let c = shared.clients().await?;
    c.subscriptions
        .get_subscription()
        .set_subscription(shared.config.subscription_path(name))
        .send()
        .await
        .map_err(|e| map_error(e, &format!("subscription {name}")))
        .missing_as_none()
}

/// Changes an existing subscription's ack deadline, labels (lease, delivery limit)
/// and dead-letter policy. Its filter, topic and message ordering cannot change on
/// Pub/Sub: a change of those is `Unsupported`, naming them.
async fn update_subscription(shared: &PubSubContext, spec: &SubscriptionSpec) -> Result<()> {
    let Some(current) = get_subscription(shared, &spec.name).await? else {
        return Err(Error::new(
            ErrorKind::NotFound,
            format!("subscription {} does not exist", spec.name),
        ));
    };
    let mut fixed = Vec::new();
    if current.filter != subscription_filter(spec)? {
        fixed.push("the filter");
    }
    if current.enable_message_ordering != spec.ordered {
        fixed.push("message ordering");
    }
    if current.topic != shared.config.topic_path(&spec.topic) {
        fixed.push("the topic");
    }
    if !fixed.is_empty() {
        return Err(Error::unsupported(format!(
            "Pub/Sub cannot change {} of an existing subscription; delete subscription {} \
             and apply again (its backlog is lost)",
            fixed.join(" or "),
            spec.name
        )));
    }
    ensure_topic(shared, &dead_letter_name(&spec.name)).await?;
    let c = shared.clients().await?;
    let update = |paths: &'static [&'static str]| {
        c.subscriptions
            .update_subscription()
            .set_subscription(subscription_resource(shared, spec).set_filter(&current.filter))
            .set_update_mask(
                google_cloud_wkt::FieldMask::default().set_paths(paths.iter().copied()),
            )
            .send()
    };
    let what = format!("update subscription {}", spec.name);
    match update(&["ack_deadline_seconds", "labels", "dead_letter_policy"]).await {
        Ok(_) => Ok(()),
        Err(e) => {
            let e = map_error(e, &what);
            // The emulator cannot update labels. Without them, a lease below 10 s or
            // a delivery limit below 5 is not kept, and the settings themselves win
            // when the subscription is read (see `state_of`).
            if e.kind() == ErrorKind::InvalidArgument && e.message().contains("labels") {
                tracing::debug!(subscription = %spec.name, "the server cannot update labels; updating without them");
                update(&["ack_deadline_seconds", "dead_letter_policy"])
                    .await
                    .map(|_| ())
                    .map_err(|e| map_error(e, &what))
            } else {
                Err(e)
            }
        }
    }
}

#[derive(Clone, Debug)]
pub(crate) struct SubscriptionSettings {
    pub(crate) topic_path: String,
    pub(crate) lease: Duration,
    pub(crate) max_attempts: Option<u32>,
    pub(crate) filter: Option<Expr>,
    pub(crate) dead_letter_topic: Option<String>,
}

pub(crate) async fn read_settings(
    shared: &PubSubContext,
    name: &str,
) -> Result<SubscriptionSettings> {
    let s = get_subscription(shared, name)
        .await?
        .ok_or_else(|| Error::not_found(format!("subscription {name} does not exist")))?;
    Ok(SubscriptionSettings {
        topic_path: s.topic.clone(),
        lease: lease_of(&s),
        max_attempts: attempts_label(&s),
        filter: filter::parse(&s.filter)?,
        dead_letter_topic: s
            .dead_letter_policy
            .as_ref()
            .map(|p| p.dead_letter_topic.clone())
            .filter(|t| !t.is_empty()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudbus_driver::Filter;

    #[test]
    fn every_subscription_filter_keeps_other_subscriptions_redrives_away() {
        let plain = subscription_filter(&SubscriptionSpec::new("t", "billing")).unwrap();
        assert_eq!(
            plain,
            r#"NOT attributes:cloudbus_redrive OR attributes.cloudbus_redrive = "billing""#
        );
        let filtered = subscription_filter(
            &SubscriptionSpec::new("t", "vip").filter(Filter::eq("tier", "vip")),
        )
        .unwrap();
        assert_eq!(
            filtered,
            r#"attributes."ce-tier" = "vip" AND (NOT attributes:cloudbus_redrive OR attributes.cloudbus_redrive = "vip")"#
        );
        let too_long = SubscriptionSpec::new("t", "x").filter(Filter::one_of(
            "type",
            (0..20).map(|i| format!("value-{i}")),
        ));
        assert_eq!(
            subscription_filter(&too_long).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
    }
}
