//! A chat or completion request body, parsed as the handlers parse it: it is refused with a
//! message or accepted, never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = aios::api::parse_request_body(data);
});
