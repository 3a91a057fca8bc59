//! Binary mode with the `ce-` prefix (HTTP, Pub/Sub, SQS attributes). Input: `cloudbus::fuzzing::message_from_bytes`; seeds: `fuzz/corpus/decode_all`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cloudbus::fuzzing::decode_ce_binary(data);
});
