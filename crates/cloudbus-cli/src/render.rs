//! How events and dead letters are printed: one readable block each, or one line of
//! JSON (the CloudEvents JSON format, with what the delivery adds under `delivery`).

use cloudbus::{AttributesReader, Delivery, Event, Payload};

/// The data of an event as text: pretty JSON, UTF-8 text, or a note on binary data.
fn data_text(event: &Event) -> Option<String> {
    Some(match event.data()? {
        cloudbus::Data::Json(value) => {
            serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
        }
        cloudbus::Data::String(text) => match serde_json::from_str::<serde_json::Value>(text) {
            Ok(value) => serde_json::to_string_pretty(&value).unwrap_or_else(|_| text.clone()),
            Err(_) => text.clone(),
        },
        cloudbus::Data::Binary(bytes) => match std::str::from_utf8(bytes) {
            Ok(text) => match serde_json::from_str::<serde_json::Value>(text) {
                Ok(value) => {
                    serde_json::to_string_pretty(&value).unwrap_or_else(|_| text.to_owned())
                }
                Err(_) => text.to_owned(),
            },
            Err(_) => format!("({} bytes of binary data)", bytes.len()),
        },
    })
}

/// The attribute lines of an event's block.
fn attribute_lines(event: &Event) -> Vec<(String, String)> {
    let mut lines = vec![
        ("id".to_owned(), event.id().to_owned()),
        ("source".to_owned(), event.source().to_string()),
    ];
    if let Some(subject) = event.subject() {
        lines.push(("subject".to_owned(), subject.to_owned()));
    }
    if let Some(time) = event.time() {
        lines.push(("time".to_owned(), time.to_rfc3339()));
    }
    if let Some(schema) = event.dataschema() {
        lines.push(("dataschema".to_owned(), schema.to_string()));
    }
    let mut extensions: Vec<(String, String)> = event
        .iter_extensions()
        .map(|(name, value)| (name.to_owned(), value.to_string()))
        .collect();
    extensions.sort();
    lines.extend(extensions);
    lines
}

/// One readable block: the type as a heading, the attributes, the data.
pub fn event_block(event: &Event, extra: &[(&str, String)]) -> String {
    let mut out = format!("── {}\n", event.ty());
    let lines = attribute_lines(event);
    let width = lines
        .iter()
        .map(|(k, _)| k.len())
        .chain(extra.iter().map(|(k, _)| k.len()))
        .max()
        .unwrap_or(0);
    for (name, value) in extra
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .chain(lines)
    {
        out.push_str(&format!("  {name:<width$}  {value}\n"));
    }
    if let Some(data) = data_text(event) {
        let content_type = event
            .datacontenttype()
            .unwrap_or("application/octet-stream");
        out.push_str(&format!("  data ({content_type}):\n"));
        for line in data.lines() {
            out.push_str(&format!("    {line}\n"));
        }
    }
    out
}

/// The event in the CloudEvents JSON format, as a JSON value.
fn event_json(event: &Event) -> serde_json::Value {
    match cloudbus::codec::to_structured_json(event)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
    {
        Some(value) => value,
        None => serde_json::json!({ "id": event.id(), "type": event.ty() }),
    }
}

/// A delivery as a readable block or a JSON line.
pub fn delivery(delivery: &Delivery, json: bool) -> String {
    let event = delivery.event();
    let attempt = delivery.attempt();
    if json {
        let mut value = event_json(event);
        value["delivery"] = serde_json::json!({
            "attempt": attempt,
            "ordering_key": delivery.ordering_key(),
        });
        return value.to_string();
    }
    let mut extra = vec![("attempt", attempt.to_string())];
    if let Some(key) = delivery.ordering_key() {
        extra.push(("key", key.to_owned()));
    }
    event_block(event, &extra)
}

/// A dead letter as a readable block or a JSON line: why, how many attempts, when,
/// and the event (or the raw message that was not one).
pub fn dead_letter(letter: &cloudbus::DeadLetter, json: bool) -> String {
    let reason = letter
        .reason
        .clone()
        .unwrap_or_else(|| "(no reason)".into());
    if json {
        let payload = match &letter.payload {
            Payload::Event(event) => serde_json::json!({ "event": event_json(event) }),
            Payload::Raw(raw) => serde_json::json!({
                "raw": String::from_utf8_lossy(&raw.body),
                "attributes": raw.attributes,
            }),
        };
        let mut value = serde_json::json!({
            "reason": reason,
            "description": letter.description,
            "attempts": letter.attempts,
            "source_entity": letter.source_entity,
            "dead_lettered_at": letter.dead_lettered_at.map(|t| t.to_rfc3339()),
        });
        if let (Some(target), Some(extra)) = (value.as_object_mut(), payload.as_object()) {
            target.extend(extra.clone());
        }
        return value.to_string();
    }
    let mut extra = vec![
        ("reason", reason),
        ("attempts", letter.attempts.to_string()),
    ];
    if let Some(description) = &letter.description {
        extra.push(("description", description.clone()));
    }
    if let Some(at) = letter.dead_lettered_at {
        extra.push(("dead-lettered", at.to_rfc3339()));
    }
    if let Some(source) = &letter.source_entity {
        extra.push(("from", source.clone()));
    }
    match &letter.payload {
        Payload::Event(event) => event_block(event, &extra),
        Payload::Raw(raw) => {
            let mut out = "── (not a CloudEvent)\n".to_owned();
            for (k, v) in extra {
                out.push_str(&format!("  {k:<13}  {v}\n"));
            }
            out.push_str(&format!(
                "  raw ({} bytes):\n    {}\n",
                raw.body.len(),
                String::from_utf8_lossy(&raw.body[..raw.body.len().min(2048)])
            ));
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_shows_attributes_and_pretty_data() {
        let event = cloudbus::EventBuilder::new("com.example.order.created", "/shop")
            .subject("orders/7")
            .json(&serde_json::json!({"n": 7}))
            .and_then(|b| b.build())
            .unwrap();
        let block = event_block(&event, &[("attempt", "2".into())]);
        assert!(
            block.starts_with("── com.example.order.created\n"),
            "{block}"
        );
        assert!(block.contains("attempt"), "{block}");
        assert!(block.contains("subject"), "{block}");
        assert!(block.contains("\"n\": 7"), "{block}");
        let json: serde_json::Value =
            serde_json::from_str(&event_json(&event).to_string()).unwrap();
        assert_eq!(json["type"], "com.example.order.created");
        assert_eq!(json["data"]["n"], 7);
    }
}
