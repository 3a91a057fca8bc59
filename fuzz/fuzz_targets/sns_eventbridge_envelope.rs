//! An SNS notification or EventBridge event as the whole SQS body. Input: `cloudbus::fuzzing::message_from_bytes`; seeds: `fuzz/corpus/decode_all`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cloudbus::fuzzing::decode_sns_eventbridge_envelope(data);
});
