//! Build script: the git commit for `portcullis_build_info{git_sha}`.
//!
//! Sets `PORTCULLIS_GIT_SHA` for the crate: the value of `PORTCULLIS_GIT_SHA` in the
//! build environment when set (container builds, which have no `.git`), else
//! `git rev-parse --short HEAD`, else `unknown` (no git, no repository, a tarball).
//! Reruns when HEAD or the branch it points at moves, found through git itself so
//! that worktrees (where `.git` is a file) work too.

use std::path::{Path, PathBuf};
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?.trim().to_string();
    (!s.is_empty()).then_some(s)
}

fn watch(path: &Path) {
    // Only paths that exist: a missing one would rerun this script on every build.
    if path.exists() {
        println!("cargo:rerun-if-changed={}", path.display());
    }
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=PORTCULLIS_GIT_SHA");
    if let Ok(sha) = std::env::var("PORTCULLIS_GIT_SHA")
        && !sha.trim().is_empty()
    {
        println!("cargo:rustc-env=PORTCULLIS_GIT_SHA={}", sha.trim());
        return;
    }
    let sha = git(&["rev-parse", "--short", "HEAD"])
        .filter(|s| s.chars().all(|c| c.is_ascii_hexdigit()))
        .unwrap_or_else(|| "unknown".to_string());
    if let Some(git_dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        let git_dir = PathBuf::from(git_dir);
        watch(&git_dir.join("HEAD"));
        if let (Some(common), Some(head_ref)) = (
            git(&["rev-parse", "--path-format=absolute", "--git-common-dir"]),
            git(&["symbolic-ref", "-q", "HEAD"]),
        ) {
            let common = PathBuf::from(common);
            let branch = common.join(head_ref);
            if branch.exists() {
                watch(&branch);
            } else if let Some(dir) = branch.parent() {
                // Only in packed-refs (a fresh clone): the loose ref appears here with
                // the next commit.
                watch(dir);
            }
            watch(&common.join("packed-refs"));
        }
    }
    println!("cargo:rustc-env=PORTCULLIS_GIT_SHA={sha}");
}
