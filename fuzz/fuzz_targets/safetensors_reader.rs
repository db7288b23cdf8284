//! Fuzz target `safetensors_reader`: see `checks::safetensors_reader` (fuzz/src/checks.rs).
#![no_main]

#[allow(dead_code)]
#[path = "../src/checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::safetensors_reader(data));
