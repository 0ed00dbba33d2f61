//! The admin listener (probes, metrics) and the dashboard's snapshot view.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use portcullis::admin::{AdminState, serve_admin};
use portcullis::dashboard::{DashboardState, serve_dashboard};
use serde_json::Value;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

async fn fetch(url: &str) -> (u16, String) {
    let resp = client().get(url).send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.text().await.expect("body"))
}

/// The value of the sample of `name` whose labels include every pair in `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[tokio::test]
async fn probes_and_metrics() {
    let a = start_echo("a").await;
    let world = World::new()
        .ingress(
            ingress("ns", "web")
                .host("a.example")
                .prefix("/", "svc", 80),
        )
        .backend("ns", "svc", 80, &[a.addr]);
    let proxy = start_proxy(world.snapshot()).await;

    let ready = Arc::new(AtomicBool::new(false));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
    let admin = listener.local_addr().expect("admin address");
    let (_stop, rx) = Stopper::new();
    tokio::spawn(serve_admin(
        listener,
        AdminState {
            snapshots: proxy.snapshots.clone(),
            metrics: proxy.metrics.clone(),
            ready: ready.clone(),
        },
        rx,
    ));

    assert_eq!(fetch(&format!("http://{admin}/healthz")).await.0, 200);
    assert_eq!(fetch(&format!("http://{admin}/readyz")).await.0, 503);
    ready.store(true, Ordering::Release);
    assert_eq!(fetch(&format!("http://{admin}/readyz")).await.0, 200);
    assert_eq!(fetch(&format!("http://{admin}/nope")).await.0, 404);

    // Traffic: two routed GETs, one POST, one request without a route.
    for _ in 0..2 {
        get_echo(&proxy, "a.example", "/").await;
    }
    let resp = client()
        .post(proxy.url("/"))
        .header("host", "a.example")
        .body("x")
        .send()
        .await
        .expect("post");
    assert_eq!(resp.status(), 200);
    assert_eq!(get(&proxy, "nowhere.example", "/").await.0, 404);

    proxy
        .metrics
        .observe_snapshot(&proxy.snapshots.load(), 0.002);

    // A keep-alive connection stays counted while open.
    let mut held = tokio::net::TcpStream::connect(proxy.addr)
        .await
        .expect("connect");
    held.write_all(b"GET / HTTP/1.1\r\nHost: a.example\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 1024];
    assert!(held.read(&mut buf).await.expect("read") > 0);

    let (status, text) = fetch(&format!("http://{admin}/metrics")).await;
    assert_eq!(status, 200);
    let routed = [
        ("namespace", "ns"),
        ("route_kind", "Ingress"),
        ("route", "web"),
        ("service", "svc"),
        ("code", "2xx"),
    ];
    let get_labels: Vec<_> = routed.iter().copied().chain([("method", "GET")]).collect();
    // Two GETs through reqwest plus the raw keep-alive one.
    assert_eq!(
        sample(&text, "portcullis_requests_total", &get_labels),
        Some(3.0),
        "{text}"
    );
    let post_labels: Vec<_> = routed.iter().copied().chain([("method", "POST")]).collect();
    assert_eq!(
        sample(&text, "portcullis_requests_total", &post_labels),
        Some(1.0)
    );
    let unrouted = [
        ("namespace", ""),
        ("route_kind", ""),
        ("route", ""),
        ("service", ""),
        ("method", "GET"),
        ("code", "4xx"),
    ];
    assert_eq!(
        sample(&text, "portcullis_requests_total", &unrouted),
        Some(1.0)
    );
    assert_eq!(
        sample(&text, "portcullis_request_duration_seconds_count", &routed),
        Some(4.0)
    );
    assert!(
        !text
            .lines()
            .any(|l| l.starts_with("portcullis_request_duration_seconds") && l.contains("method=")),
        "histograms carry no method"
    );
    assert!(
        sample(
            &text,
            "portcullis_upstream_connect_duration_seconds_count",
            &[("service", "ns/svc")]
        )
        .is_some_and(|n| n >= 1.0)
    );
    assert_eq!(
        sample(
            &text,
            "portcullis_upstream_response_duration_seconds_count",
            &[("service", "ns/svc")]
        ),
        Some(4.0)
    );
    assert!(
        sample(
            &text,
            "portcullis_open_connections",
            &[("listener", "http"), ("protocol", "http1")]
        )
        .is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "portcullis_snapshot_generation", &[]),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "portcullis_endpoints",
            &[("namespace", "ns"), ("service", "svc"), ("state", "ready")]
        ),
        Some(1.0)
    );
    assert!(
        sample(&text, "portcullis_snapshot_publish_timestamp_seconds", &[])
            .is_some_and(|t| t > 1.0e9)
    );
    assert_eq!(
        sample(
            &text,
            "portcullis_snapshot_publish_duration_seconds_count",
            &[]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "portcullis_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(1.0)
    );
    let buckets = text
        .lines()
        .filter(|l| {
            l.starts_with("portcullis_request_duration_seconds_bucket")
                && !l.contains("method")
                && l.contains("code=\"2xx\"")
                && l.contains("service=\"svc\"")
        })
        .count();
    assert!(buckets <= 13, "≤ 12 buckets plus +Inf, got {buckets}");

    // The connection gauge goes back down once the connection closes.
    drop(held);
    let deadline = tokio::time::Instant::now() + EVENTUALLY;
    loop {
        let text = proxy.metrics.render();
        let open: f64 = ["detecting", "http1", "h2"]
            .iter()
            .filter_map(|p| {
                sample(
                    &text,
                    "portcullis_open_connections",
                    &[("listener", "http"), ("protocol", p)],
                )
            })
            .sum();
        if open == 0.0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "gauge stuck at {open}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Scrapes `/metrics` from an admin listener over `proxy`.
async fn scrape(proxy: &TestProxy) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind admin");
    let admin = listener.local_addr().expect("admin address");
    let (_stop, rx) = Stopper::new();
    tokio::spawn(serve_admin(
        listener,
        AdminState {
            snapshots: proxy.snapshots.clone(),
            metrics: proxy.metrics.clone(),
            ready: Arc::new(AtomicBool::new(true)),
        },
        rx,
    ));
    let (status, text) = fetch(&format!("http://{admin}/metrics")).await;
    assert_eq!(status, 200);
    text
}

/// The label names of every sample in a scrape.
fn label_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((_, mut rest)) = line.split_once('{') else {
            continue;
        };
        // `name="value"` pairs separated by commas; values escape `"` with `\`.
        while let Some((name, after)) = rest.split_once("=\"") {
            names.insert(name.trim_start_matches(',').to_string());
            let mut escaped = false;
            let end = after
                .char_indices()
                .find(|&(_, c)| {
                    let close = !escaped && c == '"';
                    escaped = !escaped && c == '\\';
                    close
                })
                .map_or(after.len(), |(i, _)| i);
            rest = after.get(end + 1..).unwrap_or("");
            if rest.starts_with('}') {
                break;
            }
        }
    }
    names
}

