//! Replays the committed fuzz corpus (`fuzz/corpus/<target>/`) through the same checks
//! the cargo-fuzz targets run (`fuzz/src/lib.rs`), so that every `cargo test` checks
//! them without cargo-fuzz or a nightly toolchain. Inputs that once failed a check stay
//! in the corpus as regression tests.

#[path = "../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod checks;

use std::path::{Path, PathBuf};

/// The corpus files of `target`, sorted; the corpus must not be empty.
fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("corpus entry").path())
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "{}: empty corpus", dir.display());
    files
}

fn replay(target: &str, check: fn(&[u8])) {
    let files = corpus(target);
    for f in &files {
        let data = std::fs::read(f).expect("read corpus file");
        let outcome = std::panic::catch_unwind(|| check(&data));
        if let Err(panic) = outcome {
            let msg = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("(no message)");
            panic!("{target}: {} fails: {msg}", f.display());
        }
    }
    eprintln!("{target}: {} corpus inputs replayed", files.len());
}

#[test]
fn manifests_corpus() {
    replay("manifests", checks::manifests);
}

#[test]
fn routing_corpus() {
    replay("routing", checks::routing);
}

#[test]
fn headers_corpus() {
    replay("headers", checks::headers);
}

#[test]
fn paths_corpus() {
    replay("paths", checks::paths);
}
