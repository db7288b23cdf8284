//! Helpers shared by the integration tests.

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
