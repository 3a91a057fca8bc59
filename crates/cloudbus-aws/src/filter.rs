//! Portable filters as AWS content patterns, the grammar EventBridge event patterns
//! and SNS filter policies share.

use cloudbus_driver::{Error, Result};

/// How a portable filter becomes an AWS content pattern: the grammar EventBridge event
/// patterns and SNS filter policies (both scopes) share (`prefix`, `exists`,
/// `anything-but`, `numeric`, `$or`).
pub(crate) struct PatternRules<'a> {
    /// The target, named in errors ("an EventBridge pattern").
    pub what: &'a str,
    /// Put before each attribute name (`ce-` for SNS message attributes).
    pub key_prefix: &'a str,
    /// Whether the values compare as numbers; when not, a numeric range is
    /// `Unsupported`.
    pub numeric: bool,
}

/// Compiles a portable filter to an AWS content pattern by `rules`. Two conditions on
/// one attribute inside an AND have no pattern form: a typed `Unsupported` error.
pub(crate) fn content_pattern(
    filter: &cloudbus_driver::Filter,
    rules: &PatternRules<'_>,
) -> Result<serde_json::Value> {
    use cloudbus_driver::Filter;
    use serde_json::{Map, Value, json};
    let key = |a: &str| format!("{}{a}", rules.key_prefix);
    Ok(match filter {
        Filter::Equals { attribute, values } => json!({ key(attribute): values }),
        Filter::Prefix { attribute, prefix } => {
            json!({ key(attribute): [{ "prefix": prefix }] })
        }
        Filter::Exists { attribute, present } => {
            json!({ key(attribute): [{ "exists": present }] })
        }
        Filter::AnythingBut { attribute, values } => {
            json!({ key(attribute): [{ "anything-but": values }] })
        }
        Filter::Range { attribute, .. } if !rules.numeric => {
            return Err(Error::unsupported(format!(
                "{} cannot compare the String attribute {attribute:?} numerically; filter it \
                 in the consumer (ConsumerOptions::filter)",
                rules.what
            )));
        }
        Filter::Range {
            attribute,
            min,
            max,
        } => {
            let mut bounds = Vec::new();
            if let Some(m) = min {
                bounds.push(json!(">="));
                bounds.push(json!(m));
            }
            if let Some(m) = max {
                bounds.push(json!("<="));
                bounds.push(json!(m));
            }
            if bounds.is_empty() {
                json!({ key(attribute): [{ "exists": true }] })
            } else {
                json!({ key(attribute): [{ "numeric": bounds }] })
            }
        }
        Filter::And(fs) => {
            let mut all = Map::new();
            for f in fs {
                let Value::Object(part) = content_pattern(f, rules)? else {
                    continue;
                };
                for (k, v) in part {
                    if all.contains_key(&k) {
                        return Err(Error::unsupported(format!(
                            "{} cannot AND two conditions on {k:?}",
                            rules.what
                        )));
                    }
                    all.insert(k, v);
                }
            }
            Value::Object(all)
        }
        Filter::Or(fs) => json!({
            "$or": fs.iter().map(|f| content_pattern(f, rules)).collect::<Result<Vec<_>>>()?
        }),
    })
}

/// `text` as JSON with every object's keys sorted, so that a pattern or policy read
/// back from AWS compares equal to the one cloudbus wrote however AWS orders it; the
/// text itself when it is not JSON.
pub(crate) fn canonical_json(text: &str) -> String {
    fn sorted(v: serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Object(map) => {
                let mut entries: Vec<(String, serde_json::Value)> = map.into_iter().collect();
                entries.sort_by(|a, b| a.0.cmp(&b.0));
                serde_json::Value::Object(
                    entries.into_iter().map(|(k, v)| (k, sorted(v))).collect(),
                )
            }
            serde_json::Value::Array(items) => {
                serde_json::Value::Array(items.into_iter().map(sorted).collect())
            }
            other => other,
        }
    }
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(v) => sorted(v).to_string(),
        Err(_) => text.to_owned(),
    }
}
