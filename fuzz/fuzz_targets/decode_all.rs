//! Every wire decoder over arbitrary bytes (see `cloudbus::fuzzing`): attributes and
//! body of a message in binary or structured mode, structured JSON, attribute-less
//! records, and with `--features providers` the SNS and EventBridge envelopes, Pub/Sub
//! attributes and Event Grid push bodies. Seeds: `fuzz/corpus/decode_all`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cloudbus::fuzzing::decode_all(data);
});
