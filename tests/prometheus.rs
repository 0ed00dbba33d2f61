//! Real Prometheus tooling against Portcullis: `promtool check metrics` on a scrape of
//! the admin listener, `promtool check rules` and `promtool test rules` on the
//! PrometheusRule of manifests/monitoring, and a real Prometheus server that scrapes
//! the admin listener and answers PromQL with the count of requests sent, and accepts
//! every query of the Grafana dashboard.
//!
//! The binaries come from Debian's `prometheus` package (`.ci/run` installs it). Without
//! them these tests skip with a message, except under CI (`CI=true`), where they fail.

mod support;

use std::collections::BTreeSet;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use portcullis::admin::{AdminState, serve_admin};
use serde_json::Value;
use support::*;
use tokio::net::TcpListener;

/// How long a real Prometheus gets to start, scrape and answer.
const PROMETHEUS_PATIENCE: Duration = Duration::from_secs(90);

/// The path of the Prometheus tool `name` (`support::require_tool`).
fn require(name: &str) -> Option<PathBuf> {
    require_tool(
        name,
        "Debian package `prometheus`: apt-get install --no-install-recommends prometheus",
    )
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// A proxy with traffic of every kind and an admin listener serving its metrics.
struct Harness {
    proxy: TestProxy,
    admin: SocketAddr,
    _echo: Echo,
    _stop: Stopper,
}

async fn harness() -> Harness {
    let echo = start_echo("obs").await;
    let world = World::new()
        .ingress(
            ingress("shop", "obs")
                .host("obs.example")
                .prefix("/", "web", 80),
        )
        .ingress(
            ingress("shop", "broken")
                .host("broken.example")
                .prefix("/", "missing", 80),
        )
        .backend("shop", "web", 80, &[echo.addr]);
    let proxy = start_proxy(world.snapshot()).await;
    proxy
        .metrics
        .observe_snapshot(&proxy.snapshots.load(), 0.003);
    proxy.metrics.kube_watch_error("Ingress");
    proxy.metrics.kube_watch_restart("Ingress");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
    let admin = listener.local_addr().expect("admin address");
    let (stop, rx) = Stopper::new();
    tokio::spawn(serve_admin(
        listener,
        AdminState {
            snapshots: proxy.snapshots.clone(),
            metrics: proxy.metrics.clone(),
            ready: Arc::new(AtomicBool::new(true)),
        },
        rx,
    ));
    Harness {
        proxy,
        admin,
        _echo: echo,
        _stop: stop,
    }
}

async fn fetch(url: &str) -> (u16, String) {
    let resp = client().get(url).send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.text().await.expect("body"))
}

/// Runs `cmd`, feeding `stdin`; returns success and everything it printed.
fn run(cmd: &mut Command, stdin: &[u8]) -> (bool, String) {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the command");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(stdin)
        .expect("write stdin");
    let out = child.wait_with_output().expect("wait for the command");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_a_real_scrape_of_the_admin_listener() {
    let Some(promtool) = require("promtool") else {
        return;
    };
    let h = harness().await;
    // 2xx with a body, a 404, a 503 without endpoints, a HEAD.
    get_echo(&h.proxy, "obs.example", "/").await;
    let big = client()
        .post(h.proxy.url("/upload"))
        .header("host", "obs.example")
        .body(vec![b'x'; 100_000])
        .send()
        .await
        .expect("post");
    assert_eq!(big.status(), 200);
    let _ = big.bytes().await;
    assert_eq!(get(&h.proxy, "nowhere.example", "/").await.0, 404);
    assert_eq!(get(&h.proxy, "broken.example", "/").await.0, 503);

    let (status, scrape) = fetch(&format!("http://{}/metrics", h.admin)).await;
    assert_eq!(status, 200);
    for name in [
        "portcullis_requests_total",
        "portcullis_request_size_bytes_bucket",
        "portcullis_response_size_bytes_sum",
        "portcullis_connections_total",
        "portcullis_kube_watch_restarts_total",
        "portcullis_access_log_dropped_total",
        "portcullis_build_info",
    ] {
        assert!(scrape.contains(name), "{name} missing from the scrape");
    }
    let (ok, out) = run(
        Command::new(&promtool).args(["check", "metrics"]),
        scrape.as_bytes(),
    );
    assert!(
        ok,
        "promtool check metrics failed:\n{out}\n--- scrape ---\n{scrape}"
    );
}

/// The PrometheusRule object's `spec`, as a Prometheus rule file (JSON is YAML), and
/// the same rules without annotations for `promtool test rules` (which would otherwise
/// compare every rendered annotation; `check rules` validates their templates).
fn rules_files(dir: &Path) -> (PathBuf, PathBuf) {
    let text = std::fs::read_to_string(repo("manifests/monitoring/prometheusrule.yaml"))
        .expect("read the PrometheusRule");
    let object: Value = serde_saphyr::from_str(&text).expect("PrometheusRule parses");
    assert_eq!(object["kind"], "PrometheusRule");
    let path = dir.join("rules.yaml");
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&object["spec"]).expect("spec as JSON"),
    )
    .expect("write rules");
    let mut bare = object["spec"].clone();
    for group in bare["groups"].as_array_mut().expect("groups") {
        for rule in group["rules"].as_array_mut().expect("rules") {
            rule.as_object_mut().expect("rule").remove("annotations");
        }
    }
    let bare_path = dir.join("rules_without_annotations.yaml");
    std::fs::write(
        &bare_path,
        serde_json::to_string_pretty(&bare).expect("rules as JSON"),
    )
    .expect("write rules");
    (path, bare_path)
}

