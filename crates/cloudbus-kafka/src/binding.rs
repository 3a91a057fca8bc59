//! The CloudEvents Kafka protocol binding (cloudevents/spec,
//! `cloudevents/bindings/kafka-protocol-binding.md`): how an event becomes a Kafka
//! record (key, headers, value) in binary or structured content mode, and how a
//! record becomes an event again, or a typed reason why it is not one.
//!
//! It works on [`KafkaRecord`], not on a client library's types, so that it is
//! tested without a broker; the producer and consumers convert at their edge.

use std::collections::BTreeMap;

use cloudbus_driver::codec::{
    self, BATCH_CONTENT_TYPE, BinaryCodec, DecodeError, DecodeErrorKind, RawMessage,
    STRUCTURED_CONTENT_TYPE,
};
use cloudbus_driver::{AttributesWriter, Event, OutgoingMessage, Payload, Result};

/// The prefix of the headers that carry context attributes and extensions in binary
/// mode (section 3.2.3.1: `id` maps to `ce_id`).
pub const HEADER_PREFIX: &str = "ce_";
/// The header that carries `datacontenttype` in binary mode (section 3.2.1) and the
/// event format's media type in structured mode (section 3.3.1).
pub const CONTENT_TYPE_HEADER: &str = "content-type";
/// The `content-type` of a structured-mode record, as section 3.3.1 writes it.
pub const STRUCTURED_JSON_CONTENT_TYPE: &str = "application/cloudevents+json; charset=UTF-8";
/// The prefix of the headers cloudbus adds for its own delivery bookkeeping. They are
/// not CloudEvents attributes: [`decode`] ignores them, [`raw_of`] keeps them.
pub const INTERNAL_HEADER_PREFIX: &str = "cloudbus-";
/// How [`raw_of`] writes a header whose value is null (a Kafka header value may be
/// null; a [`RawMessage`] attribute is always a string).
pub const NULL_HEADER_TEXT: &str = "<null>";
/// How [`raw_of`] writes a header whose value is not UTF-8: this prefix, the bytes in
/// lowercase hex, then `>` (`[0xff, 0x00]` becomes `<hex:ff00>`).
pub const NON_UTF8_HEADER_PREFIX: &str = "<hex:";

/// The media-type prefix that marks structured mode (section 3), matched
/// case-insensitively.
const CLOUDEVENTS_MEDIA_TYPE_PREFIX: &str = "application/cloudevents";
/// The header that says a record is in binary mode, already lowercase.
const SPECVERSION_HEADER: &str = "ce_specversion";

/// One Kafka header: its name and its value, which may be null.
pub type Header = (String, Option<Vec<u8>>);

/// A Kafka record as the binding sees it, independent of the client library.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KafkaRecord {
    /// The record key; `None` is a null key (the partitioner then spreads records).
    pub key: Option<Vec<u8>>,
    /// The headers in record order; a value may be null (`None`). Names may repeat.
    pub headers: Vec<Header>,
    /// The record value; `None` is a null value (in binary mode: an event without
    /// data, section 3.2.2).
    pub payload: Option<Vec<u8>>,
}

/// Binary (ce_ headers, the default) or structured (application/cloudevents+json) content mode.
///
/// The binding supports both (section 1.3) and no batch mode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ContentMode {
    /// Context attributes and extensions in `ce_` headers, `datacontenttype` in
    /// `content-type`, the data as the value (section 3.2).
    #[default]
    Binary,
    /// The whole event as CloudEvents JSON in the value, `content-type:
    /// application/cloudevents+json; charset=UTF-8` (section 3.3).
    Structured,
}