#[tokio::test]
async fn route_series_are_labelled_route_kind_and_route_never_ingress() {
    let a = start_echo("a").await;
    let world = World::new()
        .ingress(
            ingress("shop", "storefront")
                .host("a.example")
                .prefix("/", "web", 80),
        )
        .backend("shop", "web", 80, &[a.addr]);
    let proxy = start_proxy(world.snapshot()).await;
    get_echo(&proxy, "a.example", "/").await;
    assert_eq!(get(&proxy, "nowhere.example", "/").await.0, 404);
    let text = scrape(&proxy).await;
    let routed = [
        ("namespace", "shop"),
        ("route_kind", "Ingress"),
        ("route", "storefront"),
        ("service", "web"),
        ("method", "GET"),
        ("code", "2xx"),
    ];
    assert_eq!(
        sample(&text, "portcullis_requests_total", &routed),
        Some(1.0),
        "{text}"
    );
    let unrouted = [
        ("namespace", ""),
        ("route_kind", ""),
        ("route", ""),
        ("service", ""),
        ("method", "GET"),
        ("code", "4xx"),
    ];
    assert_eq!(
        sample(&text, "portcullis_requests_total", &unrouted),
        Some(1.0),
        "{text}"
    );
    // Every route series carries both labels; none carries `ingress` any more.
    let names = label_names(&text);
    assert!(
        names.contains("route_kind") && names.contains("route"),
        "{names:?}"
    );
    assert!(!names.contains("ingress"), "{names:?}\n{text}");
    for line in text.lines().filter(|l| {
        [
            "portcullis_requests_total{",
            "portcullis_request_duration_seconds_",
            "portcullis_request_size_bytes_",
            "portcullis_response_size_bytes_",
        ]
        .iter()
        .any(|p| l.starts_with(p))
    }) {
        assert!(
            line.contains("route_kind=\"") && line.contains(",route=\""),
            "{line}"
        );
    }

    // An Ingress' spec.defaultBackend is that Ingress' route.
    let world = World::new()
        .ingress(ingress("shop", "fallback").default_backend("web", 80))
        .backend("shop", "web", 80, &[a.addr]);
    let proxy = start_proxy(world.snapshot()).await;
    get_echo(&proxy, "anything.example", "/").await;
    let text = scrape(&proxy).await;
    let from_ingress = [
        ("namespace", "shop"),
        ("route_kind", "Ingress"),
        ("route", "fallback"),
        ("service", "web"),
        ("code", "2xx"),
    ];
    assert_eq!(
        sample(&text, "portcullis_requests_total", &from_ingress),
        Some(1.0),
        "{text}"
    );

    // --default-backend-service is no route: kind and name empty, the Service's namespace.
    let world = World::new().backend("shop", "web", 80, &[a.addr]);
    let proxy = start_proxy(world.snapshot_with(portcullis::k8s::Options {
        assume_class: true,
        allow_local_endpoints: true,
        default_backend_service: Some("shop/web:80".parse().expect("service ref")),
        ..Default::default()
    }))
    .await;
    get_echo(&proxy, "anything.example", "/").await;
    let text = scrape(&proxy).await;
    let from_flag = [
        ("namespace", "shop"),
        ("route_kind", ""),
        ("route", ""),
        ("service", "web"),
        ("code", "2xx"),
    ];
    assert_eq!(
        sample(&text, "portcullis_requests_total", &from_flag),
        Some(1.0),
        "{text}"
    );
    assert!(!label_names(&text).contains("ingress"), "{text}");
}

