//! The decoders that read the wire, driven from raw bytes: the one entry point of the
//! `cargo fuzz` targets in `fuzz/` and of the bounded stable run in the normal test
//! suite (which replays the committed seed corpora under `fuzz/corpus/` and mutations
//! of them). Not a user API.
//!
//! Every decoder must answer arbitrary input with a value or a typed error, never a
//! panic; and an event it accepts must survive a round trip through structured JSON.

use crate::codec::{BinaryCodec, RawMessage, from_structured_json, from_unlabelled_body};

/// The most attributes [`message_from_bytes`] makes.
const MAX_ATTRIBUTES: usize = 16;

/// Splits fuzz input into a message: the first byte says how many attributes follow
/// (modulo 17), each as `name\0value\0`; the rest is the body. Any bytes make a
/// message, so the fuzzer explores attributes and bodies together.
///
/// ```
/// let m = cloudbus::fuzzing::message_from_bytes(b"\x01ce-id\x00e-1\x00body");
/// assert_eq!(m.attributes["ce-id"], "e-1");
/// assert_eq!(m.body, b"body");
/// ```
pub fn message_from_bytes(data: &[u8]) -> RawMessage {
    let Some((&count, mut rest)) = data.split_first() else {
        return RawMessage::new(Vec::new());
    };
    let mut message = RawMessage::new(Vec::new());
    for _ in 0..(count as usize % (MAX_ATTRIBUTES + 1)) {
        let mut parts = rest.splitn(3, |b| *b == 0);
        let (Some(name), Some(value), Some(tail)) = (parts.next(), parts.next(), parts.next())
        else {
            break;
        };
        message = message.with_attribute(
            String::from_utf8_lossy(name).into_owned(),
            String::from_utf8_lossy(value).into_owned(),
        );
        rest = tail;
    }
    message.body = rest.to_vec();
    message
}

/// An event a decoder accepted must come back equal from structured JSON.
fn round_trips(decoder: &str, event: &crate::Event) {
    let json = match crate::codec::to_structured_json(event) {
        Ok(json) => json,
        Err(e) => panic!("{decoder}: an accepted event cannot be encoded: {e}"),
    };
    match from_structured_json(&json) {
        Ok(back) => assert_eq!(&back, event, "{decoder}: the round trip changed the event"),
        Err(e) => panic!("{decoder}: an accepted event does not decode again: {e}"),
    }
}

/// Binary mode with the `ce-` prefix (HTTP, Pub/Sub, SQS attributes).
pub fn decode_ce_binary(data: &[u8]) {
    if let Ok(event) = BinaryCodec::new("ce-").decode(&message_from_bytes(data)) {
        round_trips("ce- codec", &event);
    }
}

/// Binary mode with the AMQP binding's `cloudEvents:` application properties.
pub fn decode_amqp_properties(data: &[u8]) {
    let codec = BinaryCodec::new("cloudEvents:").content_type_attribute("content-type");
    if let Ok(event) = codec.decode(&message_from_bytes(data)) {
        round_trips("AMQP codec", &event);
    }
}

/// Structured mode: the JSON event format alone.
pub fn decode_structured_json(data: &[u8]) {
    if let Ok(event) = from_structured_json(data) {
        round_trips("structured JSON", &event);
    }
}

/// A record without attributes (a Kinesis record's data).
pub fn decode_kinesis_record(data: &[u8]) {
    if let Ok(event) = from_unlabelled_body(data) {
        round_trips("attribute-less body", &event);
    }
}

/// Pub/Sub message attributes and data, as the Pub/Sub consumer reads them.
#[cfg(feature = "pubsub")]
pub fn decode_pubsub_message(data: &[u8]) {
    let codec = BinaryCodec::new(crate::gcp::ATTRIBUTE_PREFIX)
        .content_type_attribute(crate::gcp::CONTENT_TYPE_ATTRIBUTE);
    if let Ok(event) = codec.decode(&message_from_bytes(data)) {
        round_trips("Pub/Sub attributes", &event);
    }
}

/// SQS message attributes and body, as the SQS consumer reads them.
#[cfg(feature = "sqs")]
pub fn decode_sqs_message(data: &[u8]) {
    if let Ok(event) = crate::aws::sqs::decode_message(message_from_bytes(data)) {
        round_trips("SQS/SNS/EventBridge", &event);
    }
}

