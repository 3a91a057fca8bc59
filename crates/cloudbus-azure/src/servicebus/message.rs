//! Service Bus messages as AMQP messages, following the CloudEvents AMQP protocol
//! binding: attributes as application properties under `cloudEvents_` (the prefix the
//! binding prefers; `cloudEvents:` when configured, and both are read), integer and
//! boolean extensions as AMQP `long` and `boolean`, `datacontenttype` as the AMQP
//! `content-type`, structured mode recognised by an `application/cloudevents` content
//! type. Also the Service Bus parts: MessageId, SessionId (the AMQP `group-id`),
//! scheduled enqueue time, lock tokens and sequence numbers, the batched message
//! format that carries several messages in one transfer, and the copy of a received
//! message that is sent again (a nacked deferred message, a redriven dead letter).

use chrono::{DateTime, Utc};
use cloudbus_driver::codec::RawMessage;
use cloudbus_driver::driver::OutgoingMessage;
use cloudbus_driver::hashing::{key_slot, lower_hex};
use cloudbus_driver::{Error, Event, ExtensionValue, Result};
use fe2o3_amqp::link::delivery::Sendable;
use fe2o3_amqp::types::messaging::annotations::AnnotationKey;
use fe2o3_amqp::types::messaging::message::__private::Serializable;
use fe2o3_amqp::types::messaging::{
    ApplicationProperties, Batch, Body, Data, Message, MessageAnnotations, MessageId, Properties,
};
use fe2o3_amqp::types::primitives::{Binary, SimpleValue, Symbol, Timestamp, Uuid, Value};

use super::config::{
    ATTRIBUTE_PREFIX, COLON_ATTRIBUTE_PREFIX, REDRIVE_PROPERTY, UNDERSCORE_ATTRIBUTE_PREFIX,
    UNKEYED_SESSIONS,
};

/// A received (or peeked) message.
pub(crate) type AmqpMessage = Message<Body<Value>>;

/// The message format of a batch: each message encoded in a data section of its own.
pub(crate) const BATCH_MESSAGE_FORMAT: u32 = 0x8001_3700;
/// What a batch adds around its messages, at most (envelope sections, the data
/// section headers are counted per message).
const BATCH_ENVELOPE_BYTES: usize = 512;
/// What one data section adds to the message it carries.
const DATA_SECTION_BYTES: usize = 8;
/// The longest MessageId and SessionId.
const MAX_ID_LENGTH: usize = 128;
/// Where the codec keeps `datacontenttype` before it moves to the AMQP property.
pub(crate) const CONTENT_TYPE: &str = "content-type";

/// Copies application properties into text attributes, typed values as their text.
pub(crate) fn text_of(value: &SimpleValue) -> Option<String> {
    Some(match value {
        SimpleValue::Null => return None,
        SimpleValue::Bool(b) => b.to_string(),
        SimpleValue::Ubyte(n) => n.to_string(),
        SimpleValue::Ushort(n) => n.to_string(),
        SimpleValue::Uint(n) => n.to_string(),
        SimpleValue::Ulong(n) => n.to_string(),
        SimpleValue::Byte(n) => n.to_string(),
        SimpleValue::Short(n) => n.to_string(),
        SimpleValue::Int(n) => n.to_string(),
        SimpleValue::Long(n) => n.to_string(),
        SimpleValue::Float(n) => n.to_string(),
        SimpleValue::Double(n) => n.to_string(),
        SimpleValue::Char(c) => c.to_string(),
        SimpleValue::Timestamp(t) => DateTime::from_timestamp_millis(t.milliseconds())?
            .to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
        SimpleValue::Uuid(u) => uuid::Uuid::from_bytes(*u.as_inner()).to_string(),
        SimpleValue::String(s) => s.clone(),
        SimpleValue::Symbol(s) => s.0.clone(),
        SimpleValue::Binary(_)
        | SimpleValue::Decimal32(_)
        | SimpleValue::Decimal64(_)
        | SimpleValue::Decimal128(_)
        | SimpleValue::Described(_) => return None,
    })
}

