//! cargo-fuzz target: see `portcullis_fuzz::headers` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| portcullis_fuzz::headers(data));
