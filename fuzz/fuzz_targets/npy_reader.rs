//! Fuzz target `npy_reader`: see `checks::npy_reader` (fuzz/src/checks.rs).
#![no_main]

#[allow(dead_code)]
#[path = "../src/checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::npy_reader(data));
