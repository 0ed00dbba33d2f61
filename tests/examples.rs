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

#[test]
fn mlflow_local_tls_serves_its_host_with_a_certificate_from_portcullis_certs() {
    // The example ships without key material: the user runs `portcullis certs` into the
    // folder. Do the same in a temp dir with a copy of the manifests.
    let tmp = tempfile::tempdir().expect("temp dir");
    let certs = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["certs", "--hosts", "mlflow.localhost", "--out"])
        .arg(tmp.path())
        .output()
        .expect("run portcullis certs");
    assert!(
        certs.status.success(),
        "{}",
        String::from_utf8_lossy(&certs.stderr)
    );
    assert!(tmp.path().join("mlflow.localhost-secret.yaml").is_file());
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/mlflow/local-tls");
    for entry in std::fs::read_dir(&example).expect("read examples/mlflow/local-tls") {
        let path = entry.expect("dir entry").path();
        if path.extension().and_then(|e| e.to_str()) == Some("yaml")
            && !path.to_string_lossy().ends_with("-secret.yaml")
        {
            std::fs::copy(&path, tmp.path().join(path.file_name().unwrap())).expect("copy");
        }
    }

    let (code, out) = check(tmp.path().to_str().expect("utf-8 temp path"));
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(", 1 TLS host(s)."), "{out}");
    let tls_line = out
        .lines()
        .find(|l| l.trim_start().starts_with("mlflow.localhost") && l.contains("Secret"))
        .unwrap_or_else(|| panic!("no TLS host line: {out}"));
    assert!(tls_line.contains("default/mlflow-localhost-tls"), "{out}");
    assert!(
        tls_line.contains("  certificate ") && tls_line.contains("(expires "),
        "{out}"
    );
    assert!(!tls_line.contains("no usable certificate"), "{out}");
    assert!(out.contains("No problems found."), "{out}");
}

#[test]
fn gateway_example_attaches_its_httproute_with_a_split_and_a_redirect() {
    let (code, out) = check("examples/gateway");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("No problems found."), "{out}");
    assert!(
        out.contains("default/web (class portcullis): programmed"),
        "{out}"
    );
    assert!(out.contains("served on http, 1 route(s) attached"), "{out}");
    assert!(
        out.contains("default/store: serves store.localhost"),
        "{out}"
    );
    assert!(out.contains("90%  default/stable:80"), "{out}");
    assert!(out.contains("10%  default/canary:80"), "{out}");
    assert!(out.contains("redirect 301"), "{out}");
}