#[tokio::test]
async fn observe_snapshot_counts_diagnostics_and_endpoint_states() {
    let world = World::new()
        .ingress(
            ingress("ns", "web")
                .host("a.example")
                .prefix("/", "missing", 80),
        )
        .service(service("ns", "idle", 80))
        .slices(slice_with(
            "ns",
            "idle",
            &["127.0.0.1:9".parse().expect("addr")],
            false,
        ))
        .ingress(
            ingress("ns", "idle")
                .host("b.example")
                .prefix("/", "idle", 80),
        );
    let mut snap = world.snapshot();
    snap.generation = 7;
    let metrics = portcullis::metrics::Metrics::new();
    metrics.observe_snapshot(&snap, 0.5);
    let text = metrics.render();
    assert_eq!(
        sample(&text, "portcullis_snapshot_generation", &[]),
        Some(7.0)
    );
    assert!(
        sample(
            &text,
            "portcullis_diagnostics",
            &[("kind", "Ingress"), ("severity", "error")]
        )
        .is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "portcullis_endpoints",
            &[("service", "idle"), ("state", "not_ready")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "portcullis_endpoints",
            &[("service", "idle"), ("state", "ready")]
        ),
        Some(0.0)
    );
}

#[tokio::test]
async fn dashboard_shows_the_snapshot() {
    let a = start_echo("a").await;
    let world = World::new()
        .ingress(
            ingress("ns", "web")
                .host("a.example")
                .prefix("/", "svc", 80)
                .exact("/x", "gone", 80),
        )
        .backend("ns", "svc", 80, &[a.addr]);
    let proxy = start_proxy(world.snapshot()).await;
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind dashboard");
    let addr = listener.local_addr().expect("dashboard address");
    let (_stop, rx) = Stopper::new();
    tokio::spawn(serve_dashboard(
        listener,
        DashboardState {
            snapshots: proxy.snapshots.clone(),
            metrics: proxy.metrics.clone(),
            proxy: proxy.proxy.clone(),
        },
        rx,
    ));

    let (status, body) = fetch(&format!("http://{addr}/debug/snapshot")).await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["generation"], 1);
    let vh = &v["virtual_hosts"][0];
    assert_eq!(vh["host"], "a.example");
    let routes = vh["routes"].as_array().expect("routes");
    assert_eq!(routes.len(), 2);
    let root = routes
        .iter()
        .find(|r| r["path"] == "/")
        .expect("route for /");
    assert_eq!(root["path_type"], "Prefix");
    assert_eq!(root["host"], "a.example");
    assert_eq!(root["ingress"]["namespace"], "ns");
    assert_eq!(root["ingress"]["name"], "web");
    let cluster = &v["clusters"][root["cluster"].as_u64().expect("cluster id") as usize];
    assert_eq!(cluster["service"]["name"], "svc");
    assert_eq!(cluster["port"], 80);
    assert_eq!(cluster["service_port"], 80);
    assert_eq!(cluster["kind"], "endpoints");
    assert_eq!(cluster["endpoints"][0]["address"], a.addr.to_string());
    assert_eq!(cluster["endpoints"][0]["ready"], true);
    assert_eq!(cluster["endpoints"][0]["serving"], true);
    assert_eq!(cluster["endpoints"][0]["terminating"], false);
    assert_eq!(cluster["active"][0], a.addr.to_string());
    let gone = routes
        .iter()
        .find(|r| r["path"] == "/x")
        .expect("route for /x");
    let gone = &v["clusters"][gone["cluster"].as_u64().expect("cluster id") as usize];
    assert_eq!(gone["kind"], "unresolved");
    assert!(
        gone["unresolved"]
            .as_str()
            .is_some_and(|r| r.contains("not found"))
    );
    assert!(v["default_backend"].is_null());
    assert!(v["tls_hosts"].as_array().is_some());
    assert!(v["ignored_ingresses"].as_array().is_some());
    assert!(
        v["diagnostics"].as_array().is_some_and(|d| !d.is_empty()),
        "the unresolved backend is diagnosed"
    );

    assert_eq!(fetch(&format!("http://{addr}/other")).await.0, 404);
}
