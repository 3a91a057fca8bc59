//! A Kinesis record's data (no attributes). Input: `cloudbus::fuzzing::message_from_bytes`; seeds: `fuzz/corpus/decode_all`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cloudbus::fuzzing::decode_kinesis_record(data);
});
