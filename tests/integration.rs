//! The integration tests, one test binary (`cargo test --test integration`;
//! one file or folder of tests per module, `cargo test --test integration
//! determinism::` runs one). Every test binary links the library and
//! compiles its own copies of the generic code it calls (the autodiff
//! tape, the loss, the reference backend, rayon's and proptest's
//! generics), since rustc shares generic instances between crates only in
//! unoptimized builds: sixteen binaries compiled that sixteen times. One
//! binary compiles it once, and libtest runs its tests on every core
//! instead of one binary after another.
//!
//! `tests/allocator.rs` stays a binary of its own: it reads the process's
//! allocator statistics, which no other test may move meanwhile.

mod common;

#[path = "bad_inputs/main.rs"]
mod bad_inputs;
mod cli;
#[path = "conformance/main.rs"]
mod conformance;
mod counters;
mod cuda_exact;
mod cuda_nvrtc;
mod determinism;
mod fuzz_corpus;
mod golden;
mod gradcheck;
mod gradcheck_loss;
mod mask_dtype;
mod op_errors;
mod reference_accuracy;
mod robustness;
mod sample_offset;