/// An SNS notification or EventBridge event envelope as the whole SQS body.
#[cfg(feature = "sqs")]
pub fn decode_sns_eventbridge_envelope(data: &[u8]) {
    if let Ok(event) = crate::aws::sqs::decode_message(RawMessage::new(data.to_vec())) {
        round_trips("SNS/EventBridge envelope", &event);
    }
}

/// An Event Grid push body (one event or a batch).
#[cfg(feature = "eventgrid")]
pub fn decode_eventgrid_push(data: &[u8]) {
    if let Ok(events) = crate::azure::eventgrid::push::decode_push_body(data) {
        for event in events.into_iter().flatten() {
            round_trips("Event Grid push", &event);
        }
    }
}

/// A Service Bus message: the bytes of an encoded AMQP message (header, annotations,
/// properties, application properties, body sections) as a receiver gets them.
#[cfg(feature = "servicebus")]
pub fn decode_servicebus_message(data: &[u8]) {
    if let Ok(event) = crate::azure::servicebus::decode_amqp_message(data) {
        round_trips("Service Bus AMQP message", &event);
    }
}

/// A wire decoder run on fuzz input.
pub type Decoder = fn(&[u8]);

/// Every wire decoder built into this crate (by its cargo features), by name: one
/// `cargo fuzz` target each (`fuzz/fuzz_targets/<name>.rs`).
pub const DECODERS: &[(&str, Decoder)] = &[
    ("ce_binary", decode_ce_binary),
    ("amqp_properties", decode_amqp_properties),
    ("structured_json", decode_structured_json),
    ("kinesis_record", decode_kinesis_record),
    #[cfg(feature = "pubsub")]
    ("pubsub_message", decode_pubsub_message),
    #[cfg(feature = "sqs")]
    ("sqs_message", decode_sqs_message),
    #[cfg(feature = "sqs")]
    ("sns_eventbridge_envelope", decode_sns_eventbridge_envelope),
    #[cfg(feature = "eventgrid")]
    ("eventgrid_push", decode_eventgrid_push),
    #[cfg(feature = "servicebus")]
    ("servicebus_message", decode_servicebus_message),
];

/// Runs every decoder of [`DECODERS`] over `data`.
pub fn decode_all(data: &[u8]) {
    for (_, decode) in DECODERS {
        decode(data);
    }
}

/// The committed seed corpora plus `mutations` seeded mutations of them, each run
/// through [`decode_all`]: the stable, bounded counterpart of `cargo fuzz`. Returns
/// how many inputs ran.
pub fn run_corpus(corpus_dir: &std::path::Path, mutations: usize, seed: u64) -> usize {
    let mut seeds: Vec<Vec<u8>> = Vec::new();
    let mut dirs = vec![corpus_dir.to_path_buf()];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                seeds.push(bytes);
            }
        }
    }
    seeds.sort();
    for s in &seeds {
        decode_all(s);
    }
    if seeds.is_empty() {
        return 0;
    }
    let mut rng = fastrand::Rng::with_seed(seed);
    for _ in 0..mutations {
        let mut input = seeds[rng.usize(..seeds.len())].clone();
        match rng.u8(..4) {
            // Flip a few bytes.
            0 => {
                for _ in 0..rng.usize(1..8) {
                    if !input.is_empty() {
                        let i = rng.usize(..input.len());
                        input[i] = rng.u8(..);
                    }
                }
            }
            // Cut it short.
            1 => input.truncate(rng.usize(..=input.len())),
            // Splice another seed in.
            2 => {
                let other = &seeds[rng.usize(..seeds.len())];
                let at = rng.usize(..=input.len());
                let from = rng.usize(..=other.len());
                input.splice(at.., other[from..].iter().copied());
            }
            // Insert JSON-significant bytes.
            _ => {
                let at = rng.usize(..=input.len());
                let b = *rng.choice(b"{}[]\":,\\\x00\xff0-e".iter()).unwrap_or(&b'{');
                input.insert(at, b);
            }
        }
        decode_all(&input);
    }
    seeds.len() + mutations
}
