//! A GGUF header (metadata, tensor index) and the model configuration read from it: a bad
//! file is an error, never a panic or an allocation the file does not justify.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = aios::model::read_gguf_config(data);
});
