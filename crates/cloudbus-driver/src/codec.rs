//! Wire codecs: CloudEvents structured JSON mode and binary mode (attributes with a
//! prefix plus the data as the body), with an attribute budget that falls back to
//! structured mode. Provider crates reuse these instead of writing their own.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};

use crate::error::{Error, ErrorKind, Result};
use crate::event::{AttributesReader, AttributesWriter, Data, Event};

/// Content type of one event in structured mode.
pub const STRUCTURED_CONTENT_TYPE: &str = "application/cloudevents+json";
/// Content type of a JSON array of events in structured mode.
pub const BATCH_CONTENT_TYPE: &str = "application/cloudevents-batch+json";

/// A message as it travels: a body and string attributes (message attributes,
/// application properties, headers). Also what a foreign message looks like.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RawMessage {
    /// The body bytes.
    pub body: Vec<u8>,
    /// Message attributes by name.
    pub attributes: BTreeMap<String, String>,
}

impl RawMessage {
    /// A raw message with a body and no attributes.
    pub fn new(body: impl Into<Vec<u8>>) -> Self {
        RawMessage {
            body: body.into(),
            attributes: BTreeMap::new(),
        }
    }
    /// Adds an attribute.
    pub fn with_attribute(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.attributes.insert(name.into(), value.into());
        self
    }
    /// Body plus attributes, in bytes.
    pub fn size(&self) -> usize {
        self.body.len()
            + self
                .attributes
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }
}

/// Why a received message is not a usable CloudEvent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeErrorKind {
    /// No CloudEvents attributes and not structured CloudEvents JSON: a foreign message.
    NotACloudEvent,
    /// Structured mode (or JSON data) that is not valid JSON.
    InvalidJson,
    /// Looks like a CloudEvent but breaks the spec (a required attribute missing, a bad time...).
    InvalidCloudEvent,
}

/// A received message could not be decoded; carried to the dead-letter place as the reason.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError {
    /// The category.
    pub kind: DecodeErrorKind,
    /// What exactly is wrong.
    pub message: String,
}

impl DecodeError {
    fn new(kind: DecodeErrorKind, message: impl Into<String>) -> Self {
        DecodeError {
            kind,
            message: message.into(),
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.kind {
            DecodeErrorKind::NotACloudEvent => "not a CloudEvent",
            DecodeErrorKind::InvalidJson => "invalid JSON",
            DecodeErrorKind::InvalidCloudEvent => "invalid CloudEvent",
        };
        write!(f, "{what}: {}", self.message)
    }
}

impl std::error::Error for DecodeError {}

impl From<DecodeError> for Error {
    fn from(e: DecodeError) -> Self {
        Error::with_source(ErrorKind::Malformed, e.to_string(), e)
    }
}

/// Encodes an event as structured-mode JSON (`application/cloudevents+json`).
///
/// ```
/// use cloudbus_driver::{EventBuilder, codec};
/// let e = EventBuilder::new("t", "/s").build().unwrap();
/// let json = codec::to_structured_json(&e).unwrap();
/// assert_eq!(codec::from_structured_json(&json).unwrap(), e);
/// ```
pub fn to_structured_json(event: &Event) -> Result<Vec<u8>> {
    // Sized once from the estimate (an upper bound): no regrowth while writing.
    let mut out = Vec::with_capacity(crate::event::estimated_size(event));
    serde_json::to_writer(&mut out, event)
        .map(|()| out)
        .map_err(|e| {
            Error::with_source(
                ErrorKind::InvalidArgument,
                format!("event {} cannot be encoded as JSON", event.id()),
                e,
            )
        })
}

/// Decodes structured-mode JSON into an event, telling broken JSON, JSON that is not a
/// CloudEvent, and CloudEvents that break the spec apart.
///
/// A CloudEvents 1.0 event with string attributes and string, boolean or integer
/// extensions is read straight from the bytes (the `data` tree built once); anything
/// else (other spec versions, nulls, repeated names, every error) goes through the
/// cloudevents crate's own deserializer, which the fast path is tested to agree with.
///
/// ```
/// use cloudbus_driver::codec::{from_structured_json, to_structured_json};
/// use cloudbus_driver::{DecodeErrorKind, EventBuilder};
/// let e = EventBuilder::new("com.example.t", "/s").json(&serde_json::json!({"n": 1})).unwrap().build().unwrap();
/// assert_eq!(from_structured_json(&to_structured_json(&e).unwrap()).unwrap(), e);
/// assert_eq!(from_structured_json(b"{\"id\": 1}").unwrap_err().kind, DecodeErrorKind::NotACloudEvent);
/// ```
pub fn from_structured_json(body: &[u8]) -> std::result::Result<Event, DecodeError> {
    if let Some(event) = crate::json_format::decode(body) {
        return Ok(event);
    }
    reference_from_structured_json(body)
}

/// Structured JSON through the cloudevents crate's deserializer (a `Value` tree
/// first): the decoder of record for everything the fast path leaves, and what the
/// tests hold the fast path to.
pub(crate) fn reference_from_structured_json(
    body: &[u8],
) -> std::result::Result<Event, DecodeError> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| DecodeError::new(DecodeErrorKind::InvalidJson, e.to_string()))?;
    from_structured_value(value)
}

