//! The portable subscription filter over CloudEvent attributes and extensions, with
//! the in-process evaluator. Providers compile it to their native forms (SNS filter
//! policies, EventBridge patterns, Service Bus SQL, Pub/Sub filters, Event Grid
//! advanced filters) and fall back to [`Filter::matches`] where the cloud cannot.

use serde::{Deserialize, Serialize};

use crate::event::{Event, attribute_text};

/// A filter over context attributes (`type`, `source`, `subject`, ...) and extensions.
///
/// ```
/// use cloudbus_driver::{EventBuilder, Filter};
/// let f = Filter::and([
///     Filter::prefix("type", "com.example.order."),
///     Filter::anything_but("subject", ["test"]),
///     Filter::range("amount", Some(10.0), None),
/// ]);
/// let e = EventBuilder::new("com.example.order.created", "/o")
///     .subject("o-1").extension("amount", 12i64).build().unwrap();
/// assert!(f.matches(&e));
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Filter {
    /// The attribute equals one of the values.
    Equals {
        /// Attribute or extension name.
        attribute: String,
        /// Accepted values (any of them).
        values: Vec<String>,
    },
    /// The attribute starts with the prefix.
    Prefix {
        /// Attribute or extension name.
        attribute: String,
        /// The prefix.
        prefix: String,
    },
    /// The attribute, read as a number, lies in `[min, max]` (bounds optional, inclusive).
    Range {
        /// Attribute or extension name.
        attribute: String,
        /// Lower bound, inclusive.
        min: Option<f64>,
        /// Upper bound, inclusive.
        max: Option<f64>,
    },
    /// The attribute is present (`true`) or absent (`false`).
    Exists {
        /// Attribute or extension name.
        attribute: String,
        /// Whether it must be present.
        present: bool,
    },
    /// The attribute is present and equals none of the values.
    AnythingBut {
        /// Attribute or extension name.
        attribute: String,
        /// Rejected values.
        values: Vec<String>,
    },
    /// All of the filters match.
    And(Vec<Filter>),
    /// Any of the filters matches.
    Or(Vec<Filter>),
}

impl Filter {
    /// `attribute == value`.
    pub fn eq(attribute: impl Into<String>, value: impl Into<String>) -> Self {
        Filter::Equals {
            attribute: attribute.into(),
            values: vec![value.into()],
        }
    }
    /// `attribute` is one of `values`.
    pub fn one_of<I, S>(attribute: impl Into<String>, values: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Filter::Equals {
            attribute: attribute.into(),
            values: values.into_iter().map(Into::into).collect(),
        }
    }
    /// `attribute` starts with `prefix`.
    pub fn prefix(attribute: impl Into<String>, prefix: impl Into<String>) -> Self {
        Filter::Prefix {
            attribute: attribute.into(),
            prefix: prefix.into(),
        }
    }
    /// `min <= attribute <= max`, numerically.
    pub fn range(attribute: impl Into<String>, min: Option<f64>, max: Option<f64>) -> Self {
        Filter::Range {
            attribute: attribute.into(),
            min,
            max,
        }
    }
    /// `attribute` is present.
    pub fn exists(attribute: impl Into<String>) -> Self {
        Filter::Exists {
            attribute: attribute.into(),
            present: true,
        }
    }
    /// `attribute` is absent.
    pub fn not_exists(attribute: impl Into<String>) -> Self {
        Filter::Exists {
            attribute: attribute.into(),
            present: false,
        }
    }
    /// `attribute` is present and none of `values`.
    pub fn anything_but<I, S>(attribute: impl Into<String>, values: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Filter::AnythingBut {
            attribute: attribute.into(),
            values: values.into_iter().map(Into::into).collect(),
        }
    }
    /// All of `filters`.
    pub fn and(filters: impl IntoIterator<Item = Filter>) -> Self {
        Filter::And(filters.into_iter().collect())
    }
    /// Any of `filters`.
    pub fn or(filters: impl IntoIterator<Item = Filter>) -> Self {
        Filter::Or(filters.into_iter().collect())
    }