/// Encodes an outgoing message as a Kafka record.
///
/// **Key (section 3.1).** The key is [`OutgoingMessage::ordering_key`]: the explicit
/// ordering key of the publish options (the "user provided record key", which the
/// spec says MUST map to the record key), else the event's `partitionkey` extension
/// (the spec's opt-in "Key Mapper", which cloudbus always uses). No ordering key, no
/// key. The mapping never modifies the event: a `partitionkey` stays in the event
/// (as the `ce_partitionkey` header in binary mode, in the JSON in structured mode),
/// as section 3.1 requires, and an explicit key is never added to it as an
/// attribute.
///
/// **Binary mode (section 3.2).** Every context attribute and extension except
/// `datacontenttype` becomes a `ce_` header with a UTF-8 value (3.2.3);
/// `datacontenttype` goes to `content-type` (3.2.1); the value is the data bytes
/// as-is (3.2.2), and an event without data is a record without value (a tombstone in
/// a compacted topic, as 3.2.2 warns).
///
/// **Structured mode (section 3.3).** The value is the event as CloudEvents JSON and
/// the only header is `content-type: application/cloudevents+json; charset=UTF-8`
/// (3.3.1; the `ce_` headers that 3.3.3 allows are not written).
///
/// A [`Payload::Raw`] message (a foreign or malformed message that tests and bridges
/// inject) is sent as it is: its attributes as UTF-8 headers, its body as the value
/// (an empty body as no value, which is what [`raw_of`] makes of a record without
/// one), the ordering key as the key; `mode` does not apply to it.
pub fn encode(message: &OutgoingMessage, mode: ContentMode) -> Result<KafkaRecord> {
    let key = message.ordering_key.as_ref().map(|k| k.as_bytes().to_vec());
    match &message.payload {
        Payload::Event(event) => {
            let (headers, payload) = match mode {
                ContentMode::Binary => encode_binary(event)?,
                ContentMode::Structured => (
                    vec![(
                        CONTENT_TYPE_HEADER.to_owned(),
                        Some(STRUCTURED_JSON_CONTENT_TYPE.as_bytes().to_vec()),
                    )],
                    Some(codec::to_structured_json(event)?),
                ),
            };
            Ok(KafkaRecord {
                key,
                headers,
                payload,
            })
        }
        Payload::Raw(raw) => Ok(KafkaRecord {
            key,
            headers: raw
                .attributes
                .iter()
                .map(|(name, value)| (name.clone(), Some(value.as_bytes().to_vec())))
                .collect(),
            payload: (!raw.body.is_empty()).then(|| raw.body.clone()),
        }),
    }
}

/// The codec of binary mode: `ce_` attributes, `datacontenttype` in `content-type`,
/// no attribute budget (Kafka headers are unlimited), so it never falls back to
/// structured mode.
fn binary_codec() -> BinaryCodec {
    BinaryCodec::new(HEADER_PREFIX).content_type_attribute(CONTENT_TYPE_HEADER)
}

/// Headers and value of an event in binary mode (section 3.2).
fn encode_binary(event: &Event) -> Result<(Vec<Header>, Option<Vec<u8>>)> {
    // Without an attribute budget the codec always answers in binary mode.
    let (raw, _mode) = binary_codec().encode(event)?;
    let mut headers = Vec::with_capacity(raw.attributes.len());
    // `ce_specversion` first: it is what tells a reader the record is binary mode.
    let mut attributes = raw.attributes;
    if let Some(spec) = attributes.remove(SPECVERSION_HEADER) {
        headers.push((SPECVERSION_HEADER.to_owned(), Some(spec.into_bytes())));
    }
    headers.extend(
        attributes
            .into_iter()
            .map(|(name, value)| (name, Some(value.into_bytes()))),
    );
    // Section 3.2.2: no data, no value (not an empty one).
    let payload = event.data().is_some().then_some(raw.body);
    Ok((headers, payload))
}

/// Decodes a received record into an event; on failure, the record as a
/// [`RawMessage`] (see [`raw_of`]) and why, so that it can be dead-lettered.
///
/// **Header names** are compared case-insensitively (`Content-Type`, `CE_ID`); the
/// spec does not say what a repeated header name means, so the last one in record
/// order wins (as Kafka's `Headers.lastHeader` reads it).
///
/// **Mode (section 3).** A `content-type` header whose value starts with
/// `application/cloudevents` (case-insensitively, parameters allowed) is
/// structured mode: `application/cloudevents+json` is decoded from the value; a
/// record without value is [`DecodeErrorKind::InvalidCloudEvent`] (3.3.2: a
/// structured record always has one); `application/cloudevents-batch+json` is
/// InvalidCloudEvent (1.3: the Kafka binding has no batch mode), and so is any other
/// event format (section 3 lets a receiver pass such a record on as it is, which the
/// dead-letter path does with the [`RawMessage`]). Otherwise a `ce_specversion`
/// header is binary mode (3.2).
///
/// **Binary mode.** The `ce_` headers are the attributes and extensions, `content-type`
/// is `datacontenttype` (3.2.1), the value is the data, and a record without value is
/// an event without data (3.2.2), which keeps its `datacontenttype` if it has one. A
/// header value must be a UTF-8 string (3.2.3): a `ce_` or `content-type` header with
/// a null or non-UTF-8 value is InvalidCloudEvent naming the header. `ce_` headers
/// without `ce_specversion` are InvalidCloudEvent too. Other headers (including
/// cloudbus's own, [`INTERNAL_HEADER_PREFIX`]) are not attributes and are ignored.
///
/// **Neither mode.** A record with no `ce_` header and no CloudEvents `content-type`
/// is read as structured CloudEvents JSON when its value is a JSON object with a
/// `specversion` (section 1.3: producers on Kafka 0.10 and older write structured
/// mode without headers; 3.3.1 makes the `content-type` optional); anything else is
/// [`DecodeErrorKind::NotACloudEvent`], a foreign record.
///
/// **Key.** The spec maps no record key back to an attribute (3.1 defines only the
/// sender's side and forbids adding attributes from out-of-band keys), so the key is
/// not read: an event's `partitionkey` comes from its `ce_partitionkey` header or its
/// JSON, never from the key.
pub fn decode(record: &KafkaRecord) -> std::result::Result<Event, (RawMessage, DecodeError)> {
    decode_event(record).map_err(|error| (raw_of(record), error))
}