/// The typed AMQP values of an event's integer and boolean extensions (binary mode),
/// named with `prefix`: integers are AMQP `long`, as the binding's type system says.
pub(crate) fn typed_extensions(event: &Event, prefix: &str) -> Vec<(String, SimpleValue)> {
    event
        .iter_extensions()
        .filter_map(|(name, value)| {
            let v = match value {
                ExtensionValue::Integer(n) => SimpleValue::Long(*n),
                ExtensionValue::Boolean(b) => SimpleValue::Bool(*b),
                ExtensionValue::String(_) => return None,
            };
            Some((format!("{prefix}{name}"), v))
        })
        .collect()
}

/// A Service Bus message from a raw message: `content-type` to the AMQP property, the
/// rest to application properties (typed ones replacing their text), MessageId from
/// the dedup id, SessionId from the ordering key (or one of [`UNKEYED_SESSIONS`] on a
/// session-enabled entity), ScheduledEnqueueTime from the delay.
pub(crate) fn outgoing(
    mut raw: RawMessage,
    typed: &[(String, SimpleValue)],
    m: &OutgoingMessage,
    sessions: bool,
) -> Result<Message<Data>> {
    let mut properties = Properties {
        content_type: raw.attributes.remove(CONTENT_TYPE).map(Symbol::from),
        ..Default::default()
    };
    let mut application = ApplicationProperties::builder();
    for (k, v) in std::mem::take(&mut raw.attributes) {
        let value = match typed.iter().find(|(name, _)| *name == k) {
            Some((_, typed)) => typed.clone(),
            None => SimpleValue::String(v),
        };
        application = application.insert(k, value);
    }
    if let Some(id) = m.dedup_id() {
        if id.chars().count() > MAX_ID_LENGTH {
            return Err(Error::invalid(format!(
                "{id:?} cannot be a Service Bus MessageId (at most {MAX_ID_LENGTH} characters)"
            )));
        }
        properties.message_id = Some(MessageId::String(id.to_string()));
    }
    if sessions {
        let session = match &m.ordering_key {
            Some(key) => key.clone(),
            None => format!("cloudbus-unkeyed-{}", key_slot(m.id(), UNKEYED_SESSIONS)),
        };
        if session.chars().count() > MAX_ID_LENGTH {
            return Err(Error::invalid(format!(
                "the ordering key cannot be a Service Bus SessionId (at most {MAX_ID_LENGTH} characters)"
            )));
        }
        properties.group_id = Some(session);
    }
    let mut annotations = MessageAnnotations::builder();
    if let Some(delay) = m.delay.filter(|d| !d.is_zero()) {
        let at = Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default();
        annotations = annotations.insert(
            Symbol::from("x-opt-scheduled-enqueue-time"),
            Value::Timestamp(Timestamp::from_milliseconds(at.timestamp_millis())),
        );
    }
    let annotations = annotations.build();
    Ok(Message::builder()
        .properties(properties)
        .message_annotations((!annotations.0.is_empty()).then_some(annotations))
        .application_properties(application.build())
        .data(Binary::from(raw.body))
        .build())
}

/// The encoded size of a message in a batch.
pub(crate) fn encoded(message: &Message<Data>) -> Result<Vec<u8>> {
    serde_amqp::to_vec(&Serializable(message))
        .map_err(|e| Error::invalid(format!("cannot encode a Service Bus message as AMQP: {e}")))
}

/// Fills transfers of at most `max_bytes` each, one encoded message at a time, so
/// that a send encodes the next transfer's messages only when the last one is on its
/// way (a group of one is sent as it is, a larger one in the batched format).
pub(crate) struct TransferFill {
    max_bytes: usize,
    /// What a batch may hold after its envelope.
    budget: usize,
    used: usize,
    count: usize,
}

/// Where [`TransferFill::place`] puts a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Placement {
    /// Into the transfer being filled.
    Append,
    /// Into a new transfer: the one being filled (if any) is to be sent first.
    StartNew,
    /// Nowhere: larger than a transfer may be.
    TooLarge,
}

