//! Path normalisation (`--path-normalization on`) against a plain reference, over
//! generated paths, and the reference itself against the contract's examples.
//!
//! The reference and the checks are the `paths` fuzz target's (`fuzz/src/lib.rs`), so the
//! fuzzer and this property test check the same thing.

#[path = "../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod checks;

use proptest::prelude::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    /// Paths built from separators, dot segments, escapes and backslashes.
    #[test]
    fn normalize_agrees_with_the_reference(data in proptest::collection::vec(any::<u8>(), 0..48)) {
        checks::paths(&data);
    }

    /// Paths of raw visible ASCII, as a request target may carry them.
    #[test]
    fn raw_paths_agree_with_the_reference(path in "/[!-~]{0,40}") {
        if let Ok(target) = http::uri::PathAndQuery::try_from(path.as_str()) {
            checks::check_path(target.path());
        }
    }
}

/// The reference must be right too: it agrees with the contract's examples, so the two
/// implementations cannot share one mistake unnoticed.
#[test]
fn the_reference_follows_the_contract() {
    let cases: &[(&str, Result<&str, ()>)] = &[
        ("/public/../admin", Ok("/admin")),
        ("//admin", Ok("/admin")),
        ("/%61dmin", Ok("/admin")),
        ("/a/./b/", Ok("/a/b/")),
        ("/a/b/..", Ok("/a/")),
        ("/a%3fb", Ok("/a%3Fb")),
        ("/..", Err(())),
        ("/a/../../b", Err(())),
        ("/%2e%2e/x", Err(())),
        ("/a%2Fb", Err(())),
        ("/a%5cb", Err(())),
        ("/a%00", Err(())),
        ("/a\\b", Err(())),
        ("/100%", Err(())),
        ("/%4%31", Err(())),
        ("/public/..;/admin", Err(())),
        ("/a;b/../c", Ok("/c")),
    ];
    for (path, want) in cases {
        let got = checks::reference_normalize(path).map_err(|_| ());
        assert_eq!(got.as_deref(), want.as_deref(), "{path}");
        checks::check_path(path);
    }
}
