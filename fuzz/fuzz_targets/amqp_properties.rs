//! Binary mode with the AMQP binding's `cloudEvents:` application properties. Input: `cloudbus::fuzzing::message_from_bytes`; seeds: `fuzz/corpus/decode_all`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cloudbus::fuzzing::decode_amqp_properties(data);
});
