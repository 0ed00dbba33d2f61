//! Propagation in Kubernetes mode: with 10,000 Ingresses (plus their Services and
//! EndpointSlices) loaded through the test API server, how long from a watch-visible
//! change (an EndpointSlice or an Ingress updated) until the published snapshot serves
//! it. Prints p50/p99/max over a bounded number of changes.
//!
//! `cargo bench --bench propagation` (release build). `PROPAGATION_INGRESSES` and
//! `PROPAGATION_CHANGES` override the sizes.

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
    rt.block_on(async move {
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
        tokio::spawn(portcullis::k8s::watch::run(server.client(), Default::default(), tx, Arc::new(|_| {})));
        tokio::spawn(publisher.clone().run(rx));
        while !publisher.ready.load(Ordering::Acquire) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let snap = publisher.snapshots.load_full();
        println!(
            "loaded {n} Ingresses + Services + EndpointSlices; first snapshot after {:?} with {} routes",
            load.elapsed(),
            snap.routes.routes().count()
        );

        let mut slice_times = Vec::new();
        let mut ingress_times = Vec::new();
        for c in 0..changes {
            let i = (c * 7919) % n;
            let ns = format!("ns{}", i % 100);
            let name = format!("app{i}");
            // An EndpointSlice change: the endpoint moves to a new address.
            let octet = 1000 + c;
            let want: SocketAddr = format!("10.1.{}.{}:8080", (octet / 250) % 250, octet % 250 + 1).parse().unwrap();
            let start = Instant::now();
            server.apply(slice(&ns, &name, octet));
            let deadline = start + Duration::from_secs(10);
            loop {
                let s = publisher.snapshots.load();
                let host = format!("{name}.example.com");
                if let portcullis::model::Decision::Route(_, cluster) = s.decide(Some(&host), "/")
                    && cluster.active_endpoints() == [want]
                {
                    break;
                }
                assert!(Instant::now() < deadline, "change {c} not served within 10 s");
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            slice_times.push(start.elapsed());

            // An Ingress change: a new path appears.
            let path = format!("/v{c}");
            let mut ing = objects(i)[0].clone();
            ing["spec"]["rules"][0]["http"]["paths"]
                .as_array_mut()
                .unwrap()
                .push(json!({"path": path, "pathType": "Exact", "backend": {"service": {"name": name, "port": {"number": 80}}}}));
            let start = Instant::now();
            server.apply(ing);
            let deadline = start + Duration::from_secs(10);
            loop {
                let s = publisher.snapshots.load();
                let host = format!("{name}.example.com");
                if let portcullis::model::Decision::Route(m, _) = s.decide(Some(&host), &path)
                    && m.route.path.path == path
                {
                    break;
                }
                assert!(Instant::now() < deadline, "ingress change {c} not served within 10 s");
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            ingress_times.push(start.elapsed());
        }
        for (what, mut t) in [("EndpointSlice", slice_times), ("Ingress", ingress_times)] {
            t.sort();
            println!(
                "{what} change → served, {n} Ingresses, {} changes: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                t.len(),
                percentile(&t, 0.5).as_secs_f64() * 1e3,
                percentile(&t, 0.99).as_secs_f64() * 1e3,
                t[t.len() - 1].as_secs_f64() * 1e3,
            );
        }
    });
}