#[test]
fn alert_rules_pass_promtool_check_and_their_unit_tests() {
    let Some(promtool) = require("promtool") else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let (rules, _) = rules_files(dir.path());
    let (ok, out) = run(
        Command::new(&promtool)
            .arg("check")
            .arg("rules")
            .arg(&rules),
        b"",
    );
    assert!(ok, "promtool check rules:\n{out}");
    assert!(out.contains("SUCCESS"), "{out}");

    let unit = dir.path().join("rules_test.yaml");
    std::fs::copy(repo("tests/prometheus/rules_test.yaml"), &unit).expect("copy rule tests");
    let (ok, out) = run(
        Command::new(&promtool).arg("test").arg("rules").arg(&unit),
        b"",
    );
    assert!(ok, "promtool test rules:\n{out}");
}

/// Every `portcullis_*` name in `text`, with histogram suffixes removed.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("portcullis_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        names.insert(base.to_string());
        rest = &tail[end..];
    }
    names
}

/// Every expression of the dashboard, with Grafana's variables filled in.
fn dashboard_queries() -> Vec<String> {
    let text =
        std::fs::read_to_string(repo("manifests/monitoring/dashboard.json")).expect("dashboard");
    let dash: Value = serde_json::from_str(&text).expect("dashboard is JSON");
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("expr");
            out.push(
                expr.replace("$__rate_interval", "1m")
                    .replace("$namespace", ".*")
                    .replace("$route_kind", ".*")
                    .replace("$route", ".*"),
            );
        }
    }
    assert!(out.len() >= 10, "{out:?}");
    out
}

#[test]
fn the_monitoring_bundle_uses_only_metrics_that_exist() {
    let defined = metric_names(include_str!("../src/metrics.rs"));
    let dashboard =
        std::fs::read_to_string(repo("manifests/monitoring/dashboard.json")).expect("dashboard");
    let rules =
        std::fs::read_to_string(repo("manifests/monitoring/prometheusrule.yaml")).expect("rules");
    for (what, text) in [("dashboard", &dashboard), ("rules", &rules)] {
        let used = metric_names(text);
        assert!(!used.is_empty());
        for name in &used {
            assert!(
                defined.contains(name),
                "the {what} uses {name}, which src/metrics.rs does not define"
            );
        }
    }
    // The issue's panels: certificate expiry, endpoints, snapshots, latency, errors.
    for needed in [
        "portcullis_certificate_expiry_timestamp_seconds",
        "portcullis_endpoints",
        "portcullis_snapshot_generation",
        "portcullis_snapshot_publish_timestamp_seconds",
        "portcullis_request_duration_seconds",
        "portcullis_requests_total",
    ] {
        assert!(dashboard.contains(needed), "dashboard lacks {needed}");
    }
}

/// Kills the process when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// Percent-encodes a query parameter value.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

async fn api(base: &str, path: &str) -> Option<Value> {
    let resp = client().get(format!("{base}{path}")).send().await.ok()?;
    serde_json::from_str(&resp.text().await.ok()?).ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_admin_listener_and_counts_requests() {
    let Some(prometheus) = require("prometheus") else {
        return;
    };
    let h = harness().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: portcullis\n    static_configs:\n      - targets: ['{}']\n",
            h.admin
        ),
    )
    .expect("write config");
    let port = free_port();
    let log_path = dir.path().join("prometheus.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let child = Command::new(&prometheus)
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .arg("--log.level=warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log)
        .spawn()
        .expect("start prometheus");
    let mut prom = Killed(child);
    let base = format!("http://127.0.0.1:{port}");
    let log_text = || std::fs::read_to_string(&log_path).unwrap_or_default();

    // Until Prometheus has scraped the admin listener successfully.
    let deadline = Instant::now() + PROMETHEUS_PATIENCE;
    loop {
        if let Ok(Some(status)) = prom.0.try_wait() {
            panic!("prometheus exited with {status}:\n{}", log_text());
        }
        let targets = api(&base, "/api/v1/targets").await;
        let up = targets.as_ref().is_some_and(|t| {
            t["data"]["activeTargets"]
                .as_array()
                .is_some_and(|a| a.iter().any(|t| t["health"] == "up"))
        });
        if up {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "prometheus never scraped {}: {targets:?}\n{}",
            h.admin,
            log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    const SENT: u64 = 7;
    for _ in 0..SENT {
        get_echo(&h.proxy, "obs.example", "/").await;
    }
    let query = format!(
        "/api/v1/query?query={}",
        encode(r#"sum(portcullis_requests_total{route_kind="Ingress", route="obs"})"#)
    );
    let deadline = Instant::now() + PROMETHEUS_PATIENCE;
    loop {
        let answer = api(&base, &query).await;
        let value = answer.as_ref().and_then(|a| {
            a["data"]["result"][0]["value"][1]
                .as_str()
                .and_then(|v| v.parse::<f64>().ok())
        });
        if value == Some(SENT as f64) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "PromQL never saw {SENT} requests: {answer:?}\n{}",
            log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Every dashboard query parses and evaluates against real data.
    for expr in dashboard_queries() {
        let answer = api(&base, &format!("/api/v1/query?query={}", encode(&expr))).await;
        assert_eq!(
            answer.as_ref().map(|a| a["status"].clone()),
            Some(Value::from("success")),
            "{expr}: {answer:?}"
        );
    }
}
