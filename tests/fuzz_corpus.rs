//! Replays every checked-in fuzz corpus file (`fuzz/corpus/<target>/*`)
//! through the same check the cargo-fuzz target runs (`fuzz/src/checks.rs`),
//! so CI exercises the corpus, including inputs that once crashed, without
//! cargo-fuzz or a nightly compiler.

#[allow(dead_code)]
#[path = "../fuzz/src/checks.rs"]
mod checks;

use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    // A corpus that silently vanished would make this test pass vacuously.
    assert!(
        files.len() >= 5,
        "{target}: only {} corpus files",
        files.len()
    );
    for p in files {
        let data = std::fs::read(&p).unwrap();
        let r = std::panic::catch_unwind(|| check(&data));
        assert!(r.is_ok(), "{target}: {} fails its check", p.display());
    }
}

#[test]
fn safetensors_reader_corpus() {
    replay("safetensors_reader", checks::safetensors_reader);
}

#[test]
fn npy_reader_corpus() {
    replay("npy_reader", checks::npy_reader);
}

#[test]
fn config_parser_corpus() {
    replay("config_parser", checks::config_parser);
}

#[test]
fn eval_small_corpus() {
    replay("eval_small", checks::eval_small);
}
