//! Helpers shared by the integration tests: the list of backends under test
//! and their rules (the one place to add a backend), the conformance table's
//! rows, and the proptest configuration.

pub mod backends;
pub mod cases;
pub mod rules;

use proptest::test_runner::Config;

/// The proptest configuration of the property tests: `PROPTEST_CASES`
/// cases (default 24, what CI runs), failing inputs printed shrunk and no
/// regression files written.
pub fn proptest_config() -> Config {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(24);
    Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    }
}

/// A tensor of values in `[-1, 1)` from a xorshift stream: cheap,
/// deterministic operands for tests that compare paths bit for bit.
pub fn fill<T: dmkd::Float>(shape: &[usize], seed: u64) -> dmkd::Tensor<T> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    dmkd::Tensor::from_fn(shape, |_| {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        T::from_f64((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0)
    })
    .unwrap()
}