impl TransferFill {
    pub(crate) fn new(max_bytes: usize) -> Self {
        TransferFill {
            max_bytes,
            budget: max_bytes.saturating_sub(BATCH_ENVELOPE_BYTES),
            used: 0,
            count: 0,
        }
    }

    /// The largest transfer it fills.
    pub(crate) fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// Places a message of `size` encoded bytes.
    pub(crate) fn place(&mut self, size: usize) -> Placement {
        let cost = size + DATA_SECTION_BYTES;
        if size > self.max_bytes {
            return Placement::TooLarge;
        }
        if cost > self.budget {
            // Too large for a batch, not for a transfer of its own: alone, and the
            // next message starts another.
            self.used = self.budget;
            self.count = 1;
            return Placement::StartNew;
        }
        if self.count > 0 && self.used + cost > self.budget {
            self.used = cost;
            self.count = 1;
            return Placement::StartNew;
        }
        self.used += cost;
        self.count += 1;
        if self.count == 1 {
            Placement::StartNew
        } else {
            Placement::Append
        }
    }
}

/// One transfer of `messages`: the message itself when there is one, else a batch
/// whose envelope carries the first message's properties (as Microsoft's clients do).
pub(crate) fn transfer(mut messages: Vec<(Message<Data>, Vec<u8>)>) -> Option<TransferMessage> {
    if messages.len() == 1 {
        let (message, _) = messages.pop()?;
        return Some(TransferMessage::Single(message));
    }
    let first = messages.first()?;
    let properties = first.0.properties.clone();
    let annotations = first.0.message_annotations.clone();
    let data: Vec<Data> = messages
        .into_iter()
        .map(|(_, bytes)| Data::from(bytes))
        .collect();
    let envelope = Message::builder()
        .properties(properties)
        .message_annotations(annotations)
        .body(Batch::from(data))
        .build();
    Some(TransferMessage::Batch(
        Sendable::builder()
            .message(envelope)
            .message_format(BATCH_MESSAGE_FORMAT)
            .build(),
    ))
}

/// What one send transfers.
pub(crate) enum TransferMessage {
    Single(Message<Data>),
    Batch(Sendable<Batch<Data>>),
}

/// A message annotation of a received or peeked message.
pub(crate) fn annotation<'a>(message: &'a AmqpMessage, name: &str) -> Option<&'a Value> {
    message
        .message_annotations
        .as_ref()?
        .get(&name as &dyn AnnotationKey)
}

/// An annotation that is a timestamp.
pub(crate) fn annotation_time(message: &AmqpMessage, name: &str) -> Option<DateTime<Utc>> {
    match annotation(message, name)? {
        Value::Timestamp(t) => DateTime::from_timestamp_millis(t.milliseconds()),
        _ => None,
    }
}

/// A message's sequence number.
pub(crate) fn sequence_of(message: &AmqpMessage) -> Option<i64> {
    match annotation(message, "x-opt-sequence-number")? {
        Value::Long(n) => Some(*n),
        _ => None,
    }
}

/// A message's lock token: the `x-opt-lock-token` annotation, else the delivery tag
/// (16 bytes).
pub(crate) fn lock_token_of(message: &AmqpMessage, delivery_tag: Option<&[u8]>) -> Option<Uuid> {
    if let Some(Value::Uuid(token)) = annotation(message, "x-opt-lock-token") {
        return Some(token.clone());
    }
    let bytes: [u8; 16] = delivery_tag?.try_into().ok()?;
    Some(Uuid::from(bytes))
}

/// A lock token as text (the settlement key).
pub(crate) fn token_text(token: &Uuid) -> String {
    lower_hex(token.as_inner())
}

/// A message's MessageId as text.
pub(crate) fn message_id_of(message: &AmqpMessage) -> Option<String> {
    Some(match message.properties.as_ref()?.message_id.as_ref()? {
        MessageId::String(s) => s.clone(),
        MessageId::Ulong(n) => n.to_string(),
        MessageId::Uuid(u) => uuid::Uuid::from_bytes(*u.as_inner()).to_string(),
        MessageId::Binary(b) => lower_hex(b),
    })
}

