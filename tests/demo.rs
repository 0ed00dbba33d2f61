//! `portcullis demo`: the newcomer's command prints curl lines that work exactly as
//! printed. Runs the real binary on ports chosen by the OS and the real curl.

#[path = "support/child.rs"]
mod child;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

struct Demo(Child);

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn printed_curl_lines_work_as_printed() {
    let child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("demo")
        .args(child::LOOPBACK_LISTENERS)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start demo");
    let mut demo = Demo(child);
    let stdout = demo.0.stdout.take().expect("stdout");
    let mut curls = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("read demo output");
        if let Some(cmd) = line.trim_start().strip_prefix("curl ") {
            curls.push(format!("curl {cmd}"));
        }
        if line.starts_with("The demo's manifests") {
            break;
        }
    }
    assert_eq!(curls.len(), 9, "{curls:?}");

    let run = |cmd: &str| {
        let out = Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .output()
            .expect("run curl");
        assert!(out.status.success(), "{cmd} failed");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // The first line alternates between the two web endpoints.
    let names: Vec<String> = (0..4)
        .map(|_| {
            let v: serde_json::Value = serde_json::from_str(&run(&curls[0])).expect("echo JSON");
            v["name"].as_str().unwrap_or_default().to_string()
        })
        .collect();
    assert!(
        names.contains(&"web-1".to_string()) && names.contains(&"web-2".to_string()),
        "{names:?}"
    );
    for (cmd, want) in [(&curls[1], "api-1"), (&curls[2], "api-1")] {
        let v: serde_json::Value = serde_json::from_str(&run(cmd)).expect("echo JSON");
        assert_eq!(v["name"], want, "{cmd}");
    }
    let v: serde_json::Value = serde_json::from_str(&run(&curls[3])).expect("echo JSON");
    assert!(
        v["name"].as_str().unwrap_or_default().starts_with("web-"),
        "default backend: {v}"
    );
    // HTTPS with the demo CA, verified by curl, then HTTP/2 through ALPN.
    let v: serde_json::Value = serde_json::from_str(&run(&curls[4])).expect("echo JSON");
    assert!(
        v["name"].as_str().unwrap_or_default().starts_with("web-"),
        "https: {v}"
    );
    assert_eq!(v["headers"]["x-forwarded-proto"], "https", "{v}");
    assert_eq!(run(&curls[5]).trim(), "2", "{}", curls[5]);
    let snap: serde_json::Value = serde_json::from_str(&run(&curls[6])).expect("snapshot JSON");
    assert_eq!(snap["generation"], 1);
    let state: serde_json::Value = serde_json::from_str(&run(&curls[8])).expect("state JSON");
    assert_eq!(state["generation"], 1);
    assert!(
        state["virtual_hosts"]
            .as_array()
            .is_some_and(|v| v.iter().any(|h| h["host"] == "demo.localhost")),
        "{state}"
    );
    assert!(run(&curls[7]).contains("portcullis_requests_total"));
}
