//! Subscription rules from the portable [`Filter`]: a correlation filter where the
//! filter is only exact matches on text (the cheapest rule for the service to
//! evaluate), a SQL filter otherwise. Attributes are the application properties of
//! the CloudEvents AMQP binding, under the prefix the bus writes (`cloudEvents_` or
//! `cloudEvents:`).

use cloudbus_driver::{Error, Filter, Result};

use super::config::REDRIVE_PROPERTY;

/// The longest SQL filter Service Bus accepts.
pub const MAX_SQL_LENGTH: usize = 1024;

/// The filter of a subscription's rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RuleFilter {
    /// Every message.
    True,
    /// A SQL filter expression.
    Sql(String),
    /// A correlation filter over application properties (all must be equal).
    Correlation(Vec<(String, String)>),
}

/// Compiles the filter of subscription `subscription` into its rule, over attributes
/// written with `prefix` ([`ATTRIBUTE_PREFIX`](super::ATTRIBUTE_PREFIX) unless the bus
/// was configured otherwise). Messages that a
/// redrive sends back to another subscription of the topic carry
/// [`REDRIVE_PROPERTY`]; SQL rules keep them out, and the receiver completes any that
/// a correlation rule let in.
///
/// ```
/// use cloudbus_core::Filter;
/// use cloudbus_azure::servicebus::{ATTRIBUTE_PREFIX, compile_rule, RuleFilter};
/// assert_eq!(
///     compile_rule(Some(&Filter::eq("type", "com.example.order.created")), "billing", ATTRIBUTE_PREFIX)
///         .unwrap(),
///     RuleFilter::Correlation(vec![("cloudEvents_type".into(), "com.example.order.created".into())])
/// );
/// let RuleFilter::Sql(sql) =
///     compile_rule(Some(&Filter::prefix("type", "com.example.")), "billing", "cloudEvents:").unwrap()
///     else { panic!() };
/// assert_eq!(sql, "([cloudEvents:type] LIKE 'com.example.%') AND \
///     (NOT EXISTS([cloudbus-redrive]) OR [cloudbus-redrive] = 'billing')");
/// ```
pub fn compile_rule(
    filter: Option<&Filter>,
    subscription: &str,
    prefix: &str,
) -> Result<RuleFilter> {
    let Some(filter) = filter else {
        return Ok(RuleFilter::True);
    };
    if let Some(pairs) = correlation(filter, prefix) {
        return Ok(RuleFilter::Correlation(pairs));
    }
    let guard = format!(
        "(NOT EXISTS([{REDRIVE_PROPERTY}]) OR [{REDRIVE_PROPERTY}] = {})",
        literal(subscription)
    );
    let sql = format!("({}) AND {guard}", sql(filter, prefix)?);
    if sql.len() > MAX_SQL_LENGTH {
        return Err(Error::invalid(format!(
            "the Service Bus SQL filter would be {} characters, more than the {MAX_SQL_LENGTH} \
             the service accepts: {sql}",
            sql.len()
        )));
    }
    Ok(RuleFilter::Sql(sql))
}

/// The property a filter attribute reads.
fn property(attribute: &str, prefix: &str) -> String {
    match attribute {
        "datacontenttype" => "sys.ContentType".to_owned(),
        other => format!("[{prefix}{other}]"),
    }
}

fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The literals a text value may be stored as: integer and boolean extensions travel
/// as typed AMQP values (CloudEvents AMQP binding), so `"12"` also matches `12`.
fn literals(value: &str) -> Vec<String> {
    let mut out = vec![literal(value)];
    if let Ok(n) = value.parse::<i64>() {
        out.push(n.to_string());
    } else if value == "true" || value == "false" {
        out.push(value.to_uppercase());
    }
    out
}

/// Exact text matches only, each attribute once, values that cannot be typed.
fn correlation(filter: &Filter, prefix: &str) -> Option<Vec<(String, String)>> {
    let parts: Vec<&Filter> = match filter {
        Filter::And(all) if !all.is_empty() => all.iter().collect(),
        single => vec![single],
    };
    let mut pairs: Vec<(String, String)> = Vec::new();
    for part in parts {
        let Filter::Equals { attribute, values } = part else {
            return None;
        };
        let [value] = values.as_slice() else {
            return None;
        };
        if attribute == "datacontenttype"
            || literals(value).len() > 1
            || pairs
                .iter()
                .any(|(k, _)| k.strip_prefix(prefix) == Some(attribute.as_str()))
        {
            return None;
        }
        pairs.push((format!("{prefix}{attribute}"), value.clone()));
    }
    Some(pairs)
}

