//! Propagation: with 10,000 Ingresses (plus their Services and EndpointSlices) loaded,
//! how long from a change until the published snapshot serves it. Three scenarios:
//! - the test API server (Kubernetes mode): one EndpointSlice or one Ingress updated,
//!   [`QUIET`] after the previous change was served (a single edit or pod move, not
//!   continuous churn: that is the burst below);
//! - manifest files (file mode): the same objects spread over files, one file rewritten
//!   with a moved endpoint or a new path;
//! - a burst: 1,000 EndpointSlices updated back to back through the API server, timed
//!   until every one of them is served.
//!
//! Prints p50/p99/max per scenario. The endpoint addresses (10.x) are data only: no
//! traffic is sent anywhere.
//!
//! `cargo bench --bench propagation` (release build). `PROPAGATION_INGRESSES`,
//! `PROPAGATION_CHANGES`, `PROPAGATION_FILES` and `PROPAGATION_BURST` override the sizes;
//! `PROPAGATION_ONLY=api|files|burst` runs one scenario.

/// The binary's allocator, so that figures match what `portcullis` does.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[path = "../tests/support/apiserver.rs"]
mod apiserver;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use apiserver::{ApiServer, Options as ApiOptions};
use portcullis::k8s::Options;
use portcullis::publish::Publisher;
use serde_json::json;
use tokio::sync::watch;

/// Pause between single changes: longer than the publisher's minimum gap between two
/// builds, so each change arrives after a quiet spell.
const QUIET: Duration = Duration::from_millis(50);

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn objects(i: usize) -> [serde_json::Value; 3] {
    let ns = format!("ns{}", i % 100);
    let name = format!("app{i}");
    [
        json!({"apiVersion": "networking.k8s.io/v1", "kind": "Ingress",
               "metadata": {"namespace": ns, "name": name},
               "spec": {"rules": [{"host": format!("{name}.example.com"), "http": {"paths": [
                   {"path": "/", "pathType": "Prefix", "backend": {"service": {"name": name, "port": {"number": 80}}}}]}}]}}),
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"namespace": ns, "name": name},
               "spec": {"ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}),
        slice(&ns, &name, 1),
    ]
}

fn slice(ns: &str, name: &str, last_octet: usize) -> serde_json::Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"namespace": ns, "name": format!("{name}-abc"), "labels": {"kubernetes.io/service-name": name}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
           "endpoints": [{"addresses": [format!("10.1.{}.{}", (last_octet / 250) % 250, last_octet % 250 + 1)], "conditions": {"ready": true}}]})
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn report(what: &str, n: usize, unit: &str, mut t: Vec<Duration>) {
    t.sort();
    println!(
        "{what}, {n} Ingresses, {} {unit}: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        t.len(),
        percentile(&t, 0.5).as_secs_f64() * 1e3,
        percentile(&t, 0.99).as_secs_f64() * 1e3,
        t[t.len() - 1].as_secs_f64() * 1e3,
    );
}

fn endpoint(octet: usize) -> SocketAddr {
    format!("10.1.{}.{}:8080", (octet / 250) % 250, octet % 250 + 1)
        .parse()
        .expect("a literal socket address")
}

/// Whether `name.example.com/` is routed to exactly `want`.
fn serves_endpoint(publisher: &Publisher, name: &str, want: SocketAddr) -> bool {
    let s = publisher.snapshots.load();
    let host = format!("{name}.example.com");
    matches!(s.decide(Some(&host), "/"),
        portcullis::model::Decision::Route(m)
            if s.route_cluster(m.route).is_some_and(|c| c.active_endpoints() == [want]))
}

/// Whether `name.example.com` has an Exact route for `path`.
fn serves_path(publisher: &Publisher, name: &str, path: &str) -> bool {
    let s = publisher.snapshots.load();
    let host = format!("{name}.example.com");
    matches!(s.decide(Some(&host), path),
        portcullis::model::Decision::Route(m) if m.route.path.path == path)
}

/// Polls `done` until it holds; the time since `start`. Panics after 10 s.
async fn served_after(start: Instant, what: &str, mut done: impl FnMut() -> bool) -> Duration {
    let deadline = start + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "{what} not served within 10 s");
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    start.elapsed()
}

