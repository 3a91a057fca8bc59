//! How events travel on SQS: the binary-mode codec (`ce-` message attributes),
//! structured mode when they do not fit, FIFO group and deduplication ids, and
//! decoding what arrives, SNS and EventBridge envelopes included.

use std::collections::BTreeMap;

use aws_sdk_sqs::types::{MessageAttributeValue, MessageSystemAttributeName};
use chrono::{DateTime, Utc};
use cloudbus_driver::AttributesReader as _;
use cloudbus_driver::codec::RawMessage;
use cloudbus_driver::{BinaryCodec, OutgoingMessage, Payload, Result};

use super::error::build_error;

/// The attribute prefix of binary-mode CloudEvents.
pub const ATTRIBUTE_PREFIX: &str = "ce-";
/// The attribute that carries `datacontenttype` in binary mode.
pub const CONTENT_TYPE_ATTRIBUTE: &str = "content-type";
/// SQS allows 10 message attributes.
pub const MAX_ATTRIBUTES: usize = 10;
/// Attribute slots kept free for the dead-letter reason and description.
pub(crate) const RESERVED_ATTRIBUTES: usize = 2;
/// The message attributes that carry the dead-letter reason and description.
pub(crate) const DL_REASON: &str = "cloudbus-dl-reason";
pub(crate) const DL_DESCRIPTION: &str = "cloudbus-dl-description";

pub(crate) fn codec() -> BinaryCodec {
    BinaryCodec::new(ATTRIBUTE_PREFIX)
        .content_type_attribute(CONTENT_TYPE_ATTRIBUTE)
        .max_attributes(MAX_ATTRIBUTES, RESERVED_ATTRIBUTES)
}

pub(crate) fn string_attribute(v: &str) -> Result<MessageAttributeValue> {
    MessageAttributeValue::builder()
        .data_type("String")
        .string_value(v)
        .build()
        .map_err(build_error)
}

/// A received message kept for dead-lettering and redrive.
#[derive(Clone, Debug)]
pub(crate) struct Stored {
    pub(crate) body: String,
    pub(crate) attributes: BTreeMap<String, String>,
    pub(crate) group: Option<String>,
    pub(crate) message_id: String,
    pub(crate) attempts: u32,
}

pub(crate) fn stored(m: &aws_sdk_sqs::types::Message) -> Stored {
    let system = m.attributes();
    let get = |n: MessageSystemAttributeName| system.and_then(|a| a.get(&n)).cloned();
    Stored {
        body: m.body().unwrap_or_default().to_owned(),
        attributes: m
            .message_attributes()
            .map(|a| {
                a.iter()
                    .filter_map(|(k, v)| v.string_value().map(|s| (k.clone(), s.to_owned())))
                    .collect()
            })
            .unwrap_or_default(),
        group: get(MessageSystemAttributeName::MessageGroupId),
        message_id: m.message_id().unwrap_or_default().to_owned(),
        attempts: get(MessageSystemAttributeName::ApproximateReceiveCount)
            .and_then(|v| v.parse().ok())
            .unwrap_or(1),
    }
}

pub(crate) fn sent_at(m: &aws_sdk_sqs::types::Message) -> Option<DateTime<Utc>> {
    m.attributes()
        .and_then(|a| a.get(&MessageSystemAttributeName::SentTimestamp))
        .and_then(|v| v.parse::<i64>().ok())
        .and_then(DateTime::from_timestamp_millis)
}

/// `event` as SQS and SNS carry it: binary mode when its body is non-empty UTF-8 text
/// and its attributes fit, otherwise structured (an event without data, or with
/// binary data as `data_base64`).
pub(crate) fn text_body(
    codec: &BinaryCodec,
    event: &cloudbus_driver::Event,
    filter_keys: &[String],
) -> Result<RawMessage> {
    let (raw, _) = codec.encode_keeping(event, filter_keys)?;
    if !raw.body.is_empty() && std::str::from_utf8(&raw.body).is_ok() {
        Ok(raw)
    } else {
        Ok(self::codec()
            .structured()
            .encode_keeping(event, filter_keys)?
            .0)
    }
}

/// The prefix of the message group of an event without an ordering key: each such
/// event is its own group, so unordered events do not wait for one another.
pub(crate) const UNORDERED_GROUP: &str = "cloudbus-unordered-";

/// The MessageGroupId of `m` on a FIFO queue: its ordering key, or a group of its own.
pub(crate) fn group_id(m: &OutgoingMessage) -> String {
    match &m.ordering_key {
        Some(k) => k.clone(),
        None => match &m.payload {
            Payload::Event(e) => format!(
                "{UNORDERED_GROUP}{}",
                cloudbus_driver::hashing::dedup_digest(e.source(), e.id())
            ),
            Payload::Raw(_) => format!("{UNORDERED_GROUP}{}", dedup_id_of(m)),
        },
    }
}

