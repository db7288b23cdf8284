//! Fuzz target `config_parser`: see `checks::config_parser` (fuzz/src/checks.rs).
#![no_main]

#[allow(dead_code)]
#[path = "../src/checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::config_parser(data));