fn sql(filter: &Filter, names: &str) -> Result<String> {
    Ok(match filter {
        Filter::Equals { attribute, values } => {
            if values.is_empty() {
                return Ok("1=0".into());
            }
            let all: Vec<String> = values.iter().flat_map(|v| literals(v)).collect();
            format!("{} IN ({})", property(attribute, names), all.join(", "))
        }
        Filter::Prefix { attribute, prefix } => {
            let escaped: String = prefix
                .chars()
                .flat_map(|c| match c {
                    '%' | '_' | '!' => vec!['!', c],
                    c => vec![c],
                })
                .collect();
            let escape = if escaped.len() != prefix.len() {
                " ESCAPE '!'"
            } else {
                ""
            };
            format!(
                "{} LIKE {}{escape}",
                property(attribute, names),
                literal(&format!("{escaped}%"))
            )
        }
        Filter::Range {
            attribute,
            min,
            max,
        } => {
            let p = property(attribute, names);
            let mut parts = vec![format!("EXISTS({p})")];
            if let Some(min) = min {
                parts.push(format!("{p} >= {}", number(*min)?));
            }
            if let Some(max) = max {
                parts.push(format!("{p} <= {}", number(*max)?));
            }
            parts.join(" AND ")
        }
        Filter::Exists { attribute, present } => {
            let p = property(attribute, names);
            if *present {
                format!("EXISTS({p})")
            } else {
                format!("NOT EXISTS({p})")
            }
        }
        Filter::AnythingBut { attribute, values } => {
            let p = property(attribute, names);
            if values.is_empty() {
                format!("EXISTS({p})")
            } else {
                let all: Vec<String> = values.iter().flat_map(|v| literals(v)).collect();
                format!("EXISTS({p}) AND {p} NOT IN ({})", all.join(", "))
            }
        }
        Filter::And(all) => join(all, " AND ", "1=1", names)?,
        Filter::Or(any) => join(any, " OR ", "1=0", names)?,
    })
}

fn join(filters: &[Filter], op: &str, empty: &str, names: &str) -> Result<String> {
    if filters.is_empty() {
        return Ok(empty.to_owned());
    }
    let parts: Result<Vec<String>> = filters
        .iter()
        .map(|f| sql(f, names).map(|s| format!("({s})")))
        .collect();
    Ok(parts?.join(op))
}

fn number(n: f64) -> Result<String> {
    if !n.is_finite() {
        return Err(Error::invalid(format!(
            "a Service Bus SQL filter cannot compare with {n}"
        )));
    }
    Ok(if n.fract() == 0.0 && n.abs() < 9.0e15 {
        format!("{}", n as i64)
    } else {
        format!("{n}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sql_of(f: &Filter) -> String {
        match compile_rule(Some(f), "s", "cloudEvents:").unwrap() {
            RuleFilter::Sql(s) => s,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_filter_compiles() {
        let f = Filter::or([
            Filter::and([
                Filter::one_of("type", ["a", "b"]),
                Filter::range("amount", Some(10.0), Some(20.5)),
            ]),
            Filter::anything_but("subject", ["x'y"]),
            Filter::not_exists("tenant"),
            Filter::prefix("source", "50%_off"),
        ]);
        assert_eq!(
            sql_of(&f),
            "((([cloudEvents:type] IN ('a', 'b')) AND (EXISTS([cloudEvents:amount]) AND \
             [cloudEvents:amount] >= 10 AND [cloudEvents:amount] <= 20.5)) OR \
             (EXISTS([cloudEvents:subject]) AND [cloudEvents:subject] NOT IN ('x''y')) OR \
             (NOT EXISTS([cloudEvents:tenant])) OR \
             ([cloudEvents:source] LIKE '50!%!_off%' ESCAPE '!')) AND \
             (NOT EXISTS([cloudbus-redrive]) OR [cloudbus-redrive] = 's')"
        );
    }

    #[test]
    fn typed_values_match_both_ways_and_leave_correlation() {
        assert_eq!(
            sql_of(&Filter::eq("priority", "3")),
            "([cloudEvents:priority] IN ('3', 3)) AND \
             (NOT EXISTS([cloudbus-redrive]) OR [cloudbus-redrive] = 's')"
        );
    }

    #[test]
    fn equalities_become_a_correlation_filter() {
        let f = Filter::and([Filter::eq("type", "t"), Filter::eq("subject", "s")]);
        assert_eq!(
            compile_rule(Some(&f), "x", "cloudEvents_").unwrap(),
            RuleFilter::Correlation(vec![
                ("cloudEvents_type".into(), "t".into()),
                ("cloudEvents_subject".into(), "s".into())
            ])
        );
        assert_eq!(
            compile_rule(None, "x", "cloudEvents_").unwrap(),
            RuleFilter::True
        );
    }

    #[test]
    fn too_long_is_refused() {
        let values: Vec<String> = (0..200).map(|i| format!("value-{i}")).collect();
        let e =
            compile_rule(Some(&Filter::one_of("type", values)), "s", "cloudEvents_").unwrap_err();
        assert!(e.message().contains("1024"), "{e}");
    }
}