/// Decodes a message that carries no attributes to say what it is (a Kinesis record,
/// a message of a producer that cannot set attributes): structured CloudEvents JSON
/// when the body is a JSON object, otherwise [`DecodeErrorKind::NotACloudEvent`], the
/// reason every transport gives a foreign message.
///
/// ```
/// use cloudbus_driver::codec::from_unlabelled_body;
/// use cloudbus_driver::DecodeErrorKind;
/// assert_eq!(from_unlabelled_body(b"plain text").unwrap_err().kind, DecodeErrorKind::NotACloudEvent);
/// assert_eq!(from_unlabelled_body(b"{\"broken").unwrap_err().kind, DecodeErrorKind::InvalidJson);
/// ```
pub fn from_unlabelled_body(body: &[u8]) -> std::result::Result<Event, DecodeError> {
    let looks_structured = body
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b == b'{');
    if looks_structured {
        return from_structured_json(body);
    }
    Err(DecodeError::new(
        DecodeErrorKind::NotACloudEvent,
        format!(
            "no attributes say it is a CloudEvent and the body is not structured CloudEvents JSON ({} bytes)",
            body.len()
        ),
    ))
}

/// Decodes an already parsed JSON value (used by envelopes that embed a CloudEvent).
pub fn from_structured_value(value: serde_json::Value) -> std::result::Result<Event, DecodeError> {
    let Some(obj) = value.as_object() else {
        return Err(DecodeError::new(
            DecodeErrorKind::NotACloudEvent,
            "JSON body is not an object",
        ));
    };
    if !obj.contains_key("specversion") {
        return Err(DecodeError::new(
            DecodeErrorKind::NotACloudEvent,
            "JSON object has no \"specversion\" attribute",
        ));
    }
    for required in ["id", "source", "type"] {
        match obj.get(required) {
            Some(serde_json::Value::String(s)) if !s.is_empty() => {}
            _ => {
                return Err(DecodeError::new(
                    DecodeErrorKind::InvalidCloudEvent,
                    format!("required attribute \"{required}\" is missing or empty"),
                ));
            }
        }
    }
    serde_json::from_value::<Event>(value)
        .map_err(|e| DecodeError::new(DecodeErrorKind::InvalidCloudEvent, e.to_string()))
}

/// The data of an event as body bytes (JSON is serialized, text is UTF-8).
pub fn data_bytes(event: &Event) -> Result<Vec<u8>> {
    Ok(match event.data() {
        None => Vec::new(),
        Some(Data::Binary(b)) => b.clone(),
        Some(Data::String(s)) => s.clone().into_bytes(),
        Some(Data::Json(v)) => {
            // Sized once: no regrowth while writing (unless strings need escapes).
            let mut out = Vec::with_capacity(crate::event::json_len_hint(v));
            serde_json::to_writer(&mut out, v)?;
            out
        }
    })
}

/// Which mode an encoding ended up in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Attributes carry the context, the body the data.
    Binary,
    /// The body is the whole event as JSON.
    Structured,
}