/// A header as it takes part in decoding: its name as written (for messages) and its
/// value.
struct HeaderValue<'a> {
    name: &'a str,
    value: Option<&'a [u8]>,
}

impl<'a> HeaderValue<'a> {
    /// The value as a UTF-8 string, or why it is not one (section 3.2.3).
    fn text(&self) -> std::result::Result<&'a str, DecodeError> {
        let Some(bytes) = self.value else {
            return Err(invalid(format!(
                "header {:?} has a null value; the Kafka binding (3.2.3) carries attributes as UTF-8 strings",
                self.name
            )));
        };
        std::str::from_utf8(bytes).map_err(|_| {
            invalid(format!(
                "header {:?} is not UTF-8 ({} bytes); the Kafka binding (3.2.3) carries attributes as UTF-8 strings",
                self.name,
                bytes.len()
            ))
        })
    }
}

fn decode_event(record: &KafkaRecord) -> std::result::Result<Event, DecodeError> {
    // Lowercase names; a later header of the same name replaces an earlier one. A map,
    // not a list searched per header: a record can carry a great many headers.
    let mut headers: BTreeMap<String, HeaderValue<'_>> = BTreeMap::new();
    for (name, value) in &record.headers {
        headers.insert(
            name.to_ascii_lowercase(),
            HeaderValue {
                name,
                value: value.as_deref(),
            },
        );
    }
    let content_type = headers.get(CONTENT_TYPE_HEADER);
    // A null or non-UTF-8 content-type cannot name an event format: not structured.
    if let Some(ct) = content_type.and_then(|h| h.text().ok())
        && is_cloudevents_media_type(ct)
    {
        return decode_structured(ct, record.payload.as_deref());
    }
    if !headers.contains_key(SPECVERSION_HEADER) {
        if let Some(header) = headers
            .iter()
            .find(|(lower, _)| lower.starts_with(HEADER_PREFIX))
            .map(|(_, h)| h)
        {
            return Err(invalid(format!(
                "the record has CloudEvents header {:?} but no \"ce_specversion\"",
                header.name
            )));
        }
        return decode_unlabelled(record.payload.as_deref().unwrap_or_default());
    }

    // Binary mode: the attributes for the codec (names lowercase), checked first.
    let mut attributes = BTreeMap::new();
    for (lower, header) in &headers {
        if lower.starts_with(HEADER_PREFIX) || lower == CONTENT_TYPE_HEADER {
            attributes.insert(lower.clone(), header.text()?.to_owned());
        }
    }
    match &record.payload {
        Some(body) => binary_codec().decode(&RawMessage {
            body: body.clone(),
            attributes,
        }),
        None => {
            // Section 3.2.2: no value is no data. The codec would read a content
            // type with an empty body as empty data, so it decodes without one and
            // the content type is set afterwards.
            let datacontenttype = attributes.remove(CONTENT_TYPE_HEADER);
            let mut event = binary_codec().decode(&RawMessage {
                body: Vec::new(),
                attributes,
            })?;
            if datacontenttype.is_some() {
                event.set_datacontenttype(datacontenttype);
            }
            Ok(event)
        }
    }
}

/// Whether a `content-type` value names a CloudEvents media type (section 3:
/// prefixed with `application/cloudevents`, matched case-insensitively).
fn is_cloudevents_media_type(content_type: &str) -> bool {
    content_type
        .trim_start()
        .get(..CLOUDEVENTS_MEDIA_TYPE_PREFIX.len())
        .is_some_and(|prefix| prefix.eq_ignore_ascii_case(CLOUDEVENTS_MEDIA_TYPE_PREFIX))
}

/// Structured mode (section 3.3): the event format named by `content_type`.
fn decode_structured(
    content_type: &str,
    payload: Option<&[u8]>,
) -> std::result::Result<Event, DecodeError> {
    let media_type = content_type.split(';').next().unwrap_or_default().trim();
    if media_type.eq_ignore_ascii_case(STRUCTURED_CONTENT_TYPE) {
        let Some(body) = payload.filter(|b| !b.is_empty()) else {
            return Err(invalid(
                "the content-type says structured mode but the record has no value (3.3.2: a structured record always carries the event)",
            ));
        };
        return codec::from_structured_json(body).map_err(|e| match e.kind {
            // The header said it is a CloudEvent: one that is not breaks the spec.
            DecodeErrorKind::NotACloudEvent => invalid(format!(
                "the content-type says structured CloudEvents JSON, but {}",
                e.message
            )),
            _ => e,
        });
    }
    if media_type.eq_ignore_ascii_case(BATCH_CONTENT_TYPE) {
        return Err(invalid(format!(
            "content-type {media_type:?} is batch mode, which the Kafka binding does not have (1.3)"
        )));
    }
    Err(invalid(format!(
        "unsupported event format {media_type:?}: only {STRUCTURED_CONTENT_TYPE} is read (1.4)"
    )))
}

