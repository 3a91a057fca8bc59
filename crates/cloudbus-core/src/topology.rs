//! Topology as code: topics and their subscriptions (filters, dead-letter policies,
//! leases, ordering) declared once for any cloud, a [`plan`] of what differs from
//! what the provider holds, and [`apply`], which makes it so and is idempotent. The
//! `cloudbus topology plan|apply -f topology.yaml` commands are built on it.
//!
//! Each provider compares in its own terms
//! ([`describe_subscription`](crate::TopologyPlanning::describe_subscription) and
//! [`desired_state`](crate::TopologyPlanning::desired_state)): a filter is compared as
//! the provider's native filter, a lease as the provider rounds it, so a plan shows
//! what the cloud really holds. Where topics have settings of their own (Kafka's
//! partitions, replication, retention and cleanup policy), a plan compares those the
//! connection declares ([`describe_topic`](crate::TopologyPlanning::describe_topic)
//! and [`desired_topic_state`](crate::TopologyPlanning::desired_topic_state)) too.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::bus::Bus;
use cloudbus_driver::driver::{SubscriptionSpec, SubscriptionState, TopicState, TopologyPlanning};
use cloudbus_driver::error::{Error, ErrorKind, Result};
use cloudbus_driver::filter::Filter;

/// The declared topology: what the YAML (or JSON) file holds.
///
/// ```
/// use cloudbus_core::topology::Topology;
/// let topology: Topology = serde_json::from_value(serde_json::json!({
///     "topics": [{
///         "name": "orders",
///         "subscriptions": [{
///             "name": "billing",
///             "filter": {"prefix": {"attribute": "type", "prefix": "com.example.order."}},
///             "max_delivery_attempts": 5,
///             "lease": "45s"
///         }]
///     }]
/// })).unwrap();
/// let specs = topology.subscriptions().unwrap();
/// assert_eq!(specs[0].lease, std::time::Duration::from_secs(45));
/// ```
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Topology {
    /// The provider URL, when the file names one (the command line's wins).
    #[serde(default)]
    pub url: Option<String>,
    /// The topics.
    #[serde(default)]
    pub topics: Vec<TopicDeclaration>,
}

/// One topic and its subscriptions.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicDeclaration {
    /// The topic's name.
    pub name: String,
    /// Its subscriptions.
    #[serde(default)]
    pub subscriptions: Vec<SubscriptionDeclaration>,
}

/// One subscription, as [`SubscriptionSpec`] has it; what is left out takes the
/// spec's defaults (30 s lease, ordered, no filter, the provider's delivery limit).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionDeclaration {
    /// The subscription's name.
    pub name: String,
    /// Only events that match.
    #[serde(default)]
    pub filter: Option<Filter>,
    /// Dead-letter after this many deliveries.
    #[serde(default)]
    pub max_delivery_attempts: Option<u32>,
    /// The lease: a number and a unit (`500ms`, `30s`, `5m`).
    #[serde(default)]
    pub lease: Option<String>,
    /// Keep ordering keys in order.
    #[serde(default)]
    pub ordered: Option<bool>,
}

impl Topology {
    /// Every subscription as a [`SubscriptionSpec`]; an invalid lease, a duplicate
    /// name or an empty one is an `InvalidArgument` naming it.
    pub fn subscriptions(&self) -> Result<Vec<SubscriptionSpec>> {
        let mut specs: Vec<SubscriptionSpec> = Vec::new();
        let mut topics: Vec<&str> = Vec::new();
        for topic in &self.topics {
            if topic.name.trim().is_empty() {
                return Err(Error::invalid("a topic has no name"));
            }
            if topics.contains(&topic.name.as_str()) {
                return Err(Error::invalid(format!(
                    "topic {:?} is declared twice",
                    topic.name
                )));
            }
            topics.push(&topic.name);
            for sub in &topic.subscriptions {
                if sub.name.trim().is_empty() {
                    return Err(Error::invalid(format!(
                        "a subscription of topic {:?} has no name",
                        topic.name
                    )));
                }
                if specs
                    .iter()
                    .any(|s| s.topic == topic.name && s.name == sub.name)
                {
                    return Err(Error::invalid(format!(
                        "subscription {:?} of topic {:?} is declared twice",
                        sub.name, topic.name
                    )));
                }
                let mut spec = SubscriptionSpec::new(&topic.name, &sub.name);
                spec.filter = sub.filter.clone();
                spec.max_delivery_attempts = sub.max_delivery_attempts;
                if let Some(lease) = &sub.lease {
                    spec.lease = parse_duration(lease).map_err(|e| {
                        Error::invalid(format!(
                            "subscription {:?} of topic {:?}: {e}",
                            sub.name, topic.name
                        ))
                    })?;
                }
                if let Some(ordered) = sub.ordered {
                    spec.ordered = ordered;
                }
                specs.push(spec);
            }
        }
        Ok(specs)
    }
}

