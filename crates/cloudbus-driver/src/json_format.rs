//! The CloudEvents JSON event format (spec 1.0) decoded straight from the bytes: one
//! serde visitor reads the top-level object into the event's attributes, builds the
//! `data` tree once and nothing else.
//!
//! The cloudevents crate's own `Deserialize` parses into a `serde_json::Value`, copies
//! that into a map and copies `data` again: three trees per event. This decoder is the
//! fast path of [`crate::codec::from_structured_json`]. It takes only what it is sure
//! of (specversion 1.0, string attributes, string/boolean/integer extensions, no
//! nulls, no repeated names) and answers `None` for anything else, so that the
//! reference decoder decides those events and words their errors: the two cannot
//! disagree on any input, which the tests check on every conformance case and the fuzz
//! corpus.

use std::borrow::Cow;
use std::fmt;

use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde::de::{self, Deserializer, MapAccess, Visitor};

use crate::event::{AttributesWriter, Data, Event, ExtensionValue};

/// The event in `body` when the fast path is sure of it; `None` leaves the decision
/// (and any error) to the reference decoder.
pub(crate) fn decode(body: &[u8]) -> Option<Event> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let fields = de.deserialize_map(FieldsVisitor).ok()?;
    de.end().ok()?;
    fields.into_event()
}

/// A top-level name, borrowed from the input unless it holds escapes.
struct Name<'de>(Cow<'de, str>);

impl<'de> de::Deserialize<'de> for Name<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NameVisitor;
        impl<'de> Visitor<'de> for NameVisitor {
            type Value = Name<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an attribute name")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Name(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Name(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Name(Cow::Owned(v)))
            }
        }
        deserializer.deserialize_str(NameVisitor)
    }
}

/// An attribute or extension value the fast path takes: a string, a boolean or an
/// integer that fits an i64. Anything else (null, a float, an object, an array) fails
/// the fast path.
enum Scalar {
    Text(String),
    Boolean(bool),
    Integer(i64),
}

impl<'de> de::Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct ScalarVisitor;
        impl Visitor<'_> for ScalarVisitor {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, a boolean or an integer")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Scalar::Text(v.to_owned()))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Scalar::Text(v))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Ok(Scalar::Boolean(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(Scalar::Integer(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                i64::try_from(v)
                    .map(Scalar::Integer)
                    .map_err(|_| E::custom("integer beyond i64"))
            }
        }
        deserializer.deserialize_any(ScalarVisitor)
    }
}

/// The bytes of a `data_base64` string (standard alphabet, padded).
struct Base64(Vec<u8>);

impl<'de> de::Deserialize<'de> for Base64 {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Base64Visitor;
        impl Visitor<'_> for Base64Visitor {
            type Value = Base64;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a Base64 string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                base64::engine::general_purpose::STANDARD
                    .decode(v)
                    .map(Base64)
                    .map_err(|_| unsure())
            }
        }
        deserializer.deserialize_str(Base64Visitor)
    }
}

/// The top-level members, as read.
#[derive(Default)]
struct Fields {
    specversion: Option<String>,
    id: Option<String>,
    ty: Option<String>,
    source: Option<String>,
    datacontenttype: Option<String>,
    dataschema: Option<String>,
    subject: Option<String>,
    time: Option<String>,
    data: Option<serde_json::Value>,
    /// `data_base64`, decoded.
    data_base64: Option<Vec<u8>>,
    extensions: Vec<(String, ExtensionValue)>,
}

/// Fails the fast path (the reference decoder decides).
fn unsure<E: de::Error>() -> E {
    E::custom("left to the reference decoder")
}

/// Reads a string attribute into `slot`, once.
fn text<'de, A: MapAccess<'de>>(map: &mut A, slot: &mut Option<String>) -> Result<(), A::Error> {
    if slot.is_some() {
        return Err(unsure());
    }
    match map.next_value::<Scalar>()? {
        Scalar::Text(s) => {
            *slot = Some(s);
            Ok(())
        }
        _ => Err(unsure()),
    }
}

struct FieldsVisitor;

impl<'de> Visitor<'de> for FieldsVisitor {
    type Value = Fields;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a CloudEvent in the JSON format")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Fields, A::Error> {
        let mut f = Fields::default();
        while let Some(Name(name)) = map.next_key::<Name<'de>>()? {
            match name.as_ref() {
                "specversion" => text(&mut map, &mut f.specversion)?,
                "id" => text(&mut map, &mut f.id)?,
                "type" => text(&mut map, &mut f.ty)?,
                "source" => text(&mut map, &mut f.source)?,
                "datacontenttype" => text(&mut map, &mut f.datacontenttype)?,
                "dataschema" => text(&mut map, &mut f.dataschema)?,
                "subject" => text(&mut map, &mut f.subject)?,
                "time" => text(&mut map, &mut f.time)?,
                "data_base64" => {
                    if f.data_base64.is_some() {
                        return Err(unsure());
                    }
                    // Decoded from the input itself (no copy of the text first).
                    let Base64(bytes) = map.next_value::<Base64>()?;
                    f.data_base64 = Some(bytes);
                }
                "data" => {
                    if f.data.is_some() {
                        return Err(unsure());
                    }
                    match map.next_value::<serde_json::Value>()? {
                        serde_json::Value::Null => return Err(unsure()),
                        v => f.data = Some(v),
                    }
                }
                _ => {
                    let value = match map.next_value::<Scalar>()? {
                        Scalar::Text(s) => ExtensionValue::String(s),
                        Scalar::Boolean(b) => ExtensionValue::Boolean(b),
                        Scalar::Integer(i) => ExtensionValue::Integer(i),
                    };
                    if f.extensions.iter().any(|(n, _)| n == name.as_ref()) {
                        return Err(unsure());
                    }
                    f.extensions.push((name.into_owned(), value));
                }
            }
        }
        Ok(f)
    }
}