/// A record without CloudEvents headers: structured JSON if the value is a CloudEvent
/// (producers without headers, section 1.3), else foreign.
fn decode_unlabelled(body: &[u8]) -> std::result::Result<Event, DecodeError> {
    codec::from_unlabelled_body(body).map_err(|e| match e.kind {
        // Bytes that merely start like JSON: nothing says it is a CloudEvent.
        DecodeErrorKind::InvalidJson | DecodeErrorKind::NotACloudEvent => DecodeError {
            kind: DecodeErrorKind::NotACloudEvent,
            message: format!(
                "no \"content-type: application/cloudevents...\" or \"ce_specversion\" header, and the value ({} bytes) is not structured CloudEvents JSON",
                body.len()
            ),
        },
        DecodeErrorKind::InvalidCloudEvent => e,
    })
}

fn invalid(message: impl Into<String>) -> DecodeError {
    DecodeError {
        kind: DecodeErrorKind::InvalidCloudEvent,
        message: message.into(),
    }
}

/// A record as a [`RawMessage`], for dead-lettering: the value as the body (empty
/// when null) and every header as an attribute under its name as written. A UTF-8
/// value is kept as it is; a null value becomes [`NULL_HEADER_TEXT`] and a non-UTF-8
/// one `<hex:…>` ([`NON_UTF8_HEADER_PREFIX`]), so that nothing is dropped silently.
/// A repeated header name keeps its last value, as in [`decode`]. The key is not
/// part of a RawMessage: keep it beside it.
pub fn raw_of(record: &KafkaRecord) -> RawMessage {
    let mut raw = RawMessage::new(record.payload.clone().unwrap_or_default());
    for (name, value) in &record.headers {
        raw.attributes
            .insert(name.clone(), header_value_text(value.as_deref()));
    }
    raw
}