/// Reads `500ms`, `30s`, `5m` or `1h`.
///
/// ```
/// use std::time::Duration;
/// use cloudbus_core::topology::parse_duration;
/// assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
/// assert!(parse_duration("30").is_err());
/// ```
pub fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("{text:?} has no unit (ms, s, m or h)"))?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a number and a unit"))?;
    let seconds = match unit.trim() {
        "ms" => number / 1000.0,
        "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        other => {
            return Err(format!(
                "unknown unit {other:?} in {text:?} (ms, s, m or h)"
            ));
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("{text:?}: {e}"))
}

/// One setting that differs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Difference {
    /// The setting: `filter`, `max_delivery_attempts`, `lease` or `ordered` of a
    /// subscription; a topic's by its provider's name (`partitions`, `retention.ms`).
    pub setting: &'static str,
    /// What the provider holds.
    pub current: String,
    /// What the declaration wants.
    pub wanted: String,
}

/// What the plan does for one topic or subscription.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Change {
    /// The topic is missing: create it.
    CreateTopic(String),
    /// The provider cannot tell whether the topic exists: ensure it.
    EnsureTopic(String),
    /// The topic exists (with the settings declared, where the provider has any).
    TopicUnchanged(String),
    /// The topic exists with settings that differ: change it in place.
    UpdateTopic {
        /// The topic.
        name: String,
        /// What differs.
        differences: Vec<Difference>,
    },
    /// The subscription is missing: create it.
    CreateSubscription(SubscriptionSpec),
    /// The subscription differs: change it in place.
    UpdateSubscription {
        /// The declaration.
        spec: SubscriptionSpec,
        /// What differs.
        differences: Vec<Difference>,
    },
    /// The subscription is as declared.
    SubscriptionUnchanged(SubscriptionSpec),
    /// The provider cannot describe the subscription: apply ensures it (creates it
    /// when missing, changes nothing that exists).
    EnsureSubscription {
        /// The declaration.
        spec: SubscriptionSpec,
        /// Why it could not be described.
        why: String,
    },
}

impl Change {
    /// Whether applying it changes anything (or may).
    pub fn is_change(&self) -> bool {
        !matches!(
            self,
            Change::TopicUnchanged(_) | Change::SubscriptionUnchanged(_)
        )
    }
}

/// The difference between a declared topology and what the provider holds.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// One entry per declared topic and subscription, in declaration order.
    pub changes: Vec<Change>,
}

impl Plan {
    /// Whether the provider already holds the topology (nothing to apply).
    pub fn is_empty(&self) -> bool {
        !self.changes.iter().any(Change::is_change)
    }
    /// How many entries would change.
    pub fn change_count(&self) -> usize {
        self.changes.iter().filter(|c| c.is_change()).count()
    }
}

fn describe_spec(spec: &SubscriptionSpec) -> String {
    let mut parts = vec![
        format!("lease {}", format_duration(spec.lease)),
        if spec.ordered { "ordered" } else { "unordered" }.to_owned(),
    ];
    if let Some(n) = spec.max_delivery_attempts {
        parts.push(format!("dead-letter after {n} deliveries"));
    }
    if let Some(f) = &spec.filter {
        parts.push(format!(
            "filter {}",
            serde_json::to_string(f).unwrap_or_else(|_| format!("{f:?}"))
        ));
    }
    parts.join(", ")
}

/// A delivery limit; 0 is none.
fn attempts(n: u32) -> String {
    if n == 0 {
        "unlimited".to_owned()
    } else {
        n.to_string()
    }
}