async fn wait_ready(publisher: &Publisher) {
    while !publisher.ready.load(Ordering::Acquire) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The objects of app `i` as YAML documents; `octet` picks its endpoint, `extra` adds an
/// Exact path.
fn yaml(i: usize, octet: usize, extra: Option<&str>) -> String {
    let mut out = String::new();
    let [mut ing, svc, _] = objects(i);
    let ns = format!("ns{}", i % 100);
    let name = format!("app{i}");
    if let Some(path) = extra {
        ing["spec"]["rules"][0]["http"]["paths"]
            .as_array_mut()
            .expect("paths is an array")
            .push(json!({"path": path, "pathType": "Exact", "backend": {"service": {"name": name, "port": {"number": 80}}}}));
    }
    // JSON is YAML: one flow-style document per object.
    for o in [ing, svc, slice(&ns, &name, octet)] {
        out.push_str("---\n");
        out.push_str(&o.to_string());
        out.push('\n');
    }
    out
}

/// The manifest file holding app `i` when `n` apps are spread over `files` files.
fn file_of(i: usize, files: usize) -> usize {
    i % files
}

fn write_file(
    dir: &std::path::Path,
    f: usize,
    n: usize,
    files: usize,
    changed: Option<(usize, usize, Option<&str>)>,
) {
    let mut text = String::new();
    for i in (f..n).step_by(files) {
        match changed {
            Some((c, octet, extra)) if c == i => text.push_str(&yaml(i, octet, extra)),
            _ => text.push_str(&yaml(i, 1, None)),
        }
    }
    // Written to a temporary name and renamed, as editors and `kubectl` tooling do, so
    // that the watcher never sees a half-written file.
    let tmp = dir.join(format!(".f{f:05}.tmp"));
    std::fs::write(&tmp, text).expect("write a manifest file");
    std::fs::rename(&tmp, dir.join(format!("f{f:05}.yaml"))).expect("rename a manifest file");
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing extra: keep
    // that run tiny so it only proves the bench works.
    let quick = !std::env::args().any(|a| a == "--bench");
    let n = env_usize("PROPAGATION_INGRESSES", if quick { 50 } else { 10_000 });
    let changes = env_usize("PROPAGATION_CHANGES", if quick { 3 } else { 100 });
    portcullis::tls::install_default_provider();
    if std::env::var_os("RUST_LOG").is_some() {
        portcullis::run::init_logging(portcullis::cli::LogFormat::Text);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let only = std::env::var("PROPAGATION_ONLY").ok();
    let run = |what: &str| only.as_deref().is_none_or(|o| o == what);
    let files = env_usize("PROPAGATION_FILES", if quick { 5 } else { 1_000 });
    let burst = env_usize("PROPAGATION_BURST", if quick { 10 } else { 1_000 });
    rt.block_on(async move {
        if run("api") || run("burst") {
            api_server(n, changes, if run("burst") { burst } else { 0 }, run("api")).await;
        }
        if run("files") {
            file_source(n, changes, files).await;
        }
    });
}

async fn api_server(n: usize, changes: usize, burst: usize, single: bool) {
    let server = ApiServer::start_with(ApiOptions {
        history_limit: 100_000,
        ..ApiOptions::default()
    })
    .await;
    let load = Instant::now();
    server.apply(json!({"apiVersion": "networking.k8s.io/v1", "kind": "IngressClass",
        "metadata": {"name": "portcullis", "annotations": {"ingressclass.kubernetes.io/is-default-class": "true"}},
        "spec": {"controller": "portcullis.io/ingress-controller"}}));
    for i in 0..n {
        for o in objects(i) {
            server.apply(o);
        }
    }
    let publisher = Arc::new(Publisher::new(Options::default()));
    let (tx, rx) = watch::channel(None);
    tokio::spawn(portcullis::k8s::watch::run(
        server.client(),
        Default::default(),
        tx,
        Arc::new(|_| {}),
    ));
    tokio::spawn(publisher.clone().run(rx));
    wait_ready(&publisher).await;
    let snap = publisher.snapshots.load_full();
    println!(
        "API server: loaded {n} Ingresses + Services + EndpointSlices; first snapshot after {:?} with {} routes",
        load.elapsed(),
        snap.routes.routes().count()
    );
    drop(snap);

    if single {
        let mut slice_times = Vec::new();
        let mut ingress_times = Vec::new();
        for c in 0..changes {
            let i = (c * 7919) % n;
            let ns = format!("ns{}", i % 100);
            let name = format!("app{i}");
            // An EndpointSlice change: the endpoint moves to a new address.
            let octet = 1000 + c;
            let want = endpoint(octet);
            tokio::time::sleep(QUIET).await;
            let start = Instant::now();
            server.apply(slice(&ns, &name, octet));
            slice_times.push(
                served_after(start, "EndpointSlice change", || {
                    serves_endpoint(&publisher, &name, want)
                })
                .await,
            );

            // An Ingress change: a new path appears.
            let path = format!("/v{c}");
            let mut ing = objects(i)[0].clone();
            ing["spec"]["rules"][0]["http"]["paths"]
                .as_array_mut()
                .expect("paths is an array")
                .push(json!({"path": path, "pathType": "Exact", "backend": {"service": {"name": name, "port": {"number": 80}}}}));
            tokio::time::sleep(QUIET).await;
            let start = Instant::now();
            server.apply(ing);
            ingress_times.push(
                served_after(start, "Ingress change", || {
                    serves_path(&publisher, &name, &path)
                })
                .await,
            );
        }
        report(
            "API server: EndpointSlice change → served",
            n,
            "changes",
            slice_times,
        );
        report(
            "API server: Ingress change → served",
            n,
            "changes",
            ingress_times,
        );
    }

    if burst > 0 {
        let mut times = Vec::new();
        for round in 0..3 {
            // `burst` distinct apps, each EndpointSlice moved to a new address.
            let apps: Vec<(usize, usize)> = (0..burst.min(n))
                .map(|c| ((c * 7919 + round * 13) % n, 5000 + round * 1000 + c))
                .collect();
            let start = Instant::now();
            for &(i, octet) in &apps {
                server.apply(slice(&format!("ns{}", i % 100), &format!("app{i}"), octet));
            }
            let written = start.elapsed();
            let names: Vec<String> = apps.iter().map(|(i, _)| format!("app{i}")).collect();
            let took = served_after(start, "burst", || {
                names
                    .iter()
                    .zip(&apps)
                    .all(|(name, &(_, octet))| serves_endpoint(&publisher, name, endpoint(octet)))
            })
            .await;
            println!(
                "API server: burst of {} EndpointSlice updates (written in {:.1} ms) → all served after {:.1} ms",
                apps.len(),
                written.as_secs_f64() * 1e3,
                took.as_secs_f64() * 1e3
            );
            times.push(took);
        }
        report(
            &format!("API server: burst of {burst} → all served"),
            n,
            "rounds",
            times,
        );
    }
}

async fn file_source(n: usize, changes: usize, files: usize) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let load = Instant::now();
    for f in 0..files {
        write_file(dir.path(), f, n, files, None);
    }
    let mut publisher = Publisher::new(Options {
        assume_class: true,
        allow_local_endpoints: true,
        ..Options::default()
    });
    // As `portcullis run --manifests` does: the file source debounces by itself.
    publisher.debounce = Duration::ZERO;
    let publisher = Arc::new(publisher);
    let (tx, rx) = watch::channel(None);
    let paths = vec![dir.path().to_path_buf()];
    tokio::spawn(async move { portcullis::files::watch(paths, tx).await });
    tokio::spawn(publisher.clone().run(rx));
    wait_ready(&publisher).await;
    println!(
        "files: loaded {n} Ingresses + Services + EndpointSlices from {files} files; first snapshot after {:?} with {} routes",
        load.elapsed(),
        publisher.snapshots.load().routes.routes().count()
    );
    // Files modified within two seconds of being read have timestamps too close to
    // trust, and are compared by content on every reload until then: wait that out, as
    // an edit to files written some time ago would.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let mut slice_times = Vec::new();
    let mut ingress_times = Vec::new();
    for c in 0..changes {
        let i = (c * 7919) % n;
        let f = file_of(i, files);
        let name = format!("app{i}");
        let octet = 1000 + c;
        let want = endpoint(octet);
        let start = Instant::now();
        write_file(dir.path(), f, n, files, Some((i, octet, None)));
        slice_times.push(
            served_after(start, "file EndpointSlice change", || {
                serves_endpoint(&publisher, &name, want)
            })
            .await,
        );
        let path = format!("/v{c}");
        let start = Instant::now();
        write_file(dir.path(), f, n, files, Some((i, octet, Some(&path))));
        ingress_times.push(
            served_after(start, "file Ingress change", || {
                serves_path(&publisher, &name, &path)
            })
            .await,
        );
    }
    let per_file = n.div_ceil(files);
    report(
        &format!("files: EndpointSlice change ({per_file} apps per file) → served"),
        n,
        "changes",
        slice_times,
    );
    report(
        &format!("files: Ingress change ({per_file} apps per file) → served"),
        n,
        "changes",
        ingress_times,
    );
}
