//! Pub/Sub message attributes and data. Input: `cloudbus::fuzzing::message_from_bytes`; seeds: `fuzz/corpus/decode_all`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cloudbus::fuzzing::decode_pubsub_message(data);
});