/// `30s`, `1.5s`, `500ms`.
fn format_duration(d: Duration) -> String {
    if d.subsec_millis() == 0 && d.as_secs() > 0 {
        format!("{}s", d.as_secs())
    } else if d.as_secs() == 0 {
        format!("{}ms", d.as_millis())
    } else {
        format!("{}s", d.as_secs_f64())
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for change in &self.changes {
            match change {
                Change::CreateTopic(t) => writeln!(f, "+ topic {t}")?,
                Change::EnsureTopic(t) => writeln!(
                    f,
                    "? topic {t} (the provider cannot tell; apply ensures it)"
                )?,
                Change::TopicUnchanged(t) => writeln!(f, "= topic {t}")?,
                Change::UpdateTopic { name, differences } => {
                    writeln!(f, "~ topic {name}")?;
                    for d in differences {
                        writeln!(f, "    {}: {} -> {}", d.setting, d.current, d.wanted)?;
                    }
                }
                Change::CreateSubscription(s) => writeln!(
                    f,
                    "+ subscription {}/{} ({})",
                    s.topic,
                    s.name,
                    describe_spec(s)
                )?,
                Change::UpdateSubscription { spec, differences } => {
                    writeln!(f, "~ subscription {}/{}", spec.topic, spec.name)?;
                    for d in differences {
                        writeln!(f, "    {}: {} -> {}", d.setting, d.current, d.wanted)?;
                    }
                }
                Change::SubscriptionUnchanged(s) => {
                    writeln!(f, "= subscription {}/{}", s.topic, s.name)?
                }
                Change::EnsureSubscription { spec, why } => writeln!(
                    f,
                    "? subscription {}/{} ({why}; apply ensures it)",
                    spec.topic, spec.name
                )?,
            }
        }
        let n = self.change_count();
        if n == 0 {
            write!(f, "no changes: the provider holds this topology")
        } else {
            write!(f, "{n} to apply")
        }
    }
}

/// The settings of `current` that differ from `wanted` (a setting either side lacks
/// is not compared).
pub fn differences(current: &SubscriptionState, wanted: &SubscriptionState) -> Vec<Difference> {
    let mut out = Vec::new();
    let none = || "none".to_owned();
    if current.filter != wanted.filter {
        out.push(Difference {
            setting: "filter",
            current: current.filter.clone().unwrap_or_else(none),
            wanted: wanted.filter.clone().unwrap_or_else(none),
        });
    }
    if let (Some(c), Some(w)) = (current.max_delivery_attempts, wanted.max_delivery_attempts)
        && c != w
    {
        out.push(Difference {
            setting: "max_delivery_attempts",
            current: attempts(c),
            wanted: attempts(w),
        });
    }
    if let (Some(c), Some(w)) = (current.lease, wanted.lease)
        && c != w
    {
        out.push(Difference {
            setting: "lease",
            current: format_duration(c),
            wanted: format_duration(w),
        });
    }
    if let (Some(c), Some(w)) = (current.ordered, wanted.ordered)
        && c != w
    {
        out.push(Difference {
            setting: "ordered",
            current: c.to_string(),
            wanted: w.to_string(),
        });
    }
    out
}

/// The settings of `wanted` that `current` holds otherwise (one `current` lacks is
/// shown as `default`: the broker's default applies there).
pub fn topic_differences(current: &TopicState, wanted: &TopicState) -> Vec<Difference> {
    wanted
        .differing_from(current)
        .map(|(name, value)| Difference {
            setting: name,
            current: current
                .settings
                .get(name)
                .cloned()
                .unwrap_or_else(|| "default".to_owned()),
            wanted: value.to_owned(),
        })
        .collect()
}

/// The plan's entry for `topic`: described and compared where the provider can,
/// else whether it exists, else to be ensured.
async fn plan_topic(driver: &dyn TopologyPlanning, topic: &str) -> Result<Change> {
    match driver.describe_topic(topic).await {
        Ok(None) => return Ok(Change::CreateTopic(topic.to_owned())),
        Ok(Some(current)) => {
            let differences = topic_differences(&current, &driver.desired_topic_state(topic)?);
            return Ok(if differences.is_empty() {
                Change::TopicUnchanged(topic.to_owned())
            } else {
                Change::UpdateTopic {
                    name: topic.to_owned(),
                    differences,
                }
            });
        }
        Err(e) if e.kind() == ErrorKind::Unsupported => {}
        Err(e) => return Err(e),
    }
    Ok(match driver.topic_exists(topic).await {
        Ok(true) => Change::TopicUnchanged(topic.to_owned()),
        Ok(false) => Change::CreateTopic(topic.to_owned()),
        Err(e) if e.kind() == ErrorKind::Unsupported => Change::EnsureTopic(topic.to_owned()),
        Err(e) => return Err(e),
    })
}

