//! [`check_compatibility`]: whether a new version of a JSON Schema is backward
//! compatible with the old one, by the rules of schema evolution that let consumers
//! upgrade first: a consumer reading with the new schema must accept every event
//! written with the old one.
//!
//! Compatible: adding an optional property; making a required property optional;
//! widening a type (`integer` to `number`, adding a type); adding enum values.
//! Incompatible: removing a required property; changing a property's type; making a
//! property required (or adding a required one); removing enum values; forbidding
//! additional properties where old events may carry a removed property. Nested
//! objects (`properties`) and arrays (`items`) are checked the same way.

use std::collections::BTreeSet;

use serde_json::Value;

/// The verdict of [`check_compatibility`]: each incompatible change, with the path of
/// the property it concerns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Compatibility {
    /// What breaks old events, one line each (empty: compatible).
    pub problems: Vec<String>,
}

impl Compatibility {
    /// Whether the new schema accepts what the old one did.
    pub fn is_compatible(&self) -> bool {
        self.problems.is_empty()
    }
}

impl std::fmt::Display for Compatibility {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.problems.is_empty() {
            return write!(f, "compatible");
        }
        writeln!(f, "incompatible:")?;
        for p in &self.problems {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

/// Checks that `new` accepts every instance `old` accepted, by the rules above.
///
/// ```
/// use serde_json::json;
/// use cloudbus_core::schema::check_compatibility;
/// let v1 = json!({"type": "object", "required": ["id"], "properties": {"id": {"type": "string"}}});
/// let v2 = json!({"type": "object", "required": ["id"],
///     "properties": {"id": {"type": "string"}, "note": {"type": "string"}}});
/// assert!(check_compatibility(&v1, &v2).is_compatible());
/// let retyped = json!({"type": "object", "required": ["id"], "properties": {"id": {"type": "integer"}}});
/// let verdict = check_compatibility(&v1, &retyped);
/// assert!(!verdict.is_compatible());
/// assert!(verdict.problems[0].contains("/id"), "{verdict}");
/// ```
pub fn check_compatibility(old: &Value, new: &Value) -> Compatibility {
    let mut problems = Vec::new();
    compare(old, new, "", &mut problems);
    Compatibility { problems }
}

fn compare(old: &Value, new: &Value, path: &str, problems: &mut Vec<String>) {
    let here = if path.is_empty() { "/" } else { path };
    let (old_types, new_types) = (types(old), types(new));
    if let (Some(o), Some(n)) = (&old_types, &new_types) {
        let narrowed: Vec<&String> = o
            .iter()
            .filter(|t| !(n.contains(*t) || (t.as_str() == "integer" && n.contains("number"))))
            .collect();
        if !narrowed.is_empty() {
            problems.push(format!(
                "{here}: type changed from {} to {}",
                join(o),
                join(n)
            ));
            return;
        }
    } else if old_types.is_none() && new_types.is_some() && !is_empty_schema(old) {
        // An old schema without "type" accepted any type; a new one constrains it.
        problems.push(format!(
            "{here}: type restricted to {}",
            join(new_types.as_ref().unwrap_or(&BTreeSet::new()))
        ));
    }
    if let (Some(o), Some(n)) = (old.get("enum"), new.get("enum"))
        && let (Some(o), Some(n)) = (o.as_array(), n.as_array())
    {
        for value in o.iter().filter(|v| !n.contains(v)) {
            problems.push(format!("{here}: enum value {value} removed"));
        }
    } else if old.get("enum").is_none() && new.get("enum").is_some() {
        problems.push(format!("{here}: values restricted to an enum"));
    }
    compare_properties(old, new, path, problems);
    if let (Some(o), Some(n)) = (old.get("items"), new.get("items")) {
        compare(o, n, &format!("{path}/items"), problems);
    }
}

fn compare_properties(old: &Value, new: &Value, path: &str, problems: &mut Vec<String>) {
    let empty = serde_json::Map::new();
    let old_props = old
        .get("properties")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let new_props = new
        .get("properties")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let (old_required, new_required) = (required(old), required(new));
    let closed = new.get("additionalProperties") == Some(&Value::Bool(false));
    for (name, old_schema) in old_props {
        let at = format!("{path}/{name}");
        match new_props.get(name) {
            Some(new_schema) => compare(old_schema, new_schema, &at, problems),
            None if old_required.contains(name) => {
                problems.push(format!("{at}: required property removed"));
            }
            None if closed => problems.push(format!(
                "{at}: property removed while additionalProperties is false, so old events carrying it fail"
            )),
            None => {}
        }
    }
    for name in new_required.difference(&old_required) {
        let at = format!("{path}/{name}");
        if old_props.contains_key(name) {
            problems.push(format!("{at}: optional property made required"));
        } else {
            problems.push(format!("{at}: required property added"));
        }
    }
    if closed && old.get("additionalProperties") != Some(&Value::Bool(false)) {
        problems.push(format!(
            "{}: additionalProperties set to false; old events with other properties fail",
            if path.is_empty() { "/" } else { path }
        ));
    }
}

fn types(schema: &Value) -> Option<BTreeSet<String>> {
    match schema.get("type")? {
        Value::String(t) => Some(BTreeSet::from([t.clone()])),
        Value::Array(ts) => Some(
            ts.iter()
                .filter_map(|t| t.as_str().map(str::to_owned))
                .collect(),
        ),
        _ => None,
    }
}

fn required(schema: &Value) -> BTreeSet<String> {
    schema
        .get("required")
        .and_then(Value::as_array)
        .map(|r| {
            r.iter()
                .filter_map(|n| n.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn is_empty_schema(schema: &Value) -> bool {
    schema.as_object().is_none_or(|o| o.is_empty())
}

fn join(types: &BTreeSet<String>) -> String {
    types.iter().cloned().collect::<Vec<_>>().join("|")
}
