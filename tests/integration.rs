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

/// With `autotests = false`, a new file in tests/ runs only once it is a
/// module here (or a `[[test]]` of its own): one that is neither would
/// never run, and nothing else would say so.
#[test]
fn every_test_file_is_a_module_of_this_binary_or_a_test_of_its_own() {
    let crate_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let tests = crate_dir.join("tests");
    let root = std::fs::read_to_string(tests.join("integration.rs")).unwrap();
    let manifest = std::fs::read_to_string(crate_dir.join("Cargo.toml")).unwrap();
    let mut seen = 0;
    for entry in std::fs::read_dir(&tests).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_string();
        // A test is a `.rs` file, or a folder with a `main.rs` (`common/`
        // is a folder of helpers, a module above).
        let module = match name.strip_suffix(".rs") {
            Some(stem) => stem.to_string(),
            None if path.join("main.rs").is_file() => name.clone(),
            None => continue,
        };
        if module == "integration" {
            continue;
        }
        seen += 1;
        let own_binary = manifest.contains(&format!("path = \"tests/{name}\""));
        assert!(
            root.contains(&format!("\nmod {module};")) || own_binary,
            "tests/{name} is neither a module of tests/integration.rs nor a [[test]] in Cargo.toml: it would never run"
        );
    }
    // The folder was read: the sixteen modules and allocator.rs.
    assert!(
        seen >= 17,
        "only {seen} test files found in {}",
        tests.display()
    );
}