/// A message's SessionId (the AMQP group-id).
pub(crate) fn session_id_of(message: &AmqpMessage) -> Option<String> {
    message.properties.as_ref()?.group_id.clone()
}

/// The body of a message: its data sections, or a value's text.
pub(crate) fn body_bytes(message: &AmqpMessage) -> Vec<u8> {
    match &message.body {
        Body::Data(batch) => batch.iter().fold(Vec::new(), |mut out, d| {
            out.extend_from_slice(&d.0);
            out
        }),
        Body::Value(v) => match &v.0 {
            Value::String(s) => s.clone().into_bytes(),
            Value::Binary(b) => b.to_vec(),
            other => format!("{other:?}").into_bytes(),
        },
        _ => Vec::new(),
    }
}

/// Application properties a redrive leaves behind.
pub(crate) const DEAD_LETTER_PROPERTIES: [&str; 2] =
    ["DeadLetterReason", "DeadLetterErrorDescription"];

/// A message that sends `message` again: the same body and application properties
/// (without the dead-letter reason), MessageId `id` (duplicate detection would drop a
/// copy with the old one), the content type and session; on a topic, the
/// [`REDRIVE_PROPERTY`] naming the one subscription it is for.
pub(crate) fn resend_copy(
    message: &AmqpMessage,
    subscription: Option<&str>,
    id: String,
) -> Message<Data> {
    let mut application = fe2o3_amqp::types::messaging::ApplicationProperties::builder();
    if let Some(existing) = &message.application_properties {
        for (k, v) in existing.0.iter() {
            if !DEAD_LETTER_PROPERTIES.contains(&k.as_str()) && k != REDRIVE_PROPERTY {
                application = application.insert(k.clone(), v.clone());
            }
        }
    }
    if let Some(subscription) = subscription {
        application = application.insert(
            REDRIVE_PROPERTY.to_owned(),
            fe2o3_amqp::types::primitives::SimpleValue::String(subscription.to_owned()),
        );
    }
    let properties = Properties {
        message_id: Some(fe2o3_amqp::types::messaging::MessageId::String(
            id.chars().take(128).collect(),
        )),
        content_type: message
            .properties
            .as_ref()
            .and_then(|p| p.content_type.clone()),
        group_id: session_id_of(message),
        ..Default::default()
    };
    Message::builder()
        .properties(properties)
        .application_properties(application.build())
        .data(fe2o3_amqp::types::primitives::Binary::from(body_bytes(
            message,
        )))
        .build()
}

/// A received message as a raw message for the codec: body, text attributes (both
/// binding prefixes read as `prefix`), `content-type`; and the typed extension values
/// to restore after decoding.
pub(crate) fn raw_of(
    message: &AmqpMessage,
    prefix: &str,
) -> (RawMessage, Vec<(String, ExtensionValue)>) {
    let mut raw = RawMessage::new(body_bytes(message));
    let mut typed = Vec::new();
    if let Some(props) = &message.application_properties {
        for (k, v) in props.0.iter() {
            let attribute = [UNDERSCORE_ATTRIBUTE_PREFIX, COLON_ATTRIBUTE_PREFIX]
                .iter()
                .find_map(|p| k.strip_prefix(p));
            let key = match attribute {
                Some(name) => [prefix, name].concat(),
                None => k.clone(),
            };
            if let Some(name) = attribute {
                let value = match v {
                    SimpleValue::Long(n) => Some(ExtensionValue::Integer(*n)),
                    SimpleValue::Int(n) => Some(ExtensionValue::Integer(i64::from(*n))),
                    SimpleValue::Short(n) => Some(ExtensionValue::Integer(i64::from(*n))),
                    SimpleValue::Byte(n) => Some(ExtensionValue::Integer(i64::from(*n))),
                    SimpleValue::Uint(n) => Some(ExtensionValue::Integer(i64::from(*n))),
                    SimpleValue::Ushort(n) => Some(ExtensionValue::Integer(i64::from(*n))),
                    SimpleValue::Ubyte(n) => Some(ExtensionValue::Integer(i64::from(*n))),
                    SimpleValue::Bool(b) => Some(ExtensionValue::Boolean(*b)),
                    _ => None,
                };
                if let Some(value) = value
                    && name != "time"
                {
                    typed.push((name.to_owned(), value));
                }
            }
            // `time` as a number is milliseconds since the epoch (an AMQP timestamp
            // read as a number: the official Python SDK's binding writes it so).
            let text = match (attribute, v) {
                (Some("time"), SimpleValue::Long(ms)) => DateTime::from_timestamp_millis(*ms)
                    .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
                _ => text_of(v),
            };
            // One message uses one prefix; if both appear, the first one read wins.
            if !raw.attributes.contains_key(&key)
                && let Some(text) = text
            {
                raw.attributes.insert(key, text);
            }
        }
    }
    if let Some(ct) = message
        .properties
        .as_ref()
        .and_then(|p| p.content_type.as_ref())
    {
        raw.attributes.insert(CONTENT_TYPE.to_owned(), ct.0.clone());
    }
    (raw, typed)
}

