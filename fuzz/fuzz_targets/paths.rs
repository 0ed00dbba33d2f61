//! cargo-fuzz target: see `portcullis_fuzz::paths` for what it checks.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| portcullis_fuzz::paths(data));
