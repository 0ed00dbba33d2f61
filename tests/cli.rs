//! The `check` and `explain` commands, run as a user runs them: the real binary on
//! manifest files, asserting on exit status and output.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn portcullis(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(args)
        .output()
        .expect("run portcullis");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn examples() -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples/basic")
        .display()
        .to_string()
}

#[test]
fn check_on_the_example_is_clean() {
    let (code, out, err) = portcullis(&["check", "--manifests", &examples()]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        out.contains("Would serve 2 virtual host(s), 4 route(s)"),
        "{out}"
    );
    assert!(out.contains("No problems found."), "{out}");
}

#[test]
fn check_json_summarises() {
    let (code, out, _) = portcullis(&["check", "--manifests", &examples(), "--output", "json"]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).expect("json");
    assert_eq!(v["summary"]["virtual_hosts"], 2);
    assert_eq!(v["summary"]["routes"], 4);
    assert_eq!(v["summary"]["errors"], 0);
    assert_eq!(v["default_backend"]["service"], "fallback");
}

#[test]
fn check_exits_1_on_errors_and_2_on_io_errors() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.yaml"),
        r#"
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: bad}
spec:
  rules:
    - http:
        paths:
          - {path: nope, pathType: Prefix, backend: {service: {name: web, port: {number: 80}}}}
