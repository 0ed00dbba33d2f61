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
    let mut loops = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("read demo output");
        if let Some(cmd) = line.trim_start().strip_prefix("curl ") {
            curls.push(format!("curl {cmd}"));
        }
        if let Some(cmd) = line.trim_start().strip_prefix("for ") {
            loops.push(format!("for {cmd}"));
        }
        if line.starts_with("The demo's manifests") {
            break;
        }
    }
    assert_eq!(curls.len(), 10, "{curls:?}");
    assert_eq!(loops.len(), 1, "{loops:?}");

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
    // The HTTPRoute's header match: every request with the header reaches the canary,
    // through the rule's RequestHeaderModifier.
    for _ in 0..10 {
        let v: serde_json::Value = serde_json::from_str(&run(&curls[4])).expect("echo JSON");
        assert_eq!(v["name"], "canary-1", "{}: {v}", curls[4]);
        assert_eq!(v["headers"]["x-demo-route"], "canary-by-header", "{v}");
    }
    // The 90/10 split, by the printed loop of 20 requests, run 10 times. Both backends
    // answer, the canary about a tenth of the time: with 200 requests at p = 0.1 the
    // canary count is 20 ± 4.2, and a correct split falls outside 3..=40 with a
    // probability below 1 in 100,000 (binomial tails), while an even split (about 100)
    // or no split at all (0 or 200) fails.
    let (mut stable, mut canary) = (0u32, 0u32);
    for _ in 0..10 {
        for line in run(&loops[0]).lines() {
            let mut words = line.split_whitespace();
            let count: u32 = words
                .next()
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("{}: `{line}`", loops[0]));
            match words.next() {
                Some(r#""name":"stable-1""#) => stable += count,
                Some(r#""name":"canary-1""#) => canary += count,
                other => panic!("{}: unexpected answer {other:?}", loops[0]),
            }
        }
    }
    assert_eq!(stable + canary, 200, "{}", loops[0]);
    assert!(
        (3..=40).contains(&canary),
        "canary answered {canary} of 200, stable {stable}"
    );
    // HTTPS with the demo CA, verified by curl, then HTTP/2 through ALPN.
    let v: serde_json::Value = serde_json::from_str(&run(&curls[5])).expect("echo JSON");
    assert!(
        v["name"].as_str().unwrap_or_default().starts_with("web-"),
        "https: {v}"
    );
    assert_eq!(v["headers"]["x-forwarded-proto"], "https", "{v}");
    assert_eq!(run(&curls[6]).trim(), "2", "{}", curls[6]);
    let snap: serde_json::Value = serde_json::from_str(&run(&curls[7])).expect("snapshot JSON");
    assert_eq!(snap["generation"], 1);
    let state: serde_json::Value = serde_json::from_str(&run(&curls[9])).expect("state JSON");
    assert_eq!(state["generation"], 1);
    assert!(
        state["virtual_hosts"]
            .as_array()
            .is_some_and(|v| v.iter().any(|h| h["host"] == "demo.localhost")),
        "{state}"
    );
    // The demo serves its HTTPRoute without a problem.
    assert_eq!(state["diagnostics"], serde_json::json!([]), "{state}");
    assert!(run(&curls[8]).contains("portcullis_requests_total"));
}
