//! A Service Bus message: the bytes of an encoded AMQP message, decoded as a Service Bus consumer reads it. Input: raw bytes; seeds: `fuzz/corpus/decode_all`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    cloudbus::fuzzing::decode_servicebus_message(data);
});