/// A header value as attribute text (see [`raw_of`]).
fn header_value_text(value: Option<&[u8]>) -> String {
    match value {
        None => NULL_HEADER_TEXT.to_owned(),
        Some(bytes) => match std::str::from_utf8(bytes) {
            Ok(text) => text.to_owned(),
            Err(_) => {
                use std::fmt::Write as _;
                let mut text =
                    String::with_capacity(NON_UTF8_HEADER_PREFIX.len() + bytes.len() * 2 + 1);
                text.push_str(NON_UTF8_HEADER_PREFIX);
                for byte in bytes {
                    // Writing to a String cannot fail.
                    let _ = write!(text, "{byte:02x}");
                }
                text.push('>');
                text
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cloudbus_driver::{AttributesReader, Data, EventBuilder, EventExt, PublishOptions};
    use std::sync::Arc;

    fn header(name: &str, value: &str) -> (String, Option<Vec<u8>>) {
        (name.to_owned(), Some(value.as_bytes().to_vec()))
    }

    fn header_value<'a>(record: &'a KafkaRecord, name: &str) -> Option<&'a [u8]> {
        record
            .headers
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_deref())
    }

    fn message(event: &Event) -> OutgoingMessage {
        OutgoingMessage::new(Arc::new(event.clone()), PublishOptions::default())
    }

    fn rich_event() -> Event {
        EventBuilder::new("com.example.order.created", "/orders")
            .id("e-1")
            .subject("order-42")
            .dataschema("https://example.com/order.json")
            .partition_key("customer-7")
            .correlation_id("c-1")
            .traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")
            .json(&serde_json::json!({"order_id": 42, "lines": [1, 2]}))
            .unwrap()
            .build()
            .unwrap()
    }

    fn binary_headers(specversion: bool) -> Vec<(String, Option<Vec<u8>>)> {
        let mut headers = vec![
            header("ce_id", "1"),
            header("ce_source", "/s"),
            header("ce_type", "t"),
        ];
        if specversion {
            headers.push(header("ce_specversion", "1.0"));
        }
        headers
    }

    #[test]
    fn binary_round_trip_with_json_data_extensions_and_key() {
        let event = rich_event();
        let record = encode(&message(&event), ContentMode::Binary).unwrap();
        assert_eq!(record.key.as_deref(), Some(b"customer-7".as_slice()));
        assert_eq!(record.headers[0], header("ce_specversion", "1.0"));
        assert_eq!(header_value(&record, "ce_id"), Some(b"e-1".as_slice()));
        assert_eq!(
            header_value(&record, "ce_type"),
            Some(b"com.example.order.created".as_slice())
        );
        // 3.1: the key mapper does not modify the event.
        assert_eq!(
            header_value(&record, "ce_partitionkey"),
            Some(b"customer-7".as_slice())
        );
        // 3.2.1: datacontenttype is content-type, not a ce_ header.
        assert_eq!(
            header_value(&record, "content-type"),
            Some(b"application/json".as_slice())
        );
        assert!(header_value(&record, "ce_datacontenttype").is_none());
        let data: serde_json::Value =
            serde_json::from_slice(record.payload.as_deref().unwrap()).unwrap();
        assert_eq!(data, serde_json::json!({"order_id": 42, "lines": [1, 2]}));
        assert_eq!(decode(&record).unwrap(), event);
    }

    #[test]
    fn structured_round_trip() {
        let event = rich_event();
        let record = encode(&message(&event), ContentMode::Structured).unwrap();
        assert_eq!(record.key.as_deref(), Some(b"customer-7".as_slice()));
        assert_eq!(
            record.headers,
            vec![header(
                "content-type",
                "application/cloudevents+json; charset=UTF-8"
            )]
        );
        let json: serde_json::Value =
            serde_json::from_slice(record.payload.as_deref().unwrap()).unwrap();
        assert_eq!(json["partitionkey"], "customer-7");
        assert_eq!(json["id"], "e-1");
        assert_eq!(decode(&record).unwrap(), event);
    }

    #[test]
    fn binary_and_text_data_travel_as_is() {
        let bytes = vec![0u8, 159, 146, 150, 255];
        let binary = EventBuilder::new("t", "/s")
            .data("application/octet-stream", bytes.clone())
            .build()
            .unwrap();
        let record = encode(&message(&binary), ContentMode::Binary).unwrap();
        assert_eq!(record.payload.as_deref(), Some(bytes.as_slice()));
        assert_eq!(record.key, None);
        assert_eq!(decode(&record).unwrap(), binary);
        let structured = encode(&message(&binary), ContentMode::Structured).unwrap();
        assert_eq!(decode(&structured).unwrap(), binary);

        let text = EventBuilder::new("t", "/s")
            .data("text/plain", "héllo")
            .build()
            .unwrap();
        let record = encode(&message(&text), ContentMode::Binary).unwrap();
        assert_eq!(record.payload.as_deref(), Some("héllo".as_bytes()));
        assert_eq!(decode(&record).unwrap(), text);
    }

    #[test]
    fn no_data_is_no_value_and_decodes_to_no_data() {
        let event = EventBuilder::new("t", "/s").build().unwrap();
        let record = encode(&message(&event), ContentMode::Binary).unwrap();
        assert_eq!(record.payload, None);
        assert!(header_value(&record, "content-type").is_none());
        let back = decode(&record).unwrap();
        assert!(back.data().is_none());
        assert_eq!(back, event);
        // Structured mode still has a value (3.3.2).
        let record = encode(&message(&event), ContentMode::Structured).unwrap();
        assert!(record.payload.is_some());
        assert_eq!(decode(&record).unwrap(), event);

        // A datacontenttype without data survives, without becoming empty data.
        let mut typed = EventBuilder::new("t", "/s").build().unwrap();
        typed.set_datacontenttype(Some("application/json"));
        let record = encode(&message(&typed), ContentMode::Binary).unwrap();
        assert_eq!(record.payload, None);
        let back = decode(&record).unwrap();
        assert!(back.data().is_none());
        assert_eq!(back.datacontenttype(), Some("application/json"));
        assert_eq!(back, typed);

        // A foreign binary record without value: no data, not empty data.
        let mut headers = binary_headers(true);
        headers.push(header("content-type", "application/octet-stream"));
        let record = KafkaRecord {
            key: None,
            headers,
            payload: None,
        };
        let back = decode(&record).unwrap();
        assert!(back.data().is_none());
        assert_eq!(back.datacontenttype(), Some("application/octet-stream"));
    }

    #[test]
    fn explicit_ordering_key_is_the_key_and_not_an_attribute() {
        let event = EventBuilder::new("t", "/s").build().unwrap();
        let message = OutgoingMessage::new(Arc::new(event.clone()), PublishOptions::ordered("k-9"));
        for mode in [ContentMode::Binary, ContentMode::Structured] {
            let record = encode(&message, mode).unwrap();
            assert_eq!(record.key.as_deref(), Some(b"k-9".as_slice()));
            assert!(header_value(&record, "ce_partitionkey").is_none());
            let back = decode(&record).unwrap();
            // The key is not mapped back to an attribute.
            assert_eq!(back.partition_key(), None);
            assert_eq!(back, event);
        }
    }

    #[test]
    fn structured_content_type_is_matched_case_insensitively_with_parameters() {
        let event = rich_event();
        let body = codec::to_structured_json(&event).unwrap();
        for (name, value) in [
            ("content-type", "application/cloudevents+json"),
            ("Content-Type", "Application/CloudEvents+JSON;charset=utf-8"),
            (
                "CONTENT-TYPE",
                "  application/cloudevents+json ; charset=UTF-8",
            ),
        ] {
            let record = KafkaRecord {
                key: None,
                // ce_ headers beside a structured content type do not matter (3.3.3).
                headers: vec![header(name, value), header("ce_id", "a-copy")],
                payload: Some(body.clone()),
            };
            assert_eq!(decode(&record).unwrap(), event, "{name}: {value}");
        }
    }

    #[test]
    fn binary_header_names_are_case_insensitive_and_the_last_one_wins() {
        let record = KafkaRecord {
            key: None,
            headers: vec![
                header("CE_SpecVersion", "1.0"),
                header("CE_ID", "1"),
                header("Ce_Source", "/s"),
                header("ce_type", "t"),
                header("ce_subject", "first"),
                header("CE_SUBJECT", "last"),
                header("Content-Type", "application/json"),
            ],
            payload: Some(br#"{"n":1}"#.to_vec()),
        };
        let event = decode(&record).unwrap();
        assert_eq!(event.id(), "1");
        assert_eq!(event.subject(), Some("last"));
        assert_eq!(event.datacontenttype(), Some("application/json"));
        assert_eq!(event.data(), Some(&Data::Json(serde_json::json!({"n": 1}))));
    }

    #[test]
    fn other_headers_are_not_attributes() {
        let event = rich_event();
        let mut record = encode(&message(&event), ContentMode::Binary).unwrap();
        record.headers.push(header("cloudbus-attempt", "3"));
        record.headers.push(header("traceparent", "x"));
        record.headers.push(("cloudbus-null".to_owned(), None));
        assert_eq!(decode(&record).unwrap(), event);
        let raw = raw_of(&record);
        assert_eq!(raw.attributes["cloudbus-attempt"], "3");
        assert_eq!(raw.attributes["cloudbus-null"], NULL_HEADER_TEXT);
    }

    #[test]
    fn null_ce_header_is_invalid_and_kept_in_the_raw_message() {
        let mut headers = binary_headers(true);
        headers.push(("ce_subject".to_owned(), None));
        let record = KafkaRecord {
            key: None,
            headers,
            payload: Some(b"x".to_vec()),
        };
        let (raw, error) = decode(&record).unwrap_err();
        assert_eq!(error.kind, DecodeErrorKind::InvalidCloudEvent);
        assert!(error.message.contains("ce_subject"), "{error}");
        assert_eq!(raw.attributes["ce_subject"], "<null>");
        assert_eq!(raw.attributes["ce_id"], "1");
        assert_eq!(raw.body, b"x");
    }

    #[test]
    fn non_utf8_ce_header_is_invalid_and_kept_as_hex() {
        let mut headers = binary_headers(true);
        headers.push(("ce_subject".to_owned(), Some(vec![0xff, 0x00, 0x41])));
        let record = KafkaRecord {
            key: None,
            headers,
            payload: None,
        };
        let (raw, error) = decode(&record).unwrap_err();
        assert_eq!(error.kind, DecodeErrorKind::InvalidCloudEvent);
        assert!(error.message.contains("ce_subject"), "{error}");
        assert_eq!(raw.attributes["ce_subject"], "<hex:ff0041>");
        assert!(raw.body.is_empty());

        // A non-UTF-8 content-type in binary mode too.
        let mut headers = binary_headers(true);
        headers.push(("content-type".to_owned(), Some(vec![0xc3])));
        let record = KafkaRecord {
            key: None,
            headers,
            payload: Some(b"x".to_vec()),
        };
        let (_, error) = decode(&record).unwrap_err();
        assert_eq!(error.kind, DecodeErrorKind::InvalidCloudEvent);
        assert!(error.message.contains("content-type"), "{error}");
    }

    #[test]
    fn structured_without_value_is_invalid() {
        for payload in [None, Some(Vec::new())] {
            let record = KafkaRecord {
                key: Some(b"k".to_vec()),
                headers: vec![header("content-type", STRUCTURED_JSON_CONTENT_TYPE)],
                payload,
            };
            let (raw, error) = decode(&record).unwrap_err();
            assert_eq!(error.kind, DecodeErrorKind::InvalidCloudEvent);
            assert!(raw.body.is_empty());
            assert_eq!(raw.attributes["content-type"], STRUCTURED_JSON_CONTENT_TYPE);
        }
    }

    #[test]
    fn structured_json_that_is_not_a_cloudevent_is_invalid() {
        let record = KafkaRecord {
            key: None,
            headers: vec![header("content-type", "application/cloudevents+json")],
            payload: Some(br#"{"a":1}"#.to_vec()),
        };
        let (_, error) = decode(&record).unwrap_err();
        assert_eq!(error.kind, DecodeErrorKind::InvalidCloudEvent);
        let record = KafkaRecord {
            payload: Some(b"{broken".to_vec()),
            ..record
        };
        assert_eq!(
            decode(&record).unwrap_err().1.kind,
            DecodeErrorKind::InvalidJson
        );
    }

    #[test]
    fn batch_and_other_formats_are_invalid() {
        let event = rich_event();
        let body = codec::to_structured_json(&event).unwrap();
        let batch = KafkaRecord {
            key: None,
            headers: vec![header(
                "content-type",
                "application/cloudevents-batch+json; charset=UTF-8",
            )],
            payload: Some(format!("[{}]", String::from_utf8(body.clone()).unwrap()).into_bytes()),
        };
        let (raw, error) = decode(&batch).unwrap_err();
        assert_eq!(error.kind, DecodeErrorKind::InvalidCloudEvent);
        assert!(error.message.contains("batch"), "{error}");
        assert_eq!(raw.body, batch.payload.clone().unwrap());

        let avro = KafkaRecord {
            key: None,
            headers: vec![header("content-type", "application/cloudevents+avro")],
            payload: Some(b"\x00\x01".to_vec()),
        };
        let (_, error) = decode(&avro).unwrap_err();
        assert_eq!(error.kind, DecodeErrorKind::InvalidCloudEvent);
        assert!(error.message.contains("unsupported"), "{error}");
    }

    #[test]
    fn foreign_records_are_not_cloudevents() {
        for payload in [&b"hello"[..], &br#"{"a":1}"#[..], &b"{broken"[..], &b""[..]] {
            let record = KafkaRecord {
                key: Some(b"k".to_vec()),
                headers: Vec::new(),
                payload: Some(payload.to_vec()),
            };
            let (raw, error) = decode(&record).unwrap_err();
            assert_eq!(error.kind, DecodeErrorKind::NotACloudEvent, "{payload:?}");
            assert_eq!(raw.body, payload);
            assert!(raw.attributes.is_empty());
        }
        let tombstone = KafkaRecord {
            key: Some(b"k".to_vec()),
            headers: Vec::new(),
            payload: None,
        };
        assert_eq!(
            decode(&tombstone).unwrap_err().1.kind,
            DecodeErrorKind::NotACloudEvent
        );
    }

    #[test]
    fn headers_without_ce_specversion() {
        // Headers, none of them CloudEvents ones: foreign.
        let record = KafkaRecord {
            key: None,
            headers: vec![
                header("content-type", "text/plain"),
                header(
                    "traceparent",
                    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                ),
            ],
            payload: Some(b"hi".to_vec()),
        };
        let (raw, error) = decode(&record).unwrap_err();
        assert_eq!(error.kind, DecodeErrorKind::NotACloudEvent);
        assert_eq!(raw.attributes["content-type"], "text/plain");
        // CloudEvents headers without ce_specversion: a broken CloudEvent.
        let record = KafkaRecord {
            key: None,
            headers: binary_headers(false),
            payload: Some(b"hi".to_vec()),
        };
        let (_, error) = decode(&record).unwrap_err();
        assert_eq!(error.kind, DecodeErrorKind::InvalidCloudEvent);
        assert!(error.message.contains("ce_specversion"), "{error}");
    }

    #[test]
    fn binary_without_a_required_attribute_is_invalid() {
        let record = KafkaRecord {
            key: None,
            headers: vec![
                header("ce_specversion", "1.0"),
                header("ce_source", "/s"),
                header("ce_type", "t"),
            ],
            payload: Some(b"x".to_vec()),
        };
        let (_, error) = decode(&record).unwrap_err();
        assert_eq!(error.kind, DecodeErrorKind::InvalidCloudEvent);
        assert!(error.message.contains("ce_id"), "{error}");
        let record = KafkaRecord {
            key: None,
            headers: vec![
                header("ce_specversion", "0.3"),
                header("ce_id", "1"),
                header("ce_source", "/s"),
                header("ce_type", "t"),
            ],
            payload: None,
        };
        assert_eq!(
            decode(&record).unwrap_err().1.kind,
            DecodeErrorKind::InvalidCloudEvent
        );
    }

    #[test]
    fn unlabelled_structured_json_is_read() {
        // Section 1.3: producers on Kafka 0.10 write structured mode without headers.
        let event = rich_event();
        let record = KafkaRecord {
            key: None,
            headers: Vec::new(),
            payload: Some(codec::to_structured_json(&event).unwrap()),
        };
        assert_eq!(decode(&record).unwrap(), event);
    }

    #[test]
    fn raw_payload_is_sent_as_it_is() {
        let raw = RawMessage::new("not an event")
            .with_attribute("x-origin", "bridge")
            .with_attribute("ce_id", "1");
        let mut message = OutgoingMessage::raw(raw.clone());
        message.ordering_key = Some("k".to_owned());
        let record = encode(&message, ContentMode::Structured).unwrap();
        assert_eq!(record.key.as_deref(), Some(b"k".as_slice()));
        assert_eq!(record.payload.as_deref(), Some(b"not an event".as_slice()));
        assert_eq!(
            header_value(&record, "x-origin"),
            Some(b"bridge".as_slice())
        );
        assert_eq!(raw_of(&record), raw);
        // An empty body is no value, which raw_of reads back as an empty body.
        let empty = encode(
            &OutgoingMessage::raw(RawMessage::new("")),
            ContentMode::Binary,
        )
        .unwrap();
        assert_eq!(empty.payload, None);
        assert_eq!(empty.key, None);
        assert_eq!(raw_of(&empty), RawMessage::new(""));
    }

    /// The bytes of cloudevents/sdk-python's `cloudevents.kafka.to_binary` for
    /// `CloudEvent({"type": "com.example.order.created", "source": "/orders",
    /// "datacontenttype": "application/json", "partitionkey": "customer-7"},
    /// {"order_id": 42, "item": "book"})`: `content-type` from datacontenttype, then
    /// `ce_` headers in attribute order (specversion, id and time added by the
    /// constructor; partitionkey left out of the headers), the key from
    /// `partitionkey`, the data as `json.dumps`.
    #[test]
    fn decodes_python_sdk_binary_record() {
        let record = KafkaRecord {
            key: Some(b"customer-7".to_vec()),
            headers: vec![
                header("content-type", "application/json"),
                header("ce_type", "com.example.order.created"),
                header("ce_source", "/orders"),
                header("ce_specversion", "1.0"),
                header("ce_id", "5f1e2b8c-4d0a-4c1e-9b7a-2f6d8e3c1a90"),
                header("ce_time", "2024-05-01T12:00:00.123456+00:00"),
            ],
            payload: Some(br#"{"order_id": 42, "item": "book"}"#.to_vec()),
        };
        let event = decode(&record).unwrap();
        assert_eq!(event.id(), "5f1e2b8c-4d0a-4c1e-9b7a-2f6d8e3c1a90");
        assert_eq!(event.ty(), "com.example.order.created");
        assert_eq!(event.source().as_str(), "/orders");
        assert_eq!(
            event.time().map(|t| t.to_rfc3339()),
            Some("2024-05-01T12:00:00.123456+00:00".to_owned())
        );
        assert_eq!(event.datacontenttype(), Some("application/json"));
        assert_eq!(
            event.data(),
            Some(&Data::Json(
                serde_json::json!({"order_id": 42, "item": "book"})
            ))
        );
        // The Python SDK drops partitionkey from the headers and sdk-python's
        // from_binary restores it from the key; the spec maps no key back (3.1).
        assert_eq!(event.partition_key(), None);
    }

    /// The bytes of sdk-python's `cloudevents.kafka.to_structured` for the same event:
    /// the envelope as `json.dumps` without `datacontenttype`, which it moves to the
    /// `content-type` header (so the header is `application/json`, not an event
    /// format, contrary to 3.3.1), and the key from `partitionkey`.
    #[test]
    fn decodes_python_sdk_structured_record() {
        let value = concat!(
            r#"{"type": "com.example.order.created", "source": "/orders", "#,
            r#""partitionkey": "customer-7", "specversion": "1.0", "#,
            r#""id": "5f1e2b8c-4d0a-4c1e-9b7a-2f6d8e3c1a90", "#,
            r#""time": "2024-05-01T12:00:00.123456+00:00", "#,
            r#""data": {"order_id": 42, "item": "book"}}"#
        );
        let record = KafkaRecord {
            key: Some(b"customer-7".to_vec()),
            headers: vec![header("content-type", "application/json")],
            payload: Some(value.as_bytes().to_vec()),
        };
        let event = decode(&record).unwrap();
        assert_eq!(event.id(), "5f1e2b8c-4d0a-4c1e-9b7a-2f6d8e3c1a90");
        assert_eq!(event.partition_key(), Some("customer-7"));
        assert_eq!(
            event.data(),
            Some(&Data::Json(
                serde_json::json!({"order_id": 42, "item": "book"})
            ))
        );
        // The datacontenttype that sdk-python put in the header is not in the event.
        assert_eq!(event.datacontenttype(), None);

        // Without a datacontenttype sdk-python writes no headers at all.
        let record = KafkaRecord {
            headers: Vec::new(),
            ..record
        };
        assert_eq!(
            decode(&record).unwrap().id(),
            "5f1e2b8c-4d0a-4c1e-9b7a-2f6d8e3c1a90"
        );
    }
}