/// The reading of a provider without [`TopologyPlanning`]: every question is
/// `Unsupported` (the trait's defaults), so the plan ensures instead of comparing.
struct CannotDescribe;

impl TopologyPlanning for CannotDescribe {}

/// Compares `topology` with what the provider behind `bus` holds.
///
/// ```no_run
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> cloudbus_core::Result<()> {
/// # let bus: cloudbus_core::Bus = unimplemented!();
/// use cloudbus_core::topology::{self, Topology};
/// let wanted: Topology = serde_json::from_str(r#"{"topics": [{"name": "orders"}]}"#)?;
/// let plan = topology::plan(&bus, &wanted).await?;
/// println!("{plan}");
/// topology::apply(&bus, &plan).await?;
/// # Ok(()) }
/// ```
pub async fn plan(bus: &Bus, topology: &Topology) -> Result<Plan> {
    let specs = topology.subscriptions()?;
    let driver = bus.driver().topology();
    let driver = driver.planning().unwrap_or(&CannotDescribe);
    let mut changes = Vec::new();
    for topic in &topology.topics {
        changes.push(plan_topic(driver, &topic.name).await?);
        let subscriptions: Vec<&SubscriptionSpec> =
            specs.iter().filter(|s| s.topic == topic.name).collect();
        shared_settings_agree(bus, &topic.name, &subscriptions).await?;
        for spec in subscriptions {
            let described = driver.describe_subscription(&spec.topic, &spec.name).await;
            let change = match described {
                Ok(None) => {
                    // Checked now, so that an undeclarable filter fails the plan.
                    driver.desired_state(spec)?;
                    Change::CreateSubscription(spec.clone())
                }
                Ok(Some(current)) => {
                    let wanted = driver.desired_state(spec)?;
                    let differences = differences(&current, &wanted);
                    if differences.is_empty() {
                        Change::SubscriptionUnchanged(spec.clone())
                    } else {
                        Change::UpdateSubscription {
                            spec: spec.clone(),
                            differences,
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::Unsupported => Change::EnsureSubscription {
                    spec: spec.clone(),
                    why: e.message().to_owned(),
                },
                Err(e) => return Err(e),
            };
            changes.push(change);
        }
    }
    Ok(Plan { changes })
}

/// Where subscriptions share their topic's queue (no fan-out: SQS, a Service Bus
/// queue), they share its settings: declaring them differently could never be
/// applied, so it is an `InvalidArgument`.
async fn shared_settings_agree(bus: &Bus, topic: &str, subs: &[&SubscriptionSpec]) -> Result<()> {
    let (Some(first), true) = (subs.first(), subs.len() > 1) else {
        return Ok(());
    };
    let Ok(driver) = bus.driver().topic(topic).await else {
        return Ok(());
    };
    if driver.capabilities().fan_out {
        return Ok(());
    }
    let same = |s: &&&SubscriptionSpec| {
        s.lease == first.lease
            && s.max_delivery_attempts == first.max_delivery_attempts
            && s.filter == first.filter
            && s.ordered == first.ordered
    };
    if subs.iter().all(|s| same(&s)) {
        Ok(())
    } else {
        Err(Error::invalid(format!(
            "the subscriptions of {topic} share one queue on this provider (no fan-out), \
             so they must be declared with the same lease, delivery limit, filter and ordering"
        )))
    }
}

/// `e`, the failure of changing `differences` of `what`, saying which settings.
fn changing(e: Error, differences: &[Difference], what: &str) -> Error {
    let settings: Vec<&str> = differences.iter().map(|d| d.setting).collect();
    Error::new(
        e.kind(),
        format!(
            "changing {} of {what}: {}",
            settings.join(", "),
            e.message()
        ),
    )
}

/// Makes the provider hold what `plan` was made for: creates what is missing,
/// changes what differs, ensures what could not be described. Stops at the first
/// failure (a setting the provider cannot change in place is `Unsupported`, naming
/// it). Returns how many entries it applied.
pub async fn apply(bus: &Bus, plan: &Plan) -> Result<usize> {
    let driver = bus.driver().topology();
    let planning = driver.planning().unwrap_or(&CannotDescribe);
    let mut applied = 0;
    for change in &plan.changes {
        match change {
            Change::CreateTopic(t) | Change::EnsureTopic(t) => driver.ensure_topic(t).await?,
            Change::UpdateTopic { name, differences } => planning
                .update_topic(name)
                .await
                .map_err(|e| changing(e, differences, &format!("topic {name}")))?,
            Change::CreateSubscription(spec) | Change::EnsureSubscription { spec, .. } => {
                driver.ensure_subscription(spec).await?
            }
            Change::UpdateSubscription { spec, differences } => {
                planning.update_subscription(spec).await.map_err(|e| {
                    changing(
                        e,
                        differences,
                        &format!("subscription {}/{}", spec.topic, spec.name),
                    )
                })?
            }
            Change::TopicUnchanged(_) | Change::SubscriptionUnchanged(_) => continue,
        }
        applied += 1;
    }
    Ok(applied)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn declarations_become_specs_with_defaults() {
        let t: Topology = serde_json::from_str(
            r#"{"topics": [{"name": "orders", "subscriptions": [
                {"name": "billing", "lease": "500ms", "ordered": false},
                {"name": "audit"}
            ]}]}"#,
        )
        .unwrap();
        let specs = t.subscriptions().unwrap();
        assert_eq!(specs.len(), 2);
        assert_eq!(specs[0].lease, Duration::from_millis(500));
        assert!(!specs[0].ordered);
        assert_eq!(specs[1], SubscriptionSpec::new("orders", "audit"));
    }

    #[test]
    fn bad_declarations_are_named() {
        let dup: Topology = serde_json::from_str(
            r#"{"topics": [{"name": "t", "subscriptions": [{"name": "s"}, {"name": "s"}]}]}"#,
        )
        .unwrap();
        let e = dup.subscriptions().unwrap_err();
        assert!(e.message().contains("declared twice"), "{e}");
        let lease: Topology = serde_json::from_str(
            r#"{"topics": [{"name": "t", "subscriptions": [{"name": "s", "lease": "ten"}]}]}"#,
        )
        .unwrap();
        let e = lease.subscriptions().unwrap_err();
        assert!(e.message().contains("\"s\""), "{e}");
        assert!(
            serde_json::from_str::<Topology>(r#"{"topics": [{"name": "t", "sub": []}]}"#).is_err()
        );
    }

    #[test]
    fn topic_differences_compare_what_is_declared() {
        let state = |pairs: &[(&'static str, &str)]| TopicState {
            settings: pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect(),
        };
        let current = state(&[("partitions", "4"), ("retention.ms", "3600000")]);
        // Declared: partitions (same), retention (other), cleanup (not held: default).
        let wanted = state(&[
            ("partitions", "4"),
            ("retention.ms", "7200000"),
            ("cleanup.policy", "compact"),
        ]);
        let d = topic_differences(&current, &wanted);
        let settings: Vec<&str> = d.iter().map(|d| d.setting).collect();
        assert_eq!(settings, ["cleanup.policy", "retention.ms"]);
        assert_eq!(
            (d[0].current.as_str(), d[0].wanted.as_str()),
            ("default", "compact")
        );
        assert_eq!(
            (d[1].current.as_str(), d[1].wanted.as_str()),
            ("3600000", "7200000")
        );
        // What the connection does not declare is not compared.
        assert!(topic_differences(&current, &state(&[])).is_empty());
        let plan = Plan {
            changes: vec![Change::UpdateTopic {
                name: "orders".into(),
                differences: d,
            }],
        };
        assert_eq!(
            plan.to_string(),
            "~ topic orders\n    cleanup.policy: default -> compact\n    retention.ms: 3600000 -> 7200000\n1 to apply"
        );
    }

    #[test]
    fn differences_compare_what_both_sides_have() {
        let current = SubscriptionState {
            filter: Some("a".into()),
            max_delivery_attempts: Some(5),
            lease: Some(Duration::from_secs(30)),
            ordered: None,
        };
        let wanted = SubscriptionState {
            filter: Some("b".into()),
            max_delivery_attempts: Some(5),
            lease: Some(Duration::from_secs(60)),
            ordered: Some(true),
        };
        let d = differences(&current, &wanted);
        let settings: Vec<&str> = d.iter().map(|d| d.setting).collect();
        assert_eq!(settings, ["filter", "lease"]);
        assert_eq!(d[1].current, "30s");
        assert_eq!(d[1].wanted, "60s");
    }
}
