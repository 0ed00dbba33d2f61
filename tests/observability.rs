//! Observability of the data path: the access log (fields, formats, no query strings,
//! `off`, dropping instead of blocking), body size histograms counted as bodies stream,
//! and the series count of a scrape with 1,000 Ingresses under traffic.

mod support;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use futures_util::StreamExt;
use http::header::HeaderValue;
use portcullis::accesslog::{AccessLog, AccessLogFormat, Entry};
use portcullis::metrics::{Metrics, RouteLabels};
use portcullis::model::Snapshot;
use portcullis::proxy::{Proxy, ProxyConfig};
use serde_json::Value;
use support::*;
use tokio::net::TcpListener;

/// A writer whose bytes the test can read.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("capture lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn lines(&self) -> Vec<String> {
        let bytes = self.0.lock().expect("capture lock").clone();
        String::from_utf8(bytes)
            .expect("access log is UTF-8")
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Waits until at least `n` lines were written.
    async fn eventually_lines(&self, n: usize) -> Vec<String> {
        let deadline = Instant::now() + EVENTUALLY;
        loop {
            let lines = self.lines();
            if lines.len() >= n {
                return lines;
            }
            assert!(
                Instant::now() < deadline,
                "wanted {n} access log lines, have {lines:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A proxy on 127.0.0.1:0 logging in `format` into the returned capture.
async fn proxy_logging(
    snapshot: Snapshot,
    format: AccessLogFormat,
) -> (SocketAddr, Captured, Arc<Metrics>, Stopper) {
    let metrics = Metrics::new();
    let captured = Captured::default();
    let log = AccessLog::start(
        format,
        captured.clone(),
        metrics.access_log_dropped_total.clone(),
        64,
    );
    let proxy = Proxy::with_access_log(
        ProxyConfig::default(),
        Arc::new(ArcSwap::from_pointee(snapshot)),
        metrics.clone(),
        log,
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
    let addr = listener.local_addr().expect("proxy address");
    let (stop, rx) = Stopper::new();
    tokio::spawn(async move { proxy.serve_http(listener, rx).await });
    (addr, captured, metrics, stop)
}

fn one_route(upstream: SocketAddr) -> Snapshot {
    World::new()
        .ingress(
            ingress("ns", "web")
                .host("a.example")
                .prefix("/", "svc", 80),
        )
        .backend("ns", "svc", 80, &[upstream])
        .snapshot()
}

/// Sends the test's three requests; returns the request ids and the bytes of each
/// response body: a GET with a query string, a POST with a 5-byte body, and a request
/// without a route.
async fn three_requests(addr: SocketAddr) -> Vec<(String, usize)> {
    let c = client();
    let mut out = Vec::new();
    for (method, host, path, body) in [
        ("GET", "a.example", "/docs/page?token=s3cret&x=1", ""),
        ("POST", "a.example", "/submit", "hello"),
        ("GET", "nowhere.example", "/missing?q=hidden", ""),
    ] {
        let resp = c
            .request(
                method.parse().expect("method"),
                format!("http://{addr}{path}"),
            )
            .header("host", host)
            .header("user-agent", "obs-test/1.0 (access log)")
            .body(body)
            .send()
            .await
            .expect("request through the proxy");
        let id = resp
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .expect("x-request-id")
            .to_string();
        let len = resp.bytes().await.expect("body").len();
        out.push((id, len));
    }
    out
}

#[tokio::test]
async fn json_access_log_has_every_field_and_no_query_string() {
    let echo = start_echo("a").await;
    let (addr, captured, metrics, _stop) =
        proxy_logging(one_route(echo.addr), AccessLogFormat::Json).await;
    let sent = three_requests(addr).await;
    let lines = captured.eventually_lines(3).await;
    assert_eq!(lines.len(), 3, "one line per request: {lines:?}");
    let all = lines.join("\n");
    assert!(
        !all.contains("s3cret") && !all.contains("hidden") && !all.contains('?'),
        "query strings are not logged: {all}"
    );
    let parsed: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    // Lines are written when each response body ends: find them by request id.
    let by_id = |id: &str| {
        parsed
            .iter()
            .find(|v| v["request_id"] == id)
            .unwrap_or_else(|| panic!("no line for {id}: {all}"))
    };

    let get = by_id(&sent[0].0);
    assert_eq!(get["method"], "GET");
    assert_eq!(get["host"], "a.example");
    assert_eq!(get["path"], "/docs/page");
    assert_eq!(get["status"], 200);
    assert_eq!(get["bytes_in"], 0);
    assert_eq!(get["bytes_out"], sent[0].1 as u64);
    assert_eq!(get["upstream"], echo.addr.to_string());
    assert!(get["upstream_duration_seconds"].as_f64().is_some());
    assert!(
        get["duration_seconds"].as_f64().expect("duration")
            >= get["upstream_duration_seconds"].as_f64().expect("upstream")
    );
    assert_eq!(get["namespace"], "ns");
    assert_eq!(get["route_kind"], "Ingress");
    assert_eq!(get["route"], "web");
    assert!(get.get("ingress").is_none(), "{get}");
    assert_eq!(get["service"], "svc");
    assert_eq!(get["user_agent"], "obs-test/1.0 (access log)");
    assert!(get["tls_version"].is_null(), "plain HTTP");
    let client: SocketAddr = get["client"]
        .as_str()
        .and_then(|c| c.parse().ok())
        .expect("client address");
    assert!(client.ip().is_loopback());
    let time = get["time"].as_str().expect("time");
    assert!(
        time.len() == 24 && time.ends_with('Z') && time.starts_with("20"),
        "{time}"
    );

    let post = by_id(&sent[1].0);
    assert_eq!(post["method"], "POST");
    assert_eq!(post["bytes_in"], 5);
    assert_eq!(post["bytes_out"], sent[1].1 as u64);

    let lost = by_id(&sent[2].0);
    assert_eq!(lost["status"], 404);
    assert_eq!(lost["path"], "/missing");
    assert!(lost["namespace"].is_null() && lost["route_kind"].is_null() && lost["route"].is_null());
    assert!(lost["upstream"].is_null() && lost["upstream_duration_seconds"].is_null());
    assert_eq!(lost["bytes_out"], sent[2].1 as u64);

    assert_eq!(metrics.access_log_dropped_total.get(), 0);
}

#[tokio::test]
async fn text_access_log_is_one_logfmt_line_per_request() {
    let echo = start_echo("a").await;
    let (addr, captured, _metrics, _stop) =
        proxy_logging(one_route(echo.addr), AccessLogFormat::Text).await;
    let sent = three_requests(addr).await;
    let lines = captured.eventually_lines(3).await;
    assert_eq!(lines.len(), 3, "{lines:?}");
    let get = lines
        .iter()
        .find(|l| l.contains(&format!("request_id={}", sent[0].0)))
        .expect("line of the GET");
    for field in [
        "method=GET",
        "host=a.example",
        "path=/docs/page ",
        "status=200",
        "bytes_in=0",
        &format!("bytes_out={}", sent[0].1),
        &format!("upstream={}", echo.addr),
        "namespace=ns route_kind=Ingress route=web service=svc",
        "user_agent=\"obs-test/1.0 (access log)\"",
        "tls=-",
    ] {
        assert!(get.contains(field), "{field} missing in {get}");
    }
    assert!(get.starts_with("time=20") && get.contains(" client=127.0.0.1:"));
    assert!(get.contains(" duration=") && get.contains(" upstream_duration="));
    assert!(!lines.join("\n").contains("s3cret"), "{lines:?}");
    let lost = lines
        .iter()
        .find(|l| l.contains(&format!("request_id={}", sent[2].0)))
        .expect("line of the 404");
    assert!(
        lost.contains("status=404") && lost.contains("namespace=- route_kind=- route=- service=-"),
        "{lost}"
    );
}

#[tokio::test]
async fn access_log_off_writes_nothing() {
    let echo = start_echo("a").await;
    let (addr, captured, metrics, stop) =
        proxy_logging(one_route(echo.addr), AccessLogFormat::Off).await;
    three_requests(addr).await;
    stop.stop();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(captured.lines().is_empty(), "{:?}", captured.lines());
    assert_eq!(metrics.access_log_dropped_total.get(), 0);
    assert!(!AccessLog::off().enabled());
}

/// A writer that blocks until released, as stdout does when nobody reads it.
struct Stuck {
    entered: std::sync::mpsc::Sender<()>,
    release: std::sync::mpsc::Receiver<()>,
    out: Captured,
    waited: bool,
}

impl Write for Stuck {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !self.waited {
            let _ = self.entered.send(());
            let _ = self.release.recv();
            self.waited = true;
        }
        self.out.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn entry(i: usize) -> Entry {
    Entry {
        time: SystemTime::now(),
        client: "127.0.0.1:1".parse().expect("addr"),
        method: http::Method::GET,
        host: Some(HeaderValue::from_static("a.example")),
        uri: format!("/{i}").parse().expect("uri"),
        status: 200,
        bytes_in: 0,
        bytes_out: 0,
        duration: Duration::ZERO,
        upstream: None,
        upstream_duration: None,
        route: RouteLabels::default(),
        request_id: HeaderValue::from_static("id"),
        user_agent: None,
        tls_version: None,
    }
}

#[test]
fn a_writer_that_falls_behind_costs_dropped_lines_not_blocked_requests() {
    let metrics = Metrics::new();
    let (release, released) = std::sync::mpsc::channel();
    let (entered_tx, entered) = std::sync::mpsc::channel();
    let out = Captured::default();
    let log = AccessLog::start(
        AccessLogFormat::Text,
        Stuck {
            entered: entered_tx,
            release: released,
            out: out.clone(),
            waited: false,
        },
        metrics.access_log_dropped_total.clone(),
        4,
    );
    // The writer takes the first line and gets stuck writing it out.
    log.log(entry(0));
    entered
        .recv_timeout(EVENTUALLY)
        .expect("the writer thread writes");
    // Logging goes on without waiting: 4 lines fit in the channel, the rest are
    // dropped and counted.
    for i in 1..=200 {
        log.log(entry(i));
    }
    assert_eq!(metrics.access_log_dropped_total.get(), 196);
    release.send(()).expect("release the writer");
    drop(log);
    let deadline = Instant::now() + EVENTUALLY;
    while out.lines().len() < 5 {
        assert!(Instant::now() < deadline, "kept lines were written");
        std::thread::sleep(Duration::from_millis(10));
    }
    let lines = out.lines();
    assert_eq!(lines.len(), 5);
    assert!(
        lines[0].contains("path=/0 ") && lines[4].contains("path=/4 "),
        "{lines:?}"
    );
}

/// The sum of the histogram `name` for the route ns/web/svc.
fn hist_sum(metrics: &Metrics, name: &str) -> (f64, f64) {
    let text = metrics.render();
    let value = |suffix: &str| {
        text.lines()
            .find(|l| {
                l.starts_with(&format!("{name}_{suffix}{{"))
                    && l.contains("route_kind=\"Ingress\"")
                    && l.contains("route=\"web\"")
                    && l.contains("service=\"svc\"")
            })
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    (value("sum"), value("count"))
}

#[tokio::test]
async fn body_sizes_are_counted_as_they_stream() {
    let echo = start_echo("a").await;
    let proxy = start_proxy(one_route(echo.addr)).await;
    let body = vec![b'x'; 300_000];
    let resp = client()
        .post(proxy.url("/upload"))
        .header("host", "a.example")
        .body(body)
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status(), 200);
    let answer = resp.bytes().await.expect("answer");
    let seen: EchoSeen = serde_json::from_slice(&answer).expect("echo json");
    assert_eq!(seen.body_bytes, 300_000);
    let (_, head_len) = {
        let resp = client()
            .head(proxy.url("/"))
            .header("host", "a.example")
            .send()
            .await
            .expect("head");
        (resp.status(), resp.bytes().await.expect("empty").len())
    };
    assert_eq!(head_len, 0);

    // Recorded when each response body ends: eventually both exchanges are in.
    let deadline = Instant::now() + EVENTUALLY;
    loop {
        let (req_sum, req_count) = hist_sum(&proxy.metrics, "portcullis_request_size_bytes");
        let (resp_sum, resp_count) = hist_sum(&proxy.metrics, "portcullis_response_size_bytes");
        if req_count == 2.0 && resp_count == 2.0 {
            assert_eq!(req_sum, 300_000.0);
            assert_eq!(
                resp_sum,
                answer.len() as f64,
                "the HEAD response has no body"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "size histograms: {req_count} / {resp_count} observations"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let text = proxy.metrics.render();
    let buckets = text
        .lines()
        .filter(|l| l.starts_with("portcullis_response_size_bytes_bucket{"))
        .count();
    assert!(buckets <= 13, "≤ 12 buckets plus +Inf: {buckets}");
    assert!(
        !text.lines().any(|l| l.starts_with("portcullis_re")
            && l.contains("_size_bytes")
            && l.contains("method=")),
        "size histograms carry no method"
    );
}

/// Series a routed Ingress (own Service, one method, one status class) adds at most:
/// requests_total 1; request_duration, request_size, response_size and
/// upstream_response_duration 14 each (11 buckets + `+Inf` + `_sum` + `_count`);
/// upstream_connect_duration 13 (10 buckets); endpoints 3 states.
pub const SERIES_PER_INGRESS: usize = 1 + 4 * 14 + 13 + 3;
/// Series that do not grow with Ingresses, measured generously (build info, snapshot
/// and publish, connections, diagnostics, watch errors and restarts per kind …).
pub const SERIES_CONSTANT: usize = 200;

fn samples(text: &str) -> usize {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_with_1000_ingresses_under_traffic_stays_under_the_bound() {
    const N: usize = 1000;
    let echo = start_echo("a").await;
    let mut world = World::new();
    for i in 0..N {
        world = world
            .ingress(
                ingress("ns", &format!("web-{i}"))
                    .host(&format!("h{i}.example"))
                    .prefix("/", &format!("svc-{i}"), 80),
            )
            .backend("ns", &format!("svc-{i}"), 80, &[echo.addr]);
    }
    let snapshot = world.snapshot();
    assert_eq!(snapshot.clusters.len(), N);
    let proxy = start_proxy(snapshot).await;
    proxy
        .metrics
        .observe_snapshot(&proxy.snapshots.load(), 0.01);
    let baseline = samples(&proxy.metrics.render());

    let c = client();
    let statuses: Vec<u16> = futures_util::stream::iter(0..N)
        .map(|i| {
            let c = c.clone();
            let url = proxy.url(&format!("/item/{i}?user={i}"));
            async move {
                let resp = c
                    .get(url)
                    .header("host", format!("h{i}.example"))
                    .send()
                    .await
                    .expect("request through the proxy");
                let status = resp.status().as_u16();
                let _ = resp.bytes().await;
                status
            }
        })
        .buffer_unordered(16)
        .collect()
        .await;
    assert!(statuses.iter().all(|s| *s == 200));

    // Size histograms are recorded as bodies end: wait for all of them.
    let deadline = Instant::now() + EVENTUALLY;
    let text = loop {
        let text = proxy.metrics.render();
        let observed = text
            .lines()
            .filter(|l| l.starts_with("portcullis_response_size_bytes_count{"))
            .count();
        if observed == N {
            break text;
        }
        assert!(Instant::now() < deadline, "{observed} of {N} size series");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let total = samples(&text);
    let routed = text
        .lines()
        .filter(|l| l.starts_with("portcullis_requests_total{"))
        .count();
    assert_eq!(routed, N, "one requests_total series per Ingress");
    println!(
        "{N} Ingresses: {total} samples in the scrape ({baseline} before traffic, {} bytes); bound {} × N + {}",
        text.len(),
        SERIES_PER_INGRESS,
        SERIES_CONSTANT
    );
    assert!(baseline <= SERIES_CONSTANT + 3 * N, "{baseline}");
    assert!(
        total <= SERIES_PER_INGRESS * N + SERIES_CONSTANT,
        "{total} samples exceed {SERIES_PER_INGRESS} × {N} + {SERIES_CONSTANT}"
    );
    // Paths, hosts and client addresses never become labels.
    assert!(!text.contains("/item/") && !text.contains(".example") && !text.contains("127.0.0.1"));
}

#[test]
fn build_info_names_the_commit_it_was_built_from() {
    let metrics = Metrics::new();
    let text = metrics.render();
    let line = text
        .lines()
        .find(|l| l.starts_with("portcullis_build_info{"))
        .expect("build_info");
    assert!(
        line.contains(&format!("version=\"{}\"", env!("CARGO_PKG_VERSION"))),
        "{line}"
    );
    let sha = portcullis::metrics::GIT_SHA;
    assert!(line.contains(&format!("git_sha=\"{sha}\"")), "{line}");
    // In a git checkout (CI's clone included) the build script finds the commit.
    let head = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    match head {
        // Unless the build environment named the commit itself.
        Some(head) if std::env::var_os("PORTCULLIS_GIT_SHA").is_none() => {
            assert_eq!(sha, head, "git_sha is HEAD's short hash")
        }
        // Outside a checkout (a source tarball) there is no HEAD to compare with; CI
        // runs in a clone, where this would be a skipped check.
        None => {
            assert!(
                !support::under_ci(),
                "CI runs in a git clone: `git rev-parse` must work"
            );
            assert!(sha == "unknown" || sha.chars().all(|c| c.is_ascii_hexdigit()));
        }
        _ => assert!(sha == "unknown" || sha.chars().all(|c| c.is_ascii_hexdigit())),
    }
}