/// Whether data of content type `ct` is JSON: the rule of cloudevents-sdk, which
/// reads and writes the structured format, so that binary and structured mode agree on
/// every content type (a disagreement turned data into another kind on a round trip:
/// found by the fuzz corpus with `application/json\`). The binary codec uses it too.
pub(crate) fn is_json(ct: &str) -> bool {
    ct.starts_with("application/json") || ct.starts_with("text/json") || ct.ends_with("+json")
}

impl Fields {
    fn into_event(self) -> Option<Event> {
        if self.specversion.as_deref() != Some("1.0") {
            return None;
        }
        let non_empty = |s: Option<String>| s.filter(|s| !s.is_empty());
        let id = non_empty(self.id)?;
        let source = non_empty(self.source)?;
        let ty = non_empty(self.ty)?;
        let time = match &self.time {
            Some(t) => Some(DateTime::parse_from_rfc3339(t).ok()?.with_timezone(&Utc)),
            None => None,
        };
        let dataschema = match &self.dataschema {
            Some(s) => Some(url::Url::parse(s).ok()?),
            None => None,
        };
        let json = is_json(
            self.datacontenttype
                .as_deref()
                .unwrap_or("application/json"),
        );
        let data = match (self.data, self.data_base64) {
            (Some(_), Some(_)) => return None,
            (Some(v), None) if json => Some(Data::Json(v)),
            (Some(serde_json::Value::String(s)), None) => Some(Data::String(s)),
            (Some(_), None) => return None,
            (None, Some(bytes)) => {
                if json && let Ok(v) = serde_json::from_slice(&bytes) {
                    Some(Data::Json(v))
                } else {
                    Some(Data::Binary(bytes))
                }
            }
            (None, None) => None,
        };
        let mut event = crate::event::blank_event();
        event.set_id(id);
        event.set_source(source);
        event.set_type(ty);
        event.set_subject(self.subject);
        event.set_time(time);
        event.set_datacontenttype(self.datacontenttype);
        event.set_dataschema(dataschema);
        if let Some(data) = data {
            event.set_data_unchecked(data);
        }
        for (name, value) in self.extensions {
            event.set_extension(&name, value);
        }
        Some(event)
    }
}

#[cfg(test)]
mod tests {
    use super::decode;
    use crate::codec::{reference_from_structured_json, to_structured_json};
    use crate::event::{AttributesWriter, Event, EventBuilder};

    /// The fast path either agrees with the reference decoder or leaves the input
    /// to it; returns whether it took the input.
    fn agrees(body: &[u8]) -> bool {
        match decode(body) {
            None => false,
            Some(fast) => {
                let reference = reference_from_structured_json(body).unwrap_or_else(|e| {
                    panic!(
                        "the fast path took what the reference refuses ({e}): {}",
                        String::from_utf8_lossy(body)
                    )
                });
                assert_eq!(fast, reference, "{}", String::from_utf8_lossy(body));
                true
            }
        }
    }

    /// Events like the conformance suite's: every optional attribute, extensions of
    /// each type, JSON, text, binary and no data.
    fn cases() -> Vec<Event> {
        let meta = EventBuilder::new("com.example.conformance.meta", "https://example.com/src")
            .subject("order-17")
            .partition_key("customer-9")
            .extension("priority", "high")
            .extension("attempt", 3_i64)
            .extension("replayed", true)
            .json(&serde_json::json!({"n": 17, "nested": {"list": [1, 2.5, "x", null, false]}, "ü": "ünïcødé \"quoted\"\n"}))
            .and_then(|b| b.build());
        let mut with_schema = EventBuilder::new("com.example.schema", "/c")
            .json(&serde_json::json!([1, 2, 3]))
            .and_then(|b| b.build())
            .expect("event");
        with_schema.set_dataschema(Some(
            url::Url::parse("https://example.com/schemas/v2.json").expect("url"),
        ));
        vec![
            meta.expect("event"),
            with_schema,
            EventBuilder::new("conformance.body", "/c")
                .data("text/plain", b"plain text \xe2\x9c\x93".to_vec())
                .build()
                .expect("event"),
            EventBuilder::new("conformance.body", "/c")
                .data("application/octet-stream", vec![0, 1, 2, 255, 254])
                .build()
                .expect("event"),
            EventBuilder::new("conformance.body", "/c")
                .data("application/vnd.example+json", b"{\"a\":1}".to_vec())
                .build()
                .expect("event"),
            EventBuilder::new("com.example.stream.empty", "/c")
                .build()
                .expect("event"),
        ]
    }

