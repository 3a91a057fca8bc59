//! An Event Grid push body (one event or a batch). Input: `cloudbus::fuzzing::message_from_bytes`; seeds: `fuzz/corpus/decode_all`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cloudbus::fuzzing::decode_eventgrid_push(data);
});