/// Binary content mode over string message attributes: each context attribute and
/// extension becomes `prefix + name`, `datacontenttype` the content-type attribute, and
/// the data the body. When the attributes would exceed `max_attributes` (SQS and SNS
/// allow 10) it falls back to structured mode and says so in [`Mode`].
///
/// ```
/// use cloudbus_driver::{EventBuilder, codec::{BinaryCodec, Mode}};
/// let e = EventBuilder::new("t", "/s").partition_key("k").build().unwrap();
/// let codec = BinaryCodec::new("ce-");
/// let (msg, mode) = codec.encode(&e).unwrap();
/// assert_eq!(mode, Mode::Binary);
/// assert_eq!(msg.attributes["ce-partitionkey"], "k");
/// assert_eq!(codec.decode(&msg).unwrap(), e);
/// ```
#[derive(Clone, Debug)]
pub struct BinaryCodec {
    prefix: String,
    /// The context attributes' names with the prefix, made once (not per event).
    names: ContextNames,
    content_type_attribute: String,
    max_attributes: Option<usize>,
    reserved_attributes: usize,
    force_structured: bool,
}

impl BinaryCodec {
    /// A codec with `prefix` (`ce-` for Pub/Sub and HTTP-like attributes,
    /// `cloudEvents:` for AMQP), content type in `content-type`, no attribute budget.
    pub fn new(prefix: impl Into<String>) -> Self {
        let prefix = prefix.into();
        BinaryCodec {
            names: ContextNames::with_prefix(&prefix),
            prefix,
            content_type_attribute: "content-type".into(),
            max_attributes: None,
            reserved_attributes: 0,
            force_structured: false,
        }
    }
    /// The attribute that carries `datacontenttype`.
    pub fn content_type_attribute(mut self, name: impl Into<String>) -> Self {
        self.content_type_attribute = name.into();
        self
    }
    /// At most `max` attributes per message, `reserved` of them kept free for the
    /// provider's own use (a dead-letter reason, say).
    pub fn max_attributes(mut self, max: usize, reserved: usize) -> Self {
        self.max_attributes = Some(max);
        self.reserved_attributes = reserved;
        self
    }
    /// Always encode in structured mode.
    pub fn structured(mut self) -> Self {
        self.force_structured = true;
        self
    }
    /// The attribute prefix.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Encodes `event`, in binary mode when it fits the attribute budget.
    pub fn encode(&self, event: &Event) -> Result<(RawMessage, Mode)> {
        self.encode_keeping(event, &[])
    }