"#,
    )
    .unwrap();
    let (code, out, _) = portcullis(&["check", "--manifests", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("error: Ingress default/bad spec.rules[0].http.paths[0].path: path `nope` must start with `/`"),
        "{out}"
    );

    let (code, _, err) = portcullis(&["check", "--manifests", "/nonexistent/portcullis"]);
    assert_eq!(code, 2);
    assert!(err.contains("/nonexistent/portcullis"), "{err}");

    let (code, _, err) = portcullis(&["check"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn check_names_file_and_line_of_invalid_yaml() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broken.yaml");
    std::fs::write(
        &file,
        "apiVersion: v1\nkind: Service\nmetadata: {name: [x\n",
    )
    .unwrap();
    let (code, _, err) = portcullis(&["check", "--manifests", file.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("broken.yaml"), "{err}");
    assert!(err.contains("line 3"), "{err}");
}

#[test]
fn explain_json_has_the_contract_shape() {
    let (code, out, err) = portcullis(&[
        "explain",
        "--manifests",
        &examples(),
        "--output",
        "json",
        "http://FOO.bar.com:8080/aaa/bbb?q=1",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).expect("json");
    let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    let mut want = vec![
        "url",
        "host",
        "path",
        "status",
        "ingress",
        "route",
        "rule",
        "path_match",
        "default_backend",
        "backend",
        "endpoints",
        "reason",
    ];
    let mut got = keys.clone();
    want.sort();
    got.sort();
    assert_eq!(got, want);
    assert_eq!(v["host"], "foo.bar.com");
    assert_eq!(v["path"], "/aaa/bbb");
    assert_eq!(v["status"], 200);
    assert_eq!(
        v["ingress"],
        serde_json::json!({"namespace": "default", "name": "shop"})
    );
    assert_eq!(
        v["route"],
        serde_json::json!({"kind": "Ingress", "namespace": "default", "name": "shop", "rule": 0, "match": 2})
    );
    assert_eq!(v["rule"]["host_match"], "exact");
    assert_eq!(v["path_match"]["path_type"], "Exact");
    assert_eq!(v["path_match"]["length"], 8);
    assert_eq!(
        v["backend"],
        serde_json::json!({"namespace": "default", "service": "web", "port": 80})
    );
    assert_eq!(v["endpoints"], serde_json::json!(["127.0.0.1:8080"]));
    assert_eq!(v["default_backend"], false);
}

#[test]
fn explain_reports_default_backend_and_404() {
    let (code, out, _) = portcullis(&[
        "explain",
        "--manifests",
        &examples(),
        "--output",
        "json",
        "http://a.b.bar.com/x",
    ]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["default_backend"], true);
    assert_eq!(v["backend"]["service"], "fallback");
    assert_eq!(v["rule"], Value::Null);

    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        Path::new(&examples()).join("services.yaml"),
        dir.path().join("services.yaml"),
    )
    .unwrap();
    let (code, out, _) = portcullis(&[
        "explain",
        "--manifests",
        dir.path().to_str().unwrap(),
        "--output",
        "json",
        "nowhere.example/",
    ]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["status"], 404);
    assert_eq!(v["backend"], Value::Null);
    assert_eq!(v["ingress"], Value::Null);
}

#[test]
fn explain_text_names_the_losers() {
    let (code, out, _) = portcullis(&[
        "explain",
        "--manifests",
        &examples(),
        "http://foo.bar.com/aaa/bbb/c",
    ]);
    assert_eq!(code, 0);
    assert!(
        out.contains("path rule: Prefix /aaa/bbb (length 8)"),
        "{out}"
    );
    assert!(out.contains("also matched, and lost:"), "{out}");
    assert!(out.contains("foo.bar.com Prefix / (length 1"), "{out}");
}

#[test]
fn explain_refuses_a_bad_url() {
    let (code, _, err) = portcullis(&["explain", "--manifests", &examples(), "http://a b/"]);
    assert_eq!(code, 2);
    assert!(err.contains("is not a URL"), "{err}");
}

/// Every duration flag of `run`, with the environment variable it also reads.
const DURATION_FLAGS: &[(&str, &str)] = &[
    (
        "--upstream-connect-timeout",
        "PORTCULLIS_UPSTREAM_CONNECT_TIMEOUT",
    ),
    (
        "--upstream-response-timeout",
        "PORTCULLIS_UPSTREAM_RESPONSE_TIMEOUT",
    ),
    (
        "--upstream-idle-timeout",
        "PORTCULLIS_UPSTREAM_IDLE_TIMEOUT",
    ),
    ("--header-read-timeout", "PORTCULLIS_HEADER_READ_TIMEOUT"),
    ("--shutdown-delay", "PORTCULLIS_SHUTDOWN_DELAY"),
    ("--shutdown-grace", "PORTCULLIS_SHUTDOWN_GRACE"),
    (
        "--tls-handshake-timeout",
        "PORTCULLIS_TLS_HANDSHAKE_TIMEOUT",
    ),
    (
        "--election-lease-duration",
        "PORTCULLIS_ELECTION_LEASE_DURATION",
    ),
];

/// Asserts a startup error: exit 2, no panic, and exactly one `error:` line, which
/// names `flag`.
fn assert_one_line_error(code: i32, err: &str, flag: &str) {
    assert_eq!(code, 2, "{flag}: {err}");
    assert!(!err.contains("panicked"), "{flag}: {err}");
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{flag}: {err}");
    assert!(errors[0].contains(flag), "{flag}: {err}");
    assert!(errors[0].contains("maximum"), "{flag}: {err}");
}

/// An absurd duration is refused at startup with one line naming the flag, whether it
/// comes from the flag or from its environment variable. The manifests path does not
/// exist, so a binary that accepted the duration would fail on that path instead, and
/// never starts serving.
#[test]
fn absurd_durations_are_one_startup_error_naming_the_flag() {
    for (flag, env) in DURATION_FLAGS {
        for value in ["100000000y", "366d"] {
            let (code, _, err) =
                portcullis(&["run", "--manifests", "/nonexistent/portcullis", flag, value]);
            assert_one_line_error(code, &err, flag);

            let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
                .args(["run", "--manifests", "/nonexistent/portcullis"])
                .env(env, value)
                .output()
                .expect("run portcullis");
            let err = String::from_utf8_lossy(&out.stderr);
            assert_one_line_error(out.status.code().unwrap_or(-1), &err, flag);
        }
    }
}