    #[test]
    fn the_fast_path_takes_every_encoded_case_and_agrees() {
        for event in cases() {
            let json = to_structured_json(&event).expect("encode");
            assert!(
                agrees(&json),
                "left to the reference: {}",
                String::from_utf8_lossy(&json)
            );
            // (The reference turns binary data under a JSON content type into JSON, so
            // the decoded event is compared with the reference, not with `event`.)
        }
    }

    #[test]
    fn what_the_fast_path_is_not_sure_of_goes_to_the_reference() {
        let left = [
            // Another spec version.
            r#"{"specversion":"0.3","id":"1","source":"/s","type":"t"}"#,
            // Nulls: an absent attribute to the reference, or data that is null.
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","subject":null}"#,
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","data":null}"#,
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","x":null}"#,
            // Repeated names (the reference keeps the last).
            r#"{"specversion":"1.0","id":"1","id":"2","source":"/s","type":"t"}"#,
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","x":"a","x":"b"}"#,
            // Extensions that are not string, boolean or i64.
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","x":1.5}"#,
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","x":18446744073709551615}"#,
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","x":{"a":1}}"#,
            // Broken attributes, data and both data forms.
            r#"{"specversion":"1.0","id":1,"source":"/s","type":"t"}"#,
            r#"{"specversion":"1.0","id":"","source":"/s","type":"t"}"#,
            r#"{"specversion":"1.0","id":"1","type":"t"}"#,
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","time":"yesterday"}"#,
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","dataschema":"not a uri"}"#,
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","datacontenttype":"text/plain","data":{"a":1}}"#,
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","data":1,"data_base64":"AA=="}"#,
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","data_base64":"***"}"#,
            // Not an object, not JSON, trailing bytes.
            r#"[1,2]"#,
            r#"{"specversion":"1.0""#,
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"t"} x"#,
        ];
        for body in left {
            assert!(decode(body.as_bytes()).is_none(), "taken: {body}");
        }
        let taken = [
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","x":-5,"y":true,"z":"s"}"#,
            r#"{"\u0073pecversion":"1.0","id":"1","source":"/s","type":"t"}"#,
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","datacontenttype":"application/json","data_base64":"eyJhIjoxfQ=="}"#,
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","datacontenttype":"application/json","data_base64":"AAE="}"#,
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","data_base64":"AAE="}"#,
            r#"{"specversion":"1.0","id":"1","source":"/s","type":"t","datacontenttype":"text/plain","data":"hi"}"#,
            r#" {"specversion":"1.0","id":"1","source":"/s","type":"t","time":"2026-11-30T14:00:00.123+02:00","data":"a string as JSON"} "#,
        ];
        for body in taken {
            assert!(agrees(body.as_bytes()), "left to the reference: {body}");
        }
    }

    /// Every seed of the committed fuzz corpora: the whole input, and its body after
    /// the fuzz targets' attribute prefix.
    #[test]
    fn the_fast_path_agrees_with_the_reference_on_the_fuzz_corpus() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
        let mut seeds = 0;
        let mut taken = 0;
        for dir in std::fs::read_dir(&root).expect("fuzz/corpus") {
            let dir = dir.expect("corpus entry").path();
            for file in std::fs::read_dir(&dir).expect("corpus directory") {
                let bytes = std::fs::read(file.expect("seed").path()).expect("seed bytes");
                seeds += 1;
                for input in [&bytes[..], strip_attributes(&bytes)] {
                    taken += usize::from(agrees(input));
                    // Each byte flipped, at a few places, to reach the edges.
                    for at in [
                        input.len() / 3,
                        input.len() / 2,
                        input.len().saturating_sub(2),
                    ] {
                        if let Some(&b) = input.get(at) {
                            let mut mutated = input.to_vec();
                            mutated[at] = b ^ 0x20;
                            taken += usize::from(agrees(&mutated));
                        }
                    }
                }
            }
        }
        assert!(seeds > 100, "only {seeds} seeds under {}", root.display());
        assert!(
            taken > 50,
            "the fast path took only {taken} inputs of {seeds} seeds"
        );
    }

    /// The body of a fuzz input after its `name\0value\0` attributes (the format of
    /// `cloudbus::fuzzing::message_from_bytes`).
    fn strip_attributes(data: &[u8]) -> &[u8] {
        let Some((&count, mut rest)) = data.split_first() else {
            return data;
        };
        for _ in 0..(count as usize % 17) {
            let mut parts = rest.splitn(3, |b| *b == 0);
            match (parts.next(), parts.next(), parts.next()) {
                (Some(_), Some(_), Some(tail)) => rest = tail,
                _ => break,
            }
        }
        rest
    }
}