/// A deduplication or group id SQS accepts (1 to 128 characters of `[!-~]`): `id`
/// itself when it is one, else its SHA-256 in hex. Never a lossy clean-up: two
/// distinct ids never become the same id (which would make SQS drop the second event
/// while answering success).
pub(crate) fn dedup_id(id: &str) -> String {
    if (1..=128).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic()) {
        id.to_owned()
    } else {
        cloudbus_driver::hashing::hex_sha256(&[id.as_bytes()])
    }
}

/// The deduplication id of `m` in SQS's alphabet.
pub(crate) fn dedup_id_of(m: &OutgoingMessage) -> String {
    dedup_id(&m.dedup_id().unwrap_or(std::borrow::Cow::Borrowed(m.id())))
}

/// Decodes a message as an SQS consumer reads it: inside an SNS notification or
/// EventBridge envelope when it is one, in binary mode (`ce-` message attributes) or
/// structured mode. Never panics: anything else is a [`cloudbus_driver::DecodeError`].
///
/// ```
/// use cloudbus_driver::codec::RawMessage;
/// let foreign = RawMessage::new("hello");
/// assert!(cloudbus_aws::sqs::decode_message(foreign).is_err());
/// ```
pub fn decode_message(
    raw: RawMessage,
) -> std::result::Result<cloudbus_driver::Event, cloudbus_driver::DecodeError> {
    codec().decode(&unwrap_envelope(raw))
}

/// The message inside an SNS notification envelope (an SNS subscription without raw
/// delivery, with its message attributes) or an EventBridge event (its `detail`, the
/// structured CloudEvent); any other message unchanged.
pub(crate) fn unwrap_envelope(raw: RawMessage) -> RawMessage {
    if raw.body.first() != Some(&b'{') {
        return raw;
    }
    let Ok(serde_json::Value::Object(v)) = serde_json::from_slice::<serde_json::Value>(&raw.body)
    else {
        return raw;
    };
    if let (Some(_), Some(detail @ serde_json::Value::Object(_))) =
        (v.get("detail-type"), v.get("detail"))
    {
        return RawMessage {
            body: detail.to_string().into_bytes(),
            attributes: raw.attributes.clone(),
        };
    }
    let (Some("Notification"), Some(_), Some(message)) = (
        v.get("Type").and_then(|t| t.as_str()),
        v.get("TopicArn").and_then(|t| t.as_str()),
        v.get("Message").and_then(|m| m.as_str()),
    ) else {
        return raw;
    };
    let mut attributes = raw.attributes.clone();
    if let Some(serde_json::Value::Object(attrs)) = v.get("MessageAttributes") {
        for (k, a) in attrs {
            if let Some(value) = a.get("Value").and_then(|x| x.as_str()) {
                attributes.insert(k.clone(), value.to_owned());
            }
        }
    }
    RawMessage {
        body: message.as_bytes().to_vec(),
        attributes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedup_ids_and_envelopes() {
        // Issue 12 item 1: ids were cleaned lossily (non-ASCII dropped, cut at 128),
        // so distinct events got one deduplication id and SQS dropped the later one.
        assert_eq!(dedup_id("order-7"), "order-7");
        assert_ne!(dedup_id("\u{e9}\u{e8}"), dedup_id("\u{e0}\u{f9}"));
        assert_ne!(dedup_id("a b"), dedup_id("ab"));
        let long = "x".repeat(128);
        assert_ne!(dedup_id(&format!("{long}1")), dedup_id(&format!("{long}2")));
        assert!(dedup_id(&"\u{e9}".repeat(200)).len() <= 128);
        let from = |source: &str| {
            OutgoingMessage::new(
                std::sync::Arc::new(
                    cloudbus_driver::EventBuilder::new("t", source)
                        .id("same-id")
                        .build()
                        .unwrap(),
                ),
                Default::default(),
            )
        };
        assert_ne!(dedup_id_of(&from("/a")), dedup_id_of(&from("/b")));
        let envelope = RawMessage::new(
            r#"{"Type":"Notification","MessageId":"m","TopicArn":"arn:aws:sns:us-east-1:0:t","Message":"{\"a\":1}","MessageAttributes":{"ce-id":{"Type":"String","Value":"e-1"}}}"#,
        );
        let inner = unwrap_envelope(envelope);
        assert_eq!(inner.body, br#"{"a":1}"#);
        assert_eq!(
            inner.attributes.get("ce-id").map(String::as_str),
            Some("e-1")
        );
        let eb = RawMessage::new(
            r#"{"version":"0","id":"x","detail-type":"t","source":"/s","detail":{"specversion":"1.0","id":"e-2"}}"#,
        );
        let inner = unwrap_envelope(eb);
        let detail: serde_json::Value = serde_json::from_slice(&inner.body).unwrap();
        assert_eq!(detail["id"], "e-2");
        let plain = RawMessage::new("{\"Type\":\"other\"}");
        assert_eq!(unwrap_envelope(plain.clone()).body, plain.body);
    }
}