/// Gives back integer and boolean extensions their types (binary mode carries them
/// as typed AMQP values; the codec reads text).
pub(crate) fn restore(event: &mut Event, typed: Vec<(String, ExtensionValue)>) {
    for (name, value) in typed {
        if event.extension(&name).is_some() {
            event.set_extension(&name, value);
        }
    }
}

/// Decodes an AMQP message, as Service Bus delivers it (its encoded sections), into
/// a CloudEvent the way a Service Bus consumer reads it: binary mode under either
/// binding prefix (typed extensions keep their type), or structured mode by content
/// type. Bytes that are not an AMQP message, or a message that is not a CloudEvent,
/// are a typed error. This is what `cloudbus::fuzzing` feeds arbitrary bytes.
///
/// ```
/// let e = cloudbus_azure::servicebus::decode_amqp_message(b"not AMQP").unwrap_err();
/// assert_eq!(e.kind(), cloudbus_core::ErrorKind::Malformed);
/// ```
pub fn decode_amqp_message(bytes: &[u8]) -> Result<Event> {
    use cloudbus_driver::ErrorKind;
    use cloudbus_driver::codec::BinaryCodec;
    use fe2o3_amqp::types::messaging::message::__private::Deserializable;
    let message = serde_amqp::from_slice::<Deserializable<AmqpMessage>>(bytes)
        .map_err(|e| Error::with_source(ErrorKind::Malformed, "not an AMQP message", e))?
        .0;
    let (raw, typed) = raw_of(&message, ATTRIBUTE_PREFIX);
    let codec = BinaryCodec::new(ATTRIBUTE_PREFIX).content_type_attribute(CONTENT_TYPE);
    let mut event = codec
        .decode(&raw)
        .map_err(|e| Error::new(ErrorKind::Malformed, format!("not a CloudEvent: {e}")))?;
    restore(&mut event, typed);
    Ok(event)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_values_read_as_text() {
        assert_eq!(text_of(&SimpleValue::Int(12)).as_deref(), Some("12"));
        assert_eq!(text_of(&SimpleValue::Bool(true)).as_deref(), Some("true"));
        assert_eq!(text_of(&SimpleValue::Null), None);
    }

    /// Integers are written as AMQP long, whatever their size (the binding's type
    /// system maps Integer to long).
    #[test]
    fn integer_extensions_are_amqp_longs() {
        let event = cloudbus_driver::EventBuilder::new("t", "/s")
            .extension("priority", ExtensionValue::Integer(3))
            .extension("urgent", ExtensionValue::Boolean(true))
            .build()
            .unwrap();
        let typed = typed_extensions(&event, UNDERSCORE_ATTRIBUTE_PREFIX);
        assert!(typed.contains(&("cloudEvents_priority".to_owned(), SimpleValue::Long(3))));
        assert!(typed.contains(&("cloudEvents_urgent".to_owned(), SimpleValue::Bool(true))));
    }

    /// Both prefixes of the binding are read, and typed values keep their type.
    #[test]
    fn both_binding_prefixes_are_read() {
        for p in [UNDERSCORE_ATTRIBUTE_PREFIX, COLON_ATTRIBUTE_PREFIX] {
            let message: AmqpMessage = Message::builder()
                .application_properties(
                    ApplicationProperties::builder()
                        .insert(format!("{p}specversion"), SimpleValue::from("1.0"))
                        .insert(format!("{p}id"), SimpleValue::from("1"))
                        .insert(format!("{p}type"), SimpleValue::from("t"))
                        .insert(format!("{p}source"), SimpleValue::from("/s"))
                        .insert(format!("{p}priority"), SimpleValue::Int(3))
                        .build(),
                )
                .body(Body::Data(Batch::from(vec![Data::from(b"x".to_vec())])))
                .build();
            let (raw, typed) = raw_of(&message, UNDERSCORE_ATTRIBUTE_PREFIX);
            assert_eq!(raw.attributes["cloudEvents_type"], "t", "{p}");
            assert_eq!(
                typed,
                vec![("priority".to_owned(), ExtensionValue::Integer(3))]
            );
        }
    }

    /// The transfers `sizes` fill, as indexes; and the ones too large.
    fn fill(sizes: &[usize], max_bytes: usize) -> (Vec<Vec<usize>>, Vec<usize>) {
        let mut fill = TransferFill::new(max_bytes);
        let (mut transfers, mut too_large): (Vec<Vec<usize>>, _) = (Vec::new(), Vec::new());
        for (i, size) in sizes.iter().enumerate() {
            match fill.place(*size) {
                Placement::TooLarge => too_large.push(i),
                Placement::StartNew => transfers.push(vec![i]),
                Placement::Append => transfers.last_mut().expect("started").push(i),
            }
        }
        (transfers, too_large)
    }

    #[test]
    fn messages_fill_transfers_by_size() {
        let (transfers, too_large) = fill(&[100, 100, 300_000, 100], 1000);
        assert_eq!(transfers, vec![vec![0, 1, 3]]);
        assert_eq!(too_large, vec![2]);
        let (transfers, _) = fill(&[400, 400, 400], 1000);
        assert_eq!(transfers.len(), 3);
        let (transfers, too_large) = fill(&[10, 900, 10], 1000);
        assert_eq!(transfers, vec![vec![0], vec![1], vec![2]]);
        assert!(too_large.is_empty());
        let (transfers, _) = fill(&[300_000, 10], 1000);
        assert_eq!(
            transfers,
            vec![vec![1]],
            "a first message too large starts nothing"
        );
    }

    /// AMQP messages written by another stack (python-qpid-proton, the committed fuzz
    /// seeds) read as Service Bus consumers read them: both binding prefixes, typed
    /// extensions, an AMQP timestamp as the time, structured mode by content type; a
    /// foreign message is Malformed.
    #[test]
    fn amqp_messages_of_another_stack_decode() {
        use cloudbus_driver::AttributesReader;
        let seed = |name: &str| {
            std::fs::read(format!(
                "{}/../../fuzz/corpus/decode_all/servicebus-{name}",
                env!("CARGO_MANIFEST_DIR")
            ))
            .expect("seed")
        };
        for name in ["binary-underscore", "binary-colon"] {
            let e = decode_amqp_message(&seed(name)).expect(name);
            assert_eq!(e.ty(), "com.example.t");
            assert_eq!(e.extension("priority"), Some(&ExtensionValue::Integer(7)));
            assert_eq!(e.extension("urgent"), Some(&ExtensionValue::Boolean(true)));
            assert_eq!(
                e.time().map(|t| t.timestamp_millis()),
                Some(1_764_500_000_000)
            );
            assert_eq!(e.datacontenttype(), Some("application/json"));
        }
        let e = decode_amqp_message(&seed("structured")).expect("structured");
        assert_eq!(e.id(), "2");
        let e = decode_amqp_message(&seed("foreign")).unwrap_err();
        assert_eq!(e.kind(), cloudbus_driver::ErrorKind::Malformed);
    }
}