    /// Evaluates the filter against an event, in process.
    pub fn matches(&self, event: &Event) -> bool {
        match self {
            Filter::Equals { attribute, values } => {
                attribute_text(event, attribute).is_some_and(|v| values.contains(&v))
            }
            Filter::Prefix { attribute, prefix } => {
                attribute_text(event, attribute).is_some_and(|v| v.starts_with(prefix.as_str()))
            }
            Filter::Range {
                attribute,
                min,
                max,
            } => attribute_text(event, attribute)
                .and_then(|v| v.trim().parse::<f64>().ok())
                .is_some_and(|n| {
                    min.is_none_or(|m| n >= m) && max.is_none_or(|m| n <= m) && n.is_finite()
                }),
            Filter::Exists { attribute, present } => {
                attribute_text(event, attribute).is_some() == *present
            }
            Filter::AnythingBut { attribute, values } => {
                attribute_text(event, attribute).is_some_and(|v| values.iter().all(|x| *x != v))
            }
            Filter::And(all) => all.iter().all(|f| f.matches(event)),
            Filter::Or(any) => any.iter().any(|f| f.matches(event)),
        }
    }

    /// The attribute names the filter reads.
    pub fn attributes(&self) -> Vec<&str> {
        let mut out = Vec::new();
        self.collect_attributes(&mut out);
        out.sort_unstable();
        out.dedup();
        out
    }

    fn collect_attributes<'a>(&'a self, out: &mut Vec<&'a str>) {
        match self {
            Filter::Equals { attribute, .. }
            | Filter::Prefix { attribute, .. }
            | Filter::Range { attribute, .. }
            | Filter::Exists { attribute, .. }
            | Filter::AnythingBut { attribute, .. } => out.push(attribute),
            Filter::And(fs) | Filter::Or(fs) => fs.iter().for_each(|f| f.collect_attributes(out)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventBuilder;

    fn ev(ty: &str, amount: Option<i64>, subject: Option<&str>) -> Event {
        let mut b = EventBuilder::new(ty, "/shop");
        if let Some(a) = amount {
            b = b.extension("amount", a);
        }
        if let Some(s) = subject {
            b = b.subject(s);
        }
        b.build().unwrap()
    }

    #[test]
    fn each_form() {
        let e = ev("order.created", Some(50), Some("vip"));
        assert!(Filter::eq("type", "order.created").matches(&e));
        assert!(!Filter::eq("type", "order").matches(&e));
        assert!(Filter::one_of("type", ["x", "order.created"]).matches(&e));
        assert!(Filter::prefix("type", "order.").matches(&e));
        assert!(!Filter::prefix("type", "payment.").matches(&e));
        assert!(Filter::range("amount", Some(50.0), Some(50.0)).matches(&e));
        assert!(!Filter::range("amount", Some(51.0), None).matches(&e));
        assert!(!Filter::range("type", None, None).matches(&e));
        assert!(Filter::exists("subject").matches(&e));
        assert!(Filter::not_exists("partitionkey").matches(&e));
        assert!(Filter::anything_but("subject", ["test"]).matches(&e));
        assert!(!Filter::anything_but("subject", ["vip"]).matches(&e));
        assert!(!Filter::anything_but("missing", ["vip"]).matches(&e));
        assert!(Filter::prefix("source", "").matches(&e));
    }

    #[test]
    fn and_or_nest() {
        let f = Filter::or([
            Filter::and([Filter::eq("type", "a"), Filter::exists("amount")]),
            Filter::prefix("source", "/shop"),
        ]);
        assert!(f.matches(&ev("zzz", None, None)));
        assert_eq!(f.attributes(), vec!["amount", "source", "type"]);
        let json = serde_json::to_string(&f).unwrap();
        assert_eq!(serde_json::from_str::<Filter>(&json).unwrap(), f);
    }
}