    /// [`encode`](Self::encode) for a broker that filters on attributes: when the
    /// event falls back to structured mode, the attributes named in `keep` (full
    /// names, such as `ce-tenant`) go first among the routing hints, and if the event
    /// carries more of them than the budget allows, the encode fails with
    /// [`ErrorKind::InvalidArgument`] instead of
    /// dropping one silently (a subscription filtering on it would never see the
    /// event while the publish said Ok).
    ///
    /// ```
    /// use cloudbus_driver::{EventBuilder, codec::{BinaryCodec, Mode}};
    /// let mut b = EventBuilder::new("t", "/s");
    /// for n in 0..9 { b = b.extension(format!("a{n}"), "x"); }
    /// let e = b.extension("zeta", "yes").build().unwrap();
    /// let codec = BinaryCodec::new("ce-").max_attributes(10, 2);
    /// let (msg, mode) = codec.encode_keeping(&e, &["ce-zeta".to_owned()]).unwrap();
    /// assert_eq!(mode, Mode::Structured);
    /// assert_eq!(msg.attributes["ce-zeta"], "yes");
    /// ```
    pub fn encode_keeping(&self, event: &Event, keep: &[String]) -> Result<(RawMessage, Mode)> {
        let mut attributes = BTreeMap::new();
        let names = &self.names;
        attributes.insert(names.specversion.clone(), event.specversion().to_string());
        attributes.insert(names.id.clone(), event.id().to_owned());
        attributes.insert(names.source.clone(), event.source().to_string());
        attributes.insert(names.ty.clone(), event.ty().to_owned());
        if let Some(s) = event.subject() {
            attributes.insert(names.subject.clone(), s.to_owned());
        }
        if let Some(t) = event.time() {
            attributes.insert(
                names.time.clone(),
                t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
            );
        }
        if let Some(s) = event.dataschema() {
            attributes.insert(names.dataschema.clone(), s.to_string());
        }
        for (name, value) in event.iter_extensions() {
            let mut key = String::with_capacity(self.prefix.len() + name.len());
            key.push_str(&self.prefix);
            key.push_str(name);
            attributes.insert(key, value.to_string());
        }
        if let Some(ct) = event.datacontenttype() {
            attributes.insert(self.content_type_attribute.clone(), ct.to_owned());
        }
        let budget = self
            .max_attributes
            .map(|m| m.saturating_sub(self.reserved_attributes));
        if self.force_structured || budget.is_some_and(|b| attributes.len() > b) {
            let wanted: Vec<&String> = keep
                .iter()
                .filter(|k| attributes.contains_key(*k))
                .collect();
            // One place goes to the content type.
            if let Some(room) = budget.map(|b| b.saturating_sub(1))
                && wanted.len() > room
            {
                return Err(crate::error::Error::invalid(format!(
                    "event {} carries {} attributes that subscriptions filter on ({}), more than the {room} a message can carry beside its content type",
                    event.id(),
                    wanted.len(),
                    wanted
                        .iter()
                        .map(|k| k.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            let hints = self.routing_hints(attributes, budget, keep);
            return Ok((
                RawMessage {
                    body: to_structured_json(event)?,
                    attributes: hints,
                },
                Mode::Structured,
            ));
        }
        Ok((
            RawMessage {
                body: data_bytes(event)?,
                attributes,
            },
            Mode::Binary,
        ))
    }

    /// The attributes of a structured-mode message: the content type, then as many
    /// of the event's attributes as the budget allows (type, source and subject
    /// first, then extensions, then the rest), so that brokers can still filter and
    /// route on them. `specversion` is never among them: it marks binary mode.
    fn routing_hints(
        &self,
        mut binary: BTreeMap<String, String>,
        budget: Option<usize>,
        keep: &[String],
    ) -> BTreeMap<String, String> {
        let p = &self.prefix;
        let room = budget.unwrap_or(usize::MAX);
        let mut hints = BTreeMap::new();
        hints.insert(
            self.content_type_attribute.clone(),
            STRUCTURED_CONTENT_TYPE.to_owned(),
        );
        binary.remove(&format!("{p}specversion"));
        binary.remove(&self.content_type_attribute);
        let first: Vec<String> = ["type", "source", "subject"]
            .iter()
            .map(|n| format!("{p}{n}"))
            .collect();
        let late: Vec<String> = ["id", "time", "dataschema"]
            .iter()
            .map(|n| format!("{p}{n}"))
            .collect();
        let mut order: Vec<String> = keep.to_vec();
        order.extend(first.iter().filter(|k| !keep.contains(k)).cloned());
        order.extend(
            binary
                .keys()
                .filter(|k| !first.contains(k) && !late.contains(k) && !keep.contains(k))
                .cloned(),
        );
        order.extend(late.into_iter().filter(|k| !keep.contains(k)));
        for key in order {
            if hints.len() >= room {
                break;
            }
            if let Some(v) = binary.remove(&key) {
                hints.insert(key, v);
            }
        }
        hints
    }

    /// Decodes a message in either mode; anything else is a [`DecodeError`].
    ///
    /// Attribute names are matched case-insensitively (the Pub/Sub and HTTP bindings
    /// say so; a producer may write `Content-Type` or `CE-ID`). The mode follows the
    /// bindings: a content type starting with `application/cloudevents` is structured
    /// mode, else a `specversion` attribute is binary mode; a message with neither is
    /// read as structured JSON when its body is a JSON object (producers that cannot
    /// set attributes), and is otherwise not a CloudEvent.
    pub fn decode(&self, msg: &RawMessage) -> std::result::Result<Event, DecodeError> {
        // Only the names are lowered (and copied), never the body.
        let attributes: std::borrow::Cow<'_, BTreeMap<String, String>> = if msg
            .attributes
            .keys()
            .any(|k| k.bytes().any(|b| b.is_ascii_uppercase()))
        {
            std::borrow::Cow::Owned(
                msg.attributes
                    .iter()
                    .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
                    .collect(),
            )
        } else {
            std::borrow::Cow::Borrowed(&msg.attributes)
        };
        let p = self.prefix.to_ascii_lowercase();
        let content_type = attributes
            .get(&self.content_type_attribute.to_ascii_lowercase())
            .map(String::as_str);
        if content_type.is_some_and(|ct| {
            ct.trim_start()
                .to_ascii_lowercase()
                .starts_with("application/cloudevents")
        }) {
            return from_structured_json(&msg.body);
        }
        if let Some(spec) = attributes.get(&format!("{p}specversion")) {
            return self.decode_binary(&attributes, &msg.body, &p, spec, content_type);
        }
        from_unlabelled_body(&msg.body)
    }

    /// Binary mode; the attribute names and the prefix `p` are lowercase.
    fn decode_binary(
        &self,
        attributes: &BTreeMap<String, String>,
        body: &[u8],
        p: &str,
        spec: &str,
        content_type: Option<&str>,
    ) -> std::result::Result<Event, DecodeError> {
        let invalid = |m: String| DecodeError::new(DecodeErrorKind::InvalidCloudEvent, m);
        if spec != "1.0" {
            return Err(invalid(format!("unsupported specversion {spec:?}")));
        }
        let get = |name: &str| attributes.get(&format!("{p}{name}"));
        let required = |name: &str| -> std::result::Result<String, DecodeError> {
            match get(name) {
                Some(v) if !v.is_empty() => Ok(v.clone()),
                _ => Err(invalid(format!(
                    "required attribute \"{p}{name}\" is missing or empty"
                ))),
            }
        };
        let mut event = crate::event::blank_event();
        event.set_id(required("id")?);
        event.set_source(required("source")?);
        event.set_type(required("type")?);
        event.set_time(None::<DateTime<Utc>>);
        if let Some(s) = get("subject") {
            event.set_subject(Some(s.clone()));
        }
        if let Some(t) = get("time") {
            let t = DateTime::parse_from_rfc3339(t)
                .map_err(|e| invalid(format!("time {t:?} is not RFC 3339: {e}")))?;
            event.set_time(Some(t.with_timezone(&Utc)));
        }
        if let Some(s) = get("dataschema") {
            let url = url::Url::parse(s)
                .map_err(|e| invalid(format!("dataschema {s:?} is not a URI: {e}")))?;
            event.set_dataschema(Some(url));
        }
        for (name, value) in attributes {
            let Some(ext) = name.strip_prefix(p) else {
                continue;
            };
            if matches!(
                ext,
                "specversion" | "id" | "source" | "type" | "subject" | "time" | "dataschema"
            ) {
                continue;
            }
            if crate::event::validate_extension_name(ext).is_err() {
                return Err(invalid(format!("illegal extension name {ext:?}")));
            }
            event.set_extension(ext, value.clone());
        }
        if !body.is_empty() || content_type.is_some() {
            let ct = content_type.unwrap_or("application/octet-stream");
            let data = if crate::json_format::is_json(ct) {
                let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
                    DecodeError::new(
                        DecodeErrorKind::InvalidJson,
                        format!("data declared {ct} is not JSON: {e}"),
                    )
                })?;
                Data::Json(v)
            } else if ct.starts_with("text/") {
                match String::from_utf8(body.to_vec()) {
                    Ok(s) => Data::String(s),
                    Err(e) => Data::Binary(e.into_bytes()),
                }
            } else {
                Data::Binary(body.to_vec())
            };
            event.set_data(ct.to_owned(), data);
        }
        Ok(event)
    }
}

/// The names of the context attributes a [`BinaryCodec`] writes, with its prefix.
#[derive(Clone, Debug)]
struct ContextNames {
    specversion: String,
    id: String,
    source: String,
    ty: String,
    subject: String,
    time: String,
    dataschema: String,
}

impl ContextNames {
    fn with_prefix(prefix: &str) -> Self {
        let name = |n: &str| format!("{prefix}{n}");
        ContextNames {
            specversion: name("specversion"),
            id: name("id"),
            source: name("source"),
            ty: name("type"),
            subject: name("subject"),
            time: name("time"),
            dataschema: name("dataschema"),
        }
    }
}

impl Default for BinaryCodec {
    /// `ce-` prefix, no attribute budget.
    fn default() -> Self {
        BinaryCodec::new("ce-")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventBuilder;

    fn rich_event() -> Event {
        EventBuilder::new("com.example.t", "/src")
            .subject("sub")
            .dataschema("https://example.com/schema.json")
            .partition_key("k1")
            .correlation_id("c1")
            .causation_id("x1")
            .traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
            .extension("tracestate", "v=1")
            .json(&serde_json::json!({"a": [1, 2, {"b": "c"}]}))
            .unwrap()
            .build()
            .unwrap()
    }

    #[test]
    fn binary_round_trip_keeps_everything() {
        let e = rich_event();
        let codec = BinaryCodec::new("cloudEvents:");
        let (msg, mode) = codec.encode(&e).unwrap();
        assert_eq!(mode, Mode::Binary);
        assert_eq!(codec.decode(&msg).unwrap(), e);
    }

    #[test]
    fn budget_falls_back_to_structured() {
        let e = rich_event();
        let codec = BinaryCodec::new("ce_").max_attributes(10, 1);
        let (msg, mode) = codec.encode(&e).unwrap();
        assert_eq!(mode, Mode::Structured);
        // The content type, then routing hints up to the budget of 9: never specversion.
        assert_eq!(msg.attributes.len(), 9);
        assert_eq!(
            msg.attributes.get("ce_type").map(String::as_str),
            Some(e.ty())
        );
        assert!(!msg.attributes.contains_key("ce_specversion"));
        assert_eq!(codec.decode(&msg).unwrap(), e);
        let forced = BinaryCodec::new("ce_").structured();
        let (msg, _) = forced.encode(&e).unwrap();
        assert!(msg.attributes.contains_key("ce_source"));
        assert_eq!(forced.decode(&msg).unwrap(), e);
    }

    #[test]
    fn text_and_binary_data() {
        let t = EventBuilder::new("t", "/s")
            .data("text/plain", "hello")
            .build()
            .unwrap();
        let b = EventBuilder::new("t", "/s")
            .data("application/octet-stream", vec![0u8, 159, 146, 150])
            .build()
            .unwrap();
        let codec = BinaryCodec::default();
        for e in [t, b] {
            let (m, _) = codec.encode(&e).unwrap();
            assert_eq!(codec.decode(&m).unwrap(), e);
            let s = to_structured_json(&e).unwrap();
            assert_eq!(from_structured_json(&s).unwrap(), e);
        }
    }

    #[test]
    fn foreign_and_broken_messages_are_typed() {
        let codec = BinaryCodec::default();
        let foreign = codec.decode(&RawMessage::new("hello")).unwrap_err();
        assert_eq!(foreign.kind, DecodeErrorKind::NotACloudEvent);
        let broken = codec
            .decode(&RawMessage::new("{\"specversion\":"))
            .unwrap_err();
        assert_eq!(broken.kind, DecodeErrorKind::InvalidJson);
        let plain_json = codec.decode(&RawMessage::new("{\"a\":1}")).unwrap_err();
        assert_eq!(plain_json.kind, DecodeErrorKind::NotACloudEvent);
        let missing = codec
            .decode(&RawMessage::new(
                r#"{"specversion":"1.0","id":"1","type":"t"}"#,
            ))
            .unwrap_err();
        assert_eq!(missing.kind, DecodeErrorKind::InvalidCloudEvent);
        assert!(missing.message.contains("source"));
        let bad_binary = codec
            .decode(
                &RawMessage::new("x")
                    .with_attribute("ce-specversion", "1.0")
                    .with_attribute("ce-id", "1")
                    .with_attribute("ce-source", "/s"),
            )
            .unwrap_err();
        assert_eq!(bad_binary.kind, DecodeErrorKind::InvalidCloudEvent);
        let bad_time = codec
            .decode(
                &RawMessage::new("")
                    .with_attribute("ce-specversion", "1.0")
                    .with_attribute("ce-id", "1")
                    .with_attribute("ce-source", "/s")
                    .with_attribute("ce-type", "t")
                    .with_attribute("ce-time", "noon"),
            )
            .unwrap_err();
        assert_eq!(bad_time.kind, DecodeErrorKind::InvalidCloudEvent);
    }

    /// Arbitrary bytes and attributes never panic the decoder: they decode or give a
    /// typed error (a fixed seed keeps the run repeatable).
    /// Issue 12: a Pub/Sub message written by another client with `Content-Type:
    /// application/json` and upper-case `CE-` names was read as opaque bytes (only the
    /// exact key `content-type` was looked up). Names are case-insensitive (the Pub/Sub
    /// binding, 3.1.3.1).
    #[test]
    fn attribute_names_are_case_insensitive() {
        let mut msg = RawMessage::new(r#"{"n":1}"#)
            .with_attribute("CE-SpecVersion", "1.0")
            .with_attribute("ce-ID", "e-1")
            .with_attribute("Ce-Source", "/other")
            .with_attribute("ce-type", "com.example.t")
            .with_attribute(
                "CE-TraceParent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            )
            .with_attribute("Content-Type", "application/json");
        let e = BinaryCodec::new("ce-").decode(&msg).unwrap();
        assert_eq!(e.id(), "e-1");
        assert_eq!(e.source().as_str(), "/other");
        assert_eq!(e.datacontenttype(), Some("application/json"));
        assert!(matches!(e.data(), Some(Data::Json(_))));
        assert!(crate::EventExt::traceparent(&e).is_some());
        // The AMQP prefix has capitals of its own.
        msg.attributes = msg
            .attributes
            .into_iter()
            .map(|(k, v)| {
                (
                    k.replace("CE-", "cloudEvents:")
                        .replace("ce-", "cloudEvents:")
                        .replace("Ce-", "cloudEvents:"),
                    v,
                )
            })
            .collect();
        let amqp = BinaryCodec::new("cloudEvents:").decode(&msg).unwrap();
        assert_eq!(amqp.id(), "e-1");
    }

    /// Issue 12: structured mode is chosen by the `application/cloudevents` content
    /// type (the bindings), also when the producer copied attributes alongside.
    #[test]
    fn structured_mode_follows_the_content_type() {
        let e = crate::EventBuilder::new("com.example.t", "/s")
            .build()
            .unwrap();
        let msg = RawMessage::new(to_structured_json(&e).unwrap())
            .with_attribute(
                "Content-Type",
                "application/cloudevents+json; charset=utf-8",
            )
            .with_attribute("ce-specversion", "1.0")
            .with_attribute("ce-id", "a-copy");
        assert_eq!(BinaryCodec::new("ce-").decode(&msg).unwrap().id(), e.id());
    }

    /// Issue 12 item 2: more filtered attributes than a message carries is an error,
    /// never a silent drop.
    #[test]
    fn filtered_attributes_that_cannot_fit_fail_the_encode() {
        let mut b = crate::EventBuilder::new("t", "/s");
        let mut keep = Vec::new();
        for n in 0..9 {
            b = b.extension(format!("k{n}"), "v");
            keep.push(format!("ce-k{n}"));
        }
        let e = b.build().unwrap();
        let codec = BinaryCodec::new("ce-").max_attributes(10, 2);
        let err = codec.encode_keeping(&e, &keep).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::InvalidArgument);
        let (msg, _) = codec.encode_keeping(&e, &keep[..7]).unwrap();
        for k in &keep[..7] {
            assert!(msg.attributes.contains_key(k), "{k} kept");
        }
    }

    #[test]
    fn arbitrary_input_never_panics() {
        let mut rng = fastrand::Rng::with_seed(0x5eed);
        let codec = BinaryCodec::default();
        let pieces: &[&[u8]] = &[
            b"{",
            b"}",
            b"\"specversion\"",
            b":",
            b"\"1.0\"",
            b",",
            b"\"id\"",
            b"\"source\"",
            b"\"type\"",
            b"\"time\"",
            b"\"data\"",
            b"null",
            b"[",
            b"]",
            b"\"\\u12",
            b"1e999",
            b"\xff\xfe",
            b"\"data_base64\"",
            b"\"x\"",
            b" ",
        ];
        let names = [
            "ce-specversion",
            "ce-id",
            "ce-source",
            "ce-type",
            "ce-time",
            "ce-dataschema",
            "content-type",
            "ce-Bad",
            "ce-",
            "ce-partitionkey",
        ];
        let values = [
            "1.0",
            "0.3",
            "",
            "x",
            "2026-13-45T99:99:99Z",
            "not a uri",
            "application/json",
            "text/plain",
            "application/cloudevents+json",
            "\u{0}",
        ];
        for _ in 0..20_000 {
            let mut body = Vec::new();
            for _ in 0..rng.usize(0..12) {
                if rng.bool() {
                    body.extend_from_slice(pieces[rng.usize(..pieces.len())]);
                } else {
                    body.push(rng.u8(..));
                }
            }
            let mut msg = RawMessage::new(body.clone());
            for _ in 0..rng.usize(0..6) {
                msg.attributes.insert(
                    names[rng.usize(..names.len())].to_owned(),
                    values[rng.usize(..values.len())].to_owned(),
                );
            }
            let _ = codec.decode(&msg);
            let _ = from_structured_json(&body);
        }
    }

    #[test]
    fn structured_json_is_spec_shaped() {
        let e = rich_event();
        let v: serde_json::Value =
            serde_json::from_slice(&to_structured_json(&e).unwrap()).unwrap();
        assert_eq!(v["specversion"], "1.0");
        assert_eq!(v["partitionkey"], "k1");
        assert_eq!(v["data"]["a"][2]["b"], "c");
        assert!(v["time"].as_str().unwrap().ends_with('Z'));
    }
}
