//! Helpers shared by the integration tests: the list of backends under test
//! and their rules (the one place to add a backend), the conformance table's
//! rows, and the proptest configuration. Each test binary uses part of
//! them, hence no dead-code warnings here.
#![allow(dead_code)]

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
