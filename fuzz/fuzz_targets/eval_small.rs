//! Fuzz target `eval_small`: see `checks::eval_small` (fuzz/src/checks.rs).
#![no_main]

#[allow(dead_code)]
#[path = "../src/checks.rs"]
mod checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| checks::eval_small(data));
