//! The example manifests under examples/ pass `portcullis check` as shipped.

use std::path::Path;
use std::process::Command;

fn check(dir: &str) -> (i32, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("check")
        .arg("--manifests")
        .arg(&path)
        .output()
        .expect("run portcullis check");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn mlflow_local_fronts_a_server_on_loopback() {
    let (code, out) = check("examples/mlflow/local");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("mlflow.localhost"), "{out}");
    assert!(out.contains("-> default/mlflow:http"), "{out}");
    assert!(out.contains("[1 endpoint(s)]"), "{out}");
    assert!(out.contains("No problems found."), "{out}");
}

#[test]
fn mlflow_cluster_is_valid_and_only_lacks_endpoints_outside_a_cluster() {
    // Outside a cluster nothing writes the EndpointSlice: a warning, exit status 0.
    let (code, out) = check("examples/mlflow/cluster");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("0 error(s), 1 warning(s)"), "{out}");
    assert!(out.contains("has no ready or serving endpoints"), "{out}");
}
